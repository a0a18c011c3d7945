//! Load scenario: does the daemon's memory stay flat as its log grows? MQTT telemetry at a steady
//! rate → Mosquitto (its own, on a free port) → the release daemon with the default config (so
//! default retention) → one channel with N WebSocket clients. Every `--every` logged messages it
//! prints the daemon's RSS, the log's messages and bytes, the data directory's size and what the
//! clients received; at the end, RSS at the last step against RSS at the first.
//!
//!     cargo build --release && cargo run --release --example log_growth -- --rate 5000 --messages 10000000 --subscribers 10

mod common;
use common::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&[
        "rate",
        "messages",
        "subscribers",
        "every",
        "payload",
        "cache-bytes",
    ])?;
    let rate: u64 = flags.get("rate", 5000)?;
    let messages: u64 = flags.get("messages", 10_000_000)?;
    let subscribers: usize = flags.get("subscribers", 10)?;
    let every: u64 = flags.get("every", 100_000)?;
    let payload: usize = flags.get("payload", 100)?;
    // 0: the default config; else a config file with this `log.cache_bytes`.
    let cache_bytes: u64 = flags.get("cache-bytes", 0)?;
    let binary = flags.binary();
    if !binary.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (broker_port, _broker) = start_mosquitto(dir.path(), "")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = dir.path().join("load.yaml");
    std::fs::write(&spec, load_telemetry_spec("load"))?;
    let server = format!("broker=mqtt://127.0.0.1:{broker_port}");
    let http = free_port();
    let data = dir.path().join("data");
    let config = dir.path().join("config.yaml");
    let mut args = vec![
        "--specs".as_ref(),
        spec.as_os_str(),
        "--server".as_ref(),
        server.as_ref(),
    ];
    if cache_bytes > 0 {
        std::fs::write(&config, format!("log: {{cache_bytes: {cache_bytes}}}\n"))?;
        args.extend(["--config".as_ref(), config.as_os_str()]);
    }
    let daemon = start_daemon(&binary, http, &data, &args).await?;
    let pid = daemon.0.id();

    let received = Arc::new(AtomicU64::new(0));
    for _ in 0..subscribers {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{http}/ws/load.telemetry"))
                .await?;
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if frame.is_text() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    println!(
        "rate {rate} msg/s, {messages} messages, {subscribers} WebSocket clients, payload {payload} B, default retention"
    );
    println!("logged     RSS MiB   log MiB   disk MiB   clients received   elapsed");
    let seconds = messages.div_ceil(rate);
    let publisher = tokio::spawn(mqtt_publish(
        broker_port,
        "load/devices/1/telemetry".into(),
        rate,
        seconds,
        payload,
    ));
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut next_report = every;
    let mut first_rss = None;
    let mut last = (0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stats: serde_json::Value = client
            .get(format!("http://127.0.0.1:{http}/api/v1/stats"))
            .send()
            .await?
            .json()
            .await?;
        let channel = &stats["channels"][0]["log"];
        let logged = channel["last_offset"].as_u64().unwrap_or(0);
        if logged >= next_report {
            let rss = rss_kib(pid, "VmRSS:");
            first_rss.get_or_insert(rss);
            println!(
                "{logged:>9}  {:>8.1}  {:>8.1}  {:>9.1}  {:>17}  {:>6.0}s",
                rss as f64 / 1024.0,
                channel["bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
                stats["store"]["bytesOnDisk"].as_u64().unwrap_or(0) as f64 / 1048576.0,
                received.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            next_report = (logged / every + 1) * every;
            last = (logged, rss);
        }
        if publisher.is_finished() && logged >= messages {
            break;
        }
        if publisher.is_finished() && started.elapsed() > Duration::from_secs(seconds + 30) {
            println!("the log stopped at {logged} of {messages}");
            break;
        }
    }
    let sent = publisher.await??;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = first_rss.unwrap_or(0);
    println!(
        "sent {sent}; RSS at {every}: {:.1} MiB, at {}: {:.1} MiB, difference {:+.1} MiB; clients received {} of {}",
        first as f64 / 1024.0,
        last.0,
        last.1 as f64 / 1024.0,
        (last.1 as f64 - first as f64) / 1024.0,
        received.load(Ordering::Relaxed),
        sent * subscribers as u64
    );
    Ok(())
}
