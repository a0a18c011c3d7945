//! The HTTP surface (axum): admin and channel API, publish, replay, WebSocket, SSE, health and
//! `/metrics`. Errors are JSON `{"error": {"code", "message", "details"}}` everywhere.

pub mod admin;
pub mod api;
pub mod asyncapi;
pub mod auth;
pub mod bridges;
pub mod calls;
pub mod error;
pub mod mcp;
pub mod specs;
pub mod stream;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    router
        .route("/api/v1/channels", get(api::list_channels))
        .route("/api/v1/channels/{id}", get(api::get_channel))
        .route(
            "/api/v1/channels/{id}/messages",
            get(api::replay_messages).post(api::publish),
        )
        .route(
            "/api/v1/channels/{id}/dead-letters",
            get(api::replay_dead_letters).delete(admin::purge_dead_letters),
        )
        .route(
            "/api/v1/channels/{id}/dead-letters/replay",
            post(admin::replay_dead_letters),
        )
        .route(
            "/api/v1/subscriptions",
            get(admin::list_subscriptions).post(admin::create_subscription),
        )
        .route(
            "/api/v1/subscriptions/{name}",
            get(admin::get_subscription).delete(admin::delete_subscription),
        )
        .route("/api/v1/bridges", get(bridges::list))
        .route(
            "/api/v1/bridges/{name}",
            get(bridges::get).put(bridges::put).delete(bridges::remove),
        )
        .route("/api/v1/specs", get(specs::list).post(specs::add))
        .route(
            "/api/v1/specs/{id}",
            get(specs::get).put(specs::replace).delete(specs::remove),
        )
        .route(
            "/api/v1/reloads",
            get(specs::reloads).post(specs::reload_files),
        )
        .route("/api/v1/asyncapi.json", get(asyncapi::document))
        .route("/api/v1/operations", get(calls::list))
        .route("/api/v1/operations/{id}/call", post(calls::call))
        .route("/api/v1/operations/{id}/calls", get(calls::log))
        .route("/ws/operations", get(calls::websocket))
        .route("/api/v1/connections", get(api::connections))
        .route("/api/v1/stats", get(api::stats))
        .route("/ws/{id}", get(stream::websocket))
        .route("/sse/{id}", get(stream::sse))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
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
/// acceptor is given.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    state: AppState,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let shutdown = state.shutdown.clone();
    if let Some(acceptor) = tls {
        let listener = tls::TlsListener::new(listener, acceptor)?;
        return axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<auth::PeerInfo>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    }
    // Live frames are small and latency-sensitive: do not let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}
