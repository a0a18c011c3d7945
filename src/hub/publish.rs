//! A client's publish: validated against the route, sent to every upstream (each must
//! acknowledge), then logged.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{Hub, LiveRoute};
use crate::routing::address::{FillError, Params};
use crate::routing::envelope::{Envelope, Headers, Origin};
use crate::routing::{ChannelId, Route};
use crate::schema::{Encoding, ValidationError};
use crate::store;
use crate::telemetry::events::{MessageRejected, PublishFailed, PublishesRecovered, RejectReason};
use crate::upstream::{Outbound, PublishError, ServerKey};

/// Why a client's publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("no channel '{0}'")]
    UnknownChannel(String),
    #[error("channel '{0}' is not writable (the application does not send on it)")]
    NotWritable(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("content type '{found}' is not accepted here (expected {expected})")]
    UnsupportedContentType { found: String, expected: String },
    #[error("payload does not match the channel's schema: {0}")]
    InvalidPayload(ValidationError),
    #[error("cannot build the address: {0}")]
    InvalidAddress(FillError),
    #[error(transparent)]
    Upstream(PublishError),
    #[error("the message log failed: {0}")]
    Store(store::Error),
}

impl PublishFailure {
    pub fn reason(&self) -> RejectReason {
        match self {
            PublishFailure::UnknownChannel(_) | PublishFailure::InvalidAddress(_) => {
                RejectReason::InvalidAddress
            }
            PublishFailure::NotWritable(_) => RejectReason::NotWritable,
            PublishFailure::TooLarge { .. } => RejectReason::TooLarge,
            PublishFailure::UnsupportedContentType { .. } => RejectReason::UnsupportedContentType,
            PublishFailure::InvalidPayload(_) => RejectReason::InvalidPayload,
            PublishFailure::Upstream(_) => RejectReason::UpstreamUnavailable,
            PublishFailure::Store(_) => RejectReason::StoreFailed,
        }
    }
}

/// A client's message for a writable channel.
pub struct PublishRequest {
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// Address parameters given explicitly (query string); others come from same-named
    /// top-level fields of a JSON payload, then from the parameter's default.
    pub params: HashMap<String, String>,
    pub headers: Headers,
    pub origin: Origin,
    /// The Kafka record key, when the sender sets it (bridges); else the route's key template.
    pub key: Option<String>,
}

/// A publish that was acknowledged upstream and logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub channel: ChannelId,
    pub offset: u64,
    pub address: String,
    pub params: HashMap<String, String>,
}

impl Hub {
    /// A client's message for a writable channel: validated, published on every upstream of the
    /// route (each must acknowledge), then logged. Nothing is accepted that cannot be delivered.
    pub async fn publish(
        &self,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, PublishFailure> {
        let Some(route) = self.route(channel) else {
            // Not counted: the channel label would be whatever a client typed.
            return Err(PublishFailure::UnknownChannel(channel.to_owned()));
        };
        let transport = request.origin.transport;
        let result = self.publish_to(&route, channel, request).await;
        if let Err(failure) = &result {
            MessageRejected {
                channel: route.id(),
                transport,
                reason: failure.reason(),
                detail: &failure.to_string(),
            }
            .emit();
        }
        result
    }

    async fn publish_to(
        &self,
        route: &Arc<LiveRoute>,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, PublishFailure> {
        let spec = &route.route();
        if !spec.direction.writable {
            return Err(PublishFailure::NotWritable(channel.to_owned()));
        }
        let size = request.payload.len();
        if size > self.config.max_payload_bytes {
            return Err(PublishFailure::TooLarge {
                size,
                limit: self.config.max_payload_bytes,
            });
        }
        check_content_type(spec, request.content_type.as_deref())?;
        spec.validate(&request.payload)
            .map_err(PublishFailure::InvalidPayload)?;
        let params = resolve_params(spec, &request)?;
        let value_of = |name: &str| params.get(name).map(String::as_str);
        let address = match &spec.template {
            Some(t) => t
                .generic()
                .fill(value_of)
                .map_err(PublishFailure::InvalidAddress)?,
            None => String::new(),
        };

        // Concrete addresses for every upstream first: a bad parameter fails before anything
        // is sent anywhere.
        let mut sends = Vec::new();
        for upstream in &spec.upstreams {
            let Some(binding) = upstream.binding.protocol() else {
                continue;
            };
            let concrete = binding
                .address(&value_of, &address)
                .map_err(PublishFailure::InvalidAddress)?;
            let key = ServerKey {
                api: spec.api.clone(),
                server: upstream.server.clone(),
            };
            let publisher = self
                .publishers
                .read()
                .ok()
                .and_then(|m| m.get(&key).cloned());
            let Some(publisher) = publisher else {
                continue;
            };
            if !publisher.is_connected() {
                let error = PublishError::NotConnected {
                    server: upstream.server.clone(),
                };
                self.publish_failed(spec, &upstream.server, &error);
                return Err(PublishFailure::Upstream(error));
            }
            sends.push((upstream, publisher, concrete));
        }
        let mut route_params = Params::default();
        if let Some(t) = &spec.template {
            for name in t.params() {
                if let Some(v) = params.get(name) {
                    route_params.insert(name.into(), v.clone());
                }
            }
        }
        let started = std::time::Instant::now();
        for (upstream, publisher, concrete) in sends {
            let outbound = Outbound {
                route: spec.clone(),
                address: concrete,
                params: route_params.clone(),
                payload: request.payload.clone(),
                headers: request.headers.clone(),
                key: request.key.clone(),
            };
            let result = tokio::time::timeout(
                self.config.publish_timeout,
                publisher.publish(upstream, outbound),
            )
            .await
            .unwrap_or_else(|_| {
                Err(PublishError::Timeout {
                    server: upstream.server.clone(),
                    timeout: self.config.publish_timeout,
                })
            });
            if let Err(error) = result {
                self.publish_failed(spec, &upstream.server, &error);
                return Err(PublishFailure::Upstream(error));
            }
            self.failing.succeeded(&spec.id, &upstream.server);
            route
                .metrics
                .message_delivered(upstream.binding.transport(), Some(started.elapsed()));
        }

        let mut envelope = Envelope::new(
            spec.id.clone(),
            address.clone(),
            route_params,
            request.payload,
            request.origin,
        );
        envelope.headers = request.headers;
        route.metrics.message_received(envelope.origin.transport);
        route.metrics.message_logged(size);
        let offset = self
            .store
            .append(route.log.clone(), envelope, None, Some(route.live.clone()))
            .await
            .map_err(PublishFailure::Store)?
            .flushed()
            .await
            .map_err(PublishFailure::Store)?;
        Ok(Published {
            channel: spec.id.clone(),
            offset,
            address,
            params,
        })
    }

    fn publish_failed(&self, route: &Route, server: &str, error: &PublishError) {
        let first = self.failing.failed(&route.id, server, error.reason());
        PublishFailed {
            channel: &route.id,
            server,
            reason: error.reason(),
            detail: &error.to_string(),
            first,
        }
        .emit();
    }
}

/// The (route, server) pairs whose publishes fail now, with the reason and how many failed:
/// a run of failures (a broker away, and every message meanwhile) is one warning when it
/// starts and one line when it ends, however many publishes it refused.
#[derive(Default)]
pub(super) struct FailingPublishes {
    /// Set while the map holds anything: a successful publish checks this, not the lock.
    any: std::sync::atomic::AtomicBool,
    runs: std::sync::Mutex<HashMap<(String, String), FailureRun>>,
}

/// A run of failed publishes: their reason and how many.
type FailureRun = (&'static str, u64);

impl FailingPublishes {
    /// Records a failure; whether it starts a run (none, or another reason, before it).
    fn failed(&self, channel: &str, server: &str, reason: &'static str) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        let run = runs
            .entry((channel.to_owned(), server.to_owned()))
            .or_insert((reason, 0));
        let first = run.1 == 0 || run.0 != reason;
        *run = (reason, if first { 1 } else { run.1 + 1 });
        first
    }

    /// A publish went through: ends the run of failures on (channel, server), if there was one.
    fn succeeded(&self, channel: &str, server: &str) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((reason, failures)) = runs.remove(&(channel.to_owned(), server.to_owned())) {
            PublishesRecovered {
                channel,
                server,
                reason,
                failures,
            }
            .emit();
        }
        if runs.is_empty() {
            self.any.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// JSON routes take JSON (`application/json`, `*/*+json`, or no content type); Avro-binary
/// routes take `application/octet-stream` or an Avro media type; other routes take anything.
fn check_content_type(route: &Route, content_type: Option<&str>) -> Result<(), PublishFailure> {
    let Some(found) = content_type else {
        return Ok(());
    };
    let essence = found
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let schema_checked: Vec<_> = route
        .messages
        .iter()
        .filter(|m| m.payload.as_ref().is_some_and(|p| p.is_enforced()))
        .collect();
    if schema_checked.is_empty() {
        return Ok(());
    }
    let is_json = essence == "application/json" || essence.ends_with("+json");
    let accepted = schema_checked.iter().any(|m| match m.encoding {
        Encoding::Json => is_json,
        Encoding::AvroBinary => essence == "application/octet-stream" || essence.contains("avro"),
    });
    if accepted {
        Ok(())
    } else {
        let expected = if schema_checked.iter().any(|m| m.encoding == Encoding::Json) {
            "application/json"
        } else {
            "application/octet-stream or an Avro media type"
        };
        Err(PublishFailure::UnsupportedContentType {
            found: found.to_owned(),
            expected: expected.to_owned(),
        })
    }
}

/// Parameters: explicit ones first, then same-named top-level JSON fields, then defaults.
fn resolve_params(
    route: &Route,
    request: &PublishRequest,
) -> Result<HashMap<String, String>, PublishFailure> {
    let mut out = HashMap::new();
    let Some(template) = &route.template else {
        return Ok(out);
    };
    let json: Option<serde_json::Value> =
        if template.params().all(|p| request.params.contains_key(p)) {
            None
        } else {
            serde_json::from_slice(&request.payload).ok()
        };
    for name in template.params() {
        let value = request
            .params
            .get(name)
            .cloned()
            .or_else(|| {
                json.as_ref()
                    .and_then(|j| j.get(name))
                    .and_then(|v| match v {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
            })
            .or_else(|| {
                route
                    .parameters
                    .iter()
                    .find(|p| p.name == name)
                    .and_then(|p| p.default.clone())
            });
        match value {
            Some(v) => {
                if let Some(parameter) = route.parameters.iter().find(|p| p.name == name) {
                    parameter
                        .check(&v)
                        .map_err(PublishFailure::InvalidAddress)?;
                }
                out.insert(name.to_owned(), v);
            }
            None => {
                return Err(PublishFailure::InvalidAddress(FillError::Missing {
                    name: name.to_owned(),
                }));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::FailingPublishes;

    #[test]
    fn a_run_of_failures_starts_once_per_reason_and_ends_with_a_success() {
        let failing = FailingPublishes::default();
        assert!(failing.failed("a.c", "kafka", "not_connected"));
        assert!(!failing.failed("a.c", "kafka", "not_connected"));
        assert!(!failing.failed("a.c", "kafka", "not_connected"));
        // Another route, or another reason on the same one, starts its own run.
        assert!(failing.failed("a.d", "kafka", "not_connected"));
        assert!(failing.failed("a.c", "kafka", "timeout"));
        failing.succeeded("a.c", "kafka");
        assert!(
            failing.failed("a.c", "kafka", "timeout"),
            "a success ended the run"
        );
        failing.succeeded("a.c", "kafka");
        failing.succeeded("a.d", "kafka");
        assert!(!failing.any.load(std::sync::atomic::Ordering::Relaxed));
    }
}
