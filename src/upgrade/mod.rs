//! In-place upgrade of a stdio relay: the running process replaces its own binary with
//! `exec`, keeping its PID, its client's pipes and its stdio servers.
//!
//! The sequence (driven by the stdio front, see `frontend::stdio`):
//! 1. [`check`]: the new binary runs in check mode (`MCP_RELAY_UPGRADE_CHECK`) on a copy of
//!    the state and the same command line; it must load the config, read the state and exit
//!    0, printing its version. Otherwise the upgrade is refused and nothing else happens.
//! 2. The front stops serving new client messages (it keeps reading, holds them, and still
//!    passes on responses and cancellations) until every request in flight has answered.
//! 3. Each stdio server's output is read up to a message boundary and its pipes are
//!    duplicated without close-on-exec ([`crate::router::Relay::hand_over`]); so is the
//!    keeper's pipe. Pending output toward the client is flushed.
//! 4. [`exec`]: the [`State`] goes into a memfd; termination signals are blocked; the new
//!    binary is executed with the same arguments and `MCP_RELAY_UPGRADE_STATE_FD` (and an
//!    fd on the previous executable, for a rollback).
//! 5. The new image ([`Inherited`]) reads the state, adopts the servers and the session,
//!    serves the held messages, then reads on. If it cannot restore, it executes the
//!    previous binary with the same state (self-rollback); that image logs why.
//!
//! The state is versioned ([`FORMAT`]); a binary reads every format up to its own.

use crate::backend::{Adopted, keeper};
use crate::session::SessionState;
use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::oneshot;

/// The state format this binary writes (and the newest it reads).
pub const FORMAT: u32 = 1;
const ENV_STATE_FD: &str = "MCP_RELAY_UPGRADE_STATE_FD";
const ENV_PREVIOUS_FD: &str = "MCP_RELAY_UPGRADE_PREVIOUS_FD";
const ENV_ROLLED_BACK: &str = "MCP_RELAY_UPGRADE_ROLLED_BACK";
const ENV_CHECK: &str = "MCP_RELAY_UPGRADE_CHECK";
/// Test hook: an image whose build tag equals this variable fails its restore (so the tests
/// can prove the self-rollback with a real second binary).
const ENV_FAIL_TAG: &str = "MCP_RELAY_UPGRADE_FAIL_TAG";
/// How long the new binary's check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything the next image needs to go on serving the client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub format: u32,
    /// The version of the binary that wrote it.
    pub written_by: String,
    pub front: FrontState,
    pub backends: Vec<Adopted>,
    /// The lists of the servers not handed over (remote ones, which reconnect).
    #[serde(default)]
    pub lists: std::collections::BTreeMap<String, crate::backend::CarriedLists>,
    pub keeper: Option<keeper::Handover>,
}

/// What [`crate::router::Relay::hand_over`] gives the next image.
pub struct Carried {
    pub backends: Vec<Adopted>,
    pub lists: std::collections::BTreeMap<String, crate::backend::CarriedLists>,
    pub keeper: Option<keeper::Handover>,
}

/// The stdio front's session and the client bytes it has read but not served.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontState {
    pub session_id: String,
    pub session: SessionState,
    /// Complete messages held while requests drained, in arrival order.
    pub held: Vec<Vec<u8>>,
    /// The start of the next message.
    pub partial: Vec<u8>,
}

impl State {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| format!("cannot write the upgrade state: {e}"))
    }

    pub fn decode(bytes: &[u8]) -> Result<State, String> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes)
            .map_err(|e| format!("the upgrade state is not readable: {e}"))?;
        if head.format > FORMAT {
            return Err(format!(
                "the upgrade state has format {}, newer than this binary reads ({FORMAT})",
                head.format
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("the upgrade state is not readable: {e}"))
    }
}

/// A request to upgrade (`SIGUSR2`, the `relay__upgrade` tool, `mcp-relay upgrade`).
pub struct Request {
    /// The new binary; default: the path this relay was started from.
    pub binary: Option<PathBuf>,
    /// The check's outcome: the new version, or why the upgrade is refused.
    pub reply: Option<oneshot::Sender<Result<String, String>>>,
}

/// A checked upgrade, ready to execute.
pub struct Plan {
    binary: PathBuf,
    /// The running executable, for a rollback (the file at its path may be the new one).
    previous: OwnedFd,
    pub version: String,
}

/// The path this process was started from, recorded before anything could replace it.
static STARTED_FROM: OnceLock<Option<PathBuf>> = OnceLock::new();

/// What a previous image handed over, read from the environment at start.
#[derive(Debug, Default)]
pub struct Inherited {
    state_fd: Option<RawFd>,
    previous_fd: Option<RawFd>,
    /// Set when this image restores after a failed upgrade: why it failed.
    pub rolled_back: Option<String>,
    /// Set when this process runs as a check of a new binary.
    pub check: bool,
}

impl Inherited {
    /// Reads and removes the upgrade variables from the environment (so no child inherits
    /// them). Must run first thing in `main`, before any thread starts.
    pub fn from_env() -> Inherited {
        let _ = STARTED_FROM.set(std::env::current_exe().ok());
        let fd = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<RawFd>().ok());
        let inherited = Inherited {
            state_fd: fd(ENV_STATE_FD),
            previous_fd: fd(ENV_PREVIOUS_FD),
            rolled_back: std::env::var(ENV_ROLLED_BACK).ok(),
            check: std::env::var_os(ENV_CHECK).is_some(),
        };
        for k in [ENV_STATE_FD, ENV_PREVIOUS_FD, ENV_ROLLED_BACK, ENV_CHECK] {
            // SAFETY: called first thing in `main`, while the process has one thread, so no
            // other thread reads the environment concurrently.
            unsafe { std::env::remove_var(k) };
        }
        inherited
    }

    /// Whether a previous image handed state over.
    pub fn upgrading(&self) -> bool {
        self.state_fd.is_some()
    }

    /// Reads the handed-over state. On failure the caller rolls back ([`Inherited::roll_back`]).
    pub fn read_state(&self) -> Result<State, String> {
        let fd = self.state_fd.ok_or("no upgrade state was handed over")?;
        let tag = crate::build_tag();
        if !tag.is_empty() && std::env::var(ENV_FAIL_TAG).is_ok_and(|t| t == tag) {
            return Err(format!(
                "this build ({tag}) is marked to fail its restore ({ENV_FAIL_TAG})"
            ));
        }
        // Kept for a rollback only: no child may inherit it.
        if let Some(p) = self.previous_fd {
            let _ = set_cloexec(p, true);
        }
        let mut file = std::fs::File::from(inherited_fd(fd).map_err(|e| e.to_string())?);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the upgrade state: {e}"))?;
        // Kept open (close-on-exec) in case this image must hand the same state back.
        let _ = file.rewind();
        let _ = file.into_raw_fd();
        State::decode(&bytes)
    }

    /// Executes the previous binary with the same state: the upgrade failed after exec.
    /// Returns only if that is impossible (the caller exits then).
    pub fn roll_back(&self, reason: &str) -> String {
        if self.rolled_back.is_some() {
            return format!("{reason}; this is already the rolled-back image");
        }
        let (Some(state), Some(previous)) = (self.state_fd, self.previous_fd) else {
            return format!("{reason}; no previous binary to return to");
        };
        tracing::error!(error = %reason, "The upgraded relay cannot restore; returning to the previous binary.");
        let mut env = vec![
            (ENV_STATE_FD, state.to_string()),
            (ENV_ROLLED_BACK, reason.to_owned()),
        ];
        env.push((ENV_PREVIOUS_FD, previous.to_string()));
        for fd in [state, previous] {
            let _ = set_cloexec(fd, false);
        }
        // SAFETY: `previous` was opened on the previous executable and handed over by it;
        // nothing in this image owns or closes it.
        let exe = unsafe { OwnedFd::from_raw_fd(previous) };
        let err = exec_fd(&exe, &env);
        let _ = exe.into_raw_fd();
        format!("{reason}; the previous binary could not be executed either: {err}")
    }
}

/// Takes ownership of a descriptor a previous image handed over, marking it close-on-exec
/// (so children started from now on do not inherit it).
pub fn inherited_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    if fd < 3 {
        return Err(std::io::Error::other("not a handed-over descriptor"));
    }
    set_cloexec(fd, true)?;
    // SAFETY: the previous image listed this descriptor once in the upgrade state; it is
    // open (the fcntl above succeeded) and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A duplicate of `fd` that stays open across `exec` (the original keeps close-on-exec).
pub fn keep_across_exec(fd: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: `fd` belongs to a live object of the caller for the duration of this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let dup = nix::unistd::dup(borrowed).map_err(std::io::Error::from)?;
    Ok(dup.into_raw_fd())
}

/// Closes a descriptor kept for an upgrade that was abandoned.
pub fn close(fd: RawFd) {
    drop(inherited_fd(fd));
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    // SAFETY: only the descriptor's flags are read and written; a closed descriptor makes
    // fcntl fail with EBADF, which is reported.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = fcntl(borrowed, FcntlArg::F_GETFD).map_err(std::io::Error::from)?;
    let mut flags = FdFlag::from_bits_truncate(flags);
    flags.set(FdFlag::FD_CLOEXEC, on);
    fcntl(borrowed, FcntlArg::F_SETFD(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Runs the new binary in check mode on `preview` (a copy of the state); the plan holds its
/// version. Nothing changes for the client when this fails.
pub async fn check(binary: Option<PathBuf>, preview: &State) -> Result<Plan, String> {
    let binary = match binary {
        Some(b) => b,
        None => STARTED_FROM
            .get()
            .cloned()
            .flatten()
            .ok_or("cannot tell which binary this relay was started from; name the new one")?,
    };
    let previous: OwnedFd = std::fs::File::open("/proc/self/exe")
        .map_err(|e| format!("cannot keep the running binary for a rollback: {e}"))?
        .into();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = tokio::process::Command::new(&binary)
        .args(&args)
        .env(ENV_CHECK, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the new binary {}: {e}", binary.display()))?;
    let state = preview.encode()?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&state).await;
    }
    let out = tokio::time::timeout(CHECK_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "the new binary {} did not finish its check within {} s",
                binary.display(),
                CHECK_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("the new binary's check failed: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(3).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "the new binary {} failed its check ({}){}",
            binary.display(),
            out.status,
            if last.is_empty() {
                String::new()
            } else {
                format!(": {}", last.join(" | "))
            }
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(Plan {
        binary,
        previous,
        version,
    })
}

/// Check mode (the new binary's side of [`check`]): reads the state on stdin; the config was
/// loaded by the caller. Prints this binary's version.
pub fn run_check() -> std::process::ExitCode {
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("mcp-relay: cannot read the upgrade state: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match State::decode(&bytes) {
        Ok(_) => {
            println!("{}", crate::version());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mcp-relay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes the state into a memfd for [`exec`] (before anything irreversible: a failure
/// here abandons the upgrade).
pub fn seal(state: &State) -> Result<RawFd, String> {
    write_memfd(state)
}

/// Executes the new binary with the state in `memfd` (from [`seal`]). Returns only if
/// neither the new nor the previous binary could be executed (the process then exits; the
/// keeper stops the servers).
pub fn exec(plan: Plan, memfd: RawFd) -> String {
    let previous = plan.previous.as_raw_fd();
    for fd in [memfd, previous] {
        if let Err(e) = set_cloexec(fd, false) {
            return format!("cannot pass a descriptor to the new binary: {e}");
        }
    }
    block_signals();
    let env = [
        (ENV_STATE_FD, memfd.to_string()),
        (ENV_PREVIOUS_FD, previous.to_string()),
    ];
    let new_err = exec_path(&plan.binary, &env);
    // The new binary could not even start: the previous one takes the state back.
    let reason = format!(
        "the new binary {} could not be executed: {new_err}",
        plan.binary.display()
    );
    tracing::error!(error = %reason, "Upgrade failed at exec; returning to the previous binary.");
    let mut env = env.to_vec();
    env.push((ENV_ROLLED_BACK, reason.clone()));
    let err = exec_fd(&plan.previous, &env);
    format!("{reason}; the previous binary could not be executed either: {err}")
}

fn write_memfd(state: &State) -> Result<RawFd, String> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let bytes = state.encode()?;
    let fd = memfd_create(c"mcp-relay-upgrade", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("cannot create the upgrade state file: {e}"))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&bytes)
        .and_then(|()| f.rewind())
        .map_err(|e| format!("cannot write the upgrade state: {e}"))?;
    Ok(f.into_raw_fd())
}

/// `execve` of `path` (a script works too) with this process's arguments and environment
/// plus `extra`.
fn exec_path(path: &std::path::Path, extra: &[(&str, String)]) -> String {
    let Ok(path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return "the path contains a NUL byte".to_owned();
    };
    let (args, env) = command_line(extra);
    match nix::unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(e) => e.to_string(),
    }
}

/// `fexecve` with this process's arguments and environment plus `extra`.
fn exec_fd(exe: &OwnedFd, extra: &[(&str, String)]) -> String {
    let (args, env) = command_line(extra);
    match nix::unistd::fexecve(exe, &args, &env) {
        Ok(never) => match never {},
        Err(e) => e.to_string(),
    }
}

/// This process's arguments, and its environment with `extra` set.
fn command_line(extra: &[(&str, String)]) -> (Vec<CString>, Vec<CString>) {
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_vec()).ok())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| k == e))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    for (k, v) in extra {
        if let Ok(c) = CString::new(format!("{k}={v}")) {
            env.push(c);
        }
    }
    (args, env)
}

const HELD_SIGNALS: [nix::sys::signal::Signal; 4] = [
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGHUP,
    nix::sys::signal::Signal::SIGUSR2,
];

fn held_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in HELD_SIGNALS {
        set.add(s);
    }
    set
}

/// Termination signals wait (pending) across the exec: the mask is inherited, and the new
/// image unblocks them once its handlers are in place ([`unblock_signals`]).
fn block_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&held_set()),
        None,
    );
}

/// Lets the signals blocked across an upgrade in (on the calling thread).
pub fn unblock_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&held_set()),
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_refuses_a_newer_format() -> Result<(), String> {
        let s = State {
            format: FORMAT,
            written_by: "1".into(),
            front: FrontState {
                session_id: "abc".into(),
                held: vec![b"{\"jsonrpc\":\"2.0\"}".to_vec()],
                partial: vec![b'{', 0xe2],
                ..FrontState::default()
            },
            backends: Vec::new(),
            lists: Default::default(),
            keeper: None,
        };
        let back = State::decode(&s.encode()?)?;
        assert_eq!(back.front.session_id, "abc");
        assert_eq!(back.front.partial, vec![b'{', 0xe2]);
        assert_eq!(back.front.held, s.front.held);
        let newer = br#"{"format": 99}"#;
        let e = State::decode(newer).err().unwrap_or_default();
        assert!(e.contains("newer"), "{e}");
        Ok(())
    }
}
