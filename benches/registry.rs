//! What applying a change to a document of 1,000 routes costs (DESIGN §1's apply-by-diff):
//! compiling the new text, diffing it against the running version (breaking-change report
//! included), and swapping it into the hub; and what an unchanged route's lookup — the one a
//! message makes on its way into the log — costs while swaps run on another thread, next to
//! the same lookup with no swaps, in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use stepflow::hub::{Hub, HubConfig};
use stepflow::registry::breaking;
use stepflow::routing::RoutingTable;
use stepflow::store::{Store, StoreConfig};
use stepflow::upstream::Connections;

const ROUTES: usize = 1000;

/// Version 2 makes `note` required in channel c500: one changed route, one breaking change.
fn document(version: u8) -> String {
    let mut out = format!(
        "asyncapi: 3.0.0\nx-stepflow-id: bench\ninfo: {{title: Bench, version: '{version}'}}\nchannels:\n"
    );
    for i in 0..ROUTES {
        let required = if version == 2 && i == 500 {
            "[action, seq, note]"
        } else {
            "[action, seq]"
        };
        out.push_str(&format!(
            "  c{i}:\n    address: 'load/c{i}/{{deviceId}}'\n    messages:\n      m:\n        payload:\n          type: object\n          required: {required}\n          properties:\n            action: {{type: string, enum: [reboot, identify]}}\n            seq: {{type: integer}}\n            note: {{type: string, maxLength: 64}}\n"
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

fn compiled(text: &str) -> (stepflow::spec::Api, RoutingTable) {
    let loaded = stepflow::spec::load_text(std::path::Path::new("bench.yaml"), text).unwrap();
    let table = stepflow::connectors::compile(&loaded.apis).unwrap().table;
    (loaded.apis.into_iter().next().unwrap(), table)
}

fn apply(c: &mut Criterion) {
    let (v1, v2) = (document(1), document(2));
    let (api1, table1) = compiled(&v1);
    let (api2, table2) = compiled(&v2);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let hub = Arc::new(Hub::new(
        Arc::new(compiled(&v1).1),
        store,
        Connections::default(),
        HubConfig::default(),
    ));
    let diff = breaking::diff(&api1, table1.routes(), &api2, table2.routes());
    assert_eq!(diff.channels.changed, vec!["bench.c500".to_owned()]);
    assert_eq!(diff.breaking.len(), 1);

    let mut group = c.benchmark_group("apply_change_1000_routes");
    group.sample_size(20);
    group.bench_function("compile", |b| b.iter(|| compiled(&v2)));
    group.bench_function("diff", |b| {
        b.iter(|| breaking::diff(&api1, table1.routes(), &api2, table2.routes()))
    });
    let mut flip = false;
    group.bench_function("swap", |b| {
        b.iter(|| {
            flip = !flip;
            let table = if flip { &table2 } else { &table1 };
            hub.replace_api("bench", table).unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("unchanged_route_lookup");
    group.bench_function("idle", |b| {
        b.iter(|| hub.route("bench.c1").unwrap().route())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = std::thread::spawn({
        let (hub, stop) = (hub.clone(), stop.clone());
        let (t1, t2) = (Arc::new(table1), Arc::new(table2));
        move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let table = if swaps.is_multiple_of(2) { &t2 } else { &t1 };
                hub.replace_api("bench", table).unwrap();
                swaps += 1;
            }
            swaps
        }
    });
    group.bench_function("during_swaps", |b| {
        b.iter(|| hub.route("bench.c1").unwrap().route())
    });
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
