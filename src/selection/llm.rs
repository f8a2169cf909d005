//! The optional LLM step of `relay__analyze_prompt`: an OpenAI-compatible chat model (OpenAI,
//! Gemini's OpenAI endpoint, Ollama, vLLM, llama.cpp) chooses among the local ranker's best
//! candidates. The caller falls back to the local ranking on any [`LlmError`].

use super::Pick;
use crate::config::filtering::LlmSettings;
use crate::config::redact;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why the model's choice was not used.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the model at {url} did not answer within {ms} ms")]
    Timeout { url: String, ms: u128 },
    #[error("the model at {url} could not be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the model at {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("the model's answer was not the JSON asked for: {0}")]
    BadAnswer(String),
    #[error("the model was not confident enough ({confidence:.2} < {threshold:.2})")]
    LowConfidence { confidence: f64, threshold: f64 },
}

/// Counters shown in `relay__status` (`toolSelection.llm`).
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub used: AtomicU64,
    pub failures: AtomicU64,
    pub timeouts: AtomicU64,
    pub low_confidence: AtomicU64,
    pub total_ms: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let calls = g(&self.calls);
        json!({
            "calls": calls,
            "used": g(&self.used),
            "failures": g(&self.failures),
            "timeouts": g(&self.timeouts),
            "lowConfidence": g(&self.low_confidence),
            "meanLatencyMs": g(&self.total_ms).checked_div(calls).unwrap_or(0),
        })
    }
}

/// Asks the model to choose at most `max` of `candidates` for `prompt`; returns the chosen
/// candidates in the model's order.
pub async fn choose(
    client: &reqwest::Client,
    settings: &LlmSettings,
    stats: &Stats,
    prompt: &str,
    candidates: &[(Pick, String)],
    max: usize,
) -> Result<Vec<Pick>, LlmError> {
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let out = ask(client, settings, prompt, candidates, max).await;
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    stats.total_ms.fetch_add(ms, Ordering::Relaxed);
    match &out {
        Ok(_) => stats.used.fetch_add(1, Ordering::Relaxed),
        Err(LlmError::Timeout { .. }) => stats.timeouts.fetch_add(1, Ordering::Relaxed),
        Err(LlmError::LowConfidence { .. }) => stats.low_confidence.fetch_add(1, Ordering::Relaxed),
        Err(_) => stats.failures.fetch_add(1, Ordering::Relaxed),
    };
    out
}

async fn ask(
    client: &reqwest::Client,
    settings: &LlmSettings,
    prompt: &str,
    candidates: &[(Pick, String)],
    max: usize,
) -> Result<Vec<Pick>, LlmError> {
    let url = format!("{}/chat/completions", settings.base_url);
    let shown = redact::url(&url);
    let mut list = String::new();
    for (p, description) in candidates {
        list.push_str("- ");
        list.push_str(&p.name);
        list.push_str(": ");
        list.push_str(super::truncate(description, 300));
        list.push('\n');
    }
    let body = json!({
        "model": settings.model,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": "You choose the tools an AI assistant needs for a task. Answer only with a JSON object {\"tools\": [tool names, most useful first], \"confidence\": a number from 0 to 1 saying how sure you are}. Use only names from the list; leave out tools the task does not need."},
            {"role": "user", "content": format!("Task:\n{}\n\nChoose at most {max} of these tools:\n{list}", super::truncate(prompt, super::MAX_PROMPT_BYTES))},
        ],
    });
    let mut req = client.post(&url).json(&body).timeout(settings.timeout);
    if let Some(key) = &settings.api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_timeout() {
            LlmError::Timeout {
                url: shown.clone(),
                ms: settings.timeout.as_millis(),
            }
        } else {
            LlmError::Unreachable {
                url: shown.clone(),
                reason: redact::url(&e.without_url().to_string()),
            }
        }
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(LlmError::Status {
            url: shown,
            status: status.as_u16(),
        });
    }
    let answer: Value = resp.json().await.map_err(|e| {
        if e.is_timeout() {
            LlmError::Timeout {
                url: shown.clone(),
                ms: settings.timeout.as_millis(),
            }
        } else {
            LlmError::BadAnswer(e.without_url().to_string())
        }
    })?;
    let content = answer
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| LlmError::BadAnswer("no choices[0].message.content".into()))?;
    let (names, confidence) = parse_choice(content)?;
    if confidence < settings.confidence_threshold {
        return Err(LlmError::LowConfidence {
            confidence,
            threshold: settings.confidence_threshold,
        });
    }
    let mut chosen: Vec<Pick> = Vec::new();
    for n in names {
        if let Some((p, _)) = candidates.iter().find(|(p, _)| p.name == n)
            && !chosen.iter().any(|c| c.name == p.name)
        {
            let mut p = p.clone();
            p.reason = format!("chosen by {} ({})", settings.model, p.reason);
            chosen.push(p);
        }
    }
    chosen.truncate(max);
    if chosen.is_empty() {
        return Err(LlmError::BadAnswer(
            "it named none of the candidate tools".into(),
        ));
    }
    Ok(chosen)
}

/// `{"tools": [...], "confidence": x}` from a model's message (a Markdown code fence around
/// it is tolerated); a missing confidence counts as certain.
fn parse_choice(content: &str) -> Result<(Vec<String>, f64), LlmError> {
    let trimmed = content.trim();
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.strip_suffix("```"))
        .unwrap_or(trimmed);
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| LlmError::BadAnswer(format!("{e} in {:?}", super::truncate(content, 200))))?;
    let tools = v
        .get("tools")
        .and_then(Value::as_array)
        .ok_or_else(|| LlmError::BadAnswer("no `tools` array".into()))?;
    let names = tools
        .iter()
        .filter_map(|t| t.as_str().or_else(|| t.get("name").and_then(Value::as_str)))
        .map(str::to_owned)
        .collect();
    let confidence = v.get("confidence").and_then(Value::as_f64).unwrap_or(1.0);
    Ok((names, confidence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_fenced_answers() -> Result<(), LlmError> {
        let (n, c) = parse_choice(r#"{"tools": ["a", {"name": "b"}], "confidence": 0.8}"#)?;
        assert_eq!(n, ["a", "b"]);
        assert!((c - 0.8).abs() < 1e-9);
        let (n, c) = parse_choice("```json\n{\"tools\": [\"x\"]}\n```")?;
        assert_eq!(n, ["x"]);
        assert!((c - 1.0).abs() < 1e-9);
        assert!(parse_choice("I think you need a.").is_err());
        Ok(())
    }
}
