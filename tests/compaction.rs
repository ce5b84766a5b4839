//! Compaction reclaims what nobody needs without moving an offset: consumed
//! queues shrink, keyed topics keep the latest value per key, a crash at any
//! step of the swap loses nothing live, and online compaction does not
//! disturb producers and consumers.

mod common;

use proptest::prelude::*;
use spool::broker::topic::Position;
use spool::broker::{Cleanup, Registry, RegistryOptions, TopicConfig};
use spool::client::Received;
use spool::groups::GroupMode;
use spool::storage::checkpoint::Checkpoint;
use spool::storage::io::{OsStorage, SimDisk, SimFault, SimOp, Storage};
use spool::storage::verify::verify;
use spool::storage::{DataDir, FsyncPolicy, LogConfig, NewMessage, Offset};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn registry(storage: Arc<dyn Storage>, root: &str) -> Registry {
    Registry::open(
        DataDir::open(storage, root).expect("data dir"),
        RegistryOptions::default(),
    )
    .expect("registry")
}

#[test]
fn a_consumed_queue_shrinks_by_90_percent_and_keeps_its_unacked_messages_at_their_offsets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("data");
    let reg = registry(Arc::new(OsStorage), root.to_str().expect("utf-8"));
    let config = TopicConfig {
        delete_when_consumed: true,
        log: LogConfig {
            segment_bytes: 256 * 1024,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    };
    let topic = reg.create_topic("jobs", config).expect("topic");
    topic
        .create_group("workers", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let value = |i: u64| format!("job {i:06} {}", "x".repeat(80));
    for chunk in (0..100_000u64).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<NewMessage> = chunk
            .iter()
            .map(|&i| NewMessage::from_value(value(i)))
            .collect();
        topic.produce(&batch).expect("produce");
    }
    topic.log().sync().expect("sync");
    // A day ahead: the leases left unacked are still leases when they are
    // nacked, however long the loop took.
    let now = spool::storage::log::now_ms() + 86_400_000;
    loop {
        let fetched = reg
            .fetch_queue("jobs", "workers", "w", 5000, 16 << 20, now)
            .expect("fetch");
        if fetched.deliveries.is_empty() {
            break;
        }
        let acks: Vec<u64> = fetched
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .filter(|o| o % 1000 != 0)
            .collect();
        topic.ack("workers", &as_offsets(&acks)).expect("ack");
    }
    let before = dir_size(&root);
    let results = reg.compact(Some("jobs"), &mut |_| {}).expect("compact");
    let after = dir_size(&root);
    assert!(
        after * 10 <= before,
        "data dir went from {before} to {after} bytes"
    );
    let stats = &results[0].1;
    assert!(
        stats.records_removed >= 90_000 && stats.segments_rewritten + stats.segments_deleted > 0,
        "{stats:?}"
    );
    // What is left of the sealed segments (100 small messages) is merged
    // into one segment: one sealed and the active one remain.
    let logs = std::fs::read_dir(root.join("topics/jobs"))
        .expect("read_dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .count();
    assert!(
        logs <= 2 && stats.segments_merged > 0,
        "{logs} segment files after compaction: {stats:?}"
    );

    // The unacked messages come back, at their original offsets, byte-exact.
    let unacked: Vec<u64> = (0..100).map(|i| i * 1000).collect();
    assert_eq!(
        topic
            .nack("workers", &as_offsets(&unacked), 0)
            .expect("nack"),
        100
    );
    // nack stamps the wall clock, so fetch with a fresh one.
    let now = spool::storage::log::now_ms();
    let fetched = reg
        .fetch_queue("jobs", "workers", "w2", 1000, 16 << 20, now)
        .expect("fetch");
    let got: Vec<(u64, String)> = fetched
        .deliveries
        .iter()
        .map(|d| {
            (
                d.message.offset.0,
                String::from_utf8_lossy(&d.message.value).into_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = unacked.iter().map(|&o| (o, value(o))).collect();
    assert!(
        got == want,
        "unacked messages after compaction: got {} of {}, first {:?}",
        got.len(),
        want.len(),
        got.first()
    );
    // Produce and consume continue at the right next offset.
    let next = topic
        .produce(&[NewMessage::from_value("next")])
        .expect("produce");
    assert_eq!(next.first.0, 100_000);
    let fetched = reg
        .fetch_queue("jobs", "workers", "w2", 10, 1 << 20, now)
        .expect("fetch");
    assert_eq!(
        fetched
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .collect::<Vec<_>>(),
        vec![100_000]
    );
    // And everything still reopens and verifies after the swaps.
    drop(topic);
    drop(reg);
    let data = DataDir::open(Arc::new(OsStorage), &root).expect("reopen");
    assert!(verify(&data, &mut |_| {}).expect("verify").is_clean());
}

fn keyed_config() -> TopicConfig {
    TopicConfig {
        cleanup: Cleanup::Compact,
        delete_retention_ms: 1000,
        log: LogConfig {
            segment_bytes: 1024,
            index_interval_bytes: 128,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// A keyed topic keeps exactly the latest durable record per key in its
    /// sealed segments (plus everything in the active one), and a tombstone
    /// goes once older than its retention.
    #[test]
    fn keyed_topics_keep_the_latest_value_per_key(
        ops in proptest::collection::vec((0u8..6, any::<bool>(), 0u64..3000, 0usize..40), 1..120),
    ) {
        let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
        let reg = registry(Arc::clone(&disk), "/data");
        let topic = reg.create_topic("kv", keyed_config()).expect("topic");
        let mut all = Vec::new();
        for (key, tombstone, ts, len) in &ops {
            let value = if *tombstone { Vec::new() } else { vec![b'v'; *len + 1] };
            let m = NewMessage { timestamp_ms: Some(*ts), ..NewMessage::from_value(value).with_key(vec![b'k', *key]) };
            let a = topic.produce(std::slice::from_ref(&m)).expect("produce");
            all.push((a.first.0, m));
        }
        let active_base = topic.log().segments().last().expect("active").base();
        // Under fsync=never only sealed segments are durable, and only a
        // durable record supersedes another.
        let latest: BTreeMap<Vec<u8>, u64> = all
            .iter()
            .filter(|(o, _)| *o < active_base)
            .map(|(o, m)| (m.key.clone().expect("key").to_vec(), *o))
            .collect();
        reg.compact(Some("kv"), &mut |_| {}).expect("compact");
        let expected: Vec<u64> = all
            .iter()
            .filter(|(o, m)| {
                if *o >= active_base {
                    return true;
                }
                let newest = latest[&m.key.clone().expect("key").to_vec()] == *o;
                // Timestamps here are far in the past: every tombstone in a
                // sealed segment is past its 1 s retention.
                let expired_tombstone = m.value.is_empty();
                newest && !expired_tombstone
            })
            .map(|(o, _)| *o)
            .collect();
        let got: Vec<u64> = topic.read(Offset(0), 10_000, 1 << 20).expect("read").iter().map(|m| m.offset.0).collect();
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn a_power_cut_at_every_sync_of_compaction_loses_nothing_live() {
    // A third of the records go: mostly segments rewritten on their own.
    power_cut_at_every_sync_of_compaction(|o| o < 30 || o % 3 == 0, false);
}

#[test]
fn a_power_cut_at_every_sync_of_a_merging_compaction_loses_nothing_live() {
    // Four in five go: runs of segments merge into one.
    power_cut_at_every_sync_of_compaction(|o| o % 5 != 0, true);
}

/// `merges`: the compaction must merge segments (checked once it finishes).
fn power_cut_at_every_sync_of_compaction(doomed: fn(u64) -> bool, merges: bool) {
    let mut n = 1u64;
    loop {
        let disk = Arc::new(SimDisk::new());
        let storage: Arc<dyn Storage> = disk.clone();
        let reg = registry(Arc::clone(&storage), "/data");
        let topic = reg.create_topic("t", small_segments()).expect("topic");
        let mut live = BTreeMap::new();
        produce_and_delete(&topic, 120, doomed, &mut live).expect("traffic");
        disk.power_off_after_syncs(Some(disk.sync_count() + n));
        let stats = reg.compact(Some("t"), &mut |_| {});
        let finished = stats.is_ok() && !disk.is_powered_off();
        if let (true, Ok(stats)) = (finished, &stats) {
            let merged: u64 = stats.iter().map(|(_, s)| s.segments_merged).sum();
            assert!(merged > 0 || !merges, "nothing merged: {stats:?}");
        }
        drop(topic);
        drop(reg);
        disk.power_cut(if n.is_multiple_of(2) { Some(n) } else { None });

        let reg = registry(Arc::clone(&storage), "/data");
        let topic = reg.topic("t").expect("topic");
        let got = values(&topic);
        assert_eq!(got, live, "power cut after sync {n} of compaction");
        let report = verify(reg.data(), &mut |_| {}).expect("verify");
        assert!(
            report.is_clean(),
            "power cut after sync {n}: {:?}",
            report.damage
        );
        if finished {
            assert!(n > 3, "compaction did real work across several syncs");
            break;
        }
        n += 1;
        assert!(n < 200, "compaction should finish");
    }
}

/// The segment files of topic `t` under `root`, oldest first.
fn segment_logs(root: &Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(root.join("topics/t"))
        .expect("read_dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs
}

/// A topic `t` under `root` of 60 messages on 1 KiB segments, stopped:
/// what was written by offset, the first three segment files (a, b, c),
/// and where a merge of a and b (every offset below c's base) is staged as
/// a `.swap`.
struct ThreeSegments {
    want: BTreeMap<u64, String>,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    /// The file stems (bases) of a and c.
    a_stem: String,
    c_stem: String,
    swap: std::path::PathBuf,
    /// What a merge of a and b copies: both files, one after the other.
    merged: Vec<u8>,
}

fn three_segments(root: &Path) -> ThreeSegments {
    let config = TopicConfig {
        log: LogConfig {
            segment_bytes: 1024,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    };
    let mut want = BTreeMap::new();
    {
        let reg = registry(Arc::new(OsStorage), root.to_str().expect("utf-8"));
        let topic = reg.create_topic("t", config).expect("topic");
        for i in 0..60u64 {
            let value = format!("message {i:03} {}", "m".repeat(20));
            let a = topic
                .produce(&[NewMessage::from_value(value.clone())])
                .expect("produce");
            want.insert(a.first.0, value);
        }
    }
    let logs = segment_logs(root);
    assert!(logs.len() >= 4, "{logs:?}");
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned);
    let (a_stem, c_stem) = (stem(&logs[0]).expect("name"), stem(&logs[2]).expect("name"));
    let mut merged = std::fs::read(&logs[0]).expect("read a");
    merged.extend(std::fs::read(&logs[1]).expect("read b"));
    ThreeSegments {
        merged,
        want,
        a: logs[0].clone(),
        b: logs[1].clone(),
        swap: root.join(format!("topics/t/{a_stem}.log.{c_stem}.swap")),
        a_stem,
        c_stem,
    }
}

/// A broker stopped mid-merge (the copy of two segments durable as a
/// `.swap`, the second segment's files partly removed) finishes the merge
/// when it opens; a `.swap` whose first segment retention removed is dropped.
#[test]
fn an_interrupted_merge_is_completed_on_open_and_a_stale_one_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("data");
    let root_str = root.to_str().expect("utf-8");
    let ThreeSegments {
        want,
        a,
        b,
        a_stem,
        c_stem,
        swap,
        merged,
    } = three_segments(&root);
    let (a, b) = (&a, &b);
    // The merged copy of a and b, covering every offset below c's base.
    std::fs::write(&swap, &merged).expect("write swap");
    std::fs::remove_file(b.with_extension("idx")).expect("remove b.idx");
    // What the next start completes is a note to verify, not damage.
    {
        let data = DataDir::open(Arc::new(OsStorage), &root).expect("open");
        let report = verify(&data, &mut |_| {}).expect("verify");
        assert!(report.is_clean(), "{:?}", report.damage);
        assert!(
            report.notes.iter().any(|n| n.file == swap),
            "{:?}",
            report.notes
        );
    }

    let reg = registry(Arc::new(OsStorage), root_str);
    let topic = reg.topic("t").expect("topic");
    let got: BTreeMap<u64, String> = topic
        .read(Offset(0), 10_000, 1 << 20)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset.0, String::from_utf8_lossy(&m.value).into_owned()))
        .collect();
    assert_eq!(got, want, "every record once, at its offset");
    assert!(!swap.exists() && !b.exists(), "the merge was completed");
    assert_eq!(std::fs::read(a).expect("read a"), merged);
    let report = verify(reg.data(), &mut |_| {}).expect("verify");
    assert!(report.is_clean(), "{:?}", report.damage);
    drop(topic);
    drop(reg);

    // A copy of segments that are gone (retention) must not bring them back.
    // Retention takes a segment out of the checkpoint before removing it.
    let stale = root.join(format!("topics/t/{}.log.{c_stem}.swap", "0".repeat(20)));
    std::fs::rename(a, &stale).expect("stash a as a stale swap");
    let dir = root.join("topics/t");
    let mut checkpoint = Checkpoint::load(&OsStorage, &dir)
        .expect("load checkpoint")
        .expect("a checkpoint");
    let a_base: u64 = a_stem.parse().expect("base");
    checkpoint.segments.retain(|&b| b != a_base);
    checkpoint
        .store(&OsStorage, &dir)
        .expect("store checkpoint");
    let reg = registry(Arc::new(OsStorage), root_str);
    let topic = reg.topic("t").expect("topic");
    let first = topic.read(Offset(0), 1, 1 << 20).expect("read");
    assert_eq!(
        first.first().map(|m| m.offset.0),
        c_stem.parse::<u64>().ok(),
        "the log starts at c"
    );
    assert!(!stale.exists(), "the stale copy was dropped");
}

/// A compaction copy that is damaged (a bit flipped after it was synced)
/// is never taken for the segments it copies: while they are all in place,
/// `verify` notes it and the next open removes it, losing nothing; once
/// the completion removed some of them, it is the only copy of their
/// records, so `verify` reports damage and the open refuses, naming it,
/// unless started with `skip-damaged`, which gives up just the damaged
/// record. Before, the open completed the swap blindly: the intact
/// originals were deleted and the damaged copy put in their place.
#[test]
fn a_damaged_compaction_copy_never_replaces_intact_segments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("data");
    let root_str = root.to_str().expect("utf-8");
    let ThreeSegments {
        want,
        a,
        b,
        swap,
        mut merged,
        ..
    } = three_segments(&root);
    // One bit of a value in b's part of the copy.
    let flip = merged.len() - 10;
    merged[flip] ^= 0x10;
    let read_all = |reg: &Registry| -> BTreeMap<u64, String> {
        reg.topic("t")
            .expect("topic")
            .read(Offset(0), 10_000, 1 << 20)
            .expect("read")
            .into_iter()
            .map(|m| (m.offset.0, String::from_utf8_lossy(&m.value).into_owned()))
            .collect()
    };

    // Every segment in place: a note, then the copy goes. A flipped bit,
    // an empty copy, one of zeros, one with zeros after its records.
    let mut zero_tail = merged.clone();
    zero_tail.truncate(merged.len() / 2);
    zero_tail.resize(merged.len(), 0);
    for (what, copy) in [
        ("a flipped bit", merged.clone()),
        ("empty", Vec::new()),
        ("zeros", vec![0u8; merged.len()]),
        ("zeros after some records", zero_tail),
    ] {
        std::fs::write(&swap, &copy).expect("write swap");
        {
            let data = DataDir::open(Arc::new(OsStorage), &root).expect("open");
            let report = verify(&data, &mut |_| {}).expect("verify");
            assert!(report.is_clean(), "{what}: {:?}", report.damage);
            assert!(
                report
                    .notes
                    .iter()
                    .any(|n| n.file == swap && n.detail.contains("damaged")),
                "{what}: {:?}",
                report.notes
            );
        }
        let reg = registry(Arc::new(OsStorage), root_str);
        assert_eq!(
            read_all(&reg),
            want,
            "{what}: nothing lost to the damaged copy"
        );
        assert!(!swap.exists(), "{what}: the damaged copy was removed");
        assert!(a.exists() && b.exists(), "{what}: the originals stay");
    }

    // The completion under way (a's hints and b gone): the copy is all
    // there is of b's records.
    std::fs::write(&swap, &merged).expect("write swap");
    for gone in [a.with_extension("idx"), a.with_extension("tix"), b.clone()] {
        std::fs::remove_file(&gone).expect("remove");
    }
    for ext in ["idx", "tix"] {
        let _ = std::fs::remove_file(b.with_extension(ext));
    }
    {
        let data = DataDir::open(Arc::new(OsStorage), &root).expect("open");
        let report = verify(&data, &mut |_| {}).expect("verify");
        assert!(
            report.damage.iter().any(|d| d.file == swap),
            "damage named in the copy: {:?}",
            report.damage
        );
    }
    {
        let reg = Registry::open(
            DataDir::open(Arc::new(OsStorage), root_str).expect("data dir"),
            RegistryOptions::default(),
        );
        let refused = match reg {
            Err(e) => e.to_string(),
            Ok(reg) => match reg.topic("t") {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a topic whose only copy of some records is damaged opened"),
            },
        };
        assert!(
            refused.contains(&*swap.to_string_lossy()) && refused.contains("skip-damaged"),
            "the refusal names the copy and the way out: {refused}"
        );
        assert!(
            swap.exists() && a.exists(),
            "nothing removed by the refusal"
        );
    }
    let reg = Registry::open(
        DataDir::open(Arc::new(OsStorage), root_str).expect("data dir"),
        RegistryOptions {
            recovery: spool::storage::RecoveryMode::SkipDamaged,
            ..RegistryOptions::default()
        },
    )
    .expect("registry under skip-damaged");
    let got = read_all(&reg);
    let lost: Vec<u64> = want
        .keys()
        .filter(|o| !got.contains_key(o))
        .copied()
        .collect();
    assert_eq!(
        lost.len(),
        1,
        "only the damaged record is given up: {lost:?}"
    );
    assert!(
        got.iter().all(|(o, v)| want.get(o) == Some(v)),
        "what is read is what was written"
    );
}

/// A compaction copy whose name puts the end of its run where no segment
/// starts (inside a segment, or past the active one) is no copy to trust:
/// while the segments are all in place it is removed, nothing lost. Before,
/// it was completed, removing every segment below that end, the active one
/// too. And a copy whose first segment is missing though the checkpoint
/// lists it (not retention's doing) is left in place while the open
/// refuses, naming the segment: before, it was deleted as retention's
/// leftover, and with it the only copy of those records.
#[test]
fn a_compaction_copy_is_completed_only_over_the_run_its_name_gives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("data");
    let root_str = root.to_str().expect("utf-8");
    let ThreeSegments {
        want,
        a,
        a_stem,
        c_stem,
        swap,
        merged,
        ..
    } = three_segments(&root);
    let c_base: u64 = c_stem.parse().expect("base");
    for until in [c_base - 1, c_base + 5, u64::MAX / 2] {
        let odd = root.join(format!("topics/t/{a_stem}.log.{until:020}.swap"));
        std::fs::write(&odd, &merged).expect("write swap");
        let reg = registry(Arc::new(OsStorage), root_str);
        assert_eq!(
            values(&reg.topic("t").expect("topic")),
            want,
            "until {until}"
        );
        assert!(!odd.exists(), "until {until}: removed");
    }

    // The first segment gone by hand, its copy whole.
    std::fs::write(&swap, &merged).expect("write swap");
    std::fs::remove_file(&a).expect("remove a");
    let reg = Registry::open(
        DataDir::open(Arc::new(OsStorage), root_str).expect("data dir"),
        RegistryOptions::default(),
    )
    .expect("registry");
    let refused = reg
        .topic("t")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains(&*a.to_string_lossy()) && refused.contains("missing"),
        "the missing segment is named: {refused}"
    );
    assert!(swap.exists(), "the copy is left in place");
}

/// The broker writes a checkpoint every second, also while a compaction
/// swap retires the segments it merged: that checkpoint must not list them
/// (their files are going), or a crash then leaves a topic that refuses to
/// open ("segment file is missing: the log's checkpoint lists it").
#[test]
fn a_checkpoint_during_a_swap_does_not_list_what_it_retires() {
    let disk = Arc::new(SimDisk::new());
    let open = || {
        Registry::open(
            DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/data").expect("lock"),
            RegistryOptions::default(),
        )
        .expect("registry opens")
    };
    let reg = open();
    let topic = reg.create_topic("p", small_segments()).expect("topic");
    for i in 0..60u64 {
        let value = format!("message {i:03} {}", "m".repeat(60));
        topic
            .produce(&[NewMessage::from_value(value)])
            .expect("produce");
    }
    let active = topic
        .log()
        .segments()
        .last()
        .map(|s| s.base())
        .expect("a segment");
    // Most of each sealed segment deleted: runs of them merge.
    let doomed: Vec<Offset> = (0..active).filter(|o| o % 8 != 1).map(Offset).collect();
    topic.delete(&doomed).expect("delete");
    let want = values(&topic);
    let checkpointing = Arc::clone(&topic);
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = Arc::clone(&fired);
    disk.set_hook(Some(Arc::new(move |op, path| {
        if op == SimOp::Remove
            && path.extension().is_some_and(|e| e == "log")
            && !once.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // The broker's periodic checkpoint, at this moment.
            checkpointing.checkpoint().expect("checkpoint");
        }
    })));
    let stats = topic
        .compact(spool::storage::log::now_ms(), &mut |_| {})
        .expect("compact");
    disk.set_hook(None);
    assert!(stats.segments_merged > 0, "a run was merged: {stats:?}");
    assert!(
        fired.load(std::sync::atomic::Ordering::SeqCst),
        "a merged segment's file was removed"
    );
    drop(topic);
    drop(reg);
    disk.power_cut(None);
    let reg = open();
    let topic = reg.topic("p").expect("the topic opens after the crash");
    assert_eq!(values(&topic), want, "every live message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_compaction_disturbs_no_producer_or_consumer() {
    use spool::client::{Client, FetchOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &[]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    let config = spool::protocol::pb::TopicConfig {
        segment_bytes: Some(16 * 1024),
        delete_when_consumed: Some(true),
        fsync: Some("interval:10".into()),
        ..Default::default()
    };
    admin.create_topic("live", config).await.expect("topic");
    admin
        .create_group("live", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    let addr = broker.addr.clone();
    let producer = tokio::spawn(async move {
        let c = Client::connect(&addr, "p").await.expect("connect");
        for i in 0..3000u64 {
            let p = c
                .produce("live", vec![NewMessage::from_value(format!("m{i}"))])
                .await
                .expect("produce while compacting");
            assert_eq!(p.first_offset, i);
        }
    });
    let addr = broker.addr.clone();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let compactor = tokio::spawn(async move {
        let c = Client::connect(&addr, "c").await.expect("connect");
        let mut removed = 0;
        while !*done_rx.borrow() {
            let r = c
                .compact(Some("live"))
                .await
                .expect("compact while serving");
            removed += r[0].records_removed;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        removed
    });
    let mut seen = Vec::new();
    while seen.len() < 3000 {
        let got = admin
            .fetch(
                "live",
                FetchOptions {
                    group: Some("q".into()),
                    member: "w".into(),
                    max_messages: 100,
                    wait_ms: 2000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch while compacting");
        let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
        for r in &got.messages {
            assert_eq!(
                &r.message.value[..],
                format!("m{}", r.message.offset.0).as_bytes()
            );
        }
        admin
            .ack("live", "q", &offsets, None)
            .await
            .expect("ack while compacting");
        seen.extend(offsets);
    }
    producer.await.expect("producer");
    done_tx.send(true).expect("stop the compactor");
    let removed = compactor.await.expect("compactor");
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..3000).collect::<Vec<u64>>(),
        "every message delivered exactly once"
    );
    assert!(
        removed > 0,
        "compaction reclaimed consumed messages while serving"
    );
}

#[test]
fn a_tombstone_survives_its_retention_then_goes() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let reg = registry(Arc::clone(&disk), "/data");
    let topic = reg.create_topic("kv", keyed_config()).expect("topic");
    let now = spool::storage::log::now_ms();
    topic
        .produce(&[NewMessage::from_value("v1").with_key("k")])
        .expect("produce");
    let tomb = NewMessage {
        timestamp_ms: Some(now),
        ..NewMessage::from_value("").with_key("k")
    };
    let t = topic.produce(&[tomb]).expect("tombstone").first.0;
    // Seal both behind other keys.
    for i in 0..60u32 {
        topic
            .produce(&[NewMessage::from_value(vec![b'x'; 40]).with_key(format!("other{i}"))])
            .expect("produce");
    }
    topic
        .compact(now + 500, &mut |_| {})
        .expect("compact within retention");
    let keys_k: Vec<u64> = topic
        .read(Offset(0), 10_000, 1 << 20)
        .expect("read")
        .iter()
        .filter(|m| m.key.as_deref() == Some(&b"k"[..]))
        .map(|m| m.offset.0)
        .collect();
    assert_eq!(
        keys_k,
        vec![t],
        "the old value is gone, the young tombstone stays"
    );
    topic
        .compact(now + 1001, &mut |_| {})
        .expect("compact after retention");
    let left = topic.read(Offset(0), 10_000, 1 << 20).expect("read");
    assert!(
        left.iter().all(|m| m.key.as_deref() != Some(&b"k"[..])),
        "the tombstone went after its retention"
    );
}

/// A closed topic with background compaction is opened again for it only
/// when what it measures can have changed: `compact_check_ms` after it
/// closed unmeasured or changed since its last measure (a pass of its own
/// included), when its oldest kept tombstone ages out, and never once
/// nothing is left to age.
#[test]
fn a_closed_topic_is_measured_for_compaction_when_something_can_have_changed() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let reg = registry(Arc::clone(&disk), "/data");
    let config = TopicConfig {
        compact_min_dirty_ratio: Some(0.05),
        compact_check_ms: 60_000,
        delete_retention_ms: 2000,
        ..keyed_config()
    };
    let topic = reg.create_topic("kv", config).expect("topic");
    let now = spool::storage::log::now_ms();
    let keyed = |key: String, value: Vec<u8>| NewMessage {
        timestamp_ms: Some(now),
        ..NewMessage::from_value(value).with_key(key)
    };
    for i in 0..30 {
        topic
            .produce(&[keyed(format!("k{i}"), vec![b'v'; 40])])
            .expect("value");
    }
    for i in 0..30 {
        topic
            .produce(&[keyed(format!("k{i}"), Vec::new())])
            .expect("tombstone");
    }
    // Seals the tombstones behind other keys.
    for i in 0..20 {
        topic
            .produce(&[keyed(format!("other{i}"), vec![b'x'; 40])])
            .expect("other");
    }
    drop(topic);
    assert!(reg.close_unused("kv"), "closed");

    // Closed before any measure: due compact_check_ms after it opened
    // (its creation, just now).
    let closed = spool::storage::log::now_ms();
    assert!(reg.upkeep_due(closed + 59_000, 10).is_empty());
    assert_eq!(reg.upkeep_due(closed + 61_000, 10), ["kv"]);
    let (_, stats) = reg
        .closed_upkeep("kv")
        .expect("upkeep")
        .expect("the superseded values are removed while the topic is closed");
    assert!(stats.records_removed >= 30, "{stats:?}");
    assert!(reg.open_topics().is_empty(), "closed again");

    // Measured, nothing changed since: due when the tombstones age out
    // (delete_retention_ms after their timestamp), not before.
    assert!(reg.upkeep_due(now + 2000, 10).is_empty());
    assert_eq!(reg.upkeep_due(now + 2001, 10), ["kv"]);
    while spool::storage::log::now_ms() <= now + 2001 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (_, stats) = reg
        .closed_upkeep("kv")
        .expect("upkeep")
        .expect("the aged tombstones are removed while the topic is closed");
    assert!(stats.records_removed >= 30, "{stats:?}");

    // That pass changed the topic: measured once more compact_check_ms
    // later, which finds nothing to do.
    let closed = spool::storage::log::now_ms();
    assert!(reg.upkeep_due(closed + 59_000, 10).is_empty());
    assert_eq!(reg.upkeep_due(closed + 61_000, 10), ["kv"]);
    assert!(reg.closed_upkeep("kv").expect("upkeep").is_none());

    // Nothing left to age and nothing changes while it is closed: never
    // due again.
    let a_year_on = spool::storage::log::now_ms() + 365 * 24 * 3_600_000;
    assert!(reg.upkeep_due(a_year_on, 10).is_empty());
    let left = reg
        .topic("kv")
        .expect("open")
        .read(Offset(0), 10_000, 1 << 20)
        .expect("read");
    assert!(!left.is_empty());
    assert!(
        left.iter()
            .all(|m| m.key.as_deref().is_some_and(|k| k.starts_with(b"other"))),
        "only the live keys are left: {:?}",
        left.iter().map(|m| m.key.clone()).collect::<Vec<_>>()
    );

    // Opened, changed and closed again before its next measure: due
    // compact_check_ms after the last measure, not never.
    let topic = reg.topic("kv").expect("open");
    for i in 0..20 {
        topic
            .produce(&[keyed(format!("other{i}"), vec![b'y'; 40])])
            .expect("overwrite");
    }
    drop(topic);
    assert!(reg.close_unused("kv"), "closed");
    let now = spool::storage::log::now_ms();
    assert_eq!(reg.upkeep_due(now + 60_001, 10), ["kv"]);
    let (_, stats) = reg
        .closed_upkeep("kv")
        .expect("upkeep")
        .expect("the overwritten values are removed while the topic is closed");
    assert!(stats.records_removed >= 10, "{stats:?}");
}

/// A topic with half its messages deleted, measured for compaction every
/// `check_ms`: dirty enough for a pass at once.
fn dirty_topic(reg: &Registry, name: &str, check_ms: u64, retention: bool) {
    let mut config = small_segments();
    config.compact_min_dirty_ratio = Some(0.1);
    config.compact_check_ms = check_ms;
    if retention {
        config.log.retention_ms = Some(24 * 3_600_000);
    }
    let topic = reg.create_topic(name, config).expect("topic");
    produce_and_delete(&topic, 100, |o| o % 2 == 0, &mut BTreeMap::new()).expect("produce");
}

/// Closing a topic does not put off its next compaction measure: a topic
/// used again and again just before its measure is due, and closed for
/// being idle in between, is measured when the measure falls due.
#[test]
fn closing_a_topic_does_not_put_its_next_compaction_measure_off() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let reg = registry(Arc::clone(&disk), "/data");
    dirty_topic(&reg, "t", 400, false);
    assert!(reg.close_unused("t"), "closed");
    std::thread::sleep(std::time::Duration::from_millis(150));
    // Used again, and closed again: still due 400 ms after it first
    // opened (at least 150 ms ago), not 400 ms after this close.
    drop(reg.topic("t").expect("open"));
    assert!(reg.close_unused("t"), "closed again");
    let closed = spool::storage::log::now_ms();
    assert_eq!(reg.upkeep_due(closed + 300, 10), ["t"]);
    let (_, stats) = reg
        .closed_upkeep("t")
        .expect("upkeep")
        .expect("the deleted messages are removed while the topic is closed");
    assert!(stats.records_removed >= 40, "{stats:?}");
}

/// A closed topic opened because its retention is due is not measured for
/// compaction unless that is due too (`compact_check_ms` after the start,
/// for a topic not opened since).
#[test]
fn an_open_for_retention_alone_does_not_measure_for_compaction() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let reg = registry(Arc::clone(&disk), "/data");
    dirty_topic(&reg, "t", 60_000, true);
    reg.stop_all().expect("stop");
    drop(reg);
    let reg = registry(Arc::clone(&disk), "/data");
    let started = spool::storage::log::now_ms();
    reg.config_of("t").expect("config");
    // Retention looks at once, compaction only after compact_check_ms.
    assert_eq!(reg.upkeep_due(started, 10), ["t"]);
    assert!(
        reg.closed_upkeep("t").expect("upkeep").is_none(),
        "not measured"
    );
    assert!(reg.open_topics().is_empty(), "closed again");
    // Its retention is next due a tenth of retention_ms on; its measure
    // stays due 60 s after the start.
    assert!(
        reg.upkeep_due(started + 59_000, 10).is_empty(),
        "not due yet"
    );
    assert_eq!(reg.upkeep_due(started + 60_001, 10), ["t"]);
    let (_, stats) = reg
        .closed_upkeep("t")
        .expect("upkeep")
        .expect("compacted once its measure is due");
    assert!(stats.records_removed >= 40, "{stats:?}");
}

/// A background compaction pass of a closed topic that fails is tried
/// again `compact_check_ms` later, not forgotten because nothing changed
/// since its measure.
#[test]
fn a_failed_compaction_of_a_closed_topic_is_tried_again() {
    let disk = Arc::new(SimDisk::new());
    let reg = registry(disk.clone(), "/data");
    dirty_topic(&reg, "t", 60_000, false);
    assert!(reg.close_unused("t"), "closed");
    let now = spool::storage::log::now_ms();
    assert_eq!(reg.upkeep_due(now + 60_001, 10), ["t"]);
    let weak = Arc::downgrade(&disk);
    disk.set_hook(Some(Arc::new(move |op, path: &Path| {
        if op == SimOp::SyncData
            && path.to_string_lossy().ends_with(".cleaned")
            && let Some(d) = weak.upgrade()
        {
            d.set_fault(SimFault::SyncError, true);
        }
    })));
    let failed = reg.closed_upkeep("t");
    disk.set_hook(None);
    disk.set_fault(SimFault::SyncError, false);
    assert!(failed.is_err(), "the failed pass is reported: {failed:?}");
    assert!(reg.open_topics().is_empty(), "closed again");
    let now = spool::storage::log::now_ms();
    assert!(reg.upkeep_due(now + 59_000, 10).is_empty());
    assert_eq!(reg.upkeep_due(now + 60_001, 10), ["t"], "due again");
    let (_, stats) = reg
        .closed_upkeep("t")
        .expect("upkeep")
        .expect("the second pass compacts");
    assert!(stats.records_removed >= 40, "{stats:?}");
}

/// A topic's final stop ends compaction: a pass asked for afterwards
/// refuses, naming the stop, and changes nothing the stop recorded.
#[test]
fn a_stopped_topic_takes_no_compaction_pass() {
    let disk: Arc<dyn Storage> = Arc::new(SimDisk::new());
    let reg = registry(Arc::clone(&disk), "/data");
    dirty_topic(&reg, "t", 60_000, false);
    let topic = reg.topic("t").expect("open");
    let before = topic.log().segments().len();
    topic.stop().expect("stop");
    let refused = topic.compact(spool::storage::log::now_ms(), &mut |_| {});
    match refused {
        Err(spool::Error::Stopping(msg)) => assert!(msg.contains("stopping"), "{msg}"),
        other => panic!("compaction after the stop: {other:?}"),
    }
    let now = spool::storage::log::now_ms();
    match topic.compact_if_dirty(now, 1.0) {
        Err(spool::Error::Stopping(_)) => {}
        other => panic!("a measure after the stop: {other:?}"),
    }
    assert_eq!(topic.log().segments().len(), before, "nothing swapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_online_compaction_loses_nothing_live() {
    use spool::client::{Client, FetchOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = common::Broker::start(tmp.path(), &[]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    let config = spool::protocol::pb::TopicConfig {
        segment_bytes: Some(4 * 1024),
        delete_when_consumed: Some(true),
        ..Default::default()
    };
    admin.create_topic("q", config).await.expect("topic");
    admin
        .create_group("q", "g", GroupMode::Queue, None)
        .await
        .expect("group");
    let mut values = BTreeMap::new();
    for chunk in 0..20u64 {
        let batch: Vec<NewMessage> = (0..100)
            .map(|i| NewMessage::from_value(format!("m{}", chunk * 100 + i)))
            .collect();
        let p = admin.produce("q", batch).await.expect("produce");
        for i in 0..100 {
            values.insert(p.first_offset + i, format!("m{}", chunk * 100 + i));
        }
    }
    // Consume everything but every 7th message.
    let unacked: BTreeMap<u64, String> = consume_all_but_every(&admin, "q", 7)
        .await
        .into_iter()
        .map(|o| (o, values[&o].clone()))
        .collect();
    drop(admin);
    for round in 0..5u64 {
        let addr = broker.addr.clone();
        let compaction = tokio::spawn(async move {
            if let Ok(c) = Client::connect(&addr, "compactor").await {
                let _ = c.compact(Some("q")).await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(2 + round * 3)).await;
        tokio::task::spawn_blocking(move || broker.kill9())
            .await
            .expect("kill");
        let _ = compaction.await;
        broker = common::Broker::start(tmp.path(), &[]);
        let client = Client::connect(&broker.addr, "check")
            .await
            .expect("connect");
        let got = client
            .fetch(
                "q",
                FetchOptions {
                    from: Some(Position::Earliest),
                    max_messages: 10_000,
                    ..Default::default()
                },
            )
            .await
            .expect("replay");
        let live: BTreeMap<u64, String> = got
            .messages
            .iter()
            .map(|r| {
                (
                    r.message.offset.0,
                    String::from_utf8_lossy(&r.message.value).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            live, unacked,
            "after a kill -9 during compaction (round {round})"
        );
    }
    let (ok, _) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("stop");
    assert!(ok);
    let data = DataDir::open(Arc::new(OsStorage), tmp.path()).expect("reopen");
    assert!(verify(&data, &mut |_| {}).expect("verify").is_clean());
}

/// Queue group `g` of `topic` fetches everything and acks all but the
/// offsets divisible by `every`, which it returns.
async fn consume_all_but_every(
    client: &spool::client::Client,
    topic: &str,
    every: u64,
) -> Vec<u64> {
    let mut unacked = Vec::new();
    loop {
        let got = client
            .fetch(
                topic,
                spool::client::FetchOptions {
                    group: Some("g".into()),
                    member: "w".into(),
                    max_messages: 1000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        if got.messages.is_empty() {
            return unacked;
        }
        let (keep, ack): (Vec<u64>, Vec<u64>) = got
            .messages
            .iter()
            .map(|r| r.message.offset.0)
            .partition(|o| o % every == 0);
        client.ack(topic, "g", &ack, None).await.expect("ack");
        unacked.extend(keep);
    }
}

/// A topic with `compact_min_dirty_ratio` is compacted by the broker itself
/// once that share of its sealed bytes is removable; a topic without it is
/// left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_compaction_runs_once_the_dirty_ratio_is_reached() {
    use spool::client::{Client, FetchOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let config = |ratio: Option<f64>| spool::protocol::pb::TopicConfig {
        segment_bytes: Some(4 * 1024),
        delete_when_consumed: Some(true),
        compact_min_dirty_ratio: ratio,
        compact_check_ms: Some(50),
        ..Default::default()
    };
    let mut unacked = BTreeMap::new();
    for (name, ratio) in [("auto", Some(0.5)), ("manual", None)] {
        let info = client
            .create_topic(name, config(ratio))
            .await
            .expect("topic");
        assert_eq!(info.config.and_then(|c| c.compact_min_dirty_ratio), ratio);
        client
            .create_group(name, "g", GroupMode::Queue, None)
            .await
            .expect("group");
        let batch: Vec<NewMessage> = (0..2000)
            .map(|i| NewMessage::from_value(format!("{name} {i:05} {}", "p".repeat(40))))
            .collect();
        client.produce(name, batch).await.expect("produce");
        // Every message but every 10th is consumed.
        unacked.insert(name, consume_all_but_every(&client, name, 10).await);
    }
    let manual_before = client
        .describe_topic("manual")
        .await
        .expect("describe")
        .bytes;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let auto_after = loop {
        let bytes = client.describe_topic("auto").await.expect("describe").bytes;
        if bytes * 4 < manual_before {
            break bytes;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no background compaction: auto holds {bytes} bytes, manual {manual_before}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let manual_after = client
        .describe_topic("manual")
        .await
        .expect("describe")
        .bytes;
    assert_eq!(
        manual_after, manual_before,
        "a topic without compact_min_dirty_ratio is not compacted (auto went to {auto_after})"
    );
    // What was not consumed is still there, at its offsets.
    let got = client
        .fetch(
            "auto",
            FetchOptions {
                from: Some(Position::Earliest),
                max_messages: 10_000,
                ..Default::default()
            },
        )
        .await
        .expect("replay");
    let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
    assert_eq!(offsets, unacked["auto"]);
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
    assert!(log.contains("background compaction"), "logged: {log}");
}

/// Background compaction reaches a topic closed for being idle: a quiet
/// topic's tombstones go once they age out, without a request opening it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_compaction_reaches_a_quiet_closed_topic() {
    use spool::client::Client;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &["--topic-idle-close-ms", "50"]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    client
        .create_topic(
            "quiet",
            spool::protocol::pb::TopicConfig {
                cleanup: Some("compact".into()),
                segment_bytes: Some(1024),
                compact_min_dirty_ratio: Some(0.05),
                compact_check_ms: Some(200),
                delete_retention_ms: Some(1500),
                ..Default::default()
            },
        )
        .await
        .expect("topic");
    let keyed = |key: String, value: Vec<u8>| NewMessage::from_value(value).with_key(key);
    let values = (0..30).map(|i| keyed(format!("gone-{i}"), vec![b'v'; 40]));
    let tombstones = (0..30).map(|i| keyed(format!("gone-{i}"), Vec::new()));
    let others = (0..20).map(|i| keyed(format!("live-{i}"), vec![b'x'; 40]));
    for m in values.chain(tombstones).chain(others) {
        client.produce("quiet", vec![m]).await.expect("produce");
    }
    // No request names the topic from here on: it closes within a second,
    // before its tombstones age out, and only the broker can remove them.
    let dir = tmp.path().join("topics").join("quiet");
    let holds_gone_keys = || segments_hold(&dir, b"gone-");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while holds_gone_keys() {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed topic kept its aged tombstones: {}",
            broker.log_so_far()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let live: Vec<u64> = (60..80).collect();
    let left = replay_once_swapped(&client, "quiet", |r| offsets_of(r) == live).await;
    assert_eq!(
        offsets_of(&left),
        live,
        "the live keys stay at their offsets"
    );

    // The same for a topic not opened since the broker started.
    let values = (0..30).map(|i| keyed(format!("gone-{i}"), vec![b'v'; 40]));
    let tombstones = (0..30).map(|i| keyed(format!("gone-{i}"), Vec::new()));
    let others = (20..40).map(|i| keyed(format!("live-{i}"), vec![b'x'; 40]));
    for m in values.chain(tombstones).chain(others) {
        client.produce("quiet", vec![m]).await.expect("produce");
    }
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
    assert!(!log.contains("upkeep of a closed topic"), "{log}");
    let broker = common::Broker::start(tmp.path(), &["--topic-idle-close-ms", "50"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while holds_gone_keys() {
        assert!(
            std::time::Instant::now() < deadline,
            "the topic not opened since the start kept its aged tombstones: {}",
            broker.log_so_far()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let live: Vec<u64> = (60..80).chain(140..160).collect();
    let left = replay_once_swapped(&client, "quiet", |r| offsets_of(r) == live).await;
    assert_eq!(
        offsets_of(&left),
        live,
        "the live keys stay at their offsets"
    );
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
    assert!(!log.contains("upkeep of a closed topic"), "{log}");
}

/// A topic used every 1.6 s, closed for being idle between uses (idle
/// close 100 ms, swept every second), is compacted `compact_check_ms`
/// (3 s) after it was created, whether the measure falls due while it is
/// open or closed: neither a close nor the next open puts the measure off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_compaction_reaches_a_topic_closed_and_reopened_in_turn() {
    use spool::client::Client;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &["--topic-idle-close-ms", "100"]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    client
        .create_topic(
            "busy",
            spool::protocol::pb::TopicConfig {
                cleanup: Some("compact".into()),
                segment_bytes: Some(1024),
                compact_min_dirty_ratio: Some(0.05),
                compact_check_ms: Some(3000),
                ..Default::default()
            },
        )
        .await
        .expect("topic");
    let keyed = |key: String, value: &[u8]| NewMessage::from_value(value.to_vec()).with_key(key);
    let old: Vec<NewMessage> = (0..30)
        .map(|i| keyed(format!("k{i}"), b"old-value"))
        .collect();
    let new: Vec<NewMessage> = (0..30)
        .map(|i| keyed(format!("k{i}"), b"new-value"))
        .collect();
    let filler: Vec<NewMessage> = (0..20).map(|i| keyed(format!("f{i}"), b"filler")).collect();
    for batch in [old, new, filler] {
        client.produce("busy", batch).await.expect("produce");
    }
    let dir = tmp.path().join("topics").join("busy");
    let holds_old_values = || segments_hold(&dir, b"old-value");
    let started = std::time::Instant::now();
    let mut uses = 0u64;
    while holds_old_values() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the topic kept its superseded values: {}",
            broker.log_so_far()
        );
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        client
            .produce("busy", vec![keyed(format!("use{uses}"), b"use")])
            .await
            .expect("use");
        uses += 1;
    }
    let latest_only = |r: &[Received]| r.iter().all(|r| r.message.value.as_ref() != b"old-value");
    let left = replay_once_swapped(&client, "busy", latest_only).await;
    assert!(latest_only(&left), "only the latest values are left");
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
    assert!(log.contains("background compaction"), "{log}");
    // A pass builds the index of each segment it writes: no repair.
    assert!(!log.contains("rebuilt index"), "{log}");
}

/// Whether a segment file in topic folder `dir` holds `needle`, counting
/// a compaction's copy before its swap (`.log.cleaned`, `.log.<until>.swap`).
/// A file that goes between the listing and its read counts as holding it:
/// a swap under way moves records from file to file, and a scan that missed
/// them in passing would see a topic without them.
fn segments_hold(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .expect("topic folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".log"))
        .any(|e| match std::fs::read(e.path()) {
            Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle),
            Err(_) => true,
        })
}

/// A replay of `topic` once `settled` holds for it, or after 10 s: the
/// files change before the broker's view of them (a swap's rename comes
/// before the open topic takes the new segment), so a replay right after
/// [`segments_hold`] turned false may still see what the pass removed.
async fn replay_once_swapped(
    client: &spool::client::Client,
    topic: &str,
    settled: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = common::replay_all(client, topic).await;
        if settled(&left) || std::time::Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The offsets of `received`, in order.
fn offsets_of(received: &[Received]) -> Vec<u64> {
    received.iter().map(|r| r.message.offset.0).collect()
}

/// Offsets as the broker takes them.
fn as_offsets(offsets: &[u64]) -> Vec<Offset> {
    offsets.iter().copied().map(Offset).collect()
}

/// Topic settings with 1 KiB segments under `fsync=always`.
fn small_segments() -> TopicConfig {
    TopicConfig {
        log: LogConfig {
            segment_bytes: 1024,
            fsync: FsyncPolicy::Always,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    }
}

/// Every message a replay of `topic` shows, by offset.
fn values(topic: &spool::broker::Topic) -> BTreeMap<u64, String> {
    topic
        .read(Offset(0), 10_000, 1 << 20)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset.0, String::from_utf8_lossy(&m.value).into_owned()))
        .collect()
}

/// Produces `count` messages to `topic`, deletes those `doomed` picks, and
/// records the rest in `live`.
fn produce_and_delete(
    topic: &spool::broker::Topic,
    count: u64,
    doomed: fn(u64) -> bool,
    live: &mut BTreeMap<u64, String>,
) -> spool::Result<()> {
    let mut gone = Vec::new();
    for i in 0..count {
        let value = format!("message {i} {}", "y".repeat((i % 13) as usize));
        let a = topic.produce(&[NewMessage::from_value(value.clone())])?;
        if doomed(a.first.0) {
            gone.push(a.first.0);
        } else {
            live.insert(a.first.0, value);
        }
    }
    topic.delete(&as_offsets(&gone))
}

/// A compaction pass that fails at any one of its syncs (a full disk, an
/// I/O error), then more traffic and a second pass, then a restart without
/// a clean stop: every live message is there and `verify` is clean. A swap
/// the first pass left behind must not be taken, at the restart, over what
/// the second merged.
#[test]
fn a_compaction_failing_at_any_sync_then_another_pass_then_a_restart_loses_nothing() {
    let mut k = 1u64;
    loop {
        let disk = Arc::new(SimDisk::new());
        let storage: Arc<dyn Storage> = disk.clone();
        let reg = registry(Arc::clone(&storage), "/data");
        let topic = reg.create_topic("t", small_segments()).expect("topic");
        let mut live = BTreeMap::new();
        produce_and_delete(&topic, 90, |o| o % 5 != 0, &mut live).expect("traffic");
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let (faulty, syncs) = (Arc::clone(&disk), Arc::clone(&syncs));
            disk.set_hook(Some(Arc::new(move |op, path: &Path| {
                // Index files are hints: a failed sync of one removes it
                // and fails nothing.
                let hint = path.extension().is_some_and(|e| e == "idx" || e == "tix");
                if op == SimOp::Remove || hint {
                    return;
                }
                let n = syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                faulty.set_fault(SimFault::SyncError, n == k);
            })));
        }
        let first = reg.compact(Some("t"), &mut |_| {});
        disk.set_hook(None);
        disk.set_fault(SimFault::SyncError, false);
        let failed = syncs.load(std::sync::atomic::Ordering::SeqCst) >= k;
        assert_eq!(first.is_err(), failed, "sync {k}: {first:?}");
        // More traffic (refused if the failure left the log read-only),
        // and a second pass that merges differently.
        if produce_and_delete(&topic, 60, |o| o % 4 != 0, &mut live).is_ok() {
            let _ = reg.compact(Some("t"), &mut |_| {});
        }
        drop(topic);
        drop(reg);
        disk.power_cut(None);
        let reg = registry(Arc::clone(&storage), "/data");
        let topic = reg.topic("t").unwrap_or_else(|e| panic!("sync {k}: {e}"));
        let got = values(&topic);
        assert_eq!(got, live, "compaction failed at its sync {k}");
        let report = verify(reg.data(), &mut |_| {}).expect("verify");
        assert!(report.is_clean(), "sync {k}: {:?}", report.damage);
        if !failed {
            assert!(k > 3, "the pass did real work across several syncs");
            break;
        }
        k += 1;
        assert!(k < 300, "the pass should finish");
    }
}

/// A segment holding only what has expired (a key's tombstone past its
/// retention, deleted records) goes cheaply, without a copy; the segments
/// before it, where the tombstone hides the key's older value, must be
/// compacted first. If removing it came first and the copy then failed (a
/// full disk), the older value would be back for good.
#[test]
fn a_tombstone_goes_only_after_the_value_it_hides() {
    let disk = Arc::new(SimDisk::new());
    let storage: Arc<dyn Storage> = disk.clone();
    let reg = registry(Arc::clone(&storage), "/data");
    let config = TopicConfig {
        log: LogConfig {
            fsync: FsyncPolicy::Always,
            ..keyed_config().log
        },
        ..keyed_config()
    };
    let topic = reg.create_topic("kv", config).expect("topic");
    let old = |key: &str, value: &[u8]| NewMessage {
        timestamp_ms: Some(0),
        ..NewMessage::from_value(value.to_vec()).with_key(key.to_owned())
    };
    let v1 = topic.produce(&[old("k", b"v1")]).expect("produce").first;
    topic.produce(&[old("y", b"kept")]).expect("produce");
    let mut fillers = Vec::new();
    // Fillers until the tombstone lands in the next segment.
    let segments = |t: &spool::broker::Topic| t.log().segments().len();
    while segments(&topic) < 2 {
        let f = topic.produce(&[old(&format!("f{}", fillers.len()), &[b'f'; 200])]);
        fillers.push(f.expect("produce").first);
    }
    let tombstone = topic.produce(&[old("k", b"")]).expect("produce").first;
    let second = topic.log().segments()[1].base();
    assert!(
        tombstone.0 >= second,
        "the tombstone opens the second segment"
    );
    while segments(&topic) < 3 {
        let f = topic.produce(&[old(&format!("f{}", fillers.len()), &[b'f'; 200])]);
        fillers.push(f.expect("produce").first);
    }
    // Everything but y and the tombstone is deleted (fillers that went into
    // the active segment stay out of the pass anyway).
    let fillers: Vec<Offset> = fillers.into_iter().filter(|f| f.0 != tombstone.0).collect();
    topic.delete(&fillers).expect("delete");
    let second_log = topic.log().segments()[1].paths().log.clone();
    {
        let faulty = Arc::clone(&disk);
        disk.set_hook(Some(Arc::new(move |op, path| {
            if op == SimOp::Remove && path == second_log {
                // Whatever the pass writes after this finds the disk full.
                faulty.set_fault(SimFault::NoSpace, true);
            }
        })));
    }
    let _ = reg.compact(Some("kv"), &mut |_| {});
    disk.set_hook(None);
    disk.set_fault(SimFault::NoSpace, false);
    let visible = |t: &spool::broker::Topic| -> Vec<(u64, Vec<u8>)> {
        t.read(Offset(0), 10_000, 1 << 20)
            .expect("read")
            .into_iter()
            .filter(|m| m.key.as_deref() == Some(&b"k"[..]))
            .map(|m| (m.offset.0, m.value.to_vec()))
            .collect()
    };
    let shown = visible(&topic);
    assert!(
        !shown.iter().any(|(o, _)| *o == v1.0) || shown.iter().any(|(o, _)| *o == tombstone.0),
        "k's older value is back without its tombstone: {shown:?}"
    );
    drop(topic);
    drop(reg);
    let reg = registry(Arc::clone(&storage), "/data");
    let topic = reg.topic("kv").expect("topic");
    reg.compact(Some("kv"), &mut |_| {}).expect("compact again");
    let shown = visible(&topic);
    assert!(
        !shown.iter().any(|(o, _)| *o == v1.0),
        "k's older value is back for good: {shown:?}"
    );
}

/// A compaction pass removes deleted records, but a group that has not
/// read past them still counts them as deleted: its lag, a queue group's
/// low watermark and what retention later counts as lost to it are the
/// same before and after the pass.
#[test]
fn compaction_leaves_what_groups_count_as_deleted() {
    let disk = Arc::new(SimDisk::new());
    let reg = registry(disk.clone(), "/data");
    let topic = reg.create_topic("t", small_segments()).expect("topic");
    let mut live = BTreeMap::new();
    produce_and_delete(&topic, 100, |o| o < 50, &mut live).expect("produce");
    for (group, mode) in [("s", GroupMode::Stream), ("q", GroupMode::Queue)] {
        topic
            .create_group(group, mode, Position::Earliest)
            .expect("group");
    }
    let before: Vec<_> = ["s", "q"]
        .iter()
        .map(|g| {
            let info = topic.describe_group(g).expect("describe");
            (info.committed, info.lag)
        })
        .collect();
    assert_eq!(
        before[0].1, 50,
        "the stream group's lag leaves out the deleted"
    );
    reg.compact(Some("t"), &mut |_| {}).expect("compact");
    let after: Vec<_> = ["s", "q"]
        .iter()
        .map(|g| {
            let info = topic.describe_group(g).expect("describe");
            (info.committed, info.lag)
        })
        .collect();
    assert_eq!(after, before);
    assert_eq!(values(&topic), live);
}

/// A group that starts below deletions compaction already removed (created
/// at earliest after the pass, or moved back) still leaves them out of its
/// lag, and retention does not count them as lost to it.
#[test]
fn a_group_below_deletions_compaction_removed_does_not_count_them() {
    let disk = Arc::new(SimDisk::new());
    let reg = registry(disk.clone(), "/data");
    let topic = reg.create_topic("t", small_segments()).expect("topic");
    let mut live = BTreeMap::new();
    produce_and_delete(&topic, 100, |o| o % 4 == 0 && o < 80, &mut live).expect("produce");
    reg.compact(Some("t"), &mut |_| {}).expect("compact");
    for (group, mode) in [("s", GroupMode::Stream), ("q", GroupMode::Queue)] {
        topic
            .create_group(group, mode, Position::Earliest)
            .expect("group");
        assert_eq!(
            topic.describe_group(group).expect("describe").lag,
            live.len() as u64,
            "group {group}: the messages a replay from the start reads"
        );
    }
    assert_eq!(values(&topic), live);
    // Back to the start after reading on: the same.
    topic.commit("s", Offset(90)).expect("commit");
    topic.commit("s", Offset(0)).expect("commit back");
    assert_eq!(
        topic.describe_group("s").expect("describe").lag,
        live.len() as u64
    );
}

/// A compaction pass whose copy fails (here its sync) removes the copy at
/// once: on a full disk its blocks are what the pass was to free.
#[test]
fn a_compaction_copy_that_fails_is_removed_at_once() {
    let disk = Arc::new(SimDisk::new());
    let reg = registry(disk.clone(), "/data");
    let topic = reg.create_topic("t", small_segments()).expect("topic");
    let mut live = BTreeMap::new();
    produce_and_delete(&topic, 100, |o| o % 2 == 0, &mut live).expect("produce");
    let weak = Arc::downgrade(&disk);
    disk.set_hook(Some(Arc::new(move |op, path: &Path| {
        if op == SimOp::SyncData
            && path.to_string_lossy().ends_with(".cleaned")
            && let Some(d) = weak.upgrade()
        {
            d.set_fault(SimFault::SyncError, true);
        }
    })));
    let failed = reg.compact(Some("t"), &mut |_| {});
    disk.set_hook(None);
    disk.set_fault(SimFault::SyncError, false);
    assert!(failed.is_err(), "the failed copy is reported");
    let left: Vec<String> = disk
        .list_dir(topic.dir())
        .expect("list")
        .into_iter()
        .filter(|f| f.ends_with(".cleaned"))
        .collect();
    assert!(left.is_empty(), "copies left: {left:?}");
    assert_eq!(values(&topic), live, "nothing lost");
}

/// A pass over every topic compacts every topic it can: damage in one
/// (found as its records are copied) fails that one, reported, and keeps
/// none of the others from their pass.
#[test]
fn a_damaged_topic_does_not_keep_the_others_from_a_pass_over_every_topic() {
    let disk = Arc::new(SimDisk::new());
    let reg = registry(disk.clone(), "/data");
    let mut topics = Vec::new();
    for name in ["a", "t", "z"] {
        let topic = reg.create_topic(name, small_segments()).expect("topic");
        let mut live = BTreeMap::new();
        produce_and_delete(&topic, 60, |o| o % 3 == 0, &mut live).expect("produce");
        topics.push((topic, live));
    }
    // A flipped byte in a value of topic t's first (sealed) segment.
    let damaged = topics[1].0.dir().join("00000000000000000000.log");
    disk.damage(&damaged, 40, b"#").expect("damage");
    let failed = reg.compact(None, &mut |_| {});
    assert!(
        matches!(&failed, Err(e) if e.to_string().contains("00000000000000000000.log")),
        "{failed:?}"
    );
    for (name, (topic, live)) in ["a", "z"].iter().zip([&topics[0], &topics[2]]) {
        assert_eq!(&values(topic), live, "topic {name}");
        let again = reg.compact(Some(name), &mut |_| {}).expect("compact again");
        let stats = &again[0].1;
        assert_eq!(
            stats.segments_rewritten + stats.segments_deleted,
            0,
            "topic {name} was compacted by the first pass: {stats:?}"
        );
    }
}

/// A compaction of every topic reports its progress as one running total
/// that only grows and ends at the bytes the topics held (the figure
/// `spool compact --data` sizes its bar by), active segments included.
#[test]
fn compaction_progress_runs_across_topics_to_their_total() {
    let reg = registry(Arc::new(SimDisk::new()), "/d");
    for (name, count) in [("a", 40u8), ("b", 25), ("c", 3)] {
        let topic = reg.create_topic(name, small_segments()).expect("topic");
        for i in 0..count {
            topic
                .produce(&[NewMessage::from_value(vec![i; 100])])
                .expect("produce");
        }
        if name != "c" {
            topic.delete(&[Offset(0), Offset(1)]).expect("delete");
        }
    }
    let total: u64 = reg.infos().iter().map(|t| t.stats.bytes).sum();
    let mut seen = Vec::new();
    reg.compact(None, &mut |bytes| seen.push(bytes))
        .expect("compact");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last().copied(), Some(total), "{seen:?}");
    assert!(seen.len() > 3, "within topics too: {seen:?}");
}
