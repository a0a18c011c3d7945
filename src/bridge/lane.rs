//! A lane at run time: reads the source log from its durable cursor, sends each message to its
//! target (pipelined, in order), and moves the cursor past what the target confirmed.
//!
//! Up to `max_in_flight` sends are outstanding; their outcomes are taken in offset order, so the
//! cursor never passes an unconfirmed message. A transient failure (target down, timeout) drops
//! the window and starts again from the failed message, one at a time until the target takes
//! one: order is kept, and messages after it that had already been confirmed are sent again
//! (at-least-once: duplicates, never gaps). A permanent failure (the target's schema refuses the
//! converted payload, a parameter is missing) dead-letters the message at once, whatever the policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BRIDGE_HEADER, Bridge, Lane, MESSAGE_ID_HEADER, Policy, Start, TARGET_HEADER, Target};
use crate::calls::{CallError, CallRequest, Operations};
use crate::hub::{Hub, LiveRoute, PublishFailure, PublishRequest, SubscriptionEvent};
use crate::routing::envelope::{Delivered, Origin, Transport};
use crate::store::{self, PendingAppend, Store};
use crate::telemetry::events::DeadLetterReason;
use crate::telemetry::{
    BRIDGE_CONVERSIONS, BRIDGE_FAILURES, BRIDGE_IN_FLIGHT, BRIDGE_LAG, BRIDGE_LATENCY,
    BRIDGE_MESSAGES, BRIDGE_RETRIES,
};
use crate::upstream::Backoff;

/// The store namespace of lane cursors: `{bridge}/{target}` → the next offset to deliver.
pub const CURSORS: &str = "bridge-cursors";

/// How often a lane records its cursor durably (waiting for the disk).
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How often, at most, a busy lane notes its progress between durable commits. A note does not
/// wait for the disk: it rides the log's next group commit, so a crash makes the lane send again
/// only the last few milliseconds of what its target confirmed.
const NOTE_INTERVAL: Duration = Duration::from_millis(5);
/// Longest wait between two attempts on a target that is down.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// How long a starting lane waits for its target's first connection before its policy applies
/// as to any target that is down (a broker's connect and CONNACK take milliseconds; a broker
/// still booting alongside the gateway, seconds).
const FIRST_CONNECTION_GRACE: Duration = Duration::from_secs(10);
/// How long a graceful stop waits for sends already out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a retry waits for the sends already out behind the one that failed: as long as a
/// publish may take (the hub's publish timeout), so the target's client no longer holds them.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one send did not go through.
#[derive(Debug, Clone)]
pub enum SendFailure {
    /// Retrying cannot help (the message does not fit the target): dead-letter it.
    Permanent(String),
    /// The target is down, slow or refused for now.
    Transient {
        reason: &'static str,
        detail: String,
    },
}

impl SendFailure {
    pub fn detail(&self) -> &str {
        match self {
            SendFailure::Permanent(d) => d,
            SendFailure::Transient { detail, .. } => detail,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            SendFailure::Permanent(_) => "rejected",
            SendFailure::Transient { reason, .. } => reason,
        }
    }
}

/// Sends one message to a lane's target, once: mapping, conversion, publish (or call).
pub async fn send(
    hub: &Hub,
    operations: &Operations,
    lane: &Lane,
    message: &Delivered,
) -> Result<(), SendFailure> {
    let envelope = &message.envelope;
    let needs_json = matches!(lane.conversion, super::mapping::Conversion::JsonToAvro(_))
        || matches!(lane.target, Target::Operation(_))
        || lane
            .params
            .iter()
            .chain(&lane.headers)
            .any(|(_, t)| t.reads_payload())
        || lane.key.as_ref().is_some_and(|k| k.reads_payload());
    let parsed: Option<Value> = if needs_json {
        serde_json::from_slice(&envelope.payload).ok()
    } else {
        None
    };
    let render = |t: &super::mapping::Template| {
        t.render(message, parsed.as_ref())
            .map_err(SendFailure::Permanent)
    };
    let mut params = HashMap::new();
    for (name, template) in &lane.params {
        params.insert(name.clone(), render(template)?);
    }
    // What describes the source delivery (broker metadata, dead-letter markers) is not the
    // message's: the target gets the message's own headers only.
    let mut headers: Vec<(String, String)> = envelope
        .headers
        .iter()
        .filter(|(k, _)| !is_delivery_metadata(k))
        .cloned()
        .collect();
    for (name, template) in &lane.headers {
        headers.push((name.clone(), render(template)?));
    }
    headers.push((
        MESSAGE_ID_HEADER.to_owned(),
        format!("{}/{}", envelope.channel, message.offset),
    ));
    let key = lane.key.as_ref().map(render).transpose()?;
    let payload = lane
        .conversion
        .apply(&envelope.payload, parsed.as_ref())
        .map_err(SendFailure::Permanent)?;
    match &lane.target {
        Target::Channel(channel) => hub
            .publish(
                channel,
                PublishRequest {
                    payload,
                    content_type: None,
                    params,
                    headers,
                    origin: Origin::client(Transport::Bridge, 0),
                    key,
                },
            )
            .await
            .map(|_| ())
            .map_err(|e| match e {
                PublishFailure::Upstream(u) => SendFailure::Transient {
                    reason: u.reason(),
                    detail: u.to_string(),
                },
                PublishFailure::Store(s) => SendFailure::Transient {
                    reason: "log_unavailable",
                    detail: s.to_string(),
                },
                other => SendFailure::Permanent(other.to_string()),
            }),
        Target::Operation(operation) => {
            let request = CallRequest {
                path: params
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
                query: Default::default(),
                headers: Default::default(),
                body: parsed.or_else(|| {
                    Some(Value::String(
                        String::from_utf8_lossy(&envelope.payload).into_owned(),
                    ))
                }),
            };
            match operations.call(operation, request).await {
                Ok(r) if r.status < 400 => Ok(()),
                Ok(r) if r.status == 408 || r.status == 429 || r.status >= 500 => {
                    Err(SendFailure::Transient {
                        reason: "upstream_error",
                        detail: format!("{operation} answered {}", r.status),
                    })
                }
                Ok(r) => Err(SendFailure::Permanent(format!(
                    "{operation} answered {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(512)])
                ))),
                Err(e @ (CallError::Timeout(_) | CallError::Unavailable(_))) => {
                    Err(SendFailure::Transient {
                        reason: e.label(),
                        detail: e.to_string(),
                    })
                }
                Err(e) => Err(SendFailure::Permanent(e.to_string())),
            }
        }
    }
}

/// Headers the gateway adds on intake (`kafka_offset`, `amqp_routing_key`, `mqtt_qos`...) and
/// on dead-lettering.
fn is_delivery_metadata(name: &str) -> bool {
    name == BRIDGE_HEADER
        || name == TARGET_HEADER
        || name == MESSAGE_ID_HEADER
        || name == "asyncapi_message"
        || ["kafka_", "amqp_", "mqtt_"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// Writes a message a lane gave up on to the source channel's dead-letter log, marked with the
/// bridge and target so a replay sends it there again.
pub async fn dead_letter(
    hub: &Hub,
    route: &LiveRoute,
    lane: &Lane,
    message: &Delivered,
    reason: &str,
) -> Result<PendingAppend, store::Error> {
    let mut envelope = message.envelope.clone();
    envelope
        .headers
        .retain(|(k, _)| k != BRIDGE_HEADER && k != TARGET_HEADER);
    envelope
        .headers
        .push((BRIDGE_HEADER.into(), lane.bridge.clone()));
    envelope
        .headers
        .push((TARGET_HEADER.into(), lane.target.label().to_owned()));
    let detail = format!("bridge {} → {}: {reason}", lane.bridge, lane.target.label());
    hub.dead_letter(
        route,
        envelope,
        DeadLetterReason::BridgeUndeliverable,
        detail,
    )
    .await
}

/// Gives every lane without a cursor one (at the end of its source log, or at its oldest message
/// for `start: earliest`) before any connector starts: a message that arrives after this is
/// delivered, whenever the lane gets to run.
pub async fn prepare_cursors(
    store: &Store,
    hub: &Hub,
    bridges: &[Arc<Bridge>],
) -> Result<(), store::Error> {
    for bridge in bridges {
        for lane in &bridge.lanes {
            if let Some(route) = hub.route(&lane.source) {
                let earliest = lane.start == Start::Earliest;
                store
                    .cursor_or_create(CURSORS, &lane.cursor_key(), &route.log, earliest)
                    .await?;
            }
        }
    }
    Ok(())
}

/// A lane's cursor: the next offset it will deliver.
pub async fn cursor(store: &Store, lane: &Lane) -> Result<Option<u64>, store::Error> {
    store.cursor(CURSORS, &lane.cursor_key()).await
}

/// Starts one task per lane.
pub fn start(
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    bridges: &[Arc<Bridge>],
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) {
    for bridge in bridges {
        for lane in &bridge.lanes {
            let Some(route) = hub.route(&lane.source) else {
                continue;
            };
            let runner = Runner::new(hub.clone(), operations.clone(), route, lane.clone());
            tasks.spawn(runner.run(shutdown.clone()));
        }
    }
}

enum Outcome {
    Delivered,
    Filtered,
    /// The target confirmed it before a retry (see [`Runner::settle_behind`]): not sent again.
    AlreadyConfirmed,
    Failed(SendFailure),
}

struct Done {
    message: Arc<Delivered>,
    outcome: Outcome,
}

struct LaneMetrics {
    forwarded: Counter,
    /// Payloads converted and delivered, for lanes that convert.
    converted: Option<Counter>,
    filtered: Counter,
    dead_lettered: Counter,
    dropped: Counter,
    expired: Counter,
    retries: Counter,
    in_flight: Gauge,
    lag: Gauge,
    latency: Histogram,
}

impl LaneMetrics {
    fn new(lane: &Lane) -> Self {
        let (b, t) = (lane.bridge.clone(), lane.target.label().to_owned());
        let outcome = |o: &'static str| counter!(BRIDGE_MESSAGES, "bridge" => b.clone(), "target" => t.clone(), "outcome" => o);
        LaneMetrics {
            forwarded: outcome("forwarded"),
            converted: lane.conversion.label().map(|c| {
                counter!(BRIDGE_CONVERSIONS, "bridge" => b.clone(), "target" => t.clone(), "conversion" => c)
            }),
            filtered: outcome("filtered"),
            dead_lettered: outcome("dead_lettered"),
            dropped: outcome("dropped"),
            expired: outcome("expired"),
            retries: counter!(BRIDGE_RETRIES, "bridge" => b.clone(), "target" => t.clone()),
            in_flight: gauge!(BRIDGE_IN_FLIGHT, "bridge" => b.clone(), "target" => t.clone()),
            lag: gauge!(BRIDGE_LAG, "bridge" => b.clone(), "target" => t.clone()),
            latency: histogram!(BRIDGE_LATENCY, "bridge" => b, "target" => t),
        }
    }

    fn failed(&self, lane: &Lane, reason: &'static str) {
        counter!(BRIDGE_FAILURES, "bridge" => lane.bridge.clone(), "target" => lane.target.label().to_owned(), "reason" => reason).increment(1);
    }
}

struct Runner {
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    route: Arc<LiveRoute>,
    lane: Arc<Lane>,
    metrics: LaneMetrics,
    /// The next offset to deliver: everything before it is confirmed or dead-lettered.
    next: u64,
    committed: u64,
    /// The last cursor noted without waiting for the disk, and when.
    noted: (u64, Instant),
    /// Offsets past `next` the target confirmed while an earlier one failed: the retry passes
    /// them instead of sending them twice.
    confirmed_ahead: std::collections::BTreeSet<u64>,
    /// Dead-letter appends not yet known to be flushed, by offset: the cursor waits for them.
    dead_letters: Vec<(u64, PendingAppend)>,
    /// Attempts on the message at the head of the lane (offset, attempts).
    attempts: (u64, u32),
    /// `dead_letter` policy: while set and in the future, transient failures dead-letter at once.
    circuit_open_until: Option<Instant>,
    backoff: Backoff,
}

impl Runner {
    fn new(
        hub: Arc<Hub>,
        operations: Arc<Operations>,
        route: Arc<LiveRoute>,
        lane: Arc<Lane>,
    ) -> Self {
        Runner {
            metrics: LaneMetrics::new(&lane),
            backoff: Backoff::new(lane.retry_backoff, MAX_RETRY_DELAY),
            hub,
            operations,
            route,
            lane,
            next: 1,
            committed: 1,
            noted: (1, Instant::now()),
            confirmed_ahead: Default::default(),
            dead_letters: Vec::new(),
            attempts: (0, 0),
            circuit_open_until: None,
        }
    }

    fn store(&self) -> &Store {
        self.hub.store()
    }

    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            match cursor(self.store(), &self.lane).await {
                Ok(c) => {
                    self.next = c.unwrap_or(1);
                    self.committed = self.next;
                    break;
                }
                Err(e) => {
                    tracing::warn!(bridge = %self.lane.bridge, error = %e, "cannot read the lane's cursor; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        // Connectors start together with the lanes: give the target its first connection
        // before the first send, rather than warn about a target that is merely starting.
        if let Target::Channel(target) = &self.lane.target {
            let deadline = tokio::time::Instant::now() + FIRST_CONNECTION_GRACE;
            while self.hub.upstreams_connected(target) == Some(false)
                && tokio::time::Instant::now() < deadline
            {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
        tracing::info!(bridge = %self.lane.bridge, from = %self.lane.source, target = self.lane.target.label(), cursor = self.next, "bridge lane started");
        let mut probing = false;
        while !shutdown.is_cancelled() {
            match self.stream(&shutdown, probing).await {
                Restart::Stop => break,
                Restart::Retry => {
                    probing = true;
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if self.lane.policy == Policy::DropOldest {
                        self.drop_oldest().await;
                    }
                }
            }
        }
        self.commit().await;
        self.metrics.in_flight.set(0.0);
        tracing::info!(bridge = %self.lane.bridge, target = self.lane.target.label(), cursor = self.next, "bridge lane stopped");
    }

    /// Streams from `self.next` until a retry is needed or the daemon stops.
    async fn stream(&mut self, shutdown: &CancellationToken, mut probing: bool) -> Restart {
        let mut subscription = match self.hub.subscribe(&self.route, Some(self.next)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(bridge = %self.lane.bridge, error = %e, "cannot read the source log; retrying");
                return Restart::Retry;
            }
        };
        let mut window: FuturesOrdered<BoxFuture<'static, Done>> = FuturesOrdered::new();
        let mut tick = tokio::time::interval(COMMIT_INTERVAL);
        let mut ticks = 0u64;
        loop {
            let capacity = if probing { 1 } else { self.lane.max_in_flight };
            self.metrics.in_flight.set(window.len() as f64);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain(&mut window).await;
                    return Restart::Stop;
                }
                Some(done) = window.next(), if !window.is_empty() => {
                    match self.finish(done).await {
                        Step::Continue => {
                            probing = false;
                            self.note_progress(window.is_empty()).await;
                        }
                        Step::Retry => {
                            self.settle_behind(&mut window, shutdown).await;
                            return Restart::Retry;
                        }
                    }
                }
                event = subscription.next(), if window.len() < capacity => match event {
                    Ok(Some(SubscriptionEvent::Message { message, .. })) => {
                        window.push_back(self.dispatch(message));
                    }
                    Ok(Some(SubscriptionEvent::Lagged { .. })) => {}
                    Ok(Some(SubscriptionEvent::Expired { missed, resume_from })) => {
                        tracing::warn!(bridge = %self.lane.bridge, target = self.lane.target.label(), missed, resume_from, "retention removed messages this lane had not sent; it continues with the oldest kept");
                        self.metrics.expired.increment(missed);
                        // Past the gap for good (committed with the next cursor write): a
                        // retry or a restart does not meet, count and log it again.
                        self.next = self.next.max(resume_from);
                    }
                    Ok(None) => return Restart::Stop,
                    Err(e) => {
                        tracing::warn!(bridge = %self.lane.bridge, error = %e, "source log read failed; retrying");
                        return Restart::Retry;
                    }
                },
                _ = tick.tick() => {
                    if !self.commit().await {
                        return Restart::Retry;
                    }
                    ticks += 1;
                    if ticks.is_multiple_of(5) {
                        self.report_lag().await;
                    }
                }
            }
        }
    }

    /// Starts the send of one message (or settles it at once when the filter drops it).
    fn dispatch(&self, message: Arc<Delivered>) -> BoxFuture<'static, Done> {
        if self.confirmed_ahead.contains(&message.offset) {
            return Box::pin(std::future::ready(Done {
                message,
                outcome: Outcome::AlreadyConfirmed,
            }));
        }
        if let Some(filter) = &self.lane.filter {
            let pass = filter.matches(&message).unwrap_or_else(|e| {
                tracing::debug!(bridge = %self.lane.bridge, offset = message.offset, error = %e, "filter did not evaluate to true");
                false
            });
            if !pass {
                return Box::pin(std::future::ready(Done {
                    message,
                    outcome: Outcome::Filtered,
                }));
            }
        }
        let (hub, operations, lane) =
            (self.hub.clone(), self.operations.clone(), self.lane.clone());
        Box::pin(async move {
            let outcome = match send(&hub, &operations, &lane, &message).await {
                Ok(()) => Outcome::Delivered,
                Err(e) => Outcome::Failed(e),
            };
            Done { message, outcome }
        })
    }

    async fn finish(&mut self, done: Done) -> Step {
        let step = self.settle(done).await;
        // What the cursor passed needs no remembering.
        if self.confirmed_ahead.first().is_some_and(|o| *o < self.next) {
            self.confirmed_ahead = self.confirmed_ahead.split_off(&self.next);
        }
        step
    }

    async fn settle(&mut self, done: Done) -> Step {
        let offset = done.message.offset;
        match done.outcome {
            Outcome::AlreadyConfirmed => {
                self.next = self.next.max(offset + 1);
                Step::Continue
            }
            Outcome::Delivered => {
                self.metrics.forwarded.increment(1);
                if let Some(converted) = &self.metrics.converted {
                    converted.increment(1);
                }
                if let Ok(age) = SystemTime::now().duration_since(done.message.envelope.received_at)
                {
                    self.metrics.latency.record(age.as_secs_f64());
                }
                self.backoff.reset();
                self.circuit_open_until = None;
                self.next = self.next.max(offset + 1);
                Step::Continue
            }
            Outcome::Filtered => {
                self.metrics.filtered.increment(1);
                self.next = self.next.max(offset + 1);
                Step::Continue
            }
            Outcome::Failed(failure) => {
                self.metrics.failed(&self.lane, failure.reason());
                let give_up = match &failure {
                    SendFailure::Permanent(_) => true,
                    SendFailure::Transient { .. } => {
                        let attempts = self.attempts_on(offset);
                        self.lane.policy == Policy::DeadLetter
                            && (self.circuit_open_until.is_some_and(|t| Instant::now() < t)
                                || attempts > self.lane.retries)
                    }
                };
                if give_up {
                    if matches!(failure, SendFailure::Transient { .. }) {
                        if self.circuit_open_until.is_none() {
                            tracing::warn!(bridge = %self.lane.bridge, target = self.lane.target.label(), error = failure.detail(), "target unavailable; dead-lettering until it is back");
                        }
                        self.circuit_open_until = Some(Instant::now() + self.backoff.next_cap());
                    }
                    match dead_letter(
                        &self.hub,
                        &self.route,
                        &self.lane,
                        &done.message,
                        failure.detail(),
                    )
                    .await
                    {
                        Ok(pending) => {
                            self.metrics.dead_lettered.increment(1);
                            self.dead_letters.push((offset, pending));
                            self.next = self.next.max(offset + 1);
                            Step::Continue
                        }
                        Err(e) => {
                            tracing::warn!(bridge = %self.lane.bridge, error = %e, "cannot dead-letter; retrying");
                            Step::Retry
                        }
                    }
                } else {
                    if self.attempts.1 == 1 {
                        tracing::warn!(bridge = %self.lane.bridge, target = self.lane.target.label(), offset, error = failure.detail(), "send failed; retrying in order");
                    }
                    self.metrics.retries.increment(1);
                    Step::Retry
                }
            }
        }
    }

    /// Counts an attempt on `offset`; how many there were.
    fn attempts_on(&mut self, offset: u64) -> u32 {
        if self.attempts.0 != offset {
            self.attempts = (offset, 0);
        }
        self.attempts.1 += 1;
        self.attempts.1
    }

    /// After a send failed at the head of the lane: waits (bounded, and not past `shutdown`) for
    /// the sends already out behind it, and remembers which ones the target confirmed, so the
    /// retry passes them instead of sending them twice. A send cannot be taken back from a
    /// broker client (librdkafka delivers what it queued once the broker is back), so a lane
    /// that left them unsettled would send every one of them again.
    async fn settle_behind(
        &mut self,
        window: &mut FuturesOrdered<BoxFuture<'static, Done>>,
        shutdown: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let done = tokio::select! {
                _ = shutdown.cancelled() => return,
                done = tokio::time::timeout_at(deadline, window.next()) => done,
            };
            let Ok(Some(done)) = done else { return };
            match done.outcome {
                Outcome::Delivered => {
                    self.metrics.forwarded.increment(1);
                    if let Some(converted) = &self.metrics.converted {
                        converted.increment(1);
                    }
                    self.confirmed_ahead.insert(done.message.offset);
                }
                Outcome::Filtered | Outcome::AlreadyConfirmed => {
                    self.confirmed_ahead.insert(done.message.offset);
                }
                Outcome::Failed(_) => {}
            }
        }
    }

    /// On stop: takes the outcomes of sends already out, for a bounded time, so what the
    /// target confirmed is not sent again after the restart.
    async fn drain(&mut self, window: &mut FuturesOrdered<BoxFuture<'static, Done>>) {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, window.next()).await {
            if !matches!(
                done.outcome,
                Outcome::Delivered | Outcome::Filtered | Outcome::AlreadyConfirmed
            ) {
                break;
            }
            self.finish(done).await;
        }
    }

    /// Notes the cursor without waiting for the disk, when it moved and either nothing is in
    /// flight (`idle`) or the last note is `NOTE_INTERVAL` old. Not while dead letters are
    /// pending: the cursor passes them only once they are on disk ([`Runner::commit`]).
    async fn note_progress(&mut self, idle: bool) {
        if self.next == self.noted.0
            || !self.dead_letters.is_empty()
            || (!idle && self.noted.1.elapsed() < NOTE_INTERVAL)
        {
            return;
        }
        let noted = self
            .store()
            .advance_cursor(CURSORS, &self.lane.cursor_key(), self.next)
            .await;
        if noted.is_ok() {
            self.noted = (self.next, Instant::now());
        }
    }

    /// Records the cursor once the dead letters before it are on disk; false when they could
    /// not be written (the lane starts again from the first of them).
    async fn commit(&mut self) -> bool {
        let mut ok = true;
        for (offset, pending) in std::mem::take(&mut self.dead_letters) {
            if let Err(e) = pending.flushed().await {
                tracing::warn!(bridge = %self.lane.bridge, offset, error = %e, "dead letter not written; sending again");
                self.next = self.next.min(offset);
                ok = false;
            }
        }
        if self.next != self.committed {
            match self
                .store()
                .set_cursor(CURSORS, &self.lane.cursor_key(), self.next)
                .await
            {
                Ok(()) => {
                    self.committed = self.next;
                    self.noted = (self.next, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(bridge = %self.lane.bridge, error = %e, "cannot record the lane's cursor")
                }
            }
        }
        ok
    }

    async fn report_lag(&self) {
        let stats = self.store().log_stats(&self.route.log);
        let lag = stats
            .last_offset
            .map_or(0, |last| (last + 1).saturating_sub(self.next));
        self.metrics.lag.set(lag as f64);
    }

    /// `drop_oldest`: keeps at most `max_lag` messages waiting, skipping the oldest.
    async fn drop_oldest(&mut self) {
        let stats = self.store().log_stats(&self.route.log);
        let Some(last) = stats.last_offset else {
            return;
        };
        let waiting = (last + 1).saturating_sub(self.next);
        if waiting > self.lane.max_lag {
            let skip = waiting - self.lane.max_lag;
            tracing::warn!(bridge = %self.lane.bridge, target = self.lane.target.label(), skipped = skip, "target still down; dropping the oldest waiting messages");
            self.metrics.dropped.increment(skip);
            self.next += skip;
            self.commit().await;
        }
    }
}

enum Restart {
    Stop,
    Retry,
}

enum Step {
    Continue,
    Retry,
}

/// Re-sends a dead letter of a bridge to its target; `Ok(false)` when the message is not a
/// bridge's dead letter.
pub async fn replay_dead_letter(
    hub: &Hub,
    operations: &Operations,
    bridges: &[Arc<Bridge>],
    message: &Delivered,
) -> Option<Result<(), SendFailure>> {
    let header = |name: &str| message.envelope.header(name);
    let (bridge, target) = (header(BRIDGE_HEADER)?, header(TARGET_HEADER)?);
    let lane = bridges
        .iter()
        .filter(|b| b.name == bridge)
        .flat_map(|b| &b.lanes)
        .find(|l| l.target.label() == target);
    Some(match lane {
        Some(lane) => send(hub, operations, lane, message).await,
        None => Err(SendFailure::Permanent(format!(
            "bridge '{bridge}' has no target '{target}' any more"
        ))),
    })
}
