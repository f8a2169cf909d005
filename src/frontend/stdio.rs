//! The stdio front: newline-delimited JSON-RPC on the relay's own stdin/stdout, one session.
//!
//! stdin and stdout are owned as non-blocking pipes with our own line buffer (no helper
//! thread holds bytes we have not seen). Logs never go to stdout.

use crate::error::RpcError;
use crate::protocol::lines::{Frame, LineBuffer};
use crate::protocol::{self, Message};
use crate::router::Relay;
use crate::session::Session;
use crate::sync::lock;
use crate::upgrade::{self, FrontState};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Serves one client on stdin/stdout until stdin closes; `restored` is the session an
/// upgraded image carries on.
pub async fn serve(relay: Arc<Relay>, restored: Option<FrontState>) -> std::io::Result<()> {
    let input = open_input()?;
    let output = open_output()?;
    serve_io(relay, input, output, restored).await
}

fn dup_fd(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is one of the process's standard descriptors, open for its whole life;
    // borrowing it only for the duration of `try_clone_to_owned` is sound.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}

fn open_input() -> std::io::Result<Box<dyn AsyncRead + Unpin + Send>> {
    let fd = dup_fd(std::io::stdin().as_raw_fd())?;
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => Ok(Box::new(p)),
        // Not a pipe (a file or a terminal): fall back to tokio's reader.
        Err(_) => Ok(Box::new(tokio::io::stdin())),
    }
}

fn open_output() -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    let fd = dup_fd(std::io::stdout().as_raw_fd())?;
    match pipe::Sender::from_owned_fd(fd) {
        Ok(p) => Ok(Box::new(p)),
        Err(_) => {
            let raw = dup_fd(std::io::stdout().as_raw_fd())?;
            Ok(Box::new(tokio::fs::File::from_std(std::fs::File::from(
                raw,
            ))))
        }
    }
}

/// Serves one session over any byte streams (stdin/stdout in production).
pub async fn serve_io(
    relay: Arc<Relay>,
    mut input: Box<dyn AsyncRead + Unpin + Send>,
    mut output: Box<dyn AsyncWrite + Unpin + Send>,
    restored: Option<FrontState>,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // An upgrade asks the writer to write out everything queued and say when it has.
    let (flush_tx, mut flush_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            buf.clear();
            let ack = tokio::select! {
                biased;
                Some(ack) = flush_rx.recv() => Some(ack),
                m = rx.recv() => match m {
                    Some(first) => {
                        buf.extend_from_slice(first.as_bytes());
                        buf.push(b'\n');
                        None
                    }
                    None => break,
                },
            };
            while buf.len() < 256 * 1024 || ack.is_some() {
                match rx.try_recv() {
                    Ok(m) => {
                        buf.extend_from_slice(m.as_bytes());
                        buf.push(b'\n');
                    }
                    Err(_) => break,
                }
            }
            if output.write_all(&buf).await.is_err() || output.flush().await.is_err() {
                break;
            }
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        }
    });
    let max = relay.config().relay.max_message_bytes;
    let mut lines = LineBuffer::new(max);
    let (session, held) = match restored {
        Some(r) => {
            let s = relay.open_session(r.session_id, tx.clone(), None);
            *s.state() = r.session;
            lines.extend(&r.partial);
            (s, r.held)
        }
        None => (
            relay.open_session(Session::random_id(), tx.clone(), None),
            Vec::new(),
        ),
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let tasks = tokio_util::task::TaskTracker::new();
    let open = Open::default();
    let front = Front {
        relay: &relay,
        session: &session,
        open: &open,
        tx: &tx,
        tasks: &tasks,
    };
    // Messages an upgrade held go first, in their order.
    for line in held {
        front.dispatch(&line);
    }
    let mut upgrades = relay.serve_upgrades();
    loop {
        tokio::select! {
            r = input.read(&mut chunk) => {
                let n = r?;
                if n == 0 {
                    break;
                }
                lines.extend(&chunk[..n]);
                while let Some(frame) = lines.next_frame() {
                    front.frame(frame, max, |line| front.dispatch(line));
                }
            }
            Some(req) = upgrades.recv() => {
                let closed = front
                    .upgrade(req, &mut input, &mut lines, &mut chunk, max, &flush_tx)
                    .await?;
                if closed {
                    break;
                }
            }
        }
    }
    tracing::info!("stdin closed; shutting down.");
    relay.close_session(&session).await;
    // Stateless requests and listen streams end with their client.
    for (_, (_, t)) in lock(&open).drain() {
        t.cancel();
    }
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), tasks.wait()).await;
    drop(tx);
    drop(session);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
    Ok(())
}

/// The stdio front's parts that serving a message needs.
struct Front<'a> {
    relay: &'a Arc<Relay>,
    session: &'a Arc<Session>,
    open: &'a Open,
    tx: &'a mpsc::UnboundedSender<String>,
    tasks: &'a tokio_util::task::TaskTracker,
}

impl Front<'_> {
    fn dispatch(&self, line: &[u8]) {
        dispatch(
            self.relay,
            self.session,
            self.open,
            self.tx,
            self.tasks,
            line,
        );
    }

    /// Serves a complete line with `serve`; answers an oversized one with an error.
    fn frame(&self, frame: Frame, max: usize, serve: impl FnOnce(&[u8])) {
        match frame {
            Frame::TooLong { size, head, tail } => {
                // Only a request gets an answer under its id.
                let id = Some(())
                    .filter(|()| crate::protocol::lines::has_method(&head, &tail))
                    .and_then(|()| crate::protocol::lines::sniff_id(&head, &tail));
                let id = id.as_deref().unwrap_or("null");
                let _ = self
                    .tx
                    .send(RpcError::TooLarge { size, max }.to_response(id));
            }
            Frame::Line(line) => serve(&line),
        }
    }

    /// Carries out an upgrade (see [`crate::upgrade`]): check the new binary, let the
    /// requests in flight answer while holding new ones, hand everything over and exec.
    /// Returns only if the upgrade was refused or abandoned (serving goes on), or with
    /// `true` when stdin closed meanwhile.
    async fn upgrade(
        &self,
        req: upgrade::Request,
        input: &mut Box<dyn AsyncRead + Unpin + Send>,
        lines: &mut LineBuffer,
        chunk: &mut [u8],
        max: usize,
        flush: &mpsc::UnboundedSender<oneshot::Sender<()>>,
    ) -> std::io::Result<bool> {
        let upgrade::Request { binary, reply } = req;
        let answer = |r: Result<String, String>| {
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        };
        let mut state = upgrade::State {
            format: upgrade::FORMAT,
            written_by: crate::version(),
            front: FrontState {
                session_id: self.session.id.clone(),
                session: self.session.state().clone(),
                ..FrontState::default()
            },
            backends: Vec::new(),
            lists: Default::default(),
            keeper: None,
        };
        let plan = match upgrade::check(binary, &state).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "Upgrade refused; serving on.");
                self.relay.metrics.upgrade("refused");
                answer(Err(e));
                return Ok(false);
            }
        };
        tracing::info!(to = %plan.version, "New binary checked; upgrading once the requests in flight have answered.");
        answer(Ok(plan.version.clone()));
        // Drain: responses (to the servers' requests) and cancellations still pass; other
        // messages wait for the next image.
        let limit = self.relay.config().relay.request_timeout + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + limit;
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut eof = false;
        self.tasks.close();
        let drained = loop {
            if self.tasks.is_empty() {
                break true;
            }
            tokio::select! {
                () = self.tasks.wait() => break true,
                () = tokio::time::sleep_until(deadline) => break false,
                r = input.read(chunk), if !eof => {
                    let n = r?;
                    if n == 0 {
                        eof = true;
                        continue;
                    }
                    lines.extend(&chunk[..n]);
                    while let Some(frame) = lines.next_frame() {
                        self.frame(frame, max, |line| {
                            if passes_while_draining(line) {
                                self.dispatch(line);
                            } else {
                                held.push(line.to_vec());
                            }
                        });
                    }
                }
            }
        };
        self.tasks.reopen();
        let resume = |held: Vec<Vec<u8>>| {
            for line in held {
                self.dispatch(&line);
            }
        };
        if eof {
            resume(held);
            return Ok(true);
        }
        if !drained {
            tracing::error!(
                waited_ms = limit.as_millis() as u64,
                "Upgrade abandoned: requests (or listen streams) were still open; serving on."
            );
            self.relay.metrics.upgrade("abandoned");
            resume(held);
            return Ok(false);
        }
        let carried = match self.relay.hand_over().await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "Upgrade abandoned: a server could not be handed over; serving on.");
                self.relay.metrics.upgrade("abandoned");
                resume(held);
                return Ok(false);
            }
        };
        let (ack, acked) = oneshot::channel();
        if flush.send(ack).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), acked).await;
        }
        state.front.session = self.session.state().clone();
        state.front.held = held;
        state.front.partial = lines.take_rest();
        state.backends = carried.backends;
        state.lists = carried.lists;
        state.keeper = carried.keeper;
        let memfd = match upgrade::seal(&state) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "Upgrade abandoned; serving on.");
                self.relay.metrics.upgrade("abandoned");
                self.relay.take_back(state.backends, state.keeper);
                lines.extend(&state.front.partial);
                resume(state.front.held);
                return Ok(false);
            }
        };
        tracing::info!(to = %plan.version, servers = state.backends.len(), "Executing the new binary.");
        let err = upgrade::exec(plan, memfd);
        // Neither binary could be executed: nothing can serve the client any more.
        tracing::error!(error = %err, "Upgrade failed; exiting.");
        std::process::exit(70);
    }
}

/// Messages served while an upgrade drains: answers to the servers' requests and
/// cancellations (they help requests in flight finish). Everything else waits.
fn passes_while_draining(line: &[u8]) -> bool {
    match Message::parse(line) {
        Ok(m) => m.kind() == protocol::Kind::Response || m.method() == protocol::method::CANCELLED,
        Err(_) => false,
    }
}

/// Cancels the stateless request or listen stream a `notifications/cancelled` names; false
/// when it names none (it is then the session's).
fn cancel_open(open: &Open, msg: &Message) -> bool {
    let id = msg
        .params_map()
        .ok()
        .and_then(|p| p.get("requestId").map(|r| r.get().to_owned()));
    match id.and_then(|id| lock(open).remove(&id)) {
        Some((_, t)) => {
            t.cancel();
            true
        }
        None => false,
    }
}

/// Stateless requests and `subscriptions/listen` streams in progress, by the raw id of
/// their request: `notifications/cancelled` naming one ends it.
/// Each entry carries a serial number, so a finished request removes its own entry only.
type Open = Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, CancellationToken)>>>;

/// Serial numbers of [`Open`] entries.
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn dispatch(
    relay: &Arc<Relay>,
    session: &Arc<Session>,
    open: &Open,
    tx: &mpsc::UnboundedSender<String>,
    tasks: &tokio_util::task::TaskTracker,
    line: &[u8],
) {
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        // A JSON-RPC batch (protocol 2025-03-26): answer with an array.
        let items: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(RpcError::Parse(e.to_string()).to_response("null"));
                return;
            }
        };
        let relay = relay.clone();
        let session = session.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let futs = items.iter().map(|item| {
                let relay = relay.clone();
                let session = session.clone();
                let tx = tx.clone();
                async move {
                    match Message::parse(item.get().as_bytes()) {
                        Ok(m) => relay.handle(&session, m, tx).await,
                        Err(e) => Some(RpcError::InvalidRequest(e.to_string()).to_response("null")),
                    }
                }
            });
            let answers: Vec<String> = futures::future::join_all(futs)
                .await
                .into_iter()
                .flatten()
                .collect();
            if !answers.is_empty() {
                let _ = tx.send(format!("[{}]", answers.join(",")));
            }
        });
        return;
    }
    match Message::parse(line) {
        Ok(msg) if msg.method() == protocol::method::CANCELLED && cancel_open(open, &msg) => {}
        Ok(msg) if protocol::modern::names_version(&msg) => {
            // A stateless (2026-07-28) message: served on its own, beside the session.
            if msg.kind() != protocol::Kind::Request {
                return;
            }
            let id = msg.id_text().to_owned();
            let token = CancellationToken::new();
            let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            {
                let mut open = lock(open);
                if open.contains_key(&id) {
                    let _ = tx.send(protocol::error_response(
                        &id,
                        protocol::code::INVALID_REQUEST,
                        "this id is already used by a request still in progress; use a fresh id",
                        None,
                    ));
                    return;
                }
                open.insert(id.clone(), (serial, token.clone()));
            }
            let relay = relay.clone();
            let tx = tx.clone();
            let open = open.clone();
            tasks.spawn(async move {
                if msg.method() == protocol::modern::LISTEN {
                    let listened = tokio::select! {
                        r = relay.listen(msg, None, tx.clone()) => Some(r),
                        () = token.cancelled() => None,
                    };
                    match listened {
                        Some(Ok(s)) => {
                            tokio::select! {
                                () = token.cancelled() => relay.close_session(&s).await,
                                () = s.closed().cancelled() => {}
                            }
                        }
                        Some(Err(reply)) => {
                            let _ = tx.send(reply.body);
                        }
                        None => {}
                    }
                } else {
                    // A cancelled request gets no answer; dropping its future closes its
                    // session, which cancels what it had sent to the backends.
                    let reply = tokio::select! {
                        r = relay.stateless(msg, None, tx.clone()) => r,
                        () = token.cancelled() => None,
                    };
                    if let Some(reply) = reply {
                        let _ = tx.send(reply.body);
                    }
                }
                let mut open = lock(&open);
                if open.get(&id).is_some_and(|(n, _)| *n == serial) {
                    open.remove(&id);
                }
            });
        }
        Ok(msg) => {
            let relay = relay.clone();
            let session = session.clone();
            let tx = tx.clone();
            tasks.spawn(async move {
                if let Some(reply) = relay.handle(&session, msg, tx.clone()).await {
                    let _ = tx.send(reply);
                }
            });
        }
        Err(e) => {
            // Answer with the id when the frame was valid JSON with one.
            let id = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .filter(|i| i.is_string() || i.is_number())
                .map_or_else(|| "null".to_owned(), |i| i.to_string());
            let err = match e {
                protocol::ParseError::Json(j) => RpcError::Parse(j.to_string()),
                protocol::ParseError::Invalid(s) => RpcError::InvalidRequest(s.to_owned()),
            };
            let _ = tx.send(err.to_response(&id));
        }
    }
}
