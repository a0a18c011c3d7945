//! The routing table compiled from documents: directions, protocol forms, validators and the
//! compile errors that say why an address or binding cannot work.

use std::path::Path;
use stepflow::connectors::amqp::AmqpRoute;
use stepflow::connectors::kafka::KafkaRoute;
use stepflow::connectors::mqtt::MqttRoute;
use stepflow::connectors::sse::SseRoute;
use stepflow::connectors::ws::WebSocketRoute;

use stepflow::routing::{Compiled, Delivery};
use stepflow::spec::{self, SpecError};

fn compile(text: &str) -> Result<Compiled, Vec<SpecError>> {
    let loaded = spec::load_text(Path::new("doc.yaml"), text).map_err(|f| f.errors)?;
    stepflow::connectors::compile(&loaded.apis)
}

fn shipped() -> Compiled {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("asyncapi-specs");
    let loaded = spec::load_paths(&[dir]).expect("shipped specs load");
    stepflow::connectors::compile(&loaded.apis).expect("shipped specs compile")
}

#[test]
fn telemetry_route_extracts_device_id_and_validates_payloads() {
    let compiled = shipped();
    let route = compiled.table.get("iot.telemetry").expect("route");
    assert!(route.direction.readable && !route.direction.writable);
    assert_eq!(route.delivery, Delivery::AtLeastOnce);
    let Some(mqtt) = route.upstreams[0].binding.get::<MqttRoute>() else {
        panic!("mqtt upstream expected");
    };
    assert_eq!(mqtt.filter.pattern, "devices/+/telemetry");
    assert_eq!(mqtt.subscribe_qos, 1);
    let params = mqtt.topic.extract("devices/42/telemetry").unwrap();
    assert_eq!(params.get("deviceId"), Some("42"));

    assert_eq!(
        route.validate(br#"{"temperature": 21.5, "ts": "2026-11-22T10:00:00Z"}"#),
        Ok(Some("reading"))
    );
    let err = route
        .validate(br#"{"temperature": "hot", "ts": "2026-11-22T10:00:00Z"}"#)
        .unwrap_err();
    assert_eq!(err.instance_path, "/temperature");
    let err = route.validate(br#"{"temperature": 20}"#).unwrap_err();
    assert!(err.reason.contains("ts"), "{err}");
}

#[test]
fn commands_route_fills_the_topic() {
    let compiled = shipped();
    let route = compiled.table.get("iot.commands").expect("route");
    assert!(route.direction.writable && !route.direction.readable);
    let Some(mqtt) = route.upstreams[0].binding.get::<MqttRoute>() else {
        panic!("mqtt upstream expected");
    };
    assert_eq!(
        mqtt.topic.fill(|_| Some("42")).unwrap(),
        "devices/42/commands"
    );
    assert!(mqtt.topic.fill(|_| Some("4/2")).is_err());
    assert!(route.validate(br#"{"action": "explode"}"#).is_err());
}

#[test]
fn qos_0_routes_are_reported_as_at_most_once() {
    let compiled = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
servers:
  b: {host: 'localhost:1883', protocol: mqtt}
channels:
  c: {address: 'a/{x}'}
operations:
  r:
    action: receive
    channel: {$ref: '#/channels/c'}
    bindings: {mqtt: {qos: 0}}
"#,
    )
    .unwrap();
    let route = compiled.table.get("doc.c").unwrap();
    assert!(matches!(&route.delivery, Delivery::AtMostOnce(reason) if reason.contains("QoS 0")));
    assert!(
        compiled
            .warnings
            .iter()
            .any(|w| w.message.contains("at-most-once"))
    );
}

#[test]
fn an_address_kafka_cannot_express_is_a_compile_error_with_its_pointer() {
    let errors = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
servers:
  k: {host: 'localhost:9092', protocol: kafka}
channels:
  c: {address: 'devices/{id}/telemetry'}
operations:
  r: {action: receive, channel: {$ref: '#/channels/c'}}
"#,
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(errors[0].pointer(), "/channels/c/address");
    let text = errors[0].to_string();
    assert!(
        text.contains("Kafka") && text.contains("bindings.kafka.topic"),
        "{text}"
    );
}

#[test]
fn a_kafka_topic_binding_wins_over_the_address() {
    let compiled = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
servers:
  k: {host: 'localhost:9092', protocol: kafka}
channels:
  c:
    address: 'devices/{id}/telemetry'
    bindings: {kafka: {topic: telemetry.raw}}
operations:
  r:
    action: receive
    channel: {$ref: '#/channels/c'}
    bindings: {kafka: {groupId: {type: string, enum: [analytics]}}}
"#,
    )
    .unwrap();
    let Some(kafka) = compiled.table.get("doc.c").unwrap().upstreams[0]
        .binding
        .get::<KafkaRoute>()
    else {
        panic!("kafka upstream expected");
    };
    assert_eq!(kafka.subscription.pattern, "telemetry.raw");
    assert_eq!(kafka.group_id, "analytics");
}

#[test]
fn amqp_topology_comes_from_bindings() {
    let compiled = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
servers:
  r: {host: 'localhost:5672', protocol: amqp}
channels:
  alerts:
    address: 'sites/{site}/alerts'
    bindings:
      amqp:
        is: routingKey
        exchange: {name: alerts, type: topic, durable: true}
  direct:
    address: 'jobs/{kind}'
    bindings:
      amqp:
        is: routingKey
        exchange: {name: jobs, type: direct}
operations:
  onAlert: {action: receive, channel: {$ref: '#/channels/alerts'}}
"#,
    );
    let errors = compiled.map(|_| ()).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].pointer(), "/channels/direct/address");
    assert!(
        errors[0].to_string().contains("topic exchange"),
        "{}",
        errors[0]
    );

    let compiled = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
servers:
  r: {host: 'localhost:5672', protocol: amqp}
channels:
  alerts:
    address: 'sites/{site}/alerts'
    bindings:
      amqp:
        is: routingKey
        exchange: {name: alerts, type: topic, durable: true}
operations:
  onAlert: {action: receive, channel: {$ref: '#/channels/alerts'}}
"#,
    )
    .unwrap();
    let Some(amqp) = compiled.table.get("doc.alerts").unwrap().upstreams[0]
        .binding
        .get::<AmqpRoute>()
    else {
        panic!("amqp upstream expected");
    };
    assert_eq!(amqp.exchange.as_ref().unwrap().name, "alerts");
    assert_eq!(amqp.binding_key.as_ref().unwrap().pattern, "sites.*.alerts");
    assert_eq!(amqp.queue.as_ref().unwrap().name, "stepflow.doc.alerts");
    let key = amqp.routing_key.as_ref().unwrap();
    assert_eq!(
        key.extract("sites.berlin.alerts").unwrap().get("site"),
        Some("berlin")
    );
}

#[test]
fn avro_payloads_are_validated() {
    let compiled = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
channels:
  c:
    address: readings
    messages:
      m:
        contentType: application/json
        payload:
          schemaFormat: application/vnd.apache.avro;version=1.9.0
          schema:
            type: record
            name: Reading
            fields:
              - {name: temperature, type: double}
operations:
  r: {action: receive, channel: {$ref: '#/channels/c'}}
"#,
    )
    .unwrap();
    let route = compiled.table.get("doc.c").unwrap();
    assert_eq!(route.validate(br#"{"temperature": 1.5}"#), Ok(Some("m")));
    let err = route.validate(br#"{"temperature": "x"}"#).unwrap_err();
    assert_eq!(err.instance_path, "/temperature");
}

#[test]
fn invalid_avro_schemas_are_compile_errors() {
    let errors = compile(
        r#"asyncapi: 3.0.0
info: {title: T, version: '1'}
channels:
  c:
    address: readings
    messages:
      m:
        payload:
          schemaFormat: application/vnd.apache.avro;version=1.9.0
          schema: {type: record, name: Reading}
"#,
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(errors[0].pointer(), "/channels/c/messages/m/payload/schema");
}

#[test]
fn relative_file_references_resolve_and_cycles_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("common")).unwrap();
    std::fs::write(
        dir.path().join("common/schemas.yaml"),
        "reading:\n  type: object\n  properties:\n    t: {$ref: '#/celsius'}\ncelsius: {type: number}\nloopA: {$ref: '#/loopB'}\nloopB: {$ref: '#/loopA'}\n",
    )
    .unwrap();
    let doc = dir.path().join("svc/api.yaml");
    std::fs::create_dir(dir.path().join("svc")).unwrap();
    std::fs::write(
        &doc,
        "asyncapi: 3.0.0\nx-stepflow-id: svc\ninfo: {title: T, version: '1'}\nchannels:\n  c:\n    address: r\n    messages:\n      m:\n        payload: {$ref: '../common/schemas.yaml#/reading'}\n",
    )
    .unwrap();
    let loaded = spec::load_file(&doc).unwrap();
    let compiled = stepflow::connectors::compile(&loaded.apis).unwrap();
    let route = compiled.table.get("svc.c").unwrap();
    assert!(route.validate(br#"{"t": "warm"}"#).is_err());
    assert!(route.validate(br#"{"t": 3}"#).is_ok());

    std::fs::write(
        &doc,
        "asyncapi: 3.0.0\ninfo: {title: T, version: '1'}\nchannels:\n  c:\n    address: r\n    messages:\n      m:\n        payload: {$ref: '../common/schemas.yaml#/loopA'}\n",
    )
    .unwrap();
    let errors = spec::load_file(&doc).unwrap_err().errors;
    assert!(
        errors.iter().any(|e| e.to_string().contains("$ref cycle")),
        "{errors:?}"
    );
}

#[test]
fn recursive_schemas_compile_with_a_warning() {
    let loaded = spec::load_text(
        Path::new("tree.yaml"),
        "asyncapi: 3.0.0\ninfo: {title: T, version: '1'}\nchannels:\n  c:\n    address: r\n    messages:\n      m:\n        payload: {$ref: '#/components/schemas/node'}\ncomponents:\n  schemas:\n    node:\n      type: object\n      properties:\n        children: {type: array, items: {$ref: '#/components/schemas/node'}}\n",
    )
    .unwrap();
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.message.contains("recursive"))
    );
    let compiled = stepflow::connectors::compile(&loaded.apis).unwrap();
    assert!(
        compiled
            .table
            .get("tree.c")
            .unwrap()
            .validate(br#"{"children": [{}]}"#)
            .is_ok()
    );
}

#[test]
fn asyncapi_2_parameter_schemas_are_enforced() {
    let compiled = shipped();
    let route = compiled.table.get("smart-building.hvac").expect("route");
    let building = route
        .parameters
        .iter()
        .find(|p| p.name == "buildingId")
        .unwrap();
    assert!(building.check("HQ1").is_ok());
    let err = building.check("hq-1").unwrap_err();
    assert!(
        err.to_string().contains("does not match its schema"),
        "{err}"
    );
}

/// A document with one `send` and one `receive` channel on a server of `protocol`.
fn two_way(protocol: &str, role: &str) -> String {
    format!(
        r#"asyncapi: 3.0.0
info: {{title: t, version: '1'}}
{role}
servers:
  s: {{host: 'example.com', protocol: {protocol}}}
channels:
  out: {{address: /out, messages: {{m: {{payload: {{type: object}}}}}}}}
  in: {{address: /in, messages: {{m: {{payload: {{type: object}}}}}}}}
operations:
  sendOut: {{action: send, channel: {{$ref: '#/channels/out'}}}}
  receiveIn: {{action: receive, channel: {{$ref: '#/channels/in'}}}}
"#
    )
}

#[test]
fn the_gateway_is_the_client_of_a_document_that_describes_a_websocket_or_http_server() {
    for (protocol, role, client) in [
        ("ws", "", true),
        ("wss", "", true),
        ("https", "", true),
        ("mqtt", "", false),
        ("ws", "x-stepflow-role: application", false),
        ("mqtt", "x-stepflow-role: client", true),
    ] {
        let compiled = compile(&two_way(protocol, role)).unwrap();
        let out = compiled.table.get("doc.out").unwrap();
        let incoming = compiled.table.get("doc.in").unwrap();
        // As the client, what the server sends reaches the gateway.
        assert_eq!(out.direction.readable, client, "{protocol} {role}");
        assert_eq!(out.direction.writable, !client, "{protocol} {role}");
        assert_eq!(incoming.direction.writable, client, "{protocol} {role}");
    }
    let errors = compile(&two_way("ws", "x-stepflow-role: server")).unwrap_err();
    assert!(
        errors[0].to_string().contains("x-stepflow-role"),
        "{errors:?}"
    );
}

#[test]
fn event_streams_and_subscribe_frames_compile_from_the_shipped_documents() {
    let compiled = shipped();
    let alerts = compiled.table.get("alerts.alerts").expect("route");
    assert!(alerts.direction.readable);
    let Some(sse) = alerts.upstreams[0].binding.get::<SseRoute>() else {
        panic!("sse upstream expected");
    };
    assert_eq!(
        sse.events,
        vec![
            ("alert".to_owned(), "raised".to_owned()),
            ("resolved".to_owned(), "resolved".to_owned())
        ]
    );
    let ticker = compiled.table.get("market-feed.ticker").expect("route");
    let Some(ws) = ticker.upstreams[0].binding.get::<WebSocketRoute>() else {
        panic!("websocket upstream expected");
    };
    assert_eq!(
        ws.subscribe,
        vec![r#"{"type":"subscribe","channels":["ticker"]}"#.to_owned()]
    );
    // Neither source can redeliver: both are at-most-once, and said so at load.
    assert!(matches!(alerts.delivery, Delivery::AtMostOnce { .. }));
    assert!(matches!(ticker.delivery, Delivery::AtMostOnce { .. }));
}
