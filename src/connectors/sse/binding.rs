//! HTTP bindings: a channel marked as a Server-Sent Events stream is one the SSE connector
//! keeps open; any other HTTP channel is called per request (`calls`).

use serde::Serialize;
use serde_json::Value;

use crate::routing::address::ProtocolAddress;
use crate::routing::binding::not_kept_upstream;
use crate::routing::envelope::Transport;
use crate::routing::{BindingReader, ChannelContext, HttpRoute, ProtocolRoute, UpstreamBinding};

/// An upstream Server-Sent Events stream (an HTTP GET the gateway keeps open).
#[derive(Debug, Clone, Serialize)]
pub struct SseRoute {
    #[serde(skip)]
    pub path: ProtocolAddress,
    /// `event:` names → message ids (a message's `name`, else its id).
    pub events: Vec<(String, String)>,
    pub query: Option<Value>,
    pub headers: Option<Value>,
}

impl ProtocolRoute for SseRoute {
    fn kind(&self) -> &'static str {
        "sse"
    }

    fn transport(&self) -> Transport {
        Transport::Sse
    }

    fn describe(&self) -> String {
        "sse".into()
    }

    fn at_most_once(&self) -> Option<String> {
        not_kept_upstream()
    }
}

pub struct HttpBindings;

impl BindingReader for HttpBindings {
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding> {
        let Some(template) = cx.template else {
            return Some(UpstreamBinding::DynamicAddress);
        };
        if is_event_stream(cx) {
            let http = cx.channel_binding("http");
            return Some(UpstreamBinding::new(SseRoute {
                path: template.generic(),
                events: cx
                    .channel
                    .messages
                    .iter()
                    .map(|m| (m.name.clone().unwrap_or_else(|| m.id.clone()), m.id.clone()))
                    .collect(),
                query: http.and_then(|b| b.get("query")).cloned(),
                headers: http.and_then(|b| b.get("headers")).cloned(),
            }));
        }
        let method = cx
            .api
            .operations
            .iter()
            .find(|o| o.channel == cx.channel.id)
            .and_then(|o| o.http.as_ref().map(|h| h.method.clone()))
            .unwrap_or_else(|| "GET".into());
        Some(UpstreamBinding::new(HttpRoute {
            method,
            path: template.as_str().to_owned(),
        }))
    }
}

/// `x-stepflow-sse: true` on the channel, or `text/event-stream` as the content type of the
/// document or of one of the channel's messages.
fn is_event_stream(cx: &ChannelContext<'_>) -> bool {
    const EVENT_STREAM: &str = "text/event-stream";
    cx.channel.extensions.get("x-stepflow-sse") == Some(&Value::Bool(true))
        || cx.api.default_content_type.as_deref() == Some(EVENT_STREAM)
        || cx
            .channel
            .messages
            .iter()
            .any(|m| m.content_type.as_deref() == Some(EVENT_STREAM))
}
