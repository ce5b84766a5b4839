//! Consumer-group benchmarks on the real disk, next to the append they are
//! judged against, measured in the same run on the same directory
//! (`SPOOL_BENCH_DIR`, default the system temp dir), all with `fsync=always`:
//!
//! - `groups/append_1KiB_x1000`: 1 KiB messages appended in batches of 1000;
//! - `groups/deliver_ack_1KiB_x1000`: a queue group leases the same kind of
//!   messages 1000 at a time (`fetch_queue`) and acks each batch in one call;
//! - `groups/single_ack_1KiB_x100`: one fetch of 100, then one ack call (one
//!   durable group-state write) per message.
//!
//! At the end the run prints the cost of deliver+ack per message over the cost
//! of appending it (target: at most 1.0).

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spool::broker::{Position, Registry, RegistryOptions, TopicConfig};
use spool::groups::GroupMode;
use spool::storage::io::OsStorage;
use spool::storage::{DataDir, FsyncPolicy, LogConfig, NewMessage, Offset};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOPIC: &str = "bench";
const GROUP: &str = "workers";
const BATCH: usize = 1000;
const SINGLE_BATCH: usize = 100;
const VALUE_BYTES: usize = 1024;
/// Large enough for a whole batch of 1 KiB messages in one fetch.
const FETCH_BYTES: usize = 4 << 20;

/// A locked data dir in a fresh temp dir, with one `fsync=always` topic that
/// has a queue group.
struct Broker {
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn new() -> Broker {
        let parent =
            std::env::var_os("SPOOL_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = tempfile::tempdir_in(parent).expect("bench directory");
        let data = DataDir::open(Arc::new(OsStorage), dir.path()).expect("lock the data dir");
        let registry = Registry::open(data, RegistryOptions::default()).expect("open registry");
        let config = TopicConfig {
            log: LogConfig {
                fsync: FsyncPolicy::Always,
                ..LogConfig::default()
            },
            ..TopicConfig::default()
        };
        let topic = registry.create_topic(TOPIC, config).expect("create topic");
        topic
            .ensure_group(GROUP, GroupMode::Queue, Position::Earliest)
            .expect("queue group");
        Broker {
            registry,
            _dir: dir,
        }
    }

    /// Appends `batches` batches outside any timing, synced once.
    fn fill(&self, batches: u64, batch: &[NewMessage]) {
        let topic = self.registry.topic(TOPIC).expect("topic");
        for _ in 0..batches {
            topic.log().write(batch).expect("write");
        }
        topic.log().commit().expect("commit");
    }

    /// Leases up to `max` messages; returns their offsets.
    fn fetch(&self, max: usize) -> Vec<u64> {
        let fetch = self
            .registry
            .fetch_queue(
                TOPIC,
                GROUP,
                "m",
                max,
                FETCH_BYTES,
                spool::storage::log::now_ms(),
            )
            .expect("fetch");
        assert_eq!(fetch.deliveries.len(), max, "the backlog ran dry");
        fetch
            .deliveries
            .iter()
            .map(|d| d.message.offset.0)
            .collect()
    }
}

fn batch(count: usize) -> Vec<NewMessage> {
    let value = Bytes::from(vec![0x5a; VALUE_BYTES]);
    (0..count)
        .map(|_| NewMessage::from_value(value.clone()))
        .collect()
}

/// Time and messages measured by one benchmark (warm-up included).
#[derive(Default)]
struct Tally(Cell<(Duration, u64)>);

impl Tally {
    fn add(&self, time: Duration, messages: u64) {
        let (t, n) = self.0.get();
        self.0.set((t + time, n + messages));
    }

    fn per_message(&self) -> Option<Duration> {
        let (t, n) = self.0.get();
        (n > 0).then(|| t / u32::try_from(n).unwrap_or(u32::MAX))
    }
}

fn groups(c: &mut Criterion) {
    let append_tally = Tally::default();
    let deliver_tally = Tally::default();
    let single_tally = Tally::default();
    let messages = batch(BATCH);
    let mut group = c.benchmark_group("groups");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("append_1KiB_x1000", |b| {
        b.iter_custom(|iters| {
            let broker = Broker::new();
            let topic = broker.registry.topic(TOPIC).expect("topic");
            let start = Instant::now();
            for _ in 0..iters {
                topic.produce(&messages).expect("append");
            }
            let elapsed = start.elapsed();
            append_tally.add(elapsed, iters * BATCH as u64);
            elapsed
        })
    });

    group.bench_function("deliver_ack_1KiB_x1000", |b| {
        b.iter_custom(|iters| {
            let broker = Broker::new();
            broker.fill(iters, &messages);
            let topic = broker.registry.topic(TOPIC).expect("topic");
            let start = Instant::now();
            for _ in 0..iters {
                let offsets = broker.fetch(BATCH);
                let offsets: Vec<Offset> = offsets.into_iter().map(Offset).collect();
                topic.ack(GROUP, &offsets).expect("ack");
            }
            let elapsed = start.elapsed();
            deliver_tally.add(elapsed, iters * BATCH as u64);
            elapsed
        })
    });

    group.throughput(Throughput::Elements(SINGLE_BATCH as u64));
    group.bench_function("single_ack_1KiB_x100", |b| {
        let small = batch(SINGLE_BATCH);
        b.iter_custom(|iters| {
            let broker = Broker::new();
            broker.fill(iters, &small);
            let topic = broker.registry.topic(TOPIC).expect("topic");
            let start = Instant::now();
            for _ in 0..iters {
                for offset in broker.fetch(SINGLE_BATCH) {
                    topic.ack(GROUP, &[Offset(offset)]).expect("ack");
                }
            }
            let elapsed = start.elapsed();
            single_tally.add(elapsed, iters * SINGLE_BATCH as u64);
            elapsed
        })
    });
    group.finish();

    if let (Some(append), Some(deliver)) = (append_tally.per_message(), deliver_tally.per_message())
    {
        println!(
            "\nper message: append {append:?}, deliver+ack {deliver:?}; \
             ratio deliver+ack / append = {:.2} (target <= 1.0)",
            deliver.as_secs_f64() / append.as_secs_f64()
        );
    }
    if let Some(single) = single_tally.per_message() {
        println!(
            "single acks: {single:?} per message ({:.0} acks/s)",
            1.0 / single.as_secs_f64()
        );
    }
}

criterion_group!(benches, groups);
criterion_main!(benches);
