//! Why this exists: consumer groups are the promise spool makes to the apps on
//! top of it — a consumer that was offline, crashed or slow gets exactly what it
//! missed, a queue message is handled once by one consumer, a poison message
//! ends in the dead-letter topic instead of looping, and none of this is undone
//! by a broker crash or a power cut. These tests drive the broker core
//! (`Registry`/`Topic`/`Group`) on the simulated disk, so power cuts are real.

use bytes::Bytes;
use proptest::prelude::*;
use spool::broker::topic::dlq_headers;
use spool::broker::{Position, Registry, RegistryOptions, Topic, TopicConfig};
use spool::groups::{Group, GroupConfig, GroupMode, RangeSet};
use spool::storage::io::{SimDisk, SimFault, Storage};
use spool::storage::log::now_ms;
use spool::storage::{DataDir, FsyncPolicy, Header, LogConfig, Message, NewMessage, Offset};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const ROOT: &str = "/data";
/// Large enough that no test fetch is ever cut by bytes.
const NO_BYTE_LIMIT: usize = 64 << 20;

fn open_registry(disk: &Arc<SimDisk>) -> Registry {
    let data = DataDir::open(Arc::clone(disk) as Arc<dyn Storage>, ROOT)
        .expect("the simulated data dir is free to lock");
    Registry::open_all(data, RegistryOptions::default()).expect("the registry opens and recovers")
}

/// Drops the broker and starts it again; with `cut`, the power fails in
/// between and everything not synced is lost (the first unsynced page of each
/// file may keep a torn prefix).
fn restart(disk: &Arc<SimDisk>, registry: Registry, cut: Option<Option<u64>>) -> Registry {
    drop(registry);
    if let Some(tear) = cut {
        disk.power_cut(tear);
    }
    open_registry(disk)
}

fn config(fsync: FsyncPolicy) -> TopicConfig {
    TopicConfig {
        log: LogConfig {
            fsync,
            segment_bytes: 1 << 20,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    }
}

fn queue_config(fsync: FsyncPolicy, max_deliveries: u32, ack_timeout_ms: u64) -> TopicConfig {
    TopicConfig {
        max_deliveries,
        ack_timeout_ms,
        ..config(fsync)
    }
}

fn value(i: u64) -> Bytes {
    Bytes::from(format!("message-{i}"))
}

/// Appends messages `from..to` (values name their number) and returns the
/// offsets they got.
/// A fresh simulated disk with topic `jobs` (`queue_config`) and its
/// queue group `workers`, reading from the start.
fn jobs_for_workers(
    max_deliveries: u32,
    ack_timeout_ms: u64,
) -> (Arc<SimDisk>, Registry, Arc<Topic>) {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "jobs",
            queue_config(FsyncPolicy::Always, max_deliveries, ack_timeout_ms),
        )
        .expect("create topic");
    topic
        .ensure_group("workers", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    (disk, registry, topic)
}

fn produce(topic: &Topic, from: u64, to: u64) -> std::ops::Range<u64> {
    let batch: Vec<NewMessage> = (from..to)
        .map(|i| NewMessage::from_value(value(i)))
        .collect();
    let appended = topic.produce(&batch).expect("append a batch");
    appended.first.0..appended.last.0 + 1
}

fn offsets(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.offset.0).collect()
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a [u8]> {
    m.headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| &h.value[..])
}

/// Every live message of a topic, by replay from the start.
fn replay_all(topic: &Topic) -> Vec<Message> {
    let mut out = Vec::new();
    let mut from = topic.resolve(Position::Earliest).expect("earliest").0;
    loop {
        let batch = topic
            .read(Offset(from), 1000, NO_BYTE_LIMIT)
            .expect("replay");
        let Some(last) = batch.last() else {
            return out;
        };
        from = last.offset.0 + 1;
        out.extend(batch);
    }
}

/// Log output captured while a closure runs (to check recovery warnings).
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text =
        String::from_utf8_lossy(&sink.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    (out, text)
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

/// The poison message of the dead-letter tests: a key, a header and a value
/// that must all reach the dead-letter topic unchanged.
fn poison() -> NewMessage {
    NewMessage::from_value("cannot be parsed")
        .with_key("order-17")
        .with_header("trace", "abc")
}

fn check_dead_letter(dlq: &Topic, source: &str, offset: u64, group: &str, deliveries: u32) {
    let letters = replay_all(dlq);
    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    let m = &letters[0];
    assert_eq!(&m.value[..], b"cannot be parsed", "original value kept");
    assert_eq!(
        m.key.as_deref(),
        Some(&b"order-17"[..]),
        "original key kept"
    );
    assert_eq!(
        m.headers.first(),
        Some(&Header::new("trace", "abc")),
        "original headers kept, first"
    );
    assert_eq!(header(m, dlq_headers::TOPIC), Some(source.as_bytes()));
    assert_eq!(
        header(m, dlq_headers::OFFSET),
        Some(offset.to_string().as_bytes())
    );
    assert_eq!(header(m, dlq_headers::GROUP), Some(group.as_bytes()));
    assert_eq!(
        header(m, dlq_headers::DELIVERIES),
        Some(deliveries.to_string().as_bytes())
    );
    let reason = header(m, dlq_headers::REASON).expect("a reason header");
    assert!(
        String::from_utf8_lossy(reason).contains("max_deliveries"),
        "reason names the limit: {:?}",
        String::from_utf8_lossy(reason)
    );
}

#[test]
fn a_poison_message_reaches_the_dead_letter_topic_after_max_deliveries() {
    // A message no consumer can handle must leave the queue after
    // max_deliveries, intact and labelled, instead of blocking it forever.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("jobs", queue_config(FsyncPolicy::Always, 3, 1_000))
        .expect("create topic");
    topic.produce(&[poison()]).expect("produce the poison");
    produce(&topic, 1, 3);
    topic
        .ensure_group("workers", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    let mut now = now_ms();
    // Deliveries 1..=3, given back alternately by a lease timeout and a nack;
    // the healthy messages are acked on the way.
    for delivery in 1..=3u32 {
        let fetch = registry
            .fetch_queue("jobs", "workers", "w1", 10, NO_BYTE_LIMIT, now)
            .expect("fetch");
        assert!(
            fetch.dead_letters.is_empty(),
            "too early: {:?}",
            fetch.dead_letters
        );
        let poisoned: Vec<_> = fetch
            .deliveries
            .iter()
            .filter(|d| d.message.offset.0 == 0)
            .collect();
        assert_eq!(poisoned.len(), 1, "delivery {delivery} of the poison");
        assert_eq!(poisoned[0].delivery, delivery, "delivery number");
        let healthy: Vec<u64> = fetch
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .filter(|&o| o != 0)
            .collect();
        if !healthy.is_empty() {
            topic
                .ack("workers", &as_offsets(&healthy))
                .expect("ack the healthy ones");
        }
        if delivery % 2 == 1 {
            now += 1_001;
        } else {
            assert_eq!(
                topic.nack("workers", &as_offsets(&[0]), 0).expect("nack"),
                1
            );
            // Topic::nack stamps the wall clock; stay at or after it.
            now = now.max(now_ms());
        }
    }
    assert!(
        registry.topic("jobs.dlq").is_err(),
        "no dead-letter topic before a message is dead-lettered"
    );
    let fetch = registry
        .fetch_queue("jobs", "workers", "w1", 10, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert!(
        fetch.deliveries.is_empty(),
        "no fourth delivery: {:?}",
        fetch.deliveries
    );
    assert_eq!(
        fetch
            .dead_letters
            .iter()
            .map(|d| d.offset)
            .collect::<Vec<_>>(),
        vec![Offset(0)]
    );
    let dlq = registry
        .topic("jobs.dlq")
        .expect("default dead-letter topic");
    check_dead_letter(&dlq, "jobs", 0, "workers", 3);
    // Dead-lettered means completed: never delivered again, even after a restart.
    let info = topic.describe_group("workers").expect("describe");
    assert_eq!((info.committed, info.lag, info.pending), (3, 0, 0));
    drop((topic, dlq));
    let registry = restart(&disk, registry, Some(None));
    let fetch = registry
        .fetch_queue("jobs", "workers", "w1", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch after restart");
    assert!(fetch.deliveries.is_empty() && fetch.dead_letters.is_empty());
    let dlq = registry
        .topic("jobs.dlq")
        .expect("dead-letter topic survives");
    assert_eq!(replay_all(&dlq).len(), 1, "dead-lettered once");
}

#[test]
fn a_configured_dead_letter_topic_is_used() {
    // Operators route poison messages of a topic to a topic they chose.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "payments",
            TopicConfig {
                dead_letter: Some("payments-poison".into()),
                ..queue_config(FsyncPolicy::Always, 1, 1_000)
            },
        )
        .expect("create topic");
    topic.produce(&[poison()]).expect("produce");
    topic
        .ensure_group("g", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let now = now_ms();
    let first = registry
        .fetch_queue("payments", "g", "m", 1, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1);
    let second = registry
        .fetch_queue("payments", "g", "m", 1, NO_BYTE_LIMIT, now + 1_000)
        .expect("fetch after the lease ran out");
    assert_eq!(second.dead_letters.len(), 1);
    assert!(
        registry.topic("payments.dlq").is_err(),
        "default name unused"
    );
    let dlq = registry.topic("payments-poison").expect("configured dlq");
    check_dead_letter(&dlq, "payments", 0, "g", 1);
}

#[test]
fn a_queue_group_needs_room_for_its_topics_dead_letter_name() {
    // A topic named at the length limit cannot have `<name>.dlq`: a queue
    // group on it is refused when created, naming the fix, not at its
    // first dead letter (which would fail every fetch that found it due).
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let long = "x".repeat(197);
    let topic = registry
        .create_topic(&long, queue_config(FsyncPolicy::Always, 1, 1_000))
        .expect("a 197-character topic");
    let e = topic
        .create_group("g", GroupMode::Queue, Position::Earliest)
        .expect_err("no room for the default dead-letter topic");
    assert!(matches!(e, spool::Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("dead_letter"), "{e}");
    let e = topic
        .ensure_group("g", GroupMode::Queue, Position::Earliest)
        .expect_err("nor by ensure_group");
    assert!(matches!(e, spool::Error::InvalidArgument(_)), "{e}");
    topic
        .create_group("s", GroupMode::Stream, Position::Earliest)
        .expect("stream groups do not dead-letter");

    // With a dead-letter topic of its own, the queue works end to end.
    let named = "y".repeat(200);
    let topic = registry
        .create_topic(
            &named,
            TopicConfig {
                dead_letter: Some("poison".into()),
                ..queue_config(FsyncPolicy::Always, 1, 1_000)
            },
        )
        .expect("a 200-character topic");
    topic.produce(&[poison()]).expect("produce");
    topic
        .create_group("g", GroupMode::Queue, Position::Earliest)
        .expect("a queue group");
    let now = now_ms();
    let first = registry
        .fetch_queue(&named, "g", "m", 1, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1);
    let second = registry
        .fetch_queue(&named, "g", "m", 1, NO_BYTE_LIMIT, now + 1_000)
        .expect("fetch after the lease ran out");
    assert_eq!(second.dead_letters.len(), 1);
}

#[test]
fn two_deletes_of_a_closed_topic_at_once_answer_deleted_and_not_found() {
    // Two DeleteTopic requests (or one and the idle sweep) for a topic that
    // is closed: the one that waited for the other's lock finds the topic
    // gone, NOT_FOUND as the docs say, never an I/O error for the folder
    // the first one moved away.
    let disk = Arc::new(SimDisk::new());
    let registry = Arc::new(open_registry(&disk));
    for round in 0..2000 {
        let name = format!("t{round}");
        drop(
            registry
                .create_topic(&name, config(FsyncPolicy::Never))
                .expect("create"),
        );
        assert!(registry.close_unused(&name), "closed");
        let start = Arc::new(std::sync::Barrier::new(2));
        let deletes: Vec<_> = (0..2)
            .map(|_| {
                let (registry, start, name) =
                    (Arc::clone(&registry), Arc::clone(&start), name.clone());
                std::thread::spawn(move || {
                    start.wait();
                    registry.delete_topic(&name).map(|_| ())
                })
            })
            .collect();
        let mut answers: Vec<_> = deletes
            .into_iter()
            .map(|d| d.join().expect("no panic"))
            .collect();
        answers.sort_by_key(Result::is_err);
        assert!(answers[0].is_ok(), "round {round}: {answers:?}");
        assert!(
            matches!(answers[1], Err(spool::Error::TopicNotFound(_))),
            "round {round}: {answers:?}"
        );
    }
}

#[test]
fn a_poison_message_cannot_loop_forever_across_restarts() {
    // A consumer that crashes the broker (or is restarted with it) on every
    // delivery: the delivery count must survive each restart, so the message
    // still reaches the dead-letter topic. Every delivery's count is synced
    // before it is handed out (groups::state), so the bound is exact:
    // max_deliveries deliveries in total, numbered 1, 2, 3, ...
    const MAX: u32 = 3;
    for cut in [None, Some(None), Some(Some(7))] {
        let disk = Arc::new(SimDisk::new());
        let mut registry = open_registry(&disk);
        let topic = registry
            .create_topic("jobs", queue_config(FsyncPolicy::Always, MAX, 60_000))
            .expect("create topic");
        topic.produce(&[poison()]).expect("produce");
        topic
            .ensure_group("workers", GroupMode::Queue, Position::Earliest)
            .expect("group");
        drop(topic);
        let mut deliveries = Vec::new();
        let mut dead = false;
        for _ in 0..3 * (MAX + 1) {
            let fetch = registry
                .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now_ms())
                .expect("fetch");
            deliveries.extend(fetch.deliveries.iter().map(|d| d.delivery));
            if !fetch.dead_letters.is_empty() {
                dead = true;
                break;
            }
            registry = restart(&disk, registry, cut);
        }
        assert!(
            dead,
            "restart mode {cut:?}: never dead-lettered after deliveries {deliveries:?}"
        );
        assert_eq!(
            deliveries,
            (1..=MAX).collect::<Vec<_>>(),
            "restart mode {cut:?}: delivery numbers"
        );
        let dlq = registry.topic("jobs.dlq").expect("dead-letter topic");
        let letters = replay_all(&dlq);
        assert_eq!(letters.len(), 1);
        let counted: u32 = std::str::from_utf8(
            header(&letters[0], dlq_headers::DELIVERIES).expect("deliveries header"),
        )
        .expect("utf-8")
        .parse()
        .expect("a number");
        assert_eq!(counted, MAX, "deliveries header");
    }
}

// ---------------------------------------------------------------------------
// Recovery: group state clamped into the log
// ---------------------------------------------------------------------------

/// A topic whose log is not synced by appends (`fsync=never`) holding
/// `durable` synced messages followed by `lost` ones a power cut will take.
fn log_with_unsynced_tail(registry: &Registry, durable: u64, lost: u64) -> Arc<Topic> {
    let topic = registry
        .create_topic("events", queue_config(FsyncPolicy::Never, 10, 60_000))
        .expect("create topic");
    produce(&topic, 0, durable);
    topic.log().sync().expect("sync the durable prefix");
    produce(&topic, durable, durable + lost);
    topic
}

#[test]
fn a_stream_commit_past_the_log_end_is_kept_and_the_log_skips_the_lost_offsets() {
    // A commit can reach the disk while the log tail it covers does not
    // (fsync=never); the offsets the group saw are never handed out again:
    // the log continues after them and the group reads the new messages.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = log_with_unsynced_tail(&registry, 10, 10);
    topic
        .ensure_group("s", GroupMode::Stream, Position::Earliest)
        .expect("stream group");
    assert_eq!(
        topic
            .read(Offset(0), 100, NO_BYTE_LIMIT)
            .expect("read")
            .len(),
        20
    );
    topic.commit("s", Offset(20)).expect("commit");
    // The commit reaches the disk, the log tail it covers does not.
    topic.sync_state().expect("sync group state");
    drop(topic);
    drop(registry);
    disk.power_cut(None);
    let (registry, logs) = capture_logs(|| open_registry(&disk));
    assert!(
        logs.contains("WARN") && logs.contains("not reused"),
        "the lost range is logged as a warning: {logs}"
    );
    let topic = registry.topic("events").expect("topic");
    assert_eq!(
        topic.stats().end.0,
        20,
        "the log continues after the lost tail"
    );
    assert_eq!(
        topic
            .read(Offset(0), 100, NO_BYTE_LIMIT)
            .expect("read")
            .len(),
        10
    );
    assert_eq!(topic.describe_group("s").expect("describe").committed, 20);
    produce(&topic, 100, 105);
    let committed = topic.describe_group("s").expect("describe").committed;
    let read = topic
        .read(Offset(committed), 100, NO_BYTE_LIMIT)
        .expect("read");
    assert_eq!(offsets(&read), (20..25).collect::<Vec<_>>());
    assert_eq!(&read[0].value[..], &value(100)[..]);
}

#[test]
fn queue_acks_past_the_log_end_keep_their_offsets_out_of_reuse_after_a_power_cut() {
    // Acks synced past what the log kept name messages that are gone; those
    // offsets are never given to new messages, pending ones are redelivered
    // and new messages are first deliveries.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = log_with_unsynced_tail(&registry, 10, 10);
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    let now = now_ms();
    let fetch = registry
        .fetch_queue("events", "q", "m", 100, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(fetch.deliveries.len(), 20);
    // 5..12 stay pending; 12..15 are acked past what the disk will keep.
    let acked: Vec<u64> = (0..5).chain(12..15).collect();
    topic.ack("q", &as_offsets(&acked)).expect("ack");
    topic.sync_state().expect("sync group state");
    drop(topic);
    drop(registry);
    disk.power_cut(None);
    let (registry, logs) = capture_logs(|| open_registry(&disk));
    let topic = registry.topic("events").expect("topic");
    assert!(logs.contains("WARN"), "the lost range is logged: {logs}");
    assert_eq!(
        topic.stats().end.0,
        20,
        "the log continues after the lost tail"
    );
    produce(&topic, 100, 110);
    let fetch = registry
        .fetch_queue("events", "q", "m", 100, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let got: Vec<(u64, u32)> = fetch
        .deliveries
        .iter()
        .map(|d| (d.message.offset.0, d.delivery))
        .collect();
    let expected: Vec<(u64, u32)> = (5..10)
        .map(|o| (o, 2))
        .chain((20..30).map(|o| (o, 1)))
        .collect();
    assert_eq!(
        got, expected,
        "pending ones redelivered, new ones delivered once at new offsets"
    );
    assert!(fetch.dead_letters.is_empty());
}

#[test]
fn group_state_before_a_retention_cut_moves_to_the_log_start() {
    // Retention may drop messages a queue group never got to; the group must
    // go on from the oldest message left, and say so.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "old",
            TopicConfig {
                log: LogConfig {
                    segment_bytes: 1024,
                    retention_bytes: Some(1024),
                    ..LogConfig::default()
                },
                ..TopicConfig::default()
            },
        )
        .expect("create topic");
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..60 {
        produce(&topic, i, i + 1);
    }
    let dropped = topic.log().enforce_retention(now_ms()).expect("retention");
    assert!(!dropped.is_empty(), "retention dropped segments");
    let start = topic.stats().start.0;
    assert!(start > 0);
    drop(topic);
    let (registry, logs) = capture_logs(|| restart(&disk, registry, None));
    assert!(
        logs.contains("queue group moved up to the log's start"),
        "{logs}"
    );
    let topic = registry.topic("old").expect("topic");
    assert_eq!(
        topic.describe_group("q").expect("describe").committed,
        start
    );
    let fetch = registry
        .fetch_queue("old", "q", "m", 1, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    assert_eq!(fetch.deliveries[0].message.offset.0, start);
}

#[test]
fn interval_fsync_makes_a_commit_durable_even_when_no_message_arrives() {
    // Under fsync=interval a confirmed commit is "written": the periodic tick
    // must make it durable, also when the log itself has nothing to sync.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("ticks", config(FsyncPolicy::Interval(1)))
        .expect("create topic");
    produce(&topic, 0, 10);
    topic
        .log()
        .sync()
        .expect("the log is synced: nothing left for it to do");
    topic
        .ensure_group("s", GroupMode::Stream, Position::Earliest)
        .expect("group");
    topic.commit("s", Offset(7)).expect("commit");
    std::thread::sleep(std::time::Duration::from_millis(2));
    topic.tick().expect("tick");
    drop(topic);
    let registry = restart(&disk, registry, Some(None));
    let topic = registry.topic("ticks").expect("topic");
    assert_eq!(topic.describe_group("s").expect("describe").committed, 7);
}

// ---------------------------------------------------------------------------
// Competing consumers
// ---------------------------------------------------------------------------

#[test]
fn members_of_one_queue_group_split_the_work_in_turns() {
    // Deterministic turns: each member holds its own leases, so the next one
    // gets different messages, and every message is completed exactly once.
    for members in [2usize, 3, 5] {
        let disk = Arc::new(SimDisk::new());
        let registry = open_registry(&disk);
        let topic = registry
            .create_topic("work", config(FsyncPolicy::Always))
            .expect("create topic");
        produce(&topic, 0, 100);
        topic
            .ensure_group("pool", GroupMode::Queue, Position::Earliest)
            .expect("group");
        let now = now_ms();
        let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut held: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut completed = BTreeSet::new();
        for turn in 0.. {
            let member = format!("m{}", turn % members);
            // Members ack what they hold only every other turn, so leases
            // overlap in time.
            if (turn / members) % 2 == 1 {
                let mine = held.remove(&member).unwrap_or_default();
                if !mine.is_empty() {
                    topic.ack("pool", &as_offsets(&mine)).expect("ack");
                    for o in mine {
                        assert!(completed.insert(o), "{o} completed twice");
                    }
                }
            }
            let fetch = registry
                .fetch_queue("work", "pool", &member, 7, NO_BYTE_LIMIT, now)
                .expect("fetch");
            for d in &fetch.deliveries {
                assert_eq!(d.delivery, 1, "no redelivery without a timeout");
                let o = d.message.offset.0;
                assert!(!completed.contains(&o), "{o} delivered after its ack");
                assert!(
                    held.values().all(|h| !h.contains(&o)),
                    "{o} leased to two members at once"
                );
            }
            let offsets: Vec<u64> = fetch
                .deliveries
                .iter()
                .map(|d| d.message.offset.0)
                .collect();
            got.entry(member.clone()).or_default().extend(&offsets);
            held.entry(member).or_default().extend(offsets);
            if completed.len() == 100 {
                break;
            }
            assert!(turn < 1_000, "the work never finished");
        }
        assert_eq!(completed, (0..100).collect::<BTreeSet<_>>());
        assert_eq!(got.len(), members, "every member got work: {got:?}");
        let info = topic.describe_group("pool").expect("describe");
        assert_eq!((info.committed, info.lag, info.pending), (100, 0, 0));
        assert_eq!(info.members.len(), members);
    }
}

#[test]
fn a_member_extends_and_gives_back_only_the_leases_it_holds() {
    // What a gRPC Consume stream relies on: extending its leases keeps them
    // past the ack timeout, and giving back what it held on close never
    // takes a message another member now holds.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("work", queue_config(FsyncPolicy::Always, 10, 1_000))
        .expect("create topic");
    produce(&topic, 0, 4);
    topic
        .ensure_group("pool", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let now = now_ms();
    let leased = |member: &str, at: u64| -> Vec<(u64, u32)> {
        registry
            .fetch_queue("work", "pool", member, 10, NO_BYTE_LIMIT, at)
            .expect("fetch")
            .deliveries
            .iter()
            .map(|d| (d.message.offset.0, d.delivery))
            .collect()
    };
    let first: Vec<(u64, u32)> = registry
        .fetch_queue("work", "pool", "a", 3, NO_BYTE_LIMIT, now)
        .expect("fetch")
        .deliveries
        .iter()
        .map(|d| (d.message.offset.0, d.delivery))
        .collect();
    assert_eq!(first, [(0, 1), (1, 1), (2, 1)]);

    let extend = |member: &str, offsets: &[u64], ms: Option<u64>| {
        topic
            .extend_leases("pool", member, &as_offsets(offsets), ms)
            .expect("extend")
    };
    assert_eq!(extend("b", &[0], Some(60_000)), [], "b holds no lease");
    assert_eq!(
        extend("a", &[0, 1, 3], Some(60_000)),
        as_offsets(&[0, 1]),
        "3 is not leased"
    );
    let refused = topic
        .extend_leases("pool", "a", &as_offsets(&[0]), Some(0))
        .expect_err("a lease of 0 ms is refused");
    assert!(
        refused.to_string().contains("ack_timeout_ms 0"),
        "{refused}"
    );
    // Without a timeout, the group's (1 s): 1 expires again soon.
    assert_eq!(extend("a", &[1], None), as_offsets(&[1]));

    // Past the first lease time: 1 and 2 expired, 0 is still a's.
    let later = now + 5_000;
    assert_eq!(leased("b", later), [(1, 2), (2, 2), (3, 1)]);
    assert_eq!(
        topic
            .release_leases("pool", "a", &[(0, 1), (1, 1), (2, 1)])
            .expect("release"),
        1
    );
    // Another consumer under b's name that was handed delivery 1 of 1
    // leaves: delivery 2, b's now, stays (two streams of one member name).
    assert_eq!(
        topic
            .release_leases("pool", "b", &[(1, 1)])
            .expect("release"),
        0
    );
    assert_eq!(
        topic
            .release_leases("pool", "b", &[(2, 2)])
            .expect("release"),
        1
    );
    // Given back at once: 0 (a's) and 2 (b's), and nothing b still holds.
    assert_eq!(leased("c", later), [(0, 2), (2, 3)]);
    let info = topic.describe_group("pool").expect("describe");
    assert_eq!(info.pending, 4);
    // A nack's delay has the same bound as a lease: beyond it, refused
    // naming it, and the lease stays.
    let refused = topic
        .nack("pool", &as_offsets(&[0]), u64::MAX)
        .expect_err("a delay past 100 years");
    assert!(refused.to_string().contains("delay_ms"), "{refused}");
    assert_eq!(
        topic.nack("pool", &as_offsets(&[0]), 0).expect("nack"),
        1,
        "still leased after the refusal"
    );
    // A read nobody took gives a lease back only while it is still the
    // delivery that read took: c holds 2 as its third delivery.
    let unread = |member: &str, offset: u64, delivery: u32| {
        topic
            .release_unread("pool", member, &[(offset, delivery)])
            .expect("release")
    };
    assert_eq!(unread("c", 2, 2), 0, "an earlier delivery's lease");
    assert_eq!(unread("b", 2, 3), 0, "another member's lease");
    assert_eq!(unread("c", 2, 3), 1);
}

#[test]
fn concurrent_consumers_complete_every_message_once_while_a_producer_appends() {
    // Real threads on one registry: leases taken under contention must never
    // hand one message to two members.
    const MESSAGES: u64 = 2_000;
    for consumers in [2usize, 4] {
        let disk = Arc::new(SimDisk::new());
        let registry = Arc::new(open_registry(&disk));
        let topic = registry
            .create_topic("work", config(FsyncPolicy::Always))
            .expect("create topic");
        topic
            .ensure_group("pool", GroupMode::Queue, Position::Earliest)
            .expect("group");
        let producer = {
            let topic = Arc::clone(&topic);
            std::thread::spawn(move || {
                for i in (0..MESSAGES).step_by(20) {
                    produce(&topic, i, i + 20);
                }
            })
        };
        let workers: Vec<_> = (0..consumers)
            .map(|c| {
                let registry = Arc::clone(&registry);
                let topic = Arc::clone(&topic);
                std::thread::spawn(move || {
                    let member = format!("worker-{c}");
                    let mut done = Vec::new();
                    loop {
                        let fetch = registry
                            .fetch_queue("work", "pool", &member, 16, NO_BYTE_LIMIT, now_ms())
                            .expect("fetch");
                        let offsets: Vec<u64> = fetch
                            .deliveries
                            .iter()
                            .map(|d| d.message.offset.0)
                            .collect();
                        if offsets.is_empty() {
                            let info = topic.describe_group("pool").expect("describe");
                            if info.committed == MESSAGES {
                                return done;
                            }
                            std::thread::yield_now();
                            continue;
                        }
                        topic.ack("pool", &as_offsets(&offsets)).expect("ack");
                        done.extend(offsets);
                    }
                })
            })
            .collect();
        producer.join().expect("producer thread");
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("worker thread"));
        }
        let unique: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "some message was completed twice");
        assert_eq!(unique, (0..MESSAGES).collect::<BTreeSet<_>>());
        assert_eq!(topic.describe_group("pool").expect("describe").lag, 0);
    }
}

// ---------------------------------------------------------------------------
// Power cuts around acks
// ---------------------------------------------------------------------------

/// Fetches everything the group has to give right now, without acking.
fn drain_offsets(registry: &Registry, topic: &str, group: &str, now: u64) -> Vec<u64> {
    let fetch = registry
        .fetch_queue(topic, group, "after", 1_000, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert!(fetch.dead_letters.is_empty());
    fetch
        .deliveries
        .iter()
        .map(|d| d.message.offset.0)
        .collect()
}

#[test]
fn a_power_cut_keeps_confirmed_acks_and_may_drop_unsynced_ones() {
    // fsync=never: an ack is confirmed only by an explicit sync; the power
    // fails with later acks written but not synced.
    for tear in [None, Some(1), Some(2), Some(3), Some(4000)] {
        let disk = Arc::new(SimDisk::new());
        let registry = open_registry(&disk);
        let topic = registry
            .create_topic("acks", queue_config(FsyncPolicy::Never, 10, 60_000))
            .expect("create topic");
        produce(&topic, 0, 30);
        topic.log().sync().expect("messages are durable");
        topic
            .ensure_group("g", GroupMode::Queue, Position::Earliest)
            .expect("group");
        let fetched = drain_offsets(&registry, "acks", "g", now_ms());
        assert_eq!(fetched, (0..30).collect::<Vec<_>>());
        let confirmed: Vec<u64> = (0..10).chain(15..20).collect();
        topic.ack("g", &as_offsets(&confirmed)).expect("ack");
        topic.sync_state().expect("the acks are confirmed");
        let unconfirmed: Vec<u64> = (10..15).chain(20..25).collect();
        topic
            .ack("g", &as_offsets(&unconfirmed))
            .expect("ack (written, not synced)");
        drop(topic);
        let registry = restart(&disk, registry, Some(tear));
        let again = drain_offsets(&registry, "acks", "g", now_ms());
        for o in &confirmed {
            assert!(
                !again.contains(o),
                "tear {tear:?}: confirmed ack of {o} lost"
            );
        }
        for o in 25..30 {
            assert!(
                again.contains(&o),
                "tear {tear:?}: unacked {o} not redelivered"
            );
        }
        for o in &again {
            assert!(!confirmed.contains(o) && *o < 30);
        }
        if tear.is_none() {
            // Nothing of the unsynced entry reached the disk.
            for o in &unconfirmed {
                assert!(
                    again.contains(o),
                    "unsynced ack of {o} survived a clean cut"
                );
            }
        }
    }
}

#[test]
fn acks_a_crashed_broker_left_unsynced_are_durable_after_the_next_sync() {
    // fsync=never: acks written before a broker crash live on in the page
    // cache; once the restarted broker syncs its state, they must be on disk.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("acks", queue_config(FsyncPolicy::Never, 10, 60_000))
        .expect("create topic");
    produce(&topic, 0, 3);
    topic.log().sync().expect("messages are durable");
    topic
        .ensure_group("g", GroupMode::Queue, Position::Earliest)
        .expect("group");
    assert_eq!(
        drain_offsets(&registry, "acks", "g", now_ms()),
        vec![0, 1, 2]
    );
    topic
        .ack("g", &as_offsets(&[0, 2]))
        .expect("ack (written, not synced)");
    drop(topic);
    let registry = restart(&disk, registry, None);
    let topic = registry.topic("acks").expect("topic");
    topic.sync_state().expect("sync state");
    drop(topic);
    let registry = restart(&disk, registry, Some(None));
    assert_eq!(drain_offsets(&registry, "acks", "g", now_ms()), vec![1]);
}

#[test]
fn a_power_cut_during_an_acks_sync_keeps_the_acks_confirmed_before_it() {
    // fsync=always: every returned ack is durable. The machine stops inside
    // the next ack's sync; that ack is not confirmed and may be redelivered.
    for extra_syncs in [0, 1] {
        let disk = Arc::new(SimDisk::new());
        let registry = open_registry(&disk);
        let topic = registry
            .create_topic("acks", queue_config(FsyncPolicy::Always, 10, 60_000))
            .expect("create topic");
        produce(&topic, 0, 20);
        topic
            .ensure_group("g", GroupMode::Queue, Position::Earliest)
            .expect("group");
        assert_eq!(drain_offsets(&registry, "acks", "g", now_ms()).len(), 20);
        topic
            .ack("g", &as_offsets(&[0, 1, 2, 3, 7]))
            .expect("confirmed ack");
        disk.power_off_after_syncs(Some(disk.sync_count() + extra_syncs));
        let failed = topic.ack("g", &as_offsets(&[4, 5, 6, 8]));
        let second = topic.ack("g", &as_offsets(&[9, 10]));
        assert!(
            failed.is_err() || second.is_err(),
            "an ack after the power went off reported success"
        );
        drop(topic);
        let registry = restart(&disk, registry, Some(Some(extra_syncs)));
        let again = drain_offsets(&registry, "acks", "g", now_ms());
        for o in [0, 1, 2, 3, 7] {
            assert!(!again.contains(&o), "confirmed ack of {o} lost");
        }
        if failed.is_err() {
            for o in [4, 5, 6, 8] {
                assert!(again.contains(&o), "{o}: an ack that failed took effect");
            }
        }
        for o in 11..20 {
            assert!(again.contains(&o), "{o} was never acked");
        }
    }
}

// ---------------------------------------------------------------------------
// Stream groups and replay
// ---------------------------------------------------------------------------

/// Ten messages stamped 1000, 2000, ..., 10000 ms.
fn timed_topic(registry: &Registry, name: &str) -> Arc<Topic> {
    let topic = registry
        .create_topic(name, config(FsyncPolicy::Always))
        .expect("create topic");
    let batch: Vec<NewMessage> = (0..10u64)
        .map(|i| NewMessage {
            timestamp_ms: Some((i + 1) * 1000),
            ..NewMessage::from_value(value(i))
        })
        .collect();
    topic.produce(&batch).expect("produce");
    topic
}

#[test]
fn replay_starts_at_earliest_latest_an_offset_or_a_timestamp() {
    // A new consumer replays history from where it chooses, without any state.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = timed_topic(&registry, "clicks");
    let first = |p: Position| {
        let from = topic.resolve(p).expect("resolve").0;
        let read = topic.read(Offset(from), 100, NO_BYTE_LIMIT).expect("read");
        (
            from,
            read.first().map(|m| (m.offset.0, m.timestamp_ms)),
            read.len(),
        )
    };
    assert_eq!(first(Position::Earliest), (0, Some((0, 1000)), 10));
    assert_eq!(first(Position::Latest), (10, None, 0));
    assert_eq!(first(Position::Offset(6)), (6, Some((6, 7000)), 4));
    assert_eq!(
        first(Position::Offset(1_000)),
        (10, None, 0),
        "clamped to the end"
    );
    assert_eq!(first(Position::Timestamp(4_500)), (4, Some((4, 5000)), 6));
    assert_eq!(first(Position::Timestamp(3_000)), (2, Some((2, 3000)), 8));
    assert_eq!(first(Position::Timestamp(0)), (0, Some((0, 1000)), 10));
    assert_eq!(first(Position::Timestamp(99_999)), (10, None, 0));
    // Latest is where new messages land.
    let latest = topic.resolve(Position::Latest).expect("latest");
    produce(&topic, 10, 12);
    let read = topic.read(latest, 100, NO_BYTE_LIMIT).expect("read");
    assert_eq!(offsets(&read), vec![10, 11]);
    // Replay needs no state: reading twice gives the same messages.
    assert_eq!(replay_all(&topic), replay_all(&topic));
}

#[test]
fn a_timestamp_never_resolves_to_a_deleted_message() {
    // Readers never see deleted messages: a time lookup landing on one
    // passes it, and what follows it below the time asked for, as it would
    // once compaction removed it (the answer does not change with that).
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("t", config(FsyncPolicy::Always))
        .expect("create topic");
    // Producer timestamps out of order: 1000, 7000, 2000, 9000.
    let batch: Vec<NewMessage> = [1000u64, 7000, 2000, 9000]
        .iter()
        .enumerate()
        .map(|(i, &ts)| NewMessage {
            timestamp_ms: Some(ts),
            ..NewMessage::from_value(value(i as u64))
        })
        .collect();
    topic.produce(&batch).expect("produce");
    let at = |ts: u64| topic.resolve(Position::Timestamp(ts)).expect("resolve").0;
    assert_eq!(at(5_000), 1, "before the delete");
    topic.delete(&as_offsets(&[1])).expect("delete");
    assert_eq!(at(5_000), 3, "the first live message at or after 5000");
    assert_eq!(at(1_500), 2, "a deleted one on the way is passed");
    topic.delete(&as_offsets(&[3])).expect("delete");
    assert_eq!(at(5_000), 4, "none left: the end");
}

#[test]
fn a_stream_group_resumes_at_its_commit_after_a_restart() {
    // A stream consumer restarted (or a broker restarted under it) must go on
    // from its last commit, neither skipping nor repeating committed messages.
    let disk = Arc::new(SimDisk::new());
    let mut registry = open_registry(&disk);
    let topic = timed_topic(&registry, "clicks");
    topic
        .create_group("analytics", GroupMode::Stream, Position::Earliest)
        .expect("group");
    assert!(
        topic
            .create_group("analytics", GroupMode::Stream, Position::Earliest)
            .is_err(),
        "a group is created once"
    );
    topic.commit("analytics", Offset(4)).expect("commit");
    assert!(
        topic.commit("analytics", Offset(11)).is_err(),
        "commit past the end"
    );
    assert!(
        topic.ack("analytics", &as_offsets(&[5])).is_err(),
        "a stream group commits, it does not ack"
    );
    drop(topic);
    for (cut, commit) in [(None, 6), (Some(None), 8), (Some(Some(3)), 9)] {
        registry = restart(&disk, registry, cut);
        let topic = registry.topic("clicks").expect("topic");
        let info = topic.describe_group("analytics").expect("describe");
        assert_eq!(info.mode, GroupMode::Stream);
        let resumed = topic
            .read(Offset(info.committed), 100, NO_BYTE_LIMIT)
            .expect("read from the commit");
        let before = match cut {
            None => 4,
            Some(None) => 6,
            Some(Some(_)) => 8,
        };
        assert_eq!(
            info.committed, before,
            "restart {cut:?} resumes at the commit"
        );
        assert_eq!(resumed.first().map(|m| m.offset.0), Some(before));
        assert_eq!(info.lag, 10 - before);
        topic.commit("analytics", Offset(commit)).expect("commit");
    }
}

#[test]
fn seeking_moves_a_group_to_earliest_latest_an_offset_or_a_timestamp_durably() {
    // Operators rewind or skip a group; the new position must hold across a
    // power cut like a commit does.
    let disk = Arc::new(SimDisk::new());
    let mut registry = open_registry(&disk);
    let topic = timed_topic(&registry, "clicks");
    topic
        .ensure_group("s", GroupMode::Stream, Position::Latest)
        .expect("stream group at the end");
    assert_eq!(topic.describe_group("s").expect("describe").committed, 10);
    drop(topic);
    let cases = [
        (Position::Earliest, 0),
        (Position::Offset(7), 7),
        (Position::Timestamp(4_500), 4),
        (Position::Offset(500), 10),
        (Position::Latest, 10),
        (Position::Timestamp(1), 0),
    ];
    for (position, expected) in cases {
        let topic = registry.topic("clicks").expect("topic");
        assert_eq!(
            topic.seek("s", position).expect("seek"),
            Offset(expected),
            "{position:?}"
        );
        drop(topic);
        registry = restart(&disk, registry, Some(None));
        let topic = registry.topic("clicks").expect("topic");
        assert_eq!(
            topic.describe_group("s").expect("describe").committed,
            expected,
            "seek to {position:?} survives a power cut"
        );
    }
    // A queue group that seeks treats everything before as done and
    // everything from there on as pending again.
    let topic = registry.topic("clicks").expect("topic");
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    let all = drain_offsets(&registry, "clicks", "q", now_ms());
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    topic.ack("q", &as_offsets(&all)).expect("ack");
    assert_eq!(
        topic.seek("q", Position::Timestamp(8_000)).expect("seek"),
        Offset(7)
    );
    drop(topic);
    registry = restart(&disk, registry, Some(None));
    assert_eq!(
        drain_offsets(&registry, "clicks", "q", now_ms()),
        vec![7, 8, 9]
    );
}

// ---------------------------------------------------------------------------
// Deletion
// ---------------------------------------------------------------------------

#[test]
fn deleted_messages_are_never_delivered_or_replayed_again() {
    // An app deletes a message (say, a cancelled order) and relies on no
    // consumer ever seeing it again, also after a crash.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("orders", config(FsyncPolicy::Always))
        .expect("create topic");
    produce(&topic, 0, 10);
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    topic
        .ensure_group("s", GroupMode::Stream, Position::Earliest)
        .expect("stream group");
    // 3 is leased when it is deleted; 2 and 5 were never delivered.
    let fetch = registry
        .fetch_queue("orders", "q", "m", 4, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    assert_eq!(fetch.deliveries.len(), 4);
    topic.ack("q", &as_offsets(&[0, 1])).expect("ack");
    topic.delete(&as_offsets(&[2, 3, 5])).expect("delete");
    assert!(
        topic.delete(&as_offsets(&[10])).is_err(),
        "deleting past the end is refused"
    );
    let expected: Vec<u64> = vec![0, 1, 4, 6, 7, 8, 9];
    assert_eq!(offsets(&replay_all(&topic)), expected);
    for o in [2, 3, 5] {
        assert!(topic.is_deleted(Offset(o)).expect("is_deleted"));
    }
    drop(topic);
    let registry = restart(&disk, registry, Some(Some(11)));
    let topic = registry.topic("orders").expect("topic");
    assert_eq!(
        offsets(&replay_all(&topic)),
        expected,
        "deletions are durable"
    );
    // Lease of 3 is gone with the restart; it is not handed out again.
    let later = now_ms() + 3_600_000;
    let delivered = drain_offsets(&registry, "orders", "q", later);
    assert_eq!(delivered, vec![4, 6, 7, 8, 9]);
    topic.ack("q", &as_offsets(&delivered)).expect("ack");
    // Nothing is left for the queue group, so nothing holds the log back:
    // deleted messages are not needed by anyone.
    let info = topic.describe_group("q").expect("describe");
    assert_eq!((info.committed, info.lag), (10, 0), "{info:?}");
    assert_eq!(
        topic.needed_offset().expect("needed"),
        Some(Offset(0)),
        "stream group at 0"
    );
    topic.commit("s", Offset(2)).expect("commit");
    assert_eq!(
        topic.needed_offset().expect("needed"),
        Some(Offset(4)),
        "the stream group's next live message is 4 (2 and 3 are deleted)"
    );
    topic.commit("s", Offset(10)).expect("commit");
    assert_eq!(topic.needed_offset().expect("needed"), Some(Offset(10)));
}

#[test]
fn on_delete_when_consumed_topics_a_message_completed_by_every_group_is_gone() {
    // Queue-style topics drop what every group has handled; it must stay gone
    // whatever happens to the groups afterwards.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "tasks",
            TopicConfig {
                delete_when_consumed: true,
                ..config(FsyncPolicy::Always)
            },
        )
        .expect("create topic");
    produce(&topic, 0, 8);
    assert_eq!(topic.needed_offset().expect("needed"), None, "no groups");
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    topic
        .ensure_group("s", GroupMode::Stream, Position::Earliest)
        .expect("stream group");
    assert_eq!(drain_offsets(&registry, "tasks", "q", now_ms()).len(), 8);
    topic.ack("q", &as_offsets(&[0, 1, 2, 6])).expect("ack");
    // Only the queue group is done with 0..3 and 6: all still there.
    assert_eq!(replay_all(&topic).len(), 8);
    assert_eq!(topic.needed_offset().expect("needed"), Some(Offset(0)));
    topic.commit("s", Offset(3)).expect("commit");
    // 0..3 are done by both groups; 6 only by the queue group.
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7]);
    assert_eq!(topic.needed_offset().expect("needed"), Some(Offset(3)));
    drop(topic);
    let registry = restart(&disk, registry, Some(Some(5)));
    let topic = registry.topic("tasks").expect("topic");
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7], "durable");
    // Consumed stays deleted when the groups change: a group created later
    // does not get it, a seek back does not bring it back, and neither does
    // removing every group.
    topic
        .ensure_group("late", GroupMode::Queue, Position::Earliest)
        .expect("late group");
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7]);
    assert_eq!(topic.needed_offset().expect("needed"), Some(Offset(3)));
    assert_eq!(
        drain_offsets(&registry, "tasks", "late", now_ms()),
        vec![3, 4, 5, 6, 7]
    );
    assert_eq!(
        topic.seek("s", Position::Earliest).expect("seek"),
        Offset(0)
    );
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7]);
    for g in ["q", "s", "late"] {
        topic.delete_group(g).expect("delete group");
    }
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7]);
    drop(topic);
    let registry = restart(&disk, registry, Some(None));
    let topic = registry.topic("tasks").expect("topic");
    assert_eq!(offsets(&replay_all(&topic)), vec![3, 4, 5, 6, 7], "durable");
}

// ---------------------------------------------------------------------------
// Bounded state
// ---------------------------------------------------------------------------

/// One entry of the group journal is at most this large on disk (record
/// header plus the largest entry payload).
const MAX_JOURNAL_ENTRY: u64 = 64;

fn file_len(disk: &SimDisk, path: &str) -> u64 {
    disk.read_file(Path::new(path))
        .map_or(0, |b| b.len() as u64)
}

#[test]
fn group_state_stays_flat_while_a_million_acks_pass_one_stuck_message() {
    // One message is never acked while a million later ones are, in acks of
    // a few messages each: the completed set stays one range, and snapshots
    // keep the journal from growing with the traffic.
    const N: u64 = 1_000_000;
    const ACK: u64 = 8;
    let disk = Arc::new(SimDisk::new());
    let open = || {
        Group::open(
            Arc::clone(&disk) as Arc<dyn Storage>,
            Path::new("/g"),
            "q",
            GroupConfig::new(GroupMode::Queue),
            0,
        )
        .expect("open group")
    };
    let mut group = open();
    assert!(matches!(
        group.deliver(0, "slow", 0).expect("deliver"),
        spool::groups::Decision::Deliver { delivery: 1 }
    ));
    let bound = spool::groups::state::SNAPSHOT_EVERY * MAX_JOURNAL_ENTRY;
    let mut largest_journal = 0;
    for o in (1..=N).step_by(ACK as usize) {
        group.complete(o, (o + ACK).min(N + 1)).expect("ack");
        if o % 50_000 == 1 {
            assert!(
                group.done_ranges() <= 2,
                "{} ranges at {o}",
                group.done_ranges()
            );
            largest_journal = largest_journal.max(file_len(&disk, "/g/q.journal"));
        }
    }
    group.sync().expect("sync");
    assert_eq!(
        group.committed(),
        0,
        "the stuck message holds the watermark"
    );
    assert!(group.done_ranges() <= 2);
    assert!(
        largest_journal <= bound,
        "journal grew to {largest_journal} bytes"
    );
    assert!(
        file_len(&disk, "/g/q.snap") <= 256,
        "snapshot holds the whole state"
    );
    drop(group);
    disk.power_cut(None);
    let group = open();
    assert_eq!(group.committed(), 0);
    assert!(group.done_ranges() <= 2);
    assert!(!group.is_done(0) && group.is_done(1) && group.is_done(N) && !group.is_done(N + 1));
    assert_eq!(group.info(0..N + 1, &RangeSet::new(), now_ms()).lag, 1);
}

/// Redeliveries alone (a consumer that nacks everything, or leases that
/// keep running out) journal an entry each, and snapshots keep the journal
/// short as they do for acks: before, only an ack or a commit took one, so
/// a group that only redelivered grew its journal without bound (and a
/// restart read all of it).
#[test]
fn a_group_that_only_redelivers_keeps_its_journal_short() {
    const MESSAGES: u64 = 1_000;
    const ROUNDS: u32 = 30;
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "nacked",
            TopicConfig {
                max_deliveries: u32::MAX,
                ..TopicConfig::default()
            },
        )
        .expect("create topic");
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let messages: Vec<NewMessage> = (0..MESSAGES).map(|_| NewMessage::from_value("n")).collect();
    topic.produce(&messages).expect("produce");
    let journal = "/data/topics/nacked/groups/q.journal";
    let bound = spool::groups::state::SNAPSHOT_EVERY * MAX_JOURNAL_ENTRY;
    let mut largest = 0;
    for round in 1..=ROUNDS {
        let fetch = registry
            .fetch_queue(
                "nacked",
                "q",
                "m",
                MESSAGES as usize,
                NO_BYTE_LIMIT,
                now_ms(),
            )
            .expect("fetch");
        assert_eq!(fetch.deliveries.len() as u64, MESSAGES, "round {round}");
        assert!(fetch.deliveries.iter().all(|d| d.delivery == round));
        let offsets: Vec<u64> = fetch
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .collect();
        topic.nack("q", &as_offsets(&offsets), 0).expect("nack");
        largest = largest.max(file_len(&disk, journal));
    }
    assert!(
        largest <= bound,
        "journal grew to {largest} bytes over {} redeliveries",
        MESSAGES * u64::from(ROUNDS)
    );
    topic.sync_state().expect("sync");
    drop(topic);
    let registry = restart(&disk, registry, Some(None));
    let fetch = registry
        .fetch_queue("nacked", "q", "m", 1, NO_BYTE_LIMIT, now_ms())
        .expect("fetch after the restart");
    assert_eq!(
        fetch.deliveries.first().map(|d| d.delivery),
        Some(ROUNDS + 1),
        "every delivery counted across the snapshots"
    );
}

#[test]
fn a_topic_with_one_stuck_message_keeps_small_group_files_under_heavy_traffic() {
    // The same through the broker: messages fetched in batches and acked
    // (half the acks arrive out of order, so many journal entries are
    // written); the stuck one is redelivered after a restart, nothing else.
    const N: u64 = 200_000;
    const BATCH: usize = 2_000;
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "firehose",
            TopicConfig {
                log: LogConfig {
                    fsync: FsyncPolicy::Never,
                    segment_bytes: 64 << 20,
                    ..LogConfig::default()
                },
                ..TopicConfig::default()
            },
        )
        .expect("create topic");
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let empty: Vec<NewMessage> = (0..10_000).map(|_| NewMessage::from_value("")).collect();
    for _ in 0..N / 10_000 {
        topic.produce(&empty).expect("produce");
    }
    topic.log().sync().expect("sync the log");
    let journal = "/data/topics/firehose/groups/q.journal";
    let snap = "/data/topics/firehose/groups/q.snap";
    // A day ahead: the lease left at the end is still one when the group
    // is described, however long the loop took.
    let now = now_ms() + 86_400_000;
    let bound = spool::groups::state::SNAPSHOT_EVERY * MAX_JOURNAL_ENTRY;
    let mut largest = 0;
    let mut delivered = 0u64;
    loop {
        let fetch = registry
            .fetch_queue("firehose", "q", "m", BATCH, NO_BYTE_LIMIT, now)
            .expect("fetch");
        if fetch.deliveries.is_empty() {
            break;
        }
        delivered += fetch.deliveries.len() as u64;
        let acks: Vec<u64> = fetch
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .filter(|&o| o != 0)
            .collect();
        let (even, odd): (Vec<u64>, Vec<u64>) = acks.iter().partition(|&&o| o % 2 == 0);
        topic.ack("q", &as_offsets(&even)).expect("ack even");
        topic.ack("q", &as_offsets(&odd)).expect("ack odd");
        largest = largest.max(file_len(&disk, journal));
    }
    assert_eq!(delivered, N);
    assert!(largest <= bound, "journal grew to {largest} bytes");
    // A snapshot holds what is in flight (out-of-order acks leave holes for
    // a moment), never the traffic that passed.
    let snapshot = file_len(&disk, snap);
    assert!(snapshot > 0, "snapshots were taken");
    assert!(
        snapshot <= 16 * BATCH as u64 + 256,
        "{snapshot} byte snapshot"
    );
    let info = topic.describe_group("q").expect("describe");
    assert_eq!((info.committed, info.lag, info.pending), (0, 1, 1));
    topic.sync_state().expect("sync");
    drop(topic);
    let registry = restart(&disk, registry, Some(None));
    assert_eq!(drain_offsets(&registry, "firehose", "q", now_ms()), vec![0]);
}

// ---------------------------------------------------------------------------
// Model test: random interleavings against a model of the queue contract
// ---------------------------------------------------------------------------

const MODEL_MAX_DELIVERIES: u32 = 3;
const MODEL_ACK_TIMEOUT_MS: u64 = 60_000;
/// Delay of a delayed nack; far longer than a test run, far shorter than a
/// [`Op::Later`] jump, so whether it is due is never in doubt.
const MODEL_NACK_DELAY_MS: u64 = 3_600_000;

#[derive(Debug, Clone)]
enum Op {
    Fetch {
        member: usize,
        max: usize,
    },
    /// Acks the member's held messages picked by the bit mask.
    Ack {
        member: usize,
        pick: u64,
    },
    Nack {
        member: usize,
        pick: u64,
        delayed: bool,
    },
    /// Time passes beyond the ack timeout: every lease runs out.
    Timeout,
    /// Time passes beyond the nack delay.
    Later,
    Produce {
        count: u64,
    },
    /// `sync_state`: confirms acks under `fsync=never`.
    Sync,
    /// Broker restart; `Some(tear)` cuts the power first.
    Restart {
        cut: Option<Option<u64>>,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, 1usize..8).prop_map(|(member, max)| Op::Fetch { member, max }),
        4 => (0usize..3, any::<u64>()).prop_map(|(member, pick)| Op::Ack { member, pick }),
        2 => (0usize..3, any::<u64>(), any::<bool>())
            .prop_map(|(member, pick, delayed)| Op::Nack { member, pick, delayed }),
        1 => Just(Op::Timeout),
        1 => Just(Op::Later),
        1 => (1u64..6).prop_map(|count| Op::Produce { count }),
        1 => Just(Op::Sync),
        1 => prop_oneof![
            Just(None),
            Just(Some(None)),
            (0u64..5000).prop_map(|t| Some(Some(t))),
        ]
        .prop_map(|cut| Op::Restart { cut }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    No,
    /// Durable: must never be delivered again.
    Confirmed,
    /// Written, not synced: holds until a power cut.
    Unconfirmed,
    /// Was unconfirmed when the power failed: may come back.
    Maybe,
}

#[derive(Debug, Clone)]
struct Msg {
    deliveries: u32,
    /// Lease deadline while the broker holds a lease on it.
    lease: Option<u64>,
    /// A nack delay: due at some time within this window.
    delayed: Option<(u64, u64)>,
    acked: Acked,
    dead: bool,
}

struct QueueModel {
    msgs: Vec<Msg>,
    /// Per member: messages delivered to it that it has not given back.
    held: Vec<BTreeSet<u64>>,
    last_first_delivery: Option<u64>,
    skew: u64,
    fsync: FsyncPolicy,
}

enum Availability {
    Yes,
    Maybe,
    No,
}

impl QueueModel {
    fn now(&self) -> u64 {
        now_ms() + self.skew
    }

    fn availability(&self, o: u64, now: u64) -> Availability {
        let m = &self.msgs[o as usize];
        if m.dead
            || m.lease.is_some()
            || m.acked == Acked::Confirmed
            || m.acked == Acked::Unconfirmed
        {
            return Availability::No;
        }
        let due = match m.delayed {
            None => Availability::Yes,
            Some((_, hi)) if hi <= now => Availability::Yes,
            Some((lo, _)) if lo > now => Availability::No,
            Some(_) => Availability::Maybe,
        };
        match (due, m.acked) {
            (Availability::No, _) => Availability::No,
            (_, Acked::Maybe) => Availability::Maybe,
            (due, _) => due,
        }
    }

    fn restart(&mut self, power_cut: bool) {
        for m in &mut self.msgs {
            m.lease = None;
            m.delayed = None;
            if power_cut && m.acked == Acked::Unconfirmed {
                m.acked = Acked::Maybe;
            }
        }
        for h in &mut self.held {
            h.clear();
        }
    }
}

fn picked(held: &BTreeSet<u64>, pick: u64) -> Vec<u64> {
    held.iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << (i % 64)) != 0)
        .map(|(_, &o)| o)
        .collect()
}

/// One fetch checked against the model; returns the offsets it delivered and
/// how many it dead-lettered.
fn model_fetch(
    registry: &Registry,
    model: &mut QueueModel,
    member: usize,
    max: usize,
) -> Result<(Vec<u64>, usize), TestCaseError> {
    let now = model.now();
    for m in &mut model.msgs {
        if m.lease.is_some_and(|deadline| deadline <= now) {
            m.lease = None;
        }
    }
    let (mut sure, mut maybe) = (0usize, 0usize);
    for o in 0..model.msgs.len() as u64 {
        match model.availability(o, now) {
            Availability::Yes => sure += 1,
            Availability::Maybe => maybe += 1,
            Availability::No => {}
        }
    }
    let fetch = registry
        .fetch_queue("model", "g", &format!("m{member}"), max, NO_BYTE_LIMIT, now)
        .map_err(|e| TestCaseError::fail(format!("fetch: {e}")))?;
    let handed = fetch.deliveries.len() + fetch.dead_letters.len();
    prop_assert!(
        (max.min(sure)..=max.min(sure + maybe)).contains(&handed),
        "fetch of {max} handed out {handed}; {sure} surely and {maybe} maybe available"
    );
    for d in &fetch.deliveries {
        let o = d.message.offset.0;
        prop_assert!((o as usize) < model.msgs.len(), "offset {o} past the end");
        prop_assert!(
            !matches!(model.availability(o, now), Availability::No),
            "{o} delivered while not available: {:?}",
            model.msgs[o as usize]
        );
        prop_assert_eq!(&d.message.value[..], &value(o)[..]);
        let m = &mut model.msgs[o as usize];
        prop_assert!(
            m.deliveries < MODEL_MAX_DELIVERIES,
            "{o} delivered past the limit"
        );
        prop_assert_eq!(d.delivery, m.deliveries + 1, "delivery number of {}", o);
        if d.delivery == 1 {
            prop_assert!(
                model.last_first_delivery.is_none_or(|l| o > l),
                "first delivery of {} after {:?}: out of offset order",
                o,
                model.last_first_delivery
            );
            model.last_first_delivery = Some(o);
        }
        m.deliveries += 1;
        m.lease = Some(now + MODEL_ACK_TIMEOUT_MS);
        m.delayed = None;
        m.acked = Acked::No;
        model.held[member].insert(o);
    }
    for l in &fetch.dead_letters {
        let o = l.offset.0;
        prop_assert!(
            !matches!(model.availability(o, now), Availability::No),
            "{o} dead-lettered while not available"
        );
        let m = &mut model.msgs[o as usize];
        prop_assert_eq!(
            m.deliveries,
            MODEL_MAX_DELIVERIES,
            "{} dead-lettered early",
            o
        );
        m.dead = true;
    }
    // Nothing is skipped: everything before a first delivery went out.
    if let Some(l) = model.last_first_delivery {
        for o in 0..l {
            prop_assert!(model.msgs[o as usize].deliveries > 0, "{o} skipped");
        }
    }
    Ok((
        fetch
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .collect(),
        fetch.dead_letters.len(),
    ))
}

fn model_ack(topic: &Topic, model: &mut QueueModel, offsets: &[u64]) -> Result<(), TestCaseError> {
    topic
        .ack("g", &as_offsets(offsets))
        .map_err(|e| TestCaseError::fail(format!("ack: {e}")))?;
    for &o in offsets {
        for h in &mut model.held {
            h.remove(&o);
        }
        let m = &mut model.msgs[o as usize];
        m.lease = None;
        m.delayed = None;
        if m.dead || m.acked == Acked::Confirmed {
            continue;
        }
        m.acked = if model.fsync == FsyncPolicy::Always {
            Acked::Confirmed
        } else {
            Acked::Unconfirmed
        };
    }
    Ok(())
}

fn run_queue_model(
    fsync: FsyncPolicy,
    members: usize,
    initial: u64,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let disk = Arc::new(SimDisk::new());
    let mut registry = open_registry(&disk);
    let topic = registry
        .create_topic(
            "model",
            queue_config(fsync, MODEL_MAX_DELIVERIES, MODEL_ACK_TIMEOUT_MS),
        )
        .expect("create topic");
    topic
        .ensure_group("g", GroupMode::Queue, Position::Earliest)
        .expect("group");
    drop(topic);
    let mut model = QueueModel {
        msgs: Vec::new(),
        held: vec![BTreeSet::new(); members],
        last_first_delivery: None,
        skew: 0,
        fsync,
    };
    let produce_some = |registry: &Registry, model: &mut QueueModel, count: u64| {
        let topic = registry.topic("model").expect("topic");
        let from = model.msgs.len() as u64;
        let got = produce(&topic, from, from + count);
        assert_eq!(got, from..from + count, "offsets are dense");
        topic.log().sync().expect("messages are durable");
        model.msgs.extend((0..count).map(|_| Msg {
            deliveries: 0,
            lease: None,
            delayed: None,
            acked: Acked::No,
            dead: false,
        }));
    };
    produce_some(&registry, &mut model, initial);
    for op in ops {
        let topic = registry.topic("model").expect("topic");
        match op {
            Op::Fetch { member, max } => {
                model_fetch(&registry, &mut model, member % members, max)?;
            }
            Op::Ack { member, pick } => {
                let offsets = picked(&model.held[member % members], pick);
                if !offsets.is_empty() {
                    model_ack(&topic, &mut model, &offsets)?;
                }
            }
            Op::Nack {
                member,
                pick,
                delayed,
            } => {
                let member = member % members;
                let offsets = picked(&model.held[member], pick);
                let delay = if delayed { MODEL_NACK_DELAY_MS } else { 0 };
                let expected = offsets
                    .iter()
                    .filter(|&&o| model.msgs[o as usize].lease.is_some())
                    .count();
                let before = now_ms();
                let count = topic.nack("g", &as_offsets(&offsets), delay).expect("nack");
                let after = now_ms();
                prop_assert_eq!(count, expected, "nack of {:?}", offsets);
                for o in offsets {
                    model.held[member].remove(&o);
                    let m = &mut model.msgs[o as usize];
                    if m.lease.take().is_some() {
                        m.delayed = Some((before + delay, after + delay));
                    }
                }
            }
            Op::Timeout => model.skew += MODEL_ACK_TIMEOUT_MS + 1,
            Op::Later => model.skew += MODEL_NACK_DELAY_MS + 1,
            Op::Produce { count } => produce_some(&registry, &mut model, count),
            Op::Sync => {
                topic.sync_state().expect("sync state");
                for m in &mut model.msgs {
                    if m.acked == Acked::Unconfirmed {
                        m.acked = Acked::Confirmed;
                    }
                }
            }
            Op::Restart { cut } => {
                drop(topic);
                registry = restart(&disk, registry, cut);
                model.restart(cut.is_some());
            }
        }
    }
    // Drain: once every lease and delay has run out, everything left is
    // handed out until each message is acked or dead-lettered.
    model.skew += MODEL_NACK_DELAY_MS + MODEL_ACK_TIMEOUT_MS;
    let topic = registry.topic("model").expect("topic");
    for round in 0.. {
        prop_assert!(round < 100, "the drain does not end");
        let (delivered, dead_lettered) = model_fetch(&registry, &mut model, 0, 16)?;
        if delivered.is_empty() && dead_lettered == 0 {
            break;
        }
        if !delivered.is_empty() {
            model_ack(&topic, &mut model, &delivered)?;
        }
    }
    let mut dead = BTreeSet::new();
    for (o, m) in model.msgs.iter().enumerate() {
        prop_assert!(m.dead || m.acked != Acked::No, "{o} lost: {m:?}");
        if m.dead {
            dead.insert(o as u64);
        }
    }
    let info = topic.describe_group("g").expect("describe");
    prop_assert_eq!(
        (info.committed, info.lag, info.pending),
        (model.msgs.len() as u64, 0, 0)
    );
    let letters = match registry.topic("model.dlq") {
        Ok(dlq) => replay_all(&dlq),
        Err(_) => Vec::new(),
    };
    let mut lettered = BTreeSet::new();
    for l in &letters {
        let o: u64 = std::str::from_utf8(header(l, dlq_headers::OFFSET).expect("offset header"))
            .expect("utf-8")
            .parse()
            .expect("a number");
        prop_assert!(lettered.insert(o), "{} dead-lettered twice", o);
        prop_assert_eq!(&l.value[..], &value(o)[..]);
        let deliveries = MODEL_MAX_DELIVERIES.to_string();
        prop_assert_eq!(
            header(l, dlq_headers::DELIVERIES),
            Some(deliveries.as_bytes())
        );
    }
    prop_assert_eq!(lettered, dead);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn queue_groups_follow_the_model(
        always in any::<bool>(),
        members in 1usize..=3,
        initial in 1u64..25,
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        // Hand-picked scenarios miss interleavings; the queue contract must
        // hold for any sequence of consumer actions, restarts and power cuts.
        let fsync = if always { FsyncPolicy::Always } else { FsyncPolicy::Never };
        run_queue_model(fsync, members, initial, ops)?;
    }
}

/// Offsets as the broker takes them.
fn as_offsets(offsets: &[u64]) -> Vec<Offset> {
    offsets.iter().copied().map(Offset).collect()
}

#[test]
fn a_lease_that_ran_out_is_no_lease_for_nack_extend_or_pending() {
    // A slow consumer's late nack (with a long delay) must not hold back a
    // message whose lease ran out: it is due at once, for any member, and
    // no longer counts as pending.
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("jobs", queue_config(FsyncPolicy::Always, 10, 1_000))
        .expect("topic");
    produce(&topic, 0, 1);
    topic
        .create_group("g", GroupMode::Queue, Position::Earliest)
        .expect("group");
    let long_ago = now_ms() - 10_000;
    let first = registry
        .fetch_queue("jobs", "g", "slow", 1, NO_BYTE_LIMIT, long_ago)
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1);
    assert_eq!(topic.describe_group("g").expect("describe").pending, 0);
    assert_eq!(
        topic
            .extend_leases("g", "slow", &[Offset(0)], Some(60_000))
            .expect("extend"),
        Vec::<Offset>::new()
    );
    assert_eq!(topic.nack("g", &[Offset(0)], 60_000).expect("nack"), 0);
    let again = registry
        .fetch_queue("jobs", "g", "quick", 1, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let got: Vec<u64> = again
        .deliveries
        .iter()
        .map(|d| d.message.offset.0)
        .collect();
    assert_eq!(got, [0], "due at once for another member");
}

/// A delivery that never left the broker (a read whose reader went away
/// before taking it) is taken back: it does not count toward
/// `max_deliveries`, the next delivery carries its number again, and that
/// holds across a reopen. Before, each such read used up a delivery, so a
/// consumer that kept reconnecting sent messages nobody had received to
/// the dead-letter topic.
#[test]
fn a_delivery_taken_back_does_not_count() {
    use spool::groups::Decision;
    let disk = Arc::new(SimDisk::new());
    let open = || {
        let mut config = GroupConfig::new(GroupMode::Queue);
        config.max_deliveries = 2;
        Group::open(
            Arc::clone(&disk) as Arc<dyn Storage>,
            Path::new("/g"),
            "q",
            config,
            0,
        )
        .expect("open group")
    };
    let mut group = open();
    let deliver = |group: &mut Group, o: u64| match group.deliver(o, "m", 0).expect("deliver") {
        Decision::Deliver { delivery } => delivery,
        other => panic!("offset {o}: {other:?}"),
    };
    // Offset 0: a first delivery taken back, many times over.
    for _ in 0..5 {
        assert_eq!(deliver(&mut group, 0), 1);
        group.sync().expect("sync");
        assert!(group.nack(0, 0, 0));
        group.undeliver(0, 1).expect("undeliver");
        assert_eq!(group.deliveries(0), 0);
    }
    // Offset 1: a redelivery taken back.
    assert_eq!(deliver(&mut group, 1), 1);
    assert!(group.nack(1, 0, 0));
    assert_eq!(deliver(&mut group, 1), 2);
    assert!(group.nack(1, 0, 0));
    group.undeliver(1, 2).expect("undeliver");
    assert_eq!(group.deliveries(1), 1);
    // Offset 2: delivered again since; taking back the old one changes nothing.
    assert_eq!(deliver(&mut group, 2), 1);
    assert!(group.nack(2, 0, 0));
    assert_eq!(deliver(&mut group, 2), 2);
    group.undeliver(2, 1).expect("undeliver");
    assert_eq!(group.deliveries(2), 2);
    // A first delivery after a take-back counts once more, across a reopen.
    assert_eq!(deliver(&mut group, 0), 1);
    assert!(group.nack(0, 0, 0));
    group.sync().expect("sync");
    drop(group);
    disk.power_cut(None);
    let mut group = open();
    assert_eq!(
        (
            group.deliveries(0),
            group.deliveries(1),
            group.deliveries(2)
        ),
        (1, 1, 2)
    );
    assert_eq!(deliver(&mut group, 0), 2);
    assert!(group.nack(0, 0, 0));
    assert!(matches!(
        group.deliver(0, "m", 0).expect("deliver"),
        Decision::DeadLetter { deliveries: 2 }
    ));
}

/// A queue read whose reader went away before taking it (a subscription or
/// long-poll whose connection closed, a gRPC deadline) gives its leases
/// back at once, and since nothing of it was sent, those deliveries do not
/// count: with `max_deliveries` 1, the messages go to the next reader as
/// first deliveries instead of to the dead-letter topic.
#[test]
fn a_read_nobody_took_gives_its_messages_back_uncounted() {
    let (disk, registry, topic) = jobs_for_workers(1, 60_000);
    produce(&topic, 0, 4);
    for round in 0..3 {
        let unread = registry
            .fetch_queue("jobs", "workers", "gone", 10, NO_BYTE_LIMIT, now_ms())
            .expect("fetch");
        let leased: Vec<(u64, u32)> = unread
            .deliveries
            .iter()
            .map(|d| (d.message.offset.0, d.delivery))
            .collect();
        assert_eq!(
            leased,
            [(0, 1), (1, 1), (2, 1), (3, 1)],
            "round {round}: first deliveries, nothing dead-lettered"
        );
        assert!(unread.dead_letters.is_empty(), "round {round}");
        assert_eq!(
            topic
                .release_unread("workers", "gone", &leased)
                .expect("give back"),
            4
        );
        assert_eq!(topic.describe_group("workers").expect("group").pending, 0);
    }
    let registry = restart(&disk, registry, Some(None));
    let taken = registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let deliveries: Vec<u32> = taken.deliveries.iter().map(|d| d.delivery).collect();
    assert_eq!(deliveries, [1, 1, 1, 1], "after a power cut too");
}

/// A message on its way to the dead-letter topic is held from other reads
/// until its hand-off completes it, however long past a lease time that
/// takes: a second read must not dead-letter it again. A hand-off that
/// fails makes it due again after a lease time.
#[test]
fn a_dead_letter_under_way_is_held_from_other_reads() {
    let (_disk, _registry, topic) = jobs_for_workers(1, 1_000);
    produce(&topic, 0, 1);
    let now = now_ms();
    let first = topic
        .fetch_queue("workers", "w1", 10, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1, "delivery 1");
    // The lease runs out: past max_deliveries, it goes to dead letters.
    let second = topic
        .fetch_queue("workers", "w2", 10, NO_BYTE_LIMIT, now + 1_001)
        .expect("fetch");
    assert_eq!(second.dead_letters.len(), 1, "dead-lettered");
    // Its hand-off still under way a lease time later: not again.
    let third = topic
        .fetch_queue("workers", "w3", 10, NO_BYTE_LIMIT, now + 3_000)
        .expect("fetch");
    assert!(
        third.dead_letters.is_empty() && third.deliveries.is_empty(),
        "dead-lettered a second time: {:?}",
        third.dead_letters
    );
    // The hand-off failed: tried again after a lease time.
    topic
        .retry_dead_letters("workers", &as_offsets(&[0]), now + 3_000)
        .expect("retry");
    let again = topic
        .fetch_queue("workers", "w4", 10, NO_BYTE_LIMIT, now + 4_001)
        .expect("fetch");
    assert_eq!(again.dead_letters.len(), 1, "tried again");
}

/// An empty group name (sent where no group was meant) is named as such.
#[test]
fn an_empty_group_name_is_named_in_its_error() {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    registry
        .create_topic("jobs", config(FsyncPolicy::Always))
        .expect("create topic");
    let err = registry
        .fetch_queue("jobs", "", "m", 10, NO_BYTE_LIMIT, now_ms())
        .expect_err("no such group");
    let text = err.to_string();
    assert!(
        text.contains("group \"\" of topic jobs") && text.contains("no group has an empty name"),
        "{text}"
    );
    // A name no group can have is quoted: it cannot read as the message.
    let err = registry
        .fetch_queue("jobs", "b of topic c", "m", 10, NO_BYTE_LIMIT, now_ms())
        .expect_err("no such group");
    assert_eq!(
        err.to_string(),
        "group \"b of topic c\" of topic jobs does not exist (no group can have that name)"
    );
    // So is an empty topic name, where nothing is created.
    let err = registry
        .fetch_queue("", "g", "m", 10, NO_BYTE_LIMIT, now_ms())
        .expect_err("no such topic");
    assert!(
        err.to_string().contains("topic \"\" does not exist"),
        "{err}"
    );
}

/// A group forgets members not seen for an hour once it knows many: clients
/// that take a new member name for each connection do not grow it without
/// bound.
#[test]
fn a_group_forgets_members_long_unseen() {
    let (_disk, _registry, topic) = jobs_for_workers(5, 1_000);
    let then = now_ms() - 2 * spool::groups::state::MEMBER_FORGET_MS;
    for i in 0..spool::groups::state::MEMBERS_KEPT {
        topic
            .fetch_queue("workers", &format!("gone-{i}"), 1, NO_BYTE_LIMIT, then)
            .expect("fetch");
    }
    topic
        .fetch_queue("workers", "here", 1, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let members = topic.describe_group("workers").expect("group").members;
    assert_eq!(
        members.keys().collect::<Vec<_>>(),
        ["here"],
        "only the member seen within the hour"
    );
}

/// Members seen within the hour are kept up to a bound: a client taking a
/// new member name per connection (socket.io's are per socket), fast,
/// does not grow the group's answer without bound.
#[test]
fn a_group_keeps_at_most_a_bounded_number_of_members() {
    use spool::groups::state::MEMBERS_MOST;
    let (_disk, _registry, topic) = jobs_for_workers(5, 1_000);
    let start = now_ms();
    for i in 0..MEMBERS_MOST + 100 {
        topic
            .fetch_queue(
                "workers",
                &format!("m-{i}"),
                1,
                NO_BYTE_LIMIT,
                start + i as u64,
            )
            .expect("fetch");
    }
    let members = topic.describe_group("workers").expect("group").members;
    assert_eq!(members.len(), MEMBERS_MOST);
    assert!(!members.contains_key("m-99"), "the longest unseen go first");
    assert!(members.contains_key("m-100"));
    assert!(members.contains_key(&format!("m-{}", MEMBERS_MOST + 99)));
}

/// A queue fetch that a full disk refuses hands nothing out, so it counts
/// no delivery: when space returns, the messages come as first deliveries,
/// and with `max_deliveries` 2 one nack does not send them to the
/// dead-letter topic.
#[test]
fn a_fetch_a_full_disk_refuses_counts_no_delivery() {
    let (disk, registry, topic) = jobs_for_workers(2, 60_000);
    produce(&topic, 0, 4);
    disk.set_fault(SimFault::NoSpace, true);
    for _ in 0..3 {
        let e = registry
            .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now_ms())
            .expect_err("a full disk refuses the fetch");
        assert!(matches!(e, spool::Error::Full { .. }), "{e}");
    }
    disk.set_fault(SimFault::NoSpace, false);
    let taken = registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let leased: Vec<(u64, u32)> = taken
        .deliveries
        .iter()
        .map(|d| (d.message.offset.0, d.delivery))
        .collect();
    assert_eq!(leased, [(0, 1), (1, 1), (2, 1), (3, 1)], "first deliveries");
    let offsets: Vec<u64> = leased.iter().map(|&(o, _)| o).collect();
    topic
        .nack("workers", &as_offsets(&offsets), 0)
        .expect("nack");
    let again = registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    assert!(again.dead_letters.is_empty(), "{:?}", again.dead_letters);
    let deliveries: Vec<u32> = again.deliveries.iter().map(|d| d.delivery).collect();
    assert_eq!(deliveries, [2, 2, 2, 2], "second deliveries");
}

/// A dead letter a fetch decided on is held while its hand-off runs; when
/// the fetch itself fails (a full disk refusing its journal), nobody hands
/// it off, so it is due again at once instead of after the dead-letter
/// hold.
#[test]
fn a_dead_letter_of_a_refused_fetch_is_due_again_at_once() {
    let (disk, registry, topic) = jobs_for_workers(1, 1_000);
    produce(&topic, 0, 1);
    let now = now_ms();
    let first = registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1, "delivery 1 of 1");
    produce(&topic, 1, 2);
    // The lease ran out: offset 0 is for the dead-letter topic, offset 1
    // a first delivery whose journal entry the full disk refuses.
    disk.set_fault(SimFault::NoSpace, true);
    registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now + 1_001)
        .expect_err("a full disk refuses the fetch");
    disk.set_fault(SimFault::NoSpace, false);
    let again = registry
        .fetch_queue("jobs", "workers", "w", 10, NO_BYTE_LIMIT, now + 1_002)
        .expect("fetch");
    let dead: Vec<u64> = again.dead_letters.iter().map(|d| d.offset.0).collect();
    assert_eq!(dead, [0], "the dead letter is due again at once");
    let leased: Vec<(u64, u32)> = again
        .deliveries
        .iter()
        .map(|d| (d.message.offset.0, d.delivery))
        .collect();
    assert_eq!(leased, [(1, 1)], "and offset 1 a first delivery");
}

/// Why: every reader passed deleted records one at a time, a queue group
/// completing (and journaling) each under its lock, so the first read of
/// a new group over a million deleted messages held the topic's producers
/// for seconds. A run of deleted offsets is now passed as one step; what
/// each reader gets must be exactly what it got before.
#[test]
fn a_run_of_deleted_messages_is_passed_at_once_by_every_reader() {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("runs", queue_config(FsyncPolicy::Always, 5, 60_000))
        .expect("create topic");
    produce(&topic, 0, 20_000);
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    let now = now_ms();
    // Leased before its deletion: the lease ends as leases do.
    let early = registry
        .fetch_queue("runs", "q", "early", 1, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(offsets_of(&early.deliveries), [0]);
    let deleted: Vec<Offset> = (0..10_000)
        .chain(10_001..19_990)
        .chain([19_995])
        .map(Offset)
        .collect();
    topic.delete(&deleted).expect("delete");

    // Replay, record by record.
    let one = |from: u64| {
        topic
            .read(Offset(from), 1, NO_BYTE_LIMIT)
            .expect("read")
            .iter()
            .map(|m| m.offset.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(one(0), [10_000]);
    assert_eq!(one(10_001), [19_990]);
    assert_eq!(one(19_995), [19_996]);
    // Batches of up to 100: a read returns the live ones among the records
    // it read, reading on only while none was.
    let expected: Vec<u64> = [10_000]
        .into_iter()
        .chain(19_990..19_995)
        .chain(19_996..20_000)
        .collect();
    let (mut all, mut from) = (Vec::new(), 0);
    while from < 20_000 {
        let read = topic.read(Offset(from), 100, NO_BYTE_LIMIT).expect("read");
        let Some(last) = read.last() else { break };
        from = last.offset.0 + 1;
        all.extend(offsets(&read));
    }
    assert_eq!(all, expected);

    // A queue member, one at a time: the live messages, in order, once.
    let mut got = Vec::new();
    loop {
        let f = registry
            .fetch_queue("runs", "q", "m", 1, NO_BYTE_LIMIT, now)
            .expect("fetch");
        if f.deliveries.is_empty() {
            break;
        }
        got.extend(offsets_of(&f.deliveries));
    }
    assert_eq!(got, expected);
    let acked: Vec<Offset> = got.iter().copied().map(Offset).collect();
    topic.ack("q", &acked).expect("ack");
    // The group is done with the whole log (the message leased before its
    // deletion included), and nothing comes again, even once that lease
    // would have run out.
    let info = topic.describe_group("q").expect("describe");
    assert_eq!((info.committed, info.pending, info.lag), (20_000, 0, 0));
    let later = registry
        .fetch_queue("runs", "q", "m", 10, NO_BYTE_LIMIT, now + 120_000)
        .expect("fetch after the lease ran out");
    assert!(
        later.deliveries.is_empty(),
        "{:?}",
        offsets_of(&later.deliveries)
    );

    // Everything from an offset to the end deleted: the reader is past
    // the end at once.
    let tail: Vec<Offset> = (19_996..20_000).map(Offset).collect();
    topic.delete(&tail).expect("delete the tail");
    let limits = spool::broker::topic::DeliveryLimits::new(1, NO_BYTE_LIMIT);
    let records = topic.read_within(Offset(19_995), limits).expect("read");
    assert!(records.is_empty());
    assert_eq!(records.passed(), Some(Offset(20_000)));
}

fn offsets_of(deliveries: &[spool::broker::topic::Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.message.offset.0).collect()
}

/// A run completed at once leaves what is leased in it to its lease, and
/// completes everything around it.
#[test]
fn completing_a_run_skips_its_leased_offsets() {
    let disk = Arc::new(SimDisk::new());
    let mut group = Group::open(
        Arc::clone(&disk) as Arc<dyn Storage>,
        Path::new("/g"),
        "q",
        GroupConfig::new(GroupMode::Queue),
        0,
    )
    .expect("open group");
    for o in [3, 7] {
        group.deliver(o, "m", 0).expect("deliver");
    }
    group.complete(5, 6).expect("complete");
    group.complete_unleased(0, 10).expect("complete the run");
    let done: Vec<u64> = (0..12).filter(|&o| group.is_done(o)).collect();
    assert_eq!(done, [0, 1, 2, 4, 5, 6, 8, 9]);
    assert!(group.is_leased(3) && group.is_leased(7));
}

/// Why: due redeliveries deleted since took a fetch's places: a fetch of
/// one answered empty (a long-poll waited out its time) while a live one
/// was due behind them, and new messages came before due ones. Deleted
/// due offsets take no place now.
#[test]
fn deleted_redeliveries_take_no_place_in_a_fetch() {
    let disk = Arc::new(SimDisk::new());
    let registry = open_registry(&disk);
    let topic = registry
        .create_topic("redo", queue_config(FsyncPolicy::Always, 10, 60_000))
        .expect("create topic");
    produce(&topic, 0, 10);
    topic
        .ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("queue group");
    let now = now_ms();
    let first = registry
        .fetch_queue("redo", "q", "m", 10, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(offsets_of(&first.deliveries), (0..10).collect::<Vec<_>>());
    let all: Vec<Offset> = (0..10).map(Offset).collect();
    topic.nack("q", &all, 0).expect("nack");
    let deleted: Vec<Offset> = (0..8).map(Offset).collect();
    topic.delete(&deleted).expect("delete");
    produce(&topic, 10, 12);
    // Due ones first, lowest first, however many deleted ones lie before
    // (a second on: the nack's own clock read after `now`).
    let now = now_ms() + 1_000;
    let got = registry
        .fetch_queue("redo", "q", "m", 1, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(offsets_of(&got.deliveries), [8]);
    assert_eq!(got.deliveries[0].delivery, 2);
    let got = registry
        .fetch_queue("redo", "q", "m", 2, NO_BYTE_LIMIT, now)
        .expect("fetch");
    assert_eq!(offsets_of(&got.deliveries), [9, 10]);
}
