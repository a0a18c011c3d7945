//! OpenAPI operations as request-reply channels, against a device registry the test runs on
//! loopback (axum), described by the shipped `asyncapi-specs/device-registry.openapi.yaml`,
//! with the daemon as a process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(15);

/// A request the registry saw: method and path, and its credential header.
type Seen = (String, Option<String>);

/// What the registry saw.
#[derive(Clone, Default)]
struct Registry {
    token_requests: Arc<Mutex<Vec<Option<String>>>>,
    requests: Arc<Mutex<Vec<Seen>>>,
    flaky_failures: Arc<Mutex<u32>>,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn token(State(r): State<Registry>, headers: HeaderMap, body: String) -> Response {
    let auth = header(&headers, "authorization");
    r.token_requests.lock().unwrap().push(auth.clone());
    // gateway:s3cret, as HTTP basic.
    if auth.as_deref() != Some("Basic Z2F0ZXdheTpzM2NyZXQ=")
        || !body.contains("grant_type=client_credentials")
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    Json(json!({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600}))
        .into_response()
}

async fn get_device(
    State(r): State<Registry>,
    Path(id): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let auth = header(&headers, "authorization");
    r.requests
        .lock()
        .unwrap()
        .push((format!("GET /devices/{id}"), auth.clone()));
    if auth.as_deref() != Some("Bearer tok-1") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match id.as_str() {
        "boom" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "kaput"})),
        )
            .into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Json(json!({"id": id, "name": "late"})).into_response()
        }
        "flaky" => {
            let mut failures = r.flaky_failures.lock().unwrap();
            if *failures < 1 {
                *failures += 1;
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            Json(json!({"id": id, "name": "eventually"})).into_response()
        }
        // Not what the document promises: `name` is missing.
        "odd" => Json(json!({"id": id})).into_response(),
        _ => (
            [("x-registry-version", "7")],
            Json(json!({
                "id": id,
                "name": format!("device {id}"),
                "firmware": if query.get("verbose").map(String::as_str) == Some("true") { "1.2.3" } else { "" },
            })),
        )
            .into_response(),
    }
}

async fn register(
    State(r): State<Registry>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = header(&headers, "x-api-key");
    r.requests
        .lock()
        .unwrap()
        .push(("POST /devices".into(), key.clone()));
    if key.as_deref() != Some("k-42") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn start_registry() -> (u16, Registry) {
    let registry = Registry::default();
    let app = axum::Router::new()
        .route("/oauth/token", axum::routing::post(token))
        .route("/devices/{id}", axum::routing::get(get_device))
        .route("/devices", axum::routing::post(register))
        .with_state(registry.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_called_over_http_and_websocket_with_their_credentials() {
    let (port, registry) = start_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  device-registry:\n    url: http://127.0.0.1:{port}\n    token: ${{STEPFLOW_TEST_REGISTRY_KEY}}\n    client_id: gateway\n    client_secret: ${{STEPFLOW_TEST_REGISTRY_SECRET}}\n    timeout_ms: 800\n"
        ),
    )
    .unwrap();
    let spec = format!(
        "{}/asyncapi-specs/device-registry.openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let daemon = Daemon::start_with_env(
        &["--specs", &spec, "--config", config.to_str().unwrap()],
        &[
            ("STEPFLOW_TEST_REGISTRY_KEY", "k-42"),
            ("STEPFLOW_TEST_REGISTRY_SECRET", "s3cret"),
        ],
    )
    .await
    .unwrap();

    // The sync call: the upstream's real answer, with an OAuth2 token fetched once and cached.
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "42"}, "query": {"verbose": "true"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-registry-version"],
        "7",
        "upstream headers pass"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": "42", "name": "device 42", "firmware": "1.2.3"})
    );
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "43"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        registry.token_requests.lock().unwrap().len(),
        1,
        "the token is cached"
    );

    // Upstream errors pass through with their status and body.
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "boom"}}),
    )
    .await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"error": "kaput"}));

    // A slow upstream: 504 after the configured timeout.
    let started = Instant::now();
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "slow"}}),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // A caller that gives up early leaves nothing pending behind.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap()
        .post(daemon.url("/api/v1/operations/device-registry.getDevice/call"))
        .header("content-type", "application/json")
        .body(json!({"path": {"deviceId": "slow"}}).to_string())
        .send()
        .await;
    assert!(impatient.is_err(), "the client timed out");
    let deadline = Instant::now() + WAIT;
    while daemon.metric("stepflow_calls_pending", &[]).await.unwrap() != 0.0 {
        assert!(Instant::now() < deadline, "a dropped call stays pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An idempotent call is retried after a 503; the caller sees the success.
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "flaky"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let flaky = registry
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(what, _)| what == "GET /devices/flaky")
        .count();
    assert_eq!(flaky, 2);

    // Bad requests get 400 and the upstream sees nothing.
    let before = registry.requests.lock().unwrap().len();
    for (op, request, at) in [
        (
            "device-registry.registerDevice",
            json!({"body": {"id": "Bad Id", "name": "x"}}),
            "body/id",
        ),
        (
            "device-registry.registerDevice",
            json!({"body": {"id": "d1", "name": "x", "color": "red"}}),
            "body",
        ),
        ("device-registry.registerDevice", json!({}), "body"),
        (
            "device-registry.getDevice",
            json!({"path": {"deviceId": "UPPER"}}),
            "path.deviceId",
        ),
        ("device-registry.getDevice", json!({}), "path.deviceId"),
        (
            "device-registry.getDevice",
            json!({"path": {"deviceId": "1"}, "query": {"verbose": "maybe"}}),
            "query.verbose",
        ),
    ] {
        let r = call_operation(&daemon, op, request.clone()).await;
        assert_eq!(r.status(), 400, "{request}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["details"]["problems"][0]["at"], at, "{body}");
    }
    assert_eq!(registry.requests.lock().unwrap().len(), before);

    // The API key goes where the scheme says.
    let device = json!({"id": "d-7", "name": "Boiler"});
    let r = call_operation(
        &daemon,
        "device-registry.registerDevice",
        json!({"body": device}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap(), device);
    assert!(
        registry
            .requests
            .lock()
            .unwrap()
            .contains(&("POST /devices".into(), Some("k-42".into())))
    );

    // A response that breaks its schema is passed on, and counted.
    let r = call_operation(
        &daemon,
        "device-registry.getDevice",
        json!({"path": {"deviceId": "odd"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        daemon
            .metric(
                "stepflow_call_response_mismatches_total",
                &[("operation", "device-registry.getDevice")]
            )
            .await
            .unwrap(),
        1.0
    );

    // The WebSocket-correlated call: replies come back on the socket, by correlation id.
    let mut ws = ws_connect(&daemon.ws_url("/ws/operations")).await.unwrap();
    for (id, device) in [("c-1", "7"), ("c-2", "boom")] {
        ws.send(WsMessage::text(
            json!({"op": "device-registry.getDevice", "correlationId": id, "request": {"path": {"deviceId": device}}}).to_string(),
        ))
        .await
        .unwrap();
    }
    ws.send(WsMessage::text(
        json!({"op": "device-registry.getDevice", "correlationId": "c-3", "request": {}})
            .to_string(),
    ))
    .await
    .unwrap();
    let mut replies = std::collections::BTreeMap::new();
    while replies.len() < 3 {
        let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
        replies.insert(frame["correlationId"].as_str().unwrap().to_owned(), frame);
    }
    assert_eq!(replies["c-1"]["type"], "reply");
    assert_eq!(replies["c-1"]["status"], 200);
    assert_eq!(replies["c-1"]["body"]["name"], "device 7");
    assert_eq!(replies["c-1"]["headers"]["x-registry-version"], "7");
    assert_eq!(replies["c-2"]["status"], 500);
    assert_eq!(replies["c-3"]["type"], "error");
    assert_eq!(replies["c-3"]["error"]["code"], "invalid_request");

    // The call log, and the metrics.
    let log = daemon
        .get_json("/api/v1/operations/device-registry.getDevice/calls?limit=100")
        .await
        .unwrap();
    let calls = log["calls"].as_array().unwrap();
    let statuses: Vec<&Value> = calls.iter().map(|c| &c["status"]).collect();
    assert!(
        statuses.contains(&&json!(500)) && statuses.contains(&&json!(200)),
        "{log}"
    );
    let timeout = calls
        .iter()
        .find(|c| c["error"]["code"] == "timeout")
        .expect("the timeout is logged");
    assert!(timeout["latencyMs"].as_f64().unwrap() >= 700.0);
    assert_eq!(
        daemon.metric("stepflow_calls_pending", &[]).await.unwrap(),
        0.0
    );
    assert!(
        daemon
            .metric(
                "stepflow_calls_total",
                &[
                    ("operation", "device-registry.getDevice"),
                    ("outcome", "timeout")
                ]
            )
            .await
            .unwrap()
            >= 1.0
    );
    assert!(!daemon.log().contains("s3cret") && !daemon.log().contains("k-42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openapi_document_added_at_run_time_is_callable_and_kept() {
    let (port, registry) = start_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        "servers:\n  registry2:\n    client_id: gateway\n    client_secret: s3cret\n",
    )
    .unwrap();
    // Any document to start with; the registry comes later.
    let alerts = format!(
        "{}/asyncapi-specs/alerts-sse.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut daemon = Daemon::start(&["--specs", &alerts, "--config", config.to_str().unwrap()])
        .await
        .unwrap();
    let shipped = std::fs::read_to_string(format!(
        "{}/asyncapi-specs/device-registry.openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let document = shipped
        .replace("x-stepflow-id: device-registry", "x-stepflow-id: registry2")
        .replace("http://127.0.0.1:9303", &format!("http://127.0.0.1:{port}"));
    let post = |body: String| {
        let url = daemon.url("/api/v1/specs");
        async move {
            reqwest::Client::new()
                .post(url)
                .header("content-type", "application/yaml")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };

    // A broken document: every problem, located.
    let broken = document.replace("operationId: getDevice", "operationId: [getDevice]");
    let r = post(broken).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let errors = body["error"]["details"]["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .unwrap()
            .contains("registry2.yaml#/paths/~1devices~1{deviceId}/get/operationId")),
        "{body}"
    );

    let r = post(document.clone()).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = call_operation(
        &daemon,
        "registry2.getDevice",
        json!({"path": {"deviceId": "5"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "device 5");
    assert_eq!(registry.token_requests.lock().unwrap().len(), 1);

    // The same id again is refused; an AsyncAPI document is added as well (its channels
    // serve at once: tests/registry.rs follows one end to end).
    assert_eq!(post(document).await.status(), 409);
    let r = post(
        std::fs::read_to_string(&alerts)
            .unwrap()
            .replace("x-stepflow-id: alerts", "x-stepflow-id: alerts2"),
    )
    .await;
    assert_eq!(r.status(), 201);
    let added: Value = r.json().await.unwrap();
    assert!(
        added["channels"].as_array().is_some_and(|c| !c.is_empty()
            && c.iter()
                .all(|c| c.as_str().unwrap().starts_with("alerts2."))),
        "{added}"
    );

    // Kept across a restart.
    daemon.restart().await.unwrap();
    let r = call_operation(
        &daemon,
        "registry2.getDevice",
        json!({"path": {"deviceId": "6"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let listed = daemon.get_json("/api/v1/operations").await.unwrap();
    assert!(
        listed["operations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == "registry2.registerDevice"),
        "{listed}"
    );
}

/// Publishes a lookup for device `id` on `{p}/lookups/{id}`.
async fn send_lookup(client: &MqttClient, p: &str, id: &str, correlation: &str) {
    client
        .client
        .publish(
            format!("{p}/lookups/{id}"),
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"correlationId": correlation}).to_string(),
        )
        .await
        .unwrap();
}

/// The daemon on `lookups` and the shipped registry, with `{api}.lookups` triggering
/// `device-registry.getDevice` and replying on `{api}.replies`.
async fn start_with_trigger(
    dir: &std::path::Path,
    lookups: &std::path::Path,
    port: u16,
    api: &str,
) -> Daemon {
    let config = dir.join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  device-registry:\n    url: http://127.0.0.1:{port}\n    client_id: gateway\n    client_secret: s3cret\nroutes:\n  {api}.lookups:\n    call: {{operation: device-registry.getDevice, reply: {api}.replies}}\n"
        ),
    )
    .unwrap();
    let registry_spec = format!(
        "{}/asyncapi-specs/device-registry.openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    Daemon::start(&[
        "--specs",
        lookups.to_str().unwrap(),
        "--specs",
        &registry_spec,
        "--config",
        config.to_str().unwrap(),
    ])
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_the_broker_triggers_the_call_and_the_reply_is_published() {
    require_mosquitto();
    let (port, registry) = start_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let api = unique("lookups");
    let p = unique("t");
    let lookups = dir.path().join("lookups.yaml");
    std::fs::write(
        &lookups,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Device lookups over MQTT, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  lookups:
    address: '{p}/lookups/{{deviceId}}'
    messages:
      lookup: {{payload: {{type: object, properties: {{correlationId: {{type: string}}}}}}}}
  replies:
    address: '{p}/lookups/{{deviceId}}/reply'
    messages:
      reply: {{payload: {{type: object, required: [correlationId]}}}}
operations:
  receiveLookups: {{action: receive, channel: {{$ref: '#/channels/lookups'}}}}
  sendReplies: {{action: send, channel: {{$ref: '#/channels/replies'}}}}
"#
        ),
    )
    .unwrap();
    let mut daemon = start_with_trigger(dir.path(), &lookups, port, &api).await;
    let mut device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    device
        .subscribe(&format!("{p}/lookups/+/reply"))
        .await
        .unwrap();
    for (id, correlation) in [("42", "q-1"), ("boom", "q-2")] {
        send_lookup(&device, &p, id, correlation).await;
    }
    let mut replies = std::collections::BTreeMap::new();
    while replies.len() < 2 {
        let reply = device.recv(WAIT).await.unwrap();
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        replies.insert(
            body["correlationId"].as_str().unwrap().to_owned(),
            (reply.topic, body),
        );
    }
    let (topic, ok) = &replies["q-1"];
    assert_eq!(topic, &format!("{p}/lookups/42/reply"));
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["body"]["name"], "device 42");
    let (_, failed) = &replies["q-2"];
    assert_eq!(failed["status"], 500);
    assert_eq!(failed["body"], json!({"error": "kaput"}));
    // The triggered calls are in the operation's call log too.
    let log = daemon
        .get_json("/api/v1/operations/device-registry.getDevice/calls")
        .await
        .unwrap();
    assert_eq!(log["calls"].as_array().unwrap().len(), 2, "{log}");

    // A crash while a call is out: the message is logged (and acknowledged to the broker, which
    // will not send it again), the call is made again after the restart from the trigger's cursor.
    send_lookup(&device, &p, "slow", "q-3").await;
    let slow_calls = || {
        registry
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| r == "GET /devices/slow")
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while slow_calls() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow call was not made"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9();
    daemon.restart().await.unwrap();
    // At-least-once: earlier lookups answered within the last cursor interval may be answered
    // again; q-3 must come.
    let body = loop {
        let reply = device.recv(Duration::from_secs(30)).await.unwrap();
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        if body["correlationId"] == "q-3" {
            break body;
        }
        assert!(["q-1", "q-2"].contains(&body["correlationId"].as_str().unwrap()));
    };
    assert_eq!(body["body"]["name"], "late");
    assert_eq!(slow_calls(), 2, "called again after the restart");
}

#[test]
fn a_trigger_to_an_unknown_operation_or_route_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        "routes:\n  alerts.alerts:\n    call: {operation: device-registry.nope, reply: alerts.nowhere}\n",
    )
    .unwrap();
    let alerts = format!(
        "{}/asyncapi-specs/alerts-sse.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--specs",
            &alerts,
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("routes.alerts.alerts.call.operation: no operation device-registry.nope"),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes.alerts.alerts.call.reply: no route alerts.nowhere"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_cannot_be_published_is_a_dead_letter_that_replays_upstream() {
    require_mosquitto();
    let (port, _registry) = start_registry().await;
    let mut replies_broker = OwnMosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("lookups");
    let p = unique("t");
    let lookups = dir.path().join("lookups.yaml");
    std::fs::write(
        &lookups,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Lookups in and replies out on two brokers, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
  replies: {{host: '127.0.0.1:{}', protocol: mqtt, x-stepflow-optional: true}}
channels:
  lookups:
    address: '{p}/lookups/{{deviceId}}'
    servers: [{{$ref: '#/servers/broker'}}]
  replies:
    address: '{p}/lookups/{{deviceId}}/reply'
    servers: [{{$ref: '#/servers/replies'}}]
operations:
  receiveLookups: {{action: receive, channel: {{$ref: '#/channels/lookups'}}}}
  sendReplies: {{action: send, channel: {{$ref: '#/channels/replies'}}}}
"#,
            replies_broker.port
        ),
    )
    .unwrap();
    let daemon = start_with_trigger(dir.path(), &lookups, port, &api).await;
    replies_broker.stop();
    let sender = MqttClient::connect(1883, &unique("device")).await.unwrap();
    send_lookup(&sender, &p, "42", "q-9").await;
    let replies = format!("{api}.replies");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = daemon.replay_all(&replies, "dead-letters").await.unwrap();
        if !dead.is_empty() {
            break dead;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reply was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead[0]["payload"]["correlationId"], "q-9");
    assert_eq!(dead[0]["params"]["deviceId"], "42");
    // Counted like every other dead letter (the trigger's path used to bypass the metrics).
    assert_eq!(
        daemon
            .metric(
                "stepflow_dead_letters_total",
                &[("channel", &replies), ("reason", "reply_undeliverable")]
            )
            .await
            .unwrap(),
        1.0
    );

    // The broker is back: a replay publishes the reply where it was going.
    replies_broker.restart();
    let mut device = MqttClient::connect(replies_broker.port, &unique("device"))
        .await
        .unwrap();
    device
        .subscribe(&format!("{p}/lookups/+/reply"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let replay = daemon.replay_dead_letters(&replies, json!({})).await;
        if replay["replayed"] == 1 {
            assert_eq!(replay["remaining"], 0, "{replay}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{replay}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let reply = device.recv(WAIT).await.unwrap();
    assert_eq!(reply.topic, format!("{p}/lookups/42/reply"));
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["correlationId"], "q-9");
    assert_eq!(body["body"]["name"], "device 42");
}
