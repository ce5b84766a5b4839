//! Deadlines on a connection's socket, so that a peer that trickles bytes or
//! stops reading holds its connection for a bounded time: a frame must
//! arrive whole within `frame_timeout` of its first byte ([`FrameReader`]),
//! and a write must get a byte into the socket within `write_timeout`
//! ([`StallGuard`]). The idle timeout between frames is the connection's own
//! business (it knows which requests are still being served).

use crate::protocol::codec::FrameError;
use futures_util::Stream;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};
use tokio_util::codec::{Decoder, FramedRead};

/// Why a frame could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The bytes or the stream were bad.
    Frame(FrameError),
    /// A frame started arriving longer than the frame timeout ago and is
    /// still incomplete.
    FrameTimeout(Duration),
}

/// A timer armed on demand (also the gRPC listener's idle and write
/// deadlines, [`crate::grpc`]).
#[derive(Debug)]
pub(crate) struct Timer {
    limit: Option<Duration>,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl Timer {
    /// A disarmed timer for `limit` (`None`: never expires).
    pub(crate) fn new(limit: Option<Duration>) -> Timer {
        Timer {
            limit,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        }
    }

    /// Stops the timer; the next [`Timer::poll_expired`] starts it afresh.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }

    /// Arms the timer if it is not running, and polls it: `Ready` once the
    /// limit has passed since it was armed. Never ready without a limit.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Duration> {
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        if !self.armed {
            self.armed = true;
            self.sleep.as_mut().reset(Instant::now() + limit);
        }
        ready!(self.sleep.as_mut().poll(cx));
        Poll::Ready(limit)
    }
}

/// Frames read from `R`, with the frame deadline: once the read buffer holds
/// part of a frame, the rest must follow within the limit.
#[derive(Debug)]
pub(super) struct FrameReader<R, D> {
    inner: FramedRead<R, D>,
    timer: Timer,
}

impl<R, D> FrameReader<R, D> {
    /// Reads frames from `inner`; `frame_timeout` `None` sets no deadline.
    pub(super) fn new(inner: FramedRead<R, D>, frame_timeout: Option<Duration>) -> Self {
        FrameReader {
            inner,
            timer: Timer::new(frame_timeout),
        }
    }

    /// Bytes of a frame still arriving, received so far (0: none is; the
    /// idle timeout governs a connection only between frames, or, with no
    /// frame timeout, a frame that stopped arriving).
    pub(super) fn frame_bytes(&self) -> usize {
        self.inner.read_buffer().len()
    }

    /// The decoder (what it knows of the last frame).
    pub(super) fn decoder(&self) -> &D {
        self.inner.decoder()
    }

    /// The stream read from (what is buffered and not yet a frame is
    /// dropped).
    pub(super) fn into_inner(self) -> R {
        self.inner.into_inner()
    }
}

impl<R, D> Stream for FrameReader<R, D>
where
    R: tokio::io::AsyncRead + Unpin,
    D: Decoder<Error = FrameError> + Unpin,
{
    type Item = Result<D::Item, ReadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            this.timer.disarm();
            return Poll::Ready(item.map(|r| r.map_err(ReadError::Frame)));
        }
        // Pending: the decoder wants more bytes than the socket had.
        if this.inner.read_buffer().is_empty() {
            this.timer.disarm();
            return Poll::Pending;
        }
        let limit = ready!(this.timer.poll_expired(cx));
        Poll::Ready(Some(Err(ReadError::FrameTimeout(limit))))
    }
}

/// A stream whose writes fail with `TimedOut` once a write, flush or
/// shutdown has waited the limit without the socket taking anything: the
/// peer stopped reading (or vanished without a word). From then on every
/// write and every read fails too, so whatever drives the stream (an
/// HTTP or websocket library that only logs a failed write) ends it.
pub(crate) struct StallGuard<W> {
    inner: W,
    timer: Timer,
    /// Called once, when the limit fires (a metric of closes by limit).
    on_stall: Option<Box<dyn Fn() + Send + Sync>>,
    /// The limit, once it fired.
    stalled: Option<Duration>,
    /// The task waiting to read, woken when the limit fires so that it
    /// sees the failure too.
    reader: Option<std::task::Waker>,
}

impl<W> std::fmt::Debug for StallGuard<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StallGuard")
            .field("timer", &self.timer)
            .finish()
    }
}

impl<W> StallGuard<W> {
    /// Guards `inner`; `write_timeout` `None` never times out.
    pub(crate) fn new(inner: W, write_timeout: Option<Duration>) -> Self {
        StallGuard {
            inner,
            timer: Timer::new(write_timeout),
            on_stall: None,
            stalled: None,
            reader: None,
        }
    }

    /// Calls `f` when the limit fires.
    pub(crate) fn on_stall(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_stall = Some(Box::new(f));
        self
    }

    /// `result` of a write, flush or shutdown: a pending one fails once the
    /// timer fired; a finished one stops the timer.
    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(r) = result {
            self.timer.disarm();
            return Poll::Ready(r);
        }
        let limit = ready!(self.timer.poll_expired(cx));
        self.stalled = Some(limit);
        if let Some(f) = &self.on_stall {
            f();
        }
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        Poll::Ready(Err(stalled_error(limit)))
    }
}

/// The error of every use of a [`StallGuard`] once its limit fired.
fn stalled_error(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the peer took no bytes for {} ms (write_timeout_ms)",
            limit.as_millis()
        ),
    )
}

impl<W: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(limit) = this.stalled {
            return Poll::Ready(Err(stalled_error(limit)));
        }
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_pending() && this.timer.limit.is_some() {
            match &mut this.reader {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        read
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallGuard<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(limit) = this.stalled {
            return Poll::Ready(Err(stalled_error(limit)));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(limit) = this.stalled {
            return Poll::Ready(Err(stalled_error(limit)));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(limit) = this.stalled {
            return Poll::Ready(Err(stalled_error(limit)));
        }
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.written(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(limit) = this.stalled {
            return Poll::Ready(Err(stalled_error(limit)));
        }
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.written(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::FrameCodec;
    use crate::protocol::pb;
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    type Codec = FrameCodec<crate::protocol::request::ClientIn, pb::ServerFrame>;

    #[tokio::test]
    async fn a_frame_cut_short_times_out_and_a_quiet_stream_does_not() {
        let (mut client, server) = tokio::io::duplex(64);
        let limit = Duration::from_millis(100);
        let mut frames = FrameReader::new(FramedRead::new(server, Codec::new(1024)), Some(limit));
        // Nothing sent: no deadline, however long.
        assert!(
            tokio::time::timeout(limit * 3, frames.next())
                .await
                .is_err()
        );
        client.write_all(&[0, 0, 0, 0, 9, 8]).await.expect("write");
        let started = Instant::now();
        match frames.next().await {
            Some(Err(ReadError::FrameTimeout(l))) => assert_eq!(l, limit),
            other => panic!("expected a frame timeout, got {other:?}"),
        }
        assert!(started.elapsed() >= limit);
    }

    #[tokio::test]
    async fn a_write_the_peer_never_takes_times_out() {
        let (client, server) = tokio::io::duplex(16);
        let mut w = StallGuard::new(server, Some(Duration::from_millis(100)));
        w.write_all(&[1; 16]).await.expect("fits the buffer");
        let err = w.write_all(&[2; 16]).await.expect_err("peer reads nothing");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("write_timeout_ms"), "{err}");
        drop(client);
    }
}
