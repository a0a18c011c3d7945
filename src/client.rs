//! A client of a running gateway's HTTP API: what the `stepflow specs|publish|tail|replay`
//! commands use. Errors carry the gateway's own answer (its code, message and details), never
//! the API key.

use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Why a request to the gateway did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{0}' is not an http:// or https:// URL")]
    BadUrl(String),
    #[error(
        "cannot reach the gateway at {url}: {reason} (is `stepflow run` listening there? --url / STEPFLOW_URL)"
    )]
    Unreachable { url: String, reason: String },
    /// The gateway answered with an error status.
    #[error("{status}: {message}")]
    Refused {
        status: StatusCode,
        message: String,
        /// The error's `details` (a document's `file#pointer: reason` list, a diff).
        details: Value,
    },
    #[error("the gateway's answer is not what was expected: {0}")]
    Unexpected(String),
}

/// One server-sent event of a stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// `message`, `lagged`, `expired`, `removed` or `error`.
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A gateway's address and the key to use with it.
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Client {
    pub fn new(url: &str, api_key: Option<String>) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        Ok(Client {
            http,
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        if !status.is_success() {
            return Err(refusal(status, &text));
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected(format!("{e}: {text}")))
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        // reqwest's message names the URL, never the headers: no key in it.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(inner) = source {
            reason = format!("{reason}: {inner}");
            source = inner.source();
        }
        ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        }
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    /// `GET path` as text (a document as registered).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let response = self
            .request(Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(refusal(status, &text))
        }
    }

    /// `method path` with a body of `content_type`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, ClientError> {
        let mut request = self.request(method, path).query(query);
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        self.send(request).await
    }

    /// Follows `GET path` as a server-sent event stream, handing each event to `on_event`
    /// until it returns `false` or the stream ends.
    pub async fn stream(
        &self,
        path: &str,
        query: &[(&str, String)],
        mut on_event: impl FnMut(StreamEvent) -> bool,
    ) -> Result<(), ClientError> {
        use eventsource_stream::Eventsource;
        let response = self
            .request(Method::GET, path)
            .query(query)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(refusal(status, &text));
        }
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| ClientError::Unexpected(e.to_string()))?;
            let keep_going = on_event(StreamEvent {
                event: event.event,
                id: (!event.id.is_empty()).then_some(event.id),
                data: event.data,
            });
            if !keep_going {
                break;
            }
        }
        Ok(())
    }
}

/// The gateway's error body (`{"error": {"code", "message", "details"}}`), or the text.
fn refusal(status: StatusCode, text: &str) -> ClientError {
    let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let error = &body["error"];
    let message = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                text.chars().take(500).collect()
            }
        });
    ClientError::Refused {
        status,
        message,
        details: error.get("details").cloned().unwrap_or(Value::Null),
    }
}

/// Percent-encodes one path segment (a channel or document id).
pub use crate::upstream::percent_encode as segment;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_the_gateways_message_and_details() {
        let e = refusal(
            StatusCode::BAD_REQUEST,
            r#"{"error":{"code":"bad_request","message":"the document has 1 problem(s)","details":{"errors":["a.yaml#/info: missing"]}}}"#,
        );
        match e {
            ClientError::Refused {
                status,
                message,
                details,
            } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert_eq!(message, "the document has 1 problem(s)");
                assert_eq!(details["errors"][0], "a.yaml#/info: missing");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            refusal(StatusCode::BAD_GATEWAY, "upstream down"),
            ClientError::Refused { message, .. } if message == "upstream down"
        ));
    }

    #[test]
    fn ids_are_encoded_as_one_path_segment() {
        assert_eq!(segment("iot.telemetry"), "iot.telemetry");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
