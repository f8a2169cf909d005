//! JSON-RPC envelope and MCP vocabulary: parse only what routing needs, keep every other byte.
//!
//! A [`Message`] keeps `params`, `result` and `error` as raw JSON, so that a forwarded message
//! reaches its destination byte for byte except for the fields the relay rewrites on purpose
//! (id, tool/prompt name, progress token). No I/O and no knowledge of backends lives here.

pub mod lines;
pub mod modern;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt::Write as _;

/// Protocol revisions of the handshake ("legacy") era the relay serves, oldest first.
pub const LEGACY_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The newest handshake revision: what the relay proposes to backends and falls back to.
pub const LATEST_LEGACY: &str = "2025-11-25";
/// The revision assumed for an HTTP request without `MCP-Protocol-Version` (spec rule).
pub const DEFAULT_HTTP_VERSION: &str = "2025-03-26";

/// JSON-RPC error codes used by the relay.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Implementation-defined: the backend that owns the request is unavailable or failed.
    pub const BACKEND_UNAVAILABLE: i64 = -32001;
    /// Implementation-defined: the request outlived `requestTimeoutMs`.
    pub const REQUEST_TIMEOUT: i64 = -32002;
    /// Implementation-defined: the message is larger than `maxMessageBytes`.
    pub const MESSAGE_TOO_LARGE: i64 = -32003;
    /// Implementation-defined: the client's token lacks the scope the request needs.
    pub const FORBIDDEN: i64 = -32004;
    /// Implementation-defined: the client is over its rate limit.
    pub const RATE_LIMITED: i64 = -32005;
    /// The request was cancelled by its sender.
    pub const REQUEST_CANCELLED: i64 = -32800;
}

/// Returns true when `v` is a handshake-era revision the relay can serve.
pub fn is_supported_version(v: &str) -> bool {
    LEGACY_VERSIONS.contains(&v)
}

/// A parse failure of an incoming frame.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("parse error: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

/// One JSON-RPC message with its payload kept as raw JSON.
#[derive(Debug, Deserialize, Serialize)]
pub struct Message {
    #[serde(default = "jsonrpc_version")]
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Box<RawValue>>,
}

fn jsonrpc_version() -> String {
    "2.0".to_owned()
}

/// What a message is, by its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    Response,
}

impl Message {
    /// Parses one JSON-RPC object; arrays (batches) are handled by the caller.
    pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
        let m: Message = serde_json::from_slice(bytes)?;
        m.validate()?;
        Ok(m)
    }

    /// Parses from a raw JSON value already split out of a batch.
    pub fn parse_str(s: &str) -> Result<Message, ParseError> {
        Self::parse(s.as_bytes())
    }

    fn validate(&self) -> Result<(), ParseError> {
        if self.jsonrpc != "2.0" {
            return Err(ParseError::Invalid("`jsonrpc` must be \"2.0\""));
        }
        if let Some(id) = &self.id {
            let first = id.get().as_bytes().first().copied();
            if !matches!(first, Some(b'"' | b'-' | b'0'..=b'9' | b'n')) {
                return Err(ParseError::Invalid("`id` must be a string or a number"));
            }
        }
        match (&self.method, &self.result, &self.error) {
            (Some(_), None, None) => Ok(()),
            (None, Some(_), None) | (None, None, Some(_)) if self.id.is_some() => Ok(()),
            _ => Err(ParseError::Invalid(
                "a message needs `method`, or `id` with exactly one of `result` and `error`",
            )),
        }
    }

    pub fn kind(&self) -> Kind {
        match (&self.method, &self.id) {
            (Some(_), Some(_)) => Kind::Request,
            (Some(_), None) => Kind::Notification,
            (None, _) => Kind::Response,
        }
    }

    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("")
    }

    /// The id's raw JSON text (`1`, `"abc"`), or `null`.
    pub fn id_text(&self) -> &str {
        self.id.as_deref().map(RawValue::get).unwrap_or("null")
    }

    /// `params` split into top-level fields, values still raw; empty when absent.
    pub fn params_map(&self) -> Result<RawMap, ParseError> {
        match &self.params {
            Some(p) => RawMap::parse(p.get()),
            None => Ok(RawMap::default()),
        }
    }
}

/// A JSON object whose top-level values stay raw: edit a few keys, keep the rest byte for byte.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct RawMap(pub IndexMap<String, Box<RawValue>>);

impl RawMap {
    pub fn parse(s: &str) -> Result<RawMap, ParseError> {
        if s.trim_start().starts_with('{') {
            Ok(serde_json::from_str(s)?)
        } else if s.trim() == "null" {
            Ok(RawMap::default())
        } else {
            Err(ParseError::Invalid("`params` must be an object"))
        }
    }

    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.get(key).map(|v| &**v)
    }

    /// A string field, if present and a string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    }

    pub fn set_raw(&mut self, key: &str, value: Box<RawValue>) {
        if let Some(slot) = self.0.get_mut(key) {
            *slot = value;
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }

    pub fn set_str(&mut self, key: &str, value: &str) {
        self.set_raw(key, raw_string(value));
    }

    pub fn to_raw(&self) -> Box<RawValue> {
        // Serializing a map of raw values cannot fail: every value is already valid JSON.
        match serde_json::value::to_raw_value(&self.0) {
            Ok(v) => v,
            Err(_) => raw("{}"),
        }
    }
}

/// Raw JSON for a literal the relay wrote itself.
pub fn raw(s: &str) -> Box<RawValue> {
    // Only fails if the relay built invalid JSON, which is a bug: degrade to null.
    RawValue::from_string(s.to_owned()).unwrap_or_default()
}

/// Raw JSON of a string value.
pub fn raw_string(s: &str) -> Box<RawValue> {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    raw(&out)
}

/// Raw JSON of any serializable value.
pub fn to_raw<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| raw("null"))
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

/// Serialized request `{"jsonrpc":"2.0","id":ID,"method":M,"params":P}`.
pub fn request(id: &str, method: &str, params: Option<&RawValue>) -> String {
    let mut s = String::with_capacity(64 + params.map_or(0, |p| p.get().len()));
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(id);
    s.push_str(",\"method\":");
    push_json_string(&mut s, method);
    if let Some(p) = params {
        s.push_str(",\"params\":");
        s.push_str(p.get());
    }
    s.push('}');
    s
}

/// Serialized notification.
pub fn notification(method: &str, params: Option<&RawValue>) -> String {
    let mut s = String::with_capacity(48 + params.map_or(0, |p| p.get().len()));
    s.push_str("{\"jsonrpc\":\"2.0\",\"method\":");
    push_json_string(&mut s, method);
    if let Some(p) = params {
        s.push_str(",\"params\":");
        s.push_str(p.get());
    }
    s.push('}');
    s
}

/// Serialized success response with a raw result.
pub fn response(id: &str, result: &RawValue) -> String {
    let r = result.get();
    let mut s = String::with_capacity(36 + id.len() + r.len());
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(id);
    s.push_str(",\"result\":");
    s.push_str(r);
    s.push('}');
    s
}

/// Serialized error response with a raw error object.
pub fn error_response_raw(id: &str, error: &RawValue) -> String {
    let e = error.get();
    let mut s = String::with_capacity(36 + id.len() + e.len());
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(id);
    s.push_str(",\"error\":");
    s.push_str(e);
    s.push('}');
    s
}

/// Serialized error response.
pub fn error_response(
    id: &str,
    code: i64,
    message: &str,
    data: Option<&serde_json::Value>,
) -> String {
    let mut s = String::with_capacity(80 + message.len());
    let _ = write!(s, "{{\"code\":{code},\"message\":");
    push_json_string(&mut s, message);
    if let Some(d) = data {
        s.push_str(",\"data\":");
        s.push_str(&d.to_string());
    }
    s.push('}');
    error_response_raw(id, &raw(&s))
}

/// MCP method names the relay routes on.
pub mod method {
    pub const INITIALIZE: &str = "initialize";
    pub const INITIALIZED: &str = "notifications/initialized";
    pub const PING: &str = "ping";
    pub const TOOLS_LIST: &str = "tools/list";
    pub const TOOLS_CALL: &str = "tools/call";
    pub const PROMPTS_LIST: &str = "prompts/list";
    pub const PROMPTS_GET: &str = "prompts/get";
    pub const RESOURCES_LIST: &str = "resources/list";
    pub const RESOURCES_TEMPLATES_LIST: &str = "resources/templates/list";
    pub const RESOURCES_READ: &str = "resources/read";
    pub const RESOURCES_SUBSCRIBE: &str = "resources/subscribe";
    pub const RESOURCES_UNSUBSCRIBE: &str = "resources/unsubscribe";
    pub const COMPLETE: &str = "completion/complete";
    pub const SET_LEVEL: &str = "logging/setLevel";
    pub const CANCELLED: &str = "notifications/cancelled";
    pub const PROGRESS: &str = "notifications/progress";
    pub const MESSAGE: &str = "notifications/message";
    pub const TOOLS_CHANGED: &str = "notifications/tools/list_changed";
    pub const PROMPTS_CHANGED: &str = "notifications/prompts/list_changed";
    pub const RESOURCES_CHANGED: &str = "notifications/resources/list_changed";
    pub const RESOURCE_UPDATED: &str = "notifications/resources/updated";
    pub const ROOTS_CHANGED: &str = "notifications/roots/list_changed";
    pub const SAMPLING: &str = "sampling/createMessage";
    pub const ELICIT: &str = "elicitation/create";
    pub const ROOTS_LIST: &str = "roots/list";
    pub const TASKS_GET: &str = "tasks/get";
    pub const TASKS_RESULT: &str = "tasks/result";
    pub const TASKS_LIST: &str = "tasks/list";
    pub const TASKS_CANCEL: &str = "tasks/cancel";
    pub const TASK_STATUS: &str = "notifications/tasks/status";
}

/// Reads `_meta.progressToken` from params, raw.
pub fn progress_token(params: &RawMap) -> Option<Box<RawValue>> {
    let meta = RawMap::parse(params.get("_meta")?.get()).ok()?;
    meta.0.get("progressToken").cloned()
}

/// Replaces `_meta.progressToken` in params.
pub fn set_progress_token(params: &mut RawMap, token: Box<RawValue>) {
    let mut meta = params
        .get("_meta")
        .and_then(|m| RawMap::parse(m.get()).ok())
        .unwrap_or_default();
    meta.set_raw("progressToken", token);
    params.set_raw("_meta", meta.to_raw());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_params_bytes() -> Result<(), ParseError> {
        let text = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"x":1.50,"big":123456789012345678901234567890},"x-v":[1]}}"#;
        let m = Message::parse(text.as_bytes())?;
        assert_eq!(m.kind(), Kind::Request);
        assert_eq!(m.id_text(), "7");
        let mut p = m.params_map()?;
        p.set_str("name", "b");
        assert_eq!(
            p.to_raw().get(),
            r#"{"name":"b","arguments":{"x":1.50,"big":123456789012345678901234567890},"x-v":[1]}"#
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#,
            r#"[1,2"#,
        ] {
            assert!(Message::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn progress_token_round_trip() -> Result<(), ParseError> {
        let mut p = RawMap::parse(r#"{"_meta":{"progressToken":"abc","other":1},"name":"t"}"#)?;
        assert_eq!(
            progress_token(&p).map(|t| t.get().to_owned()),
            Some("\"abc\"".into())
        );
        set_progress_token(&mut p, raw("42"));
        assert_eq!(
            p.to_raw().get(),
            r#"{"_meta":{"progressToken":42,"other":1},"name":"t"}"#
        );
        Ok(())
    }

    #[test]
    fn builds_messages() {
        assert_eq!(
            error_response("3", -32602, "unknown tool `x`", None),
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"unknown tool `x`"}}"#
        );
        assert_eq!(
            response("\"a\"", &raw("{}")),
            r#"{"jsonrpc":"2.0","id":"a","result":{}}"#
        );
    }
}
