//! Stdio backends: a child process in its own process group, newline-delimited JSON-RPC on
//! its stdin/stdout (pipes the relay owns), stderr captured into our logs under the server name.

use super::Backend;
use crate::protocol::lines::{Frame, LineBuffer};
use crate::sync::lock;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::Stdio as StdStdio;
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
    pgid: i32,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    exit: watch::Receiver<Option<String>>,
    /// Fires when the child has exited and its output is drained.
    pub closed: CancellationToken,
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
        let keeper = backend.settings().keeper.clone();
        if let Some(k) = &keeper {
            k.watch(pgid);
        }
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the child's pipes were not created".to_owned());
        };
        let stdin = stdin
            .into_owned_fd()
            .and_then(pipe::Sender::from_owned_fd)
            .map_err(|e| format!("cannot own the child's stdin: {e}"))?;
        let stdout = stdout
            .into_owned_fd()
            .and_then(pipe::Receiver::from_owned_fd)
            .map_err(|e| format!("cannot own the child's stdout: {e}"))?;

        let (tx, rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(write_loop(stdin, rx));

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
        let b = backend.clone();
        let max = backend.settings().max_message_bytes();
        let done = reader_done.clone();
        tokio::spawn(async move {
            read_loop(&b, stdout, max).await;
            done.cancel();
        });
        let closed2 = closed.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Let the reader drain what the child wrote before it exited.
            let _ = tokio::time::timeout(Duration::from_millis(200), reader_done.cancelled()).await;
            let reason = match status {
                Ok(s) => format!("the process exited ({s})"),
                Err(e) => format!("the process could not be waited for: {e}"),
            };
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
            pgid,
            stderr_tail,
            exit,
            closed,
        }))
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

async fn write_loop(mut pipe: pipe::Sender, mut rx: mpsc::UnboundedReceiver<String>) {
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
            break;
        }
    }
}

async fn read_loop(b: &Arc<Backend>, mut pipe: pipe::Receiver, max: usize) {
    let mut lines = LineBuffer::new(max);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => lines.extend(&chunk[..n]),
        }
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
