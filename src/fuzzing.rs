//! Entry points for the fuzz targets in `fuzz/`, and for `tests/fuzz_corpus.rs`, which replays
//! every committed input on stable so CI keeps each one that ever crashed. Each takes arbitrary
//! bytes and must return without panicking, overflowing its stack or hanging, whatever they are.
//!
//! Not an API: it exists so that the fuzzers and the replay run exactly the code a hostile
//! client reaches.

use std::path::Path;

use bytes::Bytes;
use serde_json::Value;

use crate::routing::address::{AddressTemplate, Params};
use crate::routing::envelope::{Delivered, Envelope, Origin, Transport};
use crate::routing::filter::Filter;
use crate::schema::{Encoding, PayloadSchema};
use crate::spec::{SchemaDef, SchemaFormat};

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (the `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*` names).
pub const TARGETS: [(&str, Target); 6] = [
    ("document", document),
    ("address", address),
    ("client_frame", client_frame),
    ("filter", filter),
    ("avro", avro),
    ("log_record", log_record),
];

/// Splits `data` at its first NUL: two inputs from one.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// A document as an upload brings it, read as YAML and as JSON, then compiled with every
/// protocol's bindings ($ref resolution and inlining included).
pub fn document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["fuzz.yaml", "fuzz.json"] {
        if let Ok(loaded) = crate::spec::load_text(Path::new(name), text) {
            let _ = crate::connectors::compile(&loaded.apis);
        }
    }
}

/// An address template and a concrete address: parsed, turned into each protocol's form,
/// matched, and the parameters it yields filled back in.
pub fn address(data: &[u8]) {
    let (template, concrete) = split(data);
    let (Ok(template), Ok(concrete)) =
        (std::str::from_utf8(template), std::str::from_utf8(concrete))
    else {
        return;
    };
    let Ok(template) = AddressTemplate::parse(template) else {
        return;
    };
    let forms = [
        Ok(template.generic()),
        template.mqtt(),
        template.amqp(),
        template.kafka(),
    ];
    for form in forms.into_iter().flatten() {
        let _ = form.wildcard_selector();
        let _ = form.kafka_selector();
        if let Some(params) = form.extract(concrete) {
            let _ = form.fill(|name| params.get(name));
        }
    }
    let _ = template.generic().fill(|_| Some(concrete));
}

/// What a WebSocket client frame or an HTTP publish body becomes: an acknowledgement, or a
/// payload checked against a JSON schema and an Avro one.
pub fn client_frame(data: &[u8]) {
    let _ = crate::server::stream::parse_ack(data);
    let _ = serde_json::from_slice::<Value>(data);
    for schema in client_schemas() {
        let _ = schema.validate(data, Encoding::Json);
        let _ = schema.validate(data, Encoding::AvroBinary);
    }
}

fn client_schemas() -> &'static [PayloadSchema] {
    static SCHEMAS: std::sync::OnceLock<Vec<PayloadSchema>> = std::sync::OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let json = serde_json::json!({
            "type": "object",
            "required": ["temperature"],
            "properties": {
                "temperature": {"type": "number", "minimum": -50},
                "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}},
                "nested": {"$ref": "#"}
            }
        });
        let defs = [
            (SchemaFormat::AsyncApi, json),
            (SchemaFormat::Avro, reading_avro_schema()),
        ];
        defs.into_iter()
            .map(|(format, schema)| {
                PayloadSchema::compile(&SchemaDef {
                    format,
                    schema,
                    remote_refs: Vec::new(),
                    location: crate::spec::Location::new("fuzz.yaml", ""),
                })
                .expect("the fuzz schemas compile")
            })
            .collect()
    })
}

fn reading_avro_schema() -> Value {
    serde_json::json!({
        "type": "record", "name": "Reading",
        "fields": [
            {"name": "device", "type": "string"},
            {"name": "temperature", "type": "double"},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "extra", "type": ["null", {"type": "map", "values": "long"}], "default": null},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}}
        ]
    })
}

/// A CEL expression and a payload: compiled, then evaluated against a message carrying it.
pub fn filter(data: &[u8]) {
    let (expression, payload) = split(data);
    let Ok(expression) = std::str::from_utf8(expression) else {
        return;
    };
    let Ok(filter) = Filter::compile(expression) else {
        return;
    };
    let mut params = Params::default();
    params.insert("deviceId".into(), "d-1".into());
    let envelope = Envelope::new(
        "fuzz.channel".into(),
        "devices/d-1/telemetry".into(),
        params,
        Bytes::copy_from_slice(payload),
        Origin::client(Transport::Http, 0),
    );
    let _ = filter.matches(&Delivered::new(0, envelope, None));
}

/// Avro binary decoded against a schema and, when it decodes, encoded back and compared.
pub fn avro(data: &[u8]) {
    let schema = avro_schema();
    if let Ok(json) = schema.decode_to_json(data) {
        let encoded = schema
            .encode_json(&json)
            .expect("what decodes encodes again");
        assert_eq!(
            schema.decode_to_json(&encoded).ok(),
            Some(json),
            "encode(decode(x)) decodes to the same value"
        );
    }
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let _ = schema.validate_json(&value);
        let _ = schema.encode_json(&value);
    }
}

fn avro_schema() -> &'static crate::schema::AvroSchema {
    static SCHEMA: std::sync::OnceLock<crate::schema::AvroSchema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        crate::schema::AvroSchema::parse(&reading_avro_schema()).expect("the fuzz schema parses")
    })
}

/// A record as read back from the log (a corrupt one is an error, never a panic).
pub fn log_record(data: &[u8]) {
    crate::store::decode_for_fuzzing(data);
}
