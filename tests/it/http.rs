//! The Streamable HTTP front and HTTP backends, with a plain HTTP client.

use crate::support::{ACCEPT, HttpClient as Client, Result, example, example_http, serve};
use serde_json::{Value, json};

#[test]
fn http_front_to_http_backend_with_colliding_ids() -> Result {
    let dir = tempfile::tempdir()?;
    let (_backend, backend_url) = example_http("web")?;
    let cfg =
        json!({"mcpServers": {"web": {"type": "http", "url": backend_url}, "ex": example("ex")}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let mut a = Client::new(&url)?;
    let mut b = Client::new(&url)?;
    a.initialize()?;
    b.initialize()?;
    assert_ne!(a.session, b.session);
    // Both sessions use the same ids at the same time; each must get its own answers.
    let threads: Vec<_> = [("a", a), ("b", b)]
        .into_iter()
        .map(|(tag, c)| {
            std::thread::spawn(move || -> Result<()> {
                for i in 0..50 {
                    let server = if i % 2 == 0 { "web" } else { "ex" };
                    let msg = format!("{tag}-{i}");
                    let r = c.call(&json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":format!("{server}__echo"),"arguments":{"message":msg}}}))?;
                    assert_eq!(r["id"], i);
                    assert_eq!(r["result"]["content"][0]["text"], format!("Echo: {msg}"));
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "thread panicked")??;
    }
    Ok(())
}

#[test]
fn http_front_rejects_bad_requests_per_spec() -> Result {
    let dir = tempfile::tempdir()?;
    let cfg = json!({"mcpServers": {"ex": example("ex")}, "relay": {"maxMessageBytes": 2048}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let mut c = Client::new(&url)?;
    // No session yet.
    let r = c.post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string())?;
    assert_eq!(r.status(), 400);
    c.initialize()?;
    let r = c.post_raw("{oops")?;
    assert_eq!(r.status(), 400);
    assert_eq!(
        serde_json::from_str::<Value>(&r.text()?)?["error"]["code"],
        -32700
    );
    let r = c.post_raw(format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    ))?;
    assert_eq!(r.status(), 413);
    let r = c
        .http
        .post(&url)
        .header("accept", ACCEPT)
        .header("content-type", "application/json")
        .header("mcp-session-id", c.session.clone().unwrap_or_default())
        .header("mcp-protocol-version", "1999-01-01")
        .body(json!({"jsonrpc":"2.0","id":3,"method":"ping"}).to_string())
        .send()?;
    assert_eq!(r.status(), 400);
    let r = c
        .http
        .post(&url)
        .header("accept", ACCEPT)
        .header("origin", "http://evil.example")
        .body(json!({"jsonrpc":"2.0","id":4,"method":"ping"}).to_string())
        .send()?;
    assert_eq!(r.status(), 403);
    let r = c
        .http
        .post(&url)
        .header("accept", ACCEPT)
        .header("host", "evil.example")
        .body(json!({"jsonrpc":"2.0","id":4,"method":"ping"}).to_string())
        .send()?;
    assert_eq!(r.status(), 403);
    let unknown = c.call(
        &json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"ex__missing"}}),
    )?;
    assert_eq!(unknown["error"]["code"], -32602);
    // DELETE ends the session; the id is then unknown.
    let r = c
        .http
        .delete(&url)
        .header("mcp-session-id", c.session.clone().unwrap_or_default())
        .send()?;
    assert_eq!(r.status(), 200);
    let r = c.post_raw(json!({"jsonrpc":"2.0","id":6,"method":"ping"}).to_string())?;
    assert_eq!(r.status(), 404);
    Ok(())
}

#[test]
fn progress_streams_as_sse_on_the_request() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let mut c = Client::new(&url)?;
    c.initialize()?;
    let resp = c.post_raw(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ex__slow","arguments":{"steps":2,"ms":10},"_meta":{"progressToken":7}}}).to_string())?;
    assert!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let text = resp.text()?;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(events.len(), 3, "{text}");
    assert_eq!(events[0]["params"]["progressToken"], 7);
    assert_eq!(
        events[2]["result"]["content"][0]["text"],
        "done after 2 steps"
    );
    assert!(
        text.starts_with("id: ") && text.contains("retry: "),
        "priming event missing: {text}"
    );
    Ok(())
}

#[test]
fn http_backend_session_loss_is_healed() -> Result {
    // The backend restarts on the same port: its sessions are gone, so it answers 404 and the
    // relay must re-initialize transparently.
    let dir = tempfile::tempdir()?;
    let (first, backend_url) = example_http("web")?;
    let port = backend_url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/mcp")
        .to_owned();
    let (_relay, url) = serve(
        &json!({"mcpServers": {"web": {"type": "http", "url": backend_url}}}),
        dir.path(),
    )?;
    let mut c = Client::new(&url)?;
    c.initialize()?;
    let r = c.call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"web__echo","arguments":{"message":"one"}}}))?;
    assert_eq!(r["result"]["content"][0]["text"], "Echo: one");
    drop(first);
    let _second = {
        let mut child = std::process::Command::new(crate::support::example_bin())
            .args(["--name", "web", "--http", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().ok_or("stdout")?),
            &mut line,
        )?;
        crate::support::Proc { child }
    };
    let r = c.call(&json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"web__echo","arguments":{"message":"two"}}}))?;
    assert_eq!(r["result"]["content"][0]["text"], "Echo: two", "{r}");
    Ok(())
}

#[test]
fn a_session_cannot_reach_another_sessions_task() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let mut a = Client::new(&url)?;
    a.initialize()?;
    let mut b = Client::new(&url)?;
    b.initialize()?;
    let created = a.call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ex__echo","arguments":{"message":"a"},"task":{}}}))?;
    let id = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(id, "ex+task-1", "{created}");
    let mine =
        a.call(&json!({"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId": id}}))?;
    assert_eq!(mine["result"]["taskId"], id, "{mine}");
    // The other session, on the same shared backend, neither sees nor reaches it.
    let theirs =
        b.call(&json!({"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId": id}}))?;
    assert_eq!(theirs["error"]["code"], -32602, "{theirs}");
    let cancel =
        b.call(&json!({"jsonrpc":"2.0","id":3,"method":"tasks/cancel","params":{"taskId": id}}))?;
    assert_eq!(cancel["error"]["code"], -32602, "{cancel}");
    let list = b.call(&json!({"jsonrpc":"2.0","id":4,"method":"tasks/list","params":{}}))?;
    assert_eq!(list["result"]["tasks"], json!([]), "{list}");
    let list = a.call(&json!({"jsonrpc":"2.0","id":5,"method":"tasks/list","params":{}}))?;
    assert_eq!(list["result"]["tasks"][0]["taskId"], id, "{list}");
    Ok(())
}

#[test]
fn readiness_follows_required_servers() -> Result {
    let dir = tempfile::tempdir()?;
    let mut ok = example("ok");
    ok["required"] = json!(true);
    let cfg = json!({
        "mcpServers": {
            "ok": ok,
            "optional": {"command": "/nonexistent/server"},
            "broken": {"command": "/nonexistent/server", "required": true}
        },
        "relay": {"restartBackoffMs": 10, "startupWaitMs": 0}
    });
    let (_relay, url) = serve(&cfg, dir.path())?;
    let base = url.trim_end_matches("/mcp").to_owned();
    let http = reqwest::blocking::Client::new();
    let health = http.get(format!("{base}/healthz")).send()?;
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>()?["status"], "ok");
    let get = |http: &reqwest::blocking::Client| -> Result<(u16, Value)> {
        let r = http.get(format!("{base}/readyz")).send()?;
        Ok((r.status().as_u16(), r.json()?))
    };
    let (code, body) =
        crate::support::poll("readyz names only the required server that is down", || {
            let (code, body) = get(&http)?;
            let waiting = body["waitingFor"].as_array().cloned().unwrap_or_default();
            Ok(if waiting.len() == 1 && waiting[0]["server"] == "broken" {
                Ok((code, body))
            } else {
                Err(body.to_string())
            })
        })?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["ready"], false);
    // The broken server is dropped from the config: the relay becomes ready.
    let mut fixed = cfg.clone();
    if let Some(s) = fixed["mcpServers"].as_object_mut() {
        s.remove("broken");
    }
    crate::support::write_config(dir.path(), &fixed)?;
    crate::support::poll("readyz turns 200", || {
        let (code, body) = get(&http)?;
        Ok(if code == 200 && body["ready"] == true {
            Ok(())
        } else {
            Err(format!("{code} {body}"))
        })
    })?;
    Ok(())
}

/// `mcp-relay health`: initialize + tools/list against a running relay; 0 with a summary,
/// 1 with the reason (no relay there, or a token refused).
#[test]
fn health_command_checks_a_running_relay() -> Result {
    let dir = tempfile::tempdir()?;
    let cfg = json!({
        "mcpServers": {"ex": example("ex")},
        "auth": {"clients": [{"name": "probe", "token": "${PROBE_TOKEN}", "scopes": ["tools"]}]},
    });
    let relay = crate::support::serve_with(&cfg, dir.path(), &[("PROBE_TOKEN", "probe-secret-1")])?;
    let health = |url: &str, token: Option<&str>| -> Result<(bool, String)> {
        let mut cmd = std::process::Command::new(crate::support::relay_bin());
        cmd.args(["health", "--url", url, "--timeout-ms", "20000"]);
        cmd.env_remove("MCP_RELAY_TOKEN");
        if let Some(t) = token {
            cmd.env("MCP_RELAY_TOKEN", t);
        }
        let out = cmd.output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let (ok, said) = health(&relay.url, Some("probe-secret-1"))?;
    assert!(ok, "{said}");
    assert!(
        said.starts_with("ok: mcp-relay") && said.contains("13 tools"),
        "{said}"
    );
    let (ok, said) = health(&relay.url, Some("wrong"))?;
    assert!(
        !ok && said.contains("unhealthy") && said.contains("401"),
        "{said}"
    );
    assert!(
        !said.contains("wrong"),
        "the token is never printed: {said}"
    );
    // Nothing listens there.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (ok, said) = health(&format!("http://127.0.0.1:{free}/mcp"), None)?;
    assert!(!ok && said.starts_with("unhealthy"), "{said}");
    Ok(())
}
