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

pub fn rank(catalog: &Path, queries: &Path, top: usize) -> ExitCode {
    let run = || -> Result<(), String> {
        let docs: Vec<ToolDoc> = lines(catalog)?
            .iter()
            .filter_map(ToolDoc::from_catalog_line)
            .collect();
        let index = selection::build_index(docs);
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        for q in lines(queries)? {
            let hits = selection::rank_index(&index, text(&q, "query"), top);
            let ranked: Vec<&str> = hits
                .iter()
                .filter_map(|h| index.doc(h.doc).map(|d| d.id.as_str()))
                .collect();
            let line = serde_json::json!({"id": q.get("id").cloned().unwrap_or(Value::Null), "ranked": ranked});
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
