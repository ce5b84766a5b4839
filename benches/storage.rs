//! Engine benchmarks, each next to the baseline it is judged against, measured
//! in the same run on the same directory (`SPOOL_BENCH_DIR`, default the system
//! temp dir):
//!
//! - `baseline/write_fdatasync_1MiB`: plain `write` + `fdatasync` every 1 MiB;
//! - `append/durable_1KiB_x1000`: 1 KiB records in ~1 MiB batches, `fsync=always`;
//! - `append/nosync_1KiB` and `append/nosync_100B`: appends without sync;
//! - `read/sequential_crc`: sequential reads from the page cache, CRC checked.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spool::storage::io::OsStorage;
use spool::storage::{FsyncPolicy, Log, LogConfig, NewMessage, Offset, RecoveryMode};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Bytes written per timed iteration of the durable benchmarks.
const DURABLE_BYTES: u64 = 32 * MIB;

fn bench_dir() -> tempfile::TempDir {
    let parent = std::env::var_os("SPOOL_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    tempfile::tempdir_in(parent).expect("bench directory")
}

fn batch(count: usize, size: usize) -> Vec<NewMessage> {
    let value = Bytes::from(vec![0x5a; size]);
    (0..count)
        .map(|_| NewMessage::from_value(value.clone()))
        .collect()
}

fn open(dir: &std::path::Path, fsync: FsyncPolicy, segment_bytes: u64) -> Log {
    let config = LogConfig {
        fsync,
        segment_bytes,
        ..LogConfig::default()
    };
    Log::open(Arc::new(OsStorage), dir, config, RecoveryMode::default()).expect("open log")
}

fn baseline(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(DURABLE_BYTES));
    let buf = vec![0x5au8; MIB as usize];
    group.bench_function("write_fdatasync_1MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tmp = bench_dir();
                let mut file = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(tmp.path().join("baseline"))
                    .expect("baseline file");
                let start = Instant::now();
                for _ in 0..DURABLE_BYTES / MIB {
                    file.write_all(&buf).expect("write");
                    file.sync_data().expect("fdatasync");
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    // 1000 records of 1 KiB values: 1 MiB of payload per batch.
    let durable = batch(1000, 1024);
    group.throughput(Throughput::Bytes(DURABLE_BYTES));
    group.bench_function("durable_1KiB_x1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tmp = bench_dir();
                let log = open(tmp.path(), FsyncPolicy::Always, 128 * MIB);
                let start = Instant::now();
                for _ in 0..DURABLE_BYTES / MIB {
                    log.append(&durable).expect("append");
                }
                total += start.elapsed();
            }
            total
        })
    });

    for (name, size, count) in [
        ("nosync_1KiB", 1024usize, 1000usize),
        ("nosync_100B", 100, 10_000),
    ] {
        let records = batch(count, size);
        let per_batch = (size * count) as u64;
        // Elements = records, so criterion reports records/s; bytes follow from size.
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(name, |b| {
            let segment = 1024 * MIB;
            let mut tmp = bench_dir();
            let mut log = open(tmp.path(), FsyncPolicy::Never, segment);
            let mut used = 0u64;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh log before the segment fills, outside the timing:
                    // sealing syncs, and this measures appends without sync.
                    if used + 2 * per_batch + per_batch / 2 > segment {
                        let fresh = bench_dir();
                        log = open(fresh.path(), FsyncPolicy::Never, segment);
                        tmp = fresh;
                        used = 0;
                    }
                    let start = Instant::now();
                    log.append(&records).expect("append");
                    total += start.elapsed();
                    used += per_batch + (count * 32) as u64;
                }
                total
            })
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    group.sample_size(20);
    let tmp = bench_dir();
    let log = open(tmp.path(), FsyncPolicy::Never, 128 * MIB);
    let records = batch(1000, 1024);
    let fill = 256 * MIB;
    for _ in 0..fill / MIB {
        log.append(&records).expect("fill");
    }
    log.sync().expect("sync");
    let end = log.end();
    let bytes = log.stats().bytes;
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("sequential_crc", |b| {
        b.iter(|| {
            let mut from = Offset(0);
            let mut seen = 0usize;
            while from < end {
                let msgs = log.read(from, 10_000, 16 * MIB as usize).expect("read");
                seen += msgs.len();
                from = msgs.last().expect("records up to the end").offset.next();
            }
            seen
        })
    });
    group.finish();
}

/// Compaction input throughput: a 64 MiB log in 8 MiB segments where every
/// other record is dead, measured as bytes of input examined per second.
fn compact(c: &mut Criterion) {
    let mut group = c.benchmark_group("compact");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let records = batch(1000, 1024);
    let fill = 64 * MIB;
    group.throughput(Throughput::Bytes(fill));
    group.bench_function("half_live_64MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tmp = bench_dir();
                let log = open(tmp.path(), FsyncPolicy::Never, 8 * MIB);
                for _ in 0..fill / MIB {
                    log.append(&records).expect("fill");
                }
                log.sync().expect("sync");
                let start = Instant::now();
                let stats = log
                    .compact(&|r| r.offset % 2 == 0, &mut |_| {})
                    .expect("compact");
                total += start.elapsed();
                assert!(stats.records_removed > 0);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, baseline, append, read, compact);
criterion_main!(benches);
