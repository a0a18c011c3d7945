//! Protocol connectors: one file per protocol, each a source (broker → route) and/or a sink
//! (route → broker), reconnecting with backoff. A connector knows its broker and the routing
//! types, never another connector; bridges go through routes.
//!
//! What connectors share with the rest of the daemon (server keys, the connection registry, the
//! publisher interface, overrides, backoff) lives below them in [`crate::upstream`].

pub mod amqp;
pub mod kafka;
pub mod mqtt;
pub mod server_access;
pub mod sse;
pub mod ws;
