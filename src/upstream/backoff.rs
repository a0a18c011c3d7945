//! Capped, jittered backoff for every client that retries.

use std::time::Duration;

/// Capped exponential backoff with full jitter (each wait is random in `[0, cap]`, the cap
/// doubling from `initial` to `max`), reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The upper bound of the next wait (before jitter).
    pub fn next_cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(16)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next wait: uniformly random up to the current cap, at least a millisecond.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.next_cap();
        self.attempt = self.attempt.saturating_add(1);
        let millis = cap.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(1..=millis))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let caps: Vec<u64> = (0..7)
            .map(|_| {
                let cap = b.next_cap().as_millis() as u64;
                let delay = b.next_delay();
                assert!(delay <= Duration::from_millis(cap) && delay >= Duration::from_millis(1));
                cap
            })
            .collect();
        assert_eq!(caps, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_cap(), Duration::from_millis(100));
    }
}
