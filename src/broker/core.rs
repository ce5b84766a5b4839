//! The async broker core every transport calls: one [`Broker`] handle with a
//! method per thing a client can do (produce, fetch with long-poll,
//! subscribe, ack, nack, commit, seek, delete, topic and group admin,
//! compact), answering with [`crate::Error`].
//!
//! It owns what has a lifetime: the registry of topics, each open topic's
//! runtime ([`super::runtime`]), subscriptions ([`super::subscription`]),
//! and the [`Metrics`] all transports count into (the topic and group
//! gauges are read from the open topics at scrape time).
//! Topics are looked up by name on every call: nothing above the core keeps
//! a topic beyond a request, so a topic may move elsewhere later.
//! Transports pass their own limits (what a frame holds) as plain values.

use super::TopicConfig;
use super::deliveries::Deliveries;
use super::registry::{Deletion, Registry, RegistryOptions};
use super::runtime::{TopicRuntime, report_background_compaction};
use super::subscription::{self, Subscription, Target};
use super::topic::{DeliveryLimits, GroupIdentity, Position, Topic};
use crate::error::{Error, Result};
use crate::groups::{GroupInfo, GroupMode};
use crate::metrics::{Cleanup, Metrics, TimedStorage, TopicSnapshot};
use crate::storage::compact::CompactStats;
use crate::storage::io::{OsStorage, Storage};
use crate::storage::log::{now_ms, timer_ms};
use crate::storage::{
    Appended, DataDir, Durability, LogStats, NewMessage, Offset, Records, RecoveryMode, record,
};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Settings of the broker core (the transports have their own).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Data directory.
    pub data: PathBuf,
    /// Config of topics created without one.
    pub topic_defaults: TopicConfig,
    /// Create unknown topics on first produce.
    pub auto_create: bool,
    /// How opening logs treats damage.
    pub recovery: RecoveryMode,
    /// Largest message (key + headers + value).
    pub max_message_bytes: u32,
    /// Most messages per produce.
    pub max_batch_messages: u32,
    /// Files open topics may keep open together (see
    /// [`default_max_open_files`]); least recently used topics are closed
    /// beyond it.
    pub max_open_files: usize,
    /// A topic nobody used for this long is closed (its files and tasks
    /// released) until its next use.
    pub topic_idle_close: Duration,
}

/// How recently used a topic that alone fills `max_open_files` the sweeps
/// keep open over it.
const BUDGET_SPARES_MS: u64 = 2_000;

/// Default of [`BrokerConfig::max_open_files`]: half the process's limit of
/// open files (the rest is for connections and short-lived files), at
/// least 16; 8192 when the process has no limit.
pub fn default_max_open_files() -> usize {
    crate::error::open_files_limit().map_or(8192, |limit| {
        usize::try_from(limit / 2).unwrap_or(usize::MAX).max(16)
    })
}

/// Closed topics one sweep opens for their retention or background
/// compaction.
const UPKEEP_OPENS_PER_SWEEP: usize = 32;

/// Default of [`BrokerConfig::topic_idle_close`].
pub const DEFAULT_TOPIC_IDLE_CLOSE: Duration = Duration::from_secs(30);
/// How often the broker looks for topics to close or delete.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Files an open topic holds at the least: one segment (3) and its
/// deletions journal.
const MIN_TOPIC_FILES: usize = 4;
/// Most blocking tasks that close topics at once (each close writes a
/// checkpoint through a temp file: one more descriptor while it runs).
const CLOSERS: usize = 16;

/// How many dead letters a queue read hands off at most while it finds
/// nothing else to lease (see [`Broker::lease_queue`]).
const DEAD_LETTERS_PER_READ: usize = 4096;

/// How long a queue read goes on handing off dead letters while it finds
/// nothing else to lease (each round waits for a few syncs).
const DEAD_LETTER_TIME: Duration = Duration::from_secs(1);

/// Most offsets one ack, nack, lease extension or delete names: each is 8
/// bytes decoded (from as little as 1 on the wire), and sorting and
/// applying them takes a few copies more.
pub const MOST_OFFSETS: usize = 1_000_000;

/// Refuses a request naming more than [`MOST_OFFSETS`] offsets.
fn check_offset_count(n: usize) -> Result<()> {
    if n > MOST_OFFSETS {
        return Err(Error::InvalidArgument(format!(
            "offsets: {n} in one request; at most {MOST_OFFSETS} (send the rest in further requests)"
        )));
    }
    Ok(())
}

/// The largest message a produce takes, and the setting that binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimit {
    /// Bytes of key, headers and value.
    pub bytes: u32,
    /// The setting an error names.
    pub setting: &'static str,
}

/// A topic as admin calls describe it.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    /// Its name.
    pub name: String,
    /// Its settings.
    pub config: TopicConfig,
    /// Its log's offsets and size.
    pub stats: LogStats,
}

impl TopicInfo {
    pub(super) fn of(topic: &Topic) -> TopicInfo {
        TopicInfo {
            name: topic.name().to_owned(),
            config: topic.config().clone(),
            stats: topic.stats(),
        }
    }

    /// The largest message a produce to this topic takes under `limit` (see
    /// [`Broker::message_limit`]): that, or the topic's own (a record must
    /// fit a segment), whichever is smaller.
    pub fn max_message_bytes(&self, limit: MessageLimit) -> u64 {
        self.config
            .log
            .max_message_bytes()
            .min(u64::from(limit.bytes))
    }
}

/// A fetch: what to read, from where, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// Topic name.
    pub topic: String,
    /// `None`: replay, no state. A stream group reads from its committed
    /// offset (or `from`), a queue group by lease.
    pub group: Option<String>,
    /// Where a replay starts (default earliest), or a stream-group member's
    /// own position.
    pub from: Option<Position>,
    /// Member name: queue leases and group liveness.
    pub member: String,
    /// What one answer may carry (the transport's frame decides).
    pub limits: DeliveryLimits,
    /// Longest wait for a message when there is none (long-poll).
    pub wait: Duration,
}

/// What a fetch found.
#[derive(Debug)]
pub struct Fetched {
    /// Messages (queue groups: with their delivery count; others: 0).
    pub messages: Deliveries,
    /// Offset after the last message, or where the read started.
    pub next_offset: Offset,
    /// The topic's end offset.
    pub end_offset: Offset,
}

/// A subscription: what to read, from where, and with how much credit.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    /// Topic name.
    pub topic: String,
    /// `None`: replay; else a stream or queue group.
    pub group: Option<String>,
    /// Where a replay starts (default earliest).
    pub from: Option<Position>,
    /// Member name.
    pub member: String,
    /// Most unacknowledged messages.
    pub max_in_flight: usize,
    /// What one delivery may carry (`messages`: most per delivery; credit
    /// lowers it).
    pub limits: DeliveryLimits,
}

/// A topic coming or going, as [`Broker::topic_events`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicEvent {
    /// The topic was created (explicitly or by a first produce).
    Created(String),
    /// The topic was deleted (explicitly or for being idle).
    Deleted(String),
}

/// Topic events a slow listener may fall behind by before it misses some.
const TOPIC_EVENTS_BUFFER: usize = 1024;

/// The broker: cheap to clone (one shared state inside).
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    runtimes: Mutex<HashMap<String, Arc<TopicRuntime>>>,
    config: BrokerConfig,
    /// Set by [`Broker::stop`]: background work ends.
    stopping: Arc<AtomicBool>,
    /// Held by whoever closes topics ([`Broker::close_topics`]), so
    /// concurrent openers over the budget do not all close the same ones.
    closer: tokio::sync::Mutex<()>,
    /// What every transport and topic counts into.
    metrics: Metrics,
    /// Topics created and deleted, for transports that report them.
    topic_events: tokio::sync::broadcast::Sender<TopicEvent>,
    /// The start-up scan's thread, which a stop waits for (it ends after
    /// the topic it is recovering): a topic it opens after the stop began
    /// must not be missed by the stop's final syncs and clean-stop marker.
    scan: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Give-backs of queue reads nobody took ([`Leased`]), which a stop
    /// waits for before it refuses requests: a read cut by the stop itself
    /// (a long-poll or subscription ending with its connection) still
    /// takes its deliveries back.
    give_backs: tokio_util::task::TaskTracker,
    /// Held by the task that opens closed topics for their upkeep (one at
    /// a time, beside the sweeper: a long compaction must not hold up idle
    /// closes and the file budget).
    upkeep: Arc<tokio::sync::Mutex<()>>,
}

/// Longest a stop waits for the give-backs of reads nobody took.
const GIVE_BACK_WAIT: Duration = Duration::from_secs(5);

/// An internal failure (a task that panicked) as an error that maps to
/// `INTERNAL`.
fn internal(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

/// Replay reads of at most this many records before the log's end run on
/// the async worker instead of the blocking pool (see [`Broker::read`]).
pub(super) const INLINE_READ_RECORDS: u64 = 64;

/// Runs engine work that may wait on the disk on the blocking pool: syncs,
/// journal writes, reads of the log, and anything under a topic's
/// group-state lock (acks hold it across their sync).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(internal("request failed", e)))
}

/// What a queue read leased to `member`. Unless its reader takes it, it
/// gives the leases back when dropped (each only if still the one this read
/// took: one that ran out and was leased again, even to the same member
/// name, is another read's).
struct Leased {
    broker: Broker,
    topic: String,
    group: String,
    member: String,
    deliveries: Option<Deliveries>,
}

impl Leased {
    /// The deliveries, now the reader's.
    fn take(mut self) -> Deliveries {
        self.deliveries.take().unwrap_or_default()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        let Some(deliveries) = self.deliveries.take() else {
            return;
        };
        if deliveries.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let leased = deliveries
            .iter()
            .map(|d| (d.offset(), d.delivery()))
            .collect();
        let read_from = deliveries.group().cloned();
        let broker = self.broker.clone();
        let (topic, group, member) = (
            std::mem::take(&mut self.topic),
            std::mem::take(&mut self.group),
            std::mem::take(&mut self.member),
        );
        let give_backs = self.broker.inner.give_backs.clone();
        give_backs.spawn_on(
            async move {
                let released = broker
                    .release(&topic, &group, &member, Release::Unread(leased, read_from))
                    .await;
                if let Err(e) = released {
                    tracing::debug!(topic, group, error = %e,
                    "giving back the leases of a read nobody took");
                }
            },
            &runtime,
        );
    }
}

/// Which leases of a member [`Broker::release`] gives back.
enum Release {
    /// Those of deliveries made: (offset, delivery) pairs, each given back
    /// only if still that delivery's lease, in the group that leased them
    /// if known.
    Delivered(Vec<(u64, u32)>, Option<GroupIdentity>),
    /// All of them.
    All,
    /// Those of a read nobody took: (offset, delivery) pairs, each given
    /// back only if still that delivery's lease, in the group that leased
    /// them if known.
    Unread(Vec<(u64, u32)>, Option<GroupIdentity>),
}

impl Broker {
    /// Counts a use of topic `name` now (see [`Registry::touch`]).
    pub(super) fn touch(&self, name: &str) {
        self.inner.registry.touch(name);
    }

    /// Opens the data directory (taking its lock and listing its topics;
    /// no topic is opened until it is used) and starts the background work:
    /// the start-up scan ([`Registry::scan`]: recovering topics a crash left
    /// unclean), and the sweeper that closes idle topics, keeps the open
    /// ones within `max_open_files` and deletes topics idle for their
    /// `delete_when_idle_ms`.
    pub async fn open(config: BrokerConfig) -> Result<Broker> {
        Broker::open_on(config, Arc::new(OsStorage)).await
    }

    /// [`Broker::open`] on `storage` rather than the operating system's
    /// files (a simulated disk, in tests). Its syncs are timed into the
    /// broker's [`Metrics`].
    pub async fn open_on(config: BrokerConfig, storage: Arc<dyn Storage>) -> Result<Broker> {
        Broker::open_with(config, storage, None).await
    }

    /// [`Broker::open`] of `data`, a data directory already locked (its
    /// lock is kept, never let go between the caller and the broker).
    pub async fn open_locked(config: BrokerConfig, data: DataDir) -> Result<Broker> {
        let storage = Arc::clone(data.storage());
        Broker::open_with(config, storage, Some(data)).await
    }

    async fn open_with(
        config: BrokerConfig,
        storage: Arc<dyn Storage>,
        locked: Option<DataDir>,
    ) -> Result<Broker> {
        let metrics = Metrics::new();
        let storage: Arc<dyn Storage> = Arc::new(TimedStorage::new(storage, metrics.clone()));
        let data_path = config.data.clone();
        let options = RegistryOptions {
            defaults: config.topic_defaults.clone(),
            auto_create: config.auto_create,
            recovery: config.recovery,
            upkeep: true,
            metrics: Some(metrics.clone()),
        };
        let registry = tokio::task::spawn_blocking(move || {
            let data = match locked {
                Some(data) => data.with_storage(storage),
                None => DataDir::open(storage, &data_path)?,
            };
            Registry::open(data, options)
        })
        .await
        .map_err(|e| internal("opening the data directory", e))??;
        let broker = Broker {
            inner: Arc::new(Inner {
                registry,
                runtimes: Mutex::new(HashMap::new()),
                config,
                stopping: Arc::new(AtomicBool::new(false)),
                closer: tokio::sync::Mutex::new(()),
                metrics,
                topic_events: tokio::sync::broadcast::channel(TOPIC_EVENTS_BUFFER).0,
                scan: Mutex::new(None),
                give_backs: tokio_util::task::TaskTracker::new(),
                upkeep: Arc::new(tokio::sync::Mutex::new(())),
            }),
        };
        tracing::info!(
            max_open_files = broker.inner.config.max_open_files,
            topic_idle_close_ms = broker.inner.config.topic_idle_close.as_millis() as u64,
            "topics open on use; idle ones close"
        );
        broker.start_scan();
        tokio::spawn(sweeper(
            Arc::downgrade(&broker.inner),
            broker.inner.registry.opened(),
            Arc::clone(&broker.inner.stopping),
        ));
        Ok(broker)
    }

    /// Runs [`Registry::scan`] on a thread of its own, logging what it did.
    fn start_scan(&self) {
        let weak = Arc::downgrade(&self.inner);
        let clean = self.inner.registry.clean_start();
        let scan = std::thread::Builder::new()
            .name("spool-scan".into())
            .spawn(move || {
                let Some(inner) = weak.upgrade() else { return };
                let started = std::time::Instant::now();
                let stop = Arc::clone(&inner.stopping);
                let done = inner.registry.scan(&stop, &mut |_| {});
                let millis = started.elapsed().as_millis() as u64;
                let (topics, recovered, failed) = (done.topics, done.recovered, done.failed);
                if failed == 0 {
                    tracing::info!(topics, recovered, failed, clean_start = clean, millis,
                        "start-up scan done: every topic that needed it recovered");
                } else {
                    tracing::warn!(topics, recovered, failed, clean_start = clean, millis,
                        "start-up scan done: some topics could not be recovered (logged above); requests to them get the error");
                }
            });
        match scan {
            Ok(scan) => {
                *self.inner.scan.lock().unwrap_or_else(|p| p.into_inner()) = Some(scan);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start the start-up scan; topics recover on first use");
            }
        }
    }

    /// One pass of the sweeper: closes the runtimes and files of topics
    /// unused for `topic_idle_close`, and of the least recently used ones
    /// while the open topics hold more than `max_open_files`; applies the
    /// retention of closed topics it is due for; deletes topics idle for
    /// their `delete_when_idle_ms`.
    async fn sweep(&self) {
        self.close_topics(self.file_target(), true).await;
        self.start_upkeep();
        let idle_now = timer_ms();
        for name in self.inner.registry.idle_deletable() {
            // A subscription or long-poll on it is a use, for as long as it
            // is open: counted as one now, so the topic is idle only from
            // when the last of them ends.
            let held = self
                .runtimes()
                .get(&name)
                .is_some_and(|rt| Arc::strong_count(rt) > 1);
            if held {
                self.inner.registry.touch(&name);
            }
            if held
                || self
                    .inner
                    .registry
                    .last_used_ms(&name)
                    .is_some_and(|t| t > idle_now)
            {
                continue;
            }
            let (b, n) = (self.clone(), name.clone());
            let deleted = move || {
                b.inner
                    .registry
                    .delete_if_idle(&n, idle_now, |topic| b.deleted(&n, topic.cloned()))
            };
            match blocking(deleted).await {
                Ok(Deletion::Deleted(_)) => {}
                Ok(_) | Err(Error::TopicNotFound(_)) => {}
                Err(e) => tracing::warn!(topic = %name, error = %e, "deleting an idle topic"),
            }
        }
    }

    /// Starts the upkeep of the closed topics due for it, unless the
    /// upkeep of the last sweep is still under way. Closed topics get no
    /// retention or compaction pass from a runtime: each is opened when
    /// either is due (a few per sweep), which applies its retention and
    /// measures it for compaction if that is due, and closed again,
    /// without counting as a use.
    fn start_upkeep(&self) {
        let Ok(turn) = Arc::clone(&self.inner.upkeep).try_lock_owned() else {
            return;
        };
        let due = self
            .inner
            .registry
            .upkeep_due(now_ms(), UPKEEP_OPENS_PER_SWEEP);
        if due.is_empty() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let _turn = turn;
            for name in due {
                let Some(inner) = weak.upgrade() else { return };
                if inner.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let b = Broker { inner };
                let n = name.clone();
                let (metrics, known) = (b.inner.metrics.clone(), b.clone());
                match blocking(move || b.inner.registry.closed_upkeep(&n)).await {
                    Ok(Some((dirt, stats))) => {
                        report_background_compaction(&metrics, &name, &dirt, &stats, || {
                            known.inner.registry.is_known(&name)
                        });
                    }
                    Ok(None) | Err(Error::TopicNotFound(_) | Error::Stopping(_)) => {}
                    Err(e) => {
                        tracing::warn!(topic = %name, error = %e, "upkeep of a closed topic (retention, background compaction)");
                    }
                }
            }
        });
    }

    /// What the open topics' files are brought down to when they reach it:
    /// `max_open_files` less a tenth, so a burst of opens does not close one
    /// topic per open.
    fn file_target(&self) -> usize {
        let max = self.inner.config.max_open_files;
        max - max / 10
    }

    /// Closes topics when the open ones may be at [`Broker::file_target`]
    /// (counting the fewest files a topic holds; [`Broker::close_topics`]
    /// counts exactly).
    async fn keep_budget(&self) {
        let target = self.file_target();
        if self.inner.registry.open_count() * MIN_TOPIC_FILES >= target {
            self.close_topics(target, true).await;
        }
    }

    /// Closes the topics unused for `topic_idle_close`, and the least
    /// recently used ones while the open topics hold more than
    /// `target_files`; topics a request, subscription or long-poll holds
    /// stay open. With `spare_recent`, so does a topic that alone holds
    /// `target_files` or more and was used in the last
    /// [`BUDGET_SPARES_MS`]: closing it for the budget would only have its
    /// next request open it again (a topic with more groups than the budget
    /// holds was closed and opened again every second).
    async fn close_topics(&self, target_files: usize, spare_recent: bool) {
        let _closing = self.inner.closer.lock().await;
        let now = timer_ms();
        let config = &self.inner.config;
        let idle_ms = config.topic_idle_close.as_millis() as u64;
        // On the blocking pool: the listing takes each topic's group locks,
        // which a sync of group state holds while the disk takes its time.
        let b = self.clone();
        let Ok(mut open) = blocking(move || Ok(b.inner.registry.open_topics())).await else {
            return;
        };
        open.sort_by_key(|t| t.last_used_ms);
        let mut files: usize = open.iter().map(|t| t.files).sum();
        let mut close = Vec::new();
        let mut released = false;
        {
            let mut runtimes = self.runtimes();
            for t in &open {
                let unused = now.saturating_sub(t.last_used_ms);
                let idle = unused >= idle_ms;
                // A topic in use that alone fills the budget: closing it
                // only has its next request open it again.
                let spared = spare_recent && unused < BUDGET_SPARES_MS && t.files >= target_files;
                let for_budget = files > target_files && !spared;
                if t.pinned || !(idle || for_budget) {
                    continue;
                }
                match runtimes.get(&t.name) {
                    // Held: a request, subscription or long-poll uses it, or
                    // a round of produces (whose producers may have gone)
                    // is under way and will wake its readers; its files do
                    // not count as freed.
                    Some(rt) if Arc::strong_count(rt) > 1 || rt.is_committing() => continue,
                    Some(_) => {
                        runtimes.remove(&t.name);
                        released = true;
                    }
                    None => {}
                }
                files = files.saturating_sub(t.files);
                close.push(t.name.clone());
            }
        }
        if !close.is_empty() {
            if released {
                // Lets the writer tasks of the released runtimes end.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Each close syncs and records a checkpoint: several at once.
            let mut closing = tokio::task::JoinSet::new();
            // A small budget leaves little room for the closes' own files.
            let closers = (config.max_open_files / 64).clamp(1, CLOSERS);
            for names in close.chunks(close.len().div_ceil(closers)) {
                let (b, names) = (self.clone(), names.to_vec());
                closing.spawn_blocking(move || {
                    names
                        .iter()
                        .filter(|name| b.inner.registry.close_unused(name))
                        .count()
                });
            }
            let mut closed = 0;
            while let Some(n) = closing.join_next().await {
                closed += n.unwrap_or(0);
            }
            if closed > 0 {
                tracing::debug!(closed, "closed unused topics");
            }
        }
    }

    /// Topics created and deleted from now on (a listener more than
    /// 1024 events behind is told it lagged).
    pub fn topic_events(&self) -> tokio::sync::broadcast::Receiver<TopicEvent> {
        self.inner.topic_events.subscribe()
    }

    fn topic_event(&self, event: TopicEvent) {
        // No listener is not an error.
        let _ = self.inner.topic_events.send(event);
    }

    /// The core's settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The data directory's root (transports name files relative to it).
    pub fn data_dir(&self) -> &Path {
        self.inner.registry.data().root()
    }

    /// The largest message a produce takes: `max_message_bytes`, or what
    /// the transport can deliver (`transport`) when that is smaller, since a
    /// message must fit the frame that delivers it.
    pub fn message_limit(&self, transport: MessageLimit) -> MessageLimit {
        let max = self.inner.config.max_message_bytes;
        if transport.bytes < max {
            transport
        } else {
            MessageLimit {
                bytes: max,
                setting: "max_message_bytes",
            }
        }
    }

    /// The runtime of `topic`, started if it has none. A topic deleted
    /// since the caller found it is `NOT_FOUND`: its delete may have dropped
    /// its runtime already (`retire_runtime` runs after the delete
    /// finished), so a runtime started now would never be dropped, and would
    /// replace that of a topic of the same name created since. One whose
    /// delete is only under way gets its runtime (the delete, once done,
    /// drops it; if the topic stays, it is needed).
    fn runtime_of(&self, topic: Arc<Topic>) -> Result<Arc<TopicRuntime>> {
        let mut runtimes = self.runtimes();
        match runtimes.get(topic.name()) {
            Some(rt) if Arc::ptr_eq(rt.topic(), &topic) => Ok(Arc::clone(rt)),
            _ if topic.is_gone_for_good() => Err(Error::TopicNotFound(format!(
                "topic {} does not exist",
                topic.name()
            ))),
            _ => {
                let rt = TopicRuntime::start(Arc::clone(&topic), &self.inner.metrics);
                // The runtime of a topic deleted (or closed) before: its
                // readers look again and find out, even if the delete's
                // own notice comes after this.
                if let Some(old) = runtimes.insert(topic.name().to_owned(), Arc::clone(&rt)) {
                    old.notify();
                }
                Ok(rt)
            }
        }
    }

    /// `Error::Stopping` once [`Broker::stop`] began: no topic is opened or
    /// created, and no runtime started, after its final syncs.
    fn refuse_if_stopping(&self) -> Result<()> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopping("the broker is stopping".into()));
        }
        Ok(())
    }

    fn runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TopicRuntime>>> {
        self.inner
            .runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The runtime of an existing topic, opening the topic if it is closed.
    /// An open topic is found under short locks, inline (cheaper than a
    /// hand-off to the blocking pool and back); opening one reads its files,
    /// on the blocking pool.
    pub(super) async fn existing(&self, name: &str) -> Result<Arc<TopicRuntime>> {
        self.refuse_if_stopping()?;
        let registry = &self.inner.registry;
        if let Some(topic) = registry.used_open_topic(name) {
            return self.runtime_of(topic);
        }
        let topic = self
            .opening(name, |b, name| b.inner.registry.topic(&name))
            .await?;
        self.runtime_of(topic)
    }

    /// Out of file descriptors or memory while `doing` something: closes
    /// unused topics until the open ones hold half the files they hold now.
    pub(crate) async fn make_room(&self, doing: &str) {
        let b = self.clone();
        let Ok(files) = blocking(move || {
            Ok(b.inner
                .registry
                .open_topics()
                .iter()
                .map(|t| t.files)
                .sum::<usize>())
        })
        .await
        else {
            return;
        };
        if files == 0 {
            // No topic open: nothing to close, and nothing to say each time.
            tracing::debug!("out of file descriptors or memory {doing}; no topic is open");
            return;
        }
        tracing::warn!(
            open_files = files,
            "out of file descriptors or memory {doing}: closing unused topics"
        );
        self.close_topics(files / 2, false).await;
    }

    /// Runs `open` (opening or creating topic `name`) on the blocking pool.
    /// If the process runs out of descriptors or memory (other files,
    /// connections, a budget above the limit), closes half of what the open
    /// topics hold and tries once more, so a client sees no error because
    /// other topics were open.
    async fn opening(
        &self,
        name: &str,
        open: impl Fn(&Broker, String) -> Result<Arc<Topic>> + Clone + Send + 'static,
    ) -> Result<Arc<Topic>> {
        // Make room first, so the open topics stay within the budget
        // however fast new ones are opened.
        self.keep_budget().await;
        let attempt = || {
            let (b, name, open) = (self.clone(), name.to_owned(), open.clone());
            blocking(move || open(&b, name))
        };
        match attempt().await {
            Err(Error::FilesExhausted { .. } | Error::MemoryExhausted { .. }) => {
                self.make_room(&format!("opening topic {name}")).await;
                attempt().await.inspect_err(|e| {
                    if matches!(
                        e,
                        Error::FilesExhausted { .. } | Error::MemoryExhausted { .. }
                    ) {
                        tracing::error!(topic = name, error = %e,
                            "the topic cannot be opened, even with unused topics closed");
                    }
                })
            }
            other => other,
        }
    }

    /// The runtime of `name`, creating the topic if missing and auto-create
    /// is on (`force`: whatever the setting, as for dead-letter topics).
    /// Creating makes folders and syncs them: on the blocking pool.
    async fn existing_or_create(&self, name: &str, force: bool) -> Result<Arc<TopicRuntime>> {
        // `existing` refuses once the broker stops, so nothing is created then.
        match self.existing(name).await {
            Err(Error::TopicNotFound(_)) => {
                let topic = self
                    .opening(name, move |b, name| {
                        b.inner.registry.topic_or_create(&name, force)
                    })
                    .await?;
                self.topic_event(TopicEvent::Created(name.to_owned()));
                self.runtime_of(topic)
            }
            other => other,
        }
    }

    /// Drops the runtime of a deleted topic (not that of a topic created
    /// again since) and wakes its subscriptions and long-polls, whose next
    /// read answers `NOT_FOUND`.
    fn retire_runtime(&self, topic: &Arc<Topic>) {
        let mut runtimes = self.runtimes();
        if let Some(rt) = runtimes.get(topic.name())
            && Arc::ptr_eq(rt.topic(), topic)
        {
            rt.notify();
            runtimes.remove(topic.name());
        }
    }

    /// Appends `batch` to `topic` (created on first produce if auto-create
    /// is on) through its writer; resolves once the batch is committed. A
    /// message larger than `limit` (see [`Broker::message_limit`]) refuses
    /// the whole batch.
    pub async fn produce(
        &self,
        topic: &str,
        batch: Vec<NewMessage>,
        limit: MessageLimit,
    ) -> Result<Appended> {
        let most = self.inner.config.max_batch_messages;
        if batch.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "produce to topic {topic}: messages is empty; send 1 to {most} (max_batch_messages)"
            )));
        }
        if batch.len() > most as usize {
            return Err(Error::InvalidArgument(format!(
                "produce to topic {topic}: {} messages in one batch; the limit is {most} (max_batch_messages)",
                batch.len(),
            )));
        }
        let MessageLimit {
            bytes: limit,
            setting,
        } = limit;
        for (i, m) in batch.iter().enumerate() {
            let Some(size) = record::encoded_len(m).map(|l| l - record::HEADER_LEN) else {
                let why = if m.headers.len() > usize::from(u16::MAX) {
                    format!("it has {} headers; at most 65 535", m.headers.len())
                } else if let Some((j, h)) = m
                    .headers
                    .iter()
                    .enumerate()
                    .find(|(_, h)| h.name.len() > usize::from(u16::MAX))
                {
                    format!(
                        "the name of its header {j} has {} bytes; at most 65 535",
                        h.name.len()
                    )
                } else {
                    "it has over 4 GiB of key, headers and value".to_owned()
                };
                return Err(Error::InvalidArgument(format!(
                    "produce to topic {topic}: message {i} cannot be stored: {why}"
                )));
            };
            if size > limit as usize {
                return Err(Error::InvalidArgument(format!(
                    "produce to topic {topic}: message {i} has {size} bytes of key, headers and value; the limit is {limit} ({setting})",
                )));
            }
        }
        let runtime = self.existing_or_create(topic, false).await?;
        match runtime.produce(batch).await {
            // The topic's own limit (its segments), named by its log.
            Err(Error::InvalidArgument(why)) if why.starts_with("message ") => Err(
                Error::InvalidArgument(format!("produce to topic {topic}: {why}")),
            ),
            // A new segment found no descriptor or address space: the
            // batch was not stored (one that fits a segment never is in
            // part), and unused topics close now, so a retry finds room.
            Err(e @ (Error::FilesExhausted { .. } | Error::MemoryExhausted { .. })) => {
                self.make_room(&format!("producing to topic {topic}")).await;
                Err(e)
            }
            other => other,
        }
    }

    /// One read for `target` within `limits`: replay and stream groups from
    /// `from` ([`Error::TooLarge`] when the message at `from` cannot be
    /// delivered), queue groups by lease (such a message is dead-lettered
    /// instead, through the dead-letter topic's writer).
    pub(super) async fn read(
        &self,
        runtime: &TopicRuntime,
        target: &Target,
        member: &str,
        from: Offset,
        limits: DeliveryLimits,
        identity: Option<&GroupIdentity>,
    ) -> Result<Deliveries> {
        let delivered = self
            .read_uncounted(runtime, target, member, from, limits, identity)
            .await?;
        runtime
            .counters()
            .delivered(delivered.len() as u64, delivered.content_bytes());
        Ok(delivered)
    }

    /// [`Broker::read`] without counting what it delivers.
    async fn read_uncounted(
        &self,
        runtime: &TopicRuntime,
        target: &Target,
        member: &str,
        from: Offset,
        limits: DeliveryLimits,
        identity: Option<&GroupIdentity>,
    ) -> Result<Deliveries> {
        let t = Arc::clone(runtime.topic());
        match target.clone() {
            // A read at the tail (a live subscription's or long-poll's) is a
            // few records just written, still in memory: done here, it saves
            // the hand-off to the blocking pool, which costs more than the
            // read. Unless someone holds the deletions or a group (a
            // deletion is made durable under its lock): then it is read there.
            Target::Replay if t.log().end().0.saturating_sub(from.0) <= INLINE_READ_RECORDS => {
                let records = match t.try_read_within(from, limits) {
                    Some(read) => read?,
                    None => {
                        let t = Arc::clone(&t);
                        blocking(move || t.read_within(from, limits)).await?
                    }
                };
                Ok(Deliveries::from(records))
            }
            Target::Replay => {
                let reader = Arc::clone(&t);
                Self::read_following(
                    runtime,
                    &t,
                    from,
                    limits,
                    || Some(Ok(())),
                    move || reader.read_within(from, limits),
                )
                .await
                .map(Deliveries::from)
            }
            // As a replay, once the group is checked and the member marked
            // alive (if the group is free; else on the blocking pool).
            Target::Stream(g) => {
                let (reader, group, reading) = (Arc::clone(&t), g.clone(), member.to_owned());
                let checked = || {
                    t.try_stream_reader(&g, member, Some(from))
                        .map(|r| r.map(|_| ()))
                };
                Self::read_following(runtime, &t, from, limits, checked, move || {
                    reader.fetch_stream_within(&group, &reading, Some(from), limits)
                })
                .await
                .map(Deliveries::from)
            }
            // Nothing to lease (a waiting reader woken by a produce another
            // took): answered here, empty.
            Target::Queue(g) if t.queue_is_idle(&g, member, identity, timer_ms()) == Some(true) => {
                Ok(Deliveries::default())
            }
            Target::Queue(g) => {
                // What it leases travels as a [`Leased`], which gives it
                // back wherever it is dropped untaken (the reader gone: a
                // stream cancelled, a subscription stopped). On a task of
                // its own, so that the read's durable wait and dead-letter
                // hand-off finish even then: a hand-off cut short between
                // the dead-letter topic's append and the group's completion
                // would append the letter again when next due. Tracked with
                // the give-backs, so that a stop waits for the give-back of
                // a read its own connection closes cut.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let (broker, member) = (self.clone(), member.to_owned());
                let identity = identity.cloned();
                self.inner.give_backs.spawn(async move {
                    let read = broker.lease_queue(t, &g, &member, limits, identity.as_ref());
                    let _ = tx.send(read.await);
                });
                rx.await
                    .unwrap_or_else(|_| Err(Error::Internal("a queue read stopped".into())))
                    .map(Leased::take)
            }
        }
    }

    /// Leases up to `limits` of queue group `group` to `member` (see
    /// [`Broker::read`]). A read whose every slot went to dead letters
    /// reads again, the letters now completed (or, refused by the
    /// dead-letter topic, held until tried again), so that a run of poison
    /// messages due at once does not answer empty while others wait; until
    /// it has handed off [`DEAD_LETTERS_PER_READ`] of them, or spent
    /// [`DEAD_LETTER_TIME`] at it, or met again a letter it saw refused
    /// (due again already: a short `ack_timeout_ms`). A read that leases
    /// nothing after a refused hand-off answers that refusal.
    async fn lease_queue(
        &self,
        t: Arc<Topic>,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        identity: Option<&GroupIdentity>,
    ) -> Result<Leased> {
        let mut handed_off = 0;
        let mut refusal = None;
        let mut refused_offsets = std::collections::HashSet::new();
        let started = tokio::time::Instant::now();
        loop {
            let (leased, tried, refused) = self
                .lease_queue_once(Arc::clone(&t), group, member, limits, identity)
                .await?;
            handed_off += tried.len();
            let again = refused.is_some() && tried.iter().any(|o| refused_offsets.contains(o));
            if let Some(e) = refused {
                refused_offsets.extend(tried.iter().copied());
                refusal = Some(e);
            }
            let empty = leased.deliveries.as_ref().is_none_or(|d| d.is_empty());
            if !empty
                || tried.is_empty()
                || again
                || handed_off >= DEAD_LETTERS_PER_READ
                || started.elapsed() >= DEAD_LETTER_TIME
            {
                return match refusal {
                    Some(e) if empty => Err(e),
                    _ => Ok(leased),
                };
            }
        }
    }

    /// One read of [`Broker::lease_queue`]; also says which dead letters it
    /// tried to hand off (by source offset), and the dead-letter topic's
    /// refusal of any.
    async fn lease_queue_once(
        &self,
        t: Arc<Topic>,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        identity: Option<&GroupIdentity>,
    ) -> Result<(Leased, Vec<Offset>, Option<Error>)> {
        let source = Arc::clone(&t);
        let (g, m, identity) = (group.to_owned(), member.to_owned(), identity.cloned());
        let (fetched, durable, read_from) =
            blocking(move || t.lease_queue_within(&g, &m, limits, timer_ms(), identity.as_ref()))
                .await?;
        let leased = Leased {
            broker: self.clone(),
            topic: source.name().to_owned(),
            group: group.to_owned(),
            member: member.to_owned(),
            deliveries: Some(Deliveries::leased_by(fetched.deliveries, read_from.clone())),
        };
        if let Some(wait) = durable
            && let Err(e) = wait.wait_async().await
        {
            // Its dead letters are not handed off: due again after a lease
            // time, not held for the hold.
            if !fetched.dead_letters.is_empty() {
                let offsets: Vec<Offset> = fetched.dead_letters.iter().map(|d| d.offset).collect();
                let (s, g, read_from) = (Arc::clone(&source), group.to_owned(), read_from);
                let _ = blocking(move || {
                    s.retry_dead_letters_of(&g, Some(&read_from), &offsets, timer_ms())
                })
                .await;
            }
            return Err(e);
        }
        let tried: Vec<Offset> = fetched.dead_letters.iter().map(|d| d.offset).collect();
        if !tried.is_empty() {
            // A dead letter that cannot be handed off (its topic refuses
            // it: too large for its segments, a full disk) stays pending
            // and is tried again when due; the deliveries leased beside
            // it, whose counts are synced, still go out.
            let topic = leased.topic.clone();
            let handed = self
                .dead_letter(source, group, read_from, fetched.dead_letters)
                .await;
            if let Err(e) = handed {
                tracing::warn!(topic, group, error = %e,
                    "dead-lettering failed; the messages stay pending and are tried again");
                return Ok((leased, tried, Some(e)));
            }
        }
        Ok((leased, tried, None))
    }

    /// [`subscription::target_and_start`], without a hand-off when nothing
    /// is to wait on: a replay not from a timestamp (no group state, no
    /// index) or a group no one holds; else on the blocking pool (a
    /// group's lock may be held across a sync of its state).
    async fn target_and_start(
        t: &Arc<Topic>,
        group: Option<String>,
        from: Option<Position>,
    ) -> Result<(Target, Offset)> {
        let by_timestamp = matches!(from, Some(Position::Timestamp(_)));
        let found = match &group {
            Some(g) if !by_timestamp => t.try_group_start(g),
            _ => None,
        };
        match (group, found) {
            (None, _) if !by_timestamp => subscription::target_and_start(t, None, from),
            (Some(g), Some(found)) => {
                let (mode, committed) = found?;
                subscription::group_start(t, g, mode, committed, from)
            }
            (group, _) => {
                let t = Arc::clone(t);
                blocking(move || subscription::target_and_start(&t, group, from)).await
            }
        }
    }

    /// A read of `t` from `from` within `limits` that takes what the
    /// previous read read ahead when that is still current (after
    /// `checked`; only deletions and consumption are left to apply, here),
    /// or else `read`s on the blocking pool; then reads the next batch
    /// ahead for the read after it. `checked` answers `None` when it could
    /// only check by waiting: the read then goes to the blocking pool.
    async fn read_following(
        runtime: &TopicRuntime,
        t: &Arc<Topic>,
        from: Offset,
        limits: DeliveryLimits,
        checked: impl FnOnce() -> Option<Result<()>>,
        read: impl FnOnce() -> Result<Records> + Send + 'static,
    ) -> Result<Records> {
        let ahead = match runtime.read_aheads().take(from, limits).await {
            Some(ahead) => match checked() {
                Some(check) => {
                    check?;
                    t.read_within_ahead(from, limits, ahead)
                }
                None => None,
            },
            None => None,
        };
        let records = match ahead {
            Some(read) => {
                let records = read?;
                runtime.counters().read_ahead(records.len() as u64);
                records
            }
            None => blocking(read).await?,
        };
        runtime.read_aheads().follow(t, &records, limits);
        Ok(records)
    }

    /// Hands dead letters of `source`'s queue group `group` to its
    /// dead-letter topic (created if missing, again if deleted meanwhile)
    /// through that topic's writer, makes them durable, and only then
    /// completes them in the group (the one `read_from` names, never one
    /// created again under its name meanwhile). A batch the dead-letter topic refuses
    /// (one letter too large for it) is handed off letter by letter, so one
    /// refused letter holds back no other; the error names the source
    /// offset of the first refused one, which stays pending.
    async fn dead_letter(
        &self,
        source: Arc<Topic>,
        group: &str,
        read_from: GroupIdentity,
        letters: Vec<super::DeadLetter>,
    ) -> Result<()> {
        let name = source.config().dead_letter_topic(source.name());
        let offsets: Vec<Offset> = letters.iter().map(|d| d.offset).collect();
        let messages: Vec<NewMessage> = letters.into_iter().map(|d| d.message).collect();
        let (handed, failed, refused) =
            match self.append_dead_letters(&name, messages.clone()).await {
                Ok(()) => (offsets, Vec::new(), None),
                // Only a refusal (nothing written) is tried letter by letter:
                // after any other failure part of the batch may be stored.
                Err(e) if offsets.len() == 1 || !matches!(e, Error::InvalidArgument(_)) => {
                    (Vec::new(), offsets.clone(), Some((offsets[0], e)))
                }
                Err(_) => {
                    let (mut handed, mut failed) = (Vec::new(), Vec::new());
                    let mut refused = None;
                    for (offset, message) in offsets.into_iter().zip(messages) {
                        match self.append_dead_letters(&name, vec![message]).await {
                            Ok(()) => handed.push(offset),
                            Err(e) => {
                                failed.push(offset);
                                refused.get_or_insert((offset, e));
                            }
                        }
                    }
                    (handed, failed, refused)
                }
            };
        if !failed.is_empty() {
            // Held from other reads while the hand-off ran: due again after
            // a lease time, to be tried again.
            let (s, g, read_from) = (Arc::clone(&source), group.to_owned(), read_from.clone());
            let retried = blocking(move || {
                s.retry_dead_letters_of(&g, Some(&read_from), &failed, timer_ms())
            })
            .await;
            if let Err(e) = retried {
                tracing::warn!(topic = source.name(), group, error = %e,
                    "dead letters not handed off stay held until the hold runs out");
            }
        }
        let count = handed.len();
        if count > 0 {
            let (s, g, from) = (Arc::clone(&source), group.to_owned(), read_from.clone());
            blocking(move || s.complete_dead_letters_of(&g, Some(&from), &handed)).await?;
            self.inner
                .metrics
                .dead_lettered(source.name(), group, count as u64, || {
                    !source.is_retired() && source.is_group(group, &read_from)
                });
            tracing::warn!(
                topic = source.name(),
                group,
                count,
                dlq = %name,
                "dead-lettered messages"
            );
        }
        match refused {
            None => Ok(()),
            Some((offset, Error::InvalidArgument(why))) => {
                // Refused alone: the first (and only) message of its append.
                let why = why
                    .strip_prefix("message 0 ")
                    .map_or_else(|| why.clone(), |rest| format!("it {rest}"));
                Err(Error::InvalidArgument(format!(
                    "dead letter of offset {offset} (group {group} of topic {}) refused by topic {name}: {why}",
                    source.name()
                )))
            }
            Some((_, e)) => Err(e),
        }
    }

    /// Appends `messages` to dead-letter topic `name` (created if missing,
    /// again if deleted meanwhile) and makes them durable.
    async fn append_dead_letters(&self, name: &str, messages: Vec<NewMessage>) -> Result<()> {
        let mut attempts = 0;
        loop {
            let dlq = self.existing_or_create(name, true).await?;
            match dlq.produce(messages.clone()).await {
                Ok(appended) => {
                    if appended.durability != Durability::Durable {
                        let t = Arc::clone(dlq.topic());
                        blocking(move || t.sync_log()).await?;
                    }
                    return Ok(());
                }
                Err(Error::TopicNotFound(_)) if attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads `request` (see [`FetchRequest`]); with nothing to read, waits
    /// up to `request.wait` for new messages (and, for queue groups, for
    /// leases to expire). `stop` resolving ends the wait early with what
    /// there is (nothing).
    pub async fn fetch(
        &self,
        request: FetchRequest,
        stop: impl Future<Output = ()>,
    ) -> Result<Fetched> {
        let FetchRequest {
            topic,
            group,
            from,
            member,
            limits,
            wait,
        } = request;
        let runtime = self.existing(&topic).await?;
        let deadline = tokio::time::Instant::now() + wait;
        // Taken before the first read, so an append after it wakes the long-poll.
        let mut changes = runtime.subscribe_changes();
        let t = Arc::clone(runtime.topic());
        let (target, start) = Self::target_and_start(&t, group, from).await?;
        let mut messages = self
            .read(&runtime, &target, &member, start, limits, None)
            .await?;
        let queue = matches!(target, Target::Queue(_));
        let lease_poll = subscription::lease_poll(runtime.topic());
        tokio::pin!(stop);
        let mut over = false;
        loop {
            if over || !messages.is_empty() || tokio::time::Instant::now() >= deadline {
                let next_offset = match messages.last_offset() {
                    Some(last) => last.next(),
                    // Every record from `start` to where the read stopped
                    // was deleted: the reader is past them.
                    None => messages.passed().map_or(start, |p| p.max(start)),
                };
                return Ok(Fetched {
                    messages,
                    next_offset,
                    end_offset: runtime.topic().stats().end,
                });
            }
            tokio::select! {
                _ = &mut stop => {
                    over = true;
                    continue;
                }
                changed = changes.changed() => if changed.is_err() {
                    return Err(Error::TopicNotFound(format!("topic {topic} does not exist")));
                },
                _ = tokio::time::sleep_until(deadline) => {}
                _ = tokio::time::sleep(lease_poll), if queue => {}
            }
            changes.borrow_and_update();
            messages = self
                .read(&runtime, &target, &member, start, limits, None)
                .await?;
        }
    }

    /// Starts a subscription (see [`SubscribeRequest`]). Its start is fixed
    /// here, before the caller answers the client: a subscription from
    /// `Latest` gets everything produced after the client saw the answer.
    /// Nothing is read until [`Subscription::next`].
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription> {
        let runtime = self.existing(&request.topic).await?;
        let t = Arc::clone(runtime.topic());
        // `from` is for replays only: a stream group starts at its
        // committed offset.
        let from = request.from.filter(|_| request.group.is_none());
        let (target, start) = Self::target_and_start(&t, request.group, from).await?;
        let group = match &target {
            Target::Stream(name) | Target::Queue(name) => Some(t.group_identity(name)?),
            Target::Replay => None,
        };
        Ok(Subscription::new(
            self.clone(),
            runtime,
            subscription::Reader {
                target,
                position: start,
                member: request.member,
                group,
            },
            request.max_in_flight,
            request.limits,
        ))
    }

    /// Starts a subscription to queue group `request.group` (see
    /// [`Broker::subscribe`]); refuses a stream group, as every queue-only
    /// operation does, and a request without a group.
    pub async fn subscribe_queue(&self, request: SubscribeRequest) -> Result<Subscription> {
        let Some(group) = request.group.clone() else {
            return Err(Error::InvalidArgument(format!(
                "a queue subscription to topic {} names its group",
                request.topic
            )));
        };
        let t = Arc::clone(self.existing(&request.topic).await?.topic());
        blocking(move || t.require_queue(&group)).await?;
        self.subscribe(request).await
    }

    /// Acknowledges `offsets` for queue group `group` (confirmed once
    /// durable). A stream group takes acks only from a subscription
    /// (`for_subscription`), where they return credit and nothing else.
    pub async fn ack(
        &self,
        topic: &str,
        group: &str,
        offsets: Vec<Offset>,
        for_subscription: bool,
    ) -> Result<()> {
        self.ack_of(topic, group, None, offsets, for_subscription)
            .await
    }

    /// [`Broker::ack`] of what a reader of the group `identity` names
    /// was handed: nothing is done when the topic's group of that name is
    /// another now (deleted and created again, or its topic was), whose
    /// offsets those are not.
    pub(crate) async fn ack_of(
        &self,
        topic: &str,
        group: &str,
        identity: Option<&GroupIdentity>,
        offsets: Vec<Offset>,
        for_subscription: bool,
    ) -> Result<()> {
        check_offset_count(offsets.len())?;
        let t = Arc::clone(self.existing(topic).await?.topic());
        let group = group.to_owned();
        let identity = identity.cloned();
        let durable = blocking(move || match t.group_mode(&group) {
            // The offsets are checked before the group is found missing
            // (protocol.md §4: what needs only the topic comes first).
            Err(e @ Error::GroupNotFound(_)) => Err(t.check_offsets(&offsets).err().unwrap_or(e)),
            Err(e) => Err(e),
            // A group of the name made since: not what the reader read.
            Ok(GroupMode::Queue) if identity.is_some() => {
                match t.ack_later_as(&group, identity.as_ref(), &offsets) {
                    Err(Error::GroupNotFound(_)) => Ok(None),
                    other => other,
                }
            }
            Ok(GroupMode::Queue) => t.ack_later(&group, &offsets),
            Ok(GroupMode::Stream) if for_subscription => Ok(None),
            Ok(GroupMode::Stream) => Err(Error::InvalidArgument(format!(
                "group {group} of topic {} is a stream group: commit offsets instead",
                t.name()
            ))),
        })
        .await?;
        match durable {
            Some(wait) => wait.wait_async().await,
            None => Ok(()),
        }
    }

    /// Gives `offsets` back to queue group `group`, deliverable again after
    /// `delay_ms`; returns how many were requeued.
    pub async fn nack(
        &self,
        topic: &str,
        group: &str,
        offsets: Vec<Offset>,
        delay_ms: u64,
    ) -> Result<usize> {
        // The request's own field before the topic (protocol.md §4).
        super::topic::check_delay(delay_ms)?;
        check_offset_count(offsets.len())?;
        let runtime = self.existing(topic).await?;
        let t = Arc::clone(runtime.topic());
        let group = group.to_owned();
        let requeued = blocking(move || t.nack(&group, &offsets, delay_ms)).await?;
        runtime.notify();
        Ok(requeued)
    }

    /// Extends the leases `member` holds on `offsets` in queue group
    /// `group` to `ack_timeout_ms` from now (the group's ack timeout when
    /// `None`); returns the offsets extended (the others are not leased to
    /// `member`: acked, expired, given back or another member's).
    pub async fn extend_leases(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        offsets: Vec<Offset>,
        ack_timeout_ms: Option<u64>,
    ) -> Result<Vec<Offset>> {
        self.extend_leases_of(topic, group, None, member, offsets, ack_timeout_ms)
            .await
    }

    /// [`Broker::extend_leases`] in the group `read_from` names, if given
    /// (one created again under its name is another group: `NOT_FOUND`).
    pub(crate) async fn extend_leases_of(
        &self,
        topic: &str,
        group: &str,
        read_from: Option<GroupIdentity>,
        member: &str,
        offsets: Vec<Offset>,
        ack_timeout_ms: Option<u64>,
    ) -> Result<Vec<Offset>> {
        check_offset_count(offsets.len())?;
        let t = Arc::clone(self.existing(topic).await?.topic());
        let (group, member) = (group.to_owned(), member.to_owned());
        blocking(move || {
            t.extend_leases_of(
                &group,
                read_from.as_ref(),
                &member,
                &offsets,
                ack_timeout_ms,
            )
        })
        .await
    }

    /// Gives back, deliverable at once, the leases `member` still holds in
    /// queue group `group` from the deliveries `leased` names, `(offset,
    /// delivery)` each (a consumer leaving: one that ran out and was leased
    /// again, even to the same member name, is another consumer's); returns
    /// how many were given back.
    pub async fn release_leases(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        leased: Vec<(u64, u32)>,
    ) -> Result<usize> {
        self.release(topic, group, member, Release::Delivered(leased, None))
            .await
    }

    /// [`Broker::release_leases`] in the group `read_from` names, if given
    /// (a group created again under its name never leased them).
    pub(crate) async fn release_leases_of(
        &self,
        topic: &str,
        group: &str,
        read_from: Option<GroupIdentity>,
        member: &str,
        leased: Vec<(u64, u32)>,
    ) -> Result<usize> {
        self.release(topic, group, member, Release::Delivered(leased, read_from))
            .await
    }

    /// Gives back, due at once, the queue deliveries among `messages` that
    /// a read of group `group` leased to `member` and that never reached
    /// the client (its token may no longer read them): as for a read
    /// nobody took, those deliveries do not count toward `max_deliveries`.
    /// Replay and stream-group messages lease nothing and are passed by.
    /// Returns once they are given back (before anything else of the
    /// caller's, such as giving back all its member holds, counted).
    pub async fn give_back(&self, topic: &str, group: &str, member: &str, messages: Deliveries) {
        if messages.iter().all(|d| d.delivery() == 0) {
            return;
        }
        let leased = messages
            .iter()
            .map(|d| (d.offset(), d.delivery()))
            .collect();
        let read_from = messages.group().cloned();
        let broker = self.clone();
        let (topic, group, member) = (topic.to_owned(), group.to_owned(), member.to_owned());
        // On a task of its own (tracked, as a stop waits for it): a caller
        // cancelled meanwhile does not cut it short.
        let task = self.inner.give_backs.spawn(async move {
            let released = broker
                .release(&topic, &group, &member, Release::Unread(leased, read_from))
                .await;
            if let Err(e) = released {
                tracing::debug!(topic, group, error = %e,
                    "giving back the leases of messages never sent");
            }
        });
        let _ = task.await;
    }

    /// Gives back every lease `member` holds in queue group `group` of
    /// `topic` (a consumer gone, whatever it was handed).
    pub async fn release_member(&self, topic: &str, group: &str, member: &str) -> Result<usize> {
        self.release(topic, group, member, Release::All).await
    }

    /// Gives back, due at once, the leases of `member` that `which` names.
    async fn release(
        &self,
        topic: &str,
        group: &str,
        member: &str,
        which: Release,
    ) -> Result<usize> {
        let runtime = self.existing(topic).await?;
        let t = Arc::clone(runtime.topic());
        let (group, member) = (group.to_owned(), member.to_owned());
        let released = blocking(move || match &which {
            Release::Delivered(leased, read_from) => {
                t.release_deliveries(&group, read_from.as_ref(), &member, leased, false)
            }
            Release::All => t.release_member(&group, &member),
            Release::Unread(leased, read_from) => {
                t.release_deliveries(&group, read_from.as_ref(), &member, leased, true)
            }
        })
        .await?;
        runtime.notify();
        Ok(released)
    }

    /// Commits `offset` for stream group `group`.
    pub async fn commit(&self, topic: &str, group: &str, offset: Offset) -> Result<()> {
        let t = Arc::clone(self.existing(topic).await?.topic());
        let group = group.to_owned();
        blocking(move || t.commit(&group, offset)).await
    }

    /// Moves group `group` to `to`; returns the offset it now reads from.
    pub async fn seek(&self, topic: &str, group: &str, to: Position) -> Result<Offset> {
        let runtime = self.existing(topic).await?;
        let t = Arc::clone(runtime.topic());
        let group = group.to_owned();
        let offset = blocking(move || t.seek(&group, to)).await?;
        runtime.notify();
        Ok(offset)
    }

    /// Deletes messages of `topic` by offset.
    pub async fn delete(&self, topic: &str, offsets: Vec<Offset>) -> Result<()> {
        check_offset_count(offsets.len())?;
        let t = Arc::clone(self.existing(topic).await?.topic());
        blocking(move || t.delete(&offsets)).await
    }

    /// Creates topic `name` with `config` and starts its runtime.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        let topic = self
            .opening(name, move |b, name| {
                b.inner.registry.create_topic(&name, config.clone())
            })
            .await?;
        let info = TopicInfo::of(&topic);
        match self.runtime_of(topic) {
            Ok(_) => self.topic_event(TopicEvent::Created(name.to_owned())),
            // A delete that raced this create came after it and is done
            // (its watchers heard of it): the create still took place.
            Err(Error::TopicNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(info)
    }

    /// Every topic, by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let b = self.clone();
        blocking(move || Ok(b.inner.registry.infos())).await
    }

    /// Topic `name`.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let runtime = self.existing(name).await?;
        Ok(TopicInfo::of(runtime.topic()))
    }

    /// Deletes topic `name` with all its data; its subscriptions and
    /// long-polls end with `NOT_FOUND`.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let (b, n) = (self.clone(), name.to_owned());
        blocking(move || {
            b.inner
                .registry
                .delete_topic_then(&n, |topic| b.deleted(&n, topic.cloned()))
        })
        .await?;
        Ok(())
    }

    /// What follows the delete of topic `name` (its topic object when it
    /// was open): closed or open, its series go and its watchers hear of
    /// it; an open one's runtime is dropped.
    fn deleted(&self, name: &str, topic: Option<Arc<Topic>>) {
        if let Some(topic) = topic {
            self.retire_runtime(&topic);
        }
        self.inner.metrics.forget_topic(name);
        self.topic_event(TopicEvent::Deleted(name.to_owned()));
    }

    /// Creates group `group` of `topic`.
    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        mode: GroupMode,
        start: Position,
    ) -> Result<GroupInfo> {
        // The request's own field before the topic (protocol.md §4).
        super::config::validate_name("group", group)?;
        let t = Arc::clone(self.existing(topic).await?.topic());
        let (creating, name) = (Arc::clone(&t), group.to_owned());
        let info = blocking(move || creating.create_group(&name, mode, start)).await?;
        if mode == GroupMode::Queue {
            self.inner.metrics.queue_group(topic, group, || {
                !t.is_retired() && t.group_identity(group).is_ok()
            });
        }
        Ok(info)
    }

    /// The groups of `topic`.
    pub async fn list_groups(&self, topic: &str) -> Result<Vec<GroupInfo>> {
        let t = Arc::clone(self.existing(topic).await?.topic());
        blocking(move || t.list_groups()).await
    }

    /// Group `group` of `topic`.
    pub async fn describe_group(&self, topic: &str, group: &str) -> Result<GroupInfo> {
        let t = Arc::clone(self.existing(topic).await?.topic());
        let group = group.to_owned();
        blocking(move || t.describe_group(&group)).await
    }

    /// Deletes group `group` of `topic`.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        let t = Arc::clone(self.existing(topic).await?.topic());
        let g = group.to_owned();
        blocking(move || t.delete_group(&g)).await?;
        self.inner.metrics.forget_group(topic, group);
        // Its subscriptions and long-polls end now (NOT_FOUND at their next
        // read), not at the topic's next produce.
        if let Some(runtime) = self.runtimes().get(topic) {
            runtime.notify();
        }
        Ok(())
    }

    /// Compacts one topic, or every topic; returns each topic's figures.
    /// Produce and consume go on meanwhile: compaction touches sealed
    /// segments only and swaps each one in under the writer's lock.
    pub async fn compact(&self, topic: Option<&str>) -> Result<Vec<(String, CompactStats)>> {
        let (b, topic) = (self.clone(), topic.map(str::to_owned));
        let done =
            blocking(move || b.inner.registry.compact(topic.as_deref(), &mut |_| {})).await?;
        for (name, stats) in &done {
            let reclaimed = stats.bytes_before.saturating_sub(stats.bytes_after);
            if stats.segments_rewritten + stats.segments_deleted > 0 {
                self.inner
                    .metrics
                    .cleanup(name, Cleanup::Compaction, reclaimed, || {
                        self.inner.registry.is_known(name)
                    });
                tracing::info!(
                    topic = %name,
                    bytes_before = stats.bytes_before,
                    bytes_after = stats.bytes_after,
                    records_removed = stats.records_removed,
                    millis = stats.millis,
                    "compaction (admin request)"
                );
            }
        }
        Ok(done)
    }

    /// The metrics every transport and topic counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Every metric in the OpenMetrics text format: the counters, and the
    /// gauges of the open topics and their groups, read from memory (a
    /// closed topic is idle: its gauges come back when it is next used).
    /// On the blocking pool, like [`Broker::readiness`].
    pub async fn encode_metrics(&self) -> Result<String> {
        let topics = self.open_topics();
        let b = self.clone();
        blocking(move || {
            let snapshots: Vec<TopicSnapshot> = topics
                .iter()
                .filter(|t| !t.is_retired())
                .map(|t| {
                    let groups = t.list_groups().unwrap_or_default();
                    // Each queue group's dead-letter series, at 0 until a
                    // message is dead-lettered (not for one deleted since).
                    for g in groups.iter().filter(|g| g.mode == GroupMode::Queue) {
                        b.inner.metrics.queue_group(t.name(), &g.name, || {
                            !t.is_retired() && t.group_identity(&g.name).is_ok()
                        });
                    }
                    TopicSnapshot {
                        name: t.name().to_owned(),
                        stats: t.stats(),
                        read_only: t.is_read_only(),
                        groups,
                    }
                })
                .collect();
            let total = b.inner.registry.names().len();
            Ok(b.inner.metrics.encode(total, &snapshots))
        })
        .await
    }

    /// The open topics: those with a runtime, and those open in the
    /// registry without one (a read-only topic whose idle close failed, one
    /// the start-up scan or a listing opened).
    fn open_topics(&self) -> Vec<Arc<Topic>> {
        let mut topics: std::collections::BTreeMap<String, Arc<Topic>> = self
            .runtimes()
            .values()
            .map(|rt| (rt.topic().name().to_owned(), Arc::clone(rt.topic())))
            .collect();
        for topic in self.inner.registry.open_handles() {
            topics.entry(topic.name().to_owned()).or_insert(topic);
        }
        topics.into_values().collect()
    }

    /// Whether the broker takes writes: `Err` names why not (stopping, or
    /// the topics a failed sync made read-only).
    ///
    /// A read-only topic stays open until restart, so the open ones are all
    /// there is to look at. Looking runs on the blocking pool: a topic's
    /// writer and group locks are held across their syncs.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        if self.inner.stopping.load(Ordering::Relaxed) {
            return Err("the broker is stopping".into());
        }
        let topics = self.open_topics();
        let mut read_only = blocking(move || {
            Ok(topics
                .iter()
                .filter(|t| !t.is_retired() && t.is_read_only())
                .map(|t| t.name().to_owned())
                .collect::<Vec<String>>())
        })
        .await
        .map_err(|e| e.to_string())?;
        if read_only.is_empty() {
            return Ok(());
        }
        read_only.sort();
        Err(format!(
            "read-only after a failed sync or write (until restart): topic {}",
            read_only.join(", topic ")
        ))
    }

    /// Stops every topic's tasks, syncs every topic and releases it. The
    /// data directory's lock goes with the last handle.
    pub async fn stop(&self) -> Result<()> {
        // Reads the stop's own connection closes cut give their leases
        // back first, uncounted, while requests are still taken.
        let give_backs = &self.inner.give_backs;
        give_backs.close();
        if tokio::time::timeout(GIVE_BACK_WAIT, give_backs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = give_backs.len(),
                "stopping without waiting longer for the give-back of reads nobody took; their deliveries count toward max_deliveries"
            );
        }
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.runtimes().clear();
        let b = self.clone();
        tokio::task::spawn_blocking(move || {
            let scan = b
                .inner
                .scan
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(scan) = scan {
                let _ = scan.join();
            }
            b.inner.registry.stop_all()
        })
        .await
        .map_err(|e| internal("final sync", e))?
    }
}

/// The broker's one background loop over its topics (see [`Broker::sweep`]):
/// every [`SWEEP_EVERY`], and at once when a topic is opened, until the
/// broker stops or goes away.
async fn sweeper(inner: Weak<Inner>, opened: Arc<tokio::sync::Notify>, stopping: Arc<AtomicBool>) {
    let mut interval = tokio::time::interval(SWEEP_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // An open only asks for the budget to be kept; the full pass (idle
        // topics, idle deletion) runs on the tick.
        let full = tokio::select! {
            _ = interval.tick() => true,
            _ = opened.notified() => false,
        };
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        let broker = Broker { inner };
        if full {
            broker.sweep().await;
        } else {
            broker.keep_budget().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::GroupMode;
    use crate::storage::io::SimDisk;

    async fn broker_on(disk: &Arc<SimDisk>) -> Broker {
        let mut topic_defaults = TopicConfig::default();
        topic_defaults.log.fsync = crate::storage::FsyncPolicy::Always;
        Broker::open_on(
            BrokerConfig {
                data: "/sim/data".into(),
                topic_defaults,
                auto_create: false,
                recovery: Default::default(),
                max_message_bytes: 1 << 20,
                max_batch_messages: 1000,
                max_open_files: 1024,
                topic_idle_close: Duration::from_secs(60),
            },
            Arc::clone(disk) as Arc<dyn Storage>,
        )
        .await
        .expect("broker on the simulated disk")
    }

    const LIMITS: DeliveryLimits = DeliveryLimits {
        messages: 10,
        bytes: 1 << 20,
        message_bytes: 1 << 20,
    };

    /// The deliveries a queue read of `jobs`/`workers` hands out.
    async fn read_deliveries(broker: &Broker) -> Vec<u32> {
        let t = Arc::clone(broker.existing("jobs").await.expect("topic").topic());
        broker
            .lease_queue(t, "workers", "w", LIMITS, None)
            .await
            .expect("read")
            .take()
            .iter()
            .map(|d| d.delivery())
            .collect()
    }

    /// A broker on `disk` with topic `jobs`, queue group `workers` and one
    /// message in it.
    async fn jobs_with_one_message(disk: &Arc<SimDisk>) -> Broker {
        let broker = broker_on(disk).await;
        broker
            .create_topic("jobs", TopicConfig::default())
            .await
            .expect("create");
        broker
            .create_group("jobs", "workers", GroupMode::Queue, Position::Earliest)
            .await
            .expect("group");
        let message = NewMessage {
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            value: bytes::Bytes::from_static(b"job"),
        };
        let limit = MessageLimit {
            bytes: 1 << 20,
            setting: "max_message_bytes",
        };
        broker
            .produce("jobs", vec![message], limit)
            .await
            .expect("produce");
        broker
    }

    /// Deletes group `workers` of `jobs` and creates it again, empty.
    async fn recreate_workers(broker: &Broker) {
        broker
            .delete_group("jobs", "workers")
            .await
            .expect("delete");
        broker
            .create_group("jobs", "workers", GroupMode::Queue, Position::Earliest)
            .await
            .expect("group again");
    }

    /// Stops `broker`, opens the data on `disk` again and checks that the
    /// message of `jobs` comes to the next reader as its first delivery.
    async fn stop_and_find_the_delivery_taken_back(broker: Broker, disk: &Arc<SimDisk>) {
        broker.stop().await.expect("stop");
        drop(broker);
        let broker = broker_on(disk).await;
        assert_eq!(
            read_deliveries(&broker).await,
            [1],
            "the cut read's delivery was taken back"
        );
        broker.stop().await.expect("stop");
    }

    // One thread: the give-back cannot run before the stop unless the stop
    // waits for it.
    #[tokio::test]
    async fn a_read_cut_by_the_stop_gives_its_deliveries_back_uncounted() {
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        // A read whose reader went away as the broker stopped (its
        // connection closed by the stop): dropped untaken, then the stop.
        let t = Arc::clone(broker.existing("jobs").await.expect("topic").topic());
        let cut = broker
            .lease_queue(t, "workers", "gone", LIMITS, None)
            .await
            .expect("read");
        drop(cut);
        stop_and_find_the_delivery_taken_back(broker, &disk).await;
    }

    #[tokio::test]
    async fn a_message_that_cannot_be_stored_is_told_why() {
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        let limit = MessageLimit {
            bytes: 64 << 20,
            setting: "max_message_bytes",
        };
        let many = NewMessage {
            headers: vec![crate::storage::Header::new("h", bytes::Bytes::new()); 70_000],
            ..NewMessage::from_value("v")
        };
        let long_name = NewMessage::from_value("v")
            .with_header("a", "1")
            .with_header("n".repeat(70_000), "2");
        for (message, why) in [
            (
                many,
                "message 0 cannot be stored: it has 70000 headers; at most 65 535",
            ),
            (
                long_name,
                "message 0 cannot be stored: the name of its header 1 has 70000 bytes; at most 65 535",
            ),
        ] {
            let refused = broker.produce("jobs", vec![message], limit).await;
            assert!(
                matches!(&refused, Err(Error::InvalidArgument(e)) if e.contains(why)),
                "{refused:?}"
            );
        }
        broker.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_give_back_leaves_a_group_created_again_under_its_name_alone() {
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        let t = Arc::clone(broker.existing("jobs").await.expect("topic").topic());
        let old = broker
            .lease_queue(Arc::clone(&t), "workers", "w", LIMITS, None)
            .await
            .expect("read")
            .take();
        recreate_workers(&broker).await;
        // The new group leases the same offset, as the same delivery, to a
        // member of the same name; then the old read's messages come back
        // unsent (its token was narrowed, its connection closed).
        assert_eq!(read_deliveries(&broker).await, [1]);
        broker.give_back("jobs", "workers", "w", old).await;
        let other = broker
            .lease_queue(t, "workers", "other", LIMITS, None)
            .await
            .expect("read")
            .take();
        assert!(
            other.is_empty(),
            "the new group's lease was given back by the old group's read: {:?}",
            other.iter().map(|d| d.delivery()).collect::<Vec<_>>()
        );
        broker.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_read_for_a_group_created_again_under_its_name_leases_nothing() {
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        let t = Arc::clone(broker.existing("jobs").await.expect("topic").topic());
        // A subscription's group, then deleted and created again between
        // its check and its read.
        let identity = t.group_identity("workers").expect("identity");
        recreate_workers(&broker).await;
        let read = broker
            .lease_queue(t, "workers", "old", LIMITS, Some(&identity))
            .await;
        assert!(
            matches!(&read, Err(Error::GroupNotFound(e)) if e.contains("was deleted")),
            "{:?}",
            read.map(|r| r.take().len())
        );
        assert_eq!(
            read_deliveries(&broker).await,
            [1],
            "the new group's message was not leased to the old group's reader"
        );
        broker.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_subscription_of_a_topic_deleted_and_created_again_ends() {
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        let mut subscription = broker
            .subscribe(SubscribeRequest {
                topic: "jobs".into(),
                group: None,
                from: Some(Position::Latest),
                member: "m".into(),
                max_in_flight: 10,
                limits: LIMITS,
            })
            .await
            .expect("subscribe");
        let waiting = tokio::spawn(async move { subscription.next().await });
        tokio::task::yield_now().await;
        // The delete's notice to the topic's runtime comes only after a
        // create under the same name has started a runtime of its own.
        let b = broker.clone();
        let deleted = blocking(move || b.inner.registry.delete_topic("jobs"))
            .await
            .expect("delete");
        broker
            .create_topic("jobs", TopicConfig::default())
            .await
            .expect("create again");
        // A request on the new topic (a produce) starts its runtime.
        broker.existing("jobs").await.expect("runtime");
        broker.deleted("jobs", deleted);
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the subscription ends")
            .expect("task");
        assert!(
            matches!(ended, Some(Err(Error::TopicNotFound(_)))),
            "{ended:?}"
        );
        broker.stop().await.expect("stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_still_under_way_when_the_stop_begins_gives_its_deliveries_back() {
        use crate::storage::io::SimOp;
        let disk = Arc::new(SimDisk::new());
        let broker = jobs_with_one_message(&disk).await;
        // The group's syncs take their time: the read that leases is still
        // waiting for its delivery count to be durable when its reader goes.
        disk.set_hook(Some(Arc::new(|op, path: &Path| {
            if op == SimOp::SyncData && path.to_string_lossy().contains("groups") {
                std::thread::sleep(Duration::from_millis(300));
            }
        })));
        let runtime = broker.existing("jobs").await.expect("topic");
        let read = {
            let (broker, runtime) = (broker.clone(), Arc::clone(&runtime));
            tokio::spawn(async move {
                let target = Target::Queue("workers".into());
                broker
                    .read(&runtime, &target, "gone", Offset(0), LIMITS, None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        read.abort();
        drop(runtime);
        disk.set_hook(None);
        stop_and_find_the_delivery_taken_back(broker, &disk).await;
    }
}
