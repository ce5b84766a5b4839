//! Prometheus metrics of one broker: counters and histograms updated where
//! things happen (cheap atomics, per-topic handles kept by each topic's
//! runtime), and gauges of topics and groups computed at scrape time from
//! what the broker holds in memory ([`TopicSnapshot`]), so nothing is
//! maintained per write that only a scrape reads.
//!
//! Labels are bounded: `topic` and `group`, plus fixed sets (listener,
//! operation, status code, reason). No member, client or address is ever a
//! label. A deleted topic's series (and a deleted group's) go with it.
//!
//! The transports share one [`Metrics`] through
//! [`crate::broker::Broker::metrics`]. A transport makes two calls:
//! [`Metrics::request`] once per answered request (in the one place it
//! answers them), and [`Metrics::connection`] per accepted connection,
//! keeping the guard while the connection lives; a listener that takes its
//! slots from the server's shared admission gets the latter from the
//! ticket, which also counts refusals and timeouts by setting.

mod storage;

pub use storage::TimedStorage;

use crate::groups::GroupInfo;
use crate::storage::{Header, LogStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which
/// Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the request latency buckets: 100 µs doubling to ~3.3 s.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Upper bounds of the sync duration buckets: 25 µs doubling to ~0.8 s.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    topic: String,
    group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: &'static str,
    operation: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    listener: &'static str,
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CleanupLabels {
    topic: String,
    kind: &'static str,
}

/// What is cleaned: [`Metrics::cleanup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// A compaction pass (background or asked for) that rewrote or dropped
    /// segments.
    Compaction,
    /// A retention pass that dropped segments.
    Retention,
}

impl Cleanup {
    fn label(self) -> &'static str {
        match self {
            Cleanup::Compaction => "compaction",
            Cleanup::Retention => "retention",
        }
    }
}

/// The counters one topic's runtime keeps (cloned handles onto the shared
/// series: an update is one atomic add, no label lookup).
#[derive(Debug, Clone, Default)]
pub struct TopicCounters {
    produced_messages: Counter,
    produced_bytes: Counter,
    delivered_messages: Counter,
    delivered_bytes: Counter,
    read_ahead_messages: Counter,
}

impl TopicCounters {
    /// Counts `messages` committed by a produce, holding `bytes` of key,
    /// headers and value.
    pub fn produced(&self, messages: u64, bytes: u64) {
        self.produced_messages.inc_by(messages);
        self.produced_bytes.inc_by(bytes);
    }

    /// Counts `messages` handed to consumers (fetch or subscription),
    /// holding `bytes` of key, headers and value.
    pub fn delivered(&self, messages: u64, bytes: u64) {
        self.delivered_messages.inc_by(messages);
        self.delivered_bytes.inc_by(bytes);
    }

    /// Counts `messages` a fetch or subscription took from a batch read
    /// ahead of it (no read between its request and its reply).
    pub fn read_ahead(&self, messages: u64) {
        self.read_ahead_messages.inc_by(messages);
    }
}

/// One open topic as a scrape sees it.
#[derive(Debug, Clone)]
pub struct TopicSnapshot {
    /// Topic name.
    pub name: String,
    /// Its log's offsets, segments and bytes.
    pub stats: LogStats,
    /// Whether a failed sync made it read-only.
    pub read_only: bool,
    /// Its groups.
    pub groups: Vec<GroupInfo>,
}

/// A held connection of a listener (see [`Metrics::connection`]): counted
/// as open until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The metrics of one broker: cheap to clone (one shared state inside).
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    produced_messages: Family<TopicLabels, Counter>,
    produced_bytes: Family<TopicLabels, Counter>,
    delivered_messages: Family<TopicLabels, Counter>,
    read_ahead_messages: Family<TopicLabels, Counter>,
    delivered_bytes: Family<TopicLabels, Counter>,
    dead_lettered: Family<GroupLabels, Counter>,
    /// The (topic, group) pairs `dead_lettered` has series for, so a
    /// deleted topic or group can drop them.
    dead_letter_groups: Mutex<HashSet<(String, String)>>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    sync_seconds: Histogram,
    sync_errors: Counter,
    connections: Family<ListenerLabels, Gauge>,
    accepted: Family<ListenerLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    cleanup_runs: Family<CleanupLabels, Counter>,
    cleanup_bytes: Family<CleanupLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A new set of metrics, every counter at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let inner = Inner {
            produced_messages: Family::default(),
            produced_bytes: Family::default(),
            delivered_messages: Family::default(),
            read_ahead_messages: Family::default(),
            delivered_bytes: Family::default(),
            dead_lettered: Family::default(),
            dead_letter_groups: Mutex::new(HashSet::new()),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_buckets),
            sync_seconds: sync_buckets(),
            sync_errors: Counter::default(),
            connections: Family::default(),
            accepted: Family::default(),
            refused: Family::default(),
            closed: Family::default(),
            cleanup_runs: Family::default(),
            cleanup_bytes: Family::default(),
            registry: Registry::default(),
        };
        // Refusals and closes by each limit, at 0 until the first: a rate
        // or `increase()` over them then sees it.
        for reason in REFUSAL_REASONS {
            inner
                .refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        for reason in CLOSE_REASONS {
            inner
                .closed
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        // Counters get `_total` from the encoder.
        let r = &mut registry;
        r.register(
            "spool_produced_messages",
            "Messages committed by produce requests, per topic",
            inner.produced_messages.clone(),
        );
        r.register(
            "spool_produced_bytes",
            "Bytes of key, headers and value committed by produce requests, per topic",
            inner.produced_bytes.clone(),
        );
        r.register(
            "spool_delivered_messages",
            "Messages handed to consumers (fetch and subscriptions, redeliveries included), per topic",
            inner.delivered_messages.clone(),
        );
        r.register(
            "spool_delivered_bytes",
            "Bytes of key, headers and value handed to consumers, per topic",
            inner.delivered_bytes.clone(),
        );
        r.register(
            "spool_read_ahead_messages",
            "Messages replay and stream-group reads took from a batch read ahead of their request, per topic",
            inner.read_ahead_messages.clone(),
        );
        r.register(
            "spool_dead_lettered_messages",
            "Messages a queue group moved to its dead-letter topic, per topic and group",
            inner.dead_lettered.clone(),
        );
        r.register(
            "spool_requests",
            "Requests answered, per listener, operation and status code",
            inner.requests.clone(),
        );
        r.register(
            "spool_request_duration_seconds",
            "Time from a request's arrival to its answer, per listener and operation",
            inner.request_seconds.clone(),
        );
        r.register(
            "spool_fsync_duration_seconds",
            "Duration of each durability point (msync, fsync of a file or directory)",
            inner.sync_seconds.clone(),
        );
        r.register(
            "spool_fsync_errors",
            "Syncs that failed (each makes its topic read-only until restart)",
            inner.sync_errors.clone(),
        );
        r.register(
            "spool_connections_open",
            "Connections open, per listener",
            inner.connections.clone(),
        );
        r.register(
            "spool_connections_accepted",
            "Connections admitted, per listener",
            inner.accepted.clone(),
        );
        r.register(
            "spool_connections_refused",
            "Connections refused by a limit, per reason (the setting that refused them)",
            inner.refused.clone(),
        );
        r.register(
            "spool_connections_closed_by_limit",
            "Connections closed by a timeout, per reason (the setting that closed them)",
            inner.closed.clone(),
        );
        r.register(
            "spool_cleanup_runs",
            "Compaction and retention passes that reclaimed something, per topic and kind",
            inner.cleanup_runs.clone(),
        );
        r.register(
            "spool_cleanup_reclaimed_bytes",
            "Bytes of log reclaimed by compaction and retention, per topic and kind",
            inner.cleanup_bytes.clone(),
        );
        Metrics {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }

    /// The counters of topic `name`, for its runtime to keep.
    pub fn topic(&self, name: &str) -> TopicCounters {
        let l = TopicLabels {
            topic: name.to_owned(),
        };
        let i = &self.inner;
        // Its cleanup series, at 0 until the first pass that reclaims.
        for kind in [Cleanup::Compaction, Cleanup::Retention] {
            let l = CleanupLabels {
                topic: name.to_owned(),
                kind: kind.label(),
            };
            i.cleanup_runs.get_or_create(&l).inc_by(0);
            i.cleanup_bytes.get_or_create(&l).inc_by(0);
        }
        TopicCounters {
            produced_messages: i.produced_messages.get_or_create_owned(&l),
            produced_bytes: i.produced_bytes.get_or_create_owned(&l),
            delivered_messages: i.delivered_messages.get_or_create_owned(&l),
            delivered_bytes: i.delivered_bytes.get_or_create_owned(&l),
            read_ahead_messages: i.read_ahead_messages.get_or_create_owned(&l),
        }
    }

    /// Drops every series of topic `name` (deleted).
    pub fn forget_topic(&self, name: &str) {
        let l = TopicLabels {
            topic: name.to_owned(),
        };
        let i = &self.inner;
        // Under the lock the counts of a topic's cleanups and dead letters
        // take: one that ends after the delete gives back no series.
        let mut groups = self.dead_letter_groups();
        for family in [
            &i.produced_messages,
            &i.produced_bytes,
            &i.delivered_messages,
            &i.delivered_bytes,
            &i.read_ahead_messages,
        ] {
            family.remove(&l);
        }
        for kind in [Cleanup::Compaction, Cleanup::Retention] {
            let l = CleanupLabels {
                topic: name.to_owned(),
                kind: kind.label(),
            };
            i.cleanup_runs.remove(&l);
            i.cleanup_bytes.remove(&l);
        }
        groups.retain(|(topic, group)| {
            if topic != name {
                return true;
            }
            i.dead_lettered.remove(&GroupLabels {
                topic: topic.clone(),
                group: group.clone(),
            });
            false
        });
    }

    /// Drops the series of group `group` of `topic` (deleted).
    pub fn forget_group(&self, topic: &str, group: &str) {
        let key = (topic.to_owned(), group.to_owned());
        if self.dead_letter_groups().remove(&key) {
            self.inner.dead_lettered.remove(&GroupLabels {
                topic: key.0,
                group: key.1,
            });
        }
    }

    fn dead_letter_groups(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.inner
            .dead_letter_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `count` messages of `topic` that queue group `group` moved to
    /// its dead-letter topic, if the group `exists` still. The question is
    /// asked under the lock [`Metrics::forget_group`] and
    /// [`Metrics::forget_topic`] take, so a group deleted meanwhile gets no
    /// series back (with the count of its last hand-off, for good).
    pub fn dead_lettered(
        &self,
        topic: &str,
        group: &str,
        count: u64,
        exists: impl FnOnce() -> bool,
    ) {
        let mut groups = self.dead_letter_groups();
        if !exists() {
            return;
        }
        groups.insert((topic.to_owned(), group.to_owned()));
        self.inner
            .dead_lettered
            .get_or_create(&GroupLabels {
                topic: topic.to_owned(),
                group: group.to_owned(),
            })
            .inc_by(count);
    }

    /// Counts one request a listener answered: `listener` names the
    /// transport (`native`, `grpc`, ...), `operation` the request
    /// (`produce`, `fetch`, ...), `code` the status code it was answered
    /// with (as on the wire: 0 is `OK`), and `elapsed` the time from its
    /// arrival to its answer.
    pub fn request(
        &self,
        listener: &'static str,
        operation: &'static str,
        code: i32,
        elapsed: Duration,
    ) {
        let i = &self.inner;
        i.requests
            .get_or_create(&RequestLabels {
                listener,
                operation,
                code: code_name(code),
            })
            .inc();
        i.request_seconds
            .get_or_create(&OperationLabels {
                listener,
                operation,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Gives `listener` its connection series, at 0 until its first
    /// connection (a dashboard sees 0, not "no data").
    pub fn listening(&self, listener: &'static str) {
        let l = ListenerLabels { listener };
        self.inner.accepted.get_or_create(&l).inc_by(0);
        self.inner.connections.get_or_create(&l).inc_by(0);
    }

    /// Counts a connection admitted on `listener`, open until the guard is
    /// dropped.
    pub fn connection(&self, listener: &'static str) -> ConnectionGuard {
        let l = ListenerLabels { listener };
        self.inner.accepted.get_or_create(&l).inc();
        let open = self.inner.connections.get_or_create_owned(&l);
        open.inc();
        ConnectionGuard { open }
    }

    /// Gives queue group `group` of `topic` its dead-letter series, at 0
    /// until a message is dead-lettered: a rate or `increase()` over it
    /// then sees the first one.
    pub fn queue_group(&self, topic: &str, group: &str, exists: impl FnOnce() -> bool) {
        self.dead_lettered(topic, group, 0, exists);
    }

    /// Counts a connection refused by the limit named `reason` (its setting).
    pub fn refused(&self, reason: &'static str) {
        self.inner
            .refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection closed by the timeout named `reason` (its setting).
    pub fn closed_by_limit(&self, reason: &'static str) {
        self.inner
            .closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records how long one sync took, and whether it failed.
    pub fn synced(&self, elapsed: Duration, ok: bool) {
        self.inner.sync_seconds.observe(elapsed.as_secs_f64());
        if !ok {
            self.inner.sync_errors.inc();
        }
    }

    /// Counts a compaction or retention pass over `topic` that reclaimed
    /// `bytes`, if the topic `exists` still, asked under the lock
    /// [`Metrics::forget_topic`] takes: a pass that ends after the topic's
    /// delete gives it no series back (which a topic of that name created
    /// later would have started from).
    pub fn cleanup(&self, topic: &str, kind: Cleanup, bytes: u64, exists: impl FnOnce() -> bool) {
        let _forgetting = self.dead_letter_groups();
        if !exists() {
            return;
        }
        let l = CleanupLabels {
            topic: topic.to_owned(),
            kind: kind.label(),
        };
        self.inner.cleanup_runs.get_or_create(&l).inc();
        self.inner.cleanup_bytes.get_or_create(&l).inc_by(bytes);
    }

    /// Everything in the OpenMetrics text format ([`CONTENT_TYPE`]): the
    /// counters and histograms, then the gauges of `topics` (the open
    /// ones) and the count of all topics, `total_topics`.
    pub fn encode(&self, total_topics: usize, topics: &[TopicSnapshot]) -> String {
        let mut out = String::new();
        let gauges = gauges(total_topics, topics);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.inner.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &gauges);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// The limits a connection is refused by (see [`Metrics::refused`]).
pub const REFUSAL_REASONS: [&str; 2] = ["max_connections", "max_connections_per_ip"];

/// The timeouts a connection is closed by (see [`Metrics::closed_by_limit`]).
pub const CLOSE_REASONS: [&str; 3] = ["idle_timeout_ms", "frame_timeout_ms", "write_timeout_ms"];

/// The scrape-time gauges, in a registry of their own.
fn gauges(total_topics: usize, topics: &[TopicSnapshot]) -> Registry {
    let mut r = Registry::default();
    let gauge = |r: &mut Registry, name: &str, help: &str| {
        let family = Family::<TopicLabels, Gauge>::default();
        r.register(name, help, family.clone());
        family
    };
    let group_gauge = |r: &mut Registry, name: &str, help: &str| {
        let family = Family::<GroupLabels, Gauge>::default();
        r.register(name, help, family.clone());
        family
    };
    let all = Gauge::<i64>::default();
    r.register("spool_topics", "Topics in the data directory", all.clone());
    all.set(to_i64(total_topics as u64));
    let open = Gauge::<i64>::default();
    r.register(
        "spool_topics_open",
        "Topics open (those with the per-topic gauges below)",
        open.clone(),
    );
    open.set(to_i64(topics.len() as u64));
    let bytes = gauge(&mut r, "spool_topic_log_bytes", "Bytes of the topic's log");
    let segments = gauge(
        &mut r,
        "spool_topic_segments",
        "Segments of the topic's log",
    );
    let start = gauge(
        &mut r,
        "spool_topic_start_offset",
        "Offset of the topic's first stored message",
    );
    let end = gauge(
        &mut r,
        "spool_topic_end_offset",
        "Offset the topic's next message will get",
    );
    let durable = gauge(
        &mut r,
        "spool_topic_durable_end_offset",
        "Everything below this offset is synced",
    );
    let read_only = gauge(
        &mut r,
        "spool_topic_read_only",
        "1 when a failed sync made the topic read-only (until restart)",
    );
    let lag = group_gauge(
        &mut r,
        "spool_group_lag",
        "Messages the group has not completed, up to the log end",
    );
    let pending = group_gauge(
        &mut r,
        "spool_group_pending",
        "Messages leased to the queue group's members and not yet acked (leases not run out)",
    );
    let committed = group_gauge(
        &mut r,
        "spool_group_committed_offset",
        "Stream group: committed offset; queue group: everything below is done",
    );
    for t in topics {
        let l = TopicLabels {
            topic: t.name.clone(),
        };
        bytes.get_or_create(&l).set(to_i64(t.stats.bytes));
        segments
            .get_or_create(&l)
            .set(to_i64(t.stats.segments as u64));
        start.get_or_create(&l).set(to_i64(t.stats.start.0));
        end.get_or_create(&l).set(to_i64(t.stats.end.0));
        durable.get_or_create(&l).set(to_i64(t.stats.durable_end.0));
        read_only.get_or_create(&l).set(i64::from(t.read_only));
        for g in &t.groups {
            let l = GroupLabels {
                topic: t.name.clone(),
                group: g.name.clone(),
            };
            lag.get_or_create(&l).set(to_i64(g.lag));
            pending.get_or_create(&l).set(to_i64(g.pending as u64));
            committed.get_or_create(&l).set(to_i64(g.committed));
        }
    }
    r
}

/// Bytes of key, headers (names and values) and value of one message:
/// what the produced and delivered byte counters count.
pub fn payload_bytes(key: Option<&bytes::Bytes>, headers: &[Header], value: &[u8]) -> u64 {
    let headers: usize = headers.iter().map(|h| h.name.len() + h.value.len()).sum();
    (key.map_or(0, |k| k.len()) + headers + value.len()) as u64
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The name of a status code as on the wire (`OK`, `NOT_FOUND`, ...).
fn code_name(code: i32) -> &'static str {
    crate::protocol::pb::Code::try_from(code).map_or("UNKNOWN", |c| c.as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_group_gets_no_series_back_from_a_late_count() {
        let m = Metrics::new();
        m.dead_lettered("a", "g", 2, || true);
        m.forget_group("a", "g");
        // A hand-off, or a scrape's snapshot, that saw the group before it
        // went, counting after it went.
        m.dead_lettered("a", "g", 3, || false);
        m.queue_group("a", "g", || false);
        let text = m.encode(1, &[]);
        assert!(!text.contains("group=\"g\""), "{text}");
    }

    #[test]
    fn a_deleted_topic_drops_its_series() {
        let m = Metrics::new();
        m.topic("a").produced(3, 30);
        m.topic("b").produced(1, 10);
        m.dead_lettered("a", "g", 2, || true);
        m.cleanup("a", Cleanup::Retention, 100, || true);
        let text = m.encode(2, &[]);
        assert!(
            text.contains("spool_produced_messages_total{topic=\"a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("spool_dead_lettered_messages_total{topic=\"a\",group=\"g\"} 2"),
            "{text}"
        );
        m.forget_topic("a");
        // A pass that ends after the delete: no series back.
        m.cleanup("a", Cleanup::Retention, 100, || false);
        let text = m.encode(1, &[]);
        assert!(!text.contains("topic=\"a\""), "{text}");
        assert!(
            text.contains("spool_produced_messages_total{topic=\"b\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn requests_count_by_code_name_and_connections_come_back() {
        let m = Metrics::new();
        m.request("native", "produce", 0, Duration::from_millis(1));
        m.request("native", "produce", 5, Duration::from_millis(1));
        let c = m.connection("native");
        let text = m.encode(0, &[]);
        assert!(text.contains("spool_requests_total{listener=\"native\",operation=\"produce\",code=\"NOT_FOUND\"} 1"), "{text}");
        assert!(
            text.contains("spool_connections_open{listener=\"native\"} 1"),
            "{text}"
        );
        drop(c);
        let text = m.encode(0, &[]);
        assert!(
            text.contains("spool_connections_open{listener=\"native\"} 0"),
            "{text}"
        );
    }
}
