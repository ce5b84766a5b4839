//! The floor of a durable end-to-end latency's disk part, without a broker:
//! the e2e workload's messages, on the same timetable, appended by one
//! thread straight into a file the way group commit appends them. Each
//! round writes every message due by then with one `pwrite` and makes it
//! durable with one `fdatasync`; a message due while a round is under way
//! waits for the next. The file's blocks are written (zeros) and synced
//! before the run, so each round's sync writes data only, as spool's small
//! durable appends do. The thread spins between messages instead of
//! sleeping, so no wake-up is counted: what is measured is the disk and
//! the waiting that group commit on this disk implies at this rate, from
//! each message's due time to the end of its round's sync.
//!
//! Next to the relay floor ([`crate::bench::relay`]: the network part), it
//! bounds what a broker on this machine can reach: an e2e latency under
//! `fsync=always` cannot be below either, and the distance from their sum
//! is what the broker's own path costs.

use super::BenchError;
use super::histogram::{Latency, LatencySummary};
use super::pacing::Timetable;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest the probe runs.
pub const PROBE_TIME: Duration = Duration::from_secs(2);
/// Most bytes the probe's file holds: a high rate or large messages get a
/// shorter run instead of a larger file (though never fewer than one
/// message).
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of zeros written per call while the file is prepared.
const FILL: usize = 1024 * 1024;
/// Most messages one `pwrite` carries (a round after a stall takes several).
const MOST_PER_WRITE: u64 = 1024;

/// Appends `rate` messages per second of `size` bytes for up to `time` (less
/// when they would take more than [`MAX_BYTES`]) into a new file in `dir`,
/// in group-commit rounds, and returns each message's latency from its due
/// time to the end of its round's `fdatasync`. Blocking; the file is
/// removed afterwards. Ends with [`BenchError::Stopped`] within a round once
/// `stop` is cancelled.
pub fn probe(
    dir: &Path,
    rate: u64,
    size: usize,
    time: Duration,
    stop: &CancellationToken,
) -> Result<LatencySummary, BenchError> {
    let rate = rate.max(1);
    let size = size.max(1) as u64;
    let wanted = (time.as_secs_f64() * rate as f64).ceil().max(1.0) as u64;
    let count = wanted.min((MAX_BYTES / size).max(1));
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let path = dir.join("commit-floor");
    let name = || path.display().to_string();
    let file = File::create(&path).map_err(BenchError::io(format!("creating {}", name())))?;
    let result = prepare(&file, count * size, stop)
        .map_err(BenchError::io(format!("writing zeros into {}", name())))
        .and_then(|()| rounds(&file, rate, size, count, stop, &name));
    drop(file);
    // The run's own outcome comes first; a failed removal is reported only
    // after a run that succeeded.
    let removed = std::fs::remove_file(&path);
    let summary = result?;
    removed.map_err(BenchError::io(format!("removing {}", name())))?;
    Ok(summary)
}

/// Writes zeros over `bytes` of `file` and syncs them, so later syncs of
/// data written there carry no metadata.
fn prepare(file: &File, bytes: u64, stop: &CancellationToken) -> std::io::Result<()> {
    let zeros = vec![0u8; FILL];
    let mut at = 0;
    while at < bytes {
        if stop.is_cancelled() {
            return Ok(());
        }
        let n = (bytes - at).min(FILL as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    file.sync_all()
}

fn rounds(
    file: &File,
    rate: u64,
    size: u64,
    count: u64,
    stop: &CancellationToken,
    name: &dyn Fn() -> String,
) -> Result<LatencySummary, BenchError> {
    let payload = vec![0x5a_u8; (size * count.min(MOST_PER_WRITE)) as usize];
    let timetable = Timetable::starting_soon(rate);
    let mut latency = Latency::new();
    let mut next = 0;
    while next < count {
        if stop.is_cancelled() {
            return Err(BenchError::Stopped);
        }
        let end = timetable.due_by(Instant::now()).min(count);
        if end <= next {
            std::hint::spin_loop();
            continue;
        }
        let mut at = next;
        while at < end {
            let n = (end - at).min(MOST_PER_WRITE);
            file.write_all_at(&payload[..(n * size) as usize], at * size)
                .map_err(BenchError::io(format!("writing {}", name())))?;
            at += n;
        }
        file.sync_data()
            .map_err(BenchError::io(format!("fdatasync of {}", name())))?;
        let synced = Instant::now();
        for k in next..end {
            latency.record(synced.saturating_duration_since(timetable.due(k)));
        }
        next = end;
    }
    Ok(latency.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_written_synced_and_timed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        let s = probe(dir.path(), 2_000, 1024, Duration::from_millis(250), &stop).expect("probe");
        assert_eq!(s.samples, 500);
        assert!(s.p50 > 0.0 && s.p50 <= s.p99 && s.p99 <= s.max);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("read dir").count(),
            0,
            "the probe's file is removed"
        );
    }

    #[test]
    fn a_high_rate_gets_a_shorter_run_not_a_larger_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        // 1 MiB messages at 1000/s for 2 s would be 2 GiB.
        let s = probe(dir.path(), 1_000, 1 << 20, PROBE_TIME, &stop).expect("probe");
        assert_eq!(s.samples, MAX_BYTES / (1 << 20));
    }

    #[test]
    fn a_stopped_probe_ends_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        stop.cancel();
        let r = probe(dir.path(), 10_000, 1024, PROBE_TIME, &stop);
        assert!(matches!(r, Err(BenchError::Stopped)), "{r:?}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
    }
}
