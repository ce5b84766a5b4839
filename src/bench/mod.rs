//! `spool bench`: load generation that reports throughput and latency next to
//! the disk's own bandwidth, measured in the same run. Latencies are counted
//! from when a message was *due* (open loop, see [`pacing`]), so a broker
//! stall shows in the tail instead of slowing the load down.
//!
//! - [`histogram`]: per-task HdrHistograms, merged at the end.
//! - [`pacing`]: which messages each send carries and when it is due.
//! - [`report`]: the report, its stable JSON field names, the machine.
//! - [`disk`]: the raw disk baseline (write + fdatasync every 1 MiB, and without).
//! - [`relay`]: the e2e floor without a broker (loopback TCP through a task
//!   that only forwards).
//! - [`commit_floor`]: the durable e2e floor's disk part (the same timetable
//!   appended by one thread in group-commit rounds of write + fdatasync).
//! - `target`, `produce`, `consume`: the broker under test and the load on it.
//! - [`socketio`]: `spool bench socketio`, websocket clients in one socket.io
//!   room of a broker process of its own (run by [`socketio::run`], not [`run`]).
//!
//! [`run`] needs a multi-threaded tokio runtime: open-loop pacing runs on its
//! own OS threads, disk work on blocking threads.

pub mod commit_floor;
pub mod disk;
pub mod histogram;
pub mod pacing;
pub mod relay;
pub mod report;
pub mod socketio;

mod consume;
mod produce;
mod target;

use crate::client::ClientError;
use crate::storage::FsyncPolicy;
use histogram::Latency;
use report::Report;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Bytes in a megabyte of the report (decimal, as `mb_per_s` says).
pub const MB: f64 = 1_000_000.0;

/// What a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Producers appending; latency from a batch's due time to its ack.
    Produce,
    /// Consumers reading a pre-filled topic (replay, or a queue group with acks).
    Consume,
    /// Producers and consumers at once; latency from due time to delivery.
    E2e,
    /// The data directory's disk alone.
    Disk,
    /// Websocket clients in one socket.io room (see [`socketio`]).
    Socketio,
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Workload, String> {
        match s {
            "produce" => Ok(Workload::Produce),
            "consume" => Ok(Workload::Consume),
            "e2e" => Ok(Workload::E2e),
            "disk" => Ok(Workload::Disk),
            "socketio" => Ok(Workload::Socketio),
            other => Err(format!(
                "workload {other:?}: expected produce, consume, e2e, disk or socketio"
            )),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::E2e => "e2e",
            Workload::Disk => "disk",
            Workload::Socketio => "socketio",
        })
    }
}

/// How consumers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Every consumer reads every message, no group state.
    #[default]
    Replay,
    /// The consumers share one queue group and ack what they got.
    Queue,
    /// Each consumer reads every message through a stream group of its
    /// own, created at the earliest offset, and commits where it got to
    /// once it has read them all (a consumer group catching up).
    Stream,
}

impl FromStr for ReadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ReadMode, String> {
        match s {
            "replay" => Ok(ReadMode::Replay),
            "queue" => Ok(ReadMode::Queue),
            "stream" => Ok(ReadMode::Stream),
            other => Err(format!(
                "read mode {other:?}: expected replay, queue or stream"
            )),
        }
    }
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadMode::Replay => "replay",
            ReadMode::Queue => "queue",
            ReadMode::Stream => "stream",
        })
    }
}

/// Which of the broker's protocols the load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The native framed protocol.
    #[default]
    Native,
    /// gRPC, through the generated client (`produce` and `consume --mode replay`).
    Grpc,
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "native" => Ok(Transport::Native),
            "grpc" => Ok(Transport::Grpc),
            other => Err(format!("transport {other:?}: expected native or grpc")),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Native => "native",
            Transport::Grpc => "grpc",
        })
    }
}

/// The exact parameters of a run; the report repeats them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// What is measured.
    pub workload: Workload,
    /// Producer connections.
    pub producers: u32,
    /// Consumer connections.
    pub consumers: u32,
    /// Messages produced (consume: the size of the pre-filled topic), unless
    /// the run is bounded by `duration_s` (consume takes both: the topic's
    /// size, and how long to read it again and again).
    pub messages: Option<u64>,
    /// Length of the run in seconds, instead of a message count.
    pub duration_s: Option<f64>,
    /// Bytes of each message's value.
    pub size: u32,
    /// Messages per produce request; consume: most messages per fetch.
    pub batch: u32,
    /// Target messages per second of all producers together (open loop);
    /// `None`: each producer sends as fast as its acks come back.
    pub rate: Option<u64>,
    /// The topic's fsync policy.
    pub fsync: FsyncPolicy,
    /// How consumers read.
    pub mode: ReadMode,
    /// Closed loop: requests each producer or consumer keeps outstanding.
    pub in_flight: u32,
    /// `consume --mode replay`: queue-group consumers that fetch and ack one
    /// message at a time on the same topic while the replay runs (a load
    /// whose own figures are not reported), to see what acks cost readers.
    #[serde(default)]
    pub queue_load: u32,
    /// The protocol producers and replay readers speak.
    #[serde(default)]
    pub transport: Transport,
    /// The broker (with gRPC: its gRPC address); `None`: one started in this
    /// process on a temporary directory.
    pub server: Option<String>,
    /// Where the temporary directory (broker data, disk baseline) is made.
    pub data: Option<PathBuf>,
    /// MiB written by the disk baseline, in each of its two runs.
    pub baseline_mib: u64,
    /// TLS to `server`, trusting the CAs of this PEM file (native only).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The token presented to `server` (never written in the report).
    #[serde(skip)]
    pub token: Option<String>,
}

impl Params {
    /// Parameters of `workload` with the defaults of `spool bench`.
    pub fn new(workload: Workload) -> Params {
        let e2e = workload == Workload::E2e;
        Params {
            workload,
            producers: 1,
            consumers: 1,
            messages: Some(if e2e { 50_000 } else { 100_000 }),
            duration_s: None,
            size: 1024,
            batch: match workload {
                Workload::E2e => 1,
                Workload::Consume => 1000,
                _ => 100,
            },
            rate: e2e.then_some(10_000),
            fsync: FsyncPolicy::Always,
            mode: ReadMode::Replay,
            in_flight: 1,
            queue_load: 0,
            transport: Transport::Native,
            server: None,
            data: None,
            baseline_mib: 256,
            tls_ca: None,
            token: None,
        }
    }

    /// Checks what the flags alone cannot, naming the first problem.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Invalid(m));
        if self.producers == 0 || self.consumers == 0 || self.in_flight == 0 {
            return bad("--producers, --consumers and --in-flight must be at least 1".into());
        }
        if self.queue_load > 0
            && (self.workload != Workload::Consume || self.mode != ReadMode::Replay)
        {
            return bad("--queue-load goes with consume --mode replay".into());
        }
        if self.mode == ReadMode::Stream && self.workload != Workload::Consume {
            return bad("--mode stream goes with consume".into());
        }
        let grpc_workload = self.workload == Workload::Produce
            || (self.workload == Workload::Consume
                && self.mode == ReadMode::Replay
                && self.queue_load == 0);
        if self.transport == Transport::Grpc && !grpc_workload {
            return bad(
                "--transport grpc goes with produce and consume --mode replay (without --queue-load)"
                    .into(),
            );
        }
        if (self.tls_ca.is_some() || self.token.is_some()) && self.server.is_none() {
            return bad(
                "--tls-ca and --token go with --server (the in-process broker has neither)".into(),
            );
        }
        if (self.tls_ca.is_some() || self.token.is_some()) && self.transport == Transport::Grpc {
            return bad("--tls-ca and --token go with --transport native".into());
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return bad(format!("--batch {}: use 1 to {MAX_BATCH}", self.batch));
        }
        if let Some(d) = self.duration_s {
            check_duration(d).map_err(BenchError::Invalid)?;
        }
        match (self.messages, self.duration_s) {
            (Some(0), _) => return bad("--messages must be at least 1".into()),
            (None, None) => return bad("give --messages or --duration".into()),
            (Some(_), Some(_)) if self.workload != Workload::Consume => {
                return bad(
                    "give --messages or --duration, not both (only consume takes both: \
                     the topic's size and how long to read it)"
                        .into(),
                );
            }
            _ => {}
        }
        if self.workload == Workload::E2e && (self.size as usize) < STAMP_LEN {
            return bad(format!(
                "--size {}: e2e needs at least {STAMP_LEN} bytes per message to carry its send time",
                self.size
            ));
        }
        if self.rate == Some(0) {
            return bad("--rate must be positive (leave it out for a closed loop)".into());
        }
        if self.baseline_mib == 0 {
            return bad("--baseline-mib must be at least 1".into());
        }
        Ok(())
    }

    fn duration(&self) -> Option<Duration> {
        self.duration_s.map(Duration::from_secs_f64)
    }
}

/// Shortest `--duration`, in seconds: a millisecond (shorter runs end
/// before they send anything).
const MIN_DURATION_S: f64 = 0.001;
/// Longest `--duration`, in seconds: a year.
const MAX_DURATION_S: f64 = 365.0 * 24.0 * 3600.0;

/// Checks a `--duration` in seconds against the bounds every workload has.
pub(crate) fn check_duration(d: f64) -> Result<(), String> {
    if d.is_finite() && (MIN_DURATION_S..=MAX_DURATION_S).contains(&d) {
        return Ok(());
    }
    Err(format!(
        "--duration {d}: expected a number of seconds from {MIN_DURATION_S} (a millisecond) \
         to {MAX_DURATION_S} (a year)"
    ))
}

/// Most messages per produce or fetch (the broker's default batch limit).
pub const MAX_BATCH: u32 = 10_000;
/// Bytes at the start of each e2e value: its due time, nanoseconds since the
/// run's origin, little-endian.
pub const STAMP_LEN: usize = 8;

/// What went wrong in a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The parameters cannot work together.
    #[error("{0}")]
    Invalid(String),
    /// The broker refused a request or the connection failed.
    #[error("{what}: {source}")]
    Client {
        /// What the bench was doing.
        what: String,
        /// The client's error.
        #[source]
        source: ClientError,
    },
    /// A gRPC call failed or the gRPC connection could not be made.
    #[error("{what}: {message}")]
    Grpc {
        /// What the bench was doing.
        what: String,
        /// The status or transport error.
        message: String,
    },
    /// Starting the in-process broker failed.
    #[error("starting the in-process broker: {0}")]
    Server(#[from] crate::Error),
    /// A file operation found the disk full or a file at the process's
    /// file-size limit (named, with how to raise it).
    #[error("{0}")]
    Full(crate::Error),
    /// A file operation of the disk baseline or the scratch directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What the bench was doing, naming the file.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Messages went missing or the broker stopped answering.
    #[error("{0}")]
    Incomplete(String),
    /// The run was told to stop (Ctrl-C) before it finished.
    #[error("stopped before it finished")]
    Stopped,
}

impl BenchError {
    fn client(what: impl Into<String>) -> impl FnOnce(ClientError) -> BenchError {
        let what = what.into();
        move |source| BenchError::Client { what, source }
    }

    fn grpc<E: std::error::Error + 'static>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> BenchError {
        let what = what.into();
        move |e| BenchError::Grpc {
            what,
            message: grpc_hint(&e),
        }
    }

    /// A failed file operation while doing `what`; a full disk or a file at
    /// the process's file-size limit in the broker's words, which name the
    /// limit and how to raise it.
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| {
            if crate::error::is_disk_full(&source) {
                BenchError::Full(crate::Error::io(what, source))
            } else {
                BenchError::Io { what, source }
            }
        }
    }
}

/// What a failed gRPC call or connection says: its status or error, or
/// for a server that answered no HTTP/2 (most often another of the
/// broker's listeners given to `--transport grpc`), what to check.
fn grpc_hint(error: &(dyn std::error::Error + 'static)) -> String {
    const CHECK: &str = "with --transport grpc, --server is the broker's gRPC address \
                         (serve --grpc, 127.0.0.1:7412 by default), not its native, metrics \
                         or socket.io one";
    let message = error.to_string();
    if message.contains("h2 protocol error") {
        return format!(
            "the server did not answer in HTTP/2, as spool's gRPC listener does \
             (h2 protocol error); {CHECK}"
        );
    }
    // A transport failure shows as a status whose text holds the debug
    // form of its source: the innermost source says what happened.
    let status = error.downcast_ref::<tonic::Status>();
    // The bench cancels no call of its own: a cancelled one is a
    // connection the server ended.
    let transport = error.is::<tonic::transport::Error>()
        || status.is_some_and(|s| {
            s.code() == tonic::Code::Cancelled
                || (s.code() == tonic::Code::Unknown && s.message() == "transport error")
        });
    if !transport {
        return status.map_or(message, |s| format!("{} ({:?})", s.message(), s.code()));
    }
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    format!(
        "the connection failed without a gRPC answer ({cause}); check that the broker is up, \
         and {CHECK}"
    )
}

/// How far a run has come, for a progress bar. Updated by the load tasks,
/// read by whoever draws.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    phase: std::sync::Mutex<&'static str>,
}

impl Progress {
    /// A new phase with `total` units of work (0 when unknown). Under the
    /// phase's lock, as [`Progress::snapshot`] reads: a bar never shows the
    /// new phase's name with the last one's counts.
    fn start(&self, phase: &'static str, total: u64) {
        let mut name = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        *name = phase;
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The phase's name, units done and units in total (0: unknown).
    pub fn snapshot(&self) -> (&'static str, u64, u64) {
        let name = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        (
            *name,
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// What a workload measured, before it becomes a report.
#[derive(Debug)]
struct Outcome {
    messages: u64,
    bytes: u64,
    elapsed: Duration,
    latency: Latency,
    measures: &'static str,
    send_lag: Latency,
}

/// `work`, unless `stop` is cancelled first ([`BenchError::Stopped`]).
async fn unless_stopped<T>(
    stop: &CancellationToken,
    work: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    tokio::select! {
        biased;
        () = stop.cancelled() => Err(BenchError::Stopped),
        done = work => done,
    }
}

/// Runs one benchmark: the disk baseline, then the workload. Cancelling
/// `stop` ends it early with [`BenchError::Stopped`], after removing the
/// run's topic from a `--server` broker or stopping the in-process one.
pub async fn run(
    params: &Params,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<Report, BenchError> {
    params.validate()?;
    let parent = params.data.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("spool-bench-")
        .tempdir_in(&parent)
        .map_err(BenchError::io(format!(
            "creating a scratch directory in {}",
            parent.display()
        )))?;
    progress.start("disk baseline", params.baseline_mib * 2);
    let disk_dir = scratch.path().join("disk");
    let (mib, p) = (params.baseline_mib, Arc::clone(&progress));
    let (baseline, synced) = unless_stopped(&stop, async {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || disk::measure(&disk_dir, mib, &p, &stop))
            .await
            .map_err(|e| BenchError::Incomplete(format!("disk baseline panicked: {e}")))?
    })
    .await?;
    // The floors of an open-loop e2e run, each as long as the run and at
    // most its probe's time: the network part, and under `fsync=always`
    // the disk part.
    let open_e2e = match (params.workload, params.rate) {
        (Workload::E2e, Some(rate)) if rate > 0 => {
            let run = match (params.duration(), params.messages) {
                (Some(d), _) => d,
                (None, Some(n)) => {
                    Duration::try_from_secs_f64(n as f64 / rate as f64).unwrap_or(Duration::MAX)
                }
                (None, None) => relay::PROBE_TIME,
            };
            Some((rate, run))
        }
        _ => None,
    };
    let relay_floor = match open_e2e {
        Some((rate, run)) => {
            progress.start("relay floor", 0);
            let time = run.min(relay::PROBE_TIME);
            Some(unless_stopped(&stop, relay::probe(rate, params.size as usize, time)).await?)
        }
        None => None,
    };
    let commit_floor = match open_e2e {
        Some((rate, run)) if params.fsync == FsyncPolicy::Always => {
            progress.start("commit floor", 0);
            let time = run.min(commit_floor::PROBE_TIME);
            let (dir, size, stop) = (
                scratch.path().join("commit-floor"),
                params.size as usize,
                stop.clone(),
            );
            let probe = tokio::task::spawn_blocking(move || {
                commit_floor::probe(&dir, rate, size, time, &stop)
            });
            Some(
                probe
                    .await
                    .map_err(|e| BenchError::Incomplete(format!("commit floor panicked: {e}")))??,
            )
        }
        _ => None,
    };
    let outcome = match params.workload {
        Workload::Socketio => {
            return Err(BenchError::Invalid(
                "the socketio workload runs through spool::bench::socketio::run".into(),
            ));
        }
        Workload::Disk => Outcome {
            messages: synced.writes,
            bytes: synced.bytes,
            elapsed: synced.elapsed,
            latency: synced.latency,
            measures: "write of 1 MiB + fdatasync, each",
            send_lag: Latency::new(),
        },
        workload => {
            let target = target::Target::start(params, &scratch.path().join("data")).await?;
            let outcome = unless_stopped(&stop, async {
                match workload {
                    Workload::Produce => produce::workload(&target, params, &progress).await,
                    Workload::Consume => consume::workload(&target, params, &progress).await,
                    _ => consume::e2e(&target, params, &progress).await,
                }
            })
            .await;
            match outcome {
                Err(BenchError::Stopped) => target.finish_interrupted().await,
                _ => target.finish().await,
            }
            outcome?
        }
    };
    progress.start("done", 0);
    let mut report = Report::new(params, outcome, baseline);
    report.relay_floor_ms = relay_floor;
    report.commit_floor_ms = commit_floor;
    Ok(report)
}

/// The instant a run's timetable starts: a little ahead, in an open loop, so
/// pacing threads are up before the first send is due.
fn origin(params: &Params) -> Instant {
    let lead = if params.rate.is_some() {
        pacing::LEAD
    } else {
        Duration::ZERO
    };
    Instant::now() + lead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_for_every_workload() {
        for w in [
            Workload::Produce,
            Workload::Consume,
            Workload::E2e,
            Workload::Disk,
        ] {
            Params::new(w).validate().expect("defaults validate");
            assert_eq!(w.to_string().parse::<Workload>(), Ok(w));
        }
        assert_eq!(Params::new(Workload::E2e).rate, Some(10_000));
    }

    #[test]
    fn bad_combinations_are_named() {
        let mut p = Params::new(Workload::E2e);
        p.size = 4;
        let e = p
            .validate()
            .expect_err("too small for the stamp")
            .to_string();
        assert!(e.contains("--size 4"), "{e}");
        let mut p = Params::new(Workload::Produce);
        p.batch = MAX_BATCH + 1;
        assert!(p.validate().is_err());
        p.batch = 10;
        p.messages = None;
        assert!(p.validate().is_err());
        p.duration_s = Some(-1.0);
        assert!(p.validate().is_err());
        p.duration_s = Some(1e-12);
        let e = p.validate().expect_err("too short to send").to_string();
        assert!(e.contains("a millisecond"), "{e}");
        p.duration_s = Some(0.5);
        p.validate().expect("duration instead of messages");
        p.messages = Some(10);
        assert!(p.validate().is_err(), "produce takes one bound");
        p.workload = Workload::Consume;
        p.validate().expect("consume: topic size and read time");
        p.transport = Transport::Grpc;
        p.validate().expect("gRPC replay");
        p.mode = ReadMode::Queue;
        let e = p.validate().expect_err("no gRPC queue").to_string();
        assert!(e.contains("--transport"), "{e}");
        p.workload = Workload::E2e;
        assert!(p.validate().is_err(), "no gRPC e2e");
    }

    #[test]
    fn progress_resets_per_phase() {
        let p = Progress::default();
        p.start("prefill", 10);
        p.add(4);
        assert_eq!(p.snapshot(), ("prefill", 4, 10));
        p.start("consume", 0);
        assert_eq!(p.snapshot(), ("consume", 0, 0));
    }
}
