//! The operator commands: `status`, `reload`, `servers …`, `config backups|restore`.
//!
//! They find the relays running on the config file through their control sockets
//! ([`crate::admin::control`]). A change is sent to one of them, which writes the file
//! (locked, atomic, backed up) and applies it; the others are told to reload at once (they
//! would also follow the file watch). With no relay running, the file is edited directly,
//! through the same locked write.

use super::EntryArgs;
use crate::admin::{self, control};
use crate::config::{self, store};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How long a command waits for a relay's answer (a change may wait for a server start).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mcp-relay: {msg}");
    ExitCode::FAILURE
}

fn locate(given: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    config::locate(given.as_deref())
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .map_err(|e| {
            eprintln!("mcp-relay: {e}");
            ExitCode::from(2)
        })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Variables are the relay's business: the shell running this command may not have the
/// ones the relay gets (e.g. from the client that starts it), so an unset `${VAR}` counts
/// as set here (as its own text) and the relay reports, on reload, one it lacks.
fn any_var(k: &str) -> Option<String> {
    Some(std::env::var(k).unwrap_or_else(|_| format!("${{{k}}}")))
}

/// Validates a whole config text as the relay would load it (structure, names, types).
fn validate(file: &Path) -> impl FnOnce(&str) -> Result<(), String> {
    let file = file.display().to_string();
    move |text| {
        config::parse(text, &file, &any_var)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Asks every running relay of the config to reload; returns how many did.
fn reload_all(sockets: &[PathBuf]) -> Result<usize, String> {
    let mut done = 0;
    for s in sockets {
        control::request(s, "reload_config", &json!({}), ANSWER_TIMEOUT)?;
        done += 1;
    }
    Ok(done)
}

/// The control sockets of the relays running on the config; an error if there are none.
fn running(config: Option<PathBuf>) -> Result<Vec<PathBuf>, ExitCode> {
    let path = locate(config)?;
    let sockets = control::find(&path);
    if sockets.is_empty() {
        return Err(fail(format!("no relay is running on {}", path.display())));
    }
    Ok(sockets)
}

/// `relay.configBackups` of the config file (the default if it cannot be read). Variables
/// unset in this shell do not make it fall back (see [`any_var`]).
fn keep_backups(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| config::parse(&text, &path.display().to_string(), &any_var).ok())
        .map_or(store::DEFAULT_BACKUPS, |c| c.relay.config_backups)
}

pub fn status(config: Option<PathBuf>, as_json: bool) -> ExitCode {
    let sockets = match running(config) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let mut all = Vec::new();
    for s in &sockets {
        match control::request(s, "status", &json!({}), ANSWER_TIMEOUT) {
            Ok(v) => all.push(v),
            Err(e) => return fail(e),
        }
    }
    if as_json {
        print_json(&Value::Array(all));
        return ExitCode::SUCCESS;
    }
    for st in &all {
        println!(
            "mcp-relay {} pid {} ({}), up {}, {} session(s), config {}",
            st["version"].as_str().unwrap_or("?"),
            st["pid"],
            st["front"].as_str().unwrap_or("?"),
            duration(st["uptimeSeconds"].as_u64().unwrap_or(0)),
            st["sessions"],
            st["configPath"].as_str().unwrap_or("-"),
        );
        if let Some(e) = st["configError"].as_str() {
            println!("rejected config change (running config kept):\n{e}");
        }
        let rows: Vec<Vec<String>> = st["servers"]
            .as_array()
            .map(|a| a.iter().map(server_row).collect())
            .unwrap_or_default();
        table(
            &[
                "SERVER",
                "TRANSPORT",
                "STATE",
                "TOOLS",
                "RESTARTS",
                "LAST ERROR",
            ],
            &rows,
        );
    }
    ExitCode::SUCCESS
}

fn server_row(s: &Value) -> Vec<String> {
    let text = |k: &str| match &s[k] {
        Value::String(v) => v.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    vec![
        text("name"),
        text("transport"),
        text("state"),
        text("tools"),
        text("restarts"),
        text("lastError"),
    ]
}

fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count().min(60));
        }
    }
    let line = |cells: Vec<String>| {
        let out: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| {
                let c: String = c.chars().take(60).collect();
                format!("{c:<w$}")
            })
            .collect();
        println!("{}", out.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn reload(config: Option<PathBuf>, as_json: bool) -> ExitCode {
    let sockets = match running(config) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let mut code = ExitCode::SUCCESS;
    for s in &sockets {
        let pid = control::pid_of(s).unwrap_or_default();
        match control::request(s, "reload_config", &json!({}), ANSWER_TIMEOUT) {
            Ok(v) if as_json => print_json(&json!({"pid": pid, "result": v})),
            Ok(v) => println!("relay pid {pid}: {}", summary(&v["applied"])),
            Err(e) => {
                eprintln!("relay pid {pid}: {e}");
                code = ExitCode::from(2);
            }
        }
    }
    code
}

fn summary(applied: &Value) -> String {
    let names = |k: &str| -> Vec<String> {
        applied[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut parts = Vec::new();
    for (k, label) in [
        ("added", "added"),
        ("removed", "removed"),
        ("changed", "restarted with new config"),
    ] {
        let n = names(k);
        if !n.is_empty() {
            parts.push(format!("{label} {}", n.join(", ")));
        }
    }
    let restart = names("needsRestart");
    if !restart.is_empty() {
        parts.push(format!("needs a relay restart: {}", restart.join(", ")));
    }
    if parts.is_empty() {
        "no change".to_owned()
    } else {
        parts.join("; ")
    }
}

pub fn list(config: Option<PathBuf>, as_json: bool) -> ExitCode {
    let path = match locate(config) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let servers: Vec<Value> = match control::find(&path).first() {
        Some(s) => match control::request(s, "list_servers", &json!({}), ANSWER_TIMEOUT) {
            Ok(v) => v["servers"].as_array().cloned().unwrap_or_default(),
            Err(e) => return fail(e),
        },
        None => {
            // No relay running: what the file says.
            let cfg = match config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mcp-relay: {e}");
                    return ExitCode::from(2);
                }
            };
            let doc = store::read(&path).ok();
            cfg.servers
                .iter()
                .map(|s| {
                    let mut v = admin::describe_entry(
                        &s.name,
                        doc.as_ref().and_then(|d| d.server(&s.name)),
                        s,
                    );
                    if let Some(o) = v.as_object_mut() {
                        o.insert("state".into(), json!("not running"));
                    }
                    v
                })
                .collect()
        }
    };
    if as_json {
        print_json(&json!({"servers": servers}));
        return ExitCode::SUCCESS;
    }
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|s| {
            let target = match (s["command"].as_str(), s["url"].as_str()) {
                (Some(c), _) => {
                    let args: Vec<&str> = s["args"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    std::iter::once(c).chain(args).collect::<Vec<_>>().join(" ")
                }
                (None, Some(u)) => u.to_owned(),
                _ => "-".to_owned(),
            };
            let mut row = server_row(s);
            row.truncate(4);
            row.push(target);
            row
        })
        .collect();
    table(
        &["SERVER", "TRANSPORT", "STATE", "TOOLS", "COMMAND / URL"],
        &rows,
    );
    ExitCode::SUCCESS
}

/// `NAME=VALUE` pairs into a JSON object.
fn pairs(items: &[String], what: &str) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    for i in items {
        let (k, v) = i
            .split_once('=')
            .ok_or_else(|| format!("{what} `{i}` is not NAME=VALUE"))?;
        m.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(m)
}

fn entry_of(e: &EntryArgs) -> Result<Value, String> {
    if let Some(text) = &e.entry {
        let v: Value = serde_json::from_str(text)
            .map_err(|err| format!("--entry is not valid JSON: {err}"))?;
        return if v.is_object() {
            Ok(v)
        } else {
            Err("--entry must be a JSON object".into())
        };
    }
    let mut m = Map::new();
    match (e.command.split_first(), &e.url) {
        (Some(_), Some(_)) => {
            return Err("give either a command (after `--`) or --url, not both".into());
        }
        (Some((cmd, args)), None) => {
            m.insert("command".into(), json!(cmd));
            if !args.is_empty() {
                m.insert("args".into(), json!(args));
            }
            let env = pairs(&e.env, "--env")?;
            if !env.is_empty() {
                m.insert("env".into(), Value::Object(env));
            }
            if let Some(c) = &e.cwd {
                m.insert("cwd".into(), json!(c));
            }
        }
        (None, Some(url)) => {
            m.insert("url".into(), json!(url));
            let headers = pairs(&e.headers, "--header")?;
            if !headers.is_empty() {
                m.insert("headers".into(), Value::Object(headers));
            }
        }
        (None, None) => {
            return Err("give the server's command after `--` (e.g. `-- npx -y @modelcontextprotocol/server-memory`) or --url".into());
        }
    }
    if let Some(t) = &e.transport {
        m.insert("type".into(), json!(t));
    }
    if let Some(p) = &e.prefix {
        m.insert("prefix".into(), json!(p));
    }
    if e.disabled {
        m.insert("disabled".into(), json!(true));
    }
    Ok(Value::Object(m))
}

/// `servers add|update`.
pub fn put(config: Option<PathBuf>, op: &'static str, e: EntryArgs) -> ExitCode {
    let entry = match entry_of(&e) {
        Ok(v) => v,
        Err(m) => return fail(m),
    };
    let name = e.name.clone();
    change(
        config,
        op,
        json!({"name": name, "config": entry}),
        e.json,
        move |doc| {
            if op == "add_server" {
                doc.add_server(&name, entry)
            } else {
                doc.update_server(&name, entry)
            }
        },
    )
}

pub fn remove(config: Option<PathBuf>, name: &str, as_json: bool) -> ExitCode {
    let n = name.to_owned();
    change(
        config,
        "remove_server",
        json!({"name": name}),
        as_json,
        move |doc| doc.remove_server(&n),
    )
}

/// Sends a change to a running relay, or edits the file when none runs.
fn change(
    config: Option<PathBuf>,
    op: &str,
    args: Value,
    as_json: bool,
    edit: impl FnOnce(&mut store::Document) -> Result<(), store::StoreError>,
) -> ExitCode {
    let path = match locate(config) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let sockets = control::find(&path);
    let Some((first, others)) = sockets.split_first() else {
        return match store::edit(&path, keep_backups(&path), edit, validate(&path)) {
            Ok(w) => {
                if as_json {
                    print_json(&json!({"written": path, "backup": w.backup}));
                } else {
                    println!(
                        "{} updated (no relay is running on it){}",
                        path.display(),
                        w.backup
                            .map(|b| format!("; backup {}", b.display()))
                            .unwrap_or_default()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    };
    let result = match control::request(first, op, &args, ANSWER_TIMEOUT) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if let Err(e) = reload_all(others) {
        eprintln!("mcp-relay: the file changed, but another relay did not reload: {e}");
    }
    if as_json {
        print_json(&result);
    } else {
        let server = &result["server"];
        let state = match server {
            Value::Null => String::new(),
            s => format!(
                " ({}, {} tools)",
                s["state"].as_str().unwrap_or("?"),
                s["tools"]
            ),
        };
        println!("{}{state}", summary(&result["applied"]));
    }
    ExitCode::SUCCESS
}

pub fn restart(config: Option<PathBuf>, name: &str, as_json: bool) -> ExitCode {
    let sockets = match running(config) {
        Ok(s) => s,
        Err(c) => return c,
    };
    for s in &sockets {
        match control::request(s, "restart_server", &json!({"name": name}), ANSWER_TIMEOUT) {
            Ok(v) if as_json => print_json(&v),
            Ok(v) => println!(
                "restarted `{name}` in relay pid {}: {}",
                control::pid_of(s).unwrap_or_default(),
                v["server"]["state"].as_str().unwrap_or("?")
            ),
            Err(e) => return fail(e),
        }
    }
    ExitCode::SUCCESS
}

/// `mcp-relay upgrade`: asks the relays of the config file (or the one with `pid`) to
/// upgrade in place, then waits (bounded) until each reports the new version.
pub fn upgrade(
    config: Option<PathBuf>,
    pid: Option<u32>,
    binary: Option<PathBuf>,
    as_json: bool,
) -> ExitCode {
    let sockets = match pid {
        Some(p) => control::find_pid(p),
        None => match running(config) {
            Ok(s) => s,
            Err(c) => return c,
        },
    };
    if sockets.is_empty() {
        // No control socket (a relay without a config file): the signal still works.
        let Some(p) = pid.and_then(|p| i32::try_from(p).ok()) else {
            return fail("no running relay found");
        };
        return match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGUSR2,
        ) {
            Ok(()) => {
                println!("sent SIGUSR2 to relay pid {p}; its log reports the outcome");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("cannot signal pid {p}: {e}")),
        };
    }
    let binary = binary.map(|b| std::fs::canonicalize(&b).unwrap_or(b));
    let args = json!({"binary": binary});
    let mut code = ExitCode::SUCCESS;
    for s in &sockets {
        let who = control::pid_of(s).unwrap_or_default();
        let generation = |v: &Value| v["upgrades"].as_u64();
        let first = control::request(s, "status", &json!({}), ANSWER_TIMEOUT).ok();
        // An HTTP relay that handed over already only finishes its connections.
        if first.as_ref().is_some_and(|v| v["retiring"] == true) {
            continue;
        }
        let before = first.as_ref().and_then(generation);
        // An HTTP relay hands over to a new process: look for it among the relays of its
        // config file.
        let successor_in = first
            .as_ref()
            .filter(|v| v["front"] == "http")
            .and_then(|v| v["configPath"].as_str())
            .map(PathBuf::from);
        let to = match control::request(s, "upgrade", &args, Duration::from_secs(60)) {
            Ok(v) => v["to"].as_str().unwrap_or_default().to_owned(),
            Err(e) => {
                eprintln!("relay pid {who}: upgrade refused: {e}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        // The exec follows once requests in flight have answered; the relay counts its
        // upgrades, so a rebuild with the same version is told apart too.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let (now, done) = loop {
            let candidates = match &successor_in {
                Some(cfg) => control::find(cfg),
                None => vec![s.clone()],
            };
            let mut seen = None;
            let mut done = false;
            for c in &candidates {
                let v = control::request(c, "status", &json!({}), ANSWER_TIMEOUT).ok();
                let version = v
                    .as_ref()
                    .and_then(|v| v["version"].as_str())
                    .map(str::to_owned);
                let upgraded = v
                    .as_ref()
                    .and_then(generation)
                    .is_some_and(|g| before.is_none_or(|b| g > b));
                if upgraded && version.as_deref() == Some(to.as_str()) {
                    done = true;
                    seen = version;
                    break;
                }
                seen = seen.or(version);
            }
            if done || std::time::Instant::now() > deadline {
                break (seen, done);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if as_json {
            print_json(&json!({"pid": who, "to": to, "version": now, "upgraded": done}));
        } else if done {
            println!("relay pid {who} upgraded: {to} serves now");
        } else {
            println!(
                "relay pid {who}: still {} after 120 s (requests still in flight, or the upgrade was rolled back; see its log)",
                now.unwrap_or_else(|| "unreachable".into())
            );
        }
        if !done {
            code = ExitCode::FAILURE;
        }
    }
    code
}

pub fn backups(config: Option<PathBuf>) -> ExitCode {
    let path = match locate(config) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let all = store::backups(&path);
    if all.is_empty() {
        println!("no backups of {}", path.display());
    }
    for b in all {
        let size = std::fs::metadata(&b).map(|m| m.len()).unwrap_or(0);
        println!("{}  {size} bytes", b.display());
    }
    ExitCode::SUCCESS
}

pub fn restore(config: Option<PathBuf>, backup: Option<PathBuf>) -> ExitCode {
    let path = match locate(config) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let chosen = match backup {
        // Backups live beside the file a symlinked config points to.
        Some(b) if b.components().count() == 1 => store::parent(&store::target(&path)).join(&b),
        Some(b) => b,
        None => match store::backups(&path).pop() {
            Some(b) => b,
            None => return fail(format!("no backups of {}", path.display())),
        },
    };
    match store::restore(&path, &chosen, keep_backups(&path), validate(&path)) {
        Ok(w) => {
            println!(
                "restored {} over {}{}",
                chosen.display(),
                path.display(),
                w.backup
                    .map(|b| format!(" (previous version kept as {})", b.display()))
                    .unwrap_or_default()
            );
            match reload_all(&control::find(&path)) {
                Ok(0) => {}
                Ok(n) => println!("{n} running relay(s) reloaded"),
                Err(e) => eprintln!("mcp-relay: a running relay did not reload: {e}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
