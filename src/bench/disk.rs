//! The raw baseline of a directory's disk, measured with plain file calls so
//! every report carries its own physical reference: sequential 1 MiB writes
//! with an `fdatasync` after each (the durable bandwidth spool's
//! `fsync=always` is judged against), the same without any sync (the page
//! cache), and the latency of one 1 KiB write + `fdatasync` (the floor of a
//! durable ack).

use super::histogram::{Latency, LatencySummary};
use super::{BenchError, MB, Progress};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Bytes between two syncs of the synced run.
pub const SYNC_EVERY: usize = 1024 * 1024;
/// Bytes of each write of the latency probe.
pub const PROBE_BYTES: usize = 1024;
/// Most writes of the latency probe: enough for a p99.9 on a fast disk.
pub const PROBE_WRITES: usize = 2000;
/// Longest the latency probe runs (a slow disk gets fewer writes).
pub const PROBE_TIME: Duration = Duration::from_secs(1);

/// The disk's figures, as the report names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskBaseline {
    /// Sequential writes with an fdatasync every [`SYNC_EVERY`] bytes, MB/s.
    pub mb_per_s: f64,
    /// The same writes without any sync (page cache), MB/s.
    pub nosync_mb_per_s: f64,
    /// Bytes written by each of the two runs.
    pub bytes: u64,
    /// Bytes between two fdatasyncs of the synced run.
    pub sync_every_bytes: u64,
    /// One write of [`PROBE_BYTES`] + fdatasync, repeated [`PROBE_WRITES`]
    /// times or for [`PROBE_TIME`], whichever ends first.
    pub fdatasync_1k_ms: LatencySummary,
    /// Where it was measured.
    pub dir: String,
}

/// The synced run in detail (the `disk` workload reports it as its own).
#[derive(Debug)]
pub struct SyncedRun {
    /// 1 MiB writes made.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Time of the whole run.
    pub elapsed: Duration,
    /// Each write + fdatasync.
    pub latency: Latency,
}

/// Measures the disk under `dir` (created if missing) with `mib` MiB per run;
/// the files are removed afterwards. Blocking; ends with
/// [`BenchError::Stopped`] within a write once `stop` is cancelled (the
/// file under way is then left to the caller's scratch directory).
pub fn measure(
    dir: &Path,
    mib: u64,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<(DiskBaseline, SyncedRun), BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let chunk = vec![0x5a_u8; SYNC_EVERY];
    let bytes = mib * SYNC_EVERY as u64;
    // Unsynced first: its dirty pages are dropped with the file before the
    // synced run starts, so write-back does not spill into the figures.
    let nosync = write_run(&dir.join("nosync"), &chunk, mib, false, progress, stop)?;
    let synced = write_run(&dir.join("synced"), &chunk, mib, true, progress, stop)?;
    let probe = probe(&dir.join("probe"), stop)?;
    let rate = |d: Duration| bytes as f64 / MB / d.as_secs_f64().max(1e-9);
    Ok((
        DiskBaseline {
            mb_per_s: rate(synced.elapsed),
            nosync_mb_per_s: rate(nosync.elapsed),
            bytes,
            sync_every_bytes: SYNC_EVERY as u64,
            fdatasync_1k_ms: probe.summary(),
            dir: dir.display().to_string(),
        },
        synced,
    ))
}

fn write_run(
    path: &Path,
    chunk: &[u8],
    writes: u64,
    sync: bool,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<SyncedRun, BenchError> {
    let name = || path.display().to_string();
    let mut file = File::create(path).map_err(BenchError::io(format!("creating {}", name())))?;
    let mut latency = Latency::new();
    let start = Instant::now();
    for _ in 0..writes {
        if stop.is_cancelled() {
            return Err(BenchError::Stopped);
        }
        let t = Instant::now();
        file.write_all(chunk)
            .map_err(BenchError::io(format!("writing {}", name())))?;
        if sync {
            file.sync_data()
                .map_err(BenchError::io(format!("fdatasync of {}", name())))?;
        }
        latency.record(t.elapsed());
        progress.add(1);
    }
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(path).map_err(BenchError::io(format!("removing {}", name())))?;
    Ok(SyncedRun {
        writes,
        bytes: writes * chunk.len() as u64,
        elapsed,
        latency,
    })
}

fn probe(path: &Path, stop: &CancellationToken) -> Result<Latency, BenchError> {
    let name = || path.display().to_string();
    let mut file = File::create(path).map_err(BenchError::io(format!("creating {}", name())))?;
    let buf = [0x5a_u8; PROBE_BYTES];
    let mut latency = Latency::new();
    let start = Instant::now();
    for _ in 0..PROBE_WRITES {
        if start.elapsed() >= PROBE_TIME {
            break;
        }
        if stop.is_cancelled() {
            return Err(BenchError::Stopped);
        }
        let t = Instant::now();
        file.write_all(&buf)
            .map_err(BenchError::io(format!("writing {}", name())))?;
        file.sync_data()
            .map_err(BenchError::io(format!("fdatasync of {}", name())))?;
        latency.record(t.elapsed());
    }
    drop(file);
    std::fs::remove_file(path).map_err(BenchError::io(format!("removing {}", name())))?;
    Ok(latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_probe_ends_before_its_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        stop.cancel();
        let result = measure(dir.path(), 1024, &Progress::default(), &stop);
        assert!(matches!(result, Err(BenchError::Stopped)), "{result:?}");
        let written: u64 = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").metadata().expect("metadata").len())
            .sum();
        assert_eq!(written, 0);
    }
}
