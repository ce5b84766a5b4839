//! The storage engine's public contract on the real disk and the simulated
//! one: append, read back byte-exact across rolls and reopen, time lookup,
//! retention, locking, size limits.

use bytes::Bytes;
use spool::Error;
use spool::storage::io::{OsStorage, SimDisk, SimFault, SimOp, Storage};
use spool::storage::{
    DataDir, Durability, FsyncPolicy, LogConfig, NewMessage, Offset, RecoveryMode,
};
use std::sync::Arc;

fn small(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        fsync,
        ..LogConfig::default()
    }
}

fn msg(i: usize) -> NewMessage {
    NewMessage::from_value(format!("message number {i} {}", "x".repeat(i % 50)))
        .with_key(format!("key-{}", i % 7))
        .with_header("n", i.to_string())
}

fn backends() -> Vec<(Arc<dyn Storage>, tempfile::TempDir)> {
    vec![
        (
            Arc::new(OsStorage) as Arc<dyn Storage>,
            tempfile::tempdir().expect("tempdir"),
        ),
        (
            Arc::new(SimDisk::new()) as Arc<dyn Storage>,
            tempfile::tempdir().expect("tempdir"),
        ),
    ]
}

#[test]
fn appends_read_back_byte_exact_across_rolls_and_reopen() {
    for (storage, tmp) in backends() {
        let root = tmp.path().join("data");
        let expected: Vec<NewMessage> = (0..500).map(msg).collect();
        {
            let data = DataDir::open(Arc::clone(&storage), &root).expect("open data dir");
            let log = data
                .open_log("t", small(FsyncPolicy::Always), RecoveryMode::default())
                .expect("open");
            for chunk in expected.chunks(7) {
                let a = log.append(chunk).expect("append");
                assert_eq!(a.durability, Durability::Durable);
            }
            assert!(
                log.stats().segments > 5,
                "small segments must roll: {:?}",
                log.stats()
            );
            log.close().expect("close");
        }
        let data = DataDir::open(Arc::clone(&storage), &root).expect("reopen data dir");
        let log = data
            .open_log("t", small(FsyncPolicy::Always), RecoveryMode::default())
            .expect("reopen");
        assert!(
            log.recovery_report().is_clean(),
            "{:?}",
            log.recovery_report()
        );
        assert_eq!(log.end(), Offset(500));
        let mut got = Vec::new();
        let mut from = Offset(0);
        while got.len() < 500 {
            let batch = log.read(from, 33, 1 << 20).expect("read");
            assert!(!batch.is_empty());
            from = batch.last().expect("non-empty").offset.next();
            got.extend(batch);
        }
        for (i, (m, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(m.offset, Offset(i as u64));
            assert_eq!(m.value, e.value);
            assert_eq!(m.key, e.key);
            assert_eq!(m.headers, e.headers);
        }
        // Reading from the middle starts exactly there.
        let mid = log.read(Offset(321), 1, 1 << 20).expect("read");
        assert_eq!(mid[0].offset, Offset(321));
        assert_eq!(mid[0].value, expected[321].value);
        // Appending continues at the next offset.
        let a = log.append(&[msg(500)]).expect("append");
        assert_eq!(a.first, Offset(500));
    }
}

#[test]
fn max_bytes_bounds_a_read_but_one_message_always_comes() {
    let disk = Arc::new(SimDisk::new());
    let log = spool::storage::Log::open(disk, "/l", LogConfig::default(), RecoveryMode::default())
        .expect("open");
    let big = NewMessage::from_value(vec![7u8; 10_000]);
    log.append(&[big.clone(), big.clone(), big])
        .expect("append");
    assert_eq!(log.read(Offset(0), 10, 100).expect("read").len(), 1);
    assert_eq!(log.read(Offset(0), 10, 20_100).expect("read").len(), 2);
    assert_eq!(log.read(Offset(3), 10, 100).expect("read").len(), 0);
}

#[test]
fn timestamp_lookup_finds_first_record_at_or_after() {
    let disk = Arc::new(SimDisk::new());
    let log = spool::storage::Log::open(
        disk,
        "/l",
        small(FsyncPolicy::Never),
        RecoveryMode::default(),
    )
    .expect("open");
    let batch: Vec<NewMessage> = (0..300)
        .map(|i| NewMessage {
            timestamp_ms: Some(1000 + i * 10),
            ..msg(i as usize)
        })
        .collect();
    log.append(&batch).expect("append");
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Offset(0));
    assert_eq!(log.offset_for_timestamp(1000).expect("lookup"), Offset(0));
    assert_eq!(log.offset_for_timestamp(1001).expect("lookup"), Offset(1));
    assert_eq!(log.offset_for_timestamp(2505).expect("lookup"), Offset(151));
    assert_eq!(
        log.offset_for_timestamp(1_000_000).expect("lookup"),
        Offset(300)
    );
}

#[test]
fn written_records_are_invisible_until_committed() {
    let disk = Arc::new(SimDisk::new());
    let log = spool::storage::Log::open(disk, "/l", LogConfig::default(), RecoveryMode::default())
        .expect("open");
    let (first, last) = log.write(&[msg(0), msg(1)]).expect("write");
    assert_eq!((first, last), (Offset(0), Offset(1)));
    assert!(log.read(Offset(0), 10, 1 << 20).expect("read").is_empty());
    assert_eq!(log.end(), Offset(0));
    assert_eq!(log.commit().expect("commit"), Durability::Durable);
    assert_eq!(log.read(Offset(0), 10, 1 << 20).expect("read").len(), 2);
}

#[test]
fn fsync_never_acks_written_and_sync_makes_durable() {
    let disk = Arc::new(SimDisk::new());
    let log = spool::storage::Log::open(
        disk,
        "/l",
        LogConfig {
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        },
        RecoveryMode::default(),
    )
    .expect("open");
    assert_eq!(
        log.append(&[msg(0)]).expect("append").durability,
        Durability::Written
    );
    assert_eq!(log.stats().durable_end, Offset(0));
    log.sync().expect("sync");
    assert_eq!(log.stats().durable_end, Offset(1));
}

#[test]
fn retention_drops_whole_old_segments_only() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        retention_bytes: Some(8192),
        ..small(FsyncPolicy::Never)
    };
    let log = spool::storage::Log::open(disk.clone(), "/l", config, RecoveryMode::default())
        .expect("open");
    for i in 0..400 {
        log.append(&[msg(i)]).expect("append");
    }
    // A reader holding old data keeps a valid view while retention runs.
    let held = log.read(Offset(0), 5, 1 << 20).expect("read");
    let before = log.stats();
    let removed = log.enforce_retention(u64::MAX / 2).expect("retention");
    let after = log.stats();
    assert!(!removed.is_empty());
    assert!(after.bytes <= 8192 + 4096, "{after:?}");
    assert!(after.start > before.start);
    assert_eq!(after.end, before.end);
    assert_eq!(held[0].value, msg(0).value);
    let first = log
        .read(Offset(0), 1, 1 << 20)
        .expect("read from a dropped offset");
    assert_eq!(
        first[0].offset, after.start,
        "reads from a dropped offset start at the log start"
    );
    for base in removed {
        assert!(!disk.exists(&std::path::Path::new("/l").join(format!("{:020}.log", base.0))));
    }
}

#[test]
fn retention_by_age_uses_the_newest_record_of_a_segment() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        retention_ms: Some(1000),
        ..small(FsyncPolicy::Never)
    };
    let log = spool::storage::Log::open(disk, "/l", config, RecoveryMode::default()).expect("open");
    let old: Vec<NewMessage> = (0..100)
        .map(|i| NewMessage {
            timestamp_ms: Some(5_000),
            ..msg(i)
        })
        .collect();
    log.append(&old).expect("append");
    let new: Vec<NewMessage> = (0..100)
        .map(|i| NewMessage {
            timestamp_ms: Some(10_000),
            ..msg(i)
        })
        .collect();
    log.append(&new).expect("append");
    log.enforce_retention(10_500).expect("retention");
    let start = log.start();
    assert!(
        start >= Offset(90) && start <= Offset(100),
        "old segments go, the mixed one stays: {start}"
    );
}

#[test]
fn a_second_open_of_a_locked_data_dir_names_the_holder() {
    for (storage, tmp) in backends() {
        let root = tmp.path().join("data");
        let _held = DataDir::open(Arc::clone(&storage), &root).expect("first open");
        let err = DataDir::open(Arc::clone(&storage), &root).expect_err("second open must fail");
        assert!(matches!(err, Error::Locked { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&std::process::id().to_string()) && text.contains("locked"),
            "{text}"
        );
    }
}

#[test]
fn oversized_and_empty_batches_are_rejected_clearly() {
    let disk = Arc::new(SimDisk::new());
    let log = spool::storage::Log::open(
        disk,
        "/l",
        small(FsyncPolicy::Always),
        RecoveryMode::default(),
    )
    .expect("open");
    let err = log
        .append(&[msg(0), NewMessage::from_value(vec![0u8; 5000])])
        .expect_err("too big");
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err.to_string().contains("message 1 "), "{err}");
    assert!(log.append(&[]).is_err());
    assert_eq!(
        log.append(&[msg(0)]).expect("log still works").first,
        Offset(0)
    );
}

#[test]
fn values_are_zero_copy_views_of_the_map() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = spool::storage::Log::open(
        Arc::new(OsStorage),
        tmp.path().join("l"),
        LogConfig::default(),
        RecoveryMode::default(),
    )
    .expect("open");
    log.append(&[NewMessage::from_value(Bytes::from(vec![1u8; 4096]))])
        .expect("append");
    let a = log.read(Offset(0), 1, 1 << 20).expect("read");
    let b = log.read(Offset(0), 1, 1 << 20).expect("read");
    assert_eq!(
        a[0].value.as_ptr(),
        b[0].value.as_ptr(),
        "both reads view the same mapped bytes"
    );
}

#[test]
fn interval_policy_syncs_on_a_due_commit_and_on_every_tick() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        // Long enough that the appends meant to fall inside it do on a
        // loaded machine.
        fsync: FsyncPolicy::Interval(2000),
        ..LogConfig::default()
    };
    let log = spool::storage::Log::open(disk, "/l", config, RecoveryMode::default()).expect("open");
    log.sync().expect("start the interval now");
    assert_eq!(
        log.append(&[msg(0)]).expect("append").durability,
        Durability::Written
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        log.append(&[msg(1)]).expect("append").durability,
        Durability::Durable,
        "a commit syncs once the interval has passed"
    );
    assert_eq!(
        log.append(&[msg(2)]).expect("append").durability,
        Durability::Written
    );
    assert!(
        log.sync_written().expect("tick"),
        "the tick syncs what is written, however recent the last sync"
    );
    assert_eq!(log.stats().durable_end, Offset(3));
    assert!(!log.sync_written().expect("tick"), "nothing left to sync");
}

#[test]
fn segments_roll_by_age() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        // Long enough that the first two appends fall in it on a loaded
        // machine.
        segment_ms: Some(2000),
        ..LogConfig::default()
    };
    let log = spool::storage::Log::open(disk, "/l", config, RecoveryMode::default()).expect("open");
    log.append(&[msg(0)]).expect("append");
    log.append(&[msg(1)]).expect("append");
    assert_eq!(log.stats().segments, 1);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    log.append(&[msg(2)]).expect("append");
    assert_eq!(
        log.stats().segments,
        2,
        "the old segment was sealed before the append"
    );
    assert_eq!(log.read(Offset(0), 10, 1 << 20).expect("read").len(), 3);
}

/// An idle or small topic must not hold a whole segment of disk: files grow in
/// small steps ahead of the writer, so thousands of topics fit on a small disk.
#[test]
fn small_topics_hold_little_disk() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = DataDir::open(Arc::new(OsStorage), tmp.path()).expect("open");
    let topics = 300;
    for t in 0..topics {
        let log = data
            .open_log(
                &format!("topic-{t}"),
                LogConfig::default(),
                RecoveryMode::default(),
            )
            .expect("open log");
        if t % 2 == 0 {
            log.append(&[msg(t)]).expect("append");
        }
        log.close().expect("close");
    }
    let mut allocated = 0u64;
    for entry in walk(tmp.path()) {
        allocated += entry.metadata().expect("metadata").blocks() * 512;
    }
    let per_topic = allocated / topics as u64;
    assert!(
        per_topic <= 16 * 1024,
        "{per_topic} bytes allocated per topic (segment size is 128 MiB)"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::fs::DirEntry> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry);
        }
    }
    out
}

/// A group commit writes its batches together (`Log::write_batches`): each
/// keeps its own offsets and result, a refused batch takes nothing from the
/// others, large groups cross segment rolls and pieces written ahead of the
/// sync under `fsync=always`, and everything reads back after a reopen.
#[test]
fn a_group_of_batches_is_written_together_and_reads_back() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
        for (storage, tmp) in backends() {
            let root = tmp.path().join("data");
            let config = LogConfig {
                segment_bytes: 1 << 20,
                ..small(fsync)
            };
            // 400 KiB per batch: pieces of 256 KiB under fsync=always, and
            // three of them take a segment of 1 MiB past its end.
            let big: Vec<NewMessage> = (0..400)
                .map(|i| NewMessage::from_value(vec![(i % 251) as u8; 1024]))
                .collect();
            let tiny: Vec<NewMessage> = (0..5).map(msg).collect();
            let refused = vec![msg(1), NewMessage::from_value(vec![0u8; 2 << 20])];
            let group: Vec<&[NewMessage]> = vec![&tiny, &big, &refused, &big, &[], &big, &tiny];
            let expected: Vec<&NewMessage> = group
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2 && *i != 4)
                .flat_map(|(_, b)| b.iter())
                .collect();
            {
                let data = DataDir::open(Arc::clone(&storage), &root).expect("open data dir");
                let log = data
                    .open_log("t", config.clone(), RecoveryMode::default())
                    .expect("open");
                let written = log.write_batches(group.iter().copied());
                assert_eq!(written.len(), group.len());
                let mut next = 0u64;
                for (i, (batch, result)) in group.iter().zip(&written).enumerate() {
                    match (i, result) {
                        (2 | 4, Err(Error::InvalidArgument(_))) => {}
                        (2 | 4, other) => panic!("batch {i} must be refused: {other:?}"),
                        (_, Ok((first, last))) => {
                            assert_eq!(*first, Offset(next), "batch {i}");
                            next += batch.len() as u64;
                            assert_eq!(*last, Offset(next - 1), "batch {i}");
                        }
                        (_, Err(e)) => panic!("batch {i}: {e}"),
                    }
                }
                let durability = log.commit().expect("commit");
                let want = match fsync {
                    FsyncPolicy::Always => Durability::Durable,
                    _ => Durability::Written,
                };
                assert_eq!(durability, want);
                assert!(log.stats().segments > 1, "the group crosses a roll");
                log.close().expect("close");
            }
            let data = DataDir::open(Arc::clone(&storage), &root).expect("reopen data dir");
            let log = data
                .open_log("t", config, RecoveryMode::default())
                .expect("reopen");
            let mut got = Vec::new();
            while got.len() < expected.len() {
                let batch = log
                    .read(Offset(got.len() as u64), 1000, 16 << 20)
                    .expect("read");
                assert!(!batch.is_empty(), "stopped at {}", got.len());
                got.extend(batch);
            }
            assert_eq!(got.len(), expected.len());
            for (i, (m, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(m.offset, Offset(i as u64));
                assert_eq!(m.value, e.value, "offset {i}");
                assert_eq!(m.key, e.key, "offset {i}");
            }
        }
    }
}

#[test]
fn an_append_may_block_when_the_policy_syncs_or_the_segment_would_roll() {
    let open = |fsync| {
        spool::storage::Log::open(
            Arc::new(SimDisk::new()),
            "/l",
            small(fsync),
            RecoveryMode::default(),
        )
        .expect("open")
    };
    let never = open(FsyncPolicy::Never);
    let segment = never.config().segment_bytes;
    assert!(!never.append_may_block(100), "a copy into the page cache");
    assert!(
        never.append_may_block(segment + 1),
        "more than the segment holds rolls it, and a roll syncs"
    );
    never.append(&[msg(0)]).expect("append");
    assert!(!never.append_may_block(100));
    assert!(open(FsyncPolicy::Always).append_may_block(100));
    assert!(open(FsyncPolicy::Interval(10)).append_may_block(100));
}

/// Under `fsync=always`, small appends keep written zeros ahead of them in
/// the active segment (their syncs then write data only), never more than
/// a quarter MiB, and the zeros change nothing that is read back or
/// recovered.
#[test]
fn small_durable_appends_keep_zeros_ahead_and_read_back_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let storage: Arc<dyn Storage> = Arc::new(OsStorage);
    let config = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = spool::storage::Log::open(
        Arc::clone(&storage),
        tmp.path(),
        config.clone(),
        RecoveryMode::default(),
    )
    .expect("open");
    let mut written = Vec::new();
    for i in 0..400 {
        let m = NewMessage::from_value(vec![b'a' + (i % 26) as u8; 1000]);
        log.append(std::slice::from_ref(&m)).expect("append");
        written.push(m);
    }
    let segment = walk(tmp.path())
        .into_iter()
        .find(|e| e.path().extension().is_some_and(|x| x == "log"))
        .expect("a segment file");
    let data_end = log.stats().bytes;
    let file_len = segment.metadata().expect("metadata").len();
    assert!(
        file_len > data_end && file_len <= data_end + 256 * 1024 + 4096,
        "{file_len} bytes in the file for {data_end} of records"
    );
    let bytes = std::fs::read(segment.path()).expect("read segment");
    assert!(
        bytes[data_end as usize..].iter().all(|&b| b == 0),
        "zeros past the records"
    );
    drop(log);
    let log = spool::storage::Log::open(storage, tmp.path(), config, RecoveryMode::default())
        .expect("reopen");
    let read = log.read(Offset(0), 1000, usize::MAX).expect("read");
    assert_eq!(read.len(), written.len());
    for (m, w) in read.iter().zip(&written) {
        assert_eq!(m.value, w.value);
    }
    assert_eq!(log.stats().end, Offset(400));
}

/// After a crash of the process (not of the machine), the active segment
/// may be longer than its last `fdatasync` made it: zeros written ahead of
/// the writer whose size never reached the disk. A record appended there
/// after the restart is still durable when acknowledged (opening the log
/// syncs what recovery found), so a power cut right after its ack keeps it.
#[test]
fn a_record_appended_after_a_crash_survives_a_power_cut() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let value = |i: u8| NewMessage::from_value(vec![i; 1000]);
    let open = || {
        spool::storage::Log::open(
            Arc::clone(&disk) as Arc<dyn Storage>,
            "/l",
            config.clone(),
            RecoveryMode::default(),
        )
        .expect("open")
    };
    let log = open();
    // Each append is synced; the second grows the file ahead of the
    // records, and neither it nor the third goes past the size the first
    // made durable, so that growth is not durable yet.
    for i in 0..3 {
        log.append(&[value(i)]).expect("append");
    }
    drop(log); // the process dies: the page cache (the sim's live files) stays
    let log = open();
    let appended = log.append(&[value(3)]).expect("append after the crash");
    assert_eq!(appended.first, Offset(3));
    assert_eq!(appended.durability, Durability::Durable);
    drop(log);
    disk.power_cut(None);
    let log = open();
    let read = log.read(Offset(0), 10, usize::MAX).expect("read");
    assert_eq!(read.len(), 4, "every acknowledged record is back");
    assert_eq!(read[3].value, value(3).value);
}

/// How to open (again) a log of 1 KiB segments under `fsync` at `/l` of
/// `disk`.
fn small_sim_log(
    disk: &Arc<SimDisk>,
    fsync: FsyncPolicy,
) -> impl Fn() -> spool::Result<spool::storage::Log> + '_ {
    let config = LogConfig {
        segment_bytes: 1024,
        fsync,
        ..LogConfig::default()
    };
    move || {
        spool::storage::Log::open(
            Arc::clone(disk) as Arc<dyn Storage>,
            "/l",
            config.clone(),
            RecoveryMode::default(),
        )
    }
}

#[test]
fn a_roll_that_failed_half_way_is_retried_before_the_next_write() {
    // The roll creates the new segment's file, then its folder sync fails:
    // the batch that needed the roll is refused. A smaller batch that would
    // still fit the active segment must not go there at the offset the
    // left-over file is named after, or the log no longer opens.
    let disk = Arc::new(SimDisk::new());
    let open = small_sim_log(&disk, FsyncPolicy::Always);
    let log = open().expect("open");
    let small = |i: u8| NewMessage::from_value(vec![i; 40]);
    let mut i = 0u8;
    while log.stats().bytes < 800 {
        log.append(&[small(i)]).expect("append");
        i += 1;
    }
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let (faulty, armed) = (Arc::clone(&disk), Arc::clone(&armed));
        disk.set_hook(Some(Arc::new(move |op, _| {
            if op == SimOp::SyncDir && armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                faulty.set_fault(SimFault::SyncError, true);
            }
        })));
    }
    let refused = log.append(&[NewMessage::from_value(vec![0xff; 400])]);
    disk.set_fault(SimFault::SyncError, false);
    disk.set_hook(None);
    assert!(refused.is_err(), "the roll's folder sync failed");
    let next = log
        .append(&[small(i)])
        .expect("append after the failed roll");
    assert_eq!(next.durability, Durability::Durable);
    let end = log.stats().end;
    drop(log);
    let log = open().expect("the log opens again");
    assert_eq!(log.stats().end, end);
    let last = log.read(next.first, 1, 1 << 20).expect("read");
    assert_eq!(last[0].value, Bytes::from(vec![i; 40]));
}

#[test]
fn a_seal_cut_short_is_a_note_for_verify_and_no_damage_for_the_broker() {
    // A roll creates the next segment, then seals this one; the power goes
    // between the two. The sealed segment keeps its preallocated zeros:
    // verify must call that what the next start repairs, not damage.
    let disk = Arc::new(SimDisk::new());
    let storage: Arc<dyn Storage> = disk.clone();
    let reg = spool::broker::Registry::open(
        DataDir::open(Arc::clone(&storage), "/data").expect("data dir"),
        spool::broker::RegistryOptions::default(),
    )
    .expect("registry");
    let config = spool::broker::TopicConfig {
        log: LogConfig {
            segment_bytes: 1024,
            fsync: FsyncPolicy::Always,
            ..LogConfig::default()
        },
        ..spool::broker::TopicConfig::default()
    };
    let topic = reg.create_topic("t", config).expect("topic");
    let mut produced = 0u64;
    while topic.log().segments().len() < 2 {
        topic
            .produce(&[NewMessage::from_value(vec![7u8; 100])])
            .expect("produce");
        produced += 1;
    }
    // The roll for the next message: power off right after the new
    // segment's folder sync, before the seal syncs anything.
    let created = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (cut, created) = (Arc::clone(&disk), Arc::clone(&created));
        disk.set_hook(Some(Arc::new(move |op, path| {
            let logs = cut
                .list_dir(std::path::Path::new("/data/topics/t"))
                .map(|n| n.iter().filter(|n| n.ends_with(".log")).count())
                .unwrap_or(0);
            if created.load(std::sync::atomic::Ordering::SeqCst) {
                cut.power_off_after_syncs(Some(cut.sync_count()));
            } else if op == SimOp::SyncDir && path.ends_with("t") && logs == 3 {
                created.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })));
    }
    let mut refused = false;
    for _ in 0..20 {
        if topic
            .produce(&[NewMessage::from_value(vec![8u8; 100])])
            .is_err()
        {
            refused = true;
            break;
        }
        produced += 1;
    }
    disk.set_hook(None);
    assert!(refused, "the power went during a roll");
    drop(topic);
    drop(reg);
    disk.power_cut(None);
    let data = DataDir::open(Arc::clone(&storage), "/data").expect("data dir");
    let report = spool::storage::verify::verify(&data, &mut |_| {}).expect("verify");
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.detail.contains("seal was interrupted")),
        "{:?}",
        report.notes
    );
    drop(data);
    let reg = spool::broker::Registry::open(
        DataDir::open(Arc::clone(&storage), "/data").expect("data dir"),
        spool::broker::RegistryOptions::default(),
    )
    .expect("registry");
    let topic = reg.topic("t").expect("the topic opens");
    assert_eq!(
        topic.stats().end.0,
        produced,
        "every confirmed message is there"
    );
}

/// A log in `dir` holding five records of 20-byte values (52 bytes each).
fn five_records(
    disk: &Arc<dyn Storage>,
    dir: &std::path::Path,
    cfg: &LogConfig,
) -> spool::storage::Log {
    let log =
        spool::storage::Log::open(Arc::clone(disk), dir, cfg.clone(), RecoveryMode::default())
            .expect("open");
    for _ in 0..5 {
        log.append(&[NewMessage::from_value("y".repeat(20))])
            .expect("append");
    }
    log
}

/// A record cut at the end of the file (a power cut before the sync that
/// made the file's new length durable) is a torn tail, even when its value
/// holds bytes that read as a valid record of a later offset (a message
/// carrying a piece of another spool log): the log ends before it, and no
/// record from inside the value enters the log.
#[test]
fn a_record_cut_at_the_end_of_the_file_is_a_torn_tail_whatever_its_value_holds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk: Arc<dyn Storage> = Arc::new(OsStorage);
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    // The last of 50 equal records of another log (offset 49).
    let other = tmp.path().join("other");
    let o = spool::storage::Log::open(
        Arc::clone(&disk),
        &other,
        cfg.clone(),
        RecoveryMode::default(),
    )
    .expect("open other");
    for _ in 0..50 {
        o.append(&[NewMessage::from_value("x".repeat(20))])
            .expect("append");
    }
    drop(o);
    let other_bytes = std::fs::read(other.join("00000000000000000000.log")).expect("read");
    let record = spool::storage::record::HEADER_LEN + 20;
    let embedded = other_bytes[49 * record..50 * record].to_vec();

    let dir = tmp.path().join("t");
    let log = five_records(&disk, &dir, &cfg);
    let mut value = vec![b'p'; 100];
    value.extend_from_slice(&embedded);
    value.extend_from_slice(&[b'q'; 8000]);
    log.append(&[NewMessage::from_value(value)])
        .expect("append the carrier");
    drop(log);
    // The file's length as it was durable before the last record's end:
    // the record is cut just past the embedded one.
    let cut_at = (5 * record + spool::storage::record::HEADER_LEN + 100 + record + 10) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("00000000000000000000.log"))
        .expect("open segment")
        .set_len(cut_at)
        .expect("cut");
    let log = spool::storage::Log::open(Arc::clone(&disk), &dir, cfg, RecoveryMode::default())
        .expect("a torn tail opens in the default mode");
    assert_eq!(log.end().0, 5, "the torn record is cut");
    let offsets = offsets_in(&log);
    assert_eq!(offsets, [0, 1, 2, 3, 4]);
}

/// An index rebuilt at open is durable: entries an earlier power cut left
/// behind (for records it took, written again since at the same places,
/// with other timestamps) cannot come back with a later cut and pass their
/// checks.
#[test]
fn an_index_rebuilt_at_open_survives_a_power_cut() {
    let sim = Arc::new(SimDisk::new());
    let disk: Arc<dyn Storage> = sim.clone();
    let log = spool::storage::Log::open(
        Arc::clone(&disk),
        "/l",
        small(FsyncPolicy::Always),
        RecoveryMode::default(),
    )
    .expect("open");
    for i in 0..30u64 {
        let mut m = NewMessage::from_value(format!("{i:020}"));
        m.timestamp_ms = Some(1000 + i);
        log.append(&[m]).expect("append");
    }
    drop(log);
    let idx = std::path::Path::new("/l/00000000000000000000.idx");
    let tix = std::path::Path::new("/l/00000000000000000000.tix");
    // Lost hints: the next open rebuilds them from the log.
    sim.damage_truncate(idx, 0).expect("lose idx");
    sim.damage_truncate(tix, 0).expect("lose tix");
    let log = spool::storage::Log::open(
        Arc::clone(&disk),
        "/l",
        small(FsyncPolicy::Always),
        RecoveryMode::default(),
    )
    .expect("reopen");
    drop(log);
    let rebuilt = (
        sim.read_file(idx).expect("idx"),
        sim.read_file(tix).expect("tix"),
    );
    assert!(!rebuilt.0.is_empty() && !rebuilt.1.is_empty());
    sim.power_cut(None);
    assert_eq!(
        (
            sim.read_file(idx).expect("idx"),
            sim.read_file(tix).expect("tix")
        ),
        rebuilt,
        "the rebuilt index is what the disk holds after a power cut"
    );
}

/// The log at `/t` on `disk`.
/// The offset of every record `log` holds, in order.
fn offsets_in(log: &spool::storage::Log) -> Vec<u64> {
    log.read(Offset(0), usize::MAX, usize::MAX)
        .expect("read")
        .iter()
        .map(|m| m.offset.0)
        .collect()
}

fn open_t(disk: &Arc<dyn Storage>, cfg: &LogConfig) -> spool::storage::Log {
    spool::storage::Log::open(Arc::clone(disk), "/t", cfg.clone(), RecoveryMode::default())
        .expect("open")
}

/// A message written two minutes ago (its producer's timestamp says so).
fn two_minutes_old() -> NewMessage {
    let mut old = NewMessage::from_value("old");
    old.timestamp_ms = Some(spool::storage::log::now_ms() - 120_000);
    old
}

/// `segment_ms` counts a segment's age from its first record, not from the
/// last open: a topic reopened (an idle close, a restart) more often than
/// `segment_ms` still rolls, so retention can drop its old records.
#[test]
fn segment_ms_counts_from_the_first_record_across_a_reopen() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let cfg = LogConfig {
        segment_ms: Some(60_000),
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let open = || open_t(&disk, &cfg);
    let log = open();
    log.append(&[two_minutes_old()]).expect("append");
    log.append(&[NewMessage::from_value("new")])
        .expect("append");
    assert_eq!(log.stats().segments, 1, "a new segment is young");
    log.close().expect("close");
    let log = open();
    log.append(&[NewMessage::from_value("after the reopen")])
        .expect("append");
    assert_eq!(
        log.stats().segments,
        2,
        "the segment, two minutes old, rolled"
    );
}

/// Fills what room `disk` has left with a file of another program's.
fn take_the_room_left(disk: &Arc<dyn Storage>) {
    use spool::storage::io::OpenMode;
    disk.create_dir_all(std::path::Path::new("/other"))
        .expect("dir");
    let fill = disk
        .open(std::path::Path::new("/other/fill"), OpenMode::CreateNew)
        .expect("file");
    let (mut size, mut step) = (0u64, 65536u64);
    while step > 0 {
        if fill.allocate(size + step).is_ok() {
            size += step;
        } else {
            step /= 2;
        }
    }
}

/// Retention frees room on a full disk: with no room for the checkpoint
/// that leaves the dropped segments out, the checkpoint goes instead (as at
/// an open on a full disk), and the segments after it.
#[test]
fn retention_frees_room_on_a_full_disk() {
    let sim = Arc::new(SimDisk::new());
    let disk: Arc<dyn Storage> = sim.clone();
    let cfg = LogConfig {
        segment_bytes: 4096,
        retention_bytes: Some(4096),
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = spool::storage::Log::open(
        Arc::clone(&disk),
        "/t",
        cfg.clone(),
        RecoveryMode::default(),
    )
    .expect("open");
    sim.set_capacity(Some(64 * 1024));
    while log
        .append(&[NewMessage::from_value("z".repeat(100))])
        .is_ok()
    {}
    take_the_room_left(&disk);
    let end = log.end();
    let dropped = log.enforce_retention(u64::MAX / 2).expect("retention");
    assert!(!dropped.is_empty(), "retention dropped segments");
    log.append(&[NewMessage::from_value("after")])
        .expect("room again");
    drop(log);
    let log = spool::storage::Log::open(Arc::clone(&disk), "/t", cfg, RecoveryMode::default())
        .expect("reopen");
    assert_eq!(log.end().0, end.0 + 1, "nothing after the start lost");
}

/// A log `/t` of 4 KiB segments (`fsync=always`) on a 64 KiB simulated
/// disk, filled by appends, the room left then taken by another file.
fn a_full_log_of_4_kib_segments() -> (Arc<dyn Storage>, LogConfig, spool::storage::Log) {
    let sim = Arc::new(SimDisk::new());
    let disk: Arc<dyn Storage> = sim.clone();
    let cfg = LogConfig {
        segment_bytes: 4096,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = open_t(&disk, &cfg);
    sim.set_capacity(Some(64 * 1024));
    while log
        .append(&[NewMessage::from_value("z".repeat(100))])
        .is_ok()
    {}
    take_the_room_left(&disk);
    (disk, cfg, log)
}

/// Compaction frees room on a full disk where whole sealed segments have
/// nothing live (every record deleted): with no room for the checkpoint
/// that leaves them out, the checkpoint goes instead, as for retention, and
/// the segments after it. Every record kept stays, after a reopen too.
#[test]
fn compaction_removes_dead_segments_on_a_full_disk() {
    let (disk, cfg, log) = a_full_log_of_4_kib_segments();
    log.store_checkpoint(None, false)
        .expect_err("no room for a checkpoint");
    // The second and third segments hold nothing live.
    let segments = log.segments();
    assert!(segments.len() > 4, "{} segments", segments.len());
    let dead = segments[1].base()..segments[3].base();
    let end = log.end();
    let stats = log
        .compact(&|r| !dead.contains(&r.offset), &mut |_| {})
        .expect("compaction on a full disk");
    assert_eq!(stats.segments_deleted, 2, "{stats:?}");
    log.append(&[NewMessage::from_value("after")])
        .expect("room again");
    drop(log);
    let log = open_t(&disk, &cfg);
    assert_eq!(log.end().0, end.0 + 1, "nothing after them lost");
    let kept = offsets_in(&log);
    let expected: Vec<u64> = (0..=end.0).filter(|o| !dead.contains(o)).collect();
    assert_eq!(kept, expected);
}

/// On a full disk, a pass where no record hides another leaves a run it
/// has no room to copy as it was and still removes the dead segments after
/// it; a keyed pass, whose later records may hide earlier ones, stops at
/// that copy and removes nothing after it.
#[test]
fn a_full_disk_leaves_a_run_it_cannot_copy_and_removes_the_dead_segments_after_it() {
    let (disk, cfg, log) = a_full_log_of_4_kib_segments();
    let segments = log.segments();
    assert!(segments.len() > 4, "{} segments", segments.len());
    // The first segment loses one record (a copy of the rest is needed);
    // the second and third lose all.
    let dead = segments[1].base()..segments[3].base();
    let keep =
        |r: &spool::storage::compact::RecordInfo<'_>| r.offset != 0 && !dead.contains(&r.offset);
    let keyed = log.compact(&keep, &mut |_| {});
    assert!(
        matches!(keyed, Err(Error::Full { .. })),
        "a keyed pass stops at the copy: {keyed:?}"
    );
    assert_eq!(log.segments().len(), segments.len(), "and removes nothing");
    let stats = log
        .compact_independent(&keep, &mut |_| {})
        .expect("a pass past the copy it has no room for");
    assert_eq!(stats.segments_deleted, 2, "{stats:?}");
    assert_eq!(stats.segments_rewritten, 0, "{stats:?}");
    // Offset 0 stayed with the run left as it was: not counted removed.
    assert_eq!(
        stats.records_removed,
        dead.end - dead.start,
        "only what went counts as removed: {stats:?}"
    );
    let end = log.end();
    drop(log);
    let log = open_t(&disk, &cfg);
    let kept = offsets_in(&log);
    let expected: Vec<u64> = (0..end.0).filter(|o| !dead.contains(o)).collect();
    assert_eq!(kept, expected, "the first segment as it was, offset 0 too");
}

/// A quiet topic's records go once they are past `retention_ms`: its
/// active segment rolls in a retention pass when it is `segment_ms` old,
/// not only at the next write, and the pass drops it.
#[test]
fn a_quiet_segment_rolls_for_its_age_and_retention_drops_it() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let cfg = LogConfig {
        segment_ms: Some(60_000),
        retention_ms: Some(60_000),
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let open = || open_t(&disk, &cfg);
    let log = open();
    // Then nothing.
    log.append(&[two_minutes_old()]).expect("append");
    log.close().expect("close");
    let log = open();
    assert!(
        log.retention_due_ms().is_some(),
        "a closed topic's retention is due for the roll"
    );
    log.enforce_retention(spool::storage::log::now_ms())
        .expect("retention");
    assert_eq!(log.end().0, 1, "no offset is given again");
    assert_eq!(log.start().0, 1, "the quiet record went");
    assert!(
        log.read(Offset(0), 10, 1 << 20).expect("read").is_empty(),
        "nothing left to read"
    );
}

/// One flipped bit in a record's length field (it now claims more than the
/// file holds) is damage when valid records follow it: they were
/// acknowledged, and the log refuses to open rather than cut them.
#[test]
fn a_damaged_length_field_followed_by_valid_records_is_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk: Arc<dyn Storage> = Arc::new(OsStorage);
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let dir = tmp.path().join("t");
    let log = five_records(&disk, &dir, &cfg);
    drop(log);
    let record = spool::storage::record::HEADER_LEN + 20;
    let path = dir.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).expect("read");
    // Offset 2's length field, + 65 536.
    bytes[2 * record + 6] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let opened = spool::storage::Log::open(Arc::clone(&disk), &dir, cfg, RecoveryMode::default());
    let err = opened.expect_err("damage followed by acknowledged records is not a torn tail");
    assert!(err.to_string().contains("valid records follow it"), "{err}");
}

/// In a sealed segment, skip-damaged quarantines a record whose length
/// field is damaged and keeps the valid records after it.
#[test]
fn skip_damaged_keeps_the_records_after_a_damaged_length_in_a_sealed_segment() {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk: Arc<dyn Storage> = Arc::new(OsStorage);
    let dir = tmp.path().join("t");
    let log = spool::storage::Log::open(
        Arc::clone(&disk),
        &dir,
        small(FsyncPolicy::Always),
        RecoveryMode::default(),
    )
    .expect("open");
    for i in 0..200 {
        log.append(&[msg(i)]).expect("append");
    }
    drop(log);
    let path = dir.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).expect("read");
    let mut starts = Vec::new();
    let mut pos = 0usize;
    while pos + spool::storage::record::HEADER_LEN <= bytes.len() && bytes[pos] == 0xA7 {
        starts.push(pos);
        let len: [u8; 4] = bytes[pos + 4..pos + 8].try_into().expect("4 bytes");
        pos += u32::from_le_bytes(len) as usize;
    }
    let n = starts.len();
    // The third last record's length, + 2048: past the segment's end.
    bytes[starts[n - 3] + 5] ^= 0x08;
    std::fs::write(&path, &bytes).expect("write");
    let log = spool::storage::Log::open(
        Arc::clone(&disk),
        &dir,
        small(FsyncPolicy::Always),
        RecoveryMode::SkipDamaged,
    )
    .expect("opens, skipping the damage");
    let offsets: Vec<u64> = log
        .read(Offset(0), 100_000, 1 << 30)
        .expect("read")
        .iter()
        .map(|m| m.offset.0)
        .take_while(|&o| o < n as u64)
        .collect();
    assert!(
        offsets.contains(&(n as u64 - 2)) && offsets.contains(&(n as u64 - 1)),
        "the valid records after the damaged one are kept: {offsets:?}"
    );
}

/// A segment named past every offset a producer could reach (a file put
/// there by hand) takes messages up to the last offset there is and then
/// refuses, naming why, instead of handing out offset 0 again.
#[test]
fn offsets_end_at_the_last_one_there_is_and_never_wrap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("l");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join(format!("{:020}.log", u64::MAX - 2)), b"").expect("segment");
    let storage: Arc<dyn Storage> = Arc::new(OsStorage);
    let log =
        spool::storage::Log::open(storage, &dir, LogConfig::default(), RecoveryMode::default())
            .expect("open");
    let first = log.append(&[msg(0), msg(1)]).expect("the last two offsets");
    assert_eq!(first.first, Offset(u64::MAX - 2));
    let e = log.append(&[msg(2)]).expect_err("no offset is left");
    assert!(
        matches!(&e, Error::LimitReached(m) if m.contains("no offsets left for 1 more message: its next offset is 18446744073709551615, and offsets end at 18446744073709551615")),
        "{e}"
    );
    let all = log.read(Offset(0), 10, 1 << 20).expect("read");
    assert_eq!(
        all.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![Offset(u64::MAX - 2), Offset(u64::MAX - 1)],
        "nothing was stored at a wrapped offset"
    );
}

/// A log at `dir` on the real disk holding `messages`, all written past
/// its recovery point (the open's checkpoint) under `fsync` and left as a
/// crash leaves it: its first segment's path and bytes.
fn crashed_log(
    dir: &std::path::Path,
    fsync: FsyncPolicy,
    messages: impl IntoIterator<Item = NewMessage>,
) -> (std::path::PathBuf, Vec<u8>) {
    let log = reopen_on_disk(dir, fsync).expect("open");
    for m in messages {
        log.append(&[m]).expect("append");
    }
    std::mem::forget(log);
    let path = dir.join("00000000000000000000.log");
    let bytes = std::fs::read(&path).expect("read");
    (path, bytes)
}

/// Opens the log at `dir` on the real disk under `fsync`, default mode.
fn reopen_on_disk(dir: &std::path::Path, fsync: FsyncPolicy) -> spool::Result<spool::storage::Log> {
    let config = LogConfig {
        fsync,
        ..LogConfig::default()
    };
    spool::storage::Log::open(Arc::new(OsStorage), dir, config, RecoveryMode::default())
}

/// Under `fsync=interval`/`never` a power cut may keep a later page of the
/// active segment and lose an earlier one, which then reads as zeros. Past
/// the recovery point, such a lost sector with valid records after it is
/// set aside by the default mode (quarantined, its offset never reused) and
/// the records after it kept. The same bytes are refused as damage when a
/// bit flip made them (no zero sector), under `fsync=always` (every
/// acknowledged record was synced), and without a checkpoint (no recovery
/// point bounds what may be unsynced).
#[test]
fn lost_sectors_past_the_recovery_point_are_set_aside_under_a_relaxed_policy() {
    let big = |i: usize| NewMessage::from_value(format!("m{i:02}-{}", "v".repeat(1500)));
    // A log of 20 records written past its recovery point (the open's
    // checkpoint) and left as a crash leaves it, then `hurt` applied to the
    // record of offset 5: what the default mode's open answers.
    let case = |fsync: FsyncPolicy, hurt: &dyn Fn(&mut [u8], usize), drop_checkpoint: bool| {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("t");
        let (path, mut bytes) = crashed_log(&dir, fsync, (0..20).map(big));
        let at = bytes
            .windows(4)
            .position(|w| w == b"m05-")
            .expect("record 5");
        hurt(&mut bytes, at);
        std::fs::write(&path, &bytes).expect("write");
        if drop_checkpoint {
            std::fs::remove_file(dir.join("checkpoint")).expect("remove checkpoint");
        }
        let opened = reopen_on_disk(&dir, fsync);
        (tmp, opened)
    };
    // The first whole 512-byte sector inside record 5's value, zeroed.
    let lose_sector = |bytes: &mut [u8], at: usize| {
        let from = at.div_ceil(512) * 512;
        bytes[from..from + 512].fill(0);
    };
    let flip = |bytes: &mut [u8], at: usize| bytes[at + 600] ^= 0x40;

    let (_tmp, opened) = case(FsyncPolicy::Never, &lose_sector, false);
    let log = opened.expect("a lost sector past the recovery point is set aside");
    let report = log.recovery_report().clone();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(report.quarantined[0].offsets, Some(5..6), "{report:?}");
    assert!(
        report.quarantined[0].detail.contains("out of order"),
        "{report:?}"
    );
    let read = log.read(Offset(0), 100, 1 << 20).expect("read");
    let offsets: Vec<u64> = read.iter().map(|m| m.offset.0).collect();
    let want: Vec<u64> = (0..20).filter(|&o| o != 5).collect();
    assert_eq!(offsets, want, "every record but the lost one");
    let next = log.append(&[big(20)]).expect("append");
    assert_eq!(next.first, Offset(20), "no offset reused");
    drop(log);

    for (what, fsync, hurt, no_checkpoint) in [
        (
            "a flipped bit",
            FsyncPolicy::Never,
            &flip as &dyn Fn(&mut [u8], usize),
            false,
        ),
        ("fsync=always", FsyncPolicy::Always, &lose_sector, false),
        (
            "no checkpoint",
            FsyncPolicy::Interval(1000),
            &lose_sector,
            true,
        ),
    ] {
        let (_tmp, opened) = case(fsync, hurt, no_checkpoint);
        let err = opened.expect_err(what);
        assert!(
            matches!(err, Error::Corruption(_)) && err.to_string().contains("skip-damaged"),
            "{what}: {err}"
        );
    }
}

/// A file opened for reading only takes no write on either backend, so a
/// write through such a handle fails in the simulated-disk tests as it
/// would on the real disk.
#[test]
fn a_file_opened_read_only_takes_no_write_on_either_backend() {
    use spool::storage::io::OpenMode;
    for (storage, tmp) in backends() {
        let dir = tmp.path().join("d");
        storage.create_dir_all(&dir).expect("mkdir");
        let path = dir.join("f");
        let file = storage.open(&path, OpenMode::CreateNew).expect("create");
        file.write_at(0, b"hello").expect("write");
        drop(file);
        let read_only = storage.open(&path, OpenMode::ReadOnly).expect("open");
        let mut buf = [0u8; 5];
        read_only.read_at(0, &mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        assert!(read_only.write_at(0, b"HELLO").is_err(), "{storage:?}");
        assert!(read_only.set_len(1).is_err(), "{storage:?}");
    }
}

/// A roll whose new segment was made but whose sealed segment cannot be
/// mapped anew (the process out of address space for a moment) keeps the
/// map the segment was written through: the log stays writable and every
/// record readable. Before, the log turned read-only until a restart,
/// answering as if a sync had failed.
#[test]
fn a_seal_out_of_address_space_keeps_the_log_writable() {
    let disk = Arc::new(SimDisk::new());
    let open = small_sim_log(&disk, FsyncPolicy::Never);
    let log = open().expect("open");
    let m = |i: u8| NewMessage::from_value(vec![i; 100]);
    let mut i = 0u8;
    // The seal's sync of the old segment comes after the new one exists:
    // from there on, no new map.
    {
        let faulty = Arc::clone(&disk);
        disk.set_hook(Some(Arc::new(move |op, path| {
            let logs = faulty
                .list_dir(std::path::Path::new("/l"))
                .map(|n| n.iter().filter(|n| n.ends_with(".log")).count())
                .unwrap_or(0);
            if op == SimOp::SyncData && path.ends_with("00000000000000000000.log") && logs == 2 {
                faulty.set_fault(SimFault::OutOfMemory, true);
            }
        })));
    }
    while log.stats().segments < 2 {
        log.append(&[m(i)]).expect("append across the roll");
        i += 1;
    }
    disk.set_hook(None);
    disk.set_fault(SimFault::OutOfMemory, false);
    for _ in 0..3 {
        log.append(&[m(i)])
            .expect("the log takes writes after the roll");
        i += 1;
    }
    let read = log.read(Offset(0), 1000, 1 << 20).expect("read");
    assert_eq!(read.len(), usize::from(i), "every record");
    for (n, msg) in read.iter().enumerate() {
        assert_eq!(msg.value, Bytes::from(vec![n as u8; 100]));
    }
    log.close().expect("close");
    let log = open().expect("the log opens again");
    assert_eq!(log.stats().end, Offset(u64::from(i)));
}

/// A lost sector that begins in zero bytes at the end of the record before
/// (which therefore still validates) is a lost write too: the sector is
/// found from the start of the bad bytes' own sector.
#[test]
fn a_lost_sector_beginning_in_the_zero_tail_of_a_valid_record_is_set_aside() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("t");
    // Values ending in 300 zero bytes: no whole sector of zeros of their own.
    let (path, mut bytes) = crashed_log(
        &dir,
        FsyncPolicy::Never,
        (0..40u8).map(|i| {
            let mut value = vec![b'a' + i % 26; 1400];
            value.extend_from_slice(&[0u8; 300]);
            NewMessage::from_value(value)
        }),
    );
    let mut starts = Vec::new();
    let mut pos = 0;
    while let Ok(spool::storage::record::Frame::Record(r)) =
        spool::storage::record::decode(&bytes[pos..], u32::MAX)
    {
        starts.push(pos);
        pos += r.len as usize;
    }
    // A record (not the first or the last few) whose sector begins in the
    // zero tail of the record before.
    let k = (3..starts.len() - 3)
        .find(|&k| (1..=280).contains(&(starts[k] % 512)))
        .expect("test setup: a record starting early in a sector");
    let sector = starts[k] / 512 * 512;
    assert!(bytes[sector..starts[k]].iter().all(|&b| b == 0));
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&path, &bytes).expect("write");

    let log = reopen_on_disk(&dir, FsyncPolicy::Never).expect("the lost sector is set aside");
    let report = log.recovery_report().clone();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(
        report.quarantined[0].offsets,
        Some(k as u64..k as u64 + 1),
        "{report:?}"
    );
    let read = log.read(Offset(0), 100, 1 << 20).expect("read");
    assert_eq!(read.len(), 39, "every record but the lost one");
}

/// A group of writes puts its first bytes, those sharing a page with the
/// records before them, into the file last (so that a full disk never needs
/// that page rewritten to take the group back). A `kill -9` or power cut in
/// between leaves zeros from the last record exactly to the page boundary
/// and the rest of the group after them, none of it answered: the log opens
/// with the group cut like a torn tail, under every fsync policy, where
/// "zeros, then valid records" was refused as damage.
#[test]
fn writes_stopped_before_their_first_page_are_cut_like_a_torn_tail() {
    // Gaps under a 512-byte sector and over one (which `interval` and
    // `never` would otherwise set aside as pages lost out of order,
    // keeping the rest of a batch never answered without its first records).
    for (fsync, gap) in [
        (FsyncPolicy::Always, 200),
        (FsyncPolicy::Interval(3_600_000), 200),
        (FsyncPolicy::Interval(3_600_000), 3000),
        (FsyncPolicy::Never, 3000),
        // At a page boundary (here a segment's start) a whole page is held.
        (FsyncPolicy::Always, 4096),
        (FsyncPolicy::Never, 4096),
    ] {
        let sim = Arc::new(SimDisk::new());
        let disk: Arc<dyn Storage> = sim.clone();
        let cfg = LogConfig {
            segment_bytes: 1 << 20,
            fsync,
            ..LogConfig::default()
        };
        let open = || {
            spool::storage::Log::open(
                Arc::clone(&disk),
                "/data/topics/t",
                cfg.clone(),
                RecoveryMode::default(),
            )
        };
        let log = open().expect("open");
        // Committed records ending `gap` bytes short of a page boundary.
        let header = spool::storage::record::HEADER_LEN;
        let mut mark = 0usize;
        let mut committed = 0u64;
        while mark != 4096 - gap {
            let room = 4096 - gap - mark;
            let len = if room >= 1000 + 2 * header {
                1000
            } else {
                room
            };
            let m = NewMessage::from_value(vec![b'c'; len - header]);
            assert_eq!(spool::storage::record::encoded_len(&m), Some(len));
            mark += len;
            log.append(&[m]).expect("committed");
            committed += 1;
        }
        log.sync().expect("sync");
        log.store_checkpoint(None, false).expect("checkpoint");
        let group: Vec<NewMessage> = (0..20)
            .map(|i| NewMessage::from_value(vec![b'g' + i as u8 % 5; 900]))
            .collect();
        log.append(&group).expect("the group");
        drop(log);
        // As the file stood before the group's first page was written.
        let path = std::path::Path::new("/data/topics/t/00000000000000000000.log");
        sim.damage(path, mark as u64, &vec![0u8; gap])
            .expect("the first page unwritten");
        let data = DataDir::open(Arc::clone(&disk), "/data").expect("data dir");
        let report = spool::storage::verify::verify(&data, &mut |_| {}).expect("verify");
        assert!(
            report.damage.is_empty(),
            "{fsync:?} gap {gap}: {:?}",
            report.damage
        );
        assert_eq!(
            report.torn_tails.len(),
            1,
            "{fsync:?} gap {gap}: {report:?}"
        );
        drop(data);
        let log = open().unwrap_or_else(|e| panic!("{fsync:?} gap {gap}: the log opens: {e}"));
        assert_eq!(
            offsets_in(&log),
            (0..committed).collect::<Vec<_>>(),
            "{fsync:?} gap {gap}"
        );
        let kept = disk
            .list_dir(std::path::Path::new("/data/topics/t/quarantine"))
            .expect("the cut bytes are kept");
        assert_eq!(kept.len(), 1, "{fsync:?} gap {gap}: {kept:?}");
        let a = log
            .append(&[NewMessage::from_value("next")])
            .expect("appends go on");
        assert_eq!(a.first.0, committed, "{fsync:?} gap {gap}");
    }
}
