//! A bridge lane's per-message work besides the network: the CEL filter, the target's parameter
//! and key templates, and the JSON → Avro conversion — each next to the cheapest thing the lane
//! does anyway (parsing the JSON payload once) as the baseline.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use stepflow::bridge::mapping::{Conversion, Template};
use stepflow::routing::address::Params;
use stepflow::routing::envelope::{Delivered, Envelope, Origin, Transport};
use stepflow::routing::filter::Filter;
use stepflow::schema::{AvroSchema, PayloadSchema};

const PAYLOAD: &[u8] =
    br#"{"temperature": 21.5, "humidity": 40.0, "battery": 88.0, "ts": "2026-11-22T10:00:00Z"}"#;

fn message() -> Delivered {
    let mut params = Params::default();
    params.insert("deviceId".into(), "d-42".into());
    let mut envelope = Envelope::new(
        "iot.telemetry".into(),
        "devices/d-42/telemetry".into(),
        params,
        Bytes::from_static(PAYLOAD),
        Origin::upstream(Transport::Mqtt, "broker".into()),
    );
    envelope.headers.push(("site".into(), "lab".into()));
    Delivered::new(1, envelope, None)
}

fn lane_work(c: &mut Criterion) {
    let message = message();
    let mut group = c.benchmark_group("bridge_message");
    group.throughput(Throughput::Elements(1));

    group.bench_function("parse_json_baseline", |b| {
        b.iter(|| serde_json::from_slice::<Value>(&message.envelope.payload).unwrap())
    });

    let filter = Filter::compile(
        r#"has(payload.ts) && payload.temperature > 30.0 || headers.site == "lab""#,
    )
    .unwrap();
    group.bench_function("cel_filter", |b| {
        b.iter(|| filter.matches(&message).unwrap())
    });

    let params = vec!["deviceId".to_owned()];
    let key = Template::parse("{deviceId}", &params).unwrap();
    let topic = Template::parse("site/{header.site}/{payload.ts}/{deviceId}", &params).unwrap();
    let parsed: Value = serde_json::from_slice(PAYLOAD).unwrap();
    group.bench_function("templates_key_and_topic", |b| {
        b.iter(|| {
            (
                key.render(&message, Some(&parsed)).unwrap(),
                topic.render(&message, Some(&parsed)).unwrap(),
            )
        })
    });

    let schema = AvroSchema::parse(&json!({
        "type": "record", "name": "Reading",
        "fields": [
            {"name": "temperature", "type": "double"},
            {"name": "humidity", "type": ["null", "double"], "default": null},
            {"name": "battery", "type": ["null", "double"], "default": null},
            {"name": "ts", "type": "string"}]
    }))
    .unwrap();
    let to_avro = Conversion::JsonToAvro(Arc::new(PayloadSchema::Avro(Box::new(schema))));
    group.bench_function("json_to_avro", |b| {
        b.iter(|| {
            to_avro
                .apply(&message.envelope.payload, Some(&parsed))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, lane_work);
criterion_main!(benches);
