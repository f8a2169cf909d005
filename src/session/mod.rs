//! A client session: what the client told us at `initialize`, what it subscribed to, and the
//! channels that carry messages back to it.
//!
//! [`SessionState`] is plain serializable data (it must survive an upgrade and fit in a shared
//! store); handles and channels live beside it in [`Session`]. Routing decisions are not made
//! here: the router and the backends use the session to reach the client.

use crate::protocol::{self, Message, RawMap};
use crate::sync::lock;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Where messages for a client go: a serialized JSON-RPC message per item.
pub type Outbox = mpsc::UnboundedSender<String>;

/// The serializable part of a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionState {
    /// Negotiated protocol revision; empty before `initialize`.
    pub protocol_version: String,
    /// The client's `capabilities` object, verbatim.
    pub client_capabilities: Option<Box<RawValue>>,
    /// The client's `clientInfo`, verbatim.
    pub client_info: Option<Box<RawValue>>,
    pub initialized: bool,
    /// Resource URIs this session subscribed to.
    pub subscriptions: BTreeSet<String>,
    /// Level from `logging/setLevel`, if any.
    pub log_level: Option<String>,
    /// List methods this session has called: only those lists' changes are announced to it.
    pub listed: BTreeSet<String>,
    /// Exposed ids (`server+taskId`) of the tasks this session created.
    #[serde(default)]
    pub tasks: BTreeSet<String>,
    /// Tools `relay__analyze_prompt` exposed to this session (exposed names, newest picks
    /// first); `None` until it first picks, and after a reset.
    #[serde(default)]
    pub exposed: Option<Vec<String>>,
    /// The authenticated client (`auth.clients[].name`) that opened this session; `None` for
    /// a trusted front (stdio, or HTTP without auth). Its scopes and servers are looked up
    /// in the config in force at each request, so a reload applies to open sessions.
    #[serde(default)]
    pub client: Option<String>,
}

/// What a session may reach: derived from its client and the `auth` config in force.
pub struct Grant {
    cfg: std::sync::Arc<crate::config::Config>,
    who: Who,
}

enum Who {
    /// Stdio, or HTTP without auth: everything.
    Trusted,
    Client(usize),
    /// A client the config no longer lists: nothing.
    Unknown,
}

impl Grant {
    pub fn new(cfg: std::sync::Arc<crate::config::Config>, client: Option<&str>) -> Grant {
        let who = match client {
            None => Who::Trusted,
            Some(name) => cfg
                .auth
                .clients
                .iter()
                .position(|c| c.name == name)
                .map_or(Who::Unknown, Who::Client),
        };
        Grant { cfg, who }
    }

    fn client(&self) -> Option<&crate::config::auth::Client> {
        match self.who {
            Who::Client(i) => self.cfg.auth.clients.get(i),
            _ => None,
        }
    }

    /// The client's name, if the session has one.
    pub fn name(&self) -> Option<&str> {
        self.client().map(|c| c.name.as_str())
    }

    /// May use the servers' tools, prompts, resources and completions (scope `tools`).
    pub fn tools(&self) -> bool {
        match self.who {
            Who::Trusted => true,
            Who::Client(_) => self.client().is_some_and(|c| c.scopes.tools),
            Who::Unknown => false,
        }
    }

    /// May use the management tools (scope `admin`).
    pub fn admin(&self) -> bool {
        match self.who {
            Who::Trusted => true,
            Who::Client(_) => self.client().is_some_and(|c| c.scopes.admin),
            Who::Unknown => false,
        }
    }

    /// Whether only some servers are visible (the client has `servers` globs).
    pub fn restricted(&self) -> bool {
        match self.who {
            Who::Trusted => false,
            Who::Client(_) => self.client().is_none_or(|c| c.servers.is_some()),
            Who::Unknown => true,
        }
    }

    /// Whether `server`'s items are visible to the session.
    pub fn sees(&self, server: &str) -> bool {
        match self.who {
            Who::Trusted => true,
            Who::Client(_) => self.client().is_some_and(|c| {
                c.servers
                    .as_ref()
                    .is_none_or(|p| p.iter().any(|p| p.matches(server)))
            }),
            Who::Unknown => false,
        }
    }

    /// May use `server` at all: scope `tools` and the server visible.
    pub fn reaches(&self, server: &str) -> bool {
        self.tools() && self.sees(server)
    }

    /// Why a request needing `scope` is refused (names the client and the fix).
    pub fn missing(&self, scope: &str) -> String {
        match self.name() {
            Some(n) => format!(
                "client `{n}` lacks the `{scope}` scope; add it to its `scopes` in auth.clients"
            ),
            None => format!("this session lacks the `{scope}` scope"),
        }
    }
}

/// A request the relay sent to the client on a backend's behalf, awaiting its answer.
type Waiter = oneshot::Sender<Message>;

/// A server request met while serving a stateless request: the relay answers that client
/// with `input_required` carrying it, and `reply` gets the client's answer from the retry.
pub struct Ask {
    pub method: String,
    pub params: Option<Box<RawValue>>,
    /// Until when the backend waits for the answer (the parked call expires then).
    pub deadline: tokio::time::Instant,
    pub reply: oneshot::Sender<Message>,
}

/// A live session.
pub struct Session {
    pub id: String,
    state: Mutex<SessionState>,
    /// The session's standalone stream (stdout, or the HTTP GET stream).
    pub outbox: Outbox,
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, Waiter>>,
    /// Client request ids (raw JSON text) in flight, to honour `notifications/cancelled`.
    inflight: Mutex<HashMap<String, CancellationToken>>,
    closed: CancellationToken,
    /// A capability a server request needed and the client had not declared (stateless
    /// requests answer with `MissingRequiredClientCapability` then).
    missing: Mutex<Option<&'static str>>,
    /// For a stateless request that may answer `input_required`: where server requests go.
    asks: Mutex<Option<mpsc::UnboundedSender<Ask>>>,
}

/// The context of one client request: its session and the stream its related messages use.
#[derive(Clone)]
pub struct ReqCtx {
    pub session: Arc<Session>,
    pub stream: Outbox,
    /// The client's request id (raw JSON), for a context of one client request.
    pub request: Option<Arc<str>>,
}

/// Why a request to the client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the client of this session did not declare the `{0}` capability")]
    Unsupported(&'static str),
    #[error("the client did not answer `{method}` within {secs} s")]
    Timeout { method: String, secs: u64 },
    #[error("the client session ended before answering `{0}`")]
    Gone(String),
    #[error(
        "the client speaks the stateless protocol (2026-07-28), which has no server requests, and `{0}` came outside a tools/call, prompts/get or resources/read that could carry it as input_required"
    )]
    Stateless(String),
    #[error(
        "the client did not retry its request with an answer to `{0}` (input_required) in time"
    )]
    Unanswered(String),
}

impl Session {
    pub fn new(id: String, outbox: Outbox) -> Arc<Session> {
        Arc::new(Session {
            id,
            state: Mutex::new(SessionState::default()),
            outbox,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            missing: Mutex::new(None),
            asks: Mutex::new(None),
        })
    }

    /// A fresh random session id (128 bits, hex).
    pub fn random_id() -> String {
        let bytes: [u8; 16] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        lock(&self.state)
    }

    /// The standalone-stream context (for messages not tied to a request).
    pub fn ctx(self: &Arc<Self>) -> ReqCtx {
        ReqCtx {
            session: self.clone(),
            stream: self.outbox.clone(),
            request: None,
        }
    }

    /// Whether this session serves one stateless (2026-07-28) request or listen stream.
    pub fn is_stateless(&self) -> bool {
        protocol::modern::VERSIONS.contains(&self.state().protocol_version.as_str())
    }

    /// Lets this (stateless) session's server requests become `input_required` results:
    /// they are sent to `asks` instead of failing.
    pub fn bridge_to(&self, asks: mpsc::UnboundedSender<Ask>) {
        *lock(&self.asks) = Some(asks);
    }

    /// The capability a server request of this session's request lacked, if any.
    pub fn missing_capability(&self) -> Option<&'static str> {
        *lock(&self.missing)
    }

    /// Whether the client declared a capability (top-level key of `capabilities`).
    pub fn has_capability(&self, name: &str) -> bool {
        let st = self.state();
        st.client_capabilities
            .as_deref()
            .and_then(|c| RawMap::parse(c.get()).ok())
            .is_some_and(|m| m.get(name).is_some_and(|v| v.get() != "null"))
    }

    /// Registers a client request id as in flight; the token fires on client cancellation.
    /// Whether a request of the client is in flight.
    pub fn busy(&self) -> bool {
        !lock(&self.inflight).is_empty()
    }

    pub fn begin(&self, id_text: &str) -> CancellationToken {
        let token = self.closed.child_token();
        lock(&self.inflight).insert(id_text.to_owned(), token.clone());
        token
    }

    pub fn end(&self, id_text: &str) {
        lock(&self.inflight).remove(id_text);
    }

    /// Whether a request of the relay to the client (sampling, elicitation, roots) still
    /// waits for its answer.
    pub fn awaiting_client(&self) -> bool {
        !lock(&self.waiters).is_empty()
    }

    /// The number of the next request to the client (`relay-N`): carried across an
    /// in-place upgrade so ids are never reused.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn set_next_request_id(&self, n: u64) {
        self.next_id.fetch_max(n, Ordering::Relaxed);
    }

    /// Handles the client's `notifications/cancelled` for one of its requests.
    pub fn cancel(&self, id_text: &str) -> bool {
        match lock(&self.inflight).remove(id_text) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Ends the session: in-flight requests are cancelled, waiting reverse requests fail.
    pub fn close(&self) {
        self.closed.cancel();
        lock(&self.waiters).clear();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Sends a server-to-client request (sampling, elicitation, roots) on `stream` and waits
    /// for the client's answer.
    pub async fn request(
        &self,
        stream: &Outbox,
        method: &str,
        params: Option<&RawValue>,
        timeout: Duration,
    ) -> Result<Message, ClientError> {
        let needed = match method {
            protocol::method::SAMPLING => Some("sampling"),
            protocol::method::ELICIT => Some("elicitation"),
            protocol::method::ROOTS_LIST => Some("roots"),
            _ => None,
        };
        let stateless = self.is_stateless();
        if let Some(cap) = needed
            && !self.has_capability(cap)
        {
            if stateless {
                *lock(&self.missing) = Some(cap);
            }
            return Err(ClientError::Unsupported(cap));
        }
        if stateless {
            // The client's request may answer `input_required`: the server request travels
            // in it, and the answer comes with the client's retry (or never: bounded). Only
            // the requests the era can embed.
            let asks = lock(&self.asks).clone().filter(|_| needed.is_some());
            let Some(asks) = asks else {
                return Err(ClientError::Stateless(method.to_owned()));
            };
            let (tx, rx) = oneshot::channel();
            let ask = Ask {
                method: method.to_owned(),
                params: params.map(|p| protocol::raw(p.get())),
                deadline: tokio::time::Instant::now() + timeout,
                reply: tx,
            };
            if asks.send(ask).is_err() {
                return Err(ClientError::Gone(method.to_owned()));
            }
            return tokio::select! {
                r = rx => r.map_err(|_| ClientError::Unanswered(method.to_owned())),
                () = tokio::time::sleep(timeout) => Err(ClientError::Timeout {
                    method: method.to_owned(),
                    secs: timeout.as_secs(),
                }),
                () = self.closed.cancelled() => Err(ClientError::Gone(method.to_owned())),
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        // Ids toward the client are strings so they never collide with a client's own numbers.
        let id_json = format!("\"relay-{id}\"");
        if stream
            .send(protocol::request(&id_json, method, params))
            .is_err()
        {
            lock(&self.waiters).remove(&id);
            return Err(ClientError::Gone(method.to_owned()));
        }
        // Given up (a timeout, or the server's call ended and nobody waits any more): the
        // client is told, and the session does not count the request as waiting.
        let mut waiting = Waiting {
            session: self,
            stream,
            id,
            id_json: &id_json,
        };
        let r = tokio::select! {
            r = rx => r.map_err(|_| ClientError::Gone(method.to_owned())),
            () = tokio::time::sleep(timeout) => {
                Err(ClientError::Timeout { method: method.to_owned(), secs: timeout.as_secs() })
            }
        };
        if r.is_ok() {
            waiting.id = 0;
        }
        r
    }

    /// Delivers a client's response to a waiting server-to-client request.
    /// Returns false when no request with that id is waiting.
    pub fn answer(&self, msg: Message) -> bool {
        let id = msg
            .id
            .as_deref()
            .and_then(|i| serde_json::from_str::<String>(i.get()).ok())
            .and_then(|s| s.strip_prefix("relay-").and_then(|n| n.parse::<u64>().ok()));
        let Some(id) = id else { return false };
        match lock(&self.waiters).remove(&id) {
            Some(w) => w.send(msg).is_ok(),
            None => false,
        }
    }
}

/// A request to the client still waiting for its answer; dropped unanswered, it is taken
/// back (`notifications/cancelled` to the client).
struct Waiting<'a> {
    session: &'a Session,
    stream: &'a Outbox,
    /// 0 once answered (relay ids start at 1).
    id: u64,
    id_json: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.id == 0 || lock(&self.session.waiters).remove(&self.id).is_none() {
            return;
        }
        let params = format!(
            r#"{{"requestId":{},"reason":"the server no longer waits for the answer"}}"#,
            self.id_json
        );
        let _ = self.stream.send(protocol::notification(
            protocol::method::CANCELLED,
            Some(&protocol::raw(&params)),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reverse_request_round_trip_and_capability_check()
    -> Result<(), Box<dyn std::error::Error>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = Session::new(Session::random_id(), tx.clone());
        let denied = s
            .request(&tx, "sampling/createMessage", None, Duration::from_secs(5))
            .await;
        assert!(matches!(denied, Err(ClientError::Unsupported("sampling"))));
        s.state().client_capabilities = Some(protocol::raw(r#"{"sampling":{}}"#));
        let s2 = s.clone();
        let answerer = tokio::spawn(async move {
            let req = rx.recv().await?;
            let id = Message::parse(req.as_bytes()).ok()?.id_text().to_owned();
            let reply = protocol::response(&id, &protocol::raw(r#"{"ok":1}"#));
            Some(s2.answer(Message::parse(reply.as_bytes()).ok()?))
        });
        let got = s
            .request(&tx, "sampling/createMessage", None, Duration::from_secs(5))
            .await?;
        assert_eq!(answerer.await?, Some(true));
        assert_eq!(
            got.result.map(|r| r.get().to_owned()).as_deref(),
            Some(r#"{"ok":1}"#)
        );
        Ok(())
    }
}
