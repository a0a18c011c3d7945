//! The running routing table: per-route live fan-out, ingest from upstreams into the log, publish
//! from clients to upstreams, and subscriptions that resume from the log without gaps.
//!
//! Knows routes, the store and the [`Publisher`] interface; never a protocol client or axum.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::routing::address::{FillError, Params};
use crate::routing::envelope::{Delivered, Envelope, Headers, Origin};
use crate::routing::{ChannelId, Route, RoutingTable};
use crate::schema::{Encoding, ValidationError};
use crate::store::{self, LogId, PendingAppend, Store};
use crate::telemetry::events::{
    DeadLetterReason, DeadLettered, MessageRejected, PublishFailed, RejectReason, RouteMetrics,
};
use crate::upstream::{Connections, Outbound, PublishError, Publisher, ServerKey};

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

/// Why a client's publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("no channel '{0}'")]
    UnknownChannel(String),
    #[error("channel '{0}' is not writable (the application does not send on it)")]
    NotWritable(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("content type '{found}' is not accepted here (expected {expected})")]
    UnsupportedContentType { found: String, expected: String },
    #[error("payload does not match the channel's schema: {0}")]
    InvalidPayload(ValidationError),
    #[error("cannot build the address: {0}")]
    InvalidAddress(FillError),
    #[error(transparent)]
    Upstream(PublishError),
    #[error("the message log failed: {0}")]
    Store(store::Error),
}

impl PublishFailure {
    pub fn reason(&self) -> RejectReason {
        match self {
            PublishFailure::UnknownChannel(_) | PublishFailure::InvalidAddress(_) => {
                RejectReason::InvalidAddress
            }
            PublishFailure::NotWritable(_) => RejectReason::NotWritable,
            PublishFailure::TooLarge { .. } => RejectReason::TooLarge,
            PublishFailure::UnsupportedContentType { .. } => RejectReason::UnsupportedContentType,
            PublishFailure::InvalidPayload(_) => RejectReason::InvalidPayload,
            PublishFailure::Upstream(_) => RejectReason::UpstreamUnavailable,
            PublishFailure::Store(_) => RejectReason::StoreFailed,
        }
    }
}

/// A client's message for a writable channel.
pub struct PublishRequest {
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// Address parameters given explicitly (query string); others come from same-named
    /// top-level fields of a JSON payload, then from the parameter's default.
    pub params: HashMap<String, String>,
    pub headers: Headers,
    pub origin: Origin,
    /// The Kafka record key, when the sender sets it (bridges); else the route's key template.
    pub key: Option<String>,
}

/// A publish that was acknowledged upstream and logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub channel: ChannelId,
    pub offset: u64,
    pub address: String,
    pub params: HashMap<String, String>,
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

    /// A client's message for a writable channel: validated, published on every upstream of the
    /// route (each must acknowledge), then logged. Nothing is accepted that cannot be delivered.
    pub async fn publish(
        &self,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, PublishFailure> {
        let Some(route) = self.routes.get(channel) else {
            // Not counted: the channel label would be whatever a client typed.
            return Err(PublishFailure::UnknownChannel(channel.to_owned()));
        };
        let transport = request.origin.transport;
        let result = self.publish_to(route, channel, request).await;
        if let Err(failure) = &result {
            MessageRejected {
                channel: &route.route.id,
                transport,
                reason: failure.reason(),
                detail: &failure.to_string(),
            }
            .emit();
        }
        result
    }

    async fn publish_to(
        &self,
        route: &Arc<LiveRoute>,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, PublishFailure> {
        let spec = &route.route;
        if !spec.direction.writable {
            return Err(PublishFailure::NotWritable(channel.to_owned()));
        }
        let size = request.payload.len();
        if size > self.config.max_payload_bytes {
            return Err(PublishFailure::TooLarge {
                size,
                limit: self.config.max_payload_bytes,
            });
        }
        check_content_type(spec, request.content_type.as_deref())?;
        spec.validate(&request.payload)
            .map_err(PublishFailure::InvalidPayload)?;
        let params = resolve_params(spec, &request)?;
        let value_of = |name: &str| params.get(name).map(String::as_str);
        let address = match &spec.template {
            Some(t) => t
                .generic()
                .fill(value_of)
                .map_err(PublishFailure::InvalidAddress)?,
            None => String::new(),
        };

        // Concrete addresses for every upstream first: a bad parameter fails before anything
        // is sent anywhere.
        let mut sends = Vec::new();
        for upstream in &spec.upstreams {
            let Some(binding) = upstream.binding.protocol() else {
                continue;
            };
            let concrete = binding
                .address(&value_of, &address)
                .map_err(PublishFailure::InvalidAddress)?;
            let key = ServerKey {
                api: spec.api.clone(),
                server: upstream.server.clone(),
            };
            let publisher = self
                .publishers
                .read()
                .ok()
                .and_then(|m| m.get(&key).cloned());
            let Some(publisher) = publisher else {
                continue;
            };
            if !publisher.is_connected() {
                let error = PublishError::NotConnected {
                    server: upstream.server.clone(),
                };
                self.publish_failed(spec, &upstream.server, &error);
                return Err(PublishFailure::Upstream(error));
            }
            sends.push((upstream, publisher, concrete));
        }
        let mut route_params = Params::default();
        if let Some(t) = &spec.template {
            for name in t.params() {
                if let Some(v) = params.get(name) {
                    route_params.insert(name.into(), v.clone());
                }
            }
        }
        let started = std::time::Instant::now();
        for (upstream, publisher, concrete) in sends {
            let outbound = Outbound {
                route: spec.clone(),
                address: concrete,
                params: route_params.clone(),
                payload: request.payload.clone(),
                headers: request.headers.clone(),
                key: request.key.clone(),
            };
            let result = tokio::time::timeout(
                self.config.publish_timeout,
                publisher.publish(upstream, outbound),
            )
            .await
            .unwrap_or_else(|_| {
                Err(PublishError::Timeout {
                    server: upstream.server.clone(),
                    timeout: self.config.publish_timeout,
                })
            });
            if let Err(error) = result {
                self.publish_failed(spec, &upstream.server, &error);
                return Err(PublishFailure::Upstream(error));
            }
            route
                .metrics
                .message_delivered(upstream.binding.transport(), Some(started.elapsed()));
        }

        let mut envelope = Envelope::new(
            spec.id.clone(),
            address.clone(),
            route_params,
            request.payload,
            request.origin,
        );
        envelope.headers = request.headers;
        route.metrics.message_received(envelope.origin.transport);
        route.metrics.message_logged(size);
        let offset = self
            .store
            .append(route.log.clone(), envelope, None, Some(route.live.clone()))
            .await
            .map_err(PublishFailure::Store)?
            .flushed()
            .await
            .map_err(PublishFailure::Store)?;
        Ok(Published {
            channel: spec.id.clone(),
            offset,
            address,
            params,
        })
    }

    fn publish_failed(&self, route: &Route, server: &str, error: &PublishError) {
        PublishFailed {
            channel: &route.id,
            server,
            reason: error.reason(),
            detail: &error.to_string(),
        }
        .emit();
    }

    /// Subscribes to a route: replay from `from` (inclusive) when given, then live, with no gap
    /// and no duplicate; live only (from the next message appended) when `from` is `None`.
    pub async fn subscribe(
        &self,
        route: &Arc<LiveRoute>,
        from: Option<u64>,
    ) -> Result<Subscription, store::Error> {
        // Subscribe before looking at the log: whatever is appended after this point arrives
        // live, and whatever arrives twice is dropped by offset.
        let rx = route.live.subscribe();
        let next_offset = match from {
            Some(from) => from.max(1),
            None => self
                .store
                .stats(&route.log)
                .await?
                .last_offset
                .map_or(1, |o| o + 1),
        };
        Ok(Subscription {
            route: route.clone(),
            store: self.store.clone(),
            rx,
            next_offset,
            replaying: from.is_some(),
            backlog: VecDeque::new(),
            batch: self.config.replay_batch,
        })
    }
}

/// JSON routes take JSON (`application/json`, `*/*+json`, or no content type); Avro-binary
/// routes take `application/octet-stream` or an Avro media type; other routes take anything.
fn check_content_type(route: &Route, content_type: Option<&str>) -> Result<(), PublishFailure> {
    let Some(found) = content_type else {
        return Ok(());
    };
    let essence = found
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let schema_checked: Vec<_> = route
        .messages
        .iter()
        .filter(|m| m.payload.as_ref().is_some_and(|p| p.is_enforced()))
        .collect();
    if schema_checked.is_empty() {
        return Ok(());
    }
    let is_json = essence == "application/json" || essence.ends_with("+json");
    let accepted = schema_checked.iter().any(|m| match m.encoding {
        Encoding::Json => is_json,
        Encoding::AvroBinary => essence == "application/octet-stream" || essence.contains("avro"),
    });
    if accepted {
        Ok(())
    } else {
        let expected = if schema_checked.iter().any(|m| m.encoding == Encoding::Json) {
            "application/json"
        } else {
            "application/octet-stream or an Avro media type"
        };
        Err(PublishFailure::UnsupportedContentType {
            found: found.to_owned(),
            expected: expected.to_owned(),
        })
    }
}

/// Parameters: explicit ones first, then same-named top-level JSON fields, then defaults.
fn resolve_params(
    route: &Route,
    request: &PublishRequest,
) -> Result<HashMap<String, String>, PublishFailure> {
    let mut out = HashMap::new();
    let Some(template) = &route.template else {
        return Ok(out);
    };
    let json: Option<serde_json::Value> =
        if template.params().all(|p| request.params.contains_key(p)) {
            None
        } else {
            serde_json::from_slice(&request.payload).ok()
        };
    for name in template.params() {
        let value = request
            .params
            .get(name)
            .cloned()
            .or_else(|| {
                json.as_ref()
                    .and_then(|j| j.get(name))
                    .and_then(|v| match v {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
            })
            .or_else(|| {
                route
                    .parameters
                    .iter()
                    .find(|p| p.name == name)
                    .and_then(|p| p.default.clone())
            });
        match value {
            Some(v) => {
                if let Some(parameter) = route.parameters.iter().find(|p| p.name == name) {
                    parameter
                        .check(&v)
                        .map_err(PublishFailure::InvalidAddress)?;
                }
                out.insert(name.to_owned(), v);
            }
            None => {
                return Err(PublishFailure::InvalidAddress(FillError::Missing {
                    name: name.to_owned(),
                }));
            }
        }
    }
    Ok(out)
}

/// What a subscription yields.
pub enum SubscriptionEvent {
    /// A message; `live` is false for messages read back from the log.
    Message { message: Arc<Delivered>, live: bool },
    /// The subscriber fell behind the live stream by `skipped` messages; it continues from
    /// the log at `resume_from`.
    Lagged { skipped: u64, resume_from: u64 },
}

/// A route's messages in offset order: replayed from the log, then live.
pub struct Subscription {
    route: Arc<LiveRoute>,
    store: Store,
    rx: broadcast::Receiver<Arc<Delivered>>,
    /// The next offset this subscriber expects.
    next_offset: u64,
    replaying: bool,
    backlog: VecDeque<Arc<Delivered>>,
    batch: usize,
}

impl Subscription {
    pub fn route(&self) -> &Arc<LiveRoute> {
        &self.route
    }

    /// The next event; `Ok(None)` when the route is shut down. Cancel-safe: a message is
    /// consumed only when returned.
    pub async fn next(&mut self) -> Result<Option<SubscriptionEvent>, store::Error> {
        loop {
            if let Some(message) = self.backlog.pop_front() {
                self.next_offset = message.offset + 1;
                return Ok(Some(SubscriptionEvent::Message {
                    message,
                    live: false,
                }));
            }
            if self.replaying {
                let messages = self
                    .store
                    .read(&self.route.log, self.next_offset, self.batch)
                    .await?;
                if messages.is_empty() {
                    self.replaying = false;
                } else {
                    self.backlog.extend(messages);
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(message) if message.offset < self.next_offset => continue,
                // A gap can only mean messages this receiver never saw: read them back.
                Ok(message) if message.offset > self.next_offset => self.replaying = true,
                Ok(message) => {
                    self.next_offset = message.offset + 1;
                    return Ok(Some(SubscriptionEvent::Message {
                        message,
                        live: true,
                    }));
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    self.replaying = true;
                    return Ok(Some(SubscriptionEvent::Lagged {
                        skipped,
                        resume_from: self.next_offset,
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// The offset of the next message this subscription will yield.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
}

#[cfg(test)]
mod tests {
    //! `Subscription` against a real store in a temp dir, no broker: replay, then live, and a
    //! lagging reader resumed from the log — each offset exactly once, in order.

    use super::*;
    use crate::routing::envelope::Transport;
    use crate::store::StoreConfig;

    const DOC: &str = "asyncapi: 3.0.0\ninfo: {title: T, version: '1'}\nchannels:\n  readings:\n    address: readings\noperations:\n  receive: {action: receive, channel: {$ref: '#/channels/readings'}}\n";

    struct Fixture {
        hub: Hub,
        route: Arc<LiveRoute>,
        _dir: tempfile::TempDir,
    }

    fn fixture(live_capacity: usize) -> Fixture {
        let loaded = crate::spec::load_text(std::path::Path::new("t.yaml"), DOC).unwrap();
        let table = Arc::new(
            crate::routing::compile(&loaded.apis, &crate::routing::binding::NoConnectors)
                .unwrap()
                .table,
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let config = HubConfig {
            live_capacity,
            replay_batch: 7,
            ..HubConfig::default()
        };
        let hub = Hub::new(table, store, Connections::default(), config);
        let route = hub.routes().next().unwrap().clone();
        Fixture {
            hub,
            route,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Appends `n` messages (`{"n": i}`) and waits until they are flushed.
        async fn append(&self, from: u64, n: u64) {
            let mut pending = Vec::new();
            for i in from..from + n {
                let envelope = Envelope::new(
                    self.route.id().clone(),
                    "readings".into(),
                    Params::default(),
                    Bytes::from(format!("{{\"n\":{i}}}")),
                    Origin::upstream(Transport::Mqtt, "broker".into()),
                );
                pending.push(self.hub.ingest(&self.route, envelope).await.unwrap());
            }
            for p in pending {
                p.flushed().await.unwrap();
            }
        }
    }

    impl Fixture {
        /// Appends once a concurrent reader had time to reach the end of the log.
        async fn append_later(&self, from: u64, n: u64) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.append(from, n).await;
        }
    }

    /// Reads until `count` messages arrived; their offsets, and whether a lag was reported.
    async fn read(subscription: &mut Subscription, count: usize) -> (Vec<u64>, Vec<bool>, bool) {
        let (mut offsets, mut live, mut lagged) = (Vec::new(), Vec::new(), false);
        while offsets.len() < count {
            let event = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("no event within 5 s")
                .unwrap()
                .expect("the route is open");
            match event {
                SubscriptionEvent::Message { message, live: l } => {
                    offsets.push(message.offset);
                    live.push(l);
                }
                SubscriptionEvent::Lagged { .. } => lagged = true,
            }
        }
        (offsets, live, lagged)
    }

    #[tokio::test]
    async fn replay_then_live_with_no_gap_and_no_duplicate() {
        let f = fixture(64);
        f.append(0, 20).await;
        let mut sub = f.hub.subscribe(&f.route, Some(5)).await.unwrap();
        // Live messages arrive while the replay (batches of 7) is still under way.
        f.append(20, 10).await;
        let (offsets, live, lagged) = read(&mut sub, 26).await;
        assert_eq!(offsets, (5..=30).collect::<Vec<u64>>());
        assert!(!lagged);
        assert!(!live[0], "the first came from the log");
        // A reader waiting at the end of the log gets what follows live.
        let ((offsets, live, _), ()) = tokio::join!(read(&mut sub, 3), f.append_later(30, 3));
        assert_eq!(offsets, vec![31, 32, 33]);
        assert!(live.iter().all(|l| *l), "then live: {live:?}");
        assert_eq!(sub.next_offset(), 34);
    }

    #[tokio::test]
    async fn without_a_start_offset_it_begins_at_the_next_message() {
        let f = fixture(64);
        f.append(0, 5).await;
        let mut sub = f.hub.subscribe(&f.route, None).await.unwrap();
        f.append(5, 2).await;
        let (offsets, _, _) = read(&mut sub, 2).await;
        assert_eq!(offsets, vec![6, 7]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_and_resumes_from_the_log_without_a_gap() {
        // A live buffer of 16 and a reader that does not read while 200 arrive.
        let f = fixture(16);
        let mut sub = f.hub.subscribe(&f.route, None).await.unwrap();
        f.append(0, 200).await;
        let (offsets, _, lagged) = read(&mut sub, 200).await;
        assert!(lagged, "the lag was reported");
        assert_eq!(offsets, (1..=200).collect::<Vec<u64>>());
        // And it is live again once it waits at the end of the log.
        let ((offsets, live, _), ()) = tokio::join!(read(&mut sub, 1), f.append_later(200, 1));
        assert_eq!((offsets, live), (vec![201], vec![true]));
    }
}
