//! `auth` (who may use the HTTP front, with which scopes and which servers) and the HTTP
//! front's protection settings under `relay` (TLS, rate limits, session and header caps).
//!
//! Tokens are never kept: each client's token is read (from `${ENV}`, a file, or inline) and
//! only its SHA-256 digest is stored, so no `Debug`, status output or error can show it.

use super::Validator;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// The `auth` section. No clients: authentication is off.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Auth {
    pub clients: Vec<Client>,
}

impl Auth {
    pub fn enabled(&self) -> bool {
        !self.clients.is_empty()
    }
}

/// What a client may do (`scopes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes {
    /// `tools`: the servers' tools, prompts, resources and completions (and the selection
    /// meta-tools).
    pub tools: bool,
    /// `admin`: the `relay__*` management tools, `/metrics` and readiness detail.
    pub admin: bool,
    /// `metrics`: `/metrics` and readiness detail only (for a Prometheus scraper).
    pub metrics: bool,
}

impl Scopes {
    /// May read `/metrics` and the detail of `/health` and `/ready`.
    pub fn observe(&self) -> bool {
        self.admin || self.metrics
    }
}

/// One client of the HTTP front (`auth.clients[]`). `Debug` leaves the digest out.
#[derive(Clone, PartialEq)]
pub struct Client {
    pub name: String,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
    pub scopes: Scopes,
    /// Globs over server names: only these servers' items are visible to the client
    /// (`None`: every server).
    pub servers: Option<Vec<glob::Pattern>>,
    /// Overrides `relay.rateLimit` for this client.
    pub rate_limit: Option<RateLimit>,
    /// Open sessions allowed to this client (`maxSessions`; default: only the global cap).
    pub max_sessions: Option<usize>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("servers", &self.servers)
            .field("rate_limit", &self.rate_limit)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// A token bucket: `burst` requests at once, refilled by one every `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub period: Duration,
    pub burst: NonZeroU32,
}

/// `relay.tls`: PEM files; both are re-read when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The SHA-256 digest of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

const CLIENT_KEYS: &[&str] = &[
    "name",
    "token",
    "tokenFile",
    "tokenSha256",
    "scopes",
    "servers",
    "rateLimit",
    "maxSessions",
];
const RATE_KEYS: &[&str] = &["requestsPerSecond", "requestsPerMinute", "burst"];
/// Reserved for the OAuth 2.1 resource-server settings (protected resource metadata,
/// audience-bound JWTs), which would sit beside `clients`.
const AUTH_KEYS: &[&str] = &["clients"];
const SCOPES: &[&str] = &["tools", "admin", "metrics"];

impl Validator<'_> {
    pub(super) fn auth(&mut self, v: &Value) -> Auth {
        let mut auth = Auth::default();
        let Some(map) = v.as_object() else {
            self.problem("auth", "must be an object with `clients`".into());
            return auth;
        };
        self.unknown_keys(map, "auth", AUTH_KEYS, "auth setting");
        let clients = match map.get("clients") {
            None => return auth,
            Some(Value::Array(c)) => c,
            Some(_) => {
                self.problem("auth.clients", "must be an array of client objects".into());
                return auth;
            }
        };
        for (i, c) in clients.iter().enumerate() {
            let at = format!("auth.clients[{i}]");
            if let Some(client) = self.client(&at, c) {
                if auth.clients.iter().any(|o| o.name == client.name) {
                    self.problem(
                        &format!("{at}.name"),
                        format!(
                            "client `{}` is defined twice; names must be unique",
                            client.name
                        ),
                    );
                } else if auth.clients.iter().any(|o| o.digest == client.digest) {
                    self.problem(
                        &at,
                        format!(
                            "client `{}` has the same token as another client; give each client its own token",
                            client.name
                        ),
                    );
                } else {
                    auth.clients.push(client);
                }
            }
        }
        auth
    }

    fn client(&mut self, at: &str, v: &Value) -> Option<Client> {
        let Some(map) = v.as_object() else {
            self.problem(
                at,
                "must be an object with `name`, a token and `scopes`".into(),
            );
            return None;
        };
        self.unknown_keys(map, at, CLIENT_KEYS, "client setting");
        let name = self.opt_string(map, at, "name");
        let name = match name {
            Some(n) if !n.is_empty() => n,
            _ => {
                self.problem(
                    &format!("{at}.name"),
                    "a non-empty `name` is required".into(),
                );
                return None;
            }
        };
        let given: Vec<&str> = ["token", "tokenFile", "tokenSha256"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        // Every problem of the entry is reported, so the digest is checked last.
        let digest = match given.as_slice() {
            [one] => self.client_digest(map, at, one),
            _ => {
                self.problem(
                    at,
                    format!(
                        "client `{name}` needs exactly one of `token` (e.g. \"${{TEAM_TOKEN}}\"), `tokenFile` or `tokenSha256`"
                    ),
                );
                None
            }
        };
        let mut scopes = Scopes::default();
        match map.get("scopes") {
            None => self.problem(
                &format!("{at}.scopes"),
                format!(
                    "client `{name}` needs `scopes`: any of {}",
                    SCOPES.join(", ")
                ),
            ),
            Some(_) => {
                for s in self.opt_strings(map, at, "scopes").unwrap_or_default() {
                    match s.as_str() {
                        "tools" => scopes.tools = true,
                        "admin" => scopes.admin = true,
                        "metrics" => scopes.metrics = true,
                        other => self.problem(
                            &format!("{at}.scopes"),
                            format!("unknown scope `{other}`; use {}", SCOPES.join(", ")),
                        ),
                    }
                }
            }
        }
        let servers = map
            .contains_key("servers")
            .then(|| self.globs(map, at, "servers"));
        let rate_limit = map
            .get("rateLimit")
            .and_then(|r| self.rate_limit(&format!("{at}.rateLimit"), r));
        let max_sessions = self.opt_usize(map, at, "maxSessions", 1);
        let digest = digest?;
        Some(Client {
            name,
            digest,
            scopes,
            servers,
            rate_limit,
            max_sessions,
        })
    }

    /// The digest of a client's token from `key` (`token`, `tokenFile` or `tokenSha256`).
    fn client_digest(&mut self, map: &Map<String, Value>, at: &str, key: &str) -> Option<[u8; 32]> {
        match key {
            "token" => {
                if let Some(Value::String(raw)) = map.get("token")
                    && !raw.contains("${")
                {
                    self.warnings.push(format!(
                        "{}: {at}.token: the token is written in the file; prefer \"${{ENV_VAR}}\", `tokenFile` or `tokenSha256`",
                        self.file
                    ));
                }
                let before = self.problems.len();
                let t = self.opt_string(map, at, "token")?;
                if self.problems.len() > before {
                    // An unset variable, already reported.
                    return None;
                }
                self.token_digest(&format!("{at}.token"), &t)
            }
            "tokenFile" => {
                let path = self.opt_string(map, at, "tokenFile")?;
                match std::fs::read_to_string(&path) {
                    Ok(t) => self.token_digest(&format!("{at}.tokenFile"), t.trim()),
                    Err(e) => {
                        self.problem(
                            &format!("{at}.tokenFile"),
                            format!("cannot read `{path}` ({e}); the file must hold the token"),
                        );
                        None
                    }
                }
            }
            _ => {
                let hex = self.opt_string(map, at, "tokenSha256")?;
                match parse_hex32(hex.trim()) {
                    Some(d) => Some(d),
                    None => {
                        self.problem(
                            &format!("{at}.tokenSha256"),
                            "must be 64 hex digits (e.g. the output of `printf %s TOKEN | sha256sum`)".into(),
                        );
                        None
                    }
                }
            }
        }
    }

    fn token_digest(&mut self, at: &str, token: &str) -> Option<[u8; 32]> {
        if token.is_empty() {
            self.problem(at, "the token is empty".into());
            return None;
        }
        if token.len() < 16 {
            self.warnings.push(format!(
                "{}: {at}: the token is shorter than 16 characters; use a long random token",
                self.file
            ));
        }
        Some(digest(token))
    }

    /// `{"requestsPerSecond": r | "requestsPerMinute": r, "burst": n}`; `null` is no limit.
    pub(super) fn rate_limit(&mut self, at: &str, v: &Value) -> Option<RateLimit> {
        if v.is_null() {
            return None;
        }
        let Some(map) = v.as_object() else {
            self.problem(
                at,
                "must be an object such as {\"requestsPerMinute\": 100, \"burst\": 20}".into(),
            );
            return None;
        };
        self.unknown_keys(map, at, RATE_KEYS, "rate limit setting");
        let per_s = self.opt_positive(map, at, "requestsPerSecond");
        let per_m = self.opt_positive(map, at, "requestsPerMinute");
        let (rate, window) = match (per_s, per_m) {
            (Some(r), None) => (r, 1.0),
            (None, Some(r)) => (r, 60.0),
            _ => {
                self.problem(
                    at,
                    "give exactly one of `requestsPerSecond` or `requestsPerMinute`".into(),
                );
                return None;
            }
        };
        let period = Duration::from_secs_f64(window / rate);
        if period.is_zero() {
            self.problem(
                at,
                "the rate is too high to enforce; remove the limit".into(),
            );
            return None;
        }
        let default_burst = u32::try_from(rate.ceil() as u64).unwrap_or(u32::MAX);
        let burst = self
            .opt_uint(map, at, "burst", 1)
            .map_or(default_burst, |b| u32::try_from(b).unwrap_or(u32::MAX));
        Some(RateLimit {
            period,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        })
    }

    fn opt_positive(&mut self, map: &Map<String, Value>, at: &str, key: &str) -> Option<f64> {
        let v = map.get(key)?;
        match v.as_f64() {
            Some(f) if f > 0.0 && f.is_finite() => Some(f),
            _ => {
                self.problem(&format!("{at}.{key}"), "must be a number above 0".into());
                None
            }
        }
    }

    pub(super) fn tls(&mut self, v: &Value) -> Option<Tls> {
        let at = "relay.tls";
        let Some(map) = v.as_object() else {
            self.problem(
                at,
                "must be an object with `cert` and `key` (PEM files)".into(),
            );
            return None;
        };
        self.unknown_keys(map, at, &["cert", "key"], "TLS setting");
        let cert = self.opt_string(map, at, "cert");
        let key = self.opt_string(map, at, "key");
        match (cert, key) {
            (Some(cert), Some(key)) => Some(Tls {
                cert: cert.into(),
                key: key.into(),
            }),
            _ => {
                self.problem(
                    at,
                    "needs both `cert` and `key` (paths to PEM files)".into(),
                );
                None
            }
        }
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::config::{Error, parse};

    fn env(k: &str) -> Option<String> {
        (k == "TEAM_TOKEN").then(|| "team-token-0123456789".to_owned())
    }

    #[test]
    fn clients_keep_only_digests() -> Result<(), Error> {
        let hash = format!("{:x}", sha2::Sha256::digest(b"other-token-0123456789"));
        let text = format!(
            r#"{{"auth": {{"clients": [
                {{"name": "team", "token": "${{TEAM_TOKEN}}", "scopes": ["tools"], "servers": ["fs*"],
                  "rateLimit": {{"requestsPerMinute": 100, "burst": 20}}, "maxSessions": 3}},
                {{"name": "ops", "tokenSha256": "{hash}", "scopes": ["admin", "metrics"]}}
            ]}}, "mcpServers": {{}}}}"#
        );
        use sha2::Digest as _;
        let c = parse(&text, "t.json", &env)?;
        assert_eq!(c.auth.clients.len(), 2);
        let team = &c.auth.clients[0];
        assert_eq!(team.digest, super::digest("team-token-0123456789"));
        assert!(team.scopes.tools && !team.scopes.admin);
        assert_eq!(team.max_sessions, Some(3));
        let rl = team.rate_limit.ok_or(Error::Invalid(vec![]))?;
        assert_eq!(rl.burst.get(), 20);
        assert_eq!(rl.period, std::time::Duration::from_millis(600));
        assert!(!format!("{c:?}").contains("team-token"));
        assert_eq!(
            c.auth.clients[1].digest,
            super::digest("other-token-0123456789")
        );
        Ok(())
    }

    #[test]
    fn bad_clients_are_reported_without_the_token() {
        let text = r#"{"auth": {"clients": [
            {"name": "a", "token": "inline-secret-value", "tokenFile": "/x", "scopes": ["tools"]},
            {"name": "b", "tokenSha256": "zz", "scopes": ["root"]},
            {"name": "c", "token": "${NOPE}", "scopes": []}
        ]}, "mcpServers": {}}"#;
        let Err(Error::Invalid(p)) = parse(text, "t.json", &env) else {
            panic!("invalid auth accepted");
        };
        let all: Vec<String> = p.iter().map(ToString::to_string).collect();
        let joined = all.join("\n");
        assert!(joined.contains("exactly one of `token`"), "{joined}");
        assert!(joined.contains("64 hex digits"), "{joined}");
        assert!(joined.contains("unknown scope `root`"), "{joined}");
        assert!(joined.contains("`NOPE` is not set"), "{joined}");
        assert!(!joined.contains("inline-secret-value"), "{joined}");
    }
}
