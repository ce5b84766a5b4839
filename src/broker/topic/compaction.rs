//! Compaction of a topic: the cleaner's decisions on a snapshot of the
//! topic's state, the pass over the log, and pruning the deletions it made
//! unnecessary.

use super::*;
use std::cell::Cell;

/// What background compaction knows of a topic: what it last measured, and
/// when it is due to measure again. The registry keeps it while the topic
/// is closed ([`Topic::compaction_watch`]) and gives it back at the next
/// open ([`Topic::resume_compaction_watch`]), so closing a topic never puts
/// its next measure off.
#[derive(Debug, Clone)]
pub struct CompactionWatch {
    measured: Option<Measured>,
    /// When the next measure is due (milliseconds since the epoch): the
    /// schedule of the open topic, `compact_check_ms` after the last one.
    due_ms: u64,
    /// While the topic is closed: when it is worth opening it for that
    /// measure (0: never, as nothing the measure depends on changed).
    closed_due_ms: u64,
}

impl CompactionWatch {
    /// Nothing measured yet; the first measure is due at `due_ms`.
    pub fn due_at(due_ms: u64) -> CompactionWatch {
        CompactionWatch {
            measured: None,
            due_ms,
            closed_due_ms: due_ms,
        }
    }

    /// While the topic is closed: when it is worth opening it to measure
    /// it (milliseconds since the epoch; 0: never).
    pub fn closed_due_ms(&self) -> u64 {
        self.closed_due_ms
    }
}

/// What background compaction last measured of a topic, and on what.
#[derive(Debug, Clone)]
struct Measured {
    on: CleanerInputs,
    /// When the oldest tombstone compaction kept ages out, if it kept one.
    tombstone_ages_out_ms: Option<u64>,
}

/// What the cleaner's decisions depend on: the log's extent and sealed
/// part, the deletions and what the groups completed (on
/// `delete_when_consumed` topics), and the settings the topic opened with
/// (its `topic.toml` is read again at every open).
#[derive(Debug, Clone, PartialEq)]
struct CleanerInputs {
    settings: (Cleanup, u64, bool, Option<u64>),
    start: u64,
    end: u64,
    durable_end: u64,
    active_base: Option<u64>,
    deleted: RangeSet,
    completed: Vec<RangeSet>,
}

impl Topic {
    /// Compacts the topic's sealed segments: removes explicitly deleted
    /// records, on `delete_when_consumed` topics records every group has
    /// completed, and on `cleanup=compact` topics records superseded by a later
    /// record with the same key and tombstones older than
    /// `delete_retention_ms`. Offsets never change. Afterwards the deletion
    /// journal forgets what no segment holds any more.
    pub fn compact(&self, now_ms: u64, progress: &mut dyn FnMut(u64)) -> Result<CompactStats> {
        let _pass = self.enter()?;
        // What compaction decides on (deletions, acks) is durable before any
        // record goes because of it, whatever the fsync policy; a key's
        // latest record counts only once it is durable too.
        self.sync_state()?;
        let cleaner = self.cleaner(now_ms)?;
        self.compact_with(&cleaner, progress)
    }

    /// Background compaction: measures what [`Topic::compact`] would remove
    /// and compacts, on the same decisions, only once the removable share of
    /// the sealed bytes reaches `ratio`. `None` when it did not. A topic on
    /// which nothing the measure depends on changed since the last one (and
    /// no kept tombstone aged out) is not measured again. The next measure
    /// is due `compact_check_ms` from now; after a failure nothing counts as
    /// measured, so the next one measures afresh.
    pub fn compact_if_dirty(
        &self,
        now_ms: u64,
        ratio: f64,
    ) -> Result<Option<(Dirt, CompactStats)>> {
        let _pass = self.enter()?;
        let next = now_ms.saturating_add(self.config.compact_check_ms);
        let last = self.watch().measured.clone();
        if let Some(last) = last {
            let aged = last.tombstone_ages_out_ms.is_some_and(|t| t <= now_ms);
            if !aged && self.unchanged_since(&last) {
                self.watch().due_ms = next;
                return Ok(None);
            }
        }
        let done = self.measure_and_compact(now_ms, ratio);
        let mut watch = self.watch();
        watch.due_ms = next;
        match done {
            Ok((measured, done)) => {
                watch.measured = Some(measured);
                Ok(done)
            }
            Err(e) => {
                watch.measured = None;
                Err(e)
            }
        }
    }

    fn measure_and_compact(
        &self,
        now_ms: u64,
        ratio: f64,
    ) -> Result<(Measured, Option<(Dirt, CompactStats)>)> {
        self.log.check_compaction_goes_on()?;
        self.sync_state()?;
        // Taken before the cleaner's snapshot: whatever comes after it
        // makes the measure out of date.
        let on = self.cleaner_inputs()?;
        let cleaner = self.cleaner(now_ms)?;
        // The oldest tombstone compaction keeps (it is the latest record of
        // its key and younger than delete_retention_ms) is the next one that
        // ages out.
        let oldest_tombstone = Cell::new(None::<u64>);
        let dirt = self.log.dirt(&|r| {
            let keep = cleaner.keep(r);
            if keep && cleaner.latest.is_some() && r.key.is_some() && r.value_len == 0 {
                let oldest = oldest_tombstone
                    .get()
                    .map_or(r.timestamp_ms, |t| t.min(r.timestamp_ms));
                oldest_tombstone.set(Some(oldest));
            }
            keep
        })?;
        let measured = Measured {
            on,
            tombstone_ages_out_ms: oldest_tombstone.get().map(|t| {
                t.saturating_add(self.config.delete_retention_ms)
                    .saturating_add(1)
            }),
        };
        if dirt.removable_bytes == 0 || dirt.ratio() < ratio {
            return Ok((measured, None));
        }
        let stats = self.compact_with(&cleaner, &mut |_| {})?;
        Ok((measured, Some((dirt, stats))))
    }

    fn watch(&self) -> MutexGuard<'_, CompactionWatch> {
        self.compaction.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When background compaction is next due to measure this topic
    /// (milliseconds since the epoch).
    pub fn compaction_due_ms(&self) -> u64 {
        self.watch().due_ms
    }

    /// Takes up what background compaction knew of this topic when it was
    /// last closed ([`Topic::compaction_watch`]).
    pub fn resume_compaction_watch(&self, watch: CompactionWatch) {
        *self.watch() = watch;
    }

    /// What background compaction knows of this topic as it closes, for
    /// its next open, with when it should open the topic to measure it
    /// meanwhile ([`CompactionWatch::closed_due_ms`]): when its oldest
    /// kept tombstone ages out, and, if anything changed since the last
    /// measure (a produce, a delete, an ack, a seal, retention, a
    /// compaction pass of its own), when the measure is due anyway
    /// (`compact_check_ms` after the last one). Nothing changing while the
    /// topic is closed, an unchanged topic is due only when a tombstone
    /// ages out (0: never). `None` for topics without
    /// `compact_min_dirty_ratio`.
    pub fn compaction_watch(&self) -> Option<CompactionWatch> {
        self.config.compact_min_dirty_ratio?;
        let mut watch = self.watch().clone();
        watch.closed_due_ms = match &watch.measured {
            None => watch.due_ms,
            Some(measured) => {
                let aged = measured.tombstone_ages_out_ms;
                if self.unchanged_since(measured) {
                    aged.unwrap_or(0)
                } else {
                    aged.map_or(watch.due_ms, |t| t.min(watch.due_ms))
                }
            }
        };
        Some(watch)
    }

    /// Whether nothing the cleaner decides on changed since `measured`.
    fn unchanged_since(&self, measured: &Measured) -> bool {
        self.cleaner_inputs().is_ok_and(|now| now == measured.on)
    }

    /// What the cleaner decides on, as it is now.
    fn cleaner_inputs(&self) -> Result<CleanerInputs> {
        let log = self.log.stats();
        let active_base = self.log.segments().last().map(|s| s.base());
        let mut completed = Vec::new();
        if self.config.delete_when_consumed {
            for g in self.groups().values() {
                completed.push(self.lock(g)?.completed());
            }
        }
        let config = &self.config;
        Ok(CleanerInputs {
            settings: (
                config.cleanup,
                config.delete_retention_ms,
                config.delete_when_consumed,
                config.compact_min_dirty_ratio.map(f64::to_bits),
            ),
            start: log.start.0,
            end: log.end.0,
            durable_end: log.durable_end.0,
            active_base,
            deleted: self.deletions().set().clone(),
            completed,
        })
    }

    fn compact_with(
        &self,
        cleaner: &Cleaner,
        progress: &mut dyn FnMut(u64),
    ) -> Result<CompactStats> {
        // Compaction covers at most the segments sealed now; one a producer
        // seals meanwhile keeps its records, so its deletions must stay.
        let compacted_below = self.log.segments().last().map(|s| s.base());
        let keep = |r: &crate::storage::compact::RecordInfo<'_>| cleaner.keep(r);
        let stats = if cleaner.latest.is_some() {
            self.log.compact(&keep, progress)?
        } else {
            self.log.compact_independent(&keep, progress)?
        };
        if let Some(below) = compacted_below {
            // Groups count what they have left by offsets less deletions
            // (lag, a queue group's low watermark, what retention takes from
            // them), and a group may start anywhere from the log's start (a
            // new one at earliest, a commit or seek back): deletions a group
            // has not passed, or that lie past the log's start, stay,
            // though their records are gone.
            let start = self.log.stats().start.0.min(below);
            let floor = self.lowest_committed()?.map_or(start, |c| c.min(start));
            self.prune_deletions(&cleaner.deleted, floor)?;
        }
        Ok(stats)
    }

    /// The lowest committed offset (a queue group's low watermark) of the
    /// topic's groups; `None` without groups.
    fn lowest_committed(&self) -> Result<Option<u64>> {
        let groups = self.groups();
        let mut low: Option<u64> = None;
        for group in groups.values() {
            let committed = self.lock(group)?.committed();
            low = Some(low.map_or(committed, |l| l.min(committed)));
        }
        Ok(low)
    }

    /// The keep-or-drop rules of compaction, on a snapshot of the topic's
    /// state (so compaction never holds the topic while it copies).
    fn cleaner(&self, now_ms: u64) -> Result<Cleaner> {
        let (deleted, completed, durable, groups_durable) = {
            let groups = self.groups();
            let mut completed = Vec::new();
            let mut groups_durable = Vec::new();
            if self.config.delete_when_consumed {
                for g in groups.values() {
                    let mut g = self.lock(g)?;
                    completed.push(g.completed());
                    // What it completed since `sync_state` (an ack that came
                    // in between) is acted on too: durable first as well.
                    groups_durable.push(g.sync_later()?);
                }
            }
            let deletions = self.deletions();
            // Compaction acts on these deletions: they are durable first.
            (
                deletions.set().clone(),
                completed,
                deletions.sync_later(),
                groups_durable,
            )
        };
        durable.wait()?;
        groups_durable.into_iter().try_for_each(SyncWait::wait)?;
        let latest = match self.config.cleanup {
            Cleanup::Compact => Some(Cleaner::latest_offset_per_key(&self.log)?),
            Cleanup::Delete => None,
        };
        Ok(Cleaner {
            deleted,
            completed,
            latest,
            tombstone_deadline: now_ms.saturating_sub(self.config.delete_retention_ms),
        })
    }

    /// Every deleted offset below `compacted_below` (the active segment's base
    /// when compaction started) was just removed from the sealed segments, so
    /// the journal keeps only the rest. Skipped when a deletion arrived
    /// meanwhile (the next pass prunes it).
    fn prune_deletions(&self, used: &RangeSet, compacted_below: u64) -> Result<()> {
        let mut deletions = self.deletions_mut();
        let deleted = deletions.set();
        if deleted != used || deleted.iter().all(|r| r.start >= compacted_below) {
            return Ok(());
        }
        deletions.prune_below(compacted_below)
    }
}
