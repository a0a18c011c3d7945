//! The running routing table: per-route live fan-out, ingest from upstreams into the log, publish
//! from clients to upstreams, and subscriptions that resume from the log without gaps.
//!
//! Knows routes, the store and the [`Publisher`] interface; never a protocol client or axum.
//! Publishing is in [`publish`](PublishRequest), reading back in [`Subscription`].

mod publish;
mod subscription;

pub use publish::{PublishFailure, PublishRequest, Published};
pub use subscription::{Subscription, SubscriptionEvent};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::routing::envelope::{Delivered, Envelope};
use crate::routing::{ChannelId, Route, RoutingTable};
use crate::store::{self, LogId, PendingAppend, Store};
use crate::telemetry::events::{DeadLetterReason, DeadLettered, RejectReason, RouteMetrics};
use crate::upstream::{Connections, Publisher, ServerKey};

/// Hub tuning.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Largest payload accepted from clients (and logged from upstreams).
    pub max_payload_bytes: usize,
    /// Messages a live subscriber may fall behind before it is resumed from the log.
    pub live_capacity: usize,
    /// Messages read from the log per replay step.
    pub replay_batch: usize,
    /// How long a publish waits for the upstream's acknowledgement.
    pub publish_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            live_capacity: 1024,
            replay_batch: 256,
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// One route at run time.
pub struct LiveRoute {
    pub route: Arc<Route>,
    live: broadcast::Sender<Arc<Delivered>>,
    pub metrics: RouteMetrics,
    pub log: LogId,
    pub dead_letters: LogId,
}

impl LiveRoute {
    pub fn id(&self) -> &ChannelId {
        &self.route.id
    }

    pub fn live_subscribers(&self) -> usize {
        self.live.receiver_count()
    }
}

/// The running routes.
pub struct Hub {
    table: Arc<RoutingTable>,
    routes: HashMap<ChannelId, Arc<LiveRoute>>,
    store: Store,
    publishers: RwLock<HashMap<ServerKey, Arc<dyn Publisher>>>,
    connections: Connections,
    config: HubConfig,
}

impl Hub {
    pub fn new(
        table: Arc<RoutingTable>,
        store: Store,
        connections: Connections,
        config: HubConfig,
    ) -> Self {
        let routes = table
            .routes()
            .iter()
            .map(|route| {
                let (live, _) = broadcast::channel(config.live_capacity);
                let live_route = LiveRoute {
                    route: route.clone(),
                    live,
                    metrics: RouteMetrics::new(&route.id),
                    log: LogId::messages(route.id.clone()),
                    dead_letters: LogId::dead_letters(route.id.clone()),
                };
                (route.id.clone(), Arc::new(live_route))
            })
            .collect();
        Self {
            table,
            routes,
            store,
            publishers: RwLock::new(HashMap::new()),
            connections,
            config,
        }
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    pub fn route(&self, id: &str) -> Option<&Arc<LiveRoute>> {
        self.routes.get(id)
    }

    /// Routes in table order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<LiveRoute>> {
        self.table
            .routes()
            .iter()
            .filter_map(|r| self.routes.get(&r.id))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Whether every upstream a publish on `channel` goes through is connected; `None` when
    /// the channel has no connected upstream to wait for (unknown, or nothing registered).
    pub fn upstreams_connected(&self, channel: &str) -> Option<bool> {
        let route = self.routes.get(channel)?;
        let publishers = self.publishers.read().ok()?;
        let mut states = route.route.upstreams.iter().filter_map(|u| {
            publishers
                .get(&ServerKey {
                    api: route.route.api.clone(),
                    server: u.server.clone(),
                })
                .map(|p| p.is_connected())
        });
        let first = states.next()?;
        Some(states.fold(first, |all, s| all && s))
    }

    /// Connectors register their sending side per server.
    pub fn register_publisher(&self, key: ServerKey, publisher: Arc<dyn Publisher>) {
        if let Ok(mut map) = self.publishers.write() {
            map.insert(key, publisher);
        }
    }

    /// A message from an upstream: validated, then appended to the route's log (and fanned out
    /// live) or, when invalid, to its dead-letter log. The caller acknowledges upstream once the
    /// returned append is flushed.
    pub async fn ingest(
        &self,
        route: &LiveRoute,
        mut envelope: Envelope,
    ) -> Result<PendingAppend, store::Error> {
        route.metrics.message_received(envelope.origin.transport);
        let size = envelope.payload.len();
        let problem = if size > self.config.max_payload_bytes {
            Some((
                RejectReason::TooLarge,
                format!(
                    "payload of {size} bytes exceeds {} bytes",
                    self.config.max_payload_bytes
                ),
            ))
        } else if let Some(e) = route
            .route
            .parameters
            .iter()
            .find_map(|p| envelope.params.get(&p.name).and_then(|v| p.check(v).err()))
        {
            Some((RejectReason::InvalidAddress, e.to_string()))
        } else {
            match route.route.validate(&envelope.payload) {
                Ok(matched) => {
                    // Which of several messages this is: clients of a socket carrying many
                    // kinds (a market feed's trades and heartbeats) tell them apart by it.
                    if let Some(id) = matched
                        && route.route.messages.len() > 1
                        && !envelope
                            .headers
                            .iter()
                            .any(|(k, _)| k == "asyncapi_message")
                    {
                        envelope
                            .headers
                            .push(("asyncapi_message".into(), id.to_owned()));
                    }
                    None
                }
                Err(e) => Some((RejectReason::InvalidPayload, e.to_string())),
            }
        };
        match problem {
            None => {
                route.metrics.message_logged(size);
                self.store
                    .append(route.log.clone(), envelope, None, Some(route.live.clone()))
                    .await
            }
            Some((reason, detail)) => {
                self.dead_letter(route, envelope, DeadLetterReason::Rejected(reason), detail)
                    .await
            }
        }
    }

    /// Writes `envelope` to the route's dead-letter log with `detail` as its reason. The one
    /// way into a dead-letter log (ingest, bridge lanes, call triggers), so every dead letter
    /// is logged and counted alike.
    pub async fn dead_letter(
        &self,
        route: &LiveRoute,
        envelope: Envelope,
        reason: DeadLetterReason,
        detail: String,
    ) -> Result<PendingAppend, store::Error> {
        DeadLettered {
            channel: &route.route.id,
            reason,
            detail: &detail,
            address: &envelope.address,
        }
        .emit();
        self.store
            .append(route.dead_letters.clone(), envelope, Some(detail), None)
            .await
    }
}
