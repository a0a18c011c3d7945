//! `GET /api/v1/asyncapi.json`: an AsyncAPI 3.0 document of what a client of the gateway can use
//! right now, built from the running table on each request (so it follows every registry
//! change) and filtered by the caller's scopes.
//!
//! The document describes the gateway as the application: on a readable route it *sends*
//! frames to WebSocket and SSE clients; on a writable route it *receives* payloads from
//! WebSocket clients and HTTP POSTs. Each frame's `payload` carries the source document's
//! schema; address parameters go in the query string (the `ws` and `http` bindings say so).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::AppState;
use crate::auth::{Need, Principal, Scopes};
use crate::routing::Route;
use crate::server::mcp::catalogue::{parameter_schema, payload_schema};

/// Documents built lately, by registry generation, scopes and host: a caller asking again
/// before anything changed gets the same bytes without the work (60 ms for 1,000 routes).
#[derive(Default)]
pub struct Described {
    recent: Mutex<VecDeque<(CacheKey, Bytes)>>,
}

#[derive(PartialEq)]
struct CacheKey {
    generation: u64,
    scopes: Scopes,
    host: String,
}

/// How many (scopes, host) documents of the current generation are kept: a few kinds of
/// caller.
const KEPT: usize = 16;

impl Described {
    fn get(&self, key: &CacheKey) -> Option<Bytes> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, b)| b.clone())
    }

    fn put(&self, key: CacheKey, document: Bytes) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Documents of an older generation are of no use any more.
        recent.retain(|(k, _)| k.generation == key.generation);
        if recent.len() == KEPT {
            recent.pop_back();
        }
        recent.push_front((key, document));
    }
}

/// `GET /api/v1/asyncapi.json`.
#[utoipa::path(get, path = "/api/v1/asyncapi.json", operation_id = "asyncapi_document", tag = "self", responses((status = 200, description = "An AsyncAPI 3.0 document", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn document(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let key = CacheKey {
        generation: *state.catalogue_changes.borrow(),
        scopes: (*principal.scopes).clone(),
        host,
    };
    let body = match state.asyncapi.get(&key) {
        Some(body) => body,
        None => {
            let routes: Vec<_> = state.hub.routes().map(|r| r.route()).collect();
            let document = describe(
                &routes,
                &principal,
                &key.host,
                state.mcp.https,
                state.auth.is_enabled(),
            );
            let body = Bytes::from(serde_json::to_vec(&document).unwrap_or_default());
            state.asyncapi.put(key, body.clone());
            body
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The AsyncAPI document of `routes` as `principal` may use them, served at `host`.
pub fn describe(
    routes: &[std::sync::Arc<Route>],
    principal: &Principal,
    host: &str,
    https: bool,
    authenticated: bool,
) -> Value {
    let (ws, http) = if https {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let security = if authenticated {
        json!([{"$ref": "#/components/securitySchemes/bearer"}, {"$ref": "#/components/securitySchemes/apiKey"}])
    } else {
        json!([])
    };
    let server = |protocol: &str, description: &str| {
        json!({
            "host": host,
            "protocol": protocol,
            "description": description,
            "security": security,
        })
    };
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut keys = HashSet::new();
    let mut schemas = Map::new();
    let mut messages = Map::new();
    for route in routes {
        let readable =
            route.direction.readable && principal.allows(&Need::Subscribe(route.id.to_string()));
        let writable =
            route.direction.writable && principal.allows(&Need::Publish(route.id.to_string()));
        if !readable && !writable {
            continue;
        }
        let key = unique_key(&route.id, &mut keys);
        // Each schema once, in the components; channels and messages refer to it.
        schemas.insert(key.clone(), payload_schema(route));
        let payload = json!({"$ref": format!("#/components/schemas/{key}")});
        let query = query_schema(route);
        let summary = route
            .description
            .clone()
            .unwrap_or_else(|| format!("{} of {}", route.channel, route.api));
        let frame = json!({"$ref": format!("#/components/messages/{key}_frame")});
        let published = json!({"$ref": format!("#/components/messages/{key}_payload")});
        if readable {
            messages.insert(
                format!("{key}_frame"),
                json!({
                    "name": "frame",
                    "title": "A message of the channel's log",
                    "contentType": "application/json",
                    "payload": frame_schema(payload.clone()),
                }),
            );
        }
        if writable {
            messages.insert(
                format!("{key}_payload"),
                json!({
                    "name": "payload",
                    "title": "A message to publish",
                    "contentType": "application/json",
                    "payload": payload,
                }),
            );
        }
        let mut ws_messages = Map::new();
        if readable {
            ws_messages.insert("frame".into(), frame.clone());
        }
        if writable {
            ws_messages.insert("payload".into(), published.clone());
        }
        let ws_key = format!("{key}_ws");
        channels.insert(
            ws_key.clone(),
            json!({
                "address": format!("/ws/{}", route.id),
                "title": route.id,
                "description": summary,
                "servers": [{"$ref": "#/servers/websocket"}],
                "messages": ws_messages,
                "bindings": {"ws": {"method": "GET", "query": query_with(&query, readable)}},
            }),
        );
        if readable {
            let sse_key = format!("{key}_sse");
            channels.insert(
                sse_key.clone(),
                json!({
                    "address": format!("/sse/{}", route.id),
                    "title": route.id,
                    "description": format!("{summary} (Server-Sent Events; `id:` is the offset, resume with Last-Event-ID)"),
                    "servers": [{"$ref": "#/servers/sse"}],
                    "messages": {"frame": frame},
                }),
            );
            operations.insert(
                format!("{key}_ws_send"),
                operation("send", &ws_key, "frame", &summary, None),
            );
            operations.insert(
                format!("{key}_sse_send"),
                operation("send", &sse_key, "frame", &summary, None),
            );
        }
        if writable {
            let http_key = format!("{key}_http");
            channels.insert(
                http_key.clone(),
                json!({
                    "address": format!("/api/v1/channels/{}/messages", route.id),
                    "title": route.id,
                    "description": format!("{summary} (HTTP POST; 202 once the broker acknowledged)"),
                    "servers": [{"$ref": "#/servers/http"}],
                    "messages": {"payload": published},
                }),
            );
            operations.insert(
                format!("{key}_ws_receive"),
                operation("receive", &ws_key, "payload", &summary, None),
            );
            operations.insert(
                format!("{key}_http_receive"),
                operation(
                    "receive",
                    &http_key,
                    "payload",
                    &summary,
                    Some(json!({"http": {"method": "POST", "query": query}})),
                ),
            );
        }
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "StepFlow Gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The channels this gateway serves now, as this caller may use them: each readable channel as WebSocket and SSE, each writable one as WebSocket and HTTP POST.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "websocket": server(ws, "WebSocket: frames of readable channels; on writable ones each text frame is published"),
            "sse": server(http, "Server-Sent Events of readable channels"),
            "http": server(http, "HTTP publishing"),
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key or a JWT"},
                "apiKey": {"type": "httpApiKey", "in": "header", "name": "X-API-Key"},
            }
        }
    })
}

fn operation(
    action: &str,
    channel: &str,
    message: &str,
    summary: &str,
    bindings: Option<Value>,
) -> Value {
    let mut op = json!({
        "action": action,
        "channel": {"$ref": format!("#/channels/{channel}")},
        "messages": [{"$ref": format!("#/channels/{channel}/messages/{message}")}],
        "summary": summary,
    });
    if let Some(bindings) = bindings {
        op["bindings"] = bindings;
    }
    op
}

/// What a WebSocket or SSE client receives: the log's frame around the message.
fn frame_schema(payload: Value) -> Value {
    json!({
        "type": "object",
        "required": ["offset", "channel", "payload"],
        "properties": {
            "offset": {"type": "integer", "minimum": 1, "description": "The message's offset in the channel's log"},
            "channel": {"type": "string"},
            "address": {"type": "string", "description": "The upstream address it came on or went to"},
            "params": {"type": "object", "additionalProperties": {"type": "string"}},
            "headers": {"type": "object"},
            "payload": payload,
            "timestamp": {"type": "string", "format": "date-time"},
        }
    })
}

/// The address parameters, as query parameters.
fn query_schema(route: &Route) -> Value {
    let mut properties = Map::new();
    for p in &route.parameters {
        properties.insert(p.name.clone(), parameter_schema(p));
    }
    json!({"type": "object", "properties": properties})
}

/// The query of a WebSocket upgrade: the parameters, and for a readable channel where to start.
fn query_with(query: &Value, readable: bool) -> Value {
    let mut query = query.clone();
    if readable && let Some(properties) = query["properties"].as_object_mut() {
        properties.insert(
            "from".into(),
            json!({"type": "integer", "minimum": 1, "description": "Replay from this offset, then live"}),
        );
        properties.insert(
            "subscription".into(),
            json!({"type": "string", "description": "Attach to a durable subscription"}),
        );
    }
    query
}

/// A component key from a route id (AsyncAPI keys are `[A-Za-z0-9_-]+`), unique in `taken`.
fn unique_key(id: &str, taken: &mut HashSet<String>) -> String {
    let base: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut key = base.clone();
    let mut n = 2;
    while !taken.insert(key.clone()) {
        key = format!("{base}-{n}");
        n += 1;
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_ids_become_distinct_component_keys() {
        let mut taken = HashSet::new();
        assert_eq!(unique_key("iot.telemetry", &mut taken), "iot_telemetry");
        assert_eq!(unique_key("iot_telemetry", &mut taken), "iot_telemetry-2");
        assert_eq!(unique_key("a/b c", &mut taken), "a_b_c");
    }
}
