//! Tool selection: static allow/deny rules, prompt mode with `relay__analyze_prompt` (per
//! session exposure, list_changed, `relay__call_tool`, bad input), the LLM step against a
//! local OpenAI-compatible fake, the embedding model (all-MiniLM-L6-v2 from disk, installed by
//! scripts/setup-test-deps.sh), and the ranking quality floors on the labelled data.

use crate::support::{Result, StdioClient, example, poll, relay_bin, text};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn static_rules_hide_and_block_tools() -> Result {
    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex"), "two": example("two")},
        "toolFiltering": {"mode": "static", "servers": {
            "ex": {"allow": ["echo", "a*"], "deny": ["add_tool"]},
            "two": {"deny": ["*"]}
        }}
    }))?;
    c.initialize(json!({}))?;
    let listed = c.tool_names(1)?;
    let catalog: Vec<&String> = listed
        .iter()
        .filter(|n| !n.starts_with("relay__"))
        .collect();
    assert_eq!(catalog, ["ex__echo", "ex__add"], "{listed:?}");
    let r = c.call_tool(2, "ex__echo", json!({"message": "hi"}))?;
    assert_eq!(text(&r), "Echo: hi");
    for (id, hidden) in [(3, "ex__slow"), (4, "two__echo"), (5, "ex__add_tool")] {
        let r = c.call_tool(id, hidden, json!({}))?;
        assert_eq!(r["error"]["code"], -32602, "{r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("unknown tool `{hidden}`")), "{msg}");
    }
    Ok(())
}

#[test]
fn prompt_mode_exposes_picks_and_adjusts_them() -> Result {
    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex"), "two": example("two")},
        "toolFiltering": {"mode": "prompt"}
    }))?;
    c.initialize(json!({}))?;
    let initial = c.tool_names(1)?;
    assert!(
        initial.iter().all(|n| n.starts_with("relay__")),
        "{initial:?}"
    );
    for meta in [
        "relay__analyze_prompt",
        "relay__search_tools",
        "relay__call_tool",
        "relay__status",
    ] {
        assert!(initial.contains(&meta.to_owned()), "{meta} in {initial:?}");
    }
    // A hidden tool is still callable by name (exposure limits the list, not the rights).
    assert_eq!(
        text(&c.call_tool(2, "ex__echo", json!({"message": "x"}))?),
        "Echo: x"
    );

    c.send(&json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"relay__analyze_prompt","arguments":{"prompt":"Echo the message 'hello' back to me","maxTools":3}}}))?;
    let (answers, others) = c.answers(1)?;
    let r = &answers[&3];
    assert!(
        others
            .iter()
            .any(|l| l.contains("notifications/tools/list_changed")),
        "no list_changed before the answer: {others:?}"
    );
    let picked: Vec<&str> = r["result"]["structuredContent"]["tools"]
        .as_array()
        .ok_or("no tools")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        !picked.is_empty() && picked.len() <= 3 && picked[0].ends_with("__echo"),
        "{r}"
    );
    assert!(text(r).contains("__echo"), "{r}");
    let after = c.tool_names(4)?;
    for p in &picked {
        assert!(
            after.contains(&(*p).to_owned()),
            "{p} not listed: {after:?}"
        );
    }
    assert!(!after.contains(&"ex__slow".to_owned()), "{after:?}");

    // A second prompt adds its picks first and keeps the earlier ones.
    c.call_tool(
        5,
        "relay__analyze_prompt",
        json!({"prompt":"wait and report progress","maxTools":1}),
    )?;
    let again = c.tool_names(6)?;
    let catalog: Vec<&String> = again.iter().filter(|n| !n.starts_with("relay__")).collect();
    assert!(catalog[0].ends_with("__slow"), "{again:?}");
    assert!(catalog.iter().any(|n| n.ends_with("__echo")), "{again:?}");

    // relay__call_tool reaches a tool without re-listing.
    let r = c.call_tool(
        7,
        "relay__call_tool",
        json!({"name": "two__add", "arguments": {"a": 2, "b": 3}}),
    )?;
    assert_eq!(text(&r), "5", "{r}");
    let r = c.call_tool(8, "relay__call_tool", json!({"name": "nope__x"}))?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text(&r).contains("unknown tool `nope__x`"), "{r}");

    // Search ranks without changing the list.
    let r = c.call_tool(
        9,
        "relay__search_tools",
        json!({"query": "add two numbers"}),
    )?;
    let found = r["result"]["structuredContent"]["tools"][0].clone();
    assert!(
        found["name"]
            .as_str()
            .unwrap_or_default()
            .ends_with("__add"),
        "{r}"
    );
    assert!(found["inputSchema"]["properties"]["a"].is_object(), "{r}");
    assert_eq!(c.tool_names(10)?, again);

    // Reset returns to the initial list.
    c.call_tool(11, "relay__analyze_prompt", json!({"reset": true}))?;
    assert_eq!(c.tool_names(12)?, initial);
    Ok(())
}

#[test]
fn prompt_mode_bad_input_is_a_clear_tool_error() -> Result {
    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex")},
        "toolFiltering": {"mode": "prompt", "defaultExposure": "none", "maxExposed": 5}
    }))?;
    c.initialize(json!({}))?;
    let initial = c.tool_names(1)?;
    assert_eq!(
        initial,
        [
            "relay__analyze_prompt",
            "relay__search_tools",
            "relay__call_tool"
        ]
    );
    let analyze =
        |c: &mut StdioClient, id: u64, args: Value| c.call_tool(id, "relay__analyze_prompt", args);
    for (id, args, needle) in [
        (2, json!({}), "`prompt` is required"),
        (3, json!({"prompt": "   "}), "`prompt` is required"),
        (
            4,
            json!({"prompt": "echo", "maxTools": 0}),
            "`maxTools` must be a whole number of at least 1",
        ),
        (
            5,
            json!({"prompt": "echo", "maxTools": "ten"}),
            "`maxTools` must be",
        ),
    ] {
        let r = analyze(&mut c, id, args)?;
        assert_eq!(r["result"]["isError"], true, "{r}");
        assert!(text(&r).contains(needle), "{needle}: {r}");
    }
    let r = analyze(
        &mut c,
        6,
        json!({"prompt": "echo back a message", "maxTools": 10_000}),
    )?;
    let notes = r["result"]["structuredContent"]["notes"].to_string();
    assert!(notes.contains("capped at 5"), "{r}");
    let exposed = r["result"]["structuredContent"]["exposed"]
        .as_array()
        .map_or(0, Vec::len);
    assert!((1..=5).contains(&exposed), "{r}");
    // A 1 MB prompt: ranked on its start, answered quickly.
    let huge = format!("echo the message {}", "lorem ipsum ".repeat(90_000));
    let r = analyze(&mut c, 7, json!({"prompt": huge}))?;
    assert!(r["result"]["isError"].is_null(), "{r}");
    assert!(
        r["result"]["structuredContent"]["notes"]
            .to_string()
            .contains("first 16 KiB"),
        "{}",
        r["result"]["structuredContent"]
    );
    let r = analyze(&mut c, 8, json!({"prompt": "zzqx vvkw"}))?;
    assert!(text(&r).contains("No tool matched"), "{r}");
    let r = c.request(
        9,
        "tools/call",
        json!({"name": "relay__analyze_prompt", "arguments": "not an object"}),
    )?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    Ok(())
}

/// A local server speaking the OpenAI chat-completions API: the only fake in this suite (no
/// provider is reachable from CI). `answer` decides each reply from the request body.
struct FakeLlm {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeLlm {
    fn start(answer: fn(&Value) -> (Duration, String)) -> Result<FakeLlm> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { break };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    });
                    let mut len = 0usize;
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        line.clear();
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let (delay, content) = answer(&req);
                    if let Ok(mut s) = seen.lock() {
                        s.push(req);
                    }
                    std::thread::sleep(delay);
                    let reply = json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                        reply.len()
                    );
                });
            }
        });
        Ok(FakeLlm { url, requests })
    }
}

fn llm_client(fake: &FakeLlm) -> Result<StdioClient> {
    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex")},
        "toolFiltering": {"mode": "prompt", "llmCategorization": {
            "provider": "openai-compatible", "baseUrl": fake.url, "model": "tiny",
            "apiKey": "sk-test-secret", "timeoutMs": 1500, "confidenceThreshold": 0.6
        }}
    }))?;
    c.initialize(json!({}))?;
    Ok(c)
}

/// `relay__analyze_prompt`'s structured answer.
fn analyze(c: &mut StdioClient, id: u64, prompt: &str) -> Result<Value> {
    let r = c.call_tool(id, "relay__analyze_prompt", json!({"prompt": prompt}))?;
    Ok(r["result"]["structuredContent"].clone())
}

#[test]
fn llm_picks_among_local_candidates() -> Result {
    // The model picks `add` for an echo prompt: only a model's answer would do that.
    let fake = FakeLlm::start(|req| {
        let listed = req["messages"][1]["content"].as_str().unwrap_or_default();
        let content = if listed.contains("ex__add") {
            r#"{"tools": ["ex__add", "not_a_candidate"], "confidence": 0.9}"#
        } else {
            r#"{"tools": [], "confidence": 0.9}"#
        };
        (Duration::ZERO, content.to_owned())
    })?;
    let mut c = llm_client(&fake)?;
    let out = analyze(&mut c, 1, "echo a message and add numbers")?;
    assert_eq!(out["source"], "llm", "{out}");
    assert_eq!(out["tools"][0]["name"], "ex__add", "{out}");
    assert_eq!(out["tools"].as_array().map_or(0, Vec::len), 1, "{out}");
    let reqs = fake.requests.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["model"], "tiny");
    let status = c.call_tool(2, "relay__status", json!({}))?;
    let llm = &status["result"]["structuredContent"]["toolSelection"]["llm"];
    assert_eq!(llm["calls"], 1, "{status}");
    assert_eq!(llm["used"], 1, "{status}");
    assert!(!status.to_string().contains("sk-test-secret"));
    Ok(())
}

#[test]
fn llm_timeout_and_low_confidence_fall_back_to_local() -> Result {
    let fake = FakeLlm::start(|req| {
        let task = req["messages"][1]["content"].as_str().unwrap_or_default();
        if task.contains("slowly") {
            (
                Duration::from_secs(5),
                r#"{"tools": ["ex__add"]}"#.to_owned(),
            )
        } else {
            (
                Duration::ZERO,
                r#"{"tools": ["ex__add"], "confidence": 0.2}"#.to_owned(),
            )
        }
    })?;
    let mut c = llm_client(&fake)?;
    let started = std::time::Instant::now();
    let out = analyze(&mut c, 1, "echo the message back slowly")?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited past the timeout"
    );
    assert_eq!(out["source"], "local", "{out}");
    assert!(
        out["notes"]
            .to_string()
            .contains("did not answer within 1500 ms"),
        "{out}"
    );
    assert!(
        out["tools"][0]["name"]
            .as_str()
            .unwrap_or_default()
            .ends_with("__echo"),
        "{out}"
    );
    let out = analyze(&mut c, 2, "echo the message back")?;
    assert_eq!(out["source"], "local", "{out}");
    assert!(
        out["notes"]
            .to_string()
            .contains("not confident enough (0.20 < 0.60)"),
        "{out}"
    );
    let status = c.call_tool(3, "relay__status", json!({}))?;
    let llm = &status["result"]["structuredContent"]["toolSelection"]["llm"];
    assert_eq!(
        (llm["timeouts"].as_u64(), llm["lowConfidence"].as_u64()),
        (Some(1), Some(1)),
        "{status}"
    );
    Ok(())
}

/// recall@5 and nDCG@10 in percent, as `tests/data/toolsel/score.py` computes them.
fn score(queries: &[Value], ranked: &HashMap<String, Vec<String>>) -> (f64, f64) {
    let (mut recall5, mut ndcg) = (0.0, 0.0);
    for q in queries {
        let id = q["id"].as_str().unwrap_or_default();
        let list = ranked.get(id).map(Vec::as_slice).unwrap_or_default();
        let groups: Vec<Vec<&str>> = q["gold"]
            .as_array()
            .map(|g| {
                g.iter()
                    .map(|grp| {
                        grp.as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut first_hit = vec![None; groups.len()];
        let mut dcg = 0.0;
        for (r, tool) in list.iter().take(10).enumerate() {
            if let Some(gi) = (0..groups.len())
                .find(|&gi| first_hit[gi].is_none() && groups[gi].contains(&tool.as_str()))
            {
                first_hit[gi] = Some(r);
                dcg += 1.0 / ((r + 2) as f64).log2();
            }
        }
        let idcg: f64 = (0..groups.len().min(10))
            .map(|i| 1.0 / ((i + 2) as f64).log2())
            .sum();
        ndcg += dcg / idcg;
        recall5 += first_hit
            .iter()
            .filter(|h| h.is_some_and(|r| r < 5))
            .count() as f64
            / groups.len() as f64;
    }
    let n = queries.len().max(1) as f64;
    (100.0 * recall5 / n, 100.0 * ndcg / n)
}

/// The model directory scripts/setup-test-deps.sh installs.
fn model_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/setup-test-deps.sh",
        dir.display()
    );
    dir
}

/// recall@5 and nDCG@10 of `tools rank` over a labelled set (every `every`-th query),
/// with the embedding model when `embeddings`.
fn measure_with(set: &str, embeddings: bool, every: usize) -> Result<(f64, f64)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/toolsel")
        .join(set);
    let tmp = tempfile::tempdir()?;
    let queries_path = tmp.path().join("queries.jsonl");
    let all = std::fs::read_to_string(dir.join("queries.public.jsonl"))?;
    let picked: Vec<&str> = all
        .lines()
        .filter(|l| !l.trim().is_empty())
        .step_by(every.max(1))
        .collect();
    std::fs::write(&queries_path, picked.join("\n"))?;
    let mut cmd = std::process::Command::new(relay_bin());
    cmd.args(["tools", "rank", "--top", "10", "--catalog"])
        .arg(dir.join("tools.jsonl"))
        .arg("--queries")
        .arg(&queries_path);
    if embeddings {
        cmd.arg("--embeddings").arg(model_dir());
    }
    let out = cmd.output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ranked = HashMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let ids = v["ranked"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ranked.insert(v["id"].as_str().unwrap_or_default().to_owned(), ids);
    }
    let queries: Vec<Value> = picked
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(ranked.len(), queries.len());
    Ok(score(&queries, &ranked))
}

fn measure(set: &str) -> Result<(f64, f64)> {
    measure_with(set, false, 1)
}

/// The scores recorded in docs/benchmarks.md, minus rounding: a change that makes the
/// ranking worse fails here.
#[test]
fn ranking_quality_does_not_fall() -> Result {
    let (r5, ndcg) = measure("livemcpbench")?;
    assert!(
        r5 >= LIVEMCPBENCH_RECALL5 && ndcg >= LIVEMCPBENCH_NDCG10,
        "LiveMCPBench recall@5 {r5:.2} nDCG@10 {ndcg:.2}"
    );
    let (r5, _) = measure("metatool_toole")?;
    assert!(r5 >= TOOLE_RECALL5, "ToolE recall@5 {r5:.2}");
    Ok(())
}

const LIVEMCPBENCH_RECALL5: f64 = 45.5;
const LIVEMCPBENCH_NDCG10: f64 = 46.0;
const TOOLE_RECALL5: f64 = 63.4;

/// With the embedding model (docs/benchmarks.md): the whole LiveMCPBench split, and every
/// 10th ToolE query (631; the whole split takes minutes in a debug build).
#[test]
fn ranking_quality_with_embeddings_does_not_fall() -> Result {
    let (r5, ndcg) = measure_with("livemcpbench", true, 1)?;
    // The issue's targets (today 51.22 / 51.53): one task moves a LiveMCPBench figure by 1-3
    // points, so a near tie flipping on another CPU's float kernels may cost one task's
    // share without failing, while falling under the target does.
    assert!(
        r5 >= 50.0 && ndcg >= 50.0,
        "LiveMCPBench with embeddings: recall@5 {r5:.2} nDCG@10 {ndcg:.2}"
    );
    let (r5, _) = measure_with("metatool_toole", true, 10)?;
    assert!(
        r5 >= TOOLE_EMBEDDINGS_RECALL5,
        "ToolE (every 10th query) with embeddings: recall@5 {r5:.2}"
    );
    Ok(())
}

const TOOLE_EMBEDDINGS_RECALL5: f64 = 76.0;

/// The relay's `toolSelection` status once the embedding model is past loading/embedding.
fn embeddings_settled(c: &mut StdioClient, first_id: u64) -> Result<Value> {
    let mut id = first_id;
    poll("the embedding model to settle", || {
        id += 1;
        let status = c.call_tool(id, "relay__status", json!({}))?;
        let sel = status["result"]["structuredContent"]["toolSelection"].clone();
        Ok(
            if sel["embeddings"]["state"] == "embedding" || sel["visibleTools"] == 0 {
                Err(sel.to_string())
            } else {
                Ok(sel)
            },
        )
    })
}

/// A prompt that shares no word with any tool: the local ranker alone finds nothing, the
/// embedding model finds the tool that does it, and the session can call it.
#[test]
fn embeddings_rank_by_meaning() -> Result {
    let prompt = "What is the sum of 17 and 25?";
    let mut plain = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex")},
        "toolFiltering": {"mode": "prompt"}
    }))?;
    plain.initialize(json!({}))?;
    let r = analyze(&mut plain, 1, prompt)?;
    assert_eq!(r["tools"], json!([]), "{r}");

    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex")},
        "toolFiltering": {"mode": "prompt", "embeddings": {"model": model_dir()}}
    }))?;
    c.initialize(json!({}))?;
    let sel = embeddings_settled(&mut c, 100)?;
    assert_eq!(sel["embeddings"]["state"], "ready", "{sel}");
    assert_eq!(
        sel["embeddings"]["embeddedTools"], sel["visibleTools"],
        "{sel}"
    );
    let r = analyze(&mut c, 1, prompt)?;
    let first = &r["tools"][0];
    assert_eq!(first["name"], "ex__add", "{r}");
    assert!(
        first["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("close in meaning"),
        "{r}"
    );
    assert!(c.tool_names(2)?.contains(&"ex__add".to_owned()));
    let sum = c.call_tool(3, "ex__add", json!({"a": 17, "b": 25}))?;
    assert_eq!(text(&sum), "42", "{sum}");
    // Search uses the same ranking.
    let r = c.call_tool(
        4,
        "relay__search_tools",
        json!({"query": "multiply? no: total of two values"}),
    )?;
    assert_eq!(
        r["result"]["structuredContent"]["tools"][0]["name"], "ex__add",
        "{r}"
    );
    Ok(())
}

/// A model directory whose weights are not a model: the relay ranks locally and says why.
#[test]
fn unusable_model_falls_back_to_local_ranking() -> Result {
    let dir = tempfile::tempdir()?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f))?;
    }
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )?;
    let mut c = StdioClient::start(json!({
        "mcpServers": {"ex": example("ex")},
        "toolFiltering": {"mode": "prompt", "embeddings": {"model": dir.path()}}
    }))?;
    c.initialize(json!({}))?;
    let sel = embeddings_settled(&mut c, 100)?;
    assert_eq!(sel["embeddings"]["state"], "unusable", "{sel}");
    let why = sel["embeddings"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("model.safetensors"), "{sel}");
    let r = analyze(&mut c, 1, "add two numbers")?;
    assert_eq!(r["tools"][0]["name"], "ex__add", "{r}");
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("the embedding model is not used") && notes.contains("model.safetensors"),
        "{r}"
    );
    Ok(())
}

/// The encoder against a NumPy implementation of the same forward pass (whose rankings
/// reproduce the published all-MiniLM-L6-v2 figures of tests/data/toolsel/README.md).
#[test]
fn encoder_matches_the_reference() -> Result {
    let model = mcp_relay::selection::embed::Model::load(&model_dir())?;
    assert_eq!(model.dim(), 384);
    let a = model.embed("Read a file from disk")?;
    let b = model.embed("Open the text document")?;
    let c = model.embed("Weather forecast for Paris")?;
    for (got, want) in a.iter().zip([0.02072f32, 0.02059, -0.09049, -0.00223]) {
        assert!((got - want).abs() < 1e-4, "{:?}", &a[..4]);
    }
    let cos = mcp_relay::selection::embed::cosine;
    assert!((cos(&a, &b) - 0.32157).abs() < 1e-4, "{}", cos(&a, &b));
    assert!((cos(&a, &c) - 0.04385).abs() < 1e-4, "{}", cos(&a, &c));
    assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
    // Odd input is embedded or refused, never a panic.
    let long = "word ".repeat(5000);
    for text in ["", "\0", long.as_str(), "读取文件"] {
        if let Ok(v) = model.embed(text) {
            assert_eq!(v.len(), 384);
        }
    }
    Ok(())
}

/// A catalog of two tools: with so few, standard scores mean little, and the model still
/// picks the tool that does what the prompt asks.
#[test]
fn embeddings_rank_a_tiny_catalog() -> Result {
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("tools.jsonl");
    let tools = [
        json!({"id": "calc/add", "name": "add", "description": "Adds two numbers."}),
        json!({"id": "text/echo", "name": "echo", "description": "Echoes the message back."}),
    ];
    std::fs::write(&catalog, format!("{}\n{}\n", tools[0], tools[1]))?;
    let queries = dir.path().join("q.jsonl");
    let q = json!({"id": "q", "query": "What is the sum of 17 and 25?"});
    std::fs::write(&queries, format!("{q}\n"))?;
    let out = std::process::Command::new(relay_bin())
        .args(["tools", "rank", "--catalog"])
        .arg(&catalog)
        .arg("--queries")
        .arg(&queries)
        .arg("--embeddings")
        .arg(model_dir())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(line["ranked"][0], "calc/add", "{line}");
    Ok(())
}
