//! OpenAPI 3.0 / 3.1 documents → the normalized model.
//!
//! Every operation becomes a request-reply channel of its own: the gateway sends the request
//! upstream (action `send`) and the response is the reply. OpenAPI 3.1 `webhooks` are requests
//! the upstream sends to the application, so they become `receive` operations.

use serde_json::Value;

use super::error::SpecErrorKind;
use super::model::{
    Action, Api, Channel, DocumentKind, HttpBody, HttpOperation, HttpParameter, HttpResponse,
    Message, Operation, Parameter, Protocol, Reply, Role, SchemaFormat, SecurityScheme, Server,
};
use super::objects::{read_schema_node, security_requirement, substitute_variables};
use super::reader::{Reader, slug};
use super::source::Node;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Loads an OpenAPI document whose version was already recognised.
pub fn load(reader: &mut Reader<'_>, root: &Node, id: String, version: String) -> Api {
    let is_31 = version.starts_with("3.1");
    reader.check_fields(
        root,
        &[
            "openapi",
            "info",
            "jsonSchemaDialect",
            "servers",
            "paths",
            "webhooks",
            "components",
            "security",
            "tags",
            "externalDocs",
        ],
    );
    let format = if is_31 {
        SchemaFormat::OpenApi31
    } else {
        SchemaFormat::OpenApi30
    };
    let (title, api_version) = match reader.required_object(root, "info") {
        Some(info) => (
            reader.required_string(&info, "title").unwrap_or_default(),
            reader.required_string(&info, "version").unwrap_or_default(),
        ),
        None => (String::new(), String::new()),
    };
    if is_31 {
        if ["paths", "webhooks", "components"]
            .iter()
            .all(|k| root.get(k).is_none())
        {
            reader.error(
                root.loc.clone(),
                SpecErrorKind::Invalid(
                    "an OpenAPI 3.1 document needs at least one of `paths`, `webhooks` or `components`"
                        .into(),
                ),
            );
        }
    } else if root.get("paths").is_none() {
        reader.missing(root, "paths");
    }
    check_component_schemas(reader, root);

    let servers = read_servers(reader, root, "server");
    let mut api = Api {
        id,
        source: root.loc.clone(),
        kind: DocumentKind::OpenApi(version),
        title,
        version: api_version,
        default_content_type: Some("application/json".into()),
        servers,
        channels: Vec::new(),
        operations: Vec::new(),
        // The gateway calls the API: requests go out, responses come back.
        role: Role::Application,
    };
    let root_security = read_security(reader, root, root, &[]);
    if let Some(paths) = reader.object_field(root, "paths") {
        for (path, item) in paths.entries() {
            if !path.starts_with('/') && !path.starts_with("x-") {
                reader.error(
                    item.loc.clone(),
                    SpecErrorKind::Invalid(format!("path '{path}' must start with '/'")),
                );
            }
            if path.starts_with("x-") {
                continue;
            }
            read_path_item(
                reader,
                root,
                &item,
                &path,
                Action::Send,
                &format,
                &root_security,
                &mut api,
            );
        }
    }
    if let Some(hooks) = reader.object_field(root, "webhooks") {
        for (name, item) in hooks.entries() {
            let path = format!("/{name}");
            read_path_item(
                reader,
                root,
                &item,
                &path,
                Action::Receive,
                &format,
                &root_security,
                &mut api,
            );
        }
    }
    api
}

/// OpenAPI Schema Objects are mappings (3.1 also allows booleans).
fn check_component_schemas(reader: &mut Reader<'_>, root: &Node) {
    let Some(schemas) = root
        .get("components")
        .and_then(|c| c.get("schemas"))
        .and_then(|s| reader.object(&s))
    else {
        return;
    };
    for (_, schema) in schemas.entries() {
        if !(schema.value().is_object() || schema.value().is_boolean()) {
            reader.wrong_type(&schema, "a Schema Object (a mapping or a boolean)");
        }
    }
}

fn read_servers(reader: &mut Reader<'_>, owner: &Node, prefix: &str) -> Vec<Server> {
    let Some(items) = reader.array_field(owner, "servers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(server) = reader.object(item) else {
            continue;
        };
        reader.check_fields(&server, &["url", "description", "variables", "name"]);
        let Some(url) = reader.required_string(&server, "url") else {
            continue;
        };
        let variables = reader.object_field(&server, "variables");
        if let Some(vars) = &variables {
            for (name, var) in vars.entries() {
                let Some(var) = reader.object(&var) else {
                    continue;
                };
                if reader.required_string(&var, "default").is_none() {
                    continue;
                }
                if let Some(values) = var.get("enum")
                    && values.value().as_array().is_some_and(Vec::is_empty)
                {
                    reader.error(
                        values.loc.clone(),
                        SpecErrorKind::Invalid(format!(
                            "server variable '{name}' has an empty `enum` (it must list at least one value)"
                        )),
                    );
                }
            }
        }
        let url = substitute_variables(reader, &url, variables.as_ref(), &server.loc.join("url"));
        let (protocol, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Protocol::parse(scheme), rest.to_owned()),
            // A relative server URL is relative to where the document is served; the operator
            // gives the real base URL in configuration.
            None => (Some(Protocol::Http), format!("localhost{url}")),
        };
        let Some(protocol) = protocol.filter(|p| matches!(p, Protocol::Http | Protocol::Https))
        else {
            reader.error(
                server.loc.join("url"),
                SpecErrorKind::Invalid(format!("server url '{url}' is not an http(s) URL")),
            );
            continue;
        };
        let (host, pathname) = match rest.find('/') {
            Some(i) => (rest[..i].to_owned(), Some(rest[i..].to_owned())),
            None => (rest, None),
        };
        out.push(Server {
            id: if i == 0 {
                prefix.to_owned()
            } else {
                format!("{prefix}{i}")
            },
            location: server.loc.clone(),
            protocol,
            protocol_name: protocol.as_str().to_owned(),
            protocol_version: None,
            host,
            pathname: pathname.filter(|p| p != "/"),
            security: Vec::new(),
            bindings: Default::default(),
            optional: false,
        });
    }
    out
}

fn read_security(
    reader: &mut Reader<'_>,
    root: &Node,
    owner: &Node,
    inherited: &[SecurityScheme],
) -> Vec<SecurityScheme> {
    let Some(items) = reader.array_field(owner, "security") else {
        return inherited.to_vec();
    };
    items
        .iter()
        .flat_map(|item| security_requirement(reader, root, item))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn read_path_item(
    reader: &mut Reader<'_>,
    root: &Node,
    item: &Node,
    path: &str,
    action: Action,
    format: &SchemaFormat,
    root_security: &[SecurityScheme],
    api: &mut Api,
) {
    let Some(item) = reader.object(item) else {
        return;
    };
    let mut allowed: Vec<&str> = METHODS.to_vec();
    allowed.extend(["summary", "description", "servers", "parameters", "$ref"]);
    reader.check_fields(&item, &allowed);
    let path_servers = read_servers(reader, &item, &format!("{}-server", slug(path)));
    let shared_parameters = read_parameters(reader, &item, format);
    for method in METHODS {
        let Some(op) = reader.object_field(&item, method) else {
            continue;
        };
        reader.check_fields(
            &op,
            &[
                "tags",
                "summary",
                "description",
                "externalDocs",
                "operationId",
                "parameters",
                "requestBody",
                "responses",
                "callbacks",
                "deprecated",
                "security",
                "servers",
            ],
        );
        let raw_id = reader
            .string(&op, "operationId")
            .unwrap_or_else(|| format!("{method}-{path}"));
        let id = slug(&raw_id);
        if let Some(existing) = api.operations.iter().find(|o| o.id == id) {
            reader.error(
                op.loc.join("operationId"),
                SpecErrorKind::DuplicateId {
                    what: "operationId",
                    id: id.clone(),
                    first: existing.location.to_string(),
                },
            );
            continue;
        }
        let mut parameters = shared_parameters.clone();
        for p in read_parameters(reader, &op, format) {
            parameters.retain(|q| !(q.name == p.name && q.location == p.location));
            parameters.push(p);
        }
        let request_body = op
            .get("requestBody")
            .and_then(|b| read_body(reader, &b, format));
        let responses = read_responses(reader, &op, format);
        let mut servers: Vec<String> = api.servers.iter().map(|s| s.id.clone()).collect();
        let op_servers = read_servers(reader, &op, &format!("{id}-server"));
        let scoped = if op_servers.is_empty() {
            path_servers.clone()
        } else {
            op_servers
        };
        if !scoped.is_empty() {
            servers = scoped.iter().map(|s| s.id.clone()).collect();
            for s in scoped {
                if api.server(&s.id).is_none() {
                    api.servers.push(s);
                }
            }
        }
        let request = Message {
            examples: Vec::new(),
            id: "request".into(),
            name: Some(format!("{id} request")),
            content_type: request_body
                .as_ref()
                .and_then(|b| b.content.first().map(|(m, _)| m.clone())),
            payload: request_body
                .as_ref()
                .and_then(|b| preferred_schema(&b.content)),
            headers: None,
            correlation_id: None,
            bindings: Default::default(),
            location: op.loc.clone(),
        };
        let success = responses
            .iter()
            .find(|r| r.status.starts_with('2'))
            .or_else(|| responses.iter().find(|r| r.status == "default"));
        let response = Message {
            examples: Vec::new(),
            id: "response".into(),
            name: Some(format!("{id} response")),
            content_type: success.and_then(|r| r.content.first().map(|(m, _)| m.clone())),
            payload: success.and_then(|r| preferred_schema(&r.content)),
            headers: None,
            correlation_id: None,
            bindings: Default::default(),
            location: op.loc.join("responses"),
        };
        let channel_parameters = parameters
            .iter()
            .filter(|p| p.location == "path")
            .map(|p| Parameter {
                name: p.name.clone(),
                description: None,
                allowed: p
                    .schema
                    .as_ref()
                    .and_then(|s| s.schema.get("enum"))
                    .and_then(Value::as_array)
                    .map(|v| {
                        v.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    }),
                default: None,
                location: None,
                schema: p.schema.as_ref().map(|s| s.schema.clone()),
            })
            .collect();
        let description = reader.summary(&op).or_else(|| reader.summary(&item));
        api.channels.push(Channel {
            id: id.clone(),
            address: Some(path.to_owned()),
            parameters: channel_parameters,
            messages: vec![request, response],
            description: description.clone(),
            servers,
            bindings: Default::default(),
            extensions: Default::default(),
            location: op.loc.clone(),
        });
        let security = read_security(reader, root, &op, root_security);
        api.operations.push(Operation {
            id: id.clone(),
            action,
            channel: id.clone(),
            messages: vec!["request".into()],
            reply: Some(Reply {
                channel: Some(id.clone()),
                address_location: None,
                messages: vec!["response".into()],
            }),
            description,
            bindings: Default::default(),
            security,
            http: Some(HttpOperation {
                method: method.to_ascii_uppercase(),
                path: path.to_owned(),
                parameters,
                request_body,
                responses,
            }),
            location: op.loc.clone(),
        });
    }
}

/// JSON bodies are what the gateway validates; other media types are carried as they are.
fn preferred_schema(
    content: &[(String, Option<super::model::SchemaDef>)],
) -> Option<super::model::SchemaDef> {
    content
        .iter()
        .find(|(m, _)| m.contains("json"))
        .or(content.first())
        .and_then(|(_, s)| s.clone())
}

fn read_parameters(
    reader: &mut Reader<'_>,
    owner: &Node,
    format: &SchemaFormat,
) -> Vec<HttpParameter> {
    let Some(items) = reader.array_field(owner, "parameters") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Some(param) = reader.object(&item) else {
            continue;
        };
        let name = reader.required_string(&param, "name");
        let location = reader.required_string(&param, "in");
        if let Some(l) = &location
            && !matches!(l.as_str(), "path" | "query" | "header" | "cookie")
        {
            reader.error(
                param.loc.join("in"),
                SpecErrorKind::Invalid(format!(
                    "`in` must be path, query, header or cookie, found '{l}'"
                )),
            );
        }
        let required = reader.boolean(&param, "required").unwrap_or(false);
        let schema = param
            .get("schema")
            .and_then(|s| read_schema_node(reader, &s, format.clone(), false));
        if let (Some(name), Some(location)) = (name, location) {
            out.push(HttpParameter {
                required: required || location == "path",
                name,
                location,
                schema,
            });
        }
    }
    out
}

fn read_content(
    reader: &mut Reader<'_>,
    owner: &Node,
    format: &SchemaFormat,
) -> Vec<(String, Option<super::model::SchemaDef>)> {
    let Some(content) = reader.object_field(owner, "content") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (media_type, media) in content.entries() {
        let Some(media) = reader.object(&media) else {
            continue;
        };
        let schema = media
            .get("schema")
            .and_then(|s| read_schema_node(reader, &s, format.clone(), false));
        out.push((media_type, schema));
    }
    out
}

fn read_body(reader: &mut Reader<'_>, node: &Node, format: &SchemaFormat) -> Option<HttpBody> {
    let body = reader.object(node)?;
    Some(HttpBody {
        required: reader.boolean(&body, "required").unwrap_or(false),
        content: read_content(reader, &body, format),
    })
}

fn read_responses(reader: &mut Reader<'_>, op: &Node, format: &SchemaFormat) -> Vec<HttpResponse> {
    let Some(responses) = reader.object_field(op, "responses") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (status, node) in responses.entries() {
        if status.starts_with("x-") {
            continue;
        }
        if !is_status_key(&status) {
            reader.error(
                node.loc.clone(),
                SpecErrorKind::Invalid(format!(
                    "response key '{status}' is not an HTTP status code, a range like 4XX, or 'default'"
                )),
            );
            continue;
        }
        let Some(response) = reader.object(&node) else {
            continue;
        };
        out.push(HttpResponse {
            status,
            content: read_content(reader, &response, format),
        });
    }
    out
}

fn is_status_key(key: &str) -> bool {
    key == "default"
        || (key.len() == 3
            && key.as_bytes()[0].is_ascii_digit()
            && (key[1..].bytes().all(|b| b.is_ascii_digit()) || &key[1..] == "XX"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_keys() {
        for ok in ["200", "4XX", "default", "599"] {
            assert!(super::is_status_key(ok), "{ok}");
        }
        for bad in ["20", "2xx", "ok", "2000"] {
            assert!(!super::is_status_key(bad), "{bad}");
        }
    }
}
