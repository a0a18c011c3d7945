//! `/mcp` driven by real MCP clients — the official Python SDK (`mcp` from PyPI, revision
//! 2026-07-28) and TypeScript SDK (`@modelcontextprotocol/sdk` from npm, 2025-11-25 sessions) —
//! against the daemon as a process on the shipped IoT and device-registry documents, its own
//! Mosquitto, and a device registry the test runs on loopback (axum).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Json;
use axum::extract::Path;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(30);
const FULL_KEY: &str = "agent-key-full-0123456789";
const READER_KEY: &str = "agent-key-read-0123456789";

fn clients_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_clients")
}

/// Fails with the command that installs a missing client.
fn require_clients() {
    let python = std::process::Command::new("python3")
        .args(["-c", "import mcp, httpx2"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python,
        "the Python MCP SDK is missing: run `python3 -m pip install mcp`"
    );
    assert!(
        clients_dir()
            .join("node_modules/@modelcontextprotocol/sdk")
            .is_dir(),
        "the TypeScript MCP SDK is missing: run `npm ci --prefix tests/mcp_clients`"
    );
}

/// One agent process, its report lines read as they come.
struct Agent {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    name: &'static str,
}

impl Agent {
    fn start(sdk: &'static str, url: &str, scenario: &str, arg: &str, key: Option<&str>) -> Agent {
        let mut command = match sdk {
            "python" => {
                let mut c = Command::new("python3");
                c.arg(clients_dir().join("python_agent.py"));
                c
            }
            _ => {
                let mut c = Command::new("node");
                c.arg(clients_dir().join("ts_agent.mjs"));
                c
            }
        };
        command
            .args([url, scenario, arg])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .env_remove("STEPFLOW_API_KEY");
        if let Some(key) = key {
            command.env("STEPFLOW_API_KEY", key);
        }
        let mut child = command.spawn().expect("start the agent");
        let stdout = child.stdout.take().expect("piped");
        Agent {
            child,
            lines: BufReader::new(stdout).lines(),
            name: sdk,
        }
    }

    /// The next report line.
    async fn next(&mut self, timeout: Duration) -> Result<Value> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .with_context(|| format!("{} agent: no report within {timeout:?}", self.name))??
            .with_context(|| format!("{} agent ended early", self.name))?;
        let value: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        if value["step"] == "failed" {
            bail!("{} agent failed: {}", self.name, value["error"]);
        }
        Ok(value)
    }

    /// The report of `step`.
    async fn step(&mut self, step: &str) -> Result<Value> {
        let value = self.next(WAIT).await?;
        if value["step"] != step {
            bail!("{} agent: expected step {step}, got {value}", self.name);
        }
        Ok(value)
    }

    async fn finish(mut self) -> Result<()> {
        let status = tokio::time::timeout(WAIT, self.child.wait()).await??;
        if !status.success() {
            bail!("{} agent exited with {status}", self.name);
        }
        Ok(())
    }
}

/// The device registry the shipped OpenAPI document describes.
async fn start_registry() -> u16 {
    async fn get_device(Path(id): Path<String>) -> Json<Value> {
        Json(json!({"id": id, "name": format!("device {id}"), "firmware": "1.2.3"}))
    }
    let app = axum::Router::new().route("/devices/{id}", axum::routing::get(get_device));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

struct Gateway {
    daemon: Daemon,
    broker: OwnMosquitto,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// The shipped IoT and device-registry documents, with two agent keys (everything, and
    /// `subscribe:iot.*` only) and, when `jwt_issuer` is given, a JWT issuer.
    async fn start(jwt_issuer: Option<&str>) -> Gateway {
        require_mosquitto();
        require_clients();
        let broker = OwnMosquitto::start();
        let registry = start_registry().await;
        let dir = tempfile::tempdir().unwrap();
        let jwt = jwt_issuer.map_or(String::new(), |issuer| {
            format!("  jwt:\n    - issuer: {issuer}\n      jwks_url: http://127.0.0.1:9/jwks\n")
        });
        let config = dir.path().join("stepflow.yaml");
        std::fs::write(
            &config,
            format!(
                "servers:\n  device-registry:\n    url: http://127.0.0.1:{registry}\n    timeout_ms: 2000\n\
                 auth:\n  api_keys:\n    - id: agent\n      key: {FULL_KEY}\n      scopes: ['*']\n\
                 \x20   - id: reader\n      key: {READER_KEY}\n      scopes: ['subscribe:iot.*']\n{jwt}"
            ),
        )
        .unwrap();
        let root = env!("CARGO_MANIFEST_DIR");
        let server = format!("mosquitto={}", broker.url());
        let daemon = Daemon::start(&[
            "--config",
            config.to_str().unwrap(),
            "--specs",
            &format!("{root}/asyncapi-specs/iot-telemetry.yaml"),
            "--specs",
            &format!("{root}/asyncapi-specs/device-registry.openapi.yaml"),
            "--server",
            &server,
        ])
        .await
        .unwrap();
        Gateway {
            daemon,
            broker,
            _dir: dir,
        }
    }

    fn mcp(&self) -> String {
        self.daemon.url("/mcp")
    }

    async fn telemetry(&self, device: &str, temperature: f64) {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.broker.port.to_string()])
            .args([
                "-q",
                "1",
                "-t",
                &format!("devices/{device}/telemetry"),
                "-m",
            ])
            .arg(json!({"temperature": temperature, "ts": "2026-12-02T10:00:00Z"}).to_string())
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    }

    /// Waits until `channel`'s log holds `count` messages.
    async fn wait_logged(&self, channel: &str, count: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let view: Value = reqwest::Client::new()
                .get(self.daemon.url(&format!("/api/v1/channels/{channel}")))
                .bearer_auth(FULL_KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if view["log"]["messages"].as_u64() >= Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{channel} never logged {count}: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, method: &str, outcome: &str) -> f64 {
        let client = reqwest::Client::new();
        let text = client
            .get(self.daemon.url("/metrics"))
            .bearer_auth(FULL_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line =
            format!("stepflow_mcp_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
    }
}

fn names(tools: &Value) -> Vec<String> {
    tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_str()
                .map_or_else(|| t["name"].as_str().unwrap().to_owned(), str::to_owned)
        })
        .collect()
}

fn lists(array: &Value, item: &str) -> bool {
    array.as_array().unwrap().contains(&json!(item))
}

async fn command_on(mqtt: &mut MqttClient, topic: &str) -> Value {
    let publish = mqtt.recv(WAIT).await.expect("the command reaches MQTT");
    assert_eq!(publish.topic, topic);
    serde_json::from_slice(&publish.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_typescript_agents_list_publish_call_and_read() {
    let gw = Gateway::start(None).await;
    let mut commands = MqttClient::connect(gw.broker.port, &unique("cmd-sub"))
        .await
        .unwrap();
    commands.subscribe("devices/+/commands").await.unwrap();
    gw.telemetry("d-py", 21.5).await;
    gw.wait_logged("iot.telemetry", 1).await;

    // The Python SDK speaks the current revision, statelessly.
    let mut py = Agent::start("python", &gw.mcp(), "tour", "d-py", Some(FULL_KEY));
    assert_eq!(
        py.step("connected").await.unwrap()["protocol"],
        "2026-07-28"
    );
    let tools = py.step("tools").await.unwrap();
    let listed = names(&tools["tools"]);
    for expected in [
        "list_channels",
        "describe_channel",
        "read_messages",
        "publish_iot_commands",
        "call_device-registry_getDevice",
        "call_device-registry_registerDevice",
    ] {
        assert!(
            listed.contains(&expected.to_owned()),
            "{expected} in {listed:?}"
        );
    }
    // Read-only channels have no publish tool, and operations are called, not published to.
    assert!(!listed.contains(&"publish_iot_telemetry".to_owned()));
    assert!(
        !listed
            .iter()
            .any(|n| n.starts_with("publish_device-registry"))
    );
    let tool = |name: &str| {
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone()
    };
    let publish = tool("publish_iot_commands");
    let input = &publish["inputSchema"];
    assert_eq!(
        input["properties"]["payload"]["properties"]["action"]["enum"],
        json!(["reboot", "set-interval", "identify"])
    );
    assert!(
        input["required"]
            .as_array()
            .unwrap()
            .contains(&json!("deviceId"))
    );
    assert!(
        publish["description"]
            .as_str()
            .unwrap()
            .contains("Commands for one device")
    );
    let call = tool("call_device-registry_getDevice");
    assert_eq!(
        call["inputSchema"]["properties"]["path"]["properties"]["deviceId"]["pattern"],
        "^[a-z0-9-]+$"
    );
    assert_eq!(call["outputSchema"]["required"], json!(["id", "name"]));

    let resources = py.step("resources").await.unwrap();
    assert!(lists(
        &resources["uris"],
        "stepflow://channels/iot.telemetry"
    ));
    let templates = py.step("templates").await.unwrap();
    assert!(lists(
        &templates["uris"],
        "stepflow://channels/iot.telemetry/{deviceId}"
    ));

    let published = py.step("publish").await.unwrap();
    assert_eq!(published["isError"], false, "{published}");
    assert!(published["structured"]["offset"].as_u64().unwrap() >= 1);
    assert_eq!(published["structured"]["address"], "devices/d-py/commands");
    assert_eq!(
        command_on(&mut commands, "devices/d-py/commands").await,
        json!({"action": "reboot"})
    );

    // A payload that fails the schema is a tool error with the paths, not a protocol error.
    let invalid = py.step("publish_invalid").await.unwrap();
    assert_eq!(invalid["isError"], true);
    assert_eq!(invalid["structured"]["details"]["path"], "/payload/action");
    assert_eq!(
        invalid["structured"]["details"]["schemaPath"],
        "/properties/action/enum"
    );

    let called = py.step("call").await.unwrap();
    assert_eq!(called["isError"], false, "{called}");
    assert_eq!(
        called["structured"],
        json!({"id": "d-py", "name": "device d-py", "firmware": "1.2.3"})
    );
    let call_invalid = py.step("call_invalid").await.unwrap();
    assert_eq!(call_invalid["isError"], true);
    assert_eq!(
        call_invalid["structured"]["details"]["problems"][0]["at"],
        "path.deviceId"
    );

    let read = py.step("read").await.unwrap();
    let messages = read["structured"]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{read}");
    assert_eq!(messages[0]["payload"]["temperature"], 21.5);
    assert_eq!(messages[0]["params"]["deviceId"], "d-py");

    let described = py.step("describe").await.unwrap();
    assert_eq!(described["structured"]["direction"], "readable");
    assert_eq!(described["structured"]["rate"]["messagesLastMinute"], 1);
    assert!(described["structured"]["messages"][0]["schema"].is_object());

    let resource: Value =
        serde_json::from_str(py.step("resource").await.unwrap()["text"].as_str().unwrap()).unwrap();
    assert_eq!(resource["messages"][0]["payload"]["temperature"], 21.5);
    let by_device: Value = serde_json::from_str(
        py.step("resource_template").await.unwrap()["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(by_device["messages"].as_array().unwrap().len(), 1);
    py.finish().await.unwrap();

    // The TypeScript SDK speaks 2025-11-25, in a session.
    let mut ts = Agent::start("typescript", &gw.mcp(), "tour", "d-ts", Some(FULL_KEY));
    let connected = ts.step("connected").await.unwrap();
    assert_eq!(connected["protocol"], "2025-11-25");
    assert!(connected["session"].is_string(), "{connected}");
    assert!(
        names(&ts.step("tools").await.unwrap()["names"])
            .contains(&"publish_iot_commands".to_owned())
    );
    ts.step("resources").await.unwrap();
    let published = ts.step("publish").await.unwrap();
    assert_eq!(published["isError"], false, "{published}");
    assert_eq!(
        command_on(&mut commands, "devices/d-ts/commands").await,
        json!({"action": "identify"})
    );
    let called = ts.step("call").await.unwrap();
    assert_eq!(called["structured"]["name"], "device d-ts");
    let read = ts.step("read").await.unwrap();
    assert_eq!(
        read["structured"]["messages"][0]["payload"]["temperature"],
        21.5
    );
    ts.finish().await.unwrap();

    assert!(gw.metric("tools/call", "ok").await >= 7.0);

    // The broker gone: the publish is a tool error naming the upstream, and the session lives.
    let mut gw = gw;
    gw.broker.stop();
    let mut py = Agent::start("python", &gw.mcp(), "publish", "d-down", Some(FULL_KEY));
    let refused = py.step("publish").await.unwrap();
    assert_eq!(refused["isError"], true, "{refused}");
    assert!(
        refused["text"]
            .as_str()
            .unwrap()
            .contains("upstream mosquitto"),
        "{refused}"
    );
    py.finish().await.unwrap();
    assert!(gw.metric("tools/call", "tool_error").await >= 2.0);
    assert!(gw.metric("tools/list", "ok").await >= 2.0);
    assert!(
        !gw.daemon.log().contains(FULL_KEY),
        "the log holds the agents' API key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_agents_hear_of_new_messages_within_a_second_and_of_new_tools() {
    let gw = Gateway::start(None).await;
    let uri = "stepflow://channels/iot.telemetry";
    let mut py = Agent::start("python", &gw.mcp(), "listen", uri, Some(FULL_KEY));
    let mut ts = Agent::start("typescript", &gw.mcp(), "subscribe", uri, Some(FULL_KEY));
    py.step("ready").await.unwrap();
    ts.step("ready").await.unwrap();

    for round in 0..3 {
        let sent = Instant::now();
        gw.telemetry(&format!("d-{round}"), 20.0 + round as f64)
            .await;
        for agent in [&mut py, &mut ts] {
            let event = agent.step("event").await.unwrap();
            let waited = sent.elapsed();
            assert_eq!(event["kind"], "resource_updated", "{event}");
            assert_eq!(event["uri"], uri);
            assert!(
                waited < Duration::from_secs(1),
                "{} heard of the message after {waited:?}",
                agent.name
            );
        }
        // Past the coalescing interval: the next message is announced on its own.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A document added at run time: both are told the tool list changed, and see its tools.
    let spec = std::fs::read_to_string(format!(
        "{}/asyncapi-specs/device-registry.openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace(
        "x-stepflow-id: device-registry",
        "x-stepflow-id: fleet-registry",
    );
    let added = reqwest::Client::new()
        .post(gw.daemon.url("/api/v1/specs?name=fleet.yaml"))
        .bearer_auth(FULL_KEY)
        .body(spec)
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201, "{}", added.text().await.unwrap());
    for agent in [&mut py, &mut ts] {
        let event = agent.step("event").await.unwrap();
        assert_eq!(event["kind"], "tools_list_changed", "{event}");
        assert!(
            names(&event["names"]).contains(&"call_fleet-registry_getDevice".to_owned()),
            "{event}"
        );
    }

    // And removed: told again, and the tools are gone.
    let removed = reqwest::Client::new()
        .delete(gw.daemon.url("/api/v1/specs/fleet-registry"))
        .bearer_auth(FULL_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200, "{}", removed.text().await.unwrap());
    for agent in [&mut py, &mut ts] {
        let event = agent.step("event").await.unwrap();
        assert_eq!(event["kind"], "tools_list_changed", "{event}");
        assert!(
            !names(&event["names"])
                .iter()
                .any(|n| n.contains("fleet-registry")),
            "{event}"
        );
    }

    // Open MCP streams do not hold a shutdown up.
    let mut gw = gw;
    let (status, took) = gw.daemon.terminate(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sees_and_uses_only_what_its_scopes_allow_and_the_endpoint_guards_itself() {
    let issuer = "https://login.example.test/";
    let gw = Gateway::start(Some(issuer)).await;

    let mut py = Agent::start("python", &gw.mcp(), "scoped", "", Some(READER_KEY));
    let listed = names(&py.step("tools").await.unwrap()["names"]);
    assert_eq!(
        listed,
        ["list_channels", "describe_channel", "read_messages"]
    );
    let publish = py.step("publish").await.unwrap();
    assert_eq!(publish["isError"], true);
    assert!(
        publish["text"]
            .as_str()
            .unwrap()
            .contains("publish:iot.commands"),
        "{publish}"
    );
    let call = py.step("call").await.unwrap();
    assert_eq!(call["isError"], true);
    assert!(
        call["text"]
            .as_str()
            .unwrap()
            .contains("call:device-registry.getDevice")
    );
    let read = py.step("read").await.unwrap();
    assert_eq!(read["isError"], false, "{read}");
    py.finish().await.unwrap();

    let client = reqwest::Client::new();
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "curl", "version": "1"}}
    });
    let post = |builder: reqwest::RequestBuilder| {
        builder
            .header("accept", "application/json, text/event-stream")
            .json(&initialize)
            .send()
    };
    // No credentials: 401, with where to find the authorization server.
    let r = post(client.post(gw.mcp())).await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let metadata_url = format!(
        "http://127.0.0.1:{}/.well-known/oauth-protected-resource/mcp",
        gw.daemon.port
    );
    assert!(
        challenge.contains(&format!("resource_metadata=\"{metadata_url}\"")),
        "{challenge}"
    );
    let metadata: Value = client
        .get(&metadata_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["authorization_servers"], json!([issuer]));
    assert_eq!(metadata["resource"], gw.mcp());
    // The token travels in Authorization only: a query token is not one.
    let r = post(client.post(format!("{}?access_token={FULL_KEY}", gw.mcp())))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A browser page from another origin: 403, even with a key (DNS rebinding).
    let r = post(
        client
            .post(gw.mcp())
            .bearer_auth(FULL_KEY)
            .header("origin", "http://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(client.post(gw.mcp()).bearer_auth(FULL_KEY))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(gw.metric("tools/list", "ok").await >= 1.0);
    // Neither key the agents presented reaches the daemon's log.
    let log = gw.daemon.log();
    for key in [FULL_KEY, READER_KEY] {
        assert!(!log.contains(key), "the log holds an API key");
    }
}
