//! A tiny MCP server shipped with mcp-relay: for the bundled example config, the tests and the
//! benchmark. Speaks MCP over stdio (default), Streamable HTTP (`--http 127.0.0.1:0`, JSON
//! answers only) or WebSocket (`--ws 127.0.0.1:0`, optionally `--require-token T`), and
//! deliberately returns fields a lossy proxy would drop.
//!
//! Tools: `echo`, `add`, `slow` (progress), `lossless`, `sample`, `elicit`, `roots`, `log`,
//! `add_tool` (list_changed), `touch` (resources/updated; with `onlySubscribed` only for a subscribed URI), `crash` (exits at once),
//! `cancellations` (the `notifications/cancelled` it received), `client_capabilities`;
//! `--tools N` adds N generated tools (`generated_00000`...) for catalog-size benchmarks.

use mcp_relay::sync::lock;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

struct Server {
    name: String,
    extra_tools: Mutex<Vec<String>>,
    out: Option<mpsc::UnboundedSender<String>>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    /// Ids (as JSON text) of the client requests being handled.
    in_flight: Mutex<std::collections::HashSet<String>>,
    /// Every `notifications/cancelled` received, for the `cancellations` tool.
    cancellations: Mutex<Vec<Value>>,
    /// The capabilities the client declared in `initialize`.
    client_capabilities: Mutex<Value>,
    /// Tasks (2025-11-25) by id: status and, once done, the result. Ids are `task-1`,
    /// `task-2`... on every server, so two servers' ids collide unless a relay namespaces them.
    tasks: Mutex<indexmap::IndexMap<String, (String, Option<Value>)>>,
    /// Resource URIs the client subscribed to (`touch` with `onlySubscribed` checks them).
    subscriptions: Mutex<std::collections::HashSet<String>>,
}

/// A `Task` object.
fn task_json(id: &str, status: &str) -> Value {
    json!({"taskId": id, "status": status, "ttl": null, "pollInterval": 20,
           "createdAt": "2026-01-01T00:00:00Z", "lastUpdatedAt": "2026-01-01T00:00:00Z"})
}

fn tools(extra: &[String]) -> Value {
    let mut list = vec![
        json!({"name":"echo","description":"Echoes the message back.","inputSchema":{"type":"object","properties":{"message":{"type":"string","description":"Text to echo"}},"required":["message"]}}),
        json!({"name":"add","description":"Adds two numbers.","inputSchema":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}},"required":["a","b"]}}),
        json!({"name":"slow","description":"Waits, reporting progress.","inputSchema":{"type":"object","properties":{"steps":{"type":"integer"},"ms":{"type":"integer"}}},"annotations":{"idempotentHint":true}}),
        json!({"name":"lossless","description":"Returns fields a lossy proxy would drop.",
               "inputSchema":{"type":"object","properties":{}},
               "outputSchema":{"type":"object","properties":{"n":{"type":"number"}}},
               "execution":{"taskSupport":"optional"},
               "annotations":{"readOnlyHint":true,"x-hint":"custom"},
               "icons":[{"src":"data:image/png;base64,AA==","mimeType":"image/png"}],
               "x-vendor":{"deep":[1,2.50,{"k":null}]},
               "_meta":{"example.com/meta":"kept"}}),
        json!({"name":"sample","description":"Asks the client's model (sampling).","inputSchema":{"type":"object","properties":{"prompt":{"type":"string"}}}}),
        json!({"name":"elicit","description":"Asks the user (elicitation).","inputSchema":{"type":"object","properties":{}}}),
        json!({"name":"roots","description":"Lists the client's roots.","inputSchema":{"type":"object","properties":{}}}),
        json!({"name":"log","description":"Sends a log message, then answers.","inputSchema":{"type":"object","properties":{"text":{"type":"string"}}}}),
        json!({"name":"add_tool","description":"Adds a tool named by `name` and announces list_changed.","inputSchema":{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}}),
        json!({"name":"touch","description":"Announces that a resource changed.","inputSchema":{"type":"object","properties":{"uri":{"type":"string"},"onlySubscribed":{"type":"boolean"}},"required":["uri"]}}),
        json!({"name":"crash","description":"Exits the server process at once.","inputSchema":{"type":"object","properties":{}}}),
        json!({"name":"client_capabilities","description":"Returns the capabilities the client declared in initialize.","inputSchema":{"type":"object","properties":{}}}),
        json!({"name":"cancellations","description":"Lists the notifications/cancelled received (requestId, reason, inFlight).","inputSchema":{"type":"object","properties":{}}}),
    ];
    for name in extra {
        list.push(json!({"name": name, "description": format!("{name}: looks up records by key and returns them as text (added at run time or generated)."),
            "inputSchema":{"type":"object","properties":{"key":{"type":"string","description":"Record key"},"limit":{"type":"integer","minimum":1}},"required":["key"]}}));
    }
    json!({ "tools": list })
}

fn text(s: impl Into<String>) -> Value {
    json!({"content":[{"type":"text","text":s.into()}]})
}

impl Server {
    fn new(name: String, count: usize, out: Option<mpsc::UnboundedSender<String>>) -> Arc<Server> {
        Arc::new(Server {
            name,
            extra_tools: Mutex::new(generated(count)),
            out,
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            in_flight: Mutex::default(),
            cancellations: Mutex::default(),
            client_capabilities: Mutex::default(),
            tasks: Mutex::default(),
            subscriptions: Mutex::default(),
        })
    }

    fn notify(&self, method: &str, params: Value) {
        if let Some(out) = &self.out {
            let _ = out.send(json!({"jsonrpc":"2.0","method":method,"params":params}).to_string());
        }
    }

    async fn ask(&self, method: &str, params: Value) -> Value {
        let Some(out) = &self.out else {
            return json!({"error":"server-to-client requests need the stdio transport"});
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        let _ =
            out.send(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string());
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(v)) => v,
            _ => json!({"error":"no answer"}),
        }
    }

    async fn call(&self, params: &Value) -> Result<Value, (i64, String)> {
        let name = params["name"].as_str().unwrap_or_default();
        let args = &params["arguments"];
        let token = params["_meta"]["progressToken"].clone();
        Ok(match name {
            "echo" => {
                // `repeat` (optional) makes big answers from small requests.
                let times = args["repeat"].as_u64().unwrap_or(1).clamp(1, 1_000_000);
                let msg = args["message"].as_str().unwrap_or_default();
                text(format!(
                    "Echo: {}",
                    msg.repeat(usize::try_from(times).unwrap_or(1))
                ))
            }
            "add" => {
                let sum = args["a"].as_f64().unwrap_or(0.0) + args["b"].as_f64().unwrap_or(0.0);
                text(format!("{sum}"))
            }
            "slow" => {
                let steps = args["steps"].as_u64().unwrap_or(3).min(1000);
                let ms = args["ms"].as_u64().unwrap_or(50).min(60_000);
                for i in 1..=steps {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if !token.is_null() {
                        self.notify("notifications/progress", json!({"progressToken": token, "progress": i, "total": steps, "message": format!("step {i}")}));
                    }
                }
                text(format!("done after {steps} steps"))
            }
            "lossless" => json!({
                "content":[{"type":"text","text":"ok","x-c":1,"annotations":{"audience":["user"],"x-a":true}}],
                "structuredContent":{"n":1.50,"big":123456789012345678901234567890_u128.to_string()},
                "x-r":{"deep":[1,2,{"k":null}]},
                "_meta":{"example.com/x":true}
            }),
            "sample" => {
                let r = self.ask("sampling/createMessage", json!({"messages":[{"role":"user","content":{"type":"text","text": args["prompt"].as_str().unwrap_or("hi")}}],"maxTokens":50})).await;
                let mut out = text(format!(
                    "sampled: {}",
                    r["content"]["text"].as_str().unwrap_or(&r.to_string())
                ));
                // No answer from the client's model: the tool failed.
                if r["content"].is_null() {
                    out["isError"] = json!(true);
                }
                out
            }
            "elicit" => {
                let r = self.ask("elicitation/create", json!({"message":"Your name?","requestedSchema":{"type":"object","properties":{"name":{"type":"string"}}}})).await;
                text(format!("elicited: {r}"))
            }
            "roots" => {
                let r = self.ask("roots/list", json!({})).await;
                text(format!("roots: {r}"))
            }
            "log" => {
                self.notify("notifications/message", json!({"level":"info","logger":self.name,"data": args["text"].as_str().unwrap_or("log")}));
                text("logged")
            }
            "add_tool" => {
                let n = args["name"].as_str().unwrap_or("extra").to_owned();
                lock(&self.extra_tools).push(n.clone());
                self.notify("notifications/tools/list_changed", json!({}));
                text(format!("added {n}"))
            }
            "touch"
                if args["onlySubscribed"] == true
                    && !lock(&self.subscriptions).contains(args["uri"].as_str().unwrap_or("")) =>
            {
                text("not subscribed")
            }
            "touch" => {
                self.notify(
                    "notifications/resources/updated",
                    json!({"uri": args["uri"]}),
                );
                text("touched")
            }
            "crash" => std::process::exit(3),
            "cancellations" => text(Value::Array(lock(&self.cancellations).clone()).to_string()),
            "client_capabilities" => text(lock(&self.client_capabilities).to_string()),
            other => {
                if lock(&self.extra_tools).iter().any(|t| t == other) {
                    text(format!("{other} ran"))
                } else {
                    return Err((-32602, format!("unknown tool {other}")));
                }
            }
        })
    }

    /// `tools/call` with `params.task`: runs the tool in the background as a task.
    fn start_task(self: &Arc<Self>, params: Value) -> Value {
        let id = {
            let mut t = lock(&self.tasks);
            let id = format!("task-{}", t.len() + 1);
            t.insert(id.clone(), ("working".to_owned(), None));
            id
        };
        let me = self.clone();
        let task = id.clone();
        tokio::spawn(async move {
            let result = match me.call(&params).await {
                Ok(r) => r,
                Err((code, message)) => {
                    json!({"isError": true, "content":[{"type":"text","text": format!("{code}: {message}")}]})
                }
            };
            let status = {
                let mut t = lock(&me.tasks);
                match t.get_mut(&task) {
                    Some(entry) if entry.0 == "working" => {
                        *entry = ("completed".to_owned(), Some(result));
                        Some("completed")
                    }
                    _ => None,
                }
            };
            if let Some(status) = status {
                let mut n = task_json(&task, status);
                n["_meta"] = json!({"io.modelcontextprotocol/related-task": {"taskId": task}});
                me.notify("notifications/tasks/status", n);
            }
        });
        json!({"task": task_json(&id, "working")})
    }

    async fn task_request(&self, method: &str, params: &Value) -> Result<Value, (i64, String)> {
        if method == "tasks/list" {
            let list: Vec<Value> = lock(&self.tasks)
                .iter()
                .map(|(id, (status, _))| task_json(id, status))
                .collect();
            return Ok(json!({ "tasks": list }));
        }
        let id = params["taskId"].as_str().unwrap_or_default().to_owned();
        let unknown = || (-32602, format!("unknown task {id}"));
        match method {
            "tasks/get" => {
                let t = lock(&self.tasks);
                let (status, _) = t.get(&id).ok_or_else(unknown)?;
                Ok(task_json(&id, status))
            }
            "tasks/cancel" => {
                let mut t = lock(&self.tasks);
                let entry = t.get_mut(&id).ok_or_else(unknown)?;
                if entry.0 == "working" {
                    entry.0 = "cancelled".to_owned();
                }
                Ok(task_json(&id, &entry.0))
            }
            _ => {
                // tasks/result: waits (bounded) for the outcome.
                for _ in 0..6000 {
                    let done = {
                        let t = lock(&self.tasks);
                        let (status, result) = t.get(&id).ok_or_else(unknown)?;
                        (status != "working").then(|| (status.clone(), result.clone()))
                    };
                    if let Some((status, result)) = done {
                        let mut r = result.unwrap_or_else(
                            || json!({"isError": true, "content":[{"type":"text","text": status}]}),
                        );
                        r["_meta"] =
                            json!({"io.modelcontextprotocol/related-task": {"taskId": id}});
                        return Ok(r);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((-32603, format!("task {id} did not finish")))
            }
        }
    }

    async fn handle(self: &Arc<Self>, msg: Value) -> Option<Value> {
        let id = msg.get("id").cloned();
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            // A response to one of our requests.
            if let Some(n) = id.as_ref().and_then(Value::as_u64)
                && let Some(tx) = lock(&self.waiting).remove(&n)
            {
                let _ = tx.send(
                    msg.get("result")
                        .cloned()
                        .unwrap_or(msg.get("error").cloned().unwrap_or(Value::Null)),
                );
            }
            return None;
        };
        if method == "notifications/cancelled" {
            let p = &msg["params"];
            let in_flight = lock(&self.in_flight).contains(&p["requestId"].to_string());
            lock(&self.cancellations).push(
                json!({"requestId": p["requestId"], "reason": p["reason"], "inFlight": in_flight}),
            );
        }
        let id = id?;
        let key = id.to_string();
        lock(&self.in_flight).insert(key.clone());
        let reply = self.answer(method, &msg, id).await;
        lock(&self.in_flight).remove(&key);
        Some(reply)
    }

    async fn answer(self: &Arc<Self>, method: &str, msg: &Value, id: Value) -> Value {
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let result: Result<Value, (i64, String)> = match method {
            "initialize" => {
                *lock(&self.client_capabilities) = params["capabilities"].clone();
                let v = params["protocolVersion"].as_str().unwrap_or("2025-11-25");
                let v = if ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"].contains(&v) {
                    v
                } else {
                    "2025-11-25"
                };
                Ok(json!({"protocolVersion": v,
                    "capabilities":{"tools":{"listChanged":true},"prompts":{},"resources":{"subscribe":true},"logging":{},"completions":{},
                        "tasks":{"list":{},"cancel":{},"requests":{"tools":{"call":{}}}}},
                    "serverInfo":{"name": self.name, "version":"1.0.0"},
                    "instructions": format!("{} is the example server.", self.name)}))
            }
            "ping" => Ok(json!({})),
            "tools/list" => Ok(tools(&lock(&self.extra_tools))),
            "tools/call" if params.get("task").is_some() => Ok(self.start_task(params.clone())),
            "tools/call" => self.call(&params).await,
            "tasks/get" | "tasks/result" | "tasks/list" | "tasks/cancel" => {
                self.task_request(method, &params).await
            }
            "prompts/list" => Ok(
                json!({"prompts":[{"name":"greet","description":"Greets someone.","arguments":[{"name":"name","required":true}]}]}),
            ),
            "prompts/get" => Ok(
                json!({"messages":[{"role":"user","content":{"type":"text","text": format!("Hello, {}!", params["arguments"]["name"].as_str().unwrap_or("you"))}}]}),
            ),
            "resources/list" => Ok(
                json!({"resources":[{"uri":"example://greeting","name":"greeting","mimeType":"text/plain"}]}),
            ),
            "resources/templates/list" => Ok(
                json!({"resourceTemplates":[{"uriTemplate":"example://item/{id}","name":"item"}]}),
            ),
            "resources/read" => Ok(
                json!({"contents":[{"uri": params["uri"], "mimeType":"text/plain", "text": format!("content of {}", params["uri"].as_str().unwrap_or(""))}]}),
            ),
            "resources/subscribe" | "resources/unsubscribe" => {
                let uri = params["uri"].as_str().unwrap_or_default().to_owned();
                let mut subs = lock(&self.subscriptions);
                if method == "resources/subscribe" {
                    subs.insert(uri);
                } else {
                    subs.remove(&uri);
                }
                Ok(json!({}))
            }
            "logging/setLevel" => Ok(json!({})),
            "completion/complete" => {
                Ok(json!({"completion":{"values":["alpha","beta"],"total":2,"hasMore":false}}))
            }
            other => Err((-32601, format!("method not found: {other}"))),
        };
        match result {
            Ok(r) => json!({"jsonrpc":"2.0","id":id,"result":r}),
            Err((code, message)) => {
                json!({"jsonrpc":"2.0","id":id,"error":{"code":code,"message":message}})
            }
        }
    }
}

/// `count` generated tool names (`--tools N`, for catalog-size benchmarks).
fn generated(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("generated_{i:05}")).collect()
}

async fn stdio(name: String, count: usize) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let server = Server::new(name, count, Some(tx.clone()));
    let writer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        while let Some(line) = rx.blocking_recv() {
            let mut lock = stdout.lock();
            if writeln!(lock, "{line}")
                .and_then(|()| lock.flush())
                .is_err()
            {
                break;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            let _ = tx.send(
                json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}})
                    .to_string(),
            );
            continue;
        };
        let server = server.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Some(reply) = server.handle(msg).await {
                let _ = tx.send(reply.to_string());
            }
        });
    }
    drop(tx);
    drop(server);
    let _ = writer.join();
}

async fn http(name: String, addr: &str, count: usize) -> std::io::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let server = Server::new(name, count, None);
    let sessions: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let s2 = sessions.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let server = server.clone();
            let sessions = sessions.clone();
            async move {
                let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
                    return (StatusCode::BAD_REQUEST, "parse error").into_response();
                };
                let sid = headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let mut new_sid = None;
                if msg["method"] == "initialize" {
                    let id = format!("s{:x}", rand::random::<u64>());
                    lock(&sessions).insert(id.clone());
                    new_sid = Some(id);
                } else if !sid.as_ref().is_some_and(|s| lock(&sessions).contains(s)) {
                    return (StatusCode::NOT_FOUND, "unknown session").into_response();
                }
                match server.handle(msg).await {
                    None => StatusCode::ACCEPTED.into_response(),
                    Some(reply) => {
                        let mut r = ([("content-type", "application/json")], reply.to_string())
                            .into_response();
                        if let Some(id) = new_sid
                            && let Ok(v) = id.parse()
                        {
                            r.headers_mut().insert("mcp-session-id", v);
                        }
                        r
                    }
                }
            }
        })
        .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
        .delete(move |headers: HeaderMap| {
            let sessions = s2.clone();
            async move {
                let sid = headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if lock(&sessions).remove(&sid) {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("LISTENING {}", local.port());
    eprintln!("example server listening on http://{local}/mcp");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

/// WebSocket mode: one server (and session) per connection, one JSON-RPC message per text
/// frame, subprotocol `mcp`; with `token`, the upgrade needs `Authorization: Bearer <token>`.
async fn ws(name: String, addr: &str, count: usize, token: Option<String>) -> std::io::Result<()> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("LISTENING {}", local.port());
    eprintln!("example server listening on ws://{local}/mcp");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (name, token) = (name.clone(), token.clone());
        tokio::spawn(async move {
            // The signature is tungstenite's handshake callback's.
            #[allow(clippy::result_large_err)]
            let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                if let Some(t) = &token {
                    let given = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    if given != Some(format!("Bearer {t}").as_str()) {
                        let mut e = ErrorResponse::new(Some("unauthorized".into()));
                        *e.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
                        return Err(e);
                    }
                }
                let asked = req
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|p| p.split(',').any(|x| x.trim() == "mcp"));
                if asked {
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        axum::http::HeaderValue::from_static("mcp"),
                    );
                }
                Ok(resp)
            };
            let Ok(stream) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                return;
            };
            let (mut sink, mut source) = stream.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let server = Server::new(name, count, Some(tx.clone()));
            let writer = tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    if sink.send(Message::Text(line.into())).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(frame)) = source.next().await {
                let Message::Text(t) = frame else {
                    if matches!(frame, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                let Ok(msg) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                let (server, tx) = (server.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(reply) = server.handle(msg).await {
                        let _ = tx.send(reply.to_string());
                    }
                });
            }
            drop(tx);
            writer.abort();
        });
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut name = "example".to_owned();
    let mut http_addr = None;
    let mut ws_addr = None;
    let mut token = None;
    let mut count = 0usize;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--name" => {
                name = args.get(i + 1).cloned().unwrap_or(name);
                i += 1;
            }
            "--http" => {
                http_addr = args.get(i + 1).cloned();
                i += 1;
            }
            "--ws" => {
                ws_addr = args.get(i + 1).cloned();
                i += 1;
            }
            "--require-token" => {
                token = args.get(i + 1).cloned();
                i += 1;
            }
            "--tools" => {
                count = args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(0);
                i += 1;
            }
            other => {
                eprintln!(
                    "usage: mcp-example-server [--name NAME] [--http HOST:PORT | --ws HOST:PORT [--require-token T]] [--tools N]; unknown argument {other}"
                );
                return std::process::ExitCode::from(2);
            }
        }
        i += 1;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match (http_addr, ws_addr) {
            (Some(addr), _) => {
                if let Err(e) = http(name, &addr, count).await {
                    eprintln!("http server failed: {e}");
                }
            }
            (None, Some(addr)) => {
                if let Err(e) = ws(name, &addr, count, token).await {
                    eprintln!("ws server failed: {e}");
                }
            }
            (None, None) => stdio(name, count).await,
        }
    });
    std::process::ExitCode::SUCCESS
}
