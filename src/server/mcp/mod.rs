//! `/mcp`: the gateway for AI agents, over MCP's Streamable HTTP transport (rmcp's tower
//! service, mounted in the same router behind the same authentication layer).
//!
//! Tools and resources are generated from the routing table and the operations (see
//! [`catalogue`] and [`resources`]); what a caller may see and do is decided by the scopes of
//! the principal the authentication layer left on the HTTP request, checked again on every
//! call. Revision 2026-07-28 requests are served statelessly (change notifications through
//! `subscriptions/listen`); clients of 2025-11-25 and before get a session, with
//! `resources/subscribe` and notifications on its stream.

pub mod catalogue;
pub mod resources;
mod tools;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::request::Parts;
use metrics::{counter, histogram};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, InitializeRequestParams,
    InitializeResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, Resource, ResourceContents, ResourceTemplate,
    ResourceUpdatedNotificationParam, ServerCapabilities, ServerConfig, SubscribeRequestParams,
    SubscriptionFilter, Tool, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::catalogue::Catalogue;
use self::resources::ResourceRef;
use self::tools::forbidden;
use super::AppState;
use crate::auth::{Need, Principal};

/// `stepflow_mcp_requests_total{method, outcome}`.
pub const MCP_REQUESTS: &str = "stepflow_mcp_requests_total";
/// `stepflow_mcp_tool_call_seconds{kind}`: from the call's arrival to its result.
pub const MCP_TOOL_CALL_DURATION: &str = "stepflow_mcp_tool_call_seconds";

/// `mcp:` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpFileConfig {
    /// Serve `/mcp` (default true).
    pub enabled: Option<bool>,
    /// Browser origins allowed to call `/mcp` (`https://app.example.com:443`,
    /// `http://localhost:*`). A request with any other `Origin` gets 403 (MCP's DNS-rebinding
    /// rule); requests without one (agents, SDKs) pass.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// `Host` values accepted on `/mcp`; default: the loopback names when the listener is on
    /// loopback, any otherwise (the listener then requires credentials).
    pub allowed_hosts: Option<Vec<String>>,
}

/// `/mcp` as the daemon runs it.
#[derive(Debug, Clone)]
pub struct McpSettings {
    pub enabled: bool,
    pub allowed_origins: Vec<String>,
    /// Empty: any `Host`.
    pub allowed_hosts: Vec<String>,
    /// Whether the listener speaks HTTPS (for the URLs the metadata gives).
    pub https: bool,
}

impl McpSettings {
    pub fn resolve(config: &McpFileConfig, loopback: bool, https: bool) -> McpSettings {
        let allowed_hosts = match (&config.allowed_hosts, loopback) {
            (Some(hosts), _) => hosts.clone(),
            (None, true) => ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
            (None, false) => Vec::new(),
        };
        McpSettings {
            enabled: config.enabled.unwrap_or(true),
            allowed_origins: config.allowed_origins.clone(),
            allowed_hosts,
            https,
        }
    }

    /// Where the metadata of `/mcp` is, as seen by a client that sent `Host: host`.
    pub fn metadata_url(&self, host: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{host}/.well-known/oauth-protected-resource/mcp")
    }
}

/// `GET /.well-known/oauth-protected-resource[/mcp]` (RFC 9728): the resource `/mcp` is, and the
/// issuers whose tokens it takes. Only when JWT issuers are configured: without them there is
/// no authorization server to point an agent at.
pub async fn protected_resource(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<Value>, super::error::ApiError> {
    let issuers = state.auth.issuer_urls();
    if issuers.is_empty() {
        return Err(super::error::ApiError::not_found(
            "no JWT issuer is configured: /mcp takes API keys",
        ));
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if state.mcp.https { "https" } else { "http" };
    Ok(axum::Json(json!({
        "resource": format!("{scheme}://{host}/mcp"),
        "authorization_servers": issuers,
        "bearer_methods_supported": ["header"],
        "resource_name": "StepFlow Gateway MCP",
    })))
}

/// What every MCP handler shares: the gateway, and the tool catalogue of its current routes.
pub struct McpShared {
    state: AppState,
    catalogue: Mutex<Option<(u64, Arc<Catalogue>)>>,
}

impl McpShared {
    fn new(state: AppState) -> Arc<McpShared> {
        Arc::new(McpShared {
            state,
            catalogue: Mutex::new(None),
        })
    }

    /// The catalogue, rebuilt only when the routes or operations changed.
    fn catalogue(&self) -> Arc<Catalogue> {
        let version = *self.state.catalogue_changes.borrow();
        let mut cached = self.catalogue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, catalogue)) = cached.as_ref()
            && *v == version
        {
            return catalogue.clone();
        }
        let built = Arc::new(Catalogue::build(&self.state.hub, &self.state.operations));
        *cached = Some((version, built.clone()));
        built
    }
}

/// The `/mcp` service.
pub fn service(state: &AppState) -> StreamableHttpService<GatewayMcp, LocalSessionManager> {
    let shared = McpShared::new(state.clone());
    let settings = &state.mcp;
    let http = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(true)
        .with_json_response(true)
        .with_cancellation_token(state.shutdown.child_token())
        // A publish tool's arguments carry one message: leave room for the JSON-RPC around it.
        .with_max_request_body_bytes(state.hub.config().max_payload_bytes + 64 * 1024)
        .with_allowed_origins(settings.allowed_origins.clone())
        .enforce_origin_validation()
        .with_allowed_hosts(settings.allowed_hosts.clone());
    StreamableHttpService::new(
        move || Ok(GatewayMcp::new(shared.clone())),
        Arc::new(LocalSessionManager::default()),
        http,
    )
}

/// One MCP session (2025-11-25) or one request (2026-07-28).
pub struct GatewayMcp {
    shared: Arc<McpShared>,
    /// Legacy `resources/subscribe` watchers, by URI: dropped with the session.
    watches: Mutex<HashMap<String, DropGuard>>,
    /// The session's tool-list watcher (legacy sessions).
    list_watch: Mutex<Option<DropGuard>>,
}

impl GatewayMcp {
    fn new(shared: Arc<McpShared>) -> GatewayMcp {
        GatewayMcp {
            shared,
            watches: Mutex::new(HashMap::new()),
            list_watch: Mutex::new(None),
        }
    }

    fn state(&self) -> &AppState {
        &self.shared.state
    }
}

/// The principal the authentication layer put on the HTTP request; without one (which the
/// layer does not allow), nothing is permitted.
fn principal(extensions: &rmcp::model::Extensions) -> Result<Principal, ErrorData> {
    extensions
        .get::<Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .ok_or_else(|| ErrorData::invalid_request("no authenticated principal", None))
}

fn count(method: &'static str, outcome: &'static str) {
    counter!(MCP_REQUESTS, "method" => method, "outcome" => outcome).increment(1);
}

fn counted<T>(method: &'static str, result: Result<T, ErrorData>) -> Result<T, ErrorData> {
    count(method, if result.is_ok() { "ok" } else { "error" });
    result
}

impl ServerHandler for GatewayMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(
            Implementation::new("stepflow-gateway", env!("CARGO_PKG_VERSION"))
                .with_title("StepFlow Gateway"),
        )
        .with_instructions(
            "The gateway's channels and operations. list_channels shows what this key may use; \
             describe_channel gives a channel's schemas; read_messages reads its log; each \
             publish_* tool sends on one channel and each call_* tool calls one operation. \
             Channel resources hold their most recent messages.",
        )
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        // From 2025-03-26, the first revision with the Streamable HTTP transport.
        Cow::Borrowed(&[
            ProtocolVersion::V_2025_03_26,
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2026_07_28,
        ])
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        counted("initialize", self.negotiate_initialize(&request))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // A legacy session hears of tool list changes on its stream for as long as it lives.
        let stop = CancellationToken::new();
        let mut changes = self.state().catalogue_changes.subscribe();
        let peer = context.peer.clone();
        let shutdown = self.state().shutdown.clone();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                        changed = changes.changed() => {
                            if changed.is_err() || peer.notify_tool_list_changed().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        *self.list_watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.drop_guard());
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let result = principal(&context.extensions).map(|principal| {
            let catalogue = self.shared.catalogue();
            let tools: Vec<Tool> = catalogue.visible(&principal).cloned().collect();
            ListToolsResult::with_all_items(tools)
        });
        counted("tools/list", result)
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.shared.catalogue().get(name).map(|t| t.tool.clone())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let started = Instant::now();
        let principal = match principal(&context.extensions) {
            Ok(p) => p,
            Err(e) => {
                count("tools/call", "error");
                return Err(e);
            }
        };
        let catalogue = self.shared.catalogue();
        let Some(tool) = catalogue.get(&request.name) else {
            count("tools/call", "unknown_tool");
            return Err(ErrorData::invalid_params(
                format!("no tool '{}'", request.name),
                None,
            ));
        };
        let arguments = request.arguments.unwrap_or_default();
        let result = if let Some(need) = tool.kind.need()
            && !principal.allows(&need)
        {
            forbidden(&principal, &need)
        } else {
            self.run_tool(&tool.kind, &catalogue, &principal, arguments)
                .await
        };
        let outcome = if result.is_error == Some(true) {
            "tool_error"
        } else {
            "ok"
        };
        count("tools/call", outcome);
        histogram!(MCP_TOOL_CALL_DURATION, "kind" => tool.kind.label())
            .record(started.elapsed().as_secs_f64());
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let result = principal(&context.extensions).map(|principal| {
            let resources: Vec<Resource> = self
                .readable_routes(&principal)
                .map(|route| {
                    let mut resource =
                        Resource::new(resources::channel_uri(&route.id), route.id.to_string())
                            .with_title(format!("Recent messages on {}", route.id))
                            .with_mime_type("application/json");
                    if let Some(d) = &route.description {
                        resource = resource.with_description(d.clone());
                    }
                    resource
                })
                .collect();
            ListResourcesResult::with_all_items(resources)
        });
        counted("resources/list", result)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let result = principal(&context.extensions).map(|principal| {
            let templates: Vec<ResourceTemplate> = self
                .readable_routes(&principal)
                .filter_map(|route| {
                    let uri = resources::template_uri(&route)?;
                    Some(
                        ResourceTemplate::new(uri, format!("{} by address", route.id))
                            .with_title(format!(
                                "Recent messages on one address of {}",
                                route.id
                            ))
                            .with_description(format!(
                                "The most recent messages on {} whose address has these parameters.",
                                route.address.as_deref().unwrap_or(&route.id)
                            ))
                            .with_mime_type("application/json"),
                    )
                })
                .collect();
            ListResourceTemplatesResult::with_all_items(templates)
        });
        counted("resources/templates/list", result)
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let result = async {
            let principal = principal(&context.extensions)?;
            let resource = self.resource(&principal, &request.uri)?;
            let contents = resources::read(&self.state().hub, &resource)
                .await
                .map_err(|e| ErrorData::internal_error(format!("the log failed: {e}"), None))?;
            let text = serde_json::to_string(&contents).unwrap_or_default();
            Ok(ReadResourceResult::new(vec![
                ResourceContents::text(text, request.uri.clone())
                    .with_mime_type("application/json"),
            ])
            .into())
        }
        .await;
        counted("resources/read", result)
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let result = (|| {
            let principal = principal(&context.extensions)?;
            let resource = self.resource(&principal, &request.uri)?;
            let stop = CancellationToken::new();
            let peer = context.peer.clone();
            let uri = request.uri.clone();
            tokio::spawn(resources::watch(
                self.state().hub.clone(),
                resource,
                stop.clone(),
                move || {
                    let (peer, uri) = (peer.clone(), uri.clone());
                    async move {
                        peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                            .await
                            .is_ok()
                    }
                },
            ));
            // A second subscribe to the same URI replaces the first (one notification each).
            self.watches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(request.uri.clone(), stop.drop_guard());
            Ok(())
        })();
        counted("resources/subscribe", result)
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request.uri);
        counted("resources/unsubscribe", Ok(()))
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.supported_by(&self.get_info().capabilities))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let principal = match principal(&context.request_context().extensions) {
            Ok(p) => p,
            Err(e) => {
                count("subscriptions/listen", "error");
                return Err(e);
            }
        };
        let accepted = context.accepted().clone();
        // Every URI is checked before anything is watched: a refused one refuses the listen.
        let mut watched = Vec::new();
        for uri in accepted.resource_subscriptions.iter().flatten() {
            match self.resource(&principal, uri) {
                Ok(resource) => watched.push((uri.clone(), resource)),
                Err(e) => {
                    count("subscriptions/listen", "error");
                    return Err(e);
                }
            }
        }
        count("subscriptions/listen", "ok");
        let stop = self.state().shutdown.child_token();
        let _guard = stop.clone().drop_guard();
        for (uri, resource) in watched {
            let sink = context.sink().clone();
            tokio::spawn(resources::watch(
                self.state().hub.clone(),
                resource,
                stop.clone(),
                move || {
                    let (sink, uri) = (sink.clone(), uri.clone());
                    async move { sink.notify_resource_updated(uri).await.is_ok() }
                },
            ));
        }
        let mut changes = self.state().catalogue_changes.subscribe();
        let tools = accepted.tools_list_changed == Some(true);
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                // Graceful: the client is told the stream ended, and re-listens elsewhere.
                _ = stop.cancelled() => return Ok(()),
                changed = changes.changed(), if tools => {
                    if changed.is_err() || context.sink().notify_tool_list_changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

impl GatewayMcp {
    /// The readable routes `principal` may subscribe to.
    fn readable_routes<'a>(
        &'a self,
        principal: &'a Principal,
    ) -> impl Iterator<Item = Arc<crate::routing::Route>> + 'a {
        self.state()
            .hub
            .routes()
            .map(|r| r.route().clone())
            .filter(|r| r.direction.readable)
            .filter(move |r| principal.allows(&Need::Subscribe(r.id.to_string())))
    }

    /// A resource URI `principal` may read.
    fn resource(&self, principal: &Principal, uri: &str) -> Result<ResourceRef, ErrorData> {
        let resource = resources::parse(&self.state().hub, uri)
            .map_err(|e| ErrorData::resource_not_found(e, Some(json!({ "uri": uri }))))?;
        let need = Need::Subscribe(resource.route.id().to_string());
        if !principal.allows(&need) {
            crate::server::auth::count_denial("forbidden");
            return Err(ErrorData::invalid_request(
                format!("forbidden: this key lacks the scope '{need}'"),
                None,
            ));
        }
        Ok(resource)
    }
}
