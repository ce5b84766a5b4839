//! Async Rust client for the spool protocol.
//!
//! One [`Client`] is one TCP connection; calls on it may run concurrently
//! (they are pipelined and answered by request id). A client does not
//! reconnect by itself: when the connection drops, every call and
//! subscription it ends fails with why (the status the server closed it
//! with, for a limit or a broker stopping; [`ClientError::Io`] for a reset
//! or a lost connection; [`ClientError::Closed`] for a close without a
//! reason), and so does every call made on the client afterwards. Such an
//! error can look like a request's own answer (a `RESOURCE_EXHAUSTED` the
//! server closed with, say): [`Client::is_closed`] tells them apart, and
//! the caller decides whether to connect again (what was acknowledged
//! before is durable; resend what was not). A call the connection's end
//! cut short may have been served: a produce that failed that way
//! ([`ClientError::Closed`], [`ClientError::Io`], or a status with
//! [`Client::is_closed`] true) may be stored, and sending it again may
//! store it twice (protocol version 1 has no idempotent producer; give
//! messages a key or an id of your own to tell repeats apart).
//!
//! A `Client` is `Send` and `Sync` but not `Clone`: share one between tasks
//! behind an `Arc` (its calls are pipelined on its one connection).
//!
//! A server closes connections that send nothing for its idle timeout
//! (`Welcome.idle_timeout_ms`); the client sends a `Ping` whenever it has
//! sent nothing for a third of that (at most [`PING_EVERY_MAX`]), so a quiet
//! subscription, a long-poll or a client kept around for later stays
//! connected. The same pings tell a connection that died without a word (a
//! broker's host that lost power, a network cut) from a quiet one: once the
//! client has sent something and heard nothing for
//! [`ClientOptions::lost_after`], it takes the connection as lost and every
//! call and subscription fails with [`ClientError::Io`] (`TimedOut`).
//!
//! ```no_run
//! use spool::client::Client;
//! use spool::storage::NewMessage;
//! use futures_util::StreamExt;
//!
//! # async fn demo() -> Result<(), spool::client::ClientError> {
//! let client = Client::connect("127.0.0.1:7411", "example").await?;
//! let produced = client.produce("orders", vec![NewMessage::from_value("hello")]).await?;
//! println!("stored at offset {}", produced.first_offset);
//!
//! client.create_group("orders", "workers", spool::groups::GroupMode::Queue, None).await.ok();
//! let mut sub = client.subscribe("orders", Some("workers"), "worker-1", None, 100).await?;
//! while let Some(received) = sub.next().await {
//!     let received = received?;
//!     client.ack("orders", "workers", &[received.message.offset.0], Some(sub.id())).await?;
//! }
//! # Ok(()) }
//! ```

use crate::broker::topic::Position;
use crate::groups::GroupMode;
use crate::protocol::codec::{FrameCodec, FrameError};
use crate::protocol::pb::client_frame::Request;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::request::{ClientOut, ProduceFrame};
use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, convert, outbox, pb};
use crate::security::tls::TlsClient;
use crate::storage::{Message, NewMessage};
use futures_util::{SinkExt, Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Status {
        /// gRPC status code.
        code: pb::Code,
        /// The server's message, naming what is wrong.
        message: String,
    },
    /// Connecting or talking failed.
    #[error("connection to {addr}: {source}")]
    Io {
        /// The server address.
        addr: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// TLS could not be set up: the server does not speak it, requires it,
    /// or presented a certificate this client does not trust (the message
    /// says which, in one line).
    #[error("{0}")]
    Tls(String),
    /// A subscription could not deliver the message at `offset` (the server
    /// names why, e.g. `RESOURCE_EXHAUSTED`: too large for a frame) and goes
    /// on with the messages after it. Not the end of the subscription.
    #[error("message at offset {offset} skipped: {code:?}: {message}")]
    Skipped {
        /// The message's offset.
        offset: u64,
        /// gRPC status code.
        code: pb::Code,
        /// The server's message.
        message: String,
    },
    /// A request larger than the server's frame limit (from its `Welcome`):
    /// nothing was sent, and the connection stays usable.
    #[error(
        "request of {len} bytes exceeds the server's frame limit of {max} bytes (max_frame_bytes); send fewer or smaller messages"
    )]
    TooLarge {
        /// Encoded size of the request.
        len: usize,
        /// The server's `max_frame_bytes`.
        max: u32,
    },
}

impl ClientError {
    /// The status code, when the server answered with one.
    pub fn code(&self) -> Option<pb::Code> {
        match self {
            ClientError::Status { code, .. } | ClientError::Skipped { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The offset of a stored message no frame of this server can carry,
    /// when this is a fetch's refusal of it (`RESOURCE_EXHAUSTED`, "the
    /// message at offset N takes …"): a fetch from N + 1 goes past it.
    pub fn undeliverable_offset(&self) -> Option<u64> {
        match self {
            ClientError::Status {
                code: pb::Code::ResourceExhausted,
                message,
            } => message
                .strip_prefix(UNDELIVERABLE_PREFIX)?
                .split(' ')
                .next()?
                .parse()
                .ok(),
            _ => None,
        }
    }

    fn from_wire(e: pb::Error) -> ClientError {
        ClientError::Status {
            code: pb::Code::try_from(e.code).unwrap_or(pb::Code::Unknown),
            message: e.message,
        }
    }
}

/// How the broker's refusal of a message too large for a frame begins
/// (`Error::TooLarge`; docs/protocol.md, "Messages too large for a frame").
const UNDELIVERABLE_PREFIX: &str = "the message at offset ";

/// Result of the client's calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Where a produce landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// First offset of the batch.
    pub first_offset: u64,
    /// Last offset of the batch.
    pub last_offset: u64,
    /// Whether the batch is synced to disk.
    pub durable: bool,
}

/// A message received from a fetch or subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Queue groups: which delivery this is (1 = first); 0 otherwise.
    pub delivery: u32,
}

/// What a fetch returned.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The messages.
    pub messages: Vec<Received>,
    /// Replay: the offset to continue from.
    pub next_offset: u64,
    /// The topic's end offset when the server answered.
    pub end_offset: u64,
}

/// Options of a fetch.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Stream or queue group; replay when `None`.
    pub group: Option<String>,
    /// Member name (queue groups lease to it).
    pub member: String,
    /// Replay start; for a stream group, the reader's own position (default:
    /// the group's committed offset).
    pub from: Option<Position>,
    /// Most messages (server default 100).
    pub max_messages: u32,
    /// Most bytes (server default 1 MiB).
    pub max_bytes: u32,
    /// Long-poll: wait up to this long for a message.
    pub wait_ms: u32,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply>>>>>;
type Subscriptions = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Result<Received>>>>>;

/// `Unsubscribe` requests sent and not yet answered, by request id: a
/// subscribe waits for them, so the slots they free are free when the
/// server reads it (requests in flight are served in any order).
#[derive(Debug, Default)]
struct Unsubscribing {
    /// The ids, and whether the connection closed (then none is kept).
    ids: Mutex<(std::collections::HashSet<u64>, bool)>,
    done: tokio::sync::Notify,
}

impl Unsubscribing {
    fn start(&self, request_id: u64) {
        let mut ids = lock(&self.ids);
        if !ids.1 {
            ids.0.insert(request_id);
        }
    }

    /// Request `request_id` is answered (or will never be); whether it was
    /// an unsubscribe.
    fn finish(&self, request_id: u64) -> bool {
        let mut ids = lock(&self.ids);
        let was = ids.0.remove(&request_id);
        if was && ids.0.is_empty() {
            self.done.notify_waiters();
        }
        was
    }

    /// The connection closed: nothing more will be answered, nor waited for.
    fn clear(&self) {
        let mut ids = lock(&self.ids);
        ids.0.clear();
        ids.1 = true;
        drop(ids);
        self.done.notify_waiters();
    }

    /// Until every unsubscribe sent so far is answered.
    async fn settled(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            // Registered before the check, so a notify after it is not missed.
            done.as_mut().enable();
            if lock(&self.ids).0.is_empty() {
                return;
            }
            done.await;
        }
    }
}

/// A connection to a spool server.
#[derive(Debug)]
pub struct Client {
    out: mpsc::Sender<ClientOut>,
    pending: Pending,
    subscriptions: Subscriptions,
    /// Channels of subscribe requests awaiting their reply, by request id.
    waiting_subscriptions: Subscriptions,
    next_id: Arc<AtomicU64>,
    unsubscribing: Arc<Unsubscribing>,
    welcome: pb::Welcome,
    reader: tokio::task::JoinHandle<()>,
    /// The task writing queued frames (awaited by the reader).
    writer: tokio::task::AbortHandle,
    /// Pings the server while the client is otherwise quiet, and watches
    /// for a connection that went silent.
    keepalive: tokio::task::JoinHandle<()>,
    /// When a frame was last queued for the server, and last read from it.
    activity: Arc<Activity>,
    /// Set by the reader before it fails the pending calls on close.
    closed: Arc<AtomicBool>,
    /// Why the connection ended (with the server's address), set by the
    /// reader before `closed`: what a call made afterwards fails with.
    ended: Arc<std::sync::OnceLock<(End, String)>>,
    /// Notified once the reader has set `ended` and `closed`.
    reader_done: Arc<tokio::sync::Notify>,
}

impl Drop for Client {
    /// Closes the connection: the server ends this client's subscriptions,
    /// and its unacked queue leases come back when they time out. Each
    /// [`Subscription`] still held ends with [`ClientError::Closed`].
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.keepalive.abort();
        for (_, tx) in lock(&self.subscriptions).drain() {
            let _ = tx.send(Err(ClientError::Closed));
        }
    }
}

/// Microseconds from the connection's start (plus one, so that any frame
/// comes after the start) to the last frame sent and the last frame
/// received.
#[derive(Debug)]
struct Activity {
    start: tokio::time::Instant,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64 + 1
    }

    fn sent(&self) {
        self.sent.store(self.now(), Ordering::Relaxed);
    }

    fn received(&self) {
        self.received.store(self.now(), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_micros(self.now().saturating_sub(self.sent.load(Ordering::Relaxed)))
    }
}

/// Longest pause between pings of a quiet client (shorter when the
/// server's idle timeout asks for it).
pub const PING_EVERY_MAX: Duration = Duration::from_secs(10);

/// Sends a `Ping` whenever nothing was sent for `every`, and notifies
/// `lost` once something sent has met nothing from the server for
/// `lost_after`; until the connection closes (or the client is dropped,
/// which aborts this task).
async fn keepalive(
    out: mpsc::Sender<ClientOut>,
    next_id: Arc<AtomicU64>,
    activity: Arc<Activity>,
    pending: std::sync::Weak<Mutex<HashMap<u64, oneshot::Sender<Result<Reply>>>>>,
    every: Duration,
    lost_after: Option<Duration>,
    lost: Arc<tokio::sync::Notify>,
) {
    // While an answer is due, a ping goes out at least this often, however
    // busy the client is sending: its answer is what tells a slow server
    // from a lost connection.
    let probe = lost_after
        .map_or(every, |limit| every.min(limit / 3))
        .max(Duration::from_millis(1));
    let tick = (probe / 2).clamp(Duration::from_millis(1), Duration::from_secs(1));
    // Since when a frame sent waits for any frame back (the last one
    // received then): a busy connection receives between ticks, a silent
    // one does not.
    let mut waiting: Option<(u64, tokio::time::Instant)> = None;
    let mut last_probe: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        let received = activity.received.load(Ordering::Relaxed);
        let mut due = false;
        // An answer is due when a frame went out after the last one came
        // in, or while a call waits for its reply: deliveries arriving
        // after a long-poll was sent say nothing of the long-poll.
        let calls_waiting = pending.upgrade().is_some_and(|p| !lock(&p).is_empty());
        if activity.sent.load(Ordering::Relaxed) > received || calls_waiting {
            match waiting {
                Some((heard, since)) if heard == received => {
                    if lost_after.is_some_and(|limit| since.elapsed() >= limit) {
                        lost.notify_one();
                        return;
                    }
                    due = since.elapsed() >= probe
                        && last_probe.is_none_or(|at| at.elapsed() >= probe);
                }
                _ => waiting = Some((received, tokio::time::Instant::now())),
            }
        } else {
            waiting = None;
        }
        if activity.quiet_for() < every && !due {
            continue;
        }
        if due {
            last_probe = Some(tokio::time::Instant::now());
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let ping = ClientOut::Frame(pb::ClientFrame {
            request_id: id,
            // The reply finds no pending call and is dropped.
            request: Some(Request::Ping(pb::PingRequest { nonce: id })),
        });
        // Never waits for room: a full queue means frames are going out
        // (or stuck, which the lost check above must go on watching).
        match out.try_send(ping) {
            Ok(()) => activity.sent(),
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// How long the reader goes on reading once the writer stopped on a failed
/// write: what the server sent before closing (replies, its reason) is
/// usually in the socket already.
const WRITER_GONE_READ: Duration = Duration::from_secs(1);

/// Sleeps until `until`, or for ever without one.
async fn sleep_until_some(until: Option<tokio::time::Instant>) {
    match until {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a connection ended, for the calls and subscriptions it leaves.
#[derive(Debug, Clone)]
enum End {
    /// Closed without a word (or the client's own write failed).
    Closed,
    /// The server named why (`request_id` 0).
    Reason(pb::Error),
    /// Silent for this long while an answer was due.
    Lost(Duration),
    /// A frame this client cannot decode.
    Undecodable(String),
    /// The connection failed (reset by the server, a broken socket).
    Broken(std::io::ErrorKind, String),
}

impl End {
    fn error(&self, addr: &str) -> ClientError {
        match self {
            End::Closed => ClientError::Closed,
            End::Reason(e) => ClientError::from_wire(e.clone()),
            End::Lost(after) => ClientError::Io {
                addr: addr.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "nothing from the server for {} ms while an answer was due (lost_after); the connection is taken as lost",
                        after.as_millis()
                    ),
                ),
            },
            End::Broken(kind, e) => ClientError::Io {
                addr: addr.to_owned(),
                source: std::io::Error::new(*kind, e.clone()),
            },
            End::Undecodable(e) => {
                ClientError::Protocol(format!("an undecodable frame closed the connection: {e}"))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to reach a server: TLS, the name its certificate must carry, the
/// token to present.
///
/// ```no_run
/// use spool::client::{Client, ClientOptions};
/// use spool::security::tls::TlsClient;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let options = ClientOptions {
///     tls: Some(TlsClient::load_ca("ca.pem".as_ref())?),
///     token: Some(std::env::var("SPOOL_TOKEN")?),
///     ..ClientOptions::new("example")
/// };
/// let client = Client::connect_with("broker.example:7411", &options).await?;
/// # Ok(()) }
/// ```
///
/// `ClientOptions::default()` is [`ClientOptions::new`] with the name
/// `spool-client`: the same timeouts, so `..Default::default()` keeps them.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in `Hello` (the server logs it).
    pub client_name: String,
    /// TLS with these CAs; plaintext when `None`.
    pub tls: Option<TlsClient>,
    /// The name the server's certificate must be valid for (default: the
    /// host part of the address).
    pub server_name: Option<String>,
    /// The secret sent as `Hello.token`.
    pub token: Option<String>,
    /// Longest connecting, TLS and the `Hello`/`Welcome` exchange may take
    /// together ([`DEFAULT_CONNECT_TIMEOUT`] from [`ClientOptions::new`];
    /// `None`: no limit). A server that accepts and never answers fails the
    /// connect with [`ClientError::Io`] (`TimedOut`) instead of hanging.
    pub connect_timeout: Option<Duration>,
    /// How long the connection may stay silent after the client sent
    /// something (a request, a ping) before it is taken as lost: the
    /// connection closes, and every call waiting and every subscription
    /// fails with [`ClientError::Io`] (`TimedOut`) ([`DEFAULT_LOST_AFTER`]
    /// from [`ClientOptions::new`]; `None`: wait as long as TCP does, many
    /// minutes). A server answers a ping at once, but a connection at its
    /// cap of requests in flight reads the ping only once one of them ends,
    /// and a long-poll may take 60 s: keep it above that when a client runs
    /// that many long-polls at once. While an answer is due (a call waits
    /// for its reply, or a frame went out after the last one came in), the
    /// client pings at least every third of this. A client waiting for
    /// nothing (only subscriptions open) pings once it has been quiet for
    /// a third of the server's idle timeout, at most [`PING_EVERY_MAX`], so
    /// it notices a lost connection within that plus this. Any bytes from
    /// the server count as heard, so a large answer arriving over a slow
    /// link is no silence (over TLS, bytes count once their record, up to
    /// 16 KiB, is whole).
    pub lost_after: Option<Duration>,
}

/// How long [`ClientOptions::new`] lets a connect take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`ClientOptions::new`] lets a connection stay silent while the
/// client waits for an answer (a ping is answered at once; a quiet client
/// pings at least every [`PING_EVERY_MAX`]).
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(30);

impl ClientOptions {
    /// Plaintext, no token, named `client_name`, connect timeout
    /// [`DEFAULT_CONNECT_TIMEOUT`], lost after [`DEFAULT_LOST_AFTER`] of
    /// silence.
    pub fn new(client_name: &str) -> ClientOptions {
        ClientOptions {
            client_name: client_name.to_owned(),
            tls: None,
            server_name: None,
            token: None,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            lost_after: Some(DEFAULT_LOST_AFTER),
        }
    }
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions::new("spool-client")
    }
}

/// A client's connection: TCP, or TLS over it.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// The connection's stream, noting in [`Activity`] every read that brings
/// bytes: a large answer arriving over a slow link is the server answering,
/// not a lost connection, long before its frame is whole.
struct Heard<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Client {
    /// Connects in plaintext without a token and completes the handshake.
    pub async fn connect(addr: &str, client_name: &str) -> Result<Client> {
        Client::connect_with(addr, &ClientOptions::new(client_name)).await
    }

    /// Connects as `options` say (TLS, token) and completes the handshake
    /// within `options.connect_timeout`.
    pub async fn connect_with(addr: &str, options: &ClientOptions) -> Result<Client> {
        let Some(limit) = options.connect_timeout else {
            return Client::connect_untimed(addr, options).await;
        };
        match tokio::time::timeout(limit, Client::connect_untimed(addr, options)).await {
            Ok(connected) => connected,
            Err(_) => Err(ClientError::Io {
                addr: addr.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no Welcome within {} ms (connect_timeout)",
                        limit.as_millis()
                    ),
                ),
            }),
        }
    }

    async fn connect_untimed(addr: &str, options: &ClientOptions) -> Result<Client> {
        let io = |source| ClientError::Io {
            addr: addr.to_owned(),
            source,
        };
        let stream = TcpStream::connect(addr).await.map_err(io)?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Transport> = match &options.tls {
            None => Box::new(stream),
            Some(tls) => {
                let name = options
                    .server_name
                    .as_deref()
                    .unwrap_or_else(|| crate::security::tls::host_of(addr));
                let stream = tls.connect(stream, name).await.map_err(|e| {
                    ClientError::Tls(crate::security::tls::handshake_error(addr, &e))
                })?;
                Box::new(stream)
            }
        };
        let activity = Arc::new(Activity::new());
        let stream = Heard {
            inner: stream,
            activity: Arc::clone(&activity),
        };
        let mut framed = Framed::new(
            stream,
            FrameCodec::<pb::ServerFrame, ClientOut>::new(DEFAULT_MAX_FRAME_BYTES * 4),
        );
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: options.client_name.clone(),
            token: options.token.clone(),
        };
        framed
            .send(ClientOut::Frame(pb::ClientFrame {
                request_id: 0,
                request: Some(Request::Hello(hello)),
            }))
            .await
            .map_err(|e| frame_to_client(addr, e))?;
        let welcome = match framed.next().await {
            Some(Ok(pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Welcome(w)),
            })) => w,
            Some(Ok(pb::ServerFrame {
                kind:
                    Some(pb::server_frame::Kind::Response(pb::Response {
                        result: Some(Reply::Error(e)),
                        ..
                    })),
            })) => return Err(ClientError::from_wire(e)),
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            Some(Err(FrameError::BadFlags(first)))
                if options.tls.is_none() && crate::security::tls::is_tls_record(first) =>
            {
                return Err(ClientError::Tls(crate::security::tls::tls_required(addr)));
            }
            Some(Err(e)) => {
                return Err(wrong_listener(addr, framed.read_buffer())
                    .unwrap_or_else(|| frame_to_client(addr, e)));
            }
            None => return Err(ClientError::Closed),
        };
        // Frames as large as the server takes and sends, past the default
        // the handshake was read with.
        let codec_max = (DEFAULT_MAX_FRAME_BYTES * 4).max(welcome.max_frame_bytes);
        framed.codec_mut().set_max_frame_bytes(codec_max);
        let (sink, mut frames) = framed.split();
        let (out, out_rx) = mpsc::channel::<ClientOut>(256);
        let mut writer = tokio::spawn(outbox::run(sink, out_rx));
        let writer_abort = writer.abort_handle();
        let pending: Pending = Arc::default();
        let subscriptions: Subscriptions = Arc::default();
        let waiting_subscriptions: Subscriptions = Arc::default();
        let unsubscribing: Arc<Unsubscribing> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicU64::new(1));
        let lost = Arc::new(tokio::sync::Notify::new());
        let (p, s, w, c, a, l) = (
            Arc::clone(&pending),
            Arc::clone(&subscriptions),
            Arc::clone(&waiting_subscriptions),
            Arc::clone(&closed),
            Arc::clone(&activity),
            Arc::clone(&lost),
        );
        // What ends a subscription whose subscribe call was given up
        // before its reply, or that the server ended (weak: the reader must
        // not keep the connection).
        let orphans = Stop {
            closed: Arc::downgrade(&closed),
            out: out.downgrade(),
            pending: Arc::downgrade(&pending),
            subscriptions: Arc::downgrade(&subscriptions),
            next_id: Arc::downgrade(&next_id),
            unsubscribing: Arc::downgrade(&unsubscribing),
        };
        let u = Arc::clone(&unsubscribing);
        let ended = Arc::new(std::sync::OnceLock::new());
        let why = Arc::clone(&ended);
        let reader_done = Arc::new(tokio::sync::Notify::new());
        let done = Arc::clone(&reader_done);
        let lost_after = options.lost_after;
        let server = addr.to_owned();
        // A runtime shutting down drops the reader task, run or not yet
        // run: the connection is closed then too. (Made here and moved in,
        // so a task dropped before its first poll drops it as well.)
        let closed_if_dropped = MarkClosed(Arc::clone(&c));
        let reader = tokio::spawn(async move {
            let _closed_if_dropped = closed_if_dropped;
            // Why the connection ended, when it was not a plain close.
            let mut end = End::Closed;
            // Once the writer stopped: until when what the server already
            // sent is still read.
            let mut writer_ended: Option<tokio::time::Instant> = None;
            loop {
                let frame = tokio::select! {
                    frame = frames.next() => frame,
                    // The writer only stops early on a failed write (a frame
                    // over the limit, a broken socket); the requests it
                    // dropped would otherwise wait for replies forever. The
                    // replies and the reason the server sent before it
                    // closed are still read, for a moment.
                    _ = &mut writer, if writer_ended.is_none() => {
                        writer_ended = Some(tokio::time::Instant::now() + WRITER_GONE_READ);
                        continue;
                    }
                    () = sleep_until_some(writer_ended) => None,
                    () = l.notified() => {
                        end = End::Lost(lost_after.unwrap_or_default());
                        None
                    }
                };
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(FrameError::Io(e))) => {
                        // A reset after the server said why it closes (it
                        // closed with requests unread) keeps that reason.
                        if matches!(end, End::Closed) {
                            end = End::Broken(e.kind(), e.to_string());
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        end = End::Undecodable(e.to_string());
                        break;
                    }
                    None => break,
                };
                a.received();
                match frame.kind {
                    Some(pb::server_frame::Kind::Response(r)) => {
                        let result = match r.result {
                            Some(Reply::Error(e)) => Err(ClientError::from_wire(e)),
                            Some(ok) => Ok(ok),
                            None => Err(ClientError::Protocol("empty response".into())),
                        };
                        if let Ok(Reply::Subscribe(sub)) = &result
                            && let Some(tx) = lock(&w).remove(&r.request_id)
                        {
                            lock(&s).insert(sub.subscription_id, tx);
                        }
                        let waiter = lock(&p).remove(&r.request_id);
                        if let Some(tx) = waiter {
                            if let Err(Ok(Reply::Subscribe(sub))) = tx.send(result) {
                                // The subscribe call was dropped (a timeout,
                                // a select) before its reply: nobody reads
                                // this subscription, so it ends now, as a
                                // dropped `Subscription` does, instead of
                                // leasing queue messages into nothing.
                                orphans.end(sub.subscription_id);
                            }
                        } else if r.request_id == 0
                            && let Err(ClientError::Status { code, message }) = result
                        {
                            tracing::debug!(?code, %message, "the server is closing the connection");
                            end = End::Reason(pb::Error {
                                code: code as i32,
                                message,
                            });
                        }
                        // Answered once what the answer starts is under
                        // way: the unsubscribe of a subscription whose call
                        // was given up is queued (and waited for) before a
                        // subscribe waiting on this one goes on.
                        u.finish(r.request_id);
                    }
                    Some(pb::server_frame::Kind::Delivery(d)) => {
                        let mut subs = lock(&s);
                        let mut ended = false;
                        if let Some(tx) = subs.get(&d.subscription_id) {
                            for m in d.messages {
                                let _ = tx.send(Ok(received(m)));
                            }
                            match (d.error, d.skipped_offset) {
                                (Some(e), Some(offset)) => {
                                    let _ = tx.send(Err(ClientError::Skipped {
                                        offset,
                                        code: pb::Code::try_from(e.code)
                                            .unwrap_or(pb::Code::Unknown),
                                        message: e.message,
                                    }));
                                }
                                (Some(e), None) => {
                                    let _ = tx.send(Err(ClientError::from_wire(e)));
                                    subs.remove(&d.subscription_id);
                                    ended = true;
                                }
                                (None, _) => {}
                            }
                        }
                        drop(subs);
                        if ended {
                            // The server keeps an ended subscription's slot
                            // until it is unsubscribed.
                            orphans.send_unsubscribe(d.subscription_id);
                        }
                    }
                    _ => {}
                }
            }
            let _ = why.set((end.clone(), server.clone()));
            c.store(true, Ordering::SeqCst);
            done.notify_waiters();
            // No frame goes out any more: the socket closes with the reader's
            // half, and the keep-alive ends with the writer's queue.
            writer.abort();
            u.clear();
            let ended = || end.error(&server);
            for (_, tx) in lock(&p).drain() {
                let _ = tx.send(Err(ended()));
            }
            // Subscriptions the server did not end itself end with the
            // reason, or `Closed`.
            for (_, tx) in lock(&s).drain() {
                let _ = tx.send(Err(ended()));
            }
        });
        let every = match welcome.idle_timeout_ms {
            0 => PING_EVERY_MAX,
            ms => Duration::from_millis(u64::from(ms / 3).max(1)).min(PING_EVERY_MAX),
        };
        let keepalive = tokio::spawn(keepalive(
            out.clone(),
            Arc::clone(&next_id),
            Arc::clone(&activity),
            Arc::downgrade(&pending),
            every,
            options.lost_after,
            lost,
        ));
        Ok(Client {
            out,
            pending,
            subscriptions,
            waiting_subscriptions,
            next_id,
            unsubscribing,
            welcome,
            reader,
            writer: writer_abort,
            keepalive,
            activity,
            closed,
            ended,
            reader_done,
        })
    }

    /// Whether the connection has closed (every call now fails): connect
    /// again to go on.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The server's limits and version from the handshake.
    pub fn welcome(&self) -> &pb::Welcome {
        &self.welcome
    }

    /// Registers a pending call; fails if the connection already closed (the
    /// reader sets `closed` before draining, so one of the two sees the other).
    fn register(&self, id: u64, tx: oneshot::Sender<Result<Reply>>) -> Result<()> {
        lock(&self.pending).insert(id, tx);
        if self.closed.load(Ordering::SeqCst) {
            lock(&self.pending).remove(&id);
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// What a call on the closed connection fails with: the reason it
    /// ended (the server's last frame, a lost connection, ...), else
    /// [`ClientError::Closed`].
    fn closed_error(&self) -> ClientError {
        match self.ended.get() {
            Some((end, addr)) => end.error(addr),
            None => ClientError::Closed,
        }
    }

    /// [`Client::closed_error`] once the reader has ended. The writer can
    /// stop first (a failed write); the reader then still reads what the
    /// server sent, for up to [`WRITER_GONE_READ`], and only then knows why
    /// the connection ended.
    async fn ended_error(&self) -> ClientError {
        let done = self.reader_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.ended.get().is_none() {
            let _ = tokio::time::timeout(WRITER_GONE_READ + Duration::from_secs(1), done).await;
        }
        self.closed_error()
    }

    /// The frame of a request, if it fits the server's frame limit.
    fn frame(&self, request_id: u64, request: Request) -> Result<ClientOut> {
        self.within_limit(ClientOut::Frame(pb::ClientFrame {
            request_id,
            request: Some(request),
        }))
    }

    /// `frame`, if it fits the server's frame limit: a larger one would make
    /// the server close the connection.
    fn within_limit(&self, frame: ClientOut) -> Result<ClientOut> {
        let (len, max) = (frame.encoded_len(), self.welcome.max_frame_bytes);
        if max != 0 && len > max as usize {
            return Err(ClientError::TooLarge { len, max });
        }
        Ok(frame)
    }

    async fn call(&self, request: Request) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.frame(id, request)?;
        self.send_call(id, frame).await
    }

    /// Sends `frame` (request `id`) and waits for its reply.
    async fn send_call(&self, id: u64, frame: ClientOut) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.register(id, tx)?;
        self.send_registered(id, frame).await?;
        rx.await.map_err(|_| self.closed_error())?
    }

    /// Queues the frame of registered call `id`. A full queue makes this
    /// wait; should the caller give up meanwhile, or the connection close,
    /// the call is unregistered (no reply will come for a frame never sent).
    async fn send_registered(&self, id: u64, frame: ClientOut) -> Result<()> {
        let unsent = Unregister { client: self, id };
        let sent = self.out.send(frame).await;
        if sent.is_err() {
            return Err(self.ended_error().await);
        }
        std::mem::forget(unsent);
        self.activity.sent();
        Ok(())
    }

    /// Appends a batch; returns once it is committed under the topic's fsync policy.
    pub async fn produce(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Produced> {
        self.produce_shared(topic, Arc::new(messages)).await
    }

    /// [`Client::produce`] of a batch the caller keeps: sending it again
    /// (a retry, or a benchmark sending the same messages) shares it
    /// instead of cloning each message.
    pub async fn produce_shared(
        &self,
        topic: &str,
        messages: Arc<Vec<NewMessage>>,
    ) -> Result<Produced> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Encoded from `messages` as the connection writes it, with no wire
        // copy of each message built first.
        let frame = self.within_limit(ClientOut::Produce(ProduceFrame::new(
            id,
            topic.to_owned(),
            messages,
        )))?;
        match self.send_call(id, frame).await? {
            Reply::Produce(p) => Ok(Produced {
                first_offset: p.first_offset,
                last_offset: p.last_offset,
                durable: p.durability == pb::Durability::Durable as i32,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Pulls messages (replay, stream group or queue group).
    pub async fn fetch(&self, topic: &str, options: FetchOptions) -> Result<Fetched> {
        let request = pb::FetchRequest {
            topic: topic.to_owned(),
            group: options.group,
            member: options.member,
            from: options.from.map(convert::position_to_wire),
            max_messages: options.max_messages,
            max_bytes: options.max_bytes,
            wait_ms: options.wait_ms,
        };
        match self.call(Request::Fetch(request)).await? {
            Reply::Fetch(f) => Ok(Fetched {
                messages: f.messages.into_iter().map(received).collect(),
                next_offset: f.next_offset,
                end_offset: f.end_offset,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Subscribes: the server pushes messages, at most `max_in_flight`
    /// unacknowledged at a time (ack or nack with the subscription id).
    pub async fn subscribe(
        &self,
        topic: &str,
        group: Option<&str>,
        member: &str,
        from: Option<Position>,
        max_in_flight: u32,
    ) -> Result<Subscription> {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = pb::SubscribeRequest {
            topic: topic.to_owned(),
            group: group.map(str::to_owned),
            member: member.to_owned(),
            from: from.map(convert::position_to_wire),
            max_in_flight,
        };
        // The server queues this reply before the first delivery, and the
        // reader task registers the channel as it handles the reply.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.frame(id, Request::Subscribe(request))?;
        // Slots that subscriptions dropped before this call free are free
        // when the server reads it.
        self.unsubscribing.settled().await;
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.waiting_subscriptions).insert(id, tx);
        if let Err(e) = self.register(id, reply_tx) {
            lock(&self.waiting_subscriptions).remove(&id);
            return Err(e);
        }
        self.send_registered(id, frame).await?;
        // Should this call be dropped before it returns, the guard ends a
        // subscription whose reply came meanwhile (the reader ends one whose
        // reply comes later).
        let mut call = SubscribeCall {
            client: self,
            id,
            reply: Some(reply_rx),
        };
        let reply = call.wait().await;
        match reply?? {
            Reply::Subscribe(s) => Ok(Subscription {
                id: s.subscription_id,
                rx,
                stop: self.stop(),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// What a [`Subscription`] of this client needs to end itself.
    fn stop(&self) -> Stop {
        Stop {
            closed: Arc::downgrade(&self.closed),
            out: self.out.downgrade(),
            pending: Arc::downgrade(&self.pending),
            subscriptions: Arc::downgrade(&self.subscriptions),
            next_id: Arc::downgrade(&self.next_id),
            unsubscribing: Arc::downgrade(&self.unsubscribing),
        }
    }

    /// Stops a subscription. The request is queued at once (by a task of
    /// its own while the connection's queue is full), so a caller that
    /// gives up waiting for the answer still unsubscribes, and a subscribe
    /// on this client waits until the server has.
    pub async fn unsubscribe(&self, subscription_id: u64) -> Result<()> {
        lock(&self.subscriptions).remove(&subscription_id);
        let Some(answer) = self.stop().send_unsubscribe(subscription_id) else {
            return Err(self.ended_error().await);
        };
        self.activity.sent();
        let answer = match answer.await {
            Ok(answer) => answer,
            Err(_) => return Err(self.ended_error().await),
        };
        match answer? {
            Reply::Ok(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Queue group: completes messages (durable when this returns, under
    /// `fsync=always`). With `subscription_id` (one of this client's), it
    /// also gives that subscription back one credit per offset; a replay
    /// or stream-group subscription takes its credit back this way too,
    /// with an empty `group` or its stream group (nothing is completed;
    /// the topic is the subscription's, which a token needs `consume` on).
    pub async fn ack(
        &self,
        topic: &str,
        group: &str,
        offsets: &[u64],
        subscription_id: Option<u64>,
    ) -> Result<()> {
        self.ok(Request::Ack(pb::AckRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            offsets: offsets.to_vec(),
            subscription_id,
        }))
        .await
    }

    /// Queue group: gives messages back for redelivery after `delay_ms`.
    pub async fn nack(
        &self,
        topic: &str,
        group: &str,
        offsets: &[u64],
        delay_ms: u64,
        subscription_id: Option<u64>,
    ) -> Result<u32> {
        let request = pb::NackRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            offsets: offsets.to_vec(),
            delay_ms,
            subscription_id,
        };
        match self.call(Request::Nack(request)).await? {
            Reply::Nack(n) => Ok(n.requeued),
            other => Err(unexpected(other)),
        }
    }

    /// Stream group: commits the next offset to read after a restart.
    pub async fn commit(&self, topic: &str, group: &str, offset: u64) -> Result<()> {
        self.ok(Request::Commit(pb::CommitRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            offset,
        }))
        .await
    }

    /// Moves a group; returns the offset it now starts at.
    pub async fn seek(&self, topic: &str, group: &str, to: Position) -> Result<u64> {
        let request = pb::SeekRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            to: Some(convert::position_to_wire(to)),
        };
        match self.call(Request::Seek(request)).await? {
            Reply::Seek(s) => Ok(s.offset),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes messages: never delivered or replayed again.
    pub async fn delete(&self, topic: &str, offsets: &[u64]) -> Result<()> {
        self.ok(Request::Delete(pb::DeleteRequest {
            topic: topic.to_owned(),
            offsets: offsets.to_vec(),
        }))
        .await
    }

    /// Creates a topic (config fields left empty take the server's defaults).
    pub async fn create_topic(&self, name: &str, config: pb::TopicConfig) -> Result<pb::TopicInfo> {
        let request = pb::CreateTopicRequest {
            name: name.to_owned(),
            config: Some(config),
        };
        match self.call(Request::CreateTopic(request)).await? {
            Reply::Topic(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// All topics.
    pub async fn list_topics(&self) -> Result<Vec<pb::TopicInfo>> {
        match self
            .call(Request::ListTopics(pb::ListTopicsRequest {}))
            .await?
        {
            Reply::Topics(t) => Ok(t.topics),
            other => Err(unexpected(other)),
        }
    }

    /// One topic.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicInfo> {
        match self
            .call(Request::DescribeTopic(pb::DescribeTopicRequest {
                name: name.to_owned(),
            }))
            .await?
        {
            Reply::Topic(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a topic and all its data.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.ok(Request::DeleteTopic(pb::DeleteTopicRequest {
            name: name.to_owned(),
        }))
        .await
    }

    /// Creates a group starting at `start` (default earliest).
    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        mode: GroupMode,
        start: Option<Position>,
    ) -> Result<pb::GroupInfo> {
        let request = pb::CreateGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            mode: convert::group_mode_to_wire(mode),
            start: start.map(convert::position_to_wire),
        };
        match self.call(Request::CreateGroup(request)).await? {
            Reply::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Groups of a topic.
    pub async fn list_groups(&self, topic: &str) -> Result<Vec<pb::GroupInfo>> {
        match self
            .call(Request::ListGroups(pb::ListGroupsRequest {
                topic: topic.to_owned(),
            }))
            .await?
        {
            Reply::Groups(g) => Ok(g.groups),
            other => Err(unexpected(other)),
        }
    }

    /// One group.
    pub async fn describe_group(&self, topic: &str, group: &str) -> Result<pb::GroupInfo> {
        let request = pb::DescribeGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        match self.call(Request::DescribeGroup(request)).await? {
            Reply::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a group and its state.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.ok(Request::DeleteGroup(pb::DeleteGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
        }))
        .await
    }

    /// Compacts one topic (or all): reclaims deleted, consumed and superseded
    /// records of sealed segments without changing any offset.
    pub async fn compact(&self, topic: Option<&str>) -> Result<Vec<pb::TopicCompaction>> {
        match self
            .call(Request::Compact(pb::CompactRequest {
                topic: topic.map(str::to_owned),
            }))
            .await?
        {
            Reply::Compact(c) => Ok(c.topics),
            other => Err(unexpected(other)),
        }
    }

    /// Round trip.
    pub async fn ping(&self, nonce: u64) -> Result<u64> {
        match self.call(Request::Ping(pb::PingRequest { nonce })).await? {
            Reply::Ping(p) => Ok(p.nonce),
            other => Err(unexpected(other)),
        }
    }

    async fn ok(&self, request: Request) -> Result<()> {
        match self.call(request).await? {
            Reply::Ok(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// A registered call whose frame is not yet queued: dropped, it leaves
/// nothing waiting for a reply that cannot come.
struct Unregister<'a> {
    client: &'a Client,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        lock(&self.client.pending).remove(&self.id);
        lock(&self.client.waiting_subscriptions).remove(&self.id);
    }
}

/// A subscribe call waiting for its reply.
struct SubscribeCall<'a> {
    client: &'a Client,
    id: u64,
    /// Until the reply is taken.
    reply: Option<oneshot::Receiver<Result<Reply>>>,
}

impl SubscribeCall<'_> {
    async fn wait(&mut self) -> Result<Result<Reply>> {
        let reply = match self.reply.as_mut() {
            Some(rx) => rx.await.map_err(|_| self.client.closed_error()),
            None => Err(self.client.closed_error()),
        };
        self.reply = None;
        lock(&self.client.waiting_subscriptions).remove(&self.id);
        reply
    }
}

impl Drop for SubscribeCall<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.reply.take() else {
            return;
        };
        lock(&self.client.waiting_subscriptions).remove(&self.id);
        // Until its reply is handled, the subscription it may start holds
        // a slot: a subscribe on this client waits, as for an unsubscribe
        // (tracked before the close, so the reader's answer comes after).
        let unsubscribing = &self.client.unsubscribing;
        unsubscribing.start(self.id);
        // Closed first: a reply sent before this is still read here, one
        // sent after it fails in the reader, which ends the subscription.
        rx.close();
        if let Ok(reply) = rx.try_recv() {
            if let Ok(Reply::Subscribe(sub)) = reply {
                self.client.stop().end(sub.subscription_id);
            }
            unsubscribing.finish(self.id);
        }
    }
}

/// Messages pushed to one subscription, as a `Stream`. Ends with an error
/// item when the server ends the subscription or the connection closes
/// ([`ClientError::Closed`] when it closed without a reason), then `None`.
/// A [`ClientError::Skipped`] item is not an end: it names a message the
/// server could not deliver, and later messages follow. Dropping it
/// unsubscribes without waiting (the server frees its slot; a subscribe on
/// the same client waits until it has); the client unsubscribes one the
/// server ended too. Queue messages it delivered that were not acked come
/// back to the group when their lease (`ack_timeout_ms`) ends, or at once
/// with a `nack`.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<Result<Received>>,
    stop: Stop,
}

/// What a dropped [`Subscription`] needs to unsubscribe without waiting;
/// weak, so a subscription kept after its client was dropped does not keep
/// the connection open.
#[derive(Debug, Clone)]
struct Stop {
    closed: std::sync::Weak<AtomicBool>,
    out: mpsc::WeakSender<ClientOut>,
    pending: std::sync::Weak<Mutex<HashMap<u64, oneshot::Sender<Result<Reply>>>>>,
    subscriptions: std::sync::Weak<Mutex<HashMap<u64, mpsc::UnboundedSender<Result<Received>>>>>,
    next_id: std::sync::Weak<AtomicU64>,
    unsubscribing: std::sync::Weak<Unsubscribing>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.unsubscribe(self.id);
    }
}

impl Stop {
    /// Ends a dropped [`Subscription`] without waiting, unless it has
    /// ended already (unsubscribed, ended by the server, or its connection
    /// closed): forgets its channel and sends `Unsubscribe`.
    fn unsubscribe(&self, id: u64) {
        let Some(subscriptions) = self.subscriptions.upgrade() else {
            // The client is gone, and its connection with it.
            return;
        };
        if lock(&subscriptions).remove(&id).is_some() {
            self.send_unsubscribe(id);
        }
    }

    /// Ends subscription `id`, whose subscribe call was given up around its
    /// reply (its channel may or may not have been registered), without
    /// waiting.
    fn end(&self, id: u64) {
        if let Some(subscriptions) = self.subscriptions.upgrade() {
            lock(&subscriptions).remove(&id);
        }
        self.send_unsubscribe(id);
    }

    /// Sends `Unsubscribe` for subscription `id` without waiting; a
    /// subscribe waits until it is answered. The answer comes on the
    /// receiver returned (`None`: the connection is gone), which the
    /// caller may drop.
    fn send_unsubscribe(&self, id: u64) -> Option<oneshot::Receiver<Result<Reply>>> {
        let (Some(closed), Some(out), Some(pending), Some(next_id), Some(unsubscribing)) = (
            self.closed.upgrade(),
            self.out.upgrade(),
            self.pending.upgrade(),
            self.next_id.upgrade(),
            self.unsubscribing.upgrade(),
        ) else {
            return None;
        };
        let request_id = next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, answer) = oneshot::channel();
        lock(&pending).insert(request_id, tx);
        unsubscribing.start(request_id);
        // Whatever way the frame fails to go out, nothing waits for its
        // answer: undone on a failed send, and on a drop of the task that
        // was to send it (its runtime shut down).
        let unsent = Unsent {
            pending,
            unsubscribing,
            request_id,
            armed: true,
        };
        // As a call registers: a connection that ended as this was put in
        // place drained `pending` before it, or its frame goes nowhere.
        if closed.load(Ordering::SeqCst) {
            drop(unsent);
            return Some(answer);
        }
        let frame = ClientOut::Frame(pb::ClientFrame {
            request_id,
            request: Some(Request::Unsubscribe(pb::UnsubscribeRequest {
                subscription_id: id,
            })),
        });
        match out.try_send(frame) {
            Ok(()) => unsent.disarm(),
            // A full queue: sent once there is room, where a runtime runs.
            Err(mpsc::error::TrySendError::Full(frame)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if out.send(frame).await.is_ok() {
                            unsent.disarm();
                        }
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        Some(answer)
    }
}

/// An unsubscribe whose frame has not gone out: dropped, nothing waits
/// for its answer any more (its reply slot and its place among the
/// unsubscribes under way go), unless disarmed once it is sent.
struct Unsent {
    pending: Pending,
    unsubscribing: Arc<Unsubscribing>,
    request_id: u64,
    armed: bool,
}

impl Unsent {
    /// The frame went out: its answer will come.
    fn disarm(mut self) {
        self.armed = false;
    }
}

/// Sets the connection's `closed` flag when dropped: the reader task ends
/// that way when its runtime shuts down, without reaching its own close.
struct MarkClosed(Arc<AtomicBool>);

impl Drop for MarkClosed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.pending).remove(&self.request_id);
            self.unsubscribing.finish(self.request_id);
        }
    }
}

impl Subscription {
    /// The subscription id (pass it to ack/nack to return credit).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Stream for Subscription {
    type Item = Result<Received>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

fn received(m: pb::Message) -> Received {
    Received {
        delivery: m.delivery,
        message: convert::message_from_wire(m),
    }
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

/// What a server that answered the `Hello` with `answer` (bytes that are
/// no frame) is, when it is one of spool's other listeners: HTTP/1 (the
/// socket.io or metrics listener) or HTTP/2 (the gRPC listener, whose
/// first frame is its SETTINGS).
fn wrong_listener(addr: &str, answer: &[u8]) -> Option<ClientError> {
    let which = if answer.starts_with(b"HTTP/") {
        "HTTP/1, as spool's socket.io and metrics listeners do"
    } else if answer.len() >= 9 && answer[0] == 0 && answer[3] == 0x04 && answer[5..9] == [0; 4] {
        "HTTP/2, as spool's gRPC listener does"
    } else {
        return None;
    };
    Some(ClientError::Protocol(format!(
        "the server at {addr} answered in {which}, not in the native protocol; \
         is that the native listener's address? (port 7411 by default)"
    )))
}

fn frame_to_client(addr: &str, e: FrameError) -> ClientError {
    match e {
        FrameError::Io(source) => ClientError::Io {
            addr: addr.to_owned(),
            source,
        },
        other => ClientError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `..Default::default()` keeps the timeouts `new` gives (it had none,
    /// so a connect to a server that never answers hung).
    #[test]
    fn default_options_keep_the_timeouts() {
        let options = ClientOptions::default();
        assert_eq!(options.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(options.lost_after, Some(DEFAULT_LOST_AFTER));
        assert!(!options.client_name.is_empty());
    }

    /// The offset a fetch's refusal of a message too large for a frame
    /// names is read back from the broker's own wording of it.
    #[test]
    fn a_refusal_of_a_message_too_large_names_its_offset() {
        let refusal = crate::Error::TooLarge {
            offset: 1234,
            size: 2 << 20,
            limit: 1 << 20,
        };
        let wire = crate::protocol::status::to_wire(&refusal, std::path::Path::new("/data"));
        let error = ClientError::from_wire(wire);
        assert_eq!(error.undeliverable_offset(), Some(1234), "{error}");
        let other = ClientError::Status {
            code: pb::Code::ResourceExhausted,
            message: "too many subscriptions".into(),
        };
        assert_eq!(other.undeliverable_offset(), None);
    }
}
