//! The tools' work: what each tool call does with the hub, the log and the operations, and
//! how its outcome reads to an agent (a tool error with the schema path, never a protocol
//! error that would end the session).

use std::collections::HashMap;

use bytes::Bytes;
use rmcp::model::{CallToolResult, ContentBlock};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::GatewayMcp;
use super::catalogue::{self, Catalogue, ToolKind};
use super::resources;
use crate::auth::{Need, Principal};
use crate::calls::{CallError, CallRequest};
use crate::hub::PublishRequest;
use crate::routing::envelope::{Origin, Transport};

/// A tool result the agent reads: the JSON as text, and as structured content.
fn structured(value: Value) -> CallToolResult {
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(value);
    result
}

fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

/// Why a tool call failed, for the agent: the text, and the schema path when there is one.
fn tool_error_with(message: String, details: Value) -> CallToolResult {
    let text = format!(
        "{message}\n{}",
        serde_json::to_string_pretty(&details).unwrap_or_default()
    );
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(json!({ "error": message, "details": details }));
    result
}

pub(super) fn forbidden(principal: &Principal, need: &Need) -> CallToolResult {
    crate::server::auth::count_denial("forbidden");
    tracing::info!(principal = %principal.id, missing = %need, "MCP tool call denied: forbidden");
    tool_error(format!("forbidden: this key lacks the scope '{need}'"))
}

impl GatewayMcp {
    pub(super) async fn run_tool(
        &self,
        kind: &ToolKind,
        catalogue: &Catalogue,
        principal: &Principal,
        arguments: Map<String, Value>,
    ) -> CallToolResult {
        match kind {
            ToolKind::ListChannels => self.list_channels(catalogue, principal),
            ToolKind::DescribeChannel => match arguments.get("channel").and_then(Value::as_str) {
                Some(id) => self.describe_channel(catalogue, principal, id).await,
                None => missing_channel(),
            },
            ToolKind::ReadMessages => self.read_messages(principal, &arguments).await,
            ToolKind::Publish(id) => self.publish(id, arguments).await,
            ToolKind::Call(id) => self.call(id, arguments).await,
        }
    }

    fn list_channels(&self, catalogue: &Catalogue, principal: &Principal) -> CallToolResult {
        let channels: Vec<Value> = self
            .state()
            .hub
            .routes()
            .filter_map(|live| {
                let route = &live.route();
                let read = route.direction.readable
                    && principal.allows(&Need::Subscribe(route.id.to_string()));
                let write = route.direction.writable
                    && principal.allows(&Need::Publish(route.id.to_string()));
                if !read && !write {
                    return None;
                }
                Some(json!({
                    "id": route.id,
                    "direction": route.direction.as_str(),
                    "address": route.address,
                    "description": route.description,
                    "readable": read,
                    "publishTool": if write { catalogue.publish_tools.get(&route.id).cloned() } else { None },
                    "resource": read.then(|| resources::channel_uri(&route.id)),
                }))
            })
            .collect();
        structured(json!({ "channels": channels }))
    }

    async fn describe_channel(
        &self,
        catalogue: &Catalogue,
        principal: &Principal,
        id: &str,
    ) -> CallToolResult {
        let state = self.state();
        let Some(live) = state.hub.route(id) else {
            return tool_error(format!(
                "no channel '{id}'; list_channels shows the channels"
            ));
        };
        let route = &live.route();
        let may = principal.allows(&Need::Subscribe(id.to_owned()))
            || principal.allows(&Need::Publish(id.to_owned()));
        if !may {
            return forbidden(principal, &Need::Subscribe(id.to_owned()));
        }
        let mut view = crate::server::api::channel_view(
            route,
            live.live_subscribers(),
            state.hub.connections(),
        );
        let stats = state.hub.store().log_stats(&live.log);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The recent rate, from the log's tail: messages in the last minute (up to 1,000).
        let mut last_minute = 0;
        let mut last_at = None;
        if let Some(last) = stats.last_offset {
            let from = (last + 1).saturating_sub(1000).max(1);
            if let Ok(tail) = state.hub.store().read(&live.log, from, 1000).await {
                last_at = tail.last().map(|m| m.envelope.timestamp_ms());
                last_minute = tail
                    .iter()
                    .filter(|m| now_ms.saturating_sub(m.envelope.timestamp_ms()) <= 60_000)
                    .count();
            }
        }
        if let Some(obj) = view.as_object_mut() {
            obj.insert("description".into(), json!(route.description));
            obj.insert("log".into(), json!(stats));
            obj.insert(
                "rate".into(),
                json!({ "messagesLastMinute": last_minute, "lastMessageAt": last_at }),
            );
            obj.insert(
                "publishTool".into(),
                json!(catalogue.publish_tools.get(&route.id)),
            );
            if route.direction.readable {
                obj.insert("resource".into(), json!(resources::channel_uri(&route.id)));
            }
            if let Some(template) = resources::template_uri(route) {
                obj.insert("resourceTemplate".into(), json!(template));
            }
        }
        structured(view)
    }

    async fn read_messages(
        &self,
        principal: &Principal,
        arguments: &Map<String, Value>,
    ) -> CallToolResult {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Args {
            channel: String,
            from: Option<u64>,
            limit: Option<u64>,
            last: Option<u64>,
        }
        let args: Args = match serde_json::from_value(Value::Object(arguments.clone())) {
            Ok(a) => a,
            Err(e) => {
                return tool_error_with(
                    format!("the arguments do not fit read_messages: {e}"),
                    json!({ "schemaPath": "/inputSchema" }),
                );
            }
        };
        let state = self.state();
        let Some(live) = state.hub.route(&args.channel) else {
            return tool_error(format!(
                "no channel '{}'; list_channels shows the channels",
                args.channel
            ));
        };
        let need = Need::Subscribe(args.channel.clone());
        if !principal.allows(&need) {
            return forbidden(principal, &need);
        }
        let stats = state.hub.store().log_stats(&live.log);
        let (from, limit) = match (args.last, args.from) {
            (Some(_), Some(_)) => {
                return tool_error("give either `from` (with `limit`) or `last`, not both");
            }
            (Some(last), None) => {
                let last = last.clamp(1, catalogue::READ_LIMIT_MAX);
                let end = stats.last_offset.map_or(1, |o| o + 1);
                (end.saturating_sub(last).max(1), last)
            }
            (None, from) => (
                from.unwrap_or(1).max(1),
                args.limit.unwrap_or(20).clamp(1, catalogue::READ_LIMIT_MAX),
            ),
        };
        match state
            .hub
            .store()
            .read(&live.log, from, limit as usize)
            .await
        {
            Ok(messages) => {
                let next = messages.last().map_or(from, |m| m.offset + 1);
                let frames: Vec<Value> = messages
                    .iter()
                    .filter_map(|m| serde_json::from_slice(m.frame()).ok())
                    .collect();
                structured(json!({ "channel": args.channel, "messages": frames, "next": next }))
            }
            Err(e) => tool_error(format!("the message log failed: {e}")),
        }
    }

    async fn publish(&self, id: &str, mut arguments: Map<String, Value>) -> CallToolResult {
        let state = self.state();
        let Some(live) = state.hub.route(id) else {
            return tool_error(format!("channel '{id}' is gone"));
        };
        let route = &live.route();
        let key = catalogue::payload_key(route);
        let Some(payload) = arguments.remove(key) else {
            return tool_error_with(
                format!("`{key}` is required: the message to publish"),
                json!({ "path": format!("/{key}"), "schemaPath": "/required" }),
            );
        };
        let mut params = HashMap::new();
        for (name, value) in arguments {
            if !route.parameters.iter().any(|p| p.name == name) {
                return tool_error_with(
                    format!("`{name}` is not an address parameter of {id}"),
                    json!({ "path": format!("/{name}"), "schemaPath": "/additionalProperties" }),
                );
            }
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            params.insert(name, text);
        }
        let content_type = route
            .messages
            .iter()
            .find_map(|m| m.content_type.clone())
            .unwrap_or_else(|| "application/json".into());
        // A text channel takes a string argument as the text itself; anything else is JSON.
        let body = match payload {
            Value::String(text) if !content_type.contains("json") => Bytes::from(text),
            other => Bytes::from(serde_json::to_vec(&other).unwrap_or_default()),
        };
        let request = PublishRequest {
            payload: body,
            content_type: Some(content_type),
            params,
            headers: Vec::new(),
            origin: Origin::client(Transport::Mcp, 0),
            key: None,
        };
        match state.hub.publish(id, request).await {
            Ok(published) => structured(serde_json::to_value(&published).unwrap_or_default()),
            Err(crate::hub::PublishFailure::InvalidPayload(e)) => tool_error_with(
                format!("the payload does not match the schema of {id}: {e}"),
                json!({
                    "path": format!("/{key}{}", e.instance_path),
                    "schemaPath": e.schema_path,
                    "reason": e.reason,
                }),
            ),
            Err(failure) => tool_error(format!("not published on {id}: {failure}")),
        }
    }

    async fn call(&self, id: &str, arguments: Map<String, Value>) -> CallToolResult {
        let request: CallRequest = match serde_json::from_value(Value::Object(arguments)) {
            Ok(r) => r,
            Err(e) => {
                return tool_error_with(
                    format!("the arguments must be {{path, query, headers, body}}: {e}"),
                    json!({ "schemaPath": "/additionalProperties" }),
                );
            }
        };
        let http = self.state().operations.get(id);
        match self.state().operations.call(id, request).await {
            Ok(response) => {
                let body: Option<Value> = serde_json::from_slice(&response.body).ok();
                let text = match &body {
                    Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
                    None => String::from_utf8_lossy(&response.body).into_owned(),
                };
                let summary = format!("HTTP {}\n{text}", response.status);
                if !(200..300).contains(&response.status) {
                    return tool_error(summary);
                }
                let declared = http
                    .as_ref()
                    .and_then(|op| op.success_schema())
                    .is_some_and(|s| s.get("type").and_then(Value::as_str) == Some("object"));
                match body {
                    Some(Value::Object(map)) => {
                        let mut result = CallToolResult::success(vec![ContentBlock::text(summary)]);
                        result.structured_content = Some(Value::Object(map));
                        result
                    }
                    // The tool promised an object: anything else breaks that promise.
                    _ if declared => tool_error(format!(
                        "{summary}\n(the upstream's body is not the JSON object its document describes)"
                    )),
                    _ => CallToolResult::success(vec![ContentBlock::text(summary)]),
                }
            }
            Err(CallError::Invalid(problems)) => tool_error_with(
                format!("the request does not fit operation {id}"),
                json!({ "problems": problems }),
            ),
            Err(e) => tool_error(format!("call {id} failed: {e}")),
        }
    }
}

fn missing_channel() -> CallToolResult {
    tool_error_with(
        "`channel` is required: a channel id from list_channels".into(),
        json!({ "path": "/channel", "schemaPath": "/required" }),
    )
}
