//! The Kafka connector against librdkafka's Kafka-protocol mock broker (`MockCluster`, real TCP
//! on loopback, one per test), with the daemon as a process.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::SinkExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

struct Kafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
    prefix: String,
}

impl Kafka {
    fn start() -> Kafka {
        let cluster = MockCluster::new(1).expect("librdkafka mock cluster");
        let prefix = unique("k");
        for topic in ["telemetry", "commands"] {
            cluster
                .create_topic(&format!("{prefix}.{topic}"), 2, 1)
                .expect("topic created");
        }
        Kafka { cluster, prefix }
    }

    fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("message.timeout.ms", "10000")
            .create()
            .unwrap()
    }

    fn consumer(&self, topic: &str) -> StreamConsumer {
        kafka_reader(&self.bootstrap(), topic)
    }

    /// A document with a telemetry topic the gateway consumes and a commands topic it produces
    /// to, keyed by the device id.
    fn spec(&self, dir: &std::path::Path, api: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{api}.yaml"));
        let p = &self.prefix;
        std::fs::write(
            &path,
            format!(
                r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Kafka test, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:9092', protocol: kafka}}
channels:
  telemetry:
    address: '{p}.telemetry'
    messages:
      reading:
        payload: {{type: object, required: [temperature], properties: {{temperature: {{type: number}}, seq: {{type: integer}}}}}}
  commands:
    address: 'devices/{{deviceId}}/commands'
    bindings:
      kafka: {{topic: '{p}.commands', x-stepflow-key: '{{deviceId}}'}}
    messages:
      command:
        payload: {{type: object, required: [action], properties: {{action: {{type: string}}}}}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
    bindings: {{kafka: {{groupId: {p}-gateway}}}}
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
"#
            ),
        )
        .unwrap();
        path
    }

    async fn produce(&self, producer: &FutureProducer, key: &str, payload: &Value) {
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some("abc-123"),
        });
        producer
            .send(
                FutureRecord::to(&format!("{}.telemetry", self.prefix))
                    .key(key)
                    .payload(&payload.to_string())
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .expect("the mock broker acknowledges");
    }
}

async fn start_daemon(kafka: &Kafka, dir: &std::path::Path, api: &str) -> Daemon {
    let spec = kafka.spec(dir, api);
    let server = format!("broker=kafka://{}", kafka.bootstrap());
    Daemon::start(&["--specs", spec.to_str().unwrap(), "--server", &server])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_websocket_sse_and_the_log_with_key_and_headers() {
    let kafka = Kafka::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kin");
    let daemon = start_daemon(&kafka, dir.path(), &api).await;
    let channel = format!("{api}.telemetry");
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{channel}")), None)
        .await
        .unwrap();
    let producer = kafka.producer();
    kafka
        .produce(&producer, "device-7", &json!({"temperature": 19.5}))
        .await;

    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["payload"]["temperature"], 19.5);
    assert_eq!(frame["headers"]["kafka_key"], "device-7");
    assert_eq!(frame["headers"]["trace-id"], "abc-123");
    assert!(frame["headers"]["kafka_partition"].is_string());
    assert_eq!(frame["address"], format!("{}.telemetry", kafka.prefix));
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["headers"]["kafka_key"], "device-7");
    assert_eq!(daemon.wait_for_log(&channel, 1).await.len(), 1);
    assert_eq!(
        daemon
            .metric(
                "stepflow_messages_received_total",
                &[("channel", &channel), ("transport", "kafka")]
            )
            .await
            .unwrap(),
        1.0
    );
    // Consumer lag comes from librdkafka's statistics (every 5 s).
    let series = format!("stepflow_kafka_consumer_lag{{channel=\"{channel}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(daemon.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Some(line) = text.lines().find(|l| l.starts_with(&series)) {
            assert!(line.ends_with(" 0"), "nothing left to consume: {line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no consumer lag gauge:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_and_websocket_frames_are_produced_with_key_and_headers() {
    let kafka = Kafka::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kout");
    let daemon = start_daemon(&kafka, dir.path(), &api).await;
    let reader = kafka.consumer(&format!("{}.commands", kafka.prefix));
    let channel = format!("{api}.commands");

    let response = reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/channels/{channel}/messages?deviceId=42")))
        .header("content-type", "application/json")
        .header("x-header-trace-id", "t-1")
        .body(json!({"action": "reboot"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let record = tokio::time::timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.key(), Some(&b"42"[..]));
    assert_eq!(
        record.payload(),
        Some(json!({"action": "reboot"}).to_string().as_bytes())
    );
    let header = record
        .headers()
        .unwrap()
        .iter()
        .find(|h| h.key == "trace-id")
        .unwrap();
    assert_eq!(header.value, Some(&b"t-1"[..]));

    let mut ws =
        ws_connect(&daemon.ws_url(&format!("/ws/{channel}?deviceId=9&x-header-trace-id=w-1")))
            .await
            .unwrap();
    ws.send(WsMessage::Text(
        json!({"action": "identify"}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next_json(&mut ws, WAIT).await.unwrap()["type"], "ack");
    let record = tokio::time::timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.key(), Some(&b"9"[..]));
    let header = record
        .headers()
        .unwrap()
        .iter()
        .find(|h| h.key == "trace-id")
        .unwrap();
    assert_eq!(header.value, Some(&b"w-1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_stream_loses_no_record_and_commits_never_pass_the_log() {
    let kafka = Kafka::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kcrash");
    let mut daemon = start_daemon(&kafka, dir.path(), &api).await;
    let channel = format!("{api}.telemetry");
    let total = 2000u64;
    let producer = kafka.producer();
    for seq in 0..total / 2 {
        kafka
            .produce(
                &producer,
                &format!("d{}", seq % 7),
                &json!({"temperature": 1, "seq": seq}),
            )
            .await;
    }
    // Kill while the first half is being consumed.
    let deadline = std::time::Instant::now() + WAIT;
    while daemon.replay_all(&channel, "messages").await.unwrap().len() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing consumed:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9();
    for seq in total / 2..total {
        kafka
            .produce(
                &producer,
                &format!("d{}", seq % 7),
                &json!({"temperature": 1, "seq": seq}),
            )
            .await;
    }
    daemon.restart().await.unwrap();
    let log = daemon.wait_for_log(&channel, total as usize).await;
    let (missing, duplicates) = sequence_report(&log, total);
    let mut logged_end: BTreeMap<i32, i64> = BTreeMap::new();
    for m in &log {
        let partition: i32 = m["headers"]["kafka_partition"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = m["headers"]["kafka_offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let end = logged_end.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    println!(
        "Kafka SIGKILL test: {total} produced, {} logged, {duplicates} duplicates, {} missing",
        log.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} records: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    // The group's committed offsets never pass what the log holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", format!("{}-gateway", kafka.prefix))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for partition in 0..2 {
        tpl.add_partition(&format!("{}.telemetry", kafka.prefix), partition);
    }
    let committed = probe
        .committed_offsets(tpl, Duration::from_secs(5))
        .unwrap();
    let committed: Vec<(i32, i64)> = committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect();
    // Drop the list before the consumer (a live list makes the consumer's Drop hang).
    drop(probe);
    for (partition, offset) in committed {
        let end = logged_end.get(&partition).copied().unwrap_or(0);
        assert!(
            offset <= end,
            "partition {partition}: committed {offset} passes the log's {end}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_absent_at_start_then_the_daemon_connects_when_it_appears() {
    let kafka = Kafka::start();
    // The broker is reached through a proxy that starts down (librdkafka's `broker_down` frees
    // the mock's port, and its re-bind aborts the process when another test took it meanwhile).
    let mut proxy = TcpProxy::start(&kafka.bootstrap()).await;
    proxy.down();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kdown");
    let spec = kafka.spec(dir.path(), &api);
    let server = format!("broker=kafka://127.0.0.1:{}", proxy.port);
    let mut daemon =
        Daemon::start_serving(&["--specs", spec.to_str().unwrap(), "--server", &server])
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_ne!(body["connections"][0]["state"], "connected", "{body}");

    proxy.up().await;
    daemon.wait_ready(Duration::from_secs(30)).await.unwrap();
    let channel = format!("{api}.telemetry");
    let producer = kafka.producer();
    kafka
        .produce(&producer, "late", &json!({"temperature": 3}))
        .await;
    assert_eq!(daemon.wait_for_log(&channel, 1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_offsets_and_the_records_are_read_again_when_space_returns() {
    let kafka = Kafka::start();
    let disk = SmallDisk::mount(16);
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kfull");
    let spec = kafka.spec(dir.path(), &api);
    let server = format!("broker=kafka://{}", kafka.bootstrap());
    let daemon = Daemon::start_in(
        &disk.path.join("data"),
        &["--specs", spec.to_str().unwrap(), "--server", &server],
    )
    .await
    .unwrap();
    let channel = format!("{api}.telemetry");
    let producer = kafka.producer();
    let send = |seq: u64| {
        let producer = producer.clone();
        let kafka = &kafka;
        async move {
            kafka
                .produce(
                    &producer,
                    &format!("d{}", seq % 3),
                    &json!({"temperature": 1, "seq": seq}),
                )
                .await
        }
    };
    let total = 25;
    let filler = send_while_the_disk_fills(&daemon, &disk, &channel, total, send).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    free_disk_and_check_the_log(&daemon, &filler, &channel, total, "Kafka").await;
    assert!(
        daemon.log().contains("restarts from the committed offsets"),
        "the records came back by a new consumer"
    );
}
