//! The specs directories reload while the daemon runs (real Mosquitto, daemon as a process):
//! the file watcher (inotify, and the polling fallback) and SIGHUP apply an edit by diff; a
//! broken edit, or one that takes a bridge's channel away, is refused whole with its reason
//! and everything keeps running; `GET /api/v1/reloads` and `stepflow_reloads_total` say so.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn reload_count(daemon: &Daemon) -> usize {
    daemon.get_json("/api/v1/reloads").await.unwrap()["reloads"]
        .as_array()
        .unwrap()
        .len()
}

fn has_document(specs: &Value, id: &str) -> bool {
    specs["specs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watcher_applies_edits_by_diff_and_refuses_broken_ones_whole() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    let bridges = dir.path().join("bridges");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(&bridges).unwrap();
    let (kept, kp) = (unique("kept"), unique("k"));
    let (sink_api, sp) = (unique("sink"), unique("s"));
    let kept_file = iot_spec(&specs, &kept, &kp, 1);
    sink(&specs, &sink_api, &sp);
    std::fs::write(
        bridges.join("mirror.yaml"),
        format!(
            "bridges:\n  mirror:\n    from: {kept}.telemetry\n    to:\n      - channel: {sink_api}.mirror\n        params: {{deviceId: '{{deviceId}}'}}\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&[
        "--specs",
        specs.to_str().unwrap(),
        "--bridges",
        bridges.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(daemon.log().contains("watching the specs directories"));
    // A client of a document no edit touches.
    let mut bystander = ws_connect(&daemon.ws_url(&format!("/ws/{kept}.telemetry")))
        .await
        .unwrap();
    let kept_topic = format!("{kp}/devices/1/telemetry");

    // 1. A new file: its channel serves and its MQTT subscription is made.
    let (live, lp) = (unique("live"), unique("l"));
    let staging = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(iot_spec(staging.path(), &live, &lp, 1)).unwrap();
    let live_file = specs.join(format!("{live}.yaml"));
    write_file(&live_file, &text);
    let reload = daemon.next_reload(0).await;
    assert_eq!(reload["trigger"], "watch", "{reload}");
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["added"], json!([live]), "{reload}");
    assert_eq!(reload["channelsAdded"], 2, "{reload}");
    let listed = daemon.get_json("/api/v1/specs").await.unwrap();
    assert!(has_document(&listed, &live), "{listed}");
    let telemetry = format!("{live}.telemetry");
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{telemetry}")), None)
        .await
        .unwrap();
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{telemetry}")))
        .await
        .unwrap();
    let topic = format!("{lp}/devices/7/telemetry");
    let frame = publish_until_seen(&mut sse, &topic, &json!({"temperature": 20.5})).await;
    assert_eq!(frame["params"]["deviceId"], "7");
    assert_eq!(
        ws_next_json(&mut ws, WAIT).await.unwrap()["payload"]["temperature"],
        20.5
    );

    // 2. A broken edit: refused with its pointer; the old version keeps serving.
    write_file(
        &live_file,
        &text.replace("action: receive", "action: sideways"),
    );
    let reload = daemon.next_reload(1).await;
    assert_eq!(reload["outcome"], "refused", "{reload}");
    let errors = reload["errors"].to_string();
    assert!(
        errors.contains(&format!("{live}.yaml#/operations/receiveTelemetry/action")),
        "{reload}"
    );
    assert_eq!(
        daemon
            .metric(
                "stepflow_reloads_total",
                &[("trigger", "watch"), ("outcome", "refused")]
            )
            .await
            .unwrap(),
        1.0
    );
    assert!(
        daemon.log().contains("registry change not applied"),
        "the refusal is logged"
    );
    mosquitto_pub(&topic, &json!({"temperature": 21.5}));
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["payload"]["temperature"], 21.5, "still served");
    write_file(&live_file, &text);
    let reload = daemon.next_reload(2).await;
    assert_eq!(reload["outcome"], "unchanged", "{reload}");

    // 3. An edit that removes the channel the bridge reads: refused, naming the bridge.
    let kept_text = std::fs::read_to_string(&kept_file).unwrap();
    let without_telemetry = kept_text
        .replace(
            "  receiveTelemetry:\n    action: receive\n    channel: {$ref: '#/channels/telemetry'}\n    bindings: {mqtt: {qos: 1}}\n",
            "",
        )
        .replacen("  telemetry:\n", "  gone:\n", 1);
    assert_ne!(without_telemetry, kept_text);
    write_file(&kept_file, &without_telemetry);
    let reload = daemon.next_reload(3).await;
    assert_eq!(reload["outcome"], "refused", "{reload}");
    assert!(
        reload["errors"].to_string().contains("bridge 'mirror'"),
        "{reload}"
    );
    write_file(&kept_file, &kept_text);
    let reload = daemon.next_reload(4).await;
    assert_eq!(reload["outcome"], "unchanged", "{reload}");

    // 4. A schema change: the same clients, the next message validated against it.
    let stricter = text.replace(
        "required: [temperature]\n",
        "required: [temperature, seq]\n",
    );
    assert_ne!(stricter, text);
    write_file(&live_file, &stricter);
    let reload = daemon.next_reload(5).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["replaced"], json!([live]), "{reload}");
    assert_eq!(reload["channelsChanged"], 1, "{reload}");
    assert_eq!(reload["breaking"], 1, "seq made required: {reload}");
    mosquitto_pub(&topic, &json!({"temperature": 22.5}));
    mosquitto_pub(&topic, &json!({"temperature": 23.5, "seq": 1}));
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["payload"]["seq"], 1, "the one without seq is refused");
    assert_eq!(
        ws_next_json(&mut ws, WAIT).await.unwrap()["payload"]["temperature"],
        21.5
    );
    assert_eq!(
        ws_next_json(&mut ws, WAIT).await.unwrap()["payload"]["seq"],
        1
    );
    let dead = daemon.replay_all(&telemetry, "dead-letters").await.unwrap();
    assert!(
        dead.iter().any(|m| m["payload"]["temperature"] == 22.5),
        "{dead:?}"
    );

    // 5. The file removed: its clients are closed, its channels go.
    std::fs::remove_file(&live_file).unwrap();
    let reload = daemon.next_reload(6).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["removed"], json!([live]), "{reload}");
    assert_closed_as_removed(&mut ws).await;
    let event = loop {
        let e = sse.next(WAIT).await.unwrap();
        if e.event != "message" {
            break e;
        }
    };
    assert_eq!(event.event, "removed");
    let listed = daemon.get_json("/api/v1/specs").await.unwrap();
    assert!(!has_document(&listed, &live), "{listed}");

    // The bystander saw every change go by on its first connection; the bridge still copies.
    let mut mirror = MqttClient::connect(1883, &unique("mirror")).await.unwrap();
    mirror.subscribe(&format!("{sp}/mirror/#")).await.unwrap();
    mosquitto_pub(&kept_topic, &json!({"temperature": 0.5}));
    let frame = ws_next_json(&mut bystander, WAIT).await.unwrap();
    assert_eq!(frame["payload"]["temperature"], 0.5);
    assert_eq!(frame["offset"], 1);
    let copy = mirror.recv(WAIT).await.unwrap();
    assert_eq!(copy.topic, format!("{sp}/mirror/1"));
    assert!(
        !daemon.log().contains("panicked"),
        "no panic:\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_post_reloads_reload_when_the_watcher_is_off() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    let (kept, kp) = (unique("kept"), unique("k"));
    iot_spec(&specs, &kept, &kp, 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, "watch:\n  enabled: false\n").unwrap();
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        specs.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(!daemon.log().contains("watching the specs directories"));

    let (live, lp) = (unique("live"), unique("l"));
    iot_spec(&specs, &live, &lp, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reload_count(&daemon).await, 0, "the watcher is off");
    daemon.signal("HUP").unwrap();
    let reload = daemon.next_reload(0).await;
    assert_eq!(reload["trigger"], "signal", "{reload}");
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["added"], json!([live]), "{reload}");
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{live}.telemetry")), None)
        .await
        .unwrap();
    let frame = publish_until_seen(
        &mut sse,
        &format!("{lp}/devices/3/telemetry"),
        &json!({"temperature": 3.5}),
    )
    .await;
    assert_eq!(frame["payload"]["temperature"], 3.5);

    // POST /api/v1/reloads does the same over the API: nothing changed now.
    let r = reqwest::Client::new()
        .post(daemon.url("/api/v1/reloads"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["outcome"], "unchanged", "{answer}");
    // A broken file: 400 with the pointer, and the document keeps serving.
    std::fs::write(specs.join("broken.yaml"), "asyncapi: 3.0.0\ninfo: 12\n").unwrap();
    let r = reqwest::Client::new()
        .post(daemon.url("/api/v1/reloads"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let answer: Value = r.json().await.unwrap();
    assert!(
        answer["errors"].to_string().contains("broken.yaml#/info"),
        "{answer}"
    );
    mosquitto_pub(
        &format!("{lp}/devices/3/telemetry"),
        &json!({"temperature": 4.5}),
    );
    let (_, frame) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(frame["payload"]["temperature"], 4.5);
    assert_eq!(
        daemon
            .metric("stepflow_reloads_total", &[("outcome", "applied")])
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_watcher_picks_up_a_new_file() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    let (kept, kp) = (unique("kept"), unique("k"));
    iot_spec(&specs, &kept, &kp, 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        "watch:\n  poll_interval_ms: 200\n  debounce_ms: 100\n",
    )
    .unwrap();
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        specs.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(daemon.log().contains("polling=true"), "{}", daemon.log());
    let live = unique("live");
    iot_spec(&specs, &live, &unique("l"), 1);
    let reload = daemon.next_reload(0).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["added"], json!([live]), "{reload}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_named_on_its_own_is_followed_across_renames_and_its_neighbours_ignored() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (one, p) = (unique("one"), unique("o"));
    let file = iot_spec(dir.path(), &one, &p, 1);
    let daemon = Daemon::start(&["--specs", file.to_str().unwrap()])
        .await
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    // Two edits, each a rename over the file: the second is seen too (a watch on the file
    // itself would follow the first replacement's old inode and miss it).
    for (n, title) in ["First edit", "Second edit"].iter().enumerate() {
        write_file(&file, &text.replace("Test IoT", title));
        let reload = daemon.next_reload(n).await;
        assert_eq!(reload["outcome"], "applied", "{reload}");
        assert_eq!(reload["replaced"], json!([one]), "{reload}");
        let listed = daemon.get_json("/api/v1/specs").await.unwrap();
        assert!(listed.to_string().contains(title), "{listed}");
    }
    // A document beside it that the command line does not name: no reload.
    iot_spec(dir.path(), &unique("neighbour"), &unique("n"), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reload_count(&daemon).await, 2, "{}", daemon.log());
}
