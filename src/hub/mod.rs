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
use tokio_util::sync::CancellationToken;

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
    id: ChannelId,
    /// Swapped in place when the route's document changes it (a new schema): clients, log
    /// and cursors stay with the route.
    definition: RwLock<Arc<Route>>,
    live: broadcast::Sender<Arc<Delivered>>,
    pub metrics: RouteMetrics,
    pub log: LogId,
    pub dead_letters: LogId,
    /// Cancelled when the route's document is removed: its clients' streams end.
    removed: CancellationToken,
}

impl LiveRoute {
    fn new(route: Arc<Route>, live_capacity: usize) -> Self {
        let (live, _) = broadcast::channel(live_capacity);
        LiveRoute {
            id: route.id.clone(),
            metrics: RouteMetrics::new(&route.id),
            log: LogId::messages(route.id.clone()),
            dead_letters: LogId::dead_letters(route.id.clone()),
            definition: RwLock::new(route),
            live,
            removed: CancellationToken::new(),
        }
    }

    pub fn id(&self) -> &ChannelId {
        &self.id
    }

    /// The route's definition now.
    pub fn route(&self) -> Arc<Route> {
        match self.definition.read() {
            Ok(route) => route.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn swap(&self, route: Arc<Route>) {
        *self.definition.write().unwrap_or_else(|p| p.into_inner()) = route;
    }

    pub fn live_subscribers(&self) -> usize {
        self.live.receiver_count()
    }

    /// Resolves when the route has been removed from the running table.
    pub fn removed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.removed.cancelled()
    }

    pub fn is_removed(&self) -> bool {
        self.removed.is_cancelled()
    }
}

/// The routes at one moment, in table order. Replaced whole on every change, so a reader
/// never sees half a change and never waits for one.
#[derive(Default)]
struct RouteSet {
    order: Vec<Arc<LiveRoute>>,
    by_id: HashMap<ChannelId, Arc<LiveRoute>>,
}

/// What [`Hub::replace_api`] did.
#[derive(Default)]
pub struct Replaced {
    pub added: Vec<ChannelId>,
    pub changed: Vec<ChannelId>,
    pub unchanged: Vec<ChannelId>,
    pub removed: Vec<Arc<LiveRoute>>,
}

impl RouteSet {
    fn push(&mut self, route: Arc<LiveRoute>) {
        self.by_id.insert(route.id().clone(), route.clone());
        self.order.push(route);
    }
}

/// Why routes could not be added.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("channel '{0}' is already served")]
    Duplicate(ChannelId),
}

/// The running routes.
pub struct Hub {
    routes: RwLock<Arc<RouteSet>>,
    store: Store,
    publishers: RwLock<HashMap<ServerKey, Arc<dyn Publisher>>>,
    /// Connectors that take up a change of their document's routes without reconnecting.
    followers: RwLock<HashMap<ServerKey, Arc<dyn RouteFollower>>>,
    connections: Connections,
    config: HubConfig,
    /// Which routes' publishes are failing now, so each run of failures is logged once.
    failing: publish::FailingPublishes,
}

/// A connector's intake that follows its document's routes in place: after a replacement it
/// subscribes what is new and unsubscribes what went, on the connection it has, so the
/// broker redelivers nothing and unchanged routes see no gap and no repeat.
pub trait RouteFollower: Send + Sync {
    /// Takes up the routes `hub` now has for this connector's server.
    fn follow_routes(&self, hub: &Hub);
}

impl Hub {
    pub fn new(
        table: Arc<RoutingTable>,
        store: Store,
        connections: Connections,
        config: HubConfig,
    ) -> Self {
        let mut set = RouteSet::default();
        for route in table.routes() {
            set.push(Arc::new(LiveRoute::new(
                route.clone(),
                config.live_capacity,
            )));
        }
        Self {
            routes: RwLock::new(Arc::new(set)),
            store,
            publishers: RwLock::new(HashMap::new()),
            followers: RwLock::new(HashMap::new()),
            connections,
            config,
            failing: Default::default(),
        }
    }

    fn snapshot(&self) -> Arc<RouteSet> {
        match self.routes.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn route(&self, id: &str) -> Option<Arc<LiveRoute>> {
        self.snapshot().by_id.get(id).cloned()
    }

    /// The routes in table order, as they are now.
    pub fn routes(&self) -> std::vec::IntoIter<Arc<LiveRoute>> {
        self.snapshot().order.clone().into_iter()
    }

    /// Starts serving the routes of `table` (a document added at run time); refused as a
    /// whole when one of its channel ids is already served.
    pub fn add(&self, table: &RoutingTable) -> Result<Vec<ChannelId>, ChangeError> {
        let mut guard = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(taken) = table
            .routes()
            .iter()
            .find(|r| guard.by_id.contains_key(&r.id))
        {
            return Err(ChangeError::Duplicate(taken.id.clone()));
        }
        let mut next = RouteSet {
            order: guard.order.clone(),
            by_id: guard.by_id.clone(),
        };
        let mut added = Vec::with_capacity(table.len());
        for route in table.routes() {
            next.push(Arc::new(LiveRoute::new(
                route.clone(),
                self.config.live_capacity,
            )));
            added.push(route.id.clone());
        }
        *guard = Arc::new(next);
        Ok(added)
    }

    /// Serves `table` as the new routes of document `api`, by diff: a route whose definition
    /// is unchanged is kept as it is; a changed one is swapped in place (same clients, log and
    /// cursors; the next message meets the new definition); a new one starts; one no longer
    /// in `table` is removed (its clients' streams end).
    pub fn replace_api(&self, api: &str, table: &RoutingTable) -> Result<Replaced, ChangeError> {
        // The comparison (every definition serialised) runs on a snapshot, outside the lock:
        // lookups of other routes never wait for it. The lock is taken only to publish the
        // new set, and the work is redone if another change got there first.
        loop {
            let current = self.snapshot();
            if let Some(taken) = table.routes().iter().find(|r| {
                current
                    .by_id
                    .get(&r.id)
                    .is_some_and(|live| live.route().api != api)
            }) {
                return Err(ChangeError::Duplicate(taken.id.clone()));
            }
            let mut replaced = Replaced::default();
            let mut swaps = Vec::new();
            let mut next = Vec::with_capacity(current.order.len() + table.len());
            let mut placed = false;
            for live in &current.order {
                if live.route().api != api {
                    next.push(live.clone());
                    continue;
                }
                if table.get(live.id()).is_none() {
                    replaced.removed.push(live.clone());
                }
                // The document's routes go where its first route was, in the new order.
                if !placed {
                    placed = true;
                    for route in table.routes() {
                        next.push(self.reuse_or_start(&current, route, &mut replaced, &mut swaps));
                    }
                }
            }
            if !placed {
                for route in table.routes() {
                    next.push(self.reuse_or_start(&current, route, &mut replaced, &mut swaps));
                }
            }
            let by_id = next.iter().map(|r| (r.id().clone(), r.clone())).collect();
            let mut guard = self.routes.write().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&guard, &current) {
                continue;
            }
            for (live, route) in swaps {
                live.swap(route);
            }
            *guard = Arc::new(RouteSet { order: next, by_id });
            drop(guard);
            for route in &replaced.removed {
                route.removed.cancel();
            }
            return Ok(replaced);
        }
    }

    fn reuse_or_start(
        &self,
        current: &RouteSet,
        route: &Arc<Route>,
        replaced: &mut Replaced,
        swaps: &mut Vec<(Arc<LiveRoute>, Arc<Route>)>,
    ) -> Arc<LiveRoute> {
        match current.by_id.get(&route.id) {
            Some(live) => {
                if live.route().same_definition(route) {
                    replaced.unchanged.push(route.id.clone());
                } else {
                    swaps.push((live.clone(), route.clone()));
                    replaced.changed.push(route.id.clone());
                }
                live.clone()
            }
            None => {
                replaced.added.push(route.id.clone());
                Arc::new(LiveRoute::new(route.clone(), self.config.live_capacity))
            }
        }
    }

    /// Forgets the publishers (and route followers) of document `api` (its connectors are
    /// restarting or gone).
    pub fn forget_publishers(&self, api: &str) {
        if let Ok(mut publishers) = self.publishers.write() {
            publishers.retain(|key, _| key.api != api);
        }
        if let Ok(mut followers) = self.followers.write() {
            followers.retain(|key, _| key.api != api);
        }
    }

    /// Forgets what the connector of server `key` registered: its publisher, its follower,
    /// its connection status (it is restarting or gone).
    pub fn forget_server(&self, key: &ServerKey) {
        if let Ok(mut publishers) = self.publishers.write() {
            publishers.remove(key);
        }
        if let Ok(mut followers) = self.followers.write() {
            followers.remove(key);
        }
        self.connections.forget_server(key);
    }

    /// Connectors that can follow route changes register here per server.
    pub fn register_follower(&self, key: ServerKey, follower: Arc<dyn RouteFollower>) {
        if let Ok(mut map) = self.followers.write() {
            map.insert(key, follower);
        }
    }

    /// Has the connector of `key` take up its document's routes in place; false when it has
    /// no follower (it must reconnect for them).
    pub fn follow_routes(&self, key: &ServerKey) -> bool {
        let follower = self.followers.read().ok().and_then(|m| m.get(key).cloned());
        match follower {
            Some(f) => {
                f.follow_routes(self);
                true
            }
            None => false,
        }
    }

    /// Stops serving every route of document `api`: their clients' streams end, their
    /// publishers are forgotten. Their logs stay in the store.
    pub fn remove_api(&self, api: &str) -> Vec<Arc<LiveRoute>> {
        let removed: Vec<Arc<LiveRoute>> = {
            let mut guard = self.routes.write().unwrap_or_else(|p| p.into_inner());
            let (gone, kept): (Vec<_>, Vec<_>) = guard
                .order
                .iter()
                .cloned()
                .partition(|r| r.route().api == api);
            if gone.is_empty() {
                return gone;
            }
            let by_id = kept.iter().map(|r| (r.id().clone(), r.clone())).collect();
            *guard = Arc::new(RouteSet { order: kept, by_id });
            gone
        };
        self.forget_publishers(api);
        for route in &removed {
            route.removed.cancel();
        }
        removed
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
        let route = self.route(channel)?.route();
        let publishers = self.publishers.read().ok()?;
        let mut states = route.upstreams.iter().filter_map(|u| {
            publishers
                .get(&ServerKey {
                    api: route.api.clone(),
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
        // One definition for the whole message, even if the document changes meanwhile.
        let definition = route.route();
        let size = envelope.payload.len();
        let problem = if size > self.config.max_payload_bytes {
            Some((
                RejectReason::TooLarge,
                format!(
                    "payload of {size} bytes exceeds {} bytes",
                    self.config.max_payload_bytes
                ),
            ))
        } else if let Some(e) = definition
            .parameters
            .iter()
            .find_map(|p| envelope.params.get(&p.name).and_then(|v| p.check(v).err()))
        {
            Some((RejectReason::InvalidAddress, e.to_string()))
        } else {
            match definition.validate(&envelope.payload) {
                Ok(matched) => {
                    // Which of several messages this is: clients of a socket carrying many
                    // kinds (a market feed's trades and heartbeats) tell them apart by it.
                    if let Some(id) = matched
                        && definition.messages.len() > 1
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
            channel: route.id(),
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
