//! Why this exists: the power-loss promise is about the whole broker, not one
//! file. A produce, an ack, a commit and a delete are each confirmed on their
//! own, but they meet in recovery: the log cuts a torn tail, groups clamp into
//! the log, the deletions journal is replayed, an interrupted compaction swap
//! is rolled back or finished. This harness drives `Registry`/`Topic` with
//! random workloads (keyed and `delete_when_consumed` topics, queue and stream
//! groups, deletes, segment rolls, compaction, dead letters) on the simulated
//! disk, cuts the power at a random sync (sometimes tearing the last page, and
//! sometimes again during recovery), reopens, and checks what was *confirmed*
//! before the cut:
//!
//! - every durable message is there once, byte-exact, at its offset, unless it
//!   was deleted, consumed by every group of a `delete_when_consumed` topic, or
//!   superseded by a later durable record with its key on a compacted topic;
//! - no confirmed ack (or dead-letter hand-off) is undone, a stream group
//!   resumes at its confirmed commit or a later unconfirmed one, a confirmed
//!   delete stays deleted, every pending message is delivered again;
//! - offsets go on without reuse; `verify` finds no damage; recovery succeeds.
//!
//! Under `fsync=always` "confirmed" means the call returned; under
//! `interval`/`never` only what a sync (or the tick) made durable counts.
//!
//! `SPOOL_POWER_CUTS=N` sets the number of random workloads (each ends in one
//! to three power cuts); `SPOOL_POWER_SEED=S` replays a run (the summary line
//! names the seed; a failure prints the shrunk workload). The bugs the
//! harness found are pinned by the small tests at the end.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestError, TestRunner};
use spool::broker::topic::dlq_headers;
use spool::broker::{Cleanup, Position, Registry, RegistryOptions, Topic, TopicConfig};
use spool::groups::{GroupMode, RangeSet};
use spool::storage::io::{SimDisk, SimFault, SimOp, Storage};
use spool::storage::log::now_ms;
use spool::storage::verify::verify;
use spool::storage::{DataDir, Durability, FsyncPolicy, LogConfig, Message, NewMessage, Offset};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const ROOT: &str = "/data";
/// Large enough that no read or fetch here is cut by bytes.
const NO_BYTE_LIMIT: usize = 64 << 20;
/// Leases outlive every workload unless a `Timeout` moves the clock.
const ACK_TIMEOUT_MS: u64 = 60_000;
/// Header carrying a message's unique number (first header of every message).
const ID_HEADER: &str = "id";
/// Default number of workloads: about 1 800 power cuts, some 10 s of a
/// debug build.
const DEFAULT_CASES: u32 = 800;
const MAX_GROUPS: usize = 4;

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TopicSpec {
    fsync: FsyncPolicy,
    /// `cleanup = compact`.
    keyed: bool,
    delete_when_consumed: bool,
    segment_bytes: u64,
    max_deliveries: u32,
    /// The groups it starts with: `true` = queue group.
    groups: Vec<bool>,
}

#[derive(Debug, Clone)]
struct MsgSpec {
    key: Option<u8>,
    headers: u8,
    value_len: u16,
    /// A producer timestamp this many ms in the past.
    ts_back: Option<u16>,
}

#[derive(Debug, Clone, Copy)]
enum SeekTo {
    Earliest,
    Latest,
    /// A fraction (of 65 536) of the log end.
    Fraction(u16),
}

#[derive(Debug, Clone)]
enum Op {
    Produce {
        topic: usize,
        msgs: Vec<MsgSpec>,
    },
    Fetch {
        topic: usize,
        group: usize,
        max: usize,
    },
    /// Acks the held messages picked by the bit mask.
    Ack {
        topic: usize,
        group: usize,
        pick: u64,
    },
    Nack {
        topic: usize,
        group: usize,
        pick: u64,
    },
    /// The clock passes the ack timeout: every lease runs out.
    Timeout,
    /// A stream-group read from its commit.
    Read {
        topic: usize,
        group: usize,
    },
    Commit {
        topic: usize,
        group: usize,
        delta: i8,
    },
    Seek {
        topic: usize,
        group: usize,
        to: SeekTo,
    },
    /// Deletes the offsets at these fractions (of 65 536) of the log end.
    Delete {
        topic: usize,
        at: Vec<u16>,
    },
    Compact {
        topic: usize,
    },
    /// Compaction while a producer fills (and rolls) the active segment.
    CompactWhileProducing {
        topic: usize,
    },
    /// `log().sync()` then `sync_state()`: what confirms under `never`.
    Sync {
        topic: usize,
    },
    /// The `interval` ticker.
    Tick {
        topic: usize,
    },
    CreateGroup {
        topic: usize,
        queue: bool,
        latest: bool,
    },
}

impl Op {
    /// The topic (index) the op works on; `None` for the clock.
    fn topic(&self) -> Option<usize> {
        match self {
            Op::Timeout => None,
            Op::Produce { topic, .. }
            | Op::Fetch { topic, .. }
            | Op::Ack { topic, .. }
            | Op::Nack { topic, .. }
            | Op::Read { topic, .. }
            | Op::Commit { topic, .. }
            | Op::Seek { topic, .. }
            | Op::Delete { topic, .. }
            | Op::Compact { topic }
            | Op::CompactWhileProducing { topic }
            | Op::Sync { topic }
            | Op::Tick { topic }
            | Op::CreateGroup { topic, .. } => Some(*topic),
        }
    }
}

#[derive(Debug, Clone)]
struct Epoch {
    ops: Vec<Op>,
    /// Before this op the power is set to go off (never, if past the end:
    /// the cut then falls between two operations).
    arm_at: usize,
    /// ...after this many more syncs.
    extra_syncs: u64,
    tear: Option<u64>,
    /// A second cut after this many syncs of recovery, with its own tear.
    recovery_cut: Option<(u64, Option<u64>)>,
}

#[derive(Debug, Clone)]
struct Case {
    topics: Vec<TopicSpec>,
    epochs: Vec<Epoch>,
}

fn topic_strategy() -> impl Strategy<Value = TopicSpec> {
    let fsync = prop_oneof![
        7 => Just(FsyncPolicy::Always),
        2 => Just(FsyncPolicy::Interval(1)),
        1 => Just(FsyncPolicy::Never),
    ];
    (
        fsync,
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
        1024u64..4096,
        2u32..5,
        vec(any::<bool>(), 1..=2),
    )
        .prop_map(
            |(fsync, keyed, delete_when_consumed, segment_bytes, max_deliveries, groups)| {
                TopicSpec {
                    fsync,
                    keyed,
                    delete_when_consumed,
                    segment_bytes,
                    max_deliveries,
                    groups,
                }
            },
        )
}

fn msg_strategy() -> impl Strategy<Value = MsgSpec> {
    (
        prop::option::weighted(0.7, 0u8..6),
        0u8..3,
        prop_oneof![3 => 0u16..64, 1 => 64u16..400],
        prop::option::of(0u16..10_000),
    )
        .prop_map(|(key, headers, value_len, ts_back)| MsgSpec {
            key,
            headers,
            value_len,
            ts_back,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let t = || 0usize..2;
    let g = || 0usize..MAX_GROUPS;
    prop_oneof![
        10 => (t(), vec(msg_strategy(), 1..6)).prop_map(|(topic, msgs)| Op::Produce { topic, msgs }),
        5 => (t(), g(), 1usize..8).prop_map(|(topic, group, max)| Op::Fetch { topic, group, max }),
        5 => (t(), g(), any::<u64>()).prop_map(|(topic, group, pick)| Op::Ack { topic, group, pick }),
        2 => (t(), g(), any::<u64>()).prop_map(|(topic, group, pick)| Op::Nack { topic, group, pick }),
        1 => Just(Op::Timeout),
        2 => (t(), g()).prop_map(|(topic, group)| Op::Read { topic, group }),
        3 => (t(), g(), -6i8..12).prop_map(|(topic, group, delta)| Op::Commit { topic, group, delta }),
        1 => (t(), g(), prop_oneof![
                Just(SeekTo::Earliest),
                Just(SeekTo::Latest),
                any::<u16>().prop_map(SeekTo::Fraction),
            ])
            .prop_map(|(topic, group, to)| Op::Seek { topic, group, to }),
        2 => (t(), vec(any::<u16>(), 1..4)).prop_map(|(topic, at)| Op::Delete { topic, at }),
        2 => t().prop_map(|topic| Op::Compact { topic }),
        1 => t().prop_map(|topic| Op::CompactWhileProducing { topic }),
        2 => t().prop_map(|topic| Op::Sync { topic }),
        1 => t().prop_map(|topic| Op::Tick { topic }),
        1 => (t(), any::<bool>(), any::<bool>())
            .prop_map(|(topic, queue, latest)| Op::CreateGroup { topic, queue, latest }),
    ]
}

fn epoch_strategy() -> impl Strategy<Value = Epoch> {
    (
        vec(op_strategy(), 1..40),
        0usize..48,
        0u64..12,
        prop::option::of(any::<u64>()),
        prop::option::weighted(0.25, (0u64..8, prop::option::of(any::<u64>()))),
    )
        .prop_map(|(ops, arm_at, extra_syncs, tear, recovery_cut)| Epoch {
            ops,
            arm_at,
            extra_syncs,
            tear,
            recovery_cut,
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (vec(topic_strategy(), 1..=2), vec(epoch_strategy(), 1..=3))
        .prop_map(|(topics, epochs)| Case { topics, epochs })
}

// ---------------------------------------------------------------------------
// The model of what was confirmed
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct GroupModel {
    queue: bool,
    /// Creation returned Ok; otherwise the group may or may not come back.
    exists_sure: bool,
    /// Came back after an unconfirmed creation: its state is not modelled.
    adopted: bool,
    /// Queue: completions that are durable.
    done_sure: RangeSet,
    /// Queue: acks in memory, not (known to be) durable.
    done_maybe: RangeSet,
    /// Queue: delivered to the member and not given back.
    held: BTreeSet<u64>,
    /// Queue: ids of messages whose dead-letter hand-off was confirmed.
    dead_sure: BTreeSet<u64>,
    /// Queue: fetches the power cut interrupted (each may leave one dead
    /// letter behind whose completion was lost, so it goes again).
    interrupted_fetches: u32,
    /// Stream: durable commit.
    committed_sure: u64,
    /// Stream: later commits (in order), not (known to be) durable.
    committed_maybe: Vec<u64>,
}

impl GroupModel {
    fn new(queue: bool, start: u64, exists_sure: bool) -> GroupModel {
        let mut done_sure = RangeSet::new();
        done_sure.insert_range(0..start);
        GroupModel {
            queue,
            exists_sure,
            adopted: false,
            done_sure,
            done_maybe: RangeSet::new(),
            held: BTreeSet::new(),
            dead_sure: BTreeSet::new(),
            interrupted_fetches: 0,
            committed_sure: start,
            committed_maybe: Vec::new(),
        }
    }

    /// Stream: the commit the broker holds in memory.
    fn committed_now(&self) -> u64 {
        self.committed_maybe
            .last()
            .copied()
            .unwrap_or(self.committed_sure)
    }

    /// Completed in every state a power cut could leave. A cut may keep any
    /// prefix of the group's journal, so for a stream group that is the
    /// confirmed commit and every unconfirmed one after it: an unconfirmed
    /// seek back can survive without the commits that followed it.
    fn sure_done(&self, o: u64) -> bool {
        if self.queue {
            self.done_sure.contains(o)
        } else {
            let lowest = self
                .committed_maybe
                .iter()
                .copied()
                .fold(self.committed_sure, u64::min);
            o < lowest
        }
    }

    /// Completed in some state a power cut could leave.
    fn maybe_done(&self, o: u64) -> bool {
        if self.queue {
            self.done_sure.contains(o) || self.done_maybe.contains(o)
        } else {
            let top = self.committed_maybe.iter().copied().max().unwrap_or(0);
            o < self.committed_sure.max(top)
        }
    }

    /// Everything in memory became durable (a sync returned).
    fn confirm(&mut self) {
        let maybe = std::mem::take(&mut self.done_maybe);
        for r in maybe.iter() {
            self.done_sure.insert_range(r);
        }
        self.committed_sure = self.committed_now();
        self.committed_maybe.clear();
    }
}

#[derive(Debug)]
struct TopicModel {
    name: String,
    spec: TopicSpec,
    /// What each offset holds (or would hold, for an unconfirmed produce).
    msgs: BTreeMap<u64, NewMessage>,
    /// Everything below is durable (the highest `durable_end` seen).
    durable_end: u64,
    /// The highest log end readers were shown.
    published_end: u64,
    /// Deleted or consumed by every group, durably: never visible again.
    hidden_sure: BTreeSet<u64>,
    /// May be hidden after a cut (unconfirmed deletes and consumption).
    hidden_maybe: BTreeSet<u64>,
    /// Deletes applied in memory, not yet durable (`interval`/`never`).
    deleted_pending: BTreeSet<u64>,
    groups: BTreeMap<String, GroupModel>,
}

impl TopicModel {
    fn always(&self) -> bool {
        self.spec.fsync == FsyncPolicy::Always
    }

    fn group_named(&self, queue: bool, pick: usize) -> Option<String> {
        let names: Vec<&String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.queue == queue && g.exists_sure)
            .map(|(n, _)| n)
            .collect();
        (!names.is_empty()).then(|| names[pick % names.len()].clone())
    }

    /// Everything in memory became durable.
    fn confirm_state(&mut self) {
        let pending = std::mem::take(&mut self.deleted_pending);
        self.hidden_sure.extend(pending);
        for g in self.groups.values_mut() {
            g.confirm();
        }
    }

    /// On `delete_when_consumed` topics, what every group completed is gone.
    fn update_consumed(&mut self) {
        if !self.spec.delete_when_consumed || self.groups.is_empty() {
            return;
        }
        let offsets: Vec<u64> = self.msgs.keys().copied().collect();
        for o in offsets {
            if self.hidden_sure.contains(&o) {
                continue;
            }
            if self
                .groups
                .values()
                .all(|g| g.exists_sure && g.sure_done(o))
            {
                self.hidden_sure.insert(o);
                continue;
            }
            let sure: Vec<&GroupModel> = self.groups.values().filter(|g| g.exists_sure).collect();
            let unsure = self.groups.values().filter(|g| !g.exists_sure);
            let maybe = sure.iter().all(|g| g.maybe_done(o))
                && (!sure.is_empty() || unsure.into_iter().any(|g| g.maybe_done(o)));
            if maybe {
                self.hidden_maybe.insert(o);
            }
        }
    }

    /// Whether compaction may have dropped `o` for a later durable record
    /// with its key.
    fn superseded(&self, o: u64, latest_durable: &HashMap<Bytes, u64>) -> bool {
        self.spec.keyed
            && self.msgs[&o]
                .key
                .as_ref()
                .is_some_and(|k| latest_durable.get(k).is_some_and(|&l| l > o))
    }

    fn latest_durable_per_key(&self) -> HashMap<Bytes, u64> {
        let mut latest = HashMap::new();
        for (&o, m) in self.msgs.range(..self.durable_end) {
            if let Some(k) = &m.key {
                latest.insert(k.clone(), o);
            }
        }
        latest
    }
}

#[derive(Debug)]
struct Produced {
    topic: String,
    offset: u64,
    message: NewMessage,
}

#[derive(Debug, Default)]
struct Figures {
    cases: u64,
    cuts: u64,
    recovery_cuts: u64,
    /// Confirmed messages found intact, summed over every recovery.
    messages: u64,
    /// Queue completions found not undone.
    completions: u64,
    /// Stream commits found where they were confirmed (or later).
    commits: u64,
    /// Deletions (and consumptions) found still hidden.
    hidden: u64,
    /// Confirmed dead letters found in their dead-letter topic.
    dead_letters: u64,
}

struct Model {
    topics: Vec<TopicModel>,
    next_id: u64,
    history: HashMap<u64, Produced>,
    /// How far the test clock runs ahead of the wall clock.
    skew: u64,
}

impl Model {
    fn now(&self) -> u64 {
        now_ms() + self.skew
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn topic_name(i: usize) -> String {
    format!("t{i}")
}

fn topic_config(spec: &TopicSpec) -> TopicConfig {
    TopicConfig {
        cleanup: if spec.keyed {
            Cleanup::Compact
        } else {
            Cleanup::Delete
        },
        delete_when_consumed: spec.delete_when_consumed,
        max_deliveries: spec.max_deliveries,
        ack_timeout_ms: ACK_TIMEOUT_MS,
        log: LogConfig {
            segment_bytes: spec.segment_bytes,
            index_interval_bytes: 256,
            fsync: spec.fsync,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    }
}

fn open_registry(disk: &Arc<SimDisk>) -> spool::Result<Registry> {
    let data = DataDir::open(Arc::clone(disk) as Arc<dyn Storage>, ROOT)?;
    Registry::open(data, RegistryOptions::default())
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// The result of a broker call: `None` when it failed because the power is
/// off, a test failure when it failed with the power on.
fn outcome<T>(disk: &SimDisk, what: &str, r: spool::Result<T>) -> Result<Option<T>, TestCaseError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(_) if disk.is_powered_off() => Ok(None),
        Err(e) => Err(fail(format!("{what} failed with the power on: {e}"))),
    }
}

fn build_message(id: u64, spec: &MsgSpec, keyed: bool) -> NewMessage {
    let mut m = NewMessage::from_value(
        (0..spec.value_len as u64)
            .map(|i| (id.wrapping_mul(31).wrapping_add(i * 7)) as u8)
            .collect::<Vec<u8>>(),
    )
    .with_header(ID_HEADER, id.to_string());
    for h in 0..spec.headers {
        m = m.with_header(format!("h{h}"), format!("{id}-{h}").into_bytes());
    }
    if let Some(k) = spec.key {
        // Few keys on compacted topics, so records supersede each other.
        let key = if keyed {
            format!("k{k}")
        } else {
            format!("k{k}-{id}")
        };
        m = m.with_key(key.into_bytes());
    }
    m.timestamp_ms = spec.ts_back.map(|back| now_ms() - u64::from(back));
    m
}

fn id_of(headers: &[spool::storage::Header]) -> Option<u64> {
    headers
        .iter()
        .find(|h| h.name == ID_HEADER)
        .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse().ok())
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a [u8]> {
    m.headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| &h.value[..])
}

/// Key, headers, value and (when the producer set one) timestamp match.
fn same_message(topic: &str, got: &Message, want: &NewMessage) -> Result<(), TestCaseError> {
    let ok = got.key == want.key
        && got.headers == want.headers
        && got.value == want.value
        && want.timestamp_ms.is_none_or(|ts| ts == got.timestamp_ms);
    prop_assert!(
        ok,
        "{topic}: offset {} holds {got:?}, but {want:?} was produced there",
        got.offset.0
    );
    Ok(())
}

/// Every stored record, deleted or not.
fn read_raw(t: &Topic) -> Result<Vec<Message>, TestCaseError> {
    let mut out: Vec<Message> = Vec::new();
    let mut from = 0;
    loop {
        let batch = t
            .log()
            .read(Offset(from), 1000, NO_BYTE_LIMIT)
            .map_err(|e| fail(format!("{}: reading the log: {e}", t.name())))?;
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        from = last.offset.0 + 1;
        out.extend(batch);
    }
}

/// Every message a replay shows.
fn read_visible(t: &Topic) -> Result<Vec<Message>, TestCaseError> {
    let mut out: Vec<Message> = Vec::new();
    let mut from = 0;
    loop {
        let batch = t
            .read(Offset(from), 1000, NO_BYTE_LIMIT)
            .map_err(|e| fail(format!("{}: replay: {e}", t.name())))?;
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        from = last.offset.0 + 1;
        out.extend(batch);
    }
}

fn picked(held: &BTreeSet<u64>, pick: u64) -> Vec<u64> {
    held.iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << (i % 64)) != 0)
        .map(|(_, &o)| o)
        .collect()
}

/// A topic's records as `check_log` found them.
struct LogView {
    /// Every stored record (deleted or not), by offset.
    stored: BTreeMap<u64, Message>,
    /// Offsets a replay shows.
    visible: BTreeSet<u64>,
    /// Confirmed messages found intact.
    confirmed: u64,
}

/// What the log holds and shows, checked against the model: records
/// byte-exact at their offsets and once each, nothing `forbidden` visible,
/// every confirmed message visible unless legitimately gone.
fn check_log(
    t: &Topic,
    tm: &TopicModel,
    forbidden: &BTreeSet<u64>,
    when: &str,
) -> Result<LogView, TestCaseError> {
    let name = &tm.name;
    let end = t.stats().end.0;
    let mut raw = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for m in read_raw(t)? {
        let o = m.offset.0;
        prop_assert!(
            raw.last_key_value().is_none_or(|(&p, _)| o > p),
            "{name} {when}: offset {o} read out of order or twice"
        );
        prop_assert!(
            o < end,
            "{name} {when}: record {o} at or past the end {end}"
        );
        let Some(want) = tm.msgs.get(&o) else {
            return Err(fail(format!(
                "{name} {when}: offset {o} holds {m:?}, but nothing was produced there"
            )));
        };
        same_message(name, &m, want)?;
        let id = id_of(&m.headers).ok_or_else(|| fail("a record without its id"))?;
        prop_assert!(ids.insert(id), "{name} {when}: message {id} stored twice");
        raw.insert(o, m);
    }
    let mut visible = BTreeSet::new();
    for m in read_visible(t)? {
        let o = m.offset.0;
        let Some(stored) = raw.get(&o) else {
            return Err(fail(format!(
                "{name} {when}: replay shows offset {o}, which the log does not hold"
            )));
        };
        prop_assert_eq!(stored, &m, "{} {}: replay differs from the log", name, when);
        visible.insert(o);
    }
    for &o in forbidden {
        prop_assert!(
            !visible.contains(&o),
            "{name} {when}: offset {o} was deleted or consumed (confirmed) and is visible again"
        );
    }
    let latest = tm.latest_durable_per_key();
    let mut confirmed = 0;
    for &o in tm.msgs.range(..tm.durable_end).map(|(o, _)| o) {
        if tm.hidden_sure.contains(&o) || tm.hidden_maybe.contains(&o) || tm.superseded(o, &latest)
        {
            continue;
        }
        prop_assert!(
            visible.contains(&o),
            "{name} {when}: the durable message at offset {o} (id {:?}) is lost; the log ends at {end}, durable end was {}",
            id_of(&tm.msgs[&o].headers),
            tm.durable_end
        );
        confirmed += 1;
    }
    Ok(LogView {
        stored: raw,
        visible,
        confirmed,
    })
}

// ---------------------------------------------------------------------------
// Running a workload
// ---------------------------------------------------------------------------

/// Produces `specs` as one batch and records what the offsets would hold.
/// Returns whether the produce returned.
fn produce(
    disk: &SimDisk,
    t: &Topic,
    tm: &mut TopicModel,
    next_id: &mut u64,
    history: &mut HashMap<u64, Produced>,
    specs: &[MsgSpec],
) -> Result<bool, TestCaseError> {
    let first = t.stats().end.0;
    prop_assert!(
        first >= tm.durable_end,
        "{}: the next offset {first} is below the durable end {}",
        tm.name,
        tm.durable_end
    );
    let batch: Vec<NewMessage> = specs
        .iter()
        .map(|s| {
            let id = *next_id;
            *next_id += 1;
            build_message(id, s, tm.spec.keyed)
        })
        .collect();
    for (i, m) in batch.iter().enumerate() {
        let offset = first + i as u64;
        tm.msgs.insert(offset, m.clone());
        let id = id_of(&m.headers).expect("every built message has an id");
        history.insert(
            id,
            Produced {
                topic: tm.name.clone(),
                offset,
                message: m.clone(),
            },
        );
    }
    let Some(appended) = outcome(disk, "produce", t.produce(&batch))? else {
        return Ok(false);
    };
    prop_assert_eq!(
        (appended.first.0, appended.last.0),
        (first, first + batch.len() as u64 - 1),
        "{}: offsets of a batch",
        &tm.name
    );
    if tm.always() {
        prop_assert_eq!(appended.durability, Durability::Durable);
    }
    Ok(true)
}

/// Runs one op; returns whether it failed (the power went off).
fn run_op(
    disk: &SimDisk,
    reg: &Registry,
    model: &mut Model,
    op: &Op,
) -> Result<bool, TestCaseError> {
    let now = model.now();
    let Model {
        topics,
        next_id,
        history,
        skew,
    } = model;
    let Some(topic) = op.topic() else {
        *skew += ACK_TIMEOUT_MS + 1;
        return Ok(false);
    };
    let count = topics.len();
    let tm = &mut topics[topic % count];
    let t = reg
        .topic(&tm.name)
        .map_err(|e| fail(format!("topic {}: {e}", tm.name)))?;
    let always = tm.always();
    let failed = match op {
        Op::Timeout => unreachable!("the clock has no topic"),
        Op::Produce { msgs, .. } => !produce(disk, &t, tm, next_id, history, msgs)?,
        Op::Fetch { group, max, .. } => {
            let Some(g) = tm.group_named(true, *group) else {
                return Ok(false);
            };
            let fetched = outcome(
                disk,
                "queue fetch",
                reg.fetch_queue(&tm.name, &g, "m", *max, NO_BYTE_LIMIT, now),
            )?;
            match fetched {
                None => {
                    if let Some(gm) = tm.groups.get_mut(&g) {
                        gm.interrupted_fetches += 1;
                    }
                    true
                }
                Some(f) => {
                    for d in &f.deliveries {
                        let o = d.message.offset.0;
                        let want = tm.msgs.get(&o).ok_or_else(|| {
                            fail(format!("{}: delivered offset {o} never produced", tm.name))
                        })?;
                        same_message(&tm.name, &d.message, want)?;
                        prop_assert!(
                            !tm.hidden_sure.contains(&o) && !tm.deleted_pending.contains(&o),
                            "{}: deleted or consumed offset {o} delivered to {g}",
                            tm.name
                        );
                        let gm = &tm.groups[&g];
                        prop_assert!(
                            !gm.done_sure.contains(o) && !gm.done_maybe.contains(o),
                            "{}: acked offset {o} delivered again to {g}",
                            tm.name
                        );
                    }
                    let gm = tm.groups.get_mut(&g).expect("picked from the model");
                    for d in &f.deliveries {
                        gm.held.insert(d.message.offset.0);
                    }

                    for l in &f.dead_letters {
                        let o = l.offset.0;
                        prop_assert!(
                            !gm.done_sure.contains(o) && !gm.done_maybe.contains(o),
                            "{}: acked offset {o} dead-lettered by {g}",
                            tm.name
                        );
                        let id = id_of(&l.message.headers)
                            .ok_or_else(|| fail("a dead letter without its id"))?;
                        gm.dead_sure.insert(id);
                        gm.done_sure.insert(o);
                        gm.held.remove(&o);
                    }
                    false
                }
            }
        }
        Op::Ack { group, pick, .. } => {
            let Some(g) = tm.group_named(true, *group) else {
                return Ok(false);
            };
            let gm = tm.groups.get_mut(&g).expect("picked from the model");
            let offsets = picked(&gm.held, *pick);
            if offsets.is_empty() {
                return Ok(false);
            }
            let done = outcome(disk, "ack", t.ack(&g, &as_offsets(&offsets)))?.is_some();
            for &o in &offsets {
                gm.held.remove(&o);
                if done && always {
                    gm.done_sure.insert(o);
                } else {
                    gm.done_maybe.insert(o);
                }
            }
            !done
        }
        Op::Nack { group, pick, .. } => {
            let Some(g) = tm.group_named(true, *group) else {
                return Ok(false);
            };
            let gm = tm.groups.get_mut(&g).expect("picked from the model");
            let offsets = picked(&gm.held, *pick);
            for o in &offsets {
                gm.held.remove(o);
            }
            outcome(disk, "nack", t.nack(&g, &as_offsets(&offsets), 0))?.is_none()
        }
        Op::Read { group, .. } => {
            let Some(g) = tm.group_named(false, *group) else {
                return Ok(false);
            };
            let from = tm.groups[&g].committed_now();
            match outcome(
                disk,
                "stream fetch",
                t.fetch_stream(&g, "m", None, 20, NO_BYTE_LIMIT),
            )? {
                None => true,
                Some(msgs) => {
                    let mut last = None;
                    for m in &msgs {
                        let o = m.offset.0;
                        prop_assert!(
                            o >= from && last.is_none_or(|l| o > l),
                            "{}: stream read of {g} from {from} returned {o} out of order",
                            tm.name
                        );
                        last = Some(o);
                        let want = tm.msgs.get(&o).ok_or_else(|| {
                            fail(format!("{}: read offset {o} never produced", tm.name))
                        })?;
                        same_message(&tm.name, m, want)?;
                        prop_assert!(
                            !tm.hidden_sure.contains(&o) && !tm.deleted_pending.contains(&o),
                            "{}: deleted or consumed offset {o} read by {g}",
                            tm.name
                        );
                    }
                    false
                }
            }
        }
        Op::Commit { group, delta, .. } => {
            let Some(g) = tm.group_named(false, *group) else {
                return Ok(false);
            };
            let end = t.stats().end.0;
            let current = tm.groups[&g].committed_now();
            let to = current.saturating_add_signed(i64::from(*delta)).min(end);
            let done = outcome(disk, "commit", t.commit(&g, Offset(to)))?.is_some();
            let gm = tm.groups.get_mut(&g).expect("picked from the model");
            if done && always {
                gm.committed_sure = to;
                gm.committed_maybe.clear();
            } else {
                gm.committed_maybe.push(to);
            }
            !done
        }
        Op::Seek { group, to, .. } => {
            let Some(g) = tm.group_named(false, *group) else {
                return Ok(false);
            };
            let position = match *to {
                SeekTo::Earliest => Position::Earliest,
                SeekTo::Latest => Position::Latest,
                SeekTo::Fraction(f) => Position::Offset(t.stats().end.0 * u64::from(f) / (1 << 16)),
            };
            let target = t
                .resolve(position)
                .map_err(|e| fail(format!("resolving {position:?}: {e}")))?
                .0;
            let done = outcome(disk, "seek", t.seek(&g, position))?;
            if let Some(at) = done {
                prop_assert_eq!(at.0, target, "seek to {:?}", position);
            }
            let gm = tm.groups.get_mut(&g).expect("picked from the model");
            if done.is_some() && always {
                gm.committed_sure = target;
                gm.committed_maybe.clear();
            } else {
                gm.committed_maybe.push(target);
            }
            done.is_none()
        }
        Op::Delete { at, .. } => {
            let end = t.stats().end.0;
            if end == 0 {
                return Ok(false);
            }
            let offsets: Vec<u64> = at.iter().map(|&f| end * u64::from(f) / (1 << 16)).collect();
            let done = outcome(disk, "delete", t.delete(&as_offsets(&offsets)))?.is_some();
            if done && always {
                tm.hidden_sure.extend(&offsets);
            } else {
                tm.hidden_maybe.extend(&offsets);
                if done {
                    tm.deleted_pending.extend(&offsets);
                }
            }
            !done
        }
        Op::Compact { .. } => {
            let done =
                outcome(disk, "compaction", reg.compact(Some(&tm.name), &mut |_| {}))?.is_some();
            if done && !disk.is_powered_off() {
                let mut forbidden = tm.hidden_sure.clone();
                forbidden.extend(&tm.deleted_pending);
                check_log(&t, tm, &forbidden, "after compaction")?;
            }
            !done
        }
        Op::CompactWhileProducing { .. } => {
            // A producer fills the active segment while compaction runs, so
            // the segment compaction treated as active is sealed under it.
            let specs: Vec<MsgSpec> = (0..tm.spec.segment_bytes / 200 + 1)
                .map(|_| MsgSpec {
                    key: None,
                    headers: 0,
                    value_len: 150,
                    ts_back: None,
                })
                .collect();
            let mut produced: Option<Result<bool, TestCaseError>> = None;
            let name = tm.name.clone();
            let compacted = reg.compact(Some(&name), &mut |_| {
                if produced.is_none() {
                    produced = Some(produce(disk, &t, tm, next_id, history, &specs));
                }
            });
            let produce_failed = match produced {
                Some(r) => !r?,
                None => false,
            };
            let done = outcome(disk, "compaction", compacted)?.is_some();
            if done && !produce_failed && !disk.is_powered_off() {
                let mut forbidden = tm.hidden_sure.clone();
                forbidden.extend(&tm.deleted_pending);
                check_log(
                    &t,
                    tm,
                    &forbidden,
                    "after compaction with a concurrent produce",
                )?;
            }
            !done || produce_failed
        }
        Op::Sync { .. } => {
            let done = outcome(disk, "log sync", t.log().sync())?.is_some()
                && outcome(disk, "state sync", t.sync_state())?.is_some();
            if done {
                tm.confirm_state();
            }
            !done
        }
        Op::Tick { .. } => {
            let done = outcome(disk, "tick", t.tick())?.is_some();
            let stats = t.stats();
            // The tick syncs state exactly when the log is durable afterwards.
            if done
                && matches!(tm.spec.fsync, FsyncPolicy::Interval(_))
                && stats.durable_end == stats.end
            {
                tm.confirm_state();
            }
            !done
        }
        Op::CreateGroup { queue, latest, .. } => {
            if tm.groups.len() >= MAX_GROUPS {
                return Ok(false);
            }
            let name = format!("g{}", tm.groups.len());
            let position = if *latest {
                Position::Latest
            } else {
                Position::Earliest
            };
            let start = t
                .resolve(position)
                .map_err(|e| fail(format!("resolving {position:?}: {e}")))?
                .0;
            let mode = if *queue {
                GroupMode::Queue
            } else {
                GroupMode::Stream
            };
            let created = outcome(
                disk,
                "group creation",
                t.create_group(&name, mode, position),
            )?;
            if let Some(info) = &created {
                if *queue {
                    // A queue group's watermark reads past deleted messages.
                    let end = t.stats().end.0;
                    prop_assert!(
                        (start..=end).contains(&info.committed),
                        "start of new group {}: {} outside {start}..={end}",
                        &name,
                        info.committed
                    );
                } else {
                    prop_assert_eq!(info.committed, start, "start of new group {}", &name);
                }
            }
            tm.groups
                .insert(name, GroupModel::new(*queue, start, created.is_some()));
            created.is_none()
        }
    };
    // What returned is confirmed even when the power went off right after.
    {
        for (tm, t) in topics
            .iter_mut()
            .filter_map(|tm| reg.topic(&tm.name).ok().map(|t| (tm, t)))
        {
            let stats = t.stats();
            tm.durable_end = tm.durable_end.max(stats.durable_end.0);
            tm.published_end = tm.published_end.max(stats.end.0);
            if tm.always() {
                prop_assert_eq!(
                    stats.durable_end,
                    stats.end,
                    "{}: under fsync=always the published end is durable",
                    &tm.name
                );
            }
            tm.update_consumed();
        }
    }
    Ok(failed)
}

// ---------------------------------------------------------------------------
// Recovery and the checks after it
// ---------------------------------------------------------------------------

/// Opens the registry after a cut, optionally cutting the power once more
/// in the middle of recovery.
fn recover(
    disk: &Arc<SimDisk>,
    recovery_cut: Option<(u64, Option<u64>)>,
    figures: &mut Figures,
) -> Result<Registry, TestCaseError> {
    if let Some((extra, tear)) = recovery_cut {
        disk.power_off_after_syncs(Some(disk.sync_count() + extra));
        let attempt = open_registry(disk);
        let off = disk.is_powered_off();
        match attempt {
            Ok(reg) if !off => {
                disk.power_off_after_syncs(None);
                return Ok(reg);
            }
            Ok(reg) => drop(reg),
            Err(_) if off => {}
            Err(e) => return Err(fail(format!("recovery failed with the power on: {e}"))),
        }
        disk.power_cut(tear);
        figures.cuts += 1;
        figures.recovery_cuts += 1;
    }
    open_registry(disk).map_err(|e| fail(format!("recovery after a power cut failed: {e}")))
}

/// Checks one topic after recovery and brings the model in line with what
/// the broker now holds (every unconfirmed outcome is settled by then).
fn check_topic(
    reg: &Registry,
    tm: &mut TopicModel,
    now: u64,
    figures: &mut Figures,
) -> Result<(), TestCaseError> {
    let name = tm.name.clone();
    let t = reg
        .topic(&name)
        .map_err(|e| fail(format!("{name} is gone after recovery: {e}")))?;
    let end = t.stats().end.0;
    prop_assert!(
        end >= tm.durable_end,
        "{name}: the log ends at {end} after recovery, but offsets up to {} were durable",
        tm.durable_end
    );
    if tm.always() {
        prop_assert!(
            end >= tm.published_end,
            "{name}: the log ends at {end} after recovery, but offsets up to {} were shown to readers",
            tm.published_end
        );
    }
    let LogView {
        stored: raw,
        visible,
        confirmed,
    } = check_log(&t, tm, &tm.hidden_sure, "after recovery")?;
    figures.messages += confirmed;
    figures.hidden += tm.hidden_sure.iter().filter(|&&o| o < end).count() as u64;
    // A deletion of a message the cut took must not hide the message that
    // gets its offset next.
    for &o in tm.hidden_sure.iter().chain(&tm.hidden_maybe) {
        prop_assert!(
            o < end
                || !t
                    .is_deleted(Offset(o))
                    .map_err(|e| fail(format!("{name}: is_deleted({o}): {e}")))?,
            "{name}: offset {o} is past the recovered end {end} and still marked deleted"
        );
    }

    let infos = t
        .list_groups()
        .map_err(|e| fail(format!("{name}: listing groups: {e}")))?;
    let observed: BTreeMap<String, GroupMode> =
        infos.iter().map(|i| (i.name.clone(), i.mode)).collect();
    for group in observed.keys() {
        prop_assert!(
            tm.groups.contains_key(group),
            "{name}: group {group} appeared from nowhere"
        );
    }
    let names: Vec<String> = tm.groups.keys().cloned().collect();
    for g in names {
        let gm = tm.groups.get_mut(&g).expect("listed from the model");
        let Some(&mode) = observed.get(&g) else {
            prop_assert!(!gm.exists_sure, "{name}: confirmed group {g} is gone");
            tm.groups.remove(&g);
            continue;
        };
        let want = if gm.queue {
            GroupMode::Queue
        } else {
            GroupMode::Stream
        };
        prop_assert_eq!(
            mode,
            want,
            "{}: group {} came back as a {} group (creation confirmed: {})",
            &name,
            &g,
            mode,
            gm.exists_sure
        );
        if !gm.exists_sure {
            gm.exists_sure = true;
            gm.adopted = true;
        }
        if gm.queue {
            check_queue_group(reg, &t, tm, &g, &raw, &visible, now, figures)?;
        } else {
            let info = t
                .describe_group(&g)
                .map_err(|e| fail(format!("{name}: describing {g}: {e}")))?;
            let gm = tm.groups.get_mut(&g).expect("listed from the model");
            if !gm.adopted {
                let allowed: BTreeSet<u64> = std::iter::once(gm.committed_sure)
                    .chain(gm.committed_maybe.iter().copied())
                    .map(|c| c.min(end))
                    .collect();
                prop_assert!(
                    allowed.contains(&info.committed),
                    "{name}: stream group {g} resumes at {} after recovery; confirmed {}, unconfirmed {:?}",
                    info.committed,
                    gm.committed_sure,
                    gm.committed_maybe
                );
                figures.commits += 1;
            }
            gm.committed_sure = info.committed;
            gm.committed_maybe.clear();
            gm.adopted = false;
        }
    }

    // What the broker holds now is the model from here on.
    tm.msgs = raw
        .values()
        .map(|m| {
            (
                m.offset.0,
                NewMessage {
                    timestamp_ms: Some(m.timestamp_ms),
                    key: m.key.clone(),
                    headers: m.headers.clone(),
                    value: m.value.clone(),
                },
            )
        })
        .collect();
    tm.durable_end = end;
    tm.published_end = end;
    tm.hidden_sure = raw
        .keys()
        .filter(|o| !visible.contains(o))
        .copied()
        .collect();
    tm.hidden_maybe = BTreeSet::new();
    tm.deleted_pending.clear();
    Ok(())
}

/// A queue group after recovery: everything pending is delivered again (or
/// dead-lettered), nothing acked is. Leaves the deliveries nacked.
#[allow(clippy::too_many_arguments)]
fn check_queue_group(
    reg: &Registry,
    t: &Topic,
    tm: &mut TopicModel,
    g: &str,
    raw: &BTreeMap<u64, Message>,
    visible: &BTreeSet<u64>,
    now: u64,
    figures: &mut Figures,
) -> Result<(), TestCaseError> {
    let name = tm.name.clone();
    let end = t.stats().end.0;
    let mut delivered = BTreeSet::new();
    let mut dead = BTreeSet::new();
    loop {
        let f = reg
            .fetch_queue(&name, g, "check", 64, NO_BYTE_LIMIT, now)
            .map_err(|e| fail(format!("{name}: fetch of {g} after recovery: {e}")))?;
        if f.deliveries.is_empty() && f.dead_letters.is_empty() {
            break;
        }
        let gm = tm.groups.get_mut(g).expect("checked group is modelled");
        for d in &f.deliveries {
            let o = d.message.offset.0;
            prop_assert!(
                visible.contains(&o),
                "{name}: group {g} got offset {o}, which a replay does not show"
            );
            prop_assert_eq!(Some(&d.message), raw.get(&o));
            prop_assert!(
                !gm.done_sure.contains(o),
                "{name}: the confirmed ack of offset {o} by {g} is lost: delivered again after recovery"
            );
            prop_assert!(delivered.insert(o), "{name}: {o} delivered twice to {g}");
        }
        for l in &f.dead_letters {
            let o = l.offset.0;
            prop_assert!(
                !gm.done_sure.contains(o),
                "{name}: the confirmed ack of offset {o} by {g} is lost: dead-lettered after recovery"
            );
            let id =
                id_of(&l.message.headers).ok_or_else(|| fail("a dead letter without its id"))?;
            gm.dead_sure.insert(id);
            dead.insert(o);
        }
    }
    let gm = tm.groups.get_mut(g).expect("checked group is modelled");
    if !gm.adopted {
        for &o in visible {
            if gm.done_sure.contains(o) {
                figures.completions += 1;
            } else if !gm.done_maybe.contains(o) {
                prop_assert!(
                    delivered.contains(&o) || dead.contains(&o),
                    "{name}: offset {o} is pending for {g} but not delivered after recovery"
                );
            }
        }
    }
    let offsets: Vec<u64> = delivered.iter().copied().collect();
    t.nack(g, &as_offsets(&offsets), 0)
        .map_err(|e| fail(format!("{name}: nack after the check: {e}")))?;
    let mut done = RangeSet::new();
    let mut from = 0;
    for &o in &delivered {
        done.insert_range(from..o);
        from = o + 1;
    }
    done.insert_range(from..end);
    gm.done_sure = done;
    gm.done_maybe = RangeSet::new();
    gm.held.clear();
    gm.adopted = false;
    Ok(())
}

/// Every confirmed dead letter is in its dead-letter topic, intact; a
/// message is there more than once only after a hand-off a cut interrupted.
fn check_dead_letters(
    reg: &Registry,
    model: &Model,
    figures: &mut Figures,
) -> Result<(), TestCaseError> {
    for tm in &model.topics {
        let dlq_name = format!("{}.dlq", tm.name);
        let letters = match reg.topic(&dlq_name) {
            Ok(dlq) => read_raw(&dlq)?,
            Err(_) => Vec::new(),
        };
        let mut copies: BTreeMap<(String, u64), u32> = BTreeMap::new();
        for l in &letters {
            let id = id_of(&l.headers).ok_or_else(|| fail("a dead letter without its id"))?;
            let p = model
                .history
                .get(&id)
                .ok_or_else(|| fail(format!("{dlq_name}: dead letter {id} was never produced")))?;
            prop_assert_eq!(&p.topic, &tm.name);
            prop_assert_eq!(&l.key, &p.message.key);
            prop_assert_eq!(&l.value, &p.message.value);
            prop_assert!(
                l.headers.starts_with(&p.message.headers),
                "{dlq_name}: dead letter {id} lost its headers: {:?}",
                l.headers
            );
            let offset = p.offset.to_string();
            prop_assert_eq!(header(l, dlq_headers::OFFSET), Some(offset.as_bytes()));
            let group = header(l, dlq_headers::GROUP)
                .map(|g| String::from_utf8_lossy(g).into_owned())
                .ok_or_else(|| fail("a dead letter without its group"))?;
            *copies.entry((group, id)).or_default() += 1;
        }
        for (g, gm) in &tm.groups {
            for &id in &gm.dead_sure {
                prop_assert!(
                    copies.contains_key(&(g.clone(), id)),
                    "{}: the confirmed dead letter {id} of {g} is missing from {dlq_name}",
                    tm.name
                );
                figures.dead_letters += 1;
            }
        }
        for ((g, id), n) in copies {
            let gm = tm.groups.get(&g);
            let allowed = gm.map_or(0, |gm| {
                u32::from(gm.dead_sure.contains(&id)) + gm.interrupted_fetches
            });
            prop_assert!(
                n <= allowed,
                "{dlq_name}: message {id} dead-lettered {n} times by {g} ({allowed} allowed)"
            );
        }
    }
    Ok(())
}

fn check_recovered(
    reg: &Registry,
    model: &mut Model,
    figures: &mut Figures,
) -> Result<(), TestCaseError> {
    let now = model.now();
    for tm in &mut model.topics {
        check_topic(reg, tm, now, figures)?;
        tm.update_consumed();
    }
    check_dead_letters(reg, model, figures)?;
    let report = verify(reg.data(), &mut |_| {}).map_err(|e| fail(format!("verify: {e}")))?;
    prop_assert!(
        report.is_clean(),
        "verify after recovery found damage: {:?}",
        report.damage
    );
    Ok(())
}

/// Runs a workload through all its cuts; returns the broker as the last
/// recovery left it (already checked).
fn run_case(case: &Case, figures: &mut Figures) -> Result<Registry, TestCaseError> {
    let disk = Arc::new(SimDisk::new());
    let mut reg = open_registry(&disk).map_err(|e| fail(format!("opening: {e}")))?;
    let mut model = Model {
        topics: Vec::new(),
        next_id: 0,
        history: HashMap::new(),
        skew: 0,
    };
    for (i, spec) in case.topics.iter().enumerate() {
        let name = topic_name(i);
        let t = reg
            .create_topic(&name, topic_config(spec))
            .map_err(|e| fail(format!("creating {name}: {e}")))?;
        let mut groups = BTreeMap::new();
        for (j, &queue) in spec.groups.iter().enumerate() {
            let g = format!("g{j}");
            let mode = if queue {
                GroupMode::Queue
            } else {
                GroupMode::Stream
            };
            t.create_group(&g, mode, Position::Earliest)
                .map_err(|e| fail(format!("creating {g}: {e}")))?;
            groups.insert(g, GroupModel::new(queue, 0, true));
        }
        model.topics.push(TopicModel {
            name,
            spec: spec.clone(),
            msgs: BTreeMap::new(),
            durable_end: 0,
            published_end: 0,
            hidden_sure: BTreeSet::new(),
            hidden_maybe: BTreeSet::new(),
            deleted_pending: BTreeSet::new(),
            groups,
        });
    }
    figures.cases += 1;
    for epoch in &case.epochs {
        for (i, op) in epoch.ops.iter().enumerate() {
            if i == epoch.arm_at {
                disk.power_off_after_syncs(Some(disk.sync_count() + epoch.extra_syncs));
            }
            // Everything after the power went off fails: on to the cut.
            if run_op(&disk, &reg, &mut model, op)? || disk.is_powered_off() {
                break;
            }
        }
        drop(reg);
        disk.power_cut(epoch.tear);
        figures.cuts += 1;
        reg = recover(&disk, epoch.recovery_cut, figures)?;
        check_recovered(&reg, &mut model, figures)?;
    }
    Ok(reg)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn power_cuts_in_random_broker_workloads_lose_nothing_confirmed() {
    let cases = env_u64("SPOOL_POWER_CUTS").map_or(DEFAULT_CASES, |n| n as u32);
    let seed = env_u64("SPOOL_POWER_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let figures = std::cell::RefCell::new(Figures::default());
    let result = runner.run(&case_strategy(), |case| {
        run_case(&case, &mut figures.borrow_mut()).map(drop)
    });
    let f = figures.into_inner();
    match result {
        Ok(()) => eprintln!(
            "power_loss: {} power cuts ({} during recovery) in {} workloads, {} acked messages checked, \
             0 lost; {} queue completions, {} stream commits, {} deletions, {} dead letters kept \
             (SPOOL_POWER_SEED={seed})",
            f.cuts,
            f.recovery_cuts,
            f.cases,
            f.messages,
            f.completions,
            f.commits,
            f.hidden,
            f.dead_letters
        ),
        Err(TestError::Fail(reason, case)) => {
            panic!("{reason}\nminimal failing workload (SPOOL_POWER_SEED={seed}):\n{case:#?}")
        }
        Err(e) => panic!("{e} (SPOOL_POWER_SEED={seed})"),
    }
}

// ---------------------------------------------------------------------------
// Smallest cases of what the harness found
// ---------------------------------------------------------------------------

fn small_topic(reg: &Registry, name: &str, fsync: FsyncPolicy, cleanup: Cleanup) -> Arc<Topic> {
    let config = TopicConfig {
        cleanup,
        log: LogConfig {
            segment_bytes: 1024,
            fsync,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    };
    reg.create_topic(name, config).expect("create topic")
}

fn values(t: &Topic) -> Vec<(u64, Bytes)> {
    read_visible(t)
        .expect("replay")
        .into_iter()
        .map(|m| (m.offset.0, m.value))
        .collect()
}

#[test]
fn a_group_whose_creation_was_cut_comes_back_with_its_mode_or_not_at_all() {
    // The group's journal name must not become durable before its first
    // entries (mode and start): reopened without them, it came back as a
    // stream group.
    for extra in 0..4 {
        let disk = Arc::new(SimDisk::new());
        let reg = open_registry(&disk).expect("open");
        let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
        t.produce(&[NewMessage::from_value("m")]).expect("produce");
        disk.power_off_after_syncs(Some(disk.sync_count() + extra));
        let created = t.create_group("q", GroupMode::Queue, Position::Latest);
        drop(t);
        drop(reg);
        disk.power_cut(Some(extra));
        let reg = open_registry(&disk).expect("recover");
        let t = reg.topic("t").expect("topic");
        match t.describe_group("q") {
            Ok(info) => {
                assert_eq!(info.mode, GroupMode::Queue, "cut after {extra} syncs");
                assert_eq!(info.committed, 1, "cut after {extra} syncs");
            }
            Err(e) => assert!(created.is_err(), "confirmed group lost: {e}"),
        }
    }
}

#[test]
fn compaction_keeps_a_synced_record_whose_successor_is_not_synced() {
    // fsync=never: the first record is synced by the seal; its successor with
    // the same key is only written. Compaction must not drop the first for a
    // record a power cut takes back.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "kv", FsyncPolicy::Never, Cleanup::Compact);
    let old = Bytes::from(vec![b'a'; 980]);
    t.produce(&[NewMessage::from_value(old.clone()).with_key("k")])
        .expect("produce");
    // Does not fit: seals (and syncs) the first segment.
    t.produce(&[NewMessage::from_value("new").with_key("k")])
        .expect("produce");
    assert_eq!(t.stats().durable_end.0, 1, "the first record is durable");
    reg.compact(Some("kv"), &mut |_| {}).expect("compact");
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("kv").expect("topic");
    assert!(
        values(&t) == vec![(0, old)],
        "the synced value of k is lost: the topic holds {:?}",
        read_raw(&t).expect("read")
    );
}

#[test]
fn a_deletion_of_a_message_the_cut_took_does_not_hide_its_successor() {
    // fsync=never: a message only written, then deleted; compaction makes the
    // deletions journal durable. The cut takes the message; the message that
    // gets its offset next must be visible.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Never, Cleanup::Delete);
    for i in 0..3u8 {
        t.produce(&[NewMessage::from_value(vec![i; 300])])
            .expect("produce");
    }
    // Seals the first segment (3 records), then stays in the page cache.
    let lost = t
        .produce(&[NewMessage::from_value(vec![9; 300])])
        .expect("produce")
        .first
        .0;
    assert_eq!(
        t.stats().durable_end.0,
        lost,
        "only the sealed segment is synced"
    );
    t.delete(&[Offset(0), Offset(lost)]).expect("delete");
    reg.compact(Some("t"), &mut |_| {}).expect("compact");
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    // The deletion speaks of the lost offset: it is never handed out again.
    assert_eq!(
        t.stats().end.0,
        lost + 1,
        "the log continues after the lost message"
    );
    assert!(
        read_raw(&t)
            .expect("read")
            .iter()
            .all(|m| m.offset.0 < lost)
    );
    let next = t
        .produce(&[NewMessage::from_value("successor")])
        .expect("produce");
    t.log().sync().expect("sync");
    assert_eq!(next.first.0, lost + 1);
    assert!(
        values(&t).contains(&(lost + 1, Bytes::from("successor"))),
        "the message after offset {lost} is hidden by the deletion of its predecessor"
    );
}

#[test]
fn a_deletion_in_a_segment_sealed_during_compaction_stays() {
    // Online compaction: a producer seals the segment compaction took for the
    // active one. A deletion in that segment was not compacted away, so the
    // deletions journal must keep it.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    for i in 0..5u8 {
        t.produce(&[NewMessage::from_value(vec![i; 300])])
            .expect("produce");
    }
    let active_base = t.log().segments().last().expect("active").base();
    assert!(
        active_base > 0 && active_base < 5,
        "a sealed and an active segment"
    );
    t.delete(&[Offset(0), Offset(active_base)]).expect("delete");
    let mut rolled = false;
    reg.compact(Some("t"), &mut |_| {
        if !rolled {
            for i in 0..4u8 {
                t.produce(&[NewMessage::from_value(vec![i; 300])])
                    .expect("produce during compaction");
            }
            rolled = true;
        }
    })
    .expect("compact");
    assert!(rolled);
    assert!(
        t.log().segments().last().expect("active").base() > active_base,
        "the producer sealed the segment compaction took for the active one"
    );
    let visible = |t: &Topic| values(t).iter().any(|&(o, _)| o == active_base);
    assert!(
        !visible(&t),
        "deleted offset {active_base} is visible again"
    );
    drop(t);
    drop(reg);
    let reg = open_registry(&disk).expect("reopen");
    let t = reg.topic("t").expect("topic");
    assert!(
        !visible(&t),
        "deleted offset {active_base} is visible after a restart"
    );
}

#[test]
fn a_completion_derived_from_a_deletion_is_not_durable_before_the_deletion() {
    // fsync=never: the deletion is in memory only; a queue fetch passes the
    // deleted offset, completes it for its group and syncs the group. Either
    // the deletion is durable with it, or a cut takes both back: if the
    // message is there again for replay, the group must get it too.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Never, Cleanup::Delete);
    t.produce(&[
        NewMessage::from_value("first"),
        NewMessage::from_value("second"),
    ])
    .expect("produce");
    t.log().sync().expect("sync");
    t.ensure_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    t.delete(&[Offset(0)])
        .expect("delete (written, not synced)");
    let fetched = reg
        .fetch_queue("t", "q", "m", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    assert_eq!(
        fetched.deliveries.len(),
        1,
        "the deleted message is skipped"
    );
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    let replayed: Vec<u64> = values(&t).iter().map(|(o, _)| *o).collect();
    let again = reg
        .fetch_queue("t", "q", "m", 10, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let offsets: Vec<u64> = again
        .deliveries
        .iter()
        .map(|d| d.message.offset.0)
        .collect();
    assert_eq!(
        offsets, replayed,
        "the group gets exactly what replay shows after the cut"
    );
}

#[test]
fn an_unconfirmed_seek_back_can_outlive_the_commit_after_it() {
    // fsync=interval, nothing ticks: the stream group's seek back to 0 is
    // made durable by compaction (which syncs group state) but not
    // confirmed, its commit to 2 is neither, and the queue group's
    // dead-letter hand-off of offsets 0 and 1 is confirmed. The cut may
    // leave the stream group at 0, where 0 and 1 are not consumed by every
    // group: the harness must accept them visible again.
    let m = || MsgSpec {
        key: None,
        headers: 0,
        value_len: 0,
        ts_back: None,
    };
    let case = Case {
        topics: vec![TopicSpec {
            fsync: FsyncPolicy::Interval(1),
            keyed: false,
            delete_when_consumed: true,
            segment_bytes: 2048,
            max_deliveries: 2,
            groups: vec![true],
        }],
        epochs: vec![Epoch {
            ops: vec![
                Op::Produce {
                    topic: 0,
                    msgs: vec![m(), m()],
                },
                Op::Sync { topic: 0 },
                // Two deliveries each, then the third fetch dead-letters them.
                Op::Fetch {
                    topic: 0,
                    group: 0,
                    max: 2,
                },
                Op::Timeout,
                Op::Fetch {
                    topic: 0,
                    group: 0,
                    max: 2,
                },
                Op::CreateGroup {
                    topic: 0,
                    queue: false,
                    latest: true,
                },
                Op::Seek {
                    topic: 0,
                    group: 0,
                    to: SeekTo::Earliest,
                },
                Op::Compact { topic: 0 },
                Op::Commit {
                    topic: 0,
                    group: 0,
                    delta: 2,
                },
                Op::Timeout,
                Op::Fetch {
                    topic: 0,
                    group: 0,
                    max: 2,
                },
            ],
            // Past the ops: the power goes off after the last one returned.
            arm_at: usize::MAX,
            extra_syncs: 0,
            tear: None,
            recovery_cut: None,
        }],
    };
    let reg = run_case(&case, &mut Figures::default()).expect("the outcome is allowed");
    let t = reg.topic("t0").expect("topic");
    assert_eq!(
        t.describe_group("g1").expect("stream group").committed,
        0,
        "the synced seek back survives, the unsynced commit after it does not"
    );
    assert_eq!(
        values(&t).iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        vec![0, 1],
        "messages the stream group has not consumed are visible again"
    );
}

/// Offsets as the broker takes them.
fn as_offsets(offsets: &[u64]) -> Vec<Offset> {
    offsets.iter().copied().map(Offset).collect()
}

#[test]
fn a_consumed_offset_deleted_again_stays_gone_when_a_group_is_added() {
    // The workload the harness shrank it to (seed 1796124429887932793).
    // Topic t1 (fsync=interval, `delete_when_consumed`, one queue group):
    // the group acks offsets 4 and 8 and compaction makes that durable; a
    // cut shows them consumed. Then 4 and 8 are deleted explicitly (applied,
    // not yet synced) and a stream group is created at the earliest offset,
    // 3. Creating a group first records what every group consumed as
    // deleted, durably; it skipped 4 and 8, already deleted in memory, and
    // so left that deletion unsynced: the cut after it showed them to the
    // new group as if never consumed.
    let m = || MsgSpec {
        key: None,
        headers: 0,
        value_len: 0,
        ts_back: None,
    };
    let ms = |n: usize| (0..n).map(|_| m()).collect::<Vec<_>>();
    let epoch = |ops: Vec<Op>, arm_at: usize, extra_syncs: u64| Epoch {
        ops,
        arm_at,
        extra_syncs,
        tear: None,
        recovery_cut: None,
    };
    let case = Case {
        topics: vec![
            TopicSpec {
                fsync: FsyncPolicy::Always,
                keyed: false,
                delete_when_consumed: false,
                segment_bytes: 1024,
                max_deliveries: 2,
                groups: vec![false],
            },
            TopicSpec {
                fsync: FsyncPolicy::Interval(1),
                keyed: false,
                delete_when_consumed: true,
                segment_bytes: 1467,
                max_deliveries: 3,
                groups: vec![true],
            },
        ],
        epochs: vec![
            epoch(
                vec![
                    Op::Produce {
                        topic: 1,
                        msgs: ms(2),
                    },
                    Op::Produce {
                        topic: 1,
                        msgs: ms(1),
                    },
                    Op::Produce {
                        topic: 1,
                        msgs: ms(4),
                    },
                    Op::Sync { topic: 1 },
                ],
                0,
                1,
            ),
            epoch(
                vec![
                    Op::Delete {
                        topic: 1,
                        at: vec![18725, 0],
                    },
                    Op::Produce {
                        topic: 1,
                        msgs: ms(2),
                    },
                    Op::Delete {
                        topic: 1,
                        at: vec![7282],
                    },
                    Op::Sync { topic: 1 },
                    Op::Fetch {
                        topic: 1,
                        group: 0,
                        max: 5,
                    },
                    Op::Ack {
                        topic: 1,
                        group: 0,
                        pick: 5663759652558836010,
                    },
                    Op::CompactWhileProducing { topic: 1 },
                ],
                4,
                2,
            ),
            epoch(
                vec![
                    Op::Delete {
                        topic: 1,
                        at: vec![58255, 29128],
                    },
                    Op::CreateGroup {
                        topic: 1,
                        queue: false,
                        latest: false,
                    },
                ],
                2,
                0,
            ),
        ],
    };
    let reg = run_case(&case, &mut Figures::default()).expect("nothing consumed comes back");
    let t = reg.topic("t1").expect("topic");
    let visible: Vec<u64> = values(&t).iter().map(|(o, _)| *o).collect();
    assert!(
        !visible.contains(&4) && !visible.contains(&8),
        "consumed offsets 4 and 8 stay gone: {visible:?}"
    );
}

#[test]
fn a_fetch_makes_deletions_durable_before_the_completions_that_stand_on_them() {
    // fsync=interval, nothing ticks: all but the last of 10 050 messages are
    // deleted (applied, not synced), then one queue fetch walks over them,
    // completing each deleted offset in the group so it does not hold the
    // watermark back. Past 10 000 completions the group's journal is synced
    // and snapshotted within the fetch. That sync came before the fetch
    // synced the deletions: a cut between the two kept the completions and
    // lost the deletion, and the group never got those messages. Whatever the
    // cut keeps, every message a replay shows is still the group's to fetch.
    const N: u64 = 10_050;
    for extra in 0..3 {
        let disk = Arc::new(SimDisk::new());
        let reg = open_registry(&disk).expect("open");
        let config = TopicConfig {
            log: LogConfig {
                segment_bytes: 4 << 20,
                fsync: FsyncPolicy::Interval(3_600_000),
                ..LogConfig::default()
            },
            ..TopicConfig::default()
        };
        let t = reg.create_topic("t", config).expect("create topic");
        t.create_group("q", GroupMode::Queue, Position::Earliest)
            .expect("group");
        for start in (0..N).step_by(1000) {
            let batch: Vec<_> = (start..(start + 1000).min(N))
                .map(|i| NewMessage::from_value(i.to_string()))
                .collect();
            t.produce(&batch).expect("produce");
        }
        t.log().sync().expect("log sync");
        t.sync_state().expect("state sync");
        let deleted: Vec<Offset> = (0..N - 1).map(Offset).collect();
        t.delete(&deleted).expect("delete");
        disk.power_off_after_syncs(Some(disk.sync_count() + extra));
        let _ = t.fetch_queue("q", "m", 1, NO_BYTE_LIMIT, now_ms());
        drop(t);
        drop(reg);
        disk.power_cut(None);
        let reg = open_registry(&disk).expect("recover");
        let t = reg.topic("t").expect("topic");
        let visible: BTreeSet<u64> = values(&t).iter().map(|(o, _)| *o).collect();
        let mut fetched = BTreeSet::new();
        loop {
            let f = t
                .fetch_queue("q", "m", 1000, NO_BYTE_LIMIT, now_ms())
                .expect("fetch");
            if f.deliveries.is_empty() {
                break;
            }
            fetched.extend(f.deliveries.iter().map(|d| d.message.offset.0));
        }
        let missing: Vec<u64> = visible.difference(&fetched).copied().take(5).collect();
        assert!(
            missing.is_empty(),
            "cut after {extra} syncs: {} visible offsets the group never gets again, first {missing:?}",
            visible.difference(&fetched).count()
        );
    }
}

fn consumed_when_all_consumed(reg: &Registry, name: &str, log: LogConfig) -> Arc<Topic> {
    let config = TopicConfig {
        delete_when_consumed: true,
        log,
        ..TopicConfig::default()
    };
    reg.create_topic(name, config).expect("create topic")
}

/// Leases up to `max` messages of queue group `group` to member "m" and
/// acks them; returns their offsets.
fn lease_and_ack(t: &Topic, group: &str, max: usize) -> Vec<u64> {
    let leased = t
        .fetch_queue(group, "m", max, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    let offsets: Vec<Offset> = leased.deliveries.iter().map(|d| d.message.offset).collect();
    t.ack(group, &offsets).expect("ack");
    offsets.iter().map(|o| o.0).collect()
}

/// Topic "t" under `fsync`, with queue group "q" and `n` small messages.
fn queue_topic(reg: &Registry, fsync: FsyncPolicy, n: u8) -> Arc<Topic> {
    let config = TopicConfig {
        log: LogConfig {
            fsync,
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    };
    let t = reg.create_topic("t", config).expect("topic");
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..n {
        t.produce(&[NewMessage::from_value(vec![i; 10])])
            .expect("produce");
    }
    t
}

fn visible_offsets(t: &Topic) -> BTreeSet<u64> {
    read_visible(t)
        .expect("replay")
        .iter()
        .map(|m| m.offset.0)
        .collect()
}

#[test]
fn what_the_last_group_consumed_stays_gone_when_it_goes_as_segments_are_dropped() {
    // Retention, or compaction (a segment with nothing live), drops the
    // oldest segments while the last group of a delete_when_consumed topic
    // is removed. The cut lands before the dropped files are durably gone,
    // so recovery keeps those segments: what the group consumed in them
    // must not come back with them.
    let retention = |_: &Registry, t: &Topic| t.enforce_retention(now_ms()).map(|_| ());
    let compaction = |reg: &Registry, _: &Topic| reg.compact(Some("t"), &mut |_| {}).map(|_| ());
    type Pass<'a> = &'a dyn Fn(&Registry, &Topic) -> spool::Result<()>;
    for (how, pass) in [
        ("retention", &retention as Pass),
        ("compaction", &compaction),
    ] {
        the_last_group_goes_while_segments_are_dropped(how, pass);
    }
}

fn the_last_group_goes_while_segments_are_dropped(
    how: &str,
    pass: &dyn Fn(&Registry, &Topic) -> spool::Result<()>,
) {
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let log = LogConfig {
        segment_bytes: 1024,
        retention_bytes: Some(2048),
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let t = consumed_when_all_consumed(&reg, "t", log);
    t.create_group("s", GroupMode::Stream, Position::Earliest)
        .expect("group");
    for i in 0..30u8 {
        t.produce(&[NewMessage::from_value(vec![i; 300])])
            .expect("produce");
    }
    t.commit("s", Offset(30)).expect("commit");
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (t, disk, fired) = (Arc::clone(&t), Arc::clone(&disk), Arc::clone(&fired));
        disk.clone().set_hook(Some(Arc::new(move |op, path| {
            let segment_file = path.extension().is_some_and(|e| e == "log");
            if op == SimOp::Remove && segment_file && !fired.swap(true, Ordering::SeqCst) {
                t.delete_group("s").expect("group removed");
                disk.power_off_after_syncs(Some(disk.sync_count()));
            }
        })));
    }
    let passed = pass(&reg, &t);
    disk.set_hook(None);
    assert!(
        fired.load(Ordering::SeqCst),
        "{how} removed no segment: {passed:?}"
    );
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    assert!(
        t.list_groups().expect("groups").is_empty(),
        "{how}: the removal was confirmed"
    );
    assert_eq!(
        visible_offsets(&t),
        BTreeSet::new(),
        "{how}: messages the only group consumed came back with the segments the cut kept (start {})",
        t.stats().start
    );
}

#[test]
fn an_offset_seen_consumed_by_every_group_stays_gone_through_a_seek_back() {
    // Group a seeks back (or commits back) while group b commits past what
    // a had consumed. Whichever goes first, a reader that saw an offset gone
    // (consumed by both) must never see it again: b's commit may not land
    // between a's move recording what both consumed and the move itself.
    let seek = |t: &Topic| t.seek("a", Position::Offset(0)).map(|_| ());
    let commit = |t: &Topic| t.commit("a", Offset(0));
    for (how, move_a) in [
        ("seek", &seek as &dyn Fn(&Topic) -> spool::Result<()>),
        ("commit", &commit),
    ] {
        a_move_back_races_a_commit(how, move_a);
    }
}

fn a_move_back_races_a_commit(how: &str, move_a: &dyn Fn(&Topic) -> spool::Result<()>) {
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let log = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let t = consumed_when_all_consumed(&reg, "t", log);
    for g in ["a", "b"] {
        t.create_group(g, GroupMode::Stream, Position::Earliest)
            .expect("group");
    }
    for i in 0..10u8 {
        t.produce(&[NewMessage::from_value(vec![i; 10])])
            .expect("produce");
    }
    t.commit("a", Offset(10)).expect("commit a");
    t.commit("b", Offset(5)).expect("commit b");
    assert_eq!(visible_offsets(&t), (5..10).collect());
    // While a's seek makes what both consumed durable, b commits and a
    // reader looks, on another thread (given a while to finish first).
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (t, fired) = (Arc::clone(&t), Arc::clone(&fired));
        disk.set_hook(Some(Arc::new(move |op, path| {
            let deletions = path.to_string_lossy().contains("deletes");
            if op != SimOp::SyncData || !deletions || fired.swap(true, Ordering::SeqCst) {
                return;
            }
            let (t, seen_tx) = (Arc::clone(&t), seen_tx.clone());
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                t.commit("b", Offset(10)).expect("commit b");
                let _ = seen_tx.send(visible_offsets(&t));
                let _ = done_tx.send(());
            });
            let _ = done_rx.recv_timeout(std::time::Duration::from_millis(500));
        })));
    }
    move_a(&t).unwrap_or_else(|e| panic!("{how} a back: {e}"));
    let seen = seen_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("b committed");
    disk.set_hook(None);
    assert!(fired.load(Ordering::SeqCst), "the {how} synced no deletion");
    let after = visible_offsets(&t);
    assert!(
        after.is_subset(&seen),
        "offsets seen gone came back after the {how}: seen {seen:?}, then {after:?}"
    );
    assert_eq!(
        after,
        (5..10).collect(),
        "{how}: a reads on from 0, 0..5 stay gone"
    );
}

#[test]
fn retention_that_respects_groups_makes_the_acks_it_stands_on_durable_first() {
    // fsync=interval, nothing synced by a tick: a queue group's acks are in
    // memory only when a retention pass that respects groups drops the
    // segments they complete. The drop is durable; the acks must be too, or
    // a cut leaves the group past messages it never durably completed.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let config = TopicConfig {
        retention_respects_groups: true,
        log: LogConfig {
            segment_bytes: 1024,
            retention_bytes: Some(2048),
            fsync: FsyncPolicy::Interval(3_600_000),
            ..LogConfig::default()
        },
        ..TopicConfig::default()
    };
    let t = reg.create_topic("t", config).expect("topic");
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..30u8 {
        t.produce(&[NewMessage::from_value(vec![i; 300])])
            .expect("produce");
    }
    t.sync_log().expect("sync the log");
    assert_eq!(lease_and_ack(&t, "q", 30).len(), 30);
    let dropped = t.enforce_retention(now_ms()).expect("retention");
    assert!(!dropped.is_empty(), "retention dropped nothing");
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    assert!(t.stats().start.0 > 0, "the drop is durable");
    let q = t.describe_group("q").expect("group");
    assert_eq!(
        (q.committed, q.lost_to_retention),
        (30, 0),
        "the acks the pass stood on were lost with the messages they completed"
    );
}

#[test]
fn an_interval_tick_makes_what_was_confirmed_before_it_durable() {
    // fsync=interval: a produce whose commit synced (the interval had
    // passed) just before the tick must not make the tick skip what came
    // after it: messages and acks confirmed before a tick survive a cut
    // right after it.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = queue_topic(&reg, FsyncPolicy::Interval(300), 3);
    std::thread::sleep(std::time::Duration::from_millis(350));
    let synced = t
        .produce(&[NewMessage::from_value("due")])
        .expect("produce");
    assert_eq!(
        synced.durability,
        Durability::Durable,
        "the interval passed"
    );
    assert_eq!(lease_and_ack(&t, "q", 10).len(), 4);
    let written = t
        .produce(&[NewMessage::from_value("after")])
        .expect("produce");
    assert_eq!(written.durability, Durability::Written);
    t.tick().expect("tick");
    // The power goes off right after the tick: nothing syncs on the way down.
    disk.power_off_after_syncs(Some(disk.sync_count()));
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    assert_eq!(
        t.stats().end.0,
        5,
        "a message written before the tick is lost"
    );
    assert_eq!(
        t.describe_group("q").expect("group").committed,
        4,
        "acks confirmed before the tick are undone"
    );
}

#[test]
fn a_queue_fetch_that_fails_part_way_leaves_nothing_undeliverable() {
    // A redelivery's count cannot be journaled (the disk is full) after the
    // fetch has read new messages past the group's cursor: those must still
    // reach the group once the disk has room, without a restart.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..5u8 {
        t.produce(&[NewMessage::from_value(vec![i; 10])])
            .expect("produce");
    }
    let first = t
        .fetch_queue("q", "m", 1, NO_BYTE_LIMIT, now_ms())
        .expect("fetch");
    assert_eq!(first.deliveries.len(), 1);
    t.nack("q", &[Offset(0)], 0).expect("nack");
    disk.set_fault(SimFault::NoSpace, true);
    let failed = t.fetch_queue("q", "m", 10, NO_BYTE_LIMIT, now_ms());
    disk.set_fault(SimFault::NoSpace, false);
    assert!(failed.is_err(), "the redelivery count needs the full disk");
    let mut got = BTreeSet::new();
    for _ in 0..5 {
        got.extend(lease_and_ack(&t, "q", 10));
    }
    assert_eq!(
        got,
        (0..5).collect(),
        "messages the failed fetch read are never delivered"
    );
    assert_eq!(t.describe_group("q").expect("group").lag, 0);
}

#[test]
fn a_topic_opened_on_a_full_disk_keeps_what_is_confirmed_after_it() {
    // After a clean stop the disk is full: the open cannot replace the
    // clean checkpoint, yet must not leave it saying "clean" while a group
    // created and a commit confirmed once space returns are written beside
    // it. A power cut before the next checkpoint must keep both (a clean
    // checkpoint lists every group, so the group would be no group, and the
    // journal past its recorded end would be cut).
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    for i in 0..5u8 {
        t.produce(&[NewMessage::from_value(vec![i; 10])])
            .expect("produce");
    }
    drop(t);
    reg.stop_all().expect("clean stop");
    drop(reg);
    disk.set_fault(SimFault::NoSpace, true);
    let reg = open_registry(&disk).expect("a registry on a full disk");
    let t = reg.topic("t").expect("the topic opens on a full disk");
    assert_eq!(values(&t).len(), 5, "and reads");
    disk.set_fault(SimFault::NoSpace, false);
    t.create_group("g", GroupMode::Stream, Position::Earliest)
        .expect("group");
    t.commit("g", Offset(3)).expect("commit");
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    let g = t.describe_group("g").expect("the group survives the cut");
    assert_eq!(g.committed, 3, "its confirmed commit too");
    assert_eq!(values(&t).len(), 5);
}

#[test]
fn a_group_removal_that_fails_leaves_the_group_whole() {
    // The checkpoint that forgets the group cannot be written (the disk is
    // full): the group must stay, still holding back what it has not
    // consumed, and a retry must remove it.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let log = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let t = consumed_when_all_consumed(&reg, "t", log);
    for g in ["a", "g"] {
        t.create_group(g, GroupMode::Queue, Position::Earliest)
            .expect("group");
    }
    for i in 0..3u8 {
        t.produce(&[NewMessage::from_value(vec![i; 10])])
            .expect("produce");
    }
    lease_and_ack(&t, "a", 10);
    disk.set_fault(SimFault::NoSpace, true);
    let failed = t.delete_group("g");
    disk.set_fault(SimFault::NoSpace, false);
    assert!(failed.is_err(), "the checkpoint needs the full disk");
    assert!(
        t.describe_group("g").is_ok(),
        "a failed removal removed the group"
    );
    assert_eq!(
        visible_offsets(&t),
        (0..3).collect(),
        "g has consumed nothing: nothing is consumed by every group"
    );
    t.delete_group("g").expect("the retry removes it");
    assert!(t.describe_group("g").is_err());
    drop(t);
    drop(reg);
    let reg = open_registry(&disk).expect("reopen");
    let t = reg.topic("t").expect("topic");
    assert!(
        t.describe_group("g").is_err(),
        "the removed group came back"
    );
}

#[test]
fn a_group_whose_journal_is_lost_beside_its_snapshot_is_damage() {
    // A group with a snapshot (every SNAPSHOT_EVERY entries) whose journal
    // file went missing: the checkpoint lists the group, so this is damage,
    // for the broker and for verify, not a group to drop in silence.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Never, Cleanup::Delete);
    t.produce(&[NewMessage::from_value("m")]).expect("produce");
    t.create_group("s", GroupMode::Stream, Position::Earliest)
        .expect("group");
    for i in 0..=spool::groups::SNAPSHOT_EVERY {
        t.commit("s", Offset(i % 2)).expect("commit");
    }
    drop(t);
    reg.stop_all().expect("stop");
    drop(reg);
    let groups = std::path::Path::new(ROOT).join("topics/t/groups");
    assert!(
        disk.exists(&groups.join("s.snap")),
        "the group has a snapshot"
    );
    disk.remove_file(&groups.join("s.journal")).expect("remove");
    disk.sync_dir(&groups).expect("sync");
    let reg = open_registry(&disk).expect("reopen");
    match reg.topic("t") {
        Ok(_) => panic!("a listed group without its journal opened (the group is gone)"),
        Err(refused) => assert!(refused.to_string().contains("s.journal"), "{refused}"),
    }
    let report = verify(reg.data(), &mut |_| {}).expect("verify");
    assert!(
        report.damage.iter().any(|d| d.file.ends_with("s.journal")),
        "verify does not see the missing journal: {:?}",
        report.damage
    );
}

#[test]
fn a_queue_group_whose_snapshot_is_given_up_is_given_up_not_turned_into_a_stream_group() {
    // The group's mode lives in its snapshot (or its first entries, which
    // the snapshot replaced). Under skip-damaged a damaged snapshot is given
    // up; the group must not come back as a stream group, for good, which
    // every queue consumer of it would then fail on.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    t.produce(&[NewMessage::from_value("m")]).expect("produce");
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..=spool::groups::SNAPSHOT_EVERY {
        t.seek("q", Position::Offset(i % 2)).expect("seek");
    }
    drop(t);
    reg.stop_all().expect("stop");
    drop(reg);
    let root = std::path::Path::new(ROOT).join("topics/t");
    let snap = root.join("groups/q.snap");
    assert!(disk.exists(&snap), "the group has a snapshot");
    let byte = disk.read_file(&snap).expect("snapshot")[40];
    disk.damage(&snap, 40, &[byte ^ 0xff]).expect("damage");
    let options = |recovery| RegistryOptions {
        recovery,
        ..RegistryOptions::default()
    };
    let open = |recovery| {
        let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, ROOT).expect("data dir");
        Registry::open(data, options(recovery)).expect("registry")
    };
    let reg = open(spool::storage::RecoveryMode::default());
    let refused = reg
        .topic("t")
        .expect_err("a damaged snapshot is refused by default");
    assert!(refused.to_string().contains("q.snap"), "{refused}");
    drop(reg);
    let reg = open(spool::storage::RecoveryMode::SkipDamaged);
    let t = reg.topic("t").expect("skip-damaged opens the topic");
    assert!(
        t.describe_group("q").is_err(),
        "the group whose mode was lost is given up"
    );
    assert!(
        disk.list_dir(&root.join("quarantine"))
            .expect("quarantine")
            .iter()
            .any(|n| n.starts_with("group-q.")),
        "its files are set aside"
    );
    // Created again, it is what its creator says.
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group created again");
    drop(t);
    reg.stop_all().expect("stop");
    drop(reg);
    let reg = open(spool::storage::RecoveryMode::default());
    let t = reg.topic("t").expect("a later default start opens");
    assert_eq!(t.describe_group("q").expect("group").mode, GroupMode::Queue);
}

#[test]
fn a_stop_syncs_the_acks_of_a_topic_whose_log_turned_read_only() {
    // fsync=interval: acks confirmed in memory, then a log sync fails (the
    // log turns read-only). The broker's stop must still make the acks
    // durable: they were confirmed, and the group's journal is not the log.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = queue_topic(&reg, FsyncPolicy::Interval(3_600_000), 3);
    t.sync_log().expect("sync");
    lease_and_ack(&t, "q", 10);
    t.produce(&[NewMessage::from_value("unsynced")])
        .expect("produce");
    disk.set_fault(SimFault::SyncError, true);
    assert!(t.sync_log().is_err(), "the log's sync fails");
    disk.set_fault(SimFault::SyncError, false);
    assert!(
        t.stop().is_err(),
        "a stop with a read-only log is not clean"
    );
    drop(t);
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(&disk).expect("recover");
    let t = reg.topic("t").expect("topic");
    assert_eq!(
        t.describe_group("q").expect("group").committed,
        3,
        "the acks confirmed before the stop are undone"
    );
}

#[test]
fn a_queue_group_passes_the_offsets_compaction_removed() {
    // Compaction removes superseded records before a queue group got to
    // them: the group's low watermark must move past those offsets once it
    // has the rest, not stop at the first of them.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "kv", FsyncPolicy::Always, Cleanup::Compact);
    t.create_group("q", GroupMode::Queue, Position::Earliest)
        .expect("group");
    for i in 0..6u8 {
        t.produce(&[NewMessage::from_value(vec![i; 300]).with_key("k")])
            .expect("produce");
    }
    t.produce(&[NewMessage::from_value("other").with_key("j")])
        .expect("produce");
    reg.compact(Some("kv"), &mut |_| {}).expect("compact");
    let mut got = Vec::new();
    loop {
        let acked = lease_and_ack(&t, "q", 10);
        if acked.is_empty() {
            break;
        }
        got.extend(acked);
    }
    assert!(
        !got.contains(&0),
        "compaction removed the first superseded record: {got:?}"
    );
    let q = t.describe_group("q").expect("group");
    assert_eq!(
        (q.committed, q.lag),
        (7, 0),
        "the group got everything there is ({got:?}) but its low watermark stopped"
    );
}

#[test]
fn a_segment_sealed_while_out_of_descriptors_leaves_the_log_writable() {
    // A roll creates the next segment (and syncs the folder), then seals
    // the full one, whose last step synced the folder again. Out of
    // descriptors at that step (the folder cannot be opened for its sync),
    // the seal failed and the log turned read-only until a restart, over a
    // shortage that passes and a folder whose new entry was synced already.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    let dir = std::path::Path::new(ROOT).join("topics/t");
    let first = dir.join(format!("{:020}.log", 0));
    let weak = Arc::downgrade(&disk);
    let hit = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&hit);
    let dir_of_hook = dir.clone();
    disk.set_hook(Some(Arc::new(move |op, path| {
        // The seal's sync of the full segment comes once the next one
        // exists; the folder's sync follows it.
        let Some(disk) = weak.upgrade() else { return };
        let logs = disk.list_dir(&dir_of_hook).map_or(0, |names| {
            names.iter().filter(|n| n.ends_with(".log")).count()
        });
        if op == SimOp::SyncData && path == first && logs > 1 && !seen.swap(true, Ordering::SeqCst)
        {
            disk.set_fault(SimFault::OutOfFiles, true);
        }
    })));
    let mut acked = Vec::new();
    let mut i = 0u8;
    while !hit.load(Ordering::SeqCst) {
        let value = vec![i; 100];
        t.produce(&[NewMessage::from_value(value.clone())])
            .expect("produce, across the roll");
        acked.push(Bytes::from(value));
        i += 1;
        assert!(i < 100, "no roll happened");
    }
    disk.set_hook(None);
    disk.set_fault(SimFault::OutOfFiles, false);
    for _ in 0..20 {
        let value = vec![i; 100];
        t.produce(&[NewMessage::from_value(value.clone())])
            .expect("produce after the shortage");
        acked.push(Bytes::from(value));
        i += 1;
    }
    assert!(!t.log().is_read_only());
    drop(t);
    assert_values_after_a_cut(&disk, reg, &acked);
}

/// Cuts the power under `reg`, opens the registry again and checks that
/// topic `t` holds exactly the values `acked`, in order.
fn assert_values_after_a_cut(disk: &Arc<SimDisk>, reg: Registry, acked: &[Bytes]) {
    drop(reg);
    disk.power_cut(None);
    let reg = open_registry(disk).expect("reopen");
    let t = reg.topic("t").expect("topic");
    let got: Vec<Bytes> = values(&t).into_iter().map(|(_, v)| v).collect();
    assert_eq!(got, acked, "every acknowledged message, after a power cut");
}

#[test]
fn an_idle_topic_closes_while_out_of_descriptors_and_keeps_everything() {
    // Closing an idle topic writes its clean checkpoint, which takes a new
    // descriptor. Out of them, the close was put off, so once the process
    // ran out no topic could close to free any, and every other topic was
    // refused until a client connection went. It now closes without the
    // clean checkpoint, and its next open recovers it.
    let disk = Arc::new(SimDisk::new());
    let reg = open_registry(&disk).expect("open");
    let t = small_topic(&reg, "t", FsyncPolicy::Always, Cleanup::Delete);
    let mut acked = Vec::new();
    for i in 0..30u8 {
        let value = Bytes::from(vec![i; 100]);
        t.produce(&[NewMessage::from_value(value.clone())])
            .expect("produce");
        acked.push(value);
    }
    drop(t);
    disk.set_fault(SimFault::OutOfFiles, true);
    assert!(reg.close_unused("t"), "closed, descriptors and all");
    disk.set_fault(SimFault::OutOfFiles, false);
    let t = reg.topic("t").expect("opens again");
    let got: Vec<Bytes> = values(&t).into_iter().map(|(_, v)| v).collect();
    assert_eq!(got, acked);
    drop(t);
    assert_values_after_a_cut(&disk, reg, &acked);
}
