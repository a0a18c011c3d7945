//! Every change to the logs, made on the writer thread only: appends (one tail chunk per log
//! per group commit), seals, retention, removals. Readers see the shared index, which is
//! updated after the chunk it describes is written and before a chunk it no longer lists is
//! removed, so a reader that finds a listed chunk gone plans its read again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::chunk::{self, ChunkBuilder, ChunkInfo};
use super::index::LogIndex;
use super::layout::{self, LogTrees};
use super::retention::{Retention, RetentionPolicy};
use super::writer::{Append, Completion, Resume};
use super::{Error, LogId, Shared, io_error, offset_of, record};
use crate::routing::envelope::Delivered;

/// Chunks one retention pass removes at most, so a pass never holds appends back for long (a
/// few milliseconds); the writer runs the next pass after its next batch.
pub(super) const MAX_REMOVALS_PER_PASS: usize = 256;

/// A tail older than this is sealed at the next retention pass.
const SEAL_QUIET_AFTER: Duration = Duration::from_secs(60);

struct OpenLog {
    trees: LogTrees,
    next_offset: u64,
}

/// The writer's view of the logs.
pub(super) struct Logs {
    db: sled::Db,
    meta: sled::Tree,
    shared: Arc<Shared>,
    open: HashMap<LogId, OpenLog>,
    resume: Resume,
    seal_bytes: usize,
}

/// The appends of one batch that go to one log.
struct Group {
    log: LogId,
    /// The offset the log's next append gets.
    next: u64,
    records: Records,
    appends: Vec<Append>,
}

/// A batch's encoded records for one log: one buffer, and each record's offset and end in it.
#[derive(Default)]
pub(super) struct Records {
    bytes: Vec<u8>,
    ends: Vec<(u64, usize)>,
}

impl Records {
    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(offset, end)| {
            let record = &self.bytes[start..end];
            start = end;
            (offset, record)
        })
    }

    /// Their size in a chunk (with the framing, roughly).
    fn raw_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.ends.len()
    }
}

impl Logs {
    /// Loads every log's index (repairing what a crash left) and publishes it to readers.
    pub fn load(
        db: sled::Db,
        shared: Arc<Shared>,
        resume: Resume,
        seal_bytes: usize,
    ) -> sled::Result<Logs> {
        let indexes = layout::load(&db)?;
        shared.replace_indexes(indexes);
        let meta = db.open_tree("meta")?;
        Ok(Logs {
            db,
            meta,
            shared,
            open: HashMap::new(),
            resume,
            seal_bytes,
        })
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn open_log(&mut self, log: &LogId) -> Result<&mut OpenLog, Error> {
        self.ensure_open(log)?;
        Ok(self.open.get_mut(log).expect("opened above"))
    }

    fn ensure_open(&mut self, log: &LogId) -> Result<(), Error> {
        if !self.open.contains_key(log) {
            let io = |e| io_error(log, e);
            let trees = LogTrees::open(&self.db, log).map_err(io)?;
            let last = self
                .shared
                .with_index(log, |i| i.and_then(LogIndex::last_offset));
            let after_last = last.map_or(1, |l| l + 1 + self.resume.offset_gap);
            // A log emptied by a purge or retention continues where it was, not at 1.
            let floor = self
                .meta
                .get(layout::next_offset_key(log))
                .map_err(io)?
                .map_or(1, |v| offset_of(&v));
            let next_offset = after_last.max(floor);
            self.open
                .insert(log.clone(), OpenLog { trees, next_offset });
        }
        Ok(())
    }

    /// Writes a batch: one tail chunk per log, then the log's messages to its live subscribers
    /// (before the flush). Each append's completion goes to `written`; the I/O failure that
    /// stopped the batch, if any, is returned (the store must then be reopened).
    pub fn write(
        &mut self,
        batch: impl Iterator<Item = Append>,
        written: &mut Vec<(Completion, Result<u64, Error>)>,
    ) -> Option<Error> {
        let mut groups: Vec<Group> = Vec::new();
        let mut failure = None;
        for append in batch {
            if failure.is_some() {
                let _ = append.done.send(Err(Error::Unavailable {
                    reason: "an earlier append of the batch failed".into(),
                }));
                continue;
            }
            // The log is looked up once per batch, not per append.
            let at = match groups.iter().position(|g| g.log == append.log) {
                Some(i) => i,
                None => {
                    let next = match self.open_log(&append.log) {
                        Ok(open) => open.next_offset,
                        Err(e) => {
                            let _ = append.done.send(Err(e.clone()));
                            failure = Some(e);
                            continue;
                        }
                    };
                    groups.push(Group {
                        log: append.log.clone(),
                        next,
                        records: Records::default(),
                        appends: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let group = &mut groups[at];
            let offset = group.next;
            group.next += 1;
            let records = &mut group.records;
            record::encode_into(
                &mut records.bytes,
                &append.envelope,
                append.dead_letter_reason.as_deref(),
            );
            records.ends.push((offset, records.bytes.len()));
            group.appends.push(append);
        }
        for group in &groups {
            if let Some(open) = self.open.get_mut(&group.log) {
                open.next_offset = group.next;
            }
        }
        for group in groups {
            if let Some(e) = &failure {
                for append in group.appends {
                    written.push((append.done, Err(e.clone())));
                }
                continue;
            }
            match self.write_group(&group.log, &group.records) {
                Ok(()) => {
                    let offsets = group.records.ends.iter().map(|(offset, _)| offset);
                    for (append, offset) in group.appends.into_iter().zip(offsets) {
                        if let Some(live) = &append.live {
                            // No receiver is fine: nobody is watching this channel live.
                            let _ = live.send(Arc::new(Delivered::new(
                                *offset,
                                append.envelope,
                                append.dead_letter_reason,
                            )));
                        }
                        written.push((append.done, Ok(*offset)));
                    }
                }
                Err(e) => {
                    for append in group.appends {
                        written.push((append.done, Err(e.clone())));
                    }
                    failure = Some(e);
                }
            }
        }
        failure
    }

    /// Writes one log's records of a batch: as a tail chunk, or — when they would fill the
    /// tail — sealed at once together with the tail (a busy log is written once, not twice).
    fn write_group(&mut self, log: &LogId, records: &Records) -> Result<(), Error> {
        let (seal_bytes, raw_bytes) = (self.seal_bytes, records.raw_bytes());
        let fills_tail = self.shared.with_index(log, |i| {
            i.is_some_and(|i| i.tail_would_fill(raw_bytes, seal_bytes))
        }) || raw_bytes >= seal_bytes;
        if fills_tail {
            return self.seal(log, records);
        }
        let mut builder = ChunkBuilder::default();
        for (offset, record) in records.iter() {
            builder.push(offset, record);
        }
        let (info, value) = builder.finish(false);
        self.open[log]
            .trees
            .tail
            .insert(info.first.to_be_bytes(), value)
            .map_err(|e| io_error(log, e))?;
        self.shared.update_index(log, |index| index.insert(info));
        Ok(())
    }

    /// Merges a log's tail chunks, and `more` records after them, into one sealed (compressed)
    /// chunk.
    fn seal(&mut self, log: &LogId, more: &Records) -> Result<(), Error> {
        let tail = self
            .shared
            .with_index(log, |i| i.map(LogIndex::tail))
            .unwrap_or_default();
        if tail.is_empty() && more.ends.is_empty() {
            return Ok(());
        }
        let io = |e| io_error(log, e);
        self.ensure_open(log)?;
        let trees = &self.open[log].trees;
        let mut builder = ChunkBuilder::default();
        for info in &tail {
            let Some(value) = trees.tail.get(info.first.to_be_bytes()).map_err(io)? else {
                tracing::error!(log = %log, first = info.first, "a tail chunk the index lists is missing");
                continue;
            };
            push_records(log, info.first, &value, &mut builder, |_| true);
        }
        for (offset, record) in more.iter() {
            builder.push(offset, record);
        }
        if !builder.is_empty() {
            let (sealed, value) = builder.finish(true);
            trees.put_sealed(&sealed, value).map_err(io)?;
            self.shared.update_index(log, |index| {
                for info in &tail {
                    index.remove(info.first);
                }
                index.insert(sealed);
            });
        } else {
            self.shared.update_index(log, |index| {
                for info in &tail {
                    index.remove(info.first);
                }
            });
        }
        for info in &tail {
            trees.tail.remove(info.first.to_be_bytes()).map_err(io)?;
        }
        Ok(())
    }

    /// Seals the tails that have waited long enough (a quiet log's tail would otherwise stay
    /// as small chunks for good).
    pub fn seal_quiet(&mut self) -> Result<(), Error> {
        let cutoff = now_ms().saturating_sub(SEAL_QUIET_AFTER.as_millis() as u64);
        let logs = self
            .shared
            .logs_with(|index| index.tail().first().is_some_and(|c| c.first_ts_ms < cutoff));
        for log in logs {
            self.seal(&log, &Records::default())?;
        }
        Ok(())
    }

    /// Applies retention, per log then for all logs together; how many chunks went.
    pub fn trim(&mut self, policy: &RetentionPolicy) -> Result<usize, Error> {
        let now_ms = now_ms();
        let mut victims: Vec<(LogId, ChunkInfo)> = Vec::new();
        self.shared.for_each_index(|log, index| {
            let retention = policy.for_channel(&log.channel);
            for info in expired(index, retention, now_ms) {
                if victims.len() >= MAX_REMOVALS_PER_PASS {
                    return;
                }
                victims.push((log.clone(), info));
            }
        });
        if let Some(max_total) = policy.max_total_bytes {
            victims.extend(over_budget(
                &self.shared,
                max_total,
                &victims,
                MAX_REMOVALS_PER_PASS.saturating_sub(victims.len()),
            ));
        }
        let removed = victims.len();
        for (log, info) in victims {
            self.remove_chunk(&log, &info, true)?;
        }
        Ok(removed)
    }

    /// Removes one whole chunk; `expired` when retention removed it (readers behind it are
    /// told they missed it).
    fn remove_chunk(&mut self, log: &LogId, info: &ChunkInfo, expired: bool) -> Result<(), Error> {
        self.remember_next_offset(log)?;
        let io = |e| io_error(log, e);
        if expired {
            let before = info.last + 1;
            self.meta
                .insert(layout::expired_key(log), &before.to_be_bytes())
                .map_err(io)?;
        }
        self.shared.update_index(log, |index| {
            index.remove(info.first);
            if expired {
                index.expired_before = index.expired_before.max(info.last + 1);
            }
        });
        self.open_log(log)?.trees.remove(info).map_err(io)?;
        Ok(())
    }

    /// Keeps where offsets continue before anything is removed, so an emptied log does not start
    /// again at 1 after a restart (cursors and Last-Event-IDs refer to offsets).
    fn remember_next_offset(&mut self, log: &LogId) -> Result<(), Error> {
        let next = self.open_log(log)?.next_offset;
        let key = layout::next_offset_key(log);
        let io = |e| io_error(log, e);
        let known = self
            .meta
            .get(&key)
            .map_err(io)?
            .map_or(0, |v| offset_of(&v));
        if next > known {
            self.meta.insert(key, &next.to_be_bytes()).map_err(io)?;
        }
        Ok(())
    }

    /// Removes single offsets (replayed dead letters), rewriting the chunks that held them.
    pub fn remove_offsets(&mut self, log: &LogId, mut offsets: Vec<u64>) -> Result<u64, Error> {
        offsets.sort_unstable();
        offsets.dedup();
        self.remember_next_offset(log)?;
        let io = |e| io_error(log, e);
        let mut removed = 0u64;
        let mut at = 0;
        while at < offsets.len() {
            let chunk = self
                .shared
                .with_index(log, |i| i.and_then(|i| i.chunk_of(offsets[at])));
            let Some(info) = chunk else {
                at += 1;
                continue;
            };
            let end = offsets[at..]
                .iter()
                .position(|&o| o > info.last)
                .map_or(offsets.len(), |p| at + p);
            let gone = &offsets[at..end];
            at = end;
            self.ensure_open(log)?;
            let trees = &self.open[log].trees;
            let Some(value) = trees.of(&info).get(info.first.to_be_bytes()).map_err(io)? else {
                continue;
            };
            let mut builder = ChunkBuilder::default();
            let kept = push_records(log, info.first, &value, &mut builder, |o| {
                gone.binary_search(&o).is_err()
            });
            removed += u64::from(info.count) - kept;
            let replacement = (!builder.is_empty()).then(|| builder.finish(info.sealed));
            if let Some((new, value)) = &replacement {
                if new.sealed {
                    trees.put_sealed(new, value.clone()).map_err(io)?;
                } else {
                    trees
                        .tail
                        .insert(new.first.to_be_bytes(), value.clone())
                        .map_err(io)?;
                }
            }
            self.shared.update_index(log, |index| {
                index.remove(info.first);
                if let Some((new, _)) = &replacement {
                    index.insert(*new);
                }
            });
            if replacement
                .as_ref()
                .is_none_or(|(new, _)| new.first != info.first)
            {
                trees.remove(&info).map_err(io)?;
            }
        }
        self.db.flush().map_err(io)?;
        Ok(removed)
    }

    /// Empties a log; offsets continue where they were. How many records were removed.
    pub fn purge(&mut self, log: &LogId) -> Result<u64, Error> {
        self.remember_next_offset(log)?;
        let io = |e| io_error(log, e);
        let removed = self
            .shared
            .with_index(log, |i| i.map_or(0, |i| i.stats().messages));
        self.shared.update_index(log, |index| {
            *index = LogIndex::new(index.expired_before);
        });
        self.ensure_open(log)?;
        let trees = &self.open[log].trees;
        for tree in [&trees.index, &trees.sealed, &trees.tail] {
            tree.clear().map_err(io)?;
        }
        self.db.flush().map_err(io)?;
        Ok(removed)
    }
}

/// Adds the records of a chunk value that `keep` accepts to `builder`; how many it kept.
/// Unreadable records are logged and left out (they could not be read anyway).
fn push_records(
    log: &LogId,
    first: u64,
    value: &[u8],
    builder: &mut ChunkBuilder,
    keep: impl Fn(u64) -> bool,
) -> u64 {
    let records = match chunk::records(first, value) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(log = %log, first, error = %e, "unreadable chunk left out");
            return 0;
        }
    };
    let mut kept = 0;
    for record in records {
        match record {
            Ok((offset, record)) if keep(offset) => {
                builder.push(offset, &record);
                kept += 1;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(log = %log, first, error = %e, "corrupt records left out");
            }
        }
    }
    kept
}

/// The oldest chunks of one log that its retention no longer keeps. Count and size keep at least
/// the newest chunk; age removes whatever is older.
fn expired(index: &LogIndex, retention: &Retention, now_ms: u64) -> Vec<ChunkInfo> {
    let cutoff = retention
        .max_age
        .map(|age| now_ms.saturating_sub(age.as_millis() as u64));
    let stats = index.stats();
    let (mut messages, mut bytes, mut chunks) = (stats.messages, stats.bytes, index.chunk_count());
    let mut out = Vec::new();
    for info in index.chunks() {
        let too_old = cutoff.is_some_and(|c| info.last_ts_ms < c);
        let too_many = chunks > 1
            && retention
                .max_messages
                .is_some_and(|max| messages - u64::from(info.count) >= max);
        let too_big = chunks > 1 && retention.max_bytes.is_some_and(|max| bytes > max);
        if !(too_old || too_many || too_big) {
            break;
        }
        out.push(*info);
        messages -= u64::from(info.count);
        bytes -= u64::from(info.stored_bytes);
        chunks -= 1;
    }
    out
}

/// The oldest chunks across logs to remove until all logs together fit `max_total`, besides
/// `already` chosen: always the oldest chunk of some log (a log loses its oldest messages, never
/// a stretch in the middle), and each log keeps its newest chunk.
fn over_budget(
    shared: &Shared,
    max_total: u64,
    already: &[(LogId, ChunkInfo)],
    room: usize,
) -> Vec<(LogId, ChunkInfo)> {
    let mut fronts: Vec<(LogId, std::collections::VecDeque<ChunkInfo>)> = Vec::new();
    let mut total = 0u64;
    shared.for_each_index(|log, index| {
        total += index.bytes();
        let count = index.chunk_count();
        let candidates: std::collections::VecDeque<ChunkInfo> = index
            .chunks()
            .take(count.saturating_sub(1))
            .filter(|c| !already.iter().any(|(l, a)| l == log && a.first == c.first))
            .copied()
            .collect();
        if !candidates.is_empty() {
            fronts.push((log.clone(), candidates));
        }
    });
    total = total.saturating_sub(
        already
            .iter()
            .map(|(_, c)| u64::from(c.stored_bytes))
            .sum::<u64>(),
    );
    let mut out = Vec::new();
    while total > max_total && out.len() < room {
        let oldest = fronts
            .iter_mut()
            .filter(|(_, q)| !q.is_empty())
            .min_by_key(|(_, q)| q.front().map(|c| c.last_ts_ms));
        let Some((log, queue)) = oldest else { break };
        let info = queue.pop_front().expect("not empty");
        total = total.saturating_sub(u64::from(info.stored_bytes));
        out.push((log.clone(), info));
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}
