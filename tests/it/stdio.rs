//! The stdio front: merged catalog, lossless forwarding, routing, reverse requests, bad input.

use crate::support::{Result, StdioClient, example, is_response, names, poll};
use serde_json::{Value, json};

fn two_examples() -> Value {
    json!({"mcpServers": {"ex": example("ex"), "other": example("other")}})
}

#[test]
fn merged_catalog_namespaces_and_routes() -> Result {
    let mut c = StdioClient::start(two_examples())?;
    let init = c.initialize(json!({}))?;
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(init["result"]["capabilities"]["tools"]["listChanged"], true);
    let tools = names(&c.request(1, "tools/list", json!({}))?, "tools");
    for n in ["ex__echo", "ex__add", "other__echo", "other__lossless"] {
        assert!(tools.contains(&n.to_owned()), "{n} missing from {tools:?}");
    }
    let r = c.call_tool(2, "other__echo", json!({"message":"hi"}))?;
    assert_eq!(r["result"]["content"][0]["text"], "Echo: hi");
    let p = c.request(
        3,
        "prompts/get",
        json!({"name":"ex__greet","arguments":{"name":"Ada"}}),
    )?;
    assert_eq!(p["result"]["messages"][0]["content"]["text"], "Hello, Ada!");
    let t = c.request(4, "resources/read", json!({"uri":"example://item/7"}))?;
    assert_eq!(
        t["result"]["contents"][0]["text"],
        "content of example://item/7"
    );
    let comp = c.request(5, "completion/complete", json!({"ref":{"type":"ref/prompt","name":"other__greet"},"argument":{"name":"name","value":"a"}}))?;
    assert_eq!(
        comp["result"]["completion"]["values"],
        json!(["alpha", "beta"])
    );
    assert_eq!(c.request(6, "ping", json!({}))?["result"], json!({}));
    Ok(())
}

#[test]
fn forwarding_is_lossless() -> Result {
    // The same call made directly to the backend and through the relay must match byte for byte.
    let mut direct = std::process::Command::new(crate::support::example_bin())
        .args(["--name", "ex"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut din = direct.stdin.take().ok_or("stdin")?;
    let dout = direct.stdout.take().ok_or("stdout")?;
    use std::io::{BufRead, Write};
    writeln!(
        din,
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"lossless","arguments":{{}}}}}}"#
    )?;
    writeln!(din, r#"{{"jsonrpc":"2.0","id":2,"method":"tools/list"}}"#)?;
    din.flush()?;
    let mut lines = std::io::BufReader::new(dout).lines();
    // The server may answer the two requests in either order.
    let first = lines.next().ok_or("no answer")??;
    let second = lines.next().ok_or("no answer")??;
    let (direct_call, direct_list) = if first.contains(r#""id":1"#) {
        (first, second)
    } else {
        (second, first)
    };
    drop(din);
    let _ = direct.kill();
    let _ = direct.wait();

    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let relayed_call = c.request_raw(
        1,
        "tools/call",
        json!({"name":"ex__lossless","arguments":{}}),
    )?;
    assert_eq!(
        relayed_call.replace("\"id\":1", ""),
        direct_call.replace("\"id\":1", "")
    );
    assert!(
        relayed_call.contains(r#""x-r":{"deep":[1,2,{"k":null}]}"#),
        "{relayed_call}"
    );
    // The listed tool keeps every field; only its name gains the prefix.
    let relayed_list: Value = serde_json::from_str(&c.request_raw(2, "tools/list", json!({}))?)?;
    let direct_list: Value = serde_json::from_str(&direct_list)?;
    let pick = |v: &Value, name: &str| {
        v["result"]["tools"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == name).cloned())
    };
    let mut want = pick(&direct_list, "lossless").ok_or("direct tool")?;
    want["name"] = json!("ex__lossless");
    assert_eq!(pick(&relayed_list, "ex__lossless"), Some(want));
    Ok(())
}

#[test]
fn progress_and_sampling_reach_the_right_client() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({"sampling":{}}))?;
    c.send(&json!({"jsonrpc":"2.0","id":"p1","method":"tools/call","params":{"name":"ex__slow","arguments":{"steps":3,"ms":10},"_meta":{"progressToken":"mine-1"}}}))?;
    let mut seen = Vec::new();
    c.recv_until(|l| is_response(l, &json!("p1")), &mut seen)?;
    let progress: Vec<Value> = seen
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{seen:?}");
    assert!(
        progress
            .iter()
            .all(|p| p["params"]["progressToken"] == "mine-1")
    );
    assert_eq!(progress[2]["params"]["progress"], 3);

    c.send(&json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"ex__sample","arguments":{"prompt":"2+2?"}}}))?;
    let mut skipped = Vec::new();
    let req = c.recv_until(|l| l.contains("sampling/createMessage"), &mut skipped)?;
    let req: Value = serde_json::from_str(&req)?;
    assert_eq!(req["params"]["messages"][0]["content"]["text"], "2+2?");
    c.send(&json!({"jsonrpc":"2.0","id":req["id"],"result":{"role":"assistant","content":{"type":"text","text":"four"},"model":"m"}}))?;
    let done: Value =
        serde_json::from_str(&c.recv_until(|l| is_response(l, &json!(9)), &mut skipped)?)?;
    assert_eq!(done["result"]["content"][0]["text"], "sampled: four");
    Ok(())
}

#[test]
fn sampling_without_client_capability_is_refused_clearly() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let r = c.call_tool(1, "ex__sample", json!({}))?;
    let text = r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.contains("did not declare the `sampling` capability"),
        "{r}"
    );
    Ok(())
}

#[test]
fn backends_hear_only_the_capabilities_the_client_has() -> Result {
    let mut c = StdioClient::start(two_examples())?;
    c.initialize(json!({"sampling":{}, "elicitation":{"form":{}}, "experimental":{"x":{}}}))?;
    for (id, tool) in [
        (1, "ex__client_capabilities"),
        (2, "other__client_capabilities"),
    ] {
        let r = c.call_tool(id, tool, json!({}))?;
        let text = r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        let declared: Value = serde_json::from_str(text)?;
        // No roots (the client has none); nothing the relay cannot route.
        assert_eq!(
            declared,
            json!({"sampling":{}, "elicitation":{"form":{}}}),
            "{r}"
        );
    }
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors_and_nothing_breaks() -> Result {
    let mut cfg = json!({"mcpServers": {"ex": example("ex"), "broken": {"command": "/nonexistent/mcp-server"}}});
    cfg["relay"] = json!({"maxMessageBytes": 16384, "requestTimeoutMs": 1500});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let mut skipped = Vec::new();
    c.send_raw("{not json")?;
    let e: Value = serde_json::from_str(&c.recv_until(|l| l.contains("\"error\""), &mut skipped)?)?;
    assert_eq!(e["error"]["code"], -32700);
    c.send_raw(&format!(r#"{{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{{"name":"ex__echo","arguments":{{"message":"{}"}}}}}}"#, "x".repeat(20_000)))?;
    let e: Value =
        serde_json::from_str(&c.recv_until(|l| l.contains("maxMessageBytes"), &mut skipped)?)?;
    assert_eq!(e["error"]["code"], -32003);
    let e = c.request(2, "tools/call", json!({"name":"nope__tool"}))?;
    assert_eq!(e["error"]["code"], -32602);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`nope__tool`")
    );
    let e = c.request(3, "tools/list", json!({"cursor":"forged"}))?;
    assert_eq!(e["error"]["code"], -32602);
    // The request timeout names the server and the limit.
    let e = c.call_tool(4, "ex__slow", json!({"steps":1,"ms":5000}))?;
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("server `ex`") && msg.contains("1500 ms"),
        "{e}"
    );
    assert_eq!(e["error"]["code"], -32002, "{e}");
    // ...and the backend was told, under its own id for the request.
    let seen = wait_for_cancellation(&mut c, 100, "ex__cancellations")?;
    assert_eq!(seen["reason"], "request timed out in the relay", "{seen}");
    // The broken server does not stop the healthy one.
    let r = c.call_tool(5, "ex__add", json!({"a":2,"b":3}))?;
    assert_eq!(r["result"]["content"][0]["text"], "5");
    Ok(())
}

/// Polls the example server's `cancellations` tool until it reports a cancellation of a
/// request it was still handling; returns that record.
fn wait_for_cancellation(c: &mut StdioClient, first_id: u64, tool: &str) -> Result<Value> {
    let mut id = first_id;
    poll("the backend sees the cancellation", || {
        id += 1;
        let r = c.call_tool(id, tool, json!({}))?;
        let text = r["result"]["content"][0]["text"].as_str().unwrap_or("[]");
        let list: Vec<Value> = serde_json::from_str(text)?;
        Ok(list
            .into_iter()
            .find(|c| c["inFlight"] == true)
            .ok_or_else(|| r.to_string()))
    })
}

#[test]
fn client_cancellation_reaches_the_backend_under_its_id() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    c.send(&json!({"jsonrpc":"2.0","id":"long","method":"tools/call","params":{"name":"ex__slow","arguments":{"steps":600,"ms":50},"_meta":{"progressToken":"t"}}}))?;
    let mut seen = Vec::new();
    // A first progress notification: the backend is working on it.
    c.recv_until(|l| l.contains("notifications/progress"), &mut seen)?;
    c.send(&json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"long","reason":"stop"}}))?;
    let r: Value =
        serde_json::from_str(&c.recv_until(|l| is_response(l, &json!("long")), &mut seen)?)?;
    assert_eq!(r["error"]["code"], -32800, "{r}");
    let hit = wait_for_cancellation(&mut c, 1, "ex__cancellations")?;
    assert_eq!(hit["reason"], "cancelled by the client", "{hit}");
    // The backend got the relay's id for the request, never the client's.
    assert!(hit["requestId"].is_u64(), "{hit}");
    Ok(())
}

#[test]
fn timeout_on_an_http_backend_names_it_and_cancels_there() -> Result {
    let (_backend, url) = crate::support::example_http("hx")?;
    let mut c = StdioClient::start(json!({
        "mcpServers": {"hx": {"type": "http", "url": url}},
        "relay": {"requestTimeoutMs": 800}
    }))?;
    c.initialize(json!({}))?;
    let e = c.call_tool(1, "hx__slow", json!({"steps":1,"ms":20000}))?;
    assert_eq!(e["error"]["code"], -32002, "{e}");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("server `hx`") && msg.contains("800 ms"), "{e}");
    let hit = wait_for_cancellation(&mut c, 10, "hx__cancellations")?;
    assert_eq!(hit["reason"], "request timed out in the relay", "{hit}");
    Ok(())
}

#[test]
fn task_ids_are_namespaced_per_server() -> Result {
    let mut c = StdioClient::start(two_examples())?;
    let init = c.initialize(json!({}))?;
    assert!(
        init["result"]["capabilities"]["tasks"].is_object(),
        "{init}"
    );
    // Both servers number their tasks `task-1`: the client must see two different ids.
    let a = c.request(
        1,
        "tools/call",
        json!({"name":"ex__echo","arguments":{"message":"from ex"},"task":{"ttl":60000}}),
    )?;
    let b = c.request(
        2,
        "tools/call",
        json!({"name":"other__echo","arguments":{"message":"from other"},"task":{"ttl":60000}}),
    )?;
    assert_eq!(a["result"]["task"]["taskId"], "ex+task-1", "{a}");
    assert_eq!(b["result"]["task"]["taskId"], "other+task-1", "{b}");
    // tasks/result reaches the right server, and its related-task meta is namespaced too.
    let ra = c.request(3, "tasks/result", json!({"taskId":"ex+task-1"}))?;
    assert_eq!(ra["result"]["content"][0]["text"], "Echo: from ex", "{ra}");
    assert_eq!(
        ra["result"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        "ex+task-1"
    );
    let rb = c.request(4, "tasks/result", json!({"taskId":"other+task-1"}))?;
    assert_eq!(
        rb["result"]["content"][0]["text"], "Echo: from other",
        "{rb}"
    );
    let g = c.request(5, "tasks/get", json!({"taskId":"other+task-1"}))?;
    assert_eq!(g["result"]["taskId"], "other+task-1", "{g}");
    assert_eq!(g["result"]["status"], "completed", "{g}");
    // tasks/list merges both servers, ids namespaced.
    let l = c.request(6, "tasks/list", json!({}))?;
    let mut ids: Vec<&str> = l["result"]["tasks"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["taskId"].as_str()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    assert_eq!(ids, ["ex+task-1", "other+task-1"], "{l}");
    // Ids the relay never handed out are refused, naming the id.
    for (id, bad) in [(7, "task-1"), (8, "nope+task-1"), (9, "ex+task-99")] {
        let e = c.request(id, "tasks/get", json!({"taskId": bad}))?;
        assert_eq!(e["error"]["code"], -32602, "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(bad),
            "{e}"
        );
    }
    Ok(())
}

#[test]
fn task_status_notifications_carry_namespaced_ids() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let r = c.request(
        1,
        "tools/call",
        json!({"name":"ex__slow","arguments":{"steps":2,"ms":20},"task":{}}),
    )?;
    assert_eq!(r["result"]["task"]["taskId"], "ex+task-1", "{r}");
    let mut skipped = Vec::new();
    let n: Value = serde_json::from_str(
        &c.recv_until(|l| l.contains("notifications/tasks/status"), &mut skipped)?,
    )?;
    assert_eq!(n["params"]["taskId"], "ex+task-1", "{n}");
    assert_eq!(n["params"]["status"], "completed", "{n}");
    assert_eq!(
        n["params"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"], "ex+task-1",
        "{n}"
    );
    Ok(())
}

#[test]
fn an_oversized_backend_answer_fails_its_request_at_once() -> Result {
    let mut cfg = json!({"mcpServers": {"ex": example("ex")}});
    // A timeout far beyond the test's own wait: only a prompt failure passes.
    cfg["relay"] = json!({"maxMessageBytes": 8192, "requestTimeoutMs": 120000});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let e = c.call_tool(1, "ex__echo", json!({"message":"xy","repeat":20000}))?;
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("server `ex`") && msg.contains("maxMessageBytes"),
        "{e}"
    );
    // The connection is intact: the next call works.
    let r = c.call_tool(2, "ex__echo", json!({"message":"ok"}))?;
    assert_eq!(r["result"]["content"][0]["text"], "Echo: ok", "{r}");
    Ok(())
}

#[test]
fn pagination_follows_relay_cursors() -> Result {
    let mut cfg = two_examples();
    cfg["relay"] = json!({"pageSize": 3});
    let mut c = StdioClient::start(cfg)?;
    c.initialize(json!({}))?;
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for i in 0..20 {
        let params = cursor.as_ref().map_or(json!({}), |c| json!({"cursor": c}));
        let page = c.request(100 + i, "tools/list", params)?;
        let n = names(&page, "tools");
        assert!(n.len() <= 3);
        all.extend(n);
        match page["result"]["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    // 13 tools on each example server and the 8 management tools, each exactly once.
    assert_eq!(all.len(), 34, "{all:?}");
    assert_eq!(all.iter().filter(|n| n.starts_with("relay__")).count(), 8);
    let unique: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "{all:?}");
    Ok(())
}

#[test]
fn list_changed_reaches_the_client_and_new_tool_works() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    c.request(1, "tools/list", json!({}))?;
    let added = c.call_tool(2, "ex__add_tool", json!({"name":"fresh"}))?;
    assert_eq!(
        added["result"]["content"][0]["text"], "added fresh",
        "{added}"
    );
    let mut skipped = Vec::new();
    c.recv_until(
        |l| l.contains("notifications/tools/list_changed"),
        &mut skipped,
    )?;
    // The list_changed seen may be an earlier one (the server's first listing can land after
    // its first call on a loaded machine): the new tool shows up soon after.
    let mut id = 100;
    poll("ex__fresh in tools/list", || {
        id += 1;
        let tools = names(&c.request(id, "tools/list", json!({}))?, "tools");
        Ok(if tools.contains(&"ex__fresh".to_owned()) {
            Ok(())
        } else {
            Err(format!("{tools:?}"))
        })
    })?;
    let r = c.request(4, "tools/call", json!({"name":"ex__fresh"}))?;
    assert_eq!(r["result"]["content"][0]["text"], "fresh ran");
    Ok(())
}

#[test]
fn crashed_backend_fails_its_call_and_restarts() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.initialize(json!({}))?;
    let e = c.request(1, "tools/call", json!({"name":"ex__crash"}))?;
    let msg = e["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("server `ex`") && msg.contains("exited"), "{e}");
    // The supervisor brings it back; poll (bounded) until a call succeeds.
    let mut ok = false;
    for i in 0..100 {
        let r = c.request(
            10 + i,
            "tools/call",
            json!({"name":"ex__echo","arguments":{"message":"back"}}),
        )?;
        if r["result"]["content"][0]["text"] == "Echo: back" {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "backend did not come back");
    Ok(())
}
