//! The channel compiler: every channel of every document into a [`Route`], all errors
//! collected before anything starts. Protocol bindings are read by the protocols' own
//! [`BindingReader`](super::binding::BindingReader)s, found through the [`Bindings`] given.

use std::sync::Arc;

use super::address::{AddressError, AddressTemplate};
use super::binding::{Bindings, ChannelContext, UpstreamBinding};
use super::route::*;
use crate::schema::{Encoding, PayloadSchema};
use crate::spec::{Action, Api, Channel, Location, Role, SpecError, SpecErrorKind, SpecWarning};

/// A route's id for channel `channel` of `api`.
pub(super) fn route_id(api: &Api, channel: &str) -> ChannelId {
    format!("{}.{}", api.id, channel).into()
}

/// A compiled table and what an operator should know about it.
#[derive(Debug)]
pub struct Compiled {
    pub table: RoutingTable,
    pub warnings: Vec<SpecWarning>,
}

/// Compiles documents into a routing table, or returns every error found.
pub fn compile(apis: &[Api], bindings: &dyn Bindings) -> Result<Compiled, Vec<SpecError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut table = RoutingTable::default();
    for api in apis {
        for server in &api.servers {
            if bindings.reader(server.protocol).is_none() {
                warnings.push(SpecWarning {
                    location: server.location.join("protocol"),
                    message: format!(
                        "protocol '{}' has no connector in this gateway: the server is not connected to, and its channels serve the log and web clients only",
                        server.protocol_name
                    ),
                });
            }
        }
        for channel in &api.channels {
            let mut cx = ChannelCompiler {
                api,
                channel,
                bindings,
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
    bindings: &'a dyn Bindings,
    errors: &'a mut Vec<SpecError>,
    warnings: &'a mut Vec<SpecWarning>,
}

impl ChannelCompiler<'_> {
    fn error(&mut self, location: Location, kind: SpecErrorKind) {
        self.errors.push(SpecError::new(location, kind));
    }

    fn route_id(&self, channel: &str) -> ChannelId {
        route_id(self.api, channel)
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
        let channel_operations = || {
            self.api
                .operations
                .iter()
                .filter(move |o| o.channel == channel.id)
        };
        let operations: Vec<String> = channel_operations().map(|o| o.id.clone()).collect();
        let messages = self.messages();
        let upstreams = self.upstreams(template.as_ref(), direction);
        let delivery = self.delivery(direction, &upstreams);
        let request_reply = self.request_reply();
        let parameters = self.parameters();
        if self.errors.len() != errors_before {
            return None;
        }
        // The channel says what it is; without that, what its operations do.
        let description = channel.description.clone().or_else(|| {
            let said: Vec<&str> = channel_operations()
                .filter_map(|o| o.description.as_deref())
                .collect();
            (!said.is_empty()).then(|| said.join("\n\n"))
        });
        Some(Route {
            id: self.route_id(&channel.id),
            api: self.api.id.clone(),
            channel: channel.id.clone(),
            address: channel.address.clone(),
            description,
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
                json_schema: message
                    .payload
                    .as_ref()
                    .and_then(crate::schema::as_json_schema),
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
                description: p.description.clone(),
                schema: p.schema.clone(),
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

    fn upstreams(
        &mut self,
        template: Option<&AddressTemplate>,
        direction: Direction,
    ) -> Vec<Upstream> {
        let servers: Vec<crate::spec::Server> = self.servers().into_iter().cloned().collect();
        let mut out = Vec::new();
        for server in servers {
            let binding = match self.bindings.reader(server.protocol) {
                None => Some(UpstreamBinding::NoConnector),
                Some(reader) => reader.read(&mut ChannelContext {
                    api: self.api,
                    channel: self.channel,
                    direction,
                    template,
                    errors: self.errors,
                    warnings: self.warnings,
                }),
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

    fn delivery(&mut self, direction: Direction, upstreams: &[Upstream]) -> Delivery {
        if !direction.readable || upstreams.is_empty() {
            return Delivery::NotApplicable;
        }
        let mut weakest: Option<String> = None;
        for upstream in upstreams {
            let reason = upstream
                .binding
                .protocol()
                .and_then(|p| p.at_most_once())
                .map(|why| format!("server '{}' ({}) {why}", upstream.server, upstream.protocol));
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
