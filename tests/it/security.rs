//! The HTTP front as a production service: bearer tokens and scopes, per-client server
//! visibility, rate limits with exact counts, session caps and idle expiry, TLS with a hot
//! certificate swap, health/readiness, and hostile input. Every token here contains
//! `s3cr3t`, which the log check of `scripts/test.sh` looks for in all relay logs.

use crate::support::{
    ACCEPT, HttpClient, INITIALIZE, Result, Served, TIMEOUT, example, poll, serve_with,
};
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const ALICE: &str = "alice-s3cr3t-token-0001";
const OPS: &str = "ops-s3cr3t-token-000002";
const PROM: &str = "prom-s3cr3t-token-00003";
const FILED: &str = "filed-s3cr3t-token-0004";
const HASHED: &str = "hashed-s3cr3t-token-005";

fn http() -> Result<Client> {
    Ok(Client::builder().timeout(TIMEOUT).build()?)
}

fn auth_config(dir: &std::path::Path) -> Result<Value> {
    let token_file = dir.join("filed.token");
    std::fs::write(&token_file, format!("{FILED}\n"))?;
    let hash = {
        use sha2::Digest as _;
        format!("{:x}", sha2::Sha256::digest(HASHED.as_bytes()))
    };
    Ok(json!({
        "mcpServers": {"a": example("a"), "b": example("b")},
        "auth": {"clients": [
            {"name": "alice", "token": "${ALICE_TOKEN}", "scopes": ["tools"], "servers": ["a"]},
            {"name": "ops", "token": "${OPS_TOKEN}", "scopes": ["admin"]},
            {"name": "prom", "token": "${PROM_TOKEN}", "scopes": ["metrics"]},
            {"name": "filed", "tokenFile": token_file, "scopes": ["tools", "admin"]},
            {"name": "hashed", "tokenSha256": hash, "scopes": ["tools"], "servers": ["b*"]}
        ]}
    }))
}

/// The relay with `cfg` and the tokens of [`auth_config`] in its environment.
fn start_auth(cfg: &Value, dir: &std::path::Path) -> Result<Served> {
    serve_with(
        cfg,
        dir,
        &[
            ("ALICE_TOKEN", ALICE),
            ("OPS_TOKEN", OPS),
            ("PROM_TOKEN", PROM),
        ],
    )
}

#[test]
fn tokens_scopes_and_server_visibility() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = start_auth(&auth_config(dir.path())?, dir.path())?;
    let http = http()?;

    // No token, a wrong token: 401 with a Bearer challenge.
    let r = HttpClient::with(&http, &relay.url, None).post_raw(INITIALIZE)?;
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str()?.to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let r = HttpClient::with(&http, &relay.url, Some("alice-s3cr3t-token-0002"))
        .post_raw(INITIALIZE)?;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()?
            .contains("invalid_token")
    );
    // A token for metrics only may not use the MCP endpoint.
    assert_eq!(
        HttpClient::with(&http, &relay.url, Some(PROM))
            .post_raw(INITIALIZE)?
            .status(),
        403
    );

    // alice (tools, servers a): a's tools only; b's are unknown; no management tools; the
    // instructions of b are not in her initialize answer.
    let init: Value = HttpClient::with(&http, &relay.url, Some(ALICE))
        .post_raw(INITIALIZE)?
        .json()?;
    let instructions = init["result"]["instructions"].as_str().unwrap_or_default();
    assert!(instructions.contains("a is the example server"), "{init}");
    assert!(!instructions.contains("b is the example server"), "{init}");
    let mut alice = HttpClient::with(&http, &relay.url, Some(ALICE));
    assert_eq!(alice.open()?, 200);
    let tools = alice.tool_names()?;
    assert!(tools.iter().any(|t| t == "a__echo"), "{tools:?}");
    assert!(tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    let r = alice.call_tool(1, "a__echo", json!({"message": "hi"}))?;
    assert_eq!(crate::support::text(&r), "Echo: hi", "{r}");
    let r = alice.call_tool(2, "b__echo", json!({"message": "hi"}))?;
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown tool `b__echo`")),
        "{r}"
    );
    let r = alice.call_tool(3, "relay__status", json!({}))?;
    assert_eq!(r["error"]["code"], -32004, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`admin` scope")),
        "{r}"
    );
    // Prompts and resources of b are hidden too.
    let prompts = alice.rpc(4, "prompts/list", json!({}))?;
    let names = crate::support::names(&prompts, "prompts");
    assert!(
        !names.is_empty() && names.iter().all(|p| p.starts_with("a__")),
        "{prompts}"
    );

    // ops (admin only): the management tools, no server tools, calls to them refused.
    let mut ops = HttpClient::with(&http, &relay.url, Some(OPS));
    assert_eq!(ops.open()?, 200);
    let tools = ops.tool_names()?;
    assert!(tools.iter().any(|t| t == "relay__status"), "{tools:?}");
    assert!(tools.iter().all(|t| t.starts_with("relay__")), "{tools:?}");
    let r = ops.call_tool(5, "a__echo", json!({"message": "x"}))?;
    assert_eq!(r["error"]["code"], -32004, "{r}");
    let r = ops.call_tool(6, "relay__status", json!({}))?;
    assert!(r["result"]["content"][0]["text"].is_string(), "{r}");

    // A session belongs to the client that opened it.
    let mut stolen = HttpClient::with(&http, &relay.url, Some(OPS));
    stolen.session = alice.session.clone();
    assert_eq!(
        stolen
            .post_raw(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#)?
            .status(),
        404
    );

    // Tokens from a file and from a SHA-256 digest.
    let mut filed = HttpClient::with(&http, &relay.url, Some(FILED));
    assert_eq!(filed.open()?, 200);
    let tools = filed.tool_names()?;
    assert!(tools.iter().any(|t| t == "b__echo") && tools.iter().any(|t| t == "relay__status"));
    let mut hashed = HttpClient::with(&http, &relay.url, Some(HASHED));
    assert_eq!(hashed.open()?, 200);
    let tools = hashed.tool_names()?;
    assert!(
        !tools.is_empty() && tools.iter().all(|t| t.starts_with("b__")),
        "{tools:?}"
    );

    // Metrics: a token with `metrics` (or `admin`); health detail with any token.
    let base = relay.base();
    assert_eq!(http.get(format!("{base}/metrics")).send()?.status(), 401);
    assert_eq!(
        http.get(format!("{base}/metrics"))
            .bearer_auth(ALICE)
            .send()?
            .status(),
        403
    );
    let m = http
        .get(format!("{base}/metrics"))
        .bearer_auth(PROM)
        .send()?;
    assert_eq!(m.status(), 200);
    let text = m.text()?;
    assert!(
        text.contains(r#"mcp_relay_auth_failures_total{reason="missing"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mcp_relay_auth_failures_total{reason="invalid"} 1"#),
        "{text}"
    );
    let open: Value = http.get(format!("{base}/health")).send()?.json()?;
    assert_eq!(open["status"], "healthy", "{open}");
    assert!(
        open.get("servers").is_none(),
        "no detail without a token: {open}"
    );
    let plain: Value = http
        .get(format!("{base}/api/health"))
        .bearer_auth(ALICE)
        .send()?
        .json()?;
    assert!(
        plain.get("servers").is_none(),
        "alice lacks metrics/admin: {plain}"
    );
    let detail: Value = http
        .get(format!("{base}/api/health"))
        .bearer_auth(PROM)
        .send()?
        .json()?;
    assert_eq!(detail["servers"]["a"]["status"], "ready", "{detail}");
    assert!(
        detail["uptime_s"].is_u64() && detail["version"].is_string(),
        "{detail}"
    );

    // Failures are logged with the peer address and reason, never a token.
    let log = relay.log_text();
    assert!(
        log.contains("Authentication failed") && log.contains("127.0.0.1"),
        "{log}"
    );
    assert!(!log.contains("s3cr3t"), "a token reached the log:\n{log}");
    Ok(())
}

#[test]
fn rate_limits_count_exactly_per_client() -> Result {
    let dir = tempfile::tempdir()?;
    let mut cfg = auth_config(dir.path())?;
    // One request a minute refills: within the test only the bursts count.
    cfg["relay"] = json!({"rateLimit": {"requestsPerMinute": 1, "burst": 3}});
    cfg["auth"]["clients"][0]["rateLimit"] = json!({"requestsPerMinute": 1, "burst": 5});
    let relay = start_auth(&cfg, dir.path())?;
    let http = http()?;
    let count = |token: &str, n: usize| -> Result<(usize, Vec<u64>)> {
        let s = HttpClient::with(&http, &relay.url, Some(token));
        let mut passed = 0;
        let mut waits = Vec::new();
        for _ in 0..n {
            let r = s.post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)?;
            if r.status() == 429 {
                waits.push(r.headers()["retry-after"].to_str()?.parse()?);
                let body: Value = r.json()?;
                assert_eq!(body["error"]["code"], -32005, "{body}");
            } else {
                passed += 1;
            }
        }
        Ok((passed, waits))
    };
    let (alice_ok, waits) = count(ALICE, 8)?;
    assert_eq!(alice_ok, 5, "alice: her own burst");
    assert_eq!(waits.len(), 3);
    assert!(waits.iter().all(|w| (1..=60).contains(w)), "{waits:?}");
    let (ops_ok, _) = count(OPS, 6)?;
    assert_eq!(ops_ok, 3, "ops: the relay's default burst");
    // A batch takes one token per message: `filed` (default burst 3) sends 4, then 2.
    let filed = HttpClient::with(&http, &relay.url, Some(FILED));
    let batch = |n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
            .collect();
        Value::Array(items).to_string()
    };
    assert_eq!(
        filed.post_raw(batch(4))?.status(),
        429,
        "4 messages, 3 tokens"
    );
    assert_ne!(
        filed.post_raw(batch(2))?.status(),
        429,
        "2 messages from the 3 tokens"
    );
    assert_eq!(
        filed
            .post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)?
            .status(),
        429,
        "the batches used the bucket up"
    );
    let m = http
        .get(format!("{}/metrics", relay.base()))
        .bearer_auth(PROM)
        .send()?
        .text()?;
    assert!(
        m.contains(r#"mcp_relay_rate_limited_total{client="alice"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"mcp_relay_rate_limited_total{client="ops"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"mcp_relay_rate_limited_total{client="filed"} 2"#),
        "{m}"
    );
    Ok(())
}

#[test]
fn session_caps_and_idle_expiry() -> Result {
    let dir = tempfile::tempdir()?;
    let mut cfg = auth_config(dir.path())?;
    cfg["relay"] = json!({"maxSessions": 3, "sessionIdleTimeoutMs": 1500});
    cfg["auth"]["clients"][0]["maxSessions"] = json!(2);
    let relay = start_auth(&cfg, dir.path())?;
    let http = http()?;
    let mut a1 = HttpClient::with(&http, &relay.url, Some(ALICE));
    let mut a2 = HttpClient::with(&http, &relay.url, Some(ALICE));
    let mut a3 = HttpClient::with(&http, &relay.url, Some(ALICE));
    assert_eq!(a1.open()?, 200);
    assert_eq!(a2.open()?, 200);
    assert_eq!(a3.open()?, 429, "alice's own cap of 2");
    let mut o1 = HttpClient::with(&http, &relay.url, Some(OPS));
    let mut o2 = HttpClient::with(&http, &relay.url, Some(OPS));
    assert_eq!(o1.open()?, 200);
    assert_eq!(o2.open()?, 503, "the global cap of 3");
    // a2 and o1 keep working; a1 falls silent and is closed after the idle timeout (any
    // request of its own would count as activity, so the session count is watched).
    let began = Instant::now();
    poll("the silent session expires", || {
        let alive = a2.rpc(1, "ping", json!({}))?;
        assert!(alive.get("result").is_some(), "{alive}");
        let _ = o1.rpc(1, "ping", json!({}))?;
        let health: Value = http
            .get(format!("{}/health", relay.base()))
            .bearer_auth(OPS)
            .send()?
            .json()?;
        Ok(if health["sessions"] == 2 {
            Ok(())
        } else {
            Err(health.to_string())
        })
    })?;
    assert!(
        began.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        began.elapsed()
    );
    let status = a1
        .post_raw(r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#)?
        .status();
    assert_eq!(status, 404, "the expired session is gone");
    assert_eq!(a3.open()?, 200, "room again for alice");
    Ok(())
}

/// A CA and a certificate it signed for localhost and 127.0.0.1, as PEM (ca, cert, key).
fn certificate(name: &str) -> Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// Replaces a file the way deploy tools do (write beside, rename over).
fn replace(path: &std::path::Path, text: &str) -> Result {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn trusting(ca: &str) -> Result<Client> {
    Ok(Client::builder()
        .timeout(TIMEOUT)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .pool_max_idle_per_host(0)
        .build()?)
}

#[test]
fn tls_serves_https_and_swaps_certificates_without_restart() -> Result {
    let dir = tempfile::tempdir()?;
    let (ca1, cert1, key1) = certificate("first")?;
    let (ca2, cert2, key2) = certificate("second")?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert1)?;
    std::fs::write(&key, &key1)?;
    let cfg = json!({
        "mcpServers": {"a": example("a")},
        "relay": {"tls": {"cert": cert, "key": key}}
    });
    let relay = serve_with(&cfg, dir.path(), &[])?;
    assert!(relay.url.starts_with("https://127.0.0.1:"), "{}", relay.url);
    let base = relay.base();
    let first = trusting(&ca1)?;
    let second = trusting(&ca2)?;
    assert_eq!(first.get(format!("{base}/healthz")).send()?.status(), 200);
    assert!(
        second.get(format!("{base}/healthz")).send().is_err(),
        "not yet the second certificate"
    );
    // MCP over HTTPS.
    let mut s = HttpClient::with(&first, &relay.url, None);
    assert_eq!(s.open()?, 200);
    assert!(s.tool_names()?.iter().any(|t| t == "a__echo"));
    // Plain HTTP on the TLS port is not served.
    assert!(
        http()?
            .get(format!("{}/healthz", base.replace("https", "http")))
            .send()
            .is_err_or_not_ok()
    );

    // Key first, then certificate (a half-done swap must not break serving).
    replace(&key, &key2)?;
    replace(&cert, &cert2)?;
    poll("the new certificate is served", || {
        Ok(match second.get(format!("{base}/healthz")).send() {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        })
    })?;
    // (A fresh client: a cached TLS session may still resume with the old handshake.)
    assert!(
        trusting(&ca1)?
            .get(format!("{base}/healthz"))
            .send()
            .is_err(),
        "the old certificate is gone"
    );
    // The session opened before the swap goes on over a new connection.
    let mut s2 = HttpClient::with(&second, &relay.url, None);
    s2.session = s.session.clone();
    let r = s2.call_tool(1, "a__echo", json!({"message": "after"}))?;
    assert_eq!(crate::support::text(&r), "Echo: after", "{r}");
    assert!(relay.log_text().contains("TLS certificate reloaded"));
    Ok(())
}

trait NotOk {
    fn is_err_or_not_ok(&self) -> bool;
}

impl NotOk for reqwest::Result<Response> {
    fn is_err_or_not_ok(&self) -> bool {
        self.as_ref().map_or(true, |r| !r.status().is_success())
    }
}

#[test]
fn non_loopback_without_auth_is_refused() -> Result {
    let dir = tempfile::tempdir()?;
    let path = crate::support::write_config(dir.path(), &json!({"mcpServers": {}}))?;
    // Refused before binding: nothing listens on the wildcard address.
    let out = std::process::Command::new(crate::support::relay_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--config"])
        .arg(&path)
        .env(
            "MCP_RELAY_RUNTIME_DIR",
            crate::support::runtime_dir(dir.path()),
        )
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve 0.0.0.0:0 without authentication"),
        "{err}"
    );
    assert!(err.contains("--allow-unauthenticated"), "{err}");
    Ok(())
}

#[test]
fn ready_flips_while_a_required_server_is_down() -> Result {
    let dir = tempfile::tempdir()?;
    let mut a = example("a");
    a["required"] = json!(true);
    let cfg = json!({
        "mcpServers": {"a": a, "b": example("b")},
        "relay": {"restartBackoffMs": 1500, "restartBackoffMaxMs": 1500}
    });
    let relay = serve_with(&cfg, dir.path(), &[])?;
    let http = http()?;
    let base = relay.base();
    // Waits until /ready answers `want`; returns its body.
    let ready_is = |what: &str, want: u16| {
        poll(what, || {
            let r = http.get(format!("{base}/ready")).send()?;
            let code = r.status().as_u16();
            let body: Value = r.json()?;
            Ok(if code == want {
                Ok(body)
            } else {
                Err(body.to_string())
            })
        })
    };
    ready_is("ready at first", 200)?;
    let mut s = HttpClient::with(&http, &relay.url, None);
    assert_eq!(s.open()?, 200);
    let _ = s.call_tool(1, "a__crash", json!({}))?;
    let body = ready_is("not ready while a restarts", 503)?;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["waitingFor"][0]["server"], "a", "{body}");
    let health = http.get(format!("{base}/health")).send()?;
    assert_eq!(health.status(), 200, "liveness stays 200");
    assert_eq!(health.json::<Value>()?["status"], "unhealthy");
    ready_is("ready again after the restart", 200)?;

    Ok(())
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

#[test]
fn hostile_input_is_refused_and_the_relay_keeps_serving() -> Result {
    let dir = tempfile::tempdir()?;
    let cfg = json!({
        "mcpServers": {"a": example("a")},
        "relay": {"maxMessageBytes": 65536, "maxHeaderBytes": 16384, "headerTimeoutMs": 1000,
                  "maxSessions": 300}
    });
    let relay = serve_with(&cfg, dir.path(), &[])?;
    // No pooled connections: the 1 s header timeout also closes idle keep-alive
    // connections, and a request racing that close would fail for the wrong reason.
    let http = Client::builder()
        .timeout(TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()?;
    let mut good = HttpClient::with(&http, &relay.url, None);
    assert_eq!(good.open()?, 200);
    let alive = |good: &HttpClient| -> Result {
        let r = good.call_tool(1, "a__echo", json!({"message": "ok"}))?;
        assert_eq!(crate::support::text(&r), "Echo: ok", "{r}");
        Ok(())
    };

    // Oversized body.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "a".repeat(1 << 20)
    );
    // 413, or the connection closed while the client was still sending the rest.
    if let Ok(r) = good.post_raw(&big) {
        assert_eq!(r.status(), 413);
    }
    // Oversized headers.
    let r = http
        .post(&relay.url)
        .header("x-padding", "p".repeat(64 * 1024))
        .body("{}")
        .send();
    assert!(r.as_ref().map_or(true, |r| r.status() == 431), "{r:?}");

    // Invalid JSON in every position, non-UTF-8, deep nesting: each answered with an error.
    let mut bad: Vec<Vec<u8>> = [
        "",
        "{",
        "[",
        "}",
        "null",
        "\"text\"",
        "42",
        "[]",
        "[1,2]",
        r#"{"jsonrpc":"2.0","id":1,"method":}"#,
        r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
        r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"x"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"} trailing"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":1,}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    bad.push(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xff\xfeing\"}".to_vec());
    bad.push(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a__echo","arguments":{}{}}}}}"#, "[".repeat(50_000), "]".repeat(50_000)).into_bytes());
    bad.push("[".repeat(60_000).into_bytes());
    for body in &bad {
        let r = http
            .post(&good.url)
            .header("accept", ACCEPT)
            .header("content-type", "application/json")
            .header("mcp-session-id", good.session.clone().unwrap_or_default())
            .body(body.clone())
            .send()?;
        let status = r.status().as_u16();
        let text = r.text()?;
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert!(
            (400..500).contains(&status) || text.contains("\"error\""),
            "{shown}: {status} {text}"
        );
        assert!(!text.contains("\"result\""), "{shown}: {text}");
    }
    alive(&good)?;

    // Slow headers: the connection is cut after headerTimeoutMs while others are served.
    let addr = relay.base().trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr)?;
    slow.set_read_timeout(Some(TIMEOUT))?;
    slow.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")?;
    let began = Instant::now();
    alive(&good)?;
    let mut buf = Vec::new();
    // Trickle a header byte now and then; the server must still close the connection.
    let cut = loop {
        if slow.write_all(b"X").is_err() {
            break true;
        }
        slow.set_read_timeout(Some(Duration::from_millis(300)))?;
        match slow.read_to_end(&mut buf) {
            Ok(_) => break true,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
        if began.elapsed() > TIMEOUT {
            break false;
        }
    };
    assert!(
        cut,
        "a slow-header connection was held for {:?}",
        began.elapsed()
    );
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );

    // Many sessions: the cap holds, memory stays bounded, others are still served.
    let pid = relay.proc.child.id();
    let before = rss_kib(pid)?;
    let mut refused = 0;
    for _ in 0..400 {
        match HttpClient::with(&http, &relay.url, None)
            .post_raw(INITIALIZE)?
            .status()
            .as_u16()
        {
            200 => {}
            503 => refused += 1,
            s => return Err(format!("initialize answered {s}").into()),
        }
    }
    let after = rss_kib(pid)?;
    assert_eq!(refused, 101, "300 sessions at most (one was open already)");
    eprintln!("RSS with 300 sessions: {before} KiB -> {after} KiB");
    assert!(after < before + 64 * 1024, "{before} -> {after} KiB");
    alive(&good)?;
    Ok(())
}

#[test]
fn https_backends_are_verified_with_a_configured_ca() -> Result {
    // One relay serves HTTPS (its own TLS front) in front of the example server; a second
    // relay uses it as a Streamable HTTP server, once trusting its CA and once not.
    let (front_dir, dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (ca, cert, key) = certificate("backend")?;
    let (cert_path, key_path) = (
        front_dir.path().join("c.pem"),
        front_dir.path().join("k.pem"),
    );
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    let front = serve_with(
        &json!({"mcpServers": {"ex": example("ex")},
                "relay": {"tls": {"cert": cert_path, "key": key_path}}}),
        front_dir.path(),
        &[],
    )?;
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca)?;
    let relay = serve_with(
        &json!({
            "mcpServers": {
                "untrusted": {"type": "http", "url": front.url},
                "trusted": {"type": "http", "url": front.url, "caFile": ca_path}
            },
            "relay": {"restartBackoffMs": 200, "startupWaitMs": 0}
        }),
        dir.path(),
        &[],
    )?;
    let http = http()?;
    let mut s = HttpClient::with(&http, &relay.url, None);
    assert_eq!(s.open()?, 200);
    let tools = poll("the trusted server's tools", || {
        let tools = s.tool_names()?;
        Ok(if tools.iter().any(|t| t == "trusted__ex__echo") {
            Ok(tools)
        } else {
            Err(format!("{tools:?}"))
        })
    })?;
    assert!(
        !tools.iter().any(|t| t.starts_with("untrusted__")),
        "{tools:?}"
    );
    let r = s.call_tool(1, "trusted__ex__echo", json!({"message": "over tls"}))?;
    assert_eq!(crate::support::text(&r), "Echo: over tls", "{r}");
    let health: Value = http
        .get(format!("{}/health", relay.base()))
        .send()?
        .json()?;
    let untrusted = &health["servers"]["untrusted"];
    assert_ne!(untrusted["status"], "ready", "{health}");
    let err = untrusted["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{health}"
    );
    Ok(())
}
