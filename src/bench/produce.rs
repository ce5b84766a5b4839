//! Producers: each its own connection, following the [`Schedule`]. In an
//! open loop a pacing thread releases each send at its due time and the
//! latency of a batch runs from that due time to its ack; in a closed loop a
//! producer keeps `in_flight` requests outstanding and each latency runs from
//! the actual send.

use super::histogram::Latency;
use super::pacing::{self, Schedule, Send};
use super::target::{Conn, Target};
use super::{BenchError, Outcome, Params, Progress, STAMP_LEN};
use crate::client::Client;
use crate::storage::NewMessage;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// Open loop: most produce requests outstanding per producer (memory bound
/// when the broker falls behind; latency keeps counting from the due time).
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 4096;
/// Open loop: built batches waiting between the pacing thread and the sender.
const RELEASE_QUEUE: usize = 64;

/// What every producer of a run shares.
#[derive(Debug)]
pub(super) struct Spec {
    pub topic: String,
    pub schedule: Schedule,
    pub size: usize,
    /// Write each message's due time into its first bytes (e2e).
    pub stamp: bool,
    pub in_flight: usize,
    pub origin: Instant,
}

/// What the producers did.
#[derive(Debug)]
pub(super) struct Produced {
    pub messages: u64,
    pub latency: Latency,
    pub send_lag: Latency,
    pub last_ack: Instant,
}

/// The `produce` workload.
pub(super) async fn workload(
    target: &Target,
    params: &Params,
    progress: &Arc<Progress>,
) -> Result<Outcome, BenchError> {
    let clients = conn_all(target, "producer", params.producers).await?;
    let schedule = Schedule::new(
        u64::from(params.producers),
        u64::from(params.batch),
        params.messages.filter(|_| params.duration_s.is_none()),
        params.duration(),
        params.rate,
    );
    progress.start("produce", schedule.total().unwrap_or(0));
    let spec = Arc::new(Spec {
        topic: target.topic.clone(),
        schedule,
        size: params.size as usize,
        stamp: false,
        in_flight: params.in_flight as usize,
        origin: super::origin(params),
    });
    let produced = run(clients, Arc::clone(&spec), progress).await?;
    Ok(Outcome {
        messages: produced.messages,
        bytes: produced.messages * params.size as u64,
        elapsed: produced.last_ack.saturating_duration_since(spec.origin),
        latency: produced.latency,
        measures: if params.rate.is_some() {
            "produce: from each batch's due time (open loop) to its ack, per message"
        } else {
            "produce: from each batch's send to its ack, per message"
        },
        send_lag: produced.send_lag,
    })
}

/// `n` connections named `{role}-{i}`.
pub(super) async fn connect_all(
    target: &Target,
    role: &str,
    n: u32,
) -> Result<Vec<Arc<Client>>, BenchError> {
    let mut clients = Vec::with_capacity(n as usize);
    for i in 0..n {
        clients.push(Arc::new(target.connect(&format!("{role}-{i}")).await?));
    }
    Ok(clients)
}

/// `n` connections in the run's transport, named `{role}-{i}` when native.
pub(super) async fn conn_all(
    target: &Target,
    role: &str,
    n: u32,
) -> Result<Vec<Arc<Conn>>, BenchError> {
    let mut conns = Vec::with_capacity(n as usize);
    for i in 0..n {
        conns.push(Arc::new(target.conn(&format!("{role}-{i}")).await?));
    }
    Ok(conns)
}

/// Runs one producer per client and merges what they measured.
pub(super) async fn run(
    clients: Vec<Arc<Conn>>,
    spec: Arc<Spec>,
    progress: &Arc<Progress>,
) -> Result<Produced, BenchError> {
    let mut producers = JoinSet::new();
    for (p, client) in clients.into_iter().enumerate() {
        let (spec, progress) = (Arc::clone(&spec), Arc::clone(progress));
        producers.spawn(async move {
            if spec.schedule.is_open_loop() {
                open_loop(client, p as u64, spec, progress).await
            } else {
                closed_loop(client, p as u64, spec, progress).await
            }
        });
    }
    let mut total = Produced {
        messages: 0,
        latency: Latency::new(),
        send_lag: Latency::new(),
        last_ack: spec.origin,
    };
    while let Some(done) = producers.join_next().await {
        let one =
            done.map_err(|e| BenchError::Incomplete(format!("a producer panicked: {e}")))??;
        total.messages += one.messages;
        total.latency.merge(&one.latency);
        total.send_lag.merge(&one.send_lag);
        total.last_ack = total.last_ack.max(one.last_ack);
    }
    Ok(total)
}

/// The messages of each send. Without stamps every full send carries the
/// same messages, built once and shared (as `iggy-bench` sends its one
/// fixed batch again); with them each value starts with the send's due time.
struct Batches {
    payload: Bytes,
    /// The batch of a full send, once built.
    unstamped: Option<Arc<Vec<NewMessage>>>,
}

impl Batches {
    fn new(size: usize) -> Batches {
        Batches {
            payload: Bytes::from(vec![0x5a_u8; size]),
            unstamped: None,
        }
    }

    fn of(&mut self, send: &Send, stamp: Option<Duration>) -> Arc<Vec<NewMessage>> {
        if stamp.is_some() {
            return Arc::new(batch(send, &self.payload, stamp));
        }
        match &self.unstamped {
            Some(b) if b.len() as u64 == send.len => Arc::clone(b),
            _ => {
                let b = Arc::new(batch(send, &self.payload, None));
                self.unstamped = Some(Arc::clone(&b));
                b
            }
        }
    }
}

/// The messages of one send; with `stamp`, each value starts with `due`.
pub(super) fn batch(send: &Send, payload: &Bytes, stamp: Option<Duration>) -> Vec<NewMessage> {
    (0..send.len)
        .map(|_| match stamp {
            None => NewMessage::from_value(payload.clone()),
            Some(due) => {
                let mut value = BytesMut::from(&payload[..]);
                let ns = u64::try_from(due.as_nanos()).unwrap_or(u64::MAX);
                value[..STAMP_LEN].copy_from_slice(&ns.to_le_bytes());
                NewMessage::from_value(value.freeze())
            }
        })
        .collect()
}

/// The due time written by [`batch`], if the value carries one.
pub(super) fn stamp_of(value: &[u8]) -> Option<Duration> {
    let bytes: [u8; STAMP_LEN] = value.get(..STAMP_LEN)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_le_bytes(bytes)))
}

type SendResult = (Result<(), BenchError>, Instant, Instant, u64);

/// Collects finished sends into one producer's figures.
struct Tally {
    produced: Produced,
    progress: Arc<Progress>,
}

impl Tally {
    fn new(origin: Instant, progress: Arc<Progress>) -> Tally {
        Tally {
            produced: Produced {
                messages: 0,
                latency: Latency::new(),
                send_lag: Latency::new(),
                last_ack: origin,
            },
            progress,
        }
    }

    fn add(&mut self, done: Result<SendResult, tokio::task::JoinError>) -> Result<(), BenchError> {
        let (result, start, acked, n) =
            done.map_err(|e| BenchError::Incomplete(format!("a produce task panicked: {e}")))?;
        result?;
        self.produced.latency.record_n(acked - start, n);
        self.produced.messages += n;
        self.produced.last_ack = self.produced.last_ack.max(acked);
        self.progress.add(n);
        Ok(())
    }
}

fn spawn_send(
    sends: &mut JoinSet<SendResult>,
    client: &Arc<Conn>,
    topic: &str,
    messages: Arc<Vec<NewMessage>>,
    start: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (client, topic) = (Arc::clone(client), topic.to_owned());
    let n = messages.len() as u64;
    sends.spawn(async move {
        let result = client.produce(&topic, messages).await;
        let acked = Instant::now();
        drop(permit);
        (result, start, acked, n)
    });
}

async fn closed_loop(
    client: Arc<Conn>,
    producer: u64,
    spec: Arc<Spec>,
    progress: Arc<Progress>,
) -> Result<Produced, BenchError> {
    let mut batches = Batches::new(spec.size);
    let window = Arc::new(Semaphore::new(spec.in_flight.max(1)));
    let mut sends = JoinSet::new();
    let mut tally = Tally::new(spec.origin, progress);
    let deadline = spec.schedule.duration().map(|d| spec.origin + d);
    for k in 0.. {
        let Some(send) = spec.schedule.send(producer, k) else {
            break;
        };
        let permit = Arc::clone(&window)
            .acquire_owned()
            .await
            .expect("the window semaphore is never closed");
        let start = Instant::now();
        if deadline.is_some_and(|d| start >= d) {
            break;
        }
        let stamp = spec
            .stamp
            .then(|| start.saturating_duration_since(spec.origin));
        spawn_send(
            &mut sends,
            &client,
            &spec.topic,
            batches.of(&send, stamp),
            start,
            permit,
        );
        while let Some(done) = sends.try_join_next() {
            tally.add(done)?;
        }
    }
    while let Some(done) = sends.join_next().await {
        tally.add(done)?;
    }
    Ok(tally.produced)
}

async fn open_loop(
    client: Arc<Conn>,
    producer: u64,
    spec: Arc<Spec>,
    progress: Arc<Progress>,
) -> Result<Produced, BenchError> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Arc<Vec<NewMessage>>, Instant)>(RELEASE_QUEUE);
    let pacer_spec = Arc::clone(&spec);
    std::thread::Builder::new()
        .name(format!("bench-pacer-{producer}"))
        .spawn(move || {
            pacing::exact_sleeps();
            let spec = pacer_spec;
            let mut batches = Batches::new(spec.size);
            for k in 0.. {
                let Some(send) = spec.schedule.send(producer, k) else {
                    break;
                };
                let due = send.due.unwrap_or_default();
                // A run bounded by time ends with it, however far behind its
                // timetable the sends are (a rate the broker cannot take
                // would otherwise send every due message, for as long as
                // that takes).
                let ended = spec
                    .schedule
                    .duration()
                    .and_then(|d| spec.origin.checked_add(d))
                    .is_some_and(|end| Instant::now() >= end);
                if ended {
                    break;
                }
                let messages = batches.of(&send, spec.stamp.then_some(due));
                let due_at = spec.origin + due;
                pacing::sleep_until(due_at);
                if tx
                    .blocking_send((due_at, messages, Instant::now()))
                    .is_err()
                {
                    break;
                }
            }
        })
        .map_err(BenchError::io("starting a pacing thread"))?;
    let window = Arc::new(Semaphore::new(OPEN_LOOP_MAX_IN_FLIGHT));
    let mut sends = JoinSet::new();
    let mut tally = Tally::new(spec.origin, progress);
    while let Some((due_at, messages, released)) = rx.recv().await {
        tally
            .produced
            .send_lag
            .record(released.saturating_duration_since(due_at));
        let permit = Arc::clone(&window)
            .acquire_owned()
            .await
            .expect("the window semaphore is never closed");
        spawn_send(&mut sends, &client, &spec.topic, messages, due_at, permit);
        while let Some(done) = sends.try_join_next() {
            tally.add(done)?;
        }
    }
    while let Some(done) = sends.join_next().await {
        tally.add(done)?;
    }
    Ok(tally.produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_unstamped_sends_share_one_batch_and_others_get_their_own() {
        let mut batches = Batches::new(16);
        let full = |first| Send {
            first,
            len: 4,
            due: None,
        };
        let a = batches.of(&full(0), None);
        let b = batches.of(&full(4), None);
        assert!(Arc::ptr_eq(&a, &b), "the same messages, shared");
        assert_eq!(a.len(), 4);
        let last = Send {
            first: 8,
            len: 2,
            due: None,
        };
        assert_eq!(batches.of(&last, None).len(), 2);
        let due = Duration::from_micros(5);
        let stamped = batches.of(&full(10), Some(due));
        assert!(!Arc::ptr_eq(&stamped, &a));
        assert!(stamped.iter().all(|m| stamp_of(&m.value) == Some(due)));
    }

    #[test]
    fn stamps_read_back_and_short_values_have_none() {
        let send = Send {
            first: 0,
            len: 3,
            due: None,
        };
        let payload = Bytes::from(vec![7u8; 32]);
        let due = Duration::from_nanos(123_456_789);
        let stamped = batch(&send, &payload, Some(due));
        assert_eq!(stamped.len(), 3);
        for m in &stamped {
            assert_eq!(m.value.len(), 32);
            assert_eq!(stamp_of(&m.value), Some(due));
            assert_eq!(&m.value[STAMP_LEN..], &payload[STAMP_LEN..]);
        }
        let plain = batch(&send, &payload, None);
        assert!(plain.iter().all(|m| m.value == payload));
        assert_eq!(stamp_of(&[1, 2, 3]), None);
    }
}
