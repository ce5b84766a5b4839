//! Sparse offset and time indexes of one segment, kept in memory and persisted
//! beside the `.log`. Both are hints, rebuildable from the log: a reader checks
//! what it finds at an indexed position, and recovery drops entries that do not
//! match the log.
//!
//! `.idx` entry, 8 bytes: `relative_offset: u32 LE` (offset − segment base),
//! `position: u32 LE` (byte position of that record in the `.log`).
//!
//! `.tix` entry, 16 bytes: `max_timestamp_ms: u64 LE`, `relative_offset: u32 LE`:
//! every record *before* that offset has a timestamp ≤ `max_timestamp_ms`;
//! then `crc32: u32 LE` of the segment's base (u64 LE) followed by those 12
//! bytes, so an entry of another segment's `.tix` fails it too. Timestamps in the time index never
//! decrease. Unlike an offset entry, which a reader checks against the record
//! it points at, a time entry's maximum cannot be checked without reading
//! everything before it: a wrong one would make a lookup start past the
//! records it is after, so each entry carries its own checksum.

/// Bytes per `.idx` entry.
pub const OFFSET_ENTRY_LEN: usize = 8;
/// Bytes per `.tix` entry.
pub const TIME_ENTRY_LEN: usize = 16;
/// Bytes of a `.tix` entry its checksum covers.
const TIME_FIELDS_LEN: usize = 12;

/// One offset index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Offset relative to the segment base.
    pub relative: u32,
    /// Byte position of the record in the log file.
    pub position: u32,
}

/// One time index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    /// Largest timestamp of any record before `relative`.
    pub max_timestamp_ms: u64,
    /// Offset relative to the segment base.
    pub relative: u32,
}

/// The in-memory indexes of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
}

impl SegmentIndex {
    /// The offset entries, ascending.
    pub fn offset_entries(&self) -> &[OffsetEntry] {
        &self.offsets
    }

    /// The time entries, ascending.
    pub fn time_entries(&self) -> &[TimeEntry] {
        &self.times
    }

    /// Adds an offset entry; ignored unless it is past the last one.
    pub fn push_offset(&mut self, entry: OffsetEntry) -> bool {
        let ok = self
            .offsets
            .last()
            .is_none_or(|l| entry.relative > l.relative && entry.position > l.position);
        if ok {
            self.offsets.push(entry);
        }
        ok
    }

    /// Adds a time entry; ignored unless both fields grow.
    pub fn push_time(&mut self, entry: TimeEntry) -> bool {
        let ok = self.times.last().is_none_or(|l| {
            entry.max_timestamp_ms > l.max_timestamp_ms && entry.relative > l.relative
        });
        if ok {
            self.times.push(entry);
        }
        ok
    }

    /// The last indexed entry at or before `relative` (O(log n)).
    pub fn floor(&self, relative: u32) -> Option<OffsetEntry> {
        let i = self.offsets.partition_point(|e| e.relative <= relative);
        i.checked_sub(1).map(|i| self.offsets[i])
    }

    /// The relative offset from which to scan for the first record with a
    /// timestamp ≥ `ts`: the last time entry whose maximum is still below `ts`
    /// (every record before it is older). O(log n).
    pub fn time_floor(&self, ts: u64) -> Option<u32> {
        let i = self.times.partition_point(|e| e.max_timestamp_ms < ts);
        i.checked_sub(1).map(|i| self.times[i].relative)
    }

    /// Drops every entry at or past `relative` / `position` (after a log cut).
    pub fn truncate(&mut self, relative: u32, position: u32) {
        self.offsets
            .retain(|e| e.relative < relative && e.position < position);
        self.times.retain(|e| e.relative < relative);
    }

    /// Encodes the offset entries from `from` on, as stored in `.idx`.
    pub fn encode_offsets(&self, from: usize) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.offsets.len().saturating_sub(from) * OFFSET_ENTRY_LEN);
        for e in self.offsets.iter().skip(from) {
            out.extend_from_slice(&e.relative.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        out
    }

    /// Encodes the time entries from `from` on, as stored in the `.tix` of
    /// the segment whose base is `base`.
    pub fn encode_times(&self, base: u64, from: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len().saturating_sub(from) * TIME_ENTRY_LEN);
        for e in self.times.iter().skip(from) {
            let at = out.len();
            out.extend_from_slice(&e.max_timestamp_ms.to_le_bytes());
            out.extend_from_slice(&e.relative.to_le_bytes());
            let crc = time_entry_crc(base, &out[at..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// The first entry of the `.tix` of segment `base` whose checksum
    /// fails, if any (entries from it on are not trusted; see
    /// [`SegmentIndex::decode`]).
    pub fn first_damaged_time_entry(tix: &[u8], base: u64) -> Option<usize> {
        tix.chunks_exact(TIME_ENTRY_LEN).position(|chunk| {
            let (fields, crc) = chunk.split_at(TIME_FIELDS_LEN);
            time_entry_crc(base, fields).to_le_bytes() != crc
        })
    }

    /// Parses stored index files. Returns `None` when they are not well formed
    /// (odd length, entries out of order): the caller rebuilds from the log.
    /// Time entries end before the first whose checksum fails (a file of an
    /// older format, without checksums, keeps none): the caller's scan
    /// restores them.
    pub fn decode(idx: &[u8], tix: &[u8], base: u64) -> Option<SegmentIndex> {
        if !idx.len().is_multiple_of(OFFSET_ENTRY_LEN) || !tix.len().is_multiple_of(TIME_ENTRY_LEN)
        {
            return None;
        }
        let mut index = SegmentIndex::default();
        for chunk in idx.chunks_exact(OFFSET_ENTRY_LEN) {
            let entry = OffsetEntry {
                relative: u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
                position: u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
            };
            if !index.push_offset(entry) {
                return None;
            }
        }
        let intact =
            Self::first_damaged_time_entry(tix, base).unwrap_or(tix.len() / TIME_ENTRY_LEN);
        for chunk in tix.chunks_exact(TIME_ENTRY_LEN).take(intact) {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&chunk[..8]);
            let entry = TimeEntry {
                max_timestamp_ms: u64::from_le_bytes(ts),
                relative: u32::from_le_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]),
            };
            if !index.push_time(entry) {
                return None;
            }
        }
        Some(index)
    }
}

/// The checksum of a `.tix` entry's `fields` in the segment whose base is
/// `base`.
fn time_entry_crc(base: u64, fields: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&base.to_le_bytes());
    crc.update(fields);
    crc.finalize()
}

/// Decides where index entries go while records are appended or scanned; the
/// writer and recovery share it so a rebuilt index equals the one written.
#[derive(Debug, Clone, Copy)]
pub struct IndexBuilder {
    interval: u64,
    since_last: u64,
    max_timestamp_ms: u64,
    has_entry: bool,
}

impl IndexBuilder {
    /// A builder for an empty segment, with an entry every `interval` bytes.
    pub fn new(interval: u32) -> IndexBuilder {
        IndexBuilder {
            interval: u64::from(interval.max(1)),
            since_last: 0,
            max_timestamp_ms: 0,
            has_entry: false,
        }
    }

    /// A builder that continues after the last entry of `index`, positioned at
    /// that entry's record (the next observed record is the indexed one).
    pub fn resume(interval: u32, index: &SegmentIndex) -> IndexBuilder {
        let mut builder = IndexBuilder::new(interval);
        builder.has_entry = !index.offsets.is_empty();
        // Entries are added wherever the maximum grew, so the last time entry
        // holds the maximum of every record before the last offset entry.
        builder.max_timestamp_ms = index.times.last().map_or(0, |t| t.max_timestamp_ms);
        builder
    }

    /// Largest timestamp observed (or resumed from).
    pub fn max_timestamp_ms(&self) -> u64 {
        self.max_timestamp_ms
    }

    /// Accounts for the record at `position`, adding entries when one is due.
    /// Filler records take space but get no entry.
    pub fn observe(
        &mut self,
        index: &mut SegmentIndex,
        relative: u32,
        position: u32,
        timestamp_ms: u64,
        len: u32,
        filler: bool,
    ) {
        if !filler && (!self.has_entry || self.since_last >= self.interval) {
            index.push_offset(OffsetEntry { relative, position });
            if self.max_timestamp_ms > index.times.last().map_or(0, |t| t.max_timestamp_ms) {
                index.push_time(TimeEntry {
                    max_timestamp_ms: self.max_timestamp_ms,
                    relative,
                });
            }
            self.has_entry = true;
            self.since_last = 0;
        }
        self.since_last += u64::from(len);
        if !filler {
            self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trip(steps in proptest::collection::vec((1u32..100, 1u32..5000, 0u64..50), 0..60)) {
            let mut index = SegmentIndex::default();
            let (mut rel, mut pos, mut ts) = (0u32, 0u32, 0u64);
            for (dr, dp, dt) in steps {
                rel += dr; pos += dp; ts += dt;
                index.push_offset(OffsetEntry { relative: rel, position: pos });
                index.push_time(TimeEntry { max_timestamp_ms: ts, relative: rel });
            }
            let back = SegmentIndex::decode(&index.encode_offsets(0), &index.encode_times(7, 0), 7);
            prop_assert_eq!(back, Some(index));
        }

        #[test]
        fn floor_is_the_last_entry_not_after(rels in proptest::collection::btree_set(0u32..10_000, 1..50), probe in 0u32..11_000) {
            let mut index = SegmentIndex::default();
            for (i, r) in rels.iter().enumerate() {
                index.push_offset(OffsetEntry { relative: *r, position: i as u32 * 10 });
            }
            let expected = rels.iter().rev().find(|r| **r <= probe).copied();
            prop_assert_eq!(index.floor(probe).map(|e| e.relative), expected);
        }
    }

    #[test]
    fn out_of_order_files_are_rejected() {
        let mut bytes = Vec::new();
        for (rel, pos) in [(5u32, 100u32), (3, 200)] {
            bytes.extend_from_slice(&rel.to_le_bytes());
            bytes.extend_from_slice(&pos.to_le_bytes());
        }
        assert_eq!(SegmentIndex::decode(&bytes, &[], 0), None);
        assert_eq!(SegmentIndex::decode(&bytes[..7], &[], 0), None);
    }

    #[test]
    fn time_floor_finds_where_older_records_end() {
        let mut index = SegmentIndex::default();
        index.push_time(TimeEntry {
            max_timestamp_ms: 100,
            relative: 10,
        });
        index.push_time(TimeEntry {
            max_timestamp_ms: 200,
            relative: 20,
        });
        assert_eq!(index.time_floor(50), None);
        assert_eq!(index.time_floor(150), Some(10));
        assert_eq!(index.time_floor(201), Some(20));
    }
}
