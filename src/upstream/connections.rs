//! The connection registry: every upstream's state, intake progress and stall, written by
//! connectors and read by the HTTP server.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::ServerKey;
use super::progress::{self, IntakeProgress, ProgressSnapshot, StallReason};

/// The state of one upstream connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Connecting,
    Connected,
    Disconnected,
}

/// What `/api/v1/connections` shows for one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub api: String,
    pub server: String,
    pub protocol: &'static str,
    pub url: String,
    pub state: ConnectionState,
    /// Seconds since the Unix epoch of the last state change.
    pub since: u64,
    pub last_error: Option<String>,
    pub disconnects: u64,
    /// Not required for readiness (`x-stepflow-optional`, or `optional: true` in the config).
    pub optional: bool,
    /// How messages move from this upstream into the log (filled in by [`Connections::snapshot`]).
    pub progress: Option<ProgressSnapshot>,
    /// Set while the connection is up but its intake makes no progress (see [`progress::stall`]).
    pub stalled: Option<Stall>,
    /// How long without progress counts as a stall.
    pub stall_after_secs: u64,
    #[serde(skip)]
    intake: Arc<IntakeProgress>,
    #[serde(skip)]
    stall_after: Duration,
}

/// A stall in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stall {
    pub reason: StallReason,
    /// Seconds since the Unix epoch when it was detected.
    pub since: u64,
}

/// How long an upstream may hold messages without settling one before it counts as stalled,
/// unless its connector knows better (MQTT: the keep-alive, after which the broker gives up).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

/// Every upstream connection's state; written by connectors, read by the HTTP server.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<RwLock<BTreeMap<ServerKey, ConnectionStatus>>>,
}

impl Connections {
    pub fn register(&self, key: ServerKey, protocol: &'static str, url: String) {
        self.register_with(key, protocol, url, false, DEFAULT_STALL_AFTER);
    }

    /// Registers an upstream; an optional one does not hold back readiness. The connector
    /// reports its intake through the returned handle; `stall_after` is its stall timeout.
    pub fn register_with(
        &self,
        key: ServerKey,
        protocol: &'static str,
        url: String,
        optional: bool,
        stall_after: Duration,
    ) -> Arc<IntakeProgress> {
        let intake = Arc::new(IntakeProgress::default());
        let status = ConnectionStatus {
            progress: None,
            stalled: None,
            stall_after_secs: stall_after.as_secs(),
            intake: intake.clone(),
            stall_after,
            optional,
            api: key.api.clone(),
            server: key.server.clone(),
            protocol,
            url,
            state: ConnectionState::Connecting,
            since: now_secs(),
            last_error: None,
            disconnects: 0,
        };
        if let Ok(mut map) = self.inner.write() {
            map.insert(key, status);
        }
        intake
    }

    /// Forgets the upstreams of document `api` (removed from the registry): they no longer
    /// count for readiness or show in the listing.
    pub fn forget(&self, api: &str) {
        if let Ok(mut map) = self.inner.write() {
            map.retain(|key, _| key.api != api);
        }
    }

    pub fn forget_server(&self, key: &ServerKey) {
        if let Ok(mut map) = self.inner.write() {
            map.remove(key);
        }
    }

    pub fn set(&self, key: &ServerKey, state: ConnectionState, error: Option<String>) {
        if let Ok(mut map) = self.inner.write()
            && let Some(status) = map.get_mut(key)
        {
            if state == ConnectionState::Disconnected
                && status.state != ConnectionState::Disconnected
            {
                status.disconnects += 1;
            }
            if status.state != state {
                status.since = now_secs();
            }
            status.state = state;
            if error.is_some() {
                status.last_error = error;
            }
        }
    }

    /// An upstream came up or went down: the log line, the metrics and the state, together.
    /// A report that changes nothing (another failed attempt while it is down) only updates
    /// the last error, at debug level: one line per state change, not per retry.
    pub fn report(
        &self,
        key: &ServerKey,
        protocol: &'static str,
        connected: bool,
        error: Option<String>,
    ) {
        let state = if connected {
            ConnectionState::Connected
        } else {
            ConnectionState::Disconnected
        };
        let unchanged = self
            .inner
            .read()
            .ok()
            .and_then(|m| m.get(key).map(|s| s.state == state))
            .unwrap_or(false);
        if unchanged {
            tracing::debug!(server = %key, protocol, connected, error = error.as_deref().unwrap_or(""), "upstream state unchanged");
        } else {
            crate::telemetry::events::UpstreamConnectionChanged {
                server: &key.to_string(),
                protocol,
                connected,
                error: error.as_deref(),
            }
            .emit();
        }
        self.set(key, state, error);
    }

    /// The URL the connector uses for `key` (after the config's overrides).
    pub fn url(&self, key: &ServerKey) -> Option<String> {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.get(key).map(|s| s.url.clone()))
    }

    pub fn is_connected(&self, key: &ServerKey) -> bool {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.get(key).map(|s| s.state == ConnectionState::Connected))
            .unwrap_or(false)
    }

    pub fn snapshot(&self) -> Vec<ConnectionStatus> {
        self.inner
            .read()
            .map(|m| {
                m.values()
                    .map(|s| ConnectionStatus {
                        progress: Some(s.intake.snapshot()),
                        ..s.clone()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ready when every required upstream is connected and none of them is stalled.
    pub fn all_connected(&self) -> bool {
        self.inner
            .read()
            .map(|m| {
                m.values().all(|s| {
                    s.optional || (s.state == ConnectionState::Connected && s.stalled.is_none())
                })
            })
            .unwrap_or(false)
    }

    /// Applies the stall rule to every connection: a connection that starts or stops stalling
    /// is logged and counted once, at the change (the daemon calls this every second).
    pub fn check_stalls(&self) {
        let Ok(mut map) = self.inner.write() else {
            return;
        };
        for (key, status) in map.iter_mut() {
            let progress = status.intake.snapshot();
            let reason = if status.state == ConnectionState::Connected {
                progress::stall(&progress, status.stall_after)
            } else {
                None
            };
            match (reason, &status.stalled) {
                (Some(reason), None) => {
                    crate::telemetry::events::UpstreamStalled {
                        server: &key.to_string(),
                        protocol: status.protocol,
                        reason,
                        outstanding: progress.outstanding,
                        stall_after: status.stall_after,
                    }
                    .emit();
                    status.stalled = Some(Stall {
                        reason,
                        since: now_secs(),
                    });
                }
                (None, Some(stall)) => {
                    crate::telemetry::events::UpstreamRecovered {
                        server: &key.to_string(),
                        protocol: status.protocol,
                        stalled_for: Duration::from_secs(now_secs().saturating_sub(stall.since)),
                    }
                    .emit();
                    status.stalled = None;
                }
                _ => {}
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_upstream_holds_back_readiness_until_it_moves_again() {
        let c = Connections::default();
        let key = ServerKey {
            api: "iot".into(),
            server: "mosquitto".into(),
        };
        let intake = c.register_with(
            key.clone(),
            "mqtt",
            "mqtt://x".into(),
            false,
            Duration::from_millis(20),
        );
        c.set(&key, ConnectionState::Connected, None);
        intake.received();
        c.check_stalls();
        assert!(c.all_connected(), "within the stall timeout");
        std::thread::sleep(Duration::from_millis(40));
        c.check_stalls();
        let status = &c.snapshot()[0];
        assert_eq!(
            status.stalled.as_ref().map(|s| s.reason),
            Some(StallReason::NoAcknowledgement)
        );
        assert_eq!(status.progress.as_ref().map(|p| p.outstanding), Some(1));
        assert!(!c.all_connected(), "stalled is not ready");
        intake.settled(1);
        c.check_stalls();
        assert!(c.snapshot()[0].stalled.is_none());
        assert!(c.all_connected());
    }

    #[test]
    fn connection_registry_counts_disconnects() {
        let c = Connections::default();
        let key = ServerKey {
            api: "iot".into(),
            server: "mosquitto".into(),
        };
        c.register(key.clone(), "mqtt", "mqtt://x".into());
        assert!(!c.all_connected());
        c.set(&key, ConnectionState::Connected, None);
        assert!(c.all_connected() && c.is_connected(&key));
        c.set(&key, ConnectionState::Disconnected, Some("refused".into()));
        c.set(&key, ConnectionState::Disconnected, None);
        let s = &c.snapshot()[0];
        assert_eq!(s.disconnects, 1);
        assert_eq!(s.last_error.as_deref(), Some("refused"));

        // An optional upstream that is down does not hold back readiness; a required one does.
        let analytics = ServerKey {
            api: "analytics".into(),
            server: "kafka".into(),
        };
        c.set(&key, ConnectionState::Connected, None);
        c.register_with(
            analytics.clone(),
            "kafka",
            "kafka://x".into(),
            true,
            DEFAULT_STALL_AFTER,
        );
        assert!(c.all_connected());
        c.set(&key, ConnectionState::Disconnected, None);
        assert!(!c.all_connected());
    }
}
