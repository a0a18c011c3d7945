//! Retention against the daemon as a process and a Mosquitto of the test's own: a gateway fed
//! for longer than its retention keeps its log, its disk and its memory bounded, keeps serving,
//! and tells a durable reader that fell behind what it lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Messages per second, and for how long: ten times the retention.
const RATE: u64 = 2_000;
const SECONDS: u64 = 45;
const MAX_AGE_SECONDS: u64 = 3;
/// Random characters per message, so compression does not hide what is kept.
const PAD: usize = 1000;

fn random_pad() -> String {
    (0..PAD).map(|_| fastrand::alphanumeric()).collect()
}

struct Sample {
    at: Duration,
    messages: u64,
    first_offset: u64,
    log_bytes: u64,
    disk_bytes: u64,
    resident_bytes: u64,
}

async fn sample(daemon: &Daemon, channel: &str, started: Instant) -> Sample {
    let stats = daemon.get_json("/api/v1/stats").await.unwrap();
    let log = stats["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == channel))
        .map(|c| c["log"].clone())
        .unwrap_or_else(|| panic!("no channel {channel} in {stats}"));
    Sample {
        at: started.elapsed(),
        messages: log["messages"].as_u64().unwrap(),
        first_offset: log["first_offset"].as_u64().unwrap_or(0),
        log_bytes: stats["store"]["logBytes"].as_u64().unwrap(),
        disk_bytes: stats["store"]["bytesOnDisk"].as_u64().unwrap(),
        resident_bytes: stats["process"]["residentBytes"].as_u64().unwrap(),
    }
}

/// The data directory's files, largest first (blobs counted), for a failure's report.
fn listing(dir: &std::path::Path) -> String {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((meta.len(), entry.path()));
            }
        }
    }
    files.sort_by(|a, b| b.cmp(a));
    let blobs = files
        .iter()
        .filter(|(_, p)| p.parent().is_some_and(|d| d.ends_with("blobs")))
        .count();
    let top: Vec<String> = files
        .iter()
        .take(5)
        .map(|(len, p)| {
            format!(
                "{} {:.1} MiB",
                p.strip_prefix(dir).unwrap_or(p).display(),
                *len as f64 / 1048576.0
            )
        })
        .collect();
    format!(
        "{} files ({blobs} blobs); largest: {}",
        files.len(),
        top.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_fed_past_its_retention_stays_bounded_keeps_serving_and_reports_what_expired() {
    let broker = OwnMosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let api = unique("kept");
    let prefix = unique("t");
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    // Only the age is set: the other bounds are the defaults a fresh gateway has.
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!("retention: {{max_age_seconds: {MAX_AGE_SECONDS}}}\n"),
    )
    .unwrap();
    let server = format!("broker={}", broker.url());
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--specs",
        spec.to_str().unwrap(),
        "--server",
        &server,
    ])
    .await
    .unwrap();
    let channel = format!("{api}.telemetry");

    // A durable subscription nobody reads: retention overtakes it.
    let created = daemon
        .post_json(
            "/api/v1/subscriptions",
            &json!({"name": "idle", "channel": channel, "from": 1}),
        )
        .await;
    assert_eq!(created.status(), 201);

    let (tx, _progress) = tokio::sync::watch::channel(0);
    let topic = format!("{prefix}/devices/7/telemetry");
    let started = Instant::now();
    let publisher = tokio::spawn(publish_acknowledged_with(
        broker.port,
        move |_| topic.clone(),
        |seq| json!({"temperature": 20.5, "seq": seq, "pad": random_pad()}).to_string(),
        0..RATE * SECONDS,
        RATE,
        tx,
    ));
    let mut samples = Vec::new();
    while !publisher.is_finished() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        samples.push(sample(&daemon, &channel, started).await);
    }
    assert_eq!(
        publisher.await.unwrap(),
        RATE * SECONDS,
        "every message acknowledged"
    );
    samples.push(sample(&daemon, &channel, started).await);

    let report: Vec<String> = samples
        .iter()
        .map(|s| {
            format!(
                "{:>4.0}s: {} messages from {}, log {:.1} MiB, disk {:.1} MiB, RSS {:.1} MiB",
                s.at.as_secs_f64(),
                s.messages,
                s.first_offset,
                s.log_bytes as f64 / 1048576.0,
                s.disk_bytes as f64 / 1048576.0,
                s.resident_bytes as f64 / 1048576.0
            )
        })
        .collect();
    let mut report = report.join("\n");
    report.push_str(&format!("\ndata directory: {}", listing(&daemon.data_dir)));
    eprintln!("{report}");
    let ingested = RATE * SECONDS * (PAD as u64 + 40);
    // Retention runs every 5 s and removes messages older than 3 s: at most ~8 s are kept, plus
    // the chunk holding the boundary.
    let kept_at_most = RATE * (MAX_AGE_SECONDS + 5 + 4);
    let warm = samples
        .iter()
        .position(|s| s.at >= Duration::from_secs(12))
        .expect("samples after the warm-up");
    for s in &samples[warm..] {
        assert!(s.messages <= kept_at_most, "the log is bounded:\n{report}");
        assert!(
            s.log_bytes <= kept_at_most * (PAD as u64 + 200),
            "the log's bytes are bounded:\n{report}"
        );
    }
    let (reference, last) = (&samples[warm], samples.last().unwrap());
    assert!(
        last.first_offset > RATE * (SECONDS - 12),
        "old messages are gone:\n{report}"
    );
    // sled works in 8 MiB segments and reclaims one once half of it is dead, so the directory
    // breathes by a few segments; but from one half of the run to the next it must not grow with
    // what keeps arriving (about 45 MiB more in the second half).
    let half = Duration::from_secs(12 + (SECONDS - 12) / 2);
    let max_disk = |keep: &dyn Fn(Duration) -> bool| {
        samples[warm..]
            .iter()
            .filter(|s| keep(s.at))
            .map(|s| s.disk_bytes)
            .max()
            .unwrap_or(0)
    };
    let (first_half, second_half) = (max_disk(&|at| at < half), max_disk(&|at| at >= half));
    assert!(
        second_half <= first_half + 16 * 1048576,
        "the data directory does not grow with the {} MiB ingested:\n{report}",
        ingested / 1048576
    );
    assert!(
        last.resident_bytes <= reference.resident_bytes + 32 * 1048576,
        "memory stays flat:\n{report}"
    );

    // The idle subscription lost what retention removed, and says so.
    let idle = daemon.get_json("/api/v1/subscriptions/idle").await.unwrap();
    let expired = idle["expired"].as_u64().unwrap();
    assert!(expired >= last.first_offset - 1, "{idle}");
    assert!(idle["lag"].as_u64().unwrap() <= kept_at_most, "{idle}");
    // Attached, it is told first, then gets the oldest message kept.
    let mut ws = ws_connect(&daemon.ws_url(&format!("/ws/{channel}?subscription=idle")))
        .await
        .unwrap();
    let notice = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(notice["type"], "expired", "{notice}");
    let resume_from = notice["resumeFrom"].as_u64().unwrap();
    assert!(notice["missed"].as_u64().unwrap() >= expired, "{notice}");
    let first: Value = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert!(first["offset"].as_u64().unwrap() >= resume_from, "{first}");
    let counted = daemon
        .metric(
            "stepflow_subscription_messages_total",
            &[("subscription", "idle"), ("outcome", "expired")],
        )
        .await
        .unwrap();
    assert!(counted >= expired as f64, "{counted} < {expired}");

    // Still serving: a live client gets a new message, the log's metrics are there.
    let mut live = ws_connect(&daemon.ws_url(&format!("/ws/{channel}")))
        .await
        .unwrap();
    let mqtt = MqttClient::connect(broker.port, &unique("late"))
        .await
        .unwrap();
    mqtt.publish(
        &format!("{prefix}/devices/8/telemetry"),
        json!({"temperature": 1.0, "seq": -1}).to_string(),
    )
    .await
    .unwrap();
    let frame = ws_next_json(&mut live, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(frame["params"]["deviceId"], "8", "{frame}");
    let messages = daemon
        .metric(
            "stepflow_log_messages",
            &[("channel", channel.as_str()), ("log", "messages")],
        )
        .await
        .unwrap();
    assert!(messages > 0.0 && messages <= kept_at_most as f64);
    assert!(
        daemon
            .metric("stepflow_process_resident_memory_bytes", &[])
            .await
            .unwrap()
            > 0.0
    );
    assert!(daemon.metric("stepflow_data_dir_bytes", &[]).await.unwrap() > 0.0);
}
