//! Facts an operator may care about. Each `emit` writes the log line and moves the metric
//! together, so the two never disagree. Hot-path counters (received, delivered) are resolved per
//! route once, in [`RouteMetrics`].

use std::sync::OnceLock;

use metrics::{Counter, Histogram, counter, gauge, histogram};

use super::*;
use crate::routing::envelope::Transport;

/// Metric handles of one route, each resolved once on first use (so a route only exports the
/// series of the transports it actually uses).
pub struct RouteMetrics {
    channel: String,
    received: [OnceLock<Counter>; Transport::ALL.len()],
    delivered: [OnceLock<Counter>; Transport::ALL.len()],
    latency: [OnceLock<Histogram>; Transport::ALL.len()],
    log_appends: Counter,
    log_bytes: Counter,
}

impl RouteMetrics {
    pub fn new(channel: &str) -> Self {
        Self {
            channel: channel.to_owned(),
            received: Default::default(),
            delivered: Default::default(),
            latency: Default::default(),
            log_appends: counter!(LOG_APPENDS, "channel" => channel.to_owned(), "log" => "messages"),
            log_bytes: counter!(LOG_BYTES, "channel" => channel.to_owned(), "log" => "messages"),
        }
    }

    fn counter(&self, slots: &[OnceLock<Counter>], name: &'static str, t: Transport) -> Counter {
        slots[t as usize]
            .get_or_init(
                || counter!(name, "channel" => self.channel.clone(), "transport" => t.as_str()),
            )
            .clone()
    }

    pub fn message_received(&self, from: Transport) {
        self.counter(&self.received, MESSAGES_RECEIVED, from)
            .increment(1);
    }

    /// A message was handed to a subscriber or upstream `to`, `latency` after it arrived
    /// (`None` for replayed messages, which did not just arrive).
    pub fn message_delivered(&self, to: Transport, latency: Option<std::time::Duration>) {
        self.counter(&self.delivered, MESSAGES_DELIVERED, to)
            .increment(1);
        if let Some(latency) = latency {
            self.latency[to as usize]
                .get_or_init(|| {
                    histogram!(DELIVERY_LATENCY, "channel" => self.channel.clone(), "transport" => to.as_str())
                })
                .record(latency.as_secs_f64());
        }
    }

    pub fn message_logged(&self, bytes: usize) {
        self.log_appends.increment(1);
        self.log_bytes.increment(bytes as u64);
    }
}

/// Why a message was refused. A closed list: it is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    InvalidPayload,
    InvalidAddress,
    TooLarge,
    UnsupportedContentType,
    NotWritable,
    UpstreamUnavailable,
    StoreFailed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidPayload => "invalid_payload",
            RejectReason::InvalidAddress => "invalid_address",
            RejectReason::TooLarge => "too_large",
            RejectReason::UnsupportedContentType => "unsupported_content_type",
            RejectReason::NotWritable => "not_writable",
            RejectReason::UpstreamUnavailable => "upstream_unavailable",
            RejectReason::StoreFailed => "store_failed",
        }
    }
}

/// A message was refused (to a client as an error, or into the dead-letter log).
pub struct MessageRejected<'a> {
    pub channel: &'a str,
    pub transport: Transport,
    pub reason: RejectReason,
    pub detail: &'a str,
}

impl MessageRejected<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            channel = self.channel,
            transport = self.transport.as_str(),
            reason = self.reason.as_str(),
            detail = self.detail,
            "message rejected"
        );
        counter!(MESSAGES_REJECTED, "channel" => self.channel.to_owned(), "transport" => self.transport.as_str(), "reason" => self.reason.as_str()).increment(1);
    }
}

/// A message that failed validation was written to the channel's dead-letter log.
pub struct DeadLettered<'a> {
    pub channel: &'a str,
    pub reason: DeadLetterReason,
    pub detail: &'a str,
    pub address: &'a str,
}

/// Why a message went to a dead-letter log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It failed the route's checks on the way in (schema, size, address parameters).
    Rejected(RejectReason),
    /// A bridge lane gave up on delivering it to its target.
    BridgeUndeliverable,
    /// A call trigger's reply could not be published.
    ReplyUndeliverable,
}

impl DeadLetterReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected(r) => r.as_str(),
            DeadLetterReason::BridgeUndeliverable => "bridge_undeliverable",
            DeadLetterReason::ReplyUndeliverable => "reply_undeliverable",
        }
    }
}

impl DeadLettered<'_> {
    pub fn emit(&self) {
        match self.reason {
            // A bad message is news for whoever sent it: one line each.
            DeadLetterReason::Rejected(_) => tracing::warn!(
                channel = self.channel,
                reason = self.reason.as_str(),
                detail = self.detail,
                address = self.address,
                "message dead-lettered"
            ),
            // An undeliverable target is one state change, which the lane or trigger logs;
            // the messages it holds back are counted, not logged one by one.
            _ => tracing::debug!(
                channel = self.channel,
                reason = self.reason.as_str(),
                detail = self.detail,
                address = self.address,
                "message dead-lettered"
            ),
        }
        counter!(DEAD_LETTERS, "channel" => self.channel.to_owned(), "reason" => self.reason.as_str()).increment(1);
        counter!(LOG_APPENDS, "channel" => self.channel.to_owned(), "log" => "dead_letters")
            .increment(1);
    }
}

/// A broker delivered a message whose address matches no route (a filter wider than its
/// template).
pub struct MessageUnmatched<'a> {
    pub server: &'a str,
    pub address: &'a str,
}

impl MessageUnmatched<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            server = self.server,
            address = self.address,
            "message matched no route"
        );
        counter!(MESSAGES_UNMATCHED, "server" => self.server.to_owned()).increment(1);
    }
}

/// A starting Kafka consumer has passed the records it read again that the log already held
/// (the offsets not yet committed when the gateway last stopped).
pub struct KafkaRecordsAlreadyLogged<'a> {
    pub server: &'a str,
    pub group: &'a str,
    pub records: u64,
}

impl KafkaRecordsAlreadyLogged<'_> {
    pub fn emit(&self) {
        tracing::info!(
            server = self.server,
            group = self.group,
            records = self.records,
            "Kafka records read again were in the log already; not logged twice"
        );
        counter!(super::KAFKA_RECORDS_ALREADY_LOGGED, "server" => self.server.to_owned())
            .increment(self.records);
    }
}

/// An upstream connection came up or went down.
pub struct UpstreamConnectionChanged<'a> {
    pub server: &'a str,
    pub protocol: &'static str,
    pub connected: bool,
    pub error: Option<&'a str>,
}

impl UpstreamConnectionChanged<'_> {
    pub fn emit(&self) {
        if self.connected {
            tracing::info!(
                server = self.server,
                protocol = self.protocol,
                "upstream connected"
            );
        } else {
            tracing::warn!(
                server = self.server,
                protocol = self.protocol,
                error = self.error.unwrap_or(""),
                "upstream disconnected"
            );
            counter!(UPSTREAM_DISCONNECTS, "server" => self.server.to_owned(), "protocol" => self.protocol).increment(1);
        }
        gauge!(UPSTREAM_CONNECTED, "server" => self.server.to_owned(), "protocol" => self.protocol)
            .set(if self.connected { 1.0 } else { 0.0 });
    }
}

/// A connected upstream's intake stopped making progress.
pub struct UpstreamStalled<'a> {
    pub server: &'a str,
    pub protocol: &'static str,
    pub reason: crate::upstream::StallReason,
    pub outstanding: u64,
    pub stall_after: std::time::Duration,
}

impl UpstreamStalled<'_> {
    pub fn emit(&self) {
        tracing::error!(
            server = self.server,
            protocol = self.protocol,
            reason = self.reason.as_str(),
            outstanding = self.outstanding,
            stall_after = ?self.stall_after,
            "upstream intake stalled: connected, but no message is moving into the log"
        );
        counter!(UPSTREAM_STALLS, "server" => self.server.to_owned(), "protocol" => self.protocol, "reason" => self.reason.as_str()).increment(1);
        gauge!(UPSTREAM_STALLED, "server" => self.server.to_owned(), "protocol" => self.protocol)
            .set(1.0);
    }
}

/// A stalled upstream's intake moves again (or its connection went away).
pub struct UpstreamRecovered<'a> {
    pub server: &'a str,
    pub protocol: &'static str,
    pub stalled_for: std::time::Duration,
}

impl UpstreamRecovered<'_> {
    pub fn emit(&self) {
        tracing::info!(
            server = self.server,
            protocol = self.protocol,
            stalled_for = ?self.stalled_for,
            "upstream intake moving again"
        );
        gauge!(UPSTREAM_STALLED, "server" => self.server.to_owned(), "protocol" => self.protocol)
            .set(0.0);
    }
}

/// A live subscriber fell behind and is being resumed from the log.
pub struct SubscriberLagged<'a> {
    pub channel: &'a str,
    pub transport: Transport,
    pub skipped: u64,
}

impl SubscriberLagged<'_> {
    pub fn emit(&self) {
        tracing::info!(
            channel = self.channel,
            transport = self.transport.as_str(),
            skipped = self.skipped,
            "subscriber lagged; resuming from the log"
        );
        counter!(SUBSCRIBERS_LAGGED, "channel" => self.channel.to_owned(), "transport" => self.transport.as_str()).increment(1);
    }
}

/// Live subscriber count changes; the guard decrements on drop.
pub struct SubscriberGauge {
    gauge: metrics::Gauge,
}

impl SubscriberGauge {
    pub fn attach(channel: &str, transport: Transport) -> Self {
        let gauge =
            gauge!(SUBSCRIBERS, "channel" => channel.to_owned(), "transport" => transport.as_str());
        gauge.increment(1.0);
        Self { gauge }
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// A bounded queue was full and a message was dropped (only where the protocol cannot push back,
/// e.g. MQTT QoS 0).
pub struct QueueOverflowed<'a> {
    pub channel: &'a str,
    pub queue: &'static str,
}

impl QueueOverflowed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            channel = self.channel,
            queue = self.queue,
            "queue full; message dropped"
        );
        counter!(QUEUE_OVERFLOWS, "channel" => self.channel.to_owned(), "queue" => self.queue)
            .increment(1);
    }
}

/// A publish to an upstream failed. Every one is counted; the first of a run (for its route,
/// server and reason) is a warning, the rest of the run debug lines.
pub struct PublishFailed<'a> {
    pub channel: &'a str,
    pub server: &'a str,
    pub reason: &'static str,
    pub detail: &'a str,
    pub first: bool,
}

impl PublishFailed<'_> {
    pub fn emit(&self) {
        if self.first {
            tracing::warn!(
                channel = self.channel,
                server = self.server,
                reason = self.reason,
                detail = self.detail,
                "publish failed; further failures of this kind are counted until one goes through"
            );
        } else {
            tracing::debug!(
                channel = self.channel,
                server = self.server,
                reason = self.reason,
                detail = self.detail,
                "publish failed"
            );
        }
        counter!(PUBLISH_FAILURES, "channel" => self.channel.to_owned(), "server" => self.server.to_owned(), "reason" => self.reason).increment(1);
    }
}

/// Publishes on a route go through again after a run of failures.
pub struct PublishesRecovered<'a> {
    pub channel: &'a str,
    pub server: &'a str,
    pub reason: &'static str,
    pub failures: u64,
}

impl PublishesRecovered<'_> {
    pub fn emit(&self) {
        tracing::info!(
            channel = self.channel,
            server = self.server,
            reason = self.reason,
            failures = self.failures,
            "publishing works again"
        );
    }
}
