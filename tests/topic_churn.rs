//! Topics closing and reopening all the time under load. The real broker
//! runs under a low open-files limit (`prlimit --nofile=128`, so
//! `max_open_files` is 64) with `--topic-idle-close-ms 10`: its 60 topics are
//! closed (idle, or over the budget) and reopened constantly while several
//! tasks on three connections produce, replay, read a stream group and
//! commit, lease and ack from a queue group, subscribe and unsubscribe, and
//! list and describe topics.
//!
//! While that runs: no request fails (reopening is transparent), every
//! replay holds every acknowledged message byte-exact at its offset, a
//! stream group reads from its last confirmed commit, `ListTopics` and
//! `DescribeTopic` never report an end below what was acknowledged, the
//! broker's descriptors stay below the limit, and a queue message is leased
//! to one member at a time: nothing is nacked and no lease can expire
//! (`ack_timeout_ms` is 30 s), so every queue delivery is a first delivery.
//!
//! Then the broker is killed (kill -9) in the middle of that load and started
//! again with the same flags: every acknowledged message is there once,
//! byte-exact, at its offset; the next produce gets the offset after the
//! log's last one; no message whose ack was confirmed is delivered again and
//! every message nobody acked is; a stream group resumes at its last
//! confirmed commit (or a later one still in flight at the kill). A clean
//! stop (SIGTERM) and `spool verify` end it.
//!
//! A second, deterministic test holds a queue lease past the topic's idle
//! time: the topic stays open (a lease lives in its memory) and another
//! member gets nothing; once the lease is acked, the topic closes.
//!
//! The workload is random: each run prints its seed; `SPOOL_CHURN_SEED=N`
//! runs seed N again and `SPOOL_CHURN_MS` sets how long the load runs before
//! the kill (default 8000).

mod common;

use common::Broker;
use futures_util::StreamExt;
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, FetchOptions, Received};
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::storage::NewMessage;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The broker's open-files limit.
const NOFILE: usize = 128;
const LIMIT: &str = "--nofile=128:128";
/// Topics close 10 ms after their last use.
const FLAGS: &[&str] = &["--topic-idle-close-ms", "10"];
/// Topics used: four files each, so at most about 14 fit the budget of 64.
const TOPICS: usize = 60;
const CONNECTIONS: usize = 3;
const WORKERS: usize = 6;
/// The stream group of every topic `t` with `t % 4 == 0`.
const STREAM_GROUP: &str = "audit";
/// The queue group of every topic `t` with `t % 4 == 1`.
const QUEUE_GROUP: &str = "work";

fn topic_name(t: usize) -> String {
    format!("churn-{t:02}")
}

fn has_stream_group(t: usize) -> bool {
    t.is_multiple_of(4)
}

fn has_queue_group(t: usize) -> bool {
    t % 4 == 1
}

fn has_prlimit() -> bool {
    let ok = Command::new("prlimit").arg("--version").output().is_ok();
    if !ok {
        eprintln!("prlimit is not installed; skipping");
    }
    ok
}

/// `spool serve` under [`LIMIT`] with [`FLAGS`].
fn start(data: &Path) -> Broker {
    let mut wrapper = Command::new("prlimit");
    wrapper.args([LIMIT, env!("CARGO_BIN_EXE_spool")]);
    Broker::start_with(wrapper, data, FLAGS)
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// SplitMix64: small, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Key and value of a produced message.
type Stored = (Option<Vec<u8>>, Vec<u8>);

/// What the clients know of one topic.
#[derive(Default)]
struct TopicModel {
    /// Every acknowledged message, by offset.
    acked: BTreeMap<u64, Stored>,
    /// Every value sent to the topic, acknowledged or not: all the log may hold.
    sent: HashSet<Vec<u8>>,
    /// Stream group: the last confirmed commit.
    committed: u64,
    /// Stream group: the highest commit sent (confirmed or not).
    commit_sent: u64,
    /// Queue group: offsets whose ack was confirmed.
    queue_acked: BTreeSet<u64>,
    /// Queue group: offsets an ack was sent for (confirmed or not).
    ack_sent: BTreeSet<u64>,
    /// Queue group: offsets delivered before the kill.
    delivered: BTreeSet<u64>,
}

impl TopicModel {
    /// One past the highest acknowledged offset.
    fn acked_end(&self) -> u64 {
        self.acked.keys().next_back().map_or(0, |o| o + 1)
    }
}

// Kinds of broken promises, for the report.
const CONTENT: &str = "a read returned another message than the one produced at that offset";
const LEASE: &str = "a queue message was delivered again while leased (no nack, no expiry)";
const PRODUCE: &str = "a produce answer was wrong";
const REPLAY: &str = "a replay skipped or lost offsets";
const STREAM: &str = "a stream group did not read from its confirmed commit";
const ENDS: &str = "list_topics or describe_topic reported less than was acknowledged";
const RESTART_LOG: &str = "after the kill, a topic lost or reused offsets";
const RESTART_STREAM: &str = "after the kill, a stream group did not resume at its commit";
const RESTART_QUEUE: &str =
    "after the kill, a queue group redelivered acked or lost unacked messages";
const BROKER_LOG: &str = "the broker logged an error";
const FDS: &str = "the broker held too many descriptors";

/// Operations the workers pick from, with their weights.
const OPS: [(&str, u64); 6] = [
    ("produce", 35),
    ("replay", 10),
    ("stream group", 15),
    ("queue group", 20),
    ("subscription", 10),
    ("list/describe", 10),
];

/// State shared by the workers.
struct Shared {
    topics: Vec<Mutex<TopicModel>>,
    /// One reader of a stream group at a time, so its last confirmed
    /// commit is known exactly.
    stream_turns: Vec<tokio::sync::Mutex<()>>,
    /// Requests that failed while the broker was up.
    errors: Mutex<Vec<String>>,
    /// Broken promises, by kind.
    violations: Mutex<Vec<(&'static str, String)>>,
    /// Set just before the kill: failures after it are expected.
    killed: AtomicBool,
    /// Operations done, by kind (see [`OPS`]).
    done: [AtomicUsize; OPS.len()],
    /// Messages received by readers of every kind.
    received: AtomicUsize,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            topics: (0..TOPICS).map(|_| Mutex::default()).collect(),
            stream_turns: (0..TOPICS).map(|_| tokio::sync::Mutex::new(())).collect(),
            errors: Mutex::default(),
            violations: Mutex::default(),
            killed: AtomicBool::new(false),
            done: Default::default(),
            received: AtomicUsize::new(0),
        }
    }

    fn model(&self, t: usize) -> MutexGuard<'_, TopicModel> {
        lock(&self.topics[t])
    }

    /// A request failed: an error unless the broker was being killed.
    fn failed(&self, what: &str, e: &ClientError) {
        if !self.killed.load(Ordering::SeqCst) {
            lock(&self.errors).push(format!("{what}: {e}"));
        }
    }

    fn violation(&self, kind: &'static str, what: String) {
        lock(&self.violations).push((kind, what));
    }

    /// Checks a message read from topic `t` against what was produced: an
    /// acknowledged offset holds exactly its message, any other one a
    /// message sent to this topic.
    fn check_content(&self, t: usize, m: &Received, what: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let model = self.model(t);
        let offset = m.message.offset.0;
        let (key, value) = (m.message.key.as_deref(), &m.message.value[..]);
        match model.acked.get(&offset) {
            Some((k, v)) => {
                if k.as_deref() != key || v[..] != *value {
                    self.violation(
                        CONTENT,
                        format!(
                            "{what}: topic {} offset {offset} holds key {key:?} and {} value bytes \
                            starting {:?}; acknowledged were key {k:?} and {} bytes starting {:?}",
                            topic_name(t),
                            value.len(),
                            &value[..value.len().min(24)],
                            v.len(),
                            &v[..v.len().min(24)],
                        ),
                    );
                }
            }
            None => {
                if !model.sent.contains(value) {
                    self.violation(
                        CONTENT,
                        format!(
                            "{what}: topic {} offset {offset} holds {} value bytes starting {:?}, \
                            never produced to it",
                            topic_name(t),
                            value.len(),
                            &value[..value.len().min(24)],
                        ),
                    );
                }
            }
        }
    }

    /// Queue-group deliveries of topic `t`: each checked, and each must be
    /// the first delivery of its offset (no nack, no lease expiry here).
    fn leased(&self, t: usize, messages: &[Received], what: &str) {
        for m in messages {
            self.check_content(t, m, what);
            let offset = m.message.offset.0;
            let mut model = self.model(t);
            let again = !model.delivered.insert(offset);
            if again || m.delivery != 1 {
                let state = if model.queue_acked.contains(&offset) {
                    "after its ack was confirmed"
                } else if model.ack_sent.contains(&offset) {
                    "while an ack of it was under way"
                } else {
                    "while it was still leased"
                };
                self.violation(
                    LEASE,
                    format!(
                        "{what}: queue group {QUEUE_GROUP} of topic {} delivered offset {offset} \
                        again (delivery number {}, seen before by this test: {again}) {state}; \
                        nothing was nacked and no lease can have expired (ack_timeout_ms 30 s)",
                        topic_name(t),
                        m.delivery,
                    ),
                );
            }
        }
    }

    /// Acks `offsets` of the queue group of topic `t`, recording what was
    /// sent and what was confirmed.
    async fn ack(&self, client: &Client, t: usize, offsets: &[u64], subscription: Option<u64>) {
        if offsets.is_empty() {
            return;
        }
        self.model(t).ack_sent.extend(offsets);
        match client
            .ack(&topic_name(t), QUEUE_GROUP, offsets, subscription)
            .await
        {
            Ok(()) => self.model(t).queue_acked.extend(offsets),
            Err(e) => self.failed(&format!("ack {offsets:?} of {}", topic_name(t)), &e),
        }
    }
}

/// One worker: random operations on random topics until `deadline` or the kill.
async fn worker(shared: Arc<Shared>, client: Arc<Client>, id: usize, seed: u64, deadline: Instant) {
    let mut rng = Rng(seed ^ (id as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let total: u64 = OPS.iter().map(|(_, w)| w).sum();
    let mut produced = 0u64;
    while Instant::now() < deadline && !shared.killed.load(Ordering::SeqCst) {
        let mut pick = rng.below(total);
        let op = OPS
            .iter()
            .position(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .unwrap_or(0);
        let (s, c) = (&*shared, &*client);
        match op {
            0 => {
                produce(s, c, &mut rng, id, produced).await;
                produced += 1;
            }
            1 => replay(s, c, &mut rng).await,
            2 => stream(s, c, &mut rng, id).await,
            3 => queue(s, c, &mut rng, id).await,
            4 => subscription(s, c, &mut rng, id).await,
            _ => list_or_describe(s, c, &mut rng).await,
        }
        shared.done[op].fetch_add(1, Ordering::Relaxed);
    }
}

/// Produces a batch of 1 to 8 messages (random binary values, some keyed)
/// to a random topic.
async fn produce(shared: &Shared, client: &Client, rng: &mut Rng, id: usize, n: u64) {
    let t = rng.below(TOPICS as u64) as usize;
    let name = topic_name(t);
    let count = 1 + rng.below(8);
    let batch: Vec<Stored> = (0..count)
        .map(|i| {
            let mut value = format!("{name}/{id}/{n}/{i}/").into_bytes();
            let len = rng.below(300) as usize;
            value.extend(rng.bytes(len));
            let key = rng.chance(50).then(|| {
                let len = rng.below(16) as usize;
                rng.bytes(len)
            });
            (key, value)
        })
        .collect();
    {
        let mut model = shared.model(t);
        model.sent.extend(batch.iter().map(|(_, v)| v.clone()));
    }
    let messages = batch
        .iter()
        .map(|(key, value)| NewMessage {
            key: key.clone().map(Into::into),
            value: value.clone().into(),
            ..NewMessage::default()
        })
        .collect();
    let produced = match client.produce(&name, messages).await {
        Ok(p) => p,
        Err(e) => return shared.failed(&format!("produce {count} to {name}"), &e),
    };
    if produced.last_offset + 1 != produced.first_offset + count || !produced.durable {
        shared.violation(
            PRODUCE,
            format!("produce of {count} messages to {name} answered {produced:?} (fsync=always)"),
        );
    }
    let mut model = shared.model(t);
    for (i, stored) in batch.into_iter().enumerate() {
        let offset = produced.first_offset + i as u64;
        if model.acked.insert(offset, stored).is_some() {
            shared.violation(
                PRODUCE,
                format!("offset {offset} of {name} was acknowledged to two produces"),
            );
        }
    }
}

/// Replays a random topic from offset 0: offsets dense, every message
/// checked, nothing acknowledged before the replay missing.
async fn replay(shared: &Shared, client: &Client, rng: &mut Rng) {
    let t = rng.below(TOPICS as u64) as usize;
    let name = topic_name(t);
    let acked_end = shared.model(t).acked_end();
    let mut from = 0;
    loop {
        let options = FetchOptions {
            from: Some(Position::Offset(from)),
            max_messages: 1 + rng.below(400) as u32,
            ..Default::default()
        };
        let fetched = match client.fetch(&name, options).await {
            Ok(f) => f,
            Err(e) => return shared.failed(&format!("replay of {name} from {from}"), &e),
        };
        if fetched.messages.is_empty() {
            break;
        }
        for m in &fetched.messages {
            if m.message.offset.0 != from {
                return shared.violation(
                    REPLAY,
                    format!(
                        "replay of {name}: offset {} came where {from} was due",
                        m.message.offset.0
                    ),
                );
            }
            shared.check_content(t, m, "replay");
            from += 1;
        }
    }
    if from < acked_end {
        shared.violation(REPLAY, format!(
            "replay of {name} ended at offset {from}; offsets up to {} were acknowledged before it",
            acked_end - 1
        ));
    }
}

/// Reads a random stream group from its commit, checks it starts exactly
/// there, and commits part or all of what it read.
async fn stream(shared: &Shared, client: &Client, rng: &mut Rng, id: usize) {
    let t = 4 * rng.below(TOPICS as u64 / 4) as usize;
    let name = topic_name(t);
    let _turn = shared.stream_turns[t].lock().await;
    let (committed, acked_end) = {
        let model = shared.model(t);
        (model.committed, model.acked_end())
    };
    let options = FetchOptions {
        group: Some(STREAM_GROUP.into()),
        member: format!("reader-{id}"),
        max_messages: 1 + rng.below(50) as u32,
        ..Default::default()
    };
    let fetched = match client.fetch(&name, options).await {
        Ok(f) => f,
        Err(e) => return shared.failed(&format!("stream-group fetch of {name}"), &e),
    };
    match fetched.messages.first() {
        Some(first) if first.message.offset.0 != committed => {
            return shared.violation(
                STREAM,
                format!(
                    "stream group {STREAM_GROUP} of {name} read from offset {} after its commit \
                    of {committed} was confirmed",
                    first.message.offset.0
                ),
            );
        }
        None if committed < acked_end => {
            return shared.violation(
                STREAM,
                format!(
                    "stream group {STREAM_GROUP} of {name} read nothing at its commit {committed}, \
                    below the acknowledged end {acked_end}"
                ),
            );
        }
        _ => {}
    }
    for (i, m) in fetched.messages.iter().enumerate() {
        if m.message.offset.0 != committed + i as u64 {
            return shared.violation(
                STREAM,
                format!(
                    "stream group {STREAM_GROUP} of {name}: offset {} came where {} was due",
                    m.message.offset.0,
                    committed + i as u64
                ),
            );
        }
        shared.check_content(t, m, "stream-group fetch");
    }
    let commit = committed + rng.below(fetched.messages.len() as u64 + 1);
    {
        let mut model = shared.model(t);
        model.commit_sent = model.commit_sent.max(commit);
    }
    match client.commit(&name, STREAM_GROUP, commit).await {
        Ok(()) => shared.model(t).committed = commit,
        Err(e) => return shared.failed(&format!("commit {commit} to {name}"), &e),
    }
    if rng.chance(20) {
        match client.describe_group(&name, STREAM_GROUP).await {
            Ok(g) if g.committed != commit => shared.violation(
                STREAM,
                format!(
                    "stream group {STREAM_GROUP} of {name} is described at {} right after its \
                    commit of {commit} was confirmed",
                    g.committed
                ),
            ),
            Ok(_) => {}
            Err(e) => shared.failed(&format!("describe group {STREAM_GROUP} of {name}"), &e),
        }
    }
}

/// Leases messages of a random queue group, holds them for up to 40 ms
/// (long enough for an unused topic to be closed) and acks nine in ten;
/// the others stay leased.
async fn queue(shared: &Shared, client: &Client, rng: &mut Rng, id: usize) {
    let t = 4 * rng.below(TOPICS as u64 / 4) as usize + 1;
    let name = topic_name(t);
    let member = format!("worker-{id}");
    let options = FetchOptions {
        group: Some(QUEUE_GROUP.into()),
        member: member.clone(),
        max_messages: 1 + rng.below(20) as u32,
        ..Default::default()
    };
    let fetched = match client.fetch(&name, options).await {
        Ok(f) => f,
        Err(e) => return shared.failed(&format!("queue-group fetch of {name}"), &e),
    };
    shared.leased(t, &fetched.messages, &format!("fetch by {member}"));
    if rng.chance(70) {
        tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
    }
    let offsets: Vec<u64> = fetched
        .messages
        .iter()
        .map(|m| m.message.offset.0)
        .filter(|_| rng.chance(90))
        .collect();
    shared.ack(client, t, &offsets, None).await;
}

/// Subscribes to a random topic (replay from a random offset, or half the
/// time on a queue topic its queue group), reads for up to 200 ms, then
/// unsubscribes.
async fn subscription(shared: &Shared, client: &Client, rng: &mut Rng, id: usize) {
    let t = rng.below(TOPICS as u64) as usize;
    let name = topic_name(t);
    let queue = has_queue_group(t) && rng.chance(50);
    let from = rng.below(shared.model(t).acked_end() + 1);
    let member = format!("subscriber-{id}");
    let (subscribed, what) = if queue {
        (
            client
                .subscribe(&name, Some(QUEUE_GROUP), &member, None, 50)
                .await,
            format!("queue-group subscription of {name}"),
        )
    } else {
        let start = Some(Position::Offset(from));
        (
            client.subscribe(&name, None, &member, start, 10_000).await,
            format!("replay subscription of {name} from {from}"),
        )
    };
    let mut sub = match subscribed {
        Ok(sub) => sub,
        Err(e) => return shared.failed(&format!("subscribe: {what}"), &e),
    };
    let until = Instant::now() + Duration::from_millis(20 + rng.below(180));
    let mut next = from;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let item = match tokio::time::timeout(left, sub.next()).await {
            Err(_) => break,
            Ok(item) => item,
        };
        match item {
            None => {
                if !shared.killed.load(Ordering::SeqCst) {
                    lock(&shared.errors).push(format!("{what}: ended without an error"));
                }
                return;
            }
            Some(Err(e)) => {
                shared.failed(&what, &e);
                break;
            }
            Some(Ok(m)) if queue => {
                shared.leased(t, std::slice::from_ref(&m), &what);
                if rng.chance(90) {
                    shared
                        .ack(client, t, &[m.message.offset.0], Some(sub.id()))
                        .await;
                }
            }
            Some(Ok(m)) => {
                if m.message.offset.0 != next {
                    shared.violation(
                        REPLAY,
                        format!(
                            "{what}: offset {} came where {next} was due",
                            m.message.offset.0
                        ),
                    );
                    break;
                }
                shared.check_content(t, &m, &what);
                next += 1;
            }
        }
    }
    if let Err(e) = client.unsubscribe(sub.id()).await {
        shared.failed(&format!("unsubscribe: {what}"), &e);
    }
}

/// `ListTopics` (which reads closed topics' checkpoints) or `DescribeTopic`
/// of a random topic: no end below what was acknowledged before it.
async fn list_or_describe(shared: &Shared, client: &Client, rng: &mut Rng) {
    let ends: Vec<u64> = (0..TOPICS).map(|t| shared.model(t).acked_end()).collect();
    let check = |t: usize, info: &pb::TopicInfo, how: &str| {
        if info.end_offset < ends[t] || info.durable_end_offset < ends[t] {
            shared.violation(
                ENDS,
                format!(
                    "{how} gives topic {} end {} (durable {}), below its acknowledged end {}",
                    info.name, info.end_offset, info.durable_end_offset, ends[t]
                ),
            );
        }
    };
    if rng.chance(40) {
        let listed = match client.list_topics().await {
            Ok(listed) => listed,
            Err(e) => return shared.failed("list topics", &e),
        };
        for (t, _) in ends.iter().enumerate() {
            match listed.iter().find(|i| i.name == topic_name(t)) {
                Some(info) => check(t, info, "list_topics"),
                None => shared.violation(ENDS, format!("list_topics leaves out {}", topic_name(t))),
            }
        }
    } else {
        let t = rng.below(TOPICS as u64) as usize;
        match client.describe_topic(&topic_name(t)).await {
            Ok(info) => check(t, &info, "describe_topic"),
            Err(e) => shared.failed(&format!("describe topic {}", topic_name(t)), &e),
        }
    }
}

/// Samples the descriptors of `pid` every 5 ms until `stop`; returns the most seen.
fn sample_fds(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut most = 0;
        while !stop.load(Ordering::SeqCst) {
            most = most.max(open_fds(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        most
    })
}

/// Lines of a broker log that report an error or a panic.
fn bad_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .collect()
}

/// Every message of `topic` by replay, failing loudly.
async fn replay_all(client: &Client, topic: &str) -> Vec<Received> {
    let mut out = Vec::new();
    loop {
        let options = FetchOptions {
            from: Some(Position::Offset(out.len() as u64)),
            max_messages: 1000,
            ..Default::default()
        };
        let fetched = client
            .fetch(topic, options)
            .await
            .unwrap_or_else(|e| panic!("replay of {topic} after the restart: {e}"));
        if fetched.messages.is_empty() {
            return out;
        }
        out.extend(fetched.messages);
    }
}

/// After the restart: topic `t` holds every acknowledged message once at
/// its offset, continues after its last one, and its groups resume where
/// their confirmed commits and acks left them.
async fn check_after_restart(shared: &Shared, client: &Client, t: usize) {
    let name = topic_name(t);
    let log = replay_all(client, &name).await;
    let mut values = HashSet::new();
    for (i, m) in log.iter().enumerate() {
        if m.message.offset.0 != i as u64 {
            shared.violation(
                RESTART_LOG,
                format!(
                    "after the restart, replay of {name}: offset {} came where {i} was due",
                    m.message.offset.0
                ),
            );
            return;
        }
        shared.check_content(t, m, "after the restart, replay");
        if !values.insert(m.message.value.clone()) {
            shared.violation(
                RESTART_LOG,
                format!("after the restart, topic {name} holds the value at offset {i} twice"),
            );
        }
    }
    let end = log.len() as u64;
    let acked_end = shared.model(t).acked_end();
    if end < acked_end {
        shared.violation(
            RESTART_LOG,
            format!(
                "after the restart, topic {name} ends at {end}; offsets up to {} were acknowledged",
                acked_end - 1
            ),
        );
    }
    let after = format!("{name}/after the restart").into_bytes();
    shared.model(t).sent.insert(after.clone());
    let next = client
        .produce(&name, vec![NewMessage::from_value(after.clone())])
        .await
        .unwrap_or_else(|e| panic!("produce to {name} after the restart: {e}"));
    if next.first_offset != end {
        shared.violation(
            RESTART_LOG,
            format!(
                "after the restart, a produce to {name} got offset {}; the log ends at {end} \
                (acknowledged end {acked_end})",
                next.first_offset
            ),
        );
    }
    shared
        .model(t)
        .acked
        .insert(next.first_offset, (None, after));
    let end = next.first_offset + 1;
    if has_stream_group(t) {
        let (committed, sent) = {
            let model = shared.model(t);
            (model.committed, model.commit_sent)
        };
        let group = client
            .describe_group(&name, STREAM_GROUP)
            .await
            .unwrap_or_else(|e| panic!("describe group {STREAM_GROUP} of {name}: {e}"));
        if group.committed < committed || group.committed > sent {
            shared.violation(
                RESTART_STREAM,
                format!(
                    "after the restart, stream group {STREAM_GROUP} of {name} is at {}; its last \
                    confirmed commit was {committed}, the highest sent {sent}",
                    group.committed
                ),
            );
        }
        let options = FetchOptions {
            group: Some(STREAM_GROUP.into()),
            member: "after-restart".into(),
            max_messages: 1,
            ..Default::default()
        };
        let fetched = client
            .fetch(&name, options)
            .await
            .unwrap_or_else(|e| panic!("stream-group fetch of {name} after the restart: {e}"));
        let first = fetched.messages.first().map(|m| m.message.offset.0);
        if group.committed < end && first != Some(group.committed) {
            shared.violation(RESTART_STREAM, format!(
                "after the restart, stream group {STREAM_GROUP} of {name} at {} reads from {first:?}",
                group.committed
            ));
        }
    }
    if has_queue_group(t) {
        let mut delivered = BTreeSet::new();
        loop {
            let options = FetchOptions {
                group: Some(QUEUE_GROUP.into()),
                member: "after-restart".into(),
                max_messages: 1000,
                ..Default::default()
            };
            let fetched = client
                .fetch(&name, options)
                .await
                .unwrap_or_else(|e| panic!("queue-group fetch of {name} after the restart: {e}"));
            if fetched.messages.is_empty() {
                break;
            }
            let mut offsets = Vec::new();
            for m in &fetched.messages {
                let offset = m.message.offset.0;
                shared.check_content(t, m, "after the restart, queue-group fetch");
                if shared.model(t).queue_acked.contains(&offset) {
                    shared.violation(RESTART_QUEUE, format!(
                        "after the restart, queue group {QUEUE_GROUP} of {name} delivered offset \
                        {offset} (delivery number {}) although its ack was confirmed",
                        m.delivery
                    ));
                }
                if !delivered.insert(offset) {
                    shared.violation(RESTART_QUEUE, format!(
                        "after the restart, queue group {QUEUE_GROUP} of {name} delivered offset \
                        {offset} twice while it was leased"
                    ));
                }
                offsets.push(offset);
            }
            client
                .ack(&name, QUEUE_GROUP, &offsets, None)
                .await
                .unwrap_or_else(|e| panic!("ack of {name} after the restart: {e}"));
        }
        let missed: Vec<u64> = {
            let model = shared.model(t);
            (0..end)
                .filter(|o| !model.ack_sent.contains(o) && !delivered.contains(o))
                .collect()
        };
        if !missed.is_empty() {
            shared.violation(RESTART_QUEUE, format!(
                "after the restart, queue group {QUEUE_GROUP} of {name} never delivered offsets \
                {missed:?}, which nobody acked"
            ));
        }
        let group = client
            .describe_group(&name, QUEUE_GROUP)
            .await
            .unwrap_or_else(|e| panic!("describe group {QUEUE_GROUP} of {name}: {e}"));
        if group.lag != 0 || group.committed != end {
            shared.violation(
                RESTART_QUEUE,
                format!(
                    "after the restart, queue group {QUEUE_GROUP} of {name} has lag {} and low \
                    watermark {} once everything up to {end} is acked",
                    group.lag, group.committed
                ),
            );
        }
    }
}

/// A report of what went wrong: how many of each kind, with the first few.
fn summary(errors: &[String], violations: &[(&'static str, String)]) -> String {
    let mut kinds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in errors {
        kinds
            .entry("a request failed while the broker was up")
            .or_default()
            .push(e);
    }
    for (kind, what) in violations {
        kinds.entry(kind).or_default().push(what);
    }
    let mut out = String::new();
    for (kind, items) in kinds {
        out.push_str(&format!("{} × {kind}, e.g.:\n", items.len()));
        for item in items.iter().take(4) {
            out.push_str(&format!("  - {item}\n"));
        }
    }
    out
}

#[test]
fn topics_closing_and_reopening_under_load_lose_nothing_and_fail_nothing() {
    if !has_prlimit() {
        return;
    }
    let seed = std::env::var("SPOOL_CHURN_SEED")
        .ok()
        .map(|s| s.parse().expect("SPOOL_CHURN_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    let churn_ms: u64 = std::env::var("SPOOL_CHURN_MS")
        .ok()
        .map(|s| s.parse().expect("SPOOL_CHURN_MS is a number"))
        .unwrap_or(8000);
    eprintln!("topic churn: seed {seed} (SPOOL_CHURN_SEED={seed} runs it again), {churn_ms} ms");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    let shared = Arc::new(Shared::new());

    let broker = start(data);
    let pid = broker.child.id();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_fds(pid, Arc::clone(&stop_sampling));
    let first_logs = rt().block_on(async {
        let mut clients = Vec::new();
        for c in 0..CONNECTIONS {
            let client = Client::connect(&broker.addr, &format!("churn-{c}"))
                .await
                .expect("connect to the broker");
            clients.push(Arc::new(client));
        }
        for t in 0..TOPICS {
            let name = topic_name(t);
            let client = &clients[t % CONNECTIONS];
            client
                .create_topic(&name, pb::TopicConfig::default())
                .await
                .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
            let mode = match t {
                t if has_stream_group(t) => GroupMode::Stream,
                t if has_queue_group(t) => GroupMode::Queue,
                _ => continue,
            };
            let group = if has_stream_group(t) {
                STREAM_GROUP
            } else {
                QUEUE_GROUP
            };
            client
                .create_group(&name, group, mode, None)
                .await
                .unwrap_or_else(|e| panic!("create group {group} of {name}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_millis(churn_ms);
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(worker(
                    Arc::clone(&shared),
                    Arc::clone(&clients[w % CONNECTIONS]),
                    w,
                    seed,
                    deadline,
                ))
            })
            .collect();
        tokio::time::sleep_until(deadline.into()).await;
        // Killed in the middle of the load: requests are in flight.
        shared.killed.store(true, Ordering::SeqCst);
        stop_sampling.store(true, Ordering::SeqCst);
        let logs = broker.kill9();
        for w in workers {
            w.await.expect("a worker task panicked");
        }
        logs
    });
    let most_fds = sampler.join().expect("the descriptor sampler panicked");
    let done: Vec<String> = OPS
        .iter()
        .zip(&shared.done)
        .map(|((name, _), n)| format!("{name} {}", n.load(Ordering::Relaxed)))
        .collect();
    let acked: usize = (0..TOPICS).map(|t| shared.model(t).acked.len()).sum();
    eprintln!(
        "under load: {}; {acked} messages acknowledged, {} received; at most {most_fds} descriptors",
        done.join(", "),
        shared.received.load(Ordering::Relaxed),
    );
    let bad = bad_lines(&first_logs);
    if !bad.is_empty() {
        shared.violation(
            BROKER_LOG,
            format!(
                "the broker logged errors under load: {}",
                bad.join("\n    ")
            ),
        );
    }
    if most_fds >= NOFILE {
        shared.violation(
            FDS,
            format!("the broker held {most_fds} descriptors under load; its limit is {NOFILE}"),
        );
    }

    // The same flags again, after the kill.
    let broker = start(data);
    let pid = broker.child.id();
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "after-restart")
            .await
            .expect("connect after the restart");
        for t in 0..TOPICS {
            check_after_restart(&shared, &client, t).await;
        }
        let fds = open_fds(pid);
        if fds >= NOFILE {
            shared.violation(
                FDS,
                format!("the broker holds {fds} descriptors after the restart's checks"),
            );
        }
    });
    let (stopped, logs) = broker.terminate();
    assert!(stopped, "seed {seed}: the clean stop failed:\n{logs}");
    let bad = bad_lines(&logs);
    if !bad.is_empty() {
        shared.violation(
            BROKER_LOG,
            format!(
                "the broker logged errors after the restart: {}",
                bad.join("\n    ")
            ),
        );
    }

    let verify = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--format", "json", "--data"])
        .arg(data)
        .output()
        .expect("run spool verify");
    assert_eq!(
        verify.status.code(),
        Some(0),
        "seed {seed}: spool verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    eprintln!(
        "topic churn: seed {seed} done in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let errors = lock(&shared.errors).clone();
    let violations = lock(&shared.violations).clone();
    assert!(
        errors.is_empty() && violations.is_empty(),
        "seed {seed} (SPOOL_CHURN_SEED={seed}):\n{}",
        summary(&errors, &violations),
    );
}

/// A queue lease outlives its topic being closed for idleness: the message
/// stays with the member that leased it until it is acked or nacked or the
/// lease times out (`ack_timeout_ms`, 30 s by default); a closed topic is
/// reopened transparently.
#[test]
fn a_queue_lease_keeps_its_idle_topic_open_until_it_ends() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), FLAGS);
    let pid = broker.child.id();
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "lease")
            .await
            .expect("connect to the broker");
        client
            .create_topic("jobs", pb::TopicConfig::default())
            .await
            .expect("create topic jobs");
        client
            .create_group("jobs", QUEUE_GROUP, GroupMode::Queue, None)
            .await
            .expect("create the queue group");
        client
            .produce("jobs", vec![NewMessage::from_value("job 0")])
            .await
            .expect("produce to jobs");
        let open = open_fds(pid);
        let leased = Instant::now();
        let first = client
            .fetch(
                "jobs",
                FetchOptions {
                    group: Some(QUEUE_GROUP.into()),
                    member: "a".into(),
                    max_messages: 1,
                    ..Default::default()
                },
            )
            .await
            .expect("queue fetch by member a");
        let delivered: Vec<(u64, u32)> = first
            .messages
            .iter()
            .map(|m| (m.message.offset.0, m.delivery))
            .collect();
        assert_eq!(delivered, [(0, 1)], "member a leases offset 0");
        // Unused for 10 ms, the topic would close at the sweeper's next
        // pass, but the lease lives in its memory: it stays open.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Its files still open: not the drop of 4 or more a close makes
        // (other descriptors may come and go meanwhile).
        let now_open = open_fds(pid);
        assert!(
            now_open + 4 > open,
            "topic jobs keeps its files while member a holds a lease: {now_open} open, {open} before"
        );
        let second = client
            .fetch(
                "jobs",
                FetchOptions {
                    group: Some(QUEUE_GROUP.into()),
                    member: "b".into(),
                    max_messages: 1,
                    ..Default::default()
                },
            )
            .await
            .expect("queue fetch by member b");
        let again: Vec<(u64, u32)> = second
            .messages
            .iter()
            .map(|m| (m.message.offset.0, m.delivery))
            .collect();
        assert!(
            again.is_empty(),
            "offset 0, leased to member a {} ms before (ack_timeout_ms 30 000, neither acked \
            nor nacked), was handed to member b as (offset, delivery number) {again:?}",
            leased.elapsed().as_millis()
        );
        // Once the lease ends (acked), the idle topic closes.
        client
            .ack("jobs", QUEUE_GROUP, &[0], None)
            .await
            .expect("member a acks");
        let closed = loop {
            if open_fds(pid) + 4 <= open {
                break true;
            }
            if leased.elapsed() > Duration::from_secs(6) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            closed,
            "topic jobs is not closed after its lease ended (--topic-idle-close-ms 10): \
            {} descriptors, {open} while it was open",
            open_fds(pid)
        );
    });
}
