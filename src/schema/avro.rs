//! Avro schemas: parse once, check JSON payloads against them (with the failing path), and
//! decode Avro binary payloads.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{Name, UnionSchema};
use serde_json::Value;

use super::ValidationError;
use crate::spec::error::join_pointer;

/// A parsed Avro schema with its named types, so references (`"type": "Address"`) resolve.
pub struct AvroSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl AvroSchema {
    /// Parses an Avro schema written as JSON (a mapping, a type name, or a union).
    pub fn parse(value: &Value) -> Result<AvroSchema, String> {
        let schema = Schema::parse(value).map_err(|e| e.to_string())?;
        let names = apache_avro::schema::ResolvedSchema::try_from(&schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(name, schema)| (name.clone(), (*schema).clone()))
            .collect();
        Ok(AvroSchema { schema, names })
    }

    /// The parsed schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Checks a JSON payload against the schema, as Avro's JSON mapping reads it (a union value
    /// may be written plainly or as `{"type": value}`).
    pub fn validate_json(&self, payload: &Value) -> Result<(), ValidationError> {
        self.check(payload, &self.schema, "", "")
    }

    /// Decodes one Avro binary datum; trailing bytes are an error.
    pub fn validate_binary(&self, payload: &[u8]) -> Result<(), ValidationError> {
        let mut reader = payload;
        let decoded = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema)
            .build()
            .and_then(|r| r.read_value(&mut reader));
        match decoded {
            Ok(_) if reader.is_empty() => Ok(()),
            Ok(_) => Err(ValidationError::at_root(format!(
                "{} bytes left after the Avro datum",
                reader.len()
            ))),
            Err(e) => Err(ValidationError::at_root(format!(
                "not a valid Avro datum: {e}"
            ))),
        }
    }

    /// Encodes a JSON value as one Avro binary datum (Avro's JSON mapping: records from
    /// objects, union branches chosen by value, missing fields from their defaults).
    pub fn encode_json(&self, value: &Value) -> Result<Vec<u8>, String> {
        self.validate_json(value).map_err(|e| e.to_string())?;
        let avro = apache_avro::types::Value::try_from(value.clone()).map_err(|e| e.to_string())?;
        let resolved = avro.resolve(&self.schema).map_err(|e| e.to_string())?;
        apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .build()
            .and_then(|w| w.write_value_to_vec(resolved))
            .map_err(|e| e.to_string())
    }

    /// Decodes one Avro binary datum into JSON.
    pub fn decode_to_json(&self, payload: &[u8]) -> Result<Value, String> {
        let mut reader = payload;
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema)
            .build()
            .and_then(|r| r.read_value(&mut reader))
            .map_err(|e| format!("not a valid Avro datum: {e}"))?;
        Value::try_from(value).map_err(|e| e.to_string())
    }

    fn check(
        &self,
        value: &Value,
        schema: &Schema,
        path: &str,
        schema_path: &str,
    ) -> Result<(), ValidationError> {
        let fail = |reason: String| {
            Err(ValidationError {
                instance_path: path.to_owned(),
                schema_path: schema_path.to_owned(),
                reason,
            })
        };
        let int_in = |min: i64, max: i64| value.as_i64().is_some_and(|n| n >= min && n <= max);
        match schema {
            Schema::Null if value.is_null() => Ok(()),
            Schema::Boolean if value.is_boolean() => Ok(()),
            Schema::Int | Schema::Date | Schema::TimeMillis
                if int_in(i32::MIN as i64, i32::MAX as i64) =>
            {
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
                if value.is_i64() || value.is_u64() && value.as_i64().is_some() =>
            {
                Ok(())
            }
            Schema::Float | Schema::Double if value.is_number() => Ok(()),
            Schema::String | Schema::Uuid(_) | Schema::Bytes | Schema::BigDecimal
                if value.is_string() =>
            {
                Ok(())
            }
            Schema::Decimal(_) if value.is_string() || value.is_number() => Ok(()),
            Schema::Fixed(fixed) | Schema::Duration(fixed) => match value.as_str() {
                Some(s) if s.chars().count() == fixed.size => Ok(()),
                _ => fail(format!("expected a string of {} bytes (fixed)", fixed.size)),
            },
            Schema::Enum(e) => match value.as_str() {
                Some(s) if e.symbols.iter().any(|sym| sym == s) => Ok(()),
                _ => fail(format!("expected one of {:?}", e.symbols)),
            },
            Schema::Array(array) => {
                let Some(items) = value.as_array() else {
                    return fail("expected an array".into());
                };
                for (i, item) in items.iter().enumerate() {
                    self.check(
                        item,
                        &array.items,
                        &join_pointer(path, &i.to_string()),
                        &join_pointer(schema_path, "items"),
                    )?;
                }
                Ok(())
            }
            Schema::Map(map) => {
                let Some(entries) = value.as_object() else {
                    return fail("expected a map (an object)".into());
                };
                for (key, item) in entries {
                    self.check(
                        item,
                        &map.types,
                        &join_pointer(path, key),
                        &join_pointer(schema_path, "values"),
                    )?;
                }
                Ok(())
            }
            Schema::Record(record) => {
                let Some(object) = value.as_object() else {
                    return fail(format!("expected a record '{}' (an object)", record.name));
                };
                for (i, field) in record.fields.iter().enumerate() {
                    let field_path = join_pointer(path, &field.name);
                    let field_schema_path =
                        join_pointer(&join_pointer(schema_path, "fields"), &i.to_string());
                    match object.get(&field.name) {
                        Some(v) => self.check(v, &field.schema, &field_path, &field_schema_path)?,
                        None if field.default.is_some() || self.accepts_null(&field.schema) => {}
                        None => {
                            return Err(ValidationError {
                                instance_path: field_path,
                                schema_path: field_schema_path,
                                reason: format!("required field '{}' is missing", field.name),
                            });
                        }
                    }
                }
                if let Some(extra) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
                    return Err(ValidationError {
                        instance_path: join_pointer(path, extra),
                        schema_path: schema_path.to_owned(),
                        reason: format!("field '{extra}' is not in record '{}'", record.name),
                    });
                }
                Ok(())
            }
            Schema::Union(union) => self.check_union(value, union, path, schema_path),
            Schema::Ref { name } => match self.names.get(name) {
                Some(named) => self.check(value, named, path, schema_path),
                None => fail(format!("unknown named type '{name}'")),
            },
            other => fail(format!("expected {}", describe(other))),
        }
    }

    fn check_union(
        &self,
        value: &Value,
        union: &UnionSchema,
        path: &str,
        schema_path: &str,
    ) -> Result<(), ValidationError> {
        let variants = union.variants();
        if variants
            .iter()
            .any(|v| self.check(value, v, path, schema_path).is_ok())
        {
            return Ok(());
        }
        // Avro's JSON encoding wraps a non-null union value as {"<type name>": value}.
        if let Some(map) = value.as_object()
            && map.len() == 1
        {
            let (branch, inner) = map.iter().next().expect("one entry");
            if let Some(v) = variants.iter().find(|v| branch_name(v) == *branch) {
                return self.check(inner, v, &join_pointer(path, branch), schema_path);
            }
        }
        Err(ValidationError {
            instance_path: path.to_owned(),
            schema_path: schema_path.to_owned(),
            reason: format!(
                "matches no branch of the union [{}]",
                variants
                    .iter()
                    .map(branch_name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    fn accepts_null(&self, schema: &Schema) -> bool {
        match schema {
            Schema::Null => true,
            Schema::Union(u) => u.variants().iter().any(|v| matches!(v, Schema::Null)),
            _ => false,
        }
    }
}

fn branch_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => r.name.fullname(None),
        Schema::Enum(e) => e.name.fullname(None),
        Schema::Fixed(f) => f.name.fullname(None),
        Schema::Ref { name } => name.fullname(None),
        other => describe(other),
    }
}

fn describe(schema: &Schema) -> String {
    let kind = format!("{:?}", apache_avro::schema::SchemaKind::from(schema));
    kind.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn telemetry() -> AvroSchema {
        AvroSchema::parse(&json!({
            "type": "record", "name": "Telemetry", "namespace": "iot",
            "fields": [
                {"name": "deviceId", "type": "string"},
                {"name": "temperature", "type": "double"},
                {"name": "unit", "type": {"type": "enum", "name": "Unit", "symbols": ["C", "F"]}},
                {"name": "note", "type": ["null", "string"], "default": null},
                {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn json_encodes_to_avro_binary_and_back() {
        let schema = telemetry();
        let reading = json!({"deviceId": "42", "temperature": 21.5, "unit": "F", "note": "hi"});
        let datum = schema.encode_json(&reading).unwrap();
        schema.validate_binary(&datum).unwrap();
        let back = schema.decode_to_json(&datum).unwrap();
        assert_eq!(back["deviceId"], "42");
        assert_eq!(back["unit"], "F");
        assert_eq!(back["tags"], json!([]), "a missing field takes its default");
        let err = schema
            .encode_json(&json!({"deviceId": "42", "temperature": "hot", "unit": "C"}))
            .unwrap_err();
        assert!(err.contains("/temperature"), "{err}");
    }

    #[test]
    fn json_payloads_are_checked_with_paths() {
        let schema = telemetry();
        assert!(
            schema
                .validate_json(&json!({"deviceId": "42", "temperature": 21.5, "unit": "C"}))
                .is_ok()
        );
        assert!(schema
            .validate_json(&json!({"deviceId": "42", "temperature": 1, "unit": "C", "note": {"string": "x"}}))
            .is_ok());
        let err = schema
            .validate_json(&json!({"deviceId": "42", "temperature": "hot", "unit": "C"}))
            .unwrap_err();
        assert_eq!(err.instance_path, "/temperature");
        let err = schema
            .validate_json(&json!({"deviceId": "42", "temperature": 1, "unit": "K"}))
            .unwrap_err();
        assert_eq!(err.instance_path, "/unit");
        let err = schema
            .validate_json(&json!({"temperature": 1, "unit": "C"}))
            .unwrap_err();
        assert!(err.reason.contains("deviceId"), "{err}");
        let err = schema
            .validate_json(&json!({"deviceId": "1", "temperature": 1, "unit": "C", "tags": [1]}))
            .unwrap_err();
        assert_eq!(err.instance_path, "/tags/0");
    }

    #[test]
    fn binary_datums_are_decoded() {
        let schema = AvroSchema::parse(
            &json!({"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}]}),
        )
        .unwrap();
        let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema.schema())
            .build()
            .unwrap()
            .write_value_to_vec(apache_avro::types::Value::Record(vec![(
                "n".into(),
                apache_avro::types::Value::Long(7),
            )]))
            .unwrap();
        assert!(schema.validate_binary(&datum).is_ok());
        let mut longer = datum.clone();
        longer.push(0);
        assert!(schema.validate_binary(&longer).is_err());
        assert!(schema.validate_binary(&[]).is_err());
    }

    #[test]
    fn invalid_avro_schemas_are_rejected() {
        assert!(AvroSchema::parse(&json!({"type": "record", "name": "R"})).is_err());
        assert!(AvroSchema::parse(&json!("nonexistent")).is_err());
    }
}
