//! AsyncAPI 3 request-reply over the brokers: the daemon (a process) publishes a request with a
//! correlation id and returns the correlated reply to the HTTP caller; a responder client of the
//! test answers over Mosquitto, Kafka (tansu, and librdkafka's mock broker) and RabbitMQ.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A document with a `requestStatus` send operation whose reply comes on `statusReply`, the
/// correlation id where `location` says, the reply address where `reply_to` says (if given).
fn spec(
    dir: &std::path::Path,
    api: &str,
    server: &str,
    request: (&str, &str),
    reply: (&str, &str),
    location: &str,
    reply_to: Option<&str>,
) -> std::path::PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    let reply_address = reply_to
        .map(|l| format!("\n      address: {{location: '{l}'}}"))
        .unwrap_or_default();
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: request-reply test, version: 1.0.0}}
servers:
  broker: {server}
channels:
  statusRequest:
    address: '{request_address}'
{request_extra}
    messages:
      request:
        correlationId: {{location: '{location}'}}
        payload: {{type: object, properties: {{correlationId: {{type: string}}, verbose: {{type: boolean}}}}}}
  statusReply:
    address: '{reply_address_literal}'
{reply_extra}
    messages:
      reply:
        correlationId: {{location: '{location}'}}
        payload: {{type: object, required: [online], properties: {{online: {{type: boolean}}}}}}
operations:
  requestStatus:
    action: send
    channel: {{$ref: '#/channels/statusRequest'}}
    reply:
      channel: {{$ref: '#/channels/statusReply'}}{reply_address}
"#,
            request_address = request.0,
            request_extra = request.1,
            reply_address_literal = reply.0,
            reply_extra = reply.1,
        ),
    )
    .unwrap();
    path
}

/// The checks every broker shares: a reply comes back, a silent responder gives 504 after the
/// timeout with nothing left pending, and a stray reply is counted.
async fn check_calls(daemon: &Daemon, api: &str, timeout: Duration) {
    let op = &format!("{api}.requestStatus");
    let channel = &format!("{api}.statusReply");
    let r = call_operation(
        daemon,
        op,
        json!({"path": {"deviceId": "d1"}, "body": {"verbose": true, "device": "d1"}}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let frame: Value = r.json().await.unwrap();
    assert_eq!(frame["payload"]["online"], true, "{frame}");
    assert_eq!(frame["payload"]["device"], "d1", "{frame}");
    assert_eq!(frame["channel"], channel.as_str());

    let started = Instant::now();
    let r = call_operation(
        daemon,
        op,
        json!({"path": {"deviceId": "silent"}, "body": {"device": "silent"}}),
    )
    .await;
    assert_eq!(r.status(), 504);
    let waited = started.elapsed();
    assert!(
        waited >= timeout.mul_f64(0.9) && waited < timeout * 3,
        "{waited:?}"
    );
    assert_eq!(
        daemon.metric("stepflow_calls_pending", &[]).await.unwrap(),
        0.0
    );

    let deadline = Instant::now() + WAIT;
    while daemon
        .metric(
            "stepflow_call_replies_unmatched_total",
            &[("channel", channel)],
        )
        .await
        .unwrap()
        < 1.0
    {
        assert!(Instant::now() < deadline, "the stray reply was not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon
        .get_json(&format!("/api/v1/operations/{op}/calls"))
        .await
        .unwrap();
    let codes: Vec<Value> = log["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].clone())
        .collect();
    assert_eq!(codes, vec![json!(200), Value::Null], "{log}");
}

/// An MQTT device that answers `{p}/devices/+/status` requests on `{p}/status/replies` (all
/// but device `silent`), after first publishing a reply nobody asked for. What it saw wrong is
/// returned for the test to check: an assertion inside a task that is aborted at the end would
/// report nothing.
async fn answer_status_requests(p: &str) -> Responder {
    let mut responder = MqttClient::connect(1883, &unique("responder"))
        .await
        .unwrap();
    responder
        .subscribe(&format!("{p}/devices/+/status"))
        .await
        .unwrap();
    let replies = format!("{p}/status/replies");
    let client = responder.client.clone();
    // A reply nobody asked for.
    client
        .publish(
            &replies,
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"correlationId": "nope", "online": false}).to_string(),
        )
        .await
        .unwrap();
    let mismatches = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = mismatches.clone();
    let answering = tokio::spawn(async move {
        loop {
            let Ok(request) = responder.recv(Duration::from_secs(60)).await else {
                return;
            };
            let body: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
            // The address parameter and the body agree.
            let device = request
                .topic
                .split('/')
                .nth(2)
                .unwrap_or_default()
                .to_owned();
            if body["device"] != device.as_str() {
                seen.lock()
                    .unwrap()
                    .push(format!("topic {} carried {body}", request.topic));
                continue;
            }
            if device == "silent" {
                continue;
            }
            let reply =
                json!({"correlationId": body["correlationId"], "online": true, "device": device});
            client
                .publish(
                    &replies,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    reply.to_string(),
                )
                .await
                .unwrap();
        }
    });
    Responder {
        answering,
        mismatches,
    }
}

/// The MQTT device of [`answer_status_requests`].
struct Responder {
    answering: tokio::task::JoinHandle<()>,
    mismatches: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Responder {
    /// Stops it, checking it was still answering and saw nothing wrong.
    fn stop_and_check(self) {
        assert!(!self.answering.is_finished(), "the responder stopped early");
        self.answering.abort();
        let mismatches = self.mismatches.lock().unwrap();
        assert!(mismatches.is_empty(), "{mismatches:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_added_at_run_time_is_callable_over_its_broker_until_it_is_removed() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    iot_spec(&specs, &unique("iot"), &unique("i"), 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, "servers:\n  broker:\n    timeout_ms: 1500\n").unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        specs.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let (api, p) = (unique("rrlive"), unique("t"));
    let staging = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(spec(
        staging.path(),
        &api,
        "{host: '127.0.0.1:1883', protocol: mqtt}",
        (&format!("{p}/devices/{{deviceId}}/status"), ""),
        (&format!("{p}/status/replies"), ""),
        "$message.payload#/correlationId",
        None,
    ))
    .unwrap();
    let r = reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/specs?name={api}.yaml")))
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let added: Value = r.json().await.unwrap();
    let op = format!("{api}.requestStatus");
    assert!(
        added["operations"].as_array().unwrap().contains(&json!(op)),
        "{added}"
    );
    let listed = daemon.get_json("/api/v1/operations").await.unwrap();
    assert!(listed.to_string().contains(&op), "{listed}");

    let responder = answer_status_requests(&p).await;
    check_calls(&daemon, &api, Duration::from_millis(1500)).await;

    // Removed: the operation goes with its document.
    let r = reqwest::Client::new()
        .delete(daemon.url(&format!("/api/v1/specs/{api}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = call_operation(
        &daemon,
        &op,
        json!({"path": {"deviceId": "d1"}, "body": {"device": "d1"}}),
    )
    .await;
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    responder.stop_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_over_mqtt_with_the_correlation_id_in_the_payload() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("rrm");
    let p = unique("t");
    let path = spec(
        dir.path(),
        &api,
        "{host: '127.0.0.1:1883', protocol: mqtt}",
        (&format!("{p}/devices/{{deviceId}}/status"), ""),
        (&format!("{p}/status/replies"), ""),
        "$message.payload#/correlationId",
        None,
    );
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, "servers:\n  broker:\n    timeout_ms: 1500\n").unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        path.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await
    .unwrap();

    let responder = answer_status_requests(&p).await;
    check_calls(&daemon, &api, Duration::from_millis(1500)).await;
    // A missing address parameter is named where an OpenAPI call names it.
    let r = call_operation(
        &daemon,
        &format!("{api}.requestStatus"),
        json!({"body": {"verbose": true}}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["details"]["problems"][0]["at"], "path.deviceId",
        "{body}"
    );
    responder.stop_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_over_kafka_with_correlation_and_reply_topic_headers_on_tansu() {
    // Seen once to hang under a loaded full run (no broker or daemon process left alive): a
    // bound turns that into a failure with a reason instead of a stalled run.
    tokio::time::timeout(
        Duration::from_secs(120),
        request_reply_over_kafka_with_correlation_and_reply_topic_headers(TestKafka::tansu()),
    )
    .await
    .expect("request-reply on tansu finished within 120 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_over_kafka_with_correlation_and_reply_topic_headers_on_the_mock() {
    request_reply_over_kafka_with_correlation_and_reply_topic_headers(TestKafka::mock()).await;
}

async fn request_reply_over_kafka_with_correlation_and_reply_topic_headers(cluster: TestKafka) {
    let p = unique("k");
    let (requests, replies) = (
        format!("{p}.status.requests"),
        format!("{p}.status.replies"),
    );
    for topic in [&requests, &replies] {
        cluster.create_topic(topic, 1);
    }
    let bootstrap = cluster.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("rrk");
    let path = spec(
        dir.path(),
        &api,
        "{host: '127.0.0.1:9092', protocol: kafka}",
        (&requests, ""),
        (&replies, ""),
        "$message.header#/correlationId",
        Some("$message.header#/replyTo"),
    );
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!("servers:\n  broker:\n    url: kafka://{bootstrap}\n    timeout_ms: 3000\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        path.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await
    .unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let warm = producer.clone();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("responder"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[requests.as_str()]).unwrap();
    let stray = OwnedHeaders::new().insert(Header {
        key: "correlationId",
        value: Some("nope"),
    });
    producer
        .send(
            FutureRecord::to(&replies)
                .key("x")
                .payload(&json!({"online": false}).to_string())
                .headers(stray),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel::<String>();
    let answering = tokio::spawn(async move {
        loop {
            let Ok(request) = consumer.recv().await else {
                return;
            };
            let header = |name: &str| {
                request.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == name)
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            let (Some(correlation), Some(reply_to)) = (header("correlationId"), header("replyTo"))
            else {
                continue;
            };
            let body: Value =
                serde_json::from_slice(request.payload().unwrap_or_default()).unwrap();
            let device = body["device"].as_str().unwrap_or_default().to_owned();
            let _ = handled_tx.send(device.clone());
            if device == "silent" {
                continue;
            }
            // The reply goes where the request says, as the document's reply address does.
            let headers = OwnedHeaders::new().insert(Header {
                key: "correlationId",
                value: Some(&correlation),
            });
            let reply = json!({"online": true, "device": device});
            producer
                .send(
                    FutureRecord::to(&reply_to)
                        .key(&device)
                        .payload(&reply.to_string())
                        .headers(headers),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
    });
    // The mock broker holds a new group's first assignment for ~3 s: a warm-up request (its
    // reply goes to a topic the gateway does not read) shows the responder is in its group.
    let scratch = format!("{p}.scratch");
    cluster.create_topic(&scratch, 1);
    let warmup = OwnedHeaders::new()
        .insert(Header {
            key: "correlationId",
            value: Some("warmup"),
        })
        .insert(Header {
            key: "replyTo",
            value: Some(scratch.as_str()),
        });
    warm.send(
        FutureRecord::to(&requests)
            .key("w")
            .payload(&json!({"device": "warmup"}).to_string())
            .headers(warmup),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, handled.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, "warmup");
    check_calls(&daemon, &api, Duration::from_millis(3000)).await;
    // A responder that panicked (an unwrap) is finished; it would otherwise pass unseen.
    assert!(!answering.is_finished(), "the responder stopped early");
    answering.abort();
    // Its consumer closes while the broker still runs: dropped after the broker, librdkafka's
    // close waits for a group coordinator that is gone, on a runtime worker.
    let _ = answering.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_over_amqp_with_correlation_id_and_reply_to_properties() {
    require_rabbitmq();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("rra");
    let p = unique("a");
    let exchange = format!("{p}.events");
    let binding = |queue: Option<&str>| {
        let queue = queue
            .map(|q| format!(", queue: {{name: {p}.{q}, durable: false}}"))
            .unwrap_or_default();
        format!(
            "    bindings:\n      amqp: {{is: routingKey, exchange: {{name: {exchange}, type: topic, durable: false, autoDelete: false}}{queue}}}"
        )
    };
    let path = spec(
        dir.path(),
        &api,
        "{host: '127.0.0.1:5672', protocol: amqp}",
        ("rpc/{deviceId}/status", &binding(None)),
        ("rpc/replies", &binding(Some("replies"))),
        "$message.header#/correlation_id",
        Some("$message.header#/reply_to"),
    );
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, "servers:\n  broker:\n    timeout_ms: 1500\n").unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        path.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await
    .unwrap();

    let (_conn, ch) = amqp_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: false,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = format!("{p}.requests");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "rpc.*.status".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut requests = ch
        .basic_consume(
            queue.as_str().into(),
            "responder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // A reply nobody asked for.
    ch.basic_publish(
        exchange.as_str().into(),
        "rpc.replies".into(),
        BasicPublishOptions::default(),
        json!({"online": false}).to_string().as_bytes(),
        BasicProperties::default().with_correlation_id("nope".into()),
    )
    .await
    .unwrap();
    let responder = ch.clone();
    let answering_exchange = exchange.clone();
    let answering = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let _ = request.acker.ack(BasicAckOptions::default()).await;
            let device = request
                .routing_key
                .as_str()
                .split('.')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let (Some(correlation), Some(reply_to)) = (
                request.properties.correlation_id().clone(),
                request.properties.reply_to().clone(),
            ) else {
                continue;
            };
            if device == "silent" {
                continue;
            }
            responder
                .basic_publish(
                    answering_exchange.as_str().into(),
                    reply_to.as_str().replace('/', ".").as_str().into(),
                    BasicPublishOptions::default(),
                    json!({"online": true, "device": device})
                        .to_string()
                        .as_bytes(),
                    BasicProperties::default().with_correlation_id(correlation),
                )
                .await
                .unwrap();
        }
    });
    check_calls(&daemon, &api, Duration::from_millis(1500)).await;
    assert!(!answering.is_finished(), "the responder stopped early");
    answering.abort();
    amqp_cleanup(&p, &["requests", "replies"]).await;
}
