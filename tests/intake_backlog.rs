//! Intake under a backlog: brokers that hand the gateway tens of thousands of messages at once
//! after it was away (MQTT, AMQP, Kafka), a SIGKILL in the middle of a long stream, and the
//! stall detector that tells an operator when a connected upstream stops moving.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// More than every queue between the broker and the log holds together (the event loop's
/// ingest queue, the ack queue and rumqttc's request queue: 1,024 each), several times over.
const BACKLOG: u64 = 20_000;
/// How long the log may stand still before a wait gives up.
const STALL: Duration = Duration::from_secs(30);

/// The messages of `channel` in its log; checks every `seq` below `total` is there.
async fn assert_all_logged(daemon: &Daemon, channel: &str, total: u64, what: &str) {
    daemon.wait_for_count(channel, total, STALL).await;
    let log = daemon.replay_all(channel, "messages").await.unwrap();
    let (missing, duplicates) = sequence_report(&log, total);
    println!(
        "{what}: {total} sent, {} logged, {} missing, {duplicates} duplicates",
        log.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{what}: lost {} messages, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_backlog_published_while_the_daemon_was_stopped_is_logged_in_full() {
    let broker = OwnMosquitto::start();
    let mut iot = IotDaemon::start(&broker, "backlog").await;
    // A clean stop leaves the gateway's persistent session at the broker.
    let (status, _) = iot.daemon.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "clean stop: {status}");

    let (tx, _progress) = tokio::sync::watch::channel(0);
    let topic = iot.telemetry_topic("1");
    let acked = publish_acknowledged(broker.port, topic, 0..BACKLOG, 50_000, tx).await;
    assert_eq!(acked, BACKLOG, "the broker took the whole backlog");

    iot.daemon.restart().await.unwrap();
    let what = "MQTT restart with a backlog";
    assert_all_logged(&iot.daemon, &iot.telemetry(), BACKLOG, what).await;
    // Connected and not stalled once the backlog is in.
    let connections = iot.daemon.get_json("/api/v1/connections").await.unwrap();
    let mqtt = &connections["connections"][0];
    assert_eq!(mqtt["state"], "connected", "{connections}");
    assert!(mqtt["stalled"].is_null(), "{connections}");
    assert!(
        mqtt["progress"]["received_total"].as_u64().unwrap() >= BACKLOG,
        "{connections}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_sigkill_in_the_middle_of_a_long_stream_loses_nothing() {
    let broker = OwnMosquitto::start();
    let mut iot = IotDaemon::start(&broker, "killed").await;
    let (tx, mut progress) = tokio::sync::watch::channel(0);
    let topic = iot.telemetry_topic("1");
    let publisher = tokio::spawn(publish_acknowledged(
        broker.port,
        topic,
        0..BACKLOG,
        5_000,
        tx,
    ));
    progress.wait_for(|n| *n >= BACKLOG / 4).await.unwrap();
    iot.daemon.kill9();
    // Away long enough for thousands to queue at the broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    iot.daemon.restart().await.unwrap();
    assert_eq!(publisher.await.unwrap(), BACKLOG);
    let what = "MQTT SIGKILL mid-stream";
    assert_all_logged(&iot.daemon, &iot.telemetry(), BACKLOG, what).await;
}

/// Publishes `seqs` on the test exchange with confirms, many in flight at once.
async fn publish_amqp(channel: &lapin::Channel, prefix: &str, seqs: std::ops::Range<u64>) {
    let exchange = format!("{prefix}.events");
    let mut confirms = Vec::new();
    for seq in seqs {
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                "devices.1.telemetry".into(),
                lapin::options::BasicPublishOptions::default(),
                json!({"temperature": 1, "seq": seq}).to_string().as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(confirm);
        if confirms.len() == 500 {
            for c in confirms.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in confirms {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_backlog_queued_while_the_daemon_was_stopped_is_logged_in_full() {
    require_rabbitmq();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("abacklog");
    let prefix = unique("a");
    let spec = amqp_spec(dir.path(), &api, &prefix);
    let mut daemon = Daemon::start(&["--specs", spec.to_str().unwrap()])
        .await
        .unwrap();
    // The daemon declared its durable queue; stop it and queue the backlog.
    let (status, _) = daemon.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "clean stop: {status}");
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
    publish_amqp(&ch, &prefix, 0..BACKLOG).await;

    daemon.restart().await.unwrap();
    let channel = format!("{api}.telemetry");
    assert_all_logged(&daemon, &channel, BACKLOG, "AMQP restart with a backlog").await;
    amqp_cleanup(&prefix, &["telemetry"]).await;
}

fn kafka_spec(dir: &std::path::Path, api: &str, topic: &str, group: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Kafka backlog, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:9092', protocol: kafka}}
channels:
  telemetry:
    address: '{topic}'
    messages:
      reading:
        payload: {{type: object, required: [temperature], properties: {{temperature: {{type: number}}, seq: {{type: integer}}}}}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
    bindings: {{kafka: {{groupId: {group}}}}}
"#
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_backlog_produced_while_the_daemon_was_stopped_is_logged_in_full() {
    let cluster = MockCluster::new(1).expect("librdkafka mock cluster");
    let topic = unique("k-backlog");
    cluster.create_topic(&topic, 2, 1).expect("topic created");
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kbacklog");
    let spec = kafka_spec(dir.path(), &api, &topic, &unique("group"));
    let server = format!("broker=kafka://{}", cluster.bootstrap_servers());
    let mut daemon = Daemon::start(&["--specs", spec.to_str().unwrap(), "--server", &server])
        .await
        .unwrap();
    // The group's committed position exists once the daemon logged a first record.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.timeout.ms", "10000")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let produce = |seq: u64| {
        let payload = json!({"temperature": 1, "seq": seq}).to_string();
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&format!("d{}", seq % 10))
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("the mock broker acknowledges");
        }
    };
    produce(0).await;
    let channel = format!("{api}.telemetry");
    daemon.wait_for_count(&channel, 1, STALL).await;
    // Give the consumer's auto-commit (every second) time to record that first offset.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _) = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "clean stop: {status}");

    for chunk in (1..BACKLOG).collect::<Vec<_>>().chunks(1000) {
        futures::future::join_all(chunk.iter().map(|s| produce(*s))).await;
    }
    daemon.restart().await.unwrap();
    assert_all_logged(&daemon, &channel, BACKLOG, "Kafka restart with a backlog").await;
}

/// The IoT document with a 5 s MQTT keep-alive, so a stall is reported within seconds.
fn short_keep_alive_spec(dir: &std::path::Path, api: &str, prefix: &str) -> std::path::PathBuf {
    let path = iot_spec(dir, api, prefix, 1);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "broker: {host: '127.0.0.1:1883', protocol: mqtt}",
        "broker: {host: '127.0.0.1:1883', protocol: mqtt, bindings: {mqtt: {keepAlive: 5}}}",
    );
    assert!(text.contains("keepAlive: 5"));
    std::fs::write(&path, text).unwrap();
    path
}

fn mqtt_status(connections: &Value) -> Value {
    connections["connections"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["protocol"] == "mqtt"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_log_is_reported_as_a_stall_within_the_keep_alive_and_recovers() {
    let broker = OwnMosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("stall");
    let prefix = unique("t");
    let spec = short_keep_alive_spec(dir.path(), &api, &prefix);
    let server = format!("broker={}", broker.url());
    // The log writer freezes for 20 s after its first 200 appends (a debug-build failpoint).
    let daemon = Daemon::start_with_env(
        &["--specs", spec.to_str().unwrap(), "--server", &server],
        &[("STEPFLOW_FAILPOINT_LOG_FREEZE", "200:20")],
    )
    .await
    .unwrap();
    assert_eq!(
        daemon
            .metric_value("stepflow_upstream_stalls_total", &[])
            .await
            .unwrap(),
        None,
        "no stall before the freeze"
    );
    let total = 2_000;
    let (tx, _progress) = tokio::sync::watch::channel(0);
    let publisher = tokio::spawn(publish_acknowledged(
        broker.port,
        format!("{prefix}/devices/1/telemetry"),
        0..total,
        2_000,
        tx,
    ));

    // Within the keep-alive (5 s) plus the detector's 1 s tick of the freeze.
    let started = std::time::Instant::now();
    let stalled = loop {
        let status = mqtt_status(&daemon.get_json("/api/v1/connections").await.unwrap());
        if !status["stalled"].is_null() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "no stall reported: {status}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "stall reported {:?} after the stream started: {stalled}",
        started.elapsed()
    );
    assert_eq!(stalled["state"], "connected");
    assert_eq!(stalled["stalled"]["reason"], "no_acknowledgement");
    assert!(stalled["progress"]["outstanding"].as_u64().unwrap() > 0);
    let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "a stalled upstream is not ready");
    let body: Value = ready.json().await.unwrap();
    assert!(!mqtt_status(&body)["stalled"].is_null(), "{body}");
    assert_eq!(
        daemon
            .metric_value(
                "stepflow_upstream_stalls_total",
                &[("protocol", "mqtt"), ("reason", "no_acknowledgement")]
            )
            .await
            .unwrap(),
        Some(1.0)
    );
    assert!(daemon.log().contains("upstream intake stalled"));

    // The writer resumes: everything is logged, the stall clears, the daemon is ready again.
    assert_eq!(publisher.await.unwrap(), total);
    daemon
        .wait_for_count(&format!("{api}.telemetry"), total, STALL)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still not ready: {}",
            ready.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        daemon
            .metric_value("stepflow_upstream_stalled", &[("protocol", "mqtt")])
            .await
            .unwrap(),
        Some(0.0)
    );
    assert!(daemon.log().contains("upstream intake moving again"));
}
