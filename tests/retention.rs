//! Retention runs: through the real binary, a topic's log stays within
//! `retention_bytes` and `retention_ms`, groups behind the new start go on
//! from it and say how many messages they lost, `retention_respects_groups`
//! keeps what a group still needs up to its hard limits, and neither racing
//! producers and readers, `kill -9` nor a power cut during a pass loses a
//! message retention did not drop.

mod common;

use common::Broker;
use spool::broker::topic::Position;
use spool::broker::{Registry, RegistryOptions, TopicConfig};
use spool::client::{Client, FetchOptions};
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::storage::io::{SimDisk, SimFault, Storage};
use spool::storage::verify::verify;
use spool::storage::{DataDir, FsyncPolicy, LogConfig, NewMessage, Offset};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn value(i: u64) -> Vec<u8> {
    format!("message {i:05} {}", "r".repeat(80)).into_bytes()
}

async fn create(client: &Client, name: &str, config: pb::TopicConfig) {
    client
        .create_topic(name, config)
        .await
        .expect("create topic");
}

async fn produce(client: &Client, topic: &str, from: u64, to: u64) {
    for i in from..to {
        let p = client
            .produce(topic, vec![NewMessage::from_value(value(i))])
            .await
            .expect("produce");
        assert_eq!(p.first_offset, i, "offsets stay dense");
    }
}

/// Waits (up to 10 s) until `check` holds for the topic's info.
async fn wait_for(
    client: &Client,
    topic: &str,
    what: &str,
    check: impl Fn(&pb::TopicInfo) -> bool,
) -> pb::TopicInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = client.describe_topic(topic).await.expect("describe");
        if check(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "{what}: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("topic dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

#[test]
fn bytes_retention_bounds_the_log_and_survives_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let start = rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(
            &client,
            "b",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_bytes: Some(2048),
                ..Default::default()
            },
        )
        .await;
        produce(&client, "b", 0, 200).await;
        let info = wait_for(&client, "b", "retention drops old segments", |i| {
            i.start_offset > 150
        })
        .await;
        let replay = common::replay_all(&client, "b").await;
        assert_eq!(
            replay.first().map(|m| m.message.offset.0),
            Some(info.start_offset)
        );
        assert_eq!(
            replay.len() as u64,
            200 - info.start_offset,
            "nothing after start lost"
        );
        info.start_offset
    });
    let dir = tmp.path().join("topics/b");
    assert!(
        log_bytes(&dir) <= 2048 + 2 * 1024,
        "{} bytes on disk",
        log_bytes(&dir)
    );
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(logs.contains("retention dropped segments"), "{logs}");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let info = client.describe_topic("b").await.expect("describe");
        assert!(info.start_offset >= start, "{info:?}");
        produce(&client, "b", 200, 210).await;
    });
}

/// Retention runs after every seal, also when batches larger than a
/// segment roll it while a pass drops segments: the seal was noticed by the
/// number of segments, which a pass dropping as many left unchanged, so the
/// log stayed over `retention_bytes` until the minute's check.
#[test]
fn retention_follows_every_seal_while_passes_run_alongside_rolls() {
    const SEGMENT: u64 = 4096;
    const KEEP: u64 = 8192;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let topics: Vec<String> = (0..16).map(|t| format!("rolls{t}")).collect();
        for name in &topics {
            create(
                &client,
                name,
                pb::TopicConfig {
                    segment_bytes: Some(SEGMENT),
                    retention_bytes: Some(KEEP),
                    fsync: Some("always".into()),
                    ..Default::default()
                },
            )
            .await;
        }
        // Batches of about 25 KB, each rolling the segment several times,
        // four in flight per topic and all topics at once: rounds roll
        // while the passes their seals started drop segments.
        let produces = topics.iter().flat_map(|name| {
            let client = &client;
            (0..4u64).map(move |lane| async move {
                for round in 0..10u64 {
                    let batch = (0..200)
                        .map(|i| NewMessage::from_value(value((lane * 10 + round) * 200 + i)))
                        .collect();
                    client.produce(name, batch).await.expect("produce");
                }
            })
        });
        futures_util::future::join_all(produces).await;
        // After the last seal's pass, dropping the oldest sealed segment
        // would leave less than KEEP: the log holds less than KEEP plus one
        // segment. Waited for well short of the minute's check.
        for name in &topics {
            wait_for(&client, name, "retention after the last seal", |i| {
                i.bytes < KEEP + SEGMENT
            })
            .await;
        }
    });
}

/// Waits (up to 20 s) until stream group `group` of `topic` has heard of
/// the log's start moving to `start` (a pass tells the groups right after
/// it drops the segments).
async fn wait_committed(client: &Client, topic: &str, group: &str, start: u64) -> pb::GroupInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = client
            .describe_group(topic, group)
            .await
            .expect("describe group");
        if g.committed >= start {
            return g;
        }
        assert!(Instant::now() < deadline, "the group never moved: {g:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stream commit below the log's start (a consumer going back to an
/// offset it saved long ago) is taken as given, but what retention dropped
/// before it is neither lag nor, at the next pass, lost a second time.
#[test]
fn a_commit_below_the_start_counts_nothing_gone_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(
            &client,
            "c",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_bytes: Some(2048),
                ..Default::default()
            },
        )
        .await;
        client
            .create_group("c", "s", GroupMode::Stream, Some(Position::Earliest))
            .await
            .expect("stream group");
        produce(&client, "c", 0, 40).await;
        let first = wait_for(&client, "c", "retention drops old segments", |i| {
            i.start_offset > 0
        })
        .await
        .start_offset;
        let g = wait_committed(&client, "c", "s", first).await;
        assert_eq!(
            g.lost_to_retention, g.committed,
            "all it had not read: {g:?}"
        );
        client
            .commit("c", "s", 0)
            .await
            .expect("commit below the start");
        let info = client.describe_topic("c").await.expect("describe");
        let g = client
            .describe_group("c", "s")
            .await
            .expect("describe group");
        assert_eq!(g.committed, 0, "the commit is taken as given: {g:?}");
        assert_eq!(
            g.lag,
            40 - info.start_offset,
            "only what the log holds is lag: {g:?}, {info:?}"
        );
        produce(&client, "c", 40, 80).await;
        let second = wait_for(&client, "c", "retention drops more", |i| {
            i.start_offset > info.start_offset
        })
        .await
        .start_offset;
        let g = wait_committed(&client, "c", "s", second).await;
        assert_eq!(
            g.lost_to_retention, g.committed,
            "each dropped offset counted once: {g:?}"
        );
    });
}

#[test]
fn time_retention_drops_old_segments_and_groups_count_what_they_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(
            &client,
            "old",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                // Long enough that the fetch below comes first even on a
                // loaded machine.
                retention_ms: Some(5000),
                ..Default::default()
            },
        )
        .await;
        client
            .create_group("old", "s", GroupMode::Stream, Some(Position::Earliest))
            .await
            .expect("stream group");
        client
            .create_group("old", "q", GroupMode::Queue, Some(Position::Earliest))
            .await
            .expect("queue group");
        produce(&client, "old", 0, 40).await;
        // The queue group acks 0..5 and leaves 5 leased.
        let offsets = common::queue_fetch(&client, "old", "q", 10).await;
        assert_eq!(offsets, (0..10).collect::<Vec<_>>());
        client
            .ack("old", "q", &offsets[..5], None)
            .await
            .expect("ack");
        let info = wait_for(&client, "old", "old segments age out", |i| {
            i.start_offset > 10
        })
        .await;
        let start = info.start_offset;
        // The pass tells the groups right after it drops the segments.
        let deadline = Instant::now() + Duration::from_secs(5);
        while client
            .describe_group("old", "s")
            .await
            .expect("s")
            .committed
            < start
        {
            assert!(Instant::now() < deadline, "the stream group never moved");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = client.describe_group("old", "s").await.expect("s");
        assert_eq!(s.committed, start, "the stream group resumes at start");
        assert_eq!(s.lost_to_retention, start, "{s:?}");
        let q = client.describe_group("old", "q").await.expect("q");
        assert_eq!(q.committed, start);
        assert_eq!(
            q.lost_to_retention,
            start - 5,
            "acked messages are not lost: {q:?}"
        );
        assert_eq!(q.pending, 0, "leases in dropped segments are gone");
        // The group goes on from the start.
        let next = common::queue_fetch(&client, "old", "q", 1).await;
        assert_eq!(next, vec![start]);
    });
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "group",
            "describe",
            "old",
            "q",
            "--format",
            "json",
            "--server",
            &broker.addr,
        ])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        json["lost_to_retention"].as_u64().is_some_and(|n| n > 0),
        "{json}"
    );
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.contains("retention dropped messages the group had not completed"),
        "{logs}"
    );
}

#[test]
fn retention_respects_groups_until_the_hard_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(
            &client,
            "jobs",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_bytes: Some(1024),
                retention_respects_groups: Some(true),
                retention_bytes_max: Some(8192),
                ..Default::default()
            },
        )
        .await;
        client
            .create_group("jobs", "q", GroupMode::Queue, Some(Position::Earliest))
            .await
            .expect("queue group");
        // About 4 KiB: over retention_bytes, under the hard limit.
        produce(&client, "jobs", 0, 40).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let info = client.describe_topic("jobs").await.expect("describe");
        assert_eq!(info.start_offset, 0, "a group still needs every segment");
        // Completing the first 20 lets retention drop what only they held.
        client
            .ack("jobs", "q", &(0..20).collect::<Vec<_>>(), None)
            .await
            .expect("ack");
        produce(&client, "jobs", 40, 45).await;
        let info = wait_for(&client, "jobs", "completed segments go", |i| {
            i.start_offset > 0
        })
        .await;
        assert!(info.start_offset <= 20, "nothing the group needs: {info:?}");
        // Past retention_bytes_max retention drops regardless.
        produce(&client, "jobs", 45, 200).await;
        let info = wait_for(&client, "jobs", "the hard limit holds", |i| {
            i.start_offset > 20
        })
        .await;
        let q = client.describe_group("jobs", "q").await.expect("q");
        assert_eq!(
            q.lost_to_retention,
            info.start_offset.min(q.committed) - 20,
            "{q:?} {info:?}"
        );
    });
}

/// `retention_bytes_max` is a hard size limit on its own too: without
/// `retention_bytes`, with `retention_ms` far off or absent, and with or
/// without `retention_respects_groups`, a log over it drops its oldest
/// sealed segments, and a group behind them counts what it lost.
#[test]
fn retention_bytes_max_alone_bounds_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        for (topic, respects, retention_ms) in [
            ("respects", Some(true), Some(3_153_600_000_000)),
            ("plain", None, None),
        ] {
            create(
                &client,
                topic,
                pb::TopicConfig {
                    segment_bytes: Some(1024),
                    retention_bytes_max: Some(2048),
                    retention_respects_groups: respects,
                    retention_ms,
                    ..Default::default()
                },
            )
            .await;
            client
                .create_group(topic, "s", GroupMode::Stream, Some(Position::Earliest))
                .await
                .expect("stream group");
            produce(&client, topic, 0, 60).await;
            wait_for(&client, topic, "the log within its hard limit", |i| {
                i.start_offset > 0 && i.bytes <= 2048
            })
            .await;
            // The group hears of a new start before its segments go: read
            // both until no pass is half-way.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let before = client.describe_topic(topic).await.expect("describe");
                let s = client.describe_group(topic, "s").await.expect("s");
                let after = client.describe_topic(topic).await.expect("describe");
                if before.start_offset == after.start_offset
                    && s.lost_to_retention == after.start_offset
                {
                    assert!(after.bytes <= 2048, "{topic}: {after:?}");
                    break;
                }
                assert!(Instant::now() < deadline, "{topic}: {s:?} {after:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
}

#[test]
fn invalid_retention_settings_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let cases = [
            (
                "delete_retention_ms",
                pb::TopicConfig {
                    delete_retention_ms: Some(0),
                    ..Default::default()
                },
            ),
            (
                "delete_retention_ms",
                pb::TopicConfig {
                    delete_retention_ms: Some(u64::MAX),
                    ..Default::default()
                },
            ),
            (
                "retention_bytes",
                pb::TopicConfig {
                    segment_bytes: Some(4096),
                    retention_bytes: Some(1024),
                    ..Default::default()
                },
            ),
            (
                "retention_ms",
                pb::TopicConfig {
                    retention_ms: Some(0),
                    ..Default::default()
                },
            ),
            (
                "retention_bytes_max",
                pb::TopicConfig {
                    retention_bytes: Some(1 << 30),
                    retention_bytes_max: Some(1 << 20),
                    ..Default::default()
                },
            ),
        ];
        for (i, (field, config)) in cases.into_iter().enumerate() {
            let err = client
                .create_topic(&format!("bad{i}"), config)
                .await
                .expect_err("refused");
            let text = err.to_string();
            assert!(text.contains("InvalidArgument"), "{text}");
            assert!(text.contains(field), "case {i} names {field}: {text}");
        }
    });
}

#[test]
fn retention_racing_producers_and_a_reader_loses_nothing_it_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(
            &client,
            "race",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_bytes: Some(2048),
                compact_min_dirty_ratio: Some(0.01),
                compact_check_ms: Some(20),
                ..Default::default()
            },
        )
        .await;
        let addr = broker.addr.clone();
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let addr = addr.clone();
                tokio::spawn(async move {
                    let client = Client::connect(&addr, "p").await.expect("connect");
                    for i in 0..150u64 {
                        client
                            .produce("race", vec![NewMessage::from_value(value(p * 1000 + i))])
                            .await
                            .expect("every produce is acknowledged");
                    }
                })
            })
            .collect();
        // A reader that keeps replaying from the earliest offset, through
        // segments retention is dropping.
        let reader = tokio::spawn(async move {
            let client = Client::connect(&addr, "r").await.expect("connect");
            let mut reads = 0;
            for _ in 0..200 {
                let fetched = client
                    .fetch(
                        "race",
                        FetchOptions {
                            from: Some(Position::Earliest),
                            max_messages: 50,
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("a read never fails");
                let offsets: Vec<u64> = fetched
                    .messages
                    .iter()
                    .map(|m| m.message.offset.0)
                    .collect();
                assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
                reads += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reads
        });
        for p in producers {
            p.await.expect("producer");
        }
        assert_eq!(reader.await.expect("reader"), 200);
        let info = wait_for(&client, "race", "retention ran", |i| i.start_offset > 0).await;
        let replay = common::replay_all(&client, "race").await;
        assert_eq!(replay.len() as u64, 300 - info.start_offset);
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    let data = DataDir::open(Arc::new(spool::storage::io::OsStorage), tmp.path()).expect("open");
    let report = verify(&data, &mut |_| {}).expect("verify");
    assert!(report.is_clean(), "{:?}", report.damage);
}

#[test]
fn kill_9_during_retention_keeps_every_message_after_the_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut next = 0u64;
    for round in 0..4 {
        let broker = Broker::start(tmp.path(), &[]);
        let addr = broker.addr.clone();
        next = rt().block_on(async move {
            let client = Client::connect(&addr, "t").await.expect("connect");
            if round == 0 {
                create(
                    &client,
                    "k",
                    pb::TopicConfig {
                        segment_bytes: Some(1024),
                        retention_bytes: Some(2048),
                        ..Default::default()
                    },
                )
                .await;
            }
            let info = client.describe_topic("k").await.expect("describe");
            assert_eq!(
                info.end_offset, next,
                "round {round}: the log ends where it did"
            );
            let replay = common::replay_all(&client, "k").await;
            let offsets: Vec<u64> = replay.iter().map(|m| m.message.offset.0).collect();
            // Retention may run between the describe and the replay.
            let first = offsets.first().copied().unwrap_or(next);
            assert!(first >= info.start_offset, "round {round}");
            assert_eq!(offsets, (first..next).collect::<Vec<_>>(), "round {round}");
            for m in &replay {
                assert_eq!(&m.message.value[..], &value(m.message.offset.0)[..]);
            }
            produce(&client, "k", next, next + 60).await;
            next + 60
        });
        // Killed while retention may be dropping what the last produces sealed.
        broker.kill9();
    }
    assert_eq!(next, 240);
}

/// A retention pass that drops segments but cannot tell a group (its
/// journal cannot grow: the disk filled up meanwhile) leaves the count to
/// the next pass: `lost_to_retention` ends up counting every dropped
/// offset the group had not read, once.
#[test]
fn a_group_that_missed_a_pass_counts_its_loss_at_the_next() {
    let disk = Arc::new(SimDisk::new());
    let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/data").expect("lock");
    let reg = Registry::open(data, RegistryOptions::default()).expect("registry opens");
    let topic = sim_retention_topic(&reg);
    topic
        .ensure_group("s", GroupMode::Stream, Position::Earliest)
        .expect("group");
    let produce = |range: std::ops::Range<u64>| {
        for i in range {
            topic
                .produce(&[NewMessage::from_value(value(i))])
                .expect("produce");
        }
    };
    produce(0..40);
    // A full disk: the group's journal cannot take the news, and the
    // segments go all the same (removing files frees room).
    disk.set_fault(SimFault::NoSpace, true);
    let missed = topic.enforce_retention(spool::storage::log::now_ms());
    disk.set_fault(SimFault::NoSpace, false);
    assert!(missed.is_err(), "the group could not hear: {missed:?}");
    let first = topic.stats().start.0;
    assert!(first > 0, "segments went");
    assert_eq!(topic.describe_group("s").expect("s").lost_to_retention, 0);

    produce(40..80);
    topic
        .enforce_retention(spool::storage::log::now_ms())
        .expect("the next pass");
    let start = topic.stats().start.0;
    assert!(start > first, "the next pass dropped more");
    let s = topic.describe_group("s").expect("s");
    assert_eq!(
        (s.committed, s.lost_to_retention),
        (start, start),
        "both passes counted, once"
    );
}

/// A topic `p` on the simulated disk: 1 KiB segments, `retention_bytes`
/// 2048 (passes run when a test calls them).
fn sim_retention_topic(reg: &Registry) -> Arc<spool::broker::Topic> {
    reg.create_topic(
        "p",
        TopicConfig {
            log: LogConfig {
                segment_bytes: 1024,
                retention_bytes: Some(2048),
                fsync: FsyncPolicy::Always,
                ..LogConfig::default()
            },
            ..TopicConfig::default()
        },
    )
    .expect("topic")
}

/// What retention dropped before a stream group existed, or while it was
/// ahead of the start, is not the group's loss, whatever commit later
/// takes it back below the start: the next pass counts only what it drops
/// itself. (With a group created at `Latest`, and with one that had read
/// everything.)
#[test]
fn a_commit_back_below_the_start_counts_only_the_next_drop() {
    for ahead in [false, true] {
        let disk = Arc::new(SimDisk::new());
        let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/data").expect("lock");
        let reg = Registry::open(data, RegistryOptions::default()).expect("registry opens");
        let topic = sim_retention_topic(&reg);
        let produce = |range: std::ops::Range<u64>| {
            for i in range {
                topic
                    .produce(&[NewMessage::from_value(value(i))])
                    .expect("produce");
            }
        };
        if ahead {
            topic
                .create_group("s", GroupMode::Stream, Position::Earliest)
                .expect("group");
        }
        produce(0..40);
        if ahead {
            topic.commit("s", Offset(40)).expect("read everything");
        }
        topic
            .enforce_retention(spool::storage::log::now_ms())
            .expect("first pass");
        let first = topic.stats().start.0;
        assert!(first > 0, "segments went");
        if !ahead {
            topic
                .create_group("s", GroupMode::Stream, Position::Latest)
                .expect("group");
        }
        assert_eq!(topic.describe_group("s").expect("s").lost_to_retention, 0);
        topic
            .commit("s", Offset(0))
            .expect("commit below the start");
        produce(40..80);
        topic
            .enforce_retention(spool::storage::log::now_ms())
            .expect("second pass");
        let second = topic.stats().start.0;
        let s = topic.describe_group("s").expect("s");
        assert_eq!(
            s.lost_to_retention,
            second - first,
            "ahead={ahead}: only what the second pass dropped ({first}..{second})"
        );
    }
}

#[test]
fn a_power_cut_during_a_retention_pass_loses_nothing_retention_kept() {
    for syncs in 0..6 {
        let disk = Arc::new(SimDisk::new());
        let open = || {
            let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/data").expect("lock");
            Registry::open(data, RegistryOptions::default()).expect("registry opens")
        };
        let reg = open();
        let topic = sim_retention_topic(&reg);
        topic
            .ensure_group("s", GroupMode::Stream, Position::Earliest)
            .expect("group");
        for i in 0..60 {
            topic
                .produce(&[NewMessage::from_value(value(i))])
                .expect("produce");
        }
        disk.power_off_after_syncs(Some(disk.sync_count() + syncs));
        let _ = topic.enforce_retention(spool::storage::log::now_ms());
        drop(topic);
        drop(reg);
        disk.power_cut(Some(syncs));
        let reg = open();
        let topic = reg.topic("p").expect("topic");
        let stats = topic.stats();
        assert_eq!(stats.end.0, 60, "cut after {syncs} syncs");
        let got = topic.read(Offset(0), 1000, 64 << 20).expect("read");
        let offsets: Vec<u64> = got.iter().map(|m| m.offset.0).collect();
        assert_eq!(
            offsets,
            (stats.start.0..60).collect::<Vec<_>>(),
            "cut after {syncs} syncs"
        );
        // The group, which read nothing, heard of the drop before any
        // segment went: it is at the start or past it (a drop still to
        // come), and counts every message below its commit as lost.
        let s = topic.describe_group("s").expect("group");
        assert!(
            s.committed >= stats.start.0,
            "cut after {syncs} syncs: committed {} below the start {}",
            s.committed,
            stats.start.0
        );
        assert_eq!(s.lost_to_retention, s.committed, "cut after {syncs} syncs");
        // The next pass makes the drop the group heard of.
        topic
            .enforce_retention(spool::storage::log::now_ms())
            .expect("the next pass");
        let s = topic.describe_group("s").expect("group");
        let start = topic.stats().start.0;
        assert_eq!(
            (s.committed, s.lost_to_retention),
            (start, start),
            "cut after {syncs} syncs"
        );
        let resumed = topic
            .fetch_stream("s", "m", None, 1, 64 << 20)
            .expect("stream fetch");
        assert_eq!(resumed[0].offset.0, start, "cut after {syncs} syncs");
        let report = verify(reg.data(), &mut |_| {}).expect("verify");
        assert!(
            report.is_clean(),
            "cut after {syncs} syncs: {:?}",
            report.damage
        );
    }
}

/// The topic `name` as `ListTopics` shows it (which opens no topic that
/// stopped cleanly).
async fn listed(client: &Client, name: &str) -> pb::TopicInfo {
    client
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .find(|t| t.name == name)
        .expect("listed")
}

/// Retention runs on topics nobody uses: one closed for being idle, and
/// one closed since before a restart, each drop their old segments in
/// time though no request opens them (the sweeper opens each when its
/// oldest segment is due, applies retention and closes it again).
#[test]
fn retention_runs_on_closed_topics_and_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let flags = ["--topic-idle-close-ms", "50"];
    let aging = || pb::TopicConfig {
        segment_bytes: Some(1024),
        retention_ms: Some(1500),
        ..Default::default()
    };
    let broker = Broker::start(tmp.path(), &flags);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(&client, "before-restart", aging()).await;
        produce(&client, "before-restart", 0, 30).await;
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    std::thread::sleep(Duration::from_millis(1600));
    // Offline compaction compacts, and leaves retention to the broker.
    let dir = tmp.path().join("topics").join("before-restart");
    let before = log_bytes(&dir);
    let compacted = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["compact", "before-restart", "--data"])
        .arg(tmp.path())
        .output()
        .expect("spool compact");
    assert!(
        compacted.status.success(),
        "{}",
        String::from_utf8_lossy(&compacted.stderr)
    );
    assert_eq!(log_bytes(&dir), before, "offline compact applied retention");

    let broker = Broker::start(tmp.path(), &flags);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        create(&client, "idle", aging()).await;
        produce(&client, "idle", 0, 30).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        for topic in ["before-restart", "idle"] {
            loop {
                let info = listed(&client, topic).await;
                if info.start_offset > 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{topic} kept its old segments: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Counted as retention passes, as those of open topics are.
    let metrics = broker.metrics.clone().expect("a metrics listener");
    let scrape = common::http_get(&metrics, "/metrics");
    for topic in ["before-restart", "idle"] {
        assert!(
            scrape
                .lines()
                .any(|l| l.starts_with("spool_cleanup_runs_total{")
                    && l.contains(&format!("topic=\"{topic}\""))
                    && l.contains("kind=\"retention\"")),
            "{topic}: {scrape}"
        );
    }
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// A closed topic whose open for its retention fails (out of descriptors)
/// is due again a little later, not left out of retention until a client
/// opens it.
#[test]
fn a_closed_topic_whose_retention_open_fails_is_due_again() {
    let disk = Arc::new(SimDisk::new());
    let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/d").expect("data dir");
    let reg = Registry::open(data, RegistryOptions::default()).expect("registry");
    let topic = reg
        .create_topic(
            "old",
            TopicConfig {
                log: LogConfig {
                    segment_bytes: 1024,
                    retention_ms: Some(1000),
                    fsync: FsyncPolicy::Always,
                    ..LogConfig::default()
                },
                ..TopicConfig::default()
            },
        )
        .expect("topic");
    let an_hour_ago = spool::storage::log::now_ms() - 3_600_000;
    for i in 0..20 {
        let mut m = NewMessage::from_value(value(i));
        m.timestamp_ms = Some(an_hour_ago);
        topic.produce(&[m]).expect("produce");
    }
    drop(topic);
    assert!(reg.close_unused("old"), "closed");
    let later = spool::storage::log::now_ms() + 3_600_000;
    assert_eq!(reg.upkeep_due(later, 10), ["old"]);
    disk.set_fault(SimFault::OutOfFiles, true);
    assert!(reg.closed_upkeep("old").is_err(), "the open fails");
    disk.set_fault(SimFault::OutOfFiles, false);
    assert_eq!(
        reg.upkeep_due(later, 10),
        ["old"],
        "due again after the failed open"
    );
    reg.closed_upkeep("old").expect("retention");
    let start = reg.topic("old").expect("open").stats().start;
    assert!(
        start.0 > 0,
        "retention dropped the old segments: start {start:?}"
    );
}
