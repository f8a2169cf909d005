//! No zombies, no orphans: however the relay ends, every process it started goes too.

use crate::support::{Result, StdioClient, example, example_bin};
use serde_json::json;
use std::time::{Duration, Instant};

/// Live (not zombie) descendants of `root`, from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.filter_map(|e| e.ok()) {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let mut f = rest.split_whitespace();
            let state = f.next().unwrap_or("");
            let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if state != "Z" {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out.remove(0);
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[derive(Clone, Copy, Debug)]
enum End {
    Sigkill,
    Sigterm,
    StdinClosed,
}

fn ends_without_leftovers(how: End) -> Result {
    // One server with a helper process in its group (as npx → node, or a shell wrapper).
    let wrapped = format!(
        "sleep 300 & exec {} --name wrapped",
        example_bin().display()
    );
    let cfg = json!({"mcpServers": {
        "ex": example("ex"),
        "wrapped": {"command": "sh", "args": ["-c", wrapped]},
    }});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let tools = c.request(1, "tools/list", json!({}))?.to_string();
    assert!(
        tools.contains("wrapped__echo") && tools.contains("ex__echo"),
        "{tools}"
    );
    let relay = i32::try_from(c.proc.child.id())?;
    let started = descendants(relay);
    // Two servers, the helper `sleep`, and the keeper.
    assert!(started.len() >= 4, "{how:?}: descendants {started:?}");
    let pid = nix::unistd::Pid::from_raw(relay);
    match how {
        End::Sigkill => nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?,
        End::Sigterm => nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?,
        End::StdinClosed => c.close_stdin(),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<i32> = started.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{how:?}: processes left 20 s after the relay ended: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn sigkill_of_the_relay_leaves_no_process_behind() -> Result {
    ends_without_leftovers(End::Sigkill)
}

#[test]
fn sigterm_leaves_no_process_behind() -> Result {
    ends_without_leftovers(End::Sigterm)
}

#[test]
fn the_client_closing_stdin_leaves_no_process_behind() -> Result {
    ends_without_leftovers(End::StdinClosed)
}
