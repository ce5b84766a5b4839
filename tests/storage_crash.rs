//! Why this exists: power cuts, torn writes, flipped bits, lost index files, a
//! full disk and failed syncs are what a durable broker meets in the field.
//! Each test injects one of them and checks the promise a user relies on:
//! acknowledged data survives, damage is named and never served as data, and
//! the log goes on at the right offset.

use bytes::Bytes;
use spool::Error;
use spool::error::Corruption;
use spool::storage::checkpoint::Checkpoint;
use spool::storage::io::{OsStorage, SimDisk, SimFault, SimOp, Storage};
use spool::storage::record::{self, Frame};
use spool::storage::recovery::{QUARANTINE_DIR, Truncation};
use spool::storage::{
    Durability, FsyncPolicy, Header, Log, LogConfig, Message, NewMessage, Offset, RecoveryMode,
};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// xorshift64*: deterministic, seedable, and enough for picking workloads.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A message with a random key, headers and value (at most ~`max_value` bytes
/// of value), sometimes with a producer timestamp.
fn random_message(rng: &mut Rng, max_value: u64) -> NewMessage {
    let key = if rng.one_in(2) {
        let n = rng.below(24) as usize;
        Some(Bytes::from(rng.bytes(n)))
    } else {
        None
    };
    let headers = (0..rng.below(3))
        .map(|i| {
            let n = rng.below(16) as usize;
            Header::new(format!("h{i}"), rng.bytes(n))
        })
        .collect();
    let value_len = if rng.one_in(5) {
        rng.below(max_value)
    } else {
        rng.below(max_value.min(80))
    };
    NewMessage {
        timestamp_ms: rng.one_in(4).then(|| rng.range(1, 1_000_000)),
        key,
        headers,
        value: Bytes::from(rng.bytes(value_len as usize)),
    }
}

/// Asserts that `got` is the stored form of `want` at `offset`.
fn assert_message(got: &Message, want: &NewMessage, offset: u64) {
    assert_eq!(got.offset, Offset(offset), "offsets are dense");
    assert_eq!(got.key, want.key, "key of offset {offset}");
    assert_eq!(got.headers, want.headers, "headers of offset {offset}");
    assert_eq!(got.value, want.value, "value of offset {offset}");
    if let Some(ts) = want.timestamp_ms {
        assert_eq!(got.timestamp_ms, ts, "timestamp of offset {offset}");
    }
}

/// Every stored message, in order.
fn read_all(log: &Log) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    loop {
        let from = out.last().map_or(Offset(0), |m| m.offset.next());
        let batch = log.read(from, 500, 1 << 20).expect("reading the whole log");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// Checks that `log` holds exactly `acked`, in order from offset 0.
fn assert_log_holds(log: &Log, acked: &[NewMessage], ctx: &str) {
    let got = read_all(log);
    assert_eq!(got.len(), acked.len(), "{ctx}");
    for (i, m) in got.iter().enumerate() {
        assert_message(m, &acked[i], i as u64);
    }
}

fn corruption(err: Error) -> Corruption {
    match err {
        Error::Corruption(c) => *c,
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// One valid record found by walking a segment file.
#[derive(Debug, Clone, Copy)]
struct Rec {
    pos: u64,
    len: u64,
    offset: u64,
}

impl Rec {
    fn end(&self) -> u64 {
        self.pos + self.len
    }
}

/// The records of a segment file up to its end or its zero tail.
fn records(bytes: &[u8]) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        match record::decode(&bytes[pos..], u32::MAX) {
            Ok(Frame::Record(r)) => {
                out.push(Rec {
                    pos: pos as u64,
                    len: u64::from(r.len),
                    offset: r.offset,
                });
                pos += r.len as usize;
            }
            Ok(Frame::End) => break,
            Err(e) => panic!("test setup: undamaged segment does not decode at {pos}: {e}"),
        }
    }
    out
}

/// Where the log's files live and how a test damages them: the real disk
/// (std file calls) or the simulated one (`damage`, which hits both images).
struct Bed {
    storage: Arc<dyn Storage>,
    sim: Option<Arc<SimDisk>>,
    _tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Os,
    Sim,
}

const BACKENDS: [Backend; 2] = [Backend::Os, Backend::Sim];

impl Bed {
    fn new(backend: Backend) -> Bed {
        match backend {
            Backend::Os => {
                let tmp = tempfile::tempdir().expect("tempdir");
                let dir = tmp.path().join("topics").join("t");
                Bed {
                    storage: Arc::new(OsStorage),
                    sim: None,
                    _tmp: Some(tmp),
                    dir,
                }
            }
            Backend::Sim => {
                let disk = Arc::new(SimDisk::new());
                Bed {
                    storage: Arc::clone(&disk) as Arc<dyn Storage>,
                    sim: Some(disk),
                    _tmp: None,
                    dir: PathBuf::from("/data/topics/t"),
                }
            }
        }
    }

    fn open(&self, config: &LogConfig, mode: RecoveryMode) -> spool::Result<Log> {
        Log::open(
            Arc::clone(&self.storage),
            self.dir.clone(),
            config.clone(),
            mode,
        )
    }

    fn read_file(&self, path: &Path) -> Vec<u8> {
        match &self.sim {
            Some(disk) => disk.read_file(path).expect("reading a simulated file"),
            None => std::fs::read(path).expect("reading a file"),
        }
    }

    /// Replaces the whole content of `path` (made if missing) with `data`.
    fn replace(&self, path: &Path, data: &[u8]) {
        spool::storage::io::write_file_atomic(&*self.storage, path, data)
            .expect("replacing a file");
    }

    fn overwrite(&self, path: &Path, pos: u64, data: &[u8]) {
        match &self.sim {
            Some(disk) => disk
                .damage(path, pos, data)
                .expect("damaging a simulated file"),
            None => OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.write_all_at(data, pos))
                .expect("damaging a file"),
        }
    }

    fn flip_bit(&self, path: &Path, pos: u64, bit: u32) {
        let byte = self.read_file(path)[pos as usize] ^ (1 << (bit % 8));
        self.overwrite(path, pos, &[byte]);
    }

    fn truncate(&self, path: &Path, len: u64) {
        match &self.sim {
            Some(disk) => disk
                .damage_truncate(path, len)
                .expect("truncating a simulated file"),
            None => OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(len))
                .expect("truncating a file"),
        }
    }

    fn remove(&self, path: &Path) {
        self.storage.remove_file(path).expect("removing a file");
    }

    /// The `.log` files, oldest first.
    fn segment_logs(&self) -> Vec<PathBuf> {
        let mut names: Vec<String> = self
            .storage
            .list_dir(&self.dir)
            .expect("listing the log")
            .into_iter()
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        names.into_iter().map(|n| self.dir.join(n)).collect()
    }
}

/// Fills a fresh log with `n` deterministic messages (timestamps 1000, 1010,
/// ...) in small batches, closes it, and returns them.
fn fill(bed: &Bed, config: &LogConfig, n: usize, seed: u64) -> Vec<NewMessage> {
    let mut rng = Rng::new(seed);
    let messages: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage {
            timestamp_ms: Some(1000 + 10 * i as u64),
            ..random_message(&mut rng, 200)
        })
        .collect();
    let log = bed
        .open(config, RecoveryMode::default())
        .expect("opening a fresh log");
    let mut i = 0;
    while i < n {
        let end = (i + 1 + rng.below(4) as usize).min(n);
        log.append(&messages[i..end]).expect("append");
        i = end;
    }
    log.close().expect("close");
    messages
}

fn with_idx(path: &Path) -> PathBuf {
    path.with_extension("idx")
}

fn with_tix(path: &Path) -> PathBuf {
    path.with_extension("tix")
}

/// Position of the last entry of a segment's `.idx` (as last written).
fn last_index_position(bed: &Bed, log_path: &Path) -> u64 {
    let idx = bed.read_file(&with_idx(log_path));
    assert!(idx.len() >= 8, "test setup: the segment has an index");
    let e = &idx[idx.len() - 8..];
    u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
}

/// Opens the log in `dir` on the simulated disk with the default recovery.
fn open_sim(disk: &Arc<SimDisk>, dir: &str, config: &LogConfig) -> Log {
    Log::open(
        Arc::clone(disk) as Arc<dyn Storage>,
        dir,
        config.clone(),
        RecoveryMode::default(),
    )
    .expect("open")
}

/// Appends one message and checks it gets `offset` and reads back.
fn assert_appends_at(log: &Log, offset: u64) {
    let msg = NewMessage::from_value("after recovery").with_key("k");
    let a = log
        .append(std::slice::from_ref(&msg))
        .expect("append after recovery");
    assert_eq!(a.first, Offset(offset), "appending continues at the end");
    let back = log.read(Offset(offset), 1, 1 << 20).expect("read back");
    assert_message(&back[0], &msg, offset);
}

// ---------------------------------------------------------------------------
// a. Power cuts at random sync boundaries
// ---------------------------------------------------------------------------

const POWER_CUT_DIR: &str = "/data/topics/cut";

/// What a series of power-cut runs went through, so a test can show it
/// exercised the interesting cases and not only clean stops.
#[derive(Debug, Default)]
struct CutStats {
    cuts: usize,
    /// Recoveries that cut a torn or zero tail.
    truncations: usize,
    /// Recoveries that came back with fewer records than were written.
    losses: usize,
}

/// One seeded run: epochs of workload, each ended by a power cut (right after
/// a random sync, or at a random point between a write and its sync, with or
/// without a torn page), then a recovery that may itself lose power.
fn power_cut_run(seed: u64, fsync: FsyncPolicy, epochs: usize, stats: &mut CutStats) {
    let mut rng = Rng::new(seed);
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        segment_bytes: rng.range(1024, 8193),
        index_interval_bytes: rng.range(64, 1025) as u32,
        fsync,
        ..LogConfig::default()
    };
    let ctx = format!("seed {seed}, {config:?}");
    let open = || {
        Log::open(
            Arc::clone(&disk) as Arc<dyn Storage>,
            POWER_CUT_DIR,
            config.clone(),
            RecoveryMode::default(),
        )
    };
    // Messages the log accepted (`write` or `append` returned their offsets).
    let mut accepted: Vec<NewMessage> = Vec::new();
    // The batch whose write failed when the power went: it may be partly stored.
    let mut failed: Vec<NewMessage> = Vec::new();
    // Every offset below this was acknowledged `Durable` or synced.
    let mut durable = 0usize;
    // Offsets readers could see when the power went.
    let mut visible = 0usize;
    for epoch in 0..=epochs {
        // Recover, sometimes losing power during recovery itself.
        let log = loop {
            if rng.one_in(4) {
                disk.power_off_after_syncs(Some(disk.sync_count() + rng.below(4)));
            }
            match open() {
                Ok(log) if !disk.is_powered_off() => break log,
                Ok(log) => drop(log),
                Err(e) => assert!(
                    disk.is_powered_off(),
                    "{ctx}: recovery failed with the power on: {e}"
                ),
            }
            disk.power_cut(rng.one_in(2).then(|| rng.next()));
            stats.cuts += 1;
        };
        disk.power_off_after_syncs(None);
        if !log.recovery_report().truncations.is_empty() {
            stats.truncations += 1;
        }

        let got = read_all(&log);
        let written: Vec<NewMessage> = accepted.iter().chain(&failed).cloned().collect();
        assert!(
            got.len() >= durable,
            "{ctx}, epoch {epoch}: lost durable data: {} of {durable} durable records left",
            got.len()
        );
        if fsync == FsyncPolicy::Always {
            assert!(
                got.len() >= visible,
                "{ctx}, epoch {epoch}: readers saw {visible} records, only {} survived",
                got.len()
            );
        }
        assert!(
            got.len() <= written.len(),
            "{ctx}, epoch {epoch}: {} records recovered, {} ever written",
            got.len(),
            written.len()
        );
        for (i, m) in got.iter().enumerate() {
            assert_message(m, &written[i], i as u64);
        }
        assert_eq!(
            log.end(),
            Offset(got.len() as u64),
            "{ctx}: end after recovery"
        );
        if got.len() < written.len() {
            stats.losses += 1;
        }
        accepted = written[..got.len()].to_vec();
        failed.clear();
        durable = accepted.len();

        if epoch == epochs {
            assert_appends_at(&log, accepted.len() as u64);
            return;
        }

        // Work until the power goes or the workload ends; either way the cut
        // comes next, possibly with writes not yet committed.
        disk.power_off_after_syncs(Some(disk.sync_count() + rng.below(40)));
        for _ in 0..rng.range(1, 60) {
            if rng.one_in(15) {
                // The plug is pulled now, between two syncs.
                disk.power_off_after_syncs(Some(disk.sync_count()));
            }
            let op = rng.below(10);
            if op == 0 {
                match log.sync() {
                    Ok(()) => durable = accepted.len(),
                    Err(_) => break,
                }
                continue;
            }
            if op == 1 {
                match log.commit() {
                    Ok(Durability::Durable) => durable = accepted.len(),
                    Ok(Durability::Written) => {}
                    Err(_) => break,
                }
                continue;
            }
            let batch: Vec<NewMessage> = (0..rng.range(1, 10))
                .map(|_| random_message(&mut rng, 400))
                .collect();
            let result = if op <= 4 {
                // Group commit: a write now, its commit in a later op.
                log.write(&batch).map(|offsets| (offsets, None))
            } else {
                log.append(&batch)
                    .map(|a| ((a.first, a.last), Some(a.durability)))
            };
            match result {
                Ok(((first, last), durability)) => {
                    assert_eq!(first, Offset(accepted.len() as u64), "{ctx}: dense offsets");
                    accepted.extend(batch);
                    assert_eq!(last, Offset(accepted.len() as u64 - 1));
                    match durability {
                        Some(Durability::Durable) => durable = accepted.len(),
                        Some(Durability::Written) => assert_ne!(
                            fsync,
                            FsyncPolicy::Always,
                            "{ctx}: fsync=always acks durable"
                        ),
                        None => {}
                    }
                }
                Err(e) => {
                    assert!(
                        disk.is_powered_off(),
                        "{ctx}: a write failed with the power on: {e}"
                    );
                    failed = batch;
                    break;
                }
            }
        }
        visible = log.end().0 as usize;
        drop(log);
        disk.power_cut(rng.one_in(2).then(|| rng.next()));
        stats.cuts += 1;
    }
}

/// Runs `seeds` and checks the runs met torn tails and lost unsynced data.
fn power_cut_runs(seeds: std::ops::Range<u64>, fsync: FsyncPolicy) {
    let mut stats = CutStats::default();
    let runs = seeds.end - seeds.start;
    for seed in seeds {
        power_cut_run(seed, fsync, 4, &mut stats);
    }
    assert!(stats.cuts as u64 >= 4 * runs, "{stats:?}");
    assert!(
        stats.truncations > 0 && stats.losses > 0,
        "the workload must reach crashes with unsynced data: {stats:?}"
    );
}

/// Why: under fsync=always an acknowledged append must survive losing power
/// at any moment, and no reader may have seen a record the cut takes back.
#[test]
fn power_cuts_under_fsync_always_keep_every_durable_ack() {
    power_cut_runs(0..300, FsyncPolicy::Always);
}

/// Why: fsync=interval acks `Written` and may lose those on a power cut, but
/// never a `Durable` ack, and never leaves a hole or a foreign record.
#[test]
fn power_cuts_under_fsync_interval_keep_a_prefix_with_every_durable_ack() {
    power_cut_runs(1000..1200, FsyncPolicy::Interval(1));
}

/// Why: under fsync=never only explicit syncs, seals and closes promise
/// anything; what comes back must still be an exact prefix of what was written.
#[test]
fn power_cuts_under_fsync_never_keep_a_prefix_with_every_synced_record() {
    power_cut_runs(2000..2200, FsyncPolicy::Never);
}

// ---------------------------------------------------------------------------
// b. Torn tails
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Tear {
    /// The file ends at this byte.
    Truncate(u64),
    /// Everything from this byte on is zero (the write never reached the disk).
    Zeros(u64),
    /// Everything from this byte on is garbage.
    Garbage(u64),
}

fn tail_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// Writes a log, tears its active segment inside record `k` (counted from the
/// end), reopens it with the default mode and checks what a user relies on.
fn torn_tail_case(backend: Backend, from_end: usize, tear: impl Fn(Rec) -> Tear, seed: u64) {
    let bed = Bed::new(backend);
    let config = tail_config();
    let messages = fill(&bed, &config, 80, 7);
    let logs = bed.segment_logs();
    assert!(logs.len() >= 3, "test setup: several segments");
    let active = logs.last().expect("an active segment").clone();
    let recs = records(&bed.read_file(&active));
    assert!(
        recs.len() > from_end,
        "test setup: enough records in the active segment"
    );
    let victim = recs[recs.len() - 1 - from_end];
    // The tear stands for an unclean stop that interrupted writes from the
    // victim on: only bytes before it were synced.
    let mut checkpoint = Checkpoint::load(&*bed.storage, &bed.dir)
        .expect("load checkpoint")
        .expect("a checkpoint");
    checkpoint.clean = false;
    checkpoint.active_synced = victim.pos;
    checkpoint.durable_end = victim.offset;
    checkpoint
        .store(&*bed.storage, &bed.dir)
        .expect("store checkpoint");
    let tear = tear(victim);
    let file_len = bed.read_file(&active).len() as u64;
    let len_before = match tear {
        Tear::Truncate(at) => {
            bed.truncate(&active, at);
            at
        }
        Tear::Zeros(at) => {
            bed.overwrite(&active, at, &vec![0u8; (file_len - at) as usize]);
            file_len
        }
        Tear::Garbage(at) => {
            let garbage = Rng::new(seed).bytes((file_len - at) as usize);
            bed.overwrite(&active, at, &garbage);
            file_len
        }
    };
    let ctx = format!("{backend:?}, {tear:?} inside {victim:?}");

    let log = bed
        .open(&config, RecoveryMode::default())
        .unwrap_or_else(|e| panic!("{ctx}: a torn tail must not stop the log: {e}"));
    assert_eq!(
        log.recovery_report().truncations,
        vec![Truncation {
            file: active.clone(),
            at: victim.pos,
            dropped: len_before - victim.pos,
        }],
        "{ctx}: the cut is reported with file and byte position"
    );
    let got = read_all(&log);
    assert_eq!(
        got.len() as u64,
        victim.offset,
        "{ctx}: records before the tear stay"
    );
    for (i, m) in got.iter().enumerate() {
        assert_message(m, &messages[i], i as u64);
    }
    assert_eq!(log.end(), Offset(victim.offset));
    assert_appends_at(&log, victim.offset);
    log.close().expect("close");
    let again = bed.open(&config, RecoveryMode::default()).expect("reopen");
    assert!(
        again.recovery_report().is_clean(),
        "{ctx}: a repaired log reopens clean: {:?}",
        again.recovery_report()
    );
    assert_eq!(again.end(), Offset(victim.offset + 1));
}

/// Why: a crash mid-write leaves a partial record at the end of the active
/// segment; opening must cut it, say where, and lose nothing before it.
#[test]
fn torn_tails_are_cut_at_the_last_whole_record_on_both_disks() {
    for backend in BACKENDS {
        // Positions inside each of the last three records, from the first byte
        // after its start to its last byte.
        let stride = match backend {
            Backend::Os => 23,
            Backend::Sim => 3,
        };
        let mut cases = 0;
        for from_end in 0..3 {
            let bed = Bed::new(backend);
            fill(&bed, &tail_config(), 80, 7);
            let active = bed.segment_logs().last().expect("active").clone();
            let recs = records(&bed.read_file(&active));
            let victim = recs[recs.len() - 1 - from_end];
            for delta in (1..victim.len).step_by(stride) {
                let at = victim.pos + delta;
                torn_tail_case(backend, from_end, |_| Tear::Truncate(at), at);
                torn_tail_case(backend, from_end, |_| Tear::Zeros(at), at);
                cases += 2;
            }
            // Garbage from the record's first byte, or from inside it.
            for delta in [0, 1, 7, 31, 32, victim.len / 2, victim.len - 1] {
                let at = victim.pos + delta;
                torn_tail_case(backend, from_end, |_| Tear::Garbage(at), at ^ 0x5EED);
                cases += 1;
            }
        }
        assert!(cases > 30, "{backend:?}: only {cases} torn tails");
    }
}

// ---------------------------------------------------------------------------
// c. Damage that recovery finds: refused by default, quarantined on request
// ---------------------------------------------------------------------------

fn damage_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 1024,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// Flips a bit inside `victim` of `path` (a record followed by valid records),
/// then checks both recovery modes.
fn damage_case(bed: &Bed, messages: &[NewMessage], path: &Path, victim: Rec, next: Rec, bit: u64) {
    let config = damage_config();
    let ctx = format!("{} {victim:?}", path.display());
    let flip_at = victim.pos + bit / 8 % victim.len;
    bed.flip_bit(path, flip_at, bit as u32);
    let damaged_bytes = bed.read_file(path)[victim.pos as usize..next.pos as usize].to_vec();

    // Default: refuse, naming file, byte range, offsets and the way out.
    let err = bed
        .open(&config, RecoveryMode::default())
        .expect_err("damage with valid records after it must stop the default mode");
    let text = err.to_string();
    let c = corruption(err);
    assert_eq!(c.file, path, "{ctx}: names the file");
    assert_eq!(c.bytes, victim.pos..next.pos, "{ctx}: names the byte range");
    assert_eq!(
        c.offsets,
        Some(victim.offset..next.offset),
        "{ctx}: names the offsets"
    );
    for part in [
        path.display().to_string(),
        format!("bytes {}..{}", victim.pos, next.pos),
        format!("offsets {}..{}", victim.offset, next.offset),
        "skip-damaged".to_owned(),
    ] {
        assert!(
            text.contains(&part),
            "{ctx}: message lacks {part:?}: {text}"
        );
    }

    // Skip-damaged: open, report, keep a copy, serve everything else.
    let log = bed
        .open(&config, RecoveryMode::SkipDamaged)
        .unwrap_or_else(|e| panic!("{ctx}: skip-damaged must open: {e}"));
    let report = log.recovery_report().clone();
    assert_eq!(report.quarantined.len(), 1, "{ctx}: {report:?}");
    assert_eq!(
        report.quarantined[0], c,
        "{ctx}: reports what the default refused"
    );
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    let copy = bed
        .dir
        .join(QUARANTINE_DIR)
        .join(format!("{name}.{}-{}", victim.pos, next.pos));
    assert_eq!(
        bed.read_file(&copy),
        damaged_bytes,
        "{ctx}: the quarantine copy holds the damaged bytes"
    );
    // Every undamaged record reads back, nothing else; `extra` records were
    // appended after the repair.
    let check = |log: &Log, extra: u64| {
        let got = read_all(log);
        let total = messages.len() as u64 + extra;
        let want: Vec<u64> = (0..total)
            .filter(|o| !(victim.offset..next.offset).contains(o))
            .collect();
        let offsets: Vec<u64> = got.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, want, "{ctx}: every undamaged record, nothing else");
        for m in got
            .iter()
            .filter(|m| (m.offset.0 as usize) < messages.len())
        {
            assert_message(m, &messages[m.offset.0 as usize], m.offset.0);
        }
        // Reading from the lost offset starts at the next record.
        let from_lost = log.read(Offset(victim.offset), 1, 1 << 20).expect("read");
        assert_eq!(from_lost[0].offset, Offset(next.offset), "{ctx}");
    };
    check(&log, 0);
    assert_appends_at(&log, messages.len() as u64);
    log.close().expect("close");

    // The quarantined log is consistent again: the default mode opens it.
    let log = bed
        .open(&config, RecoveryMode::default())
        .unwrap_or_else(|e| panic!("{ctx}: a quarantined log reopens: {e}"));
    assert!(log.recovery_report().quarantined.is_empty());
    check(&log, 1);
}

/// Why: damage followed by valid records is not a torn write; the default mode
/// must refuse with everything an operator needs, skip-damaged must set it aside.
#[test]
fn a_bit_flip_in_the_scanned_tail_of_a_sealed_segment_is_refused_or_quarantined() {
    for backend in BACKENDS {
        for seed in 0..6u64 {
            let bed = Bed::new(backend);
            let messages = fill(&bed, &damage_config(), 120, seed);
            let logs = bed.segment_logs();
            assert!(logs.len() >= 3, "test setup: several segments");
            let sealed = &logs[1];
            let recs = records(&bed.read_file(sealed));
            // Recovery scans a sealed segment from its last index entry on;
            // pick a record there that has another one after it.
            let scanned_from = last_index_position(&bed, sealed);
            let candidates: Vec<usize> = (0..recs.len() - 1)
                .filter(|&i| recs[i].pos >= scanned_from)
                .collect();
            assert!(
                !candidates.is_empty(),
                "test setup: records after the last index entry"
            );
            let mut rng = Rng::new(seed);
            let i = candidates[rng.below(candidates.len() as u64) as usize];
            damage_case(&bed, &messages, sealed, recs[i], recs[i + 1], rng.next());
        }
    }
}

/// Why: the default mode trusts a sealed segment up to its last index entry
/// (older damage is left to reads and `verify`), so such damage opens and then
/// fails the reads that reach it; skip-damaged, the operator's answer, must find it.
#[test]
fn a_bit_flip_anywhere_in_a_sealed_segment_is_quarantined_by_skip_damaged() {
    for backend in BACKENDS {
        for seed in 0..4u64 {
            let bed = Bed::new(backend);
            let config = damage_config();
            let messages = fill(&bed, &config, 120, seed);
            let logs = bed.segment_logs();
            let sealed = &logs[0];
            let recs = records(&bed.read_file(sealed));
            let scanned_from = last_index_position(&bed, sealed);
            let before: Vec<usize> = (1..recs.len() - 1)
                .filter(|&i| recs[i + 1].pos <= scanned_from)
                .collect();
            assert!(
                !before.is_empty(),
                "test setup: records before the last index entry"
            );
            let mut rng = Rng::new(seed);
            let victim = recs[before[rng.below(before.len() as u64) as usize]];
            let next = recs[recs
                .iter()
                .position(|r| r.pos == victim.pos)
                .expect("victim")
                + 1];
            bed.flip_bit(
                sealed,
                victim.pos + rng.below(victim.len),
                rng.next() as u32,
            );

            let log = bed
                .open(&config, RecoveryMode::default())
                .expect("the default mode does not scan below the last index entry");
            let err = log
                .read(Offset(0), 1000, 1 << 20)
                .expect_err("a read through the damage fails");
            let c = corruption(err);
            assert_eq!(c.file, *sealed);
            assert_eq!(
                c.bytes.start, victim.pos,
                "the read names where the damage starts"
            );
            drop(log);

            let log = bed
                .open(&config, RecoveryMode::SkipDamaged)
                .expect("skip-damaged opens");
            let q = &log.recovery_report().quarantined;
            assert_eq!(q.len(), 1, "{backend:?} seed {seed}: {q:?}");
            assert_eq!((&q[0].file, &q[0].bytes), (sealed, &(victim.pos..next.pos)));
            assert_eq!(q[0].offsets, Some(victim.offset..next.offset));
            let got = read_all(&log);
            assert_eq!(
                got.len(),
                messages.len() - 1,
                "only the damaged record is lost"
            );
            for m in &got {
                assert_ne!(m.offset.0, victim.offset);
                assert_message(m, &messages[m.offset.0 as usize], m.offset.0);
            }
        }
    }
}

/// Why: in the active segment, valid records after bad bytes mean damage, not
/// a torn tail, and cutting there would silently drop acknowledged records.
#[test]
fn a_bit_flip_in_the_middle_of_the_active_segment_is_refused_or_quarantined() {
    // Recovery scans the active segment from its last index entry, so the
    // damage goes there; the log length varies until that stretch holds two
    // records.
    for backend in BACKENDS {
        for seed in 10..16u64 {
            let (bed, messages, active, recs, candidates) = (100..140)
                .find_map(|n| {
                    let bed = Bed::new(backend);
                    let messages = fill(&bed, &damage_config(), n, seed);
                    let active = bed.segment_logs().last().expect("active").clone();
                    let recs = records(&bed.read_file(&active));
                    let scanned_from = last_index_position(&bed, &active);
                    let candidates: Vec<usize> = (0..recs.len() - 1)
                        .filter(|&i| recs[i].pos >= scanned_from)
                        .collect();
                    (!candidates.is_empty()).then_some((bed, messages, active, recs, candidates))
                })
                .expect(
                    "test setup: some log length leaves two records after the last index entry",
                );
            let mut rng = Rng::new(seed);
            let i = candidates[rng.below(candidates.len() as u64) as usize];
            damage_case(&bed, &messages, &active, recs[i], recs[i + 1], rng.next());
        }
    }
}

/// Why: under `fsync=never` or `interval` a power cut can keep later pages of
/// the active segment, and its index hints, while an earlier page is lost.
/// The index then names records past the hole; recovery that trusted it
/// would scan only after the hole and open the log with it inside, failing
/// every read that reaches it. Nothing past the last synced byte is trusted.
/// A flipped bit there is damage, not a page the disk lost (see
/// `lost_sectors_past_the_recovery_point_are_set_aside_under_a_relaxed_policy`
/// in tests/storage_log.rs), so the default mode refuses it.
#[test]
fn damage_in_the_unsynced_tail_behind_the_last_index_entry_is_found_at_open() {
    let config = damage_config();
    for seed in 20..26u64 {
        let (bed, messages, active, recs, candidates) = (20..60)
            .find_map(|n| {
                let bed = Bed::new(Backend::Os);
                let mut messages = fill(&bed, &config, n, seed);
                // Reopened (synced to here), then appended to without a sync
                // and left as a crash leaves it.
                let log = bed.open(&config, RecoveryMode::default()).expect("reopen");
                let mut rng = Rng::new(seed);
                let more: Vec<NewMessage> = (0..12)
                    .map(|i| NewMessage {
                        timestamp_ms: Some(1000 + 10 * (n + i) as u64),
                        ..random_message(&mut rng, 200)
                    })
                    .collect();
                for batch in more.chunks(2) {
                    log.append(batch).expect("append");
                }
                std::mem::forget(log);
                messages.extend(more);
                let active = bed.segment_logs().last().expect("active").clone();
                let recs = records(&bed.read_file(&active));
                let indexed_to = last_index_position(&bed, &active);
                let candidates: Vec<usize> = (0..recs.len() - 1)
                    .filter(|&i| recs[i].offset >= n as u64 && recs[i + 1].pos <= indexed_to)
                    .collect();
                (!candidates.is_empty()).then_some((bed, messages, active, recs, candidates))
            })
            .expect("test setup: unsynced records before the active segment's last index entry");
        let mut rng = Rng::new(seed);
        let i = candidates[rng.below(candidates.len() as u64) as usize];
        damage_case(&bed, &messages, &active, recs[i], recs[i + 1], rng.next());
    }
}

/// Why: a sealed segment's last record is followed by the next segment, not by
/// a torn write, so losing it is damage, and the error must say which offsets.
#[test]
fn damage_at_the_end_of_a_sealed_segment_names_the_lost_offsets() {
    let bed = Bed::new(Backend::Sim);
    let config = damage_config();
    let messages = fill(&bed, &config, 120, 3);
    let logs = bed.segment_logs();
    let sealed = &logs[1];
    let recs = records(&bed.read_file(sealed));
    let last = *recs.last().expect("records");
    bed.flip_bit(sealed, last.pos + last.len / 2, 3);
    let c = corruption(
        bed.open(&config, RecoveryMode::default())
            .expect_err("refused"),
    );
    assert_eq!((&c.file, c.bytes.clone()), (sealed, last.pos..last.end()));
    assert_eq!(c.offsets, Some(last.offset..last.offset + 1));

    let log = bed
        .open(&config, RecoveryMode::SkipDamaged)
        .expect("skip-damaged opens");
    let got = read_all(&log);
    assert_eq!(got.len(), messages.len() - 1);
    assert!(got.iter().all(|m| m.offset.0 != last.offset));
    assert_appends_at(&log, messages.len() as u64);
}

// ---------------------------------------------------------------------------
// d. Reads check every CRC
// ---------------------------------------------------------------------------

/// Why: damage that appears while the broker runs is only caught by the CRC
/// check on read; a consumer must get an error naming the file, never bad bytes.
#[test]
fn reads_return_corruption_not_wrong_data_when_a_segment_is_damaged_while_open() {
    for backend in BACKENDS {
        for (which, seed) in [
            ("sealed", 1u64),
            ("sealed", 2),
            ("active", 3),
            ("active", 4),
        ] {
            let bed = Bed::new(backend);
            let config = damage_config();
            let mut rng = Rng::new(seed);
            let messages: Vec<NewMessage> =
                (0..120).map(|_| random_message(&mut rng, 200)).collect();
            let log = bed.open(&config, RecoveryMode::default()).expect("open");
            for chunk in messages.chunks(3) {
                log.append(chunk).expect("append");
            }
            let logs = bed.segment_logs();
            let path = if which == "sealed" {
                logs[1].clone()
            } else {
                logs.last().expect("active").clone()
            };
            let recs = records(&bed.read_file(&path));
            assert!(recs.len() >= 3, "test setup");
            let k = 1 + rng.below(recs.len() as u64 - 2) as usize;
            let victim = recs[k];
            bed.flip_bit(&path, victim.pos + rng.below(victim.len), rng.next() as u32);
            let ctx = format!("{backend:?} {which} {victim:?}");

            for (from, n) in [
                (victim.offset, 1),
                (recs[0].offset, 1000),
                (recs[k - 1].offset, 2),
            ] {
                let err = log
                    .read(Offset(from), n, 1 << 20)
                    .expect_err("a damaged record is never returned");
                let c = corruption(err);
                assert_eq!(c.file, path, "{ctx}: names the file");
                assert!(c.bytes.contains(&victim.pos), "{ctx}: {c}");
                assert!(c.to_string().contains(&path.display().to_string()));
            }
            // Records before and after the damage still read.
            let before = log
                .read(Offset(recs[0].offset), k, 1 << 20)
                .expect("records before the damage");
            assert_eq!(before.len(), k, "{ctx}");
            for m in &before {
                assert_message(m, &messages[m.offset.0 as usize], m.offset.0);
            }
            if which == "sealed" {
                let next_base = logs[2]
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok())
                    .expect("segment name");
                let after = log
                    .read(Offset(next_base), 1, 1 << 20)
                    .expect("records of the next segment");
                assert_eq!(after[0].offset, Offset(next_base));
                assert_message(&after[0], &messages[next_base as usize], next_base);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// e. Lost or damaged index files are rebuilt
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum IndexDamage {
    DeleteIdx,
    DeleteTix,
    DeleteBoth,
    TruncateIdxMidEntry,
    TruncateIdxToEntries,
    TruncateTixToEntries,
    GarbageIdx,
    GarbageTix,
    /// Bit rot in a middle `.idx` entry: well formed, and the last entry still
    /// checks out, so open keeps it; reads must not trust it.
    FlipIdxPosition,
    /// Bit rot lowering a middle `.tix` entry's maximum: still ascending, so
    /// well formed, but a lookup trusting it would start past records with
    /// the timestamps it is after; the entry's checksum gives it away.
    FlipTixTimestamp,
    /// A whole entry of junk after the last one: the entries before it
    /// hold, and the file must not keep the junk.
    JunkAfterTix,
    /// Another segment's `.tix` in its place: every entry's checksum holds
    /// for that segment, none for this one.
    ForeignTix,
}

/// Why: `.idx`/`.tix` are unsynced hints (only `.tix` entries carry a
/// checksum); losing or damaging
/// them must cost a rebuild, never a failed open, a wrong read or a wrong
/// time lookup (which retention by age also depends on).
#[test]
fn lost_or_damaged_index_files_are_rebuilt_and_lookups_still_work() {
    use IndexDamage::*;
    let config = LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    for backend in BACKENDS {
        for damage in [
            DeleteIdx,
            DeleteTix,
            DeleteBoth,
            TruncateIdxMidEntry,
            TruncateIdxToEntries,
            TruncateTixToEntries,
            GarbageIdx,
            GarbageTix,
            FlipIdxPosition,
            FlipTixTimestamp,
            JunkAfterTix,
            ForeignTix,
        ] {
            let ctx = format!("{backend:?} {damage:?}");
            let bed = Bed::new(backend);
            let messages = fill(&bed, &config, 150, 5);
            let logs = bed.segment_logs();
            assert!(logs.len() >= 3, "test setup");
            let sealed = &logs[1];
            let (idx, tix) = (with_idx(sealed), with_tix(sealed));
            let (idx_bytes, tix_bytes) = (bed.read_file(&idx), bed.read_file(&tix));
            assert!(
                idx_bytes.len() >= 24 && tix_bytes.len() >= 24,
                "test setup: {ctx}"
            );
            let recs = records(&bed.read_file(sealed));
            let max_ts = recs
                .iter()
                .map(|r| messages[r.offset as usize].timestamp_ms.expect("explicit"))
                .max()
                .expect("records");
            match damage {
                DeleteIdx => bed.remove(&idx),
                DeleteTix => bed.remove(&tix),
                DeleteBoth => {
                    bed.remove(&idx);
                    bed.remove(&tix);
                }
                TruncateIdxMidEntry => bed.truncate(&idx, idx_bytes.len() as u64 - 3),
                TruncateIdxToEntries => bed.truncate(&idx, 8),
                TruncateTixToEntries => bed.truncate(&tix, 16),
                GarbageIdx => bed.overwrite(&idx, 0, &Rng::new(9).bytes(idx_bytes.len())),
                GarbageTix => bed.overwrite(&tix, 0, &Rng::new(9).bytes(tix_bytes.len())),
                // Entry 1's position, low byte: off by one, still ascending.
                FlipIdxPosition => bed.flip_bit(&idx, 12, 0),
                // Entry 1's maximum, its lowest set bit: one lower than
                // written (entry 0's maximum is at least 2 below it).
                FlipTixTimestamp => {
                    let low = u64::from_le_bytes(tix_bytes[16..24].try_into().expect("8 bytes"));
                    let prev = u64::from_le_bytes(tix_bytes[0..8].try_into().expect("8 bytes"));
                    let bit = low.trailing_zeros();
                    assert!(
                        low - (1 << bit) > prev,
                        "test setup: the flip keeps the entries ascending: {ctx}"
                    );
                    bed.flip_bit(&tix, 16 + (bit / 8) as u64, bit % 8)
                }
                JunkAfterTix => bed.replace(&tix, &[&tix_bytes[..], &[0x5a; 16]].concat()),
                ForeignTix => bed.replace(&tix, &bed.read_file(&with_tix(&logs[0]))),
            }

            let log = bed
                .open(&config, RecoveryMode::default())
                .unwrap_or_else(|e| panic!("{ctx}: a lost index never stops the log: {e}"));
            if damage != FlipIdxPosition {
                assert!(
                    log.recovery_report().rebuilt_indexes.contains(&idx),
                    "{ctx}: the rebuild is reported: {:?}",
                    log.recovery_report()
                );
                assert_eq!(
                    bed.read_file(&idx),
                    idx_bytes,
                    "{ctx}: .idx rebuilt as written"
                );
                assert_eq!(
                    bed.read_file(&tix),
                    tix_bytes,
                    "{ctx}: .tix rebuilt as written"
                );
            }
            let segment = log
                .segments()
                .iter()
                .find(|s| s.paths().log == *sealed)
                .cloned()
                .expect("the segment");
            assert_eq!(
                segment.max_timestamp_ms(),
                max_ts,
                "{ctx}: newest timestamp"
            );
            for (o, m) in messages.iter().enumerate() {
                let got = log.read(Offset(o as u64), 1, 1 << 20).expect("read");
                assert_message(&got[0], m, o as u64);
                let ts = m.timestamp_ms.expect("explicit");
                assert_eq!(
                    log.offset_for_timestamp(ts).expect("time lookup"),
                    Offset(o as u64),
                    "{ctx}: first record at or after {ts}"
                );
                assert_eq!(
                    log.offset_for_timestamp(ts + 1).expect("time lookup"),
                    Offset(o as u64 + 1),
                    "{ctx}: first record after {ts}"
                );
            }
            assert_appends_at(&log, messages.len() as u64);
        }
    }
}

// ---------------------------------------------------------------------------
// f. A full disk
// ---------------------------------------------------------------------------

/// Appends until the disk is full, checks the error, then frees space and
/// checks the log goes on. `fill_up` makes the disk full, `free` undoes it.
fn disk_full_case(fill_up: impl Fn(&SimDisk), free: impl Fn(&SimDisk), seed: u64) {
    let disk = Arc::new(SimDisk::new());
    let mut rng = Rng::new(seed);
    // Segments hold any whole batch below (5 messages of at most ~420 bytes):
    // a batch that fits one segment is never half stored.
    let config = LogConfig {
        segment_bytes: rng.range(4096, 8193),
        index_interval_bytes: rng.range(64, 1025) as u32,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let ctx = format!("seed {seed} {config:?}");
    let open = || open_sim(&disk, "/data/topics/full", &config);
    let log = open();
    let mut acked: Vec<NewMessage> = Vec::new();
    for _ in 0..rng.range(0, 30) {
        let batch: Vec<NewMessage> = (0..rng.range(1, 6))
            .map(|_| random_message(&mut rng, 300))
            .collect();
        log.append(&batch).expect("append with space left");
        acked.extend(batch);
    }
    fill_up(&disk);
    let mut fulls = 0;
    for _ in 0..200 {
        let batch: Vec<NewMessage> = (0..rng.range(1, 6))
            .map(|_| random_message(&mut rng, 300))
            .collect();
        match log.append(&batch) {
            Ok(a) => {
                assert_eq!(a.first, Offset(acked.len() as u64), "{ctx}");
                acked.extend(batch);
            }
            Err(Error::Full { context, .. }) => {
                assert!(context.contains("/data/topics/full"), "{ctx}: {context}");
                fulls += 1;
                if fulls == 3 {
                    break;
                }
            }
            Err(other) => panic!("{ctx}: a full disk is Error::Full, got {other:?}"),
        }
    }
    assert_eq!(fulls, 3, "{ctx}: the disk never filled");
    assert_eq!(
        log.end(),
        Offset(acked.len() as u64),
        "{ctx}: nothing half-stored"
    );
    assert_log_holds(&log, &acked, &ctx);
    free(&disk);
    assert_appends_at(&log, acked.len() as u64);
    log.close().expect("close");
    let log = open();
    assert_eq!(log.end(), Offset(acked.len() as u64 + 1), "{ctx}");
    assert_eq!(read_all(&log).len(), acked.len() + 1);
}

/// Why: ENOSPC must reach the producer as Error::Full, never as a panic, a
/// SIGBUS or a read-only log, and appends must resume once space is back.
#[test]
fn a_full_disk_is_a_clean_error_and_appends_resume_when_space_returns() {
    for seed in 0..40 {
        disk_full_case(
            |d| d.set_fault(SimFault::NoSpace, true),
            |d| d.set_fault(SimFault::NoSpace, false),
            seed,
        );
    }
}

/// Why: the same promise when the disk fills at an arbitrary point: inside a
/// segment, at a roll, or while an index file is written.
#[test]
fn a_capacity_limit_is_a_clean_error_and_appends_resume_when_lifted() {
    for seed in 100..140 {
        let extra = Rng::new(seed).below(20_000);
        disk_full_case(
            // Leave a random amount of room so the limit hits at any point:
            // inside a segment, at a roll, while writing an index.
            |d| {
                let used: u64 = used_bytes(d);
                d.set_capacity(Some(used + extra));
            },
            |d| d.set_capacity(None),
            seed,
        );
    }
}

/// Why: on a copy-on-write filesystem (btrfs, or any filesystem once a
/// snapshot shares the blocks) a full disk refuses writes even into space
/// `fallocate` reserved, possibly after part of a batch reached the file.
/// The refused batches must be `Error::Full` with nothing of them stored,
/// not after a power cut either (a partly written batch must not come back
/// as valid records), and the log must stay writable rather than turn
/// read-only until a restart.
#[test]
fn a_full_copy_on_write_disk_refuses_batches_whole_and_the_log_goes_on() {
    for seed in 0..24u64 {
        let fsync = match seed % 3 {
            0 => FsyncPolicy::Always,
            1 => FsyncPolicy::Interval(3_600_000),
            _ => FsyncPolicy::Never,
        };
        let mut rng = Rng::new(seed);
        let disk = Arc::new(SimDisk::new());
        let config = LogConfig {
            segment_bytes: 8 << 20,
            index_interval_bytes: rng.range(64, 4097) as u32,
            fsync,
            ..LogConfig::default()
        };
        let ctx = format!("seed {seed} {fsync:?}");
        let open = || open_sim(&disk, "/data/topics/cow", &config);
        let batch = |rng: &mut Rng, n: u64, size: u64| -> Vec<NewMessage> {
            (0..n).map(|_| random_message(rng, size)).collect()
        };
        let log = open();
        let mut acked: Vec<NewMessage> = Vec::new();
        for _ in 0..rng.range(1, 6) {
            let n = rng.range(1, 20);
            let b = batch(&mut rng, n, 2000);
            log.append(&b).expect("append with room");
            acked.extend(b);
        }
        // Past the writer's pieces (256 KiB under `always`, 1 MiB else):
        // the budget runs out after some of them reached the file.
        let large = batch(&mut rng, 700, 4000);
        let large_bytes: u64 = large.iter().map(|m| m.value.len() as u64).sum();
        disk.fail_writes_after(Some(rng.below(large_bytes)));
        match log.append(&large) {
            Err(Error::Full { context, .. }) => {
                assert!(context.contains("/data/topics/cow"), "{ctx}: {context}")
            }
            other => panic!("{ctx}: a refused write is Error::Full, got {other:?}"),
        }
        assert!(!log.is_read_only(), "{ctx}: a full disk is no failed sync");
        // A group commit of several batches, the disk still full.
        let group: Vec<Vec<NewMessage>> = (0..3).map(|_| batch(&mut rng, 300, 4000)).collect();
        disk.fail_writes_after(Some(rng.below(600_000)));
        let results = log.write_batches(group.iter().map(Vec::as_slice));
        let mut next = acked.len() as u64;
        for (b, result) in group.iter().zip(results) {
            match result {
                Ok((first, _)) => {
                    assert_eq!(
                        first,
                        Offset(next),
                        "{ctx}: a batch that fits goes on in order"
                    );
                    next += b.len() as u64;
                    acked.extend(b.iter().cloned());
                }
                Err(Error::Full { .. }) => {}
                Err(other) => panic!("{ctx}: a refused write is Error::Full, got {other:?}"),
            }
        }
        log.commit().expect("the commit of what fitted");
        assert_eq!(
            log.end(),
            Offset(acked.len() as u64),
            "{ctx}: nothing half-stored"
        );
        // The refused bytes are gone from the file, not only from memory: a
        // sync now and a power cut keep exactly what was acknowledged.
        log.sync().expect("sync on a full disk");
        drop(log);
        disk.power_cut(None);
        let log = open();
        assert_log_holds(&log, &acked, &format!("{ctx}: nothing of a refused batch"));
        disk.fail_writes_after(None);
        let n = rng.range(1, 5);
        let after = batch(&mut rng, n, 500);
        let a = log
            .append(&after)
            .expect("appends resume once there is room");
        assert_eq!(a.first, Offset(acked.len() as u64), "{ctx}");
        acked.extend(after);
        log.sync().expect("sync");
        drop(log);
        disk.power_cut(None);
        let log = open();
        assert_log_holds(&log, &acked, &format!("{ctx}: only what was acknowledged"));
        assert_appends_at(&log, acked.len() as u64);
    }
}

/// 100 messages of 1000 bytes: larger than a segment of 64 KiB.
fn larger_than_a_segment() -> Vec<NewMessage> {
    (0..100)
        .map(|i| NewMessage::from_value(vec![b'a' + (i % 26) as u8; 1000]))
        .collect()
}

/// Why: a batch larger than a segment is stored across segments, and a roll
/// in its middle seals the part written before it. When the disk then
/// refuses the rest, the answer must say which offsets of the batch are
/// stored, not that nothing is.
#[test]
fn a_batch_refused_after_a_roll_names_the_part_stored_before_it() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let open = || open_sim(&disk, "/data/topics/across", &config);
    let log = open();
    let batch = larger_than_a_segment();
    disk.fail_writes_after(Some(90 * 1024));
    let err = log
        .append(&batch)
        .expect_err("the disk fills in the second segment");
    let stored = log.end().0;
    assert!(
        stored > 0 && stored < 100,
        "the first segment's part: {stored}"
    );
    match err {
        Error::Full { context, .. } => assert!(
            context.contains(&format!("offsets 0 to {} are stored", stored - 1)),
            "{context}"
        ),
        other => panic!("a refused write is Error::Full, got {other:?}"),
    }
    assert!(!log.is_read_only());
    disk.fail_writes_after(None);
    drop(log);
    disk.power_cut(None);
    let log = open();
    assert_eq!(log.end().0, stored, "the sealed part, and nothing after it");
}

/// Why: a batch larger than a segment seals its first part before the next
/// segment is created; when that creation fails (no room for the new file,
/// out of descriptors), the sealed part is stored and readable, so the
/// answer must name it or the producer sends it again as duplicates.
#[test]
fn a_batch_stopped_by_a_failed_roll_names_the_part_stored_before_it() {
    for fault in [SimFault::NoSpace, SimFault::OutOfFiles] {
        let disk = Arc::new(SimDisk::new());
        let config = LogConfig {
            segment_bytes: 64 * 1024,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        };
        let open = || open_sim(&disk, "/data/topics/across", &config);
        let log = open();
        let batch = larger_than_a_segment();
        // The roll syncs the full segment, then creates the next: the fault
        // starts between the two.
        let faulty = Arc::clone(&disk);
        disk.set_hook(Some(Arc::new(move |op, path: &Path| {
            if op == SimOp::SyncData && path.extension().is_some_and(|e| e == "log") {
                faulty.set_fault(fault, true);
            }
        })));
        let err = log
            .append(&batch)
            .expect_err("the second segment cannot be created");
        disk.set_hook(None);
        disk.set_fault(fault, false);
        let stored = log.end().0;
        assert!(
            stored > 0 && stored < 100,
            "{fault:?}: the first segment's part: {stored}"
        );
        let named = format!("offsets 0 to {} are stored", stored - 1);
        match &err {
            Error::Full { context, .. } if fault == SimFault::NoSpace => {
                assert!(context.contains(&named), "{context}")
            }
            Error::FilesExhausted { context, .. } if fault == SimFault::OutOfFiles => {
                assert!(context.contains(&named), "{context}")
            }
            other => panic!("{fault:?}: the creation's own error, got {other:?}"),
        }
        // The stored part reads back, and the log goes on after it.
        let read = log
            .read(Offset(0), usize::MAX, usize::MAX)
            .expect("read the stored part");
        assert_eq!(read.len() as u64, stored, "{fault:?}");
        let next = log.append(&batch[..1]).expect("the next append rolls");
        assert_eq!(next.first.0, stored, "{fault:?}");
        log.sync().expect("sync");
        drop(log);
        disk.power_cut(None);
        assert_eq!(open().end().0, stored + 1, "{fault:?}: nothing else stored");
    }
}

/// Live bytes of every file on the simulated disk.
fn used_bytes(disk: &SimDisk) -> u64 {
    fn walk(disk: &SimDisk, dir: &Path) -> u64 {
        let Ok(names) = disk.list_dir(dir) else {
            return 0;
        };
        names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                match disk.read_file(&p) {
                    Ok(bytes) => bytes.len() as u64,
                    Err(_) => walk(disk, &p),
                }
            })
            .sum()
    }
    walk(disk, Path::new("/data"))
}

// ---------------------------------------------------------------------------
// g. A failed sync
// ---------------------------------------------------------------------------

/// Why: after a failed fsync the kernel may have dropped the dirty pages, so a
/// retry could report success for lost data ("fsyncgate"): the log must stay
/// read-only until restarted, keep serving reads, and restart cleanly.
#[test]
fn a_failed_sync_turns_the_log_read_only_until_reopened() {
    for (seed, fsync) in [
        (1u64, FsyncPolicy::Always),
        (2, FsyncPolicy::Always),
        (3, FsyncPolicy::Never),
        (4, FsyncPolicy::Interval(1)),
    ] {
        let disk = Arc::new(SimDisk::new());
        let mut rng = Rng::new(seed);
        let config = LogConfig {
            segment_bytes: 2048,
            index_interval_bytes: 256,
            fsync,
            ..LogConfig::default()
        };
        let ctx = format!("{fsync:?}");
        let open = || open_sim(&disk, "/data/topics/sync", &config);
        let log = open();
        let mut acked: Vec<NewMessage> = Vec::new();
        for _ in 0..20 {
            let batch: Vec<NewMessage> = (0..3).map(|_| random_message(&mut rng, 200)).collect();
            log.append(&batch).expect("append");
            acked.extend(batch);
        }
        log.sync().expect("sync while healthy");
        let durable = acked.len();

        disk.set_fault(SimFault::SyncError, true);
        // The first operation that needs a sync fails (under fsync=never that
        // is a roll or an explicit sync).
        let mut failed = None;
        for _ in 0..100 {
            let batch: Vec<NewMessage> = (0..3).map(|_| random_message(&mut rng, 200)).collect();
            let result = if fsync == FsyncPolicy::Never && rng.one_in(5) {
                log.sync().map(|()| None)
            } else {
                log.append(&batch).map(Some)
            };
            match result {
                Ok(Some(a)) => {
                    assert_ne!(
                        a.durability,
                        Durability::Durable,
                        "{ctx}: no sync, no durable ack"
                    );
                    acked.extend(batch);
                }
                Ok(None) => panic!("{ctx}: sync reported success on a failing disk"),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let err = failed.unwrap_or_else(|| panic!("{ctx}: no operation noticed the sync failure"));
        assert!(
            matches!(err, Error::ReadOnly { .. }),
            "{ctx}: a failed sync poisons the log: {err:?}"
        );
        disk.set_fault(SimFault::SyncError, false);
        for _ in 0..3 {
            let err = log
                .append(&[NewMessage::from_value("late")])
                .expect_err("read-only after a failed sync, even once syncs work again");
            assert!(matches!(err, Error::ReadOnly { .. }), "{ctx}: {err:?}");
            assert!(err.to_string().contains("sync"), "{ctx}: says why: {err}");
        }
        assert!(matches!(log.sync(), Err(Error::ReadOnly { .. })), "{ctx}");
        let got = read_all(&log);
        assert!(got.len() >= durable, "{ctx}: earlier data still reads");
        for (i, m) in got.iter().take(acked.len()).enumerate() {
            assert_message(m, &acked[i], i as u64);
        }
        drop(log);

        // A restart once the disk is healthy: every synced record is there
        // (even across a power cut), and appends go on at the end.
        disk.power_cut(None);
        let log = open();
        let got = read_all(&log);
        assert!(got.len() >= durable, "{ctx}: {} < {durable}", got.len());
        for (i, m) in got.iter().enumerate().take(acked.len()) {
            assert_message(m, &acked[i], i as u64);
        }
        assert_appends_at(&log, got.len() as u64);
    }
}

/// A torn record whose value carries bytes that read as a valid record of a
/// later offset (a message holding a piece of a spool segment, say) is a
/// torn tail like any other: cut at the next open, not taken for valid
/// records after damage (which would refuse the log after a power cut).
#[test]
fn a_torn_record_carrying_a_record_in_its_value_is_a_torn_tail() {
    for backend in BACKENDS {
        let bed = Bed::new(backend);
        let config = LogConfig::default();
        let first = NewMessage::from_value("first");
        let log = bed.open(&config, RecoveryMode::default()).expect("open");
        log.append(std::slice::from_ref(&first)).expect("append");
        log.close().expect("close");
        let segment = bed.segment_logs().pop().expect("a segment");
        let end = record::encoded_len(&first).expect("a size") as u64;

        let mut inner = Vec::new();
        record::encode(&mut inner, 1000, 5, &NewMessage::from_value("inside"));
        let mut value = vec![b'v'; 100];
        value.extend_from_slice(&inner);
        value.extend(vec![b'w'; 2000]);
        let mut outer = Vec::new();
        record::encode(&mut outer, 1, 5, &NewMessage::from_value(value));
        // Only its first bytes, the record inside included, reached the disk.
        let kept = 32 + 100 + inner.len() + 50;
        bed.overwrite(&segment, end, &outer[..kept]);

        let log = bed
            .open(&config, RecoveryMode::TolerateTornTail)
            .unwrap_or_else(|e| panic!("{backend:?}: a torn tail, not damage: {e}"));
        assert_eq!(log.recovery_report().truncations.len(), 1, "{backend:?}");
        assert_appends_at(&log, 1);
    }
}

/// Garbage shorter than a record header between two valid records, in
/// synced data, opens under skip-damaged (it panicked, or wrote a filler too
/// short to read and looped), and the log goes on after the last record.
#[test]
fn skip_damaged_opens_around_garbage_shorter_than_a_record_header() {
    for garbage in [20usize, 30] {
        for backend in BACKENDS {
            let bed = Bed::new(backend);
            let config = LogConfig::default();
            let messages: Vec<NewMessage> = (0..3)
                .map(|i| NewMessage::from_value(format!("message {i}")))
                .collect();
            let log = bed.open(&config, RecoveryMode::default()).expect("open");
            log.append(&messages).expect("append");
            log.close().expect("close");
            let segment = bed.segment_logs().pop().expect("a segment");
            let bytes = bed.read_file(&segment);
            let second = record::encoded_len(&messages[0]).expect("a size");
            let tail = record::encoded_len(&messages[1]).expect("a size")
                + record::encoded_len(&messages[2]).expect("a size");
            // Records 1 and 2 moved `garbage` bytes on, behind 0xFF bytes.
            let mut shifted = vec![0xFF; garbage];
            shifted.extend_from_slice(&bytes[second..second + tail]);
            bed.overwrite(&segment, second as u64, &shifted);

            let log = bed
                .open(&config, RecoveryMode::SkipDamaged)
                .unwrap_or_else(|e| panic!("{backend:?} {garbage}: opens: {e}"));
            let read = log.read(Offset(0), 10, 1 << 20).expect("read");
            assert_eq!(read[0].value, messages[0].value, "{backend:?} {garbage}");
            let end = log.stats().end.0;
            assert_appends_at(&log, end);
        }
    }
}
