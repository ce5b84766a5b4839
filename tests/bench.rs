//! `spool bench` end to end with the real binary: a short produce, e2e and
//! disk run each print a JSON report carrying every field scripts rely on.
//! No speed is asserted: the figures depend on the machine.

mod common;

use spool::bench::report::{STABLE_FIELDS, lookup};
use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("bench")
        .args(args)
        .args(["--format", "json", "--baseline-mib", "2", "--data"])
        .arg(tmp.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run spool bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spool bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {stdout}"));
    for field in STABLE_FIELDS {
        let value = lookup(&report, field).unwrap_or_else(|| panic!("{field} missing: {report}"));
        assert!(!value.is_null(), "{field} is null: {report}");
    }
    let leftovers = entries(tmp.path());
    assert!(leftovers.is_empty(), "scratch left behind: {leftovers:?}");
    report
}

/// `spool bench ARGS` is refused as a usage error (exit 2) whose message
/// names `mentions`.
fn assert_usage_error(args: &[&str], mentions: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run spool bench");
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    assert!(
        stderr.contains("Usage: spool bench"),
        "{args:?}: the bench command's usage: {stderr}"
    );
}

fn number(report: &serde_json::Value, field: &str) -> f64 {
    lookup(report, field)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{field} is not a number: {report}"))
}

/// A queue run measures its rounds only: the last batch is acked without
/// one more fetch (which could only wait out its long-poll), and a fetch
/// that found nothing is no round, so 3 000 messages in batches of 1 000
/// are 3 rounds (there was a fourth, a 50 ms wait).
#[test]
fn a_queue_run_counts_its_rounds_and_no_idle_wait() {
    let r = bench(&[
        "consume",
        "--mode",
        "queue",
        "--messages",
        "3000",
        "--batch",
        "1000",
        "--size",
        "100",
        "--fsync",
        "never",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 3000.0);
    assert_eq!(number(&r, "latency_ms.samples"), 3.0, "{r}");
}

#[test]
fn produce_reports_every_field_and_counts_every_message() {
    let r = bench(&["produce", "--messages", "2000"]);
    assert_eq!(number(&r, "throughput.messages"), 2000.0);
    assert_eq!(number(&r, "throughput.bytes"), 2000.0 * 1024.0);
    assert_eq!(number(&r, "latency_ms.samples"), 2000.0);
    assert!(number(&r, "throughput.msgs_per_s") > 0.0);
    assert!(number(&r, "disk_baseline.mb_per_s") > 0.0);
    assert!(number(&r, "ratio_to_disk") > 0.0);
    assert!(number(&r, "machine.cores") >= 1.0);
    assert_eq!(r["params"]["fsync"], "always");
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn grpc_produce_and_replay_count_every_message() {
    let r = bench(&[
        "produce",
        "--messages",
        "500",
        "--batch",
        "50",
        "--transport",
        "grpc",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 500.0, "{r}");
    assert_eq!(number(&r, "throughput.bytes"), 500.0 * 1024.0);
    assert_eq!(number(&r, "latency_ms.samples"), 500.0);
    assert_eq!(r["params"]["transport"], "grpc");
    let r = bench(&[
        "consume",
        "--mode",
        "replay",
        "--messages",
        "700",
        "--size",
        "100",
        "--batch",
        "200",
        "--transport",
        "grpc",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 700.0, "{r}");
    assert_eq!(number(&r, "throughput.bytes"), 700.0 * 100.0);
    assert_eq!(number(&r, "latency_ms.samples"), 4.0, "four fetches");
    assert_eq!(r["params"]["transport"], "grpc");
    // The native protocol stays the default.
    let r = bench(&["produce", "--messages", "10"]);
    assert_eq!(r["params"]["transport"], "native");
}

#[test]
fn grpc_with_other_workloads_is_a_usage_error() {
    for args in [
        &["e2e", "--transport", "grpc"][..],
        &["consume", "--mode", "queue", "--transport", "grpc"][..],
        &["disk", "--transport", "grpc"][..],
    ] {
        assert_usage_error(args, "--transport grpc");
    }
    // The socket.io clients speak neither gRPC, TLS nor tokens.
    for (args, flag) in [
        (&["socketio", "--transport", "grpc"][..], "--transport"),
        (
            &["socketio", "--tls-ca", "/nonexistent.pem"][..],
            "--tls-ca",
        ),
        (&["socketio", "--token", "secret"][..], "--token"),
        (&["socketio", "--messages", "5"][..], "--messages"),
        (&["socketio", "--batch", "7"][..], "--batch"),
        (&["socketio", "--in-flight", "3"][..], "--in-flight"),
    ] {
        assert_usage_error(
            args,
            &format!("{flag} does not apply to the socketio workload"),
        );
    }
    // Settings that cannot run are usage errors too, as for the others.
    for (args, text) in [
        (
            &["socketio", "--clients", "0"][..],
            "--clients must be at least 1",
        ),
        (
            &["socketio", "--rate", "0"][..],
            "--rate must be at least 1",
        ),
        (&["socketio", "--duration", "nan"][..], "--duration NaN"),
        (&["socketio", "--duration", "inf"][..], "--duration inf"),
        (
            &["produce", "--duration", "1e30"][..],
            "--duration 1000000000000000000000000000000: expected a number of seconds from 0.001 (a millisecond) to 31536000 (a year)",
        ),
        (
            &["socketio", "--duration", "0.0000001"][..],
            "--duration 0.0000001: expected a number of seconds from 0.001",
        ),
    ] {
        assert_usage_error(args, text);
    }
    // A token in the environment, for the other commands, is no flag.
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "bench",
            "socketio",
            "--server",
            "127.0.0.1:1",
            "--clients",
            "1",
        ])
        .env("SPOOL_TOKEN", "secret")
        .output()
        .expect("run spool bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("does not apply"), "{stderr}");
}

#[test]
fn e2e_delivers_every_message_to_every_consumer() {
    let r = bench(&[
        "e2e",
        "--messages",
        "300",
        "--rate",
        "3000",
        "--consumers",
        "2",
        "--fsync",
        "never",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 600.0);
    assert_eq!(number(&r, "latency_ms.samples"), 600.0);
    assert_eq!(number(&r, "send_lag_ms.samples"), 300.0);
    assert_eq!(r["params"]["rate"], 3000);
    // The floor without a broker: the same 300 messages at the same rate.
    assert_eq!(number(&r, "relay_floor_ms.samples"), 300.0);
    assert!(number(&r, "relay_floor_ms.p50") > 0.0);
    // Nothing is synced under fsync=never: no disk part to bound.
    assert!(r.get("commit_floor_ms").is_none(), "{r}");
}

#[test]
fn a_durable_e2e_run_reports_the_disk_parts_floor() {
    let r = bench(&[
        "e2e",
        "--messages",
        "200",
        "--rate",
        "2000",
        "--fsync",
        "always",
    ]);
    assert_eq!(number(&r, "latency_ms.samples"), 200.0);
    // The same 200 messages on the same timetable, appended and synced in
    // group-commit rounds by one thread.
    assert_eq!(number(&r, "commit_floor_ms.samples"), 200.0);
    let (p50, p99) = (
        number(&r, "commit_floor_ms.p50"),
        number(&r, "commit_floor_ms.p99"),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{r}");
}

#[test]
fn disk_reports_its_own_baseline() {
    let r = bench(&["disk"]);
    assert_eq!(r["workload"], "disk");
    assert_eq!(number(&r, "throughput.messages"), 2.0, "two 1 MiB writes");
    assert!(number(&r, "disk_baseline.nosync_mb_per_s") > 0.0);
    assert!(number(&r, "disk_baseline.fdatasync_1k_ms.samples") > 0.0);
}

#[test]
fn impossible_parameters_are_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["bench", "e2e", "--size", "4"])
        .output()
        .expect("run spool bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--size 4"), "{stderr}");
}

#[test]
fn a_replay_with_queue_load_reads_every_message_while_a_queue_group_acks() {
    let r = bench(&[
        "consume",
        "--mode",
        "replay",
        "--messages",
        "3000",
        "--size",
        "100",
        "--batch",
        "100",
        "--queue-load",
        "2",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 3000.0, "{r}");
    assert_eq!(r["params"]["queue_load"], 2);
    // The load goes with replay only.
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["bench", "consume", "--mode", "queue", "--queue-load", "2"])
        .output()
        .expect("run spool bench");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--queue-load"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stream_consumers_each_read_every_message_through_a_group_of_their_own() {
    let r = bench(&[
        "consume",
        "--mode",
        "stream",
        "--messages",
        "1500",
        "--size",
        "100",
        "--batch",
        "200",
        "--consumers",
        "2",
    ]);
    assert_eq!(number(&r, "throughput.messages"), 3000.0, "{r}");
    assert_eq!(number(&r, "throughput.bytes"), 3000.0 * 100.0);
    assert_eq!(number(&r, "latency_ms.samples"), 16.0, "eight fetches each");
    assert_eq!(r["params"]["mode"], "stream");
    // Stream groups are for consume, over the native protocol.
    assert_usage_error(&["e2e", "--mode", "stream"], "--mode stream");
    assert_usage_error(
        &["consume", "--mode", "stream", "--transport", "grpc"],
        "--transport grpc",
    );
}

#[test]
fn an_unreachable_server_is_one_error_naming_it() {
    // A port nothing listens on: bound, then released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local address").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "bench",
            "produce",
            "--messages",
            "10",
            "--baseline-mib",
            "1",
        ])
        .args(["--server", &addr, "--data"])
        .arg(tmp.path())
        .output()
        .expect("run spool bench");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("refused"),
        "{stderr}"
    );
    // The run's topic was never created, so there is nothing to remove.
    assert!(!stderr.contains("could not remove"), "{stderr}");
}

/// `--transport grpc` given the address of another of the broker's
/// listeners (native, metrics, socket.io) says which address it wants, not
/// the HTTP/2 library's error.
#[test]
fn grpc_pointed_at_another_listener_names_the_address_to_use() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(data.path(), &[]);
    let scratch = tempfile::tempdir().expect("tempdir");
    let others = [
        Some(broker.addr.clone()),
        broker.metrics.clone(),
        broker.socketio.clone(),
    ];
    for addr in others
        .into_iter()
        .map(|a| a.expect("the listener's address"))
    {
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args([
                "bench",
                "produce",
                "--transport",
                "grpc",
                "--messages",
                "10",
            ])
            .args(["--baseline-mib", "1", "--server", &addr, "--data"])
            .arg(scratch.path())
            .output()
            .expect("run spool bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{addr}: {stderr}");
        assert!(
            stderr.contains("gRPC address (serve --grpc")
                && !stderr.contains("GoAway")
                && !stderr.contains("tonic::"),
            "{addr}: {stderr}"
        );
    }
}

/// The entries of `dir`.
fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .expect("read scratch parent")
        .map(|e| e.expect("directory entry").path())
        .collect()
}

/// A slow produce: one 100-byte message per durable request, so a run the
/// signal failed to stop writes little before it is killed.
const SLOW_PRODUCE: [&str; 10] = [
    "produce",
    "--duration",
    "30",
    "--size",
    "100",
    "--batch",
    "1",
    "--baseline-mib",
    "1",
    "--fsync=always",
];

/// Starts `spool bench ARGS` with its scratch in `scratch`, waits until
/// `under_way`, sends `signal` and returns the exit code, stderr and how
/// long it took to exit. The bench is killed should the test fail first.
fn interrupt_bench(
    args: &[&str],
    scratch: &std::path::Path,
    under_way: impl Fn() -> bool,
    signal: &str,
) -> (Option<i32>, String, std::time::Duration) {
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("bench")
        .args(args)
        .arg("--data")
        .arg(scratch)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start spool bench");
    // Read as it comes, so a full pipe never holds the bench up.
    let mut pipe = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let mut bench = common::Killed(child);
    let started = Instant::now();
    while !under_way() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the bench never got under way"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Timed from before the signal, so a run that waited its whole time to
    // tidy up cannot be measured as shorter than that.
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args([signal, &bench.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = loop {
        if let Some(status) = bench.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "spool bench did not stop on {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    let stderr = stderr.join().expect("stderr reader");
    (exited.code(), stderr, took)
}

#[test]
fn an_interrupted_bench_exits_128_plus_the_signal_and_leaves_nothing_behind() {
    // Whether the in-process broker's data directory exists in the scratch.
    fn data_exists(dir: &std::path::Path, depth: u32) -> bool {
        dir.join("data").exists()
            || (depth > 0
                && entries(dir)
                    .iter()
                    .any(|d| d.is_dir() && data_exists(d, depth - 1)))
    }
    // Exit 128 + the signal's number, as a shell reports it.
    for (signal, exit) in [("-INT", 130), ("-TERM", 143)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (code, stderr, took) = interrupt_bench(
            &SLOW_PRODUCE,
            tmp.path(),
            || data_exists(tmp.path(), 3),
            signal,
        );
        assert_eq!(code, Some(exit), "{signal}: {stderr}");
        // Before the 10 s a run may take to tidy up: this one stops at once.
        assert!(
            took < std::time::Duration::from_secs(10),
            "{signal}: took {took:?}"
        );
        assert!(
            stderr.contains("scratch data removed"),
            "{signal}: {stderr}"
        );
        assert!(entries(tmp.path()).is_empty(), "{signal}: left behind");
    }
}

#[test]
fn an_interrupted_bench_removes_its_topic_from_the_server() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(data.path(), &[]);
    let topics = || {
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["topic", "list", "--server", &broker.addr])
            .output()
            .expect("spool topic list");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    // Open loop, so that many produce requests are on their way when the
    // run stops: each one the broker takes after the topic's delete
    // creates it again, unless the bench deletes it once more.
    let args = [
        "produce",
        "--duration",
        "30",
        "--size",
        "100",
        "--batch",
        "1",
        "--rate",
        "200000",
        "--baseline-mib",
        "1",
        "--server",
        &broker.addr,
    ];
    let (code, stderr, _) = interrupt_bench(
        &args,
        tmp.path(),
        || topics().contains("bench-produce-"),
        "-INT",
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(entries(tmp.path()).is_empty(), "left behind");
    // Gone, and still gone once anything left on its way has arrived.
    assert!(!topics().contains("bench-produce-"), "{}", topics());
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!topics().contains("bench-produce-"), "{}", topics());
}

#[test]
fn an_interrupted_socketio_bench_stops_its_broker_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Under way once the broker it started has made its data directory.
    let under_way = || {
        entries(tmp.path())
            .iter()
            .any(|scratch| entries(scratch).iter().any(|run| run.join("data").exists()))
    };
    let (code, stderr, took) = interrupt_bench(
        &["socketio", "--clients", "10", "--duration", "30"],
        tmp.path(),
        under_way,
        "-INT",
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("scratch data removed"), "{stderr}");
    assert!(entries(tmp.path()).is_empty(), "left behind");
    // It has nothing to tidy up on a broker, so it does not wait the 10 s
    // a produce or consume run may take for that.
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

/// An open loop bounded by time ends with it: at a rate the broker cannot
/// take, the run sends fewer messages than rate × duration instead of
/// sending every due one for as long as that takes.
#[test]
fn an_open_loop_ends_with_its_duration_however_far_behind() {
    let r = bench(&[
        "produce",
        "--rate",
        "10000000",
        "--duration",
        "0.3",
        "--size",
        "100",
        "--batch",
        "1000",
        "--fsync",
        "never",
    ]);
    let sent = number(&r, "throughput.messages");
    assert!(sent > 0.0, "{r}");
    assert!(sent < 3_000_000.0, "every due message was sent: {r}");
}
