//! Load scenario: thousands of SSE and WebSocket clients on one channel while MQTT telemetry
//! arrives at a steady rate. Every client must receive every message once, in order; the report
//! gives the time until the last client had the last message, the lagged notices (clients the
//! daemon resumed from the log), the daemon's CPU per frame and its resident memory per client.
//!
//! With `--baseline true`, the same SSE clients then read from the floor: a bare relay (this
//! binary again, `--floor`) that writes each MQTT message, rendered once as an SSE event of the
//! same size, to every socket and does nothing else; the gateway's CPU per frame is reported as
//! a ratio to it, measured in the same run.
//!
//! The scenario itself is `tests/common/fanout.rs` (`tests/fanout.rs` runs it in CI). Each
//! connection is a descriptor in both processes, so the hard open-files limit must exceed the
//! client count in each.
//!
//!     cargo build --release && cargo run --release --example load_fanout -- --sse 10000 --ws 0 --rate 100 --seconds 10 --baseline true

use std::time::Duration;

use anyhow::{Result, bail};

mod common;
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports, clippy::all)]
mod harness;

use harness::fanout::{FanoutPlan, run, run_floor, serve_floor};

#[tokio::main]
async fn main() -> Result<()> {
    let flags = common::Flags::parse(&[
        "sse", "ws", "rate", "seconds", "deadline", "baseline", "floor", "broker", "topic",
    ])?;
    if let Ok(port) = flags.get::<u16>("floor", 0)
        && port != 0
    {
        return serve_floor(
            port,
            flags.get("broker", 1883)?,
            flags.get("topic", String::new())?,
        )
        .await;
    }
    harness::use_stepflow_binary(flags.binary());
    let rate: u64 = flags.get("rate", 100)?;
    let plan = FanoutPlan {
        sse_clients: flags.get("sse", 10_000)?,
        ws_clients: flags.get("ws", 0)?,
        rate,
        messages: rate * flags.get::<u64>("seconds", 10)?,
        deadline: Duration::from_secs(flags.get("deadline", 300)?),
    };
    let report = run(plan.clone()).await?;
    println!("{report}");
    if report.sse_complete + report.ws_complete != report.clients() {
        bail!("not every client received every message");
    }
    if flags.get("baseline", false)? && plan.sse_clients > 0 {
        let floor = run_floor(plan, &std::env::current_exe()?).await?;
        println!("floor (a bare relay, the same SSE clients):\n{floor}");
        let per_frame = |r: &harness::fanout::FanoutReport| {
            r.daemon_cpu.as_secs_f64() / (r.clients() as f64 * r.plan.messages as f64)
        };
        println!(
            "gateway / floor, CPU per SSE frame: {:.2} µs / {:.2} µs = {:.2}x (the gateway's figure includes its WebSocket clients)",
            per_frame(&report) * 1e6,
            per_frame(&floor) * 1e6,
            per_frame(&report) / per_frame(&floor)
        );
    }
    Ok(())
}
