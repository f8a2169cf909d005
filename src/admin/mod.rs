//! Changing a running relay: the `relay__*` management tools, config reload and the file
//! watch, and the control socket the `mcp-relay servers|status|reload` commands talk to.
//!
//! Every change goes through [`Admin::run`]: it takes the relay's change lock, edits the
//! config file through [`crate::config::store`] (locked, atomic, backed up), then applies
//! the new config to the running relay ([`Relay::apply`]). The file watch applies what
//! others write the same way, so the running relay always converges on the file.

pub mod control;
pub mod watch;

use crate::backend::State;
use crate::config::{self, Config, redact, store};
use crate::router::{Applied, Relay};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

/// The management tools' names, without the `relay__` prefix.
pub const TOOLS: &[&str] = &[
    "status",
    "list_servers",
    "add_server",
    "remove_server",
    "update_server",
    "restart_server",
    "reload_config",
    "upgrade",
];

const PREFIX: &str = "relay__";

/// Why a management operation failed; the text goes to the caller as is.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadArguments(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("the new config is invalid; the running config stays:\n{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

/// The management tool an exposed name calls, if it is one.
pub fn tool(name: &str) -> Option<&'static str> {
    let op = name.strip_prefix(PREFIX)?;
    TOOLS.iter().copied().find(|t| *t == op)
}

static DEFINITIONS: LazyLock<Vec<Arc<RawValue>>> = LazyLock::new(|| {
    let server_config = json!({
        "type": "object",
        "description": "The server's entry as in relay.json `mcpServers`: {\"command\", \"args\", \"env\", \"cwd\"} for a stdio server, {\"url\", \"headers\", \"type\"} for a remote one; optional \"prefix\", \"disabled\". `${VAR}` references are kept in the file and expanded when the server starts.",
    });
    let name = json!({"type": "string", "description": "Server name (letters, digits, `_`, `-`)."});
    let defs = [
        (
            "status",
            "Show the relay's version, uptime, config file, session count, the last rejected config change, and per server: transport, state, tool count, last error, restarts. Secret values never appear.",
            json!({"type": "object", "properties": {}}),
            true,
        ),
        (
            "list_servers",
            "List the configured servers with their transport, command or URL, state and tool count (environment and header values are never shown: keys only).",
            json!({"type": "object", "properties": {}}),
            true,
        ),
        (
            "add_server",
            "Add a server: it is started at once, its tools appear in every session, and the config file is updated (with a backup).",
            json!({"type": "object", "properties": {"name": name, "config": server_config}, "required": ["name", "config"]}),
            false,
        ),
        (
            "remove_server",
            "Remove a server: it is stopped, its tools disappear from every session, and the config file is updated (with a backup).",
            json!({"type": "object", "properties": {"name": name}, "required": ["name"]}),
            false,
        ),
        (
            "update_server",
            "Replace a server's config entry: the server restarts with the new config, and the config file is updated (with a backup).",
            json!({"type": "object", "properties": {"name": name, "config": server_config}, "required": ["name", "config"]}),
            false,
        ),
        (
            "restart_server",
            "Restart a running server (also clears a `failed` state). The config file is not changed.",
            json!({"type": "object", "properties": {"name": name}, "required": ["name"]}),
            false,
        ),
        (
            "reload_config",
            "Re-read the config file and apply what changed; unchanged servers keep running. An invalid file is rejected as a whole.",
            json!({"type": "object", "properties": {}}),
            false,
        ),
        (
            "upgrade",
            "Upgrade this relay in place to a new binary (default: the path it was started from), stdio relays only: the new binary is checked first (a failing one is refused and reported here); then, once requests in flight have answered, it replaces the running one with the same PID, pipes, session and servers. Clients notice nothing; relay__status shows the new version.",
            json!({"type": "object", "properties": {"binary": {"type": "string", "description": "Path of the new mcp-relay binary."}}}),
            false,
        ),
    ];
    defs.into_iter()
        .map(|(op, description, schema, read_only)| {
            Arc::from(crate::protocol::to_raw(&json!({
                "name": format!("{PREFIX}{op}"),
                "description": description,
                "inputSchema": schema,
                "annotations": {"readOnlyHint": read_only, "destructiveHint": !read_only, "openWorldHint": false},
            })))
        })
        .collect()
});

/// The management tools' definitions.
pub fn definitions() -> &'static [Arc<RawValue>] {
    &DEFINITIONS
}

/// Runs a management tool for an MCP client: the answer is a `CallToolResult`, with
/// `isError` when the operation failed.
pub async fn call(relay: &Arc<Relay>, op: &str, arguments: Option<&RawValue>) -> Box<RawValue> {
    let args: Value = arguments
        .and_then(|a| serde_json::from_str(a.get()).ok())
        .unwrap_or(Value::Object(Map::new()));
    let out = match run(relay, op, &args).await {
        Ok(v) => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            json!({"content": [{"type": "text", "text": text}], "structuredContent": v})
        }
        Err(e) => json!({"content": [{"type": "text", "text": e.to_string()}], "isError": true}),
    };
    crate::protocol::to_raw(&out)
}

/// Runs one management operation (`op` without the `relay__` prefix).
pub async fn run(relay: &Arc<Relay>, op: &str, args: &Value) -> Result<Value, AdminError> {
    let name = || -> Result<String, AdminError> {
        args.get("name")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                AdminError::BadArguments(format!("`{PREFIX}{op}` needs a string `name`"))
            })
    };
    let entry = || -> Result<Value, AdminError> {
        match args.get("config") {
            Some(v @ Value::Object(_)) => Ok(v.clone()),
            _ => Err(AdminError::BadArguments(format!(
                "`{PREFIX}{op}` needs `config`, the server's entry as an object, e.g. {{\"command\": \"npx\", \"args\": [\"-y\", \"@modelcontextprotocol/server-memory\"]}}"
            ))),
        }
    };
    match op {
        "status" => Ok(status(relay)),
        "list_servers" => Ok(json!({"servers": servers(relay)})),
        "add_server" | "update_server" | "remove_server" => {
            let name = name()?;
            let n = name.clone();
            let applied = match op {
                "add_server" => {
                    let e = entry()?;
                    change(relay, move |doc| doc.add_server(&n, e)).await?
                }
                "update_server" => {
                    let e = entry()?;
                    change(relay, move |doc| doc.update_server(&n, e)).await?
                }
                _ => change(relay, move |doc| doc.remove_server(&n)).await?,
            };
            Ok(report(relay, applied, &name).await)
        }
        "restart_server" => {
            let name = name()?;
            let restarted = {
                let _g = relay.changing().await;
                relay.restart_backend(&name)
            };
            if !restarted {
                return Err(AdminError::Refused(format!(
                    "server `{name}` is not running (unknown or disabled); relay__list_servers shows them"
                )));
            }
            settle(relay, std::iter::once(&name)).await;
            Ok(json!({"restarted": name, "server": server_status(relay, &name)}))
        }
        "upgrade" => {
            let binary = args
                .get("binary")
                .and_then(Value::as_str)
                .map(std::path::PathBuf::from);
            let to = relay
                .request_upgrade(binary)
                .await
                .map_err(AdminError::Refused)?;
            Ok(json!({
                "upgrading": true,
                "from": crate::version(),
                "to": to,
                "pid": std::process::id(),
                "note": "the new binary takes over once the requests in flight have answered; sessions and servers carry on",
            }))
        }
        "reload_config" => {
            let applied = reload(relay, true).await?;
            settle(relay, applied.started()).await;
            Ok(json!({"applied": applied}))
        }
        _ => Err(AdminError::BadArguments(format!(
            "unknown management tool `{PREFIX}{op}`"
        ))),
    }
}

/// The config file the relay runs from.
fn config_path(relay: &Relay) -> Result<PathBuf, AdminError> {
    relay.config().path.clone().ok_or_else(|| {
        AdminError::Refused("the relay was started without a config file; nothing to change".into())
    })
}

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// Edits the config file and applies the result, under the relay's change lock. Runs in a
/// task of its own: a caller that goes away cannot leave the file written but not applied.
async fn change(
    relay: &Arc<Relay>,
    edit: impl FnOnce(&mut store::Document) -> Result<(), store::StoreError> + Send + 'static,
) -> Result<Applied, AdminError> {
    let r = relay.clone();
    tokio::spawn(async move { change_now(&r, edit).await })
        .await
        .map_err(|e| AdminError::Refused(format!("the config change did not finish: {e}")))?
}

async fn change_now(
    relay: &Arc<Relay>,
    edit: impl FnOnce(&mut store::Document) -> Result<(), store::StoreError> + Send + 'static,
) -> Result<Applied, AdminError> {
    let _g = relay.changing().await;
    let path = config_path(relay)?;
    let keep = relay.config().relay.config_backups;
    let file = path.display().to_string();
    let written = tokio::task::spawn_blocking(move || {
        let mut parsed: Option<Config> = None;
        let w = store::edit(&path, keep, edit, |text| {
            match config::parse(text, &file, &env_var) {
                Ok(mut c) => {
                    c.path = Some(path.clone());
                    parsed = Some(c);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        })?;
        Ok::<_, store::StoreError>((w, parsed))
    })
    .await
    .map_err(|e| AdminError::Refused(format!("the config write did not finish: {e}")))??;
    let (written, parsed) = written;
    if let Some(b) = &written.backup {
        tracing::info!(backup = %b.display(), "Config file written; previous version backed up.");
    }
    let cfg = parsed.ok_or_else(|| AdminError::Refused("the config was not validated".into()))?;
    Ok(relay.apply(cfg, false))
}

/// Re-reads the config file and applies it; an invalid file is rejected as a whole (the
/// running config stays and the reason shows in `relay__status`). `explicit` (SIGHUP,
/// `reload_config`, `mcp-relay reload`) also gives servers left `failed` a fresh start.
pub async fn reload(relay: &Arc<Relay>, explicit: bool) -> Result<Applied, AdminError> {
    let _g = relay.changing().await;
    let path = config_path(relay)?;
    let loaded = tokio::task::spawn_blocking(move || config::load(&path))
        .await
        .map_err(|e| AdminError::Refused(format!("the config read did not finish: {e}")))?;
    match loaded {
        Ok(cfg) => {
            if let Some(reason) = relay.refuse(&cfg) {
                relay.reject_config(reason.clone());
                return Err(AdminError::Invalid(reason));
            }
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            Ok(relay.apply(cfg, explicit))
        }
        Err(e) => {
            let reason = e.to_string();
            relay.reject_config(reason.clone());
            Err(AdminError::Invalid(reason))
        }
    }
}

/// Waits (bounded by `startupWaitMs`) for the named servers to finish starting, so that an
/// answer can say how they came up.
async fn settle<'a>(relay: &Relay, names: impl Iterator<Item = &'a String>) {
    let deadline = tokio::time::Instant::now() + relay.config().relay.startup_wait;
    let started: Vec<_> = names.filter_map(|n| relay.backend(n)).collect();
    futures::future::join_all(started.iter().map(|b| b.settled(deadline))).await;
}

async fn report(relay: &Relay, applied: Applied, name: &str) -> Value {
    settle(relay, applied.started()).await;
    json!({"applied": applied, "server": server_status(relay, name)})
}

/// The live state of one server, or null when it is not running.
fn server_status(relay: &Relay, name: &str) -> Value {
    let Some(b) = relay.backend(name) else {
        return Value::Null;
    };
    let state = b.state();
    let (attempt, last_error) = match &state {
        State::Restarting {
            attempt,
            last_error,
        } => (Some(*attempt), Some(last_error.clone())),
        State::Failed(e) | State::NeedsAuth(e) => (None, Some(e.clone())),
        _ => (None, None),
    };
    let lists = b.lists();
    let mut v = json!({
        "name": b.name,
        "transport": b.transport_in_use().unwrap_or(b.config.transport.kind()),
        "state": state.label(),
        "tools": lists.tools.len(),
        "prompts": lists.prompts.len(),
        "resources": lists.resources.len(),
        "restarts": b.restarts(),
        "lastError": last_error,
    });
    if let (Some(a), Some(o)) = (attempt, v.as_object_mut()) {
        o.insert("attempt".into(), json!(a));
    }
    if let (Some(pid), Some(o)) = (b.pid(), v.as_object_mut()) {
        o.insert("pid".into(), json!(pid));
    }
    let info = b.info();
    if let (false, Some(o)) = (info.protocol_version.is_empty(), v.as_object_mut()) {
        // The eras the relay speaks to it: a dual-era server serves each client in its own.
        let eras = match (b.is_modern(), info.dual) {
            (true, _) => json!(["stateless"]),
            (false, true) => json!(["handshake", "stateless"]),
            (false, false) => json!(["handshake"]),
        };
        o.insert("protocolVersion".into(), json!(info.protocol_version));
        o.insert("eras".into(), eras);
    }
    v
}

/// `relay__status`.
pub fn status(relay: &Relay) -> Value {
    let cfg = relay.config();
    let backends: Vec<Value> = relay
        .backends()
        .iter()
        .map(|b| server_status(relay, &b.name))
        .collect();
    json!({
        "version": crate::version(),
        "pid": std::process::id(),
        "upgrades": crate::upgrade::generation(),
        "retiring": relay.is_retiring(),
        "uptimeSeconds": relay.uptime().as_secs(),
        "front": match relay.front() { crate::router::Front::Stdio => "stdio", crate::router::Front::Http => "http" },
        "configPath": cfg.path.as_ref().map(|p| p.display().to_string()),
        "configError": relay.config_error(),
        "sessions": relay.session_count(),
        "ready": relay.unready().is_empty(),
        "servers": backends,
        "toolSelection": tool_selection(relay, &cfg),
    })
}

/// The filtering mode, how many tools sessions may see, and the LLM step's counters.
fn tool_selection(relay: &Relay, cfg: &Config) -> Value {
    use crate::config::filtering::Mode;
    let f = &cfg.tool_filtering;
    let view = relay.view();
    let mut v = json!({
        "mode": f.mode.label(),
        "visibleTools": view.tools.len(),
    });
    if f.mode == Mode::Prompt {
        v["defaultExposure"] = json!(f.default_exposure.label());
        if let Some(llm) = &f.llm {
            let mut stats = relay.llm_stats.snapshot();
            stats["model"] = json!(llm.model);
            stats["baseUrl"] = json!(redact::url(&llm.base_url));
            v["llm"] = stats;
        }
        if let (Some(e), Some(state)) = (&f.embeddings, view.semantic_state()) {
            use crate::selection::SemanticState;
            let mut s = json!({"model": e.model, "weight": e.weight});
            match state {
                SemanticState::Embedding => s["state"] = json!("embedding"),
                SemanticState::Ready { tools } => {
                    s["state"] = json!("ready");
                    s["embeddedTools"] = json!(tools);
                }
                SemanticState::Unusable(why) => {
                    s["state"] = json!("unusable");
                    s["error"] = json!(why);
                }
            }
            v["embeddings"] = s;
        }
    }
    v
}

/// `relay__list_servers`: every configured server (running or not), as written in the file
/// (`${VAR}` references unexpanded), secrets reduced to their keys.
pub fn servers(relay: &Relay) -> Vec<Value> {
    let cfg = relay.config();
    let doc = cfg.path.as_deref().and_then(|p| store::read(p).ok());
    cfg.servers
        .iter()
        .map(|s| {
            let raw = doc.as_ref().and_then(|d| d.server(&s.name));
            let mut v = describe_entry(&s.name, raw, s);
            if let Some(o) = v.as_object_mut() {
                let live = server_status(relay, &s.name);
                o.insert(
                    "state".into(),
                    live.get("state").cloned().unwrap_or(json!(if s.disabled {
                        "disabled"
                    } else {
                        "stopped"
                    })),
                );
                for k in ["tools", "restarts", "lastError"] {
                    if let Some(x) = live.get(k) {
                        o.insert(k.into(), x.clone());
                    }
                }
            }
            v
        })
        .collect()
}

/// A server entry for display: command, args and URL as written in the file (`${VAR}`
/// references stay references), values of secret-looking flags and URL query parameters
/// redacted, env and header values replaced by their keys.
pub fn describe_entry(name: &str, raw: Option<&Value>, typed: &config::ServerConfig) -> Value {
    let mut v = json!({
        "name": name,
        "transport": typed.transport.kind(),
        "prefix": typed.prefix,
        "disabled": typed.disabled,
    });
    let Some(o) = v.as_object_mut() else { return v };
    let raw = raw.and_then(Value::as_object);
    let text = |k: &str| {
        raw.and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let keys = |k: &str| -> Vec<String> {
        raw.and_then(|r| r.get(k))
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    match &typed.transport {
        config::TransportConfig::Stdio { .. } => {
            if let Some(c) = text("command") {
                o.insert("command".into(), json!(c));
            }
            let args: Vec<String> = raw
                .and_then(|r| r.get("args"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            o.insert("args".into(), json!(redact::args(&args)));
            o.insert("envKeys".into(), json!(keys("env")));
        }
        config::TransportConfig::Http { .. }
        | config::TransportConfig::Sse { .. }
        | config::TransportConfig::Ws { .. } => {
            if let Some(u) = text("url") {
                o.insert("url".into(), json!(redact::url(&u)));
            }
            o.insert("headerKeys".into(), json!(keys("headers")));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert_eq!(tool("relay__status"), Some("status"));
        assert_eq!(tool("relay__nope"), None);
        assert_eq!(tool("srv__status"), None);
        let defs = definitions();
        assert_eq!(defs.len(), TOOLS.len());
        assert!(defs[0].get().contains("\"relay__status\""));
    }
}
