//! Benchmark (not a test): `tools/call` of an echo tool directly against a Streamable HTTP
//! backend and through the relay, in one run, at several concurrencies.
//!
//! Usage: `cargo build --release && target/release/mcp-relay-bench [--seconds N]`
//! It starts `mcp-example-server --http` and `mcp-relay serve` from the same directory as
//! itself, on loopback ports chosen by the OS, and kills both when done.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn sibling(name: &str) -> Res<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn start_backend() -> Res<(Proc, String)> {
    let mut child = Command::new(sibling("mcp-example-server")?)
        .args(["--name", "bench", "--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let p = Proc(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or("no port")?
        .to_owned();
    Ok((p, format!("http://127.0.0.1:{port}/mcp")))
}

fn start_relay(backend: &str, dir: &std::path::Path) -> Res<(Proc, String)> {
    let cfg = dir.join("bench-relay.json");
    std::fs::write(
        &cfg,
        json!({"mcpServers": {"bench": {"type": "http", "url": backend}}}).to_string(),
    )?;
    let mut child = Command::new(sibling("mcp-relay")?)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let p = Proc(child);
    for line in BufReader::new(err).lines() {
        let line = line?;
        if let Some(url) = line.strip_prefix("mcp-relay listening on ") {
            return Ok((p, url.trim().to_owned()));
        }
    }
    Err("relay did not start".into())
}

async fn session(client: &reqwest::Client, url: &str) -> Res<String> {
    let r = client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}))
        .send()
        .await?;
    let sid = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("no session")?
        .to_owned();
    let _ = r.bytes().await?;
    client
        .post(url)
        .header("mcp-session-id", &sid)
        .json(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
        .send()
        .await?;
    Ok(sid)
}

async fn call(client: &reqwest::Client, url: &str, sid: &str, tool: &str, id: u64) -> Res<()> {
    let r = client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":{"message":"hello"}}}))
        .send()
        .await?;
    let body: Value = r.json().await?;
    if body["result"]["content"][0]["text"] != "Echo: hello" {
        return Err(format!("bad answer {body}").into());
    }
    Ok(())
}

struct Stats {
    errors: usize,
    rate: f64,
    p50_us: u128,
    p99_us: u128,
}

async fn run(url: &str, tool: &str, concurrency: usize, dur: Duration) -> Res<Stats> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()?;
    let sid = Arc::new(session(&client, url).await?);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let tool = tool.to_owned();
        let sid = sid.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = 0u64;
            while start.elapsed() < dur {
                let t = Instant::now();
                if call(&client, &url, &sid, &tool, (w as u64) << 32 | i)
                    .await
                    .is_err()
                {
                    errors += 1;
                }
                lat.push(t.elapsed());
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0, |d| d.as_micros())
    };
    Ok(Stats {
        errors,
        rate: lat.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("mcp-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_backend, direct) = start_backend()?;
    let (_relay, relayed) = start_relay(&direct, &dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "| concurrency | direct calls/s | relay calls/s | ratio | direct p50 µs | relay p50 µs | added p50 µs | direct p99 µs | relay p99 µs | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    rt.block_on(async {
        // Warm both paths (connection pools, backend session).
        let _ = run(&direct, "echo", 4, Duration::from_millis(300)).await?;
        let _ = run(&relayed, "bench__echo", 4, Duration::from_millis(300)).await?;
        for c in [1usize, 16, 256] {
            let d = run(&direct, "echo", c, Duration::from_secs(secs)).await?;
            let r = run(&relayed, "bench__echo", c, Duration::from_secs(secs)).await?;
            println!(
                "| {c} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} |",
                d.rate,
                r.rate,
                r.rate / d.rate,
                d.p50_us,
                r.p50_us,
                r.p50_us as i128 - d.p50_us as i128,
                d.p99_us,
                r.p99_us,
                d.errors + r.errors
            );
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
