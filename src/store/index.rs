//! Where each log's chunks are, kept in memory: what a read must fetch, a log's size, and what
//! retention removes, all without touching sled. Sealed chunks' entries are also kept on disk
//! (the `I…` tree), so a start does not read the chunks themselves; tail chunks are few and read
//! back at the start.

use std::collections::BTreeMap;

use super::LogStats;
use super::chunk::ChunkInfo;

/// One log's chunks.
#[derive(Debug, Clone, Default)]
pub(super) struct LogIndex {
    chunks: BTreeMap<u64, ChunkInfo>,
    messages: u64,
    bytes: u64,
    tail_chunks: usize,
    tail_raw_bytes: usize,
    /// Offsets below this were removed by retention (1 when none was).
    pub expired_before: u64,
}

impl LogIndex {
    pub fn new(expired_before: u64) -> Self {
        Self {
            expired_before: expired_before.max(1),
            ..Self::default()
        }
    }

    pub fn insert(&mut self, info: ChunkInfo) {
        if let Some(old) = self.chunks.insert(info.first, info) {
            self.forget(&old);
        }
        self.messages += u64::from(info.count);
        self.bytes += u64::from(info.stored_bytes);
        if !info.sealed {
            self.tail_chunks += 1;
            self.tail_raw_bytes += info.raw_bytes as usize;
        }
    }

    pub fn remove(&mut self, first: u64) -> Option<ChunkInfo> {
        let info = self.chunks.remove(&first)?;
        self.forget(&info);
        Some(info)
    }

    fn forget(&mut self, info: &ChunkInfo) {
        self.messages -= u64::from(info.count);
        self.bytes -= u64::from(info.stored_bytes);
        if !info.sealed {
            self.tail_chunks -= 1;
            self.tail_raw_bytes -= info.raw_bytes as usize;
        }
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            first_offset: self.chunks.values().next().map(|c| c.first),
            last_offset: self.chunks.values().next_back().map(|c| c.last),
            messages: self.messages,
            bytes: self.bytes,
            expired_before: self.expired_before,
        }
    }

    pub fn last_offset(&self) -> Option<u64> {
        self.chunks.values().next_back().map(|c| c.last)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The oldest chunk.
    pub fn oldest(&self) -> Option<&ChunkInfo> {
        self.chunks.values().next()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Whether a tail chunk of `raw_bytes` more would make the tail due to be sealed.
    pub fn tail_would_fill(&self, raw_bytes: usize, seal_bytes: usize) -> bool {
        self.tail_raw_bytes + raw_bytes >= seal_bytes
            || self.tail_chunks + 1 >= super::chunk::SEAL_TAIL_CHUNKS
    }

    /// The tail (unsealed) chunks, oldest first; they always follow every sealed one.
    pub fn tail(&self) -> Vec<ChunkInfo> {
        let mut tail: Vec<ChunkInfo> = self
            .chunks
            .values()
            .rev()
            .take_while(|c| !c.sealed)
            .copied()
            .collect();
        tail.reverse();
        tail
    }

    /// The chunks a read of `limit` messages from `from` needs, in order.
    pub fn plan(&self, from: u64, limit: usize) -> Vec<ChunkInfo> {
        let start = self
            .chunks
            .range(..=from)
            .next_back()
            .filter(|(_, c)| c.last >= from)
            .map_or(from, |(&first, _)| first);
        let mut planned = Vec::new();
        let mut messages = 0usize;
        for chunk in self.chunks.range(start..).map(|(_, c)| c) {
            if messages >= limit {
                break;
            }
            planned.push(*chunk);
            // The first chunk may hold offsets before `from`: at most `last - from + 1` of its
            // messages count (fewer when it has holes, which only fetches one chunk more).
            let at_or_after = if chunk.first < from {
                (chunk.last - from + 1).min(u64::from(chunk.count))
            } else {
                u64::from(chunk.count)
            };
            messages += at_or_after as usize;
        }
        planned
    }

    /// The chunk holding `offset`, if any.
    pub fn chunk_of(&self, offset: u64) -> Option<ChunkInfo> {
        self.chunks
            .range(..=offset)
            .next_back()
            .map(|(_, c)| *c)
            .filter(|c| c.last >= offset)
    }

    pub fn chunks(&self) -> impl Iterator<Item = &ChunkInfo> {
        self.chunks.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first: u64, last: u64, sealed: bool) -> ChunkInfo {
        ChunkInfo {
            first,
            last,
            count: (last - first + 1) as u32,
            stored_bytes: 10,
            raw_bytes: 20,
            first_ts_ms: 0,
            last_ts_ms: 0,
            sealed,
        }
    }

    #[test]
    fn plans_start_at_the_chunk_holding_the_offset() {
        let mut index = LogIndex::new(1);
        index.insert(chunk(1, 10, true));
        index.insert(chunk(11, 20, true));
        index.insert(chunk(21, 22, false));
        let firsts = |p: Vec<ChunkInfo>| p.iter().map(|c| c.first).collect::<Vec<_>>();
        assert_eq!(firsts(index.plan(15, 3)), [11]);
        assert_eq!(firsts(index.plan(15, 8)), [11, 21]);
        assert_eq!(firsts(index.plan(1, 100)), [1, 11, 21]);
        assert!(index.plan(23, 5).is_empty());
        assert_eq!(index.stats().messages, 22);
        assert_eq!(index.tail().len(), 1);
        index.remove(1);
        assert_eq!(index.stats().first_offset, Some(11));
        assert_eq!(index.stats().bytes, 20);
    }
}
