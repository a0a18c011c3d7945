//! Load scenario: producer → Kafka (librdkafka's mock broker, real Kafka protocol on loopback) →
//! StepFlow → N WebSocket subscribers, next to the baseline producer → Kafka → N Kafka consumers
//! (one group each), in the same run and at the same rate.
//!
//!     cargo build --release && cargo run --release --example load_kafka_ws -- --rate 5000 --subscribers 10 --seconds 10

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Mutex;

struct Args {
    rate: u64,
    subscribers: usize,
    seconds: u64,
    binary: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rate: 5000,
        subscribers: 10,
        seconds: 10,
        binary: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/stepflow"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--rate" => a.rate = value.parse()?,
            "--subscribers" => a.subscribers = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--binary" => a.binary = value.into(),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The `"ts":` number in a frame, without parsing the whole JSON.
fn ts_of(text: &[u8]) -> Option<u64> {
    let key = b"\"ts\":";
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = text[at..]
        .iter()
        .copied()
        .skip_while(|c| *c == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Results {
    histogram: Option<Histogram<u64>>,
    received: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Results {
    fn record(&mut self, ts: u64) {
        let latency = now_nanos().saturating_sub(ts);
        let h = self
            .histogram
            .get_or_insert_with(|| Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap());
        let _ = h.record(latency.max(1_000));
        self.received += 1;
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
}

async fn produce(bootstrap: &str, topic: &str, rate: u64, seconds: u64) -> Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "1")
        .create()?;
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut deliveries = futures::stream::FuturesUnordered::new();
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let body = format!(r#"{{"temperature":1,"seq":{sent},"ts":{}}}"#, now_nanos());
            let producer = producer.clone();
            let topic = topic.to_owned();
            let key = format!("d{}", sent % 16);
            deliveries.push(async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&body),
                        Duration::from_secs(5),
                    )
                    .await
                    .is_ok()
            });
            sent += 1;
        }
        while let Some(Some(_)) = futures::FutureExt::now_or_never(deliveries.next()) {}
    }
    while deliveries.next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(sent)
}

async fn stop_and_collect(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    results: Vec<Arc<Mutex<Results>>>,
) -> Vec<Results> {
    for t in tasks {
        t.abort();
    }
    let mut out = Vec::new();
    for r in results {
        out.push(std::mem::take(&mut *r.lock().await));
    }
    out
}

struct Summary {
    expected: u64,
    delivered: u64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarize(sent: u64, results: &[Results]) -> Summary {
    let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut delivered = 0;
    let mut rates = Vec::new();
    for r in results {
        if let Some(h) = &r.histogram {
            all.add(h).unwrap();
        }
        delivered += r.received;
        if let (Some(first), Some(last)) = (r.first, r.last) {
            let secs = last.duration_since(first).as_secs_f64();
            if secs > 0.0 {
                rates.push(r.received as f64 / secs);
            }
        }
    }
    Summary {
        expected: sent * results.len() as u64,
        delivered,
        rate: if rates.is_empty() {
            0.0
        } else {
            rates.iter().sum::<f64>() / rates.len() as f64
        },
        p50_ms: all.value_at_quantile(0.50) as f64 / 1e6,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1e6,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    if !a.binary.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            a.binary.display()
        );
    }
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    for topic in ["load.direct", "load.bridged"] {
        cluster.create_topic(topic, 4, 1)?;
    }
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("load.yaml");
    std::fs::write(
        &spec,
        r#"asyncapi: 3.0.0
x-stepflow-id: load
info: {title: Load, version: 1.0.0}
servers:
  broker: {host: '127.0.0.1:9092', protocol: kafka}
channels:
  telemetry:
    address: load.bridged
    messages:
      reading:
        payload: {type: object, required: [temperature, seq, ts], properties: {temperature: {type: number}, seq: {type: integer}, ts: {type: integer}}}
operations:
  receive: {action: receive, channel: {$ref: '#/channels/telemetry'}}
"#,
    )?;
    let http = free_port();
    let _daemon = Killed(
        Command::new(&a.binary)
            .args(["run", "--listen", &format!("127.0.0.1:{http}"), "--specs"])
            .arg(&spec)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--server", &format!("broker=kafka://{bootstrap}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{http}/readyz")).await
            && r.status() == 200
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("daemon not ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "rate {} msg/s, {} subscribers, {} s",
        a.rate, a.subscribers, a.seconds
    );

    // Direct: N consumers, one group each, from the end of the topic.
    let results: Vec<Arc<Mutex<Results>>> = (0..a.subscribers).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("direct-{i}"))
            .set("auto.offset.reset", "earliest")
            // Same fetch settings as the gateway's consumer.
            .set("fetch.wait.max.ms", "100")
            .create()?;
        consumer.subscribe(&["load.direct"])?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(m) = consumer.recv().await {
                if let Some(ts) = m.payload().and_then(ts_of) {
                    r.lock().await.record(ts);
                }
            }
        }));
    }
    // Consumer groups of the mock broker take ~3 s to settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = produce(&bootstrap, "load.direct", a.rate, a.seconds).await?;
    let direct = summarize(sent, &stop_and_collect(tasks, results).await);

    let results: Vec<Arc<Mutex<Results>>> = (0..a.subscribers).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for r in &results {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{http}/ws/load.telemetry"))
                .await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = frame
                    && let Some(ts) = ts_of(text.as_bytes())
                {
                    r.lock().await.record(ts);
                }
            }
        }));
    }
    let sent = produce(&bootstrap, "load.bridged", a.rate, a.seconds).await?;
    let bridged = summarize(sent, &stop_and_collect(tasks, results).await);

    for (name, s) in [("direct", &direct), ("bridged", &bridged)] {
        println!(
            "{name:<8} delivered {}/{} (loss {}), {:.0} msg/s per subscriber, p50 {:.3} ms, p99 {:.3} ms",
            s.delivered,
            s.expected,
            s.expected.saturating_sub(s.delivered),
            s.rate,
            s.p50_ms,
            s.p99_ms
        );
    }
    println!(
        "ratios bridged/direct: throughput {:.3}, p50 {:.2}, p99 {:.2}",
        bridged.rate / direct.rate.max(1.0),
        bridged.p50_ms / direct.p50_ms.max(1e-9),
        bridged.p99_ms / direct.p99_ms.max(1e-9)
    );
    Ok(())
}
