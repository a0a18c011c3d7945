//! Request-reply over HTTP and WebSocket: `POST /api/v1/operations/{id}/call` answers with the
//! upstream's response; on `/ws/operations` a frame `{"op", "correlationId", "request"}` gets
//! `{"type": "reply", "correlationId", "status", "contentType", "body"}` (or `"type": "error"`)
//! on the same socket, calls running concurrently. `GET /api/v1/operations/{id}/calls` reads the
//! call log.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::api::{ReplayQuery, read_body};
use super::error::{ApiError, ErrorCode};
use crate::auth::{Need, Principal};
use crate::calls::{CallError, CallRequest, CallResponse};

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let message = e.to_string();
        match e {
            CallError::NotFound(_) => ApiError::not_found(message),
            CallError::Invalid(problems) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
                    .with_details(json!({ "problems": problems }))
            }
            CallError::Timeout(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::UpstreamTimeout,
                message,
            ),
            CallError::Unavailable(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamUnavailable,
                message,
            ),
        }
    }
}

#[utoipa::path(get, path = "/api/v1/operations", operation_id = "calls_list", tag = "operations", responses((status = 200, description = "Every request-reply operation", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let mut operations: Vec<Value> = state
        .operations
        .list()
        .into_iter()
        .map(|op| {
            json!({
                "id": op.id.as_ref(),
                "method": op.method.as_str(),
                "path": op.path,
                "url": op.base_url,
            })
        })
        .chain(state.operations.broker_operations().into_iter().map(|op| {
            json!({
                "id": op.id.as_ref(),
                "request": op.request.as_ref(),
                "reply": op.reply.id().as_ref(),
                "timeoutMs": op.timeout.as_millis() as u64,
            })
        }))
        .collect();
    operations.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!({ "operations": operations }))
}

#[utoipa::path(post, path = "/api/v1/operations/{id}/call", operation_id = "calls_call", tag = "operations", params(("id" = String, Path, description = "An operation id, `{api}.{operationId}`")), request_body(content = crate::calls::CallRequest, content_type = "application/json"), responses((status = 200, description = "The upstream's answer (any status it gave is passed on)", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn call(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.hub.config().max_payload_bytes, &state.limits).await?;
    let request: CallRequest = if bytes.is_empty() {
        CallRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!(
                "the call request must be {{path, query, headers, body}}: {e}"
            ))
        })?
    };
    let response = state.operations.call(&id, request).await?;
    Ok(upstream_response(response))
}

/// The upstream's status, content type and body, as they came.
fn upstream_response(r: CallResponse) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, r.body).into_response();
    let headers = response.headers_mut();
    for (name, value) in &r.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    if let Some(ct) = r.content_type.and_then(|c| c.parse().ok()) {
        headers.insert("content-type", ct);
    }
    if let Ok(v) = format!("{:.3}", r.latency.as_secs_f64() * 1000.0).parse() {
        headers.insert("x-stepflow-upstream-ms", v);
    }
    response
}

#[utoipa::path(get, path = "/api/v1/operations/{id}/calls", operation_id = "calls_log", tag = "operations", params(("id" = String, Path, description = "An operation id, `{api}.{operationId}`"), ("from" = Option<u64>, Query, description = "The first offset"), ("limit" = Option<u64>, Query, description = "At most this many")), responses((status = 200, description = "The call log", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn log(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let log = state
        .operations
        .log_of(&id)
        .ok_or_else(|| ApiError::not_found(format!("no operation '{id}'")))?;
    let (from, limit) = query.window();
    let calls = state.operations.calls(&log, from, limit).await?;
    let next = calls
        .last()
        .and_then(|c| c["offset"].as_u64())
        .map_or(from, |o| o + 1);
    Ok(Json(
        json!({ "operation": id, "calls": calls, "next": next }),
    ))
}

/// One call frame from a WebSocket client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallFrame {
    op: String,
    #[serde(rename = "correlationId")]
    correlation_id: Value,
    #[serde(default)]
    request: CallRequest,
}

/// Replies a socket may have waiting to be written; a client that reads none of them stops
/// being read.
const PENDING_REPLIES: usize = 256;

#[utoipa::path(get, path = "/ws/operations", operation_id = "calls_websocket", tag = "operations", responses((status = 101, description = "Upgraded to a WebSocket of call frames"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn websocket(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    upgrade: WebSocketUpgrade,
) -> Response {
    state
        .limits
        .websocket(upgrade, state.hub.config().max_payload_bytes)
        .on_upgrade(move |socket| session(socket, state, principal))
}

async fn session(socket: WebSocket, state: AppState, principal: Principal) {
    let (mut sink, mut source) = socket.split();
    let (replies, mut outgoing) = mpsc::channel::<Message>(PENDING_REPLIES);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
    });
    let max_calls = state.limits.max_calls_per_connection;
    let calls = Arc::new(tokio::sync::Semaphore::new(max_calls));
    let max_message = state
        .limits
        .ws_max_message(state.hub.config().max_payload_bytes);
    let idle_timeout = state.limits.ws_idle_timeout;
    let mut ping = tokio::time::interval(super::limits::ping_interval(idle_timeout));
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let close = loop {
        let text = tokio::select! {
            _ = state.shutdown.cancelled() => break None,
            frame = source.next() => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Err(e)) if super::limits::is_message_too_big(&e) => {
                        break Some(super::limits::too_big_close(max_message));
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                    Some(Ok(_)) => continue,
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > idle_timeout {
                    super::limits::count_refusal("ws_idle");
                    break Some(CloseFrame { code: close_code::AWAY, reason: "idle timeout: no frame or pong from the client".into() });
                }
                if replies.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        let frame: CallFrame = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let error = ApiError::bad_request(format!(
                    "a call frame is {{\"op\", \"correlationId\", \"request\"}}: {e}"
                ));
                let mut body = error.body();
                body["type"] = "error".into();
                let _ = replies.send(Message::text(body.to_string())).await;
                continue;
            }
        };
        // The upgrade needed credentials only: each frame's operation needs its `call:`.
        let need = Need::Call(frame.op.clone());
        if !principal.allows(&need) {
            super::auth::count_denial("forbidden");
            let error = ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("missing scope '{need}'"),
            );
            let mut body = error.body();
            body["type"] = "error".into();
            body["correlationId"] = json!(frame.correlation_id);
            let _ = replies.send(Message::text(body.to_string())).await;
            continue;
        }
        // Past the cap a call is answered at once: waiting would stall the socket's reads
        // and hide the limit from the client.
        let Ok(permit) = calls.clone().try_acquire_owned() else {
            super::limits::count_refusal("calls_per_connection");
            let error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::LimitExceeded,
                format!("{max_calls} calls are in flight on this socket already (limits.max_calls_per_connection)"),
            )
            .with_details(json!({ "limit": max_calls }));
            let mut body = error.body();
            body["type"] = "error".into();
            body["correlationId"] = frame.correlation_id;
            let _ = replies.send(Message::text(body.to_string())).await;
            continue;
        };
        let state = state.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match state.operations.call(&frame.op, frame.request).await {
                Ok(r) => {
                    let body = match serde_json::from_slice::<Value>(&r.body) {
                        Ok(json) => json,
                        Err(_) => Value::String(String::from_utf8_lossy(&r.body).into_owned()),
                    };
                    json!({
                        "type": "reply",
                        "correlationId": frame.correlation_id,
                        "status": r.status,
                        "contentType": r.content_type,
                        "headers": r
                            .headers
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                            .collect::<serde_json::Map<String, Value>>(),
                        "body": body,
                    })
                }
                Err(e) => {
                    let mut body = ApiError::from(e).body();
                    body["type"] = "error".into();
                    body["correlationId"] = frame.correlation_id;
                    body
                }
            };
            let _ = replies.send(Message::text(reply.to_string())).await;
        });
    };
    if let Some(frame) = close {
        let _ = replies.send(Message::Close(Some(frame))).await;
    }
    drop(replies);
    let _ = writer.await;
}
