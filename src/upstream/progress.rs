//! Intake progress of one upstream connection, and the rule that calls it stalled.
//!
//! A connector that is connected but no longer moves its upstream's messages into the log must
//! not look healthy: the broker keeps its backlog, then drops the session, while `/readyz` says
//! all is well. Each connector counts what it received and what it settled (acknowledged
//! upstream, or handed back for redelivery), and an event-loop connector marks when its loop
//! is busy outside its poll. The daemon's stall detector applies [`stall`] to these figures
//! every second; the rule is plain data in, plain data out, so it is tested without a broker.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Milliseconds since this process first asked, never 0 (0 means "never" below).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Counters a connector updates as messages move; shared with the stall detector.
#[derive(Debug, Default)]
pub struct IntakeProgress {
    received: AtomicU64,
    settled: AtomicU64,
    last_received_ms: AtomicU64,
    /// The last time a message was settled, or the time the pipeline went from empty to busy.
    last_progress_ms: AtomicU64,
    /// When the event loop left its poll to handle an event; 0 while it waits in the poll.
    busy_since_ms: AtomicU64,
}

impl IntakeProgress {
    /// A message arrived that must be acknowledged upstream.
    pub fn received(&self) {
        let now = now_ms();
        let before = self.received.fetch_add(1, Ordering::AcqRel);
        self.last_received_ms.store(now, Ordering::Release);
        if before == self.settled.load(Ordering::Acquire) {
            // Nothing was outstanding: the clock for "no progress" starts now, not at the last
            // acknowledgement, which may be hours old on a quiet channel.
            self.last_progress_ms.store(now, Ordering::Release);
        }
    }

    /// `n` messages' fate is decided: acknowledged upstream, or left for the broker to
    /// redeliver (a log failure, a connection that went away).
    pub fn settled(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.settled.fetch_add(n, Ordering::AcqRel);
        self.last_progress_ms.store(now_ms(), Ordering::Release);
    }

    /// Everything received so far is settled: a consumer that ends leaves its unstored records
    /// to the next one, which reads them again.
    pub fn settle_all(&self) {
        let received = self.received.load(Ordering::Acquire);
        let settled = self.settled.swap(received, Ordering::AcqRel);
        if received > settled {
            self.last_progress_ms.store(now_ms(), Ordering::Release);
        }
    }

    /// The event loop is back in its poll (it may wait there as long as the broker is quiet).
    pub fn loop_waiting(&self) {
        self.busy_since_ms.store(0, Ordering::Release);
    }

    /// The event loop left its poll to handle what it returned.
    pub fn loop_working(&self) {
        self.busy_since_ms.store(now_ms(), Ordering::Release);
    }

    /// The figures as of now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let now = now_ms();
        let ago = |at: u64| (at != 0).then(|| now.saturating_sub(at));
        let settled = self.settled.load(Ordering::Acquire);
        let received = self.received.load(Ordering::Acquire);
        ProgressSnapshot {
            received_total: received,
            settled_total: settled,
            outstanding: received.saturating_sub(settled),
            last_received_ms_ago: ago(self.last_received_ms.load(Ordering::Acquire)),
            last_progress_ms_ago: ago(self.last_progress_ms.load(Ordering::Acquire)),
            event_loop_busy_ms: ago(self.busy_since_ms.load(Ordering::Acquire)),
        }
    }
}

/// What `/api/v1/connections` shows of a connection's intake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    /// Messages received that needed an acknowledgement upstream.
    pub received_total: u64,
    /// Of those, acknowledged upstream or left for redelivery.
    pub settled_total: u64,
    /// Received and not yet settled: the messages the gateway holds for the broker.
    pub outstanding: u64,
    pub last_received_ms_ago: Option<u64>,
    /// Since the last acknowledgement (or since work arrived after a quiet spell).
    pub last_progress_ms_ago: Option<u64>,
    /// How long the event loop has been away from its poll (none: it is polling).
    pub event_loop_busy_ms: Option<u64>,
}

/// Why a connection counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StallReason {
    /// Messages are outstanding and none was acknowledged for the stall timeout.
    NoAcknowledgement,
    /// The event loop has not returned to its poll for the stall timeout: nothing is read or
    /// written on the connection, keep-alives included.
    EventLoopBlocked,
}

impl StallReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StallReason::NoAcknowledgement => "no_acknowledgement",
            StallReason::EventLoopBlocked => "event_loop_blocked",
        }
    }
}

/// The stall rule: a connected upstream is stalled when its event loop stays away from its poll,
/// or when it holds messages and has settled none, for longer than `after`.
pub fn stall(progress: &ProgressSnapshot, after: Duration) -> Option<StallReason> {
    let after = after.as_millis() as u64;
    if progress.event_loop_busy_ms.is_some_and(|busy| busy > after) {
        return Some(StallReason::EventLoopBlocked);
    }
    if progress.outstanding > 0 && progress.last_progress_ms_ago.is_some_and(|ago| ago > after) {
        return Some(StallReason::NoAcknowledgement);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(outstanding: u64, progress_ago: u64, busy: Option<u64>) -> ProgressSnapshot {
        ProgressSnapshot {
            outstanding,
            last_progress_ms_ago: Some(progress_ago),
            event_loop_busy_ms: busy,
            ..ProgressSnapshot::default()
        }
    }

    #[test]
    fn the_stall_rule() {
        let after = Duration::from_secs(5);
        let cases = [
            // (outstanding, ms since progress, loop busy ms, expected)
            (0, 60_000, None, None),
            (10, 1_000, None, None),
            (10, 5_000, None, None),
            (10, 5_001, None, Some(StallReason::NoAcknowledgement)),
            (0, 0, Some(4_000), None),
            (0, 0, Some(6_000), Some(StallReason::EventLoopBlocked)),
            (10, 60_000, Some(6_000), Some(StallReason::EventLoopBlocked)),
        ];
        for (outstanding, ago, busy, expected) in cases {
            assert_eq!(
                stall(&snapshot(outstanding, ago, busy), after),
                expected,
                "outstanding {outstanding}, progress {ago} ms ago, busy {busy:?}"
            );
        }
    }

    #[test]
    fn work_after_a_quiet_spell_starts_the_clock_afresh() {
        let p = IntakeProgress::default();
        p.received();
        p.settled(1);
        std::thread::sleep(Duration::from_millis(30));
        p.received();
        let s = p.snapshot();
        assert_eq!(
            (s.received_total, s.settled_total, s.outstanding),
            (2, 1, 1)
        );
        assert!(s.last_progress_ms_ago.unwrap() < 30, "{s:?}");
        assert_eq!(stall(&s, Duration::from_millis(20)), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            stall(&p.snapshot(), Duration::from_millis(20)),
            Some(StallReason::NoAcknowledgement)
        );
        p.settled(1);
        assert_eq!(stall(&p.snapshot(), Duration::from_millis(20)), None);
    }

    #[test]
    fn a_loop_waiting_in_its_poll_is_not_busy() {
        let p = IntakeProgress::default();
        p.loop_working();
        assert!(p.snapshot().event_loop_busy_ms.is_some());
        p.loop_waiting();
        assert_eq!(p.snapshot().event_loop_busy_ms, None);
    }
}
