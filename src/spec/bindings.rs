//! Protocol bindings: the fields each binding object may have, and the values the gateway relies
//! on (MQTT QoS, AMQP `is` and exchange type, HTTP method, ...), checked at load time.
//!
//! Bindings of protocols the gateway has no rules for are kept as written.

use serde_json::Value;

use super::error::{Location, SpecErrorKind, type_name};
use super::model::Bindings;
use super::reader::Reader;
use super::source::Node;

/// The object a bindings map belongs to; each allows different fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingTarget {
    Server,
    Channel,
    Operation,
    Message,
}

const HTTP_METHODS: [&str; 9] = [
    "GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

fn allowed_fields(protocol: &str, target: BindingTarget) -> Option<&'static [&'static str]> {
    use BindingTarget::*;
    Some(match (protocol, target) {
        ("mqtt", Server) => &[
            "clientId",
            "cleanSession",
            "lastWill",
            "keepAlive",
            "sessionExpiryInterval",
            "maximumPacketSize",
            "bindingVersion",
        ],
        ("mqtt", Channel) => &["bindingVersion"],
        ("mqtt", Operation) => &["qos", "retain", "messageExpiryInterval", "bindingVersion"],
        ("mqtt", Message) => &[
            "payloadFormatIndicator",
            "correlationData",
            "contentType",
            "responseTopic",
            "bindingVersion",
        ],
        ("kafka", Server) => &[
            "schemaRegistryUrl",
            "schemaRegistryVendor",
            "bindingVersion",
        ],
        ("kafka", Channel) => &[
            "topic",
            "partitions",
            "replicas",
            "topicConfiguration",
            "bindingVersion",
        ],
        ("kafka", Operation) => &["groupId", "clientId", "bindingVersion"],
        ("kafka", Message) => &[
            "key",
            "schemaIdLocation",
            "schemaIdPayloadEncoding",
            "schemaLookupStrategy",
            "bindingVersion",
        ],
        ("amqp", Server) => &["bindingVersion"],
        ("amqp", Channel) => &["is", "exchange", "queue", "bindingVersion"],
        ("amqp", Operation) => &[
            "expiration",
            "userId",
            "cc",
            "priority",
            "deliveryMode",
            "mandatory",
            "bcc",
            "replyTo",
            "timestamp",
            "ack",
            "bindingVersion",
        ],
        ("amqp", Message) => &["contentEncoding", "messageType", "bindingVersion"],
        ("http", Server) | ("http", Channel) => &["bindingVersion"],
        ("http", Operation) => &["type", "method", "query", "bindingVersion"],
        ("http", Message) => &["headers", "statusCode", "bindingVersion"],
        ("ws", Server) | ("ws", Operation) | ("ws", Message) => &["bindingVersion"],
        ("ws", Channel) => &["method", "query", "headers", "bindingVersion"],
        _ => return None,
    })
}

/// Reads the `bindings` member of `owner` (if any): reference-free, each known binding checked.
pub fn read_bindings(reader: &mut Reader<'_>, owner: &Node, target: BindingTarget) -> Bindings {
    let Some(node) = owner.get("bindings") else {
        return Bindings::new();
    };
    // `bindings:` or `ws:` with nothing after it is an empty binding, as YAML authors mean it
    // (the specification's schemas say "object", but an empty value configures nothing).
    if node.value().is_null() {
        reader.warn(node.loc.clone(), "empty `bindings`: nothing to configure");
        return Bindings::new();
    }
    let Some(node) = reader.object(&node) else {
        return Bindings::new();
    };
    let Some(inlined) = reader.inline(&node) else {
        return Bindings::new();
    };
    let Value::Object(mut map) = inlined.value else {
        return Bindings::new();
    };
    for (protocol, binding) in map.iter_mut() {
        let at = node.loc.join(protocol);
        if binding.is_null() {
            reader.warn(
                at,
                format!("empty `{protocol}` binding: the protocol's defaults apply"),
            );
            *binding = Value::Object(serde_json::Map::new());
            continue;
        }
        check_binding(reader, &at, protocol, target, binding);
    }
    map
}

fn check_binding(
    reader: &mut Reader<'_>,
    at: &Location,
    protocol: &str,
    target: BindingTarget,
    binding: &Value,
) {
    let Some(allowed) = allowed_fields(protocol, target) else {
        return;
    };
    let protocol: &'static str = match protocol {
        "mqtt" => "mqtt",
        "kafka" => "kafka",
        "amqp" => "amqp",
        "http" => "http",
        "ws" => "ws",
        _ => return,
    };
    let Some(map) = binding.as_object() else {
        reader.error(
            at.clone(),
            SpecErrorKind::WrongType {
                expected: "a mapping",
                found: type_name(binding),
            },
        );
        return;
    };
    let mut unpinned_unknown = Vec::new();
    let mut problem = |field: &str, problem: String| {
        reader.error(
            at.join(field),
            SpecErrorKind::InvalidBinding { protocol, problem },
        );
    };
    // A binding that pins `bindingVersion` is checked like its JSON Schema does
    // (`additionalProperties: false`); an unpinned one only gets a warning, because official
    // examples carry such fields and the gateway ignores what it does not know.
    let pinned = map.contains_key("bindingVersion");
    let unknown: Vec<&String> = map
        .keys()
        .filter(|key| !key.starts_with("x-") && !allowed.contains(&key.as_str()))
        .collect();
    for key in unknown {
        let message = format!("unknown property `{key}` (allowed: {})", allowed.join(", "));
        if pinned {
            problem(key, message);
        } else {
            unpinned_unknown.push((
                at.join(key),
                format!("{protocol} binding: {message}; ignored"),
            ));
        }
    }
    match (protocol, target) {
        ("mqtt", BindingTarget::Operation) => {
            if let Some(qos) = map.get("qos")
                && !matches!(qos.as_u64(), Some(0..=2))
            {
                problem("qos", format!("qos must be 0, 1 or 2, found {qos}"));
            }
            if let Some(retain) = map.get("retain")
                && !retain.is_boolean()
            {
                problem(
                    "retain",
                    format!("retain must be a boolean, found {retain}"),
                );
            }
        }
        ("amqp", BindingTarget::Channel) => {
            if let Some(is) = map.get("is")
                && !matches!(is.as_str(), Some("queue" | "routingKey"))
            {
                problem(
                    "is",
                    format!("`is` must be 'queue' or 'routingKey', found {is}"),
                );
            }
            if let Some(exchange_type) = map.get("exchange").and_then(|e| e.get("type"))
                && !matches!(
                    exchange_type.as_str(),
                    Some("topic" | "direct" | "fanout" | "default" | "headers")
                )
            {
                problem(
                    "exchange",
                    format!(
                        "exchange.type must be topic, direct, fanout, default or headers, found {exchange_type}"
                    ),
                );
            }
        }
        ("amqp", BindingTarget::Operation) => {
            if let Some(mode) = map.get("deliveryMode")
                && !matches!(mode.as_u64(), Some(1 | 2))
            {
                problem(
                    "deliveryMode",
                    format!("deliveryMode must be 1 (transient) or 2 (persistent), found {mode}"),
                );
            }
        }
        ("http", BindingTarget::Operation) => {
            if let Some(method) = map.get("method")
                && !method.as_str().is_some_and(|m| HTTP_METHODS.contains(&m))
            {
                problem(
                    "method",
                    format!(
                        "method must be one of {}, found {method}",
                        HTTP_METHODS.join(", ")
                    ),
                );
            }
            if let Some(kind) = map.get("type")
                && !matches!(kind.as_str(), Some("request" | "response"))
            {
                problem(
                    "type",
                    format!("type must be 'request' or 'response', found {kind}"),
                );
            }
        }
        ("ws", BindingTarget::Channel) => {
            if let Some(method) = map.get("method")
                && !matches!(method.as_str(), Some("GET" | "POST"))
            {
                problem(
                    "method",
                    format!("method must be GET or POST, found {method}"),
                );
            }
        }
        _ => {}
    }
    for (location, message) in unpinned_unknown {
        reader.warn(location, message);
    }
}
