//! The stdio front: newline-delimited JSON-RPC on the relay's own stdin/stdout, one session.
//!
//! stdin and stdout are owned as non-blocking pipes or sockets (Node-based clients hand
//! their servers socket pairs) with our own line buffer, so no helper thread holds bytes we
//! have not seen and an in-place upgrade can hand every byte over. Anything else (a file,
//! a terminal) falls back to tokio's reader, and upgrades are refused then. Logs never go
//! to stdout.

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

/// The client's input, and whether its bytes are all ours (a pipe or a socket we read
/// ourselves): only then can an upgrade hand them over.
pub struct Input {
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    pub upgradable: bool,
}

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

fn is_socket(fd: &OwnedFd) -> bool {
    use nix::sys::stat::SFlag;
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK
    })
}

/// A socket descriptor as a non-blocking tokio stream.
fn socket(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

fn open_input() -> std::io::Result<Input> {
    let fd = dup_fd(std::io::stdin().as_raw_fd())?;
    if is_socket(&fd) {
        return Ok(Input {
            reader: Box::new(socket(fd)?),
            upgradable: true,
        });
    }
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => Ok(Input {
            reader: Box::new(p),
            upgradable: true,
        }),
        // Not a pipe (a file or a terminal): fall back to tokio's reader.
        Err(_) => Ok(Input {
            reader: Box::new(tokio::io::stdin()),
            upgradable: false,
        }),
    }
}

fn open_output() -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    let fd = dup_fd(std::io::stdout().as_raw_fd())?;
    if is_socket(&fd) {
        return Ok(Box::new(socket(fd)?));
    }
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

/// What the writer does after a barrier (an upgrade's flush): go on, or hand over what was
/// queued after the barrier and wait.
enum Then {
    /// Write these first (carried back from an abandoned collect), then go on.
    Resume(Vec<String>),
    /// Send what is queued, then wait for the next `Then`.
    Collect(oneshot::Sender<Vec<String>>),
}

/// An upgrade's flush: the writer writes everything queued, acknowledges, then obeys the
/// `Then`s it receives (until a `Resume`).
struct Barrier {
    written: oneshot::Sender<()>,
    then: mpsc::UnboundedReceiver<Then>,
}

/// The writer toward the client: coalesces queued messages into few writes; stops at
/// barriers (see [`Barrier`]).
async fn write_out(
    mut output: Box<dyn AsyncWrite + Unpin + Send>,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut barriers: mpsc::UnboundedReceiver<Barrier>,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    let push = |buf: &mut Vec<u8>, m: &str| {
        buf.extend_from_slice(m.as_bytes());
        buf.push(b'\n');
    };
    loop {
        buf.clear();
        let barrier = tokio::select! {
            biased;
            Some(b) = barriers.recv() => Some(b),
            m = rx.recv() => match m {
                Some(first) => {
                    push(&mut buf, &first);
                    None
                }
                None => break,
            },
        };
        while buf.len() < 256 * 1024 || barrier.is_some() {
            match rx.try_recv() {
                Ok(m) => push(&mut buf, &m),
                Err(_) => break,
            }
        }
        if output.write_all(&buf).await.is_err() || output.flush().await.is_err() {
            break;
        }
        let Some(Barrier { written, mut then }) = barrier else {
            continue;
        };
        let _ = written.send(());
        // Parked: nothing is written until the upgrade resumes us (or execs).
        loop {
            match then.recv().await {
                Some(Then::Collect(out)) => {
                    let mut queued = Vec::new();
                    while let Ok(m) = rx.try_recv() {
                        queued.push(m);
                    }
                    let _ = out.send(queued);
                }
                Some(Then::Resume(first)) => {
                    buf.clear();
                    for m in &first {
                        push(&mut buf, m);
                    }
                    if !buf.is_empty()
                        && (output.write_all(&buf).await.is_err() || output.flush().await.is_err())
                    {
                        return;
                    }
                    break;
                }
                None => break,
            }
        }
    }
}

/// Serves one session over any byte streams (stdin/stdout in production).
pub async fn serve_io(
    relay: Arc<Relay>,
    input: Input,
    output: Box<dyn AsyncWrite + Unpin + Send>,
    restored: Option<FrontState>,
) -> std::io::Result<()> {
    let Input {
        reader: mut input,
        upgradable,
    } = input;
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let (barrier_tx, barriers) = mpsc::unbounded_channel::<Barrier>();
    let writer = tokio::spawn(write_out(output, rx, barriers));
    let max = relay.config().relay.max_message_bytes;
    let mut lines = LineBuffer::new(max);
    let (session, held) = match restored {
        Some(r) => {
            // What the previous image had queued for the client goes out first.
            for m in r.outgoing {
                let _ = tx.send(m);
            }
            let s = relay.open_session(r.session_id, tx.clone(), None);
            *s.state() = r.session;
            s.set_next_request_id(r.client_next_id);
            relay.set_stdio_stateless_picks(r.stateless_picks);
            relay.renew_remote_subscriptions();
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
    // Requests the previous image carried are answered here.
    relay.resume_calls(&session, &tx, &tasks);
    let open = Open::default();
    let front = Front {
        relay: &relay,
        session: &session,
        open: &open,
        tx: &tx,
        tasks: &tasks,
        barriers: &barrier_tx,
    };
    // Messages an upgrade held go first, in their order.
    for line in held {
        front.dispatch(&line);
    }
    let mut upgrades = relay.serve_upgrades();
    // A requested upgrade's check runs while the front serves on.
    let mut checking: Option<upgrade::Checking> = None;
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
            Some(req) = upgrade::next_request(&mut upgrades), if checking.is_none() => {
                if !upgradable {
                    relay.upgrade_not_done(
                        "refused",
                        "stdin is neither a pipe nor a socket, so bytes read ahead could be lost in an upgrade",
                        req.reply,
                    );
                    continue;
                }
                let preview = front.state(Vec::new(), Vec::new(), relay.preview_hand_over());
                checking = Some(req.check(relay.config().path.clone(), preview));
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
                tracing::info!(to = %plan.version, "New binary checked; upgrading once the requests in flight have answered.");
                upgrade::answer(reply, Ok(plan.version.clone()));
                let closed = front.upgrade(plan, &mut input, &mut lines, &mut chunk, max).await?;
                relay.upgrade_finished();
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
    drop(barrier_tx);
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
    barriers: &'a mpsc::UnboundedSender<Barrier>,
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

    /// The upgrade state of this front, with `carried` servers.
    fn state(
        &self,
        held: Vec<Vec<u8>>,
        partial: Vec<u8>,
        carried: upgrade::Carried,
    ) -> upgrade::State {
        let front = FrontState {
            session_id: self.session.id.clone(),
            session: self.session.state().clone(),
            client_next_id: self.session.next_request_id(),
            held,
            partial,
            outgoing: Vec::new(),
            stateless_picks: self.relay.stdio_stateless_picks(),
        };
        upgrade::State::new(front, carried)
    }

    /// Carries out a checked upgrade (see [`crate::upgrade`]): let the requests in flight
    /// answer while holding new messages, hand everything over and exec. Returns only if
    /// the upgrade was abandoned (serving goes on), with `true` when stdin closed meanwhile.
    async fn upgrade(
        &self,
        plan: upgrade::Plan,
        input: &mut Box<dyn AsyncRead + Unpin + Send>,
        lines: &mut LineBuffer,
        chunk: &mut [u8],
        max: usize,
    ) -> std::io::Result<bool> {
        let carry = plan.format >= 2;
        // Drain: answers to the relay's requests, cancellations and pings still pass; other
        // messages wait for the next image.
        let limit = self.relay.config().relay.request_timeout + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + limit;
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut eof = false;
        // Closed, so `wait` resolves once the tasks in flight are done (reopened below).
        self.tasks.close();
        let drained = loop {
            // Also the control-socket request that asked for this upgrade: its answer is
            // written before the exec.
            // Requests that only wait for a stdio server's answer are carried (if the new
            // binary reads them): the next image answers them.
            let carried = match carry {
                true => self.relay.carryable_calls(&self.session.id),
                false => 0,
            };
            let waiting = self.tasks.len().saturating_sub(carried);
            if waiting == 0 && !self.session.awaiting_client() && self.relay.control_idle() {
                break true;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break false,
                () = self.tasks.wait(), if !self.tasks.is_empty() => {}
                // The relay's requests to the client are answered through these tasks too;
                // one still open without a task is seen within 5 ms.
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
                r = input.read(chunk), if !eof => {
                    let n = r?;
                    if n == 0 {
                        eof = true;
                        continue;
                    }
                    lines.extend(&chunk[..n]);
                    while let Some(frame) = lines.next_frame() {
                        self.frame(frame, max, |line| match while_draining(line, &held) {
                            Drain::Pass => self.dispatch(line),
                            Drain::Hold => held.push(line.to_vec()),
                            Drain::Withdraw(i) => {
                                held.remove(i);
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
            let waited = limit.as_millis();
            self.relay.upgrade_not_done(
                "abandoned",
                &format!("requests (or listen streams) were still open after {waited} ms"),
                None,
            );
            resume(held);
            return Ok(false);
        }
        // No config change may start or stop a server from here to the exec.
        let changing = self.relay.changing().await;
        let abandon = |why: &str| self.relay.upgrade_not_done("abandoned", why, None);
        let mut carried = match self.relay.hand_over().await {
            Ok(c) => c,
            Err(e) => {
                abandon(&format!("a server could not be handed over: {e}"));
                drop(changing);
                resume(held);
                return Ok(false);
            }
        };
        if !carry {
            for b in &mut carried.backends {
                b.calls.clear();
            }
        }
        // The servers' readers have stopped: every task but the carried calls' (which wait
        // for answers only the next image reads) finishes with what was read, and no new
        // request to the client may be open.
        let calls: Vec<String> = carried
            .backends
            .iter()
            .flat_map(|b| b.calls.iter())
            .filter(|c| c.session == self.session.id)
            .map(|c| c.request.clone())
            .collect();
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        let settled = loop {
            if self.tasks.len() <= calls.len() && !self.session.awaiting_client() {
                break self.tasks.len() == calls.len();
            }
            if tokio::time::Instant::now() >= settle {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if !settled {
            abandon("requests were still being answered when the servers were handed over");
            drop(changing);
            self.relay.take_back(carried.backends, carried.keeper);
            resume(held);
            return Ok(false);
        }
        // Everything queued for the client is written; what comes after is carried.
        let (written, acked) = oneshot::channel();
        let (then_tx, then) = mpsc::unbounded_channel();
        let flushed = self.barriers.send(Barrier { written, then }).is_ok()
            && tokio::time::timeout(Duration::from_secs(5), acked)
                .await
                .is_ok_and(|r| r.is_ok());
        let resume_all = |carried: upgrade::Carried, outgoing: Vec<String>, held: Vec<Vec<u8>>| {
            let _ = then_tx.send(Then::Resume(outgoing));
            self.relay.take_back(carried.backends, carried.keeper);
            resume(held);
        };
        if !flushed {
            abandon("the client does not read its output");
            drop(changing);
            resume_all(carried, Vec::new(), held);
            return Ok(false);
        }
        let (out_tx, out_rx) = oneshot::channel();
        let _ = then_tx.send(Then::Collect(out_tx));
        let mut outgoing = out_rx.await.unwrap_or_default();
        // A carried call is answered by the next image only.
        if !calls.is_empty() {
            outgoing.retain(|m| {
                crate::protocol::Message::parse_str(m).map_or(true, |m| {
                    m.kind() != crate::protocol::Kind::Response
                        || !calls.iter().any(|c| c.as_str() == m.id_text())
                })
            });
        }
        let mut state = self.state(held, lines.take_rest(), carried);
        state.front.outgoing = outgoing;
        let fds = state.handed_fds();
        let err = match upgrade::write_state(&state) {
            Ok(memfd) => {
                tracing::info!(to = %plan.version, servers = state.backends.len(), "Executing the new binary.");
                upgrade::exec(plan, memfd, &fds)
            }
            Err(e) => e,
        };
        // The exec did not happen: everything goes back as it was.
        abandon(&err);
        drop(changing);
        lines.extend(&state.front.partial);
        let carried = upgrade::Carried {
            backends: state.backends,
            lists: state.lists,
            keeper: state.keeper,
        };
        resume_all(carried, state.front.outgoing, state.front.held);
        Ok(false)
    }
}

/// What an upgrade's drain does with a client message.
enum Drain {
    /// Serve it now: an answer to the relay's request, a cancellation, a ping.
    Pass,
    /// Keep it for the next image.
    Hold,
    /// A cancellation of the held message at this index: both are dropped.
    Withdraw(usize),
}

fn while_draining(line: &[u8], held: &[Vec<u8>]) -> Drain {
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        // A batch passes only if it is all answers.
        let all_answers = serde_json::from_slice::<Vec<Box<serde_json::value::RawValue>>>(line)
            .is_ok_and(|items| {
                !items.is_empty()
                    && items.iter().all(|i| {
                        Message::parse(i.get().as_bytes())
                            .is_ok_and(|m| m.kind() == protocol::Kind::Response)
                    })
            });
        return if all_answers {
            Drain::Pass
        } else {
            Drain::Hold
        };
    }
    let Ok(m) = Message::parse(line) else {
        return Drain::Hold;
    };
    if m.kind() == protocol::Kind::Response || m.method() == protocol::method::PING {
        return Drain::Pass;
    }
    if m.method() == protocol::method::CANCELLED {
        let named = m
            .params_map()
            .ok()
            .and_then(|p| p.get("requestId").map(|r| r.get().to_owned()));
        let pos = named.and_then(|id| {
            held.iter().position(|h| {
                Message::parse(h)
                    .is_ok_and(|hm| hm.kind() == protocol::Kind::Request && hm.id_text() == id)
            })
        });
        return match pos {
            Some(i) => Drain::Withdraw(i),
            None => Drain::Pass,
        };
    }
    Drain::Hold
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
                        Ok(m) => relay.handle_with(&session, m, tx, false).await,
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
