//! What `tools/list` costs the gateway with 1,000 routes: building the tool catalogue (once per
//! change of the routes) and answering one caller (its scopes applied, the result serialized),
//! next to serializing `GET /api/v1/channels` for the same routes, in the same run. The round
//! trip over HTTP, and a publish next to an HTTP POST, are in `examples/load_mcp.rs`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rmcp::model::ListToolsResult;
use stepflow::auth::{Principal, Scopes};
use stepflow::calls::Operations;
use stepflow::hub::{Hub, HubConfig};
use stepflow::server::mcp::catalogue::Catalogue;
use stepflow::store::{Store, StoreConfig};
use stepflow::upstream::{Connections, ServerOverride};

const ROUTES: usize = 1000;

fn document() -> String {
    let mut out = String::from("asyncapi: 3.0.0\ninfo: {title: Bench, version: '1'}\nchannels:\n");
    for i in 0..ROUTES {
        out.push_str(&format!(
            "  c{i}:\n    address: 'load/c{i}/{{deviceId}}'\n    description: Commands of kind {i}.\n    messages:\n      m:\n        payload:\n          type: object\n          required: [action, seq]\n          properties:\n            action: {{type: string, enum: [reboot, identify]}}\n            seq: {{type: integer}}\n            note: {{type: string, maxLength: 64}}\n"
        ));
    }
    out.push_str("operations:\n");
    for i in 0..ROUTES {
        out.push_str(&format!(
            "  send{i}: {{action: send, channel: {{$ref: '#/channels/c{i}'}}}}\n"
        ));
    }
    out
}

fn tools_list(c: &mut Criterion) {
    let loaded =
        stepflow::spec::load_text(std::path::Path::new("bench.yaml"), &document()).unwrap();
    let table = Arc::new(stepflow::connectors::compile(&loaded.apis).unwrap().table);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let hub = Hub::new(
        table,
        store.clone(),
        Connections::default(),
        HubConfig::default(),
    );
    let operations = Operations::build(&[], store, |_, _| ServerOverride::default()).unwrap();
    let everything = Principal::unrestricted();
    // A key that may publish on a tenth of the channels, named one by one: the filter runs each
    // of its 100 scopes over every tool.
    let globs: Vec<String> = (0..ROUTES / 10)
        .map(|i| format!("publish:bench.c{i}"))
        .collect();
    let scoped = Principal::unrestricted()
        .with_scopes(Scopes::parse(globs.iter().map(String::as_str)).unwrap());
    let catalogue = Catalogue::build(&hub, &operations);
    assert_eq!(catalogue.tools.len(), ROUTES + 3);
    assert_eq!(catalogue.visible(&scoped).count(), ROUTES / 10 + 3);

    let mut group = c.benchmark_group("tools_list_1000_routes");
    group.bench_function("catalogue_build", |b| {
        b.iter(|| Catalogue::build(&hub, &operations))
    });
    for (name, principal) in [
        ("answer_all_tools", &everything),
        ("answer_scoped_key", &scoped),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let tools = catalogue.visible(principal).cloned().collect();
                serde_json::to_vec(&ListToolsResult::with_all_items(tools)).unwrap()
            })
        });
    }
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
}

criterion_group!(benches, tools_list);
criterion_main!(benches);
