//! AsyncAPI 2.0–2.6 and 3.0 documents → the normalized model.
//!
//! AsyncAPI 2 `publish` (others publish, the application receives) becomes [`Action::Receive`],
//! `subscribe` becomes [`Action::Send`], as the 2.x specification defines them from the
//! application's point of view. AsyncAPI 3 says `action` directly.

use std::collections::HashMap;

use serde_json::Value;

use super::bindings::{BindingTarget, read_bindings};
use super::error::{Location, ReferenceRule, SpecErrorKind};
use super::model::{
    Action, Api, Channel, DocumentKind, Message, MessageExample, Operation, Parameter, Protocol,
    Reply, Role, SchemaDef, SchemaFormat, SecurityScheme, Server,
};
use super::objects::{
    read_schema_node, security_requirement, security_scheme, substitute_variables,
};
use super::reader::{
    Reader, is_valid_component_key, is_valid_parameter_name, merge_patch, placeholders, slug,
};
use super::source::Node;

mod channel;
mod v2;
mod v3;

use channel::*;
use v2::*;
use v3::*;

/// Major AsyncAPI versions the loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    V2,
    V3,
}

struct Ctx {
    major: Major,
    default_content_type: Option<String>,
}

/// Loads an AsyncAPI document whose version was already recognised.
pub fn load(
    reader: &mut Reader<'_>,
    root: &Node,
    id: String,
    version: String,
    major: Major,
) -> Api {
    let allowed: &[&str] = match major {
        Major::V2 => &[
            "asyncapi",
            "id",
            "info",
            "servers",
            "defaultContentType",
            "channels",
            "components",
            "tags",
            "externalDocs",
        ],
        Major::V3 => &[
            "asyncapi",
            "id",
            "info",
            "servers",
            "defaultContentType",
            "channels",
            "operations",
            "components",
        ],
    };
    reader.check_fields(root, allowed);
    let (title, api_version) = read_info(reader, root, major);
    let ctx = Ctx {
        major,
        default_content_type: reader.string(root, "defaultContentType"),
    };
    let servers = read_servers(reader, root, major);
    let mut api = Api {
        id,
        source: root.loc.clone(),
        kind: DocumentKind::AsyncApi(version),
        title,
        version: api_version,
        default_content_type: ctx.default_content_type.clone(),
        servers,
        channels: Vec::new(),
        operations: Vec::new(),
        role: Role::Application,
    };
    api.role = read_role(reader, root, &api.servers);
    match major {
        Major::V2 => load_v2_channels(reader, root, &ctx, &mut api),
        Major::V3 => load_v3(reader, root, &ctx, &mut api),
    }
    api
}

fn read_info(reader: &mut Reader<'_>, root: &Node, major: Major) -> (String, String) {
    let Some(info) = reader.required_object(root, "info") else {
        return (String::new(), String::new());
    };
    let allowed: &[&str] = match major {
        Major::V2 => &[
            "title",
            "version",
            "description",
            "termsOfService",
            "contact",
            "license",
        ],
        Major::V3 => &[
            "title",
            "version",
            "description",
            "termsOfService",
            "contact",
            "license",
            "tags",
            "externalDocs",
        ],
    };
    reader.check_fields(&info, allowed);
    let title = reader.required_string(&info, "title").unwrap_or_default();
    let version = reader.required_string(&info, "version").unwrap_or_default();
    (title, version)
}

// ---------------------------------------------------------------------------------------------
// Servers and security

fn read_servers(reader: &mut Reader<'_>, root: &Node, major: Major) -> Vec<Server> {
    let Some(servers) = reader.object_field(root, "servers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (id, node) in servers.entries() {
        let Some(server) = reader.object(&node) else {
            continue;
        };
        if let Some(s) = read_server(reader, root, &server, id, major) {
            out.push(s);
        }
    }
    out
}

fn read_server(
    reader: &mut Reader<'_>,
    root: &Node,
    server: &Node,
    id: String,
    major: Major,
) -> Option<Server> {
    let allowed: &[&str] = match major {
        Major::V2 => &[
            "url",
            "protocol",
            "protocolVersion",
            "description",
            "variables",
            "security",
            "bindings",
            "tags",
        ],
        Major::V3 => &[
            "host",
            "protocol",
            "protocolVersion",
            "pathname",
            "description",
            "title",
            "summary",
            "variables",
            "security",
            "tags",
            "externalDocs",
            "bindings",
        ],
    };
    reader.check_fields(server, allowed);
    let protocol_name = reader.required_string(server, "protocol");
    // The specification lists protocols "including, but not limited to" its own: one it does not
    // list is not an error, and neither is one the gateway has no connector for.
    // Whether the gateway has a connector for it is the routing compiler's question.
    let protocol = protocol_name
        .as_ref()
        .map(|name| Protocol::parse(name).unwrap_or(Protocol::Unlisted));
    let variables = reader.object_field(server, "variables");
    let (host, pathname) = match major {
        Major::V2 => {
            let url = reader.required_string(server, "url").unwrap_or_default();
            let url =
                substitute_variables(reader, &url, variables.as_ref(), &server.loc.join("url"));
            split_url(&url)
        }
        Major::V3 => {
            let host = reader.required_string(server, "host").unwrap_or_default();
            let host =
                substitute_variables(reader, &host, variables.as_ref(), &server.loc.join("host"));
            let pathname = reader.string(server, "pathname").map(|p| {
                substitute_variables(reader, &p, variables.as_ref(), &server.loc.join("pathname"))
            });
            (host, pathname)
        }
    };
    let security = read_security(reader, root, server, major);
    let bindings = read_bindings(reader, server, BindingTarget::Server);
    let optional = reader
        .boolean(server, "x-stepflow-optional")
        .unwrap_or(false);
    Some(Server {
        id,
        location: server.loc.clone(),
        protocol: protocol?,
        protocol_name: protocol_name.unwrap_or_default(),
        protocol_version: reader.string(server, "protocolVersion"),
        host,
        pathname,
        security,
        bindings,
        optional,
    })
}

/// `scheme://host:port/path` or `host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> (String, Option<String>) {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    match without_scheme.find('/') {
        Some(i) => (
            without_scheme[..i].to_owned(),
            Some(without_scheme[i..].to_owned()).filter(|p| p != "/"),
        ),
        None => (without_scheme.to_owned(), None),
    }
}

/// AsyncAPI 2: `[{schemeName: [scopes]}]` naming `components.securitySchemes`;
/// AsyncAPI 3: a list of Security Scheme Objects or references to them.
fn read_security(
    reader: &mut Reader<'_>,
    root: &Node,
    owner: &Node,
    major: Major,
) -> Vec<SecurityScheme> {
    let Some(items) = reader.array_field(owner, "security") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match major {
            Major::V2 => out.extend(security_requirement(reader, root, &item)),
            Major::V3 => {
                let name = item
                    .reference()
                    .and_then(|r| r.rsplit('/').next())
                    .map(str::to_owned);
                let Some(scheme) = reader.object(&item) else {
                    continue;
                };
                let name = name.unwrap_or_else(|| format!("inline{}", out.len()));
                out.push(security_scheme(reader, name, &scheme));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Channels, parameters, messages (shared)

/// `x-stepflow-role` (`application` | `client`), else `client` when every server is a WebSocket
/// or HTTP server (the document then describes that server: public streaming APIs are written
/// so), else `application`.
fn read_role(reader: &mut Reader<'_>, root: &Node, servers: &[Server]) -> Role {
    match reader.string(root, "x-stepflow-role").as_deref() {
        Some("application") => return Role::Application,
        Some("client") => return Role::Client,
        Some(other) => reader.error(
            root.loc.join("x-stepflow-role"),
            SpecErrorKind::Invalid(format!(
                "x-stepflow-role '{other}' is not one of 'application' or 'client'"
            )),
        ),
        None => {}
    }
    let server_side = |s: &Server| s.protocol.is_web();
    if !servers.is_empty() && servers.iter().all(server_side) {
        Role::Client
    } else {
        Role::Application
    }
}

/// The `x-stepflow-*` members of an object, dereferenced copies.
fn stepflow_extensions(node: &Node) -> serde_json::Map<String, Value> {
    match node.value().as_object() {
        Some(map) => map
            .iter()
            .filter(|(k, _)| k.starts_with("x-stepflow-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => serde_json::Map::new(),
    }
}

/// Unescapes the tokens of a JSON pointer.
fn pointer_tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// AsyncAPI 2

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_url_separates_host_and_path() {
        assert_eq!(
            split_url("mqtt://test.mosquitto.org:1883"),
            ("test.mosquitto.org:1883".into(), None)
        );
        assert_eq!(
            split_url("api.gemini.com/v1/marketdata"),
            ("api.gemini.com".into(), Some("/v1/marketdata".into()))
        );
    }

    #[test]
    fn pointer_tokens_are_unescaped() {
        assert_eq!(
            pointer_tokens("/channels/a~1b~0c"),
            vec!["channels", "a/b~c"]
        );
    }
}
