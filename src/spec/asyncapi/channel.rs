//! What AsyncAPI 2 and 3 channels share: addresses, parameters, messages and their schemas and
//! examples.

use super::*;

pub(super) fn check_address(reader: &mut Reader<'_>, address: &str, at: &Location) {
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

pub(super) fn read_parameters(
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

pub(super) fn string_list(value: Option<&Value>) -> Option<Vec<String>> {
    value?.as_array()?.iter().map(scalar_text).collect()
}

pub(super) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A message member, from the message itself or from its traits.
pub(super) enum Field {
    Node(Node),
    Trait(Value, Location),
}

pub(super) fn read_message(
    reader: &mut Reader<'_>,
    node: &Node,
    id: String,
    ctx: &Ctx,
) -> Option<Message> {
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
pub(super) fn read_examples(reader: &mut Reader<'_>, message: &Node) -> Vec<MessageExample> {
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
pub(super) fn read_schema(
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
