//! The admin surface for delivery state: durable subscriptions and
//! dead letters (replay into the route or to the bridge target they missed, purge).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api::route_or_404;
use super::error::{ApiError, ErrorCode};
use crate::bridge;
use crate::hub::PublishRequest;
use crate::routing::envelope::{Origin, Transport};
use crate::subscriptions::{SubscriptionDef, SubscriptionError};

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        match e {
            SubscriptionError::NotFound(_) => ApiError::not_found(e.to_string()),
            SubscriptionError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string())
            }
            SubscriptionError::Invalid(_) => ApiError::bad_request(e.to_string()),
            SubscriptionError::Store(s) => ApiError::from(s),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    name: String,
    channel: String,
    filter: Option<String>,
    /// First offset to deliver; default: the channel's next message.
    from: Option<u64>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn view(state: &AppState, def: &SubscriptionDef) -> Result<Value, ApiError> {
    let position = state.subscriptions.position(&state.hub, def);
    let mut v = serde_json::to_value(def).unwrap_or_default();
    v["lag"] = json!(position.lag);
    v["expired"] = json!(position.expired);
    Ok(v)
}

#[utoipa::path(post, path = "/api/v1/subscriptions", operation_id = "admin_create_subscription", tag = "subscriptions", request_body(content = NewSubscription, content_type = "application/json"), responses((status = 201, description = "Created", body = Value), (status = 200, description = "The same definition exists", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn create_subscription(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: NewSubscription = parse_json(&body)?;
    let (def, created) = state
        .subscriptions
        .create(
            &state.hub,
            &request.name,
            &request.channel,
            request.filter,
            request.from,
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, &def).await?)).into_response())
}

#[utoipa::path(get, path = "/api/v1/subscriptions", operation_id = "admin_list_subscriptions", tag = "subscriptions", responses((status = 200, description = "Every durable subscription", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn list_subscriptions(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for def in state.subscriptions.list() {
        out.push(view(&state, &def).await?);
    }
    Ok(Json(json!({ "subscriptions": out })))
}

#[utoipa::path(get, path = "/api/v1/subscriptions/{name}", operation_id = "admin_get_subscription", tag = "subscriptions", params(("name" = String, Path, description = "The subscription's name")), responses((status = 200, description = "The subscription with its cursor and lag", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn get_subscription(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let def = state
        .subscriptions
        .get(&name)
        .ok_or(SubscriptionError::NotFound(name))?;
    Ok(Json(view(&state, &def).await?))
}

#[utoipa::path(delete, path = "/api/v1/subscriptions/{name}", operation_id = "admin_delete_subscription", tag = "subscriptions", params(("name" = String, Path, description = "The subscription's name")), responses((status = 204, description = "Deleted"), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn delete_subscription(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.subscriptions.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(SubscriptionError::NotFound(name).into())
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    from: Option<u64>,
    limit: Option<usize>,
    offsets: Option<Vec<u64>>,
}

/// Sends dead letters again: a bridge's to the target it missed; on a channel the gateway only
/// sends on (a trigger's reply), upstream; others into the route (checked against its schema
/// first, so a still-invalid message stays where it is). Replayed ones leave
/// the dead-letter log; the others stay, with the reason in the response.
#[utoipa::path(post, path = "/api/v1/channels/{id}/dead-letters/replay", operation_id = "admin_replay_dead_letters", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`")), request_body(content = Option<ReplayRequest>, content_type = "application/json", description = "Optional: which dead letters (default: the first 1000)"), responses((status = 200, description = "`{replayed, replayedOffsets, failed, remaining}`", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn replay_dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = if body.is_empty() {
        ReplayRequest::default()
    } else {
        parse_json(&body)?
    };
    let route = route_or_404(&state, &id)?;
    let store = state.hub.store();
    let limit = request.limit.unwrap_or(1000).clamp(1, 10_000);
    let mut entries = store
        .read(&route.dead_letters, request.from.unwrap_or(1), limit)
        .await?;
    if let Some(wanted) = &request.offsets {
        entries.retain(|m| wanted.contains(&m.offset));
    }
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for message in entries {
        let outcome = match bridge::lane::replay_dead_letter(
            &state.hub,
            &state.operations,
            &state.bridges.current(),
            &message,
        )
        .await
        {
            Some(result) => result.map_err(|e| e.detail().to_owned()),
            // A message the gateway could not send (a trigger's reply): publish it again.
            None if route.route().direction.writable && !route.route().direction.readable => state
                .hub
                .publish(
                    &id,
                    PublishRequest {
                        payload: message.envelope.payload.clone(),
                        content_type: None,
                        params: message
                            .envelope
                            .params
                            .iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        headers: message.envelope.headers.clone(),
                        origin: Origin::client(Transport::Replay, 0),
                        key: None,
                    },
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => match route.route().validate(&message.envelope.payload) {
                Err(e) => Err(format!("still invalid: {e}")),
                Ok(_) => {
                    let mut envelope = message.envelope.clone();
                    envelope.received_at = std::time::SystemTime::now();
                    match state.hub.ingest(&route, envelope).await {
                        Ok(pending) => pending
                            .flushed()
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        };
        match outcome {
            Ok(()) => replayed.push(message.offset),
            Err(reason) => failed.push(json!({"offset": message.offset, "reason": reason})),
        }
    }
    store
        .remove_offsets(&route.dead_letters, replayed.clone())
        .await?;
    let remaining = store.log_stats(&route.dead_letters).messages;
    Ok(Json(json!({
        "channel": id,
        "replayed": replayed.len(),
        "replayedOffsets": replayed,
        "failed": failed,
        "remaining": remaining,
    })))
}

#[utoipa::path(delete, path = "/api/v1/channels/{id}/dead-letters", operation_id = "admin_purge_dead_letters", tag = "channels", params(("id" = String, Path, description = "A channel id, `{api}.{channel}`")), responses((status = 200, description = "`{purged}`", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn purge_dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let route = route_or_404(&state, &id)?;
    let purged = state.hub.store().purge(&route.dead_letters).await?;
    Ok(Json(json!({ "channel": id, "purged": purged })))
}
