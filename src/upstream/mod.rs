//! What the hub, the calls, the config and the connectors share about upstream servers, below
//! all of them: a server's key, the connection registry behind `/readyz` and
//! `/api/v1/connections` (with intake progress and stalls), the [`Publisher`] interface the hub
//! sends through, operator overrides of a server, and the backoff every reconnecting client
//! uses. It knows routing types and nothing of any protocol client: a connector depends on this
//! module, never the reverse.

mod backoff;
mod connections;
mod overrides;
pub mod progress;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;

pub use backoff::Backoff;
pub use connections::{ConnectionState, ConnectionStatus, Connections, DEFAULT_STALL_AFTER, Stall};
pub use overrides::ServerOverride;
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
