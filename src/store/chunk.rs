//! Chunks: consecutive records of one log kept together in one sled value.
//!
//! sled keeps an in-memory node for every key, so a log of one key per message grows the
//! daemon's memory with every message ever logged. A log is therefore a sequence of chunks: each
//! group commit writes one *tail* chunk per log it touched, and once a log's tail chunks add up
//! to [`SEAL_RAW_BYTES`] they are merged into one *sealed* chunk, compressed. The number of keys
//! is then the log's size over the sealed chunk size, and retention removes whole chunks.
//!
//! Value layout: `u8 format | body`, the body plain ([`PLAIN`]) or LZ4-compressed with its
//! length prepended ([`LZ4`]). The body is a run of `varint (offset − first offset) | varint
//! length | record` ([`super::record`]), offsets increasing; a chunk may have holes where
//! offsets were removed (replayed dead letters).

use bytes::Bytes;

use super::record::{self, CorruptRecord};

pub(super) const PLAIN: u8 = 1;
pub(super) const LZ4: u8 = 2;

/// Tail chunks of a log are sealed into one once their records add up to this. Sealed chunks
/// are the unit of replay reads and of retention; 32 KiB keeps a read of one message cheap,
/// a sled leaf (16 chunks) within a sixteenth of a segment, and 10 M messages of 100 bytes to
/// ~60 k keys.
pub(super) const SEAL_RAW_BYTES: usize = 32 * 1024;

/// ... or once a log has this many tail chunks (a slow log commits one small chunk at a time).
pub(super) const SEAL_TAIL_CHUNKS: usize = 256;

/// No chunk is larger than this uncompressed: a seal adds tail chunks only until
/// [`SEAL_RAW_BYTES`] is passed, and one message is at most the largest payload the config allows.
const MAX_RAW_BYTES: usize = 256 * 1024 * 1024;

/// What the index knows of a chunk without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkInfo {
    pub first: u64,
    pub last: u64,
    pub count: u32,
    /// Size of the sled value (what the chunk takes on disk, before sled's own overhead).
    pub stored_bytes: u32,
    /// Size of the records before compression.
    pub raw_bytes: u32,
    pub first_ts_ms: u64,
    pub last_ts_ms: u64,
    pub sealed: bool,
}

const INFO_LEN: usize = 8 + 4 + 4 + 4 + 8 + 8;

impl ChunkInfo {
    /// The index entry's value (its key is `first`).
    pub fn encode(&self) -> [u8; INFO_LEN] {
        let mut out = [0u8; INFO_LEN];
        out[0..8].copy_from_slice(&self.last.to_be_bytes());
        out[8..12].copy_from_slice(&self.count.to_be_bytes());
        out[12..16].copy_from_slice(&self.stored_bytes.to_be_bytes());
        out[16..20].copy_from_slice(&self.raw_bytes.to_be_bytes());
        out[20..28].copy_from_slice(&self.first_ts_ms.to_be_bytes());
        out[28..36].copy_from_slice(&self.last_ts_ms.to_be_bytes());
        out
    }

    /// An index entry of a sealed chunk.
    pub fn decode(first: u64, value: &[u8]) -> Option<ChunkInfo> {
        if value.len() != INFO_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(value[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(value[i..i + 4].try_into().expect("4 bytes"));
        Some(ChunkInfo {
            first,
            last: u64_at(0),
            count: u32_at(8),
            stored_bytes: u32_at(12),
            raw_bytes: u32_at(16),
            first_ts_ms: u64_at(20),
            last_ts_ms: u64_at(28),
            sealed: true,
        })
    }
}

/// Collects records into a chunk.
#[derive(Default)]
pub(super) struct ChunkBuilder {
    first: u64,
    last: u64,
    count: u32,
    first_ts_ms: u64,
    last_ts_ms: u64,
    body: Vec<u8>,
}

impl ChunkBuilder {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn raw_len(&self) -> usize {
        self.body.len()
    }

    /// Adds an encoded record; offsets must increase.
    pub fn push(&mut self, offset: u64, record: &[u8]) {
        let ts = record::timestamp_ms(record).unwrap_or(0);
        if self.count == 0 {
            self.first = offset;
            self.first_ts_ms = ts;
        }
        debug_assert!(self.count == 0 || offset > self.last);
        put_varint(&mut self.body, offset - self.first);
        put_varint(&mut self.body, record.len() as u64);
        self.body.extend_from_slice(record);
        self.last = offset;
        self.last_ts_ms = self.last_ts_ms.max(ts);
        self.count += 1;
    }

    /// The chunk as a value, compressed when `sealed`.
    pub fn finish(self, sealed: bool) -> (ChunkInfo, Vec<u8>) {
        let raw_bytes = self.body.len() as u32;
        let value = if sealed {
            let compressed = lz4_flex::block::compress_prepend_size(&self.body);
            let mut value = Vec::with_capacity(1 + compressed.len());
            value.push(LZ4);
            value.extend_from_slice(&compressed);
            value
        } else {
            let mut value = Vec::with_capacity(1 + self.body.len());
            value.push(PLAIN);
            value.extend_from_slice(&self.body);
            value
        };
        let info = ChunkInfo {
            first: self.first,
            last: self.last,
            count: self.count,
            stored_bytes: value.len() as u32,
            raw_bytes,
            first_ts_ms: self.first_ts_ms,
            last_ts_ms: self.last_ts_ms,
            sealed,
        };
        (info, value)
    }
}

/// The records of a chunk value whose first offset is `first`: `(offset, record)` in order.
/// Each record shares the decoded body (no copy per record).
pub(super) fn records(first: u64, value: &[u8]) -> Result<Records, CorruptRecord> {
    let body = match value.split_first() {
        Some((&PLAIN, rest)) => Bytes::copy_from_slice(rest),
        Some((&LZ4, rest)) => {
            // The size is checked before anything is allocated for it.
            let (size, compressed) = rest
                .split_first_chunk::<4>()
                .ok_or(CorruptRecord::new("truncated chunk"))?;
            let size = u32::from_le_bytes(*size) as usize;
            if size > MAX_RAW_BYTES {
                return Err(CorruptRecord::new("chunk larger than any the writer makes"));
            }
            lz4_flex::block::decompress(compressed, size)
                .map(Bytes::from)
                .map_err(|_| CorruptRecord::new("chunk does not decompress"))?
        }
        Some(_) => return Err(CorruptRecord::new("unknown chunk format")),
        None => return Err(CorruptRecord::new("empty chunk")),
    };
    Ok(Records { first, body, at: 0 })
}

pub(super) struct Records {
    first: u64,
    body: Bytes,
    at: usize,
}

impl Iterator for Records {
    type Item = Result<(u64, Bytes), CorruptRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.body.len() {
            return None;
        }
        let item = (|| {
            let delta = get_varint(&self.body, &mut self.at)?;
            let len = usize::try_from(get_varint(&self.body, &mut self.at)?)
                .map_err(|_| CorruptRecord::new("record length overflow"))?;
            let end = self
                .at
                .checked_add(len)
                .filter(|&end| end <= self.body.len())
                .ok_or(CorruptRecord::new("truncated chunk"))?;
            let record = self.body.slice(self.at..end);
            self.at = end;
            let offset = self
                .first
                .checked_add(delta)
                .ok_or(CorruptRecord::new("offset overflow"))?;
            Ok((offset, record))
        })();
        if item.is_err() {
            // A corrupt chunk yields its error once, then ends.
            self.at = self.body.len();
        }
        Some(item)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, CorruptRecord> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes
            .get(*at)
            .ok_or(CorruptRecord::new("truncated chunk"))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CorruptRecord::new("varint overflow"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts: u64, payload: &[u8]) -> Vec<u8> {
        // A record's timestamp sits after its version byte; the rest is opaque here.
        let mut r = vec![1u8];
        r.extend_from_slice(&ts.to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn plain_and_sealed_chunks_give_back_their_records_with_holes() {
        for sealed in [false, true] {
            let mut b = ChunkBuilder::default();
            b.push(7, &record(100, b"a"));
            b.push(8, &record(105, b"bb"));
            b.push(300, &record(101, &[b'c'; 500]));
            let (info, value) = b.finish(sealed);
            assert_eq!((info.first, info.last, info.count), (7, 300, 3));
            assert_eq!((info.first_ts_ms, info.last_ts_ms), (100, 105));
            assert_eq!(info.stored_bytes as usize, value.len());
            assert_eq!(info.sealed, sealed);
            let got: Vec<_> = records(7, &value).unwrap().map(|r| r.unwrap()).collect();
            assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [7, 8, 300]);
            assert_eq!(&got[2].1[9..], &[b'c'; 500][..]);
            if sealed {
                assert!(value.len() < 200, "500 equal bytes compress");
            }
        }
    }

    #[test]
    fn index_entries_round_trip() {
        let mut b = ChunkBuilder::default();
        b.push(1, &record(5, b"x"));
        b.push(2, &record(9, b"y"));
        let (info, _) = b.finish(true);
        assert_eq!(ChunkInfo::decode(1, &info.encode()), Some(info));
        assert_eq!(ChunkInfo::decode(1, b"short"), None);
    }

    #[test]
    fn corrupt_chunks_are_errors_not_panics() {
        let mut b = ChunkBuilder::default();
        b.push(1, &record(5, b"hello"));
        let (_, value) = b.finish(false);
        for cut in 0..value.len() {
            if let Ok(rs) = records(1, &value[..cut]) {
                let _ = rs.collect::<Vec<_>>();
            }
        }
        assert!(records(1, &[9, 1, 2]).is_err());
        assert!(records(1, &[LZ4, 0xff, 0xff, 0xff, 0x7f, 1]).is_err());
        let truncated: Vec<_> = records(1, &value[..value.len() - 1]).unwrap().collect();
        assert!(truncated.last().unwrap().is_err());
    }
}
