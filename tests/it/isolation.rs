//! `isolation` of stdio servers, with the processes counted from /proc: a process per
//! session over 50 sessions with its cap, session end and idle reaping; a process per call;
//! a pool.

use crate::lifecycle::descendants;
use crate::support::{HttpClient, Result, example, poll, serve_with, text};
use serde_json::{Value, json};

/// The relay's children whose command line mentions `name` (the example server's `--name`).
fn processes(relay: u32, name: &str) -> usize {
    let Ok(root) = i32::try_from(relay) else {
        return 0;
    };
    descendants(root)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == name.as_bytes()))
        })
        .count()
}

fn wait_processes(relay: u32, name: &str, want: usize) -> Result {
    poll(&format!("{want} `{name}` processes"), || {
        let n = processes(relay, name);
        Ok(if n == want {
            Ok(())
        } else {
            Err(format!("{n}"))
        })
    })
}

fn echo(c: &HttpClient, id: u64, tool: &str) -> Result<Value> {
    c.call_tool(id, tool, json!({"message": "hi"}))
}

#[test]
fn per_session_processes_are_capped_ended_and_reaped() -> Result {
    let dir = tempfile::tempdir()?;
    let mut ps = example("isosess");
    ps["isolation"] = json!("per-session");
    ps["maxInstances"] = json!(50);
    ps["idleTimeoutMs"] = json!(2000);
    let relay = serve_with(&json!({"mcpServers": {"ps": ps}}), dir.path(), &[])?;
    let pid = relay.proc.child.id();
    wait_processes(pid, "isosess", 1)?;
    let mut clients = Vec::new();
    for i in 0..50 {
        let mut c = HttpClient::new(&relay.url)?;
        c.initialize()?;
        let r = echo(&c, i, "ps__echo")?;
        assert_eq!(text(&r), "Echo: hi", "{r}");
        clients.push(c);
    }
    // The main process (catalog) and one per session.
    assert_eq!(processes(pid, "isosess"), 51);
    // A session reuses its own process.
    for c in clients.iter().take(5) {
        assert_eq!(text(&echo(c, 99, "ps__echo")?), "Echo: hi");
    }
    assert_eq!(processes(pid, "isosess"), 51);
    // The 51st session is over the cap, with an error that says so.
    let mut extra = HttpClient::new(&relay.url)?;
    extra.initialize()?;
    let r = echo(&extra, 1, "ps__echo")?;
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("too many sessions for server `ps`"), "{r}");
    assert!(msg.contains("maxInstances is 50"), "{r}");
    // Ending 25 sessions stops their processes.
    for c in clients.drain(..25) {
        let status = c
            .http
            .delete(&c.url)
            .header("mcp-session-id", c.session.clone().unwrap_or_default())
            .send()?
            .status();
        assert_eq!(status, 200);
    }
    wait_processes(pid, "isosess", 26)?;
    // Unused for idleTimeoutMs: the others are stopped too; the sessions live on and get a
    // fresh process when they call again.
    wait_processes(pid, "isosess", 1)?;
    assert_eq!(text(&echo(&clients[0], 7, "ps__echo")?), "Echo: hi");
    assert_eq!(processes(pid, "isosess"), 2);
    Ok(())
}

#[test]
fn per_call_processes_come_and_go_and_pools_spread() -> Result {
    let dir = tempfile::tempdir()?;
    let mut pc = example("isocall");
    pc["isolation"] = json!("per-call");
    pc["maxInstances"] = json!(2);
    let mut pool = example("isopool");
    pool["isolation"] = json!("pooled");
    pool["poolSize"] = json!(3);
    let relay = serve_with(
        &json!({"mcpServers": {"pc": pc, "pool": pool}}),
        dir.path(),
        &[],
    )?;
    let pid = relay.proc.child.id();
    wait_processes(pid, "isocall", 1)?;
    let mut c = HttpClient::new(&relay.url)?;
    c.initialize()?;
    // A slow call runs in a process of its own, which goes when the call is done.
    let url = relay.url.clone();
    let session = c.session.clone();
    let slow = std::thread::spawn(move || -> Result<Value> {
        let mut c2 = HttpClient::new(&url)?;
        c2.session = session;
        c2.call_tool(50, "pc__slow", json!({"steps": 10, "ms": 300}))
    });
    wait_processes(pid, "isocall", 2)?;
    let r = slow.join().map_err(|_| "the slow call panicked")??;
    assert!(r.get("result").is_some(), "{r}");
    wait_processes(pid, "isocall", 1)?;
    for i in 0..3 {
        assert_eq!(text(&echo(&c, i, "pc__echo")?), "Echo: hi");
    }
    wait_processes(pid, "isocall", 1)?;
    // A pool of 3: the main process and 2 more, used in turn; no more are started.
    for i in 0..6 {
        assert_eq!(text(&echo(&c, 10 + i, "pool__echo")?), "Echo: hi");
    }
    assert_eq!(processes(pid, "isopool"), 3);
    Ok(())
}
