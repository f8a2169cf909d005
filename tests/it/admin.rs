//! Changing a running relay: management tools, hot reload of the config file, the operator
//! CLI, and safe config persistence (atomic, locked, backed up, disk full).

use crate::support::{
    HttpClient, Result, StdioClient, example, example_bin, names, poll, relay_bin, runtime_dir,
    serve,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn tool_names(list: &Value) -> Vec<String> {
    names(list, "tools")
}

/// The text of a tool result (or the error message).
fn text(r: &Value) -> String {
    Some(crate::support::text(r))
        .filter(|t| !t.is_empty())
        .or_else(|| r["error"]["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Polls `tools/list` (bounded by the test timeout) until `pred` holds on the names.
fn wait_for_tools(
    c: &mut StdioClient,
    first_id: u64,
    pred: impl Fn(&[String]) -> bool,
) -> Result<Vec<String>> {
    let mut id = first_id;
    poll("the tool list changes", || {
        id += 1;
        let names = tool_names(&c.request(id, "tools/list", json!({}))?);
        Ok(if pred(&names) {
            Ok(names)
        } else {
            Err(format!("{names:?}"))
        })
    })
}

fn read_json(path: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn backups(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("relay.json.backup."))
        .collect();
    v.sort();
    Ok(v)
}

fn cli(dir: &Path, config: &Path, args: &[&str]) -> Result<std::process::Output> {
    cli_in(&runtime_dir(dir), config, args)
}

/// The CLI with its own control-socket directory: `run` decides which relays it finds.
fn cli_in(run: &Path, config: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(relay_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("MCP_RELAY_RUNTIME_DIR", run)
        .env("RUST_LOG", "warn")
        .output()?)
}

#[test]
fn management_tools_change_servers_live_and_persist() -> Result {
    let mut cfg = json!({"mcpServers": {"ex": example("ex")}});
    cfg["mcpServers"]["ex"]["env"] = json!({"SECRET_TOKEN": "hunter2-value"});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let tools = tool_names(&c.request(1, "tools/list", json!({}))?);
    for t in [
        "relay__status",
        "relay__add_server",
        "relay__reload_config",
        "ex__echo",
    ] {
        assert!(tools.contains(&t.to_owned()), "{t} missing: {tools:?}");
    }

    // Ten slow calls to `ex` in flight while a server is added.
    for i in 0..10u64 {
        c.send(&json!({"jsonrpc":"2.0","id":100 + i,"method":"tools/call","params":{"name":"ex__slow","arguments":{"steps":4,"ms":50}}}))?;
    }
    c.send(&json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"relay__add_server","arguments":{"name":"more","config":example("more")}}}))?;
    let (answers, seen) = c.answers(11)?;
    for i in 0..10u64 {
        assert_eq!(
            text(&answers[&(100 + i)]),
            "done after 4 steps",
            "{:?}",
            answers[&(100 + i)]
        );
    }
    let added = &answers[&2]["result"];
    assert_eq!(added["isError"], Value::Null, "{added}");
    assert_eq!(
        added["structuredContent"]["applied"]["added"],
        json!(["more"])
    );
    assert_eq!(
        added["structuredContent"]["server"]["state"], "ready",
        "{added}"
    );
    // The session listed tools before, so it hears of the change.
    if !seen
        .iter()
        .any(|l| l.contains("notifications/tools/list_changed"))
    {
        let mut skipped = Vec::new();
        c.recv_until(
            |l| l.contains("notifications/tools/list_changed"),
            &mut skipped,
        )?;
    }
    let tools = tool_names(&c.request(3, "tools/list", json!({}))?);
    assert!(tools.contains(&"more__echo".to_owned()), "{tools:?}");
    assert_eq!(
        text(&c.call_tool(4, "more__echo", json!({"message":"hi"}))?),
        "Echo: hi"
    );

    // Persisted in the user's style, with one backup of the previous version.
    let file = std::fs::read_to_string(&c.config)?;
    assert!(file.contains("\n  \"mcpServers\": {\n    \"ex\""), "{file}");
    assert_eq!(
        read_json(&c.config)?["mcpServers"]["more"]["args"],
        json!(["--name", "more"])
    );
    let dir = c.dir.path().to_owned();
    assert_eq!(backups(&dir)?.len(), 1);

    // Status and listings show env keys, never values.
    let status = c.call_tool(5, "relay__status", json!({}))?;
    let listing = c.call_tool(6, "relay__list_servers", json!({}))?;
    for r in [&status, &listing] {
        assert!(!r.to_string().contains("hunter2"), "{r}");
    }
    assert!(listing.to_string().contains("SECRET_TOKEN"), "{listing}");
    let st = &status["result"]["structuredContent"];
    assert_eq!(st["sessions"], 1);
    assert_eq!(st["servers"].as_array().map(Vec::len), Some(2), "{st}");

    // Errors are tool errors with a reason.
    let dup = c.call_tool(
        7,
        "relay__add_server",
        json!({"name":"more","config":example("x")}),
    )?;
    assert_eq!(dup["result"]["isError"], true);
    assert!(text(&dup).contains("already exists"), "{dup}");
    let bad = c.call_tool(
        8,
        "relay__add_server",
        json!({"name":"relay","config":example("x")}),
    )?;
    assert!(text(&bad).contains("reserved"), "{bad}");

    // Restart keeps the tools; remove takes them away.
    let r = c.call_tool(9, "relay__restart_server", json!({"name":"more"}))?;
    assert_eq!(
        r["result"]["structuredContent"]["server"]["state"], "ready",
        "{r}"
    );
    let r = c.call_tool(10, "relay__remove_server", json!({"name":"more"}))?;
    assert_eq!(
        r["result"]["structuredContent"]["applied"]["removed"],
        json!(["more"]),
        "{r}"
    );
    let tools = tool_names(&c.request(11, "tools/list", json!({}))?);
    assert!(!tools.iter().any(|t| t.starts_with("more__")), "{tools:?}");
    let gone = c.call_tool(12, "more__echo", json!({"message":"x"}))?;
    assert!(text(&gone).contains("unknown tool"), "{gone}");
    assert!(read_json(&c.config)?["mcpServers"].get("more").is_none());
    assert_eq!(
        text(&c.call_tool(13, "ex__echo", json!({"message":"still"}))?),
        "Echo: still"
    );
    Ok(())
}

#[test]
fn config_file_edits_are_followed_and_invalid_edits_rejected() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    c.request(1, "tools/list", json!({}))?;
    let original = std::fs::read_to_string(&c.config)?;

    // Written in place (truncate, then write), as many editors do.
    let mut v = read_json(&c.config)?;
    v["mcpServers"]["more"] = example("more");
    std::fs::write(&c.config, serde_json::to_vec_pretty(&v)?)?;
    wait_for_tools(&mut c, 100, |t| t.contains(&"more__echo".to_owned()))?;
    assert_eq!(
        text(&c.call_tool(2, "more__echo", json!({"message":"a"}))?),
        "Echo: a"
    );

    // Renamed over, as other editors do.
    let tmp = c.dir.path().join("relay.json.swp");
    std::fs::write(&tmp, &original)?;
    std::fs::rename(&tmp, &c.config)?;
    wait_for_tools(&mut c, 200, |t| !t.iter().any(|n| n.starts_with("more__")))?;

    // Broken JSON: rejected as a whole, the running config stays, status says why.
    std::fs::write(&c.config, "{\"mcpServers\": {\"ex\": ")?;
    let mut id = 300;
    let err = poll("a config error in status", || {
        id += 1;
        let s = c.call_tool(id, "relay__status", json!({}))?;
        Ok(s["result"]["structuredContent"]["configError"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| s.to_string()))
    })?;
    assert!(
        err.contains("relay.json") && err.contains("not valid JSON"),
        "{err}"
    );
    assert_eq!(
        text(&c.call_tool(3, "ex__echo", json!({"message":"b"}))?),
        "Echo: b"
    );

    // Valid JSON, invalid config: also rejected whole (`ex` is not dropped with it).
    let mut v: Value = serde_json::from_str(&original)?;
    v["mcpServers"]["bad"] = json!({"type": "carrier-pigeon", "url": "http://127.0.0.1:1/mcp"});
    v["mcpServers"]
        .as_object_mut()
        .ok_or("no servers")?
        .remove("ex");
    std::fs::write(&c.config, serde_json::to_vec_pretty(&v)?)?;
    let r = c.call_tool(4, "relay__reload_config", json!({}))?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text(&r).contains("mcpServers.bad.type"), "{r}");
    assert_eq!(
        text(&c.call_tool(5, "ex__echo", json!({"message":"c"}))?),
        "Echo: c"
    );

    // Fixed: applied, and the error clears.
    std::fs::write(&c.config, &original)?;
    let r = c.call_tool(6, "relay__reload_config", json!({}))?;
    assert_eq!(r["result"]["isError"], Value::Null, "{r}");
    let s = c.call_tool(7, "relay__status", json!({}))?;
    assert_eq!(
        s["result"]["structuredContent"]["configError"],
        Value::Null,
        "{s}"
    );
    Ok(())
}

#[test]
fn sighup_reloads_when_the_watch_is_off() -> Result {
    let cfg = json!({"mcpServers": {"ex": example("ex")}, "relay": {"watchConfig": false}});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let mut v = read_json(&c.config)?;
    v["mcpServers"]["more"] = example("more");
    std::fs::write(&c.config, serde_json::to_vec_pretty(&v)?)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(c.proc.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
    wait_for_tools(&mut c, 100, |t| t.contains(&"more__echo".to_owned()))?;
    Ok(())
}

#[test]
fn cli_talks_to_the_running_relay() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    c.request(1, "tools/list", json!({}))?;
    let dir = c.dir.path().to_owned();
    let config = c.config.clone();

    let out = cli(&dir, &config, &["status"])?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.contains("SERVER") && table.contains("ex") && table.contains("ready"),
        "{table}"
    );
    let out = cli(&dir, &config, &["status", "--json"])?;
    let st: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st[0]["servers"][0]["name"], "ex", "{st}");

    let example = example_bin();
    let exe = example.to_str().ok_or("path")?;
    let out = cli(
        &dir,
        &config,
        &[
            "servers",
            "add",
            "more",
            "--env",
            "K=${HOME}",
            "--",
            exe,
            "--name",
            "more",
        ],
    )?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("added more"),
        "{out:?}"
    );
    wait_for_tools(&mut c, 100, |t| t.contains(&"more__echo".to_owned()))?;
    // `${VAR}` references stay references in the file.
    assert_eq!(
        read_json(&config)?["mcpServers"]["more"]["env"]["K"],
        "${HOME}"
    );

    let out = cli(&dir, &config, &["servers", "list", "--json"])?;
    let list: Value = serde_json::from_slice(&out.stdout)?;
    let more = list["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "more"))
        .ok_or("more not listed")?;
    assert_eq!(more["state"], "ready", "{list}");
    assert_eq!(more["envKeys"], json!(["K"]));

    let out = cli(&dir, &config, &["servers", "restart", "more"])?;
    assert!(out.status.success(), "{out:?}");
    let out = cli(&dir, &config, &["servers", "remove", "more"])?;
    assert!(out.status.success(), "{out:?}");
    wait_for_tools(&mut c, 200, |t| !t.iter().any(|n| n.starts_with("more__")))?;
    let out = cli(&dir, &config, &["servers", "remove", "more"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no server `more`"),
        "{out:?}"
    );

    // The newest backup still has `more`: restoring it brings the server back.
    let out = cli(&dir, &config, &["config", "backups"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "{out:?}"
    );
    let out = cli(&dir, &config, &["config", "restore"])?;
    assert!(out.status.success(), "{out:?}");
    wait_for_tools(&mut c, 300, |t| t.contains(&"more__echo".to_owned()))?;

    // Once the relay is gone, its socket is gone too.
    drop(c.proc);
    let out = cli(&dir, &config, &["status"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no relay is running"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_dir(runtime_dir(&dir))?.count(), 0);
    Ok(())
}

#[test]
fn concurrent_changes_from_sessions_and_the_cli_lose_nothing() -> Result {
    let dir = tempfile::tempdir()?;
    let cfg = json!({"mcpServers": {"ex": example("ex")}, "relay": {"configBackups": 3}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let config = dir.path().join("relay.json");
    let exe = example_bin().to_string_lossy().into_owned();
    // Entries are disabled: this test is about the file, not process start-up.
    let exe1 = exe.clone();
    let entry =
        move |name: &str| json!({"command": exe1, "args": ["--name", name], "disabled": true});
    let mut threads = Vec::new();
    for k in 0..5 {
        let url = url.clone();
        let entry = entry.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut s = HttpClient::new(&url)?;
            s.initialize()?;
            let mut id = 1;
            let mut op = |tool: &str, args: Value| -> Result<()> {
                id += 1;
                let r = s.call(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":args}}))?;
                if r["result"]["isError"] == true || r.get("error").is_some() {
                    return Err(format!("{tool} failed: {r}").into());
                }
                Ok(())
            };
            for j in 0..4 {
                let n = format!("s{k}_{j}");
                op("relay__add_server", json!({"name": n, "config": entry(&n)}))?;
            }
            for j in 2..4 {
                let n = format!("s{k}_{j}");
                op("relay__update_server", json!({"name": n, "config": entry(&format!("{n}-v2"))}))?;
            }
            for j in 0..2 {
                op("relay__remove_server", json!({"name": format!("s{k}_{j}")}))?;
            }
            Ok(())
        }));
    }
    // The CLI, at the same time: 5 adds, 3 updates, 2 removes. It sees no relay (its own
    // socket directory), so it writes the file itself: two processes contend for the lock.
    let elsewhere = tempfile::tempdir()?;
    let d = elsewhere.path().join("run");
    let cfgpath = config.clone();
    let exe2 = exe.clone();
    threads.push(std::thread::spawn(move || -> Result<()> {
        let run = |args: Vec<String>| -> Result<()> {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = cli_in(&d, &cfgpath, &args)?;
            if !out.status.success() {
                return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
            Ok(())
        };
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        for j in 0..5 {
            let n = format!("c{j}");
            run(s(&[
                "servers",
                "add",
                &n,
                "--disabled",
                "--",
                &exe2,
                "--name",
                &n,
            ]))?;
        }
        for j in 0..3 {
            let n = format!("c{j}");
            let v2 = format!("{n}-v2");
            run(s(&[
                "servers",
                "update",
                &n,
                "--disabled",
                "--",
                &exe2,
                "--name",
                &v2,
            ]))?;
        }
        for j in 3..5 {
            run(s(&["servers", "remove", &format!("c{j}")]))?;
        }
        Ok(())
    }));
    for t in threads {
        t.join().map_err(|_| "thread panicked")??;
    }
    // The relay follows what the CLI wrote (file watch): it converges on the file.
    let mut s = HttpClient::new(&url)?;
    s.initialize()?;
    poll("the relay converges on the file", || {
        let r = s.call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"relay__list_servers","arguments":{}}}))?;
        let listed: BTreeSet<String> = names(
            &json!({"result": r["result"]["structuredContent"]}),
            "servers",
        )
        .into_iter()
        .collect();
        Ok(
            if listed.contains("c2") && !listed.contains("c4") && listed.len() == 14 {
                Ok(())
            } else {
                Err(format!("{listed:?}"))
            },
        )
    })?;
    let file = read_json(&config)?;
    let servers = file["mcpServers"].as_object().ok_or("no servers")?;
    let got: BTreeSet<String> = servers.keys().cloned().collect();
    let mut want: BTreeSet<String> = ["ex", "c0", "c1", "c2"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for k in 0..5 {
        want.insert(format!("s{k}_2"));
        want.insert(format!("s{k}_3"));
    }
    assert_eq!(got, want);
    for (name, entry) in servers {
        if name != "ex" {
            assert_eq!(entry["args"][1], format!("{name}-v2"), "{name}: {entry}");
        }
    }
    // Only the file, at most 3 backups and the test's socket directory remain.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let kept = backups(dir.path())?;
    assert_eq!(kept.len(), 3, "{names:?}");
    let mut expected = vec!["relay.json".to_owned(), "run".to_owned()];
    expected.extend(kept);
    expected.sort();
    assert_eq!(names, expected);
    Ok(())
}

/// A tmpfs mounted over a directory for the test; unmounted on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_change_and_keeps_the_old_file() -> Result {
    let dir = tempfile::tempdir()?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(dir.path())
        .output();
    let _mount = match mounted {
        Ok(o) if o.status.success() => Mount(dir.path().to_owned()),
        other => {
            // Without the right to mount (not root), a read-only directory stands in.
            if nix::unistd::getuid().is_root() {
                // Root without CAP_SYS_ADMIN (a container): a read-only directory does not
                // stop root either, so there is no way to fail a write here.
                eprintln!("SKIPPED: cannot mount a tmpfs and root ignores modes: {other:?}");
                return Ok(());
            }
            return readonly_dir_keeps_the_old_file();
        }
    };
    let mut c = StdioClient::start_in(dir, json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let before = std::fs::read(&c.config)?;
    // Fill the file system.
    let filler = c.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let block = vec![b'x'; 4096];
        let mut full = false;
        for _ in 0..100 {
            if f.write_all(&block).and_then(|()| f.sync_all()).is_err() {
                full = true;
                break;
            }
        }
        assert!(full, "the 64k tmpfs never filled");
    }
    let r = c.call_tool(
        1,
        "relay__add_server",
        json!({"name":"more","config":example("more")}),
    )?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text(&r).contains("No space left"), "{r}");
    assert_eq!(std::fs::read(&c.config)?, before);
    let left: Vec<String> = std::fs::read_dir(c.dir.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "relay.json" && n != "filler" && n != "run")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The relay runs on; with space again the change goes through.
    assert_eq!(
        text(&c.call_tool(2, "ex__echo", json!({"message":"ok"}))?),
        "Echo: ok"
    );
    std::fs::remove_file(&filler)?;
    let r = c.call_tool(
        3,
        "relay__add_server",
        json!({"name":"more","config":example("more")}),
    )?;
    assert_eq!(r["result"]["isError"], Value::Null, "{r}");
    drop(c);
    Ok(())
}

/// The same proof on a read-only directory, for machines where the test cannot mount.
fn readonly_dir_keeps_the_old_file() -> Result {
    use std::os::unix::fs::PermissionsExt;
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let before = std::fs::read(&c.config)?;
    let dir = c.dir.path().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))?;
    let r = c.call_tool(
        1,
        "relay__add_server",
        json!({"name":"more","config":example("more")}),
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let r = r?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(std::fs::read(&c.config)?, before);
    assert_eq!(backups(&dir)?.len(), 0);
    Ok(())
}

#[test]
fn management_tools_can_be_turned_off() -> Result {
    let cfg = json!({"mcpServers": {"ex": example("ex")}, "relay": {"management": false}});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let tools = tool_names(&c.request(1, "tools/list", json!({}))?);
    assert!(!tools.iter().any(|t| t.starts_with("relay__")), "{tools:?}");
    let r = c.call_tool(2, "relay__status", json!({}))?;
    assert!(text(&r).contains("unknown tool"), "{r}");
    Ok(())
}

#[test]
fn http_front_offers_management_only_when_loopback_only() -> Result {
    // A loopback listener that also accepts another Host name (a proxy in front, a LAN
    // name) is no longer loopback-only: no management tools there.
    let dir = tempfile::tempdir()?;
    let cfg =
        json!({"mcpServers": {"ex": example("ex")}, "relay": {"allowedHosts": ["relay.example"]}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let mut s = HttpClient::new(&url)?;
    s.initialize()?;
    let list = s.call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}))?;
    let tools = tool_names(&list);
    assert!(tools.contains(&"ex__echo".to_owned()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.starts_with("relay__")), "{tools:?}");
    let r = s.call(&json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"relay__add_server","arguments":{"name":"x","config":example("x")}}}))?;
    assert!(text(&r).contains("unknown tool"), "{r}");
    assert!(
        read_json(&dir.path().join("relay.json"))?["mcpServers"]
            .get("x")
            .is_none()
    );
    Ok(())
}

#[test]
fn status_never_shows_secrets() -> Result {
    let cfg = json!({"mcpServers": {
        "ex": {"command": example_bin(), "args": ["--name", "ex", "--header", "Authorization: Bearer sk-argsecret", "--api-key", "k-argsecret"], "env": {"TOKEN": "envsecret"}},
        "down": {"type": "http", "url": "http://user:pwsecret@127.0.0.1:1/mcp?token=querysecret", "headers": {"Authorization": "Bearer headersecret"}},
    }});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    // Wait until the unreachable server has an error to show.
    let mut id = 10;
    let status = poll("an error for `down`", || {
        id += 1;
        let s = c.call_tool(id, "relay__status", json!({}))?;
        let down = s["result"]["structuredContent"]["servers"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "down").cloned())
            .unwrap_or_default();
        Ok(if down["lastError"].is_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        })
    })?;
    let listing = c.call_tool(1, "relay__list_servers", json!({}))?;
    for r in [&status, &listing] {
        let t = r.to_string();
        for secret in [
            "argsecret",
            "envsecret",
            "pwsecret",
            "querysecret",
            "headersecret",
        ] {
            assert!(!t.contains(secret), "{secret} shown: {t}");
        }
    }
    let t = listing.to_string();
    assert!(t.contains("TOKEN") && t.contains("Authorization"), "{t}");
    Ok(())
}

/// The CLI honours `configBackups` even when the file refers to variables its own shell
/// lacks (the relay's environment may differ), and restores a backup by the name
/// `config backups` prints when the config is a symlink.
#[test]
fn cli_backups_follow_the_file_not_the_shell() -> Result {
    let dir = tempfile::tempdir()?;
    let real = dir.path().join("real");
    std::fs::create_dir(&real)?;
    let cfg = json!({
        "mcpServers": {"a": {"command": "x", "env": {"TOKEN": "${MCP_RELAY_TEST_UNSET_VAR}"}, "disabled": true}},
        "relay": {"configBackups": 1}
    });
    let file = real.join("relay.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&cfg)?)?;
    let link = dir.path().join("relay.json");
    std::os::unix::fs::symlink(&file, &link)?;
    for n in ["b", "c", "d"] {
        let out = cli(
            dir.path(),
            &link,
            &["servers", "add", n, "--disabled", "--", "x"],
        )?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let kept = backups(&real)?;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let out = cli(dir.path(), &link, &["config", "restore", &kept[0]])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = read_json(&link)?;
    let names: Vec<&String> = restored["mcpServers"]
        .as_object()
        .ok_or("no servers")?
        .keys()
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{restored}");
    Ok(())
}
