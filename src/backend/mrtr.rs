//! The multi-round-trip bridge for servers of the stateless era (2026-07-28) and clients of
//! the handshake era: a server's `input_required` result becomes real `elicitation/create`,
//! `sampling/createMessage` and `roots/list` requests to the client (on the stream of the
//! client's request, as the handshake era has them), and the call is sent again with the
//! client's answers in `inputResponses` and the server's `requestState` echoed verbatim,
//! until the server answers for good (at most [`MAX_ROUNDS`] rounds).
//!
//! Clients of the stateless era get the server's `input_required` as it is: they drive the
//! rounds themselves, and their retry reaches the same server by the call's name.

use super::{Backend, Error};
use crate::protocol::{self, Message, RawMap, method};
use crate::session::ReqCtx;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The requests that may answer `input_required` (the spec's list, tasks aside).
pub const METHODS: &[&str] = &[
    method::TOOLS_CALL,
    method::PROMPTS_GET,
    method::RESOURCES_READ,
];

/// Rounds of input one call may take (the SDKs' default cap).
pub const MAX_ROUNDS: usize = 10;

/// The methods an input request may carry.
const INPUT_METHODS: &[&str] = &[method::ELICIT, method::SAMPLING, method::ROOTS_LIST];

/// An `input_required` result: its requests (key, method, params) and the server's state.
struct InputRequired {
    requests: Vec<(String, String, Option<Box<RawValue>>)>,
    state: Option<Box<RawValue>>,
}

/// The `input_required` result in an answer, if it is one; `Err` names what is malformed.
fn input_required(answer: &Message) -> Result<Option<InputRequired>, String> {
    let Some(result) = answer.result.as_deref() else {
        return Ok(None);
    };
    // Cheap pre-check: almost every result is complete.
    if !result.get().contains("input_required") {
        return Ok(None);
    }
    let Ok(r) = RawMap::parse(result.get()) else {
        return Ok(None);
    };
    if r.get_str("resultType").as_deref() != Some("input_required") {
        return Ok(None);
    }
    let mut requests = Vec::new();
    if let Some(asked) = r.get("inputRequests") {
        let asked = RawMap::parse(asked.get()).map_err(|_| "`inputRequests` is not an object")?;
        for (key, req) in asked.0 {
            let req = RawMap::parse(req.get())
                .map_err(|_| format!("input request `{key}` is not an object"))?;
            let m = req.get_str("method").unwrap_or_default();
            if !INPUT_METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "input request `{key}` asks for `{m}`, which is not elicitation/create, sampling/createMessage or roots/list"
                ));
            }
            let params = req.get("params").map(|p| protocol::raw(p.get()));
            requests.push((key, m, params));
        }
    }
    let state = r.get("requestState").map(|s| protocol::raw(s.get()));
    if requests.is_empty() && state.is_none() {
        return Err("`input_required` with neither inputRequests nor requestState".into());
    }
    Ok(Some(InputRequired { requests, state }))
}

impl Backend {
    /// A call to a stateless-era server on behalf of a handshake-era client: the server's
    /// input requests are put to the client and the call is sent again with the answers.
    pub(super) async fn call_bridged(
        self: &Arc<Self>,
        m: &str,
        params: RawMap,
        ctx: ReqCtx,
        cancel: &CancellationToken,
    ) -> Result<Message, Error> {
        let fail = |reason: String| Error::Input {
            server: self.name.clone(),
            method: m.to_owned(),
            reason,
        };
        let mut answer = self
            .call_once(m, params.clone(), ctx.clone(), cancel)
            .await?;
        for _ in 0..MAX_ROUNDS {
            let asked = match input_required(&answer) {
                Ok(Some(a)) => a,
                Ok(None) => return Ok(answer),
                Err(why) => {
                    return Err(fail(format!(
                        "its input_required result is malformed: {why}"
                    )));
                }
            };
            let timeout = self.settings.request_timeout();
            let questions = asked.requests.iter().map(|(key, rm, rp)| {
                let ctx = &ctx;
                async move {
                    let reply = ctx
                        .session
                        .request(&ctx.stream, rm, rp.as_deref(), timeout)
                        .await
                        .map_err(|e| e.to_string())?;
                    match (reply.result, reply.error) {
                        (Some(r), _) => Ok((key.clone(), r)),
                        (None, Some(e)) => Err(format!("the client refused `{rm}`: {}", e.get())),
                        (None, None) => Err(format!("the client answered `{rm}` with nothing")),
                    }
                }
            });
            let answers = tokio::select! {
                a = futures::future::try_join_all(questions) => a.map_err(fail)?,
                () = cancel.cancelled() => return Err(Error::Cancelled),
            };
            let mut again = params.clone();
            if !answers.is_empty() {
                let mut responses = RawMap::default();
                for (key, r) in answers {
                    responses.set_raw(&key, r);
                }
                again.set_raw("inputResponses", responses.to_raw());
            }
            if let Some(s) = &asked.state {
                again.set_raw("requestState", protocol::raw(s.get()));
            }
            answer = self.call_once(m, again, ctx.clone(), cancel).await?;
        }
        match input_required(&answer) {
            Ok(None) => Ok(answer),
            _ => Err(fail(format!(
                "it still asked for input after {MAX_ROUNDS} rounds; the relay gave up"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Message {
        Message::parse_str(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn recognizes_input_required_and_its_requests() {
        let done =
            msg(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"resultType":"complete"}}"#);
        assert!(matches!(input_required(&done), Ok(None)));
        let asked = msg(
            r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{"user_name":{"method":"elicitation/create","params":{"message":"Name?"}}},"requestState":"s1"}}"#,
        );
        let Ok(Some(a)) = input_required(&asked) else {
            panic!("not recognized")
        };
        assert_eq!(a.requests.len(), 1);
        assert_eq!(a.requests[0].0, "user_name");
        assert_eq!(a.requests[0].1, "elicitation/create");
        assert_eq!(a.state.as_deref().map(RawValue::get), Some(r#""s1""#));
        let bad = msg(
            r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{"k":{"method":"tools/call"}}}}"#,
        );
        assert!(input_required(&bad).is_err());
        let empty = msg(r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required"}}"#);
        assert!(input_required(&empty).is_err());
    }
}
