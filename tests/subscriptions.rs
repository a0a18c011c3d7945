//! Durable subscriptions against the daemon as a process and the machine's Mosquitto: a named
//! cursor that WebSocket and SSE clients attach to, moved by their acks, kept across client
//! disconnects and a daemon crash.

mod common;

use std::time::Duration;

use common::*;
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(10);

async fn publish_readings(prefix: &str, seqs: std::ops::Range<u64>) {
    let (tx, _rx) = tokio::sync::watch::channel(0);
    let topic = format!("{prefix}/devices/d1/telemetry");
    publish_acknowledged(1883, topic, seqs, 2000, tx).await;
}

async fn post(daemon: &Daemon, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(daemon.url("/api/v1/subscriptions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The next `n` frames' (offset, seq).
async fn next_frames(ws: &mut WsStream, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let f = ws_next_json(ws, WAIT).await.unwrap();
        out.push((
            f["offset"].as_u64().unwrap(),
            f["payload"]["seq"].as_u64().unwrap(),
        ));
    }
    out
}

fn seqs(frames: &[(u64, u64)]) -> Vec<u64> {
    frames.iter().map(|(_, s)| *s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_resumes_after_disconnects_and_a_crash_with_no_gap() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (api, prefix) = (unique("sub"), unique("s"));
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    let mut daemon = Daemon::start(&["--specs", spec.to_str().unwrap()])
        .await
        .unwrap();
    let channel = format!("{api}.telemetry");

    // Create (idempotent), and the refusals.
    let (status, created) = post(&daemon, json!({"name": "billing", "channel": channel})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["cursor"], 1);
    let (status, _) = post(&daemon, json!({"name": "billing", "channel": channel})).await;
    assert_eq!(status, 200, "the same definition again is not an error");
    let (status, body) = post(
        &daemon,
        json!({"name": "billing", "channel": channel, "filter": "true"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = post(&daemon, json!({"name": "x", "channel": "nope.nope"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(
        &daemon,
        json!({"name": "x", "channel": channel, "filter": "payload.seq >"}),
    )
    .await;
    assert!(
        status == 400 && body.to_string().contains("CEL"),
        "{status} {body}"
    );
    let (status, _) = post(&daemon, json!({"name": "bad name!", "channel": channel})).await;
    assert_eq!(status, 400);

    publish_readings(&prefix, 0..10).await;
    daemon.wait_for_log(&channel, 10).await;

    // First client: everything from the cursor; it acks the fifth message and goes away.
    let url = daemon.ws_url(&format!("/ws/{channel}?subscription=billing"));
    let mut ws = ws_connect(&url).await.unwrap();
    let first = next_frames(&mut ws, 10).await;
    assert_eq!(seqs(&first), (0..10).collect::<Vec<_>>());
    let fifth = first[4].0;
    ws.send(WsMessage::Text(json!({"ack": fifth}).to_string().into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(ws);
    let view = daemon
        .get_json("/api/v1/subscriptions/billing")
        .await
        .unwrap();
    assert_eq!(view["cursor"], fifth + 1, "{view}");
    assert_eq!(view["lag"], 5, "{view}");
    // Operators see it in Prometheus too (set every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while daemon
        .metric(
            "stepflow_subscription_lag_messages",
            &[("subscription", "billing")],
        )
        .await
        .unwrap_or(-1.0)
        != 5.0
    {
        assert!(std::time::Instant::now() < deadline, "no lag gauge of 5");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Reconnect after more arrived: from the first unacknowledged message, no gap.
    publish_readings(&prefix, 10..15).await;
    daemon.wait_for_log(&channel, 15).await;
    let mut ws = ws_connect(&url).await.unwrap();
    let second = next_frames(&mut ws, 10).await;
    assert_eq!(seqs(&second), (5..15).collect::<Vec<_>>());
    let ninth = second[4].0;
    ws.send(WsMessage::Text(json!({"ack": ninth}).to_string().into()))
        .await
        .unwrap();
    // An ack that goes back does not move the cursor back.
    ws.send(WsMessage::Text(json!({"ack": 1}).to_string().into()))
        .await
        .unwrap();
    // Past the cursor flush interval, then a crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(ws);
    daemon.restart().await.unwrap();

    // After the restart, SSE picks up where the acks left it.
    let sse_url = daemon.url(&format!("/sse/{channel}?subscription=billing"));
    let mut sse = SseClient::connect(&sse_url, None).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let (id, frame) = sse.next_message(WAIT).await.unwrap();
        got.push((
            id.parse::<u64>().unwrap(),
            frame["payload"]["seq"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        seqs(&got),
        vec![10, 11],
        "resumed after the crash with no gap"
    );
    drop(sse);
    // A reconnect with Last-Event-ID acknowledges through it and continues after it.
    let mut sse = SseClient::connect(&sse_url, Some(got[1].0)).await.unwrap();
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["payload"]["seq"], 12);
    drop(sse);
    let view = daemon
        .get_json("/api/v1/subscriptions/billing")
        .await
        .unwrap();
    assert_eq!(view["cursor"], got[1].0 + 1);

    // A filtered subscription from the start of the log.
    let (status, _) = post(
        &daemon,
        json!({"name": "late", "channel": channel, "filter": "payload.seq >= 12", "from": 1}),
    )
    .await;
    assert_eq!(status, 201);
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}?subscription=late")))
        .await
        .unwrap();
    assert_eq!(seqs(&next_frames(&mut ws, 3).await), vec![12, 13, 14]);
    drop(ws);

    let list = daemon.get_json("/api/v1/subscriptions").await.unwrap();
    let names: Vec<&str> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["billing", "late"]);
    let deleted = reqwest::Client::new()
        .delete(daemon.url("/api/v1/subscriptions/late"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = reqwest::get(daemon.url("/api/v1/subscriptions/late"))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert!(
        ws_connect(&daemon.ws_url(&format!("/ws/{channel}?subscription=late")))
            .await
            .is_err(),
        "a deleted subscription cannot be attached to"
    );
}
