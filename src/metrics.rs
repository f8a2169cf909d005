//! Prometheus metrics (`GET /metrics`, OpenMetrics text), every name `mcp_relay_…`.
//!
//! Counters and histograms recorded on the request path live in [`Metrics`]; gauges that
//! describe the current state (sessions, backends) are read from the relay at each scrape,
//! so they are never stale and a removed server's series disappear. Labels are bounded:
//! MCP method names from a fixed list, configured server and client names, fixed outcomes
//! and reasons; never tool arguments or session ids.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// `tools/call` latency buckets, in seconds: 100 µs to 60 s, about three per decade
/// (1, 2.5, 5), fine enough to read p50/p95/p99 off the histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 25.0, 60.0,
];

/// Methods counted under their own name; anything else is `other`.
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "resources/templates/list",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
];

/// The `method` label of a request: its name when in [`METHODS`], else `other`.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerStateLabels {
    server: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontLabels {
    front: &'static str,
}

/// The relay's metrics; one per process, owned by the [`crate::router::Relay`].
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tool_calls: Family<ServerLabels, Histogram, fn() -> Histogram>,
    connections: Gauge,
    rate_limited: Family<ClientLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    sessions_refused: Family<ReasonLabels, Counter>,
    upgrades: Family<OutcomeLabels, Counter>,
    config_reloads: Family<OutcomeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// How a client request ended, for `mcp_relay_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A result (a tool result with `isError` counts here: the call itself worked).
    Ok,
    /// A JSON-RPC error, from the relay or the server.
    Error,
}

/// What the current state gauges are read from at each scrape.
pub struct Snapshot {
    /// Open sessions by front (`stdio`, `http`).
    pub sessions: Vec<(&'static str, usize)>,
    /// Stateless calls parked until their client answers an `input_required`.
    pub input_waiting: usize,
    pub backends: Vec<BackendSnapshot>,
}

pub struct BackendSnapshot {
    pub server: String,
    pub state: &'static str,
    pub up: bool,
    pub ready: bool,
    pub restarts: u64,
    pub in_flight: usize,
    pub tools: usize,
    /// Extra processes of an isolated server (per-session, pooled).
    pub instances: usize,
}

/// Every state a backend can report, so that each gets a 0/1 series.
pub const BACKEND_STATES: &[&str] = &[
    "starting",
    "ready",
    "degraded",
    "restarting",
    "needs-auth",
    "failed",
    "stopped",
];

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mcp_relay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests by MCP method and outcome (ok: a result; error: a JSON-RPC error)",
            requests.clone(),
        );
        let tool_calls: Family<ServerLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "tool_call_duration_seconds",
            "tools/call latency through the relay by server, from routing to the answer",
            tool_calls.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "http_connections_active",
            "Open HTTP connections on the front",
            connections.clone(),
        );
        let rate_limited = Family::<ClientLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "HTTP requests refused with 429 by the rate limit, by client (anonymous: no auth)",
            rate_limited.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "HTTP requests refused by authentication (missing, invalid) or scope (forbidden)",
            auth_failures.clone(),
        );
        let sessions_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "sessions_refused",
            "New HTTP sessions refused by a session cap (global, client)",
            sessions_refused.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config changes (file reloads and management edits) by outcome (applied, rejected)",
            config_reloads.clone(),
        );
        let upgrades = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "upgrades",
            "In-place upgrades by outcome: refused (the new binary failed its check), abandoned (requests did not drain, or a server could not be handed over), rolled_back (the new image could not restore), completed (counted by the new image)",
            upgrades.clone(),
        );
        registry.register(
            "build",
            "Version of the running relay",
            Info::new(vec![("version", crate::version())]),
        );
        Metrics {
            registry,
            requests,
            tool_calls,
            connections,
            rate_limited,
            auth_failures,
            sessions_refused,
            upgrades,
            config_reloads,
        }
    }

    /// Counts a request; `method` from [`method_label`].
    pub fn request(&self, method: &'static str, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        };
        self.requests
            .get_or_create(&RequestLabels { method, outcome })
            .inc();
    }

    pub fn tool_call(&self, server: &str, took: Duration) {
        self.tool_calls
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts an open HTTP connection until the returned guard drops.
    pub fn connection(&self) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.connections.clone())
    }

    /// HTTP connections open now.
    pub fn open_connections(&self) -> i64 {
        self.connections.get()
    }

    pub fn rate_limited(&self, client: &str) {
        self.rate_limited
            .get_or_create(&ClientLabels {
                client: client.to_owned(),
            })
            .inc();
    }

    /// `reason`: `missing`, `invalid` or `forbidden`.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// `reason`: `global` or `client`.
    pub fn session_refused(&self, reason: &'static str) {
        self.sessions_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an in-place upgrade by outcome (see the `upgrades` metric).
    pub fn upgrade(&self, outcome: &'static str) {
        self.upgrades
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn config_reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The OpenMetrics text of every metric, with the state gauges taken from `now`.
    pub fn encode(&self, now: &Snapshot) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)?;
        let mut state = Registry::with_prefix("mcp_relay");
        let sessions = Family::<FrontLabels, Gauge>::default();
        for (front, n) in &now.sessions {
            sessions
                .get_or_create(&FrontLabels { front })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        state.register("sessions_active", "Open client sessions by front", sessions);
        let waiting = Gauge::<i64>::default();
        waiting.set(i64::try_from(now.input_waiting).unwrap_or(i64::MAX));
        state.register(
            "input_required_waiting",
            "Stateless calls waiting for their client's input (a server request bridged as input_required)",
            waiting,
        );
        let up = Family::<ServerLabels, Gauge>::default();
        let ready = Family::<ServerLabels, Gauge>::default();
        let states = Family::<ServerStateLabels, Gauge>::default();
        let restarts = Family::<ServerLabels, Counter>::default();
        let in_flight = Family::<ServerLabels, Gauge>::default();
        let tools = Family::<ServerLabels, Gauge>::default();
        let instances = Family::<ServerLabels, Gauge>::default();
        for b in &now.backends {
            let l = ServerLabels {
                server: b.server.clone(),
            };
            up.get_or_create(&l).set(i64::from(b.up));
            ready.get_or_create(&l).set(i64::from(b.ready));
            for s in BACKEND_STATES {
                states
                    .get_or_create(&ServerStateLabels {
                        server: b.server.clone(),
                        state: s,
                    })
                    .set(i64::from(*s == b.state));
            }
            restarts.get_or_create(&l).inc_by(b.restarts);
            in_flight
                .get_or_create(&l)
                .set(i64::try_from(b.in_flight).unwrap_or(i64::MAX));
            tools
                .get_or_create(&l)
                .set(i64::try_from(b.tools).unwrap_or(i64::MAX));
            instances
                .get_or_create(&l)
                .set(i64::try_from(b.instances).unwrap_or(i64::MAX));
        }
        state.register(
            "backend_up",
            "1 while the server answers requests (ready or degraded)",
            up,
        );
        state.register("backend_ready", "1 while the server is ready", ready);
        state.register(
            "backend_state",
            "1 for the server's current supervision state",
            states,
        );
        state.register(
            "backend_restarts",
            "Restarts of the server since it was started by this relay",
            restarts,
        );
        state.register(
            "backend_in_flight",
            "Requests in flight on the server",
            in_flight,
        );
        state.register("backend_tools", "Tools the server lists", tools);
        state.register(
            "backend_instances",
            "Extra processes of the server for its isolation (per-session, pooled)",
            instances,
        );
        let mut more = String::new();
        prometheus_client::encoding::text::encode_registry(&mut more, &state)?;
        prometheus_client::encoding::text::encode_eof(&mut more)?;
        out.push_str(&more);
        Ok(out)
    }
}

/// Decrements the connection gauge when dropped.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_bounded_labels_and_state() -> Result<(), std::fmt::Error> {
        let m = Metrics::new();
        m.request(method_label("tools/call"), Outcome::Ok);
        m.request(method_label("x-secret-method"), Outcome::Error);
        m.tool_call("fs", Duration::from_micros(300));
        let _c = m.connection();
        let text = m.encode(&Snapshot {
            sessions: vec![("http", 2)],
            input_waiting: 1,
            backends: vec![BackendSnapshot {
                server: "fs".into(),
                state: "ready",
                up: true,
                ready: true,
                restarts: 3,
                in_flight: 1,
                tools: 14,
                instances: 0,
            }],
        })?;
        assert!(text.contains(r#"mcp_relay_requests_total{method="tools/call",outcome="ok"} 1"#));
        assert!(text.contains(r#"mcp_relay_requests_total{method="other",outcome="error"} 1"#));
        assert!(!text.contains("x-secret-method"));
        assert!(
            text.contains(
                r#"mcp_relay_tool_call_duration_seconds_bucket{le="0.0005",server="fs"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("mcp_relay_http_connections_active 1"));
        assert!(text.contains(r#"mcp_relay_sessions_active{front="http"} 2"#));
        assert!(
            text.contains("mcp_relay_input_required_waiting 1"),
            "{text}"
        );
        assert!(text.contains(r#"mcp_relay_backend_restarts_total{server="fs"} 3"#));
        assert!(text.contains(r#"mcp_relay_backend_state{server="fs",state="failed"} 0"#));
        assert!(text.contains("mcp_relay_build_info{version="));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
        Ok(())
    }
}
