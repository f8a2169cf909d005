//! In-place upgrades of a stdio relay: the running binary is replaced by a second build of
//! itself (a copy whose build tag is patched, so it reports another version) while its
//! client keeps calling tools.

use crate::support::{
    Result, StdioClient, example, example_http, poll, relay_bin, runtime_dir, text,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

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

fn sigusr2(c: &StdioClient) -> Result {
    let pid = i32::try_from(c.proc.child.id())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )?;
    Ok(())
}

#[test]
fn stdio_relay_upgrades_in_place_under_load() -> Result {
    let dir = tempfile::tempdir()?;
    let builds = tempfile::tempdir()?;
    // The relay runs from a path of its own, where new builds get installed.
    let bin = dir.path().join("mcp-relay");
    install(&relay_bin(), &bin)?;
    let (_web, url) = example_http("web")?;
    let cfg = json!({"mcpServers": {
        "a": example("a"),
        "b": example("b"),
        "web": {"type": "http", "url": url},
    }});
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
        match round {
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
        for s in now["servers"].as_array().into_iter().flatten() {
            if s["transport"] == "stdio" {
                assert_eq!(s["restarts"], 0, "{s}");
            }
        }
    }
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
        &[("MCP_RELAY_UPGRADE_FAIL_TAG", "broken")],
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

    let r = c.call_tool(4, "relay__upgrade", json!({"binary": failing}))?;
    assert_eq!(
        r["result"]["structuredContent"]["to"],
        version("broken"),
        "{r}"
    );
    // The new image cannot restore; the previous binary takes the same state back.
    poll("the rollback in the log", || {
        let t = std::fs::read_to_string(&log)?;
        Ok(if t.contains("the previous binary serves on") {
            Ok(())
        } else {
            Err(t.lines().last().unwrap_or_default().to_owned())
        })
    })?;
    let after = status(&mut c, 5)?;
    assert_eq!(after["version"], version(""));
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(
        text(&c.call_tool(6, "a__echo", json!({"message": "y"}))?),
        "Echo: y"
    );
    Ok(())
}
