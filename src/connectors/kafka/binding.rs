//! Kafka bindings: the topic (the address, or a literal `bindings.kafka.topic`), the consumer
//! group, and how produced messages are keyed.

use serde::Serialize;
use serde_json::Value;

use crate::routing::address::{AddressTemplate, FillError, ProtocolAddress, Selector};
use crate::routing::envelope::Transport;
use crate::routing::{BindingReader, ChannelContext, ProtocolRoute, UpstreamBinding};
use crate::spec::Action;
use crate::template::Template;

#[derive(Debug, Clone, Serialize)]
pub struct KafkaRoute {
    /// `None` when `bindings.kafka.topic` fixes the topic (parameters cannot come from it).
    #[serde(skip)]
    pub topic: Option<ProtocolAddress>,
    pub subscription: Selector,
    pub group_id: String,
    /// The message binding's `key` schema, as written.
    pub key: Option<Value>,
    /// How the gateway keys what it produces: `bindings.kafka.x-stepflow-key`, a template of
    /// address parameters (`{deviceId}`); without it the key is the concrete address.
    #[serde(rename = "key_template", serialize_with = "template_source")]
    pub key_template: Option<Template>,
}

fn template_source<S: serde::Serializer>(t: &Option<Template>, s: S) -> Result<S::Ok, S::Error> {
    t.as_ref().map(Template::source).serialize(s)
}

impl ProtocolRoute for KafkaRoute {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn transport(&self) -> Transport {
        Transport::Kafka
    }

    fn address<'v>(
        &self,
        value_of: &dyn Fn(&str) -> Option<&'v str>,
        _generic: &str,
    ) -> Result<String, FillError> {
        match &self.topic {
            Some(t) => t.fill(value_of),
            None => Ok(self.subscription.pattern.clone()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "topic {} group {}",
            self.subscription.pattern, self.group_id
        )
    }
}

pub struct KafkaBindings;

impl BindingReader for KafkaBindings {
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding> {
        let channel_binding = cx.channel_binding("kafka");
        let fixed_topic = channel_binding
            .and_then(|k| k.get("topic"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (topic, subscription) = match fixed_topic {
            Some(name) => match AddressTemplate::parse(&name).and_then(|t| t.kafka()) {
                Ok(t) if t.literal().is_some() => (None, t.kafka_selector()),
                Ok(_) => {
                    cx.binding_error(
                        "kafka",
                        "topic",
                        format!("topic '{name}' must be a literal topic name"),
                    );
                    return None;
                }
                Err(e) => {
                    cx.binding_error("kafka", "topic", e.to_string());
                    return None;
                }
            },
            None => {
                let Some(template) = cx.template else {
                    return Some(UpstreamBinding::DynamicAddress);
                };
                match template.kafka() {
                    Ok(t) => {
                        let selector = t.kafka_selector();
                        (Some(t), selector)
                    }
                    Err(e) => {
                        cx.address_error(e);
                        return None;
                    }
                }
            }
        };
        let group_id = cx
            .operation_binding(Action::Receive, "kafka")
            .and_then(|b| b.get("groupId"))
            .and_then(schema_or_literal)
            .unwrap_or_else(|| format!("stepflow-{}", cx.api.id));
        let key = cx
            .channel
            .messages
            .iter()
            .find_map(|m| m.bindings.get("kafka").and_then(|k| k.get("key")).cloned());
        let key_template = match cx
            .channel_binding("kafka")
            .and_then(|k| k.get("x-stepflow-key"))
            .and_then(Value::as_str)
        {
            None => None,
            Some(source) => match key_template(source, cx.template) {
                Ok(t) => Some(t),
                Err(problem) => {
                    cx.binding_error("kafka", "x-stepflow-key", problem);
                    return None;
                }
            },
        };
        Some(UpstreamBinding::new(KafkaRoute {
            topic,
            subscription,
            group_id,
            key,
            key_template,
        }))
    }
}

/// Compiles `x-stepflow-key`: each `{name}` must be a parameter of the address.
fn key_template(source: &str, address: Option<&AddressTemplate>) -> Result<Template, String> {
    let template = Template::parse(source).map_err(|e| format!("key template '{source}' {e}"))?;
    let names: Vec<&str> = address.map(|a| a.params().collect()).unwrap_or_default();
    if let Some(name) = template.names().find(|n| !names.contains(n)) {
        return Err(format!(
            "key template '{source}' names '{name}', which is not a parameter of the address"
        ));
    }
    Ok(template)
}

/// A binding value written either as a literal or as a schema pinning it (`const`, a single
/// `enum`, or a `default`), as Kafka `groupId` bindings are.
fn schema_or_literal(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(schema) => schema
            .get("const")
            .or_else(|| {
                schema
                    .get("enum")
                    .and_then(Value::as_array)
                    .filter(|e| e.len() == 1)
                    .and_then(|e| e.first())
            })
            .or_else(|| schema.get("default"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}
