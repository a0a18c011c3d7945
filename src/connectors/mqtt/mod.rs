//! MQTT 3.1.1 connector (rumqttc): one connection per server of a document.
//!
//! Source: subscribes every readable route's filter; each message is matched against the route
//! templates, logged (or dead-lettered) by the hub, and acknowledged (PUBACK, manual acks) only
//! once the log has flushed it. With a persistent session (`cleanSession: false`, the default)
//! the broker keeps what arrives while the gateway is away and redelivers what it never acked.
//!
//! A replaced document's new routes are taken up on the running connection ([`MqttFollower`]):
//! new filters subscribed, unwanted ones unsubscribed, the session and its in-flight messages
//! left alone, so no route sees a redelivery.
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
use std::sync::{Arc, Mutex, RwLock};
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
mod config;
mod event_loop;
mod ingest;
mod publisher;

pub use binding::{MqttBindings, MqttRoute};
pub use config::{Error, MqttServerConfig};
use event_loop::*;
use ingest::*;
use publisher::*;

use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::spec::{Protocol, Server};
use crate::store::PendingAppend;
use crate::telemetry::events::{MessageUnmatched, QueueOverflowed};
use crate::upstream::{
    Backoff, ConnectionState, Connections, IntakeProgress, Outbound, PublishError, Publisher,
    ServerKey, ServerOverride,
};

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
    routes: Served,
}

/// The readable routes of `key` with an MQTT upstream on it, each with its subscription.
fn readable_routes(hub: &Hub, key: &ServerKey) -> Served {
    hub.routes()
        .filter(|r| r.route().api == key.api && r.route().direction.readable)
        .filter_map(|r| {
            r.route()
                .upstreams
                .iter()
                .find_map(|u| match u.binding.get::<MqttRoute>() {
                    Some(m) if u.server == key.server => Some((
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
        .collect()
}

/// Readable routes with the subscription each comes from.
type Served = Vec<(Arc<LiveRoute>, Subscription)>;

/// The routes a connection serves and the filters it subscribes, changed in place when its
/// document is replaced ([`MqttFollower`]); read by ingest per message and by the event loop
/// at each CONNACK.
#[derive(Default)]
struct Following {
    routes: RwLock<Arc<Served>>,
    filters: Mutex<Vec<(String, QoS)>>,
}

impl Following {
    fn new(routes: Served) -> Following {
        Following {
            filters: Mutex::new(subscriptions(&routes)),
            routes: RwLock::new(Arc::new(routes)),
        }
    }

    fn routes(&self) -> Arc<Served> {
        self.routes
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn filters(&self) -> Vec<(String, QoS)> {
        self.filters
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Takes up a replaced document's routes on the running connection: new filters are
/// subscribed (after their routes are in place, so nothing they bring is unmatched), filters
/// no route wants any more are unsubscribed. The session and its in-flight messages stay.
struct MqttFollower {
    key: ServerKey,
    client: AsyncClient,
    following: Arc<Following>,
}

impl crate::hub::RouteFollower for MqttFollower {
    fn follow_routes(&self, hub: &Hub) {
        let routes = readable_routes(hub, &self.key);
        let wanted = subscriptions(&routes);
        *self
            .following
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        let had = std::mem::replace(
            &mut *self
                .following
                .filters
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            wanted.clone(),
        );
        let subscribe: Vec<_> = wanted
            .iter()
            .filter(|w| !had.contains(w))
            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q))
            .collect();
        let unsubscribe: Vec<&String> = had
            .iter()
            .filter(|(f, _)| !wanted.iter().any(|(w, _)| w == f))
            .map(|(f, _)| f)
            .collect();
        // Queued for the event loop; when disconnected, the next CONNACK subscribes what the
        // filters are by then anyway.
        if !subscribe.is_empty()
            && let Err(e) = self.client.try_subscribe_many(subscribe.clone())
        {
            tracing::warn!(server = %self.key, error = %e, "cannot queue new subscriptions; they are made at the next connection");
        }
        for filter in &unsubscribe {
            if let Err(e) = self.client.try_unsubscribe(filter.as_str()) {
                tracing::warn!(server = %self.key, filter = %filter, error = %e, "cannot queue an unsubscription");
            }
        }
        tracing::info!(
            server = %self.key,
            subscribed = subscribe.len(),
            unsubscribed = unsubscribe.len(),
            "MQTT connector follows the document's new routes"
        );
    }
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
        let routes = readable_routes(hub, &key);
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
        let following = Arc::new(Following::new(self.routes));
        hub.register_follower(
            self.key.clone(),
            Arc::new(MqttFollower {
                key: self.key.clone(),
                client: client.clone(),
                following: following.clone(),
            }),
        );

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
            following: following.clone(),
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
            following,
            clean_session: self.config.clean_session,
            progress,
            client_id: self.config.client_id.clone(),
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

    fn follows_routes(&self) -> bool {
        true
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
