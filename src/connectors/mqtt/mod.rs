//! MQTT 3.1.1 connector (rumqttc): one connection per server of a document.
//!
//! Source: subscribes every readable route's filter; each message is matched against the route
//! templates, logged (or dead-lettered) by the hub, and acknowledged (PUBACK, manual acks) only
//! once the log has flushed it. With a persistent session (`cleanSession: false`, the default)
//! the broker keeps what arrives while the gateway is away and redelivers what it never acked.
//!
//! Sink: publishes writable routes' messages and completes each publish on its PUBACK, which
//! rumqttc does not report per message: the event loop pairs `Outgoing::Publish(pkid)` events
//! with publish requests in the order they were queued (see [`PendingPublishes`]).
//!
//! **The invariant: the event-loop task awaits nothing but rumqttc's poll.** rumqttc's request
//! queue (publishes, subscriptions and our PUBACKs) is drained only by that poll, so any wait of
//! the event-loop task on something downstream — the ingest queue, which waits on the log,
//! whose acknowledgements wait on the request queue — closes a cycle that deadlocks intake as
//! soon as a backlog fills the queues (a broker redelivering thousands of messages after a
//! restart does). The code keeps it so:
//! - incoming publishes go to the ingest queue with `try_send`; what does not fit waits in the
//!   task's own [`Held`] list, moved on by a `reserve()` branch of the same `select!`;
//! - acknowledgements come back to this task over a channel and enter rumqttc with `try_ack`;
//!   what does not fit waits in a local list and is retried after the next poll;
//! - the held list has a cap. With a persistent session the task sheds the connection past it
//!   (the broker keeps the messages and redelivers them once the log has caught up); with a
//!   clean session there is nothing to come back to, so it keeps them and counts the overflow.
//!
//! Acknowledgements carry the connection generation they were received on: after a reconnect,
//! packet ids start over, and an old PUBACK could acknowledge a different, unlogged message.
//! Stale ones are dropped (the broker redelivers those messages; duplicates, never loss).
//! The task reports its progress ([`IntakeProgress`]) so a stall is visible in `/readyz`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    Transport as MqttTransport,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, LiveRoute};
mod binding;

pub use binding::{MqttBindings, MqttRoute};

use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::spec::{Protocol, Server};
use crate::store::PendingAppend;
use crate::telemetry::events::{MessageUnmatched, QueueOverflowed};
use crate::upstream::{
    Backoff, ConnectionState, Connections, IntakeProgress, Outbound, PublishError, Publisher,
    ServerKey, ServerOverride,
};

/// Why an MQTT server cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("server {server}: invalid address '{address}': {reason}")]
    InvalidAddress {
        server: String,
        address: String,
        reason: String,
    },
}

/// Connection settings of one MQTT server, from the document and the daemon's configuration.
#[derive(Clone, PartialEq, Serialize)]
pub struct MqttServerConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<String>,
    pub max_packet_size: usize,
    /// Unacknowledged outgoing publishes at most.
    pub inflight: u16,
    /// Extra CA (PEM) for TLS.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for MqttServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttServerConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .finish()
    }
}

impl MqttServerConfig {
    /// Settings for `server` of document `api`: host from the override URL or the document,
    /// client id, session and keep-alive from the server's `mqtt` binding.
    pub fn build(
        api: &str,
        server: &Server,
        overrides: &ServerOverride,
        max_packet_size: usize,
    ) -> Result<MqttServerConfig, Error> {
        let binding = server.bindings.get("mqtt");
        let mut tls = server.protocol == Protocol::SecureMqtt;
        let mut address = server.host.clone();
        let mut username = None;
        let mut password = None;
        if let Some(url) = &overrides.url {
            let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url.as_str()));
            tls = matches!(scheme, "mqtts" | "ssl" | "secure-mqtt");
            let rest = rest.trim_end_matches('/');
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, rest),
            };
            if let Some(userinfo) = userinfo {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                username = Some(u.to_owned());
                password = (!p.is_empty()).then(|| p.to_owned());
            }
            address = host.to_owned();
        }
        let invalid = |reason: String| Error::InvalidAddress {
            server: server.id.clone(),
            address: address.clone(),
            reason,
        };
        let (host, port) = match address.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse::<u16>()
                    .map_err(|_| invalid(format!("port '{p}' is not a number")))?,
            ),
            None => (address.clone(), if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(invalid("no host".into()));
        }
        let client_id = overrides
            .client_id
            .clone()
            .or_else(|| {
                binding
                    .and_then(|b| b.get("clientId"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("stepflow-{api}-{}", server.id));
        Ok(MqttServerConfig {
            host,
            port,
            tls,
            client_id,
            clean_session: binding
                .and_then(|b| b.get("cleanSession"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            keep_alive: Duration::from_secs(
                binding
                    .and_then(|b| b.get("keepAlive"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(30)
                    .max(5),
            ),
            username: overrides.username.clone().or(username),
            password: overrides.password.clone().or(password),
            max_packet_size,
            inflight: 100,
            ca_pem: overrides.ca_pem.clone(),
        })
    }

    fn to_mqtt_options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_manual_acks(true)
            .set_inflight(self.inflight)
            // Room for the topic and headers on top of the largest payload.
            .set_max_packet_size(
                self.max_packet_size + 64 * 1024,
                self.max_packet_size + 64 * 1024,
            );
        if let Some(user) = &self.username {
            options.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if self.tls {
            let tls = match &self.ca_pem {
                Some(ca) => rumqttc::TlsConfiguration::SimpleNative {
                    ca: ca.clone(),
                    client_auth: None,
                },
                None => rumqttc::TlsConfiguration::Native,
            };
            options.set_transport(MqttTransport::tls_with_config(tls));
        }
        options
    }
}

/// Capacity of the client's request queue (publishes, acks, subscriptions).
const REQUEST_CAPACITY: usize = 1024;
/// Messages between the event loop and the ingest task, and between ingest and the ack task:
/// enough for a few group commits at full speed.
const INGRESS_CAPACITY: usize = 1024;
/// Acknowledgements on their way back to the event loop.
const ACK_CAPACITY: usize = 1024;
/// Messages the event loop holds beyond the ingest queue before it sheds the connection. A
/// broker sends at most its in-flight window of unacknowledged messages (Mosquitto's
/// `max_inflight_messages`, 20 by default; some set it to thousands or to unlimited), so this is
/// reached only when a broker's window is larger than what the log can absorb at once.
const HOLD_LIMIT: usize = 16 * 1024;
/// How often a shed connection checks whether ingest has caught up.
const SHED_RECHECK: Duration = Duration::from_millis(50);

/// One MQTT server's connector.
pub struct MqttConnector {
    key: ServerKey,
    url: String,
    optional: bool,
    config: MqttServerConfig,
    routes: Vec<Arc<LiveRoute>>,
}

impl MqttConnector {
    /// Collects the routes of `key` that have an MQTT upstream on it. Nothing connects here.
    pub fn build(
        hub: &Hub,
        key: ServerKey,
        url: String,
        config: MqttServerConfig,
        optional: bool,
    ) -> MqttConnector {
        let routes =
            hub.routes()
                .filter(|r| {
                    r.route.api == key.api
                        && r.route.upstreams.iter().any(|u| {
                            u.server == key.server && u.binding.get::<MqttRoute>().is_some()
                        })
                })
                .cloned()
                .collect();
        MqttConnector {
            key,
            url,
            optional,
            config,
            routes,
        }
    }

    /// Starts the event loop, ingest and ack tasks; registers the publisher with the hub.
    pub fn start(self, hub: Arc<Hub>, shutdown: CancellationToken, tracker: &TaskTracker) {
        let (client, eventloop) = AsyncClient::new(self.config.to_mqtt_options(), REQUEST_CAPACITY);
        let connections = hub.connections().clone();
        // Past the keep-alive without progress the broker is about to give up on the session
        // too; that is when an operator must hear of it.
        let progress = connections.register_with(
            self.key.clone(),
            "mqtt",
            self.url.clone(),
            self.optional,
            self.config.keep_alive,
        );
        let pending = Arc::new(Mutex::new(PendingPublishes::default()));
        let publisher = Arc::new(MqttPublisher {
            key: self.key.clone(),
            client: client.clone(),
            pending: pending.clone(),
            connections: connections.clone(),
        });
        hub.register_publisher(self.key.clone(), publisher);

        let readable: Vec<(Arc<LiveRoute>, Subscription)> = self
            .routes
            .iter()
            .filter(|r| r.route.direction.readable)
            .filter_map(|r| {
                r.route
                    .upstreams
                    .iter()
                    .find_map(|u| match u.binding.get::<MqttRoute>() {
                        Some(m) if u.server == self.key.server => Some((
                            r.clone(),
                            Subscription {
                                filter: m.filter.pattern.clone(),
                                qos: qos(m.subscribe_qos),
                                topic: m.topic.clone(),
                            },
                        )),
                        _ => None,
                    })
            })
            .collect();
        let (ingress_tx, ingress_rx) = mpsc::channel(INGRESS_CAPACITY);
        let (flush_tx, flush_rx) = mpsc::channel(INGRESS_CAPACITY);
        let (ack_tx, ack_rx) = mpsc::channel(ACK_CAPACITY);
        let server: Arc<str> = self.key.server.clone().into();
        let redelivery = Redelivery {
            store: hub.store().clone(),
            reconnect: Arc::default(),
            armed: Arc::default(),
        };
        let ingest = Ingest {
            hub: hub.clone(),
            server: server.clone(),
            routes: readable.clone(),
            progress: progress.clone(),
            redelivery: redelivery.clone(),
        };
        tracker.spawn(ingest.run(ingress_rx, flush_tx));
        tracker.spawn(await_flushes(
            flush_rx,
            ack_tx,
            progress.clone(),
            redelivery.clone(),
        ));
        let event_loop = EventLoopTask {
            key: self.key,
            client,
            connections,
            pending,
            reconnect: redelivery.reconnect,
            filters: subscriptions(&readable),
            clean_session: self.config.clean_session,
            progress,
        };
        tracker.spawn(event_loop.run(eventloop, ingress_tx, ack_rx, shutdown));
    }
}

/// A message as received on connection number `generation` (counted from 1 at each CONNACK).
struct Received {
    generation: u64,
    publish: Publish,
}

#[derive(Clone)]
struct Subscription {
    filter: String,
    qos: QoS,
    topic: crate::routing::address::ProtocolAddress,
}

/// One subscription per distinct filter, at the highest QoS any route asks for it.
fn subscriptions(routes: &[(Arc<LiveRoute>, Subscription)]) -> Vec<(String, QoS)> {
    let mut by_filter: Vec<(String, QoS)> = Vec::new();
    for (_, s) in routes {
        match by_filter.iter_mut().find(|(f, _)| *f == s.filter) {
            Some((_, q)) => {
                if (*q as u8) < (s.qos as u8) {
                    *q = s.qos;
                }
            }
            None => by_filter.push((s.filter.clone(), s.qos)),
        }
    }
    by_filter
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Publishes waiting for their PUBACK. Requests enter the client's queue in the order their
/// waiters enter `unassigned`, and the event loop reports `Outgoing::Publish(pkid)` in that
/// order, so the front waiter gets the next new packet id.
#[derive(Default)]
struct PendingPublishes {
    unassigned: VecDeque<oneshot::Sender<Result<(), PublishError>>>,
    by_pkid: HashMap<u16, oneshot::Sender<Result<(), PublishError>>>,
}

impl PendingPublishes {
    /// The event loop sent a publish with `pkid` (0 for QoS 0).
    fn sent(&mut self, pkid: u16) {
        if pkid != 0 && self.by_pkid.contains_key(&pkid) {
            return; // A retransmission after a reconnect.
        }
        let Some(waiter) = self.unassigned.pop_front() else {
            return;
        };
        if pkid == 0 {
            let _ = waiter.send(Ok(()));
        } else {
            self.by_pkid.insert(pkid, waiter);
        }
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(waiter) = self.by_pkid.remove(&pkid) {
            let _ = waiter.send(Ok(()));
        }
    }

    /// The broker started a new session: whatever was not acknowledged is gone.
    fn fail_all(&mut self, server: &str) {
        for waiter in self
            .unassigned
            .drain(..)
            .chain(self.by_pkid.drain().map(|(_, w)| w))
        {
            let _ = waiter.send(Err(PublishError::NotConnected {
                server: server.to_owned(),
            }));
        }
    }
}

/// The sending side registered with the hub.
struct MqttPublisher {
    key: ServerKey,
    client: AsyncClient,
    pending: Arc<Mutex<PendingPublishes>>,
    connections: Connections,
}

impl Publisher for MqttPublisher {
    fn is_connected(&self) -> bool {
        self.connections.is_connected(&self.key)
    }

    fn publish(
        &self,
        upstream: &crate::routing::Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let (qos_level, retain) = match upstream.binding.get::<MqttRoute>() {
            Some(m) => (qos(m.publish_qos), m.retain),
            _ => (QoS::AtLeastOnce, false),
        };
        let (tx, rx) = oneshot::channel();
        let server = self.key.server.clone();
        let queued = {
            // Held only for these two non-blocking calls, never across an await.
            let mut pending = match self.pending.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            pending.unassigned.push_back(tx);
            let result = self.client.try_publish(
                message.address,
                qos_level,
                retain,
                message.payload.to_vec(),
            );
            if result.is_err() {
                pending.unassigned.pop_back();
            }
            result
        };
        async move {
            if queued.is_err() {
                return Err(PublishError::Overloaded { server });
            }
            rx.await
                .unwrap_or(Err(PublishError::NotConnected { server }))
        }
        .boxed()
    }
}

struct EventLoopTask {
    key: ServerKey,
    client: AsyncClient,
    connections: Connections,
    pending: Arc<Mutex<PendingPublishes>>,
    /// Signalled when messages the log could not take must be redelivered.
    reconnect: Arc<Notify>,
    filters: Vec<(String, QoS)>,
    /// With a clean session a dropped connection loses the broker's queue, so shedding is no
    /// way to slow the broker down.
    clean_session: bool,
    progress: Arc<IntakeProgress>,
}

/// How long a stopping connector keeps polling so that acknowledgements for logged messages
/// still reach the broker.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The event loop's own queues; everything in here is moved on without waiting.
#[derive(Default)]
struct Backlog {
    /// Received messages the ingest queue had no room for, oldest first.
    held: VecDeque<Received>,
    /// PUBACKs rumqttc's request queue had no room for, in the order they must go out.
    acks: VecDeque<Publish>,
    /// Generation of the current connection (0: none yet).
    generation: u64,
    connected: bool,
}

/// What to do with an acknowledgement that came back from the log.
#[derive(Debug, PartialEq, Eq)]
enum AckFate {
    Send,
    /// Received on an earlier connection: its packet id may name another message by now. The
    /// broker redelivers the message (logged twice, never lost).
    Stale,
}

impl Backlog {
    fn ack_fate(&self, generation: u64) -> AckFate {
        if self.connected && generation == self.generation {
            AckFate::Send
        } else {
            AckFate::Stale
        }
    }

    /// The connection is gone: its unsent acknowledgements mean nothing on the next one.
    /// Returns how many were dropped.
    fn disconnected(&mut self) -> u64 {
        self.connected = false;
        let dropped = self.acks.len() as u64;
        self.acks.clear();
        dropped
    }
}

impl EventLoopTask {
    fn pending(&self) -> std::sync::MutexGuard<'_, PendingPublishes> {
        match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn changed(&self, connected: bool, error: Option<String>) {
        self.connections.report(&self.key, "mqtt", connected, error);
    }

    /// Hands PUBACKs to rumqttc while its request queue has room; never waits.
    fn send_acks(&self, backlog: &mut Backlog) {
        while let Some(publish) = backlog.acks.front() {
            if self.client.try_ack(publish).is_err() {
                return; // Full: the next poll drains it.
            }
            backlog.acks.pop_front();
            self.progress.settled(1);
        }
    }

    /// Moves held messages into the ingest queue while it has room; never waits.
    fn forward_held(backlog: &mut Backlog, ingress: &mpsc::Sender<Received>) {
        while let Some(received) = backlog.held.pop_front() {
            match ingress.try_send(received) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(received)) => {
                    backlog.held.push_front(received);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    async fn run(
        self,
        mut eventloop: EventLoop,
        ingress: mpsc::Sender<Received>,
        mut acks: mpsc::Receiver<Received>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut backlog = Backlog::default();
        let mut ingress = Some(ingress);
        // Set while a shed connection waits for ingest to catch up before it reconnects.
        let mut shed = false;
        let mut acks_open = true;
        let mut drain_deadline = None;
        loop {
            // Acknowledgements first: each one frees a slot of the broker's window.
            self.send_acks(&mut backlog);
            if let Some(tx) = &ingress {
                Self::forward_held(&mut backlog, tx);
            }
            // Stopping, and every logged message's PUBACK is with rumqttc: leave cleanly.
            if drain_deadline.is_some() && !acks_open && backlog.acks.is_empty() {
                self.disconnect(&mut eventloop).await;
                return;
            }
            let room = ingress.clone();
            self.progress.loop_waiting();
            let event = tokio::select! {
                biased;
                // Stop taking new messages; keep polling so pending acks go out. Held messages
                // are not acknowledged: the broker redelivers them after the restart.
                _ = shutdown.cancelled(), if ingress.is_some() => {
                    self.progress.loop_working();
                    ingress = None;
                    self.progress.settled(backlog.held.len() as u64);
                    backlog.held.clear();
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    continue;
                }
                // Draining took too long: leave; the broker redelivers what was not acked.
                _ = sleep_until_deadline(drain_deadline) => {
                    self.progress.loop_working();
                    self.disconnect(&mut eventloop).await;
                    return;
                }
                // The broker resends unacknowledged messages when the session resumes.
                _ = self.reconnect.notified(), if backlog.connected && ingress.is_some() => {
                    self.progress.loop_working();
                    tracing::warn!(server = %self.key, "reconnecting so that the broker redelivers the messages the log could not take");
                    eventloop.clean();
                    self.progress.settled(backlog.disconnected());
                    self.changed(false, Some("reconnecting for redelivery after a log failure".into()));
                    continue;
                }
                // Cancel-safe: a reserve() cancelled by another branch takes nothing.
                permit = reserve(room.as_ref()), if !backlog.held.is_empty() => {
                    self.progress.loop_working();
                    if let (Some(permit), Some(received)) = (permit, backlog.held.pop_front()) {
                        permit.send(received);
                    }
                    continue;
                }
                // An acknowledgement back from the log. Taken only when the last ones went out,
                // so the local list stays within one request queue's worth. Cancel-safe.
                ack = acks.recv(), if acks_open && backlog.acks.is_empty() => {
                    self.progress.loop_working();
                    let mut next = ack;
                    // Take every acknowledgement already waiting, not one per loop turn: at
                    // thousands a second a turn each would cost the poll its time.
                    loop {
                        match next {
                            Some(received) => match backlog.ack_fate(received.generation) {
                                AckFate::Send => backlog.acks.push_back(received.publish),
                                AckFate::Stale => self.progress.settled(1),
                            },
                            None => {
                                acks_open = false;
                                break;
                            }
                        }
                        if backlog.acks.len() >= ACK_CAPACITY {
                            break;
                        }
                        next = match acks.try_recv() {
                            Ok(received) => Some(received),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                        };
                    }
                    continue;
                }
                // Shed: reconnect once ingest has room again (the broker holds the rest).
                _ = tokio::time::sleep(SHED_RECHECK), if shed => {
                    self.progress.loop_working();
                    if ingress.as_ref().is_none_or(|tx| tx.capacity() == tx.max_capacity()) {
                        tracing::info!(server = %self.key, "ingest caught up; reconnecting for the rest of the backlog");
                        shed = false;
                    }
                    continue;
                }
                // Cancel-safe per rumqttc: a cancelled poll loses no state.
                event = eventloop.poll(), if !shed => event,
            };
            self.progress.loop_working();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backlog.connected = true;
                    backlog.generation += 1;
                    backoff.reset();
                    if !ack.session_present {
                        self.pending().fail_all(&self.key.server);
                    }
                    if !self.filters.is_empty() {
                        let filters = self
                            .filters
                            .iter()
                            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q));
                        if let Err(e) = self.client.try_subscribe_many(filters) {
                            tracing::error!(server = %self.key, error = %e, "cannot queue subscriptions");
                        }
                    }
                    self.changed(true, None);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(tx) = &ingress else {
                        continue; // Stopping: not acked, so the broker redelivers it later.
                    };
                    let at_most_once = publish.qos == QoS::AtMostOnce;
                    let received = Received {
                        generation: backlog.generation,
                        publish,
                    };
                    if at_most_once {
                        // Nothing to acknowledge, nothing to redeliver: a full queue drops it.
                        if tx.try_send(received).is_err() {
                            QueueOverflowed {
                                channel: &self.key.to_string(),
                                queue: "mqtt_ingress_qos0",
                            }
                            .emit();
                        }
                        continue;
                    }
                    self.progress.received();
                    if backlog.held.is_empty() {
                        match tx.try_send(received) {
                            Ok(()) => continue,
                            Err(mpsc::error::TrySendError::Full(r)) => backlog.held.push_back(r),
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    } else {
                        backlog.held.push_back(received);
                    }
                    if backlog.held.len() > HOLD_LIMIT {
                        self.overflowed(&mut eventloop, &mut backlog, &mut shed);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.pending().acked(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(comp))) => self.pending().acked(comp.pkid),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.pending().sent(pkid),
                Ok(_) => {}
                Err(error) => {
                    if backlog.connected || drain_deadline.is_none() {
                        self.changed(false, Some(describe(&error)));
                    }
                    self.progress.settled(backlog.disconnected());
                    if drain_deadline.is_some() {
                        return;
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// More messages are held than [`HOLD_LIMIT`]: the broker's window is wider than the log
    /// can take at once.
    fn overflowed(&self, eventloop: &mut EventLoop, backlog: &mut Backlog, shed: &mut bool) {
        let server = self.key.to_string();
        if self.clean_session {
            // A clean session has no redelivery to fall back on: keep the oldest, count the
            // newest as lost.
            while backlog.held.len() > HOLD_LIMIT {
                backlog.held.pop_back();
                self.progress.settled(1);
                QueueOverflowed {
                    channel: &server,
                    queue: "mqtt_ingress_clean_session",
                }
                .emit();
            }
            return;
        }
        tracing::warn!(
            server = %self.key,
            held = backlog.held.len(),
            "the log is behind the broker's backlog: disconnecting until it catches up; the broker keeps the messages and redelivers them"
        );
        QueueOverflowed {
            channel: &server,
            queue: "mqtt_ingress_shed",
        }
        .emit();
        self.progress.settled(backlog.held.len() as u64);
        backlog.held.clear();
        eventloop.clean();
        self.progress.settled(backlog.disconnected());
        self.changed(
            false,
            Some("paused: the log is behind the broker's backlog".into()),
        );
        *shed = true;
    }

    async fn disconnect(&self, eventloop: &mut EventLoop) {
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        self.connections
            .set(&self.key, ConnectionState::Disconnected, None);
    }
}

/// Waits for room in the ingest queue (never, without a queue).
async fn reserve(tx: Option<&mpsc::Sender<Received>>) -> Option<mpsc::Permit<'_, Received>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::Io(e) => format!("I/O: {}", e.kind()),
        other => other.to_string(),
    }
}

struct Ingest {
    hub: Arc<Hub>,
    server: Arc<str>,
    routes: Vec<(Arc<LiveRoute>, Subscription)>,
    progress: Arc<IntakeProgress>,
    redelivery: Redelivery,
}

impl Ingest {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Received>,
        flushes: mpsc::Sender<(Received, Vec<PendingAppend>)>,
    ) {
        while let Some(received) = rx.recv().await {
            let publish = &received.publish;
            let mut appends = Vec::new();
            let mut matched = false;
            let mut logged = true;
            for (route, sub) in &self.routes {
                let Some(params) = sub.topic.extract(&publish.topic) else {
                    continue;
                };
                matched = true;
                let envelope = Envelope::new(
                    route.id().clone(),
                    publish.topic.clone(),
                    params,
                    publish.payload.clone(),
                    Origin::upstream(Transport::Mqtt, self.server.clone()),
                );
                match self.hub.ingest(route, envelope).await {
                    Ok(pending) => appends.push(pending),
                    Err(e) => {
                        tracing::error!(channel = %route.id(), error = %e, "cannot log message; it stays unacknowledged");
                        logged = false;
                        break;
                    }
                }
            }
            if !logged {
                // Not acknowledged: the broker redelivers it after the reconnect.
                if publish.qos != QoS::AtMostOnce {
                    self.progress.settled(1);
                }
                self.redelivery.request();
                continue;
            }
            if !matched {
                MessageUnmatched {
                    server: &self.server,
                    address: &publish.topic,
                }
                .emit();
            }
            if flushes.send((received, appends)).await.is_err() {
                return;
            }
        }
    }
}

/// Gets messages the log could not take delivered again. MQTT brokers resend unacknowledged
/// messages only when the session resumes, so once the log is back the event loop reconnects
/// (the session is kept: `cleanSession` is false unless the document says otherwise).
#[derive(Clone)]
struct Redelivery {
    store: crate::store::Store,
    reconnect: Arc<Notify>,
    /// A reconnect is already waiting for the log.
    armed: Arc<AtomicBool>,
}

impl Redelivery {
    fn request(&self) {
        if self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        // Not tracked: it only waits, and a stopping daemon does not need it.
        tokio::spawn(async move {
            this.store.available().await;
            this.armed.store(false, Ordering::Release);
            this.reconnect.notify_one();
        });
    }
}

/// Waits for each message's appends to be flushed, in arrival order, and hands its PUBACK back
/// to the event loop. May wait on the event loop's ack channel: the event loop drains it
/// without waiting on anything but its poll, so this closes no cycle.
async fn await_flushes(
    mut rx: mpsc::Receiver<(Received, Vec<PendingAppend>)>,
    acks: mpsc::Sender<Received>,
    progress: Arc<IntakeProgress>,
    redelivery: Redelivery,
) {
    while let Some((received, appends)) = rx.recv().await {
        let mut safe = true;
        for append in appends {
            if let Err(e) = append.flushed().await {
                tracing::error!(topic = %received.publish.topic, error = %e, "log flush failed; message not acknowledged");
                safe = false;
            }
        }
        if received.publish.qos == QoS::AtMostOnce {
            continue;
        }
        if !safe {
            progress.settled(1);
            redelivery.request();
            continue;
        }
        if acks.send(received).await.is_err() {
            break;
        }
    }
    // Dropping `acks` tells the event loop that every logged message's PUBACK is with it.
}

/// The MQTT protocol (3.1.1): `mqtt`, `secure-mqtt`/`mqtts` servers.
pub struct Mqtt;

impl crate::connectors::Connector for Mqtt {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn protocols(&self) -> &'static [Protocol] {
        &[Protocol::Mqtt, Protocol::SecureMqtt]
    }

    fn bindings(&self) -> &dyn crate::routing::BindingReader {
        &MqttBindings
    }

    fn start(&self, cx: crate::connectors::StartContext<'_>) -> Result<bool, String> {
        let mqtt = MqttServerConfig::build(
            &cx.api.id,
            cx.server,
            cx.overrides,
            cx.config.max_payload_bytes,
        )
        .map_err(|e| e.to_string())?;
        let url = format!(
            "{}://{}:{}",
            if mqtt.tls { "mqtts" } else { "mqtt" },
            mqtt.host,
            mqtt.port
        );
        tracing::info!(server = %cx.key, url = %url, client_id = %mqtt.client_id, "starting MQTT connector");
        MqttConnector::build(cx.hub, cx.key, url, mqtt, cx.server.optional).start(
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

    fn server(host: &str, binding: serde_json::Value) -> Server {
        let mut bindings = serde_json::Map::new();
        if !binding.is_null() {
            bindings.insert("mqtt".into(), binding);
        }
        Server {
            location: crate::spec::Location::new("", ""),
            protocol_name: String::new(),
            id: "broker".into(),
            protocol: Protocol::Mqtt,
            protocol_version: None,
            host: host.into(),
            pathname: None,
            security: Vec::new(),
            bindings,
            optional: false,
        }
    }

    #[test]
    fn config_comes_from_document_and_overrides() {
        let c = MqttServerConfig::build(
            "iot",
            &server("127.0.0.1:1883", serde_json::Value::Null),
            &ServerOverride::default(),
            1024,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("127.0.0.1", 1883, false));
        assert_eq!(c.client_id, "stepflow-iot-broker");
        assert!(!c.clean_session);

        let c = MqttServerConfig::build(
            "iot",
            &server(
                "broker.example:1883",
                serde_json::json!({"clientId": "gw-1", "cleanSession": true, "keepAlive": 10}),
            ),
            &ServerOverride {
                url: Some("mqtts://user:secret@10.0.0.5:8884".into()),
                ..ServerOverride::default()
            },
            1024,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("10.0.0.5", 8884, true));
        assert_eq!(c.client_id, "gw-1");
        assert!(c.clean_session);
        assert_eq!(c.username.as_deref(), Some("user"));
        assert!(
            !format!("{c:?}").contains("secret"),
            "password hidden from Debug"
        );

        assert!(
            MqttServerConfig::build(
                "iot",
                &server("host:port", serde_json::Value::Null),
                &ServerOverride::default(),
                1
            )
            .is_err()
        );
    }

    #[test]
    fn publishes_pair_with_packet_ids_in_order() {
        let mut p = PendingPublishes::default();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let (c, mut rc) = oneshot::channel();
        p.unassigned.extend([a, b, c]);
        p.sent(1);
        p.sent(0); // b was QoS 0: done when sent
        p.sent(2);
        assert!(matches!(rb.try_recv(), Ok(Ok(()))));
        p.sent(1); // retransmission of 1: no new waiter taken
        p.acked(2);
        assert!(matches!(rc.try_recv(), Ok(Ok(()))));
        assert!(ra.try_recv().is_err());
        p.acked(1);
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
    }

    #[test]
    fn a_new_session_fails_what_was_pending() {
        let mut p = PendingPublishes::default();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        p.unassigned.extend([a, b]);
        p.sent(7);
        p.fail_all("broker");
        assert!(matches!(
            ra.try_recv(),
            Ok(Err(PublishError::NotConnected { .. }))
        ));
        assert!(matches!(
            rb.try_recv(),
            Ok(Err(PublishError::NotConnected { .. }))
        ));
    }
}
