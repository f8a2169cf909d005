//! The local ranker: BM25F over a tool's fields (name, title, description, input-schema
//! properties, its server), built once per catalog snapshot from cached per-tool terms.
//!
//! Deterministic: equal scores are ordered by tool id. No I/O, no model.

use super::text;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

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
    /// How the server calls itself in a few words (its title, else its name).
    pub server_label: String,
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
            server_label: server.to_owned(),
        }
    }

    /// The text an embedding model reads for this tool: `name: description (server)`.
    pub fn embedding_text(&self) -> String {
        let mut out = format!("{}: {}", self.name, self.description);
        if !self.server_label.is_empty() {
            out.push_str(&format!(" ({})", self.server_label));
        }
        out
    }
}

impl ToolDoc {
    /// A line of a catalog file (`mcp-relay tools rank`, `tests/data/toolsel`): `id` (else
    /// `name`), `name`, `description`, optional `server`, `server_title`,
    /// `server_description`, `title`, `input_schema` or `inputSchema`.
    pub fn from_catalog_line(line: &Value) -> Option<ToolDoc> {
        let text = |key: &str| line.get(key).and_then(Value::as_str).unwrap_or_default();
        let id = Some(text("id"))
            .filter(|i| !i.is_empty())
            .unwrap_or(text("name"));
        if id.is_empty() {
            return None;
        }
        let server_text = format!("{} {}", text("server_title"), text("server_description"));
        let mut doc = ToolDoc::from_tool(id.to_owned(), text("server"), server_text.trim(), line);
        if !text("server_title").is_empty() {
            doc.server_label = text("server_title").to_owned();
        }
        Some(doc)
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
    pub k1: f64,
    /// Per field: weight and length normalization `b` (name, title, description,
    /// params, server).
    pub weights: [f64; FIELDS],
    pub b: [f64; FIELDS],
    /// Each tool also gets this share of the best score among its server's tools: a task
    /// that needs one tool of a server usually needs its siblings too.
    pub server_boost: f64,
}

impl Default for Params {
    /// Measured on the labelled sets of `tests/data/toolsel` (see docs/benchmarks.md): the
    /// name counts double, schema properties only through their rarity (weight 0: with any
    /// weight they added noise), the server's text a little; one `b` for all fields.
    fn default() -> Self {
        Params {
            k1: 1.2,
            weights: [2.0, 1.0, 1.0, 0.0, 0.3],
            b: [0.75; FIELDS],
            server_boost: 0.5,
        }
    }
}

/// A tool's terms per field, computed once and reused across catalog snapshots.
#[derive(Debug)]
pub struct Analyzed {
    pub doc: ToolDoc,
    fields: [Vec<String>; FIELDS],
    /// The tool's embedding under the configured model, computed on first use (`None`: the
    /// model could not read the text).
    pub vector: OnceLock<Option<Arc<[f32]>>>,
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
        Analyzed {
            doc,
            fields,
            vector: OnceLock::new(),
        }
    }
}

/// One ranked tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Position in the index's documents.
    pub doc: usize,
    pub score: f64,
    /// The query terms it matched, best first (for the one-line reason).
    pub matched: Vec<String>,
    /// Cosine similarity of the prompt and the tool under the embedding model, if one ranked.
    pub similarity: Option<f64>,
}

/// An immutable BM25F index over a catalog's tools.
#[derive(Debug, Default)]
pub struct Index {
    docs: Vec<Arc<Analyzed>>,
    /// term → (idf, [(doc, pseudo term frequency after field weighting and length
    /// normalization)]); a term's document frequency counts every field.
    postings: HashMap<String, (f64, Vec<(u32, f64)>)>,
    /// Each document's server group (documents of one server share a group).
    group: Vec<u32>,
    groups: usize,
    params: Params,
}

impl Index {
    pub fn build(docs: Vec<Arc<Analyzed>>, params: Params) -> Index {
        let n = docs.len().max(1) as f64;
        let mut avg = [0f64; FIELDS];
        for d in &docs {
            for (f, terms) in d.fields.iter().enumerate() {
                avg[f] += terms.len() as f64;
            }
        }
        for a in &mut avg {
            *a /= n;
        }
        let mut postings: HashMap<String, (f64, Vec<(u32, f64)>)> = HashMap::new();
        let mut tf: HashMap<&str, f64> = HashMap::new();
        let mut groups: HashMap<&str, u32> = HashMap::new();
        let mut group = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            let key = if d.doc.server.is_empty() {
                d.doc.id.as_str()
            } else {
                d.doc.server.as_str()
            };
            let next = u32::try_from(groups.len()).unwrap_or(u32::MAX);
            group.push(*groups.entry(key).or_insert(next));
            tf.clear();
            for (f, terms) in d.fields.iter().enumerate() {
                let norm = 1.0 - params.b[f] + params.b[f] * terms.len() as f64 / avg[f].max(1e-6);
                let w = params.weights[f] / norm;
                for t in terms {
                    *tf.entry(t.as_str()).or_default() += w;
                }
            }
            let Ok(i) = u32::try_from(i) else { break };
            for (t, w) in &tf {
                let entry = postings.entry((*t).to_owned()).or_default();
                // Document frequency counts the document even where the weight is 0.
                entry.0 += 1.0;
                if *w > 0.0 {
                    entry.1.push((i, *w));
                }
            }
        }
        for (df, _) in postings.values_mut() {
            *df = (1.0 + (n - *df + 0.5) / (*df + 0.5)).ln();
        }
        let groups = groups.len();
        Index {
            docs,
            postings,
            group,
            groups,
            params,
        }
    }

    /// How many tools the index holds.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The analyzed tools, in index order.
    pub fn analyzed(&self) -> &[Arc<Analyzed>] {
        &self.docs
    }

    pub fn doc(&self, i: usize) -> Option<&ToolDoc> {
        self.docs.get(i).map(|d| &d.doc)
    }

    /// The best `limit` tools for `query`, best first; tools that neither match a query
    /// term nor share a server with one that does are left out.
    pub fn rank(&self, query: &str, limit: usize) -> Vec<Hit> {
        let mut q = text::tokenize(query);
        q.sort();
        let k1 = self.params.k1;
        let mut scores = vec![0f64; self.docs.len()];
        let mut contributions: HashMap<u32, Vec<(f64, usize)>> = HashMap::new();
        let mut qi = 0;
        while qi < q.len() {
            // A term repeated in the query counts as often as it appears.
            let mut end = qi + 1;
            while end < q.len() && q[end] == q[qi] {
                end += 1;
            }
            let qtf = (end - qi) as f64;
            if let Some((idf, list)) = self.postings.get(&q[qi]) {
                for &(d, tf) in list {
                    let s = qtf * idf * tf * (k1 + 1.0) / (tf + k1);
                    scores[d as usize] += s;
                    contributions.entry(d).or_default().push((s, qi));
                }
            }
            qi = end;
        }
        let boost = self.params.server_boost;
        if boost > 0.0 {
            let mut best = vec![0f64; self.groups];
            for (d, s) in scores.iter().enumerate() {
                let g = self.group[d] as usize;
                best[g] = best[g].max(*s);
            }
            for (d, s) in scores.iter_mut().enumerate() {
                *s += boost * best[self.group[d] as usize];
            }
        }
        let mut hits: Vec<usize> = (0..self.docs.len()).filter(|&d| scores[d] > 0.0).collect();
        let order = |a: &usize, b: &usize| {
            scores[*b]
                .total_cmp(&scores[*a])
                .then_with(|| self.docs[*a].doc.id.cmp(&self.docs[*b].doc.id))
        };
        if hits.len() > limit {
            hits.select_nth_unstable_by(limit, order);
            hits.truncate(limit);
        }
        hits.sort_by(order);
        hits.into_iter()
            .map(|d| {
                let mut c = u32::try_from(d)
                    .ok()
                    .and_then(|k| contributions.remove(&k))
                    .unwrap_or_default();
                c.sort_by(|a, b| b.0.total_cmp(&a.0));
                Hit {
                    doc: d,
                    score: scores[d],
                    matched: c.into_iter().map(|(_, qi)| q[qi].clone()).collect(),
                    similarity: None,
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
