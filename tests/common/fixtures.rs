//! Documents written for one test: their topics and queues carry the test's own prefix.

#[allow(unused_imports)]
use super::*;
/// Writes an IoT document (AsyncAPI 3.0) whose topics start with `prefix`, with a `telemetry`
/// channel the gateway receives and a `commands` channel it sends, on server `broker`.
pub fn iot_spec(dir: &Path, api: &str, prefix: &str, qos: u8) -> PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Test IoT, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  telemetry:
    address: '{prefix}/devices/{{deviceId}}/telemetry'
    messages:
      reading:
        payload:
          type: object
          required: [temperature]
          properties:
            temperature: {{type: number}}
            seq: {{type: integer}}
            pad: {{type: string}}
  commands:
    address: '{prefix}/devices/{{deviceId}}/commands'
    messages:
      command:
        payload:
          type: object
          required: [action]
          additionalProperties: false
          properties:
            action: {{type: string, enum: [reboot, identify]}}
            deviceId: {{type: string}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
    bindings: {{mqtt: {{qos: {qos}}}}}
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
    bindings: {{mqtt: {{qos: 1}}}}
"#
        ),
    )
    .unwrap();
    path
}

/// An AMQP document whose exchange and queues start with `prefix`: a `telemetry` channel the
/// gateway consumes (topic exchange, its own queue) and a `commands` channel it publishes to
/// (persistent, priority 5, mandatory).
pub fn amqp_spec(dir: &Path, api: &str, prefix: &str) -> PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: AMQP test, version: 1.0.0}}
servers:
  rabbit: {{host: '127.0.0.1:5672', protocol: amqp}}
channels:
  telemetry:
    address: 'devices/{{deviceId}}/telemetry'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}
        queue: {{name: {prefix}.telemetry, durable: true, exclusive: false, autoDelete: false}}
    messages:
      reading:
        payload: {{type: object, required: [temperature], properties: {{temperature: {{type: number}}, seq: {{type: integer}}}}}}
  commands:
    address: 'devices/{{deviceId}}/commands'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}
    messages:
      command:
        payload: {{type: object, required: [action], properties: {{action: {{type: string}}}}}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
    bindings:
      amqp: {{deliveryMode: 2, priority: 5, mandatory: true, expiration: 60000, cc: [audit.commands]}}
"#
        ),
    )
    .unwrap();
    path
}

/// A file document with a writable `mirror` channel a bridge copies telemetry to.
pub fn sink(dir: &std::path::Path, api: &str, p: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Sink, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  mirror:
    address: '{p}/mirror/{{deviceId}}'
    messages:
      copy: {{payload: {{type: object}}}}
operations:
  sendMirror: {{action: send, channel: {{$ref: '#/channels/mirror'}}, bindings: {{mqtt: {{qos: 1}}}}}}
"#
        ),
    )
    .unwrap();
    path
}

/// Writes through a temporary file and a rename, as editors and config management do.
pub fn write_file(path: &Path, text: &str) {
    let temporary = path.with_extension("swp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// An AMQP-side document: `readings` the gateway publishes to `{prefix}.events`.
pub fn amqp_target_spec(dir: &Path, api: &str, prefix: &str) -> PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    write_file(
        &path,
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: AMQP side, version: 1.0.0}}
servers:
  rabbit: {{host: '127.0.0.1:5672', protocol: amqp}}
channels:
  readings:
    address: 'devices/{{deviceId}}/telemetry'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}
operations:
  archive:
    action: send
    channel: {{$ref: '#/channels/readings'}}
    bindings: {{amqp: {{deliveryMode: 2}}}}
"#
        ),
    );
    path
}
