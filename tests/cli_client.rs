//! The CLI as a client of a running daemon, run as a user runs it: `stepflow specs
//! list|get|add|replace|rm|history`, `reload`, `publish`, `tail`, `replay` against the daemon
//! as a process (real Mosquitto), with an API key from `STEPFLOW_API_KEY`; and no panic when
//! the reader of its output goes away.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `stepflow args` against `url` with `key` in the environment.
fn stepflow(url: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stepflow"));
    command
        .args(args)
        .env("STEPFLOW_URL", url)
        .env_remove("STEPFLOW_API_KEY");
    if let Some(key) = key {
        command.env("STEPFLOW_API_KEY", key);
    }
    command.output().expect("the stepflow binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Succeeded; its stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Failed with exit 1; its stderr.
fn refused(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_manage_documents_and_messages_of_a_running_daemon() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (kept, kp) = (unique("kept"), unique("k"));
    let kept_spec = iot_spec(dir.path(), &kept, &kp, 1);
    let key = "cli-test-key-4c1f0a9e7d";
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "auth:\n  api_keys:\n    - id: operator\n      key_sha256: {}\n      scopes: ['*']\n",
            hex::encode(stepflow::auth::sha256(key))
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        kept_spec.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let url = daemon.url("");
    let run = |args: &[&str]| stepflow(&url, Some(key), args);

    // Without the key: refused with the gateway's reason, exit 1.
    let stderr = refused(&stepflow(&url, None, &["specs", "list"]));
    assert!(stderr.contains("401"), "{stderr}");
    // Listed, human-readable and as JSON.
    let listing = ok(&run(&["specs", "list"]));
    assert!(listing.starts_with("ID"), "{listing}");
    assert!(
        listing.contains(&kept) && listing.contains("file"),
        "{listing}"
    );
    let listing: Value = serde_json::from_str(&ok(&run(&["specs", "list", "--json"]))).unwrap();
    assert_eq!(listing["specs"][0]["id"], kept.as_str());

    // Added from a file: a dry run changes nothing, a broken one names its pointer.
    let (live, lp) = (unique("live"), unique("l"));
    let staging = tempfile::tempdir().unwrap();
    let live_spec = iot_spec(staging.path(), &live, &lp, 1);
    let live_path = live_spec.to_str().unwrap();
    let broken = staging.path().join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&live_spec)
            .unwrap()
            .replace("action: receive", "action: sideways"),
    )
    .unwrap();
    let stderr = refused(&run(&["specs", "add", broken.to_str().unwrap()]));
    assert!(
        stderr.contains("broken.yaml#/operations/receiveTelemetry/action"),
        "{stderr}"
    );
    let dry = ok(&run(&["specs", "add", live_path, "--dry-run"]));
    assert!(dry.starts_with(&format!("would add {live}")), "{dry}");
    assert!(!ok(&run(&["specs", "list"])).contains(&live));
    let added = ok(&run(&["specs", "add", live_path]));
    assert!(
        added.starts_with(&format!(
            "added {live} (asyncapi 3.0.0, version 1.0.0): 2 channel(s), 2 operation(s)"
        )),
        "{added}"
    );
    assert!(added.contains(&format!("  + {live}.telemetry")), "{added}");
    let stderr = refused(&run(&["specs", "add", live_path]));
    assert!(stderr.contains("409"), "{stderr}");
    assert_eq!(
        ok(&run(&["specs", "get", &live])),
        std::fs::read_to_string(&live_spec).unwrap()
    );

    // Published over HTTP: an MQTT subscriber gets it; replay and tail read it back.
    let mut device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    device
        .subscribe(&format!("{lp}/devices/+/commands"))
        .await
        .unwrap();
    let commands = format!("{live}.commands");
    let published = ok(&run(&[
        "publish",
        &commands,
        "--param",
        "deviceId=7",
        "--data",
        r#"{"action":"reboot"}"#,
    ]));
    assert_eq!(
        published.trim(),
        format!("published on {commands} at offset 1 ({lp}/devices/7/commands)")
    );
    let message = device.recv(Duration::from_secs(10)).await.unwrap();
    assert_eq!(message.topic, format!("{lp}/devices/7/commands"));
    assert_eq!(&message.payload[..], br#"{"action":"reboot"}"#);
    let payload_file = staging.path().join("identify.json");
    std::fs::write(&payload_file, r#"{"action":"identify"}"#).unwrap();
    let answer: Value = serde_json::from_str(&ok(&run(&[
        "publish",
        &commands,
        "-p",
        "deviceId=8",
        "--data",
        &format!("@{}", payload_file.display()),
        "--json",
    ])))
    .unwrap();
    assert_eq!(answer["offset"], 2);
    // Invalid for the schema: refused with the reason, nothing published.
    let stderr = refused(&run(&[
        "publish",
        &commands,
        "-p",
        "deviceId=7",
        "--data",
        r#"{"action":"dance"}"#,
    ]));
    assert!(stderr.contains("400"), "{stderr}");
    // A command line that is wrong: exit 2, with what is wrong.
    let usage = run(&["publish", &commands, "-p", "nonsense", "--data", "{}"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(text(&usage.stderr).contains("'nonsense' is not name=value"));
    // Replay and tail read a readable channel back: telemetry a device sends over MQTT.
    let telemetry = format!("{kept}.telemetry");
    for (device_id, temperature) in [(7, 1.5), (8, 2.5)] {
        device
            .publish(
                &format!("{kp}/devices/{device_id}/telemetry"),
                format!(r#"{{"temperature":{temperature}}}"#),
            )
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let window: Value =
            serde_json::from_str(&ok(&run(&["replay", &telemetry, "--json"]))).unwrap();
        if window["messages"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{window}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replayed = ok(&run(&[
        "replay", &telemetry, "--from", "1", "--limit", "10",
    ]));
    assert_eq!(
        replayed.lines().collect::<Vec<_>>(),
        [
            format!(r#"#1  {kp}/devices/7/telemetry  {{"temperature":1.5}}"#),
            format!(r#"#2  {kp}/devices/8/telemetry  {{"temperature":2.5}}"#),
        ],
        "{replayed}"
    );
    let tailed = ok(&run(&[
        "tail", &telemetry, "--from", "2", "-n", "1", "--json",
    ]));
    let frame: Value = serde_json::from_str(tailed.trim()).unwrap();
    assert_eq!(frame["offset"], 2);
    assert_eq!(frame["payload"]["temperature"], 2.5);
    // A tail that waits: it prints what arrives after it started.
    let tail = Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["tail", &telemetry, "-n", "1"])
        .env("STEPFLOW_URL", &url)
        .env("STEPFLOW_API_KEY", key)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    device
        .publish(
            &format!("{kp}/devices/9/telemetry"),
            r#"{"temperature":3.5}"#.to_owned(),
        )
        .await
        .unwrap();
    let tailed = tokio::task::spawn_blocking(move || tail.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ok(&tailed).trim(),
        format!(r#"#3  {kp}/devices/9/telemetry  {{"temperature":3.5}}"#)
    );

    // Replaced: the dry run shows the diff and the breaking change; --no-breaking refuses it.
    let stricter = staging.path().join("stricter.yaml");
    std::fs::write(
        &stricter,
        std::fs::read_to_string(&live_spec)
            .unwrap()
            .replace("required: [temperature]", "required: [temperature, seq]")
            .replace("version: 1.0.0", "version: 1.1.0"),
    )
    .unwrap();
    let stricter = stricter.to_str().unwrap();
    let dry = ok(&run(&["specs", "replace", &live, stricter, "--dry-run"]));
    assert!(
        dry.starts_with(&format!("would replace {live} (version 1.1.0)")),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("  ~ channel {live}.telemetry")),
        "{dry}"
    );
    assert!(dry.contains("breaking:"), "{dry}");
    let stderr = refused(&run(&[
        "specs",
        "replace",
        &live,
        stricter,
        "--no-breaking",
    ]));
    assert!(
        stderr.contains("409") && stderr.contains("breaking:"),
        "{stderr}"
    );
    let replaced = ok(&run(&["specs", "replace", &live, stricter]));
    assert!(
        replaced.starts_with(&format!("replaced {live} (version 1.1.0)")),
        "{replaced}"
    );
    let history = ok(&run(&["specs", "history"]));
    let newest = history.lines().next().unwrap();
    assert!(
        newest.contains(&format!("applied (api): added [] replaced [{live}]")),
        "{history}"
    );
    assert!(history.contains("refused (api)"), "{history}");
    let reload = ok(&run(&["reload"]));
    assert!(reload.starts_with("unchanged (api)"), "{reload}");

    // Removed with its logs.
    let removed = ok(&run(&["specs", "rm", &live, "--purge"]));
    assert_eq!(
        removed.trim(),
        format!("removed {live}: 2 channel(s), 2 operation(s), 2 message(s) purged")
    );
    let stderr = refused(&run(&["specs", "rm", &live]));
    assert!(stderr.contains("404"), "{stderr}");
    assert!(!ok(&run(&["specs", "list"])).contains(&live));

    // No command printed the key, and neither did the daemon.
    assert!(
        !daemon.log().contains(key),
        "the key is in the daemon's log"
    );
    // A daemon that is not there: exit 1 and what to do.
    let stderr = refused(&stepflow(
        &format!("http://127.0.0.1:{}", free_port()),
        Some(key),
        &["specs", "list"],
    ));
    assert!(stderr.contains("cannot reach the gateway"), "{stderr}");
    assert!(!stderr.contains(key), "{stderr}");
    let bad = stepflow("ftp://example", None, &["specs", "list"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

/// `stepflow routes --json | head`: the reader has gone before the output is written.
#[test]
fn a_reader_that_goes_away_ends_the_output_without_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["routes", "--json", "asyncapi-specs"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The read end closes at once: every write meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
