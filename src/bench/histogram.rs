//! Latency recording: one HdrHistogram per task (no sharing on the hot path),
//! merged into one when the run ends. Every histogram has the same bounds, so
//! merging never loses a sample.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Smallest latency told apart: 1 µs (the unit of the histogram).
const LOWEST_US: u64 = 1;
/// Largest latency kept as is: one hour; longer ones count as one hour.
const HIGHEST_US: u64 = 3_600_000_000;
/// Significant decimal digits kept for every value (0.1% error at most).
const SIGNIFICANT_DIGITS: u8 = 3;

/// Latencies of one task, in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

impl Latency {
    /// An empty recorder.
    pub fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
                .expect("the bounds are constants that hdrhistogram accepts"),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Records `count` messages that shared one latency (a batch acked at once).
    pub fn record_n(&mut self, latency: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record_n(us.max(LOWEST_US), count);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        self.hist
            .add(&other.hist)
            .expect("every Latency has the same bounds, so adding cannot overflow them");
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The percentiles of the report (zero when nothing was recorded).
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |quantile: f64| {
            if self.hist.is_empty() {
                0.0
            } else {
                ms(self.hist.value_at_quantile(quantile))
            }
        };
        LatencySummary {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: if self.hist.is_empty() {
                0.0
            } else {
                ms(self.hist.max())
            },
            samples: self.count(),
        }
    }
}

/// Percentiles in milliseconds, as the JSON report names them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Samples behind the percentiles (messages, or calls where a call is the unit).
    pub samples: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut parts = [Latency::new(), Latency::new(), Latency::new()];
        let mut whole = Latency::new();
        for v in 1..=3000u64 {
            let d = Duration::from_micros(v * 37 % 20_011 + 1);
            parts[(v % 3) as usize].record(d);
            whole.record(d);
        }
        let mut merged = Latency::new();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged.count(), 3000);
        assert_eq!(merged.summary(), whole.summary());
    }

    #[test]
    fn a_slow_task_shows_in_the_merged_tail() {
        // 999 fast samples in one task, 1 slow in another: the max and the
        // p99.9 of the merge must see it, not average it away.
        let mut fast = Latency::new();
        fast.record_n(ms(1), 999);
        let mut slow = Latency::new();
        slow.record(ms(500));
        fast.merge(&slow);
        let s = fast.summary();
        assert_eq!(s.samples, 1000);
        assert!((s.p50 - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.p999 - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.max - 500.0).abs() < 0.5, "{s:?}");
        let mut two = Latency::new();
        two.record_n(ms(1), 998);
        two.record_n(ms(500), 2);
        assert!((two.summary().p999 - 500.0).abs() < 0.5);
    }

    #[test]
    fn batches_weigh_by_their_messages() {
        let mut l = Latency::new();
        l.record_n(ms(2), 900);
        l.record_n(ms(10), 100);
        l.record_n(ms(50), 0);
        let s = l.summary();
        assert_eq!(s.samples, 1000);
        assert!((s.p50 - 2.0).abs() < 0.01);
        assert!((s.p99 - 10.0).abs() < 0.02);
        assert!((s.max - 10.0).abs() < 0.02);
    }

    #[test]
    fn empty_and_extreme_values_do_not_panic() {
        assert_eq!(Latency::new().summary(), LatencySummary::default());
        let mut l = Latency::new();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(100_000));
        let s = l.summary();
        assert_eq!(s.samples, 2);
        assert!(s.p50 >= 0.001);
        assert!(s.max >= 3_600_000.0 * 0.999);
    }
}
