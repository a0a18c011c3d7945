//! `stepflow validate` and `stepflow routes` as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

fn stepflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the stepflow binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn validate_accepts_the_shipped_specs() {
    let out = stepflow(&["validate", "asyncapi-specs/"]);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(
        text.contains("iot-telemetry.yaml (AsyncAPI 3.0.0"),
        "{text}"
    );
    assert!(
        text.contains("smart-building.yaml (AsyncAPI 2.6.0"),
        "{text}"
    );
    assert!(
        text.contains("analytics-kafka.yaml (AsyncAPI 3.0.0"),
        "{text}"
    );
    for shipped in ["market-feed-ws.yaml", "alerts-sse.yaml"] {
        assert!(
            text.contains(&format!("{shipped} (AsyncAPI 3.0.0")),
            "{text}"
        );
    }
    assert!(
        text.contains("device-registry.openapi.yaml (OpenAPI 3.1.0"),
        "{text}"
    );
    assert!(
        text.contains("telemetry-archive-amqp.yaml (AsyncAPI 3.0.0"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        7,
        "{text}"
    );
}

#[test]
fn validate_checks_the_shipped_bridges_against_the_shipped_specs() {
    let out = stepflow(&["validate", "asyncapi-specs", "--bridges", "bridges"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok bridge commands-to-devices (bridges/commands.yaml): analytics.deviceCommands → iot.commands",
        "ok bridge telemetry-to-kafka (bridges/telemetry.yaml): iot.telemetry → analytics.telemetryRaw, analytics.telemetryAvro",
        "ok bridge telemetry-to-archive (bridges/telemetry.yaml): iot.telemetry → archive.readings",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
}

#[test]
fn validate_prints_every_error_as_file_pointer_reason_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        r#"asyncapi: 3.0.0
info:
  title: Broken
  version: 1.0.0
servers:
  broker:
    host: localhost:1883
    protocol: mqtt
channels:
  telemetry:
    address: devices/{deviceId}/telemetry
    parameters:
      device: {}
    messages:
      reading:
        payload:
          type: objekt
operations:
  onTelemetry:
    action: receive
    channel:
      $ref: '#/channels/nope'
"#,
    )
    .unwrap();
    let out = stepflow(&["validate", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let file = broken.display().to_string();
    for expected in [
        format!(
            "{file}#/operations/onTelemetry/channel/$ref: $ref '#/channels/nope' does not resolve"
        ),
        format!(
            "{file}#/channels/telemetry/parameters/device: parameter 'device' is declared but not used"
        ),
        format!(
            "{file}#/channels/telemetry/parameters: not all the address's parameters are described in `parameters`; missing: deviceId"
        ),
    ] {
        assert!(
            text.contains(&expected),
            "missing line starting {expected:?} in:\n{text}"
        );
    }
    for line in text.lines() {
        assert!(
            line.starts_with(&format!("{file}#")),
            "not a file#pointer line: {line}"
        );
    }
}

#[test]
fn validate_reports_schema_errors_of_documents_that_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad-schema.yaml"),
        "asyncapi: 3.0.0\ninfo: {title: T, version: '1'}\nchannels:\n  c:\n    address: a/b\n    messages:\n      m:\n        payload: {type: objekt}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "asyncapi: 3.0.0\ninfo: {title: T}\n",
    )
    .unwrap();
    let out = stepflow(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("bad-schema.yaml#/channels/c/messages/m/payload: invalid payload schema"),
        "{text}"
    );
    assert!(
        text.contains("broken.yaml#/info: required field `version` is missing"),
        "{text}"
    );
}

#[test]
fn yaml_syntax_errors_name_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syntax.yaml");
    std::fs::write(&file, "asyncapi: 3.0.0\ninfo: [unclosed\n").unwrap();
    let out = stepflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("{}#: not valid YAML/JSON: ", file.display())),
        "{text}"
    );
    assert!(text.contains("line"), "{text}");
}

#[test]
fn routes_prints_the_table_and_json() {
    let out = stepflow(&["routes", "asyncapi-specs/iot-telemetry.yaml"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.lines().any(|l| l.starts_with("iot.telemetry")
            && l.contains("readable")
            && l.contains("filter devices/+/telemetry")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("iot.commands") && l.contains("writable")),
        "{text}"
    );

    let out = stepflow(&["routes", "--json", "asyncapi-specs/iot-telemetry.yaml"]);
    assert!(out.status.success());
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let telemetry = &routes[0];
    assert_eq!(telemetry["id"], "iot.telemetry");
    assert_eq!(telemetry["direction"]["readable"], true);
    assert_eq!(telemetry["delivery"]["guarantee"], "at-least-once");
    assert_eq!(telemetry["upstreams"][0]["binding"]["kind"], "mqtt");
    assert_eq!(
        telemetry["upstreams"][0]["binding"]["filter"]["pattern"],
        "devices/+/telemetry"
    );
    assert_eq!(telemetry["parameters"][0]["name"], "deviceId");
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("asyncapi-specs")
            .is_dir()
    );
}
