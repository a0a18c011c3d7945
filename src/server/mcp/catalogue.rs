//! The tools the gateway offers agents, generated from the routing table and the operations:
//! three fixed tools over the channels and the log, one `publish_*` tool per writable channel,
//! one `call_*` tool per request-reply operation. Names are derived from the ids alone, so they
//! stay the same across restarts; what a caller sees is filtered by its scopes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::{Value, json};

use crate::auth::{Need, Principal};
use crate::calls::Operations;
use crate::hub::Hub;
use crate::routing::{ChannelId, Route};

pub const LIST_CHANNELS: &str = "list_channels";
pub const DESCRIBE_CHANNEL: &str = "describe_channel";
pub const READ_MESSAGES: &str = "read_messages";

/// Most messages `read_messages` returns at once (the replay API's limit).
pub const READ_LIMIT_MAX: u64 = 1000;

/// Tool names stay within what LLM APIs accept (`^[A-Za-z0-9_-]{1,64}$`), a subset of MCP's
/// own rule (1-128 of `[A-Za-z0-9_.-]`).
const NAME_MAX: usize = 64;

/// What a tool does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolKind {
    ListChannels,
    DescribeChannel,
    ReadMessages,
    Publish(ChannelId),
    Call(ChannelId),
}

impl ToolKind {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ToolKind::ListChannels => "list_channels",
            ToolKind::DescribeChannel => "describe_channel",
            ToolKind::ReadMessages => "read_messages",
            ToolKind::Publish(_) => "publish",
            ToolKind::Call(_) => "call",
        }
    }

    /// What calling it needs; `None` for tools whose need depends on the arguments (their
    /// handlers check per channel).
    pub fn need(&self) -> Option<Need> {
        match self {
            ToolKind::Publish(id) => Some(Need::Publish(id.to_string())),
            ToolKind::Call(id) => Some(Need::Call(id.to_string())),
            _ => None,
        }
    }
}

/// One tool and what it does.
pub struct CatalogueTool {
    pub kind: ToolKind,
    pub tool: Tool,
}

/// Every tool the gateway offers, before filtering by caller.
pub struct Catalogue {
    pub tools: Vec<CatalogueTool>,
    by_name: HashMap<String, usize>,
    /// Channel id → its publish tool's name.
    pub publish_tools: HashMap<ChannelId, String>,
}

impl Catalogue {
    pub fn build(hub: &Hub, operations: &Operations) -> Catalogue {
        let mut tools = vec![
            CatalogueTool {
                kind: ToolKind::ListChannels,
                tool: list_channels_tool(),
            },
            CatalogueTool {
                kind: ToolKind::DescribeChannel,
                tool: describe_channel_tool(),
            },
            CatalogueTool {
                kind: ToolKind::ReadMessages,
                tool: read_messages_tool(),
            },
        ];
        let writable: Vec<Arc<Route>> = hub
            .routes()
            .map(|r| r.route().clone())
            // An OpenAPI operation's channel is called, not published to: its call tool serves it.
            .filter(|r| r.direction.writable && r.request_reply.iter().all(|rr| rr.http.is_none()))
            .collect();
        let publish_names = derive_names("publish_", writable.iter().map(|r| r.id.as_ref()));
        let mut publish_tools = HashMap::new();
        for route in &writable {
            let name = publish_names[route.id.as_ref()].clone();
            publish_tools.insert(route.id.clone(), name.clone());
            tools.push(CatalogueTool {
                kind: ToolKind::Publish(route.id.clone()),
                tool: publish_tool(name, route),
            });
        }

        let mut calls: Vec<(ChannelId, Tool)> = Vec::new();
        let http = operations.list();
        let brokers = operations.broker_operations();
        let ids: Vec<String> = http
            .iter()
            .map(|o| o.id.to_string())
            .chain(brokers.iter().map(|o| o.id.to_string()))
            .collect();
        let call_names = derive_names("call_", ids.iter().map(String::as_str));
        for op in &http {
            let name = call_names[op.id.as_ref()].clone();
            let description = describe(
                op.description.as_deref(),
                &format!(
                    "Calls {} {} on {} and returns its response.",
                    op.method, op.path, op.base_url
                ),
            );
            let mut tool = Tool::new(name, description, object(op.request_schema()))
                .with_title(format!("Call {}", op.id))
                .with_annotations(
                    ToolAnnotations::new()
                        .read_only(op.method == reqwest::Method::GET)
                        .open_world(true),
                );
            // MCP's structured content is an object: only an object schema can describe it.
            if let Some(schema) = op.success_schema().filter(|s| is_object_schema(s)) {
                tool = tool.with_raw_output_schema(object(schema.clone()));
            }
            calls.push((op.id.clone(), tool));
        }
        for op in &brokers {
            let name = call_names[op.id.as_ref()].clone();
            let request = hub.route(&op.request).map(|r| r.route().clone());
            let description = describe(
                request.as_ref().and_then(|r| r.description.as_deref()),
                &format!(
                    "Sends a request on {} and waits (up to {} ms) for the reply on {}; the result is the reply message.",
                    op.request,
                    op.timeout.as_millis(),
                    op.reply.id()
                ),
            );
            let schema = match &request {
                Some(route) => broker_request_schema(route),
                None => json!({"type": "object"}),
            };
            let tool = Tool::new(name, description, object(schema))
                .with_title(format!("Call {}", op.id))
                .with_annotations(ToolAnnotations::new().read_only(false).open_world(true));
            calls.push((op.id.clone(), tool));
        }
        calls.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, tool) in calls {
            tools.push(CatalogueTool {
                kind: ToolKind::Call(id),
                tool,
            });
        }
        let by_name = tools
            .iter()
            .enumerate()
            .map(|(i, t)| (t.tool.name.to_string(), i))
            .collect();
        Catalogue {
            tools,
            by_name,
            publish_tools,
        }
    }

    pub fn get(&self, name: &str) -> Option<&CatalogueTool> {
        self.by_name.get(name).map(|&i| &self.tools[i])
    }

    /// The tools `principal` may use.
    pub fn visible<'a>(&'a self, principal: &'a Principal) -> impl Iterator<Item = &'a Tool> {
        self.tools
            .iter()
            .filter(|t| t.kind.need().is_none_or(|need| principal.allows(&need)))
            .map(|t| &t.tool)
    }
}

/// `prefix` + the id with every character outside `[A-Za-z0-9_-]` as `_`. A name that would be
/// too long, or that two ids would share, ends in a hash of its id instead, so that each id has
/// one name and the name depends only on the ids.
fn derive_names<'a>(prefix: &str, ids: impl Iterator<Item = &'a str>) -> HashMap<String, String> {
    let plain = |id: &str| -> String {
        let mut name = String::with_capacity(prefix.len() + id.len());
        name.push_str(prefix);
        name.extend(id.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        }));
        name
    };
    let ids: Vec<&str> = ids.collect();
    let mut uses: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        *uses.entry(plain(id)).or_default() += 1;
    }
    ids.iter()
        .map(|id| {
            let name = plain(id);
            let name = if name.len() > NAME_MAX || uses[&name] > 1 {
                let hash = format!("_{:08x}", fnv1a(id.as_bytes()) as u32);
                let keep = NAME_MAX - hash.len();
                let mut cut = name;
                cut.truncate(keep);
                cut + &hash
            } else {
                name
            };
            ((*id).to_owned(), name)
        })
        .collect()
}

/// FNV-1a: stable across builds and platforms (std's hasher is not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn describe(said: Option<&str>, what: &str) -> String {
    match said {
        Some(text) => format!("{text}\n\n{what}"),
        None => what.to_owned(),
    }
}

fn object(value: Value) -> Arc<JsonObject> {
    Arc::new(match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    })
}

fn is_object_schema(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
}

/// The key the message goes under in a publish tool's arguments (beside the parameters).
pub fn payload_key(route: &Route) -> &'static str {
    if route.parameters.iter().any(|p| p.name == "payload") {
        "_payload"
    } else {
        "payload"
    }
}

/// The message a channel carries, as one JSON Schema (`oneOf` when it has several).
pub fn payload_schema(route: &Route) -> Value {
    let schemas: Vec<Value> = route
        .messages
        .iter()
        .map(|m| m.json_schema.clone().unwrap_or_else(|| json!({})))
        .collect();
    match schemas.len() {
        0 => json!({}),
        1 => schemas.into_iter().next().unwrap_or_default(),
        _ => json!({ "oneOf": schemas }),
    }
}

/// The schema of one address parameter, as a string property.
pub fn parameter_schema(p: &crate::routing::RouteParameter) -> Value {
    let mut schema = match &p.schema {
        Some(Value::Object(map)) => Value::Object(map.clone()),
        _ => json!({"type": "string"}),
    };
    if let Some(obj) = schema.as_object_mut() {
        if let Some(allowed) = &p.allowed {
            obj.insert("enum".into(), json!(allowed));
        }
        if let Some(default) = &p.default {
            obj.insert("default".into(), json!(default));
        }
        if let Some(description) = &p.description {
            obj.entry("description")
                .or_insert_with(|| json!(description));
        }
    }
    schema
}

/// Whether a publish must name the parameter: it has no default, and the message does not
/// say where it is.
fn parameter_required(p: &crate::routing::RouteParameter) -> bool {
    p.default.is_none() && p.location.is_none()
}

fn publish_tool(name: String, route: &Route) -> Tool {
    let key = payload_key(route);
    let mut properties = serde_json::Map::new();
    let mut required = vec![json!(key)];
    for p in &route.parameters {
        properties.insert(p.name.clone(), parameter_schema(p));
        if parameter_required(p) {
            required.push(json!(p.name));
        }
    }
    properties.insert(key.into(), payload_schema(route));
    let schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    let address = route.address.as_deref().unwrap_or("(no address)");
    let upstreams: Vec<String> = route
        .upstreams
        .iter()
        .map(|u| format!("{} ({})", u.server, u.protocol))
        .collect();
    let description = describe(
        route.description.as_deref(),
        &format!(
            "Publishes one message on channel {} (address {address}) to {}. The payload is validated against the channel's schema; the result carries the offset the gateway logged it at.",
            route.id,
            if upstreams.is_empty() {
                "the gateway's log".to_owned()
            } else {
                upstreams.join(", ")
            }
        ),
    );
    Tool::new(name, description, object(schema))
        .with_title(format!("Publish on {}", route.id))
        .with_raw_output_schema(object(json!({
            "type": "object",
            "properties": {
                "channel": {"type": "string"},
                "offset": {"type": "integer"},
                "address": {"type": "string"},
                "params": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["channel", "offset", "address"],
        })))
        .with_annotations(
            ToolAnnotations::new()
                .read_only(false)
                .destructive(false)
                .idempotent(false)
                .open_world(true),
        )
}

fn broker_request_schema(route: &Route) -> Value {
    let mut path = serde_json::Map::new();
    let mut required = Vec::new();
    for p in &route.parameters {
        path.insert(p.name.clone(), parameter_schema(p));
        if parameter_required(p) {
            required.push(json!(p.name));
        }
    }
    let mut properties = serde_json::Map::new();
    let mut sections = vec![json!("body")];
    if !path.is_empty() {
        if !required.is_empty() {
            sections.push(json!("path"));
        }
        properties.insert(
            "path".into(),
            json!({"type": "object", "properties": path, "required": required}),
        );
    }
    properties.insert("body".into(), payload_schema(route));
    properties.insert(
        "headers".into(),
        json!({"type": "object", "additionalProperties": {"type": "string"}}),
    );
    json!({
        "type": "object",
        "properties": properties,
        "required": sections,
        "additionalProperties": false,
    })
}

fn list_channels_tool() -> Tool {
    Tool::new(
        LIST_CHANNELS,
        "Lists the channels this key may read or write: id, direction, address, description, and the name of each channel's publish tool.",
        object(json!({"type": "object", "properties": {}, "additionalProperties": false})),
    )
    .with_title("List channels")
    .with_annotations(ToolAnnotations::new().read_only(true).open_world(false))
}

fn describe_channel_tool() -> Tool {
    Tool::new(
        DESCRIBE_CHANNEL,
        "Describes one channel: direction, address, parameters, message schemas, upstream servers and their state, the log's extent, and the recent message rate.",
        object(json!({
            "type": "object",
            "properties": {"channel": {"type": "string", "description": "A channel id from list_channels."}},
            "required": ["channel"],
            "additionalProperties": false,
        })),
    )
    .with_title("Describe a channel")
    .with_annotations(ToolAnnotations::new().read_only(true).open_world(false))
}

fn read_messages_tool() -> Tool {
    Tool::new(
        READ_MESSAGES,
        "Reads messages from a channel's log, oldest first: from an offset (`from`, with `limit`), or the most recent ones (`last`). Each message has its offset, address, parameters, headers, payload and timestamp (ms since the epoch); `next` is the offset to continue from.",
        object(json!({
            "type": "object",
            "properties": {
                "channel": {"type": "string", "description": "A channel id from list_channels."},
                "from": {"type": "integer", "minimum": 1, "description": "The first offset to read."},
                "limit": {"type": "integer", "minimum": 1, "maximum": READ_LIMIT_MAX, "default": 20},
                "last": {"type": "integer", "minimum": 1, "maximum": READ_LIMIT_MAX, "description": "Read the most recent N messages instead."},
            },
            "required": ["channel"],
            "additionalProperties": false,
        })),
    )
    .with_title("Read messages")
    .with_raw_output_schema(object(json!({
        "type": "object",
        "properties": {
            "channel": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object"}},
            "next": {"type": "integer"},
        },
        "required": ["channel", "messages", "next"],
    })))
    .with_annotations(ToolAnnotations::new().read_only(true).open_world(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_ids_and_stay_unique_and_short() {
        let long = "a".repeat(100);
        let ids = ["iot.commands", "iot_commands", "weird id/€", long.as_str()];
        let names = derive_names("publish_", ids.iter().copied());
        // `.` and `_` would give the same name: both carry their id's hash.
        assert_ne!(names["iot.commands"], names["iot_commands"]);
        assert!(names["iot.commands"].starts_with("publish_iot_commands_"));
        assert_eq!(names["weird id/€"], "publish_weird_id__");
        for name in names.values() {
            assert!(name.len() <= NAME_MAX, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
        }
        // Alone, an id keeps its plain name; and the same ids give the same names every time.
        let alone = derive_names("publish_", ["iot.commands"].into_iter());
        assert_eq!(alone["iot.commands"], "publish_iot_commands");
        assert_eq!(derive_names("publish_", ids.iter().copied()), names);
    }
}
