//! The keeper: a small watchdog process that stops the stdio servers' process groups when
//! the relay goes away by any path — SIGKILL and panics included — without the relay's help.
//!
//! The relay starts `mcp-relay keeper` (its own executable) in a process group of its own,
//! with a pipe on its stdin, and writes `+PGID` when a stdio server starts and `-PGID` once
//! that group is gone. When the pipe reaches end-of-file — the relay has exited, however it
//! exited, since the kernel closes the write end with the process — the keeper sends SIGTERM
//! to every group still listed, waits up to 2 s for them to go, SIGKILLs the rest and exits.
//! (A parent-death signal was not used: it fires when the *thread* that forked exits, and on
//! `exec`, which a relay upgrading itself in place does.)

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The keeper as handed to the next image by an in-place upgrade.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    pub pid: u32,
    pub fd: std::os::fd::RawFd,
}

/// The relay's end of the keeper's pipe.
#[derive(Debug)]
pub struct Keeper {
    pipe: Mutex<Option<std::fs::File>>,
    /// Kept so the keeper is not reported as a zombie while the relay runs (`None` in an
    /// image that took the keeper over from the previous one).
    _child: Option<std::process::Child>,
    pid: u32,
}

impl Keeper {
    /// Starts the keeper from the relay's own executable. `None` (logged) if it cannot start:
    /// the relay still stops its servers on every path it controls.
    pub fn start() -> Option<Keeper> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().ok()?;
        let spawned = std::process::Command::new(exe)
            .arg("keeper")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .env_remove("NOTIFY_SOCKET")
            // Its own group: a signal to the relay's group (a terminal's Ctrl-C) spares it.
            .process_group(0)
            .spawn();
        match spawned {
            Ok(mut child) => Some(Keeper {
                pipe: Mutex::new(
                    child
                        .stdin
                        .take()
                        .map(|p| std::fs::File::from(std::os::fd::OwnedFd::from(p))),
                ),
                pid: child.id(),
                _child: Some(child),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot start the keeper; stdio servers may outlive a killed relay.");
                None
            }
        }
    }

    fn send(&self, line: &str) {
        let mut pipe = crate::sync::lock(&self.pipe);
        if let Some(p) = pipe.as_mut()
            && p.write_all(line.as_bytes()).is_err()
        {
            tracing::warn!("The keeper is gone; stdio servers may outlive a killed relay.");
            *pipe = None;
        }
    }

    /// The keeper of the previous image (an in-place upgrade): its pipe, open across exec.
    /// The keeper still lists the groups it watched, so adopted servers stay covered.
    pub fn adopt(h: &Handover) -> Result<Keeper, String> {
        let fd = crate::upgrade::inherited_fd(h.fd)
            .map_err(|e| format!("the keeper's pipe {} is unusable: {e}", h.fd))?;
        Ok(Keeper {
            pipe: Mutex::new(Some(std::fs::File::from(fd))),
            _child: None,
            pid: h.pid,
        })
    }

    /// Its pipe, duplicated (close-on-exec until the exec itself) for the next image.
    pub fn hand_over(&self) -> Result<Handover, String> {
        let pipe = crate::sync::lock(&self.pipe);
        let fd = crate::upgrade::keep_for_exec(pipe.as_ref().ok_or("the keeper is gone")?)
            .map_err(|e| format!("cannot keep the keeper's pipe: {e}"))?;
        Ok(Handover { pid: self.pid, fd })
    }

    /// A stdio server's process group started.
    pub fn watch(&self, pgid: i32) {
        self.send(&format!("+{pgid}\n"));
    }

    /// A stdio server's process group is gone.
    pub fn release(&self, pgid: i32) {
        self.send(&format!("-{pgid}\n"));
    }
}

/// `mcp-relay keeper`: reads `+PGID`/`-PGID` lines until end-of-file, then stops the
/// groups still listed.
pub fn run() -> std::process::ExitCode {
    // The relay's terminal signals are not ours: only the pipe decides.
    // SAFETY: setting a signal disposition to SIG_IGN has no handler code to be unsafe.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn);
        let _ = nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn);
    }
    let mut groups: BTreeSet<i32> = BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, n) = line.split_at(line.len().min(1));
        let Ok(pgid) = n.trim().parse::<i32>() else {
            continue;
        };
        if pgid <= 1 {
            continue;
        }
        match op {
            "+" => {
                groups.insert(pgid);
            }
            "-" => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    stop(&groups);
    std::process::ExitCode::SUCCESS
}

fn stop(groups: &BTreeSet<i32>) {
    let alive = |g: &i32| killpg(Pid::from_raw(*g), None).is_ok();
    let mut left: Vec<i32> = groups.iter().copied().filter(alive).collect();
    if left.is_empty() {
        return;
    }
    eprintln!(
        "mcp-relay keeper: the relay is gone; stopping {} server process group(s)",
        left.len()
    );
    for g in &left {
        let _ = killpg(Pid::from_raw(*g), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left.retain(alive);
    }
    for g in &left {
        let _ = killpg(Pid::from_raw(*g), Signal::SIGKILL);
    }
}
