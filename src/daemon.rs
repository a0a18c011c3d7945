//! `stepflow run`: compile everything, then start the store, the connectors and the HTTP
//! server; stop them in order on SIGTERM/SIGINT within the shutdown deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, AuthSetting};
use crate::bridge;
use crate::bridge::running::RunningBridges;
use crate::calls::Operations;
use crate::calls::replies::BrokerCalls;
use crate::config::Config;
use crate::hub::{Hub, HubConfig};
use crate::registry::{RegistryParts, SpecRegistry};
use crate::routing::{RoutingTable, UpstreamBinding};
use crate::server::{self, AppState};
use crate::spec::{self, SpecError};
use crate::store::{Store, StoreConfig};
use crate::subscriptions::Subscriptions;
use crate::telemetry;
use crate::upstream::ServerKey;

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} problem(s) in the API documents", .0.len())]
    Specs(Vec<SpecError>),
    #[error("no API documents found in {0}")]
    NoDocuments(String),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("server {server}: {reason}")]
    Connector { server: String, reason: String },
    #[error("config: {0}")]
    Config(String),
}

/// The data directory's folder of documents added at run time.
pub const ADDED_SPECS_DIR: &str = "specs";
/// Where bridges put over the API are kept, under the data directory.
pub const ADDED_BRIDGES_DIR: &str = "bridges";

/// Runs until `shutdown` is cancelled (by a signal in the binary).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let auth = Arc::new(authentication(&config)?);
    let tls = match &config.tls {
        Some(files) => Some(server::tls::acceptor(files).map_err(Error::Config)?),
        None => None,
    };
    // Issuers' keys are fetched in the background: a slow identity provider does not delay
    // the start, and tokens that arrive first fetch them themselves.
    tokio::spawn({
        let auth = auth.clone();
        async move { auth.prefetch_keys().await }
    });
    let mut specs = config.specs.clone();
    // Documents added at run time (`POST /api/v1/specs`) are kept here and load with the rest.
    let added = config.data_dir.join(ADDED_SPECS_DIR);
    if added.is_dir() {
        specs.push(added);
    }
    let compiled = tokio::task::spawn_blocking(move || {
        let report = spec::load_all(&specs);
        let mut errors = report.errors;
        let compiled = match crate::connectors::compile(&report.apis) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        (report.apis, report.warnings, compiled, errors)
    })
    .await
    .map_err(|e| {
        Error::Specs(vec![SpecError::new(
            spec::Location::new("", ""),
            spec::SpecErrorKind::Invalid(format!("loader task failed: {e}")),
        )])
    })?;
    let (apis, warnings, compiled, errors) = compiled;
    if !errors.is_empty() {
        return Err(Error::Specs(errors));
    }
    let compiled = compiled.expect("no errors means a table");
    if apis.is_empty() {
        return Err(Error::NoDocuments(
            config
                .specs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    for w in warnings.iter().chain(&compiled.warnings) {
        tracing::warn!(location = %w.location, "{}", w.message);
    }
    tracing::info!(
        documents = apis.len(),
        routes = compiled.table.len(),
        "routing table compiled"
    );

    let metrics = telemetry::install_prometheus().map_err(|e| Error::Metrics(e.to_string()))?;
    let data_dir = config.data_dir.clone();
    let store_config = StoreConfig {
        max_batch: config.log_max_batch,
        max_flush_delay: config.log_max_flush_delay,
        cache_bytes: config.log_cache_bytes,
        retention: config.retention.clone(),
        ..StoreConfig::default()
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, store_config))
        .await
        .map_err(|e| crate::store::Error::Open {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        })??;
    tracing::info!(data_dir = %config.data_dir.display(), "message log open");

    let table = Arc::new(compiled.table);
    let hub = Arc::new(Hub::new(
        table.clone(),
        store.clone(),
        Default::default(),
        HubConfig {
            max_payload_bytes: config.max_payload_bytes,
            live_capacity: config.live_buffer,
            ..HubConfig::default()
        },
    ));

    let servers = config.clone();
    let operations = Operations::build(&apis, store.clone(), move |api, server| {
        servers.server_override(api, server)
    })
    .map_err(|e| Error::Connector {
        server: "HTTP client".into(),
        reason: e.to_string(),
    })?;
    let timeouts = config.clone();
    let brokers = BrokerCalls::build(hub.clone(), move |route| {
        route
            .upstreams
            .first()
            .and_then(|u| timeouts.server_override(&route.api, &u.server).timeout)
            .unwrap_or(crate::calls::DEFAULT_TIMEOUT)
    });
    let operations = Arc::new(operations.with_brokers(brokers, shutdown.clone()));
    let triggers: Vec<_> = config
        .routes
        .iter()
        .filter_map(|(route, c)| c.call.clone().map(|t| (route.clone(), t)))
        .collect();
    let problems = crate::calls::triggers::check(&hub, &operations, &triggers);
    if !problems.is_empty() {
        return Err(Error::Config(problems.join("; ")));
    }
    // Bridge lanes and call triggers: readers of the log with durable cursors, stopped before
    // the connectors they publish through.
    let lanes = TaskTracker::new();
    let lane_shutdown = CancellationToken::new();
    crate::calls::triggers::start(
        hub.clone(),
        operations.clone(),
        triggers,
        lane_shutdown.clone(),
        &lanes,
    )
    .await?;

    let running_bridges = Arc::new(RunningBridges::new(
        hub.clone(),
        operations.clone(),
        lane_shutdown.clone(),
    ));
    let subscriptions = Subscriptions::load(store.clone()).await?;

    let connector_shutdown = CancellationToken::new();
    let catalogue_changes = Arc::new(tokio::sync::watch::channel(0).0);
    let pinned = triggers_pinned(&config);
    let registry = Arc::new(SpecRegistry::new(RegistryParts {
        hub: hub.clone(),
        operations: operations.clone(),
        bridges: running_bridges.clone(),
        bridge_dir: config.bridges.clone(),
        added_bridges_dir: config.data_dir.join(ADDED_BRIDGES_DIR),
        pinned,
        connectors: Arc::new(BuildConnectors {
            config: Arc::new(config.clone()),
        }),
        added_dir: config.data_dir.join(ADDED_SPECS_DIR),
        file_dirs: config.specs.clone(),
        shutdown: connector_shutdown.clone(),
        changes: catalogue_changes.clone(),
    }));
    let bridges = registry.load_bridges().await.map_err(Error::Specs)?;
    // Cursors before connectors: nothing that arrives from now on can be missed by a lane.
    bridge::lane::prepare_cursors(&store, &hub, &bridges).await?;
    tracing::info!(
        bridges = bridges.len(),
        lanes = bridges.iter().map(|b| b.lanes.len()).sum::<usize>(),
        "bridges compiled"
    );
    registry
        .start(&apis)
        .await
        .map_err(|(server, reason)| Error::Connector { server, reason })?;
    running_bridges.apply(bridges, &Default::default()).await?;
    lanes.close();

    fit_open_files(&config.limits);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Listen {
            addr: config.listen,
            reason: e.to_string(),
        })?;
    let bound = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(listen = %bound, tls = tls.is_some(), "HTTP server listening");
    let http_shutdown = CancellationToken::new();
    let state = AppState {
        hub: hub.clone(),
        operations,
        bridges: running_bridges.clone(),
        subscriptions: subscriptions.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        shutdown: http_shutdown.clone(),
        connection_ids: Arc::new(AtomicU64::new(0)),
        auth: auth.clone(),
        catalogue_changes,
        mcp: Arc::new(server::mcp::McpSettings::resolve(
            &config.mcp,
            bound.ip().is_loopback(),
            tls.is_some(),
        )),
        asyncapi: Arc::default(),
        limits: Arc::new(config.limits.clone()),
    };
    let http = tokio::spawn(server::run(listener, tls, state));
    reload_on_changes(&registry, &config, http_shutdown.clone());
    let cursor_flusher = tokio::spawn(
        subscriptions
            .clone()
            .run_flusher(hub.clone(), http_shutdown.clone()),
    );

    let housekeeping = tokio::spawn({
        let store = store.clone();
        let shutdown = shutdown.clone();
        let connections = hub.connections().clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            // Stall timeouts are seconds long (MQTT's keep-alive is at least 5 s): checking
            // every second reports a stall within a second of its timeout.
            let mut stall_check = tokio::time::interval(Duration::from_secs(1));
            // Issuers' key sets are fetched again now and then, so a key removed from a JWKS
            // stops verifying new tokens without waiting for an unknown kid.
            let mut jwks_refresh = tokio::time::interval(crate::auth::jwt::JWKS_REFRESH_EVERY);
            jwks_refresh.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = jwks_refresh.tick() => {
                        let auth = auth.clone();
                        tokio::spawn(async move { auth.prefetch_keys().await });
                    }
                    _ = tick.tick() => {
                        crate::telemetry::resources::sample(&store).await;
                        metrics.run_upkeep();
                        store.trim();
                        auth.upkeep();
                    }
                    _ = stall_check.tick() => connections.check_stalls(),
                }
            }
        }
    });

    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    tracing::info!(timeout = ?config.shutdown_timeout, "shutting down");
    // 1. Stop taking requests and close client streams.
    http_shutdown.cancel();
    // 2. Stop the bridge lanes (they publish through the connectors), keeping their cursors.
    lane_shutdown.cancel();
    if tokio::time::timeout_at(deadline, async {
        lanes.wait().await;
        running_bridges.stopped().await;
    })
    .await
    .is_err()
    {
        tracing::warn!("bridge lanes did not stop before the deadline");
    }
    // 3. Stop intake upstream; connectors acknowledge what the log already holds.
    connector_shutdown.cancel();
    let stragglers = async {
        let stopped = registry.connectors_stopped();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    tracing::info!(tasks = registry.connector_tasks().await, "waiting for connectors to drain");
                }
            }
        }
    };
    if tokio::time::timeout_at(deadline, stragglers).await.is_err() {
        tracing::warn!(
            tasks = registry.connector_tasks().await,
            "connectors did not drain before the deadline"
        );
    }
    if tokio::time::timeout_at(deadline, http).await.is_err() {
        tracing::warn!("HTTP server did not finish before the deadline");
    }
    housekeeping.abort();
    let _ = cursor_flusher.await;
    // 4. Flush the log last: draining connectors still append.
    store.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// The gateway's authentication, and the safe default: without an `auth` section it serves
/// only a loopback address; anything else needs `auth`, or `auth: none` said out loud.
fn authentication(config: &Config) -> Result<Auth, Error> {
    match &config.auth {
        AuthSetting::Absent if config.listen.ip().is_loopback() => Ok(Auth::disabled()),
        AuthSetting::Absent => Err(Error::Config(format!(
            "refusing to listen on {} without an `auth` section: add one (api_keys, jwt, public), or write `auth: none` to serve every endpoint to anyone who reaches it",
            config.listen
        ))),
        AuthSetting::Disabled => {
            tracing::warn!(listen = %config.listen, "auth: none — every endpoint is open to anyone who reaches this address");
            Ok(Auth::disabled())
        }
        AuthSetting::Enabled(section) => {
            let auth = Auth::build(section).map_err(Error::Config)?;
            tracing::info!(
                api_keys = section.api_keys.len(),
                jwt_issuers = section.jwt.len(),
                public_channels = section.public.channels.len(),
                redis = section.redis_url.is_some(),
                "authentication on"
            );
            Ok(auth)
        }
    }
}

/// SIGHUP, and the file watcher unless the configuration turns it off, reload the specs
/// directories into the running registry.
fn reload_on_changes(registry: &Arc<SpecRegistry>, config: &Config, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            let registry = registry.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        received = hangup.recv() => {
                            if received.is_none() { break }
                            tracing::info!(signal = "SIGHUP", "reloading the specs directories");
                            registry.reload_files(crate::registry::Trigger::Signal).await;
                        }
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot install the SIGHUP handler"),
    }
    if config.watch.enabled {
        let paths: Vec<_> = config
            .specs
            .iter()
            .chain(&config.bridges)
            .filter(|p| p.exists())
            .cloned()
            .collect();
        if let Err(e) =
            crate::registry::watch::start(registry.clone(), paths, &config.watch, shutdown)
        {
            tracing::warn!(error = %e, "cannot watch the specs directories: SIGHUP still reloads them");
        }
    }
}

/// Channels the configured call triggers read from or reply on.
fn triggers_pinned(config: &Config) -> Vec<crate::routing::ChannelId> {
    config
        .routes
        .iter()
        .filter_map(|(route, c)| c.call.as_ref().map(|t| (route, t)))
        .flat_map(|(route, t)| [route.as_str().into(), t.reply.as_str().into()])
        .collect()
}

/// This build's connectors, as the registry uses them.
struct BuildConnectors {
    config: Arc<Config>,
}

impl crate::registry::Connectors for BuildConnectors {
    fn compile(
        &self,
        apis: &[crate::spec::Api],
    ) -> Result<crate::routing::Compiled, Vec<SpecError>> {
        crate::connectors::compile(apis)
    }

    fn start_server(
        &self,
        hub: &Arc<Hub>,
        api: &crate::spec::Api,
        server: &str,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), (String, String)> {
        let config = &*self.config;
        let Some(server) = api.servers.iter().find(|s| s.id == server) else {
            return Ok(());
        };
        // A server is connected to only if a route reads from or writes to it.
        let used = hub
            .routes()
            .any(|r| uses_server(&r.route(), &api.id, &server.id));
        if !used {
            return Ok(());
        }
        let key = ServerKey {
            api: api.id.clone(),
            server: server.id.clone(),
        };
        let overrides = config.server_override(&api.id, &server.id);
        let configured;
        let server = match overrides.optional {
            Some(optional) if optional != server.optional => {
                configured = crate::spec::Server {
                    optional,
                    ..server.clone()
                };
                &configured
            }
            _ => server,
        };
        let Some(connector) = crate::connectors::REGISTRY.connector(server.protocol) else {
            return Ok(());
        };
        let started = connector
            .start(crate::connectors::StartContext {
                hub,
                key: key.clone(),
                api,
                server,
                overrides: &overrides,
                config,
                shutdown,
                tracker,
            })
            .map_err(|reason| (key.to_string(), reason))?;
        if !started {
            tracing::debug!(server = %key, connector = connector.name(), "nothing to connect to");
        }
        Ok(())
    }

    fn can_follow(
        &self,
        hub: &Arc<Hub>,
        api: &crate::spec::Api,
        table: &RoutingTable,
        server: &str,
    ) -> bool {
        let Some(protocol) = api
            .servers
            .iter()
            .find(|s| s.id == server)
            .map(|s| s.protocol)
        else {
            // Gone from the document: its connector, if any, stops.
            return false;
        };
        let Some(connector) = crate::connectors::REGISTRY.connector(protocol) else {
            return true;
        };
        let key = ServerKey {
            api: api.id.clone(),
            server: server.to_owned(),
        };
        let running = hub.connections().url(&key).is_some();
        let used = table
            .routes()
            .iter()
            .any(|r| uses_server(r, &api.id, server));
        match (running, used) {
            (false, used) => !used,
            (true, _) => connector.follows_routes(),
        }
    }
}

/// Whether `route` of document `api` reads from or writes to server `server` through a
/// connector.
fn uses_server(route: &crate::routing::Route, api: &str, server: &str) -> bool {
    route.api == api
        && (route.direction.readable || route.direction.writable)
        && route.upstreams.iter().any(|u| {
            u.server == server
                && !matches!(
                    u.binding,
                    UpstreamBinding::NoConnector | UpstreamBinding::DynamicAddress
                )
        })
}

/// Descriptors kept for everything but client connections: brokers, the log, the watcher.
const RESERVED_FILES: u64 = 512;

/// Raises the soft open-files limit to the hard one, and says so when `limits.max_connections`
/// still does not fit: past the descriptors, connections fail in `accept` instead of meeting
/// the limit's 503.
fn fit_open_files(limits: &crate::server::limits::Limits) {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit");
            return;
        }
    };
    let wanted = limits.max_connections as u64 + RESERVED_FILES;
    if wanted > soft {
        tracing::warn!(
            open_files = soft,
            max_connections = limits.max_connections,
            "limits.max_connections does not fit the open-files limit; raise it (ulimit -n) or lower limits.max_connections"
        );
    } else {
        tracing::debug!(open_files = soft, "open-files limit");
    }
}
