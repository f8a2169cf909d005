//! Test support: run the real `mcp-relay` binary with a config, talk to it as a client.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Generous: CI machines are small and shared.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcp-relay"))
}

pub fn example_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcp-example-server"))
}

/// A stdio backend entry running the example server.
pub fn example(name: &str) -> Value {
    json!({"command": example_bin(), "args": ["--name", name]})
}

/// Calls `check` every 20 ms until it yields `Ok(value)`, for at most [`TIMEOUT`]; while
/// not yet, it yields `Err(what it saw)`, which the timeout error shows. Errors of its own
/// (`?` inside) end the wait at once.
pub fn poll<T>(
    what: &str,
    mut check: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match check()? {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > deadline => {
                return Err(format!("{what}: not within {TIMEOUT:?}; last seen: {last}").into());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// [`poll`] for async checks: `check` answers `Ok(v)` when done, `Err(last seen)` to go on.
pub async fn poll_async<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<std::result::Result<T, String>, String>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match check().await? {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > deadline => {
                return Err(format!("{what}: not within {TIMEOUT:?}; last seen: {last}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Names of the items of a list result (`tools`, `prompts`, ...).
pub fn names(list: &Value, field: &str) -> Vec<String> {
    list["result"][field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes a config file into `dir`. Unless the test sets it, `startupWaitMs` is raised to
/// [`TIMEOUT`]: on a loaded CI machine a backend may need more than the default 5 s to come
/// up, and a test's first request must then wait for it rather than see an empty catalog.
pub fn write_config(dir: &Path, cfg: &Value) -> Result<PathBuf> {
    let mut cfg = cfg.clone();
    if let Some(root) = cfg.as_object_mut() {
        let relay = root.entry("relay").or_insert_with(|| json!({}));
        if let Some(r) = relay.as_object_mut() {
            r.entry("startupWaitMs")
                .or_insert_with(|| json!(TIMEOUT.as_millis()));
        }
    }
    let path = dir.join("relay.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(path)
}

/// Kills the whole process group on drop.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // The relay's children live in their own groups; SIGTERM lets it stop them.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw newline-JSON client of `mcp-relay stdio`.
pub struct StdioClient {
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub proc: Proc,
    /// The config file the relay runs from.
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
}

/// The control-socket directory of relays started by these helpers in `dir` (private to
/// the test, so `mcp-relay status` and friends find exactly that relay).
pub fn runtime_dir(dir: &Path) -> PathBuf {
    dir.join("run")
}

impl StdioClient {
    pub fn start(cfg: Value) -> Result<StdioClient> {
        StdioClient::start_in(tempfile::tempdir()?, cfg)
    }

    /// Starts the relay with its config written into `dir`.
    pub fn start_in(dir: tempfile::TempDir, cfg: Value) -> Result<StdioClient> {
        StdioClient::start_from(dir, cfg, &relay_bin(), &[], Stdio::null())
    }

    /// Starts the relay binary `bin` with extra environment and its stderr to `stderr`.
    pub fn start_from(
        dir: tempfile::TempDir,
        cfg: Value,
        bin: &Path,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Result<StdioClient> {
        let path = write_config(dir.path(), &cfg)?;
        let mut child = Command::new(bin)
            .args(["stdio", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("MCP_RELAY_RUNTIME_DIR", runtime_dir(dir.path()))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(StdioClient {
            stdin: Some(stdin),
            lines: rx,
            proc: Proc { child },
            config: path,
            dir,
        })
    }

    pub fn send_raw(&mut self, line: &str) -> Result {
        let stdin = self.stdin.as_mut().ok_or("stdin is closed")?;
        stdin.write_all(line.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Writes bytes without a newline (the start of a message).
    pub fn send_raw_partial(&mut self, bytes: &str) -> Result {
        let stdin = self.stdin.as_mut().ok_or("stdin is closed")?;
        stdin.write_all(bytes.as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes the relay's stdin, as a client that goes away does.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn send(&mut self, v: &Value) -> Result {
        self.send_raw(&v.to_string())
    }

    /// The next line for which `pred` holds (other lines are collected into `skipped`).
    pub fn recv_until(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        skipped: &mut Vec<String>,
    ) -> Result<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| "timed out waiting for the relay")?;
            if pred(&line) {
                return Ok(line);
            }
            skipped.push(line);
        }
    }

    /// Reads until `n` responses (numeric ids) have arrived; returns them by id and the
    /// other lines (notifications, server requests) in order.
    pub fn answers(
        &mut self,
        n: usize,
    ) -> Result<(std::collections::HashMap<u64, Value>, Vec<String>)> {
        let mut answers = std::collections::HashMap::new();
        let mut others = Vec::new();
        while answers.len() < n {
            let line = self.recv_until(|_| true, &mut others)?;
            let v: Value = serde_json::from_str(&line)?;
            match v["id"].as_u64() {
                Some(id) if v.get("method").is_none() => {
                    answers.insert(id, v);
                }
                _ => others.push(line),
            }
        }
        Ok((answers, others))
    }

    /// Sends a request and returns the raw response line with that id.
    pub fn request_raw(&mut self, id: u64, method: &str, params: Value) -> Result<String> {
        self.send(&json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}))?;
        let mut skipped = Vec::new();
        self.recv_until(|l| is_response(l, &json!(id)), &mut skipped)
    }

    pub fn request(&mut self, id: u64, method: &str, params: Value) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.request_raw(id, method, params)?,
        )?)
    }

    /// `initialize` + `initialized`, with the given client capabilities.
    pub fn initialize(&mut self, caps: Value) -> Result<Value> {
        let r = self.request(0, "initialize", json!({"protocolVersion":"2025-11-25","capabilities":caps,"clientInfo":{"name":"it","version":"1"}}))?;
        self.send(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))?;
        Ok(r)
    }
}

/// The text of a tool result: its first content item's (`""` if there is none).
pub fn text(r: &Value) -> &str {
    r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
}

impl StdioClient {
    /// `tools/call`; the whole response.
    pub fn call_tool(&mut self, id: u64, name: &str, args: Value) -> Result<Value> {
        self.request(id, "tools/call", json!({"name": name, "arguments": args}))
    }

    /// The names `tools/list` shows this session (first page).
    pub fn tool_names(&mut self, id: u64) -> Result<Vec<String>> {
        Ok(names(&self.request(id, "tools/list", json!({}))?, "tools"))
    }

    /// One server's entry in `relay__status` (`null` if absent).
    pub fn server_status(&mut self, id: u64, server: &str) -> Result<Value> {
        let s = self.call_tool(id, "relay__status", json!({}))?;
        Ok(s["result"]["structuredContent"]["servers"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == server).cloned())
            .unwrap_or_default())
    }

    /// Polls `relay__status` (bounded) until `server` is in `state`; ids from 1000 up.
    pub fn wait_server_state(&mut self, server: &str, state: &str) -> Result<Value> {
        let mut id = 1000;
        poll(&format!("`{server}` reaches `{state}`"), || {
            id += 1;
            let s = self.server_status(id, server)?;
            Ok(if s["state"] == state {
                Ok(s)
            } else {
                Err(s.to_string())
            })
        })
    }
}

pub fn is_response(line: &str, id: &Value) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|v| v.get("id") == Some(id) && v.get("method").is_none())
}

/// Starts `mcp-relay serve` on an OS-chosen port; returns the process and the /mcp URL.
pub fn serve(cfg: &Value, dir: &Path) -> Result<(Proc, String)> {
    let s = serve_with(cfg, dir, &[])?;
    Ok((s.proc, s.url))
}

/// A relay started by [`serve_with`]: its /mcp URL (`http` or `https`) and everything it
/// wrote on stderr so far.
pub struct Served {
    pub proc: Proc,
    pub url: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    pub fn base(&self) -> String {
        self.url.trim_end_matches("/mcp").to_owned()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// [`serve`] with extra environment variables (tokens for `${VAR}` references); the log
/// level is `info` so that refusals are visible in [`Served::log`].
pub fn serve_with(cfg: &Value, dir: &Path, env: &[(&str, &str)]) -> Result<Served> {
    let path = write_config(dir, cfg)?;
    let mut child = Command::new(relay_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("MCP_RELAY_RUNTIME_DIR", runtime_dir(dir))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let proc = Proc { child };
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("mcp-relay listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let url = rx
        .recv_timeout(TIMEOUT)
        .map_err(|_| "relay did not report its address")?;
    Ok(Served { proc, url, log })
}

/// Starts the example server with `args` (a listening mode, e.g. `--http 127.0.0.1:0`);
/// returns it and the port it announced.
pub fn example_listening(args: &[&str]) -> Result<(Proc, u16)> {
    let mut child = Command::new(example_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or("no LISTENING line")?
        .parse()?;
    Ok((proc, port))
}

/// Starts the example server in HTTP mode; returns it and its /mcp URL.
pub fn example_http(name: &str) -> Result<(Proc, String)> {
    let (proc, port) = example_listening(&["--name", name, "--http", "127.0.0.1:0"])?;
    Ok((proc, format!("http://127.0.0.1:{port}/mcp")))
}

pub const ACCEPT: &str = "application/json, text/event-stream";

pub const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}}"#;

/// A plain Streamable HTTP client session (with a bearer token when given one).
pub struct HttpClient {
    pub http: reqwest::blocking::Client,
    pub url: String,
    pub session: Option<String>,
    pub token: Option<String>,
}

impl HttpClient {
    pub fn new(url: &str) -> Result<HttpClient> {
        let http = reqwest::blocking::Client::builder()
            .timeout(crate::support::TIMEOUT)
            .build()?;
        Ok(HttpClient::with(&http, url, None))
    }

    /// A session over `http` (a client with its own TLS roots, say) sending `token`.
    pub fn with(http: &reqwest::blocking::Client, url: &str, token: Option<&str>) -> HttpClient {
        HttpClient {
            http: http.clone(),
            url: url.to_owned(),
            session: None,
            token: token.map(str::to_owned),
        }
    }

    pub fn post_raw(&self, body: impl Into<String>) -> Result<reqwest::blocking::Response> {
        let mut r = self
            .http
            .post(&self.url)
            .header("accept", ACCEPT)
            .header("content-type", "application/json")
            .body(body.into());
        if let Some(s) = &self.session {
            r = r.header("mcp-session-id", s);
        }
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        Ok(r.send()?)
    }

    /// Sends a request; returns its answer.
    pub fn rpc(&self, id: u64, method: &str, params: Value) -> Result<Value> {
        self.call(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
    }

    pub fn call_tool(&self, id: u64, name: &str, args: Value) -> Result<Value> {
        self.rpc(id, "tools/call", json!({"name": name, "arguments": args}))
    }

    /// The names `tools/list` shows this session (first page).
    pub fn tool_names(&self) -> Result<Vec<String>> {
        Ok(names(&self.rpc(90, "tools/list", json!({}))?, "tools"))
    }

    /// Opens the session when the relay lets it; returns the HTTP status of `initialize`.
    pub fn open(&mut self) -> Result<u16> {
        let r = self.post_raw(INITIALIZE)?;
        let status = r.status().as_u16();
        if status == 200 {
            self.session = r
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let n = self.post_raw(
                json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string(),
            )?;
            assert_eq!(n.status(), 202);
        }
        Ok(status)
    }

    /// Posts a message; returns the JSON-RPC answer (from JSON or from the SSE stream).
    pub fn call(&self, msg: &Value) -> Result<Value> {
        let resp = self.post_raw(msg.to_string())?;
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = resp.text()?;
        if ctype.starts_with("text/event-stream") {
            for line in text.lines() {
                if let Some(data) = line.strip_prefix("data: ").filter(|d| !d.trim().is_empty()) {
                    let v: Value = serde_json::from_str(data)?;
                    if v.get("id") == msg.get("id") && v.get("method").is_none() {
                        return Ok(v);
                    }
                }
            }
            return Err(format!("no answer in stream: {text}").into());
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub fn initialize(&mut self) -> Result<Value> {
        let resp = self.post_raw(INITIALIZE)?;
        let sid = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .ok_or("no session id")?
            .to_owned();
        assert!(
            sid.len() >= 32 && sid.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "{sid}"
        );
        self.session = Some(sid);
        let v: Value = serde_json::from_str(&resp.text()?)?;
        let r = self
            .post_raw(json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string())?;
        assert_eq!(r.status(), 202);
        Ok(v)
    }
}
