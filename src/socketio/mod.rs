//! The socket.io transport: Engine.IO v4 (polling and websocket, from
//! `engineioxide`) on an HTTP/1.1 listener, with spool's own Socket.IO v5
//! packet layer on top, over the same [`Broker`] as the other transports.
//! A room is a topic; a socket's position in its rooms travels in the
//! socket.io recovery offset, so a reconnecting client gets every message
//! it missed, whatever happened to the broker meanwhile.
//!
//! - `packet`: the Socket.IO v5 packet codec (with binary attachments).
//! - `codec`: client requests and replies, and stored messages as events.
//! - `offset`: the sealed recovery token and the key that seals it.
//! - `session`: one socket, its rooms and queue groups.
//! - `guard`: the token a socket presents in its CONNECT packet, and what
//!   each event needs of it (see [`crate::security`]).
//! - `page`: the demo page and the socket.io client it loads.
//!
//! The listener takes the server's [`Security`] like every other: TLS
//! (https and wss) when the server has a certificate, and a token per
//! socket when it has an auth file, checked before every event and every
//! push. The gateway holds no broker rule; what it keeps in memory (who is
//! in which room, for presence events) is lost on a restart by design.

mod codec;
mod guard;
pub(crate) mod offset;
mod packet;
mod page;
mod session;

use crate::broker::{Broker, DeliveryLimits, MessageLimit, TopicEvent};
use crate::error::{Error, Result};
use crate::security::Security;
use crate::security::auth::Auth;
use crate::security::tls;
use crate::server::admission::Ticket;
use crate::server::admission::{Admission, Limit};
use crate::server::deadline::StallGuard;
use crate::server::{sleep_until, stopping};
use engineioxide::config::EngineIoConfig;
use engineioxide::handler::EngineIoHandler;
use engineioxide::service::EngineIoService;
use engineioxide::{DisconnectReason, Socket, Str, TransportType};
use serde_json::Value;
use session::{EioSocket, Inbound, Session};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio_util::task::TaskTracker;

/// Default socket.io listen address of `spool serve`.
pub const DEFAULT_SOCKETIO_LISTEN: &str = "127.0.0.1:7413";

/// The listener's name in metrics and logs.
const LISTENER: &str = "socketio";

/// The system room: its members receive `create-room` and `delete-room`.
pub const SYSTEM_ROOM: &str = "$rooms";

/// The Engine.IO path (socket.io's standard one).
const PATH: &str = "/socket.io";

/// Packets a socket's send buffer holds before emits wait.
const SEND_BUFFER: usize = 1024;

/// Bytes a websocket reads at once: clients send little (requests and
/// acks), and the buffer is held by every idle connection.
const WS_READ_BUFFER: usize = 512;

/// What the transport needs from the server's settings.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The server's connection slots, shared with the other listeners.
    pub(crate) admission: Arc<Admission>,
    /// Most rooms and queue groups one socket reads.
    pub(crate) max_subscriptions: u32,
    /// Largest message a produce takes (the broker's limit).
    pub(crate) message_limit: MessageLimit,
    /// Longest the first byte (and, with TLS, the handshake) may take to
    /// arrive once a connection is accepted (the server's `frame_timeout`).
    pub(crate) frame_timeout: Option<Duration>,
    /// Longest a write may wait without the peer taking a byte (the
    /// server's `write_timeout`): HTTP responses and websocket frames alike.
    pub(crate) write_timeout: Option<Duration>,
    /// The server's `shutdown_timeout`: the longest a stop waits for the
    /// sockets to answer what they received before it.
    pub(crate) shutdown_timeout: Duration,
}

/// The gateway: the Engine.IO handler every socket shares.
#[derive(Debug)]
pub(crate) struct Gateway {
    broker: Broker,
    /// The tokens sockets present (off without an auth file).
    auth: Auth,
    key: offset::Key,
    message_limit: MessageLimit,
    max_subscriptions: usize,
    /// Room to the sockets in it (for `join-room` and `leave-room`).
    members: Mutex<HashMap<String, HashMap<String, session::Out>>>,
    /// Sockets in the system room.
    watchers: Mutex<HashMap<String, session::Out>>,
    /// Every open socket, to close them when the server stops.
    sockets: std::sync::Mutex<HashMap<String, EioSocket>>,
    /// The sockets' tasks.
    tasks: TaskTracker,
    /// Set when the server begins to stop: a socket opened after that is
    /// closed at once.
    stopping: std::sync::atomic::AtomicBool,
    /// Longest a socket may stay open without a CONNECT the broker took
    /// (the server's `frame_timeout`), and the tally such closes count in.
    connect_timeout: Option<Duration>,
    admission: Arc<Admission>,
    /// Room to its feed: one subscription from which every socket reading
    /// the room live takes each message, encoded once.
    feeds: Mutex<HashMap<String, Feed>>,
}

/// Hand-outs a room's feed keeps for sockets that fall behind before they
/// go back to reading for themselves. Each holds at most one read (64
/// messages or 1 MiB), so a socket stalled behind a busy room keeps at most
/// this many MiB of it in memory.
const FEED_BUFFER: usize = 256;
/// Least time between two hand-outs of a room's feed that keeps up: a
/// message that comes within this of the last hand-out waits for the next
/// one, with whatever else came meanwhile, so a busy room costs one
/// wake-up, one lock and one websocket write per socket per hand-out rather
/// than per message; a message after a quiet spell goes out at once, and a
/// read that came back full (more waiting) is followed by the next at once.
pub(super) const FEED_LINGER: Duration = Duration::from_millis(40);
/// How often feeds nobody listens to are stopped.
const FEED_SWEEP: Duration = Duration::from_secs(10);

/// What a room's feed hands out at once: messages in offset order, each
/// encoded once for every socket.
pub(super) type Batch = Arc<Vec<codec::Encoded>>;

/// One room's shared subscription.
#[derive(Debug)]
struct Feed {
    tx: tokio::sync::broadcast::Sender<Batch>,
    task: tokio::task::AbortHandle,
}

impl Gateway {
    /// The sockets open now.
    fn open_sockets(&self) -> Vec<EioSocket> {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// When a socket opened (or left its namespace) now is closed unless a
    /// CONNECT has been taken by then (`None` without `frame_timeout`).
    fn connect_deadline(&self) -> Option<tokio::time::Instant> {
        self.connect_timeout
            .map(|t| tokio::time::Instant::now() + t)
    }

    fn message_limit(&self) -> MessageLimit {
        self.message_limit
    }

    fn delivery_limits(&self) -> DeliveryLimits {
        DeliveryLimits {
            messages: session::PUMP_BATCH,
            bytes: session::PUMP_BYTES,
            message_bytes: self.message_limit.bytes as usize,
        }
    }

    /// A receiver of every message appended to `room` from now on (the
    /// room's feed, started if there is none).
    async fn feed(&self, room: &str) -> Result<tokio::sync::broadcast::Receiver<Batch>> {
        let mut feeds = self.feeds.lock().await;
        if let Some(f) = feeds.get(room)
            && !f.task.is_finished()
        {
            return Ok(f.tx.subscribe());
        }
        let sub = self
            .broker
            .subscribe(crate::broker::SubscribeRequest {
                topic: room.to_owned(),
                group: None,
                from: Some(crate::broker::Position::Latest),
                member: String::new(),
                max_in_flight: session::PUMP_BATCH * 4,
                limits: self.delivery_limits(),
            })
            .await?;
        let (tx, rx) = tokio::sync::broadcast::channel(FEED_BUFFER);
        let task = tokio::spawn(run_feed(room.to_owned(), sub, tx.clone())).abort_handle();
        feeds.insert(room.to_owned(), Feed { tx, task });
        Ok(rx)
    }

    /// Stops the feeds nobody listens to, every [`FEED_SWEEP`].
    async fn sweep_feeds(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FEED_SWEEP) => {}
                _ = stopping(&mut shutdown) => break,
            }
            self.feeds.lock().await.retain(|_, f| {
                let keep = f.tx.receiver_count() > 0 && !f.task.is_finished();
                if !keep {
                    f.task.abort();
                }
                keep
            });
        }
        for (_, f) in self.feeds.lock().await.drain() {
            f.task.abort();
        }
    }

    /// Creates room `room` if it does not exist and the broker creates
    /// topics on first use.
    async fn ensure_room(&self, room: &str) -> Result<()> {
        match self.broker.describe_topic(room).await {
            Err(Error::TopicNotFound(_)) if self.broker.config().auto_create => {
                let defaults = self.broker.config().topic_defaults.clone();
                match self.broker.create_topic(room, defaults).await {
                    Ok(_) | Err(Error::AlreadyExists(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }

    /// `socket` joins `room`: every member (itself included) receives
    /// `join-room` with the room and the socket's id. A socket already in
    /// it (a subscribe that moves its position) joins nothing new.
    async fn join(&self, room: &str, socket: &session::Out) {
        let members = {
            let mut all = self.members.lock().await;
            let members = all.entry(room.to_owned()).or_default();
            if members.insert(socket.sid(), socket.clone()).is_some() {
                return;
            }
            members.values().cloned().collect::<Vec<_>>()
        };
        self.presence("join-room", room, socket, members).await;
    }

    /// `socket` leaves `room`: the members left, and the socket, receive
    /// `leave-room`.
    async fn leave(&self, room: &str, socket: &session::Out) {
        let members = {
            let mut all = self.members.lock().await;
            let Some(members) = all.get_mut(room) else {
                return;
            };
            if members.remove(&socket.sid()).is_none() {
                return;
            }
            let left = members.values().cloned().collect::<Vec<_>>();
            if members.is_empty() {
                all.remove(room);
            }
            left
        };
        let mut to = members;
        to.push(socket.clone());
        self.presence("leave-room", room, socket, to).await;
    }

    async fn presence(
        &self,
        event: &str,
        room: &str,
        socket: &session::Out,
        to: Vec<session::Out>,
    ) {
        let args = vec![Value::String(room.to_owned()), Value::String(socket.sid())];
        for member in to {
            member.post(event, args.clone());
        }
    }

    async fn watch_rooms(&self, socket: &session::Out) {
        self.watchers
            .lock()
            .await
            .insert(socket.sid(), socket.clone());
    }

    async fn unwatch_rooms(&self, socket: &session::Out) {
        self.watchers.lock().await.remove(&socket.sid());
    }

    /// Tells the system room's members of topics created and deleted.
    async fn relay_topic_events(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut events = self.broker.topic_events();
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = stopping(&mut shutdown) => return,
            };
            let (name, room) = match event {
                Ok(TopicEvent::Created(room)) => ("create-room", room),
                Ok(TopicEvent::Deleted(room)) => {
                    // The room's readers learn at once that it ended: its
                    // feed's last sender goes, and their receivers close.
                    if let Some(feed) = self.feeds.lock().await.remove(&room) {
                        feed.task.abort();
                    }
                    ("delete-room", room)
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "socket.io room events fell behind");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let watchers: Vec<session::Out> =
                self.watchers.lock().await.values().cloned().collect();
            for w in watchers {
                // Each watcher hears only of topics its token may see.
                // Asked without waiting: a watcher whose token is gone is
                // disconnected by its own task, not by this one.
                if w.may_see(&room) {
                    w.post(name, vec![Value::String(room.clone())]);
                }
            }
        }
    }
}

impl EngineIoHandler for Gateway {
    type Data = Session;

    fn on_connect(self: Arc<Self>, socket: Arc<Socket<Session>>) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            socket.close(DisconnectReason::ClosingServer);
            return;
        }
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(socket.id.to_string(), Arc::clone(&socket));
        session::start(self, socket);
    }

    fn on_disconnect(&self, socket: Arc<Socket<Session>>, reason: DisconnectReason) {
        tracing::debug!(sid = %socket.id, ?reason, "socket.io socket closed");
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&socket.id.to_string());
        socket.data.set_closed();
        socket.data.push(Inbound::Closed);
        // A long-poll waiting when Engine.IO closed the session itself (a
        // request over its size limit, a packet that did not parse) waits
        // for a packet nobody sends: its request holds the socket, and the
        // socket the only sender. A close packet answers it, so its
        // connection is not held for ever. (The session is gone from the
        // engine already: closing it again only sends the packet.)
        if socket.transport_type() == TransportType::Polling {
            socket.close(reason);
        }
    }

    fn on_message(self: &Arc<Self>, msg: Str, socket: Arc<Socket<Session>>) {
        if !socket.data.push(Inbound::Text(msg)) {
            socket.close(DisconnectReason::PacketParsingError);
        }
    }

    fn on_binary(self: &Arc<Self>, data: bytes::Bytes, socket: Arc<Socket<Session>>) {
        if !socket.data.push(Inbound::Binary(data)) {
            socket.close(DisconnectReason::PacketParsingError);
        }
    }
}

/// Reads `room` from its end and hands its messages, each encoded once, to
/// every socket listening, at most once per [`FEED_LINGER`] while it keeps
/// up, back to back while it does not; ends (closing the feed) when the
/// room is gone.
async fn run_feed(
    room: String,
    mut sub: crate::broker::Subscription,
    tx: tokio::sync::broadcast::Sender<Batch>,
) {
    let credit = sub.credit();
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = last {
            // What comes meanwhile is read at once below.
            tokio::time::sleep_until(at + FEED_LINGER).await;
        }
        let Some(event) = sub.next().await else {
            return;
        };
        match event {
            Ok(crate::broker::Event::Messages(deliveries)) => {
                let n = deliveries.len();
                let deliveries = deliveries.into_vec();
                // Measured as the read's byte limit measures them.
                let bytes: usize = deliveries
                    .iter()
                    .map(|d| crate::storage::record::stored_len(&d.message))
                    .sum();
                let batch: Vec<codec::Encoded> = deliveries
                    .iter()
                    .map(|d| codec::Encoded::new(&room, &d.message))
                    .collect();
                // No receiver now is no error: one may come.
                let _ = tx.send(Arc::new(batch));
                credit.give(n);
                // A full read means more is waiting: the next goes out at
                // once (lingering then would cap the room at one read per
                // FEED_LINGER, and a busy room's live readers would fall
                // behind for good); after a partial one, the next waits. A
                // read cut by its byte limit holds over a quarter of it
                // unless the next message alone is over three quarters;
                // taking a read of large messages for full only skips one
                // linger (the next read still waits for messages).
                let full = n >= session::PUMP_BATCH || bytes * 4 >= session::PUMP_BYTES;
                last = (!full).then(tokio::time::Instant::now);
            }
            Ok(crate::broker::Event::Skipped { .. }) => {}
            Err(e) => {
                tracing::debug!(room, error = %e, "socket.io room feed ended");
                return;
            }
        }
    }
}

/// A service that hands `S` each request with its head (URI and headers)
/// copied out of the connection's read buffer. hyper's parsed URI and
/// header values are slices of that buffer (8 KiB), and Engine.IO keeps a
/// socket's request head for the socket's life, which would keep the whole
/// buffer of every websocket connection.
///
/// It also carries the connection's peer address into each request (a
/// [`Peer`] extension), so a socket knows whom it serves.
#[derive(Debug, Clone)]
struct OwnHead<S> {
    inner: S,
    peer: Option<std::net::SocketAddr>,
}

/// The address of the peer whose request opened a socket (a request
/// extension).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);

impl<S, B> hyper::service::Service<hyper::Request<B>> for OwnHead<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: hyper::Request<B>) -> Self::Future {
        let mut request = own_head(request);
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(Peer(peer));
        }
        self.inner.call(request)
    }
}

/// A session id of the right form that no session has (ids are random
/// over 64^16).
const UNKNOWN_SID: &str = "----------------";

/// `uri`, with a `sid` that is no session id at all (the wrong length or
/// characters) replaced by [`UNKNOWN_SID`]: the Engine.IO library takes a
/// malformed one for none and opens a new session, where the protocol
/// answers 400 "Session ID unknown", as it does for any id it does not
/// know. The first `sid` is the one read, as the library reads it.
fn unknown_if_malformed_sid(uri: &str) -> std::borrow::Cow<'_, str> {
    let Some((path, query)) = uri.split_once('?') else {
        return uri.into();
    };
    let mut params: Vec<&str> = query.split('&').collect();
    let Some(sid) = params.iter_mut().find(|p| p.starts_with("sid=")) else {
        return uri.into();
    };
    let value = sid["sid=".len()..].split('=').next().unwrap_or_default();
    if value.parse::<engineioxide::sid::Sid>().is_ok() {
        return uri.into();
    }
    let unknown = format!("sid={UNKNOWN_SID}");
    *sid = &unknown;
    format!("{path}?{}", params.join("&")).into()
}

/// `request` with its URI and headers in allocations of their own.
fn own_head<B>(request: hyper::Request<B>) -> hyper::Request<B> {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = unknown_if_malformed_sid(&parts.uri.to_string()).parse::<hyper::Uri>() {
        parts.uri = uri;
    }
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let name = HeaderName::from_bytes(name.as_str().as_bytes());
        let copy = HeaderValue::from_bytes(value.as_bytes());
        if let (Ok(name), Ok(mut copy)) = (name, copy) {
            copy.set_sensitive(value.is_sensitive());
            headers.append(name, copy);
        }
    }
    parts.headers = headers;
    hyper::Request::from_parts(parts, body)
}

/// Whether a connection to the plaintext listener may go on to HTTP: not
/// when its first byte opens a TLS handshake (closed with one log line, as
/// on every listener), nor when no byte comes within `wait`.
async fn plaintext(
    stream: &tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    wait: Option<Duration>,
    timed_out: impl FnOnce(),
) -> bool {
    let mut first = [0u8; 1];
    let peeked = match wait {
        Some(wait) => match tokio::time::timeout(wait, stream.peek(&mut first)).await {
            Ok(r) => r,
            Err(_) => {
                timed_out();
                tracing::debug!(%peer, listener = LISTENER, "no first byte from the peer");
                return false;
            }
        },
        None => stream.peek(&mut first).await,
    };
    match peeked {
        Ok(1) if tls::is_tls_start(first[0]) => {
            tls::log_tls_client(peer, LISTENER);
            false
        }
        Ok(1) => true,
        Ok(_) => false,
        Err(e) => {
            tracing::debug!(%peer, listener = LISTENER, error = %e, "no first byte from the peer");
            false
        }
    }
}

/// Serves socket.io (and the demo page at `/`) on `listener` until
/// `shutdown` turns true; then closes every socket and waits for their
/// tasks, so no subscription outlives the transport. `security` gives the
/// listener its TLS and the sockets their tokens.
pub(crate) async fn serve(
    listener: TcpListener,
    key: offset::Key,
    broker: Broker,
    limits: Limits,
    security: Security,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let accepting = broker.clone();
    let tls = security.listener(LISTENER, &[tls::ALPN_HTTP1]);
    let gateway = Arc::new(Gateway {
        broker,
        auth: security.auth.clone(),
        key,
        message_limit: limits.message_limit,
        max_subscriptions: limits.max_subscriptions as usize,
        members: Mutex::new(HashMap::new()),
        watchers: Mutex::new(HashMap::new()),
        sockets: std::sync::Mutex::new(HashMap::new()),
        tasks: TaskTracker::new(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        connect_timeout: limits.frame_timeout,
        admission: Arc::clone(&limits.admission),
        feeds: Mutex::new(HashMap::new()),
    });
    // Binary data travels base64 over polling: a third larger.
    let max_payload = u64::from(limits.message_limit.bytes) / 3 * 4 + (64 << 10);
    let config = EngineIoConfig::builder()
        .req_path(PATH)
        .max_buffer_size(SEND_BUFFER)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .max_payload(max_payload)
        .build();
    let service = OwnHead {
        inner: EngineIoService::with_config_inner(page::Page, Arc::clone(&gateway), config),
        peer: None,
    };
    tokio::spawn(Arc::clone(&gateway).relay_topic_events(shutdown.clone()));
    tokio::spawn(Arc::clone(&gateway).sweep_feeds(shutdown.clone()));
    let mut signal = shutdown;
    limits.admission.listening(LISTENER);
    let connections = TaskTracker::new();
    // Once the stop begins: until when the sockets may take to answer what
    // they received before it (each closes CLOSE_GRACE after it has; the
    // server's stop waits for this listener no longer than
    // shutdown_timeout). The listener stays open meanwhile, so a polling
    // client can still fetch those answers (its next poll may need a new
    // connection); a socket opened meanwhile is closed at once.
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::server::accept(&listener, LISTENER, &accepting) => accepted,
            _ = stopping(&mut signal), if draining.is_none() => {
                gateway.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                for socket in gateway.open_sockets() {
                    socket.data.push(Inbound::Stopping);
                }
                gateway.tasks.close();
                draining = Some(tokio::time::Instant::now() + limits.shutdown_timeout * 9 / 10);
                continue;
            }
            _ = gateway.tasks.wait(), if draining.is_some() => break,
            _ = sleep_until(draining), if draining.is_some() => break,
        };
        let ticket = match limits.admission.admit(LISTENER, peer.ip()) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(%peer, reason = %e.message, "socket.io connection refused");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = OwnHead {
            peer: Some(peer),
            ..service.clone()
        };
        let tls = tls.clone();
        let wait = limits.frame_timeout;
        let write_timeout = limits.write_timeout;
        let admission = Arc::clone(&limits.admission);
        connections.spawn(async move {
            let timed_out = || admission.count(Limit::Frame);
            if !tls.tls() && !plaintext(&stream, peer, wait, timed_out).await {
                return;
            }
            let Some(stream) = tls.accept(stream, peer, wait, timed_out).await else {
                return;
            };
            // The ticket goes with the stream, so a websocket keeps its
            // slot after the upgrade hands the stream on.
            let stalled = Arc::clone(&admission);
            let io = hyper_util::rt::TokioIo::new(Held {
                stream: StallGuard::new(stream, write_timeout).on_stall(move || {
                    stalled.count(Limit::Write);
                    tracing::debug!("socket.io connection closed by write_timeout_ms");
                }),
                _ticket: ticket,
            });
            // A request's headers must arrive within `frame_timeout` of the
            // connection being ready for them (accepted, or the previous
            // response sent): a peer that sends nothing, or a little at a
            // time, does not keep its slot. A long-poll waiting for its
            // answer and a websocket are past their headers.
            let mut builder = hyper::server::conn::http1::Builder::new();
            if let Some(wait) = wait {
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(wait);
            }
            let conn = builder.serve_connection(io, service).with_upgrades();
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    admission.count(Limit::Frame);
                }
                tracing::debug!(%peer, error = %e, "socket.io connection ended");
            }
        });
    }
    drop(listener);
    // Each socket served and answered what it received before the stop,
    // then closed CLOSE_GRACE later; one still open now (a request waiting
    // on the disk, a backlog longer than the shutdown timeout) is closed
    // without more: what it has not served yet it refuses, unstored.
    for socket in gateway.open_sockets() {
        socket.close(DisconnectReason::ClosingServer);
    }
    gateway.tasks.wait().await;
    connections.close();
    // Long-polls and websockets of closed sockets end on their own.
    let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    Ok(())
}

/// A connection's stream holding its admission slot ([`Ticket`]) for as
/// long as the stream lives: through hyper while it serves HTTP requests,
/// and on in the websocket an upgrade hands the stream to.
struct Held<S> {
    /// Writes that wait `write_timeout` without the peer taking a byte (a
    /// pipelined request's response, a websocket frame) fail, so a peer
    /// that stops reading does not keep its slot.
    stream: StallGuard<S>,
    _ticket: Ticket,
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
