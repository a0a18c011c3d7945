//! The REST surface: channels, publish, replay, dead letters, connections, stats, health.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::hub::{LiveRoute, PublishRequest};
use crate::routing::Route;
use crate::routing::envelope::{Origin, Transport};
use crate::store::LogId;
use crate::upstream::{Connections, ServerKey};

/// A route as `/api/v1/channels` lists it. Each server's `url` is the one the gateway uses
/// (the config's override, when there is one); `documentUrl` is the document's own.
pub fn channel_view(route: &Route, subscribers: usize, connections: &Connections) -> Value {
    let servers: Vec<Value> = route
        .upstreams
        .iter()
        .map(|u| {
            let mut view = serde_json::to_value(u).unwrap_or(Value::Null);
            let key = ServerKey {
                api: route.api.clone(),
                server: u.server.clone(),
            };
            if let (Some(url), Some(obj)) = (connections.url(&key), view.as_object_mut()) {
                obj.insert("documentUrl".into(), json!(u.url));
                obj.insert("url".into(), json!(url));
            }
            view
        })
        .collect();
    json!({
        "id": route.id,
        "api": route.api,
        "channel": route.channel,
        "address": route.address,
        "direction": route.direction.as_str(),
        "readable": route.direction.readable,
        "writable": route.direction.writable,
        "delivery": route.delivery,
        "parameters": route.parameters,
        "servers": servers,
        "messages": route.messages,
        "requestReply": route.request_reply,
        "liveSubscribers": subscribers,
    })
}

#[utoipa::path(get, path = "/api/v1/channels", operation_id = "api_list_channels", tag = "channels", responses((status = 200, description = "Every route", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn list_channels(State(state): State<AppState>) -> Json<Value> {
    let channels: Vec<Value> = state
        .hub
        .routes()
        .map(|r| channel_view(&r.route(), r.live_subscribers(), state.hub.connections()))
        .collect();
    Json(json!({ "channels": channels }))
}

pub fn route_or_404(state: &AppState, id: &str) -> Result<Arc<LiveRoute>, ApiError> {
    state
        .hub
        .route(id)
        .ok_or_else(|| ApiError::not_found(format!("no channel '{id}'")))
}

#[utoipa::path(get, path = "/api/v1/channels/{id}", operation_id = "api_get_channel", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`")), responses((status = 200, description = "The route, its log and its upstreams", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn get_channel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let route = route_or_404(&state, &id)?;
    let log = state.hub.store().log_stats(&route.log);
    let dead = state.hub.store().log_stats(&route.dead_letters);
    let mut view = channel_view(
        &route.route(),
        route.live_subscribers(),
        state.hub.connections(),
    );
    view["log"] = json!(log);
    view["deadLetters"] = json!(dead);
    Ok(Json(view))
}

/// Reads the body up to the payload limit: over it is 413, not a truncated message; one that
/// does not arrive within the body read timeout is 408.
pub async fn read_body(
    body: Body,
    limit: usize,
    limits: &super::limits::Limits,
) -> Result<Bytes, ApiError> {
    let timeout = limits.body_read_timeout;
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            super::limits::count_refusal("body_timeout");
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestTimeout,
                format!("the request body did not arrive within {timeout:?}"),
            )
        })?;
    read.map_err(|e| {
        let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
            .any(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            super::limits::count_refusal("body_size");
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("payload exceeds the limit of {limit} bytes"),
            )
            .with_details(json!({ "limit": limit }))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/messages", operation_id = "api_publish", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`")), request_body(content = Value, content_type = "application/json"), responses((status = 202, description = "Acknowledged upstream and in the log: `{offset, address}`", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn publish(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let route = route_or_404(&state, &id)?;
    if !route.route().direction.writable {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("channel '{id}' is not writable (the application does not send on it)"),
        ));
    }
    let limit = state.hub.config().max_payload_bytes;
    let payload = match read_body(body, limit, &state.limits).await {
        Ok(payload) => payload,
        Err(e) if e.status == StatusCode::PAYLOAD_TOO_LARGE => {
            // Refused before the hub sees it; counted like the hub's own refusals.
            crate::telemetry::events::MessageRejected {
                channel: route.id(),
                transport: Transport::Http,
                reason: crate::telemetry::events::RejectReason::TooLarge,
                detail: "body over the payload limit",
            }
            .emit();
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    // `X-Header-<name>: value` request headers become message headers `<name>: value`.
    let message_headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let name = name.as_str().strip_prefix("x-header-")?;
            Some((name.to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let published = state
        .hub
        .publish(
            &id,
            PublishRequest {
                payload,
                content_type,
                params,
                headers: message_headers,
                origin: Origin::client(Transport::Http, 0),
                key: None,
            },
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(published)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ReplayQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

/// Most messages one replay request returns.
const REPLAY_LIMIT_MAX: usize = 1000;

impl ReplayQuery {
    /// `from` (default the first offset) and `limit` (default 100, at most 1000).
    pub fn window(&self) -> (u64, usize) {
        (
            self.from.unwrap_or(1),
            self.limit.unwrap_or(100).clamp(1, REPLAY_LIMIT_MAX),
        )
    }
}

async fn replay(
    state: &AppState,
    id: &str,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
    dead_letters: bool,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let route = route_or_404(state, id)?;
    let log: &LogId = if dead_letters {
        &route.dead_letters
    } else {
        &route.log
    };
    let (from, limit) = query.window();
    let messages = state.hub.store().read(log, from, limit).await?;
    let next = messages.last().map_or(from, |m| m.offset + 1);
    // The frames are already JSON: splice them in instead of parsing them back.
    let mut body =
        Vec::with_capacity(64 + messages.iter().map(|m| m.frame().len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"channel\":");
    body.extend_from_slice(&serde_json::to_vec(id).unwrap_or_default());
    body.extend_from_slice(b",\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(m.frame());
    }
    body.extend_from_slice(format!("],\"next\":{next}}}").as_bytes());
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(get, path = "/api/v1/channels/{id}/messages", operation_id = "api_replay_messages", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`"), ("from" = Option<u64>, Query, description = "The first offset"), ("limit" = Option<u64>, Query, description = "At most this many")), responses((status = 200, description = "`{messages, next}`", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn replay_messages(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    replay(&state, &id, query, false).await
}

#[utoipa::path(get, path = "/api/v1/channels/{id}/dead-letters", operation_id = "api_replay_dead_letters", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`"), ("from" = Option<u64>, Query, description = "The first offset"), ("limit" = Option<u64>, Query, description = "At most this many")), responses((status = 200, description = "`{messages, next}`", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn replay_dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    replay(&state, &id, query, true).await
}

#[utoipa::path(get, path = "/api/v1/connections", operation_id = "api_connections", tag = "status", responses((status = 200, description = "Every upstream connection", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn connections(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "connections": state.hub.connections().snapshot() }))
}

#[utoipa::path(get, path = "/api/v1/stats", operation_id = "api_stats", tag = "status", responses((status = 200, description = "Logs, store and process", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut channels = Vec::new();
    for route in state.hub.routes() {
        channels.push(json!({
            "id": route.id(),
            "log": state.hub.store().log_stats(&route.log),
            "deadLetters": state.hub.store().log_stats(&route.dead_letters),
            "liveSubscribers": route.live_subscribers(),
        }));
    }
    let sample = crate::telemetry::resources::sample(state.hub.store()).await;
    Ok(Json(json!({
        "channels": channels,
        // bytesOnDisk: sled's files (logs, state, and space not yet reclaimed); logBytes: what the
        // logs' chunks take.
        "store": {
            "bytesOnDisk": sample.data_dir_bytes,
            "logBytes": sample.log_bytes,
            "logMessages": sample.log_messages,
        },
        "process": { "residentBytes": sample.resident_bytes },
    })))
}

#[utoipa::path(get, path = "/healthz", operation_id = "api_healthz", tag = "status", responses((status = 200, description = "The process runs", body = String, content_type = "text/plain"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", operation_id = "api_readyz", tag = "status", responses((status = 200, description = "Ready", body = Value), (status = 503, description = "Not ready: the body says what is missing", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let connections = state.hub.connections().snapshot();
    let log = state.hub.store().health();
    let ready = state.hub.connections().all_connected() && log.ok && !state.shutdown.is_cancelled();
    // Rate limits counted locally because Redis is unreachable do not make the gateway
    // unready (it keeps serving), but say so here.
    let body = Json(json!({
        "ready": ready,
        "log": log,
        "connections": connections,
        "rateLimits": state.auth.limiter_status(),
    }));
    if ready {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[utoipa::path(get, path = "/metrics", operation_id = "api_metrics", tag = "status", description = "Open or behind credentials, as `auth.metrics` says", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn fallback() -> ApiError {
    ApiError::not_found("no such endpoint")
}
