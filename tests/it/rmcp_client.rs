//! The official Rust SDK (rmcp) as the client, over stdio and Streamable HTTP.

use crate::support::{Result, example, relay_bin, serve, write_config};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde_json::json;

fn args(message: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("message".into(), json!(message));
    m
}

fn text_of(r: &rmcp::model::CallToolResult) -> String {
    serde_json::to_value(&r.content)
        .ok()
        .and_then(|v| v[0]["text"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `mcp-relay stdio` on a config written into `dir`, for rmcp's child-process transport.
fn relay_stdio(dir: &std::path::Path, cfg: &serde_json::Value) -> Result<tokio::process::Command> {
    let path = write_config(dir, cfg)?;
    let mut cmd = tokio::process::Command::new(relay_bin());
    cmd.arg("stdio")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn");
    Ok(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_over_stdio() -> Result {
    let dir = tempfile::tempdir()?;
    let cmd = relay_stdio(
        dir.path(),
        &json!({"mcpServers": {"ex": example("ex"), "two": example("two")}}),
    )?;
    let client = ().serve(TokioChildProcess::new(cmd)?).await?;
    let tools = client.list_all_tools().await?;
    let names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    assert!(
        names.contains(&"ex__echo".into()) && names.contains(&"two__echo".into()),
        "{names:?}"
    );
    let r = client
        .call_tool(CallToolRequestParams::new("two__echo").with_arguments(args("rmcp")))
        .await?;
    assert_eq!(text_of(&r), "Echo: rmcp");
    client.cancel().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_over_http() -> Result {
    let dir = tempfile::tempdir()?;
    let (_relay, url) = serve(&json!({"mcpServers": {"ex": example("ex")}}), dir.path())?;
    let client = ().serve(StreamableHttpClientTransport::from_uri(url)).await?;
    let info = client.peer_info().ok_or("no server info")?;
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("mcp-relay")
    );
    let r = client
        .call_tool(CallToolRequestParams::new("ex__echo").with_arguments(args("over http")))
        .await?;
    assert_eq!(text_of(&r), "Echo: over http");
    client.cancel().await?;
    Ok(())
}

/// Counts `notifications/tools/list_changed`.
#[derive(Clone, Default)]
struct ListWatcher(std::sync::Arc<tokio::sync::Notify>);

impl rmcp::ClientHandler for ListWatcher {
    fn on_tool_list_changed(
        &self,
        _context: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.0.notify_one();
        std::future::ready(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_in_prompt_mode() -> Result {
    let dir = tempfile::tempdir()?;
    let cmd = relay_stdio(
        dir.path(),
        &json!({"mcpServers": {"ex": example("ex"), "two": example("two")},
                "toolFiltering": {"mode": "prompt"}}),
    )?;
    let watcher = ListWatcher::default();
    let changed = watcher.0.clone();
    let client = watcher.serve(TokioChildProcess::new(cmd)?).await?;
    let names = |tools: Vec<rmcp::model::Tool>| -> Vec<String> {
        tools.iter().map(|t| t.name.to_string()).collect()
    };
    let before = names(client.list_all_tools().await?);
    assert!(
        before.iter().all(|n| n.starts_with("relay__")),
        "{before:?}"
    );
    let mut a = serde_json::Map::new();
    a.insert("prompt".into(), json!("add two numbers together"));
    a.insert("maxTools".into(), json!(2));
    let r = client
        .call_tool(CallToolRequestParams::new("relay__analyze_prompt").with_arguments(a))
        .await?;
    let picked = r
        .structured_content
        .as_ref()
        .and_then(|s| s["tools"][0]["name"].as_str())
        .ok_or("no pick")?
        .to_owned();
    assert!(picked.ends_with("__add"), "{r:?}");
    tokio::time::timeout(crate::support::TIMEOUT, changed.notified()).await?;
    let after = names(client.list_all_tools().await?);
    assert!(after.contains(&picked), "{after:?}");
    let mut sum = serde_json::Map::new();
    sum.insert("a".into(), json!(20));
    sum.insert("b".into(), json!(22));
    let r = client
        .call_tool(CallToolRequestParams::new(picked).with_arguments(sum))
        .await?;
    assert_eq!(text_of(&r), "42");
    client.cancel().await?;
    Ok(())
}

/// rmcp in `Discover` mode (protocol 2026-07-28, no `initialize`) and in `Initialize` mode,
/// against the same relay, over Streamable HTTP and over stdio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_in_discover_and_initialize_modes() -> Result {
    use rmcp::model::ProtocolVersion;
    use rmcp::{ClientLifecycleMode, ClientServiceExt};
    let discover = || ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    let dir = tempfile::tempdir()?;
    let cfg = json!({"mcpServers": {"ex": example("ex")}});
    let (_relay, url) = serve(&cfg, dir.path())?;
    let modern = ()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(url.clone()),
            discover(),
        )
        .await?;
    let legacy = ()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(url),
            ClientLifecycleMode::Initialize,
        )
        .await?;
    let version = |c: &rmcp::service::RunningService<rmcp::RoleClient, ()>| {
        c.peer_info().map(|i| i.protocol_version.clone())
    };
    assert_eq!(version(&modern), Some(ProtocolVersion::V_2026_07_28));
    assert_eq!(version(&legacy), Some(ProtocolVersion::V_2025_11_25));
    for (c, said) in [(&modern, "modern"), (&legacy, "legacy")] {
        let names: Vec<String> = c
            .list_all_tools()
            .await?
            .iter()
            .map(|t| t.name.to_string())
            .collect();
        assert!(names.contains(&"ex__echo".to_owned()), "{said}: {names:?}");
        let r = c
            .call_tool(CallToolRequestParams::new("ex__echo").with_arguments(args(said)))
            .await?;
        assert_eq!(text_of(&r), format!("Echo: {said}"));
    }
    modern.cancel().await?;
    legacy.cancel().await?;

    let sdir = tempfile::tempdir()?;
    let cmd = relay_stdio(sdir.path(), &cfg)?;
    let client = ().serve_with_lifecycle(TokioChildProcess::new(cmd)?, discover()).await?;
    assert_eq!(version(&client), Some(ProtocolVersion::V_2026_07_28));
    let r = client
        .call_tool(CallToolRequestParams::new("ex__echo").with_arguments(args("stdio")))
        .await?;
    assert_eq!(text_of(&r), "Echo: stdio");
    client.cancel().await?;
    Ok(())
}
