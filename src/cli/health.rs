//! `mcp-relay health`: an MCP-level health check of a running HTTP relay for deploy scripts
//! and service managers: `initialize`, `tools/list` (every page), then the session is
//! closed. Exit 0 with a one-line summary, or 1 with the reason.

use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Pages of `tools/list` followed at most.
const MAX_PAGES: usize = 1000;

/// Runs the check against `url` (the relay's `/mcp` endpoint); a bearer token, if the relay
/// needs one, comes from the environment variable `token_env` (never the command line).
pub fn run(url: &str, token_env: &str, timeout: Duration) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("unhealthy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = std::env::var(token_env).ok().filter(|t| !t.is_empty());
    let began = Instant::now();
    let checked = rt.block_on(async {
        tokio::time::timeout(timeout, check(url, token.as_deref()))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
    });
    match checked {
        Ok(summary) => {
            println!(
                "ok: {summary} at {url} in {} ms",
                began.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("unhealthy: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check(url: &str, token: Option<&str>) -> Result<String, String> {
    let http = reqwest::Client::builder()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": crate::protocol::LATEST_LEGACY,
        "capabilities": {},
        "clientInfo": {"name": "mcp-relay-health", "version": crate::version()},
    }});
    let (reply, sid) = post(&http, url, token, None, &init).await?;
    let result = answer(&reply, "initialize")?;
    let session = sid;
    let server = format!(
        "{} {}",
        result["serverInfo"]["name"].as_str().unwrap_or("?"),
        result["serverInfo"]["version"].as_str().unwrap_or("?")
    );
    let version = result["protocolVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(&http, url, token, session.as_deref(), &initialized).await?;
    let mut tools = 0usize;
    let mut cursor: Option<String> = None;
    for page in 0..MAX_PAGES {
        let params = cursor.as_ref().map_or(json!({}), |c| json!({"cursor": c}));
        let list =
            json!({"jsonrpc": "2.0", "id": 2 + page, "method": "tools/list", "params": params});
        let (reply, _) = post(&http, url, token, session.as_deref(), &list).await?;
        let result = answer(&reply, "tools/list")?;
        tools += result["tools"].as_array().map_or(0, Vec::len);
        match result["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    if let Some(sid) = &session {
        let mut del = http.delete(url).header("mcp-session-id", sid.as_str());
        if let Some(t) = token {
            del = del.bearer_auth(t);
        }
        let _ = del.send().await;
    }
    Ok(format!("{server} (protocol {version}), {tools} tools"))
}

/// One POST; returns the JSON-RPC messages of the answer (JSON or SSE) and the session id.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    session: Option<&str>,
    body: &Value,
) -> Result<(Vec<Value>, Option<String>), String> {
    let mut req = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(s) = session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", crate::protocol::LATEST_LEGACY);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the relay: {e}"))?;
    let status = resp.status();
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = resp
        .text()
        .await
        .map_err(|e| format!("the answer broke off: {e}"))?;
    if !status.is_success() {
        let why = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(200).collect());
        return Err(format!("HTTP {status}: {why}"));
    }
    let messages = if sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    } else if text.trim().is_empty() {
        Vec::new()
    } else {
        vec![serde_json::from_str(&text).map_err(|e| format!("the answer is not JSON: {e}"))?]
    };
    Ok((messages, sid))
}

/// The result of the response among `messages`, or its error.
fn answer(messages: &[Value], method: &str) -> Result<Value, String> {
    let reply = messages
        .iter()
        .rev()
        .find(|m| m.get("id").is_some() && m.get("method").is_none())
        .ok_or_else(|| format!("`{method}` got no answer"))?;
    if let Some(e) = reply.get("error") {
        return Err(format!(
            "`{method}` failed: {}",
            e["message"].as_str().unwrap_or("unknown error")
        ));
    }
    Ok(reply["result"].clone())
}
