//! The multi-round-trip bridge for clients of the stateless era (2026-07-28) and servers of
//! the handshake era: a server request (`elicitation/create`, `sampling/createMessage`,
//! `roots/list`) made in the middle of a client's `tools/call`, `prompts/get` or
//! `resources/read` becomes an `input_required` result; the client's retry, carrying
//! `inputResponses` and the relay's `requestState`, answers the server and the original call
//! goes on.
//!
//! Between the rounds the call is *parked*: its session, the backend request still open and
//! the messages related to it wait in [`Bridge`], under a random token, for at most the
//! server request's timeout; then the call is dropped, which cancels it at the backend.
//! `requestState` names the token and what the call was (method, tool/prompt/resource name,
//! authenticated client, expiry), sealed with HMAC-SHA256 under a key drawn at start, so it
//! can be neither forged nor replayed into another client's call; a token is used once.

use super::Relay;
use super::stateless::{CloseOnDrop, Reply, Status, log_wanted};
use crate::protocol::{self, Message, RawMap, code, modern};
use crate::session::{Ask, Outbox, Session};
use crate::sync::lock;
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

pub use crate::backend::mrtr::METHODS;

/// What starts a `requestState` an mcp-relay sealed; the key id after it tells this
/// process's from another's (a relay behind this one, or the process before an upgrade):
/// those belong to a backend and pass on untouched.
const PREFIX: &str = "mcp-relay/1.";

/// Parked calls at most (each holds a backend request open); more are refused.
const MAX_PARKED: usize = 1024;
/// Parked calls of one client (authenticated name, or all unauthenticated ones) at most.
const MAX_PARKED_PER_CLIENT: usize = 256;

/// Calls waiting for their client's retry, and the key that seals their `requestState`.
pub struct Bridge {
    key: ring::hmac::Key,
    /// `PREFIX` and this key's id: what starts this process's `requestState`s.
    mark: String,
    parked: Mutex<HashMap<String, Conversation>>,
}

impl Default for Bridge {
    fn default() -> Self {
        let secret: [u8; 32] = rand::random();
        let kid: [u8; 6] = rand::random();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Bridge {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            mark: format!("{PREFIX}{}.", b64.encode(kid)),
            parked: Mutex::new(HashMap::new()),
        }
    }
}

/// What a sealed `requestState` says.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct Claims {
    /// The parked call's token.
    t: String,
    /// Method and name (tool, prompt or resource URI) of the call, and a digest of its
    /// other parameters (`arguments`...): a retry must be the same call.
    m: String,
    n: Option<String>,
    a: String,
    /// The authenticated client, if any.
    c: Option<String>,
    /// Expiry, milliseconds since the epoch.
    e: u64,
}

impl Bridge {
    /// Parked calls, for the metrics.
    pub fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Whether a `requestState` is this process's to open (it may still fail to).
    fn owns(&self, state: &str) -> bool {
        state.starts_with(&self.mark)
    }

    fn seal(&self, claims: &Claims) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = ring::hmac::sign(&self.key, payload.as_bytes());
        format!("{}{payload}.{}", self.mark, b64.encode(tag.as_ref()))
    }

    fn unseal(&self, state: &str) -> Option<Claims> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (payload, tag) = state.strip_prefix(&self.mark)?.split_once('.')?;
        let tag = b64.decode(tag).ok()?;
        ring::hmac::verify(&self.key, payload.as_bytes(), &tag).ok()?;
        serde_json::from_slice(&b64.decode(payload).ok()?).ok()
    }
}

impl Relay {
    /// This process's `requestState` in a request, if it carries one (a backend's, or
    /// another relay's, passes on).
    pub(super) fn relay_state(&self, msg: &Message) -> Option<String> {
        msg.params_map()
            .ok()?
            .get_str("requestState")
            .filter(|s| self.bridge.owns(s))
    }
}

/// A digest of a call's parameters other than its name, `_meta` and the round's own
/// `inputResponses` and `requestState` (objects with sorted keys, so a client's
/// re-serialization does not matter).
fn digest(msg: &Message) -> String {
    fn canon(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (k, canon(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(canon).collect())
            }
            other => other,
        }
    }
    let mut rest = std::collections::BTreeMap::new();
    if let Ok(p) = msg.params_map() {
        for (k, v) in p.0 {
            if matches!(
                k.as_str(),
                "_meta" | "inputResponses" | "requestState" | "name" | "uri"
            ) {
                continue;
            }
            let v = serde_json::from_str::<serde_json::Value>(v.get()).unwrap_or_default();
            rest.insert(k, canon(v));
        }
    }
    let text = serde_json::to_string(&rest).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&d.as_ref()[..16])
}

/// Whether a stateless client could answer a server request: it declared one of the
/// capabilities server requests need.
pub fn can_answer(meta: &modern::Meta) -> bool {
    RawMap::parse(meta.capabilities.get()).is_ok_and(|c| {
        ["elicitation", "sampling", "roots"]
            .iter()
            .any(|k| c.get(k).is_some_and(|v| v.get() != "null"))
    })
}

/// The name a call is bound to: the tool or prompt name, or the resource URI.
fn name_of(m: &str, msg: &Message) -> Option<String> {
    msg.params_map().ok()?.get_str(modern::name_field(m)?)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stateless call in progress that may stop for the client's input.
pub struct Conversation {
    session: Arc<Session>,
    guard: Option<CloseOnDrop>,
    related: mpsc::UnboundedReceiver<String>,
    asks: mpsc::UnboundedReceiver<Ask>,
    done: oneshot::Receiver<Option<String>>,
    task: tokio::task::AbortHandle,
    floor: Option<u8>,
    method: String,
    name: Option<String>,
    args: String,
    client: Option<String>,
    /// Server requests sent to the client and not answered yet, by key.
    pending: Vec<(String, Ask)>,
    next_key: u64,
}

impl Drop for Conversation {
    fn drop(&mut self) {
        // An abandoned call (expired, or its client gone): stop it; the guard then closes
        // the session, which cancels the backend request.
        self.task.abort();
    }
}

/// Where a conversation stopped.
enum Step {
    Done(Option<String>),
    Input,
}

enum Event {
    Related(String),
    Ask(Ask),
    Done(Option<String>),
}

impl Conversation {
    /// Runs the call until it answers or asks for input; related messages go to `stream`.
    async fn step(&mut self, stream: &Outbox) -> Step {
        // Requests the server stopped waiting for are not asked again.
        self.pending.retain(|(_, a)| !a.reply.is_closed());
        if !self.pending.is_empty() {
            // The client's retry left some requests unanswered: ask them again.
            return Step::Input;
        }
        loop {
            let event = tokio::select! {
                biased;
                Some(m) = self.related.recv() => Event::Related(m),
                Some(a) = self.asks.recv() => Event::Ask(a),
                r = &mut self.done => Event::Done(r.ok().flatten()),
            };
            match event {
                Event::Related(m) => self.pass(m, stream),
                Event::Ask(a) => {
                    self.add(a);
                    // Requests the server made at the same moment travel together.
                    while let Ok(a) = self.asks.try_recv() {
                        self.add(a);
                    }
                    return Step::Input;
                }
                Event::Done(answer) => {
                    while let Ok(m) = self.related.try_recv() {
                        self.pass(m, stream);
                    }
                    return Step::Done(answer);
                }
            }
        }
    }

    fn pass(&self, m: String, stream: &Outbox) {
        if log_wanted(&m, self.floor) {
            let _ = stream.send(m);
        }
    }

    fn add(&mut self, a: Ask) {
        // `elicitation-1`, `sampling-2`, `roots-3`: unique within the call.
        let kind = a.method.split('/').next().unwrap_or("input");
        let key = format!("{kind}-{}", self.next_key);
        self.next_key += 1;
        self.pending.push((key, a));
    }

    /// The `inputRequests` object for the pending server requests.
    fn requests(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (key, a) in &self.pending {
            let mut r = serde_json::Map::new();
            r.insert("method".into(), a.method.clone().into());
            if let Some(p) = a
                .params
                .as_deref()
                .and_then(|p| serde_json::from_str::<serde_json::Value>(p.get()).ok())
            {
                r.insert("params".into(), p);
            }
            out.insert(key.clone(), r.into());
        }
        out.into()
    }

    /// Hands the client's answers to the server requests waiting for them; requests the
    /// client did not answer stay pending.
    fn answer(&mut self, responses: Option<&serde_json::value::RawValue>) {
        let Some(responses) = responses.and_then(|r| RawMap::parse(r.get()).ok()) else {
            return;
        };
        let pending = std::mem::take(&mut self.pending);
        for (key, ask) in pending {
            match responses.get(&key) {
                Some(v) => {
                    let reply = protocol::response("0", v);
                    if let Ok(m) = Message::parse_str(&reply) {
                        let _ = ask.reply.send(m);
                    }
                }
                None => self.pending.push((key, ask)),
            }
        }
    }

    /// How long the call may stay parked: until the first of its server requests stops
    /// waiting.
    fn patience(&self) -> Duration {
        self.pending
            .iter()
            .map(|(_, a)| a.deadline)
            .min()
            .map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(tokio::time::Instant::now())
            })
    }
}

impl Relay {
    /// Serves a stateless request whose server requests may become `input_required`.
    pub(super) async fn bridged(
        self: &Arc<Self>,
        id: &str,
        msg: Message,
        meta: &modern::Meta,
        client: Option<String>,
        stream: Outbox,
    ) -> Reply {
        let m = msg.method().to_owned();
        let name = name_of(&m, &msg);
        let args = digest(&msg);
        let (tx, related) = mpsc::unbounded_channel::<String>();
        let session = self.stateless_session(meta, client.clone(), tx.clone());
        self.seed_exposure(&session);
        let (ask_tx, asks) = mpsc::unbounded_channel();
        session.bridge_to(ask_tx);
        let guard = CloseOnDrop::new(self.clone(), session.clone());
        let (done_tx, done) = oneshot::channel();
        let relay = self.clone();
        let s = session.clone();
        let req = modern::strip(msg);
        // The call runs in a task of its own: it outlives this request when it is parked.
        let task = tokio::spawn(async move {
            let r = relay.handle(&s, req, tx).await;
            let _ = done_tx.send(r);
        });
        let conv = Conversation {
            session,
            guard: Some(guard),
            related,
            asks,
            done,
            task: task.abort_handle(),
            floor: meta.log_level.as_deref().map(modern::level_rank),
            method: m,
            name,
            args,
            client,
            pending: Vec::new(),
            next_key: 1,
        };
        self.drive(id, conv, &stream).await
    }

    /// A client's retry carrying the relay's `requestState`: the parked call takes the
    /// client's answers and goes on.
    pub(super) async fn resume(
        self: &Arc<Self>,
        id: &str,
        msg: Message,
        state: &str,
        client: Option<String>,
        stream: Outbox,
    ) -> Reply {
        let m = msg.method().to_owned();
        let refuse = |why: String| {
            Reply::error(
                id,
                code::INVALID_PARAMS,
                &format!(
                    "{why}; send `{m}` again without `requestState` and `inputResponses` to start over"
                ),
                None,
                Status::Ok,
            )
        };
        let Some(claims) = self.bridge.unseal(state) else {
            return refuse(
                "`requestState` was not issued by this relay or was altered (integrity check failed)"
                    .into(),
            );
        };
        if claims.m != m
            || claims.n != name_of(&m, &msg)
            || claims.a != digest(&msg)
            || claims.c != client
        {
            return refuse(
                "`requestState` belongs to another request (a different method, name, arguments or client)"
                    .into(),
            );
        }
        if claims.e < now_ms() {
            return refuse("`requestState` has expired: the server stopped waiting".into());
        }
        let Some(mut conv) = lock(&self.bridge.parked).remove(&claims.t) else {
            return refuse(
                "`requestState` was already used, or its call ended (it is good for one retry)"
                    .into(),
            );
        };
        let responses = msg.params_map().ok();
        conv.answer(responses.as_ref().and_then(|p| p.get("inputResponses")));
        self.drive(id, conv, &stream).await
    }

    /// Runs a conversation to its answer, or parks it and answers `input_required`.
    async fn drive(self: &Arc<Self>, id: &str, mut conv: Conversation, stream: &Outbox) -> Reply {
        match conv.step(stream).await {
            Step::Done(answer) => {
                let missing = conv.session.missing_capability();
                if let Some(g) = conv.guard.take() {
                    g.close().await;
                }
                let m = conv.method.clone();
                super::stateless::finish(id, &m, answer, missing)
            }
            Step::Input => {
                let patience = conv.patience();
                let token = Session::random_id();
                let claims = Claims {
                    t: token.clone(),
                    m: conv.method.clone(),
                    n: conv.name.clone(),
                    a: conv.args.clone(),
                    c: conv.client.clone(),
                    e: now_ms() + patience.as_millis() as u64,
                };
                let result = serde_json::json!({
                    "resultType": "input_required",
                    "inputRequests": conv.requests(),
                    "requestState": self.bridge.seal(&claims),
                });
                {
                    let mut parked = lock(&self.bridge.parked);
                    let mine = parked.values().filter(|c| c.client == conv.client).count();
                    if parked.len() >= MAX_PARKED || mine >= MAX_PARKED_PER_CLIENT {
                        drop(parked);
                        // Dropping the conversation cancels the call at its server.
                        drop(conv);
                        return Reply::error(
                            id,
                            code::INTERNAL_ERROR,
                            &format!(
                                "mcp-relay holds too many calls waiting for their clients' input (at most {MAX_PARKED}, {MAX_PARKED_PER_CLIENT} per client); answer or abandon those first, then retry"
                            ),
                            None,
                            Status::Ok,
                        );
                    }
                    parked.insert(token.clone(), conv);
                }
                tracing::debug!(method = %claims.m, "A server request became input_required; the call waits for the client's retry.");
                // Bounded: a retry that never comes drops the call (and cancels it).
                let relay = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep(patience).await;
                    if let Some(r) = relay.upgrade() {
                        let gone = lock(&r.bridge.parked).remove(&token);
                        if gone.is_some() {
                            tracing::info!(
                                "A call waiting for its client's input_required answer expired; cancelled at its server."
                            );
                        }
                        drop(gone);
                    }
                });
                let result = modern::decorate(&protocol::to_raw(&result), &claims.m);
                Reply {
                    body: protocol::response(id, &result),
                    status: Status::Ok,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_state_round_trips_and_rejects_tampering() {
        let b = Bridge::default();
        let c = Claims {
            t: "abc".into(),
            m: "tools/call".into(),
            n: Some("ex__elicit".into()),
            a: "x".into(),
            c: None,
            e: 42,
        };
        let s = b.seal(&c);
        assert!(s.starts_with(PREFIX) && b.owns(&s));
        assert_eq!(b.unseal(&s), Some(c));
        assert_eq!(b.unseal(&format!("{s}-TAMPERED")), None);
        let (head, tag) = s.rsplit_once('.').unwrap_or_default();
        let forged = format!("{head}x.{tag}");
        assert_eq!(b.unseal(&forged), None);
        // Another relay (another key) does not take it for its own, nor open it.
        let other = Bridge::default();
        assert!(!other.owns(&s));
        assert_eq!(other.unseal(&s), None);
    }

    #[test]
    fn a_retry_must_be_the_same_call() {
        let call = |p: &str| {
            Message::parse_str(&format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{p}}}"#
            ))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let first = digest(&call(
            r#"{"name":"t","arguments":{"a":1,"b":[{"y":2,"x":1}]}}"#,
        ));
        // Key order, _meta and the round's own fields do not matter.
        let retry = digest(&call(
            r#"{"_meta":{"k":1},"arguments":{"b":[{"x":1,"y":2}],"a":1},"name":"t","inputResponses":{},"requestState":"s"}"#,
        ));
        assert_eq!(first, retry);
        let other = digest(&call(
            r#"{"name":"t","arguments":{"a":2,"b":[{"y":2,"x":1}]}}"#,
        ));
        assert_ne!(first, other);
    }
}
