//! StepFlow Gateway: an AsyncAPI-first event bridge.
//!
//! - [`spec`]: AsyncAPI 2.x/3.0 and OpenAPI 3.x documents → one normalized model, with every
//!   error located by file and JSON pointer.
//! - [`schema`]: payload validators (JSON Schema, OpenAPI schemas, Avro), compiled once.
//! - [`routing`]: the routing table — one route per channel, address templates and their MQTT,
//!   AMQP and Kafka forms, parameter extraction and filling.
//! - [`calls`]: OpenAPI operations as request-reply channels, called over HTTP.
//! - [`bridge`]: `bridges/*.yaml`, channel → channel links across protocols, at-least-once
//!   through durable cursors on the source log.
//! - [`subscriptions`]: named durable cursors that WebSocket and SSE clients attach to.
//! - [`yaml`]: the one YAML reader (YAML 1.2 core schema: only `true`/`false` are booleans).
#![deny(unsafe_code)]

pub mod auth;
pub mod bridge;
pub mod calls;
pub mod client;
pub mod config;
pub mod connectors;
pub mod credentials;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod registry;
pub mod routing;
pub mod schema;
pub mod server;
pub mod spec;
pub mod store;
pub mod subscriptions;
pub mod telemetry;
pub mod template;
pub mod upstream;
pub mod yaml;
