//! Many small topics on one broker, through the real binary under a low
//! open-files limit (`prlimit`): a topic's files are open only while it is
//! used, so far more topics than the limit allows open at once are all
//! readable and writable in turn, across a clean restart and a kill -9 in
//! the middle of topics being opened and closed; `spool verify` checks them
//! all; and rooms with `delete_when_idle_ms` clean themselves up.

mod common;

use common::Broker;
use spool::client::{Client, FetchOptions};
use spool::protocol::pb;
use spool::storage::NewMessage;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// File descriptors the broker may hold: its default budget for open
/// topics is half of it, about 16 topics of one segment.
const LIMIT: &str = "--nofile=128:128";
/// Topics made: many times what fits open at once.
const ROOMS: usize = 150;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn has_prlimit() -> bool {
    let ok = Command::new("prlimit").arg("--version").output().is_ok();
    if !ok {
        eprintln!("prlimit is not installed; skipping");
    }
    ok
}

/// `spool serve` under [`LIMIT`].
fn start(data: &Path, extra: &[&str]) -> Broker {
    let mut wrapper = Command::new("prlimit");
    wrapper.args([LIMIT, env!("CARGO_BIN_EXE_spool")]);
    Broker::start_with(wrapper, data, extra)
}

fn room(i: usize) -> String {
    format!("room-{i}")
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Every value of `topic`, replayed from its start.
async fn values(client: &Client, topic: &str) -> Vec<String> {
    common::replay_all(client, topic)
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.message.value).into_owned())
        .collect()
}

async fn produce(client: &Client, topic: &str, value: String) -> u64 {
    client
        .produce(topic, vec![NewMessage::from_value(value)])
        .await
        .unwrap_or_else(|e| panic!("produce to {topic}: {e}"))
        .first_offset
}

#[test]
fn more_topics_than_the_file_limit_holds_all_work_in_turn_and_after_a_restart() {
    if !has_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    let broker = start(data, &[]);
    let pid = broker.child.id();
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "rooms")
            .await
            .expect("connect");
        for round in 0..2 {
            for i in 0..ROOMS {
                let offset = produce(&client, &room(i), format!("{i}.{round}")).await;
                assert_eq!(offset, round, "room {i} round {round}");
            }
        }
        let fds = open_fds(pid);
        assert!(fds < 128, "the broker holds {fds} descriptors");
        for i in (0..ROOMS).rev() {
            assert_eq!(
                values(&client, &room(i)).await,
                vec![format!("{i}.0"), format!("{i}.1")]
            );
        }
        let listed = client.list_topics().await.expect("list topics");
        assert_eq!(listed.len(), ROOMS, "every room is listed");
        assert!(
            listed.iter().all(|t| t.end_offset == 2),
            "closed rooms are listed with their end offsets"
        );
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "clean stop: {logs}");
    assert!(
        logs.contains("max_open_files"),
        "the budget is logged: {logs}"
    );
    assert!(
        data.join("clean-stop").exists(),
        "the clean stop is recorded"
    );

    // Offline, every topic checks out.
    let verify = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--format", "json", "--data"])
        .arg(data)
        .output()
        .expect("verify");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("JSON");
    assert_eq!(verify.status.code(), Some(0), "{report}");
    assert_eq!(
        report["topics"].as_u64(),
        Some(ROOMS as u64),
        "verify looks at every room: {report}"
    );

    // After a clean stop nothing is scanned up front, and every room is
    // there on first use.
    let broker = start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "rooms")
            .await
            .expect("connect");
        for i in 0..ROOMS {
            assert_eq!(produce(&client, &room(i), format!("{i}.2")).await, 2);
            assert_eq!(
                values(&client, &room(i)).await,
                vec![format!("{i}.0"), format!("{i}.1"), format!("{i}.2")]
            );
        }
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "clean stop: {logs}");
    assert!(
        logs.contains("clean_start=true"),
        "the second start knew of the clean stop: {logs}"
    );
}

#[test]
fn kill_9_while_topics_open_and_close_loses_nothing_acknowledged() {
    if !has_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    // Topics close after 20 ms unused, so they open and close all the time.
    let broker = start(data, &["--topic-idle-close-ms", "20"]);
    let acked = rt().block_on(async {
        let client = Client::connect(&broker.addr, "rooms")
            .await
            .expect("connect");
        let mut acked = vec![0u64; ROOMS];
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut i = 0;
        while Instant::now() < deadline {
            let r = i % ROOMS;
            let offset = produce(&client, &room(r), format!("{r}.{}", acked[r])).await;
            assert_eq!(offset, acked[r]);
            acked[r] += 1;
            i += 7;
        }
        acked
    });
    broker.kill9();

    let broker = start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "rooms")
            .await
            .expect("connect");
        for (r, &count) in acked.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let expected: Vec<String> = (0..count).map(|n| format!("{r}.{n}")).collect();
            assert_eq!(values(&client, &room(r)).await, expected, "room {r}");
            // No offset is handed out twice.
            assert_eq!(produce(&client, &room(r), "after".into()).await, count);
        }
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.contains("start-up scan done"),
        "an unclean start scans for topics to recover: {logs}"
    );
}

#[test]
fn rooms_with_delete_when_idle_ms_clean_themselves_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "rooms")
            .await
            .expect("connect");
        // Idle limits well above what a loaded machine takes between the
        // requests below (the sweep runs every second).
        let idle = pb::TopicConfig {
            delete_when_idle_ms: Some(1500),
            ..Default::default()
        };
        for name in ["quiet", "busy", "grouped", "watched"] {
            client
                .create_topic(name, idle.clone())
                .await
                .expect("create");
            produce(&client, name, "hi".into()).await;
        }
        // Watched for longer than it may be idle, then let go: idle from
        // when the subscription ends, not from when it began.
        let long_idle = pb::TopicConfig {
            delete_when_idle_ms: Some(6000),
            ..Default::default()
        };
        client
            .create_topic("watched-long", long_idle)
            .await
            .expect("create");
        produce(&client, "watched-long", "hi".into()).await;
        let long_watcher = client
            .subscribe("watched-long", None, "w", None, 10)
            .await
            .expect("subscribe");
        client
            .create_group("grouped", "g", spool::groups::GroupMode::Stream, None)
            .await
            .expect("group");
        // A subscription on "watched" is a use for as long as it is open.
        let watcher = client
            .subscribe("watched", None, "w", None, 10)
            .await
            .expect("subscribe");
        let info = client.describe_topic("quiet").await.expect("describe");
        assert_eq!(
            info.config.and_then(|c| c.delete_when_idle_ms),
            Some(1500),
            "the setting is stored"
        );
        // "busy" is read every 100 ms; the others are left alone.
        let until = Instant::now() + Duration::from_millis(5000);
        while Instant::now() < until {
            client
                .fetch("busy", FetchOptions::default())
                .await
                .expect("busy is kept");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let missing = client
            .describe_topic("quiet")
            .await
            .expect_err("an idle room is deleted");
        assert_eq!(missing.code(), Some(pb::Code::NotFound), "{missing}");
        client
            .describe_topic("grouped")
            .await
            .expect("a room with a group stays");
        client
            .describe_topic("watched")
            .await
            .expect("a room with a subscriber stays");
        drop(watcher);
        assert_eq!(values(&client, "busy").await, vec!["hi".to_owned()]);
        // 6.5 s after its subscribe (listing topics is no use of them).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client
            .unsubscribe(long_watcher.id())
            .await
            .expect("unsubscribe");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let names: Vec<String> = client
            .list_topics()
            .await
            .expect("list")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(
            names.contains(&"watched-long".to_owned()),
            "a room was deleted just after its last subscriber left: {names:?}"
        );

        let bad = client
            .create_topic(
                "bad",
                pb::TopicConfig {
                    delete_when_idle_ms: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect_err("0 is refused");
        assert_eq!(bad.code(), Some(pb::Code::InvalidArgument), "{bad}");
        assert!(bad.to_string().contains("delete_when_idle_ms"), "{bad}");
    });
    assert!(!tmp.path().join("topics").join("quiet").exists());
}

#[test]
fn sealed_segments_hold_no_file_descriptors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let pid = broker.child.id();
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "big").await.expect("connect");
        let config = pb::TopicConfig {
            segment_bytes: Some(4096),
            ..Default::default()
        };
        client.create_topic("big", config).await.expect("create");
        produce(&client, "big", "first".into()).await;
        let before = open_fds(pid);
        let value = "v".repeat(500);
        for _ in 0..300 {
            produce(&client, "big", value.clone()).await;
        }
        let info = client.describe_topic("big").await.expect("describe");
        assert!(info.segments >= 30, "{} segments", info.segments);
        let after = open_fds(pid);
        assert!(
            after <= before + 2,
            "{} segments took {} descriptors more",
            info.segments,
            after - before
        );
        let all = values(&client, "big").await;
        assert_eq!(all.len(), 301);
        assert!(all[1..].iter().all(|v| *v == value));
    });
}

#[test]
fn open_file_settings_from_the_config_file_apply_and_bad_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_open_files = 64\ntopic_idle_close_ms = 50\n").expect("config");
    let data = tmp.path().join("data");
    let config_arg = config.to_string_lossy().into_owned();
    let broker = Broker::start(&data, &["--config", &config_arg]);
    let pid = broker.child.id();
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "cfg").await.expect("connect");
        let baseline = open_fds(pid);
        produce(&client, "room", "hi".into()).await;
        assert!(open_fds(pid) > baseline, "the topic is open while used");
        // Closed 50 ms after its last use, at the next sweep (every second);
        // a machine busy with other work may take longer to sync and close.
        let deadline = Instant::now() + Duration::from_secs(30);
        while open_fds(pid) > baseline && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // At most the baseline: a file the start-up work held then may be
        // closed since.
        let now = open_fds(pid);
        assert!(
            now <= baseline,
            "the idle topic's files are closed: {now} open, {baseline} before it was used"
        );
        assert_eq!(values(&client, "room").await, vec!["hi".to_owned()]);
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(logs.contains("max_open_files=64"), "{logs}");
    assert!(logs.contains("topic_idle_close_ms=50"), "{logs}");

    for (flag, file, needle) in [
        (Some(["--max-open-files", "3"]), None, "max_open_files 3"),
        (
            None,
            Some("topic_idle_close_ms = 0\n"),
            "topic_idle_close_ms",
        ),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spool"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--data",
        ])
        .arg(&data);
        if let Some(flag) = flag {
            cmd.args(flag);
        }
        if let Some(text) = file {
            std::fs::write(&config, text).expect("config");
            cmd.arg("--config").arg(&config);
        }
        let out = cmd.output().expect("run serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "names {needle}: {stderr}");
    }
}
