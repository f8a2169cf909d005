//! `toolFiltering`: which tools a session sees (all, a static allow/deny list, or the tools
//! `relay__analyze_prompt` picked for it), and the optional LLM that helps pick.

use super::Validator;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// How the tool list of a session is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every tool of every server.
    #[default]
    All,
    /// Every tool the per-server allow/deny rules let through.
    Static,
    /// What `relay__analyze_prompt` picked for the session (from the tools the rules let
    /// through), starting from `defaultExposure`.
    Prompt,
}

/// What a session in prompt mode sees before it analyzes a prompt (and after a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exposure {
    /// The selection tools and the management tools.
    #[default]
    MetaOnly,
    /// The selection tools only.
    None,
    /// The selection tools and every tool.
    All,
}

/// Allow/deny globs (`*`, `?`, `[...]`) over one server's original tool names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolRules {
    /// When not empty, only tools matching one of these are kept.
    pub allow: Vec<glob::Pattern>,
    /// Tools matching one of these are removed (after `allow`).
    pub deny: Vec<glob::Pattern>,
}

impl ToolRules {
    pub fn permits(&self, tool: &str) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|p| p.matches(tool)))
            && !self.deny.iter().any(|p| p.matches(tool))
    }
}

/// An OpenAI-compatible chat model that picks among the local ranker's candidates.
/// (`Debug` masks the key.)
#[derive(Clone, PartialEq)]
pub struct LlmSettings {
    /// Base URL of the API, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`;
    /// the relay posts to `<baseUrl>/chat/completions`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set (usually `${OPENAI_API_KEY}`).
    pub api_key: Option<String>,
    /// Default 5 s.
    pub timeout: Duration,
    /// Answers whose confidence is below this are ignored (default 0.5).
    pub confidence_threshold: f64,
    /// Use the local ranking when the model fails, times out or is unsure (default true);
    /// when false, `relay__analyze_prompt` reports the model's failure instead.
    pub fallback_to_local: bool,
    /// How many of the local ranker's best tools the model chooses from (default 30).
    pub candidates: usize,
}

impl std::fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmSettings")
            .field("base_url", &super::redact::url(&self.base_url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("confidence_threshold", &self.confidence_threshold)
            .field("fallback_to_local", &self.fallback_to_local)
            .field("candidates", &self.candidates)
            .finish()
    }
}

/// A sentence-embedding model on disk that re-ranks the local ranking by meaning
/// (`toolFiltering.embeddings`).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSettings {
    /// A directory in the sentence-transformers layout (`config.json`, `tokenizer.json`,
    /// `model.safetensors`) of a BERT-family encoder, e.g. all-MiniLM-L6-v2.
    pub model: std::path::PathBuf,
    /// The share of the meaning in a tool's score, 0 to 1 (default 0.6); the rest is the
    /// local ranker's. Both are standardized over the catalog before they are mixed.
    pub weight: f64,
}

/// The whole `toolFiltering` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolFiltering {
    pub mode: Mode,
    pub default_exposure: Exposure,
    /// Tools one `relay__analyze_prompt` exposes at most (`maxTools`, default 10).
    pub max_tools: usize,
    /// Tools a session keeps exposed across prompts at most (`maxExposed`, default 30):
    /// the newest prompt's picks first, the oldest picks dropped beyond it.
    pub max_exposed: usize,
    /// Per server name.
    pub servers: BTreeMap<String, ToolRules>,
    pub llm: Option<LlmSettings>,
    pub embeddings: Option<EmbeddingSettings>,
}

impl Default for ToolFiltering {
    fn default() -> Self {
        ToolFiltering {
            mode: Mode::All,
            default_exposure: Exposure::MetaOnly,
            max_tools: 10,
            max_exposed: 30,
            servers: BTreeMap::new(),
            llm: None,
            embeddings: None,
        }
    }
}

impl ToolFiltering {
    /// Whether the rules let a server's tool through (always, in mode `all`).
    pub fn permits(&self, server: &str, tool: &str) -> bool {
        self.mode == Mode::All || self.servers.get(server).is_none_or(|r| r.permits(tool))
    }
}

const KEYS: &[&str] = &[
    "mode",
    "defaultExposure",
    "maxTools",
    "maxExposed",
    "servers",
    "llmCategorization",
    "embeddings",
];
const LLM_KEYS: &[&str] = &[
    "provider",
    "baseUrl",
    "model",
    "apiKey",
    "timeoutMs",
    "confidenceThreshold",
    "fallbackToLocal",
    "candidates",
];

/// The spellings of [`Mode`] and [`Exposure`] in the file (and in status output).
const MODES: &[(&str, Mode)] = &[
    ("all", Mode::All),
    ("static", Mode::Static),
    ("prompt", Mode::Prompt),
];
const EXPOSURES: &[(&str, Exposure)] = &[
    ("meta-only", Exposure::MetaOnly),
    ("none", Exposure::None),
    ("all", Exposure::All),
];

fn label<T: PartialEq>(table: &[(&'static str, T)], v: &T) -> &'static str {
    table.iter().find(|(_, x)| x == v).map_or("", |(n, _)| n)
}

impl Mode {
    pub fn label(&self) -> &'static str {
        label(MODES, self)
    }
}

impl Exposure {
    pub fn label(&self) -> &'static str {
        label(EXPOSURES, self)
    }
}

impl Validator<'_> {
    /// A string setting that must be one of `table`'s names.
    pub(super) fn opt_choice<T: Copy>(
        &mut self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
        table: &[(&str, T)],
    ) -> Option<T> {
        let given = self.opt_string(map, at, key)?;
        let found = table.iter().find(|(n, _)| *n == given).map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<String> = table.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            self.problem(
                &format!("{at}.{key}"),
                format!(
                    "`{given}` is not a valid {key}; use one of {}",
                    names.join(", ")
                ),
            );
        }
        found
    }

    pub(super) fn tool_filtering(&mut self, v: &Value) -> ToolFiltering {
        let mut f = ToolFiltering::default();
        let at = "toolFiltering";
        let Some(map) = v.as_object() else {
            self.problem(at, "must be an object".into());
            return f;
        };
        self.unknown_keys(map, at, KEYS, "setting");
        if let Some(m) = self.opt_choice(map, at, "mode", MODES) {
            f.mode = m;
        }
        if let Some(e) = self.opt_choice(map, at, "defaultExposure", EXPOSURES) {
            f.default_exposure = e;
        }
        if let Some(n) = self.opt_usize(map, at, "maxTools", 1) {
            f.max_tools = n;
        }
        if let Some(n) = self.opt_usize(map, at, "maxExposed", 1) {
            f.max_exposed = n;
        }
        match map.get("servers") {
            None => {}
            Some(Value::Object(servers)) => {
                for (name, rules) in servers {
                    let at = format!("{at}.servers.{name}");
                    let Some(rules) = rules.as_object() else {
                        self.problem(&at, "must be an object with `allow` and/or `deny`".into());
                        continue;
                    };
                    self.unknown_keys(rules, &at, &["allow", "deny"], "setting");
                    let allow = self.globs(rules, &at, "allow");
                    let deny = self.globs(rules, &at, "deny");
                    f.servers.insert(name.clone(), ToolRules { allow, deny });
                }
            }
            Some(_) => self.problem(
                &format!("{at}.servers"),
                "must map server names to {\"allow\": [...], \"deny\": [...]}".into(),
            ),
        }
        if let Some(l) = map.get("llmCategorization") {
            f.llm = self.llm(l);
        }
        if let Some(e) = map.get("embeddings") {
            f.embeddings = self.embeddings(e);
        }
        if f.mode == Mode::All && !f.servers.is_empty() {
            self.warnings.push(format!(
                "{}: {at}.servers: allow/deny rules apply only in mode \"static\" or \"prompt\"; mode is \"all\"",
                self.file
            ));
        }
        f
    }

    pub(super) fn globs(
        &mut self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
    ) -> Vec<glob::Pattern> {
        let mut out = Vec::new();
        for (i, g) in self
            .opt_strings(map, at, key)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match glob::Pattern::new(&g) {
                Ok(p) => out.push(p),
                Err(e) => self.problem(
                    &format!("{at}.{key}[{i}]"),
                    format!("`{g}` is not a valid glob ({e})"),
                ),
            }
        }
        out
    }

    /// A number from 0 to 1 (`default` when absent or wrong, the latter reported).
    fn opt_share(&mut self, map: &Map<String, Value>, at: &str, key: &str, default: f64) -> f64 {
        match map.get(key) {
            None => default,
            Some(Value::Number(n)) if n.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)) => {
                n.as_f64().unwrap_or(default)
            }
            Some(_) => {
                self.problem(
                    &format!("{at}.{key}"),
                    "must be a number from 0 to 1".into(),
                );
                default
            }
        }
    }

    fn embeddings(&mut self, v: &Value) -> Option<EmbeddingSettings> {
        let at = "toolFiltering.embeddings";
        let Some(map) = v.as_object() else {
            self.problem(
                at,
                "must be an object with `model` (a directory) and optional `weight`".into(),
            );
            return None;
        };
        self.unknown_keys(map, at, &["model", "weight"], "setting");
        let Some(model) = self.opt_string(map, at, "model") else {
            self.problem(
                at,
                "needs `model`: the directory of a sentence-transformers model (config.json, tokenizer.json, model.safetensors)".into(),
            );
            return None;
        };
        let model = std::path::PathBuf::from(model);
        let missing: Vec<&str> = ["config.json", "tokenizer.json", "model.safetensors"]
            .into_iter()
            .filter(|f| !model.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            self.problem(
                &format!("{at}.model"),
                format!(
                    "{} has no {} (a sentence-transformers model directory is needed; nothing is downloaded)",
                    model.display(),
                    missing.join(", ")
                ),
            );
        }
        let weight = self.opt_share(map, at, "weight", 0.6);
        Some(EmbeddingSettings { model, weight })
    }

    fn llm(&mut self, v: &Value) -> Option<LlmSettings> {
        let at = "toolFiltering.llmCategorization";
        let Some(map) = v.as_object() else {
            self.problem(at, "must be an object".into());
            return None;
        };
        self.unknown_keys(map, at, LLM_KEYS, "setting");
        if let Some(p) = self.opt_string(map, at, "provider")
            && p != "openai-compatible"
        {
            self.problem(
                &format!("{at}.provider"),
                format!("`{p}` is not supported; use \"openai-compatible\" (OpenAI, Gemini's OpenAI endpoint, Ollama, vLLM, llama.cpp)"),
            );
        }
        let base_url = self.opt_string(map, at, "baseUrl");
        let model = self.opt_string(map, at, "model");
        let (Some(base_url), Some(model)) = (base_url, model) else {
            self.problem(at, "needs `baseUrl` and `model`".into());
            return None;
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            self.problem(
                &format!("{at}.baseUrl"),
                "must be an http:// or https:// URL".into(),
            );
        }
        let threshold = self.opt_share(map, at, "confidenceThreshold", 0.5);
        Some(LlmSettings {
            base_url: base_url.trim_end_matches('/').to_owned(),
            model,
            api_key: self.opt_string(map, at, "apiKey").filter(|k| !k.is_empty()),
            timeout: Duration::from_millis(self.opt_uint(map, at, "timeoutMs", 1).unwrap_or(5000)),
            confidence_threshold: threshold,
            fallback_to_local: self.opt_bool(map, at, "fallbackToLocal").unwrap_or(true),
            candidates: self.opt_usize(map, at, "candidates", 1).unwrap_or(30),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ToolFiltering, Vec<String>> {
        match super::super::parse(text, "relay.json", &|_| None) {
            Ok(c) => Ok(c.tool_filtering),
            Err(super::super::Error::Invalid(p)) => {
                Err(p.iter().map(ToString::to_string).collect())
            }
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    #[test]
    fn defaults_to_every_tool() -> Result<(), Vec<String>> {
        let f = parse(r#"{"mcpServers": {}}"#)?;
        assert_eq!(f.mode, Mode::All);
        assert!(f.permits("any", "thing"));
        Ok(())
    }

    #[test]
    fn static_rules_allow_then_deny() -> Result<(), Vec<String>> {
        let f = parse(
            r#"{"mcpServers": {}, "toolFiltering": {"mode": "static", "servers": {
                "fs": {"allow": ["read_*", "list_*"], "deny": ["*_media_*"]},
                "mem": {"deny": ["delete*"]}}}}"#,
        )?;
        assert!(f.permits("fs", "read_text_file"));
        assert!(!f.permits("fs", "read_media_file"));
        assert!(!f.permits("fs", "write_file"));
        assert!(f.permits("mem", "create_entities"));
        assert!(!f.permits("mem", "delete_entities"));
        assert!(f.permits("other", "anything"));
        Ok(())
    }

    #[test]
    fn embeddings_need_a_model_directory() -> Result<(), Vec<String>> {
        let Err(problems) = parse(
            r#"{"mcpServers": {}, "toolFiltering": {"mode": "prompt",
                "embeddings": {"model": "/nonexistent/model", "weight": 1.5, "x": 1}}}"#,
        ) else {
            panic!("a missing model directory was accepted");
        };
        let all = problems.join("\n");
        for needle in [
            "toolFiltering.embeddings.model: /nonexistent/model has no config.json, tokenizer.json, model.safetensors",
            "toolFiltering.embeddings.weight: must be a number from 0 to 1",
            "toolFiltering.embeddings.x: unknown setting",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let tmp = tempfile::tempdir().map_err(|e| vec![e.to_string()])?;
        let dir = tmp.path().to_owned();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::write(dir.join(f), "{}").map_err(|e| vec![e.to_string()])?;
        }
        let text = format!(
            r#"{{"mcpServers": {{}}, "toolFiltering": {{"mode": "prompt", "embeddings": {{"model": "{}"}}}}}}"#,
            dir.display()
        );
        let e = parse(&text)?
            .embeddings
            .ok_or_else(|| vec!["no embeddings".to_owned()])?;
        assert_eq!((e.model, e.weight), (dir, 0.6));
        Ok(())
    }

    #[test]
    fn reports_bad_values_with_paths() {
        let Err(problems) = parse(
            r#"{"mcpServers": {}, "toolFiltering": {"mode": "smart", "defaultExposure": 3,
                "maxTools": 0, "servers": {"fs": {"allow": ["[a"]}},
                "llmCategorization": {"provider": "x", "baseUrl": "ftp://h", "model": "m",
                "confidenceThreshold": 2}, "extra": 1}}"#,
        ) else {
            panic!("invalid filtering accepted");
        };
        let all = problems.join("\n");
        for needle in [
            "toolFiltering.mode: `smart` is not a valid mode",
            "toolFiltering.defaultExposure: must be a string",
            "toolFiltering.maxTools: must be a whole number of at least 1",
            "toolFiltering.servers.fs.allow[0]: `[a` is not a valid glob",
            "toolFiltering.llmCategorization.provider: `x` is not supported",
            "toolFiltering.llmCategorization.baseUrl: must be an http",
            "toolFiltering.llmCategorization.confidenceThreshold: must be a number from 0 to 1",
            "toolFiltering.extra: unknown setting",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
