//! One topic's log: its segments in offset order, the single writer that
//! appends to the active one, and the readers that share them.
//!
//! Invariants: offsets are dense as assigned and never change; readers see a
//! record only once it is *published*, and under `fsync=always` a record is
//! published only after it is durable, so no reader ever sees a record a crash
//! could take back. A failed sync is never retried: the log turns read-only.

use super::checkpoint::{Checkpoint, JournalPoint};
use super::config::{Durability, FsyncPolicy, LogConfig, RecoveryMode};
use super::index::IndexBuilder;
use super::io::{Mapping, OpenMode, Storage, StorageFile};
use super::message::{Message, NewMessage, Offset};
use super::record;
use super::records::Records;
use super::recovery::{self, OpenedSegment, RecoveryReport};
use super::segment::{ReadLimits, Segment, SegmentPaths, SegmentState, parse_log_name};
use crate::error::{Corruption, Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First allocation of a new segment file; each later step doubles, up to
/// [`MAX_ALLOCATION_STEP`]. An idle topic holds no more disk than it uses.
pub const MIN_ALLOCATION_STEP: u64 = 4096;
/// Largest single growth of a segment file.
pub const MAX_ALLOCATION_STEP: u64 = 16 * 1024 * 1024;
/// Under `fsync=always`, bytes of records written into the file before
/// their writeback is started (see `Log::encode_chunk`).
const WRITEBACK_STEP: u64 = 256 * 1024;
/// Otherwise, most bytes of encoded records held before they are written.
const FLUSH_BYTES: u64 = 1024 * 1024;
/// Under `fsync=never` and `interval`, bytes written into the file before
/// their writeback is started: the sync that seals a full segment (and the
/// interval's sync) then finds most of it on its way to the disk already,
/// instead of waiting for a whole segment's writeback in the writer's path.
const LAZY_WRITEBACK_STEP: u64 = 4 * 1024 * 1024;
/// Under `fsync=always`, appends of at most this many bytes keep written
/// zeros ahead of them in the active file (see `Log::grow_written`).
const SMALL_APPEND: u64 = 64 * 1024;
/// How far ahead of such appends the zeros reach.
const WRITTEN_AHEAD: u64 = 256 * 1024;
/// Writeback starts at page boundaries: the page a piece ends in is written
/// again by the next piece, and is left for the sync.
pub(crate) const PAGE: u64 = 4096;

/// The end of the 4 KiB page that byte `pos` lies in (a whole page further
/// when `pos` begins one).
pub(crate) fn page_end(pos: u64) -> u64 {
    (pos / PAGE + 1) * PAGE
}

/// What retention must keep beyond the log's own limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetentionLimits {
    /// Keep segments holding this offset or later (a group still needs them)...
    pub floor: Option<u64>,
    /// ...unless the log is larger than this many bytes (whose oldest
    /// sealed segments go then whatever the other limits say)...
    pub hard_bytes: Option<u64>,
    /// ...or the segment's newest record is older than this.
    pub hard_age_ms: Option<u64>,
}

/// Offsets given to one appended batch, and what the acknowledgement means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the batch's first message.
    pub first: Offset,
    /// Offset of its last message.
    pub last: Offset,
    /// Whether the batch is synced (`Durable`) or only written.
    pub durability: Durability,
}

/// A snapshot of a log's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Offset of the first stored record (equals `end` when the log is empty).
    pub start: Offset,
    /// Offset the next appended record will get, as visible to readers.
    pub end: Offset,
    /// Everything below this is synced.
    pub durable_end: Offset,
    /// Number of segments.
    pub segments: usize,
    /// Bytes of published records in all segments.
    pub bytes: u64,
}

/// A topic's append-only log.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    config: LogConfig,
    /// Segments in offset order; the last is the active one. Replaced whole
    /// (copy on write) when a segment is added or removed.
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    /// Bumped whenever records that were readable may have gone: segments
    /// dropped (retention) or replaced (compaction). See [`Log::generation`].
    generation: AtomicU64,
    writer: Mutex<Writer>,
    /// Held by a compaction pass: one at a time per log.
    compacting: Mutex<()>,
    /// Set by [`Log::stop_compaction`].
    compaction_stopped: AtomicBool,
    /// Bases of segments already gone from the manifest and the segment list
    /// whose files are not durably removed yet: a power cut brings such a
    /// segment back (recovery keeps a segment file the manifest does not
    /// list). See [`Log::recoverable_start`].
    dropping: Mutex<Vec<u64>>,
    /// Segments a compaction swap that failed half-way may have retired:
    /// no checkpoint lists them again (see [`Log::abandon_swap`]).
    retired: Mutex<Vec<u64>>,
    durable_end: AtomicU64,
    /// What is synced, as one consistent point (the writer updates it).
    synced: Mutex<SyncedPoint>,
    /// Serializes checkpoint writes and keeps what the last one said.
    checkpoint: Mutex<CheckpointState>,
    /// The checkpoint found on open, if any.
    opened_checkpoint: Option<Checkpoint>,
    report: RecoveryReport,
}

/// The active segment's synced bytes and the offsets they end at.
#[derive(Debug, Clone, Copy, Default)]
struct SyncedPoint {
    active_base: u64,
    active_synced: u64,
    durable_end: u64,
}

#[derive(Debug, Default)]
struct CheckpointState {
    /// Points of the state journals beside the log (set by their owner).
    journals: Vec<JournalPoint>,
    /// The last checkpoint written (clean flag aside).
    written: Option<Checkpoint>,
}

#[derive(Debug)]
struct Writer {
    active: Active,
    /// Offset the next written record gets (written, not necessarily published).
    next_offset: u64,
    /// Set by a failed sync; the log refuses writes from then on.
    poisoned: Option<String>,
    /// Set by [`Log::stop_writes`]: the log takes no more records.
    stopped: bool,
    /// A roll failed: the next write rolls first. The failed attempt may
    /// have left the new segment's (empty) file, named after the next
    /// offset; a record written into the active segment at that offset
    /// would overlap it, and the log would not open again.
    roll_due: bool,
    last_sync: Instant,
    scratch: Vec<u8>,
    /// Where the writes under way began (in the active segment): what a
    /// write the disk has no room for goes back to ([`Log::undo_writes`]).
    undo: Option<WriteMark>,
    /// Set when writes were undone: records from this offset on are not in
    /// the log, whatever their writes answered before; with the error and
    /// the segment file.
    undone: Option<(u64, Error, PathBuf)>,
    /// The first offset of the batch being written.
    batch_first: u64,
    /// Bytes [`Log::flush`] held back and where they go (see there).
    held: Option<(u64, Vec<u8>)>,
}

/// The writer's state at the start of writes that may be undone.
#[derive(Debug, Clone, Copy)]
struct WriteMark {
    write_pos: u64,
    next_offset: u64,
    builder: IndexBuilder,
    first_offset: Option<u64>,
    started_ms: Option<u64>,
}

impl Writer {
    fn mark(&self) -> WriteMark {
        WriteMark {
            write_pos: self.active.write_pos,
            next_offset: self.next_offset,
            builder: self.active.builder,
            first_offset: self.active.first_offset,
            started_ms: self.active.started_ms,
        }
    }

    /// Begins writes that a full disk undoes whole.
    fn begin_undoable(&mut self) {
        self.undo = Some(self.mark());
        self.undone = None;
    }

    /// Ends them (their held bytes written): their results stand.
    fn end_undoable(&mut self) {
        debug_assert!(self.held.is_none(), "held bytes are written first");
        self.undo = None;
        self.undone = None;
        // No batch is being written (a roll for a segment's age names none).
        self.batch_first = self.next_offset;
    }
}

/// The writer's side of the active segment.
#[derive(Debug)]
struct Active {
    segment: Arc<Segment>,
    /// The `.log` file, open while the segment takes appends.
    file: Arc<dyn StorageFile>,
    map: Arc<dyn Mapping>,
    builder: IndexBuilder,
    idx: Arc<dyn StorageFile>,
    tix: Arc<dyn StorageFile>,
    idx_persisted: usize,
    tix_persisted: usize,
    /// Whether the last write of index entries failed (logged once).
    index_failing: bool,
    first_offset: Option<u64>,
    write_pos: u64,
    synced_pos: u64,
    allocated: u64,
    /// Writeback was started for the bytes below this (see `write_chunk`).
    writeback_from: u64,
    /// The file's size as of its last `sync_data`: records past it need
    /// one (which makes the size and its blocks durable) rather than a
    /// sync of their range.
    durable_size: u64,
    /// When the segment's first record was written (wall clock, ms; `None`
    /// while it holds none): its age for `segment_ms`, which a reopen does
    /// not reset.
    started_ms: Option<u64>,
}

/// The answer to a batch from offset `first` whose records from `from` on
/// were undone (`error`, writing into `log`): nothing of it stored, or,
/// for a batch larger than a segment, the part sealed before.
fn undone_error(error: &Error, log: &Path, first: u64, from: u64) -> Error {
    let context = if first >= from {
        format!(
            "writing records into {} (nothing of the batch is stored)",
            log.display()
        )
    } else {
        format!(
            "writing records into {}: {}",
            log.display(),
            stored_before(first, from)
        )
    };
    match error {
        Error::Full { source, .. } => Error::Full {
            context,
            source: crate::storage::io::copy_error(source),
        },
        other => other.duplicate(),
    }
}

/// What a batch from offset `first` that stopped at offset `from` (in a
/// later segment) left stored.
fn stored_before(first: u64, from: u64) -> String {
    format!(
        "the batch's offsets {first} to {} are stored, in the segments it filled before (it is \
         larger than a segment), the rest not",
        from - 1
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on the broker's timer clock: monotonic, so a step of the
/// wall clock moves none of its timers, and read like [`now_ms`] (it starts
/// at the wall clock's reading when the process first asks). For what is
/// kept in memory only: leases, redelivery delays, when a group member or a
/// topic was last seen; never for what is compared with stored timestamps
/// (retention, `segment_ms`, tombstones), which follow the wall clock.
pub fn timer_ms() -> u64 {
    static START: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, wall) = START.get_or_init(|| (std::time::Instant::now(), now_ms()));
    wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The wall-clock time ([`now_ms`]) of `at`, a reading of [`timer_ms`]
/// that was `timer_now - at` ago (`timer_now` read just before).
pub fn wall_ms_of(at: u64, timer_now: u64) -> u64 {
    now_ms().saturating_sub(timer_now.saturating_sub(at))
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering it as `mode` allows.
    /// What recovery did is in [`Log::recovery_report`].
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        mode: RecoveryMode,
    ) -> Result<Log> {
        let log = Log::open_unmarked(storage, dir, config, mode)?;
        log.mark_opened()?;
        Ok(log)
    }

    /// [`Log::open`] leaving a clean checkpoint as it is, for a caller
    /// that checks more (the state beside the log) before it takes the log
    /// for opened with [`Log::mark_opened`]: an open refused by those
    /// checks must leave the stop clean, or the next try would judge the
    /// same files by the rules of an unclean one.
    pub fn open_unmarked(
        storage: Arc<dyn Storage>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        mode: RecoveryMode,
    ) -> Result<Log> {
        config.validate()?;
        let dir = dir.into();
        storage
            .create_dir_all(&dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        let mut report = RecoveryReport::default();
        let loaded = match Checkpoint::load(&*storage, &dir) {
            Ok(loaded) => loaded,
            Err(Error::Corruption(damage)) if mode == RecoveryMode::SkipDamaged => {
                tracing::error!(damage = %damage.given_up(), "ignoring a damaged checkpoint: no recovery point for this log");
                report.quarantined.push(*damage);
                None
            }
            Err(Error::Corruption(mut damage)) => {
                damage.detail.push_str(
                    ". Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                     to open the log without it: every segment is then scanned, and its next \
                     checkpoint written anew",
                );
                return Err(Error::Corruption(damage));
            }
            Err(e) => return Err(e),
        };
        // A compaction swap a crash interrupted is completed below, removing
        // the segments it covers: the manifest forgets them first, so a crash
        // while completing it never leaves them listed and gone.
        super::recovery::check_interrupted_swaps(&*storage, &dir, loaded.as_ref(), mode)?;
        let mut loaded = loaded;
        if let Some(c) = loaded.as_mut() {
            let names = storage
                .list_dir(&dir)
                .ctx(|| format!("listing {}", dir.display()))?;
            let pending = super::recovery::pending_swaps(&names);
            let covered = |b: &u64| super::checkpoint::covered_by_swap(*b, &pending);
            if c.segments.iter().any(covered) {
                c.segments.retain(|b| !covered(b));
                c.store(&*storage, &dir)?;
            }
        }
        let swaps = super::recovery::finish_interrupted_swaps(&*storage, &dir, loaded.as_ref())?;
        let names = storage
            .list_dir(&dir)
            .ctx(|| format!("listing {}", dir.display()))?;
        let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_log_name(n)).collect();
        bases.sort_unstable();
        remove_orphan_indexes(&*storage, &dir, &names, &bases)?;
        if let Some(c) = &loaded {
            check_manifest(&dir, c, &bases, &swaps, mode, &mut report)?;
        }
        // Bytes of the active segment known synced: a bad record below this
        // is damage, never a torn write.
        let synced_to = |base: u64| match &loaded {
            Some(c) if c.active_base == base => Some(c.active_synced),
            Some(_) => Some(0),
            None => None,
        };

        let mut segments = Vec::with_capacity(bases.len().max(1));
        let active = match bases.split_last() {
            None => Active::create(&*storage, &dir, 0, &config),
            Some((&last, _)) => (|| {
                for pair in bases.windows(2) {
                    let (base, next_base) = (pair[0], pair[1]);
                    let opened = recovery::open_segment(
                        &*storage,
                        &dir,
                        base,
                        Some(next_base),
                        &config,
                        mode,
                        None,
                        &mut report,
                    )?;
                    segments.push(Arc::new(sealed_segment(opened, &config)?));
                }
                let opened = recovery::open_segment(
                    &*storage,
                    &dir,
                    last,
                    None,
                    &config,
                    mode,
                    synced_to(last),
                    &mut report,
                )?;
                Active::resume(&*storage, opened, &config)
            })(),
        };
        // Also when a later segment failed to open.
        for idx in &report.rebuilt_indexes {
            tracing::info!(file = %idx.display(), "rebuilt index from the log");
        }
        let active = active?;
        segments.push(Arc::clone(&active.segment));
        check_order(&segments)?;
        // A process that died may have written records it never synced; they
        // are in the page cache, so recovery found them and readers will see
        // them. Make them durable before anything is served (a no-op when the
        // last stop was clean and nothing is dirty).
        let log_path = active.segment.paths().log.clone();
        active
            .file
            .sync_data()
            .ctx(|| format!("syncing recovered {}", log_path.display()))?;
        let next_offset = active.segment.end_offset();
        let synced = SyncedPoint {
            active_base: active.segment.base(),
            active_synced: active.write_pos,
            durable_end: next_offset,
        };
        let mut log = Log {
            dir,
            storage,
            config,
            segments: RwLock::new(Arc::new(segments)),
            writer: Mutex::new(Writer {
                active,
                next_offset,
                poisoned: None,
                stopped: false,
                roll_due: false,
                last_sync: Instant::now(),
                scratch: Vec::new(),
                undo: None,
                undone: None,
                batch_first: next_offset,
                held: None,
            }),
            compacting: Mutex::new(()),
            compaction_stopped: AtomicBool::new(false),
            dropping: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            durable_end: AtomicU64::new(next_offset),
            generation: AtomicU64::new(0),
            synced: Mutex::new(synced),
            checkpoint: Mutex::new(CheckpointState {
                journals: loaded
                    .as_ref()
                    .map(|c| c.journals.clone())
                    .unwrap_or_default(),
                written: loaded.clone(),
            }),
            opened_checkpoint: loaded,
            report,
        };
        log.check_durable_end(mode)?;
        if log.report.changed_records() {
            tracing::warn!(log = %log.dir.display(), report = %log.report, "log recovered");
        } else if !log.report.is_clean() {
            tracing::info!(log = %log.dir.display(), report = %log.report, "log recovered");
        }
        Ok(log)
    }

    /// Takes the log for opened: a clean checkpoint stops being true with
    /// the first new write (to the log or to a journal beside it), and a
    /// log without one gets its recovery point now. On a full disk, with no
    /// room for a new one, a clean checkpoint goes instead (removing a file
    /// needs no room): the log then opens for reading, and recovers as one
    /// without a checkpoint until the next is written (the broker writes
    /// one every second once there is room).
    pub fn mark_opened(&self) -> Result<()> {
        if self.opened_checkpoint.as_ref().is_none_or(|c| c.clean) {
            match self.store_checkpoint(None, false) {
                Err(e @ Error::Full { .. }) => {
                    if self.opened_checkpoint.is_some() {
                        Checkpoint::remove(&*self.storage, &self.dir)?;
                        self.lock_checkpoint().written = None;
                    }
                    tracing::warn!(log = %self.dir.display(), error = %e,
                        "no room for a checkpoint: the log opens without one until there is");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Offsets below the checkpoint's durable end were acknowledged as
    /// durable: a log that ends before it lost them, and the offsets must not
    /// be handed out again.
    fn check_durable_end(&mut self, mode: RecoveryMode) -> Result<()> {
        let Some(durable_end) = self.opened_checkpoint.as_ref().map(|c| c.durable_end) else {
            return Ok(());
        };
        self.ensure_end_at_least(durable_end, mode, "were synced (see the checkpoint)")
    }

    /// Makes sure no offset below `needed` is ever handed out again: a log
    /// that ends before it is damage (refused under the default recovery
    /// mode); under skip-damaged the log continues at `needed` and the lost
    /// range is reported. `why` says what vouches for `needed`.
    pub fn ensure_end_at_least(
        &mut self,
        needed: u64,
        mode: RecoveryMode,
        why: &str,
    ) -> Result<()> {
        let end = self.end().0;
        if end >= needed {
            return Ok(());
        }
        let last = self.segments().last().map(|s| s.paths().log.clone());
        let damage = Corruption {
            file: last.unwrap_or_else(|| self.dir.clone()),
            bytes: 0..0,
            offsets: Some(end..needed),
            detail: format!(
                "the log ends at offset {end}, but offsets up to {needed} {why}. \
                 Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                 to continue at offset {needed} and give the range up"
            ),
        };
        if mode == RecoveryMode::TolerateTornTail {
            return Err(Error::corruption(damage));
        }
        tracing::error!(damage = %damage.given_up(), "offsets lost; the log continues after them");
        self.skip_to(needed)?;
        self.report.skipped.push(end..needed);
        self.report.quarantined.push(damage);
        Ok(())
    }

    /// Continues the log at `offset` (past its end) in a new segment, so the
    /// offsets in between are never given to a message.
    pub(crate) fn skip_to(&self, offset: u64) -> Result<()> {
        let mut w = self.lock_writer()?;
        if offset <= w.next_offset {
            return Ok(());
        }
        self.sync_locked(&mut w)?;
        self.publish_locked(&mut w);
        // Sealed first (unlike a roll): the new segment starts past offsets
        // this one never held, and a stop between the two steps must not
        // leave this one's preallocated zeros before it, which recovery
        // takes for records zeroed in place. After the seal this segment
        // takes no writes: if the new one cannot be created, nothing does.
        let sealed = self.seal(&mut w).inspect_err(|e| {
            w.poisoned = Some(format!("sealing failed: {e}"));
        })?;
        let active = Active::create(&*self.storage, &self.dir, offset, &self.config)
            .inspect_err(|e| w.poisoned = Some(format!("creating segment {offset} failed: {e}")))?;
        let mut segments: Vec<Arc<Segment>> = self.segments().as_ref().clone();
        if let Some(last) = segments.last_mut() {
            *last = Arc::new(sealed);
        }
        segments.push(Arc::clone(&active.segment));
        self.set_segments(segments);
        w.active = active;
        w.next_offset = offset;
        w.batch_first = offset;
        self.durable_end.store(offset, Ordering::Release);
        *self.lock_synced() = SyncedPoint {
            active_base: offset,
            active_synced: 0,
            durable_end: offset,
        };
        drop(w);
        self.store_checkpoint(None, false)
    }

    fn lock_checkpoint(&self) -> MutexGuard<'_, CheckpointState> {
        self.checkpoint.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_synced(&self) -> MutexGuard<'_, SyncedPoint> {
        self.synced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The checkpoint found when the log was opened (`None` for a log that
    /// had none).
    pub fn opened_checkpoint(&self) -> Option<&Checkpoint> {
        self.opened_checkpoint.as_ref()
    }

    /// Writes the log's recovery point and manifest (see
    /// [`crate::storage::checkpoint`]) when it changed since the last one, or
    /// always when `clean` (a clean stop). `journals`, when given, replaces
    /// the recorded points of the state journals beside the log.
    pub fn store_checkpoint(&self, journals: Option<Vec<JournalPoint>>, clean: bool) -> Result<()> {
        self.store_checkpoint_without(journals, clean, &[])
    }

    /// [`Log::store_checkpoint`] with the segments `removed` left out of the
    /// manifest: written before they are removed, so a removal is never
    /// taken for a loss.
    fn store_checkpoint_without(
        &self,
        journals: Option<Vec<JournalPoint>>,
        clean: bool,
        removed: &[u64],
    ) -> Result<()> {
        let mut state = self.lock_checkpoint();
        if let Some(journals) = journals {
            state.journals = journals;
        }
        let synced = *self.lock_synced();
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Segments a drop noted are out of the manifest from then on, also
        // while they are still in the list in memory (the drop's own
        // checkpoint left them out; one written between it and the list's
        // change must not bring them back before their files go).
        let dropping = self
            .dropping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let segments = self
            .segments()
            .iter()
            .map(|s| s.base())
            .filter(|b| !removed.contains(b) && !retired.contains(b) && !dropping.contains(b))
            .collect();
        let next = Checkpoint {
            clean,
            durable_end: synced.durable_end,
            active_base: synced.active_base,
            active_synced: synced.active_synced,
            segments,
            journals: state.journals.clone(),
        };
        if !clean && state.written.as_ref() == Some(&next) {
            return Ok(());
        }
        next.store(&*self.storage, &self.dir)?;
        state.written = Some(next);
        Ok(())
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's settings.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The file access backend.
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Replaces the run of sealed segments `bases` (adjacent in the segment
    /// list, oldest first) with `replacement`, or removes them when it is
    /// `None`, under the writer lock, so it cannot race a roll or retention.
    /// `prepare` runs first under the same lock (file renames); returns false,
    /// doing nothing, when any of them is gone or active.
    pub(crate) fn swap_sealed_segments(
        &self,
        bases: &[u64],
        replaced: bool,
        prepare: impl FnOnce() -> Result<Option<Segment>>,
    ) -> Result<bool> {
        let w = self.lock_writer()?;
        // A swap left half-way waits for the restart that completes it.
        self.check_writable(&w)?;
        let segments = self.segments();
        let Some(&first) = bases.first() else {
            return Ok(false);
        };
        let Some(i) = segments.iter().position(|s| s.base() == first) else {
            return Ok(false);
        };
        let run = i..i + bases.len();
        if run.end >= segments.len()
            || segments[run.clone()]
                .iter()
                .zip(bases)
                .any(|(s, &b)| s.base() != b)
        {
            return Ok(false);
        }
        // The manifest forgets the segments before their files go, and no
        // checkpoint written meanwhile lists them again (they are noted as
        // dropping). A swap's covered segments are retired by its rename,
        // which recovery completes: noted until the list in memory drops
        // them (or, if the swap is abandoned, until `retired` or the
        // restored run takes over). Removed ones stay noted until their
        // files go.
        let removed = if replaced { &bases[1..] } else { bases };
        // Segments removed whole free room; a copy takes its place's.
        self.unlist(removed, !replaced, "compaction")?;
        // On failure the caller abandons the swap (see `abandon_swap`).
        let replacement = prepare()?;
        let mut next: Vec<Arc<Segment>> = segments.as_ref().clone();
        next.splice(run, replacement.map(Arc::new));
        self.set_segments(next);
        if replaced {
            self.forget_dropping(removed);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// A compaction swap whose file (`swap`, standing for the run of sealed
    /// segments `bases`) was in place when the pass failed. Before anything
    /// was retired (`retiring` false) the file just goes, and the run stays
    /// as it was. Otherwise (or if it cannot go) the swap must complete, and
    /// only a restart completes it: a later pass with another swap would
    /// meet this one at the next open and lose what it merged. So the log
    /// takes no more writes or swaps until then, and no checkpoint lists
    /// the segments after the first again (a listed segment that is gone is
    /// damage).
    pub(crate) fn abandon_swap(&self, swap: &Path, bases: &[u64], retiring: bool, error: &Error) {
        let covered = bases.get(1..).unwrap_or_default();
        if !retiring {
            let removed = self
                .storage
                .remove_file(swap)
                .and_then(|()| self.storage.sync_dir(&self.dir));
            match removed {
                Ok(()) => {
                    // The run stays as it was, and is listed again.
                    self.forget_dropping(covered);
                    return;
                }
                Err(e) => tracing::error!(file = %swap.display(), error = %e,
                    "could not remove the copy of a failed compaction"),
            }
        }
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(covered);
        self.forget_dropping(covered);
        let cause = format!("a compaction swap failed half-way ({error}); a restart completes it");
        tracing::error!(log = %self.dir.display(), %cause, "the log takes no more writes until a restart");
        match self.writer.lock() {
            Ok(mut w) => {
                w.poisoned.get_or_insert(cause);
            }
            Err(p) => {
                p.into_inner().poisoned.get_or_insert(cause);
            }
        }
    }

    /// Takes the log's compaction lock (one pass at a time).
    pub(crate) fn lock_compaction(&self) -> MutexGuard<'_, ()> {
        self.compacting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends compaction of this log as it stops: a pass under way ends
    /// after the run of segments it is rewriting (what it rewrote stays
    /// rewritten), later passes refuse, and this returns once no pass is
    /// under way, so what the stop records is what stays on disk.
    pub fn stop_compaction(&self) {
        self.compaction_stopped.store(true, Ordering::Release);
        drop(self.lock_compaction());
    }

    /// Refuses once [`Log::stop_compaction`] was called.
    pub(crate) fn check_compaction_goes_on(&self) -> Result<()> {
        if self.compaction_stopped.load(Ordering::Acquire) {
            return Err(Error::Stopping(format!(
                "compaction of {} ended: the log is stopping",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// What opening the log found and repaired.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Whether appending `bytes` more (records included) might wait on the
    /// disk: the policy syncs (`always`, or `interval` when a sync may
    /// come due), the active segment would roll (a roll syncs it), or
    /// someone holds the writer (a sync, a checkpoint, a compaction swap).
    /// A hint, taken without waiting; a caller that finds `false` may run
    /// the append where blocking would hold up other work.
    pub fn append_may_block(&self, bytes: u64) -> bool {
        if self.config.fsync != FsyncPolicy::Never {
            return true;
        }
        let Ok(w) = self.writer.try_lock() else {
            return true;
        };
        let end = w.active.write_pos + w.scratch.len() as u64;
        w.roll_due || end + bytes > self.config.segment_bytes || self.segment_too_old(&w.active)
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>> {
        self.writer.lock().map_err(|_| self.writer_panicked())
    }

    fn writer_panicked(&self) -> Error {
        Error::ReadOnly {
            log: self.dir.clone(),
            cause: "a writer panicked".into(),
        }
    }

    /// The current segments, oldest first (the last one is active).
    pub fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// When `retention_ms` will find the oldest sealed segment too old
    /// (milliseconds since the epoch); `None` without `retention_ms` or a
    /// sealed segment. A log that takes no writes has nothing else due.
    pub fn retention_due_ms(&self) -> Option<u64> {
        let ms = self.config.retention_ms?;
        let segments = self.segments();
        let oldest = segments
            .first()
            .filter(|_| segments.len() > 1)
            .map(|s| s.max_timestamp_ms().saturating_add(ms).saturating_add(1));
        // The active segment, once `segment_ms` old, is rolled by a
        // retention pass (see [`Log::enforce_retention_within`]).
        let roll = self.config.segment_ms.and_then(|age| {
            let active = segments.last()?;
            let head = active.map().bytes(0, record::HEADER_LEN as u64).ok()?;
            let first = record::header_timestamp(&head)?.min(now_ms());
            Some(first.saturating_add(age).saturating_add(1))
        });
        match (oldest, roll) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Changes whenever records may have left the log other than by being
    /// written over nothing: retention dropped segments or compaction
    /// replaced some. Records read while it stays the same are still what a
    /// read of the same offsets would return now (deletions and consumption
    /// aside, which are not the log's); appends and rolls leave it alone.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn set_segments(&self, segments: Vec<Arc<Segment>>) {
        *self.segments.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(segments);
    }

    /// Appends a batch and commits it under the log's fsync policy: the
    /// single-producer form of [`Log::write`] + [`Log::commit`].
    pub fn append(&self, batch: &[NewMessage]) -> Result<Appended> {
        let (first, last) = self.write(batch)?;
        let durability = self.commit()?;
        Ok(Appended {
            first,
            last,
            durability,
        })
    }

    /// Writes a batch into the active segment without publishing or syncing
    /// it, and returns its first and last offsets. Several writes followed by
    /// one [`Log::commit`] share one sync (group commit).
    pub fn write(&self, batch: &[NewMessage]) -> Result<(Offset, Offset)> {
        let lens = self.record_lens(batch)?;
        let mut w = self.lock_writer()?;
        w.begin_undoable();
        let written = self.write_locked(&mut w, batch, &lens, now_ms());
        let flushed = self.flush(&mut w).and_then(|()| self.release_held(&mut w));
        w.end_undoable();
        let written = written?;
        flushed?;
        Ok(written)
    }

    /// [`Log::write`] of each of `batches` (one group commit's), in order,
    /// each with its own result; their records go into the file together, so
    /// a group of small batches costs one `pwrite`, not one each. A write
    /// the disk has no room for is undone ([`Log::undo_writes`]): each batch
    /// it took records of answers the full disk. Any other failed write into
    /// the file makes the log read-only, which the following [`Log::commit`]
    /// reports.
    pub fn write_batches<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a [NewMessage]>,
    ) -> Vec<Result<(Offset, Offset)>> {
        let checked: Vec<_> = batches
            .into_iter()
            .map(|b| (b, self.record_lens(b)))
            .collect();
        let mut w = match self.lock_writer() {
            Ok(w) => w,
            Err(_) => {
                return checked
                    .into_iter()
                    .map(|(_, lens)| lens.and(Err(self.writer_panicked())))
                    .collect();
            }
        };
        let now = now_ms();
        w.begin_undoable();
        let mut written = Vec::with_capacity(checked.len());
        for (batch, lens) in checked {
            written.push(lens.and_then(|lens| self.write_locked(&mut w, batch, &lens, now)));
            Self::fail_undone(&mut w, &mut written);
        }
        // An error here poisons the log (the commit that follows fails), or
        // undoes the writes of this group.
        let _ = self.flush(&mut w).and_then(|()| self.release_held(&mut w));
        Self::fail_undone(&mut w, &mut written);
        w.end_undoable();
        written
    }

    /// Turns the answers of batches whose records were undone into the
    /// error that undid them.
    fn fail_undone(w: &mut Writer, written: &mut [Result<(Offset, Offset)>]) {
        let Some((from, error, log)) = w.undone.take() else {
            return;
        };
        for result in written.iter_mut() {
            if let Ok((first, last)) = *result
                && last.0 >= from
            {
                *result = Err(undone_error(&error, &log, first.0, from));
            }
        }
    }

    /// The record length of each message of `batch`, refusing an empty batch
    /// and any message the log cannot store.
    fn record_lens(&self, batch: &[NewMessage]) -> Result<Vec<u64>> {
        if batch.is_empty() {
            return Err(Error::InvalidArgument(
                "empty batch: nothing to append".into(),
            ));
        }
        let max = self.config.max_record_len() as usize;
        let mut lens = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            match record::encoded_len(msg) {
                Some(len) if len <= max => lens.push(len as u64),
                len => {
                    return Err(Error::InvalidArgument(format!(
                        "message {i} has {} bytes of key, headers and value; topic {} takes at most {} \
                         per message (its segment_bytes {} less the {}-byte record header)",
                        len.map_or_else(
                            || "over 4 GiB".into(),
                            |l| (l - record::HEADER_LEN).to_string()
                        ),
                        self.dir.file_name().map_or_else(
                            || self.dir.display().to_string(),
                            |n| n.to_string_lossy().into_owned()
                        ),
                        self.config.max_message_bytes(),
                        self.config.segment_bytes,
                        record::HEADER_LEN,
                    )));
                }
            }
        }
        Ok(lens)
    }

    /// Encodes `batch` (record lengths `lens`) after what the writer holds,
    /// rolling the segment first when it does not fit. Records wait in the
    /// writer's scratch buffer until [`Log::flush`] (which this calls before
    /// a roll and whenever the buffer is full).
    fn write_locked(
        &self,
        w: &mut Writer,
        batch: &[NewMessage],
        lens: &[u64],
        now: u64,
    ) -> Result<(Offset, Offset)> {
        self.check_writable(w)?;
        if w.stopped {
            return Err(Error::Stopping(format!(
                "{} takes no more writes: the broker is stopping",
                self.dir.display()
            )));
        }
        let first = w.next_offset;
        w.batch_first = first;
        // Only a segment named past every offset a producer could reach (a
        // file put there by hand) gets here: wrapping around would hand
        // out offset 0 again.
        if first.checked_add(batch.len() as u64).is_none() {
            return Err(Error::LimitReached(format!(
                "{} has no offsets left for {} more message{}: its next offset is {first}, and \
                 offsets end at {}",
                self.dir.display(),
                batch.len(),
                if batch.len() == 1 { "" } else { "s" },
                u64::MAX
            )));
        }
        let segment_bytes = self.config.segment_bytes;
        let total: u64 = lens.iter().sum();
        let end = |w: &Writer| w.active.write_pos + w.scratch.len() as u64;
        // Keep a batch in one segment when it fits in one, so a full disk at the
        // roll cannot leave half a batch stored.
        if w.active.first_offset.is_some()
            && (w.roll_due || end(w) + total > segment_bytes || self.segment_too_old(&w.active))
        {
            self.flush(w)?;
            self.roll(w)?;
        }
        let mut i = 0;
        while i < batch.len() {
            if w.active.first_offset.is_some() && end(w) + lens[i] > segment_bytes {
                self.flush(w)?;
                self.roll(w)?;
            }
            let mut last = i;
            let mut bytes = 0;
            while last < batch.len() && end(w) + bytes + lens[last] <= segment_bytes {
                bytes += lens[last];
                last += 1;
            }
            let need = end(w) + bytes;
            self.ensure_allocated(&mut w.active, need, bytes)
                .map_err(|e| Self::naming_stored_part(w, e))?;
            self.encode_chunk(w, &batch[i..last], &lens[i..last], now)?;
            i = last;
        }
        Ok((Offset(first), Offset(w.next_offset - 1)))
    }

    /// `error`, stopping a batch larger than a segment after it sealed
    /// part of itself (stored, synced and readable: the caller must not
    /// send that part again), naming the part.
    fn naming_stored_part(w: &Writer, error: Error) -> Error {
        let (first, from) = (w.batch_first, w.next_offset);
        if from <= first {
            return error;
        }
        error.with_context(|c| format!("{c}; {}", stored_before(first, from)))
    }

    fn segment_too_old(&self, active: &Active) -> bool {
        self.config.segment_ms.is_some_and(|ms| {
            active
                .started_ms
                .is_some_and(|t| now_ms().saturating_sub(t) >= ms)
        })
    }

    /// Encodes `msgs` (whose record lengths are `lens`) into the writer's
    /// scratch buffer (allocation already done), writing the buffer into the
    /// map whenever it would pass its limit: [`FLUSH_BYTES`], or under
    /// `fsync=always` [`WRITEBACK_STEP`], each piece then sent towards the
    /// disk at once, so the disk works while the rest is encoded and the
    /// commit's sync waits only for the last piece. Under the other policies
    /// writeback starts every [`LAZY_WRITEBACK_STEP`], so that sealing a
    /// full segment does not wait for all of it. `msync`/`fsync` stay the
    /// durability points; starting writeback early promises nothing.
    fn encode_chunk(
        &self,
        w: &mut Writer,
        msgs: &[NewMessage],
        lens: &[u64],
        now: u64,
    ) -> Result<()> {
        let early = self.config.fsync == FsyncPolicy::Always;
        let limit = if early { WRITEBACK_STEP } else { FLUSH_BYTES };
        let mut i = 0;
        while i < msgs.len() {
            if !w.scratch.is_empty() && w.scratch.len() as u64 + lens[i] > limit {
                self.flush(w)?;
                if early || w.active.unstarted_writeback() >= LAZY_WRITEBACK_STEP {
                    w.active.start_writeback();
                }
            }
            let mut last = i + 1;
            let mut bytes = w.scratch.len() as u64 + lens[i];
            while last < msgs.len() && bytes + lens[last] <= limit {
                bytes += lens[last];
                last += 1;
            }
            Self::encode_run(w, &msgs[i..last], now);
            i = last;
        }
        Ok(())
    }

    /// Encodes `msgs` into the scratch buffer and indexes them (one hold of
    /// the index lock for the run).
    fn encode_run(w: &mut Writer, msgs: &[NewMessage], now: u64) {
        let Writer {
            active,
            scratch,
            next_offset,
            ..
        } = w;
        let base = active.segment.base();
        let start = active.write_pos;
        let mut offset = *next_offset;
        active.segment.with_index_mut(|index| {
            for msg in msgs {
                let ts = msg.timestamp_ms.unwrap_or(now);
                let pos = start + scratch.len() as u64;
                let len = record::encode(scratch, offset, ts, msg);
                // Both fit: a segment holds < 2^32 bytes and so < 2^27 records.
                active.builder.observe(
                    index,
                    (offset - base) as u32,
                    pos as u32,
                    ts,
                    len as u32,
                    false,
                );
                offset += 1;
            }
        });
        active.first_offset.get_or_insert(*next_offset);
        active.started_ms.get_or_insert(now);
        *next_offset = offset;
    }

    /// Writes the scratch buffer into the map at the written end. A write
    /// the disk has no room for is undone back to where the writes under way
    /// began ([`Log::undo_writes`]); any other failure makes the log
    /// read-only: the index already names those records.
    ///
    /// The first bytes after that start, up to the end of the page it lies
    /// in (a page they may share with records already committed), are held
    /// back and written last ([`Log::release_held`]), so that undoing never
    /// has to write over that page (on a copy-on-write filesystem a full
    /// disk refuses that too), only to punch out whole pages after it, and
    /// so that a stop in between (`kill -9`) leaves zeros to that page's end
    /// with the rest of the writes after them, none of it answered, which
    /// recovery cuts ([`crate::storage::recovery`]): a group's records are in
    /// the file whole or not at all.
    fn flush(&self, w: &mut Writer) -> Result<()> {
        if w.scratch.is_empty() {
            return Ok(());
        }
        let len = w.scratch.len() as u64;
        let at = w.active.write_pos;
        // Up to the end of the page the writes began in, however many
        // flushes it takes to get there.
        let held = w.undo.map_or(0, |mark| {
            page_end(mark.write_pos).saturating_sub(at).min(len)
        });
        if held > 0 {
            let head = &w.scratch[..held as usize];
            match &mut w.held {
                Some((from, bytes)) => {
                    debug_assert_eq!(*from + bytes.len() as u64, at, "held bytes run on");
                    bytes.extend_from_slice(head);
                }
                None => w.held = Some((at, head.to_vec())),
            }
        }
        let written = if held < len {
            w.active.map.write(at + held, &w.scratch[held as usize..])
        } else {
            Ok(())
        };
        w.scratch.clear();
        match written {
            Ok(()) => {
                w.active.write_pos += len;
                Ok(())
            }
            Err(short) => Err(self.failed_write(w, 0, at + held + short.written, short.error)),
        }
    }

    /// Writes the bytes [`Log::flush`] held back, ending writes that may be
    /// undone (and before a roll seals what they wrote).
    fn release_held(&self, w: &mut Writer) -> Result<()> {
        let Some((at, bytes)) = w.held.take() else {
            return Ok(());
        };
        match w.active.map.write(at, &bytes) {
            Ok(()) => Ok(()),
            Err(short) => {
                let reached = w.active.write_pos;
                Err(self.failed_write(w, short.written, reached, short.error))
            }
        }
    }

    /// A write into the map failed, with `head` bytes of the held page and
    /// the bytes from its end up to `reached` in the file: undone if the
    /// disk is full ([`Log::undo_writes`]), else the log turns read-only.
    fn failed_write(&self, w: &mut Writer, head: u64, reached: u64, e: std::io::Error) -> Error {
        if crate::error::is_disk_full(&e)
            && let Some(mark) = w.undo
        {
            return self.undo_writes(w, mark, head, reached, e);
        }
        let cause = format!(
            "writing into the map of {}: {e}",
            w.active.segment.paths().log.display()
        );
        self.poison(w, cause)
    }

    /// Makes the log read-only for `cause` (until a restart).
    fn poison(&self, w: &mut Writer, cause: String) -> Error {
        tracing::error!(log = %self.dir.display(), %cause, "log is now read-only");
        w.held = None;
        w.poisoned = Some(cause.clone());
        Error::ReadOnly {
            log: self.dir.clone(),
            cause,
        }
    }

    /// Takes back the writes since `mark` after the disk refused one (on a
    /// copy-on-write filesystem, or over a hole, a full disk refuses writes
    /// even into space `fallocate` reserved). What reached the file, `head`
    /// bytes of the page the mark lies in and the whole pages after it up
    /// to `reached`, is cleared (the pages punched out, which takes no
    /// room) and synced away, so no crash brings back records of a refused
    /// batch; then the writer goes back to `mark`. The log stays writable;
    /// the answer is the full disk. Should clearing fail, the log turns
    /// read-only.
    fn undo_writes(
        &self,
        w: &mut Writer,
        mark: WriteMark,
        head: u64,
        reached: u64,
        e: std::io::Error,
    ) -> Error {
        w.held = None;
        let a = &mut w.active;
        let log = a.segment.paths().log.clone();
        let pages_from = page_end(mark.write_pos);
        let cleared = (|| {
            if head > 0 {
                a.file.write_at(mark.write_pos, &vec![0; head as usize])?;
            }
            if reached > pages_from {
                a.file
                    .punch_hole(pages_from, reached.next_multiple_of(PAGE) - pages_from)?;
            }
            if head > 0 || reached > pages_from {
                a.file.sync_data()?;
            }
            Ok::<(), std::io::Error>(())
        })();
        if let Err(undo) = cleared {
            let cause = format!(
                "writing into {}: {e}; then clearing what reached the file: {undo}",
                log.display()
            );
            return self.poison(w, cause);
        }
        let base = a.segment.base();
        a.segment.with_index_mut(|index| {
            index.truncate((mark.next_offset - base) as u32, mark.write_pos as u32)
        });
        a.builder = mark.builder;
        a.first_offset = mark.first_offset;
        a.started_ms = mark.started_ms;
        a.write_pos = mark.write_pos;
        a.writeback_from = a.writeback_from.min(mark.write_pos);
        w.next_offset = mark.next_offset;
        tracing::warn!(file = %log.display(), error = %e,
            "the disk has no room for records written into space reserved for them (a copy-on-write filesystem, or a hole); they are taken back and their producers told");
        let error = Error::io(format!("writing records into {}", log.display()), e);
        let from = w
            .undone
            .as_ref()
            .map_or(mark.next_offset, |(f, _, _)| (*f).min(mark.next_offset));
        let answer = undone_error(&error, &log, w.batch_first, mark.next_offset);
        w.undone = Some((from, error, log));
        answer
    }

    /// Grows the active file ahead of the writer, never past the map, for
    /// an append of `bytes` that needs it to reach `need`: with written
    /// zeros for small appends under `fsync=always` ([`Log::grow_written`]),
    /// else with `fallocate` in steps that double.
    fn ensure_allocated(&self, active: &mut Active, need: u64, bytes: u64) -> Result<()> {
        if self.config.fsync == FsyncPolicy::Always
            && bytes <= SMALL_APPEND
            && self.grow_written(active, need)
        {
            return Ok(());
        }
        if need <= active.allocated {
            return Ok(());
        }
        let step = active
            .allocated
            .clamp(MIN_ALLOCATION_STEP, MAX_ALLOCATION_STEP);
        let target = need
            .max(active.allocated + step)
            .next_multiple_of(MIN_ALLOCATION_STEP)
            .min(active.map.capacity())
            .max(need);
        let log = &active.segment.paths().log;
        let file = &active.file;
        let target = match file.allocate(target) {
            // The step ahead does not fit, but what this write needs may.
            Err(e) if crate::error::is_disk_full(&e) => {
                let just_enough = need
                    .next_multiple_of(MIN_ALLOCATION_STEP)
                    .min(active.map.capacity())
                    .max(need);
                if just_enough >= target {
                    return Err(e).ctx(|| {
                        format!(
                            "growing {} from {} to {need} bytes for an append of {bytes}",
                            log.display(),
                            active.allocated
                        )
                    });
                }
                file.allocate(just_enough).ctx(|| {
                    format!(
                        "growing {} from {} to {need} bytes for an append of {bytes}",
                        log.display(),
                        active.allocated
                    )
                })?;
                just_enough
            }
            other => {
                other.ctx(|| {
                    format!(
                        "growing {} from {} to {target} bytes",
                        log.display(),
                        active.allocated
                    )
                })?;
                target
            }
        };
        active.allocated = target;
        Ok(())
    }

    /// Keeps written zeros past `need`, their writeback started at once: as
    /// many bytes as the file already holds, up to [`WRITTEN_AHEAD`] (so a
    /// small topic holds little more disk than it uses); `false` when that
    /// failed (a full disk)
    /// and the file does not reach `need` (the caller then reserves what
    /// it can with `fallocate`).
    ///
    /// A sync of a few KiB into blocks `fallocate` left unwritten also
    /// writes the metadata that converts them: on ext4 that made it 0.14
    /// ms instead of 0.09 (3 KiB per sync, a new block each time, as at
    /// 10 000 single-message produces a second). Written ahead, the zeros
    /// reach the disk before the records do, so the records' syncs write
    /// data only; the first record past the size the last `sync_data`
    /// made durable still takes one, once per [`WRITTEN_AHEAD`]. Each byte
    /// is written twice, which small appends can afford; a large append's
    /// sync converts its blocks in one update and does not need this.
    fn grow_written(&self, active: &mut Active, need: u64) -> bool {
        let capacity = active.map.capacity();
        let ahead = active.allocated.min(WRITTEN_AHEAD);
        let target = need
            .saturating_add(ahead)
            .next_multiple_of(MIN_ALLOCATION_STEP)
            .min(capacity)
            .max(need);
        // Topped up once half of what is ahead has been used.
        if target <= active.allocated + ahead / 2 && need <= active.allocated {
            return true;
        }
        match active.file.allocate_written(target) {
            Ok(()) => {
                let from = active.allocated;
                active
                    .map
                    .start_writeback(from, target.saturating_sub(from));
                active.allocated = active.allocated.max(target);
                true
            }
            Err(e) => {
                tracing::debug!(file = %active.segment.paths().log.display(), error = %e,
                    "could not write zeros ahead of the writer");
                need <= active.allocated
            }
        }
    }

    /// Whether a failed sync (or a panicked writer) made the log read-only:
    /// then only a restart may reopen it, since the kernel may have dropped
    /// the pages that failed.
    pub fn is_read_only(&self) -> bool {
        self.writer.lock().map_or(true, |w| w.poisoned.is_some())
    }

    fn check_writable(&self, w: &Writer) -> Result<()> {
        match &w.poisoned {
            Some(cause) => Err(Error::ReadOnly {
                log: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Takes no more records from now on (writes answer
    /// [`Error::Stopping`]); what was written before is still committed,
    /// synced and closed as usual. The first step of a final stop: a write
    /// that came after the stop's sync would be acknowledged and then not
    /// synced, though the stop was recorded as clean.
    pub fn stop_writes(&self) -> Result<()> {
        self.lock_writer()?.stopped = true;
        Ok(())
    }

    /// Makes everything written so far visible to readers, syncing first when
    /// the fsync policy asks for it. Returns what the written data now is.
    pub fn commit(&self) -> Result<Durability> {
        let mut w = self.lock_writer()?;
        self.check_writable(&w)?;
        let sync_due = match self.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(ms) => w.last_sync.elapsed() >= Duration::from_millis(ms),
            FsyncPolicy::Never => false,
        };
        if sync_due {
            self.sync_locked(&mut w)?;
        }
        self.publish_locked(&mut w);
        Ok(if w.active.synced_pos == w.active.write_pos {
            Durability::Durable
        } else {
            Durability::Written
        })
    }

    /// Syncs and publishes everything written (the fsync-interval tick, and the
    /// explicit barrier under `fsync=never`).
    pub fn sync(&self) -> Result<()> {
        let mut w = self.lock_writer()?;
        self.check_writable(&w)?;
        self.sync_locked(&mut w)?;
        self.publish_locked(&mut w);
        Ok(())
    }

    /// Syncs and publishes what is written, if anything is unsynced; the
    /// `fsync=interval` ticker calls this every MS, so nothing written waits
    /// longer than that (a commit's own sync, when MS have passed since the
    /// last one, only comes sooner). Returns whether it synced.
    pub fn sync_written(&self) -> Result<bool> {
        let mut w = self.lock_writer()?;
        self.check_writable(&w)?;
        let dirty =
            w.active.synced_pos != w.active.write_pos || w.active.write_pos > w.active.durable_size;
        if !dirty {
            return Ok(false);
        }
        self.sync_locked(&mut w)?;
        self.publish_locked(&mut w);
        Ok(true)
    }

    /// The durability point. A failure poisons the log: the kernel may have
    /// dropped the dirty pages, so a retry could report success for lost data.
    fn sync_locked(&self, w: &mut Writer) -> Result<()> {
        let a = &mut w.active;
        let past_size = a.write_pos > a.durable_size;
        if a.synced_pos == a.write_pos && !past_size {
            return Ok(());
        }
        let result = if past_size {
            a.file.sync_data()
        } else {
            a.map.sync_range(a.synced_pos, a.write_pos - a.synced_pos)
        };
        if let Err(e) = result {
            let cause = format!("sync of {} failed: {e}", a.segment.paths().log.display());
            tracing::error!(log = %self.dir.display(), %cause, "log is now read-only");
            w.poisoned = Some(cause.clone());
            return Err(Error::ReadOnly {
                log: self.dir.clone(),
                cause,
            });
        }
        a.synced_pos = a.write_pos;
        if past_size {
            a.durable_size = a.allocated;
        }
        w.last_sync = Instant::now();
        self.durable_end.store(w.next_offset, Ordering::Release);
        *self.lock_synced() = SyncedPoint {
            active_base: a.segment.base(),
            active_synced: a.synced_pos,
            durable_end: w.next_offset,
        };
        Ok(())
    }

    fn publish_locked(&self, w: &mut Writer) {
        let a = &mut w.active;
        a.segment.publish(
            a.write_pos,
            w.next_offset,
            a.first_offset,
            a.builder.max_timestamp_ms(),
        );
        a.persist_index();
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        self.release_held(w)?;
        self.sync_locked(w)?;
        self.publish_locked(w);
        // The new segment first: if it cannot be created (a full disk), the
        // current one is untouched and stays writable. A crash between the two
        // steps leaves an unsealed segment before an empty one, which recovery
        // seals (cutting its preallocated zeros).
        let active = Active::create(&*self.storage, &self.dir, w.next_offset, &self.config)
            .map_err(|e| {
                w.roll_due = true;
                Self::naming_stored_part(w, e)
            })?;
        w.roll_due = false;
        let sealed = self.seal(w).inspect_err(|e| {
            w.poisoned = Some(format!("sealing failed: {e}"));
        })?;
        let mut segments: Vec<Arc<Segment>> = self.segments().as_ref().clone();
        if let Some(last) = segments.last_mut() {
            *last = Arc::new(sealed);
        }
        segments.push(Arc::clone(&active.segment));
        self.set_segments(segments);
        *self.lock_synced() = SyncedPoint {
            active_base: active.segment.base(),
            active_synced: 0,
            durable_end: w.next_offset,
        };
        w.active = active;
        // What came before is sealed: writes undone from now on go back to
        // the new segment's start.
        if w.undo.is_some() {
            w.undo = Some(w.mark());
        }
        Ok(())
    }

    /// Seal: write the full index, cut the file to its logical end, sync file
    /// and directory, and map it read-only. Readers may still hold views of the
    /// old map; they cover only the published prefix, which stays inside the
    /// file after the cut, so no page past the new end is ever touched.
    fn seal(&self, w: &mut Writer) -> Result<Segment> {
        let a = &mut w.active;
        let seg = &a.segment;
        let log = &seg.paths().log;
        let index = seg.index_snapshot();
        // The index is a hint that the next open checks and rebuilds: failing to
        // write it (a full disk) must not fail the seal, which would poison the
        // log for good over a condition that clears.
        if let Err(e) =
            recovery::write_index(&*self.storage, seg.paths(), seg.base(), &index, false)
        {
            tracing::warn!(file = %seg.paths().idx.display(), error = %e,
                "could not write the index of a sealed segment; the next open rebuilds it");
        }
        // No map of the file takes writes once it is cut.
        a.map.seal();
        a.file
            .set_len(a.write_pos)
            .ctx(|| format!("truncating {} to seal it", log.display()))?;
        a.file
            .sync_data()
            .ctx(|| format!("syncing sealed {}", log.display()))?;
        // Only the index's entry is new in the folder since the next
        // segment's creation synced it, and the index is a hint: a folder
        // that cannot even be opened for its sync (out of descriptors, a
        // shortage that passes) must not fail the seal, which would leave
        // the log read-only until a restart.
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            if !crate::error::is_out_of_files(&e) {
                return Err(Error::io(format!("syncing {}", self.dir.display()), e));
            }
            tracing::warn!(dir = %self.dir.display(), error = %e,
                "could not sync the topic folder after sealing a segment; only its index entry waits for the next sync");
        }
        // A map of just the sealed bytes. Out of address space or
        // descriptors (a shortage that passes), the segment keeps the map it
        // was written through instead, sealed above and read only within its
        // published records, which the cut left in the file: the log stays
        // writable rather than turning read-only until a restart.
        let map = match a
            .file
            .map_read()
            .ctx(|| format!("mapping {}", log.display()))
        {
            Ok(map) => map,
            Err(e @ (Error::MemoryExhausted { .. } | Error::FilesExhausted { .. })) => {
                tracing::warn!(file = %log.display(), error = %e,
                    "could not map the sealed segment anew; it keeps the map it was written through until its topic closes");
                Arc::clone(&a.map)
            }
            Err(e) => return Err(e),
        };
        Ok(Segment::new(
            seg.base(),
            seg.paths().clone(),
            map,
            index,
            SegmentState {
                end_offset: w.next_offset,
                first_offset: a.first_offset,
                max_timestamp_ms: a.builder.max_timestamp_ms(),
            },
            self.config.max_record_len(),
            true,
        ))
    }

    /// Reads up to `max_messages` messages (and about `max_bytes` of records,
    /// at least one message) starting at the first stored offset ≥ `from`.
    /// Every record's CRC is checked; values share the map's memory.
    pub fn read(
        &self,
        from: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        self.read_records(from, max_messages, max_bytes)
            .map(|records| records.to_messages())
    }

    /// [`Log::read`], returning the records where they lie in the maps.
    pub fn read_records(
        &self,
        from: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Records> {
        let limits = ReadLimits {
            max_messages,
            max_bytes,
        };
        let segments = self.segments();
        let first = segments
            .partition_point(|s| s.base() <= from.0)
            .saturating_sub(1);
        let mut out = Records::new();
        let mut bytes = 0usize;
        for segment in &segments[first..] {
            bytes += segment.read(from.0, limits, bytes, &mut out)?;
            // A segment stops before a record that would break `max_bytes`; a
            // smaller record of the next segment may still fit, but returning it
            // would skip the one that did not.
            let cut_short = out
                .last_offset()
                .is_some_and(|o| o.0 + 1 < segment.end_offset());
            if cut_short || out.len() >= max_messages || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
        }
        Ok(out)
    }

    /// Offset of the first record with a timestamp ≥ `ts`, or the end of the
    /// log when there is none (O(log n) through the time index, then a short scan).
    pub fn offset_for_timestamp(&self, ts: u64) -> Result<Offset> {
        let segments = self.segments();
        for segment in segments.iter() {
            if let Some(offset) = segment.find_timestamp(ts)? {
                return Ok(Offset(offset));
            }
        }
        Ok(self.end())
    }

    /// Offset the next record gets, as visible to readers.
    pub fn end(&self) -> Offset {
        self.segments()
            .last()
            .map_or(Offset(0), |s| Offset(s.end_offset()))
    }

    /// Offset of the first stored record (the end when the log is empty).
    pub fn start(&self) -> Offset {
        let segments = self.segments();
        segments
            .iter()
            .find_map(|s| s.first_offset())
            .map_or_else(|| self.end(), Offset)
    }

    /// Extent and size of the log.
    pub fn stats(&self) -> LogStats {
        let segments = self.segments();
        let end = self.end();
        LogStats {
            start: self.start(),
            end,
            // A sync records its end before the publish that follows it
            // moves `end`: never more than what readers see.
            durable_end: Offset(self.durable_end.load(Ordering::Acquire).min(end.0)),
            segments: segments.len(),
            bytes: segments.iter().map(|s| s.size()).sum(),
        }
    }

    /// Drops whole sealed segments beyond the retention limits (total bytes,
    /// age of the newest record). Readers holding a dropped segment keep a
    /// valid view until they let go. Returns the bases of dropped segments.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<Vec<Offset>> {
        self.enforce_retention_within(now_ms, RetentionLimits::default())
    }

    /// [`Log::enforce_retention`] that keeps every segment holding an offset
    /// at or above `limits.floor` unless a hard limit is passed.
    pub fn enforce_retention_within(
        &self,
        now_ms: u64,
        limits: RetentionLimits,
    ) -> Result<Vec<Offset>> {
        self.enforce_retention_told(now_ms, limits, |_| {})
    }

    /// [`Log::enforce_retention_within`] that calls `told` with the start
    /// the log will have before any segment goes, so that what must hear of
    /// a drop (consumer groups) hears of it first: a crash in between then
    /// leaves them told of a drop still to come (the next pass makes it),
    /// never a drop they missed.
    pub fn enforce_retention_told(
        &self,
        now_ms: u64,
        limits: RetentionLimits,
        told: impl FnOnce(Offset),
    ) -> Result<Vec<Offset>> {
        let Some(start) = self.retention_start(now_ms, limits)? else {
            return Ok(Vec::new());
        };
        told(Offset(start));
        self.drop_below(start)
    }

    /// Whether the log is between the two halves of a compaction swap left
    /// half-way, which waits for a restart: the segments in memory are not
    /// those on disk, and retention waits too.
    fn mid_swap(&self) -> bool {
        !self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The start retention would move the log to now (see
    /// [`Log::enforce_retention_within`]); `None` if it drops nothing.
    fn retention_start(&self, now_ms: u64, limits: RetentionLimits) -> Result<Option<u64>> {
        // Not while a compaction pass rewrites the same segments.
        let _pass = self.lock_compaction();
        let mut w = self.lock_writer()?;
        if self.mid_swap() {
            return Ok(None);
        }
        // A quiet topic's active segment rolls once it is `segment_ms` old
        // here too, not only at the next write, so its records can go.
        if w.active.first_offset.is_some()
            && w.poisoned.is_none()
            && self.segment_too_old(&w.active)
            && let Err(e) = self.roll(&mut w)
        {
            tracing::warn!(log = %self.dir.display(), error = %e,
                "could not roll the active segment for its age; retention looks at the sealed ones");
        }
        let segments = self.segments();
        let sealed = segments.len().saturating_sub(1);
        let mut total: u64 = segments.iter().map(|s| s.size()).sum();
        let mut dropped = 0;
        while dropped < sealed {
            let s = &segments[dropped];
            let over_size = self
                .config
                .retention_bytes
                .is_some_and(|max| total - s.size() >= max);
            let too_old = self
                .config
                .retention_ms
                .is_some_and(|ms| s.max_timestamp_ms().saturating_add(ms) < now_ms);
            let over_hard_size = limits.hard_bytes.is_some_and(|max| total > max);
            if !(over_size || too_old || over_hard_size) {
                break;
            }
            let needed = limits.floor.is_some_and(|floor| s.end_offset() > floor);
            let past_hard_limit = over_hard_size
                || limits
                    .hard_age_ms
                    .is_some_and(|ms| s.max_timestamp_ms().saturating_add(ms) < now_ms);
            if needed && !past_hard_limit {
                break;
            }
            total -= s.size();
            dropped += 1;
        }
        if dropped == 0 {
            return Ok(None);
        }
        let start = segments[dropped..]
            .iter()
            .find_map(|s| s.first_offset())
            .unwrap_or(w.next_offset);
        Ok(Some(start))
    }

    /// Drops the sealed segments whose records are all below `start`.
    fn drop_below(&self, start: u64) -> Result<Vec<Offset>> {
        let _pass = self.lock_compaction();
        let w = self.lock_writer()?;
        if self.mid_swap() {
            return Ok(Vec::new());
        }
        let segments = self.segments();
        let sealed = segments.len().saturating_sub(1);
        let dropped = segments[..sealed]
            .iter()
            .take_while(|s| s.end_offset() <= start)
            .count();
        if dropped == 0 {
            return Ok(Vec::new());
        }
        let bases: Vec<u64> = segments[..dropped].iter().map(|s| s.base()).collect();
        self.unlist(&bases, true, "retention")?;
        self.set_segments(segments[dropped..].to_vec());
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(w);
        self.remove_dropped(&segments[..dropped])?;
        tracing::info!(log = %self.dir.display(), segments = dropped, "retention dropped segments");
        Ok(bases.into_iter().map(Offset).collect())
    }

    /// Notes `bases` as dropping and writes the checkpoint that no longer
    /// lists them: the manifest forgets segments before their files go. On
    /// failure they are listed again. When they go whole (`frees_room`) and
    /// the disk has no room for that checkpoint, where their removal is what
    /// frees room, the checkpoint goes instead (removing a file needs none),
    /// as at an open on a full disk: the log recovers as one without a
    /// checkpoint until the next is written (the broker writes one every
    /// second once there is room). `by` names the pass, for the log.
    fn unlist(&self, bases: &[u64], frees_room: bool, by: &str) -> Result<()> {
        self.note_dropping(bases);
        let failed = match self.store_checkpoint_without(None, false, bases) {
            Ok(()) => return Ok(()),
            Err(e @ Error::Full { .. }) if frees_room => match self.remove_checkpoint() {
                Ok(()) => {
                    tracing::warn!(log = %self.dir.display(), error = %e,
                        "no room for a checkpoint: {by} drops segments without one");
                    return Ok(());
                }
                Err(removed) => removed,
            },
            Err(e) => e,
        };
        self.forget_dropping(bases);
        Err(failed)
    }

    /// Removes the checkpoint, durably, if there is one.
    fn remove_checkpoint(&self) -> Result<()> {
        let mut state = self.lock_checkpoint();
        if self.storage.exists(&super::checkpoint::path(&self.dir)) {
            Checkpoint::remove(&*self.storage, &self.dir)?;
        }
        state.written = None;
        Ok(())
    }

    /// The lowest offset a power cut now could bring back into the log: its
    /// start, or lower while the files of dropped segments are not durably
    /// removed. What must stay gone across a power cut (messages every group
    /// consumed) is recorded from here, not from the start.
    pub fn recoverable_start(&self) -> Offset {
        // The start first: a drop notes its segments before the start moves
        // and forgets them only once their removal is durable.
        let start = self.start().0;
        let dropping = self.dropping.lock().unwrap_or_else(|p| p.into_inner());
        Offset(dropping.iter().copied().fold(start, u64::min))
    }

    /// Notes segments about to be dropped (see [`Log::recoverable_start`]).
    fn note_dropping(&self, bases: &[u64]) {
        let mut dropping = self.dropping.lock().unwrap_or_else(|p| p.into_inner());
        dropping.extend_from_slice(bases);
    }

    /// Takes back [`Log::note_dropping`] of `bases`: they stay (a drop that
    /// failed before anything went), or a swap took them over.
    fn forget_dropping(&self, bases: &[u64]) {
        let mut dropping = self.dropping.lock().unwrap_or_else(|p| p.into_inner());
        dropping.retain(|b| !bases.contains(b));
    }

    /// Removes the files of `dropped` segments (already gone from the
    /// manifest and the segment list) durably, then forgets them as dropping.
    /// On failure they stay noted: they may still come back.
    pub(crate) fn remove_dropped(&self, dropped: &[Arc<Segment>]) -> Result<()> {
        for s in dropped {
            self.remove_segment_files(s.paths())?;
        }
        self.storage
            .sync_dir(&self.dir)
            .ctx(|| format!("syncing {}", self.dir.display()))?;
        let mut dropping = self.dropping.lock().unwrap_or_else(|p| p.into_inner());
        dropping.retain(|b| !dropped.iter().any(|s| s.base() == *b));
        Ok(())
    }

    fn remove_segment_files(&self, paths: &SegmentPaths) -> Result<()> {
        for path in [&paths.log, &paths.idx, &paths.tix] {
            if self.storage.exists(path) {
                self.storage
                    .remove_file(path)
                    .ctx(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Syncs what was written and persists the index: a clean stop leaves no
    /// recovery work. The active segment stays active for the next open.
    pub fn close(self) -> Result<()> {
        let mut w = self.lock_writer()?;
        if w.poisoned.is_some() {
            return Ok(());
        }
        self.sync_locked(&mut w)?;
        self.publish_locked(&mut w);
        drop(w);
        self.store_checkpoint(None, true)
    }
}

impl Active {
    /// Creates the files of a new, empty segment and makes their names durable.
    fn create(storage: &dyn Storage, dir: &Path, base: u64, config: &LogConfig) -> Result<Active> {
        let paths = SegmentPaths::new(dir, base);
        // An empty file left by an earlier attempt that failed half-way is reused.
        let file = storage
            .open(&paths.log, OpenMode::CreateOrOpen)
            .ctx(|| format!("creating {}", paths.log.display()))?;
        if file
            .len()
            .ctx(|| format!("reading size of {}", paths.log.display()))?
            != 0
        {
            return Err(Error::AlreadyExists(format!(
                "new segment {} already holds data",
                paths.log.display()
            )));
        }
        let opened = OpenedSegment {
            base,
            paths,
            file,
            index: Default::default(),
            builder: IndexBuilder::new(config.index_interval_bytes),
            state: SegmentState {
                end_offset: base,
                first_offset: None,
                max_timestamp_ms: 0,
            },
            end_position: 0,
        };
        let active = Active::resume(storage, opened, config)?;
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))?;
        Ok(active)
    }

    /// Takes over a recovered segment for appending.
    fn resume(storage: &dyn Storage, opened: OpenedSegment, config: &LogConfig) -> Result<Active> {
        let OpenedSegment {
            base,
            paths,
            file,
            index,
            builder,
            state,
            end_position,
        } = opened;
        let open = |path: &Path| {
            storage
                .open(path, OpenMode::CreateOrOpen)
                .ctx(|| format!("opening {}", path.display()))
        };
        let idx = open(&paths.idx)?;
        let tix = open(&paths.tix)?;
        let allocated = file
            .len()
            .ctx(|| format!("reading size of {}", paths.log.display()))?;
        let capacity = config.segment_bytes.max(end_position);
        let map = file
            .map_append(capacity, end_position)
            .ctx(|| format!("mapping {}", paths.log.display()))?;
        let (idx_persisted, tix_persisted) =
            (index.offset_entries().len(), index.time_entries().len());
        // A reopened segment is as old as its first record (a producer's
        // timestamp in the future counts as now).
        let started_ms = state.first_offset.map(|_| {
            map.bytes(0, (record::HEADER_LEN as u64).min(end_position))
                .ok()
                .and_then(|head| record::header_timestamp(&head))
                .map_or_else(now_ms, |ts| ts.min(now_ms()))
        });
        let segment = Arc::new(Segment::new(
            base,
            paths,
            Arc::clone(&map),
            index,
            state,
            config.max_record_len(),
            false,
        ));
        Ok(Active {
            segment,
            file,
            map,
            builder,
            idx,
            tix,
            idx_persisted,
            tix_persisted,
            index_failing: false,
            first_offset: state.first_offset,
            write_pos: end_position,
            synced_pos: end_position,
            allocated,
            writeback_from: end_position,
            // Durable as found: `Log::open` syncs the recovered file (a new
            // segment is empty).
            durable_size: allocated,
            started_ms,
        })
    }

    /// Bytes written since the last sync or started writeback.
    fn unstarted_writeback(&self) -> u64 {
        self.write_pos
            .saturating_sub(self.writeback_from.max(self.synced_pos))
    }

    /// Starts the writeback of the whole pages written since the last sync
    /// or the last call, leaving the page the written end falls in.
    fn start_writeback(&mut self) {
        let from = self.writeback_from.max(self.synced_pos) / PAGE * PAGE;
        let to = self.write_pos / PAGE * PAGE;
        if to > from {
            self.map.start_writeback(from, to - from);
            self.writeback_from = to;
        }
    }

    /// Appends new index entries to `.idx`/`.tix` (hints: not synced; a failure
    /// only costs a longer scan at the next open).
    fn persist_index(&mut self) {
        let (offsets, times, idx_count, tix_count) = {
            let (idx_from, tix_from) = (self.idx_persisted, self.tix_persisted);
            let base = self.segment.base();
            self.segment.with_index(|index| {
                (
                    index.encode_offsets(idx_from),
                    index.encode_times(base, tix_from),
                    index.offset_entries().len(),
                    index.time_entries().len(),
                )
            })
        };
        if offsets.is_empty() && times.is_empty() {
            return;
        }
        let idx_at = (self.idx_persisted * super::index::OFFSET_ENTRY_LEN) as u64;
        let tix_at = (self.tix_persisted * super::index::TIME_ENTRY_LEN) as u64;
        match (
            self.idx.write_at(idx_at, &offsets),
            self.tix.write_at(tix_at, &times),
        ) {
            (Ok(()), Ok(())) => {
                self.idx_persisted = idx_count;
                self.tix_persisted = tix_count;
                if std::mem::take(&mut self.index_failing) {
                    tracing::info!(file = %self.segment.paths().idx.display(), "index entries persisted again");
                }
            }
            // Once per spell: a full disk refuses it at every commit.
            (Err(e), _) | (_, Err(e)) if !self.index_failing => {
                self.index_failing = true;
                tracing::warn!(file = %self.segment.paths().idx.display(), error = %e,
                    "could not persist index entries; the next open rebuilds them (said again once they are persisted)");
            }
            (Err(_), _) | (_, Err(_)) => {}
        }
    }
}

/// Wraps a recovered segment for reading.
pub(crate) fn sealed_segment(opened: OpenedSegment, config: &LogConfig) -> Result<Segment> {
    let map = opened
        .file
        .map_read()
        .ctx(|| format!("mapping {}", opened.paths.log.display()))?;
    // The file closes here: the map is all a sealed segment needs.
    Ok(Segment::new(
        opened.base,
        opened.paths,
        map,
        opened.index,
        opened.state,
        config.max_record_len(),
        true,
    ))
}

/// Removes `.idx`/`.tix` files whose `.log` is gone (left by an interrupted removal).
fn remove_orphan_indexes(
    storage: &dyn Storage,
    dir: &Path,
    names: &[String],
    bases: &[u64],
) -> Result<()> {
    for name in names {
        let Some(stem) = name
            .strip_suffix(".idx")
            .or_else(|| name.strip_suffix(".tix"))
        else {
            continue;
        };
        if parse_log_name(&format!("{stem}.log")).is_some_and(|b| bases.binary_search(&b).is_err())
        {
            let path = dir.join(name);
            storage
                .remove_file(&path)
                .ctx(|| format!("removing orphan {}", path.display()))?;
        }
    }
    Ok(())
}

/// Every segment the checkpoint lists must be there, unless an interrupted
/// compaction swap (`swaps`: `(base, until)` ranges it completed) retired it.
/// A segment the manifest does not know is either newer than the checkpoint
/// (above its last segment) or left by a removal a crash interrupted; both
/// are kept.
fn check_manifest(
    dir: &Path,
    checkpoint: &Checkpoint,
    bases: &[u64],
    swaps: &[std::ops::Range<u64>],
    mode: RecoveryMode,
    report: &mut RecoveryReport,
) -> Result<()> {
    for (base, offsets) in checkpoint.missing_segments(bases, swaps) {
        let until = offsets.end;
        let damage = Corruption {
            file: SegmentPaths::new(dir, base).log,
            bytes: 0..0,
            offsets: Some(offsets),
            detail: format!(
                "segment file is missing: the log's checkpoint lists it, holding offsets from {base}{}. \
                 Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) to give them up",
                if until > base {
                    format!(" up to {until}")
                } else {
                    String::new()
                }
            ),
        };
        if mode == RecoveryMode::TolerateTornTail {
            return Err(Error::corruption(damage));
        }
        tracing::error!(damage = %damage.given_up(), "giving up a missing segment");
        report.quarantined.push(damage);
    }
    let listed = &checkpoint.segments;
    if let Some(&last_listed) = listed.last() {
        for &base in bases {
            if base < last_listed && listed.binary_search(&base).is_err() {
                tracing::warn!(file = %SegmentPaths::new(dir, base).log.display(),
                    "segment not in the checkpoint (a removal was interrupted); keeping it");
            }
        }
    }
    Ok(())
}

/// Segments must not overlap: each starts at or after the previous one's end.
fn check_order(segments: &[Arc<Segment>]) -> Result<()> {
    for pair in segments.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.end_offset() > b.base() {
            return Err(Error::corruption(Corruption {
                file: a.paths().log.clone(),
                bytes: 0..a.size(),
                offsets: Some(b.base()..a.end_offset()),
                detail: format!(
                    "segment holds offsets up to {} but the next segment {} starts at {}",
                    a.end_offset() - 1,
                    b.paths().log.display(),
                    b.base()
                ),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::SimDisk;

    /// A drop writes a checkpoint without its segments, then takes them
    /// out of the list in memory, then removes their files. A checkpoint
    /// written in between (the broker writes one every second) listed them
    /// again, so a `kill -9` once their files were gone left a topic that
    /// refused to open ("segment file is missing: the log's checkpoint
    /// lists it").
    #[test]
    fn a_segment_noted_as_dropping_is_never_listed_again() {
        let disk = Arc::new(SimDisk::new());
        let storage: Arc<dyn Storage> = disk;
        let dir = Path::new("/t");
        let config = LogConfig {
            segment_bytes: 1024,
            ..LogConfig::default()
        };
        let log =
            Log::open(Arc::clone(&storage), dir, config, RecoveryMode::default()).expect("open");
        for i in 0..40 {
            let value = format!("message {i:04} {}", "x".repeat(60));
            log.append(&[NewMessage::from_value(value)])
                .expect("append");
        }
        let first = log.segments()[0].base();
        assert!(log.segments().len() > 2, "several segments");
        log.note_dropping(&[first]);
        log.store_checkpoint(None, false).expect("checkpoint");
        let c = Checkpoint::load(&*storage, dir)
            .expect("load")
            .expect("a checkpoint");
        assert!(
            !c.segments.contains(&first),
            "a segment being dropped is not listed: {:?}",
            c.segments
        );
    }
}
