//! The cleaner policy: which records of sealed segments compaction removes,
//! decided on a snapshot of a topic's state so compaction never holds the
//! topic while it copies. A record goes when it is explicitly deleted, when
//! every group completed it on a `delete_when_consumed` topic, or, on a
//! `cleanup=compact` topic, when a later durable record has its key or it is
//! a tombstone older than `delete_retention_ms`.

use crate::error::Result;
use crate::groups::RangeSet;
use crate::storage::compact::RecordInfo;
use crate::storage::{Log, Offset};
use bytes::Bytes;
use std::collections::HashMap;

/// What compaction removes, decided on a snapshot of a topic's state.
#[derive(Debug)]
pub(crate) struct Cleaner {
    /// Explicitly deleted offsets.
    pub(crate) deleted: RangeSet,
    /// Per group, what it completed (`delete_when_consumed` topics only).
    pub(crate) completed: Vec<RangeSet>,
    /// Last offset of every key (`cleanup=compact` topics only).
    pub(crate) latest: Option<HashMap<Bytes, u64>>,
    /// Tombstones older than this go.
    pub(crate) tombstone_deadline: u64,
}

impl Cleaner {
    /// Whether compaction keeps the record `r`.
    pub(crate) fn keep(&self, r: &RecordInfo<'_>) -> bool {
        if self.deleted.contains(r.offset) {
            return false;
        }
        if !self.completed.is_empty() && self.completed.iter().all(|done| done.contains(r.offset)) {
            return false;
        }
        if let (Some(latest), Some(key)) = (&self.latest, r.key) {
            if latest.get(key).is_some_and(|&last| last > r.offset) {
                return false;
            }
            if r.value_len == 0 && r.timestamp_ms < self.tombstone_deadline {
                return false;
            }
        }
        true
    }

    /// The last durable offset of every key of `log` (compaction keeps only
    /// that record: a later one a power cut could still take does not count).
    pub(crate) fn latest_offset_per_key(log: &Log) -> Result<HashMap<Bytes, u64>> {
        let mut latest = HashMap::new();
        let mut from = 0u64;
        let end = log.stats().durable_end.0;
        while from < end {
            log.check_compaction_goes_on()?;
            let batch = log.read(Offset(from), 10_000, 64 << 20)?;
            let Some(last) = batch.last().map(|m| m.offset.0) else {
                break;
            };
            for m in batch.into_iter().take_while(|m| m.offset.0 < end) {
                if let Some(key) = m.key {
                    latest.insert(key, m.offset.0);
                }
            }
            from = last + 1;
        }
        Ok(latest)
    }
}
