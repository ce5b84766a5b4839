//! Offline, read-only check of a whole data directory: every record of every
//! segment (framing, CRC, offsets strictly increasing and inside the
//! segment), every index against its log, every journal and snapshot, each
//! topic's config and checkpoint, and that every file the checkpoint lists
//! is there. Each damaged range is reported with its file, bytes and offsets.
//!
//! Findings come in three kinds: *damage* (data is wrong or missing; exit 1),
//! *torn tails* (bytes past the recovery point that an unclean stop left
//! unfinished; the next start cuts them), and *notes* (what the next start
//! rebuilds or completes by itself: indexes, interrupted compactions; exit 0
//! unless `--strict`).

use super::checkpoint::Checkpoint;
use super::config::FsyncPolicy;
use super::index::{IndexBuilder, SegmentIndex};
use super::io::{Storage, read_file_within};
use super::record::{self, Frame};
use super::recovery::{
    Stop, find_next_valid, is_held_page_gap, looks_like_lost_pages, scan, segment_bound,
};
use super::segment::{SegmentPaths, parse_log_name};
use super::{DataDir, LogConfig};
use crate::error::{Corruption, IoContext, Result};
use crate::groups::journal::Payloads;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// Byte range concerned.
    pub bytes: std::ops::Range<u64>,
    /// Offsets (or journal sequence numbers) concerned, when known.
    pub offsets: Option<std::ops::Range<u64>>,
    /// What is wrong.
    pub detail: String,
}

impl From<Corruption> for Finding {
    fn from(c: Corruption) -> Finding {
        Finding {
            file: c.file,
            bytes: c.bytes,
            offsets: c.offsets,
            detail: c.detail,
        }
    }
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Topics checked.
    pub topics: u64,
    /// Files read.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Offsets spanned by the checked segments (from each segment's first to
    /// its last valid record).
    pub offsets: u64,
    /// Journal entries and snapshots whose checksum was verified.
    pub journal_entries: u64,
    /// Damage: anything here means data is wrong.
    pub damage: Vec<Finding>,
    /// Torn tails of active segments and journals, past their recovery
    /// point: unacknowledged writes a crash interrupted, which the next start
    /// cuts. Not damage.
    pub torn_tails: Vec<Finding>,
    /// What the next start rebuilds or completes by itself (missing or stale
    /// indexes, interrupted compactions). Not damage.
    pub notes: Vec<Finding>,
}

impl VerifyReport {
    /// Whether no damage was found.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

fn finding(file: PathBuf, detail: impl Into<String>) -> Finding {
    Finding {
        file,
        bytes: 0..0,
        offsets: None,
        detail: detail.into(),
    }
}

/// Total bytes `verify` will read under `root` (for a progress bar).
pub fn bytes_to_check(storage: &dyn Storage, root: &Path) -> u64 {
    let mut total = 0;
    walk(
        storage,
        &root.join(super::datadir::TOPICS_DIR),
        &mut |path| {
            if let Ok(file) = storage.open(path, super::io::OpenMode::ReadOnly) {
                total += file.len().unwrap_or(0);
            }
        },
    );
    total
}

fn walk(storage: &dyn Storage, dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(mut names) = storage.list_dir(dir) else {
        return;
    };
    names.sort();
    for name in names {
        let path = dir.join(&name);
        // Copies set aside, which verify does not read.
        if name == super::recovery::QUARANTINE_DIR {
            continue;
        }
        if storage.list_dir(&path).is_ok() {
            walk(storage, &path, f);
        } else {
            f(&path);
        }
    }
}

/// Checks every topic of the locked data directory `data`. `progress` is
/// called with the bytes read so far.
pub fn verify(data: &DataDir, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport> {
    let storage = &**data.storage();
    let mut report = VerifyReport::default();
    for topic in data.topics()? {
        let dir = data.topic_dir(&topic);
        if crate::broker::config::validate_name("topic", &topic).is_err() {
            continue;
        }
        report.topics += 1;
        let (checkpoint, damaged_checkpoint) = match Checkpoint::load(storage, &dir) {
            Ok(c) => (c, false),
            Err(crate::Error::Corruption(c)) => {
                report.damage.push((*c).into());
                (None, true)
            }
            // What the broker refuses too (a folder there, no permission).
            Err(e @ crate::Error::Io { .. }) if refused_for_good_error(&e) => {
                report.damage.push(finding(
                    dir.join(crate::storage::checkpoint::CHECKPOINT_FILE),
                    format!("the checkpoint cannot be read: {e}"),
                ));
                (None, true)
            }
            Err(e) => return Err(e),
        };
        let config = dir.join(crate::broker::config::TOPIC_CONFIG_FILE);
        // The policy the topic's records were written under; `always`
        // (nothing past the recovery point taken for lost pages) when the
        // config does not load. Only a recovery point bounds what may be
        // unsynced: without a checkpoint, nothing is taken for lost pages.
        let mut fsync = FsyncPolicy::Always;
        let relaxed = |fsync: FsyncPolicy| {
            (checkpoint.is_some() && fsync != FsyncPolicy::Always).then_some(fsync)
        };
        match crate::broker::config::TopicConfig::load(storage, &dir) {
            Ok(Some(c)) => fsync = c.log.fsync,
            // A checkpoint that records journals was written by a topic.
            Ok(None)
                if damaged_checkpoint
                    || checkpoint.as_ref().is_some_and(|c| !c.journals.is_empty()) =>
            {
                report.damage.push(finding(
                    config,
                    "topic config is missing: the topic would start with the default config",
                ))
            }
            Ok(None) => {}
            // Also what an older spool took and this one refuses: what
            // to mend is said with it.
            Err(e) => report.damage.push(finding(
                config,
                format!(
                    "topic config does not load: {e}; the topic stays closed until the file \
                     is mended (docs/operations.md: editing a topic's settings by hand; \
                     upgrading)"
                ),
            )),
        }
        // Read and checked above: counted with the rest, as the progress
        // total ([`bytes_to_check`]) counts every file of the topic.
        for small in [
            crate::storage::checkpoint::CHECKPOINT_FILE,
            crate::broker::config::TOPIC_CONFIG_FILE,
        ] {
            let len = super::io::file_len(storage, &dir.join(small));
            report.files += u64::from(len > 0);
            report.bytes += len;
        }
        progress(report.bytes);
        let log_end = verify_log(
            storage,
            &dir,
            checkpoint.as_ref(),
            relaxed(fsync),
            &mut report,
            progress,
        )?;
        let point = |name: &str| {
            checkpoint
                .as_ref()
                .and_then(|c| c.journal(name))
                .map_or((0, 0), |p| (p.base_seq, p.synced_len))
        };
        let mut journals = vec![JournalToCheck {
            dir: dir.clone(),
            name: "deletes".to_string(),
            point: point("deletes"),
            payloads: crate::broker::deletions::PAYLOADS,
        }];
        let groups = dir.join("groups");
        let mut present = Vec::new();
        if let Ok(mut names) = storage.list_dir(&groups) {
            names.sort();
            // The broker opens a group from its journal file: a snapshot
            // alone does not make a listed group present.
            present = names
                .iter()
                .filter_map(|n| n.strip_suffix(".journal"))
                .map(str::to_owned)
                .collect();
            journals.extend(
                names
                    .iter()
                    .filter_map(|n| n.strip_suffix(".journal"))
                    .map(|g| JournalToCheck {
                        dir: groups.clone(),
                        name: g.to_owned(),
                        point: point(&format!("groups/{g}")),
                        payloads: crate::groups::state::PAYLOADS,
                    }),
            );
        }
        // A clean stop lists every group: the broker ignores other journals.
        if let Some(c) = checkpoint.as_ref().filter(|c| c.clean) {
            journals.retain(|JournalToCheck { dir: jdir, name, .. }| {
                let listed = *jdir == dir || c.journal(&format!("groups/{name}")).is_some();
                if !listed {
                    report.notes.push(finding(
                        groups.join(format!("{name}.journal")),
                        "a journal the topic's clean stop did not list: no group of the topic (the broker moves it to quarantine/)",
                    ));
                }
                listed
            });
        }
        for listed in checkpoint.iter().flat_map(|c| &c.journals) {
            if let Some(g) = listed.name.strip_prefix("groups/")
                && !present.iter().any(|p| p == g)
            {
                report.damage.push(finding(
                    groups.join(format!("{g}.journal")),
                    format!("group {g} is missing: the topic's checkpoint lists it"),
                ));
            }
        }
        let mut referenced = 0;
        for journal in &journals {
            let end = verify_journal(storage, journal, relaxed(fsync), &mut report, progress)?;
            referenced = referenced.max(end.unwrap_or(0));
        }
        // As the broker: an offset a group or a deletion speaks of was
        // handed out, and the log must not give it to another message.
        if let Some((end, last)) = log_end
            && referenced > end
        {
            let synced =
                fsync == FsyncPolicy::Always || checkpoint.as_ref().is_some_and(|c| c.clean);
            let detail = format!(
                "the log ends at offset {end}, but offsets up to {referenced} were handed out \
                 (group state or deletions speak of them)"
            );
            let found = Finding {
                file: last,
                bytes: 0..0,
                offsets: Some(end..referenced),
                detail,
            };
            if synced {
                report.damage.push(found);
            } else {
                report.notes.push(Finding {
                    detail: format!(
                        "{}: under fsync={fsync} a power cut took messages written but not \
                         synced; the next start continues the log at offset {referenced}",
                        found.detail
                    ),
                    ..found
                });
            }
        }
    }
    Ok(report)
}

fn verify_log(
    storage: &dyn Storage,
    dir: &Path,
    checkpoint: Option<&Checkpoint>,
    relaxed: Option<FsyncPolicy>,
    report: &mut VerifyReport,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<(u64, PathBuf)>> {
    let names = storage
        .list_dir(dir)
        .ctx(|| format!("listing {}", dir.display()))?;
    let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_log_name(n)).collect();
    bases.sort_unstable();
    let swaps = super::recovery::pending_swaps(&names);
    for name in &names {
        let damaged = match super::recovery::damaged_swap(storage, dir, &names, name, checkpoint) {
            Ok(damaged) => damaged,
            Err(e) => {
                report.damage.push(finding(
                    dir.join(name),
                    format!("compacted copy cannot be read: {e}"),
                ));
                continue;
            }
        };
        if let Some(swap) = damaged {
            if swap.replaceable {
                report.notes.push(Finding {
                    file: swap.path,
                    bytes: swap.bytes,
                    offsets: None,
                    detail: format!(
                        "a damaged compacted copy ({}): the segments it would replace are all in \
                         place, and the next start removes it",
                        swap.why
                    ),
                });
            } else {
                report.damage.push(swap.corruption().into());
            }
        } else if name.ends_with(super::recovery::CLEANED_SUFFIX)
            || name.ends_with(super::recovery::SWAP_SUFFIX)
        {
            report.notes.push(finding(
                dir.join(name),
                "an interrupted compaction: the next start rolls it back or completes it",
            ));
        }
    }
    for (base, offsets) in checkpoint
        .map(|c| c.missing_segments(&bases, &swaps))
        .unwrap_or_default()
    {
        report.damage.push(Finding {
            file: SegmentPaths::new(dir, base).log,
            bytes: 0..0,
            offsets: Some(offsets),
            detail: "segment file is missing: the log's checkpoint lists it".into(),
        });
    }
    // Index intervals are not stored; the default rebuilds what spool wrote.
    let config = LogConfig::default();
    let mut previous_end: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let paths = SegmentPaths::new(dir, base);
        let active = i + 1 == bases.len();
        let synced_to = match checkpoint {
            Some(c) if active && c.active_base == base => c.active_synced,
            _ => 0,
        };
        let next_base = bases.get(i + 1).copied();
        let data = match read_file_within(storage, &paths.log, super::config::MAX_SEGMENT_BYTES) {
            Ok(data) => data,
            // What the broker refuses too: reported, and the other files
            // are checked still.
            Err(e) if refused_for_good(&e) => {
                let len = super::io::file_len(storage, &paths.log);
                let too_large = e.kind() == std::io::ErrorKind::FileTooLarge;
                report.damage.push(Finding {
                    file: paths.log.clone(),
                    bytes: if too_large {
                        super::config::MAX_SEGMENT_BYTES..len
                    } else {
                        0..0
                    },
                    offsets: next_base.map(|next| base..next),
                    detail: if too_large {
                        super::recovery::oversized_segment(len)
                    } else {
                        format!("the segment cannot be read: {e}")
                    },
                });
                previous_end = next_base;
                continue;
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", paths.log.display())),
        };
        report.files += 1;
        report.bytes += data.len() as u64;
        progress(report.bytes);
        if let Some(end) = previous_end
            && base < end
        {
            report.damage.push(Finding {
                file: paths.log.clone(),
                bytes: 0..data.len() as u64,
                offsets: Some(base..end),
                detail: format!("segment starts at offset {base}, inside the previous segment (which ends at {end})"),
            });
        }
        let mut index = SegmentIndex::default();
        let mut builder = IndexBuilder::new(config.index_interval_bytes);
        let (mut pos, mut last, mut first) = (0u64, None, None);
        loop {
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
            let Stop::Invalid(why) = stop else {
                if pos < data.len() as u64 && !active {
                    // A roll creates the next segment before it seals this
                    // one: a stop between the two leaves this one's
                    // preallocated zeros, every record up to the next base
                    // in place, and the next start cuts them. Records
                    // missing before the next base are damage.
                    let whole = next_base.is_some_and(|n| last.map_or(base, |o| o + 1) == n);
                    let zeros = Finding {
                        file: paths.log.clone(),
                        bytes: pos..data.len() as u64,
                        offsets: None,
                        detail: if whole {
                            "zeros after the last record of a sealed segment: a seal was interrupted; the next start cuts them".into()
                        } else {
                            "zeros after the last record of a sealed segment".into()
                        },
                    };
                    if whole {
                        report.notes.push(zeros);
                    } else {
                        report.damage.push(zeros);
                    }
                }
                if pos < synced_to {
                    report.damage.push(Finding {
                        file: paths.log.clone(),
                        bytes: pos..synced_to,
                        offsets: None,
                        detail: format!(
                            "records end at byte {pos}, but the checkpoint records synced records up to byte {synced_to}"
                        ),
                    });
                }
                break;
            };
            let next = find_next_valid(
                &data,
                pos,
                last,
                u32::MAX,
                Some(segment_bound(base, next_base)),
                active.then(|| last.map_or(base, |o| o + 1)),
            );
            let first_lost = last.map_or(base, |o| o + 1);
            let mut finding = Finding {
                file: paths.log.clone(),
                bytes: pos..next.map_or(data.len() as u64, |(q, _)| q),
                offsets: Some(first_lost..next.map(|(_, o)| o).or(next_base).unwrap_or(first_lost)),
                detail: why,
            };
            match next {
                None if active && pos >= synced_to => {
                    report.torn_tails.push(finding);
                    break;
                }
                None => {
                    if active {
                        finding.detail = format!(
                            "{}; below the recovery point (byte {synced_to} was synced), so not a torn write",
                            finding.detail
                        );
                    }
                    report.damage.push(finding);
                    break;
                }
                // Writes stopped before the page they began in was written
                // (it is written last): the next start cuts them, before
                // any rule for lost pages.
                Some(_)
                    if active
                        && pos >= synced_to
                        && checkpoint.is_some()
                        && is_held_page_gap(&data, pos) =>
                {
                    finding.bytes = pos..data.len() as u64;
                    finding.offsets = None;
                    finding.detail = format!(
                        "{}; zeros from the last record to the page boundary with records after them, past the \
                         recovery point (byte {synced_to} was synced): writes that stopped before the page they \
                         began in was written, which they write last (none of them answered, unless the disk lost a \
                         synced write); the next start copies them to quarantine/ and cuts them",
                        finding.detail
                    );
                    report.torn_tails.push(finding);
                    break;
                }
                // Pages written out of order before a power cut (see
                // `recovery::open_segment`): the next start sets them aside.
                Some((q, _))
                    if active
                        && pos >= synced_to
                        && relaxed.is_some()
                        && looks_like_lost_pages(&data, pos..q) =>
                {
                    let fsync = relaxed.unwrap_or_default();
                    finding.detail = format!(
                        "{}; valid records follow it, past the recovery point (byte {synced_to} was synced) \
                         under fsync={fsync}, pages the disk wrote out of order before a power cut: the next \
                         start sets the range aside in quarantine/ and keeps the records after it",
                        finding.detail
                    );
                    report.notes.push(finding);
                    pos = q;
                }
                Some((q, _)) => {
                    report.damage.push(finding);
                    pos = q;
                }
            }
        }
        if let (Some(first), Some(last)) = (first, last) {
            report.offsets += last + 1 - first;
        }
        if let (Some(last), Some(next)) = (last, next_base)
            && last >= next
        {
            report.damage.push(Finding {
                file: paths.log.clone(),
                bytes: 0..data.len() as u64,
                offsets: Some(next..last + 1),
                detail: format!("holds offsets up to {last}, past the next segment's base {next}"),
            });
        }
        previous_end = last.map(|l| l + 1).or(Some(base));
        if active
            && let Some(c) = checkpoint
            && let Some(end) = previous_end
            && end < c.durable_end
        {
            report.damage.push(Finding {
                file: paths.log.clone(),
                bytes: 0..0,
                offsets: Some(end..c.durable_end),
                detail: format!(
                    "the log ends at offset {end}, but the checkpoint records offsets up to {} as synced",
                    c.durable_end
                ),
            });
        }
        verify_index(storage, &paths, &data, base, pos, last, active, report)?;
    }
    // Where the log ends, next to its last segment's file (none when that
    // file could not be read: reported already).
    Ok(previous_end
        .zip(bases.last())
        .map(|(end, &base)| (end, SegmentPaths::new(dir, base).log)))
}

/// Every stored index entry must point at a valid record carrying the offset
/// it names (time entries: inside the segment, both fields increasing). The
/// active segment's index may lag its log, and entries past a torn tail are
/// the next start's to drop.
#[allow(clippy::too_many_arguments)]
fn verify_index(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    log: &[u8],
    base: u64,
    valid_end: u64,
    last_offset: Option<u64>,
    active: bool,
    report: &mut VerifyReport,
) -> Result<()> {
    let max = super::recovery::max_hint_len(log.len() as u64);
    let idx = read_hint(storage, &paths.idx, max, report)?;
    let tix = read_hint(storage, &paths.tix, max, report)?;
    for (file, found, what) in [
        (&paths.idx, &idx, "index"),
        (&paths.tix, &tix, "time index"),
    ] {
        // The active segment's files too: they are made with it.
        if found.is_none() && last_offset.is_some() {
            report.notes.push(finding(
                file.clone(),
                format!("{what} file missing (the next start rebuilds it)"),
            ));
        }
    }
    let (idx, tix) = (idx.unwrap_or_default(), tix.unwrap_or_default());
    report.files += 2;
    report.bytes += (idx.len() + tix.len()) as u64;
    let malformed = |path: &PathBuf, len: usize, what: &str| Finding {
        file: path.clone(),
        bytes: 0..len as u64,
        offsets: None,
        detail: format!(
            "{what} is malformed (odd length or entries out of order; the next start rebuilds it)"
        ),
    };
    let idx_ok = SegmentIndex::decode(&idx, &[], base).is_some();
    let tix_ok = SegmentIndex::decode(&[], &tix, base).is_some();
    if !idx_ok {
        report
            .notes
            .push(malformed(&paths.idx, idx.len(), "offset index"));
    }
    if !tix_ok {
        report
            .notes
            .push(malformed(&paths.tix, tix.len(), "time index"));
    } else if let Some(i) = SegmentIndex::first_damaged_time_entry(&tix, base) {
        let at = (i * super::index::TIME_ENTRY_LEN) as u64;
        report.notes.push(Finding {
            file: paths.tix.clone(),
            bytes: at..tix.len() as u64,
            offsets: None,
            detail: format!(
                "time index entry {i} fails its checksum (damaged, or written by an older spool): \
                 the next start rebuilds the entries from it on"
            ),
        });
    }
    let Some(index) = SegmentIndex::decode(
        if idx_ok { &idx } else { &[] },
        if tix_ok { &tix } else { &[] },
        base,
    ) else {
        return Ok(());
    };
    for (i, e) in index.offset_entries().iter().enumerate() {
        let pos = u64::from(e.position);
        if active && pos >= valid_end {
            break;
        }
        let expected = base + u64::from(e.relative);
        let found = log
            .get(pos as usize..)
            .and_then(|rest| match record::decode(rest, u32::MAX) {
                Ok(Frame::Record(r)) if !r.is_filler() => Some(r.offset),
                _ => None,
            });
        if found != Some(expected) {
            let at = (i * super::index::OFFSET_ENTRY_LEN) as u64;
            report.notes.push(Finding {
                file: paths.idx.clone(),
                bytes: at..at + super::index::OFFSET_ENTRY_LEN as u64,
                offsets: Some(expected..expected + 1),
                detail: format!(
                    "entry names offset {expected} at byte {pos} of the log, which holds {} (the next start rebuilds the index)",
                    found.map_or_else(|| "no valid record".to_string(), |o| format!("offset {o}"))
                ),
            });
            break;
        }
    }
    if let (Some(last), Some(t)) = (last_offset, index.time_entries().last())
        && base + u64::from(t.relative) > last + 1
        && !active
    {
        report.notes.push(Finding {
            file: paths.tix.clone(),
            bytes: 0..tix.len() as u64,
            offsets: None,
            detail: "time index points past the segment's last record (the next start rebuilds it)"
                .into(),
        });
    }
    Ok(())
}

/// A journal of a topic, for [`verify_journal`].
struct JournalToCheck {
    dir: PathBuf,
    name: String,
    /// Its recovery point `(base_seq, synced_len)` from the checkpoint
    /// (`(0, 0)`: none known).
    point: (u64, u64),
    payloads: Payloads,
}

/// Checks a journal and its snapshot against its recovery point; returns
/// the end of the offsets its state speaks of, when it has no damage.
fn verify_journal(
    storage: &dyn Storage,
    journal: &JournalToCheck,
    relaxed: Option<FsyncPolicy>,
    report: &mut VerifyReport,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<u64>> {
    let JournalToCheck {
        dir,
        name,
        point: (base_seq, synced_len),
        payloads,
    } = journal;
    let (base_seq, synced_len) = (*base_seq, *synced_len);
    let snap = dir.join(format!("{name}.snap"));
    let mut first_uncovered = 0;
    let damage_before = report.damage.len();
    // The payloads the broker would replay: the snapshot's, then entries.
    let mut state: Option<Vec<u8>> = None;
    let mut entries: Vec<Vec<u8>> = Vec::new();
    let snapshot = read_journal_file(storage, &snap, report)?;
    let mut snapshot_reported = matches!(snapshot, JournalBytes::Reported);
    if let JournalBytes::Read(data) = snapshot {
        report.files += 1;
        report.bytes += data.len() as u64;
        snapshot_reported = true;
        match crate::groups::journal::snapshot_record(&data) {
            Ok(r) => {
                report.journal_entries += 1;
                // As the broker: a snapshot given up covers nothing.
                match (payloads.snapshot)(r.value) {
                    Ok(()) => {
                        first_uncovered = r.offset;
                        state = Some(r.value.to_vec());
                        snapshot_reported = false;
                    }
                    Err(why) => report.damage.push(Finding {
                        file: snap.clone(),
                        bytes: 0..data.len() as u64,
                        offsets: None,
                        detail: format!(
                            "snapshot does not validate: it passed its checksum but does not parse ({why})"
                        ),
                    }),
                }
            }
            Err(why) => report.damage.push(Finding {
                file: snap.clone(),
                bytes: 0..data.len() as u64,
                offsets: None,
                detail: format!("snapshot does not validate: {why}"),
            }),
        }
    }
    let synced_len = if first_uncovered == base_seq {
        synced_len
    } else {
        if first_uncovered < base_seq && !snapshot_reported {
            report.damage.push(finding(
                snap,
                format!(
                    "snapshot is missing or older than the checkpoint records (sequence {base_seq})"
                ),
            ));
        }
        0
    };
    let path = dir.join(format!("{name}.journal"));
    let data = match read_journal_file(storage, &path, report)? {
        JournalBytes::Read(data) => data,
        JournalBytes::Missing => Vec::new(),
        JournalBytes::Reported => return Ok(None),
    };
    report.files += 1;
    report.bytes += data.len() as u64;
    progress(report.bytes);
    let mut pos = 0usize;
    let mut last: Option<u64> = None;
    while pos < data.len() {
        let decoded = record::decode(&data[pos..], u32::MAX);
        match decoded {
            Ok(Frame::Record(r)) if last.is_none_or(|l| r.offset > l) => {
                report.journal_entries += 1;
                // As the broker: whole, so damage wherever it lies. Entries
                // the snapshot covers are never read.
                if r.offset >= first_uncovered {
                    match (payloads.entry)(r.value) {
                        Ok(()) => entries.push(r.value.to_vec()),
                        Err(why) => report.damage.push(Finding {
                            file: path.clone(),
                            bytes: pos as u64..pos as u64 + u64::from(r.len),
                            offsets: None,
                            detail: format!(
                                "journal entry {} passed its checksum but does not parse ({why})",
                                r.offset
                            ),
                        }),
                    }
                }
                last = Some(r.offset);
                pos += r.len as usize;
            }
            Ok(Frame::End) if data[pos..].iter().all(|&b| b == 0) => {
                // As the broker: zeros where synced entries were are damage.
                if (pos as u64) < synced_len {
                    report.damage.push(Finding {
                        file: path.clone(),
                        bytes: pos as u64..synced_len.min(data.len() as u64),
                        offsets: None,
                        detail: format!(
                            "zeros where synced entries were (up to byte {synced_len})"
                        ),
                    });
                }
                break;
            }
            _ => {
                let next = find_next_valid(&data, pos as u64, last, u32::MAX, None, None);
                let finding = Finding {
                    file: path.clone(),
                    bytes: pos as u64..next.map_or(data.len() as u64, |(q, _)| q),
                    offsets: None,
                    detail: format!(
                        "journal entry does not validate: {}",
                        crate::groups::journal::entry_problem(&decoded, last)
                    ),
                };
                match next {
                    None if pos as u64 >= synced_len => {
                        report.torn_tails.push(finding);
                        break;
                    }
                    None => {
                        report.damage.push(Finding {
                            detail: format!(
                                "{}; below the recovery point (byte {synced_len} was synced), so not a torn write",
                                finding.detail
                            ),
                            ..finding
                        });
                        break;
                    }
                    // Pages written out of order before a power cut (see
                    // `Journal::open_checked`): the next start sets them aside.
                    Some((q, _))
                        if pos as u64 >= synced_len
                            && relaxed.is_some()
                            && looks_like_lost_pages(&data, pos as u64..q) =>
                    {
                        let fsync = relaxed.unwrap_or_default();
                        report.notes.push(Finding {
                            detail: format!(
                                "{}; valid entries follow it, past the recovery point (byte {synced_len} \
                                 was synced) under fsync={fsync}, pages the disk wrote out of order before a \
                                 power cut: the next start sets it aside in quarantine/ and keeps the entries \
                                 around it",
                                finding.detail
                            ),
                            ..finding
                        });
                        pos = q as usize;
                    }
                    Some((q, _)) => {
                        report.damage.push(finding);
                        pos = q as usize;
                    }
                }
            }
        }
    }
    if (pos as u64) < synced_len && (data.len() as u64) < synced_len {
        report.damage.push(Finding {
            file: path,
            bytes: data.len() as u64..synced_len,
            offsets: None,
            detail: format!(
                "journal is {} bytes long, but the checkpoint records {synced_len} synced bytes",
                data.len()
            ),
        });
    }
    if report.damage.len() > damage_before {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = entries.iter().map(Vec::as_slice).collect();
    Ok(Some((payloads.referenced_end)(state.as_deref(), &entries)))
}

/// An index file's bytes, if it exists; one longer than its segment allows
/// is noted and checked as empty (the next start rebuilds it).
fn read_hint(
    storage: &dyn Storage,
    path: &Path,
    max_len: u64,
    report: &mut VerifyReport,
) -> Result<Option<Vec<u8>>> {
    if !storage.exists(path) {
        return Ok(None);
    }
    match read_file_within(storage, path, max_len) {
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            report.notes.push(finding(
                path.to_path_buf(),
                format!(
                    "index file larger than its segment allows ({e}); the next start rebuilds it"
                ),
            ));
            Ok(Some(Vec::new()))
        }
        Ok(bytes) => Ok(Some(bytes)),
        // Not a file the broker can read or replace (a folder, a device):
        // the broker refuses the topic, so it is damage here (and checked
        // as empty, not as missing).
        Err(e) if refused_for_good(&e) => {
            report.damage.push(finding(
                path.to_path_buf(),
                format!("the index cannot be read: {e}"),
            ));
            Ok(Some(Vec::new()))
        }
        Err(e) => Err(e).ctx(|| format!("reading {}", path.display())),
    }
}

/// A journal's or snapshot's bytes as `verify` finds them.
enum JournalBytes {
    Missing,
    /// Damage already reported (too large for any, unreadable): nothing
    /// more is said of the file.
    Reported,
    Read(Vec<u8>),
}

/// A journal's or snapshot's bytes, if it exists; one too large for any, or
/// that cannot be read for good, is damage, reported once.
fn read_journal_file(
    storage: &dyn Storage,
    path: &Path,
    report: &mut VerifyReport,
) -> Result<JournalBytes> {
    use crate::groups::journal::JournalFile;
    let read = match crate::groups::journal::read_journal_file(storage, path) {
        Ok(read) => read,
        // What the broker refuses too (a folder there, no permission).
        Err(e @ crate::Error::Io { .. }) if refused_for_good_error(&e) => {
            report
                .damage
                .push(finding(path.to_path_buf(), format!("cannot be read: {e}")));
            return Ok(JournalBytes::Reported);
        }
        Err(e) => return Err(e),
    };
    Ok(match read {
        JournalFile::Missing => JournalBytes::Missing,
        JournalFile::Read(data) => JournalBytes::Read(data),
        JournalFile::TooLarge(found) => {
            report.damage.push(Finding {
                file: found.file,
                bytes: found.bytes,
                offsets: found.offsets,
                detail: found.detail,
            });
            JournalBytes::Reported
        }
    })
}

/// Whether a read failed for what the broker refuses the file for until
/// someone puts it right (a folder or FIFO in its place, no permission, a
/// dangling link, a size no such file has), not for a passing shortage of
/// memory or descriptors or an I/O error, which stay errors of the check.
fn refused_for_good(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        FileTooLarge | InvalidInput | IsADirectory | NotADirectory | PermissionDenied | NotFound
    )
}

/// [`refused_for_good`] of an [`Error::Io`](crate::Error::Io).
fn refused_for_good_error(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Io { source, .. } if refused_for_good(source))
}
