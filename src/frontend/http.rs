//! The Streamable HTTP front (`POST`/`GET`/`DELETE` on one endpoint), per the MCP spec:
//! sessions with random `Mcp-Session-Id`s, JSON or SSE answers, a priming event and `retry`,
//! per-stream event ids with a bounded replay store for `Last-Event-ID`, `Origin` and `Host`
//! checks against DNS rebinding, `MCP-Protocol-Version` validation and a body size limit.
//!
//! Around it: bearer-token authentication and rate limits ([`super::gate`]), session caps
//! and an idle timeout, `/health` `/ready` `/metrics`, and our own accept loop (TLS through
//! [`super::tls`], a header size cap and a header read timeout against slow clients).

use super::gate::{self, Caller, Limiters};
use crate::error::RpcError;
use crate::protocol::{self, Kind, Message};
use crate::router::Relay;
use crate::session::Session;
use crate::sync::lock;
use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// Finished response streams kept per session for replay.
const DONE_STREAMS_KEPT: usize = 64;
/// Events queued toward one slow HTTP connection before it is cut (it may resume).
const LIVE_QUEUE: usize = 4096;

/// Shared state of the HTTP front.
pub struct Front {
    relay: Arc<Relay>,
    sessions: Mutex<HashMap<String, Arc<HttpSession>>>,
    /// Open `subscriptions/listen` streams (stateless era), counted with the sessions
    /// against `maxSessions`; always locked after `sessions`.
    listens: Mutex<HashMap<u64, ListenSlot>>,
    next_listen: AtomicU64,
    listen: SocketAddr,
    limiters: Limiters,
    /// Start of the front's clock (session activity is kept as milliseconds since it).
    epoch: Instant,
}

struct HttpSession {
    session: Arc<Session>,
    streams: Mutex<Streams>,
    /// The authenticated client that opened it (`None` without auth).
    client: Option<String>,
    /// Milliseconds since [`Front::epoch`] of its last activity (a request began or ended,
    /// a stream attached or finished).
    active: AtomicU64,
    epoch: Instant,
}

/// What an HTTP relay hands its successor.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HandedOver {
    #[serde(default)]
    format: u32,
    /// Upgrades before this one.
    generation: u64,
    /// The path the relay was first started from (the default of the next upgrade).
    #[serde(default)]
    started_from: Option<std::path::PathBuf>,
    sessions: Vec<SessionSnapshot>,
}

/// The format of [`HandedOver`] this binary writes (and the newest it reads).
const HANDED_OVER_FORMAT: u32 = 1;

/// A session as an upgrade hands it to the next process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSnapshot {
    pub id: String,
    pub client: Option<String>,
    pub state: crate::session::SessionState,
    pub next_request_id: u64,
    pub next_stream: u64,
    /// The standalone stream's buffered events (sequence, message).
    pub standalone: Vec<(u64, String)>,
    pub next_seq: u64,
    pub delivered: u64,
}

/// One open listen stream: its client, and its session once set up.
struct ListenSlot {
    client: Option<String>,
    session: Option<Arc<Session>>,
}

/// A listen stream's place in [`Front::listens`], given up when dropped (the stream ended).
struct ListenHold {
    front: Arc<Front>,
    key: u64,
}

impl Drop for ListenHold {
    fn drop(&mut self) {
        lock(&self.front.listens).remove(&self.key);
    }
}

/// The peer address of a connection (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Milliseconds from `epoch` to now (session activity is kept in these).
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A peer address in logs (`-` when unknown).
struct PeerText(Option<SocketAddr>);

impl std::fmt::Display for PeerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{p}"),
            None => f.write_str("-"),
        }
    }
}

/// The authenticated client of a request (`None` without auth), set by [`guard`].
#[derive(Debug, Clone)]
struct Who(Option<String>);

/// Whose rate-limit bucket the request took from (a batch takes one per extra message).
#[derive(Debug, Clone)]
struct Charge(Option<Caller>);

/// Records the session's activity when the request ends.
struct TouchOnDrop(Arc<HttpSession>);

impl Drop for TouchOnDrop {
    fn drop(&mut self) {
        self.0.touch();
    }
}

#[derive(Default)]
struct Streams {
    next: u64,
    map: HashMap<u64, StreamBuf>,
    done_order: VecDeque<u64>,
}

#[derive(Default)]
struct StreamBuf {
    events: VecDeque<(u64, Arc<str>)>,
    next_seq: u64,
    live: Option<mpsc::Sender<Bytes>>,
    /// Sequence numbers below this were handed to some connection.
    delivered: u64,
    done: bool,
}

fn sse_event(stream: u64, seq: u64, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 32);
    s.push_str("id: ");
    s.push_str(&stream.to_string());
    s.push('-');
    s.push_str(&seq.to_string());
    s.push_str("\ndata: ");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

impl HttpSession {
    /// Records activity now (for the idle timeout).
    fn touch(&self) {
        self.active
            .store(millis_since(self.epoch), Ordering::Relaxed);
    }

    fn new_stream(&self) -> u64 {
        let mut st = lock(&self.streams);
        let k = st.next;
        st.next += 1;
        st.map.insert(
            k,
            StreamBuf {
                next_seq: 1,
                delivered: 1,
                ..StreamBuf::default()
            },
        );
        k
    }

    /// Appends one message to stream `k`, sending it live when a connection is attached.
    fn push(&self, k: u64, data: &str, cap: usize) {
        let mut st = lock(&self.streams);
        let Some(buf) = st.map.get_mut(&k) else {
            return;
        };
        let seq = buf.next_seq;
        buf.next_seq += 1;
        let data: Arc<str> = Arc::from(data);
        if let Some(live) = &buf.live {
            if live.try_send(sse_event(k, seq, &data)).is_ok() {
                buf.delivered = seq + 1;
            } else {
                buf.live = None;
            }
        }
        buf.events.push_back((seq, data));
        while buf.events.len() > cap.max(1) {
            buf.events.pop_front();
        }
    }

    /// Marks stream `k` complete; its connection ends once everything was sent.
    fn finish(&self, k: u64) {
        self.touch();
        let mut st = lock(&self.streams);
        if let Some(buf) = st.map.get_mut(&k) {
            buf.done = true;
            buf.live = None;
        }
        st.done_order.push_back(k);
        while st.done_order.len() > DONE_STREAMS_KEPT {
            if let Some(old) = st.done_order.pop_front() {
                st.map.remove(&old);
            }
        }
    }

    /// Attaches a new connection to stream `k`, replaying events after `after` (or, without
    /// it, those no connection received yet).
    /// The connection starts with a priming event (its id marks the resume point) and `retry`.
    fn attach(&self, k: u64, after: Option<u64>, retry_ms: u64) -> Option<mpsc::Receiver<Bytes>> {
        self.touch();
        let mut st = lock(&self.streams);
        let buf = st.map.get_mut(&k)?;
        let (tx, rx) = mpsc::channel(LIVE_QUEUE);
        let from = after.map_or(buf.delivered, |a| a + 1).max(1);
        let _ = tx.try_send(Bytes::from(format!(
            "id: {k}-{}\nretry: {retry_ms}\ndata: \n\n",
            from - 1
        )));
        for (seq, data) in buf.events.iter().filter(|(s, _)| *s >= from) {
            if tx.try_send(sse_event(k, *seq, data)).is_err() {
                break;
            }
        }
        buf.delivered = buf.next_seq;
        if !buf.done {
            buf.live = Some(tx);
        }
        Some(rx)
    }
}

impl Front {
    pub fn new(relay: Arc<Relay>, listen: SocketAddr) -> Arc<Front> {
        Arc::new(Front {
            relay,
            sessions: Mutex::new(HashMap::new()),
            listens: Mutex::new(HashMap::new()),
            next_listen: AtomicU64::new(0),
            listen,
            limiters: Limiters::default(),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        millis_since(self.epoch)
    }

    /// The relay settings now in force (a config reload may change them).
    fn settings(&self) -> Arc<crate::config::Config> {
        self.relay.config()
    }

    /// The session of a request; a session opened by another client is unknown to this one.
    fn session(&self, headers: &HeaderMap, who: &Who) -> Result<Arc<HttpSession>, Reject> {
        let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                protocol::code::INVALID_REQUEST,
                "missing Mcp-Session-Id header; send initialize first",
            ));
        };
        let hs = lock(&self.sessions)
            .get(id)
            .filter(|hs| hs.client == who.0)
            .cloned()
            .ok_or_else(|| {
                reject(
                    StatusCode::NOT_FOUND,
                    protocol::code::INVALID_REQUEST,
                    "unknown or ended session; initialize a new one",
                )
            })?;
        hs.touch();
        Ok(hs)
    }

    /// Whether one more session or listen stream of `who` fits within `relay.maxSessions`
    /// and the client's `maxSessions` (both count sessions and listen streams).
    fn admit(
        &self,
        cfg: &crate::config::Config,
        sessions: &HashMap<String, Arc<HttpSession>>,
        who: &Who,
    ) -> Result<(), Box<Response>> {
        let listens = lock(&self.listens);
        if sessions.len() + listens.len() >= cfg.relay.max_sessions {
            self.relay.metrics.session_refused("global");
            tracing::warn!(
                cap = cfg.relay.max_sessions,
                "New session refused: relay.maxSessions reached."
            );
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                protocol::code::INVALID_REQUEST,
                &format!(
                    "too many open sessions (relay.maxSessions = {}); close unused sessions with DELETE or retry later",
                    cfg.relay.max_sessions
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return Err(Box::new(r));
        }
        let cap = who.0.as_ref().and_then(|name| {
            cfg.auth
                .clients
                .iter()
                .find(|c| &c.name == name)
                .and_then(|c| c.max_sessions)
                .map(|cap| (name, cap))
        });
        if let Some((name, cap)) = cap
            && sessions.values().filter(|s| s.client == who.0).count()
                + listens.values().filter(|l| l.client == who.0).count()
                >= cap
        {
            self.relay.metrics.session_refused("client");
            tracing::warn!(client = %name, cap, "New session refused: the client's maxSessions reached.");
            return Err(Box::new(error(
                StatusCode::TOO_MANY_REQUESTS,
                protocol::code::INVALID_REQUEST,
                &format!(
                    "client `{name}` has {cap} open sessions, its maxSessions; close one with DELETE first"
                ),
            )));
        }
        Ok(())
    }

    /// Reserves a place for a listen stream of `who` (see [`Front::admit`]).
    fn hold_listen(self: &Arc<Self>, who: &Who) -> Result<ListenHold, Box<Response>> {
        let cfg = self.settings();
        let sessions = lock(&self.sessions);
        self.admit(&cfg, &sessions, who)?;
        let key = self.next_listen.fetch_add(1, Ordering::Relaxed);
        lock(&self.listens).insert(
            key,
            ListenSlot {
                client: who.0.clone(),
                session: None,
            },
        );
        Ok(ListenHold {
            front: self.clone(),
            key,
        })
    }

    /// Opens a session for `who`, within `relay.maxSessions` and the client's `maxSessions`.
    fn create_session(self: &Arc<Self>, who: &Who) -> Result<Arc<HttpSession>, Box<Response>> {
        let cfg = self.settings();
        // The caps are checked and the session registered under one lock: concurrent
        // initializes cannot overshoot them.
        let mut sessions = lock(&self.sessions);
        self.admit(&cfg, &sessions, who)?;
        let hs = self.install(Session::random_id(), who.0.clone(), None);
        sessions.insert(hs.session.id.clone(), hs.clone());
        Ok(hs)
    }

    /// A session object with its standalone stream (stream 0, which buffers until a GET
    /// attaches); `carried` restores one an upgrade handed over.
    fn install(
        self: &Arc<Self>,
        id: String,
        client: Option<String>,
        carried: Option<SessionSnapshot>,
    ) -> Arc<HttpSession> {
        let cap = self.settings().relay.replay_events;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let session = self.relay.open_session(id, tx, client.clone());
        let hs = Arc::new(HttpSession {
            session,
            streams: Mutex::new(Streams::default()),
            client,
            active: AtomicU64::new(self.now_ms()),
            epoch: self.epoch,
        });
        let k = hs.new_stream();
        if let Some(snap) = carried {
            *hs.session.state() = snap.state;
            hs.session.set_next_request_id(snap.next_request_id);
            let mut st = lock(&hs.streams);
            st.next = st.next.max(snap.next_stream);
            if let Some(buf) = st.map.get_mut(&k) {
                buf.events = snap
                    .standalone
                    .into_iter()
                    .map(|(seq, data)| (seq, Arc::from(data)))
                    .collect();
                // Past anything the previous process may still have numbered.
                buf.next_seq = snap.next_seq + (1 << 20);
                buf.delivered = snap.delivered;
            }
        }
        let weak = Arc::downgrade(&hs);
        let closed = hs.session.closed().clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    () = closed.cancelled() => None,
                };
                let (Some(msg), Some(hs)) = (msg, weak.upgrade()) else {
                    break;
                };
                hs.push(k, &msg, cap);
            }
        });
        hs
    }

    /// The sessions as an upgrade hands them to the next process: state, client, and the
    /// standalone stream's events (so `Last-Event-ID` resumes there).
    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        let all: Vec<Arc<HttpSession>> = lock(&self.sessions).values().cloned().collect();
        all.iter()
            .map(|hs| {
                let st = lock(&hs.streams);
                let zero = st.map.get(&0);
                SessionSnapshot {
                    id: hs.session.id.clone(),
                    client: hs.client.clone(),
                    state: hs.session.state().clone(),
                    next_request_id: hs.session.next_request_id(),
                    next_stream: st.next,
                    standalone: zero
                        .map(|b| b.events.iter().map(|(s, d)| (*s, d.to_string())).collect())
                        .unwrap_or_default(),
                    next_seq: zero.map_or(0, |b| b.next_seq),
                    delivered: zero.map_or(0, |b| b.delivered),
                }
            })
            .collect()
    }

    /// Takes over the sessions of the process this one succeeds (an upgrade).
    pub fn restore(self: &Arc<Self>, snaps: Vec<SessionSnapshot>) {
        let n = snaps.len();
        for snap in snaps {
            let id = snap.id.clone();
            let hs = self.install(id.clone(), snap.client.clone(), Some(snap));
            lock(&self.sessions).insert(id, hs);
        }
        tracing::info!(
            sessions = n,
            "Sessions taken over from the previous process."
        );
    }

    /// Ends every standalone (GET) stream: its client reconnects (after the `retry` it was
    /// given) with `Last-Event-ID`, to the process that took over. Streams answering
    /// requests in flight go on here.
    pub fn end_streams(&self) {
        let all: Vec<Arc<HttpSession>> = lock(&self.sessions).values().cloned().collect();
        for hs in all {
            if let Some(buf) = lock(&hs.streams).map.get_mut(&0) {
                buf.live = None;
            }
        }
    }

    /// Ends the stateless listen streams (their clients open them again, on the process
    /// that took over).
    async fn end_listens(&self) {
        let listens: Vec<Arc<Session>> = lock(&self.listens)
            .values()
            .filter_map(|l| l.session.clone())
            .collect();
        for l in listens {
            self.relay.close_session(&l).await;
        }
    }

    /// Ends one session: its state is dropped and its streams end.
    async fn end_session(&self, hs: &Arc<HttpSession>) {
        lock(&self.sessions).remove(&hs.session.id);
        self.relay.close_session(&hs.session).await;
        let mut st = lock(&hs.streams);
        for buf in st.map.values_mut() {
            buf.live = None;
        }
    }

    /// Closes sessions idle for `relay.sessionIdleTimeoutMs`: no request for that long, none
    /// in flight, and no stream a client is reading.
    async fn reap_idle(&self) {
        let Some(timeout) = self.settings().relay.session_idle_timeout else {
            return;
        };
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let idle: Vec<Arc<HttpSession>> = lock(&self.sessions)
            .values()
            .filter(|hs| {
                now.saturating_sub(hs.active.load(Ordering::Relaxed)) >= limit
                    && !hs.session.busy()
                    && !lock(&hs.streams)
                        .map
                        .values()
                        .any(|b| b.live.as_ref().is_some_and(|l| !l.is_closed()))
            })
            .cloned()
            .collect();
        for hs in idle {
            tracing::info!(session = %hs.session.id, idle_ms = limit, "Idle session closed.");
            self.end_session(&hs).await;
        }
    }

    /// Host and Origin checks (DNS-rebinding protection).
    /// Also returns the config in force, so a request reads it once.
    fn check_origin(&self, headers: &HeaderMap) -> Result<Arc<crate::config::Config>, Reject> {
        let s = self.settings();
        if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok())
            && !host_allowed(host, &s.relay.allowed_hosts, self.listen)
        {
            return Err(reject(
                StatusCode::FORBIDDEN,
                protocol::code::INVALID_REQUEST,
                "Host header not allowed; add it to relay.allowedHosts",
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
            && !origin_allowed(origin, &s.relay.allowed_origins)
        {
            return Err(reject(
                StatusCode::FORBIDDEN,
                protocol::code::INVALID_REQUEST,
                "Origin not allowed; add it to relay.allowedOrigins",
            ));
        }
        Ok(s)
    }

    /// The `MCP-Protocol-Version` of a handshake-era request, if it sends one, must be one
    /// of the era's (stateless requests are checked against their `_meta` instead).
    fn check_version(headers: &HeaderMap) -> Result<(), Reject> {
        if let Some(v) = headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok())
            && !protocol::is_supported_version(v)
        {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                protocol::code::INVALID_REQUEST,
                &format!(
                    "unsupported MCP-Protocol-Version `{v}`; supported: {}",
                    protocol::LEGACY_VERSIONS.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Closes every session (on shutdown), ending their streams.
    pub async fn close_all(&self) {
        let listens: Vec<Arc<Session>> = lock(&self.listens)
            .drain()
            .filter_map(|(_, l)| l.session)
            .collect();
        for l in listens {
            self.relay.close_session(&l).await;
        }
        let all: Vec<Arc<HttpSession>> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in all {
            self.relay.close_session(&s.session).await;
            let mut st = lock(&s.streams);
            for buf in st.map.values_mut() {
                buf.live = None;
            }
        }
    }
}

fn hostname(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn is_loopback_name(h: &str) -> bool {
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_allowed(host: &str, allowed: &[String], listen: SocketAddr) -> bool {
    let h = hostname(host);
    is_loopback_name(h)
        || allowed.iter().any(|a| a == host || a == h)
        || (!listen.ip().is_unspecified()
            && h.parse::<std::net::IpAddr>().ok() == Some(listen.ip()))
}

fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == origin || a == "*") {
        return true;
    }
    let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    is_loopback_name(hostname(authority.trim_end_matches('/')))
}

/// A request refused before routing (status, JSON-RPC code, message).
struct Reject(StatusCode, i64, String);

fn reject(status: StatusCode, code: i64, message: &str) -> Reject {
    Reject(status, code, message.to_owned())
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        error(self.0, self.1, &self.2)
    }
}

fn error(status: StatusCode, code: i64, message: &str) -> Response {
    json_response(
        status,
        protocol::error_response("null", code, message, None),
    )
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream") || v.contains("*/*"))
}

async fn handle_post(
    State(front): State<Arc<Front>>,
    Extension(who): Extension<Who>,
    Extension(charge): Extension<Charge>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let max = match front.check_origin(&headers) {
        Ok(cfg) => cfg.relay.max_message_bytes,
        Err(r) => return r.into_response(),
    };
    let body = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => {
            let size = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(max + 1);
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                RpcError::TooLarge { size, max }.to_response("null"),
            );
        }
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        if let Err(r) = Front::check_version(&headers) {
            return r.into_response();
        }
        return handle_batch(&front, &headers, &who, &charge, &body).await;
    }
    let msg = match Message::parse(&body) {
        Ok(m) => m,
        Err(e) => {
            let err = match e {
                protocol::ParseError::Json(j) => RpcError::Parse(j.to_string()),
                protocol::ParseError::Invalid(s) => RpcError::InvalidRequest(s.to_owned()),
            };
            return json_response(StatusCode::BAD_REQUEST, err.to_response("null"));
        }
    };
    if crate::router::is_stateless(&msg, headers.contains_key(SESSION_HEADER)) {
        return handle_stateless(&front, &headers, who, msg).await;
    }
    if let Err(r) = Front::check_version(&headers) {
        return r.into_response();
    }
    if msg.method() == protocol::method::INITIALIZE && msg.kind() == Kind::Request {
        if front.relay.is_retiring() {
            // Its sessions went to the new process already; a new one belongs there too.
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                protocol::code::INVALID_REQUEST,
                "this relay process is handing over to its upgraded successor; retry (a new connection reaches it)",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
            return r;
        }
        let hs = match front.create_session(&who) {
            Ok(hs) => hs,
            Err(r) => return *r,
        };
        let reply = front
            .relay
            .handle(&hs.session, msg, hs.session.outbox.clone())
            .await
            .unwrap_or_default();
        let mut r = json_response(StatusCode::OK, reply);
        if let Ok(v) = HeaderValue::from_str(&hs.session.id) {
            r.headers_mut().insert(SESSION_HEADER, v);
        }
        return r;
    }
    let hs = match front.session(&headers, &who) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let _touch = TouchOnDrop(hs.clone());
    if msg.kind() != Kind::Request {
        front
            .relay
            .handle(&hs.session, msg, hs.session.outbox.clone())
            .await;
        return StatusCode::ACCEPTED.into_response();
    }
    if !accepts_sse(&headers) {
        let reply = front
            .relay
            .handle(&hs.session, msg, hs.session.outbox.clone())
            .await
            .unwrap_or_default();
        return json_response(StatusCode::OK, reply);
    }
    // Related messages (progress, logs, sampling...) go on this request's own stream. The
    // request runs inside this handler; only a switch to SSE moves it to a task of its own.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let relay = front.relay.clone();
    let session = hs.session.clone();
    let mut answer: Answer = Box::pin(async move { relay.handle(&session, msg, tx).await });
    let first = tokio::select! {
        biased;
        m = rx.recv() => m,
        r = &mut answer => {
            if let Ok(rest) = rx.try_recv() {
                // Something raced in just before the answer: switch to a stream after all.
                let reply = r.unwrap_or_default();
                return stream_reply(&front, &hs, Some(rest), rx, Box::pin(async move { Some(reply) }));
            }
            return json_response(StatusCode::OK, r.unwrap_or_default());
        }
    };
    match first {
        // The handler finished without related messages: a plain JSON answer.
        None => json_response(StatusCode::OK, answer.await.unwrap_or_default()),
        Some(first) => stream_reply(&front, &hs, Some(first), rx, answer),
    }
}

type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>;

/// The value of a request header with surrounding whitespace removed (RFC 9110 §5.5).
fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches([' ', '\t']))
}

/// The standard headers of a stateless request must repeat its body: `MCP-Protocol-Version`
/// the `_meta` version, `Mcp-Method` the method, `Mcp-Name` the tool, prompt or resource.
fn header_mismatch(headers: &HeaderMap, msg: &Message) -> Option<String> {
    if msg.kind() != Kind::Request {
        return None;
    }
    let method = msg.method();
    match header_value(headers, "mcp-method") {
        None => return Some("missing Mcp-Method header".into()),
        Some(h) if h != method => {
            return Some(format!(
                "Mcp-Method header `{h}` does not match the body's method `{method}`"
            ));
        }
        Some(_) => {}
    }
    let params = msg.params_map().unwrap_or_default();
    if let Ok(meta) = protocol::modern::meta(msg) {
        match header_value(headers, VERSION_HEADER) {
            None => return Some("missing MCP-Protocol-Version header".into()),
            Some(h) if h != meta.version => {
                return Some(format!(
                    "MCP-Protocol-Version header `{h}` does not match `_meta` version `{}`",
                    meta.version
                ));
            }
            Some(_) => {}
        }
    } else if let (Some(h), Some(v)) = (
        header_value(headers, VERSION_HEADER),
        params
            .get("_meta")
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m.get()).ok())
            .and_then(|m| {
                m[protocol::modern::META_VERSION]
                    .as_str()
                    .map(str::to_owned)
            }),
    ) && h != v
    {
        return Some(format!(
            "MCP-Protocol-Version header `{h}` does not match `_meta` version `{v}`"
        ));
    }
    let field = protocol::modern::name_field(method)?;
    let want = params.get_str(field)?;
    // Names that HTTP cannot carry as they are come in the era's base64 sentinel.
    match header_value(headers, "mcp-name") {
        None => Some("missing Mcp-Name header".into()),
        Some(h) if protocol::modern::decode_header_value(h).as_deref() != Some(want.as_str()) => {
            Some(format!(
                "Mcp-Name header `{h}` does not match the body's {field} `{want}`"
            ))
        }
        Some(_) => None,
    }
}

fn stateless_response(reply: crate::router::Reply) -> Response {
    let status = match reply.status {
        crate::router::Status::Ok => StatusCode::OK,
        crate::router::Status::BadRequest => StatusCode::BAD_REQUEST,
        crate::router::Status::NotFound => StatusCode::NOT_FOUND,
    };
    json_response(status, reply.body)
}

/// A stateless (2026-07-28) request: no session; the answer as JSON, or as an SSE stream
/// (no event ids: the era has no resumption) once a related message goes first.
async fn handle_stateless(
    front: &Arc<Front>,
    headers: &HeaderMap,
    who: Who,
    msg: Message,
) -> Response {
    if let Some(why) = header_mismatch(headers, &msg) {
        return stateless_response(crate::router::Reply::error(
            msg.id_text(),
            protocol::modern::code::HEADER_MISMATCH,
            &why,
            None,
            crate::router::Status::BadRequest,
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    if msg.kind() == Kind::Request && msg.method() == protocol::modern::LISTEN {
        let hold = match front.hold_listen(&who) {
            Ok(h) => h,
            Err(r) => return *r,
        };
        return match front.relay.listen(msg, who.0, tx).await {
            Err(reply) => stateless_response(reply),
            Ok(session) => {
                if let Some(slot) = lock(&front.listens).get_mut(&hold.key) {
                    slot.session = Some(session.clone());
                }
                // No answer ends a listen stream: it lasts until the client closes it or
                // its session ends (shutdown); its place is given up with the stream.
                let ended = session.closed().clone();
                plain_sse(
                    None,
                    rx,
                    Box::pin(async move {
                        let _hold = hold;
                        ended.cancelled().await;
                        None
                    }),
                )
            }
        };
    }
    if msg.kind() != Kind::Request {
        front.relay.stateless(msg, who.0, tx).await;
        return StatusCode::ACCEPTED.into_response();
    }
    let relay = front.relay.clone();
    let mut work = Box::pin(async move { relay.stateless(msg, who.0, tx).await });
    let first = tokio::select! {
        biased;
        m = rx.recv() => m,
        r = &mut work => {
            let Some(reply) = r else {
                return StatusCode::ACCEPTED.into_response();
            };
            if let Ok(rest) = rx.try_recv() {
                return plain_sse(Some(rest), rx, Box::pin(async move { Some(reply.body) }));
            }
            return stateless_response(reply);
        }
    };
    plain_sse(
        first,
        rx,
        Box::pin(async move { work.await.map(|r| r.body) }),
    )
}

/// An SSE response without event ids: `first`, then what arrives on `rx`, then the answer.
fn plain_sse(
    first: Option<String>,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut answer: Answer,
) -> Response {
    // A reader that falls LIVE_QUEUE events behind is cut (the era has no resumption,
    // and an unread stream must not grow without bound).
    let (out, body) = mpsc::channel::<Bytes>(LIVE_QUEUE);
    let event = |m: &str| Bytes::from(format!("data: {m}\n\n"));
    tokio::spawn(async move {
        if let Some(f) = first
            && out.try_send(event(&f)).is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => {
                        if out.try_send(event(&m)).is_err() {
                            return;
                        }
                    }
                    None => {
                        if let Some(reply) = answer.await {
                            let _ = out.send(event(&reply)).await;
                        }
                        return;
                    }
                },
                reply = &mut answer => {
                    while let Ok(m) = rx.try_recv() {
                        if out.try_send(event(&m)).is_err() {
                            return;
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = out.send(event(&reply)).await;
                    }
                    return;
                }
                () = out.closed() => return,
            }
        }
    });
    sse_response(body)
}

/// Answers with an SSE stream: priming event, related messages, then the response.
fn stream_reply(
    front: &Arc<Front>,
    hs: &Arc<HttpSession>,
    first: Option<String>,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut answer: Answer,
) -> Response {
    let k = hs.new_stream();
    let (retry, cap) = {
        let s = front.settings();
        (s.relay.sse_retry_ms, s.relay.replay_events)
    };
    let Some(conn) = hs.attach(k, None, retry) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            protocol::code::INTERNAL_ERROR,
            "stream setup failed",
        );
    };
    if let Some(f) = first {
        hs.push(k, &f, cap);
    }
    let hs2 = hs.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => hs2.push(k, &m, cap),
                    None => {
                        if let Some(reply) = answer.await {
                            hs2.push(k, &reply, cap);
                        }
                        break;
                    }
                },
                reply = &mut answer => {
                    while let Ok(m) = rx.try_recv() {
                        hs2.push(k, &m, cap);
                    }
                    if let Some(reply) = reply {
                        hs2.push(k, &reply, cap);
                    }
                    break;
                }
            }
        }
        hs2.finish(k);
    });
    sse_response(conn)
}

async fn handle_batch(
    front: &Arc<Front>,
    headers: &HeaderMap,
    who: &Who,
    charge: &Charge,
    body: &[u8],
) -> Response {
    let items: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                RpcError::Parse(e.to_string()).to_response("null"),
            );
        }
    };
    if items.is_empty() {
        return json_response(
            StatusCode::BAD_REQUEST,
            RpcError::InvalidRequest("an empty batch".into()).to_response("null"),
        );
    }
    // The request took one token in the guard; each further message takes one more.
    if let (Some(caller), Some(extra)) = (
        &charge.0,
        u32::try_from(items.len() - 1)
            .ok()
            .and_then(std::num::NonZeroU32::new),
    ) && let Err(wait) = front.limiters.check_n(&front.settings(), caller, extra)
    {
        return front.rate_limited(caller, wait, items.len());
    }
    let hs = match front.session(headers, who) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let _touch = TouchOnDrop(hs.clone());
    let futs = items.iter().map(|item| {
        let relay = front.relay.clone();
        let session = hs.session.clone();
        async move {
            match Message::parse(item.get().as_bytes()) {
                Ok(m) if m.method() == protocol::method::INITIALIZE => Some(
                    RpcError::InvalidRequest("initialize must not be part of a batch".into())
                        .to_response(m.id_text()),
                ),
                Ok(m) => {
                    let out = session.outbox.clone();
                    relay.handle(&session, m, out).await
                }
                Err(e) => Some(RpcError::InvalidRequest(e.to_string()).to_response("null")),
            }
        }
    });
    let answers: Vec<String> = futures::future::join_all(futs)
        .await
        .into_iter()
        .flatten()
        .collect();
    if answers.is_empty() {
        StatusCode::ACCEPTED.into_response()
    } else {
        json_response(StatusCode::OK, format!("[{}]", answers.join(",")))
    }
}

async fn handle_get(
    State(front): State<Arc<Front>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
) -> Response {
    let retry = match front.check_origin(&headers) {
        Ok(cfg) => cfg.relay.sse_retry_ms,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = Front::check_version(&headers) {
        return r.into_response();
    }
    if !accepts_sse(&headers) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            protocol::code::INVALID_REQUEST,
            "GET needs Accept: text/event-stream",
        );
    }
    if front.relay.is_retiring() {
        // Handed over: the client reconnects (with Last-Event-ID) to the new process.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Bytes::from_static(b"retry: 200\n\n"));
        return sse_response(rx);
    }
    let hs = match front.session(&headers, &who) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once('-'))
        .and_then(|(k, s)| Some((k.parse::<u64>().ok()?, s.parse::<u64>().ok())));
    let (k, after) = match last {
        Some((k, seq)) => (k, seq),
        None => (0, None),
    };
    match hs.attach(k, after, retry) {
        Some(rx) => sse_response(rx),
        None => error(
            StatusCode::NOT_FOUND,
            protocol::code::INVALID_REQUEST,
            "that event stream is no longer available",
        ),
    }
}

async fn handle_delete(
    State(front): State<Arc<Front>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = front
        .check_origin(&headers)
        .and_then(|_| Front::check_version(&headers))
    {
        return r.into_response();
    }
    let hs = match front.session(&headers, &who) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    front.end_session(&hs).await;
    StatusCode::OK.into_response()
}

/// Authentication and rate limiting in front of `/mcp`: no or wrong token → 401 with
/// `WWW-Authenticate: Bearer`; a token with neither `tools` nor `admin` → 403; an empty
/// bucket → 429 with `Retry-After`. Every refusal is logged with the peer address and the
/// reason (never the token) and counted.
async fn guard(State(front): State<Arc<Front>>, mut req: Request, next: Next) -> Response {
    let cfg = front.settings();
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let client = match front.authorize(&cfg, req.headers(), peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if let Some(c) = client
        && !(c.scopes.tools || c.scopes.admin)
    {
        return front.forbidden(
            peer,
            &c.name,
            "the `tools` or `admin` scope to use the MCP endpoint",
        );
    }
    let caller = match (client, peer) {
        (Some(c), _) => Some(Caller::Client(c.name.clone())),
        (None, Some(p)) => Some(Caller::Peer(p.ip())),
        (None, None) => None,
    };
    if let Some(caller) = &caller
        && let Err(wait) = front.limiters.check(&cfg, caller)
    {
        tracing::warn!(peer = %PeerText(peer), client = %caller.label(), "Request refused: rate limit.");
        return front.rate_limited(caller, Some(wait), 1);
    }
    req.extensions_mut()
        .insert(Who(client.map(|c| c.name.clone())));
    req.extensions_mut().insert(Charge(caller));
    drop(cfg);
    next.run(req).await
}

impl Front {
    /// The authenticated client (`None` without auth), or the 401 answer.
    fn authorize<'c>(
        &self,
        cfg: &'c crate::config::Config,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Option<&'c crate::config::auth::Client>, Box<Response>> {
        gate::authenticate(cfg, headers).map_err(|f| {
            self.relay.metrics.auth_failure(f.reason());
            tracing::warn!(peer = %PeerText(peer), reason = f.reason(), "Authentication failed.");
            let (challenge, message) = match f {
                gate::AuthFailure::Missing => (
                    r#"Bearer realm="mcp-relay""#,
                    "authentication required: send Authorization: Bearer <token>",
                ),
                gate::AuthFailure::Invalid => (
                    r#"Bearer realm="mcp-relay", error="invalid_token""#,
                    "invalid token",
                ),
            };
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                protocol::code::INVALID_REQUEST,
                message,
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
            Box::new(r)
        })
    }

    /// HTTP 429 for a caller over its rate limit (`wait`: until the bucket holds `n`;
    /// `None`: `n` is over its burst), counted.
    fn rate_limited(&self, caller: &Caller, wait: Option<Duration>, n: usize) -> Response {
        self.relay.metrics.rate_limited(caller.label());
        let secs = wait.map_or(60, |w| {
            (w.as_secs() + u64::from(w.subsec_nanos() > 0)).max(1)
        });
        let message = match wait {
            Some(_) => format!(
                "rate limit reached; retry in {secs} s (relay.rateLimit / the client's rateLimit)"
            ),
            None => format!(
                "a batch of {n} messages is more than the rate limit's burst allows; send fewer at once"
            ),
        };
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            protocol::code::RATE_LIMITED,
            &message,
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }

    /// HTTP 403 for an authenticated client whose scopes lack `needs` (logged, counted).
    fn forbidden(&self, peer: Option<SocketAddr>, client: &str, needs: &str) -> Response {
        self.relay.metrics.auth_failure("forbidden");
        tracing::warn!(peer = %PeerText(peer), client = %client, needs, "Request refused: scope.");
        error(
            StatusCode::FORBIDDEN,
            protocol::code::FORBIDDEN,
            &format!("client `{client}` needs {needs}; add it to its `scopes` in auth.clients"),
        )
    }

    /// Whether a request may see the detail of `/health` and `/ready` (server names,
    /// states, errors): with auth, a token with `metrics` or `admin` (a wrong token is
    /// logged and counted, a missing one is not: probes send none); without auth, a request
    /// that passes the Host and Origin checks (no DNS-rebinding page reads it).
    fn may_see_detail(
        &self,
        cfg: &crate::config::Config,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> bool {
        if !cfg.auth.enabled() {
            return self.check_origin(headers).is_ok();
        }
        match gate::authenticate(cfg, headers) {
            Ok(c) => c.is_some_and(|c| c.scopes.observe()),
            Err(gate::AuthFailure::Missing) => false,
            Err(f) => {
                self.relay.metrics.auth_failure(f.reason());
                tracing::warn!(peer = %PeerText(peer), reason = f.reason(), "Authentication failed (health detail).");
                false
            }
        }
    }
}

fn json_status(code: StatusCode, body: &serde_json::Value) -> Response {
    json_response(code, body.to_string())
}

/// The servers' states for `/health`: status, tools, last error.
fn servers_detail(relay: &Relay) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for b in relay.backends() {
        let st = b.state();
        let last_error = match &st {
            crate::backend::State::Restarting { last_error, .. } => Some(last_error.clone()),
            crate::backend::State::Failed(e) | crate::backend::State::NeedsAuth(e) => {
                Some(e.clone())
            }
            _ => None,
        };
        out.insert(
            b.name.clone(),
            serde_json::json!({
                "status": st.label(),
                "tools": b.tool_count(),
                "required": b.config.required,
                "last_error": last_error,
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// `healthy` (every server ready), `degraded` (some are not, the required ones are) or
/// `unhealthy` (a required server is down, or the relay is stopping).
fn overall(relay: &Relay) -> &'static str {
    if !relay.unready().is_empty() {
        "unhealthy"
    } else if relay
        .backends()
        .iter()
        .all(|b| b.state() == crate::backend::State::Ready)
    {
        "healthy"
    } else {
        "degraded"
    }
}

/// `GET /health` (also `/api/health`): liveness. 200 while the process serves, whatever its
/// servers do (a restart of the relay cannot heal a server); the body tells how it is.
/// Server detail: see [`Front::may_see_detail`].
async fn handle_health(
    State(front): State<Arc<Front>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let relay = &front.relay;
    let cfg = front.settings();
    let mut body = serde_json::json!({
        "status": overall(relay),
        "version": crate::version(),
        "uptime_s": relay.uptime().as_secs(),
    });
    if front.may_see_detail(&cfg, &headers, peer.map(|Extension(p)| p.0)) {
        body["sessions"] = relay.session_count().into();
        body["servers"] = servers_detail(relay);
    }
    json_status(StatusCode::OK, &body)
}

/// `GET /healthz`: the process serves HTTP (no body detail, no auth).
async fn handle_healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
}

/// `GET /ready` (also `/readyz`): 200 while every `required` server is up and the relay is
/// not stopping, else 503. With auth on, the names of the servers waited for need a token.
async fn handle_ready(
    State(front): State<Arc<Front>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let unready = front.relay.unready();
    let code = if unready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let cfg = front.settings();
    let mut body = serde_json::json!({
        "ready": unready.is_empty(),
        "status": overall(&front.relay),
    });
    if front.may_see_detail(&cfg, &headers, peer.map(|Extension(p)| p.0)) {
        let waiting: Vec<serde_json::Value> = unready
            .iter()
            .map(|(server, state)| serde_json::json!({"server": server, "state": state}))
            .collect();
        body["waitingFor"] = waiting.into();
        body["servers"] = servers_detail(&front.relay);
    }
    json_status(code, &body)
}

/// `GET /metrics`: OpenMetrics text. With auth on it needs a token with `metrics` or
/// `admin`.
async fn handle_metrics(
    State(front): State<Arc<Front>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let cfg = front.settings();
    let peer = peer.map(|Extension(p)| p.0);
    if !cfg.auth.enabled()
        && let Err(r) = front.check_origin(&headers)
    {
        return r.into_response();
    }
    match front.authorize(&cfg, &headers, peer) {
        Err(r) => return *r,
        Ok(Some(c)) if !c.scopes.observe() => {
            return front.forbidden(
                peer,
                &c.name,
                "the `metrics` or `admin` scope to read metrics",
            );
        }
        Ok(_) => {}
    }
    let relay = &front.relay;
    match relay.metrics.encode(&relay.metrics_snapshot()) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            protocol::code::INTERNAL_ERROR,
            "metrics could not be encoded",
        ),
    }
}

/// The axum router: the MCP endpoint at `/mcp` (behind [`guard`]), `/health`,
/// `/api/health`, `/healthz`, `/ready`, `/readyz` and `/metrics`.
pub fn router(front: Arc<Front>) -> Router {
    let mcp = Router::new()
        .route(
            "/mcp",
            post(handle_post).get(handle_get).delete(handle_delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(front.clone(), guard));
    Router::new()
        .merge(mcp)
        .route("/health", get(handle_health))
        .route("/api/health", get(handle_health))
        .route("/healthz", get(handle_healthz))
        .route("/ready", get(handle_ready))
        .route("/readyz", get(handle_ready))
        .route("/metrics", get(handle_metrics))
        .layer(axum::middleware::from_fn_with_state(front.clone(), retire))
        .with_state(front)
}

/// After a hand-over, every answer asks its client to close the connection.
async fn retire(State(front): State<Arc<Front>>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    if front.relay.is_retiring() {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Serves HTTP (or HTTPS with `relay.tls`) on `listener` until `shutdown` fires, or until
/// an upgrade handed the listener to a new process (see [`crate::upgrade::http`]).
/// `handoff`: this process is that new process, and takes its predecessor's sessions first.
pub async fn serve(
    relay: Arc<Relay>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    handoff: Option<crate::upgrade::http::Handoff>,
) -> std::io::Result<()> {
    use crate::upgrade::{self, http::Successor};
    let listen = listener.local_addr()?;
    let front = Front::new(relay.clone(), listen);
    let app = router(front.clone());
    let tls = match relay.config().relay.tls.clone() {
        Some(t) => Some(
            super::tls::acceptor(relay.clone(), &t, shutdown.clone())
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    spawn_housekeeping(front.clone(), shutdown.clone());
    match handoff {
        // A successor: its servers first, then the sessions, then it accepts.
        Some(mut h) => {
            relay.settle().await;
            let handed = h.ready().await.and_then(|bytes| {
                let handed = serde_json::from_slice::<HandedOver>(&bytes)
                    .map_err(|e| format!("the sessions are unreadable: {e}"))?;
                if handed.format > HANDED_OVER_FORMAT {
                    return Err(format!(
                        "the sessions have format {}, newer than this binary reads",
                        handed.format
                    ));
                }
                Ok(handed)
            });
            let handed = match handed {
                Ok(h) => h,
                Err(e) => {
                    // Without the sessions this process must not serve: the previous one
                    // serves on.
                    tracing::error!(error = %e, "Not taking over.");
                    h.refuse(&e).await;
                    return Err(std::io::Error::other(e));
                }
            };
            upgrade::set_generation(handed.generation + 1);
            if let Some(p) = handed.started_from {
                upgrade::set_started_from(p);
            }
            front.restore(handed.sessions);
            relay.renew_all_subscriptions();
            // systemd learns the new main process before the old one can exit.
            upgrade::http::sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            h.serving().await;
            relay.metrics.upgrade("completed");
            tracing::info!(version = %crate::version(), "Upgraded: this process serves now.");
        }
        None => upgrade::http::sd_notify("READY=1"),
    }
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut upgrades = relay.serve_upgrades();
    type Starting =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Successor, String>> + Send>>;
    let mut checking: Option<upgrade::Checking> = None;
    let mut starting: Option<Starting> = None;
    'serve: loop {
        let handed = loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "Accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(req) = upgrade::next_request(&mut upgrades), if checking.is_none() && starting.is_none() => {
                    let preview = upgrade::State::new(upgrade::FrontState::default(), upgrade::Carried::default());
                    checking = Some(req.check(relay.config().path.clone(), preview));
                    continue;
                }
                (checked, reply) = upgrade::checked(&mut checking) => {
                    checking = None;
                    let plan = match checked {
                        Ok(p) => p,
                        Err(e) => {
                            relay.upgrade_not_done("refused", &e, reply);
                            continue;
                        }
                    };
                    match Successor::spawn(&plan, &listener) {
                        Ok(mut s) => {
                            tracing::info!(to = %plan.version, pid = s.pid(), "New binary checked and started; handing over once it is ready.");
                            upgrade::answer(reply, Ok(plan.version.clone()));
                            let within = relay.config().relay.startup_wait + Duration::from_secs(10);
                            starting = Some(Box::pin(async move {
                                // Dropped on failure: killed and reaped.
                                s.ready(within).await.map(|()| s)
                            }));
                        }
                        Err(e) => relay.upgrade_not_done("abandoned", &e, reply),
                    }
                    continue;
                }
                r = async { match starting.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                    starting = None;
                    match r {
                        Ok(s) => break Some(s),
                        Err(e) => {
                            let why = format!("the new process did not become ready: {e}");
                            relay.upgrade_not_done("rolled_back", &why, None);
                            continue;
                        }
                    }
                }
                () = shutdown.cancelled() => break None,
            };
            let _ = tcp.set_nodelay(true);
            let (max_head, head_timeout) = {
                let s = relay.config();
                (s.relay.max_header_bytes, s.relay.header_timeout)
            };
            let counted = relay.metrics.connection();
            let app = app.clone();
            let tls = tls.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _counted = counted;
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(Peer(peer));
                        let app = app.clone();
                        async move {
                            use tower::ServiceExt as _;
                            app.oneshot(req.map(Body::new)).await
                        }
                    },
                );
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(head_timeout)
                    .max_buf_size(max_head.max(8192));
                match tls {
                    None => {
                        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                        let _ = watcher.watch(conn).await;
                    }
                    Some(acceptor) => {
                        // The handshake shares the header deadline: a client that stalls in
                        // it holds a connection no longer than one that stalls in its headers.
                        let stream = match tokio::time::timeout(head_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed.");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer, "TLS handshake timed out.");
                                return;
                            }
                        };
                        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                        let _ = watcher.watch(conn).await;
                    }
                }
            });
        };
        let Some(mut successor) = handed else {
            break 'serve;
        };
        // Not accepting any more (connections wait in the backlog for the successor). From
        // here on, answers close their connections and no session is created here; the
        // standalone streams end before the snapshot, so their event numbers stay ours.
        relay.set_retiring(true);
        front.end_streams();
        let sessions = match serde_json::to_vec(&HandedOver {
            format: HANDED_OVER_FORMAT,
            generation: upgrade::generation(),
            started_from: upgrade::started_from(),
            sessions: front.snapshot(),
        }) {
            Ok(b) => Ok(b),
            Err(e) => Err(format!("the sessions could not be written: {e}")),
        };
        let pid = successor.pid();
        let handed = match sessions {
            Ok(blob) => successor
                .hand(&blob, Duration::from_secs(10))
                .await
                .map_err(|e| format!("the new process did not take the sessions over: {e}")),
            Err(e) => Err(e),
        };
        if let Err(why) = handed {
            // Killed and reaped; this process takes its sessions back and accepts again.
            drop(successor);
            relay.set_retiring(false);
            relay.upgrade_not_done("rolled_back", &why, None);
            continue 'serve;
        }
        // Also from here (so NotifyAccess=main works too).
        upgrade::http::sd_notify(&format!("MAINPID={pid}"));
        tracing::info!(
            pid,
            "Handed over to the new process; finishing the requests in flight, then exiting."
        );
        drop(listener);
        // Requests in flight, and those clients send on connections they already have,
        // are answered here with `Connection: close`, so each client's next connection
        // reaches the successor; connections still open after a grace period are closed.
        front.end_listens().await;
        let limit = relay.config().relay.request_timeout + Duration::from_secs(5);
        let until = tokio::time::Instant::now() + limit;
        let grace = tokio::time::Instant::now() + Duration::from_secs(2);
        while relay.metrics.open_connections() > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout_at(until, graceful.shutdown()).await;
        front.close_all().await;
        return Ok(());
    }
    // Stop accepting, end every session (their streams close and their requests are
    // cancelled), then give connections a bounded time to finish writing.
    drop(listener);
    front.close_all().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// Idle sessions and full rate-limit buckets of past peers are dropped periodically.
fn spawn_housekeeping(front: Arc<Front>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let every = front
                .settings()
                .relay
                .session_idle_timeout
                .map_or(Duration::from_secs(30), |t| t / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(30));
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => break,
            }
            front.reap_idle().await;
            front.limiters.prune();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_origin_rules() {
        let listen: SocketAddr = "127.0.0.1:7800"
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        assert!(host_allowed("localhost:7800", &[], listen));
        assert!(host_allowed("127.0.0.1", &[], listen));
        assert!(host_allowed("[::1]:9", &[], listen));
        assert!(!host_allowed("evil.example:7800", &[], listen));
        assert!(host_allowed(
            "relay.corp:443",
            &["relay.corp".into()],
            listen
        ));
        assert!(origin_allowed("http://localhost:3000", &[]));
        assert!(!origin_allowed("http://evil.example", &[]));
        assert!(origin_allowed(
            "https://app.corp",
            &["https://app.corp".into()]
        ));
    }
}
