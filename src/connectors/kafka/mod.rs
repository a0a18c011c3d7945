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
//!
//! A replaced document is followed in place ([`KafkaFollower`]): each group's route list is
//! swapped, a group whose topics changed re-subscribes on its consumer once everything it read
//! is stored and committed (so the rebalance re-reads nothing), a new group gets a consumer and
//! a group no route uses any more leaves.

mod binding;
mod logged;

pub use binding::{KafkaBindings, KafkaRoute};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Statistics};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, LiveRoute};
use crate::routing::Upstream;
use crate::routing::address::ProtocolAddress;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::spec::{Protocol, Server};
use crate::store::PendingAppend;
use crate::telemetry::events::{KafkaRecordsAlreadyLogged, MessageUnmatched};
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
    groups: BTreeMap<String, Vec<Subscribed>>,
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

/// The routes one consumer group serves: read per record, swapped by [`KafkaFollower`].
#[derive(Clone, Default)]
struct GroupRoutes(Arc<RwLock<Arc<Vec<Subscribed>>>>);

impl GroupRoutes {
    fn new(routes: Vec<Subscribed>) -> GroupRoutes {
        GroupRoutes(Arc::new(RwLock::new(Arc::new(routes))))
    }

    fn get(&self) -> Arc<Vec<Subscribed>> {
        self.0
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set(&self, routes: Vec<Subscribed>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
    }

    /// The topics (names or anchored regexes) to subscribe, sorted, each once.
    fn patterns(&self) -> Vec<String> {
        patterns(&self.get())
    }
}

fn patterns(routes: &[Subscribed]) -> Vec<String> {
    let mut patterns: Vec<String> = routes.iter().map(|s| s.pattern.clone()).collect();
    patterns.sort_unstable();
    patterns.dedup();
    patterns
}

/// The readable routes of server `key`, by the consumer group that reads them.
fn groups_of(hub: &Hub, key: &ServerKey) -> BTreeMap<String, Vec<Subscribed>> {
    let mut groups: BTreeMap<String, Vec<Subscribed>> = BTreeMap::new();
    for route in hub.routes() {
        let definition = route.route();
        if definition.api != key.api || !definition.direction.readable {
            continue;
        }
        for upstream in &definition.upstreams {
            if let Some(k) = upstream.binding.get::<KafkaRoute>()
                && upstream.server == key.server
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
    groups
}

/// Consumer context that turns librdkafka's statistics into the consumer-lag gauge per channel.
struct LagReporter {
    routes: GroupRoutes,
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
        let routes = self.routes.get();
        let mut lag: BTreeMap<&str, i64> = BTreeMap::new();
        for (topic, t) in &statistics.topics {
            // -1 means unknown (no committed offset or high watermark yet).
            let topic_lag: i64 = t.partitions.values().map(|p| p.consumer_lag.max(0)).sum();
            for sub in routes.iter().filter(|s| s.matches(topic).is_some()) {
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
        let groups = groups_of(hub, &key);
        KafkaConnector {
            key,
            config,
            optional,
            groups,
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
        let follower = KafkaFollower {
            hub: Arc::downgrade(&hub),
            key: self.key.clone(),
            client: self.config.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            progress,
            groups: Mutex::new(BTreeMap::new()),
        };
        for (group, subscribed) in self.groups {
            // Created here once so that a bad configuration fails the start.
            let running = follower
                .start_group(&hub, group, subscribed)
                .map_err(fail)?;
            follower
                .groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(running.0, running.1);
        }
        hub.register_follower(self.key.clone(), Arc::new(follower));
        Ok(())
    }
}

/// A running consumer group of a server's connector.
struct RunningGroup {
    routes: GroupRoutes,
    /// The topics the group's consumer is to subscribe; it re-subscribes when they change.
    topics: watch::Sender<Vec<String>>,
    /// Ends the group's consumer (it commits what it stored, then leaves the group).
    stop: CancellationToken,
}

/// Takes up a replaced document's routes on the running consumers: a group's route list is
/// swapped at once; a group whose topics changed re-subscribes on the same consumer after
/// storing and committing everything it read, so the rebalance that follows re-reads
/// nothing; a new group starts a consumer; a group no route reads any more stops.
struct KafkaFollower {
    /// Weak: the hub holds the follower.
    hub: Weak<Hub>,
    key: ServerKey,
    client: KafkaServerConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    progress: Arc<IntakeProgress>,
    groups: Mutex<BTreeMap<String, RunningGroup>>,
}

impl KafkaFollower {
    /// Creates the group's consumer and starts it on the connector's tracker.
    fn start_group(
        &self,
        hub: &Arc<Hub>,
        group: String,
        subscribed: Vec<Subscribed>,
    ) -> Result<(String, RunningGroup), rdkafka::error::KafkaError> {
        let routes = GroupRoutes::new(subscribed);
        let (topics, topics_rx) = watch::channel(routes.patterns());
        let consumer_config = ConsumerConfig {
            client: self.client.clone(),
            group: group.clone(),
            subscribed: routes.clone(),
        };
        let consumer = consumer_config.create()?;
        let stop = self.shutdown.child_token();
        self.tracker.spawn(consume_group(
            hub.clone(),
            self.key.clone(),
            consumer_config,
            consumer,
            topics_rx,
            stop.clone(),
            self.progress.clone(),
        ));
        Ok((
            group,
            RunningGroup {
                routes,
                topics,
                stop,
            },
        ))
    }
}

impl crate::hub::RouteFollower for KafkaFollower {
    fn follow_routes(&self, hub: &Hub) {
        let mut wanted = groups_of(hub, &self.key);
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let (mut resubscribed, mut started, mut stopped) = (0, 0, 0);
        groups.retain(|name, running| {
            let Some(subscribed) = wanted.remove(name) else {
                running.stop.cancel();
                stopped += 1;
                return false;
            };
            // Routes first: records of a new topic find their route once it is subscribed.
            let topics = patterns(&subscribed);
            running.routes.set(subscribed);
            running.topics.send_if_modified(|t| {
                let changed = *t != topics;
                if changed {
                    *t = topics;
                    resubscribed += 1;
                }
                changed
            });
            true
        });
        if let Some(hub) = self.hub.upgrade() {
            for (group, subscribed) in wanted {
                match self.start_group(&hub, group.clone(), subscribed) {
                    Ok((name, running)) => {
                        groups.insert(name, running);
                        started += 1;
                    }
                    Err(e) => {
                        tracing::error!(server = %self.key, group = %group, error = %e, "cannot create the Kafka consumer of a new group")
                    }
                }
            }
        }
        tracing::info!(
            server = %self.key,
            resubscribed,
            started,
            stopped,
            "Kafka connector follows the document's new routes"
        );
    }
}

/// What one consumer group's consumer is made of.
struct ConsumerConfig {
    client: KafkaServerConfig,
    group: String,
    subscribed: GroupRoutes,
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
        let patterns = self.subscribed.patterns();
        let topics: Vec<&str> = patterns.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
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
    mut topics: watch::Receiver<Vec<String>>,
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
        // A consumer created now subscribes the current topics already.
        topics.mark_unchanged();
        let logs = config
            .subscribed
            .get()
            .iter()
            .map(|s| (s.route.log.clone(), s.route.dead_letters.clone()))
            .collect::<Vec<_>>();
        let already_logged = logged::AlreadyLogged::scan(&hub, logs).await;
        consume(
            Intake {
                hub: hub.clone(),
                key: key.clone(),
                group: &config.group,
                consumer: current.clone(),
                routes: config.subscribed.clone(),
                progress: progress.clone(),
                already_logged,
            },
            &mut topics,
            tx,
            session,
        )
        .await;
        let _ = offsets.await;
        // Closing a consumer leaves the group and waits for the broker: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(current)).await;
        if shutdown.is_cancelled() {
            return;
        }
        // What this consumer read but did not store is read again by the next one.
        progress.settle_all();
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

impl InFlight {
    /// A record the log already holds: only its offset is stored.
    fn already_logged(topic: String, partition: i32, offset: i64) -> InFlight {
        InFlight {
            topic,
            partition,
            offset,
            appends: Vec::new(),
        }
    }
}

/// What the consume task hands the offsets task, in order.
enum Ack {
    Record(InFlight),
    /// Answered once every record before it is stored and the stored offsets are committed.
    Commit(oneshot::Sender<()>),
}

/// One consumer's intake: where its records go.
struct Intake<'a> {
    hub: Arc<Hub>,
    key: ServerKey,
    group: &'a str,
    consumer: Arc<GatewayConsumer>,
    routes: GroupRoutes,
    progress: Arc<IntakeProgress>,
    /// Records the log held when this consumer started.
    already_logged: logged::AlreadyLogged,
}

impl Intake<'_> {
    /// Subscribes `wanted` on the running consumer once everything read so far is stored and
    /// committed: the rebalance the new subscription brings resumes every partition where
    /// this consumer was, so an unchanged topic sees no record twice.
    async fn resubscribe(&self, wanted: Vec<String>, acks: &mpsc::Sender<Ack>) -> bool {
        let (done, committed) = oneshot::channel();
        if acks.send(Ack::Commit(done)).await.is_err() || committed.await.is_err() {
            return false;
        }
        let topics: Vec<&str> = wanted.iter().map(String::as_str).collect();
        match self.consumer.subscribe(&topics) {
            Ok(()) => {
                tracing::info!(server = %self.key, group = %self.group, topics = ?topics, "Kafka consumer re-subscribed");
                true
            }
            Err(e) => {
                tracing::error!(server = %self.key, group = %self.group, error = %e, "cannot change the Kafka consumer's subscription");
                false
            }
        }
    }
}

async fn consume(
    mut intake: Intake<'_>,
    topics: &mut watch::Receiver<Vec<String>>,
    acks: mpsc::Sender<Ack>,
    shutdown: CancellationToken,
) {
    let mut already_logged = std::mem::take(&mut intake.already_logged);
    let Intake {
        hub,
        key,
        consumer,
        progress,
        ..
    } = &intake;
    let server: Arc<str> = key.server.clone().into();
    // The last offset handed to the hub per partition, and (after a re-subscription) where
    // each partition was then: the rebalance may hand back records this consumer read but had
    // not yet stored (prefetched before the revocation); those are in the log already.
    let mut delivered: std::collections::HashMap<(String, i32), i64> = Default::default();
    let mut replayed: std::collections::HashMap<(String, i32), i64> = Default::default();
    let mut errors = RepeatedFailure::default();
    let error_counter = metrics::counter!(
        crate::telemetry::KAFKA_CONSUMER_ERRORS,
        "server" => key.to_string()
    );
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = topics.changed() => {
                let wanted = topics.borrow_and_update().clone();
                if changed.is_err() || !intake.resubscribe(wanted, &acks).await {
                    // The follower is gone (the connector stops) or the subscription failed:
                    // a new consumer subscribes afresh.
                    break;
                }
                replayed = delivered.clone();
                continue;
            }
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
        let position = (topic, message.partition());
        if let Some(&seen) = replayed.get(&position) {
            if message.offset() <= seen {
                // Logged before the re-subscription: only its offset is stored again.
                let in_flight =
                    InFlight::already_logged(position.0, message.partition(), message.offset());
                if acks.send(Ack::Record(in_flight)).await.is_err() {
                    break;
                }
                continue;
            }
            replayed.remove(&position);
        }
        delivered.insert(position.clone(), message.offset());
        if !already_logged.is_empty() {
            let routes = intake
                .routes
                .get()
                .iter()
                .filter(|sub| sub.matches(&position.0).is_some())
                .count();
            match already_logged.holds(
                &position.0,
                message.partition(),
                message.offset(),
                message.timestamp().to_millis(),
                routes,
            ) {
                logged::Verdict::Held => {
                    let in_flight =
                        InFlight::already_logged(position.0, message.partition(), message.offset());
                    if acks.send(Ack::Record(in_flight)).await.is_err() {
                        break;
                    }
                    continue;
                }
                logged::Verdict::PastHeld { passed } => KafkaRecordsAlreadyLogged {
                    server: &server,
                    group: intake.group,
                    records: passed,
                }
                .emit(),
                logged::Verdict::New => {}
            }
        }
        let topic = position.0;
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
        for sub in intake.routes.get().iter() {
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
        if acks.send(Ack::Record(in_flight)).await.is_err() {
            break;
        }
    }
}

/// Stores each record's offset once its appends are flushed, in arrival order; commits the
/// stored offsets when the consumer stops.
async fn store_offsets(
    consumer: Arc<GatewayConsumer>,
    mut rx: mpsc::Receiver<Ack>,
    session: CancellationToken,
    progress: Arc<IntakeProgress>,
) {
    while let Some(ack) = rx.recv().await {
        let record = match ack {
            Ack::Record(record) => record,
            Ack::Commit(done) => {
                commit(consumer.clone()).await;
                let _ = done.send(());
                continue;
            }
        };
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
    commit(consumer).await;
}

/// Commits the stored offsets and waits for the broker (on a blocking thread).
async fn commit(consumer: Arc<GatewayConsumer>) {
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            // "No offset stored" when nothing was read since the last commit.
            tracing::debug!(error = %e, "offset commit");
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

    fn follows_routes(&self) -> bool {
        true
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
