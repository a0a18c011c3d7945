//! The chaos soak, as long as asked: MQTT → Kafka → WebSocket and MQTT → RabbitMQ bridges plus
//! durable SSE subscriptions at a steady rate, while the daemon is SIGKILLed, its Mosquitto
//! restarted, RabbitMQ taken away (through a TCP proxy) and its tansu Kafka broker stopped, each
//! at random intervals. At the end it checks, by message id, that every message Mosquitto
//! acknowledged reached every target and every durable subscriber, counts duplicates, and
//! compares the daemon's RSS and open descriptors at the start and the end.
//!
//! The soak itself is `tests/common/soak.rs`; `tests/chaos_soak.rs` runs two minutes of it in
//! CI. It needs the machine's RabbitMQ, and the mosquitto and tansu binaries.
//!
//!     cargo build --release && cargo run --release --example chaos_soak -- --minutes 30
//!
//! Exits 1 when a message was lost, the duplicates the gateway added reach 0.1 % on a target
//! (copies the devices themselves resent are counted apart), the daemon panicked, or its RSS or
//! descriptors over the last window differ from the first by more than 10 %.

use std::time::Duration;

use anyhow::{Result, bail};

mod common;
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports, clippy::all)]
mod harness;

use harness::soak::{Fault, SoakPlan, run};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = common::Flags::parse(&[
        "minutes",
        "rate",
        "seed",
        "websockets",
        "subscribers",
        "faults",
    ])?;
    // `--faults daemon,mosquitto,rabbitmq,kafka` (default: all of them).
    let faults: Vec<Fault> = flags
        .get("faults", "daemon,mosquitto,rabbitmq,kafka".to_owned())?
        .split(',')
        .map(|name| match name {
            "daemon" => Ok(Fault::DaemonKilled),
            "mosquitto" => Ok(Fault::MosquittoRestarted),
            "rabbitmq" => Ok(Fault::RabbitMqAway),
            "kafka" => Ok(Fault::KafkaAway),
            other => bail!("--faults: unknown fault {other}"),
        })
        .collect::<Result<_>>()?;
    harness::use_stepflow_binary(flags.binary());
    let minutes: u64 = flags.get("minutes", 30)?;
    let plan = SoakPlan {
        duration: Duration::from_secs(minutes * 60),
        rate: flags.get("rate", 200)?,
        between_faults: (Duration::from_secs(20), Duration::from_secs(60)),
        outage: (Duration::from_secs(2), Duration::from_secs(10)),
        websocket_readers: flags.get("websockets", 2)?,
        sse_subscribers: flags.get("subscribers", 2)?,
        drain: Duration::from_secs(300),
        sample_every: Duration::from_secs(10),
        seed: flags.get("seed", 20)?,
        faults,
    };
    let report = run(plan.clone()).await?;
    println!("{report}");
    // The first and last five minutes (a quarter of a shorter run) against each other.
    let window = Duration::from_secs(300).min(plan.duration / 4);
    let mut failures = Vec::new();
    if let Some(((rss_first, rss_last), (fds_first, fds_last))) = report.drift(window) {
        println!(
            "  median over the first and last {window:?}: RSS {rss_first} → {rss_last} KiB ({:+.1} %), open files {fds_first} → {fds_last} ({:+.1} %)",
            change(rss_first, rss_last),
            change(fds_first, fds_last)
        );
        if change(rss_first, rss_last).abs() > 10.0 || change(fds_first, fds_last).abs() > 10.0 {
            failures.push("RSS or open files drifted by more than 10 %".to_owned());
        }
    }
    if report.lost() > 0 {
        failures.push(format!("{} acknowledged messages lost", report.lost()));
    }
    for t in &report.targets {
        if t.duplicate_ratio() >= 0.001 {
            failures.push(format!(
                "{}: duplicates at {:.3} %",
                t.name,
                100.0 * t.duplicate_ratio()
            ));
        }
    }
    if !report.panics.is_empty() {
        failures.push(format!(
            "{} panics in the daemon's log",
            report.panics.len()
        ));
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Percent change from `first` to `last`.
fn change(first: u64, last: u64) -> f64 {
    100.0 * (last as f64 - first as f64) / first.max(1) as f64
}
