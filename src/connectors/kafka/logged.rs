//! Records a starting consumer reads again that the log already holds.
//!
//! Offsets are stored only after the log flushed a record and committed once a second, so after
//! a crash the group resumes up to a second (more under load) behind the log, and those records
//! would be logged twice. The tail of each route's log says which records it holds — every
//! envelope carries its topic (the address), `kafka_partition`, `kafka_offset` and
//! `kafka_timestamp` — so a starting consumer recognises them and only stores their offsets.
//! At-least-once stays the rule: a record is skipped only when every route its topic feeds
//! holds that very record (same topic, partition, offset and timestamp: a topic deleted and
//! created again reuses offsets); anything else is logged as before.

use std::collections::{HashMap, HashSet};

use crate::hub::Hub;
use crate::routing::envelope::Delivered;
use crate::store::LogId;

/// How many of a log's newest messages are looked through. A crash leaves at most a commit
/// interval of records between the committed offsets and the log (about 1 s of traffic); past
/// 50,000 a second, the older part of that window is logged again.
const TAIL: u64 = 50_000;
/// Messages read per page while looking.
const PAGE: usize = 1_000;

/// One record's identity in a partition.
type Position = (String, i32);

/// What the tails of the group's logs hold, per partition. Each partition is dropped once a
/// record of it is not there: the records after it are new (a partition is read in order).
#[derive(Default)]
pub(super) struct AlreadyLogged {
    held: HashMap<Position, Partition>,
}

#[derive(Default)]
struct Partition {
    /// Offset → (timestamp, how many routes hold it).
    offsets: HashMap<i64, (Option<i64>, usize)>,
    /// Records recognised so far.
    passed: u64,
}

/// What [`AlreadyLogged::holds`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// In the log already: only its offset is stored.
    Held,
    /// Not in the log: it is logged.
    New,
    /// Not in the log, and the first such record of a partition after `passed` held ones.
    PastHeld { passed: u64 },
}

/// A logged Kafka record's identity, from its headers.
fn identity(message: &Delivered) -> Option<(Position, i64, Option<i64>)> {
    let header = |name: &str| message.envelope.header(name);
    let partition = header("kafka_partition")?.parse().ok()?;
    let offset = header("kafka_offset")?.parse().ok()?;
    let timestamp = header("kafka_timestamp").and_then(|t| t.parse().ok());
    Some((
        (message.envelope.address.clone(), partition),
        offset,
        timestamp,
    ))
}

impl AlreadyLogged {
    /// Looks through the newest messages (and dead letters) of each route in `routes`.
    pub(super) async fn scan(hub: &Hub, routes: impl IntoIterator<Item = (LogId, LogId)>) -> Self {
        let mut found = AlreadyLogged::default();
        for (log, dead_letters) in routes {
            // One count per route, whichever of its two logs holds the record.
            let mut in_route: HashSet<(Position, i64, Option<i64>)> = HashSet::new();
            for log in [log, dead_letters] {
                let Some(last) = hub.store().log_stats(&log).last_offset else {
                    continue;
                };
                let mut from = last.saturating_sub(TAIL - 1).max(1);
                while from <= last {
                    let Ok(page) = hub.store().read(&log, from, PAGE).await else {
                        // Unreadable now: what it holds is logged again, as without this.
                        break;
                    };
                    let Some(newest) = page.last() else { break };
                    from = newest.offset + 1;
                    in_route.extend(page.iter().filter_map(|m| identity(m)));
                }
            }
            for (position, offset, timestamp) in in_route {
                let entry = found
                    .held
                    .entry(position)
                    .or_default()
                    .offsets
                    .entry(offset)
                    .or_insert((timestamp, 0));
                if entry.0 == timestamp {
                    entry.1 += 1;
                }
            }
        }
        found
    }

    /// Whether the record is held by all `routes` routes its topic feeds: then it is not
    /// logged again. The first record of a partition that is not held ends the looking there.
    pub(super) fn holds(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        routes: usize,
    ) -> Verdict {
        let position = (topic.to_owned(), partition);
        let Some(held) = self.held.get_mut(&position) else {
            return Verdict::New;
        };
        match held.offsets.remove(&offset) {
            Some((t, n)) if t == timestamp && n == routes && routes > 0 => {
                held.passed += 1;
                Verdict::Held
            }
            _ => match self.held.remove(&position) {
                Some(Partition { passed, .. }) if passed > 0 => Verdict::PastHeld { passed },
                _ => Verdict::New,
            },
        }
    }

    /// Whether anything is left to look for.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(records: &[(&str, i32, i64, i64, usize)]) -> AlreadyLogged {
        let mut found = AlreadyLogged::default();
        for (topic, partition, offset, ts, routes) in records {
            found
                .held
                .entry((topic.to_string(), *partition))
                .or_default()
                .offsets
                .insert(*offset, (Some(*ts), *routes));
        }
        found
    }

    #[test]
    fn held_records_are_recognised_until_the_first_new_one() {
        let mut found = with(&[
            ("t", 0, 10, 100, 1),
            ("t", 0, 11, 101, 1),
            ("t", 1, 5, 50, 1),
        ]);
        assert_eq!(found.holds("t", 0, 10, Some(100), 1), Verdict::Held);
        // Offset 11 is held, but 12 comes first here: the partition is past the log.
        assert_eq!(
            found.holds("t", 0, 12, Some(102), 1),
            Verdict::PastHeld { passed: 1 }
        );
        assert_eq!(found.holds("t", 0, 11, Some(101), 1), Verdict::New);
        assert_eq!(found.holds("t", 1, 5, Some(50), 1), Verdict::Held);
        assert!(
            !found.is_empty(),
            "partition 1 has not moved past the log yet"
        );
        assert_eq!(
            found.holds("t", 1, 6, Some(60), 1),
            Verdict::PastHeld { passed: 1 }
        );
        assert!(found.is_empty());
    }

    #[test]
    fn a_record_some_route_lacks_or_another_with_the_same_offset_is_logged_again() {
        // Held by one of the two routes the topic feeds (a crash between their appends).
        let mut found = with(&[("t", 0, 10, 100, 1)]);
        assert_eq!(found.holds("t", 0, 10, Some(100), 2), Verdict::New);
        // The topic was created again: offset 10 is another record now.
        let mut found = with(&[("t", 0, 10, 100, 1)]);
        assert_eq!(found.holds("t", 0, 10, Some(999), 1), Verdict::New);
        // A topic the log never saw.
        assert_eq!(found.holds("u", 0, 10, Some(100), 1), Verdict::New);
    }
}
