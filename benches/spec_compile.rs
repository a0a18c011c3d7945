//! Spec compilation over the whole conformance corpus, and the per-message hot path:
//! address → parameters, parameters → address, payload validation.

use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use stepflow::routing::address::AddressTemplate;
use stepflow::spec;

fn corpus_documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    let mut out = Vec::new();
    for dir in ["asyncapi/v2", "asyncapi/v3", "openapi/v3.0", "openapi/v3.1"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("conformance corpus next to the repo") {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    if path.file_name().is_some_and(|n| n != "common") {
                        stack.push(path);
                    }
                } else {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

fn corpus(c: &mut Criterion) {
    let docs = corpus_documents();
    let mut group = c.benchmark_group("corpus");
    group.throughput(Throughput::Elements(docs.len() as u64));
    group.bench_function("load_and_compile_every_document", |b| {
        b.iter(|| {
            let mut routes = 0;
            for doc in &docs {
                let loaded = spec::load_file(doc).expect("corpus document loads");
                routes += stepflow::connectors::compile(&loaded.apis)
                    .expect("compiles")
                    .table
                    .len();
            }
            black_box(routes)
        })
    });
    group.bench_function("load_only_every_document", |b| {
        b.iter(|| {
            for doc in &docs {
                black_box(spec::load_file(doc).expect("corpus document loads"));
            }
        })
    });
    group.finish();
}

fn hot_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("address");
    group.throughput(Throughput::Elements(1));
    let mqtt = AddressTemplate::parse("devices/{deviceId}/telemetry")
        .unwrap()
        .mqtt()
        .unwrap();
    group.bench_function("extract_mqtt_one_param", |b| {
        b.iter(|| black_box(mqtt.extract(black_box("devices/device-000042/telemetry"))))
    });
    let nested = AddressTemplate::parse("sites/{site}/buildings/{building}/rooms/{room}/temp")
        .unwrap()
        .mqtt()
        .unwrap();
    group.bench_function("extract_mqtt_three_params", |b| {
        b.iter(|| black_box(nested.extract(black_box("sites/berlin/buildings/b7/rooms/r101/temp"))))
    });
    let kafka = AddressTemplate::parse("adeo-{env}-case-study-COSTING-REQUEST-{version}")
        .unwrap()
        .kafka()
        .unwrap();
    group.bench_function("extract_kafka_backtracking", |b| {
        b.iter(|| black_box(kafka.extract(black_box("adeo-prod-eu-case-study-COSTING-REQUEST-v2"))))
    });
    group.bench_function("reject_non_matching", |b| {
        b.iter(|| black_box(mqtt.extract(black_box("devices/42/status"))))
    });
    group.bench_function("fill_mqtt_one_param", |b| {
        b.iter(|| black_box(mqtt.fill(|_| Some(black_box("device-000042")))))
    });
    group.finish();

    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("asyncapi-specs");
    let loaded = spec::load_paths(&[specs]).unwrap();
    let compiled = stepflow::connectors::compile(&loaded.apis).unwrap();
    let route = compiled.table.get("iot.telemetry").unwrap().clone();
    let payload =
        br#"{"temperature": 21.5, "humidity": 40, "battery": 88, "ts": "2026-11-22T10:00:00Z"}"#;
    let mut group = c.benchmark_group("payload");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("validate_telemetry_json", |b| {
        b.iter(|| black_box(route.validate(black_box(payload)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, corpus, hot_path);
criterion_main!(benches);
