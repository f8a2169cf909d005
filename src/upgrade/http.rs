//! Upgrade of an HTTP relay: a new process takes the listening socket over.
//!
//! The running process (the predecessor) checks the new binary (as for stdio), then starts
//! it as a child with a duplicate of its listening socket and one end of a socket pair
//! (`MCP_RELAY_LISTEN_FD`, `MCP_RELAY_HANDOFF_FD`), and keeps serving. The successor
//! starts its servers, then says `ready`. Only then the predecessor stops accepting (new
//! connections wait in the socket's backlog, never refused), sends its sessions, and the
//! successor installs them, says `serving` and starts accepting (and tells systemd its new
//! `MAINPID`). The predecessor ends its event streams (clients reconnect with
//! `Last-Event-ID` after the `retry` they were given, to the successor), lets requests in
//! flight finish, and exits. A successor that exits or is not ready in time is killed and
//! the predecessor serves on (rollback).

use super::Plan;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ENV_LISTEN_FD: &str = "MCP_RELAY_LISTEN_FD";
const ENV_HANDOFF_FD: &str = "MCP_RELAY_HANDOFF_FD";

/// A successor being started (predecessor side).
pub struct Successor {
    child: std::process::Child,
    control: BufReader<tokio::net::UnixStream>,
}

impl Successor {
    /// Starts `plan`'s binary with this process's arguments, sharing `listener`.
    pub fn spawn(plan: &Plan, listener: &impl AsRawFd) -> Result<Successor, String> {
        use std::os::unix::process::CommandExt;
        let (mine, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot create the hand-off channel: {e}"))?;
        // SAFETY: the listener is open for the duration of this borrow.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        let listen: OwnedFd = borrowed
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
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", plan.binary().display()))?;
        drop((listen, theirs));
        mine.set_nonblocking(true)
            .map_err(|e| format!("cannot use the hand-off channel: {e}"))?;
        let control = tokio::net::UnixStream::from_std(mine)
            .map_err(|e| format!("cannot use the hand-off channel: {e}"))?;
        Ok(Successor {
            child,
            control: BufReader::new(control),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn expect(&mut self, word: &str, within: Duration) -> Result<(), String> {
        let mut line = String::new();
        match tokio::time::timeout(within, self.control.read_line(&mut line)).await {
            Err(_) => Err(format!(
                "the new process did not say `{word}` within {} s",
                within.as_secs()
            )),
            Ok(Err(e)) => Err(format!("the hand-off channel failed: {e}")),
            Ok(Ok(0)) => Err("the new process exited".to_owned()),
            Ok(Ok(_)) if line.trim() == word => Ok(()),
            Ok(Ok(_)) => Err(format!("the new process said `{}`", line.trim())),
        }
    }

    /// Waits until the successor has started its servers.
    pub async fn ready(&mut self, within: Duration) -> Result<(), String> {
        self.expect("ready", within).await
    }

    /// Sends the sessions; waits until the successor serves them.
    pub async fn hand(&mut self, sessions: &[u8], within: Duration) -> Result<(), String> {
        let w = self.control.get_mut();
        w.write_all(sessions)
            .await
            .and(w.write_all(b"\n").await)
            .map_err(|e| format!("cannot send the sessions: {e}"))?;
        self.expect("serving", within).await
    }

    /// The successor failed: it is killed and reaped.
    pub fn abort(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The successor's side: the listening socket and the channel to the predecessor, from
/// the environment (read and removed first thing in `main`).
pub struct Handoff {
    control: BufReader<tokio::net::UnixStream>,
}

/// Descriptors a predecessor handed over, taken from the environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct InheritedSocket {
    listen: Option<RawFd>,
    handoff: Option<RawFd>,
}

impl InheritedSocket {
    /// Reads and removes the variables. Must run while the process has one thread.
    pub fn from_env() -> InheritedSocket {
        let fd = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<RawFd>().ok());
        let s = InheritedSocket {
            listen: fd(ENV_LISTEN_FD),
            handoff: fd(ENV_HANDOFF_FD),
        };
        for k in [ENV_LISTEN_FD, ENV_HANDOFF_FD] {
            // SAFETY: called first thing in `main`, while the process has one thread.
            unsafe { std::env::remove_var(k) };
        }
        s
    }

    /// The inherited listener and hand-off channel, if this process is a successor.
    pub fn take(self) -> Option<Result<(std::net::TcpListener, Handoff), String>> {
        let (listen, handoff) = (self.listen?, self.handoff?);
        Some(
            (|| {
                let l = super::inherited_fd(listen)
                    .map_err(|e| format!("the inherited listening socket is unusable: {e}"))?;
                let h = super::inherited_fd(handoff)
                    .map_err(|e| format!("the hand-off channel is unusable: {e}"))?;
                let listener = std::net::TcpListener::from(l);
                listener
                    .set_nonblocking(true)
                    .map_err(|e| format!("the inherited listening socket is unusable: {e}"))?;
                let control = std::os::unix::net::UnixStream::from(h);
                control
                    .set_nonblocking(true)
                    .map_err(|e| format!("the hand-off channel is unusable: {e}"))?;
                Ok((listener, control))
            })()
            .and_then(|(listener, control)| {
                let control = tokio::net::UnixStream::from_std(control)
                    .map_err(|e| format!("the hand-off channel is unusable: {e}"))?;
                Ok((
                    listener,
                    Handoff {
                        control: BufReader::new(control),
                    },
                ))
            }),
        )
    }
}

impl Handoff {
    /// Says `ready` and receives the predecessor's sessions.
    pub async fn ready(&mut self) -> Result<Vec<u8>, String> {
        self.control
            .get_mut()
            .write_all(b"ready\n")
            .await
            .map_err(|e| format!("the predecessor is gone: {e}"))?;
        let mut line = Vec::new();
        let n = self
            .control
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("the predecessor is gone: {e}"))?;
        if n == 0 {
            return Err("the predecessor is gone".to_owned());
        }
        Ok(line)
    }

    /// Says `serving`: the predecessor may go.
    pub async fn serving(mut self) {
        let _ = self.control.get_mut().write_all(b"serving\n").await;
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
