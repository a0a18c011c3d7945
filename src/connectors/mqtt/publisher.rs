//! The sink: publishes from routes, each completed by its PUBACK, paired by packet id in
//! the order rumqttc sends them.

use super::*;

/// Publishes waiting for their PUBACK. Requests enter the client's queue in the order their
/// waiters enter `unassigned`, and the event loop reports `Outgoing::Publish(pkid)` in that
/// order, so the front waiter gets the next new packet id.
#[derive(Default)]
pub(super) struct PendingPublishes {
    pub(super) unassigned: VecDeque<oneshot::Sender<Result<(), PublishError>>>,
    pub(super) by_pkid: HashMap<u16, oneshot::Sender<Result<(), PublishError>>>,
}

impl PendingPublishes {
    /// The event loop sent a publish with `pkid` (0 for QoS 0).
    pub(super) fn sent(&mut self, pkid: u16) {
        if pkid != 0 && self.by_pkid.contains_key(&pkid) {
            return; // A retransmission after a reconnect.
        }
        let Some(waiter) = self.unassigned.pop_front() else {
            return;
        };
        if pkid == 0 {
            let _ = waiter.send(Ok(()));
        } else {
            self.by_pkid.insert(pkid, waiter);
        }
    }

    pub(super) fn acked(&mut self, pkid: u16) {
        if let Some(waiter) = self.by_pkid.remove(&pkid) {
            let _ = waiter.send(Ok(()));
        }
    }

    /// The broker started a new session: whatever was not acknowledged is gone.
    pub(super) fn fail_all(&mut self, server: &str) {
        for waiter in self
            .unassigned
            .drain(..)
            .chain(self.by_pkid.drain().map(|(_, w)| w))
        {
            let _ = waiter.send(Err(PublishError::NotConnected {
                server: server.to_owned(),
            }));
        }
    }
}

/// The sending side registered with the hub.
pub(super) struct MqttPublisher {
    pub(super) key: ServerKey,
    pub(super) client: AsyncClient,
    pub(super) pending: Arc<Mutex<PendingPublishes>>,
    pub(super) connections: Connections,
}

impl Publisher for MqttPublisher {
    fn is_connected(&self) -> bool {
        self.connections.is_connected(&self.key)
    }

    fn publish(
        &self,
        upstream: &crate::routing::Upstream,
        message: Outbound,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let (qos_level, retain) = match upstream.binding.get::<MqttRoute>() {
            Some(m) => (qos(m.publish_qos), m.retain),
            _ => (QoS::AtLeastOnce, false),
        };
        let (tx, rx) = oneshot::channel();
        let server = self.key.server.clone();
        let queued = {
            // Held only for these two non-blocking calls, never across an await.
            let mut pending = match self.pending.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            pending.unassigned.push_back(tx);
            let result = self.client.try_publish(
                message.address,
                qos_level,
                retain,
                message.payload.to_vec(),
            );
            if result.is_err() {
                pending.unassigned.pop_back();
            }
            result
        };
        async move {
            if queued.is_err() {
                return Err(PublishError::Overloaded { server });
            }
            rx.await
                .unwrap_or(Err(PublishError::NotConnected { server }))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_pair_with_packet_ids_in_order() {
        let mut p = PendingPublishes::default();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let (c, mut rc) = oneshot::channel();
        p.unassigned.extend([a, b, c]);
        p.sent(1);
        p.sent(0); // b was QoS 0: done when sent
        p.sent(2);
        assert!(matches!(rb.try_recv(), Ok(Ok(()))));
        p.sent(1); // retransmission of 1: no new waiter taken
        p.acked(2);
        assert!(matches!(rc.try_recv(), Ok(Ok(()))));
        assert!(ra.try_recv().is_err());
        p.acked(1);
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
    }

    #[test]
    fn a_new_session_fails_what_was_pending() {
        let mut p = PendingPublishes::default();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        p.unassigned.extend([a, b]);
        p.sent(7);
        p.fail_all("broker");
        assert!(matches!(
            ra.try_recv(),
            Ok(Err(PublishError::NotConnected { .. }))
        ));
        assert!(matches!(
            rb.try_recv(),
            Ok(Err(PublishError::NotConnected { .. }))
        ));
    }
}
