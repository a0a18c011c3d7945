//! AMQP 0-9-1 connector (lapin) for RabbitMQ: one connection per server, one consuming channel
//! (prefetch from config) and one publishing channel with publisher confirms.
//!
//! Topology comes from the channel's `amqp` binding and is declared on every (re)connect:
//! `is: routingKey` declares the exchange (name, type, durable, autoDelete; `amq.*` exchanges are
//! RabbitMQ's own and only used) and, for readable routes, a queue (the binding's, or
//! `stepflow.{route}`) bound with the topic pattern; `is: queue` consumes that queue.
//!
//! A replaced document's new routes are taken up on the running connection ([`AmqpFollower`]):
//! new topology declared and consumed, removed routes' consumers cancelled, the others left
//! alone, so RabbitMQ redelivers nothing to them.
//!
//! A delivery is acknowledged only after the log flushed it (or its dead letter); if it cannot be
//! logged it is nacked with requeue. lapin does not recover connections by itself: a supervisor
//! task reconnects with backoff, redeclares the topology and restarts the consumers; RabbitMQ
//! requeues what was delivered and not acknowledged on the lost connection.

mod binding;

pub use binding::{AmqpBindings, AmqpExchange, AmqpPublish, AmqpQueue, AmqpRoute};

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    DefaultConnectionBuilder, ExchangeKind,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, LiveRoute};
use crate::routing::Upstream;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::spec::{Protocol, Server};
use crate::store::{PendingAppend, Store};
use crate::upstream::ServerOverride;
use crate::upstream::{
    Backoff, ConnectionState, Connections, IntakeProgress, Outbound, PublishError, Publisher,
    ServerKey, percent_encode,
};

/// Connection settings of one AMQP server.
#[derive(Clone, PartialEq)]
pub struct AmqpServerConfig {
    /// `amqp://user:password@host:port/vhost` (the password never printed).
    uri: String,
    /// The URI without credentials, for logs and `/api/v1/connections`.
    pub display_url: String,
    pub prefetch: u16,
    /// Extra CA (PEM) trusted for `amqps`, next to the system's roots.
    ca_pem: Option<String>,
}

impl std::fmt::Debug for AmqpServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpServerConfig")
            .field("url", &self.display_url)
            .field("prefetch", &self.prefetch)
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .finish()
    }
}

impl AmqpServerConfig {
    /// Host from the override URL or the document (`host:port`, vhost from `pathname`),
    /// credentials from the config file (RabbitMQ's `guest` when none are given).
    pub fn build(server: &Server, overrides: &ServerOverride, prefetch: u16) -> AmqpServerConfig {
        let (scheme, rest) = match &overrides.url {
            Some(url) => {
                let (s, r) = url.split_once("://").unwrap_or(("amqp", url));
                (s.to_owned(), r.to_owned())
            }
            None => (
                if server.protocol == Protocol::Amqps {
                    "amqps"
                } else {
                    "amqp"
                }
                .to_owned(),
                format!(
                    "{}{}",
                    server.host,
                    server.pathname.as_deref().unwrap_or("")
                ),
            ),
        };
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h.to_owned()),
            None => (None, rest),
        };
        let (host, vhost) = match hostpath.split_once('/') {
            Some((h, v)) if !v.is_empty() => (h.to_owned(), Some(v.to_owned())),
            Some((h, _)) => (h.to_owned(), None),
            None => (hostpath, None),
        };
        let credentials = match (&overrides.username, &overrides.password, userinfo) {
            (Some(u), p, _) => Some(format!(
                "{}:{}",
                percent_encode(u),
                percent_encode(p.as_deref().unwrap_or(""))
            )),
            (None, _, Some(u)) => Some(u),
            (None, _, None) => None,
        };
        // A vhost of "/" is written %2f; an absent vhost means RabbitMQ's default "/".
        let vhost_part = vhost
            .map(|v| format!("/{}", percent_encode(&v)))
            .unwrap_or_default();
        let uri = match &credentials {
            Some(c) => format!("{scheme}://{c}@{host}{vhost_part}"),
            None => format!("{scheme}://{host}{vhost_part}"),
        };
        AmqpServerConfig {
            uri,
            display_url: format!("{scheme}://{host}{vhost_part}"),
            prefetch,
            ca_pem: overrides
                .ca_pem
                .as_ref()
                .map(|pem| String::from_utf8_lossy(pem).into_owned()),
        }
    }
}

/// One AMQP server's connector.
pub struct AmqpConnector {
    key: ServerKey,
    config: AmqpServerConfig,
    optional: bool,
    routes: Vec<(Arc<LiveRoute>, AmqpRoute)>,
}

impl AmqpConnector {
    pub fn build(
        hub: &Hub,
        key: ServerKey,
        config: AmqpServerConfig,
        optional: bool,
    ) -> AmqpConnector {
        let routes = routes_of(hub, &key);
        AmqpConnector {
            key,
            config,
            optional,
            routes,
        }
    }

    pub fn start(self, hub: Arc<Hub>, shutdown: CancellationToken, tracker: &TaskTracker) {
        let connections = hub.connections().clone();
        let progress = connections.register_with(
            self.key.clone(),
            "amqp",
            self.config.display_url.clone(),
            self.optional,
            crate::upstream::DEFAULT_STALL_AFTER,
        );
        let publish_channel: Arc<RwLock<Option<Channel>>> = Arc::default();
        hub.register_publisher(
            self.key.clone(),
            Arc::new(AmqpPublisher {
                key: self.key.clone(),
                channel: publish_channel.clone(),
                connections: connections.clone(),
            }),
        );
        let shared = Arc::new(Shared {
            routes: RwLock::new(self.routes),
            session: std::sync::Mutex::new(None),
        });
        hub.register_follower(
            self.key.clone(),
            Arc::new(AmqpFollower {
                hub: Arc::downgrade(&hub),
                key: self.key.clone(),
                shared: shared.clone(),
                tracker: tracker.clone(),
                progress: progress.clone(),
                changes: Arc::default(),
            }),
        );
        let supervisor = Supervisor {
            hub,
            key: self.key,
            config: self.config,
            shared,
            connections,
            publish_channel,
            tracker: tracker.clone(),
            progress,
        };
        tracker.spawn(supervisor.run(shutdown));
    }
}

/// The routes of `key` with an AMQP upstream on it.
fn routes_of(hub: &Hub, key: &ServerKey) -> Vec<(Arc<LiveRoute>, AmqpRoute)> {
    hub.routes()
        .filter(|r| r.route().api == key.api)
        .filter_map(|r| {
            r.route()
                .upstreams
                .iter()
                .find_map(|u| match u.binding.get::<AmqpRoute>() {
                    Some(a) if u.server == key.server => Some((r.clone(), a.clone())),
                    _ => None,
                })
        })
        .collect()
}

/// What the supervisor and the follower share: the routes the connection serves (declared and
/// consumed at each connect), and the live connection's channels, if there is one.
struct Shared {
    routes: RwLock<Vec<(Arc<LiveRoute>, AmqpRoute)>>,
    session: std::sync::Mutex<Option<Session>>,
}

#[derive(Clone)]
struct Session {
    publish: Channel,
    consume: Channel,
    lost: mpsc::Sender<String>,
}

impl Shared {
    fn routes(&self) -> Vec<(Arc<LiveRoute>, AmqpRoute)> {
        self.routes
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_session(&self, session: Option<Session>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session;
    }
}

/// Takes up a replaced document's routes on the running connection: new routes' topology
/// declared and their queues consumed, removed (or rebound) routes' consumers cancelled.
/// Unchanged routes keep their consumers, so RabbitMQ redelivers nothing to them.
struct AmqpFollower {
    /// Weak: the hub holds the follower.
    hub: std::sync::Weak<Hub>,
    key: ServerKey,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    progress: Arc<IntakeProgress>,
    /// One change at a time, in order.
    changes: Arc<tokio::sync::Mutex<()>>,
}

/// Whether two bindings of one route differ (what its consumer was made from).
fn same_binding(a: &AmqpRoute, b: &AmqpRoute) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

impl crate::hub::RouteFollower for AmqpFollower {
    fn follow_routes(&self, hub: &Hub) {
        let new = routes_of(hub, &self.key);
        let old = std::mem::replace(
            &mut *self
                .shared
                .routes
                .write()
                .unwrap_or_else(|p| p.into_inner()),
            new.clone(),
        );
        let kept = |r: &(Arc<LiveRoute>, AmqpRoute), other: &[(Arc<LiveRoute>, AmqpRoute)]| {
            other.iter().any(|(o, a)| {
                o.id() == r.0.id()
                    && same_binding(a, &r.1)
                    && o.route().direction == r.0.route().direction
            })
        };
        let added: Vec<_> = new.iter().filter(|r| !kept(r, &old)).cloned().collect();
        let removed: Vec<_> = old.iter().filter(|r| !kept(r, &new)).cloned().collect();
        let session = self
            .shared
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(session), Some(hub)) = (session, self.hub.upgrade()) else {
            // Not connected: the next connection declares and consumes the new set.
            return;
        };
        tracing::info!(
            server = %self.key,
            added = added.len(),
            removed = removed.len(),
            "AMQP connector follows the document's new routes"
        );
        let (key, tracker, progress, changes) = (
            self.key.clone(),
            self.tracker.clone(),
            self.progress.clone(),
            self.changes.clone(),
        );
        self.tracker.spawn(async move {
            let _one_at_a_time = changes.lock().await;
            for (route, _) in &removed {
                if route.route().direction.readable {
                    let tag = consumer_tag(route);
                    if let Err(e) = session
                        .consume
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await
                    {
                        tracing::warn!(server = %key, channel = %route.id(), error = %e, "cannot cancel a removed route's consumer");
                    }
                }
            }
            for (route, amqp) in added {
                match start_consumer(&session, &route, &amqp).await {
                    Ok(Some(consumer)) => spawn_intake(
                        &tracker,
                        &hub,
                        &key,
                        &progress,
                        &session.lost,
                        route,
                        amqp,
                        consumer,
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        // The connection starts over and declares everything (and reports).
                        let _ = session.lost.try_send(e);
                        return;
                    }
                }
            }
        });
    }
}

fn consumer_tag(route: &LiveRoute) -> String {
    format!("stepflow-{}", route.id())
}

/// Declares a route's topology and, for a readable one with a queue, consumes it.
async fn start_consumer(
    session: &Session,
    route: &LiveRoute,
    amqp: &AmqpRoute,
) -> Result<Option<lapin::Consumer>, String> {
    declare(&session.publish, amqp, route.route().direction.readable)
        .await
        .map_err(|e| format!("declaring the topology of {}: {e}", route.id()))?;
    if !route.route().direction.readable {
        return Ok(None);
    }
    let Some(queue) = &amqp.queue else {
        return Ok(None);
    };
    session
        .consume
        .basic_consume(
            queue.name.as_str().into(),
            consumer_tag(route).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Starts the tasks that log a consumer's deliveries and acknowledge them once flushed.
#[allow(clippy::too_many_arguments)]
fn spawn_intake(
    tracker: &TaskTracker,
    hub: &Arc<Hub>,
    key: &ServerKey,
    progress: &Arc<IntakeProgress>,
    lost: &mpsc::Sender<String>,
    route: Arc<LiveRoute>,
    amqp: AmqpRoute,
    consumer: lapin::Consumer,
) {
    let (acks_tx, acks_rx) = mpsc::channel(1024);
    tracker.spawn(consume_route(
        RouteIntake {
            hub: hub.clone(),
            server: key.server.clone().into(),
            route,
            amqp,
            acks: acks_tx,
            lost: lost.clone(),
            progress: progress.clone(),
        },
        consumer,
    ));
    tracker.spawn(acknowledge(acks_rx, hub.store().clone(), progress.clone()));
}

struct Supervisor {
    hub: Arc<Hub>,
    key: ServerKey,
    config: AmqpServerConfig,
    shared: Arc<Shared>,
    connections: Connections,
    publish_channel: Arc<RwLock<Option<Channel>>>,
    tracker: TaskTracker,
    progress: Arc<IntakeProgress>,
}

impl Supervisor {
    fn changed(&self, connected: bool, error: Option<String>) {
        self.connections.report(&self.key, "amqp", connected, error);
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut was_connected = true;
        loop {
            let session = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = self.connect() => s,
            };
            match session {
                Ok((connection, lost)) => {
                    backoff.reset();
                    was_connected = true;
                    self.changed(true, None);
                    // Until the connection fails or we stop.
                    let reason = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        reason = lost => Some(reason),
                    };
                    if let Ok(mut slot) = self.publish_channel.write() {
                        *slot = None;
                    }
                    self.shared.set_session(None);
                    match reason {
                        None => {
                            // Consumers stop on the token and acknowledge what is logged; give
                            // them the drain window before closing the connection.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let _ = connection.close(200, "stepflow shutting down".into()).await;
                            self.connections
                                .set(&self.key, ConnectionState::Disconnected, None);
                            return;
                        }
                        Some(reason) => self.changed(false, Some(reason)),
                    }
                }
                Err(e) => {
                    if was_connected {
                        self.changed(false, Some(e));
                        was_connected = false;
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Connects, declares the topology, starts the consumers and the confirm channel. The
    /// returned future completes (with a reason) when the connection is lost.
    async fn connect(&self) -> Result<(Connection, BoxFuture<'static, String>), String> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.config.ca_pem.clone(),
        };
        let connection = DefaultConnectionBuilder::new()
            .map_err(|e| e.to_string())?
            .with_uri_str(self.config.uri.clone())
            .with_properties(ConnectionProperties::default())
            .with_tls_config(tls)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let (lost_tx, mut lost_rx) = mpsc::channel::<String>(4);
        {
            let lost_tx = lost_tx.clone();
            let mut events = Box::pin(connection.events_listener());
            // Not tracked: it ends with the connection, and must not hold back shutdown.
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    if let lapin::Event::Error(e) = event {
                        let _ = lost_tx.try_send(e.to_string());
                        break;
                    }
                }
            });
        }
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let consume = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        consume
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let session = Session {
            publish: publish.clone(),
            consume,
            lost: lost_tx.clone(),
        };
        let mut consumers = Vec::new();
        for (route, amqp) in self.shared.routes() {
            if let Some(consumer) = start_consumer(&session, &route, &amqp).await? {
                consumers.push((route, amqp, consumer));
            }
        }
        if let Ok(mut slot) = self.publish_channel.write() {
            *slot = Some(publish);
        }
        for (route, amqp, consumer) in consumers {
            spawn_intake(
                &self.tracker,
                &self.hub,
                &self.key,
                &self.progress,
                &lost_tx,
                route,
                amqp,
                consumer,
            );
        }
        self.shared.set_session(Some(session));
        let lost = async move {
            lost_rx
                .recv()
                .await
                .unwrap_or_else(|| "connection closed".into())
        }
        .boxed();
        Ok((connection, lost))
    }
}

/// Declares what a route needs: its exchange (unless it is RabbitMQ's own `amq.*`), and for a
/// readable route its queue and binding.
async fn declare(channel: &Channel, amqp: &AmqpRoute, readable: bool) -> lapin::Result<()> {
    if let Some(x) = &amqp.exchange
        && !x.name.starts_with("amq.")
        && !x.name.is_empty()
    {
        let kind = match x.kind.as_str() {
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            _ => ExchangeKind::Direct,
        };
        channel
            .exchange_declare(
                x.name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: x.durable,
                    auto_delete: x.auto_delete,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    if !readable {
        return Ok(());
    }
    if let Some(q) = &amqp.queue {
        channel
            .queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions {
                    durable: q.durable,
                    exclusive: q.exclusive,
                    auto_delete: q.auto_delete,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        if let (Some(x), Some(key)) = (&amqp.exchange, &amqp.binding_key) {
            channel
                .queue_bind(
                    q.name.as_str().into(),
                    x.name.as_str().into(),
                    key.pattern.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        } else if let Some(x) = amqp
            .exchange
            .as_ref()
            .filter(|x| x.kind == "fanout" || x.kind == "headers")
        {
            channel
                .queue_bind(
                    q.name.as_str().into(),
                    x.name.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

struct Delivered {
    acker: lapin::Acker,
    appends: Vec<PendingAppend>,
}

/// What one route's consumer task needs.
struct RouteIntake {
    hub: Arc<Hub>,
    server: Arc<str>,
    route: Arc<LiveRoute>,
    amqp: AmqpRoute,
    acks: mpsc::Sender<Delivered>,
    lost: mpsc::Sender<String>,
    progress: Arc<IntakeProgress>,
}

async fn consume_route(intake: RouteIntake, mut consumer: lapin::Consumer) {
    let RouteIntake {
        hub,
        server,
        route,
        amqp,
        acks,
        lost,
        progress,
    } = intake;
    // lapin's own I/O task reads the socket and carries acks, so waiting on the ack queue here
    // closes no cycle; `basic.qos` bounds what the broker sends unacknowledged.
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                let _ = lost.try_send(e.to_string());
                break;
            }
        };
        progress.received();
        let routing_key = delivery.routing_key.as_str().to_owned();
        let params = amqp
            .routing_key
            .as_ref()
            .and_then(|k| k.extract(&routing_key))
            .unwrap_or_default();
        let p = &delivery.properties;
        let mut headers: Vec<(String, String)> = p
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), value_text(v)))
                    .collect()
            })
            .unwrap_or_default();
        headers.push(("amqp_routing_key".into(), routing_key.clone()));
        headers.push((
            "amqp_exchange".into(),
            delivery.exchange.as_str().to_owned(),
        ));
        headers.push(("amqp_redelivered".into(), delivery.redelivered.to_string()));
        for (name, value) in [
            ("amqp_content_type", p.content_type()),
            ("amqp_correlation_id", p.correlation_id()),
            ("amqp_reply_to", p.reply_to()),
            ("amqp_message_id", p.message_id()),
        ] {
            if let Some(v) = value {
                headers.push((name.into(), v.as_str().to_owned()));
            }
        }
        if let Some(mode) = p.delivery_mode() {
            headers.push(("amqp_delivery_mode".into(), mode.to_string()));
        }
        if let Some(priority) = p.priority() {
            headers.push(("amqp_priority".into(), priority.to_string()));
        }
        let mut envelope = Envelope::new(
            route.id().clone(),
            routing_key,
            params,
            Bytes::from(delivery.data),
            Origin::upstream(Transport::Amqp, server.clone()),
        );
        envelope.headers = headers;
        let appends = match hub.ingest(&route, envelope).await {
            Ok(p) => vec![p],
            Err(e) => {
                tracing::error!(channel = %route.id(), error = %e, "cannot log delivery; requeueing it");
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
                progress.settled(1);
                continue;
            }
        };
        if acks
            .send(Delivered {
                acker: delivery.acker,
                appends,
            })
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Acks each delivery once logged; nacks with requeue what could not be flushed, once the log
/// is back: RabbitMQ hands a requeued delivery straight back, and nacking at once would spin on
/// it while the log is down.
async fn acknowledge(
    mut rx: mpsc::Receiver<Delivered>,
    store: Store,
    progress: Arc<IntakeProgress>,
) {
    while let Some(d) = rx.recv().await {
        let mut logged = true;
        for append in d.appends {
            logged &= append.flushed().await.is_ok();
        }
        let result = if logged {
            d.acker.ack(BasicAckOptions::default()).await
        } else {
            store.available().await;
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        };
        // Acked, requeued, or requeued by the broker because the channel is gone: settled.
        progress.settled(1);
        if result.is_err() {
            // The channel is gone: RabbitMQ requeues this delivery for the next consumer.
            continue;
        }
    }
}

struct AmqpPublisher {
    key: ServerKey,
    channel: Arc<RwLock<Option<Channel>>>,
    connections: Connections,
}

impl Publisher for AmqpPublisher {
    fn is_connected(&self) -> bool {
        self.connections.is_connected(&self.key)
    }

    fn publish(
        &self,
        upstream: &Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let server = self.key.server.clone();
        let channel = self.channel.read().ok().and_then(|c| c.clone());
        let amqp = upstream.binding.get::<AmqpRoute>().cloned();
        async move {
            let (Some(channel), Some(amqp)) = (channel, amqp) else {
                return Err(PublishError::NotConnected { server });
            };
            // `is: queue` routes publish to the queue through the default exchange.
            let (exchange, routing_key) = match (&amqp.exchange, &amqp.queue) {
                (Some(x), _) => (x.name.clone(), message.address.clone()),
                (None, Some(q)) => (String::new(), q.name.clone()),
                (None, None) => (String::new(), message.address.clone()),
            };
            let mut headers = FieldTable::default();
            for (name, value) in &message.headers {
                headers.insert(name.as_str().into(), AMQPValue::LongString(LongString::from(value.as_bytes())));
            }
            let list = |names: &[String]| {
                AMQPValue::FieldArray(
                    names
                        .iter()
                        .map(|n| AMQPValue::LongString(LongString::from(n.as_bytes())))
                        .collect::<Vec<_>>()
                        .into(),
                )
            };
            if !amqp.publish.cc.is_empty() {
                headers.insert("CC".into(), list(&amqp.publish.cc));
            }
            if !amqp.publish.bcc.is_empty() {
                headers.insert("BCC".into(), list(&amqp.publish.bcc));
            }
            let mut properties = BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(amqp.publish.delivery_mode.unwrap_or(2))
                .with_content_type(ShortString::from("application/json"));
            if let Some(priority) = amqp.publish.priority {
                properties = properties.with_priority(priority);
            }
            if let Some(expiration) = amqp.publish.expiration {
                properties = properties.with_expiration(expiration.to_string().into());
            }
            // Request-reply and message ids: these headers are AMQP properties (they also stay in
            // the table).
            for (name, value) in &message.headers {
                match name.as_str() {
                    "correlation_id" | "correlationId" => {
                        properties = properties.with_correlation_id(value.as_str().into());
                    }
                    "reply_to" | "replyTo" => {
                        properties = properties.with_reply_to(value.as_str().into());
                    }
                    // A bridged message's id is also the AMQP `message-id` property, where
                    // consumers (and RabbitMQ's deduplication plugins) look for one.
                    crate::bridge::MESSAGE_ID_HEADER => {
                        properties = properties.with_message_id(value.as_str().into());
                    }
                    _ => {}
                }
            }
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: amqp.publish.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &message.payload,
                    properties,
                )
                .await
                .map_err(|e| PublishError::NotConnected {
                    server: format!("{server}: {e}"),
                })?;
            match confirm.await {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
                Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Refused {
                    server,
                    reason: format!("unroutable: no queue is bound for routing key '{routing_key}' (returned, mandatory)"),
                }),
                Ok(Confirmation::Nack(_)) => Err(PublishError::Refused {
                    server,
                    reason: "the broker nacked the message".into(),
                }),
                Err(e) => Err(PublishError::NotConnected {
                    server: format!("{server}: {e}"),
                }),
            }
        }
        .boxed()
    }
}

/// AMQP 0-9-1: `amqp` and `amqps` servers.
pub struct Amqp;

impl crate::connectors::Connector for Amqp {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn protocols(&self) -> &'static [Protocol] {
        &[Protocol::Amqp, Protocol::Amqps]
    }

    fn bindings(&self) -> &dyn crate::routing::BindingReader {
        &AmqpBindings
    }

    fn follows_routes(&self) -> bool {
        true
    }

    fn start(&self, cx: crate::connectors::StartContext<'_>) -> Result<bool, String> {
        // Deliveries are acked after the log flush: the window must cover a flush's worth of
        // messages (1000 measured p50 5 ms at 5k msg/s; 100 gave 24 ms).
        let prefetch = cx.overrides.prefetch.unwrap_or(1000);
        let amqp = AmqpServerConfig::build(cx.server, cx.overrides, prefetch);
        tracing::info!(server = %cx.key, url = %amqp.display_url, "starting AMQP connector");
        AmqpConnector::build(cx.hub, cx.key.clone(), amqp, cx.server.optional).start(
            cx.hub.clone(),
            cx.shutdown.clone(),
            cx.tracker,
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(host: &str, pathname: Option<&str>) -> Server {
        Server {
            location: crate::spec::Location::new("", ""),
            protocol_name: String::new(),
            id: "rabbit".into(),
            protocol: Protocol::Amqp,
            protocol_version: None,
            host: host.into(),
            pathname: pathname.map(str::to_owned),
            security: Vec::new(),
            bindings: Default::default(),
            optional: false,
        }
    }

    #[test]
    fn uri_from_document_and_overrides() {
        let c = AmqpServerConfig::build(
            &server("127.0.0.1:5672", None),
            &ServerOverride::default(),
            50,
        );
        assert_eq!(c.uri, "amqp://127.0.0.1:5672");
        let c = AmqpServerConfig::build(
            &server("rabbit:5672", Some("/production")),
            &ServerOverride {
                username: Some("gw".into()),
                password: Some("p@ss/word".into()),
                ..ServerOverride::default()
            },
            50,
        );
        assert_eq!(c.uri, "amqp://gw:p%40ss%2Fword@rabbit:5672/production");
        assert_eq!(c.display_url, "amqp://rabbit:5672/production");
        assert!(!format!("{c:?}").contains("ss"), "no password in Debug");
        let c = AmqpServerConfig::build(
            &server("x", None),
            &ServerOverride {
                url: Some("amqps://u:p@broker:5671/vh".into()),
                ..ServerOverride::default()
            },
            50,
        );
        assert_eq!(c.uri, "amqps://u:p@broker:5671/vh");
    }
}
