//! Received publishes into the log, and their PUBACKs back to the event loop once logged.

use super::*;

pub(super) struct Ingest {
    pub(super) hub: Arc<Hub>,
    pub(super) server: Arc<str>,
    pub(super) following: Arc<Following>,
    pub(super) progress: Arc<IntakeProgress>,
    pub(super) redelivery: Redelivery,
}

impl Ingest {
    pub(super) async fn run(
        self,
        mut rx: mpsc::Receiver<Received>,
        flushes: mpsc::Sender<(Received, Vec<PendingAppend>)>,
    ) {
        while let Some(received) = rx.recv().await {
            let publish = &received.publish;
            let mut appends = Vec::new();
            let mut matched = false;
            let mut logged = true;
            let routes = self.following.routes();
            for (route, sub) in routes.iter() {
                let Some(params) = sub.topic.extract(&publish.topic) else {
                    continue;
                };
                matched = true;
                let envelope = Envelope::new(
                    route.id().clone(),
                    publish.topic.clone(),
                    params,
                    publish.payload.clone(),
                    Origin::upstream(Transport::Mqtt, self.server.clone()),
                );
                match self.hub.ingest(route, envelope).await {
                    Ok(pending) => appends.push(pending),
                    Err(e) => {
                        tracing::error!(channel = %route.id(), error = %e, "cannot log message; it stays unacknowledged");
                        logged = false;
                        break;
                    }
                }
            }
            if !logged {
                // Not acknowledged: the broker redelivers it after the reconnect.
                if publish.qos != QoS::AtMostOnce {
                    self.progress.settled(1);
                }
                self.redelivery.request();
                continue;
            }
            if !matched {
                MessageUnmatched {
                    server: &self.server,
                    address: &publish.topic,
                }
                .emit();
            }
            if flushes.send((received, appends)).await.is_err() {
                return;
            }
        }
    }
}

/// Gets messages the log could not take delivered again. MQTT brokers resend unacknowledged
/// messages only when the session resumes, so once the log is back the event loop reconnects
/// (the session is kept: `cleanSession` is false unless the document says otherwise).
#[derive(Clone)]
pub(super) struct Redelivery {
    pub(super) store: crate::store::Store,
    pub(super) reconnect: Arc<Notify>,
    /// A reconnect is already waiting for the log.
    pub(super) armed: Arc<AtomicBool>,
}

impl Redelivery {
    pub(super) fn request(&self) {
        if self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        // Not tracked: it only waits, and a stopping daemon does not need it.
        tokio::spawn(async move {
            this.store.available().await;
            this.armed.store(false, Ordering::Release);
            this.reconnect.notify_one();
        });
    }
}

/// Waits for each message's appends to be flushed, in arrival order, and hands its PUBACK back
/// to the event loop. May wait on the event loop's ack channel: the event loop drains it
/// without waiting on anything but its poll, so this closes no cycle.
pub(super) async fn await_flushes(
    mut rx: mpsc::Receiver<(Received, Vec<PendingAppend>)>,
    acks: mpsc::Sender<Received>,
    progress: Arc<IntakeProgress>,
    redelivery: Redelivery,
) {
    while let Some((received, appends)) = rx.recv().await {
        let mut safe = true;
        for append in appends {
            if let Err(e) = append.flushed().await {
                tracing::error!(topic = %received.publish.topic, error = %e, "log flush failed; message not acknowledged");
                safe = false;
            }
        }
        if received.publish.qos == QoS::AtMostOnce {
            continue;
        }
        if !safe {
            progress.settled(1);
            redelivery.request();
            continue;
        }
        if acks.send(received).await.is_err() {
            break;
        }
    }
    // Dropping `acks` tells the event loop that every logged message's PUBACK is with it.
}
