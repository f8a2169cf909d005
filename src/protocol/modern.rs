//! The stateless era (2026-07-28 and later) on the wire: which requests belong to it, what
//! their `_meta` must carry, and what every result of the era must say.
//!
//! A modern request names its protocol version in `params._meta`; it needs no session and
//! no `initialize`. The relay serves it beside the handshake era on the same endpoint (the
//! spec's dual-era server) and speaks to legacy backends for it, so the era's own `_meta`
//! keys are taken off before a request goes on ([`strip`]), and results gain what the era
//! requires ([`decorate`]).

use super::{Message, RawMap, raw};
use serde_json::value::RawValue;

/// Stateless revisions the relay serves, newest first.
pub const VERSIONS: &[&str] = &["2026-07-28"];

pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
pub const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
pub const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
pub const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";
/// Prefix of the keys the spec reserves in `_meta`.
const RESERVED: &str = "io.modelcontextprotocol/";

pub const DISCOVER: &str = "server/discover";
pub const LISTEN: &str = "subscriptions/listen";
pub const ACKNOWLEDGED: &str = "notifications/subscriptions/acknowledged";

/// Error codes the era adds.
pub mod code {
    /// An HTTP header disagrees with the body (or is missing).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Serving the request needs a client capability the request did not declare.
    pub const MISSING_CAPABILITY: i64 = -32021;
    /// The requested protocol version is not one the relay serves.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// Methods of the handshake era that 2026-07-28 removed: unknown to a modern request.
pub const REMOVED: &[&str] = &[
    super::method::INITIALIZE,
    super::method::PING,
    super::method::SET_LEVEL,
    super::method::RESOURCES_SUBSCRIBE,
    super::method::RESOURCES_UNSUBSCRIBE,
    // Tasks became an extension without these two.
    "tasks/list",
    "tasks/result",
];

/// What a modern request says about its client.
#[derive(Debug, Clone)]
pub struct Meta {
    pub version: String,
    pub capabilities: Box<RawValue>,
    pub client_info: Option<Box<RawValue>>,
    /// Log notifications for this request only at or above this level; none when absent.
    pub log_level: Option<String>,
}

/// Why a modern request's `_meta` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("`params._meta` must carry `{0}` (protocol 2026-07-28 and later)")]
    Missing(&'static str),
    #[error(
        "protocol version `{requested}` is not supported; this relay serves {} and the handshake versions {}",
        VERSIONS.join(", "),
        super::LEGACY_VERSIONS.join(", ")
    )]
    Unsupported { requested: String },
    #[error(
        "`_meta.{META_LOG_LEVEL}` must be one of debug, info, notice, warning, error, critical, alert, emergency (got `{0}`)"
    )]
    LogLevel(String),
}

impl MetaError {
    pub fn code(&self) -> i64 {
        match self {
            MetaError::Missing(_) | MetaError::LogLevel(_) => super::code::INVALID_PARAMS,
            MetaError::Unsupported { .. } => code::UNSUPPORTED_VERSION,
        }
    }

    pub fn data(&self) -> Option<serde_json::Value> {
        match self {
            MetaError::Missing(_) | MetaError::LogLevel(_) => None,
            MetaError::Unsupported { requested } => Some(serde_json::json!({
                "supported": VERSIONS,
                "requested": requested,
            })),
        }
    }
}

/// The request's `_meta` object, if it has one.
fn meta_map(msg: &Message) -> Option<serde_json::Map<String, serde_json::Value>> {
    let params = msg.params_map().ok()?;
    serde_json::from_str(params.get("_meta")?.get()).ok()
}

/// Whether the message names a protocol version in `_meta`: the modern era's mark.
pub fn names_version(msg: &Message) -> bool {
    // Cheap pre-check: most legacy traffic never carries the key.
    msg.params
        .as_deref()
        .is_some_and(|p| p.get().contains(META_VERSION))
        && meta_map(msg).is_some_and(|m| m.contains_key(META_VERSION))
}

/// Reads and checks a modern request's `_meta`.
pub fn meta(msg: &Message) -> Result<Meta, MetaError> {
    let m = meta_map(msg).ok_or(MetaError::Missing(META_VERSION))?;
    let version = m
        .get(META_VERSION)
        .and_then(|v| v.as_str())
        .ok_or(MetaError::Missing(META_VERSION))?
        .to_owned();
    let capabilities = m
        .get(META_CAPABILITIES)
        .filter(|c| c.is_object())
        .ok_or(MetaError::Missing(META_CAPABILITIES))?;
    if !VERSIONS.contains(&version.as_str()) {
        return Err(MetaError::Unsupported { requested: version });
    }
    let log_level = match m.get(META_LOG_LEVEL) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(l)) if LEVELS.contains(&l.as_str()) => Some(l.clone()),
        Some(other) => {
            let shown = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned);
            return Err(MetaError::LogLevel(shown));
        }
    };
    Ok(Meta {
        version,
        capabilities: super::to_raw(capabilities),
        client_info: m.get(META_CLIENT_INFO).map(super::to_raw),
        log_level,
    })
}

/// A header value as the era sends it: printable ASCII without surrounding whitespace as
/// is, anything else (non-ASCII names, control characters) in the `=?base64?…?=` sentinel.
pub fn encode_header_value(v: &str) -> String {
    use base64::Engine as _;
    let safe = v.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && v == v.trim()
        && !(v.starts_with("=?base64?") && v.ends_with("?="));
    if safe {
        v.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v.as_bytes())
        )
    }
}

/// The parameters a tool mirrors into `Mcp-Param-{Name}` headers (its input schema's
/// top-level properties annotated `x-mcp-header`), as (property, header name); `Err` says
/// why the annotation is invalid, and a client must then not use the tool: a name that is
/// empty, not visible ASCII, holds a colon or repeats another (case aside), or sits on a
/// property that is not a string, integer or boolean.
pub fn header_params(tool: &serde_json::Value) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let Some(props) = tool
        .pointer("/inputSchema/properties")
        .and_then(|p| p.as_object())
    else {
        return Ok(out);
    };
    for (prop, schema) in props {
        let Some(h) = schema.get("x-mcp-header") else {
            continue;
        };
        let Some(name) = h.as_str() else {
            return Err(format!("x-mcp-header of `{prop}` is not a string"));
        };
        if name.is_empty() {
            return Err(format!("x-mcp-header of `{prop}` is empty"));
        }
        if !name
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b':')
        {
            return Err(format!(
                "x-mcp-header `{name}` of `{prop}` is not visible ASCII without `:`"
            ));
        }
        if !matches!(
            schema.get("type").and_then(|t| t.as_str()),
            Some("string" | "integer" | "boolean")
        ) {
            return Err(format!(
                "x-mcp-header `{name}` sits on `{prop}`, which is not a string, integer or boolean"
            ));
        }
        if out.iter().any(|(_, n)| n.eq_ignore_ascii_case(name)) {
            return Err(format!("x-mcp-header `{name}` is used twice"));
        }
        out.push((prop.clone(), name.to_owned()));
    }
    Ok(out)
}

/// The `Mcp-Param-*` headers of a call: each mirrored argument that is present and not
/// null, strings in the header encoding, numbers and booleans as their JSON text.
pub fn param_headers(
    params: &[(String, String)],
    arguments: &serde_json::Value,
) -> Vec<(String, String)> {
    params
        .iter()
        .filter_map(|(prop, name)| {
            let value = match arguments.get(prop)? {
                serde_json::Value::String(s) => encode_header_value(s),
                serde_json::Value::Null => return None,
                v @ (serde_json::Value::Bool(_) | serde_json::Value::Number(_)) => v.to_string(),
                _ => return None,
            };
            Some((format!("mcp-param-{name}"), value))
        })
        .collect()
}

/// The inverse of [`encode_header_value`]; `None` for a malformed sentinel (bad or
/// non-canonical base64, bad UTF-8), which then matches no body value.
pub fn decode_header_value(v: &str) -> Option<String> {
    use base64::Engine as _;
    let Some(payload) = v
        .strip_prefix("=?base64?")
        .and_then(|p| p.strip_suffix("?="))
    else {
        return Some(v.to_owned());
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(payload).ok()?;
    if engine.encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// A message for a server of this era: `_meta` gets the version, the relay's client
/// capabilities and identity (and `logLevel` when given); other `_meta` (a progress token)
/// stays. Also returns the values of `Mcp-Method` and `Mcp-Name`. `None` for a response or
/// an unparseable message (sent as is).
pub fn attach(
    msg: &str,
    capabilities: &str,
    log_level: Option<&str>,
) -> Option<(String, String, Option<String>)> {
    let m = super::Message::parse_str(msg).ok()?;
    if m.kind() == super::Kind::Response {
        return None;
    }
    let method = m.method().to_owned();
    let mut params = m.params_map().unwrap_or_default();
    let mut meta = params
        .get("_meta")
        .and_then(|v| super::RawMap::parse(v.get()).ok())
        .unwrap_or_default();
    meta.set_str(META_VERSION, VERSIONS[0]);
    meta.set_raw(
        META_CAPABILITIES,
        super::raw(if capabilities.trim().is_empty() {
            "{}"
        } else {
            capabilities
        }),
    );
    meta.set_raw(
        META_CLIENT_INFO,
        super::to_raw(&serde_json::json!({"name": "mcp-relay", "version": crate::version()})),
    );
    if let Some(l) = log_level {
        meta.set_str(META_LOG_LEVEL, l);
    }
    params.set_raw("_meta", meta.to_raw());
    let name = name_field(&method).and_then(|f| params.get_str(f));
    let body = params.to_raw();
    let out = match m.kind() {
        super::Kind::Request => super::request(m.id_text(), &method, Some(&body)),
        _ => super::notification(&method, Some(&body)),
    };
    Some((out, method, name))
}

/// The field of a request's params that its `Mcp-Name` header carries: the tool or prompt
/// name, or the resource URI; `None` for methods without one.
pub fn name_field(method: &str) -> Option<&'static str> {
    match method {
        super::method::TOOLS_CALL | super::method::PROMPTS_GET => Some("name"),
        super::method::RESOURCES_READ => Some("uri"),
        _ => None,
    }
}

/// The message with the era's reserved `_meta` keys removed (other `_meta`, such as a
/// progress token, stays): what a backend of either era receives.
pub fn strip(mut msg: Message) -> Message {
    let Ok(mut params) = msg.params_map() else {
        return msg;
    };
    let Some(meta) = params.get("_meta").and_then(|m| {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m.get()).ok()
    }) else {
        return msg;
    };
    let kept: serde_json::Map<String, serde_json::Value> = meta
        .into_iter()
        .filter(|(k, _)| !k.starts_with(RESERVED))
        .collect();
    if kept.is_empty() {
        params.0.shift_remove("_meta");
    } else {
        params.set_raw("_meta", super::to_raw(&kept));
    }
    msg.params = Some(params.to_raw());
    msg
}

/// Results that carry cache hints (`ttlMs`, `cacheScope`).
fn cacheable(method: &str) -> bool {
    use super::method::*;
    matches!(
        method,
        TOOLS_LIST | PROMPTS_LIST | RESOURCES_LIST | RESOURCES_TEMPLATES_LIST | RESOURCES_READ
    ) || method == DISCOVER
}

/// The relay's identity, as results of the era carry it in `_meta`.
pub fn server_info() -> serde_json::Value {
    serde_json::json!({"name": "mcp-relay", "title": "MCP relay", "version": crate::version()})
}

/// Completes a result for a modern client: `resultType` (`complete` unless it says
/// otherwise), the relay's identity in `_meta`, and for lists and reads the cache hints.
/// Merged lists depend on the session's grant and on backends that change at any time, so
/// they are never cacheable: `ttlMs: 0`, `cacheScope: "private"`.
pub fn decorate(result: &RawValue, method: &str) -> Box<RawValue> {
    let Ok(mut map) = RawMap::parse(result.get()) else {
        return raw(result.get());
    };
    if map.get("resultType").is_none() {
        map.set_str("resultType", "complete");
    }
    if cacheable(method) {
        map.set_raw("ttlMs", raw("0"));
        map.set_str("cacheScope", "private");
    }
    let mut meta = map
        .get("_meta")
        .and_then(|m| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m.get()).ok()
        })
        .unwrap_or_default();
    meta.entry(META_SERVER_INFO).or_insert_with(server_info);
    map.set_raw("_meta", super::to_raw(&meta));
    map.to_raw()
}

/// Severity rank of a log level (RFC 5424 order); unknown levels rank lowest.
pub fn level_rank(level: &str) -> u8 {
    LEVELS
        .iter()
        .position(|l| *l == level)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(0)
}

/// The log levels (RFC 5424 severities), least severe first.
pub const LEVELS: [&str; 8] = [
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];

/// Adds the subscription id to a notification's `_meta` (listen streams tag every message).
pub fn tag(notification: &str, subscription: &RawValue) -> Option<String> {
    let mut msg = Message::parse_str(notification).ok()?;
    let mut params = msg.params_map().ok()?;
    let mut meta = params
        .get("_meta")
        .and_then(|m| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m.get()).ok()
        })
        .unwrap_or_default();
    meta.insert(
        META_SUBSCRIPTION.to_owned(),
        serde_json::from_str(subscription.get()).ok()?,
    );
    params.set_raw("_meta", super::to_raw(&meta));
    msg.params = Some(params.to_raw());
    serde_json::to_string(&msg).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Message {
        match Message::parse_str(s) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn meta_is_checked_and_stripped() {
        let m = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"sampling":{}},"progressToken":7}}}"#,
        );
        assert!(names_version(&m));
        let meta = meta(&m).map_err(|e| e.to_string());
        assert_eq!(
            meta.map(|m| m.capabilities.get().to_owned()),
            Ok(r#"{"sampling":{}}"#.to_owned())
        );
        let s = strip(m);
        assert_eq!(
            s.params.map(|p| p.get().to_owned()).as_deref(),
            Some(r#"{"name":"x","_meta":{"progressToken":7}}"#)
        );
        let old = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"v9","io.modelcontextprotocol/clientCapabilities":{}}}}"#,
        );
        let e = super::meta(&old).err();
        assert_eq!(
            e.as_ref().map(MetaError::code),
            Some(code::UNSUPPORTED_VERSION)
        );
        let none = msg(r#"{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{}}"#);
        assert!(!names_version(&none));
        assert_eq!(
            super::meta(&none).err(),
            Some(MetaError::Missing(META_VERSION))
        );
        let loud = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/logLevel":"loud"}}}"#,
        );
        assert_eq!(
            super::meta(&loud).err(),
            Some(MetaError::LogLevel("loud".into()))
        );
        assert_eq!(level_rank("warning"), 3);
        assert!(level_rank("emergency") > level_rank("error"));
    }

    #[test]
    fn messages_to_a_modern_server_carry_the_era() -> Result<(), Box<dyn std::error::Error>> {
        let (out, method, name) = attach(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{},"_meta":{"progressToken":3}}}"#,
            r#"{"sampling":{}}"#,
            Some("warning"),
        )
        .ok_or("not attached")?;
        assert_eq!(
            (method.as_str(), name.as_deref()),
            ("tools/call", Some("echo"))
        );
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let m = &v["params"]["_meta"];
        assert_eq!(m[META_VERSION], "2026-07-28");
        assert_eq!(m[META_CAPABILITIES], serde_json::json!({"sampling": {}}));
        assert_eq!(m[META_LOG_LEVEL], "warning");
        assert_eq!(m["progressToken"], 3);
        assert_eq!(m[META_CLIENT_INFO]["name"], "mcp-relay");
        assert_eq!(v["id"], 7);
        // A response goes as it is.
        assert!(attach(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, "{}", None).is_none());
        Ok(())
    }

    #[test]
    fn x_mcp_header_annotations_are_checked_and_mirrored() {
        let tool = |props: serde_json::Value| serde_json::json!({"name": "t", "inputSchema": {"type": "object", "properties": props}});
        let ok = tool(serde_json::json!({
            "region": {"type": "string", "x-mcp-header": "Region"},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "flag": {"type": "boolean", "x-mcp-header": "Flag"},
            "q": {"type": "string"}
        }));
        let params = header_params(&ok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(params.len(), 3);
        let headers = param_headers(
            &params,
            &serde_json::json!({"region": " Hello, 世界", "n": 42, "flag": false, "q": "x"}),
        );
        assert!(
            headers.contains(&("mcp-param-N".into(), "42".into())),
            "{headers:?}"
        );
        assert!(
            headers.contains(&("mcp-param-Flag".into(), "false".into())),
            "{headers:?}"
        );
        let region = headers
            .iter()
            .find(|(h, _)| h == "mcp-param-Region")
            .map(|(_, v)| v.clone());
        assert_eq!(
            region.as_deref().and_then(decode_header_value).as_deref(),
            Some(" Hello, 世界")
        );
        // Null or absent: no header.
        assert!(param_headers(&params, &serde_json::json!({"region": null})).is_empty());
        for bad in [
            serde_json::json!({"v": {"type": "string", "x-mcp-header": ""}}),
            serde_json::json!({"v": {"type": "number", "x-mcp-header": "V"}}),
            serde_json::json!({"v": {"type": "object", "x-mcp-header": "V"}}),
            serde_json::json!({"v": {"type": "string", "x-mcp-header": "My V"}}),
            serde_json::json!({"v": {"type": "string", "x-mcp-header": "A:B"}}),
            serde_json::json!({"v": {"type": "string", "x-mcp-header": "Région"}}),
            serde_json::json!({"a": {"type": "string", "x-mcp-header": "X"}, "b": {"type": "string", "x-mcp-header": "x"}}),
        ] {
            assert!(header_params(&tool(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_values_survive_http() {
        assert_eq!(encode_header_value("echo"), "echo");
        let odd = ["résumé", " padded ", "=?base64?eA==?=", "tab\there"];
        for v in odd {
            let e = encode_header_value(v);
            assert!(e.starts_with("=?base64?") && e.is_ascii(), "{e}");
            assert_eq!(decode_header_value(&e).as_deref(), Some(v));
        }
        assert_eq!(decode_header_value("plain").as_deref(), Some("plain"));
        // Not base64, and non-canonical base64 (padding bits set), are refused.
        assert_eq!(decode_header_value("=?base64?!!?="), None);
        assert_eq!(decode_header_value("=?base64?eR==?="), None);
    }

    #[test]
    fn results_are_completed() {
        let r = decorate(&raw(r#"{"tools":[],"nextCursor":"a"}"#), "tools/list");
        let v: serde_json::Value = serde_json::from_str(r.get()).unwrap_or_default();
        assert_eq!(v["resultType"], "complete");
        assert_eq!(v["ttlMs"], 0);
        assert_eq!(v["cacheScope"], "private");
        assert_eq!(v["nextCursor"], "a");
        assert_eq!(v["_meta"][META_SERVER_INFO]["name"], "mcp-relay");
        let r = decorate(
            &raw(r#"{"resultType":"input_required","content":[]}"#),
            "tools/call",
        );
        let v: serde_json::Value = serde_json::from_str(r.get()).unwrap_or_default();
        assert_eq!(v["resultType"], "input_required");
        assert!(v.get("ttlMs").is_none());
    }

    #[test]
    fn notifications_are_tagged() {
        let t = tag(
            r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
            &raw("\"s1\""),
        );
        assert_eq!(
            t.as_deref(),
            Some(
                r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed","params":{"_meta":{"io.modelcontextprotocol/subscriptionId":"s1"}}}"#
            )
        );
    }
}
