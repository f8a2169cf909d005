//! WebSocket backends: the example server in `--ws` mode (one JSON-RPC message per text
//! frame, subprotocol `mcp`) behind the relay, with the same supervision as the others.

use crate::support::{Proc, Result, StdioClient, example, example_listening, poll, text};
use serde_json::json;
use std::time::{Duration, Instant};

/// Starts the example server over WebSocket on `addr`; returns it and its port.
fn ws_server(addr: &str, extra: &[&str]) -> Result<(Proc, u16)> {
    let mut args = vec!["--name", "wsx", "--ws", addr];
    args.extend_from_slice(extra);
    example_listening(&args)
}

#[test]
fn a_websocket_server_is_relayed_and_reconnected_after_it_dies() -> Result {
    let (server, port) = ws_server("127.0.0.1:0", &[])?;
    let url = format!("ws://127.0.0.1:{port}/mcp");
    let mut c = StdioClient::start(json!({
        "mcpServers": {"wsx": {"url": url}, "ex": example("ex")},
        "relay": {"restartBackoffMs": 50, "restartBackoffMaxMs": 200, "startLimitBurst": 100}
    }))?;
    c.initialize(json!({}))?;
    let tools = crate::support::names(&c.request(1, "tools/list", json!({}))?, "tools");
    assert!(tools.contains(&"wsx__echo".to_owned()), "{tools:?}");
    let r = c.call_tool(2, "wsx__echo", json!({"message": "over ws"}))?;
    assert_eq!(text(&r), "Echo: over ws", "{r}");
    // Progress notifications come back over the socket to the right request.
    c.send(&json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"wsx__slow","arguments":{"steps":2,"ms":10},"_meta":{"progressToken":"p-ws"}}}))?;
    let (answers, others) = c.answers(1)?;
    assert_eq!(text(&answers[&3]), "done after 2 steps");
    assert_eq!(
        others.iter().filter(|l| l.contains("\"p-ws\"")).count(),
        2,
        "{others:?}"
    );
    assert_eq!(c.server_status(4, "wsx")?["transport"], "ws");

    // The server dies in the middle of a long call: the call fails within a second, naming
    // the server; the other server keeps answering.
    c.send(&json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"wsx__slow","arguments":{"steps":100,"ms":100}}}))?;
    std::thread::sleep(Duration::from_millis(300));
    drop(server);
    let died = Instant::now();
    let (answers, _) = c.answers(1)?;
    let failed = &answers[&5];
    assert!(
        died.elapsed() < Duration::from_secs(2),
        "took {:?}",
        died.elapsed()
    );
    let msg = failed["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("wsx"), "{failed}");
    let r = c.call_tool(6, "ex__echo", json!({"message": "still here"}))?;
    assert_eq!(text(&r), "Echo: still here");

    // Back on the same port: the relay reconnects and re-initializes; the session goes on.
    let (_server, _) = ws_server(&format!("127.0.0.1:{port}"), &[])?;
    let mut id = 100;
    poll("the WebSocket server is ready again", || {
        id += 1;
        let s = c.server_status(id, "wsx")?;
        Ok(if s["state"] == "ready" {
            Ok(())
        } else {
            Err(s.to_string())
        })
    })?;
    let r = c.call_tool(7, "wsx__echo", json!({"message": "again"}))?;
    assert_eq!(text(&r), "Echo: again", "{r}");
    assert!(c.server_status(8, "wsx")?["restarts"].as_u64() >= Some(1));
    Ok(())
}

#[test]
fn a_websocket_server_refusing_the_token_needs_auth() -> Result {
    let (_server, port) = ws_server("127.0.0.1:0", &["--require-token", "s3cret"])?;
    let url = format!("ws://127.0.0.1:{port}/mcp");
    let mut c = StdioClient::start(json!({
        "mcpServers": {
            "locked": {"type": "ws", "url": url},
            "open": {"type": "ws", "url": url, "headers": {"Authorization": "Bearer s3cret"}}
        },
        "relay": {"startupWaitMs": 0}
    }))?;
    c.initialize(json!({}))?;
    let mut id = 0;
    let s = poll("`locked` needs auth and `open` is ready", || {
        id += 2;
        let (l, o) = (
            c.server_status(id, "locked")?,
            c.server_status(id + 1, "open")?,
        );
        Ok(if l["state"] == "needs-auth" && o["state"] == "ready" {
            Ok(l)
        } else {
            Err(format!("{l} {o}"))
        })
    })?;
    assert!(
        s["lastError"].as_str().is_some_and(|e| e.contains("401")),
        "{s}"
    );
    let r = c.call_tool(1000, "open__add", json!({"a": 1, "b": 2}))?;
    assert_eq!(text(&r), "3");
    assert!(
        !c.call_tool(1001, "relay__list_servers", json!({}))?
            .to_string()
            .contains("s3cret")
    );
    Ok(())
}
