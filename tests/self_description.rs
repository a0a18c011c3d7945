//! The gateway describes itself: `GET /api/v1/asyncapi.json` passes the reference AsyncAPI
//! parser (npm `@asyncapi/parser`, run by `tests/asyncapi_parser/check.mjs`) for the shipped
//! documents, follows registry changes, and shows a caller only what its scopes allow.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

const ADMIN_KEY: &str = "self-description-admin-0123456789";
const READER_KEY: &str = "self-description-read-0123456789";

fn parser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi_parser")
}

/// Runs the reference parser on `document`: its diagnostics, or the test fails with them.
fn parse_with_reference_parser(document: &Value) -> Value {
    assert!(
        parser_dir().join("node_modules/@asyncapi/parser").exists(),
        "the AsyncAPI parser is missing: run `npm ci --prefix tests/asyncapi_parser`"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), document.to_string()).unwrap();
    let out = Command::new("node")
        .arg(parser_dir().join("check.mjs"))
        .arg(file.path())
        .output()
        .expect("node runs (apt-get install nodejs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "@asyncapi/parser refused /api/v1/asyncapi.json:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `GET path` with `key` as the bearer token.
async fn get_as(daemon: &Daemon, path: &str, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(daemon.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn asyncapi(daemon: &Daemon, key: &str) -> Value {
    let r = get_as(daemon, "/api/v1/asyncapi.json", key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `value`, or what its local `$ref` points at.
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
        Some(pointer) => document
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer} points nowhere")),
        None => value,
    }
}

fn keys(map: &Value) -> Vec<String> {
    map.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asyncapi_self_description_passes_the_reference_parser_and_follows_the_registry() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "auth:\n  api_keys:\n    - id: admin\n      key: {ADMIN_KEY}\n      scopes: ['*']\n\
             \x20   - id: reader\n      key: {READER_KEY}\n      scopes: ['subscribe:iot.*']\n"
        ),
    )
    .unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        &format!("{root}/asyncapi-specs"),
    ])
    .await
    .unwrap();
    let r = reqwest::get(daemon.url("/api/v1/asyncapi.json"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "behind the same authentication layer");

    // Every shipped document, as the reference parser reads it.
    let document = asyncapi(&daemon, ADMIN_KEY).await;
    assert_eq!(document["asyncapi"], "3.0.0");
    let parsed = parse_with_reference_parser(&document);
    let channels = document["channels"].as_object().unwrap();
    assert_eq!(parsed["channels"], channels.len(), "{parsed}");
    let listed: Value = get_as(&daemon, "/api/v1/channels", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    for channel in listed["channels"].as_array().unwrap() {
        let id = channel["id"].as_str().unwrap();
        let key = id.replace('.', "_");
        let readable = channel["readable"] == true;
        let writable = channel["writable"] == true;
        assert!(channels.contains_key(&format!("{key}_ws")), "{id}");
        assert_eq!(
            channels.contains_key(&format!("{key}_sse")),
            readable,
            "{id}"
        );
        assert_eq!(
            channels.contains_key(&format!("{key}_http")),
            writable,
            "{id}"
        );
    }
    let telemetry = &channels["iot_telemetry_sse"];
    assert_eq!(telemetry["address"], "/sse/iot.telemetry", "{telemetry}");
    let frame = resolve(&document, &telemetry["messages"]["frame"]);
    let payload = resolve(&document, &frame["payload"]["properties"]["payload"]);
    assert!(
        payload["properties"].get("temperature").is_some(),
        "the source document's schema: {frame} {payload}"
    );
    let post = &document["operations"]["iot_commands_http_receive"];
    assert_eq!(post["bindings"]["http"]["method"], "POST", "{post}");
    assert!(
        post["bindings"]["http"]["query"]["properties"]
            .get("deviceId")
            .is_some(),
        "{post}"
    );

    // A reader sees only what it may subscribe to, and nothing to publish.
    let narrow = asyncapi(&daemon, READER_KEY).await;
    parse_with_reference_parser(&narrow);
    let narrow_channels = keys(&narrow["channels"]);
    assert!(!narrow_channels.is_empty());
    assert!(
        narrow_channels.iter().all(|k| k.starts_with("iot_")),
        "{narrow_channels:?}"
    );
    assert!(
        keys(&narrow["operations"])
            .iter()
            .all(|k| k.ends_with("_send")),
        "{:?}",
        keys(&narrow["operations"])
    );

    // A document added at run time is described at once, and gone when it goes.
    let (api, p) = (unique("live"), unique("l"));
    let text = std::fs::read_to_string(iot_spec(dir.path(), &api, &p, 1)).unwrap();
    let r = reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/specs?name={api}.yaml")))
        .bearer_auth(ADMIN_KEY)
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let added = asyncapi(&daemon, ADMIN_KEY).await;
    assert!(
        added["channels"]
            .get(format!("{api}_telemetry_sse"))
            .is_some(),
        "{:?}",
        keys(&added["channels"])
    );
    parse_with_reference_parser(&added);
    let r = reqwest::Client::new()
        .delete(daemon.url(&format!("/api/v1/specs/{api}")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let removed = asyncapi(&daemon, ADMIN_KEY).await;
    assert_eq!(keys(&removed["channels"]), keys(&document["channels"]));
    for secret in [ADMIN_KEY, READER_KEY] {
        assert!(!daemon.log().contains(secret), "a key in the log");
    }
}

/// Whether a Python module imports; the test fails naming how to install it when not.
fn require_python_module(module: &str, package: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python package {package} is missing: run `python3 -m pip install {package}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_passes_an_independent_validator_and_schemathesis_finds_nothing() {
    require_mosquitto();
    require_python_module("openapi_spec_validator", "openapi-spec-validator");
    require_python_module("schemathesis", "schemathesis");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "auth:\n  api_keys:\n    - id: admin\n      key: {ADMIN_KEY}\n      scopes: ['*']\n"
        ),
    )
    .unwrap();
    let (api, p) = (unique("iot"), unique("p"));
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    iot_spec(&specs, &api, &p, 1);
    let root = env!("CARGO_MANIFEST_DIR");
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        specs.to_str().unwrap(),
        "--specs",
        &format!("{root}/asyncapi-specs/device-registry.openapi.yaml"),
    ])
    .await
    .unwrap();
    let r = reqwest::get(daemon.url("/api/v1/openapi.json"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "behind the same authentication layer");
    let r = get_as(&daemon, "/api/v1/openapi.json", ADMIN_KEY).await;
    assert_eq!(r.status(), 200);
    let document: Value = r.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/bridges/{name}", "put"),
        ("/api/v1/specs/{id}", "delete"),
        ("/api/v1/channels/{id}/messages", "post"),
        ("/api/v1/asyncapi.json", "get"),
        ("/sse/{id}", "get"),
    ] {
        assert!(paths[path].get(method).is_some(), "{method} {path}");
    }
    assert_eq!(
        paths["/healthz"]["get"]["security"],
        serde_json::json!([{}]),
        "the probes are public, as the authentication rules say"
    );
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, document.to_string()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every operation but the endless streams, fuzzed from the document against the live
    // daemon. `positive_data_acceptance` is left out: a "valid" document or bridge is one that
    // compiles against the running table, which no JSON Schema can say, so a schema-valid
    // body is often rightly refused with 400.
    let url = daemon.url("/api/v1/openapi.json");
    let out = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "run", &url])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--exclude-path-regex", "^/(ws|sse)/"])
        .args([
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--request-timeout",
            "10",
        ])
        .arg("--no-color")
        // Its reports and example database go to the test's directory, not the checkout.
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    assert!(
        !daemon.log().contains("panicked"),
        "no panic:\n{}",
        daemon.log()
    );
    let metrics = get_as(&daemon, "/metrics", ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stepflow_http_requests_total{route=\"/api/v1/bridges/{name}\""),
        "the fuzzed requests are counted: {metrics}"
    );
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("stepflow_http_requests_total") && l.contains("status=\"5xx\""))
        .collect();
    assert!(errors.is_empty(), "5xx answers: {errors:?}");
    assert!(
        !daemon.log().contains(ADMIN_KEY) && !metrics.contains(ADMIN_KEY),
        "the key schemathesis sent on every request is in no log line or metric"
    );
}
