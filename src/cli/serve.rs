//! `spool serve`: open the data directory, take its lock and recover every
//! topic's log, then hold the directory until interrupted.

use clap::Args;
use spool::storage::io::OsStorage;
use spool::storage::{DataDir, LogConfig, RecoveryMode};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `spool serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, default_value = "./data", env = "SPOOL_DATA")]
    data: PathBuf,
    /// How to treat damage found when opening logs: tolerate-torn-tail (default:
    /// cut a torn tail, refuse anything worse) or skip-damaged (quarantine
    /// damaged ranges and open anyway).
    #[arg(long, default_value = "tolerate-torn-tail")]
    recovery: String,
}

/// Runs the command.
pub fn run(args: ServeArgs) -> spool::Result<()> {
    let mode: RecoveryMode = args.recovery.parse()?;
    let data = DataDir::open(Arc::new(OsStorage), &args.data)?;
    let topics = data.topics()?;
    let mut logs = Vec::with_capacity(topics.len());
    for topic in &topics {
        let log = data.open_log(topic, LogConfig::default(), mode)?;
        let stats = log.stats();
        tracing::info!(topic, start = %stats.start, end = %stats.end, segments = stats.segments, "opened topic");
        logs.push(log);
    }
    println!(
        "spool {} data {} ({} topics recovered); press Ctrl-C to stop",
        env!("CARGO_PKG_VERSION"),
        args.data.display(),
        logs.len()
    );
    // The network listener is not part of this version; the process holds the
    // data directory (and its lock) until it is stopped. Every acknowledged
    // write is already on disk, so stopping needs no extra work.
    loop {
        std::thread::park();
    }
}
