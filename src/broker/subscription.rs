//! Subscriptions with credit: a subscription reads while it has credit (at
//! most `max_in_flight` unacknowledged messages) and otherwise waits until
//! the topic changes (and, for queue groups, until leases may have expired).
//!
//! A transport pulls deliveries with [`Subscription::next`] and returns
//! credit through a [`Credit`] as the client acknowledges. A stored message
//! too large for a delivery (see [`DeliveryLimits::message_bytes`]) does not
//! end a replay or stream-group subscription: it comes out as
//! [`Event::Skipped`] and reading goes on after it. Queue groups never meet
//! one: the broker dead-letters it.

use super::core::Broker;
use super::deliveries::Deliveries;
use super::runtime::TopicRuntime;
use super::topic::{DeliveryLimits, Position, Topic};
use crate::error::{Error, Result};
use crate::groups::GroupMode;
use crate::storage::Offset;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// What a subscription or fetch reads.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// Replay: no state (the reader's position is where it starts).
    Replay,
    /// A stream group's position.
    Stream(String),
    /// Leases of a queue group.
    Queue(String),
}

/// What a subscription reads, from where, and as which member.
#[derive(Debug)]
pub(super) struct Reader {
    /// Replay, stream group or queue group.
    pub(super) target: Target,
    /// First offset of replay and stream groups, fixed when the subscription
    /// starts (see [`start_offset`]); queue groups lease instead.
    pub(super) position: Offset,
    /// Member name: queue leases and group liveness.
    pub(super) member: String,
    /// The group read, as it was when the subscription started: one
    /// deleted and created again under its name is another group, and the
    /// subscription ends.
    pub(super) group: Option<super::topic::GroupIdentity>,
}

/// What a subscription hands out next.
#[derive(Debug)]
pub enum Event {
    /// Messages, each taking one credit.
    Messages(Deliveries),
    /// The message at `offset` cannot be delivered ([`Error::TooLarge`]);
    /// reading goes on after it.
    Skipped {
        /// Its offset.
        offset: u64,
        /// Why.
        error: Error,
    },
}

/// The credit of a subscription: the transport returns it as messages are
/// acknowledged or given back.
#[derive(Debug, Clone)]
pub struct Credit {
    credits: Arc<Semaphore>,
    max_in_flight: usize,
    /// Held while one give looks at the room and fills it: two acks at once
    /// must not both fill the same room.
    giving: Arc<std::sync::Mutex<()>>,
}

impl Credit {
    fn new(max_in_flight: usize) -> Credit {
        Credit {
            credits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            giving: Arc::default(),
        }
    }

    /// Returns `n` credits (acked or nacked messages), never above
    /// `max_in_flight`.
    pub fn give(&self, n: usize) {
        let _giving = self.giving.lock().unwrap_or_else(|p| p.into_inner());
        let room = self
            .max_in_flight
            .saturating_sub(self.credits.available_permits());
        self.credits.add_permits(n.min(room));
    }
}

/// A subscription, read with [`Subscription::next`].
#[derive(Debug)]
pub struct Subscription {
    broker: Broker,
    runtime: Arc<TopicRuntime>,
    reader: Reader,
    credit: Credit,
    changes: watch::Receiver<u64>,
    /// Most messages per delivery, bytes, and the largest message.
    limits: DeliveryLimits,
    ended: bool,
}

impl Drop for Subscription {
    /// An open subscription holds its topic in use; its end is a use too, so
    /// a topic with `delete_when_idle_ms` is idle from here, not from the
    /// sweep before.
    fn drop(&mut self) {
        self.broker.touch(self.runtime.topic().name());
    }
}

/// How often a queue group's readers look again when nothing changes:
/// leases expire without any append.
pub(super) fn lease_poll(topic: &Topic) -> Duration {
    Duration::from_millis(topic.config().ack_timeout_ms.clamp(10, 1000))
}

impl Subscription {
    pub(super) fn new(
        broker: Broker,
        runtime: Arc<TopicRuntime>,
        reader: Reader,
        max_in_flight: usize,
        limits: DeliveryLimits,
    ) -> Subscription {
        let changes = runtime.subscribe_changes();
        Subscription {
            broker,
            runtime,
            reader,
            credit: Credit::new(max_in_flight),
            changes,
            limits,
            ended: false,
        }
    }

    /// The next offset a replay or stream-group subscription reads (where
    /// it starts, until it hands out messages); queue groups lease instead.
    pub fn position(&self) -> Offset {
        self.reader.position
    }

    /// The handle that returns credit.
    pub fn credit(&self) -> Credit {
        self.credit.clone()
    }

    /// The group it reads, as it was when it started (see
    /// [`super::topic::GroupIdentity`]).
    pub(crate) fn group_identity(&self) -> Option<super::topic::GroupIdentity> {
        self.reader.group.clone()
    }

    /// Gives back `messages`, which this subscription read but never
    /// handed to its client (see [`Broker::give_back`]).
    pub async fn give_back(&self, messages: Deliveries) {
        if let Target::Queue(group) = &self.reader.target {
            let topic = self.runtime.topic().name();
            self.broker
                .give_back(topic, group, &self.reader.member, messages)
                .await;
        }
    }

    /// Waits for credit and something to deliver, and hands it out (the
    /// messages take their credit). `None`: the subscription is over
    /// silently (its topic's runtime is gone); `Some(Err(..))`: it ends with
    /// that error, and `next` returns `None` from then on.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        let lease_poll = lease_poll(self.runtime.topic());
        let queue = matches!(self.reader.target, Target::Queue(_));
        while !self.ended {
            let credits = &self.credit.credits;
            let Ok(permit) = credits.acquire().await else {
                return None;
            };
            drop(permit);
            let room = credits.available_permits().min(self.limits.messages);
            self.changes.borrow_and_update();
            if let (Target::Stream(name) | Target::Queue(name), Some(group)) =
                (&self.reader.target, &self.reader.group)
                && !self.runtime.topic().is_group(name, group)
            {
                self.ended = true;
                return Some(Err(self.runtime.topic().group_replaced(name)));
            }
            let limits = DeliveryLimits {
                messages: room,
                ..self.limits
            };
            let read = self
                .broker
                .read(
                    &self.runtime,
                    &self.reader.target,
                    &self.reader.member,
                    self.reader.position,
                    limits,
                    self.reader.group.as_ref(),
                )
                .await;
            match read {
                Ok(messages) if messages.is_empty() => {
                    tokio::select! {
                        changed = self.changes.changed() => if changed.is_err() { return None },
                        _ = tokio::time::sleep(lease_poll), if queue => {}
                    }
                }
                Ok(messages) => {
                    if let Some(last) = messages.last_offset() {
                        self.reader.position = last.next();
                    }
                    credits.forget_permits(messages.len());
                    return Some(Ok(Event::Messages(messages)));
                }
                Err(error @ Error::TooLarge { offset, .. }) => {
                    tracing::debug!(offset, "skipping a message too large for a delivery");
                    self.reader.position = Offset(offset + 1);
                    return Some(Ok(Event::Skipped { offset, error }));
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// The target of a subscribe or fetch on `topic` with `group` (replay from
/// `from`, earliest by default, without one) and where its reads start
/// (see [`group_start`] for a group).
pub(super) fn target_and_start(
    topic: &Topic,
    group: Option<String>,
    from: Option<Position>,
) -> Result<(Target, Offset)> {
    match group {
        None => {
            let from = from.unwrap_or(Position::Earliest);
            Ok((Target::Replay, topic.resolve(from)?))
        }
        Some(g) => {
            let group = topic.describe_group(&g)?;
            group_start(topic, g, group.mode, group.committed, from)
        }
    }
}

/// The target of reads through group `name` (mode `mode`, committed offset
/// `committed`) and where they start: a stream group at `from` when given
/// (a fetching reader's own position), else at its committed offset; a
/// queue group tracks its own cursor and starts at 0.
pub(super) fn group_start(
    topic: &Topic,
    name: String,
    mode: GroupMode,
    committed: u64,
    from: Option<Position>,
) -> Result<(Target, Offset)> {
    Ok(match (mode, from) {
        (GroupMode::Stream, Some(p)) => (Target::Stream(name), topic.resolve(p)?),
        (GroupMode::Stream, None) => (Target::Stream(name), Offset(committed)),
        (GroupMode::Queue, _) => (Target::Queue(name), Offset(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_given_back_at_once_from_many_threads_stays_within_max_in_flight() {
        // A race: each round starts its givers together, and some round
        // lands two of them on the same room unless giving is one step.
        for _ in 0..1000 {
            let credit = Credit::new(1);
            let taken = credit.credits.try_acquire_many(1).expect("one credit");
            taken.forget();
            let start = std::sync::Barrier::new(4);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        start.wait();
                        credit.give(1)
                    });
                }
            });
            assert_eq!(credit.credits.available_permits(), 1);
        }
    }
}
