//! The protocol-specific part of a route, as the protocol-neutral layers see it.
//!
//! Routing, the hub and the listings never name a protocol: each protocol reads its own bindings
//! ([`BindingReader`]) into its own route type ([`ProtocolRoute`]), and its connector downcasts
//! that type back ([`UpstreamBinding::get`]). The readers a build has are handed to
//! [`compile`](super::compile) as a [`Bindings`] registry, so this module stays below every
//! connector.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

use super::address::{AddressError, AddressTemplate, FillError};
use super::envelope::Transport;
use super::{ChannelId, Direction, HttpRoute};
use crate::spec::{
    Action, Api, Channel, Location, Protocol, SpecError, SpecErrorKind, SpecWarning,
};

/// One protocol's compiled binding of a route. Listings show it as JSON ([`Serialize`]), and
/// its connector gets it back by type ([`UpstreamBinding::get`]).
pub trait ProtocolRoute: fmt::Debug + Send + Sync + Any + AsJson {
    /// The binding's kind in listings (`/api/v1/channels`' `kind`).
    fn kind(&self) -> &'static str;

    /// How messages received on this binding are labelled in the log and in metrics.
    fn transport(&self) -> Transport;

    /// The concrete upstream address of a message whose parameters `value_of` gives; `generic`
    /// is the route's own address filled with the same values, which is what protocols whose
    /// addresses are URL paths use.
    fn address<'v>(
        &self,
        value_of: &dyn Fn(&str) -> Option<&'v str>,
        generic: &str,
    ) -> Result<String, FillError> {
        let _ = value_of;
        Ok(generic.to_owned())
    }

    /// Why this binding cannot redeliver what the gateway did not store, if it cannot (the
    /// route is then at-most-once). Said after "server 'id' (protocol)".
    fn at_most_once(&self) -> Option<String> {
        None
    }

    /// One line for `stepflow routes`.
    fn describe(&self) -> String;
}

/// What web protocols (HTTP, SSE, WebSocket) say for [`ProtocolRoute::at_most_once`]: nothing
/// upstream keeps a message for the gateway.
pub fn not_kept_upstream() -> Option<String> {
    Some("cannot redeliver what the gateway did not store".into())
}

/// A binding's fields as JSON, for every serializable route type.
pub trait AsJson {
    fn as_json(&self) -> Value;
}

impl<T: Serialize> AsJson for T {
    fn as_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// How a route maps onto one upstream server.
#[derive(Debug, Clone)]
pub enum UpstreamBinding {
    /// A protocol's own binding.
    Protocol(Arc<dyn ProtocolRoute>),
    /// The channel's address is dynamic (`address: null`), given at run time (e.g. a reply-to).
    DynamicAddress,
    /// A protocol the gateway has no connector for; the route still serves web clients.
    NoConnector,
}

impl UpstreamBinding {
    pub fn new(route: impl ProtocolRoute) -> Self {
        UpstreamBinding::Protocol(Arc::new(route))
    }

    /// The binding as protocol `T`'s route type, when it is one.
    pub fn get<T: ProtocolRoute>(&self) -> Option<&T> {
        match self {
            UpstreamBinding::Protocol(route) => {
                let route: &dyn Any = route.as_ref();
                route.downcast_ref()
            }
            _ => None,
        }
    }

    /// The protocol binding, when there is one to connect to.
    pub fn protocol(&self) -> Option<&dyn ProtocolRoute> {
        match self {
            UpstreamBinding::Protocol(route) => Some(route.as_ref()),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamBinding::Protocol(route) => route.kind(),
            UpstreamBinding::DynamicAddress => "dynamic-address",
            UpstreamBinding::NoConnector => "no-connector",
        }
    }

    pub fn transport(&self) -> Transport {
        self.protocol()
            .map_or(Transport::Unknown, ProtocolRoute::transport)
    }

    pub fn describe(&self) -> String {
        match self {
            UpstreamBinding::Protocol(route) => route.describe(),
            UpstreamBinding::DynamicAddress => "dynamic address".into(),
            UpstreamBinding::NoConnector => "no connector".into(),
        }
    }
}

impl Serialize for UpstreamBinding {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = match self.protocol().map(AsJson::as_json) {
            Some(Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        let mut map = serializer.serialize_map(Some(fields.len() + 1))?;
        map.serialize_entry("kind", self.kind())?;
        for (k, v) in &fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Reads one protocol's bindings of a channel.
pub trait BindingReader: Send + Sync {
    /// The binding for one server of this protocol, or `None` when the channel has nothing to
    /// run there (the reason is reported through `cx`).
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding>;
}

/// The binding readers a build has, by protocol.
pub trait Bindings {
    fn reader(&self, protocol: Protocol) -> Option<&dyn BindingReader>;
}

/// What a [`BindingReader`] sees of the channel being compiled, and where it reports problems.
pub struct ChannelContext<'a> {
    pub api: &'a Api,
    pub channel: &'a Channel,
    pub direction: Direction,
    /// The parsed address; `None` for a dynamic one (`address: null`).
    pub template: Option<&'a AddressTemplate>,
    pub(super) errors: &'a mut Vec<SpecError>,
    pub(super) warnings: &'a mut Vec<SpecWarning>,
}

impl ChannelContext<'_> {
    pub fn error(&mut self, location: Location, kind: SpecErrorKind) {
        self.errors.push(SpecError::new(location, kind));
    }

    pub fn warn(&mut self, location: Location, message: String) {
        self.warnings.push(SpecWarning { location, message });
    }

    /// The location of the channel's `address`.
    pub fn address_at(&self) -> Location {
        self.channel.location.join("address")
    }

    /// A problem with the channel's address, at its location.
    pub fn address_error(&mut self, error: AddressError) {
        let address = self.channel.address.clone().unwrap_or_default();
        let at = self.address_at();
        self.error(
            at,
            SpecErrorKind::BadChannelAddress {
                address,
                problem: error.to_string(),
            },
        );
    }

    /// A problem in the channel's `bindings.<protocol>.<field>`.
    pub fn binding_error(&mut self, protocol: &'static str, field: &str, problem: String) {
        let at = self
            .channel
            .location
            .join("bindings")
            .join(protocol)
            .join(field);
        self.error(at, SpecErrorKind::InvalidBinding { protocol, problem });
    }

    /// This channel's route id.
    pub fn route_id(&self) -> ChannelId {
        super::compile::route_id(self.api, &self.channel.id)
    }

    /// The channel's binding of `protocol`.
    pub fn channel_binding(&self, protocol: &str) -> Option<&Value> {
        self.channel.bindings.get(protocol)
    }

    /// The binding of `protocol` on the channel's operations with `action`.
    pub fn operation_binding(&self, action: Action, protocol: &str) -> Option<&Value> {
        self.api
            .operations
            .iter()
            .filter(|o| o.channel == self.channel.id && o.action == action)
            .find_map(|o| o.bindings.get(protocol))
    }
}

/// An HTTP route an OpenAPI operation is called on (`calls`), per request, never connected to.
impl ProtocolRoute for HttpRoute {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn transport(&self) -> Transport {
        Transport::Http
    }

    fn at_most_once(&self) -> Option<String> {
        not_kept_upstream()
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A build with no connector: every route serves the log and web clients only.
pub struct NoConnectors;

impl Bindings for NoConnectors {
    fn reader(&self, _protocol: Protocol) -> Option<&dyn BindingReader> {
        None
    }
}
