//! Which messages each send carries and when it is due. With a target rate
//! the schedule is fixed before the run (open loop): a send that goes out
//! late still counts its latency from when it was *due*, so a stalled broker
//! cannot hide its stall by slowing the producer down (coordinated omission).

use std::time::{Duration, Instant};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// One produce request of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    /// Index of its first message in the whole run (all producers).
    pub first: u64,
    /// Messages in it.
    pub len: u64,
    /// When it is due, from the start of the run; `None` in a closed loop
    /// (no rate: it goes out as soon as the producer may send).
    pub due: Option<Duration>,
}

/// The sends of every producer of one run.
///
/// Global send `g` carries messages `g·batch ..` and belongs to producer
/// `g mod producers`, so producers interleave evenly in time and together
/// cover every message exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    producers: u64,
    batch: u64,
    total: Option<u64>,
    duration: Option<Duration>,
    rate: Option<u64>,
}

impl Schedule {
    /// `total` messages (or, without it, sends until `duration`), `batch`
    /// per send, spread over `producers`; `rate` in messages per second for
    /// all producers together (open loop), or `None` (closed loop).
    pub fn new(
        producers: u64,
        batch: u64,
        total: Option<u64>,
        duration: Option<Duration>,
        rate: Option<u64>,
    ) -> Schedule {
        Schedule {
            producers: producers.max(1),
            batch: batch.max(1),
            total,
            duration,
            rate: rate.filter(|r| *r > 0),
        }
    }

    /// Whether sends follow a fixed timetable.
    pub fn is_open_loop(&self) -> bool {
        self.rate.is_some()
    }

    /// How long the run lasts when it is bounded by time.
    pub fn duration(&self) -> Option<Duration> {
        self.duration
    }

    /// Messages of the whole run, when bounded by count.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The `k`-th send of `producer`, or `None` once that producer is done
    /// (all messages handed out, or, in an open loop, due after the duration;
    /// a closed loop checks the clock against [`Schedule::duration`] itself).
    pub fn send(&self, producer: u64, k: u64) -> Option<Send> {
        let g = k.checked_mul(self.producers)?.checked_add(producer)?;
        let first = g.checked_mul(self.batch)?;
        let len = match self.total {
            Some(total) if first >= total => return None,
            Some(total) => self.batch.min(total - first),
            None => self.batch,
        };
        let due = self.rate.map(|rate| {
            let ns = u128::from(first) * NANOS_PER_SEC / u128::from(rate);
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        });
        if let (Some(due), Some(limit)) = (due, self.duration)
            && due >= limit
        {
            return None;
        }
        Some(Send { first, len, due })
    }
}

/// How far ahead of now an open loop's timetable starts, so its pacing
/// threads are up before the first message is due.
pub const LEAD: Duration = Duration::from_millis(20);

/// When each message of an open loop at `rate` messages per second is due:
/// message `k` at `origin + k / rate`, each computed from the origin so the
/// timetable does not drift.
#[derive(Debug, Clone, Copy)]
pub struct Timetable {
    origin: Instant,
    rate: u64,
}

impl Timetable {
    /// A timetable starting [`LEAD`] from now.
    pub fn starting_soon(rate: u64) -> Timetable {
        Timetable {
            origin: Instant::now() + LEAD,
            rate: rate.max(1),
        }
    }

    /// When message `k` is due.
    pub fn due(&self, k: u64) -> Instant {
        let ns = u128::from(k) * NANOS_PER_SEC / u128::from(self.rate);
        self.origin + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// How many messages are due by `at` (none before the origin).
    pub fn due_by(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.origin) {
            None => 0,
            Some(since) => {
                let n = since.as_nanos() * u128::from(self.rate) / NANOS_PER_SEC + 1;
                u64::try_from(n).unwrap_or(u64::MAX)
            }
        }
    }
}

/// Makes the calling OS thread's sleeps end when they are due: Linux lets
/// a normal thread's timers fire up to 50 µs late (its timer slack) to
/// batch wake-ups, which would add that much to every open-loop latency
/// before the message even leaves the bench. Pacing threads call this
/// first; without it (an error is ignored) sleeps are merely less exact.
pub fn exact_sleeps() {
    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
}

/// How long before a deadline [`sleep_until`] stops sleeping and spins.
///
/// Even with exact sleeps a thread's sleep on a virtual machine ends tens
/// of microseconds late (0.028–0.031 ms at the median and 0.045 at p90
/// on the 2-core VM of docs/performance.md), and every open-loop latency,
/// counted from the due time, would carry that. Spinning the last 40 µs
/// sends at the due time (send lag p50 0.001 ms) for about a tenth of a
/// core at 10 000 sends a second there (up to 0.4 of a core where sleeps
/// end on time; a whole core when sends are due less than 40 µs apart).
pub const SPIN_BEFORE: Duration = Duration::from_micros(40);

/// Sleeps the calling OS thread until [`SPIN_BEFORE`] ahead of `deadline`,
/// then spins until it. A thread sleep wakes within tens of microseconds,
/// where tokio's timer rounds up to whole milliseconds, which would itself
/// add up to 1 ms to every open-loop latency.
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if let Some(sleep) = deadline
        .checked_duration_since(now)
        .and_then(|left| left.checked_sub(SPIN_BEFORE))
    {
        std::thread::sleep(sleep);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_sends(s: &Schedule, producers: u64) -> Vec<(u64, Send)> {
        let mut out = Vec::new();
        for p in 0..producers {
            let mut k = 0;
            while let Some(send) = s.send(p, k) {
                out.push((p, send));
                k += 1;
            }
        }
        out
    }

    #[test]
    fn producers_cover_every_message_exactly_once() {
        for (producers, batch, total) in [(1, 1, 10), (4, 1000, 10_500), (3, 7, 100), (5, 10, 3)] {
            let s = Schedule::new(producers, batch, Some(total), None, None);
            let mut sends = all_sends(&s, producers);
            sends.sort_by_key(|(_, send)| send.first);
            let mut next = 0;
            for (_, send) in &sends {
                assert_eq!(send.first, next);
                assert!(send.len >= 1 && send.len <= batch);
                assert_eq!(send.due, None, "no rate: closed loop");
                next += send.len;
            }
            assert_eq!(next, total, "{producers} producers, batch {batch}");
        }
    }

    #[test]
    fn open_loop_sends_are_due_at_the_rate() {
        // 10 000 msg/s, one message per send: one every 100 µs.
        let s = Schedule::new(1, 1, Some(5), None, Some(10_000));
        let dues: Vec<_> = (0..5).map(|k| s.send(0, k).and_then(|x| x.due)).collect();
        let want: Vec<_> = (0..5)
            .map(|k| Some(Duration::from_micros(100 * k)))
            .collect();
        assert_eq!(dues, want);
        assert!(s.is_open_loop());
    }

    #[test]
    fn producers_interleave_and_share_the_rate() {
        // 4 producers, batches of 10, 1000 msg/s together: a send every 10 ms
        // overall, each producer every 40 ms, producer p offset by p·10 ms.
        let s = Schedule::new(4, 10, None, Some(Duration::from_secs(1)), Some(1000));
        for p in 0..4 {
            let a = s.send(p, 0).and_then(|x| x.due).expect("due");
            let b = s.send(p, 1).and_then(|x| x.due).expect("due");
            assert_eq!(a, Duration::from_millis(10 * p));
            assert_eq!(b - a, Duration::from_millis(40));
        }
        // One second at 1000 msg/s is 1000 messages, then the schedule ends.
        let sends = all_sends(&s, 4);
        assert_eq!(sends.iter().map(|(_, x)| x.len).sum::<u64>(), 1000);
        assert!(
            sends
                .iter()
                .all(|(_, x)| x.due < Some(Duration::from_secs(1)))
        );
    }

    #[test]
    fn the_rate_holds_over_a_long_run_without_drift() {
        // 3 msg/s does not divide a second: the 3000th message is still due
        // at exactly 1000 s, not off by accumulated rounding.
        let s = Schedule::new(1, 1, None, None, Some(3));
        assert_eq!(
            s.send(0, 3000).and_then(|x| x.due),
            Some(Duration::from_secs(1000))
        );
    }

    #[test]
    fn a_timetable_counts_what_is_due_without_drift() {
        // 3 per second does not divide a second: message 3000 is still due
        // at exactly 1000 s, and each message counts as due from its time on.
        let t = Timetable::starting_soon(3);
        assert_eq!(t.due(3000) - t.due(0), Duration::from_secs(1000));
        assert_eq!(t.due_by(t.due(0) - Duration::from_nanos(1)), 0);
        assert_eq!(t.due_by(t.due(0)), 1);
        assert_eq!(t.due_by(t.due(3000) - Duration::from_nanos(1)), 3000);
        assert_eq!(t.due_by(t.due(3000)), 3001);
    }

    #[test]
    fn sleep_until_waits_at_least_until_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(3);
        sleep_until(deadline);
        assert!(Instant::now() >= deadline);
        // Closer than the spin margin: spins, and still not early.
        let near = Instant::now() + SPIN_BEFORE / 2;
        sleep_until(near);
        assert!(Instant::now() >= near);
        sleep_until(start); // in the past: returns at once
    }
}
