//! Channels as MCP resources: `stepflow://channels/{id}` is a readable channel's most recent
//! messages; a channel with address parameters also has a template,
//! `stepflow://channels/{id}/{param}...`, whose concrete URIs hold the messages of one address.
//! A watcher turns new messages into `notifications/resources/updated`, at most one per URI per
//! [`NOTIFY_INTERVAL`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, LiveRoute, SubscriptionEvent};
use crate::routing::envelope::Delivered;

pub const SCHEME: &str = "stepflow://channels/";

/// Messages a resource read returns.
pub const RECENT: usize = 20;

/// How far back a template read looks for messages of its address.
const TEMPLATE_SCAN: usize = 1000;

/// Notifications for one URI are coalesced to at most one per interval: a busy channel does not
/// flood the agent, and a new message is announced within this long.
pub const NOTIFY_INTERVAL: Duration = Duration::from_millis(200);

/// A resource URI, understood.
pub struct ResourceRef {
    pub route: Arc<LiveRoute>,
    /// Parameter values, for a template's concrete URI, in the route's parameter order.
    pub params: Option<Vec<(String, String)>>,
}

impl ResourceRef {
    /// Whether `message` belongs to this resource.
    pub fn matches(&self, message: &Delivered) -> bool {
        self.params.as_ref().is_none_or(|params| {
            params
                .iter()
                .all(|(name, value)| message.envelope.params.get(name) == Some(value.as_str()))
        })
    }
}

/// A channel's URI.
pub fn channel_uri(id: &str) -> String {
    format!("{SCHEME}{}", crate::upstream::percent_encode(id))
}

/// A channel's template (RFC 6570), when it has address parameters.
pub fn template_uri(route: &crate::routing::Route) -> Option<String> {
    if route.parameters.is_empty() {
        return None;
    }
    let mut uri = channel_uri(&route.id);
    for p in &route.parameters {
        uri.push_str("/{");
        uri.push_str(&p.name);
        uri.push('}');
    }
    Some(uri)
}

/// Reads a URI back to its route and parameters; the error says what is wrong with it.
pub fn parse(hub: &Hub, uri: &str) -> Result<ResourceRef, String> {
    let rest = uri
        .strip_prefix(SCHEME)
        .ok_or_else(|| format!("'{uri}' is not a {SCHEME}… resource"))?;
    let mut segments = rest.split('/');
    let id = decode(segments.next().unwrap_or_default());
    let route = hub.route(&id).ok_or_else(|| format!("no channel '{id}'"))?;
    if !route.route().direction.readable {
        return Err(format!("channel '{id}' is not readable"));
    }
    let values: Vec<String> = segments.map(decode).collect();
    if values.is_empty() {
        return Ok(ResourceRef {
            route,
            params: None,
        });
    }
    let names = &route.route().parameters;
    if values.len() != names.len() {
        return Err(format!(
            "channel '{id}' has {} address parameter(s) ({}), the URI gives {}",
            names.len(),
            names
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            values.len()
        ));
    }
    let params = names.iter().map(|p| p.name.clone()).zip(values).collect();
    Ok(ResourceRef {
        route,
        params: Some(params),
    })
}

fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The resource's most recent messages, oldest first, as JSON text.
pub async fn read(hub: &Hub, resource: &ResourceRef) -> Result<Value, crate::store::Error> {
    let stats = hub.store().log_stats(&resource.route.log);
    let Some(last) = stats.last_offset else {
        return Ok(json!({ "channel": resource.route.id(), "messages": [] }));
    };
    let scan = if resource.params.is_some() {
        TEMPLATE_SCAN
    } else {
        RECENT
    };
    let from = (last + 1).saturating_sub(scan as u64).max(1);
    let messages = hub.store().read(&resource.route.log, from, scan).await?;
    let mut matching: Vec<Value> = messages
        .iter()
        .rev()
        .filter(|m| resource.matches(m))
        .take(RECENT)
        .filter_map(|m| serde_json::from_slice(m.frame()).ok())
        .collect();
    matching.reverse();
    Ok(json!({ "channel": resource.route.id(), "messages": matching }))
}

/// Calls `notify` after new messages of `resource` arrive (coalesced), until `stop` or until
/// `notify` fails (the client went away).
pub async fn watch<F, Fut>(hub: Arc<Hub>, resource: ResourceRef, stop: CancellationToken, notify: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut subscription = match hub.subscribe(&resource.route, None).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(channel = %resource.route.id(), error = %e, "MCP resource watch cannot start");
            return;
        }
    };
    let mut pending = false;
    let mut last_sent = Instant::now() - NOTIFY_INTERVAL;
    loop {
        let due = last_sent + NOTIFY_INTERVAL;
        tokio::select! {
            _ = stop.cancelled() => return,
            event = subscription.next() => match event {
                Ok(Some(SubscriptionEvent::Message { message, .. })) => {
                    if resource.matches(&message) {
                        pending = true;
                    }
                }
                // Messages were missed or expired: whatever they were, the resource changed.
                Ok(Some(SubscriptionEvent::Lagged { .. } | SubscriptionEvent::Expired { .. })) => {
                    pending = true;
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(channel = %resource.route.id(), error = %e, "MCP resource watch stopped");
                    return;
                }
            },
            _ = tokio::time::sleep_until(due), if pending => {}
        }
        if pending && Instant::now() >= last_sent + NOTIFY_INTERVAL {
            if !notify().await {
                return;
            }
            pending = false;
            last_sent = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_decode_their_segments() {
        assert_eq!(decode("iot.telemetry"), "iot.telemetry");
        assert_eq!(decode("a%2Fb%20c"), "a/b c");
        // A stray or truncated escape is kept as it is.
        assert_eq!(decode("50%"), "50%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
