//! Bridges in the live registry: put and removed over the API (`/api/v1/bridges/{name}`),
//! reloaded from the bridges directory with the specs, and always compiled as a whole set
//! against the routing table they will run with.
//!
//! A bridge put over the API is kept as `{name}.json` in the data directory (`bridges:
//! {name: definition}`, the same form as a file of the bridges directory) and loads with the
//! rest at the next start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Outcome, RegistryError, Source, SpecRegistry, api_reload, strings, without_dir,
    worth_recording, write_atomically,
};
use crate::bridge::running::BridgeChanges;
use crate::bridge::{self, Bridge};
use crate::routing::{ChannelId, RoutingTable};
use crate::spec::{Api, SpecError};

/// What a bridge change did (or, with `dry_run`, would do).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeChange {
    /// The bridge as it runs after the change (absent after a removal).
    pub bridge: Option<Value>,
    pub changes: BridgeChanges,
    pub dry_run: bool,
}

impl SpecRegistry {
    /// Where a bridge came from.
    pub fn bridge_source(&self, bridge: &Bridge) -> Source {
        if bridge.file.starts_with(&self.added_bridges_dir) {
            Source::Api
        } else {
            Source::File
        }
    }

    /// The running bridges.
    pub fn bridges(&self) -> &Arc<crate::bridge::running::RunningBridges> {
        &self.bridges
    }

    /// Creates or replaces bridge `name` with `definition` (its mapping: `from`, `to`, …).
    /// The whole set is compiled first against the running table; a bridge that does not
    /// compile is refused with every `file#pointer: reason`, and nothing running changes.
    /// An unchanged bridge keeps running; a changed one resumes from its cursors.
    pub async fn put_bridge(
        &self,
        name: &str,
        definition: Value,
        dry_run: bool,
    ) -> Result<BridgeChange, RegistryError> {
        let started = Instant::now();
        let result = self.put_bridge_locked(name, definition, dry_run).await;
        if worth_recording(dry_run, &result) {
            let mut reload = api_reload(&result, started);
            if let Ok(change) = &result {
                reload.bridges = change.changes.clone();
                if change.changes.is_empty() {
                    reload.outcome = Outcome::Unchanged;
                }
            }
            self.history.record(reload);
        }
        result
    }

    async fn put_bridge_locked(
        &self,
        name: &str,
        definition: Value,
        dry_run: bool,
    ) -> Result<BridgeChange, RegistryError> {
        if !valid_bridge_name(name) {
            return Err(RegistryError::BadRequest(format!(
                "bridge name '{name}' must be 1 to 128 letters, digits, '-' or '_'"
            )));
        }
        if !definition.is_object() {
            return Err(RegistryError::BadRequest(
                "the body is the bridge's definition: a mapping with `from` and `to`".into(),
            ));
        }
        let entries = self.entries.lock().await;
        self.refuse_file_bridge(name, "edit the file there")?;
        let path = self.added_bridges_dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(&json!({ "bridges": { name: definition } }))
            .map_err(|e| RegistryError::BadRequest(e.to_string()))?;
        let table = self.running_table();
        let bridges = self
            .compile_bridges(Some((path.clone(), Some(text.clone()))), table, None)
            .await
            .map_err(RegistryError::Invalid)?;
        let changes = self.bridges.plan(&bridges, &HashSet::new());
        let described = bridges
            .iter()
            .find(|b| b.name == name)
            .map(|b| bridge::describe(b));
        if dry_run || changes.is_empty() {
            return Ok(BridgeChange {
                bridge: described,
                changes,
                dry_run,
            });
        }
        tokio::fs::create_dir_all(&self.added_bridges_dir)
            .await
            .map_err(|e| {
                tracing::error!(path = %self.added_bridges_dir.display(), error = %e, "cannot create the bridges directory");
                RegistryError::Storage
            })?;
        write_atomically(&path, &text).await.map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "cannot keep a bridge");
            RegistryError::Storage
        })?;
        let changes = self.apply_bridges(bridges, &HashSet::new()).await?;
        drop(entries);
        self.changes.send_modify(|v| *v += 1);
        Ok(BridgeChange {
            bridge: described,
            changes,
            dry_run: false,
        })
    }

    /// Stops and removes bridge `name` (put over the API); its cursors go with it.
    pub async fn remove_bridge(
        &self,
        name: &str,
        dry_run: bool,
    ) -> Result<BridgeChange, RegistryError> {
        let started = Instant::now();
        let result = self.remove_bridge_locked(name, dry_run).await;
        if worth_recording(dry_run, &result) {
            let mut reload = api_reload(&result, started);
            if let Ok(change) = &result {
                reload.bridges = change.changes.clone();
            }
            self.history.record(reload);
        }
        result
    }

    async fn remove_bridge_locked(
        &self,
        name: &str,
        dry_run: bool,
    ) -> Result<BridgeChange, RegistryError> {
        let entries = self.entries.lock().await;
        if self.bridges.get(name).is_none() {
            return Err(RegistryError::NoBridge(name.to_owned()));
        }
        self.refuse_file_bridge(name, "remove it from the file there")?;
        let path = self.added_bridges_dir.join(format!("{name}.json"));
        let remaining: Vec<Arc<Bridge>> = self
            .bridges
            .current()
            .iter()
            .filter(|b| b.name != name)
            .cloned()
            .collect();
        let changes = self.bridges.plan(&remaining, &HashSet::new());
        if dry_run {
            return Ok(BridgeChange {
                bridge: None,
                changes,
                dry_run: true,
            });
        }
        tokio::fs::remove_file(&path).await.map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "cannot delete a bridge's file");
            RegistryError::Storage
        })?;
        let changes = self.apply_bridges(remaining, &HashSet::new()).await?;
        drop(entries);
        self.changes.send_modify(|v| *v += 1);
        Ok(BridgeChange {
            bridge: None,
            changes,
            dry_run: false,
        })
    }

    fn refuse_file_bridge(&self, name: &str, what_to_do: &str) -> Result<(), RegistryError> {
        match self.bridges.get(name) {
            Some(b) if self.bridge_source(&b) == Source::File => {
                Err(RegistryError::Conflict(format!(
                    "bridge '{name}' comes from the bridges directory (file '{}'): {what_to_do}",
                    super::file_name(&b.file)
                )))
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn apply_bridges(
        &self,
        bridges: Vec<Arc<Bridge>>,
        changed_channels: &HashSet<ChannelId>,
    ) -> Result<BridgeChanges, RegistryError> {
        self.bridges
            .apply(bridges, changed_channels)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot keep the bridges' cursors");
                RegistryError::Storage
            })
    }

    /// The routing table running now.
    pub(super) fn running_table(&self) -> RoutingTable {
        RoutingTable::from_routes(self.hub.routes().map(|r| r.route()))
    }

    /// The bridges to start with: the directory's and those put over the API, compiled
    /// against the running table. Errors keep their full paths (they are the operator's).
    pub async fn load_bridges(&self) -> Result<Vec<Arc<Bridge>>, Vec<SpecError>> {
        self.compile_bridge_files(None, self.running_table(), None)
            .await
    }

    /// [`Self::compile_bridge_files`], its errors as a client is shown them.
    pub(super) async fn compile_bridges(
        &self,
        overlay: Option<(PathBuf, Option<String>)>,
        table: RoutingTable,
        apis: Option<&[Api]>,
    ) -> Result<Vec<Arc<Bridge>>, Vec<String>> {
        self.compile_bridge_files(overlay, table, apis)
            .await
            .map_err(|errors| without_dir(&self.added_bridges_dir, strings(&errors)))
    }

    /// Reads every bridge file (the bridges directory's and those put over the API, with
    /// `overlay` put in place of — or, with no text, instead of — one of them) and compiles
    /// the set against `table`. Operations are those of `apis` when given (a reload's new
    /// documents), else those running.
    async fn compile_bridge_files(
        &self,
        overlay: Option<(PathBuf, Option<String>)>,
        table: RoutingTable,
        apis: Option<&[Api]>,
    ) -> Result<Vec<Arc<Bridge>>, Vec<SpecError>> {
        let dirs: Vec<PathBuf> = self
            .bridge_dir
            .iter()
            .cloned()
            .chain(Some(self.added_bridges_dir.clone()))
            .collect();
        let callable: Option<HashSet<String>> = apis.map(http_operation_ids);
        let operations = self.operations.clone();
        let added_dir = self.added_bridges_dir.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            for dir in &dirs {
                // The data directory's bridges directory exists once a bridge was put.
                if *dir == added_dir && !dir.exists() {
                    continue;
                }
                files.extend(bridge::read_dir(dir).map_err(|e| vec![e])?);
            }
            if let Some((path, text)) = overlay {
                files.retain(|(p, _)| *p != path);
                if let Some(text) = text {
                    files.push((path, text));
                }
            }
            let has_operation = |id: &str| match &callable {
                // Broker request-reply operations are those of the start; HTTP ones follow
                // the documents.
                Some(ids) => {
                    ids.contains(id)
                        || (operations.get(id).is_none() && operations.log_of(id).is_some())
                }
                None => operations.log_of(id).is_some(),
            };
            bridge::compile(&files, &table, &has_operation)
        })
        .await
        .map_err(|e| {
            vec![SpecError::new(
                crate::spec::Location::new(&self.added_bridges_dir, ""),
                crate::spec::SpecErrorKind::Invalid(format!("bridge loader failed: {e}")),
            )]
        })?;
        compiled.map(|bridges| bridges.into_iter().map(Arc::new).collect())
    }
}

/// Ids of the HTTP operations `apis` make callable (`{api}.{channel}`).
fn http_operation_ids(apis: &[Api]) -> HashSet<String> {
    apis.iter()
        .flat_map(|api| {
            api.operations
                .iter()
                .filter(|op| op.http.is_some())
                .map(move |op| format!("{}.{}", api.id, op.channel))
        })
        .collect()
}

/// A bridge name: a file name of its own in the data directory, and a URL segment.
fn valid_bridge_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}
