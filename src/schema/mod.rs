//! Payload validation: each message's schema compiled once, then `validate` on the hot path.
//!
//! JSON Schema (AsyncAPI Schema Objects, drafts 4 to 2020-12, OpenAPI 3.0 and 3.1 schemas) runs
//! on the `jsonschema` crate; Avro on `apache-avro`. A schema the gateway cannot enforce (a format
//! it does not know, or one with remote references it will not fetch) compiles to
//! [`PayloadSchema::Unchecked`] and says why, so nothing is silently assumed valid.

mod avro;

use std::fmt;

use serde_json::Value;

use crate::spec::{SchemaDef, SchemaFormat};

pub use avro::AvroSchema;

/// Why a schema does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {format} schema: {reason}")]
pub struct SchemaError {
    pub format: String,
    pub reason: String,
}

/// Why a payload does not match its schema: where in the payload, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", if instance_path.is_empty() { "payload" } else { instance_path.as_str() })]
pub struct ValidationError {
    /// JSON pointer into the payload (`/temperature`), empty for the payload itself.
    pub instance_path: String,
    /// JSON pointer into the schema of the keyword that failed (`/properties/temperature/type`).
    pub schema_path: String,
    pub reason: String,
}

impl ValidationError {
    fn at_root(reason: impl Into<String>) -> Self {
        Self {
            instance_path: String::new(),
            schema_path: String::new(),
            reason: reason.into(),
        }
    }
}

/// How a payload is encoded on the wire, decided per message from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    AvroBinary,
}

impl Encoding {
    /// JSON unless the content type says Avro or raw bytes (and the schema is Avro).
    pub fn for_message(format: &SchemaFormat, content_type: Option<&str>) -> Encoding {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if *format == SchemaFormat::Avro && (ct.contains("avro") || ct.contains("octet-stream")) {
            Encoding::AvroBinary
        } else {
            Encoding::Json
        }
    }
}

/// A compiled payload (or headers) schema.
pub enum PayloadSchema {
    Json(Box<jsonschema::Validator>),
    Avro(Box<AvroSchema>),
    /// Kept for documentation and listings; payloads pass unchecked, for the stated reason.
    Unchecked {
        reason: String,
    },
}

impl fmt::Debug for PayloadSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadSchema::Json(_) => f.write_str("PayloadSchema::Json"),
            PayloadSchema::Avro(_) => f.write_str("PayloadSchema::Avro"),
            PayloadSchema::Unchecked { reason } => write!(f, "PayloadSchema::Unchecked({reason})"),
        }
    }
}

impl PayloadSchema {
    /// Compiles a schema as the document wrote it.
    pub fn compile(def: &SchemaDef) -> Result<PayloadSchema, SchemaError> {
        if !def.remote_refs.is_empty() {
            return Ok(PayloadSchema::Unchecked {
                reason: format!(
                    "the schema uses remote references the gateway does not fetch: {}",
                    def.remote_refs.join(", ")
                ),
            });
        }
        let error = |reason: String| SchemaError {
            format: def.format.to_string(),
            reason,
        };
        let draft = match &def.format {
            SchemaFormat::AsyncApi => jsonschema::Draft::Draft7,
            SchemaFormat::JsonSchema(version) => json_schema_draft(version, &def.schema),
            SchemaFormat::OpenApi30 => jsonschema::Draft::Draft4,
            SchemaFormat::OpenApi31 => jsonschema::Draft::Draft202012,
            SchemaFormat::Avro => {
                return AvroSchema::parse(&def.schema)
                    .map(|s| PayloadSchema::Avro(Box::new(s)))
                    .map_err(error);
            }
            SchemaFormat::Other(media_type) => {
                return Ok(PayloadSchema::Unchecked {
                    reason: format!("schema format '{media_type}' is not validated by the gateway"),
                });
            }
        };
        let schema = match def.format {
            SchemaFormat::OpenApi30 => openapi30_to_json_schema(&def.schema),
            _ => def.schema.clone(),
        };
        jsonschema::options()
            .with_draft(draft)
            .should_validate_formats(true)
            .build(&schema)
            .map(|v| PayloadSchema::Json(Box::new(v)))
            .map_err(|e| {
                let at = e.instance_path().to_string();
                error(if at.is_empty() {
                    e.to_string()
                } else {
                    format!("at {at}: {e}")
                })
            })
    }

    /// Validates an already-parsed JSON payload.
    pub fn validate_json(&self, payload: &Value) -> Result<(), ValidationError> {
        match self {
            PayloadSchema::Json(validator) => {
                validator.validate(payload).map_err(|e| ValidationError {
                    instance_path: e.instance_path().to_string(),
                    schema_path: e.schema_path().to_string(),
                    reason: e.to_string(),
                })
            }
            PayloadSchema::Avro(schema) => schema.validate_json(payload),
            PayloadSchema::Unchecked { .. } => Ok(()),
        }
    }

    /// Validates raw payload bytes in the given encoding.
    pub fn validate(&self, payload: &[u8], encoding: Encoding) -> Result<(), ValidationError> {
        match (self, encoding) {
            (PayloadSchema::Unchecked { .. }, _) => Ok(()),
            (PayloadSchema::Avro(schema), Encoding::AvroBinary) => schema.validate_binary(payload),
            _ => {
                let value: Value = serde_json::from_slice(payload)
                    .map_err(|e| ValidationError::at_root(format!("not valid JSON: {e}")))?;
                self.validate_json(&value)
            }
        }
    }

    /// True when payloads are actually checked.
    pub fn is_enforced(&self) -> bool {
        !matches!(self, PayloadSchema::Unchecked { .. })
    }
}

/// The draft a JSON Schema media type names (`version=draft-07`), else its `$schema`, else 7.
/// A schema as plain JSON Schema, for clients that describe inputs with it (MCP tool schemas):
/// OpenAPI 3.0's `nullable` rewritten; `None` for formats that are not JSON Schema (Avro, ...).
pub fn as_json_schema(def: &SchemaDef) -> Option<Value> {
    match &def.format {
        SchemaFormat::AsyncApi | SchemaFormat::JsonSchema(_) | SchemaFormat::OpenApi31 => {
            Some(def.schema.clone())
        }
        SchemaFormat::OpenApi30 => Some(openapi30_to_json_schema(&def.schema)),
        SchemaFormat::Avro | SchemaFormat::Other(_) => None,
    }
}

fn json_schema_draft(version: &str, schema: &Value) -> jsonschema::Draft {
    use jsonschema::Draft;
    let named = if version.is_empty() {
        schema.get("$schema").and_then(Value::as_str).unwrap_or("")
    } else {
        version
    };
    if named.contains("2020-12") {
        Draft::Draft202012
    } else if named.contains("2019-09") {
        Draft::Draft201909
    } else if named.contains("draft-04") {
        Draft::Draft4
    } else if named.contains("draft-06") {
        Draft::Draft6
    } else {
        Draft::Draft7
    }
}

/// OpenAPI 3.0 Schema Objects are JSON Schema draft 4 plus `nullable`; express `nullable` the
/// JSON Schema way so the validator enforces it.
fn openapi30_to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (key, value) in map {
                let converted = match key.as_str() {
                    // Keywords whose values are data, not schemas.
                    "enum" | "example" | "default" | "required" | "const" | "x-examples" => {
                        value.clone()
                    }
                    _ => openapi30_to_json_schema(value),
                };
                out.insert(key.clone(), converted);
            }
            if out.get("nullable") == Some(&Value::Bool(true)) {
                out.remove("nullable");
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert(
                        "type".into(),
                        Value::Array(vec![Value::String(t), Value::String("null".into())]),
                    );
                }
                if let Some(Value::Array(values)) = out.get_mut("enum")
                    && !values.contains(&Value::Null)
                {
                    values.push(Value::Null);
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(openapi30_to_json_schema).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::spec::Location;

    fn def(format: SchemaFormat, schema: Value) -> SchemaDef {
        SchemaDef {
            format,
            schema,
            remote_refs: Vec::new(),
            location: Location::new("t.yaml", "/payload"),
        }
    }

    #[test]
    fn json_schema_errors_name_the_failing_path() {
        let schema = PayloadSchema::compile(&def(
            SchemaFormat::AsyncApi,
            json!({"type": "object", "properties": {"temperature": {"type": "number"}}, "required": ["temperature"]}),
        ))
        .unwrap();
        assert!(
            schema
                .validate(br#"{"temperature": 21.5}"#, Encoding::Json)
                .is_ok()
        );
        let err = schema
            .validate(br#"{"temperature": "hot"}"#, Encoding::Json)
            .unwrap_err();
        assert_eq!(err.instance_path, "/temperature");
        assert_eq!(err.schema_path, "/properties/temperature/type");
        let err = schema.validate(b"{not json", Encoding::Json).unwrap_err();
        assert!(err.reason.starts_with("not valid JSON"), "{err}");
    }

    #[test]
    fn invalid_schemas_do_not_compile() {
        let err = PayloadSchema::compile(&def(
            SchemaFormat::OpenApi30,
            json!({"type": "object", "properties": {"name": {"type": "nonexistent"}}}),
        ))
        .unwrap_err();
        assert!(err.reason.contains("nonexistent"), "{err}");
    }

    #[test]
    fn openapi30_nullable_allows_null() {
        let schema = PayloadSchema::compile(&def(
            SchemaFormat::OpenApi30,
            json!({"type": "object", "properties": {"name": {"type": "string", "nullable": true}}}),
        ))
        .unwrap();
        assert!(schema.validate_json(&json!({"name": null})).is_ok());
        assert!(schema.validate_json(&json!({"name": 3})).is_err());
    }

    #[test]
    fn unknown_formats_and_remote_refs_are_unchecked_not_silent() {
        let other = PayloadSchema::compile(&def(
            SchemaFormat::Other("application/vnd.google.protobuf".into()),
            json!("syntax = \"proto3\";"),
        ))
        .unwrap();
        assert!(!other.is_enforced());
        let mut remote = def(
            SchemaFormat::Avro,
            json!({"$ref": "https://example.com/x.avsc"}),
        );
        remote.remote_refs.push("https://example.com/x.avsc".into());
        match PayloadSchema::compile(&remote).unwrap() {
            PayloadSchema::Unchecked { reason } => assert!(reason.contains("example.com")),
            other => panic!("expected unchecked, got {other:?}"),
        }
    }

    #[test]
    fn formats_are_asserted() {
        let schema = PayloadSchema::compile(&def(
            SchemaFormat::AsyncApi,
            json!({"type": "string", "format": "date-time"}),
        ))
        .unwrap();
        assert!(schema.validate_json(&json!("2026-11-22T10:00:00Z")).is_ok());
        assert!(schema.validate_json(&json!("yesterday")).is_err());
    }
}
