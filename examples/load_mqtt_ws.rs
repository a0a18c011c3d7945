//! Load scenario: MQTT publisher → Mosquitto → StepFlow → N WebSocket subscribers, next to the
//! baseline MQTT publisher → Mosquitto → N MQTT subscribers, in the same run.
//!
//! It starts its own Mosquitto on a free port (its default limits, except
//! `max_inflight_messages 100`) and the release daemon, then runs both phases at the same rate.
//! Reports delivered rate, loss, latency percentiles (publish → receive, both on this machine's
//! clock), the ratios bridged / direct, and the daemon's peak RSS.
//!
//!     cargo build --release && cargo run --release --example load_mqtt_ws -- --rate 5000 --subscribers 10 --seconds 10

use std::path::PathBuf;

mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    /// `off` (no auth section), `on` (an API key, WebSocket clients with `?access_token=`), or
    /// `both`: the bridged phase once each way, on two daemons, in this run.
    auth: String,
    rate: u64,
    subscribers: usize,
    seconds: u64,
    payload: usize,
    binary: PathBuf,
}

fn args() -> Result<Args> {
    let flags = Flags::parse(&["rate", "subscribers", "seconds", "payload", "auth"])?;
    Ok(Args {
        auth: flags.get("auth", "off".to_owned())?,
        rate: flags.get("rate", 5000)?,
        subscribers: flags.get("subscribers", 10)?,
        seconds: flags.get("seconds", 10)?,
        payload: flags.get("payload", 100)?,
        binary: flags.binary(),
    })
}

async fn direct_phase(port: u16, topic: &str, a: &Args) -> Result<(u64, Vec<Results>)> {
    let results = shared(a.subscribers);
    let mut tasks = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let mut options = MqttOptions::new(
            format!("load-sub-{}-{i}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        client.subscribe(topic, QoS::AtLeastOnce).await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(ts) = ts_of(&p.payload) {
                            r.lock().await.record(ts);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = mqtt_publish(port, topic.to_owned(), a.rate, a.seconds, a.payload).await?;
    Ok((sent, stop_and_collect(tasks, results).await))
}

/// The API key the `auth on` daemon accepts (a load test's own; not a secret anywhere).
const LOAD_KEY: &str = "sfk_load_test_key_0123456789";

async fn bridged_phase(
    port: u16,
    http: u16,
    channel: &str,
    topic: &str,
    a: &Args,
    auth: bool,
) -> Result<(u64, Vec<Results>)> {
    let results = shared(a.subscribers);
    let mut tasks = Vec::new();
    let token = if auth {
        format!("?access_token={LOAD_KEY}")
    } else {
        String::new()
    };
    for r in &results {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{http}/ws/{channel}{token}"))
                .await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = frame
                    && let Some(ts) = ts_of(text.as_bytes())
                {
                    r.lock().await.record(ts);
                }
            }
        }));
    }
    let sent = mqtt_publish(port, topic.to_owned(), a.rate, a.seconds, a.payload).await?;
    Ok((sent, stop_and_collect(tasks, results).await))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    if !a.binary.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            a.binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (broker_port, _broker) = start_mosquitto(dir.path(), "")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let spec = dir.path().join("load.yaml");
    std::fs::write(&spec, load_telemetry_spec("load"))?;
    let server = format!("broker=mqtt://127.0.0.1:{broker_port}");
    let auth_config = dir.path().join("auth.yaml");
    std::fs::write(
        &auth_config,
        format!(
            "auth:\n  api_keys:\n    - id: load\n      key: {LOAD_KEY}\n      scopes: ['subscribe:load.*']\n      rate_limit: 100000/min\n"
        ),
    )?;
    let modes: Vec<bool> = match a.auth.as_str() {
        "off" => vec![false],
        "on" => vec![true],
        "both" => vec![false, true],
        other => bail!("--auth {other}: off, on or both"),
    };

    println!(
        "rate {} msg/s, {} subscribers, {} s, payload {} B",
        a.rate, a.subscribers, a.seconds, a.payload
    );
    let (sent_direct, direct) = direct_phase(broker_port, "load/devices/1/telemetry", &a).await?;
    let direct = summarize(sent_direct, &direct);

    let mut bridged_runs = Vec::new();
    for auth in modes {
        let http = free_port();
        let mut args = vec![
            "--specs".as_ref(),
            spec.as_os_str(),
            "--server".as_ref(),
            server.as_ref(),
        ];
        if auth {
            args.extend(["--config".as_ref(), auth_config.as_os_str()]);
        }
        let data = dir.path().join(if auth { "data-auth" } else { "data" });
        let daemon = start_daemon(&a.binary, http, &data, &args).await?;
        let pid = daemon.0.id();
        let idle_rss = rss_kib(pid, "VmRSS:");
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let (sent_bridged, bridged) = bridged_phase(
            broker_port,
            http,
            "load.telemetry",
            "load/devices/1/telemetry",
            &a,
            auth,
        )
        .await?;
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        let bridged = summarize(sent_bridged, &bridged);
        println!("auth {}:", if auth { "on" } else { "off" });
        report(&direct, &bridged);
        println!(
            "daemon RSS: idle {:.1} MiB, peak under load {:.1} MiB (VmHWM {:.1} MiB)",
            idle_rss as f64 / 1024.0,
            peak.load(Ordering::Relaxed) as f64 / 1024.0,
            rss_kib(pid, "VmHWM:") as f64 / 1024.0
        );
        drop(daemon);
        bridged_runs.push(bridged);
    }
    if let [off, on] = bridged_runs.as_slice() {
        println!(
            "ratios auth on/off: throughput {:.3}, p50 {:.2}, p99 {:.2}",
            on.rate / off.rate.max(1.0),
            on.p50_ms / off.p50_ms.max(1e-9),
            on.p99_ms / off.p99_ms.max(1e-9)
        );
    }
    Ok(())
}
