//! Read-ahead for replays. A replay fetch that stops short of the log's end
//! starts reading the batch after it on the blocking pool, so the reader's
//! next fetch (which starts where this one stopped) finds those records read
//! and their CRCs checked: the broker reads batch N+1 while batch N is on
//! its way to the client and being decoded there, instead of after the
//! client asks. One request in flight still takes turns with the client,
//! but the read no longer does.
//!
//! A read-ahead is only used when it is still what a read would find
//! ([`Topic::read_within_ahead`]); deletions and consumption are applied
//! when it is used, not when it is read. A failed read-ahead is dropped and
//! the fetch reads again, so an error (a CRC mismatch) is reported by the
//! fetch that wants those records, as without read-ahead.

use super::core::INLINE_READ_RECORDS;
use super::topic::{DeliveryLimits, ReadAhead, Topic};
use crate::error::Result;
use crate::storage::{Offset, Records};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::task::JoinHandle;

/// Read-aheads kept per topic: one per reader replaying it at once, up to
/// this many; the oldest goes first.
const MAX_PENDING: usize = 16;

/// One topic's read-aheads under way or done, by where they start.
#[derive(Debug, Default)]
pub(super) struct ReadAheads {
    pending: Mutex<VecDeque<Pending>>,
}

#[derive(Debug)]
struct Pending {
    from: Offset,
    limits: DeliveryLimits,
    /// [`crate::storage::Log::generation`] when it started.
    generation: u64,
    read: JoinHandle<Result<ReadAhead>>,
}

impl ReadAheads {
    fn pending(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read-ahead from `from` whose limits cover `limits` (a subscription
    /// asks for as many messages as it has credit), taken out, once done;
    /// `None` when there is none or it failed.
    pub(super) async fn take(&self, from: Offset, limits: DeliveryLimits) -> Option<ReadAhead> {
        let read = {
            let mut pending = self.pending();
            let i = pending
                .iter()
                .position(|p| p.from == from && p.limits.covers(&limits))?;
            pending.remove(i)?.read
        };
        match read.await {
            Ok(Ok(ahead)) => Some(ahead),
            _ => None,
        }
    }

    /// After a read of `topic` that handed out `read` within `limits`:
    /// reads the next batch ahead when more records follow it than a read
    /// does in place ([`INLINE_READ_RECORDS`]: a read at the tail is a few
    /// records still in memory, and a reader there mostly waits for new
    /// messages, which a read-ahead cannot have).
    pub(super) fn follow(&self, topic: &Arc<Topic>, read: &Records, limits: DeliveryLimits) {
        let Some(next) = read.last_offset().map(Offset::next) else {
            return;
        };
        if topic.log().end().0.saturating_sub(next.0) <= INLINE_READ_RECORDS {
            return;
        }
        let generation = topic.log().generation();
        let t = Arc::clone(topic);
        let read = tokio::task::spawn_blocking(move || t.read_ahead(next, limits));
        let mut pending = self.pending();
        pending.retain(|p| p.from != next || p.limits != limits);
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
        }
        pending.push_back(Pending {
            from: next,
            limits,
            generation,
            read,
        });
    }

    /// Drops read-aheads from before segments were dropped or rewritten
    /// (`generation`, the log's now): they would not be used, and they hold
    /// views of the old segments' maps, which keep a dropped file's blocks
    /// on the disk.
    pub(super) fn drop_stale(&self, generation: u64) {
        self.pending().retain(|p| p.generation == generation);
    }
}

#[cfg(test)]
mod tests {
    use crate::broker::{DeliveryLimits, Topic, TopicConfig};
    use crate::storage::io::OsStorage;
    use crate::storage::{FsyncPolicy, NewMessage, Offset, Records, RecoveryMode};
    use std::sync::Arc;

    fn topic(dir: &std::path::Path, config: TopicConfig) -> Topic {
        Topic::open(
            Arc::new(OsStorage),
            dir,
            "t",
            config,
            RecoveryMode::default(),
        )
        .expect("open topic")
    }

    fn config() -> TopicConfig {
        let mut config = TopicConfig::default();
        config.log.fsync = FsyncPolicy::Never;
        config
    }

    fn produce(topic: &Topic, n: u64) {
        let start = topic.log().end().0;
        let batch: Vec<_> = (start..start + n)
            .map(|i| NewMessage::from_value(format!("message {i}")))
            .collect();
        topic.produce(&batch).expect("produce");
    }

    fn offsets(records: &Records) -> Vec<u64> {
        records.offsets().map(|o| o.0).collect()
    }

    const LIMITS: DeliveryLimits = DeliveryLimits {
        messages: 50,
        bytes: usize::MAX,
        message_bytes: usize::MAX,
    };

    #[test]
    fn a_current_read_ahead_hands_out_what_a_read_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path(), config());
        produce(&t, 300);
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        let used = t
            .read_within_ahead(Offset(100), LIMITS, ahead)
            .expect("still current")
            .expect("read");
        let fresh = t.read_within(Offset(100), LIMITS).expect("read");
        assert_eq!(offsets(&used), (100..150).collect::<Vec<_>>());
        assert_eq!(used.to_messages(), fresh.to_messages());
    }

    #[test]
    fn a_message_deleted_after_the_read_ahead_is_not_handed_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path(), config());
        produce(&t, 300);
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        t.delete(&[Offset(120), Offset(149)]).expect("delete");
        let used = t
            .read_within_ahead(Offset(100), LIMITS, ahead)
            .expect("still current")
            .expect("read");
        let expected: Vec<u64> = (100..150).filter(|o| ![120, 149].contains(o)).collect();
        assert_eq!(offsets(&used), expected);
    }

    #[test]
    fn a_read_ahead_of_other_offsets_or_limits_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path(), config());
        produce(&t, 300);
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        assert!(t.read_within_ahead(Offset(101), LIMITS, ahead).is_none());
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        let more = DeliveryLimits {
            messages: 60,
            ..LIMITS
        };
        assert!(t.read_within_ahead(Offset(100), more, ahead).is_none());
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        let other_bytes = DeliveryLimits {
            bytes: 4096,
            ..LIMITS
        };
        assert!(
            t.read_within_ahead(Offset(100), other_bytes, ahead)
                .is_none()
        );
    }

    #[test]
    fn a_read_ahead_of_more_messages_serves_a_read_of_fewer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path(), config());
        produce(&t, 300);
        let ahead = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        let fewer = DeliveryLimits {
            messages: 10,
            ..LIMITS
        };
        let used = t
            .read_within_ahead(Offset(100), fewer, ahead)
            .expect("covered")
            .expect("read");
        let fresh = t.read_within(Offset(100), fewer).expect("read");
        assert_eq!(offsets(&used), (100..110).collect::<Vec<_>>());
        assert_eq!(used.to_messages(), fresh.to_messages());
    }

    #[test]
    fn a_read_ahead_that_reached_the_end_is_not_used_once_the_log_grew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path(), config());
        produce(&t, 120);
        let short = t.read_ahead(Offset(100), LIMITS).expect("read ahead");
        let full = t.read_ahead(Offset(50), LIMITS).expect("read ahead");
        produce(&t, 100);
        assert!(
            t.read_within_ahead(Offset(100), LIMITS, short).is_none(),
            "20 records then, 50 now: a read now hands out 50"
        );
        let used = t
            .read_within_ahead(Offset(50), LIMITS, full)
            .expect("it filled its limit: still what a read finds")
            .expect("read");
        assert_eq!(offsets(&used), (50..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_read_ahead_of_records_compaction_removed_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config();
        config.log.segment_bytes = 4096;
        let t = topic(dir.path(), config);
        for _ in 0..10 {
            produce(&t, 30);
        }
        assert!(t.log().segments().len() > 3, "sealed segments to compact");
        let ahead = t.read_ahead(Offset(0), LIMITS).expect("read ahead");
        t.delete(&(0..40).map(Offset).collect::<Vec<_>>())
            .expect("delete");
        let generation = t.log().generation();
        t.compact(u64::MAX / 2, &mut |_| {}).expect("compact");
        assert_ne!(t.log().generation(), generation, "segments rewritten");
        assert!(t.read_within_ahead(Offset(0), LIMITS, ahead).is_none());
        let fresh = t.read_within(Offset(0), LIMITS).expect("read");
        assert_eq!(fresh.first_offset(), Some(Offset(40)));
    }

    #[test]
    fn a_read_ahead_of_segments_retention_dropped_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config();
        config.log.segment_bytes = 4096;
        config.log.retention_bytes = Some(8192);
        let t = topic(dir.path(), config);
        for _ in 0..10 {
            produce(&t, 30);
        }
        let ahead = t.read_ahead(Offset(0), LIMITS).expect("read ahead");
        let dropped = t
            .enforce_retention(crate::storage::log::now_ms())
            .expect("retention");
        assert!(!dropped.is_empty(), "retention dropped segments");
        assert!(t.read_within_ahead(Offset(0), LIMITS, ahead).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_that_stops_short_reads_the_next_batch_ahead_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Arc::new(topic(dir.path(), config()));
        produce(&t, 300);
        let aheads = super::ReadAheads::default();
        let first = t.read_within(Offset(0), LIMITS).expect("read");
        aheads.follow(&t, &first, LIMITS);
        let ahead = aheads.take(Offset(50), LIMITS).await.expect("read ahead");
        let used = t
            .read_within_ahead(Offset(50), LIMITS, ahead)
            .expect("current")
            .expect("read");
        assert_eq!(offsets(&used), (50..100).collect::<Vec<_>>());
        assert!(
            aheads.take(Offset(50), LIMITS).await.is_none(),
            "taken once"
        );

        // Near the end: nothing to gain, no read-ahead.
        let tail = t.read_within(Offset(240), LIMITS).expect("read");
        aheads.follow(&t, &tail, LIMITS);
        assert!(aheads.take(Offset(290), LIMITS).await.is_none());

        // Stale ones go when segments change under them.
        aheads.follow(&t, &used, LIMITS);
        aheads.drop_stale(t.log().generation() + 1);
        assert!(aheads.take(Offset(100), LIMITS).await.is_none());
    }
}
