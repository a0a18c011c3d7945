//! The AMQP connector against the machine's RabbitMQ (each test with its own exchange and
//! queues, deleted afterwards), with the daemon as a process.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions,
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

/// Declares `{prefix}.{name}` bound to the test's exchange with `keys`.
async fn declare_bound(ch: &lapin::Channel, prefix: &str, name: &str, keys: &[&str]) -> String {
    let queue = format!("{prefix}.{name}");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for key in keys {
        ch.queue_bind(
            queue.as_str().into(),
            format!("{prefix}.events").as_str().into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    queue
}

/// A consumer of `queue` with manual acks.
async fn consume(ch: &lapin::Channel, queue: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        "test".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
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
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
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
    // Only device 42 and 9 have a consumer: others are unroutable.
    let queue = declare_bound(
        &ch,
        &prefix,
        "cmdq",
        &["devices.42.commands", "devices.9.commands"],
    )
    .await;
    let audit = declare_bound(&ch, &prefix, "audit", &["audit.commands"]).await;
    let mut consumer = consume(&ch, &queue).await;
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
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
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

/// A TLS listener added to the running RabbitMQ on a port of the test's own (RabbitMQ reads its
/// listeners at boot; `rabbit_networking` starts one at run time without a restart), stopped
/// when dropped.
struct RabbitTlsListener {
    port: u16,
}

impl RabbitTlsListener {
    fn start(certs: &std::path::Path) -> RabbitTlsListener {
        let port = free_port();
        let file = |name: &str| certs.join(name).display().to_string();
        rabbitmqctl_eval(&format!(
            r#"rabbit_networking:start_ssl_listener({{"127.0.0.1", {port}}}, [{{certfile, "{}"}}, {{keyfile, "{}"}}, {{cacertfile, "{}"}}], 1)."#,
            file("server.pem"),
            file("server.key"),
            file("ca.pem")
        ));
        RabbitTlsListener { port }
    }
}

impl Drop for RabbitTlsListener {
    fn drop(&mut self) {
        rabbitmqctl_eval(&format!(
            r#"rabbit_networking:stop_tcp_listener({{"127.0.0.1", {}}})."#,
            self.port
        ));
    }
}

fn rabbitmqctl_eval(expression: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", expression])
        .output()
        .expect("rabbitmqctl runs (it comes with rabbitmq-server)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "rabbitmqctl eval {expression}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_credentials_from_the_environment() {
    require_rabbitmq();
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    readable_by_all(certs.path());
    let tls = RabbitTlsListener::start(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let api = unique("atls");
    let prefix = unique("a");
    let spec = amqp_spec(dir.path(), &api, &prefix);
    let config = |ca: bool| {
        let path = dir.path().join(format!("stepflow-{ca}.yaml"));
        let mut text = format!(
            "servers:\n  rabbit:\n    url: amqps://127.0.0.1:{}\n    username: guest\n    password: ${{STEPFLOW_TEST_AMQP_PASSWORD}}\n",
            tls.port
        );
        if ca {
            text.push_str(&format!(
                "    ca_file: {}\n",
                certs.path().join("ca.pem").display()
            ));
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let env = [("STEPFLOW_TEST_AMQP_PASSWORD", "guest")];

    // Without the CA the broker's certificate is refused: TLS is verified, not just on.
    let untrusting = config(false);
    let refused = Daemon::start_serving_with_env(
        &[
            "--specs",
            spec.to_str().unwrap(),
            "--config",
            untrusting.to_str().unwrap(),
        ],
        &env,
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let c = refused.get_json("/api/v1/connections").await.unwrap();
        let c = &c["connections"][0];
        if let Some(error) = c["last_error"].as_str() {
            assert_eq!(c["state"], "disconnected", "{c}");
            assert!(
                error.to_lowercase().contains("certificate"),
                "the error names the certificate: {error}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no TLS error: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest::get(refused.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    drop(refused);

    let trusting = config(true);
    let daemon = Daemon::start_with_env(
        &[
            "--specs",
            spec.to_str().unwrap(),
            "--config",
            trusting.to_str().unwrap(),
        ],
        &env,
    )
    .await
    .unwrap();
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    assert_eq!(
        connections["connections"][0]["url"],
        format!("amqps://127.0.0.1:{}", tls.port)
    );
    assert_eq!(connections["connections"][0]["state"], "connected");
    let in_tls = rabbitmq_tls_connections();
    assert!(in_tls >= 1, "RabbitMQ sees the gateway over TLS");

    // Both ways over the TLS connection: a delivery to WebSocket, a POST to a consumer.
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{api}.telemetry")))
        .await
        .unwrap();
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
    publish(
        &ch,
        &prefix,
        "devices.t1.telemetry",
        &json!({"temperature": 3}),
    )
    .await;
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["params"]["deviceId"], "t1");
    let queue = declare_bound(&ch, &prefix, "cmdq", &["devices.t1.commands"]).await;
    let mut consumer = consume(&ch, &queue).await;
    let response = reqwest::Client::new()
        .post(daemon.url(&format!(
            "/api/v1/channels/{api}.commands/messages?deviceId=t1"
        )))
        .header("content-type", "application/json")
        .body(json!({"action": "reboot"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.routing_key.as_str(), "devices.t1.commands");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    assert!(!daemon.log().contains("STEPFLOW_TEST_AMQP_PASSWORD=guest"));
    amqp_cleanup(&prefix, &["telemetry", "cmdq", "audit"]).await;
}

/// How many client connections RabbitMQ has over TLS.
fn rabbitmq_tls_connections() -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "ssl", "--quiet", "--no-table-headers"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == "true")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_nacks_deliveries_with_requeue_and_the_log_heals_when_space_returns() {
    require_rabbitmq();
    let disk = SmallDisk::mount(16);
    let dir = tempfile::tempdir().unwrap();
    let api = unique("afull");
    let prefix = unique("a");
    let spec = amqp_spec(dir.path(), &api, &prefix);
    let daemon = Daemon::start_in(
        &disk.path.join("data"),
        &["--specs", spec.to_str().unwrap()],
    )
    .await
    .unwrap();
    let channel = format!("{api}.telemetry");
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
    let send = |seq: u64| {
        let ch = ch.clone();
        let prefix = prefix.clone();
        async move {
            publish(
                &ch,
                &prefix,
                "devices.7.telemetry",
                &json!({"temperature": 1, "seq": seq}),
            )
            .await
        }
    };
    let total = 25;
    let filler = send_while_the_disk_fills(&daemon, &disk, &channel, total, send).await;
    let replay = reqwest::get(daemon.url(&format!("/api/v1/channels/{channel}/messages?from=0")))
        .await
        .unwrap();
    assert_eq!(replay.status(), 503, "reads say the log is unavailable");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Space comes back: the log reopens by itself and the requeued deliveries are logged.
    let log = free_disk_and_check_the_log(&daemon, &filler, &channel, total, "AMQP").await;
    let requeued = log
        .iter()
        .filter(|m| m["payload"]["seq"].as_u64().unwrap() >= 5)
        .filter(|m| m["headers"]["amqp_redelivered"] == "true")
        .count();
    println!("AMQP full-disk test: {requeued} logged from a redelivery");
    assert!(
        requeued >= 1,
        "deliveries that could not be logged were nacked with requeue and came back"
    );
    let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        daemon.metric("stepflow_log_available", &[]).await.unwrap(),
        1.0
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
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
        if queue.message_count() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deliveries left in the queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(daemon);
    amqp_cleanup(&prefix, &["telemetry"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_is_followed_on_the_connection_and_unchanged_routes_see_every_message_once() {
    require_rabbitmq();
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    iot_spec(&specs, &unique("base"), &unique("b"), 1);
    let daemon = Daemon::start(&["--specs", specs.to_str().unwrap()])
        .await
        .unwrap();
    let (api, prefix) = (unique("afollow"), unique("f"));
    let staging = tempfile::tempdir().unwrap();
    let v1 = std::fs::read_to_string(amqp_spec(staging.path(), &api, &prefix)).unwrap();
    // Version 2 adds a readable `alerts` channel with a queue of its own.
    let v2 = v1
        .replace(
            "  commands:\n",
            &format!(
                "  alerts:\n    address: 'devices/{{deviceId}}/alerts'\n    bindings:\n      amqp:\n        is: routingKey\n        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}\n        queue: {{name: {prefix}.alerts, durable: true, exclusive: false, autoDelete: false}}\n    messages:\n      alert: {{payload: {{type: object}}}}\n  commands:\n"
            ),
        )
        .replace(
            "  sendCommand:\n",
            "  receiveAlerts:\n    action: receive\n    channel: {$ref: '#/channels/alerts'}\n  sendCommand:\n",
        );
    assert_ne!(v1, v2);
    daemon.add_spec(&format!("{api}.yaml"), &v1).await;
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{api}.telemetry")))
        .await
        .unwrap();
    let connected = || {
        daemon
            .log()
            .matches(&format!("upstream connected server=\"{api}/rabbit\""))
            .count()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while connected() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 600 confirmed messages on `telemetry`; version 2 lands a third of the way in.
    const COUNT: u64 = 600;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let (sent, prefix) = (sent.clone(), prefix.clone());
        tokio::spawn(async move {
            let (_conn, ch) = amqp_confirm_channel().await.unwrap();
            for seq in 0..COUNT {
                publish(
                    &ch,
                    &prefix,
                    "devices.1.telemetry",
                    &json!({"temperature": 1, "seq": seq}),
                )
                .await;
                sent.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    while sent.load(std::sync::atomic::Ordering::Relaxed) < COUNT / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let replaced = daemon.replace_spec(&api, &v2).await;
    assert_eq!(replaced["reconnected"], false, "{replaced}");
    assert_eq!(
        replaced["diff"]["channels"]["added"],
        json!([format!("{api}.alerts")])
    );
    publisher.await.unwrap();
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < COUNT {
        let frame = ws_next_json(&mut ws, WAIT)
            .await
            .unwrap_or_else(|e| panic!("after {} of {COUNT}: {e}", seqs.len()));
        assert_eq!(frame["headers"]["amqp_redelivered"], "false", "{frame}");
        seqs.push(frame["payload"]["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seqs,
        (0..COUNT).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert_eq!(connected(), 1, "the connection stayed:\n{}", daemon.log());

    // The new channel is consumed on the same connection.
    let mut alerts = SseClient::connect(&daemon.url(&format!("/sse/{api}.alerts")), None)
        .await
        .unwrap();
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
    publish(&ch, &prefix, "devices.7.alerts", &json!({"level": "high"})).await;
    let (_, frame) = alerts.next_message(WAIT).await.unwrap();
    assert_eq!(frame["params"]["deviceId"], "7", "{frame}");

    // Back to version 1: the alerts consumer is cancelled; telemetry goes on.
    daemon.replace_spec(&api, &v1).await;
    assert!(
        daemon.log().contains(&format!(
            "AMQP connector follows the document's new routes server={api}/rabbit added=0 removed=1"
        )),
        "{}",
        daemon.log()
    );
    publish(
        &ch,
        &prefix,
        "devices.1.telemetry",
        &json!({"temperature": 1, "seq": COUNT}),
    )
    .await;
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["payload"]["seq"], COUNT);
    assert_eq!(connected(), 1, "{}", daemon.log());
    amqp_cleanup(&prefix, &["telemetry", "alerts"]).await;
}
