//! The bridges running now, changed by diff while the gateway runs.
//!
//! Each bridge's lanes run under a token of their own, so one bridge can stop without the
//! others noticing. A change is applied by comparing definitions: a bridge whose definition and
//! channels are unchanged keeps its lanes running; a changed one stops, then starts again from
//! its cursors (a lane whose source or target changed starts afresh); a new one starts as a
//! bridge does at start; a removed one stops and its cursors go.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Bridge;
use super::lane::{self, CURSORS};
use crate::calls::Operations;
use crate::hub::Hub;
use crate::routing::ChannelId;
use crate::store;

/// How long a stopping bridge's lanes get to commit their cursors.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a change did to the bridges, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BridgeChanges {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl BridgeChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

struct Lanes {
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The running bridges.
pub struct RunningBridges {
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    /// Read on every `/api/v1/bridges` request and by the registry's checks; replaced whole.
    current: RwLock<Arc<Vec<Arc<Bridge>>>>,
    /// One change at a time; the lanes of each bridge.
    running: Mutex<HashMap<String, Lanes>>,
    /// Parent of every bridge's token: the daemon's shutdown stops them all.
    shutdown: CancellationToken,
}

impl RunningBridges {
    pub fn new(hub: Arc<Hub>, operations: Arc<Operations>, shutdown: CancellationToken) -> Self {
        RunningBridges {
            hub,
            operations,
            current: RwLock::new(Arc::new(Vec::new())),
            running: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// The bridges running now.
    pub fn current(&self) -> Arc<Vec<Arc<Bridge>>> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Bridge>> {
        self.current().iter().find(|b| b.name == name).cloned()
    }

    /// What replacing the running bridges with `new` would do. A bridge counts as changed
    /// when its definition, its file, or the compiled definition of a channel it reads or
    /// writes changed (`changed_channels`): its lanes hold what they compiled from those.
    pub fn plan(
        &self,
        new: &[Arc<Bridge>],
        changed_channels: &HashSet<ChannelId>,
    ) -> BridgeChanges {
        let current = self.current();
        let mut changes = BridgeChanges::default();
        for bridge in new {
            match current.iter().find(|b| b.name == bridge.name) {
                None => changes.added.push(bridge.name.clone()),
                Some(old)
                    if old.definition == bridge.definition
                        && old.file == bridge.file
                        && !touches(old, changed_channels) =>
                {
                    changes.unchanged.push(bridge.name.clone())
                }
                Some(_) => changes.changed.push(bridge.name.clone()),
            }
        }
        changes.removed = current
            .iter()
            .filter(|b| !new.iter().any(|n| n.name == b.name))
            .map(|b| b.name.clone())
            .collect();
        for names in [
            &mut changes.added,
            &mut changes.changed,
            &mut changes.removed,
            &mut changes.unchanged,
        ] {
            names.sort();
        }
        changes
    }

    /// Replaces the running bridges with `new` by diff (see [`Self::plan`]). A cursor is kept
    /// for a lane that reads the same source for the same target, so a changed bridge resumes
    /// where it was; every other cursor of a changed or removed bridge is deleted.
    pub async fn apply(
        &self,
        mut new: Vec<Arc<Bridge>>,
        changed_channels: &HashSet<ChannelId>,
    ) -> Result<BridgeChanges, store::Error> {
        new.sort_by(|a, b| a.name.cmp(&b.name));
        let mut running = self.running.lock().await;
        let changes = self.plan(&new, changed_channels);
        let current = self.current();
        let store = self.hub.store();
        for name in changes.changed.iter().chain(&changes.removed) {
            if let Some(lanes) = running.remove(name) {
                stop(name, lanes).await;
            }
            let old = current.iter().find(|b| &b.name == name);
            let kept = new.iter().find(|b| &b.name == name);
            for lane in old.iter().flat_map(|b| &b.lanes) {
                let resumes = kept.is_some_and(|b| {
                    b.lanes
                        .iter()
                        .any(|l| l.target == lane.target && l.source == lane.source)
                });
                if !resumes {
                    store.remove_cursor(CURSORS, &lane.cursor_key()).await?;
                }
            }
        }
        let starting: Vec<Arc<Bridge>> = new
            .iter()
            .filter(|b| changes.added.contains(&b.name) || changes.changed.contains(&b.name))
            .cloned()
            .collect();
        // Cursors before the lanes start (and, at start, before the connectors): nothing that
        // arrives from now on can be missed.
        lane::prepare_cursors(store, &self.hub, &starting).await?;
        for bridge in &starting {
            let lanes = Lanes {
                stop: self.shutdown.child_token(),
                tasks: TaskTracker::new(),
            };
            lane::start(
                self.hub.clone(),
                self.operations.clone(),
                std::slice::from_ref(bridge),
                lanes.stop.clone(),
                &lanes.tasks,
            );
            lanes.tasks.close();
            running.insert(bridge.name.clone(), lanes);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        if !changes.is_empty() {
            tracing::info!(
                added = changes.added.len(),
                changed = changes.changed.len(),
                removed = changes.removed.len(),
                unchanged = changes.unchanged.len(),
                "bridges changed"
            );
        }
        Ok(changes)
    }

    /// Waits for every lane after the shutdown token was cancelled.
    pub async fn stopped(&self) {
        let running = self.running.lock().await;
        for lanes in running.values() {
            lanes.tasks.wait().await;
        }
    }
}

/// Whether `bridge` reads or writes one of `channels`.
fn touches(bridge: &Bridge, channels: &HashSet<ChannelId>) -> bool {
    channels.contains(&bridge.source)
        || bridge.lanes.iter().any(|l| match &l.target {
            super::Target::Channel(c) => channels.contains(c),
            super::Target::Operation(_) => false,
        })
}

async fn stop(name: &str, lanes: Lanes) {
    lanes.stop.cancel();
    if tokio::time::timeout(STOP_TIMEOUT, lanes.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(bridge = %name, "a bridge's lanes did not stop in time");
    }
}
