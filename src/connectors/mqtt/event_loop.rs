//! The connection task: the only place rumqttc is polled, and it awaits nothing else.

use super::*;

pub(super) struct EventLoopTask {
    pub(super) key: ServerKey,
    pub(super) client: AsyncClient,
    pub(super) connections: Connections,
    pub(super) pending: Arc<Mutex<PendingPublishes>>,
    /// Signalled when messages the log could not take must be redelivered.
    pub(super) reconnect: Arc<Notify>,
    /// What the connection subscribes at each CONNACK (changed by the follower).
    pub(super) following: Arc<Following>,
    /// With a clean session a dropped connection loses the broker's queue, so shedding is no
    /// way to slow the broker down.
    pub(super) clean_session: bool,
    pub(super) progress: Arc<IntakeProgress>,
    /// For the warning when the broker keeps dropping the connection right after accepting it.
    pub(super) client_id: String,
}

/// A connection that lasted this long was a good one: the next reconnect starts from the
/// shortest delay again. One dropped sooner keeps the backoff growing, so a broker that takes
/// the session away at once (another client with the same id) is not hammered.
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Connections in a row dropped this soon after their CONNACK before the takeover warning.
const SHORT_LIVED_WARNING: u32 = 3;
const SHORT_LIVED: Duration = Duration::from_secs(1);

/// How long a stopping connector keeps polling so that acknowledgements for logged messages
/// still reach the broker.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The event loop's own queues; everything in here is moved on without waiting.
#[derive(Default)]
pub(super) struct Backlog {
    /// Received messages the ingest queue had no room for, oldest first.
    pub(super) held: VecDeque<Received>,
    /// PUBACKs rumqttc's request queue had no room for, in the order they must go out.
    pub(super) acks: VecDeque<Publish>,
    /// Generation of the current connection (0: none yet).
    pub(super) generation: u64,
    pub(super) connected: bool,
}

/// What to do with an acknowledgement that came back from the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AckFate {
    Send,
    /// Received on an earlier connection: its packet id may name another message by now. The
    /// broker redelivers the message (logged twice, never lost).
    Stale,
}

impl Backlog {
    pub(super) fn ack_fate(&self, generation: u64) -> AckFate {
        if self.connected && generation == self.generation {
            AckFate::Send
        } else {
            AckFate::Stale
        }
    }

    /// The connection is gone: its unsent acknowledgements mean nothing on the next one.
    /// Returns how many were dropped.
    pub(super) fn disconnected(&mut self) -> u64 {
        self.connected = false;
        let dropped = self.acks.len() as u64;
        self.acks.clear();
        dropped
    }
}

impl EventLoopTask {
    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, PendingPublishes> {
        match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(super) fn changed(&self, connected: bool, error: Option<String>) {
        self.connections.report(&self.key, "mqtt", connected, error);
    }

    /// Hands PUBACKs to rumqttc while its request queue has room; never waits.
    pub(super) fn send_acks(&self, backlog: &mut Backlog) {
        while let Some(publish) = backlog.acks.front() {
            if self.client.try_ack(publish).is_err() {
                return; // Full: the next poll drains it.
            }
            backlog.acks.pop_front();
            self.progress.settled(1);
        }
    }

    /// Moves held messages into the ingest queue while it has room; never waits.
    pub(super) fn forward_held(backlog: &mut Backlog, ingress: &mpsc::Sender<Received>) {
        while let Some(received) = backlog.held.pop_front() {
            match ingress.try_send(received) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(received)) => {
                    backlog.held.push_front(received);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    pub(super) async fn run(
        self,
        mut eventloop: EventLoop,
        ingress: mpsc::Sender<Received>,
        mut acks: mpsc::Receiver<Received>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut backlog = Backlog::default();
        let mut ingress = Some(ingress);
        // Set while a shed connection waits for ingest to catch up before it reconnects.
        let mut shed = false;
        let mut acks_open = true;
        let mut drain_deadline = None;
        let mut connected_at: Option<tokio::time::Instant> = None;
        let mut short_lived = 0u32;
        loop {
            // Acknowledgements first: each one frees a slot of the broker's window.
            self.send_acks(&mut backlog);
            if let Some(tx) = &ingress {
                Self::forward_held(&mut backlog, tx);
            }
            // Stopping, and every logged message's PUBACK is with rumqttc: leave cleanly.
            if drain_deadline.is_some() && !acks_open && backlog.acks.is_empty() {
                self.disconnect(&mut eventloop).await;
                return;
            }
            let room = ingress.clone();
            self.progress.loop_waiting();
            let event = tokio::select! {
                biased;
                // Stop taking new messages; keep polling so pending acks go out. Held messages
                // are not acknowledged: the broker redelivers them after the restart.
                _ = shutdown.cancelled(), if ingress.is_some() => {
                    self.progress.loop_working();
                    ingress = None;
                    self.progress.settled(backlog.held.len() as u64);
                    backlog.held.clear();
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    continue;
                }
                // Draining took too long: leave; the broker redelivers what was not acked.
                _ = sleep_until_deadline(drain_deadline) => {
                    self.progress.loop_working();
                    self.disconnect(&mut eventloop).await;
                    return;
                }
                // The broker resends unacknowledged messages when the session resumes.
                _ = self.reconnect.notified(), if backlog.connected && ingress.is_some() => {
                    self.progress.loop_working();
                    tracing::warn!(server = %self.key, "reconnecting so that the broker redelivers the messages the log could not take");
                    eventloop.clean();
                    self.progress.settled(backlog.disconnected());
                    self.changed(false, Some("reconnecting for redelivery after a log failure".into()));
                    continue;
                }
                // Cancel-safe: a reserve() cancelled by another branch takes nothing.
                permit = reserve(room.as_ref()), if !backlog.held.is_empty() => {
                    self.progress.loop_working();
                    if let (Some(permit), Some(received)) = (permit, backlog.held.pop_front()) {
                        permit.send(received);
                    }
                    continue;
                }
                // An acknowledgement back from the log. Taken only when the last ones went out,
                // so the local list stays within one request queue's worth. Cancel-safe.
                ack = acks.recv(), if acks_open && backlog.acks.is_empty() => {
                    self.progress.loop_working();
                    let mut next = ack;
                    // Take every acknowledgement already waiting, not one per loop turn: at
                    // thousands a second a turn each would cost the poll its time.
                    loop {
                        match next {
                            Some(received) => match backlog.ack_fate(received.generation) {
                                AckFate::Send => backlog.acks.push_back(received.publish),
                                AckFate::Stale => self.progress.settled(1),
                            },
                            None => {
                                acks_open = false;
                                break;
                            }
                        }
                        if backlog.acks.len() >= ACK_CAPACITY {
                            break;
                        }
                        next = match acks.try_recv() {
                            Ok(received) => Some(received),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                        };
                    }
                    continue;
                }
                // Shed: reconnect once ingest has room again (the broker holds the rest).
                _ = tokio::time::sleep(SHED_RECHECK), if shed => {
                    self.progress.loop_working();
                    if ingress.as_ref().is_none_or(|tx| tx.capacity() == tx.max_capacity()) {
                        tracing::info!(server = %self.key, "ingest caught up; reconnecting for the rest of the backlog");
                        shed = false;
                    }
                    continue;
                }
                // Cancel-safe per rumqttc: a cancelled poll loses no state.
                event = eventloop.poll(), if !shed => event,
            };
            self.progress.loop_working();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backlog.connected = true;
                    backlog.generation += 1;
                    connected_at = Some(tokio::time::Instant::now());
                    if !ack.session_present {
                        self.pending().fail_all(&self.key.server);
                    }
                    let filters = self.following.filters();
                    if !filters.is_empty() {
                        let filters = filters
                            .into_iter()
                            .map(|(f, q)| rumqttc::SubscribeFilter::new(f, q));
                        if let Err(e) = self.client.try_subscribe_many(filters) {
                            tracing::error!(server = %self.key, error = %e, "cannot queue subscriptions");
                        }
                    }
                    self.changed(true, None);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(tx) = &ingress else {
                        continue; // Stopping: not acked, so the broker redelivers it later.
                    };
                    let at_most_once = publish.qos == QoS::AtMostOnce;
                    let received = Received {
                        generation: backlog.generation,
                        publish,
                    };
                    if at_most_once {
                        // Nothing to acknowledge, nothing to redeliver: a full queue drops it.
                        if tx.try_send(received).is_err() {
                            QueueOverflowed {
                                channel: &self.key.to_string(),
                                queue: "mqtt_ingress_qos0",
                            }
                            .emit();
                        }
                        continue;
                    }
                    self.progress.received();
                    if backlog.held.is_empty() {
                        match tx.try_send(received) {
                            Ok(()) => continue,
                            Err(mpsc::error::TrySendError::Full(r)) => backlog.held.push_back(r),
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    } else {
                        backlog.held.push_back(received);
                    }
                    if backlog.held.len() > HOLD_LIMIT {
                        self.overflowed(&mut eventloop, &mut backlog, &mut shed);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.pending().acked(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(comp))) => self.pending().acked(comp.pkid),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.pending().sent(pkid),
                Ok(_) => {}
                Err(error) => {
                    if backlog.connected || drain_deadline.is_none() {
                        self.changed(false, Some(describe(&error)));
                    }
                    self.progress.settled(backlog.disconnected());
                    if drain_deadline.is_some() {
                        return;
                    }
                    match connected_at.take().map(|at| at.elapsed()) {
                        Some(lasted) if lasted >= STABLE_AFTER => {
                            backoff.reset();
                            short_lived = 0;
                        }
                        Some(lasted) if lasted < SHORT_LIVED => {
                            short_lived += 1;
                            if short_lived == SHORT_LIVED_WARNING {
                                tracing::warn!(
                                    server = %self.key,
                                    client_id = %self.client_id,
                                    "the broker keeps closing the connection right after accepting it: is another client using the same client id? (reconnects back off)"
                                );
                            }
                        }
                        _ => {}
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// More messages are held than [`HOLD_LIMIT`]: the broker's window is wider than the log
    /// can take at once.
    pub(super) fn overflowed(
        &self,
        eventloop: &mut EventLoop,
        backlog: &mut Backlog,
        shed: &mut bool,
    ) {
        let server = self.key.to_string();
        if self.clean_session {
            // A clean session has no redelivery to fall back on: keep the oldest, count the
            // newest as lost.
            while backlog.held.len() > HOLD_LIMIT {
                backlog.held.pop_back();
                self.progress.settled(1);
                QueueOverflowed {
                    channel: &server,
                    queue: "mqtt_ingress_clean_session",
                }
                .emit();
            }
            return;
        }
        tracing::warn!(
            server = %self.key,
            held = backlog.held.len(),
            "the log is behind the broker's backlog: disconnecting until it catches up; the broker keeps the messages and redelivers them"
        );
        QueueOverflowed {
            channel: &server,
            queue: "mqtt_ingress_shed",
        }
        .emit();
        self.progress.settled(backlog.held.len() as u64);
        backlog.held.clear();
        eventloop.clean();
        self.progress.settled(backlog.disconnected());
        self.changed(
            false,
            Some("paused: the log is behind the broker's backlog".into()),
        );
        *shed = true;
    }

    pub(super) async fn disconnect(&self, eventloop: &mut EventLoop) {
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        self.connections
            .set(&self.key, ConnectionState::Disconnected, None);
    }
}

/// Waits for room in the ingest queue (never, without a queue).
pub(super) async fn reserve(
    tx: Option<&mpsc::Sender<Received>>,
) -> Option<mpsc::Permit<'_, Received>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub(super) fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::Io(e) => format!("I/O: {}", e.kind()),
        other => other.to_string(),
    }
}
