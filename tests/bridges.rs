//! Bridges end to end, the daemon as a process: MQTT (Mosquitto) → Kafka (librdkafka's mock
//! cluster, real TCP) as JSON and Avro, MQTT → AMQP (RabbitMQ), Kafka → MQTT, each with a SIGKILL
//! in the middle of a 10,000-message stream; a target broker down for 10 s under `block` and
//! `dead_letter`, with the dead letters replayed; and load errors naming file and pointer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const TOTAL: u64 = 10_000;
const DEVICES: u64 = 10;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A Kafka-side document: `raw` (JSON) and `avro` (Avro binary) channels the gateway sends to,
/// keyed by device id, and a `commands` topic it receives.
fn kafka_spec(dir: &Path, api: &str, p: &str) -> PathBuf {
    write(
        dir,
        &format!("{api}.yaml"),
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Kafka side, version: 1.0.0}}
servers:
  kafka: {{host: '127.0.0.1:9092', protocol: kafka}}
channels:
  raw:
    address: 'devices/{{deviceId}}/telemetry'
    bindings: {{kafka: {{topic: '{p}.raw', x-stepflow-key: '{{deviceId}}'}}}}
  avro:
    address: 'devices/{{deviceId}}/telemetry'
    bindings: {{kafka: {{topic: '{p}.avro'}}}}
    messages:
      reading:
        contentType: application/vnd.apache.avro+binary
        payload:
          schemaFormat: application/vnd.apache.avro;version=1.9.0
          schema:
            type: record
            name: Reading
            fields:
              - {{name: temperature, type: double}}
              - {{name: seq, type: long}}
              - {{name: pad, type: ['null', string], default: null}}
  commands:
    address: '{p}.commands'
    bindings: {{kafka: {{topic: '{p}.commands'}}}}
operations:
  sendRaw: {{action: send, channel: {{$ref: '#/channels/raw'}}}}
  sendAvro: {{action: send, channel: {{$ref: '#/channels/avro'}}}}
  receiveCommands:
    action: receive
    channel: {{$ref: '#/channels/commands'}}
    bindings: {{kafka: {{groupId: {p}-gateway}}}}
"#
        ),
    )
}

/// An MQTT document whose `commands` the gateway sends (any JSON object).
fn mqtt_commands_spec(dir: &Path, api: &str, prefix: &str) -> PathBuf {
    write(
        dir,
        &format!("{api}.yaml"),
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Devices, version: 1.0.0}}
servers:
  devices: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  commands:
    address: '{prefix}/devices/{{deviceId}}/commands'
    messages:
      command:
        payload: {{type: object, required: [action, seq], properties: {{action: {{type: string}}, seq: {{type: integer}}}}}}
operations:
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
    bindings: {{mqtt: {{qos: 1}}}}
"#
        ),
    )
}

fn kafka_cluster(kafka: TestKafka, prefix: &str, topics: &[&str]) -> TestKafka {
    for t in topics {
        kafka.create_topic(&format!("{prefix}.{t}"), 3);
    }
    kafka
}

/// Every record (key, payload) in arrival order.
type Records = Vec<(Option<String>, Vec<u8>)>;

/// Reads until `want` distinct payloads arrived, or fails after `timeout` (at once when the
/// broker itself failed).
async fn read_kafka_until(
    cluster: &TestKafka,
    consumer: &StreamConsumer,
    timeout: Duration,
    want: u64,
) -> Records {
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let mut stream = consumer.stream();
    let mut checked = Instant::now();
    while (distinct.len() as u64) < want {
        if checked.elapsed() > Duration::from_secs(5) {
            cluster.assert_broker_alive();
            checked = Instant::now();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} distinct records in time",
            distinct.len()
        );
        if let Ok(Some(Ok(m))) =
            tokio::time::timeout(left.min(Duration::from_secs(1)), stream.next()).await
        {
            let payload = m.payload().unwrap_or_default().to_vec();
            distinct.insert(payload.clone());
            records.push((
                m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload,
            ));
        }
    }
    drop(stream);
    records
}

/// The payload of the first record keyed `key` (within 30 s).
async fn read_kafka_key(consumer: &StreamConsumer, key: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = consumer.stream();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no record keyed {key}");
        if let Ok(Some(Ok(m))) = tokio::time::timeout(left, stream.next()).await
            && m.key() == Some(key.as_bytes())
        {
            return m.payload().unwrap_or_default().to_vec();
        }
    }
}

/// Counts per sequence number: missing ones and extra copies.
fn tally(seqs: impl IntoIterator<Item = u64>, total: u64) -> (Vec<u64>, u64) {
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for s in seqs {
        *seen.entry(s).or_default() += 1;
    }
    let missing = (0..total).filter(|s| !seen.contains_key(s)).collect();
    (missing, seen.values().map(|n| n - 1).sum())
}

/// Sequence numbers that arrived, per key, before a lower one seen for the first time: a
/// broken per-key order (copies re-sent after a crash are not counted, they were seen before).
fn order_violations(per_key: &BTreeMap<String, Vec<u64>>) -> usize {
    let mut violations = 0;
    for seqs in per_key.values() {
        let mut seen = BTreeSet::new();
        let mut highest = None;
        for &s in seqs {
            if seen.insert(s) {
                if highest.is_some_and(|h| s < h) {
                    violations += 1;
                }
                highest = highest.max(Some(s));
            }
        }
    }
    violations
}

/// Publishes `TOTAL` readings over MQTT QoS 1 on `DEVICES` devices' topics at `rate`/s; each
/// broker acknowledgement is reported on `progress`.
fn publish_readings(
    port: u16,
    prefix: &str,
    rate: u64,
    progress: tokio::sync::watch::Sender<u64>,
) -> tokio::task::JoinHandle<u64> {
    publish_n_readings(port, prefix, TOTAL, rate, progress)
}

/// Like [`publish_readings`], `total` of them.
fn publish_n_readings(
    port: u16,
    prefix: &str,
    total: u64,
    rate: u64,
    progress: tokio::sync::watch::Sender<u64>,
) -> tokio::task::JoinHandle<u64> {
    let prefix = prefix.to_owned();
    let topic_of = move |seq: u64| format!("{prefix}/devices/d{}/telemetry", seq % DEVICES);
    tokio::spawn(publish_acknowledged_on(
        port,
        topic_of,
        0..total,
        rate,
        progress,
    ))
}

/// The daemon on `specs` and `bridges`, with `--server` overrides.
async fn start_bridged(specs: &Path, bridges: &Path, servers: &[&str]) -> Daemon {
    let mut args = vec![
        "--specs",
        specs.to_str().unwrap(),
        "--bridges",
        bridges.to_str().unwrap(),
    ];
    for s in servers {
        args.extend(["--server", s]);
    }
    Daemon::start(&args).await.unwrap()
}

/// Kills the daemon once `progress` passes `at`, restarts it on the same data, and returns
/// when it serves again.
async fn kill_and_restart_at(
    daemon: &mut Daemon,
    progress: &mut tokio::sync::watch::Receiver<u64>,
    at: u64,
) {
    progress.wait_for(|n| *n >= at).await.unwrap();
    daemon.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.restart().await.unwrap();
}

/// Decodes Avro binary datums with Python's fastavro (an Avro implementation independent of
/// the gateway's) and returns the `seq` of each.
fn decode_with_fastavro(schema: &Value, datums: &[Vec<u8>]) -> Vec<u64> {
    let dir = tempfile::tempdir().unwrap();
    let mut blob = Vec::new();
    for d in datums {
        blob.extend_from_slice(&(d.len() as u32).to_be_bytes());
        blob.extend_from_slice(d);
    }
    std::fs::write(dir.path().join("datums.bin"), blob).unwrap();
    std::fs::write(dir.path().join("schema.json"), schema.to_string()).unwrap();
    let script = r#"
import io, json, struct, sys
import fastavro
schema = fastavro.parse_schema(json.load(open(sys.argv[1] + "/schema.json")))
data = open(sys.argv[1] + "/datums.bin", "rb").read()
at, out = 0, []
while at < len(data):
    (n,) = struct.unpack(">I", data[at:at + 4]); at += 4
    buf = io.BytesIO(data[at:at + n]); at += n
    record = fastavro.schemaless_reader(buf, schema)
    assert buf.tell() == n, "trailing bytes"
    assert record["pad"] == "x" and record["temperature"] == 20.5, record
    out.append(record["seq"])
print(json.dumps(out))
"#;
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "fastavro could not decode the records (install it with `pip install fastavro`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_to_kafka_json_and_avro_loses_nothing_across_a_sigkill_on_tansu() {
    on_tansu(mqtt_to_kafka_json_and_avro_loses_nothing_across_a_sigkill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_to_kafka_json_and_avro_loses_nothing_across_a_sigkill_on_the_mock() {
    mqtt_to_kafka_json_and_avro_loses_nothing_across_a_sigkill(TestKafka::mock()).await;
}

async fn mqtt_to_kafka_json_and_avro_loses_nothing_across_a_sigkill(kafka: TestKafka) {
    let broker = OwnMosquitto::start();
    let prefix = unique("b");
    let cluster = kafka_cluster(kafka, &prefix, &["raw", "avro", "commands"]);
    let dir = tempfile::tempdir().unwrap();
    let (iot, analytics) = (unique("iot"), unique("analytics"));
    iot_spec(dir.path(), &iot, &prefix, 1);
    kafka_spec(dir.path(), &analytics, &prefix);
    let bridges = tempfile::tempdir().unwrap();
    write(
        bridges.path(),
        "kafka.yaml",
        &format!(
            "bridges:\n  to-kafka:\n    from: {iot}.telemetry\n    to:\n      - channel: {analytics}.raw\n      - channel: {analytics}.avro\n        key: '{{deviceId}}'\n"
        ),
    );
    let mqtt = format!("{iot}/broker={}", broker.url());
    let kafka = format!("{analytics}/kafka=kafka://{}", cluster.bootstrap());
    let mut daemon = start_bridged(dir.path(), bridges.path(), &[&mqtt, &kafka]).await;

    let (tx, mut progress) = tokio::sync::watch::channel(0);
    let publisher = publish_readings(broker.port, &prefix, 4000, tx);
    kill_and_restart_at(&mut daemon, &mut progress, TOTAL / 2).await;
    assert_eq!(
        publisher.await.unwrap(),
        TOTAL,
        "Mosquitto acknowledged every reading"
    );

    let json_seq = |p: &[u8]| {
        serde_json::from_slice::<Value>(p).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    let raw_reader = kafka_reader(&cluster.bootstrap(), &format!("{prefix}.raw"));
    let raw = read_kafka_until(&cluster, &raw_reader, Duration::from_secs(120), TOTAL).await;
    let (missing, duplicates) = tally(raw.iter().map(|(_, p)| json_seq(p)), TOTAL);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, payload) in &raw {
        let seq = json_seq(payload);
        assert_eq!(
            key.as_deref(),
            Some(format!("d{}", seq % DEVICES).as_str()),
            "keyed by device"
        );
        per_key.entry(key.clone().unwrap()).or_default().push(seq);
    }
    let violations = order_violations(&per_key);
    println!(
        "MQTT → Kafka (JSON) across a SIGKILL: {TOTAL} sent, {} received, {} missing, {duplicates} duplicates, {violations} per-key order violations",
        raw.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {:?}",
        &missing[..missing.len().min(10)]
    );
    assert_eq!(violations, 0, "per-key order kept");

    // The Avro lane: decoded by an independent Avro implementation.
    let avro_reader = kafka_reader(&cluster.bootstrap(), &format!("{prefix}.avro"));
    let avro = read_kafka_until(&cluster, &avro_reader, Duration::from_secs(120), TOTAL).await;
    let schema = json!({"type": "record", "name": "Reading", "fields": [
        {"name": "temperature", "type": "double"},
        {"name": "seq", "type": "long"},
        {"name": "pad", "type": ["null", "string"], "default": null}]});
    let datums: Vec<Vec<u8>> = avro.iter().map(|(_, p)| p.clone()).collect();
    let seqs = decode_with_fastavro(&schema, &datums);
    let (missing, duplicates) = tally(seqs.iter().copied(), TOTAL);
    println!(
        "MQTT → Kafka (Avro) across a SIGKILL: {} records decoded by fastavro, {} missing, {duplicates} duplicates",
        seqs.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {:?}",
        &missing[..missing.len().min(10)]
    );
    for ((key, _), seq) in avro.iter().zip(&seqs) {
        assert_eq!(key.as_deref(), Some(format!("d{}", seq % DEVICES).as_str()));
    }
    let forwarded = daemon
        .metric(
            "stepflow_bridge_messages_total",
            &[
                ("bridge", "to-kafka"),
                ("target", &format!("{analytics}.avro")),
                ("outcome", "forwarded"),
            ],
        )
        .await
        .unwrap();
    assert!(
        forwarded > 0.0,
        "the restarted daemon counts what it forwarded"
    );
    let converted = daemon
        .metric(
            "stepflow_bridge_conversions_total",
            &[("bridge", "to-kafka"), ("conversion", "json_to_avro")],
        )
        .await
        .unwrap();
    assert_eq!(
        converted, forwarded,
        "each forwarded Avro record was converted"
    );
}

/// Consumes the queue until `want` distinct sequence numbers arrived (or `timeout`); every
/// delivery's `seq` in arrival order, with its routing key.
async fn consume_seqs(
    channel: &lapin::Channel,
    queue: &str,
    want: u64,
    timeout: Duration,
) -> Vec<(String, u64)> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            unique("test").into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut distinct = BTreeSet::new();
    while (distinct.len() as u64) < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(left, consumer.next()).await {
            let seq = serde_json::from_slice::<Value>(&delivery.data).unwrap()["seq"]
                .as_u64()
                .unwrap();
            distinct.insert(seq);
            // Every bridged message names its place in the source log, the same on a resend.
            let message_id = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-stepflow-message-id").cloned());
            let Some(lapin::types::AMQPValue::LongString(id)) = message_id else {
                panic!(
                    "no x-stepflow-message-id on seq {seq}: {:?}",
                    delivery.properties
                );
            };
            let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            let offset = id.rsplit_once('/').and_then(|(_, o)| o.parse::<u64>().ok());
            assert!(
                id.contains(".telemetry/") && offset.is_some(),
                "x-stepflow-message-id {id}"
            );
            assert_eq!(
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str()),
                Some(id.as_str()),
                "the AMQP message-id property carries the same id"
            );
            out.push((delivery.routing_key.to_string(), seq));
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    out
}

/// The daemon with an IoT document on `broker`, an AMQP document on the machine's RabbitMQ
/// and a bridge from the telemetry to the archive exchange of `prefix`.
async fn start_mqtt_to_amqp(
    broker: &OwnMosquitto,
    prefix: &str,
) -> (Daemon, (tempfile::TempDir, tempfile::TempDir)) {
    let dir = tempfile::tempdir().unwrap();
    let (iot, archive) = (unique("iot"), unique("archive"));
    iot_spec(dir.path(), &iot, prefix, 1);
    amqp_target_spec(dir.path(), &archive, prefix);
    let bridges = tempfile::tempdir().unwrap();
    write(
        bridges.path(),
        "amqp.yaml",
        &format!(
            "bridges:\n  to-archive:\n    from: {iot}.telemetry\n    to:\n      - channel: {archive}.readings\n"
        ),
    );
    let mqtt = format!("{iot}/broker={}", broker.url());
    let daemon = start_bridged(dir.path(), bridges.path(), &[&mqtt]).await;
    (daemon, (dir, bridges))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_to_amqp_loses_nothing_across_a_sigkill() {
    require_rabbitmq();
    let broker = OwnMosquitto::start();
    let prefix = unique("ba");
    let (_conn, channel, queue) = archive_queue(&prefix).await;
    let (mut daemon, _dirs) = start_mqtt_to_amqp(&broker, &prefix).await;
    let (tx, mut progress) = tokio::sync::watch::channel(0);
    // More than every queue between the broker and the log holds (a stall at ~3,000 once lost
    // the tail of such a stream).
    let total = 20_000;
    let publisher = publish_n_readings(broker.port, &prefix, total, 5000, tx);
    kill_and_restart_at(&mut daemon, &mut progress, total / 2).await;
    assert_eq!(publisher.await.unwrap(), total);

    let got = consume_seqs(&channel, &queue, total, Duration::from_secs(120)).await;
    let (missing, duplicates) = tally(got.iter().map(|(_, s)| *s), total);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, seq) in &got {
        assert_eq!(key, &format!("devices.d{}.telemetry", seq % DEVICES));
        per_key.entry(key.clone()).or_default().push(*seq);
    }
    let violations = order_violations(&per_key);
    println!(
        "MQTT → AMQP across a SIGKILL: {total} sent, {} received, {} missing, {duplicates} duplicates, {violations} per-key order violations",
        got.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {:?}",
        &missing[..missing.len().min(10)]
    );
    assert_eq!(violations, 0, "per-key order kept");
    amqp_cleanup(&prefix, &["archive"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_mqtt_loses_nothing_across_a_sigkill_on_tansu() {
    on_tansu(kafka_to_mqtt_loses_nothing_across_a_sigkill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_mqtt_loses_nothing_across_a_sigkill_on_the_mock() {
    kafka_to_mqtt_loses_nothing_across_a_sigkill(TestKafka::mock()).await;
}

async fn kafka_to_mqtt_loses_nothing_across_a_sigkill(kafka: TestKafka) {
    let broker = OwnMosquitto::start();
    let prefix = unique("bk");
    let cluster = kafka_cluster(kafka, &prefix, &["raw", "avro", "commands"]);
    let dir = tempfile::tempdir().unwrap();
    let (devices, analytics) = (unique("devices"), unique("analytics"));
    mqtt_commands_spec(dir.path(), &devices, &prefix);
    kafka_spec(dir.path(), &analytics, &prefix);
    let bridges = tempfile::tempdir().unwrap();
    write(
        bridges.path(),
        "commands.yaml",
        &format!(
            "bridges:\n  commands:\n    from: {analytics}.commands\n    to:\n      - channel: {devices}.commands\n        params: {{deviceId: '{{header.kafka_key}}'}}\n"
        ),
    );
    let mut subscriber = MqttClient::connect(broker.port, &unique("device"))
        .await
        .unwrap();
    subscriber
        .subscribe(&format!("{prefix}/devices/+/commands"))
        .await
        .unwrap();
    let mqtt = format!("{devices}/devices={}", broker.url());
    let kafka = format!("{analytics}/kafka=kafka://{}", cluster.bootstrap());
    let mut daemon = start_bridged(dir.path(), bridges.path(), &[&mqtt, &kafka]).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let topic = format!("{prefix}.commands");
    let produce = tokio::spawn(async move {
        for seq in 0..TOTAL {
            let key = format!("d{}", seq % DEVICES);
            let payload = json!({"action": "identify", "seq": seq}).to_string();
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("the mock broker acknowledges");
            if seq % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    });

    let mut received: Vec<(String, u64)> = Vec::new();
    let mut distinct = BTreeSet::new();
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(150);
    while (distinct.len() as u64) < TOTAL {
        assert!(
            Instant::now() < deadline,
            "only {} distinct commands arrived",
            distinct.len()
        );
        let Ok(publish) = subscriber.recv(Duration::from_secs(1)).await else {
            cluster.assert_broker_alive();
            continue;
        };
        let seq = serde_json::from_slice::<Value>(&publish.payload).unwrap()["seq"]
            .as_u64()
            .unwrap();
        distinct.insert(seq);
        received.push((publish.topic.clone(), seq));
        if !killed && distinct.len() as u64 >= TOTAL / 2 {
            killed = true;
            daemon.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.restart().await.unwrap();
        }
    }
    produce.await.unwrap();
    let (missing, duplicates) = tally(received.iter().map(|(_, s)| *s), TOTAL);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (topic, seq) in &received {
        assert_eq!(
            topic,
            &format!("{prefix}/devices/d{}/commands", seq % DEVICES)
        );
        per_key.entry(topic.clone()).or_default().push(*seq);
    }
    let violations = order_violations(&per_key);
    println!(
        "Kafka → MQTT across a SIGKILL: {TOTAL} produced, {} received, {} missing, {duplicates} duplicates, {violations} per-key order violations",
        received.len(),
        missing.len()
    );
    assert!(killed && missing.is_empty());
    assert_eq!(violations, 0, "per-key order kept");
}

/// MQTT telemetry → AMQP through a proxy the test takes down for 10 s mid-stream.
struct Outage {
    daemon: Daemon,
    proxy: TcpProxy,
    channel: lapin::Channel,
    _connection: lapin::Connection,
    queue: String,
    prefix: String,
    iot: String,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

const OUTAGE_TOTAL: u64 = 3000;

impl Outage {
    async fn start(policy: &str) -> Outage {
        Self::start_with(policy, "").await
    }

    /// With `extra` lines (at the bridge's indentation) in the bridge definition.
    async fn start_with(policy: &str, extra: &str) -> Outage {
        Self::start_configured(policy, extra, None).await
    }

    /// ... and the daemon's config file, when given.
    async fn start_configured(policy: &str, extra: &str, config: Option<&str>) -> Outage {
        require_mosquitto();
        require_rabbitmq();
        let prefix = unique("bo");
        let (_connection, channel, queue) = archive_queue(&prefix).await;
        let dir = tempfile::tempdir().unwrap();
        let (iot, archive) = (unique("iot"), unique("archive"));
        iot_spec(dir.path(), &iot, &prefix, 1);
        amqp_target_spec(dir.path(), &archive, &prefix);
        let bridges = tempfile::tempdir().unwrap();
        write(
            bridges.path(),
            "amqp.yaml",
            &format!(
                "bridges:\n  archive:\n    from: {iot}.telemetry\n    on_target_down: {policy}\n    retries: 2\n{extra}    to:\n      - channel: {archive}.readings\n"
            ),
        );
        let proxy = TcpProxy::start("127.0.0.1:5672").await;
        let rabbit = format!("{archive}/rabbit=amqp://127.0.0.1:{}", proxy.port);
        let daemon = match config {
            None => start_bridged(dir.path(), bridges.path(), &[&rabbit]).await,
            Some(text) => {
                let config = write(dir.path(), "stepflow.yaml", text);
                Daemon::start(&[
                    "--specs",
                    dir.path().to_str().unwrap(),
                    "--bridges",
                    bridges.path().to_str().unwrap(),
                    "--server",
                    &rabbit,
                    "--config",
                    config.to_str().unwrap(),
                ])
                .await
                .unwrap()
            }
        };
        Outage {
            daemon,
            proxy,
            channel,
            _connection,
            queue,
            prefix,
            iot,
            _dirs: (dir, bridges),
        }
    }

    /// Streams `OUTAGE_TOTAL` readings at 300/s with the target down for 10 s from the 600th.
    async fn stream_through_an_outage(&mut self) {
        let (tx, mut progress) = tokio::sync::watch::channel(0);
        let publisher = publish_acknowledged(
            1883,
            format!("{}/devices/d1/telemetry", self.prefix),
            0..OUTAGE_TOTAL,
            300,
            tx,
        );
        let publisher = tokio::spawn(publisher);
        progress.wait_for(|n| *n >= 600).await.unwrap();
        self.proxy.down();
        tokio::time::sleep(Duration::from_secs(10)).await;
        self.proxy.up().await;
        assert_eq!(publisher.await.unwrap(), OUTAGE_TOTAL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_for_10s_with_block_loses_nothing() {
    let mut s = Outage::start("block").await;
    s.stream_through_an_outage().await;
    let got = consume_seqs(&s.channel, &s.queue, OUTAGE_TOTAL, Duration::from_secs(60)).await;
    let (missing, duplicates) = tally(got.iter().map(|(_, q)| *q), OUTAGE_TOTAL);
    let retries = s
        .daemon
        .metric("stepflow_bridge_retries_total", &[("bridge", "archive")])
        .await
        .unwrap();
    println!(
        "target down 10 s, block: {OUTAGE_TOTAL} sent, {} received, {} missing, {duplicates} duplicates, {retries} retries",
        got.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {:?}",
        &missing[..missing.len().min(10)]
    );
    assert!(retries > 0.0, "the lane retried while the target was down");
    let dead = s
        .daemon
        .replay_all(&format!("{}.telemetry", s.iot), "dead-letters")
        .await
        .unwrap();
    assert!(
        dead.is_empty(),
        "block never dead-letters an available message"
    );
    amqp_cleanup(&s.prefix, &["archive"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_for_10s_with_dead_letter_then_replay_delivers_everything() {
    let mut s = Outage::start("dead_letter").await;
    s.stream_through_an_outage().await;
    let channel = format!("{}.telemetry", s.iot);
    // Everything is settled once delivered + dead-lettered covers the stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delivered = Vec::new();
    let dead = loop {
        delivered
            .extend(consume_seqs(&s.channel, &s.queue, OUTAGE_TOTAL, Duration::from_secs(2)).await);
        let dead = s.daemon.replay_all(&channel, "dead-letters").await.unwrap();
        let settled: BTreeSet<u64> = delivered
            .iter()
            .map(|(_, q)| *q)
            .chain(dead.iter().map(|m| m["payload"]["seq"].as_u64().unwrap()))
            .collect();
        if settled.len() as u64 == OUTAGE_TOTAL {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {OUTAGE_TOTAL} settled",
            settled.len()
        );
    };
    assert!(
        !dead.is_empty(),
        "messages sent while the target was down are dead letters"
    );
    for m in &dead {
        assert_eq!(m["headers"]["x-stepflow-bridge"], "archive");
        assert!(
            m["dead_letter_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("archive"),
            "{m}"
        );
    }
    let counted = s
        .daemon
        .metric(
            "stepflow_bridge_messages_total",
            &[("bridge", "archive"), ("outcome", "dead_lettered")],
        )
        .await
        .unwrap();
    assert_eq!(counted as usize, dead.len());

    // Replay them to the target once the gateway is connected to it again (the lane may have
    // settled everything into the dead letters before the connector's reconnect backoff ran
    // out): all delivered, none left.
    s.daemon.wait_ready(Duration::from_secs(30)).await.unwrap();
    let replay = s
        .daemon
        .replay_dead_letters(&channel, json!({"limit": 10000}))
        .await;
    assert_eq!(
        replay["replayed"].as_u64().unwrap() as usize,
        dead.len(),
        "{replay}"
    );
    assert_eq!(replay["remaining"], 0, "{replay}");
    delivered.extend(
        consume_seqs(
            &s.channel,
            &s.queue,
            dead.len() as u64,
            Duration::from_secs(30),
        )
        .await,
    );
    let (missing, duplicates) = tally(delivered.iter().map(|(_, q)| *q), OUTAGE_TOTAL);
    println!(
        "target down 10 s, dead_letter: {OUTAGE_TOTAL} sent, {} dead-lettered and replayed, {} missing, {duplicates} duplicates",
        dead.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {:?}",
        &missing[..missing.len().min(10)]
    );

    // Purge empties the dead-letter log.
    let purge: Value = reqwest::Client::new()
        .delete(
            s.daemon
                .url(&format!("/api/v1/channels/{channel}/dead-letters")),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        purge["purged"], 0,
        "replayed dead letters already left the log"
    );
    amqp_cleanup(&s.prefix, &["archive"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_for_10s_with_drop_oldest_keeps_the_newest() {
    let mut s = Outage::start_with("drop_oldest", "    max_lag: 500\n").await;
    s.stream_through_an_outage().await;
    let dropped = || async {
        s.daemon
            .metric(
                "stepflow_bridge_messages_total",
                &[("bridge", "archive"), ("outcome", "dropped")],
            )
            .await
            .unwrap() as u64
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    // One consumer for the whole wait: a consumer given up on mid-stream keeps what RabbitMQ
    // had already pushed to it, unacknowledged and out of reach of the next one.
    let mut consumer = s
        .channel
        .basic_consume(
            s.queue.as_str().into(),
            unique("test").into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    loop {
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
        {
            let seq = serde_json::from_slice::<Value>(&delivery.data).unwrap()["seq"]
                .as_u64()
                .unwrap();
            got.push((delivery.routing_key.to_string(), seq));
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let distinct: BTreeSet<u64> = got.iter().map(|(_, q)| *q).collect();
        if distinct.len() as u64 + dropped().await >= OUTAGE_TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} delivered, {} dropped",
            distinct.len(),
            dropped().await
        );
    }
    let distinct: BTreeSet<u64> = got.iter().map(|(_, q)| *q).collect();
    let dropped = dropped().await;
    println!(
        "target down 10 s, drop_oldest (max_lag 500): {OUTAGE_TOTAL} sent, {} delivered, {dropped} dropped",
        distinct.len()
    );
    assert!(dropped > 0, "the outage outgrew max_lag");
    // Every message is delivered or counted as dropped. The two can overlap by the sends that
    // were in flight when the target went away: their outcome is unknown (a confirm lost with
    // the connection), so the lane retries them and, once they are the oldest waiting, drops
    // them — yet the broker may already hold them. The overlap is bounded by the lane's window.
    let accounted = distinct.len() as u64 + dropped;
    assert!(
        (OUTAGE_TOTAL..=OUTAGE_TOTAL + 256).contains(&accounted),
        "each message delivered or counted as dropped: {accounted} of {OUTAGE_TOTAL}"
    );
    let newest: Vec<u64> = (OUTAGE_TOTAL - 100..OUTAGE_TOTAL).collect();
    assert!(
        newest.iter().all(|q| distinct.contains(q)),
        "the newest are kept"
    );
    let dead = s
        .daemon
        .replay_all(&format!("{}.telemetry", s.iot), "dead-letters")
        .await
        .unwrap();
    assert!(dead.is_empty());
    amqp_cleanup(&s.prefix, &["archive"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bridges_are_load_errors_with_file_and_pointer() {
    let prefix = unique("bad");
    let dir = tempfile::tempdir().unwrap();
    let (iot, analytics) = (unique("iot"), unique("analytics"));
    iot_spec(dir.path(), &iot, &prefix, 1);
    kafka_spec(dir.path(), &analytics, &prefix);
    let bridges = tempfile::tempdir().unwrap();
    let file = write(
        bridges.path(),
        "bad.yaml",
        &format!(
            r#"bridges:
  unknown-target:
    from: {iot}.telemetry
    to: [{{channel: {iot}.nope}}]
  not-writable:
    from: {iot}.telemetry
    to: [{{channel: {analytics}.commands}}]
  not-readable:
    from: {iot}.commands
    to: [{{channel: {analytics}.raw}}]
  impossible:
    from: {analytics}.commands
    to: [{{channel: {iot}.commands}}]
  bad-filter:
    from: {iot}.telemetry
    filter: 'payload.temperature >'
    on_target_down: sometimes
    to: [{{channel: {analytics}.raw, params: {{deviceId: '{{siteId}}'}}}}]
"#
        ),
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["run", "--listen", "127.0.0.1:0", "--specs"])
        .arg(dir.path())
        .arg("--bridges")
        .arg(bridges.path())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let f = file.display();
    for (pointer, words) in [
        ("/bridges/unknown-target/to/0/channel", "no channel"),
        ("/bridges/not-writable/to/0/channel", "not writable"),
        ("/bridges/not-readable/from", "not readable"),
        ("/bridges/impossible/to/0/params", "impossible mapping"),
        ("/bridges/bad-filter/filter", "CEL"),
        ("/bridges/bad-filter/on_target_down", "not a policy"),
        (
            "/bridges/bad-filter/to/0/params/deviceId",
            "not a parameter",
        ),
    ] {
        let line = format!("{f}#{pointer}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&line) && l.contains(words)),
            "no `{line}… {words}` in:\n{stderr}"
        );
    }
}

/// An upstream service for the cross-protocol test: a WebSocket feed at `/stream` that sends
/// `FEED_TICKS` ticks (and a heartbeat every tenth), and `POST /readings`, which answers 503 to
/// its first two requests, 400 to the tick with seq 77, and 201 to the rest.
#[derive(Clone, Default)]
struct Upstream {
    posted: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const FEED_TICKS: u64 = 200;

async fn feed(ws: axum::extract::WebSocketUpgrade) -> axum::response::Response {
    use axum::extract::ws::Message as AxMessage;
    ws.on_upgrade(|mut socket| async move {
        for seq in 0..FEED_TICKS {
            if seq % 10 == 0 {
                let beat = json!({"event": "heartbeat"}).to_string();
                if socket.send(AxMessage::text(beat)).await.is_err() {
                    return;
                }
            }
            let tick = json!({"event": "tick", "symbol": format!("S{}", seq % 3), "price": 10.5, "seq": seq});
            if socket.send(AxMessage::text(tick.to_string())).await.is_err() {
                return;
            }
        }
        while let Some(Ok(_)) = socket.next().await {}
    })
}

async fn readings(
    axum::extract::State(up): axum::extract::State<Upstream>,
    axum::Json(body): axum::Json<Value>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    use std::sync::atomic::Ordering;
    let n = up.requests.fetch_add(1, Ordering::SeqCst);
    if n < 2 {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "warming up"})),
        );
    }
    if body["seq"] == 77 {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "seq 77 is cursed"})),
        );
    }
    up.posted.lock().unwrap().push(body);
    (
        axum::http::StatusCode::CREATED,
        axum::Json(json!({"ok": true})),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_websocket_feed_is_bridged_to_mqtt_and_an_openapi_operation() {
    require_mosquitto();
    let upstream = Upstream::default();
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(feed))
        .route("/readings", axum::routing::post(readings))
        .with_state(upstream.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let prefix = unique("bu");
    let dir = tempfile::tempdir().unwrap();
    let (market, registry, mq) = (unique("market"), unique("registry"), unique("mq"));
    write(
        dir.path(),
        "market.yaml",
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {market}
x-stepflow-role: client
info: {{title: Feed, version: 1.0.0}}
servers:
  feed: {{host: '127.0.0.1:{port}', protocol: ws}}
channels:
  ticker:
    address: /stream
    messages:
      tick:
        payload: {{type: object, required: [event, symbol, seq], properties: {{event: {{const: tick}}, symbol: {{type: string}}, seq: {{type: integer}}}}}}
      heartbeat:
        payload: {{type: object, required: [event], properties: {{event: {{const: heartbeat}}}}}}
operations:
  sendTicks: {{action: send, channel: {{$ref: '#/channels/ticker'}}}}
"#
        ),
    );
    write(
        dir.path(),
        "registry.yaml",
        &format!(
            r#"openapi: 3.1.0
x-stepflow-id: {registry}
info: {{title: Readings, version: 1.0.0}}
servers: [{{url: 'http://127.0.0.1:{port}'}}]
paths:
  /readings:
    post:
      operationId: postReading
      requestBody:
        required: true
        content:
          application/json:
            schema: {{type: object, required: [symbol, seq], properties: {{symbol: {{type: string}}, seq: {{type: integer}}}}}}
      responses:
        '201': {{description: Stored.}}
"#
        ),
    );
    write(
        dir.path(),
        "mq.yaml",
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {mq}
info: {{title: Ticks over MQTT, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  ticks:
    address: '{prefix}/ticks/{{symbol}}'
operations:
  sendTicks: {{action: send, channel: {{$ref: '#/channels/ticks'}}, bindings: {{mqtt: {{qos: 1}}}}}}
"#
        ),
    );
    let bridges = tempfile::tempdir().unwrap();
    write(
        bridges.path(),
        "feed.yaml",
        &format!(
            r#"bridges:
  ticks-out:
    from: {market}.ticker
    filter: payload.event == "tick"
    to:
      - channel: {mq}.ticks
        params: {{symbol: '{{payload.symbol}}'}}
      - operation: {registry}.postReading
"#
        ),
    );
    let mut subscriber = MqttClient::connect(1883, &unique("ticks")).await.unwrap();
    subscriber
        .subscribe(&format!("{prefix}/ticks/+"))
        .await
        .unwrap();
    let daemon = start_bridged(dir.path(), bridges.path(), &[]).await;

    // MQTT: every tick, on its symbol's topic, in order.
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < FEED_TICKS {
        let p = subscriber.recv(Duration::from_secs(20)).await.unwrap();
        let tick: Value = serde_json::from_slice(&p.payload).unwrap();
        let seq = tick["seq"].as_u64().unwrap();
        assert_eq!(p.topic, format!("{prefix}/ticks/S{}", seq % 3));
        seqs.push(seq);
    }
    assert_eq!(
        seqs,
        (0..FEED_TICKS).collect::<Vec<_>>(),
        "in order, once each"
    );

    // HTTP: every tick but the refused one, after the two 503s were retried.
    let channel = format!("{market}.ticker");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = daemon.replay_all(&channel, "dead-letters").await.unwrap();
        // Distinct ticks (a post retried after a 503 may still come twice; asserted below).
        let distinct = upstream
            .posted
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["seq"].as_u64().unwrap())
            .collect::<BTreeSet<u64>>()
            .len() as u64;
        if !dead.is_empty() && distinct >= FEED_TICKS - 1 {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "posted {distinct} distinct ticks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let posted: BTreeSet<u64> = upstream
        .posted
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(posted.len() as u64, FEED_TICKS - 1);
    assert!(!posted.contains(&77));
    // The 503s failed the lane's head while later posts were out and confirmed: the retry
    // passes those instead of posting them again.
    let posts = upstream.posted.lock().unwrap().len() as u64;
    assert_eq!(posts, FEED_TICKS - 1, "no tick was posted twice");
    assert_eq!(dead.len(), 1, "only the refused tick is a dead letter");
    assert_eq!(dead[0]["payload"]["seq"], 77);
    assert_eq!(
        dead[0]["headers"]["x-stepflow-target"],
        format!("{registry}.postReading")
    );
    let reason = dead[0]["dead_letter_reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("cursed"),
        "{reason}"
    );
    let filtered = daemon
        .metric(
            "stepflow_bridge_messages_total",
            &[
                ("bridge", "ticks-out"),
                ("target", &format!("{mq}.ticks")),
                ("outcome", "filtered"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        filtered,
        (FEED_TICKS / 10) as f64,
        "heartbeats are filtered out"
    );
    // The two 503s were retried (by the call's own retry policy), not dropped.
    let requests = upstream.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(requests >= FEED_TICKS + 2, "{requests} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_bridges_carry_telemetry_to_kafka_and_rabbitmq_and_commands_to_devices() {
    require_mosquitto();
    require_rabbitmq();
    let cluster = TestKafka::tansu();
    for topic in ["telemetry.raw", "telemetry.avro", "device.commands"] {
        cluster.create_topic(topic, 3);
    }
    // The archive's exchange as the shipped document declares it, and a queue of the test's own.
    let (_conn, channel) = amqp_channel().await.unwrap();
    channel
        .exchange_declare(
            "telemetry".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let queue = unique("archive-reader");
    channel
        .queue_declare(
            queue.clone().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let (device, simulator) = (unique("dev"), unique("sim"));
    for d in [&device, &simulator] {
        channel
            .queue_bind(
                queue.clone().into(),
                "telemetry".into(),
                format!("devices.{d}.telemetry").into(),
                QueueBindOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    let mut handset = MqttClient::connect(1883, &unique("handset")).await.unwrap();
    handset
        .subscribe(&format!("devices/{device}/commands"))
        .await
        .unwrap();

    // The newcomer's command, with the analytics Kafka pointed at the mock cluster.
    let kafka = format!("analytics/kafka=kafka://{}", cluster.bootstrap());
    let daemon = Daemon::start(&["--server", &kafka]).await.unwrap();
    let bridges = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert_eq!(bridges["bridges"].as_array().unwrap().len(), 3, "{bridges}");

    let sensor = MqttClient::connect(1883, &unique("sensor")).await.unwrap();
    // A simulator's reading first: the archive bridge's filter keeps it out of RabbitMQ.
    for (d, humidity) in [(&simulator, 99), (&device, 40)] {
        sensor
            .client
            .publish(
                format!("devices/{d}/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"temperature": 21.5, "humidity": humidity, "ts": "2026-11-29T00:00:00Z"})
                    .to_string(),
            )
            .await
            .unwrap();
    }

    let raw_reader = kafka_reader(&cluster.bootstrap(), "telemetry.raw");
    let raw = read_kafka_key(&raw_reader, &device).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&raw).unwrap()["humidity"],
        40,
        "keyed by the device id"
    );
    let avro_reader = kafka_reader(&cluster.bootstrap(), "telemetry.avro");
    let avro = read_kafka_key(&avro_reader, &device).await;
    assert!(
        serde_json::from_slice::<Value>(&avro).is_err(),
        "Avro binary, not JSON"
    );

    let mut archive = channel
        .basic_consume(
            queue.clone().into(),
            "reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), archive.next())
        .await
        .expect("the archive got the reading")
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&delivery.data).unwrap()["humidity"],
        40,
        "the simulator's reading was filtered out, the device's arrived"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), archive.next())
            .await
            .is_err(),
        "nothing else reaches the archive"
    );

    // A command from analytics, keyed by the device, reaches the device's MQTT topic.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .create()
        .unwrap();
    let command = json!({"action": "reboot"}).to_string();
    producer
        .send(
            FutureRecord::to("device.commands")
                .key(&device)
                .payload(&command),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let delivered = handset.recv(Duration::from_secs(30)).await.unwrap();
    assert_eq!(delivered.topic, format!("devices/{device}/commands"));
    assert_eq!(
        serde_json::from_slice::<Value>(&delivered.payload).unwrap(),
        json!({"action": "reboot"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bridge_starts_at_the_next_message_or_with_start_earliest_at_the_oldest() {
    require_mosquitto();
    let prefix = unique("bs");
    let dir = tempfile::tempdir().unwrap();
    let (iot, out) = (unique("iot"), unique("out"));
    iot_spec(dir.path(), &iot, &prefix, 1);
    write(
        dir.path(),
        "out.yaml",
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {out}
info: {{title: Out, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  early: {{address: '{prefix}/early/{{deviceId}}'}}
  late: {{address: '{prefix}/late/{{deviceId}}'}}
operations:
  sendEarly: {{action: send, channel: {{$ref: '#/channels/early'}}, bindings: {{mqtt: {{qos: 1}}}}}}
  sendLate: {{action: send, channel: {{$ref: '#/channels/late'}}, bindings: {{mqtt: {{qos: 1}}}}}}
"#
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let specs = dir.path().to_str().unwrap();
    // A first run without bridges logs five readings.
    let mut first = Daemon::start_in(data.path(), &["--specs", specs])
        .await
        .unwrap();
    let (tx, _rx) = tokio::sync::watch::channel(0);
    publish_acknowledged(
        1883,
        format!("{prefix}/devices/d1/telemetry"),
        0..5,
        1000,
        tx,
    )
    .await;
    first.wait_for_log(&format!("{iot}.telemetry"), 5).await;
    first.terminate(Duration::from_secs(15)).unwrap();

    let bridges = tempfile::tempdir().unwrap();
    write(
        bridges.path(),
        "b.yaml",
        &format!(
            "bridges:\n  early:\n    from: {iot}.telemetry\n    start: earliest\n    to: [{{channel: {out}.early}}]\n  late:\n    from: {iot}.telemetry\n    to: [{{channel: {out}.late}}]\n"
        ),
    );
    let mut reader = MqttClient::connect(1883, &unique("reader")).await.unwrap();
    reader.subscribe(&format!("{prefix}/+/d1")).await.unwrap();
    let _second = Daemon::start_in(
        data.path(),
        &[
            "--specs",
            specs,
            "--bridges",
            bridges.path().to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let (tx, _rx) = tokio::sync::watch::channel(0);
    publish_acknowledged(
        1883,
        format!("{prefix}/devices/d1/telemetry"),
        5..6,
        1000,
        tx,
    )
    .await;
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 7 {
        let p = reader.recv(Duration::from_secs(20)).await.unwrap();
        let seq = serde_json::from_slice::<Value>(&p.payload).unwrap()["seq"]
            .as_u64()
            .unwrap();
        got.entry(p.topic.clone()).or_default().push(seq);
    }
    assert_eq!(got[&format!("{prefix}/early/d1")], vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(got[&format!("{prefix}/late/d1")], vec![5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_lane_waits_for_its_targets_first_connection_instead_of_warning() {
    require_rabbitmq();
    let broker = OwnMosquitto::start();
    let prefix = unique("bq");
    let (_conn, channel, queue) = archive_queue(&prefix).await;
    let (mut daemon, _dirs) = start_mqtt_to_amqp(&broker, &prefix).await;
    let (status, _) = daemon.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success());
    // A backlog waits at the broker: the lane has messages to send the moment it starts, while
    // RabbitMQ's connection is still being made.
    let total = 500;
    let (tx, _progress) = tokio::sync::watch::channel(0);
    assert_eq!(
        publish_n_readings(broker.port, &prefix, total, 10_000, tx)
            .await
            .unwrap(),
        total
    );
    let first_run = daemon.log().len();
    daemon.restart().await.unwrap();
    let got = consume_seqs(&channel, &queue, total, Duration::from_secs(60)).await;
    let (missing, _) = tally(got.iter().map(|(_, s)| *s), total);
    assert!(missing.is_empty(), "lost {missing:?}");
    let log = daemon.log();
    let second_run = &log[first_run..];
    assert!(second_run.contains("bridge lane started"), "{second_run}");
    for warning in ["send failed; retrying in order", "target unavailable"] {
        assert!(
            !second_run.contains(warning),
            "a starting lane warned '{warning}':\n{second_run}"
        );
    }
    amqp_cleanup(&prefix, &["archive"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_behind_retention_shows_counts_and_logs_what_expired_then_carries_on() {
    // The source log keeps 2 s; the target is away far longer.
    let mut s =
        Outage::start_configured("block", "", Some("retention: {max_age_seconds: 2}\n")).await;
    let (daemon, prefix) = (&s.daemon, s.prefix.clone());
    s.proxy.down();
    let topic = format!("{prefix}/devices/d1/telemetry");
    let (tx, _) = tokio::sync::watch::channel(0);
    assert_eq!(
        publish_acknowledged(1883, topic.clone(), 0..1000, 500, tx).await,
        1000
    );

    // Retention overtakes the stuck lane: the API says so before the lane skips anything.
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        let view = daemon.get_json("/api/v1/bridges").await.unwrap();
        let target = &view["bridges"][0]["targets"][0];
        let expired = target["expired"].as_u64().unwrap();
        if expired > 0 {
            break expired;
        }
        assert!(Instant::now() < deadline, "no expiry shown: {view}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // The target is back: the lane counts and logs the gap once, then delivers what follows.
    // What follows is published once the lane is past the gap and its target has reconnected:
    // published earlier, it can wait out the lane's retry backoff (up to 5 s) and be taken by
    // the 2 s retention too.
    s.proxy.up().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = daemon.get_json("/api/v1/bridges").await.unwrap();
        let connections = daemon.get_json("/api/v1/connections").await.unwrap();
        let target_up = connections["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["protocol"] == "amqp" && c["state"] == "connected");
        if view["bridges"][0]["targets"][0]["expired"] == 0 && target_up {
            break;
        }
        assert!(Instant::now() < deadline, "{view}\n{connections}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (tx, _) = tokio::sync::watch::channel(0);
    assert_eq!(
        publish_acknowledged(1883, topic, 1000..1100, 500, tx).await,
        100
    );
    let got = consume_seqs(&s.channel, &s.queue, 100, Duration::from_secs(60)).await;
    let after: BTreeSet<u64> = got.iter().map(|(_, s)| *s).filter(|s| *s >= 1000).collect();
    assert_eq!(
        after.len(),
        100,
        "every message after the gap arrives:\n{}",
        daemon.log()
    );
    let counted = daemon
        .metric(
            "stepflow_bridge_messages_total",
            &[("bridge", "archive"), ("outcome", "expired")],
        )
        .await
        .unwrap();
    assert!(
        counted >= expired as f64,
        "{counted} counted, {expired} shown"
    );
    let view = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert_eq!(view["bridges"][0]["targets"][0]["expired"], 0, "{view}");
    let gaps = daemon
        .log()
        .matches("retention removed messages this lane had not sent")
        .count();
    assert_eq!(gaps, 1, "one log line per gap");
    amqp_cleanup(&prefix, &["archive"]).await;
}
