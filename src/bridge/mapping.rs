//! What a bridge changes on the way: address parameters, Kafka keys and headers rendered from
//! templates over the source message, and the payload converted between JSON and Avro binary.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::routing::envelope::Delivered;
use crate::schema::PayloadSchema;
use crate::template::Piece;

/// A template over the source message: literal text with `{param}`, `{header.NAME}`,
/// `{payload.FIELD.SUBFIELD}`, `{address}` and `{channel}` placeholders — the one `{name}`
/// syntax ([`crate::template`]), each placeholder resolved to its source once, at load.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Param(String),
    Header(String),
    Payload(Vec<String>),
    Address,
    Channel,
}

impl Template {
    /// Parses a template; `params` are the source's address parameters, the only ones a bare
    /// `{name}` may name.
    pub fn parse(raw: &str, params: &[String]) -> Result<Template, String> {
        let parsed = crate::template::Template::parse(raw).map_err(|e| format!("'{raw}' {e}"))?;
        let mut parts = Vec::new();
        for piece in parsed.pieces() {
            let name = match piece {
                Piece::Text(text) => {
                    parts.push(Part::Text(text.clone()));
                    continue;
                }
                Piece::Placeholder(name) => name.trim(),
            };
            parts.push(match name.split_once('.') {
                None if name == "address" => Part::Address,
                None if name == "channel" => Part::Channel,
                None if params.iter().any(|p| p == name) => Part::Param(name.to_owned()),
                None => {
                    return Err(format!(
                        "'{{{name}}}' is not a parameter of the source channel (it has: {}); \
                         headers are {{header.NAME}}, payload fields {{payload.FIELD}}",
                        if params.is_empty() {
                            "none".to_owned()
                        } else {
                            params.join(", ")
                        }
                    ));
                }
                Some(("header", h)) if !h.is_empty() => Part::Header(h.to_owned()),
                Some(("payload", path)) if !path.is_empty() => {
                    Part::Payload(path.split('.').map(str::to_owned).collect())
                }
                Some(_) => {
                    return Err(format!(
                        "'{{{name}}}': placeholders are {{param}}, {{header.NAME}}, {{payload.FIELD}}, {{address}} or {{channel}}"
                    ));
                }
            });
        }
        Ok(Template { parts })
    }

    /// A template that copies one source parameter.
    pub fn param(name: &str) -> Template {
        Template {
            parts: vec![Part::Param(name.to_owned())],
        }
    }

    /// Renders the template for one message; `payload` is its parsed JSON payload, if any. A
    /// placeholder with no value is an error naming it.
    pub fn render(&self, message: &Delivered, payload: Option<&Value>) -> Result<String, String> {
        let envelope = &message.envelope;
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Param(name) => out.push_str(
                    envelope
                        .params
                        .get(name)
                        .ok_or_else(|| format!("the message has no parameter '{name}'"))?,
                ),
                Part::Header(name) => out.push_str(
                    envelope
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.as_str())
                        .ok_or_else(|| format!("the message has no header '{name}'"))?,
                ),
                Part::Payload(path) => {
                    let mut at = payload;
                    for field in path {
                        at = at.and_then(|v| v.get(field));
                    }
                    match at {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                            out.push_str(&v.to_string())
                        }
                        _ => {
                            return Err(format!(
                                "the payload has no scalar field '{}'",
                                path.join(".")
                            ));
                        }
                    }
                }
                Part::Address => out.push_str(&envelope.address),
                Part::Channel => out.push_str(&envelope.channel),
            }
        }
        Ok(out)
    }

    /// Whether rendering needs the parsed payload.
    pub fn reads_payload(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Payload(_)))
    }
}

/// How the payload changes encoding between source and target.
#[derive(Debug, Clone)]
pub enum Conversion {
    None,
    /// JSON in, Avro binary out, with the target message's schema.
    JsonToAvro(Arc<PayloadSchema>),
    /// Avro binary in (the source message's schema), JSON out.
    AvroToJson(Arc<PayloadSchema>),
}

impl Conversion {
    /// Metric label.
    pub fn label(&self) -> Option<&'static str> {
        match self {
            Conversion::None => None,
            Conversion::JsonToAvro(_) => Some("json_to_avro"),
            Conversion::AvroToJson(_) => Some("avro_to_json"),
        }
    }

    /// The payload in the target's encoding; the error says why it cannot be converted.
    pub fn apply(&self, payload: &Bytes, parsed: Option<&Value>) -> Result<Bytes, String> {
        match self {
            Conversion::None => Ok(payload.clone()),
            Conversion::JsonToAvro(schema) => {
                let PayloadSchema::Avro(avro) = schema.as_ref() else {
                    return Err("the target's schema is not Avro".into());
                };
                let owned;
                let value = match parsed {
                    Some(v) => v,
                    None => {
                        owned = serde_json::from_slice::<Value>(payload)
                            .map_err(|e| format!("the payload is not JSON: {e}"))?;
                        &owned
                    }
                };
                avro.encode_json(value)
                    .map(Bytes::from)
                    .map_err(|e| format!("cannot encode as Avro: {e}"))
            }
            Conversion::AvroToJson(schema) => {
                let PayloadSchema::Avro(avro) = schema.as_ref() else {
                    return Err("the source's schema is not Avro".into());
                };
                let value = avro.decode_to_json(payload)?;
                Ok(Bytes::from(value.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::address::Params;
    use crate::routing::envelope::{Envelope, Origin, Transport};

    fn message() -> Delivered {
        let mut params = Params::default();
        params.insert("deviceId".into(), "d-7".into());
        let mut envelope = Envelope::new(
            "iot.telemetry".into(),
            "devices/d-7/telemetry".into(),
            params,
            Bytes::from_static(br#"{"site": {"id": "lab"}, "n": 3}"#),
            Origin::client(Transport::Http, 0),
        );
        envelope.headers.push(("Trace".into(), "t1".into()));
        Delivered::new(9, envelope, None)
    }

    #[test]
    fn renders_params_headers_payload_fields_and_the_address() {
        let params = vec!["deviceId".to_owned()];
        let t = Template::parse(
            "{deviceId}/{header.trace}/{payload.site.id}/{payload.n}@{address}",
            &params,
        )
        .unwrap();
        let m = message();
        let payload: Value = serde_json::from_slice(&m.envelope.payload).unwrap();
        assert_eq!(
            t.render(&m, Some(&payload)).unwrap(),
            "d-7/t1/lab/3@devices/d-7/telemetry"
        );
        let missing = Template::parse("{payload.nope}", &params).unwrap();
        assert!(
            missing
                .render(&m, Some(&payload))
                .unwrap_err()
                .contains("nope")
        );
    }

    #[test]
    fn converts_json_to_avro_and_back() {
        use crate::schema::AvroSchema;
        let schema = Arc::new(PayloadSchema::Avro(Box::new(
            AvroSchema::parse(&serde_json::json!({
                "type": "record", "name": "R",
                "fields": [{"name": "n", "type": "long"}, {"name": "site", "type": ["null", "string"], "default": null}]
            }))
            .unwrap(),
        )));
        let json = Bytes::from_static(br#"{"n": 3}"#);
        let avro = Conversion::JsonToAvro(schema.clone())
            .apply(&json, None)
            .unwrap();
        assert_eq!(&avro[..], &[6u8, 0], "zig-zag 3, then the null branch");
        let back = Conversion::AvroToJson(schema.clone())
            .apply(&avro, None)
            .unwrap();
        let back: Value = serde_json::from_slice(&back).unwrap();
        assert_eq!(back, serde_json::json!({"n": 3, "site": null}));
        let refused = Conversion::JsonToAvro(schema).apply(&Bytes::from_static(b"{}"), None);
        assert!(refused.is_err(), "a required field is missing");
    }

    #[test]
    fn refuses_unknown_parameters_and_unclosed_braces() {
        let params = vec!["deviceId".to_owned()];
        assert!(
            Template::parse("{siteId}", &params)
                .unwrap_err()
                .contains("deviceId")
        );
        assert!(Template::parse("{deviceId", &params).is_err());
        assert!(Template::parse("{foo.bar}", &params).is_err());
    }
}
