//! The live registry: the API documents the gateway serves, added and removed while it runs.
//!
//! A document added here is compiled on its own, its routes join the running table (the hub),
//! its operations become callable and its servers' connectors start; removing it reverses each
//! step. Routes of other documents are not touched, so their clients, logs, cursors and
//! upstream subscriptions never notice. Documents added over the API are kept in the data
//! directory and load with the rest at the next start.
//!
//! Knows the hub, the operations, the bridges and the store; never a protocol: compiling
//! against this build's connectors and starting them is the daemon's, behind [`Connectors`].

pub mod breaking;
mod bridges;
pub mod reloads;
mod servers;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::Target;
use crate::bridge::running::RunningBridges;
use crate::calls::Operations;
use crate::hub::Hub;
use crate::routing::{ChannelId, Compiled, Route, RoutingTable};
use crate::spec::{self, Api, DocumentKind, SpecError};
use breaking::DocumentDiff;
use reloads::History;
pub use reloads::{Outcome, Reload, Trigger};

/// What the daemon gives the registry: this build's protocol support.
pub trait Connectors: Send + Sync {
    /// Compiles `apis` into routes against the connectors this build has.
    fn compile(&self, apis: &[Api]) -> Result<Compiled, Vec<SpecError>>;

    /// Starts the connector of `api`'s server `server` on `tracker` (nothing when no route
    /// uses it); it stops when `shutdown` is cancelled.
    fn start_server(
        &self,
        hub: &Arc<Hub>,
        api: &Api,
        server: &str,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), (String, String)>;

    /// Whether the connector of `api`'s server `server` can take up the routes of `table` (the
    /// document's new ones) in place ([`crate::hub::RouteFollower`]): it runs and follows, or
    /// it does not run and `table` gives it nothing to do.
    fn can_follow(&self, hub: &Arc<Hub>, api: &Api, table: &RoutingTable, server: &str) -> bool;
}

/// Where a document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A file of the specs directories.
    File,
    /// `POST /api/v1/specs`, kept in the data directory.
    Api,
}

/// A registered document, as `GET /api/v1/specs` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentInfo {
    pub id: String,
    /// `asyncapi` or `openapi`.
    pub kind: &'static str,
    pub spec_version: String,
    pub title: String,
    /// The document's own version (`info.version`).
    pub version: String,
    pub source: Source,
    /// The file's name (never the directory, which is the operator's business).
    pub file: String,
    pub channels: usize,
    pub operations: usize,
    /// When the file was written, RFC 3339.
    pub added_at: String,
}

/// A document's text as registered.
pub struct DocumentText {
    pub info: DocumentInfo,
    pub text: String,
    pub content_type: &'static str,
}

/// What an addition did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Added {
    pub document: DocumentInfo,
    pub channels: Vec<ChannelId>,
    pub operations: Vec<ChannelId>,
    pub warnings: Vec<String>,
    pub dry_run: bool,
}

/// What a removal did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    pub document: DocumentInfo,
    pub channels: Vec<ChannelId>,
    pub operations: usize,
    /// Messages deleted with `purge`.
    pub purged_messages: u64,
    pub dry_run: bool,
}

/// Why a change was refused; nothing running changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the document has {} problem(s)", .0.len())]
    Invalid(Vec<String>),
    #[error("{0}")]
    Conflict(String),
    #[error("no document '{0}'")]
    NotFound(String),
    #[error("no bridge '{0}'")]
    NoBridge(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot keep the document in the data directory")]
    Storage,
    #[error("the change has {} breaking change(s); send allow_breaking=true to apply it anyway", .0.breaking.len())]
    Breaking(Box<DocumentDiff>),
}

/// What a replacement did (or, with `dry_run`, would do).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replacement {
    pub document: DocumentInfo,
    pub diff: DocumentDiff,
    /// Whether the document's connectors reconnected (a server, an address or a binding
    /// changed, or channels came or went); otherwise their upstream subscriptions stayed.
    pub reconnected: bool,
    /// Bridges restarted because a channel they read or write changed (they resume from their
    /// cursors); the others keep running.
    pub bridges: crate::bridge::running::BridgeChanges,
    pub dry_run: bool,
    pub warnings: Vec<String>,
}

struct Entry {
    info: DocumentInfo,
    /// The document as compiled now: the old side of the next replacement's diff.
    api: Arc<Api>,
    path: PathBuf,
    connectors: servers::ServerTasks,
}

/// The documents being served.
pub struct SpecRegistry {
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    bridges: Arc<RunningBridges>,
    /// The bridges directory of the configuration, reloaded with the specs directories.
    bridge_dir: Option<PathBuf>,
    /// Where bridges put over the API are kept.
    added_bridges_dir: PathBuf,
    /// Channels configured call triggers read or answer on: their documents cannot go.
    pinned: Vec<ChannelId>,
    connectors: Arc<dyn Connectors>,
    added_dir: PathBuf,
    /// The specs directories (and files) of the configuration, reloaded by [`Self::reload_files`].
    file_dirs: Vec<PathBuf>,
    history: History,
    /// Parent of every document's connector token: the daemon's shutdown stops them all.
    shutdown: CancellationToken,
    /// One lock for every change, so two changes never interleave.
    entries: Mutex<BTreeMap<String, Entry>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The parts a registry is built from.
pub struct RegistryParts {
    pub hub: Arc<Hub>,
    pub operations: Arc<Operations>,
    pub bridges: Arc<RunningBridges>,
    pub bridge_dir: Option<PathBuf>,
    pub added_bridges_dir: PathBuf,
    pub pinned: Vec<ChannelId>,
    pub connectors: Arc<dyn Connectors>,
    pub added_dir: PathBuf,
    pub file_dirs: Vec<PathBuf>,
    pub shutdown: CancellationToken,
    pub changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl SpecRegistry {
    pub fn new(parts: RegistryParts) -> Self {
        SpecRegistry {
            hub: parts.hub,
            operations: parts.operations,
            bridges: parts.bridges,
            bridge_dir: parts.bridge_dir,
            added_bridges_dir: parts.added_bridges_dir,
            pinned: parts.pinned,
            connectors: parts.connectors,
            added_dir: parts.added_dir,
            file_dirs: parts.file_dirs,
            history: History::default(),
            shutdown: parts.shutdown,
            entries: Mutex::new(BTreeMap::new()),
            changes: parts.changes,
        }
    }

    /// Registers the documents loaded at start (already in the hub and the operations) and
    /// starts their connectors.
    pub async fn start(&self, apis: &[Api]) -> Result<(), (String, String)> {
        let mut entries = self.entries.lock().await;
        for api in apis {
            let path = api.source.file.clone();
            let source = if path.starts_with(&self.added_dir) {
                Source::Api
            } else {
                Source::File
            };
            let mut entry = self.entry(api, path, source);
            entry
                .connectors
                .start(&*self.connectors, &self.hub, api, &self.shutdown, &|_| true)?;
            entries.insert(api.id.clone(), entry);
        }
        Ok(())
    }

    fn entry(&self, api: &Api, path: PathBuf, source: Source) -> Entry {
        let channels = self
            .hub
            .routes()
            .filter(|r| r.route().api == api.id)
            .count();
        Entry {
            info: info(api, &path, source, channels),
            api: Arc::new(api.clone()),
            path,
            connectors: servers::ServerTasks::default(),
        }
    }

    pub async fn list(&self) -> Vec<DocumentInfo> {
        let entries = self.entries.lock().await;
        entries.values().map(|e| e.info.clone()).collect()
    }

    /// The last changes tried, newest first.
    pub fn reloads(&self) -> Vec<Reload> {
        self.history.recent()
    }

    /// The document as registered: its original text.
    pub async fn get(&self, id: &str) -> Result<DocumentText, RegistryError> {
        let (info, path) = {
            let entries = self.entries.lock().await;
            let entry = entries
                .get(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
            (entry.info.clone(), entry.path.clone())
        };
        let text = tokio::fs::read_to_string(&path).await.map_err(|e| {
            tracing::error!(document = %id, path = %path.display(), error = %e, "cannot read a registered document");
            RegistryError::Storage
        })?;
        Ok(DocumentText {
            content_type: content_type(&path),
            info,
            text,
        })
    }

    /// Adds a document (AsyncAPI or OpenAPI, YAML or JSON) kept as `name` in the data
    /// directory: compiled first, refused whole on any problem; then its routes serve, its
    /// operations are callable and its connectors connect.
    pub async fn add(
        &self,
        name: &str,
        text: String,
        dry_run: bool,
    ) -> Result<Added, RegistryError> {
        let started = Instant::now();
        let result = self.add_document(name, text, dry_run).await;
        if worth_recording(dry_run, &result) {
            let mut reload = api_reload(&result, started);
            if let Ok(added) = &result {
                reload.added.push(added.document.id.clone());
                reload.channels_added = added.channels.len();
            }
            self.history.record(reload);
        }
        result
    }

    async fn add_document(
        &self,
        name: &str,
        text: String,
        dry_run: bool,
    ) -> Result<Added, RegistryError> {
        if !valid_file_name(name) {
            return Err(RegistryError::BadRequest(format!(
                "name '{name}' must be a file name ending in .yaml, .yml or .json"
            )));
        }
        let path = self.added_dir.join(name);
        let mut entries = self.entries.lock().await;
        let (api, compiled, warnings) = self.compile(&path, &text).await?;
        let taken = entries.contains_key(&api.id)
            || self.operations.has_api(&api.id)
            || tokio::fs::try_exists(&path).await.unwrap_or(false);
        if taken {
            return Err(RegistryError::Conflict(format!(
                "a document with id '{}' (or file '{name}') is already registered",
                api.id
            )));
        }
        if dry_run {
            return Ok(Added {
                document: info(&api, &path, Source::Api, compiled.table.len()),
                channels: compiled
                    .table
                    .routes()
                    .iter()
                    .map(|r| r.id.clone())
                    .collect(),
                operations: api
                    .operations
                    .iter()
                    .map(|o| format!("{}.{}", api.id, o.id).into())
                    .collect(),
                warnings,
                dry_run: true,
            });
        }
        tokio::fs::create_dir_all(&self.added_dir)
            .await
            .and(tokio::fs::write(&path, text.as_bytes()).await)
            .map_err(|e| {
                tracing::error!(path = %path.display(), error = %e, "cannot keep an added document");
                RegistryError::Storage
            })?;
        let (entry, channels, operations) =
            match self.install(&api, &compiled.table, path.clone(), Source::Api) {
                Ok(installed) => installed,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(e);
                }
            };
        let info = entry.info.clone();
        entries.insert(api.id.clone(), entry);
        drop(entries);
        self.changes.send_modify(|v| *v += 1);
        tracing::info!(
            document = %api.id,
            kind = info.kind,
            channels = channels.len(),
            operations = operations.len(),
            "document added"
        );
        Ok(Added {
            document: info,
            channels,
            operations,
            warnings,
            dry_run: false,
        })
    }

    /// Puts a compiled document into service: its routes join the hub, its operations become
    /// callable, its connectors start. Undone whole when a connector cannot start.
    fn install(
        &self,
        api: &Api,
        table: &RoutingTable,
        path: PathBuf,
        source: Source,
    ) -> Result<(Entry, Vec<ChannelId>, Vec<ChannelId>), RegistryError> {
        let channels = self
            .hub
            .add(table)
            .map_err(|e| RegistryError::Conflict(e.to_string()))?;
        let operations = self.operations.add(api);
        let mut entry = self.entry(api, path, source);
        if let Err((server, reason)) =
            entry
                .connectors
                .start(&*self.connectors, &self.hub, api, &self.shutdown, &|_| true)
        {
            entry.connectors.cancel_all();
            self.hub.remove_api(&api.id);
            self.operations.remove_api(&api.id);
            self.hub.connections().forget(&api.id);
            return Err(RegistryError::BadRequest(format!(
                "cannot start server {server}: {reason}"
            )));
        }
        Ok((entry, channels, operations))
    }

    async fn compile(
        &self,
        path: &Path,
        text: &str,
    ) -> Result<(Api, Compiled, Vec<String>), RegistryError> {
        // Loading and compiling are CPU work (hundreds of ms for a large document): off the
        // runtime's threads.
        let (path, text) = (path.to_owned(), text.to_owned());
        let connectors = self.connectors.clone();
        let added_dir = self.added_dir.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let loaded = spec::load_text(&path, &text).map_err(|f| f.errors)?;
            let api = loaded.apis.into_iter().next().ok_or_else(Vec::new)?;
            let table = connectors.compile(std::slice::from_ref(&api))?;
            let mut warnings = strings(&loaded.warnings);
            warnings.extend(table.warnings.iter().map(|w| w.to_string()));
            Ok::<_, Vec<SpecError>>((api, table, without_dir(&added_dir, warnings)))
        })
        .await
        .map_err(|e| RegistryError::BadRequest(format!("loader failed: {e}")))?;
        compiled.map_err(|errors| {
            RegistryError::Invalid(if errors.is_empty() {
                vec!["the text holds no API document".into()]
            } else {
                without_dir(&self.added_dir, strings(&errors))
            })
        })
    }

    /// Replaces a document added over the API by diff: unchanged channels keep everything
    /// (clients, log, cursors, upstream subscription), changed ones are swapped in place, new
    /// ones start, removed ones close their clients. The connectors reconnect only when a
    /// server, an address, a binding or the set of channels changed. Refused whole when the
    /// text does not compile, when a removed channel is used by a bridge or a call trigger,
    /// or when it breaks the old version and `allow_breaking` is false.
    pub async fn replace(
        &self,
        id: &str,
        text: String,
        allow_breaking: bool,
        dry_run: bool,
    ) -> Result<Replacement, RegistryError> {
        let started = Instant::now();
        let result = self
            .replace_document(id, text, allow_breaking, dry_run)
            .await;
        if worth_recording(dry_run, &result) {
            let mut reload = api_reload(&result, started);
            match &result {
                Ok(replaced) => {
                    reload.replaced.push(id.to_owned());
                    reload.bridges = replaced.bridges.clone();
                    count_channels(&mut reload, &replaced.diff);
                }
                Err(RegistryError::Breaking(diff)) => count_channels(&mut reload, diff),
                Err(_) => {}
            }
            self.history.record(reload);
        }
        result
    }

    async fn replace_document(
        &self,
        id: &str,
        text: String,
        allow_breaking: bool,
        dry_run: bool,
    ) -> Result<Replacement, RegistryError> {
        let mut entries = self.entries.lock().await;
        let Some(entry) = entries.get_mut(id) else {
            return Err(RegistryError::NotFound(id.to_owned()));
        };
        if entry.info.source == Source::File {
            return Err(RegistryError::Conflict(format!(
                "document '{id}' comes from the specs directory (file '{}'): edit the file there",
                entry.info.file
            )));
        }
        let (api, compiled, warnings) = self.compile(&entry.path, &text).await?;
        if api.id != id {
            return Err(RegistryError::BadRequest(format!(
                "the document's id is '{}', not '{id}': a replacement keeps its id (x-stepflow-id)",
                api.id
            )));
        }
        let (diff, reconnect) = self.compare(entry, &api, &compiled.table);
        let users = self.users_of_removed(id, &diff);
        if !users.is_empty() {
            return Err(RegistryError::Conflict(format!(
                "the change removes channels in use: {}",
                users.join("; ")
            )));
        }
        if !allow_breaking && !diff.breaking.is_empty() {
            return Err(RegistryError::Breaking(Box::new(diff)));
        }
        // The bridges, compiled against the table as it will be: a lane that converts to a
        // changed channel's schema, or needs a parameter it no longer has, is found now.
        let prospective = RoutingTable::from_routes(
            self.hub
                .routes()
                .map(|r| r.route())
                .filter(|r| r.api != id)
                .chain(compiled.table.routes().iter().cloned()),
        );
        let bridges = self
            .compile_bridges(None, prospective, None)
            .await
            .map_err(RegistryError::Invalid)?;
        let changed_channels: HashSet<ChannelId> = diff
            .channels
            .changed
            .iter()
            .map(|c| c.as_str().into())
            .collect();
        if dry_run {
            return Ok(Replacement {
                document: info(&api, &entry.path, Source::Api, compiled.table.len()),
                diff,
                reconnected: reconnect,
                bridges: self.bridges.plan(&bridges, &changed_channels),
                dry_run: true,
                warnings,
            });
        }
        write_atomically(&entry.path, &text).await.map_err(|e| {
            tracing::error!(path = %entry.path.display(), error = %e, "cannot keep a replaced document");
            RegistryError::Storage
        })?;
        let reconnect = self
            .swap(entry, api, &compiled.table, &diff, reconnect)
            .await?;
        let bridges = self.apply_bridges(bridges, &changed_channels).await?;
        let document = entry.info.clone();
        drop(entries);
        self.changes.send_modify(|v| *v += 1);
        Ok(Replacement {
            document,
            diff,
            reconnected: reconnect,
            bridges,
            dry_run: false,
            warnings,
        })
    }

    /// The diff between what `entry` serves and `api`, and whether its connectors must
    /// reconnect for it.
    fn compare(&self, entry: &Entry, api: &Api, table: &RoutingTable) -> (DocumentDiff, bool) {
        let old_routes: Vec<Arc<Route>> = self
            .hub
            .routes()
            .map(|r| r.route())
            .filter(|r| r.api == entry.info.id)
            .collect();
        let diff = breaking::diff(&entry.api, &old_routes, api, table.routes());
        let reconnect = needs_reconnect(&diff, &old_routes, table.routes());
        (diff, reconnect)
    }

    /// Bridges and triggers that use a channel or an operation `diff` removes from `id`.
    fn users_of_removed(&self, id: &str, diff: &DocumentDiff) -> Vec<String> {
        self.users_of_removed_by(id, diff, Users::All)
    }

    /// As [`Self::users_of_removed`], of one kind or both.
    fn users_of_removed_by(&self, id: &str, diff: &DocumentDiff, which: Users) -> Vec<String> {
        let operations: Vec<String> = diff
            .operations
            .removed
            .iter()
            .map(|o| format!("{id}.{o}"))
            .collect();
        self.users(
            &|c| diff.channels.removed.iter().any(|r| r == c) || operations.iter().any(|o| o == c),
            which,
        )
    }

    /// Applies a checked replacement to the running gateway. When `reconnect` (the routes'
    /// upstream side changed), the connectors of servers that changed, came or went restart;
    /// the others take the new routes up in place where they can (MQTT) and restart where they
    /// cannot. Returns whether any connector restarted.
    async fn swap(
        &self,
        entry: &mut Entry,
        api: Api,
        table: &RoutingTable,
        diff: &DocumentDiff,
        reconnect: bool,
    ) -> Result<bool, RegistryError> {
        let id = entry.info.id.clone();
        let changed: HashSet<&str> = diff
            .servers
            .added
            .iter()
            .chain(&diff.servers.removed)
            .chain(&diff.servers.changed)
            .map(String::as_str)
            .collect();
        // Decided before the routes change: a connector that restarts stops its intake first,
        // so no message is taken for a route that is about to go (the log keeps what the
        // broker redelivers after the reconnect).
        let mut restart: BTreeSet<String> = if reconnect {
            entry
                .api
                .servers
                .iter()
                .chain(&api.servers)
                .map(|s| s.id.clone())
                .filter(|s| {
                    changed.contains(s.as_str())
                        || !self.connectors.can_follow(&self.hub, &api, table, s)
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        entry.connectors.stop(&id, &|s| restart.contains(s)).await;
        for server in &restart {
            self.hub.forget_server(&crate::upstream::ServerKey {
                api: id.clone(),
                server: server.clone(),
            });
        }
        let replaced = self
            .hub
            .replace_api(&id, table)
            .map_err(|e| RegistryError::Conflict(e.to_string()))?;
        self.operations.remove_api(&id);
        self.operations.add(&api);
        if reconnect {
            for server in &api.servers {
                if restart.contains(&server.id) {
                    continue;
                }
                let key = crate::upstream::ServerKey {
                    api: id.clone(),
                    server: server.id.clone(),
                };
                // Running and able to follow: it takes the new routes up on its connection.
                // (One that cannot, against expectation, restarts.)
                let running = self.hub.connections().url(&key).is_some();
                if running && !self.hub.follow_routes(&key) {
                    entry.connectors.stop(&id, &|s| s == server.id).await;
                    self.hub.forget_server(&key);
                    restart.insert(server.id.clone());
                }
            }
            if let Err((server, reason)) =
                entry
                    .connectors
                    .start(&*self.connectors, &self.hub, &api, &self.shutdown, &|s| {
                        restart.contains(s)
                    })
            {
                // The new text is in place and served; its connector retries or reports.
                tracing::error!(document = %id, server = %server, reason = %reason, "cannot start a replaced document's connector");
            }
        }
        let reconnected = !restart.is_empty();
        if reconnected {
            let servers: Vec<&String> = restart.iter().collect();
            tracing::info!(document = %id, servers = ?servers, "connectors restarted for the change");
        }
        self.swapped(entry, api, table, diff, &replaced, reconnected);
        Ok(reconnected)
    }

    /// Records a swap in `entry`, logs it, and says whether the connectors reconnected.
    fn swapped(
        &self,
        entry: &mut Entry,
        api: Api,
        table: &RoutingTable,
        diff: &DocumentDiff,
        replaced: &crate::hub::Replaced,
        reconnected: bool,
    ) {
        entry.path = api.source.file.clone();
        entry.info = info(&api, &entry.path, entry.info.source, table.len());
        entry.api = Arc::new(api);
        tracing::info!(
            document = %entry.info.id,
            added = replaced.added.len(),
            changed = replaced.changed.len(),
            unchanged = replaced.unchanged.len(),
            removed = replaced.removed.len(),
            breaking = diff.breaking.len(),
            reconnected,
            "document replaced"
        );
    }

    /// Removes a document added over the API: its clients' streams end, its connectors
    /// disconnect, its operations go. Its logs stay until retention removes them, or go now
    /// with `purge`. Refused while a bridge or a call trigger uses one of its channels.
    pub async fn remove(
        &self,
        id: &str,
        purge: bool,
        dry_run: bool,
    ) -> Result<Removed, RegistryError> {
        let started = Instant::now();
        let result = self.remove_document(id, purge, dry_run).await;
        if worth_recording(dry_run, &result) {
            let mut reload = api_reload(&result, started);
            if let Ok(removed) = &result {
                reload.removed.push(id.to_owned());
                reload.channels_removed = removed.channels.len();
            }
            self.history.record(reload);
        }
        result
    }

    async fn remove_document(
        &self,
        id: &str,
        purge: bool,
        dry_run: bool,
    ) -> Result<Removed, RegistryError> {
        let mut entries = self.entries.lock().await;
        let entry = entries
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        if entry.info.source == Source::File {
            return Err(RegistryError::Conflict(format!(
                "document '{id}' comes from the specs directory (file '{}'): remove the file there",
                entry.info.file
            )));
        }
        let users = self.users_of_document(id);
        if !users.is_empty() {
            return Err(RegistryError::Conflict(format!(
                "document '{id}' is in use: {}",
                users.join("; ")
            )));
        }
        if dry_run {
            return Ok(Removed {
                document: entry.info.clone(),
                channels: self
                    .hub
                    .routes()
                    .filter(|r| r.route().api == id)
                    .map(|r| r.id().clone())
                    .collect(),
                operations: self.operations.count_api(id),
                purged_messages: 0,
                dry_run: true,
            });
        }
        let Some(entry) = entries.remove(id) else {
            return Err(RegistryError::NotFound(id.to_owned()));
        };
        let removed = self.uninstall(entry, purge).await;
        if let Err(e) = tokio::fs::remove_file(&self.added_dir.join(&removed.document.file)).await {
            tracing::error!(document = %id, error = %e, "cannot delete a removed document's file: it loads again at the next start");
        }
        drop(entries);
        self.changes.send_modify(|v| *v += 1);
        Ok(removed)
    }

    fn users_of_document(&self, id: &str) -> Vec<String> {
        self.users_of_document_by(id, Users::All)
    }

    fn users_of_document_by(&self, id: &str, which: Users) -> Vec<String> {
        let prefix = format!("{id}.");
        self.users(&|c| c.starts_with(&prefix), which)
    }

    /// Takes a document out of service: intake stops, its routes close their clients, its
    /// operations go, and with `purge` its logs.
    async fn uninstall(&self, mut entry: Entry, purge: bool) -> Removed {
        let id = entry.info.id.clone();
        // Intake stops first, so nothing is appended to a log that is about to be purged.
        entry.connectors.stop(&id, &|_| true).await;
        let routes = self.hub.remove_api(&id);
        let operations = self.operations.remove_api(&id);
        self.hub.connections().forget(&id);
        let mut purged_messages = 0;
        if purge {
            for route in &routes {
                for log in [&route.log, &route.dead_letters] {
                    match self.hub.store().purge(log).await {
                        Ok(n) => purged_messages += n,
                        Err(e) => {
                            tracing::warn!(channel = %route.id(), error = %e, "cannot purge a removed channel's log")
                        }
                    }
                }
            }
        }
        tracing::info!(document = %id, channels = routes.len(), operations, purge, "document removed");
        Removed {
            document: entry.info,
            channels: routes.iter().map(|r| r.id().clone()).collect(),
            operations,
            purged_messages,
            dry_run: false,
        }
    }

    /// Reloads the specs directories (the file watcher and SIGHUP): every file is loaded and
    /// compiled with the documents added over the API, as a restart would; then new documents
    /// are added, changed ones replaced by diff, and documents whose file is gone removed
    /// (their logs stay for retention). Refused whole, with nothing running changed, when
    /// anything does not compile or a bridge or trigger would lose its channel.
    pub async fn reload_files(&self, trigger: Trigger) -> Reload {
        let started = Instant::now();
        let mut entries = self.entries.lock().await;
        let mut reload = self.reload_files_locked(&mut entries, trigger).await;
        drop(entries);
        reload.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        if matches!(reload.outcome, Outcome::Applied | Outcome::Failed) {
            self.changes.send_modify(|v| *v += 1);
        }
        self.history.record(reload.clone());
        reload
    }

    async fn reload_files_locked(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        trigger: Trigger,
    ) -> Reload {
        let refused = |errors: Vec<String>| {
            let mut reload = Reload::new(trigger, Outcome::Refused);
            reload.errors = errors;
            reload
        };
        // Loaded and compiled off the runtime's threads, as one table with the documents
        // added over the API, as a restart would: ids and channels taken twice are found here.
        let dirs = self.file_dirs.clone();
        let connectors = self.connectors.clone();
        let added: Vec<Api> = entries
            .values()
            .filter(|e| e.info.source == Source::Api)
            .map(|e| (*e.api).clone())
            .collect();
        let loaded = tokio::task::spawn_blocking(move || {
            let report = spec::load_all(&dirs);
            let mut everything = report.apis.clone();
            everything.extend(added);
            let compiled = connectors.compile(&everything);
            (report, everything, compiled)
        })
        .await;
        let (report, everything, compiled) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => return refused(vec![format!("loader failed: {e}")]),
        };
        let mut errors = strings(&report.errors);
        let files = report.apis;
        let file_ids: std::collections::HashSet<String> =
            files.iter().map(|a| a.id.clone()).collect();
        let table = match compiled {
            Ok(compiled) => compiled.table,
            Err(e) => {
                errors.extend(strings(&e));
                RoutingTable::default()
            }
        };
        if errors.is_empty() && everything.is_empty() {
            errors.push("no API document would remain: the specs directories are empty".into());
        }
        for api in &files {
            if let Some(entry) = entries.get(&api.id)
                && entry.info.source == Source::Api
            {
                errors.push(format!(
                    "{}: id '{}' is taken by a document added over the API",
                    api.source.file.display(),
                    api.id
                ));
            }
        }
        if !errors.is_empty() {
            errors.dedup();
            return refused(errors);
        }

        // The plan: what each document's change is, checked before anything is applied.
        let mut additions = Vec::new();
        let mut replacements = Vec::new();
        let mut renamed = Vec::new();
        // Bridges compiled against the new table are consistent with it; the running ones
        // that would lose a channel are named only when the new set does not compile.
        let mut bridge_users = Vec::new();
        for api in files {
            match entries.get(&api.id) {
                None => {
                    let own = table.of_api(&api.id);
                    additions.push((api, own));
                }
                Some(entry) if comparable(&entry.api) == comparable(&api) => {
                    if entry.path != api.source.file {
                        renamed.push((api.id.clone(), api.source.file.clone()));
                    }
                }
                Some(entry) => {
                    let own = table.of_api(&api.id);
                    let (diff, reconnect) = self.compare(entry, &api, &own);
                    errors.extend(self.users_of_removed_by(&api.id, &diff, Users::Triggers));
                    bridge_users.extend(
                        self.users_of_removed_by(&api.id, &diff, Users::Bridges)
                            .into_iter()
                            .map(|u| {
                                format!("document '{}' would take away what {u} uses", api.id)
                            }),
                    );
                    replacements.push((api, own, diff, reconnect));
                }
            }
        }
        let removals: Vec<String> = entries
            .values()
            .filter(|e| e.info.source == Source::File && !file_ids.contains(&e.info.id))
            .map(|e| e.info.id.clone())
            .collect();
        for id in &removals {
            let gone = |users: Vec<String>| {
                users
                    .into_iter()
                    .map(|u| format!("document '{id}' (its file is gone) is in use: {u}"))
                    .collect::<Vec<_>>()
            };
            errors.extend(gone(self.users_of_document_by(id, Users::Triggers)));
            bridge_users.extend(gone(self.users_of_document_by(id, Users::Bridges)));
        }
        let changed_channels: HashSet<ChannelId> = replacements
            .iter()
            .flat_map(|(_, _, diff, _)| {
                diff.channels
                    .changed
                    .iter()
                    .map(|c| ChannelId::from(c.as_str()))
            })
            .collect();
        let bridges = match self.compile_bridges(None, table, Some(&everything)).await {
            Ok(bridges) => Some(bridges),
            Err(bridge_errors) => {
                errors.extend(bridge_users);
                errors.extend(bridge_errors);
                None
            }
        };
        if !errors.is_empty() {
            errors.dedup();
            let mut reload = refused(errors);
            reload.breaking = replacements
                .iter()
                .map(|(_, _, d, _)| d.breaking.len())
                .sum();
            return reload;
        }
        let bridges = bridges.unwrap_or_default();
        let bridge_changes = self.bridges.plan(&bridges, &changed_channels);
        if additions.is_empty()
            && replacements.is_empty()
            && removals.is_empty()
            && bridge_changes.is_empty()
        {
            for (id, path) in renamed {
                if let Some(entry) = entries.get_mut(&id) {
                    entry.info.file = file_name(&path);
                    entry.path = path;
                }
            }
            return Reload::new(trigger, Outcome::Unchanged);
        }

        // Applied: removals first (they free ids and addresses), then replacements, then
        // additions. A step that fails is reported; the others still apply.
        let mut reload = Reload::new(trigger, Outcome::Applied);
        for id in removals {
            if let Some(entry) = entries.remove(&id) {
                let removed = self.uninstall(entry, false).await;
                reload.channels_removed += removed.channels.len();
                reload.removed.push(id);
            }
        }
        for (api, own, diff, reconnect) in replacements {
            let id = api.id.clone();
            let Some(entry) = entries.get_mut(&id) else {
                continue;
            };
            match self.swap(entry, api, &own, &diff, reconnect).await {
                Ok(_) => {
                    count_channels(&mut reload, &diff);
                    reload.replaced.push(id);
                }
                Err(e) => reload.errors.push(format!("document '{id}': {e}")),
            }
        }
        for (id, path) in renamed {
            if let Some(entry) = entries.get_mut(&id) {
                entry.info.file = file_name(&path);
                entry.path = path;
            }
        }
        for (api, own) in additions {
            let path = api.source.file.clone();
            match self.install(&api, &own, path, Source::File) {
                Ok((entry, channels, _)) => {
                    reload.channels_added += channels.len();
                    reload.added.push(api.id.clone());
                    entries.insert(api.id.clone(), entry);
                }
                Err(e) => reload
                    .errors
                    .push(format!("{}: {e}", api.source.file.display())),
            }
        }
        // Bridges last: their channels are in place now.
        match self.apply_bridges(bridges, &changed_channels).await {
            Ok(changes) => reload.bridges = changes,
            Err(e) => reload.errors.push(format!("bridges: {e}")),
        }
        if !reload.errors.is_empty() {
            reload.outcome = Outcome::Failed;
        }
        reload
    }

    /// Bridges and triggers (`which`) that use a channel or an operation for which `ours`
    /// holds.
    fn users(&self, ours: &dyn Fn(&str) -> bool, which: Users) -> Vec<String> {
        let mut users = Vec::new();
        let bridges = if which == Users::Triggers {
            Default::default()
        } else {
            self.bridges.current()
        };
        for bridge in bridges.iter() {
            for lane in &bridge.lanes {
                let target = match &lane.target {
                    Target::Channel(c) => &**c,
                    Target::Operation(o) => o.as_str(),
                };
                if ours(&lane.source) || ours(target) {
                    users.push(format!(
                        "bridge '{}' ({} → {})",
                        bridge.name,
                        lane.source,
                        lane.target.label()
                    ));
                }
            }
        }
        if which != Users::Bridges {
            users.extend(
                self.pinned
                    .iter()
                    .filter(|c| ours(c))
                    .map(|c| format!("a call trigger on '{c}'")),
            );
        }
        users.dedup();
        users
    }

    /// Waits for every document's connectors after the shutdown token was cancelled.
    pub async fn connectors_stopped(&self) {
        let trackers: Vec<TaskTracker> = {
            let entries = self.entries.lock().await;
            entries
                .values()
                .flat_map(|e| e.connectors.trackers())
                .collect()
        };
        for tracker in trackers {
            tracker.close();
            tracker.wait().await;
        }
    }

    /// Connector tasks still running.
    pub async fn connector_tasks(&self) -> usize {
        let entries = self.entries.lock().await;
        entries.values().map(|e| e.connectors.len()).sum()
    }
}

/// Which users of a channel a check looks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Users {
    All,
    Bridges,
    Triggers,
}

/// Whether a change over the API goes into the history (and its metric and log line): a dry
/// run changes nothing, and a request for something that is not there tried no change.
fn worth_recording<T>(dry_run: bool, result: &Result<T, RegistryError>) -> bool {
    !dry_run
        && !matches!(
            result,
            Err(RegistryError::NotFound(_) | RegistryError::NoBridge(_))
        )
}

/// A change over the API as the history keeps it.
fn api_reload<T>(result: &Result<T, RegistryError>, started: Instant) -> Reload {
    let mut reload = match result {
        Ok(_) => Reload::new(Trigger::Api, Outcome::Applied),
        Err(RegistryError::Storage) => Reload::new(Trigger::Api, Outcome::Failed),
        Err(_) => Reload::new(Trigger::Api, Outcome::Refused),
    };
    if let Err(e) = result {
        reload.errors = match e {
            RegistryError::Invalid(errors) => errors.clone(),
            RegistryError::Breaking(diff) => diff
                .breaking
                .iter()
                .map(|c| format!("{}: {}", c.path, c.detail))
                .collect(),
            other => vec![other.to_string()],
        };
    }
    reload.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    reload
}

fn count_channels(reload: &mut Reload, diff: &DocumentDiff) {
    reload.channels_added += diff.channels.added.len();
    reload.channels_changed += diff.channels.changed.len();
    reload.channels_removed += diff.channels.removed.len();
    reload.breaking += diff.breaking.len();
}

/// A document as compared between two reloads: everything but where it was read from.
fn comparable(api: &Api) -> serde_json::Value {
    let mut value = serde_json::to_value(api).unwrap_or(serde_json::Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.remove("source");
    }
    value
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn info(api: &Api, path: &Path, source: Source, channels: usize) -> DocumentInfo {
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let (kind, spec_version) = match &api.kind {
        DocumentKind::AsyncApi(v) => ("asyncapi", v.clone()),
        DocumentKind::OpenApi(v) => ("openapi", v.clone()),
    };
    DocumentInfo {
        id: api.id.clone(),
        kind,
        spec_version,
        title: api.title.clone(),
        version: api.version.clone(),
        source,
        file: file_name(path),
        channels,
        operations: api.operations.len(),
        added_at: chrono::DateTime::<chrono::Utc>::from(written)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }
}

/// Whether the connectors of a document must reconnect for `diff`: they hold the routes
/// they subscribe for, so a server, an address, a binding or the set of channels changing
/// needs new ones. A schema or description change does not.
fn needs_reconnect(diff: &DocumentDiff, old: &[Arc<Route>], new: &[Arc<Route>]) -> bool {
    if !diff.servers.is_empty()
        || !diff.channels.added.is_empty()
        || !diff.channels.removed.is_empty()
    {
        return true;
    }
    let upstream =
        |r: &Route| serde_json::to_value((&r.address, &r.upstreams, r.direction, &r.delivery)).ok();
    diff.channels.changed.iter().any(|id| {
        let find = |routes: &[Arc<Route>]| routes.iter().find(|r| *r.id == **id).cloned();
        match (find(old), find(new)) {
            (Some(o), Some(n)) => upstream(&o) != upstream(&n),
            _ => true,
        }
    })
}

/// Writes `text` to `path` through a temporary file and a rename: a crash leaves the old
/// version or the new one, never half of one.
async fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("partial");
    tokio::fs::write(&temporary, text.as_bytes()).await?;
    tokio::fs::rename(&temporary, path).await
}

/// Problems as a client is shown them: files of the data directory by name only (where the
/// operator keeps the data is not the client's business).
fn without_dir(dir: &Path, problems: Vec<String>) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    problems
        .into_iter()
        .map(|p| p.strip_prefix(&prefix).map(str::to_owned).unwrap_or(p))
        .collect()
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(T::to_string).collect()
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        _ => "application/yaml",
    }
}

/// A plain file name of a document: no directories, no hidden files.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_document_file_names_are_kept() {
        for good in ["iot.yaml", "a-b_c.json", "v1.2.yml"] {
            assert!(valid_file_name(good), "{good}");
        }
        for bad in [
            "",
            "../x.yaml",
            ".hidden.yaml",
            "x.txt",
            "a/b.yaml",
            "x y.yaml",
        ] {
            assert!(!valid_file_name(bad), "{bad}");
        }
    }
}
