//! The local ranker: BM25F over a tool's fields (name, title, description, input-schema
//! properties, its server), built once per catalog snapshot from cached per-tool terms.
//!
//! Deterministic: equal scores are ordered by tool id. No I/O, no model.

use super::text;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// The text of one tool, split into the fields the ranker weighs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolDoc {
    /// What a ranking returns: the exposed name in the relay, `server/tool` in a catalog file.
    pub id: String,
    pub server: String,
    /// The tool's own name.
    pub name: String,
    pub title: String,
    pub description: String,
    /// Input-schema property names and their descriptions.
    pub params: String,
    /// The server's name, title and description.
    pub server_text: String,
}

impl ToolDoc {
    /// From a tool definition as MCP lists it (`name`, `title`, `description`,
    /// `inputSchema`, `annotations.title`).
    pub fn from_tool(id: String, server: &str, server_text: &str, tool: &Value) -> ToolDoc {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut title = s(tool.get("title"));
        let annotated = s(tool.get("annotations").and_then(|a| a.get("title")));
        if title.is_empty() {
            title = annotated;
        }
        ToolDoc {
            id,
            server: server.to_owned(),
            name: s(tool.get("name")),
            title,
            description: s(tool.get("description")),
            params: schema_text(tool.get("inputSchema").or_else(|| tool.get("input_schema"))),
            server_text: format!("{server} {server_text}"),
        }
    }
}

/// Property names and descriptions of a JSON schema, one level of nesting deep.
pub fn schema_text(schema: Option<&Value>) -> String {
    let mut out = String::new();
    let visit = |props: &serde_json::Map<String, Value>, out: &mut String| {
        for (name, p) in props {
            out.push_str(name);
            out.push(' ');
            if let Some(d) = p.get("description").and_then(Value::as_str) {
                out.push_str(d);
                out.push(' ');
            }
        }
    };
    if let Some(props) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    {
        visit(props, &mut out);
        for p in props.values() {
            let nested = p
                .get("properties")
                .or_else(|| p.get("items").and_then(|i| i.get("properties")))
                .and_then(Value::as_object);
            if let Some(n) = nested {
                visit(n, &mut out);
            }
        }
    }
    out
}

/// Fields in the order of [`Params::weights`].
const FIELDS: usize = 5;

/// The ranker's constants.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Term-frequency saturation.
    pub k1: f32,
    /// Per field: weight and length normalization `b` (name, title, description,
    /// params, server).
    pub weights: [f32; FIELDS],
    pub b: [f32; FIELDS],
}

impl Default for Params {
    fn default() -> Self {
        Params {
            k1: 1.2,
            weights: [3.0, 2.0, 1.0, 0.5, 0.5],
            b: [0.3, 0.3, 0.75, 0.75, 0.75],
        }
    }
}

/// A tool's terms per field, computed once and reused across catalog snapshots.
#[derive(Debug)]
pub struct Analyzed {
    pub doc: ToolDoc,
    fields: [Vec<String>; FIELDS],
}

impl Analyzed {
    pub fn new(doc: ToolDoc) -> Analyzed {
        let fields = [
            text::tokenize(&doc.name),
            text::tokenize(&doc.title),
            text::tokenize(&doc.description),
            text::tokenize(&doc.params),
            text::tokenize(&doc.server_text),
        ];
        Analyzed { doc, fields }
    }

    fn has_text(&self) -> bool {
        self.fields.iter().any(|f| !f.is_empty())
    }
}

/// One ranked tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Position in the index's documents.
    pub doc: usize,
    pub score: f32,
    /// The query terms it matched, best first (for the one-line reason).
    pub matched: Vec<String>,
}

/// An immutable BM25F index over a catalog's tools.
#[derive(Debug, Default)]
pub struct Index {
    docs: Vec<Arc<Analyzed>>,
    /// term → (doc, pseudo term frequency after field weighting and length normalization)
    postings: HashMap<String, Vec<(u32, f32)>>,
    params: Params,
}

impl Index {
    pub fn build(docs: Vec<Arc<Analyzed>>, params: Params) -> Index {
        let n = docs.len().max(1) as f32;
        let mut avg = [0f32; FIELDS];
        for d in &docs {
            for (f, terms) in d.fields.iter().enumerate() {
                avg[f] += terms.len() as f32;
            }
        }
        for a in &mut avg {
            *a = (*a / n).max(1.0);
        }
        let mut postings: HashMap<String, Vec<(u32, f32)>> = HashMap::new();
        let mut tf: HashMap<&str, f32> = HashMap::new();
        for (i, d) in docs.iter().enumerate() {
            tf.clear();
            for (f, terms) in d.fields.iter().enumerate() {
                let norm = 1.0 - params.b[f] + params.b[f] * terms.len() as f32 / avg[f];
                let w = params.weights[f] / norm;
                for t in terms {
                    *tf.entry(t.as_str()).or_default() += w;
                }
            }
            let Ok(i) = u32::try_from(i) else { break };
            for (t, w) in &tf {
                postings.entry((*t).to_owned()).or_default().push((i, *w));
            }
        }
        Index {
            docs,
            postings,
            params,
        }
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    pub fn doc(&self, i: usize) -> Option<&ToolDoc> {
        self.docs.get(i).map(|d| &d.doc)
    }

    /// Whether any tool has text to match (a catalog of bare names still has its names).
    pub fn has_text(&self) -> bool {
        self.docs.iter().any(|d| d.has_text())
    }

    /// The best `limit` tools for `query`, best first; tools matching no query term are
    /// left out.
    pub fn rank(&self, query: &str, limit: usize) -> Vec<Hit> {
        let mut q = text::tokenize(query);
        q.sort();
        q.dedup();
        let n = self.docs.len() as f32;
        let k1 = self.params.k1;
        let mut scores = vec![0f32; self.docs.len()];
        let mut contributions: Vec<Vec<(f32, usize)>> = vec![Vec::new(); self.docs.len()];
        for (qi, term) in q.iter().enumerate() {
            let Some(list) = self.postings.get(term) else {
                continue;
            };
            let df = list.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(d, tf) in list {
                let s = idf * tf * (k1 + 1.0) / (tf + k1);
                scores[d as usize] += s;
                contributions[d as usize].push((s, qi));
            }
        }
        let mut hits: Vec<usize> = (0..self.docs.len()).filter(|&d| scores[d] > 0.0).collect();
        hits.sort_by(|&a, &b| {
            scores[b]
                .total_cmp(&scores[a])
                .then_with(|| self.docs[a].doc.id.cmp(&self.docs[b].doc.id))
        });
        hits.truncate(limit);
        hits.into_iter()
            .map(|d| {
                let mut c = std::mem::take(&mut contributions[d]);
                c.sort_by(|a, b| b.0.total_cmp(&a.0));
                Hit {
                    doc: d,
                    score: scores[d],
                    matched: c.into_iter().map(|(_, qi)| q[qi].clone()).collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index(tools: &[(&str, &str, Value)]) -> Index {
        let docs = tools
            .iter()
            .map(|(server, text, tool)| {
                let name = tool["name"].as_str().unwrap_or_default();
                Arc::new(Analyzed::new(ToolDoc::from_tool(
                    format!("{server}/{name}"),
                    server,
                    text,
                    tool,
                )))
            })
            .collect();
        Index::build(docs, Params::default())
    }

    fn ids(ix: &Index, q: &str) -> Vec<String> {
        ix.rank(q, 10)
            .iter()
            .filter_map(|h| ix.doc(h.doc).map(|d| d.id.clone()))
            .collect()
    }

    #[test]
    fn ranks_by_name_description_and_schema() {
        let ix = index(&[
            (
                "fs",
                "Filesystem access",
                json!({"name": "read_text_file", "description": "Read a file from disk.", "inputSchema": {"properties": {"path": {"description": "File path"}}}}),
            ),
            (
                "fs",
                "Filesystem access",
                json!({"name": "list_directory", "description": "List entries of a directory."}),
            ),
            (
                "weather",
                "Forecasts",
                json!({"name": "get_forecast", "description": "Weather forecast for a city.", "inputSchema": {"properties": {"city": {}}}}),
            ),
        ]);
        assert_eq!(ids(&ix, "read the file notes.txt")[0], "fs/read_text_file");
        assert_eq!(
            ids(&ix, "what's the weather in Paris")[0],
            "weather/get_forecast"
        );
        assert_eq!(ids(&ix, "forecast for my city")[0], "weather/get_forecast");
        assert!(ids(&ix, "zebra xylophone").is_empty());
    }

    #[test]
    fn ties_are_broken_by_id() {
        let ix = index(&[
            ("b", "", json!({"name": "search"})),
            ("a", "", json!({"name": "search"})),
        ]);
        assert_eq!(ids(&ix, "search"), ["a/search", "b/search"]);
    }

    #[test]
    fn matches_chinese_descriptions() {
        let ix = index(&[
            (
                "bing",
                "",
                json!({"name": "bing_search", "description": "使用必应搜索指定的关键词"}),
            ),
            (
                "map",
                "",
                json!({"name": "route", "description": "规划路线"}),
            ),
        ]);
        assert_eq!(ids(&ix, "搜索关键词")[0], "bing/bing_search");
    }
}
