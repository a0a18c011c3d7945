//! Calls triggered by messages: a readable route configured with `routes.<id>.call` calls an
//! operation for every message that arrives on it (from a broker), and publishes the reply on
//! another route with the request's correlation id.
//!
//! The message is the call request: `{"correlationId", "path", "query", "headers", "body"}`
//! (all optional), its address parameters added to `path`. The reply is
//! `{"correlationId", "status", "body"}` — or `{"correlationId", "error"}` when no upstream
//! response came — published with the same address parameters. Messages are taken from the
//! route's live stream, after the log: a message that arrives while the daemon is down is in the
//! log but triggers no call (durable cursors come with bridges).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{CallRequest, Operations};
use crate::config::TriggerConfig;
use crate::hub::{Hub, PublishRequest, SubscriptionEvent};
use crate::routing::envelope::{Delivered, Origin, Transport};

/// Calls in flight per trigger at most; more messages wait.
const CONCURRENT_CALLS: usize = 64;

/// Checks every trigger against the routes and operations; the problems, one line each.
pub fn check(
    hub: &Hub,
    operations: &Operations,
    triggers: &[(String, TriggerConfig)],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (route, trigger) in triggers {
        match hub.route(route) {
            Some(r) if r.route.direction.readable => {}
            Some(_) => problems.push(format!("routes.{route}.call: {route} is not readable")),
            None => problems.push(format!("routes.{route}.call: no route {route}")),
        }
        if operations.log_of(&trigger.operation).is_none() {
            problems.push(format!(
                "routes.{route}.call.operation: no operation {}",
                trigger.operation
            ));
        }
        match hub.route(&trigger.reply) {
            Some(r) if r.route.direction.writable => {}
            Some(_) => problems.push(format!(
                "routes.{route}.call.reply: {} is not writable",
                trigger.reply
            )),
            None => problems.push(format!(
                "routes.{route}.call.reply: no route {}",
                trigger.reply
            )),
        }
    }
    problems
}

/// Starts one reader per trigger (checked with [`check`] first).
pub fn start(
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    triggers: Vec<(String, TriggerConfig)>,
    shutdown: CancellationToken,
) {
    for (route_id, trigger) in triggers {
        let Some(route) = hub.route(&route_id).cloned() else {
            continue;
        };
        let (hub, operations, shutdown) = (hub.clone(), operations.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut subscription = match hub.subscribe(&route, None).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(channel = %route.id(), error = %e, "cannot read the trigger route");
                    return;
                }
            };
            let slots = Arc::new(Semaphore::new(CONCURRENT_CALLS));
            let trigger = Arc::new(trigger);
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = subscription.next() => e,
                };
                let message = match event {
                    Ok(Some(SubscriptionEvent::Message { message, .. })) => message,
                    Ok(Some(SubscriptionEvent::Lagged { skipped, .. })) => {
                        tracing::warn!(channel = %route.id(), skipped, "trigger fell behind; continuing from the log");
                        continue;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(channel = %route.id(), error = %e, "trigger stream interrupted");
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (hub, operations, trigger) = (hub.clone(), operations.clone(), trigger.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    answer(&hub, &operations, &trigger, &message).await;
                });
            }
        });
    }
}

async fn answer(hub: &Hub, operations: &Operations, trigger: &TriggerConfig, message: &Delivered) {
    let mut fields: Map<String, Value> = match serde_json::from_slice(&message.envelope.payload) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let correlation = fields.remove("correlationId").unwrap_or(Value::Null);
    let mut path = match fields.remove("path") {
        Some(Value::Object(p)) => p,
        _ => Map::new(),
    };
    for (name, value) in message.envelope.params.iter() {
        path.entry(name.to_owned())
            .or_insert_with(|| Value::String(value.to_owned()));
    }
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let request = CallRequest {
        path,
        query: object(fields.remove("query")),
        headers: object(fields.remove("headers")),
        body: fields.remove("body"),
    };
    let reply = match operations.call(&trigger.operation, request).await {
        Ok(r) => {
            let body = serde_json::from_slice::<Value>(&r.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
            json!({"correlationId": correlation, "status": r.status, "body": body})
        }
        Err(e) => {
            json!({"correlationId": correlation, "error": {"code": e.label(), "message": e.to_string()}})
        }
    };
    let params: HashMap<String, String> = message
        .envelope
        .params
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let published = hub
        .publish(
            &trigger.reply,
            PublishRequest {
                payload: Bytes::from(reply.to_string()),
                content_type: Some("application/json".into()),
                params,
                headers: Vec::new(),
                origin: Origin::client(Transport::Bridge, 0),
                key: None,
            },
        )
        .await;
    if let Err(e) = published {
        tracing::error!(reply = %trigger.reply, operation = %trigger.operation, error = %e, "cannot publish a triggered call's reply");
    }
}
