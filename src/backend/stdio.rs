//! Stdio backends: a child process in its own process group, newline-delimited JSON-RPC on
//! its stdin/stdout (pipes the relay owns), stderr captured into our logs under the server name.

use super::Backend;
use crate::protocol::lines::{Frame, LineBuffer};
use crate::sync::lock;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio as StdStdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Lines of stderr kept for error reports.
const STDERR_TAIL: usize = 20;

/// A running stdio child.
pub struct Stdio {
    tx: Mutex<Option<mpsc::UnboundedSender<String>>>,
    pid: i32,
    pgid: i32,
    /// Close-on-exec duplicates of the relay's ends of the child's stdin, stdout and
    /// stderr, which an upgrade duplicates again for the next image (the originals belong
    /// to the I/O tasks and may be gone). Dropped at shutdown, so closing stdin is seen.
    held: Mutex<Option<[OwnedFd; 3]>>,
    /// The writer's pipe, put back when its queue closes during a hand-over.
    writer: Arc<Mutex<Option<pipe::Sender>>>,
    /// Set while an upgrade hands the child over: the writer keeps the pipe (not closing
    /// the child's stdin) when its queue closes.
    handing: Arc<std::sync::atomic::AtomicBool>,
    /// Woken when the writer put its pipe back or the reader stopped (a hand-over waits).
    progress: Arc<tokio::sync::Notify>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    exit: watch::Receiver<Option<String>>,
    /// Fires when the child has exited and its output is drained.
    pub closed: CancellationToken,
    /// Stops the stdout reader at a message boundary while true (an upgrade hands it over;
    /// an abandoned upgrade sets it back).
    pause: watch::Sender<bool>,
    /// What the stopped reader had read past the last complete message.
    unread: Arc<Mutex<Option<Vec<u8>>>>,
}

/// What an upgrade hands to the next image for one stdio child: its pid (also its process
/// group) and the relay's ends of its pipes, open across `exec`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    pub pid: i32,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Bytes read from its stdout past the last complete message.
    pub unread: Vec<u8>,
}

impl Handover {
    /// Its three pipes.
    pub fn fds(&self) -> [RawFd; 3] {
        [self.stdin, self.stdout, self.stderr]
    }

    /// Closes this image's handles on its pipes (the upgrade did not carry them, or the
    /// server is not kept).
    pub fn close_fds(&self) {
        for fd in self.fds() {
            crate::upgrade::close(fd);
        }
    }
}

impl Stdio {
    pub fn spawn(
        backend: &Arc<Backend>,
        command: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&Path>,
    ) -> Result<Arc<Stdio>, String> {
        let mut cmd = tokio::process::Command::new(command);
        cmd.args(args)
            .envs(env)
            .stdin(StdStdio::piped())
            .stdout(StdStdio::piped())
            .stderr(StdStdio::piped())
            .process_group(0)
            // systemd's notification socket is the relay's alone.
            .env_remove("NOTIFY_SOCKET")
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start `{command}`: {e}"))?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or("the child exited before it could be tracked")?;
        if let Some(k) = &backend.settings().keeper {
            k.watch(pgid);
        }
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the child's pipes were not created".to_owned());
        };
        let pipes = (
            stdin.into_owned_fd(),
            stdout.into_owned_fd(),
            stderr.into_owned_fd(),
        );
        let (Ok(stdin), Ok(stdout), Ok(stderr)) = pipes else {
            return Err("cannot own the child's pipes".to_owned());
        };
        let wait = Box::pin(async move {
            match child.wait().await {
                Ok(s) => format!("the process exited ({s})"),
                Err(e) => format!("the process could not be waited for: {e}"),
            }
        });
        Stdio::run(backend, pgid, [stdin, stdout, stderr], wait, Vec::new())
    }

    /// Takes over a child a previous image of the relay started (an in-place upgrade): the
    /// child goes on running with the same pipes; it is reaped by pid.
    pub fn adopt(backend: &Arc<Backend>, h: Handover) -> Result<Arc<Stdio>, String> {
        let own = |fd: RawFd| -> Result<OwnedFd, String> {
            crate::upgrade::inherited_fd(fd)
                .map_err(|e| format!("the handed-over pipe {fd} is unusable: {e}"))
        };
        let fds = [own(h.stdin)?, own(h.stdout)?, own(h.stderr)?];
        let pid = h.pid;
        // The child was started by this process (before its exec): it is still ours to
        // reap, by pid, on a thread that may block.
        let wait = Box::pin(async move {
            let waited = tokio::task::spawn_blocking(move || {
                nix::sys::wait::waitpid(Pid::from_raw(pid), None)
            })
            .await;
            match waited {
                Ok(Ok(nix::sys::wait::WaitStatus::Exited(_, code))) => {
                    format!("the process exited (exit status: {code})")
                }
                Ok(Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _))) => {
                    format!("the process exited (signal: {sig})")
                }
                Ok(Ok(other)) => format!("the process stopped ({other:?})"),
                Ok(Err(e)) => format!("the process could not be waited for: {e}"),
                Err(e) => format!("the process could not be waited for: {e}"),
            }
        });
        Stdio::run(backend, pid, fds, wait, h.unread)
    }

    /// Starts the I/O tasks over the child's pipes and the task that waits for its exit.
    fn run(
        backend: &Arc<Backend>,
        pgid: i32,
        [stdin, stdout, stderr]: [OwnedFd; 3],
        wait: futures::future::BoxFuture<'static, String>,
        unread: Vec<u8>,
    ) -> Result<Arc<Stdio>, String> {
        let keeper = backend.settings().keeper.clone();
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| format!("cannot keep the child's pipes: {e}"))
        };
        let held = [dup(&stdin)?, dup(&stdout)?, dup(&stderr)?];
        let stdin = pipe::Sender::from_owned_fd(stdin)
            .map_err(|e| format!("cannot own the child's stdin: {e}"))?;
        let stdout = pipe::Receiver::from_owned_fd(stdout)
            .map_err(|e| format!("cannot own the child's stdout: {e}"))?;
        let stderr = pipe::Receiver::from_owned_fd(stderr)
            .map_err(|e| format!("cannot own the child's stderr: {e}"))?;

        let (tx, rx) = mpsc::unbounded_channel::<String>();
        let writer = Arc::new(Mutex::new(None));
        let handing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = Arc::new(tokio::sync::Notify::new());
        spawn_writer(stdin, rx, writer.clone(), handing.clone(), progress.clone());

        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let name = backend.name.clone();
        let tail = stderr_tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(server = %name, "stderr: {line}");
                let mut t = lock(&tail);
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });

        let (exit_tx, exit) = watch::channel(None);
        let closed = CancellationToken::new();
        let reader_done = CancellationToken::new();
        let pause = watch::Sender::new(false);
        let left = Arc::new(Mutex::new(None));
        let b = backend.clone();
        let max = backend.settings().max_message_bytes();
        let done = reader_done.clone();
        let (paused, kept, woken) = (pause.subscribe(), left.clone(), progress.clone());
        tokio::spawn(async move {
            read_loop(&b, stdout, max, unread, paused, &kept, &woken).await;
            done.cancel();
        });
        let closed2 = closed.clone();
        tokio::spawn(async move {
            let reason = wait.await;
            // Let the reader drain what the child wrote before it exited.
            let _ = tokio::time::timeout(Duration::from_millis(200), reader_done.cancelled()).await;
            let _ = exit_tx.send(Some(reason));
            closed2.cancel();
            // The server is gone: what it left in its group is orphaned. Then the keeper
            // can forget the group.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            if let Some(k) = keeper {
                k.release(pgid);
            }
        });

        Ok(Arc::new(Stdio {
            tx: Mutex::new(Some(tx)),
            pid: pgid,
            pgid,
            held: Mutex::new(Some(held)),
            writer,
            handing,
            progress,
            stderr_tail,
            exit,
            closed,
            pause,
            unread: left,
        }))
    }

    /// Prepares the child for the next image of the relay: writes out what is queued for
    /// its stdin (later sends fail until [`Stdio::resume`]), stops reading its stdout at a
    /// message boundary, and returns close-on-exec duplicates of its pipes (the exec clears
    /// the flag at the last moment).
    pub async fn hand_over(&self) -> Result<Handover, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        self.handing.store(true, Ordering::SeqCst);
        lock(&self.tx).take();
        // The writer puts the pipe back once everything queued is written.
        loop {
            let wake = self.progress.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if lock(&self.writer).is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline || self.closed.is_cancelled() {
                self.resume(None);
                return Err("it does not read its input".to_owned());
            }
            let _ = tokio::time::timeout_at(deadline, wake).await;
        }
        self.pause.send_replace(true);
        let unread = loop {
            let wake = self.progress.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if let Some(rest) = lock(&self.unread).take() {
                break rest;
            }
            if tokio::time::Instant::now() >= deadline || self.closed.is_cancelled() {
                self.resume(None);
                return Err("its output reader did not stop".to_owned());
            }
            let _ = tokio::time::timeout_at(deadline, wake).await;
        };
        let kept: Result<Vec<RawFd>, String> = match lock(&self.held).as_ref() {
            Some(fds) => {
                let mut kept = Vec::new();
                for fd in fds {
                    match crate::upgrade::keep_for_exec(fd) {
                        Ok(k) => kept.push(k),
                        Err(e) => {
                            for k in kept {
                                crate::upgrade::close(k);
                            }
                            return Err(format!("cannot keep its pipes open: {e}"));
                        }
                    }
                }
                Ok(kept)
            }
            None => Err("it is shutting down".to_owned()),
        };
        let kept = match kept {
            Ok(k) => k,
            Err(e) => {
                self.resume(Some(unread));
                return Err(e);
            }
        };
        Ok(Handover {
            pid: self.pid,
            stdin: kept[0],
            stdout: kept[1],
            stderr: kept[2],
            unread,
        })
    }

    /// The upgrade was abandoned after (or during) [`Stdio::hand_over`]: writing and
    /// reading go on where they stopped.
    /// `taken`: the bytes [`Stdio::hand_over`] took from the stopped reader, given back
    /// (`None` if it took none: the reader keeps, and takes back, its own).
    pub fn resume(&self, taken: Option<Vec<u8>>) {
        if let Some(bytes) = taken {
            *lock(&self.unread) = Some(bytes);
        }
        self.pause.send_replace(false);
        let mut tx = lock(&self.tx);
        if tx.is_none() && !self.closed.is_cancelled() {
            let (new_tx, rx) = mpsc::unbounded_channel::<String>();
            *tx = Some(new_tx);
            // The old writer may still be writing: the new one starts with its pipe.
            let (slot, handing, closed, progress) = (
                self.writer.clone(),
                self.handing.clone(),
                self.closed.clone(),
                self.progress.clone(),
            );
            tokio::spawn(async move {
                let pipe = loop {
                    if let Some(p) = lock(&slot).take() {
                        break p;
                    }
                    if closed.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                handing.store(false, Ordering::SeqCst);
                spawn_writer(pipe, rx, slot, handing, progress);
            });
        }
    }

    /// The child's process id (also its process group).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn send(&self, msg: String) -> Result<(), String> {
        let guard = lock(&self.tx);
        match guard.as_ref() {
            Some(tx) => tx
                .send(msg)
                .map_err(|_| "the process's stdin is closed".to_owned()),
            None => Err("the process is shutting down".to_owned()),
        }
    }

    /// Why the child went away, with the last lines of its stderr.
    pub fn exit_reason(&self) -> String {
        let base = self
            .exit
            .borrow()
            .clone()
            .unwrap_or_else(|| "the process stopped".to_owned());
        let tail = lock(&self.stderr_tail);
        if tail.is_empty() {
            base
        } else {
            let last: Vec<&str> = tail
                .iter()
                .rev()
                .take(3)
                .rev()
                .map(String::as_str)
                .collect();
            format!("{base}; last stderr: {}", last.join(" | "))
        }
    }

    /// The spec's shutdown ladder: close stdin, wait, SIGTERM the group, wait, SIGKILL it.
    pub async fn shutdown(&self, grace: Duration) {
        // Our duplicates of its pipes go first, or closing stdin would not be seen.
        lock(&self.held).take();
        lock(&self.tx).take();
        let mut exit = self.exit.clone();
        if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_ok()
        {
            // The leader exited; members of its group may remain.
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            return;
        }
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGTERM);
        if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_err()
        {
            tracing::warn!(
                pgid = self.pgid,
                "Backend ignored SIGTERM; killing its process group."
            );
        }
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        // Never leave a process group behind, whatever path dropped us.
        if self.exit.borrow().is_none() {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
    }
}

/// Runs [`write_loop`]; when its queue closes during a hand-over, the pipe is put in
/// `slot` instead of being closed (closing it would end the child).
fn spawn_writer(
    pipe: pipe::Sender,
    rx: mpsc::UnboundedReceiver<String>,
    slot: Arc<Mutex<Option<pipe::Sender>>>,
    handing: Arc<std::sync::atomic::AtomicBool>,
    progress: Arc<tokio::sync::Notify>,
) {
    tokio::spawn(async move {
        if let Some(pipe) = write_loop(pipe, rx).await
            && handing.load(Ordering::SeqCst)
        {
            *lock(&slot) = Some(pipe);
            progress.notify_waiters();
        }
    });
}

/// Stops a server an upgrade handed over that the new image does not keep: SIGTERM to its
/// group, SIGKILL after 2 s, and the process reaped (it is this process's child).
pub fn stop_adopted(pid: i32, keeper: Option<Arc<super::keeper::Keeper>>) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    tokio::spawn(async move {
        let reaped =
            tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(Pid::from_raw(pid), None));
        let _ = tokio::time::timeout(Duration::from_secs(2), reaped).await;
        // Whatever of its group is left (the leader still running after 2 s, or children
        // it left behind).
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        if let Some(k) = keeper {
            k.release(pid);
        }
    });
}

/// Writes queued messages to the child's stdin; returns the pipe once the queue has closed
/// and everything in it is written (`None` after a write error).
async fn write_loop(
    mut pipe: pipe::Sender,
    mut rx: mpsc::UnboundedReceiver<String>,
) -> Option<pipe::Sender> {
    let mut buf = Vec::with_capacity(8192);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(first.as_bytes());
        buf.push(b'\n');
        // Coalesce whatever else is queued into one write.
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(m) => {
                    buf.extend_from_slice(m.as_bytes());
                    buf.push(b'\n');
                }
                Err(_) => break,
            }
        }
        if pipe.write_all(&buf).await.is_err() {
            return None;
        }
    }
    Some(pipe)
}

/// Reads the child's messages until its stdout closes. While `pause` is true it stops at a
/// message boundary, leaving the bytes read past it in `kept`; when `pause` turns false it
/// takes them back from `kept` and reads on.
async fn read_loop(
    b: &Arc<Backend>,
    mut pipe: pipe::Receiver,
    max: usize,
    unread: Vec<u8>,
    mut pause: watch::Receiver<bool>,
    kept: &Mutex<Option<Vec<u8>>>,
    progress: &tokio::sync::Notify,
) {
    let mut lines = LineBuffer::new(max);
    lines.extend(&unread);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        if !first {
            let read = tokio::select! {
                biased;
                _ = pause.wait_for(|p| *p) => None,
                r = pipe.read(&mut chunk) => Some(r),
            };
            match read {
                None => {
                    *lock(kept) = Some(lines.take_rest());
                    progress.notify_waiters();
                    if pause.wait_for(|p| !*p).await.is_err() {
                        return;
                    }
                    let back = lock(kept).take().unwrap_or_default();
                    lines.extend(&back);
                }
                Some(Ok(0) | Err(_)) => return,
                Some(Ok(n)) => lines.extend(&chunk[..n]),
            }
        }
        first = false;
        while let Some(frame) = lines.next_frame() {
            match frame {
                Frame::Line(l) => b.on_message(&l, None),
                Frame::TooLong { size, head, tail } => {
                    tracing::warn!(server = %b.name, bytes = size, "Backend sent a message over maxMessageBytes; dropped.");
                    // If it answered one of our requests, fail that request now (not at its timeout).
                    // (A server request carries its own id space: never fail ours by it.)
                    if let Some(id) = Some(())
                        .filter(|()| !crate::protocol::lines::has_method(&head, &tail))
                        .and_then(|()| crate::protocol::lines::sniff_id(&head, &tail))
                        .and_then(|id| id.parse::<u64>().ok())
                    {
                        b.fail(id, format!(
                            "its answer was {size} bytes, over the relay's maxMessageBytes ({}); raise `relay.maxMessageBytes` if that size is expected",
                            b.settings().max_message_bytes()
                        ));
                    }
                }
            }
        }
    }
}
