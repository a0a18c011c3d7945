//! Load scenario: N concurrent callers → StepFlow (`POST /api/v1/operations/{id}/call`, the
//! shipped device-registry document) → an HTTP upstream (axum, in this process), next to the
//! baseline: the same callers calling the upstream directly, same run. Closed loop: each caller
//! sends its next request when the previous answer came.
//!
//!     cargo build --release && cargo run --release --example load_calls -- --callers 16 --seconds 10

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::*;

use anyhow::Result;
use axum::Json;
use axum::extract::Path;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

async fn get_device(Path(id): Path<String>) -> Json<Value> {
    Json(json!({"id": id, "name": "device", "firmware": "1.0.0"}))
}

async fn token() -> Json<Value> {
    Json(json!({"access_token": "t", "token_type": "Bearer", "expires_in": 3600}))
}

/// Runs `callers` closed loops for `seconds`; calls per second and latency percentiles (ms).
async fn run(
    callers: usize,
    seconds: u64,
    request: impl Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + Clone + 'static,
) -> (f64, f64, f64, u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
            let mut failures = 0u64;
            let mut n = c as u64 * 1_000_000;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match request(&client, n).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        let _ = h.record(sent.elapsed().as_nanos() as u64);
                    }
                    _ => failures += 1,
                }
                n += 1;
            }
            (h, failures)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut failures = 0;
    for t in tasks {
        let (h, f) = t.await.unwrap();
        all.add(&h).unwrap();
        failures += f;
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    (
        rate,
        all.value_at_quantile(0.5) as f64 / 1e6,
        all.value_at_quantile(0.99) as f64 / 1e6,
        failures,
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&["callers", "seconds"])?;
    let callers: usize = flags.get("callers", 16)?;
    let seconds: u64 = flags.get("seconds", 10)?;
    let app = axum::Router::new()
        .route("/devices/{id}", axum::routing::get(get_device))
        .route("/oauth/token", axum::routing::post(token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  device-registry:\n    url: http://127.0.0.1:{upstream}\n    client_id: load\n    client_secret: load\n"
        ),
    )?;
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("asyncapi-specs/device-registry.openapi.yaml");
    let http = free_port();
    let _daemon = start_daemon(
        &flags.binary(),
        http,
        &dir.path().join("data"),
        &[
            "--specs".as_ref(),
            spec.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
    .await?;
    println!("{callers} callers, {seconds} s each phase");

    let direct = run(callers, seconds, move |client, n| {
        client
            .get(format!("http://127.0.0.1:{upstream}/devices/d{n}"))
            .bearer_auth("t")
    })
    .await;
    let bridged = run(callers, seconds, move |client, n| {
        client
            .post(format!(
                "http://127.0.0.1:{http}/api/v1/operations/device-registry.getDevice/call"
            ))
            .header("content-type", "application/json")
            .body(json!({"path": {"deviceId": format!("d{n}")}}).to_string())
    })
    .await;
    for (name, (rate, p50, p99, failures)) in [("direct", direct), ("gateway", bridged)] {
        println!(
            "{name:<8} {rate:.0} calls/s, p50 {p50:.3} ms, p99 {p99:.3} ms, failures {failures}"
        );
    }
    println!(
        "ratios gateway/direct: throughput {:.3}, p50 {:.2}, p99 {:.2}",
        bridged.0 / direct.0.max(1.0),
        bridged.1 / direct.1.max(1e-9),
        bridged.2 / direct.2.max(1e-9)
    );
    Ok(())
}
