//! Push subscriptions: a task per subscription that fetches while it has
//! credit (at most `max_in_flight` unacknowledged messages), pushes
//! `Delivery` frames, and otherwise sleeps until the topic changes.
//!
//! A stored message too large for a frame (see [`Broker::delivery_limits`])
//! does not end a replay or stream-group subscription: it gets a `Delivery`
//! with `error` and `skipped_offset` naming that message, and goes on after
//! it. Queue groups never meet one: the broker dead-letters it.

use super::Broker;
use super::outgoing::Outgoing;
use super::runtime::TopicRuntime;
use crate::broker::DeliveryLimits;
use crate::broker::topic::Position;
use crate::groups::GroupMode;
use crate::protocol::{convert, pb, status};
use crate::storage::log::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Most messages in one pushed frame.
const MAX_PER_DELIVERY: usize = 1000;
/// Bytes read per fetch of a subscription.
const MAX_FETCH_BYTES: u32 = 1024 * 1024;

/// What a subscription reads.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// Replay from a position, no state.
    Replay(Position),
    /// A stream group's position.
    Stream(String),
    /// Leases of a queue group.
    Queue(String),
}

/// A running subscription.
#[derive(Debug)]
pub(super) struct Subscription {
    credits: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// Returns `n` credits (acked or nacked messages).
    pub(super) fn give_credit(&self, n: usize, max_in_flight: usize) {
        let room = max_in_flight.saturating_sub(self.credits.available_permits());
        self.credits.add_permits(n.min(room));
    }

    /// Stops the subscription.
    pub(super) fn stop(&self) {
        self.task.abort();
    }

    /// Stops the subscription and waits until it has pushed its last frame:
    /// a frame queued after this returns is the subscription's last.
    pub(super) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// What a subscription reads, from where, and as which member.
#[derive(Debug)]
pub(super) struct Reader {
    /// Replay, stream group or queue group.
    pub(super) target: Target,
    /// First offset of replay and stream groups, fixed before the subscribe
    /// reply goes out (see [`start_offset`]); queue groups lease instead.
    pub(super) position: u64,
    /// Member name: queue leases and group liveness.
    pub(super) member: String,
}

/// Starts a subscription pushing to `out`.
pub(super) fn start(
    id: u64,
    broker: Arc<Broker>,
    runtime: Arc<TopicRuntime>,
    reader: Reader,
    max_in_flight: usize,
    out: Outgoing,
) -> Subscription {
    let credits = Arc::new(Semaphore::new(max_in_flight));
    let task = tokio::spawn(run(id, broker, runtime, reader, Arc::clone(&credits), out));
    Subscription { credits, task }
}

async fn run(
    id: u64,
    broker: Arc<Broker>,
    runtime: Arc<TopicRuntime>,
    reader: Reader,
    credits: Arc<Semaphore>,
    out: Outgoing,
) {
    let Reader {
        target,
        mut position,
        member,
    } = reader;
    let topic = Arc::clone(runtime.topic());
    let mut changes = runtime.subscribe_changes();
    // Queue leases expire without any append: look again at least this often.
    let lease_poll = Duration::from_millis(topic.config().ack_timeout_ms.clamp(10, 1000));
    loop {
        let Ok(permit) = credits.acquire().await else {
            return;
        };
        drop(permit);
        let room = credits.available_permits().min(MAX_PER_DELIVERY);
        changes.borrow_and_update();
        let (t, b, target2, member2) = (
            Arc::clone(&topic),
            Arc::clone(&broker),
            target.clone(),
            member.clone(),
        );
        let limits = broker.delivery_limits(room, MAX_FETCH_BYTES);
        // A read takes the topic's group-state lock, which an ack holds across
        // its sync, and may fault log pages in: off the async threads.
        let fetched = tokio::task::spawn_blocking(move || {
            fetch(&b, &t, &target2, &member2, position, limits)
        })
        .await;
        let messages = match fetched {
            Ok(Ok(m)) => m,
            Ok(Err(e @ crate::Error::TooLarge { offset, .. })) => {
                tracing::debug!(
                    subscription = id,
                    offset,
                    "skipping a message too large for a frame"
                );
                position = offset + 1;
                if out
                    .send(skipped(id, offset, broker.wire(&e)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Err(e)) => return end(&out, id, broker.wire(&e)).await,
            Err(e) => return end(&out, id, status::error(pb::Code::Internal, e.to_string())).await,
        };
        if messages.is_empty() {
            let queue = matches!(target, Target::Queue(_));
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(lease_poll), if queue => {}
            }
            continue;
        }
        if let Some(last) = messages.last() {
            position = last.offset + 1;
        }
        credits.forget_permits(messages.len());
        if push(&out, id, messages, broker.config.max_frame_bytes)
            .await
            .is_err()
        {
            return;
        }
    }
}

fn delivery(id: u64, messages: Vec<pb::Message>) -> pb::Delivery {
    pb::Delivery {
        subscription_id: id,
        messages,
        error: None,
        skipped_offset: None,
    }
}

/// The frame saying the message at `offset` was skipped, and why.
fn skipped(id: u64, offset: u64, error: pb::Error) -> pb::ServerFrame {
    pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
            subscription_id: id,
            messages: Vec::new(),
            error: Some(error),
            skipped_offset: Some(offset),
        })),
    }
}

/// Pushes `messages` in frames of at most `max_frame` bytes: normally one;
/// split in halves if the envelopes came out larger than planned, and a
/// single message that still does not fit is reported as skipped rather than
/// closing the connection (the codec would refuse the frame).
async fn push(
    out: &Outgoing,
    id: u64,
    messages: Vec<pb::Message>,
    max_frame: u32,
) -> Result<(), ()> {
    let mut pending = vec![messages];
    while let Some(batch) = pending.pop() {
        let d = delivery(id, batch);
        let body = prost::Message::encoded_len(&d);
        // The frame: the tag of `ServerFrame.delivery` (one byte), the
        // body's length, the body.
        let len = 1 + prost::length_delimiter_len(body) + body;
        if len <= max_frame as usize {
            let frame = pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Delivery(d)),
            };
            out.send(frame).await.map_err(|_| ())?;
            continue;
        }
        let mut batch = d.messages;
        if batch.len() > 1 {
            let second = batch.split_off(batch.len() / 2);
            pending.push(second);
            pending.push(batch);
        } else if let Some(m) = batch.pop() {
            let error = status::error(
                pb::Code::ResourceExhausted,
                format!(
                    "the message at offset {} takes a {len}-byte frame; max_frame_bytes is {max_frame}",
                    m.offset
                ),
            );
            out.send(skipped(id, m.offset, error))
                .await
                .map_err(|_| ())?;
        }
    }
    Ok(())
}

async fn end(out: &Outgoing, id: u64, error: pb::Error) {
    tracing::debug!(subscription = id, error = %error.message, "subscription ended");
    let _ = out.send(ended(id, error)).await;
}

/// The last frame of subscription `id`: no messages, and why it ends.
pub(super) fn ended(id: u64, error: pb::Error) -> pb::ServerFrame {
    pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
            subscription_id: id,
            messages: Vec::new(),
            error: Some(error),
            skipped_offset: None,
        })),
    }
}

/// One read for `target` within `limits`, as wire messages: replay and
/// stream groups from `from` ([`crate::Error::TooLarge`] when the message at
/// `from` cannot be delivered), queue groups by lease (such a message is
/// dead-lettered instead). Dead letters a queue fetch hands off wake the
/// dead-letter topic's readers.
pub(super) fn fetch(
    broker: &Broker,
    topic: &crate::broker::Topic,
    target: &Target,
    member: &str,
    from: u64,
    limits: DeliveryLimits,
) -> crate::Result<Vec<pb::Message>> {
    Ok(match target {
        Target::Replay(_) => topic
            .read_within(from, limits)?
            .into_iter()
            .map(|m| convert::message(m, 0))
            .collect(),
        Target::Stream(g) => topic
            .fetch_stream_within(g, member, Some(from), limits)?
            .into_iter()
            .map(|m| convert::message(m, 0))
            .collect(),
        Target::Queue(g) => {
            let fetched =
                broker
                    .registry
                    .fetch_queue_within(topic.name(), g, member, limits, now_ms())?;
            if !fetched.dead_letters.is_empty()
                && let Ok(dlq) =
                    broker.runtime(&topic.config().dead_letter_topic(topic.name()), false)
            {
                dlq.notify();
            }
            fetched
                .deliveries
                .into_iter()
                .map(|d| convert::message(d.message, d.delivery))
                .collect()
        }
    })
}

/// Where a reader of `target` starts: the resolved position for replay, the
/// committed offset for a stream group (queue groups track their own cursor).
pub(super) fn start_offset(topic: &crate::broker::Topic, target: &Target) -> crate::Result<u64> {
    match target {
        Target::Replay(p) => topic.resolve(*p),
        Target::Stream(g) => Ok(topic.describe_group(g)?.committed),
        Target::Queue(_) => Ok(0),
    }
}

/// The target of a subscribe or fetch request on `topic` with `group`.
pub(super) fn target(
    topic: &crate::broker::Topic,
    group: Option<String>,
    from: Option<pb::Position>,
) -> crate::Result<Target> {
    match group {
        None => Ok(Target::Replay(convert::position(from, Position::Earliest))),
        Some(g) => match topic.describe_group(&g)?.mode {
            GroupMode::Stream => Ok(Target::Stream(g)),
            GroupMode::Queue => Ok(Target::Queue(g)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_length_push_plans_with_is_the_encoded_length() {
        for (n, value) in [(0, 0), (1, 10), (3, 200), (2, 70_000)] {
            let messages = (0..n)
                .map(|i| pb::Message {
                    offset: i,
                    value: vec![1u8; value].into(),
                    ..Default::default()
                })
                .collect();
            let d = delivery(7, messages);
            let body = prost::Message::encoded_len(&d);
            let planned = 1 + prost::length_delimiter_len(body) + body;
            let frame = pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Delivery(d)),
            };
            assert_eq!(planned, prost::Message::encoded_len(&frame));
        }
    }
}
