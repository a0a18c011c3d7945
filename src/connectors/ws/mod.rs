//! WebSocket servers run by others (`ws`/`wss`): the gateway connects as a client and their
//! channels become ordinary routes.
//!
//! One socket per concrete URL: every route of a document whose channel lives at the same
//! address shares it (public feeds put several channels on one socket). After each connect the
//! routes' subscribe frames (`x-stepflow-subscribe`) are sent. A frame received is given to the
//! readable route one of whose messages its payload matches (by schema, in document order); with
//! a single readable route it goes there and the route's validation decides (dead letter or
//! not). Frames published on writable routes are written to the socket; the publish completes
//! once the frame is written (WebSocket has no acknowledgement). A ping every 15 s; a socket
//! silent for 45 s is considered dead. Reconnects with backoff. These sources cannot redeliver:
//! such routes are at-most-once (the compiler says so at load).
//!
//! A replaced document is followed in place ([`WsFollower`]): a socket whose URL, headers and
//! subscribe frames are unchanged stays open and only its route list is swapped; new sockets
//! open, sockets no route wants close.

mod binding;

pub use binding::{WebSocketRoute, WsBindings, frame_text};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server_access::ClientSide;
use crate::config::RouteFileConfig;
use crate::hub::{Hub, LiveRoute};
use crate::routing::address::Params;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::telemetry::events::MessageUnmatched;
use crate::upstream::{Backoff, Connections, Outbound, PublishError, Publisher, ServerKey};

const PING_INTERVAL: Duration = Duration::from_secs(15);
/// No frame (not even a pong) for this long: the socket is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// Frames waiting to be written to one socket.
const OUTGOING_CAPACITY: usize = 1024;

type Outgoing = (String, oneshot::Sender<Result<(), PublishError>>);

/// One socket's plan: where it connects and which routes it serves.
struct Socket {
    /// `path?query` on the server.
    target: String,
    /// The concrete channel address (the path without the query), as envelopes carry it.
    address: String,
    headers: Vec<(String, String)>,
    readable: Vec<(Arc<LiveRoute>, Params)>,
    subscribe: Vec<String>,
}

/// The readable routes a socket's frames go to: read per frame, swapped by [`WsFollower`].
type Readable = Arc<RwLock<Arc<Vec<(Arc<LiveRoute>, Params)>>>>;

/// One WebSocket server's connector.
pub struct WsConnector {
    key: ServerKey,
    /// `ws://host:port[/pathname]`.
    base_url: String,
    optional: bool,
    sockets: Vec<Socket>,
    side: ClientSide,
    routes_config: BTreeMap<String, RouteFileConfig>,
}

impl WsConnector {
    /// Plans the sockets of `key`'s routes. Routes whose parameters have no value are skipped
    /// with a warning (they still serve web clients and the log).
    pub fn build(
        hub: &Hub,
        side: ClientSide,
        routes_config: &BTreeMap<String, RouteFileConfig>,
    ) -> WsConnector {
        let key = &side.key;
        let mut sockets: Vec<Socket> = Vec::new();
        for live in hub.routes().filter(|r| r.route().api == key.api) {
            let route = &live.route();
            let Some(ws) =
                route
                    .upstreams
                    .iter()
                    .find_map(|u| match u.binding.get::<WebSocketRoute>() {
                        Some(w) if u.server == key.server => Some(w),
                        _ => None,
                    })
            else {
                continue;
            };
            if !(route.direction.readable || route.direction.writable) {
                continue;
            }
            let Some(path) = &ws.path else { continue };
            let Some(addresses) = side.addresses(route, path, routes_config) else {
                continue;
            };
            let access = side
                .access
                .clone()
                .with_binding(ws.query.as_ref(), ws.headers.as_ref());
            for (address, params) in addresses {
                let target = access.path_and_query(&address);
                let socket = match sockets.iter_mut().find(|s| s.target == target) {
                    Some(s) => s,
                    None => {
                        sockets.push(Socket {
                            target: target.clone(),
                            address: address.clone(),
                            headers: access.headers.clone(),
                            readable: Vec::new(),
                            subscribe: Vec::new(),
                        });
                        sockets.last_mut().expect("pushed")
                    }
                };
                if route.direction.readable {
                    socket.readable.push((live.clone(), params));
                }
                let frames = match routes_config
                    .get(route.id.as_ref())
                    .and_then(|c| c.subscribe.as_ref())
                {
                    Some(configured) => configured.iter().map(frame_text).collect(),
                    None => ws.subscribe.clone(),
                };
                for frame in frames {
                    if !socket.subscribe.contains(&frame) {
                        socket.subscribe.push(frame);
                    }
                }
            }
        }
        WsConnector {
            key: side.key.clone(),
            base_url: side.base_url.clone(),
            optional: side.optional,
            sockets,
            side,
            routes_config: routes_config.clone(),
        }
    }

    pub fn start(self, hub: Arc<Hub>, shutdown: CancellationToken, tracker: &TaskTracker) {
        let connections = hub.connections().clone();
        // Nothing to acknowledge upstream: the intake handle stays unused.
        connections.register_with(
            self.key.clone(),
            "ws",
            self.base_url.clone(),
            self.optional,
            crate::upstream::DEFAULT_STALL_AFTER,
        );
        let states = Arc::new(SocketStates {
            key: self.key.clone(),
            connections: connections.clone(),
            connected: Mutex::new(BTreeMap::new()),
            reported: Mutex::new(None),
        });
        let senders: Senders = Default::default();
        let follower = WsFollower {
            hub: Arc::downgrade(&hub),
            key: self.key.clone(),
            base_url: self.base_url,
            side: self.side,
            routes_config: self.routes_config,
            shutdown,
            tracker: tracker.clone(),
            states: states.clone(),
            senders: senders.clone(),
            running: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        };
        {
            let mut running = follower.running.lock().unwrap_or_else(|p| p.into_inner());
            for socket in self.sockets {
                running.push(follower.open(&hub, socket));
            }
            follower.publish_to(&running);
        }
        hub.register_publisher(
            self.key.clone(),
            Arc::new(WsPublisher {
                key: self.key.clone(),
                senders,
                states,
            }),
        );
        hub.register_follower(self.key, Arc::new(follower));
    }
}

/// Concrete address → (socket id, its outgoing queue), for publishing.
type Senders = Arc<RwLock<BTreeMap<String, (u64, mpsc::Sender<Outgoing>)>>>;

/// A socket task that is running.
struct RunningSocket {
    id: u64,
    target: String,
    address: String,
    headers: Vec<(String, String)>,
    subscribe: Vec<String>,
    readable: Readable,
    outgoing: mpsc::Sender<Outgoing>,
    stop: CancellationToken,
}

impl RunningSocket {
    /// Whether `socket` is this one's session as it is: same URL, headers and subscribe frames.
    fn is_session_of(&self, socket: &Socket) -> bool {
        self.target == socket.target
            && self.headers == socket.headers
            && self.subscribe == socket.subscribe
    }
}

/// Takes up a replaced document's routes without touching the sockets that stay: a socket
/// whose URL, headers and subscribe frames are unchanged keeps its connection and only its
/// route list is swapped (a frame arriving meanwhile goes to the old or the new list, never
/// nowhere); a new socket opens; a socket no route wants any more closes.
struct WsFollower {
    /// Weak: the hub holds the follower.
    hub: Weak<Hub>,
    key: ServerKey,
    base_url: String,
    side: ClientSide,
    routes_config: BTreeMap<String, RouteFileConfig>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    states: Arc<SocketStates>,
    senders: Senders,
    running: Mutex<Vec<RunningSocket>>,
    next_id: AtomicU64,
}

impl WsFollower {
    fn open(&self, hub: &Arc<Hub>, socket: Socket) -> RunningSocket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Outgoing>(OUTGOING_CAPACITY);
        let stop = self.shutdown.child_token();
        let readable: Readable = Arc::new(RwLock::new(Arc::new(socket.readable.clone())));
        let running = RunningSocket {
            id,
            target: socket.target.clone(),
            address: socket.address.clone(),
            headers: socket.headers.clone(),
            subscribe: socket.subscribe.clone(),
            readable: readable.clone(),
            outgoing: tx,
            stop: stop.clone(),
        };
        let task = SocketTask {
            hub: hub.clone(),
            key: self.key.clone(),
            url: format!("{}{}", self.base_url, socket.target),
            socket,
            readable,
            id,
            states: self.states.clone(),
        };
        self.tracker.spawn(task.run(rx, stop));
        running
    }

    /// Points publishing at the sockets running now.
    fn publish_to(&self, running: &[RunningSocket]) {
        let senders = running
            .iter()
            .map(|s| (s.address.clone(), (s.id, s.outgoing.clone())))
            .collect();
        *self.senders.write().unwrap_or_else(|p| p.into_inner()) = senders;
    }
}

impl crate::hub::RouteFollower for WsFollower {
    fn follow_routes(&self, hub: &Hub) {
        let Some(owned) = self.hub.upgrade() else {
            return;
        };
        let planned = WsConnector::build(hub, self.side.clone(), &self.routes_config).sockets;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let (mut closed, mut opened) = (0, 0);
        running.retain(|r| {
            let keep = planned.iter().any(|p| r.is_session_of(p));
            if !keep {
                r.stop.cancel();
                self.states.forget(r.id);
                closed += 1;
            }
            keep
        });
        for socket in planned {
            match running.iter().find(|r| r.is_session_of(&socket)) {
                Some(r) => {
                    *r.readable.write().unwrap_or_else(|p| p.into_inner()) =
                        Arc::new(socket.readable);
                }
                None => {
                    running.push(self.open(&owned, socket));
                    opened += 1;
                }
            }
        }
        self.publish_to(&running);
        tracing::info!(
            server = %self.key,
            opened,
            closed,
            kept = running.len() - opened,
            "WebSocket connector follows the document's new routes"
        );
    }
}

/// Which sockets of a server are up (by socket id, once each has tried); the server counts as
/// connected when all are.
struct SocketStates {
    key: ServerKey,
    connections: Connections,
    connected: Mutex<BTreeMap<u64, bool>>,
    /// What was last reported, so that a server that stays down is not reported at every retry.
    reported: Mutex<Option<bool>>,
}

impl SocketStates {
    fn set(&self, id: u64, up: bool, error: Option<String>) {
        let all_up = match self.connected.lock() {
            Ok(mut states) => {
                states.insert(id, up);
                states.values().all(|s| *s)
            }
            Err(_) => false,
        };
        self.report(all_up, error);
    }

    /// A socket closed for good: the server's state is that of the others.
    fn forget(&self, id: u64) {
        let all_up = match self.connected.lock() {
            Ok(mut states) => {
                states.remove(&id);
                states.values().all(|s| *s)
            }
            Err(_) => false,
        };
        self.report(all_up, None);
    }

    fn report(&self, all_up: bool, error: Option<String>) {
        let changed = match self.reported.lock() {
            Ok(mut last) => last.replace(all_up) != Some(all_up),
            Err(_) => true,
        };
        if changed {
            self.connections.report(&self.key, "ws", all_up, error);
        } else if let Some(e) = error {
            tracing::debug!(server = %self.key, error = %e, "WebSocket upstream still down");
        }
    }

    fn is_up(&self, id: u64) -> bool {
        self.connected
            .lock()
            .map(|s| s.get(&id).copied().unwrap_or(false))
            .unwrap_or(false)
    }
}

struct SocketTask {
    hub: Arc<Hub>,
    key: ServerKey,
    url: String,
    socket: Socket,
    readable: Readable,
    id: u64,
    states: Arc<SocketStates>,
}

impl SocketTask {
    async fn run(self, mut outgoing: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let server: Arc<str> = self.key.server.clone().into();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.connect() => c,
            };
            let reason = match connected {
                Ok(stream) => {
                    backoff.reset();
                    self.states.set(self.id, true, None);
                    tracing::info!(server = %self.key, url = %self.url, "WebSocket upstream connected");
                    match self
                        .session(stream, &mut outgoing, &server, &shutdown)
                        .await
                    {
                        None => return,
                        Some(reason) => reason,
                    }
                }
                Err(reason) => reason,
            };
            self.states.set(self.id, false, Some(reason));
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(
        &self,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        String,
    > {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad URL: {e}"))?;
        for (name, value) in &self.socket.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header name '{name}': {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("header '{name}' has a value that is not valid"))?;
            request.headers_mut().insert(name, value);
        }
        let (stream, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        Ok(stream)
    }

    /// Runs one connection: `None` on shutdown, else why it ended.
    async fn session(
        &self,
        stream: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        outgoing: &mut mpsc::Receiver<Outgoing>,
        server: &Arc<str>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let (mut sink, mut source) = stream.split();
        for frame in &self.socket.subscribe {
            if let Err(e) = sink.send(Message::text(frame.clone())).await {
                return Some(format!("sending a subscribe frame: {e}"));
            }
        }
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        let mut last_seen = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return None;
                }
                frame = source.next() => {
                    last_seen = Instant::now();
                    let payload = match frame {
                        Some(Ok(Message::Text(text))) => Bytes::from(text.as_str().to_owned()),
                        Some(Ok(Message::Binary(data))) => data,
                        Some(Ok(Message::Ping(data))) => {
                            let _ = sink.send(Message::Pong(data)).await;
                            continue;
                        }
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(close))) => {
                            return Some(match close {
                                Some(c) => format!("closed by the server: {} {}", c.code, c.reason),
                                None => "closed by the server".into(),
                            });
                        }
                        Some(Err(e)) => return Some(e.to_string()),
                        None => return Some("connection ended".into()),
                    };
                    self.dispatch(payload, server).await;
                }
                Some((text, done)) = outgoing.recv() => {
                    let result = sink.send(Message::text(text)).await.map_err(|e| {
                        PublishError::Refused { server: self.key.server.clone(), reason: e.to_string() }
                    });
                    let failed = result.is_err();
                    let _ = done.send(result);
                    if failed {
                        return Some("write failed".into());
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > SILENCE_LIMIT {
                        return Some(format!("no frame for {SILENCE_LIMIT:?}"));
                    }
                    if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                        return Some(e.to_string());
                    }
                }
            }
        }
    }

    /// Gives a received frame to the route whose messages it matches.
    async fn dispatch(&self, payload: Bytes, server: &Arc<str>) {
        let readable = self
            .readable
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let target = match readable.as_slice() {
            [] => None,
            [only] => Some(only),
            several => several
                .iter()
                .find(|(live, _)| matches!(live.route().validate(&payload), Ok(Some(_))))
                .or_else(|| several.first()),
        };
        let Some((live, params)) = target else {
            MessageUnmatched {
                server,
                address: &self.socket.address,
            }
            .emit();
            return;
        };
        let envelope = Envelope::new(
            live.id().clone(),
            self.socket.address.clone(),
            params.clone(),
            payload,
            Origin::upstream(Transport::Ws, server.clone()),
        );
        // Nothing to acknowledge upstream: the log write is awaited only for its error.
        if let Err(e) = self.hub.ingest(live, envelope).await {
            tracing::error!(channel = %live.id(), error = %e, "cannot log a WebSocket frame; it is lost (the source cannot redeliver)");
        }
    }
}

struct WsPublisher {
    key: ServerKey,
    senders: Senders,
    states: Arc<SocketStates>,
}

impl Publisher for WsPublisher {
    fn is_connected(&self) -> bool {
        self.states
            .connected
            .lock()
            .map(|s| s.values().any(|up| *up))
            .unwrap_or(false)
    }

    fn publish(
        &self,
        _upstream: &crate::routing::Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let server = self.key.server.clone();
        let sender = self
            .senders
            .read()
            .ok()
            .and_then(|s| s.get(&message.address).cloned());
        let Some((id, tx)) = sender else {
            let reason = format!(
                "the gateway has no connection for address '{}' (configure it under routes.{}.connect)",
                message.address, message.route.id
            );
            return async move { Err(PublishError::Refused { server, reason }) }.boxed();
        };
        if !self.states.is_up(id) {
            return async move { Err(PublishError::NotConnected { server }) }.boxed();
        }
        let text = String::from_utf8_lossy(&message.payload).into_owned();
        let (done, written) = oneshot::channel();
        let queued = tx.try_send((text, done));
        async move {
            if queued.is_err() {
                return Err(PublishError::Overloaded { server });
            }
            written
                .await
                .unwrap_or(Err(PublishError::NotConnected { server }))
        }
        .boxed()
    }
}

/// Upstream WebSocket APIs: `ws` and `wss` servers, connected to as a client.
pub struct WebSocket;

impl crate::connectors::Connector for WebSocket {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn protocols(&self) -> &'static [crate::spec::Protocol] {
        &[crate::spec::Protocol::Ws, crate::spec::Protocol::Wss]
    }

    fn bindings(&self) -> &dyn crate::routing::BindingReader {
        &WsBindings
    }

    fn follows_routes(&self) -> bool {
        true
    }

    fn start(&self, cx: crate::connectors::StartContext<'_>) -> Result<bool, String> {
        let side = ClientSide::new(cx.key.clone(), cx.server, cx.overrides);
        tracing::info!(server = %cx.key, url = %side.base_url, "starting WebSocket connector");
        WsConnector::build(cx.hub, side, &cx.config.routes).start(
            cx.hub.clone(),
            cx.shutdown.clone(),
            cx.tracker,
        );
        Ok(true)
    }
}
