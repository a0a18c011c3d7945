//! Calls triggered by messages: a readable route configured with `routes.<id>.call` calls an
//! operation for every message that arrives on it (from a broker), and publishes the reply on
//! another route with the request's correlation id.
//!
//! The message is the call request: `{"correlationId", "path", "query", "headers", "body"}`
//! (all optional), its address parameters added to `path`. The reply is
//! `{"correlationId", "status", "body"}` — or `{"correlationId", "error"}` when no upstream
//! response came — published with the same address parameters. Each trigger reads its route's
//! log from a durable cursor, like a bridge lane: a message that arrived while the daemon was
//! down is answered after the restart.

use crate::telemetry::events::DeadLetterReason;
use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CallRequest, Operations};
use crate::config::TriggerConfig;
use crate::hub::{Hub, PublishFailure, PublishRequest, SubscriptionEvent};
use crate::routing::envelope::{Delivered, Origin, Transport};
use crate::store;

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
            Some(r) if r.route().direction.readable => {}
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
            Some(r) if r.route().direction.writable => {}
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

/// The store namespace of trigger cursors: route id → the next offset to answer.
const CURSORS: &str = "trigger-cursors";
/// How often a trigger records its cursor.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// Starts one reader per trigger (checked with [`check`] first). Each reads its route's log from
/// a durable cursor, created at the end of the log before any connector starts: a message that
/// arrives while the daemon is down is answered after the restart. Calls run concurrently; the
/// cursor moves past a message once it and every earlier one were answered, so a crash calls
/// again at most what was in flight (at-least-once, like bridges).
pub async fn start(
    hub: Arc<Hub>,
    operations: Arc<Operations>,
    triggers: Vec<(String, TriggerConfig)>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), store::Error> {
    for (route_id, trigger) in triggers {
        let Some(route) = hub.route(&route_id) else {
            continue;
        };
        let store = hub.store().clone();
        let cursor = store
            .cursor_or_create(CURSORS, &route_id, &route.log, false)
            .await?;
        let (hub, operations, shutdown) = (hub.clone(), operations.clone(), shutdown.clone());
        let trigger = Arc::new(trigger);
        tasks.spawn(async move {
            let mut next = cursor;
            let mut committed = cursor;
            let record = |next: u64| {
                let (store, key) = (store.clone(), route_id.clone());
                async move {
                    if let Err(e) = store.set_cursor(CURSORS, &key, next).await {
                        tracing::warn!(channel = %key, error = %e, "cannot record the trigger's cursor");
                        return false;
                    }
                    true
                }
            };
            'restart: loop {
                let mut subscription = match hub.subscribe(&route, Some(next)).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(channel = %route.id(), error = %e, "cannot read the trigger route; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'restart,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'restart,
                        }
                    }
                };
                let mut answering = FuturesOrdered::new();
                let mut tick = tokio::time::interval(COMMIT_INTERVAL);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            // Let the calls out finish (bounded), so they are not made again.
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                            while let Ok(Some(offset)) = tokio::time::timeout_at(deadline, answering.next()).await {
                                next = offset + 1;
                            }
                            break 'restart;
                        }
                        Some(offset) = answering.next(), if !answering.is_empty() => next = offset + 1,
                        event = subscription.next(), if answering.len() < CONCURRENT_CALLS => match event {
                            Ok(Some(SubscriptionEvent::Message { message, .. })) => {
                                let (hub, operations, trigger) = (hub.clone(), operations.clone(), trigger.clone());
                                answering.push_back(async move {
                                    answer(&hub, &operations, &trigger, &message).await;
                                    message.offset
                                });
                            }
                            Ok(Some(SubscriptionEvent::Lagged { .. })) => {}
                            Ok(Some(SubscriptionEvent::Expired { missed, resume_from })) => {
                                tracing::warn!(channel = %route.id(), missed, resume_from, "retention removed messages before their calls were made; continuing with the oldest kept");
                            }
                            Ok(None) => break 'restart,
                            Err(e) => {
                                tracing::warn!(channel = %route.id(), error = %e, "trigger stream interrupted; resuming from the cursor");
                                while let Some(offset) = answering.next().await {
                                    next = offset + 1;
                                }
                                continue 'restart;
                            }
                        },
                        _ = tick.tick() => {
                            if next != committed && record(next).await {
                                committed = next;
                            }
                        }
                    }
                }
            }
            if next != committed {
                record(next).await;
            }
        });
    }
    Ok(())
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
    // The reply's upstream may be down for a moment: retry a few times before giving up on it.
    let payload = Bytes::from(reply.to_string());
    let mut backoff =
        crate::upstream::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let published = hub
            .publish(
                &trigger.reply,
                PublishRequest {
                    payload: payload.clone(),
                    content_type: Some("application/json".into()),
                    params: params.clone(),
                    headers: Vec::new(),
                    origin: Origin::client(Transport::Bridge, 0),
                    key: None,
                },
            )
            .await;
        match published {
            Ok(_) => return,
            Err(e @ (PublishFailure::Upstream(_) | PublishFailure::Store(_)))
                if backoff.attempts() < REPLY_ATTEMPTS =>
            {
                tracing::debug!(reply = %trigger.reply, error = %e, "reply not published yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(reply = %trigger.reply, operation = %trigger.operation, error = %e, "cannot publish a triggered call's reply; it goes to the reply channel's dead letters");
                dead_letter_reply(hub, trigger, message, payload, &e).await;
                return;
            }
        }
    }
}

/// Publish attempts for one reply before it goes to the reply channel's dead letters.
const REPLY_ATTEMPTS: u32 = 5;

/// Keeps a reply that could not be published in the reply channel's dead-letter log, where
/// `POST .../dead-letters/replay` publishes it again.
async fn dead_letter_reply(
    hub: &Hub,
    trigger: &TriggerConfig,
    request: &Delivered,
    payload: Bytes,
    error: &PublishFailure,
) {
    let Some(route) = hub.route(&trigger.reply) else {
        return;
    };
    let envelope = crate::routing::envelope::Envelope::new(
        route.route().id.clone(),
        String::new(),
        request.envelope.params.clone(),
        payload,
        Origin::client(Transport::Bridge, 0),
    );
    let written = match hub
        .dead_letter(
            &route,
            envelope,
            DeadLetterReason::ReplyUndeliverable,
            error.to_string(),
        )
        .await
    {
        Ok(pending) => pending.flushed().await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::error!(reply = %trigger.reply, error = %e, "the reply is lost: the dead-letter log failed too");
    }
}
