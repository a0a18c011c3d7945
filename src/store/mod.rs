//! The message log and its durable state, in sled. Every sled call lives in this module.
//!
//! Each channel has a message log, a dead-letter log and a call log; offsets are `u64`, monotonic
//! per log and continuing after a restart. A log is a run of chunks (`chunk`, `layout`), found
//! through an in-memory index (`index`), and bounded by retention (`retention`). Appends go
//! through one writer thread (a dedicated OS thread, never a runtime worker) that commits in
//! groups: it takes every append waiting (up to `max_batch`), writes them as one chunk per log,
//! hands them to live subscribers, and completes them once the flush that follows made them
//! durable (`writer`, `log`). So a message is acknowledged upstream only once it is on disk, and
//! an fsync is shared by every message that arrived while the previous one ran. Reads run on
//! `spawn_blocking`.
//!
//! sled stops working for good after an I/O error (a full disk, say): every later call returns
//! the same error. So the writer then closes the database, fails appends as
//! [`Error::Unavailable`] (upstreams keep the messages and redeliver them), and reopens it with a
//! backoff until it works again; [`SledLog::health`] tells readiness probes meanwhile.

mod backend;
mod chunk;
mod index;
mod layout;
mod log;
mod record;
mod retention;
mod state;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::routing::ChannelId;
use crate::routing::envelope::{Delivered, Envelope};

pub use backend::{AppendRequest, BoxFuture, LogBackend, StateEntries};
use index::LogIndex;
pub use record::CorruptRecord;
pub use retention::{Limit, Retention, RetentionPolicy, RetentionSetting};

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("cannot open the data directory {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("log {log}: {reason}")]
    Io { log: String, reason: String },
    #[error("log {log} offset {offset}: {source}")]
    Corrupt {
        log: String,
        offset: u64,
        source: CorruptRecord,
    },
    #[error("the store is shut down")]
    Closed,
    /// The database is being reopened after an I/O failure; retry later.
    #[error("the message log is unavailable: {reason}")]
    Unavailable { reason: String },
}

/// Which log of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    Messages,
    DeadLetters,
    /// Calls of a request-reply operation (request, status, latency, error).
    Calls,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Messages => "messages",
            LogKind::DeadLetters => "dead_letters",
            LogKind::Calls => "calls",
        }
    }
}

/// A channel's message log or dead-letter log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogId {
    pub channel: ChannelId,
    pub kind: LogKind,
}

impl LogId {
    pub fn messages(channel: ChannelId) -> Self {
        Self {
            channel,
            kind: LogKind::Messages,
        }
    }

    pub fn dead_letters(channel: ChannelId) -> Self {
        Self {
            channel,
            kind: LogKind::DeadLetters,
        }
    }

    pub fn calls(channel: ChannelId) -> Self {
        Self {
            channel,
            kind: LogKind::Calls,
        }
    }
}

impl std::fmt::Display for LogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.channel, self.kind.as_str())
    }
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Appends committed by one flush at most.
    pub max_batch: usize,
    /// Longest an append waits for its flush when appends keep arriving.
    pub max_flush_delay: Duration,
    /// Capacity of the append queue (appenders wait when it is full).
    pub queue_capacity: usize,
    pub retention: RetentionPolicy,
    /// How often retention runs.
    pub trim_interval: Duration,
    /// sled's page cache. Its default (1 GiB) would let the daemon grow to that; the log is
    /// written sequentially and read mostly at its tail, so a small cache serves it.
    pub cache_bytes: u64,
    /// A log's recent records are sealed into one compressed chunk once they add up to this.
    pub chunk_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_flush_delay: Duration::from_millis(5),
            queue_capacity: 8192,
            retention: RetentionPolicy::default(),
            trim_interval: Duration::from_secs(5),
            cache_bytes: 8 * 1024 * 1024,
            chunk_bytes: chunk::SEAL_RAW_BYTES,
        }
    }
}

/// The outcome of an append, available once the message is flushed.
pub struct PendingAppend(oneshot::Receiver<Result<u64, Error>>);

impl PendingAppend {
    /// For backends: the append completes when `done` is sent its offset (or the failure).
    pub fn new(done: oneshot::Receiver<Result<u64, Error>>) -> Self {
        PendingAppend(done)
    }

    /// Waits for the flush; the offset of the message in its log.
    pub async fn flushed(self) -> Result<u64, Error> {
        self.0.await.unwrap_or(Err(Error::Closed))
    }
}

/// Position and size of one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    pub first_offset: Option<u64>,
    pub last_offset: Option<u64>,
    pub messages: u64,
    /// What its chunks take on disk (compressed, before sled's own overhead).
    pub bytes: u64,
    /// Offsets below this were removed by retention: a reader behind it missed them.
    pub expired_before: u64,
}

/// Where a durable reader (a bridge lane, a subscription) stands against its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderPosition {
    /// Messages at or after its cursor that it has yet to read.
    pub lag: u64,
    /// Offsets retention removed before it read them (it skips them when it next reads).
    pub expired: u64,
}

impl ReaderPosition {
    pub fn of(cursor: u64, stats: &LogStats) -> Self {
        let expired = stats.expired_before.saturating_sub(cursor);
        let lag = stats.last_offset.map_or(0, |last| {
            (last + 1).saturating_sub(cursor.max(stats.expired_before))
        });
        ReaderPosition { lag, expired }
    }
}

impl Default for LogStats {
    fn default() -> Self {
        LogIndex::new(1).stats()
    }
}

/// Whether the log accepts appends, for readiness probes and `/api/v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogHealth {
    pub ok: bool,
    /// The I/O failure that took the log down, while it is down.
    pub error: Option<String>,
    /// Times the log failed and was reopened since the start.
    pub failures: u64,
}

/// State the writer thread shares with readers.
struct Shared {
    /// `None` while the writer reopens the database after a failure.
    db: RwLock<Option<sled::Db>>,
    health: Mutex<LogHealth>,
    /// Every log's chunks; written by the writer thread only.
    indexes: RwLock<HashMap<LogId, LogIndex>>,
}

impl Shared {
    fn replace_indexes(&self, indexes: HashMap<LogId, LogIndex>) {
        if let Ok(mut slot) = self.indexes.write() {
            *slot = indexes;
        }
    }

    fn with_index<T>(&self, log: &LogId, f: impl FnOnce(Option<&LogIndex>) -> T) -> T {
        match self.indexes.read() {
            Ok(indexes) => f(indexes.get(log)),
            Err(_) => f(None),
        }
    }

    fn update_index(&self, log: &LogId, f: impl FnOnce(&mut LogIndex)) {
        if let Ok(mut indexes) = self.indexes.write() {
            f(indexes
                .entry(log.clone())
                .or_insert_with(|| LogIndex::new(1)));
        }
    }

    fn for_each_index(&self, mut f: impl FnMut(&LogId, &LogIndex)) {
        if let Ok(indexes) = self.indexes.read() {
            for (log, index) in indexes.iter() {
                f(log, index);
            }
        }
    }

    fn logs_with(&self, pred: impl Fn(&LogIndex) -> bool) -> Vec<LogId> {
        let mut out = Vec::new();
        self.for_each_index(|log, index| {
            if pred(index) {
                out.push(log.clone());
            }
        });
        out
    }

    fn set_db(&self, db: Option<sled::Db>) {
        if let Ok(mut slot) = self.db.write() {
            *slot = db;
        }
    }

    fn set_health(&self, update: impl FnOnce(&mut LogHealth)) {
        if let Ok(mut h) = self.health.lock() {
            update(&mut h);
            metrics::gauge!(crate::telemetry::LOG_AVAILABLE).set(if h.ok { 1.0 } else { 0.0 });
        }
    }
}

/// The log backend on this machine's disk, in sled.
pub struct SledLog {
    shared: Arc<Shared>,
    commands: mpsc::Sender<writer::Command>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// How often sled's own flusher runs (and reclaims segments, spending up to half of that).
const SLED_FLUSHER_EVERY_MS: u64 = 500;

/// sled's segment size. A page (a B-tree node: up to 17 chunks of at most `SEAL_RAW_BYTES`
/// each, ~560 KiB when the payloads do not compress) larger than a quarter of a segment is
/// written as a file of its own and lingers until the segment pointing at it is cleaned; sled's
/// default (512 KiB) made every leaf of sealed chunks such a file. 4 MiB keeps them inside
/// segments, which the cleaner reclaims. Not larger: sled holds the segment being written as
/// one buffer of this size, so it is resident memory (`log_growth` at 10k msg/s: RSS settled near
/// 50 MiB with 4 MiB segments, 57–60 MiB with 8 MiB).
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// The segment size a data directory was created with (sled refuses to open it with another).
fn persisted_segment_size(dir: &Path) -> Option<usize> {
    // Text lines, then a binary CRC.
    let conf = std::fs::read(dir.join("conf")).ok()?;
    String::from_utf8_lossy(&conf)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse().ok())
}

/// How long an open waits for a lock held by a handle being closed.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens sled in `dir` and finds where offsets resume.
fn open_db(dir: &Path, config: &StoreConfig) -> Result<(sled::Db, writer::Resume), Error> {
    let open_error = |e: sled::Error| Error::Open {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let sled_config = sled::Config::new()
        .path(dir)
        // Durability comes from the writer's explicit group flushes. sled's periodic flusher is
        // kept all the same: it is the only caller of sled's segment cleaner, so without it the
        // space of removed chunks is never reused and the data directory grows for good.
        .flush_every_ms(Some(SLED_FLUSHER_EVERY_MS))
        .segment_size(persisted_segment_size(dir).unwrap_or(SEGMENT_BYTES))
        .cache_capacity(config.cache_bytes);
    // A handle this process just closed (a reopen after a failure) can keep the file lock while
    // sled's I/O threads finish with it: wait for it a little, as sled's own tests do.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let db = loop {
        match sled_config.open() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => break other.map_err(open_error)?,
        }
    };
    // Live subscribers see a message before its group is flushed (so the flush does not
    // delay them). After a crash those messages are gone, the upstream redelivers them, and
    // they would be logged again at the same offsets: a client that saw offset N would then
    // resume after a different message N. So an unclean stop moves every log's next offset
    // past anything the lost batch can have shown: one batch at most.
    let meta = db.open_tree("meta").map_err(open_error)?;
    let was_clean = meta
        .remove(writer::CLEAN_STOP_KEY)
        .map_err(open_error)?
        .is_some();
    let is_new = db
        .tree_names()
        .iter()
        .all(|n| n.as_ref() == b"meta" || n.as_ref() == b"__sled__default");
    db.flush().map_err(open_error)?;
    let resume = writer::Resume {
        offset_gap: if was_clean || is_new {
            0
        } else {
            config.max_batch as u64 * writer::UNFLUSHED_GAP_BATCHES
        },
    };
    Ok((db, resume))
}

impl SledLog {
    /// Opens (or creates) the store in `dir` and starts the writer thread.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<SledLog, Error> {
        let (db, resume) = open_db(dir, &config)?;
        if resume.offset_gap > 0 {
            tracing::warn!(
                gap = resume.offset_gap,
                "the previous run did not stop cleanly; offsets continue after a gap so none is reused"
            );
        }
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db.clone())),
            health: Mutex::new(LogHealth::default()),
            indexes: RwLock::new(HashMap::new()),
        });
        let logs =
            log::Logs::load(db, shared.clone(), resume, config.chunk_bytes).map_err(|e| {
                Error::Open {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        shared.set_health(|h| h.ok = true);
        let (commands, rx) = mpsc::channel(config.queue_capacity);
        let writer = writer::Writer {
            shared: shared.clone(),
            dir: dir.to_path_buf(),
            config,
        };
        let handle = std::thread::Builder::new()
            .name("stepflow-log-writer".into())
            .spawn(move || writer.run(logs, rx))
            .map_err(|e| Error::Open {
                path: dir.to_path_buf(),
                reason: format!("cannot start the log writer: {e}"),
            })?;
        Ok(SledLog {
            shared,
            commands,
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// Whether the log accepts appends right now.
    pub fn health(&self) -> LogHealth {
        self.shared
            .health
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    fn db(&self) -> Result<sled::Db, Error> {
        match self.shared.db.read().ok().and_then(|db| db.clone()) {
            Some(db) => Ok(db),
            None => Err(Error::Unavailable {
                reason: self
                    .health()
                    .error
                    .unwrap_or_else(|| "reopening after a failure".into()),
            }),
        }
    }

    /// Queues an append (see [`Store::append`]): live subscribers get it once it has its
    /// offset, before the flush, so they are not delayed by it.
    pub async fn append(&self, request: AppendRequest) -> Result<PendingAppend, Error> {
        let AppendRequest {
            log,
            envelope,
            dead_letter_reason,
            live,
        } = request;
        let (done, rx) = oneshot::channel();
        self.commands
            .send(writer::Command::Append(writer::Append {
                log,
                envelope,
                dead_letter_reason,
                live,
                done,
            }))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(PendingAppend(rx))
    }

    /// First and last offset, count and size of a log (from memory: no disk read).
    pub fn log_stats(&self, log: &LogId) -> LogStats {
        self.shared
            .with_index(log, |i| i.map(LogIndex::stats))
            .unwrap_or_default()
    }

    /// Every log's stats (for `/api/v1/stats` and the metrics).
    pub fn all_stats(&self) -> Vec<(LogId, LogStats)> {
        let mut out = Vec::new();
        self.shared
            .for_each_index(|log, index| out.push((log.clone(), index.stats())));
        out
    }

    /// Asks the writer to apply retention (it also does after busy batches); call periodically.
    pub fn trim(&self) {
        // A full queue means the writer is busy and will trim after its batch anyway.
        let _ = self.commands.try_send(writer::Command::Trim);
    }

    /// Flushes what is queued and stops the writer. Appends after this fail with `Closed`.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self
            .commands
            .send(writer::Command::Shutdown(done))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Log maintenance: removing what was replayed or is no longer wanted. Both run on the writer
/// thread, after the appends queued before them, and are flushed before they answer.
impl SledLog {
    /// Removes the given offsets from a log (dead letters that were replayed); how many were there.
    pub async fn remove_offsets(&self, log: &LogId, offsets: Vec<u64>) -> Result<u64, Error> {
        let (done, rx) = oneshot::channel();
        let log = log.clone();
        self.maintain(writer::Command::Remove { log, offsets, done }, rx)
            .await
    }

    /// Empties a log; offsets continue where they were. How many records were removed.
    pub async fn purge(&self, log: &LogId) -> Result<u64, Error> {
        let (done, rx) = oneshot::channel();
        let log = log.clone();
        self.maintain(writer::Command::Purge { log, done }, rx)
            .await
    }

    async fn maintain(
        &self,
        command: writer::Command,
        rx: oneshot::Receiver<Result<u64, Error>>,
    ) -> Result<u64, Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }
}

impl LogBackend for SledLog {
    fn append(&self, request: AppendRequest) -> BoxFuture<'_, Result<PendingAppend, Error>> {
        Box::pin(SledLog::append(self, request))
    }

    fn read(
        &self,
        log: &LogId,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Arc<Delivered>>, Error>> {
        let db = self.db();
        let (shared, log) = (self.shared.clone(), log.clone());
        Box::pin(async move {
            let db = db?;
            tokio::task::spawn_blocking(move || read_blocking(&db, &shared, &log, from, limit))
                .await
                .map_err(|e| Error::Io {
                    log: String::new(),
                    reason: format!("read task failed: {e}"),
                })?
        })
    }

    fn log_stats(&self, log: &LogId) -> LogStats {
        SledLog::log_stats(self, log)
    }

    fn all_stats(&self) -> Vec<(LogId, LogStats)> {
        SledLog::all_stats(self)
    }

    fn health(&self) -> LogHealth {
        SledLog::health(self)
    }

    fn size_on_disk(&self) -> BoxFuture<'static, u64> {
        let db = self.db();
        Box::pin(async move {
            let Ok(db) = db else { return 0 };
            tokio::task::spawn_blocking(move || db.size_on_disk().unwrap_or(0))
                .await
                .unwrap_or(0)
        })
    }

    fn trim(&self) {
        SledLog::trim(self)
    }

    fn remove_offsets(&self, log: &LogId, offsets: Vec<u64>) -> BoxFuture<'_, Result<u64, Error>> {
        let log = log.clone();
        Box::pin(async move { SledLog::remove_offsets(self, &log, offsets).await })
    }

    fn purge(&self, log: &LogId) -> BoxFuture<'_, Result<u64, Error>> {
        let log = log.clone();
        Box::pin(async move { SledLog::purge(self, &log).await })
    }

    fn state_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> BoxFuture<'static, Result<Option<Vec<u8>>, Error>> {
        Box::pin(self.state_get_owned(namespace, key))
    }

    fn state_put(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.state_put_owned(namespace, key, value))
    }

    fn state_remove(&self, namespace: &str, key: &str) -> BoxFuture<'static, Result<bool, Error>> {
        Box::pin(self.state_remove_owned(namespace, key))
    }

    fn state_list(&self, namespace: &str) -> BoxFuture<'static, Result<StateEntries, Error>> {
        Box::pin(self.state_list_owned(namespace))
    }

    fn put_cursor(
        &self,
        namespace: &str,
        key: &str,
        next: Option<u64>,
        durable: bool,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.put_cursor_owned(namespace, key, next, durable))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(SledLog::shutdown(self))
    }
}

/// Handle to the store; cheap to clone. Everything above the store holds one of these; what
/// keeps the logs is behind it ([`LogBackend`]).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn LogBackend>,
}

impl Store {
    /// Opens (or creates) the sled store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Store, Error> {
        Ok(Store::with_backend(Arc::new(SledLog::open(dir, config)?)))
    }

    /// A store over another backend.
    pub fn with_backend(backend: Arc<dyn LogBackend>) -> Store {
        Store { backend }
    }

    /// Whether the log accepts appends right now.
    pub fn health(&self) -> LogHealth {
        self.backend.health()
    }

    /// Resolves once the log accepts appends (at once when it does).
    pub async fn available(&self) {
        while !self.health().ok {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Queues an append. Waits only while the queue is full (backpressure); the returned handle
    /// completes once the message is durable. If `live` is given, the message is sent there as
    /// soon as it has its offset, before it is durable, so live subscribers are not delayed.
    pub async fn append(
        &self,
        log: LogId,
        envelope: Envelope,
        dead_letter_reason: Option<String>,
        live: Option<broadcast::Sender<Arc<Delivered>>>,
    ) -> Result<PendingAppend, Error> {
        self.backend
            .append(AppendRequest {
                log,
                envelope,
                dead_letter_reason,
                live,
            })
            .await
    }

    /// Messages of `log` from offset `from` (inclusive), at most `limit`.
    pub async fn read(
        &self,
        log: &LogId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Delivered>>, Error> {
        self.backend.read(log, from, limit).await
    }

    /// First and last offset, count and size of a log (from memory: no disk read).
    pub fn log_stats(&self, log: &LogId) -> LogStats {
        self.backend.log_stats(log)
    }

    /// Every log's stats (for `/api/v1/stats` and the metrics).
    pub fn all_stats(&self) -> Vec<(LogId, LogStats)> {
        self.backend.all_stats()
    }

    /// Bytes the store takes on disk.
    pub async fn size_on_disk(&self) -> u64 {
        self.backend.size_on_disk().await
    }

    /// Asks for retention to be applied; call periodically.
    pub fn trim(&self) {
        self.backend.trim()
    }

    /// Makes what is queued durable and stops. Appends after this fail with `Closed`.
    pub async fn shutdown(&self) {
        self.backend.shutdown().await
    }

    /// Removes the given offsets from a log (dead letters that were replayed); how many were there.
    pub async fn remove_offsets(&self, log: &LogId, offsets: Vec<u64>) -> Result<u64, Error> {
        self.backend.remove_offsets(log, offsets).await
    }

    /// Empties a log; offsets continue where they were. How many records were removed.
    pub async fn purge(&self, log: &LogId) -> Result<u64, Error> {
        self.backend.purge(log).await
    }

    /// The state value under `key` in `namespace`.
    pub async fn state_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.backend.state_get(namespace, key).await
    }

    /// Stores `value` under `key`; durable when this returns.
    pub async fn state_put(&self, namespace: &str, key: &str, value: Vec<u8>) -> Result<(), Error> {
        self.backend.state_put(namespace, key, value).await
    }

    /// Removes `key`; whether it was there. Durable when this returns.
    pub async fn state_remove(&self, namespace: &str, key: &str) -> Result<bool, Error> {
        self.backend.state_remove(namespace, key).await
    }

    /// Every key and value of `namespace`, in key order.
    pub async fn state_list(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.backend.state_list(namespace).await
    }
}

/// Runs sled work on the blocking pool, mapping its errors to the log it concerns.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, sled::Error> + Send + 'static,
) -> Result<T, Error> {
    let what = what.to_owned();
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| Error::Io {
            log: what,
            reason: e.to_string(),
        }),
        Err(e) => Err(Error::Io {
            log: what,
            reason: format!("store task failed: {e}"),
        }),
    }
}

fn io_error(log: &LogId, e: sled::Error) -> Error {
    Error::Io {
        log: log.to_string(),
        reason: e.to_string(),
    }
}

/// How often a read plans again when the writer moved a chunk under it (a seal, retention).
const READ_ATTEMPTS: usize = 8;

fn read_blocking(
    db: &sled::Db,
    shared: &Shared,
    log: &LogId,
    from: u64,
    limit: usize,
) -> Result<Vec<Arc<Delivered>>, Error> {
    let trees = layout::LogTrees::open(db, log).map_err(|e| io_error(log, e))?;
    'plan: for _ in 0..READ_ATTEMPTS {
        let plan = shared.with_index(log, |i| i.map(|i| i.plan(from, limit)).unwrap_or_default());
        let mut out = Vec::with_capacity(limit.min(4096));
        for info in plan {
            let value = trees
                .of(&info)
                .get(info.first.to_be_bytes())
                .map_err(|e| io_error(log, e))?;
            // Sealed into another chunk, or removed by retention, since the plan.
            let Some(value) = value else { continue 'plan };
            let corrupt = |offset, source| Error::Corrupt {
                log: log.to_string(),
                offset,
                source,
            };
            for record in chunk::records(info.first, &value).map_err(|e| corrupt(info.first, e))? {
                let (offset, record) = record.map_err(|e| corrupt(info.first, e))?;
                if offset < from {
                    continue;
                }
                let delivered =
                    record::decode(&log.channel, offset, record).map_err(|e| corrupt(offset, e))?;
                out.push(Arc::new(delivered));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        return Ok(out);
    }
    Err(Error::Io {
        log: log.to_string(),
        reason: "the log kept changing under the read; retry".into(),
    })
}

fn offset_of(key: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = key.len().min(8);
    a[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(a)
}

/// Decodes `data` as a log record and as a chunk header, as reading the log does; for
/// [`crate::fuzzing`]. A corrupt record is an error, never a panic.
#[doc(hidden)]
pub fn decode_for_fuzzing(data: &[u8]) {
    let channel: crate::routing::ChannelId = "fuzz.channel".into();
    let _ = record::decode(&channel, 0, bytes::Bytes::copy_from_slice(data));
    let _ = chunk::ChunkInfo::decode(0, data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::address::Params;
    use crate::routing::envelope::{Origin, Transport};
    use bytes::Bytes;

    fn envelope() -> Envelope {
        Envelope::new(
            "c".into(),
            "a".into(),
            Params::default(),
            Bytes::from_static(b"{}"),
            Origin::client(Transport::Http, 0),
        )
    }

    async fn append_one(store: &Store) -> u64 {
        store
            .append(LogId::messages("c".into()), envelope(), None, None)
            .await
            .unwrap()
            .flushed()
            .await
            .unwrap()
    }

    fn config() -> StoreConfig {
        StoreConfig {
            max_batch: 10,
            ..StoreConfig::default()
        }
    }

    #[tokio::test]
    async fn offsets_continue_after_a_clean_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(append_one(&store).await, 1);
        assert_eq!(append_one(&store).await, 2);
        store.shutdown().await;
        drop(store);
        let store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(append_one(&store).await, 3);
        let read = store
            .read(&LogId::messages("c".into()), 1, 10)
            .await
            .unwrap();
        assert_eq!(
            read.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        store.shutdown().await;
    }

    #[tokio::test]
    async fn offsets_skip_one_batch_after_an_unclean_stop() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A previous process that wrote offset 5 and died before recording a clean stop.
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("m:c").unwrap();
            tree.insert(5u64.to_be_bytes(), record::encode(&envelope(), None))
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(append_one(&store).await, 16, "5 + 1 + max_batch");
        store.shutdown().await;
    }

    #[tokio::test]
    async fn cursor_writes_land_in_the_order_they_were_made_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        // Notes that do not wait, then a durable write that goes back (a lane that must resend
        // from a dead letter it could not write): the durable one wins, because it is later.
        for next in 2..50 {
            store.advance_cursor("lanes", "a", next).await.unwrap();
        }
        store.set_cursor("lanes", "a", 7).await.unwrap();
        assert_eq!(store.cursor("lanes", "a").await.unwrap(), Some(7));
        // A note is written before the appends queued after it, and flushed with them.
        store.advance_cursor("lanes", "b", 3).await.unwrap();
        append_one(&store).await;
        assert_eq!(store.cursor("lanes", "b").await.unwrap(), Some(3));
        // A removal is not undone by a note queued before it.
        store.advance_cursor("lanes", "b", 4).await.unwrap();
        store.remove_cursor("lanes", "b").await.unwrap();
        assert_eq!(store.cursor("lanes", "b").await.unwrap(), None);
        store.shutdown().await;
        drop(store);
        let store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(store.cursor("lanes", "a").await.unwrap(), Some(7));
        assert_eq!(store.cursor("lanes", "b").await.unwrap(), None);
        store.shutdown().await;
    }

    fn log() -> LogId {
        LogId::messages("c".into())
    }

    /// Appends `n` messages of `size` payload bytes, `batch` at a time (one tail chunk each).
    async fn append_many(store: &Store, n: u64, size: usize, batch: u64) -> Vec<u64> {
        let mut offsets = Vec::new();
        let mut i = 0;
        while i < n {
            let mut pending = Vec::new();
            for _ in 0..batch.min(n - i) {
                let mut e = envelope();
                e.payload = Bytes::from(format!("{i:0size$}"));
                pending.push(store.append(log(), e, None, None).await.unwrap());
                i += 1;
            }
            for p in pending {
                offsets.push(p.flushed().await.unwrap());
            }
        }
        offsets
    }

    async fn offsets_read(store: &Store, from: u64, limit: usize) -> Vec<u64> {
        let read = store.read(&log(), from, limit).await.unwrap();
        read.iter().map(|m| m.offset).collect()
    }

    fn small_chunks(retention: RetentionPolicy) -> StoreConfig {
        StoreConfig {
            chunk_bytes: 4 * 1024,
            retention,
            ..StoreConfig::default()
        }
    }

    #[tokio::test]
    async fn many_messages_take_few_keys_and_read_back_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(
            SledLog::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap(),
        );
        let store = Store::with_backend(sled.clone());
        let offsets = append_many(&store, 2000, 100, 50).await;
        assert_eq!(offsets, (1..=2000).collect::<Vec<_>>());
        let chunks = sled.shared.with_index(&log(), |i| i.unwrap().chunk_count());
        // 2000 × ~135 bytes in chunks of at least 4 KiB: one per commit of 50 here.
        assert!((30..=70).contains(&chunks), "{chunks} chunks");
        for from in [1, 17, 999, 1000, 1001, 1990] {
            let got = offsets_read(&store, from, 25).await;
            let want: Vec<u64> = (from..(from + 25).min(2001)).collect();
            assert_eq!(got, want, "from {from}");
        }
        let read = store.read(&log(), 1234, 1).await.unwrap();
        assert_eq!(
            &read[0].envelope.payload[..],
            format!("{:0100}", 1233).as_bytes()
        );
        let stats = store.log_stats(&log());
        assert_eq!(
            (stats.first_offset, stats.last_offset, stats.messages),
            (Some(1), Some(2000), 2000)
        );
        assert!(
            stats.bytes < 2000 * 100,
            "sealed chunks are compressed: {} bytes",
            stats.bytes
        );
        store.shutdown().await;
        drop((store, sled));
        let store = Store::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap();
        assert_eq!(
            store.log_stats(&log()),
            stats,
            "the index is the same after a restart"
        );
        assert_eq!(
            offsets_read(&store, 1995, 10).await,
            [1995, 1996, 1997, 1998, 1999, 2000]
        );
        assert_eq!(append_one(&store).await, 2001);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn reads_racing_seals_see_every_offset_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move { append_many(&store, 3000, 100, 7).await })
        };
        let mut next = 1;
        while next <= 3000 {
            for offset in offsets_read(&store, next, 100).await {
                assert_eq!(offset, next, "no gap, no repeat");
                next += 1;
            }
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
        store.shutdown().await;
    }

    fn retention(max_messages: Option<u64>, max_bytes: Option<u64>) -> RetentionPolicy {
        RetentionPolicy {
            default: Retention {
                max_messages,
                max_age: None,
                max_bytes,
            },
            channels: Default::default(),
            max_total_bytes: None,
        }
    }

    #[tokio::test]
    async fn retention_removes_whole_old_chunks_and_says_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(retention(Some(500), None))).unwrap();
        append_many(&store, 2000, 100, 50).await;
        store.trim();
        // The trim runs on the writer; the next append comes after it.
        append_one(&store).await;
        let stats = store.log_stats(&log());
        assert!(
            (500..600).contains(&stats.messages),
            "keeps at least 500, within a chunk: {stats:?}"
        );
        let first = stats.first_offset.unwrap();
        assert_eq!(
            stats.expired_before, first,
            "retention stopped where the log starts"
        );
        assert_eq!(
            offsets_read(&store, 1, 3).await,
            [first, first + 1, first + 2]
        );
        store.shutdown().await;
        drop(store);
        let store = Store::open(dir.path(), small_chunks(retention(Some(500), None))).unwrap();
        assert_eq!(
            store.log_stats(&log()).expired_before,
            first,
            "kept across restarts"
        );
        store.shutdown().await;
    }

    #[tokio::test]
    async fn retention_by_bytes_and_by_the_total_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(retention(None, Some(20_000)))).unwrap();
        append_many(&store, 2000, 100, 50).await;
        store.trim();
        append_one(&store).await;
        let bytes = store.log_stats(&log()).bytes;
        assert!(bytes <= 20_000 + 8 * 1024, "{bytes}");
        store.shutdown().await;
        drop(store);

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap();
        for channel in ["a", "b"] {
            for i in 0..1000u64 {
                let mut e = envelope();
                e.payload = Bytes::from(format!("{channel}{i}").repeat(20));
                let log = LogId::messages(channel.into());
                store
                    .append(log, e, None, None)
                    .await
                    .unwrap()
                    .flushed()
                    .await
                    .unwrap();
            }
        }
        let total = |store: &Store| -> u64 { store.all_stats().iter().map(|(_, s)| s.bytes).sum() };
        let before = total(&store);
        store.shutdown().await;
        drop(store);
        let mut policy = RetentionPolicy::unlimited();
        policy.max_total_bytes = Some(before / 2);
        let store = Store::open(dir.path(), small_chunks(policy)).unwrap();
        store.trim();
        append_one(&store).await;
        let after = total(&store);
        assert!(after <= before / 2 + 8 * 1024, "{after} of {before}");
        let a = store.log_stats(&LogId::messages("a".into()));
        let b = store.log_stats(&LogId::messages("b".into()));
        assert!(
            a.expired_before > 1,
            "the older log lost its oldest chunks first: {a:?}"
        );
        assert!(b.messages > a.messages, "{a:?} {b:?}");
        store.shutdown().await;
    }

    #[tokio::test]
    async fn single_offsets_leave_sealed_and_tail_chunks_and_purges_keep_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap();
        append_many(&store, 200, 100, 10).await;
        let removed = store
            .remove_offsets(&log(), vec![1, 2, 100, 199, 200, 5000])
            .await
            .unwrap();
        assert_eq!(removed, 5);
        let left = offsets_read(&store, 1, 1000).await;
        assert_eq!(left.len(), 195);
        assert_eq!(left[0], 3);
        assert!(!left.contains(&100) && left.last() == Some(&198));
        assert_eq!(store.purge(&log()).await.unwrap(), 195);
        assert!(offsets_read(&store, 1, 10).await.is_empty());
        store.shutdown().await;
        drop(store);
        let store = Store::open(dir.path(), small_chunks(RetentionPolicy::unlimited())).unwrap();
        assert_eq!(
            append_one(&store).await,
            201,
            "offsets continue after a purge"
        );
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_data_directory_of_the_first_layout_is_rewritten_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("m:c").unwrap();
            for offset in 1..=300u64 {
                let mut e = envelope();
                e.payload = Bytes::from(format!("{offset}"));
                tree.insert(offset.to_be_bytes(), record::encode(&e, None))
                    .unwrap();
            }
            let meta = db.open_tree("meta").unwrap();
            meta.insert(writer::CLEAN_STOP_KEY, &[1u8][..]).unwrap();
            db.flush().unwrap();
        }
        let sled = Arc::new(SledLog::open(dir.path(), config()).unwrap());
        let store = Store::with_backend(sled.clone());
        let read = store.read(&log(), 299, 10).await.unwrap();
        assert_eq!(
            read.iter().map(|m| m.offset).collect::<Vec<_>>(),
            [299, 300]
        );
        assert_eq!(&read[0].envelope.payload[..], b"299");
        assert_eq!(store.log_stats(&log()).messages, 300);
        assert_eq!(append_one(&store).await, 301);
        let db = sled.db().unwrap();
        assert!(
            !db.tree_names().iter().any(|n| n.as_ref() == b"m:c"),
            "the old tree is gone"
        );
        store.shutdown().await;
    }
}
