//! WebSocket bindings of an upstream WebSocket API: the path, the `bindings.ws` query and
//! headers, and the subscribe frames sent after each connect.

use serde::Serialize;
use serde_json::Value;

use crate::routing::address::ProtocolAddress;
use crate::routing::binding::not_kept_upstream;
use crate::routing::envelope::Transport;
use crate::routing::{BindingReader, ChannelContext, ProtocolRoute, UpstreamBinding};

#[derive(Debug, Clone, Serialize)]
pub struct WebSocketRoute {
    #[serde(skip)]
    pub path: Option<ProtocolAddress>,
    pub method: Option<String>,
    pub query: Option<Value>,
    pub headers: Option<Value>,
    /// Text frames sent after every (re)connect, from the channel's `x-stepflow-subscribe` (a
    /// string, or JSON sent as its text; an array is several frames).
    pub subscribe: Vec<String>,
}

impl ProtocolRoute for WebSocketRoute {
    fn kind(&self) -> &'static str {
        "web-socket"
    }

    fn transport(&self) -> Transport {
        Transport::Ws
    }

    fn describe(&self) -> String {
        if self.subscribe.is_empty() {
            "websocket".into()
        } else {
            format!("websocket, {} subscribe frame(s)", self.subscribe.len())
        }
    }

    fn at_most_once(&self) -> Option<String> {
        not_kept_upstream()
    }
}

pub struct WsBindings;

impl BindingReader for WsBindings {
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding> {
        let Some(template) = cx.template else {
            return Some(UpstreamBinding::DynamicAddress);
        };
        let ws = cx.channel_binding("ws");
        Some(UpstreamBinding::new(WebSocketRoute {
            path: Some(template.generic()),
            method: ws
                .and_then(|b| b.get("method"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            query: ws.and_then(|b| b.get("query")).cloned(),
            headers: ws.and_then(|b| b.get("headers")).cloned(),
            subscribe: match cx.channel.extensions.get("x-stepflow-subscribe") {
                None => Vec::new(),
                Some(Value::Array(frames)) => frames.iter().map(frame_text).collect(),
                Some(frame) => vec![frame_text(frame)],
            },
        }))
    }
}

/// A subscribe frame's text: strings as they are, anything else as JSON.
pub fn frame_text(frame: &Value) -> String {
    match frame {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
