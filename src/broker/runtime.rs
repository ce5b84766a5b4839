//! The async side of one topic: a single writer task that owns appends
//! (group commit: drain every pending batch, write each, sync once, answer
//! all), a change signal that wakes subscriptions and long-polls, the
//! fsync-interval ticker, and background compaction when the topic asks for
//! it (`compact_min_dirty_ratio`).
//!
//! Once the topic is deleted ([`crate::broker::Topic::is_retired`]) the
//! ticker and the compactor stop, and the writer answers `NOT_FOUND` to what
//! is still queued; it ends with the last handle of the runtime.

use crate::broker::{GroupCommit, Topic};
use crate::error::{Error, Result};
use crate::metrics::{Cleanup, Metrics, TopicCounters};
use crate::storage::log::now_ms;
use crate::storage::{Appended, FsyncPolicy, NewMessage};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// How often a topic's recovery point is recorded while it changes (see
/// [`crate::storage::checkpoint`]): damage in bytes synced within this much
/// time before an unclean stop may be taken for a torn write.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most batches one group commit takes from the queue.
const MAX_GROUP: usize = 1024;
/// Produce requests queued per topic before producers wait.
const QUEUE_DEPTH: usize = 4096;

/// A produce waiting for the writer.
#[derive(Debug)]
struct ProduceJob {
    batch: Vec<NewMessage>,
    reply: oneshot::Sender<Result<Appended>>,
}

/// A topic with its writer task and change signal.
#[derive(Debug)]
pub struct TopicRuntime {
    topic: Arc<Topic>,
    produce_tx: mpsc::Sender<ProduceJob>,
    changed: watch::Sender<u64>,
    /// This topic's produced and delivered counters.
    counters: TopicCounters,
}

impl TopicRuntime {
    /// Starts the writer (and, under `fsync=interval`, the ticker) of
    /// `topic`, counting into `metrics`.
    pub fn start(topic: Arc<Topic>, metrics: &Metrics) -> Arc<TopicRuntime> {
        let (produce_tx, produce_rx) = mpsc::channel(QUEUE_DEPTH);
        let (changed, _) = watch::channel(0u64);
        let runtime = Arc::new(TopicRuntime {
            counters: metrics.topic(topic.name()),
            topic,
            produce_tx,
            changed,
        });
        let sealed = Arc::new(Notify::new());
        tokio::spawn(writer(
            Arc::clone(&runtime.topic),
            produce_rx,
            runtime.changed.clone(),
            Arc::clone(&sealed),
        ));
        let weak = || Arc::downgrade(&runtime);
        let config = runtime.topic.config();
        if let Some(every) = retention_check_interval(config) {
            let metrics = metrics.clone();
            tokio::spawn(periodic(
                weak(),
                Schedule::now_and_every(every).or_when(sealed),
                "retention",
                retention_pass,
                move |topic, reclaimed| {
                    if let Some(bytes) = reclaimed {
                        metrics.cleanup(topic, Cleanup::Retention, bytes);
                    }
                },
            ));
        }
        if let FsyncPolicy::Interval(ms) = config.log.fsync {
            let every = Duration::from_millis(ms.max(1));
            tokio::spawn(periodic(
                weak(),
                Schedule::now_and_every(every),
                "fsync-interval tick",
                Topic::tick,
                |_, ()| {},
            ));
        }
        tokio::spawn(periodic(
            weak(),
            Schedule::every(CHECKPOINT_EVERY),
            "recording the recovery point",
            Topic::checkpoint,
            |_, ()| {},
        ));
        if let Some(ratio) = config.compact_min_dirty_ratio {
            let metrics = metrics.clone();
            let every = Duration::from_millis(config.compact_check_ms.max(1));
            tokio::spawn(periodic(
                weak(),
                Schedule::every(every),
                "background compaction",
                move |t: &Topic| t.compact_if_dirty(now_ms(), ratio),
                move |topic, done| {
                    if let Some((dirt, stats)) = done {
                        if stats.segments_rewritten + stats.segments_deleted > 0 {
                            metrics.cleanup(
                                topic,
                                Cleanup::Compaction,
                                stats.bytes_before.saturating_sub(stats.bytes_after),
                            );
                        }
                        tracing::info!(
                            topic,
                            dirty_ratio = dirt.ratio(),
                            bytes_before = stats.bytes_before,
                            bytes_after = stats.bytes_after,
                            records_removed = stats.records_removed,
                            millis = stats.millis,
                            "background compaction"
                        );
                    }
                },
            ));
        }
        runtime
    }

    /// The topic.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// This topic's produced and delivered counters.
    pub fn counters(&self) -> &TopicCounters {
        &self.counters
    }

    /// Appends through the writer task; resolves once the batch is committed.
    pub async fn produce(&self, batch: Vec<NewMessage>) -> Result<Appended> {
        let (messages, bytes) = (batch.len() as u64, payload_bytes(&batch));
        let (reply, rx) = oneshot::channel();
        // Only a writer that panicked drops its queue: an internal failure.
        let unavailable = || {
            Error::Internal(format!(
                "producing to topic {}: its writer stopped",
                self.topic.name()
            ))
        };
        self.produce_tx
            .send(ProduceJob { batch, reply })
            .await
            .map_err(|_| unavailable())?;
        let appended = rx.await.map_err(|_| unavailable())??;
        self.counters.produced(messages, bytes);
        Ok(appended)
    }

    /// A receiver that changes whenever there is something new to deliver.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes subscriptions (after a nack, seek or anything else that makes
    /// messages deliverable without new appends).
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

async fn writer(
    topic: Arc<Topic>,
    mut rx: mpsc::Receiver<ProduceJob>,
    changed: watch::Sender<u64>,
    sealed: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let segments = topic.log().segments().len();
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let t = Arc::clone(&topic);
        let commit = move || {
            let result = t.produce_batches(jobs.iter().map(|j| &j.batch[..]));
            (jobs, result)
        };
        // On a multi-thread runtime the commit blocks this worker in place
        // (tokio hands its other tasks to another worker), so the writer
        // goes on the moment the sync returns, with no wake-up of a pool
        // thread to start it and none of this task to finish it.
        let done = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio::task::block_in_place(commit)
            }))
            .map_err(|_| ())
        } else {
            tokio::task::spawn_blocking(commit).await.map_err(|_| ())
        };
        let Ok((jobs, result)) = done else {
            tracing::error!(
                topic = topic.name(),
                "writer task panicked; topic stops accepting writes"
            );
            return;
        };
        if topic.log().segments().len() != segments {
            // A segment was sealed: retention may have something to drop.
            sealed.notify_one();
        }
        let GroupCommit { written, committed } = match result {
            Ok(done) => done,
            Err(e) => {
                // Deleted: nothing was written.
                for job in jobs {
                    let _ = job.reply.send(Err(duplicate(&e)));
                }
                continue;
            }
        };
        for (job, result) in jobs.into_iter().zip(written) {
            let reply = match (result, &committed) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(Err(e))) => Err(duplicate(e)),
                (Ok((first, last)), Some(Ok(durability))) => Ok(Appended {
                    first,
                    last,
                    durability: *durability,
                }),
                (Ok(_), None) => Err(Error::Internal(format!(
                    "producing to topic {}: commit result missing",
                    topic.name()
                ))),
            };
            let _ = job.reply.send(reply);
        }
        changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// A copy of `e` for each of the producers one failed group commit answers
/// (the error type is not `Clone`: it carries `io::Error`s). The copy reads
/// and maps to a status code the same as the original.
fn duplicate(e: &Error) -> Error {
    let io = |s: &std::io::Error| std::io::Error::new(s.kind(), s.to_string());
    match e {
        Error::Io { context, source } => Error::Io {
            context: context.clone(),
            source: io(source),
        },
        Error::Full { context, source } => Error::Full {
            context: context.clone(),
            source: io(source),
        },
        Error::FilesExhausted { context, source } => Error::FilesExhausted {
            context: context.clone(),
            source: io(source),
        },
        Error::MemoryExhausted { context, source } => Error::MemoryExhausted {
            context: context.clone(),
            source: io(source),
        },
        Error::Corruption(c) => Error::Corruption(c.clone()),
        Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
        Error::TopicNotFound(m) => Error::TopicNotFound(m.clone()),
        Error::GroupNotFound(m) => Error::GroupNotFound(m.clone()),
        Error::NotFound(m) => Error::NotFound(m.clone()),
        Error::Internal(m) => Error::Internal(m.clone()),
        Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
        Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
        Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
        Error::TooLarge {
            offset,
            size,
            limit,
        } => Error::TooLarge {
            offset: *offset,
            size: *size,
            limit: *limit,
        },
        Error::Locked { dir, pid } => Error::Locked {
            dir: dir.clone(),
            pid: pid.clone(),
        },
        Error::ReadOnly { log, cause } => Error::ReadOnly {
            log: log.clone(),
            cause: cause.clone(),
        },
    }
}

/// Bytes of key, headers and value of `batch` (what the produced and
/// delivered byte counters count).
fn payload_bytes(batch: &[NewMessage]) -> u64 {
    batch
        .iter()
        .map(|m| crate::metrics::payload_bytes(m.key.as_ref(), &m.headers, &m.value))
        .sum()
}

/// One retention pass over `topic`: the bytes of the segments it dropped,
/// `None` when it dropped none.
fn retention_pass(topic: &Topic) -> Result<Option<u64>> {
    let before = topic.log().segments();
    let dropped = topic.enforce_retention(now_ms())?;
    if dropped.is_empty() {
        return Ok(None);
    }
    let bytes = before
        .iter()
        .filter(|s| dropped.iter().any(|d| d.0 == s.base()))
        .map(|s| s.size())
        .sum();
    Ok(Some(bytes))
}

/// How often the retention task looks at a topic (besides after every
/// seal): a tenth of `retention_ms`, between 100 ms and a minute; `None`
/// when the topic has no retention.
pub fn retention_check_interval(config: &crate::broker::TopicConfig) -> Option<Duration> {
    let log = &config.log;
    if log.retention_bytes.is_none() && log.retention_ms.is_none() {
        return None;
    }
    let ms = log
        .retention_ms
        .map_or(60_000, |ms| (ms / 10).clamp(100, 60_000));
    Some(Duration::from_millis(ms))
}

/// When a topic's periodic task runs.
struct Schedule {
    every: Duration,
    /// Also at once, not only after the first period.
    now: bool,
    /// Also whenever this is notified.
    wake: Option<Arc<Notify>>,
}

impl Schedule {
    fn every(every: Duration) -> Schedule {
        Schedule {
            every,
            now: false,
            wake: None,
        }
    }

    fn now_and_every(every: Duration) -> Schedule {
        Schedule {
            now: true,
            ..Schedule::every(every)
        }
    }

    fn or_when(self, wake: Arc<Notify>) -> Schedule {
        Schedule {
            wake: Some(wake),
            ..self
        }
    }
}

/// A topic's periodic task (fsync ticker, checkpoints, compaction,
/// retention): runs `work` on the blocking pool as `schedule` says, and hands
/// what it did to `report`, for as long as the runtime lives and the topic is
/// not deleted. `what` names the task in the log when it fails.
async fn periodic<T, W, R>(
    runtime: std::sync::Weak<TopicRuntime>,
    schedule: Schedule,
    what: &'static str,
    work: W,
    report: R,
) where
    T: Send + 'static,
    W: Fn(&Topic) -> Result<T> + Send + Sync + 'static,
    R: Fn(&str, T),
{
    let work = Arc::new(work);
    let mut interval = tokio::time::interval(schedule.every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !schedule.now {
        // The first tick is immediate.
        interval.tick().await;
    }
    loop {
        match &schedule.wake {
            Some(wake) => tokio::select! {
                _ = interval.tick() => {}
                _ = wake.notified() => {}
            },
            None => {
                interval.tick().await;
            }
        }
        let Some(rt) = runtime.upgrade() else { return };
        let topic = Arc::clone(&rt.topic);
        drop(rt);
        if topic.is_retired() {
            return;
        }
        let name = topic.name().to_owned();
        let work = Arc::clone(&work);
        match tokio::task::spawn_blocking(move || work(&topic)).await {
            Ok(Ok(done)) => report(&name, done),
            // Deleted meanwhile.
            Ok(Err(Error::TopicNotFound(_))) => return,
            Ok(Err(e)) => tracing::error!(topic = %name, error = %e, "{what} failed"),
            Err(_) => tracing::error!(topic = %name, "{what} panicked"),
        }
    }
}
