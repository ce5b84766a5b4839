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

use super::admission::Limit;
use super::deadline::{FrameReader, ReadError, StallGuard};
use super::handlers;
use super::outgoing::{FINAL_FRAMES_WAIT, Outgoing};
use super::stopping;
use super::{Shared, sleep_until};
use crate::broker::Credit;
use crate::protocol::codec::{FrameCodec, FrameError};
use crate::protocol::outbound::Outbound;
use crate::protocol::pb::client_frame::Request;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::request::ClientIn;
use crate::protocol::{PROTOCOL_VERSION, pb, status};
use crate::security::access::Guarded as _;
use crate::security::auth::Principal;
use crate::security::{access, tls};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Requests served at once per connection; the connection reads no further
/// frame until one finishes (so a client that pipelines without reading its
/// replies holds a bounded amount of them).
const MAX_REQUESTS_IN_FLIGHT: usize = 256;
/// Bytes of request frames served at once per connection: past them the
/// connection reads no further frame until some finish (one frame may take
/// it past, so a frame of any size allowed is served).
const MAX_REQUEST_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Longest a refusal waits for the socket to take its one frame.
const REFUSAL_WRITE_WAIT: Duration = Duration::from_secs(1);

/// How long after the idle time runs out a connection is looked at again
/// before it is closed as idle (frames may wait unread in its socket).
const IDLE_RECHECK: Duration = Duration::from_millis(50);

type ServerCodec = FrameCodec<ClientIn, Outbound>;

/// The label of this transport's metrics.
pub(super) const LISTENER: &str = "native";

pub(super) fn response(request_id: u64, result: Reply) -> pb::ServerFrame {
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
/// larger stored message ([`crate::protocol::convert::delivery_limits`]); this is the last
/// guard, for envelopes larger than planned.
fn within_frame_limit(request_id: u64, frame: Outbound, max: u32) -> Outbound {
    let len = prost::Message::encoded_len(&frame);
    if len <= max as usize {
        return frame;
    }
    let what = match &frame {
        Outbound::Fetch { messages, .. } => match messages.first_offset() {
            Some(offset) => format!("the message at offset {offset}"),
            None => "the reply".to_string(),
        },
        _ => "the reply".to_string(),
    };
    error_frame(request_id, status::reply_too_large(&what, len, max)).into()
}

fn frame_error(e: &FrameError) -> Option<pb::Error> {
    match e {
        FrameError::TooLarge { .. } | FrameError::TooHeavy(_) => {
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
fn read_error(shared: &Shared, peer: SocketAddr, e: &ReadError) -> Option<pb::Error> {
    match e {
        ReadError::Frame(e) => {
            tracing::debug!(%peer, error = %e, "closing connection on a bad frame");
            frame_error(e)
        }
        ReadError::FrameTimeout(limit) => {
            shared.admission.count(Limit::Frame);
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

/// Answers a connection that gets no slot with one error frame and closes
/// it as any connection is closed: its side shut (with TLS, a
/// `close_notify`), then what the client still sends (its `Hello`, requests
/// sent right behind it) read and dropped until it closes, so the refusal
/// is not lost to a reset.
pub(super) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    max_frame_bytes: u32,
    error: pb::Error,
) {
    tracing::debug!(%peer, error = %error.message, "connection refused");
    let mut framed = FramedWrite::new(stream, ServerCodec::new(max_frame_bytes));
    let told = async {
        framed.send(Outbound::from(error_frame(0, error))).await?;
        framed.close().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(REFUSAL_WRITE_WAIT, told).await {
        discard_until_closed(framed.into_inner()).await;
    }
}

/// Serves one connection until the client leaves, a frame is unreadable, a
/// limit closes it, or the server shuts down (in-flight requests are
/// finished first).
pub(super) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let config = &shared.config;
    let (read, write) = tokio::io::split(stream);
    let mut frames = FrameReader::new(
        FramedRead::new(read, ServerCodec::new(config.max_frame_bytes)),
        config.frame_timeout,
    );
    let sink = FramedWrite::new(
        StallGuard::new(write, config.write_timeout),
        ServerCodec::new(config.max_frame_bytes),
    );
    let b = Arc::clone(&shared);
    let (out, writer) = Outgoing::start(sink, peer, move || b.admission.count(Limit::Write));

    let principal = match handshake(&shared, peer, &mut frames, &mut shutdown).await {
        Ok((welcome, principal)) => {
            let _ = out
                .send(pb::ServerFrame {
                    kind: Some(pb::server_frame::Kind::Welcome(welcome)),
                })
                .await;
            principal
        }
        Err(refusal) => {
            if let Some((id, err)) = refusal {
                tracing::debug!(%peer, error = %err.message, "handshake refused");
                let _ =
                    tokio::time::timeout(FINAL_FRAMES_WAIT, out.send(error_frame(id, err))).await;
            }
            drop(out);
            let _ = writer.await;
            discard_until_closed(frames.into_inner()).await;
            return;
        }
    };

    let (closing, _) = watch::channel(Closing::Open);
    let conn = Arc::new(Conn {
        shared: Arc::clone(&shared),
        principal,
        out: out.clone(),
        subscriptions: Mutex::new(HashMap::new()),
        reserved: AtomicUsize::new(0),
        next_subscription: AtomicU64::new(1),
        closing,
        working: Arc::new(AtomicUsize::new(0)),
        revoked: Arc::new(watch::channel(None).0),
    });
    let mut revoked = conn.revoked.subscribe();
    let idle = shared.config.idle_timeout;
    let mut last_frame = Instant::now();
    // Bytes of a frame in progress at the last idle check.
    let mut frame_seen = 0;
    // Set when the idle time ran out and the loop goes round once more to
    // read what waits in the socket, until then: frames sent while the
    // broker itself could not read (a stopped or starved process) are no
    // idleness.
    let mut idle_recheck: Option<Instant> = None;
    let mut in_flight = tokio::task::JoinSet::new();
    // Bytes of the frames of the requests in `in_flight`.
    let bytes_in_flight = Arc::new(AtomicUsize::new(0));
    let at_cap = |in_flight: &tokio::task::JoinSet<()>| {
        in_flight.len() >= MAX_REQUESTS_IN_FLIGHT
            || bytes_in_flight.load(Ordering::Relaxed) >= MAX_REQUEST_BYTES_IN_FLIGHT
    };
    // Why the connection ends: the error the client gets, if it can get one.
    let reason: Option<pb::Error> = loop {
        tokio::select! {
            frame = frames.next(), if !at_cap(&in_flight) => match frame {
                Some(Ok(frame)) => {
                    last_frame = Instant::now();
                    idle_recheck = None;
                    let weight = frames.decoder().last_len();
                    bytes_in_flight.fetch_add(weight, Ordering::Relaxed);
                    let weighed = InFlightBytes(Arc::clone(&bytes_in_flight), weight);
                    // A long-poll waits for the topic, not for the broker:
                    // the connection is idle meanwhile.
                    let waits = matches!(
                        &frame,
                        ClientIn::Frame(pb::ClientFrame { request: Some(Request::Fetch(f)), .. }) if f.wait_ms > 0
                    );
                    let busy = (!waits).then(|| Busy::new(&conn.working));
                    let conn = Arc::clone(&conn);
                    in_flight.spawn(async move {
                        let _busy = busy;
                        let _weighed = weighed;
                        if let Some(reply) = conn.handle(frame).await {
                            let _ = conn.out.send(reply).await;
                        }
                    });
                }
                Some(Err(e)) => break read_error(&shared, peer, &e),
                None => {
                    tracing::debug!(%peer, "peer closed the connection");
                    break None;
                }
            },
            _ = stopping(&mut shutdown) => break Some(stopping_error()),
            // The writer stopped on a failed write: no reply can reach the client.
            _ = out.closed() => break None,
            // A reload removed or replaced the connection's token.
            Ok(()) = revoked.changed() => break revoked.borrow().clone(),
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = sleep_until(idle_recheck.or(idle.map(|t| last_frame + t))) => {
                // A request being served, or a frame arriving while the
                // frame timeout governs that, is not idleness; nor is a
                // client whose frames wait unread because its requests in
                // flight are at the cap (long-polls, each ending within 60
                // s). Without a frame timeout, a frame begun is idleness
                // once no byte of it came for the idle time: nothing else
                // would close it.
                let buffered = frames.frame_bytes();
                let arriving = buffered > 0
                    && (shared.config.frame_timeout.is_some() || buffered != frame_seen);
                frame_seen = buffered;
                if conn.working.load(Ordering::Relaxed) > 0 || arriving || at_cap(&in_flight) {
                    last_frame = Instant::now();
                    idle_recheck = None;
                    continue;
                }
                // Once more round the loop, the timer a moment ahead, so a
                // frame already in the socket is read before anything is
                // decided (branches ready together are taken in any order).
                if idle_recheck.is_none() {
                    idle_recheck = Some(Instant::now() + IDLE_RECHECK);
                    continue;
                }
                shared.admission.count(Limit::Idle);
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
    let unread = frames.into_inner();
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
    discard_until_closed(unread).await;
}

/// Reads and drops what the client still sends, once the last frame is out
/// and the server's side is shut, until the client closes or
/// [`FINAL_FRAMES_WAIT`] passes. Closing a socket with bytes unread resets
/// the connection, and a reset can make the client's system drop the
/// replies it has received but not yet read (a client that pipelines
/// requests always has some on their way when a stop closes it).
async fn discard_until_closed<R: AsyncRead + Unpin>(mut read: R) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + FINAL_FRAMES_WAIT;
    let mut scratch = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, read.read(&mut scratch)).await {
        if n == 0 {
            break;
        }
    }
}

/// A request's share of its connection's request bytes in flight, given
/// back when the request is done.
struct InFlightBytes(Arc<AtomicUsize>, usize);

impl Drop for InFlightBytes {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Reads the `Hello`, authenticates its token and builds the `Welcome`;
/// `Err(Some(..))` refuses with that error, `Err(None)` closes without a
/// word.
async fn handshake<R>(
    shared: &Shared,
    peer: SocketAddr,
    frames: &mut FrameReader<R, ServerCodec>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(pb::Welcome, Principal), Option<(u64, pb::Error)>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let config = &shared.config;
    let deadline = config.frame_timeout.map(|t| Instant::now() + t);
    let first = tokio::select! {
        first = frames.next() => first,
        _ = sleep_until(deadline) => {
            shared.admission.count(Limit::Frame);
            let ms = config.frame_timeout.map_or(0, |t| t.as_millis());
            return Err(Some((
                0,
                status::error(pb::Code::DeadlineExceeded, format!("no Hello within {ms} ms (frame_timeout_ms)")),
            )));
        }
        _ = stopping(shutdown) => return Err(None),
    };
    match first {
        Some(Ok(ClientIn::Frame(pb::ClientFrame {
            request_id,
            request: Some(Request::Hello(h)),
        }))) => {
            // Counted as a request (`hello`), refused or not.
            let started = Instant::now();
            let answer = (|| {
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
                let principal = match shared.config.security.auth.authenticate(h.token.as_deref()) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(%peer, client = %h.client_name.escape_debug(), error = %e, "connection refused: not authenticated");
                        return Err(Some((request_id, shared.wire(&e))));
                    }
                };
                tracing::debug!(%peer, client = %h.client_name.escape_debug(), token = principal.name().unwrap_or("-"), "connected");
                let welcome = pb::Welcome {
                    server_version: env!("CARGO_PKG_VERSION").into(),
                    protocol_version: PROTOCOL_VERSION,
                    max_frame_bytes: config.max_frame_bytes,
                    max_message_bytes: shared.message_limit().bytes,
                    max_batch_messages: config.max_batch_messages,
                    max_subscriptions: config.max_subscriptions,
                    idle_timeout_ms: config
                        .idle_timeout
                        .map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
                };
                Ok((welcome, principal))
            })();
            let code = match &answer {
                Ok(_) => 0,
                Err(refusal) => refusal.as_ref().map_or(0, |(_, e)| e.code),
            };
            shared
                .broker
                .metrics()
                .request(LISTENER, "hello", code, started.elapsed());
            answer
        }
        Some(Ok(frame)) => Err(Some((
            frame.request_id(),
            status::error(
                pb::Code::FailedPrecondition,
                "the first frame of a connection must be Hello",
            ),
        ))),
        Some(Err(ReadError::Frame(FrameError::BadFlags(first)))) if tls::is_tls_start(first) => {
            tls::log_tls_client(peer, "native");
            Err(None)
        }
        Some(Err(e)) => Err(read_error(shared, peer, &e).map(|err| (0, err))),
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

/// A subscription being pushed to the client.
#[derive(Debug)]
pub(super) struct Pushing {
    /// Returns credit as the client acknowledges.
    pub(super) credit: Credit,
    /// The task pushing its deliveries.
    pub(super) task: JoinHandle<()>,
    /// Whether its `SubscribeResponse` is queued. Until then a close leaves
    /// its last `Delivery` to the subscribe handler, which queues it after
    /// the reply.
    pub(super) replied: bool,
}

/// A subscription slot taken while a subscribe is under way, so requests
/// in flight together cannot pass `max_subscriptions` (given back when
/// dropped, or taken up by [`Conn::start_subscription`]).
pub(super) struct Reservation<'a>(&'a AtomicUsize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-connection state.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    /// Who the client authenticated as: asked before every request.
    pub(super) principal: Principal,
    pub(super) out: Outgoing,
    subscriptions: Mutex<HashMap<u64, Pushing>>,
    /// Subscribes under way (see [`Reservation`]); changed under the
    /// subscriptions' lock.
    reserved: AtomicUsize,
    pub(super) next_subscription: AtomicU64,
    /// Set when the connection is closing: long-polls stop waiting.
    closing: watch::Sender<Closing>,
    /// Set when a request finds the connection's token gone (an auth file
    /// reload removed or replaced it): the connection closes with it.
    revoked: Arc<watch::Sender<Option<pb::Error>>>,
    /// Requests being served, other than long-polls waiting for messages.
    working: Arc<AtomicUsize>,
}

/// Closes a connection whose token is found gone, from a task of its own
/// (a subscription asking before each delivery).
pub(super) struct Revoker {
    revoked: Arc<watch::Sender<Option<pb::Error>>>,
    principal: Principal,
}

impl Revoker {
    /// Closes the connection with `error`, which says its token is gone.
    pub(super) fn revoke(&self, error: &pb::Error) {
        tracing::info!(
            token = self.principal.name().unwrap_or("-"),
            "closing a connection whose token was removed or replaced"
        );
        self.revoked.send_replace(Some(error.clone()));
    }
}

impl Conn {
    /// The error a request refused with `e` answers; a token gone (an auth
    /// file reload removed or replaced it) also closes the connection.
    pub(super) fn refusal(&self, e: &crate::Error) -> pb::Error {
        let error = self.shared.wire(e);
        if matches!(e, crate::Error::Unauthenticated(_)) {
            self.revoker().revoke(&error);
        }
        error
    }

    /// What closes the connection when a token it used is found gone.
    pub(super) fn revoker(&self) -> Revoker {
        Revoker {
            revoked: Arc::clone(&self.revoked),
            principal: self.principal.clone(),
        }
    }
    pub(super) fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pushing>> {
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a subscription slot for a subscribe under way; `Err` with the
    /// number of live and reserved ones when `max` are taken.
    pub(super) fn reserve_subscription(&self, max: usize) -> Result<Reservation<'_>, usize> {
        let subscriptions = self.subscriptions();
        let taken = subscriptions.len() + self.reserved.load(Ordering::Relaxed);
        if taken >= max {
            return Err(taken);
        }
        self.reserved.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation(&self.reserved))
    }

    /// Registers subscription `id` in the slot `reservation` held.
    pub(super) fn start_subscription(
        &self,
        id: u64,
        pushing: Pushing,
        reservation: Reservation<'_>,
    ) {
        let mut subscriptions = self.subscriptions();
        subscriptions.insert(id, pushing);
        drop(reservation);
    }

    /// Marks subscription `id` as answered; false when a close took it
    /// first (its last `Delivery` is then the caller's to queue).
    pub(super) fn replied(&self, id: u64) -> bool {
        match self.subscriptions().get_mut(&id) {
            Some(pushing) => {
                pushing.replied = true;
                true
            }
            None => false,
        }
    }

    /// Ends waiting long-polls and every subscription: with `reason` when the
    /// client can still hear it (subscriptions get a last `Delivery` with it,
    /// queued by `deadline` or not at all), silently when the peer is gone.
    /// A subscription that already ended itself (its task queued its last
    /// `Delivery`) gets no second one, nor one not answered yet (its
    /// subscribe handler queues it after the reply).
    async fn close(&self, reason: Option<pb::Error>, deadline: Instant) {
        self.closing.send_replace(match &reason {
            Some(error) => Closing::With(error.clone()),
            None => Closing::PeerGone,
        });
        let subscriptions: Vec<_> = self.subscriptions().drain().collect();
        for (id, pushing) in subscriptions {
            // Once the task is over, a frame queued is the subscription's last.
            pushing.task.abort();
            let ended_itself = pushing.task.await.is_ok();
            if let Some(error) = &reason
                && pushing.replied
                && !ended_itself
            {
                let last = handlers::fetch::ended(id, error.clone());
                let _ = tokio::time::timeout_at(deadline, self.out.send(last)).await;
            }
        }
    }

    /// Resolves once the connection closes.
    pub(super) async fn closed(&self) {
        let mut closing = self.closing.subscribe();
        let _ = closing.wait_for(|c| !matches!(c, Closing::Open)).await;
    }

    /// The error a long-poll answers once the connection closes: `None`
    /// while open and when the peer is gone (a half-closed peer may still
    /// read the answer: the long-poll ends as if its wait was over).
    pub(super) fn closing_error(&self) -> Option<pb::Error> {
        match &*self.closing.borrow() {
            Closing::With(error) => Some(error.clone()),
            _ => None,
        }
    }

    /// Returns `n` credits to subscription `subscription` of this
    /// connection, if it names one that is running.
    pub(super) fn give_credit(&self, subscription: Option<u64>, n: usize) {
        if let Some(id) = subscription
            && let Some(pushing) = self.subscriptions().get(&id)
        {
            pushing.credit.give(n);
        }
    }

    /// Serves one request; `None` when the reply was already queued. Every
    /// request is counted here, with its operation, status code and time.
    async fn handle(&self, frame: ClientIn) -> Option<Outbound> {
        let id = frame.request_id();
        let started = std::time::Instant::now();
        let (operation, access) = match &frame {
            ClientIn::Frame(f) => (
                f.request.as_ref().map_or("unknown", handlers::operation),
                f.request.as_ref().map(access::of),
            ),
            ClientIn::Produce(p) => ("produce", Some(p.access())),
        };
        if let Some(access) = access
            && let Err(e) = self.principal.allow(access)
        {
            let error = self.refusal(&e);
            self.shared.broker.metrics().request(
                LISTENER,
                operation,
                error.code,
                started.elapsed(),
            );
            return Some(error_frame(id, error).into());
        }
        let result = match frame {
            ClientIn::Produce(p) => handlers::produce::produce(self, p)
                .await
                .map(|reply| Some(response(id, reply).into())),
            ClientIn::Frame(pb::ClientFrame {
                request: Some(Request::Subscribe(s)),
                ..
            }) => handlers::fetch::subscribe(self, id, s).await.map(|()| None),
            ClientIn::Frame(pb::ClientFrame {
                request: Some(Request::Fetch(f)),
                ..
            }) => handlers::fetch::fetch(self, id, f).await.map(Some),
            ClientIn::Frame(pb::ClientFrame {
                request: Some(request),
                ..
            }) => handlers::dispatch(self, request)
                .await
                .map(|reply| Some(response(id, reply).into())),
            ClientIn::Frame(pb::ClientFrame { request: None, .. }) => Err(status::error(
                pb::Code::Unimplemented,
                "unknown request type: this server does not know the request field sent",
            )),
        };
        let code = result.as_ref().map_or_else(|e| e.code, |_| 0);
        self.shared
            .broker
            .metrics()
            .request(LISTENER, operation, code, started.elapsed());
        // A subscription's answer is already queued.
        let frame = match result.transpose()? {
            Ok(frame) => frame,
            Err(error) => error_frame(id, error).into(),
        };
        Some(within_frame_limit(
            id,
            frame,
            self.shared.config.max_frame_bytes,
        ))
    }
}
