//! The message log and its durable state, in sled. Every sled call lives in this module.
//!
//! One tree per channel and kind (`m:{channel}` messages, `d:{channel}` dead letters); keys are
//! big-endian `u64` offsets, monotonic per tree and continuing after a restart. Appends go through
//! one writer thread (a dedicated OS thread, never a runtime worker) that commits in groups: it
//! takes every append waiting (up to `max_batch`), inserts them, hands them to live subscribers,
//! flushes once, then completes them. So a message is acknowledged upstream only once it is on
//! disk, and an fsync is shared by every message that arrived while the previous one ran.
//! Reads run on `spawn_blocking`.
//!
//! sled stops working for good after an I/O error (a full disk, say): every later call returns
//! the same error. So the writer then closes the database, fails appends as
//! [`Error::Unavailable`] (upstreams keep the messages and redeliver them), and reopens it with a
//! backoff until it works again; [`Store::health`] tells readiness probes meanwhile.

mod record;
mod state;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::routing::ChannelId;
use crate::routing::envelope::{Delivered, Envelope};

pub use record::CorruptRecord;

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

    fn tree_name(&self) -> String {
        match self.kind {
            LogKind::Messages => format!("m:{}", self.channel),
            LogKind::DeadLetters => format!("d:{}", self.channel),
            LogKind::Calls => format!("c:{}", self.channel),
        }
    }
}

impl std::fmt::Display for LogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.channel, self.kind.as_str())
    }
}

/// How much of each log to keep; `None` keeps everything of that measure.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub max_messages: Option<u64>,
    #[serde(with = "optional_seconds", rename = "max_age_seconds")]
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

mod optional_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
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
    pub retention: Retention,
    /// How often retention runs.
    pub trim_interval: Duration,
    /// sled's page cache. Its default (1 GiB) would let the daemon grow to that; the log is
    /// written sequentially and read mostly at its tail, so a small cache serves it.
    pub cache_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_flush_delay: Duration::from_millis(5),
            queue_capacity: 8192,
            retention: Retention::default(),
            trim_interval: Duration::from_secs(5),
            cache_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The outcome of an append, available once the message is flushed.
pub struct PendingAppend(oneshot::Receiver<Result<u64, Error>>);

impl PendingAppend {
    /// Waits for the flush; the offset of the message in its log.
    pub async fn flushed(self) -> Result<u64, Error> {
        self.0.await.unwrap_or(Err(Error::Closed))
    }
}

/// Position and size of one log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    pub first_offset: Option<u64>,
    pub last_offset: Option<u64>,
    pub messages: u64,
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
}

impl Shared {
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

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    commands: mpsc::Sender<writer::Command>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Opens sled in `dir` and finds where offsets resume.
fn open_db(dir: &Path, config: &StoreConfig) -> Result<(sled::Db, writer::Resume), Error> {
    let open_error = |e: sled::Error| Error::Open {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let db = sled::Config::new()
        .path(dir)
        // Durability comes from the writer's explicit group flushes, not a timer.
        .flush_every_ms(None)
        .cache_capacity(config.cache_bytes)
        .open()
        .map_err(open_error)?;
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

impl Store {
    /// Opens (or creates) the store in `dir` and starts the writer thread.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Store, Error> {
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
        });
        shared.set_health(|h| h.ok = true);
        let (commands, rx) = mpsc::channel(config.queue_capacity);
        let writer = writer::Writer {
            shared: shared.clone(),
            dir: dir.to_path_buf(),
            config,
        };
        let handle = std::thread::Builder::new()
            .name("stepflow-log-writer".into())
            .spawn(move || writer.run(db, rx, resume))
            .map_err(|e| Error::Open {
                path: dir.to_path_buf(),
                reason: format!("cannot start the log writer: {e}"),
            })?;
        Ok(Store {
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

    /// Resolves once the log accepts appends (at once when it does).
    pub async fn available(&self) {
        while !self.health().ok {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

    /// Queues an append. Waits only while the queue is full (backpressure); the returned handle
    /// completes once the message is flushed. If `live` is given, the message is sent there as
    /// soon as it has its offset, before the flush, so live subscribers are not delayed by it.
    pub async fn append(
        &self,
        log: LogId,
        envelope: Envelope,
        dead_letter_reason: Option<String>,
        live: Option<broadcast::Sender<Arc<Delivered>>>,
    ) -> Result<PendingAppend, Error> {
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

    /// Messages of `log` from offset `from` (inclusive), at most `limit`.
    pub async fn read(
        &self,
        log: &LogId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Delivered>>, Error> {
        let db = self.db()?;
        let log = log.clone();
        tokio::task::spawn_blocking(move || read_blocking(&db, &log, from, limit))
            .await
            .map_err(|e| Error::Io {
                log: String::new(),
                reason: format!("read task failed: {e}"),
            })?
    }

    /// First and last offset and count of a log.
    pub async fn stats(&self, log: &LogId) -> Result<LogStats, Error> {
        let db = self.db()?;
        let log = log.clone();
        tokio::task::spawn_blocking(move || stats_blocking(&db, &log))
            .await
            .map_err(|e| Error::Io {
                log: String::new(),
                reason: format!("stats task failed: {e}"),
            })?
    }

    /// Bytes the store takes on disk.
    pub async fn size_on_disk(&self) -> u64 {
        let Ok(db) = self.db() else { return 0 };
        tokio::task::spawn_blocking(move || db.size_on_disk().unwrap_or(0))
            .await
            .unwrap_or(0)
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

/// Log maintenance: removing what was replayed or is no longer wanted.
impl Store {
    /// Removes the given offsets from a log (dead letters that were replayed); how many were there.
    pub async fn remove_offsets(&self, log: &LogId, offsets: Vec<u64>) -> Result<u64, Error> {
        let db = self.db()?;
        let log = log.clone();
        let name = log.to_string();
        blocking(&name, move || {
            let tree = db.open_tree(log.tree_name())?;
            remember_next_offset(&db, &log, &tree)?;
            let mut removed = 0;
            for offset in offsets {
                if tree.remove(offset.to_be_bytes())?.is_some() {
                    removed += 1;
                }
            }
            db.flush()?;
            Ok(removed)
        })
        .await
    }

    /// Empties a log; offsets continue where they were. How many records were removed.
    pub async fn purge(&self, log: &LogId) -> Result<u64, Error> {
        let db = self.db()?;
        let log = log.clone();
        let name = log.to_string();
        blocking(&name, move || {
            let tree = db.open_tree(log.tree_name())?;
            remember_next_offset(&db, &log, &tree)?;
            let removed = tree.len() as u64;
            tree.clear()?;
            db.flush()?;
            Ok(removed)
        })
        .await
    }
}

/// Records where a log's offsets continue before records are removed, so an emptied log does not
/// start again at 1 after a restart (cursors and Last-Event-IDs refer to offsets).
fn remember_next_offset(db: &sled::Db, log: &LogId, tree: &sled::Tree) -> Result<(), sled::Error> {
    if let Some((key, _)) = tree.last()? {
        let next = offset_of(&key) + 1;
        let meta = db.open_tree("meta")?;
        let floor_key = writer::next_offset_key(log);
        let known = meta.get(&floor_key)?.map_or(0, |v| offset_of(&v));
        if next > known {
            meta.insert(floor_key, &next.to_be_bytes())?;
        }
    }
    Ok(())
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

fn read_blocking(
    db: &sled::Db,
    log: &LogId,
    from: u64,
    limit: usize,
) -> Result<Vec<Arc<Delivered>>, Error> {
    let tree = db
        .open_tree(log.tree_name())
        .map_err(|e| io_error(log, e))?;
    let mut out = Vec::new();
    for item in tree.range(from.to_be_bytes()..).take(limit) {
        let (key, value) = item.map_err(|e| io_error(log, e))?;
        let offset = offset_of(&key);
        let delivered = record::decode(&log.channel, offset, Bytes::copy_from_slice(&value))
            .map_err(|source| Error::Corrupt {
                log: log.to_string(),
                offset,
                source,
            })?;
        out.push(Arc::new(delivered));
    }
    Ok(out)
}

fn stats_blocking(db: &sled::Db, log: &LogId) -> Result<LogStats, Error> {
    let tree = db
        .open_tree(log.tree_name())
        .map_err(|e| io_error(log, e))?;
    let first = tree.first().map_err(|e| io_error(log, e))?;
    let last = tree.last().map_err(|e| io_error(log, e))?;
    Ok(LogStats {
        first_offset: first.map(|(k, _)| offset_of(&k)),
        last_offset: last.map(|(k, _)| offset_of(&k)),
        messages: tree.len() as u64,
    })
}

fn offset_of(key: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = key.len().min(8);
    a[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::address::Params;
    use crate::routing::envelope::{Origin, Transport};

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
}
