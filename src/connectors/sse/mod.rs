//! Server-Sent Events streams run by others: an HTTP(S) channel marked as an event stream
//! (`x-stepflow-sse: true`, or `text/event-stream` as a content type) is read with a long GET.
//!
//! Each event becomes an envelope on the route, with its `event:` name and `id:` as the headers
//! `sse_event` and `sse_id` (the name also picks the message: a message's `name`, else its id).
//! After a drop the stream is reopened with `Last-Event-ID` set to the last id seen — also after
//! a restart, since the id is read back from the route's log — after the server's `retry:` delay
//! when it sent one, else with backoff. A 204 answer means "stop" (the SSE spec): the stream is
//! not reopened. The source cannot redeliver what the gateway missed while down, beyond what the
//! server keeps for `Last-Event-ID`: such routes are at-most-once.
//!
//! A replaced document is followed in place ([`SseFollower`]): streams whose route, URL,
//! headers and event names are unchanged stay open; new ones open, gone ones close.

mod binding;

pub use binding::{HttpBindings, SseRoute};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server_access::ClientSide;
use crate::config::RouteFileConfig;
use crate::hub::{Hub, LiveRoute};
use crate::routing::address::Params;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::upstream::{Backoff, Connections, ServerKey, describe_http_error};

/// One stream: a route at one concrete address.
struct Stream {
    live: Arc<LiveRoute>,
    params: Params,
    address: String,
    url: String,
    headers: Vec<(String, String)>,
    /// `event:` name → message id.
    events: Vec<(String, String)>,
}

impl Stream {
    /// What the stream's session is made of: a stream whose identity is unchanged after a
    /// replacement keeps running.
    fn identity(&self) -> StreamIdentity {
        StreamIdentity {
            route: self.live.id().to_string(),
            url: self.url.clone(),
            headers: self.headers.clone(),
            events: self.events.clone(),
        }
    }
}

#[derive(PartialEq)]
struct StreamIdentity {
    route: String,
    url: String,
    headers: Vec<(String, String)>,
    events: Vec<(String, String)>,
}

/// One HTTP server's event streams.
pub struct SseConnector {
    key: ServerKey,
    base_url: String,
    optional: bool,
    streams: Vec<Stream>,
    side: ClientSide,
    routes_config: BTreeMap<String, RouteFileConfig>,
}

impl SseConnector {
    pub fn build(
        hub: &Hub,
        side: ClientSide,
        routes_config: &BTreeMap<String, RouteFileConfig>,
    ) -> SseConnector {
        let key = &side.key;
        let mut streams = Vec::new();
        for live in hub.routes().filter(|r| r.route().api == key.api) {
            let route = &live.route();
            let Some(sse) =
                route
                    .upstreams
                    .iter()
                    .find_map(|u| match u.binding.get::<SseRoute>() {
                        Some(s) if u.server == key.server => Some(s),
                        _ => None,
                    })
            else {
                continue;
            };
            if !route.direction.readable {
                if route.direction.writable {
                    tracing::warn!(channel = %route.id, "an event stream cannot be written to; the route serves web clients and the log only");
                }
                continue;
            }
            let Some(addresses) = side.addresses(route, &sse.path, routes_config) else {
                continue;
            };
            let access = side
                .access
                .clone()
                .with_binding(sse.query.as_ref(), sse.headers.as_ref());
            for (address, params) in addresses {
                streams.push(Stream {
                    live: live.clone(),
                    params,
                    url: format!("{}{}", side.base_url, access.path_and_query(&address)),
                    address,
                    headers: access.headers.clone(),
                    events: sse.events.clone(),
                });
            }
        }
        SseConnector {
            key: side.key.clone(),
            base_url: side.base_url.clone(),
            optional: side.optional,
            streams,
            side,
            routes_config: routes_config.clone(),
        }
    }

    pub fn start(self, hub: Arc<Hub>, shutdown: CancellationToken, tracker: &TaskTracker) {
        let connections = hub.connections().clone();
        // Nothing to acknowledge upstream: the intake handle stays unused.
        connections.register_with(
            self.key.clone(),
            "sse",
            self.base_url.clone(),
            self.optional,
            crate::upstream::DEFAULT_STALL_AFTER,
        );
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A stream is idle between events; a server that sends nothing (not even a
            // comment) for this long is presumed gone.
            .read_timeout(Duration::from_secs(120))
            .build();
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                connections.report(&self.key, "sse", false, Some(e.to_string()));
                return;
            }
        };
        let follower = SseFollower {
            hub: Arc::downgrade(&hub),
            key: self.key.clone(),
            side: self.side,
            routes_config: self.routes_config,
            client,
            shutdown,
            tracker: tracker.clone(),
            running: Mutex::new(Vec::new()),
        };
        for stream in self.streams {
            follower.open(&hub, stream);
        }
        hub.register_follower(self.key, Arc::new(follower));
    }
}

/// Takes up a replaced document's routes without touching the streams that stay: a stream
/// whose route, URL, headers and event names are unchanged keeps its session (and what the
/// server would send meanwhile); a new one opens, one no route wants closes.
struct SseFollower {
    /// Weak: the hub holds the follower.
    hub: Weak<Hub>,
    key: ServerKey,
    side: ClientSide,
    routes_config: BTreeMap<String, RouteFileConfig>,
    client: reqwest::Client,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    running: Mutex<Vec<(StreamIdentity, CancellationToken)>>,
}

impl SseFollower {
    fn open(&self, hub: &Arc<Hub>, stream: Stream) {
        let stop = self.shutdown.child_token();
        let identity = stream.identity();
        let task = StreamTask {
            hub: hub.clone(),
            key: self.key.clone(),
            client: self.client.clone(),
            connections: hub.connections().clone(),
            stream,
        };
        self.tracker.spawn(task.run(stop.clone()));
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((identity, stop));
    }
}

impl crate::hub::RouteFollower for SseFollower {
    fn follow_routes(&self, hub: &Hub) {
        let Some(owned) = self.hub.upgrade() else {
            return;
        };
        let planned = SseConnector::build(hub, self.side.clone(), &self.routes_config).streams;
        let wanted: Vec<StreamIdentity> = planned.iter().map(Stream::identity).collect();
        let mut closed = 0;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(identity, stop)| {
                let keep = wanted.contains(identity);
                if !keep {
                    stop.cancel();
                    closed += 1;
                }
                keep
            });
        let mut opened = 0;
        for stream in planned {
            let identity = stream.identity();
            let running = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(i, _)| *i == identity);
            if !running {
                self.open(&owned, stream);
                opened += 1;
            }
        }
        tracing::info!(
            server = %self.key,
            opened,
            closed,
            "SSE connector follows the document's new routes"
        );
    }
}

struct StreamTask {
    hub: Arc<Hub>,
    key: ServerKey,
    client: reqwest::Client,
    connections: Connections,
    stream: Stream,
}

/// Why a stream session ended.
enum Ended {
    Shutdown,
    /// The server answered 204: do not reconnect.
    Stop,
    Dropped(String),
}

impl StreamTask {
    async fn run(self, shutdown: CancellationToken) {
        let server: Arc<str> = self.key.server.clone().into();
        let mut last_id = self.last_logged_id().await;
        let mut retry: Option<Duration> = None;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut up = false;
        let mut reported_down = false;
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => Ended::Shutdown,
                ended = self.session(&server, &mut last_id, &mut retry, &mut backoff, &mut up) => ended,
            };
            match ended {
                Ended::Shutdown => return,
                Ended::Stop => {
                    tracing::warn!(server = %self.key, url = %self.stream.url, "the server answered 204: the stream is not reopened");
                    self.connections.report(
                        &self.key,
                        "sse",
                        false,
                        Some("stopped by the server (204)".into()),
                    );
                    return;
                }
                Ended::Dropped(reason) => {
                    // Reported when it goes down, not at every failed retry.
                    if up || !reported_down {
                        self.connections
                            .report(&self.key, "sse", false, Some(reason));
                        reported_down = true;
                    } else {
                        tracing::debug!(server = %self.key, error = %reason, "event stream still down");
                    }
                    up = false;
                }
            }
            // The server's `retry:` wins over our backoff (the SSE reconnection time).
            let delay = retry.unwrap_or_else(|| backoff.next_delay());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The `sse_id` of the newest logged message of the route, so that a restart resumes.
    async fn last_logged_id(&self) -> Option<String> {
        let store = self.hub.store();
        let log = &self.stream.live.log;
        let last = store.log_stats(log).last_offset?;
        let messages = store.read(log, last, 1).await.ok()?;
        messages
            .first()
            .and_then(|m| m.envelope.header("sse_id").map(str::to_owned))
    }

    async fn session(
        &self,
        server: &Arc<str>,
        last_id: &mut Option<String>,
        retry: &mut Option<Duration>,
        backoff: &mut Backoff,
        up: &mut bool,
    ) -> Ended {
        let mut request = self
            .client
            .get(&self.stream.url)
            .header("accept", "text/event-stream")
            .header("cache-control", "no-cache");
        for (name, value) in &self.stream.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(id) = last_id.as_deref() {
            request = request.header("last-event-id", id);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Ended::Dropped(describe_http_error(&e)),
        };
        let status = response.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ended::Stop;
        }
        if !status.is_success() {
            return Ended::Dropped(format!("HTTP {status}"));
        }
        backoff.reset();
        *up = true;
        self.connections.report(&self.key, "sse", true, None);
        tracing::info!(server = %self.key, url = %self.stream.url, last_event_id = ?last_id, "event stream open");
        // eventsource-stream drops a `retry:` sent in a block without data (servers often send
        // it alone, first); the SSE spec applies it anyway, so the lines are also read here.
        let retry_ms = Arc::new(AtomicU64::new(0));
        let tap = retry_ms.clone();
        let mut lines = RetryLines::default();
        let bytes = response.bytes_stream().map(move |chunk| {
            if let Ok(chunk) = &chunk
                && let Some(r) = lines.feed(chunk)
            {
                tap.store(r.as_millis() as u64, Ordering::Relaxed);
            }
            chunk
        });
        let mut events = bytes.eventsource();
        let ended = loop {
            let event = match events.next().await {
                Some(Ok(e)) => e,
                Some(Err(e)) => break Ended::Dropped(e.to_string()),
                None => break Ended::Dropped("the server ended the stream".into()),
            };
            if !event.id.is_empty() {
                *last_id = Some(event.id.clone());
            }
            if event.data.is_empty() {
                continue;
            }
            self.ingest(event, server).await;
        };
        match retry_ms.load(Ordering::Relaxed) {
            0 => {}
            ms => *retry = Some(Duration::from_millis(ms)),
        }
        ended
    }

    async fn ingest(&self, event: eventsource_stream::Event, server: &Arc<str>) {
        let live = &self.stream.live;
        let mut envelope = Envelope::new(
            live.id().clone(),
            self.stream.address.clone(),
            self.stream.params.clone(),
            Bytes::from(event.data),
            Origin::upstream(Transport::Sse, server.clone()),
        );
        // SSE's default event type is "message".
        let name = if event.event.is_empty() {
            "message".to_owned()
        } else {
            event.event
        };
        if let Some((_, message)) = self.stream.events.iter().find(|(n, _)| *n == name) {
            envelope
                .headers
                .push(("asyncapi_message".into(), message.clone()));
        }
        envelope.headers.push(("sse_event".into(), name));
        if !event.id.is_empty() {
            envelope.headers.push(("sse_id".into(), event.id));
        }
        if let Err(e) = self.hub.ingest(live, envelope).await {
            tracing::error!(channel = %live.id(), error = %e, "cannot log an event; it is lost unless the server replays it");
        }
    }
}

/// Reads `retry:` fields off the raw stream, across chunk boundaries.
#[derive(Default)]
struct RetryLines {
    partial: Vec<u8>,
}

impl RetryLines {
    /// The last `retry:` value in the complete lines of `chunk` (and what came before it).
    fn feed(&mut self, chunk: &[u8]) -> Option<Duration> {
        let mut latest = None;
        for &b in chunk {
            if b == b'\n' || b == b'\r' {
                latest = retry_value(&self.partial).or(latest);
                self.partial.clear();
            } else if self.partial.len() < 64 {
                // Only short lines can be `retry:` lines; the rest need not be kept.
                self.partial.push(b);
            }
        }
        latest
    }
}

fn retry_value(line: &[u8]) -> Option<Duration> {
    let value = line.strip_prefix(b"retry:")?;
    let value = value.strip_prefix(b" ").unwrap_or(value);
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// HTTP servers: event streams are kept open (SSE); operations are called per request by
/// `calls`, so a server with no stream needs no connection.
pub struct Http;

impl crate::connectors::Connector for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn protocols(&self) -> &'static [crate::spec::Protocol] {
        &[crate::spec::Protocol::Http, crate::spec::Protocol::Https]
    }

    fn bindings(&self) -> &dyn crate::routing::BindingReader {
        &HttpBindings
    }

    fn follows_routes(&self) -> bool {
        true
    }

    fn start(&self, cx: crate::connectors::StartContext<'_>) -> Result<bool, String> {
        let streams = cx.hub.routes().any(|r| {
            r.route().api == cx.key.api
                && r.route()
                    .upstreams
                    .iter()
                    .any(|u| u.server == cx.key.server && u.binding.get::<SseRoute>().is_some())
        });
        if !streams {
            return Ok(false);
        }
        let side = ClientSide::new(cx.key.clone(), cx.server, cx.overrides);
        tracing::info!(server = %cx.key, url = %side.base_url, "starting SSE connector");
        SseConnector::build(cx.hub, side, &cx.config.routes).start(
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

    #[test]
    fn retry_lines_are_read_across_chunks_and_only_when_well_formed() {
        let mut lines = RetryLines::default();
        assert_eq!(
            lines.feed(b"retry: 15"),
            None,
            "the line is not complete yet"
        );
        assert_eq!(lines.feed(b"00\n\n"), Some(Duration::from_millis(1500)));
        assert_eq!(
            lines.feed(b"retry:20\r\ndata: x\n\n"),
            Some(Duration::from_millis(20))
        );
        assert_eq!(lines.feed(b"retry: soon\n"), None);
        assert_eq!(lines.feed(b"data: retry: 5\n"), None);
    }
}
