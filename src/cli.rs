//! Command-line interface: `serve` (Streamable HTTP), `stdio`, `status`, `reload`,
//! `servers …`, `config check|backups|restore`.

mod health;
mod manage;
mod tools;

use crate::admin;
use crate::config::{self, Config};
use crate::frontend;
use crate::router::{Front, Relay};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mcp-relay",
    version,
    about = "Many MCP servers behind one MCP endpoint"
)]
struct Cli {
    /// Config file; default ./relay.json, then $XDG_CONFIG_HOME/mcp-relay/relay.json.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Streamable HTTP (default 127.0.0.1:7800, endpoint /mcp).
    Serve {
        /// Listen address, overriding relay.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve a non-loopback address without `auth` (anyone who can reach it may use
        /// every server); same as relay.allowUnauthenticated.
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Serve one client on stdin/stdout (for Claude Code, Cursor and other local clients).
    Stdio,
    /// Show the running relays of the config file: servers, states, sessions.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the running relays re-read the config file now.
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// List, add, remove, update or restart servers (the running relays apply changes at
    /// once; the config file is updated with a backup).
    Servers {
        #[command(subcommand)]
        command: ServersCommand,
    },
    /// Upgrade running relays to a new binary (default: the path each was started from)
    /// without their clients noticing: a stdio relay in place, an HTTP relay by handing its
    /// socket and sessions to a new process; same as sending them SIGUSR2.
    Upgrade {
        /// Only the relay with this PID (default: every relay of the config file).
        #[arg(long)]
        pid: Option<u32>,
        /// The new binary.
        #[arg(long)]
        binary: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check a running HTTP relay the way a client would (initialize, tools/list, close);
    /// exits 0 with a one-line summary, 1 with the reason. For deploy scripts and systemd.
    Health {
        /// The relay's MCP endpoint, e.g. http://127.0.0.1:7800/mcp.
        #[arg(long, conflicts_with_all = ["host", "port"])]
        url: Option<String>,
        /// Host of the relay (default 127.0.0.1), with --port.
        #[arg(long)]
        host: Option<String>,
        /// Port of the relay (default 7800).
        #[arg(long)]
        port: Option<u16>,
        /// Environment variable holding the bearer token, if the relay needs one.
        #[arg(long, default_value = "MCP_RELAY_TOKEN")]
        token_env: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Internal: a new binary's check before a running relay upgrades to it (reads the
    /// upgrade state on stdin, loads the config, answers with its version).
    #[command(hide = true)]
    UpgradeCheck,
    /// Internal: the watchdog the relay starts to stop its servers if it dies.
    #[command(hide = true)]
    Keeper,
    /// Config file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Tool selection: rank a tool catalog against prompts offline.
    Tools {
        #[command(subcommand)]
        command: ToolsCommand,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Rank a catalog for each query with the ranking `relay__analyze_prompt` uses; prints
    /// one `{"id", "ranked": [tool ids]}` line per query.
    Rank {
        /// Tools, one JSON object a line: `id`, `name`, `description`, optional `server`,
        /// `title`, `input_schema` (or `inputSchema`), `server_title`, `server_description`.
        #[arg(long)]
        catalog: PathBuf,
        /// Queries, one JSON object a line: `id` and `query`.
        #[arg(long)]
        queries: PathBuf,
        /// Tools ranked per query.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Also print each ranked tool's score (`"scores"`, in the order of `"ranked"`).
        #[arg(long)]
        scores: bool,
        /// Mix in a sentence-embedding model's similarities, as `toolFiltering.embeddings`
        /// does: the model's directory (sentence-transformers layout).
        #[arg(long, value_name = "DIR")]
        embeddings: Option<PathBuf>,
        /// The embeddings' share of the score, 0 to 1.
        #[arg(long, default_value_t = 0.6, requires = "embeddings", value_parser = share)]
        embedding_weight: f64,
    },
}

/// A number from 0 to 1.
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("`{s}` is not a number from 0 to 1")),
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; prints every problem and exits 2 if there are any.
    Check,
    /// List the config file's backups, newest last.
    Backups,
    /// Restore a backup (default: the newest) over the config file; the running relays
    /// apply it.
    Restore {
        /// A backup's file name or path, as `config backups` lists them.
        backup: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ServersCommand {
    /// List the configured servers with their state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a server: `servers add NAME -- CMD ARGS…` or `servers add NAME --url URL`.
    Add(EntryArgs),
    /// Replace a server's entry (same options as `add`).
    Update(EntryArgs),
    /// Remove a server.
    Remove {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Restart a server in the running relays (clears `failed`).
    Restart {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct EntryArgs {
    /// Server name (letters, digits, `_`, `-`).
    name: String,
    /// URL of a remote server (Streamable HTTP, or legacy SSE for URLs ending in /sse).
    #[arg(long)]
    url: Option<String>,
    /// Transport: stdio, http or sse (default: from `--url` or the command).
    #[arg(long = "type")]
    transport: Option<String>,
    /// HTTP header for a remote server, `NAME=VALUE` (use `${VAR}` to keep secrets out of the file).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Environment variable for a stdio server, `NAME=VALUE` (`${VAR}` references are kept).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory of a stdio server.
    #[arg(long)]
    cwd: Option<String>,
    /// Prefix of its exposed names (default: the server name; "" for none).
    #[arg(long)]
    prefix: Option<String>,
    /// Add it disabled.
    #[arg(long)]
    disabled: bool,
    /// The whole entry as JSON, as in relay.json (instead of the options above).
    #[arg(long = "entry", value_name = "JSON")]
    entry: Option<String>,
    #[arg(long)]
    json: bool,
    /// The command of a stdio server and its arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs the command line; the exit code is 0 on success, 2 for config problems, 1 otherwise.
pub fn main() -> ExitCode {
    // First, while this is the only thread: an upgrade's hand-over lives in the environment.
    let inherited = crate::upgrade::Inherited::from_env();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Serve { .. } | Command::Stdio | Command::UpgradeCheck
    ) {
        crate::telemetry::init(&config::LogSettings::default());
    }
    let config = cli.config;
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => check(config),
        Command::Config {
            command: ConfigCommand::Backups,
        } => manage::backups(config),
        Command::Config {
            command: ConfigCommand::Restore { backup },
        } => manage::restore(config, backup),
        Command::Keeper => crate::backend::keeper::run(),
        Command::Tools {
            command:
                ToolsCommand::Rank {
                    catalog,
                    queries,
                    top,
                    scores,
                    embeddings,
                    embedding_weight,
                },
        } => tools::rank(tools::RankArgs {
            catalog: &catalog,
            queries: &queries,
            top,
            scores,
            embeddings: embeddings
                .as_deref()
                .map(|d| (d, embedding_weight.clamp(0.0, 1.0))),
        }),
        Command::Serve {
            listen,
            allow_unauthenticated,
        } => run(
            config,
            Some((listen, allow_unauthenticated)),
            &inherited,
            false,
        ),
        Command::Stdio => run(config, None, &inherited, false),
        Command::UpgradeCheck => run(config, None, &inherited, true),
        Command::Upgrade { pid, binary, json } => manage::upgrade(config, pid, binary, json),
        Command::Health {
            url,
            host,
            port,
            token_env,
            timeout_ms,
        } => {
            let url = url.unwrap_or_else(|| {
                let host = host.unwrap_or_else(|| "127.0.0.1".into());
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("http://{host}:{}/mcp", port.unwrap_or(7800))
            });
            health::run(
                &url,
                &token_env,
                std::time::Duration::from_millis(timeout_ms),
            )
        }
        Command::Status { json } => manage::status(config, json),
        Command::Reload { json } => manage::reload(config, json),
        Command::Servers { command } => match command {
            ServersCommand::List { json } => manage::list(config, json),
            ServersCommand::Add(e) => manage::put(config, "add_server", e),
            ServersCommand::Update(e) => manage::put(config, "update_server", e),
            ServersCommand::Remove { name, json } => manage::remove(config, &name, json),
            ServersCommand::Restart { name, json } => manage::restart(config, &name, json),
        },
    }
}

/// Loads the config of a serving command, setting up logging from it first.
fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let path = config::locate(path.as_deref()).map_err(|e| {
        crate::telemetry::init(&config::LogSettings::default());
        eprintln!("mcp-relay: {e}");
        ExitCode::from(2)
    })?;
    let loaded = config::load(&path);
    let defaults = config::LogSettings::default();
    crate::telemetry::init(loaded.as_ref().map_or(&defaults, |c| &c.relay.log));
    match loaded {
        Ok(c) => {
            tracing::info!(file = %path.display(), servers = c.servers.len(), "Config loaded.");
            for w in &c.warnings {
                tracing::warn!("{w}");
            }
            Ok(c)
        }
        Err(e) => {
            eprintln!("mcp-relay: invalid config:\n{e}");
            Err(ExitCode::from(2))
        }
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let path = match config::locate(path.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match config::load(&path) {
        Ok(c) => {
            for w in &c.warnings {
                println!("warning: {w}");
            }
            println!(
                "{}: ok ({} servers, {} enabled)",
                path.display(),
                c.servers.len(),
                c.servers.iter().filter(|s| !s.disabled).count()
            );
            ExitCode::SUCCESS
        }
        Err(config::Error::Invalid(problems)) => {
            for p in &problems {
                println!("error: {p}");
            }
            println!("{} problem(s) found", problems.len());
            ExitCode::from(2)
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every client connection, backend
/// connection and stdio pipe is a descriptor, and the usual soft limit (1024) is low for a
/// relay serving many sessions.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!(error = %e, "Could not raise the open-files limit.");
    }
}

/// `http`: `Some((listen override, --allow-unauthenticated))` serves HTTP, `None` stdio.
fn run(
    path: Option<PathBuf>,
    http: Option<(Option<SocketAddr>, bool)>,
    inherited: &crate::upgrade::Inherited,
    check_mode: bool,
) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => {
            if inherited.upgrading() {
                let e = inherited.roll_back("the config does not load in the new binary");
                eprintln!("mcp-relay: {e}");
            }
            return code;
        }
    };
    if check_mode {
        return crate::upgrade::run_check();
    }
    // An in-place upgrade of a stdio relay: what the previous image handed over.
    let mut carried = None;
    if inherited.upgrading() {
        if http.is_some() {
            tracing::warn!("Upgrade state handed to an HTTP relay; ignored.");
        } else {
            let restored = inherited.read_state().and_then(|st| {
                let keeper = match &st.keeper {
                    Some(k) => Some(crate::backend::keeper::Keeper::adopt(k)?),
                    None => None,
                };
                Ok((st, keeper))
            });
            match restored {
                Ok(r) => {
                    // From here until it adopts the servers, a panic returns to the
                    // previous binary.
                    inherited.arm_panic_rollback();
                    carried = Some(r);
                }
                Err(e) => {
                    let e = inherited.roll_back(&e);
                    eprintln!("mcp-relay: upgrade failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if let Some((listen, allow)) = http {
        let addr = listen.unwrap_or(cfg.relay.listen);
        let open = allow || cfg.relay.allow_unauthenticated;
        if !(addr.ip().is_loopback() || cfg.auth.enabled() || open) {
            eprintln!(
                "mcp-relay: refusing to serve {addr} without authentication: anyone who can reach a non-loopback address could use every configured server. Configure `auth.clients` (bearer tokens), listen on 127.0.0.1, or pass --allow-unauthenticated (relay.allowUnauthenticated: true) if a proxy in front authenticates."
            );
            return ExitCode::from(2);
        }
    }
    raise_open_files_limit();
    // Termination and upgrade signals reach the main thread only (see `upgrade`): every
    // runtime thread inherits this block; the main thread lets them in once handled.
    crate::upgrade::block_signals_at_start();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let front = if http.is_some() { Front::Http } else { Front::Stdio };
        let allow_flag = http.is_some_and(|(_, allow)| allow);
        let http = http.map(|(listen, _)| listen);
        let (restored, keeper) = match carried {
            Some((st, k)) => (Some(st), k),
            None => (None, None),
        };
        if restored.is_some()
            && let Some(e) = crate::upgrade::panic_hook()
        {
            panic!("{e}");
        }
        // Adopting the servers starts reading them and may stop some: from here on the
        // handed-over state is no longer the previous image's to take back.
        crate::upgrade::disarm_panic_rollback();
        let relay = Relay::start_with(cfg, front, restored.as_ref().map(|st| (st, keeper)));
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone(), relay.clone());
        if let Some(st) = &restored {
            match &inherited.rolled_back {
                Some(why) => {
                    tracing::error!(error = %why, version = %crate::version(), "Upgrade failed; the previous binary serves on.");
                    relay.metrics.upgrade("rolled_back");
                }
                None => {
                    tracing::info!(from = %st.written_by, to = %crate::version(), servers = st.backends.len(), "Upgraded in place.");
                    relay.metrics.upgrade("completed");
                }
            }
        }
        let restored = restored.map(|st| st.front);
        admin::watch::spawn(relay.clone(), shutdown.clone());
        // Signals held across an upgrade's exec are let in now that their handlers exist
        // (SIGTERM/SIGINT/SIGUSR2 above, SIGHUP in the watch).
        crate::upgrade::unblock_signals();
        // Removes the socket file when dropped, at the end of this block.
        let _control = admin::control::serve(relay.clone(), shutdown.clone());
        let served = match http {
            Some(listen) => {
                let addr = listen.unwrap_or(relay.config().relay.listen);
                // A successor of an HTTP upgrade takes its predecessor's socket over.
                let (bound, handoff) = match inherited.socket.take() {
                    Some(Ok(_)) if let Some(e) = crate::upgrade::fail_hook() => {
                        (Err(std::io::Error::other(e)), None)
                    }
                    Some(Ok((l, h))) => (tokio::net::TcpListener::from_std(l), Some(h)),
                    Some(Err(e)) => (Err(std::io::Error::other(e)), None),
                    None => (tokio::net::TcpListener::bind(addr).await, None),
                };
                match bound {
                    Ok(l) => {
                        // The management tools are offered over HTTP only on loopback (or by scope).
                        let loopback = l.local_addr().is_ok_and(|a| a.ip().is_loopback());
                        relay.allow_admin_front(loopback);
                        relay.set_public(!loopback && !allow_flag);
                        // A certificate that does not load fails the start, before the
                        // listening line.
                        if let Some(t) = relay.config().relay.tls.clone()
                            && let Err(e) = frontend::tls::load(&t)
                        {
                            shutdown.cancel();
                            relay.shutdown().await;
                            return Err(e.to_string());
                        }
                        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        let scheme = if relay.config().relay.tls.is_some() { "https" } else { "http" };
                        tracing::info!(addr = %local, "Serving Streamable HTTP at {scheme}://{local}/mcp");
                        // A machine-readable line for scripts and tests that bind port 0.
                        eprintln!("mcp-relay listening on {scheme}://{local}/mcp");
                        frontend::http::serve(relay.clone(), l, shutdown.clone(), handoff)
                            .await
                            .map_err(|e| format!("HTTP server failed: {e}"))
                    }
                    Err(e) => Err(format!("cannot listen on {addr}: {e}")),
                }
            }
            None => tokio::select! {
                r = frontend::stdio::serve(relay.clone(), restored) => r.map_err(|e| format!("stdio failed: {e}")),
                () = shutdown.cancelled() => Ok(()),
            },
        };
        shutdown.cancel();
        relay.shutdown().await;
        served
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM/SIGINT drain and stop; SIGUSR2 upgrades the relay (see `upgrade`). The handlers
/// are installed before this returns (an upgraded image unblocks the signals after it).
fn spawn_signal_handler(shutdown: CancellationToken, relay: std::sync::Arc<Relay>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("Cannot install signal handlers; SIGTERM/SIGINT will not drain.");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down.");
                    crate::upgrade::note_terminating();
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: shutting down.");
                    crate::upgrade::note_terminating();
                    break;
                }
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrading in place.");
                    let relay = relay.clone();
                    tokio::spawn(async move {
                        if let Err(e) = relay.request_upgrade(None).await {
                            tracing::error!(error = %e, "Upgrade not done.");
                        }
                    });
                }
            }
        }
        shutdown.cancel();
    });
}
