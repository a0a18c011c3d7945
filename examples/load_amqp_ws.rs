//! Load scenario: publisher → RabbitMQ → StepFlow → N WebSocket subscribers, next to the
//! baseline publisher → RabbitMQ → N AMQP consumers (a queue each), same rate, same run.
//! Uses the machine's RabbitMQ (127.0.0.1:5672, guest) and its own exchange and queues.
//!
//!     cargo build --release && cargo run --release --example load_amqp_ws -- --rate 5000 --subscribers 10 --seconds 10

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Mutex;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

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

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn publish(exchange: &str, routing_key: &str, rate: u64, seconds: u64) -> Result<u64> {
    let connection =
        Connection::connect("amqp://127.0.0.1:5672", ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut confirms = futures::stream::FuturesUnordered::new();
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let body = format!(r#"{{"temperature":1,"seq":{sent},"ts":{}}}"#, now_nanos());
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await?;
            confirms.push(confirm);
            sent += 1;
        }
        while let Some(Some(_)) = futures::FutureExt::now_or_never(confirms.next()) {}
    }
    while confirms.next().await.is_some() {}
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

fn summarize(name: &str, sent: u64, results: &[Results]) -> (f64, f64) {
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
    let expected = sent * results.len() as u64;
    let rate = if rates.is_empty() {
        0.0
    } else {
        rates.iter().sum::<f64>() / rates.len() as f64
    };
    let p99 = all.value_at_quantile(0.99) as f64 / 1e6;
    println!(
        "{name:<8} delivered {delivered}/{expected} (loss {}), {rate:.0} msg/s per subscriber, p50 {:.3} ms, p99 {p99:.3} ms",
        expected.saturating_sub(delivered),
        all.value_at_quantile(0.50) as f64 / 1e6,
    );
    (rate, p99)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut rate = 5000u64;
    let mut subscribers = 10usize;
    let mut seconds = 10u64;
    let mut binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/stepflow");
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--rate" => rate = value.parse()?,
            "--subscribers" => subscribers = value.parse()?,
            "--seconds" => seconds = value.parse()?,
            "--binary" => binary = value.into(),
            other => bail!("unknown flag {other}"),
        }
    }
    let prefix = format!("load{}", std::process::id());
    let exchange = format!("{prefix}.events");
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("load.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: load
info: {{title: Load, version: 1.0.0}}
servers:
  rabbit: {{host: '127.0.0.1:5672', protocol: amqp}}
channels:
  telemetry:
    address: 'devices/{{deviceId}}/telemetry'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {exchange}, type: topic, durable: false, autoDelete: false}}
        queue: {{name: {prefix}.bridged, durable: false}}
    messages:
      reading:
        payload: {{type: object, required: [temperature, seq, ts], properties: {{temperature: {{type: number}}, seq: {{type: integer}}, ts: {{type: integer}}}}}}
operations:
  receive: {{action: receive, channel: {{$ref: '#/channels/telemetry'}}}}
"#
        ),
    )?;
    let http = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _daemon = Killed(
        Command::new(&binary)
            .args(["run", "--listen", &format!("127.0.0.1:{http}"), "--specs"])
            .arg(&spec)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("run `cargo build --release` first")?,
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
    println!("rate {rate} msg/s, {subscribers} subscribers, {seconds} s");

    let admin =
        Connection::connect("amqp://127.0.0.1:5672", ConnectionProperties::default()).await?;
    let results: Vec<Arc<Mutex<Results>>> = (0..subscribers).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let channel = admin.create_channel().await?;
        let queue = format!("{prefix}.direct{i}");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "direct.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                if let Some(ts) = ts_of(&d.data) {
                    r.lock().await.record(ts);
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        }));
    }
    let sent = publish(&exchange, "direct.1", rate, seconds).await?;
    let (direct_rate, direct_p99) =
        summarize("direct", sent, &stop_and_collect(tasks, results).await);

    let results: Vec<Arc<Mutex<Results>>> = (0..subscribers).map(|_| Arc::default()).collect();
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
    let sent = publish(&exchange, "devices.1.telemetry", rate, seconds).await?;
    let (bridged_rate, bridged_p99) =
        summarize("bridged", sent, &stop_and_collect(tasks, results).await);
    println!(
        "ratios bridged/direct: throughput {:.3}, p99 {:.2}",
        bridged_rate / direct_rate.max(1.0),
        bridged_p99 / direct_p99.max(1e-9)
    );
    let cleanup = admin.create_channel().await?;
    let _ = cleanup
        .queue_delete(
            format!("{prefix}.bridged").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = cleanup
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    Ok(())
}
