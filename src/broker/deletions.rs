//! A topic's explicit deletions: the set of deleted offsets, and the journal
//! (`deletes.journal` / `deletes.snap`) that keeps it. The set only grows,
//! except where compaction removed the records it names.
//!
//! Each journal entry, and the snapshot, is a list of ranges, little-endian:
//!
//! | bytes | field  | meaning                       |
//! |-------|--------|-------------------------------|
//! | 8     | `from` | first deleted offset          |
//! | 8     | `to`   | one past the last (exclusive) |
//!
//! repeated; an entry that is not whole 16-byte pairs is damage.

use crate::error::{Corruption, Error, Result};
use crate::groups::journal::Payloads;
use crate::groups::{Journal, JournalRecovery, RangeSet, SyncWait};
use crate::storage::io::Storage;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Name of the deletions journal in a topic's folder.
pub const DELETES_JOURNAL: &str = "deletes";
/// Bytes of one encoded range.
const RANGE_LEN: usize = 16;

/// The deleted offsets of a topic, durable in their journal.
#[derive(Debug)]
pub struct Deletions {
    set: RangeSet,
    journal: Journal,
}

impl Deletions {
    /// Opens (creating if needed) the deletions of the topic in `dir`.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path, recovery: JournalRecovery) -> Result<Self> {
        let recovery = JournalRecovery {
            payloads: Some(PAYLOADS),
            ..recovery
        };
        let (journal, replayed) = Journal::open_checked(storage, dir, DELETES_JOURNAL, recovery)?;
        let mut set = RangeSet::new();
        for payload in replayed.snapshot.iter().chain(&replayed.entries) {
            decode(payload, &mut set).ok_or_else(|| malformed(dir))?;
        }
        Ok(Deletions { set, journal })
    }

    /// The deleted offsets.
    pub fn set(&self) -> &RangeSet {
        &self.set
    }

    /// Whether `offset` is deleted.
    pub fn contains(&self, offset: u64) -> bool {
        self.set.contains(offset)
    }

    /// Journals `ranges` as deleted, then adds them to the set (so nothing
    /// reads a deletion before it is journaled). Durable once synced
    /// ([`Deletions::sync`], [`Deletions::wait_durable`]).
    pub fn record(&mut self, ranges: &[Range<u64>]) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.journal.append(&encode(ranges.iter().cloned()))?;
        for r in ranges {
            self.set.insert_range(r.clone());
        }
        // Only compaction prunes deletions: without snapshots of its own,
        // a topic taking deletes and never compacted would grow its
        // journal without bound. The deletion itself is journaled already,
        // so a snapshot that fails (a full disk) is tried again later.
        if self.journal.entries_since_snapshot() >= crate::groups::SNAPSHOT_EVERY {
            match self.journal.sync() {
                Ok(()) => self
                    .journal
                    .snapshot_when_possible(&encode(self.set.iter()))?,
                Err(e) => {
                    tracing::debug!(error = %e, "could not sync the deletions for their snapshot; tried again at the next one");
                }
            }
        }
        Ok(())
    }

    /// Forgets deletions below `below` (compaction removed their records),
    /// durably: the journal is replaced by a snapshot of what is left.
    pub fn prune_below(&mut self, below: u64) -> Result<()> {
        self.set.remove_below(below);
        self.journal.sync()?;
        self.journal.snapshot(&encode(self.set.iter()))
    }

    /// Whether a failed sync made the journal read-only.
    pub fn is_read_only(&self) -> bool {
        self.journal.is_read_only()
    }

    /// Whether every recorded deletion is durable.
    pub fn is_synced(&self) -> bool {
        self.journal.is_synced()
    }

    /// Makes every recorded deletion durable.
    pub fn sync(&mut self) -> Result<()> {
        self.journal.sync()
    }

    /// Waits, if any recorded deletion is not durable yet, until all are (a
    /// sync shared with other waiters).
    pub fn wait_durable(&self) -> Result<()> {
        if self.is_synced() {
            return Ok(());
        }
        self.sync_later().wait()
    }

    /// What to wait on, after letting go of the deletions' lock, for every
    /// recorded deletion to be durable (a sync shared with other waiters).
    pub fn sync_later(&self) -> SyncWait {
        self.journal.sync_later()
    }

    /// The journal's recovery point (see [`Journal::recovery_point`]).
    pub fn recovery_point(&self) -> (u64, u64) {
        self.journal.recovery_point()
    }
}

/// The one encoder of deletion ranges (see the module's byte table).
fn encode(ranges: impl Iterator<Item = Range<u64>>) -> Vec<u8> {
    let mut payload = Vec::new();
    for r in ranges {
        payload.extend_from_slice(&r.start.to_le_bytes());
        payload.extend_from_slice(&r.end.to_le_bytes());
    }
    payload
}

/// How the deletions journal's payloads parse: entries and snapshot alike
/// are whole ranges (see [`Payloads`]).
pub(crate) const PAYLOADS: Payloads = Payloads {
    entry: ranges_parse,
    snapshot: ranges_parse,
    referenced_end,
};

/// The end of the last deleted range: deleted offsets were handed out.
fn referenced_end(snapshot: Option<&[u8]>, entries: &[&[u8]]) -> u64 {
    let mut set = RangeSet::new();
    for payload in snapshot.iter().chain(entries) {
        let _ = decode(payload, &mut set);
    }
    set.iter().last().map_or(0, |r| r.end)
}

fn ranges_parse(payload: &[u8]) -> std::result::Result<(), String> {
    if payload.len().is_multiple_of(RANGE_LEN) {
        return Ok(());
    }
    Err(format!(
        "{} bytes are not whole {RANGE_LEN}-byte [from, to) pairs",
        payload.len()
    ))
}

/// The one decoder: adds the ranges of `payload` to `set`; `None` when it is
/// not whole pairs.
fn decode(payload: &[u8], set: &mut RangeSet) -> Option<()> {
    if !payload.len().is_multiple_of(RANGE_LEN) {
        return None;
    }
    for chunk in payload.chunks_exact(RANGE_LEN) {
        let (from, to) = chunk.split_at(8);
        let from = u64::from_le_bytes(from.try_into().ok()?);
        let to = u64::from_le_bytes(to.try_into().ok()?);
        set.insert_range(from..to);
    }
    Some(())
}

fn malformed(dir: &Path) -> Error {
    Error::corruption(Corruption {
        file: dir.join(format!("{DELETES_JOURNAL}.journal")),
        bytes: 0..0,
        offsets: None,
        detail: "a deletion entry passed its checksum but is not whole [from, to) pairs".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_round_trip(ranges in proptest::collection::vec((0u64..1000, 1u64..50), 0..20)) {
            let ranges: Vec<Range<u64>> = ranges.into_iter().map(|(a, n)| a..a + n).collect();
            let mut want = RangeSet::new();
            for r in &ranges {
                want.insert_range(r.clone());
            }
            let mut got = RangeSet::new();
            prop_assert_eq!(decode(&encode(ranges.into_iter()), &mut got), Some(()));
            prop_assert_eq!(got, want);
        }
    }

    /// A topic that takes deletes and is never compacted (the only pruning)
    /// keeps its journal short: a snapshot every `SNAPSHOT_EVERY` entries,
    /// with every deletion there after a reopen.
    #[test]
    fn deletions_take_snapshots_of_their_own() {
        let disk = Arc::new(crate::storage::io::SimDisk::new());
        let dir = Path::new("/t");
        let open = || {
            Deletions::open(
                Arc::clone(&disk) as Arc<dyn Storage>,
                dir,
                JournalRecovery::default(),
            )
            .expect("open")
        };
        let mut d = open();
        let n = crate::groups::SNAPSHOT_EVERY + 5;
        for i in 0..n {
            d.record(std::slice::from_ref(&(2 * i..2 * i + 1)))
                .expect("record");
        }
        assert!(
            d.journal.entries_since_snapshot() < crate::groups::SNAPSHOT_EVERY,
            "{} entries since the last snapshot",
            d.journal.entries_since_snapshot()
        );
        d.sync().expect("sync");
        drop(d);
        let d = open();
        assert_eq!(d.set().count_in(0..2 * n), n);
        assert!(d.contains(2 * (n - 1)) && !d.contains(1));
    }

    #[test]
    fn a_payload_of_broken_pairs_does_not_decode() {
        let mut set = RangeSet::new();
        assert_eq!(decode(&[0u8; 17], &mut set), None);
    }
}
