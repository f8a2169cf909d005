//! The selection tools a session sees in prompt mode: `relay__analyze_prompt` (rank, expose,
//! notify), `relay__search_tools` (rank only) and `relay__call_tool` (call by name without
//! re-listing). Argument problems come back as tool errors (`isError`) the model can read.

use super::{ANALYZE, CALL, Pick, SEARCH, llm};
use crate::admin;
use crate::error::RpcError;
use crate::protocol::{self, RawMap, method, to_raw};
use crate::router::{Answer, Relay};
use crate::session::ReqCtx;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;

/// Most results of one `relay__search_tools`.
const MAX_SEARCH: usize = 50;

/// Runs a selection tool.
pub(crate) async fn call(
    relay: &Arc<Relay>,
    name: &str,
    params: RawMap,
    ctx: &ReqCtx,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Answer, RpcError> {
    let args: Value = match params.get("arguments") {
        None => json!({}),
        Some(a) => match serde_json::from_str::<Value>(a.get()) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(failure(&format!("`{name}` takes an object of arguments"))),
        },
    };
    // Rank over every server, even those still starting (bounded by `startupWaitMs`).
    relay.settle().await;
    match name {
        ANALYZE => Ok(Answer::Result(analyze(relay, ctx, &args).await)),
        SEARCH => Ok(Answer::Result(search(relay, ctx, &args))),
        CALL => call_by_name(relay, params, &args, ctx, cancel).await,
        _ => Err(RpcError::InvalidParams(format!("unknown tool `{name}`"))),
    }
}

fn failure(text: &str) -> Answer {
    Answer::Result(to_raw(
        &json!({"content": [{"type": "text", "text": text}], "isError": true}),
    ))
}

fn success(text: String, structured: Value) -> Box<RawValue> {
    to_raw(&json!({"content": [{"type": "text", "text": text}], "structuredContent": structured}))
}

fn error_result(text: String) -> Box<RawValue> {
    to_raw(&json!({"content": [{"type": "text", "text": text}], "isError": true}))
}

/// A positive whole-number argument, or why it is not one.
fn count(args: &Value, key: &str) -> Result<Option<usize>, String> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            _ => Err(format!("`{key}` must be a whole number of at least 1")),
        },
    }
}

async fn analyze(relay: &Arc<Relay>, ctx: &ReqCtx, args: &Value) -> Box<RawValue> {
    let session = &ctx.session;
    let before = relay.session_tools(session);
    let notify = |relay: &Arc<Relay>| {
        let after = relay.session_tools(session);
        let same = before.len() == after.len()
            && before.iter().zip(&after).all(|(a, b)| a.get() == b.get());
        if !same {
            // On the request's own stream, so an HTTP client sees it before the answer.
            let _ = ctx
                .stream
                .send(protocol::notification(method::TOOLS_CHANGED, None));
        }
        after.len()
    };
    if args.get("reset").and_then(Value::as_bool) == Some(true) {
        session.state().exposed = None;
        let n = notify(relay);
        return success(
            format!("Back to the initial tool list ({n} tools)."),
            json!({"tools": [], "exposed": [], "reset": true}),
        );
    }
    let prompt = args
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if prompt.trim().is_empty() {
        return error_result(
            "`prompt` is required: give the user's request or the task, in their words (or `reset: true`).".into(),
        );
    }
    let view = relay.view();
    let grant = relay.grant(session);
    let sees = |server: &str| grant.sees(server);
    let sees: super::Sees<'_> = grant.restricted().then_some(&sees);
    let filtering = &view.filtering;
    let requested = match count(args, "maxTools") {
        Ok(n) => n,
        Err(e) => return error_result(e),
    };
    let mut notes = Vec::new();
    let limit = match requested {
        Some(n) if n > filtering.max_exposed => {
            notes.push(format!(
                "maxTools {n} was capped at {} (toolFiltering.maxExposed)",
                filtering.max_exposed
            ));
            filtering.max_exposed
        }
        Some(n) => n,
        None => filtering.max_tools.min(filtering.max_exposed),
    };
    if prompt.len() > super::MAX_PROMPT_BYTES {
        notes.push(format!(
            "only the first {} KiB of the prompt were ranked",
            super::MAX_PROMPT_BYTES / 1024
        ));
    }
    if view.tools.is_empty() {
        return success(
            "No tools are available from the relay's servers right now; the tool list is unchanged.".into(),
            json!({"tools": [], "exposed": session.state().exposed.clone().unwrap_or_default(), "notes": notes}),
        );
    }
    let mut source = "local";
    // One reading of the embedding side for this prompt (the note below says what it was).
    let semantic = view.semantic_ready();
    let picks: Vec<Pick> = match &filtering.llm {
        Some(settings) => {
            let candidates: Vec<(Pick, String)> = heavy(semantic.is_some(), || {
                super::rank(
                    &view,
                    semantic,
                    prompt,
                    settings.candidates.max(limit),
                    sees,
                )
            })
            .into_iter()
            .map(|p| {
                let d = view.description(&p.name).to_owned();
                (p, d)
            })
            .collect();
            if candidates.is_empty() {
                Vec::new()
            } else {
                match llm::choose(
                    &relay.llm_client,
                    settings,
                    &relay.llm_stats,
                    prompt,
                    &candidates,
                    limit,
                )
                .await
                {
                    Ok(p) => {
                        source = "llm";
                        p
                    }
                    Err(e) if settings.fallback_to_local => {
                        tracing::info!(error = %e, "LLM tool selection not used; the local ranking stands.");
                        notes.push(format!("{e}; the local ranking was used"));
                        super::cut(candidates.into_iter().map(|(p, _)| p).collect(), limit)
                    }
                    Err(e) => {
                        return error_result(format!(
                            "{e}; the tool list is unchanged (set toolFiltering.llmCategorization.fallbackToLocal to use the local ranking instead)"
                        ));
                    }
                }
            }
        }
        None => super::cut(
            heavy(semantic.is_some(), || {
                super::rank(&view, semantic, prompt, limit, sees)
            }),
            limit,
        ),
    };
    if semantic.is_none() {
        match view.semantic_state() {
            Some(super::SemanticState::Unusable(e)) => {
                notes.push(format!("the embedding model is not used ({e})"));
            }
            Some(_) => notes.push(
                "the embedding model is still embedding the tools; this prompt was ranked locally"
                    .into(),
            ),
            None => {}
        }
    }
    if picks.is_empty() {
        return success(
            "No tool matched this prompt; the tool list is unchanged. Try relay__search_tools with other words.".into(),
            json!({"tools": [], "exposed": session.state().exposed.clone().unwrap_or_default(), "notes": notes}),
        );
    }
    let exposed = {
        let mut st = session.state();
        let merged = super::merge(st.exposed.as_deref(), &picks, filtering.max_exposed);
        st.exposed = Some(merged.clone());
        merged
    };
    let total = notify(relay);
    let mut text = format!(
        "These tools are now available in this session (re-list the tools, or call them through {CALL}):\n"
    );
    for p in &picks {
        text.push_str(&format!(
            "- {} (server {}, score {:.2}): {}\n",
            p.name, p.server, p.score, p.reason
        ));
    }
    text.push_str(&format!(
        "The session sees {total} tools ({} picked so far).",
        exposed.len()
    ));
    for n in &notes {
        text.push_str(&format!("\nNote: {n}."));
    }
    success(
        text,
        json!({
            "tools": super::describe(&view, &picks, false),
            "exposed": exposed,
            "source": source,
            "notes": notes,
        }),
    )
}

fn search(relay: &Arc<Relay>, ctx: &ReqCtx, args: &Value) -> Box<RawValue> {
    let query = args
        .get("query")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if query.trim().is_empty() {
        return error_result("`query` is required: say what the tool should do.".into());
    }
    let limit = match count(args, "limit") {
        Ok(n) => n.unwrap_or(10).min(MAX_SEARCH),
        Err(e) => return error_result(e),
    };
    let view = relay.view();
    let grant = relay.grant(&ctx.session);
    let sees = |server: &str| grant.sees(server);
    let sees: super::Sees<'_> = grant.restricted().then_some(&sees);
    let semantic = view.semantic_ready();
    let picks = heavy(semantic.is_some(), || {
        super::rank(&view, semantic, query, limit, sees)
    });
    let mut text = if picks.is_empty() {
        "No tool matched.".to_owned()
    } else {
        format!("{} tools (call them with {CALL}):\n", picks.len())
    };
    for p in &picks {
        text.push_str(&format!(
            "- {} (server {}): {}\n",
            p.name,
            p.server,
            super::truncate(view.description(&p.name), 200)
        ));
    }
    success(text, json!({"tools": super::describe(&view, &picks, true)}))
}

async fn call_by_name(
    relay: &Arc<Relay>,
    outer: RawMap,
    args: &Value,
    ctx: &ReqCtx,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Answer, RpcError> {
    let Some(name) = args.get("name").and_then(Value::as_str) else {
        return Ok(failure("`name` is required: the tool to call."));
    };
    let arguments = match args.get("arguments") {
        None | Some(Value::Null) => None,
        Some(a @ Value::Object(_)) => Some(to_raw(a)),
        Some(_) => return Ok(failure("`arguments` must be an object")),
    };
    if super::is_meta(name) {
        return Ok(failure(&format!(
            "call `{name}` directly, not through {CALL}"
        )));
    }
    if let Some(op) = admin::tool(name)
        && relay.admin_enabled()
    {
        let grant = relay.grant(&ctx.session);
        if !grant.admin() {
            return Ok(failure(&format!("forbidden: {}", grant.missing("admin"))));
        }
        return Ok(Answer::Result(
            admin::call(relay, op, arguments.as_deref()).await,
        ));
    }
    let grant = relay.grant(&ctx.session);
    if relay
        .view()
        .target(name)
        .is_none_or(|t| !grant.sees(&t.server))
    {
        return Ok(failure(&format!(
            "unknown tool `{name}`; relay__search_tools finds the available tools"
        )));
    }
    // The outer request's `_meta` (progress token) and `task` carry over.
    let mut params = outer;
    params.set_str("name", name);
    match arguments {
        Some(a) => params.set_raw("arguments", a),
        None => {
            params.0.shift_remove("arguments");
        }
    }
    relay.call_tool(name, params, ctx, cancel).await
}

/// Runs a ranking that uses the embedding model (tens of milliseconds per prompt) without
/// stalling the other tasks of the runtime's worker.
fn heavy<T>(with_model: bool, rank: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if with_model && h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(rank)
        }
        _ => rank(),
    }
}
