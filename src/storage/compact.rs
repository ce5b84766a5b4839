//! Compaction: reclaim the bytes of records nobody needs from sealed
//! segments without changing any offset. The active segment is never
//! rewritten.
//!
//! A sealed segment with nothing live is deleted whole. Otherwise runs of
//! adjacent sealed segments whose live records fit in one segment
//! (`segment_bytes`) are merged, and a lone segment with dead records is
//! rewritten: the live records are copied verbatim (offsets and checksums
//! unchanged) into one new file that replaces the run's segments by a
//! protocol that survives a crash at any step:
//!
//! 1. write `<base>.log.cleaned`, fdatasync (`<base>` is the run's first
//!    segment);
//! 2. rename it to `<base>.log.<until>.swap`, fsync the directory (`<until>`
//!    is the base of the segment after the run: the copy covers every offset
//!    below it);
//! 3. remove the old `.idx`/`.tix` of `<base>` (hints; rebuilt from the new
//!    log) and every file of the run's other segments;
//! 4. rename the `.swap` over `<base>.log` (this retires the old file in one
//!    atomic step), fsync the directory;
//! 5. open the new segment (building its index) and swap it into the log.
//!
//! On open, a leftover `.cleaned` is removed (the swap never started) and a
//! leftover `.swap` is completed from step 3 on (it is durable and complete),
//! unless `<base>.log` is gone — retention removed the run meanwhile, and the
//! copy is dropped. Readers holding an old segment keep their view of the old
//! file until they let go.

use super::RecoveryMode;
use super::io::OpenMode;
use super::log::{Log, sealed_segment};
use super::record::{self, Frame};
use super::recovery::{self, CLEANED_SUFFIX, RecoveryReport, retire, swap_path, with_suffix};
use super::segment::{Segment, SegmentPaths};
use crate::error::{Corruption, Error, IoContext, Result};
use serde::Serialize;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// Bytes copied per write while rewriting.
const COPY_CHUNK: usize = 1 << 20;

/// A record as the keep-or-drop decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct RecordInfo<'a> {
    /// Its offset.
    pub offset: u64,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Its key, if any.
    pub key: Option<&'a [u8]>,
    /// Length of its value (0 for a tombstone when it has a key).
    pub value_len: usize,
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactStats {
    /// Bytes of sealed segments examined.
    pub bytes_before: u64,
    /// Bytes they hold afterwards.
    pub bytes_after: u64,
    /// Records kept.
    pub records_kept: u64,
    /// Records removed.
    pub records_removed: u64,
    /// Segments rewritten with only their live records.
    pub segments_rewritten: u64,
    /// Segments deleted because nothing in them was live.
    pub segments_deleted: u64,
    /// Of the segments rewritten, those merged into the one before them.
    pub segments_merged: u64,
    /// Wall time taken, in milliseconds.
    pub millis: u64,
}

/// A sealed segment as one compaction pass sees it: where its live records
/// are.
struct Scanned {
    segment: Arc<Segment>,
    /// Byte ranges of live records (adjacent ones joined).
    kept: Vec<Range<usize>>,
    /// Live records.
    live: u64,
    /// Records to remove.
    removed: u64,
}

impl Scanned {
    fn live_bytes(&self) -> u64 {
        self.kept.iter().map(|r| r.len() as u64).sum()
    }

    /// Reads every record of `segment`, asking `keep` about each.
    fn new(segment: &Arc<Segment>, keep: &dyn Fn(&RecordInfo<'_>) -> bool) -> Result<Scanned> {
        let size = segment.size();
        let data = segment
            .map()
            .bytes(0, size)
            .ctx(|| format!("reading {}", segment.paths().log.display()))?;
        let (mut kept, mut live_records, mut removed) = (Vec::<Range<usize>>::new(), 0u64, 0u64);
        let mut pos = 0usize;
        while pos < data.len() {
            let r = match record::decode(&data[pos..], u32::MAX) {
                Ok(Frame::Record(r)) => r,
                other => {
                    // The record's own bytes when its header is plausible.
                    let end = record::claimed_len(&data[pos..], u32::MAX)
                        .map_or(data.len(), |len| pos + len);
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "zeros where a record belongs".to_owned(),
                    };
                    return Err(Error::corruption(Corruption {
                        file: segment.paths().log.clone(),
                        bytes: pos as u64..end as u64,
                        offsets: None,
                        detail: format!(
                            "compaction found a record that does not validate ({why}); \
                             the pass stops there and leaves this segment as it was"
                        ),
                    }));
                }
            };
            let len = r.len as usize;
            let live = !r.is_filler()
                && keep(&RecordInfo {
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms,
                    key: r.key,
                    value_len: r.value.len(),
                });
            if !live {
                removed += 1;
            } else {
                live_records += 1;
                match kept.last_mut() {
                    // Adjacent live records are copied as one range.
                    Some(last) if last.end == pos => last.end = pos + len,
                    _ => kept.push(pos..pos + len),
                }
            }
            pos += len;
        }
        Ok(Scanned {
            segment: Arc::clone(segment),
            kept,
            live: live_records,
            removed,
        })
    }
}

/// How much of a log's sealed data compaction would remove.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dirt {
    /// Bytes of sealed segments.
    pub sealed_bytes: u64,
    /// Of those, bytes of records compaction would remove.
    pub removable_bytes: u64,
}

impl Dirt {
    /// Removable share of the sealed bytes (0 when nothing is sealed).
    pub fn ratio(&self) -> f64 {
        if self.sealed_bytes == 0 {
            0.0
        } else {
            self.removable_bytes as f64 / self.sealed_bytes as f64
        }
    }
}

impl Log {
    /// Measures, without changing anything, what [`Log::compact`] with the
    /// same `keep` would remove.
    pub fn dirt(&self, keep: &dyn Fn(&RecordInfo<'_>) -> bool) -> Result<Dirt> {
        let segments = self.segments();
        let mut dirt = Dirt::default();
        for segment in &segments[..segments.len().saturating_sub(1)] {
            self.check_compaction_goes_on()?;
            let scanned = Scanned::new(segment, keep)?;
            dirt.sealed_bytes += segment.size();
            dirt.removable_bytes += segment.size() - scanned.live_bytes();
        }
        Ok(dirt)
    }

    /// Removes from sealed segments every record `keep` rejects, and merges
    /// runs of adjacent sealed segments whose live records fit in one segment.
    /// Offsets of the records kept never change. `progress` gets the bytes
    /// examined so far.
    pub fn compact(
        &self,
        keep: &dyn Fn(&RecordInfo<'_>) -> bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactStats> {
        self.compact_pass(keep, false, progress)
    }

    /// [`Log::compact`] where no record hides another (`keep` judges each
    /// record on its own: deletions and consumption, no keys): a copy that
    /// finds the disk full leaves its run as it was and the pass goes on,
    /// so it still removes the segments with nothing live after it, which
    /// need no room. (Where a record may hide one in an earlier segment,
    /// removing it while the hidden one stays would bring that one back: the
    /// pass stops at the first copy it cannot write.)
    pub fn compact_independent(
        &self,
        keep: &dyn Fn(&RecordInfo<'_>) -> bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactStats> {
        self.compact_pass(keep, true, progress)
    }

    fn compact_pass(
        &self,
        keep: &dyn Fn(&RecordInfo<'_>) -> bool,
        independent: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactStats> {
        let _pass = self.lock_compaction();
        self.check_compaction_goes_on()?;
        let started = Instant::now();
        let mut stats = CompactStats::default();
        let segments = self.segments();
        let Some((active, sealed)) = segments.split_last() else {
            return Ok(stats);
        };
        let target = self.config().segment_bytes;
        let mut run: Vec<Scanned> = Vec::new();
        let mut run_live = 0u64;
        for segment in sealed {
            self.check_compaction_goes_on()?;
            let scanned = Scanned::new(segment, keep)?;
            stats.bytes_before += segment.size();
            stats.records_kept += scanned.live;
            stats.records_removed += scanned.removed;
            progress(stats.bytes_before);
            if scanned.kept.is_empty() {
                // The cheap path: nothing to copy. The run before it goes
                // first: this segment may hold what hides a record there (a
                // key's newer record or tombstone), and removing it while
                // that record stays would bring the record back.
                self.rewrite_run(
                    std::mem::take(&mut run),
                    segment.base(),
                    independent,
                    &mut stats,
                )?;
                run_live = 0;
                if self.delete_sealed(segment)? {
                    stats.segments_deleted += 1;
                } else {
                    stats.bytes_after += segment.size();
                }
                continue;
            }
            let live = scanned.live_bytes();
            // Index entries hold offsets relative to the segment base as u32.
            let offsets_fit = run.first().is_none_or(|first| {
                segment.end_offset() - first.segment.base() <= u64::from(u32::MAX)
            });
            if !run.is_empty() && (run_live + live > target || !offsets_fit) {
                self.rewrite_run(
                    std::mem::take(&mut run),
                    segment.base(),
                    independent,
                    &mut stats,
                )?;
                run_live = 0;
            }
            run_live += live;
            run.push(scanned);
        }
        self.rewrite_run(run, active.base(), independent, &mut stats)?;
        stats.millis = started.elapsed().as_millis() as u64;
        if stats.records_removed > 0 || stats.segments_merged > 0 {
            // The broker or the admin command says what it did.
            tracing::debug!(log = %self.dir().display(), ?stats, "compacted");
        }
        Ok(stats)
    }

    /// Deletes a sealed segment with nothing live; false if it went away
    /// meanwhile (retention).
    fn delete_sealed(&self, segment: &Arc<Segment>) -> Result<bool> {
        if !self.swap_sealed_segments(&[segment.base()], false, || Ok(None))? {
            return Ok(false);
        }
        self.remove_dropped(std::slice::from_ref(segment))?;
        Ok(true)
    }

    /// Replaces a run of adjacent sealed segments (the next one starting at
    /// `until`) with one holding only their live records; a lone segment with
    /// nothing to remove is left as it is.
    /// With `skip_when_full`, a copy the disk has no room for leaves the run
    /// as it was (logged) rather than failing the pass.
    fn rewrite_run(
        &self,
        run: Vec<Scanned>,
        until: u64,
        skip_when_full: bool,
        stats: &mut CompactStats,
    ) -> Result<()> {
        let size: u64 = run.iter().map(|s| s.segment.size()).sum();
        let unchanged = match run.as_slice() {
            [] => return Ok(()),
            [only] => only.removed == 0,
            _ => false,
        };
        if unchanged {
            stats.bytes_after += size;
            return Ok(());
        }
        match self.rewrite(&run, until, skip_when_full)? {
            Some(new_size) => {
                stats.bytes_after += new_size;
                stats.segments_rewritten += run.len() as u64;
                stats.segments_merged += run.len() as u64 - 1;
            }
            None => {
                // Left as it was (no room to copy it): what its scan counted
                // as removed stays. (A run retention took meanwhile is gone.)
                let base = run.first().map(|s| s.segment.base());
                if self.segments().iter().any(|s| Some(s.base()) == base) {
                    let stayed: u64 = run.iter().map(|s| s.removed).sum();
                    stats.records_removed -= stayed;
                    stats.records_kept += stayed;
                }
                stats.bytes_after += size;
            }
        }
        Ok(())
    }

    /// Writes the live records of `run` (`total` bytes) into `file` (the
    /// copy at `cleaned`) and syncs it.
    fn copy_live(
        file: &dyn crate::storage::io::StorageFile,
        run: &[Scanned],
        total: u64,
        cleaned: &std::path::Path,
    ) -> Result<()> {
        file.allocate(total)
            .ctx(|| format!("reserving space for {}", cleaned.display()))?;
        let mut buf = Vec::with_capacity(COPY_CHUNK.min(total as usize));
        let mut at = 0u64;
        for scanned in run {
            let segment = &scanned.segment;
            let data = segment
                .map()
                .bytes(0, segment.size())
                .ctx(|| format!("reading {}", segment.paths().log.display()))?;
            for range in &scanned.kept {
                buf.extend_from_slice(&data[range.clone()]);
                if buf.len() >= COPY_CHUNK {
                    file.write_at(at, &buf)
                        .ctx(|| format!("writing {}", cleaned.display()))?;
                    at += buf.len() as u64;
                    buf.clear();
                }
            }
        }
        file.write_at(at, &buf)
            .ctx(|| format!("writing {}", cleaned.display()))?;
        file.sync_data()
            .ctx(|| format!("syncing {}", cleaned.display()))
    }

    /// Copies the live records of `run` into a new file and swaps it in for
    /// the run's segments. Returns the new size, or `None` if a segment of
    /// the run went away meanwhile (retention).
    fn rewrite(&self, run: &[Scanned], until: u64, skip_when_full: bool) -> Result<Option<u64>> {
        let Some(first) = run.first() else {
            return Ok(None);
        };
        let storage = &**self.storage();
        let dir = self.dir();
        let base = first.segment.base();
        let paths = first.segment.paths().clone();
        let cleaned = with_suffix(&paths.log, CLEANED_SUFFIX);
        let swap = swap_path(&paths.log, until);
        if storage.exists(&cleaned) {
            storage
                .remove_file(&cleaned)
                .ctx(|| format!("removing {}", cleaned.display()))?;
        }
        let total: u64 = run.iter().map(Scanned::live_bytes).sum();
        let copied = storage
            .open(&cleaned, OpenMode::CreateNew)
            .ctx(|| format!("creating {}", cleaned.display()))
            .and_then(|file| Self::copy_live(&*file, run, total, &cleaned));
        if let Err(e) = copied {
            // The copy's blocks go back at once: on a full disk they are
            // what the pass was to free.
            if storage.exists(&cleaned)
                && let Err(removed) = storage.remove_file(&cleaned)
            {
                tracing::warn!(file = %cleaned.display(), error = %removed,
                    "could not remove an unfinished compaction copy; the next pass or open does");
            }
            // Nothing of the run was touched: it stays as it was.
            if skip_when_full && matches!(e, Error::Full { .. }) {
                tracing::warn!(log = %dir.display(), error = %e,
                    "no room to copy a run of segments; compaction leaves it as it was");
                return Ok(None);
            }
            return Err(e);
        }
        storage
            .rename(&cleaned, &swap)
            .ctx(|| format!("renaming {}", cleaned.display()))?;
        // From here the swap file stands for the run: on failure it goes,
        // or the log waits for the restart that completes it.
        let bases: Vec<u64> = run.iter().map(|s| s.segment.base()).collect();
        let covered: Vec<SegmentPaths> =
            run[1..].iter().map(|s| s.segment.paths().clone()).collect();
        let config = self.config().clone();
        let retiring = std::cell::Cell::new(false);
        let swapped = storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))
            .and_then(|()| {
                self.swap_sealed_segments(&bases, true, || {
                    retiring.set(true);
                    retire(storage, dir, &swap, &paths, &covered)?;
                    let mut report = RecoveryReport::default();
                    let opened = recovery::open_segment(
                        storage,
                        dir,
                        base,
                        Some(until),
                        &config,
                        RecoveryMode::TolerateTornTail,
                        None,
                        &mut report,
                    )?;
                    Ok(Some(sealed_segment(opened, &config)?))
                })
            });
        match swapped {
            Ok(true) => {}
            Ok(false) => {
                let gone = Error::NotFound("a segment of the run went away".into());
                self.abandon_swap(&swap, &bases, false, &gone);
                return Ok(None);
            }
            Err(e) => {
                self.abandon_swap(&swap, &bases, retiring.get(), &e);
                return Err(e);
            }
        }
        Ok(Some(total))
    }
}
