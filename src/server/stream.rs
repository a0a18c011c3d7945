//! Live streams for web clients: WebSocket (`/ws/{channel}`) and SSE (`/sse/{channel}`).
//!
//! Both replay from the log when asked (`?from=`, SSE `Last-Event-ID`) and then go live with no
//! gap and no duplicate; a client that falls behind is told (`lagged`) and resumed from the log.
//! Both select on the shutdown token: axum does not wait for upgraded sockets or endless SSE
//! bodies, so they close themselves (WebSocket close 1001, end of the SSE stream).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use serde_json::json;

use super::AppState;
use super::api::route_or_404;
use super::auth::count_denial;
use super::error::{ApiError, ErrorCode};
use crate::auth::{Need, Principal};
use crate::hub::{LiveRoute, PublishRequest, Subscription, SubscriptionEvent};
use crate::routing::envelope::{Delivered, Origin, Transport};
use crate::routing::filter::Filter;
use crate::telemetry::events::{SubscriberGauge, SubscriberLagged};

use super::limits;

/// SSE keep-alive comment interval (proxies close idle connections).
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

fn parse_from(params: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match params.get("from") {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("`from` must be an offset (a number), not '{v}'"))
        }),
    }
}

fn lagged_notice(skipped: u64, resume_from: u64) -> String {
    json!({"type": "lagged", "skipped": skipped, "resumeFrom": resume_from}).to_string()
}

/// Tells a client that retention removed messages it asked for. A durable subscription's loss is
/// counted and logged, and its cursor moves past the gap, so the next attach does not meet (and
/// count) it again.
fn expired_notice(
    state: &AppState,
    route: &LiveRoute,
    durable: Option<&Durable>,
    missed: u64,
    resume_from: u64,
) -> String {
    if let Some(d) = durable {
        let _ = state.subscriptions.ack(&d.name, resume_from - 1);
        tracing::warn!(subscription = %d.name, channel = %route.id(), missed, resume_from, "retention removed messages this durable subscription had not received");
        metrics::counter!(crate::telemetry::SUBSCRIPTION_MESSAGES, "subscription" => d.name.clone(), "outcome" => "expired")
            .increment(missed);
    }
    json!({"type": "expired", "missed": missed, "resumeFrom": resume_from}).to_string()
}

/// Records the delivery of `message`: every one is counted; its latency is recorded for live
/// messages only (replayed ones did not just arrive), and at most every
/// `LATENCY_SAMPLE_INTERVAL` per client.
fn delivered(
    route: &LiveRoute,
    message: &Delivered,
    live: bool,
    transport: Transport,
    sampler: &mut LatencySampler,
) {
    let latency = live
        .then(|| sampler.sample(message.envelope.ingress))
        .flatten();
    route.metrics.message_delivered(transport, latency);
}

/// The shortest time between two latency samples of one client. The histogram keeps every
/// sample until the next upkeep (5 s): 10,000 clients at 100 msg/s recorded 1M samples a
/// second, 64 MB held between two upkeeps. Ten a second per client still measures every
/// client of an ordinary route at every message, and a large fan-out at a sample of them.
const LATENCY_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// When a client's delivery latency was last recorded.
#[derive(Default)]
struct LatencySampler(Option<std::time::Instant>);

impl LatencySampler {
    /// The latency of a message that entered at `ingress`, when it is time for a sample.
    fn sample(&mut self, ingress: std::time::Instant) -> Option<Duration> {
        let now = std::time::Instant::now();
        if self
            .0
            .is_some_and(|last| now.duration_since(last) < LATENCY_SAMPLE_INTERVAL)
        {
            return None;
        }
        self.0 = Some(now);
        Some(now.saturating_duration_since(ingress))
    }
}

#[utoipa::path(get, path = "/ws/{id}", operation_id = "stream_websocket", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`"), ("from" = Option<u64>, Query, description = "Replay from this offset, then live"), ("subscription" = Option<String>, Query, description = "A durable subscription to attach to")), responses((status = 101, description = "Upgraded to a WebSocket of frames"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn websocket(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let route = route_or_404(&state, &id)?;
    let durable = durable_subscription(&state, &params, &id)?;
    let from = match &durable {
        Some(d) => Some(d.cursor),
        None => parse_from(&params)?,
    };
    let subscription = if route.route().direction.readable {
        Some(state.hub.subscribe(&route, from).await?)
    } else {
        None
    };
    let connection = state.connection_ids.fetch_add(1, Ordering::Relaxed) + 1;
    let upgrade = state
        .limits
        .websocket(upgrade, state.hub.config().max_payload_bytes);
    Ok(upgrade.on_upgrade(move |socket| {
        ws_session(
            socket,
            state,
            principal,
            route,
            subscription,
            durable,
            params,
            connection,
        )
    }))
}

/// A durable subscription a stream attaches to (`?subscription=name`).
struct Durable {
    name: String,
    cursor: u64,
    filter: Option<Filter>,
}

impl Durable {
    fn passes(&self, message: &Delivered) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.matches(message).unwrap_or(false))
    }
}

fn durable_subscription(
    state: &AppState,
    params: &HashMap<String, String>,
    channel: &str,
) -> Result<Option<Durable>, ApiError> {
    let Some(name) = params.get("subscription") else {
        return Ok(None);
    };
    let def = state
        .subscriptions
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no subscription '{name}'")))?;
    if def.channel != channel {
        return Err(ApiError::bad_request(format!(
            "subscription '{name}' is on channel '{}', not '{channel}'",
            def.channel
        )));
    }
    Ok(Some(Durable {
        filter: state.subscriptions.filter(name),
        name: def.name,
        cursor: def.cursor,
    }))
}

/// `{"ack": offset}`: a durable subscriber's acknowledgement.
pub(crate) fn parse_ack(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ack {
        ack: u64,
    }
    serde_json::from_slice::<Ack>(payload).ok().map(|a| a.ack)
}

/// Sleeps until `principal`'s credential expires (forever when it does not). The leeway
/// tokens get when checked does not extend a stream: it ends at `exp` itself.
async fn credential_expiry(principal: &Principal) {
    match principal.expires_in() {
        Some(left) => tokio::time::sleep(left).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn ws_session(
    socket: WebSocket,
    state: AppState,
    principal: Principal,
    route: Arc<LiveRoute>,
    mut subscription: Option<Subscription>,
    durable: Option<Durable>,
    mut params: HashMap<String, String>,
    connection: u64,
) {
    params.remove("from");
    params.remove("subscription");
    let _gauge = SubscriberGauge::attach(route.id(), Transport::Ws);
    let (mut sink, mut incoming) = socket.split();
    let idle_timeout = state.limits.ws_idle_timeout;
    let mut ping = tokio::time::interval(limits::ping_interval(idle_timeout));
    ping.tick().await;
    // Anything from the client (a pong included) shows it is there.
    let mut last_heard = tokio::time::Instant::now();
    let mut sampler = LatencySampler::default();
    let reason = loop {
        tokio::select! {
            // Shutdown: close with "going away" so clients reconnect elsewhere or later.
            _ = state.shutdown.cancelled() => {
                break Some(CloseFrame { code: close_code::AWAY, reason: "server shutting down".into() });
            }
            // A stream outlives no token: the client reconnects with a fresh one and resumes.
            _ = credential_expiry(&principal) => {
                count_denial("token_expired");
                tracing::info!(principal = %principal.id, channel = %route.id(), "stream closed: token expired");
                break Some(CloseFrame { code: close_code::POLICY, reason: "token expired".into() });
            }
            // The channel's document was removed (or replaced without it): nothing more comes.
            _ = route.removed() => {
                break Some(CloseFrame { code: close_code::AWAY, reason: "channel removed".into() });
            }
            // The next message for this client (cancel-safe: consumed only when returned).
            event = async {
                match subscription.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // Everything ready goes out with one flush: a frame per `send` would cost a
                // write to the socket per message per client.
                let mut outgoing = ws_outgoing(event, &state, &route, durable.as_ref(), connection, &mut sampler);
                let mut fed = 0;
                let end = loop {
                    match outgoing {
                        Outgoing::Frame(frame) => {
                            if sink.feed(frame).await.is_err() {
                                break Some(None);
                            }
                            fed += 1;
                        }
                        Outgoing::Skip => {}
                        Outgoing::End { last, close } => {
                            if let Some(frame) = last {
                                let _ = sink.feed(frame).await;
                            }
                            break Some(close);
                        }
                    }
                    if fed >= FRAMES_PER_FLUSH {
                        break None;
                    }
                    match subscription.as_mut().and_then(Subscription::try_next) {
                        Some(next) => {
                            outgoing = ws_outgoing(Ok(Some(next)), &state, &route, durable.as_ref(), connection, &mut sampler);
                        }
                        None => break None,
                    }
                };
                if sink.flush().await.is_err() {
                    break None;
                }
                if let Some(reason) = end {
                    break reason;
                }
            }
            // A frame from the client: a message to publish, or control.
            message = incoming.next() => {
                last_heard = tokio::time::Instant::now();
                let payload = match message {
                    Some(Ok(Message::Text(text))) => bytes::Bytes::from(text),
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Err(e)) if limits::is_message_too_big(&e) => {
                        break Some(limits::too_big_close(state.limits.ws_max_message(state.hub.config().max_payload_bytes)));
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                };
                if let Some(d) = &durable
                    && let Some(offset) = parse_ack(&payload)
                {
                    if let Err(e) = state.subscriptions.ack(&d.name, offset) {
                        let error = ApiError::from(e);
                        if sink.send(Message::Text(error_frame(&error).into())).await.is_err() {
                            break None;
                        }
                    }
                    continue;
                }
                let need = Need::Publish(route.id().to_string());
                let reply = if principal.allows(&need) {
                    publish_frame(&state, &route, &params, payload, connection).await
                } else {
                    count_denial("forbidden");
                    error_frame(&ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Forbidden,
                        format!("missing scope '{need}'"),
                    ))
                };
                if sink.send(Message::Text(reply.into())).await.is_err() {
                    break None;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > idle_timeout {
                    limits::count_refusal("ws_idle");
                    break Some(CloseFrame { code: close_code::AWAY, reason: "idle timeout: no frame or pong from the client".into() });
                }
                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some(frame) = reason {
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
    let _ = sink.close().await;
}

/// Most frames written to a WebSocket before one flush, so a long backlog still reaches the
/// client in steady pieces.
const FRAMES_PER_FLUSH: usize = 64;

/// What one subscription event becomes on a WebSocket.
enum Outgoing {
    Frame(Message),
    /// Nothing for this client (its own message, or filtered out).
    Skip,
    /// The session ends: `last` is written before the close frame `close` (or none).
    End {
        last: Option<Message>,
        close: Option<CloseFrame>,
    },
}

fn ws_outgoing(
    event: Result<Option<SubscriptionEvent>, crate::store::Error>,
    state: &AppState,
    route: &LiveRoute,
    durable: Option<&Durable>,
    connection: u64,
    sampler: &mut LatencySampler,
) -> Outgoing {
    match event {
        Ok(Some(SubscriptionEvent::Message { message, live })) => {
            // Never echo a client's own messages back to it.
            if message.envelope.origin.connection == connection
                && message.envelope.origin.transport == Transport::Ws
            {
                return Outgoing::Skip;
            }
            if durable.is_some_and(|d| !d.passes(&message)) {
                return Outgoing::Skip;
            }
            delivered(route, &message, live, Transport::Ws, sampler);
            match Utf8Bytes::try_from(message.frame().clone()) {
                Ok(text) => Outgoing::Frame(Message::Text(text)),
                Err(_) => Outgoing::Skip,
            }
        }
        Ok(Some(SubscriptionEvent::Lagged {
            skipped,
            resume_from,
        })) => {
            SubscriberLagged {
                channel: route.id(),
                transport: Transport::Ws,
                skipped,
            }
            .emit();
            Outgoing::Frame(Message::Text(lagged_notice(skipped, resume_from).into()))
        }
        Ok(Some(SubscriptionEvent::Expired {
            missed,
            resume_from,
        })) => Outgoing::Frame(Message::Text(
            expired_notice(state, route, durable, missed, resume_from).into(),
        )),
        Ok(None) => Outgoing::End {
            last: None,
            close: Some(CloseFrame {
                code: close_code::AWAY,
                reason: "channel closed".into(),
            }),
        },
        Err(e) => {
            let error = ApiError::from(e);
            Outgoing::End {
                last: Some(Message::Text(error_frame(&error).into())),
                close: Some(CloseFrame {
                    code: close_code::ERROR,
                    reason: "message log failed".into(),
                }),
            }
        }
    }
}

fn error_frame(error: &ApiError) -> String {
    let mut body = error.body();
    body["type"] = json!("error");
    body["status"] = json!(error.status.as_u16());
    body.to_string()
}

/// Publishes one client frame; the reply frame is an ack with the offset or an error (the
/// socket stays open either way).
async fn publish_frame(
    state: &AppState,
    route: &LiveRoute,
    params: &HashMap<String, String>,
    payload: bytes::Bytes,
    connection: u64,
) -> String {
    if !route.route().direction.writable {
        let error = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("channel '{}' is not writable", route.id()),
        );
        return error_frame(&error);
    }
    let request = PublishRequest {
        payload,
        content_type: None,
        params: params.clone(),
        // `?x-header-<name>=value` on the WebSocket URL: headers for every published frame.
        headers: params
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("x-header-")?.to_owned(), v.clone())))
            .collect(),
        origin: Origin::client(Transport::Ws, connection),
        key: None,
    };
    match state.hub.publish(route.id(), request).await {
        Ok(published) => json!({
            "type": "ack",
            "offset": published.offset,
            "address": published.address,
        })
        .to_string(),
        Err(failure) => error_frame(&ApiError::from(failure)),
    }
}

#[utoipa::path(get, path = "/sse/{id}", operation_id = "stream_sse", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`"), ("from" = Option<u64>, Query, description = "Replay from this offset, then live"), ("subscription" = Option<String>, Query, description = "A durable subscription to attach to")), responses((status = 200, description = "An event stream of frames", body = String, content_type = "text/event-stream"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn sse(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let route = route_or_404(&state, &id)?;
    if !route.route().direction.readable {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("channel '{id}' is not readable (the application does not receive on it)"),
        ));
    }
    // A reconnecting EventSource sends Last-Event-ID and repeats the original URL, so the
    // header wins over `?from=`.
    let last_event_id = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::trim))
    {
        None => None,
        Some(Ok(v)) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("Last-Event-ID must be an offset, not '{v}'"))
        })?),
        Some(Err(_)) => return Err(ApiError::bad_request("Last-Event-ID is not text")),
    };
    let durable = durable_subscription(&state, &params, &id)?;
    let from = match (&durable, last_event_id) {
        // A durable subscriber's Last-Event-ID acknowledges everything up to it.
        (Some(d), Some(last)) => Some(state.subscriptions.ack(&d.name, last)?),
        (Some(d), None) => Some(d.cursor),
        (None, Some(id)) => Some(id + 1),
        (None, None) => parse_from(&params)?,
    };
    let subscription = state.hub.subscribe(&route, from).await?;
    let stream = sse_stream(state, principal, route, subscription, durable);
    Ok(event_stream(stream))
}

/// An endless `text/event-stream` response of the events `stream` yields, each already in the
/// wire format (a message's event is rendered once and shared by every subscriber).
fn event_stream(
    stream: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
            // nginx would otherwise hold events back to fill its buffer.
            (
                axum::http::HeaderName::from_static("x-accel-buffering"),
                "no",
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// A non-message event (`lagged`, `expired`, `removed`, `error`).
fn notice(event: &str, data: &str) -> Result<Bytes, Infallible> {
    Ok(crate::routing::envelope::sse_event(
        None,
        event,
        data.as_bytes(),
    ))
}

fn sse_stream(
    state: AppState,
    principal: Principal,
    route: Arc<LiveRoute>,
    mut subscription: Subscription,
    durable: Option<Durable>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    async_stream::stream! {
        let _gauge = SubscriberGauge::attach(route.id(), Transport::Sse);
        let mut sampler = LatencySampler::default();
        // A comment line when nothing went out for a while (proxies close idle connections):
        // one timer per client ticking at half the interval, not one reset per event.
        let mut keep_alive = tokio::time::interval(SSE_KEEP_ALIVE / 2);
        keep_alive.tick().await;
        let mut sent_since_tick = false;
        loop {
            let event = tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = credential_expiry(&principal) => {
                    count_denial("token_expired");
                    tracing::info!(principal = %principal.id, channel = %route.id(), "stream closed: token expired");
                    yield notice("error", &json!({"error": {"code": "token_expired", "message": "the token expired; reconnect with a fresh one"}}).to_string());
                    break;
                }
                _ = route.removed() => {
                    yield notice("removed", &json!({"channel": route.id(), "message": "the channel was removed from the gateway"}).to_string());
                    break;
                }
                _ = keep_alive.tick() => {
                    if !std::mem::take(&mut sent_since_tick) {
                        yield Ok(Bytes::from_static(b":\n\n"));
                    }
                    continue;
                }
                // Cancel-safe: an event is only consumed when returned.
                event = subscription.next() => event,
            };
            sent_since_tick = true;
            match event {
                Ok(Some(SubscriptionEvent::Message { message, live })) => {
                    if durable.as_ref().is_some_and(|d| !d.passes(&message)) {
                        continue;
                    }
                    delivered(&route, &message, live, Transport::Sse, &mut sampler);
                    yield Ok(message.sse_event().clone());
                }
                Ok(Some(SubscriptionEvent::Lagged { skipped, resume_from })) => {
                    SubscriberLagged { channel: route.id(), transport: Transport::Sse, skipped }.emit();
                    yield notice("lagged", &lagged_notice(skipped, resume_from));
                }
                Ok(Some(SubscriptionEvent::Expired { missed, resume_from })) => {
                    yield notice("expired", &expired_notice(&state, &route, durable.as_ref(), missed, resume_from));
                }
                Ok(None) => break,
                Err(e) => {
                    let error = ApiError::from(e);
                    yield notice("error", &error.body().to_string());
                    break;
                }
            }
        }
    }
}
