//! Readers of the objects AsyncAPI and OpenAPI share: server variables in URLs, Security
//! Requirement and Security Scheme Objects, and Schema Objects.

use serde_json::Value;

use super::error::{Location, SpecErrorKind};
use super::model::{SchemaDef, SchemaFormat, SecurityScheme};
use super::reader::{Reader, placeholders};
use super::source::Node;

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

pub(super) fn security_scheme(
    reader: &mut Reader<'_>,
    name: String,
    scheme: &Node,
) -> SecurityScheme {
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
