//! Opening a segment after any kind of stop: validate its index against the
//! log, scan from the last trusted entry, and decide what the bytes after the
//! last valid record are.
//!
//! | after the last valid record          | active segment          | sealed segment            |
//! |--------------------------------------|-------------------------|---------------------------|
//! | nothing, or only zeros               | normal (preallocation)  | zeros cut (interrupted seal) |
//! | bytes, and no valid record after them| torn tail: cut, logged  | damage                    |
//! | bytes, then valid records again      | damage (1)              | damage                    |
//!
//! (1) Past the recovery point of a log under `fsync=interval`/`never` that
//! has a checkpoint, bad bytes holding a whole 512-byte sector of zeros are
//! a write the disk lost out of order before a power cut (none of those
//! bytes was promised to survive): they are set aside as skip-damaged does,
//! in either mode, and the records after them kept.
//!
//! A torn write can only touch bytes that were never synced: in the active
//! segment, anything that stops the scan before the recovery point (the
//! synced length the log's checkpoint records, see
//! [`crate::storage::checkpoint`]) is damage too, zeros and a short file
//! included.
//!
//! Damage refuses to open under [`RecoveryMode::TolerateTornTail`] with an error
//! naming the file, byte range and offsets; [`RecoveryMode::SkipDamaged`] copies
//! the range to `quarantine/`, overwrites it with a filler record that readers
//! skip, and goes on.

use super::checkpoint::Checkpoint;
use super::config::MAX_SEGMENT_BYTES;
use super::config::{FsyncPolicy, LogConfig, RecoveryMode};
use super::index::{IndexBuilder, SegmentIndex, TIME_ENTRY_LEN};
use super::io::{OpenMode, Storage, StorageFile, file_len, read_file_within};
use super::record::{self, Frame, HEADER_LEN, RECORD_MAGIC};
use super::segment::{SegmentPaths, SegmentState, parse_log_name};
use crate::error::{Corruption, Error, IoContext, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Folder (inside a log's directory) that receives quarantined byte ranges.
pub const QUARANTINE_DIR: &str = "quarantine";

/// A cut made while opening a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The file that was cut.
    pub file: PathBuf,
    /// Its new length: the end of the last valid record.
    pub at: u64,
    /// Bytes dropped after it.
    pub dropped: u64,
}

/// What opening a log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Torn tails and zero tails cut.
    pub truncations: Vec<Truncation>,
    /// Index files rebuilt from their log.
    pub rebuilt_indexes: Vec<PathBuf>,
    /// Damage given up (only under [`RecoveryMode::SkipDamaged`]): ranges
    /// quarantined, files missing.
    pub quarantined: Vec<Corruption>,
    /// Offset ranges the log skipped so that offsets a lost range held are
    /// never handed out again.
    pub skipped: Vec<std::ops::Range<u64>>,
}

impl RecoveryReport {
    /// True when the log was opened exactly as it was left.
    pub fn is_clean(&self) -> bool {
        self.truncations.is_empty() && self.rebuilt_indexes.is_empty() && !self.changed_records()
    }

    /// True when recovery cut, gave up or skipped anything (an index
    /// rebuilt from its log changes no record).
    pub fn changed_records(&self) -> bool {
        !self.truncations.is_empty() || !self.quarantined.is_empty() || !self.skipped.is_empty()
    }
}

/// One line for the log: what was cut, rebuilt, given up and skipped.
impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for t in &self.truncations {
            parts.push(format!(
                "cut {} bytes after byte {} of {}",
                t.dropped,
                t.at,
                t.file.display()
            ));
        }
        if !self.rebuilt_indexes.is_empty() {
            parts.push(format!(
                "rebuilt {} index file(s)",
                self.rebuilt_indexes.len()
            ));
        }
        for c in &self.quarantined {
            parts.push(format!("gave up {}", c.given_up()));
        }
        for r in &self.skipped {
            parts.push(format!("skipped offsets {}..{}", r.start, r.end));
        }
        if parts.is_empty() {
            f.write_str("nothing to do")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// A segment as recovery left it, ready to be wrapped for reading or appending.
#[derive(Debug)]
pub struct OpenedSegment {
    /// Base offset.
    pub base: u64,
    /// Its files.
    pub paths: SegmentPaths,
    /// The open `.log`.
    pub file: Arc<dyn StorageFile>,
    /// Index covering every valid record.
    pub index: SegmentIndex,
    /// Builder positioned after the last record (for appending).
    pub builder: IndexBuilder,
    /// Published content.
    pub state: SegmentState,
    /// Byte position after the last valid record.
    pub end_position: u64,
}

/// Where the scan stopped.
pub(crate) enum Stop {
    /// At the end of the file, or where only zeros follow.
    Clean,
    /// At a record that does not validate (or breaks the offset order).
    Invalid(String),
}

/// Opens the segment `base` of the log in `dir`, repairing what `mode` allows.
/// `next_base` is the base of the following segment, `None` for the active
/// one; `synced_to` is how many of its bytes are known synced (the recovery
/// point), below which nothing may be cut as a torn tail: `None` when the
/// log has no checkpoint (nothing is known synced, and no bad bytes are
/// taken for pages lost out of order, which only a recovery point bounds).
#[allow(clippy::too_many_arguments)]
pub fn open_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    next_base: Option<u64>,
    config: &LogConfig,
    mode: RecoveryMode,
    synced_to: Option<u64>,
    report: &mut RecoveryReport,
) -> Result<OpenedSegment> {
    let point_known = synced_to.is_some();
    let synced_to = synced_to.unwrap_or(0);
    let active = next_base.is_none();
    let paths = SegmentPaths::new(dir, base);
    let log = &paths.log;
    let file = storage
        .open(log, OpenMode::Existing)
        .ctx(|| format!("opening {}", log.display()))?;
    let len = file
        .len()
        .ctx(|| format!("reading size of {}", log.display()))?;
    let oversized = len > MAX_SEGMENT_BYTES;
    if oversized {
        // Positions are 32-bit: no byte past that is a record spool wrote
        // (a sparse file of any size may sit there, and scanning its zeros
        // would take hours).
        let damage = Corruption {
            file: log.clone(),
            bytes: MAX_SEGMENT_BYTES..len,
            offsets: None,
            detail: format!(
                "{}. Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                 to cut the bytes past that and open anyway",
                oversized_segment(len)
            ),
        };
        if mode == RecoveryMode::TolerateTornTail {
            return Err(Error::corruption(damage));
        }
        tracing::error!(damage = %damage.given_up(), "cutting a segment longer than a segment can be");
        report.quarantined.push(damage);
        file.set_len(MAX_SEGMENT_BYTES)
            .ctx(|| format!("truncating {}", log.display()))?;
        file.sync_data()
            .ctx(|| format!("syncing {}", log.display()))?;
    }
    let max_len = config.max_record_len();
    // In the active segment, index entries past the recovery point may
    // name records written after a hole the crash left (pages reach the
    // disk in any order): the scan starts at or below that point, so a hole
    // anywhere in the unsynced tail is found.
    let trusted_to = if active { synced_to } else { u64::MAX };
    let (mut index, loaded) = load_index(storage, &paths, base, &*file, max_len, trusted_to)?;
    if mode == RecoveryMode::SkipDamaged {
        // The operator asked to open despite damage: check every record, not
        // just those after the last index entry, so damage anywhere is
        // quarantined instead of failing every read that reaches it.
        index = SegmentIndex::default();
    }

    let mut builder = IndexBuilder::resume(config.index_interval_bytes, &index);
    let mut pos = index
        .offset_entries()
        .last()
        .map_or(0, |e| u64::from(e.position));
    let mut last_offset: Option<u64> = None;
    let mut first_offset = index
        .offset_entries()
        .first()
        .map(|e| base + u64::from(e.relative));
    loop {
        let len = file
            .len()
            .ctx(|| format!("reading size of {}", log.display()))?;
        let map = file
            .map_read()
            .ctx(|| format!("mapping {}", log.display()))?;
        let data = map
            .bytes(0, len)
            .ctx(|| format!("reading {}", log.display()))?;
        let stop = scan(
            &data,
            &mut pos,
            base,
            &mut index,
            &mut builder,
            &mut last_offset,
            &mut first_offset,
            max_len,
        );
        let Stop::Invalid(why) = stop else {
            if active && pos < synced_to {
                // The synced part of the segment ends early: its bytes were
                // zeroed or cut after they reached the disk.
                let damage = Corruption {
                    file: log.clone(),
                    bytes: pos..synced_to,
                    offsets: None,
                    detail: format!(
                        "{} where the checkpoint records synced records up to byte {synced_to} \
                         (records from offset {} on are gone). \
                         Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                         to give the range up and open anyway",
                        if pos < len { "zeros" } else { "the file ends" },
                        last_offset.map_or(base, |o| o + 1)
                    ),
                };
                if mode == RecoveryMode::TolerateTornTail {
                    return Err(Error::corruption(damage));
                }
                tracing::error!(damage = %damage.given_up(), "giving up synced bytes that are gone");
                report.quarantined.push(damage);
            }
            // Clean end or zeros: a sealed segment must end exactly at its
            // last record. A roll creates the next segment before it seals
            // this one, so a stop between the two leaves this one's
            // preallocated zeros after a record just below the next base;
            // zeros anywhere else are records zeroed after they were written.
            if pos < len && !active {
                let end = last_offset.map_or(base, |o| o + 1);
                if let Some(next) = next_base.filter(|&n| n != end) {
                    let damage = Corruption {
                        file: log.clone(),
                        bytes: pos..len,
                        offsets: Some(end..next),
                        detail: format!(
                            "zeros where this sealed segment's records from offset {end} up to the \
                             next segment's base {next} belong. Start with recovery mode skip-damaged \
                             (`spool serve --recovery skip-damaged`) to give the range up and open anyway"
                        ),
                    };
                    if mode == RecoveryMode::TolerateTornTail {
                        return Err(Error::corruption(damage));
                    }
                    tracing::error!(damage = %damage.given_up(), "giving up zeroed records of a sealed segment");
                    report.quarantined.push(damage);
                } else {
                    tracing::warn!(file = %log.display(), at = pos, dropped = len - pos,
                        "cut zero tail of a sealed segment (a seal was interrupted)");
                }
                cut(&*file, log, pos, len, report)?;
            }
            break;
        };
        let next_valid = find_next_valid(
            &data,
            pos,
            last_offset,
            max_len,
            Some(segment_bound(base, next_base)),
            active.then(|| last_offset.map_or(base, |o| o + 1)),
        );
        if next_valid.is_none() && active && pos >= synced_to {
            cut(&*file, log, pos, len, report)?;
            tracing::warn!(file = %log.display(), at = pos, dropped = len - pos, reason = %why,
                "cut torn tail of the active segment");
            break;
        }
        // The writer writes the first bytes of a group of writes, those that
        // share a page with the records before them, last (`Log::flush`): a
        // stop in between leaves zeros from the last record exactly to the
        // page boundary and the rest of the group after them, none of it
        // answered yet. Cut there, like a torn tail.
        // Their bytes are copied to quarantine/ first: under `fsync=always`
        // a disk that lost a synced write of that page would look the same.
        // Before the rule for lost pages below: a `kill -9` leaves this
        // shape under every policy, and setting the hole aside would keep the
        // rest of a batch that was never answered without its first records.
        if next_valid.is_some()
            && active
            && point_known
            && pos >= synced_to
            && is_held_page_gap(&data, pos)
        {
            let written = data[pos as usize..]
                .iter()
                .rposition(|&b| b != 0)
                .map_or(pos, |i| pos + i as u64 + 1);
            let unanswered = Corruption {
                file: log.clone(),
                bytes: pos..written,
                offsets: None,
                detail: "writes stopped before the page they began in was written (it is written \
                         last), past the recovery point"
                    .into(),
            };
            quarantine(storage, dir, &*file, &unanswered)?;
            cut(&*file, log, pos, len, report)?;
            tracing::warn!(file = %log.display(), at = pos, dropped = written - pos,
                "cut the records of writes stopped before the page they began in, which they write last (none answered, unless the disk lost a synced write; their bytes are in quarantine/)");
            break;
        }
        // Under `interval`/`never` nothing past the recovery point was
        // promised to survive a power cut, and the disk may have written a
        // later page of it and lost an earlier one (which reads as zeros):
        // such bad bytes are set aside and the records after them kept, in
        // either recovery mode. Only a checkpoint's recovery point bounds
        // what may be unsynced, and a flipped bit is no lost write.
        let unsynced_hole = next_valid.is_some()
            && active
            && point_known
            && pos >= synced_to
            && config.fsync != FsyncPolicy::Always
            && looks_like_lost_pages(&data, pos..next_valid.map_or(0, |(q, _)| q));
        let damaged_end = next_valid.map_or(len, |(q, _)| q);
        let first_lost = last_offset.map_or(base, |o| o + 1);
        // Without a valid record after the damage, a sealed segment lost every
        // offset up to the next segment's base.
        let lost_end = next_valid
            .map(|(_, o)| o)
            .or(next_base)
            .unwrap_or(first_lost);
        let damage = Corruption {
            file: log.clone(),
            bytes: pos..damaged_end,
            offsets: Some(first_lost..lost_end),
            detail: if unsynced_hole {
                format!(
                    "{why}; valid records follow it, past the recovery point (byte {synced_to} was \
                     synced) under fsync={}: pages the disk wrote out of order before a power cut",
                    config.fsync
                )
            } else {
                format!(
                    "{why}; {}. Start with recovery mode skip-damaged \
                 (`spool serve --recovery skip-damaged`) to quarantine the range and open anyway",
                    if next_valid.is_some() {
                        "valid records follow it".to_string()
                    } else if active {
                        format!(
                            "it lies below the recovery point (byte {synced_to} was synced), so it is not a torn write"
                        )
                    } else {
                        "valid records do not follow it in this sealed segment".to_string()
                    }
                )
            },
        };
        if mode == RecoveryMode::TolerateTornTail && !unsynced_hole {
            return Err(Error::corruption(damage));
        }
        quarantine(storage, dir, &*file, &damage)?;
        if unsynced_hole {
            tracing::warn!(damage = %damage.given_up(), "set aside a hole in the unsynced tail of the active segment");
        } else {
            tracing::error!(damage = %damage.given_up(), "quarantined damaged range");
        }
        report.quarantined.push(damage);
        match next_valid {
            Some((q, _)) => {
                let filler = record::filler((q - pos) as usize, first_lost, 0);
                file.write_at(pos, &filler)
                    .ctx(|| format!("writing filler into {}", log.display()))?;
                file.sync_data()
                    .ctx(|| format!("syncing {}", log.display()))?;
            }
            None => {
                file.set_len(pos)
                    .ctx(|| format!("truncating {}", log.display()))?;
                file.sync_data()
                    .ctx(|| format!("syncing {}", log.display()))?;
                break;
            }
        }
    }

    if oversized && active {
        // The zeros after the records are no preallocation of spool's:
        // without them the writer allocates (and `fallocate`s) afresh.
        file.set_len(pos)
            .ctx(|| format!("truncating {}", log.display()))?;
        file.sync_data()
            .ctx(|| format!("syncing {}", log.display()))?;
    }
    let end_offset = last_offset.map_or(base, |o| o + 1);
    if loaded.as_ref() != Some(&index) {
        // A hint: one a full disk has no room for costs the next open this
        // scan again, nothing more.
        // Durable: entries an earlier power cut left (of records it took,
        // written again since at the same places) must not come back with
        // a later one, and pass their checks for the new records.
        match write_index(storage, &paths, base, &index, true) {
            Err(e @ Error::Full { .. }) => {
                tracing::warn!(file = %paths.idx.display(), error = %e,
                    "index not written; the next open rebuilds it again");
            }
            other => other?,
        }
        let was_written = loaded
            .as_ref()
            .is_some_and(|l| !l.offset_entries().is_empty());
        if was_written || !active || loaded.is_none() {
            // Logged by the log's open: a compaction pass building the
            // index of the segment it wrote repairs nothing.
            report.rebuilt_indexes.push(paths.idx.clone());
        }
    }
    Ok(OpenedSegment {
        base,
        paths,
        file,
        builder,
        state: SegmentState {
            end_offset,
            first_offset,
            max_timestamp_ms: builder.max_timestamp_ms(),
        },
        index,
        end_position: pos,
    })
}

/// Whether `data` holds zeros from `pos` (where the records stop) exactly
/// to the end of the page it lies in and something after it: the page a
/// group of writes began in, which the writer writes last (see
/// `Log::flush`), not yet written when it stopped.
pub(crate) fn is_held_page_gap(data: &[u8], pos: u64) -> bool {
    let boundary = super::log::page_end(pos);
    (boundary as usize) < data.len()
        && data[pos as usize..boundary as usize]
            .iter()
            .all(|&b| b == 0)
}

/// Whether the bad bytes `bad` of a segment or journal whose content is
/// `data` look like a write the disk never made: a whole 512-byte sector of
/// zeros (an unwritten block reads as zeros; a flipped bit or a record
/// written over does not) ends within them. The sector may begin before
/// them, in the last bytes of the valid record before, when those are zeros
/// too (that record then still validates).
pub(crate) fn looks_like_lost_pages(data: &[u8], bad: std::ops::Range<u64>) -> bool {
    const SECTOR: u64 = 512;
    let mut sector = bad.start / SECTOR * SECTOR;
    while sector + SECTOR <= bad.end {
        let zeros = data
            .get(sector as usize..(sector + SECTOR) as usize)
            .is_some_and(|s| s.iter().all(|&b| b == 0));
        if zeros {
            return true;
        }
        sector += SECTOR;
    }
    false
}

/// Scans records from `*pos`, extending the index, until the data ends, turns
/// to zeros, or a record fails. Leaves `*pos` after the last valid record.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan(
    data: &[u8],
    pos: &mut u64,
    base: u64,
    index: &mut SegmentIndex,
    builder: &mut IndexBuilder,
    last_offset: &mut Option<u64>,
    first_offset: &mut Option<u64>,
    max_len: u32,
) -> Stop {
    while (*pos as usize) < data.len() {
        let at = *pos as usize;
        let r = match record::decode(&data[at..], max_len) {
            Ok(Frame::Record(r)) => r,
            Ok(Frame::End) => {
                return if data[at..].iter().all(|&b| b == 0) {
                    Stop::Clean
                } else {
                    Stop::Invalid("zeroed record header".into())
                };
            }
            Err(e) => return Stop::Invalid(e.to_string()),
        };
        if !r.is_filler() {
            if r.offset < base || last_offset.is_some_and(|last| r.offset <= last) {
                return Stop::Invalid(format!(
                    "offset {} does not follow {}",
                    r.offset,
                    last_offset.map_or(base, |l| l + 1)
                ));
            }
            let Ok(relative) = u32::try_from(r.offset - base) else {
                return Stop::Invalid(format!("offset {} too far from base {base}", r.offset));
            };
            builder.observe(index, relative, at as u32, r.timestamp_ms, r.len, false);
            *last_offset = Some(r.offset);
            first_offset.get_or_insert(r.offset);
        } else {
            builder.observe(index, 0, at as u32, 0, r.len, true);
        }
        *pos += u64::from(r.len);
    }
    Stop::Clean
}

/// The next position after the invalid record at `from` where a valid
/// record with an offset past `last_offset` (and below `below`, if given)
/// starts, with that offset.
///
/// The search starts past the bytes the record at `from` claims when its
/// header is plausible: a torn record's own value may hold bytes that read
/// as a valid record (a message carrying a spool segment, say), which must
/// not pass for records after the tear. It never starts within
/// [`HEADER_LEN`] of `from`, so a filler always fits the range before it.
///
/// `dense_from`: in the active segment, whose offsets follow one another
/// (nothing is compacted out of it), the offset the record at `from`
/// should have. A candidate there can be at most one offset further for
/// every [`HEADER_LEN`] bytes skipped, since each record in between took at
/// least that much: a record inside the value of one cut at the end of the
/// file (whose header claims more than the file holds) is not taken for
/// one after it, while the records after a damaged length field still are.
pub(crate) fn find_next_valid(
    data: &[u8],
    from: u64,
    last_offset: Option<u64>,
    max_len: u32,
    below: Option<u64>,
    dense_from: Option<u64>,
) -> Option<(u64, u64)> {
    let from = from as usize;
    let skip = record::claimed_len(data.get(from..)?, max_len).unwrap_or(HEADER_LEN);
    let mut at = from + skip;
    while at < data.len() {
        let hit = data[at..].iter().position(|&b| b == RECORD_MAGIC)?;
        at += hit;
        if let Ok(Frame::Record(r)) = record::decode(&data[at..], max_len)
            && last_offset.is_none_or(|last| r.offset > last)
            && below.is_none_or(|b| r.offset < b)
            && dense_from.is_none_or(|expected| {
                r.offset - expected.min(r.offset) <= ((at - from) / HEADER_LEN) as u64
            })
        {
            return Some((at as u64, r.offset));
        }
        at += 1;
    }
    None
}

/// The offsets a record of segment `base` may have: below the next
/// segment's base, and within the 2^32 a segment's index can address.
pub(crate) fn segment_bound(base: u64, next_base: Option<u64>) -> u64 {
    let addressable = base.saturating_add(u64::from(u32::MAX) + 1);
    next_base.map_or(addressable, |n| n.min(addressable))
}

fn cut(
    file: &dyn StorageFile,
    log: &Path,
    at: u64,
    len: u64,
    report: &mut RecoveryReport,
) -> Result<()> {
    file.set_len(at)
        .ctx(|| format!("truncating {} at byte {at}", log.display()))?;
    file.sync_data()
        .ctx(|| format!("syncing {}", log.display()))?;
    report.truncations.push(Truncation {
        file: log.to_owned(),
        at,
        dropped: len - at,
    });
    Ok(())
}

/// What is wrong with a segment file of `len` bytes, more than any holds
/// (the broker's refusal and `verify`'s finding).
pub(crate) fn oversized_segment(len: u64) -> String {
    format!("the file is {len} bytes, more than a segment holds ({MAX_SEGMENT_BYTES} at most)")
}

/// Copies a damaged range out to `quarantine/<log name>.<start>-<end>`, durably.
fn quarantine(
    storage: &dyn Storage,
    dir: &Path,
    file: &dyn StorageFile,
    damage: &Corruption,
) -> Result<()> {
    let mut bytes = vec![0u8; (damage.bytes.end - damage.bytes.start) as usize];
    file.read_at(damage.bytes.start, &mut bytes)
        .ctx(|| format!("reading damaged range of {}", damage.file.display()))?;
    quarantine_bytes(storage, dir, damage, &bytes)
}

/// `dir`'s `quarantine/` folder, made if missing, its name durable before
/// anything it is to save is replaced or moved: a copy in it may be the
/// only one.
pub(crate) fn quarantine_dir(storage: &dyn Storage, dir: &Path) -> Result<PathBuf> {
    let qdir = dir.join(QUARANTINE_DIR);
    if !storage.exists(&qdir) {
        storage
            .create_dir_all(&qdir)
            .ctx(|| format!("creating {}", qdir.display()))?;
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))?;
    }
    Ok(qdir)
}

/// Where in `qdir` (a `quarantine/` folder) the range `damage` names is
/// saved: `<file name>.<start>-<end>`, or with `.<n>` added, the first
/// number free, when a copy of other bytes holds that name (the same range
/// of a file damaged again, a snapshot of the same length): that one is
/// kept. A name whose file `reuse` accepts is taken as it is.
pub(crate) fn quarantine_name(
    storage: &dyn Storage,
    qdir: &Path,
    damage: &Corruption,
    reuse: impl Fn(&Path) -> bool,
) -> PathBuf {
    let name = damage
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    let stem = format!("{name}.{}-{}", damage.bytes.start, damage.bytes.end);
    let mut target = qdir.join(&stem);
    for n in 1u32.. {
        if !storage.exists(&target) || reuse(&target) {
            break;
        }
        target = qdir.join(format!("{stem}.{n}"));
    }
    target
}

/// Writes `bytes`, the damaged range `damage` names, to
/// `dir/quarantine/<file name>.<start>-<end>` (`.<n>` added when a copy
/// of other bytes holds that name), durably.
pub(crate) fn quarantine_bytes(
    storage: &dyn Storage,
    dir: &Path,
    damage: &Corruption,
    bytes: &[u8],
) -> Result<()> {
    let qdir = quarantine_dir(storage, dir)?;
    // The same bytes again (a retry) reuse their name.
    let target = quarantine_name(storage, &qdir, damage, |held| {
        read_file_within(storage, held, bytes.len() as u64).is_ok_and(|held| held == bytes)
    });
    // A new file (never one elsewhere written through a link left at the
    // name), or the copy a retry made, synced again.
    let out = if storage.exists(&target) {
        storage
            .open(&target, OpenMode::Existing)
            .ctx(|| format!("opening {}", target.display()))?
    } else {
        let out = storage
            .open(&target, OpenMode::CreateNew)
            .ctx(|| format!("creating {}", target.display()))?;
        out.write_at(0, bytes)
            .ctx(|| format!("writing {}", target.display()))?;
        out
    };
    out.sync_data()
        .ctx(|| format!("syncing {}", target.display()))?;
    storage
        .sync_dir(&qdir)
        .ctx(|| format!("syncing {}", qdir.display()))?;
    Ok(())
}

/// Loads `.idx`/`.tix` and keeps the entries that agree with the log and
/// sit at or below byte `trusted_to`. Returns the index and what the files
/// held (`None` when malformed), to tell whether they need rewriting.
fn load_index(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    base: u64,
    log: &dyn StorageFile,
    max_len: u32,
    trusted_to: u64,
) -> Result<(SegmentIndex, Option<SegmentIndex>)> {
    let len = log
        .len()
        .ctx(|| format!("reading size of {}", paths.log.display()))?;
    let (Some(idx), Some(tix)) = (
        read_hint(storage, &paths.idx, len)?,
        read_hint(storage, &paths.tix, len)?,
    ) else {
        return Ok((SegmentIndex::default(), None));
    };
    let Some(mut index) = SegmentIndex::decode(&idx, &tix, base) else {
        // Named by the file that does not decode alone (both, if neither).
        let idx_bad = SegmentIndex::decode(&idx, &[], base).is_none();
        let tix_bad = SegmentIndex::decode(&[], &tix, base).is_none();
        for (path, bad) in [(&paths.idx, idx_bad || !tix_bad), (&paths.tix, tix_bad)] {
            if bad {
                tracing::warn!(file = %path.display(), "index malformed; rebuilding from the log");
            }
        }
        return Ok((SegmentIndex::default(), None));
    };
    // A `.tix` missing, or with entries that fail their checksum (junk
    // after its entries included), is written again whole even when the
    // scan restores no entry: it is not left for the next open to find.
    let tix_whole =
        storage.exists(&paths.tix) && SegmentIndex::first_damaged_time_entry(&tix, base).is_none();
    let loaded = tix_whole.then(|| index.clone());
    // Every entry must name the record at its position (a cheap header
    // check); from the first that does not, the scan rebuilds the rest.
    if let Some(bad) = index
        .offset_entries()
        .iter()
        .find(|e| {
            header_offset_at(log, u64::from(e.position), len) != Some(base + u64::from(e.relative))
        })
        .copied()
    {
        tracing::warn!(file = %paths.idx.display(), offset = base + u64::from(bad.relative),
            "index entry does not match the log; rebuilding the index from there");
        index.truncate(bad.relative, bad.position);
    }
    if let Some(past) = index
        .offset_entries()
        .iter()
        .find(|e| u64::from(e.position) > trusted_to)
        .copied()
    {
        index.truncate(past.relative, past.position);
    }
    // Drop entries from the end until the last one points at the record it names.
    while let Some(last) = index.offset_entries().last().copied() {
        let pos = u64::from(last.position);
        if record_offset_at(log, pos, len, max_len) == Some(base + u64::from(last.relative)) {
            break;
        }
        index.truncate(last.relative, last.position);
    }
    let Some(&first) = index.offset_entries().first() else {
        return Ok((SegmentIndex::default(), loaded));
    };
    // Time entries sit at offset entries (see IndexBuilder) but live in their
    // own file, which can be shorter or damaged. Keep those that sit at an
    // offset entry and resume from the last of them: the scan from there
    // restores any later time entries and the segment's newest timestamp, which
    // time lookups and retention by age rely on.
    let at_entry = |relative: u32| {
        index
            .offset_entries()
            .binary_search_by_key(&relative, |e| e.relative)
            .ok()
            .map(|i| index.offset_entries()[i])
    };
    let times_ok = index
        .time_entries()
        .iter()
        .take_while(|t| at_entry(t.relative).is_some())
        .count();
    let resume = index.time_entries()[..times_ok]
        .last()
        .and_then(|t| at_entry(t.relative))
        .unwrap_or(first);
    let mut kept = SegmentIndex::default();
    for &e in index.offset_entries() {
        if e.relative <= resume.relative {
            kept.push_offset(e);
        }
    }
    for &t in &index.time_entries()[..times_ok] {
        kept.push_time(t);
    }
    Ok((kept, loaded))
}

/// The offset a record header at `pos` names, if the header looks like one
/// (magic, a sane length); the checksum is not checked.
fn header_offset_at(log: &dyn StorageFile, pos: u64, len: u64) -> Option<u64> {
    let mut header = [0u8; HEADER_LEN];
    if pos + HEADER_LEN as u64 > len {
        return None;
    }
    log.read_at(pos, &mut header).ok()?;
    let rec_len = u64::from(u32::from_le_bytes(header[4..8].try_into().ok()?));
    if header[0] != RECORD_MAGIC || rec_len < HEADER_LEN as u64 || pos + rec_len > len {
        return None;
    }
    Some(u64::from_le_bytes(header[12..20].try_into().ok()?))
}

/// Offset of the valid record at `pos`, if one is there.
fn record_offset_at(log: &dyn StorageFile, pos: u64, len: u64, max_len: u32) -> Option<u64> {
    let mut header = [0u8; HEADER_LEN];
    if pos + HEADER_LEN as u64 > len {
        return None;
    }
    log.read_at(pos, &mut header).ok()?;
    let rec_len = u64::from(u32::from_le_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    if rec_len < HEADER_LEN as u64 || pos + rec_len > len || rec_len > u64::from(max_len) {
        return None;
    }
    let mut rec = vec![0u8; rec_len as usize];
    log.read_at(pos, &mut rec).ok()?;
    match record::decode(&rec, max_len) {
        Ok(Frame::Record(r)) if !r.is_filler() => Some(r.offset),
        _ => None,
    }
}

/// Most bytes an index file of a segment whose `.log` holds `log_len` bytes
/// can hold: an entry (at most [`TIME_ENTRY_LEN`] bytes) per record, every
/// record at least a header long.
pub(crate) fn max_hint_len(log_len: u64) -> u64 {
    (log_len / HEADER_LEN as u64).saturating_mul(TIME_ENTRY_LEN as u64)
}

/// An index file's bytes (none when it is missing), or `None` when it is
/// longer than its segment allows: damaged or foreign, and rebuilt.
fn read_hint(storage: &dyn Storage, path: &Path, log_len: u64) -> Result<Option<Vec<u8>>> {
    if !storage.exists(path) {
        return Ok(Some(Vec::new()));
    }
    match read_file_within(storage, path, max_hint_len(log_len)) {
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            tracing::warn!(file = %path.display(), error = %e, "index larger than its segment allows; rebuilding from the log");
            Ok(None)
        }
        other => other
            .map(Some)
            .ctx(|| format!("reading {}", path.display())),
    }
}

/// Replaces `.idx` and `.tix` with `index`. Index files are hints checked on
/// every open, so they are not synced.
pub fn write_index(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    base: u64,
    index: &SegmentIndex,
    durable: bool,
) -> Result<()> {
    for (path, bytes) in [
        (&paths.idx, index.encode_offsets(0)),
        (&paths.tix, index.encode_times(base, 0)),
    ] {
        let file = storage
            .open(path, OpenMode::CreateOrOpen)
            .ctx(|| format!("opening {}", path.display()))?;
        file.set_len(0)
            .ctx(|| format!("truncating {}", path.display()))?;
        file.write_at(0, &bytes)
            .ctx(|| format!("writing {}", path.display()))?;
        if durable && let Err(e) = file.sync_data() {
            // Only hints: without them the next open scans the segment.
            tracing::warn!(file = %path.display(), error = %e,
                "could not sync a rebuilt index; removing it, the next open rebuilds it");
            for path in [&paths.idx, &paths.tix] {
                let _ = storage.remove_file(path);
            }
            return Ok(());
        }
    }
    Ok(())
}

// Compaction swaps: the files a compaction pass leaves while it replaces
// segments (see `storage::compact` for the protocol), and their completion
// on open, which belongs with recovery.

/// Suffix of a compacted copy being written.
pub const CLEANED_SUFFIX: &str = ".cleaned";
/// Suffix of a complete, durable compacted copy waiting to replace its segment.
pub const SWAP_SUFFIX: &str = ".swap";
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// `<base>.log.<until>.swap`: the copy of segment `base` and of every later
/// segment below `until`.
pub(crate) fn swap_path(log: &Path, until: u64) -> PathBuf {
    with_suffix(log, &format!(".{until:020}{SWAP_SUFFIX}"))
}

/// Parses a swap file name into `(base, until)`; `until` is `None` for the
/// single-segment form `<base>.log.swap`.
fn parse_swap_name(name: &str) -> Option<(u64, Option<u64>)> {
    let stem = name.strip_suffix(SWAP_SUFFIX)?;
    if let Some(base) = parse_log_name(stem) {
        return Some((base, None));
    }
    let (log_name, until) = stem.rsplit_once('.')?;
    if until.len() != 20 || !until.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((parse_log_name(log_name)?, Some(until.parse().ok()?)))
}

/// Steps 3 and 4 of the swap: removes the hints of `first` and every file of
/// `covered`, syncs the directory, then renames `swap` over `first`'s log
/// and syncs it again. The removals are durable before the rename: a power
/// cut that kept the rename but not a removal would leave a covered segment
/// beside the merged copy of its records, which no recovery mode opens.
pub(crate) fn retire(
    storage: &dyn Storage,
    dir: &Path,
    swap: &Path,
    first: &SegmentPaths,
    covered: &[SegmentPaths],
) -> Result<()> {
    let hints = [&first.idx, &first.tix];
    let others = covered.iter().flat_map(|p| [&p.idx, &p.tix, &p.log]);
    for path in hints.into_iter().chain(others) {
        if storage.exists(path) {
            storage
                .remove_file(path)
                .ctx(|| format!("removing {}", path.display()))?;
        }
    }
    storage
        .sync_dir(dir)
        .ctx(|| format!("syncing {}", dir.display()))?;
    storage
        .rename(swap, &first.log)
        .ctx(|| format!("renaming {}", swap.display()))?;
    storage
        .sync_dir(dir)
        .ctx(|| format!("syncing {}", dir.display()))
}

/// What is wrong with compaction copy `swap` of the offsets `base..until`,
/// if anything: the byte range and the reason. The copy was synced whole
/// before its rename, exactly as long as the records it holds (at least
/// one), so every byte of it must belong to a valid record of that run, in
/// offset order. (A copy cut exactly at a record boundary cannot be told
/// from a shorter one.)
pub(crate) fn swap_damage(
    storage: &dyn Storage,
    swap: &Path,
    base: u64,
    until: u64,
) -> Result<Option<(Range<u64>, String)>> {
    let data = match read_file_within(storage, swap, MAX_SEGMENT_BYTES) {
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            return Ok(Some((0..file_len(storage, swap), e.to_string())));
        }
        other => other.ctx(|| format!("reading {}", swap.display()))?,
    };
    let mut index = SegmentIndex::default();
    let mut builder = IndexBuilder::new(u32::MAX);
    let (mut pos, mut last, mut first) = (0u64, None, None);
    let stop = scan(
        &data,
        &mut pos,
        base,
        &mut index,
        &mut builder,
        &mut last,
        &mut first,
        u32::MAX,
    );
    let len = data.len() as u64;
    Ok(match stop {
        Stop::Invalid(why) => Some((pos..len, why)),
        Stop::Clean if len == 0 => Some((0..0, "the file is empty".into())),
        Stop::Clean if pos < len => Some((pos..len, "zeros where records belong".into())),
        Stop::Clean => last.filter(|&o| o >= until).map(|o| {
            (
                0..len,
                format!("offset {o} is past the run it copies, which ends before {until}"),
            )
        }),
    })
}

/// Whether the segments a compaction swap of `run` (from its first
/// segment's base to the base after it) replaces are all still in place: the completion removes the first one's
/// index before anything else, and every segment of the run that
/// `checkpoint` lists must be there.
fn run_intact(
    storage: &dyn Storage,
    dir: &Path,
    run: Range<u64>,
    checkpoint: Option<&Checkpoint>,
) -> bool {
    let Some(c) = checkpoint else { return false };
    let first = SegmentPaths::new(dir, run.start);
    storage.exists(&first.log)
        && storage.exists(&first.idx)
        && c.segments
            .iter()
            .filter(|&&b| b > run.start && b < run.end)
            .all(|&b| storage.exists(&SegmentPaths::new(dir, b).log))
}

/// A damaged compaction swap (see [`damaged_swap`]).
pub(crate) struct DamagedSwap {
    /// The swap file.
    pub path: PathBuf,
    /// Its damaged bytes.
    pub bytes: Range<u64>,
    /// What is wrong there.
    pub why: String,
    /// Whether the segments it would replace are all still in place (it
    /// can go); else it is the only copy of some of their records.
    pub replaceable: bool,
}

impl DamagedSwap {
    /// The damage, for a swap that cannot simply go.
    pub fn corruption(&self) -> Corruption {
        Corruption {
            file: self.path.clone(),
            bytes: self.bytes.clone(),
            offsets: None,
            detail: format!(
                "this compacted copy is damaged ({}), and the segments it replaces are partly \
                 removed already: it is the only copy of their records. Start with recovery mode \
                 skip-damaged (`spool serve --recovery skip-damaged`) to complete it and give the \
                 damaged range up",
                self.why
            ),
        }
    }
}

/// Entry `name` of log directory `dir` (listed as `names`), if it is a
/// compaction swap whose copy is damaged. `checkpoint` is the log's, as
/// loaded, before it forgets the segments the swaps cover. A swap whose
/// first segment is gone is retention's leftover and is not read.
pub(crate) fn damaged_swap(
    storage: &dyn Storage,
    dir: &Path,
    names: &[String],
    name: &str,
    checkpoint: Option<&Checkpoint>,
) -> Result<Option<DamagedSwap>> {
    let Some((base, until)) = parse_swap_name(name) else {
        return Ok(None);
    };
    if !storage.exists(&SegmentPaths::new(dir, base).log) {
        return Ok(None);
    }
    // The single-segment form copies `base` alone: its records end before
    // the next segment's base.
    let until = until.unwrap_or_else(|| {
        names
            .iter()
            .filter_map(|n| parse_log_name(n))
            .filter(|&b| b > base)
            .min()
            .unwrap_or(u64::MAX)
    });
    let path = dir.join(name);
    let replaceable = run_intact(storage, dir, base..until, checkpoint);
    // A run ends where the next segment starts (the active one is never in
    // a run): a name that puts its end anywhere else is no copy to trust.
    if !names
        .iter()
        .filter_map(|n| parse_log_name(n))
        .any(|b| b == until)
    {
        let len = storage
            .open(&path, OpenMode::ReadOnly)
            .and_then(|f| f.len())
            .ctx(|| format!("reading size of {}", path.display()))?;
        return Ok(Some(DamagedSwap {
            path,
            bytes: 0..len,
            why: if until == u64::MAX {
                "no segment follows the one it copies, and the active segment is never compacted"
                    .into()
            } else {
                format!("its name ends the run at offset {until}, where no segment starts")
            },
            replaceable,
        }));
    }
    Ok(
        swap_damage(storage, &path, base, until)?.map(|(bytes, why)| DamagedSwap {
            path,
            bytes,
            why,
            replaceable,
        }),
    )
}

/// Before interrupted compaction swaps are completed: a swap whose copy is
/// damaged is removed while the segments it would replace are all still in
/// place (compaction runs again later); once any of them is gone it is the
/// only copy of their records, and opening is refused, naming it, unless
/// `mode` is [`RecoveryMode::SkipDamaged`] (the swap completes and the
/// segment's open gives the damaged range up). `checkpoint` is the log's,
/// as loaded, before it forgets the segments the swaps cover.
pub fn check_interrupted_swaps(
    storage: &dyn Storage,
    dir: &Path,
    checkpoint: Option<&Checkpoint>,
    mode: RecoveryMode,
) -> Result<()> {
    let Ok(names) = storage.list_dir(dir) else {
        return Ok(());
    };
    for name in &names {
        let Some(swap) = damaged_swap(storage, dir, &names, name, checkpoint)? else {
            continue;
        };
        let DamagedSwap {
            path, bytes, why, ..
        } = &swap;
        if swap.replaceable {
            storage
                .remove_file(path)
                .ctx(|| format!("removing {}", path.display()))?;
            storage
                .sync_dir(dir)
                .ctx(|| format!("syncing {}", dir.display()))?;
            tracing::error!(file = %path.display(), ?bytes, reason = %why,
                "removed a damaged compacted copy; the segments it would have replaced are all in place");
            continue;
        }
        let damage = swap.corruption();
        if mode != RecoveryMode::SkipDamaged {
            return Err(Error::corruption(damage));
        }
        tracing::error!(damage = %damage.given_up(), "completing a damaged compacted copy; its damaged range is given up");
    }
    Ok(())
}

/// Rolls back or completes a swap a crash interrupted (see the module docs).
/// Returns the offset ranges `base..until` of the swaps it completed: the
/// segments inside them were retired on purpose.
pub fn finish_interrupted_swaps(
    storage: &dyn Storage,
    dir: &Path,
    checkpoint: Option<&Checkpoint>,
) -> Result<Vec<Range<u64>>> {
    let Ok(names) = storage.list_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut changed = false;
    let mut completed = Vec::new();
    for name in &names {
        let path = dir.join(name);
        if name.contains(".log") && name.ends_with(CLEANED_SUFFIX) {
            storage
                .remove_file(&path)
                .ctx(|| format!("removing {}", path.display()))?;
            tracing::warn!(file = %path.display(), "rolled back an interrupted compaction (copy not finished)");
            changed = true;
        } else if let Some((base, until)) = parse_swap_name(name) {
            let first = SegmentPaths::new(dir, base);
            if !storage.exists(&first.log) && checkpoint.is_some_and(|c| c.segments.contains(&base))
            {
                // Retention takes a segment out of the checkpoint before
                // its file goes: one listed but gone is damage, and this
                // copy may be all that is left of it. Left in place; the
                // manifest check names the missing segment.
                tracing::error!(file = %path.display(),
                    "a compacted copy of a segment that is missing but listed; left in place");
                continue;
            }
            if !storage.exists(&first.log) {
                storage
                    .remove_file(&path)
                    .ctx(|| format!("removing {}", path.display()))?;
                tracing::warn!(file = %path.display(), "dropped a compacted copy of segments retention had removed");
                changed = true;
                continue;
            }
            let until = until.unwrap_or(base.saturating_add(1));
            let covered: Vec<SegmentPaths> = names
                .iter()
                .filter_map(|n| parse_log_name(n))
                .filter(|&b| b > base && b < until)
                .map(|b| SegmentPaths::new(dir, b))
                .collect();
            retire(storage, dir, &path, &first, &covered)?;
            tracing::warn!(file = %first.log.display(), merged = covered.len(), "completed an interrupted compaction swap");
            completed.push(base..until);
        }
    }
    if changed {
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))?;
    }
    Ok(completed)
}

/// The offset ranges `base..until` of the compaction swaps pending in a
/// directory listing (see [`finish_interrupted_swaps`]).
pub fn pending_swaps(names: &[String]) -> Vec<Range<u64>> {
    names
        .iter()
        .filter_map(|n| parse_swap_name(n))
        .map(|(base, until)| base..until.unwrap_or(base.saturating_add(1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report logs as one line of words, not the structure's debug form,
    /// and an index rebuilt alone changes no record.
    #[test]
    fn a_recovery_report_reads_as_one_line() {
        let mut report = RecoveryReport {
            rebuilt_indexes: vec![PathBuf::from("t/00000000000000000009.idx")],
            ..RecoveryReport::default()
        };
        assert!(!report.is_clean() && !report.changed_records());
        assert_eq!(report.to_string(), "rebuilt 1 index file(s)");
        report.truncations.push(Truncation {
            file: PathBuf::from("t/00000000000000000009.log"),
            at: 60433,
            dropped: 5103,
        });
        report.skipped.push(20..25);
        assert!(report.changed_records());
        assert_eq!(
            report.to_string(),
            "cut 5103 bytes after byte 60433 of t/00000000000000000009.log; \
             rebuilt 1 index file(s); skipped offsets 20..25"
        );
    }
}
