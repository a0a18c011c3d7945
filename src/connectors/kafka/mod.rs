//! Kafka connector (rdkafka): one consumer per server and consumer group, one idempotent
//! producer per server.
//!
//! Source: subscribes the readable routes' topics (literal names, or anchored regexes for
//! parameterised addresses). A record is logged (or dead-lettered) by the hub, and only once the
//! log has flushed it is its offset stored; librdkafka commits stored offsets every second, on
//! partition revoke and on close. So the group's committed offset never passes the log: a crash
//! re-reads what was not flushed (at-least-once, duplicates possible).
//!
//! Sink: `acks=all`, `enable.idempotence=true`; a publish completes on the delivery report.
//! Key: the channel's `bindings.kafka.x-stepflow-key` template (`{deviceId}`, parameters only),
//! else the concrete address. Headers: the envelope's headers.
//!
//! Kafka has no connection event: a metadata probe every two seconds (on a blocking thread)
//! drives the connection state behind `/readyz`.

mod binding;

pub use binding::{KafkaBindings, KafkaRoute};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Statistics};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, LiveRoute};
use crate::routing::Upstream;
use crate::routing::address::ProtocolAddress;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::spec::{Protocol, Server};
use crate::store::PendingAppend;
use crate::telemetry::events::MessageUnmatched;
use crate::upstream::ServerOverride;
use crate::upstream::{Connections, IntakeProgress, Outbound, PublishError, Publisher, ServerKey};

/// Why a Kafka server cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("server {server}: {reason}")]
    Config { server: String, reason: String },
}

/// Connection settings of one Kafka server.
#[derive(Clone, PartialEq, Serialize)]
pub struct KafkaServerConfig {
    pub bootstrap_servers: String,
    pub client_id: String,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT`, `SASL_SSL`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` when SASL is used.
    pub sasl_mechanism: Option<String>,
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<String>,
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for KafkaServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaServerConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl KafkaServerConfig {
    /// Bootstrap servers from the override URL (`kafka://h1:9092,h2:9092`) or the document's
    /// host; SASL and TLS from the server's protocol and security schemes.
    pub fn build(
        api: &str,
        server: &Server,
        overrides: &ServerOverride,
        max_message_bytes: usize,
    ) -> Result<KafkaServerConfig, Error> {
        let bootstrap = match &overrides.url {
            Some(url) => url
                .split_once("://")
                .map_or(url.as_str(), |(_, rest)| rest)
                .trim_end_matches('/')
                .to_owned(),
            None => server.host.clone(),
        };
        if bootstrap.is_empty() {
            return Err(Error::Config {
                server: server.id.clone(),
                reason: "no bootstrap servers".into(),
            });
        }
        let tls = server.protocol == Protocol::KafkaSecure
            || overrides
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("kafka-secure://") || u.starts_with("kafkas://"));
        let mechanism = server
            .security
            .iter()
            .find_map(|s| match s.scheme_type.as_str() {
                "plain" | "userPassword" => Some("PLAIN".to_owned()),
                "scramSha256" => Some("SCRAM-SHA-256".to_owned()),
                "scramSha512" => Some("SCRAM-SHA-512".to_owned()),
                _ => None,
            });
        let sasl = mechanism.is_some() || overrides.username.is_some();
        let security_protocol = match (sasl, tls) {
            (true, true) => "SASL_SSL",
            (true, false) => "SASL_PLAINTEXT",
            (false, true) => "SSL",
            (false, false) => "PLAINTEXT",
        };
        Ok(KafkaServerConfig {
            bootstrap_servers: bootstrap,
            client_id: overrides
                .client_id
                .clone()
                .unwrap_or_else(|| format!("stepflow-{api}-{}", server.id)),
            security_protocol: security_protocol.to_owned(),
            sasl_mechanism: sasl.then(|| mechanism.unwrap_or_else(|| "PLAIN".to_owned())),
            username: overrides.username.clone(),
            password: overrides.password.clone(),
            max_message_bytes,
        })
    }

    /// All librdkafka settings in one place; a setting is never given twice.
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set("security.protocol", &self.security_protocol)
            .set(
                "message.max.bytes",
                (self.max_message_bytes + 64 * 1024).to_string(),
            )
            // Notice quickly when a broker goes away or comes back.
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "5000");
        if let Some(mechanism) = &self.sasl_mechanism {
            c.set("sasl.mechanism", mechanism);
            if let Some(user) = &self.username {
                c.set("sasl.username", user);
            }
            if let Some(password) = &self.password {
                c.set("sasl.password", password);
            }
        }
        c
    }
}

/// One Kafka server's connector.
pub struct KafkaConnector {
    key: ServerKey,
    config: KafkaServerConfig,
    optional: bool,
    routes: Vec<Arc<LiveRoute>>,
}

/// How a record's topic finds its route.
#[derive(Clone)]
struct Subscribed {
    route: Arc<LiveRoute>,
    /// The topic form of the address (parameters extracted from the topic), or `None` for a
    /// fixed topic from `bindings.kafka.topic`.
    topic: Option<ProtocolAddress>,
    /// The subscription: a topic name or an anchored regex.
    pattern: String,
}

impl Subscribed {
    fn matches(&self, topic: &str) -> Option<crate::routing::address::Params> {
        match &self.topic {
            Some(address) => address.extract(topic),
            None => (self.pattern == topic).then(Default::default),
        }
    }
}

/// Consumer context that turns librdkafka's statistics into the consumer-lag gauge per channel.
struct LagReporter {
    routes: Vec<Subscribed>,
}

/// librdkafka reports every failed connection attempt as an error; the probe already reports
/// the state change once (`UpstreamConnectionChanged`), so its own lines go to debug.
fn log_librdkafka(level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical => tracing::error!(facility, "librdkafka: {message}"),
        _ => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

/// The producer's context: logging, and the last authentication failure librdkafka reported.
/// A metadata fetch that fails only says "BrokerTransportFailure"; the reason an operator needs
/// (a wrong password, an unknown user) arrives here, on librdkafka's error callback.
#[derive(Clone, Default)]
struct Quiet {
    auth_failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Quiet {
    /// The authentication failure since the last successful fetch, if any.
    fn auth_failure(&self) -> Option<String> {
        self.auth_failure.lock().ok().and_then(|f| f.clone())
    }

    fn clear_auth_failure(&self) {
        if let Ok(mut f) = self.auth_failure.lock() {
            *f = None;
        }
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        if matches!(
            error.rdkafka_error_code(),
            Some(Code::Authentication | Code::SaslAuthenticationFailed)
        ) && let Ok(mut f) = self.auth_failure.lock()
        {
            // librdkafka's text names the mechanism and the broker's reason, never the secret.
            *f = Some(reason.to_owned());
        }
        tracing::debug!(error = %error, "librdkafka: {reason}");
    }
}

impl ClientContext for LagReporter {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(error = %error, "librdkafka: {reason}");
    }

    fn stats(&self, statistics: Statistics) {
        let mut lag: BTreeMap<&str, i64> = BTreeMap::new();
        for (topic, t) in &statistics.topics {
            // -1 means unknown (no committed offset or high watermark yet).
            let topic_lag: i64 = t.partitions.values().map(|p| p.consumer_lag.max(0)).sum();
            for sub in self.routes.iter().filter(|s| s.matches(topic).is_some()) {
                *lag.entry(sub.route.id()).or_default() += topic_lag;
            }
        }
        for (channel, value) in lag {
            metrics::gauge!(crate::telemetry::KAFKA_CONSUMER_LAG, "channel" => channel.to_owned())
                .set(value as f64);
        }
    }
}

impl ConsumerContext for LagReporter {}

type GatewayConsumer = StreamConsumer<LagReporter>;

const INGRESS_CAPACITY: usize = 1024;
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

impl KafkaConnector {
    pub fn build(
        hub: &Hub,
        key: ServerKey,
        config: KafkaServerConfig,
        optional: bool,
    ) -> KafkaConnector {
        let routes =
            hub.routes()
                .filter(|r| {
                    r.route().api == key.api
                        && r.route().upstreams.iter().any(|u| {
                            u.server == key.server && u.binding.get::<KafkaRoute>().is_some()
                        })
                })
                .collect();
        KafkaConnector {
            key,
            config,
            optional,
            routes,
        }
    }

    /// Creates the clients (nothing blocks: librdkafka connects in its own threads), starts the
    /// consumer, ack and probe tasks, and registers the producer with the hub.
    pub fn start(
        self,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), Error> {
        let connections = hub.connections().clone();
        let progress = connections.register_with(
            self.key.clone(),
            "kafka",
            format!("kafka://{}", self.config.bootstrap_servers),
            self.optional,
            crate::upstream::DEFAULT_STALL_AFTER,
        );
        let fail = |e: rdkafka::error::KafkaError| Error::Config {
            server: self.key.to_string(),
            reason: e.to_string(),
        };
        let context = Quiet::default();
        let producer: FutureProducer<Quiet> = self
            .config
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .set("linger.ms", "1")
            .create_with_context(context.clone())
            .map_err(fail)?;
        hub.register_publisher(
            self.key.clone(),
            Arc::new(KafkaPublisher {
                key: self.key.clone(),
                producer: producer.clone(),
                connections: connections.clone(),
            }),
        );
        tracker.spawn(probe(
            self.key.clone(),
            producer,
            context,
            connections.clone(),
            shutdown.clone(),
        ));

        // One consumer per consumer group on this server.
        let mut groups: BTreeMap<String, Vec<Subscribed>> = BTreeMap::new();
        for route in self.routes.iter().filter(|r| r.route().direction.readable) {
            for upstream in &route.route().upstreams {
                if let Some(k) = upstream.binding.get::<KafkaRoute>()
                    && upstream.server == self.key.server
                {
                    groups
                        .entry(k.group_id.clone())
                        .or_default()
                        .push(Subscribed {
                            route: route.clone(),
                            topic: k.topic.clone(),
                            pattern: k.subscription.pattern.clone(),
                        });
                }
            }
        }
        for (group, subscribed) in groups {
            let consumer_config = ConsumerConfig {
                client: self.config.clone(),
                group,
                subscribed,
            };
            // Created here once so that a bad configuration fails the start.
            let consumer = consumer_config.create().map_err(fail)?;
            tracker.spawn(consume_group(
                hub.clone(),
                self.key.clone(),
                consumer_config,
                consumer,
                shutdown.clone(),
                progress.clone(),
            ));
        }
        Ok(())
    }
}

/// What one consumer group's consumer is made of.
struct ConsumerConfig {
    client: KafkaServerConfig,
    group: String,
    subscribed: Vec<Subscribed>,
}

impl ConsumerConfig {
    /// A subscribed consumer; librdkafka connects in its own threads.
    fn create(&self) -> Result<Arc<GatewayConsumer>, rdkafka::error::KafkaError> {
        let context = LagReporter {
            routes: self.subscribed.clone(),
        };
        let consumer: GatewayConsumer = self
            .client
            .client_config()
            .set("group.id", &self.group)
            .set("statistics.interval.ms", "5000")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by the ack task, after the log flushed the record.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            // A fetch returns as soon as one byte is there; this only bounds idle polls
            // (and the wait on brokers that do not honour fetch.min.bytes).
            .set("fetch.wait.max.ms", "100")
            // Regex subscriptions pick up new topics this often.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create_with_context(context)?;
        let mut patterns: Vec<&str> = self.subscribed.iter().map(|s| s.pattern.as_str()).collect();
        patterns.sort_unstable();
        patterns.dedup();
        consumer.subscribe(&patterns)?;
        tracing::info!(group = %self.group, topics = ?patterns, "Kafka consumer subscribed");
        Ok(Arc::new(consumer))
    }
}

/// Runs a consumer group's consumer. When the log fails, the consumer stops storing offsets
/// (a later one would pass the record that was not logged), commits what is stored, and
/// leaves; once the log is back, a new consumer resumes from the committed offsets, so the
/// records the log missed are read again.
async fn consume_group(
    hub: Arc<Hub>,
    key: ServerKey,
    config: ConsumerConfig,
    first: Arc<GatewayConsumer>,
    shutdown: CancellationToken,
    progress: Arc<IntakeProgress>,
) {
    // librdkafka fetches in its own threads and `store_offset` is a local call, so nothing
    // here waits on a queue that only this task drains.
    let mut consumer = Some(first);
    loop {
        let current = match consumer.take() {
            Some(c) => c,
            None => match config.create() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(server = %key, group = %config.group, error = %e, "cannot recreate the Kafka consumer");
                    return;
                }
            },
        };
        let (tx, rx) = mpsc::channel(INGRESS_CAPACITY);
        // Ends this consumer's session: on shutdown, or when a record could not be logged.
        let session = shutdown.child_token();
        let offsets = tokio::spawn(store_offsets(
            current.clone(),
            rx,
            session.clone(),
            progress.clone(),
        ));
        consume(
            hub.clone(),
            key.clone(),
            current.clone(),
            config.subscribed.clone(),
            tx,
            session,
            progress.clone(),
        )
        .await;
        let _ = offsets.await;
        // What this consumer read but did not store is read again by the next one.
        progress.settle_all();
        // Closing a consumer leaves the group and waits for the broker: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(current)).await;
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(server = %key, group = %config.group, "Kafka consumer stopped after a log failure; it restarts from the committed offsets once the log is back");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hub.store().available() => {}
        }
    }
}

/// A failure that repeats: which occurrences to log (the first, then one a minute).
#[derive(Debug, Default)]
struct RepeatedFailure {
    /// When the current run of failures was last logged; `None` while all is well.
    logged_at: Option<std::time::Instant>,
    /// Failures since that line.
    since_logged: u64,
    /// Failures in the current run.
    in_run: u64,
}

/// How often a failure that keeps happening is logged again.
const REMINDER_INTERVAL: Duration = Duration::from_secs(60);

impl RepeatedFailure {
    /// Another failure: `Some(n)` when it is to be logged, `n` being how many went unlogged
    /// since the last line (0 for the first of a run).
    fn failed(&mut self, now: std::time::Instant) -> Option<u64> {
        self.in_run += 1;
        match self.logged_at {
            Some(at) if now.duration_since(at) < REMINDER_INTERVAL => {
                self.since_logged += 1;
                None
            }
            Some(_) => {
                let unlogged = self.since_logged;
                self.logged_at = Some(now);
                self.since_logged = 0;
                Some(unlogged.max(1))
            }
            None => {
                self.logged_at = Some(now);
                Some(0)
            }
        }
    }

    /// A success: `Some(failures)` when it ends a run of failures.
    fn succeeded(&mut self) -> Option<u64> {
        self.logged_at.take()?;
        self.since_logged = 0;
        Some(std::mem::take(&mut self.in_run))
    }
}

/// A record whose appends are on their way to the log.
struct InFlight {
    topic: String,
    partition: i32,
    offset: i64,
    appends: Vec<PendingAppend>,
}

async fn consume(
    hub: Arc<Hub>,
    key: ServerKey,
    consumer: Arc<GatewayConsumer>,
    routes: Vec<Subscribed>,
    acks: mpsc::Sender<InFlight>,
    shutdown: CancellationToken,
    progress: Arc<IntakeProgress>,
) {
    let server: Arc<str> = key.server.clone().into();
    let mut errors = RepeatedFailure::default();
    let error_counter = metrics::counter!(
        crate::telemetry::KAFKA_CONSUMER_ERRORS,
        "server" => key.to_string()
    );
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Cancel-safe: a record is only consumed when returned.
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => {
                if let Some(failed) = errors.succeeded() {
                    tracing::info!(server = %key, errors = failed, "Kafka consumer receiving again");
                }
                m
            }
            Err(e) => {
                // librdkafka reports a broker that is away many times a second: one line when
                // it starts, a reminder a minute, every one counted.
                error_counter.increment(1);
                match errors.failed(std::time::Instant::now()) {
                    Some(0) => tracing::warn!(server = %key, error = %e, "Kafka consumer error"),
                    Some(since) => {
                        tracing::warn!(server = %key, error = %e, repeated = since, "Kafka consumer error, still")
                    }
                    None => {}
                }
                continue;
            }
        };
        progress.received();
        let topic = message.topic().to_owned();
        let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
        let mut headers = Vec::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.push((header.key.to_owned(), value));
            }
        }
        if let Some(k) = message.key() {
            headers.push(("kafka_key".into(), String::from_utf8_lossy(k).into_owned()));
        }
        headers.push(("kafka_partition".into(), message.partition().to_string()));
        headers.push(("kafka_offset".into(), message.offset().to_string()));
        if let Some(ts) = message.timestamp().to_millis() {
            headers.push(("kafka_timestamp".into(), ts.to_string()));
        }
        let mut appends = Vec::new();
        let mut matched = false;
        let mut failed = false;
        for sub in &routes {
            let Some(params) = sub.matches(&topic) else {
                continue;
            };
            matched = true;
            let mut envelope = Envelope::new(
                sub.route.id().clone(),
                topic.clone(),
                params,
                payload.clone(),
                Origin::upstream(Transport::Kafka, server.clone()),
            );
            envelope.headers = headers.clone();
            match hub.ingest(&sub.route, envelope).await {
                Ok(p) => appends.push(p),
                Err(e) => {
                    tracing::error!(channel = %sub.route.id(), error = %e, "cannot log record; its offset is not stored");
                    failed = true;
                }
            }
        }
        if !matched {
            MessageUnmatched {
                server: &server,
                address: &topic,
            }
            .emit();
        }
        if failed {
            // Not storing this offset (or any later one on the partition would pass it):
            // end the session; the next consumer re-reads from the committed offset.
            break;
        }
        let in_flight = InFlight {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            appends,
        };
        if acks.send(in_flight).await.is_err() {
            break;
        }
    }
}

/// Stores each record's offset once its appends are flushed, in arrival order; commits the
/// stored offsets when the consumer stops.
async fn store_offsets(
    consumer: Arc<GatewayConsumer>,
    mut rx: mpsc::Receiver<InFlight>,
    session: CancellationToken,
    progress: Arc<IntakeProgress>,
) {
    while let Some(record) = rx.recv().await {
        let mut safe = true;
        for append in record.appends {
            if let Err(e) = append.flushed().await {
                tracing::error!(topic = %record.topic, error = %e, "log flush failed; offset not stored");
                safe = false;
            }
        }
        if !safe {
            session.cancel();
            break;
        }
        if let Err(e) = consumer.store_offset(&record.topic, record.partition, record.offset) {
            // The partition was revoked meanwhile: its new owner re-reads the record.
            tracing::debug!(topic = %record.topic, partition = record.partition, error = %e, "offset not stored");
        }
        progress.settled(1);
    }
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit");
        }
    })
    .await;
}

/// Marks the server connected while its metadata can be fetched.
async fn probe(
    key: ServerKey,
    producer: FutureProducer<Quiet>,
    context: Quiet,
    connections: Connections,
    shutdown: CancellationToken,
) {
    let mut connected: Option<(bool, Option<String>)> = None;
    loop {
        let p = producer.clone();
        let ok = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(None, Duration::from_millis(1500))
                .map(|m| !m.brokers().is_empty())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let now = ok.is_ok() && ok.as_ref().is_ok_and(|b| *b);
        let error = match (now, context.auth_failure()) {
            (true, _) => {
                context.clear_auth_failure();
                None
            }
            (false, Some(auth)) => Some(format!("authentication failed: {auth}")),
            (false, None) => ok.err(),
        };
        // A state change, or the same state for a new reason (the broker answers, but refuses
        // the credentials): one line each, never one per probe.
        let state = (now, error.clone());
        if connected.as_ref() != Some(&state) {
            connections.report(&key, "kafka", now, error);
            connected = Some(state);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
}

struct KafkaPublisher {
    key: ServerKey,
    producer: FutureProducer<Quiet>,
    connections: Connections,
}

impl Publisher for KafkaPublisher {
    fn is_connected(&self) -> bool {
        self.connections.is_connected(&self.key)
    }

    fn publish(
        &self,
        upstream: &Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let producer = self.producer.clone();
        let server = self.key.server.clone();
        let key =
            message
                .key
                .clone()
                .unwrap_or_else(|| match upstream.binding.get::<KafkaRoute>() {
                    // Compiled and checked against the address's parameters when the route was;
                    // a message filled from that address has them all.
                    Some(k) => k
                        .key_template
                        .as_ref()
                        .and_then(|t| t.render(|name| message.params.get(name)).ok())
                        .unwrap_or_else(|| message.address.clone()),
                    _ => message.address.clone(),
                });
        async move {
            let mut headers = OwnedHeaders::new();
            for (name, value) in &message.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&message.address)
                .payload(&message.payload[..])
                .key(&key)
                .headers(headers);
            match producer.send(record, Duration::from_secs(0)).await {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(PublishError::Refused {
                    server,
                    reason: e.to_string(),
                }),
            }
        }
        .boxed()
    }
}

/// The Kafka protocol: `kafka` and `kafka-secure` servers.
pub struct Kafka;

impl crate::connectors::Connector for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn protocols(&self) -> &'static [Protocol] {
        &[Protocol::Kafka, Protocol::KafkaSecure]
    }

    fn bindings(&self) -> &dyn crate::routing::BindingReader {
        &KafkaBindings
    }

    fn start(&self, cx: crate::connectors::StartContext<'_>) -> Result<bool, String> {
        let kafka = KafkaServerConfig::build(
            &cx.api.id,
            cx.server,
            cx.overrides,
            cx.config.max_payload_bytes,
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(server = %cx.key, bootstrap = %kafka.bootstrap_servers, "starting Kafka connector");
        KafkaConnector::build(cx.hub, cx.key.clone(), kafka, cx.server.optional)
            .start(cx.hub.clone(), cx.shutdown.clone(), cx.tracker)
            .map_err(|e| e.to_string())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(protocol: Protocol, scheme: Option<&str>) -> Server {
        Server {
            location: crate::spec::Location::new("", ""),
            protocol_name: String::new(),
            id: "kafka".into(),
            protocol,
            protocol_version: None,
            host: "k1:9092,k2:9092".into(),
            pathname: None,
            security: scheme
                .map(|t| crate::spec::SecurityScheme {
                    name: "s".into(),
                    scheme_type: t.into(),
                    details: serde_json::Value::Null,
                })
                .into_iter()
                .collect(),
            bindings: Default::default(),
            optional: false,
        }
    }

    #[test]
    fn security_comes_from_the_protocol_and_schemes() {
        let plain = KafkaServerConfig::build(
            "a",
            &server(Protocol::Kafka, None),
            &ServerOverride::default(),
            1,
        )
        .unwrap();
        assert_eq!(plain.security_protocol, "PLAINTEXT");
        assert_eq!(plain.bootstrap_servers, "k1:9092,k2:9092");
        let scram = KafkaServerConfig::build(
            "a",
            &server(Protocol::KafkaSecure, Some("scramSha512")),
            &ServerOverride {
                username: Some("gw".into()),
                password: Some("secret".into()),
                url: Some("kafka-secure://b1:9093".into()),
                ..ServerOverride::default()
            },
            1,
        )
        .unwrap();
        assert_eq!(scram.security_protocol, "SASL_SSL");
        assert_eq!(scram.sasl_mechanism.as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(scram.bootstrap_servers, "b1:9093");
        assert!(!format!("{scram:?}").contains("secret"));
        let ssl = KafkaServerConfig::build(
            "a",
            &server(Protocol::KafkaSecure, None),
            &ServerOverride::default(),
            1,
        )
        .unwrap();
        assert_eq!(ssl.security_protocol, "SSL");
    }

    #[test]
    fn a_repeating_failure_is_logged_once_then_once_a_minute() {
        let start = std::time::Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut f = RepeatedFailure::default();
        assert_eq!(f.failed(at(0)), Some(0), "the first is logged");
        assert_eq!(f.failed(at(1)), None);
        assert_eq!(f.failed(at(59)), None);
        assert_eq!(
            f.failed(at(61)),
            Some(2),
            "a reminder with what went unlogged"
        );
        assert_eq!(f.failed(at(62)), None);
        assert_eq!(f.succeeded(), Some(5), "the run ends, with its count");
        assert_eq!(f.succeeded(), None, "nothing to end");
        assert_eq!(f.failed(at(63)), Some(0), "a new run is logged at once");
    }
}
