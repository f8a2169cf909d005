//! Which tools a session sees: `toolFiltering` rules, and in prompt mode the tools
//! `relay__analyze_prompt` ranked for that session alone.
//!
//! A [`View`] is the catalog as the rules let sessions see it, built with each catalog
//! snapshot, with its ranking [`rank::Index`] built on first use. What a session picked
//! lives in its `SessionState::exposed` (names only, so it survives an upgrade). This module
//! decides and ranks; the router sends the notifications and forwards calls.

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
}

/// Per-tool analyzed text kept across catalog snapshots, so that a change re-analyzes only
/// the tools that changed.
#[derive(Default)]
pub struct DocCache(HashMap<String, Arc<Analyzed>>);

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
                let doc = cache.0.remove(&key).unwrap_or_else(|| {
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
        cache.0 = fresh;
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

/// The ranking `relay__analyze_prompt` uses: the best `limit` tools for `prompt`.
pub fn rank_index(index: &Index, prompt: &str, limit: usize) -> Vec<rank::Hit> {
    index.rank(truncate(prompt, MAX_PROMPT_BYTES), limit)
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
}

/// Ranks the view for `prompt`: the best `limit` tools of the servers `sees` lets through,
/// best first.
pub fn rank(view: &View, prompt: &str, limit: usize, sees: Sees<'_>) -> Vec<Pick> {
    let index = view.index();
    // A client that sees only some servers: rank everything, keep its servers' tools.
    let depth = if sees.is_some() {
        view.tools.len()
    } else {
        limit
    };
    rank_index(index, prompt, depth)
        .into_iter()
        .filter_map(|h| {
            let doc = index.doc(h.doc)?;
            if sees.is_some_and(|f| !f(&doc.server)) {
                return None;
            }
            let terms: Vec<&str> = h.matched.iter().take(5).map(String::as_str).collect();
            let reason = if terms.is_empty() {
                format!("another tool of server {} matches", doc.server)
            } else {
                format!("matches {}", terms.join(", "))
            };
            Some(Pick {
                name: doc.id.clone(),
                server: doc.server.clone(),
                score: h.score,
                reason,
            })
        })
        .take(limit)
        .collect()
}

/// Keeps the picks that score at least [`RELATIVE_CUTOFF`] of the best one.
pub fn cut(mut picks: Vec<Pick>, max: usize) -> Vec<Pick> {
    let best = picks.first().map_or(0.0, |p| p.score);
    picks.retain(|p| p.score >= best * RELATIVE_CUTOFF);
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
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
