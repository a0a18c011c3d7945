//! The per-request cost of authentication: an API key (SHA-256, a map lookup, the local rate
//! limiter, the scope check), a JWT the gateway has verified before (its cache), and a JWT seen
//! for the first time, verified with the issuer's cached key (RS256, ES256), next to the
//! validation of a 90-byte JSON payload against its route's schema, which every publish pays
//! anyway: the baseline the figures are read against.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use stepflow::auth::{Auth, AuthFileConfig, Credential, Need};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEY: &str = "sfk_bench_key_0123456789abcdef";
const PAYLOAD: &[u8] =
    br#"{"temperature": 21.5, "humidity": 40, "battery": 88, "ts": "2026-11-22T10:00:00Z"}"#;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn token(alg: Algorithm, private_pem: &[u8]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"iss": "https://id.bench/", "aud": "stepflow", "sub": "bench", "scope": "subscribe:iot.*", "exp": exp});
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem).unwrap(),
        _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
}

fn auth_costs(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let ec =
        openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap();
    std::fs::write(dir.path().join("rsa.pem"), rsa.public_key_to_pem().unwrap()).unwrap();
    std::fs::write(dir.path().join("ec.pem"), ec.public_key_to_pem().unwrap()).unwrap();
    let config = format!(
        "api_keys:\n  - id: bench\n    key: {KEY}\n    scopes: ['subscribe:iot.*']\n    rate_limit: 1000000000/s\njwt:\n  - issuer: https://id.bench/\n    audience: stepflow\n    keys: [{{pem_file: {}}}]\nrate_limit: 1000000000/s\n",
        dir.path().join("rsa.pem").display(),
    );
    let config: AuthFileConfig = stepflow::yaml::from_str(&config).unwrap();
    let auth = Auth::build(&config).unwrap();
    // The same issuer with an EC key, in a gateway of its own.
    let es_config: AuthFileConfig = stepflow::yaml::from_str(&format!(
        "jwt:\n  - issuer: https://id.bench/\n    audience: stepflow\n    keys: [{{pem_file: {}}}]\nrate_limit: 1000000000/s\n",
        dir.path().join("ec.pem").display()
    ))
    .unwrap();
    let rs_token = token(Algorithm::RS256, &rsa.private_key_to_pem_pkcs8().unwrap());
    let es_token = token(Algorithm::ES256, &ec.private_key_to_pem_pkcs8().unwrap());
    let need = Need::Subscribe("iot.telemetry".into());
    let rt = runtime();

    let loaded = stepflow::spec::load_all(&[std::path::PathBuf::from("asyncapi-specs")]);
    let table = stepflow::connectors::compile(&loaded.apis).unwrap().table;
    let route = table
        .get("iot.telemetry")
        .expect("the shipped iot.telemetry route")
        .clone();

    let mut g = c.benchmark_group("per_request");
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("baseline_payload_validation", |b| {
        b.iter(|| route.validate(std::hint::black_box(PAYLOAD)).unwrap())
    });
    g.bench_function("api_key", |b| {
        b.iter(|| {
            rt.block_on(async {
                let p = auth
                    .authenticate(Some(Credential::ApiKey(KEY)), CLIENT)
                    .await
                    .unwrap();
                auth.admit(&p).await.unwrap();
                auth.authorize(&p, &need).unwrap();
            })
        })
    });
    g.bench_function("jwt_repeated_token", |b| {
        b.iter(|| {
            rt.block_on(async {
                let p = auth
                    .authenticate(Some(Credential::Bearer(&rs_token)), CLIENT)
                    .await
                    .unwrap();
                auth.authorize(&p, &need).unwrap();
            })
        })
    });
    // A token seen for the first time: the signature check with the issuer's cached key.
    let rs_issuer = stepflow::auth::jwt::Issuer::build(&config.jwt[0]).unwrap();
    let es_issuer = stepflow::auth::jwt::Issuer::build(&es_config.jwt[0]).unwrap();
    g.bench_function("jwt_rs256_first_sight", |b| {
        b.iter(|| rt.block_on(rs_issuer.verify(&rs_token)).unwrap())
    });
    g.bench_function("jwt_es256_first_sight", |b| {
        b.iter(|| rt.block_on(es_issuer.verify(&es_token)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, auth_costs);
criterion_main!(benches);
