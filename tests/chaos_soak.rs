//! Two minutes of the chaos soak (`tests/common/soak.rs`): MQTT → Kafka → WebSocket and
//! MQTT → RabbitMQ bridges plus durable SSE subscriptions, while the daemon is SIGKILLed,
//! Mosquitto restarted, RabbitMQ taken away and the Kafka broker stopped at random intervals.
//! The long run is `examples/chaos_soak.rs`.

mod common;

use common::soak::{Fault, SoakPlan, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_minutes_of_overlapping_faults_lose_no_acknowledged_message() {
    let report = run(SoakPlan::ci()).await.expect("the soak runs");
    println!("{report}");
    for fault in [
        Fault::DaemonKilled,
        Fault::MosquittoRestarted,
        Fault::RabbitMqAway,
        Fault::KafkaAway,
    ] {
        assert!(
            report.count(fault) >= 2,
            "{fault:?} happened {} times: the soak did not test it",
            report.count(fault)
        );
    }
    assert!(
        report.acknowledged > report.plan.rate * 60,
        "only {} messages acknowledged: the stream did not flow",
        report.acknowledged
    );
    for target in &report.targets {
        assert!(
            target.missing.is_empty(),
            "{} lost {} acknowledged messages:\n{report}",
            target.name,
            target.missing.len()
        );
    }
    assert!(report.panics.is_empty(), "the daemon panicked:\n{report}");
    // A fault is a few state changes (an upstream down and up, a lane retrying, publishes
    // refused): a handful of warnings each, not one per retry or per message.
    assert!(
        report.warnings <= 5 * report.faults.len(),
        "{} warnings for {} faults:\n{report}",
        report.warnings,
        report.faults.len()
    );
}
