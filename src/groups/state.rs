//! One consumer group's state: what is durable (committed offset, or low
//! watermark plus completed offsets above it, plus delivery counts of
//! redelivered messages) and what lives only in memory (the delivery cursor,
//! leases, members).
//!
//! Durability of delivery counts: first deliveries are journaled as offset
//! ranges (one entry per fetch, not one per message), every redelivery journals
//! its count, and both are synced before the messages are handed out. So across
//! any number of broker crashes or power cuts a message is delivered at most
//! `max_deliveries` times before it is dead-lettered.

use super::journal::{Journal, JournalRecovery, Payloads, SyncWait};
use super::ranges::RangeSet;
use crate::error::{Error, Result};
use crate::storage::io::Storage;
use crate::storage::log::wall_ms_of;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Default lease of a queue delivery.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;
/// Default deliveries before a message goes to the dead-letter topic.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;
/// Journal entries between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 10_000;

/// How a group consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupMode {
    /// Kafka-like: ordered reading from a committed offset.
    Stream,
    /// Competing consumers: each message leased to one member until acked.
    Queue,
}

impl std::str::FromStr for GroupMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<GroupMode> {
        match s {
            "stream" => Ok(GroupMode::Stream),
            "queue" => Ok(GroupMode::Queue),
            other => Err(Error::InvalidArgument(format!(
                "group mode {other:?}: expected stream or queue"
            ))),
        }
    }
}

impl std::fmt::Display for GroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GroupMode::Stream => "stream",
            GroupMode::Queue => "queue",
        })
    }
}

/// Settings of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// Stream or queue.
    pub mode: GroupMode,
    /// Lease length of a queue delivery.
    pub ack_timeout_ms: u64,
    /// Deliveries before dead-lettering (queue groups).
    pub max_deliveries: u32,
}

impl GroupConfig {
    /// A group of `mode` with default timeouts.
    pub fn new(mode: GroupMode) -> GroupConfig {
        GroupConfig {
            mode,
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

/// A delivery lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Member holding it.
    pub member: String,
    /// When it expires (ms since the epoch).
    pub deadline_ms: u64,
    /// Which delivery of the message this is (1 = first).
    pub delivery: u32,
}

/// What to do with a message about to be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand it out; this is its `delivery`-th delivery.
    Deliver {
        /// Delivery number (1 = first).
        delivery: u32,
    },
    /// It was delivered `deliveries` times already: dead-letter it.
    DeadLetter {
        /// Deliveries so far.
        deliveries: u32,
    },
}

/// What a group looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Stream or queue.
    pub mode: GroupMode,
    /// Stream: committed offset. Queue: low watermark (everything below is done).
    pub committed: u64,
    /// Messages leased and not yet acked.
    pub pending: usize,
    /// Messages not yet completed, up to the log end.
    pub lag: u64,
    /// Members seen, with when they were last seen (ms since the epoch, by
    /// the wall clock).
    pub members: BTreeMap<String, u64>,
    /// Messages retention dropped before the group completed them.
    pub lost_to_retention: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Config(GroupConfig),
    /// Stream: the committed offset. Queue: a seek (everything below done,
    /// nothing at or above).
    Commit(u64),
    Ack(u64, u64),
    Delivered(u64, u32),
    /// Offsets `[from, to)` handed out for the first time.
    FirstDelivered(u64, u64),
    /// Total messages lost to retention so far.
    Lost(u64),
}

const TAG_CONFIG: u8 = 1;
const TAG_COMMIT: u8 = 2;
const TAG_ACK: u8 = 3;
const TAG_DELIVERED: u8 = 4;
const TAG_FIRST_DELIVERED: u8 = 5;
const TAG_LOST: u8 = 6;

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(17);
        match *self {
            Entry::Config(c) => {
                b.push(TAG_CONFIG);
                b.push(match c.mode {
                    GroupMode::Stream => 0,
                    GroupMode::Queue => 1,
                });
                b.extend_from_slice(&c.ack_timeout_ms.to_le_bytes());
                b.extend_from_slice(&c.max_deliveries.to_le_bytes());
            }
            Entry::Commit(o) => {
                b.push(TAG_COMMIT);
                b.extend_from_slice(&o.to_le_bytes());
            }
            Entry::Ack(a, z) => {
                b.push(TAG_ACK);
                b.extend_from_slice(&a.to_le_bytes());
                b.extend_from_slice(&z.to_le_bytes());
            }
            Entry::Delivered(o, n) => {
                b.push(TAG_DELIVERED);
                b.extend_from_slice(&o.to_le_bytes());
                b.extend_from_slice(&n.to_le_bytes());
            }
            Entry::FirstDelivered(a, z) => {
                b.push(TAG_FIRST_DELIVERED);
                b.extend_from_slice(&a.to_le_bytes());
                b.extend_from_slice(&z.to_le_bytes());
            }
            Entry::Lost(n) => {
                b.push(TAG_LOST);
                b.extend_from_slice(&n.to_le_bytes());
            }
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let mut r = Reader(b);
        let entry = match r.u8()? {
            TAG_CONFIG => {
                let mode = match r.u8()? {
                    0 => GroupMode::Stream,
                    1 => GroupMode::Queue,
                    _ => return None,
                };
                Entry::Config(GroupConfig {
                    mode,
                    ack_timeout_ms: r.u64()?,
                    max_deliveries: r.u32()?,
                })
            }
            TAG_COMMIT => Entry::Commit(r.u64()?),
            TAG_ACK => Entry::Ack(r.u64()?, r.u64()?),
            TAG_DELIVERED => Entry::Delivered(r.u64()?, r.u32()?),
            TAG_FIRST_DELIVERED => Entry::FirstDelivered(r.u64()?, r.u64()?),
            TAG_LOST => Entry::Lost(r.u64()?),
            _ => return None,
        };
        r.0.is_empty().then_some(entry)
    }
}

/// How a group's journal payloads parse (see [`Payloads`]).
pub(crate) const PAYLOADS: Payloads = Payloads {
    entry: entry_parses,
    snapshot: snapshot_parses,
    referenced_end,
};

/// [`Group::referenced_end`] of the group these payloads replay to, as the
/// broker opens it.
fn referenced_end(snapshot: Option<&[u8]>, entries: &[&[u8]]) -> u64 {
    Progress::replay(
        GroupConfig::new(GroupMode::Stream),
        0,
        snapshot,
        entries.iter().copied(),
    )
    .map_or(0, |p| p.referenced_end())
}

fn entry_parses(b: &[u8]) -> std::result::Result<(), String> {
    if Entry::decode(b).is_some() {
        return Ok(());
    }
    Err(match b.first() {
        None => "an empty entry".into(),
        Some(&tag) if !(TAG_CONFIG..=TAG_LOST).contains(&tag) => format!("unknown tag {tag}"),
        Some(&tag) => format!("{} bytes are no entry of tag {tag}", b.len()),
    })
}

fn snapshot_parses(b: &[u8]) -> std::result::Result<(), String> {
    Progress::decode(b)
        .map(|_| ())
        .ok_or_else(|| format!("{} bytes are no group snapshot", b.len()))
}

/// The durable part of a group's state: what its snapshot holds and its
/// journal's entries change.
#[derive(Debug)]
struct Progress {
    config: GroupConfig,
    low: u64,
    done: RangeSet,
    counts: BTreeMap<u64, u32>,
    /// Offsets handed out at least once (a missing count means 1 here, 0 elsewhere).
    delivered: RangeSet,
    /// Messages retention dropped before the group completed them.
    lost: u64,
}

impl Progress {
    /// A group with `config` that starts at `start`.
    fn new(config: GroupConfig, start: u64) -> Progress {
        Progress {
            config,
            low: start,
            done: RangeSet::new(),
            counts: BTreeMap::new(),
            delivered: RangeSet::new(),
            lost: 0,
        }
    }

    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Config(c) => self.config = c,
            Entry::Commit(o) => {
                self.low = o;
                self.done = RangeSet::new();
                self.counts.retain(|&k, _| k >= o);
                self.delivered.remove_below(o);
            }
            Entry::Ack(a, z) => {
                self.done.insert_range(a.max(self.low)..z);
                remove_range(&mut self.counts, a..z);
                self.advance_low();
            }
            Entry::Delivered(o, n) => {
                if o >= self.low && !self.done.contains(o) {
                    self.counts.insert(o, n);
                }
            }
            Entry::FirstDelivered(a, z) => self.delivered.insert_range(a.max(self.low)..z),
            Entry::Lost(n) => self.lost = n,
        }
    }

    fn advance_low(&mut self) {
        if self.config.mode == GroupMode::Queue {
            let low = self.done.first_gap_from(self.low);
            if low != self.low {
                self.low = low;
                self.done.remove_below(low);
                self.delivered.remove_below(low);
            }
        }
    }

    /// One past the highest offset the group's durable state speaks of
    /// (its committed offset, completions, delivery counts): the log must
    /// reach it, or an offset the group saw would be handed out again.
    fn referenced_end(&self) -> u64 {
        let end_of = |set: &RangeSet| set.iter().last().map_or(0, |r| r.end);
        self.low
            .max(end_of(&self.done))
            .max(end_of(&self.delivered))
            .max(self.counts.keys().next_back().map_or(0, |&o| o + 1))
    }

    /// Replays `snapshot` (which replaces everything) and `entries`, in
    /// order, onto a group of `config` starting at `start`; `Err` names
    /// what does not parse.
    fn replay<'a>(
        config: GroupConfig,
        start: u64,
        snapshot: Option<&[u8]>,
        entries: impl IntoIterator<Item = &'a [u8]>,
    ) -> std::result::Result<Progress, &'static str> {
        let mut p = match snapshot {
            Some(b) => Progress::decode(b).ok_or("snapshot")?,
            None => Progress::new(config, start),
        };
        for payload in entries {
            p.apply(Entry::decode(payload).ok_or("journal entry")?);
        }
        Ok(p)
    }

    fn decode(b: &[u8]) -> Option<Progress> {
        const CONFIG_LEN: usize = 1 + 1 + 8 + 4;
        let Entry::Config(config) = Entry::decode(b.get(..CONFIG_LEN)?)? else {
            return None;
        };
        let mut r = Reader(&b[CONFIG_LEN..]);
        let low = r.u64()?;
        let mut done = RangeSet::new();
        for _ in 0..r.u64()? {
            let (s, e) = (r.u64()?, r.u64()?);
            done.insert_range(s..e);
        }
        let mut counts = BTreeMap::new();
        for _ in 0..r.u64()? {
            let (o, n) = (r.u64()?, r.u32()?);
            counts.insert(o, n);
        }
        // Snapshots written before first deliveries were journaled end here.
        let mut delivered = RangeSet::new();
        if !r.0.is_empty() {
            for _ in 0..r.u64()? {
                let (s, e) = (r.u64()?, r.u64()?);
                delivered.insert_range(s..e);
            }
        }
        // ... and those written before retention losses were counted, here.
        let mut lost = 0;
        if !r.0.is_empty() {
            lost = r.u64()?;
        }
        r.0.is_empty().then_some(Progress {
            config,
            low,
            done,
            counts,
            delivered,
            lost,
        })
    }
}

/// Little-endian field reader for journal payloads.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// One consumer group of one topic.
#[derive(Debug)]
pub struct Group {
    name: String,
    journal: Journal,
    /// What is durable, in the journal.
    progress: Progress,
    // In memory.
    /// Offsets below this were counted in `lost` already, or were gone
    /// before this group heard of them (see [`Group::lose_below`]).
    lost_counted_to: u64,
    /// First deliveries not journaled yet: [`Group::sync`] journals them.
    unjournaled: RangeSet,
    cursor: u64,
    leases: BTreeMap<u64, Lease>,
    ready: BTreeMap<u64, u64>,
    members: BTreeMap<String, u64>,
}

/// How long a member not seen stays in [`GroupInfo::members`] once the
/// group knows [`MEMBERS_KEPT`] members.
pub const MEMBER_FORGET_MS: u64 = 60 * 60 * 1000;
/// Members a group keeps before it forgets those not seen for
/// [`MEMBER_FORGET_MS`].
pub const MEMBERS_KEPT: usize = 1024;
/// Most members a group keeps however recently they were seen (clients
/// that take a new name per connection, reconnecting fast): past it, the
/// one seen longest ago is forgotten.
pub const MEMBERS_MOST: usize = 4096;

impl Group {
    /// Opens the group `name` stored in `dir`, creating it with `config` (and
    /// starting at `start`) if it does not exist. An existing group keeps its
    /// own config.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        config: GroupConfig,
        start: u64,
    ) -> Result<Group> {
        Group::open_checked(
            storage,
            dir,
            name,
            config,
            start,
            JournalRecovery::default(),
        )?
        .ok_or_else(|| {
            // The default recovery mode refuses damage before this.
            Error::Internal(format!("group {name}: its state was given up"))
        })
    }

    /// [`Group::open`] with the journal's recovery point and recovery mode
    /// (see [`Journal::open_checked`]). `None`: under skip-damaged, what was
    /// given up held the group's mode and settings, so the group cannot be
    /// opened as what it was.
    pub fn open_checked(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        config: GroupConfig,
        start: u64,
        recovery: JournalRecovery,
    ) -> Result<Option<Group>> {
        let (journal, replayed) = if Journal::exists(&*storage, dir, name) {
            let recovery = JournalRecovery {
                payloads: Some(PAYLOADS),
                ..recovery
            };
            let (journal, replayed) = Journal::open_checked(storage, dir, name, recovery)?;
            // Under skip-damaged, a snapshot or entries given up can take the
            // group's mode and settings with them (the snapshot or the first
            // entries hold them). Opened with the caller's config, a queue
            // group would come back as a stream group for good: the caller
            // gives the group up instead, as it does one whose journal is gone.
            let config_known = replayed.snapshot.is_some()
                || replayed
                    .entries
                    .iter()
                    .any(|p| p.first() == Some(&TAG_CONFIG));
            if !config_known && !replayed.damage.is_empty() {
                return Ok(None);
            }
            (journal, replayed)
        } else {
            // A new group's mode and start are durable before its name is: a
            // crash half-way through creating it leaves no group rather than
            // one that comes back with the default config.
            let initial = [
                Entry::Config(config).encode(),
                Entry::Commit(start).encode(),
            ];
            Journal::create(storage, dir, name, &initial)?
        };
        // An empty journal without a snapshot: left by a crash of a version
        // that created the file before writing its first entries.
        let fresh = replayed.snapshot.is_none() && replayed.entries.is_empty();
        let progress = Progress::replay(
            config,
            start,
            replayed.snapshot.as_deref(),
            replayed.entries.iter().map(Vec::as_slice),
        )
        .map_err(|what| damaged(dir, name, what))?;
        let mut group = Group {
            name: name.to_owned(),
            journal,
            progress,
            lost_counted_to: 0,
            unjournaled: RangeSet::new(),
            cursor: start,
            leases: BTreeMap::new(),
            ready: BTreeMap::new(),
            members: BTreeMap::new(),
        };
        if fresh {
            group.journal.append(&Entry::Config(config).encode())?;
            group.journal.append(&Entry::Commit(start).encode())?;
            group.journal.sync()?;
        }
        group.cursor = group.progress.low;
        Ok(Some(group))
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's settings.
    pub fn config(&self) -> GroupConfig {
        self.progress.config
    }

    /// Stream: committed offset. Queue: low watermark.
    pub fn committed(&self) -> u64 {
        self.progress.low
    }

    /// Whether `offset` is completed for this group.
    pub fn is_done(&self, offset: u64) -> bool {
        offset < self.progress.low || self.progress.done.contains(offset)
    }

    /// The first offset at or after `from` this group has not completed.
    pub fn first_not_done(&self, from: u64) -> u64 {
        self.progress
            .done
            .first_gap_from(from.max(self.progress.low))
    }

    /// Every offset this group has completed.
    pub fn completed(&self) -> RangeSet {
        let mut all = self.progress.done.clone();
        all.insert_range(0..self.progress.low);
        all
    }

    /// Ranges held by the completed set (its memory).
    pub fn done_ranges(&self) -> usize {
        self.progress.done.range_count()
    }

    /// Next offset never handed out since the group was opened.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Moves the cursor past `offset`.
    pub fn advance_cursor(&mut self, to: u64) {
        self.cursor = self.cursor.max(to);
    }

    /// Records that `member` was seen at `now_ms`.
    /// Members not seen for [`MEMBER_FORGET_MS`] are forgotten (looked for
    /// once the group knows [`MEMBERS_KEPT`] of them), and never more than
    /// [`MEMBERS_MOST`] are kept, so clients that take a new member name
    /// each time do not grow the group without bound.
    pub fn touch(&mut self, member: &str, now_ms: u64) {
        if self.members.len() >= MEMBERS_KEPT && !self.members.contains_key(member) {
            self.members
                .retain(|_, seen| now_ms.saturating_sub(*seen) < MEMBER_FORGET_MS);
            if self.members.len() >= MEMBERS_MOST {
                let oldest = self
                    .members
                    .iter()
                    .min_by_key(|(_, seen)| **seen)
                    .map(|(name, _)| name.clone());
                if let Some(oldest) = oldest {
                    self.members.remove(&oldest);
                }
            }
        }
        self.members.insert(member.to_owned(), now_ms);
    }

    /// Moves expired leases to the redelivery set.
    pub fn expire(&mut self, now_ms: u64) {
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(&o, _)| o)
            .collect();
        for o in expired {
            self.leases.remove(&o);
            self.ready.insert(o, now_ms);
        }
    }

    /// Leases and redeliveries held (what [`Group::has_due`] looks through).
    pub fn timers(&self) -> usize {
        self.leases.len() + self.ready.len()
    }

    /// Whether anything is due for redelivery at `now_ms`: a lease run out
    /// or a redelivery whose time came.
    pub fn has_due(&self, now_ms: u64) -> bool {
        self.leases.values().any(|l| l.deadline_ms <= now_ms)
            || self.ready.values().any(|&due| due <= now_ms)
    }

    /// Offsets from `from` on due for redelivery at `now_ms`, lowest first.
    pub fn due_redeliveries(&self, now_ms: u64, from: u64, max: usize) -> Vec<u64> {
        self.ready
            .range(from..)
            .filter(|&(_, &t)| t <= now_ms)
            .map(|(&o, _)| o)
            .take(max)
            .collect()
    }

    /// Whether the group has timing that lives only in memory and would be
    /// lost if it were closed now: a lease not run out (whose member has
    /// until its timeout), or a redelivery not yet due (a nack's delay).
    pub fn has_timers(&self, now_ms: u64) -> bool {
        self.leases.values().any(|l| l.deadline_ms > now_ms)
            || self.ready.values().any(|&due| due > now_ms)
    }

    /// Whether `offset` is leased right now.
    pub fn is_leased(&self, offset: u64) -> bool {
        self.leases.contains_key(&offset)
    }

    /// How many times `offset` was delivered so far.
    pub fn deliveries(&self, offset: u64) -> u32 {
        self.progress
            .counts
            .get(&offset)
            .copied()
            .unwrap_or_else(|| u32::from(self.progress.delivered.contains(offset)))
    }

    /// Decides whether `offset` is delivered to `member` or dead-lettered. A
    /// delivery takes a lease and is recorded for the journal, so the caller
    /// must [`Group::sync`] before handing it out.
    pub fn deliver(&mut self, offset: u64, member: &str, now_ms: u64) -> Result<Decision> {
        let previous = self.deliveries(offset);
        if previous >= self.progress.config.max_deliveries {
            return Ok(Decision::DeadLetter {
                deliveries: previous,
            });
        }
        let delivery = previous + 1;
        // A count of its own (a redelivery, or a delivery taken back by
        // [`Group::undeliver`]) is journaled as such.
        if delivery >= 2 || self.progress.counts.contains_key(&offset) {
            self.journal
                .append(&Entry::Delivered(offset, delivery).encode())?;
            self.progress.counts.insert(offset, delivery);
        } else {
            // Journaled as ranges at the next sync: a fetch costs one entry.
            self.progress.delivered.insert(offset);
            self.unjournaled.insert(offset);
        }
        self.ready.remove(&offset);
        self.leases.insert(
            offset,
            Lease {
                member: member.to_owned(),
                deadline_ms: now_ms.saturating_add(self.progress.config.ack_timeout_ms),
                delivery,
            },
        );
        Ok(Decision::Deliver { delivery })
    }

    /// Takes back delivery `delivery` of `offset`, which never left the
    /// broker (a read whose reader went away before taking it; its lease
    /// given back already): it does not count toward `max_deliveries`, and
    /// the message's next delivery carries the same number. Nothing happens
    /// if `offset` was delivered again since. Durable after
    /// [`Group::sync`] (a crash before keeps the higher count).
    pub fn undeliver(&mut self, offset: u64, delivery: u32) -> Result<()> {
        if delivery == 0 || self.deliveries(offset) != delivery || self.leases.contains_key(&offset)
        {
            return Ok(());
        }
        self.journal
            .append(&Entry::Delivered(offset, delivery - 1).encode())?;
        self.progress.counts.insert(offset, delivery - 1);
        Ok(())
    }

    /// [`Group::undeliver`] for a fetch that failed after leasing (a full
    /// disk): a first delivery not journaled yet is forgotten in memory,
    /// with nothing to write, so the take-back holds on the disk that
    /// refused the fetch. The lease must be given back first.
    pub fn take_back(&mut self, offset: u64, delivery: u32) -> Result<()> {
        if delivery == 1
            && self.unjournaled.contains(offset)
            && !self.progress.counts.contains_key(&offset)
            && !self.leases.contains_key(&offset)
        {
            self.unjournaled.remove(offset);
            self.progress.delivered.remove(offset);
            return Ok(());
        }
        self.undeliver(offset, delivery)
    }

    /// Completes offsets `[from, to)` (an ack, or a dead-letter handed off).
    /// Durable after [`Group::sync`].
    pub fn complete(&mut self, from: u64, to: u64) -> Result<()> {
        if from >= to || (to <= self.progress.low && self.progress.config.mode == GroupMode::Queue)
        {
            return Ok(());
        }
        self.journal.append(&Entry::Ack(from, to).encode())?;
        remove_range(&mut self.leases, from..to);
        remove_range(&mut self.ready, from..to);
        self.progress.apply(Entry::Ack(from, to));
        self.maybe_snapshot()
    }

    /// Completes what of `[from, to)` is neither completed already nor
    /// leased (a run of deleted offsets: a lease taken before the deletion
    /// ends as leases do). Durable after [`Group::sync`].
    pub fn complete_unleased(&mut self, from: u64, to: u64) -> Result<()> {
        let leased: Vec<u64> = self.leases.range(from..to).map(|(&o, _)| o).collect();
        let mut start = from;
        for hole in leased.into_iter().chain(std::iter::once(to)) {
            let first = self.first_not_done(start);
            if first < hole {
                self.complete(first, hole)?;
            }
            start = hole + 1;
        }
        Ok(())
    }

    /// Gives a leased offset back for redelivery after `delay_ms`. A lease
    /// that ran out already is no lease (the message is due at once, for
    /// any member: a late nack must not hold it back).
    pub fn nack(&mut self, offset: u64, now_ms: u64, delay_ms: u64) -> bool {
        match self.leases.get(&offset) {
            Some(lease) if lease.deadline_ms > now_ms => {
                self.leases.remove(&offset);
                self.ready.insert(offset, now_ms.saturating_add(delay_ms));
                true
            }
            _ => false,
        }
    }

    /// Moves the deadline of `member`'s lease on `offset` to `deadline_ms`;
    /// false when `member` holds no lease on it as of `now_ms` (acked,
    /// expired, given back or leased to another member).
    pub fn extend(&mut self, offset: u64, member: &str, now_ms: u64, deadline_ms: u64) -> bool {
        match self.leases.get_mut(&offset) {
            Some(lease) if lease.member == member && lease.deadline_ms > now_ms => {
                lease.deadline_ms = deadline_ms;
                true
            }
            _ => false,
        }
    }

    /// Puts `offset` in the redelivery set, due at `at_ms` (a dead letter whose
    /// hand-off has not completed yet stays there until it has).
    pub fn defer(&mut self, offset: u64, at_ms: u64) {
        self.leases.remove(&offset);
        self.ready.insert(offset, at_ms);
    }

    /// Moves the read position of a stream group (not durable: see [`Group::commit`]).
    pub fn set_cursor(&mut self, offset: u64) {
        self.cursor = offset;
    }

    /// Stream: commits `offset` (the next to read). Queue: seeks, making every
    /// offset below done and every offset at or above pending again.
    pub fn commit(&mut self, offset: u64) -> Result<()> {
        self.journal.append(&Entry::Commit(offset).encode())?;
        self.progress.apply(Entry::Commit(offset));
        if self.progress.config.mode == GroupMode::Queue {
            self.leases.clear();
            self.ready.clear();
            self.cursor = offset;
        }
        self.maybe_snapshot()
    }

    /// Retention dropped every offset below `start`: the group goes on from
    /// there (a stream group's commit moves up, a queue group's pending and
    /// unacked messages below it are gone) and counts, durably, the
    /// messages it had not completed that are not in `deleted` and that no
    /// earlier pass counted (a stream commit below the log's start takes
    /// the group below offsets counted or gone already; a pass that failed
    /// for this group leaves its offsets to the next). Returns that count.
    pub fn lose_below(&mut self, start: u64, deleted: &RangeSet) -> Result<u64> {
        if self.progress.low >= start {
            // Read already: nothing lost, and nothing to count again after
            // a commit back below it.
            self.heard_start(start);
            return Ok(0);
        }
        let range = self.progress.low.max(self.lost_counted_to).min(start)..start;
        let done = self.progress.done.count_in(range.clone());
        let mut gone = deleted.clone();
        gone.remove_below(range.start);
        gone.remove_from(range.end);
        // Deleted offsets the group had completed are counted once.
        let both = gone
            .intersection(&self.progress.done)
            .count_in(range.clone());
        let skipped = done + gone.count_in(range.clone()) - both;
        let lost = (range.end - range.start).saturating_sub(skipped);
        self.journal
            .append(&Entry::Lost(self.progress.lost + lost).encode())?;
        self.progress.lost += lost;
        self.lost_counted_to = start;
        if self.progress.config.mode == GroupMode::Queue {
            self.complete(self.progress.low, start)?;
        } else {
            self.commit(start)?;
        }
        let dropped: Vec<u64> = self.leases.range(..start).map(|(&o, _)| o).collect();
        for o in dropped {
            self.leases.remove(&o);
        }
        self.ready.retain(|&o, _| o >= start);
        self.cursor = self.cursor.max(start);
        self.sync()?;
        Ok(lost)
    }

    /// The log starts at `start` now, and what retention dropped below it is
    /// counted or was never this group's to count (it was gone before the
    /// group was made or opened, or read): a later pass counts only from
    /// here, whatever commit takes the group back below it.
    pub fn heard_start(&mut self, start: u64) {
        self.lost_counted_to = self.lost_counted_to.max(start);
    }

    /// Brings the group inside the log after a crash: state past the end is
    /// forgotten, and a queue group below the start (a retention pass a crash
    /// cut before it reached the groups; counted in no `lost` total) goes on
    /// from it. Retention itself goes through [`Group::lose_below`].
    pub fn clamp(&mut self, log_start: u64, log_end: u64) -> Result<()> {
        // What was gone before this open is not the next pass's to count.
        self.heard_start(log_start);
        let target = if self.progress.low > log_end {
            Some(log_end)
        } else if self.progress.low < log_start && self.progress.config.mode == GroupMode::Queue {
            Some(log_start)
        } else {
            None
        };
        if let Some(target) = target {
            if target > self.progress.low {
                // Compaction's whole-segment removals (consumed or
                // superseded records) leave this at every next start:
                // routine. The rare other cause (a retention pass a crash
                // cut before the groups heard of it) is named with it.
                tracing::info!(group = %self.name, from = self.progress.low, to = target, log_start, log_end,
                    "queue group moved up to the log's start (past records compaction removed, or a retention pass cut short by a crash dropped)");
            } else {
                tracing::warn!(group = %self.name, from = self.progress.low, to = target, log_start, log_end,
                    "group state past the log's end moved back to it");
            }
            if self.progress.config.mode == GroupMode::Queue && target > self.progress.low {
                self.complete(self.progress.low, target)?;
            } else {
                self.commit(target)?;
            }
            self.sync()?;
        }
        // Completions, counts and deliveries at or past the end belong to
        // messages the crash took back; those offsets will name new messages.
        let past_end = |set: &RangeSet| set.iter().last().is_some_and(|r| r.end > log_end);
        if past_end(&self.progress.done)
            || past_end(&self.progress.delivered)
            || self.progress.counts.range(log_end..).next().is_some()
        {
            tracing::warn!(group = %self.name, log_end,
                "group state moved inside the log: forgetting completions and deliveries past its end");
            self.progress.done.remove_from(log_end);
            self.progress.delivered.remove_from(log_end);
            self.unjournaled.remove_from(log_end);
            self.progress.counts.split_off(&log_end);
            // Only a snapshot can take journaled state back.
            self.sync()?;
            let snapshot = self.encode_snapshot();
            self.journal.snapshot(&snapshot)?;
        }
        self.cursor = self.cursor.max(self.progress.low);
        Ok(())
    }

    /// Makes every change durable, first deliveries included.
    pub fn sync(&mut self) -> Result<()> {
        self.sync_later()?.wait()
    }

    /// Journals what is only in memory (first deliveries) and returns what to
    /// wait on, after letting go of the group's lock, for every change so far
    /// to be durable: waits of several callers share one sync (group commit).
    pub fn sync_later(&mut self) -> Result<SyncWait> {
        let ranges: Vec<_> = self.unjournaled.iter().collect();
        for r in ranges {
            self.journal
                .append(&Entry::FirstDelivered(r.start, r.end).encode())?;
            // Journaled: a take-back of these goes through the journal too.
            self.unjournaled.remove_below(r.end);
        }
        Ok(self.journal.sync_later())
    }

    /// The journal's recovery point (see [`Journal::recovery_point`]).
    pub fn recovery_point(&self) -> (u64, u64) {
        self.journal.recovery_point()
    }

    /// One past the highest offset the group's durable state speaks of
    /// (its committed offset, completions, delivery counts): the log must
    /// reach it, or an offset the group saw would be handed out again.
    pub fn referenced_end(&self) -> u64 {
        self.progress.referenced_end()
    }

    /// Whether a failed sync made the group's journal read-only.
    pub fn is_read_only(&self) -> bool {
        self.journal.is_read_only()
    }

    /// Whether every change is durable.
    pub fn is_synced(&self) -> bool {
        self.unjournaled.is_empty() && self.journal.is_synced()
    }

    /// Takes the snapshot the journal is due for, if any: the start of a
    /// queue read calls this, before it leases anything, since redeliveries
    /// (nacks, leases running out) fill the journal as acks do, and a group
    /// that only redelivers would otherwise never take one.
    pub fn snapshot_if_due(&mut self) -> Result<()> {
        self.maybe_snapshot()
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        if self.journal.entries_since_snapshot() >= SNAPSHOT_EVERY {
            self.sync()?;
            let snapshot = self.encode_snapshot();
            // The change that called is journaled and synced: it stands
            // whether or not its snapshot can be written now.
            self.journal.snapshot_when_possible(&snapshot)?;
        }
        Ok(())
    }

    /// What the group looks like, against a log holding the offsets of
    /// `log` whose explicitly deleted offsets are `deleted`. A deleted
    /// message counts as completed at once: it is in neither `pending` nor
    /// `lag`, and a queue group's watermark passes it, although the group
    /// completes it in its own state only when a fetch comes across it.
    /// `lag` counts only offsets the log holds (a commit below its start
    /// does not count what is gone). `pending` counts the leases not run
    /// out as of `now_ms` (one that ran out is due again, and leaves the
    /// lease table at the next fetch). Times are on the timer clock
    /// ([`crate::storage::log::timer_ms`]), members' sightings as told on
    /// the wall clock.
    pub fn info(&self, log: Range<u64>, deleted: &RangeSet, now_ms: u64) -> GroupInfo {
        let log_end = log.end;
        let (committed, lag) = match self.progress.config.mode {
            GroupMode::Stream => {
                let from = self.progress.low.max(log.start).min(log_end);
                (
                    self.progress.low,
                    log_end - from - deleted.count_in(from..log_end),
                )
            }
            GroupMode::Queue => {
                let mut low = self.progress.low;
                while low < log_end {
                    let next = deleted.first_gap_from(self.progress.done.first_gap_from(low));
                    if next == low {
                        break;
                    }
                    low = next;
                }
                let low = low.min(log_end).max(self.progress.low);
                // What the log no longer holds is not waiting.
                let held = low.max(log.start);
                let open = (log_end.max(held) - held)
                    - self.progress.done.count_in(held..log_end.max(held));
                // Deleted offsets the group has not completed itself.
                let gone: u64 = deleted
                    .iter_in(held..log_end)
                    .map(|r| (r.end - r.start) - self.progress.done.count_in(r))
                    .sum();
                (low, open - gone)
            }
        };
        GroupInfo {
            name: self.name.clone(),
            mode: self.progress.config.mode,
            committed,
            pending: self
                .leases
                .iter()
                .filter(|&(&o, l)| l.deadline_ms > now_ms && !deleted.contains(o))
                .count(),
            lag,
            // Seen on the timer clock; told on the wall clock.
            members: self
                .members
                .iter()
                .map(|(m, &seen)| (m.clone(), wall_ms_of(seen, now_ms)))
                .collect(),
            lost_to_retention: self.progress.lost,
        }
    }

    /// The lease on `offset`, if any.
    pub fn lease(&self, offset: u64) -> Option<&Lease> {
        self.leases.get(&offset)
    }

    /// The offsets leased to `member`.
    pub fn leased_to(&self, member: &str) -> Vec<u64> {
        self.leases
            .iter()
            .filter(|(_, l)| l.member == member)
            .map(|(&o, _)| o)
            .collect()
    }

    /// Removes the group's files.
    pub fn remove(self) -> Result<()> {
        self.journal.remove()
    }

    /// Removes the group's files while others may still hold the group.
    pub fn remove_files(&self) -> Result<()> {
        self.journal.remove_own_files()
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let mut b = Entry::Config(self.progress.config).encode();
        b.extend_from_slice(&self.progress.low.to_le_bytes());
        b.extend_from_slice(&(self.progress.done.range_count() as u64).to_le_bytes());
        for r in self.progress.done.iter() {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        b.extend_from_slice(&(self.progress.counts.len() as u64).to_le_bytes());
        for (&o, &n) in &self.progress.counts {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(&(self.progress.delivered.range_count() as u64).to_le_bytes());
        for r in self.progress.delivered.iter() {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        b.extend_from_slice(&self.progress.lost.to_le_bytes());
        b
    }
}

/// Removes the keys in `r`, in time proportional to what is removed (an ack
/// must not cost a walk over everything in flight).
fn remove_range<V>(map: &mut BTreeMap<u64, V>, r: std::ops::Range<u64>) {
    if r.start >= r.end {
        return;
    }
    let keys: Vec<u64> = map.range(r).map(|(&k, _)| k).collect();
    for k in keys {
        map.remove(&k);
    }
}

fn damaged(dir: &Path, name: &str, what: &str) -> Error {
    Error::corruption(crate::error::Corruption {
        file: dir.join(format!("{name}.journal")),
        bytes: 0..0,
        offsets: None,
        detail: format!("group {name}: a {what} passed its checksum but does not parse"),
    })
}
