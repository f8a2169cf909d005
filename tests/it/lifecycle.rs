//! No zombies, no orphans: however the relay ends, every process it started goes too.

use crate::support::{Result, StdioClient, example, example_bin, poll};
use serde_json::json;
use std::time::{Duration, Instant};

/// Live (not zombie) descendants of `root`, from /proc.
pub(crate) fn descendants(root: i32) -> Vec<i32> {
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
    poll(&format!("{how:?}: every process gone"), || {
        let left: Vec<i32> = started.iter().copied().filter(|p| alive(*p)).collect();
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        })
    })?;
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

#[test]
fn a_crash_loop_stops_at_the_start_limit_with_the_stderr_tail() -> Result {
    let cfg = json!({
        "mcpServers": {"boom": {"command": "sh", "args": ["-c", "echo kaboom >&2; exit 3"]}},
        "relay": {"startupWaitMs": 0, "restartBackoffMs": 10, "restartBackoffMaxMs": 20, "startLimitBurst": 3},
    });
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let s = c.wait_server_state("boom", "failed")?;
    let err = s["lastError"].as_str().unwrap_or_default();
    assert!(
        err.contains("kaboom") && err.contains("exit status: 3"),
        "{s}"
    );
    // Three starts: the first and two restarts, then no more.
    assert_eq!(s["restarts"], 2, "{s}");
    let call = c.call_tool(1, "boom__x", json!({}))?;
    assert!(
        call["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown tool")),
        "{call}"
    );
    // An explicit reload gives it a fresh start.
    let r = c.call_tool(2, "relay__reload_config", json!({}))?;
    assert_eq!(
        r["result"]["structuredContent"]["applied"]["restarted"],
        json!(["boom"]),
        "{r}"
    );
    Ok(())
}

#[test]
fn a_server_refusing_our_credentials_is_not_hammered() -> Result {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    listener.set_nonblocking(true)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = stop.clone();
    let server = std::thread::spawn(move || {
        while !stopper.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nonblocking(false);
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 8192];
                    let _ = sock.read(&mut buf);
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let cfg = json!({
        "mcpServers": {"locked": {"type": "http", "url": format!("http://127.0.0.1:{port}/mcp")}},
        "relay": {"startupWaitMs": 0, "restartBackoffMs": 10},
    });
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let s = c.wait_server_state("locked", "needs-auth")?;
    assert!(
        s["lastError"].as_str().is_some_and(|e| e.contains("401")),
        "{s}"
    );
    let seen = hits.load(Ordering::Relaxed);
    // A while later: still one attempt, no retry loop.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(hits.load(Ordering::Relaxed), seen);
    assert!(seen <= 2, "{seen} requests");
    assert_eq!(c.server_status(1, "locked")?["state"], "needs-auth");
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    Ok(())
}

/// The pid of the relay's child whose command line mentions `needle`.
fn child_with(relay: i32, needle: &str) -> Option<i32> {
    descendants(relay).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

#[test]
fn a_hung_server_fails_its_calls_and_comes_back() -> Result {
    // Health pings are off for the relay and on for `hung` alone: its own settings win.
    let mut hung = example("hung");
    for (k, v) in [
        ("healthIntervalMs", 200),
        ("healthTimeoutMs", 200),
        ("healthMisses", 2),
        ("restartBackoffMs", 10),
    ] {
        hung[k] = json!(v);
    }
    let cfg = json!({
        "mcpServers": {"hung": hung, "ok": example("ok")},
        "relay": {"healthIntervalMs": 0},
    });
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    c.request(1, "tools/list", json!({}))?;
    let relay = i32::try_from(c.proc.child.id())?;
    let old = child_with(relay, "hung").ok_or("no `hung` process")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGSTOP,
    )?;
    let asked = Instant::now();
    let r = c.call_tool(2, "hung__echo", json!({"message": "x"}))?;
    let msg = r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        msg.contains("server `hung`")
            && msg.contains("2 health pings in a row (each within 200 ms)"),
        "{r}"
    );
    // 2 misses of 200 ms after 200 ms intervals, with slack for a loaded machine.
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    let ok = c.call_tool(3, "ok__echo", json!({"message": "y"}))?;
    assert_eq!(ok["result"]["content"][0]["text"], "Echo: y", "{ok}");
    c.wait_server_state("hung", "ready")?;
    let back = c.call_tool(4, "hung__echo", json!({"message": "z"}))?;
    assert_eq!(back["result"]["content"][0]["text"], "Echo: z", "{back}");
    // The stopped process was killed, not left behind.
    poll("the hung process is killed", || {
        Ok(if alive(old) {
            Err(format!("{old} alive"))
        } else {
            Ok(())
        })
    })?;
    Ok(())
}

#[test]
fn a_call_during_a_restart_waits_for_it() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let e = c.call_tool(1, "ex__crash", json!({}))?;
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited")),
        "{e}"
    );
    // No polling: the next call waits (up to restartWaitMs) for the restart.
    let r = c.call_tool(2, "ex__echo", json!({"message": "again"}))?;
    assert_eq!(r["result"]["content"][0]["text"], "Echo: again", "{r}");
    Ok(())
}

#[test]
fn a_busy_server_queues_then_refuses_and_others_are_unaffected() -> Result {
    let mut slow = example("slow");
    slow["maxInFlight"] = json!(1);
    slow["maxQueued"] = json!(1);
    let mut c = StdioClient::start(json!({"mcpServers": {"slow": slow, "ok": example("ok")}}))?;
    c.initialize(json!({}))?;
    // Three long calls at once: one runs, one waits, one is refused at once.
    for id in 1..=3u64 {
        c.send(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"slow__slow","arguments":{"steps":10,"ms":100}}}))?;
    }
    // Another server answers while `slow` is saturated.
    c.send(&json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"ok__echo","arguments":{"message":"fine"}}}))?;
    let (mut answers, _) = c.answers(4)?;
    let ok = answers.remove(&4).unwrap_or_default();
    assert_eq!(ok["result"]["content"][0]["text"], "Echo: fine", "{ok}");
    let done = answers
        .values()
        .filter(|a| a["result"]["content"][0]["text"] == "done after 10 steps")
        .count();
    let busy = answers
        .values()
        .filter(|a| {
            a["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("server `slow` is busy"))
        })
        .count();
    assert_eq!((done, busy), (2, 1), "{answers:?}");
    Ok(())
}

#[test]
fn subscriptions_are_renewed_after_a_restart() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let uri = "example://greeting";
    c.request(1, "resources/subscribe", json!({"uri": uri}))?;
    let touch = json!({"name": "ex__touch", "arguments": {"uri": uri, "onlySubscribed": true}});
    let r = c.request(2, "tools/call", touch.clone())?;
    assert_eq!(r["result"]["content"][0]["text"], "touched", "{r}");
    c.call_tool(3, "ex__crash", json!({}))?;
    c.wait_server_state("ex", "ready")?;
    // The new process knows the subscription only if the relay renewed it (bounded wait:
    // the renewal is sent in the background right after the restart).
    let mut id = 10u64;
    let mut seen = Vec::new();
    poll("the subscription is renewed", || {
        id += 1;
        c.send(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":touch}))?;
        let line = c.recv_until(|l| crate::support::is_response(l, &json!(id)), &mut seen)?;
        let r: serde_json::Value = serde_json::from_str(&line)?;
        Ok(if r["result"]["content"][0]["text"] == "touched" {
            Ok(())
        } else {
            Err(line)
        })
    })?;
    // The update reaches the client (before or after the tool's answer).
    if !seen
        .iter()
        .any(|l| l.contains("notifications/resources/updated"))
    {
        c.recv_until(|l| l.contains("notifications/resources/updated"), &mut seen)?;
    }
    Ok(())
}

/// SIGKILLs the server `name` while a 1.5 s `slow` call runs on it; returns that call's answer.
fn kill_during_slow_call(
    c: &mut StdioClient,
    name: &str,
    tool: &str,
    id: u64,
) -> Result<serde_json::Value> {
    c.request(id, "tools/list", json!({}))?;
    let relay = i32::try_from(c.proc.child.id())?;
    let pid = child_with(relay, name).ok_or("no server process")?;
    c.send(&json!({"jsonrpc":"2.0","id":id + 1,"method":"tools/call","params":{"name": tool,"arguments":{"steps":15,"ms":100}}}))?;
    // Kill it once the call is running (its first progress step is under way).
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (answers, _) = c.answers(1)?;
    answers
        .get(&(id + 1))
        .cloned()
        .ok_or_else(|| "no answer".into())
}

#[test]
fn retry_on_reconnect_resends_an_interrupted_call_once() -> Result {
    let mut entry = example("again");
    entry["retryOnReconnect"] = json!(true);
    let mut idem = example("idem");
    idem["retryOnReconnect"] = json!("idempotent");
    let cfg = json!({
        "mcpServers": {"again": entry, "idem": idem, "plain": example("plain")},
        "relay": {"restartBackoffMs": 10, "restartWaitMs": 20000},
    });
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    // Retried: the call succeeds on the restarted server.
    let r = kill_during_slow_call(&mut c, "again", "again__slow", 10)?;
    assert_eq!(
        r["result"]["content"][0]["text"], "done after 15 steps",
        "{r}"
    );
    assert!(c.server_status(20, "again")?["restarts"].as_u64() >= Some(1));
    // `slow` is annotated idempotentHint: true, so "idempotent" retries it too.
    let r = kill_during_slow_call(&mut c, "idem", "idem__slow", 30)?;
    assert_eq!(
        r["result"]["content"][0]["text"], "done after 15 steps",
        "{r}"
    );
    // Default: not retried; the error names the server and what happened.
    let r = kill_during_slow_call(&mut c, "plain", "plain__slow", 40)?;
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("server `plain` stopped while handling `tools/call`"),
        "{r}"
    );
    Ok(())
}
