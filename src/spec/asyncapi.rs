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
use super::reader::{
    Reader, is_valid_component_key, is_valid_parameter_name, merge_patch, placeholders, slug,
};
use super::source::Node;

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

/// Replaces `{var}` with the variable's default (or first enum value); undeclared ones are errors.
pub(super) fn substitute_variables(
    reader: &mut Reader<'_>,
    template: &str,
    variables: Option<&Node>,
    at: &Location,
) -> String {
    let names = match placeholders(template) {
        Ok(names) => names,
        Err(problem) => {
            reader.error(
                at.clone(),
                SpecErrorKind::Invalid(format!("'{template}' {problem}")),
            );
            return template.to_owned();
        }
    };
    let mut out = template.to_owned();
    for name in names {
        let variable = variables
            .and_then(|v| v.get(&name))
            .and_then(|v| reader.object(&v));
        let Some(variable) = variable else {
            reader.error(
                at.clone(),
                SpecErrorKind::Invalid(format!(
                    "server variable '{name}' is used in '{template}' but not declared in `variables`"
                )),
            );
            continue;
        };
        let value = reader.string(&variable, "default").or_else(|| {
            variable
                .value()
                .get("enum")
                .and_then(|e| e.get(0))
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        match value {
            Some(v) => out = out.replace(&format!("{{{name}}}"), &v),
            // The specification requires neither; only running the server needs a value.
            None => reader.warn(
                variable.loc.clone(),
                format!(
                    "server variable '{name}' has neither a `default` nor an `enum`: the gateway cannot fill it, so give this server's URL in the config (`servers.<id>.url`) before it connects"
                ),
            ),
        }
    }
    out
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

/// A Security Requirement Object (`{schemeName: [scopes]}`, AsyncAPI 2 and OpenAPI): the
/// `components.securitySchemes` it names.
pub(super) fn security_requirement(
    reader: &mut Reader<'_>,
    root: &Node,
    item: &Node,
) -> Vec<SecurityScheme> {
    let Some(requirement) = reader.object(item) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, _) in requirement.entries() {
        let scheme = root
            .get("components")
            .and_then(|c| c.get("securitySchemes"))
            .and_then(|s| s.get(&name));
        match scheme.and_then(|s| reader.object(&s)) {
            Some(scheme) => out.push(security_scheme(reader, name, &scheme)),
            None => reader.error(
                requirement.loc.join(&name),
                SpecErrorKind::UnresolvedRef {
                    reference: name.clone(),
                    reason: "no such entry in components.securitySchemes".into(),
                },
            ),
        }
    }
    out
}

fn security_scheme(reader: &mut Reader<'_>, name: String, scheme: &Node) -> SecurityScheme {
    let scheme_type = reader.required_string(scheme, "type").unwrap_or_default();
    let details = reader
        .inline(scheme)
        .map(|i| i.value)
        .unwrap_or(Value::Null);
    SecurityScheme {
        name,
        scheme_type,
        details,
    }
}

// ---------------------------------------------------------------------------------------------
// Channels, parameters, messages (shared)

fn check_address(reader: &mut Reader<'_>, address: &str, at: &Location) {
    // A last level of `#` is MQTT's multi-level wildcard (`site/#`), which MQTT documents write
    // in receive channels; any other `#` starts a fragment.
    let without_wildcard = address
        .strip_suffix("/#")
        .or((address == "#").then_some(""))
        .unwrap_or(address);
    if address.contains('?') || without_wildcard.contains('#') {
        reader.error(
            at.clone(),
            SpecErrorKind::BadChannelAddress {
                address: address.to_owned(),
                problem: "contains a query or fragment ('?' or '#'); channel addresses must not"
                    .into(),
            },
        );
    }
}

fn read_parameters(
    reader: &mut Reader<'_>,
    channel: &Node,
    address: Option<&str>,
    address_at: &Location,
    major: Major,
) -> Vec<Parameter> {
    let names: Vec<String> = match address.map(placeholders) {
        None => Vec::new(),
        Some(Ok(names)) => names,
        Some(Err(problem)) => {
            reader.error(
                address_at.clone(),
                SpecErrorKind::BadChannelAddress {
                    address: address.unwrap_or_default().to_owned(),
                    problem,
                },
            );
            Vec::new()
        }
    };
    let plain = |name: &String| Parameter {
        name: name.clone(),
        description: None,
        allowed: None,
        default: None,
        location: None,
        schema: None,
    };
    let Some(declared) = channel.get("parameters") else {
        // An address with placeholders and no `parameters` at all is valid: plain string params.
        return names.iter().map(plain).collect();
    };
    let Some(declared) = reader.object(&declared) else {
        return names.iter().map(plain).collect();
    };
    let mut found: HashMap<String, Parameter> = HashMap::new();
    for (name, node) in declared.entries() {
        let at = declared.loc.join(&name);
        if !is_valid_parameter_name(&name) {
            reader.error(
                at.clone(),
                SpecErrorKind::BadParameterName { name: name.clone() },
            );
        }
        if !names.contains(&name) {
            reader.error(
                at.clone(),
                SpecErrorKind::RedundantParameter {
                    name: name.clone(),
                    address: address.unwrap_or("(none)").to_owned(),
                },
            );
        }
        let Some(param) = reader.object(&node) else {
            continue;
        };
        let mut parameter = plain(&name);
        parameter.description = reader.string(&param, "description");
        parameter.location = reader.string(&param, "location");
        match major {
            Major::V2 => {
                reader.check_fields(&param, &["description", "schema", "location"]);
                if let Some(schema) = param.get("schema")
                    && let Some(inlined) = reader.inline(&schema)
                {
                    parameter.allowed = string_list(inlined.value.get("enum"));
                    parameter.default = inlined.value.get("default").and_then(scalar_text);
                    parameter.schema = Some(inlined.value);
                }
            }
            Major::V3 => {
                reader.check_fields(
                    &param,
                    &["enum", "default", "description", "examples", "location"],
                );
                if let Some(values) = param.get("enum") {
                    parameter.allowed = string_list(Some(values.value()));
                    if parameter.allowed.is_none() {
                        reader.wrong_type(&values, "a sequence of strings");
                    }
                }
                parameter.default = reader.string(&param, "default");
            }
        }
        found.insert(name, parameter);
    }
    let missing: Vec<&str> = names
        .iter()
        .filter(|n| !found.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        reader.error(
            declared.loc.clone(),
            SpecErrorKind::UndeclaredParameters {
                missing: missing.join(", "),
            },
        );
    }
    names
        .iter()
        .map(|n| found.remove(n).unwrap_or_else(|| plain(n)))
        .collect()
}

fn string_list(value: Option<&Value>) -> Option<Vec<String>> {
    value?.as_array()?.iter().map(scalar_text).collect()
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A message member, from the message itself or from its traits.
enum Field {
    Node(Node),
    Trait(Value, Location),
}

fn read_message(reader: &mut Reader<'_>, node: &Node, id: String, ctx: &Ctx) -> Option<Message> {
    let message = reader.object(node)?;
    const MESSAGE_FIELDS: [&str; 13] = [
        "headers",
        "payload",
        "correlationId",
        "contentType",
        "name",
        "title",
        "summary",
        "description",
        "tags",
        "externalDocs",
        "bindings",
        "examples",
        "traits",
    ];
    let mut allowed = MESSAGE_FIELDS.to_vec();
    if ctx.major == Major::V2 {
        // AsyncAPI 3 moved `schemaFormat` into the payload and dropped `messageId`.
        allowed.extend(["messageId", "schemaFormat"]);
    }
    reader.check_fields(&message, &allowed);

    // Traits: AsyncAPI 2 merges each trait over the message (the trait wins); AsyncAPI 3 makes
    // the message's own fields win. Either way traits merge among themselves in order.
    let mut traits = Value::Object(serde_json::Map::new());
    let traits_at = message.loc.join("traits");
    if let Some(items) = reader.array_field(&message, "traits") {
        for item in items {
            if let Some(t) = reader.object(&item).and_then(|t| reader.inline(&t)) {
                merge_patch(&mut traits, &t.value);
            }
        }
    }
    let field = |name: &str| -> Option<Field> {
        let own = message.get(name).map(Field::Node);
        let from_trait = traits
            .get(name)
            .map(|v| Field::Trait(v.clone(), traits_at.clone()));
        match ctx.major {
            Major::V2 => from_trait.or(own),
            Major::V3 => own.or(from_trait),
        }
    };

    let text = |reader: &mut Reader<'_>, f: Option<Field>| -> Option<String> {
        match f? {
            Field::Node(n) => match n.value() {
                Value::String(s) => Some(s.clone()),
                _ => {
                    reader.wrong_type(&n, "a string");
                    None
                }
            },
            Field::Trait(v, _) => v.as_str().map(str::to_owned),
        }
    };
    let name = text(reader, field("name"));
    let content_type = text(reader, field("contentType")).or(ctx.default_content_type.clone());
    let schema_format = match ctx.major {
        Major::V2 => text(reader, field("schemaFormat")).map(|f| SchemaFormat::parse(&f)),
        Major::V3 => None,
    }
    .unwrap_or(SchemaFormat::AsyncApi);

    let payload = field("payload").and_then(|f| read_schema(reader, f, schema_format.clone(), ctx));
    let headers =
        field("headers").and_then(|f| read_schema(reader, f, SchemaFormat::AsyncApi, ctx));
    let correlation_id = match field("correlationId") {
        Some(Field::Node(n)) => reader
            .object(&n)
            .and_then(|c| reader.required_string(&c, "location")),
        Some(Field::Trait(v, _)) => v.get("location").and_then(Value::as_str).map(str::to_owned),
        None => None,
    };
    let bindings = match field("bindings") {
        Some(Field::Node(_)) => read_bindings(reader, &message, BindingTarget::Message),
        Some(Field::Trait(Value::Object(map), _)) => map,
        _ => Default::default(),
    };
    let examples = read_examples(reader, &message);
    Some(Message {
        id,
        name,
        content_type,
        payload,
        headers,
        correlation_id,
        bindings,
        examples,
        location: message.loc.clone(),
    })
}

/// The payloads of a message's own `examples` (each example may also be a `$ref`).
fn read_examples(reader: &mut Reader<'_>, message: &Node) -> Vec<MessageExample> {
    let Some(items) = reader.array_field(message, "examples") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Some(example) = reader.object(&item) else {
            continue;
        };
        if let Some(payload) = example.get("payload")
            && let Some(inlined) = reader.inline(&payload)
        {
            out.push(MessageExample {
                payload: inlined.value,
                location: payload.loc.clone(),
            });
        }
    }
    out
}

/// Reads a payload or headers schema. AsyncAPI 3 allows a Multi Format Schema Object
/// (`{schemaFormat, schema}`) in place of a schema.
fn read_schema(
    reader: &mut Reader<'_>,
    field: Field,
    format: SchemaFormat,
    ctx: &Ctx,
) -> Option<SchemaDef> {
    let node = match field {
        Field::Trait(value, location) => {
            return Some(SchemaDef {
                format,
                schema: value,
                remote_refs: Vec::new(),
                location,
            });
        }
        Field::Node(node) => node,
    };
    read_schema_node(reader, &node, format, ctx.major == Major::V3)
}

pub(super) fn read_schema_node(
    reader: &mut Reader<'_>,
    node: &Node,
    mut format: SchemaFormat,
    allow_multi_format: bool,
) -> Option<SchemaDef> {
    let mut node = node.clone();
    if Reader::is_remote_ref(&node) {
        let inlined = reader.inline(&node)?;
        return Some(SchemaDef {
            format,
            schema: inlined.value,
            remote_refs: inlined.remote_refs,
            location: node.loc,
        });
    }
    if allow_multi_format {
        let target = reader.deref(&node)?;
        if let Some(map) = target.value().as_object()
            && map.contains_key("schemaFormat")
            && map.contains_key("schema")
        {
            let media_type = reader.required_string(&target, "schemaFormat")?;
            format = SchemaFormat::parse(&media_type);
            node = target.get("schema")?;
        }
    }
    let inlined = reader.inline(&node)?;
    let shape_ok = match format {
        // Avro schemas may be a type name ("string") or a union (an array).
        SchemaFormat::Avro => !inlined.value.is_null(),
        SchemaFormat::Other(_) => true,
        _ => inlined.value.is_object() || inlined.value.is_boolean(),
    };
    if !shape_ok {
        reader.wrong_type(&node, "a schema (a mapping or a boolean)");
        return None;
    }
    Some(SchemaDef {
        format,
        schema: inlined.value,
        remote_refs: inlined.remote_refs,
        location: node.loc,
    })
}

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

fn load_v2_channels(reader: &mut Reader<'_>, root: &Node, ctx: &Ctx, api: &mut Api) {
    let Some(channels) = reader.required_object(root, "channels") else {
        return;
    };
    let mut channel_ids: HashMap<String, Location> = HashMap::new();
    let mut operation_ids: HashMap<String, Location> = HashMap::new();
    for (address, node) in channels.entries() {
        let Some(channel) = reader.object(&node) else {
            continue;
        };
        reader.check_fields(
            &channel,
            &[
                "description",
                "servers",
                "subscribe",
                "publish",
                "parameters",
                "bindings",
            ],
        );
        check_address(reader, &address, &node.loc);
        // AsyncAPI 2 channels have no id; `x-stepflow-id` names one, else the address's slug.
        let id = match reader.string(&channel, "x-stepflow-id") {
            Some(explicit) if is_valid_component_key(&explicit) => explicit,
            Some(explicit) => {
                reader.error(
                    channel.loc.join("x-stepflow-id"),
                    SpecErrorKind::Invalid(format!(
                        "x-stepflow-id '{explicit}' must match ^[a-zA-Z0-9.\\-_]+$"
                    )),
                );
                slug(&address)
            }
            None => slug(&address),
        };
        if let Some(first) = channel_ids.get(&id) {
            reader.error(
                node.loc.clone(),
                SpecErrorKind::DuplicateId {
                    what: "channel id (derived from the channel name)",
                    id: id.clone(),
                    first: first.to_string(),
                },
            );
            continue;
        }
        channel_ids.insert(id.clone(), node.loc.clone());
        let parameters = read_parameters(reader, &channel, Some(&address), &node.loc, Major::V2);
        let servers = read_v2_channel_servers(reader, &channel, api);
        let bindings = read_bindings(reader, &channel, BindingTarget::Channel);

        let mut messages: Vec<Message> = Vec::new();
        let mut seen: HashMap<Location, String> = HashMap::new();
        for (verb, action) in [("publish", Action::Receive), ("subscribe", Action::Send)] {
            let Some(op) = reader.object_field(&channel, verb) else {
                continue;
            };
            reader.check_fields(
                &op,
                &[
                    "operationId",
                    "summary",
                    "description",
                    "security",
                    "tags",
                    "externalDocs",
                    "bindings",
                    "traits",
                    "message",
                ],
            );
            let op_id = reader
                .string(&op, "operationId")
                .unwrap_or_else(|| format!("{id}.{verb}"));
            if let Some(first) = operation_ids.get(&op_id) {
                reader.error(
                    op.loc.join("operationId"),
                    SpecErrorKind::DuplicateId {
                        what: "operationId",
                        id: op_id.clone(),
                        first: first.to_string(),
                    },
                );
            } else {
                operation_ids.insert(op_id.clone(), op.loc.join("operationId"));
            }
            let mut op_messages = Vec::new();
            if let Some(message_node) = op.get("message") {
                let candidates = match reader.deref(&message_node) {
                    Some(target) if target.get("oneOf").is_some() => {
                        reader.array_field(&target, "oneOf").unwrap_or_default()
                    }
                    Some(_) => vec![message_node.clone()],
                    None => Vec::new(),
                };
                for (i, candidate) in candidates.iter().enumerate() {
                    let Some(target) = reader.deref(candidate) else {
                        continue;
                    };
                    if let Some(existing) = seen.get(&target.loc) {
                        op_messages.push(existing.clone());
                        continue;
                    }
                    let mut message_id = v2_message_id(candidate, &target, verb, i);
                    if messages.iter().any(|m| m.id == message_id) {
                        message_id = format!("{message_id}-{}", messages.len() + 1);
                    }
                    if let Some(m) = read_message(reader, candidate, message_id.clone(), ctx) {
                        seen.insert(target.loc.clone(), message_id.clone());
                        op_messages.push(message_id);
                        messages.push(m);
                    }
                }
            }
            let security = read_security(reader, root, &op, Major::V2);
            api.operations.push(Operation {
                id: op_id,
                action,
                channel: id.clone(),
                messages: op_messages,
                reply: None,
                bindings: read_bindings(reader, &op, BindingTarget::Operation),
                security,
                http: None,
                location: op.loc.clone(),
            });
        }
        api.channels.push(Channel {
            id,
            address: Some(address),
            parameters,
            messages,
            servers,
            bindings,
            extensions: stepflow_extensions(&channel),
            location: channel.loc.clone(),
        });
    }
}

fn v2_message_id(reference: &Node, target: &Node, verb: &str, index: usize) -> String {
    if reference.reference().is_some()
        && let Some(last) = pointer_tokens(&target.loc.pointer).last()
    {
        return last.clone();
    }
    let value = target.value();
    value
        .get("messageId")
        .or_else(|| value.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if index == 0 {
                format!("{verb}Message")
            } else {
                format!("{verb}Message{index}")
            }
        })
}

fn read_v2_channel_servers(reader: &mut Reader<'_>, channel: &Node, api: &Api) -> Vec<String> {
    let Some(items) = reader.array_field(channel, "servers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match item.value().as_str() {
            Some(name) if api.server(name).is_some() => out.push(name.to_owned()),
            Some(name) => reader.error(
                item.loc.clone(),
                SpecErrorKind::UnknownServer {
                    server: name.to_owned(),
                },
            ),
            None => reader.wrong_type(&item, "a server name"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// AsyncAPI 3

/// Where a root channel's messages live, to check that operations only use their channel's.
struct ChannelMessages {
    id: String,
    /// Locations of the channel's message entries (as written, and after `$ref`s) → message id.
    by_location: HashMap<Location, String>,
}

fn load_v3(reader: &mut Reader<'_>, root: &Node, ctx: &Ctx, api: &mut Api) {
    let mut channel_messages: HashMap<String, ChannelMessages> = HashMap::new();
    if let Some(channels) = reader.object_field(root, "channels") {
        for (id, node) in channels.entries() {
            if !is_valid_component_key(&id) {
                reader.error(
                    node.loc.clone(),
                    SpecErrorKind::Invalid(format!(
                        "channel id '{id}' must match ^[a-zA-Z0-9.\\-_]+$ (the specification's rule for component keys)"
                    )),
                );
            }
            let Some(channel) = reader.object(&node) else {
                continue;
            };
            if let Some((c, messages)) =
                read_v3_channel(reader, &node, &channel, id.clone(), ctx, api)
            {
                channel_messages.insert(id, messages);
                api.channels.push(c);
            }
        }
    }
    if let Some(operations) = reader.object_field(root, "operations") {
        for (id, node) in operations.entries() {
            let Some(op) = reader.object(&node) else {
                continue;
            };
            if let Some(operation) = read_v3_operation(reader, root, &op, id, &channel_messages) {
                api.operations.push(operation);
            }
        }
    }
}

fn read_v3_channel(
    reader: &mut Reader<'_>,
    written: &Node,
    channel: &Node,
    id: String,
    ctx: &Ctx,
    api: &Api,
) -> Option<(Channel, ChannelMessages)> {
    reader.check_fields(
        channel,
        &[
            "address",
            "messages",
            "title",
            "summary",
            "description",
            "servers",
            "parameters",
            "tags",
            "externalDocs",
            "bindings",
        ],
    );
    let address = match channel.get("address") {
        None => None,
        Some(n) => match n.value() {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => {
                reader.wrong_type(&n, "a string or null");
                None
            }
        },
    };
    let address_at = channel.loc.join("address");
    if let Some(a) = &address {
        check_address(reader, a, &address_at);
    }
    let parameters = read_parameters(reader, channel, address.as_deref(), &address_at, Major::V3);

    let mut servers = Vec::new();
    if let Some(items) = reader.array_field(channel, "servers") {
        for item in items {
            let Some(reference) = item.reference().map(str::to_owned) else {
                reader.error(
                    item.loc.clone(),
                    SpecErrorKind::Invalid("a channel's servers must be references ($ref)".into()),
                );
                continue;
            };
            let tokens = reference
                .strip_prefix('#')
                .map(pointer_tokens)
                .unwrap_or_default();
            match tokens.as_slice() {
                [servers_key, name] if servers_key == "servers" => {
                    if api.server(name).is_some() {
                        servers.push(name.clone());
                    } else {
                        reader.error(
                            item.loc.join("$ref"),
                            SpecErrorKind::UnknownServer {
                                server: name.clone(),
                            },
                        );
                    }
                }
                _ => reader.error(
                    item.loc.join("$ref"),
                    SpecErrorKind::Reference(ReferenceRule::ChannelServerNotInRoot { reference }),
                ),
            }
        }
    }

    let mut messages = Vec::new();
    let mut by_location = HashMap::new();
    if let Some(map) = reader.object_field(channel, "messages") {
        for (message_id, node) in map.entries() {
            by_location.insert(node.loc.clone(), message_id.clone());
            by_location.insert(
                written.loc.join("messages").join(&message_id),
                message_id.clone(),
            );
            if let Some(target) = reader.deref(&node) {
                by_location.insert(target.loc.clone(), message_id.clone());
            }
            if let Some(m) = read_message(reader, &node, message_id, ctx) {
                messages.push(m);
            }
        }
    }
    let bindings = read_bindings(reader, channel, BindingTarget::Channel);
    Some((
        Channel {
            id: id.clone(),
            address,
            parameters,
            messages,
            servers,
            bindings,
            extensions: stepflow_extensions(channel),
            location: channel.loc.clone(),
        },
        ChannelMessages { id, by_location },
    ))
}

/// The channel id a root-level `channel: {$ref: '#/channels/X'}` names, or the rule it breaks.
fn root_channel_id(reader: &mut Reader<'_>, field: &Node, root: &Node) -> Option<String> {
    let Some(reference) = field.reference().map(str::to_owned) else {
        reader.error(
            field.loc.clone(),
            SpecErrorKind::Invalid("`channel` must be a reference ($ref) to a channel".into()),
        );
        return None;
    };
    let at = field.loc.join("$ref");
    let target = match reader.sources.deref_once(field) {
        Ok(t) => t,
        Err(e) => {
            reader.diag.errors.push(e);
            return None;
        }
    };
    let tokens = pointer_tokens(&target.loc.pointer);
    match tokens.as_slice() {
        [channels, id] if channels == "channels" && target.loc.file == root.loc.file => {
            Some(id.clone())
        }
        _ => {
            reader.error(
                at,
                SpecErrorKind::Reference(ReferenceRule::OperationChannelNotInRoot { reference }),
            );
            None
        }
    }
}

/// Maps message references to ids of `channel`'s messages, reporting the ones that are not.
fn message_ids(
    reader: &mut Reader<'_>,
    items: Vec<Node>,
    channel: &ChannelMessages,
) -> Vec<String> {
    let mut ids = Vec::new();
    for item in items {
        let Some(reference) = item.reference().map(str::to_owned) else {
            reader.error(
                item.loc.clone(),
                SpecErrorKind::Invalid("operation messages must be references ($ref)".into()),
            );
            continue;
        };
        let first = match reader.sources.deref_once(&item) {
            Ok(t) => t,
            Err(e) => {
                reader.diag.errors.push(e);
                continue;
            }
        };
        let last = reader.deref(&first);
        let found = channel
            .by_location
            .get(&first.loc)
            .or_else(|| last.as_ref().and_then(|l| channel.by_location.get(&l.loc)));
        match found {
            Some(id) => ids.push(id.clone()),
            None => reader.error(
                item.loc.clone(),
                SpecErrorKind::Reference(ReferenceRule::OperationMessageNotInChannel {
                    reference,
                    channel: channel.id.clone(),
                }),
            ),
        }
    }
    ids
}

fn read_v3_operation(
    reader: &mut Reader<'_>,
    root: &Node,
    op: &Node,
    id: String,
    channels: &HashMap<String, ChannelMessages>,
) -> Option<Operation> {
    reader.check_fields(
        op,
        &[
            "action",
            "channel",
            "title",
            "summary",
            "description",
            "security",
            "tags",
            "externalDocs",
            "bindings",
            "traits",
            "messages",
            "reply",
        ],
    );
    let action = match reader.required_string(op, "action").as_deref() {
        Some("send") => Some(Action::Send),
        Some("receive") => Some(Action::Receive),
        Some(other) => {
            reader.error(
                op.loc.join("action"),
                SpecErrorKind::Invalid(format!(
                    "action must be 'send' or 'receive', found '{other}'"
                )),
            );
            None
        }
        None => None,
    };
    let channel_id = match op.get("channel") {
        Some(field) => root_channel_id(reader, &field, root),
        None => {
            reader.missing(op, "channel");
            None
        }
    };
    let channel = channel_id.as_ref().and_then(|c| channels.get(c));
    let messages = match (reader.array_field(op, "messages"), channel) {
        (Some(items), Some(channel)) => message_ids(reader, items, channel),
        _ => Vec::new(),
    };
    let reply = op
        .get("reply")
        .and_then(|r| read_v3_reply(reader, root, &r, channels));
    let bindings = read_bindings(reader, op, BindingTarget::Operation);
    let security = read_security(reader, root, op, Major::V3);
    Some(Operation {
        id,
        action: action?,
        channel: channel_id?,
        messages,
        reply,
        bindings,
        security,
        http: None,
        location: op.loc.clone(),
    })
}

fn read_v3_reply(
    reader: &mut Reader<'_>,
    root: &Node,
    node: &Node,
    channels: &HashMap<String, ChannelMessages>,
) -> Option<Reply> {
    let reply = reader.object(node)?;
    reader.check_fields(&reply, &["address", "channel", "messages"]);
    let address_location = match reader.object_field(&reply, "address") {
        Some(address) => {
            reader.check_fields(&address, &["location", "description"]);
            let location = reader.required_string(&address, "location");
            if let Some(l) = &location
                && !l.starts_with("$message.")
            {
                reader.error(
                    address.loc.join("location"),
                    SpecErrorKind::Invalid(format!(
                        "reply address location '{l}' must be a runtime expression starting with '$message.'"
                    )),
                );
            }
            location
        }
        None => None,
    };
    let channel = reply
        .get("channel")
        .and_then(|c| root_channel_id(reader, &c, root));
    let messages = match (
        reader.array_field(&reply, "messages"),
        channel.as_ref().and_then(|c| channels.get(c)),
    ) {
        (Some(items), Some(ch)) => message_ids(reader, items, ch),
        _ => Vec::new(),
    };
    if channel.is_none() && address_location.is_none() {
        reader.error(
            reply.loc.clone(),
            SpecErrorKind::Invalid("a reply needs a `channel` or an `address`".into()),
        );
    }
    Some(Reply {
        channel,
        address_location,
        messages,
    })
}

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
