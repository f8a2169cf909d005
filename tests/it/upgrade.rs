//! In-place upgrades of a stdio relay: the running binary is replaced by a second build of
//! itself (a copy whose build tag is patched, so it reports another version) while its
//! client keeps calling tools.

use crate::support::{
    Result, StdioClient, example, example_http, is_response, poll, relay_bin, runtime_dir, text,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A copy of the relay binary whose build tag is `tag` (it reports `VERSION+tag`).
fn build(dir: &Path, tag: &str) -> Result<PathBuf> {
    let mut bytes = std::fs::read(relay_bin())?;
    let marker = mcp_relay::BUILD_TAG_MARKER;
    // The slot: the marker followed by 28 NUL bytes (an unpatched build).
    let slots: Vec<usize> = bytes
        .windows(marker.len() + 28)
        .enumerate()
        .filter(|(_, w)| w.starts_with(marker) && w[marker.len()..].iter().all(|b| *b == 0))
        .map(|(i, _)| i + marker.len())
        .collect();
    if slots.is_empty() || tag.len() > 28 {
        return Err("no build-tag slot in the binary".into());
    }
    for at in slots {
        bytes[at..at + tag.len()].copy_from_slice(tag.as_bytes());
    }
    let path = dir.join(format!("mcp-relay-{tag}"));
    std::fs::write(&path, bytes)?;
    make_executable(&path)?;
    Ok(path)
}

fn make_executable(path: &Path) -> Result {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Installs `from` at `at` the way a package manager does: a new file renamed over the old.
fn install(from: &Path, at: &Path) -> Result {
    let tmp = at.with_extension("new");
    std::fs::copy(from, &tmp)?;
    make_executable(&tmp)?;
    std::fs::rename(&tmp, at)?;
    Ok(())
}

fn version(tag: &str) -> String {
    if tag.is_empty() {
        env!("CARGO_PKG_VERSION").to_owned()
    } else {
        format!("{}+{tag}", env!("CARGO_PKG_VERSION"))
    }
}

fn status(c: &mut StdioClient, id: u64) -> Result<Value> {
    let r = c.call_tool(id, "relay__status", json!({}))?;
    Ok(r["result"]["structuredContent"].clone())
}

/// The stdio servers' process ids by server name.
fn pids(status: &Value) -> BTreeMap<String, i64> {
    status["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["pid"].as_i64()?)))
        .collect()
}

/// Waits until the relay reports `want` as its version.
fn wait_version(c: &mut StdioClient, id: &mut u64, want: &str) -> Result<Value> {
    poll(&format!("the relay to report {want}"), || {
        *id += 1;
        let s = status(c, *id)?;
        Ok(if s["version"] == want {
            Ok(s)
        } else {
            Err(s["version"].to_string())
        })
    })
}

/// Children of `pid` that exited and were not reaped.
fn zombies(pid: i64) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the fields after the last ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or_default();
        let ppid: i64 = f.next().and_then(|p| p.parse().ok()).unwrap_or_default();
        if ppid == pid && state == "Z" {
            out.push(child);
        }
    }
    Ok(out)
}

/// Waits until process `pid` runs the newly installed binary (the one it was started from
/// was replaced, so until the exec its executable shows as deleted).
fn exec_done(pid: i64) -> Result {
    poll("the exec", || {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        Ok(if exe.to_string_lossy().ends_with("(deleted)") {
            Err(exe.display().to_string())
        } else {
            Ok(())
        })
    })
}

/// A relay installed at a path of its own (where new builds get installed), and a
/// directory for those builds: (the relay's dir, the builds' dir, the relay's path).
fn installed_relay() -> Result<(tempfile::TempDir, tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    let bin = dir.path().join("mcp-relay");
    install(&relay_bin(), &bin)?;
    Ok((dir, builds, bin))
}

fn sigusr2(c: &StdioClient) -> Result {
    let pid = i32::try_from(c.proc.child.id())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )?;
    Ok(())
}

/// Two stdio servers (`a`, `b`) and one over HTTP (`web`, kept alive by the returned
/// process): the config of the upgrade-under-load tests.
fn two_stdio_one_http() -> Result<(crate::support::Proc, Value)> {
    let (web, url) = example_http("web")?;
    let cfg = json!({"mcpServers": {
        "a": example("a"),
        "b": example("b"),
        "web": {"type": "http", "url": url},
    }});
    Ok((web, cfg))
}

#[test]
fn stdio_relay_upgrades_in_place_under_load() -> Result {
    let (dir, builds, bin) = installed_relay()?;
    let (_web, cfg) = two_stdio_one_http()?;
    let run = runtime_dir(dir.path());
    let mut c = StdioClient::start_from(dir, cfg, &bin, &[], Stdio::null())?;
    c.initialize(json!({}))?;
    let relay_pid = i64::from(c.proc.child.id());
    let mut id = 10;
    let before = status(&mut c, id)?;
    assert_eq!(before["version"], version(""));
    let servers = pids(&before);
    assert_eq!(servers.len(), 2, "{before}");
    let tools = c.tool_names(11)?;
    assert!(tools.iter().any(|t| t == "web__echo"), "{tools:?}");

    let mut next = 1000u64;
    let mut fds: Option<usize> = None;
    let targets = ["a__echo", "b__echo", "web__echo"];
    for (round, tag) in ["v2", "v3", "v4"].into_iter().enumerate() {
        install(&build(builds.path(), tag)?, &bin)?;
        let mut sent = BTreeMap::new();
        let call =
            |c: &mut StdioClient, sent: &mut BTreeMap<u64, String>, next: &mut u64| -> Result {
                *next += 1;
                let next = *next;
                let tool = targets[usize::try_from(next)? % targets.len()];
                let msg = format!("m{next}");
                c.send(
                    &json!({"jsonrpc": "2.0", "id": next, "method": "tools/call",
                "params": {"name": tool, "arguments": {"message": msg}}}),
                )?;
                sent.insert(next, format!("Echo: {msg}"));
                Ok(())
            };
        for _ in 0..15 {
            call(&mut c, &mut sent, &mut next)?;
        }
        if round == 1 {
            // A long call in flight when the upgrade starts: it completes.
            next += 1;
            c.send(
                &json!({"jsonrpc": "2.0", "id": next, "method": "tools/call",
                "params": {"name": "a__slow", "arguments": {"steps": 10, "ms": 100}}}),
            )?;
            sent.insert(next, "done after 10 steps".into());
        }
        if round == 0 {
            // Half a message when the exec comes: the new image reads the rest.
            next += 1;
            let line = json!({"jsonrpc": "2.0", "id": next, "method": "tools/call",
                "params": {"name": "b__echo", "arguments": {"message": "split"}}})
            .to_string();
            let (first, rest) = line.split_at(line.len() / 2);
            c.send_raw_partial(first)?;
            sigusr2(&c)?;
            exec_done(relay_pid)?;
            c.send_raw(rest)?;
            sent.insert(next, "Echo: split".into());
        }
        match round {
            0 => {}
            // The command line, through the control socket.
            2 => {
                let out = std::process::Command::new(relay_bin())
                    .args(["upgrade", "--pid", &relay_pid.to_string()])
                    .env("MCP_RELAY_RUNTIME_DIR", &run)
                    .stderr(Stdio::piped())
                    .output()?;
                let said = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && said.contains(&version(tag)),
                    "{said} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _ => sigusr2(&c)?,
        }
        for _ in 0..15 {
            call(&mut c, &mut sent, &mut next)?;
        }
        let (answers, others) = c.answers(sent.len())?;
        // Nothing else reached the client: no error, no list change.
        assert!(
            !others
                .iter()
                .any(|l| l.contains("list_changed") || l.contains("error")),
            "{others:?}"
        );
        for (k, want) in &sent {
            let a = answers.get(k).ok_or("a call got no answer")?;
            assert_eq!(text(a), want, "call {k} in round {round}: {a}");
        }
        wait_version(&mut c, &mut id, &version(tag))?;
        // The remote server reconnects from the new image (its tools stay listed meanwhile).
        let now = poll("every server ready", || {
            id += 1;
            let s = status(&mut c, id)?;
            let all = s["servers"].as_array().into_iter().flatten();
            Ok(if all.clone().all(|s| s["state"] == "ready") {
                Ok(s)
            } else {
                Err(s.to_string())
            })
        })?;
        assert_eq!(now["pid"], relay_pid, "same process");
        assert_eq!(
            pids(&now),
            servers,
            "the stdio servers were adopted, not restarted"
        );
        assert_eq!(c.tool_names(id + 500)?, tools, "the same tools");
        assert_eq!(now["upgrades"], round + 1, "{now}");
        assert_eq!(
            zombies(relay_pid)?,
            Vec::<i64>::new(),
            "no unreaped children"
        );
        // No descriptor leaks from one image to the next: pipes and memfds (sockets vary
        // with the HTTP connection pool).
        let open = std::fs::read_dir(format!("/proc/{relay_pid}/fd"))?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| {
                let t = t.to_string_lossy();
                t.starts_with("pipe:") || t.starts_with("/memfd:")
            })
            .count();
        match fds {
            None => fds = Some(open),
            Some(n) => assert_eq!(open, n, "open descriptors after upgrade {}", round + 1),
        }
        for s in now["servers"].as_array().into_iter().flatten() {
            if s["transport"] == "stdio" {
                assert_eq!(s["restarts"], 0, "{s}");
            }
        }
    }
    // A server started by the upgraded image inherits none of the handed-over pipes: it
    // holds as many pipes as one the first image started.
    let r = c.call_tool(
        9000,
        "relay__add_server",
        json!({"name": "c", "config": example("c")}),
    )?;
    assert!(r["result"]["isError"].is_null(), "{r}");
    let st = status(&mut c, 9001)?;
    let p = pids(&st);
    let pipes = |pid: i64| -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| t.to_string_lossy().starts_with("pipe:"))
            .count())
    };
    let (a, fresh) = (p.get("a").ok_or("no a")?, p.get("c").ok_or("no c")?);
    assert_eq!(
        pipes(*fresh)?,
        pipes(*a)?,
        "pipes of a server started after the upgrades"
    );
    Ok(())
}

#[test]
fn an_upgrade_carries_calls_in_flight_to_a_stdio_server() -> Result {
    let (dir, builds, bin) = installed_relay()?;
    let cfg = json!({"mcpServers": {"a": example("a")}});
    let mut c = StdioClient::start_from(dir, cfg, &bin, &[], Stdio::null())?;
    c.initialize(json!({}))?;
    let relay_pid = i64::from(c.proc.child.id());
    let servers = pids(&status(&mut c, 10)?);
    // Two long calls (50 steps of 300 ms: long enough to outlast the new binary's check on a
    // loaded machine), one with progress; both running at the exec.
    let slow = |id: u64, token: Option<&str>| {
        let mut params = json!({"name": "a__slow", "arguments": {"steps": 50, "ms": 300}});
        if let Some(t) = token {
            params["_meta"] = json!({"progressToken": t});
        }
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
    };
    c.send(&slow(20, Some("long")))?;
    c.send(&slow(21, None))?;
    let is_progress = |l: &str| l.contains("notifications/progress") && l.contains("\"long\"");
    let mut before = Vec::new();
    c.recv_until(is_progress, &mut before)?;
    install(&build(builds.path(), "v2")?, &bin)?;
    sigusr2(&c)?;
    exec_done(relay_pid)?;
    // The new image answers at once while the calls run on: they were carried, not waited
    // for (a relay that waited would have answered them before its exec).
    c.send(&json!({"jsonrpc": "2.0", "id": 22, "method": "ping"}))?;
    let mut seen = Vec::new();
    let first = c.recv_until(
        |l| [20, 21, 22].iter().any(|i| is_response(l, &json!(i))),
        &mut seen,
    )?;
    assert!(
        is_response(&first, &json!(22)),
        "a long call was answered before the exec: {first}"
    );
    // The client's cancellation reaches a carried call.
    c.send(
        &json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 21, "reason": "test"}}),
    )?;
    let cancelled = c.recv_until(|l| is_response(l, &json!(21)), &mut seen)?;
    assert!(cancelled.contains("-32800"), "{cancelled}");
    // Progress goes on from the new image under the client's token, then the answer.
    let done = c.recv_until(|l| is_response(l, &json!(20)), &mut seen)?;
    let v: Value = serde_json::from_str(&done)?;
    assert_eq!(text(&v), "done after 50 steps", "{done}");
    assert!(
        seen.iter().any(|l| is_progress(l)),
        "no progress after the exec: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("error") || l.contains("list_changed")),
        "{seen:?}"
    );
    // Each answered once: nothing else under those ids before a later round trip.
    c.send(&json!({"jsonrpc": "2.0", "id": 23, "method": "ping"}))?;
    let mut later = Vec::new();
    c.recv_until(|l| is_response(l, &json!(23)), &mut later)?;
    for i in [20, 21, 22] {
        assert!(
            !seen.iter().chain(&later).any(|l| is_response(l, &json!(i))),
            "a second answer to {i}: {seen:?} {later:?}"
        );
    }
    let mut id = 30;
    wait_version(&mut c, &mut id, &version("v2"))?;
    let now = status(&mut c, id + 1)?;
    assert_eq!(now["pid"], relay_pid, "same process");
    assert_eq!(pids(&now), servers, "the stdio server was adopted");
    // Still serving calls afterwards.
    let r = c.call_tool(40, "a__echo", json!({"message": "after"}))?;
    assert_eq!(text(&r), "Echo: after");
    assert_eq!(
        zombies(relay_pid)?,
        Vec::<i64>::new(),
        "no unreaped children"
    );
    Ok(())
}

#[test]
fn a_broken_new_binary_leaves_the_relay_serving() -> Result {
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    // Exits at once, whatever it is asked.
    let broken = builds.path().join("broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'boom: missing library' >&2\nexit 3\n",
    )?;
    make_executable(&broken)?;
    // Passes its check, then fails its restore after the exec.
    let failing = build(builds.path(), "broken")?;
    let log = dir.path().join("relay.log");
    let log_file = std::fs::File::create(&log)?;
    let cfg = json!({"mcpServers": {"a": example("a")}});
    let mut c = StdioClient::start_from(
        dir,
        cfg,
        &relay_bin(),
        &[
            ("MCP_RELAY_UPGRADE_FAIL_TAG", "broken"),
            ("MCP_RELAY_UPGRADE_PANIC_TAG", "panics"),
        ],
        Stdio::from(log_file),
    )?;
    c.initialize(json!({}))?;
    let before = status(&mut c, 1)?;

    let r = c.call_tool(2, "relay__upgrade", json!({"binary": broken}))?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    let said = text(&r);
    assert!(
        said.contains("failed its check") && said.contains("boom: missing library"),
        "{said}"
    );
    assert_eq!(
        text(&c.call_tool(3, "a__echo", json!({"message": "x"}))?),
        "Echo: x"
    );

    // A binary without `upgrade-check` (one that predates upgrades) says nothing useful.
    let old = builds.path().join("old");
    std::fs::write(&old, "#!/bin/sh\ncat >/dev/null\nexit 0\n")?;
    make_executable(&old)?;
    let r = c.call_tool(30, "relay__upgrade", json!({"binary": old}))?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text(&r).contains("predates"), "{r}");

    let r = c.call_tool(4, "relay__upgrade", json!({"binary": failing}))?;
    assert_eq!(
        r["result"]["structuredContent"]["to"],
        version("broken"),
        "{r}"
    );
    // The previous binary took the same state back (the `n`th rollback, its log says
    // `why`), and serves on: same process, same servers.
    let rolled_back = |c: &mut StdioClient, n: usize, why: &str, id: u64| -> Result {
        poll("the rollback in the log", || {
            let t = std::fs::read_to_string(&log)?;
            Ok(
                if t.contains(why) && t.matches("the previous binary serves on").count() == n {
                    Ok(())
                } else {
                    Err(t.lines().last().unwrap_or_default().to_owned())
                },
            )
        })?;
        let after = status(c, id)?;
        assert_eq!(after["version"], version(""));
        assert_eq!(after["pid"], before["pid"]);
        assert_eq!(pids(&after), pids(&before));
        let r = c.call_tool(id + 1, "a__echo", json!({"message": why}))?;
        assert_eq!(text(&r), format!("Echo: {why}"));
        Ok(())
    };
    // The new image cannot restore.
    rolled_back(&mut c, 1, "marked to fail taking over", 5)?;

    // One that panics in its own code while taking over (after the exec, restoring the
    // servers): the panic returns to the previous binary with the same state.
    let panicking = build(builds.path(), "panics")?;
    let r = c.call_tool(7, "relay__upgrade", json!({"binary": panicking}))?;
    assert_eq!(
        r["result"]["structuredContent"]["to"],
        version("panics"),
        "{r}"
    );
    rolled_back(&mut c, 2, "panicked while taking over", 8)?;
    Ok(())
}

/// Node-based clients (Claude Code, Cursor) give their servers socket pairs, not pipes: the
/// relay reads those itself too, so an upgrade loses nothing there either.
#[test]
fn an_upgrade_over_a_socket_pair() -> Result {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::OwnedFd;
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    let cfg =
        crate::support::write_config(dir.path(), &json!({"mcpServers": {"a": example("a")}}))?;
    let (mine, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs_out: OwnedFd = theirs.try_clone()?.into();
    let theirs_in: OwnedFd = theirs.into();
    let child = std::process::Command::new(relay_bin())
        .args(["stdio", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .env("MCP_RELAY_RUNTIME_DIR", runtime_dir(dir.path()))
        .stdin(Stdio::from(theirs_in))
        .stdout(Stdio::from(theirs_out))
        .stderr(Stdio::null())
        .spawn()?;
    let _relay = crate::support::Proc { child };
    mine.set_read_timeout(Some(crate::support::TIMEOUT))?;
    let mut w = mine.try_clone()?;
    let mut lines = BufReader::new(mine).lines();
    let mut request = |id: u64, method: &str, params: Value| -> Result<Value> {
        writeln!(
            w,
            "{}",
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        )?;
        loop {
            let v: Value = serde_json::from_str(&lines.next().ok_or("closed")??)?;
            if v["id"] == id && v.get("method").is_none() {
                return Ok(v);
            }
        }
    };
    request(
        0,
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "it", "version": "1"}}),
    )?;
    let new = build(builds.path(), "sock")?;
    let r = request(
        1,
        "tools/call",
        json!({"name": "relay__upgrade", "arguments": {"binary": new}}),
    )?;
    assert_eq!(
        r["result"]["structuredContent"]["to"],
        version("sock"),
        "{r}"
    );
    let mut n = 10;
    poll("the new version over the socket", || {
        n += 1;
        let echo = request(
            n,
            "tools/call",
            json!({"name": "a__echo", "arguments": {"message": "s"}}),
        )?;
        assert_eq!(text(&echo), "Echo: s", "{echo}");
        n += 1;
        let st = request(
            n,
            "tools/call",
            json!({"name": "relay__status", "arguments": {}}),
        )?;
        let v = st["result"]["structuredContent"]["version"].clone();
        Ok(if v == version("sock") {
            Ok(())
        } else {
            Err(v.to_string())
        })
    })?;
    Ok(())
}

/// An HTTP relay hands its listening socket and its sessions to a new process (three times
/// in a row) while 50 sessions call tools: no failed call, no refused connection, no session
/// lost (each goes on with its own `Mcp-Session-Id`), and the new version answers. Before
/// that, a new binary that fails to take over is killed and the relay serves on.
#[test]
fn http_relay_hands_over_its_listener_and_sessions() -> Result {
    use crate::support::HttpClient;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    let cfg = json!({"mcpServers": {"a": example("a")}});
    let served = crate::support::serve_with(
        &cfg,
        dir.path(),
        &[
            ("MCP_RELAY_UPGRADE_FAIL_TAG", "broken"),
            ("MCP_RELAY_UPGRADE_PANIC_TAG", "panics"),
        ],
    )?;
    let url = served.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    let tally = Tally {
        stop: stop.clone(),
        calls: calls.clone(),
        failures: failures.clone(),
    };
    for w in 0..50u64 {
        let mut c = HttpClient::new(&url)?;
        c.initialize()?;
        workers.push(tally.worker(c, Duration::from_millis(40), move |c, i| {
            let msg = format!("w{w}-{i}");
            let r = c.call_tool(i, "a__echo", json!({"message": msg}))?;
            Ok((text(&r) != format!("Echo: {msg}")).then(|| r.to_string()))
        }));
    }
    // Long calls answered on an SSE stream (progress first) span the hand-overs: they
    // finish on the process that started them.
    let mut c = HttpClient::new(&url)?;
    c.initialize()?;
    workers.push(tally.worker(c, Duration::ZERO, |c, i| {
        let params = json!({"name": "a__slow", "arguments": {"steps": 10, "ms": 60},
            "_meta": {"progressToken": i}});
        let r = c.rpc(i, "tools/call", params)?;
        Ok((text(&r) != "done after 10 steps").then(|| format!("slow: {r}")))
    }));
    let mut admin = HttpClient::new(&url)?;
    admin.initialize()?;
    let first_pid = status_of(&admin, 1)?["pid"].clone();
    let mut pid = first_pid.clone();
    let last = Successors(std::cell::Cell::new(0));
    // A new binary that passes its check but fails to take over: killed, the relay serves on.
    let broken = build(builds.path(), "broken")?;
    let r = admin.call_tool(2, "relay__upgrade", json!({"binary": broken}))?;
    assert_eq!(
        r["result"]["structuredContent"]["to"],
        version("broken"),
        "{r}"
    );
    poll("the rollback", || {
        let m = reqwest::blocking::get(format!("{}/metrics", served.base()))?.text()?;
        Ok(
            if m.contains(r#"mcp_relay_upgrades_total{outcome="rolled_back"} 1"#) {
                Ok(())
            } else {
                Err(m
                    .lines()
                    .filter(|l| l.contains("upgrades"))
                    .collect::<Vec<_>>()
                    .join(" "))
            },
        )
    })?;
    let s = status_of(&admin, 3)?;
    assert_eq!(
        (&s["pid"], &s["version"]),
        (&first_pid, &json!(version("")))
    );
    for (n, tag) in ["h2", "h3", "h4"].into_iter().enumerate() {
        let new = build(builds.path(), tag)?;
        if n == 1 {
            // The command line: it finds the new process through the control sockets.
            let out = std::process::Command::new(relay_bin())
                .args(["upgrade", "--config"])
                .arg(dir.path().join("relay.json"))
                .arg("--binary")
                .arg(&new)
                .env("MCP_RELAY_RUNTIME_DIR", runtime_dir(dir.path()))
                .output()?;
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && said.contains(&version(tag)),
                "{said} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let r = admin.call_tool(10 + n as u64, "relay__upgrade", json!({"binary": new}))?;
            assert_eq!(r["result"]["structuredContent"]["to"], version(tag), "{r}");
        }
        let mut id = 100 * (n as u64 + 1);
        let now = poll(&format!("{tag} serving"), || {
            id += 1;
            let s = status_of(&admin, id)?;
            Ok(if s["version"] == version(tag) {
                Ok(s)
            } else {
                Err(s["version"].to_string())
            })
        })?;
        last.0.set(now["pid"].as_i64().unwrap_or_default());
        assert_ne!(now["pid"], pid, "a new process serves");
        assert_eq!(now["upgrades"], n + 1, "{now}");
        pid = now["pid"].clone();
        // Calls go on once it serves.
        let before = calls.load(Ordering::Relaxed);
        poll("calls after the upgrade", || {
            let c = calls.load(Ordering::Relaxed);
            Ok(if c > before + 100 {
                Ok(())
            } else {
                Err(c.to_string())
            })
        })?;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        if let Some(e) = w.join().map_err(|_| "a worker panicked")? {
            errors.push(e);
        }
    }
    let (ok, failed) = (
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    // The last process is nobody's child here: stop it ourselves.
    last.0.set(0);
    if let Some(p) = pid.as_i64() {
        stop_pid(p)?;
    }
    assert_eq!(failed, 0, "{ok} calls, {failed} failed: {errors:?}");
    assert!(ok > 300, "{ok} calls");
    Ok(())
}

/// Counts the calls of worker threads until `stop`.
struct Tally {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Tally {
    /// A thread calling `call(client, n)` (Ok(None): answered right; Ok(Some(why)): a
    /// wrong answer) every `pause` until stopped; it returns its last failure.
    fn worker(
        &self,
        c: crate::support::HttpClient,
        pause: Duration,
        call: impl Fn(&crate::support::HttpClient, u64) -> Result<Option<String>> + Send + 'static,
    ) -> std::thread::JoinHandle<Option<String>> {
        use std::sync::atomic::Ordering;
        let (stop, calls, failures) =
            (self.stop.clone(), self.calls.clone(), self.failures.clone());
        std::thread::spawn(move || {
            let mut last_error = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match call(&c, i) {
                    Ok(None) => {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(why)) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(why);
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e.to_string());
                    }
                }
                std::thread::sleep(pause);
            }
            last_error
        })
    }
}

fn status_of(c: &crate::support::HttpClient, id: u64) -> Result<Value> {
    let r = c.call_tool(id, "relay__status", json!({}))?;
    Ok(r["result"]["structuredContent"].clone())
}

/// Under systemd (`Type=notify`): `READY=1` once serving, and after an upgrade the new
/// process announces itself as the main one.
#[test]
fn systemd_hears_ready_and_the_new_main_pid() -> Result {
    use crate::support::HttpClient;
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(crate::support::TIMEOUT))?;
    let cfg = json!({"mcpServers": {"a": example("a")}});
    let notify = path.to_str().ok_or("path")?;
    let served = crate::support::serve_with(&cfg, dir.path(), &[("NOTIFY_SOCKET", notify)])?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"READY=1");
    let mut c = HttpClient::new(&served.url)?;
    c.initialize()?;
    let r = c.call_tool(
        1,
        "relay__upgrade",
        json!({"binary": build(builds.path(), "sd")?}),
    )?;
    assert_eq!(r["result"]["structuredContent"]["to"], version("sd"), "{r}");
    let n = sock.recv(&mut buf)?;
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    let announced = said
        .strip_prefix("MAINPID=")
        .and_then(|r| r.split('\n').next())
        .and_then(|p| p.parse::<i64>().ok());
    let last = Successors(std::cell::Cell::new(announced.unwrap_or_default()));
    // The old process may still answer on the connection it had: ask until the new one does.
    let mut id = 1;
    let s = poll("the new version", || {
        id += 1;
        let s = status_of(&c, id)?;
        Ok(if s["version"] == version("sd") {
            Ok(s)
        } else {
            Err(s["version"].to_string())
        })
    })?;
    let pid = s["pid"].as_i64().ok_or("no pid")?;
    last.0.set(0);
    stop_pid(pid)?;
    assert_eq!(said, format!("MAINPID={pid}\nREADY=1"));
    Ok(())
}

/// Stops, when dropped (also when a test fails), the relay process that serves last.
struct Successors(std::cell::Cell<i64>);

impl Drop for Successors {
    fn drop(&mut self) {
        let pid = self.0.get();
        if pid > 0 {
            let _ = stop_pid(pid);
        }
    }
}

/// Stops a relay that is nobody's child here (a successor of an HTTP upgrade) and waits
/// until it is gone (or a zombie of whoever adopted it).
fn stop_pid(pid: i64) -> Result {
    let p = i32::try_from(pid)?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p),
        nix::sys::signal::Signal::SIGTERM,
    );
    poll("the relay to exit", || {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map_or("", |(_, r)| r.trim_start());
        Ok(if stat.is_empty() || state.starts_with('Z') {
            Ok(())
        } else {
            Err("running".to_owned())
        })
    })
}

/// The official Rust SDK (rmcp) as the client of a stdio relay with two stdio servers and
/// one remote server, calling tools without pause while the relay upgrades itself three
/// times through `relay__upgrade` (once with a long call in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rmcp_client_does_not_notice_three_upgrades() -> Result {
    use rmcp::ServiceExt;
    use rmcp::model::CallToolRequestParams;
    let (dir, builds, bin) = installed_relay()?;
    let (_web, cfg) = two_stdio_one_http()?;
    let path = crate::support::write_config(dir.path(), &cfg)?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("stdio")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn");
    let client = ().serve(rmcp::transport::TokioChildProcess::new(cmd)?).await?;
    let args = |pairs: Value| pairs.as_object().cloned().unwrap_or_default();
    let structured = |r: rmcp::model::CallToolResult| r.structured_content.unwrap_or_default();
    let status = |c: rmcp::Peer<rmcp::RoleClient>| async move {
        let r = c
            .call_tool(CallToolRequestParams::new("relay__status").with_arguments(args(json!({}))))
            .await?;
        Ok::<Value, Box<dyn std::error::Error + Send + Sync>>(structured(r))
    };
    let before = status(client.peer().clone()).await?;
    let servers = pids(&before);
    assert_eq!(servers.len(), 2, "{before}");
    let tools: Vec<String> = client
        .list_all_tools()
        .await?
        .iter()
        .map(|t| t.name.to_string())
        .collect();

    // Calls without pause, round-robin over the three servers, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let caller = {
        let peer = client.peer().clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let targets = ["a__echo", "b__echo", "web__echo"];
            for n in 0u64..100_000 {
                if stop.is_cancelled() {
                    break;
                }
                let tool = targets[(n % 3) as usize];
                let msg = format!("m{n}");
                let r = peer
                    .call_tool(
                        CallToolRequestParams::new(tool)
                            .with_arguments(args(json!({"message": msg}))),
                    )
                    .await;
                let text = r.as_ref().ok().and_then(|r| {
                    serde_json::to_value(&r.content)
                        .ok()
                        .and_then(|v| v[0]["text"].as_str().map(str::to_owned))
                });
                match text {
                    Some(t) if t == format!("Echo: {msg}") => ok += 1,
                    _ => failed.push(format!("{tool} {msg}: {r:?}")),
                }
            }
            (ok, failed)
        })
    };
    for (round, tag) in ["r2", "r3", "r4"].into_iter().enumerate() {
        let new = build(builds.path(), tag)?;
        let long = (round == 1).then(|| {
            let peer = client.peer().clone();
            tokio::spawn(async move {
                peer.call_tool(
                    CallToolRequestParams::new("a__slow")
                        .with_arguments(args(json!({"steps": 30, "ms": 100}))),
                )
                .await
            })
        });
        if long.is_some() {
            // Let the long call reach its server first (had it not, it would be held and
            // served by the new image: the test holds either way).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let r = client
            .call_tool(
                CallToolRequestParams::new("relay__upgrade")
                    .with_arguments(args(json!({"binary": new}))),
            )
            .await?;
        assert_eq!(structured(r)["to"], version(tag));
        let now = crate::support::poll_async(&format!("the relay to report {tag}"), || {
            let peer = client.peer().clone();
            async move {
                let s = status(peer).await.map_err(|e| e.to_string())?;
                Ok(if s["version"] == version(tag) {
                    Ok(s)
                } else {
                    Err(s["version"].to_string())
                })
            }
        })
        .await?;
        assert_eq!(
            pids(&now),
            servers,
            "the stdio servers were adopted, not restarted"
        );
        if let Some(long) = long {
            let r = long.await??;
            let text = serde_json::to_value(&r.content)?[0]["text"].clone();
            assert_eq!(text, "done after 30 steps");
        }
    }
    stop.cancel();
    let (ok, failed) = caller.await?;
    assert!(
        failed.is_empty(),
        "{} failed calls: {failed:?}",
        failed.len()
    );
    assert!(ok > 30, "only {ok} calls made it");
    let after: Vec<String> = client
        .list_all_tools()
        .await?
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(after, tools, "the same tools");
    client.cancel().await?;
    Ok(())
}
