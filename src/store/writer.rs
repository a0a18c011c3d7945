//! The log writer thread: group commit and retention.
//!
//! Debug builds (the ones `cargo test` runs) read one failpoint, for tests that need a log that
//! stops accepting: `STEPFLOW_FAILPOINT_LOG_FREEZE=AFTER:SECONDS` freezes the writer for
//! SECONDS once AFTER appends have been written. Release builds do not contain it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};

use super::log::Logs;
use super::{Error, LogId, Shared, StoreConfig, open_db};
use crate::routing::envelope::{Delivered, Envelope};
use crate::telemetry;

// Appends are nearly every command: boxing them would allocate per message to shrink the rare
// ones.
#[allow(clippy::large_enum_variant)]
pub(super) enum Command {
    Append(Append),
    /// Apply retention now (sent periodically by [`super::Store::trim`]'s caller).
    Trim,
    /// Remove single offsets (replayed dead letters).
    Remove {
        log: LogId,
        offsets: Vec<u64>,
        done: oneshot::Sender<Result<u64, Error>>,
    },
    /// Empty a log.
    Purge {
        log: LogId,
        done: oneshot::Sender<Result<u64, Error>>,
    },
    /// A reader's position (a bridge lane's or a call trigger's cursor).
    Position(Position),
    Shutdown(oneshot::Sender<()>),
}

/// A cursor write, applied in queue order with the appends around it, so a later write never
/// lands before an earlier one and a removal is never undone by a write still queued.
pub(super) struct Position {
    /// The state tree (`s:{namespace}`).
    pub tree: String,
    pub key: String,
    /// The next offset the reader takes; `None` removes the cursor.
    pub next: Option<u64>,
    /// Answered once the position is flushed (with the next group commit); without it the
    /// position rides whichever flush comes next, its own or sled's periodic one.
    pub done: Option<Completion>,
}

pub(super) struct Append {
    pub log: LogId,
    pub envelope: Envelope,
    pub dead_letter_reason: Option<String>,
    pub live: Option<broadcast::Sender<Arc<Delivered>>>,
    pub done: oneshot::Sender<Result<u64, Error>>,
}

pub(super) type Completion = oneshot::Sender<Result<u64, Error>>;

/// Answers appends: their own result, or `failure` when their flush failed.
fn complete(completions: Vec<(Completion, Result<u64, Error>)>, failure: Option<&Error>) {
    for (done, result) in completions {
        let outcome = match failure {
            None => result,
            Some(e) => Err(e.clone()),
        };
        let _ = done.send(outcome);
    }
}

/// How far offsets jump after an unclean stop (see [`super::Store::open`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Resume {
    pub offset_gap: u64,
}

/// The writer thread's fixed state.
pub(super) struct Writer {
    pub shared: Arc<Shared>,
    pub dir: PathBuf,
    pub config: StoreConfig,
}

/// Longest wait between two attempts to reopen a failed database.
const MAX_REOPEN_DELAY: Duration = Duration::from_secs(5);

/// After an unclean stop, offsets continue this many batch sizes past the last one on disk.
/// The writer keeps at most one batch size of appends written (and shown live) but not yet
/// flushed — the flush in flight and what arrived during it, together — so a crash loses at
/// most that many offsets a client may have seen.
pub(super) const UNFLUSHED_GAP_BATCHES: u64 = 1;

/// A flush running on sled's thread pool, and the appends it makes durable.
struct Flushing {
    future: Pin<Box<dyn Future<Output = sled::Result<usize>> + Send>>,
    completions: Vec<(Completion, Result<u64, Error>)>,
    started: Instant,
}

// Moved once per loop turn, like the commands themselves (see `Command`).
#[allow(clippy::large_enum_variant)]
enum Event {
    Command(Option<Command>),
    Flushed(sled::Result<usize>),
}

impl Writer {
    /// The writer loop. Appends are written and handed to live subscribers as soon as they
    /// arrive; their durability (the flush, then the completions the upstream acks wait for)
    /// runs beside it on sled's thread pool, so a live client never waits for an fsync. One
    /// flush at a time: what arrives during it is written, shown live, and made durable by the
    /// next one.
    pub(super) fn run(self, logs: Logs, rx: mpsc::Receiver<Command>) {
        // A dedicated OS thread with its own executor: sled calls block it, never a runtime
        // worker.
        futures::executor::block_on(self.run_loop(logs, rx));
    }

    async fn run_loop(self, mut logs: Logs, mut rx: mpsc::Receiver<Command>) {
        let config = &self.config;
        let mut db = logs.db().clone();
        let mut last_trim = Instant::now();
        // A retention pass that hit its bound continues at the next turn, not 5 s later.
        let mut trim_unfinished = false;
        let mut batch: Vec<Append> = Vec::with_capacity(config.max_batch);
        let mut unflushed: Vec<(Completion, Result<u64, Error>)> =
            Vec::with_capacity(config.max_batch);
        let mut flushing: Option<Flushing> = None;
        let flush_time = metrics::histogram!(telemetry::LOG_FLUSH_DURATION);
        let batch_size = metrics::histogram!(telemetry::LOG_BATCH_SIZE);
        #[cfg(debug_assertions)]
        let mut freeze = failpoint::Freeze::from_env();
        loop {
            // Appends written but not yet durable: the flush in flight and those after it.
            let not_durable =
                flushing.as_ref().map_or(0, |f| f.completions.len()) + unflushed.len();
            let event = match flushing.as_mut() {
                None => Event::Command(rx.recv().await),
                // A batch size written ahead of the disk: wait for it.
                Some(f) if not_durable >= config.max_batch => {
                    Event::Flushed(f.future.as_mut().await)
                }
                Some(f) => {
                    let recv = std::pin::pin!(rx.recv());
                    match futures::future::select(recv, f.future.as_mut()).await {
                        futures::future::Either::Left((command, _)) => Event::Command(command),
                        futures::future::Either::Right((flushed, _)) => Event::Flushed(flushed),
                    }
                }
            };
            let mut failure: Option<Error> = None;
            let mut shutdown = None;
            let mut trim_requested = false;
            match event {
                Event::Flushed(result) => {
                    let done = flushing.take().expect("a flush was in flight");
                    flush_time.record(done.started.elapsed().as_secs_f64());
                    batch_size.record(done.completions.len() as f64);
                    match result {
                        Ok(_) => complete(done.completions, None),
                        Err(e) => {
                            let error = Error::Io {
                                log: "flush".into(),
                                reason: e.to_string(),
                            };
                            complete(done.completions, Some(&error));
                            failure = Some(error);
                        }
                    }
                }
                // Every sender is gone: finish what is pending and stop.
                Event::Command(None) => break,
                Event::Command(Some(first)) => {
                    #[cfg(debug_assertions)]
                    freeze.before_batch();
                    let started = Instant::now();
                    let mut maintenance: Vec<Command> = Vec::new();
                    let mut positions: Vec<Position> = Vec::new();
                    let mut push =
                        |command: Command,
                         batch: &mut Vec<Append>,
                         maintenance: &mut Vec<Command>| match command {
                            Command::Append(a) => {
                                batch.push(a);
                                None
                            }
                            Command::Trim => {
                                trim_requested = true;
                                None
                            }
                            Command::Position(p) => {
                                positions.push(p);
                                None
                            }
                            Command::Shutdown(done) => Some(done),
                            other => {
                                maintenance.push(other);
                                None
                            }
                        };
                    shutdown = push(first, &mut batch, &mut maintenance);
                    // Take what is already queued, up to the batch size (less what is not yet
                    // durable) and the delay bound; a removal or purge ends the batch, so it
                    // runs after the appends queued before it.
                    let room = config.max_batch.saturating_sub(not_durable).max(1);
                    while shutdown.is_none()
                        && maintenance.is_empty()
                        && batch.len() < room
                        && started.elapsed() < config.max_flush_delay
                    {
                        match rx.try_recv() {
                            Ok(c) => shutdown = push(c, &mut batch, &mut maintenance),
                            Err(_) => break,
                        }
                    }
                    #[cfg(debug_assertions)]
                    freeze.appended(batch.len());
                    failure = logs.write(batch.drain(..), &mut unflushed);
                    // After the appends queued with them: a cursor is never durable before the
                    // messages it has passed.
                    for position in positions {
                        if let Some(e) = write_position(&db, position, &mut unflushed) {
                            failure.get_or_insert(e);
                        }
                    }
                    for command in maintenance {
                        let (result, done) = match command {
                            Command::Remove { log, offsets, done } => {
                                (logs.remove_offsets(&log, offsets), done)
                            }
                            Command::Purge { log, done } => (logs.purge(&log), done),
                            _ => unreachable!("only removals and purges are set aside"),
                        };
                        if let Err(e @ Error::Io { .. }) = &result {
                            failure.get_or_insert(e.clone());
                        }
                        let _ = done.send(result);
                    }
                }
            }
            if let Some(error) = failure {
                // sled is done after an I/O error: whatever is pending fails with it (upstreams
                // redeliver), and the database is reopened.
                if let Some(f) = flushing.take() {
                    let _ = f.future.await;
                    complete(f.completions, Some(&error));
                }
                complete(std::mem::take(&mut unflushed), Some(&error));
                drop(db);
                drop(logs);
                match self.reopen(&error, &mut rx) {
                    Some(reopened) => {
                        logs = reopened;
                        db = logs.db().clone();
                    }
                    None => {
                        if let Some(done) = shutdown {
                            let _ = done.send(());
                        }
                        return;
                    }
                }
                continue;
            }
            if flushing.is_none() && !unflushed.is_empty() {
                // The future owns a handle: it is awaited (and dropped) before any reopen.
                let handle = db.clone();
                flushing = Some(Flushing {
                    future: Box::pin(async move { handle.flush_async().await }),
                    completions: std::mem::take(&mut unflushed),
                    started: Instant::now(),
                });
            }
            if trim_requested || trim_unfinished || last_trim.elapsed() >= config.trim_interval {
                // Failures here are the next append's to find (sled fails every call after an
                // I/O error); retention itself retries at the next pass.
                match logs.seal_quiet().and_then(|_| logs.trim(&config.retention)) {
                    Ok(removed) => trim_unfinished = removed >= super::log::MAX_REMOVALS_PER_PASS,
                    Err(e) => tracing::warn!(error = %e, "log retention failed"),
                }
                last_trim = Instant::now();
            }
            if let Some(done) = shutdown {
                self.finish(&db, flushing.take(), std::mem::take(&mut unflushed))
                    .await;
                let _ = done.send(());
                return;
            }
        }
        self.finish(&db, flushing.take(), unflushed).await;
    }

    /// Stopping: the flush in flight and a last one for what came after it, then the clean
    /// stop mark.
    async fn finish(
        &self,
        db: &sled::Db,
        flushing: Option<Flushing>,
        unflushed: Vec<(Completion, Result<u64, Error>)>,
    ) {
        if let Some(f) = flushing {
            let result = f.future.await.map_err(|e| Error::Io {
                log: "flush".into(),
                reason: e.to_string(),
            });
            complete(f.completions, result.as_ref().err());
        }
        let result = db.flush().map_err(|e| Error::Io {
            log: "flush".into(),
            reason: e.to_string(),
        });
        complete(unflushed, result.as_ref().err());
        mark_clean(db);
    }

    /// After an I/O failure: closes the database, fails appends meanwhile, and reopens it with a
    /// backoff. `None` when asked to shut down first (the database stays closed: the next start
    /// reopens it, and finds the stop unclean).
    fn reopen(&self, error: &Error, rx: &mut mpsc::Receiver<Command>) -> Option<Logs> {
        tracing::error!(error = %error, "the message log failed; appends are refused until it is reopened");
        metrics::counter!(telemetry::LOG_FAILURES).increment(1);
        let reason = error.to_string();
        self.shared.set_db(None);
        self.shared.set_health(|h| {
            h.ok = false;
            h.error = Some(reason.clone());
            h.failures += 1;
        });
        let mut delay = Duration::from_millis(100);
        loop {
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_REOPEN_DELAY);
            loop {
                match rx.try_recv() {
                    Ok(Command::Append(a)) => {
                        let _ = a.done.send(Err(Error::Unavailable {
                            reason: reason.clone(),
                        }));
                    }
                    Ok(Command::Trim) => {}
                    Ok(Command::Position(Position { done, .. })) => {
                        if let Some(done) = done {
                            let _ = done.send(Err(Error::Unavailable {
                                reason: reason.clone(),
                            }));
                        }
                    }
                    Ok(Command::Remove { done, .. } | Command::Purge { done, .. }) => {
                        let _ = done.send(Err(Error::Unavailable {
                            reason: reason.clone(),
                        }));
                    }
                    Ok(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        return None;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                }
            }
            // What the failed batches showed live may have been lost: skip past it.
            let resume = Resume {
                offset_gap: self.config.max_batch as u64 * UNFLUSHED_GAP_BATCHES,
            };
            let reopened = open_db(&self.dir, &self.config).and_then(|(db, _)| {
                Logs::load(db, self.shared.clone(), resume, self.config.chunk_bytes).map_err(|e| {
                    Error::Open {
                        path: self.dir.clone(),
                        reason: e.to_string(),
                    }
                })
            });
            match reopened {
                Ok(logs) => {
                    tracing::info!("the message log is reopened and accepts appends again");
                    self.shared.set_db(Some(logs.db().clone()));
                    self.shared.set_health(|h| {
                        h.ok = true;
                        h.error = None;
                    });
                    return Some(logs);
                }
                Err(e) => tracing::warn!(error = %e, "the message log cannot be reopened yet"),
            }
        }
    }
}

/// Writes (or removes) one cursor; its completion, if any, waits with the batch's appends for
/// the next flush. The I/O failure, if any (the store must then be reopened).
fn write_position(
    db: &sled::Db,
    position: Position,
    unflushed: &mut Vec<(Completion, Result<u64, Error>)>,
) -> Option<Error> {
    let Position {
        tree,
        key,
        next,
        done,
    } = position;
    let written = db.open_tree(&tree).and_then(|t| match next {
        Some(next) => t.insert(key.as_bytes(), &next.to_be_bytes()).map(drop),
        None => t.remove(key.as_bytes()).map(drop),
    });
    match written {
        Ok(()) => {
            if let Some(done) = done {
                unflushed.push((done, Ok(next.unwrap_or(0))));
            }
            None
        }
        Err(e) => {
            let error = Error::Io {
                log: tree,
                reason: e.to_string(),
            };
            if let Some(done) = done {
                let _ = done.send(Err(error.clone()));
            }
            Some(error)
        }
    }
}

/// Key in the `meta` tree present only while no writer runs: its absence at open means the
/// previous process stopped without flushing its last batch.
pub(super) const CLEAN_STOP_KEY: &[u8] = b"clean-stop";

fn mark_clean(db: &sled::Db) {
    let result = db
        .open_tree("meta")
        .and_then(|meta| meta.insert(CLEAN_STOP_KEY, &[1u8][..]))
        .and_then(|_| db.flush());
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot record a clean stop; offsets will skip ahead at the next start");
    }
}

/// Fault injection for tests, compiled into debug builds only.
#[cfg(debug_assertions)]
mod failpoint {
    use std::time::Duration;

    /// `STEPFLOW_FAILPOINT_LOG_FREEZE=AFTER:SECONDS`.
    pub(super) struct Freeze {
        after: u64,
        duration: Duration,
        appended: u64,
        done: bool,
    }

    impl Freeze {
        pub(super) fn from_env() -> Freeze {
            let parsed = std::env::var("STEPFLOW_FAILPOINT_LOG_FREEZE")
                .ok()
                .and_then(|v| {
                    let (after, secs) = v.split_once(':')?;
                    Some((after.parse().ok()?, secs.parse().ok()?))
                });
            match parsed {
                Some((after, secs)) => Freeze {
                    after,
                    duration: Duration::from_secs(secs),
                    appended: 0,
                    done: false,
                },
                None => Freeze {
                    after: 0,
                    duration: Duration::ZERO,
                    appended: 0,
                    done: true,
                },
            }
        }

        pub(super) fn appended(&mut self, n: usize) {
            self.appended += n as u64;
        }

        pub(super) fn before_batch(&mut self) {
            if !self.done && self.appended >= self.after {
                self.done = true;
                tracing::warn!(after = self.after, duration = ?self.duration, "failpoint: the log writer freezes");
                std::thread::sleep(self.duration);
                tracing::warn!("failpoint: the log writer resumes");
            }
        }
    }
}
