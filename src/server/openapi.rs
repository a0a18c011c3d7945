//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of the gateway's own HTTP API,
//! generated from the handlers' `#[utoipa::path]` annotations as the router registers them
//! (`utoipa-axum`'s `routes!`): a route cannot be served without being described.

use std::sync::Arc;

use axum::Json;
use axum::extract::Extension;
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::ErrorCode;

/// Every error's body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// What the error is about, when there is more to say (problems, a diff, a limit).
    #[schema(required = false)]
    pub details: Option<Value>,
}

/// What the handlers do not say: the document's info, its security schemes, the error schema.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "StepFlow Gateway",
        description = "The gateway's own HTTP API: channels (publish, replay, WebSocket, SSE), durable subscriptions, bridges, the live registry of API documents, request-reply operations, health and metrics. The channels themselves are described by /api/v1/asyncapi.json."
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    modifiers(&Security),
    security(("bearer" = []), ("apiKey" = []))
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key or a JWT"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Marks the operations the authentication layer lets anyone call (`security: [{}]`), as its
/// rules say for this configuration: the probes, and `/metrics` unless `auth.metrics` asks for
/// credentials. The rules, not the annotations, decide, so the two cannot disagree.
pub fn mark_public_operations(document: &mut Value, auth: &crate::auth::Auth) {
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (template, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            let Ok(method) = axum::http::Method::from_bytes(method.to_uppercase().as_bytes())
            else {
                continue;
            };
            if super::auth::route_need(auth, &method, template, |_| None)
                == Some(crate::auth::Need::Nothing)
            {
                operation["security"] = serde_json::json!([{}]);
            }
        }
    }
}

/// The document, rendered once when the router is built.
#[derive(Clone)]
pub struct Described(pub Arc<Value>);

/// `GET /api/v1/openapi.json`.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi_document", tag = "self", responses((status = 200, description = "This document", body = Value), (status = "default", description = "An error: `{error: {code, message, details}}`", body = ErrorBody)))]
pub async fn document(Extension(described): Extension<Described>) -> Json<Value> {
    Json((*described.0).clone())
}
