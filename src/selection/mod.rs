//! Which tools a session sees: `toolFiltering` rules, and in prompt mode the tools
//! `relay__analyze_prompt` ranked for that session alone.
//!
//! A [`View`] is the catalog as the rules let sessions see it, built with each catalog
//! snapshot, with its ranking [`rank::Index`] built on first use. What a session picked
//! lives in its `SessionState::exposed` (names only, so it survives an upgrade). This module
//! decides and ranks; the router sends the notifications and forwards calls.

pub mod embed;
pub mod llm;
pub mod meta;
pub mod rank;
pub mod text;

use crate::catalog::{Catalog, Target};
use crate::config::filtering::{Exposure, Mode, ToolFiltering};
use crate::protocol::to_raw;
use rank::{Analyzed, Index, Params, ToolDoc};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, OnceLock};

pub const ANALYZE: &str = "relay__analyze_prompt";
pub const SEARCH: &str = "relay__search_tools";
pub const CALL: &str = "relay__call_tool";

/// Prompt text beyond this many bytes is not ranked (the start of a prompt says most).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// A hit scoring under this share of the best hit is not exposed (the rest are unrelated).
const RELATIVE_CUTOFF: f64 = 0.3;

static DEFINITIONS: LazyLock<Vec<Arc<RawValue>>> = LazyLock::new(|| {
    let defs = [
        json!({
            "name": ANALYZE,
            "description": "Pick the tools for a task. Give the user's request (or the task at hand) as `prompt`; the relay ranks every tool it can reach, makes the most relevant ones available in this session (the tool list changes; re-list the tools) and returns their names. Call it again when the task changes; `reset: true` returns to the initial tool list.",
            "inputSchema": {"type": "object", "properties": {
                "prompt": {"type": "string", "description": "The user's request or the task, in their words."},
                "maxTools": {"type": "integer", "minimum": 1, "description": "Most tools to add for this prompt (default 10)."},
                "reset": {"type": "boolean", "description": "Forget the tools picked so far instead of ranking."}
            }},
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        }),
        json!({
            "name": SEARCH,
            "description": "Search the tools the relay can reach without changing this session's tool list; returns names, descriptions and input schemas for `relay__call_tool`.",
            "inputSchema": {"type": "object", "properties": {
                "query": {"type": "string", "description": "What the tool should do."},
                "limit": {"type": "integer", "minimum": 1, "description": "Most results (default 10)."}
            }, "required": ["query"]},
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        }),
        json!({
            "name": CALL,
            "description": "Call any tool this session may use by its name (as returned by relay__analyze_prompt or relay__search_tools), for clients that do not refresh their tool list.",
            "inputSchema": {"type": "object", "properties": {
                "name": {"type": "string", "description": "The tool's name."},
                "arguments": {"type": "object", "description": "The tool's arguments."}
            }, "required": ["name"]},
        }),
    ];
    defs.iter().map(|d| Arc::from(to_raw(d))).collect()
});

/// The selection tools' definitions (listed in prompt mode).
pub fn definitions() -> &'static [Arc<RawValue>] {
    &DEFINITIONS
}

/// Whether `name` is one of the selection tools.
pub fn is_meta(name: &str) -> bool {
    [ANALYZE, SEARCH, CALL].contains(&name)
}

/// A server's descriptive text for the index (its name is added by [`ToolDoc::from_tool`]).
#[derive(Debug, Clone, Default)]
pub struct ServerText {
    pub server: String,
    pub text: String,
}

/// The catalog's tools as the rules let sessions see them, in catalog order.
#[derive(Default)]
pub struct View {
    /// The rules this view was built with.
    pub filtering: ToolFiltering,
    pub tools: Vec<Arc<RawValue>>,
    pub targets: Vec<Target>,
    position: HashMap<String, usize>,
    docs: Vec<Arc<Analyzed>>,
    index: OnceLock<Index>,
    semantic: OnceLock<Result<Semantic, String>>,
}

/// Per-tool analyzed text (and embedding) kept across catalog snapshots, so that a change
/// re-analyzes only the tools that changed; emptied when the embedding model changes.
#[derive(Default)]
pub struct DocCache {
    docs: HashMap<String, Arc<Analyzed>>,
    model: Option<std::path::PathBuf>,
}

impl View {
    /// The view of `catalog` under `filtering`; `servers` gives each server's description.
    pub fn build(
        catalog: &Catalog,
        filtering: &ToolFiltering,
        servers: &[ServerText],
        cache: &mut DocCache,
    ) -> View {
        let server_text: HashMap<&str, &str> = servers
            .iter()
            .map(|s| (s.server.as_str(), s.text.as_str()))
            .collect();
        let mut v = View {
            filtering: filtering.clone(),
            ..View::default()
        };
        let model = filtering.embeddings.as_ref().map(|e| e.model.clone());
        if cache.model != model {
            cache.docs.clear();
            cache.model = model;
        }
        let mut fresh = HashMap::with_capacity(catalog.tools.len());
        for (raw, name) in catalog.tools.iter().zip(&catalog.tool_names) {
            let Some(target) = catalog.tool(name) else {
                continue;
            };
            if !filtering.permits(&target.server, &target.name) {
                continue;
            }
            // Only prompt mode ranks: the other modes skip the analysis of every tool.
            if filtering.mode == Mode::Prompt {
                let stext = server_text
                    .get(&*target.server)
                    .copied()
                    .unwrap_or_default();
                let key = format!("{name}\n{stext}\n{}", raw.get());
                let doc = cache.docs.remove(&key).unwrap_or_else(|| {
                    let tool: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                    let mut doc = ToolDoc::from_tool(name.clone(), &target.server, stext, &tool);
                    // Rank on the tool's own name; the exposed one only adds the prefix.
                    doc.name = target.name.to_string();
                    Arc::new(Analyzed::new(doc))
                });
                fresh.insert(key, doc.clone());
                v.docs.push(doc);
            }
            v.position.insert(name.clone(), v.tools.len());
            v.tools.push(raw.clone());
            v.targets.push(target.clone());
        }
        cache.docs = fresh;
        v
    }

    /// The position of an exposed tool name, if the rules let sessions see it.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.position.get(name).copied()
    }

    /// Where an exposed tool name points, if the rules let sessions see it.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.position(name).map(|i| &self.targets[i])
    }

    /// The ranking index (empty outside prompt mode), built on first use.
    pub fn index(&self) -> &Index {
        self.index.get_or_init(|| index_of(self.docs.clone()))
    }

    /// Whether rankings of this view use an embedding model (`toolFiltering.embeddings` in
    /// prompt mode).
    pub fn wants_semantic(&self) -> bool {
        self.filtering.mode == Mode::Prompt && self.filtering.embeddings.is_some()
    }

    /// What the embedding model is doing, without waiting for it (`None`: no model in use).
    pub fn semantic_state(&self) -> Option<SemanticState<'_>> {
        if !self.wants_semantic() {
            return None;
        }
        Some(match self.semantic.get() {
            None => SemanticState::Embedding,
            Some(Ok(s)) => SemanticState::Ready {
                tools: s.embedded(),
            },
            Some(Err(e)) => SemanticState::Unusable(e),
        })
    }

    /// Whether [`View::prepare_semantic`] would be quick: the model is loaded and every tool already
    /// has its vector.
    fn semantic_is_cheap(&self) -> bool {
        self.filtering
            .embeddings
            .as_ref()
            .is_some_and(|e| embed::is_loaded(&e.model))
            && self.docs.iter().all(|d| d.vector.get().is_some())
    }

    /// The embedding side of the ranking if it is ready (rankings do not wait for it).
    pub fn semantic_ready(&self) -> Option<&Semantic> {
        self.semantic.get().and_then(|s| s.as_ref().ok())
    }

    /// Loads the model and embeds the tools (seconds for a large catalog: [`Warmer`] does it
    /// on its own thread after each rebuild); what came of it is [`View::semantic_ready`] and
    /// [`View::semantic_state`].
    fn prepare_semantic(&self) {
        let Some(settings) = self.filtering.embeddings.as_ref() else {
            return;
        };
        if !self.wants_semantic() {
            return;
        }
        self.semantic.get_or_init(|| {
            let started = std::time::Instant::now();
            let build = || -> Result<Semantic, String> {
                let model = embed::shared(&settings.model).map_err(|e| e.to_string())?;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get() / 2);
                let s = Semantic::build(model, settings.weight, self.index(), threads.max(1));
                if s.embedded() == 0 && !s.vectors.is_empty() {
                    return Err(
                        "no tool could be embedded (the model's weights may be corrupt)".into(),
                    );
                }
                Ok(s)
            };
            // A panic must not leave the view "embedding" for ever.
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
                .unwrap_or_else(|_| Err("embedding the tools failed (a panic; see the log)".into()));
            match &built {
                Ok(s) => tracing::info!(
                    model = %settings.model.display(),
                    tools = s.embedded(),
                    ms = started.elapsed().as_millis() as u64,
                    "Tool embeddings ready."
                ),
                Err(e) => tracing::warn!(error = %e, "The embedding model cannot be used; tools are ranked locally alone."),
            }
            built
        });
    }

    /// A tool's description as the ranker saw it (prompt mode).
    pub fn description(&self, name: &str) -> &str {
        self.position(name)
            .and_then(|i| self.docs.get(i))
            .map_or("", |d| d.doc.description.as_str())
    }
}

fn index_of(docs: Vec<Arc<Analyzed>>) -> Index {
    Index::build(docs, Params::default())
}

/// The index `relay__analyze_prompt` would build over these tools.
pub fn build_index(docs: Vec<ToolDoc>) -> Index {
    index_of(
        docs.into_iter()
            .map(|d| Arc::new(Analyzed::new(d)))
            .collect(),
    )
}

/// The ranking `relay__analyze_prompt` uses: the best `limit` tools for `prompt`, by the
/// local ranker alone or mixed with an embedding model's similarities.
pub fn rank_index(
    index: &Index,
    semantic: Option<&Semantic>,
    prompt: &str,
    limit: usize,
) -> Vec<rank::Hit> {
    let prompt = truncate(prompt, MAX_PROMPT_BYTES);
    match semantic {
        Some(s) => s.rank(index, prompt, limit),
        None => index.rank(prompt, limit),
    }
}

/// With an embedding model, a tool is ranked only when its mixed score stands this many
/// standard deviations above the catalog's mean (the rest are unrelated to the prompt).
const MIN_FUSED: f64 = 1.0;

/// Catalogs smaller than this are ranked whole with an embedding model.
const SMALL_CATALOG: usize = 8;

/// Embeds the newest view's tools on one background thread: `rebuild_catalog` hands it
/// every new view; a view superseded before its turn is skipped (its tools' vectors, kept
/// with their analyses, serve the next view anyway).
#[derive(Default)]
pub struct Warmer(Arc<std::sync::Mutex<WarmerState>>);

#[derive(Default)]
struct WarmerState {
    next: Option<std::sync::Weak<View>>,
    running: bool,
}

impl Warmer {
    pub fn warm(&self, view: &Arc<View>) {
        if !view.wants_semantic() {
            return;
        }
        // A change that added no tool (a prompt or resource list, a restart) finds every
        // vector ready: the view is done at once, with no moment of local-only rankings.
        if view.semantic_is_cheap() {
            view.prepare_semantic();
            return;
        }
        let mut st = crate::sync::lock(&self.0);
        st.next = Some(Arc::downgrade(view));
        if st.running {
            return;
        }
        st.running = true;
        drop(st);
        let shared = self.0.clone();
        let spawned = std::thread::Builder::new()
            .name("tool-embeddings".into())
            .spawn(move || {
                // If a panic ends this thread, the next warm() can start one again (a normal
                // end clears the flag under the lock that found nothing left to do).
                struct Idle(Arc<std::sync::Mutex<WarmerState>>);
                impl Drop for Idle {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            crate::sync::lock(&self.0).running = false;
                        }
                    }
                }
                let _idle = Idle(shared.clone());
                loop {
                    let next = {
                        let mut st = crate::sync::lock(&shared);
                        match st.next.take() {
                            Some(w) => w,
                            None => {
                                st.running = false;
                                return;
                            }
                        }
                    };
                    if let Some(view) = next.upgrade() {
                        view.prepare_semantic();
                    }
                }
            });
        if let Err(e) = spawned {
            crate::sync::lock(&self.0).running = false;
            tracing::warn!(error = %e, "Cannot start embedding the tools; rankings stay local until the next catalog change.");
        }
    }
}

/// The embedding model's state (`relay__status`).
#[derive(Debug, Clone, PartialEq)]
pub enum SemanticState<'a> {
    /// Loading the model or embedding the catalog.
    Embedding,
    /// In use; `tools` of the catalog's tools have a vector.
    Ready { tools: usize },
    /// Not usable (why); the local ranking is used alone.
    Unusable(&'a str),
}

/// The embedding side of a ranking: the model and one vector per tool of an index.
pub struct Semantic {
    model: Arc<embed::Model>,
    weight: f64,
    vectors: Vec<Option<Arc<[f32]>>>,
}

impl Semantic {
    /// Embeds the index's tools on up to `threads` threads; each tool's vector is kept with
    /// its analysis, so a catalog change embeds only the tools that changed.
    pub fn build(model: Arc<embed::Model>, weight: f64, index: &Index, threads: usize) -> Semantic {
        let docs = index.analyzed();
        let embed_one = |a: &Arc<Analyzed>| {
            a.vector
                .get_or_init(|| {
                    model
                        .embed(&a.doc.embedding_text())
                        .map_err(
                            |e| tracing::debug!(tool = %a.doc.id, error = %e, "Tool not embedded."),
                        )
                        .ok()
                        .map(Arc::from)
                })
                .clone()
        };
        // Tools not embedded yet are spread over the threads (each is independent); what a
        // failed thread left is embedded by the loop below.
        let missing: Vec<&Arc<Analyzed>> =
            docs.iter().filter(|a| a.vector.get().is_none()).collect();
        if missing.len() > 16 {
            spread(&missing, threads, |a| drop(embed_one(a)));
        }
        let vectors = docs.iter().map(embed_one).collect();
        Semantic {
            model,
            weight,
            vectors,
        }
    }

    /// How many tools have a vector.
    pub fn embedded(&self) -> usize {
        self.vectors.iter().filter(|v| v.is_some()).count()
    }

    /// The local ranker's scores and the prompt's cosine similarity to each tool, each
    /// standardized over the catalog (so neither scale dominates), mixed by `weight`.
    fn rank(&self, index: &Index, prompt: &str, limit: usize) -> Vec<rank::Hit> {
        let query = match self.model.embed(prompt) {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "Prompt not embedded; ranked locally alone.");
                return index.rank(prompt, limit);
            }
        };
        let n = index.len().min(self.vectors.len());
        let mut lexical = vec![0f64; n];
        let mut matched = vec![Vec::new(); n];
        for h in index.rank(prompt, n) {
            if h.doc < n {
                lexical[h.doc] = h.score;
                matched[h.doc] = h.matched;
            }
        }
        let similarity: Vec<f64> = self.vectors[..n]
            .iter()
            .map(|v| {
                v.as_deref()
                    .map_or(0.0, |v| f64::from(embed::cosine(&query, v)))
            })
            .collect();
        let (zl, zs) = (standardize(&lexical), standardize(&similarity));
        let fused: Vec<f64> = (0..n)
            .map(|i| (1.0 - self.weight) * zl[i] + self.weight * zs[i])
            .collect();
        // Standard deviations mean little over a handful of tools: all of them are ranked
        // then. Tools the local ranker found are kept whatever the model says.
        let small = n < SMALL_CATALOG;
        let mut hits: Vec<usize> = (0..n)
            .filter(|&i| small || fused[i] >= MIN_FUSED || lexical[i] > 0.0)
            .collect();
        let id = |i: usize| index.doc(i).map_or("", |d| d.id.as_str());
        hits.sort_by(|a, b| {
            fused[*b]
                .total_cmp(&fused[*a])
                .then_with(|| id(*a).cmp(id(*b)))
        });
        hits.truncate(limit);
        hits.into_iter()
            .map(|i| rank::Hit {
                doc: i,
                score: fused[i],
                matched: std::mem::take(&mut matched[i]),
                similarity: Some(similarity[i]),
            })
            .collect()
    }
}

/// `f` over `items` on up to `threads` scoped threads, results in the items' order; a part
/// whose thread the OS refuses runs on the caller's thread. `None` if `f` panicked.
pub fn spread<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    if threads <= 1 || items.len() < 2 {
        return Some(items.iter().map(&f).collect());
    }
    let f = &f;
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || part.iter().map(f).collect::<Vec<_>>())
                    .map_err(|_| part)
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for p in parts {
            match p {
                Ok(handle) => out.extend(handle.join().ok()?),
                Err(part) => out.extend(part.iter().map(f)),
            }
        }
        Some(out)
    })
}

/// `(x - mean) / standard deviation` (all zeros when the values do not vary).
fn standardize(x: &[f64]) -> Vec<f64> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sd = (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    if sd < 1e-12 {
        return vec![0.0; x.len()];
    }
    x.iter().map(|v| (v - mean) / sd).collect()
}

/// Which servers a session may see (`None`: all); from its client's `servers` globs.
pub type Sees<'a> = Option<&'a (dyn Fn(&str) -> bool + Sync)>;

/// The tool list of a session: `exposed` is what it picked (`None`: nothing yet); tools of
/// servers `sees` rejects are left out. Outside prompt mode, with every server visible and
/// without management tools, it is the view's own list, not a copy.
pub fn session_tools<'a>(
    view: &'a View,
    exposed: Option<&[String]>,
    admin: &[Arc<RawValue>],
    sees: Sees<'_>,
) -> Cow<'a, [Arc<RawValue>]> {
    let filtering = &view.filtering;
    let visible = |i: &usize| sees.is_none_or(|f| f(&view.targets[*i].server));
    let all = || {
        (0..view.tools.len())
            .filter(visible)
            .map(|i| view.tools[i].clone())
    };
    if filtering.mode != Mode::Prompt {
        if admin.is_empty() && sees.is_none() {
            return Cow::Borrowed(&view.tools);
        }
        return Cow::Owned(admin.iter().cloned().chain(all()).collect());
    }
    let mut out: Vec<Arc<RawValue>> = definitions().to_vec();
    if filtering.default_exposure != Exposure::None {
        out.extend(admin.iter().cloned());
    }
    match exposed {
        Some(names) => out.extend(
            names
                .iter()
                .filter_map(|n| view.position(n))
                .filter(visible)
                .map(|i| view.tools[i].clone()),
        ),
        None if filtering.default_exposure == Exposure::All => out.extend(all()),
        None => {}
    }
    Cow::Owned(out)
}

/// One tool chosen for a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub name: String,
    pub server: String,
    pub score: f64,
    pub reason: String,
    /// The prompt's cosine similarity to the tool, when an embedding model ranked.
    pub similarity: Option<f64>,
}

/// Ranks the view for `prompt` (with `semantic`, normally [`View::semantic_ready`]): the
/// best `limit` tools of the servers `sees` lets through, best first.
pub fn rank(
    view: &View,
    semantic: Option<&Semantic>,
    prompt: &str,
    limit: usize,
    sees: Sees<'_>,
) -> Vec<Pick> {
    let index = view.index();
    // A client that sees only some servers: rank everything, keep its servers' tools.
    let depth = if sees.is_some() {
        view.tools.len()
    } else {
        limit
    };
    rank_index(index, semantic, prompt, depth)
        .into_iter()
        .filter_map(|h| {
            let doc = index.doc(h.doc)?;
            if sees.is_some_and(|f| !f(&doc.server)) {
                return None;
            }
            let terms: Vec<&str> = h.matched.iter().take(5).map(String::as_str).collect();
            let mut reason = if terms.is_empty() {
                format!("another tool of server {} matches", doc.server)
            } else {
                format!("matches {}", terms.join(", "))
            };
            if let Some(s) = h.similarity {
                reason = if terms.is_empty() {
                    format!("close in meaning ({s:.2})")
                } else {
                    format!("{reason}; close in meaning ({s:.2})")
                };
            }
            Some(Pick {
                name: doc.id.clone(),
                server: doc.server.clone(),
                score: h.score,
                reason,
                similarity: h.similarity,
            })
        })
        .take(limit)
        .collect()
}

/// Keeps the picks that score at least [`RELATIVE_CUTOFF`] of the best one (local scores;
/// an embedding model's standardized scores were already cut at [`MIN_FUSED`]).
pub fn cut(mut picks: Vec<Pick>, max: usize) -> Vec<Pick> {
    if picks.first().is_some_and(|p| p.similarity.is_none()) {
        let best = picks[0].score;
        picks.retain(|p| p.score >= best * RELATIVE_CUTOFF);
    }
    picks.truncate(max);
    picks
}

/// The session's new exposure: this prompt's picks first, then earlier ones, at most `cap`.
pub fn merge(previous: Option<&[String]>, picks: &[Pick], cap: usize) -> Vec<String> {
    let mut seen = HashSet::new();
    picks
        .iter()
        .map(|p| p.name.clone())
        .chain(previous.unwrap_or_default().iter().cloned())
        .filter(|n| seen.insert(n.clone()))
        .take(cap)
        .collect()
}

/// The longest prefix of `s` within `max` bytes, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What `relay__analyze_prompt` and `relay__search_tools` return for picks.
pub fn describe(view: &View, picks: &[Pick], with_schema: bool) -> Vec<Value> {
    picks
        .iter()
        .map(|p| {
            let mut v = json!({
                "name": p.name,
                "server": p.server,
                "score": (p.score * 100.0).round() / 100.0,
                "reason": p.reason,
                "description": view.description(&p.name),
            });
            if with_schema
                && let Some(i) = view.position(&p.name)
                && let Ok(mut tool) = serde_json::from_str::<Value>(view.tools[i].get())
                && let Some(schema) = tool.get_mut("inputSchema")
            {
                v["inputSchema"] = schema.take();
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(name: &str, score: f64) -> Pick {
        Pick {
            name: name.into(),
            server: "s".into(),
            score,
            reason: String::new(),
            similarity: None,
        }
    }

    #[test]
    fn merge_puts_new_picks_first_and_caps() {
        let old = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let m = merge(Some(&old), &[pick("c", 2.0), pick("d", 1.0)], 4);
        assert_eq!(m, ["c", "d", "a", "b"]);
        let m = merge(Some(&old), &[pick("x", 2.0)], 2);
        assert_eq!(m, ["x", "a"]);
    }

    #[test]
    fn cut_drops_unrelated_tail() {
        let picks = vec![pick("a", 10.0), pick("b", 5.0), pick("c", 1.0)];
        assert_eq!(cut(picks.clone(), 10).len(), 2);
        assert_eq!(cut(picks, 1).len(), 1);
    }

    #[test]
    fn cut_leaves_model_scores_to_their_own_threshold() {
        // Standardized scores can be negative (a session restricted to some servers): the
        // relative rule would drop even the best pick.
        let picks: Vec<Pick> = [-0.5, -0.8, -2.0]
            .iter()
            .map(|s| Pick {
                similarity: Some(0.4),
                ..pick("x", *s)
            })
            .collect();
        assert_eq!(cut(picks, 2).len(), 2);
    }

    #[test]
    fn spread_keeps_the_order() {
        let items: Vec<u32> = (0..101).collect();
        for threads in [1, 2, 7] {
            let out = spread(&items, threads, |x| x * 2);
            assert_eq!(out, Some(items.iter().map(|x| x * 2).collect()));
        }
        assert_eq!(spread(&[] as &[u32], 4, |x| *x), Some(vec![]));
    }

    #[test]
    fn standardize_centres_and_scales() {
        let z = standardize(&[1.0, 2.0, 3.0]);
        assert!((z[0] + 1.2247).abs() < 1e-3 && z[1].abs() < 1e-12 && (z[2] - 1.2247).abs() < 1e-3);
        assert_eq!(standardize(&[5.0, 5.0]), [0.0, 0.0]);
        assert!(standardize(&[]).is_empty());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
