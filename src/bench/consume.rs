//! Consumers: the `consume` workload (replay of a pre-filled topic with
//! pipelined fetches, or a queue group fetching and acking) and the `e2e`
//! workload (push subscriptions while producers run, latency from each
//! message's due time to its delivery).

use super::histogram::Latency;
use super::pacing::Schedule;
use super::produce::{self, Spec};
use super::target::{Conn, StreamReader, Target};
use super::{BenchError, Outcome, Params, Progress, ReadMode};
use crate::broker::topic::Position;
use crate::client::{Client, FetchOptions, Subscription};
use crate::groups::GroupMode;
use futures_util::{FutureExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Name of the queue group of a run.
const GROUP: &str = "bench";
/// Pre-fill: messages per produce request and requests outstanding per producer.
const PREFILL_BATCH: u64 = 1000;
const PREFILL_IN_FLIGHT: usize = 4;
/// Queue fetches long-poll this long, so a consumer notices the end quickly.
const QUEUE_WAIT_MS: u32 = 50;
/// Subscriptions: unacknowledged messages each may hold (the broker's cap).
const SUBSCRIBE_IN_FLIGHT: u32 = 10_000;
/// Subscriptions return credit after this many messages, or this long.
const ACK_EVERY: usize = 1000;
const ACK_INTERVAL: Duration = Duration::from_millis(20);
/// A consumer that receives nothing for this long gives up.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// The message count of a `--queue-load` consumer: it reads until aborted,
/// and once it has drained the topic it waits for more without giving up.
const UNTIL_ABORTED: u64 = u64::MAX;

/// What one consumer read.
#[derive(Debug)]
struct Consumed {
    messages: u64,
    bytes: u64,
    latency: Latency,
    last: Instant,
}

impl Consumed {
    fn new(start: Instant) -> Consumed {
        Consumed {
            messages: 0,
            bytes: 0,
            latency: Latency::new(),
            last: start,
        }
    }

    fn merge(&mut self, other: Consumed) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.latency.merge(&other.latency);
        self.last = self.last.max(other.last);
    }
}

async fn join_all(
    mut tasks: JoinSet<Result<Consumed, BenchError>>,
    start: Instant,
) -> Result<Consumed, BenchError> {
    let mut total = Consumed::new(start);
    while let Some(done) = tasks.join_next().await {
        total
            .merge(done.map_err(|e| BenchError::Incomplete(format!("a consumer panicked: {e}")))??);
    }
    Ok(total)
}

/// The `consume` workload: pre-fill (not measured), then read.
pub(super) async fn workload(
    target: &Target,
    params: &Params,
    progress: &Arc<Progress>,
) -> Result<Outcome, BenchError> {
    let messages = params
        .messages
        .unwrap_or(Params::new(params.workload).messages.unwrap_or(1));
    progress.start("pre-fill", messages);
    let spec = Arc::new(Spec {
        topic: target.topic.clone(),
        schedule: Schedule::new(
            u64::from(params.producers),
            PREFILL_BATCH,
            Some(messages),
            None,
            None,
        ),
        size: params.size as usize,
        stamp: false,
        in_flight: PREFILL_IN_FLIGHT,
        origin: Instant::now(),
    });
    let producers = produce::conn_all(target, "prefill", params.producers).await?;
    produce::run(producers, spec, progress).await?;

    let deadline = params.duration();
    let mut tasks = JoinSet::new();
    let mut load = JoinSet::new();
    // The clock starts once the consumers are connected: it measures reading.
    let start;
    let measures = match params.mode {
        ReadMode::Replay | ReadMode::Stream => {
            let total = if deadline.is_some() {
                0
            } else {
                messages.saturating_mul(u64::from(params.consumers))
            };
            load = queue_load(target, params).await?;
            let clients = produce::conn_all(target, "consumer", params.consumers).await?;
            let readers = stream_readers(target, params).await?;
            let label = match params.mode {
                ReadMode::Stream => "stream",
                _ => "replay",
            };
            progress.start(label, total);
            start = Instant::now();
            for (client, stream) in clients.into_iter().zip(readers) {
                tasks.spawn(replay(
                    client,
                    target.topic.clone(),
                    stream,
                    messages,
                    params.clone(),
                    start,
                    Arc::clone(progress),
                ));
            }
            match params.mode {
                ReadMode::Stream => {
                    "stream: one fetch through the consumer's stream group, request to reply, per call"
                }
                _ => "replay: one fetch, request to reply, per call",
            }
        }
        ReadMode::Queue => {
            let clients = produce::connect_all(target, "consumer", params.consumers).await?;
            create_queue_group(&clients[0], &target.topic).await?;
            progress.start("queue", messages);
            start = Instant::now();
            let counts = Arc::new(QueueCounts::default());
            for (c, client) in clients.into_iter().enumerate() {
                for _ in 0..params.in_flight {
                    tasks.spawn(queue(
                        Arc::clone(&client),
                        target.topic.clone(),
                        format!("consumer-{c}"),
                        messages,
                        Arc::clone(&counts),
                        params.clone(),
                        start,
                        Arc::clone(progress),
                    ));
                }
            }
            "queue: one round, a fetch and the ack of the batch before it"
        }
    };
    let consumed = join_all(tasks, start).await?;
    // A load that failed would have left the figures measured without it.
    while let Some(ended) = load.try_join_next() {
        match ended {
            Ok(result) => {
                result?;
            }
            Err(e) if e.is_panic() => {
                return Err(BenchError::Incomplete(format!(
                    "a --queue-load consumer panicked: {e}"
                )));
            }
            Err(_) => {}
        }
    }
    load.abort_all();
    Ok(Outcome {
        messages: consumed.messages,
        bytes: consumed.bytes,
        elapsed: consumed.last.saturating_duration_since(start),
        latency: consumed.latency,
        measures,
        send_lag: Latency::new(),
    })
}

/// `--queue-load`: queue-group members on the measured topic that fetch and
/// ack one message at a time until aborted; their figures are not kept.
async fn queue_load(
    target: &Target,
    params: &Params,
) -> Result<JoinSet<Result<Consumed, BenchError>>, BenchError> {
    let mut load = JoinSet::new();
    if params.queue_load == 0 {
        return Ok(load);
    }
    let clients = produce::connect_all(target, "queue-load", params.queue_load).await?;
    create_queue_group(&clients[0], &target.topic).await?;
    let one_at_a_time = Params {
        batch: 1,
        duration_s: None,
        ..params.clone()
    };
    let start = Instant::now();
    for (c, client) in clients.into_iter().enumerate() {
        load.spawn(queue(
            client,
            target.topic.clone(),
            format!("queue-load-{c}"),
            UNTIL_ABORTED,
            Arc::new(QueueCounts::default()),
            one_at_a_time.clone(),
            start,
            Arc::new(Progress::default()),
        ));
    }
    Ok(load)
}

/// Creates the run's queue group on `topic`, from its first message.
async fn create_queue_group(client: &Client, topic: &str) -> Result<(), BenchError> {
    client
        .create_group(topic, GROUP, GroupMode::Queue, Some(Position::Earliest))
        .await
        .map_err(BenchError::client(format!("creating queue group {GROUP}")))?;
    Ok(())
}

/// One consumer replaying offsets `0..end` (again and again until the
/// deadline, when there is one): `in_flight` readers take the next chunk
/// of `batch` offsets each, so fetches overlap.
async fn replay(
    client: Arc<Conn>,
    topic: String,
    stream: Option<StreamReader>,
    end: u64,
    params: Params,
    start: Instant,
    progress: Arc<Progress>,
) -> Result<Consumed, BenchError> {
    let batch = u64::from(params.batch);
    let chunks = end.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let deadline = params.duration().map(|d| start + d);
    let mut readers = JoinSet::new();
    for _ in 0..params.in_flight {
        let (client, topic, stream, next, progress) = (
            Arc::clone(&client),
            topic.clone(),
            stream.clone(),
            Arc::clone(&next),
            Arc::clone(&progress),
        );
        readers.spawn(async move {
            let mut got = Consumed::new(start);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if deadline.is_none() && i >= chunks {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let chunk_start = (i % chunks) * batch;
                let chunk_end = (chunk_start + batch).min(end);
                let mut pos = chunk_start;
                while pos < chunk_end {
                    let max_messages = u32::try_from(chunk_end - pos).unwrap_or(u32::MAX);
                    let t = Instant::now();
                    let fetched = client
                        .fetch_from(&topic, stream.as_ref(), pos, max_messages)
                        .await?;
                    let now = Instant::now();
                    got.latency.record(now - t);
                    if fetched.messages == 0 {
                        return Err(BenchError::Incomplete(format!(
                            "replay of {topic} found nothing at offset {pos} (end {end})"
                        )));
                    }
                    let n = fetched.messages;
                    got.messages += n;
                    got.bytes += fetched.bytes;
                    got.last = now;
                    progress.add(n);
                    pos = fetched.next_offset;
                }
            }
            Ok(got)
        });
    }
    let got = join_all(readers, start).await?;
    // Read to the end (not in cycles against a deadline): commit it, as a
    // group that caught up does. Outside the clock.
    if let (Some(s), None) = (&stream, deadline) {
        s.commits
            .commit(&topic, &s.group, end)
            .await
            .map_err(BenchError::client(format!(
                "committing {end} for group {} on {topic}",
                s.group
            )))?;
    }
    Ok(got)
}

/// `--mode stream`: a stream group per consumer, at the earliest offset
/// (`None` each for a replay).
async fn stream_readers(
    target: &Target,
    params: &Params,
) -> Result<Vec<Option<StreamReader>>, BenchError> {
    if params.mode != ReadMode::Stream {
        return Ok(vec![None; params.consumers as usize]);
    }
    let commits = Arc::new(target.connect("stream-groups").await?);
    let readers: Vec<StreamReader> = (0..params.consumers)
        .map(|c| StreamReader {
            group: format!("{GROUP}-stream-{c}"),
            member: format!("consumer-{c}"),
            commits: Arc::clone(&commits),
        })
        .collect();
    for r in &readers {
        commits
            .create_group(
                &target.topic,
                &r.group,
                GroupMode::Stream,
                Some(Position::Earliest),
            )
            .await
            .map_err(BenchError::client(format!(
                "creating stream group {} on {}",
                r.group, target.topic
            )))?;
    }
    Ok(readers.into_iter().map(Some).collect())
}

/// One fetch-and-ack loop of a queue-group member; stops once the group
/// has acked `total` messages (or at the deadline). Like a consumer that
/// keeps one batch in hand, it acks what it has processed while fetching
/// the next batch, so the ack and the next batch's delivery counts can
/// share one journal sync; a round is that fetch and that ack.
#[allow(clippy::too_many_arguments)]
async fn queue(
    client: Arc<Client>,
    topic: String,
    member: String,
    total: u64,
    counts: Arc<QueueCounts>,
    params: Params,
    start: Instant,
    progress: Arc<Progress>,
) -> Result<Consumed, BenchError> {
    let deadline = params.duration().map(|d| start + d);
    let mut got = Consumed::new(start);
    let mut idle_since = Instant::now();
    // Processed, not yet acked: (offsets, value bytes).
    let mut in_hand: Option<(Vec<u64>, u64)> = None;
    // An ack's count and when it was answered (not when the fetch beside
    // it was: that may be a long-poll waiting for nothing).
    let ack = |offsets: Vec<u64>| {
        let client = Arc::clone(&client);
        let topic = topic.clone();
        async move {
            client
                .ack(&topic, GROUP, &offsets, None)
                .await
                .map_err(BenchError::client(format!("acking in queue group {GROUP}")))?;
            Ok::<_, BenchError>((offsets.len() as u64, Instant::now()))
        }
    };
    let acked = &counts.acked;
    let count_acked = |got: &mut Consumed, (n, at): (u64, Instant), bytes: u64| {
        got.messages += n;
        got.bytes += bytes;
        got.last = got.last.max(at);
        acked.fetch_add(n, Ordering::Relaxed);
        progress.add(n);
    };
    while deadline.is_none_or(|d| Instant::now() < d) {
        if in_hand.is_none() && acked.load(Ordering::Relaxed) >= total {
            break;
        }
        if in_hand.is_some() && counts.handed.load(Ordering::Relaxed) >= total {
            // Every message is handed out: the batch in hand is acked below,
            // without a fetch that could only wait out its long-poll.
            break;
        }
        let options = FetchOptions {
            group: Some(GROUP.into()),
            member: member.clone(),
            max_messages: params.batch,
            max_bytes: client.welcome().max_frame_bytes,
            wait_ms: QUEUE_WAIT_MS,
            ..FetchOptions::default()
        };
        let t = Instant::now();
        let fetch = async {
            client
                .fetch(&topic, options)
                .await
                .map_err(BenchError::client(format!(
                    "fetching from queue group {GROUP}"
                )))
        };
        let fetched = match in_hand.take() {
            Some((offsets, bytes)) => {
                let (fetched, n) = tokio::join!(fetch, ack(offsets));
                count_acked(&mut got, n?, bytes);
                fetched?
            }
            None => fetch.await?,
        };
        if fetched.messages.is_empty() {
            if idle_since.elapsed() > IDLE_LIMIT && total != UNTIL_ABORTED {
                return Err(BenchError::Incomplete(format!(
                    "queue group {GROUP} handed out nothing for {IDLE_LIMIT:?} with {} of {total} acked",
                    acked.load(Ordering::Relaxed)
                )));
            }
            continue;
        }
        // A round that found nothing is no round of the measure.
        got.latency.record(t.elapsed());
        // First deliveries only: a redelivery is a message counted before.
        let first = fetched.messages.iter().filter(|r| r.delivery == 1).count();
        counts.handed.fetch_add(first as u64, Ordering::Relaxed);
        idle_since = Instant::now();
        let offsets: Vec<u64> = fetched
            .messages
            .iter()
            .map(|r| r.message.offset.0)
            .collect();
        let bytes = fetched
            .messages
            .iter()
            .map(|r| r.message.value.len() as u64)
            .sum::<u64>();
        in_hand = Some((offsets, bytes));
    }
    if let Some((offsets, bytes)) = in_hand {
        let n = ack(offsets).await?;
        count_acked(&mut got, n, bytes);
    }
    Ok(got)
}

/// What the loops of one queue run share: messages acked, and messages
/// handed out (leased) to any of them.
#[derive(Debug, Default)]
struct QueueCounts {
    acked: AtomicU64,
    handed: AtomicU64,
}

/// The `e2e` workload: consumers subscribe first, then producers run on
/// their schedule; every delivered message's latency runs from its due time
/// (stamped in its value) to its arrival at the consumer.
pub(super) async fn e2e(
    target: &Target,
    params: &Params,
    progress: &Arc<Progress>,
) -> Result<Outcome, BenchError> {
    if params.mode == ReadMode::Stream {
        return Err(BenchError::Invalid(
            "--mode stream goes with consume".into(),
        ));
    }
    let consumers = produce::connect_all(target, "consumer", params.consumers).await?;
    if params.mode == ReadMode::Queue {
        create_queue_group(&consumers[0], &target.topic).await?;
    }
    let schedule = Schedule::new(
        u64::from(params.producers),
        u64::from(params.batch),
        params.messages.filter(|_| params.duration_s.is_none()),
        params.duration(),
        params.rate,
    );
    // Replay: every consumer expects every message; queue: the group does.
    let (expected_tx, expected) = watch::channel(schedule.total());
    let delivered = Arc::new(AtomicU64::new(0));
    // (Stream was refused above.)
    let fan_out = match params.mode {
        ReadMode::Replay | ReadMode::Stream => u64::from(params.consumers),
        ReadMode::Queue => 1,
    };
    progress.start(
        "e2e",
        schedule.total().map_or(0, |t| t.saturating_mul(fan_out)),
    );
    let origin = super::origin(params);
    let mut tasks = JoinSet::new();
    for (c, client) in consumers.into_iter().enumerate() {
        let sub = match params.mode {
            ReadMode::Replay | ReadMode::Stream => {
                client
                    .subscribe(
                        &target.topic,
                        None,
                        &format!("consumer-{c}"),
                        Some(Position::Earliest),
                        SUBSCRIBE_IN_FLIGHT,
                    )
                    .await
            }
            ReadMode::Queue => {
                client
                    .subscribe(
                        &target.topic,
                        Some(GROUP),
                        &format!("consumer-{c}"),
                        None,
                        SUBSCRIBE_IN_FLIGHT,
                    )
                    .await
            }
        }
        .map_err(BenchError::client(format!(
            "subscribing to {}",
            target.topic
        )))?;
        let shared = match params.mode {
            ReadMode::Replay | ReadMode::Stream => Arc::new(AtomicU64::new(0)),
            ReadMode::Queue => Arc::clone(&delivered),
        };
        tasks.spawn(subscriber(
            client,
            sub,
            target.topic.clone(),
            params.mode,
            expected.clone(),
            shared,
            origin,
            Arc::clone(progress),
        ));
    }
    let producers = produce::conn_all(target, "producer", params.producers).await?;
    let spec = Arc::new(Spec {
        topic: target.topic.clone(),
        schedule,
        size: params.size as usize,
        stamp: true,
        in_flight: params.in_flight as usize,
        origin,
    });
    // The bar counts deliveries; the producers' own count goes nowhere.
    let produced = match produce::run(producers, spec, &Arc::new(Progress::default())).await {
        Ok(p) => p,
        Err(e) => {
            tasks.abort_all();
            return Err(e);
        }
    };
    let _ = expected_tx.send(Some(produced.messages));
    let consumed = join_all(tasks, origin).await?;
    Ok(Outcome {
        messages: consumed.messages,
        bytes: consumed.bytes,
        elapsed: consumed.last.saturating_duration_since(origin),
        latency: consumed.latency,
        measures: if params.rate.is_some() {
            "e2e: from each message's due time (open loop) to its delivery to a consumer"
        } else {
            "e2e: from each message's send to its delivery to a consumer"
        },
        send_lag: produced.send_lag,
    })
}

/// One subscribed consumer: records each message's latency as it arrives,
/// returns credit (replay) or acks (queue) in the background, and stops once
/// it (replay) or the group (queue, `shared` counts) has every message.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    client: Arc<Client>,
    mut sub: Subscription,
    topic: String,
    mode: ReadMode,
    expected: watch::Receiver<Option<u64>>,
    shared: Arc<AtomicU64>,
    origin: Instant,
    progress: Arc<Progress>,
) -> Result<Consumed, BenchError> {
    let group = match mode {
        ReadMode::Replay | ReadMode::Stream => "",
        ReadMode::Queue => GROUP,
    };
    let mut got = Consumed::new(origin);
    let mut pending: Vec<u64> = Vec::with_capacity(ACK_EVERY);
    let mut acks = JoinSet::new();
    let mut last_ack = Instant::now();
    let mut last_message = Instant::now();
    loop {
        let done = shared.load(Ordering::Relaxed);
        if let Some(want) = *expected.borrow()
            && done >= want
        {
            break;
        }
        let first = match tokio::time::timeout(ACK_INTERVAL, sub.next()).await {
            Ok(Some(item)) => Some(item),
            Ok(None) => {
                return Err(BenchError::Incomplete(format!(
                    "the broker closed the subscription to {topic} after {} messages",
                    got.messages
                )));
            }
            Err(_) => None,
        };
        let mut items = Vec::new();
        items.extend(first);
        while let Some(Some(item)) = sub.next().now_or_never() {
            items.push(item);
        }
        let now = Instant::now();
        let since_origin = now.saturating_duration_since(origin);
        for item in &items {
            let received = item.as_ref().map_err(|e| {
                BenchError::Incomplete(format!("subscription to {topic} ended: {e}"))
            })?;
            let value = &received.message.value;
            let due = produce::stamp_of(value).unwrap_or_default();
            got.latency.record(since_origin.saturating_sub(due));
            got.bytes += value.len() as u64;
            pending.push(received.message.offset.0);
        }
        let n = items.len() as u64;
        if n > 0 {
            got.messages += n;
            got.last = now;
            last_message = now;
            shared.fetch_add(n, Ordering::Relaxed);
            progress.add(n);
        } else if last_message.elapsed() > IDLE_LIMIT {
            return Err(BenchError::Incomplete(format!(
                "no message from {topic} for {IDLE_LIMIT:?} after {}",
                got.messages
            )));
        }
        if !pending.is_empty() && (pending.len() >= ACK_EVERY || last_ack.elapsed() >= ACK_INTERVAL)
        {
            let offsets = std::mem::take(&mut pending);
            let (client, topic, id) = (Arc::clone(&client), topic.clone(), sub.id());
            acks.spawn(async move { client.ack(&topic, group, &offsets, Some(id)).await });
            last_ack = Instant::now();
        }
        while let Some(done) = acks.try_join_next() {
            ack_result(done, &topic)?;
        }
    }
    if !pending.is_empty() {
        client
            .ack(&topic, group, &pending, Some(sub.id()))
            .await
            .map_err(BenchError::client(format!("acking on {topic}")))?;
    }
    while let Some(done) = acks.join_next().await {
        ack_result(done, &topic)?;
    }
    Ok(got)
}

fn ack_result(
    done: Result<crate::client::Result<()>, tokio::task::JoinError>,
    topic: &str,
) -> Result<(), BenchError> {
    done.map_err(|e| BenchError::Incomplete(format!("an ack task panicked: {e}")))?
        .map_err(BenchError::client(format!("acking on {topic}")))
}
