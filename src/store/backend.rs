//! The boundary between the gateway and whatever keeps its logs.
//!
//! Everything above the store (hub, lanes, subscriptions, calls, the API) holds a [`super::Store`],
//! which forwards to one [`LogBackend`]. Today that is sled on the local disk
//! ([`super::SledLog`]); a cluster-wide backend (logs as Kafka topics, as Zilla keeps them) is
//! another implementation of this trait and nothing above it changes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::{Error, LogHealth, LogId, LogStats, PendingAppend};
use crate::routing::envelope::{Delivered, Envelope};

/// A boxed future, so the trait stays object-safe (the store holds a `dyn LogBackend`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A state namespace's keys and values, in key order.
pub type StateEntries = Vec<(String, Vec<u8>)>;

/// One message to append.
pub struct AppendRequest {
    pub log: LogId,
    pub envelope: Envelope,
    /// Set for the dead-letter logs: why the message landed there.
    pub dead_letter_reason: Option<String>,
    /// Where live subscribers listen: the backend sends the message there once it has its
    /// offset, before it is durable, so live fan-out never waits for durability.
    pub live: Option<broadcast::Sender<Arc<Delivered>>>,
}

/// What keeps the message logs (each channel's messages, dead letters and calls) and the small
/// durable state beside them (cursors, subscription definitions).
///
/// The contract every backend keeps, and the rest of the gateway relies on:
/// - **Offsets** are per log, start at 1, strictly increase and are never reused, also across
///   a crash: an offset a subscriber was shown names that message on every later read. A backend
///   shared by several gateway instances must give offsets that mean the same on all of them
///   (a Kafka partition's offsets do; per-instance counters do not).
/// - **Appends** complete ([`PendingAppend::flushed`]) only once the message is durable: the
///   upstream's acknowledgement waits for that, so nothing acknowledged is lost.
/// - **Reads** return messages in offset order from `from` (inclusive), skipping offsets that are
///   gone (retention, removal); [`LogStats::expired_before`] says where retention has reached.
/// - **Stats and health** answer from memory: they are called on hot paths and by probes.
pub trait LogBackend: Send + Sync + 'static {
    /// Queues an append; waits only while the backend's queue is full (backpressure).
    fn append(&self, request: AppendRequest) -> BoxFuture<'_, Result<PendingAppend, Error>>;

    /// At most `limit` messages of `log` from offset `from` (inclusive).
    fn read(
        &self,
        log: &LogId,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Arc<Delivered>>, Error>>;

    /// First and last offset, count and size of a log.
    fn log_stats(&self, log: &LogId) -> LogStats;

    /// Every log's stats.
    fn all_stats(&self) -> Vec<(LogId, LogStats)>;

    /// Whether the backend accepts appends right now, and why not.
    fn health(&self) -> LogHealth;

    /// Bytes the backend takes on this machine's disk.
    fn size_on_disk(&self) -> BoxFuture<'static, u64>;

    /// Applies retention now (the daemon calls it periodically).
    fn trim(&self);

    /// Removes single offsets (dead letters that were replayed); how many were there.
    fn remove_offsets(&self, log: &LogId, offsets: Vec<u64>) -> BoxFuture<'_, Result<u64, Error>>;

    /// Empties a log; its offsets continue where they were. How many records were removed.
    fn purge(&self, log: &LogId) -> BoxFuture<'_, Result<u64, Error>>;

    /// The state value under `key` in `namespace`.
    fn state_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> BoxFuture<'static, Result<Option<Vec<u8>>, Error>>;

    /// Stores a state value; durable when the future completes.
    fn state_put(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), Error>>;

    /// Removes a state value; whether it was there. Durable when the future completes.
    fn state_remove(&self, namespace: &str, key: &str) -> BoxFuture<'static, Result<bool, Error>>;

    /// Every key and value of `namespace`, in key order.
    fn state_list(&self, namespace: &str) -> BoxFuture<'static, Result<StateEntries, Error>>;

    /// Writes (`Some(next)`) or removes (`None`) a reader's cursor in `namespace`, in the order
    /// of the appends: a later call never lands before an earlier one. `durable`: the future
    /// completes once the cursor is on disk; else at once, the cursor riding the next flush
    /// (a crash may lose it, and the reader repeats what it did since the last durable one).
    fn put_cursor(
        &self,
        namespace: &str,
        key: &str,
        next: Option<u64>,
        durable: bool,
    ) -> BoxFuture<'static, Result<(), Error>>;

    /// Makes what was queued durable and stops; appends after this fail with [`Error::Closed`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
