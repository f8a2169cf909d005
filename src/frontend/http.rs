//! The Streamable HTTP front (`POST`/`GET`/`DELETE` on one endpoint), per the MCP spec:
//! sessions with random `Mcp-Session-Id`s, JSON or SSE answers, a priming event and `retry`,
//! per-stream event ids with a bounded replay store for `Last-Event-ID`, `Origin` and `Host`
//! checks against DNS rebinding, `MCP-Protocol-Version` validation and a body size limit.

use crate::error::RpcError;
use crate::protocol::{self, Kind, Message};
use crate::router::Relay;
use crate::session::Session;
use crate::sync::lock;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    listen: SocketAddr,
}

struct HttpSession {
    session: Arc<Session>,
    streams: Mutex<Streams>,
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
            listen,
        })
    }

    /// The relay settings now in force (a config reload may change them).
    fn settings(&self) -> Arc<crate::config::Config> {
        self.relay.config()
    }

    fn session(&self, headers: &HeaderMap) -> Result<Arc<HttpSession>, Reject> {
        let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                protocol::code::INVALID_REQUEST,
                "missing Mcp-Session-Id header; send initialize first",
            ));
        };
        lock(&self.sessions).get(id).cloned().ok_or_else(|| {
            reject(
                StatusCode::NOT_FOUND,
                protocol::code::INVALID_REQUEST,
                "unknown or ended session; initialize a new one",
            )
        })
    }

    fn create_session(self: &Arc<Self>) -> Arc<HttpSession> {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let session = self.relay.open_session(Session::random_id(), tx);
        let hs = Arc::new(HttpSession {
            session,
            streams: Mutex::new(Streams::default()),
        });
        // Stream 0 is the standalone (GET) stream; it buffers until a GET attaches.
        let k = hs.new_stream();
        let weak = Arc::downgrade(&hs);
        let cap = self.settings().relay.replay_events;
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
        lock(&self.sessions).insert(hs.session.id.clone(), hs.clone());
        hs
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
        Ok(s)
    }

    /// Closes every session (on shutdown), ending their streams.
    pub async fn close_all(&self) {
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

async fn handle_post(State(front): State<Arc<Front>>, headers: HeaderMap, body: Body) -> Response {
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
        return handle_batch(&front, &headers, &body).await;
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
    if msg.method() == protocol::method::INITIALIZE && msg.kind() == Kind::Request {
        let hs = front.create_session();
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
    let hs = match front.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
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

async fn handle_batch(front: &Arc<Front>, headers: &HeaderMap, body: &[u8]) -> Response {
    let items: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                RpcError::Parse(e.to_string()).to_response("null"),
            );
        }
    };
    let hs = match front.session(headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
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

async fn handle_get(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    let retry = match front.check_origin(&headers) {
        Ok(cfg) => cfg.relay.sse_retry_ms,
        Err(r) => return r.into_response(),
    };
    if !accepts_sse(&headers) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            protocol::code::INVALID_REQUEST,
            "GET needs Accept: text/event-stream",
        );
    }
    let hs = match front.session(&headers) {
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

async fn handle_delete(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    if let Err(r) = front.check_origin(&headers) {
        return r.into_response();
    }
    let hs = match front.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    lock(&front.sessions).remove(&hs.session.id);
    front.relay.close_session(&hs.session).await;
    {
        let mut st = lock(&hs.streams);
        for buf in st.map.values_mut() {
            buf.live = None;
        }
    }
    StatusCode::OK.into_response()
}

/// `GET /healthz`: the process serves HTTP.
async fn handle_health() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// `GET /readyz`: 200 while every `required` server is up, else 503 naming those that are
/// not (names and states only).
async fn handle_ready(State(front): State<Arc<Front>>) -> Response {
    let unready = front.relay.unready();
    let waiting: Vec<serde_json::Value> = unready
        .iter()
        .map(|(server, state)| serde_json::json!({"server": server, "state": state}))
        .collect();
    let code = if waiting.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"ready": waiting.is_empty(), "waitingFor": waiting});
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The axum router: the MCP endpoint at `/mcp`, `/healthz` and `/readyz`.
pub fn router(front: Arc<Front>) -> Router {
    Router::new()
        .route(
            "/mcp",
            post(handle_post).get(handle_get).delete(handle_delete),
        )
        .route("/healthz", axum::routing::get(handle_health))
        .route("/readyz", axum::routing::get(handle_ready))
        .with_state(front)
}

/// Serves HTTP on `listener` until `shutdown` fires.
pub async fn serve(
    relay: Arc<Relay>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listen = listener.local_addr()?;
    let front = Front::new(relay, listen);
    let app = router(front.clone());
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stop = shutdown.clone();
    let closer = front.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.cancelled().await;
        closer.close_all().await;
    });
    server.await
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
