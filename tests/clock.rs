//! Timers against a wall clock that steps: the real binary under
//! libfaketime, whose offset this test moves by 3 hours while the broker
//! runs (as an NTP step or an operator's `date -s` would). Leases,
//! redelivery delays and idle deletion run on the monotonic clock and
//! must not move; retention compares stored timestamps with the wall
//! clock and does.
//!
//! Needs Debian's `faketime` package (libfaketime). Without it the test is
//! skipped with a printed reason, unless `SPOOL_REQUIRE_FAKETIME` is set
//! (as `.ci/run` does), which makes a missing library a failure.

mod common;

use common::Broker;
use spool::client::Client;
use spool::groups::GroupMode;
use spool::storage::NewMessage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// libfaketime's shared library, if installed.
fn libfaketime() -> Option<PathBuf> {
    // Debian puts it under /usr/lib/<multiarch triple>/faketime/.
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("SPOOL_REQUIRE_FAKETIME").is_none(),
            "SPOOL_REQUIRE_FAKETIME is set but libfaketime is missing: install Debian's faketime"
        );
        eprintln!(
            "skipped: libfaketime is missing (apt-get install faketime; set SPOOL_REQUIRE_FAKETIME=1 to make this a failure)"
        );
    }
    found
}

/// `spool` with its wall clock offset by what `offset_file` says (read on
/// every clock read), its monotonic clock untouched.
fn under_faketime(lib: &Path, offset_file: &Path) -> Command {
    let mut program = Command::new(env!("CARGO_BIN_EXE_spool"));
    program
        .env("LD_PRELOAD", lib)
        .env("FAKETIME_TIMESTAMP_FILE", offset_file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    program
}

/// A step of the wall clock 3 hours forward ends no lease, shortens no
/// redelivery delay and deletes no idle topic early; the step does move
/// retention, which compares the records' timestamps with the wall clock,
/// and members' sightings are told on the stepped wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_moves_no_lease_delay_or_idle_deletion() {
    let Some(lib) = libfaketime() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "+0\n").expect("offset file");
    let data = tmp.path().join("data");
    let broker = Broker::start_with(under_faketime(&lib, &offset), &data, &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let hour = 3_600_000;
    client
        .create_topic(
            "jobs",
            spool::protocol::pb::TopicConfig {
                ack_timeout_ms: Some(hour),
                ..Default::default()
            },
        )
        .await
        .expect("jobs");
    client
        .create_topic(
            "idle",
            spool::protocol::pb::TopicConfig {
                delete_when_idle_ms: Some(hour),
                ..Default::default()
            },
        )
        .await
        .expect("idle");
    client
        .create_topic(
            "old",
            spool::protocol::pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_ms: Some(hour),
                ..Default::default()
            },
        )
        .await
        .expect("old");
    client
        .create_group("jobs", "workers", GroupMode::Queue, None)
        .await
        .expect("group");
    let batch = |n: usize| -> Vec<NewMessage> {
        (0..n)
            .map(|i| NewMessage::from_value(format!("{i:04} {}", "x".repeat(60))))
            .collect()
    };
    client.produce("jobs", batch(2)).await.expect("produce");
    client.produce("idle", batch(1)).await.expect("produce");
    client.produce("old", batch(60)).await.expect("produce");
    let leased = common::queue_fetch(&client, "jobs", "workers", 2).await;
    assert_eq!(leased, [0, 1]);
    // 0 stays leased for an hour; 1 is given back, due again in an hour.
    let requeued = client
        .nack("jobs", "workers", &[1], hour, None)
        .await
        .expect("nack");
    assert_eq!(requeued, 1);

    std::fs::write(&offset, "+3h\n").expect("step the wall clock");
    // A few sweeps of the broker (each a second apart) under the new time.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let again = common::queue_fetch(&client, "jobs", "workers", 2).await;
    assert!(
        again.is_empty(),
        "a leased and a delayed message were delivered again after the wall clock stepped: {again:?}"
    );
    let group = client
        .describe_group("jobs", "workers")
        .await
        .expect("group");
    assert_eq!(group.pending, 1, "the lease on 0 still holds: {group:?}");
    // Members' sightings are told on the broker's wall clock, 3 h ahead.
    let seen = group
        .members
        .iter()
        .map(|m| m.last_seen_ms)
        .max()
        .unwrap_or(0);
    let real_now = spool::storage::log::now_ms();
    assert!(
        seen > real_now + 2 * hour && seen < real_now + 4 * hour,
        "last seen at {seen}, real time {real_now}"
    );
    let topics: Vec<String> = client
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        topics.contains(&"idle".to_owned()),
        "a topic idle for seconds was deleted as idle for an hour: {topics:?}"
    );
    // Retention looks again at the next seal: the records before the step
    // are 3 h old by the wall clock now, past the topic's hour.
    client.produce("old", batch(20)).await.expect("produce");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let start = client
            .describe_topic("old")
            .await
            .expect("describe")
            .start_offset;
        if start > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention follows the wall clock, yet dropped nothing 3 h on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
}
