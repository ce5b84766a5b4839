//! A small durable state file: a checksummed journal of entries plus a
//! snapshot that replaces them. Group state and topic deletions use it.
//!
//! Entries are framed as spool records (see [`crate::storage::record`]): the
//! record offset is the entry's sequence number and the value its payload, so a
//! torn journal tail is found and cut exactly like a segment's. The snapshot
//! file `<name>.snap` holds one record whose offset is the first sequence it
//! does *not* cover; it is replaced atomically (temp file, fsync, rename, dir fsync), and
//! entries it covers are skipped on replay, so a crash between the rename and
//! the journal reset loses nothing; the next open finishes that reset. The
//! snapshot's cut names the journal file's generation, whose synced length a
//! checkpoint records: a file only grows within its generation.

use crate::error::{Corruption, Error, IoContext, Result};
use crate::storage::RecoveryMode;
use crate::storage::io::{
    OpenMode, Storage, StorageFile, file_len, read_file_within, write_file_atomic,
};
use crate::storage::message::NewMessage;
use crate::storage::record::{self, Frame};
use crate::storage::recovery::{Truncation, find_next_valid};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Largest journal entry or snapshot.
pub const MAX_ENTRY_BYTES: u32 = 256 * 1024 * 1024;

/// What replaying a journal found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The snapshot payload, if one was written.
    pub snapshot: Option<Vec<u8>>,
    /// Entries after the snapshot, in order.
    pub entries: Vec<Vec<u8>>,
    /// A torn tail that was cut.
    pub truncated: Option<Truncation>,
    /// Damage given up under skip-damaged.
    pub damage: Vec<Corruption>,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    path: PathBuf,
    snap_path: PathBuf,
    file: Arc<dyn StorageFile>,
    pos: u64,
    /// First sequence number the file holds (the snapshot's cut).
    base_seq: u64,
    next_seq: u64,
    since_snapshot: u64,
    /// A snapshot taken as the journal goes failed, and no later one
    /// succeeded yet (see [`Journal::snapshot_when_possible`]).
    snapshot_failing: bool,
    /// What is durable, shared with callers that wait outside the owner's lock.
    syncer: Arc<JournalSyncer>,
}

/// A journal's durability, shared with callers waiting outside the lock of
/// the journal's owner: whoever finds no sync running runs one that covers
/// every entry written so far, and everyone waiting for those entries is
/// answered by it (group commit). A failed sync is never retried: the
/// journal turns read-only.
#[derive(Debug)]
pub struct JournalSyncer {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
    /// Bumped after every sync, for waiters on an async runtime.
    synced: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The file's generation: the first sequence number it holds.
    base_seq: u64,
    /// Sequence and byte position after the last entry written.
    written_seq: u64,
    written_pos: u64,
    /// Every entry below `durable_seq` is durable, and so are the bytes
    /// below `durable_pos` of generation `base_seq`.
    durable_seq: u64,
    durable_pos: u64,
    syncing: bool,
    /// A sync an async waiter handed to the blocking pool, not yet begun.
    /// Other async waiters wait for it; blocking waiters do not (they never
    /// wait for a task that may be queued behind them).
    queued: bool,
    poisoned: Option<String>,
}

impl JournalSyncer {
    fn new(file: Arc<dyn StorageFile>, path: PathBuf, base_seq: u64, seq: u64, pos: u64) -> Self {
        JournalSyncer {
            file,
            path,
            state: Mutex::new(SyncState {
                base_seq,
                written_seq: seq,
                written_pos: pos,
                durable_seq: seq,
                durable_pos: pos,
                syncing: false,
                queued: false,
                poisoned: None,
            }),
            done: Condvar::new(),
            synced: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_only(&self, cause: &str) -> Error {
        Error::ReadOnly {
            log: self.path.clone(),
            cause: cause.to_owned(),
        }
    }

    /// Returns once every entry with a sequence number below `seq` is
    /// durable, syncing when no sync that covers them is under way.
    pub fn wait(&self, seq: u64) -> Result<()> {
        let mut st = self.lock();
        loop {
            match self.next_step(&mut st, seq, false)? {
                Step::Done => return Ok(()),
                Step::Wait => st = self.done.wait(st).unwrap_or_else(|p| p.into_inner()),
                Step::Sync(sync) => {
                    drop(st);
                    self.run(sync);
                    st = self.lock();
                }
                // Only for async waiters.
                Step::Queue => {}
            }
        }
    }

    /// [`JournalSyncer::wait`] for async callers: waiting for another
    /// caller's sync holds no thread; when no sync is running or queued,
    /// this caller queues one on the blocking pool (a [`JournalSyncer::wait`]
    /// there, which runs to the end even if the caller goes away).
    pub async fn wait_async(self: Arc<Self>, seq: u64) -> Result<()> {
        loop {
            // Subscribed before the state is read, so a sync finishing in
            // between is not missed.
            let mut synced = self.synced.subscribe();
            let step = self.next_step(&mut self.lock(), seq, true)?;
            match step {
                Step::Done => return Ok(()),
                Step::Wait => {
                    // The sender lives in `self`, so this cannot fail.
                    let _ = synced.changed().await;
                }
                Step::Queue => {
                    let syncer = Arc::clone(&self);
                    tokio::task::spawn_blocking(move || {
                        syncer.lock().queued = false;
                        let result = syncer.wait(seq);
                        // Async waiters of a queued sync that found nothing
                        // to do look again.
                        syncer.synced.send_modify(|n| *n = n.wrapping_add(1));
                        result
                    })
                    .await
                    .map_err(|e| {
                        Error::Internal(format!("syncing {}: {e}", self.path.display()))
                    })??;
                }
                // Only for blocking waiters.
                Step::Sync(sync) => self.run(sync),
            }
        }
    }

    /// What a caller waiting for `seq` does next: `Sync` marks a sync as
    /// under way, which the (blocking) caller then has to
    /// [`JournalSyncer::run`]; `Queue` marks one as queued, which the async
    /// caller hands to the blocking pool.
    fn next_step(&self, st: &mut SyncState, seq: u64, from_async: bool) -> Result<Step> {
        if let Some(cause) = &st.poisoned {
            return Err(self.read_only(cause));
        }
        if st.durable_seq >= seq {
            return Ok(Step::Done);
        }
        if st.syncing || (from_async && st.queued) {
            return Ok(Step::Wait);
        }
        if from_async {
            st.queued = true;
            return Ok(Step::Queue);
        }
        st.syncing = true;
        Ok(Step::Sync(PendingSync {
            generation: st.base_seq,
            upto_seq: st.written_seq,
            upto_pos: st.written_pos,
        }))
    }

    /// Runs a sync [`JournalSyncer::next_step`] asked for and answers every
    /// waiter.
    fn run(&self, sync: PendingSync) {
        let result = self.file.sync_data();
        let mut st = self.lock();
        st.syncing = false;
        match result {
            Ok(()) => {
                st.durable_seq = st.durable_seq.max(sync.upto_seq);
                if st.base_seq == sync.generation {
                    st.durable_pos = st.durable_pos.max(sync.upto_pos);
                }
            }
            Err(e) => {
                st.poisoned = Some(format!("sync of {} failed: {e}", self.path.display()));
            }
        }
        drop(st);
        self.done.notify_all();
        self.synced.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What a waiter does next (see [`JournalSyncer::next_step`]).
enum Step {
    Done,
    Wait,
    Sync(PendingSync),
    Queue,
}

/// A sync under way: what it covers once it succeeds.
struct PendingSync {
    generation: u64,
    upto_seq: u64,
    upto_pos: u64,
}

/// Entries a caller waits to see durable, outside the owner's lock.
#[derive(Debug)]
#[must_use = "the entries are durable only once `wait` returns"]
pub struct SyncWait {
    syncer: Arc<JournalSyncer>,
    seq: u64,
}

impl SyncWait {
    /// Returns once the entries are durable (see [`JournalSyncer::wait`]).
    pub fn wait(self) -> Result<()> {
        self.syncer.wait(self.seq)
    }

    /// [`SyncWait::wait`] on an async runtime, holding no thread while
    /// another caller's sync runs.
    pub async fn wait_async(self) -> Result<()> {
        self.syncer.wait_async(self.seq).await
    }
}

/// What the log's checkpoint says of a journal, and how to treat damage.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalRecovery {
    /// First sequence number the journal file held at the checkpoint.
    pub base_seq: u64,
    /// Bytes of that file known synced: a bad entry below is damage.
    pub synced_len: u64,
    /// How damage is treated.
    pub mode: RecoveryMode,
    /// The topic syncs on a timer or never (`fsync=interval`/`never`) and
    /// has a checkpoint: nothing past the recovery point was promised to
    /// survive a power cut, so bad bytes there holding a whole sector of
    /// zeros, with valid entries after them (a write the disk lost out of
    /// order), are set aside in either mode.
    pub relaxed: bool,
    /// How the journal's payloads parse: an entry or snapshot whose
    /// checksum holds but whose content does not parse is damage where it
    /// lies (never a torn write: it is whole), found as it is read.
    pub payloads: Option<Payloads>,
}

/// How the payloads of one kind of journal (a group's, a topic's
/// deletions) parse, each check saying why one does not.
#[derive(Debug, Clone, Copy)]
pub struct Payloads {
    /// Checks an entry's payload.
    pub entry: fn(&[u8]) -> std::result::Result<(), String>,
    /// Checks a snapshot's payload.
    pub snapshot: fn(&[u8]) -> std::result::Result<(), String>,
    /// The end of the offsets the state of a snapshot's payload and entry
    /// payloads after it (all checked) speaks of: a log that ends before
    /// it lost offsets that were handed out.
    pub referenced_end: ReferencedEnd,
}

/// See [`Payloads::referenced_end`]: a snapshot's payload, if any, and the
/// entries' after it.
pub type ReferencedEnd = fn(Option<&[u8]>, &[&[u8]]) -> u64;

/// What is wrong with the bytes at a journal entry's place, as `decoded`
/// (after the entry with sequence number `last`) found them.
pub(crate) fn entry_problem(
    decoded: &std::result::Result<Frame<'_>, record::DecodeError>,
    last: Option<u64>,
) -> String {
    match decoded {
        Err(e) => e.to_string(),
        Ok(Frame::Record(r)) => format!(
            "sequence number {} does not follow {}",
            r.offset,
            last.map_or_else(|| "the one before".to_string(), |l| l.to_string())
        ),
        Ok(Frame::End) => "zeros with other bytes after them".into(),
    }
}

/// Why a snapshot record's payload, checked by `payloads`, does not parse.
fn snapshot_problem(payloads: Option<Payloads>, payload: &[u8]) -> std::result::Result<(), String> {
    match payloads {
        Some(p) => (p.snapshot)(payload)
            .map_err(|why| format!("it passed its checksum but does not parse ({why})")),
        None => Ok(()),
    }
}

/// The record a snapshot file holds, or why it holds none: a snapshot is
/// written whole (a temporary file renamed), so it is one record that fills
/// the file, and anything else is damage. Its length is bounded by the file
/// (already read), not by [`MAX_ENTRY_BYTES`]: a large group's state can
/// outgrow an entry's limit.
pub(crate) fn snapshot_record(data: &[u8]) -> std::result::Result<record::RecordRef<'_>, String> {
    match record::decode(data, u32::MAX) {
        Ok(Frame::Record(r)) if r.len as usize == data.len() => Ok(r),
        Ok(Frame::Record(r)) => Err(format!(
            "{} bytes follow its record of {}",
            data.len() - r.len as usize,
            r.len
        )),
        Ok(Frame::End) => Err("it holds no record (zeros or empty)".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

impl Journal {
    /// Opens (creating if needed) the journal `name` in `dir` and replays it,
    /// cutting a torn tail anywhere (no recovery point known).
    pub fn open(storage: Arc<dyn Storage>, dir: &Path, name: &str) -> Result<(Journal, Replayed)> {
        Journal::open_checked(storage, dir, name, JournalRecovery::default())
    }

    /// Opens (creating if needed) the journal `name` in `dir` and replays it.
    /// A bad entry is a torn tail only past the recovery point and with no
    /// valid entry after it; anything else is damage: refused under the
    /// default mode, and under skip-damaged copied to `quarantine/` and left
    /// out while the valid entries around it are kept (a lost ack means a
    /// redelivery, which at-least-once allows). Past the recovery point of a
    /// `relaxed` journal, bad bytes holding a whole sector of zeros with
    /// valid entries after them are treated as under skip-damaged in either
    /// mode.
    pub fn open_checked(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        recovery: JournalRecovery,
    ) -> Result<(Journal, Replayed)> {
        storage
            .create_dir_all(dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        let (path, snap_path) = paths(dir, name);
        let mut replayed = Replayed::default();
        let skip = recovery.mode == RecoveryMode::SkipDamaged;
        // Entries with a sequence below this are already in the snapshot.
        let mut first_uncovered = 0u64;
        if let Some(data) = read_bounded(&*storage, dir, &snap_path, skip, &mut replayed.damage)? {
            match snapshot_record(&data)
                .and_then(|r| snapshot_problem(recovery.payloads, r.value).map(|()| r))
            {
                Ok(r) => {
                    first_uncovered = r.offset;
                    replayed.snapshot = Some(r.value.to_vec());
                }
                Err(why) => {
                    let damage = Corruption {
                        file: snap_path.clone(),
                        bytes: 0..data.len() as u64,
                        offsets: None,
                        detail: format!(
                            "snapshot does not validate: {why}. Start with recovery mode \
                             skip-damaged (`spool serve --recovery skip-damaged`) to quarantine \
                             it and give up the state it held"
                        ),
                    };
                    if !skip {
                        return Err(Error::corruption(damage));
                    }
                    // Given up as a missing snapshot is (below): the entries
                    // after it are replayed onto nothing.
                    crate::storage::recovery::quarantine_bytes(&*storage, dir, &damage, &data)?;
                    storage
                        .remove_file(&snap_path)
                        .ctx(|| format!("removing {}", snap_path.display()))?;
                    storage
                        .sync_dir(dir)
                        .ctx(|| format!("syncing {}", dir.display()))?;
                    tracing::error!(damage = %damage.given_up(), "quarantined a damaged journal snapshot");
                    replayed.damage.push(damage);
                }
            }
        }
        // The recovery point holds for the file the checkpoint saw; a
        // snapshot since then reset it.
        let mut synced_len = 0;
        if recovery.synced_len > 0 || recovery.base_seq > 0 {
            if first_uncovered == recovery.base_seq {
                synced_len = recovery.synced_len;
            } else if first_uncovered < recovery.base_seq {
                let damage = Corruption {
                    file: snap_path.clone(),
                    bytes: 0..0,
                    offsets: None,
                    detail: format!(
                        "snapshot is {}: the checkpoint records one covering sequence numbers below {}",
                        if replayed.snapshot.is_some() {
                            "older than recorded"
                        } else {
                            "missing"
                        },
                        recovery.base_seq
                    ),
                };
                if !skip {
                    return Err(Error::corruption(damage));
                }
                tracing::error!(damage = %damage.given_up(), "journal state before the damage is given up");
                replayed.damage.push(damage);
            }
        }
        let read = read_bounded(&*storage, dir, &path, skip, &mut replayed.damage)?;
        let existed = read.is_some();
        let mut data = read.unwrap_or_default();
        let mut pos = 0usize;
        let mut last_seq: Option<u64> = None;
        // Under skip-damaged: the valid entries with their sequence numbers,
        // to rewrite the journal without what was given up.
        let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut rewrite = false;
        let mut cut_at: Option<usize> = None;
        while pos < data.len() {
            let decoded = record::decode(&data[pos..], MAX_ENTRY_BYTES);
            let bad = match decoded {
                Ok(Frame::Record(r)) if last_seq.is_none_or(|l| r.offset > l) => {
                    let parsed = match recovery.payloads {
                        Some(p) if r.offset >= first_uncovered => (p.entry)(r.value),
                        _ => Ok(()),
                    };
                    if let Err(why) = parsed {
                        let end = pos + r.len as usize;
                        let damage = Corruption {
                            file: path.clone(),
                            bytes: pos as u64..end as u64,
                            offsets: None,
                            detail: format!(
                                "journal entry {} passed its checksum but does not parse ({why}). \
                                 Start with recovery mode skip-damaged (`spool serve --recovery \
                                 skip-damaged`) to quarantine it and keep the entries around it",
                                r.offset
                            ),
                        };
                        if !skip {
                            return Err(Error::corruption(damage));
                        }
                        crate::storage::recovery::quarantine_bytes(
                            &*storage,
                            dir,
                            &damage,
                            &data[pos..end],
                        )?;
                        tracing::error!(damage = %damage.given_up(), "quarantined a journal entry that does not parse; the entries around it are kept");
                        replayed.damage.push(damage);
                        rewrite = true;
                        last_seq = Some(r.offset);
                        pos = end;
                        continue;
                    }
                    if r.offset >= first_uncovered {
                        replayed.entries.push(r.value.to_vec());
                    }
                    kept.push((r.offset, r.value.to_vec()));
                    last_seq = Some(r.offset);
                    pos += r.len as usize;
                    continue;
                }
                Ok(Frame::End) if data[pos..].iter().all(|&b| b == 0) => {
                    if (pos as u64) < synced_len {
                        format!("zeros where synced entries were (up to byte {synced_len})")
                    } else {
                        break;
                    }
                }
                _ => format!(
                    "entry does not validate ({})",
                    entry_problem(&decoded, last_seq)
                ),
            };
            let next = find_next_valid(&data, pos as u64, last_seq, MAX_ENTRY_BYTES, None, None);
            if next.is_none() && pos as u64 >= synced_len {
                cut_at = Some(pos);
                break;
            }
            let unsynced_hole = recovery.relaxed
                && pos as u64 >= synced_len
                && next.is_some_and(|(q, _)| {
                    crate::storage::recovery::looks_like_lost_pages(&data, pos as u64..q)
                });
            let end = next.map_or(data.len() as u64, |(q, _)| q);
            let damage = Corruption {
                file: path.clone(),
                bytes: pos as u64..end,
                offsets: None,
                detail: if unsynced_hole {
                    format!(
                        "journal {bad}; valid entries follow it, past the recovery point (byte \
                         {synced_len} was synced) of a topic that syncs on a timer or never: pages \
                         the disk wrote out of order before a power cut"
                    )
                } else {
                    format!(
                        "journal {bad}; {}. Start with recovery mode skip-damaged \
                         (`spool serve --recovery skip-damaged`) to quarantine it and keep the entries around it",
                        if next.is_some() {
                            "valid entries follow it".to_string()
                        } else {
                            format!(
                                "it lies below the recovery point (byte {synced_len} was synced), so it is not a torn write"
                            )
                        }
                    )
                },
            };
            if !skip && !unsynced_hole {
                return Err(Error::corruption(damage));
            }
            crate::storage::recovery::quarantine_bytes(
                &*storage,
                dir,
                &damage,
                &data[pos..end as usize],
            )?;
            if unsynced_hole {
                tracing::warn!(damage = %damage.given_up(), "set aside a hole in the unsynced tail of a journal; the entries around it are kept");
            } else {
                tracing::error!(damage = %damage.given_up(), "quarantined a damaged journal entry; the entries around it are kept");
            }
            replayed.damage.push(damage);
            rewrite = true;
            match next {
                Some((q, _)) => pos = q as usize,
                None => break,
            }
        }
        if (data.len() as u64) < synced_len {
            let damage = Corruption {
                file: path.clone(),
                bytes: data.len() as u64..synced_len,
                offsets: None,
                detail: format!(
                    "journal is {} bytes long, but the checkpoint records {synced_len} synced bytes. \
                     Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) to open anyway",
                    data.len()
                ),
            };
            if !skip {
                return Err(Error::corruption(damage));
            }
            tracing::error!(damage = %damage.given_up(), "journal entries lost");
            replayed.damage.push(damage);
        }
        // The figures of a torn tail cut: of the journal as found.
        let found_len = data.len();
        if rewrite {
            let mut buf = Vec::new();
            // Entries the snapshot covers are never replayed: left out, so
            // the file holds no bytes of an older generation.
            for (seq, payload) in kept.iter().filter(|(seq, _)| *seq >= first_uncovered) {
                record::encode(
                    &mut buf,
                    *seq,
                    0,
                    &NewMessage::from_value(Bytes::copy_from_slice(payload)),
                );
            }
            write_file_atomic(&*storage, &path, &buf)
                .ctx(|| format!("rewriting {} without its damaged entries", path.display()))?;
            data = buf;
            pos = data.len();
        }
        let file = storage
            .open(&path, OpenMode::CreateOrOpen)
            .ctx(|| format!("opening {}", path.display()))?;
        if !existed {
            storage
                .sync_dir(dir)
                .ctx(|| format!("syncing {}", dir.display()))?;
        }
        if let Some(at) = cut_at {
            let dropped = found_len.saturating_sub(at) as u64;
            // A rewrite kept only the entries before the tail: the file
            // holds no more than them, and cutting it at the old length
            // would extend it with zeros.
            if !rewrite {
                file.set_len(at as u64)
                    .ctx(|| format!("truncating {}", path.display()))?;
                pos = at;
            }
            tracing::warn!(file = %path.display(), at, dropped, "cut torn journal tail");
            replayed.truncated = Some(Truncation {
                file: path.clone(),
                at: at as u64,
                dropped,
            });
        }
        // Only entries the snapshot covers: a crash came between its rename
        // and the journal reset. Finish the reset now. Left in place, these
        // bytes would count as synced bytes of generation `first_uncovered`,
        // and a checkpoint could record them; a later snapshot covering the
        // same sequence numbers keeps that generation but empties the file,
        // and the recorded point would then claim synced bytes it no longer
        // has.
        let reset = pos > 0 && last_seq.is_some_and(|l| l < first_uncovered);
        if reset {
            file.set_len(0)
                .ctx(|| format!("resetting {}", path.display()))?;
            tracing::warn!(
                file = %path.display(),
                at = 0,
                dropped = pos,
                "cut journal entries its snapshot covers (an interrupted reset)"
            );
            pos = 0;
        }
        // A crashed process may have left entries in the page cache only:
        // make everything replayed durable before the journal's recovery
        // point can count it (nothing to do when the point already covers
        // all of it, as after a clean stop).
        if pos as u64 > synced_len || cut_at.is_some() || rewrite || reset {
            file.sync_data()
                .ctx(|| format!("syncing {}", path.display()))?;
        }
        let since_snapshot = replayed.entries.len() as u64;
        let next_seq = last_seq.map_or(first_uncovered, |s| (s + 1).max(first_uncovered));
        let syncer = Arc::new(JournalSyncer::new(
            Arc::clone(&file),
            path.clone(),
            first_uncovered,
            next_seq,
            pos as u64,
        ));
        Ok((
            Journal {
                storage,
                dir: dir.to_owned(),
                path,
                snap_path,
                syncer,
                file,
                pos: pos as u64,
                base_seq: first_uncovered,
                next_seq,
                since_snapshot,
                snapshot_failing: false,
            },
            replayed,
        ))
    }

    /// The journal's recovery point: the first sequence number its file
    /// holds and how many of its bytes are synced.
    pub fn recovery_point(&self) -> (u64, u64) {
        let st = self.syncer.lock();
        let synced = if st.base_seq == self.base_seq {
            st.durable_pos
        } else {
            0
        };
        (self.base_seq, synced)
    }

    /// Creates the journal `name` in `dir` holding `entries`, and opens it.
    /// The name appears only once every entry is durable (temp file, fsync,
    /// rename, dir fsync), so a crash never leaves a journal that exists
    /// without the entries its creator wrote first (a group's mode and start).
    /// Fails if the journal or its snapshot exists.
    pub fn create(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        entries: &[Vec<u8>],
    ) -> Result<(Journal, Replayed)> {
        storage
            .create_dir_all(dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        let (path, _) = paths(dir, name);
        if Journal::exists(&*storage, dir, name) {
            return Err(Error::AlreadyExists(format!(
                "journal {} exists",
                path.display()
            )));
        }
        let mut buf = Vec::new();
        for (seq, payload) in entries.iter().enumerate() {
            let entry = NewMessage::from_value(Bytes::copy_from_slice(payload));
            record::encode(&mut buf, seq as u64, 0, &entry);
        }
        write_file_atomic(&*storage, &path, &buf).ctx(|| format!("creating {}", path.display()))?;
        Journal::open(storage, dir, name)
    }

    /// Whether the journal file of `name` exists in `dir` (a journal is
    /// never without it: a snapshot empties it, removing the journal takes
    /// it first).
    pub fn journal_file_exists(storage: &dyn Storage, dir: &Path, name: &str) -> bool {
        storage.exists(&paths(dir, name).0)
    }

    /// Whether the journal `name` (or its snapshot) exists in `dir`.
    pub fn exists(storage: &dyn Storage, dir: &Path, name: &str) -> bool {
        let (path, snap_path) = paths(dir, name);
        storage.exists(&path) || storage.exists(&snap_path)
    }

    fn check(&self) -> Result<()> {
        match &self.syncer.lock().poisoned {
            Some(cause) => Err(self.syncer.read_only(cause)),
            None => Ok(()),
        }
    }

    /// Appends an entry (not yet durable: see [`Journal::sync`]).
    pub fn append(&mut self, payload: &[u8]) -> Result<()> {
        self.check()?;
        let mut buf = Vec::with_capacity(payload.len() + record::HEADER_LEN);
        let entry = NewMessage::from_value(Bytes::copy_from_slice(payload));
        record::encode(&mut buf, self.next_seq, 0, &entry);
        self.file
            .write_at(self.pos, &buf)
            .ctx(|| format!("writing {}", self.path.display()))?;
        self.pos += buf.len() as u64;
        self.next_seq += 1;
        self.since_snapshot += 1;
        let mut st = self.syncer.lock();
        st.written_seq = self.next_seq;
        st.written_pos = self.pos;
        Ok(())
    }

    /// Whether a failed sync made the journal read-only.
    pub fn is_read_only(&self) -> bool {
        self.syncer.lock().poisoned.is_some()
    }

    /// Whether every appended entry is durable.
    pub fn is_synced(&self) -> bool {
        self.syncer.lock().durable_seq >= self.next_seq
    }

    /// Durability point. A failure is never retried: the journal turns read-only.
    pub fn sync(&mut self) -> Result<()> {
        self.syncer.wait(self.next_seq)
    }

    /// What to wait on, after letting go of the journal's owner, for every
    /// entry appended so far to be durable: syncs of several callers share
    /// one `fdatasync` (group commit).
    pub fn sync_later(&self) -> SyncWait {
        SyncWait {
            syncer: Arc::clone(&self.syncer),
            seq: self.next_seq,
        }
    }

    /// Entries appended since the last snapshot.
    pub fn entries_since_snapshot(&self) -> u64 {
        self.since_snapshot
    }

    /// Replaces everything journaled so far with `state`, durably, and empties
    /// the journal.
    /// [`Journal::snapshot`] that keeps a journal short as it goes: the
    /// entries are journaled (and synced) already, so a snapshot that fails
    /// without making the journal read-only (a full disk, something in the
    /// way of its temp file) costs only length, and the next call tries
    /// again; logged once until one succeeds. A failure that made the
    /// journal read-only is returned.
    pub fn snapshot_when_possible(&mut self, state: &[u8]) -> Result<()> {
        match self.snapshot(state) {
            Ok(()) => {
                self.snapshot_failing = false;
                Ok(())
            }
            Err(e) if self.is_read_only() => Err(e),
            Err(e) => {
                if !self.snapshot_failing {
                    tracing::warn!(journal = %self.path.display(), error = %e,
                        "could not snapshot the journal; it grows until a snapshot succeeds, tried again at each change");
                    self.snapshot_failing = true;
                }
                Ok(())
            }
        }
    }

    pub fn snapshot(&mut self, state: &[u8]) -> Result<()> {
        self.check()?;
        // The reset below keeps the generation when nothing was appended
        // since the last snapshot; the file is empty then (open finishes an
        // interrupted reset), so no recovery point loses synced bytes.
        debug_assert!(
            self.next_seq > self.base_seq || self.pos == 0,
            "a journal generation holds bytes only of entries it journaled"
        );
        if state.len() > (u32::MAX as usize).saturating_sub(record::HEADER_LEN) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {}: {} bytes of state do not fit a record (at most 4 GiB)",
                self.snap_path.display(),
                state.len()
            )));
        }
        let mut buf = Vec::with_capacity(state.len() + record::HEADER_LEN);
        record::encode(
            &mut buf,
            self.next_seq,
            0,
            &NewMessage::from_value(Bytes::copy_from_slice(state)),
        );
        write_file_atomic(&*self.storage, &self.snap_path, &buf)
            .ctx(|| format!("writing snapshot {}", self.snap_path.display()))?;
        // Entries below `next_seq` are in the snapshot; a crash before this cut
        // only leaves entries that replay skips.
        let reset = self
            .file
            .set_len(0)
            .ctx(|| format!("resetting {}", self.path.display()))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .ctx(|| format!("syncing {}", self.path.display()))
            });
        if let Err(e) = reset {
            // Nothing more is appended (or synced, which would retry a
            // failed sync): an entry at the old position of a journal the
            // cut may have emptied would follow zeros, which the next open
            // takes for damage.
            self.syncer.lock().poisoned = Some(e.to_string());
            return Err(e);
        }
        self.pos = 0;
        self.base_seq = self.next_seq;
        self.since_snapshot = 0;
        // Everything before is in the snapshot; the new file starts empty.
        let mut st = self.syncer.lock();
        st.base_seq = self.next_seq;
        st.written_seq = self.next_seq;
        st.written_pos = 0;
        st.durable_seq = st.durable_seq.max(self.next_seq);
        st.durable_pos = 0;
        Ok(())
    }

    /// Removes the journal's files.
    pub fn remove(self) -> Result<()> {
        self.remove_own_files()
    }

    /// Removes the journal's files while others may still hold it (what they
    /// write goes to the removed files).
    pub fn remove_own_files(&self) -> Result<()> {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".journal"))
            .unwrap_or_default()
            .to_owned();
        Journal::remove_files(&*self.storage, &self.dir, &name)
    }

    /// Removes the files of journal `name` in `dir`, if any: the journal
    /// first, durably, so a crash half-way leaves at most a snapshot without
    /// its journal. A topic lists its groups by their journals, so that
    /// snapshot is no group; creating a group of that name removes it first.
    pub fn remove_files(storage: &dyn Storage, dir: &Path, name: &str) -> Result<()> {
        let (path, snap_path) = paths(dir, name);
        for path in [&path, &snap_path] {
            if storage.exists(path) {
                storage
                    .remove_file(path)
                    .ctx(|| format!("removing {}", path.display()))?;
                storage
                    .sync_dir(dir)
                    .ctx(|| format!("syncing {}", dir.display()))?;
            }
        }
        Ok(())
    }
}

/// The journal file and the snapshot file of journal `name` in `dir`.
fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.journal")),
        dir.join(format!("{name}.snap")),
    )
}

/// Most bytes a journal or a snapshot is read from: a snapshot is one
/// record, and a journal holds far less between two snapshots (groups and
/// deletions both take one every [`crate::groups::SNAPSHOT_EVERY`]
/// entries).
pub(crate) const MAX_JOURNAL_FILE: u64 = u32::MAX as u64;

/// A journal or snapshot file as found on disk.
pub(crate) enum JournalFile {
    Missing,
    Read(Vec<u8>),
    /// Longer than [`MAX_JOURNAL_FILE`]: damage, not read.
    TooLarge(Corruption),
}

/// Reads journal or snapshot `path` whole, unless it is longer than any
/// is ([`JournalFile::TooLarge`]). One that does not fit in memory is an
/// error ([`Error::MemoryExhausted`]), not damage: memory may come back.
pub(crate) fn read_journal_file(storage: &dyn Storage, path: &Path) -> Result<JournalFile> {
    if !storage.exists(path) {
        return Ok(JournalFile::Missing);
    }
    match read_file_within(storage, path, MAX_JOURNAL_FILE) {
        Ok(data) => Ok(JournalFile::Read(data)),
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            Ok(JournalFile::TooLarge(Corruption {
                file: path.to_path_buf(),
                bytes: 0..file_len(storage, path),
                offsets: None,
                detail: format!("{e}: no journal or snapshot is that large"),
            }))
        }
        Err(e) => Err(e).ctx(|| format!("reading {}", path.display())),
    }
}

/// [`read_journal_file`] for opening journal file `path` in `dir`: `None`
/// when missing; one too large is refused, or under skip-damaged (`skip`)
/// moved whole to `quarantine/`, noted in `damage` and taken as missing.
fn read_bounded(
    storage: &dyn Storage,
    dir: &Path,
    path: &Path,
    skip: bool,
    damage: &mut Vec<Corruption>,
) -> Result<Option<Vec<u8>>> {
    let mut found = match read_journal_file(storage, path)? {
        JournalFile::Missing => return Ok(None),
        JournalFile::Read(data) => return Ok(Some(data)),
        JournalFile::TooLarge(found) => found,
    };
    found.detail.push_str(
        ". Start with recovery mode skip-damaged (`spool serve --recovery skip-damaged`) to set \
         it aside in quarantine/ and give up the state it held",
    );
    if !skip {
        return Err(Error::corruption(found));
    }
    let quarantine = crate::storage::recovery::quarantine_dir(storage, dir)?;
    let to = crate::storage::recovery::quarantine_name(storage, &quarantine, &found, |_| false);
    storage
        .rename(path, &to)
        .ctx(|| format!("moving {} to {}", path.display(), to.display()))?;
    for folder in [dir, &quarantine] {
        storage
            .sync_dir(folder)
            .ctx(|| format!("syncing {}", folder.display()))?;
    }
    tracing::error!(damage = %found.given_up(), "set a journal file too large to read aside");
    damage.push(found);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::SimDisk;

    fn open(disk: &Arc<SimDisk>) -> (Journal, Replayed) {
        Journal::open(
            Arc::clone(disk) as Arc<dyn Storage>,
            Path::new("/g"),
            "group",
        )
        .expect("open journal")
    }

    /// A snapshot taken as the journal goes that cannot be written (a full
    /// disk) leaves the journal writable and whole, and is taken at the
    /// next try once it can be.
    #[test]
    fn a_snapshot_that_cannot_be_written_waits_for_the_next_try() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"one").expect("append");
        j.sync().expect("sync");
        disk.set_fault(crate::storage::io::SimFault::NoSpace, true);
        j.snapshot_when_possible(b"state")
            .expect("a failed snapshot is no failed change");
        disk.set_fault(crate::storage::io::SimFault::NoSpace, false);
        assert!(!j.is_read_only());
        assert_eq!(j.entries_since_snapshot(), 1, "still to take");
        j.append(b"two").expect("the journal takes entries");
        j.sync().expect("sync");
        j.snapshot_when_possible(b"state").expect("snapshot");
        assert_eq!(j.entries_since_snapshot(), 0);
        drop(j);
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.snapshot.as_deref(), Some(&b"state"[..]));
        assert!(replayed.entries.is_empty(), "{:?}", replayed.entries);
    }

    #[test]
    fn synced_entries_survive_power_loss_and_unsynced_ones_may_not() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"one").expect("append");
        j.append(b"two").expect("append");
        j.sync().expect("sync");
        j.append(b"three").expect("append");
        drop(j);
        disk.power_cut(Some(99));
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.entries, vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn a_blocking_waiter_is_never_stuck_behind_a_sync_queued_for_an_async_one() {
        // One blocking thread: the async waiter's sync is queued behind the
        // blocking waiter, which must not wait for it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"x").expect("append");
        let gate = Arc::new(std::sync::Barrier::new(2));
        let (blocking, queued) = rt.block_on(async {
            let (g, wait) = (Arc::clone(&gate), j.sync_later());
            let blocking = tokio::task::spawn_blocking(move || {
                g.wait();
                wait.wait()
            });
            let queued = tokio::spawn(j.sync_later().wait_async());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            (blocking, queued)
        });
        gate.wait();
        let done = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                (blocking.await, queued.await)
            })
            .await
        });
        rt.shutdown_background();
        let (blocking, queued) = done.expect("neither waiter is stuck");
        blocking.expect("blocking task").expect("durable");
        queued.expect("async task").expect("durable");
        assert!(j.is_synced());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_waiters_are_answered_once_their_entries_survive_power_loss() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        let mut waits = Vec::new();
        for i in 0..8u8 {
            j.append(&[i]).expect("append");
            waits.push(tokio::spawn(j.sync_later().wait_async()));
        }
        for w in waits {
            w.await.expect("waiter").expect("durable");
        }
        assert!(j.is_synced());
        drop(j);
        disk.power_cut(Some(7));
        let (_, replayed) = open(&disk);
        let expected: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i]).collect();
        assert_eq!(replayed.entries, expected);
    }

    #[test]
    fn entries_a_crashed_process_left_unsynced_are_flushed_by_the_next_open() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"written, never synced").expect("append");
        // The process dies; the page cache (the live image) survives it.
        drop(j);
        let (j, replayed) = open(&disk);
        assert_eq!(replayed.entries.len(), 1);
        assert!(j.is_synced(), "open makes what it replayed durable");
        assert_eq!(j.recovery_point().1, (record::HEADER_LEN + 21) as u64);
        drop(j);
        disk.power_cut(None);
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.entries, vec![b"written, never synced".to_vec()]);
    }

    /// The contents of the copies in `/g/quarantine` whose names start
    /// with `prefix`.
    fn quarantined(disk: &SimDisk, prefix: &str) -> Vec<Vec<u8>> {
        let q = Path::new("/g/quarantine");
        disk.list_dir(q)
            .unwrap_or_default()
            .iter()
            .filter(|n| n.starts_with(prefix))
            .map(|n| disk.read_file(&q.join(n)).expect("copy"))
            .collect()
    }

    fn open_at(
        disk: &Arc<SimDisk>,
        point: (u64, u64),
        mode: RecoveryMode,
    ) -> Result<(Journal, Replayed)> {
        open_with(disk, point, mode, None)
    }

    fn open_with(
        disk: &Arc<SimDisk>,
        point: (u64, u64),
        mode: RecoveryMode,
        payloads: Option<Payloads>,
    ) -> Result<(Journal, Replayed)> {
        Journal::open_checked(
            Arc::clone(disk) as Arc<dyn Storage>,
            Path::new("/g"),
            "group",
            JournalRecovery {
                base_seq: point.0,
                synced_len: point.1,
                mode,
                relaxed: false,
                payloads,
            },
        )
    }

    /// Under `fsync=interval`/`never` a sector the disk never wrote (zeros)
    /// past the recovery point, with valid entries after it, is pages written
    /// out of order before a power cut: the default mode sets it aside and
    /// keeps the entries around it (a lost ack is a redelivery, within that
    /// policy's promise); under `always` it stays damage, and so does a
    /// flipped bit under any policy.
    #[test]
    fn a_hole_past_the_recovery_point_of_a_relaxed_topic_is_set_aside() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"first").expect("append");
        j.sync().expect("sync");
        let point = j.recovery_point();
        for i in 0..100u32 {
            j.append(format!("entry {i}").as_bytes()).expect("append");
        }
        j.sync().expect("sync");
        drop(j);
        let path = Path::new("/g/group.journal");
        let flipped = disk.read_file(path).expect("read");
        disk.damage(path, 1024, &[0u8; 512]).expect("lose a sector");
        let open_relaxed = |relaxed| {
            Journal::open_checked(
                Arc::clone(&disk) as Arc<dyn Storage>,
                Path::new("/g"),
                "group",
                JournalRecovery {
                    base_seq: point.0,
                    synced_len: point.1,
                    mode: RecoveryMode::TolerateTornTail,
                    relaxed,
                    payloads: None,
                },
            )
        };
        let err = open_relaxed(false).expect_err("damage under fsync=always");
        assert!(err.to_string().contains("valid entries follow it"), "{err}");
        let (_, replayed) = open_relaxed(true).expect("opens");
        assert_eq!(replayed.entries.first(), Some(&b"first".to_vec()));
        assert_eq!(
            replayed.entries.last(),
            Some(&b"entry 99".to_vec()),
            "the entries after the lost sector are kept"
        );
        assert!(
            replayed.entries.len() < 101,
            "the lost sector's entries are gone"
        );
        assert_eq!(replayed.damage.len(), 1);
        assert!(
            replayed.damage[0].detail.contains("out of order"),
            "{:?}",
            replayed.damage
        );
        assert!(
            !quarantined(&disk, "group.journal.").is_empty(),
            "the bad entry is kept aside"
        );
        // A flipped bit where the sector was lost is damage under any policy.
        let mut bytes = flipped;
        bytes[1100] ^= 0x40;
        disk.damage(path, 0, &bytes)
            .expect("put back, one bit flipped");
        let err = open_relaxed(true).expect_err("a flipped bit is no lost page");
        assert!(err.to_string().contains("valid entries follow it"), "{err}");
    }

    #[test]
    fn a_bad_last_entry_below_the_recovery_point_is_damage_not_a_torn_tail() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"first"[..], b"second", b"third"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        let path = Path::new("/g/group.journal");
        let len = disk.read_file(path).expect("read").len() as u64;
        assert_eq!(point.1, len);
        disk.damage(path, len - 1, &[0xEE]).expect("flip");
        let err = open_at(&disk, point, RecoveryMode::TolerateTornTail).expect_err("damage");
        assert!(err.to_string().contains("recovery point"), "{err}");
        // Without a recovery point the same bytes are a torn tail.
        let (_, replayed) = open_at(&disk, (0, 0), RecoveryMode::TolerateTornTail).expect("torn");
        assert_eq!(replayed.entries.len(), 2);
    }

    #[test]
    fn a_journal_shorter_than_its_recovery_point_is_damage() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"first").expect("append");
        j.append(b"second").expect("append");
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        let path = Path::new("/g/group.journal");
        disk.damage_truncate(path, point.1 - 5).expect("cut");
        let err = open_at(&disk, point, RecoveryMode::TolerateTornTail).expect_err("damage");
        assert!(err.to_string().contains("group.journal"), "{err}");
    }

    #[test]
    fn skip_damaged_keeps_the_entries_around_a_damaged_one() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"first"[..], b"second", b"third"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        disk.damage(Path::new("/g/group.journal"), 34 + 36, &[0xFF])
            .expect("flip the second entry");
        let (mut j, replayed) = open_at(&disk, point, RecoveryMode::SkipDamaged).expect("opens");
        assert_eq!(replayed.entries, vec![b"first".to_vec(), b"third".to_vec()]);
        assert_eq!(replayed.damage.len(), 1);
        assert!(
            !quarantined(&disk, "group.journal.").is_empty(),
            "the damaged entry is kept aside"
        );
        j.append(b"fourth").expect("append");
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        // The rewritten journal opens cleanly under the default mode.
        let (_, replayed) = open_at(&disk, point, RecoveryMode::TolerateTornTail).expect("clean");
        assert_eq!(
            replayed.entries,
            vec![b"first".to_vec(), b"third".to_vec(), b"fourth".to_vec()]
        );
    }

    #[test]
    fn a_snapshot_after_the_checkpoint_makes_its_point_stale_not_damage() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"a").expect("append");
        j.append(b"b").expect("append");
        j.sync().expect("sync");
        let old = j.recovery_point();
        j.snapshot(b"ab").expect("snapshot");
        j.append(b"c").expect("append");
        j.sync().expect("sync");
        assert!(j.recovery_point().0 > old.0);
        drop(j);
        let (_, replayed) =
            open_at(&disk, old, RecoveryMode::TolerateTornTail).expect("stale point");
        assert_eq!(replayed.entries, vec![b"c".to_vec()]);
        // A snapshot that went missing is damage.
        disk.remove_file(Path::new("/g/group.snap"))
            .expect("remove");
        let newer = (old.0 + 2, 0);
        assert!(open_at(&disk, newer, RecoveryMode::TolerateTornTail).is_err());
    }

    /// Why: a snapshot that fails its checksum (or has bytes after its
    /// record) kept the whole topic closed even under skip-damaged, the
    /// operator's way out; it is now given up as a missing one is.
    #[test]
    fn a_damaged_snapshot_is_refused_by_default_and_given_up_under_skip_damaged() {
        let snap = Path::new("/g/group.snap");
        for damage in ["flip", "trailing"] {
            let disk = Arc::new(SimDisk::new());
            let (mut j, _) = open(&disk);
            j.append(b"a").expect("append");
            j.snapshot(b"state-after-a").expect("snapshot");
            j.append(b"b").expect("append");
            j.sync().expect("sync");
            let point = j.recovery_point();
            drop(j);
            let len = disk.read_file(snap).expect("snapshot").len() as u64;
            match damage {
                "flip" => disk.damage(snap, len - 2, b"\xff").expect("damage"),
                _ => {
                    let mut bytes = disk.read_file(snap).expect("snapshot");
                    bytes.extend_from_slice(b"junk");
                    crate::storage::io::write_file_atomic(&*disk, snap, &bytes).expect("damage");
                }
            }
            let err = open_at(&disk, point, RecoveryMode::TolerateTornTail)
                .expect_err("a damaged snapshot is refused by default");
            let text = err.to_string();
            assert!(
                text.contains("group.snap") && text.contains("skip-damaged"),
                "{damage}: {text}"
            );
            let (mut j, replayed) =
                open_at(&disk, point, RecoveryMode::SkipDamaged).expect("skip-damaged opens");
            assert_eq!(replayed.snapshot, None, "{damage}");
            assert_eq!(replayed.entries, vec![b"b".to_vec()], "{damage}");
            assert!(!replayed.damage.is_empty(), "{damage}");
            assert!(!disk.exists(snap), "{damage}: the damaged snapshot is gone");
            assert!(
                !quarantined(&disk, "group.snap.").is_empty(),
                "{damage}: the damaged snapshot is kept aside"
            );
            j.append(b"c").expect("append");
            j.sync().expect("sync");
            let point = j.recovery_point();
            drop(j);
            let (_, replayed) = open_at(&disk, point, RecoveryMode::TolerateTornTail)
                .expect("opens cleanly afterwards");
            assert_eq!(replayed.entries, vec![b"b".to_vec(), b"c".to_vec()]);
        }
    }

    /// Why: a quarantine copy is named by its file and byte range, and a
    /// snapshot damaged again (same file, same length) would have
    /// overwritten the only copy of the first.
    #[test]
    fn a_second_damaged_snapshot_keeps_the_first_ones_copy() {
        let snap = Path::new("/g/group.snap");
        let disk = Arc::new(SimDisk::new());
        let mut copies = Vec::new();
        for round in 0..2u8 {
            let (mut j, _) = open(&disk);
            j.append(b"a").expect("append");
            j.snapshot(&[b'0' + round; 8]).expect("snapshot");
            j.sync().expect("sync");
            let point = j.recovery_point();
            drop(j);
            let len = disk.read_file(snap).expect("snapshot").len() as u64;
            disk.damage(snap, len - 1, &[0xff]).expect("damage");
            copies.push(disk.read_file(snap).expect("damaged"));
            open_at(&disk, point, RecoveryMode::SkipDamaged).expect("skip-damaged opens");
        }
        let mut kept = quarantined(&disk, "group.snap.");
        kept.sort();
        copies.sort();
        assert_eq!(kept, copies, "both damaged snapshots are kept");
    }

    #[test]
    fn snapshot_replaces_entries_and_later_entries_follow_it() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"a").expect("append");
        j.snapshot(b"state-after-a").expect("snapshot");
        j.append(b"b").expect("append");
        j.sync().expect("sync");
        drop(j);
        disk.power_cut(None);
        let (j, replayed) = open(&disk);
        assert_eq!(replayed.snapshot.as_deref(), Some(&b"state-after-a"[..]));
        assert_eq!(replayed.entries, vec![b"b".to_vec()]);
        assert_eq!(j.entries_since_snapshot(), 1);
    }

    #[test]
    fn a_snapshot_of_an_empty_journal_hides_nothing() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.snapshot(b"empty").expect("snapshot");
        j.append(b"first").expect("append");
        j.sync().expect("sync");
        drop(j);
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.entries, vec![b"first".to_vec()]);
    }

    /// A journal holding `a` and `b`, snapshotted as `ab` when the power
    /// failed after the snapshot's rename was made durable and before the
    /// journal reset (so the file still holds the covered entries), then
    /// opened again.
    fn reset_interrupted_by_power_loss() -> (Arc<SimDisk>, Journal, Replayed) {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"a").expect("append");
        j.append(b"b").expect("append");
        j.sync().expect("sync");
        disk.power_off_after_syncs(Some(disk.sync_count() + 2));
        assert!(j.snapshot(b"ab").is_err());
        drop(j);
        disk.power_cut(None);
        let (j, replayed) = open(&disk);
        (disk, j, replayed)
    }

    #[test]
    fn a_crash_between_snapshot_rename_and_journal_reset_replays_once() {
        let (disk, mut j, replayed) = reset_interrupted_by_power_loss();
        assert_eq!(replayed.snapshot.as_deref(), Some(&b"ab"[..]));
        assert!(replayed.entries.is_empty(), "{:?}", replayed.entries);
        j.append(b"c").expect("append");
        j.sync().expect("sync");
        drop(j);
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.entries, vec![b"c".to_vec()]);
    }

    #[test]
    fn a_snapshot_after_an_interrupted_reset_keeps_the_recovery_point_true() {
        let (disk, mut j, replayed) = reset_interrupted_by_power_loss();
        assert!(replayed.entries.is_empty(), "{:?}", replayed.entries);
        // A checkpoint taken now records this point; the next snapshot
        // covers the same sequence numbers, so it starts no new generation.
        let point = j.recovery_point();
        j.snapshot(b"ab, pruned").expect("snapshot");
        drop(j);
        disk.power_cut(None);
        let (_, replayed) = open_at(&disk, point, RecoveryMode::TolerateTornTail)
            .expect("the point a checkpoint took still holds");
        assert_eq!(replayed.snapshot.as_deref(), Some(&b"ab, pruned"[..]));
        assert!(replayed.entries.is_empty(), "{:?}", replayed.entries);
    }

    #[test]
    fn a_torn_tail_is_cut_and_reported() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"kept").expect("append");
        j.sync().expect("sync");
        let len = disk
            .read_file(Path::new("/g/group.journal"))
            .expect("read")
            .len() as u64;
        disk.damage(Path::new("/g/group.journal"), len, &[0xA7, 1, 2, 3, 4, 5])
            .ok();
        j.append(b"torn").expect("append");
        drop(j);
        let path = Path::new("/g/group.journal");
        let data = disk.read_file(path).expect("read");
        disk.damage_truncate(path, data.len() as u64 - 3)
            .expect("truncate");
        let (_, replayed) = open(&disk);
        assert_eq!(replayed.entries, vec![b"kept".to_vec()]);
        assert_eq!(replayed.truncated.map(|t| t.at), Some(len));
    }

    #[test]
    fn a_created_journal_exists_only_with_its_first_entries() {
        for syncs in 0..4 {
            let disk = Arc::new(SimDisk::new());
            disk.power_off_after_syncs(Some(syncs));
            let created = Journal::create(
                Arc::clone(&disk) as Arc<dyn Storage>,
                Path::new("/g"),
                "group",
                &[b"config".to_vec(), b"start".to_vec()],
            );
            drop(created);
            disk.power_cut(Some(syncs));
            let path = Path::new("/g/group.journal");
            if disk.exists(path) {
                let (mut j, replayed) = open(&disk);
                assert_eq!(
                    replayed.entries,
                    vec![b"config".to_vec(), b"start".to_vec()],
                    "cut after {syncs} syncs"
                );
                j.append(b"next").expect("append");
                j.sync().expect("sync");
                drop(j);
                let (_, replayed) = open(&disk);
                assert_eq!(replayed.entries.len(), 3);
            } else {
                assert!(syncs < 2, "the journal is durable after its rename");
            }
        }
    }

    #[test]
    fn damage_before_valid_entries_is_refused() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"first"[..], b"second", b"third"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        drop(j);
        disk.damage(Path::new("/g/group.journal"), 34, &[0xFF])
            .expect("flip");
        let err = Journal::open(
            Arc::clone(&disk) as Arc<dyn Storage>,
            Path::new("/g"),
            "group",
        )
        .expect_err("damage must refuse");
        assert!(err.to_string().contains("group.journal"), "{err}");
    }

    /// A new journal `/g/group` on a simulated disk, and the disk.
    #[test]
    fn a_snapshot_whose_reset_fails_leaves_the_journal_read_only_and_whole() {
        use crate::storage::io::{SimFault, SimOp};
        use std::sync::atomic::{AtomicBool, Ordering};
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        j.append(b"a").expect("append");
        j.append(b"b").expect("append");
        j.sync().expect("sync");
        // The sync of the journal's reset after the snapshot fails.
        let armed = Arc::new(AtomicBool::new(true));
        let weak = Arc::downgrade(&disk);
        let fire = Arc::clone(&armed);
        disk.set_hook(Some(Arc::new(move |op, path: &Path| {
            if op == SimOp::SyncData
                && path == Path::new("/g/group.journal")
                && fire.swap(false, Ordering::SeqCst)
                && let Some(d) = weak.upgrade()
            {
                d.set_fault(SimFault::SyncError, true);
            }
        })));
        assert!(j.snapshot(b"ab").is_err(), "the failed sync is reported");
        disk.set_fault(SimFault::SyncError, false);
        disk.set_hook(None);
        assert!(j.is_read_only(), "a failed sync is never retried");
        assert!(j.append(b"c").is_err(), "nothing more is appended");
        let point = j.recovery_point();
        drop(j);
        let (_, replayed) =
            open_at(&disk, point, RecoveryMode::TolerateTornTail).expect("the journal opens");
        assert_eq!(replayed.snapshot.as_deref(), Some(&b"ab"[..]));
    }

    /// Entries this journal's toy payload check takes: those starting "ok".
    const OK_ONLY: Payloads = Payloads {
        entry: |b| {
            if b.starts_with(b"ok") {
                Ok(())
            } else {
                Err("not ok".into())
            }
        },
        snapshot: |_| Ok(()),
        referenced_end: |_, _| 0,
    };

    fn open_checked_at(
        disk: &Arc<SimDisk>,
        point: (u64, u64),
        mode: RecoveryMode,
    ) -> Result<(Journal, Replayed)> {
        open_with(disk, point, mode, Some(OK_ONLY))
    }

    /// Entries whose checksum holds but which do not parse, first in the
    /// file and in a row, with a torn tail after them: refused naming the
    /// first one's bytes, and under skip-damaged set aside while the rest
    /// replays, the tail is cut, and the rewritten journal opens cleanly.
    #[test]
    fn entries_that_do_not_parse_are_damage_and_skip_damaged_sets_them_aside() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"bad-1"[..], b"bad-2", b"ok-3", b"ok-4"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        let point = j.recovery_point();
        j.append(b"ok-5-torn").expect("append");
        j.sync().expect("sync");
        drop(j);
        let path = Path::new("/g/group.journal");
        let len = disk.read_file(path).expect("read").len() as u64;
        disk.damage(path, len - 1, &[0xEE]).expect("tear");
        let first_len = record::HEADER_LEN as u64 + 5;
        match open_checked_at(&disk, point, RecoveryMode::TolerateTornTail) {
            Err(Error::Corruption(c)) => {
                assert_eq!(c.bytes, 0..first_len, "{c}");
                assert!(c.detail.contains("does not parse (not ok)"), "{c}");
            }
            other => panic!("refused as damage, got {other:?}"),
        }
        let (mut j, replayed) =
            open_checked_at(&disk, point, RecoveryMode::SkipDamaged).expect("opens");
        assert_eq!(replayed.entries, [b"ok-3".to_vec(), b"ok-4".to_vec()]);
        assert_eq!(replayed.damage.len(), 2);
        assert!(replayed.truncated.is_some(), "the torn tail is cut");
        assert_eq!(quarantined(&disk, "group.journal.").len(), 2);
        j.append(b"ok-6").expect("append");
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        let (_, replayed) = open_checked_at(&disk, point, RecoveryMode::TolerateTornTail)
            .expect("the rewritten journal opens in the default mode");
        assert_eq!(
            replayed.entries,
            [b"ok-3".to_vec(), b"ok-4".to_vec(), b"ok-6".to_vec()]
        );
    }

    /// An entry that does not parse after entries a snapshot covers (its
    /// reset interrupted): skip-damaged rewrites the journal without the
    /// covered entries, which must not stay counted in the snapshot's
    /// generation.
    #[test]
    fn a_rewrite_after_an_interrupted_reset_keeps_no_covered_entry() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"ok-0"[..], b"ok-1"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        let path = Path::new("/g/group.journal");
        let before = disk.read_file(path).expect("read");
        j.snapshot(b"state").expect("snapshot");
        drop(j);
        // The reset undone, and an entry of the snapshot's generation after.
        let mut bytes = before;
        record::encode(&mut bytes, 2, 0, &NewMessage::from_value(&b"bad-2"[..]));
        let file = disk
            .open(path, OpenMode::CreateOrOpen)
            .expect("open journal");
        file.write_at(0, &bytes).expect("write back");
        file.sync_data().expect("sync");
        let (_, replayed) =
            open_checked_at(&disk, (0, 0), RecoveryMode::SkipDamaged).expect("opens");
        assert!(replayed.entries.is_empty(), "{:?}", replayed.entries);
        assert_eq!(replayed.damage.len(), 1);
        assert_eq!(
            disk.read_file(path).expect("read").len(),
            0,
            "no covered entry is left in the file"
        );
    }

    #[test]
    fn skip_damaged_over_damage_and_a_torn_tail_leaves_a_journal_that_opens() {
        let disk = Arc::new(SimDisk::new());
        let (mut j, _) = open(&disk);
        for e in [&b"first"[..], b"second", b"third"] {
            j.append(e).expect("append");
        }
        j.sync().expect("sync");
        let point = j.recovery_point();
        j.append(b"fourth-entry-torn").expect("append");
        j.sync().expect("sync");
        drop(j);
        let path = Path::new("/g/group.journal");
        let len = disk.read_file(path).expect("read").len() as u64;
        let h = record::HEADER_LEN as u64;
        // Damage in the second entry, below the recovery point; the last
        // entry, past it, torn.
        disk.damage(path, h + 5 + h + 2, &[0xFF]).expect("damage");
        disk.damage(path, len - 1, &[0xEE]).expect("tear");
        let (mut j, replayed) =
            open_at(&disk, point, RecoveryMode::SkipDamaged).expect("opens, skipping the damage");
        assert_eq!(replayed.entries, [b"first".to_vec(), b"third".to_vec()]);
        assert!(
            replayed.truncated.as_ref().is_some_and(|t| t.dropped < len),
            "{:?}",
            replayed.truncated
        );
        j.append(b"fifth").expect("append");
        j.sync().expect("sync");
        let point = j.recovery_point();
        drop(j);
        let (_, replayed) = open_at(&disk, point, RecoveryMode::TolerateTornTail)
            .expect("the repaired journal opens in the default mode");
        assert_eq!(
            replayed.entries,
            [b"first".to_vec(), b"third".to_vec(), b"fifth".to_vec()]
        );
    }
}
