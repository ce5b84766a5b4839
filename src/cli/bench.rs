//! `spool bench WORKLOAD`: load a broker (one started in this process on a
//! temporary directory, or `--server`) and print throughput, latency and the
//! disk baseline measured in the same run, as a table or as JSON.

use super::common::{CliError, CliResult, Format, print_table};
use clap::{Args, CommandFactory};
use indicatif::{ProgressBar, ProgressStyle};
use spool::bench::report::Report;
use spool::bench::{Params, Progress, ReadMode, Transport, Workload};
use spool::storage::FsyncPolicy;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Arguments of `spool bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// produce | consume (a pre-filled topic; --mode replay, queue or stream) | e2e
    /// (producers and consumers at once) | disk (the raw disk alone) |
    /// socketio (--clients websocket clients in one socket.io room, one
    /// publisher at --rate; delivery latency and broker memory per idle
    /// connection).
    workload: Workload,
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Consumer connections.
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// socketio: websocket clients in the room.
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// Messages to produce; consume: size of the pre-filled topic [default: 100000; e2e 50000].
    #[arg(long)]
    messages: Option<u64>,
    /// Run for this many seconds instead of a message count (consume: read
    /// the pre-filled topic again and again for this long).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Bytes of each message's value [default: 1024; socketio 100].
    #[arg(long, value_name = "BYTES")]
    size: Option<u32>,
    /// Messages per produce request; consume: per fetch [default: 100; consume 1000; e2e 1].
    #[arg(long)]
    batch: Option<u32>,
    /// Target messages per second of all producers together, paced open-loop
    /// (latency counts from when each message was due); 0 = as fast as acks
    /// come back [default: closed loop; e2e 10000].
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<u64>,
    /// fsync policy of the bench topic: always, interval:MS or never.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    /// How consumers read: replay (each reads every message), queue (one
    /// queue group, acking) or stream (consume only: each reads every
    /// message through a stream group of its own, then commits).
    #[arg(long, default_value = "replay")]
    mode: ReadMode,
    /// Closed loop: requests each producer (or consumer) keeps outstanding.
    #[arg(long, default_value_t = 1)]
    in_flight: u32,
    /// consume --mode replay: this many queue-group consumers fetch and ack
    /// one message at a time on the same topic while the replay is measured.
    #[arg(long, default_value_t = 0, value_name = "N")]
    queue_load: u32,
    /// The protocol producers and replay readers speak: native or grpc
    /// (grpc: produce and consume --mode replay only; the in-process broker
    /// also listens for gRPC, and --server names a gRPC address).
    #[arg(long, default_value = "native")]
    transport: Transport,
    /// Load this broker (HOST:PORT) instead of starting one in this process.
    #[arg(long, value_parser = super::common::parse_server)]
    server: Option<String>,
    /// With --server: connect with TLS, trusting the CAs of this PEM file.
    #[arg(long, env = "SPOOL_TLS_CA", value_name = "FILE", value_parser = super::common::parse_ca_file)]
    tls_ca: Option<PathBuf>,
    /// With --server: the token to present.
    #[arg(
        long,
        env = "SPOOL_TOKEN",
        value_name = "SECRET",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Where the temporary directory for the in-process broker and the disk
    /// baseline is made [default: the system temp dir]; it is removed at the
    /// end, also after Ctrl-C or SIGTERM.
    #[arg(long)]
    data: Option<PathBuf>,
    /// MiB written by each run of the disk baseline.
    #[arg(long, default_value_t = 256)]
    baseline_mib: u64,
    /// text: a table; json: one document with stable field names.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

impl BenchArgs {
    fn params(&self) -> Params {
        let defaults = Params::new(self.workload);
        Params {
            workload: self.workload,
            producers: self.producers,
            consumers: self.consumers,
            messages: match (self.messages, self.duration, self.workload) {
                (Some(m), _, _) => Some(m),
                (None, Some(_), w) if w != Workload::Consume => None,
                (None, _, _) => defaults.messages,
            },
            duration_s: self.duration,
            size: self.size.unwrap_or(1024),
            batch: self.batch.unwrap_or(defaults.batch),
            rate: match self.rate {
                Some(0) => None,
                Some(r) => Some(r),
                None => defaults.rate,
            },
            fsync: self.fsync,
            mode: self.mode,
            in_flight: self.in_flight,
            queue_load: self.queue_load,
            transport: self.transport,
            server: self.server.clone(),
            data: self.data.clone(),
            baseline_mib: self.baseline_mib,
            tls_ca: self.tls_ca.clone(),
            token: self.token.clone(),
        }
    }
}

/// Runs `spool bench socketio`.
fn run_socketio(args: &BenchArgs) -> CliResult {
    // The socket.io clients speak plain websocket without a token. A value
    // from the environment (`SPOOL_TLS_CA`, `SPOOL_TOKEN`, set for the other
    // commands) is not asked for here: only a flag is refused.
    let from_env = |name: &str, value: Option<&std::ffi::OsStr>| {
        value.is_some() && std::env::var_os(name).as_deref() == value
    };
    let tls_ca = args.tls_ca.as_deref().map(std::path::Path::as_os_str);
    let token = args.token.as_deref().map(std::ffi::OsStr::new);
    // Flags of the other workloads, given (or set away from their default).
    let others = [
        ("--transport", args.transport != Transport::Native),
        (
            "--tls-ca",
            tls_ca.is_some() && !from_env("SPOOL_TLS_CA", tls_ca),
        ),
        (
            "--token",
            token.is_some() && !from_env("SPOOL_TOKEN", token),
        ),
        ("--messages", args.messages.is_some()),
        ("--batch", args.batch.is_some()),
        ("--producers", args.producers != 1),
        ("--consumers", args.consumers != 1),
        ("--in-flight", args.in_flight != 1),
        ("--mode", args.mode != ReadMode::Replay),
        ("--queue-load", args.queue_load != 0),
        ("--baseline-mib", args.baseline_mib != 256),
    ];
    let unused = others
        .iter()
        .find(|(_, given)| *given)
        .map(|(flag, _)| *flag);
    if let Some(flag) = unused {
        usage_error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("{flag} does not apply to the socketio workload"),
        );
    }
    let params = spool::bench::socketio::SocketioParams {
        clients: args.clients,
        rate: args.rate.unwrap_or(100),
        duration_s: args.duration.unwrap_or(10.0),
        size: args.size.unwrap_or(100),
        fsync: args.fsync.to_string(),
        server: args.server.clone(),
        data: args.data.clone(),
    };
    if let Err(e) = params.validate() {
        usage_error(clap::error::ErrorKind::ValueValidation, e);
    }
    let run_params = params.clone();
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    let r = interruptible(
        args.data.as_deref(),
        "socketio",
        |data, stop| {
            let params = spool::bench::socketio::SocketioParams { data, ..run_params };
            // Nothing to tidy up on a broker: the run is dropped at once,
            // which kills the broker process it started.
            async move {
                tokio::select! {
                    report = spool::bench::socketio::run(&params, &p) => report,
                    () = stop.cancelled() => Err(spool::bench::BenchError::Stopped),
                }
            }
        },
        Some(&progress),
    )?
    .map_err(|e| CliError::runtime(format!("bench socketio: {e}")))?;
    match args.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string(&r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        ),
        Format::Text => {
            let kib = |b: Option<u64>| {
                b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
            };
            outln!(
                "spool bench socketio: {} websocket clients in one room, {} msg/s for {} s ({} bytes of filler), fsync {}",
                params.clients,
                params.rate,
                params.duration_s,
                params.size,
                params.fsync
            );
            outln!(
                "deliveries {} of {} ({:.0}/s); latency ms p50 {} p90 {} p99 {} p99.9 {} max {}",
                r.deliveries,
                r.expected,
                r.deliveries_per_s,
                ms(r.latency.p50),
                ms(r.latency.p90),
                ms(r.latency.p99),
                ms(r.latency.p999),
                ms(r.latency.max)
            );
            outln!(
                "broker RSS: {} before, {} with the clients idle ({} per idle connection), {} at the end",
                kib(r.rss_before_bytes),
                kib(r.rss_idle_bytes),
                r.bytes_per_idle_connection
                    .map_or("-".into(), |b| format!("{:.1} KiB", b / 1024.0)),
                kib(r.rss_loaded_bytes),
            );
        }
    }
    Ok(())
}

/// Exits with a usage error (exit 2) of `spool bench`, its usage line
/// included, as clap's own errors of the command have.
fn usage_error(kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> ! {
    let mut cli = super::Cli::command();
    cli.build();
    match cli.find_subcommand_mut("bench") {
        Some(bench) => bench.error(kind, message).exit(),
        None => cli.error(kind, message).exit(),
    }
}

/// Runs the command.
pub fn run(args: BenchArgs) -> CliResult {
    if args.workload == Workload::Socketio {
        return run_socketio(&args);
    }
    let params = args.params();
    if let Err(e) = params.validate() {
        usage_error(clap::error::ErrorKind::ValueValidation, e);
    }
    let progress = Arc::new(Progress::default());
    let workload = params.workload.to_string();
    let p = Arc::clone(&progress);
    let report = interruptible(
        args.data.as_deref(),
        &workload,
        |data, stop| {
            let params = Params { data, ..params };
            async move { spool::bench::run(&params, p, stop).await }
        },
        Some(&progress),
    )?
    .map_err(|e| CliError::runtime(format!("bench {workload}: {e}")))?;
    // The run's own directory was a scratch one inside --data: the report
    // repeats the parameters as given.
    let mut report = report;
    report.params.data = args.data.clone();
    match args.format {
        Format::Json => outln!("{}", report.to_json()),
        Format::Text => print_text(&report),
    }
    Ok(())
}

/// Runs a bench on a runtime of its own, in a scratch directory made in
/// `parent` (default: the system's temporary directory) and handed to
/// `run`, drawing `progress` on a terminal.
///
/// Ctrl-C or SIGTERM ends it early: the run is told to stop (the token
/// `run` gets) and given [`STOP_WAIT`] to tidy up, such as removing its
/// topic from a `--server` broker; a second signal stops waiting. Then the
/// runtime is stopped (an in-process broker and its blocking work with
/// it, a broker process it started killed; at most [`SHUTDOWN_WAIT`]) and
/// only then the scratch directory removed, so an interrupted bench leaves
/// nothing behind; the
/// command exits 128 + the signal's number (130 for Ctrl-C, 143 for
/// SIGTERM).
fn interruptible<T, F, Fut>(
    parent: Option<&Path>,
    what: &str,
    run: F,
    progress: Option<&Progress>,
) -> Result<T, CliError>
where
    F: FnOnce(Option<PathBuf>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("starting the async runtime: {e}")))?;
    // The handlers first: from here on a signal is the run's to handle,
    // and nothing exists yet that it would leave behind.
    let mut signals = {
        let _entered = runtime.enter();
        Signals::new()
    };
    let parent = parent.map_or_else(std::env::temp_dir, Path::to_owned);
    let scratch = tempfile::Builder::new()
        .prefix("spool-bench-")
        .tempdir_in(&parent)
        .map_err(|e| {
            CliError::runtime(format!(
                "bench {what}: creating a scratch directory in {}: {e}",
                parent.display()
            ))
        })?;
    let bar = progress
        .filter(|_| std::io::stderr().is_terminal())
        .map(|p| (new_bar(), p));
    let stop = CancellationToken::new();
    // Before anything writes (the run's own disk probe included).
    runtime.block_on(async { super::common::catch_file_size_signal() });
    // On a task of its own, so that a run blocking its thread cannot keep
    // this loop from seeing a signal.
    let mut task = runtime.spawn(run(Some(scratch.path().to_owned()), stop.clone()));
    let outcome = runtime.block_on(async {
        let mut signalled: Option<Stop> = None;
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        let give_up = tokio::time::sleep(Duration::MAX);
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                done = &mut task => break match signalled {
                    None => Ok(done),
                    Some(signal) => Err(signal),
                },
                signal = signals.next() => match signalled {
                    None => {
                        signalled = Some(signal);
                        stop.cancel();
                        give_up.as_mut().reset(tokio::time::Instant::now() + STOP_WAIT);
                    }
                    Some(first) => break Err(first),
                },
                () = &mut give_up, if signalled.is_some() => {
                    break Err(signalled.unwrap_or(Stop::INTERRUPT))
                }
                _ = tick.tick() => if let Some((bar, p)) = &bar { draw(bar, p) },
            }
        }
    });
    if let Some((bar, _)) = &bar {
        bar.finish_and_clear();
    }
    let signal = match outcome {
        Ok(done) => {
            drop(runtime);
            if let Err(e) = scratch.close() {
                tracing::warn!(error = %e, "could not remove the bench's scratch directory");
            }
            return done.map_err(|e| CliError::runtime(format!("bench {what} failed: {e}")));
        }
        Err(signal) => signal,
    };
    // Stops the in-process broker and its blocking work; a thread stuck
    // on the disk is not waited for without end.
    task.abort();
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    let left = match scratch.close() {
        Ok(()) => "its scratch data removed".to_owned(),
        Err(e) => format!("removing its scratch data failed: {e}"),
    };
    Err(CliError::interrupted(
        signal.number,
        format!("bench {what}: {}; {left}", signal.name),
    ))
}

/// How long an interrupted run's runtime is given to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How long an interrupted run may take to tidy up before it is dropped.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A signal that stopped a bench.
#[derive(Debug, Clone, Copy)]
struct Stop {
    name: &'static str,
    number: u8,
}

impl Stop {
    const INTERRUPT: Stop = Stop {
        name: "interrupted (SIGINT)",
        number: 2,
    };
    const TERMINATE: Stop = Stop {
        name: "terminated (SIGTERM)",
        number: 15,
    };
}

/// The signals that stop a bench: Ctrl-C (SIGINT) and SIGTERM. Made once
/// per run, so a signal that arrives between two polls is kept; a signal
/// whose handler cannot be installed is never reported.
struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl Signals {
    /// Must be called within the runtime.
    fn new() -> Signals {
        Signals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next signal.
    async fn next(&mut self) -> Stop {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let Signals {
            interrupt,
            terminate,
        } = self;
        tokio::select! {
            () = recv(interrupt) => Stop::INTERRUPT,
            () = recv(terminate) => Stop::TERMINATE,
        }
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style =
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn draw(bar: &ProgressBar, progress: &Progress) {
    let (phase, done, total) = progress.snapshot();
    bar.set_message(phase);
    // Not full while a phase's size is still unknown (0).
    bar.set_length(total.max(done).max(1));
    bar.set_position(done);
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn print_text(r: &Report) {
    let p = &r.params;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    outln!(
        "spool bench {} (spool {}; {} cores, {}; {})",
        r.workload,
        r.version,
        r.machine.cores,
        r.machine
            .memory_bytes
            .map_or_else(|| "memory unknown".into(), |b| format!("{:.1} GiB", gib(b))),
        p.server
            .as_deref()
            .map_or_else(|| "in-process broker".into(), |s| format!("broker {s}")),
    );
    if p.workload == Workload::Disk {
        outln!("baseline {} MiB per run\n", p.baseline_mib);
    } else {
        print_params(p);
    }
    print_figures(r);
}

fn print_params(p: &Params) {
    let amount = match (p.messages, p.duration_s) {
        (Some(m), Some(d)) => format!("messages {m}, duration {d} s"),
        (None, Some(d)) => format!("duration {d} s"),
        (Some(m), None) => format!("messages {m}"),
        (None, None) => String::new(),
    };
    outln!(
        "producers {}, consumers {}, {amount}, size {} B, batch {}, rate {}, fsync {}, mode {}, in-flight {}, queue load {}, transport {}\n",
        p.producers,
        p.consumers,
        p.size,
        p.batch,
        p.rate
            .map_or_else(|| "closed loop".into(), |r| format!("{r} msg/s")),
        p.fsync,
        p.mode,
        p.in_flight,
        p.queue_load,
        p.transport,
    );
}

fn print_figures(r: &Report) {
    let t = &r.throughput;
    let l = &r.latency_ms.summary;
    let d = &r.disk_baseline;
    let percentiles = |s: &spool::bench::histogram::LatencySummary| {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.p999),
            ms(s.max),
            s.samples
        )
    };
    let mut rows = vec![
        vec![
            "throughput".into(),
            format!(
                "{:.0} msg/s, {:.1} MB/s ({} messages, {:.1} MB in {:.2} s)",
                t.msgs_per_s,
                t.mb_per_s,
                t.messages,
                t.bytes as f64 / spool::bench::MB,
                t.seconds
            ),
        ],
        vec!["latency (ms)".into(), percentiles(l)],
        vec!["  measured".into(), r.latency_ms.measures.clone()],
    ];
    if r.send_lag_ms.samples > 0 {
        rows.push(vec!["send lag (ms)".into(), percentiles(&r.send_lag_ms)]);
    }
    rows.extend([
        vec![
            "disk, fdatasync/MiB".into(),
            format!("{:.1} MB/s", d.mb_per_s),
        ],
        vec![
            "disk, no sync".into(),
            format!("{:.1} MB/s", d.nosync_mb_per_s),
        ],
        vec![
            "disk, 1 KiB+fdatasync".into(),
            format!(
                "p50 {} ms  p99 {} ms  max {} ms",
                ms(d.fdatasync_1k_ms.p50),
                ms(d.fdatasync_1k_ms.p99),
                ms(d.fdatasync_1k_ms.max)
            ),
        ],
        vec!["ratio to disk".into(), format!("{:.2}x", r.ratio_to_disk)],
    ]);
    if let Some(floor) = &r.relay_floor_ms {
        rows.push(vec![
            "relay floor (ms)".into(),
            format!(
                "{}; loopback TCP through a forwarding task, no broker",
                percentiles(floor)
            ),
        ]);
    }
    if let Some(floor) = &r.commit_floor_ms {
        rows.push(vec![
            "commit floor (ms)".into(),
            format!(
                "{}; one thread's write + fdatasync rounds on the same timetable, no broker",
                percentiles(floor)
            ),
        ]);
    }
    print_table(&["MEASURE", "VALUE"], &rows);
}
