//! A topic: its log, its explicit deletions and its consumer groups, with
//! the rules that join them (deleted and fully consumed messages are never
//! delivered or replayed; group changes are durable under the topic's fsync
//! policy before they are confirmed).

mod compaction;
pub use compaction::CompactionWatch;
mod queue;
mod stream;

use super::cleaner::Cleaner;
use super::config::{Cleanup, MAX_NAME_LEN, TopicConfig, validate_name};
use super::deletions::Deletions;
use super::gate::{Gate, Pass};
use crate::error::{Error, IoContext, Result};
use crate::groups::{
    Decision, Group, GroupConfig, GroupInfo, GroupMode, Journal, JournalRecovery, RangeSet,
    SyncWait,
};
use crate::storage::checkpoint::JournalPoint;
use crate::storage::compact::{CompactStats, Dirt};
use crate::storage::io::Storage;
use crate::storage::log::{RetentionLimits, timer_ms};
use crate::storage::record;
use crate::storage::{
    Appended, Durability, FsyncPolicy, Header, Log, LogStats, Message, NewMessage, Offset, Records,
    RecoveryMode,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Folder of a topic's group state.
pub const GROUPS_DIR: &str = "groups";
pub use super::deletions::DELETES_JOURNAL;
/// Header names a dead-lettered message carries.
pub mod dlq_headers {
    /// Topic the message came from.
    pub const TOPIC: &str = "spool-dlq-topic";
    /// Its offset there.
    pub const OFFSET: &str = "spool-dlq-offset";
    /// Group that gave up on it.
    pub const GROUP: &str = "spool-dlq-group";
    /// How many times it was delivered.
    pub const DELIVERIES: &str = "spool-dlq-deliveries";
    /// Why it was dead-lettered.
    pub const REASON: &str = "spool-dlq-reason";
}

/// Where to start reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The first stored message.
    Earliest,
    /// The end: only messages produced from now on.
    Latest,
    /// An offset (clamped into the log).
    Offset(u64),
    /// The first message with a timestamp at or after this (ms since the epoch).
    Timestamp(u64),
}

/// A message leased to a queue-group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Which delivery this is (1 = first).
    pub delivery: u32,
}

/// A message a queue group gave up on, ready for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Offset in the source topic.
    pub offset: Offset,
    /// The message as it goes to the dead-letter topic (headers added).
    pub message: NewMessage,
}

/// Records read from the log ahead of the replay fetch that will want them
/// ([`Topic::read_ahead`]), with what is needed to tell whether they are
/// still what a read would find.
#[derive(Debug)]
pub struct ReadAhead {
    from: Offset,
    limits: DeliveryLimits,
    records: Records,
    /// [`Log::generation`] before the read.
    generation: u64,
    /// The log's end before the read.
    end: u64,
}

/// How much one read may hand out at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// Most messages.
    pub messages: usize,
    /// About this many bytes (stored size, [`record::stored_len`]), but at
    /// least one message.
    pub bytes: usize,
    /// Largest message one delivery can carry (key, headers and value, see
    /// [`record::payload_len`]): what the transport's frame limit leaves after
    /// its envelope. A larger message is never handed out: a replay or stream
    /// read stops before it, or fails with [`Error::TooLarge`] naming it when
    /// it comes first; a queue group dead-letters it at once.
    pub message_bytes: usize,
}

impl DeliveryLimits {
    /// Whether a read within `self` starts with everything a read within
    /// `other` from the same offset returns: the same byte limits, and at
    /// least as many messages (a read of fewer reads a prefix).
    pub fn covers(&self, other: &DeliveryLimits) -> bool {
        self.bytes == other.bytes
            && self.message_bytes == other.message_bytes
            && self.messages >= other.messages
    }

    /// `messages` and `bytes`, with no limit on the size of one message.
    pub fn new(messages: usize, bytes: usize) -> DeliveryLimits {
        DeliveryLimits {
            messages,
            bytes,
            message_bytes: usize::MAX,
        }
    }

    /// The size of `m` when it is too large to deliver.
    fn excess(&self, m: &Message) -> Option<usize> {
        let size = record::payload_len(m);
        (size > self.message_bytes).then_some(size)
    }
}

/// What one group commit of the topic's writer did: each batch written (or
/// why not), then one commit for all that were (`None` when none was).
#[derive(Debug)]
pub struct GroupCommit {
    /// Per batch, its first and last offsets.
    pub written: Vec<Result<(Offset, Offset)>>,
    /// The shared commit (and sync, as the fsync policy says).
    pub committed: Option<Result<Durability>>,
}

/// What a queue fetch produced.
#[derive(Debug, Default)]
pub struct QueueFetch {
    /// Messages leased to the member.
    pub deliveries: Vec<Delivery>,
    /// Messages to hand to the dead-letter topic, then [`Topic::complete_dead_letters`].
    pub dead_letters: Vec<DeadLetter>,
}

/// One group of a topic as it was when taken (see
/// [`Topic::group_identity`]); weak, so it keeps nothing of a deleted group
/// but its allocation, whose address no later group can take.
#[derive(Debug, Clone)]
pub(crate) struct GroupIdentity(std::sync::Weak<Mutex<Group>>);

impl GroupIdentity {
    /// The identity of `group` as it is now.
    fn of(group: &Arc<Mutex<Group>>) -> GroupIdentity {
        GroupIdentity(Arc::downgrade(group))
    }

    /// Whether `group` is the group this was taken from.
    fn is(&self, group: &Arc<Mutex<Group>>) -> bool {
        std::ptr::eq(Arc::as_ptr(group), self.0.as_ptr())
    }
}

/// A topic's groups by name, each behind a lock of its own, so one group's
/// requests never wait for another's.
type Groups = BTreeMap<String, Arc<Mutex<Group>>>;

/// Whether a read may wait for the deletions' and the groups' locks
/// (which may be held across a sync), or must give up instead (on an
/// async worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

/// One topic.
#[derive(Debug)]
pub struct Topic {
    name: String,
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    config: TopicConfig,
    log: Log,
    /// The groups. Lock order: this map, then at most one group at a time
    /// (never a second while holding one), then the deletions.
    groups: RwLock<Groups>,
    /// Explicit deletions, under their own lock: replay readers take only
    /// this one (and the groups only on `delete_when_consumed` topics).
    deletions: RwLock<Deletions>,
    /// Every request passes it; a delete closes it (see [`Topic::gate`]).
    gate: Gate,
    /// What background compaction last measured, and when it measures
    /// next.
    compaction: Mutex<CompactionWatch>,
}

impl Topic {
    /// Opens the topic stored in `dir` with `config`, recovering its log and
    /// state (group state is clamped into the log).
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        config: TopicConfig,
        mode: RecoveryMode,
    ) -> Result<Topic> {
        validate_name("topic", name)?;
        config.validate()?;
        set_aside_strays(&*storage, dir)?;
        // Taken for opened only once the state beside it is checked too
        // (see below).
        let mut log = Log::open_unmarked(Arc::clone(&storage), dir, config.log.clone(), mode)?;
        let checkpoint = log.opened_checkpoint().cloned();
        let point = |journal: &str| {
            let p = checkpoint.as_ref().and_then(|c| c.journal(journal));
            JournalRecovery {
                base_seq: p.map_or(0, |p| p.base_seq),
                synced_len: p.map_or(0, |p| p.synced_len),
                mode,
                // Only a recovery point bounds what may be unsynced.
                relaxed: checkpoint.is_some() && config.log.fsync != FsyncPolicy::Always,
                // Each kind of journal gives its own.
                payloads: None,
            }
        };
        let deletions = Deletions::open(Arc::clone(&storage), dir, point(DELETES_JOURNAL))?;
        // Made with the first group: a topic without groups has no folder
        // for them (a small topic costs fewer disk blocks).
        let groups_dir = dir.join(GROUPS_DIR);
        let mut groups = BTreeMap::new();
        let mut names = match storage.exists(&groups_dir) {
            true => storage
                .list_dir(&groups_dir)
                .ctx(|| format!("listing {}", groups_dir.display()))?,
            false => Vec::new(),
        };
        names.sort();
        // Every group the checkpoint lists must still have its journal file
        // (a snapshot alone is what a removal left; the groups are opened
        // from their journal files): a group deleted on purpose left the
        // list first.
        for listed in checkpoint.iter().flat_map(|c| &c.journals) {
            let Some(group_name) = listed.name.strip_prefix(GROUP_JOURNAL_PREFIX) else {
                continue;
            };
            if Journal::journal_file_exists(&*storage, &groups_dir, group_name) {
                continue;
            }
            let damage = crate::error::Corruption {
                file: groups_dir.join(format!("{group_name}.journal")),
                bytes: 0..0,
                offsets: None,
                detail: format!(
                    "group {group_name} of topic {name} is missing: its journal is gone, but the topic's \
                     checkpoint lists it. Start with recovery mode skip-damaged \
                     (`spool serve --recovery skip-damaged`) to give the group up"
                ),
            };
            if mode == RecoveryMode::TolerateTornTail {
                return Err(Error::corruption(damage));
            }
            tracing::error!(damage = %damage.given_up(), "giving up a missing group");
        }
        for file in names {
            let Some(group_name) = file.strip_suffix(".journal") else {
                continue;
            };
            let group = Group::open_checked(
                Arc::clone(&storage),
                &groups_dir,
                group_name,
                GroupConfig::new(GroupMode::Stream),
                log.stats().start.0,
                point(&format!("{GROUP_JOURNAL_PREFIX}{group_name}")),
            )?;
            let Some(group) = group else {
                set_aside(&*storage, dir, &groups_dir, group_name)?;
                tracing::error!(
                    topic = name,
                    group = group_name,
                    "giving up a group whose mode and settings were in the damaged state given up; \
                     its files are in quarantine/, create the group again"
                );
                continue;
            };
            groups.insert(group_name.to_owned(), group);
        }
        // An offset a group or a deletion speaks of was handed out: the log
        // must not give it to another message. Under fsync=always (and after
        // a clean stop) every such offset was synced, so a log that ends
        // before it was damaged; otherwise a power cut took unsynced
        // messages, and the log continues after them.
        let referenced = groups
            .values()
            .map(Group::referenced_end)
            .chain(deletions.set().iter().last().map(|r| r.end))
            .max()
            .unwrap_or(0);
        let end = log.end().0;
        if referenced > end {
            let synced = config.log.fsync == FsyncPolicy::Always
                || checkpoint.as_ref().is_some_and(|c| c.clean);
            if synced {
                log.ensure_end_at_least(
                    referenced,
                    mode,
                    "were handed out (group state or deletions speak of them)",
                )?;
            } else {
                tracing::warn!(
                    topic = name,
                    lost = ?(end..referenced),
                    "a power cut took messages that were written but not synced; their offsets are not reused"
                );
                log.skip_to(referenced)?;
            }
        }
        // Nothing refused the topic: its stop is no longer clean. (A refusal
        // leaves a clean checkpoint clean, so the next try judges the same
        // files by the same rules.)
        log.mark_opened()?;
        let stats = log.stats();
        for group in groups.values_mut() {
            group.clamp(stats.start.0, stats.end.0)?;
        }
        let config_check_ms = config.compact_check_ms;
        let topic = Topic {
            name: name.to_owned(),
            dir: dir.to_owned(),
            storage,
            config,
            log,
            groups: RwLock::new(
                groups
                    .into_iter()
                    .map(|(name, g)| (name, Arc::new(Mutex::new(g))))
                    .collect(),
            ),
            deletions: RwLock::new(deletions),
            gate: Gate::default(),
            // The first measure of a topic not open before in this run:
            // `compact_check_ms` after its open.
            compaction: Mutex::new(CompactionWatch::due_at(
                crate::storage::log::now_ms().saturating_add(config_check_ms),
            )),
        };
        // On a full disk the topic still opens for reading: the broker's
        // periodic checkpoint records these points once there is room, and
        // the log writes its own owed checkpoint before its first write.
        match topic.checkpoint() {
            Err(e @ Error::Full { .. }) => {
                tracing::warn!(topic = name, error = %e,
                    "checkpoint not written at open; it is written once the disk has room");
            }
            other => other?,
        }
        Ok(topic)
    }

    /// Records the recovery points of the topic's journals and the log's in
    /// the log's checkpoint (see [`crate::storage::checkpoint`]), when any
    /// moved. The broker calls this every few seconds.
    pub fn checkpoint(&self) -> Result<()> {
        // A deleted topic's folder is gone: nothing to record.
        let Some(_pass) = self.gate.enter() else {
            return Ok(());
        };
        let groups = self.groups();
        // Under the map's lock: a group deleted meanwhile cannot come back
        // into the list.
        let points = self.journal_points(&groups)?;
        self.log.store_checkpoint(Some(points), false)
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The topic's settings.
    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    /// The underlying log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Whether a failed sync made the log, the deletions or a group's state
    /// read-only. Such a topic stays open (read-only) until the broker
    /// restarts: closing and reopening it would read back pages the kernel
    /// may have dropped as if they were good.
    pub fn is_read_only(&self) -> bool {
        self.log.is_read_only()
            || self.deletions().is_read_only()
            || self
                .groups()
                .values()
                .any(|g| self.lock(g).map_or(true, |g| g.is_read_only()))
    }

    /// Whether the topic must stay open: a failed sync made it read-only,
    /// or a queue group has a lease or a delayed redelivery pending, which
    /// live only in memory (closing would hand a leased message to another
    /// member before its `ack_timeout_ms`).
    pub fn is_pinned(&self, now_ms: u64) -> bool {
        self.is_read_only()
            || self
                .groups()
                .values()
                .any(|g| self.lock(g).map_or(true, |g| g.has_timers(now_ms)))
    }

    /// Whether the topic has a group (without passing the gate: for a
    /// caller that closed it).
    pub(crate) fn has_groups(&self) -> bool {
        !self.groups().is_empty()
    }

    /// Files the topic keeps open: the active segment's log and its two
    /// indexes, the deletions journal and one journal per group (a sealed
    /// segment keeps only its map).
    pub fn open_files(&self) -> usize {
        3 + 1 + self.groups().len()
    }

    /// Extent and size of the log.
    pub fn stats(&self) -> LogStats {
        self.log.stats()
    }

    /// The gate every request on the topic passes. Deleting the topic closes
    /// it, which waits for the requests inside, so nothing writes into the
    /// topic's folder once it is moved away; later requests get `NOT_FOUND`.
    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Whether the topic was deleted (or is being deleted).
    pub fn is_retired(&self) -> bool {
        self.gate.is_closed()
    }

    /// Whether the topic is deleted for good (a delete that is only under
    /// way may still keep it).
    pub fn is_gone_for_good(&self) -> bool {
        self.gate.is_finished()
    }

    fn enter(&self) -> Result<Pass<'_>> {
        self.gate.enter().ok_or_else(|| {
            Error::TopicNotFound(format!(
                "topic {} does not exist: it was deleted",
                self.name
            ))
        })
    }

    fn groups(&self) -> RwLockReadGuard<'_, Groups> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn groups_mut(&self) -> RwLockWriteGuard<'_, Groups> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks one group.
    fn lock<'a>(&self, group: &'a Mutex<Group>) -> Result<MutexGuard<'a, Group>> {
        group.lock().map_err(|_| Error::ReadOnly {
            log: self.dir.clone(),
            cause: "a request panicked while changing group state".into(),
        })
    }

    /// The group `name` of `groups`.
    fn group(&self, groups: &Groups, name: &str) -> Result<Arc<Mutex<Group>>> {
        groups.get(name).cloned().ok_or_else(|| {
            // A name no group can have (empty, a space, a line break) is
            // quoted, so it shows, and cannot read as part of the message.
            Error::GroupNotFound(if name.is_empty() {
                format!(
                    "group \"\" of topic {} does not exist: no group has an empty name",
                    self.name
                )
            } else if validate_name("group", name).is_err() {
                format!(
                    "group {name:?} of topic {} does not exist (no group can have that name)",
                    self.name
                )
            } else {
                format!("group {name} of topic {} does not exist", self.name)
            })
        })
    }

    /// What tells group `name` as it is now from a group created under the
    /// same name after it was deleted (see [`Topic::is_group`]).
    pub(crate) fn group_identity(&self, name: &str) -> Result<GroupIdentity> {
        let groups = self.groups();
        Ok(GroupIdentity::of(&self.group(&groups, name)?))
    }

    /// Whether group `name` is still the one `identity` was taken from
    /// (not deleted, nor deleted and created again).
    pub(crate) fn is_group(&self, name: &str, identity: &GroupIdentity) -> bool {
        self.groups().get(name).is_some_and(|g| identity.is(g))
    }

    /// What a reader of group `name` gets once that group is gone, or
    /// deleted and created again (see [`GroupIdentity`]).
    pub(crate) fn group_replaced(&self, name: &str) -> Error {
        Error::GroupNotFound(format!("group {name} of topic {} was deleted", self.name))
    }

    /// Runs `f` on the group `name` under its lock.
    fn with_group<T>(&self, name: &str, f: impl FnOnce(&mut Group) -> Result<T>) -> Result<T> {
        self.with_group_as(name, None, f)
    }

    /// [`Topic::with_group`]; with `identity`, a group of that name other
    /// than the one it was taken from (deleted and created again) is
    /// [`Topic::group_replaced`].
    fn with_group_as<T>(
        &self,
        name: &str,
        identity: Option<&GroupIdentity>,
        f: impl FnOnce(&mut Group) -> Result<T>,
    ) -> Result<T> {
        let groups = self.groups();
        let group = self.group(&groups, name)?;
        if identity.is_some_and(|identity| !identity.is(&group)) {
            return Err(self.group_replaced(name));
        }
        let mut g = self.lock(&group)?;
        f(&mut g)
    }

    /// Fails unless group `name` exists and is a queue group (the message
    /// of every queue-only operation on a stream group).
    pub fn require_queue(&self, name: &str) -> Result<()> {
        let _pass = self.enter()?;
        self.with_group(name, |g| self.check_queue(g))
    }

    /// Fails unless `g` is a queue group.
    fn check_queue(&self, g: &Group) -> Result<()> {
        if g.config().mode != GroupMode::Queue {
            return Err(Error::InvalidArgument(format!(
                "group {} of topic {} is a stream group: commit offsets instead",
                g.name(),
                self.name
            )));
        }
        Ok(())
    }

    /// On `delete_when_consumed` topics with groups, what every group has
    /// completed (each group locked in turn); `None` otherwise.
    fn consumed(&self, groups: &Groups) -> Result<Option<RangeSet>> {
        self.consumed_or_wait(groups, Wait::Yes).unwrap_or_else(|| {
            Err(Error::Internal(
                "a look at the groups that may wait gave up without waiting".into(),
            ))
        })
    }

    /// [`Topic::consumed`]; with [`Wait::No`], `None` when a group is held.
    fn consumed_or_wait(&self, groups: &Groups, wait: Wait) -> Option<Result<Option<RangeSet>>> {
        if !self.config.delete_when_consumed || groups.is_empty() {
            return Some(Ok(None));
        }
        let mut all: Option<RangeSet> = None;
        for group in groups.values() {
            let g = match wait {
                Wait::Yes => self.lock(group),
                Wait::No => group.try_lock().ok().map(Ok)?,
            };
            let done = match g {
                Ok(g) => g.completed(),
                Err(e) => return Some(Err(e)),
            };
            all = Some(match all {
                None => done,
                Some(all) => all.intersection(&done),
            });
        }
        Some(Ok(all))
    }

    fn deletions(&self) -> RwLockReadGuard<'_, Deletions> {
        self.deletions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn deletions_mut(&self) -> RwLockWriteGuard<'_, Deletions> {
        self.deletions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a batch (durable under the topic's fsync policy).
    pub fn produce(&self, batch: &[NewMessage]) -> Result<Appended> {
        let _pass = self.enter()?;
        self.log.append(batch)
    }

    /// Group commit: writes each batch, then makes all that were written
    /// visible with one commit (one sync under `fsync=always`). `NOT_FOUND`
    /// for all of them once the topic is deleted.
    pub fn produce_batches<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a [NewMessage]>,
    ) -> Result<GroupCommit> {
        let _pass = self.enter()?;
        let written = self.log.write_batches(batches);
        let committed = written.iter().any(Result::is_ok).then(|| self.log.commit());
        Ok(GroupCommit { written, committed })
    }

    /// Syncs and publishes everything written to the log (a barrier under
    /// `fsync=never` and `interval`).
    pub fn sync_log(&self) -> Result<()> {
        let _pass = self.enter()?;
        self.log.sync()
    }

    /// The offset `position` stands for.
    pub fn resolve(&self, position: Position) -> Result<Offset> {
        let _pass = self.enter()?;
        let stats = self.log.stats();
        Ok(match position {
            Position::Earliest => stats.start,
            Position::Latest => stats.end,
            Position::Offset(o) => Offset(o.clamp(stats.start.0, stats.end.0)),
            Position::Timestamp(ts) => self.live_offset_for_timestamp(ts)?,
        })
    }

    /// The first message in offset order that readers see (not deleted or
    /// consumed by every group) with a timestamp ≥ `ts`; the end when there
    /// is none. One the time lookup lands on that readers do not see is
    /// passed, as compaction would remove it.
    fn live_offset_for_timestamp(&self, ts: u64) -> Result<Offset> {
        let found = self.log.offset_for_timestamp(ts)?;
        let mut from = found;
        loop {
            let live = self
                .read_within(from, DeliveryLimits::new(256, usize::MAX))?
                .to_messages();
            let Some(last) = live.last().map(|m| m.offset) else {
                return Ok(self.log.end());
            };
            // The one the lookup found is at or past `ts`; those after it
            // in offset order need not be.
            if let Some(m) = live
                .iter()
                .find(|m| m.offset == found || m.timestamp_ms >= ts)
            {
                return Ok(m.offset);
            }
            from = last.next();
        }
    }

    /// Replay without state: up to `max` live messages from `from` on
    /// (deleted and fully consumed ones are skipped).
    pub fn read(&self, from: Offset, max: usize, max_bytes: usize) -> Result<Vec<Message>> {
        self.read_within(from, DeliveryLimits::new(max, max_bytes))
            .map(|records| records.to_messages())
    }

    /// [`Topic::read`] for a delivery of at most `limits`, as records in
    /// place: stops before a message too large to deliver, or fails with
    /// [`Error::TooLarge`] naming it when it is the first.
    pub fn read_within(&self, from: Offset, limits: DeliveryLimits) -> Result<Records> {
        self.read_live(from, limits, Wait::Yes).unwrap_or_else(|| {
            Err(Error::Internal(
                "a read that may wait gave up without waiting".into(),
            ))
        })
    }

    /// [`Topic::read_within`] without waiting for the deletions or a group
    /// (a deletion is made durable under the deletions' lock, and a group's
    /// lock may be held across a sync of its state): `None` when someone
    /// holds them, and the read is then for the blocking pool. For reads on
    /// an async worker.
    pub fn try_read_within(&self, from: Offset, limits: DeliveryLimits) -> Option<Result<Records>> {
        self.read_live(from, limits, Wait::No)
    }

    fn read_live(
        &self,
        from: Offset,
        limits: DeliveryLimits,
        wait: Wait,
    ) -> Option<Result<Records>> {
        let _pass = match self.enter() {
            Ok(pass) => pass,
            Err(e) => return Some(Err(e)),
        };
        let start = from.0;
        'read: loop {
            let generation = self.log.generation();
            let mut from = start;
            let end = self.log.end().0;
            let live = loop {
                let mut batch =
                    match self
                        .log
                        .read_records(Offset(from), limits.messages, limits.bytes)
                    {
                        Ok(batch) => batch,
                        Err(e) => return Some(Err(e)),
                    };
                if batch.last_offset().is_none() {
                    return Some(Ok(batch));
                }
                let next = match self.keep_live(&mut batch, wait)? {
                    Ok(next) => next,
                    Err(e) => return Some(Err(e)),
                };
                if self.log.generation() != generation {
                    // Compaction replaced what was read and may have
                    // forgotten deletions of records in it: read again.
                    continue 'read;
                }
                // Nothing live read: on from past the whole run of deleted
                // (or consumed) offsets that follows, not record by record.
                match next {
                    Some(next) if next < end => from = next,
                    Some(_) => {
                        batch.pass_to(end);
                        break batch;
                    }
                    None => break batch,
                }
            };
            return Some(fit(live, Offset(from), limits));
        }
    }

    /// Reads from `from` within `limits` what [`Topic::read_within`] would
    /// read first, CRCs checked, ahead of the fetch that will want it: see
    /// [`Topic::read_within_ahead`].
    pub fn read_ahead(&self, from: Offset, limits: DeliveryLimits) -> Result<ReadAhead> {
        let _pass = self.enter()?;
        let generation = self.log.generation();
        let end = self.log.end().0;
        let records = self.log.read_records(from, limits.messages, limits.bytes)?;
        Ok(ReadAhead {
            from,
            limits,
            records,
            generation,
            end,
        })
    }

    /// [`Topic::read_within`] from what `ahead` read, with deletions and
    /// consumption as they are now; `None` when a read must go to the log
    /// instead: `ahead` was read elsewhere or with limits that do not cover
    /// `limits` ([`DeliveryLimits::covers`]), segments
    /// were dropped or rewritten since, the log has grown past a read that
    /// reached its end, or nothing it read is live.
    pub fn read_within_ahead(
        &self,
        from: Offset,
        limits: DeliveryLimits,
        ahead: ReadAhead,
    ) -> Option<Result<Records>> {
        let ReadAhead {
            from: read_from,
            limits: read_limits,
            mut records,
            generation,
            end,
        } = ahead;
        if read_from != from || !read_limits.covers(&limits) {
            return None;
        }
        // A read of fewer messages (bytes the same) reads a prefix.
        records.truncate(limits.messages);
        let reached_end = records.last_offset().is_none_or(|o| o.0 + 1 >= end);
        if generation != self.log.generation() || (reached_end && self.log.end().0 > end) {
            return None;
        }
        let live = match self.enter() {
            Ok(_pass) => self.keep_live(&mut records, Wait::No)?.map(|_| records),
            Err(e) => Err(e),
        };
        if generation != self.log.generation() {
            // Replaced while deletions were applied, which compaction may
            // have pruned of records in `records`.
            return None;
        }
        match live {
            Ok(live) if live.is_empty() && !reached_end => None,
            Ok(live) => Some(fit(live, from, limits)),
            Err(e) => Some(Err(e)),
        }
    }

    /// Drops from `batch` what is deleted or consumed by every group (under
    /// `delete_when_consumed`). With [`Wait::No`], `None` (nothing dropped)
    /// when the groups, a group or the deletions are held by someone else.
    /// When nothing in `batch` is live: the first offset after it that may
    /// be (past the deleted or consumed ones that follow), where a reader
    /// goes on.
    fn keep_live(&self, batch: &mut Records, wait: Wait) -> Option<Result<Option<u64>>> {
        let groups = match wait {
            Wait::Yes => self.groups(),
            Wait::No => self.groups.try_read().ok()?,
        };
        let consumed = match self.consumed_or_wait(&groups, wait)? {
            Ok(consumed) => consumed,
            Err(e) => return Some(Err(e)),
        };
        let deletions = match wait {
            Wait::Yes => self.deletions(),
            Wait::No => self.deletions.try_read().ok()?,
        };
        batch.retain(|o| {
            !(deletions.contains(o) || consumed.as_ref().is_some_and(|c| c.contains(o)))
        });
        let next = batch
            .passed()
            .map(|p| first_live(p.0, deletions.set(), consumed.as_ref()));
        Some(Ok(next))
    }

    /// What makes a group's changes durable as the fsync policy says
    /// (`always`: the returned wait, once the topic's lock is let go, so
    /// acks and commits of all connections share one sync; `interval`: the
    /// next [`Topic::tick`]; `never`: nothing).
    fn persist_group(&self, group: &mut Group) -> Result<Option<SyncWait>> {
        match self.config.log.fsync {
            FsyncPolicy::Always => group.sync_later().map(Some),
            _ => Ok(None),
        }
    }

    /// Periodic work under `fsync=interval`: every tick syncs whatever the
    /// log holds unsynced, then any unsynced group or deletion state (acks
    /// and commits arrive without new messages too), so nothing confirmed
    /// waits past the next tick.
    pub fn tick(&self) -> Result<()> {
        let _pass = self.enter()?;
        if let FsyncPolicy::Interval(_) = self.config.log.fsync {
            // The log first: state rarely stands on messages a cut takes
            // back (and a group forgets what it completed past the log's end
            // when it opens). The state also when the log cannot sync.
            let log = self.log.sync_written();
            self.sync_state()?;
            match log {
                // Said once, when the sync failed: a tick on a read-only
                // log has nothing new to report.
                Err(Error::ReadOnly { .. }) => {}
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }

    /// Creates a group starting at `start`; fails if it exists.
    pub fn create_group(&self, name: &str, mode: GroupMode, start: Position) -> Result<GroupInfo> {
        let _pass = self.enter()?;
        validate_name("group", name)?;
        if mode == GroupMode::Queue {
            // A queue group dead-letters; a topic named near the length
            // limit has no room for the default `<topic>.dlq`.
            let dlq = self.config.dead_letter_topic(&self.name);
            if dlq.len() > MAX_NAME_LEN {
                return Err(Error::InvalidArgument(format!(
                    "queue group {name}: the dead letters of topic {} would go to topic {dlq}, \
                     a name over {MAX_NAME_LEN} characters; give the topic a dead_letter \
                     setting or a name of {} characters at most",
                    self.name,
                    MAX_NAME_LEN - ".dlq".len()
                )));
            }
        }
        let start = self.resolve(start)?.0;
        let mut groups = self.groups_mut();
        if groups.contains_key(name) {
            return Err(Error::AlreadyExists(format!(
                "group {name} of topic {} exists",
                self.name
            )));
        }
        self.retire_consumed(&groups)?;
        let config = GroupConfig {
            mode,
            ack_timeout_ms: self.config.ack_timeout_ms,
            max_deliveries: self.config.max_deliveries,
        };
        let groups_dir = self.dir.join(GROUPS_DIR);
        if !self.storage.exists(&groups_dir) {
            // The topic's first group: its folder's name is durable before
            // the group is confirmed.
            self.storage
                .create_dir_all(&groups_dir)
                .ctx(|| format!("creating {}", groups_dir.display()))?;
            self.storage
                .sync_dir(&self.dir)
                .ctx(|| format!("syncing {}", self.dir.display()))?;
        }
        // A group the topic does not list has no state: files of that name
        // are what a crash left of deleting an earlier group of that name.
        Journal::remove_files(&*self.storage, &groups_dir, name)?;
        let mut group = match Group::open(
            Arc::clone(&self.storage),
            &groups_dir,
            name,
            config,
            start,
        ) {
            Ok(group) => group,
            Err(e) => {
                // Nothing of a group the answer says was not created
                // stays behind (the next open would take its files for
                // what a crash left, and set them aside).
                if let Err(removed) = Journal::remove_files(&*self.storage, &groups_dir, name) {
                    tracing::warn!(topic = %self.name, group = name, error = %removed,
                            "could not clear away the files of a group whose creation failed; the next open sets any left aside");
                }
                return Err(e);
            }
        };
        group.heard_start(self.log.start().0);
        let info = group.info(self.log_range(), self.deletions().set(), timer_ms());
        groups.insert(name.to_owned(), Arc::new(Mutex::new(group)));
        Ok(info)
    }

    /// Opens `name`, creating it with `mode` at `start` if missing; an existing
    /// group must have that mode.
    pub fn ensure_group(&self, name: &str, mode: GroupMode, start: Position) -> Result<GroupInfo> {
        match self.describe_group(name) {
            Ok(info) if info.mode == mode => Ok(info),
            Ok(info) => Err(Error::InvalidArgument(format!(
                "group {name} of topic {} is a {} group, not {mode}",
                self.name, info.mode
            ))),
            Err(Error::GroupNotFound(_)) => match self.create_group(name, mode, start) {
                Err(Error::AlreadyExists(_)) => self.ensure_group(name, mode, start),
                other => other,
            },
            Err(e) => Err(e),
        }
    }

    /// The offsets the log holds, for a group's [`Group::info`].
    fn log_range(&self) -> std::ops::Range<u64> {
        let stats = self.log.stats();
        stats.start.0..stats.end.0
    }

    /// What a group looks like.
    pub fn describe_group(&self, name: &str) -> Result<GroupInfo> {
        let _pass = self.enter()?;
        let log = self.log_range();
        self.with_group(name, |g| {
            Ok(g.info(log.clone(), self.deletions().set(), timer_ms()))
        })
    }

    /// Group `name`'s mode and committed offset (a queue group's low
    /// watermark), without waiting: `None` when the topic's groups or this
    /// group are held by someone else (a group's lock may be held across a
    /// sync of its state); the caller then asks where waiting holds up
    /// nothing.
    pub fn try_group_start(&self, name: &str) -> Option<Result<(GroupMode, u64)>> {
        self.try_with_group(name, |g| Ok((g.config().mode, g.committed())))
    }

    /// [`Topic::with_group`] without waiting: `None` when the topic's
    /// groups or the group are held by someone else.
    fn try_with_group<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Group) -> Result<T>,
    ) -> Option<Result<T>> {
        let _pass = match self.enter() {
            Ok(pass) => pass,
            Err(e) => return Some(Err(e)),
        };
        let groups = self.groups.try_read().ok()?;
        let group = match self.group(&groups, name) {
            Ok(group) => group,
            Err(e) => return Some(Err(e)),
        };
        let mut g = group.try_lock().ok()?;
        Some(f(&mut g))
    }

    /// Group `name`'s mode.
    pub fn group_mode(&self, name: &str) -> Result<GroupMode> {
        let _pass = self.enter()?;
        self.with_group(name, |g| Ok(g.config().mode))
    }

    /// All groups.
    pub fn list_groups(&self) -> Result<Vec<GroupInfo>> {
        let _pass = self.enter()?;
        let groups = self.groups();
        let log = self.log_range();
        groups
            .values()
            .map(|g| {
                Ok(self
                    .lock(g)?
                    .info(log.clone(), self.deletions().set(), timer_ms()))
            })
            .collect()
    }

    /// Deletes a group and its state.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let _pass = self.enter()?;
        let mut groups = self.groups_mut();
        self.group(&groups, name)?;
        self.retire_consumed(&groups)?;
        if let Some(group) = groups.remove(name) {
            // The checkpoint forgets the group before its journal goes, so
            // the removal is never taken for a loss.
            let forgotten = self
                .journal_points(&groups)
                .and_then(|points| self.log.store_checkpoint(Some(points), false));
            if let Err(e) = forgotten {
                // Nothing removed: the group stays, whole, for a retry (the
                // next checkpoint lists it again).
                groups.insert(name.to_owned(), group);
                return Err(e);
            }
            // A request still holding the group writes to the removed files.
            self.lock(&group)?.remove_files()?;
        }
        Ok(())
    }

    pub(crate) fn check_offsets(&self, offsets: &[Offset]) -> Result<()> {
        let end = self.log.end().0;
        match offsets.iter().find(|o| o.0 >= end) {
            Some(o) => Err(Error::InvalidArgument(format!(
                "offset {o} of topic {} is past its end ({end})",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Moves a group to `position`: a stream group reads and commits from
    /// there; a queue group treats everything before it as done and everything
    /// from it on as pending. Returns the offset.
    pub fn seek(&self, group: &str, position: Position) -> Result<Offset> {
        let _pass = self.enter()?;
        let offset = self.resolve(position)?.0;
        self.move_group(group, |g| {
            g.commit(offset)?;
            g.set_cursor(offset);
            Ok(())
        })?;
        Ok(Offset(offset))
    }

    /// Moves group `name` with `f` where it may go back (a seek, a commit
    /// below the committed offset): records what every group consumed, then
    /// moves, both under the groups' write lock, so no ack or commit can
    /// come between and make an offset consumed by every group that the
    /// move then shows again. Waits for the group's state to be durable
    /// under `fsync=always`.
    fn move_group(&self, name: &str, f: impl FnOnce(&mut Group) -> Result<()>) -> Result<()> {
        let durable = {
            let groups = self.groups_mut();
            let group = self.group(&groups, name)?;
            self.retire_consumed(&groups)?;
            let mut g = self.lock(&group)?;
            f(&mut g)?;
            self.persist_group(&mut g)?
        };
        durable.map_or(Ok(()), SyncWait::wait)
    }

    /// Deletes messages: they are never delivered or replayed again.
    pub fn delete(&self, offsets: &[Offset]) -> Result<()> {
        let _pass = self.enter()?;
        self.check_offsets(offsets)?;
        let ranges: Vec<_> = offsets.iter().map(|o| o.0..o.0 + 1).collect();
        let durable = {
            let mut deletions = self.deletions_mut();
            deletions.record(&ranges)?;
            deletions.sync_later()
        };
        // Confirmed once durable under fsync=always; the sync runs outside
        // the lock, so readers go on meanwhile.
        match self.config.log.fsync {
            FsyncPolicy::Always => durable.wait(),
            _ => Ok(()),
        }
    }

    /// Whether `offset` is explicitly deleted.
    pub fn is_deleted(&self, offset: Offset) -> Result<bool> {
        let _pass = self.enter()?;
        Ok(self.deletions().contains(offset.0))
    }

    /// The lowest offset any group still needs (None without groups):
    /// neither completed by that group nor deleted.
    pub fn needed_offset(&self) -> Result<Option<Offset>> {
        let _pass = self.enter()?;
        let groups = self.groups();
        let mut needed: Option<u64> = None;
        for group in groups.values() {
            let g = self.lock(group)?;
            let deletions = self.deletions();
            let mut o = g.committed();
            loop {
                let next = g.first_not_done(deletions.set().first_gap_from(o));
                if next == o {
                    break;
                }
                o = next;
            }
            needed = Some(needed.map_or(o, |n| n.min(o)));
        }
        Ok(needed.map(Offset))
    }

    /// Applies retention (see [`Log::enforce_retention_within`]): with
    /// `retention_respects_groups`, segments holding messages some group has
    /// not completed stay until they are twice `retention_ms` old or the log
    /// is over `retention_bytes_max`. A log over `retention_bytes_max` drops
    /// its oldest sealed segments in any case. Groups behind the new start
    /// go on from it and count what they lost. Returns the bases of dropped
    /// segments.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<Vec<Offset>> {
        let _pass = self.enter()?;
        let log = &self.config.log;
        if log.retention_bytes.is_none()
            && log.retention_ms.is_none()
            && self.config.retention_bytes_max.is_none()
        {
            return Ok(Vec::new());
        }
        let limits = if self.config.retention_respects_groups {
            let mut floor = self.needed_offset()?.map(|o| o.0);
            // The floor stands on completions that may be in memory only:
            // durable before a segment goes for them, or a power cut would
            // take the completions back and leave the group past messages
            // it never durably completed, gone. If they cannot be made
            // durable (a full disk), only the hard limits apply.
            if floor.is_some()
                && let Err(e) = self.sync_state()
            {
                tracing::warn!(topic = %self.name, error = %e,
                    "group state not synced: retention applies only its hard limits");
                floor = Some(0);
            }
            RetentionLimits {
                floor,
                hard_bytes: self.config.retention_bytes_max,
                hard_age_ms: log.retention_ms.map(|ms| ms.saturating_mul(2)),
            }
        } else {
            RetentionLimits {
                hard_bytes: self.config.retention_bytes_max,
                ..RetentionLimits::default()
            }
        };
        // The groups hear of the new start, durably, before any segment
        // goes: a crash in between leaves them past messages the next pass
        // drops, never behind a drop they missed (which no later pass would
        // count).
        let mut told = None;
        let dropped = self.log.enforce_retention_told(now_ms, limits, |start| {
            told = Some((start.0, self.tell_groups_of_start(start.0)));
        })?;
        if let Some((start, failed)) = told {
            // Once more after the drop, for a group that could not hear
            // before it (a full disk, with room now) or was made meanwhile
            // below the new start: those told already count nothing again.
            let again = self.tell_groups_of_start(start);
            if let Some(e) = failed.and(again) {
                return Err(e);
            }
        }
        if !dropped.is_empty() {
            tracing::info!(topic = %self.name, segments = dropped.len(),
                start = self.log.stats().start.0, "retention dropped segments");
        }
        Ok(dropped)
    }

    /// Tells every group that retention moves the log's start to `start`
    /// (see [`Group::lose_below`]), also after one failed (a full disk):
    /// that one counts what it missed at the next pass. Returns the first
    /// failure.
    fn tell_groups_of_start(&self, start: u64) -> Option<Error> {
        let groups = self.groups();
        let mut failed = None;
        for (group, g) in groups.iter() {
            let lost = self
                .lock(g)
                .and_then(|mut g| g.lose_below(start, self.deletions().set()));
            match lost {
                Ok(0) => {}
                Ok(lost) => tracing::warn!(topic = %self.name, %group, lost, start,
                    "retention dropped messages the group had not completed"),
                Err(e) => {
                    tracing::warn!(topic = %self.name, %group, error = %e,
                        "a group did not hear of a retention pass; the next pass tells it");
                    failed.get_or_insert(e);
                }
            }
        }
        failed
    }

    /// On `delete_when_consumed` topics, records what every group has
    /// completed as deleted, before a change to the set of groups (a new or a
    /// removed group) or a move back (a seek) could make it visible again.
    fn retire_consumed(&self, groups: &Groups) -> Result<()> {
        let Some(mut consumed) = self.consumed(groups)? else {
            return Ok(());
        };
        // From the lowest offset a power cut could bring back, not from the
        // start: a segment retention or compaction is dropping right now
        // comes back if the cut lands before its files are durably gone,
        // and what every group consumed in it must stay gone.
        consumed.remove_below(self.log.recoverable_start().0);
        consumed.remove_from(self.log.end().0);
        let mut deletions = self.deletions_mut();
        let new: Vec<_> = consumed
            .iter()
            .filter(|r| deletions.set().count_in(r.clone()) < r.end - r.start)
            .collect();
        deletions.record(&new)?;
        // Durable before the change it guards, whatever the fsync policy:
        // what was recorded here, and also consumed offsets skipped above as
        // already deleted in memory, whose deletion may not be durable yet
        // (an explicit delete under `interval` or `never`). Without it the
        // change would outlive the deletion, and a power cut would show those
        // offsets to the new group (or the one moved back) as if never
        // consumed.
        if consumed.is_empty() {
            return Ok(());
        }
        deletions.wait_durable()
    }

    /// Syncs group and deletion state (the log is synced separately).
    pub fn sync_state(&self) -> Result<()> {
        let _pass = self.enter()?;
        // Deletions first: completions may stand on them.
        let deletions = self.deletions().sync_later();
        let waits = {
            let groups = self.groups();
            groups
                .values()
                .map(|g| self.lock(g)?.sync_later())
                .collect::<Result<Vec<_>>>()?
        };
        // The syncs run outside the locks: readers and acks go on.
        deletions.wait()?;
        waits.into_iter().try_for_each(SyncWait::wait)
    }

    /// The recovery points of the topic's journals, as the checkpoint names
    /// them (each group locked in turn, then the deletions).
    fn journal_points(&self, groups: &Groups) -> Result<Vec<JournalPoint>> {
        let point = |name: String, (base_seq, synced_len): (u64, u64)| JournalPoint {
            name,
            base_seq,
            synced_len,
        };
        let mut points = Vec::with_capacity(groups.len() + 1);
        for (name, g) in groups {
            let at = self.lock(g)?.recovery_point();
            points.push(point(format!("{GROUP_JOURNAL_PREFIX}{name}"), at));
        }
        points.push(point(
            DELETES_JOURNAL.to_owned(),
            self.deletions().recovery_point(),
        ));
        Ok(points)
    }

    /// Syncs log and state, log first, and records a clean stop; the next
    /// open finds no recovery work.
    pub fn close(self) -> Result<()> {
        self.stop()
    }

    /// [`Topic::close`] for a topic others may still hold: the broker's last
    /// step once nothing writes to it any more.
    pub fn stop(&self) -> Result<()> {
        let Some(_pass) = self.gate.enter() else {
            return Ok(());
        };
        // A compaction pass must not swap segments after the clean
        // checkpoint below.
        self.log.stop_compaction();
        let log = self.log.sync();
        // The state whatever became of the log: a read-only log (a sync
        // failed) leaves confirmed acks, commits and deletions confirmed.
        self.deletions_mut().sync()?;
        let groups = self.groups();
        for group in groups.values() {
            self.lock(group)?.sync()?;
        }
        // Not a clean stop then: the next start checks the topic.
        log?;
        let points = self.journal_points(&groups)?;
        self.log.store_checkpoint(Some(points), true)
    }
}

/// A clean stop lists every group of the topic in `dir` in its checkpoint:
/// a journal in `groups/` it does not list was not written by the topic
/// and is no group. Each goes, with any snapshot of its name, to the
/// topic's `quarantine/` folder, before the log's open replaces that
/// checkpoint (after which nothing would tell it from a group); if one
/// cannot be moved, the topic does not open, and the checkpoint stays for
/// the next try.
fn set_aside_strays(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let groups_dir = dir.join(GROUPS_DIR);
    if !storage.exists(&groups_dir) {
        return Ok(());
    }
    // A checkpoint that does not load is the log's open to judge.
    let Ok(Some(checkpoint)) = crate::storage::checkpoint::Checkpoint::load(storage, dir) else {
        return Ok(());
    };
    if !checkpoint.clean {
        return Ok(());
    }
    let names = storage
        .list_dir(&groups_dir)
        .ctx(|| format!("listing {}", groups_dir.display()))?;
    for file in names {
        let Some(group) = file.strip_suffix(".journal") else {
            continue;
        };
        if checkpoint
            .journal(&format!("{GROUP_JOURNAL_PREFIX}{group}"))
            .is_none()
        {
            set_aside(storage, dir, &groups_dir, group)?;
            tracing::warn!(file = %groups_dir.join(&file).display(),
                "a journal the topic's clean stop did not list is no group of the topic; moved to quarantine/");
        }
    }
    Ok(())
}

/// Moves the files of group journal `name` in `groups_dir` (its journal and
/// any snapshot) into the topic's `quarantine/` folder, durably, under names
/// no earlier one took.
fn set_aside(storage: &dyn Storage, dir: &Path, groups_dir: &Path, name: &str) -> Result<()> {
    let quarantine = crate::storage::recovery::quarantine_dir(storage, dir)?;
    let stamp = crate::storage::log::now_ms();
    for ext in ["journal", "snap"] {
        let from = groups_dir.join(format!("{name}.{ext}"));
        if storage.exists(&from) {
            let to = quarantine.join(format!("group-{name}.{stamp}.{ext}"));
            storage
                .rename(&from, &to)
                .ctx(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
    }
    for folder in [groups_dir, &quarantine] {
        storage
            .sync_dir(folder)
            .ctx(|| format!("syncing {}", folder.display()))?;
    }
    Ok(())
}

/// Prefix of a group journal's name in the checkpoint.
const GROUP_JOURNAL_PREFIX: &str = "groups/";

/// The first offset at or after `from` neither in `deletions` nor in
/// `consumed`.
fn first_live(mut from: u64, deletions: &RangeSet, consumed: Option<&RangeSet>) -> u64 {
    loop {
        let past_deleted = deletions.first_gap_from(from);
        let next = consumed.map_or(past_deleted, |c| c.first_gap_from(past_deleted));
        if next == from {
            return from;
        }
        from = next;
    }
}

/// `live` cut before the first message larger than one delivery may carry;
/// [`Error::TooLarge`] naming it when it is the first (`from`: where the
/// read started, for an empty cut).
fn fit(mut live: Records, from: Offset, limits: DeliveryLimits) -> Result<Records> {
    let too_large = live
        .payload_lens()
        .position(|size| size > limits.message_bytes);
    if let Some(i) = too_large {
        if i == 0 {
            return Err(Error::TooLarge {
                offset: live.first_offset().map_or(from.0, |o| o.0),
                size: live.payload_lens().next().unwrap_or_default(),
                limit: limits.message_bytes,
            });
        }
        live.truncate(i);
    }
    Ok(live)
}

/// A nack's `delay_ms`: at most `MAX_DURATION_MS` (100 years).
pub(crate) fn check_delay(delay_ms: u64) -> Result<()> {
    if delay_ms > crate::storage::config::MAX_DURATION_MS {
        return Err(Error::InvalidArgument(format!(
            "delay_ms {delay_ms} is over {} (100 years)",
            crate::storage::config::MAX_DURATION_MS
        )));
    }
    Ok(())
}
