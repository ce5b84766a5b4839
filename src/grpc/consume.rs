//! One `Consume` stream: a queue-group subscription whose acks, nacks and
//! lease extensions come in on the same call. It keeps one invariant: every
//! offset it delivered and the client has neither acked nor nacked is in
//! `held`, and is given back to the group when the stream ends, however
//! it ends (client close, cancel, error, broker stop).

use super::stopping;
use crate::broker::topic::GroupIdentity;
use crate::broker::{Broker, Credit, Event, Subscription};
use crate::error::Error;
use crate::protocol::{convert, pb, status};
use crate::security::auth::{Access, Operation, Principal};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

/// Responses queued for the client before the stream stops reading its
/// subscription and requests (the client is slow to read).
pub(super) const RESPONSE_BUFFER: usize = 16;

/// What answers a `Consume` call.
pub(super) type Responses = mpsc::Sender<Result<pb::ConsumeResponse, Status>>;

/// The state of one `Consume` stream.
pub(super) struct Consuming {
    /// The broker the stream reads.
    pub(super) broker: Broker,
    /// Topic of the queue group.
    pub(super) topic: String,
    /// The queue group.
    pub(super) group: String,
    /// The member holding this stream's leases.
    pub(super) member: String,
    /// The subscription's credit, returned as offsets are acked or nacked.
    pub(super) credit: Credit,
    /// Where responses go.
    pub(super) responses: Responses,
    /// Largest gRPC message (the server's `max_frame_bytes`).
    pub(super) max_frame: u32,
    /// For statuses: paths relative to the data directory.
    pub(super) data_dir: PathBuf,
    /// Delivered on this stream, neither acked nor nacked by it.
    pub(super) held: BTreeMap<u64, u32>,
    /// Who opened the stream, asked before each delivery.
    pub(super) principal: Principal,
    /// The group it leases from, as it was when the stream started: leases
    /// are extended and given back in that group only, never in one
    /// created again under its name.
    pub(super) leased_by: Option<GroupIdentity>,
}

/// How a stream ends.
enum End {
    /// Quietly: the client closed or cancelled, or the topic went away.
    Closed,
    /// With this status.
    Failed(Status),
}

impl Consuming {
    fn status(&self, error: &Error) -> Status {
        let wire = status::to_wire(error, &self.data_dir);
        Status::new(tonic::Code::from_i32(wire.code), wire.message)
    }

    /// Runs the stream until the client closes or cancels it, an ack or
    /// nack fails, the subscription ends, or the broker stops; then gives
    /// back what it still holds and sends the final status, if any.
    pub(super) async fn run(
        mut self,
        subscription: Subscription,
        mut requests: Streaming<pb::ConsumeRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The unfold keeps a read in progress across select rounds, so an
        // ack arriving mid-read does not drop messages already leased.
        let mut events = futures_util::stream::unfold(subscription, |mut s| async move {
            let event = s.next().await?;
            Some((event, s))
        })
        .boxed();
        let end = loop {
            tokio::select! {
                event = events.next() => match event {
                    None => break End::Closed,
                    Some(Ok(Event::Messages(m))) => {
                        // A reload of the auth file may have narrowed or
                        // revoked the token since the stream started: then
                        // none of these goes out, and they are given back
                        // at once, uncounted.
                        if let Err(e) = self.principal.allow(Access::Topic(Operation::Consume, &self.topic)) {
                            self.broker.give_back(&self.topic, &self.group, &self.member, m).await;
                            break End::Failed(self.status(&e));
                        }
                        // Leased now: given back however the stream ends. An
                        // offset held already came again (its lease ran out):
                        // one delivery replaces the other, so the credit the
                        // new one took comes back now.
                        let again: std::collections::BTreeSet<u64> = m
                            .iter()
                            .map(|d| (d.offset(), d.delivery()))
                            .filter(|&(o, delivery)| self.held.insert(o, delivery).is_some())
                            .map(|(o, _)| o)
                            .collect();
                        if !again.is_empty() {
                            self.credit.give(again.len());
                        }
                        if !self.deliver(m, &again).await {
                            break End::Closed;
                        }
                    }
                    Some(Ok(Event::Skipped { offset, error })) => {
                        // Queue groups dead-letter such a message instead.
                        tracing::warn!(offset, %error, "Consume skipped a message");
                    }
                    Some(Err(e)) => break End::Failed(self.status(&e)),
                },
                request = requests.message() => match request {
                    Ok(Some(r)) => match self.apply(r.kind).await {
                        Ok(response) => {
                            if self.responses.send(Ok(response)).await.is_err() {
                                break End::Closed;
                            }
                        }
                        Err(status) => break End::Failed(status),
                    },
                    Ok(None) => break End::Closed,
                    // A request too large or that does not decode: the
                    // stream ends with that status, not OK.
                    Err(status) => {
                        tracing::debug!(%status, "Consume request stream failed");
                        break End::Failed(status);
                    }
                },
                _ = stopping(&mut shutdown) => {
                    break End::Failed(Status::unavailable("broker is stopping"));
                }
                _ = self.responses.closed() => break End::Closed,
            }
        };
        drop(events);
        self.release().await;
        if let End::Failed(status) = end {
            let _ = self.responses.send(Err(status)).await;
        }
    }

    /// Sends `messages` in responses within `max_frame`; false when the
    /// client is gone.
    /// `again`: offsets held already, whose credit came back.
    async fn deliver(
        &mut self,
        messages: crate::broker::Deliveries,
        again: &std::collections::BTreeSet<u64>,
    ) -> bool {
        for d in convert::deliveries(0, messages, self.max_frame) {
            if let Some(offset) = d.skipped_offset {
                // Still held (given back when the stream ends; else its
                // lease runs out and max_deliveries dead-letters it); its
                // credit comes back now, as no ack of it will (once: not
                // again for a redelivery of it).
                tracing::warn!(offset, "a message too large for a Consume response");
                if !again.contains(&offset) {
                    self.credit.give(1);
                }
                continue;
            }
            let response = pb::ConsumeResponse {
                messages: d.messages,
                ..Default::default()
            };
            if self.responses.send(Ok(response)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Applies one later request and answers its confirmation.
    async fn apply(
        &mut self,
        kind: Option<pb::consume_request::Kind>,
    ) -> Result<pb::ConsumeResponse, Status> {
        use pb::consume_request::Kind;
        // As before each delivery: a reload may have narrowed or revoked
        // the token, and an ack, nack or extend is a consume like a fetch.
        self.principal
            .allow(Access::Topic(Operation::Consume, &self.topic))
            .map_err(|e| self.status(&e))?;
        let (topic, group) = (self.topic.as_str(), self.group.as_str());
        match kind {
            Some(Kind::Ack(a)) => {
                self.broker
                    .ack(topic, group, convert::offsets(a.offsets.clone()), false)
                    .await
                    .map_err(|e| self.status(&e))?;
                self.returned(&a.offsets);
                Ok(pb::ConsumeResponse {
                    acked: a.offsets,
                    ..Default::default()
                })
            }
            Some(Kind::Nack(n)) => {
                let requeued = self
                    .broker
                    .nack(
                        topic,
                        group,
                        convert::offsets(n.offsets.clone()),
                        n.delay_ms,
                    )
                    .await
                    .map_err(|e| self.status(&e))?;
                self.returned(&n.offsets);
                Ok(pb::ConsumeResponse {
                    nacked: n.offsets,
                    requeued: requeued as u32,
                    ..Default::default()
                })
            }
            Some(Kind::Extend(x)) => {
                let extended = self
                    .broker
                    .extend_leases_of(
                        topic,
                        group,
                        self.leased_by.clone(),
                        &self.member,
                        convert::offsets(x.offsets),
                        x.ack_timeout_ms,
                    )
                    .await
                    .map_err(|e| self.status(&e))?;
                Ok(pb::ConsumeResponse {
                    extended: extended.into_iter().map(|o| o.0).collect(),
                    ..Default::default()
                })
            }
            Some(Kind::Start(_)) => Err(self.status(&Error::InvalidArgument(
                "start: only the first ConsumeRequest may be start".to_owned(),
            ))),
            None => Err(self.status(&Error::InvalidArgument(
                "kind: a ConsumeRequest carries ack, nack or extend".to_owned(),
            ))),
        }
    }

    /// `offsets` acked or nacked: the ones this stream held no longer are,
    /// and their credit comes back.
    fn returned(&mut self, offsets: &[u64]) {
        let n = offsets
            .iter()
            .filter(|o| self.held.remove(o).is_some())
            .count();
        self.credit.give(n);
    }

    /// Gives back to the group, due at once, the leases this stream still
    /// holds.
    async fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let leased: Vec<(u64, u32)> = std::mem::take(&mut self.held).into_iter().collect();
        let count = leased.len();
        match self
            .broker
            .release_leases_of(
                &self.topic,
                &self.group,
                self.leased_by.clone(),
                &self.member,
                leased,
            )
            .await
        {
            Ok(released) => tracing::debug!(
                topic = %self.topic,
                group = %self.group,
                member = %self.member,
                held = count,
                released,
                "Consume stream ended: leases given back"
            ),
            // Leases live in memory: they still expire after the ack timeout.
            Err(e) => tracing::debug!(error = %e, "Consume stream ended: leases not given back"),
        }
    }
}
