//! The relay's request errors and their single mapping to JSON-RPC error responses.
//!
//! Every error answers "whose fault?" ([`Fault`]), which picks the log level; the JSON-RPC
//! code and the client-facing message come from [`RpcError::code`] and `Display`.

use crate::backend;
use crate::protocol::{self, code};

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Backend,
    Relay,
}

/// An error answered to a client request.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("method `{0}` is not supported by mcp-relay or any of its servers")]
    MethodNotFound(String),
    #[error("{0}")]
    InvalidParams(String),
    #[error(
        "the message is {size} bytes, over the relay's limit of {max} bytes (relay.maxMessageBytes)"
    )]
    TooLarge { size: usize, max: usize },
    /// The client's scopes do not allow the request (the message names client and scope).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No process of an isolated server can take the request (a cap is reached).
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Backend(#[from] backend::Error),
}

impl RpcError {
    pub fn fault(&self) -> Fault {
        match self {
            RpcError::Backend(backend::Error::Cancelled | backend::Error::Input { .. }) => {
                Fault::Client
            }
            RpcError::Backend(_) => Fault::Backend,
            _ => Fault::Client,
        }
    }

    pub fn code(&self) -> i64 {
        match self {
            RpcError::Parse(_) => code::PARSE_ERROR,
            RpcError::InvalidRequest(_) => code::INVALID_REQUEST,
            RpcError::MethodNotFound(_) => code::METHOD_NOT_FOUND,
            RpcError::InvalidParams(_) => code::INVALID_PARAMS,
            RpcError::TooLarge { .. } => code::MESSAGE_TOO_LARGE,
            RpcError::Forbidden(_) => code::FORBIDDEN,
            RpcError::Capacity(_) => code::BACKEND_UNAVAILABLE,
            RpcError::Backend(e) => match e {
                backend::Error::Unavailable { .. }
                | backend::Error::Lost { .. }
                | backend::Error::Busy { .. } => code::BACKEND_UNAVAILABLE,
                backend::Error::Timeout { .. } => code::REQUEST_TIMEOUT,
                backend::Error::Cancelled => code::REQUEST_CANCELLED,
                backend::Error::Input { .. } => code::INVALID_REQUEST,
            },
        }
    }

    /// The JSON-RPC error response for request `id` (raw JSON text, `null` when unknown).
    pub fn to_response(&self, id: &str) -> String {
        match self.fault() {
            Fault::Client => tracing::debug!(error = %self, "Request refused."),
            Fault::Backend => tracing::warn!(error = %self, "Request failed at a backend."),
            Fault::Relay => tracing::error!(error = %self, "Request failed in the relay."),
        }
        protocol::error_response(id, self.code(), &self.to_string(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_names_the_server() {
        let e = RpcError::from(backend::Error::Timeout {
            server: "fs".into(),
            method: "tools/call".into(),
            ms: 100,
        });
        assert_eq!(e.code(), code::REQUEST_TIMEOUT);
        assert_eq!(e.fault(), Fault::Backend);
        let r = e.to_response("5");
        assert!(
            r.contains(r#""id":5"#)
                && r.contains("server `fs` did not answer `tools/call` within 100 ms"),
            "{r}"
        );
        assert_eq!(RpcError::Parse("x".into()).code(), -32700);
    }
}
