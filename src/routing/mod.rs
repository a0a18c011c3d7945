//! The routing table: one [`Route`] per channel, compiled from the loaded documents.
//!
//! Compilation turns each channel into everything the runtime needs without looking at the
//! documents again: its direction (readable by web clients, writable by them, or both — DESIGN
//! §3), its address template in each upstream protocol's form, its compiled payload validators,
//! and the delivery guarantee its upstreams can give. All errors are collected before anything
//! starts. This module knows `spec` and `schema`; it never imports a protocol client or axum.

pub mod address;
pub mod envelope;
pub mod filter;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::schema::{Encoding, PayloadSchema, ValidationError};
use crate::spec::{
    Action, Api, Channel, Location, Protocol, ProtocolFamily, Role, SpecError, SpecErrorKind,
    SpecWarning,
};
use address::{AddressError, AddressTemplate, ProtocolAddress, Selector};

/// A route's id: `{api}.{channel}`. Used in URLs (`/ws/{id}`) and as the `channel` metric label.
pub type ChannelId = Arc<str>;

/// Whether web clients and bridges may read from, or write to, a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Direction {
    /// The application receives on the channel: the gateway subscribes upstream and fans out.
    pub readable: bool,
    /// The application sends on the channel: clients publish and the gateway forwards upstream.
    pub writable: bool,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match (self.readable, self.writable) {
            (true, true) => "both",
            (true, false) => "readable",
            (false, true) => "writable",
            (false, false) => "none",
        }
    }
}

/// What a route's upstreams can promise for messages the gateway receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "guarantee", content = "reason", rename_all = "kebab-case")]
pub enum Delivery {
    /// Upstream redelivers until the gateway acknowledges (MQTT QoS ≥ 1, Kafka, AMQP).
    AtLeastOnce,
    /// Upstream cannot redeliver: what is lost in a crash is lost (the reason says why).
    AtMostOnce(String),
    /// Nothing is received upstream on this route.
    NotApplicable,
}

/// A message a route may carry, with its compiled validators.
#[derive(Debug, Serialize)]
pub struct RouteMessage {
    pub id: String,
    pub name: Option<String>,
    pub content_type: Option<String>,
    #[serde(skip)]
    pub encoding: Encoding,
    /// The payload schema as written (for listings and `/api/v1/channels/{id}`).
    pub schema: Option<Value>,
    pub schema_format: Option<String>,
    #[serde(skip)]
    pub payload: Option<Arc<PayloadSchema>>,
    #[serde(skip)]
    pub headers: Option<Arc<PayloadSchema>>,
    pub correlation_id: Option<String>,
}

/// A parameter of the route's address.
#[derive(Debug, Clone, Serialize)]
pub struct RouteParameter {
    pub name: String,
    pub allowed: Option<Vec<String>>,
    pub default: Option<String>,
    pub location: Option<String>,
    /// The parameter's schema (AsyncAPI 2), compiled; values are checked against it as strings.
    #[serde(skip)]
    pub validator: Option<Arc<PayloadSchema>>,
}

impl RouteParameter {
    /// Checks a value against `allowed` and the schema.
    pub fn check(&self, value: &str) -> Result<(), address::FillError> {
        if let Some(allowed) = &self.allowed
            && !allowed.iter().any(|a| a == value)
        {
            return Err(address::FillError::NotAllowed {
                name: self.name.clone(),
                value: value.to_owned(),
                allowed: allowed.join(", "),
            });
        }
        if let Some(validator) = &self.validator
            && let Err(e) = validator.validate_json(&Value::String(value.to_owned()))
        {
            return Err(address::FillError::SchemaMismatch {
                name: self.name.clone(),
                value: value.to_owned(),
                reason: e.reason,
            });
        }
        Ok(())
    }
}

/// How a route maps onto one upstream server.
#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    pub server: String,
    pub protocol: Protocol,
    pub url: String,
    pub binding: UpstreamBinding,
}

/// The protocol-specific part of an upstream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum UpstreamBinding {
    Mqtt(MqttRoute),
    Kafka(KafkaRoute),
    Amqp(AmqpRoute),
    WebSocket(WebSocketRoute),
    /// An HTTP channel marked as a Server-Sent Events stream.
    Sse(SseRoute),
    Http(HttpRoute),
    /// The channel's address is dynamic (`address: null`), given at run time (e.g. a reply-to).
    DynamicAddress,
    /// A protocol the gateway has no connector for; the route still serves web clients.
    NoConnector,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttRoute {
    #[serde(skip)]
    pub topic: ProtocolAddress,
    pub filter: Selector,
    pub subscribe_qos: u8,
    pub publish_qos: u8,
    pub retain: bool,
}

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
    pub key_template: Option<String>,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    pub method: String,
    pub path: String,
}

/// A request-reply exchange on a route (AsyncAPI 3 `reply`, every OpenAPI operation).
#[derive(Debug, Clone, Serialize)]
pub struct RequestReply {
    pub operation: String,
    /// `send`: the gateway sends the request and waits for the reply; `receive`: it answers.
    pub action: Action,
    /// The reply route, when the reply travels on a channel.
    pub reply_channel: Option<ChannelId>,
    pub reply_address_location: Option<String>,
    /// Present for OpenAPI operations.
    pub http: Option<HttpRoute>,
}

/// One channel, ready to run.
#[derive(Debug, Serialize)]
pub struct Route {
    pub id: ChannelId,
    pub api: String,
    pub channel: String,
    pub address: Option<String>,
    #[serde(skip)]
    pub template: Option<AddressTemplate>,
    pub parameters: Vec<RouteParameter>,
    pub direction: Direction,
    pub delivery: Delivery,
    pub upstreams: Vec<Upstream>,
    pub messages: Vec<RouteMessage>,
    pub operations: Vec<String>,
    pub request_reply: Vec<RequestReply>,
}

impl Route {
    /// Checks a payload against the route's messages: `Ok(Some(id))` names the message it
    /// matched, `Ok(None)` means no message has an enforced schema. With several messages the
    /// payload must match one; the error then is the first message's.
    pub fn validate(&self, payload: &[u8]) -> Result<Option<&str>, ValidationError> {
        let mut checked = self
            .messages
            .iter()
            .filter(|m| m.payload.as_ref().is_some_and(|p| p.is_enforced()));
        let Some(first) = checked.next() else {
            return Ok(None);
        };
        let first_result = first
            .payload
            .as_ref()
            .expect("filtered on payload")
            .validate(payload, first.encoding);
        if first_result.is_ok() {
            return Ok(Some(&first.id));
        }
        for message in checked {
            let schema = message.payload.as_ref().expect("filtered on payload");
            if schema.validate(payload, message.encoding).is_ok() {
                return Ok(Some(&message.id));
            }
        }
        first_result.map(|_| None)
    }

    /// The upstream of a protocol family, if the route has one.
    pub fn upstream(&self, family: ProtocolFamily) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| u.protocol.family() == family)
    }
}

/// Every route, by id.
#[derive(Debug, Default)]
pub struct RoutingTable {
    routes: Vec<Arc<Route>>,
    by_id: HashMap<ChannelId, usize>,
}

impl RoutingTable {
    pub fn get(&self, id: &str) -> Option<&Arc<Route>> {
        self.by_id.get(id).map(|&i| &self.routes[i])
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// A compiled table and what an operator should know about it.
#[derive(Debug)]
pub struct Compiled {
    pub table: RoutingTable,
    pub warnings: Vec<SpecWarning>,
}

/// Compiles documents into a routing table, or returns every error found.
pub fn compile(apis: &[Api]) -> Result<Compiled, Vec<SpecError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut table = RoutingTable::default();
    for api in apis {
        for channel in &api.channels {
            let mut cx = ChannelCompiler {
                api,
                channel,
                errors: &mut errors,
                warnings: &mut warnings,
            };
            if let Some(route) = cx.compile() {
                let index = table.routes.len();
                table.by_id.insert(route.id.clone(), index);
                table.routes.push(Arc::new(route));
            }
        }
    }
    if errors.is_empty() {
        Ok(Compiled { table, warnings })
    } else {
        Err(errors)
    }
}

struct ChannelCompiler<'a> {
    api: &'a Api,
    channel: &'a Channel,
    errors: &'a mut Vec<SpecError>,
    warnings: &'a mut Vec<SpecWarning>,
}

impl ChannelCompiler<'_> {
    fn error(&mut self, location: Location, kind: SpecErrorKind) {
        self.errors.push(SpecError::new(location, kind));
    }

    fn route_id(&self, channel: &str) -> ChannelId {
        format!("{}.{}", self.api.id, channel).into()
    }

    fn compile(&mut self) -> Option<Route> {
        let errors_before = self.errors.len();
        let channel = self.channel;
        let address_at = channel.location.join("address");
        let template = match channel.address.as_deref().map(AddressTemplate::parse) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                self.address_error(&address_at, e);
                None
            }
        };
        let direction = self.direction();
        let operations: Vec<String> = self
            .api
            .operations
            .iter()
            .filter(|o| o.channel == channel.id)
            .map(|o| o.id.clone())
            .collect();
        let messages = self.messages();
        let upstreams = self.upstreams(template.as_ref(), direction, &address_at);
        let delivery = self.delivery(direction, &upstreams);
        let request_reply = self.request_reply();
        let parameters = self.parameters();
        if self.errors.len() != errors_before {
            return None;
        }
        Some(Route {
            id: self.route_id(&channel.id),
            api: self.api.id.clone(),
            channel: channel.id.clone(),
            address: channel.address.clone(),
            template,
            parameters,
            direction,
            delivery,
            upstreams,
            messages,
            operations,
            request_reply,
        })
    }

    fn address_error(&mut self, at: &Location, error: AddressError) {
        let address = self.channel.address.clone().unwrap_or_default();
        self.error(
            at.clone(),
            SpecErrorKind::BadChannelAddress {
                address,
                problem: error.to_string(),
            },
        );
    }

    /// DESIGN §3: receive → readable, send → writable; a reply channel is read by the side that
    /// sent the request and written by the side that answers. When the gateway is the client of
    /// the server a document describes, it is the other side: every direction flips.
    fn direction(&self) -> Direction {
        let mut d = Direction::default();
        for op in &self.api.operations {
            if op.channel == self.channel.id {
                match op.action {
                    Action::Receive => d.readable = true,
                    Action::Send => d.writable = true,
                }
            }
            let reply_here = op
                .reply
                .as_ref()
                .and_then(|r| r.channel.as_deref())
                .is_some_and(|c| c == self.channel.id && op.http.is_none());
            if reply_here {
                match op.action {
                    Action::Send => d.readable = true,
                    Action::Receive => d.writable = true,
                }
            }
        }
        if self.api.role == Role::Client {
            std::mem::swap(&mut d.readable, &mut d.writable);
        }
        d
    }

    fn messages(&mut self) -> Vec<RouteMessage> {
        let mut out = Vec::new();
        for message in &self.channel.messages {
            let payload = message.payload.as_ref().and_then(|def| {
                let schema = self.compile_schema(def)?;
                if let PayloadSchema::Unchecked { reason } = &*schema {
                    self.warnings.push(SpecWarning {
                        location: def.location.clone(),
                        message: format!("payload not validated: {reason}"),
                    });
                }
                Some(schema)
            });
            // An example that its own schema refuses misleads every reader of the document;
            // the reference parser reports it too. A warning: the document still runs.
            if let Some(schema) = &payload {
                for example in &message.examples {
                    if let Err(e) = schema.validate_json(&example.payload) {
                        self.warnings.push(SpecWarning {
                            location: example.location.clone(),
                            message: format!(
                                "example does not match the payload schema: {} (at '{}')",
                                e.reason, e.instance_path
                            ),
                        });
                    }
                }
            }
            let headers = message
                .headers
                .as_ref()
                .and_then(|def| self.compile_schema(def));
            let format = message.payload.as_ref().map(|p| p.format.clone());
            out.push(RouteMessage {
                id: message.id.clone(),
                name: message.name.clone(),
                content_type: message.content_type.clone(),
                encoding: format.as_ref().map_or(Encoding::Json, |f| {
                    Encoding::for_message(f, message.content_type.as_deref())
                }),
                schema: message.payload.as_ref().map(|p| p.schema.clone()),
                schema_format: format.map(|f| f.to_string()),
                payload,
                headers,
                correlation_id: message.correlation_id.clone(),
            });
        }
        out
    }

    /// Compiles a schema; a schema that does not compile is an error at its location.
    fn compile_schema(&mut self, def: &crate::spec::SchemaDef) -> Option<Arc<PayloadSchema>> {
        match PayloadSchema::compile(def) {
            Ok(schema) => Some(Arc::new(schema)),
            Err(e) => {
                self.error(
                    def.location.clone(),
                    SpecErrorKind::InvalidSchema {
                        format: e.format,
                        reason: e.reason,
                    },
                );
                None
            }
        }
    }

    fn parameters(&mut self) -> Vec<RouteParameter> {
        let mut out = Vec::new();
        for p in &self.channel.parameters {
            let validator = p.schema.as_ref().and_then(|schema| {
                let def = crate::spec::SchemaDef {
                    format: crate::spec::SchemaFormat::AsyncApi,
                    schema: schema.clone(),
                    remote_refs: Vec::new(),
                    location: self.channel.location.join("parameters").join(&p.name),
                };
                self.compile_schema(&def)
            });
            out.push(RouteParameter {
                name: p.name.clone(),
                allowed: p.allowed.clone(),
                default: p.default.clone(),
                location: p.location.clone(),
                validator,
            });
        }
        out
    }

    fn servers(&self) -> Vec<&crate::spec::Server> {
        if self.channel.servers.is_empty() {
            self.api.servers.iter().collect()
        } else {
            self.channel
                .servers
                .iter()
                .filter_map(|id| self.api.server(id))
                .collect()
        }
    }

    /// The binding of `protocol` on the channel's operations with `action`.
    fn operation_binding(&self, action: Action, protocol: &str) -> Option<&Value> {
        self.api
            .operations
            .iter()
            .filter(|o| o.channel == self.channel.id && o.action == action)
            .find_map(|o| o.bindings.get(protocol))
    }

    fn upstreams(
        &mut self,
        template: Option<&AddressTemplate>,
        direction: Direction,
        address_at: &Location,
    ) -> Vec<Upstream> {
        let servers: Vec<crate::spec::Server> = self.servers().into_iter().cloned().collect();
        let mut out = Vec::new();
        for server in servers {
            let binding = match (server.protocol.family(), template) {
                (ProtocolFamily::Other, _) => Some(UpstreamBinding::NoConnector),
                (ProtocolFamily::Kafka, _)
                    if self
                        .channel
                        .bindings
                        .get("kafka")
                        .and_then(|k| k.get("topic"))
                        .is_some() =>
                {
                    self.kafka(template, direction, address_at)
                }
                (_, None) => Some(UpstreamBinding::DynamicAddress),
                (ProtocolFamily::Mqtt, Some(t)) => self.mqtt(t, direction, address_at),
                (ProtocolFamily::Kafka, Some(_)) => self.kafka(template, direction, address_at),
                (ProtocolFamily::Amqp, Some(t)) => self.amqp(t, address_at),
                (ProtocolFamily::WebSocket, Some(t)) => Some(self.websocket(t)),
                (ProtocolFamily::Http, Some(t)) if self.is_event_stream() => Some(self.sse(t)),
                (ProtocolFamily::Http, Some(t)) => Some(UpstreamBinding::Http(HttpRoute {
                    method: self
                        .api
                        .operations
                        .iter()
                        .find(|o| o.channel == self.channel.id)
                        .and_then(|o| o.http.as_ref().map(|h| h.method.clone()))
                        .unwrap_or_else(|| "GET".into()),
                    path: t.as_str().to_owned(),
                })),
            };
            if let Some(binding) = binding {
                out.push(Upstream {
                    url: server.url(),
                    server: server.id.clone(),
                    protocol: server.protocol,
                    binding,
                });
            }
        }
        out
    }

    fn mqtt(
        &mut self,
        template: &AddressTemplate,
        direction: Direction,
        at: &Location,
    ) -> Option<UpstreamBinding> {
        let topic = match template.mqtt() {
            Ok(t) => t,
            Err(e) => {
                self.address_error(at, e);
                return None;
            }
        };
        // A wildcard address is a filter to receive on; a message sent needs one topic.
        if let Some(wildcard) = topic.wildcard()
            && direction.writable
        {
            self.address_error(
                at,
                AddressError::Inexpressible {
                    protocol: "MQTT",
                    reason: format!(
                        "the gateway sends on this channel, and a message cannot be published to the wildcard '{wildcard}'; use a parameter ({{name}}) for the level instead"
                    ),
                },
            );
            return None;
        }
        let qos = |b: Option<&Value>| {
            b.and_then(|b| b.get("qos"))
                .and_then(Value::as_u64)
                .map_or(1, |q| q as u8)
        };
        let send = self.operation_binding(Action::Send, "mqtt");
        Some(UpstreamBinding::Mqtt(MqttRoute {
            filter: topic.wildcard_selector(),
            subscribe_qos: qos(self.operation_binding(Action::Receive, "mqtt")),
            publish_qos: qos(send),
            retain: send
                .and_then(|b| b.get("retain"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            topic,
        }))
    }

    fn kafka(
        &mut self,
        template: Option<&AddressTemplate>,
        _direction: Direction,
        at: &Location,
    ) -> Option<UpstreamBinding> {
        let fixed_topic = self
            .channel
            .bindings
            .get("kafka")
            .and_then(|k| k.get("topic"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (topic, subscription) = match fixed_topic {
            Some(name) => match AddressTemplate::parse(&name).and_then(|t| t.kafka()) {
                Ok(t) if t.literal().is_some() => (None, t.kafka_selector()),
                Ok(_) => {
                    self.error(
                        self.channel
                            .location
                            .join("bindings")
                            .join("kafka")
                            .join("topic"),
                        SpecErrorKind::InvalidBinding {
                            protocol: "kafka",
                            problem: format!("topic '{name}' must be a literal topic name"),
                        },
                    );
                    return None;
                }
                Err(e) => {
                    self.error(
                        self.channel
                            .location
                            .join("bindings")
                            .join("kafka")
                            .join("topic"),
                        SpecErrorKind::InvalidBinding {
                            protocol: "kafka",
                            problem: e.to_string(),
                        },
                    );
                    return None;
                }
            },
            None => match template?.kafka() {
                Ok(t) => {
                    let selector = t.kafka_selector();
                    (Some(t), selector)
                }
                Err(e) => {
                    self.address_error(at, e);
                    return None;
                }
            },
        };
        let group_id = self
            .operation_binding(Action::Receive, "kafka")
            .and_then(|b| b.get("groupId"))
            .and_then(schema_or_literal)
            .unwrap_or_else(|| format!("stepflow-{}", self.api.id));
        let key = self
            .channel
            .messages
            .iter()
            .find_map(|m| m.bindings.get("kafka").and_then(|k| k.get("key")).cloned());
        let key_template = self
            .channel
            .bindings
            .get("kafka")
            .and_then(|k| k.get("x-stepflow-key"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let (Some(t), Some(address)) = (&key_template, template) {
            let names: Vec<&str> = address.params().collect();
            let unknown = crate::spec::source::placeholder_names(t)
                .into_iter()
                .find(|n| !names.contains(&n.as_str()));
            if let Some(name) = unknown {
                self.error(
                    self.channel.location.join("bindings").join("kafka").join("x-stepflow-key"),
                    SpecErrorKind::InvalidBinding {
                        protocol: "kafka",
                        problem: format!("key template '{t}' names '{name}', which is not a parameter of the address"),
                    },
                );
                return None;
            }
        }
        Some(UpstreamBinding::Kafka(KafkaRoute {
            topic,
            subscription,
            group_id,
            key,
            key_template,
        }))
    }

    fn amqp(&mut self, template: &AddressTemplate, at: &Location) -> Option<UpstreamBinding> {
        let binding = self
            .channel
            .bindings
            .get("amqp")
            .cloned()
            .unwrap_or(Value::Null);
        let binding_at = self.channel.location.join("bindings").join("amqp");
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
                self.address_error(at, e);
                return None;
            }
        };
        let send = self.operation_binding(Action::Send, "amqp");
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
                self.warnings.push(SpecWarning {
                    location: binding_at,
                    message: format!(
                        "route {}: the queue name is a parameter, so the queue is only known at run time (reply-to)",
                        self.route_id(&self.channel.id)
                    ),
                });
                return Some(UpstreamBinding::DynamicAddress);
            };
            return Some(UpstreamBinding::Amqp(AmqpRoute {
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
                    self.address_error(
                        at,
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
                    name: format!("stepflow.{}", self.route_id(&self.channel.id)),
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    generated: true,
                })
            });
        Some(UpstreamBinding::Amqp(AmqpRoute {
            routing_key: Some(routing_key),
            exchange: Some(exchange),
            queue,
            binding_key,
            publish,
        }))
    }

    fn websocket(&self, template: &AddressTemplate) -> UpstreamBinding {
        let ws = self.channel.bindings.get("ws");
        UpstreamBinding::WebSocket(WebSocketRoute {
            path: Some(template.generic()),
            method: ws
                .and_then(|b| b.get("method"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            query: ws.and_then(|b| b.get("query")).cloned(),
            headers: ws.and_then(|b| b.get("headers")).cloned(),
            subscribe: match self.channel.extensions.get("x-stepflow-subscribe") {
                None => Vec::new(),
                Some(Value::Array(frames)) => frames.iter().map(frame_text).collect(),
                Some(frame) => vec![frame_text(frame)],
            },
        })
    }

    /// `x-stepflow-sse: true` on the channel, or `text/event-stream` as the content type of the
    /// document or of one of the channel's messages.
    fn is_event_stream(&self) -> bool {
        const EVENT_STREAM: &str = "text/event-stream";
        self.channel.extensions.get("x-stepflow-sse") == Some(&Value::Bool(true))
            || self.api.default_content_type.as_deref() == Some(EVENT_STREAM)
            || self
                .channel
                .messages
                .iter()
                .any(|m| m.content_type.as_deref() == Some(EVENT_STREAM))
    }

    fn sse(&self, template: &AddressTemplate) -> UpstreamBinding {
        let http = self.channel.bindings.get("http");
        UpstreamBinding::Sse(SseRoute {
            path: template.generic(),
            events: self
                .channel
                .messages
                .iter()
                .map(|m| (m.name.clone().unwrap_or_else(|| m.id.clone()), m.id.clone()))
                .collect(),
            query: http.and_then(|b| b.get("query")).cloned(),
            headers: http.and_then(|b| b.get("headers")).cloned(),
        })
    }

    fn delivery(&mut self, direction: Direction, upstreams: &[Upstream]) -> Delivery {
        if !direction.readable || upstreams.is_empty() {
            return Delivery::NotApplicable;
        }
        let mut weakest: Option<String> = None;
        for upstream in upstreams {
            let reason = match &upstream.binding {
                UpstreamBinding::Mqtt(m) if m.subscribe_qos == 0 => Some(format!(
                    "server '{}' subscribes with MQTT QoS 0: the broker does not redeliver",
                    upstream.server
                )),
                UpstreamBinding::WebSocket(_)
                | UpstreamBinding::Sse(_)
                | UpstreamBinding::Http(_) => Some(format!(
                    "server '{}' ({}) cannot redeliver what the gateway did not store",
                    upstream.server, upstream.protocol
                )),
                _ => None,
            };
            if let Some(r) = reason {
                weakest.get_or_insert(r);
            }
        }
        match weakest {
            Some(reason) => {
                self.warnings.push(SpecWarning {
                    location: self.channel.location.clone(),
                    message: format!(
                        "route {} is at-most-once: {reason}",
                        self.route_id(&self.channel.id)
                    ),
                });
                Delivery::AtMostOnce(reason)
            }
            None => Delivery::AtLeastOnce,
        }
    }

    fn request_reply(&self) -> Vec<RequestReply> {
        self.api
            .operations
            .iter()
            .filter(|o| o.channel == self.channel.id && (o.reply.is_some() || o.http.is_some()))
            .map(|o| RequestReply {
                operation: o.id.clone(),
                action: o.action,
                reply_channel: o
                    .reply
                    .as_ref()
                    .and_then(|r| r.channel.as_deref())
                    .filter(|_| o.http.is_none())
                    .map(|c| self.route_id(c)),
                reply_address_location: o.reply.as_ref().and_then(|r| r.address_location.clone()),
                http: o.http.as_ref().map(|h| HttpRoute {
                    method: h.method.clone(),
                    path: h.path.clone(),
                }),
            })
            .collect()
    }
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

/// A subscribe frame's text: strings as they are, anything else as JSON.
pub fn frame_text(frame: &Value) -> String {
    match frame {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
