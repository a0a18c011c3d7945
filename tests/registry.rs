//! The live registry end to end: an AsyncAPI document added to a running daemon over
//! `/api/v1/specs` serves at once (real Mosquitto upstream), survives a restart, and on removal
//! closes its clients while the other documents' clients notice nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn post_spec(daemon: &Daemon, name: &str, text: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/specs?name={name}")))
        .header("content-type", "application/yaml")
        .body(text.to_owned())
        .send()
        .await
        .unwrap()
}

async fn delete(daemon: &Daemon, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .delete(daemon.url(path))
        .send()
        .await
        .unwrap()
}

/// Document `id` in a `GET /api/v1/specs` answer.
fn spec_in(specs: &Value, id: &str) -> Value {
    specs["specs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no '{id}' in {specs}"))
}

fn channel_ids(listing: &Value) -> Vec<String> {
    listing["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asyncapi_document_added_at_run_time_serves_survives_a_restart_and_goes_on_delete() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let (kept, kept_prefix) = (unique("kept"), unique("k"));
    let kept_spec = iot_spec(dir.path(), &kept, &kept_prefix, 1);
    let mut daemon = Daemon::start(&["--specs", kept_spec.to_str().unwrap()])
        .await
        .unwrap();
    // A client of a document that is not touched: it must see nothing of the changes.
    let kept_channel = format!("{kept}.telemetry");
    let mut bystander = ws_connect(&daemon.ws_url(&format!("/ws/{kept_channel}")))
        .await
        .unwrap();

    let (live, prefix) = (unique("live"), unique("l"));
    let staging = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(iot_spec(staging.path(), &live, &prefix, 1)).unwrap();
    let name = format!("{live}.yaml");

    // A broken document is refused whole, with its pointer; nothing is added.
    let broken = text.replace("action: receive", "action: sideways");
    let r = post_spec(&daemon, &name, &broken).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let errors = body["error"]["details"]["errors"].to_string();
    assert!(
        errors.contains(&format!("\"{name}#/operations/receiveTelemetry/action")),
        "the file by its name: {body}"
    );
    assert!(
        !errors.contains(daemon.data_dir.to_str().unwrap()),
        "no data directory path in an error: {body}"
    );
    let channels = daemon.get_json("/api/v1/channels").await.unwrap();
    assert!(!channel_ids(&channels).iter().any(|c| c.starts_with(&live)));

    let r = post_spec(&daemon, &name, &text).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let added: Value = r.json().await.unwrap();
    let telemetry = format!("{live}.telemetry");
    assert_eq!(added["api"], live.as_str());
    assert_eq!(
        added["channels"],
        json!([telemetry.clone(), format!("{live}.commands")])
    );
    assert_eq!(added["document"]["kind"], "asyncapi");
    // The same id again is a conflict.
    assert_eq!(post_spec(&daemon, "other.yaml", &text).await.status(), 409);

    // Its MQTT channel is subscribed upstream: mosquitto_pub reaches an SSE client.
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{telemetry}")), None)
        .await
        .unwrap();
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{telemetry}")))
        .await
        .unwrap();
    let topic = format!("{prefix}/devices/7/telemetry");
    let frame = publish_until_seen(&mut sse, &topic, &json!({"temperature": 20.5})).await;
    assert_eq!(frame["payload"]["temperature"], 20.5);
    assert_eq!(frame["params"]["deviceId"], "7");
    assert_eq!(
        ws_next_json(&mut ws, WAIT).await.unwrap()["payload"]["temperature"],
        20.5
    );
    // The other document's client noticed nothing: same connection, next message.
    let kept_topic = format!("{kept_prefix}/devices/1/telemetry");
    mosquitto_pub(&kept_topic, &json!({"temperature": 0.5}));
    let frame = ws_next_json(&mut bystander, WAIT).await.unwrap();
    assert_eq!(frame["payload"]["temperature"], 0.5);
    assert_eq!(frame["offset"], 1);

    // Listed with its facts, and returned as it was sent.
    let specs = daemon.get_json("/api/v1/specs").await.unwrap();
    let listed = spec_in(&specs, &live);
    assert_eq!(listed["source"], "api");
    assert_eq!(listed["kind"], "asyncapi");
    assert_eq!(listed["specVersion"], "3.0.0");
    assert_eq!(listed["version"], "1.0.0");
    assert_eq!(listed["channels"], 2);
    assert_eq!(listed["operations"], 2);
    assert!(
        listed["addedAt"].as_str().unwrap().ends_with('Z'),
        "{listed}"
    );
    assert_eq!(spec_in(&specs, &kept)["source"], "file");
    let r = reqwest::get(daemon.url(&format!("/api/v1/specs/{live}")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    assert_eq!(r.text().await.unwrap(), text);
    // A document from the specs directory is the operator's file: not removed over the API.
    assert_eq!(
        delete(&daemon, &format!("/api/v1/specs/{kept}"))
            .await
            .status(),
        409
    );

    // Still there after a restart, and still subscribed upstream.
    drop((sse, ws, bystander));
    daemon.restart().await.unwrap();
    let mut bystander_after_restart = ws_connect(&daemon.ws_url(&format!("/ws/{kept_channel}")))
        .await
        .unwrap();
    let specs = daemon.get_json("/api/v1/specs").await.unwrap();
    assert!(specs.to_string().contains(&live), "{specs}");
    let mut sse = SseClient::connect(&daemon.url(&format!("/sse/{telemetry}")), None)
        .await
        .unwrap();
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{telemetry}")))
        .await
        .unwrap();
    let frame = publish_until_seen(&mut sse, &topic, &json!({"temperature": 30.0})).await;
    assert_eq!(frame["payload"]["temperature"], 30.0);
    // The first message was kept in the log across the restart.
    assert!(frame["offset"].as_u64().unwrap() >= 2, "{frame}");

    // Removed: its SSE stream ends with `event: removed`, its WebSocket closes with 1001.
    let r = delete(&daemon, &format!("/api/v1/specs/{live}?purge=true")).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let removed: Value = r.json().await.unwrap();
    assert_eq!(
        removed["channels"].as_array().unwrap().len(),
        2,
        "{removed}"
    );
    assert!(
        removed["purgedMessages"].as_u64().unwrap() >= 2,
        "{removed}"
    );
    let event = loop {
        let e = sse.next(WAIT).await.unwrap();
        if e.event != "message" {
            break e;
        }
    };
    assert_eq!(event.event, "removed", "{event:?}");
    assert!(sse.next(WAIT).await.is_err(), "the SSE stream ends");
    assert_closed_as_removed(&mut ws).await;

    let channels = daemon.get_json("/api/v1/channels").await.unwrap();
    let ids = channel_ids(&channels);
    assert!(!ids.iter().any(|c| c.starts_with(&live)), "{ids:?}");
    assert!(ids.contains(&kept_channel));
    let r = reqwest::get(daemon.url(&format!("/api/v1/specs/{live}")))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let connections = daemon.get_json("/api/v1/connections").await.unwrap();
    assert!(!connections.to_string().contains(&live), "{connections}");
    assert_eq!(
        reqwest::get(daemon.url(&format!("/sse/{telemetry}")))
            .await
            .unwrap()
            .status(),
        404
    );

    // The untouched document's client stayed connected through the removal.
    mosquitto_pub(&kept_topic, &json!({"temperature": 1.5}));
    let frame = ws_next_json(&mut bystander_after_restart, WAIT)
        .await
        .unwrap();
    assert_eq!(frame["payload"]["temperature"], 1.5);

    // Gone for good: not back after another restart.
    daemon.restart().await.unwrap();
    let specs = daemon.get_json("/api/v1/specs").await.unwrap();
    assert!(!specs.to_string().contains(&live), "{specs}");
    assert_eq!(
        delete(&daemon, &format!("/api/v1/specs/{live}"))
            .await
            .status(),
        404
    );
}

/// The fleet document: `telemetry` (A) read from devices, `config` (C) sent to them, `legacy`
/// (D) read; version 2 adds `alerts` (B), requires `mode` in `config` and drops `legacy`.
fn fleet(api: &str, p: &str, version: u8) -> String {
    let (config_required, legacy_or_alerts) = if version == 1 {
        (
            "[interval]",
            format!(
                "legacy:\n    address: '{p}/legacy'\n    messages:\n      old: {{payload: {{type: object}}}}"
            ),
        )
    } else {
        (
            "[interval, mode]",
            format!(
                "alerts:\n    address: '{p}/alerts'\n    messages:\n      alert: {{payload: {{type: object, required: [level], properties: {{level: {{type: string}}}}}}}}"
            ),
        )
    };
    let extra_operation = if version == 1 {
        "receiveLegacy: {action: receive, channel: {$ref: '#/channels/legacy'}}"
    } else {
        "receiveAlerts: {action: receive, channel: {$ref: '#/channels/alerts'}, bindings: {mqtt: {qos: 1}}}"
    };
    format!(
        r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Fleet, version: {version}.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  telemetry:
    address: '{p}/t/{{deviceId}}'
    messages:
      reading: {{payload: {{type: object, required: [seq], properties: {{seq: {{type: integer}}}}}}}}
  config:
    address: '{p}/config/{{deviceId}}'
    messages:
      settings: {{payload: {{type: object, required: {config_required}, properties: {{interval: {{type: integer}}, mode: {{type: string}}}}}}}}
  {legacy_or_alerts}
operations:
  receiveTelemetry: {{action: receive, channel: {{$ref: '#/channels/telemetry'}}, bindings: {{mqtt: {{qos: 1}}}}}}
  sendConfig: {{action: send, channel: {{$ref: '#/channels/config'}}, bindings: {{mqtt: {{qos: 1}}}}}}
  {extra_operation}
"#
    )
}

async fn put_spec(daemon: &Daemon, path: &str, text: &str) -> reqwest::Response {
    reqwest::Client::new()
        .put(daemon.url(path))
        .header("content-type", "application/yaml")
        .body(text.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_under_load_is_applied_by_diff_and_unchanged_clients_notice_nothing() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    let (api, p) = (unique("fleet"), unique("f"));
    let (sink_api, sink_p) = (unique("sink"), unique("s"));
    let sink_spec = sink(&specs, &sink_api, &sink_p);

    // Registered over the API, then picked up by a daemon that bridges its telemetry.
    {
        let mut first = Daemon::start_in(&data, &["--specs", sink_spec.to_str().unwrap()])
            .await
            .unwrap();
        let r = post_spec(&first, &format!("{api}.yaml"), &fleet(&api, &p, 1)).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        first.terminate(WAIT).unwrap();
    }
    let bridges = dir.path().join("bridges");
    std::fs::create_dir_all(&bridges).unwrap();
    std::fs::write(
        bridges.join("mirror.yaml"),
        format!(
            "bridges:\n  mirror:\n    from: {api}.telemetry\n    to:\n      - channel: {sink_api}.mirror\n        params: {{deviceId: '{{deviceId}}'}}\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start_in(
        &data,
        &[
            "--specs",
            sink_spec.to_str().unwrap(),
            "--bridges",
            bridges.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();

    let telemetry = format!("{api}.telemetry");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            ws_connect(&daemon.ws_url(&format!("/ws/{telemetry}")))
                .await
                .unwrap(),
        );
    }
    let mut legacy = ws_connect(&daemon.ws_url(&format!("/ws/{api}.legacy")))
        .await
        .unwrap();
    let mut mirror = MqttClient::connect(1883, &unique("mirror")).await.unwrap();
    mirror
        .subscribe(&format!("{sink_p}/mirror/#"))
        .await
        .unwrap();

    // A dry run and a refused breaking change leave everything as it is.
    let v2 = fleet(&api, &p, 2);
    let spec_path = format!("/api/v1/specs/{api}");
    let r = put_spec(&daemon, &format!("{spec_path}?dry_run=true"), &v2).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let dry: Value = r.json().await.unwrap();
    assert_eq!(dry["dryRun"], true);
    let r = put_spec(&daemon, &format!("{spec_path}?allow_breaking=false"), &v2).await;
    assert_eq!(r.status(), 409);
    let refused: Value = r.json().await.unwrap();
    assert_eq!(
        refused["error"]["details"]["diff"], dry["diff"],
        "{refused}"
    );
    let kept = reqwest::get(daemon.url(&spec_path))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(kept, fleet(&api, &p, 1));
    // A change that removes a channel a bridge reads is refused whole.
    let without_telemetry = fleet(&api, &p, 1).replace("telemetry", "telemetry2");
    let r = put_spec(&daemon, &spec_path, &without_telemetry).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("bridge 'mirror'"));

    // 3,000 messages at 1,000/s; the replacement lands a second in.
    const COUNT: u64 = 3000;
    let (publisher, mut acked) = spawn_publisher(
        format!("{p}/t/d1"),
        |seq| json!({"seq": seq}).to_string(),
        0..COUNT,
        1000,
    );
    acked.wait_for(|n| *n >= 1000).await.unwrap();
    let r = put_spec(&daemon, &spec_path, &v2).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let replaced: Value = r.json().await.unwrap();
    assert_eq!(
        replaced["reconnected"], false,
        "the MQTT connector follows the new channels on its connection: {replaced}"
    );
    assert_eq!(
        replaced["bridges"],
        json!({"added": [], "changed": [], "removed": [], "unchanged": ["mirror"]}),
        "the bridge on A, whose channels did not change, keeps running: {replaced}"
    );
    let diff = &replaced["diff"];
    assert_eq!(
        diff["channels"]["added"],
        json!([format!("{api}.alerts")]),
        "{diff}"
    );
    assert_eq!(
        diff["channels"]["removed"],
        json!([format!("{api}.legacy")]),
        "{diff}"
    );
    assert_eq!(
        diff["channels"]["changed"],
        json!([format!("{api}.config")]),
        "{diff}"
    );
    let breaking: Vec<(String, String)> = diff["breaking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["change"].as_str().unwrap().to_owned(),
                c["path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        breaking.contains(&("channel-removed".into(), String::new())),
        "{breaking:?}"
    );
    assert!(
        breaking.contains(&("required-added".into(), "/required".into())),
        "{breaking:?}"
    );
    assert_eq!(dry["diff"], *diff);
    assert_eq!(publisher.await.unwrap(), COUNT);

    // A's clients, on the connection they opened before: every message once, in order. The
    // document's MQTT connector kept its connection (it subscribed B's filter and unsubscribed
    // D's on it), so the broker redelivered nothing.
    for ws in &mut clients {
        let seqs = seqs_of(ws, COUNT).await;
        assert_eq!(
            seqs,
            (0..COUNT).collect::<Vec<_>>(),
            "every message once, in order"
        );
    }
    // The bridge on A kept its cursor: every message copied, none twice.
    let mut copied = std::collections::BTreeMap::<u64, u32>::new();
    while copied.len() < COUNT as usize {
        let message = mirror
            .recv(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{} of {COUNT} copied: {e}", copied.len()));
        let seq = serde_json::from_slice::<Value>(&message.payload).unwrap()["seq"]
            .as_u64()
            .unwrap();
        *copied.entry(seq).or_default() += 1;
    }
    let duplicates: u32 = copied.values().map(|n| n - 1).sum();
    assert_eq!(
        duplicates, 0,
        "{duplicates} duplicates in the bridge's copies"
    );
    // D's client was closed with 1001.
    assert_closed_as_removed(&mut legacy).await;
    // B serves, subscribed upstream.
    let mut alerts = SseClient::connect(&daemon.url(&format!("/sse/{api}.alerts")), None)
        .await
        .unwrap();
    let frame = publish_until_seen(
        &mut alerts,
        &format!("{p}/alerts"),
        &json!({"level": "high"}),
    )
    .await;
    assert_eq!(frame["payload"]["level"], "high");
    // C validates with the new schema: `mode` is now required.
    let config = format!("/api/v1/channels/{api}.config/messages?deviceId=d1");
    let r = daemon.post_json(&config, &json!({"interval": 5})).await;
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = daemon
        .post_json(&config, &json!({"interval": 5, "mode": "eco"}))
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    // The listing tells the new version.
    let specs = daemon.get_json("/api/v1/specs").await.unwrap();
    let listed = spec_in(&specs, &api);
    assert_eq!(listed["version"], "2.0.0");
    assert_eq!(listed["channels"], 3);
}

/// Two MQTT servers on the same broker: `steady` carries channel `a`, `moving` channel `b`;
/// `moving_host` is where `moving` is.
fn two_servers(api: &str, p: &str, moving_host: &str) -> String {
    format!(
        r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Two servers, version: 1.0.0}}
servers:
  steady: {{host: '127.0.0.1:1883', protocol: mqtt}}
  moving: {{host: '{moving_host}', protocol: mqtt}}
channels:
  a:
    address: '{p}/a/{{deviceId}}'
    servers: [{{$ref: '#/servers/steady'}}]
    messages:
      m: {{payload: {{type: object, properties: {{seq: {{type: integer}}}}}}}}
  b:
    address: '{p}/b/{{deviceId}}'
    servers: [{{$ref: '#/servers/moving'}}]
    messages:
      m: {{payload: {{type: object}}}}
operations:
  receiveA: {{action: receive, channel: {{$ref: '#/channels/a'}}, bindings: {{mqtt: {{qos: 1}}}}}}
  receiveB: {{action: receive, channel: {{$ref: '#/channels/b'}}, bindings: {{mqtt: {{qos: 1}}}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_server_reconnects_its_own_connector_only() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    iot_spec(&specs, &unique("base"), &unique("b"), 1);
    let daemon = Daemon::start(&["--specs", specs.to_str().unwrap()])
        .await
        .unwrap();
    let (api, p) = (unique("two"), unique("t"));
    let name = format!("{api}.yaml");
    let r = post_spec(&daemon, &name, &two_servers(&api, &p, "127.0.0.1:1883")).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let mut on_a = ws_connect(&daemon.ws_url(&format!("/ws/{api}.a")))
        .await
        .unwrap();
    let mut on_b = SseClient::connect(&daemon.url(&format!("/sse/{api}.b")), None)
        .await
        .unwrap();
    publish_until_seen(&mut on_b, &format!("{p}/b/1"), &json!({"n": 1})).await;
    let connected = |server: &str| {
        daemon
            .log()
            .matches(&format!("upstream connected server=\"{api}/{server}\""))
            .count()
    };
    assert_eq!((connected("steady"), connected("moving")), (1, 1));

    // 1,000 messages on `a` at 500/s; `moving` moves to another name of the broker meanwhile.
    const COUNT: u64 = 1000;
    let (publisher, mut acked) = spawn_publisher(
        format!("{p}/a/1"),
        |seq| json!({"seq": seq}).to_string(),
        0..COUNT,
        500,
    );
    acked.wait_for(|n| *n >= 300).await.unwrap();
    let r = put_spec(
        &daemon,
        &format!("/api/v1/specs/{api}"),
        &two_servers(&api, &p, "localhost:1883"),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let replaced: Value = r.json().await.unwrap();
    assert_eq!(
        replaced["diff"]["servers"]["changed"],
        json!(["moving"]),
        "{replaced}"
    );
    assert_eq!(replaced["reconnected"], true, "{replaced}");
    assert_eq!(publisher.await.unwrap(), COUNT);

    // `a`'s client saw every message once, in order: its server's connector never let go.
    let seqs = seqs_of(&mut on_a, COUNT).await;
    assert_eq!(seqs, (0..COUNT).collect::<Vec<_>>());
    let deadline = tokio::time::Instant::now() + WAIT;
    while connected("moving") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        connected("steady"),
        1,
        "only the changed server reconnected"
    );
    assert!(
        daemon.log().contains(&format!(
            "connectors restarted for the change document={api} servers=[\"moving\"]"
        )),
        "{}",
        daemon.log()
    );
    // `b` is served through the moved server, on the same SSE stream.
    publish_until_seen(&mut on_b, &format!("{p}/b/2"), &json!({"n": 2})).await;
}
