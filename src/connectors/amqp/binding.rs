//! AMQP 0-9-1 bindings: the exchange (or queue) a channel is, the queue the gateway consumes
//! with its binding key, and the publish flags of `send` operations.

use serde::Serialize;
use serde_json::Value;

use crate::routing::address::{AddressError, FillError, ProtocolAddress, Selector};
use crate::routing::envelope::Transport;
use crate::routing::{BindingReader, ChannelContext, ProtocolRoute, UpstreamBinding};
use crate::spec::Action;

#[derive(Debug, Clone, Serialize)]
pub struct AmqpRoute {
    #[serde(skip)]
    pub routing_key: Option<ProtocolAddress>,
    pub exchange: Option<AmqpExchange>,
    /// The queue to consume (`is: queue`, or the declared queue for a `routingKey` channel).
    pub queue: Option<AmqpQueue>,
    /// The binding key for the consumer's queue (a topic pattern).
    pub binding_key: Option<Selector>,
    pub publish: AmqpPublish,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AmqpExchange {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub vhost: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AmqpQueue {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// True when the gateway named it (no queue in the bindings).
    pub generated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AmqpPublish {
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub expiration: Option<u64>,
    pub mandatory: bool,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
}

impl ProtocolRoute for AmqpRoute {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    fn transport(&self) -> Transport {
        Transport::Amqp
    }

    fn address<'v>(
        &self,
        value_of: &dyn Fn(&str) -> Option<&'v str>,
        _generic: &str,
    ) -> Result<String, FillError> {
        match &self.routing_key {
            Some(k) => k.fill(value_of),
            None => Ok(String::new()),
        }
    }

    fn describe(&self) -> String {
        match (&self.exchange, &self.queue) {
            (Some(x), _) => format!(
                "exchange {} ({}) key {}",
                x.name,
                x.kind,
                self.binding_key
                    .as_ref()
                    .map_or("-", |k| k.pattern.as_str())
            ),
            (None, Some(q)) => format!("queue {}", q.name),
            (None, None) => "amqp".into(),
        }
    }
}

pub struct AmqpBindings;

impl BindingReader for AmqpBindings {
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding> {
        let Some(template) = cx.template else {
            return Some(UpstreamBinding::DynamicAddress);
        };
        let binding = cx.channel_binding("amqp").cloned().unwrap_or(Value::Null);
        let binding_at = cx.channel.location.join("bindings").join("amqp");
        let is_queue = binding.get("is").and_then(Value::as_str) == Some("queue");
        let flag = |v: Option<&Value>, key: &str, default: bool| {
            v.and_then(|v| v.get(key))
                .and_then(Value::as_bool)
                .unwrap_or(default)
        };
        let exchange_binding = binding.get("exchange");
        let queue_binding = binding.get("queue");
        let routing_key = match template.amqp() {
            Ok(k) => k,
            Err(e) => {
                cx.address_error(e);
                return None;
            }
        };
        let send = cx.operation_binding(Action::Send, "amqp");
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let publish = AmqpPublish {
            delivery_mode: send
                .and_then(|b| b.get("deliveryMode"))
                .and_then(Value::as_u64)
                .map(|m| m as u8),
            priority: send
                .and_then(|b| b.get("priority"))
                .and_then(Value::as_u64)
                .map(|p| p.min(255) as u8),
            expiration: send
                .and_then(|b| b.get("expiration"))
                .and_then(Value::as_u64),
            mandatory: flag(send, "mandatory", false),
            cc: strings(send.and_then(|b| b.get("cc"))),
            bcc: strings(send.and_then(|b| b.get("bcc"))),
        };
        if is_queue {
            let name = queue_binding
                .and_then(|q| q.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| routing_key.literal());
            let Some(name) = name else {
                // A queue named by a parameter (the RPC pattern's `{queue}`) exists only once a
                // request names it, e.g. in its reply-to.
                let message = format!(
                    "route {}: the queue name is a parameter, so the queue is only known at run time (reply-to)",
                    cx.route_id()
                );
                cx.warn(binding_at, message);
                return Some(UpstreamBinding::DynamicAddress);
            };
            return Some(UpstreamBinding::new(AmqpRoute {
                routing_key: Some(routing_key),
                exchange: None,
                queue: Some(AmqpQueue {
                    name,
                    durable: flag(queue_binding, "durable", true),
                    exclusive: flag(queue_binding, "exclusive", false),
                    auto_delete: flag(queue_binding, "autoDelete", false),
                    generated: false,
                }),
                binding_key: None,
                publish,
            }));
        }
        let exchange = AmqpExchange {
            name: exchange_binding
                .and_then(|e| e.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("amq.topic")
                .to_owned(),
            kind: exchange_binding
                .and_then(|e| e.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("topic")
                .to_owned(),
            durable: flag(exchange_binding, "durable", true),
            auto_delete: flag(exchange_binding, "autoDelete", false),
            vhost: exchange_binding
                .and_then(|e| e.get("vhost"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        let binding_key = match exchange.kind.as_str() {
            "topic" => Some(routing_key.wildcard_selector()),
            "direct" | "default" => match routing_key.literal() {
                Some(key) => Some(Selector {
                    pattern: key,
                    exact: true,
                }),
                None => {
                    cx.address_error(
                        AddressError::Inexpressible {
                            protocol: "AMQP",
                            reason: format!(
                                "a {} exchange matches routing keys exactly, so the parameters cannot vary; use a topic exchange",
                                exchange.kind
                            ),
                        },
                    );
                    return None;
                }
            },
            // fanout and headers exchanges ignore the routing key.
            _ => None,
        };
        let queue = queue_binding
            .and_then(|q| q.get("name"))
            .and_then(Value::as_str)
            .map(|name| AmqpQueue {
                name: name.to_owned(),
                durable: flag(queue_binding, "durable", true),
                exclusive: flag(queue_binding, "exclusive", false),
                auto_delete: flag(queue_binding, "autoDelete", false),
                generated: false,
            })
            .or_else(|| {
                Some(AmqpQueue {
                    name: format!("stepflow.{}", cx.route_id()),
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    generated: true,
                })
            });
        Some(UpstreamBinding::new(AmqpRoute {
            routing_key: Some(routing_key),
            exchange: Some(exchange),
            queue,
            binding_key,
            publish,
        }))
    }
}
