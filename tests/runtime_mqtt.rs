//! `stepflow run` end to end against real Mosquitto: MQTT ⇄ routes ⇄ WebSocket / SSE / HTTP,
//! the sled log, crash and broker-restart recovery, validation, metrics and shutdown.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::SinkExt;
use rumqttc::QoS;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    _dir: tempfile::TempDir,
    api: String,
    prefix: String,
    daemon: Daemon,
}

impl Setup {
    /// A daemon on the machine's Mosquitto with a document of its own.
    async fn shared_broker(extra: &[&str]) -> Setup {
        require_mosquitto();
        let dir = tempfile::tempdir().unwrap();
        let api = unique("iot");
        let prefix = unique("t");
        let spec = iot_spec(dir.path(), &api, &prefix, 1);
        let mut args = vec![
            "--specs".to_owned(),
            spec.display().to_string(),
            "--server".to_owned(),
            "broker=mqtt://127.0.0.1:1883".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start(&args).await.unwrap();
        Setup {
            _dir: dir,
            api,
            prefix,
            daemon,
        }
    }

    fn channel(&self, name: &str) -> String {
        format!("{}.{name}", self.api)
    }

    fn topic(&self, device: &str, kind: &str) -> String {
        format!("{}/devices/{device}/{kind}", self.prefix)
    }
}

async fn publish(client: &MqttClient, topic: &str, payload: Value) {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reaches_three_websocket_and_two_sse_clients_with_params() {
    let s = Setup::shared_broker(&[]).await;
    let channel = s.channel("telemetry");
    let mut ws = Vec::new();
    for _ in 0..3 {
        ws.push(
            ws_connect(&s.daemon.ws_url(&format!("/ws/{channel}")))
                .await
                .unwrap(),
        );
    }
    let mut sse = Vec::new();
    for _ in 0..2 {
        sse.push(
            SseClient::connect(&s.daemon.url(&format!("/sse/{channel}")), None)
                .await
                .unwrap(),
        );
    }
    let device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    publish(
        &device,
        &s.topic("42", "telemetry"),
        json!({"temperature": 21.5}),
    )
    .await;

    for client in &mut ws {
        let frame = ws_next_json(client, WAIT).await.unwrap();
        assert_eq!(frame["params"], json!({"deviceId": "42"}));
        assert_eq!(frame["payload"]["temperature"], 21.5);
        assert_eq!(frame["address"], s.topic("42", "telemetry"));
        assert_eq!(frame["offset"], 1);
    }
    for client in &mut sse {
        let (id, frame) = client.next_message(WAIT).await.unwrap();
        assert_eq!(id, "1");
        assert_eq!(frame["params"]["deviceId"], "42");
        assert_eq!(frame["payload"]["temperature"], 21.5);
    }
    let log = s.daemon.replay_all(&channel, "messages").await.unwrap();
    assert_eq!(log.len(), 1);

    // The counters moved, and /metrics is valid Prometheus text.
    let received = s
        .daemon
        .metric(
            "stepflow_messages_received_total",
            &[("channel", &channel), ("transport", "mqtt")],
        )
        .await
        .unwrap();
    assert_eq!(received, 1.0);
    let delivered_ws = s
        .daemon
        .metric(
            "stepflow_messages_delivered_total",
            &[("channel", &channel), ("transport", "ws")],
        )
        .await
        .unwrap();
    assert_eq!(delivered_ws, 3.0);
    let delivered_sse = s
        .daemon
        .metric(
            "stepflow_messages_delivered_total",
            &[("channel", &channel), ("transport", "sse")],
        )
        .await
        .unwrap();
    assert_eq!(delivered_sse, 2.0);
    let subscribers = s
        .daemon
        .metric(
            "stepflow_subscribers",
            &[("channel", &channel), ("transport", "ws")],
        )
        .await
        .unwrap();
    assert_eq!(subscribers, 3.0);
    let text = reqwest::get(s.daemon.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "stepflow_delivery_latency_seconds_count{{channel=\"{channel}\",transport=\"ws\"}} 3"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_over_http_and_websocket_reach_the_device() {
    let s = Setup::shared_broker(&[]).await;
    let mut device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    device
        .subscribe(&format!("{}/devices/+/commands", s.prefix))
        .await
        .unwrap();
    let channel = s.channel("commands");

    let response = reqwest::Client::new()
        .post(
            s.daemon
                .url(&format!("/api/v1/channels/{channel}/messages?deviceId=42")),
        )
        .header("content-type", "application/json")
        .body(json!({"action": "reboot"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["offset"], 1);
    assert_eq!(body["address"], s.topic("42", "commands"));
    let received = device.recv(WAIT).await.unwrap();
    assert_eq!(received.topic, s.topic("42", "commands"));
    assert_eq!(
        serde_json::from_slice::<Value>(&received.payload).unwrap(),
        json!({"action": "reboot"})
    );

    // Over a WebSocket: the device id from a payload field this time.
    let mut ws = ws_connect(&s.daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"action": "identify", "deviceId": "7"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let ack = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["offset"], 2);
    let received = device.recv(WAIT).await.unwrap();
    assert_eq!(received.topic, s.topic("7", "commands"));

    // A bad frame gets an error frame and the socket stays open.
    ws.send(Message::Text(
        json!({"action": "explode", "deviceId": "7"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let error = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "invalid_payload");
    assert_eq!(error["status"], 400);
    ws.send(Message::Text(
        json!({"action": "reboot"}).to_string().into(),
    ))
    .await
    .unwrap();
    let error = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_address", "{error}");
    ws.send(Message::Text(
        json!({"action": "reboot", "deviceId": "8"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next_json(&mut ws, WAIT).await.unwrap()["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_websocket_clients_resume_without_gaps_or_duplicates() {
    let s = Setup::shared_broker(&[]).await;
    let channel = s.channel("telemetry");
    let topic = s.topic("9", "telemetry");
    let device = MqttClient::connect(1883, &unique("device")).await.unwrap();

    let mut sse = SseClient::connect(&s.daemon.url(&format!("/sse/{channel}")), None)
        .await
        .unwrap();
    for seq in 1..=3 {
        publish(&device, &topic, json!({"temperature": 20, "seq": seq})).await;
    }
    for expected in 1..=3u64 {
        let (id, frame) = sse.next_message(WAIT).await.unwrap();
        assert_eq!(id, expected.to_string());
        assert_eq!(frame["payload"]["seq"], expected);
    }
    drop(sse);

    for seq in 4..=7 {
        publish(&device, &topic, json!({"temperature": 20, "seq": seq})).await;
    }
    assert_eq!(s.daemon.wait_for_log(&channel, 7).await.len(), 7);

    let mut sse = SseClient::connect(&s.daemon.url(&format!("/sse/{channel}?from=1")), Some(3))
        .await
        .unwrap();
    for expected in 4..=7u64 {
        let (id, _) = sse.next_message(WAIT).await.unwrap();
        assert_eq!(id, expected.to_string(), "Last-Event-ID wins over ?from=");
    }
    let mut ws = ws_connect(&s.daemon.ws_url(&format!("/ws/{channel}?from=5")))
        .await
        .unwrap();
    for expected in 5..=7u64 {
        assert_eq!(
            ws_next_json(&mut ws, WAIT).await.unwrap()["offset"],
            expected
        );
    }
    // Then live, exactly once each.
    publish(&device, &topic, json!({"temperature": 20, "seq": 8})).await;
    let (id, _) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(id, "8");
    assert_eq!(ws_next_json(&mut ws, WAIT).await.unwrap()["offset"], 8);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sse.next_message(WAIT))
            .await
            .is_err(),
        "no duplicate after the live message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_stream_loses_no_acknowledged_message() {
    let broker = OwnMosquitto::start();
    let mut iot = IotDaemon::start(&broker, "crash").await;
    let (api, prefix) = (iot.api.clone(), iot.prefix.clone());
    let daemon = &mut iot.daemon;
    let channel = format!("{api}.telemetry");
    let total = 3000;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0);
    let publisher = tokio::spawn(publish_acknowledged(
        broker.port,
        format!("{prefix}/devices/1/telemetry"),
        0..total,
        1500,
        progress_tx,
    ));
    progress.wait_for(|acked| *acked >= 1000).await.unwrap();
    daemon.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.restart().await.unwrap();
    assert_eq!(
        publisher.await.unwrap(),
        total,
        "the broker acknowledged every publish"
    );

    let log = daemon.wait_for_log(&channel, total as usize).await;
    let (missing, duplicates) = sequence_report(&log, total);
    println!(
        "SIGKILL test: {total} acknowledged by the broker, {} logged, {} duplicates, {} missing",
        log.len(),
        duplicates,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} messages, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Offsets keep increasing; after the unclean stop they skip at most one log batch, so no
    // offset a client may have seen before the crash is reused.
    let offsets: Vec<u64> = log.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[1] > w[0]), "offsets increase");
    let jumps: Vec<u64> = offsets
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 1)
        .collect();
    assert!(
        jumps.len() <= 1 && jumps.iter().all(|d| *d <= 1001),
        "one gap of at most a batch: {jumps:?}"
    );
    assert!(
        daemon.log().contains("did not stop cleanly"),
        "the restart noticed the crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_reconnects_and_resubscribes_after_a_broker_restart() {
    let mut broker = OwnMosquitto::start();
    let mut iot = IotDaemon::start(&broker, "outage").await;
    let (api, prefix) = (iot.api.clone(), iot.prefix.clone());
    let daemon = &mut iot.daemon;
    let channel = format!("{api}.telemetry");
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();

    broker.stop();
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = client.get(daemon.url("/readyz")).send().await.unwrap();
        if r.status() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["connections"][0]["state"], "disconnected", "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Commands cannot be delivered: refused, not accepted and lost.
    let response = client
        .post(daemon.url(&format!(
            "/api/v1/channels/{api}.commands/messages?deviceId=1"
        )))
        .header("content-type", "application/json")
        .body(r#"{"action":"reboot"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    tokio::time::sleep(Duration::from_secs(2)).await;

    broker.restart();
    daemon.wait_ready(Duration::from_secs(15)).await.unwrap();
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    assert!(
        connections["connections"][0]["disconnects"]
            .as_u64()
            .unwrap()
            >= 1
    );

    let device = MqttClient::connect(broker.port, &unique("device"))
        .await
        .unwrap();
    // Subscriptions are restored right after CONNACK; allow the SUBACK a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(
        &device,
        &format!("{prefix}/devices/3/telemetry"),
        json!({"temperature": 5}),
    )
    .await;
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["params"]["deviceId"], "3");
    assert!(
        daemon
            .metric("stepflow_upstream_disconnects_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dead_lettered_or_refused_with_their_status() {
    let s = Setup::shared_broker(&["--max-payload-bytes", "2048"]).await;
    let telemetry = s.channel("telemetry");
    let commands = s.channel("commands");
    let device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    publish(
        &device,
        &s.topic("5", "telemetry"),
        json!({"temperature": "hot"}),
    )
    .await;
    publish(
        &device,
        &s.topic("5", "telemetry"),
        json!({"temperature": 3}),
    )
    .await;

    let deadline = std::time::Instant::now() + WAIT;
    let dead = loop {
        let dead = s
            .daemon
            .replay_all(&telemetry, "dead-letters")
            .await
            .unwrap();
        if !dead.is_empty() || std::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"]["temperature"], "hot");
    assert!(
        dead[0]["dead_letter_reason"]
            .as_str()
            .unwrap()
            .contains("/temperature"),
        "{}",
        dead[0]
    );
    assert_eq!(
        s.daemon.wait_for_log(&telemetry, 1).await.len(),
        1,
        "the valid one is logged"
    );
    assert_eq!(
        s.daemon
            .metric("stepflow_dead_letters_total", &[("channel", &telemetry)])
            .await
            .unwrap(),
        1.0
    );

    let client = reqwest::Client::new();
    let post = |channel: String, query: &'static str, content_type: &'static str, body: String| {
        let client = client.clone();
        let url = s
            .daemon
            .url(&format!("/api/v1/channels/{channel}/messages{query}"));
        async move {
            let r = client
                .post(url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = post(
        commands.clone(),
        "?deviceId=1",
        "application/json",
        json!({"action": 5}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_payload");
    assert_eq!(body["error"]["details"]["instancePath"], "/action");
    assert_eq!(
        body["error"]["details"]["schemaPath"],
        "/properties/action/type"
    );

    let (status, body) = post(
        commands.clone(),
        "?deviceId=1",
        "application/json",
        "{not json".into(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_payload"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let (status, body) = post(
        commands.clone(),
        "?deviceId=1",
        "application/json",
        format!("{{\"action\":\"{}\"}}", "x".repeat(4096)),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    let (status, body) = post(
        format!("{}.nope", s.api),
        "",
        "application/json",
        "{}".into(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    let (status, body) = post(
        telemetry.clone(),
        "",
        "application/json",
        json!({"temperature": 1}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let (status, body) = post(
        commands.clone(),
        "?deviceId=1",
        "text/plain",
        json!({"action": "reboot"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    let (status, body) = post(
        commands.clone(),
        "?deviceId=a/b",
        "application/json",
        json!({"action": "reboot"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_address"))
    );

    let r = client
        .get(s.daemon.url("/api/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let r = client
        .get(
            s.daemon
                .url(&format!("/api/v1/channels/{telemetry}/messages?from=abc")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );

    // The two invalid payloads and the oversized one above, counted by reason.
    let rejected = |reason: &'static str| {
        let commands = commands.clone();
        let daemon = &s.daemon;
        async move {
            daemon
                .metric(
                    "stepflow_messages_rejected_total",
                    &[("channel", &commands), ("reason", reason)],
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(rejected("invalid_payload").await, 2.0);
    assert_eq!(rejected("too_large").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_client_streams_and_exits_cleanly() {
    let mut s = Setup::shared_broker(&[]).await;
    let channel = s.channel("telemetry");
    let mut ws = ws_connect(&s.daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    let mut sse = SseClient::connect(&s.daemon.url(&format!("/sse/{channel}")), None)
        .await
        .unwrap();
    let (status, took) = s.daemon.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let close = loop {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    assert!(sse.next(WAIT).await.is_err(), "the SSE stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_websocket_client_is_told_and_resumed_from_the_log() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("lag");
    let prefix = unique("t");
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, "live_buffer: 16\n").unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        spec.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--server",
        "broker=mqtt://127.0.0.1:1883",
    ])
    .await
    .unwrap();
    let channel = format!("{api}.telemetry");
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    let device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    // Large messages fill the socket buffers quickly while the client does not read.
    let count = 600u64;
    let pad = "x".repeat(32 * 1024);
    for seq in 1..=count {
        publish(
            &device,
            &format!("{prefix}/devices/1/telemetry"),
            json!({"temperature": 1, "seq": seq, "pad": pad}),
        )
        .await;
    }
    assert_eq!(
        daemon.wait_for_log(&channel, count as usize).await.len(),
        count as usize
    );

    let mut offsets = Vec::new();
    let mut lagged = 0;
    while offsets.len() < count as usize {
        let frame = ws_next_json(&mut ws, Duration::from_secs(20))
            .await
            .unwrap();
        if frame["type"] == "lagged" {
            lagged += 1;
            continue;
        }
        offsets.push(frame["offset"].as_u64().unwrap());
    }
    let unique_offsets: HashSet<u64> = offsets.iter().copied().collect();
    assert_eq!(
        offsets,
        (1..=count).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert_eq!(unique_offsets.len(), count as usize);
    assert!(lagged >= 1, "the client was told it lagged");
    assert!(
        daemon
            .metric(
                "stepflow_subscribers_lagged_total",
                &[("channel", &channel)]
            )
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_broker_with_credentials_from_the_environment() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let passwords = certs.path().join("passwd");
    std::fs::write(&passwords, "").unwrap();
    for (user, password) in [("gateway", "gw-s3cret"), ("device", "dev-s3cret")] {
        let out = std::process::Command::new("mosquitto_passwd")
            .args(["-b", passwords.to_str().unwrap(), user, password])
            .output()
            .expect("mosquitto_passwd runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    readable_by_all(certs.path());
    let c = certs.path();
    let broker = OwnMosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}",
        c.join("ca.pem").display(),
        c.join("server.pem").display(),
        c.join("server.key").display(),
        passwords.display()
    ));
    let dir = tempfile::tempdir().unwrap();
    let api = unique("tls");
    let prefix = unique("t");
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  broker:\n    url: mqtts://127.0.0.1:{}\n    username: gateway\n    password: ${{STEPFLOW_TEST_MQTT_PASSWORD}}\n    ca_file: {}\n",
            broker.port,
            c.join("ca.pem").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_with_env(
        &[
            "--specs",
            spec.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[("STEPFLOW_TEST_MQTT_PASSWORD", "gw-s3cret")],
    )
    .await
    .unwrap();
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    assert_eq!(
        connections["connections"][0]["url"],
        format!("mqtts://127.0.0.1:{}", broker.port)
    );
    assert!(
        !daemon.log().contains("gw-s3cret"),
        "the password never reaches the log"
    );

    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{api}.telemetry")))
        .await
        .unwrap();
    let mut options = rumqttc::MqttOptions::new(unique("device"), "127.0.0.1", broker.port);
    options.set_credentials("device", "dev-s3cret");
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::SimpleNative {
            ca: std::fs::read(c.join("ca.pem")).unwrap(),
            client_auth: None,
        },
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    client
        .publish(
            format!("{prefix}/devices/tls1/telemetry"),
            QoS::AtLeastOnce,
            false,
            r#"{"temperature": 7}"#,
        )
        .await
        .unwrap();
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["params"]["deviceId"], "tls1");
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_messages_unacknowledged_and_they_are_redelivered_when_space_returns() {
    let broker = OwnMosquitto::start();
    let disk = SmallDisk::mount(16);
    let dir = tempfile::tempdir().unwrap();
    let api = unique("full");
    let prefix = unique("t");
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    let server = format!("broker={}", broker.url());
    let daemon = Daemon::start_in(
        &disk.path.join("data"),
        &["--specs", spec.to_str().unwrap(), "--server", &server],
    )
    .await
    .unwrap();
    let channel = format!("{api}.telemetry");
    let topic = format!("{prefix}/devices/1/telemetry");
    let (progress, _) = tokio::sync::watch::channel(0);
    publish_acknowledged(broker.port, topic.clone(), 0..5, 1000, progress.clone()).await;
    assert_eq!(daemon.wait_for_log(&channel, 5).await.len(), 5);

    let filler = disk.fill();
    let total = 25;
    publish_acknowledged(broker.port, topic, 5..total, 1000, progress).await;
    wait_for_log_failure(&daemon).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    free_disk_and_check_the_log(&daemon, &filler, &channel, total, "MQTT").await;
    assert!(
        daemon
            .log()
            .contains("reconnecting so that the broker redelivers"),
        "the messages came back by a session resume"
    );
}

/// A document with a `broker` the gateway needs and a `lake` it can do without.
fn two_server_spec(dir: &std::path::Path, api: &str, prefix: &str, lake_optional: bool) -> String {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Optional lake, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
  lake: {{host: 'lake.example:1883', protocol: mqtt, x-stepflow-optional: {lake_optional}}}
channels:
  telemetry:
    address: '{prefix}/telemetry'
    servers: [{{$ref: '#/servers/broker'}}]
    messages: {{reading: {{payload: {{type: object}}}}}}
  archive:
    address: '{prefix}/archive'
    servers: [{{$ref: '#/servers/lake'}}]
    messages: {{reading: {{payload: {{type: object}}}}}}
operations:
  receiveTelemetry: {{action: receive, channel: {{$ref: '#/channels/telemetry'}}}}
  receiveArchive: {{action: receive, channel: {{$ref: '#/channels/archive'}}}}
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_marks_servers_optional_and_channels_show_the_url_in_use() {
    let broker = OwnMosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (api, prefix) = (unique("lake"), unique("t"));
    let dead = free_port();
    // The document does not say the lake is optional; the operator's config does.
    let spec = two_server_spec(dir.path(), &api, &prefix, false);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  broker:\n    url: {}\n  lake:\n    url: mqtt://127.0.0.1:{dead}\n    optional: true\n",
            broker.url()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&["--specs", &spec, "--config", config.to_str().unwrap()])
        .await
        .expect("ready although the optional lake is down");
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    let lake = connections["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["server"] == "lake")
        .unwrap();
    assert_eq!(lake["optional"], true, "{connections}");
    assert_ne!(lake["state"], "connected", "{connections}");

    // The channel shows where the gateway really connects, and what the document said.
    let channel = daemon
        .get_json(&format!("/api/v1/channels/{api}.telemetry"))
        .await
        .unwrap();
    let server = &channel["servers"][0];
    assert_eq!(server["url"], broker.url(), "{channel}");
    assert!(
        server["documentUrl"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1883"),
        "{channel}"
    );
    let listed = daemon.get_json("/api/v1/channels").await.unwrap();
    let archive = listed["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == format!("{api}.archive"))
        .unwrap();
    assert_eq!(
        archive["servers"][0]["url"],
        format!("mqtt://127.0.0.1:{dead}"),
        "{archive}"
    );
    // A log written to a file carries no terminal colour codes.
    let log = daemon.log();
    assert!(log.contains("upstream connected"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a file log:\n{log}"
    );

    // And the config wins the other way too: a server the document calls optional is required.
    let spec = two_server_spec(dir.path(), &api, &prefix, true);
    std::fs::write(
        &config,
        format!(
            "servers:\n  broker:\n    url: {}\n  lake:\n    url: mqtt://127.0.0.1:{dead}\n    optional: false\n",
            broker.url()
        ),
    )
    .unwrap();
    let strict = Daemon::start_serving(&["--specs", &spec, "--config", config.to_str().unwrap()])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ready = reqwest::get(strict.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "a required lake that is down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_wildcard_channels_and_yaml_words_delivers_what_devices_send() {
    let broker = OwnMosquitto::start();
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/documents/device-fleet-mqtt-3.1.yaml");
    let server = format!("broker={}", broker.url());
    let daemon = Daemon::start(&["--specs", spec.to_str().unwrap(), "--server", &server])
        .await
        .unwrap();
    // Ready means connected; give the broker the SUBACK's moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut device = MqttClient::connect(broker.port, &unique("device"))
        .await
        .unwrap();
    device.subscribe("fleet/devices/+/commands").await.unwrap();
    publish(
        &device,
        "fleet/devices/d1/data",
        json!({"state": "on", "level": 3}),
    )
    .await;
    publish(&device, "fleet/devices/d2/data", json!({"state": "maybe"})).await;
    publish(&device, "fleet/devices/u7/limits/max", json!({"value": 9})).await;
    publish(&device, "fleet/site/hall/3/temp", json!({"t": 21})).await;

    let api = "device-fleet-mqtt-3-1";
    let data = daemon.wait_for_log(&format!("{api}.data"), 1).await;
    assert_eq!(data.len(), 1, "{data:?}");
    assert_eq!(data[0]["payload"]["state"], "on", "a YAML `on` is a string");
    assert_eq!(data[0]["address"], "fleet/devices/d1/data");
    let dead = daemon
        .replay_all(&format!("{api}.data"), "dead-letters")
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["payload"]["state"], "maybe");
    let limits = daemon.wait_for_log(&format!("{api}.limits"), 1).await;
    assert_eq!(limits[0]["params"]["uuid"], "u7", "{limits:?}");
    assert_eq!(limits[0]["address"], "fleet/devices/u7/limits/max");
    let site = daemon.wait_for_log(&format!("{api}.site"), 1).await;
    assert_eq!(site[0]["address"], "fleet/site/hall/3/temp");

    // The command's enum value `on` is a string too.
    let r = reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/channels/{api}.commands/messages?uuid=u7")))
        .header("content-type", "application/json")
        .body(json!({"action": "on"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let command = device.recv(WAIT).await.unwrap();
    assert_eq!(command.topic, "fleet/devices/u7/commands");
    let body: Value = serde_json::from_slice(&command.payload).unwrap();
    assert_eq!(body["action"], "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_one_client_id_back_off_and_say_so_instead_of_flapping() {
    let broker = OwnMosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (api, p) = (unique("twin"), unique("t"));
    let spec = iot_spec(dir.path(), &api, &p, 1);
    let server = format!("{api}/broker={}", broker.url());
    let args = ["--specs", spec.to_str().unwrap(), "--server", &server];
    let first = Daemon::start(&args).await.unwrap();
    let second = Daemon::start(&args).await.unwrap();
    // Both use the client id the document gives: the broker hands the session to the newest
    // connection and drops the other, each time.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let connects = |d: &Daemon| {
        d.log()
            .matches(&format!("upstream connected server=\"{api}/broker\""))
            .count()
    };
    let (a, b) = (connects(&first), connects(&second));
    eprintln!("connects in 8 s with one client id: {a} + {b}");
    // Without the backoff the pair took the session from each other every few milliseconds
    // (hundreds of connects in 8 s); with it, each waits up to 5 s between attempts.
    assert!(a + b < 30, "{a} + {b} connects in 8 s");
    let warned = |d: &Daemon| {
        d.log()
            .contains("is another client using the same client id?")
    };
    assert!(
        warned(&first) || warned(&second),
        "{}\n{}",
        first.log(),
        second.log()
    );
}
