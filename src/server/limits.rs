//! What a hostile client meets: connection limits (in all and per address), header and body
//! read timeouts, WebSocket message size and idle timeout, and a cap on calls in flight per
//! `/ws/operations` socket. Each has a safe default, is set under `limits:` in the config file,
//! and every refusal is counted in `stepflow_limit_refusals_total{limit}`.
//!
//! A connection past a connection limit is answered `503` with a JSON error and closed before
//! any of it is read, so it costs a write, not a request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::telemetry::{CONNECTIONS_OPEN, LIMIT_REFUSALS};

/// The limits as the config file writes them (`limits:`); every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFileConfig {
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub header_read_timeout_ms: Option<u64>,
    pub body_read_timeout_ms: Option<u64>,
    pub ws_max_message_bytes: Option<usize>,
    pub ws_idle_timeout_ms: Option<u64>,
    pub max_calls_per_connection: Option<usize>,
    pub max_document_bytes: Option<usize>,
}

/// The limits in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// A request's headers must arrive within this (a slowloris client is dropped).
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this (408 otherwise).
    pub body_read_timeout: Duration,
    /// Largest WebSocket message (and frame) a client may send; over it the socket is closed
    /// with 1009. `None`: the payload limit plus room for the frame's envelope.
    pub ws_max_message_bytes: Option<usize>,
    /// A WebSocket client that sends nothing, not even a pong, for this long is closed.
    pub ws_idle_timeout: Duration,
    /// Calls in flight on one `/ws/operations` socket; past it a call is answered with an
    /// error frame at once.
    pub max_calls_per_connection: usize,
    /// Largest API document `POST`/`PUT /api/v1/specs` takes (413 over it).
    pub max_document_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            ws_max_message_bytes: None,
            ws_idle_timeout: Duration::from_secs(60),
            max_calls_per_connection: 64,
            max_document_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Limits {
    pub fn from_file(file: &LimitsFileConfig) -> Result<Limits, String> {
        let d = Limits::default();
        let ms = Duration::from_millis;
        let limits = Limits {
            max_connections: file.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: file
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            header_read_timeout: file
                .header_read_timeout_ms
                .map_or(d.header_read_timeout, ms),
            body_read_timeout: file.body_read_timeout_ms.map_or(d.body_read_timeout, ms),
            ws_max_message_bytes: file.ws_max_message_bytes,
            ws_idle_timeout: file.ws_idle_timeout_ms.map_or(d.ws_idle_timeout, ms),
            max_calls_per_connection: file
                .max_calls_per_connection
                .unwrap_or(d.max_calls_per_connection),
            max_document_bytes: file.max_document_bytes.unwrap_or(d.max_document_bytes),
        };
        let zero = [
            ("max_connections", limits.max_connections == 0),
            ("max_connections_per_ip", limits.max_connections_per_ip == 0),
            (
                "header_read_timeout_ms",
                limits.header_read_timeout.is_zero(),
            ),
            ("body_read_timeout_ms", limits.body_read_timeout.is_zero()),
            ("ws_idle_timeout_ms", limits.ws_idle_timeout.is_zero()),
            (
                "max_calls_per_connection",
                limits.max_calls_per_connection == 0,
            ),
            (
                "ws_max_message_bytes",
                limits.ws_max_message_bytes == Some(0),
            ),
            ("max_document_bytes", limits.max_document_bytes == 0),
        ];
        match zero.iter().find(|(_, is_zero)| *is_zero) {
            Some((name, _)) => Err(format!("limits.{name} must be greater than 0")),
            None => Ok(limits),
        }
    }

    /// The WebSocket message limit for a gateway whose payload limit is `max_payload_bytes`.
    pub fn ws_max_message(&self, max_payload_bytes: usize) -> usize {
        self.ws_max_message_bytes
            .unwrap_or(max_payload_bytes + 4096)
    }

    /// A WebSocket upgrade with the message and frame limits and the per-connection buffers.
    pub fn websocket(
        &self,
        upgrade: axum::extract::WebSocketUpgrade,
        max_payload_bytes: usize,
    ) -> axum::extract::WebSocketUpgrade {
        let max_message = self.ws_max_message(max_payload_bytes);
        upgrade
            .max_message_size(max_message)
            .max_frame_size(max_message)
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            .write_buffer_size(WS_WRITE_BUFFER_BYTES)
    }
}

/// What a WebSocket reads into at once. tungstenite's default, 128 KiB, is zeroed when the
/// connection reads first and stays resident: 138 KiB per idle client, 1.4 GB for 10,000 of
/// them. Clients send small frames (acks, publishes, calls); a larger message is read in more
/// steps, still bounded by the message limit.
const WS_READ_BUFFER_BYTES: usize = 4096;
/// How much a WebSocket gathers before it writes to the socket (a flush writes at once). The
/// streams feed up to 64 frames and flush; this only bounds what one connection holds.
const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Whether a WebSocket read failed because the client's message or frame was over the limit.
pub fn is_message_too_big(error: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| matches!(e.downcast_ref::<Error>(), Some(Error::Capacity(_))))
}

/// The close frame for a message over the limit (1009).
pub fn too_big_close(limit: usize) -> axum::extract::ws::CloseFrame {
    count_refusal("ws_message_size");
    axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::SIZE,
        reason: format!("message too big (limit {limit} bytes)").into(),
    }
}

/// Pings often enough that a client answering them is never taken for idle.
pub fn ping_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(20))
}

/// Counts a refusal by the limit that made it.
pub fn count_refusal(limit: &'static str) {
    metrics::counter!(LIMIT_REFUSALS, "limit" => limit).increment(1);
}

/// Which connection limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    fn limit(self) -> &'static str {
        match self {
            Refusal::Total => "connections",
            Refusal::PerIp => "connections_per_ip",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::Total => "the gateway has too many connections open; retry later",
            Refusal::PerIp => "too many connections open from this address; retry later",
        }
    }
}

/// The open connections, in all and per address.
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals being written at once; past it a refused connection is just closed.
    refusing: Arc<Semaphore>,
}

/// One admitted connection; it counts as open until dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

/// How long a refused client gets to take its 503.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

impl Admission {
    pub fn new(limits: &Limits) -> Arc<Admission> {
        Arc::new(Admission {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refusing: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
        })
    }

    /// Admits a connection from `ip`, or says which limit it meets.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::Total);
        }
        let open = per_ip.entry(ip).or_default();
        if *open >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *open += 1;
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(CONNECTIONS_OPEN).set(total as f64);
        Ok(Admitted {
            admission: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = per_ip.get_mut(&ip) {
            *open -= 1;
            if *open == 0 {
                per_ip.remove(&ip);
            }
        }
        let total = self.total.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(CONNECTIONS_OPEN).set(total as f64);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Answers a refused connection with a 503 and closes it, without reading from it.
    pub fn refuse(&self, mut stream: TcpStream, refusal: Refusal) {
        count_refusal(refusal.limit());
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            // A flood of refusals: closing is the answer.
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let body = serde_json::json!({
                "error": {"code": "limit_exceeded", "message": refusal.message(), "details": {"limit": refusal.limit()}}
            })
            .to_string();
            let response = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_and_total_limits_hold_and_free_up_on_drop() {
        let admission = Admission::new(&Limits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..Limits::default()
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Refusal::PerIp));
        let _b1 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err(), Some(Refusal::Total));
        drop(a1);
        assert_eq!(admission.open(), 2);
        let _a3 = admission.admit(a).unwrap();
        assert!(admission.per_ip.lock().unwrap().values().all(|n| *n <= 2));
    }

    #[test]
    fn a_zero_limit_is_refused_by_name() {
        let e = Limits::from_file(&LimitsFileConfig {
            max_connections_per_ip: Some(0),
            ..LimitsFileConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("limits.max_connections_per_ip"), "{e}");
    }
}
