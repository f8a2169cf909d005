//! `mcp-relay tools rank`: the ranking of `relay__analyze_prompt`, offline, over a catalog
//! file, for measuring it on labelled data (`tests/data/toolsel`, `docs/benchmarks.md`).

use crate::selection::{self, rank::ToolDoc};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;

fn lines(path: &Path) -> Result<Vec<Value>, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: not JSON ({e})", path.display(), n + 1))?;
        out.push(v);
    }
    Ok(out)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// What `tools rank` is asked to do.
pub struct RankArgs<'a> {
    pub catalog: &'a Path,
    pub queries: &'a Path,
    pub top: usize,
    pub scores: bool,
    /// An embedding model directory and its weight (`toolFiltering.embeddings`).
    pub embeddings: Option<(&'a Path, f64)>,
}

pub fn rank(args: RankArgs<'_>) -> ExitCode {
    let RankArgs {
        catalog,
        queries,
        top,
        scores,
        embeddings,
    } = args;
    let run = || -> Result<(), String> {
        let docs: Vec<ToolDoc> = lines(catalog)?
            .iter()
            .filter_map(ToolDoc::from_catalog_line)
            .collect();
        let index = selection::build_index(docs);
        let semantic = match embeddings {
            Some((dir, weight)) => {
                let model = selection::embed::shared(dir).map_err(|e| e.to_string())?;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                Some(selection::Semantic::build(model, weight, &index, threads))
            }
            None => None,
        };
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let queries = lines(queries)?;
        // Rankings are independent: with a model (milliseconds per prompt) they are spread
        // over the cores; the output keeps the queries' order.
        let rank =
            |q: &Value| selection::rank_index(&index, semantic.as_ref(), text(q, "query"), top);
        let threads = if semantic.is_some() {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            1
        };
        let ranked = selection::spread(&queries, threads, rank)
            .ok_or_else(|| "a ranking thread failed".to_owned())?;
        for (q, hits) in queries.iter().zip(ranked) {
            let ranked: Vec<&str> = hits
                .iter()
                .filter_map(|h| index.doc(h.doc).map(|d| d.id.as_str()))
                .collect();
            let mut line = serde_json::json!({"id": q.get("id").cloned().unwrap_or(Value::Null), "ranked": ranked});
            if scores {
                line["scores"] = hits.iter().map(|h| h.score).collect::<Vec<_>>().into();
            }
            writeln!(out, "{line}").map_err(|e| format!("cannot write: {e}"))?;
        }
        out.flush().map_err(|e| format!("cannot write: {e}"))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-relay: {e}");
            ExitCode::FAILURE
        }
    }
}
