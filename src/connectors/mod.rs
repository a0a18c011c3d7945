//! Protocol connectors and their registry: each protocol is one folder here — its bindings
//! reader (`binding.rs`: the document's bindings → its own route type) and its connector (a
//! source broker → route and/or a sink route → broker, reconnecting with backoff) — plus one
//! line in [`REGISTRY`]. A connector knows its broker and the routing types, never another
//! connector; bridges go through routes.
//!
//! What connectors share with the rest of the daemon (server keys, the connection registry, the
//! publisher interface, overrides, backoff) lives below them in [`crate::upstream`]. How to add
//! a protocol: README, "Adding a protocol".

pub mod amqp;
pub mod kafka;
pub mod mqtt;
pub mod server_access;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::routing::{self, BindingReader, Bindings, Compiled};
use crate::spec::{Api, Protocol, Server, SpecError};
use crate::upstream::{ServerKey, ServerOverride};

/// One protocol: which document protocols it serves, how it reads their bindings, and how it
/// connects to one server.
pub trait Connector: Send + Sync {
    /// The connector's name in logs (`mqtt`).
    fn name(&self) -> &'static str;

    /// The document protocols it serves (`mqtt`, `secure-mqtt`).
    fn protocols(&self) -> &'static [Protocol];

    fn bindings(&self) -> &dyn BindingReader;

    /// Starts the tasks that serve one server's routes on `cx.tracker`. `Ok(false)` when the
    /// server's routes need no connection (HTTP operations are called per request).
    fn start(&self, cx: StartContext<'_>) -> Result<bool, String>;

    /// Whether a running connector takes up a change of its document's routes in place
    /// (registering a [`crate::hub::RouteFollower`]); otherwise a change of channels or
    /// bindings restarts it.
    fn follows_routes(&self) -> bool {
        false
    }
}

/// What a connector is started with.
pub struct StartContext<'a> {
    pub hub: &'a Arc<Hub>,
    pub key: ServerKey,
    pub api: &'a Api,
    /// The server as the document describes it, with `optional` as configured.
    pub server: &'a Server,
    pub overrides: &'a ServerOverride,
    pub config: &'a Config,
    pub shutdown: &'a CancellationToken,
    pub tracker: &'a TaskTracker,
}

/// The connectors this build has.
pub struct Registry {
    connectors: &'static [&'static dyn Connector],
}

/// Every protocol the gateway connects to: adding one is adding its line here.
pub static REGISTRY: Registry = Registry {
    connectors: &[
        &mqtt::Mqtt,
        &kafka::Kafka,
        &amqp::Amqp,
        &ws::WebSocket,
        &sse::Http,
    ],
};

impl Registry {
    /// The connector serving `protocol`, if this build has one.
    pub fn connector(&self, protocol: Protocol) -> Option<&'static dyn Connector> {
        self.connectors
            .iter()
            .copied()
            .find(|c| c.protocols().contains(&protocol))
    }

    pub fn connectors(&self) -> impl Iterator<Item = &'static dyn Connector> {
        self.connectors.iter().copied()
    }
}

impl Bindings for Registry {
    fn reader(&self, protocol: Protocol) -> Option<&dyn BindingReader> {
        self.connector(protocol).map(|c| c.bindings())
    }
}

/// Compiles documents into a routing table with every protocol of this build.
pub fn compile(apis: &[Api]) -> Result<Compiled, Vec<SpecError>> {
    routing::compile(apis, &REGISTRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_protocol_is_served_twice() {
        let mut seen = Vec::new();
        for connector in REGISTRY.connectors() {
            for protocol in connector.protocols() {
                assert!(
                    !seen.contains(protocol),
                    "{protocol} is served by two connectors"
                );
                seen.push(*protocol);
            }
        }
        assert!(REGISTRY.connector(Protocol::SecureMqtt).is_some());
        assert!(REGISTRY.connector(Protocol::Nats).is_none());
    }
}
