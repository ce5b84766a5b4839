//! Deleting and re-creating topics and groups while clients use them: a
//! delete is one clean step that every racing request sees as done
//! (`NOT_FOUND`) or not yet begun (success), nothing deleted comes back (not
//! on re-create, not after a restart), and a creation that fails leaves
//! nothing behind. The races run against the real binary; the crashes at
//! every step run the broker core on the simulated disk, where a power cut
//! can fall between any two syncs.

mod common;

use common::{Broker, replay_all};
use futures_util::StreamExt;
use spool::broker::topic::Position;
use spool::broker::{Registry, RegistryOptions, TopicConfig};
use spool::client::{Client, ClientError, FetchOptions};
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::storage::io::{SimDisk, SimFault, Storage};
use spool::storage::{DataDir, LogConfig, NewMessage, Offset};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Rounds of each race: the bad interleavings showed up in most rounds.
const ROUNDS: usize = 10;

fn small_segments() -> pb::TopicConfig {
    pb::TopicConfig {
        segment_bytes: Some(2048),
        ..Default::default()
    }
}

/// Fails the test unless `result` is a success or `NOT_FOUND`; returns
/// whether it was `NOT_FOUND`.
fn ok_or_not_found<T>(what: &str, result: &Result<T, ClientError>) -> bool {
    match result {
        Ok(_) => false,
        Err(e) if e.code() == Some(pb::Code::NotFound) => true,
        Err(e) => panic!("{what} racing a delete: {e}"),
    }
}

/// Waits until `dir` is gone or empty (trash is removed in the background).
fn wait_until_empty(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.file_name()).collect(),
            Err(_) => return,
        };
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} keeps {left:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Produces to `topic` from a few pipelined loops until the topic is gone
/// (or `stop` is set). Each batch is larger than a segment, so every produce
/// rolls a segment: creates files in the topic's folder.
async fn producer(client: Client, topic: &'static str, id: u64, stop: Arc<AtomicBool>) {
    let client = Arc::new(client);
    let mut loops = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let (client, stop) = (Arc::clone(&client), Arc::clone(&stop));
        loops.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let batch = (0..8)
                    .map(|k| {
                        NewMessage::from_value(format!("p{id}.{lane}-{i}-{k}-{}", "x".repeat(300)))
                    })
                    .collect();
                let result = client.produce(topic, batch).await;
                if ok_or_not_found("produce", &result) {
                    return;
                }
                i += 1;
            }
        });
    }
    while let Some(done) = loops.join_next().await {
        done.expect("a produce loop panicked");
    }
}

/// Replays `topic` from the start over and over until it is gone.
async fn reader(client: Client, topic: &'static str, stop: Arc<AtomicBool>) {
    let mut from = 0;
    while !stop.load(Ordering::SeqCst) {
        let result = client
            .fetch(
                topic,
                FetchOptions {
                    from: Some(Position::Offset(from)),
                    ..Default::default()
                },
            )
            .await;
        if ok_or_not_found("fetch", &result) {
            return;
        }
        if let Ok(f) = result {
            from = f.next_offset;
        }
    }
}

/// Compacts every topic, then `topic` alone, until `done` is set: the former
/// must always succeed (a topic deleted meanwhile is just not compacted).
async fn compactor(client: Client, topic: &'static str, done: Arc<AtomicBool>) {
    while !done.load(Ordering::SeqCst) {
        if let Err(e) = client.compact(None).await {
            panic!("compacting every topic while one is deleted: {e}");
        }
        let one = client.compact(Some(topic)).await;
        ok_or_not_found("compact", &one);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_under_load_is_gone_and_comes_back_empty_only_when_created_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &["--no-auto-create"]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    admin
        .create_topic("race", small_segments())
        .await
        .expect("create");
    for round in 0..ROUNDS {
        // Something to lose: a few segments, and a group with a subscription.
        for _ in 0..10 {
            let batch = (0..8)
                .map(|i| NewMessage::from_value(format!("old-{round}-{i}-{}", "y".repeat(200))))
                .collect();
            admin.produce("race", batch).await.expect("produce");
        }
        admin
            .create_group("race", "workers", GroupMode::Queue, None)
            .await
            .expect("group");
        let subscriber = Client::connect(&broker.addr, "subscriber")
            .await
            .expect("connect");
        let mut sub = subscriber
            .subscribe("race", None, "s", None, 10_000)
            .await
            .expect("subscribe");

        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for id in 0..3 {
            let client = Client::connect(&broker.addr, "producer")
                .await
                .expect("connect");
            tasks.spawn(producer(client, "race", id, Arc::clone(&stop)));
        }
        let client = Client::connect(&broker.addr, "reader")
            .await
            .expect("connect");
        tasks.spawn(reader(client, "race", Arc::clone(&stop)));
        let deleted = Arc::new(AtomicBool::new(false));
        let client = Client::connect(&broker.addr, "compactor")
            .await
            .expect("connect");
        tasks.spawn(compactor(client, "race", Arc::clone(&deleted)));
        tokio::time::sleep(Duration::from_millis(20 + 7 * round as u64)).await;
        admin
            .delete_topic("race")
            .await
            .unwrap_or_else(|e| panic!("round {round}: delete: {e}"));
        deleted.store(true, Ordering::SeqCst);
        // Racing requests see the topic gone from now on.
        let stopper = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                stop.store(true, Ordering::SeqCst);
            })
        };
        while let Some(done) = tasks.join_next().await {
            done.expect("a racing client panicked");
        }
        stopper.abort();
        assert!(
            !stop.load(Ordering::SeqCst),
            "every racing client saw NOT_FOUND within 5 s"
        );
        assert!(
            !data.join("topics/race").exists(),
            "round {round}: the folder is gone once the delete answered"
        );
        let topics = admin.list_topics().await.expect("list");
        assert!(topics.iter().all(|t| t.name != "race"), "{topics:?}");
        let err = admin
            .produce("race", vec![NewMessage::from_value("late")])
            .await
            .expect_err("deleted");
        assert_eq!(err.code(), Some(pb::Code::NotFound), "{err}");
        wait_until_empty(&data.join("trash"));
        // The subscription ends with NOT_FOUND.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sub.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Some(e),
                    None => break None,
                }
            }
        })
        .await
        .expect("the subscription ends within 5 s")
        .expect("with an error");
        assert_eq!(ended.code(), Some(pb::Code::NotFound), "{ended}");

        // Created again: empty, at offset 0, no old group.
        let info = admin
            .create_topic("race", small_segments())
            .await
            .expect("create again");
        assert_eq!((info.start_offset, info.end_offset), (0, 0), "{info:?}");
        assert!(replay_all(&admin, "race").await.is_empty());
        let groups = admin.list_groups("race").await.expect("groups");
        assert!(groups.is_empty(), "{groups:?}");
        let p = admin
            .produce("race", vec![NewMessage::from_value("new")])
            .await
            .expect("produce to the new topic");
        assert_eq!(p.first_offset, 0);
        admin.delete("race", &[0]).await.expect("delete the marker");
    }

    // Deleted for good: a restart does not bring it back.
    admin.delete_topic("race").await.expect("delete");
    drop(admin);
    let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {logs}");
    let broker = Broker::start(&data, &["--no-auto-create"]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    let err = admin
        .describe_topic("race")
        .await
        .expect_err("a deleted topic stays deleted");
    assert_eq!(err.code(), Some(pb::Code::NotFound), "{err}");
    assert!(!data.join("topics/race").exists());
    wait_until_empty(&data.join("trash"));
}

/// A create racing a delete of the same name either comes first and
/// succeeds (the delete then removes what it made) or comes after it and
/// succeeds on a fresh topic: never `NOT_FOUND`. Before, a create whose
/// topic the delete removed before it had answered said `NOT_FOUND`
/// although it had created the topic (1 to 11 of 400 races).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_racing_a_delete_succeeds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let creator = Client::connect(&broker.addr, "creator")
        .await
        .expect("connect");
    let deleter = Client::connect(&broker.addr, "deleter")
        .await
        .expect("connect");
    for round in 0..300 {
        let name = format!("r{round}");
        let (created, deleted) = tokio::join!(
            creator.create_topic(&name, pb::TopicConfig::default()),
            deleter.delete_topic(&name),
        );
        if let Err(e) = created {
            panic!("round {round}: create racing a delete: {e}");
        }
        if deleted.is_err() {
            ok_or_not_found("delete", &deleted);
        }
    }
}

/// Leases and acks with queue group `workers` of `topic` until it is gone.
async fn queue_consumer(client: Client, topic: &'static str, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let fetched = client
            .fetch(
                topic,
                FetchOptions {
                    group: Some("workers".into()),
                    member: "c".into(),
                    max_messages: 5,
                    ..Default::default()
                },
            )
            .await;
        if ok_or_not_found("queue fetch", &fetched) {
            return;
        }
        let offsets: Vec<u64> = fetched
            .map(|f| f.messages.iter().map(|r| r.message.offset.0).collect())
            .unwrap_or_default();
        if offsets.is_empty() {
            continue;
        }
        let acked = client.ack(topic, "workers", &offsets, None).await;
        if ok_or_not_found("ack", &acked) {
            return;
        }
        let nacked = client.nack(topic, "workers", &offsets, 0, None).await;
        if ok_or_not_found("nack", &nacked) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deleted_under_load_is_gone_and_comes_back_fresh_only_when_created_again() {
    const MESSAGES: u64 = 200;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &[]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    admin
        .create_topic("jobs", small_segments())
        .await
        .expect("create");
    for i in 0..MESSAGES {
        admin
            .produce("jobs", vec![NewMessage::from_value(format!("job {i}"))])
            .await
            .expect("produce");
    }
    admin
        .create_group("jobs", "workers", GroupMode::Queue, None)
        .await
        .expect("group");
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let client = Client::connect(&broker.addr, "consumer")
                .await
                .expect("connect");
            tasks.spawn(queue_consumer(client, "jobs", Arc::clone(&stop)));
        }
        tokio::time::sleep(Duration::from_millis(10 + 5 * round as u64)).await;
        admin
            .delete_group("jobs", "workers")
            .await
            .expect("delete group");
        let stopper = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                stop.store(true, Ordering::SeqCst);
            })
        };
        while let Some(done) = tasks.join_next().await {
            done.expect("a racing client panicked");
        }
        stopper.abort();
        assert!(!stop.load(Ordering::SeqCst), "every consumer saw NOT_FOUND");
        let err = admin
            .describe_group("jobs", "workers")
            .await
            .expect_err("deleted");
        assert_eq!(err.code(), Some(pb::Code::NotFound), "{err}");
        let left: Vec<_> = std::fs::read_dir(data.join("topics/jobs/groups"))
            .expect("groups folder")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");

        // Created again: nothing done, nothing delivered before.
        admin
            .create_group("jobs", "workers", GroupMode::Queue, None)
            .await
            .expect("create again");
        let info = admin
            .describe_group("jobs", "workers")
            .await
            .expect("describe");
        assert_eq!((info.committed, info.lag), (0, MESSAGES), "{info:?}");
        let first = admin
            .fetch(
                "jobs",
                FetchOptions {
                    group: Some("workers".into()),
                    member: "check".into(),
                    max_messages: 1000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        assert_eq!(first.messages.len() as u64, MESSAGES);
        assert!(first.messages.iter().all(|r| r.delivery == 1));
        let offsets: Vec<u64> = first.messages.iter().map(|r| r.message.offset.0).collect();
        admin
            .nack("jobs", "workers", &offsets, 0, None)
            .await
            .expect("give them back");
    }
    drop(admin);
    let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {logs}");
}

// ---------------------------------------------------------------------------
// Crashes at every step, on the simulated disk
// ---------------------------------------------------------------------------

const ROOT: &str = "/data";

fn open_registry(disk: &Arc<SimDisk>) -> Registry {
    let data = DataDir::open(Arc::clone(disk) as Arc<dyn Storage>, ROOT)
        .expect("the simulated data dir is free to lock");
    Registry::open(data, RegistryOptions::default()).expect("the registry opens")
}

/// Power fails, the machine restarts, the broker opens the data again.
fn power_cut(disk: &Arc<SimDisk>, registry: Registry) -> Registry {
    drop(registry);
    disk.power_cut(None);
    open_registry(disk)
}

fn listing(disk: &SimDisk, dir: &str) -> Vec<String> {
    let mut names = disk.list_dir(Path::new(dir)).unwrap_or_default();
    names.sort();
    names
}

/// A config no default would produce, to tell it apart after a restart.
fn marked_config() -> TopicConfig {
    TopicConfig {
        max_deliveries: 7,
        log: LogConfig {
            segment_bytes: 1024,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    }
}

#[test]
fn a_topic_creation_cut_by_a_crash_or_a_full_disk_leaves_the_topic_whole_or_absent() {
    for n in 0.. {
        let disk = Arc::new(SimDisk::new());
        let registry = open_registry(&disk);
        disk.power_off_after_syncs(Some(disk.sync_count() + n));
        let created = registry.create_topic("t", marked_config()).map(|_| ());
        let registry = power_cut(&disk, registry);
        match registry.topic("t") {
            Ok(t) => assert_eq!(
                t.config(),
                &marked_config(),
                "after {n} syncs: a topic that came back has the config it was created with"
            ),
            Err(e) => {
                assert!(
                    created.is_err(),
                    "after {n} syncs: an acknowledged creation was lost: {e}"
                );
                assert!(listing(&disk, "/data/topics").is_empty());
            }
        }
        assert!(
            listing(&disk, "/data/staging").is_empty(),
            "cleared at start"
        );
        if created.is_ok() {
            break;
        }
        assert!(n < 100, "creating a topic takes under 100 syncs");
    }

    // A full disk: refused, and nothing is left that a start would take for a topic.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    disk.set_fault(SimFault::NoSpace, true);
    let err = registry
        .create_topic("t", marked_config())
        .expect_err("no space for topic.toml");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(listing(&disk, "/data/topics").is_empty());
    disk.set_fault(SimFault::NoSpace, false);
    let registry = power_cut(&disk, registry);
    assert!(
        registry.topic("t").is_err(),
        "a failed creation does not come back"
    );
    let t = registry
        .create_topic("t", marked_config())
        .expect("created once space returns");
    assert_eq!(t.stats().end.0, 0);
}

/// A fresh data directory with topic `t` holding one message, its disk
/// then full.
fn one_message_in_t_on_a_full_disk() -> (Arc<SimDisk>, Registry) {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let t = registry.create_topic("t", marked_config()).expect("create");
    t.produce(&[NewMessage::from_value("m")]).expect("produce");
    drop(t);
    disk.set_fault(SimFault::NoSpace, true);
    (disk, registry)
}

/// Deleting a topic is how a full disk is given room, so it needs none:
/// on a fresh data directory (no deletion before it) the deletion goes
/// through with the disk full, and the topic is gone for good.
#[test]
fn a_topic_is_deleted_on_a_full_disk() {
    let (disk, registry) = one_message_in_t_on_a_full_disk();
    registry
        .delete_topic("t")
        .expect("deleted with the disk full");
    assert!(listing(&disk, "/data/topics").is_empty());
    disk.set_fault(SimFault::NoSpace, false);
    let registry = power_cut(&disk, registry);
    assert!(registry.topic("t").is_err(), "the deletion holds");
}

/// A topic that closed for being unused while a full disk refused its
/// clean checkpoint is opened again by the final stop to write it: with
/// room by then the stop is clean; without, the stop fails and is not
/// recorded as clean, so the next start recovers the topic.
#[test]
fn a_topic_closed_without_its_clean_checkpoint_is_stopped_again_at_the_end() {
    for room in [true, false] {
        let (disk, registry) = one_message_in_t_on_a_full_disk();
        assert!(registry.close_unused("t"), "closed all the same");
        assert!(registry.open_topic("t").is_none());
        disk.set_fault(SimFault::NoSpace, !room);
        let stopped = registry.stop_all();
        assert_eq!(stopped.is_ok(), room, "room {room}: {stopped:?}");
        let checkpoint = spool::storage::checkpoint::Checkpoint::load(
            &*disk,
            std::path::Path::new("/data/topics/t"),
        )
        .expect("checkpoint");
        assert_eq!(
            checkpoint.is_some_and(|c| c.clean),
            room,
            "room {room}: the topic's clean checkpoint written by the stop"
        );
        disk.set_fault(SimFault::NoSpace, false);
        drop(registry);
        let registry = open_registry(&disk);
        assert_eq!(registry.clean_start(), room, "room {room}");
        let t = registry.topic("t").expect("topic");
        assert_eq!(t.stats().end.0, 1, "room {room}");
    }
}

#[test]
fn a_topic_deletion_cut_by_a_crash_leaves_the_topic_whole_or_absent() {
    for n in 0.. {
        let disk = Arc::new(SimDisk::new());
        let registry = open_registry(&disk);
        let t = registry.create_topic("t", marked_config()).expect("create");
        for i in 0..50u64 {
            t.produce(&[NewMessage::from_value(format!("m{i}-{}", "v".repeat(100)))])
                .expect("produce");
        }
        t.create_group("g", GroupMode::Stream, Position::Earliest)
            .expect("group");
        t.commit("g", Offset(20)).expect("commit");
        drop(t);
        disk.power_off_after_syncs(Some(disk.sync_count() + n));
        let deleted = registry.delete_topic("t").map(|_| ());
        let registry = power_cut(&disk, registry);
        match registry.topic("t") {
            Ok(t) => {
                assert!(
                    deleted.is_err(),
                    "after {n} syncs: a confirmed delete came undone"
                );
                assert_eq!(t.stats().end.0, 50, "whole: every message");
                assert_eq!(t.describe_group("g").expect("group").committed, 20);
            }
            Err(_) => assert!(listing(&disk, "/data/topics").is_empty()),
        }
        assert!(listing(&disk, "/data/trash").is_empty(), "cleared at start");
        if deleted.is_ok() {
            break;
        }
        assert!(n < 100, "deleting a topic takes under 100 syncs");
    }
}

#[test]
fn a_group_whose_deletion_a_crash_cut_short_is_created_fresh() {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let t = registry.create_topic("t", marked_config()).expect("create");
    for i in 0..30u64 {
        t.produce(&[NewMessage::from_value(format!("m{i}"))])
            .expect("produce");
    }
    t.create_group("g", GroupMode::Stream, Position::Earliest)
        .expect("group");
    // Enough commits for the group to write a snapshot.
    for i in 0..spool::groups::state::SNAPSHOT_EVERY + 1 {
        t.commit("g", Offset(10 + i % 2)).expect("commit");
    }
    let snap = Path::new("/data/topics/t/groups/g.snap");
    let snapshot = disk.read_file(snap).expect("the group has a snapshot");
    t.delete_group("g").expect("delete group");
    // What a crash between removing the journal and the snapshot leaves.
    let file = disk
        .open(snap, spool::storage::io::OpenMode::CreateNew)
        .expect("put the snapshot back");
    file.write_at(0, &snapshot).expect("write");
    file.sync_data().expect("sync");
    disk.sync_dir(Path::new("/data/topics/t/groups"))
        .expect("sync dir");
    drop((t, file));

    let registry = power_cut(&disk, registry);
    let t = registry.topic("t").expect("topic");
    assert!(
        t.list_groups().expect("groups").is_empty(),
        "no group without its journal"
    );
    let info = t
        .create_group("g", GroupMode::Queue, Position::Earliest)
        .expect("create again");
    assert_eq!(
        (info.mode, info.committed, info.lag),
        (GroupMode::Queue, 0, 30),
        "a group created again starts fresh"
    );
}

/// A group creation that fails part-way (out of descriptors once its
/// journal is made) leaves nothing behind: before, its journal stayed, and
/// the next open of the topic set it aside as a group the topic does not
/// list, with a warning for each. A retry then creates the group.
#[test]
fn a_group_creation_that_fails_leaves_no_files() {
    use spool::storage::io::SimOp;
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let t = registry
        .create_topic("t", TopicConfig::default())
        .expect("create");
    t.create_group("first", GroupMode::Queue, Position::Earliest)
        .expect("the groups folder");
    let groups = Path::new(ROOT).join("topics/t/groups");
    {
        let (disk2, groups) = (Arc::clone(&disk), groups.clone());
        disk.set_hook(Some(Arc::new(move |op, path| {
            if op == SimOp::SyncDir && path == groups {
                disk2.set_fault(SimFault::OutOfFiles, true);
            }
        })));
    }
    let failed = t.create_group("g", GroupMode::Queue, Position::Earliest);
    disk.set_hook(None);
    disk.set_fault(SimFault::OutOfFiles, false);
    assert!(failed.is_err(), "the creation fails: {failed:?}");
    let left: Vec<String> = disk
        .list_dir(&groups)
        .expect("list")
        .into_iter()
        .filter(|f| f.starts_with("g."))
        .collect();
    assert!(left.is_empty(), "files of the failed group: {left:?}");
    t.create_group("g", GroupMode::Queue, Position::Earliest)
        .expect("a retry creates it");
}

/// A create that arrives while a delete of the name waits for a request
/// inside the topic (an offset delete's sync) waits for the delete, then
/// creates the topic: it is not told the topic exists, only to find it
/// gone a moment later.
#[test]
fn a_create_during_a_delete_waiting_for_a_request_waits_then_creates() {
    use spool::storage::io::SimOp;
    let disk = Arc::new(SimDisk::new());
    let registry = Arc::new(open_registry(&disk));
    let t = registry
        .create_topic("t", TopicConfig::default())
        .expect("create");
    t.produce(&[NewMessage::from_value("x")]).expect("produce");
    let fired = Arc::new(AtomicBool::new(false));
    let (deleted_tx, deleted_rx) = std::sync::mpsc::channel();
    let (created_tx, created_rx) = std::sync::mpsc::channel();
    {
        let (registry, fired) = (Arc::clone(&registry), Arc::clone(&fired));
        disk.set_hook(Some(Arc::new(move |op, path| {
            let deletions = path.to_string_lossy().contains("deletes");
            if op != SimOp::SyncData || !deletions || fired.swap(true, Ordering::SeqCst) {
                return;
            }
            // While this request is inside the topic: a delete, then a
            // create of the same name.
            let (r, tx) = (Arc::clone(&registry), deleted_tx.clone());
            std::thread::spawn(move || {
                let _ = tx.send(r.delete_topic("t").map(|_| ()));
            });
            std::thread::sleep(Duration::from_millis(200));
            let (r, tx) = (Arc::clone(&registry), created_tx.clone());
            std::thread::spawn(move || {
                let _ = tx.send(r.create_topic("t", TopicConfig::default()).map(|_| ()));
            });
            std::thread::sleep(Duration::from_millis(300));
        })));
    }
    t.delete(&[Offset(0)]).expect("delete offset 0");
    disk.set_hook(None);
    let deleted = deleted_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the delete answers");
    let created = created_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the create answers");
    assert!(deleted.is_ok(), "{deleted:?}");
    assert!(created.is_ok(), "the create during the delete: {created:?}");
    let again = registry.topic("t").expect("the new topic");
    assert_eq!(again.stats().end, Offset(0), "a new, empty topic");
}
