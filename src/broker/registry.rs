//! The topics of one data directory: opening them all at start, creating
//! (explicitly or on first produce), deleting, and, for use without a
//! running broker, the cross-topic step of a queue fetch (dead letters go to
//! another topic before they are completed).
//!
//! Creating and deleting are one rename each, so a crash or a failure at any
//! point leaves the topic either fully there or not there at all: a new
//! topic's folder is assembled in `staging/` and renamed into `topics/` once
//! its `topic.toml` is durable; a deleted one is renamed into `trash/` once no
//! request is inside it (see [`crate::broker::gate`]), then removed in the
//! background.

use super::config::{MAX_NAME_LEN, TOPIC_CONFIG_FILE, TopicConfig, validate_name};
use super::runtime::{retention_check_interval, retention_pass};
use super::topic::{CompactionWatch, DeliveryLimits, QueueFetch, Topic};
use crate::error::{Error, IoContext, Result};
use crate::metrics::{Cleanup, Metrics};
use crate::storage::compact::{CompactStats, Dirt};
use crate::storage::log::{now_ms, timer_ms};
use crate::storage::{DataDir, RecoveryMode};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Most threads [`Registry::stop_all`] stops topics with.
pub const STOP_THREADS: usize = 16;

/// How long after an open for its upkeep failed a closed topic is due
/// again.
pub const CLOSED_UPKEEP_RETRY_MS: u64 = 30_000;

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Config of topics created without one.
    pub defaults: TopicConfig,
    /// Create unknown topics on first produce.
    pub auto_create: bool,
    /// How opening logs treats damage.
    pub recovery: RecoveryMode,
    /// Keep topics up while they are closed (a broker): apply a topic's
    /// retention as it opens, and know when a closed topic's retention or
    /// background compaction is due ([`Registry::upkeep_due`]). Off for
    /// offline tools, which change only what they are asked to.
    pub upkeep: bool,
    /// Where retention applied at open is counted (a broker's metrics).
    pub metrics: Option<Metrics>,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            defaults: TopicConfig::default(),
            auto_create: true,
            recovery: RecoveryMode::default(),
            upkeep: true,
            metrics: None,
        }
    }
}

/// All topics of a locked data directory. A topic is open (its files in
/// use) only while it is used: [`Registry::topic`] opens a closed one,
/// recovering it, and [`Registry::close_unused`] closes one nobody holds,
/// with a clean stop, so its next open has nothing to recover. Opening the
/// registry opens no topic: it lists their folders.
#[derive(Debug)]
pub struct Registry {
    data: DataDir,
    options: RegistryOptions,
    topics: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// Names of the open topics.
    open: Mutex<BTreeSet<String>>,
    /// Whether the last run ended with a clean stop of every topic.
    clean_start: bool,
    /// Wakes whoever bounds the open topics (see [`Registry::opened`]).
    opened: Arc<tokio::sync::Notify>,
    /// Topics whose config has `delete_when_idle_ms`.
    idle_deletable: Mutex<BTreeSet<String>>,
    /// Topics whose last close for being unused went without its clean
    /// checkpoint (a full disk refused it): [`Registry::stop_all`] opens
    /// them again to write it, or the stop is not clean.
    closed_unclean: Mutex<BTreeSet<String>>,
    /// The last topic [`Registry::upkeep_due`] took.
    upkeep_cursor: Mutex<String>,
    /// Set as [`Registry::stop_all`] starts: closed topics get no more
    /// upkeep.
    stopping: AtomicBool,
    /// Opens from disk under way, at most [`OPENERS`]: each holds files
    /// of its own while it reads and checkpoints, on top of the open
    /// topics' budget, until the sweep that keeps the budget catches up.
    openers: (Mutex<usize>, std::sync::Condvar),
    /// [`Registry::closed_upkeep`] calls under way, which the final stop
    /// waits for.
    upkeeps: (Mutex<usize>, std::sync::Condvar),
}

/// `m`'s guard, also after a panic while it was held.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most topics opened from disk at once.
const OPENERS: usize = 4;

/// One counted in a count and its condition (a place among the
/// [`OPENERS`], an upkeep under way), given back when dropped.
struct Counted<'a>(&'a (Mutex<usize>, std::sync::Condvar));

impl<'a> Counted<'a> {
    fn new(counter: &'a (Mutex<usize>, std::sync::Condvar)) -> Counted<'a> {
        *lock(&counter.0) += 1;
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let (count, changed) = self.0;
        *lock(count) -= 1;
        changed.notify_all();
    }
}

/// A topic's place in the registry.
#[derive(Debug)]
struct Slot {
    /// The topic while open.
    topic: Mutex<Option<Arc<Topic>>>,
    /// When a request last used it ([`timer_ms`]).
    last_used: AtomicU64,
    /// Its config, once read (kept while it is closed).
    config: Mutex<Option<TopicConfig>>,
    /// Set once the topic is being deleted, or its creation failed: the
    /// slot is leaving the registry and must not open anything.
    gone: AtomicBool,
    /// While the topic is closed: when its retention is due to drop
    /// something or its background compaction to measure it again
    /// (milliseconds since the epoch; 0: neither is).
    upkeep_due: AtomicU64,
    /// While the topic is closed: what background compaction knew of it,
    /// for its next open.
    compaction: Mutex<Option<CompactionWatch>>,
    /// Set by [`Registry::upkeep_due`] when it took the topic with its
    /// compaction measure due (not its retention alone).
    measure_due: AtomicBool,
}

impl Slot {
    fn new(now: u64, config: Option<TopicConfig>) -> Arc<Slot> {
        Arc::new(Slot {
            topic: Mutex::new(None),
            last_used: AtomicU64::new(now),
            config: Mutex::new(config),
            gone: AtomicBool::new(false),
            upkeep_due: AtomicU64::new(0),
            compaction: Mutex::new(None),
            measure_due: AtomicBool::new(false),
        })
    }

    fn topic(&self) -> MutexGuard<'_, Option<Arc<Topic>>> {
        self.topic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self) -> MutexGuard<'_, Option<TopicConfig>> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// An open topic as [`Registry::open_topics`] lists it.
#[derive(Debug, Clone)]
pub struct OpenTopic {
    /// Its name.
    pub name: String,
    /// When a request last used it ([`timer_ms`]).
    pub last_used_ms: u64,
    /// Files it keeps open (see [`Topic::open_files`]).
    pub files: usize,
    /// It must stay open for now (see [`Topic::is_pinned`]).
    pub pinned: bool,
}

/// What a conditional delete did.
#[derive(Debug)]
pub enum Deletion {
    /// Deleted; the topic object if it was open (closed for good now).
    Deleted(Option<Arc<Topic>>),
    /// Kept: its condition no longer held.
    Kept,
}

/// What the start-up scan of [`Registry::scan`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scanned {
    /// Topics looked at.
    pub topics: usize,
    /// Topics recovered: not closed cleanly, or a damaged checkpoint.
    pub recovered: usize,
    /// Topics whose config cannot be read or that could not be opened (damage, a full disk...), each logged.
    pub failed: usize,
}

fn not_found(name: &str) -> Error {
    // A name no topic can have (empty, a space) is quoted, so it shows.
    if crate::broker::config::validate_name("topic", name).is_err() {
        return Error::TopicNotFound(format!(
            "topic {name:?} does not exist (no topic can have that name)"
        ));
    }
    Error::TopicNotFound(format!("topic {name} does not exist"))
}

impl Registry {
    /// Opens the registry of `data`: lists its topics and opens none (see
    /// [`Registry::topic`]). Whether the last run stopped cleanly is taken
    /// from the data directory's marker ([`DataDir::take_clean_stop`]).
    pub fn open(data: DataDir, options: RegistryOptions) -> Result<Registry> {
        data.clear_leftovers()?;
        data.make_scratch_folders();
        let clean_start = data.take_clean_stop()?;
        let now = timer_ms();
        let mut topics = BTreeMap::new();
        for name in data.topics()? {
            if validate_name("topic", &name).is_err() {
                tracing::warn!(folder = %data.topic_dir(&name).display(), "ignoring folder that is not a topic name");
                continue;
            }
            topics.insert(name, Slot::new(now, None));
        }
        Ok(Registry {
            data,
            options,
            topics: RwLock::new(topics),
            open: Mutex::new(BTreeSet::new()),
            clean_start,
            opened: Arc::new(tokio::sync::Notify::new()),
            idle_deletable: Mutex::new(BTreeSet::new()),
            closed_unclean: Mutex::new(BTreeSet::new()),
            upkeep_cursor: Mutex::new(String::new()),
            stopping: AtomicBool::new(false),
            openers: (Mutex::new(0), std::sync::Condvar::new()),
            upkeeps: (Mutex::new(0), std::sync::Condvar::new()),
        })
    }

    /// Waits for a place among the [`OPENERS`]; the guard gives it back.
    fn opener(&self) -> Counted<'_> {
        let (count, freed) = &self.openers;
        let mut n = lock(count);
        while *n >= OPENERS {
            n = freed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Counted(&self.openers)
    }

    /// Opens every topic, as [`Registry::open`] and then [`Registry::topic`]
    /// on each: for tools and tests that want all damage found up front.
    pub fn open_all(data: DataDir, options: RegistryOptions) -> Result<Registry> {
        let registry = Registry::open(data, options)?;
        for name in registry.names() {
            registry.topic(&name)?;
        }
        Ok(registry)
    }

    /// The data directory.
    pub fn data(&self) -> &DataDir {
        &self.data
    }

    /// Whether the last run ended with a clean stop (the marker of
    /// [`DataDir::mark_clean_stop`] was there): no topic needs recovery.
    pub fn clean_start(&self) -> bool {
        self.clean_start
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.topics.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.topics.write().unwrap_or_else(|p| p.into_inner())
    }

    fn open_names(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `slot` is still the one of `name`.
    fn holds(&self, name: &str, slot: &Arc<Slot>) -> bool {
        self.read_topics()
            .get(name)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>> {
        self.read_topics()
            .get(name)
            .filter(|slot| !slot.is_gone())
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    /// Whether topic `name` exists and is not being deleted.
    pub fn is_known(&self, name: &str) -> bool {
        self.slot(name).is_ok()
    }

    /// The topic `name` (not one being deleted), opened (and recovered) if
    /// it was closed; counts as a use of it.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        let slot = self.slot(name)?;
        slot.last_used.store(timer_ms(), Ordering::Relaxed);
        self.open_slot(name, &slot)
    }

    /// The topic `name` if it is open (not opening it), counted as a use.
    /// Never waits: `None` also while the topic is being opened or closed
    /// (then [`Registry::topic`] waits for that, off the async workers).
    pub fn used_open_topic(&self, name: &str) -> Option<Arc<Topic>> {
        let slot = self.slot(name).ok()?;
        let topic = match slot.topic.try_lock() {
            Ok(open) => open.as_ref().filter(|t| !t.is_retired()).cloned()?,
            Err(_) => return None,
        };
        slot.last_used.store(timer_ms(), Ordering::Relaxed);
        Some(topic)
    }

    /// Counts a use of topic `name` now (a subscription or long-poll that
    /// holds it, which makes no request while it waits).
    pub fn touch(&self, name: &str) {
        if let Ok(slot) = self.slot(name) {
            slot.last_used.store(timer_ms(), Ordering::Relaxed);
        }
    }

    /// Every topic's name, config and log figures, without opening closed
    /// topics: theirs come from their checkpoint (exact after a clean stop;
    /// a topic not closed cleanly is opened, which recovers it).
    pub fn infos(&self) -> Vec<super::TopicInfo> {
        self.names()
            .into_iter()
            .filter_map(|name| match self.info(&name) {
                Ok(info) => Some(info),
                Err(Error::TopicNotFound(_)) => None,
                Err(e) => {
                    tracing::error!(topic = %name, error = %e, "describing a topic");
                    None
                }
            })
            .collect()
    }

    fn info(&self, name: &str) -> Result<super::TopicInfo> {
        let slot = self.slot(name)?;
        if let Some(topic) = self.open_topic(name) {
            return Ok(super::TopicInfo::of(&topic));
        }
        let config = self.slot_config(name, &slot)?;
        let dir = self.data.topic_dir(name);
        let storage = self.data.storage();
        match crate::storage::checkpoint::Checkpoint::load(&**storage, &dir)? {
            Some(c) if c.clean => Ok(super::TopicInfo {
                name: name.to_owned(),
                stats: c.stats_after_clean_stop(&**storage, &dir),
                config,
            }),
            _ => {
                let topic = self.open_slot(name, &slot)?;
                let info = super::TopicInfo::of(&topic);
                drop(topic);
                self.close_unused(name);
                Ok(info)
            }
        }
    }

    /// The topic `name` if it is open, without opening it or counting a use.
    pub fn open_topic(&self, name: &str) -> Option<Arc<Topic>> {
        let slot = self.slot(name).ok()?;
        let open = slot.topic();
        open.as_ref().filter(|t| !t.is_retired()).cloned()
    }

    fn open_slot(&self, name: &str, slot: &Slot) -> Result<Arc<Topic>> {
        let open = slot.topic();
        if let Some(topic) = &*open {
            return match topic.is_retired() {
                true => Err(not_found(name)),
                false => Ok(Arc::clone(topic)),
            };
        }
        if slot.is_gone() {
            return Err(not_found(name));
        }
        let opening = self.opener();
        let opened = self.open_from_disk(name);
        drop(opening);
        let topic = match opened {
            Ok(topic) => Arc::new(topic),
            // Out of descriptors or memory: the broker closes unused
            // topics and tries once more, so this is no error yet.
            Err(e @ (Error::FilesExhausted { .. } | Error::MemoryExhausted { .. })) => {
                tracing::warn!(topic = name, error = %e, "the topic cannot be opened now");
                return Err(e);
            }
            Err(e) => {
                tracing::error!(topic = name, error = %e, "the topic cannot be opened");
                return Err(e);
            }
        };
        // Retention did not run while the topic was closed: what it would
        // have dropped goes before anyone reads the topic.
        if self.options.upkeep && retention_check_interval(topic.config()).is_some() {
            match retention_pass(&topic) {
                Ok(Some(bytes)) => {
                    if let Some(metrics) = &self.options.metrics {
                        metrics.cleanup(name, Cleanup::Retention, bytes, || !topic.is_retired());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(topic = name, error = %e, "applying retention as the topic opens");
                }
            }
        }
        Ok(self.install(name, slot, open, topic))
    }

    /// Makes `topic` the open topic of `slot`, whose lock `open` is, and
    /// tells whoever bounds the open topics.
    fn install(
        &self,
        name: &str,
        slot: &Slot,
        mut open: MutexGuard<'_, Option<Arc<Topic>>>,
        topic: Arc<Topic>,
    ) -> Arc<Topic> {
        self.learn(name, topic.config());
        *slot.config() = Some(topic.config().clone());
        slot.upkeep_due.store(0, Ordering::Relaxed);
        if let Some(watch) = lock(&slot.compaction).take() {
            topic.resume_compaction_watch(watch);
        }
        *open = Some(Arc::clone(&topic));
        // Under the slot's lock, so the set never disagrees with the slot.
        self.open_names().insert(name.to_owned());
        drop(open);
        self.opened.notify_one();
        topic
    }

    /// Opens the folder of topic `name` with its config (see the damage
    /// rules of [`Topic::open`]).
    fn open_from_disk(&self, name: &str) -> Result<Topic> {
        let data = &self.data;
        let dir = data.topic_dir(name);
        let config = match TopicConfig::load(&**data.storage(), &dir)? {
            Some(config) => config,
            None => {
                // A checkpoint that records journals was written by a
                // topic, which had its config: starting on the defaults
                // would silently change its fsync policy, segment size...
                let by_topic =
                    match crate::storage::checkpoint::Checkpoint::load(&**data.storage(), &dir) {
                        Ok(Some(c)) => !c.journals.is_empty(),
                        Ok(None) => false,
                        // One there that does not load was written by a
                        // topic all the same.
                        Err(Error::Corruption(_) | Error::Io { .. }) => true,
                        // A passing shortage (descriptors, memory): the
                        // open is tried again.
                        Err(e) => return Err(e),
                    };
                let options = &self.options;
                if by_topic {
                    let damage = crate::error::Corruption {
                        file: dir.join(TOPIC_CONFIG_FILE),
                        bytes: 0..0,
                        offsets: None,
                        detail: format!(
                            "topic {name} has lost its config file: restore it. Start with \
                             recovery mode skip-damaged (`spool serve --recovery skip-damaged`) \
                             to run the topic on the default config"
                        ),
                    };
                    if options.recovery == RecoveryMode::TolerateTornTail {
                        return Err(Error::corruption(damage));
                    }
                    tracing::error!(damage = %damage.given_up(), "running the topic on the default config");
                } else {
                    tracing::warn!(topic = %name, "no {TOPIC_CONFIG_FILE}; using the default config");
                }
                // Written down, so the topic keeps this config and a
                // later loss of the file is seen.
                options.defaults.store(&**data.storage(), &dir)?;
                options.defaults.clone()
            }
        };
        Topic::open(
            Arc::clone(data.storage()),
            &dir,
            name,
            config,
            self.options.recovery,
        )
    }

    /// Notified whenever a topic is opened: whoever bounds the open topics
    /// waits on it.
    pub fn opened(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.opened)
    }

    /// Notes what the config of `name` asks of the registry.
    fn learn(&self, name: &str, config: &TopicConfig) {
        let mut deletable = self
            .idle_deletable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match config.delete_when_idle_ms {
            Some(_) => deletable.insert(name.to_owned()),
            None => deletable.remove(name),
        };
    }

    /// Topics whose config has `delete_when_idle_ms` (of those whose config
    /// was read: every topic once [`Registry::scan`] is done).
    pub fn idle_deletable(&self) -> Vec<String> {
        let deletable = self
            .idle_deletable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        deletable.iter().cloned().collect()
    }

    /// Deletes topic `name` if its config has `delete_when_idle_ms`, nobody
    /// used it for that long (as of `now`) and it has no group. Returns the
    /// deleted topic.
    /// `deleted` as in [`Registry::delete_topic_then`].
    pub fn delete_if_idle(
        &self,
        name: &str,
        now: u64,
        deleted: impl FnOnce(Option<&Arc<Topic>>),
    ) -> Result<Deletion> {
        let slot = self.slot(name)?;
        let Some(ms) = self.slot_config(name, &slot)?.delete_when_idle_ms else {
            return Ok(Deletion::Kept);
        };
        let idle = || now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) >= ms;
        if !idle() {
            return Ok(Deletion::Kept);
        }
        // Asked again once no request is inside the topic. Groups of a
        // closed topic are read without opening it: each has a journal in
        // `groups/`.
        let deletion = self.delete_checked(
            name,
            |topic| {
                idle()
                    && match topic {
                        Some(topic) => !topic.has_groups(),
                        None => !self.has_groups_on_disk(name),
                    }
            },
            deleted,
        )?;
        if let Deletion::Deleted(_) = deletion {
            tracing::info!(
                topic = name,
                idle_ms = ms,
                "deleted a topic nobody used for delete_when_idle_ms"
            );
        }
        Ok(deletion)
    }

    /// Whether the closed topic `name` has a group journal (or cannot be
    /// listed: then it is kept).
    fn has_groups_on_disk(&self, name: &str) -> bool {
        let dir = self.data.topic_dir(name).join(super::topic::GROUPS_DIR);
        let storage = self.data.storage();
        storage.exists(&dir)
            && storage
                .list_dir(&dir)
                .map_or(true, |files| files.iter().any(|f| f.ends_with(".journal")))
    }

    /// How many topics are open.
    pub fn open_count(&self) -> usize {
        self.open_names().len()
    }

    /// The open topics themselves (not one being opened or closed right
    /// now), without waiting.
    pub fn open_handles(&self) -> Vec<Arc<Topic>> {
        let names: Vec<String> = self.open_names().iter().cloned().collect();
        let topics = self.read_topics();
        names
            .iter()
            .filter_map(|name| topics.get(name))
            .filter_map(|slot| {
                let open = slot.topic.try_lock().ok()?;
                open.as_ref().filter(|t| !t.is_retired()).cloned()
            })
            .collect()
    }

    /// The open topics, with when each was last used and the files it holds.
    pub fn open_topics(&self) -> Vec<OpenTopic> {
        let now = timer_ms();
        let names: Vec<String> = self.open_names().iter().cloned().collect();
        let slots: Vec<(String, Arc<Slot>)> = {
            let topics = self.read_topics();
            names
                .into_iter()
                .filter_map(|name| Some((topics.get(&name).cloned()?, name)))
                .map(|(slot, name)| (name, slot))
                .collect()
        };
        slots
            .into_iter()
            .filter_map(|(name, slot)| {
                // One being opened or closed is left out of this listing.
                let (files, pinned) = match slot.topic.try_lock() {
                    Ok(open) => {
                        let topic = open.as_ref()?;
                        (topic.open_files(), topic.is_pinned(now))
                    }
                    Err(_) => return None,
                };
                Some(OpenTopic {
                    last_used_ms: slot.last_used.load(Ordering::Relaxed),
                    files,
                    pinned,
                    name,
                })
            })
            .collect()
    }

    /// Closes topic `name` if it is open and nothing but the registry holds
    /// it: a clean stop (everything synced, the clean flag recorded), then
    /// its files are closed. Returns whether it was closed. A stop that
    /// fails is logged and the topic closed anyway (unless it left the topic
    /// read-only): its next open recovers it.
    ///
    /// The slot's lock is held across the stop's syncs, as across an open's:
    /// it is this one topic's, nobody holds the topic, and a request for it
    /// has to wait for the close to end before it can open the topic again
    /// (two `Topic`s must never share a folder). Nothing else waits.
    pub fn close_unused(&self, name: &str) -> bool {
        let Ok(slot) = self.slot(name) else {
            return false;
        };
        let mut open = slot.topic();
        let Some(topic) = open.as_ref() else {
            return false;
        };
        // A read-only topic (a sync failed) stays open until a restart, and
        // one with leases or delayed redeliveries until they end.
        if Arc::strong_count(topic) > 1
            || topic.is_retired()
            || topic.is_pinned(timer_ms())
            || topic.is_read_only()
        {
            return false;
        }
        match topic.stop() {
            Ok(()) => {
                lock(&self.closed_unclean).remove(name);
            }
            // Out of descriptors or memory for the checkpoint's temp file:
            // what it holds is synced, and closing it is what frees them
            // (keeping it open until the checkpoint can be written kept
            // every topic open once the process ran out). Its next open
            // recovers it.
            Err(e @ (Error::FilesExhausted { .. } | Error::MemoryExhausted { .. })) => {
                if topic.is_read_only() {
                    return false;
                }
                // Said once until a close of the topic succeeds (a listing
                // opens and closes such a topic each time).
                if lock(&self.closed_unclean).insert(name.to_owned()) {
                    tracing::warn!(topic = name, error = %e,
                        "closing an unused topic without its clean checkpoint; its next open recovers it");
                }
            }
            Err(e) => {
                if topic.is_read_only() {
                    tracing::error!(topic = name, error = %e, "closing an unused topic: its final sync failed; it stays open, read-only, until a restart");
                    return false;
                }
                if lock(&self.closed_unclean).insert(name.to_owned()) {
                    tracing::error!(topic = name, error = %e, "closing an unused topic: its clean checkpoint failed; its next open recovers it, and the final stop tries again");
                }
            }
        }
        let now = now_ms();
        let config = topic.config();
        let retention = match (topic.log().retention_due_ms(), config.log.retention_ms) {
            (Some(due), Some(ms)) => {
                // Past due and still there under retention_respects_groups:
                // a group needs it, and no group moves while the topic is
                // closed, so only the hard age limit can drop it.
                let due = if due <= now && config.retention_respects_groups {
                    due.saturating_add(ms)
                } else {
                    due
                };
                // Not sooner than an open topic's retention looks again.
                let every = retention_check_interval(config).unwrap_or_default();
                due.max(now.saturating_add(every.as_millis() as u64))
            }
            _ => 0,
        };
        let watch = topic.compaction_watch();
        let compaction = match (&watch, self.options.upkeep) {
            (Some(watch), true) => watch.closed_due_ms(),
            _ => 0,
        };
        *lock(&slot.compaction) = watch;
        let due = [retention, compaction]
            .into_iter()
            .filter(|&d| d != 0)
            .min();
        slot.upkeep_due.store(due.unwrap_or(0), Ordering::Relaxed);
        *open = None;
        self.open_names().remove(name);
        true
    }

    /// Closed topics whose retention or background compaction is due by
    /// `now` (at most `max`), each taken off the due list:
    /// [`Registry::closed_upkeep`] puts it back with its next due time. Each call starts after the last name
    /// the one before took, so a few topics due again and again cannot keep
    /// the others waiting.
    pub fn upkeep_due(&self, now: u64, max: usize) -> Vec<String> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let topics = self.read_topics();
        let mut cursor = self.upkeep_cursor.lock().unwrap_or_else(|p| p.into_inner());
        let after = topics.range::<str, _>((Excluded(cursor.as_str()), Unbounded));
        let up_to = topics.range::<str, _>((Unbounded, Included(cursor.as_str())));
        let due: Vec<String> = after
            .chain(up_to)
            .filter(|(_, slot)| !slot.is_gone())
            .filter(|(_, slot)| {
                let due = slot.upkeep_due.load(Ordering::Relaxed);
                let taken = due != 0
                    && due <= now
                    && slot
                        .upkeep_due
                        .compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok();
                if taken {
                    let measure = lock(&slot.compaction)
                        .as_ref()
                        .is_some_and(|w| w.closed_due_ms() != 0 && w.closed_due_ms() <= now);
                    slot.measure_due.store(measure, Ordering::Relaxed);
                }
                taken
            })
            .take(max)
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(last) = due.last() {
            cursor.clone_from(last);
        }
        due
    }

    /// Opens closed topic `name` to apply its retention (as every open
    /// does) and to measure it for background compaction (compacting it if
    /// it is dirty enough), and closes it again, without counting a use of
    /// it (nor touching it if a request opened it meanwhile). Returns what
    /// compaction measured and did, if it compacted.
    /// An open that fails (out of descriptors, damage) leaves the topic
    /// due again after [`CLOSED_UPKEEP_RETRY_MS`].
    pub fn closed_upkeep(&self, name: &str) -> Result<Option<(Dirt, CompactStats)>> {
        // Counted before `stopping` is read: the final stop waits for it.
        let _counted = Counted::new(&self.upkeeps);
        let slot = self.slot(name)?;
        if slot.topic().is_some() {
            return Ok(None);
        }
        let stopping = || Error::Stopping(format!("no upkeep of topic {name}: stopping"));
        if self.stopping.load(Ordering::SeqCst) {
            return Err(stopping());
        }
        let topic = match self.open_slot(name, &slot) {
            Ok(topic) => topic,
            Err(e) => {
                // Taken off the due list by `upkeep_due`; back on it,
                // unless a close since set its next due time.
                let retry = now_ms().saturating_add(CLOSED_UPKEEP_RETRY_MS);
                let _ = slot.upkeep_due.compare_exchange(
                    0,
                    retry,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return Err(e);
            }
        };
        // Opened after the final stop listed the open topics: closed again
        // at once, as that stop would have stopped it.
        if self.stopping.load(Ordering::SeqCst) {
            drop(topic);
            self.close_unused(name);
            return Err(stopping());
        }
        // Opened for its retention, it is measured only if its measure was
        // due too.
        let measure = slot.measure_due.swap(false, Ordering::Relaxed);
        let compacted = match topic.config().compact_min_dirty_ratio {
            Some(ratio) if measure => topic.compact_if_dirty(now_ms(), ratio),
            _ => Ok(None),
        };
        drop(topic);
        // Due again when its close says (a measure that failed: after
        // compact_check_ms).
        self.close_unused(name);
        compacted
    }

    /// Stops every open topic cleanly (no writes after its final sync) and,
    /// if all stopped, records a clean
    /// stop of the data directory ([`DataDir::mark_clean_stop`]), so the
    /// next start looks for nothing to recover. The last step of a broker
    /// or tool once nothing writes any more. A topic whose final sync or
    /// clean checkpoint fails is logged, the others are still stopped, and
    /// the first such failure is returned (the next start recovers those
    /// topics); failing to record the clean stop is only logged.
    ///
    /// Topics are stopped by up to [`STOP_THREADS`] threads at once: each
    /// stop waits for a few syncs, which the disk serves together, so a
    /// broker with thousands of open topics stops in about the time a
    /// tenth of them would take one after another.
    ///
    /// Each clean checkpoint takes a descriptor for its temp file. A stop
    /// that finds none free (the stops at once need more than the process
    /// has spare) is tried again once the others are done, one at a time,
    /// with the files of every topic already stopped and held by nobody
    /// else closed first.
    pub fn stop_all(&self) -> Result<()> {
        // Before the open topics are listed (see `closed_upkeep`).
        self.stopping.store(true, Ordering::SeqCst);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let names: Vec<String> = self.open_names().iter().cloned().collect();
        let next = AtomicUsize::new(0);
        let again: Mutex<Vec<&String>> = Mutex::new(Vec::new());
        let fail = |topic: &Topic, e: Error| {
            tracing::error!(topic = topic.name(), error = %e,
                "final sync or clean checkpoint failed; the next start recovers the topic");
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        };
        let stop_each = || {
            while let Some(name) = names.get(next.fetch_add(1, Ordering::Relaxed)) {
                // Waits for an open or close under way, so none is missed.
                let Some(topic) = self.open_topic(name) else {
                    continue;
                };
                // Nothing is written after the final sync: a round of
                // producers still under way would be acknowledged (under
                // fsync=interval or never) and never synced, though the
                // stop is recorded as clean. (A poisoned writer refuses
                // writes already.)
                let _ = topic.log().stop_writes();
                match topic.stop() {
                    Ok(()) => {}
                    Err(Error::FilesExhausted { .. } | Error::MemoryExhausted { .. })
                        if !topic.is_read_only() =>
                    {
                        again.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                    }
                    Err(e) => fail(&topic, e),
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..names.len().min(STOP_THREADS) {
                // One that cannot start leaves its share to the others.
                let _ = std::thread::Builder::new()
                    .name("spool-stop".into())
                    .spawn_scoped(scope, stop_each);
            }
            stop_each();
        });
        let again = again.into_inner().unwrap_or_else(|p| p.into_inner());
        if !again.is_empty() {
            tracing::warn!(
                topics = again.len(),
                "out of file descriptors or memory for some final checkpoints: closing the topics already stopped and trying those again, one at a time"
            );
            for name in &names {
                if !again.contains(&name) {
                    self.release_stopped(name);
                }
            }
            for name in again {
                let Some(topic) = self.open_topic(name) else {
                    continue;
                };
                if let Err(e) = topic.stop() {
                    fail(&topic, e);
                    continue;
                }
                drop(topic);
                self.release_stopped(name);
            }
        }
        // An upkeep that opened a topic after the listing above closes it
        // again at once (see `closed_upkeep`); nothing writes after the
        // clean-stop marker.
        {
            let (count, changed) = &self.upkeeps;
            let mut n = lock(count);
            while *n > 0 {
                n = changed.wait(n).unwrap_or_else(|p| p.into_inner());
            }
        }
        // Topics closed for being unused without their clean checkpoint
        // (a close still under way above included: it notes its topic
        // before it lets go of it): opened again, which recovers them, and
        // stopped, one at a time. A few rounds, for closes that end while
        // this runs; one noted after them keeps the stop from being clean.
        for _ in 0..3 {
            let unclean = std::mem::take(&mut *lock(&self.closed_unclean));
            if unclean.is_empty() {
                break;
            }
            for name in unclean {
                let stopped = self.topic(&name).and_then(|topic| topic.stop());
                match stopped {
                    Ok(()) | Err(Error::TopicNotFound(_)) => self.release_stopped(&name),
                    Err(e) => {
                        tracing::error!(topic = name, error = %e,
                            "a topic closed without its clean checkpoint could not be given one; the next start recovers the topic");
                        lock(&failed).get_or_insert(e);
                    }
                }
            }
        }
        if let Some(name) = lock(&self.closed_unclean).first() {
            lock(&failed).get_or_insert(Error::Internal(format!(
                "topic {name} closed without its clean checkpoint while the broker was stopping"
            )));
        }
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        if let Err(e) = self.data.mark_clean_stop() {
            tracing::warn!(error = %e, "could not record the clean stop; the next start scans every topic");
        }
        Ok(())
    }

    /// Closes the files of topic `name`, stopped by [`Registry::stop_all`],
    /// if nobody else holds it. Only while stopping: the broker opens no
    /// topic then, so none is opened again after its final checkpoint.
    fn release_stopped(&self, name: &str) {
        let Ok(slot) = self.slot(name) else { return };
        let mut open = slot.topic();
        if open.as_ref().is_some_and(|t| Arc::strong_count(t) == 1) {
            *open = None;
            self.open_names().remove(name);
        }
    }

    /// Names of all topics, sorted (open or not; not those being deleted).
    pub fn names(&self) -> Vec<String> {
        self.read_topics()
            .iter()
            .filter(|(_, slot)| !slot.is_gone())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// All topics, by name (not those being deleted), each opened: for
    /// tools and admin work over every topic. A broker walks
    /// [`Registry::names`] instead, so as not to hold them all open.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.names()
            .iter()
            .filter_map(|name| match self.topic(name) {
                Ok(topic) => Some(topic),
                Err(Error::TopicNotFound(_)) => None,
                Err(e) => {
                    tracing::error!(topic = %name, error = %e, "topic cannot be opened");
                    None
                }
            })
            .collect()
    }

    /// The config of topic `name`: the open topic's, the one read when it
    /// was last open, or its `topic.toml`.
    pub fn config_of(&self, name: &str) -> Result<TopicConfig> {
        let slot = self.slot(name)?;
        self.slot_config(name, &slot)
    }

    /// Never waits for the slot's topic lock (held while a topic opens or
    /// closes): an open topic's config is always in `slot.config` too.
    fn slot_config(&self, name: &str, slot: &Slot) -> Result<TopicConfig> {
        if let Some(config) = &*slot.config() {
            return Ok(config.clone());
        }
        let config = TopicConfig::load(&**self.data.storage(), &self.data.topic_dir(name))?
            .unwrap_or_else(|| self.options.defaults.clone());
        self.learn(name, &config);
        if self.options.upkeep {
            // Closed since before this run: when its retention is due is
            // known only once it is open, so look now; background
            // compaction measures it as it would an open topic.
            let retention = retention_check_interval(&config).map(|_| 1);
            let compaction = config
                .compact_min_dirty_ratio
                .map(|_| now_ms().saturating_add(config.compact_check_ms));
            if let Some(due) = compaction {
                lock(&slot.compaction).get_or_insert(CompactionWatch::due_at(due));
            }
            if let Some(due) = retention.or(compaction) {
                let _ =
                    slot.upkeep_due
                        .compare_exchange(0, due, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        *slot.config() = Some(config.clone());
        Ok(config)
    }

    /// When topic `name` was last used ([`timer_ms`]; the start of this
    /// run for a topic not used since).
    pub fn last_used_ms(&self, name: &str) -> Option<u64> {
        let slot = self.slot(name).ok()?;
        Some(slot.last_used.load(Ordering::Relaxed))
    }

    /// The start-up scan, for a broker to run in the background: reads each
    /// topic's config (so policies such as `delete_when_idle_ms` are known
    /// for topics not yet used) and checkpoint, and recovers every topic
    /// whose checkpoint is damaged or, unless the last run stopped cleanly,
    /// does not record a clean stop, closing it again unless a request took
    /// it meanwhile. A topic whose config cannot be read or that cannot be
    /// opened is logged and counted; requests to it get the error.
    pub fn scan(&self, stop: &AtomicBool, progress: &mut dyn FnMut(Scanned)) -> Scanned {
        let mut done = Scanned::default();
        for name in self.names() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            done.topics += 1;
            let Ok(slot) = self.slot(&name) else { continue };
            if let Err(e) = self.slot_config(&name, &slot) {
                done.failed += 1;
                tracing::error!(topic = %name, error = %e,
                    "reading the topic's config; requests to it get this error");
                continue;
            }
            if slot.topic().is_some() {
                continue;
            }
            let dir = self.data.topic_dir(&name);
            let recover =
                match crate::storage::checkpoint::Checkpoint::load(&**self.data.storage(), &dir) {
                    Ok(Some(c)) if c.clean => false,
                    Ok(_) => !self.clean_start,
                    // Damaged, also after a clean stop: opening it now says so
                    // (or gives it up under skip-damaged) rather than its first
                    // request.
                    Err(_) => true,
                };
            if recover {
                match self.open_slot(&name, &slot) {
                    Ok(topic) => {
                        drop(topic);
                        done.recovered += 1;
                        self.close_unused(&name);
                    }
                    Err(Error::TopicNotFound(_)) => {}
                    Err(e) => {
                        done.failed += 1;
                        tracing::error!(topic = %name, error = %e, "recovering a topic; requests to it get this error");
                    }
                }
            }
            if done.topics % 1000 == 0 {
                progress(done);
            }
        }
        progress(done);
        done
    }

    /// Creates `name` with `config`; fails if it exists. Waits for a delete
    /// of `name` under way, then creates a new, empty topic.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        validate_name("topic", name)?;
        config.validate()?;
        loop {
            let mut topics = self.write_topics();
            if let Some(old) = topics.get(name) {
                if !old.is_gone() {
                    // A delete under way waits for the requests inside the
                    // topic before it marks the name gone: wait with it.
                    let old = Arc::clone(old);
                    drop(topics);
                    let deleting = old
                        .topic()
                        .as_ref()
                        .filter(|t| t.is_retired())
                        .map(Arc::clone);
                    match deleting {
                        // Returns at once once the delete is done (or the
                        // topic kept): then look again.
                        Some(topic) => topic.gate().wait_settled(),
                        // A delete of the closed topic, or one that has
                        // finished, since the look: look again.
                        None if old.is_gone() || !self.holds(name, &old) => {}
                        None => return Err(Error::AlreadyExists(format!("topic {name} exists"))),
                    }
                    continue;
                }
                // Being deleted: wait until its folder is gone, then create.
                let old = Arc::clone(old);
                drop(topics);
                match old.topic().clone() {
                    Some(topic) => topic.gate().wait_settled(),
                    None => std::thread::yield_now(),
                }
                continue;
            }
            self.check_dead_letter_chain(&topics, name, &config)?;
            // Visible at once, locked until its folder is made: requests
            // for it wait, other topics do not.
            let slot = Slot::new(timer_ms(), Some(config.clone()));
            let open = slot.topic();
            topics.insert(name.to_owned(), Arc::clone(&slot));
            drop(topics);
            return match self.create_folder(name, config) {
                Ok(topic) => Ok(self.install(name, &slot, open, Arc::new(topic))),
                Err(e) => {
                    slot.gone.store(true, Ordering::Release);
                    drop(open);
                    self.forget(name, &slot);
                    Err(e)
                }
            };
        }
    }

    /// Takes `slot` out of the map (not a newer slot of the same name).
    fn forget(&self, name: &str, slot: &Arc<Slot>) {
        let mut topics = self.write_topics();
        if topics.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            topics.remove(name);
            // Under the map's lock: a new topic of the name cannot have
            // been entered yet.
            self.open_names().remove(name);
            drop(topics);
            let mut deletable = self
                .idle_deletable
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            deletable.remove(name);
        }
    }

    /// Refuses a config whose dead letters would come back to `name`: the
    /// topic itself, or a chain of dead-letter topics (existing ones with
    /// their configs, missing ones as an auto-create would make them) that
    /// loops back to it.
    fn check_dead_letter_chain(
        &self,
        topics: &BTreeMap<String, Arc<Slot>>,
        name: &str,
        config: &TopicConfig,
    ) -> Result<()> {
        let mut chain = vec![name.to_owned()];
        let mut next = config.dead_letter_topic(name);
        // A missing topic's default dead-letter name grows at every step, so
        // the walk ends at the longest name a topic can have.
        while next.len() <= MAX_NAME_LEN {
            if next == name {
                chain.push(next);
                return Err(Error::InvalidArgument(format!(
                    "dead_letter: dead letters of topic {name} would come back to it ({})",
                    chain.join(" → ")
                )));
            }
            if chain.contains(&next) {
                // A loop among other topics (made before loops were refused).
                return Ok(());
            }
            let after = match topics.get(&next).filter(|s| !s.is_gone()) {
                Some(slot) => self.slot_config(&next, slot)?.dead_letter_topic(&next),
                None => self.options.defaults.dead_letter_topic(&next),
            };
            chain.push(std::mem::replace(&mut next, after));
        }
        Ok(())
    }

    /// Makes the folder of a new topic (see the module docs) and opens it.
    /// On failure nothing of it is left where a start would find it.
    fn create_folder(&self, name: &str, config: TopicConfig) -> Result<Topic> {
        let storage = self.data.storage();
        let dir = self.data.topic_dir(name);
        // A folder no topic wrote (see [`DataDir::topics`]): the rename
        // replaces an empty one, not one holding files.
        if storage.list_dir(&dir).is_ok_and(|files| !files.is_empty()) {
            return Err(Error::AlreadyExists(format!(
                "cannot create topic {name}: {} holds files of no topic; move it away first",
                dir.display()
            )));
        }
        let staging = self.data.staging_dir(name)?;
        let staged = config.store(&**storage, &staging).and_then(|()| {
            storage
                .rename(&staging, &dir)
                .ctx(|| format!("moving {} to {}", staging.display(), dir.display()))
        });
        if let Err(e) = staged {
            self.discard(&staging);
            return Err(e);
        }
        let topics_dir = dir.parent().unwrap_or(self.data.root());
        let opened = storage
            .sync_dir(topics_dir)
            .ctx(|| format!("syncing {}", topics_dir.display()))
            .and_then(|()| {
                Topic::open(
                    Arc::clone(storage),
                    &dir,
                    name,
                    config,
                    self.options.recovery,
                )
            });
        if opened.is_err() {
            match self.data.move_to_trash(&dir) {
                Ok(trash) => self.discard(&trash),
                Err(e) => tracing::warn!(topic = name, error = %e,
                    "could not take back the folder of a topic whose creation failed"),
            }
        }
        opened
    }

    /// Removes a folder of `staging/` or `trash/` now; a failure leaves it to
    /// the next start.
    fn discard(&self, dir: &std::path::Path) {
        if let Err(e) = DataDir::remove_leftover(&**self.data.storage(), dir) {
            tracing::warn!(error = %e, "leaving a folder to the next start");
        }
    }

    /// The topic `name`, created with the default config if missing and
    /// `auto_create` is on (or `force` is set, as for dead-letter topics).
    pub fn topic_or_create(&self, name: &str, force: bool) -> Result<Arc<Topic>> {
        match self.topic(name) {
            Err(Error::TopicNotFound(_)) if self.options.auto_create || force => {
                match self.create_topic(name, self.options.defaults.clone()) {
                    Err(Error::AlreadyExists(_)) => self.topic(name),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Deletes a topic with all its data and returns it (closed: every
    /// request on it gets `NOT_FOUND`). Requests inside it finish first; then
    /// its folder moves to `trash/` in one durable rename and is removed in
    /// the background. If the folder cannot be moved, the topic stays as it
    /// was and the error is returned.
    pub fn delete_topic(&self, name: &str) -> Result<Option<Arc<Topic>>> {
        self.delete_topic_then(name, |_| {})
    }

    /// [`Registry::delete_topic`], calling `deleted` (with the topic if it
    /// was open) once the name is free but before anything waiting for the
    /// delete (a create of the same name) goes on: what follows a delete
    /// (its event, its metrics series going) comes before what follows
    /// such a create.
    pub fn delete_topic_then(
        &self,
        name: &str,
        deleted: impl FnOnce(Option<&Arc<Topic>>),
    ) -> Result<Option<Arc<Topic>>> {
        match self.delete_checked(name, |_| true, deleted)? {
            Deletion::Deleted(topic) => Ok(topic),
            Deletion::Kept => Err(Error::Internal(format!(
                "deleting topic {name}: kept although nothing asked to keep it"
            ))),
        }
    }

    /// Deletes topic `name` if `check` (given the topic if it is open, else
    /// `None`) still says so once no request is inside it. A closed topic
    /// is deleted under its slot's lock without being opened (so a damaged
    /// topic can be deleted too).
    fn delete_checked(
        &self,
        name: &str,
        check: impl Fn(Option<&Topic>) -> bool,
        deleted: impl FnOnce(Option<&Arc<Topic>>),
    ) -> Result<Deletion> {
        let slot = self.slot(name)?;
        let open = slot.topic();
        let Some(topic) = open.as_ref().map(Arc::clone) else {
            // Closed: nothing can open it while the lock is held, and once
            // `gone` is set nothing will. Another delete may have finished
            // while this one waited for the lock: its folder is gone (and
            // the name may be a new topic's by now).
            if slot.is_gone() {
                return Err(not_found(name));
            }
            if !check(None) {
                return Ok(Deletion::Kept);
            }
            slot.gone.store(true, Ordering::Release);
            let dir = self.data.topic_dir(name);
            let moved = self.data.move_to_trash(&dir);
            if moved.is_err() && self.data.storage().exists(&dir) {
                slot.gone.store(false, Ordering::Release);
                return moved.map(|_| Deletion::Kept);
            }
            deleted(None);
            drop(open);
            self.forget(name, &slot);
            self.remove_in_background(moved?);
            return Ok(Deletion::Deleted(None));
        };
        drop(open);
        if !topic.gate().close() {
            // Another delete of it is under way.
            return Err(not_found(name));
        }
        if !check(Some(&topic)) {
            topic.gate().reopen();
            return Ok(Deletion::Kept);
        }
        slot.gone.store(true, Ordering::Release);
        let moved = self.data.move_to_trash(topic.dir());
        if moved.is_err() && self.data.storage().exists(topic.dir()) {
            slot.gone.store(false, Ordering::Release);
            topic.gate().reopen();
            return moved.map(|_| Deletion::Kept);
        }
        // Gone for good before what follows the delete runs (so no request
        // starts a runtime for it meanwhile), but a create waiting for the
        // delete goes on only after it.
        topic.gate().mark_finished();
        deleted(Some(&topic));
        self.forget(name, &slot);
        topic.gate().finish();
        self.remove_in_background(moved?);
        Ok(Deletion::Deleted(Some(topic)))
    }

    /// Removes a deleted topic's folder (in `trash/`) on a thread of its own.
    fn remove_in_background(&self, trash: std::path::PathBuf) {
        let storage = Arc::clone(self.data.storage());
        let removal = std::thread::Builder::new()
            .name("spool-trash".into())
            .spawn({
                let trash = trash.clone();
                move || {
                    if let Err(e) = DataDir::remove_leftover(&*storage, &trash) {
                        tracing::warn!(error = %e, "leaving a deleted topic's folder to the next start");
                    }
                }
            });
        if removal.is_err() {
            self.discard(&trash);
        }
    }

    /// Compacts one topic, or every topic; returns each topic's figures.
    /// `progress` gets the bytes gone through so far, across topics: within
    /// a topic those of its sealed segments examined, and once it is done
    /// all it held when its pass began (its [`LogStats::bytes`], active
    /// segment included), so the last call is the sum of the topics' bytes.
    ///
    /// [`LogStats::bytes`]: crate::storage::log::LogStats::bytes
    pub fn compact(
        &self,
        topic: Option<&str>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<(String, crate::storage::compact::CompactStats)>> {
        let names = match topic {
            Some(name) => vec![name.to_owned()],
            None => self.names(),
        };
        let now = crate::storage::log::now_ms();
        let mut out = Vec::with_capacity(names.len());
        let mut failed = None;
        let mut done = 0u64;
        for name in names {
            // One topic open at a time: a closed one is closed again after.
            let was_open = self.open_topic(&name).is_some();
            let stats = self.topic(&name).and_then(|t| {
                let size = t.stats().bytes;
                let stats = t.compact(now, &mut |bytes| progress(done + bytes.min(size)));
                done += size;
                progress(done);
                stats
            });
            if !was_open {
                self.close_unused(&name);
            }
            match stats {
                Ok(stats) => out.push((name, stats)),
                // Deleted meanwhile: nothing left to compact.
                Err(Error::TopicNotFound(_)) if topic.is_none() => {}
                Err(e) if topic.is_none() => {
                    // One topic's failure (damage, a full disk) does not
                    // keep the others from their pass.
                    tracing::error!(topic = %name, error = %e,
                        "compaction of a topic failed; the other topics are compacted");
                    failed.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Appends dead letters to the topic `name` (created if missing) and
    /// makes them durable. A dead-letter topic deleted meanwhile is created
    /// again: the letters must be stored somewhere before their source
    /// completes them.
    fn hand_off(&self, name: &str, messages: &[crate::storage::NewMessage]) -> Result<Arc<Topic>> {
        let mut attempts = 0;
        loop {
            let dlq = self.topic_or_create(name, true)?;
            let stored = dlq.produce(messages).and_then(|_| {
                if dlq.config().log.fsync == crate::storage::FsyncPolicy::Always {
                    Ok(())
                } else {
                    dlq.sync_log()
                }
            });
            match stored {
                Err(Error::TopicNotFound(_)) if attempts < 3 => attempts += 1,
                other => return other.map(|()| dlq),
            }
        }
    }

    /// A queue fetch with its dead letters handed to the dead-letter topic
    /// (durably) before they are completed in the group. This appends to the
    /// dead-letter topic directly, for use without a running broker (tools,
    /// tests); [`crate::broker::Broker`] hands dead letters to that topic's
    /// writer instead.
    pub fn fetch_queue(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        max: usize,
        max_bytes: usize,
        now: u64,
    ) -> Result<QueueFetch> {
        self.fetch_queue_within(
            topic,
            group,
            member,
            DeliveryLimits::new(max, max_bytes),
            now,
        )
    }

    /// [`Registry::fetch_queue`] for a delivery of at most `limits`: a message
    /// too large for it goes to the dead-letter topic at once (see
    /// [`Topic::fetch_queue_within`]).
    pub fn fetch_queue_within(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        now: u64,
    ) -> Result<QueueFetch> {
        let source = self.topic(topic)?;
        let fetch = source.fetch_queue_within(group, member, limits, now)?;
        if !fetch.dead_letters.is_empty() {
            let messages: Vec<_> = fetch
                .dead_letters
                .iter()
                .map(|d| d.message.clone())
                .collect();
            let offsets: Vec<_> = fetch.dead_letters.iter().map(|d| d.offset).collect();
            let dlq = match self.hand_off(&source.config().dead_letter_topic(topic), &messages) {
                Ok(dlq) => dlq,
                Err(e) => {
                    // Due again after a lease time, to be tried again.
                    if let Err(held) = source.retry_dead_letters(group, &offsets, now) {
                        tracing::warn!(topic, group, error = %held,
                            "dead letters not handed off stay held until the hold runs out");
                    }
                    return Err(e);
                }
            };
            source.complete_dead_letters(group, &offsets)?;
            tracing::warn!(
                topic,
                group,
                count = offsets.len(),
                dlq = dlq.name(),
                "dead-lettered messages"
            );
        }
        Ok(fetch)
    }
}
