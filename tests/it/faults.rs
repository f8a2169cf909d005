//! Fault injection under load: several sessions keep calling through the HTTP front while
//! one backend dies in the middle of their long calls, then comes back.

use crate::lifecycle::descendants;
use crate::support::{
    HttpClient, Proc, Result, example, example_bin, example_http, poll, serve, text,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SESSIONS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Victim {
    /// A remote Streamable HTTP server, stopped and started again on the same port: its
    /// sessions are gone, so the relay must connect and initialize afresh.
    Http,
    /// A stdio server, SIGKILLed; the supervisor restarts it.
    Stdio,
    /// A stdio server, SIGSTOPped (hung): its health pings go unanswered, so the supervisor
    /// kills and restarts it.
    Hung,
}

/// One call of the load: which server, and its answer (or why there was none).
struct Call {
    server: &'static str,
    answer: std::result::Result<Value, String>,
}

/// Requests in flight on `server`, from the relay's `/metrics`.
fn in_flight(base: &str, server: &str) -> Result<u64> {
    let text = reqwest::blocking::get(format!("{base}/metrics"))?.text()?;
    let prefix = format!("mcp_relay_backend_in_flight{{server=\"{server}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// What the load threads have done so far, and when to stop.
#[derive(Default)]
struct Progress {
    calls: AtomicUsize,
    killed: AtomicBool,
    back: AtomicBool,
    stop: AtomicBool,
    /// Good answers from the bystander between the kill and the victim's return.
    bystander_while_down: AtomicUsize,
    /// Good answers from the victim after it is back.
    victim_after: AtomicUsize,
}

impl Progress {
    fn count(&self, server: &str, ok: bool) {
        self.calls.fetch_add(1, Ordering::AcqRel);
        let (killed, back) = (
            self.killed.load(Ordering::Acquire),
            self.back.load(Ordering::Acquire),
        );
        if ok && server == "bystander" && killed && !back {
            self.bystander_while_down.fetch_add(1, Ordering::AcqRel);
        }
        if ok && server == "victim" && back {
            self.victim_after.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn status_of(c: &HttpClient, server: &str) -> Result<Value> {
    let s = c.call_tool(500_000, "relay__status", json!({}))?;
    Ok(s["result"]["structuredContent"]["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == server).cloned())
        .unwrap_or_default())
}

fn restart_http_backend(port: &str) -> Result<Proc> {
    let mut child = std::process::Command::new(example_bin())
        .args(["--name", "victim", "--http", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let proc = Proc { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.is_empty() {
        return Err(format!("the backend did not start again on port {port}").into());
    }
    Ok(proc)
}

fn a_backend_dies_under_load(victim: Victim) -> Result {
    let dir = tempfile::tempdir()?;
    let (remote, remote_url) = example_http("victim")?;
    let port = remote_url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/mcp")
        .to_owned();
    let (mut victim_entry, bystander_entry) = match victim {
        Victim::Http => (
            json!({"type": "http", "url": remote_url}),
            example("bystander"),
        ),
        Victim::Stdio => (
            example("victim"),
            json!({"type": "http", "url": remote_url}),
        ),
        Victim::Hung => {
            let mut e = example("victim");
            for (k, v) in [
                ("healthIntervalMs", 200),
                ("healthTimeoutMs", 200),
                ("healthMisses", 2),
            ] {
                e[k] = json!(v);
            }
            (e, json!({"type": "http", "url": remote_url}))
        }
    };
    // A remote refusing connections for a while is not a crash loop: the victim's own
    // restart limit is raised (the others keep the default).
    victim_entry["startLimitBurst"] = json!(1000);
    let cfg = json!({
        "mcpServers": {"victim": victim_entry, "bystander": bystander_entry},
        // Calls arriving while the victim is away wait for it rather than fail; a remote
        // that refuses connections for a while is not a crash loop.
        "relay": {"restartBackoffMs": 10, "restartBackoffMaxMs": 200, "restartWaitMs": 20000},
    });
    let (relay, url) = serve(&cfg, dir.path())?;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let mut c = HttpClient::new(&url)?;
        c.initialize()?;
        sessions.push(Arc::new(c));
    }
    let tools_before = sessions[0].tool_names()?;

    // Each session: one long call on the victim, then a loop of short calls on each server.
    let mut slow = Vec::new();
    for c in &sessions {
        let c = c.clone();
        slow.push(std::thread::spawn(move || -> Result<(Value, Instant)> {
            let msg = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "victim__slow", "arguments": {"steps": 100, "ms": 100}}});
            let answer = c.call(&msg)?;
            Ok((answer, Instant::now()))
        }));
    }
    let base = url.trim_end_matches("/mcp").to_owned();
    poll("the long calls are all on the victim", || {
        let n = in_flight(&base, "victim")?;
        Ok(if n >= SESSIONS as u64 {
            Ok(())
        } else {
            Err(format!("{n} in flight"))
        })
    })?;
    let progress = Arc::new(Progress::default());
    let mut load = Vec::new();
    for (n, c) in sessions.iter().enumerate() {
        for server in ["bystander", "victim"] {
            let (c, progress) = (c.clone(), progress.clone());
            load.push(std::thread::spawn(move || -> Vec<Call> {
                let mut calls = Vec::new();
                // Bounded: the main thread normally stops the loop long before.
                for i in 0..20_000u64 {
                    if progress.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let msg = format!("{n}-{i}");
                    let answer = c
                        .call_tool(i + 10, &format!("{server}__echo"), json!({"message": msg}))
                        .map_err(|e| e.to_string());
                    let ok = answer
                        .as_ref()
                        .is_ok_and(|a| text(a) == format!("Echo: {msg}"));
                    progress.count(server, ok);
                    calls.push(Call { server, answer });
                }
                calls
            }));
        }
    }
    poll("the load runs", || {
        let n = progress.calls.load(Ordering::Acquire);
        Ok(if n >= 4 * SESSIONS {
            Ok(())
        } else {
            Err(format!("{n} calls"))
        })
    })?;

    // Kill the victim while all the long calls run on it.
    let relay_pid = i32::try_from(relay.child.id())?;
    let victim_pid = match victim {
        Victim::Http => i32::try_from(remote.child.id())?,
        Victim::Stdio | Victim::Hung => descendants(relay_pid)
            .into_iter()
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("victim"))
            })
            .ok_or("no victim process")?,
    };
    progress.killed.store(true, Ordering::Release);
    let (signal, noticed_within) = match victim {
        Victim::Http | Victim::Stdio => (nix::sys::signal::Signal::SIGKILL, Duration::ZERO),
        // Two pings 200 ms apart, each given 200 ms, after the next ping is due.
        Victim::Hung => (nix::sys::signal::Signal::SIGSTOP, Duration::from_secs(2)),
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim_pid), signal)?;
    let killed = Instant::now();

    // Every long call fails within a second of the death (or of the hang being found),
    // naming the server.
    for t in slow {
        let (answer, at) = t.join().map_err(|_| "slow thread panicked")??;
        let msg = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("server `victim`"), "{answer}");
        let after = at.saturating_duration_since(killed);
        assert!(
            after < noticed_within + Duration::from_secs(1),
            "answered {after:?} after the kill: {answer}"
        );
    }

    // The victim comes back: by itself (stdio), or when its remote starts again.
    let _restarted = match victim {
        Victim::Http => {
            drop(remote);
            poll("the relay notices the remote is gone", || {
                let s = status_of(&sessions[0], "victim")?;
                Ok(if s["state"] == "restarting" {
                    Ok(())
                } else {
                    Err(s.to_string())
                })
            })?;
            // Noticed through the failed connections, not a health ping (30 s apart).
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "{:?}",
                killed.elapsed()
            );
            // The other server goes on serving while this one is away.
            poll("the bystander serves while the victim is away", || {
                let n = progress.bystander_while_down.load(Ordering::Acquire);
                Ok(if n >= 4 * SESSIONS {
                    Ok(())
                } else {
                    Err(format!("{n} calls"))
                })
            })?;
            Some(restart_http_backend(&port)?)
        }
        Victim::Stdio | Victim::Hung => None,
    };
    poll("the victim is ready again", || {
        let s = status_of(&sessions[0], "victim")?;
        Ok(if s["state"] == "ready" {
            Ok(())
        } else {
            Err(s.to_string())
        })
    })?;
    progress.back.store(true, Ordering::Release);
    poll("the load reaches the restarted victim", || {
        let n = progress.victim_after.load(Ordering::Acquire);
        Ok(if n >= 2 * SESSIONS {
            Ok(())
        } else {
            Err(format!("{n} calls"))
        })
    })?;
    progress.stop.store(true, Ordering::Release);

    let mut bystander_calls = 0;
    let mut victim_errors = 0;
    for t in load {
        for call in t.join().map_err(|_| "load thread panicked")? {
            let answer = call
                .answer
                .map_err(|e| format!("a `{}` call failed at the HTTP level: {e}", call.server))?;
            if call.server == "bystander" {
                // The other server never noticed.
                assert!(text(&answer).starts_with("Echo: "), "{answer}");
                bystander_calls += 1;
            } else if answer.get("error").is_some() {
                let msg = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains("server `victim`"), "{answer}");
                victim_errors += 1;
            } else {
                assert!(text(&answer).starts_with("Echo: "), "{answer}");
            }
        }
    }
    assert!(
        bystander_calls >= SESSIONS,
        "{bystander_calls} bystander calls"
    );
    eprintln!("{victim:?}: {bystander_calls} bystander calls, {victim_errors} victim errors");

    // No session was lost: each goes on with the same id, the same tools, and the victim.
    for (n, c) in sessions.iter().enumerate() {
        assert_eq!(c.tool_names()?, tools_before);
        let r = c.call_tool(99, "victim__echo", json!({"message": n.to_string()}))?;
        assert_eq!(text(&r), format!("Echo: {n}"), "{r}");
    }
    Ok(())
}

#[test]
fn a_remote_http_backend_stops_and_restarts_under_load() -> Result {
    a_backend_dies_under_load(Victim::Http)
}

#[test]
fn a_stdio_backend_is_killed_under_load() -> Result {
    a_backend_dies_under_load(Victim::Stdio)
}

#[test]
fn a_stdio_backend_hangs_under_load() -> Result {
    a_backend_dies_under_load(Victim::Hung)
}
