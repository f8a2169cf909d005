//! `relay.json`: loading, `${VAR}` expansion and validation into a typed [`Config`].
//!
//! Validation collects every problem with its file and JSON path instead of stopping at the
//! first, so `mcp-relay config check` can print them all. This module does not start anything.

pub mod auth;
pub mod filtering;
pub mod redact;
pub mod store;

pub use auth::Auth;
pub use filtering::ToolFiltering;

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any.
    pub path: Option<PathBuf>,
    pub servers: Vec<ServerConfig>,
    pub relay: RelaySettings,
    /// Which tools sessions see (`toolFiltering`).
    pub tool_filtering: ToolFiltering,
    /// Who may use the HTTP front (`auth`); no clients means no authentication.
    pub auth: Auth,
    /// Non-fatal findings (unknown keys in server entries and the like).
    pub warnings: Vec<String>,
}

/// Settings of the relay itself (`"relay": {...}`); every field has a default.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// HTTP listen address. Default `127.0.0.1:7800`.
    pub listen: SocketAddr,
    /// How long a forwarded request may take before it fails and is cancelled. Default 60 s.
    pub request_timeout: Duration,
    /// Largest accepted message, in bytes, in either direction. Default 4 MiB.
    pub max_message_bytes: usize,
    /// How long requests that need the catalog wait for backends still starting, counted
    /// from their release (relay start; over stdio the client's `initialize`). Default 5 s.
    pub startup_wait: Duration,
    /// Items per page of merged lists sent to clients. Default 1000.
    pub page_size: usize,
    /// Extra `Host` header values accepted by the HTTP front (loopback names always are).
    pub allowed_hosts: Vec<String>,
    /// Extra `Origin` values accepted by the HTTP front (loopback origins always are).
    pub allowed_origins: Vec<String>,
    /// Events kept per HTTP session for `Last-Event-ID` replay. Default 1024.
    pub replay_events: usize,
    /// SSE `retry` hint sent to HTTP clients, in milliseconds. Default 1000.
    pub sse_retry_ms: u64,
    /// Whether the `relay__*` management tools are offered (stdio front and loopback HTTP
    /// only). Default true.
    pub management: bool,
    /// Timestamped backups of the config file kept when the relay writes it. Default 3.
    pub config_backups: usize,
    /// Whether the relay watches its config file and applies changes. Default true.
    pub watch_config: bool,
    /// How backends are supervised (restarts, health checks, waiting for a restart).
    pub supervision: Supervision,
    /// HTTPS on the front (`tls: {cert, key}`); the files are re-read when they change.
    pub tls: Option<auth::Tls>,
    /// Requests per client (per peer address without auth) over HTTP (`rateLimit`); none
    /// by default. `auth.clients[].rateLimit` overrides it.
    pub rate_limit: Option<auth::RateLimit>,
    /// Open HTTP sessions at most (`maxSessions`, default 10000).
    pub max_sessions: usize,
    /// Largest request head (request line and headers) in bytes (`maxHeaderBytes`, default
    /// 16 KiB, at least 8192).
    pub max_header_bytes: usize,
    /// Time a connection has to send its TLS handshake and request headers
    /// (`headerTimeoutMs`, default 30 s): slow-header clients are cut off. hyper counts it
    /// from when a keep-alive connection goes idle, so it is also the idle-connection
    /// timeout.
    pub header_timeout: Duration,
    /// An HTTP session with no request and no open stream for this long is closed
    /// (`sessionIdleTimeoutMs`, default 30 min; 0: never).
    pub session_idle_timeout: Option<Duration>,
    /// Serve HTTP on a non-loopback address without `auth` (`allowUnauthenticated`,
    /// default false; also `--allow-unauthenticated`).
    pub allow_unauthenticated: bool,
    /// Log format, level and file (`log`).
    pub log: LogSettings,
    /// Extra server processes started for `isolation` (per-session, pooled, per-call) at
    /// most, over all servers (`maxInstances`, default 256).
    pub max_instances: usize,
}

/// `relay.log`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogSettings {
    /// `auto` (default: human on a terminal, JSON lines otherwise), `json` or `text`.
    pub format: LogFormat,
    /// Level filter such as `info` or `mcp_relay=debug` (default `info`; `RUST_LOG` wins).
    pub level: Option<String>,
    /// Directory of daily-rotated JSON log files (`file: true` is
    /// `$XDG_STATE_HOME/mcp-relay/logs`, else `~/.local/state/mcp-relay/logs`).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Auto,
    Json,
    Text,
}

/// The log directory of `log.file: true`.
pub fn default_log_dir() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("mcp-relay").join("logs"))
}

/// Backend supervision settings (`relay.*`, all optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supervision {
    /// First restart delay (`restartBackoffMs`, default 250 ms); doubles per attempt, plus
    /// up to 100 ms of jitter.
    pub backoff: Duration,
    /// Longest restart delay (`restartBackoffMaxMs`, default 30 s).
    pub backoff_max: Duration,
    /// Starts allowed within `start_limit_interval` before the server is left `failed`
    /// (`startLimitBurst`, default 5; like systemd's `StartLimitBurst`).
    pub start_limit_burst: usize,
    /// `startLimitIntervalMs`, default 60 s.
    pub start_limit_interval: Duration,
    /// How long a request to a restarting server waits for it (`restartWaitMs`, default
    /// 3 s) before failing.
    pub restart_wait: Duration,
    /// Interval of health pings (`healthIntervalMs`, default 30 s; 0 turns them off).
    pub health_interval: Duration,
    /// A ping not answered within this is a miss (`healthTimeoutMs`, default 5 s).
    pub health_timeout: Duration,
    /// Consecutive misses after which a `degraded` server is treated as hung and restarted
    /// (`healthMisses`, default 3).
    pub health_misses: u32,
}

/// Supervision settings one server sets for itself; `None` follows the relay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SupervisionOverrides {
    pub backoff: Option<Duration>,
    pub backoff_max: Option<Duration>,
    pub start_limit_burst: Option<usize>,
    pub start_limit_interval: Option<Duration>,
    pub restart_wait: Option<Duration>,
    pub health_interval: Option<Duration>,
    pub health_timeout: Option<Duration>,
    pub health_misses: Option<u32>,
}

impl SupervisionOverrides {
    /// `base` with these settings put over it.
    pub fn over(&self, base: Supervision) -> Supervision {
        Supervision {
            backoff: self.backoff.unwrap_or(base.backoff),
            backoff_max: self.backoff_max.unwrap_or(base.backoff_max),
            start_limit_burst: self.start_limit_burst.unwrap_or(base.start_limit_burst),
            start_limit_interval: self
                .start_limit_interval
                .unwrap_or(base.start_limit_interval),
            restart_wait: self.restart_wait.unwrap_or(base.restart_wait),
            health_interval: self.health_interval.unwrap_or(base.health_interval),
            health_timeout: self.health_timeout.unwrap_or(base.health_timeout),
            health_misses: self.health_misses.unwrap_or(base.health_misses),
        }
    }
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            backoff: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            start_limit_burst: 5,
            start_limit_interval: Duration::from_secs(60),
            restart_wait: Duration::from_secs(3),
            health_interval: Duration::from_secs(30),
            health_timeout: Duration::from_secs(5),
            health_misses: 3,
        }
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7800)),
            request_timeout: Duration::from_secs(60),
            max_message_bytes: 4 * 1024 * 1024,
            startup_wait: Duration::from_secs(5),
            page_size: 1000,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            replay_events: 1024,
            sse_retry_ms: 1000,
            management: true,
            config_backups: store::DEFAULT_BACKUPS,
            watch_config: true,
            supervision: Supervision::default(),
            tls: None,
            rate_limit: None,
            max_sessions: 10_000,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(30),
            session_idle_timeout: Some(Duration::from_secs(30 * 60)),
            allow_unauthenticated: false,
            log: LogSettings::default(),
            max_instances: 256,
        }
    }
}

/// One configured backend server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub name: String,
    /// Prefix of exposed tool and prompt names; `""` passes names through.
    pub prefix: String,
    pub transport: TransportConfig,
    pub disabled: bool,
    /// Requests in flight on this server at most (`maxInFlight`, default 256); beyond it
    /// requests queue.
    pub max_in_flight: usize,
    /// Requests waiting for a slot at most (`maxQueued`, default 1024); beyond it a request
    /// fails at once with "server busy".
    pub max_queued: usize,
    /// Which `tools/call`s interrupted by a restart are sent once more to the restarted
    /// server (`retryOnReconnect`).
    pub retry_on_reconnect: Retry,
    /// The relay is ready (`/ready`) only while this server is up (`required`).
    pub required: bool,
    /// PEM file of extra CA certificates trusted for this remote server (`caFile`), besides
    /// the system and bundled roots.
    pub ca_file: Option<PathBuf>,
    /// How the processes of a stdio server are shared (`isolation`, default `shared`).
    pub isolation: Isolation,
    /// This server's own supervision settings (the `relay` keys of the same names, e.g.
    /// `healthIntervalMs`, in its entry); what it leaves out follows `relay`.
    pub supervision: SupervisionOverrides,
    /// The protocol era the relay speaks to a stdio or Streamable HTTP server (`era`).
    pub era: Era,
}

/// `era` of a stdio or Streamable HTTP server: the protocol era the relay speaks to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Era {
    /// The `initialize` handshake and a session (every server speaks it today; the
    /// default of SSE and WebSocket servers).
    #[default]
    Legacy,
    /// Stateless 2026-07-28: `server/discover`, `_meta` and headers on every request.
    Modern,
    /// `server/discover` first; the handshake if the server does not speak 2026-07-28
    /// (and, over HTTP, beside it if the server accepts both: clients keep their era).
    /// The default of stdio and Streamable HTTP servers.
    Auto,
}

/// `isolation` of a stdio server: which clients share one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One process for every session (ids remapped).
    #[default]
    Shared,
    /// A process per client session, started on its first request, stopped when the
    /// session ends or after `idleTimeoutMs` unused; at most `maxInstances` per server.
    PerSession {
        max_instances: usize,
        idle_timeout: Duration,
    },
    /// `poolSize` processes, requests spread over them in turn.
    Pooled { size: usize },
    /// A fresh process for each `tools/call`, at most `maxInstances` at once (others wait).
    PerCall { max_instances: usize },
}

/// `retryOnReconnect`: `false` (default; tools are not known to be idempotent), `true`, or
/// `"idempotent"` (only tools annotated `idempotentHint: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retry {
    #[default]
    Never,
    Always,
    Idempotent,
}

/// How to reach a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum TransportConfig {
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// Streamable HTTP.
    Http {
        url: String,
        headers: BTreeMap<String, String>,
    },
    /// The 2024-11-05 HTTP+SSE transport.
    Sse {
        url: String,
        headers: BTreeMap<String, String>,
    },
    /// WebSocket: one JSON-RPC message per text frame (subprotocol `mcp`).
    Ws {
        url: String,
        headers: BTreeMap<String, String>,
    },
}

impl TransportConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TransportConfig::Stdio { .. } => "stdio",
            TransportConfig::Http { .. } => "http",
            TransportConfig::Sse { .. } => "sse",
            TransportConfig::Ws { .. } => "ws",
        }
    }
}

/// One config problem: where and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.path, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no config file given and none found (looked in {looked})")]
    NotFound { looked: String },
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

const RELAY_KEYS: &[&str] = &[
    "listen",
    "requestTimeoutMs",
    "maxMessageBytes",
    "startupWaitMs",
    "pageSize",
    "allowedHosts",
    "allowedOrigins",
    "replayEvents",
    "sseRetryMs",
    "management",
    "configBackups",
    "watchConfig",
    "restartBackoffMs",
    "restartBackoffMaxMs",
    "startLimitBurst",
    "startLimitIntervalMs",
    "restartWaitMs",
    "healthIntervalMs",
    "healthTimeoutMs",
    "healthMisses",
    "tls",
    "rateLimit",
    "maxSessions",
    "maxHeaderBytes",
    "headerTimeoutMs",
    "sessionIdleTimeoutMs",
    "allowUnauthenticated",
    "log",
    "maxInstances",
];
const SERVER_KEYS: &[&str] = &[
    "command",
    "args",
    "env",
    "cwd",
    "type",
    "url",
    "headers",
    "disabled",
    "prefix",
    "maxInFlight",
    "maxQueued",
    "retryOnReconnect",
    "required",
    "caFile",
    "isolation",
    "era",
    "maxInstances",
    "poolSize",
    "idleTimeoutMs",
    "restartBackoffMs",
    "restartBackoffMaxMs",
    "startLimitBurst",
    "startLimitIntervalMs",
    "restartWaitMs",
    "healthIntervalMs",
    "healthTimeoutMs",
    "healthMisses",
    // Keys other tools write into the same entries, accepted without a warning.
    "transport",
    "timeout",
    "description",
    "alwaysAllow",
    "autoApprove",
];

/// The places searched when no `--config` is given, in order.
pub fn default_locations() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("relay.json")];
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = xdg {
        v.push(dir.join("mcp-relay").join("relay.json"));
    }
    v
}

/// Finds the config file: the given path, else the first default location that exists.
pub fn locate(given: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let places = default_locations();
    places
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::NotFound {
            looked: places
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        file: path.display().to_string(),
        source,
    })?;
    let mut cfg = parse(&text, &path.display().to_string(), &|k| {
        std::env::var(k).ok()
    })?;
    cfg.path = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
    Ok(cfg)
}

/// Parses and validates config text; `env` resolves `${VAR}` references.
pub fn parse(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Error> {
    let mut v = Validator {
        file,
        env,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let root: Value = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            v.problem(
                &format!("line {} column {}", e.line(), e.column()),
                format!("not valid JSON ({e}); fix the syntax"),
            );
            return Err(Error::Invalid(v.problems));
        }
    };
    let Some(root) = root.as_object() else {
        v.problem(
            "$",
            "the file must hold a JSON object with an `mcpServers` object".into(),
        );
        return Err(Error::Invalid(v.problems));
    };
    let relay = match root.get("relay") {
        None => RelaySettings::default(),
        Some(r) => v.relay(r),
    };
    let tool_filtering = match root.get("toolFiltering") {
        None => ToolFiltering::default(),
        Some(f) => v.tool_filtering(f),
    };
    let auth = match root.get("auth") {
        None => Auth::default(),
        Some(a) => v.auth(a),
    };
    let mut servers = Vec::new();
    match root.get("mcpServers") {
        None => v.warnings.push(format!(
            "{file}: mcpServers: missing; the relay starts with no backends"
        )),
        Some(Value::Object(map)) => {
            for (name, entry) in map {
                if let Some(s) = v.server(name, entry) {
                    servers.push(s);
                }
            }
        }
        Some(_) => v.problem(
            "mcpServers",
            "must be an object mapping server names to server entries".into(),
        ),
    }
    // Two servers with one prefix would make every exposed name ambiguous.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for s in servers
        .iter()
        .filter(|s| !s.disabled && !s.prefix.is_empty())
    {
        if let Some(other) = seen.insert(&s.prefix, &s.name) {
            v.warnings.push(format!(
                "{file}: mcpServers.{}.prefix: `{}` is also the prefix of `{other}`; colliding names get a hashed suffix",
                s.name, s.prefix
            ));
        }
    }
    if v.problems.is_empty() {
        Ok(Config {
            path: None,
            servers,
            relay,
            tool_filtering,
            auth,
            warnings: v.warnings,
        })
    } else {
        Err(Error::Invalid(v.problems))
    }
}

struct Validator<'a> {
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Validator<'_> {
    fn problem(&mut self, path: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            path: path.to_owned(),
            message,
        });
    }

    fn relay(&mut self, r: &Value) -> RelaySettings {
        let mut s = RelaySettings::default();
        let Some(map) = r.as_object() else {
            self.problem("relay", "must be an object".into());
            return s;
        };
        self.unknown_keys(map, "relay", RELAY_KEYS, "relay setting");
        if let Some(l) = self.opt_string(map, "relay", "listen") {
            match l.parse::<SocketAddr>() {
                Ok(a) => s.listen = a,
                Err(_) => self.problem(
                    "relay.listen",
                    format!("`{l}` is not HOST:PORT with a numeric IP, e.g. 127.0.0.1:7800"),
                ),
            }
        }
        if let Some(ms) = self.opt_uint(map, "relay", "requestTimeoutMs", 1) {
            s.request_timeout = Duration::from_millis(ms);
        }
        if let Some(b) = self.opt_usize(map, "relay", "maxMessageBytes", 1024) {
            s.max_message_bytes = b;
        }
        if let Some(ms) = self.opt_uint(map, "relay", "startupWaitMs", 0) {
            s.startup_wait = Duration::from_millis(ms);
        }
        if let Some(n) = self.opt_usize(map, "relay", "pageSize", 1) {
            s.page_size = n;
        }
        if let Some(n) = self.opt_usize(map, "relay", "replayEvents", 0) {
            s.replay_events = n;
        }
        if let Some(n) = self.opt_uint(map, "relay", "sseRetryMs", 0) {
            s.sse_retry_ms = n;
        }
        if let Some(n) = self.opt_usize(map, "relay", "configBackups", 0) {
            s.config_backups = n;
        }
        if let Some(b) = self.opt_bool(map, "relay", "management") {
            s.management = b;
        }
        if let Some(b) = self.opt_bool(map, "relay", "watchConfig") {
            s.watch_config = b;
        }
        s.supervision = self.supervision(map, "relay").over(s.supervision);
        let ms = Duration::from_millis;
        if let Some(t) = map.get("tls") {
            s.tls = self.tls(t);
        }
        if let Some(r) = map.get("rateLimit") {
            s.rate_limit = self.rate_limit("relay.rateLimit", r);
        }
        if let Some(n) = self.opt_usize(map, "relay", "maxSessions", 1) {
            s.max_sessions = n;
        }
        if let Some(n) = self.opt_usize(map, "relay", "maxHeaderBytes", 8192) {
            s.max_header_bytes = n;
        }
        if let Some(v) = self.opt_uint(map, "relay", "headerTimeoutMs", 1) {
            s.header_timeout = ms(v);
        }
        if let Some(v) = self.opt_uint(map, "relay", "sessionIdleTimeoutMs", 0) {
            s.session_idle_timeout = (v > 0).then(|| ms(v));
        }
        if let Some(n) = self.opt_usize(map, "relay", "maxInstances", 0) {
            s.max_instances = n;
        }
        if let Some(b) = self.opt_bool(map, "relay", "allowUnauthenticated") {
            s.allow_unauthenticated = b;
        }
        if let Some(l) = map.get("log") {
            s.log = self.log(l);
        }
        s.allowed_hosts = self
            .opt_strings(map, "relay", "allowedHosts")
            .unwrap_or_default();
        s.allowed_origins = self
            .opt_strings(map, "relay", "allowedOrigins")
            .unwrap_or_default();
        s
    }

    fn server(&mut self, name: &str, entry: &Value) -> Option<ServerConfig> {
        let at = format!("mcpServers.{name}");
        if !valid_server_name(name) {
            self.problem(
                &at,
                "server names may use only letters, digits, `_` and `-` (1 to 64 characters); rename the entry".into(),
            );
        }
        if name == "relay" {
            self.problem(
                &at,
                "`relay` is reserved for the relay's own tools; rename the entry".into(),
            );
        }
        let Some(map) = entry.as_object() else {
            self.problem(&at, "must be an object with `command` or `url`".into());
            return None;
        };
        for key in map.keys() {
            if !SERVER_KEYS.contains(&key.as_str()) {
                self.warnings
                    .push(format!("{}: {at}.{key}: unknown key, ignored", self.file));
            }
        }
        let disabled = self.opt_bool(map, &at, "disabled").unwrap_or(false);
        let prefix = match map.get("prefix") {
            None => name.to_owned(),
            Some(_) => self.opt_string(map, &at, "prefix").unwrap_or_default(),
        };
        if !prefix.is_empty() && !valid_server_name(&prefix) {
            self.problem(
                &format!("{at}.prefix"),
                "a prefix may use only letters, digits, `_` and `-`; use \"\" for no prefix".into(),
            );
        }
        if prefix == "relay" && name != "relay" {
            self.problem(
                &format!("{at}.prefix"),
                "`relay` is reserved for the relay's own tools; choose another prefix".into(),
            );
        }
        let ty = self.opt_string(map, &at, "type");
        let url = self.opt_string(map, &at, "url");
        let command = self.opt_string(map, &at, "command");
        let headers = self.opt_string_map(map, &at, "headers");
        let kind = match ty.as_deref() {
            Some("stdio") => "stdio",
            Some("http" | "streamable-http" | "streamableHttp" | "streamable_http") => "http",
            Some("sse") => "sse",
            Some("ws" | "websocket") => "ws",
            Some(other) => {
                self.problem(
                    &format!("{at}.type"),
                    format!("unknown type `{other}`; use \"stdio\", \"http\", \"sse\" or \"ws\""),
                );
                return None;
            }
            None if command.is_some() => "stdio",
            None => match url.as_deref() {
                Some(u) if u.starts_with("ws://") || u.starts_with("wss://") => "ws",
                // Legacy HTTP+SSE endpoints conventionally end in /sse.
                Some(u) if u.trim_end_matches('/').ends_with("/sse") => "sse",
                Some(_) => "http",
                None => {
                    self.problem(
                        &at,
                        "needs `command` (a local stdio server) or `url` (a remote server)".into(),
                    );
                    return None;
                }
            },
        };
        let transport = if kind == "stdio" {
            let Some(command) = command else {
                self.problem(
                    &format!("{at}.command"),
                    "a stdio server needs `command`, the program to start".into(),
                );
                return None;
            };
            if command.is_empty() {
                self.problem(&format!("{at}.command"), "must not be empty".into());
            }
            TransportConfig::Stdio {
                command,
                args: self.opt_strings(map, &at, "args").unwrap_or_default(),
                env: self.opt_string_map(map, &at, "env").unwrap_or_default(),
                cwd: self.opt_string(map, &at, "cwd").map(PathBuf::from),
            }
        } else {
            let Some(url) = url else {
                self.problem(
                    &format!("{at}.url"),
                    format!("a {kind} server needs `url`, e.g. http://127.0.0.1:3000/mcp"),
                );
                return None;
            };
            let schemes = if kind == "ws" {
                ["ws://", "wss://"]
            } else {
                ["http://", "https://"]
            };
            if !schemes.iter().any(|s| url.starts_with(s)) {
                self.problem(
                    &format!("{at}.url"),
                    format!(
                        "`{}` must start with {} or {} for a {kind} server",
                        redact::url(&url),
                        schemes[0],
                        schemes[1]
                    ),
                );
            }
            let headers = headers.unwrap_or_default();
            match kind {
                "http" => TransportConfig::Http { url, headers },
                "ws" => TransportConfig::Ws { url, headers },
                _ => TransportConfig::Sse { url, headers },
            }
        };
        let transport_is_stdio = matches!(transport, TransportConfig::Stdio { .. });
        let era_applies = matches!(
            transport,
            TransportConfig::Http { .. } | TransportConfig::Stdio { .. }
        );
        let max_in_flight = self.opt_usize(map, &at, "maxInFlight", 1).unwrap_or(256);
        let max_queued = self.opt_usize(map, &at, "maxQueued", 0).unwrap_or(1024);
        let retry_on_reconnect = match map.get("retryOnReconnect") {
            None | Some(Value::Bool(false)) => Retry::Never,
            Some(Value::Bool(true)) => Retry::Always,
            Some(Value::String(s)) if s == "idempotent" => Retry::Idempotent,
            Some(_) => {
                self.problem(
                    &format!("{at}.retryOnReconnect"),
                    "must be true, false or \"idempotent\"".into(),
                );
                Retry::Never
            }
        };
        Some(ServerConfig {
            name: name.to_owned(),
            prefix,
            transport,
            disabled,
            max_in_flight,
            max_queued,
            retry_on_reconnect,
            required: self.opt_bool(map, &at, "required").unwrap_or(false),
            ca_file: self.opt_string(map, &at, "caFile").map(PathBuf::from),
            isolation: self.isolation(map, &at, transport_is_stdio),
            supervision: self.supervision(map, &at),
            era: self.era(map, &at, era_applies),
        })
    }

    /// The supervision keys of one object (`relay` or a server entry); absent keys stay
    /// `None`, so that a server's entry overrides only what it names.
    fn supervision(&mut self, map: &Map<String, Value>, at: &str) -> SupervisionOverrides {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        SupervisionOverrides {
            backoff: ms(self.opt_uint(map, at, "restartBackoffMs", 1)),
            backoff_max: ms(self.opt_uint(map, at, "restartBackoffMaxMs", 1)),
            start_limit_burst: self.opt_usize(map, at, "startLimitBurst", 1),
            start_limit_interval: ms(self.opt_uint(map, at, "startLimitIntervalMs", 0)),
            restart_wait: ms(self.opt_uint(map, at, "restartWaitMs", 0)),
            health_interval: ms(self.opt_uint(map, at, "healthIntervalMs", 0)),
            health_timeout: ms(self.opt_uint(map, at, "healthTimeoutMs", 1)),
            health_misses: self
                .opt_uint(map, at, "healthMisses", 1)
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
        }
    }

    fn era(&mut self, map: &Map<String, Value>, at: &str, applies: bool) -> Era {
        let era = match self.opt_string(map, at, "era").as_deref() {
            // Found at each connection where the era applies (stdio, Streamable HTTP).
            None if applies => Era::Auto,
            None | Some("legacy") => Era::Legacy,
            Some("modern") => Era::Modern,
            Some("auto") => Era::Auto,
            Some(other) => {
                self.problem(
                    &format!("{at}.era"),
                    format!("`{other}` is not an era; use \"legacy\", \"modern\" or \"auto\""),
                );
                Era::Legacy
            }
        };
        if era != Era::Legacy && !applies {
            self.problem(
                &format!("{at}.era"),
                "era applies to stdio and Streamable HTTP servers; remove it here".into(),
            );
        }
        era
    }

    fn isolation(&mut self, map: &Map<String, Value>, at: &str, stdio: bool) -> Isolation {
        let max = self.opt_usize(map, at, "maxInstances", 1);
        let pool = self.opt_usize(map, at, "poolSize", 1);
        let idle = self.opt_uint(map, at, "idleTimeoutMs", 1);
        let kind = self.opt_string(map, at, "isolation");
        let iso = match kind.as_deref() {
            None | Some("shared") => Isolation::Shared,
            Some("per-session") => Isolation::PerSession {
                max_instances: max.unwrap_or(64),
                idle_timeout: Duration::from_millis(idle.unwrap_or(10 * 60 * 1000)),
            },
            Some("pooled") => Isolation::Pooled {
                size: pool.unwrap_or(4),
            },
            Some("per-call") => Isolation::PerCall {
                max_instances: max.unwrap_or(8),
            },
            Some(other) => {
                self.problem(
                    &format!("{at}.isolation"),
                    format!("`{other}` is not an isolation; use \"shared\", \"per-session\", \"pooled\" or \"per-call\""),
                );
                Isolation::Shared
            }
        };
        if iso != Isolation::Shared && !stdio {
            self.problem(
                &format!("{at}.isolation"),
                "isolation applies to stdio servers (a process per session/call); remove it for a remote server".into(),
            );
        }
        iso
    }

    fn expand(&mut self, path: &str, s: &str) -> String {
        match expand_vars(s, self.env) {
            Ok(v) => v,
            Err(var) => {
                self.problem(
                    path,
                    format!("environment variable `{var}` is not set; set it or write `${{{var}:-default}}`"),
                );
                String::new()
            }
        }
    }

    fn opt_string(&mut self, map: &Map<String, Value>, at: &str, key: &str) -> Option<String> {
        let path = format!("{at}.{key}");
        match map.get(key)? {
            Value::String(s) => Some(self.expand(&path, s)),
            _ => {
                self.problem(&path, "must be a string".into());
                None
            }
        }
    }

    fn opt_strings(
        &mut self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
    ) -> Option<Vec<String>> {
        let path = format!("{at}.{key}");
        match map.get(key)? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(self.expand(&format!("{path}[{i}]"), s)),
                        _ => self.problem(&format!("{path}[{i}]"), "must be a string".into()),
                    }
                }
                Some(out)
            }
            _ => {
                self.problem(&path, "must be an array of strings".into());
                None
            }
        }
    }

    fn opt_string_map(
        &mut self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
    ) -> Option<BTreeMap<String, String>> {
        let path = format!("{at}.{key}");
        match map.get(key)? {
            Value::Object(m) => {
                let mut out = BTreeMap::new();
                for (k, val) in m {
                    match val {
                        Value::String(s) => {
                            let s = self.expand(&format!("{path}.{k}"), s);
                            out.insert(k.clone(), s);
                        }
                        _ => self.problem(&format!("{path}.{k}"), "must be a string".into()),
                    }
                }
                Some(out)
            }
            _ => {
                self.problem(&path, "must be an object of strings".into());
                None
            }
        }
    }

    fn opt_bool(&mut self, map: &Map<String, Value>, at: &str, key: &str) -> Option<bool> {
        match map.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.problem(&format!("{at}.{key}"), "must be true or false".into());
                None
            }
        }
    }

    /// [`Self::opt_uint`] as a `usize` (saturating).
    fn opt_usize(
        &mut self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
        min: u64,
    ) -> Option<usize> {
        self.opt_uint(map, at, key, min)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn log(&mut self, v: &Value) -> LogSettings {
        let at = "relay.log";
        let mut out = LogSettings::default();
        let Some(map) = v.as_object() else {
            self.problem(
                at,
                "must be an object with `format`, `level` and/or `file`".into(),
            );
            return out;
        };
        self.unknown_keys(map, at, &["format", "level", "file"], "log setting");
        if let Some(f) = self.opt_choice(
            map,
            at,
            "format",
            &[
                ("auto", LogFormat::Auto),
                ("json", LogFormat::Json),
                ("text", LogFormat::Text),
            ],
        ) {
            out.format = f;
        }
        if let Some(l) = self.opt_string(map, at, "level") {
            if tracing_subscriber::EnvFilter::try_new(&l).is_err() {
                self.problem(
                    &format!("{at}.level"),
                    format!(
                        "`{l}` is not a level filter; use e.g. \"info\" or \"mcp_relay=debug\""
                    ),
                );
            } else {
                out.level = Some(l);
            }
        }
        match map.get("file") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => match default_log_dir() {
                Some(d) => out.dir = Some(d),
                None => self.problem(
                    &format!("{at}.file"),
                    "neither XDG_STATE_HOME nor HOME is set; give a directory instead of true"
                        .into(),
                ),
            },
            Some(Value::String(_)) => out.dir = self.opt_string(map, at, "file").map(PathBuf::from),
            Some(_) => self.problem(
                &format!("{at}.file"),
                "must be true, false or a directory path".into(),
            ),
        }
        out
    }

    /// Reports keys of `map` not in `known` (`what` names them: "relay setting").
    fn unknown_keys(&mut self, map: &Map<String, Value>, at: &str, known: &[&str], what: &str) {
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(
                    &format!("{at}.{key}"),
                    format!("unknown {what}; known settings: {}", known.join(", ")),
                );
            }
        }
    }

    fn opt_uint(&mut self, map: &Map<String, Value>, at: &str, key: &str, min: u64) -> Option<u64> {
        let path = format!("{at}.{key}");
        match map.get(key)? {
            Value::Number(n) => match n.as_u64() {
                Some(u) if u >= min => Some(u),
                _ => {
                    self.problem(&path, format!("must be a whole number of at least {min}"));
                    None
                }
            },
            _ => {
                self.problem(&path, format!("must be a whole number of at least {min}"));
                None
            }
        }
    }
}

/// Server names and prefixes: the characters allowed in exposed tool names.
pub fn valid_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`. Returns the first unset
/// variable without default as the error.
pub fn expand_vars(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                out.push_str(&rest[pos..]);
                return Ok(out);
            };
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            match (
                env(name).filter(|v| !v.is_empty() || default.is_none()),
                default,
            ) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(name.to_owned()),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOME" => Some("/home/u".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "relay.json", &env) {
            Ok(_) => Vec::new(),
            Err(Error::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn expands_variables() {
        assert_eq!(expand_vars("${HOME}/x", &env).as_deref(), Ok("/home/u/x"));
        assert_eq!(expand_vars("${NOPE:-d}", &env).as_deref(), Ok("d"));
        assert_eq!(expand_vars("${EMPTY:-d}", &env).as_deref(), Ok("d"));
        assert_eq!(expand_vars("$$5 $x", &env).as_deref(), Ok("$5 $x"));
        assert_eq!(expand_vars("${NOPE}", &env), Err("NOPE".to_owned()));
    }

    #[test]
    fn websocket_servers_by_type_or_scheme() -> Result<(), Error> {
        let c = parse(
            r#"{"mcpServers": {"a": {"url": "wss://h/ws"}, "b": {"type": "websocket", "url": "ws://h"}}}"#,
            "relay.json",
            &env,
        )?;
        assert!(c.servers.iter().all(|s| s.transport.kind() == "ws"));
        let p = problems(r#"{"mcpServers": {"c": {"type": "ws", "url": "http://h"}}}"#);
        assert!(
            p[0].contains("must start with ws:// or wss:// for a ws server"),
            "{p:?}"
        );
        Ok(())
    }

    #[test]
    fn a_server_overrides_only_the_supervision_keys_it_names() -> Result<(), Error> {
        let c = parse(
            r#"{"relay": {"healthIntervalMs": 0, "restartWaitMs": 900},
                "mcpServers": {"a": {"command": "x", "healthIntervalMs": 200, "healthMisses": 2},
                               "b": {"command": "y"}}}"#,
            "relay.json",
            &env,
        )?;
        let a = c.servers[0].supervision.over(c.relay.supervision);
        let b = c.servers[1].supervision.over(c.relay.supervision);
        assert_eq!(a.health_interval, Duration::from_millis(200));
        assert_eq!(a.health_misses, 2);
        assert_eq!(a.restart_wait, Duration::from_millis(900), "follows relay");
        assert_eq!(
            a.backoff,
            Supervision::default().backoff,
            "follows the default"
        );
        assert_eq!(b.health_interval, Duration::ZERO);
        assert_eq!(b.health_misses, 3);
        let p = problems(r#"{"mcpServers": {"a": {"command": "x", "healthTimeoutMs": 0}}}"#);
        assert!(
            p[0].contains("mcpServers.a.healthTimeoutMs: must be a whole number of at least 1"),
            "{p:?}"
        );
        Ok(())
    }

    #[test]
    fn minimal_file_gets_defaults() -> Result<(), Error> {
        let c = parse(
            r#"{"mcpServers":{"fs":{"command":"npx","args":["-y","x"]},
                "remote":{"url":"http://127.0.0.1:1/mcp"},
                "old":{"url":"http://127.0.0.1:1/sse"},
                "s":{"type":"streamableHttp","url":"https://h/mcp","headers":{"A":"${HOME}"},"prefix":""}}}"#,
            "relay.json",
            &env,
        )?;
        assert_eq!(c.relay.listen.to_string(), "127.0.0.1:7800");
        let kinds: Vec<_> = c.servers.iter().map(|s| s.transport.kind()).collect();
        assert_eq!(kinds, ["stdio", "http", "sse", "http"]);
        assert_eq!(c.servers[0].prefix, "fs");
        assert_eq!(c.servers[3].prefix, "");
        Ok(())
    }

    #[test]
    fn reports_every_problem_with_path() {
        let p = problems(
            r#"{"relay":{"listen":"nowhere","bogus":1,"requestTimeoutMs":-5},
                "mcpServers":{"a b":{"command":"x"},"relay":{"command":"y"},
                "u":{"url":"ftp://x"},"t":{"type":"carrier-pigeon","url":"http://x"},
                "e":{"command":"${MISSING}"},"n":{}}}"#,
        );
        let joined = p.join("\n");
        for needle in [
            "relay.json: relay.bogus: unknown relay setting",
            "relay.json: relay.listen:",
            "relay.json: relay.requestTimeoutMs:",
            "mcpServers.a b: server names may use only",
            "mcpServers.relay: `relay` is reserved",
            "mcpServers.u.url: `ftp://x` must start with http",
            "mcpServers.t.type: unknown type `carrier-pigeon`",
            "mcpServers.e.command: environment variable `MISSING` is not set",
            "mcpServers.n: needs `command`",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn unknown_server_keys_warn() -> Result<(), Error> {
        let c = parse(
            r#"{"mcpServers":{"a":{"command":"x","fancyTool":true}}}"#,
            "relay.json",
            &env,
        )?;
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("mcpServers.a.fancyTool"))
        );
        Ok(())
    }

    #[test]
    fn syntax_error_names_position() {
        let p = problems("{\"mcpServers\": {,}}");
        assert!(p[0].starts_with("relay.json: line 1 column"), "{p:?}");
    }
}
