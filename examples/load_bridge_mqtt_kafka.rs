//! Load scenario: MQTT publisher → Mosquitto → StepFlow bridge → Kafka → a Kafka consumer,
//! next to the baseline MQTT publisher → Mosquitto → an MQTT subscriber, in the same run.
//!
//! It starts its own Mosquitto on a free port, a librdkafka mock cluster (a real Kafka-protocol
//! broker on loopback) and the release daemon with one bridge `iot.telemetry → analytics.raw`,
//! then runs the phases at the same rate: MQTT → MQTT, the Kafka leg alone (a producer set up as
//! the daemon's → the mock broker → the reader), and MQTT → bridge → Kafka. Reports delivered
//! rate, loss, latency percentiles (send → receive, both on this machine's clock), the ratios
//! bridged / direct, and the lane's own latency from the daemon's histogram.
//!
//!     cargo build --release && cargo run --release --example load_bridge_mqtt_kafka -- --rate 5000 --seconds 10 [--in-flight 256]

use std::path::PathBuf;
use std::time::Duration;

mod common;
use common::*;

use anyhow::{Result, bail};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    rate: u64,
    seconds: u64,
    payload: usize,
    in_flight: usize,
    binary: PathBuf,
}

fn args() -> Result<Args> {
    let flags = Flags::parse(&["rate", "seconds", "payload", "in-flight"])?;
    Ok(Args {
        rate: flags.get("rate", 5000)?,
        seconds: flags.get("seconds", 10)?,
        payload: flags.get("payload", 100)?,
        in_flight: flags.get("in-flight", 256)?,
        binary: flags.binary(),
    })
}

async fn direct_phase(port: u16, topic: &str, a: &Args) -> Result<(u64, Vec<Results>)> {
    let results = shared(1);
    let mut options = MqttOptions::new(
        format!("load-sub-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let r = results[0].clone();
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(ts) = ts_of(&p.payload) {
                        r.lock().await.record(ts);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = mqtt_publish(port, topic.to_owned(), a.rate, a.seconds, a.payload).await?;
    Ok((sent, stop_and_collect(vec![task], results).await))
}

/// A Kafka reader of `topic` that has its partitions, recording the payloads' `ts`.
async fn kafka_reader(
    bootstrap: &str,
    topic: &str,
    group: &str,
) -> Result<(Vec<Shared>, tokio::task::JoinHandle<()>)> {
    let results = shared(1);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    consumer.subscribe(&[topic])?;
    // The mock broker's first group join waits ~3 s; start reading before publishing.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while consumer.assignment()?.count() == 0 {
        if std::time::Instant::now() > deadline {
            bail!("the Kafka reader got no partitions");
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
    }
    let r = results[0].clone();
    let task = tokio::spawn(async move {
        let mut stream = consumer.stream();
        while let Some(Ok(m)) = stream.next().await {
            if let Some(ts) = m.payload().and_then(ts_of) {
                r.lock().await.record(ts);
            }
        }
    });
    Ok((results, task))
}

/// The Kafka leg alone: a producer set up as the daemon's (acks=all, idempotent, linger 1 ms)
/// → the mock broker → the same reader.
async fn kafka_phase(bootstrap: &str, a: &Args) -> Result<(u64, Vec<Results>)> {
    let (results, task) = kafka_reader(bootstrap, "load.direct", "load-direct").await?;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let pad = "x".repeat(a.payload.saturating_sub(60));
    let total = a.rate * a.seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut deliveries = futures::stream::FuturesUnordered::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * a.rate as f64) as u64).min(total);
        while sent < due {
            let body = format!(
                r#"{{"temperature":1,"seq":{sent},"pad":"{pad}","ts":{}}}"#,
                now_nanos()
            );
            let key = format!("{}", sent % 10);
            let record = rdkafka::producer::FutureRecord::to("load.direct")
                .key(&key)
                .payload(&body);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => bail!("the producer refused a record: {e}"),
            }
            sent += 1;
        }
        while let Some(Some(_)) = futures::FutureExt::now_or_never(deliveries.next()) {}
    }
    while deliveries.next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((sent, stop_and_collect(vec![task], results).await))
}

async fn bridged_phase(
    port: u16,
    bootstrap: &str,
    topic: &str,
    a: &Args,
) -> Result<(u64, Vec<Results>)> {
    let (results, task) = kafka_reader(bootstrap, "load.raw", "load-reader").await?;
    let sent = mqtt_publish(port, topic.to_owned(), a.rate, a.seconds, a.payload).await?;
    Ok((sent, stop_and_collect(vec![task], results).await))
}

const ANALYTICS: &str = r#"asyncapi: 3.0.0
x-stepflow-id: analytics
info: {title: Load analytics, version: 1.0.0}
servers:
  kafka: {host: '127.0.0.1:9092', protocol: kafka}
channels:
  raw:
    address: 'devices/{deviceId}/telemetry'
    bindings: {kafka: {topic: load.raw, x-stepflow-key: '{deviceId}'}}
operations:
  send: {action: send, channel: {$ref: '#/channels/raw'}}
"#;

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    if !a.binary.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            a.binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (broker_port, _broker) = start_mosquitto(dir.path(), "max_queued_messages 1000000\n")?;
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("load.raw", 3, 1)?;
    cluster.create_topic("load.direct", 3, 1)?;
    let bootstrap = cluster.bootstrap_servers();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let specs = dir.path().join("specs");
    let bridges = dir.path().join("bridges");
    std::fs::create_dir_all(&specs)?;
    std::fs::create_dir_all(&bridges)?;
    std::fs::write(specs.join("iot.yaml"), load_telemetry_spec("iot"))?;
    std::fs::write(specs.join("analytics.yaml"), ANALYTICS)?;
    std::fs::write(
        bridges.join("load.yaml"),
        format!(
            "bridges:\n  load:\n    from: iot.telemetry\n    max_in_flight: {}\n    to:\n      - channel: analytics.raw\n",
            a.in_flight
        ),
    )?;
    let http = free_port();
    let mqtt = format!("iot/broker=mqtt://127.0.0.1:{broker_port}");
    let kafka = format!("analytics/kafka=kafka://{bootstrap}");
    let daemon = start_daemon(
        &a.binary,
        http,
        &dir.path().join("data"),
        &[
            "--specs".as_ref(),
            specs.as_os_str(),
            "--bridges".as_ref(),
            bridges.as_os_str(),
            "--server".as_ref(),
            mqtt.as_ref(),
            "--server".as_ref(),
            kafka.as_ref(),
        ],
    )
    .await?;

    println!(
        "rate {} msg/s, {} s, payload {} B, max_in_flight {}; MQTT → Kafka bridge vs MQTT → MQTT",
        a.rate, a.seconds, a.payload, a.in_flight
    );
    let topic = "load/devices/1/telemetry";
    let (sent_direct, direct) = direct_phase(broker_port, topic, &a).await?;
    let direct = summarize(sent_direct, &direct);
    let (sent_kafka, kafka_only) = kafka_phase(&bootstrap, &a).await?;
    let kafka_only = summarize(sent_kafka, &kafka_only);
    let (sent_bridged, bridged) = bridged_phase(broker_port, &bootstrap, topic, &a).await?;
    let bridged = summarize(sent_bridged, &bridged);
    report(&direct, &bridged);
    println!(
        "kafka leg alone (producer → mock broker → reader): delivered {}/{}, {:.0} msg/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; bridged p99 / (MQTT p99 + Kafka p99) = {:.2}",
        kafka_only.delivered,
        kafka_only.expected,
        kafka_only.rate,
        kafka_only.p50_ms,
        kafka_only.p99_ms,
        kafka_only.max_ms,
        bridged.p99_ms / (direct.p99_ms + kafka_only.p99_ms).max(1e-9)
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
        .await?
        .text()
        .await?;
    let lane = "stepflow_bridge_latency_seconds_bucket";
    let flush = "stepflow_log_flush_seconds_bucket";
    println!(
        "inside the daemon: lane (MQTT arrival → Kafka delivery report) p50 ≤ {} ms, p99 ≤ {} ms; log fsync p50 ≤ {} ms, p99 ≤ {} ms",
        bucket_quantile(&metrics, lane, 0.50),
        bucket_quantile(&metrics, lane, 0.99),
        bucket_quantile(&metrics, flush, 0.50),
        bucket_quantile(&metrics, flush, 0.99)
    );
    drop(daemon);
    Ok(())
}

/// The upper bound (ms) of the bucket holding quantile `q` of histogram `series` (`…_bucket`).
fn bucket_quantile(metrics: &str, series: &str, q: f64) -> String {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le.parse().unwrap_or(f64::INFINITY), count))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or("?".into(), |(le, _)| format!("{}", le * 1000.0))
}
