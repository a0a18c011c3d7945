//! A route's messages in offset order for one reader: replayed from the log, then live, with
//! no gap and no duplicate, resuming from the log when the reader lags.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::{Hub, LiveRoute};
use crate::routing::envelope::Delivered;
use crate::store::{self, Store};

impl Hub {
    /// Subscribes to a route: replay from `from` (inclusive) when given, then live, with no gap
    /// and no duplicate; live only (from the next message appended) when `from` is `None`.
    pub async fn subscribe(
        &self,
        route: &Arc<LiveRoute>,
        from: Option<u64>,
    ) -> Result<Subscription, store::Error> {
        // Subscribe before looking at the log: whatever is appended after this point arrives
        // live, and whatever arrives twice is dropped by offset.
        let rx = route.live.subscribe();
        let next_offset = match from {
            Some(from) => from.max(1),
            None => self
                .store
                .log_stats(&route.log)
                .last_offset
                .map_or(1, |o| o + 1),
        };
        Ok(Subscription {
            route: route.clone(),
            store: self.store.clone(),
            rx,
            next_offset,
            replaying: from.is_some(),
            backlog: VecDeque::new(),
            batch: self.config.replay_batch,
        })
    }
}

/// What a subscription yields.
pub enum SubscriptionEvent {
    /// A message; `live` is false for messages read back from the log.
    Message { message: Arc<Delivered>, live: bool },
    /// The subscriber fell behind the live stream by `skipped` messages; it continues from
    /// the log at `resume_from`.
    Lagged { skipped: u64, resume_from: u64 },
    /// Retention removed `missed` offsets before this subscriber read them; it continues at
    /// `resume_from`, the oldest offset the log still has.
    Expired { missed: u64, resume_from: u64 },
}

/// A route's messages in offset order: replayed from the log, then live.
pub struct Subscription {
    route: Arc<LiveRoute>,
    store: Store,
    rx: broadcast::Receiver<Arc<Delivered>>,
    /// The next offset this subscriber expects.
    next_offset: u64,
    replaying: bool,
    backlog: VecDeque<Arc<Delivered>>,
    batch: usize,
}

impl Subscription {
    pub fn route(&self) -> &Arc<LiveRoute> {
        &self.route
    }

    /// The next event; `Ok(None)` when the route is shut down. Cancel-safe: a message is
    /// consumed only when returned.
    pub async fn next(&mut self) -> Result<Option<SubscriptionEvent>, store::Error> {
        loop {
            if let Some(message) = self.backlog.pop_front() {
                self.next_offset = message.offset + 1;
                return Ok(Some(SubscriptionEvent::Message {
                    message,
                    live: false,
                }));
            }
            if self.replaying {
                let expired_before = self.store.log_stats(&self.route.log).expired_before;
                if self.next_offset < expired_before {
                    let missed = expired_before - self.next_offset;
                    self.next_offset = expired_before;
                    return Ok(Some(SubscriptionEvent::Expired {
                        missed,
                        resume_from: expired_before,
                    }));
                }
                let messages = self
                    .store
                    .read(&self.route.log, self.next_offset, self.batch)
                    .await?;
                if messages.is_empty() {
                    self.replaying = false;
                } else {
                    self.backlog.extend(messages);
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(message) if message.offset < self.next_offset => continue,
                // A gap can only mean messages this receiver never saw: read them back.
                Ok(message) if message.offset > self.next_offset => self.replaying = true,
                Ok(message) => {
                    self.next_offset = message.offset + 1;
                    return Ok(Some(SubscriptionEvent::Message {
                        message,
                        live: true,
                    }));
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    self.replaying = true;
                    return Ok(Some(SubscriptionEvent::Lagged {
                        skipped,
                        resume_from: self.next_offset,
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// The next event if one is ready without waiting: what was read back and not yet yielded,
    /// or a live message already received. `None` means "call [`Self::next`]" — nothing is
    /// ready, a read from the log is due, or the route is shut down. For writers that send
    /// everything ready and then flush once.
    pub fn try_next(&mut self) -> Option<SubscriptionEvent> {
        loop {
            if let Some(message) = self.backlog.pop_front() {
                self.next_offset = message.offset + 1;
                return Some(SubscriptionEvent::Message {
                    message,
                    live: false,
                });
            }
            if self.replaying {
                return None;
            }
            match self.rx.try_recv() {
                Ok(message) if message.offset < self.next_offset => continue,
                // Same as in `next`: the gap is read back from the log there.
                Ok(message) if message.offset > self.next_offset => {
                    self.replaying = true;
                    return None;
                }
                Ok(message) => {
                    self.next_offset = message.offset + 1;
                    return Some(SubscriptionEvent::Message {
                        message,
                        live: true,
                    });
                }
                Err(broadcast::error::TryRecvError::Lagged(skipped)) => {
                    self.replaying = true;
                    return Some(SubscriptionEvent::Lagged {
                        skipped,
                        resume_from: self.next_offset,
                    });
                }
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => {
                    return None;
                }
            }
        }
    }

    /// The offset of the next message this subscription will yield.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
}

#[cfg(test)]
mod tests {
    //! `Subscription` against a real store in a temp dir, no broker: replay, then live, and a
    //! lagging reader resumed from the log — each offset exactly once, in order.

    use super::*;
    use crate::hub::HubConfig;
    use crate::routing::address::Params;
    use crate::routing::envelope::{Envelope, Origin, Transport};
    use crate::store::StoreConfig;
    use crate::upstream::Connections;
    use bytes::Bytes;
    use std::time::Duration;

    const DOC: &str = "asyncapi: 3.0.0\ninfo: {title: T, version: '1'}\nchannels:\n  readings:\n    address: readings\noperations:\n  receive: {action: receive, channel: {$ref: '#/channels/readings'}}\n";

    struct Fixture {
        hub: Hub,
        route: Arc<LiveRoute>,
        _dir: tempfile::TempDir,
    }

    fn fixture(live_capacity: usize) -> Fixture {
        fixture_with(live_capacity, StoreConfig::default())
    }

    fn fixture_with(live_capacity: usize, store_config: StoreConfig) -> Fixture {
        let loaded = crate::spec::load_text(std::path::Path::new("t.yaml"), DOC).unwrap();
        let table = Arc::new(
            crate::routing::compile(&loaded.apis, &crate::routing::binding::NoConnectors)
                .unwrap()
                .table,
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), store_config).unwrap();
        let config = HubConfig {
            live_capacity,
            replay_batch: 7,
            ..HubConfig::default()
        };
        let hub = Hub::new(table, store, Connections::default(), config);
        let route = hub.routes().next().unwrap().clone();
        Fixture {
            hub,
            route,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Appends `n` messages (`{"n": i}`) and waits until they are flushed.
        async fn append(&self, from: u64, n: u64) {
            let mut pending = Vec::new();
            for i in from..from + n {
                let envelope = Envelope::new(
                    self.route.id().clone(),
                    "readings".into(),
                    Params::default(),
                    Bytes::from(format!("{{\"n\":{i}}}")),
                    Origin::upstream(Transport::Mqtt, "broker".into()),
                );
                pending.push(self.hub.ingest(&self.route, envelope).await.unwrap());
            }
            for p in pending {
                p.flushed().await.unwrap();
            }
        }
    }

    impl Fixture {
        /// Appends once a concurrent reader had time to reach the end of the log.
        async fn append_later(&self, from: u64, n: u64) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.append(from, n).await;
        }
    }

    async fn next_event(subscription: &mut Subscription) -> SubscriptionEvent {
        tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("no event within 5 s")
            .unwrap()
            .expect("the route is open")
    }

    /// Reads until `count` messages arrived; their offsets, and whether a lag was reported.
    async fn read(subscription: &mut Subscription, count: usize) -> (Vec<u64>, Vec<bool>, bool) {
        let (mut offsets, mut live, mut lagged) = (Vec::new(), Vec::new(), false);
        while offsets.len() < count {
            match next_event(subscription).await {
                SubscriptionEvent::Message { message, live: l } => {
                    offsets.push(message.offset);
                    live.push(l);
                }
                SubscriptionEvent::Lagged { .. } => lagged = true,
                SubscriptionEvent::Expired { .. } => panic!("nothing expires here"),
            }
        }
        (offsets, live, lagged)
    }

    #[tokio::test]
    async fn replay_then_live_with_no_gap_and_no_duplicate() {
        let f = fixture(64);
        f.append(0, 20).await;
        let mut sub = f.hub.subscribe(&f.route, Some(5)).await.unwrap();
        // Live messages arrive while the replay (batches of 7) is still under way.
        f.append(20, 10).await;
        let (offsets, live, lagged) = read(&mut sub, 26).await;
        assert_eq!(offsets, (5..=30).collect::<Vec<u64>>());
        assert!(!lagged);
        assert!(!live[0], "the first came from the log");
        // A reader waiting at the end of the log gets what follows live.
        let ((offsets, live, _), ()) = tokio::join!(read(&mut sub, 3), f.append_later(30, 3));
        assert_eq!(offsets, vec![31, 32, 33]);
        assert!(live.iter().all(|l| *l), "then live: {live:?}");
        assert_eq!(sub.next_offset(), 34);
    }

    /// Reads with `next` once, then everything `try_next` has ready, and again, until `count`
    /// messages came: the way a WebSocket session sends a burst before one flush.
    /// Also how many came from `try_next`.
    async fn read_in_bursts(
        subscription: &mut Subscription,
        count: usize,
    ) -> (Vec<u64>, bool, usize) {
        let (mut offsets, mut lagged, mut ready) = (Vec::new(), false, 0);
        let mut record = |event, offsets: &mut Vec<u64>| match event {
            SubscriptionEvent::Message { message, .. } => offsets.push(message.offset),
            SubscriptionEvent::Lagged { .. } => lagged = true,
            SubscriptionEvent::Expired { .. } => panic!("nothing expires here"),
        };
        while offsets.len() < count {
            record(next_event(subscription).await, &mut offsets);
            while let Some(event) = subscription.try_next() {
                record(event, &mut offsets);
                ready += 1;
            }
        }
        (offsets, lagged, ready)
    }

    #[tokio::test]
    async fn a_burst_read_without_waiting_keeps_order_through_replay_live_and_lag() {
        // Replay (batches of 7) into live: `try_next` hands out what was read back and what
        // is already received, and leaves reads from the log to `next`.
        let f = fixture(16);
        f.append(0, 40).await;
        let mut sub = f.hub.subscribe(&f.route, Some(3)).await.unwrap();
        assert!(
            sub.try_next().is_none(),
            "nothing read back yet: a read is due"
        );
        let (offsets, lagged, ready) = read_in_bursts(&mut sub, 38).await;
        assert_eq!(offsets, (3..=40).collect::<Vec<u64>>());
        assert!(!lagged);
        assert!(
            ready >= 30,
            "read-back messages were handed out without waiting: {ready}"
        );
        // Once it waits at the end of the log, live messages that queue up while it is not
        // reading are taken without waiting.
        let ((offsets, _, _), ()) =
            tokio::join!(read_in_bursts(&mut sub, 1), f.append_later(40, 1));
        assert_eq!(offsets, vec![41]);
        f.append(41, 9).await;
        let mut ready = Vec::new();
        while let Some(SubscriptionEvent::Message { message, live }) = sub.try_next() {
            assert!(live);
            ready.push(message.offset);
        }
        assert_eq!(ready, (42..=50).collect::<Vec<u64>>());
        // More than the live buffer holds: `try_next` reports the lag, `next` reads the gap
        // back from the log, and no offset is lost or repeated.
        f.append(50, 100).await;
        let (offsets, lagged, _) = read_in_bursts(&mut sub, 100).await;
        assert!(lagged, "the lag was reported");
        assert_eq!(offsets, (51..=150).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn without_a_start_offset_it_begins_at_the_next_message() {
        let f = fixture(64);
        f.append(0, 5).await;
        let mut sub = f.hub.subscribe(&f.route, None).await.unwrap();
        f.append(5, 2).await;
        let (offsets, _, _) = read(&mut sub, 2).await;
        assert_eq!(offsets, vec![6, 7]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_and_resumes_from_the_log_without_a_gap() {
        // A live buffer of 16 and a reader that does not read while 200 arrive.
        let f = fixture(16);
        let mut sub = f.hub.subscribe(&f.route, None).await.unwrap();
        f.append(0, 200).await;
        let (offsets, _, lagged) = read(&mut sub, 200).await;
        assert!(lagged, "the lag was reported");
        assert_eq!(offsets, (1..=200).collect::<Vec<u64>>());
        // And it is live again once it waits at the end of the log.
        let ((offsets, live, _), ()) = tokio::join!(read(&mut sub, 1), f.append_later(200, 1));
        assert_eq!((offsets, live), (vec![201], vec![true]));
    }

    #[tokio::test]
    async fn a_reader_behind_retention_is_told_what_it_missed_then_reads_the_oldest_kept() {
        let mut retention = crate::store::RetentionPolicy::unlimited();
        retention.default.max_messages = Some(50);
        let f = fixture_with(
            64,
            StoreConfig {
                chunk_bytes: 256,
                retention,
                ..StoreConfig::default()
            },
        );
        // In rounds: a chunk holds at most one group commit's appends.
        for round in 0..20 {
            f.append(round * 10, 10).await;
        }
        f.hub.store().trim();
        // The trim runs on the writer before the next append.
        f.append(200, 1).await;
        let kept_from = f.hub.store().log_stats(&f.route.log).expired_before;
        assert!(kept_from > 100, "retention removed the oldest: {kept_from}");
        let mut sub = f.hub.subscribe(&f.route, Some(1)).await.unwrap();
        let event = sub.next().await.unwrap().unwrap();
        match event {
            SubscriptionEvent::Expired {
                missed,
                resume_from,
            } => assert_eq!((missed, resume_from), (kept_from - 1, kept_from)),
            _ => panic!("the gap comes first"),
        }
        let (offsets, _, _) = read(&mut sub, (202 - kept_from) as usize).await;
        assert_eq!(offsets, (kept_from..=201).collect::<Vec<u64>>());
    }
}
