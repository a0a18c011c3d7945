//! The chaos soak: MQTT → Kafka → WebSocket and MQTT → RabbitMQ bridges plus durable SSE
//! subscriptions under a steady stream, while the daemon is SIGKILLed, Mosquitto restarted,
//! RabbitMQ taken away and the Kafka broker stopped, each at random intervals of its own, so
//! faults overlap as they do in production. At the end every message the publisher had
//! acknowledged is looked for, by its id, on every target and every durable subscriber.
//!
//! Everything is the soak's own except RabbitMQ: its Mosquitto (persistent, restarted with
//! SIGTERM as an operator restarts it), its tansu broker (stopped with SIGKILL, the sqlite
//! database kept), and a TCP proxy in front of the machine's RabbitMQ, which cuts the gateway's
//! connections and refuses new ones the way a stopped broker app does, without stopping the
//! broker other tests use.
//!
//! `tests/chaos_soak.rs` runs two minutes of it in CI; `examples/chaos_soak.rs` runs it as long
//! as asked and prints the figures.

#[allow(unused_imports)]
use super::*;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64};

use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use tokio_util::sync::CancellationToken;

/// How long and how hard.
#[derive(Clone, Debug)]
pub struct SoakPlan {
    /// How long messages are published and faults injected.
    pub duration: Duration,
    /// Messages per second.
    pub rate: u64,
    /// The quiet time before each fault of a kind, drawn from this range.
    pub between_faults: (Duration, Duration),
    /// How long a broker stays away, drawn from this range (a killed daemon is restarted at once).
    pub outage: (Duration, Duration),
    /// WebSocket readers of the channel the gateway consumes from Kafka.
    pub websocket_readers: usize,
    /// Durable subscriptions on the MQTT channel, each read over SSE.
    pub sse_subscribers: usize,
    /// How long the targets may take to catch up once the faults stop.
    pub drain: Duration,
    /// How often the daemon's memory and descriptors are sampled.
    pub sample_every: Duration,
    pub seed: u64,
    /// The kinds of fault injected (all of them, unless a run looks at one).
    pub faults: Vec<Fault>,
}

impl SoakPlan {
    /// The CI run: two minutes, every kind of fault several times.
    pub fn ci() -> SoakPlan {
        SoakPlan {
            duration: Duration::from_secs(120),
            rate: 100,
            between_faults: (Duration::from_secs(8), Duration::from_secs(20)),
            outage: (Duration::from_secs(2), Duration::from_secs(6)),
            websocket_readers: 2,
            sse_subscribers: 2,
            drain: Duration::from_secs(180),
            sample_every: Duration::from_secs(5),
            seed: 20,
            faults: Fault::ALL.to_vec(),
        }
    }
}

/// The faults injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then a start on the same data directory.
    DaemonKilled,
    /// SIGTERM, a pause, a start on the same sessions.
    MosquittoRestarted,
    /// The gateway's RabbitMQ connections cut and refused for a while.
    RabbitMqAway,
    /// The Kafka broker killed for a while, then started on its database.
    KafkaAway,
}

impl Fault {
    pub const ALL: [Fault; 4] = [
        Fault::DaemonKilled,
        Fault::MosquittoRestarted,
        Fault::RabbitMqAway,
        Fault::KafkaAway,
    ];
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub at: Duration,
    pub fault: Fault,
    pub lasted: Duration,
}

/// One sample of the daemon process.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub open_files: u64,
}

/// What one target received, against the acknowledged ids.
#[derive(Clone, Debug)]
pub struct TargetReport {
    pub name: String,
    pub received: u64,
    pub distinct: u64,
    /// Acknowledged ids it never received.
    pub missing: Vec<u64>,
    /// The same as runs `(first, last, when the first was sent)`.
    pub missing_ranges: Vec<(u64, u64, Duration)>,
    /// Runs of ids received more than once, the same way: where the repeats come from.
    pub duplicate_ranges: Vec<(u64, u64, Duration)>,
    /// Copies beyond the first.
    pub duplicates: u64,
    /// Copies beyond those the devices sent (a publisher resends what a lost connection had not
    /// acknowledged, and MQTT 3.1.1 has no id to tell the copies apart): the gateway's own.
    pub gateway_duplicates: u64,
    /// Copies whose `x-stepflow-message-id` came before: a consumer that keeps ids drops them.
    pub repeated_message_ids: u64,
}

impl TargetReport {
    /// Duplicates per delivered message.
    pub fn duplicate_ratio(&self) -> f64 {
        self.duplicates as f64 / self.distinct.max(1) as f64
    }

    /// The gateway's own duplicates per delivered message.
    pub fn gateway_duplicate_ratio(&self) -> f64 {
        self.gateway_duplicates as f64 / self.distinct.max(1) as f64
    }
}

/// Everything the soak saw.
#[derive(Clone, Debug)]
pub struct SoakReport {
    pub plan: SoakPlan,
    /// Ids handed to the publisher's client.
    pub published: u64,
    /// Ids the broker acknowledged (PUBACK): the ones that must arrive everywhere.
    pub acknowledged: u64,
    pub targets: Vec<TargetReport>,
    pub faults: Vec<FaultRecord>,
    pub samples: Vec<Sample>,
    /// Lines of the daemon's log that say it panicked.
    pub panics: Vec<String>,
    /// Warning and error lines in the daemon's log (one per state change is the rule, not one
    /// per retry or per message).
    pub warnings: usize,
    pub errors: Vec<String>,
    /// How long the targets took to catch up after the last fault.
    pub drained_in: Duration,
    /// Where the daemon's, Mosquitto's and tansu's logs were kept.
    pub logs: PathBuf,
}

impl SoakReport {
    pub fn lost(&self) -> u64 {
        self.targets.iter().map(|t| t.missing.len() as u64).sum()
    }

    pub fn count(&self, fault: Fault) -> usize {
        self.faults.iter().filter(|f| f.fault == fault).count()
    }

    /// The median of the samples taken in `[from, to)`.
    fn median(&self, from: Duration, to: Duration, of: impl Fn(&Sample) -> u64) -> Option<u64> {
        let mut values: Vec<u64> = self
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(of)
            .collect();
        values.sort_unstable();
        values.get(values.len() / 2).copied()
    }

    /// (first, last) medians over windows of `window` at each end of the run, for RSS in KiB
    /// and for open descriptors.
    pub fn drift(&self, window: Duration) -> Option<((u64, u64), (u64, u64))> {
        let end = self.samples.last()?.at;
        let last_from = end.saturating_sub(window);
        let rss = (
            self.median(Duration::ZERO, window, |s| s.rss_kib)?,
            self.median(last_from, end + Duration::from_secs(1), |s| s.rss_kib)?,
        );
        let fds = (
            self.median(Duration::ZERO, window, |s| s.open_files)?,
            self.median(last_from, end + Duration::from_secs(1), |s| s.open_files)?,
        );
        Some((rss, fds))
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos soak: {:?} at {} msg/s: {} published, {} acknowledged by Mosquitto; targets caught up {:.1} s after the faults stopped",
            self.plan.duration,
            self.plan.rate,
            self.published,
            self.acknowledged,
            self.drained_in.as_secs_f64()
        )?;
        for fault in Fault::ALL {
            let of_kind: Vec<&FaultRecord> =
                self.faults.iter().filter(|r| r.fault == fault).collect();
            let away: Duration = of_kind.iter().map(|r| r.lasted).sum();
            writeln!(
                f,
                "  {fault:?}: {} times, {:.1} s away in all",
                of_kind.len(),
                away.as_secs_f64()
            )?;
        }
        let timeline: Vec<String> = self
            .faults
            .iter()
            .map(|r| {
                format!(
                    "{:.1}s {:?} ({:.1}s)",
                    r.at.as_secs_f64(),
                    r.fault,
                    r.lasted.as_secs_f64()
                )
            })
            .collect();
        writeln!(f, "  faults: {}", timeline.join(", "))?;
        for t in &self.targets {
            writeln!(
                f,
                "  {:<28} {:>8} received, {:>8} distinct, {:>4} lost, {:>6} duplicates ({:.4} %), {} of them the gateway's ({:.4} %), {} with a message id seen before",
                t.name,
                t.received,
                t.distinct,
                t.missing.len(),
                t.duplicates,
                100.0 * t.duplicate_ratio(),
                t.gateway_duplicates,
                100.0 * t.gateway_duplicate_ratio(),
                t.repeated_message_ids
            )?;
            for (first, last, sent_at) in t.missing_ranges.iter().take(10) {
                writeln!(
                    f,
                    "    lost ids {first}..={last}, first sent {:.1} s into the run",
                    sent_at.as_secs_f64()
                )?;
            }
            let repeats: Vec<String> = t
                .duplicate_ranges
                .iter()
                .take(12)
                .map(|(first, last, at)| {
                    format!("{}x{} at {:.1}s", first, last - first + 1, at.as_secs_f64())
                })
                .collect();
            if !repeats.is_empty() {
                writeln!(
                    f,
                    "    repeated (first id x run length, sent at): {}",
                    repeats.join(", ")
                )?;
            }
        }
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let peak = self.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
            writeln!(
                f,
                "  daemon: RSS {} → {} KiB (peak {peak}), open files {} → {} ({} samples)",
                first.rss_kib,
                last.rss_kib,
                first.open_files,
                last.open_files,
                self.samples.len()
            )?;
        }
        writeln!(
            f,
            "  daemon log: {} panics, {} warnings, {} errors ({} faults); logs kept in {}",
            self.panics.len(),
            self.warnings,
            self.errors.len(),
            self.faults.len(),
            self.logs.display()
        )?;
        for line in self.errors.iter().take(5) {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

/// How many times each id arrived at one target, and how many arrivals repeated a bridged
/// message's `x-stepflow-message-id` (copies an idempotent consumer drops).
#[derive(Default)]
struct Tally {
    counts: Vec<u32>,
    received: u64,
    message_ids: std::collections::HashSet<String>,
    repeated_message_ids: u64,
}

impl Tally {
    fn record(&mut self, id: u64, message_id: Option<&str>) {
        let i = id as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.received += 1;
        if let Some(m) = message_id
            && !self.message_ids.insert(m.to_owned())
        {
            self.repeated_message_ids += 1;
        }
    }

    fn has(&self, id: u64) -> bool {
        self.counts.get(id as usize).is_some_and(|c| *c > 0)
    }

    fn report(
        &self,
        name: &str,
        acknowledged: &[u64],
        sent: &[Duration],
        on_the_wire: &[u32],
    ) -> TargetReport {
        let missing: Vec<u64> = acknowledged
            .iter()
            .copied()
            .filter(|id| !self.has(*id))
            .collect();
        let repeated = (0..self.counts.len() as u64).filter(|id| self.counts[*id as usize] > 1);
        let missing_ranges = runs(missing.iter().copied(), sent);
        let duplicate_ranges = runs(repeated, sent);
        TargetReport {
            name: name.to_owned(),
            received: self.received,
            distinct: self.counts.iter().filter(|c| **c > 0).count() as u64,
            missing,
            missing_ranges,
            duplicate_ranges,
            repeated_message_ids: self.repeated_message_ids,
            duplicates: self
                .counts
                .iter()
                .map(|c| u64::from(c.saturating_sub(1)))
                .sum(),
            gateway_duplicates: self
                .counts
                .iter()
                .enumerate()
                .map(|(id, c)| {
                    let copies = on_the_wire.get(id).copied().unwrap_or(1).max(1);
                    u64::from(c.saturating_sub(copies))
                })
                .sum(),
        }
    }
}

/// Ascending ids as runs `(first, last, when the first was sent)`.
fn runs(ids: impl Iterator<Item = u64>, sent: &[Duration]) -> Vec<(u64, u64, Duration)> {
    let mut out: Vec<(u64, u64, Duration)> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some((_, last, _)) if *last + 1 == id => *last = id,
            _ => out.push((id, id, sent.get(id as usize).copied().unwrap_or_default())),
        }
    }
    out
}

type SharedTally = Arc<std::sync::Mutex<Tally>>;

/// A target the soak reads: its name and what it received.
struct Target {
    name: String,
    tally: SharedTally,
}

fn target(targets: &mut Vec<Target>, name: String) -> SharedTally {
    let tally = SharedTally::default();
    targets.push(Target {
        name,
        tally: tally.clone(),
    });
    tally
}

/// The header the gateway puts on every bridged message (its place in the source log).
const MESSAGE_ID: &str = "x-stepflow-message-id";

/// The id in a payload (`{"seq": N, ...}`).
fn id_of(payload: &serde_json::Value) -> Option<u64> {
    payload["seq"].as_u64()
}

/// The documents: telemetry the gateway receives over MQTT ([`iot_spec`]); a Kafka topic it
/// sends to and reads back (two channels on one topic); an AMQP exchange it sends to
/// ([`amqp_target_spec`]).
fn write_documents(specs: &Path, bridges: &Path, prefix: &str) {
    iot_spec(specs, "soakiot", prefix, 1);
    write_file(
        &specs.join("soak-kafka.yaml"),
        &format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: soakkafka
info: {{title: Soak analytics, version: 1.0.0}}
servers:
  kafka: {{host: '127.0.0.1:9092', protocol: kafka}}
channels:
  telemetryOut:
    address: 'devices/{{deviceId}}/telemetry'
    bindings: {{kafka: {{topic: '{prefix}.telemetry', x-stepflow-key: '{{deviceId}}'}}}}
  telemetryIn:
    address: '{prefix}.telemetry'
    bindings: {{kafka: {{topic: '{prefix}.telemetry'}}}}
operations:
  sendTelemetry: {{action: send, channel: {{$ref: '#/channels/telemetryOut'}}}}
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetryIn'}}
    bindings: {{kafka: {{groupId: {prefix}-gateway}}}}
"#
        ),
    );
    amqp_target_spec(specs, "soakamqp", prefix);
    write_file(
        &bridges.join("soak.yaml"),
        "bridges:
  to-kafka:
    from: soakiot.telemetry
    on_target_down: block
    to:
      - channel: soakkafka.telemetryOut
  to-archive:
    from: soakiot.telemetry
    on_target_down: block
    to:
      - channel: soakamqp.readings
",
    );
}

/// Which ids the broker acknowledged, when each was first handed to the client, and how many
/// copies of each the devices put on the wire.
#[derive(Default)]
struct Acknowledged {
    ids: Vec<bool>,
    published: u64,
    first_sent: Vec<Duration>,
    on_the_wire: Vec<u32>,
}

impl Acknowledged {
    /// A PUBLISH of `id` went out (a resend after a lost connection is a second copy).
    fn written(&mut self, id: u64) {
        let i = id as usize;
        if self.on_the_wire.len() <= i {
            self.on_the_wire.resize(i + 1, 0);
        }
        self.on_the_wire[i] += 1;
    }

    fn sent(&mut self, id: u64, at: Duration) {
        if self.first_sent.len() as u64 == id {
            self.first_sent.push(at);
        }
        self.published = self.published.max(id + 1);
    }

    fn mark(&mut self, id: u64) {
        let i = id as usize;
        if self.ids.len() <= i {
            self.ids.resize(i + 1, false);
        }
        self.ids[i] = true;
    }

    fn list(&self) -> Vec<u64> {
        (0..self.ids.len() as u64)
            .filter(|i| self.ids[*i as usize])
            .collect()
    }
}

/// A device fleet publishing `{seq}` at QoS 1 at `rate`, through broker restarts: each
/// connection is a fresh client, and what a lost connection had not had acknowledged is sent
/// again on the next one (so the broker may get a copy twice, never none). No new id is taken
/// while the broker is away. Returns when `stop` is cancelled and every id is acknowledged (or
/// `give_up` passed).
async fn publish_through_restarts(
    started: Instant,
    port: u16,
    prefix: String,
    rate: u64,
    acknowledged: Arc<std::sync::Mutex<Acknowledged>>,
    stop: CancellationToken,
    give_up: Duration,
) {
    use rumqttc::{Event, Outgoing, Packet, QoS};
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut next_id = 0u64;
    let tick = Duration::from_micros(1_000_000 / rate.max(1));
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if retry.is_empty() || since.elapsed() > give_up {
                return;
            }
        }
        let mut options = rumqttc::MqttOptions::new(unique("soak-fleet"), "127.0.0.1", port);
        options.set_inflight(100);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        // Ids handed to the client, in order, until their PUBLISH goes out with a packet id.
        let mut handed: VecDeque<u64> = VecDeque::new();
        let mut in_flight: HashMap<u16, u64> = HashMap::new();
        let mut connected = false;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Cancel-safe: a tick not taken is taken at the next turn.
                _ = ticker.tick(), if connected => {
                    // Up to 20 resends and one new id per tick: a backlog drains at 20x the rate.
                    let mut batch: Vec<u64> = Vec::new();
                    while batch.len() < 20 {
                        match retry.pop_front() {
                            Some(id) => batch.push(id),
                            None => break,
                        }
                    }
                    if !stop.is_cancelled() {
                        batch.push(next_id);
                        acknowledged.lock().unwrap().sent(next_id, started.elapsed());
                        next_id += 1;
                    } else if batch.is_empty() && handed.is_empty() && in_flight.is_empty() {
                        return;
                    }
                    for id in batch {
                        let topic = format!("{prefix}/devices/d{}/telemetry", id % 8);
                        let payload = serde_json::json!({"seq": id, "temperature": 21.5}).to_string();
                        // `try_`: the event loop is polled by this task; an awaited publish
                        // would wait on itself when the request channel is full.
                        if client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_ok() {
                            handed.push_back(id);
                        } else {
                            retry.push_front(id);
                        }
                    }
                }
                // Cancel-safe (rumqttc's poll keeps its state between calls).
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(id) = handed.pop_front() {
                            in_flight.insert(pkid, id);
                            acknowledged.lock().unwrap().written(id);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = in_flight.remove(&ack.pkid) {
                            acknowledged.lock().unwrap().mark(id);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
            if stop.is_cancelled() && stopped_at.is_some_and(|s| s.elapsed() > give_up) {
                return;
            }
        }
        // The connection is gone: whatever it had not acknowledged goes again, oldest first.
        let mut lost: Vec<u64> = in_flight.into_values().chain(handed).collect();
        lost.sort_unstable();
        for id in lost.into_iter().rev() {
            retry.push_front(id);
        }
        if stop.is_cancelled() {
            stopped_at.get_or_insert_with(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A WebSocket reader of `channel` that follows the daemon through its restarts: it reconnects
/// with `?from=` the offset after the last one it saw.
async fn read_websocket(
    port: Arc<AtomicU16>,
    channel: String,
    tally: SharedTally,
    stop: CancellationToken,
) {
    let mut next = 1u64;
    while !stop.is_cancelled() {
        let url = format!(
            "ws://127.0.0.1:{}/ws/{channel}?from={next}",
            port.load(Ordering::SeqCst)
        );
        let Ok(Ok(mut ws)) = tokio::time::timeout(Duration::from_secs(5), ws_connect(&url)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return,
                frame = ws.next() => frame,
            };
            let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = frame else {
                if matches!(frame, Some(Ok(_))) {
                    continue; // pings, pongs
                }
                break;
            };
            let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let (Some(offset), Some(id)) = (frame["offset"].as_u64(), id_of(&frame["payload"])) {
                next = offset + 1;
                let message_id = frame["headers"][MESSAGE_ID].as_str();
                tally.lock().unwrap().record(id, message_id);
            }
        }
        let _ = ws.close(None).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A durable subscription read over SSE; a reconnect's `Last-Event-ID` acknowledges what was
/// read, so the cursor follows the reader through the daemon's restarts.
async fn read_subscription(
    port: Arc<AtomicU16>,
    channel: String,
    name: String,
    tally: SharedTally,
    stop: CancellationToken,
) {
    let mut last: Option<u64> = None;
    while !stop.is_cancelled() {
        let url = format!(
            "http://127.0.0.1:{}/sse/{channel}?subscription={name}",
            port.load(Ordering::SeqCst)
        );
        let Ok(Ok(mut sse)) =
            tokio::time::timeout(Duration::from_secs(5), SseClient::connect(&url, last)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = sse.next(Duration::from_secs(3600)) => event,
            };
            let Ok(event) = event else { break };
            if event.event != "message" {
                continue;
            }
            let frame: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
            if let (Ok(offset), Some(id)) = (event.id.parse::<u64>(), id_of(&frame["payload"])) {
                last = Some(offset);
                tally.lock().unwrap().record(id, None);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Kafka topic read directly, in a group of its own, from the beginning.
async fn read_kafka(bootstrap: String, topic: String, tally: SharedTally, stop: CancellationToken) {
    use rdkafka::message::Message;
    let consumer = kafka_reader(&bootstrap, &topic);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = consumer.recv() => m,
        };
        match message {
            Ok(m) => {
                let payload: serde_json::Value = m
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or_default();
                let message_id = m.headers().and_then(|h| {
                    use rdkafka::message::Headers;
                    h.iter()
                        .find(|h| h.key == MESSAGE_ID)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                if let Some(id) = id_of(&payload) {
                    tally.lock().unwrap().record(id, message_id.as_deref());
                }
            }
            // The broker is away: librdkafka reconnects by itself.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The archive queue read directly from RabbitMQ (not through the proxy), acknowledging each.
async fn read_queue(queue: String, tally: SharedTally, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok((_connection, channel)) = amqp_channel().await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Ok(mut consumer) = channel
            .basic_consume(
                queue.clone().into(),
                unique("soak").into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => return,
                d = consumer.next() => d,
            };
            let Some(Ok(delivery)) = delivery else { break };
            let payload: serde_json::Value =
                serde_json::from_slice(&delivery.data).unwrap_or_default();
            let message_id = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(MESSAGE_ID).cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            if let Some(id) = id_of(&payload) {
                tally.lock().unwrap().record(id, message_id.as_deref());
            }
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    }
}

fn draw(rng: &mut fastrand::Rng, (low, high): (Duration, Duration)) -> Duration {
    let span = high.saturating_sub(low).as_millis() as u64;
    low + Duration::from_millis(rng.u64(0..=span))
}

/// The pieces a fault acts on.
struct Chaos {
    started: Instant,
    daemon: tokio::sync::Mutex<Daemon>,
    port: Arc<AtomicU16>,
    pid: AtomicU64,
    mosquitto: std::sync::Mutex<OwnMosquitto>,
    kafka: std::sync::Mutex<Tansu>,
    rabbit: tokio::sync::Mutex<TcpProxy>,
    records: std::sync::Mutex<Vec<FaultRecord>>,
    /// Set while a fault of any kind is being undone at the end.
    calm: AtomicBool,
}

impl Chaos {
    async fn inject(&self, fault: Fault, outage: Duration) -> Result<()> {
        let at = self.started.elapsed();
        let began = Instant::now();
        match fault {
            Fault::DaemonKilled => {
                let mut daemon = self.daemon.lock().await;
                daemon.kill9();
                daemon.restart_serving().await?;
                self.port.store(daemon.port, Ordering::SeqCst);
                self.pid.store(u64::from(daemon.pid()), Ordering::SeqCst);
            }
            Fault::MosquittoRestarted => {
                let pause = outage.min(Duration::from_secs(2));
                blocking(|| self.mosquitto.lock().unwrap().terminate()).await;
                tokio::time::sleep(pause).await;
                blocking(|| self.mosquitto.lock().unwrap().restart()).await;
            }
            Fault::RabbitMqAway => {
                self.rabbit.lock().await.down();
                tokio::time::sleep(outage).await;
                self.rabbit.lock().await.up().await;
            }
            Fault::KafkaAway => {
                blocking(|| self.kafka.lock().unwrap().stop()).await;
                tokio::time::sleep(outage).await;
                blocking(|| self.kafka.lock().unwrap().restart()).await;
            }
        }
        self.records.lock().unwrap().push(FaultRecord {
            at,
            fault,
            lasted: began.elapsed(),
        });
        Ok(())
    }

    /// One kind of fault at random intervals until `stop`.
    async fn keep_injecting(
        &self,
        fault: Fault,
        plan: &SoakPlan,
        seed: u64,
        stop: CancellationToken,
    ) -> Result<()> {
        let mut rng = fastrand::Rng::with_seed(seed);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(draw(&mut rng, plan.between_faults)) => {}
            }
            if stop.is_cancelled() || self.calm.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.inject(fault, draw(&mut rng, plan.outage)).await?;
        }
    }

    fn sample(&self) -> Option<Sample> {
        let pid = self.pid.load(Ordering::SeqCst) as u32;
        Some(Sample {
            at: self.started.elapsed(),
            rss_kib: process_status_kib(pid, "VmRSS:")?,
            open_files: open_files(pid)?,
        })
    }
}

/// Runs a blocking broker control (a process start or stop, with its waits) off the runtime.
async fn blocking(f: impl FnOnce() + Send) {
    tokio::task::block_in_place(f)
}

/// Runs the soak. Needs a multi-threaded runtime, the machine's RabbitMQ, and the mosquitto and
/// tansu binaries.
pub async fn run(plan: SoakPlan) -> Result<SoakReport> {
    require_rabbitmq();
    let prefix = unique("soak").replace('-', "_");
    let dir = tempfile::tempdir()?;
    let (specs, bridges) = (dir.path().join("specs"), dir.path().join("bridges"));
    std::fs::create_dir_all(&specs)?;
    std::fs::create_dir_all(&bridges)?;
    write_documents(&specs, &bridges, &prefix);

    let mosquitto = OwnMosquitto::start_persistent();
    let kafka = Tansu::start();
    let topic = format!("{prefix}.telemetry");
    kafka.create_topic(&topic, 3);
    let (connection, _, queue) = archive_queue(&prefix).await;
    let _ = connection.close(200, "declared".into()).await;
    let rabbit = TcpProxy::start("127.0.0.1:5672").await;

    let servers = [
        format!("soakiot/broker={}", mosquitto.url()),
        format!("soakkafka/kafka=kafka://{}", kafka.bootstrap()),
        format!("soakamqp/rabbit=amqp://127.0.0.1:{}", rabbit.port),
    ];
    let mut args = vec![
        "--specs",
        specs.to_str().unwrap(),
        "--bridges",
        bridges.to_str().unwrap(),
    ];
    for s in &servers {
        args.extend(["--server", s.as_str()]);
    }
    let daemon = Daemon::start(&args).await?;

    // Durable subscriptions before the first message, so each must see every one.
    let channel = "soakiot.telemetry";
    let client = reqwest::Client::new();
    for i in 0..plan.sse_subscribers {
        let response = client
            .post(daemon.url("/api/v1/subscriptions"))
            .json(&serde_json::json!({"name": format!("soak-{i}"), "channel": channel}))
            .send()
            .await?;
        if response.status() != 201 {
            bail!("subscription not created: {}", response.text().await?);
        }
    }

    let chaos = Arc::new(Chaos {
        started: Instant::now(),
        port: Arc::new(AtomicU16::new(daemon.port)),
        pid: AtomicU64::new(u64::from(daemon.pid())),
        daemon: tokio::sync::Mutex::new(daemon),
        mosquitto: std::sync::Mutex::new(mosquitto),
        kafka: std::sync::Mutex::new(kafka),
        rabbit: tokio::sync::Mutex::new(rabbit),
        records: std::sync::Mutex::default(),
        calm: AtomicBool::new(false),
    });

    let readers_stop = CancellationToken::new();
    let mut targets = Vec::new();
    let mut readers = Vec::new();
    let tally = target(&mut targets, format!("kafka topic {topic}"));
    readers.push(tokio::spawn(read_kafka(
        chaos.kafka.lock().unwrap().bootstrap(),
        topic.clone(),
        tally,
        readers_stop.clone(),
    )));
    let tally = target(&mut targets, format!("rabbitmq queue {queue}"));
    readers.push(tokio::spawn(read_queue(
        queue.clone(),
        tally,
        readers_stop.clone(),
    )));
    for i in 0..plan.websocket_readers {
        let tally = target(&mut targets, format!("websocket soakkafka #{i}"));
        readers.push(tokio::spawn(read_websocket(
            chaos.port.clone(),
            "soakkafka.telemetryIn".to_owned(),
            tally,
            readers_stop.clone(),
        )));
    }
    for i in 0..plan.sse_subscribers {
        let tally = target(&mut targets, format!("sse subscription soak-{i}"));
        readers.push(tokio::spawn(read_subscription(
            chaos.port.clone(),
            channel.to_owned(),
            format!("soak-{i}"),
            tally,
            readers_stop.clone(),
        )));
    }

    let sampler_stop = CancellationToken::new();
    let sampler = {
        let (chaos, stop, every) = (chaos.clone(), sampler_stop.clone(), plan.sample_every);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return samples,
                    _ = ticker.tick() => samples.extend(chaos.sample()),
                }
            }
        })
    };

    let acknowledged = Arc::new(std::sync::Mutex::new(Acknowledged::default()));
    let publisher_stop = CancellationToken::new();
    let publisher = tokio::spawn(publish_through_restarts(
        chaos.started,
        chaos.mosquitto.lock().unwrap().port,
        prefix.clone(),
        plan.rate,
        acknowledged.clone(),
        publisher_stop.clone(),
        Duration::from_secs(60),
    ));

    let faults_stop = CancellationToken::new();
    let mut injectors = Vec::new();
    for (n, fault) in plan.faults.clone().into_iter().enumerate() {
        let (chaos, plan, stop) = (chaos.clone(), plan.clone(), faults_stop.clone());
        injectors.push(tokio::spawn(async move {
            chaos
                .keep_injecting(fault, &plan, plan.seed.wrapping_add(n as u64), stop)
                .await
        }));
    }

    tokio::time::sleep(plan.duration).await;
    // Faults stop first (one under way finishes: every broker comes back), then the publisher,
    // which sends what is still unacknowledged.
    chaos.calm.store(true, Ordering::SeqCst);
    faults_stop.cancel();
    for injector in injectors {
        injector.await??;
    }
    let calm_since = Instant::now();
    publisher_stop.cancel();
    publisher.await?;
    let (acked, published, sent, on_the_wire) = {
        let a = acknowledged.lock().unwrap();
        (
            a.list(),
            a.published,
            a.first_sent.clone(),
            a.on_the_wire.clone(),
        )
    };

    // Every target catches up, or the drain time runs out.
    let deadline = Instant::now() + plan.drain;
    loop {
        let behind = targets
            .iter()
            .any(|t| acked.iter().any(|id| !t.tally.lock().unwrap().has(*id)));
        if !behind || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained_in = calm_since.elapsed();
    // A moment more for late duplicates to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    readers_stop.cancel();
    for reader in readers {
        let _ = reader.await;
    }
    sampler_stop.cancel();
    let samples = sampler.await?;

    let log = chaos.daemon.lock().await.log();
    // Kept for a look after the run: the temporary directories go with it.
    let kept = std::env::temp_dir().join(format!("{prefix}-logs"));
    std::fs::create_dir_all(&kept)?;
    std::fs::write(kept.join("daemon.log"), &log)?;
    std::fs::write(
        kept.join("mosquitto.log"),
        chaos.mosquitto.lock().unwrap().log(),
    )?;
    std::fs::write(kept.join("tansu.log"), chaos.kafka.lock().unwrap().log())?;
    let panics = log
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_owned)
        .collect();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    let errors = log
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .map(str::to_owned)
        .collect();
    let targets: Vec<TargetReport> = targets
        .iter()
        .map(|t| {
            t.tally
                .lock()
                .unwrap()
                .report(&t.name, &acked, &sent, &on_the_wire)
        })
        .collect();
    // Every run of repeats and losses, per target, for a look after the run.
    let mut runs = String::new();
    for t in &targets {
        for (label, list) in [
            ("lost", &t.missing_ranges),
            ("repeated", &t.duplicate_ranges),
        ] {
            for (first, last, at) in list.iter() {
                runs.push_str(&format!(
                    "{}\t{label}\t{first}\t{}\t{:.3}\n",
                    t.name,
                    last - first + 1,
                    at.as_secs_f64()
                ));
            }
        }
    }
    std::fs::write(kept.join("runs.tsv"), runs)?;
    let report = SoakReport {
        plan,
        published,
        acknowledged: acked.len() as u64,
        targets,
        faults: chaos.records.lock().unwrap().clone(),
        samples,
        panics,
        warnings,
        errors,
        drained_in,
        logs: kept,
    };
    amqp_cleanup(&prefix, &["archive"]).await;
    Ok(report)
}
