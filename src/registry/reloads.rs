//! The registry's change history: every change that was tried (over the API, by the file
//! watcher, on SIGHUP), whether it was applied, and why not — `GET /api/v1/reloads` and
//! `stepflow_reloads_total{trigger,outcome}`.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use crate::bridge::running::BridgeChanges;

/// Changes attempted, by what started them and how they ended.
pub const RELOADS: &str = "stepflow_reloads_total";

/// How many results `GET /api/v1/reloads` keeps.
const KEPT: usize = 50;

/// What started a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `POST`/`PUT`/`DELETE /api/v1/specs` and `/api/v1/bridges/{name}`, `POST /api/v1/reloads`.
    Api,
    /// A file of the specs or bridges directories changed.
    Watch,
    /// SIGHUP.
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Watch => "watch",
            Trigger::Signal => "signal",
        }
    }
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Compiled, checked and in service.
    Applied,
    /// Nothing differed from what runs.
    Unchanged,
    /// Did not compile, or would have left a bridge or a trigger without its channel, or
    /// broke the old version when that was not allowed: nothing running changed.
    Refused,
    /// Compiled and checked, but applying one of its steps failed (the log says which).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// One change as `GET /api/v1/reloads` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reload {
    /// RFC 3339, to the millisecond.
    pub at: String,
    pub trigger: Trigger,
    pub outcome: Outcome,
    /// Documents added, replaced and removed (ids).
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    /// Channels added, changed and removed across the documents.
    pub channels_added: usize,
    pub channels_changed: usize,
    pub channels_removed: usize,
    /// Breaking changes the change carried (applied or not).
    pub breaking: usize,
    /// Bridges added, changed and removed (names); unchanged ones are not listed.
    pub bridges: BridgeChanges,
    /// Why it was refused or failed: `file#pointer: reason`, or the reason in words.
    pub errors: Vec<String>,
    /// How long compiling, checking and applying took.
    pub duration_ms: f64,
}

impl Reload {
    pub fn new(trigger: Trigger, outcome: Outcome) -> Self {
        Reload {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            trigger,
            outcome,
            added: Vec::new(),
            replaced: Vec::new(),
            removed: Vec::new(),
            channels_added: 0,
            channels_changed: 0,
            channels_removed: 0,
            breaking: 0,
            bridges: BridgeChanges::default(),
            errors: Vec::new(),
            duration_ms: 0.0,
        }
    }
}

/// The last results, newest first.
#[derive(Default)]
pub struct History {
    recent: Mutex<VecDeque<Reload>>,
}

impl History {
    /// Counts `reload`, logs it once and keeps it.
    pub fn record(&self, reload: Reload) {
        metrics::counter!(
            RELOADS,
            "trigger" => reload.trigger.as_str(),
            "outcome" => reload.outcome.as_str()
        )
        .increment(1);
        match reload.outcome {
            Outcome::Applied => tracing::info!(
                trigger = reload.trigger.as_str(),
                added = ?reload.added,
                replaced = ?reload.replaced,
                removed = ?reload.removed,
                bridges_added = ?reload.bridges.added,
                bridges_changed = ?reload.bridges.changed,
                bridges_removed = ?reload.bridges.removed,
                breaking = reload.breaking,
                duration_ms = reload.duration_ms,
                "registry change applied"
            ),
            Outcome::Unchanged => tracing::debug!(
                trigger = reload.trigger.as_str(),
                "registry reload: nothing changed"
            ),
            Outcome::Refused | Outcome::Failed => tracing::warn!(
                trigger = reload.trigger.as_str(),
                outcome = reload.outcome.as_str(),
                errors = ?reload.errors,
                "registry change not applied"
            ),
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == KEPT {
            recent.pop_back();
        }
        recent.push_front(reload);
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Reload> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_the_newest_results_first_and_forgets_the_oldest() {
        let history = History::default();
        for i in 0..(KEPT + 5) {
            let mut reload = Reload::new(Trigger::Watch, Outcome::Applied);
            reload.added.push(format!("doc{i}"));
            history.record(reload);
        }
        let recent = history.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].added, [format!("doc{}", KEPT + 4)]);
        assert_eq!(recent[KEPT - 1].added, ["doc5"]);
    }
}
