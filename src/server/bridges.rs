//! `/api/v1/bridges`: the running bridges with their lanes' cursors, and bridges put and
//! removed at run time.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api::read_body;
use super::error::ApiError;
use crate::bridge::{self, Bridge};

/// Largest bridge definition accepted over the API.
const MAX_BRIDGE_BYTES: usize = 1024 * 1024;

/// `GET /api/v1/bridges`: every running bridge, each lane with its cursor and lag.
#[utoipa::path(get, path = "/api/v1/bridges", operation_id = "bridges_list", tag = "bridges", responses((status = 200, description = "Every running bridge", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for b in state.bridges.current().iter() {
        out.push(view(&state, b).await?);
    }
    Ok(Json(json!({ "bridges": out })))
}

/// `GET /api/v1/bridges/{name}`: one bridge, with its definition as written.
#[utoipa::path(get, path = "/api/v1/bridges/{name}", operation_id = "bridges_get", tag = "bridges", params(("name" = String, Path, description = "The bridge's name")), responses((status = 200, description = "The bridge with its definition and cursors", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bridge = state
        .bridges
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("no bridge '{name}'")))?;
    let mut view = view(&state, &bridge).await?;
    view["definition"] = bridge.definition.clone();
    Ok(Json(view))
}

async fn view(state: &AppState, b: &Bridge) -> Result<Value, ApiError> {
    let mut view = bridge::describe(b);
    view["source"] = json!(state.registry.bridge_source(b));
    let stats = state
        .hub
        .route(&b.source)
        .map(|route| state.hub.store().log_stats(&route.log));
    if let Some(targets) = view["targets"].as_array_mut() {
        for (lane, target) in b.lanes.iter().zip(targets) {
            let cursor = bridge::lane::cursor(state.hub.store(), lane).await?;
            let position = match (cursor, &stats) {
                (Some(c), Some(stats)) => crate::store::ReaderPosition::of(c, stats),
                _ => crate::store::ReaderPosition::default(),
            };
            target["cursor"] = json!(cursor);
            target["lag"] = json!(position.lag);
            target["expired"] = json!(position.expired);
        }
    }
    Ok(view)
}

#[derive(Debug, Deserialize)]
pub struct ChangeQuery {
    /// Answer what would change, and change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `PUT /api/v1/bridges/{name}`: creates (201) or replaces (200) a bridge from its definition
/// (YAML or JSON: `from`, `to`, …, as under `bridges.{name}` in a file). Compiled with every
/// other bridge against the running table first; a problem is 400 with `file#pointer: reason`
/// and changes nothing. An unchanged bridge keeps running; a changed one resumes from its
/// lanes' cursors. Kept in the data directory; loads with the others at the next start.
#[utoipa::path(put, path = "/api/v1/bridges/{name}", operation_id = "bridges_put", tag = "bridges", params(("name" = String, Path, description = "The bridge's name"), ("dry_run" = Option<bool>, Query, description = "Answer what would change and change nothing")), request_body(content((String = "application/yaml"), (Value = "application/json"))), responses((status = 201, description = "Created", body = Value), (status = 200, description = "Replaced, unchanged, or a dry run", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<ChangeQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let bytes = read_body(body, MAX_BRIDGE_BYTES, &state.limits).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the definition is not UTF-8 text"))?;
    let definition: Value = crate::yaml::from_str(text).map_err(|e| {
        let reason = e.to_string();
        ApiError::bad_request(format!(
            "the definition is neither YAML nor JSON: {}",
            reason.lines().next().unwrap_or("")
        ))
    })?;
    let change = state
        .registry
        .put_bridge(&name, definition, query.dry_run)
        .await?;
    let status = if !change.dry_run && change.changes.added.contains(&name) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!(change))).into_response())
}

/// `DELETE /api/v1/bridges/{name}`: stops a bridge put over the API and forgets its cursors.
#[utoipa::path(delete, path = "/api/v1/bridges/{name}", operation_id = "bridges_remove", tag = "bridges", params(("name" = String, Path, description = "The bridge's name"), ("dry_run" = Option<bool>, Query, description = "Answer what would change and change nothing")), responses((status = 200, description = "Removed, or a dry run", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<ChangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let change = state.registry.remove_bridge(&name, query.dry_run).await?;
    Ok(Json(json!(change)))
}
