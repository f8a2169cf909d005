//! The stateless era (2026-07-28) beside the handshake era on the same endpoint: requests
//! that carry their version in `_meta`, `server/discover`, `subscriptions/listen`.

use crate::support::{HttpClient, Result, StdioClient, TIMEOUT, example, poll, serve, text};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};

const VERSION: &str = "2026-07-28";

fn meta(caps: Value) -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": caps,
        "io.modelcontextprotocol/clientInfo": {"name": "it", "version": "1"},
    })
}

/// A stateless request: `_meta` added to `params`, the standard headers set from the body.
fn request(id: u64, method: &str, mut params: Value, caps: Value) -> Value {
    let mut m = meta(caps);
    if let Some(extra) = params.get("_meta").and_then(Value::as_object) {
        for (k, v) in extra {
            m[k] = v.clone();
        }
    }
    params["_meta"] = m;
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

struct Stateless {
    http: reqwest::blocking::Client,
    url: String,
}

impl Stateless {
    fn new(url: &str) -> Result<Stateless> {
        Ok(Stateless {
            http: reqwest::blocking::Client::builder()
                .timeout(TIMEOUT)
                .build()?,
            url: url.to_owned(),
        })
    }

    /// Posts `body` with the headers a conforming client sends (`fix` may change them).
    fn send(
        &self,
        body: &Value,
        fix: impl FnOnce(&mut reqwest::header::HeaderMap),
    ) -> Result<reqwest::blocking::Response> {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("accept", crate::support::ACCEPT.parse()?);
        h.insert("content-type", "application/json".parse()?);
        if let Some(m) = body["method"].as_str() {
            h.insert("mcp-method", m.parse()?);
        }
        if let Some(v) = body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"].as_str()
        {
            h.insert("mcp-protocol-version", v.parse()?);
        }
        let name = body["params"]["name"]
            .as_str()
            .or(body["params"]["uri"].as_str());
        if let Some(n) = name {
            h.insert(
                "mcp-name",
                mcp_relay::protocol::modern::encode_header_value(n).parse()?,
            );
        }
        fix(&mut h);
        Ok(self
            .http
            .post(&self.url)
            .headers(h)
            .body(body.to_string())
            .send()?)
    }

    /// Opens a listen stream for tools list changes (request id `id`); its lines.
    fn listen_tools(
        &self,
        id: u64,
    ) -> Result<std::io::Lines<BufReader<reqwest::blocking::Response>>> {
        let listen = request(
            id,
            "subscriptions/listen",
            json!({"notifications": {"toolsListChanged": true}}),
            json!({}),
        );
        let resp = self.send(&listen, |_| {})?;
        if resp.status() != 200 {
            return Err(format!("listen answered {}", resp.status()).into());
        }
        Ok(BufReader::new(resp).lines())
    }

    /// The HTTP status and every JSON-RPC message of the answer (JSON or an SSE stream).
    fn call(&self, body: &Value) -> Result<(u16, Vec<Value>)> {
        self.call_with(body, |_| {})
    }

    fn call_with(
        &self,
        body: &Value,
        fix: impl FnOnce(&mut reqwest::header::HeaderMap),
    ) -> Result<(u16, Vec<Value>)> {
        let resp = self.send(body, fix)?;
        let status = resp.status().as_u16();
        let sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = resp.text()?;
        let frames = if sse {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(serde_json::from_str)
                .collect::<std::result::Result<Vec<Value>, _>>()?
        } else {
            vec![serde_json::from_str(&text)?]
        };
        Ok((status, frames))
    }

    /// The answer alone (the last frame), with its status.
    fn answer(&self, body: &Value) -> Result<(u16, Value)> {
        let (status, mut frames) = self.call(body)?;
        Ok((status, frames.pop().ok_or("no answer")?))
    }
}

/// The next `data:` message of an SSE stream.
fn next_event(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Result<Value> {
    loop {
        let line = lines.next().ok_or("the stream ended")??;
        if let Some(d) = line.strip_prefix("data: ") {
            return Ok(serde_json::from_str(d)?);
        }
    }
}

#[test]
fn stateless_requests_and_sessions_share_the_endpoint() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let c = Stateless::new(&url)?;

    let (status, d) = c.answer(&request(1, "server/discover", json!({}), json!({})))?;
    assert_eq!(status, 200, "{d}");
    let r = &d["result"];
    assert_eq!(r["supportedVersions"], json!([VERSION]), "{d}");
    assert_eq!(r["resultType"], "complete");
    assert!(r["capabilities"]["tools"].is_object(), "{d}");
    assert_eq!(
        r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-relay"
    );

    // A session of the handshake era at the same time, unchanged.
    let mut legacy = HttpClient::new(&url)?;
    legacy.initialize()?;
    let listed = legacy.rpc(2, "tools/list", json!({}))?;
    assert!(listed["result"].get("resultType").is_none(), "{listed}");

    let (_, l) = c.answer(&request(3, "tools/list", json!({}), json!({})))?;
    let r = &l["result"];
    assert!(
        r["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "ex__echo")),
        "{l}"
    );
    assert_eq!(
        (&r["ttlMs"], &r["cacheScope"]),
        (&json!(0), &json!("private"))
    );
    assert_eq!(r["resultType"], "complete");

    let (status, e) = c.answer(&request(
        4,
        "tools/call",
        json!({"name": "ex__echo", "arguments": {"message": "hi"}}),
        json!({}),
    ))?;
    assert_eq!((status, text(&e)), (200, "Echo: hi"), "{e}");
    assert_eq!(e["result"]["resultType"], "complete");
    assert_eq!(e["id"], 4);

    // Progress comes on the request's own stream, then the answer.
    let (_, frames) = c.call(&request(
        5,
        "tools/call",
        json!({"name": "ex__slow", "arguments": {"steps": 2, "ms": 10}, "_meta": {"progressToken": "p"}}),
        json!({}),
    ))?;
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[0]["params"]["progressToken"], "p");
    assert_eq!(text(&frames[2]), "done after 2 steps");

    // Log messages only for a request that asks for them, at its level.
    let log = |id, level: Option<&str>| {
        let m = level.map_or(
            json!({}),
            |l| json!({"io.modelcontextprotocol/logLevel": l}),
        );
        c.call(&request(
            id,
            "tools/call",
            json!({"name": "ex__log", "arguments": {"text": "note"}, "_meta": m}),
            json!({}),
        ))
    };
    let quiet = |frames: &[Value]| {
        !frames
            .iter()
            .any(|f| f["method"] == "notifications/message")
    };
    let (_, frames) = log(6, None)?;
    assert!(
        quiet(&frames) && text(&frames[frames.len() - 1]) == "logged",
        "{frames:?}"
    );
    let (_, frames) = log(7, Some("error"))?;
    assert!(quiet(&frames), "{frames:?}");
    let (_, frames) = log(8, Some("debug"))?;
    assert!(!quiet(&frames), "{frames:?}");
    Ok(())
}

#[test]
fn stateless_requests_are_refused_clearly() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let c = Stateless::new(&url)?;
    let no_meta = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}});
    let (status, e) = c.answer(&no_meta)?;
    assert_eq!(
        (status, &e["error"]["code"], &e["id"]),
        (400, &json!(-32602), &json!(1)),
        "{e}"
    );

    let mut old = request(2, "tools/list", json!({}), json!({}));
    old["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let (status, e) = c.answer(&old)?;
    assert_eq!((status, &e["error"]["code"]), (400, &json!(-32022)), "{e}");
    assert_eq!(e["error"]["data"]["supported"], json!([VERSION]));
    assert_eq!(e["error"]["data"]["requested"], "2099-01-01");

    let call = request(
        3,
        "tools/call",
        json!({"name": "ex__echo", "arguments": {}}),
        json!({}),
    );
    let (status, frames) = c.call_with(&call, |h| {
        h.insert(
            "mcp-name",
            reqwest::header::HeaderValue::from_static("ex__add"),
        );
    })?;
    assert_eq!(
        (status, &frames[0]["error"]["code"]),
        (400, &json!(-32020)),
        "{frames:?}"
    );
    let (status, frames) = c.call_with(&call, |h| {
        h.remove("mcp-method");
    })?;
    assert_eq!(
        (status, &frames[0]["error"]["code"]),
        (400, &json!(-32020)),
        "{frames:?}"
    );
    // A name HTTP cannot carry as it is comes base64-wrapped.
    let accented = request(
        30,
        "tools/call",
        json!({"name": "ex__été", "arguments": {}}),
        json!({}),
    );
    let (status, frames) = c.call_with(&accented, |h| {
        h.insert(
            "mcp-name",
            reqwest::header::HeaderValue::from_static("=?base64?ZXhfX8OpdMOp?="),
        );
    })?;
    assert_ne!(frames[0]["error"]["code"], -32020, "{status} {frames:?}");
    let (status, frames) = c.call_with(&accented, |h| {
        h.insert(
            "mcp-name",
            reqwest::header::HeaderValue::from_static("=?base64?ZXhfX2V0ZQ==?="),
        );
    })?;
    assert_eq!(
        (status, &frames[0]["error"]["code"]),
        (400, &json!(-32020)),
        "{frames:?}"
    );
    // Whitespace around a header value is not part of it.
    let (status, frames) = c.call_with(&call, |h| {
        h.insert(
            "mcp-name",
            reqwest::header::HeaderValue::from_static(" ex__echo "),
        );
    })?;
    assert_eq!(status, 200, "{frames:?}");

    for (id, m) in [
        (4, "ping"),
        (5, "initialize"),
        (6, "logging/setLevel"),
        (7, "no/such"),
    ] {
        let (status, e) = c.answer(&request(id, m, json!({}), json!({})))?;
        assert_eq!(
            (status, &e["error"]["code"]),
            (404, &json!(-32601)),
            "{m}: {e}"
        );
    }

    // A task would outlive the request, and nothing would own it.
    let task = request(
        9,
        "tools/call",
        json!({"name": "ex__echo", "arguments": {"message": "t"}, "task": {"ttl": 60000}}),
        json!({}),
    );
    let (_, e) = c.answer(&task)?;
    assert_eq!(e["error"]["code"], -32602, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("task"),
        "{e}"
    );
    // A log level the era does not define is refused, not read as `debug`.
    let loud = request(
        10,
        "tools/list",
        json!({"_meta": {"io.modelcontextprotocol/logLevel": "loud"}}),
        json!({}),
    );
    let (status, e) = c.answer(&loud)?;
    assert_eq!((status, &e["error"]["code"]), (400, &json!(-32602)), "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("loud"),
        "{e}"
    );
    // A notification outside any session that names no version is the handshake era's.
    let stray = c.send(
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        |_| {},
    )?;
    assert_eq!(stray.status(), 400);

    // The server asks for sampling, which the request did not declare: -32021, naming it.
    let sample = request(
        8,
        "tools/call",
        json!({"name": "ex__sample", "arguments": {}}),
        json!({}),
    );
    let (status, e) = c.answer(&sample)?;
    assert_eq!((status, &e["error"]["code"]), (400, &json!(-32021)), "{e}");
    assert!(
        e["error"]["data"]["requiredCapabilities"]["sampling"].is_object(),
        "{e}"
    );
    Ok(())
}

#[test]
fn listen_streams_acknowledge_then_carry_tagged_changes() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let c = Stateless::new(&url)?;
    let mut lines = c.listen_tools(5)?;
    let mut next = || next_event(&mut lines);
    let ack = next()?;
    assert_eq!(
        ack["method"], "notifications/subscriptions/acknowledged",
        "{ack}"
    );
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true})
    );
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        5
    );
    let (_, added) = c.answer(&request(
        9,
        "tools/call",
        json!({"name": "ex__add_tool", "arguments": {"name": "fresh"}}),
        json!({}),
    ))?;
    assert_eq!(text(&added), "added fresh", "{added}");
    let change = next()?;
    assert_eq!(
        change["method"], "notifications/tools/list_changed",
        "{change}"
    );
    assert_eq!(
        change["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        5
    );
    let (_, l) = c.answer(&request(10, "tools/list", json!({}), json!({})))?;
    assert!(l.to_string().contains("ex__fresh"), "{l}");
    Ok(())
}

/// Listen streams count against `maxSessions` with the sessions, give their place up when
/// the client goes away, and refuse more resource subscriptions than one stream may hold.
#[test]
fn listen_streams_are_counted_and_bounded() -> Result {
    let dir = tempfile::tempdir()?;
    let cfg = json!({"mcpServers": {"ex": example("ex")}, "relay": {"maxSessions": 1}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let c = Stateless::new(&url)?;
    let many: Vec<String> = (0..65).map(|i| format!("example://item/{i}")).collect();
    let (_, e) = c.answer(&request(
        1,
        "subscriptions/listen",
        json!({"notifications": {"resourceSubscriptions": many}}),
        json!({}),
    ))?;
    assert_eq!(e["error"]["code"], -32602, "{e}");

    let listen = request(
        2,
        "subscriptions/listen",
        json!({"notifications": {"toolsListChanged": true}}),
        json!({}),
    );
    let mut lines = c.listen_tools(2)?;
    let ack = next_event(&mut lines)?;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    // The one place is taken: a session is refused, and so is a second stream.
    let mut h = HttpClient::new(&url)?;
    assert_eq!(h.open()?, 503);
    let second = c.send(&listen, |_| {})?;
    assert_eq!(second.status(), 503);
    // Plain stateless requests hold no place.
    let (status, _) = c.answer(&request(3, "tools/list", json!({}), json!({})))?;
    assert_eq!(status, 200);
    // The client goes away: its place is given back.
    drop(lines);
    poll("a session once the listen stream closed", || {
        let mut h = HttpClient::new(&url)?;
        Ok(match h.open()? {
            200 => Ok(()),
            s => Err(format!("initialize answered {s}")),
        })
    })?;
    Ok(())
}

/// Over stdio, `notifications/cancelled` ends a stateless request (the backend hears of it)
/// and a listen stream; an id still in use is refused.
#[test]
fn stdio_cancels_stateless_requests_and_streams() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    c.send(&request(
        7,
        "subscriptions/listen",
        json!({"notifications": {"toolsListChanged": true}}),
        json!({}),
    ))?;
    let mut skipped = Vec::new();
    let ack = c.recv_until(
        |l| l.contains("notifications/subscriptions/acknowledged"),
        &mut skipped,
    )?;
    assert!(ack.contains("subscriptionId\":7"), "{ack}");
    let dup = c.request(7, "tools/list", json!({"_meta": meta(json!({}))}))?;
    assert_eq!(dup["error"]["code"], -32600, "{dup}");
    c.send(
        &json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}}),
    )?;
    // The id is free again once the stream ended.
    let again = poll("id 7 free after the cancellation", || {
        let r = c.request(7, "tools/list", json!({"_meta": meta(json!({}))}))?;
        Ok(if r.get("result").is_some() {
            Ok(r)
        } else {
            Err(r.to_string())
        })
    })?;
    assert_eq!(again["result"]["resultType"], "complete", "{again}");

    // A long stateless call, cancelled: the backend receives the cancellation.
    c.send(&request(
        8,
        "tools/call",
        json!({"name": "ex__slow", "arguments": {"steps": 600, "ms": 100}, "_meta": {"progressToken": "p8"}}),
        json!({}),
    ))?;
    c.recv_until(|l| l.contains("notifications/progress"), &mut skipped)?;
    c.send(
        &json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 8}}),
    )?;
    let mut n = 100;
    poll("the backend to hear of the cancellation", || {
        n += 1;
        let r = c.request(
            n,
            "tools/call",
            json!({"name": "ex__cancellations", "arguments": {}, "_meta": meta(json!({}))}),
        )?;
        let seen = text(&r).to_owned();
        Ok(if seen.contains("requestId") {
            Ok(())
        } else {
            Err(seen)
        })
    })?;
    Ok(())
}

#[test]
fn stdio_serves_both_eras() -> Result {
    let mut c = StdioClient::start(json!({"mcpServers": {"ex": example("ex")}}))?;
    // A stateless request first: no initialize needed.
    let d = c.request(1, "server/discover", json!({"_meta": meta(json!({}))}))?;
    assert_eq!(d["result"]["supportedVersions"], json!([VERSION]), "{d}");
    let r = c.request(
        2,
        "tools/call",
        json!({"name": "ex__echo", "arguments": {"message": "s"}, "_meta": meta(json!({}))}),
    )?;
    assert_eq!(
        (text(&r), &r["result"]["resultType"]),
        ("Echo: s", &json!("complete")),
        "{r}"
    );
    let e = c.request(3, "ping", json!({"_meta": meta(json!({}))}))?;
    assert_eq!(e["error"]["code"], -32601, "{e}");
    // Then the handshake, on the same pipes.
    c.initialize(json!({}))?;
    let r = c.call_tool(4, "ex__echo", json!({"message": "l"}))?;
    assert_eq!(text(&r), "Echo: l");
    assert!(r["result"].get("resultType").is_none(), "{r}");
    Ok(())
}

/// `era: auto` against a server of the handshake era only (the example server answers a
/// request without a session with a plain 404): the relay falls back to `initialize`.
#[test]
fn era_auto_falls_back_to_the_handshake() -> Result {
    let dir = tempfile::tempdir()?;
    let (_web, web) = crate::support::example_http("web")?;
    let cfg = json!({"mcpServers": {"web": {"type": "http", "url": web, "era": "auto"}}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let mut c = HttpClient::new(&url)?;
    c.initialize()?;
    let r = c.call_tool(2, "web__echo", json!({"message": "old"}))?;
    assert_eq!(text(&r), "Echo: old", "{r}");
    let s = c.call_tool(3, "relay__status", json!({}))?;
    let web = s["result"]["structuredContent"]["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web").cloned())
        .ok_or("no web")?;
    assert_eq!(web["protocolVersion"], "2025-11-25", "{web}");
    assert_eq!(web["state"], "ready", "{web}");
    Ok(())
}
