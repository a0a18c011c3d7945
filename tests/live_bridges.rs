//! Bridges change while the daemon runs (real Mosquitto, daemon as a process):
//! `PUT/GET/DELETE /api/v1/bridges/{name}` and the bridges directory's file watcher. A new
//! bridge copies at once; a changed one resumes from its cursor under load (nothing lost,
//! nothing twice); an unchanged one keeps running; a broken one is refused whole with its
//! pointer; bridges put over the API survive a restart; a removed one stops copying.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn put_bridge(daemon: &Daemon, name: &str, query: &str, yaml: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(daemon.url(&format!("/api/v1/bridges/{name}{query}")))
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn delete_bridge(daemon: &Daemon, name: &str, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .delete(daemon.url(&format!("/api/v1/bridges/{name}{query}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// A bridge from `from` to each of `targets` (channel ids with a `deviceId` parameter).
fn bridge_yaml(from: &str, targets: &[&str]) -> String {
    let mut yaml = format!("from: {from}\nto:\n");
    for t in targets {
        yaml.push_str(&format!(
            "  - channel: {t}\n    params: {{deviceId: '{{deviceId}}'}}\n"
        ));
    }
    yaml
}

/// The `seq` of a copied message.
fn seq(message: &rumqttc::Publish) -> u64 {
    serde_json::from_slice::<Value>(&message.payload).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Receives until `count` distinct seqs arrived; how often each came.
async fn copies(mqtt: &mut MqttClient, count: usize) -> BTreeMap<u64, u32> {
    let mut seen = BTreeMap::<u64, u32>::new();
    while seen.len() < count {
        let message = mqtt
            .recv(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{} of {count} copied: {e}", seen.len()));
        *seen.entry(seq(&message)).or_default() += 1;
    }
    seen
}

async fn nothing_arrives(mqtt: &mut MqttClient, within: Duration) {
    if let Ok(message) = mqtt.recv(within).await {
        panic!(
            "copied after removal: {} {:?}",
            message.topic, message.payload
        );
    }
}

/// Receives until the copy of `wanted` arrives; the seqs that came before it.
async fn until_seq(mqtt: &mut MqttClient, wanted: u64) -> Vec<u64> {
    let mut before = Vec::new();
    loop {
        let message = mqtt
            .recv(WAIT)
            .await
            .unwrap_or_else(|e| panic!("no copy of {wanted} after {before:?}: {e}"));
        match seq(&message) {
            s if s == wanted => return before,
            s => before.push(s),
        }
    }
}

fn bridge_names(listing: &Value) -> Vec<String> {
    listing["bridges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_put_over_the_api_copies_at_once_resumes_when_changed_and_survives_a_restart() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (specs, bridges) = (dir.path().join("specs"), dir.path().join("bridges"));
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(&bridges).unwrap();
    let (iot, p) = (unique("iot"), unique("p"));
    iot_spec(&specs, &iot, &p, 1);
    let (a, ap) = (unique("sinka"), unique("a"));
    let (b, bp) = (unique("sinkb"), unique("b"));
    let (c, cp) = (unique("sinkc"), unique("c"));
    for (api, prefix) in [(&a, &ap), (&b, &bp), (&c, &cp)] {
        sink(&specs, api, prefix);
    }
    // A bridge of the bridges directory: the API cannot change it.
    std::fs::write(
        bridges.join("fixed.yaml"),
        format!(
            "bridges:\n  fixed:\n    from: {iot}.telemetry\n    to:\n      - channel: {c}.mirror\n        params: {{deviceId: '{{deviceId}}'}}\n"
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&[
        "--specs",
        specs.to_str().unwrap(),
        "--bridges",
        bridges.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let telemetry = format!("{iot}.telemetry");
    let topic = format!("{p}/devices/1/telemetry");
    let mut on_a = MqttClient::connect(1883, &unique("on-a")).await.unwrap();
    on_a.subscribe(&format!("{ap}/mirror/#")).await.unwrap();
    let mut on_b = MqttClient::connect(1883, &unique("on-b")).await.unwrap();
    on_b.subscribe(&format!("{bp}/mirror/#")).await.unwrap();
    let mut on_c = MqttClient::connect(1883, &unique("on-c")).await.unwrap();
    on_c.subscribe(&format!("{cp}/mirror/#")).await.unwrap();

    // A dry run changes nothing; the bridge then copies at once.
    let to_a = bridge_yaml(&telemetry, &[&format!("{a}.mirror")]);
    let (status, dry) = put_bridge(&daemon, "copy", "?dry_run=true", &to_a).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["changes"]["added"], json!(["copy"]), "{dry}");
    let listed = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert_eq!(bridge_names(&listed), ["fixed"], "{listed}");
    let (status, created) = put_bridge(&daemon, "copy", "", &to_a).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["changes"]["added"], json!(["copy"]), "{created}");
    assert_eq!(
        created["changes"]["unchanged"],
        json!(["fixed"]),
        "{created}"
    );
    mosquitto_pub(&topic, &json!({"temperature": 1.0, "seq": 0}));
    let copied = on_a.recv(WAIT).await.unwrap();
    assert_eq!(copied.topic, format!("{ap}/mirror/1"));
    assert_eq!(seq(&copied), 0);
    assert_eq!(seq(&on_c.recv(WAIT).await.unwrap()), 0, "the file's bridge");
    let shown = daemon.get_json("/api/v1/bridges/copy").await.unwrap();
    assert_eq!(shown["source"], "api", "{shown}");
    assert_eq!(shown["file"], "copy.json", "{shown}");
    assert_eq!(shown["definition"]["from"], telemetry, "{shown}");
    let fixed = daemon.get_json("/api/v1/bridges/fixed").await.unwrap();
    assert_eq!(fixed["source"], "file", "{fixed}");

    // The same definition again: unchanged. A broken one: refused with its pointer, and the
    // running bridge goes on.
    let (status, again) = put_bridge(&daemon, "copy", "", &to_a).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["changes"]["unchanged"],
        json!(["copy", "fixed"]),
        "{again}"
    );
    let broken = bridge_yaml(&telemetry, &[&format!("{a}.nowhere")]);
    let (status, refused) = put_bridge(&daemon, "copy", "", &broken).await;
    assert_eq!(status, 400, "{refused}");
    let errors = refused["error"]["details"]["errors"].to_string();
    assert!(
        errors.contains("copy.json#/bridges/copy/to/0/channel"),
        "{refused}"
    );
    assert!(
        !errors.contains(dir.path().to_str().unwrap()),
        "no data directory path in an error: {refused}"
    );
    let (status, conflict) = put_bridge(&daemon, "fixed", "", &to_a).await;
    assert_eq!(status, 409, "{conflict}");
    assert!(
        conflict.to_string().contains("fixed.yaml"),
        "names the file: {conflict}"
    );
    let (status, bad_name) = put_bridge(&daemon, "a.b", "", &to_a).await;
    assert_eq!(status, 400, "{bad_name}");
    mosquitto_pub(&topic, &json!({"temperature": 1.0, "seq": 1}));
    assert_eq!(seq(&on_a.recv(WAIT).await.unwrap()), 1);
    assert_eq!(seq(&on_c.recv(WAIT).await.unwrap()), 1);

    // Under 500 msg/s, the bridge gains a target: its lane to A resumes from its cursor
    // (every message copied, none twice), the new lane to B starts at the end of the log,
    // and the file's bridge, unchanged, never stops.
    const COUNT: u64 = 1500;
    let (publisher, mut acked) = spawn_publisher(
        topic.clone(),
        |seq| json!({"temperature": 2.0, "seq": seq}).to_string(),
        2..2 + COUNT,
        500,
    );
    acked.wait_for(|n| *n >= 500).await.unwrap();
    let to_a_and_b = bridge_yaml(
        &telemetry,
        &[&format!("{a}.mirror"), &format!("{b}.mirror")],
    );
    let (status, changed) = put_bridge(&daemon, "copy", "", &to_a_and_b).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["changes"]["changed"], json!(["copy"]), "{changed}");
    assert_eq!(
        changed["changes"]["unchanged"],
        json!(["fixed"]),
        "{changed}"
    );
    assert_eq!(publisher.await.unwrap(), COUNT);
    for (name, mqtt) in [("copy → A", &mut on_a), ("fixed → C", &mut on_c)] {
        let seen = copies(mqtt, COUNT as usize).await;
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            (2..2 + COUNT).collect::<Vec<_>>(),
            "{name}: every message"
        );
        let twice: u32 = seen.values().map(|n| n - 1).sum();
        assert_eq!(twice, 0, "{name}: {twice} copied twice");
    }
    let on_b_first = seq(&on_b.recv(WAIT).await.unwrap());
    assert!(
        (2..2 + COUNT).contains(&on_b_first),
        "B's lane starts in the flow, at the end of the log: {on_b_first}"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("bridge lane started").count(),
        // fixed, copy → A; copy → A again and copy → B after the change.
        4,
        "only the changed bridge restarted:\n{log}"
    );

    // Kept in the data directory: after a crash and a restart it runs from its cursors (and
    // repeats what it copied after the last committed cursor: at-least-once).
    let kept = daemon.data_dir.join("bridges/copy.json");
    assert!(kept.exists(), "{} is kept", kept.display());
    daemon.restart().await.unwrap();
    let listed = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert_eq!(bridge_names(&listed), ["copy", "fixed"], "{listed}");
    mosquitto_pub(&topic, &json!({"temperature": 3.0, "seq": 9000}));
    for mqtt in [&mut on_a, &mut on_b, &mut on_c] {
        let repeated = until_seq(mqtt, 9000).await;
        assert!(
            repeated.iter().all(|s| (2..2 + COUNT).contains(s)),
            "only copies of what came before: {repeated:?}"
        );
    }
    // Both lanes' cursors move past everything the log held before the crash (offsets skip
    // ahead after an unclean stop, so the lag in offsets is not the count of messages).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let copy = daemon.get_json("/api/v1/bridges/copy").await.unwrap();
        let cursors: Vec<u64> = copy["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["cursor"].as_u64().unwrap())
            .collect();
        if cursors.iter().all(|&c| c > 2 + COUNT + 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{copy}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Removed: it stops copying and its file goes; the file's bridge goes on.
    let (status, dry) = delete_bridge(&daemon, "copy", "?dry_run=true").await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["changes"]["removed"], json!(["copy"]), "{dry}");
    let (status, removed) = delete_bridge(&daemon, "copy", "").await;
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["changes"]["removed"], json!(["copy"]), "{removed}");
    let (status, _) = delete_bridge(&daemon, "copy", "").await;
    assert_eq!(status, 404);
    let (status, _) = delete_bridge(&daemon, "fixed", "").await;
    assert_eq!(status, 409, "a file's bridge is removed in its file");
    mosquitto_pub(&topic, &json!({"temperature": 4.0, "seq": 9001}));
    assert_eq!(seq(&on_c.recv(WAIT).await.unwrap()), 9001);
    nothing_arrives(&mut on_a, Duration::from_secs(1)).await;
    nothing_arrives(&mut on_b, Duration::from_millis(100)).await;
    assert!(!kept.exists(), "{} is deleted", kept.display());
    daemon.restart().await.unwrap();
    let listed = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert_eq!(bridge_names(&listed), ["fixed"], "gone for good: {listed}");

    assert!(
        !daemon.log().contains("panicked"),
        "no panic:\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridges_directory_reloads_by_diff_and_refuses_a_broken_file_whole() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (specs, bridges) = (dir.path().join("specs"), dir.path().join("bridges"));
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(&bridges).unwrap();
    let (iot, p) = (unique("iot"), unique("p"));
    iot_spec(&specs, &iot, &p, 1);
    let (a, ap) = (unique("sinka"), unique("a"));
    sink(&specs, &a, &ap);
    let daemon = Daemon::start(&[
        "--specs",
        specs.to_str().unwrap(),
        "--bridges",
        bridges.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let telemetry = format!("{iot}.telemetry");
    let topic = format!("{p}/devices/3/telemetry");
    let mut on_a = MqttClient::connect(1883, &unique("on-a")).await.unwrap();
    on_a.subscribe(&format!("{ap}/mirror/#")).await.unwrap();

    // A new file: its bridge starts.
    let file = bridges.join("live.yaml");
    let text = format!(
        "bridges:\n  live:\n{}",
        bridge_yaml(&telemetry, &[&format!("{a}.mirror")])
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    write_file(&file, &text);
    let reload = daemon.next_reload(0).await;
    assert_eq!(reload["trigger"], "watch", "{reload}");
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["bridges"]["added"], json!(["live"]), "{reload}");
    mosquitto_pub(&topic, &json!({"temperature": 1.0, "seq": 1}));
    let copied = on_a.recv(WAIT).await.unwrap();
    assert_eq!(
        (copied.topic.as_str(), seq(&copied)),
        (&*format!("{ap}/mirror/3"), 1)
    );

    // A broken edit: refused with its pointer, the running bridge goes on.
    write_file(&file, &text.replace(".mirror", ".nowhere"));
    let reload = daemon.next_reload(1).await;
    assert_eq!(reload["outcome"], "refused", "{reload}");
    assert!(
        reload["errors"]
            .to_string()
            .contains("live.yaml#/bridges/live/to/0/channel"),
        "{reload}"
    );
    mosquitto_pub(&topic, &json!({"temperature": 1.0, "seq": 2}));
    assert_eq!(seq(&on_a.recv(WAIT).await.unwrap()), 2, "still copying");

    // Put back: unchanged, and the lane was never restarted.
    write_file(&file, &text);
    let reload = daemon.next_reload(2).await;
    assert_eq!(reload["outcome"], "unchanged", "{reload}");
    assert_eq!(daemon.log().matches("bridge lane started").count(), 1);

    // The file removed: the bridge stops.
    std::fs::remove_file(&file).unwrap();
    let reload = daemon.next_reload(3).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["bridges"]["removed"], json!(["live"]), "{reload}");
    assert!(daemon.log().contains("bridge lane stopped"));
    mosquitto_pub(&topic, &json!({"temperature": 1.0, "seq": 3}));
    nothing_arrives(&mut on_a, Duration::from_secs(1)).await;
    let listed = daemon.get_json("/api/v1/bridges").await.unwrap();
    assert!(bridge_names(&listed).is_empty(), "{listed}");
}
