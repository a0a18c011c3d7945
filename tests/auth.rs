//! Security against the daemon as a process: API keys and scopes on every surface, JWTs signed
//! here with generated RSA and EC keys (JWKS served by a local HTTP server), streams that end
//! at the token's `exp`, rate limits in memory and in Redis (a `redis-server` of the test's
//! own, stopped mid-test), HTTPS and mutual TLS with curl, and the loopback-only default.
//! Every test greps the daemon's log for the secrets it used.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

const ISSUER: &str = "https://id.stepflow.test/";
const AUDIENCE: &str = "stepflow";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A key the config names by its SHA-256 (the key itself is only in the test).
struct Key {
    id: &'static str,
    secret: String,
}

impl Key {
    fn new(id: &'static str) -> Key {
        Key {
            id,
            secret: format!("sfk_test_{id}_{}", unique("k").replace('-', "_")),
        }
    }

    fn entry(&self, scopes: &[&str], rate_limit: Option<&str>) -> String {
        let hash = hex::encode(stepflow::auth::sha256(&self.secret));
        let scopes = scopes
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let limit = rate_limit
            .map(|l| format!("\n      rate_limit: {l}"))
            .unwrap_or_default();
        format!(
            "    - id: {}\n      key_sha256: {hash}\n      scopes: [{scopes}]{limit}\n",
            self.id
        )
    }
}

/// A daemon on the IoT test document, with `auth` (and anything else) from `config`.
struct Gateway {
    daemon: Daemon,
    api: String,
    prefix: String,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Writes the IoT document for `api` and the config, and spawns the daemon on them.
    fn spawn(config: &str, api: &str) -> Gateway {
        require_mosquitto();
        let dir = tempfile::tempdir().unwrap();
        let prefix = unique("sec");
        let spec = iot_spec(dir.path(), api, &prefix, 1);
        let file = dir.path().join("stepflow.yaml");
        std::fs::write(&file, config).unwrap();
        let daemon = Daemon::start_spawned(&[
            "--config",
            file.to_str().unwrap(),
            "--specs",
            spec.to_str().unwrap(),
        ])
        .unwrap();
        Gateway {
            daemon,
            api: api.to_owned(),
            prefix,
            _dir: dir,
        }
    }

    /// A daemon on a document of its own, ready.
    async fn start(config: &str) -> Gateway {
        Self::start_as(config, &unique("sec").replace('-', "")).await
    }

    /// Like [`Gateway::start`], with the document's api id chosen by the caller (scopes in the
    /// config name its channels).
    async fn start_as(config: &str, api: &str) -> Gateway {
        let mut gw = Self::spawn(config, api);
        gw.daemon.wait_ready(Duration::from_secs(20)).await.unwrap();
        gw
    }

    fn channel(&self, name: &str) -> String {
        format!("{}.{name}", self.api)
    }

    fn url(&self, path: &str) -> String {
        self.daemon.url(path)
    }

    /// The daemon's log holds none of `secrets`.
    fn assert_log_keeps(&self, secrets: &[&str]) {
        let log = self.daemon.log();
        for secret in secrets {
            assert!(
                !log.contains(secret),
                "a secret appears in the daemon's log:\n{log}"
            );
        }
    }
}

async fn get(url: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(k) = key {
        request = request.header("X-API-Key", k);
    }
    request.send().await.unwrap()
}

async fn bearer(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn publish_command(gw: &Gateway, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url(&format!(
            "/api/v1/channels/{}/messages?deviceId=d1",
            gw.channel("commands")
        )))
        .header("X-API-Key", key)
        .json(&json!({"action": "reboot"}))
        .send()
        .await
        .unwrap()
}

/// Every route template and method the router registers: the API's from its OpenAPI document
/// (the router is built from the described handlers, so the two are one list), the others
/// (`.route(` in the router's source: the RFC 9728 metadata) read from the source.
async fn router_routes(gw: &Gateway, admin: &Key) -> Vec<(String, Vec<String>)> {
    let document: Value = reqwest::Client::new()
        .get(gw.url("/api/v1/openapi.json"))
        .header("X-API-Key", &admin.secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out: Vec<(String, Vec<String>)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect();
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/mod.rs"))
            .unwrap();
    for piece in source.split(".route(").skip(1) {
        let start = piece.find('"').unwrap() + 1;
        let end = start + piece[start..].find('"').unwrap();
        let path = piece[start..end].to_owned();
        assert!(
            piece[end..]
                .trim_start_matches(['"', ',', ' ', '\n'])
                .starts_with("get(")
        );
        out.push((path, vec!["GET".to_owned()]));
    }
    out
}

#[tokio::test]
async fn every_route_without_credentials_answers_401_except_the_public_ones() {
    let admin = Key::new("admin");
    let config = format!(
        "auth:\n  api_keys:\n{}  public:\n    channels: ['PUBLIC']\n",
        admin.entry(&["*"], None)
    );
    let gw = Gateway::start(&config.replace("PUBLIC", "nothing.public")).await;
    let routes = router_routes(&gw, &admin).await;
    assert!(routes.len() >= 20, "{routes:?}");
    let client = reqwest::Client::new();
    // RFC 9728 metadata is public by definition: a client reads it to learn how to authenticate.
    let public = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
    ];
    let mut checked = 0;
    for (template, methods) in &routes {
        let path = template
            .replace("{id}", &gw.channel("commands"))
            .replace("{name}", "some-subscription");
        for method in methods {
            let response = client
                .request(method.parse().unwrap(), gw.url(&path))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if public.contains(&template.as_str()) {
                assert_ne!(status, 401, "{method} {template} is public");
                continue;
            }
            assert_eq!(status, 401, "{method} {template} without credentials");
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert_eq!(
                challenge, r#"Bearer realm="stepflow""#,
                "{method} {template}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{method} {template}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked {checked} route/method pairs");
    // `/mcp` is mounted as a service, not a `.route(`, so it is checked by name.
    let response = client
        .post(gw.url("/mcp"))
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "POST /mcp without credentials");
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="stepflow""#
    );
    // An unknown path says 401, not 404, to those without credentials.
    assert_eq!(get(&gw.url("/api/v1/nothing"), None).await.status(), 401);
    assert_eq!(
        get(&gw.url("/api/v1/nothing"), Some(&admin.secret))
            .await
            .status(),
        404
    );
    // A bad key is an invalid token.
    let response = get(
        &gw.url("/api/v1/channels"),
        Some("sfk_wrong_key_0123456789"),
    )
    .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="stepflow", error="invalid_token""#
    );
    assert!(
        gw.daemon
            .metric("stepflow_auth_denied_total", &[("reason", "unauthorized")])
            .await
            .unwrap()
            >= checked as f64
    );
    gw.assert_log_keeps(&[&admin.secret, "sfk_wrong_key_0123456789"]);
}

#[tokio::test]
async fn scopes_split_publish_subscribe_admin_and_documents() {
    let sub = Key::new("telemetry-reader");
    let publisher = Key::new("commander");
    let reader = Key::new("ops-read");
    let other = Key::new("other-api");
    let ws_sub = Key::new("commands-watcher");
    // Scopes name channel ids, so the test names the document's api id itself.
    let config =
        "auth:\n  api_keys:\nKEYS  public:\n    channels: ['TELEMETRY']\n  metrics: protected\n";
    let dir_api = unique("scoped").replace('-', "");
    let keys = [
        sub.entry(&[&format!("subscribe:{dir_api}.telemetry")], None),
        publisher.entry(&[&format!("publish:{dir_api}.*")], None),
        reader.entry(&["admin:read"], None),
        other.entry(&["subscribe:another-api.*", "publish:another-api.*"], None),
        ws_sub.entry(&[&format!("subscribe:{dir_api}.commands")], None),
    ]
    .concat();
    let config = config
        .replace("KEYS", &keys)
        .replace("TELEMETRY", &format!("{dir_api}.telemetry"));
    let gw = Gateway::start_as(&config, &dir_api).await;
    let telemetry = gw.channel("telemetry");
    let commands = gw.channel("commands");

    // Subscribe-only: SSE (header) and WebSocket (query token) open; POST is 403.
    let response = get(&gw.url(&format!("/sse/{telemetry}")), Some(&sub.secret)).await;
    assert_eq!(response.status(), 200);
    drop(response);
    let ws = ws_connect(
        &gw.daemon
            .ws_url(&format!("/ws/{telemetry}?access_token={}", sub.secret)),
    )
    .await;
    assert!(ws.is_ok(), "{:?}", ws.err());
    let denied = publish_command(&gw, &sub.secret).await;
    assert_eq!(denied.status(), 403);
    let body: Value = denied.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("publish:{commands}")),
        "{body}"
    );

    // Publish-only: the POST reaches Mosquitto; SSE and WebSocket are 403.
    let mut device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    device
        .subscribe(&format!("{}/devices/d1/commands", gw.prefix))
        .await
        .unwrap();
    let ok = publish_command(&gw, &publisher.secret).await;
    assert!(ok.status().is_success(), "{}", ok.text().await.unwrap());
    let received = device.recv(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&received.payload).unwrap()["action"],
        "reboot"
    );
    assert_eq!(
        get(
            &gw.url(&format!("/sse/{telemetry}")),
            Some(&publisher.secret)
        )
        .await
        .status(),
        403
    );
    let refused = ws_connect(&gw.daemon.ws_url(&format!(
        "/ws/{telemetry}?access_token={}",
        publisher.secret
    )))
    .await;
    let message = match refused {
        Ok(_) => panic!("a publish-only key opened a WebSocket"),
        Err(e) => format!("{e:?}"),
    };
    assert!(message.contains("403"), "{message}");

    // admin:read lists but cannot purge.
    assert_eq!(
        get(&gw.url("/api/v1/channels"), Some(&reader.secret))
            .await
            .status(),
        200
    );
    let purge = reqwest::Client::new()
        .delete(gw.url(&format!("/api/v1/channels/{telemetry}/dead-letters")))
        .header("X-API-Key", &reader.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 403);

    // `metrics: protected`: /metrics needs admin:read.
    assert_eq!(get(&gw.url("/metrics"), None).await.status(), 401);
    assert_eq!(
        get(&gw.url("/metrics"), Some(&sub.secret)).await.status(),
        403
    );
    assert_eq!(
        get(&gw.url("/metrics"), Some(&reader.secret))
            .await
            .status(),
        200
    );

    // Another API's key: 403 here.
    assert_eq!(
        get(&gw.url(&format!("/sse/{telemetry}")), Some(&other.secret))
            .await
            .status(),
        403
    );
    assert_eq!(publish_command(&gw, &other.secret).await.status(), 403);

    // The public tier reads the public channel without credentials, and nothing else.
    assert_eq!(
        get(&gw.url(&format!("/sse/{telemetry}")), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&gw.url(&format!("/sse/{commands}")), None)
            .await
            .status(),
        401
    );

    // A WebSocket opened to read a channel cannot publish on it without `publish:`.
    let mut ws = ws_connect(&gw.daemon.ws_url(&format!(
        "/ws/{commands}?deviceId=d1&access_token={}",
        ws_sub.secret
    )))
    .await
    .unwrap();
    ws.send(tungstenite::Message::Text(
        json!({"action": "identify"}).to_string().into(),
    ))
    .await
    .unwrap();
    let frame = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["status"], 403, "{frame}");
    assert_eq!(frame["error"]["code"], "forbidden", "{frame}");

    gw.assert_log_keeps(&[
        &sub.secret,
        &publisher.secret,
        &reader.secret,
        &other.secret,
        &ws_sub.secret,
    ]);
}

// ---------------------------------------------------------------------------------------------
// JWT

struct RsaSigner {
    kid: String,
    private_pem: Vec<u8>,
    public_pem: Vec<u8>,
    jwk: Value,
}

fn rsa_signer(kid: &str) -> RsaSigner {
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let jwk = json!({
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": b64(&rsa.n().to_vec()), "e": b64(&rsa.e().to_vec()),
    });
    let key = openssl::pkey::PKey::from_rsa(rsa).unwrap();
    RsaSigner {
        kid: kid.to_owned(),
        private_pem: key.private_key_to_pem_pkcs8().unwrap(),
        public_pem: key.public_key_to_pem().unwrap(),
        jwk,
    }
}

struct EcSigner {
    kid: String,
    private_pem: Vec<u8>,
    jwk: Value,
}

fn ec_signer(kid: &str) -> EcSigner {
    use openssl::bn::{BigNum, BigNumContext};
    use openssl::ec::{EcGroup, EcKey};
    let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let ec = EcKey::generate(&group).unwrap();
    let (mut x, mut y) = (BigNum::new().unwrap(), BigNum::new().unwrap());
    let mut ctx = BigNumContext::new().unwrap();
    ec.public_key()
        .affine_coordinates(&group, &mut x, &mut y, &mut ctx)
        .unwrap();
    let jwk = json!({
        "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": b64(&x.to_vec_padded(32).unwrap()), "y": b64(&y.to_vec_padded(32).unwrap()),
    });
    let key = openssl::pkey::PKey::from_ec_key(ec).unwrap();
    EcSigner {
        kid: kid.to_owned(),
        private_pem: key.private_key_to_pem_pkcs8().unwrap(),
        jwk,
    }
}

fn claims(sub: &str, scope: &str, exp: u64) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope, "exp": exp, "iat": now()})
}

fn sign_rs(signer: &RsaSigner, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(signer.kid.clone());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(&signer.private_pem).unwrap(),
    )
    .unwrap()
}

fn sign_es(signer: &EcSigner, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(signer.kid.clone());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(&signer.private_pem).unwrap(),
    )
    .unwrap()
}

/// A JWKS endpoint whose keys the test changes, counting its requests.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

async fn jwks_server(keys: Vec<Value>) -> JwksServer {
    let keys = Arc::new(Mutex::new(keys));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let keys = keys.clone();
        let hits = hits.clone();
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let keys = keys.clone();
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    axum::Json(json!({"keys": *keys.lock().unwrap()}))
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    JwksServer { url, keys, hits }
}

fn jwt_config(jwks_url: &str, public: &str) -> String {
    format!(
        "auth:\n  jwt:\n    - issuer: {ISSUER}\n      audience: {AUDIENCE}\n      jwks_url: {jwks_url}\n  public:\n    channels: ['{public}']\n"
    )
}

#[tokio::test]
async fn jwts_are_checked_and_keys_rotate_without_a_restart() {
    let rsa = rsa_signer("r1");
    let ec = ec_signer("e1");
    let jwks = jwks_server(vec![rsa.jwk.clone(), ec.jwk.clone()]).await;
    let started = Instant::now();
    let gw = Gateway::start(&jwt_config(&jwks.url, "none.public")).await;
    let list = gw.url("/api/v1/channels");
    let hour = now() + 3600;

    let good_rs = sign_rs(&rsa, &claims("alice", "openid admin:read", hour));
    let response = bearer(&list, &good_rs).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let good_es = sign_es(&ec, &claims("bob", "admin:read", hour));
    assert_eq!(bearer(&list, &good_es).await.status(), 200);
    // Scopes are checked: a token without admin:read is 403, with it 200.
    let no_scope = sign_rs(&rsa, &claims("carol", "openid", hour));
    assert_eq!(bearer(&list, &no_scope).await.status(), 403);

    let mut rejected: Vec<(&str, String)> = Vec::new();
    rejected.push((
        "expired",
        sign_rs(&rsa, &claims("alice", "admin:read", now() - 3600)),
    ));
    let mut not_yet = claims("alice", "admin:read", hour);
    not_yet["nbf"] = json!(now() + 3600);
    rejected.push(("not yet valid", sign_rs(&rsa, &not_yet)));
    let mut wrong_iss = claims("alice", "admin:read", hour);
    wrong_iss["iss"] = json!("https://evil.example/");
    rejected.push(("wrong issuer", sign_rs(&rsa, &wrong_iss)));
    let mut wrong_aud = claims("alice", "admin:read", hour);
    wrong_aud["aud"] = json!("someone-else");
    rejected.push(("wrong audience", sign_rs(&rsa, &wrong_aud)));
    // Signed by another key under the same kid.
    let impostor = RsaSigner {
        kid: "r1".into(),
        ..rsa_signer("r1")
    };
    rejected.push((
        "bad signature",
        sign_rs(&impostor, &claims("alice", "admin:read", hour)),
    ));
    // alg: none, with no signature.
    let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"r1"}"#);
    let payload = b64(claims("alice", "admin:read", hour).to_string().as_bytes());
    rejected.push(("alg none", format!("{none_header}.{payload}.")));
    // HS256 "signed" with the RSA public key as the HMAC secret (algorithm confusion).
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("r1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("alice", "admin:read", hour),
        &EncodingKey::from_secret(&rsa.public_pem).unwrap(),
    )
    .unwrap();
    rejected.push(("HS/RS confusion", confused));
    for (case, token) in &rejected {
        let response = bearer(&list, token).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="stepflow", error="invalid_token""#,
            "{case}"
        );
    }

    // Rotation: a new key under a new kid is fetched when a token names it. Re-fetches are
    // at most every 10 s, so wait out the start's fetch first.
    let rotated = rsa_signer("r2");
    jwks.keys.lock().unwrap().push(rotated.jwk.clone());
    let wait = Duration::from_secs(11).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let before = jwks.hits.load(std::sync::atomic::Ordering::SeqCst);
    let token = sign_rs(&rotated, &claims("dave", "admin:read", hour));
    let response = bearer(&list, &token).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // A flood of tokens naming unknown kids fetches the set at most once more.
    // One key for all 30 (RSA key generation takes up to a second on a loaded machine, and
    // 30 of them would outlast the re-fetch interval the test is about); only the kid varies.
    let mut fake = rsa_signer("x");
    for i in 0..30 {
        fake.kid = format!("made-up-{i}");
        let t = sign_rs(&fake, &claims("mallory", "admin:read", hour));
        assert_eq!(bearer(&list, &t).await.status(), 401);
    }
    let fetched = jwks.hits.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        (1..=2).contains(&fetched),
        "JWKS fetched {fetched} times for one rotation and 30 unknown kids"
    );
    let mut secrets: Vec<&str> = rejected.iter().map(|(_, t)| t.as_str()).collect();
    secrets.extend([good_rs.as_str(), good_es.as_str(), token.as_str()]);
    gw.assert_log_keeps(&secrets);
}

#[tokio::test]
async fn streams_end_when_their_token_expires_and_resume_with_a_fresh_one() {
    let rsa = rsa_signer("r1");
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let gw = Gateway::start(&jwt_config(&jwks.url, "none.public")).await;
    let telemetry = gw.channel("telemetry");
    let scope = format!("subscribe:{telemetry}");
    let device = MqttClient::connect(1883, &unique("device")).await.unwrap();
    let topic = format!("{}/devices/d1/telemetry", gw.prefix);

    let short = sign_rs(&rsa, &claims("alice", &scope, now() + 3));
    let opened = Instant::now();
    let mut ws = ws_connect(
        &gw.daemon
            .ws_url(&format!("/ws/{telemetry}?access_token={short}")),
    )
    .await
    .unwrap();
    let mut sse = SseClient::connect(
        &gw.url(&format!("/sse/{telemetry}?access_token={short}")),
        None,
    )
    .await
    .unwrap();
    for seq in 1..=3 {
        device
            .publish(&topic, json!({"temperature": 20.0, "seq": seq}).to_string())
            .await
            .unwrap();
    }
    let mut last_offset = 0;
    for _ in 0..3 {
        let frame = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
        last_offset = frame["offset"].as_u64().unwrap();
        sse.next_message(Duration::from_secs(5)).await.unwrap();
    }
    // The WebSocket closes with 1008 "token expired" at exp; the SSE stream says so and ends.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(tungstenite::Message::Close(frame)))) => break frame.unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let lasted = opened.elapsed();
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(
        lasted >= Duration::from_secs(1) && lasted < Duration::from_secs(6),
        "closed after {lasted:?}"
    );
    let event = loop {
        let e = sse.next(Duration::from_secs(5)).await.unwrap();
        if e.event == "error" {
            break e;
        }
    };
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["error"]["code"], "token_expired");
    assert!(
        sse.next(Duration::from_secs(3)).await.is_err(),
        "the SSE stream ended"
    );

    // Messages sent meanwhile are not lost: a fresh token resumes from the next offset.
    for seq in 4..=6 {
        device
            .publish(&topic, json!({"temperature": 21.0, "seq": seq}).to_string())
            .await
            .unwrap();
    }
    let fresh = sign_rs(&rsa, &claims("alice", &scope, now() + 3600));
    let mut ws = ws_connect(&gw.daemon.ws_url(&format!(
        "/ws/{telemetry}?from={}&access_token={fresh}",
        last_offset + 1
    )))
    .await
    .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..3 {
        let frame = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
        offsets.push(frame["offset"].as_u64().unwrap());
    }
    assert_eq!(
        offsets,
        vec![last_offset + 1, last_offset + 2, last_offset + 3]
    );
    let mut sse = SseClient::connect(
        &gw.url(&format!("/sse/{telemetry}?access_token={fresh}")),
        Some(last_offset),
    )
    .await
    .unwrap();
    let (id, _) = sse.next_message(Duration::from_secs(5)).await.unwrap();
    assert_eq!(id, (last_offset + 1).to_string());
    assert!(
        gw.daemon
            .metric("stepflow_auth_denied_total", &[("reason", "token_expired")])
            .await
            .unwrap()
            >= 2.0
    );
    // The query string carried the tokens: they must not be in the log either.
    gw.assert_log_keeps(&[&short, &fresh]);
}

// ---------------------------------------------------------------------------------------------
// Rate limits

#[tokio::test]
async fn past_the_limit_the_answer_is_429_with_retry_after() {
    let key = Key::new("limited");
    let config = format!(
        "auth:\n  api_keys:\n{}  public:\n    rate_limit: 3/min\n",
        key.entry(&["admin:read"], Some("5/min"))
    );
    let gw = Gateway::start(&config).await;
    let url = gw.url("/api/v1/channels");
    for i in 0..5 {
        assert_eq!(
            get(&url, Some(&key.secret)).await.status(),
            200,
            "request {i}"
        );
    }
    let limited = get(&url, Some(&key.secret)).await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&retry), "Retry-After: {retry}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // The public tier is limited per address: the 4th anonymous request is refused.
    let public = gw.url(&format!("/sse/{}", gw.channel("telemetry")));
    for _ in 0..3 {
        assert_eq!(get(&public, None).await.status(), 401);
    }
    assert_eq!(get(&public, None).await.status(), 429);
    // Health probes are never limited.
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/healthz"), None).await.status(), 200);
    }
    gw.assert_log_keeps(&[&key.secret]);
}

#[tokio::test]
async fn two_daemons_sharing_redis_share_one_budget_and_survive_its_loss() {
    let mut redis = OwnRedis::start();
    let key = Key::new("shared");
    let config = format!(
        "auth:\n  api_keys:\n{}  redis_url: redis://127.0.0.1:{}\n",
        key.entry(&["admin:read"], Some("100/min")),
        redis.port
    );
    let a = Gateway::start(&config).await;
    let b = Gateway::start(&config).await;
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..160 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match get(&gw.url("/api/v1/channels"), Some(&key.secret))
            .await
            .status()
            .as_u16()
        {
            200 => accepted += 1,
            429 => limited += 1,
            other => panic!("status {other}"),
        }
    }
    assert!(
        (100..=101).contains(&accepted),
        "accepted {accepted} of 160 with a shared 100/min ({limited} limited)"
    );
    let ready = a.daemon.get_json("/readyz").await.unwrap();
    assert_eq!(ready["rateLimits"]["backend"], "redis", "{ready}");

    // Redis goes away: both keep serving, count locally, and say so.
    redis.stop();
    let response = get(&a.url("/healthz"), None).await;
    assert_eq!(response.status(), 200);
    // The local budget of this key is fresh in this process (Redis counted until now):
    // requests are served, and the local limit still holds.
    let served = get(&a.url("/api/v1/stats"), Some(&key.secret)).await;
    assert_eq!(served.status(), 200);
    let ready = a.daemon.get_json("/readyz").await.unwrap();
    assert_eq!(ready["rateLimits"]["backend"], "local", "{ready}");
    assert!(
        ready["rateLimits"]["problem"]
            .as_str()
            .unwrap_or_default()
            .contains("redis"),
        "{ready}"
    );
    assert_eq!(
        a.daemon
            .metric("stepflow_rate_limit_fallback", &[])
            .await
            .unwrap(),
        1.0
    );
    assert!(
        a.daemon.log().contains("rate limits counted locally"),
        "one log line for the change"
    );
    a.assert_log_keeps(&[&key.secret]);
    b.assert_log_keeps(&[&key.secret]);
}

// ---------------------------------------------------------------------------------------------
// TLS and the safe default

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (apt-get install curl)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn tls_gateway(dir: &Path, client_ca: bool, key: &Key) -> Gateway {
    let mut tls = format!(
        "tls:\n  cert_file: {}\n  key_file: {}\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    if client_ca {
        tls.push_str(&format!(
            "  client_ca_file: {}\n",
            dir.join("ca.pem").display()
        ));
    }
    let config = format!(
        "auth:\n  api_keys:\n{}{tls}",
        key.entry(&["admin:read"], None)
    );
    // The harness waits for readiness over plain HTTP: spawn, then wait over HTTPS here.
    let gw = Gateway::spawn(&config, &unique("tls").replace('-', ""));
    let daemon = &gw.daemon;
    let url = format!("https://127.0.0.1:{}/healthz", daemon.port);
    let ca = dir.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["--cacert", ca.to_str().unwrap()];
        let (cert, cert_key) = (dir.join("ops.pem"), dir.join("ops.key"));
        if client_ca {
            args.extend([
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                cert_key.to_str().unwrap(),
            ]);
        }
        args.push(&url);
        if curl(&args).0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HTTPS never served:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw
}

#[tokio::test]
async fn https_with_a_ca_and_mutual_tls_naming_the_key_by_its_cn() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    make_client_certificate(dir.path(), "ops");
    make_client_certificate(dir.path(), "stranger");
    let key = Key::new("ops");
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().unwrap();

    let gw = tls_gateway(dir.path(), false, &key).await;
    let url = format!("https://127.0.0.1:{}/api/v1/channels", gw.daemon.port);
    let header = format!("X-API-Key: {}", key.secret);
    let (ok, out) = curl(&[
        "--cacert",
        ca,
        "-H",
        &header,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert!(ok && out.trim() == "200", "{out}");
    let (ok, out) = curl(&[
        "--cacert",
        ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert!(ok && out.trim() == "401", "{out}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", gw.daemon.port)).await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    drop(gw);

    let gw = tls_gateway(dir.path(), true, &key).await;
    let url = format!("https://127.0.0.1:{}/api/v1/channels", gw.daemon.port);
    // No client certificate: refused in the handshake.
    let (ok, out) = curl(&["--cacert", ca, &url]);
    assert!(!ok, "a client without a certificate was served: {out}");
    // The status curl gets presenting the client certificate `cn`.
    let status_with_certificate = |cn: &str| {
        let cert = dir.path().join(format!("{cn}.pem"));
        let cert_key = dir.path().join(format!("{cn}.key"));
        let (ok, out) = curl(&[
            "--cacert",
            ca,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            cert_key.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        assert!(ok, "{out}");
        out.trim().to_owned()
    };
    // The certificate's CN names the `ops` key: its scopes apply, without the key itself.
    assert_eq!(status_with_certificate("ops"), "200");
    // A certificate from the CA whose CN is no key: 401.
    assert_eq!(status_with_certificate("stranger"), "401");
    gw.assert_log_keeps(&[&key.secret]);
}

#[test]
fn without_auth_the_daemon_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let spec = iot_spec(dir.path(), "open", "open", 1);
    let port = free_port();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stepflow"))
            .args(["run", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--specs")
            .arg(&spec)
            .args(extra)
            .env_remove("STEPFLOW_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("refusing to listen"))
        .collect();
    assert_eq!(reason.len(), 1, "{stderr}");
    assert!(reason[0].contains("auth: none"), "{stderr}");
    // Said out loud, an open gateway starts (and warns).
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, "auth: none\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepflow"))
        .args(["run", "--listen", &format!("0.0.0.0:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--specs")
        .arg(&spec)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "auth: none did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("every endpoint is open"), "{stderr}");
}
