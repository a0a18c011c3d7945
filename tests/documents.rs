//! Documents as people write them (`tests/documents/`): dotted channel ids on a Kafka platform,
//! an AsyncAPI 3.1 MQTT fleet with wildcard channels, a WebSocket API with empty bindings, YAML
//! 1.1 words that must stay strings — each loaded, compiled and checked route by route; and
//! `stepflow validate` over the mixed directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use stepflow::connectors::kafka::KafkaRoute;
use stepflow::connectors::mqtt::MqttRoute;
use stepflow::connectors::ws::WebSocketRoute;

use serde_json::{Value, json};
use stepflow::routing::{Compiled, UpstreamBinding};
use stepflow::spec::{self, SpecError, SpecWarning};

fn document(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/documents")
        .join(name)
}

fn compile_file(name: &str) -> Result<(Compiled, Vec<SpecWarning>), Vec<SpecError>> {
    let loaded = spec::load_file(&document(name)).map_err(|f| f.errors)?;
    let compiled = stepflow::connectors::compile(&loaded.apis)?;
    Ok((compiled, loaded.warnings))
}

fn all_warnings(compiled: &Compiled, load: &[SpecWarning]) -> Vec<String> {
    load.iter()
        .chain(&compiled.warnings)
        .map(ToString::to_string)
        .collect()
}

#[test]
fn a_kafka_platform_with_dotted_channel_ids_routes_each_channel() {
    let (compiled, load_warnings) = compile_file("order-platform-kafka.yaml").unwrap();
    let table = &compiled.table;
    let created = table
        .get("order-platform-kafka.order.created")
        .expect("a dotted channel id is a route id");
    assert!(created.direction.readable);
    let Some(kafka) = created.upstreams[0].binding.get::<KafkaRoute>() else {
        panic!("kafka upstream: {:?}", created.upstreams);
    };
    assert_eq!(kafka.subscription.pattern, "orders.created.v1");
    assert_eq!(kafka.group_id, "order-gateway");
    let invoice = table
        .get("order-platform-kafka.billing.invoice-requested")
        .unwrap();
    assert!(invoice.direction.writable && !invoice.direction.readable);
    // `default: no` in a payload schema stays the string it was written as.
    let schema = created.messages[0].schema.as_ref().unwrap();
    assert_eq!(schema["properties"]["express"]["default"], json!("no"));

    // The audit trail's servers have no connector: the route serves the log and web clients.
    let audit = table.get("order-platform-kafka.order.audit").unwrap();
    assert!(audit.direction.readable);
    assert!(
        audit
            .upstreams
            .iter()
            .all(|u| matches!(u.binding, UpstreamBinding::NoConnector)),
        "{:?}",
        audit.upstreams
    );
    let warnings = all_warnings(&compiled, &load_warnings);
    for expected in [
        "servers/audit/protocol: warning: protocol 'nats' has no connector",
        "servers/lab/protocol: warning: protocol 'zenoh' has no connector",
        "OrderCreated/examples/1/payload: warning: example does not match the payload schema",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(expected)),
            "no warning '{expected}' in {warnings:#?}"
        );
    }
    assert!(
        !warnings.iter().any(|w| w.contains("examples/0")),
        "the matching example is not reported: {warnings:#?}"
    );
}

#[test]
fn an_mqtt_3_1_fleet_subscribes_with_the_wildcards_its_addresses_carry() {
    let (compiled, _) = compile_file("device-fleet-mqtt-3.1.yaml").unwrap();
    let table = &compiled.table;
    let mqtt = |id: &str| {
        let route = table.get(id).unwrap_or_else(|| panic!("route {id}"));
        match route.upstreams[0].binding.get::<MqttRoute>() {
            Some(m) => m.clone(),
            None => panic!("{id}: {:?}", route.upstreams[0].binding),
        }
    };
    let data = mqtt("device-fleet-mqtt-3-1.data");
    assert_eq!(data.filter.pattern, "fleet/devices/+/data");
    assert!(data.topic.extract("fleet/devices/d1/data").is_some());
    assert!(data.topic.extract("fleet/devices/d1/other").is_none());

    let limits = mqtt("device-fleet-mqtt-3-1.limits");
    assert_eq!(limits.filter.pattern, "fleet/devices/+/limits/+");
    let params = limits.topic.extract("fleet/devices/u7/limits/max").unwrap();
    assert_eq!(params.get("uuid"), Some("u7"));

    let site = mqtt("device-fleet-mqtt-3-1.site");
    assert_eq!(site.filter.pattern, "fleet/site/#");
    assert!(site.topic.extract("fleet/site/hall/3/temp").is_some());

    // YAML 1.1 words in an enum stay six strings, and a device's `on` passes the schema.
    let route = table.get("device-fleet-mqtt-3-1.data").unwrap();
    let schema = route.messages[0].schema.as_ref().unwrap();
    assert_eq!(
        schema["properties"]["state"]["enum"],
        json!(["on", "off", "yes", "no", "y", "n"])
    );
    assert!(route.validate(br#"{"state": "on"}"#).is_ok());
    assert!(route.validate(br#"{"state": true}"#).is_err());
}

#[test]
fn sending_to_a_wildcard_address_is_a_load_error_that_names_the_wildcard() {
    let errors = compile_file("wildcard-send-invalid.yaml").unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 1, "{text:#?}");
    assert!(
        text[0].contains("#/channels/broadcast/address")
            && text[0].contains("wildcard '+'")
            && text[0].contains("sends on this channel"),
        "{text:#?}"
    );
}

#[test]
fn empty_bindings_are_empty_bindings_with_a_warning() {
    let (compiled, load_warnings) = compile_file("ticker-websocket-empty-bindings.yaml").unwrap();
    let route = compiled
        .table
        .get("ticker-websocket-empty-bindings.ticker")
        .unwrap();
    assert!(route.direction.readable);
    assert!(route.upstreams[0].binding.get::<WebSocketRoute>().is_some());
    let warnings = all_warnings(&compiled, &load_warnings);
    let empty: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("empty `ws` binding"))
        .collect();
    assert_eq!(
        empty.len(),
        4,
        "server, channel, message, operation: {warnings:#?}"
    );
}

#[test]
fn yaml_1_1_words_stay_strings_everywhere_a_document_holds_them() {
    let text = r#"
asyncapi: 2.6.0
info: {title: Switches, version: '1'}
servers:
  broker: {url: 'localhost:1883', protocol: mqtt, bindings: {mqtt: {x-mode: off}}}
channels:
  switches/{position}:
    parameters:
      position:
        schema: {type: string, enum: [on, off], default: off}
    publish:
      message:
        payload:
          type: object
          required: [line, n]
          properties:
            line: {type: string}
            n: {type: string, enum: [y, n, yes, no], default: yes}
        examples:
          - payload: {line: l1, n: y}
"#;
    let loaded = spec::load_text(Path::new("switches.yaml"), text).unwrap();
    let api = &loaded.apis[0];
    let channel = &api.channels[0];
    let position = &channel.parameters[0];
    assert_eq!(position.allowed, Some(vec!["on".into(), "off".into()]));
    assert_eq!(position.default.as_deref(), Some("off"));
    assert_eq!(
        api.servers[0].bindings["mqtt"]["x-mode"],
        Value::String("off".into())
    );
    let compiled = stepflow::connectors::compile(&loaded.apis).unwrap();
    assert!(
        compiled
            .warnings
            .iter()
            .all(|w| !w.message.contains("example")),
        "the example matches: {:?}",
        compiled.warnings
    );
    let route = &compiled.table.routes()[0];
    let schema = route.messages[0].schema.as_ref().unwrap();
    assert_eq!(schema["required"], json!(["line", "n"]));
    assert_eq!(
        schema["properties"]["n"]["enum"],
        json!(["y", "n", "yes", "no"])
    );
    assert_eq!(schema["properties"]["n"]["default"], json!("yes"));
    assert!(route.validate(br#"{"line": "l1", "n": "no"}"#).is_ok());
    let params = match route.upstreams[0].binding.get::<MqttRoute>() {
        Some(m) => m.topic.extract("switches/on").unwrap(),
        None => panic!("{:?}", route.upstreams[0].binding),
    };
    assert_eq!(params.get("position"), Some("on"));
}

#[test]
fn validate_reports_each_file_of_a_mixed_directory_and_fails_only_for_the_invalid_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["validate", "tests/documents"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for ok in [
        "ok tests/documents/device-fleet-mqtt-3.1.yaml (AsyncAPI 3.1.0",
        "ok tests/documents/order-platform-kafka.yaml",
        "ok tests/documents/ticker-websocket-empty-bindings.yaml",
    ] {
        assert!(stdout.contains(ok), "no '{ok}' in:\n{stdout}");
    }
    assert!(
        stdout.contains("tests/documents/wildcard-send-invalid.yaml#/channels/broadcast/address:"),
        "{stdout}"
    );
    assert!(
        stderr.contains("invalid tests/documents/wildcard-send-invalid.yaml: 1 error"),
        "{stderr}"
    );
    // Without the invalid one, the same directory passes.
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "device-fleet-mqtt-3.1.yaml",
        "order-platform-kafka.yaml",
        "ticker-websocket-empty-bindings.yaml",
    ] {
        std::fs::copy(document(name), dir.path().join(name)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["validate", "--warnings", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: example does not match"),
        "{stdout}"
    );
}
