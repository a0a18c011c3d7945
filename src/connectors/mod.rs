//! Protocol connectors: one file per protocol, each a source (broker → route) and/or a sink
//! (route → broker), reconnecting with backoff. A connector knows its broker and the routing
//! types, never another connector; bridges go through routes.
//!
//! This file holds what they share: the connection-state registry behind `/readyz` and
//! `/api/v1/connections`, the [`Publisher`] interface the hub sends through, and the backoff.

pub mod amqp;
pub mod kafka;
pub mod mqtt;
pub mod progress;
pub mod server_access;
pub mod sse;
pub mod ws;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;

pub use progress::{IntakeProgress, ProgressSnapshot, StallReason};

use crate::routing::envelope::Headers;
use crate::routing::{Route, Upstream};

/// Identifies one upstream connection: a server of one document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServerKey {
    pub api: String,
    pub server: String,
}

impl std::fmt::Display for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.api, self.server)
    }
}

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
    pub fn report(
        &self,
        key: &ServerKey,
        protocol: &'static str,
        connected: bool,
        error: Option<String>,
    ) {
        crate::telemetry::events::UpstreamConnectionChanged {
            server: &key.to_string(),
            protocol,
            connected,
            error: error.as_deref(),
        }
        .emit();
        let state = if connected {
            ConnectionState::Connected
        } else {
            ConnectionState::Disconnected
        };
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

/// Why a publish upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("upstream {server} is not connected")]
    NotConnected { server: String },
    #[error("upstream {server} did not acknowledge within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("upstream {server} is overloaded (its request queue is full)")]
    Overloaded { server: String },
    #[error("upstream {server} refused the message: {reason}")]
    Refused { server: String, reason: String },
}

impl PublishError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::NotConnected { .. } => "not_connected",
            PublishError::Timeout { .. } => "timeout",
            PublishError::Overloaded { .. } => "overloaded",
            PublishError::Refused { .. } => "refused",
        }
    }
}

/// A message to publish on one upstream.
pub struct Outbound {
    pub route: Arc<Route>,
    /// The concrete address in the upstream's syntax (MQTT topic, AMQP routing key, ...).
    pub address: String,
    /// The address parameters (for key templates).
    pub params: crate::routing::address::Params,
    pub payload: Bytes,
    pub headers: Headers,
    /// A Kafka record key set by the sender, over the route's key template.
    pub key: Option<String>,
}

/// A connector's sending side, as the hub sees it. The future completes when the upstream
/// acknowledged the message (MQTT PUBACK, Kafka delivery report, AMQP confirm).
pub trait Publisher: Send + Sync {
    fn is_connected(&self) -> bool;
    fn publish(
        &self,
        upstream: &Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>>;
}

/// reqwest's error with its cause (its own text hides whether it was DNS, refused, TLS...).
pub fn describe_http_error(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Percent-encodes a URI component (userinfo, vhost, query name or value): everything but the
/// unreserved characters.
pub fn percent_encode(part: &str) -> String {
    let mut out = String::new();
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Capped exponential backoff with full jitter (each wait is random in `[0, cap]`, the cap
/// doubling from `initial` to `max`), reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The upper bound of the next wait (before jitter).
    pub fn next_cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(16)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next wait: uniformly random up to the current cap, at least a millisecond.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.next_cap();
        self.attempt = self.attempt.saturating_add(1);
        let millis = cap.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(1..=millis))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let caps: Vec<u64> = (0..7)
            .map(|_| {
                let cap = b.next_cap().as_millis() as u64;
                let delay = b.next_delay();
                assert!(delay <= Duration::from_millis(cap) && delay >= Duration::from_millis(1));
                cap
            })
            .collect();
        assert_eq!(caps, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_cap(), Duration::from_millis(100));
    }

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
