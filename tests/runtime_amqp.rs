//! The AMQP connector against the machine's RabbitMQ (each test with its own exchange and
//! queues, deleted afterwards), with the daemon as a process.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(15);

async fn start(dir: &std::path::Path, api: &str, prefix: &str) -> Daemon {
    require_rabbitmq();
    let spec = amqp_spec(dir, api, prefix);
    Daemon::start(&["--specs", spec.to_str().unwrap()])
        .await
        .unwrap()
}

async fn publish(channel: &lapin::Channel, prefix: &str, routing_key: &str, payload: &Value) {
    let mut headers = FieldTable::default();
    headers.insert(
        "trace-id".into(),
        AMQPValue::LongString(LongString::from("abc-123")),
    );
    channel
        .basic_publish(
            format!("{prefix}.events").as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            payload.to_string().as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_correlation_id("corr-1".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_websocket_sse_and_the_log_with_routing_key_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    let api = unique("ain");
    let prefix = unique("a");
    let daemon = start(dir.path(), &api, &prefix).await;
    let channel = format!("{api}.telemetry");
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{channel}")), None)
        .await
        .unwrap();
    let (_conn, ch) = amqp_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(
        &ch,
        &prefix,
        "devices.42.telemetry",
        &json!({"temperature": 22.5}),
    )
    .await;

    // An invalid one goes to the dead-letter log and is acknowledged (not redelivered).
    publish(
        &ch,
        &prefix,
        "devices.42.telemetry",
        &json!({"temperature": "warm"}),
    )
    .await;
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["params"]["deviceId"], "42");
    assert_eq!(frame["payload"]["temperature"], 22.5);
    assert_eq!(frame["headers"]["amqp_routing_key"], "devices.42.telemetry");
    assert_eq!(frame["headers"]["amqp_correlation_id"], "corr-1");
    assert_eq!(frame["headers"]["amqp_delivery_mode"], "2");
    assert_eq!(frame["headers"]["trace-id"], "abc-123");
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["headers"]["amqp_routing_key"], "devices.42.telemetry");
    assert_eq!(daemon.wait_for_log(&channel, 1).await.len(), 1);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let dead = daemon.replay_all(&channel, "dead-letters").await.unwrap();
        if dead.len() == 1 {
            assert_eq!(dead[0]["payload"]["temperature"], "warm");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queue = ch
        .queue_declare(
            format!("{prefix}.telemetry").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        queue.message_count(),
        0,
        "both deliveries were acknowledged"
    );
    amqp_cleanup(&prefix, &["telemetry"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_and_websocket_frames_reach_an_independent_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let api = unique("aout");
    let prefix = unique("a");
    let daemon = start(dir.path(), &api, &prefix).await;
    let (_conn, ch) = amqp_channel().await.unwrap();
    let queue = format!("{prefix}.cmdq");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Only device 42 and 9 have a consumer: others are unroutable.
    for key in ["devices.42.commands", "devices.9.commands"] {
        ch.queue_bind(
            queue.as_str().into(),
            format!("{prefix}.events").as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let audit = format!("{prefix}.audit");
    ch.queue_declare(
        audit.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        audit.as_str().into(),
        format!("{prefix}.events").as_str().into(),
        "audit.commands".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let channel = format!("{api}.commands");
    let client = reqwest::Client::new();
    let response = client
        .post(daemon.url(&format!("/api/v1/channels/{channel}/messages?deviceId=42")))
        .header("content-type", "application/json")
        .header("x-header-trace-id", "t-7")
        .body(json!({"action": "reboot"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.routing_key.as_str(), "devices.42.commands");
    assert_eq!(delivery.properties.priority(), &Some(5));
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    let trace = delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get("trace-id")
        .cloned();
    assert_eq!(trace, Some(AMQPValue::LongString(LongString::from("t-7"))));
    assert_eq!(
        delivery
            .properties
            .expiration()
            .as_ref()
            .map(|e| e.as_str()),
        Some("60000")
    );
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    // The operation binding's cc: a copy under the `audit.commands` routing key.
    let copy = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(m) = ch
                .basic_get(
                    audit.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(copy.delivery.routing_key.as_str(), "devices.42.commands");

    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}?deviceId=9")))
        .await
        .unwrap();
    ws.send(WsMessage::Text(
        json!({"action": "identify"}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next_json(&mut ws, WAIT).await.unwrap()["type"], "ack");
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.routing_key.as_str(), "devices.9.commands");

    // Mandatory and unroutable: returned by the broker, reported, not accepted. (The cc copy
    // would make any message routable while the audit queue exists.)
    ch.queue_delete(
        audit.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let response = client
        .post(daemon.url(&format!(
            "/api/v1/channels/{channel}/messages?deviceId=1000"
        )))
        .header("content-type", "application/json")
        .body(json!({"action": "reboot"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unroutable"),
        "{body}"
    );
    amqp_cleanup(&prefix, &["telemetry", "cmdq", "audit"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_stream_loses_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let api = unique("acrash");
    let prefix = unique("a");
    let mut daemon = start(dir.path(), &api, &prefix).await;
    let channel = format!("{api}.telemetry");
    let (_conn, ch) = amqp_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let total = 2000u64;
    for seq in 0..total / 2 {
        publish(
            &ch,
            &prefix,
            "devices.1.telemetry",
            &json!({"temperature": 1, "seq": seq}),
        )
        .await;
    }
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
        publish(
            &ch,
            &prefix,
            "devices.1.telemetry",
            &json!({"temperature": 1, "seq": seq}),
        )
        .await;
    }
    daemon.restart().await.unwrap();
    let log = daemon.wait_for_log(&channel, total as usize).await;
    let (missing, duplicates) = sequence_report(&log, total);
    let redelivered = log
        .iter()
        .filter(|m| m["headers"]["amqp_redelivered"] == "true")
        .count();
    println!(
        "AMQP SIGKILL test: {total} confirmed, {} logged, {duplicates} duplicates ({redelivered} redelivered), {} missing",
        log.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {}: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    amqp_cleanup(&prefix, &["telemetry"]).await;
}
