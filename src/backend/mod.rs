//! Backends: one MCP server each, reached over a transport (stdio child, Streamable HTTP,
//! legacy HTTP+SSE), with the relay acting as a full MCP client toward it.
//!
//! A [`Backend`] owns its connection, the table of requests in flight on it (relay-side ids,
//! progress tokens, the client context each belongs to), its capabilities and its lists. It
//! restarts its connection with backoff when it drops. It never decides what a client sees:
//! list changes go to the [`Hub`] (the relay), which rebuilds the catalog.

pub mod http;
pub mod isolation;
pub mod keeper;
pub mod mrtr;
pub mod sse;
pub mod stdio;
pub mod tls;
pub mod ws;

use crate::catalog::{self, Lists};
use crate::config::{ServerConfig, TransportConfig};
use crate::protocol::{self, Kind, Message, RawMap, method};
use crate::session::ReqCtx;
use crate::sync::{lock, read, write};
use crate::tasks;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// What the relay offers backends to call back into.
pub trait Hub: Send + Sync + 'static {
    /// A backend's lists changed (or it came up or went down).
    fn lists_changed(&self, server: &str);
    /// `notifications/resources/updated` for a URI; `msg` is the serialized notification.
    fn resource_updated(&self, server: &str, uri: &str, msg: String);
    /// A notification with no session to attribute it to: every session gets it.
    fn broadcast(&self, server: &str, msg: String);
    /// The only live session, when there is exactly one (stdio front) and it may reach
    /// `server`.
    fn sole_session(&self, server: &str) -> Option<ReqCtx>;
    /// The session that created a task (by its exposed id, see [`crate::tasks`]).
    fn task_owner(&self, exposed_task_id: &str) -> Option<ReqCtx>;
    /// The server (re)connected: re-establish what sessions held on it (subscriptions).
    fn connected(&self, server: &str);
}

/// Settings every backend shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shared with the relay, which changes them when the config is reloaded.
    pub limits: Arc<Limits>,
    /// The watchdog that stops stdio servers if the relay dies (see [`keeper`]).
    pub keeper: Option<Arc<keeper::Keeper>>,
    /// Restart, health and wait policy; the relay replaces it on reload.
    pub supervision: Arc<RwLock<crate::config::Supervision>>,
    /// The client capabilities to declare in `initialize` (a JSON object). Backends wait
    /// for it before their handshake: the stdio front knows it only once its one client
    /// has initialized, so that a backend never hears of a capability the client lacks.
    pub client_capabilities: watch::Receiver<Option<String>>,
}

/// Limits that a config reload changes for running backends too.
#[derive(Debug)]
pub struct Limits {
    request_timeout_ms: AtomicU64,
    max_message_bytes: AtomicU64,
}

impl Limits {
    pub fn new(request_timeout: Duration, max_message_bytes: usize) -> Limits {
        let l = Limits {
            request_timeout_ms: AtomicU64::new(0),
            max_message_bytes: AtomicU64::new(0),
        };
        l.set(request_timeout, max_message_bytes);
        l
    }

    pub fn set(&self, request_timeout: Duration, max_message_bytes: usize) {
        let ms = u64::try_from(request_timeout.as_millis()).unwrap_or(u64::MAX);
        self.request_timeout_ms.store(ms, Ordering::Relaxed);
        let max = u64::try_from(max_message_bytes).unwrap_or(u64::MAX);
        self.max_message_bytes.store(max, Ordering::Relaxed);
    }
}

impl Settings {
    pub fn supervision(&self) -> crate::config::Supervision {
        *read(&self.supervision)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn max_message_bytes(&self) -> usize {
        usize::try_from(self.limits.max_message_bytes.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }
}

/// A backend's visible state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    /// Connected, but health pings went unanswered (`misses` in a row); requests still go.
    Degraded {
        misses: u32,
    },
    /// The server refused our credentials (HTTP 401/403): retrying cannot help until they
    /// change (reload the config or restart the server).
    NeedsAuth(String),
    /// The connection dropped; another attempt follows.
    Restarting {
        attempt: u32,
        last_error: String,
    },
    /// Gave up (restart limit); holds the last error.
    Failed(String),
    Stopped,
}

impl State {
    /// Connected and serving (ready, or degraded but still answering requests).
    pub fn is_up(&self) -> bool {
        matches!(self, State::Ready | State::Degraded { .. })
    }

    pub fn label(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Degraded { .. } => "degraded",
            State::NeedsAuth(_) => "needs-auth",
            State::Restarting { .. } => "restarting",
            State::Failed(_) => "failed",
            State::Stopped => "stopped",
        }
    }
}

/// Why a request to a backend failed; messages name the server and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("server `{server}` is not available ({state}): {reason}")]
    Unavailable {
        server: String,
        state: &'static str,
        reason: String,
    },
    #[error(
        "server `{server}` did not answer `{method}` within {ms} ms; the request was cancelled"
    )]
    Timeout {
        server: String,
        method: String,
        ms: u128,
    },
    #[error("server `{server}` stopped while handling `{method}`: {reason}")]
    Lost {
        server: String,
        method: String,
        reason: String,
    },
    #[error("the request was cancelled by the client")]
    Cancelled,
    /// A server's `input_required` could not be bridged to the client.
    #[error(
        "server `{server}` needs input for `{method}` that the client could not give: {reason}"
    )]
    Input {
        server: String,
        method: String,
        reason: String,
    },
    #[error(
        "server `{server}` is busy: {in_flight} requests in flight and {queued} waiting (its maxInFlight/maxQueued); retry later"
    )]
    Busy {
        server: String,
        in_flight: usize,
        queued: usize,
    },
}

/// A stdio server handed from one image of the relay to the next (an in-place upgrade).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Adopted {
    pub name: String,
    pub stdio: stdio::Handover,
    pub info: Info,
    /// The next request id toward it (answers to ids sent before the upgrade are dropped).
    pub next_id: u64,
    pub restarts: u64,
    /// Its lists, so the next image's catalog is whole from its first moment.
    #[serde(default)]
    pub lists: CarriedLists,
    /// What it was started as ([`launch_fingerprint`]): the next image adopts it only if
    /// its config still says the same.
    #[serde(default)]
    pub fingerprint: String,
    /// A server of the stateless era: its open `subscriptions/listen` request (cancelled
    /// by the next image, which opens its own) and the resources it asks about.
    #[serde(default)]
    pub listening: Option<String>,
    #[serde(default)]
    pub listened: std::collections::BTreeSet<String>,
    /// Client requests waiting for its answers.
    #[serde(default)]
    pub calls: Vec<CarriedCall>,
}

/// A digest of how a stdio server is started (command, arguments, environment, directory);
/// empty for other transports. Values never leave the process: only the digest does.
pub fn launch_fingerprint(t: &TransportConfig) -> String {
    use sha2::Digest as _;
    match t {
        TransportConfig::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let text = serde_json::json!([command, args, env, cwd]).to_string();
            let digest = sha2::Sha256::digest(text.as_bytes());
            digest.iter().map(|b| format!("{b:02x}")).collect()
        }
        _ => String::new(),
    }
}

/// A backend's lists in the upgrade state: `(key, item)` per list.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CarriedLists {
    pub tools: Vec<(String, Box<RawValue>)>,
    pub prompts: Vec<(String, Box<RawValue>)>,
    pub resources: Vec<(String, Box<RawValue>)>,
    pub templates: Vec<(String, Box<RawValue>)>,
}

impl CarriedLists {
    pub fn from_lists(l: &Lists) -> CarriedLists {
        let out = |items: &[catalog::Item]| {
            items
                .iter()
                .map(|i| (i.key.clone(), protocol::raw(i.raw.get())))
                .collect()
        };
        CarriedLists {
            tools: out(&l.tools),
            prompts: out(&l.prompts),
            resources: out(&l.resources),
            templates: out(&l.templates),
        }
    }

    pub fn into_lists(self) -> Lists {
        let back = |items: Vec<(String, Box<RawValue>)>| {
            items
                .into_iter()
                .map(|(key, raw)| catalog::Item {
                    key,
                    raw: Arc::from(raw),
                })
                .collect()
        };
        Lists {
            tools: back(self.tools),
            prompts: back(self.prompts),
            resources: back(self.resources),
            templates: back(self.templates),
        }
    }
}

/// What `initialize` told us about the server (carried across an in-place upgrade, so an
/// adopted server is not initialized twice).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Info {
    pub protocol_version: String,
    pub capabilities: Option<Box<RawValue>>,
    pub server_info: Option<Box<RawValue>>,
    pub instructions: Option<String>,
    /// The server speaks both eras on this connection (it answered `server/discover` and
    /// then `initialize`): each client request goes in its client's era.
    #[serde(default)]
    pub dual: bool,
}

impl Info {
    /// What the server says about itself (`serverInfo` title and description, the start of
    /// its instructions), for ranking its tools.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(si) = self
            .server_info
            .as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s.get()).ok())
        {
            for key in ["title", "description"] {
                if let Some(t) = si.get(key).and_then(|v| v.as_str()) {
                    out.push_str(t);
                    out.push(' ');
                }
            }
        }
        if let Some(i) = &self.instructions {
            out.push_str(crate::selection::truncate(i, 500));
        }
        out
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities
            .as_deref()
            .and_then(|c| RawMap::parse(c.get()).ok())
            .is_some_and(|m| m.get(capability).is_some_and(|v| v.get() != "null"))
    }
}

type Reply = Result<Message, String>;

/// How an exchange with a backend ended without a reply.
enum Failure {
    Lost(String),
    /// The request never reached the server (no connection): safe to send once more when
    /// the server is back, whatever `retryOnReconnect` says.
    Undelivered(String),
    Timeout,
    Cancelled,
}

/// Abandons a request whose caller went away (e.g. its client disconnected): the entry
/// leaves the pending table and the server is told with `notifications/cancelled`.
struct AbandonOnDrop(Option<(Arc<Backend>, u64)>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some((b, id)) = self.0.take()
            && b.is_pending(id)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { b.abandon(id, "the client went away").await });
        }
    }
}

struct Pending {
    tx: oneshot::Sender<Reply>,
    ctx: Option<ReqCtx>,
    /// The client's own progress token, restored on the way back.
    progress: Option<Box<RawValue>>,
    /// A client request whose answer is the server's, unchanged (see [`CarriedCall`]):
    /// its method and deadline.
    call: Option<(String, tokio::time::Instant)>,
}

/// A client's request still waiting for a stdio server's answer when an in-place upgrade
/// executes the next image, which answers it: the server's answer goes to the client
/// as it is, under the client's id (only calls whose answer the relay passes on unchanged:
/// those of [`mrtr::METHODS`] without a task).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CarriedCall {
    /// The id the relay gave it toward the server.
    pub id: u64,
    /// The client's id (raw JSON) and the session it belongs to.
    pub request: String,
    pub session: String,
    pub method: String,
    /// The client's progress token (raw JSON), if it asked for progress.
    pub progress: Option<Box<RawValue>>,
    /// What is left of its `requestTimeoutMs`.
    pub remaining_ms: u64,
}

/// A call is carried only with this much of its timeout left: the old image's own timeout
/// must not fire between the hand-over and the exec (the output flush takes up to 5 s).
const CARRY_MARGIN: Duration = Duration::from_secs(12);

/// A live connection, one variant per transport.
#[derive(Clone)]
pub(crate) enum Conn {
    Stdio(Arc<stdio::Stdio>),
    Http(Arc<http::Http>),
    Sse(Arc<sse::Sse>),
    Ws(Arc<ws::Ws>),
}

/// Why a message was not handed over, or its answer not read.
#[derive(Debug)]
pub struct SendError {
    pub reason: String,
    /// The server cannot have seen the message (it could not even be connected to).
    pub undelivered: bool,
}

impl SendError {
    pub(crate) fn undelivered(reason: String) -> SendError {
        SendError {
            reason,
            undelivered: true,
        }
    }
}

impl From<String> for SendError {
    /// A failure after the message may have reached the server.
    fn from(reason: String) -> SendError {
        SendError {
            reason,
            undelivered: false,
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Conn {
    async fn send(
        &self,
        b: &Arc<Backend>,
        msg: String,
        related: Option<ReqCtx>,
        expect: Option<u64>,
    ) -> Result<(), SendError> {
        match self {
            Conn::Stdio(s) => {
                let msg = match b.modern_for(related.as_ref(), &msg) {
                    true => b
                        .modernize(&msg, related.as_ref())
                        .map_or(msg, |(m, _, _)| m),
                    false => msg,
                };
                Ok(s.send(msg)?)
            }
            Conn::Http(h) => h.send(b, msg, related, expect).await,
            Conn::Sse(s) => Ok(s.send(msg).await?),
            Conn::Ws(w) => Ok(w.send(msg)?),
        }
    }

    fn closed(&self) -> CancellationToken {
        match self {
            Conn::Stdio(s) => s.closed.clone(),
            Conn::Http(h) => h.closed.clone(),
            Conn::Sse(s) => s.closed.clone(),
            Conn::Ws(w) => w.closed.clone(),
        }
    }

    async fn shutdown(&self) {
        match self {
            Conn::Stdio(s) => s.shutdown(Duration::from_secs(2)).await,
            Conn::Http(h) => h.shutdown().await,
            Conn::Sse(s) => s.closed.cancel(),
            Conn::Ws(w) => {
                w.shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(2), w.closed.cancelled()).await;
                w.closed.cancel();
            }
        }
    }
}

/// One backend server.
pub struct Backend {
    pub name: String,
    pub config: ServerConfig,
    settings: Settings,
    hub: Arc<dyn Hub>,
    state: watch::Sender<State>,
    conn: RwLock<Option<Conn>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    lists: RwLock<Lists>,
    info: RwLock<Info>,
    stop: CancellationToken,
    reinit: tokio::sync::Mutex<()>,
    restarts: AtomicU64,
    /// Set by a transport that got HTTP 401/403 during a start.
    auth_failed: std::sync::atomic::AtomicBool,
    /// Backpressure: one permit per request in flight (`maxInFlight`).
    slots: tokio::sync::Semaphore,
    /// Requests waiting for a slot (at most `maxQueued`).
    queued: std::sync::atomic::AtomicUsize,
    /// The `server/discover` probe of a connection is out.
    probing: std::sync::atomic::AtomicBool,
    /// For a server of the stateless era: the resources its `subscriptions/listen` stream
    /// asks about (the era has no `resources/subscribe`), and the signal to open the stream
    /// again when they change.
    listened: Mutex<std::collections::BTreeSet<String>>,
    pub(crate) relisten: tokio::sync::Notify,
    /// A stdio server of the stateless era: the id of the listen request open on its pipe.
    listening: Mutex<Option<String>>,
    /// In an upgraded image: calls the previous image carried, until the session resumes
    /// them.
    carried_calls: Mutex<Vec<(CarriedCall, oneshot::Receiver<Reply>)>>,
}

/// Gives a queue place back when a waiting request is served or goes away.
struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Client capabilities the relay can route, declared to backends when the clients are not
/// known in advance (the HTTP front: any session may have them; a request for one its
/// client lacks is refused with a clear error).
pub const RELAY_CLIENT_CAPABILITIES: &str =
    r#"{"roots":{"listChanged":true},"sampling":{},"elicitation":{"form":{},"url":{}}}"#;

/// The client capabilities the relay declares in `_meta` to a server of the stateless era
/// for its own requests (lists, probes, listen streams), which no client could answer.
/// A client's request carries that client's routable capabilities instead.
pub const MODERN_CLIENT_CAPABILITIES: &str = "{}";

/// The routable client capabilities (roots, sampling, elicitation) of one client, as that
/// client declared them: what a backend serving only that client may be told.
pub fn routable_capabilities(client: Option<&RawValue>) -> String {
    let Some(caps) = client.and_then(|c| RawMap::parse(c.get()).ok()) else {
        return "{}".to_owned();
    };
    let mut out = RawMap::default();
    for key in ["roots", "sampling", "elicitation"] {
        if let Some(v) = caps.get(key).filter(|v| v.get() != "null") {
            out.set_raw(key, protocol::raw(v.get()));
        }
    }
    out.to_raw().get().to_owned()
}

impl Backend {
    /// Creates the backend and starts connecting in the background.
    pub fn start(config: ServerConfig, settings: Settings, hub: Arc<dyn Hub>) -> Arc<Backend> {
        let b = Backend::new(config, settings, hub);
        tokio::spawn(b.clone().supervise(None));
        b
    }

    /// Creates the backend around a stdio server the previous image of the relay handed
    /// over (an in-place upgrade): the same process, its pipes and what its `initialize`
    /// said; only its lists are read again. If it has died meanwhile, it restarts as usual.
    pub fn adopt(
        config: ServerConfig,
        settings: Settings,
        hub: Arc<dyn Hub>,
        carried: Adopted,
    ) -> Arc<Backend> {
        let b = Backend::new(config, settings, hub);
        *write(&b.info) = carried.info;
        *write(&b.lists) = carried.lists.into_lists();
        *lock(&b.listening) = carried.listening;
        *lock(&b.listened) = carried.listened;
        b.expect_calls(carried.calls);
        // Far past what the previous image used: a late answer to one of its requests
        // (a health ping) can never match a request of this image.
        b.next_id
            .store(carried.next_id.saturating_add(1 << 20), Ordering::Relaxed);
        b.restarts.store(carried.restarts, Ordering::Relaxed);
        let pid = carried.stdio.pid;
        let first = match stdio::Stdio::adopt(&b, carried.stdio) {
            Ok(s) => {
                let conn = Conn::Stdio(s);
                // Initialized and listed already: ready from the first moment.
                *write(&b.conn) = Some(conn.clone());
                b.state.send_replace(State::Ready);
                Some(conn)
            }
            Err(e) => {
                tracing::error!(server = %b.name, error = %e, "Cannot adopt the handed-over server; starting it afresh.");
                // The calls it carried cannot be answered: they fail at once.
                let carried: Vec<u64> = lock(&b.carried_calls).iter().map(|(c, _)| c.id).collect();
                let mut pending = lock(&b.pending);
                for id in carried {
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.tx.send(Err(format!(
                            "the upgraded relay could not adopt the server: {e}"
                        )));
                    }
                }
                drop(pending);
                stdio::stop_adopted(pid, b.settings.keeper.clone());
                None
            }
        };
        tokio::spawn(b.clone().supervise(first));
        b
    }

    /// Creates the backend with the lists the previous image had (an in-place upgrade of a
    /// remote server: it reconnects, and its items stay listed meanwhile).
    pub fn start_seeded(
        config: ServerConfig,
        settings: Settings,
        hub: Arc<dyn Hub>,
        lists: CarriedLists,
    ) -> Arc<Backend> {
        let b = Backend::new(config, settings, hub);
        *write(&b.lists) = lists.into_lists();
        tokio::spawn(b.clone().supervise(None));
        b
    }

    /// This server's lists as an upgrade carries them.
    pub fn carried_lists(&self) -> CarriedLists {
        CarriedLists::from_lists(&self.lists())
    }

    /// Hands this stdio server over to the next image of the relay (see [`Backend::adopt`]):
    /// its output is read up to a message boundary and its pipes are kept open across exec.
    /// `None` for a server with nothing to hand over (not a connected stdio server).
    pub async fn hand_over(&self) -> Option<Result<Adopted, String>> {
        let conn = read(&self.conn).clone();
        let Some(Conn::Stdio(s)) = conn else {
            return None;
        };
        if !self.state().is_up() {
            return None;
        }
        Some(s.hand_over().await.map(|stdio| self.adopted(stdio, true)))
    }

    /// What [`Backend::hand_over`] would carry, without its descriptors (-1): the copy of
    /// the state a new binary checks.
    pub fn preview(&self) -> Option<Adopted> {
        let conn = read(&self.conn).clone();
        let Some(Conn::Stdio(s)) = conn else {
            return None;
        };
        Some(self.adopted(
            stdio::Handover {
                pid: s.pid(),
                stdin: -1,
                stdout: -1,
                stderr: -1,
                unread: Vec::new(),
            },
            // The check reads the state's shape; calls are carried only to a binary whose
            // check says it reads them.
            false,
        ))
    }

    /// This server as the next image adopts it, with `stdio`'s process and pipes.
    fn adopted(&self, stdio: stdio::Handover, with_calls: bool) -> Adopted {
        Adopted {
            name: self.name.clone(),
            stdio,
            info: self.info(),
            next_id: self.next_id.load(Ordering::Relaxed),
            restarts: self.restarts(),
            lists: self.carried_lists(),
            fingerprint: launch_fingerprint(&self.config.transport),
            listening: lock(&self.listening).clone(),
            listened: lock(&self.listened).clone(),
            calls: match with_calls {
                true => self.calls_in_flight(),
                false => Vec::new(),
            },
        }
    }

    /// The client requests of handshake-era sessions waiting for this server's answer
    /// (a stateless request's answer is completed for its era by the relay: not carried).
    fn calls_in_flight(&self) -> Vec<CarriedCall> {
        let now = tokio::time::Instant::now();
        lock(&self.pending)
            .iter()
            .filter_map(|(id, p)| {
                let (method, deadline) = p.call.as_ref()?;
                let ctx = p.ctx.as_ref()?;
                if ctx.session.is_stateless() {
                    return None;
                }
                Some(CarriedCall {
                    id: *id,
                    request: ctx.request.as_deref()?.to_owned(),
                    session: ctx.session.id.clone(),
                    method: method.clone(),
                    progress: p.progress.as_deref().map(|t| protocol::raw(t.get())),
                    remaining_ms: u64::try_from(
                        deadline.saturating_duration_since(now).as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    /// How many requests of `session` wait for this stdio server's answer and could be
    /// carried across an in-place upgrade.
    pub fn carryable(&self, session: &str) -> usize {
        if !self.has_process() {
            return 0;
        }
        let soon = tokio::time::Instant::now() + CARRY_MARGIN;
        lock(&self.pending)
            .values()
            .filter(|p| {
                p.call
                    .as_ref()
                    .is_some_and(|(_, deadline)| *deadline > soon)
                    && p.ctx
                        .as_ref()
                        .is_some_and(|c| c.session.id == session && c.request.is_some())
            })
            .count()
    }

    /// In the next image: the carried calls' answers are awaited (registered before the
    /// server's output is read, so none is missed) until [`Backend::resume_calls`] takes
    /// them over for the restored session.
    fn expect_calls(&self, calls: Vec<CarriedCall>) {
        let mut waiting = Vec::new();
        {
            let mut pending = lock(&self.pending);
            for c in calls {
                let (tx, rx) = oneshot::channel();
                let deadline = tokio::time::Instant::now() + Duration::from_millis(c.remaining_ms);
                pending.insert(
                    c.id,
                    Pending {
                        tx,
                        ctx: None,
                        progress: c.progress.as_deref().map(|t| protocol::raw(t.get())),
                        call: Some((c.method.clone(), deadline)),
                    },
                );
                waiting.push((c, rx));
            }
        }
        *lock(&self.carried_calls) = waiting;
    }

    /// The restored session takes over the carried calls: each gets its answer (the
    /// server's, or an error at its deadline) under the client's id, progress on the way,
    /// and the client's cancellation reaches the server.
    pub fn resume_calls(
        self: &Arc<Self>,
        session: &Arc<crate::session::Session>,
        stream: &crate::session::Outbox,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let calls = std::mem::take(&mut *lock(&self.carried_calls));
        for (c, rx) in calls {
            if c.session != session.id {
                lock(&self.pending).remove(&c.id);
                continue;
            }
            let request: Arc<str> = Arc::from(c.request.as_str());
            let ctx = ReqCtx {
                session: session.clone(),
                stream: stream.clone(),
                request: Some(request.clone()),
            };
            let deadline = match lock(&self.pending).get_mut(&c.id) {
                Some(p) => {
                    p.ctx = Some(ctx);
                    p.call.as_ref().map(|(_, d)| *d)
                }
                // Answered before the session was back: the answer waits in `rx`.
                None => None,
            };
            let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
            let cancel = session.begin(&c.request);
            let me = self.clone();
            let session = session.clone();
            let stream = stream.clone();
            tasks.spawn(async move {
                let id = c.id;
                let answer = tokio::select! {
                    biased;
                    r = rx => match r {
                        Ok(Ok(m)) => Ok(m),
                        Ok(Err(reason)) => Err(Error::Lost {
                            server: me.name.clone(),
                            method: c.method.clone(),
                            reason,
                        }),
                        Err(_) => Err(Error::Lost {
                            server: me.name.clone(),
                            method: c.method.clone(),
                            reason: "the connection closed".to_owned(),
                        }),
                    },
                    () = tokio::time::sleep_until(deadline) => {
                        me.abandon(id, "request timed out in the relay").await;
                        Err(Error::Timeout {
                            server: me.name.clone(),
                            method: c.method.clone(),
                            ms: me.settings.request_timeout().as_millis(),
                        })
                    }
                    () = cancel.cancelled() => {
                        me.abandon(id, "cancelled by the client").await;
                        Err(Error::Cancelled)
                    }
                };
                session.end(&c.request);
                let out = match answer {
                    Ok(reply) => match (reply.result, reply.error) {
                        (Some(r), _) => {
                            let r =
                                crate::tasks::namespace(&me.name, &r, crate::tasks::Shape::Other)
                                    .map_or(r, |(r, _)| r);
                            protocol::response(&request, &r)
                        }
                        (None, Some(e)) => protocol::error_response_raw(&request, &e),
                        (None, None) => protocol::response(&request, &protocol::raw("{}")),
                    },
                    Err(e) => crate::error::RpcError::from(e).to_response(&request),
                };
                let _ = stream.send(out);
            });
        }
    }

    /// The transport of the current connection (`sse` for a Streamable HTTP URL that
    /// turned out to serve the legacy HTTP+SSE transport); `None` when not connected.
    pub fn transport_in_use(&self) -> Option<&'static str> {
        read(&self.conn).as_ref().map(|c| match c {
            Conn::Stdio(_) => "stdio",
            Conn::Http(_) => "http",
            Conn::Sse(_) => "sse",
            Conn::Ws(_) => "ws",
        })
    }

    /// Whether this backend runs a stdio process (its main one) right now.
    pub fn has_process(&self) -> bool {
        matches!(read(&self.conn).as_ref(), Some(Conn::Stdio(_)))
    }

    /// The upgrade was abandoned after [`Backend::hand_over`]: the kept pipes close and the
    /// server's output is read on.
    pub fn take_back(&self, a: Adopted) {
        a.stdio.close_fds();
        if let Some(Conn::Stdio(s)) = read(&self.conn).clone() {
            s.resume(Some(a.stdio.unread));
        }
    }

    fn new(config: ServerConfig, settings: Settings, hub: Arc<dyn Hub>) -> Arc<Backend> {
        let slots = config
            .max_in_flight
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Arc::new(Backend {
            name: config.name.clone(),
            config,
            settings,
            hub,
            state: watch::Sender::new(State::Starting),
            conn: RwLock::new(None),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            lists: RwLock::new(Lists::default()),
            info: RwLock::new(Info::default()),
            stop: CancellationToken::new(),
            reinit: tokio::sync::Mutex::new(()),
            restarts: AtomicU64::new(0),
            auth_failed: std::sync::atomic::AtomicBool::new(false),
            slots: tokio::sync::Semaphore::new(slots),
            queued: std::sync::atomic::AtomicUsize::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            listened: Mutex::new(std::collections::BTreeSet::new()),
            relisten: tokio::sync::Notify::new(),
            listening: Mutex::new(None),
            carried_calls: Mutex::new(Vec::new()),
        })
    }

    /// This server's supervision: its own settings over the relay's.
    fn policy(&self) -> crate::config::Supervision {
        self.config.supervision.over(self.settings.supervision())
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    pub fn info(&self) -> Info {
        read(&self.info).clone()
    }

    /// Whether the `server/discover` probe is out (it goes with the era's `_meta`).
    pub(crate) fn is_probing(&self) -> bool {
        self.probing.load(Ordering::SeqCst)
    }

    /// Whether this server is spoken to in the stateless era (2026-07-28) only.
    pub fn is_modern(&self) -> bool {
        protocol::modern::VERSIONS.contains(&read(&self.info).protocol_version.as_str())
    }

    /// Whether a message goes to this server in the stateless era: always for a server of
    /// that era only; for one that speaks both, when the message's client speaks it; and
    /// the `server/discover` probe.
    pub(crate) fn modern_for(&self, related: Option<&ReqCtx>, msg: &str) -> bool {
        const DISCOVER: &[u8] = br#""method":"server/discover""#;
        {
            let info = read(&self.info);
            if protocol::modern::VERSIONS.contains(&info.protocol_version.as_str()) {
                return true;
            }
            if info.dual && related.is_some_and(|c| c.session.is_stateless()) {
                // Methods the stateless era removed (a listen session's resources/subscribe)
                // and notifications go through the handshake session.
                return Message::parse_str(msg).is_ok_and(|m| {
                    m.kind() == Kind::Request && !protocol::modern::REMOVED.contains(&m.method())
                });
            }
        }
        let head = &msg.as_bytes()[..msg.len().min(64)];
        self.is_probing() && head.windows(DISCOVER.len()).any(|w| w == DISCOVER)
    }

    /// Whether the server offers resource subscriptions (`resources.subscribe`).
    pub fn offers_resource_subscriptions(&self) -> bool {
        read(&self.info)
            .capabilities
            .as_deref()
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c.get()).ok())
            .is_some_and(|c| {
                c.pointer("/resources/subscribe") == Some(&serde_json::Value::Bool(true))
            })
    }

    /// Subscribes to (or drops) a resource of a server of the stateless era: its
    /// `subscriptions/listen` stream is opened again with the new set.
    pub fn listen_resource(&self, uri: &str, on: bool) {
        let changed = {
            let mut set = lock(&self.listened);
            if on {
                set.insert(uri.to_owned())
            } else {
                set.remove(uri)
            }
        };
        if changed {
            self.relisten.notify_one();
        }
    }

    /// Forgets the resources the listen stream asks about after the server refused the
    /// stream with them; false if there were none.
    pub(crate) fn drop_listened(&self) -> bool {
        let dropped = std::mem::take(&mut *lock(&self.listened));
        if dropped.is_empty() {
            return false;
        }
        tracing::warn!(server = %self.name, resources = dropped.len(), "The server refused subscriptions/listen with the subscribed resources; listening without them (their updates are not announced).");
        true
    }

    /// Replaces the resources the listen stream asks about (subscriptions renewed).
    pub fn listen_resources(&self, uris: std::collections::BTreeSet<String>) {
        let changed = {
            let mut set = lock(&self.listened);
            let changed = *set != uris;
            *set = uris;
            changed
        };
        if changed {
            self.relisten.notify_one();
        }
    }

    /// The `subscriptions/listen` request the relay sends a server of the stateless era:
    /// every list change, and the resources sessions subscribed to.
    pub(crate) fn listen_request(&self, id: &str) -> String {
        let uris: Vec<String> = lock(&self.listened).iter().cloned().collect();
        let mut filter = serde_json::json!({
            "toolsListChanged": true,
            "promptsListChanged": true,
            "resourcesListChanged": true,
        });
        if !uris.is_empty() {
            filter["resourceSubscriptions"] = uris.into();
        }
        protocol::request(
            id,
            protocol::modern::LISTEN,
            Some(&protocol::to_raw(
                &serde_json::json!({ "notifications": filter }),
            )),
        )
    }

    /// A stdio server of the stateless era: its `subscriptions/listen` request, sent again
    /// (the previous one cancelled) whenever the subscribed resources change. Ids carry a
    /// random part, so an image that adopted the server never reuses an open one.
    fn listen_stdio(self: &Arc<Self>, closed: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let nonce: u32 = rand::random();
            let mut n = 0u64;
            loop {
                let open = lock(&me.listening).take();
                if let Some(old) = open {
                    let params =
                        format!(r#"{{"requestId":{old},"reason":"subscriptions changed"}}"#);
                    let note =
                        protocol::notification(method::CANCELLED, Some(&protocol::raw(&params)));
                    if me.send_raw(note, None, None).await.is_err() {
                        return;
                    }
                }
                n += 1;
                let id = format!("\"relay-listen-{nonce:08x}-{n}\"");
                *lock(&me.listening) = Some(id.clone());
                if me
                    .send_raw(me.listen_request(&id), None, None)
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    () = me.relisten.notified() => {}
                    () = closed.cancelled() => return,
                    () = me.stop.cancelled() => return,
                }
            }
        });
    }

    /// `msg` as a server of the stateless era receives it: `_meta` with the protocol
    /// version, the capabilities of the request's client that the relay can route (so an
    /// `input_required` can reach it, or be bridged to it), the relay's identity and the
    /// session's log level. Also the method and name, for HTTP headers. `None` for a
    /// response, which goes as it is.
    pub(crate) fn modernize(
        &self,
        msg: &str,
        related: Option<&ReqCtx>,
    ) -> Option<(String, String, Option<String>)> {
        let (level, caps) = match related {
            Some(c) => {
                let st = c.session.state();
                (
                    st.log_level.clone(),
                    routable_capabilities(st.client_capabilities.as_deref()),
                )
            }
            None => (None, MODERN_CLIENT_CAPABILITIES.to_owned()),
        };
        protocol::modern::attach(msg, &caps, level.as_deref())
    }

    /// The negotiated protocol version as a header value (none before the handshake).
    pub(crate) fn protocol_version(&self) -> Option<reqwest::header::HeaderValue> {
        let info = read(&self.info);
        if info.protocol_version.is_empty() {
            return None;
        }
        reqwest::header::HeaderValue::from_str(&info.protocol_version).ok()
    }

    pub fn lists(&self) -> Lists {
        read(&self.lists).clone()
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The process id of a running stdio server.
    pub fn pid(&self) -> Option<i32> {
        match read(&self.conn).as_ref() {
            Some(Conn::Stdio(s)) => Some(s.pid()),
            _ => None,
        }
    }

    /// Requests sent to the server and not answered yet.
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Tools the server lists now.
    pub fn tool_count(&self) -> usize {
        read(&self.lists).tools.len()
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A transport got HTTP 401/403: the start fails as `needs-auth`, without retries.
    pub(crate) fn note_auth_failure(&self) {
        self.auth_failed.store(true, Ordering::Relaxed);
    }

    /// Waits until the backend is past `starting`, or `deadline` passes.
    pub async fn settled(&self, deadline: tokio::time::Instant) {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout_at(deadline, rx.wait_for(|s| *s != State::Starting)).await;
    }

    /// Stops the backend: its connection closes and its children exit.
    pub async fn stop(&self) {
        self.stop.cancel();
        let conn = write(&self.conn).take();
        if let Some(c) = conn {
            c.shutdown().await;
        }
        self.fail_all("the relay is stopping this server");
        self.state.send_replace(State::Stopped);
    }

    /// Keeps the server up: `adopted` is a stdio server handed over by an upgrade, taken
    /// as the first connection instead of starting one.
    async fn supervise(self: Arc<Self>, mut adopted: Option<Conn>) {
        let mut starts: VecDeque<Instant> = VecDeque::new();
        let mut backoff = self.policy().backoff;
        loop {
            let policy = self.policy();
            starts.push_back(Instant::now());
            while starts.len() > policy.start_limit_burst {
                starts.pop_front();
            }
            self.auth_failed.store(false, Ordering::Relaxed);
            let outcome = match adopted.take() {
                Some(h) => tokio::select! {
                    r = self.resume(h) => r,
                    () = self.stop.cancelled() => return,
                },
                None => tokio::select! {
                    r = self.connect() => r,
                    () = self.stop.cancelled() => return,
                },
            };
            let reason = match outcome {
                Ok(conn) => {
                    backoff = policy.backoff;
                    // The catalog must hold our lists before anyone sees us ready.
                    self.hub.lists_changed(&self.name);
                    self.state.send_replace(State::Ready);
                    tracing::info!(server = %self.name, "Backend ready.");
                    self.hub.connected(&self.name);
                    let closed = conn.closed();
                    let hung = tokio::select! {
                        () = closed.cancelled() => None,
                        h = self.health(&closed) => h,
                        () = self.stop.cancelled() => return,
                    };
                    let reason = match (&conn, hung) {
                        (_, Some(h)) => h,
                        (Conn::Stdio(s), None) => s.exit_reason(),
                        (Conn::Sse(_), None) => "the SSE connection closed".to_owned(),
                        (Conn::Http(_), None) => "the connection closed".to_owned(),
                        (Conn::Ws(_), None) => "the WebSocket connection closed".to_owned(),
                    };
                    // From now on requests wait for the restart (bounded by
                    // `restartWaitMs`); the server's items stay listed meanwhile, so a
                    // restart that brings back the same catalog changes nothing for clients.
                    self.state.send_replace(State::Restarting {
                        attempt: u32::try_from(self.restarts() + 1).unwrap_or(u32::MAX),
                        last_error: reason.clone(),
                    });
                    let taken = write(&self.conn).take();
                    self.fail_all(&reason);
                    if let Some(c) = taken {
                        // A hung process is still there: stop it (its group too).
                        c.shutdown().await;
                    }
                    reason
                }
                Err(reason) => {
                    let conn = write(&self.conn).take();
                    if let Some(c) = conn {
                        c.shutdown().await;
                    }
                    self.fail_all(&reason);
                    reason
                }
            };
            if self.stop.is_cancelled() {
                return;
            }
            if self.auth_failed.load(Ordering::Relaxed) {
                tracing::error!(server = %self.name, error = %reason, "Backend refused our credentials; not retrying until reload or restart.");
                self.state.send_replace(State::NeedsAuth(reason));
                self.forget_lists();
                return;
            }
            let burst = starts.len() >= policy.start_limit_burst
                && starts
                    .front()
                    .is_some_and(|t| t.elapsed() < policy.start_limit_interval);
            if burst {
                tracing::error!(server = %self.name, error = %reason, "Backend failed too often; giving up until reload.");
                self.state.send_replace(State::Failed(reason));
                self.forget_lists();
                return;
            }
            let attempt = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(server = %self.name, error = %reason, attempt, "Backend down; restarting.");
            self.state.send_replace(State::Restarting {
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                last_error: reason,
            });
            let jitter = Duration::from_millis(rand::random::<u64>() % 100);
            tokio::select! {
                () = tokio::time::sleep(backoff + jitter) => {},
                () = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(policy.backoff_max.max(policy.backoff));
        }
    }

    /// A server that gave up: its items leave the catalog.
    fn forget_lists(&self) {
        *write(&self.lists) = Lists::default();
        self.hub.lists_changed(&self.name);
    }

    /// Pings the server every `healthIntervalMs` while it is connected: a miss makes it
    /// `degraded`, an answer `ready` again, `healthMisses` misses in a row mean it is hung.
    /// Returns the reason when it is hung (never, while pings are off or answered).
    async fn health(self: &Arc<Self>, closed: &CancellationToken) -> Option<String> {
        let mut misses = 0u32;
        loop {
            let policy = self.policy();
            if policy.health_interval.is_zero() {
                // Off (a reload may turn it on: look again now and then).
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            tokio::time::sleep(policy.health_interval).await;
            if closed.is_cancelled() {
                return None;
            }
            // The stateless era has no `ping`: `server/discover` is as cheap.
            let probe = if self.is_modern() {
                protocol::modern::DISCOVER
            } else {
                method::PING
            };
            let answered = matches!(
                tokio::time::timeout(policy.health_timeout, self.internal(probe, None)).await,
                Ok(Ok(_))
            );
            if answered {
                if misses > 0 {
                    tracing::info!(server = %self.name, "Backend answers pings again.");
                    self.state.send_replace(State::Ready);
                }
                misses = 0;
                continue;
            }
            misses += 1;
            if misses >= policy.health_misses {
                return Some(format!(
                    "the server did not answer {misses} health pings in a row (each within {} ms); treated as hung",
                    policy.health_timeout.as_millis()
                ));
            }
            tracing::warn!(server = %self.name, misses, "Backend missed a health ping.");
            self.state.send_replace(State::Degraded { misses });
        }
    }

    /// Opens the transport, runs the handshake and fetches the lists.
    async fn connect(self: &Arc<Self>) -> Result<Conn, String> {
        let conn = match &self.config.transport {
            TransportConfig::Stdio {
                command,
                args,
                env,
                cwd,
            } => Conn::Stdio(stdio::Stdio::spawn(
                self,
                command,
                args,
                env,
                cwd.as_deref(),
            )?),
            TransportConfig::Http { url, headers } => Conn::Http(http::Http::new(
                url,
                headers,
                self.settings.request_timeout(),
                self.config.ca_file.as_deref(),
            )?),
            TransportConfig::Sse { url, headers } => {
                Conn::Sse(sse::Sse::connect(self, url, headers).await?)
            }
            TransportConfig::Ws { url, headers } => {
                Conn::Ws(ws::Ws::connect(self, url, headers).await?)
            }
        };
        *write(&self.conn) = Some(conn.clone());
        let set_up = self.set_up(conn).await;
        // A URL that refuses Streamable HTTP (HTTP 400, 404 or 405 to its POSTs) may serve
        // the legacy HTTP+SSE transport there: the spec's fallback for clients.
        match (&self.config.transport, set_up) {
            (TransportConfig::Http { url, headers }, Err((e, conn)))
                if self.config.era == crate::config::Era::Auto
                    && ["HTTP 400", "HTTP 404", "HTTP 405"]
                        .iter()
                        .any(|c| e.contains(c)) =>
            {
                conn.shutdown().await;
                tracing::info!(server = %self.name, error = %e, "No Streamable HTTP at this URL; trying the legacy HTTP+SSE transport there.");
                let sse = sse::Sse::open(self, url, headers, true)
                    .await
                    .map_err(|e2| format!("{e}; and as legacy HTTP+SSE: {e2}"))?;
                let conn = Conn::Sse(sse);
                *write(&self.conn) = Some(conn.clone());
                self.set_up(conn).await.map_err(|(e, _)| e)
            }
            (_, r) => r.map_err(|(e, _)| e),
        }
    }

    /// The handshake, the server's listening stream and its lists on a new connection;
    /// on failure the reason and the connection (to close).
    async fn set_up(self: &Arc<Self>, conn: Conn) -> Result<Conn, (String, Conn)> {
        // A server that dies while starting (bad arguments, a crash) fails its start at
        // once, not when the handshake times out.
        let closed = conn.closed();
        let setup = async {
            self.handshake().await?;
            match &conn {
                Conn::Http(h) => {
                    let opened = h.clone().listen(self.clone());
                    let _ = tokio::time::timeout(Duration::from_secs(5), opened).await;
                }
                Conn::Stdio(_) if self.is_modern() => self.listen_stdio(closed.clone()),
                _ => {}
            }
            self.refresh_lists().await;
            Ok::<(), String>(())
        };
        let r = tokio::select! {
            r = setup => r,
            () = closed.cancelled() => Err(match &conn {
                Conn::Stdio(s) => s.exit_reason(),
                _ => "the connection closed during start-up".to_owned(),
            }),
        };
        match r {
            Ok(()) => Ok(conn),
            Err(e) => Err((e, conn)),
        }
    }

    /// Goes on with an adopted stdio server: reads its lists again (the carried ones serve
    /// meanwhile).
    async fn resume(self: &Arc<Self>, conn: Conn) -> Result<Conn, String> {
        let closed = conn.closed();
        tokio::select! {
            () = self.refresh_lists() => {}
            () = closed.cancelled() => {
                return Err(match &conn {
                    Conn::Stdio(s) => s.exit_reason(),
                    _ => "the connection closed".to_owned(),
                });
            }
        }
        // Only stdio servers are adopted.
        if self.is_modern() {
            self.listen_stdio(closed);
        }
        tracing::info!(server = %self.name, "Backend adopted from the previous relay image.");
        Ok(conn)
    }

    /// `server/discover` for a server of the stateless era: `Ok(true)` when it speaks
    /// 2026-07-28 (its answer is recorded as its [`Info`]), `Ok(false)` when it does not.
    async fn discover(self: &Arc<Self>) -> Result<bool, String> {
        let limit = self.settings.request_timeout().min(Duration::from_secs(10));
        self.probing.store(true, Ordering::SeqCst);
        let probed =
            tokio::time::timeout(limit, self.internal(protocol::modern::DISCOVER, None)).await;
        self.probing.store(false, Ordering::SeqCst);
        let modern_only = self.config.era == crate::config::Era::Modern;
        let reply = match probed {
            Ok(Ok(r)) => r,
            // A JSON-RPC error or an HTTP 4xx is the server's answer: not this era. A
            // server that does not answer in time is taken for one of the handshake era.
            Ok(Err(e))
                if !modern_only
                    && (e.starts_with("`server/discover` failed")
                        || e.starts_with("the server answered HTTP 4")) =>
            {
                tracing::debug!(server = %self.name, error = %e, "No `server/discover`: the handshake era.");
                return Ok(false);
            }
            Err(_) if !modern_only => {
                tracing::debug!(server = %self.name, "No answer to `server/discover` in time: the handshake era.");
                return Ok(false);
            }
            // Unreachable (or modern required): the start fails and is retried.
            Ok(Err(e)) => return Err(format!("`server/discover` failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "no answer to `server/discover` within {} ms",
                    limit.as_millis()
                ));
            }
        };
        let result = RawMap::parse(reply.get()).map_err(|e| format!("bad discover result: {e}"))?;
        let speaks = result
            .get("supportedVersions")
            .and_then(|v| serde_json::from_str::<Vec<String>>(v.get()).ok())
            .is_some_and(|v| {
                v.iter()
                    .any(|x| protocol::modern::VERSIONS.contains(&x.as_str()))
            });
        if !speaks {
            return Ok(false);
        }
        // The era puts the server's identity in `_meta` (older drafts: `serverInfo`).
        let server_info = result
            .get("_meta")
            .and_then(|m| RawMap::parse(m.get()).ok())
            .and_then(|m| {
                m.get(protocol::modern::META_SERVER_INFO)
                    .map(|v| protocol::raw(v.get()))
            })
            .or_else(|| result.get("serverInfo").map(|c| protocol::raw(c.get())));
        *write(&self.info) = Info {
            protocol_version: protocol::modern::VERSIONS[0].to_owned(),
            capabilities: result.get("capabilities").map(|c| protocol::raw(c.get())),
            server_info,
            instructions: result.get_str("instructions"),
            dual: false,
        };
        Ok(true)
    }

    /// `initialize` + `notifications/initialized`; for a server whose `era` is `modern` or
    /// `auto`, `server/discover` first. In `auto`, a Streamable HTTP server that speaks
    /// 2026-07-28 is also offered `initialize`: one that accepts it speaks both eras, and
    /// each client's requests then go in that client's era (a stdio connection keeps the
    /// era of its first message, so a stdio server that answers discover is spoken to in
    /// the stateless era only).
    pub(crate) async fn handshake(self: &Arc<Self>) -> Result<(), String> {
        // The era is the new connection's: found again below.
        {
            let mut info = write(&self.info);
            info.protocol_version.clear();
            info.dual = false;
        }
        let conn_is = read(&self.conn)
            .as_ref()
            .map(|c| matches!(c, Conn::Http(_) | Conn::Stdio(_)));
        if self.config.era != crate::config::Era::Legacy && conn_is == Some(true) {
            if self.discover().await? {
                let http = matches!(self.config.transport, TransportConfig::Http { .. });
                if self.config.era == crate::config::Era::Auto && http {
                    // Until it answers, the handshake goes in its own era.
                    let modern = std::mem::take(&mut *write(&self.info));
                    match self.initialize().await {
                        Ok(()) => {
                            write(&self.info).dual = true;
                            tracing::info!(server = %self.name, "Server speaks 2026-07-28 and the initialize handshake: each client in its own era.");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::debug!(server = %self.name, error = %e, "No initialize beside 2026-07-28: the stateless era only.");
                            *write(&self.info) = modern;
                        }
                    }
                }
                tracing::info!(server = %self.name, "Server speaks 2026-07-28: stateless requests.");
                return Ok(());
            }
            if self.config.era == crate::config::Era::Modern {
                return Err(
                    "the server does not speak protocol 2026-07-28 (`era: \"modern\"`); use `auto` or `legacy`"
                        .to_owned(),
                );
            }
        }
        self.initialize().await
    }

    /// The handshake era's `initialize` + `notifications/initialized`.
    async fn initialize(self: &Arc<Self>) -> Result<(), String> {
        let mut known = self.settings.client_capabilities.clone();
        let capabilities = tokio::select! {
            c = known.wait_for(Option::is_some) => match c {
                Ok(c) => c.clone().unwrap_or_default(),
                // The relay is going away; the handshake will not be used.
                Err(_) => RELAY_CLIENT_CAPABILITIES.to_owned(),
            },
            () = self.stop.cancelled() => return Err("the relay is stopping this server".to_owned()),
        };
        let params = format!(
            r#"{{"protocolVersion":"{}","capabilities":{},"clientInfo":{{"name":"mcp-relay","version":"{}"}}}}"#,
            protocol::LATEST_LEGACY,
            capabilities,
            env!("CARGO_PKG_VERSION")
        );
        let reply = self
            .internal(
                method::INITIALIZE,
                Some(RawMap::parse(&params).map_err(|e| e.to_string())?),
            )
            .await?;
        let result =
            RawMap::parse(reply.get()).map_err(|e| format!("bad initialize result: {e}"))?;
        let version = result.get_str("protocolVersion").unwrap_or_default();
        if !protocol::is_supported_version(&version) {
            return Err(format!(
                "the server answered initialize with protocol version `{version}`, which the relay does not speak"
            ));
        }
        // A session-expiry re-initialize keeps the connection's era(s).
        let dual = read(&self.info).dual;
        *write(&self.info) = Info {
            protocol_version: version,
            capabilities: result.get("capabilities").map(|c| protocol::raw(c.get())),
            server_info: result.get("serverInfo").map(|c| protocol::raw(c.get())),
            instructions: result.get_str("instructions"),
            dual,
        };
        self.send_raw(
            protocol::notification(method::INITIALIZED, None),
            None,
            None,
        )
        .await
        .map_err(|e| e.reason)?;
        Ok(())
    }

    /// Re-runs the handshake after the server forgot our session (HTTP 404), once per loss:
    /// waits (bounded) for a re-initialization under way, then runs one only if `still_needed`
    /// says so (it also resets the transport's session). Boxed: the handshake sends through
    /// the transport that calls this.
    pub(crate) fn reinitialize(
        self: &Arc<Self>,
        still_needed: impl FnOnce() -> bool + Send + 'static,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let me = self.clone();
        Box::pin(async move {
            let limit = me.settings.request_timeout();
            let Ok(_guard) = tokio::time::timeout(limit, me.reinit.lock()).await else {
                return Err("re-initialization of the server is stuck".to_owned());
            };
            if !still_needed() {
                return Ok(());
            }
            tracing::info!(server = %me.name, "Backend session expired; re-initializing.");
            // The same era as the connection: only the session is new.
            me.initialize().await
        })
    }

    /// Re-reads every list the server offers and tells the hub.
    /// A stateless-era server's tools whose `x-mcp-header` annotations are invalid are
    /// left out (a client must not call them), with a warning naming the tool.
    fn without_invalid_headers(&self, mut tools: Vec<catalog::Item>) -> Vec<catalog::Item> {
        if !self.is_modern() {
            return tools;
        }
        tools.retain(|t| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(t.raw.get()) else {
                return true;
            };
            match protocol::modern::header_params(&v) {
                Ok(_) => true,
                Err(why) => {
                    tracing::warn!(server = %self.name, tool = %t.key, reason = %why, "Tool left out: invalid x-mcp-header.");
                    false
                }
            }
        });
        tools
    }

    /// The `Mcp-Param-*` headers of a `tools/call` of tool `name` (message `msg`) to a
    /// stateless-era server. Only a tool that annotates arguments costs any parsing.
    pub(crate) fn param_headers(&self, name: &str, msg: &str) -> Vec<(String, String)> {
        let tool = read(&self.lists)
            .tools
            .iter()
            .find(|t| t.key == name && t.raw.get().contains("x-mcp-header"))
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t.raw.get()).ok());
        let mirrored = tool
            .as_ref()
            .and_then(|t| protocol::modern::header_params(t).ok())
            .unwrap_or_default();
        if mirrored.is_empty() {
            return Vec::new();
        }
        let args = Message::parse_str(msg)
            .ok()
            .and_then(|m| m.params_map().ok())
            .and_then(|p| p.get("arguments").map(|a| a.get().to_owned()))
            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok())
            .unwrap_or_default();
        protocol::modern::param_headers(&mirrored, &args)
    }

    pub async fn refresh_lists(self: &Arc<Self>) {
        let info = self.info();
        let mut lists = Lists::default();
        if info.has("tools") {
            let tools = self.list_all(method::TOOLS_LIST, "tools", "name").await;
            lists.tools = self.without_invalid_headers(tools);
        }
        if info.has("prompts") {
            lists.prompts = self.list_all(method::PROMPTS_LIST, "prompts", "name").await;
        }
        if info.has("resources") {
            lists.resources = self
                .list_all(method::RESOURCES_LIST, "resources", "uri")
                .await;
            lists.templates = self
                .list_all(
                    method::RESOURCES_TEMPLATES_LIST,
                    "resourceTemplates",
                    "uriTemplate",
                )
                .await;
        }
        *write(&self.lists) = lists;
    }

    async fn refresh_one(self: &Arc<Self>, which: &str) {
        let items = match which {
            method::TOOLS_CHANGED => {
                let tools = self.list_all(method::TOOLS_LIST, "tools", "name").await;
                self.without_invalid_headers(tools)
            }
            method::PROMPTS_CHANGED => self.list_all(method::PROMPTS_LIST, "prompts", "name").await,
            _ => {
                self.list_all(method::RESOURCES_LIST, "resources", "uri")
                    .await
            }
        };
        let templates = if which == method::RESOURCES_CHANGED {
            Some(
                self.list_all(
                    method::RESOURCES_TEMPLATES_LIST,
                    "resourceTemplates",
                    "uriTemplate",
                )
                .await,
            )
        } else {
            None
        };
        {
            let mut l = write(&self.lists);
            match which {
                method::TOOLS_CHANGED => l.tools = items,
                method::PROMPTS_CHANGED => l.prompts = items,
                _ => {
                    l.resources = items;
                    if let Some(t) = templates {
                        l.templates = t;
                    }
                }
            }
        }
        self.hub.lists_changed(&self.name);
    }

    /// Fetches a whole list, following `nextCursor` (bounded).
    async fn list_all(self: &Arc<Self>, m: &str, field: &str, key: &str) -> Vec<catalog::Item> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let params = cursor.as_ref().map(|c| {
                let mut p = RawMap::default();
                p.set_str("cursor", c);
                p
            });
            let reply = match self.internal(m, params).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(server = %self.name, method = m, error = %e, "Listing failed.");
                    break;
                }
            };
            let Ok(map) = RawMap::parse(reply.get()) else {
                break;
            };
            if let Some(list) = map.get(field) {
                out.extend(catalog::items(list, key));
            }
            match map.get_str("nextCursor") {
                Some(c) if !c.is_empty() => cursor = Some(c),
                _ => break,
            }
        }
        out
    }

    /// A request of the relay's own, with the request timeout; returns the raw result.
    async fn internal(
        self: &Arc<Self>,
        m: &str,
        params: Option<RawMap>,
    ) -> Result<Box<RawValue>, String> {
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout();
        let reply = self
            .exchange(m, params, None, deadline, None)
            .await
            .map_err(|f| match f {
                Failure::Lost(reason) | Failure::Undelivered(reason) => reason,
                Failure::Timeout => format!(
                    "no answer to `{m}` within {} ms",
                    self.settings.request_timeout().as_millis()
                ),
                Failure::Cancelled => "cancelled".to_owned(),
            })?;
        match (reply.result, reply.error) {
            (Some(r), _) => Ok(r),
            (None, Some(e)) => Err(format!("`{m}` failed: {}", e.get())),
            (None, None) => Err(format!("`{m}` got an empty answer")),
        }
    }

    /// Sends a request on the current connection and waits for its reply, until `deadline`
    /// or `cancel`; on either (or if the caller goes away) the server gets
    /// `notifications/cancelled`. A progress token in `params` is replaced by the relay-side
    /// id and restored on the way back to `ctx`. Over HTTP the whole exchange (POST, then its
    /// JSON or SSE answer) runs inside this future: no task per request.
    async fn exchange(
        self: &Arc<Self>,
        m: &str,
        params: Option<RawMap>,
        ctx: Option<ReqCtx>,
        deadline: tokio::time::Instant,
        cancel: Option<&CancellationToken>,
    ) -> Result<Message, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut progress = None;
        let mut has_task = false;
        let body = params.map(|mut p| {
            if let Some(t) = protocol::progress_token(&p) {
                progress = Some(t);
                protocol::set_progress_token(&mut p, protocol::raw(&id.to_string()));
            }
            has_task = p.get("task").is_some();
            p.to_raw()
        });
        // A client request whose answer passes on unchanged can be carried across an
        // in-place upgrade (handshake-era servers: a stateless one's may need bridging).
        let call = (ctx.as_ref().is_some_and(|c| c.request.is_some())
            && mrtr::METHODS.contains(&m)
            && !self.is_modern()
            && !has_task)
            .then(|| (m.to_owned(), deadline));
        let (tx, rx) = oneshot::channel();
        let related = ctx.clone();
        lock(&self.pending).insert(
            id,
            Pending {
                tx,
                ctx,
                progress,
                call,
            },
        );
        let mut guard = AbandonOnDrop(Some((self.clone(), id)));
        let msg = protocol::request(&id.to_string(), m, body.as_deref());
        let wait = async {
            self.send_raw(msg, related, Some(id))
                .await
                .map_err(|e| match e.undelivered {
                    true => Failure::Undelivered(e.reason),
                    false => Failure::Lost(e.reason),
                })?;
            match rx.await {
                Ok(reply) => reply.map_err(Failure::Lost),
                Err(_) => Err(Failure::Lost("the connection closed".to_owned())),
            }
        };
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let outcome = tokio::select! {
            r = wait => r,
            () = tokio::time::sleep_until(deadline) => Err(Failure::Timeout),
            () = cancel.cancelled() => Err(Failure::Cancelled),
        };
        guard.0 = None;
        match &outcome {
            Err(Failure::Timeout) => self.abandon(id, "request timed out in the relay").await,
            Err(Failure::Cancelled) => self.abandon(id, "cancelled by the client").await,
            Err(Failure::Lost(_) | Failure::Undelivered(_)) => {
                lock(&self.pending).remove(&id);
            }
            Ok(_) => {}
        }
        outcome
    }

    pub(crate) async fn send_raw(
        self: &Arc<Self>,
        msg: String,
        related: Option<ReqCtx>,
        expect: Option<u64>,
    ) -> Result<(), SendError> {
        if msg.len() > self.settings.max_message_bytes() {
            return Err(SendError::from(format!(
                "the message is {} bytes, over maxMessageBytes ({})",
                msg.len(),
                self.settings.max_message_bytes()
            )));
        }
        let conn = read(&self.conn).clone();
        match conn {
            Some(c) => c.send(self, msg, related, expect).await,
            None => Err(SendError::undelivered("not connected".to_owned())),
        }
    }

    fn unavailable(&self, state: &State) -> Error {
        let reason = match state {
            State::Restarting {
                attempt,
                last_error,
            } => {
                format!("{last_error} (restart attempt {attempt} under way; retry shortly)")
            }
            State::Failed(e) => format!("{e} (fix the server or its config, then reload)"),
            State::NeedsAuth(e) => format!(
                "{e} (update its credentials, then reload the config or restart the server)"
            ),
            State::Degraded { .. } => "not connected".to_owned(),
            State::Stopped => "the server was stopped".to_owned(),
            State::Starting => "the server is still starting; retry shortly".to_owned(),
            State::Ready => "not connected".to_owned(),
        };
        Error::Unavailable {
            server: self.name.clone(),
            state: state.label(),
            reason,
        }
    }

    /// Forwards a client request: waits for readiness (bounded), remaps the progress token,
    /// and waits for the reply under the request timeout and the client's cancellation. A
    /// server of the stateless era answering `input_required` to a handshake-era client is
    /// bridged: its input requests go to the client as real requests and the call is sent
    /// again with the answers (see [`mrtr`]).
    pub async fn call(
        self: &Arc<Self>,
        m: &str,
        params: RawMap,
        ctx: ReqCtx,
        cancel: &CancellationToken,
    ) -> Result<Message, Error> {
        if !self.is_modern() || ctx.session.is_stateless() || !mrtr::METHODS.contains(&m) {
            return self.call_once(m, params, ctx, cancel).await;
        }
        self.call_bridged(m, params, ctx, cancel).await
    }

    async fn call_once(
        self: &Arc<Self>,
        m: &str,
        params: RawMap,
        ctx: ReqCtx,
        cancel: &CancellationToken,
    ) -> Result<Message, Error> {
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout();
        let state = self.state();
        if state == State::Starting {
            self.settled(deadline).await;
        }
        if matches!(self.state(), State::Restarting { .. }) {
            // A restart under way: wait for it, bounded by `restartWaitMs`.
            let wait = self.policy().restart_wait;
            let until = deadline.min(tokio::time::Instant::now() + wait);
            let mut rx = self.state.subscribe();
            let _ = tokio::time::timeout_at(
                until,
                rx.wait_for(|s| !matches!(s, State::Restarting { .. } | State::Starting)),
            )
            .await;
        }
        let state = self.state();
        if !state.is_up() {
            return Err(self.unavailable(&state));
        }
        // Backpressure: a slot, else a bounded queue, else "busy". One slow server fills
        // only its own slots.
        let _slot = match self.slots.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
                let _place = Queued(&self.queued);
                if waiting >= self.config.max_queued {
                    return Err(Error::Busy {
                        server: self.name.clone(),
                        in_flight: self.config.max_in_flight,
                        queued: waiting,
                    });
                }
                tokio::select! {
                    p = self.slots.acquire() => p.map_err(|_| self.unavailable(&State::Stopped))?,
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(Error::Timeout {
                            server: self.name.clone(),
                            method: m.to_owned(),
                            ms: self.settings.request_timeout().as_millis(),
                        });
                    }
                    () = cancel.cancelled() => return Err(Error::Cancelled),
                }
            }
        };
        let generation = self.restarts();
        let again = (m == method::TOOLS_CALL && self.may_retry(&params)).then(|| params.clone());
        let resend = params.clone();
        let mut out = self
            .exchange(m, Some(params), Some(ctx.clone()), deadline, Some(cancel))
            .await;
        if let Err(Failure::Undelivered(_)) = &out
            && !self.stop.is_cancelled()
        {
            // The server could not be reached, so it never saw the request: wait for the
            // reconnection under way (bounded by `restartWaitMs`) and send it then.
            let until = deadline.min(tokio::time::Instant::now() + self.policy().restart_wait);
            let mut rx = self.state.subscribe();
            let back = tokio::select! {
                r = tokio::time::timeout_at(until, rx.wait_for(|s| {
                    (s.is_up() && self.restarts() > generation)
                        || matches!(s, State::Stopped | State::Failed(_) | State::NeedsAuth(_))
                })) => matches!(r, Ok(Ok(s)) if s.is_up()),
                () = cancel.cancelled() => return Err(Error::Cancelled),
            };
            if back {
                out = self
                    .exchange(m, Some(resend), Some(ctx.clone()), deadline, Some(cancel))
                    .await;
            } else {
                let state = self.state();
                if !state.is_up() {
                    return Err(self.unavailable(&state));
                }
            }
        }
        // Only a failure that a restart explains (the server died or was found hung) is
        // retried; other losses (an HTTP 5xx on a server still up) fail at once.
        let restarting = !self.state().is_up() || self.restarts() != generation;
        if let (Err(Failure::Lost(reason)), Some(params)) = (&out, again)
            && restarting
            && !self.stop.is_cancelled()
        {
            // retryOnReconnect: once more on the restarted server, if it is back in time.
            let until = deadline.min(tokio::time::Instant::now() + self.policy().restart_wait);
            let mut rx = self.state.subscribe();
            let back = tokio::select! {
                r = tokio::time::timeout_at(until, rx.wait_for(|s| {
                    (s.is_up() && self.restarts() > generation)
                        || matches!(s, State::Stopped | State::Failed(_) | State::NeedsAuth(_))
                })) => matches!(r, Ok(Ok(s)) if s.is_up()),
                () = cancel.cancelled() => return Err(Error::Cancelled),
                () = self.stop.cancelled() => false,
            };
            if back {
                tracing::info!(server = %self.name, reason = %reason, "Retrying an interrupted tools/call on the restarted server (retryOnReconnect).");
                out = self
                    .exchange(m, Some(params), Some(ctx), deadline, Some(cancel))
                    .await
                    .map_err(|f| match f {
                        Failure::Lost(r) => {
                            Failure::Lost(format!("{r} (after one retry on the restarted server)"))
                        }
                        other => other,
                    });
            }
        }
        out.map_err(|f| match f {
            Failure::Undelivered(reason) => Error::Unavailable {
                server: self.name.clone(),
                state: self.state().label(),
                reason,
            },
            Failure::Lost(reason) => Error::Lost {
                server: self.name.clone(),
                method: m.to_owned(),
                reason,
            },
            Failure::Timeout => Error::Timeout {
                server: self.name.clone(),
                method: m.to_owned(),
                ms: self.settings.request_timeout().as_millis(),
            },
            Failure::Cancelled => Error::Cancelled,
        })
    }

    /// Whether a `tools/call` with these params may be sent again after a restart
    /// (`retryOnReconnect`).
    fn may_retry(&self, params: &RawMap) -> bool {
        match self.config.retry_on_reconnect {
            crate::config::Retry::Never => false,
            crate::config::Retry::Always => true,
            crate::config::Retry::Idempotent => {
                let Some(name) = params.get_str("name") else {
                    return false;
                };
                read(&self.lists).tools.iter().any(|t| {
                    t.key == name
                        && serde_json::from_str::<serde_json::Value>(t.raw.get()).is_ok_and(|v| {
                            v.pointer("/annotations/idempotentHint")
                                == Some(&serde_json::Value::Bool(true))
                        })
                })
            }
        }
    }

    /// Forwards a notification from a client (cancellations excepted).
    pub async fn notify(self: &Arc<Self>, m: &str, params: Option<&RawValue>) {
        // The stateless era has no client notifications to servers (roots changes and the
        // like come with requests).
        if !self.state().is_up() || self.is_modern() {
            return;
        }
        if let Err(e) = self
            .send_raw(protocol::notification(m, params), None, None)
            .await
        {
            tracing::debug!(server = %self.name, method = m, error = %e, "Notification not delivered.");
        }
    }

    /// Sends a request of the relay's own in the background (e.g. a last unsubscribe).
    pub fn request_detached(self: &Arc<Self>, m: &str, params: RawMap) {
        let me = self.clone();
        let m = m.to_owned();
        tokio::spawn(async move {
            if let Err(e) = me.internal(&m, Some(params)).await {
                tracing::debug!(server = %me.name, method = %m, error = %e, "Background request failed.");
            }
        });
    }

    /// Gives up on a request and tells the server with `notifications/cancelled`.
    async fn abandon(self: &Arc<Self>, id: u64, reason: &str) {
        // The stateless era over HTTP cancels by closing the request's stream (dropping its
        // future); over stdio, as before, with notifications/cancelled.
        let by_stream = self.is_modern() && !self.has_process();
        if lock(&self.pending).remove(&id).is_some() && !by_stream {
            let params = format!(
                r#"{{"requestId":{id},"reason":{}}}"#,
                protocol::raw_string(reason).get()
            );
            // In the background and bounded: a stuck server must not delay the error the
            // client is owed.
            let me = self.clone();
            let limit = self.settings.request_timeout();
            tokio::spawn(async move {
                let send = me.send_raw(
                    protocol::notification(method::CANCELLED, Some(&protocol::raw(&params))),
                    None,
                    None,
                );
                let _ = tokio::time::timeout(limit, send).await;
            });
        }
    }

    pub(crate) fn is_pending(&self, id: u64) -> bool {
        lock(&self.pending).contains_key(&id)
    }

    /// Fails one request (e.g. its answer could not be received).
    pub(crate) fn fail(&self, id: u64, reason: String) {
        if let Some(p) = lock(&self.pending).remove(&id) {
            let _ = p.tx.send(Err(reason));
        }
    }

    fn fail_all(&self, reason: &str) {
        let drained: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        for p in drained {
            let _ = p.tx.send(Err(reason.to_owned()));
        }
    }

    /// Entry point for every message the server sends; `related` is the client context of the
    /// HTTP stream it arrived on, if any.
    pub(crate) fn on_message(self: &Arc<Self>, bytes: &[u8], related: Option<&ReqCtx>) {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            match serde_json::from_slice::<Vec<Box<RawValue>>>(bytes) {
                Ok(items) => items
                    .iter()
                    .for_each(|i| self.on_message(i.get().as_bytes(), related)),
                Err(e) => {
                    tracing::warn!(server = %self.name, error = %e, "Unparsable batch from backend.")
                }
            }
            return;
        }
        let msg = match Message::parse(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(server = %self.name, error = %e, "Unparsable message from backend; dropped.");
                return;
            }
        };
        match msg.kind() {
            Kind::Response => {
                let Some(id) = msg.id.as_deref().and_then(|i| i.get().parse::<u64>().ok()) else {
                    tracing::debug!(server = %self.name, id = msg.id_text(), "Response with an id the relay never sent.");
                    return;
                };
                if let Some(p) = lock(&self.pending).remove(&id) {
                    let _ = p.tx.send(Ok(msg));
                }
            }
            Kind::Request => self.on_request(msg, related),
            Kind::Notification => self.on_notification(msg, related),
        }
    }

    /// The session a server-initiated message belongs to: the stream it came on, else the
    /// session of the newest request in flight, else the only session.
    fn attribute(&self, related: Option<&ReqCtx>, newest_ok: bool) -> Option<ReqCtx> {
        if let Some(r) = related {
            return Some(r.clone());
        }
        {
            let pending = lock(&self.pending);
            let mut with_ctx = pending
                .iter()
                .filter_map(|(id, p)| p.ctx.as_ref().map(|c| (*id, c)));
            if let Some(first) = with_ctx.next() {
                let mut newest = first;
                let mut one_session = true;
                for (id, c) in with_ctx {
                    if !Arc::ptr_eq(&c.session, &newest.1.session) {
                        one_session = false;
                    }
                    if id > newest.0 {
                        newest = (id, c);
                    }
                }
                if one_session || newest_ok {
                    return Some(newest.1.clone());
                }
                return None;
            }
        }
        self.hub.sole_session(&self.name)
    }

    fn on_request(self: &Arc<Self>, msg: Message, related: Option<&ReqCtx>) {
        let id = msg.id_text().to_owned();
        if msg.method() == method::PING {
            let me = self.clone();
            tokio::spawn(async move {
                let _ = me
                    .send_raw(protocol::response(&id, &protocol::raw("{}")), None, None)
                    .await;
            });
            return;
        }
        let (msg, task) = self.namespace_related(msg);
        // Never guess between sessions: a wrong guess would show one client's request to
        // another. A task's request belongs to the session that created the task.
        let target = related
            .cloned()
            .or_else(|| task.and_then(|t| self.hub.task_owner(&t)))
            .or_else(|| self.attribute(None, false));
        match &target {
            Some(ctx) => {
                tracing::debug!(server = %self.name, method = msg.method(), session = %ctx.session.id, "Routing server request to its session.")
            }
            None => {
                tracing::debug!(server = %self.name, method = msg.method(), "No single session owns this server request; refusing it.")
            }
        }
        let me = self.clone();
        let timeout = self.settings.request_timeout();
        tokio::spawn(async move {
            let m = msg.method().to_owned();
            let reply = match target {
                None => protocol::error_response(
                    &id,
                    protocol::code::INTERNAL_ERROR,
                    &format!(
                        "mcp-relay cannot tell which client session `{m}` belongs to (no request in flight, or requests from several sessions on this shared server)"
                    ),
                    None,
                ),
                Some(ctx) => match ctx
                    .session
                    .request(&ctx.stream, &m, msg.params.as_deref(), timeout)
                    .await
                {
                    Ok(answer) => match (answer.result, answer.error) {
                        (Some(r), _) => protocol::response(&id, &r),
                        (None, Some(e)) => protocol::error_response_raw(&id, &e),
                        (None, None) => protocol::response(&id, &protocol::raw("{}")),
                    },
                    Err(e) => protocol::error_response(
                        &id,
                        protocol::code::METHOD_NOT_FOUND,
                        &e.to_string(),
                        None,
                    ),
                },
            };
            let _ = me.send_raw(reply, None, None).await;
        });
    }

    fn on_notification(self: &Arc<Self>, msg: Message, related: Option<&ReqCtx>) {
        match msg.method() {
            method::PROGRESS => self.on_progress(&msg, related),
            m @ (method::TOOLS_CHANGED | method::PROMPTS_CHANGED | method::RESOURCES_CHANGED) => {
                let me = self.clone();
                let which = m.to_owned();
                tokio::spawn(async move { me.refresh_one(&which).await });
            }
            method::RESOURCE_UPDATED => {
                let uri = msg
                    .params_map()
                    .ok()
                    .and_then(|p| p.get_str("uri"))
                    .unwrap_or_default();
                self.hub
                    .resource_updated(&self.name, &uri, reserialize(&msg));
            }
            method::CANCELLED => {
                tracing::debug!(server = %self.name, "Backend cancelled one of its requests.");
            }
            method::TASK_STATUS => {
                let mut msg = msg;
                let exposed = msg
                    .params
                    .as_deref()
                    .and_then(|p| tasks::namespace(&self.name, p, tasks::Shape::Task));
                let Some((params, ids)) = exposed else {
                    return;
                };
                msg.params = Some(params);
                // Only the session that created the task hears of it.
                let owner = ids.first().and_then(|t| self.hub.task_owner(t));
                match owner.or_else(|| related.cloned()) {
                    Some(ctx) => {
                        let _ = ctx.stream.send(reserialize(&msg));
                    }
                    None => {
                        tracing::debug!(server = %self.name, "Task status for a task no session owns; dropped.");
                    }
                }
            }
            _ => match self.namespace_related(msg) {
                (msg, Some(task)) => {
                    if let Some(ctx) = related.cloned().or_else(|| self.hub.task_owner(&task)) {
                        let _ = ctx.stream.send(reserialize(&msg));
                    }
                }
                (msg, None) => self.on_plain_notification(msg, related),
            },
        }
    }

    /// Rewrites a related-task `_meta` in a server message's params to the exposed task id;
    /// returns the message and that id.
    fn namespace_related(&self, mut msg: Message) -> (Message, Option<String>) {
        let rewritten = msg
            .params
            .as_deref()
            .and_then(|p| tasks::namespace(&self.name, p, tasks::Shape::Other));
        match rewritten {
            Some((params, ids)) => {
                msg.params = Some(params);
                (msg, ids.into_iter().next())
            }
            None => (msg, None),
        }
    }

    fn on_plain_notification(&self, msg: Message, related: Option<&ReqCtx>) {
        match self.attribute(related, false) {
            Some(ctx) => {
                let _ = ctx.stream.send(reserialize(&msg));
            }
            None => self.hub.broadcast(&self.name, reserialize(&msg)),
        }
    }

    fn on_progress(&self, msg: &Message, related: Option<&ReqCtx>) {
        let Ok(mut params) = msg.params_map() else {
            return;
        };
        let token = params.get("progressToken").map(|t| t.get().to_owned());
        let id = token.as_deref().and_then(|t| t.parse::<u64>().ok());
        let route = id.and_then(|id| {
            let pending = lock(&self.pending);
            let p = pending.get(&id)?;
            Some((
                p.ctx.clone()?,
                p.progress.as_deref().map(|t| protocol::raw(t.get()))?,
            ))
        });
        match route {
            Some((ctx, original)) => {
                params.set_raw("progressToken", original);
                let body = params.to_raw();
                let _ = ctx
                    .stream
                    .send(protocol::notification(method::PROGRESS, Some(&body)));
            }
            None => {
                if let Some(ctx) = related {
                    let _ = ctx.stream.send(reserialize(msg));
                }
            }
        }
    }
}

/// The message as text again (the envelope is rebuilt; payloads stay raw).
fn reserialize(msg: &Message) -> String {
    serde_json::to_string(msg).unwrap_or_default()
}
