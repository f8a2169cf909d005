//! In-place upgrade of a stdio relay: the running process replaces its own binary with
//! `execve`, keeping its PID, its client's pipes and its stdio servers.
//!
//! The sequence (driven by the stdio front, `frontend::stdio`):
//! 1. [`check`]: the new binary runs `mcp-relay upgrade-check --config F` on a copy of the
//!    state (the front serves on meanwhile); it must load the config, read the state and
//!    answer `upgrade-check ok format=N version=V`. A binary without the subcommand (one
//!    that predates upgrades) fails it. Otherwise the upgrade is refused, nothing changes.
//! 2. The front stops serving new client messages (it keeps reading, holds them, and still
//!    passes on responses, cancellations and pings) until every request in flight and
//!    every request to the client has been answered.
//! 3. Each stdio server's queued input is written and its output is read up to a message
//!    boundary; its pipes and the keeper's pipe are duplicated (close-on-exec until the
//!    last moment, so no child started meanwhile inherits them); output toward the client
//!    is written up to a barrier and what is queued after it is carried.
//! 4. [`exec`]: the [`State`] goes into a memfd; the handed-over descriptors lose
//!    close-on-exec; termination signals are blocked on the calling (main) thread (every
//!    other thread has them blocked from the start, see [`block_signals_at_start`]); the
//!    new binary is executed with the same arguments, `MCP_RELAY_UPGRADE_STATE_FD` and an
//!    fd on the running executable for a rollback. If `execve` fails, all of that is
//!    undone and the relay serves on.
//! 5. The new image ([`Inherited`]) reads the state, marks the handed-over descriptors
//!    close-on-exec, adopts the servers and the session, writes the carried output, serves
//!    the held messages, then reads on. If it cannot restore, it executes the previous
//!    binary with the same state (self-rollback); that image logs why.
//!
//! The state is versioned ([`FORMAT`]); a binary reads every format up to its own.

pub mod http;

use crate::backend::{Adopted, keeper};
use crate::session::SessionState;
use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// The state format this binary writes (and the newest it reads). 2: stdio servers carry
/// the client requests waiting for their answers (`Adopted::calls`); a new binary that
/// reads only format 1 gets format 1, and the upgrade waits for those requests instead.
pub const FORMAT: u32 = 2;
const ENV_STATE_FD: &str = "MCP_RELAY_UPGRADE_STATE_FD";
const ENV_PREVIOUS_FD: &str = "MCP_RELAY_UPGRADE_PREVIOUS_FD";
const ENV_ROLLED_BACK: &str = "MCP_RELAY_UPGRADE_ROLLED_BACK";
/// Test hook: an image whose build tag equals this variable fails its restore (so the tests
/// can prove the self-rollback with a real second binary). Builds without a tag ignore it.
const ENV_FAIL_TAG: &str = "MCP_RELAY_UPGRADE_FAIL_TAG";
/// Test hook: a build whose tag this names panics while taking over (after the exec).
const ENV_PANIC_TAG: &str = "MCP_RELAY_UPGRADE_PANIC_TAG";
/// How long the new binary's check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// The start of the answer of a binary that can take an upgrade over.
const CHECK_OK: &str = "upgrade-check ok";

/// Everything the next image needs to go on serving the client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub format: u32,
    /// The version of the binary that wrote it.
    pub written_by: String,
    /// Upgrades so far in this process (the first image is 0).
    #[serde(default)]
    pub generation: u64,
    /// The path the relay was first started from (the default binary of the next upgrade).
    #[serde(default)]
    pub started_from: Option<PathBuf>,
    pub front: FrontState,
    pub backends: Vec<Adopted>,
    /// The lists of the servers not handed over (remote ones, which reconnect).
    #[serde(default)]
    pub lists: std::collections::BTreeMap<String, crate::backend::CarriedLists>,
    pub keeper: Option<keeper::Handover>,
}

/// What [`crate::router::Relay::hand_over`] gives the next image.
#[derive(Default)]
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
    /// The next id of a request the relay sends the client (`relay-N`).
    #[serde(default)]
    pub client_next_id: u64,
    /// Complete messages held while requests drained, in arrival order.
    pub held: Vec<Vec<u8>>,
    /// The start of the next message.
    pub partial: Vec<u8>,
    /// Messages for the client queued after the last write (written first by the next image).
    #[serde(default)]
    pub outgoing: Vec<String>,
    /// What `relay__analyze_prompt` exposed to the client's stateless (2026-07-28) requests.
    #[serde(default)]
    pub stateless_picks: Option<Vec<String>>,
}

impl State {
    /// This process's state with `front` and the `carried` servers.
    pub fn new(front: FrontState, carried: Carried) -> State {
        // Format 1 when nothing needs 2, so a binary that reads only 1 can take it.
        let calls = carried.backends.iter().any(|b| !b.calls.is_empty());
        State {
            format: if calls { FORMAT } else { 1 },
            written_by: crate::version(),
            generation: generation(),
            started_from: started_from(),
            front,
            backends: carried.backends,
            lists: carried.lists,
            keeper: carried.keeper,
        }
    }

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

    /// Every descriptor the state hands over (the servers' pipes, the keeper's pipe).
    pub fn handed_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.backends.iter().flat_map(|a| a.stdio.fds()).collect();
        fds.extend(self.keeper.as_ref().map(|k| k.fd));
        fds.retain(|fd| *fd > 2);
        fds
    }
}

/// Whoever asked for an upgrade, told once: the new version, or why it is not done.
pub type Reply = Option<oneshot::Sender<Result<String, String>>>;

/// Tells whoever asked (nobody, for a signal).
pub fn answer(reply: Reply, r: Result<String, String>) {
    if let Some(reply) = reply {
        let _ = reply.send(r);
    }
}

/// A request to upgrade (`SIGUSR2`, the `relay__upgrade` tool, `mcp-relay upgrade`).
pub struct Request {
    /// The new binary; default: the path this relay was started from.
    pub binary: Option<PathBuf>,
    /// The check's outcome: the new version, or why the upgrade is refused.
    pub reply: Reply,
}

/// A requested upgrade's check, run beside the front's serving.
pub type Checking =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Result<Plan, String>, Reply)> + Send>>;

impl Request {
    /// Starts checking the new binary on `preview` (a copy of the state without
    /// descriptors), with the config file `config`.
    pub fn check(self, config: Option<PathBuf>, preview: State) -> Checking {
        let Request { binary, reply } = self;
        Box::pin(async move { (check(binary, config.as_deref(), &preview).await, reply) })
    }
}

/// The next upgrade request, for a front's `select!`: never, if the front takes none.
pub async fn next_request(
    upgrades: &mut Option<tokio::sync::mpsc::Receiver<Request>>,
) -> Option<Request> {
    match upgrades.as_mut() {
        Some(u) => u.recv().await,
        None => None,
    }
}

/// The outcome of the check under way, for a front's `select!`: never, if none is.
pub async fn checked(checking: &mut Option<Checking>) -> (Result<Plan, String>, Reply) {
    match checking.as_mut() {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// A checked upgrade, ready to execute.
pub struct Plan {
    /// The newest state format the new binary reads (its check says).
    pub format: u32,
    binary: PathBuf,
    /// The running executable, for the new image's rollback (the file at its path may be
    /// the new one by now).
    previous: OwnedFd,
    pub version: String,
}

impl Plan {
    /// The new binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// The path this relay was first started from, recorded before anything could replace it.
static STARTED_FROM: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Upgrades so far in this process.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Set by the signal handler when SIGTERM or SIGINT arrived (an exec must not swallow it).
static TERMINATING: AtomicBool = AtomicBool::new(false);

/// The path the next upgrade executes by default.
pub fn started_from() -> Option<PathBuf> {
    crate::sync::lock(&STARTED_FROM).clone()
}

/// Sets the path the next upgrade executes by default (carried from the first process).
pub fn set_started_from(p: PathBuf) {
    *crate::sync::lock(&STARTED_FROM) = Some(p);
}

/// How many upgrades this process has been through.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// This process continues `n` upgrades (an HTTP successor learns it from its predecessor).
pub fn set_generation(n: u64) {
    GENERATION.store(n, Ordering::Relaxed);
}

/// Records that a termination signal arrived (see [`exec`]).
pub fn note_terminating() {
    TERMINATING.store(true, Ordering::SeqCst);
}

/// What a previous image handed over, read from the environment at start.
#[derive(Debug, Default)]
pub struct Inherited {
    state_fd: Option<RawFd>,
    previous_fd: Option<RawFd>,
    /// Set when this image restores after a failed upgrade: why it failed.
    pub rolled_back: Option<String>,
    /// An HTTP relay's listening socket handed over by its predecessor.
    pub socket: http::InheritedSocket,
}

impl Inherited {
    /// Reads and removes the upgrade variables from the environment (so no child inherits
    /// them). Must run first thing in `main`, before any thread starts.
    pub fn from_env() -> Inherited {
        *crate::sync::lock(&STARTED_FROM) = std::env::current_exe().ok();
        let fd = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<RawFd>().ok());
        let inherited = Inherited {
            state_fd: fd(ENV_STATE_FD),
            previous_fd: fd(ENV_PREVIOUS_FD),
            rolled_back: std::env::var(ENV_ROLLED_BACK).ok(),
            // SAFETY: `from_env` runs first thing in `main`, while the process has one
            // thread and nothing uses the handed-over descriptors.
            socket: unsafe { http::InheritedSocket::from_env() },
        };
        for k in [ENV_STATE_FD, ENV_PREVIOUS_FD, ENV_ROLLED_BACK] {
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

    /// Reads the handed-over state and marks every descriptor it names close-on-exec (no
    /// child may inherit them). Runs before the async runtime starts. On failure the caller
    /// rolls back ([`Inherited::roll_back`]).
    pub fn read_state(&self) -> Result<State, String> {
        let fd = self.state_fd.ok_or("no upgrade state was handed over")?;
        // Kept for a rollback only.
        if let Some(p) = self.previous_fd {
            let _ = set_cloexec(p, true);
        }
        set_cloexec(fd, true).map_err(|e| format!("the upgrade state is unusable: {e}"))?;
        // The memfd stays open for a rollback.
        let bytes = read_fd(fd).map_err(|e| format!("cannot read the upgrade state: {e}"))?;
        let state = State::decode(&bytes)?;
        for fd in state.handed_fds() {
            set_cloexec(fd, true)
                .map_err(|e| format!("a handed-over descriptor ({fd}) is unusable: {e}"))?;
        }
        if let Some(e) = fail_hook() {
            return Err(e);
        }
        if let Some(p) = &state.started_from {
            set_started_from(p.clone());
        }
        set_generation(match self.rolled_back {
            Some(_) => state.generation,
            None => state.generation + 1,
        });
        Ok(state)
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
        roll_back_to(state, previous, reason)
    }

    /// Until [`disarm_panic_rollback`]: a panic while this image starts (after reading the
    /// state, before it adopts the servers, so nothing handed over has been touched yet)
    /// executes the previous binary with the same state instead of ending the process, so
    /// the client keeps its session. (A crash that is not a panic, such as a segfault, or a
    /// panic later, still ends it.)
    pub fn arm_panic_rollback(&self) {
        let (Some(state), Some(previous), None) =
            (self.state_fd, self.previous_fd, &self.rolled_back)
        else {
            return;
        };
        *crate::sync::lock(&ARMED) = Some((state, previous));
        let chained = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Held until the exec: disarming (on the main thread) waits for it.
            let mut armed = crate::sync::lock(&ARMED);
            if let Some((state, previous)) = armed.take() {
                // No tracing here: the panic may have come from inside the logger.
                let reason = format!("the new binary panicked while taking over: {info}");
                eprintln!("mcp-relay: {reason}; returning to the previous binary");
                let err = roll_back_to(state, previous, &reason);
                eprintln!("mcp-relay: {err}");
            }
            drop(armed);
            chained(info);
        }));
    }
}

/// The previous image's state and executable while a panic still rolls back.
static ARMED: Mutex<Option<(RawFd, RawFd)>> = Mutex::new(None);

/// The new image has taken over (it reads its client from now on): a panic no longer
/// returns to the previous binary, whose state would be stale.
pub fn disarm_panic_rollback() {
    crate::sync::lock(&ARMED).take();
}

/// The test hook ([`ENV_PANIC_TAG`]): whether this image must panic while taking over.
pub fn panic_hook() -> Option<String> {
    let tag = crate::build_tag();
    (!tag.is_empty() && std::env::var(ENV_PANIC_TAG).is_ok_and(|t| t == tag))
        .then(|| format!("this build ({tag}) is marked to panic taking over ({ENV_PANIC_TAG})"))
}

/// Executes the `previous` binary with the `state` memfd (see [`Inherited::roll_back`]).
fn roll_back_to(state: RawFd, previous: RawFd, reason: &str) -> String {
    // As for the upgrade's exec: termination and upgrade signals wait for the handlers of
    // the image that takes over.
    block_signals();
    // The descriptors named in the state go back to the previous image as they came.
    if let Ok(bytes) = read_fd(state)
        && let Ok(st) = State::decode(&bytes)
    {
        for fd in st.handed_fds() {
            let _ = set_cloexec(fd, false);
        }
    }
    for fd in [state, previous] {
        let _ = set_cloexec(fd, false);
    }
    let env = [
        (ENV_STATE_FD, state.to_string()),
        (ENV_ROLLED_BACK, reason.to_owned()),
        (ENV_PREVIOUS_FD, previous.to_string()),
    ];
    // SAFETY: `previous` was opened on the previous executable and handed over by it;
    // nothing in this image owns or closes it (the OwnedFd is turned back into a raw
    // descriptor below if the exec fails).
    let exe = unsafe { OwnedFd::from_raw_fd(previous) };
    let err = exec_fd(&exe, &env);
    let _ = exe.into_raw_fd();
    format!("{reason}; the previous binary could not be executed either: {err}")
}

/// The test hook ([`ENV_FAIL_TAG`]): why this image must fail to take over, if it must.
pub fn fail_hook() -> Option<String> {
    let tag = crate::build_tag();
    (!tag.is_empty() && std::env::var(ENV_FAIL_TAG).is_ok_and(|t| t == tag))
        .then(|| format!("this build ({tag}) is marked to fail taking over ({ENV_FAIL_TAG})"))
}

/// The whole content of a memfd, from its start, leaving it open.
fn read_fd(fd: RawFd) -> std::io::Result<Vec<u8>> {
    // SAFETY: the File is never dropped (ManuallyDrop), so the descriptor, owned by the
    // caller, stays open.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    (&*file).rewind()?;
    let mut bytes = Vec::new();
    (&*file).read_to_end(&mut bytes)?;
    (&*file).rewind()?;
    Ok(bytes)
}

/// Takes ownership of a descriptor a previous image handed over (listed in its state, so
/// already marked close-on-exec by [`Inherited::read_state`]).
pub fn inherited_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    if fd < 3 {
        return Err(std::io::Error::other("not a handed-over descriptor"));
    }
    set_cloexec(fd, true)?;
    // SAFETY: the previous image listed this descriptor once in the upgrade state; it is
    // open (the fcntl above succeeded) and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd` for the next image, as a raw descriptor the upgrade
/// state names ([`exec`] clears close-on-exec at the last moment; [`close`] if abandoned).
pub fn keep_for_exec(fd: &impl std::os::fd::AsFd) -> std::io::Result<RawFd> {
    Ok(fd.as_fd().try_clone_to_owned()?.into_raw_fd())
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

/// Runs `binary upgrade-check` on `preview` (a copy of the state with no descriptors); the
/// plan holds its version. Nothing changes for the client when this fails.
pub async fn check(
    binary: Option<PathBuf>,
    config: Option<&Path>,
    preview: &State,
) -> Result<Plan, String> {
    let binary = match binary {
        Some(b) => b,
        None => started_from()
            .ok_or("cannot tell which binary this relay was started from; name the new one")?,
    };
    let previous: OwnedFd = std::fs::File::open("/proc/self/exe")
        .map_err(|e| format!("cannot keep the running binary for a rollback: {e}"))?
        .into();
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.arg("upgrade-check");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the new binary {}: {e}", binary.display()))?;
    let state = preview.encode()?;
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&state).await;
        }
    };
    let run = async {
        let (_, out) = tokio::join!(feed, child.wait_with_output());
        out
    };
    let out = tokio::time::timeout(CHECK_TIMEOUT, run)
        .await
        .map_err(|_| {
            format!(
                "the new binary {} did not finish its check within {} s",
                binary.display(),
                CHECK_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("the new binary's check failed: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    let answer = said.lines().rev().find(|l| l.starts_with(CHECK_OK));
    let version = answer.and_then(|a| {
        a.split_whitespace()
            .find_map(|w| w.strip_prefix("version="))
            .map(str::to_owned)
    });
    let format = answer
        .and_then(|a| {
            a.split_whitespace()
                .find_map(|w| w.strip_prefix("format="))
                .and_then(|f| f.parse().ok())
        })
        .unwrap_or(1);
    match (out.status.success(), version) {
        (true, Some(version)) => Ok(Plan {
            format,
            binary,
            previous,
            version,
        }),
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last: Vec<&str> = err.lines().rev().take(3).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            Err(format!(
                "the new binary {} failed its check ({}){}",
                binary.display(),
                out.status,
                if last.is_empty() {
                    " without saying why (a binary that predates in-place upgrades has no `upgrade-check`)".to_owned()
                } else {
                    format!(": {}", last.join(" | "))
                }
            ))
        }
    }
}

/// `mcp-relay upgrade-check` (the new binary's side of [`check`]): reads the state on
/// stdin; the config was loaded by the caller.
pub fn run_check() -> std::process::ExitCode {
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("mcp-relay: cannot read the upgrade state: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match State::decode(&bytes) {
        Ok(_) => {
            println!("{CHECK_OK} format={FORMAT} version={}", crate::version());
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
pub fn write_state(state: &State) -> Result<RawFd, String> {
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

/// Executes the new binary with the state in `memfd` (from [`write_state`]), handing over
/// `fds`. Must run on the main thread (see [`block_signals_at_start`]). Returns only if the
/// exec did not happen, with everything undone (descriptors close-on-exec again, signals
/// unblocked): the caller abandons the upgrade and serves on.
pub fn exec(plan: Plan, memfd: RawFd, fds: &[RawFd]) -> String {
    let previous = plan.previous.as_raw_fd();
    let mut passed: Vec<RawFd> = vec![memfd, previous];
    passed.extend_from_slice(fds);
    let undo = |upto: &[RawFd]| {
        for fd in upto {
            let _ = set_cloexec(*fd, true);
        }
    };
    for (i, fd) in passed.iter().enumerate() {
        if let Err(e) = set_cloexec(*fd, false) {
            undo(&passed[..i]);
            return format!("cannot pass descriptor {fd} to the new binary: {e}");
        }
    }
    block_signals();
    // A termination signal that arrived before the block must not be lost in the exec.
    if TERMINATING.load(Ordering::SeqCst) {
        undo(&passed);
        unblock_signals();
        return "a termination signal arrived; stopping instead".to_owned();
    }
    let env = [
        (ENV_STATE_FD, memfd.to_string()),
        (ENV_PREVIOUS_FD, previous.to_string()),
    ];
    let err = exec_path(&plan.binary, &env);
    undo(&passed);
    unblock_signals();
    close(memfd);
    format!(
        "the new binary {} could not be executed: {err}",
        plan.binary.display()
    )
}

/// `execve` of `path` (a script works too) with this process's arguments and environment
/// plus `extra`.
fn exec_path(path: &Path, extra: &[(&str, String)]) -> String {
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
        .filter_map(|(k, v): (OsString, OsString)| {
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

fn block_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&held_set()),
        None,
    );
}

/// Blocks the termination and upgrade signals on the calling thread, before the runtime's
/// threads exist, so that they all inherit the block: only the main thread (which runs the
/// front, and so the exec) takes these signals, once [`unblock_signals`] lets them in. A
/// signal arriving during an exec then stays pending into the new image (children reset
/// their signal mask when they start).
pub fn block_signals_at_start() {
    block_signals();
}

/// Lets the held signals in on the calling thread (the main thread, once the handlers
/// exist).
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
            generation: 2,
            started_from: Some(PathBuf::from("/usr/bin/mcp-relay")),
            front: FrontState {
                session_id: "abc".into(),
                held: vec![b"{\"jsonrpc\":\"2.0\"}".to_vec()],
                partial: vec![b'{', 0xe2],
                outgoing: vec!["{}".into()],
                ..FrontState::default()
            },
            backends: Vec::new(),
            lists: Default::default(),
            keeper: Some(keeper::Handover { pid: 9, fd: 11 }),
        };
        let back = State::decode(&s.encode()?)?;
        assert_eq!(back.front.session_id, "abc");
        assert_eq!(back.front.partial, vec![b'{', 0xe2]);
        assert_eq!(back.front.held, s.front.held);
        assert_eq!(back.front.outgoing, s.front.outgoing);
        assert_eq!(back.generation, 2);
        assert_eq!(back.handed_fds(), vec![11]);
        let newer = br#"{"format": 99}"#;
        let e = State::decode(newer).err().unwrap_or_default();
        assert!(e.contains("newer"), "{e}");
        Ok(())
    }
}
