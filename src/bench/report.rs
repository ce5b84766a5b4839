//! The report of one run. Its JSON field names are stable for scripts;
//! [`STABLE_FIELDS`] lists the ones promised, and a test checks a real run
//! prints every one of them.

use super::disk::DiskBaseline;
use super::histogram::LatencySummary;
use super::{MB, Outcome, Params};
use serde::{Deserialize, Serialize};

/// Dotted paths of the JSON report that scripts may rely on.
pub const STABLE_FIELDS: &[&str] = &[
    "workload",
    "throughput.msgs_per_s",
    "throughput.mb_per_s",
    "throughput.messages",
    "throughput.bytes",
    "throughput.seconds",
    "latency_ms.p50",
    "latency_ms.p90",
    "latency_ms.p99",
    "latency_ms.p999",
    "latency_ms.max",
    "latency_ms.samples",
    "latency_ms.measures",
    "send_lag_ms.p99",
    "disk_baseline.mb_per_s",
    "disk_baseline.nosync_mb_per_s",
    "disk_baseline.fdatasync_1k_ms.p50",
    "disk_baseline.fdatasync_1k_ms.p99",
    "ratio_to_disk",
    "params.workload",
    "params.producers",
    "params.consumers",
    "params.size",
    "params.batch",
    "params.fsync",
    "params.transport",
    "machine.cores",
    "machine.memory_bytes",
    "version",
];

/// One run's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `produce`, `consume`, `e2e` or `disk`.
    pub workload: String,
    /// Messages and payload (value) bytes per second over the measured phase.
    pub throughput: Throughput,
    /// Latency percentiles, and what was measured.
    pub latency_ms: LatencyReport,
    /// Open loop: how late sends left against their due time (the bench's
    /// own pacing; it is already inside `latency_ms`). Empty in a closed loop.
    pub send_lag_ms: LatencySummary,
    /// The disk of the data directory, measured in the same run.
    pub disk_baseline: DiskBaseline,
    /// e2e in an open loop: the same messages at the same rate through
    /// loopback TCP and a task that only forwards them, from due time to
    /// arrival (see [`crate::bench::relay`]): the floor without a broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_floor_ms: Option<LatencySummary>,
    /// e2e in an open loop under `fsync=always`: the same messages on the
    /// same timetable appended by one thread in group-commit rounds (write +
    /// fdatasync), from due time to the end of their round's sync (see
    /// [`crate::bench::commit_floor`]): the disk part's floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_floor_ms: Option<LatencySummary>,
    /// `throughput.mb_per_s / disk_baseline.mb_per_s`.
    pub ratio_to_disk: f64,
    /// The exact parameters.
    pub params: Params,
    /// Where it ran.
    pub machine: Machine,
    /// spool's version.
    pub version: String,
}

/// Throughput of the measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Messages per second.
    pub msgs_per_s: f64,
    /// Payload megabytes (10^6 bytes of values) per second.
    pub mb_per_s: f64,
    /// Messages counted.
    pub messages: u64,
    /// Payload bytes counted.
    pub bytes: u64,
    /// Length of the measured phase.
    pub seconds: f64,
}

/// Latency percentiles with what they measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// The percentiles.
    #[serde(flatten)]
    pub summary: LatencySummary,
    /// From what to what each sample runs.
    pub measures: String,
}

/// The machine a run was made on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// `MemTotal` of `/proc/meminfo`, in bytes (`null` where unreadable).
    pub memory_bytes: Option<u64>,
    /// `model name` of `/proc/cpuinfo`.
    pub cpu: Option<String>,
    /// 1-minute load average when the run ended (`/proc/loadavg`): well above
    /// what the bench itself explains means something else shared the machine.
    pub load_1m: Option<f64>,
}

impl Machine {
    /// This machine.
    pub fn detect() -> Machine {
        let read = |p| std::fs::read_to_string(p).ok();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_bytes: read("/proc/meminfo").and_then(|t| mem_total(&t)),
            cpu: read("/proc/cpuinfo").and_then(|t| cpu_model(&t)),
            load_1m: read("/proc/loadavg")
                .and_then(|t| t.split_whitespace().next().and_then(|w| w.parse().ok())),
        }
    }
}

/// `MemTotal:  24601324 kB` → bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

impl Report {
    pub(super) fn new(params: &Params, outcome: Outcome, disk_baseline: DiskBaseline) -> Report {
        let seconds = outcome.elapsed.as_secs_f64().max(1e-9);
        let mb_per_s = outcome.bytes as f64 / MB / seconds;
        Report {
            workload: params.workload.to_string(),
            throughput: Throughput {
                msgs_per_s: outcome.messages as f64 / seconds,
                mb_per_s,
                messages: outcome.messages,
                bytes: outcome.bytes,
                seconds,
            },
            latency_ms: LatencyReport {
                summary: outcome.latency.summary(),
                measures: outcome.measures.to_owned(),
            },
            send_lag_ms: outcome.send_lag.summary(),
            ratio_to_disk: if disk_baseline.mb_per_s > 0.0 {
                mb_per_s / disk_baseline.mb_per_s
            } else {
                0.0
            },
            disk_baseline,
            relay_floor_ms: None,
            commit_floor_ms: None,
            params: params.clone(),
            machine: Machine::detect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// The report as one JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report has only plain fields")
    }
}

/// The value at a dotted path of a JSON document (`"latency_ms.p99"`).
pub fn lookup<'a>(json: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(json, |v, key| v.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Workload;
    use crate::bench::histogram::Latency;
    use std::time::Duration;

    fn sample() -> Report {
        let mut latency = Latency::new();
        latency.record_n(Duration::from_millis(2), 99);
        latency.record(Duration::from_millis(40));
        let outcome = Outcome {
            messages: 2_000,
            bytes: 2_000_000,
            elapsed: Duration::from_millis(500),
            latency,
            measures: "test",
            send_lag: Latency::new(),
        };
        let disk = DiskBaseline {
            mb_per_s: 8.0,
            nosync_mb_per_s: 100.0,
            bytes: 1 << 20,
            sync_every_bytes: 1 << 20,
            fdatasync_1k_ms: LatencySummary::default(),
            dir: "/tmp/x".into(),
        };
        Report::new(&Params::new(Workload::Produce), outcome, disk)
    }

    #[test]
    fn every_stable_field_is_in_the_json() {
        let json: serde_json::Value =
            serde_json::from_str(&sample().to_json()).expect("the report is JSON");
        for field in STABLE_FIELDS {
            assert!(lookup(&json, field).is_some(), "{field} missing in {json}");
        }
        assert_eq!(lookup(&json, "params.fsync"), Some(&"always".into()));
        assert_eq!(lookup(&json, "workload"), Some(&"produce".into()));
    }

    #[test]
    fn rates_and_the_ratio_follow_from_the_counts() {
        let r = sample();
        assert_eq!(r.throughput.msgs_per_s, 4_000.0);
        assert_eq!(r.throughput.mb_per_s, 4.0);
        assert_eq!(r.ratio_to_disk, 0.5);
        assert_eq!(r.latency_ms.summary.samples, 100);
        assert!((r.latency_ms.summary.p50 - 2.0).abs() < 0.01);
        assert!((r.latency_ms.summary.max - 40.0).abs() < 0.05);
        assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn the_report_reads_back_from_its_json() {
        let r = sample();
        let back: Report = serde_json::from_str(&r.to_json()).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn meminfo_and_cpuinfo_parse() {
        let meminfo = "MemFree:   100 kB\nMemTotal:       24601324 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_601_324 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: x kB\n"), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("Some CPU @ 2.0GHz"));
        assert!(Machine::detect().cores >= 1);
    }
}
