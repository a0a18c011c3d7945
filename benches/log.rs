//! The message log: group-commit appends of 100-byte payloads, replay from the log, and the disk
//! a message takes — the chunked layout (`Store`) against the first layout, one sled key per
//! message with the same bytes and the same group flushes, measured in the same run.

use std::time::{Duration, Instant};

/// The daemon's allocator (`src/main.rs`): glibc's malloc would be most of what is measured.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stepflow::routing::address::Params;
use stepflow::routing::envelope::{Envelope, Origin, Transport};
use stepflow::store::{LogId, RetentionPolicy, Store, StoreConfig};

/// 100 bytes of telemetry, as a device sends it.
const PAYLOAD: &[u8] =
    br#"{"deviceId":"dev-0042","temperature":21.53,"humidity":40.1,"battery":88,"ts":1764670000123}         "#;

fn envelope(i: u64) -> Envelope {
    let mut params = Params::default();
    params.insert("deviceId".into(), format!("dev-{:04}", i % 1000));
    let mut e = Envelope::new(
        "bench.telemetry".into(),
        format!("devices/dev-{:04}/telemetry", i % 1000),
        params,
        Bytes::from_static(PAYLOAD),
        Origin::upstream(Transport::Mqtt, "broker".into()),
    );
    e.headers
        .push(("content-type".into(), "application/json".into()));
    e
}

/// Payload and header bytes of one message: what the disk use is measured against.
fn message_bytes() -> u64 {
    (PAYLOAD.len() + "content-type".len() + "application/json".len()) as u64
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn store_config() -> StoreConfig {
    StoreConfig {
        retention: RetentionPolicy::unlimited(),
        ..StoreConfig::default()
    }
}

fn log() -> LogId {
    LogId::messages("bench.telemetry".into())
}

/// Appends `n` messages with every append in flight (a broker streaming), as the daemon does.
async fn append(store: &Store, from: u64, n: u64) {
    let mut pending = Vec::with_capacity(n as usize);
    for i in from..from + n {
        pending.push(store.append(log(), envelope(i), None, None).await.unwrap());
    }
    for p in pending {
        p.flushed().await.unwrap();
    }
}

/// The first layout: a key per message; the value is as long as the record the store writes
/// (payload 100, address 30, parameter 25, header 38, timestamp and origin 24: 217 bytes).
struct KeyPerMessage {
    db: sled::Db,
    tree: sled::Tree,
    next: u64,
}

const RECORD_LEN: usize = 217;

impl KeyPerMessage {
    fn open(dir: &std::path::Path) -> Self {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .unwrap();
        let tree = db.open_tree("m:bench").unwrap();
        KeyPerMessage { db, tree, next: 1 }
    }

    /// `n` appends in groups of 1000, one flush per group (the group commit of the first layout).
    fn append(&mut self, n: u64) {
        let mut value = PAYLOAD.to_vec();
        value.resize(RECORD_LEN, b' ');
        for _ in 0..n {
            self.tree
                .insert(self.next.to_be_bytes(), value.as_slice())
                .unwrap();
            self.next += 1;
            if self.next.is_multiple_of(1000) {
                self.db.flush().unwrap();
            }
        }
        self.db.flush().unwrap();
    }
}

fn log_append(c: &mut Criterion) {
    assert_eq!(PAYLOAD.len(), 100);
    let rt = runtime();
    let mut group = c.benchmark_group("log_append");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), store_config()).unwrap();
    let mut next = 0;
    group.bench_function("chunked", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                append(&store, next, iters).await;
                next += iters;
                started.elapsed()
            })
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let mut first = KeyPerMessage::open(dir.path());
    group.bench_function("key_per_message", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            first.append(iters);
            started.elapsed()
        })
    });
    group.finish();
    rt.block_on(store.shutdown());
}

const REPLAYED: u64 = 200_000;

fn log_replay(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), store_config()).unwrap();
    rt.block_on(append(&store, 0, REPLAYED));
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = KeyPerMessage::open(first_dir.path());
    first.append(REPLAYED);

    let mut group = c.benchmark_group("log_replay");
    group.throughput(Throughput::Elements(REPLAYED));
    group.sample_size(10);
    // The whole log, in the pages a subscription reads (decoded into messages).
    group.bench_function("chunked", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut from = 1;
                let mut n = 0u64;
                loop {
                    let batch = store.read(&log(), from, 1000).await.unwrap();
                    let Some(last) = batch.last() else { break };
                    from = last.offset + 1;
                    n += batch.len() as u64;
                }
                assert_eq!(n, REPLAYED);
            })
        })
    });
    // The first layout's values, iterated without decoding them (a floor for it).
    group.bench_function("key_per_message", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for item in first.tree.iter() {
                let (_, v) = item.unwrap();
                n += u64::from(!v.is_empty());
            }
            assert_eq!(n, REPLAYED);
        })
    });
    group.finish();

    // Disk use is a measurement, not a timing: printed once.
    rt.block_on(async {
        store.shutdown().await;
        let stepflow = dir_size(dir.path());
        let first_bytes = dir_size(first_dir.path());
        let payload = REPLAYED * message_bytes();
        eprintln!(
            "log_disk: {REPLAYED} messages of {} payload+header bytes: chunked {:.1} MiB ({:.0} B/message, {:.2}x payload+headers); key per message {:.1} MiB ({:.0} B/message, {:.2}x)",
            message_bytes(),
            stepflow as f64 / 1048576.0,
            stepflow as f64 / REPLAYED as f64,
            stepflow as f64 / payload as f64,
            first_bytes as f64 / 1048576.0,
            first_bytes as f64 / REPLAYED as f64,
            first_bytes as f64 / payload as f64,
        );
    });
}

/// Bytes of every file under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

criterion_group!(benches, log_append, log_replay);
criterion_main!(benches);
