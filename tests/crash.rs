//! Kill -9 cycles of the real broker while producers (fsync=always), a queue
//! group and a stream group run: after every restart each acknowledged message
//! is present once, byte-exact, at its offset; no confirmed ack or commit is
//! lost; offsets continue without gaps or reuse; at the end `spool verify` is
//! clean. 20 cycles by default; `SPOOL_CRASH_ITERATIONS=1000` for a long run.

mod common;

use common::Broker;
use spool::broker::topic::Position;
use spool::client::{Client, FetchOptions};
use spool::groups::GroupMode;
use spool::storage::NewMessage;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn value(cycle: u64, i: u64) -> Vec<u8> {
    format!(
        "cycle {cycle} message {i} {}",
        "p".repeat(((cycle * 31 + i * 7) % 300) as usize)
    )
    .into_bytes()
}

#[derive(Default)]
struct Confirmed {
    /// offset -> value of every acknowledged produce.
    produced: BTreeMap<u64, Vec<u8>>,
    /// Offsets whose queue ack was confirmed.
    acked: BTreeSet<u64>,
    /// Highest confirmed stream-group commit.
    committed: u64,
}

async fn workload(addr: String, cycle: u64, confirmed: Arc<Mutex<Confirmed>>) {
    let Ok(producer) = Client::connect(&addr, "producer").await else {
        return;
    };
    let Ok(consumer) = Client::connect(&addr, "consumer").await else {
        return;
    };
    let produce = {
        let confirmed = Arc::clone(&confirmed);
        async move {
            for i in 0.. {
                let batch: Vec<_> = (0..5)
                    .map(|k| NewMessage::from_value(value(cycle, i * 5 + k)))
                    .collect();
                let values: Vec<Vec<u8>> = batch.iter().map(|m| m.value.to_vec()).collect();
                match producer.produce("c", batch).await {
                    Ok(p) => {
                        assert!(p.durable);
                        let mut c = confirmed.lock().expect("lock");
                        for (k, v) in values.into_iter().enumerate() {
                            assert!(
                                c.produced.insert(p.first_offset + k as u64, v).is_none(),
                                "offset reused"
                            );
                        }
                    }
                    Err(_) => return,
                }
            }
        }
    };
    let consume = {
        let confirmed = Arc::clone(&confirmed);
        async move {
            loop {
                let options = FetchOptions {
                    group: Some("q".into()),
                    member: "w".into(),
                    max_messages: 20,
                    wait_ms: 50,
                    ..Default::default()
                };
                let Ok(got) = consumer.fetch("c", options).await else {
                    return;
                };
                let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
                if !offsets.is_empty() {
                    if consumer.ack("c", "q", &offsets, None).await.is_err() {
                        return;
                    }
                    confirmed.lock().expect("lock").acked.extend(offsets);
                }
                let from = confirmed.lock().expect("lock").committed;
                let options = FetchOptions {
                    group: Some("s".into()),
                    member: "r".into(),
                    from: Some(Position::Offset(from)),
                    max_messages: 20,
                    ..Default::default()
                };
                let Ok(got) = consumer.fetch("c", options).await else {
                    return;
                };
                if !got.messages.is_empty() {
                    if consumer.commit("c", "s", got.next_offset).await.is_err() {
                        return;
                    }
                    let mut c = confirmed.lock().expect("lock");
                    c.committed = c.committed.max(got.next_offset);
                }
            }
        }
    };
    tokio::join!(produce, consume);
}

async fn check(addr: &str, confirmed: &Confirmed) {
    let client = Client::connect(addr, "checker").await.expect("connect");
    // Every acknowledged message is there once, byte-exact, at its offset, and
    // offsets are dense.
    let mut seen = BTreeMap::new();
    let mut from = 0;
    loop {
        let got = client
            .fetch(
                "c",
                FetchOptions {
                    from: Some(Position::Offset(from)),
                    max_messages: 5000,
                    max_bytes: 8 << 20,
                    ..Default::default()
                },
            )
            .await
            .expect("replay");
        if got.messages.is_empty() {
            break;
        }
        for r in got.messages {
            assert_eq!(
                r.message.offset.0,
                seen.len() as u64,
                "offsets dense, no gap or duplicate"
            );
            seen.insert(r.message.offset.0, r.message.value.to_vec());
        }
        from = got.next_offset;
    }
    for (offset, value) in &confirmed.produced {
        assert_eq!(
            seen.get(offset),
            Some(value),
            "acknowledged offset {offset} lost or changed"
        );
    }
    // No confirmed commit is lost.
    let s = client.describe_group("c", "s").await.expect("stream group");
    assert!(
        s.committed >= confirmed.committed,
        "commit went back from {} to {}",
        confirmed.committed,
        s.committed
    );
    // No confirmed queue ack is undone: nothing acked is deliverable again.
    let got = client
        .fetch(
            "c",
            FetchOptions {
                group: Some("q".into()),
                member: "checker".into(),
                max_messages: 10_000,
                ..Default::default()
            },
        )
        .await
        .expect("queue fetch");
    let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
    for o in &offsets {
        assert!(
            !confirmed.acked.contains(o),
            "confirmed ack of {o} was lost"
        );
    }
    if !offsets.is_empty() {
        client
            .nack("c", "q", &offsets, 0, None)
            .await
            .expect("give them back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_cycles_lose_nothing_acknowledged() {
    let cycles: u64 = std::env::var("SPOOL_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(tmp.path(), &[]);
    {
        let admin = Client::connect(&broker.addr, "admin")
            .await
            .expect("connect");
        let config = spool::protocol::pb::TopicConfig {
            segment_bytes: Some(64 * 1024),
            ..Default::default()
        };
        admin.create_topic("c", config).await.expect("topic");
        admin
            .create_group("c", "q", GroupMode::Queue, None)
            .await
            .expect("queue group");
        admin
            .create_group("c", "s", GroupMode::Stream, None)
            .await
            .expect("stream group");
    }
    let confirmed = Arc::new(Mutex::new(Confirmed::default()));
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for cycle in 0..cycles {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(30 + seed % 250);
        let work = tokio::spawn(workload(broker.addr.clone(), cycle, Arc::clone(&confirmed)));
        tokio::time::sleep(run_for).await;
        tokio::task::spawn_blocking(move || broker.kill9())
            .await
            .expect("kill");
        let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
        broker = Broker::start(tmp.path(), &[]);
        let snapshot = {
            let c = confirmed.lock().expect("lock");
            Confirmed {
                produced: c.produced.clone(),
                acked: c.acked.clone(),
                committed: c.committed,
            }
        };
        check(&broker.addr, &snapshot).await;
    }
    let total = confirmed.lock().expect("lock").produced.len();
    assert!(total > 0, "the workload produced");
    let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("stop");
    assert!(ok, "{logs}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--data"])
        .arg(tmp.path())
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "verify after {cycles} kill cycles: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("{cycles} kill -9 cycles, {total} acknowledged messages checked after each");
}
