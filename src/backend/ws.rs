//! WebSocket backends: one JSON-RPC message per text frame, subprotocol `mcp` (as the
//! WebSocket transports of the SDKs and earlier relays use). A writer task owns the sink;
//! the reader hands each text frame to the backend; the connection's end fires `closed`.

use super::Backend;
use futures::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// A WebSocket connection.
pub struct Ws {
    out: mpsc::UnboundedSender<Message>,
    /// Fires when the connection ends (either side).
    pub closed: CancellationToken,
}

impl Ws {
    /// Connects (bounded by the request timeout) and starts the reader and writer.
    pub async fn connect(
        b: &Arc<Backend>,
        url: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<Arc<Ws>, String> {
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("`url` is not a valid WebSocket URL: {e}"))?;
        req.headers_mut().extend(super::http::header_map(headers)?);
        let plain = req.clone();
        let ours = !req.headers().contains_key("sec-websocket-protocol");
        if ours {
            req.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
        }
        let max = b.settings().max_message_bytes();
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let timeout = b.settings().request_timeout();
        let tls = Arc::new(super::tls::client_config(
            b.config.ca_file.as_deref(),
            super::tls::WEBSOCKET,
        )?);
        let connect = |req| {
            tokio_tungstenite::connect_async_tls_with_config(
                req,
                Some(config),
                true,
                Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
            )
        };
        let open = async {
            match connect(req).await {
                // A server that does not echo the `mcp` subprotocol: connect without asking.
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_),
                )) if ours => connect(plain).await,
                other => other,
            }
        };
        let (stream, _resp) = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| format!("no WebSocket handshake within {} ms", timeout.as_millis()))?
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => {
                    let status = resp.status().as_u16();
                    if matches!(status, 401 | 403) {
                        b.note_auth_failure();
                    }
                    format!("the WebSocket endpoint answered HTTP {status}")
                }
                other => format!(
                    "cannot open the WebSocket: {}",
                    crate::config::redact::url(&other.to_string())
                ),
            })?;
        let (mut sink, mut source) = stream.split();
        let (out, mut rx) = mpsc::unbounded_channel::<Message>();
        let closed = CancellationToken::new();
        let conn = Arc::new(Ws {
            out,
            closed: closed.clone(),
        });
        let writer_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    () = writer_closed.cancelled() => None,
                };
                let Some(msg) = msg else { break };
                let is_close = matches!(msg, Message::Close(_));
                // A server that stops reading must not keep this task (and the socket) alive.
                let sent = tokio::select! {
                    r = sink.send(msg) => r.is_ok(),
                    () = writer_closed.cancelled() => false,
                };
                if !sent || is_close {
                    break;
                }
            }
            // Best effort: tell the server we are going (bounded).
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            writer_closed.cancel();
        });
        let b = b.clone();
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = source.next() => f,
                    () = reader_closed.cancelled() => return,
                };
                match frame {
                    Some(Ok(Message::Text(t))) => b.on_message(t.as_bytes(), None),
                    // Some servers send JSON in binary frames; accept it the same way.
                    Some(Ok(Message::Binary(bytes))) => b.on_message(&bytes, None),
                    // Pings are answered by tungstenite on the next write or flush.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        tracing::info!(server = %b.name, reason = ?frame.map(|f| f.reason.to_string()), "WebSocket closed by the server.");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(server = %b.name, error = %e, "WebSocket error.");
                        break;
                    }
                    None => break,
                }
            }
            reader_closed.cancel();
        });
        Ok(conn)
    }

    pub fn send(&self, msg: String) -> Result<(), String> {
        if self.closed.is_cancelled() {
            return Err("the WebSocket connection is closed".into());
        }
        self.out
            .send(Message::Text(msg.into()))
            .map_err(|_| "the WebSocket connection is closed".to_owned())
    }

    /// Sends a close frame and ends the connection.
    pub fn shutdown(&self) {
        let _ = self.out.send(Message::Close(None));
    }
}
