//! The merged catalog: tools, prompts, resources and resource templates of every backend,
//! with `server__name` namespacing, collision handling and the relay's own pagination.
//!
//! A [`Catalog`] is an immutable snapshot rebuilt whenever a backend's lists change; items are
//! kept as raw JSON with only `name` rewritten, so every other field reaches clients intact.
//! This module does no I/O and knows nothing of sessions.

use crate::protocol::{RawMap, raw};
use base64::Engine as _;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// Separator between a server's prefix and a tool or prompt name.
pub const SEPARATOR: &str = "__";
/// Longest exposed name (the strictest common client rule).
pub const MAX_NAME: usize = 64;

/// One list item as a backend sent it.
#[derive(Debug, Clone)]
pub struct Item {
    /// `name` for tools and prompts, `uri` for resources, `uriTemplate` for templates.
    pub key: String,
    pub raw: Arc<RawValue>,
}

/// The lists one backend offers.
#[derive(Debug, Clone, Default)]
pub struct Lists {
    pub tools: Vec<Item>,
    pub prompts: Vec<Item>,
    pub resources: Vec<Item>,
    pub templates: Vec<Item>,
}

/// One backend's contribution to a catalog build.
pub struct Source<'a> {
    pub server: &'a str,
    pub prefix: &'a str,
    pub lists: &'a Lists,
}

/// Where an exposed name points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub server: Arc<str>,
    pub name: Arc<str>,
}

/// An immutable merged snapshot.
#[derive(Debug, Default)]
pub struct Catalog {
    pub tools: Vec<Arc<RawValue>>,
    /// The exposed name of each of `tools`, in the same order.
    pub tool_names: Vec<String>,
    pub prompts: Vec<Arc<RawValue>>,
    pub resources: Vec<Arc<RawValue>>,
    pub templates: Vec<Arc<RawValue>>,
    /// The server of each of `prompts`, `resources` and `templates`, in the same order
    /// (for clients that may see only some servers).
    pub owners: Owners,
    tool_index: HashMap<String, Target>,
    prompt_index: HashMap<String, Target>,
    resource_index: HashMap<String, Arc<str>>,
    template_index: Vec<(Template, Arc<str>)>,
    /// Human-readable reports of names that collided and how they were resolved.
    pub collisions: Vec<String>,
}

/// Per-item servers of the lists other than tools.
#[derive(Debug, Default)]
pub struct Owners {
    pub prompts: Vec<Arc<str>>,
    pub resources: Vec<Arc<str>>,
    pub templates: Vec<Arc<str>>,
}

impl Catalog {
    /// Merges the sources in order; earlier sources keep a contested name.
    pub fn build(sources: &[Source<'_>]) -> Catalog {
        let mut c = Catalog::default();
        for s in sources {
            let server: Arc<str> = Arc::from(s.server);
            for item in &s.lists.tools {
                let (exposed, raw) = c.expose(&server, s.prefix, item, Kind::Tool);
                c.tools.push(raw);
                c.tool_names.push(exposed.clone());
                c.tool_index.insert(
                    exposed,
                    Target {
                        server: server.clone(),
                        name: Arc::from(item.key.as_str()),
                    },
                );
            }
            for item in &s.lists.prompts {
                let (exposed, raw) = c.expose(&server, s.prefix, item, Kind::Prompt);
                c.prompts.push(raw);
                c.owners.prompts.push(server.clone());
                c.prompt_index.insert(
                    exposed,
                    Target {
                        server: server.clone(),
                        name: Arc::from(item.key.as_str()),
                    },
                );
            }
            for item in &s.lists.resources {
                if let Some(owner) = c.resource_index.get(&item.key) {
                    c.collisions.push(format!(
                        "resource `{}` is offered by `{owner}` and `{server}`; `{owner}` serves it",
                        item.key
                    ));
                    continue;
                }
                c.resource_index.insert(item.key.clone(), server.clone());
                c.resources.push(item.raw.clone());
                c.owners.resources.push(server.clone());
            }
            for item in &s.lists.templates {
                c.template_index
                    .push((Template::parse(&item.key), server.clone()));
                c.templates.push(item.raw.clone());
                c.owners.templates.push(server.clone());
            }
        }
        c
    }

    fn expose(
        &mut self,
        server: &Arc<str>,
        prefix: &str,
        item: &Item,
        kind: Kind,
    ) -> (String, Arc<RawValue>) {
        let index = match kind {
            Kind::Tool => &self.tool_index,
            Kind::Prompt => &self.prompt_index,
        };
        let mut name = exposed_name(prefix, &item.key, server);
        if let Some(owner) = index.get(&name) {
            let forced = hashed_name(&name, server, &item.key);
            self.collisions.push(format!(
                "{} `{name}` of `{server}` collides with `{}` of `{}`; exposed as `{forced}`",
                kind.label(),
                owner.name,
                owner.server
            ));
            tracing::warn!(server = %server, name = %item.key, exposed = %forced, "Name collision; exposing under a hashed name.");
            name = forced;
        }
        let raw = if name == item.key {
            item.raw.clone()
        } else {
            rename(&item.raw, &name)
        };
        (name, raw)
    }

    pub fn tool(&self, exposed: &str) -> Option<&Target> {
        self.tool_index.get(exposed)
    }

    pub fn prompt(&self, exposed: &str) -> Option<&Target> {
        self.prompt_index.get(exposed)
    }

    /// The server that owns a resource URI: listed resources first, then templates.
    pub fn resource_owner(&self, uri: &str) -> Option<&Arc<str>> {
        self.resource_index.get(uri).or_else(|| {
            self.template_index
                .iter()
                .find(|(t, _)| t.matches(uri))
                .map(|(_, s)| s)
        })
    }

    /// The server that owns a template by its exact `uriTemplate` text (for completions).
    pub fn template_owner(&self, uri_template: &str) -> Option<&Arc<str>> {
        self.template_index
            .iter()
            .find(|(t, _)| t.source == uri_template)
            .map(|(_, s)| s)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Tool,
    Prompt,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Prompt => "prompt",
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The name a client sees for `name` of `server` under `prefix`.
///
/// Valid names pass unchanged; others are sanitized and, when changed or too long, shortened
/// to a readable head plus a hash of the original, so distinct tools never share a name.
pub fn exposed_name(prefix: &str, name: &str, server: &str) -> String {
    let joined = if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}{SEPARATOR}{name}")
    };
    if valid_name(&joined) {
        joined
    } else {
        hashed_name(&joined, server, name)
    }
}

/// `head_hash`: at most 64 characters from the allowed set, unique per (server, name).
pub fn hashed_name(joined: &str, server: &str, name: &str) -> String {
    let mut h = Sha256::new();
    h.update(server.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    let digest = h.finalize();
    let hash: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
    let head: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME - hash.len() - 1)
        .collect();
    format!("{head}_{hash}")
}

/// A copy of a list item with `name` replaced; other fields stay byte for byte.
fn rename(item: &RawValue, name: &str) -> Arc<RawValue> {
    match RawMap::parse(item.get()) {
        Ok(mut m) => {
            m.set_str("name", name);
            Arc::from(m.to_raw())
        }
        Err(_) => Arc::from(raw(item.get())),
    }
}

/// Extracts list items with their key field; items without it are skipped.
pub fn items(list: &RawValue, key: &str) -> Vec<Item> {
    let Ok(values) = serde_json::from_str::<Vec<Box<RawValue>>>(list.get()) else {
        return Vec::new();
    };
    values
        .into_iter()
        .filter_map(|v| {
            let k = RawMap::parse(v.get()).ok()?.get_str(key)?;
            Some(Item {
                key: k,
                raw: Arc::from(v),
            })
        })
        .collect()
}

/// Writes one page of `items` as `{"<field>":[...],"nextCursor":...}`.
pub fn page(
    items: &[Arc<RawValue>],
    field: &str,
    cursor: Option<&str>,
    size: usize,
) -> Result<String, CursorError> {
    let start = match cursor {
        None => 0,
        Some(c) => decode_cursor(c)
            .filter(|&o| o <= items.len())
            .ok_or(CursorError)?,
    };
    let end = start.saturating_add(size).min(items.len());
    let slice = &items[start..end];
    let bytes: usize = slice.iter().map(|i| i.get().len() + 1).sum();
    let mut out = String::with_capacity(bytes + field.len() + 48);
    out.push_str("{\"");
    out.push_str(field);
    out.push_str("\":[");
    for (i, item) in slice.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item.get());
    }
    out.push(']');
    if end < items.len() {
        out.push_str(",\"nextCursor\":\"");
        out.push_str(&encode_cursor(end));
        out.push('"');
    }
    out.push('}');
    Ok(out)
}

/// A cursor the relay did not issue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cursor")]
pub struct CursorError;

const CURSOR_TAG: &str = "mcp-relay:1:";

fn encode_cursor(offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_TAG}{offset}"))
}

fn decode_cursor(c: &str) -> Option<usize> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    text.strip_prefix(CURSOR_TAG)?.parse().ok()
}

/// A URI template (RFC 6570 subset) used to route reads of templated resources.
#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    /// A variable; `true` when it may span `/` (`{+x}`, `{#x}`, `{x*}`, `{/x}`).
    Var(bool),
}

impl Template {
    pub fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                parts.push(Part::Literal(rest[open..].to_owned()));
                rest = "";
                break;
            };
            let expr = &rest[open + 1..open + close];
            let spans =
                expr.starts_with(['+', '#', '/', '.', '?', '&', ';']) || expr.ends_with('*');
            parts.push(Part::Var(spans));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Template {
            source: s.to_owned(),
            parts,
        }
    }

    pub fn matches(&self, uri: &str) -> bool {
        match_parts(&self.parts, uri)
    }
}

fn match_parts(parts: &[Part], s: &str) -> bool {
    match parts.split_first() {
        None => s.is_empty(),
        Some((Part::Literal(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|t| match_parts(rest, t)),
        Some((Part::Var(spans), rest)) => {
            // Try every split point; templates are short, so this stays cheap.
            let limit = if *spans {
                s.len()
            } else {
                s.find('/').unwrap_or(s.len())
            };
            (1..=limit)
                .filter(|&i| s.is_char_boundary(i))
                .any(|i| match_parts(rest, &s[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::raw;

    fn item(key: &str, json: &str) -> Item {
        Item {
            key: key.into(),
            raw: Arc::from(raw(json)),
        }
    }

    #[test]
    fn names_are_valid_unique_and_deterministic() {
        assert_eq!(exposed_name("fs", "read_file", "fs"), "fs__read_file");
        assert_eq!(exposed_name("", "echo", "e"), "echo");
        let long = "x".repeat(80);
        let a = exposed_name("srv", &long, "srv");
        assert!(valid_name(&a) && a.len() <= MAX_NAME, "{a}");
        assert_eq!(a, exposed_name("srv", &long, "srv"));
        let dotted = exposed_name("srv", "get.thing", "srv");
        let spaced = exposed_name("srv", "get thing", "srv");
        assert!(valid_name(&dotted) && valid_name(&spaced));
        assert_ne!(dotted, spaced);
        assert!(dotted.starts_with("srv__get_thing_"));
    }

    #[test]
    fn build_renames_keeps_fields_and_resolves_collisions() {
        let a = Lists {
            tools: vec![item(
                "echo",
                r#"{"name":"echo","x-v":{"k":[1,2.50]},"execution":{"taskSupport":"optional"}}"#,
            )],
            ..Lists::default()
        };
        let b = Lists {
            tools: vec![item("echo", r#"{"name":"echo"}"#)],
            ..Lists::default()
        };
        let c = Catalog::build(&[
            Source {
                server: "a",
                prefix: "",
                lists: &a,
            },
            Source {
                server: "b",
                prefix: "",
                lists: &b,
            },
        ]);
        assert_eq!(
            c.tools[0].get(),
            r#"{"name":"echo","x-v":{"k":[1,2.50]},"execution":{"taskSupport":"optional"}}"#
        );
        assert_eq!(c.tool("echo").map(|t| &*t.server), Some("a"));
        assert_eq!(c.collisions.len(), 1);
        let forced = c.tools[1].get();
        assert!(forced.contains("\"echo_"), "{forced}");
        let c2 = Catalog::build(&[Source {
            server: "a",
            prefix: "a",
            lists: &a,
        }]);
        assert!(c2.tools[0].get().starts_with(r#"{"name":"a__echo","x-v""#));
        assert_eq!(c2.tool("a__echo").map(|t| &*t.name), Some("echo"));
    }

    #[test]
    fn pagination_round_trips_and_rejects_forged_cursors() -> Result<(), CursorError> {
        let items: Vec<Arc<RawValue>> = (0..5).map(|i| Arc::from(raw(&i.to_string()))).collect();
        let p1 = page(&items, "tools", None, 2)?;
        assert!(p1.starts_with(r#"{"tools":[0,1],"nextCursor":""#), "{p1}");
        let cursor = p1.split('"').nth(5).unwrap_or_default().to_owned();
        let p2 = page(&items, "tools", Some(&cursor), 10)?;
        assert_eq!(p2, r#"{"tools":[2,3,4]}"#);
        assert_eq!(page(&items, "tools", Some("nope"), 2), Err(CursorError));
        assert_eq!(
            page(&items, "tools", Some(&encode_cursor(99)), 2),
            Err(CursorError)
        );
        Ok(())
    }

    #[test]
    fn templates_match() {
        let t = Template::parse("test://template/{id}/data");
        assert!(t.matches("test://template/42/data"));
        assert!(!t.matches("test://template/4/2/data"));
        assert!(!t.matches("test://template//data"));
        assert!(Template::parse("file://{+path}").matches("file:///a/b/c"));
    }
}
