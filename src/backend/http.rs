//! Streamable HTTP backends: POST per message (JSON or SSE answers), the standalone GET
//! stream, `Mcp-Session-Id`, `MCP-Protocol-Version`, `retry` + `Last-Event-ID` resumption,
//! and re-initialization when the server forgets our session (404).

use super::{Backend, SendError};
use crate::session::ReqCtx;
use crate::sync::lock;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SESSION: &str = "mcp-session-id";
const VERSION: &str = "mcp-protocol-version";
/// Reconnections of one interrupted response stream before its request fails.
const MAX_RESUMES: usize = 10;

/// A Streamable HTTP connection.
pub struct Http {
    client: reqwest::Client,
    /// Parsed once: reqwest would parse a string URL on every request.
    url: reqwest::Url,
    /// The configured headers plus `Accept` and `Content-Type` for POSTs.
    headers: HeaderMap,
    session: Mutex<Option<HeaderValue>>,
    /// Bumped whenever the session id changes, so one 404 triggers one re-initialization.
    generation: AtomicU64,
    /// Never fires on its own: HTTP has no connection to lose; set on shutdown.
    pub closed: CancellationToken,
}

/// The HTTP client every remote backend uses: `TCP_NODELAY`, pooled connections, the
/// system and bundled roots plus `ca_file` for `https://`.
pub fn client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::Client, String> {
    let tls = super::tls::client_config(ca_file, super::tls::HTTP)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .tcp_nodelay(true)
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Configured headers, validated (values are never logged).
pub fn header_map(headers: &BTreeMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("header name `{k}` is not valid"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| format!("the value of header `{k}` is not a valid header value"))?;
        map.insert(name, value);
    }
    Ok(map)
}

impl Http {
    pub fn new(
        url: &str,
        headers: &BTreeMap<String, String>,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Arc<Http>, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("the URL is not valid: {e}"))?;
        let mut headers = header_map(headers)?;
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(Arc::new(Http {
            client: client(timeout, ca_file)?,
            url,
            headers,
            session: Mutex::new(None),
            generation: AtomicU64::new(0),
            closed: CancellationToken::new(),
        }))
    }

    /// A request with our headers, our session (unless `fresh`) and the protocol version;
    /// also returns the session generation it was built for.
    fn request(
        &self,
        b: &Backend,
        method: reqwest::Method,
        fresh: bool,
    ) -> (reqwest::Request, u64) {
        let mut req = reqwest::Request::new(method, self.url.clone());
        let h = req.headers_mut();
        *h = self.headers.clone();
        let generation = self.generation.load(Ordering::Acquire);
        if !fresh && let Some(s) = lock(&self.session).clone() {
            h.insert(SESSION, s);
        }
        if let Some(v) = b.protocol_version().filter(|_| !fresh) {
            h.insert(VERSION, v);
        }
        (req, generation)
    }

    /// A POST to a server of the stateless era: its headers, no session.
    fn modern_request(&self, method: &str, name: Option<&str>) -> reqwest::Request {
        let mut req = reqwest::Request::new(reqwest::Method::POST, self.url.clone());
        let h = req.headers_mut();
        *h = self.headers.clone();
        h.insert(
            VERSION,
            HeaderValue::from_static(crate::protocol::modern::VERSIONS[0]),
        );
        if let Ok(v) = HeaderValue::from_str(method) {
            h.insert("mcp-method", v);
        }
        if let Some(v) = name.and_then(|n| {
            HeaderValue::from_str(&crate::protocol::modern::encode_header_value(n)).ok()
        }) {
            h.insert("mcp-name", v);
        }
        req
    }

    /// Sends one message and, for a request, reads its answer (JSON, or an SSE stream with
    /// related messages first). Runs inside the caller's future: no task per request.
    pub async fn send(
        self: &Arc<Self>,
        b: &Arc<Backend>,
        msg: String,
        related: Option<ReqCtx>,
        expect: Option<u64>,
    ) -> Result<(), SendError> {
        // The relay's own `initialize` starts a new session; ids are at most 20 digits.
        const INITIALIZE: &[u8] = br#""method":"initialize""#;
        let head = &msg.as_bytes()[..msg.len().min(64)];
        let is_initialize =
            expect.is_some() && head.windows(INITIALIZE.len()).any(|w| w == INITIALIZE);
        // A message in the stateless era (or the discover probe) gets `_meta` and headers,
        // and no session.
        let (msg, modern_headers) = match b.modern_for(related.as_ref(), &msg) {
            true => match b.modernize(&msg, related.as_ref()) {
                Some((m, method, name)) => {
                    // Arguments the tool mirrors into headers (`x-mcp-header`).
                    let params = match (method.as_str(), &name) {
                        (crate::protocol::method::TOOLS_CALL, Some(n)) => b.param_headers(n, &m),
                        _ => Vec::new(),
                    };
                    (m, Some((method, name, params)))
                }
                None => (msg, None),
            },
            false => (msg, None),
        };
        let body = bytes::Bytes::from(msg);
        for attempt in 0..2 {
            let (mut req, generation) = match &modern_headers {
                Some((method, name, params)) => {
                    let mut req = self.modern_request(method, name.as_deref());
                    for (h, v) in params {
                        if let (Ok(h), Ok(v)) = (
                            reqwest::header::HeaderName::from_bytes(h.as_bytes()),
                            HeaderValue::from_str(v),
                        ) {
                            req.headers_mut().insert(h, v);
                        }
                    }
                    (req, 0)
                }
                None => self.request(b, reqwest::Method::POST, is_initialize),
            };
            let had_session = req.headers().contains_key(SESSION);
            *req.body_mut() = Some(body.clone().into());
            let resp = match self.client.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    let url = crate::config::redact::url(self.url.as_str());
                    let reason = format!("cannot reach {url}: {}", without_url(&e));
                    if e.is_connect() {
                        // Nobody listens (or the TLS handshake failed): the connection is
                        // lost for every request, so the supervisor reconnects with backoff
                        // and callers wait for that instead of failing one by one.
                        self.closed.cancel();
                        return Err(SendError::undelivered(reason));
                    }
                    return Err(reason.into());
                }
            };
            let status = resp.status();
            if let Some(sid) = resp.headers().get(SESSION) {
                let mut s = lock(&self.session);
                if s.as_ref() != Some(sid) {
                    *s = Some(sid.clone());
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            if status == reqwest::StatusCode::NOT_FOUND && had_session && attempt == 0 {
                // The server forgot our session: re-initialize once, then resend. The
                // handshake runs in a task of its own, so a caller that goes away (timeout,
                // client disconnect) cannot leave the backend half re-initialized; requests
                // that lost the race wait for it (bounded) and resend with the new session.
                let me = self.clone();
                tokio::spawn(b.reinitialize(move || {
                    if me.generation.load(Ordering::Acquire) != generation {
                        return false;
                    }
                    lock(&me.session).take();
                    me.generation.fetch_add(1, Ordering::AcqRel);
                    true
                }))
                .await
                .map_err(|e| format!("re-initialization failed: {e}"))??;
                continue;
            }
            if status == reqwest::StatusCode::ACCEPTED || status == reqwest::StatusCode::NO_CONTENT
            {
                return Ok(());
            }
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                b.note_auth_failure();
                return Err(format!(
                    "the server answered HTTP {status}: check the credentials in its `headers`"
                )
                .into());
            }
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                // A JSON-RPC error answering our request (the stateless era answers an
                // unknown method with 404 and -32601): the caller gets that error.
                if let Some(want) = expect
                    && crate::protocol::Message::parse_str(&body).is_ok_and(|m| {
                        m.error.is_some()
                            && m.id.as_deref().and_then(|i| i.get().parse::<u64>().ok())
                                == Some(want)
                    })
                {
                    b.on_message(body.as_bytes(), related.as_ref());
                    return Ok(());
                }
                let snippet: String = body.chars().take(200).collect();
                return Err(format!("the server answered HTTP {status}: {snippet}").into());
            }
            let is_sse = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.get(..17)
                        .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
                });
            if is_sse {
                let modern = modern_headers.is_some();
                return Ok(self.read_stream(b, resp, related, expect, modern).await?);
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| format!("reading the answer failed: {}", without_url(&e)))?;
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                b.on_message(&bytes, related.as_ref());
            }
            return Ok(());
        }
        Err(SendError::from(
            "the server kept answering 404 after re-initialization".to_owned(),
        ))
    }

    /// Reads an SSE response; if it ends before our request's answer, resumes with GET +
    /// `Last-Event-ID` after the server's `retry` delay.
    async fn read_stream(
        self: &Arc<Self>,
        b: &Arc<Backend>,
        resp: reqwest::Response,
        related: Option<ReqCtx>,
        expect: Option<u64>,
        modern: bool,
    ) -> Result<(), String> {
        let mut last_id: Option<String> = None;
        let mut retry = Duration::from_millis(1000);
        let mut resp = resp;
        for _ in 0..=MAX_RESUMES {
            let mut events = resp.bytes_stream().eventsource();
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { break };
                if !ev.id.is_empty() {
                    last_id = Some(ev.id.clone());
                }
                if let Some(r) = ev.retry {
                    retry = r;
                }
                if !ev.data.trim().is_empty() && (ev.event.is_empty() || ev.event == "message") {
                    b.on_message(ev.data.as_bytes(), related.as_ref());
                    // Our answer is in: the stream has nothing more for this request.
                    if expect.is_some_and(|id| !b.is_pending(id)) {
                        return Ok(());
                    }
                }
            }
            let waiting = expect.is_some_and(|id| b.is_pending(id));
            // The stateless era has no resumption: a broken answer stream is a lost answer.
            if waiting && modern {
                return Err("the server's answer stream broke off before the answer".to_owned());
            }
            let Some(from) = last_id.clone().filter(|_| waiting) else {
                return Ok(());
            };
            tokio::time::sleep(retry).await;
            let (mut req, _) = self.request(b, reqwest::Method::GET, false);
            let h = req.headers_mut();
            h.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            h.remove(CONTENT_TYPE);
            if let Ok(v) = HeaderValue::from_str(&from) {
                h.insert("last-event-id", v);
            }
            resp = self
                .client
                .execute(req)
                .await
                .map_err(|e| format!("resuming the stream failed: {}", without_url(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("resuming the stream got HTTP {}", resp.status()));
            }
        }
        Err("the answer stream broke too many times".to_owned())
    }

    /// Keeps the standalone GET stream open for server-initiated messages. The returned
    /// receiver fires once the first GET was answered (stream open, refused, or failed), so
    /// the backend is not reported ready while server messages could still be lost.
    pub fn listen(self: Arc<Self>, b: Arc<Backend>) -> tokio::sync::oneshot::Receiver<()> {
        if b.is_modern() {
            return self.listen_modern(b);
        }
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let mut opened_tx = Some(opened_tx);
        tokio::spawn(async move {
            let mut last_id: Option<String> = None;
            let mut delay = Duration::from_millis(500);
            while !self.closed.is_cancelled() && b.state() != super::State::Stopped {
                let (mut req, _) = self.request(&b, reqwest::Method::GET, false);
                let h = req.headers_mut();
                h.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
                h.remove(CONTENT_TYPE);
                if let Some(v) = last_id
                    .as_deref()
                    .and_then(|id| HeaderValue::from_str(id).ok())
                {
                    h.insert("last-event-id", v);
                }
                let Some(resp) = self.unless_closed(self.client.execute(req)).await else {
                    return;
                };
                if let Some(tx) = opened_tx.take() {
                    let _ = tx.send(());
                }
                match resp {
                    Ok(r) if r.status().is_success() => {
                        delay = Duration::from_millis(500);
                        let mut events = r.bytes_stream().eventsource();
                        loop {
                            let Some(ev) = self.unless_closed(events.next()).await else {
                                return;
                            };
                            let Some(Ok(ev)) = ev else { break };
                            if !ev.id.is_empty() {
                                last_id = Some(ev.id.clone());
                            }
                            if let Some(r) = ev.retry {
                                delay = r;
                            }
                            if !ev.data.trim().is_empty()
                                && (ev.event.is_empty() || ev.event == "message")
                            {
                                b.on_message(ev.data.as_bytes(), None);
                            }
                        }
                    }
                    // No standalone stream offered (405) or not this session: stop asking.
                    Ok(r) if r.status() == reqwest::StatusCode::METHOD_NOT_ALLOWED => return,
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                        last_id = None;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    _ => delay = (delay * 2).min(Duration::from_secs(30)),
                }
                if self
                    .unless_closed(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        });
        opened
    }

    /// A server of the stateless era has no GET stream: a `subscriptions/listen` stream
    /// carries its list changes (none if it does not offer one).
    fn listen_modern(self: Arc<Self>, b: Arc<Backend>) -> tokio::sync::oneshot::Receiver<()> {
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let mut opened_tx = Some(opened_tx);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            let mut n = 0u64;
            let mut acknowledged = false;
            while !self.closed.is_cancelled() && b.state() != super::State::Stopped {
                n += 1;
                let listen = b.listen_request(&format!("\"relay-listen-{n}\""));
                let Some((body, method, _)) = crate::protocol::modern::attach(
                    &listen,
                    super::MODERN_CLIENT_CAPABILITIES,
                    None,
                ) else {
                    return;
                };
                let mut req = self.modern_request(&method, None);
                *req.body_mut() = Some(body.into());
                let Some(resp) = self.unless_closed(self.client.execute(req)).await else {
                    return;
                };
                if let Some(tx) = opened_tx.take() {
                    let _ = tx.send(());
                }
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let mut events = r.bytes_stream().eventsource();
                        let mut again = false;
                        loop {
                            let next = tokio::select! {
                                ev = self.unless_closed(events.next()) => ev,
                                // Subscriptions changed: the stream is opened again with them.
                                () = b.relisten.notified() => {
                                    again = true;
                                    break;
                                }
                            };
                            let Some(ev) = next else {
                                return;
                            };
                            let Some(Ok(ev)) = ev else { break };
                            let data = ev.data.trim();
                            let Ok(m) = crate::protocol::Message::parse_str(data) else {
                                continue;
                            };
                            if m.method() == crate::protocol::modern::ACKNOWLEDGED {
                                delay = Duration::from_millis(500);
                                // Changes made while no stream was open were not announced.
                                if acknowledged {
                                    let b = b.clone();
                                    tokio::spawn(async move { b.refresh_lists().await });
                                }
                                acknowledged = true;
                            } else if m.kind() == crate::protocol::Kind::Notification {
                                b.on_message(data.as_bytes(), None);
                            } else if let Some(e) = m.error.as_deref() {
                                // Refused: not offered (stop), or for now (back off).
                                let code = serde_json::from_str::<serde_json::Value>(e.get())
                                    .ok()
                                    .and_then(|v| v["code"].as_i64());
                                // Invalid params with resources asked about: those are the
                                // likely cause; list changes go on without them.
                                if code == Some(-32602) && b.drop_listened() {
                                    delay = Duration::from_millis(500);
                                    break;
                                }
                                if matches!(code, Some(-32601 | -32602)) {
                                    tracing::debug!(server = %b.name, "subscriptions/listen refused; list changes are not announced.");
                                    return;
                                }
                                break;
                            }
                        }
                        if again {
                            continue;
                        }
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    // Not offered: the server's lists are read when the relay lists them.
                    Ok(r)
                        if r.status() == reqwest::StatusCode::NOT_FOUND
                            || r.status() == reqwest::StatusCode::METHOD_NOT_ALLOWED
                            || r.status() == reqwest::StatusCode::BAD_REQUEST =>
                    {
                        tracing::debug!(server = %b.name, status = %r.status(), "No subscriptions/listen; list changes are not announced.");
                        return;
                    }
                    _ => delay = (delay * 2).min(Duration::from_secs(30)),
                }
                if self
                    .unless_closed(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        });
        opened
    }

    /// `f`'s output, or `None` once the connection is closed (the listening tasks stop).
    async fn unless_closed<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        tokio::select! {
            r = f => Some(r),
            () = self.closed.cancelled() => None,
        }
    }

    /// Ends the session politely (DELETE) and stops the GET stream.
    pub async fn shutdown(&self) {
        self.closed.cancel();
        let sid = lock(&self.session).take();
        if let Some(sid) = sid {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .delete(self.url.clone())
                    .headers(self.headers.clone())
                    .header(SESSION, sid)
                    .send(),
            )
            .await;
        }
    }
}

/// A reqwest error without the URL's query (which may hold credentials).
pub fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "the server");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
