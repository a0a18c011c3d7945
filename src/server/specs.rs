//! `/api/v1/specs` and `/api/v1/reloads`: the live registry over HTTP (list, get, add,
//! replace, remove documents; reload the specs directories; the last results).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api::read_body;
use super::error::{ApiError, ErrorCode};
use crate::registry::RegistryError;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::Invalid(errors) => {
                ApiError::bad_request(message).with_details(json!({ "errors": errors }))
            }
            RegistryError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
            }
            RegistryError::NotFound(_) | RegistryError::NoBridge(_) => ApiError::not_found(message),
            RegistryError::BadRequest(_) => ApiError::bad_request(message),
            RegistryError::Storage => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                message,
            ),
            RegistryError::Breaking(diff) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
                    .with_details(json!({ "diff": diff }))
            }
        }
    }
}

/// `GET /api/v1/specs`: every registered document.
#[utoipa::path(get, path = "/api/v1/specs", operation_id = "specs_list", tag = "registry", responses((status = 200, description = "Every registered document", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "specs": state.registry.list().await }))
}

/// `GET /api/v1/specs/{id}`: the document's text as registered, with its content type.
#[utoipa::path(get, path = "/api/v1/specs/{id}", operation_id = "specs_get", tag = "registry", params(("id" = String, Path, description = "The document's id")), responses((status = 200, description = "The document as registered", content((String = "application/yaml"), (Value = "application/json"))), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let document = state.registry.get(&id).await?;
    Ok((
        [(header::CONTENT_TYPE, document.content_type)],
        document.text,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct AddQuery {
    /// The file name the document is kept under (its extension says YAML or JSON); by default
    /// its `x-stepflow-id` (else `api`) with `.yaml`.
    name: Option<String>,
    /// Answer what would change, and change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/v1/specs`: adds an AsyncAPI or OpenAPI document (YAML or JSON) at run time:
/// its channels serve at once, its connectors connect, its operations are callable; it is
/// kept in the data directory and loads with the others at the next start. Every problem is
/// reported as `file#pointer: reason` (400); nothing changes unless all of it compiles.
#[utoipa::path(post, path = "/api/v1/specs", operation_id = "specs_add", tag = "registry", params(("name" = Option<String>, Query, description = "The file name to keep it under"), ("dry_run" = Option<bool>, Query, description = "Answer what would change and change nothing")), request_body(content((String = "application/yaml"), (Value = "application/json"))), responses((status = 201, description = "Added", body = Value), (status = 200, description = "A dry run", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn add(
    State(state): State<AppState>,
    query: Result<Query<AddQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let bytes = read_body(body, state.limits.max_document_bytes, &state.limits).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the document is not UTF-8 text"))?;
    let name = query.name.unwrap_or_else(|| default_name(&text));
    let added = state.registry.add(&name, text, query.dry_run).await?;
    let status = if added.dry_run {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(json!({
            "api": added.document.id,
            "document": added.document,
            "channels": added.channels,
            "operations": added.operations,
            "warnings": added.warnings,
            "dryRun": added.dry_run,
        })),
    )
        .into_response())
}

fn default_name(text: &str) -> String {
    let id = crate::yaml::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v.get("x-stepflow-id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "api".into());
    format!("{id}.yaml")
}

#[derive(Debug, Deserialize)]
pub struct RemoveQuery {
    /// Delete the removed channels' logs now instead of leaving them to retention.
    #[serde(default)]
    purge: bool,
    #[serde(default)]
    dry_run: bool,
}

/// `DELETE /api/v1/specs/{id}`: removes a document added over the API. WebSocket clients of
/// its channels are closed with 1001 `channel removed`, SSE streams end with `event: removed`.
#[utoipa::path(delete, path = "/api/v1/specs/{id}", operation_id = "specs_remove", tag = "registry", params(("id" = String, Path, description = "The document's id"), ("purge" = Option<bool>, Query, description = "Delete its logs now"), ("dry_run" = Option<bool>, Query, description = "Answer what would change and change nothing")), responses((status = 200, description = "Removed, or a dry run", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let removed = state
        .registry
        .remove(&id, query.purge, query.dry_run)
        .await?;
    Ok(Json(json!(removed)))
}

#[derive(Debug, Deserialize)]
pub struct ReplaceQuery {
    /// `false` refuses a change with breaking changes (409 with the diff).
    #[serde(default = "yes")]
    allow_breaking: bool,
    #[serde(default)]
    dry_run: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /api/v1/specs/{id}`: replaces a document added over the API, applied by diff. The
/// answer is the diff: channels, operations and servers added, removed and changed, and the
/// breaking changes between the old and the new payload schemas.
#[utoipa::path(put, path = "/api/v1/specs/{id}", operation_id = "specs_replace", tag = "registry", params(("id" = String, Path, description = "The document's id"), ("allow_breaking" = Option<bool>, Query, description = "Apply a change with breaking changes"), ("dry_run" = Option<bool>, Query, description = "Answer what would change and change nothing")), request_body(content((String = "application/yaml"), (Value = "application/json"))), responses((status = 200, description = "Replaced, or a dry run: the diff", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ReplaceQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let bytes = read_body(body, state.limits.max_document_bytes, &state.limits).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the document is not UTF-8 text"))?;
    let replaced = state
        .registry
        .replace(&id, text, query.allow_breaking, query.dry_run)
        .await?;
    Ok(Json(json!(replaced)))
}

/// `GET /api/v1/reloads`: the last changes tried (API, file watcher, SIGHUP), newest first,
/// with how each ended and why one was refused.
#[utoipa::path(get, path = "/api/v1/reloads", operation_id = "specs_reloads", tag = "registry", responses((status = 200, description = "The last changes tried", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn reloads(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "reloads": state.registry.reloads() }))
}

/// `POST /api/v1/reloads`: reloads the specs directories now, as SIGHUP does; 200 with the
/// result when it applied or nothing changed, 400 when it was refused, 500 when a step failed.
#[utoipa::path(post, path = "/api/v1/reloads", operation_id = "specs_reload_files", tag = "registry", responses((status = 200, description = "Applied or unchanged", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = crate::server::openapi::ErrorBody)))]
pub async fn reload_files(State(state): State<AppState>) -> Response {
    let reload = state
        .registry
        .reload_files(crate::registry::Trigger::Api)
        .await;
    let status = match reload.outcome {
        crate::registry::Outcome::Applied | crate::registry::Outcome::Unchanged => StatusCode::OK,
        crate::registry::Outcome::Refused => StatusCode::BAD_REQUEST,
        crate::registry::Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(json!(reload))).into_response()
}
