//! End-to-end benchmarks over loopback against an in-process server, each
//! next to its reference measured in the same run:
//!
//! - `e2e/produce_1KiB_x1000` (client → server → disk, `fsync=always`) next to
//!   `e2e/engine_append_1KiB_x1000` (the engine's durable append, no network);
//! - then, outside criterion, produce→consume latency at a fixed 10 000 msg/s
//!   (open loop: latency counts from when a message was *due*, so a stalled
//!   producer cannot hide it), next to the disk's own fdatasync latency.

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use futures_util::StreamExt;
use spool::broker::topic::Position;
use spool::client::Client;
use spool::server::{Server, ServerConfig};
use spool::storage::io::OsStorage;
use spool::storage::{FsyncPolicy, Log, LogConfig, NewMessage, RecoveryMode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const BATCHES: u64 = 32;

fn bench_dir() -> tempfile::TempDir {
    let parent = std::env::var_os("SPOOL_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    tempfile::tempdir_in(parent).expect("bench directory")
}

fn batch() -> Vec<NewMessage> {
    let value = Bytes::from(vec![0x5a; 1024]);
    (0..1000)
        .map(|_| NewMessage::from_value(value.clone()))
        .collect()
}

async fn start_server(dir: &std::path::Path) -> (String, tokio::sync::watch::Sender<bool>) {
    let config = ServerConfig {
        listen: "127.0.0.1:0".into(),
        data: dir.to_owned(),
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(server.run(stopped));
    (addr, stop)
}

fn throughput(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("e2e");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(BATCHES * MIB));
    let records = batch();
    group.bench_function("engine_append_1KiB_x1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tmp = bench_dir();
                let config = LogConfig {
                    fsync: FsyncPolicy::Always,
                    ..LogConfig::default()
                };
                let log = Log::open(
                    Arc::new(OsStorage),
                    tmp.path(),
                    config,
                    RecoveryMode::default(),
                )
                .expect("open");
                let start = Instant::now();
                for _ in 0..BATCHES {
                    log.append(&records).expect("append");
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.bench_function("produce_1KiB_x1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let tmp = bench_dir();
                    let (addr, stop) = start_server(tmp.path()).await;
                    let client = Client::connect(&addr, "bench").await.expect("connect");
                    client
                        .produce("bench", vec![NewMessage::from_value("warm")])
                        .await
                        .expect("create");
                    let start = Instant::now();
                    for _ in 0..BATCHES {
                        client.produce("bench", batch()).await.expect("produce");
                    }
                    total += start.elapsed();
                    let _ = stop.send(true);
                }
                total
            })
        })
    });
    group.finish();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:32} n={:6} p50={:.3} ms p90={:.3} ms p99={:.3} ms p99.9={:.3} ms max={:.3} ms",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.90)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 0.999)),
        ms(*samples.last().expect("samples")),
    );
}

/// fdatasync of one 1 KiB append: what one durable ack costs the disk.
fn fdatasync_latency() -> Vec<Duration> {
    use std::io::Write;
    let tmp = bench_dir();
    let mut f = std::fs::File::create(tmp.path().join("lat")).expect("file");
    let buf = [0x5au8; 1024];
    (0..2000)
        .map(|_| {
            let start = Instant::now();
            f.write_all(&buf).expect("write");
            f.sync_data().expect("fdatasync");
            start.elapsed()
        })
        .collect()
}

fn latency(rt: &tokio::runtime::Runtime, rate: u64, seconds: u64) -> Vec<Duration> {
    rt.block_on(async {
        let tmp = bench_dir();
        let (addr, stop) = start_server(tmp.path()).await;
        let producer = Arc::new(Client::connect(&addr, "producer").await.expect("connect"));
        producer
            .produce("lat", vec![NewMessage::from_value(vec![0u8; 16])])
            .await
            .expect("create");
        let consumer = Client::connect(&addr, "consumer").await.expect("connect");
        let mut sub = consumer
            .subscribe("lat", None, "c", Some(Position::Latest), 10_000)
            .await
            .expect("subscribe");
        let origin = Instant::now();
        let total = rate * seconds;
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let sender = {
            let producer = Arc::clone(&producer);
            tokio::spawn(async move {
                let mut inflight = tokio::task::JoinSet::new();
                for i in 0..total {
                    let due = interval * i as u32;
                    tokio::time::sleep_until((origin + due).into()).await;
                    let mut value = vec![0u8; 1024];
                    value[..8].copy_from_slice(&(due.as_nanos() as u64).to_le_bytes());
                    let p = Arc::clone(&producer);
                    inflight.spawn(async move {
                        p.produce("lat", vec![NewMessage::from_value(value)]).await
                    });
                    while inflight.try_join_next().is_some() {}
                }
                while inflight.join_next().await.is_some() {}
            })
        };
        let mut samples = Vec::with_capacity(total as usize);
        let mut received = Vec::new();
        while (samples.len() as u64) < total {
            let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_secs(10), sub.next()).await
            else {
                break;
            };
            let mut due = [0u8; 8];
            due.copy_from_slice(&r.message.value[..8]);
            let due = Duration::from_nanos(u64::from_le_bytes(due));
            samples.push(origin.elapsed().saturating_sub(due));
            received.push(r.message.offset.0);
            if received.len() >= 500 {
                consumer
                    .ack("lat", "", &received, Some(sub.id()))
                    .await
                    .expect("return credit");
                received.clear();
            }
        }
        let _ = sender.await;
        let _ = stop.send(true);
        samples
    })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c, &rt);
    c.final_summary();
    println!("\nlatency (open loop, 1 KiB messages, fsync=always)");
    report("disk fdatasync of 1 KiB", fdatasync_latency());
    report("produce->consume @ 10000 msg/s", latency(&rt, 10_000, 5));
}
