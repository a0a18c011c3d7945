//! RabbitMQ's application stopped and started under a running daemon. In a test binary of its
//! own: `rabbitmqctl stop_app` affects every AMQP client of the machine, and cargo runs test
//! binaries one after another, so no other AMQP test is running meanwhile.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};

fn rabbitmqctl(command: &str) {
    let out = Command::new("rabbitmqctl")
        .arg(command)
        .output()
        .expect("rabbitmqctl runs (Debian package rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the app again even if the test fails half-way.
struct Restart;
impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_recovers_after_rabbitmq_stop_app_and_start_app() {
    require_rabbitmq();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("aoutage");
    let prefix = unique("a");
    let spec = amqp_spec(dir.path(), &api, &prefix);
    let mut daemon = Daemon::start(&["--specs", spec.to_str().unwrap()])
        .await
        .unwrap();
    let channel = format!("{api}.telemetry");
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();

    let _guard = Restart;
    rabbitmqctl("stop_app");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client.get(daemon.url("/readyz")).send().await.unwrap();
        if r.status() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["connections"][0]["state"], "disconnected", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never showed the outage");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let response = client
        .post(daemon.url(&format!(
            "/api/v1/channels/{api}.commands/messages?deviceId=1"
        )))
        .header("content-type", "application/json")
        .body(r#"{"action":"reboot"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "nothing accepted while the broker is away"
    );
    rabbitmqctl("start_app");
    daemon.wait_ready(Duration::from_secs(60)).await.unwrap();

    // The topology was declared again and the consumer resumed.
    let (_conn, ch) = amqp_confirm_channel().await.unwrap();
    ch.basic_publish(
        format!("{prefix}.events").as_str().into(),
        "devices.5.telemetry".into(),
        BasicPublishOptions::default(),
        json!({"temperature": 5}).to_string().as_bytes(),
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let frame = ws_next_json(&mut ws, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(frame["params"]["deviceId"], "5");
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    assert!(
        connections["connections"][0]["disconnects"]
            .as_u64()
            .unwrap()
            >= 1
    );
    amqp_cleanup(&prefix, &["telemetry"]).await;
}
