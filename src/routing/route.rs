//! The route model: one [`Route`] per channel, with everything the runtime needs.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::address::{self, AddressTemplate};
use super::binding::UpstreamBinding;
use super::envelope::Transport;
use crate::schema::{Encoding, PayloadSchema, ValidationError};
use crate::spec::{Action, Protocol};

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
    /// The payload schema as plain JSON Schema, when it is one (not Avro): what clients that
    /// describe inputs with JSON Schema (MCP tools) are given.
    #[serde(skip)]
    pub json_schema: Option<Value>,
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
    pub description: Option<String>,
    /// The parameter's schema as written (AsyncAPI 2, OpenAPI path parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
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
    /// What the document says of the channel (summary, description), else of its operations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
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
    /// Whether `other` defines the same route: everything a route serialises (address,
    /// bindings, direction, schemas as written), not the validators compiled from it.
    pub fn same_definition(&self, other: &Route) -> bool {
        serde_json::to_value(self).ok() == serde_json::to_value(other).ok()
    }

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

    /// The upstream whose binding labels its messages `transport`, if the route has one.
    pub fn upstream(&self, transport: Transport) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| u.binding.transport() == transport)
    }
}

/// Every route, by id.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub(super) routes: Vec<Arc<Route>>,
    pub(super) by_id: HashMap<ChannelId, usize>,
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

    /// A table of routes already compiled (the hub's, with one document's swapped for its
    /// replacement, say); the first of two routes with one id wins.
    pub fn from_routes(routes: impl IntoIterator<Item = Arc<Route>>) -> RoutingTable {
        let mut table = RoutingTable::default();
        for route in routes {
            if !table.by_id.contains_key(&route.id) {
                table.by_id.insert(route.id.clone(), table.routes.len());
                table.routes.push(route);
            }
        }
        table
    }

    /// The routes of document `api` as a table of their own (the routes are shared, not
    /// compiled again).
    pub fn of_api(&self, api: &str) -> RoutingTable {
        let mut table = RoutingTable::default();
        for route in self.routes.iter().filter(|r| r.api == api) {
            table.by_id.insert(route.id.clone(), table.routes.len());
            table.routes.push(route.clone());
        }
        table
    }
}
