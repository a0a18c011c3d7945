//! Load scenario: producer → Kafka → StepFlow → N WebSocket subscribers, next to the baseline
//! producer → Kafka → N Kafka consumers (one group each), in the same run and at the same rate.
//! The broker is librdkafka's mock (`--broker mock`, the default) or a tansu process of the
//! scenario's own (`--broker tansu`, `tansu` on the PATH).
//!
//!     cargo build --release && cargo run --release --example load_kafka_ws -- --rate 5000 --subscribers 10 --seconds 10 [--broker tansu]

mod common;
use common::*;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

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

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&["rate", "subscribers", "seconds", "broker"])?;
    let rate: u64 = flags.get("rate", 5000)?;
    let subscribers: usize = flags.get("subscribers", 10)?;
    let seconds: u64 = flags.get("seconds", 10)?;
    let broker: String = flags.get("broker", "mock".to_owned())?;
    let topics = ["load.direct", "load.bridged"];
    // Kept alive for the whole run.
    let (_mock, _tansu, bootstrap) = match broker.as_str() {
        "mock" => {
            let cluster = MockCluster::new(1)?;
            for topic in topics {
                cluster.create_topic(topic, 4, 1)?;
            }
            let bootstrap = cluster.bootstrap_servers();
            (Some(cluster), None, bootstrap)
        }
        "tansu" => {
            let tansu = TansuProcess::start(&topics, 4)?;
            let bootstrap = tansu.bootstrap.clone();
            (None, Some(tansu), bootstrap)
        }
        other => anyhow::bail!("--broker {other}: mock or tansu"),
    };
    println!("broker: {broker}");
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
    let server = format!("broker=kafka://{bootstrap}");
    let _daemon = start_daemon(
        &flags.binary(),
        http,
        &dir.path().join("data"),
        &[
            "--specs".as_ref(),
            spec.as_os_str(),
            "--server".as_ref(),
            server.as_ref(),
        ],
    )
    .await?;
    println!(
        "rate {} msg/s, {} subscribers, {} s",
        rate, subscribers, seconds
    );

    // Direct: N consumers, one group each, from the end of the topic.
    let results = shared(subscribers);
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
    // Consumer groups take a while to settle (the mock's ~3 s, tansu's ~0.5 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = produce(&bootstrap, "load.direct", rate, seconds).await?;
    let direct = summarize(sent, &stop_and_collect(tasks, results).await);

    let results = shared(subscribers);
    let tasks = websocket_subscribers(http, "load.telemetry", &results).await?;
    let sent = produce(&bootstrap, "load.bridged", rate, seconds).await?;
    let bridged = summarize(sent, &stop_and_collect(tasks, results).await);

    report(&direct, &bridged);
    Ok(())
}

/// A tansu broker of the scenario's own, on a free port; killed on drop.
struct TansuProcess {
    child: std::process::Child,
    bootstrap: String,
    _dir: tempfile::TempDir,
}

impl TansuProcess {
    fn start(topics: &[&str], partitions: u32) -> Result<TansuProcess> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new("tansu")
            .current_dir(dir.path())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("tansu does not start ({e}); install it: cargo install tansu --version 0.6.0 --locked --no-default-features --features libsql"))?;
        let mut process = TansuProcess {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = process.child.kill();
                anyhow::bail!("tansu did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for topic in topics {
            let status = std::process::Command::new("tansu")
                .current_dir(process._dir.path())
                .args(["topic", "create", "--broker", &url, "--partitions"])
                .arg(partitions.to_string())
                .arg(topic)
                .status()?;
            anyhow::ensure!(status.success(), "tansu topic create {topic} failed");
        }
        Ok(process)
    }
}

impl Drop for TansuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
