//! The log's trees in sled and how a start finds them.
//!
//! A log named `m:{channel}` (messages; `d:` dead letters, `c:` calls) has three trees:
//! `Lm:{channel}` its sealed chunks, `Im:{channel}` their index entries, `Tm:{channel}` its tail
//! chunks; all keyed by the chunk's first offset, big-endian. The `meta` tree keeps, per log,
//! where offsets continue (`next:m:{channel}`) and where retention stopped
//! (`expired:m:{channel}`).
//!
//! A data directory of the first layout (one key per message in the `m:{channel}` tree) is
//! rewritten into chunks at the first start, log by log, and the old tree is dropped.

use std::collections::HashMap;

use super::chunk::{self, ChunkBuilder, ChunkInfo};
use super::index::LogIndex;
use super::{LogId, LogKind, offset_of};

/// A log's trees.
pub(super) struct LogTrees {
    pub sealed: sled::Tree,
    pub index: sled::Tree,
    pub tail: sled::Tree,
}

impl LogTrees {
    pub fn open(db: &sled::Db, log: &LogId) -> sled::Result<LogTrees> {
        let name = log.tree_name();
        Ok(LogTrees {
            sealed: db.open_tree(format!("L{name}"))?,
            index: db.open_tree(format!("I{name}"))?,
            tail: db.open_tree(format!("T{name}"))?,
        })
    }

    /// The tree a chunk lives in.
    pub fn of(&self, info: &ChunkInfo) -> &sled::Tree {
        if info.sealed {
            &self.sealed
        } else {
            &self.tail
        }
    }

    /// Writes a sealed chunk and its index entry (the entry after the chunk: a crash between
    /// the two leaves a chunk the next start indexes, never an entry without its chunk).
    pub fn put_sealed(&self, info: &ChunkInfo, value: Vec<u8>) -> sled::Result<()> {
        self.sealed.insert(info.first.to_be_bytes(), value)?;
        self.index
            .insert(info.first.to_be_bytes(), &info.encode()[..])?;
        Ok(())
    }

    /// Removes a chunk (its index entry first, for the same reason).
    pub fn remove(&self, info: &ChunkInfo) -> sled::Result<()> {
        if info.sealed {
            self.index.remove(info.first.to_be_bytes())?;
        }
        self.of(info).remove(info.first.to_be_bytes())?;
        Ok(())
    }
}

/// The `meta` key of where a log's offsets continue once records were removed.
pub(super) fn next_offset_key(log: &LogId) -> Vec<u8> {
    format!("next:{}", log.tree_name()).into_bytes()
}

/// The `meta` key of the first offset retention kept.
pub(super) fn expired_key(log: &LogId) -> Vec<u8> {
    format!("expired:{}", log.tree_name()).into_bytes()
}

/// The log a tree name belongs to, with the tree's role letter.
fn log_of_tree(name: &[u8]) -> Option<(u8, LogId)> {
    let name = std::str::from_utf8(name).ok()?;
    let (role, rest) = name.split_at_checked(1)?;
    let log = LogId::from_tree_name(rest)?;
    Some((role.as_bytes()[0], log))
}

/// Reads every log's index, repairing what a crash may have left half done.
pub(super) fn load(db: &sled::Db) -> sled::Result<HashMap<LogId, LogIndex>> {
    migrate_first_layout(db)?;
    let meta = db.open_tree("meta")?;
    let mut indexes = HashMap::new();
    let logs: Vec<LogId> = db
        .tree_names()
        .iter()
        .filter_map(|n| log_of_tree(n))
        .filter(|(role, _)| *role == b'L' || *role == b'T')
        .map(|(_, log)| log)
        .collect();
    for log in logs {
        if indexes.contains_key(&log) {
            continue;
        }
        let expired_before = meta.get(expired_key(&log))?.map_or(1, |v| offset_of(&v));
        let trees = LogTrees::open(db, &log)?;
        let index = load_one(&log, &trees, expired_before)?;
        indexes.insert(log, index);
    }
    Ok(indexes)
}

fn load_one(log: &LogId, trees: &LogTrees, expired_before: u64) -> sled::Result<LogIndex> {
    let mut index = LogIndex::new(expired_before);
    for item in trees.index.iter() {
        let (key, value) = item?;
        match ChunkInfo::decode(offset_of(&key), &value) {
            Some(info) => index.insert(info),
            None => {
                tracing::error!(log = %log, first = offset_of(&key), "unreadable index entry; its chunk is skipped")
            }
        }
    }
    // A crash between writing a sealed chunk and its entry: index the chunk.
    if let Some((key, value)) = trees.sealed.last()? {
        let first = offset_of(&key);
        if index.chunk_of(first).is_none_or(|c| c.first != first)
            && let Some(info) = info_of(log, first, &value, true)
        {
            trees.index.insert(key, &info.encode()[..])?;
            index.insert(info);
        }
    }
    // A crash between removing an entry and its chunk: the chunk goes too.
    let oldest = index.oldest().map_or(u64::MAX, |c| c.first);
    for item in trees.sealed.range(..oldest.to_be_bytes()) {
        let (key, _) = item?;
        trees.sealed.remove(key)?;
    }
    // Tail chunks; those a crash left behind after sealing them are removed.
    let sealed_through = index.last_offset().unwrap_or(0);
    for item in trees.tail.iter() {
        let (key, value) = item?;
        let first = offset_of(&key);
        match info_of(log, first, &value, false) {
            Some(info) if info.first > sealed_through => index.insert(info),
            _ => {
                trees.tail.remove(key)?;
            }
        }
    }
    Ok(index)
}

/// The index entry of a chunk, read from the chunk itself.
fn info_of(log: &LogId, first: u64, value: &[u8], sealed: bool) -> Option<ChunkInfo> {
    let mut builder = ChunkBuilder::default();
    let records = match chunk::records(first, value) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(log = %log, first, error = %e, "unreadable chunk; it is dropped");
            return None;
        }
    };
    for record in records {
        match record {
            Ok((offset, record)) => builder.push(offset, &record),
            Err(e) => {
                tracing::error!(log = %log, first, error = %e, "corrupt chunk; its readable records are kept");
                break;
            }
        }
    }
    if builder.is_empty() {
        return None;
    }
    let (mut info, _) = builder.finish(false);
    info.stored_bytes = value.len() as u32;
    info.sealed = sealed;
    Some(info)
}

/// Rewrites logs of the first layout (a key per message) into sealed chunks.
fn migrate_first_layout(db: &sled::Db) -> sled::Result<()> {
    let old: Vec<(sled::IVec, LogId)> = db
        .tree_names()
        .into_iter()
        .filter_map(|n| {
            let log = LogId::from_tree_name(std::str::from_utf8(&n).ok()?)?;
            Some((n, log))
        })
        .collect();
    for (name, log) in old {
        let tree = db.open_tree(&name)?;
        let trees = LogTrees::open(db, &log)?;
        let mut builder = ChunkBuilder::default();
        let mut records = 0u64;
        for item in tree.iter() {
            let (key, value) = item?;
            builder.push(offset_of(&key), &value);
            records += 1;
            if builder.raw_len() >= chunk::SEAL_RAW_BYTES {
                let (info, value) = std::mem::take(&mut builder).finish(true);
                trees.put_sealed(&info, value)?;
            }
        }
        if !builder.is_empty() {
            let (info, value) = builder.finish(true);
            trees.put_sealed(&info, value)?;
        }
        db.flush()?;
        db.drop_tree(&name)?;
        db.flush()?;
        tracing::info!(log = %log, records, "log rewritten from the first layout (a key per message) into chunks");
    }
    Ok(())
}

impl LogId {
    /// The log's name, which its trees' names and its `meta` keys derive from.
    pub(super) fn tree_name(&self) -> String {
        format!("{}:{}", self.kind.letter(), self.channel)
    }

    fn from_tree_name(name: &str) -> Option<LogId> {
        let (letter, channel) = name.split_once(':')?;
        let kind = match letter {
            "m" => LogKind::Messages,
            "d" => LogKind::DeadLetters,
            "c" => LogKind::Calls,
            _ => return None,
        };
        (!channel.is_empty()).then(|| LogId {
            channel: channel.into(),
            kind,
        })
    }
}

impl LogKind {
    fn letter(self) -> &'static str {
        match self {
            LogKind::Messages => "m",
            LogKind::DeadLetters => "d",
            LogKind::Calls => "c",
        }
    }
}
