//! What the live registry's new surfaces cost with 1,000 routes, each next to a baseline in the
//! same run: `/api/v1/asyncapi.json` (built per request, for a `*` key and for a key of 100
//! scopes) against serializing `GET /api/v1/channels`; and a bridge change (100 bridges
//! compiled as a set against the table, then planned against the running set) against
//! compiling the 1,000-route table itself.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use stepflow::auth::{Principal, Scopes};
use stepflow::bridge::running::RunningBridges;
use stepflow::calls::Operations;
use stepflow::hub::{Hub, HubConfig};
use stepflow::store::{Store, StoreConfig};
use stepflow::upstream::{Connections, ServerOverride};

const ROUTES: usize = 1000;
const BRIDGES: usize = 100;

/// 1,000 channels over MQTT: the even ones the gateway receives, the odd ones it sends.
fn document() -> String {
    let mut out = String::from(
        "asyncapi: 3.0.0\ninfo: {title: Bench, version: '1'}\nservers:\n  broker: {host: '127.0.0.1:1883', protocol: mqtt}\nchannels:\n",
    );
    for i in 0..ROUTES {
        out.push_str(&format!(
            "  c{i}:\n    address: 'load/c{i}/{{deviceId}}'\n    description: Channel {i}.\n    messages:\n      m:\n        payload:\n          type: object\n          required: [seq]\n          properties:\n            seq: {{type: integer}}\n            note: {{type: string, maxLength: 64}}\n"
        ));
    }
    out.push_str("operations:\n");
    for i in 0..ROUTES {
        let action = if i % 2 == 0 { "receive" } else { "send" };
        out.push_str(&format!(
            "  op{i}: {{action: {action}, channel: {{$ref: '#/channels/c{i}'}}}}\n"
        ));
    }
    out
}

/// 100 bridges, each from a readable channel to a writable one.
fn bridges() -> Vec<(std::path::PathBuf, String)> {
    let mut text = String::from("bridges:\n");
    for i in 0..BRIDGES {
        text.push_str(&format!(
            "  b{i}:\n    from: bench.c{}\n    to:\n      - channel: bench.c{}\n        params: {{deviceId: '{{deviceId}}'}}\n",
            2 * i,
            2 * i + 1
        ));
    }
    vec![("bridges.yaml".into(), text)]
}

fn bench(c: &mut Criterion) {
    let text = document();
    let loaded = stepflow::spec::load_text(std::path::Path::new("bench.yaml"), &text).unwrap();
    let table = Arc::new(stepflow::connectors::compile(&loaded.apis).unwrap().table);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let hub = Arc::new(Hub::new(
        table.clone(),
        store.clone(),
        Connections::default(),
        HubConfig::default(),
    ));
    let operations =
        Arc::new(Operations::build(&[], store, |_, _| ServerOverride::default()).unwrap());
    let routes: Vec<_> = hub.routes().map(|r| r.route()).collect();
    let everything = Principal::unrestricted();
    let globs: Vec<String> = (0..ROUTES / 10)
        .map(|i| format!("subscribe:bench.c{}", 2 * i))
        .collect();
    let scoped = Principal::unrestricted()
        .with_scopes(Scopes::parse(globs.iter().map(String::as_str)).unwrap());
    let describe = |p: &Principal| {
        let document = stepflow::server::asyncapi::describe(&routes, p, "localhost", false, true);
        serde_json::to_vec(&document).unwrap()
    };
    assert!(describe(&scoped).len() < describe(&everything).len());

    let mut group = c.benchmark_group("asyncapi_json_1000_routes");
    group.bench_function("all_channels", |b| b.iter(|| describe(&everything)));
    group.bench_function("key_of_100_scopes", |b| b.iter(|| describe(&scoped)));
    group.bench_function("baseline_channels_listing", |b| {
        b.iter(|| {
            let channels: Vec<serde_json::Value> = hub
                .routes()
                .map(|r| stepflow::server::api::channel_view(&r.route(), 0, hub.connections()))
                .collect();
            serde_json::to_vec(&serde_json::json!({ "channels": channels })).unwrap()
        })
    });
    group.finish();

    let files = bridges();
    let has_operation = |_: &str| false;
    let compiled: Vec<_> = stepflow::bridge::compile(&files, &table, &has_operation)
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let running = RunningBridges::new(
        hub.clone(),
        operations,
        tokio_util::sync::CancellationToken::new(),
    );
    // The lanes start on the runtime's workers and idle: nothing is published.
    runtime.block_on(async {
        running
            .apply(compiled.clone(), &Default::default())
            .await
            .unwrap();
    });
    let mut group = c.benchmark_group("bridge_change_100_bridges_1000_routes");
    group.bench_function("compile_the_set", |b| {
        b.iter(|| stepflow::bridge::compile(&files, &table, &has_operation).unwrap())
    });
    group.bench_function("plan_against_the_running_set", |b| {
        b.iter(|| running.plan(&compiled, &Default::default()))
    });
    group.bench_function("baseline_compile_the_table", |b| {
        b.iter(|| stepflow::connectors::compile(&loaded.apis).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
