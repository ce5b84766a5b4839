//! gRPC connections under the native listener's rules: each holds a slot
//! of the server's one [`Admission`] (`max_connections`,
//! `max_connections_per_ip` count both transports together), is closed
//! after `idle_timeout_ms` without a frame from the peer while none of its
//! calls waits (no `Subscribe` or `Consume` stream, no `Fetch`), or after
//! `write_timeout_ms` without the peer taking a byte, and carries its count
//! of open `Subscribe` and `Consume` streams for `max_subscriptions`. With
//! an auth file, a connection that has made no authenticated call within
//! `frame_timeout_ms` of its start is closed, as a native connection
//! without its `Hello` is.

use crate::protocol::pb;
use crate::security::Listener;
use crate::security::tls::{self, MaybeTls};
use crate::server::admission::{self, Admission, Limit, Ticket};
use crate::server::deadline::Timer;
use futures_util::Stream;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// HTTP/2 frame types and the `GOAWAY` error code a refusal uses
/// (RFC 9113, sections 6.2, 6.5, 6.8, 7).
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_HEADER_LEN: usize = 9;
const FRAME_GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, what a client sends before its frames.
const CLIENT_PREFACE_LEN: usize = 24;
/// Most bytes of a refused peer read while waiting for its first request.
const REFUSAL_READ_MAX: usize = 64 * 1024;
/// How long a refused connection waits for its first request, and then is
/// drained before it is closed (so the peer reads the `GOAWAY`, not a reset).
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The limits a gRPC connection is held to (the server's settings).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The server's connection slots and the tally of refusals and closes.
    pub(crate) admission: Arc<Admission>,
    /// No byte from the peer for this long closes the connection.
    pub(crate) idle_timeout: Option<Duration>,
    /// The peer taking no byte for this long closes the connection.
    pub(crate) write_timeout: Option<Duration>,
    /// Longest the first byte and the TLS handshake may take.
    pub(crate) frame_timeout: Option<Duration>,
    /// Most `Subscribe` and `Consume` streams open on one connection.
    pub(crate) max_subscriptions: u32,
}

/// What a call learns about its connection (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// Tells this connection from every other of the process.
    id: u64,
    peer: SocketAddr,
    open: Arc<AtomicU32>,
    max: u32,
    busy: Arc<Busy>,
    tokens: Arc<Tokens>,
}

/// What the connection's calls have shown of their tokens.
#[derive(Debug, Default)]
struct Tokens {
    /// A call carried a valid one.
    valid: AtomicBool,
    /// A call was refused for its token (logged once per connection).
    refused: AtomicBool,
}

/// The calls of a connection that wait (streams, long-polls): while one
/// does, the connection is not idle, and its idle time counts from the end
/// of the last.
#[derive(Debug)]
struct Busy {
    calls: AtomicU32,
    last_end: Mutex<Instant>,
}

/// A waiting call of a connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct BusyCall(Arc<Busy>);

impl Drop for BusyCall {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open `Subscribe` or `Consume` stream of a connection, counted until
/// dropped.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    open: Arc<AtomicU32>,
    _busy: BusyCall,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The id of the next connection accepted.
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ConnInfo {
    /// This connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// A call of this connection carried a valid token.
    pub(crate) fn authenticated(&self) {
        self.tokens.valid.store(true, Ordering::Release);
    }

    /// A call of this connection was refused for its token: logged as a
    /// refused native `Hello` is, once per connection (a client may retry
    /// its calls on one connection many times).
    pub(crate) fn refused(&self, error: &crate::Error) {
        if !self.tokens.refused.swap(true, Ordering::AcqRel) {
            tracing::info!(peer = %self.peer, listener = super::LISTENER, error = %error,
                "gRPC call refused: not authenticated");
        }
    }

    /// Marks a call of this connection as waiting until the guard drops.
    pub(crate) fn busy(&self) -> BusyCall {
        self.busy.calls.fetch_add(1, Ordering::AcqRel);
        BusyCall(Arc::clone(&self.busy))
    }

    /// A slot for one more stream on this connection, or the native
    /// protocol's `RESOURCE_EXHAUSTED` naming the limit.
    pub(crate) fn open_stream(&self) -> Result<StreamSlot, pb::Error> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(StreamSlot {
                open: Arc::clone(&self.open),
                _busy: self.busy(),
            }),
            Err(live) => Err(admission::too_many_subscriptions(live as usize, self.max)),
        }
    }
}

/// Where the bytes read from a connection stand in its HTTP/2 frames, so
/// that only frames other than `PING` count as activity: keep-alive pings
/// (the server's, answered, and the client's) prove the peer is there, not
/// that it uses the connection.
#[derive(Debug)]
struct FrameScan {
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    filled: usize,
    payload_left: usize,
}

impl FrameScan {
    fn new() -> FrameScan {
        FrameScan {
            preface_left: CLIENT_PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            filled: 0,
            payload_left: 0,
        }
    }

    /// Walks the next bytes of the stream: whether they hold part of the
    /// preface or the header of a frame other than `PING`.
    fn active(&mut self, mut bytes: &[u8]) -> bool {
        let mut active = false;
        if self.preface_left > 0 && !bytes.is_empty() {
            let n = self.preface_left.min(bytes.len());
            self.preface_left -= n;
            bytes = &bytes[n..];
            active = true;
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == FRAME_HEADER_LEN {
                self.filled = 0;
                let h = self.header;
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                active |= h[3] != FRAME_PING;
            }
        }
        active
    }
}

/// The idle deadline of a connection: `limit` after the later of its last
/// frame and the end of its last waiting call, never while a call waits.
#[derive(Debug)]
struct Idle {
    limit: Option<Duration>,
    last_frame: Instant,
    sleep: Pin<Box<Sleep>>,
    scan: FrameScan,
}

impl Idle {
    fn new(limit: Option<Duration>) -> Idle {
        let now = Instant::now();
        Idle {
            limit,
            last_frame: now,
            sleep: Box::pin(tokio::time::sleep_until(now + limit.unwrap_or_default())),
            scan: FrameScan::new(),
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        if self.scan.active(bytes) {
            self.last_frame = Instant::now();
        }
    }

    /// `Ready` once the connection has been idle for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>, busy: &Busy) -> Poll<Duration> {
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let next = if busy.calls.load(Ordering::Acquire) > 0 {
                now + limit
            } else {
                let last_end = *busy.last_end.lock().unwrap_or_else(|p| p.into_inner());
                let quiet_since = self.last_frame.max(last_end);
                if now >= quiet_since + limit {
                    return Poll::Ready(limit);
                }
                quiet_since + limit
            };
            self.sleep.as_mut().reset(next);
        }
    }
}

/// An admitted gRPC connection: the socket, its slot and its deadlines.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: MaybeTls<TcpStream>,
    peer: SocketAddr,
    /// Whether a byte has arrived yet (a plaintext listener checks the
    /// first for a TLS client).
    started: bool,
    _ticket: Ticket,
    admission: Arc<Admission>,
    idle: Idle,
    write: Timer,
    /// Until a call with a valid token: when the connection closes
    /// without one.
    authenticate_by: Option<Pin<Box<Sleep>>>,
    /// Whether that deadline was put back once for a call just begun.
    grace_taken: bool,
    info: ConnInfo,
}

impl Conn {
    /// Fails the read once the time for an authenticated call has passed
    /// without one (counted as a `frame_timeout_ms` close).
    fn unauthenticated_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(by) = self.authenticate_by.as_mut() else {
            return Poll::Pending;
        };
        let valid = || self.info.tokens.valid.load(Ordering::Acquire);
        if !valid() && by.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // A call whose headers were read just now has its token checked
        // by a task of its own, maybe not yet: one second look.
        if !valid() && !self.grace_taken && self.idle.last_frame.elapsed() < AUTHENTICATE_GRACE {
            self.grace_taken = true;
            by.as_mut().reset(Instant::now() + AUTHENTICATE_GRACE);
            if by.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.authenticate_by = None;
        if self.info.tokens.valid.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.admission.count(Limit::Frame);
        tracing::debug!(peer = %self.peer, "gRPC connection closed: no call with a valid token within frame_timeout_ms");
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "no call with a valid token within frame_timeout_ms",
        ))
    }

    /// Fails the read once the connection is idle (counted as an idle close).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.idle.poll_expired(cx, &self.info.busy) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(limit) => {
                self.admission.count(Limit::Idle);
                tracing::debug!("gRPC connection closed by idle_timeout_ms");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no frame from the peer for {} ms (idle_timeout_ms)",
                        limit.as_millis()
                    ),
                )))
            }
        }
    }

    /// `result` of a write, flush or shutdown; a pending one fails once the
    /// write timer fired (counted as a write-timeout close).
    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.write.disarm();
                Poll::Ready(r)
            }
            Poll::Pending => match self.write.poll_expired(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(limit) => {
                    self.admission.count(Limit::Write);
                    tracing::debug!("gRPC connection closed by write_timeout_ms");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the peer took no bytes for {} ms (write_timeout_ms)",
                            limit.as_millis()
                        ),
                    )))
                }
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let read = &buf.filled()[before..];
                if !this.started && !read.is_empty() {
                    this.started = true;
                    if matches!(this.stream, MaybeTls::Plain(_)) && tls::is_tls_start(read[0]) {
                        tls::log_tls_client(this.peer, "grpc");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a TLS client on a plaintext listener",
                        )));
                    }
                }
                this.idle.read(read);
                Poll::Ready(r)
            }
            Poll::Pending => match this.unauthenticated_expired(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => this.idle_expired(cx),
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.written(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.written(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.written(cx, r)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// How long a connection's deadline for a call with a valid token is put
/// back, once, when a frame (a call's headers, maybe) arrived within this
/// of it.
const AUTHENTICATE_GRACE: Duration = Duration::from_secs(1);

/// Connections waiting for tonic to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// The connections accepted on `listener`, through `tls` and admitted;
/// refused ones are answered with an HTTP/2 `GOAWAY` carrying the refusal
/// and closed. Each connection's first byte and TLS handshake are awaited
/// in a task of its own, so a slow peer holds up no other.
/// Where `authenticate_within` is set (an auth file), a connection has that
/// long to make a call with a valid token.
pub(crate) fn incoming(
    listener: TcpListener,
    limits: Limits,
    authenticate_within: Option<Duration>,
    tls: Listener,
    broker: crate::broker::Broker,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (ready, accepted) = tokio::sync::mpsc::channel::<Conn>(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = crate::server::accept(&listener, super::LISTENER, &broker) => accepted,
                // The server stopped taking connections.
                _ = ready.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let admitted = limits.admission.admit(super::LISTENER, peer.ip());
            let (limits, tls, ready) = (limits.clone(), tls.clone(), ready.clone());
            let refused = admitted.is_err();
            tokio::spawn(async move {
                let serve = async {
                    let admission = Arc::clone(&limits.admission);
                    let timed_out = move || admission.count(Limit::Frame);
                    let Some(stream) = tls
                        .accept(stream, peer, limits.frame_timeout, timed_out)
                        .await
                    else {
                        return;
                    };
                    match admitted {
                        Ok(ticket) => {
                            let conn = Conn {
                                stream,
                                peer,
                                started: false,
                                _ticket: ticket,
                                admission: Arc::clone(&limits.admission),
                                idle: Idle::new(limits.idle_timeout),
                                write: Timer::new(limits.write_timeout),
                                authenticate_by: authenticate_within
                                    .map(|t| Box::pin(tokio::time::sleep(t))),
                                grace_taken: false,
                                info: ConnInfo {
                                    id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
                                    peer,
                                    open: Arc::default(),
                                    max: limits.max_subscriptions,
                                    busy: Arc::new(Busy {
                                        calls: AtomicU32::new(0),
                                        last_end: Mutex::new(Instant::now()),
                                    }),
                                    tokens: Arc::default(),
                                },
                            };
                            let _ = ready.send(conn).await;
                        }
                        Err(error) => refuse(stream, peer, error).await,
                    }
                };
                if refused {
                    limits.admission.refuse_within(serve).await;
                } else {
                    serve.await;
                }
            });
        }
    });
    futures_util::stream::unfold(accepted, |mut accepted| async move {
        let conn = accepted.recv().await?;
        Some((Ok(conn), accepted))
    })
}

/// Tells a refused peer why and closes: `SETTINGS`, then, once the peer's
/// first request arrived (or [`REFUSAL_LINGER`] passed), `GOAWAY`
/// `ENHANCE_YOUR_CALM` with no stream served and the refusal as its debug
/// data. gRPC clients fail that request with `RESOURCE_EXHAUSTED` and the
/// refusal; a `GOAWAY` sent before the request would only fail it as
/// cancelled, without the reason.
async fn refuse<S>(mut stream: S, peer: SocketAddr, error: pb::Error)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(%peer, reason = %error.message, "gRPC connection refused");
    let debug = error.message.as_bytes();
    let mut goaway = Vec::with_capacity(9 + 8 + debug.len());
    let len = (8 + debug.len()) as u32;
    goaway.extend_from_slice(&len.to_be_bytes()[1..]);
    goaway.extend_from_slice(&[FRAME_GOAWAY, 0, 0, 0, 0, 0]);
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream id: none served
    goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    goaway.extend_from_slice(debug);
    let settings = [0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0];
    if stream.write_all(&settings).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(REFUSAL_LINGER, first_request(&mut stream)).await;
    let close = async {
        stream.write_all(&goaway).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, close).await;
}

/// Reads the peer's bytes until its first `HEADERS` frame (a request) has
/// begun, the peer closes, or it sent more than [`REFUSAL_READ_MAX`].
async fn first_request<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<()> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || seen.len() > REFUSAL_READ_MAX {
            return Ok(());
        }
        seen.extend_from_slice(&chunk[..n]);
        let mut at = CLIENT_PREFACE_LEN;
        while let Some(header) = seen.get(at..at + 9) {
            if header[3] == FRAME_HEADERS {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            at += 9 + len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_frames_other_than_ping_are_activity_however_the_bytes_are_split() {
        let mut scan = FrameScan::new();
        assert!(
            scan.active(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            "the preface"
        );
        let ping = b"\0\0\x08\x06\0\0\0\0\0pingpong";
        assert!(!scan.active(ping));
        // A PING split mid-header and mid-payload.
        assert!(!scan.active(&ping[..4]));
        assert!(!scan.active(&ping[4..12]));
        assert!(!scan.active(&ping[12..]));
        // HEADERS (3-byte payload) after a PING in one read, then split.
        let headers = b"\0\0\x03\x01\x04\0\0\0\x01abc";
        let both = [&ping[..], &headers[..]].concat();
        assert!(scan.active(&both));
        assert!(!scan.active(&ping[..5]));
        assert!(!scan.active(&ping[5..]));
        assert!(!scan.active(&headers[..2]));
        assert!(scan.active(&headers[2..9]));
        assert!(!scan.active(&headers[9..]), "payload only");
    }
}
