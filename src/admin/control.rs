//! The control socket: how `mcp-relay servers …`, `status` and `reload` reach the relays
//! running on a config file.
//!
//! Each relay with a config file listens on a Unix socket `<dir>/<key>-<pid>.sock`, where
//! `<dir>` is `$MCP_RELAY_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/mcp-relay`, else
//! `<tmp>/mcp-relay-<uid>` (created 0700 and refused if another user owns it or can write
//! to it), and `<key>` is a hash of the config file's canonical path, so the commands find
//! exactly the relays of one file. The socket is 0600 and removed at exit; one left by a
//! killed relay is removed by the next command that finds it dead.
//!
//! Protocol: one JSON object per line each way. Request `{"id": 1, "op": "status",
//! "arguments": {...}}` (the `op` of a management tool, see [`super::TOOLS`]); answer
//! `{"id": 1, "result": {...}}` or `{"id": 1, "error": "message"}`.

use crate::router::Relay;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Longest request line accepted.
const MAX_LINE: usize = 1024 * 1024;

/// The directory the control sockets live in, created if needed and checked to be private.
pub fn socket_dir() -> Result<PathBuf, String> {
    let dir = if let Some(d) = std::env::var_os("MCP_RELAY_RUNTIME_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        d.join("mcp-relay")
    } else {
        std::env::temp_dir().join(format!("mcp-relay-{}", nix::unistd::getuid()))
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
    {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta =
        std::fs::metadata(&dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if meta.uid() != nix::unistd::getuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} belongs to another user or is open to others (it must be 0700); set MCP_RELAY_RUNTIME_DIR to a private directory",
            dir.display()
        ));
    }
    Ok(dir)
}

/// The key of a config file: a hash of its canonical path.
pub fn config_key(config: &Path) -> String {
    let canonical = crate::config::store::target(config);
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Removes the socket file when the relay stops.
pub struct Listening {
    pub path: PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the control socket of a relay with a config file. `None` (with a warning) when it
/// cannot: the relay serves on without it.
pub fn serve(relay: Arc<Relay>, shutdown: CancellationToken) -> Option<Listening> {
    let config = relay.config().path.clone()?;
    let dir = match socket_dir() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                "No control socket ({e}); `mcp-relay servers`/`status` cannot reach this relay."
            );
            return None;
        }
    };
    let key = config_key(&config);
    remove_stale(&dir, &key);
    let path = dir.join(format!("{key}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "Cannot open the control socket.");
            return None;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    tracing::debug!(socket = %path.display(), "Control socket listening.");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "Control socket accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(connection(relay.clone(), stream));
        }
    });
    Some(Listening { path })
}

async fn connection(relay: Arc<Relay>, stream: tokio::net::UnixStream) {
    // Only our own user (the directory and socket modes say so too; this holds even if
    // they were changed).
    let me = nix::unistd::getuid().as_raw();
    if !stream.peer_cred().is_ok_and(|c| c.uid() == me) {
        tracing::warn!("Control socket connection from another user refused.");
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let _ = write
                .write_all(b"{\"id\":null,\"error\":\"request too large\"}\n")
                .await;
            return;
        }
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let out = json!({"id": null, "error": format!("not a JSON request: {e}")});
                let _ = write.write_all(format!("{out}\n").as_bytes()).await;
                continue;
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let op = req.get("op").and_then(Value::as_str).unwrap_or_default();
        let args = req.get("arguments").cloned().unwrap_or_else(|| json!({}));
        // Counted until the answer is written: an upgrade waits for it before it execs.
        let _busy = relay.control_request();
        let out = match super::run(&relay, op, &args).await {
            Ok(result) => json!({"id": id, "result": result}),
            Err(e) => json!({"id": id, "error": e.to_string()}),
        };
        if write
            .write_all(format!("{out}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The pid in a socket's name (`<key>-<pid>.sock`).
pub fn pid_of(socket: &Path) -> Option<i32> {
    let name = socket.file_name()?.to_str()?;
    let stem = name.strip_suffix(".sock")?;
    stem.rsplit_once('-')?.1.parse().ok()
}

fn alive(pid: i32) -> bool {
    // Signal 0: checks that the process exists without touching it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Removes sockets of this config whose relay is gone: nothing accepts on them (a pid
/// alone can be reused).
fn remove_stale(dir: &Path, key: &str) {
    for s in sockets_in(dir, key) {
        if pid_of(&s).is_some_and(|p| p as u32 == std::process::id()) {
            continue;
        }
        let dead = match std::os::unix::net::UnixStream::connect(&s) {
            Ok(_) => false,
            Err(e) => {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) || pid_of(&s).is_some_and(|p| !alive(p))
            }
        };
        if dead {
            let _ = std::fs::remove_file(&s);
        }
    }
}

fn sockets_in(dir: &Path, key: &str) -> Vec<PathBuf> {
    let prefix = format!("{key}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock"))
        })
        .collect();
    v.sort();
    v
}

/// The control sockets of the relays running on `config` (stale ones removed).
pub fn find(config: &Path) -> Vec<PathBuf> {
    let Ok(dir) = socket_dir() else {
        return Vec::new();
    };
    let key = config_key(config);
    remove_stale(&dir, &key);
    sockets_in(&dir, &key)
}

/// The control socket of the relay with `pid`, whatever its config file.
pub fn find_pid(pid: u32) -> Vec<PathBuf> {
    let Ok(entries) = socket_dir().and_then(|d| std::fs::read_dir(&d).map_err(|e| e.to_string()))
    else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| pid_of(p).is_some_and(|p| i64::from(p) == i64::from(pid)))
        .collect()
}

/// Sends one request to a relay's control socket and waits for the answer.
pub fn request(
    socket: &Path,
    op: &str,
    arguments: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let who = pid_of(socket).map_or_else(
        || socket.display().to_string(),
        |p| format!("relay pid {p}"),
    );
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach {who}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let req = json!({"id": 1, "op": op, "arguments": arguments});
    stream
        .write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("cannot send to {who}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from {who}: {e}"))?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|e| format!("bad answer from {who}: {e}"))?;
    match (answer.get("result"), answer.get("error")) {
        (Some(r), _) => Ok(r.clone()),
        (None, Some(e)) => Err(e.as_str().map_or_else(|| e.to_string(), str::to_owned)),
        (None, None) => Err(format!("empty answer from {who}")),
    }
}
