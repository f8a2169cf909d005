//! Stateless requests (protocol 2026-07-28): each is served in a session of its own that
//! lives as long as the request, or, for `subscriptions/listen`, as long as its stream.
//!
//! The request's `_meta` stands in for `initialize`: it gives the session its version, the
//! client's capabilities and identity. The era's `_meta` keys are taken off before the
//! request is routed (backends of either era get a plain request), and the answer is
//! completed for the era on the way back (`resultType`, the relay's identity, cache hints).

use super::Relay;
use crate::protocol::{self, Kind, Message, code, method, modern};
use crate::session::{Outbox, Session};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// How a front should carry an answer (the HTTP status; stdio ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// 400: `_meta` missing or unsupported, a header mismatch, a missing client capability.
    BadRequest,
    /// 404: a method the relay does not serve in this era.
    NotFound,
}

/// A stateless request's answer.
pub struct Reply {
    pub body: String,
    pub status: Status,
}

impl Reply {
    pub fn error(
        id: &str,
        code: i64,
        message: &str,
        data: Option<serde_json::Value>,
        status: Status,
    ) -> Reply {
        Reply {
            body: protocol::error_response(id, code, message, data.as_ref()),
            status,
        }
    }

    fn meta(id: &str, e: &modern::MetaError) -> Reply {
        Reply::error(id, e.code(), &e.to_string(), e.data(), Status::BadRequest)
    }
}

/// Whether a client message belongs to the stateless era: it names a version in `_meta`,
/// or it is a request outside any session (HTTP without `Mcp-Session-Id`) other than the
/// handshake's `initialize`, so only the stateless era can serve it. (A notification or
/// response outside a session that names no version keeps the handshake era's 400.)
pub fn is_stateless(msg: &Message, in_session: bool) -> bool {
    modern::names_version(msg)
        || (!in_session && msg.kind() == Kind::Request && msg.method() != method::INITIALIZE)
}

impl Relay {
    /// Serves one stateless message; `None` for notifications and responses (accepted and
    /// dropped: the era has no server requests to answer, and a cancellation of a stateless
    /// request is the client closing its stream).
    pub async fn stateless(
        self: &Arc<Self>,
        msg: Message,
        client: Option<String>,
        stream: Outbox,
    ) -> Option<Reply> {
        if msg.kind() != Kind::Request {
            return None;
        }
        let id = msg.id_text().to_owned();
        let meta = match modern::meta(&msg) {
            Ok(m) => m,
            Err(e) => return Some(Reply::meta(&id, &e)),
        };
        let m = msg.method().to_owned();
        if modern::REMOVED.contains(&m.as_str()) {
            return Some(Reply::error(
                &id,
                code::METHOD_NOT_FOUND,
                &format!(
                    "`{m}` does not exist in protocol {} (it belongs to the initialize handshake)",
                    meta.version
                ),
                None,
                Status::NotFound,
            ));
        }
        // A task outlives its request, and a stateless request has no session to own it.
        if msg.params_map().is_ok_and(|p| p.get("task").is_some()) {
            return Some(Reply::error(
                &id,
                code::INVALID_PARAMS,
                &format!(
                    "`{m}` asks for a task, which this relay keeps per session; send it in an initialize session, or without `task`"
                ),
                None,
                Status::Ok,
            ));
        }
        self.release(Some(&meta.capabilities));
        if m == modern::DISCOVER {
            return Some(self.discover(&id, &meta, client).await);
        }
        if super::mrtr::METHODS.contains(&m.as_str()) {
            if let Some(state) = self.relay_state(&msg) {
                return Some(self.resume(&id, msg, &state, client, stream).await);
            }
            if super::mrtr::can_answer(&meta) {
                return Some(self.bridged(&id, msg, &meta, client, stream).await);
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let session = self.stateless_session(&meta, client, tx.clone());
        self.seed_exposure(&session);
        // Closes the session however this future ends (the client may go away mid-call).
        let guard = CloseOnDrop::new(self.clone(), session.clone());
        // Related messages pass through a filter: log messages only at the level the
        // request asked for (none without one).
        let floor = meta.log_level.as_deref().map(modern::level_rank);
        let pass = |m: String| {
            if !log_wanted(&m, floor) {
                return;
            }
            let _ = stream.send(m);
        };
        let answer = {
            let work = self.handle(&session, modern::strip(msg), tx);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    biased;
                    Some(m) = rx.recv() => pass(m),
                    r = &mut work => {
                        while let Ok(m) = rx.try_recv() {
                            pass(m);
                        }
                        break r;
                    }
                }
            }
        };
        let missing = session.missing_capability();
        guard.close().await;
        answer.as_ref()?;
        Some(finish(&id, &m, answer, missing))
    }

    /// `server/discover`: the versions, merged capabilities and identity the relay serves
    /// to this client.
    async fn discover(
        self: &Arc<Self>,
        id: &str,
        meta: &modern::Meta,
        client: Option<String>,
    ) -> Reply {
        // Clients probe with discover under a short timeout (the Python SDK: 10 s): answer
        // with the servers ready by then rather than let the probe fail.
        self.settle_within(std::time::Duration::from_secs(3)).await;
        let (tx, _rx) = mpsc::unbounded_channel::<String>();
        let session = self.stateless_session(meta, client, tx);
        let (caps, instructions) = self.describe(&self.grant(&session));
        session.close();
        let mut result = serde_json::json!({
            "supportedVersions": modern::VERSIONS,
            "capabilities": caps,
            "serverInfo": modern::server_info(),
        });
        if let (Some(i), Some(o)) = (instructions, result.as_object_mut()) {
            o.insert("instructions".into(), serde_json::Value::String(i));
        }
        let result = modern::decorate(&protocol::to_raw(&result), modern::DISCOVER);
        Reply {
            body: protocol::response(id, &result),
            status: Status::Ok,
        }
    }

    /// Opens a `subscriptions/listen` stream on `stream`: the acknowledgement first, then
    /// the notifications its filter asks for, each tagged with the request's id, until
    /// `stream` closes (the client went away) or [`Relay::close_session`] ends the returned
    /// session (a cancellation).
    pub async fn listen(
        self: &Arc<Self>,
        msg: Message,
        client: Option<String>,
        stream: Outbox,
    ) -> Result<Arc<Session>, Reply> {
        let id = msg.id_text().to_owned();
        let meta = modern::meta(&msg).map_err(|e| Reply::meta(&id, &e))?;
        let filter: serde_json::Value = msg
            .params_map()
            .ok()
            .and_then(|p| p.get("notifications").map(|n| n.get().to_owned()))
            .and_then(|n| serde_json::from_str(&n).ok())
            .unwrap_or_default();
        let wants = |k: &str| filter[k].as_bool() == Some(true);
        let asked: Vec<String> = filter["resourceSubscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect();
        if asked.len() > MAX_RESOURCE_SUBSCRIPTIONS {
            return Err(Reply::error(
                &id,
                code::INVALID_PARAMS,
                &format!(
                    "{} resourceSubscriptions in one listen request; at most {MAX_RESOURCE_SUBSCRIPTIONS} (open another listen stream for more)",
                    asked.len()
                ),
                None,
                Status::Ok,
            ));
        }
        self.release(Some(&meta.capabilities));
        self.settle().await;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let session = self.open_session(format!("listen-{n}"), tx.clone(), client);
        fill(&session, &meta);
        // Until the stream is set up, a client going away ends the session here.
        let guard = CloseOnDrop::new(self.clone(), session.clone());
        let mut agreed = serde_json::Map::new();
        let mut allowed: Vec<&'static str> = Vec::new();
        for (key, list, note) in [
            (
                "toolsListChanged",
                method::TOOLS_LIST,
                method::TOOLS_CHANGED,
            ),
            (
                "promptsListChanged",
                method::PROMPTS_LIST,
                method::PROMPTS_CHANGED,
            ),
            (
                "resourcesListChanged",
                method::RESOURCES_LIST,
                method::RESOURCES_CHANGED,
            ),
        ] {
            if wants(key) {
                session.state().listed.insert(list.to_owned());
                agreed.insert(key.into(), true.into());
                allowed.push(note);
            }
        }
        // Resource subscriptions go through the handshake era's own path, so the relay
        // subscribes on the owning backend once however many sessions want the resource.
        let mut uris = Vec::new();
        for (i, uri) in asked.iter().enumerate() {
            let params = protocol::to_raw(&serde_json::json!({"uri": uri}));
            let req = protocol::request(
                &format!("\"sub-{i}\""),
                method::RESOURCES_SUBSCRIBE,
                Some(&params),
            );
            let Ok(req) = Message::parse_str(&req) else {
                continue;
            };
            let ok = self
                .handle(&session, req, tx.clone())
                .await
                .is_some_and(|r| Message::parse_str(&r).is_ok_and(|r| r.error.is_none()));
            if ok {
                uris.push(uri.clone());
            }
        }
        if !uris.is_empty() {
            agreed.insert("resourceSubscriptions".into(), uris.into());
            allowed.push(method::RESOURCE_UPDATED);
        }
        let subscription = protocol::raw(&id);
        let ack = protocol::to_raw(&serde_json::json!({
            "_meta": {modern::META_SUBSCRIPTION: serde_json::from_str::<serde_json::Value>(&id).unwrap_or_default()},
            "notifications": agreed,
        }));
        let _ = stream.send(protocol::notification(modern::ACKNOWLEDGED, Some(&ack)));
        guard.disarm();
        let relay = self.clone();
        let held = session.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => {
                            // Only the notification types the filter asked for.
                            let Some(method) = Message::parse_str(&m).ok().and_then(|p| p.method) else {
                                continue;
                            };
                            if !allowed.contains(&method.as_str()) {
                                continue;
                            }
                            if let Some(t) = modern::tag(&m, &subscription)
                                && stream.send(t).is_err()
                            {
                                break;
                            }
                        }
                        None => break,
                    },
                    () = stream.closed() => break,
                    () = held.closed().cancelled() => break,
                }
            }
            if !held.is_closed() {
                relay.close_session(&held).await;
            }
        });
        Ok(session)
    }

    /// A session for one stateless request (not listed among the relay's sessions: nothing
    /// is broadcast to it).
    pub(super) fn stateless_session(
        &self,
        meta: &modern::Meta,
        client: Option<String>,
        stream: Outbox,
    ) -> Arc<Session> {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let s = Session::new(format!("stateless-{n}"), stream);
        s.state().client = client;
        fill(&s, meta);
        s
    }
}

/// Resource URIs one listen request may subscribe to.
const MAX_RESOURCE_SUBSCRIPTIONS: usize = 64;

/// Ends a session when dropped, unless disarmed: a front drops the future serving a
/// stateless request when its client goes away, and the session (its in-flight backend
/// requests, its `per-session` process) must not outlive it.
pub(super) struct CloseOnDrop {
    relay: Arc<Relay>,
    session: Option<Arc<Session>>,
}

impl CloseOnDrop {
    pub(super) fn new(relay: Arc<Relay>, session: Arc<Session>) -> CloseOnDrop {
        CloseOnDrop {
            relay,
            session: Some(session),
        }
    }

    /// The session lives on (someone else closes it).
    fn disarm(mut self) {
        self.session = None;
    }

    /// Closes the session now, waiting for its subscriptions to be released.
    pub(super) async fn close(mut self) {
        if let Some(s) = self.session.take() {
            self.relay.close_session(&s).await;
        }
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let Some(s) = self.session.take() else { return };
        let held = self.relay.end_session(&s);
        if held.is_empty() {
            return;
        }
        let relay = self.relay.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for uri in held {
                    relay.release_subscription(&uri).await;
                }
            });
        }
    }
}

/// The answer to a stateless request, once its call ended: a server that asked for a
/// capability the client lacks and then failed failed for that reason; one that coped (e.g.
/// went on without the client's roots) answers.
pub(super) fn finish(
    id: &str,
    m: &str,
    answer: Option<String>,
    missing: Option<&'static str>,
) -> Reply {
    let Some(answer) = answer else {
        return Reply::error(
            id,
            code::INTERNAL_ERROR,
            &format!("`{m}` ended without an answer"),
            None,
            Status::Ok,
        );
    };
    if let Some(cap) = missing.filter(|_| failed(&answer)) {
        return Reply::error(
            id,
            modern::code::MISSING_CAPABILITY,
            &format!(
                "serving `{m}` needs the client capability `{cap}`, which the request's `_meta` did not declare"
            ),
            Some(serde_json::json!({"requiredCapabilities": {cap: {}}})),
            Status::BadRequest,
        );
    }
    complete(id, m, &answer)
}

/// What `initialize` would have told the session.
fn fill(s: &Session, meta: &modern::Meta) {
    let mut st = s.state();
    st.protocol_version = meta.version.clone();
    st.client_capabilities = Some(protocol::raw(meta.capabilities.get()));
    st.client_info = meta.client_info.as_deref().map(|i| protocol::raw(i.get()));
    st.initialized = true;
    st.log_level = meta.log_level.clone();
}

/// Whether an answer is an error: a JSON-RPC error or a tool result with `isError`.
fn failed(answer: &str) -> bool {
    Message::parse_str(answer).is_ok_and(|m| {
        m.error.is_some()
            || m.result.as_deref().is_some_and(|r| {
                protocol::RawMap::parse(r.get())
                    .is_ok_and(|r| r.get("isError").is_some_and(|v| v.get() == "true"))
            })
    })
}

/// Whether a related message reaches the client: anything but a log message, and a log
/// message (`notifications/message`) at or above the request's level (none without one).
pub(super) fn log_wanted(msg: &str, floor: Option<u8>) -> bool {
    // Cheap pre-check: most related messages are progress or server requests.
    if !msg.contains(method::MESSAGE) {
        return true;
    }
    let Ok(m) = Message::parse_str(msg) else {
        return true;
    };
    if m.method() != method::MESSAGE {
        return true;
    }
    let Some(floor) = floor else { return false };
    let level = m.params_map().ok().and_then(|p| p.get_str("level"));
    level.is_some_and(|l| modern::level_rank(&l) >= floor)
}

/// The answer completed for the era: results decorated; errors keep their code, except
/// "method not found" (HTTP 404) and a resource not found (the era's -32602).
fn complete(id: &str, m: &str, answer: &str) -> Reply {
    let Ok(msg) = Message::parse_str(answer) else {
        return Reply {
            body: answer.to_owned(),
            status: Status::Ok,
        };
    };
    if let Some(result) = msg.result.as_deref() {
        return Reply {
            body: protocol::response(id, &modern::decorate(result, m)),
            status: Status::Ok,
        };
    }
    let Some(error) = msg
        .error
        .as_deref()
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e.get()).ok())
    else {
        return Reply {
            body: answer.to_owned(),
            status: Status::Ok,
        };
    };
    let code = error["code"].as_i64().unwrap_or_default();
    if code == code::METHOD_NOT_FOUND {
        return Reply {
            body: answer.to_owned(),
            status: Status::NotFound,
        };
    }
    // Handshake-era servers answer an unknown resource with -32002; the era says -32602.
    if m == method::RESOURCES_READ && code == -32002 && error["data"].get("uri").is_some() {
        let mut error = error;
        error["code"] = code::INVALID_PARAMS.into();
        return Reply {
            body: protocol::error_response_raw(id, &protocol::to_raw(&error)),
            status: Status::Ok,
        };
    }
    Reply {
        body: answer.to_owned(),
        status: Status::Ok,
    }
}
