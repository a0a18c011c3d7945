//! The runtime's hot paths: live fan-out of one message to many subscribers — through the
//! hub's `Subscription` (ingest, log append, broadcast, offset bookkeeping, lag recovery), next
//! to a bare tokio broadcast as the floor. The log itself is measured in `benches/log.rs`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use stepflow::hub::{Hub, HubConfig, SubscriptionEvent};
use stepflow::routing::address::Params;
use stepflow::routing::envelope::{Delivered, Envelope, Origin, Transport};
use stepflow::store::{Store, StoreConfig};
use stepflow::upstream::Connections;
use tokio::sync::broadcast;

fn envelope(payload: &Bytes) -> Envelope {
    let mut params = Params::default();
    params.insert("deviceId".into(), "42".into());
    Envelope::new(
        "bench.telemetry".into(),
        "devices/42/telemetry".into(),
        params,
        payload.clone(),
        Origin::upstream(Transport::Mqtt, "broker".into()),
    )
}

/// The daemon's shape: two worker threads (this machine has two cores).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

const PAYLOAD: &[u8] =
    br#"{"temperature": 21.5, "humidity": 40, "battery": 88, "ts": "2026-11-22T10:00:00Z"}"#;

/// One message to N subscribers: each receives the `Arc` and takes the frame it would write
/// (rendered once, shared).
fn fan_out(c: &mut Criterion) {
    let rt = runtime();
    let payload = Bytes::from_static(PAYLOAD);
    let mut group = c.benchmark_group("fan_out");
    for subscribers in [1usize, 10, 100] {
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, &n| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let (tx, _) = broadcast::channel::<Arc<Delivered>>(4096);
                        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(n);
                        for _ in 0..n {
                            let mut rx = tx.subscribe();
                            let done = done_tx.clone();
                            tokio::spawn(async move {
                                let mut bytes = 0usize;
                                for _ in 0..iters {
                                    match rx.recv().await {
                                        Ok(m) => bytes += m.frame().len(),
                                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                                        Err(_) => break,
                                    }
                                }
                                let _ = done.send(bytes).await;
                            });
                        }
                        let started = Instant::now();
                        for offset in 0..iters {
                            // Keep within the buffer: the bench measures delivery, not lag.
                            while tx.len() > 3000 {
                                tokio::task::yield_now().await;
                            }
                            let _ =
                                tx.send(Arc::new(Delivered::new(offset, envelope(&payload), None)));
                        }
                        for _ in 0..n {
                            done_rx.recv().await;
                        }
                        started.elapsed()
                    })
                })
            },
        );
    }
    group.finish();
}

/// The same fan-out through the gateway's own path: `Hub::ingest` appends to the log, the writer
/// hands each message to the route's broadcast, and every reader is a `hub::Subscription`, which
/// drops what it saw, fills gaps from the log and recovers from lag.
fn fan_out_subscription(c: &mut Criterion) {
    const DOC: &str = "asyncapi: 3.0.0\ninfo: {title: Bench, version: '1'}\nchannels:\n  telemetry:\n    address: 'devices/{deviceId}/telemetry'\noperations:\n  receive: {action: receive, channel: {$ref: '#/channels/telemetry'}}\n";
    let rt = runtime();
    let payload = Bytes::from_static(PAYLOAD);
    let loaded = stepflow::spec::load_text(std::path::Path::new("bench.yaml"), DOC).unwrap();
    let table = Arc::new(stepflow::connectors::compile(&loaded.apis).unwrap().table);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let hub = Arc::new(Hub::new(
        table,
        store,
        Connections::default(),
        HubConfig::default(),
    ));
    let route = hub.routes().next().unwrap().clone();
    let mut group = c.benchmark_group("fan_out_subscription");
    group.sample_size(20);
    for subscribers in [1usize, 10, 100] {
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, &n| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(n);
                        // Each reader's count, so the writer stays within the live buffer: the
                        // bench measures delivery, not lag recovery.
                        let seen: Arc<Vec<std::sync::atomic::AtomicU64>> =
                            Arc::new((0..n).map(|_| Default::default()).collect());
                        for i in 0..n {
                            let mut sub = hub.subscribe(&route, None).await.unwrap();
                            let done = done_tx.clone();
                            let seen = seen.clone();
                            tokio::spawn(async move {
                                let mut bytes = 0usize;
                                let mut count = 0u64;
                                while count < iters {
                                    match sub.next().await {
                                        Ok(Some(SubscriptionEvent::Message {
                                            message, ..
                                        })) => {
                                            bytes += message.frame().len();
                                            count += 1;
                                            seen[i]
                                                .store(count, std::sync::atomic::Ordering::Relaxed);
                                        }
                                        Ok(Some(SubscriptionEvent::Lagged { .. })) => {}
                                        _ => break,
                                    }
                                }
                                let _ = done.send(bytes).await;
                            });
                        }
                        let started = Instant::now();
                        let mut pending = Vec::with_capacity(iters as usize);
                        for sent in 0..iters {
                            if sent % 64 == 0 {
                                while seen
                                    .iter()
                                    .map(|s| s.load(std::sync::atomic::Ordering::Relaxed))
                                    .min()
                                    .is_some_and(|slowest| sent - slowest > 512)
                                {
                                    tokio::task::yield_now().await;
                                }
                            }
                            let mut e = envelope(&payload);
                            e.channel = route.id().clone();
                            pending.push(hub.ingest(&route, e).await.unwrap());
                        }
                        for _ in 0..n {
                            done_rx.recv().await;
                        }
                        started.elapsed()
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out, fan_out_subscription);
criterion_main!(benches);
