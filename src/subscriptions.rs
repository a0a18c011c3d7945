//! Durable subscriptions: a named cursor on one channel's log, kept in sled, that WebSocket and
//! SSE clients attach to (`?subscription=name`). A client receives from the cursor and moves it
//! by acknowledging (WebSocket `{"ack": offset}`; SSE: the `Last-Event-ID` of its next request),
//! so what it did not acknowledge comes again after a disconnect or a daemon restart.
//!
//! Acks change the cursor in memory at once and reach disk within [`FLUSH_INTERVAL`] (and on a
//! clean stop): one fsync per interval however many clients ack, at the price of re-sending at
//! most that interval's worth after a crash, which at-least-once allows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::routing::filter::Filter;
use crate::store::{self, Store};

/// The store namespace of subscriptions: name → JSON definition with its cursor.
const NAMESPACE: &str = "subscriptions";
/// How often changed cursors are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A subscription as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionDef {
    pub name: String,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// The next offset to deliver: everything before it is acknowledged.
    pub cursor: u64,
    pub created_at_ms: u64,
}

/// Why a subscription request failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("no subscription '{0}'")]
    NotFound(String),
    #[error("subscription '{0}' already exists with another definition")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// A subscription in memory: its definition and compiled filter.
#[derive(Clone)]
struct Entry {
    def: SubscriptionDef,
    filter: Option<Filter>,
}

/// Every durable subscription; cheap to clone.
#[derive(Clone)]
pub struct Subscriptions {
    store: Store,
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
    dirty: Arc<Mutex<BTreeSet<String>>>,
}

impl Subscriptions {
    /// Loads the stored subscriptions; one whose filter no longer compiles is kept, unfiltered,
    /// with a warning (deleting it would lose its cursor).
    pub async fn load(store: Store) -> Result<Subscriptions, store::Error> {
        let mut entries = BTreeMap::new();
        for (name, bytes) in store.state_list(NAMESPACE).await? {
            match serde_json::from_slice::<SubscriptionDef>(&bytes) {
                Ok(def) => {
                    let filter = def.filter.as_deref().and_then(|f| match Filter::compile(f) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            tracing::warn!(subscription = %name, error = %e, "stored filter does not compile; delivering unfiltered");
                            None
                        }
                    });
                    entries.insert(name, Entry { def, filter });
                }
                Err(e) => {
                    tracing::warn!(subscription = %name, error = %e, "unreadable stored subscription skipped")
                }
            }
        }
        Ok(Subscriptions {
            store,
            entries: Arc::new(Mutex::new(entries)),
            dirty: Arc::new(Mutex::new(BTreeSet::new())),
        })
    }

    /// Creates a subscription starting at `from` (default: the next message of the channel).
    /// Creating one that exists with the same channel and filter returns it unchanged.
    pub async fn create(
        &self,
        hub: &Hub,
        name: &str,
        channel: &str,
        filter: Option<String>,
        from: Option<u64>,
    ) -> Result<(SubscriptionDef, bool), SubscriptionError> {
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(SubscriptionError::Invalid(format!(
                "subscription name '{name}': 1 to 128 of A-Z a-z 0-9 - _ ."
            )));
        }
        let route = hub
            .route(channel)
            .ok_or_else(|| SubscriptionError::Invalid(format!("no channel '{channel}'")))?;
        if !route.route().direction.readable {
            return Err(SubscriptionError::Invalid(format!(
                "channel '{channel}' is not readable (the application does not receive on it)"
            )));
        }
        let compiled = filter
            .as_deref()
            .map(Filter::compile)
            .transpose()
            .map_err(|e| SubscriptionError::Invalid(format!("filter: {e}")))?;
        if let Some(existing) = self.get(name) {
            return if existing.channel == channel && existing.filter == filter {
                Ok((existing, false))
            } else {
                Err(SubscriptionError::Conflict(name.to_owned()))
            };
        }
        let cursor = match from {
            Some(f) => f.max(1),
            None => hub
                .store()
                .log_stats(&route.log)
                .last_offset
                .map_or(1, |o| o + 1),
        };
        let def = SubscriptionDef {
            name: name.to_owned(),
            channel: channel.to_owned(),
            filter,
            cursor,
            created_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        self.store
            .state_put(
                NAMESPACE,
                name,
                serde_json::to_vec(&def).unwrap_or_default(),
            )
            .await?;
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                name.to_owned(),
                Entry {
                    def: def.clone(),
                    filter: compiled,
                },
            );
        }
        Ok((def, true))
    }

    pub fn get(&self, name: &str) -> Option<SubscriptionDef> {
        self.entries
            .lock()
            .ok()
            .and_then(|e| e.get(name).map(|e| e.def.clone()))
    }

    /// The subscription's compiled filter, if it has one.
    pub fn filter(&self, name: &str) -> Option<Filter> {
        self.entries
            .lock()
            .ok()
            .and_then(|e| e.get(name).and_then(|e| e.filter.clone()))
    }

    pub fn list(&self) -> Vec<SubscriptionDef> {
        self.entries
            .lock()
            .map(|e| e.values().map(|e| e.def.clone()).collect())
            .unwrap_or_default()
    }

    pub async fn delete(&self, name: &str) -> Result<bool, SubscriptionError> {
        let known = self
            .entries
            .lock()
            .map(|mut e| e.remove(name).is_some())
            .unwrap_or(false);
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty.remove(name);
        }
        let stored = self.store.state_remove(NAMESPACE, name).await?;
        // The series cannot be removed; a deleted subscription has nothing waiting.
        metrics::gauge!(crate::telemetry::SUBSCRIPTION_LAG, "subscription" => name.to_owned())
            .set(0.0);
        Ok(known || stored)
    }

    /// Acknowledges everything up to and including `offset`; the cursor never moves back.
    pub fn ack(&self, name: &str, offset: u64) -> Result<u64, SubscriptionError> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| SubscriptionError::NotFound(name.to_owned()))?;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| SubscriptionError::NotFound(name.to_owned()))?;
        if offset + 1 > entry.def.cursor {
            entry.def.cursor = offset + 1;
            if let Ok(mut dirty) = self.dirty.lock() {
                dirty.insert(name.to_owned());
            }
        }
        Ok(entry.def.cursor)
    }

    /// Messages of the channel at or after the cursor.
    /// Where the subscription's cursor is against its channel's log.
    pub fn position(&self, hub: &Hub, def: &SubscriptionDef) -> store::ReaderPosition {
        match hub.route(&def.channel) {
            Some(route) => {
                store::ReaderPosition::of(def.cursor, &hub.store().log_stats(&route.log))
            }
            None => store::ReaderPosition::default(),
        }
    }

    /// Writes the cursors changed since the last call.
    pub async fn flush(&self) {
        let names: Vec<String> = self
            .dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d).into_iter().collect())
            .unwrap_or_default();
        for name in names {
            let Some(def) = self.get(&name) else { continue };
            if let Err(e) = self
                .store
                .state_put(
                    NAMESPACE,
                    &name,
                    serde_json::to_vec(&def).unwrap_or_default(),
                )
                .await
            {
                tracing::warn!(subscription = %name, error = %e, "cannot record the cursor; retrying");
                if let Ok(mut dirty) = self.dirty.lock() {
                    dirty.insert(name);
                }
            }
        }
    }

    /// Flushes changed cursors every [`FLUSH_INTERVAL`] until `shutdown`, then once more; sets
    /// each subscription's lag gauge every second.
    pub async fn run_flusher(self, hub: Arc<Hub>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush().await,
            }
            ticks += 1;
            if ticks.is_multiple_of(10) {
                for def in self.list() {
                    let lag = self.position(&hub, &def).lag;
                    metrics::gauge!(crate::telemetry::SUBSCRIPTION_LAG, "subscription" => def.name)
                        .set(lag as f64);
                }
            }
        }
        self.flush().await;
    }
}
