//! Upgrade of an HTTP relay: a new process takes the listening socket over.
//!
//! The running process (the predecessor) checks the new binary (as for stdio), then starts
//! it as a child with a duplicate of its listening socket and one end of a socket pair
//! (`MCP_RELAY_LISTEN_FD`, `MCP_RELAY_HANDOFF_FD`), and keeps serving. The successor
//! starts its servers, then says `ready`. Only then the predecessor stops accepting (new
//! connections wait in the socket's backlog, never refused), sends its sessions
//! (length-prefixed), and the successor installs them, tells systemd its `MAINPID`, says
//! `serving` and starts accepting (or says `refused: why` and exits, and the predecessor
//! serves on). The predecessor ends its standalone event streams (clients reconnect with
//! `Last-Event-ID` after the `retry` they were given, to the successor), answers what its
//! open connections still send with `Connection: close`, and exits. A successor that exits
//! or is not ready in time is killed and the predecessor serves on (rollback).

use super::Plan;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const ENV_LISTEN_FD: &str = "MCP_RELAY_LISTEN_FD";
const ENV_HANDOFF_FD: &str = "MCP_RELAY_HANDOFF_FD";
/// Largest session blob accepted.
const MAX_SESSIONS_BYTES: usize = 256 * 1024 * 1024;

/// A successor being started (predecessor side). Dropped before the hand-over completed
/// (the predecessor stops, or the hand-over failed), it is killed and reaped.
pub struct Successor {
    child: Option<std::process::Child>,
    control: BufReader<tokio::net::UnixStream>,
}

impl Successor {
    /// Starts `plan`'s binary with this process's arguments, sharing `listener`.
    pub fn spawn(plan: &Plan, listener: &impl AsFd) -> Result<Successor, String> {
        use std::os::unix::process::CommandExt;
        let (mine, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot create the hand-off channel: {e}"))?;
        let listen: OwnedFd = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot share the listening socket: {e}"))?;
        let theirs: OwnedFd = theirs.into();
        let (listen_fd, handoff_fd) = (listen.as_raw_fd(), theirs.as_raw_fd());
        let mut cmd = std::process::Command::new(plan.binary());
        cmd.args(std::env::args_os().skip(1))
            .env(ENV_LISTEN_FD, listen_fd.to_string())
            .env(ENV_HANDOFF_FD, handoff_fd.to_string());
        // SAFETY: runs in the child between fork and exec: only fcntl, which is
        // async-signal-safe, on two descriptors the parent keeps open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [listen_fd, handoff_fd] {
                    let flags = nix::fcntl::fcntl(
                        std::os::fd::BorrowedFd::borrow_raw(fd),
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    );
                    flags.map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        mine.set_nonblocking(true)
            .map_err(|e| format!("cannot use the hand-off channel: {e}"))?;
        let control = tokio::net::UnixStream::from_std(mine)
            .map_err(|e| format!("cannot use the hand-off channel: {e}"))?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", plan.binary().display()))?;
        drop((listen, theirs));
        Ok(Successor {
            child: Some(child),
            control: BufReader::new(control),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    async fn expect(&mut self, word: &str) -> Result<(), String> {
        let mut line = String::new();
        match self.control.read_line(&mut line).await {
            Err(e) => Err(format!("the hand-off channel failed: {e}")),
            Ok(0) => Err("the new process exited".to_owned()),
            Ok(_) if line.trim() == word => Ok(()),
            Ok(_) => Err(format!("the new process said `{}`", line.trim())),
        }
    }

    /// Waits until the successor has started its servers.
    pub async fn ready(&mut self, within: Duration) -> Result<(), String> {
        tokio::time::timeout(within, self.expect("ready"))
            .await
            .map_err(|_| {
                format!(
                    "the new process was not ready within {} s",
                    within.as_secs()
                )
            })?
    }

    /// Sends the sessions (length-prefixed) and waits until the successor serves them,
    /// all within `within`. On success the successor is on its own (not killed on drop).
    pub async fn hand(&mut self, sessions: &[u8], within: Duration) -> Result<(), String> {
        let exchange = async {
            let w = self.control.get_mut();
            w.write_all(format!("{}\n", sessions.len()).as_bytes())
                .await
                .map_err(|e| format!("cannot send the sessions: {e}"))?;
            w.write_all(sessions)
                .await
                .map_err(|e| format!("cannot send the sessions: {e}"))?;
            self.expect("serving").await
        };
        tokio::time::timeout(within, exchange).await.map_err(|_| {
            format!(
                "the new process did not take the sessions over within {} s",
                within.as_secs()
            )
        })??;
        // Reaped by whoever adopts it once this process exits.
        self.child = None;
        Ok(())
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Descriptors a predecessor handed over: the listening socket and the hand-off channel,
/// owned (and close-on-exec) from the first instant of `main`.
#[derive(Debug, Default)]
pub struct InheritedSocket(Mutex<Option<(OwnedFd, OwnedFd)>>);

impl InheritedSocket {
    /// Reads and removes the variables and takes the descriptors over, marking them
    /// close-on-exec before anything could start a child.
    ///
    /// # Safety
    /// Must run while the process has one thread (first thing in `main`): it edits the
    /// environment, and the descriptors must not be in use elsewhere.
    pub unsafe fn from_env() -> InheritedSocket {
        let fd = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<RawFd>().ok());
        let (listen, handoff) = (fd(ENV_LISTEN_FD), fd(ENV_HANDOFF_FD));
        for k in [ENV_LISTEN_FD, ENV_HANDOFF_FD] {
            // SAFETY: the caller guarantees a single thread.
            unsafe { std::env::remove_var(k) };
        }
        let (Some(listen), Some(handoff)) = (listen, handoff) else {
            return InheritedSocket::default();
        };
        if listen < 3 || handoff < 3 || listen == handoff {
            return InheritedSocket::default();
        }
        if super::set_cloexec(listen, true).is_err() || super::set_cloexec(handoff, true).is_err() {
            return InheritedSocket::default();
        }
        // SAFETY: the predecessor passed these two distinct descriptors for this process
        // alone; they are open (fcntl succeeded) and nothing else owns them yet.
        let owned = unsafe { (OwnedFd::from_raw_fd(listen), OwnedFd::from_raw_fd(handoff)) };
        InheritedSocket(Mutex::new(Some(owned)))
    }

    /// The inherited listener and hand-off channel, if this process is a successor (once).
    pub fn take(&self) -> Option<Result<(std::net::TcpListener, Handoff), String>> {
        let (listen, handoff) = crate::sync::lock(&self.0).take()?;
        Some((|| {
            let listener = std::net::TcpListener::from(listen);
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("the inherited listening socket is unusable: {e}"))?;
            let control = std::os::unix::net::UnixStream::from(handoff);
            control
                .set_nonblocking(true)
                .map_err(|e| format!("the hand-off channel is unusable: {e}"))?;
            let control = tokio::net::UnixStream::from_std(control)
                .map_err(|e| format!("the hand-off channel is unusable: {e}"))?;
            Ok((
                listener,
                Handoff {
                    control: BufReader::new(control),
                },
            ))
        })())
    }
}

/// The successor's side of the hand-off channel.
pub struct Handoff {
    control: BufReader<tokio::net::UnixStream>,
}

impl Handoff {
    /// Says `ready` and receives the predecessor's sessions. An error means the
    /// predecessor is gone or sent nothing usable: the successor must not serve then.
    pub async fn ready(&mut self) -> Result<Vec<u8>, String> {
        self.control
            .get_mut()
            .write_all(b"ready\n")
            .await
            .map_err(|e| format!("the predecessor is gone: {e}"))?;
        let mut line = String::new();
        let n = self
            .control
            .read_line(&mut line)
            .await
            .map_err(|e| format!("the predecessor is gone: {e}"))?;
        if n == 0 {
            return Err("the predecessor is gone".to_owned());
        }
        let len: usize = line
            .trim()
            .parse()
            .map_err(|_| format!("the predecessor sent `{}`", line.trim()))?;
        if len > MAX_SESSIONS_BYTES {
            return Err(format!("the sessions are too large ({len} bytes)"));
        }
        let mut blob = vec![0u8; len];
        self.control
            .read_exact(&mut blob)
            .await
            .map_err(|e| format!("the sessions broke off: {e}"))?;
        Ok(blob)
    }

    /// Says `serving`: the predecessor may go.
    pub async fn serving(mut self) {
        let _ = self.control.get_mut().write_all(b"serving\n").await;
    }

    /// Says why this process will not take over (the predecessor serves on).
    pub async fn refuse(mut self, why: &str) {
        let why = why.replace('\n', " ");
        let _ = self
            .control
            .get_mut()
            .write_all(format!("refused: {why}\n").as_bytes())
            .await;
    }
}

/// Tells systemd (under `Type=notify`) something, if it listens (`$NOTIFY_SOCKET`).
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "Cannot notify systemd.");
    }
}
