//! Legacy HTTP+SSE backends (protocol 2024-11-05): a GET stream whose first `endpoint` event
//! names the URL to POST messages to; every answer arrives on the stream.

use super::Backend;
use super::http::{client, header_map, without_url};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A legacy SSE connection.
pub struct Sse {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    headers: HeaderMap,
    /// Fires when the event stream ends.
    pub closed: CancellationToken,
}

impl Sse {
    /// Opens the event stream and waits (bounded) for the `endpoint` event.
    pub async fn connect(
        b: &Arc<Backend>,
        url: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<Arc<Sse>, String> {
        Sse::open(b, url, headers, false).await
    }

    /// [`Sse::connect`]; `fallback` for a Streamable HTTP URL tried as legacy SSE, whose
    /// 401/403 does not mark the server as needing credentials (its POSTs were accepted).
    pub async fn open(
        b: &Arc<Backend>,
        url: &str,
        headers: &BTreeMap<String, String>,
        fallback: bool,
    ) -> Result<Arc<Sse>, String> {
        let timeout = b.settings().request_timeout();
        let client = client(timeout, b.config.ca_file.as_deref())?;
        let headers = header_map(headers)?;
        let base =
            reqwest::Url::parse(url).map_err(|e| format!("`url` is not a valid URL: {e}"))?;
        let resp = client
            .get(base.clone())
            .headers(headers.clone())
            .header(ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| format!("cannot reach the SSE endpoint: {}", without_url(&e)))?;
        if matches!(resp.status().as_u16(), 401 | 403) && !fallback {
            b.note_auth_failure();
        }
        if !resp.status().is_success() {
            return Err(format!("the SSE endpoint answered HTTP {}", resp.status()));
        }
        let mut events = resp.bytes_stream().eventsource();
        let endpoint = tokio::time::timeout(timeout, async {
            while let Some(ev) = events.next().await {
                let ev = ev.map_err(|e| format!("the SSE stream broke: {e}"))?;
                if ev.event == "endpoint" {
                    return base
                        .join(ev.data.trim())
                        .map_err(|e| format!("the `endpoint` event is not a URL: {e}"));
                }
            }
            Err("the SSE stream ended before its `endpoint` event".to_owned())
        })
        .await
        .map_err(|_| "no `endpoint` event within the request timeout".to_owned())??;
        let closed = CancellationToken::new();
        let conn = Arc::new(Sse {
            client,
            endpoint,
            headers,
            closed: closed.clone(),
        });
        let b = b.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    e = events.next() => e,
                    () = closed.cancelled() => return,
                };
                match ev {
                    Some(Ok(ev)) if ev.event.is_empty() || ev.event == "message" => {
                        if !ev.data.trim().is_empty() {
                            b.on_message(ev.data.as_bytes(), None);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
            closed.cancel();
        });
        Ok(conn)
    }

    pub async fn send(&self, msg: String) -> Result<(), String> {
        let resp = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(msg)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot POST to the SSE message endpoint: {}",
                    without_url(&e)
                )
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "the SSE message endpoint answered HTTP {}",
                resp.status()
            ))
        }
    }
}
