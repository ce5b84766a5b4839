//! One client connection: the `Hello`/`Welcome` handshake, then requests
//! served concurrently and answered by `request_id` (pipelining), with pushed
//! deliveries interleaved.
//!
//! A connection holds a slot only while it is of use: it ends when the peer
//! closes (noticed at once, also while idle in a subscription or long-poll),
//! when a frame is unreadable, and when a limit is hit (no frame for
//! `idle_timeout`, a frame not completed within `frame_timeout`, a peer that
//! takes no bytes for `write_timeout`), closing this connection only. On the
//! way out, long-polls are answered and subscriptions ended with the reason,
//! requests in flight finish, and the last frame is a `request_id` 0 error
//! naming the reason, where one can still be sent.

use super::Broker;
use super::admission::Limit;
use super::deadline::{FrameReader, ReadError, StallGuard};
use super::outgoing::{FINAL_FRAMES_WAIT, Outgoing};
use super::subscription::{self, Subscription, Target};
use crate::broker::topic::Position;
use crate::protocol::codec::{FrameCodec, FrameError};
use crate::protocol::pb::client_frame::Request;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::{PROTOCOL_VERSION, convert, pb, status};
use crate::storage::record;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Defaults and caps of fetch and subscribe.
const DEFAULT_MAX_MESSAGES: u32 = 100;
const CAP_MAX_MESSAGES: u32 = 10_000;
const DEFAULT_MAX_BYTES: u32 = 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
const CAP_MAX_IN_FLIGHT: u32 = 10_000;
/// Longest long-poll.
const CAP_WAIT_MS: u32 = 60_000;
/// Requests served at once per connection; the connection reads no further
/// frame until one finishes (so a client that pipelines without reading its
/// replies holds a bounded amount of them).
const MAX_REQUESTS_IN_FLIGHT: usize = 256;
/// Longest a refusal waits for the socket to take its one frame.
const REFUSAL_WRITE_WAIT: Duration = Duration::from_secs(1);

type ServerCodec = FrameCodec<pb::ClientFrame, pb::ServerFrame>;

fn response(request_id: u64, result: Reply) -> pb::ServerFrame {
    pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Response(pb::Response {
            request_id,
            result: Some(result),
        })),
    }
}

fn error_frame(request_id: u64, error: pb::Error) -> pb::ServerFrame {
    response(request_id, Reply::Error(error))
}

/// `frame`, or an error in its place when it would not fit in a frame (a
/// reply the codec refuses would close the connection without a word). The
/// produce limit keeps messages small enough, and reads never hand out a
/// larger stored message ([`Broker::delivery_limits`]); this is the last
/// guard, for envelopes larger than planned.
fn within_frame_limit(request_id: u64, frame: pb::ServerFrame, max: u32) -> pb::ServerFrame {
    let len = prost::Message::encoded_len(&frame);
    if len <= max as usize {
        return frame;
    }
    let what = match &frame.kind {
        Some(pb::server_frame::Kind::Response(pb::Response {
            result: Some(Reply::Fetch(f)),
            ..
        })) => match f.messages.first() {
            Some(m) => format!("the message at offset {}", m.offset),
            None => "the reply".to_string(),
        },
        _ => "the reply".to_string(),
    };
    error_frame(
        request_id,
        status::error(
            pb::Code::ResourceExhausted,
            format!("{what} takes {len} bytes; max_frame_bytes is {max}"),
        ),
    )
}

fn frame_error(e: &FrameError) -> Option<pb::Error> {
    match e {
        FrameError::TooLarge { .. } => {
            Some(status::error(pb::Code::ResourceExhausted, e.to_string()))
        }
        FrameError::BadFlags(_) | FrameError::Decode(_) => {
            Some(status::error(pb::Code::InvalidArgument, e.to_string()))
        }
        FrameError::Io(_) => None,
    }
}

/// What ends a connection when the read side fails: the error to send, if
/// the peer can still get one.
fn read_error(broker: &Broker, peer: SocketAddr, e: &ReadError) -> Option<pb::Error> {
    match e {
        ReadError::Frame(e) => {
            tracing::debug!(%peer, error = %e, "closing connection on a bad frame");
            frame_error(e)
        }
        ReadError::FrameTimeout(limit) => {
            broker.admission.count(Limit::Frame);
            tracing::debug!(%peer, "closing connection: frame not completed in time");
            Some(status::error(
                pb::Code::DeadlineExceeded,
                format!(
                    "a frame started arriving {} ms ago and is still incomplete (frame_timeout_ms)",
                    limit.as_millis()
                ),
            ))
        }
    }
}

/// The error long-polls, subscriptions and the connection get at shutdown.
fn stopping_error() -> pb::Error {
    status::error(pb::Code::Unavailable, "broker is stopping")
}

/// Resolves once the server is stopping (or its stop signal is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Answers a connection that gets no slot with one error frame and closes it.
pub(super) async fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    max_frame_bytes: u32,
    error: pb::Error,
) {
    tracing::debug!(%peer, error = %error.message, "connection refused");
    let mut framed = FramedWrite::new(stream, ServerCodec::new(max_frame_bytes));
    let _ = tokio::time::timeout(REFUSAL_WRITE_WAIT, framed.send(error_frame(0, error))).await;
}

/// Serves one connection until the client leaves, a frame is unreadable, a
/// limit closes it, or the server shuts down (in-flight requests are
/// finished first).
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = &broker.config;
    let (read, write) = stream.into_split();
    let mut frames = FrameReader::new(
        FramedRead::new(read, ServerCodec::new(config.max_frame_bytes)),
        config.frame_timeout,
    );
    let sink = FramedWrite::new(
        StallGuard::new(write, config.write_timeout),
        ServerCodec::new(config.max_frame_bytes),
    );
    let b = Arc::clone(&broker);
    let (out, writer) = Outgoing::start(sink, peer, move || b.admission.count(Limit::Write));

    match handshake(&broker, peer, &mut frames, &mut shutdown).await {
        Ok(welcome) => {
            let _ = out
                .send(pb::ServerFrame {
                    kind: Some(pb::server_frame::Kind::Welcome(welcome)),
                })
                .await;
        }
        Err(refusal) => {
            if let Some((id, err)) = refusal {
                tracing::debug!(%peer, error = %err.message, "handshake refused");
                let _ =
                    tokio::time::timeout(FINAL_FRAMES_WAIT, out.send(error_frame(id, err))).await;
            }
            drop(out);
            let _ = writer.await;
            return;
        }
    }

    let (closing, _) = watch::channel(Closing::Open);
    let conn = Arc::new(Conn {
        broker: Arc::clone(&broker),
        out: out.clone(),
        subscriptions: Mutex::new(HashMap::new()),
        next_subscription: AtomicU64::new(1),
        closing,
        working: Arc::new(AtomicUsize::new(0)),
    });
    let idle = broker.config.idle_timeout;
    let mut last_frame = Instant::now();
    let mut in_flight = tokio::task::JoinSet::new();
    // Why the connection ends: the error the client gets, if it can get one.
    let reason: Option<pb::Error> = loop {
        tokio::select! {
            frame = frames.next(), if in_flight.len() < MAX_REQUESTS_IN_FLIGHT => match frame {
                Some(Ok(frame)) => {
                    last_frame = Instant::now();
                    // A long-poll waits for the topic, not for the broker:
                    // the connection is idle meanwhile.
                    let waits = matches!(&frame.request, Some(Request::Fetch(f)) if f.wait_ms > 0);
                    let busy = (!waits).then(|| Busy::new(&conn.working));
                    let conn = Arc::clone(&conn);
                    in_flight.spawn(async move {
                        let _busy = busy;
                        if let Some(reply) = conn.handle(frame).await {
                            let _ = conn.out.send(reply).await;
                        }
                    });
                }
                Some(Err(e)) => break read_error(&broker, peer, &e),
                None => {
                    tracing::debug!(%peer, "peer closed the connection");
                    break None;
                }
            },
            _ = stopping(&mut shutdown) => break Some(stopping_error()),
            // The writer stopped on a failed write: no reply can reach the client.
            _ = out.closed() => break None,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = sleep_until(idle.map(|t| last_frame + t)) => {
                // A request being served, or a frame arriving (the frame
                // timeout governs that), is not idleness.
                if conn.working.load(Ordering::Relaxed) > 0 || frames.in_frame() {
                    last_frame = Instant::now();
                    continue;
                }
                broker.admission.count(Limit::Idle);
                tracing::debug!(%peer, "closing an idle connection");
                let ms = idle.map_or(0, |t| t.as_millis());
                break Some(status::error(
                    pb::Code::DeadlineExceeded,
                    format!("no frame from the client for {ms} ms (idle_timeout_ms); send ping to keep a quiet connection open"),
                ));
            }
        }
    };
    // Stop reading; end what waits (long-polls, subscriptions) at once with
    // the reason, let requests in flight finish, then say why and close.
    drop(frames);
    let deadline = Instant::now() + FINAL_FRAMES_WAIT;
    conn.close(reason.clone(), deadline).await;
    while in_flight.join_next().await.is_some() {}
    // A subscribe that was in flight may have started one since.
    conn.close(reason.clone(), deadline).await;
    if let Some(error) = reason {
        let _ = tokio::time::timeout_at(deadline, out.send(error_frame(0, error))).await;
    }
    drop(conn);
    drop(out);
    let _ = writer.await;
}

/// Reads the `Hello` and builds the `Welcome`; `Err(Some(..))` refuses with
/// that error, `Err(None)` closes without a word.
async fn handshake<R>(
    broker: &Broker,
    peer: SocketAddr,
    frames: &mut FrameReader<R, ServerCodec>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<pb::Welcome, Option<(u64, pb::Error)>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let config = &broker.config;
    let deadline = config.frame_timeout.map(|t| Instant::now() + t);
    let first = tokio::select! {
        first = frames.next() => first,
        _ = sleep_until(deadline) => {
            broker.admission.count(Limit::Frame);
            let ms = config.frame_timeout.map_or(0, |t| t.as_millis());
            return Err(Some((
                0,
                status::error(pb::Code::DeadlineExceeded, format!("no Hello within {ms} ms (frame_timeout_ms)")),
            )));
        }
        _ = stopping(shutdown) => return Err(None),
    };
    match first {
        Some(Ok(pb::ClientFrame {
            request_id,
            request: Some(Request::Hello(h)),
        })) => {
            if h.protocol_version != PROTOCOL_VERSION {
                return Err(Some((
                    request_id,
                    status::error(
                        pb::Code::FailedPrecondition,
                        format!(
                            "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                            h.protocol_version
                        ),
                    ),
                )));
            }
            tracing::debug!(%peer, client = %h.client_name, "connected");
            Ok(pb::Welcome {
                server_version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: PROTOCOL_VERSION,
                max_frame_bytes: config.max_frame_bytes,
                max_message_bytes: broker.message_limit().0,
                max_batch_messages: config.max_batch_messages,
                max_subscriptions: config.max_subscriptions,
                idle_timeout_ms: config
                    .idle_timeout
                    .map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
            })
        }
        Some(Ok(frame)) => Err(Some((
            frame.request_id,
            status::error(
                pb::Code::FailedPrecondition,
                "the first frame of a connection must be Hello",
            ),
        ))),
        Some(Err(e)) => Err(read_error(broker, peer, &e).map(|err| (0, err))),
        None => Err(None),
    }
}

/// Counts a request being served (not waiting for the topic) while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(working: &Arc<AtomicUsize>) -> Busy {
        working.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(working))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a connection is closing, and how.
#[derive(Debug, Clone)]
enum Closing {
    Open,
    /// End of stream or a reset: nothing more needs saying.
    PeerGone,
    /// Closing with this error, which long-polls answer.
    With(pb::Error),
}

/// Per-connection state.
#[derive(Debug)]
struct Conn {
    broker: Arc<Broker>,
    out: Outgoing,
    subscriptions: Mutex<HashMap<u64, (Subscription, usize)>>,
    next_subscription: AtomicU64,
    /// Set when the connection is closing: long-polls stop waiting.
    closing: watch::Sender<Closing>,
    /// Requests being served, other than long-polls waiting for messages.
    working: Arc<AtomicUsize>,
}

fn invalid(message: impl Into<String>) -> pb::Error {
    status::error(pb::Code::InvalidArgument, message)
}

impl Conn {
    /// Runs engine work that may wait on the disk on the blocking pool: syncs,
    /// journal writes, reads of the log, and anything under a topic's
    /// group-state lock (acks hold it across their sync). Looking a topic up
    /// is a map read and stays on the async threads (see [`Conn::existing`]).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<T, pb::Error> {
        match tokio::task::spawn_blocking(f).await {
            Ok(result) => result.map_err(|e| self.broker.wire(&e)),
            Err(e) => Err(status::error(
                pb::Code::Internal,
                format!("request failed: {e}"),
            )),
        }
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Subscription, usize)>> {
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends waiting long-polls and every subscription: with `reason` when the
    /// client can still hear it (subscriptions get a last `Delivery` with it,
    /// queued by `deadline` or not at all), silently when the peer is gone.
    async fn close(&self, reason: Option<pb::Error>, deadline: Instant) {
        self.closing.send_replace(match &reason {
            Some(error) => Closing::With(error.clone()),
            None => Closing::PeerGone,
        });
        let subscriptions: Vec<_> = self.subscriptions().drain().collect();
        for (id, (sub, _)) in subscriptions {
            sub.finish().await;
            if let Some(error) = &reason {
                let last = subscription::ended(id, error.clone());
                let _ = tokio::time::timeout_at(deadline, self.out.send(last)).await;
            }
        }
    }

    /// Resolves once the connection closes: with the error a long-poll
    /// answers, or `None` when the peer is gone (a half-closed peer may
    /// still read the answer: the long-poll ends as if its wait was over).
    async fn closed(&self) -> Option<pb::Error> {
        let mut closing = self.closing.subscribe();
        match closing.wait_for(|c| !matches!(c, Closing::Open)).await {
            Ok(c) => match &*c {
                Closing::With(error) => Some(error.clone()),
                _ => None,
            },
            Err(_) => None,
        }
    }

    fn give_credit(&self, subscription: Option<u64>, n: usize) {
        if let Some(id) = subscription
            && let Some((sub, max)) = self.subscriptions().get(&id)
        {
            sub.give_credit(n, *max);
        }
    }

    /// Serves one request; `None` when the reply was already queued.
    async fn handle(&self, frame: pb::ClientFrame) -> Option<pb::ServerFrame> {
        let id = frame.request_id;
        let result = match frame.request {
            Some(Request::Subscribe(s)) => match self.subscribe(id, s).await {
                Ok(()) => return None,
                Err(e) => Err(e),
            },
            Some(request) => self.dispatch(request).await,
            None => Err(status::error(
                pb::Code::Unimplemented,
                "unknown request type: this server does not know the request field sent",
            )),
        };
        let frame = response(id, result.unwrap_or_else(Reply::Error));
        Some(within_frame_limit(
            id,
            frame,
            self.broker.config.max_frame_bytes,
        ))
    }

    /// Starts a subscription. Its reply is queued before the subscription can
    /// push anything, so a client always learns the id before the first delivery.
    async fn subscribe(&self, request_id: u64, s: pb::SubscribeRequest) -> Result<(), pb::Error> {
        let broker = Arc::clone(&self.broker);
        let config = &broker.config;
        let live = self.subscriptions().len();
        if live >= config.max_subscriptions as usize {
            return Err(status::error(
                pb::Code::ResourceExhausted,
                format!(
                    "{live} subscriptions on this connection; the limit is {}",
                    config.max_subscriptions
                ),
            ));
        }
        let runtime = self.existing(&s.topic)?;
        let t = Arc::clone(runtime.topic());
        let (group, from) = (s.group.clone(), s.from);
        // The start is fixed before the reply goes out: a subscription from
        // `Latest` gets everything produced after the client saw the reply.
        let (target, start) = self
            .blocking(move || {
                let target = subscription::target(&t, group, from)?;
                let start = subscription::start_offset(&t, &target)?;
                Ok((target, start))
            })
            .await?;
        let max_in_flight = match s.max_in_flight {
            0 => DEFAULT_MAX_IN_FLIGHT,
            n => n.min(CAP_MAX_IN_FLIGHT),
        } as usize;
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let reply = response(
            request_id,
            Reply::Subscribe(pb::SubscribeResponse {
                subscription_id: id,
            }),
        );
        self.out
            .send(reply)
            .await
            .map_err(|_| status::error(pb::Code::Cancelled, "connection closed"))?;
        let sub = subscription::start(
            id,
            Arc::clone(&broker),
            runtime,
            subscription::Reader {
                target,
                position: start,
                member: s.member,
            },
            max_in_flight,
            self.out.clone(),
        );
        self.subscriptions().insert(id, (sub, max_in_flight));
        Ok(())
    }

    async fn dispatch(&self, request: Request) -> Result<Reply, pb::Error> {
        let broker = Arc::clone(&self.broker);
        let config = &broker.config;
        match request {
            Request::Hello(_) => Err(status::error(
                pb::Code::FailedPrecondition,
                "Hello was already received",
            )),
            Request::Ping(p) => Ok(Reply::Ping(pb::PingResponse { nonce: p.nonce })),
            Request::Produce(p) => {
                if p.messages.is_empty() {
                    return Err(invalid(format!(
                        "produce to topic {}: messages is empty; send 1 to {} (max_batch_messages)",
                        p.topic, config.max_batch_messages
                    )));
                }
                if p.messages.len() > config.max_batch_messages as usize {
                    return Err(invalid(format!(
                        "produce to topic {}: {} messages in one batch; the limit is {} (max_batch_messages)",
                        p.topic,
                        p.messages.len(),
                        config.max_batch_messages
                    )));
                }
                let batch: Vec<_> = p.messages.into_iter().map(convert::new_message).collect();
                // A message must also fit in the frame that delivers it.
                let (limit, name) = broker.message_limit();
                for (i, m) in batch.iter().enumerate() {
                    let Some(size) = record::encoded_len(m).map(|l| l - record::HEADER_LEN) else {
                        return Err(invalid(format!(
                            "produce to topic {}: message {i} cannot be stored: more than 65 535 headers, \
                             a header name over 65 535 bytes, or over 4 GiB of key, headers and value",
                            p.topic
                        )));
                    };
                    if size > limit as usize {
                        return Err(invalid(format!(
                            "produce to topic {}: message {i} has {size} bytes of key, headers and value; the limit is {limit} ({name})",
                            p.topic,
                        )));
                    }
                }
                let runtime = match broker.runtime(&p.topic, false) {
                    Ok(runtime) => runtime,
                    // Creating the topic makes folders and syncs them.
                    Err(crate::Error::NotFound(_)) => {
                        let topic = p.topic.clone();
                        self.blocking(move || broker.runtime(&topic, true)).await?
                    }
                    Err(e) => return Err(broker.wire(&e)),
                };
                let appended = runtime.produce(batch).await?;
                Ok(Reply::Produce(pb::ProduceResponse {
                    first_offset: appended.first.0,
                    last_offset: appended.last.0,
                    durability: convert::durability(appended.durability),
                }))
            }
            Request::Fetch(f) => self.fetch(f).await,
            Request::Subscribe(_) => Err(status::error(
                pb::Code::Internal,
                "subscribe is served by Conn::subscribe",
            )),
            Request::Unsubscribe(u) => match self.subscriptions().remove(&u.subscription_id) {
                Some((sub, _)) => {
                    sub.stop();
                    Ok(Reply::Ok(pb::Empty {}))
                }
                None => Err(status::error(
                    pb::Code::NotFound,
                    format!(
                        "subscription {} does not exist on this connection",
                        u.subscription_id
                    ),
                )),
            },
            Request::Ack(a) => {
                let n = a.offsets.len();
                if a.group.is_empty() {
                    // A replay subscription has no group: its acks only return credit.
                    if a.subscription_id.is_none() {
                        return Err(invalid(format!(
                            "ack on topic {}: name a group, or a subscription_id to return credit",
                            a.topic
                        )));
                    }
                    self.give_credit(a.subscription_id, n);
                    return Ok(Reply::Ok(pb::Empty {}));
                }
                let runtime = self.existing(&a.topic)?;
                let t = Arc::clone(runtime.topic());
                let (group, offsets) = (a.group.clone(), a.offsets);
                let credit_only = a.subscription_id.is_some();
                self.blocking(move || match t.describe_group(&group)?.mode {
                    crate::groups::GroupMode::Queue => t.ack(&group, &offsets),
                    crate::groups::GroupMode::Stream if credit_only => Ok(()),
                    crate::groups::GroupMode::Stream => {
                        Err(crate::Error::InvalidArgument(format!(
                            "group {group} of topic {} is a stream group: commit offsets instead",
                            t.name()
                        )))
                    }
                })
                .await?;
                self.give_credit(a.subscription_id, n);
                Ok(Reply::Ok(pb::Empty {}))
            }
            Request::Nack(n) => {
                let count = n.offsets.len();
                let runtime = self.existing(&n.topic)?;
                let t = Arc::clone(runtime.topic());
                let requeued = self
                    .blocking(move || t.nack(&n.group, &n.offsets, n.delay_ms))
                    .await?;
                self.give_credit(n.subscription_id, count);
                runtime.notify();
                Ok(Reply::Nack(pb::NackResponse {
                    requeued: requeued as u32,
                }))
            }
            Request::Commit(c) => {
                let runtime = self.existing(&c.topic)?;
                let t = Arc::clone(runtime.topic());
                self.blocking(move || t.commit(&c.group, c.offset)).await?;
                Ok(Reply::Ok(pb::Empty {}))
            }
            Request::Seek(s) => {
                let runtime = self.existing(&s.topic)?;
                let t = Arc::clone(runtime.topic());
                let to = convert::position(s.to, Position::Earliest);
                let offset = self.blocking(move || t.seek(&s.group, to)).await?;
                runtime.notify();
                Ok(Reply::Seek(pb::SeekResponse { offset }))
            }
            Request::Delete(d) => {
                let runtime = self.existing(&d.topic)?;
                let t = Arc::clone(runtime.topic());
                self.blocking(move || t.delete(&d.offsets)).await?;
                Ok(Reply::Ok(pb::Empty {}))
            }
            Request::CreateTopic(c) => {
                let config = convert::topic_config(c.config, &config.topic_defaults)
                    .map_err(|e| broker.wire(&e))?;
                let b = Arc::clone(&broker);
                let topic = self
                    .blocking(move || b.registry.create_topic(&c.name, config))
                    .await?;
                let info = broker.topic_info(&topic);
                broker.runtime_of(topic);
                Ok(Reply::Topic(info))
            }
            Request::ListTopics(_) => {
                let topics = broker
                    .registry
                    .topics()
                    .iter()
                    .map(|t| broker.topic_info(t))
                    .collect();
                Ok(Reply::Topics(pb::ListTopicsResponse { topics }))
            }
            Request::DescribeTopic(d) => {
                let t = broker
                    .registry
                    .topic(&d.name)
                    .map_err(|e| broker.wire(&e))?;
                Ok(Reply::Topic(broker.topic_info(&t)))
            }
            Request::DeleteTopic(d) => {
                let b = Arc::clone(&broker);
                let name = d.name.clone();
                let topic = self
                    .blocking(move || b.registry.delete_topic(&name))
                    .await?;
                broker.retire_runtime(&topic);
                Ok(Reply::Ok(pb::Empty {}))
            }
            Request::CreateGroup(c) => {
                let mode = convert::group_mode(c.mode).map_err(|e| broker.wire(&e))?;
                let runtime = self.existing(&c.topic)?;
                let t = Arc::clone(runtime.topic());
                let start = convert::position(c.start, Position::Earliest);
                let info = self
                    .blocking(move || t.create_group(&c.group, mode, start))
                    .await?;
                Ok(Reply::Group(convert::group_info(&c.topic, info)))
            }
            Request::ListGroups(l) => {
                let runtime = self.existing(&l.topic)?;
                let t = Arc::clone(runtime.topic());
                let groups = self.blocking(move || t.list_groups()).await?;
                Ok(Reply::Groups(pb::ListGroupsResponse {
                    groups: groups
                        .into_iter()
                        .map(|g| convert::group_info(&l.topic, g))
                        .collect(),
                }))
            }
            Request::DescribeGroup(d) => {
                let runtime = self.existing(&d.topic)?;
                let t = Arc::clone(runtime.topic());
                let group = d.group.clone();
                let info = self.blocking(move || t.describe_group(&group)).await?;
                Ok(Reply::Group(convert::group_info(&d.topic, info)))
            }
            Request::DeleteGroup(d) => {
                let runtime = self.existing(&d.topic)?;
                let t = Arc::clone(runtime.topic());
                self.blocking(move || t.delete_group(&d.group)).await?;
                Ok(Reply::Ok(pb::Empty {}))
            }
            Request::Compact(c) => {
                // Produce and consume go on meanwhile: compaction touches sealed
                // segments only and swaps each one in under the writer's lock.
                let b = Arc::clone(&broker);
                let results = self
                    .blocking(move || b.registry.compact(c.topic.as_deref(), &mut |_| {}))
                    .await?;
                Ok(Reply::Compact(pb::CompactResponse {
                    topics: results
                        .iter()
                        .map(|(t, s)| convert::compaction(t, s))
                        .collect(),
                }))
            }
        }
    }

    /// The runtime of an existing topic. A read of the registry's map (and of
    /// the runtimes' map) under short locks: cheaper inline than a hand-off to
    /// the blocking pool and back.
    fn existing(&self, topic: &str) -> Result<Arc<super::runtime::TopicRuntime>, pb::Error> {
        self.broker
            .runtime(topic, false)
            .map_err(|e| self.broker.wire(&e))
    }

    async fn fetch(&self, f: pb::FetchRequest) -> Result<Reply, pb::Error> {
        let runtime = self.existing(&f.topic)?;
        let topic = Arc::clone(runtime.topic());
        let max = match f.max_messages {
            0 => DEFAULT_MAX_MESSAGES,
            n => n.min(CAP_MAX_MESSAGES),
        } as usize;
        let limits = self.broker.delivery_limits(
            max,
            match f.max_bytes {
                0 => DEFAULT_MAX_BYTES,
                n => n,
            },
        );
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(f.wait_ms.min(CAP_WAIT_MS)));
        // Taken before the first read, so an append after it wakes the long-poll.
        let mut changes = runtime.subscribe_changes();
        let member = f.member;
        let (t, b, m) = (Arc::clone(&topic), Arc::clone(&self.broker), member.clone());
        let (group, from) = (f.group, f.from);
        // Target, start and first read in one hand-off: each may wait on group
        // state or the disk.
        let (target, start, mut messages) = self
            .blocking(move || {
                let target = subscription::target(&t, group, from)?;
                // A stream-group fetch continues from `from` when the client names
                // it (its own position), else from the group's committed offset.
                let start = match (&target, from) {
                    (Target::Stream(_), Some(p)) => {
                        t.resolve(convert::position(Some(p), Position::Earliest))?
                    }
                    _ => subscription::start_offset(&t, &target)?,
                };
                let messages = subscription::fetch(&b, &t, &target, &m, start, limits)?;
                Ok((target, start, messages))
            })
            .await?;
        let queue = matches!(target, Target::Queue(_));
        let lease_poll = Duration::from_millis(topic.config().ack_timeout_ms.clamp(10, 1000));
        let mut over = false;
        loop {
            if over || !messages.is_empty() || tokio::time::Instant::now() >= deadline {
                let next_offset = messages.last().map_or(start, |m| m.offset + 1);
                return Ok(Reply::Fetch(pb::FetchResponse {
                    messages,
                    next_offset,
                    end_offset: topic.stats().end.0,
                }));
            }
            tokio::select! {
                // The connection is closing (peer gone, a limit, shutdown).
                reason = self.closed() => match reason {
                    Some(error) => return Err(error),
                    None => {
                        over = true;
                        continue;
                    }
                },
                changed = changes.changed() => if changed.is_err() { return Err(status::error(pb::Code::Unavailable, "topic closed")) },
                _ = tokio::time::sleep_until(deadline) => {}
                _ = tokio::time::sleep(lease_poll), if queue => {}
            }
            changes.borrow_and_update();
            let (t, b, target, m) = (
                Arc::clone(&topic),
                Arc::clone(&self.broker),
                target.clone(),
                member.clone(),
            );
            messages = self
                .blocking(move || subscription::fetch(&b, &t, &target, &m, start, limits))
                .await?;
        }
    }
}
