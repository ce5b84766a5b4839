//! Compaction: reclaim the bytes of records nobody needs from sealed
//! segments without changing any offset. The active segment is never
//! rewritten.
//!
//! A sealed segment with nothing live is deleted whole. Otherwise its live
//! records are copied verbatim (offsets and checksums unchanged) and the copy
//! replaces the original by a protocol that survives a crash at any step:
//!
//! 1. write `<base>.log.cleaned`, fdatasync;
//! 2. rename it to `<base>.log.swap`, fsync the directory;
//! 3. remove the old `.idx`/`.tix` (hints; rebuilt from the new log);
//! 4. rename `<base>.log.swap` over `<base>.log` (this retires the old file
//!    in one atomic step), fsync the directory;
//! 5. open the new segment (building its index) and swap it into the log.
//!
//! On open, a leftover `.cleaned` is removed (the swap never started) and a
//! leftover `.swap` is completed (it is durable and complete). Readers holding
//! the old segment keep their view of the old file until they let go.

use super::RecoveryMode;
use super::io::{OpenMode, Storage};
use super::log::{Log, sealed_segment};
use super::record::{self, Frame};
use super::recovery::{self, RecoveryReport};
use super::segment::{SegmentPaths, parse_log_name};
use crate::error::{Corruption, Error, IoContext, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Suffix of a compacted copy being written.
pub const CLEANED_SUFFIX: &str = ".cleaned";
/// Suffix of a complete, durable compacted copy waiting to replace its segment.
pub const SWAP_SUFFIX: &str = ".swap";
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
    /// Wall time taken, in milliseconds.
    pub millis: u64,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Rolls back or completes a swap a crash interrupted (see the module docs).
pub fn finish_interrupted_swaps(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let Ok(names) = storage.list_dir(dir) else {
        return Ok(());
    };
    let mut changed = false;
    for name in names {
        let path = dir.join(&name);
        if name.ends_with(&format!(".log{CLEANED_SUFFIX}")) {
            storage
                .remove_file(&path)
                .ctx(|| format!("removing {}", path.display()))?;
            tracing::warn!(file = %path.display(), "rolled back an interrupted compaction (copy not finished)");
            changed = true;
        } else if let Some(log_name) = name.strip_suffix(SWAP_SUFFIX)
            && let Some(base) = parse_log_name(log_name)
        {
            let paths = SegmentPaths::new(dir, base);
            for hint in [&paths.idx, &paths.tix] {
                if storage.exists(hint) {
                    storage
                        .remove_file(hint)
                        .ctx(|| format!("removing {}", hint.display()))?;
                }
            }
            storage
                .rename(&path, &paths.log)
                .ctx(|| format!("renaming {}", path.display()))?;
            tracing::warn!(file = %paths.log.display(), "completed an interrupted compaction swap");
            changed = true;
        }
    }
    if changed {
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

impl Log {
    /// Removes from sealed segments every record `keep` rejects. Offsets of
    /// the records kept never change. `progress` gets the bytes examined so far.
    pub fn compact(
        &self,
        keep: &dyn Fn(&RecordInfo<'_>) -> bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactStats> {
        let started = Instant::now();
        let mut stats = CompactStats::default();
        let segments = self.segments();
        let sealed = &segments[..segments.len().saturating_sub(1)];
        for (i, segment) in sealed.iter().enumerate() {
            let size = segment.size();
            stats.bytes_before += size;
            let data = segment
                .map()
                .bytes(0, size)
                .ctx(|| format!("reading {}", segment.paths().log.display()))?;
            let (mut kept, mut removed) = (Vec::new(), 0u64);
            let mut pos = 0usize;
            while pos < data.len() {
                let r = match record::decode(&data[pos..], u32::MAX) {
                    Ok(Frame::Record(r)) => r,
                    other => {
                        return Err(Error::corruption(Corruption {
                            file: segment.paths().log.clone(),
                            bytes: pos as u64..data.len() as u64,
                            offsets: None,
                            detail: format!(
                                "compaction found a record that does not validate: {other:?}"
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
                if live {
                    kept.push(pos..pos + len);
                } else {
                    removed += 1;
                }
                pos += len;
            }
            progress(stats.bytes_before);
            stats.records_kept += kept.len() as u64;
            stats.records_removed += removed;
            if removed == 0 {
                stats.bytes_after += size;
                continue;
            }
            let base = segment.base();
            let paths = segment.paths().clone();
            if kept.is_empty() {
                let storage = self.storage();
                let gone = self.swap_sealed_segment(base, || Ok(None))?;
                if gone {
                    self.remove_segment_files(&paths)?;
                    storage
                        .sync_dir(self.dir())
                        .ctx(|| format!("syncing {}", self.dir().display()))?;
                    stats.segments_deleted += 1;
                } else {
                    stats.bytes_after += size;
                }
                continue;
            }
            let next_base = segments.get(i + 1).map(|s| s.base());
            match self.rewrite(&paths, base, next_base, &data, &kept)? {
                Some(new_size) => {
                    stats.bytes_after += new_size;
                    stats.segments_rewritten += 1;
                }
                None => stats.bytes_after += size,
            }
        }
        stats.millis = started.elapsed().as_millis() as u64;
        if stats.records_removed > 0 {
            tracing::info!(log = %self.dir().display(), ?stats, "compacted");
        }
        Ok(stats)
    }

    /// Copies the `kept` ranges of `data` into a new file and swaps it in for
    /// segment `base`. Returns the new size, or `None` if the segment went away
    /// meanwhile (retention).
    fn rewrite(
        &self,
        paths: &SegmentPaths,
        base: u64,
        next_base: Option<u64>,
        data: &[u8],
        kept: &[std::ops::Range<usize>],
    ) -> Result<Option<u64>> {
        let storage = &**self.storage();
        let dir = self.dir();
        let cleaned = with_suffix(&paths.log, CLEANED_SUFFIX);
        let swap = with_suffix(&paths.log, SWAP_SUFFIX);
        if storage.exists(&cleaned) {
            storage
                .remove_file(&cleaned)
                .ctx(|| format!("removing {}", cleaned.display()))?;
        }
        let file = storage
            .open(&cleaned, OpenMode::CreateNew)
            .ctx(|| format!("creating {}", cleaned.display()))?;
        let total: usize = kept.iter().map(|r| r.len()).sum();
        file.allocate(total as u64)
            .ctx(|| format!("reserving space for {}", cleaned.display()))?;
        let mut buf = Vec::with_capacity(COPY_CHUNK.min(total));
        let mut at = 0u64;
        for range in kept {
            buf.extend_from_slice(&data[range.clone()]);
            if buf.len() >= COPY_CHUNK {
                file.write_at(at, &buf)
                    .ctx(|| format!("writing {}", cleaned.display()))?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_at(at, &buf)
            .ctx(|| format!("writing {}", cleaned.display()))?;
        file.sync_data()
            .ctx(|| format!("syncing {}", cleaned.display()))?;
        drop(file);
        storage
            .rename(&cleaned, &swap)
            .ctx(|| format!("renaming {}", cleaned.display()))?;
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))?;
        let config = self.config().clone();
        let swapped = self.swap_sealed_segment(base, || {
            for hint in [&paths.idx, &paths.tix] {
                if storage.exists(hint) {
                    storage
                        .remove_file(hint)
                        .ctx(|| format!("removing {}", hint.display()))?;
                }
            }
            storage
                .rename(&swap, &paths.log)
                .ctx(|| format!("renaming {}", swap.display()))?;
            storage
                .sync_dir(dir)
                .ctx(|| format!("syncing {}", dir.display()))?;
            let mut report = RecoveryReport::default();
            let opened = recovery::open_segment(
                storage,
                dir,
                base,
                next_base.or(Some(u64::MAX)),
                &config,
                RecoveryMode::TolerateTornTail,
                &mut report,
            )?;
            Ok(Some(sealed_segment(opened, &config)?))
        })?;
        if !swapped {
            storage
                .remove_file(&swap)
                .ctx(|| format!("removing {}", swap.display()))?;
            return Ok(None);
        }
        Ok(Some(total as u64))
    }
}
