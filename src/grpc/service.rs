//! `spool.v1.Spool`: each RPC converts its request into one [`Broker`] call
//! and the answer back, through the same conversions as the native
//! transport ([`convert`]); a broker error becomes a [`Status`] with the
//! code and message [`status::to_wire`] gives it, so both transports say
//! the same thing.

use super::connection::{ConnInfo, StreamSlot};
use super::consume::{self, Consuming};
use super::stopping;
use crate::broker::{Broker, Credit, Event, Subscription, TopicInfo};
use crate::error::Error;
use crate::protocol::pb::spool_server::Spool;
use crate::protocol::{convert, pb, status};
use crate::security::access::{self, Guarded};
use crate::security::auth::{Access, Operation, Principal};
use crate::storage::Offset;
use futures_util::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// The credit of each open gRPC subscription, by id: `Ack` and `Nack`
/// naming a `subscription_id` return credit to it.
/// Open subscriptions: the connection each was started on, and its credit.
type Credits = Arc<Mutex<HashMap<u64, (Option<u64>, Credit)>>>;

/// The `Spool` service over one broker.
#[derive(Debug)]
pub(crate) struct Service {
    broker: Broker,
    /// Largest gRPC message either way (the server's `max_frame_bytes`).
    max_frame: u32,
    credits: Credits,
    next_subscription: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// The stream a `Subscribe` call answers with.
type Deliveries = Pin<Box<dyn futures_util::Stream<Item = Result<pb::Delivery, Status>> + Send>>;

/// The stream a `Consume` call answers with.
type ConsumeResponses =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

impl Service {
    /// The service over `broker`; `shutdown` turning true ends its
    /// subscriptions and long-polls.
    pub(crate) fn new(broker: Broker, max_frame: u32, shutdown: watch::Receiver<bool>) -> Service {
        Service {
            broker,
            max_frame,
            credits: Arc::default(),
            next_subscription: AtomicU64::new(1),
            shutdown,
        }
    }

    /// A place for one more `Subscribe` or `Consume` stream on the
    /// request's connection (`max_subscriptions`), held until the stream
    /// ends; `None` for a connection the listener did not admit (none in
    /// `spool serve`).
    fn stream_slot<T>(&self, request: &Request<T>) -> Result<Option<StreamSlot>, Status> {
        request
            .extensions()
            .get::<ConnInfo>()
            .map(ConnInfo::open_stream)
            .transpose()
            .map_err(|e| Status::new(tonic::Code::from_i32(e.code), e.message))
    }

    /// The caller's principal, if it may make this call: `UNAUTHENTICATED`
    /// or `PERMISSION_DENIED` (naming the operation and topic) if not.
    fn allow<T: Guarded>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = principal(request)?;
        principal
            .allow(request.get_ref().access())
            .map_err(|e| self.status(e))?;
        Ok(principal)
    }

    /// `reply` as a response, or `RESOURCE_EXHAUSTED` in its place when it
    /// is larger than a gRPC message may be (as on the native listener;
    /// tonic would answer `OUT_OF_RANGE`).
    fn fitting<T: prost::Message>(&self, reply: T) -> Result<Response<T>, Status> {
        let len = reply.encoded_len();
        if len <= self.max_frame as usize {
            return Ok(Response::new(reply));
        }
        let wire = status::reply_too_large("the reply", len, self.max_frame);
        Err(Status::new(tonic::Code::from_i32(wire.code), wire.message))
    }

    /// A broker error as a gRPC status: the native protocol's code and
    /// message (paths relative to the data directory).
    fn status(&self, error: Error) -> Status {
        let wire = status::to_wire(&error, self.broker.data_dir());
        Status::new(tonic::Code::from_i32(wire.code), wire.message)
    }

    /// A topic onto the wire, with the largest message it takes.
    fn topic_info(&self, topic: &TopicInfo) -> pb::TopicInfo {
        let max = topic.max_message_bytes(self.message_limit());
        convert::topic_info(&topic.name, &topic.config, topic.stats, max)
    }

    /// The largest message a produce takes: the broker's, or what a gRPC
    /// message of `max_frame` bytes can deliver.
    fn message_limit(&self) -> crate::broker::MessageLimit {
        self.broker
            .message_limit(convert::frame_message_limit(self.max_frame))
    }

    /// Returns `n` credits to gRPC subscription `id`, if it is open and
    /// was started on connection `conn` (an ack on another connection
    /// returns nothing, as in the native protocol).
    fn give_credit(&self, conn: Option<u64>, id: Option<u64>, n: usize) {
        if let Some(id) = id
            && let Some((owner, credit)) = credits(&self.credits).get(&id)
            && *owner == conn
        {
            credit.give(n);
        }
    }
}

/// The principal the interceptor authenticated the call as; a call that
/// did not pass it is refused.
fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}

/// The connection a call came on (`None` for one the listener did not
/// admit: none in `spool serve`).
fn conn_id<T>(request: &Request<T>) -> Option<u64> {
    request.extensions().get::<ConnInfo>().map(ConnInfo::id)
}

fn credits(credits: &Credits) -> std::sync::MutexGuard<'_, HashMap<u64, (Option<u64>, Credit)>> {
    credits.lock().unwrap_or_else(|p| p.into_inner())
}

/// The time left before the call's deadline (its `grpc-timeout` header),
/// if it has one that parses.
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    // At most 8 digits and a unit (gRPC over HTTP/2).
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (amount, unit) = value.split_at(value.len() - 1);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long a long-poll may wait within `deadline`: a tenth of it (at most
/// 100 ms) is left for the answer to reach the client in time.
fn wait_within(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).min(Duration::from_millis(100)))
}

/// Removes a subscription's credit from the service when its stream is
/// dropped (ended, or cancelled by the client).
struct Registered {
    id: u64,
    credits: Credits,
}

impl Drop for Registered {
    fn drop(&mut self) {
        credits(&self.credits).remove(&self.id);
    }
}

/// What a subscription's stream carries between polls.
struct Pushing {
    subscription: Subscription,
    registered: Registered,
    pending: VecDeque<pb::Delivery>,
    shutdown: watch::Receiver<bool>,
    data_dir: std::path::PathBuf,
    max_frame: u32,
    done: bool,
    /// The stream's place among its connection's `max_subscriptions`.
    _slot: Option<StreamSlot>,
    /// Who subscribed, asked before each delivery (a reload of the auth
    /// file may have narrowed or revoked its token).
    principal: Principal,
    topic: String,
}

impl Pushing {
    fn status(&self, error: &Error) -> Status {
        let wire = status::to_wire(error, &self.data_dir);
        Status::new(tonic::Code::from_i32(wire.code), wire.message)
    }

    /// The next item of the stream: a delivery, or the status it ends with.
    async fn next(&mut self) -> Option<Result<pb::Delivery, Status>> {
        let id = self.registered.id;
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Some(Ok(d));
            }
            if self.done {
                return None;
            }
            let event = tokio::select! {
                event = self.subscription.next() => event,
                _ = stopping(&mut self.shutdown) => {
                    self.done = true;
                    return Some(Err(Status::unavailable("broker is stopping")));
                }
            };
            if event.is_some()
                && let Err(e) = self
                    .principal
                    .allow(Access::Topic(Operation::Consume, &self.topic))
            {
                if let Some(Ok(Event::Messages(m))) = event {
                    self.subscription.give_back(m).await;
                }
                self.done = true;
                return Some(Err(self.status(&e)));
            }
            match event {
                None => return None,
                Some(Ok(Event::Messages(m))) => {
                    let deliveries = convert::deliveries(id, m, self.max_frame);
                    // A message no response can carry is skipped: it took
                    // credit no ack will give back.
                    let skipped = deliveries
                        .iter()
                        .filter(|d| d.skipped_offset.is_some())
                        .count();
                    if skipped > 0 {
                        self.subscription.credit().give(skipped);
                    }
                    self.pending.extend(deliveries)
                }
                Some(Ok(Event::Skipped { offset, error })) => {
                    self.pending.push_back(pb::Delivery {
                        subscription_id: id,
                        messages: Vec::new(),
                        error: Some(status::to_wire(&error, &self.data_dir)),
                        skipped_offset: Some(offset),
                    })
                }
                Some(Err(e)) => {
                    self.done = true;
                    tracing::debug!(subscription = id, error = %e, "gRPC subscription ended");
                    return Some(Err(self.status(&e)));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Spool for Service {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        self.allow(&request)?;
        let p = request.into_inner();
        let batch: Vec<_> = p.messages.into_iter().map(convert::new_message).collect();
        let appended = self
            .broker
            .produce(&p.topic, batch, self.message_limit())
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::ProduceResponse {
            first_offset: appended.first.0,
            last_offset: appended.last.0,
            durability: convert::durability(appended.durability),
        }))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let principal = self.allow(&request)?;
        let deadline = deadline(&request);
        let mut fetch = convert::fetch_request(request.into_inner(), self.max_frame);
        if let Some(deadline) = deadline {
            fetch.wait = fetch.wait.min(wait_within(deadline));
        }
        // A long-poll asks again once it has messages: a reload of the
        // auth file may have narrowed or revoked the token while it waited.
        let asked = (!fetch.wait.is_zero()).then(|| {
            (
                fetch.topic.clone(),
                fetch.group.clone(),
                fetch.member.clone(),
            )
        });
        let mut shutdown = self.shutdown.clone();
        let fetched = self
            .broker
            .fetch(fetch, async move { stopping(&mut shutdown).await })
            .await
            .map_err(|e| self.status(e))?;
        if let Some((topic, group, member)) = asked
            && !fetched.messages.is_empty()
            && let Err(e) = principal.allow(Access::Topic(Operation::Consume, &topic))
        {
            if let Some(group) = group {
                self.broker
                    .give_back(&topic, &group, &member, fetched.messages)
                    .await;
            }
            return Err(self.status(e));
        }
        if fetched.messages.is_empty() && *self.shutdown.borrow() {
            return Err(Status::unavailable("broker is stopping"));
        }
        self.fitting(pb::FetchResponse {
            messages: convert::messages(fetched.messages),
            next_offset: fetched.next_offset.0,
            end_offset: fetched.end_offset.0,
        })
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<Response<pb::Empty>, Status> {
        self.allow(&request)?;
        let conn = conn_id(&request);
        let a = request.into_inner();
        let n = a.offsets.len();
        if a.group.is_empty() {
            if a.subscription_id.is_none() {
                return Err(self.status(Error::InvalidArgument(format!(
                    "ack on topic {}: name a group, or a subscription_id to return credit",
                    a.topic
                ))));
            }
            self.give_credit(conn, a.subscription_id, n);
            return Ok(Response::new(pb::Empty {}));
        }
        self.broker
            .ack(
                &a.topic,
                &a.group,
                convert::offsets(a.offsets),
                a.subscription_id.is_some(),
            )
            .await
            .map_err(|e| self.status(e))?;
        self.give_credit(conn, a.subscription_id, n);
        Ok(Response::new(pb::Empty {}))
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        self.allow(&request)?;
        let conn = conn_id(&request);
        let n = request.into_inner();
        let count = n.offsets.len();
        let requeued = self
            .broker
            .nack(&n.topic, &n.group, convert::offsets(n.offsets), n.delay_ms)
            .await
            .map_err(|e| self.status(e))?;
        self.give_credit(conn, n.subscription_id, count);
        Ok(Response::new(pb::NackResponse {
            requeued: requeued as u32,
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.allow(&request)?;
        let c = request.into_inner();
        self.broker
            .commit(&c.topic, &c.group, Offset(c.offset))
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn seek(
        &self,
        request: Request<pb::SeekRequest>,
    ) -> Result<Response<pb::SeekResponse>, Status> {
        self.allow(&request)?;
        let s = request.into_inner();
        let to = convert::position(s.to, crate::broker::Position::Earliest);
        let offset = self
            .broker
            .seek(&s.topic, &s.group, to)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::SeekResponse { offset: offset.0 }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.allow(&request)?;
        let d = request.into_inner();
        self.broker
            .delete(&d.topic, convert::offsets(d.offsets))
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let principal = self.allow(&request)?;
        let c = request.into_inner();
        if let Some(access) = access::dead_letter(&c) {
            principal.allow(access).map_err(|e| self.status(e))?;
        }
        let config = convert::topic_config(c.config, &self.broker.config().topic_defaults)
            .map_err(|e| self.status(e))?;
        let info = self
            .broker
            .create_topic(&c.name, config)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(self.topic_info(&info)))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let principal = self.allow(&request)?;
        let topics = self
            .broker
            .list_topics()
            .await
            .map_err(|e| self.status(e))?
            .iter()
            .filter(|t| principal.may_see(&t.name))
            .map(|t| self.topic_info(t))
            .collect();
        self.fitting(pb::ListTopicsResponse { topics })
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        self.allow(&request)?;
        let d = request.into_inner();
        let info = self
            .broker
            .describe_topic(&d.name)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(self.topic_info(&info)))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.allow(&request)?;
        let d = request.into_inner();
        self.broker
            .delete_topic(&d.name)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::GroupInfo>, Status> {
        self.allow(&request)?;
        let c = request.into_inner();
        let mode = convert::group_mode(c.mode).map_err(|e| self.status(e))?;
        let start = convert::position(c.start, crate::broker::Position::Earliest);
        let info = self
            .broker
            .create_group(&c.topic, &c.group, mode, start)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(convert::group_info(&c.topic, info)))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.allow(&request)?;
        let l = request.into_inner();
        let groups = self
            .broker
            .list_groups(&l.topic)
            .await
            .map_err(|e| self.status(e))?;
        self.fitting(pb::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|g| convert::group_info(&l.topic, g))
                .collect(),
        })
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::GroupInfo>, Status> {
        self.allow(&request)?;
        let d = request.into_inner();
        let info = self
            .broker
            .describe_group(&d.topic, &d.group)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(convert::group_info(&d.topic, info)))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.allow(&request)?;
        let d = request.into_inner();
        self.broker
            .delete_group(&d.topic, &d.group)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        self.allow(&request)?;
        let c = request.into_inner();
        let results = self
            .broker
            .compact(c.topic.as_deref())
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::CompactResponse {
            topics: results
                .iter()
                .map(|(t, s)| convert::compaction(t, s))
                .collect(),
        }))
    }

    type SubscribeStream = Deliveries;

    /// Starts a subscription and streams its deliveries, each carrying the
    /// subscription's id (for `Ack` and `Nack` to return credit); the
    /// stream ends with the subscription's error status, or when the
    /// client cancels it.
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Deliveries>, Status> {
        let principal = self.allow(&request)?;
        let slot = self.stream_slot(&request)?;
        let conn = conn_id(&request);
        let topic = request.get_ref().topic.clone();
        let request = convert::subscribe_request(request.into_inner(), self.max_frame);
        let subscription = self
            .broker
            .subscribe(request)
            .await
            .map_err(|e| self.status(e))?;
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        credits(&self.credits).insert(id, (conn, subscription.credit()));
        let pushing = Pushing {
            subscription,
            registered: Registered {
                id,
                credits: Arc::clone(&self.credits),
            },
            pending: VecDeque::new(),
            shutdown: self.shutdown.clone(),
            data_dir: self.broker.data_dir().to_owned(),
            max_frame: self.max_frame,
            done: false,
            _slot: slot,
            principal,
            topic,
        };
        let stream = futures_util::stream::unfold(pushing, |mut p| async move {
            let item = p.next().await?;
            Some((item, p))
        });
        Ok(Response::new(stream.boxed()))
    }

    type ConsumeStream = ConsumeResponses;

    /// Reads a queue group: the first request names it (`start`), later
    /// ones ack, nack or extend leases, each confirmed in a response; the
    /// stream gives back what it still holds when it ends (see
    /// [`Consuming`]).
    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<ConsumeResponses>, Status> {
        let principal = principal(&request)?;
        let slot = self.stream_slot(&request)?;
        let mut requests = request.into_inner();
        let first = requests.message().await?.and_then(|r| r.kind);
        let start = convert::consume_start(first, self.max_frame).map_err(|e| self.status(e))?;
        principal
            .allow(Access::Topic(Operation::Consume, &start.topic))
            .map_err(|e| self.status(e))?;
        let (topic, group, member) = (
            start.topic.clone(),
            start.group.clone().unwrap_or_default(),
            start.member.clone(),
        );
        let subscription = self
            .broker
            .subscribe_queue(start)
            .await
            .map_err(|e| self.status(e))?;
        let (responses, answers) = tokio::sync::mpsc::channel(consume::RESPONSE_BUFFER);
        let consuming = Consuming {
            broker: self.broker.clone(),
            topic,
            group,
            member,
            credit: subscription.credit(),
            responses,
            max_frame: self.max_frame,
            data_dir: self.broker.data_dir().to_owned(),
            held: Default::default(),
            principal,
            leased_by: subscription.group_identity(),
        };
        tokio::spawn(consuming.run(subscription, requests, self.shutdown.clone()));
        let stream =
            futures_util::stream::unfold((answers, slot), |(mut answers, slot)| async move {
                let answer = answers.recv().await?;
                Some((answer, (answers, slot)))
            });
        Ok(Response::new(stream.boxed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_poll_leaves_part_of_the_deadline_for_the_answer() {
        assert_eq!(
            wait_within(Duration::from_millis(500)),
            Duration::from_millis(450)
        );
        assert_eq!(
            wait_within(Duration::from_secs(10)),
            Duration::from_millis(9900)
        );
        assert_eq!(wait_within(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_grpc_timeout_header_parses_in_every_unit() {
        for (header, want) in [
            ("2S", Some(Duration::from_secs(2))),
            ("250m", Some(Duration::from_millis(250))),
            ("1M", Some(Duration::from_secs(60))),
            ("1H", Some(Duration::from_secs(3600))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
        ] {
            let mut request = Request::new(());
            request.metadata_mut().insert(
                "grpc-timeout",
                header.parse().expect("an ASCII header value"),
            );
            assert_eq!(deadline(&request), want, "{header}");
        }
        assert_eq!(deadline(&Request::new(())), None);
    }
}
