//! Who may use the HTTP front and how often: bearer-token authentication against
//! `auth.clients` (SHA-256 digests compared in constant time, every client checked), and
//! per-client token buckets (`governor`, GCRA) from `relay.rateLimit` and each client's
//! `rateLimit`. Buckets survive config reloads unless their limit changed.

use crate::config::Config;
use crate::config::auth::{Client, RateLimit, digest};
use crate::sync::{lock, read, write};
use axum::http::{HeaderMap, header};
use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq as _;

/// Why a request was not authenticated (logged and counted; the token never is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token no client has.
    Invalid,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// The authenticated caller: `None` when auth is off.
pub fn authenticate<'c>(
    cfg: &'c Config,
    headers: &HeaderMap,
) -> Result<Option<&'c Client>, AuthFailure> {
    if !cfg.auth.enabled() {
        return Ok(None);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(AuthFailure::Missing)?;
    let presented = digest(token);
    // Every client is compared (no early exit), each comparison in constant time.
    let mut found: Option<&Client> = None;
    for c in &cfg.auth.clients {
        if bool::from(c.digest.ct_eq(&presented)) {
            found = Some(c);
        }
    }
    found.map(Some).ok_or(AuthFailure::Invalid)
}

/// Whose bucket a request takes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    Client(String),
    /// No auth: one bucket per peer address.
    Peer(IpAddr),
}

impl Caller {
    /// The metrics label (client names are from the config; peers are not labelled).
    pub fn label(&self) -> &str {
        match self {
            Caller::Client(n) => n,
            Caller::Peer(_) => "anonymous",
        }
    }
}

/// Token buckets by caller.
#[derive(Default)]
pub struct Limiters {
    clients: RwLock<HashMap<String, (RateLimit, Arc<DefaultDirectRateLimiter>)>>,
    peers: Mutex<Option<(RateLimit, Arc<DefaultKeyedRateLimiter<IpAddr>>)>>,
}

fn quota(l: RateLimit) -> Quota {
    Quota::with_period(l.period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(l.burst)
}

impl Limiters {
    /// Takes one request from `caller`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, cfg: &Config, caller: &Caller) -> Result<(), Duration> {
        self.check_n(cfg, caller, NonZeroU32::MIN)
            .map_err(|w| w.unwrap_or(Duration::MAX))
    }

    /// Takes `n` requests at once (a batch); `Err(Some(wait))` when the bucket has fewer,
    /// `Err(None)` when `n` is more than its burst (it never will).
    pub fn check_n(
        &self,
        cfg: &Config,
        caller: &Caller,
        n: NonZeroU32,
    ) -> Result<(), Option<Duration>> {
        // (A limiter's own clock: building a clock calibrates it, far too slow per request.)
        match caller {
            Caller::Client(name) => {
                let limit = cfg
                    .auth
                    .clients
                    .iter()
                    .find(|c| &c.name == name)
                    .and_then(|c| c.rate_limit)
                    .or(cfg.relay.rate_limit);
                let Some(limit) = limit else {
                    return Ok(());
                };
                let known = read(&self.clients)
                    .get(name)
                    .filter(|(l, _)| *l == limit)
                    .map(|(_, b)| b.clone());
                let bucket = known.unwrap_or_else(|| {
                    let mut map = write(&self.clients);
                    match map.get(name) {
                        Some((l, b)) if *l == limit => b.clone(),
                        _ => {
                            let b = Arc::new(RateLimiter::direct(quota(limit)));
                            map.insert(name.clone(), (limit, b.clone()));
                            b
                        }
                    }
                });
                match bucket.check_n(n) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(bucket.clock().now()))),
                    Err(_) => Err(None),
                }
            }
            Caller::Peer(ip) => {
                let Some(limit) = cfg.relay.rate_limit else {
                    return Ok(());
                };
                let bucket = {
                    let mut slot = lock(&self.peers);
                    match &*slot {
                        Some((l, b)) if *l == limit => b.clone(),
                        _ => {
                            let b = Arc::new(RateLimiter::keyed(quota(limit)));
                            *slot = Some((limit, b.clone()));
                            b
                        }
                    }
                };
                match bucket.check_key_n(ip, n) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(bucket.clock().now()))),
                    Err(_) => Err(None),
                }
            }
        }
    }

    /// Forgets peers whose buckets are full again (bounds memory under many addresses).
    pub fn prune(&self) {
        if let Some((_, b)) = &*lock(&self.peers) {
            b.retain_recent();
            b.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn cfg() -> Result<Config, crate::config::Error> {
        let env = |k: &str| match k {
            "A" => Some("token-of-client-a-000".to_owned()),
            "B" => Some("token-of-client-b-000".to_owned()),
            _ => None,
        };
        parse(
            r#"{"auth": {"clients": [
                {"name": "a", "token": "${A}", "scopes": ["tools"], "rateLimit": {"requestsPerMinute": 1, "burst": 3}},
                {"name": "b", "token": "${B}", "scopes": ["admin"]}
            ]}, "relay": {"rateLimit": {"requestsPerMinute": 1, "burst": 2}}, "mcpServers": {}}"#,
            "t.json",
            &env,
        )
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = format!("Bearer {t}").parse() {
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn tokens_identify_clients() -> Result<(), crate::config::Error> {
        let c = cfg()?;
        let who = |h: &HeaderMap| authenticate(&c, h).map(|o| o.map(|c| c.name.clone()));
        assert_eq!(who(&bearer("token-of-client-a-000")), Ok(Some("a".into())));
        assert_eq!(who(&bearer("token-of-client-b-000")), Ok(Some("b".into())));
        assert_eq!(
            who(&bearer("token-of-client-b-001")),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(who(&HeaderMap::new()), Err(AuthFailure::Missing));
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            axum::http::HeaderValue::from_static("Basic eA=="),
        );
        assert_eq!(who(&basic), Err(AuthFailure::Missing));
        Ok(())
    }

    #[test]
    fn buckets_count_exactly_per_caller() -> Result<(), crate::config::Error> {
        let c = cfg()?;
        let l = Limiters::default();
        let a = Caller::Client("a".into());
        let b = Caller::Client("b".into());
        let ok = |who: &Caller| (0..10).filter(|_| l.check(&c, who).is_ok()).count();
        assert_eq!(ok(&a), 3, "client a: its own burst of 3");
        assert_eq!(ok(&b), 2, "client b: the relay default burst of 2");
        let p = Caller::Peer(IpAddr::from([127, 0, 0, 1]));
        assert_eq!(ok(&p), 2);
        let wait = l.check(&c, &a).err().unwrap_or_default();
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        Ok(())
    }
}
