//! AsyncAPI 3 `reply` over the brokers: for a `send` operation with a reply channel, a call
//! publishes the request on the operation's channel with a fresh correlation id where the
//! message's `correlationId.location` says (a header, or a payload field), names the reply
//! address where `reply.address.location` says, and waits for the message on the reply channel
//! that carries the same id. Replies are read from the reply route's live stream (so they are
//! logged like any message); a reply nobody waits for is counted and left in the log.
//!
//! MQTT 3.1.1 has no headers: over MQTT the correlation id must live in the payload
//! (`$message.payload#/...`). Over AMQP a header location named `correlation_id` / `reply_to`
//! travels as the message property of that name; over Kafka headers are record headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{CallError, CallRequest};
use crate::hub::{Hub, LiveRoute, PublishRequest, SubscriptionEvent};
use crate::routing::envelope::{Delivered, Origin, Transport};
use crate::routing::{ChannelId, Route};
use crate::spec::Action;
use crate::telemetry;

/// Where a message carries its correlation id.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// `$message.header#/name`
    Header(String),
    /// `$message.payload#/pointer`
    Payload(String),
}

impl Location {
    /// A runtime expression as AsyncAPI writes it; `None` for forms the gateway cannot use.
    pub fn parse(expression: &str) -> Option<Location> {
        if let Some(name) = expression.strip_prefix("$message.header#/") {
            return Some(Location::Header(name.to_owned()));
        }
        expression
            .strip_prefix("$message.payload#")
            .filter(|p| p.starts_with('/'))
            .map(|p| Location::Payload(p.to_owned()))
    }

    /// The id in a received message. A header location named `x` also finds the transport's
    /// `amqp_x` header (AMQP properties arrive so).
    fn find(&self, message: &Delivered) -> Option<String> {
        match self {
            Location::Header(name) => message
                .envelope
                .headers
                .iter()
                .find(|(k, _)| k == name || k.strip_prefix("amqp_") == Some(name.as_str()))
                .map(|(_, v)| v.clone()),
            Location::Payload(pointer) => {
                let payload: Value = serde_json::from_slice(&message.envelope.payload).ok()?;
                match payload.pointer(pointer)? {
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                }
            }
        }
    }
}

/// A `send` operation with a reply channel.
pub struct BrokerOperation {
    pub id: ChannelId,
    pub request: ChannelId,
    pub reply: Arc<LiveRoute>,
    request_location: Location,
    reply_location: Location,
    /// Where the request names the reply address (`$message.header#/replyTo`).
    reply_address: Option<Location>,
    pub timeout: Duration,
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Arc<Delivered>>>>>;

/// A route's call timeout (from its server's config).
type TimeoutOf = Box<dyn Fn(&Route) -> Duration + Send + Sync>;

/// Every broker request-reply operation, and the replies they wait for. Documents come and go
/// at run time: each one's operations are added and removed with it, and so are the readers
/// of its reply channels.
pub struct BrokerCalls {
    hub: Arc<Hub>,
    by_id: RwLock<HashMap<ChannelId, Arc<BrokerOperation>>>,
    waiting: Waiting,
    timeout_of: TimeoutOf,
    /// The daemon's token, once [`Self::start`] ran: reply readers start only after it.
    shutdown: OnceLock<CancellationToken>,
    /// Each document's reply readers, stopped when its operations go.
    readers: Mutex<HashMap<String, CancellationToken>>,
}

impl BrokerCalls {
    /// The `send` operations with a reply channel among `hub`'s routes; `timeout_of` gives a
    /// route's call timeout (from its server's config).
    pub fn build(
        hub: Arc<Hub>,
        timeout_of: impl Fn(&Route) -> Duration + Send + Sync + 'static,
    ) -> BrokerCalls {
        let calls = BrokerCalls {
            hub,
            by_id: RwLock::default(),
            waiting: Arc::default(),
            timeout_of: Box::new(timeout_of),
            shutdown: OnceLock::new(),
            readers: Mutex::default(),
        };
        let mut apis: Vec<String> = calls.hub.routes().map(|r| r.route().api.clone()).collect();
        apis.sort();
        apis.dedup();
        for api in apis {
            calls.insert_api(&api);
        }
        calls
    }

    /// The operations of document `api` among the hub's routes, replacing what it had.
    fn insert_api(&self, api: &str) -> Vec<ChannelId> {
        let mut added = Vec::new();
        for live in self.hub.routes().filter(|r| r.route().api == api) {
            let route = &live.route();
            for rr in route
                .request_reply
                .iter()
                .filter(|r| r.action == Action::Send && r.http.is_none())
            {
                let Some(reply) = rr.reply_channel.as_ref().and_then(|c| self.hub.route(c)) else {
                    tracing::warn!(operation = %rr.operation, "the reply has no channel of its own (a dynamic address): not callable yet");
                    continue;
                };
                let location = |r: &Route| {
                    r.messages
                        .iter()
                        .find_map(|m| m.correlation_id.as_deref())
                        .and_then(Location::parse)
                };
                let (Some(request_location), Some(reply_location)) =
                    (location(route), location(&reply.route()))
                else {
                    tracing::warn!(operation = %rr.operation, "request or reply message without a usable correlationId location ($message.header#/... or $message.payload#/...): not callable");
                    continue;
                };
                let id: ChannelId = format!("{}.{}", route.api, rr.operation).into();
                let operation = Arc::new(BrokerOperation {
                    id: id.clone(),
                    request: route.id.clone(),
                    reply: reply.clone(),
                    request_location,
                    reply_location,
                    reply_address: rr
                        .reply_address_location
                        .as_deref()
                        .and_then(Location::parse),
                    timeout: (self.timeout_of)(route),
                });
                if let Ok(mut by_id) = self.by_id.write() {
                    by_id.insert(id.clone(), operation);
                }
                added.push(id);
            }
        }
        added
    }

    /// Adds (or, for a replaced document, renews) document `api`'s operations, with readers
    /// of its reply channels once the calls have started.
    pub fn add_api(&self, api: &str) -> Vec<ChannelId> {
        self.remove_api(api);
        let added = self.insert_api(api);
        if let Some(shutdown) = self.shutdown.get() {
            self.start_readers(api, shutdown);
        }
        added
    }

    /// Forgets document `api`'s operations and stops the readers of its replies.
    pub fn remove_api(&self, api: &str) {
        let prefix = format!("{api}.");
        if let Ok(mut by_id) = self.by_id.write() {
            by_id.retain(|id, _| !id.starts_with(&prefix));
        }
        if let Some(stop) = self.readers.lock().ok().and_then(|mut r| r.remove(api)) {
            stop.cancel();
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<BrokerOperation>> {
        self.by_id.read().ok()?.get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<BrokerOperation>> {
        self.by_id
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts the reply readers of every document (until `shutdown`), and of every document
    /// added later.
    pub fn start(&self, shutdown: CancellationToken) {
        let shutdown = self.shutdown.get_or_init(|| shutdown);
        let mut apis: Vec<String> = self
            .list()
            .iter()
            .map(|op| op.reply.route().api.clone())
            .collect();
        apis.sort();
        apis.dedup();
        for api in apis {
            self.start_readers(&api, shutdown);
        }
    }

    /// One reply reader per reply route of document `api`.
    fn start_readers(&self, api: &str, shutdown: &CancellationToken) {
        let mut readers: HashMap<ChannelId, Vec<Location>> = HashMap::new();
        for op in self.list() {
            if op.reply.route().api != api {
                continue;
            }
            let locations = readers.entry(op.reply.route().id.clone()).or_default();
            if !locations.contains(&op.reply_location) {
                locations.push(op.reply_location.clone());
            }
        }
        if readers.is_empty() {
            return;
        }
        let stop = shutdown.child_token();
        if let Ok(mut running) = self.readers.lock()
            && let Some(previous) = running.insert(api.to_owned(), stop.clone())
        {
            previous.cancel();
        }
        for (route_id, locations) in readers {
            let Some(route) = self.hub.route(&route_id) else {
                continue;
            };
            tokio::spawn(read_replies(
                self.hub.clone(),
                route,
                locations,
                self.waiting.clone(),
                stop.clone(),
            ));
        }
    }

    /// Publishes the request and waits for its reply: the reply message's frame.
    pub async fn call(
        &self,
        op: &BrokerOperation,
        request: CallRequest,
    ) -> Result<Bytes, CallError> {
        let correlation = format!("{:032x}", fastrand::u128(..));
        let mut payload = request.body.unwrap_or(Value::Object(Default::default()));
        let mut headers: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect();
        place(
            &op.request_location,
            &correlation,
            &mut payload,
            &mut headers,
        )?;
        if let Some(location) = &op.reply_address {
            let address = op.reply.route().address.clone().unwrap_or_default();
            place(location, &address, &mut payload, &mut headers)?;
        }
        let params = request
            .path
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(correlation.clone(), tx);
        }
        // Removed however the call ends: answered, timed out, failed, or dropped by its caller.
        let _waiting = WaitingEntry {
            waiting: self.waiting.clone(),
            correlation: correlation.clone(),
        };
        let published = self
            .hub
            .publish(
                &op.request,
                PublishRequest {
                    payload: Bytes::from(payload.to_string()),
                    content_type: Some("application/json".into()),
                    params,
                    headers,
                    origin: Origin::client(Transport::Http, 0),
                    key: None,
                },
            )
            .await;
        if let Err(e) = published {
            return Err(match e {
                crate::hub::PublishFailure::InvalidPayload(v) => {
                    CallError::Invalid(vec![super::Problem {
                        at: format!("body{}", v.instance_path),
                        reason: v.reason,
                    }])
                }
                crate::hub::PublishFailure::InvalidAddress(e) => {
                    // The same place an OpenAPI call names: `path.deviceId`.
                    CallError::Invalid(vec![super::Problem {
                        at: format!("path.{}", e.parameter()),
                        reason: e.to_string(),
                    }])
                }
                other => CallError::Unavailable(other.to_string()),
            });
        }
        match tokio::time::timeout(op.timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply.frame().clone()),
            _ => Err(CallError::Timeout(op.timeout)),
        }
    }
}

/// Reads reply route `route` live and hands each reply to the call waiting for its id.
async fn read_replies(
    hub: Arc<Hub>,
    route: Arc<LiveRoute>,
    locations: Vec<Location>,
    waiting: Waiting,
    stop: CancellationToken,
) {
    let mut subscription = match hub.subscribe(&route, None).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(channel = %route.id(), error = %e, "cannot read replies");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = subscription.next() => e,
        };
        let message = match event {
            Ok(Some(SubscriptionEvent::Message { message, .. })) => message,
            // Replies are read live; a reader that fell behind skips what it missed.
            Ok(Some(SubscriptionEvent::Lagged { .. } | SubscriptionEvent::Expired { .. })) => {
                continue;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(channel = %route.id(), error = %e, "reply stream interrupted");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let ids: Vec<String> = locations.iter().filter_map(|l| l.find(&message)).collect();
        let waiter = waiting
            .lock()
            .ok()
            .and_then(|mut w| ids.iter().find_map(|id| w.remove(id)));
        match waiter {
            Some(tx) => {
                let _ = tx.send(message);
            }
            None => {
                metrics::counter!(telemetry::CALL_REPLIES_UNMATCHED, "channel" => route.id().to_string()).increment(1);
                tracing::debug!(channel = %route.id(), correlation = ?ids, "a reply nobody waits for");
            }
        }
    }
}

/// A call's place among the waiting ones, given up when dropped.
struct WaitingEntry {
    waiting: Waiting,
    correlation: String,
}

impl Drop for WaitingEntry {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&self.correlation);
        }
    }
}

/// Writes `value` where `location` says: a header, or a field of a JSON object payload.
fn place(
    location: &Location,
    value: &str,
    payload: &mut Value,
    headers: &mut Vec<(String, String)>,
) -> Result<(), CallError> {
    match location {
        Location::Header(name) => {
            headers.retain(|(k, _)| k != name);
            headers.push((name.clone(), value.to_owned()));
            Ok(())
        }
        Location::Payload(pointer) => {
            let (parent, field) = pointer.rsplit_once('/').unwrap_or(("", pointer));
            let target = if parent.is_empty() {
                Some(payload)
            } else {
                payload.pointer_mut(parent)
            };
            match target {
                Some(Value::Object(map)) => {
                    map.insert(
                        field.replace("~1", "/").replace("~0", "~"),
                        Value::String(value.to_owned()),
                    );
                    Ok(())
                }
                _ => Err(CallError::Invalid(vec![super::Problem {
                    at: format!("body{parent}"),
                    reason: "must be an object: the correlation id is written into it".into(),
                }])),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn locations_parse_and_place() {
        assert_eq!(
            Location::parse("$message.header#/correlation_id"),
            Some(Location::Header("correlation_id".into()))
        );
        assert_eq!(
            Location::parse("$message.payload#/meta/requestId"),
            Some(Location::Payload("/meta/requestId".into()))
        );
        assert_eq!(Location::parse("$message.correlationId"), None);
        let mut payload = json!({"meta": {}});
        let mut headers = Vec::new();
        place(
            &Location::Payload("/meta/requestId".into()),
            "c1",
            &mut payload,
            &mut headers,
        )
        .unwrap();
        assert_eq!(payload, json!({"meta": {"requestId": "c1"}}));
        place(
            &Location::Header("replyTo".into()),
            "a/b",
            &mut payload,
            &mut headers,
        )
        .unwrap();
        assert_eq!(headers, vec![("replyTo".to_owned(), "a/b".to_owned())]);
        assert!(
            place(
                &Location::Payload("/x".into()),
                "c",
                &mut json!([1]),
                &mut headers
            )
            .is_err()
        );
    }
}
