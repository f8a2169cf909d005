//! Safe changes to `relay.json`: locked, atomic, backed up, in the user's style.
//!
//! Every write follows one path ([`edit`]): take an advisory lock on the config file itself
//! (never a separate `.lock` file, so nothing is left behind), re-read it under the lock so that
//! no other writer's change is lost, apply the edit to the JSON document (key order and entries
//! the relay does not manage kept verbatim), validate the result as a whole, keep a
//! timestamped backup, write a temp file in the same directory, fsync it, rename it over the
//! target and fsync the directory. Any failure (full disk, read-only directory) leaves the old
//! file as it was and removes what it created.

use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Backups kept by default (`relay.configBackups`).
pub const DEFAULT_BACKUPS: usize = 3;

/// Why a config change was not written. The old file is intact in every case.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {file}: {source}")]
    Io {
        action: &'static str,
        file: String,
        source: std::io::Error,
    },
    #[error(
        "{file} is not valid JSON ({reason}); fix the file by hand or restore a backup (`mcp-relay config restore`)"
    )]
    Unparsable { file: String, reason: String },
    /// The edit itself was refused (unknown server, name taken, ...).
    #[error("{0}")]
    Refused(String),
    /// The edited file would not be a valid config.
    #[error("the change would make the config invalid, so it was not written:\n{0}")]
    Invalid(String),
}

fn io(action: &'static str, file: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let file = file.display().to_string();
    move |source| StoreError::Io {
        action,
        file,
        source,
    }
}

/// What a successful [`edit`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The new file content.
    pub text: String,
    /// The backup made of the previous content.
    pub backup: Option<PathBuf>,
}

/// The root object of a config document and its `mcpServers` entries.
pub struct Document {
    root: Map<String, Value>,
}

impl Document {
    /// The raw `mcpServers.<name>` entry, as written in the file.
    pub fn server(&self, name: &str) -> Option<&Value> {
        self.root.get("mcpServers")?.as_object()?.get(name)
    }

    /// Adds a server entry (last in the file); refused if the name is taken.
    pub fn add_server(&mut self, name: &str, entry: Value) -> Result<(), StoreError> {
        if self.server(name).is_some() {
            return Err(StoreError::Refused(format!(
                "server `{name}` already exists; update it instead"
            )));
        }
        self.set_server(name, entry)
    }

    /// Replaces a server entry in its place in the file; refused if there is none.
    pub fn update_server(&mut self, name: &str, entry: Value) -> Result<(), StoreError> {
        if self.server(name).is_none() {
            return Err(StoreError::Refused(format!(
                "no server `{name}` in the config; add it instead"
            )));
        }
        self.set_server(name, entry)
    }

    /// Removes a server entry; refused if there is none.
    pub fn remove_server(&mut self, name: &str) -> Result<(), StoreError> {
        let removed = self
            .root
            .get_mut("mcpServers")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.shift_remove(name));
        match removed {
            Some(_) => Ok(()),
            None => Err(StoreError::Refused(format!(
                "no server `{name}` in the config"
            ))),
        }
    }

    fn set_server(&mut self, name: &str, entry: Value) -> Result<(), StoreError> {
        let servers = self
            .root
            .entry("mcpServers")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(map) = servers.as_object_mut() else {
            return Err(StoreError::Refused(
                "`mcpServers` in the config file is not an object; fix the file first".into(),
            ));
        };
        map.insert(name.to_owned(), entry);
        Ok(())
    }

    fn parse(text: &str, file: &Path) -> Result<Document, StoreError> {
        let unparsable = |reason: String| StoreError::Unparsable {
            file: file.display().to_string(),
            reason,
        };
        // An empty file is an empty config (e.g. one just created by hand).
        if text.trim().is_empty() {
            return Ok(Document { root: Map::new() });
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(root)) => Ok(Document { root }),
            Ok(_) => Err(unparsable("the top level is not an object".into())),
            Err(e) => Err(unparsable(e.to_string())),
        }
    }

    /// Two-space indented JSON with a final newline, keys in their original order.
    fn render(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.root).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}

/// Reads the document without locking (writers replace the file atomically, so a reader
/// sees either the old or the new file).
pub fn read(path: &Path) -> Result<Document, StoreError> {
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    Document::parse(&text, path)
}

/// How long a writer waits for another to finish with the file.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Takes the file's exclusive lock, waiting at most `wait` (a stuck holder must not freeze
/// every later change).
fn lock_within(file: &File, path: &Path, wait: std::time::Duration) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Refused(format!(
                    "{} stayed locked by another writer for {} s; try again",
                    path.display(),
                    wait.as_secs()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", path)(e)),
        }
    }
}

/// The file a config path names: symlinks resolved, so that a write replaces the target
/// (a dotfiles-managed link stays a link).
pub fn target(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The locked config file: held while a change is read, applied and written.
struct Locked {
    file: File,
}

impl Locked {
    /// Locks the file the path names now. A writer that renamed a new file over the path
    /// while we waited leaves us holding the old inode: then lock again.
    fn acquire(path: &Path) -> Result<Locked, StoreError> {
        for _ in 0..1000 {
            let file = OpenOptions::new()
                .read(true)
                .open(path)
                .map_err(io("open", path))?;
            lock_within(&file, path, LOCK_WAIT)?;
            let held = file.metadata().map_err(io("inspect", path))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Locked { file });
                }
                // Replaced (or removed) while we waited for the lock: try the new file.
                _ => continue,
            }
        }
        Err(StoreError::Refused(format!(
            "{} keeps being replaced; could not lock it",
            path.display()
        )))
    }

    fn text(&mut self, path: &Path) -> Result<String, StoreError> {
        let mut text = String::new();
        self.file
            .read_to_string(&mut text)
            .map_err(io("read", path))?;
        Ok(text)
    }
}

/// Applies `change` to the config file at `path` under the file's lock; `validate` checks
/// the whole new text before anything is written. Keeps `keep` backups.
pub fn edit(
    path: &Path,
    keep: usize,
    change: impl FnOnce(&mut Document) -> Result<(), StoreError>,
    validate: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Written, StoreError> {
    replace(path, keep, |path, old| {
        let mut doc = Document::parse(old, path)?;
        change(&mut doc)?;
        let text = doc.render();
        validate(&text).map_err(StoreError::Invalid)?;
        Ok(text)
    })
}

/// Replaces the config with a backup's content, as it is (itself backed up first).
pub fn restore(
    path: &Path,
    backup: &Path,
    keep: usize,
    validate: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Written, StoreError> {
    let text = std::fs::read_to_string(backup).map_err(io("read", backup))?;
    Document::parse(&text, backup)?;
    validate(&text).map_err(StoreError::Invalid)?;
    replace(path, keep, |_, _| Ok(text))
}

/// The one write path: lock the file (symlinks resolved), compute the new text from the
/// current one, and write it (with a backup) only if it differs.
fn replace(
    path: &Path,
    keep: usize,
    new_text: impl FnOnce(&Path, &str) -> Result<String, StoreError>,
) -> Result<Written, StoreError> {
    let path = &target(path);
    let mut locked = Locked::acquire(path)?;
    let old = locked.text(path)?;
    let text = new_text(path, &old)?;
    let backup = if old == text {
        None
    } else {
        write_locked(path, &old, &text, keep)?
    };
    drop(locked);
    Ok(Written { text, backup })
}

/// Atomically replaces the file with `text`, keeping `old` as a backup (unless `keep` is
/// 0). The caller holds the lock. On failure nothing it created is left behind.
fn write_locked(
    path: &Path,
    old: &str,
    text: &str,
    keep: usize,
) -> Result<Option<PathBuf>, StoreError> {
    let dir = parent(path);
    // Temp file and backup get the config's mode from the start (a config may hold literal
    // tokens): never a moment more readable than the file itself.
    let mode = std::fs::metadata(path)
        .map(|m| m.mode() & 0o777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{:08x}",
        file_name(path),
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut backup = None;
    let written = (|| {
        let mut f = create_new(&tmp, mode).map_err(io("create", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        if keep > 0 {
            backup = Some(write_backup(path, old, mode)?);
        }
        std::fs::rename(&tmp, path).map_err(io("replace", path))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        if let Some(b) = &backup {
            let _ = std::fs::remove_file(b);
        }
        return Err(e);
    }
    sync_dir(&dir);
    prune_backups(path, keep);
    Ok(backup)
}

fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "relay.json".into())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `relay.json.backup.YYYYMMDD_HHMMSS` (UTC), with `_N` appended when a backup of the
/// same second exists, so names stay unique and sort in creation order.
fn write_backup(path: &Path, text: &str, mode: u32) -> Result<PathBuf, StoreError> {
    let stamp = utc_stamp(SystemTime::now());
    let base = format!("{}.backup.{stamp}", file_name(path));
    let dir = parent(path);
    // After the oldest backups of this second were pruned, a free lower number would sort
    // before the newer ones: always go past the highest number in use for this second.
    let first = backups(path)
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let rest = name.strip_prefix(&base)?;
            match rest {
                "" => Some(1),
                r => r.strip_prefix('_')?.parse::<u32>().ok().map(|n| n + 1),
            }
        })
        .max()
        .unwrap_or(0);
    for n in first..10_000u32 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}_{n:04}")
        };
        let target = dir.join(&name);
        let mut f = match create_new(&target, mode) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("create backup", &target)(e)),
        };
        let done = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("write backup", &target));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        return Ok(target);
    }
    Err(StoreError::Refused(format!(
        "too many backups of {} within one second",
        path.display()
    )))
}

/// The config's backups, oldest first.
pub fn backups(path: &Path) -> Vec<PathBuf> {
    let path = &target(path);
    let prefix = format!("{}.backup.", file_name(path));
    let Ok(entries) = std::fs::read_dir(parent(path)) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stamp = name.strip_prefix(&prefix)?;
            is_stamp(stamp).then(|| (stamp.to_owned(), e.path()))
        })
        .collect();
    // `YYYYMMDD_HHMMSS` then `_NNNN`: the names sort in creation order.
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    match b.len() {
        15 => digits(0..8) && b[8] == b'_' && digits(9..15),
        20 => digits(0..8) && b[8] == b'_' && digits(9..15) && b[15] == b'_' && digits(16..20),
        _ => false,
    }
}

fn prune_backups(path: &Path, keep: usize) {
    let all = backups(path);
    let extra = all.len().saturating_sub(keep);
    for old in &all[..extra] {
        if let Err(e) = std::fs::remove_file(old) {
            tracing::warn!(file = %old.display(), error = %e, "Could not remove an old config backup.");
        }
    }
}

/// `YYYYMMDD_HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn stamps_are_civil_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        // 2026-11-18 11:06:40 UTC
        assert_eq!(utc_stamp(t), "20261118_110640");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert!(is_stamp("20261118_082640") && is_stamp("20261118_082640_0002"));
        assert!(!is_stamp("20261118_08264") && !is_stamp("x0261118_082640"));
    }

    #[test]
    fn edit_keeps_style_and_foreign_keys() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("relay.json");
        std::fs::write(
            &path,
            r#"{"zeta": {"keep": [1, 2]}, "mcpServers": {"b": {"command": "x", "other": true}, "a": {"url": "http://h/mcp"}}, "alpha": 1}"#,
        )?;
        edit(
            &path,
            3,
            |d| {
                d.add_server("c", serde_json::json!({"command": "y"}))?;
                d.update_server("b", serde_json::json!({"command": "z", "other": true}))?;
                Ok(())
            },
            ok,
        )?;
        let text = std::fs::read_to_string(&path)?;
        assert!(
            text.starts_with("{\n  \"zeta\": {\n    \"keep\": [\n"),
            "{text}"
        );
        let order: Vec<usize> = [
            "\"zeta\"",
            "\"mcpServers\"",
            "\"b\"",
            "\"a\"",
            "\"c\"",
            "\"alpha\"",
        ]
        .iter()
        .filter_map(|k| text.find(k))
        .collect();
        assert_eq!(order.len(), 6);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains("\"command\": \"z\""));
        assert_eq!(backups(&path).len(), 1);
        Ok(())
    }

    #[test]
    fn backups_are_unique_and_pruned() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("relay.json");
        std::fs::write(&path, "{}")?;
        for i in 0..6 {
            edit(
                &path,
                3,
                |d| d.add_server(&format!("s{i}"), serde_json::json!({"command": "x"})),
                ok,
            )?;
        }
        let kept = backups(&path);
        assert_eq!(kept.len(), 3, "{kept:?}");
        // The newest backup holds the state before the last edit.
        let newest = std::fs::read_to_string(&kept[2])?;
        assert!(newest.contains("\"s4\"") && !newest.contains("\"s5\""));
        let names: Vec<String> = std::fs::read_dir(dir.path())?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            4,
            "only the file and 3 backups remain: {names:?}"
        );
        Ok(())
    }

    #[test]
    fn refused_or_invalid_changes_write_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("relay.json");
        std::fs::write(&path, "{\"mcpServers\": {}}")?;
        let r = edit(
            &path,
            3,
            |d| d.add_server("x", serde_json::json!(1)),
            |_| Err("mcpServers.x: must be an object".into()),
        );
        assert!(matches!(r, Err(StoreError::Invalid(ref m)) if m.contains("mcpServers.x")));
        assert_eq!(std::fs::read_to_string(&path)?, "{\"mcpServers\": {}}");
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }
}
