//! The HTTP surface (axum): admin and channel API, publish, replay, WebSocket, SSE, health and
//! `/metrics`. Errors are JSON `{"error": {"code", "message", "details"}}` everywhere.

pub mod admin;
pub mod api;
pub mod asyncapi;
pub mod auth;
pub mod bridges;
pub mod calls;
pub mod error;
pub mod limits;
mod listen;
pub mod mcp;
pub mod openapi;
pub mod specs;
pub mod stream;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::hub::Hub;
use crate::telemetry::HTTP_REQUESTS;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub operations: Arc<crate::calls::Operations>,
    /// The bridges running now, changed at run time over `/api/v1/bridges/{name}`.
    pub bridges: Arc<crate::bridge::running::RunningBridges>,
    pub subscriptions: crate::subscriptions::Subscriptions,
    /// The documents being served, changed at run time over `/api/v1/specs`.
    pub registry: Arc<crate::registry::SpecRegistry>,
    pub metrics: PrometheusHandle,
    pub shutdown: CancellationToken,
    pub connection_ids: Arc<AtomicU64>,
    pub auth: Arc<crate::auth::Auth>,
    /// Bumped whenever the routes or operations change: MCP clients are told their tool list
    /// changed.
    pub catalogue_changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// `/mcp`: its settings, with the `Host` names it accepts resolved (empty: any).
    pub mcp: Arc<mcp::McpSettings>,
    /// `/api/v1/asyncapi.json` documents built for the current registry generation.
    pub asyncapi: Arc<asyncapi::Described>,
    pub limits: Arc<limits::Limits>,
}

/// The router.
pub fn router(state: AppState) -> Router {
    let guard = middleware::from_fn_with_state(state.clone(), auth::guard);
    let mut router = Router::new();
    if state.mcp.enabled {
        router = router
            .route_service("/mcp", mcp::service(&state))
            .route(
                "/.well-known/oauth-protected-resource",
                get(mcp::protected_resource),
            )
            .route(
                "/.well-known/oauth-protected-resource/mcp",
                get(mcp::protected_resource),
            );
    }
    // Every route of the API is registered with its description: the OpenAPI document is
    // what the router serves, by construction.
    let (api_routes, description) = described_routes().split_for_parts();
    let mut description = serde_json::to_value(&description).unwrap_or_default();
    openapi::mark_public_operations(&mut description, &state.auth);
    let described = openapi::Described(Arc::new(description));
    router
        .merge(api_routes)
        .layer(axum::Extension(described))
        .fallback(api::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        // Every route, the fallback included, passes the authentication layer; the request
        // counter sits outside it, so refusals are counted too.
        .layer(guard)
        .layer(middleware::from_fn(count_requests))
        // The body limit is enforced by the handlers (with a 413 in our error format).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// The gateway's HTTP API, each handler with its `#[utoipa::path]`.
fn described_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(api::list_channels))
        .routes(routes!(api::get_channel))
        .routes(routes!(api::replay_messages, api::publish))
        .routes(routes!(api::replay_dead_letters, admin::purge_dead_letters))
        .routes(routes!(admin::replay_dead_letters))
        .routes(routes!(
            admin::list_subscriptions,
            admin::create_subscription
        ))
        .routes(routes!(admin::get_subscription, admin::delete_subscription))
        .routes(routes!(bridges::list))
        .routes(routes!(bridges::get, bridges::put, bridges::remove))
        .routes(routes!(specs::list, specs::add))
        .routes(routes!(specs::get, specs::replace, specs::remove))
        .routes(routes!(specs::reloads, specs::reload_files))
        .routes(routes!(asyncapi::document))
        .routes(routes!(openapi::document))
        .routes(routes!(calls::list))
        .routes(routes!(calls::call))
        .routes(routes!(calls::log))
        .routes(routes!(calls::websocket))
        .routes(routes!(api::connections))
        .routes(routes!(api::stats))
        .routes(routes!(stream::websocket))
        .routes(routes!(stream::sse))
        .routes(routes!(api::healthz))
        .routes(routes!(api::readyz))
        .routes(routes!(api::metrics))
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        error::ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

/// Counts requests by route template (never the concrete URI) and status class.
async fn count_requests(request: Request, next: Next) -> Response {
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!(HTTP_REQUESTS, "route" => template, "status" => class).increment(1);
    response
}

/// Serves until `shutdown` is cancelled, then finishes in-flight requests; over TLS when an
/// acceptor is given. Connections are admitted under `state.limits`.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    state: AppState,
) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let limits = state.limits.clone();
    listen::run(listener, tls, router(state), &limits, shutdown).await
}
