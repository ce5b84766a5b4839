//! One segment: a `.log` file named by its base offset, with its `.idx` and
//! `.tix`. A segment is either sealed (read-only, truncated to its logical end)
//! or active (appended through a map by the log's writer). Readers see only the
//! published prefix, and every record they get has passed its CRC.

use super::index::{OffsetEntry, SegmentIndex};
use super::io::Mapping;
use super::record::{self, DecodeError, Frame, RecordRef};
use super::records::Records;
use crate::error::{Corruption, Error, IoContext, Result};
use bytes::Bytes;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Bytes a reader maps in one view; a record that crosses the view's end gets
/// a view of its own. Zero-copy on real maps, so this only bounds copying on
/// the simulated disk.
const READ_WINDOW: u64 = 1 << 20;

/// File name of a segment's log.
pub fn log_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The three files of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPaths {
    /// The `.log`.
    pub log: PathBuf,
    /// The `.idx`.
    pub idx: PathBuf,
    /// The `.tix`.
    pub tix: PathBuf,
}

impl SegmentPaths {
    /// Paths of the segment with `base` in `dir`.
    pub fn new(dir: &Path, base: u64) -> SegmentPaths {
        SegmentPaths {
            log: dir.join(log_name(base)),
            idx: dir.join(format!("{base:020}.idx")),
            tix: dir.join(format!("{base:020}.tix")),
        }
    }
}

/// Parses a segment base from a `.log` file name.
pub fn parse_log_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Limits of one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Most messages to return.
    pub max_messages: usize,
    /// Most record bytes to return (at least one message is always returned).
    pub max_bytes: usize,
}

/// The read side of a segment, shared by the writer and any number of readers.
#[derive(Debug)]
pub struct Segment {
    base: u64,
    paths: SegmentPaths,
    /// Readers read here. A sealed segment keeps no file open: the map
    /// outlives the descriptor it was made from.
    map: Arc<dyn Mapping>,
    index: RwLock<SegmentIndex>,
    /// Offset after the last published record (the base while empty).
    end_offset: AtomicU64,
    /// Offset of the first record, or `u64::MAX` while empty.
    first_offset: AtomicU64,
    /// Largest published timestamp (0 while empty).
    max_timestamp_ms: AtomicU64,
    max_record_len: u32,
    sealed: bool,
}

/// What a segment knows about its published content when it is (re)built.
#[derive(Debug, Clone, Copy)]
pub struct SegmentState {
    /// Offset after the last record.
    pub end_offset: u64,
    /// Offset of the first record, if any.
    pub first_offset: Option<u64>,
    /// Largest timestamp.
    pub max_timestamp_ms: u64,
}

impl Segment {
    /// Wraps a segment's map.
    pub fn new(
        base: u64,
        paths: SegmentPaths,
        map: Arc<dyn Mapping>,
        index: SegmentIndex,
        state: SegmentState,
        max_record_len: u32,
        sealed: bool,
    ) -> Segment {
        Segment {
            base,
            paths,
            map,
            index: RwLock::new(index),
            end_offset: AtomicU64::new(state.end_offset),
            first_offset: AtomicU64::new(state.first_offset.unwrap_or(u64::MAX)),
            max_timestamp_ms: AtomicU64::new(state.max_timestamp_ms),
            max_record_len,
            sealed,
        }
    }

    /// Base offset (the file name).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The segment's files.
    pub fn paths(&self) -> &SegmentPaths {
        &self.paths
    }

    /// The map readers read from.
    pub fn map(&self) -> &Arc<dyn Mapping> {
        &self.map
    }

    /// Whether the segment is sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Offset after the last published record.
    pub fn end_offset(&self) -> u64 {
        self.end_offset.load(Ordering::Acquire)
    }

    /// Offset of the first record, if any is published.
    pub fn first_offset(&self) -> Option<u64> {
        let first = self.first_offset.load(Ordering::Acquire);
        (first != u64::MAX && first < self.end_offset()).then_some(first)
    }

    /// Largest published timestamp.
    pub fn max_timestamp_ms(&self) -> u64 {
        self.max_timestamp_ms.load(Ordering::Acquire)
    }

    /// Published bytes.
    pub fn size(&self) -> u64 {
        self.map.published()
    }

    /// A copy of the in-memory index.
    pub fn index_snapshot(&self) -> SegmentIndex {
        self.read_index().clone()
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, SegmentIndex> {
        // The index is plain data; a writer that panicked mid-push leaves a valid
        // (if shorter) vector, so a poisoned lock is still safe to read.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the index under its read lock.
    pub fn with_index<T>(&self, f: impl FnOnce(&SegmentIndex) -> T) -> T {
        f(&self.read_index())
    }

    /// Runs `f` on the index under its write lock (the writer adds entries).
    pub fn with_index_mut<T>(&self, f: impl FnOnce(&mut SegmentIndex) -> T) -> T {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        f(&mut index)
    }

    /// Makes everything below `position` visible, up to `end_offset`.
    pub fn publish(&self, position: u64, end_offset: u64, first_offset: Option<u64>, max_ts: u64) {
        self.map.publish(position);
        if let Some(first) = first_offset {
            self.first_offset.fetch_min(first, Ordering::AcqRel);
        }
        self.max_timestamp_ms.fetch_max(max_ts, Ordering::AcqRel);
        self.end_offset.fetch_max(end_offset, Ordering::Release);
    }

    fn relative(&self, offset: u64) -> u32 {
        u32::try_from(offset.saturating_sub(self.base)).unwrap_or(u32::MAX)
    }

    /// Byte position to start scanning for `offset`: the index floor, checked
    /// against the log (a stale entry falls back to the segment start).
    fn start_position(&self, offset: u64) -> u64 {
        let entry = self.read_index().floor(self.relative(offset));
        self.checked_position(entry)
    }

    /// The position of `entry` if a valid record with the offset it names is
    /// there, else the segment start. Index files carry no checksum: a flipped
    /// bit in one must cost a longer scan, never a read error.
    fn checked_position(&self, entry: Option<OffsetEntry>) -> u64 {
        let Some(entry) = entry else {
            return 0;
        };
        let pos = u64::from(entry.position);
        let offset = self.base + u64::from(entry.relative);
        let published = self.map.published();
        let fetch = |len: u64| {
            (pos + len <= published)
                .then(|| self.map.bytes(pos, len).ok())
                .flatten()
        };
        let is_entry = |frame: Result<Frame<'_>, DecodeError>| match frame {
            Ok(Frame::Record(r)) => r.offset == offset && !r.is_filler(),
            _ => false,
        };
        let Some(header) = fetch(record::HEADER_LEN as u64) else {
            return 0;
        };
        let valid = match record::decode(&header, self.max_record_len) {
            Err(DecodeError::Incomplete { needed, .. }) => fetch(needed)
                .is_some_and(|bytes| is_entry(record::decode(&bytes, self.max_record_len))),
            frame => is_entry(frame),
        };
        if valid { pos } else { 0 }
    }

    /// Visits published records from byte `position` on, verifying each CRC.
    /// `f` sees each record with the view it lies in and where in that view
    /// it starts.
    pub fn scan_from<T>(
        &self,
        position: u64,
        mut f: impl FnMut(&RecordRef<'_>, usize, &Bytes) -> ControlFlow<T>,
    ) -> Result<Option<T>> {
        let published = self.map.published();
        let mut pos = position;
        let mut view_start = pos;
        let mut view = Bytes::new();
        while pos < published {
            // Refetch when the view cannot hold even a header here, unless it
            // already reaches the published end.
            if pos + record::HEADER_LEN as u64 > view_start + view.len() as u64
                && view_start + (view.len() as u64) < published
            {
                view = self.view(pos, (published - pos).min(READ_WINDOW))?;
                view_start = pos;
            }
            let view_end = view_start + view.len() as u64;
            let at = (pos - view_start) as usize;
            match record::decode(&view[at..], self.max_record_len) {
                Ok(Frame::Record(r)) => {
                    if let ControlFlow::Break(t) = f(&r, at, &view) {
                        return Ok(Some(t));
                    }
                    pos += u64::from(r.len);
                }
                Err(DecodeError::Incomplete { needed, .. })
                    if view_end < published && pos + needed <= published =>
                {
                    view = self.view(pos, (published - pos).min(READ_WINDOW.max(needed)))?;
                    view_start = pos;
                }
                Ok(Frame::End) => {
                    return Err(self.damage(
                        pos,
                        published,
                        "zero bytes inside written data".into(),
                    ));
                }
                Err(e) => return Err(self.damage(pos, published, e.to_string())),
            }
        }
        Ok(None)
    }

    fn view(&self, pos: u64, len: u64) -> Result<Bytes> {
        self.map
            .bytes(pos, len)
            .ctx(|| format!("reading {} at byte {pos}", self.paths.log.display()))
    }

    fn damage(&self, pos: u64, end: u64, detail: String) -> Error {
        Error::corruption(Corruption {
            file: self.paths.log.clone(),
            bytes: pos..end,
            offsets: None,
            detail: format!("{detail} (checked on read; `spool verify` reports the whole file)"),
        })
    }

    /// Appends to `out` the published records at or after `from`, within
    /// `limits` (counting `bytes_so_far` already returned). Returns the bytes added.
    pub fn read(
        &self,
        from: u64,
        limits: ReadLimits,
        bytes_so_far: usize,
        out: &mut Records,
    ) -> Result<usize> {
        let end_offset = self.end_offset();
        if from >= end_offset || out.len() >= limits.max_messages {
            return Ok(0);
        }
        let mut added = 0usize;
        let start = self.start_position(from);
        self.scan_from(start, |r, at, view| {
            if r.offset >= end_offset {
                return ControlFlow::Break(());
            }
            if r.is_filler() || r.offset < from {
                return ControlFlow::Continue(());
            }
            let total = bytes_so_far + added + r.len as usize;
            if out.len() >= limits.max_messages || (!out.is_empty() && total > limits.max_bytes) {
                return ControlFlow::Break(());
            }
            out.push(r, view, at);
            added += r.len as usize;
            // Stop here rather than decode a record nobody asked for (which
            // would fail the read if that record is damaged).
            if out.len() >= limits.max_messages {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        Ok(added)
    }

    /// Offset of the first record with a timestamp ≥ `ts`, if this segment has one.
    pub fn find_timestamp(&self, ts: u64) -> Result<Option<u64>> {
        if self.max_timestamp_ms() < ts {
            return Ok(None);
        }
        let end_offset = self.end_offset();
        let entry = {
            let index = self.read_index();
            index.floor(index.time_floor(ts).unwrap_or(0))
        };
        let start = self.checked_position(entry);
        self.scan_from(start, |r, _, _| {
            if r.offset >= end_offset {
                ControlFlow::Break(None)
            } else if !r.is_filler() && r.timestamp_ms >= ts {
                ControlFlow::Break(Some(r.offset))
            } else {
                ControlFlow::Continue(())
            }
        })
        .map(Option::flatten)
    }
}
