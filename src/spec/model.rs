//! The normalized model every document kind loads into.
//!
//! AsyncAPI 2.x, AsyncAPI 3.0 and OpenAPI 3.x differ in shape but describe the same things:
//! servers, channels with messages, and operations the application performs on them. Everything
//! downstream (schema compilation, routing) reads only these types.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::error::Location;

/// Which kind of document an [`Api`] was loaded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "version", rename_all = "lowercase")]
pub enum DocumentKind {
    AsyncApi(String),
    OpenApi(String),
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocumentKind::AsyncApi(v) => write!(f, "AsyncAPI {v}"),
            DocumentKind::OpenApi(v) => write!(f, "OpenAPI {v}"),
        }
    }
}

/// One API document, normalized.
#[derive(Debug, Clone, Serialize)]
pub struct Api {
    /// Short, URL-safe id: `x-stepflow-id`, else the file stem (the directory name for generic
    /// stems like `asyncapi.yaml`). Route ids are `{api}.{channel}`.
    pub id: String,
    #[serde(skip)]
    pub source: Location,
    pub kind: DocumentKind,
    pub title: String,
    pub version: String,
    pub default_content_type: Option<String>,
    pub servers: Vec<Server>,
    pub channels: Vec<Channel>,
    pub operations: Vec<Operation>,
    /// Which side of the document the gateway plays.
    pub role: Role,
}

/// Which side of a document the gateway plays (DESIGN §3 and its exception for servers the
/// gateway connects to as a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The gateway is the application the document describes: `receive` → readable.
    Application,
    /// The document describes a server the gateway connects to (a WebSocket or HTTP API run by
    /// someone else): its `send` operations reach the gateway, so `send` → readable.
    Client,
}

impl Api {
    pub fn server(&self, id: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.id == id)
    }

    pub fn channel(&self, id: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.id == id)
    }
}

/// The wire protocols AsyncAPI and OpenAPI name. The gateway runs connectors for some of them;
/// routes on the others still compile and serve web clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Mqtt,
    SecureMqtt,
    Kafka,
    KafkaSecure,
    Amqp,
    Amqps,
    Ws,
    Wss,
    Http,
    Https,
    Ibmmq,
    Jms,
    Sns,
    Sqs,
    Stomp,
    Stomps,
    Redis,
    Nats,
    Mercure,
    Solace,
    Pulsar,
    Googlepubsub,
    Anypointmq,
    /// A protocol the specification does not list (it allows any): loaded with a warning, and
    /// its channels serve the log and web clients only.
    Unlisted,
}

impl Protocol {
    const ALL: [(&'static str, Protocol); 23] = [
        ("mqtt", Protocol::Mqtt),
        ("secure-mqtt", Protocol::SecureMqtt),
        ("mqtts", Protocol::SecureMqtt),
        ("kafka", Protocol::Kafka),
        ("kafka-secure", Protocol::KafkaSecure),
        ("amqp", Protocol::Amqp),
        ("amqps", Protocol::Amqps),
        ("ws", Protocol::Ws),
        ("wss", Protocol::Wss),
        ("http", Protocol::Http),
        ("https", Protocol::Https),
        ("ibmmq", Protocol::Ibmmq),
        ("jms", Protocol::Jms),
        ("sns", Protocol::Sns),
        ("sqs", Protocol::Sqs),
        ("stomp", Protocol::Stomp),
        ("stomps", Protocol::Stomps),
        ("redis", Protocol::Redis),
        ("nats", Protocol::Nats),
        ("mercure", Protocol::Mercure),
        ("solace", Protocol::Solace),
        ("pulsar", Protocol::Pulsar),
        ("googlepubsub", Protocol::Googlepubsub),
    ];

    /// Parses a protocol name as documents write it (case-insensitive).
    pub fn parse(name: &str) -> Option<Protocol> {
        let lower = name.to_ascii_lowercase();
        Self::ALL
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, p)| *p)
            .or((lower == "anypointmq").then_some(Protocol::Anypointmq))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::SecureMqtt => "secure-mqtt",
            Protocol::Kafka => "kafka",
            Protocol::KafkaSecure => "kafka-secure",
            Protocol::Amqp => "amqp",
            Protocol::Amqps => "amqps",
            Protocol::Ws => "ws",
            Protocol::Wss => "wss",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Ibmmq => "ibmmq",
            Protocol::Jms => "jms",
            Protocol::Sns => "sns",
            Protocol::Sqs => "sqs",
            Protocol::Stomp => "stomp",
            Protocol::Stomps => "stomps",
            Protocol::Redis => "redis",
            Protocol::Nats => "nats",
            Protocol::Mercure => "mercure",
            Protocol::Solace => "solace",
            Protocol::Unlisted => "unlisted",
            Protocol::Pulsar => "pulsar",
            Protocol::Googlepubsub => "googlepubsub",
            Protocol::Anypointmq => "anypointmq",
        }
    }

    /// WebSocket and HTTP: protocols whose servers are web APIs the gateway is a client of.
    pub fn is_web(self) -> bool {
        matches!(
            self,
            Protocol::Ws | Protocol::Wss | Protocol::Http | Protocol::Https
        )
    }

    pub fn is_tls(self) -> bool {
        matches!(
            self,
            Protocol::SecureMqtt
                | Protocol::KafkaSecure
                | Protocol::Amqps
                | Protocol::Wss
                | Protocol::Https
                | Protocol::Stomps
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server (broker or upstream host) a document names.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub id: String,
    #[serde(skip)]
    pub location: Location,
    pub protocol: Protocol,
    /// The protocol as the document writes it (an unlisted one keeps its own name).
    #[serde(skip)]
    pub protocol_name: String,
    pub protocol_version: Option<String>,
    /// `host[:port]` with server variables replaced by their defaults.
    pub host: String,
    /// Path part (AsyncAPI 3 `pathname`, the path of an AsyncAPI 2 / OpenAPI URL).
    pub pathname: Option<String>,
    /// Names of the security schemes the server requires.
    pub security: Vec<SecurityScheme>,
    pub bindings: Bindings,
    /// `x-stepflow-optional: true`: the gateway connects, but `/readyz` does not wait for it.
    pub optional: bool,
}

impl Server {
    /// The server as a URL, e.g. `mqtt://127.0.0.1:1883`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.protocol,
            self.host,
            self.pathname.as_deref().unwrap_or("")
        )
    }
}

/// A security scheme, as far as the gateway uses it to connect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecurityScheme {
    /// The scheme's key under `components.securitySchemes` (or a generated name when inline).
    pub name: String,
    /// `userPassword`, `apiKey`, `http`, `httpApiKey`, `oauth2`, `scramSha256`, `plain`, ...
    #[serde(rename = "type")]
    pub scheme_type: String,
    /// The scheme object itself, for the connector that knows its details.
    pub details: Value,
}

/// Protocol bindings of one object, keyed by protocol name (`mqtt`, `kafka`, ...). Values are
/// reference-free copies, already checked by `spec::bindings`.
pub type Bindings = serde_json::Map<String, Value>;

/// A channel: an address messages travel on, with the messages it may carry.
#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    /// AsyncAPI 3 channel key; for AsyncAPI 2 a slug of the channel name; for OpenAPI the
    /// operation id.
    pub id: String,
    /// The address template (`devices/{deviceId}/telemetry`); `None` when the document leaves it
    /// unknown or dynamic (AsyncAPI 3 `address: null`, e.g. reply channels).
    pub address: Option<String>,
    pub parameters: Vec<Parameter>,
    pub messages: Vec<Message>,
    /// The channel's summary and description.
    pub description: Option<String>,
    /// Server ids the channel is on; empty means every server of the document.
    pub servers: Vec<String>,
    pub bindings: Bindings,
    /// The channel's `x-stepflow-*` extensions (`x-stepflow-sse`, `x-stepflow-subscribe`).
    pub extensions: serde_json::Map<String, Value>,
    #[serde(skip)]
    pub location: Location,
}

impl Channel {
    pub fn parameter(&self, name: &str) -> Option<&Parameter> {
        self.parameters.iter().find(|p| p.name == name)
    }

    pub fn message(&self, id: &str) -> Option<&Message> {
        self.messages.iter().find(|m| m.id == id)
    }
}

/// A channel parameter (a `{name}` in the address).
#[derive(Debug, Clone, Serialize)]
pub struct Parameter {
    pub name: String,
    pub description: Option<String>,
    /// Allowed values (AsyncAPI 3 `enum`, or the `enum` of an AsyncAPI 2 parameter schema).
    pub allowed: Option<Vec<String>>,
    pub default: Option<String>,
    /// A runtime expression saying where the value comes from in a message.
    pub location: Option<String>,
    /// AsyncAPI 2 parameter schema, reference-free.
    pub schema: Option<Value>,
}

/// The formats a payload schema can be written in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "format", content = "media_type", rename_all = "kebab-case")]
pub enum SchemaFormat {
    /// AsyncAPI Schema Object (a JSON Schema draft-07 superset), the default.
    AsyncApi,
    /// JSON Schema (`application/schema+json;version=draft-07`, ...).
    JsonSchema(String),
    /// OpenAPI 3.0 Schema Object (`nullable`, no type arrays).
    OpenApi30,
    /// OpenAPI 3.1 Schema Object (JSON Schema 2020-12).
    OpenApi31,
    /// Apache Avro (`application/vnd.apache.avro;version=1.9.0`).
    Avro,
    /// Anything else (Protobuf, RAML, ...): kept but not validated.
    Other(String),
}

impl SchemaFormat {
    /// Reads a `schemaFormat` media type.
    pub fn parse(media_type: &str) -> SchemaFormat {
        let essence = media_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let version = media_type
            .split(';')
            .skip(1)
            .find_map(|p| p.trim().strip_prefix("version="))
            .unwrap_or("")
            .trim()
            .to_owned();
        match essence.as_str() {
            "application/vnd.aai.asyncapi"
            | "application/vnd.aai.asyncapi+json"
            | "application/vnd.aai.asyncapi+yaml" => SchemaFormat::AsyncApi,
            "application/schema+json" | "application/schema+yaml" => {
                SchemaFormat::JsonSchema(version)
            }
            "application/vnd.oai.openapi"
            | "application/vnd.oai.openapi+json"
            | "application/vnd.oai.openapi+yaml" => {
                if version.starts_with("3.1") {
                    SchemaFormat::OpenApi31
                } else {
                    SchemaFormat::OpenApi30
                }
            }
            "application/vnd.apache.avro"
            | "application/vnd.apache.avro+json"
            | "application/vnd.apache.avro+yaml" => SchemaFormat::Avro,
            _ => SchemaFormat::Other(media_type.to_owned()),
        }
    }
}

impl fmt::Display for SchemaFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaFormat::AsyncApi => f.write_str("asyncapi-schema"),
            SchemaFormat::JsonSchema(v) if v.is_empty() => f.write_str("json-schema"),
            SchemaFormat::JsonSchema(v) => write!(f, "json-schema {v}"),
            SchemaFormat::OpenApi30 => f.write_str("openapi-3.0-schema"),
            SchemaFormat::OpenApi31 => f.write_str("openapi-3.1-schema"),
            SchemaFormat::Avro => f.write_str("avro"),
            SchemaFormat::Other(m) => f.write_str(m),
        }
    }
}

/// A schema as the document wrote it, reference-free.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaDef {
    pub format: SchemaFormat,
    pub schema: Value,
    /// Remote references left inside (never fetched): the schema cannot be enforced.
    pub remote_refs: Vec<String>,
    #[serde(skip)]
    pub location: Location,
}

/// A message a channel may carry.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// The key in the channel's `messages` (AsyncAPI 3), else `messageId`, `name`, or the
    /// component key it was referenced by.
    pub id: String,
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub payload: Option<SchemaDef>,
    pub headers: Option<SchemaDef>,
    /// Runtime expression of the correlation id (`$message.header#/correlationId`).
    pub correlation_id: Option<String>,
    pub bindings: Bindings,
    /// The message's `examples` with a payload (AsyncAPI Message Example Objects).
    #[serde(skip)]
    pub examples: Vec<MessageExample>,
    #[serde(skip)]
    pub location: Location,
}

/// One of a message's examples, checked against the payload schema as a warning.
#[derive(Debug, Clone)]
pub struct MessageExample {
    pub payload: Value,
    /// Where the example's `payload` is.
    pub location: Location,
}

/// What the application (the gateway) does on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The application sends: web clients and bridges write, the gateway publishes upstream.
    Send,
    /// The application receives: the gateway subscribes upstream, web clients and bridges read.
    Receive,
}

/// An operation of the application on a channel.
#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    pub id: String,
    pub action: Action,
    /// The channel id (in the same [`Api`]).
    pub channel: String,
    /// Ids of the channel's messages this operation uses; empty means all of them.
    pub messages: Vec<String>,
    pub reply: Option<Reply>,
    /// The operation's summary and description.
    pub description: Option<String>,
    pub bindings: Bindings,
    pub security: Vec<SecurityScheme>,
    /// Present for OpenAPI operations: an HTTP request-reply exchange.
    pub http: Option<HttpOperation>,
    #[serde(skip)]
    pub location: Location,
}

/// The reply of a request-reply operation (AsyncAPI 3 `reply`).
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    /// The reply channel id, when the document names one.
    pub channel: Option<String>,
    /// Runtime expression locating the reply address in the request (`$message.header#/replyTo`).
    pub address_location: Option<String>,
    /// Ids of the reply channel's messages this reply uses; empty means all.
    pub messages: Vec<String>,
}

/// An OpenAPI operation: method, path and the schemas of request and responses.
#[derive(Debug, Clone, Serialize)]
pub struct HttpOperation {
    pub method: String,
    /// The path template, e.g. `/pets/{petId}`.
    pub path: String,
    pub parameters: Vec<HttpParameter>,
    pub request_body: Option<HttpBody>,
    pub responses: Vec<HttpResponse>,
}

/// An OpenAPI parameter.
#[derive(Debug, Clone, Serialize)]
pub struct HttpParameter {
    pub name: String,
    /// `path`, `query`, `header` or `cookie`.
    #[serde(rename = "in")]
    pub location: String,
    pub required: bool,
    pub schema: Option<SchemaDef>,
}

/// An OpenAPI request body.
#[derive(Debug, Clone, Serialize)]
pub struct HttpBody {
    pub required: bool,
    /// Media type → schema.
    pub content: Vec<(String, Option<SchemaDef>)>,
}

/// An OpenAPI response.
#[derive(Debug, Clone, Serialize)]
pub struct HttpResponse {
    /// `200`, `4XX`, `default`.
    pub status: String,
    pub content: Vec<(String, Option<SchemaDef>)>,
}
