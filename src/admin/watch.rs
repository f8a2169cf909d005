//! Hot reload: the config file is watched (and SIGHUP reloads it); changes are applied with
//! [`super::reload`].
//!
//! The watch is on the file's directory, not the file: editors replace files by renaming a
//! new one over them, which a watch on the old inode would miss. Events are debounced (an
//! editor's save is often several events: truncate, write, rename, chmod); a file caught
//! half-written is invalid JSON, so it is rejected and the running config stays until the
//! save completes and its own event arrives.

use crate::router::Relay;
use notify::Watcher as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Starts the watch and the SIGHUP handler; both stop with `shutdown`.
pub fn spawn(relay: Arc<Relay>, shutdown: CancellationToken) {
    let cfg = relay.config();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher = match (&cfg.path, cfg.relay.watch_config) {
        (Some(path), true) => watch_file(path, tx),
        _ => None,
    };
    // Installed before returning, so an early SIGHUP never meets the default action (exit).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        // Kept alive as long as the loop runs.
        let _watcher = watcher;
        loop {
            let (cause, explicit) = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(()) = rx.recv() => {
                    // Debounce: wait until events stop for a moment.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    ("file change", false)
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => ("SIGHUP", true),
            };
            // An explicit SIGHUP also gives servers that gave up a fresh start.
            match super::reload(&relay, explicit).await {
                Ok(a) if a.is_empty() => {
                    tracing::debug!(cause, "Config re-read; nothing to change.");
                }
                Ok(a) => {
                    tracing::info!(cause, added = ?a.added, removed = ?a.removed, changed = ?a.changed, "Config reloaded.")
                }
                // Logged (with file, path and reason) by the relay as it rejects it.
                Err(_) => {}
            }
        }
    });
}

fn watch_file(
    path: &std::path::Path,
    tx: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    // A symlinked config is watched where its target lives (that is what writes replace).
    let path = &crate::config::store::target(path);
    let name = path.file_name()?.to_owned();
    let dir = crate::config::store::parent(path);
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = tx.send(());
        }
    };
    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch the config file; reload with SIGHUP or relay__reload_config.");
            return None;
        }
    };
    if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch the config directory; reload with SIGHUP or relay__reload_config.");
        return None;
    }
    tracing::debug!(file = %path.display(), "Watching the config file.");
    Some(w)
}
