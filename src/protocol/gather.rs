//! A native connection's writer: frames are encoded into one buffer, except
//! the values of records read in place, which go to the socket straight
//! from the log's maps in vectored writes (`writev`). A fetch reply of a
//! megabyte is not copied into a buffer on its way: the kernel's copy into
//! the socket is the only one. Values shorter than [`BY_REFERENCE_MIN`] are
//! copied, since a slice of their own costs more than the copy; a writer
//! that cannot write vectored (TLS) gets every byte in the buffer.
//!
//! The bytes written are exactly what [`FrameCodec`](super::codec::FrameCodec)
//! encodes for the same frames.

use super::codec::{FrameError, PREFIX_LEN, put_prefix};
use super::outbound::{Out, Outbound};
use bytes::{Bytes, BytesMut};
use futures_util::Sink;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;

/// Values at least this long are sent from where they lie, not copied.
pub const BY_REFERENCE_MIN: usize = 512;
/// Bytes queued (buffered or referenced) before a new frame waits for them
/// to be written.
const BACKPRESSURE: usize = 128 * 1024;
/// Most slices in one vectored write (Linux's `IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// A run of bytes to write.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// `buf[start..end]`.
    Buf { start: usize, end: usize },
    /// `views[view][start..end]`.
    View {
        view: usize,
        start: usize,
        end: usize,
    },
}

impl Part {
    fn len(&self) -> usize {
        match *self {
            Part::Buf { start, end } | Part::View { start, end, .. } => end - start,
        }
    }
}

/// Frames encoded and not yet written: a buffer, and the parts to write in
/// order, each a range of the buffer or of a view of a map.
#[derive(Debug, Default)]
struct Gather {
    buf: BytesMut,
    parts: Vec<Part>,
    views: Vec<Bytes>,
    /// `views[frame_views..]` are the views of the frame being encoded.
    frame_views: usize,
    /// Where the bytes of `buf` not yet in a part start.
    mark: usize,
    /// Bytes in `views` parts.
    referenced: usize,
    /// Parts written, and bytes written of the next one.
    sent_parts: usize,
    sent_in_part: usize,
    /// Whether values may be written from their views.
    by_reference: bool,
}

impl Out for Gather {
    type Buf = BytesMut;

    fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn value(&mut self, v: &[u8]) {
        if v.len() >= BY_REFERENCE_MIN
            && let Some((view, start)) = self.locate(v)
        {
            self.cut();
            self.parts.push(Part::View {
                view,
                start,
                end: start + v.len(),
            });
            self.referenced += v.len();
            return;
        }
        self.buf.extend_from_slice(v);
    }
}

impl Gather {
    /// Encodes `frame`, prefix and body, or refuses it over the limit.
    fn push(&mut self, frame: &Outbound, max_frame_bytes: u32) -> Result<(), FrameError> {
        let len = prost::Message::encoded_len(frame);
        let views = if self.by_reference {
            frame.views()
        } else {
            &[]
        };
        // Room for the whole frame unless its values may stay in the maps.
        let room = if views.is_empty() { len } else { 0 };
        let before = self.queued();
        put_prefix(len, max_frame_bytes, room, &mut self.buf)?;
        self.frame_views = self.views.len();
        self.views.extend(views.iter().cloned());
        frame.encode_to(self);
        debug_assert_eq!(
            self.queued() - before,
            PREFIX_LEN + len,
            "encoded_len is exact"
        );
        Ok(())
    }

    /// Bytes encoded and not yet written (written ones included until the
    /// last part is).
    fn queued(&self) -> usize {
        self.buf.len() + self.referenced
    }

    /// Where `v` lies in a view of the frame being encoded, if it does.
    fn locate(&self, v: &[u8]) -> Option<(usize, usize)> {
        let at = v.as_ptr() as usize;
        (self.frame_views..self.views.len()).find_map(|i| {
            let view = &self.views[i];
            let base = view.as_ptr() as usize;
            (at >= base && at + v.len() <= base + view.len()).then(|| (i, at - base))
        })
    }

    /// Ends the buffer part under way, so a view part can follow it.
    fn cut(&mut self) {
        if self.buf.len() > self.mark {
            self.parts.push(Part::Buf {
                start: self.mark,
                end: self.buf.len(),
            });
            self.mark = self.buf.len();
        }
    }

    fn bytes(&self, part: &Part) -> &[u8] {
        match *part {
            Part::Buf { start, end } => &self.buf[start..end],
            Part::View { view, start, end } => &self.views[view][start..end],
        }
    }

    /// Writes every queued part to `io`, then forgets them (keeping the
    /// buffer's room).
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        mut io: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.cut();
        while self.sent_parts < self.parts.len() {
            let pending = &self.parts[self.sent_parts..];
            let mut slices = Vec::with_capacity(pending.len().min(MAX_SLICES));
            for (i, part) in pending.iter().take(MAX_SLICES).enumerate() {
                let bytes = self.bytes(part);
                let skip = if i == 0 { self.sent_in_part } else { 0 };
                slices.push(IoSlice::new(&bytes[skip..]));
            }
            let n = ready!(io.as_mut().poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        self.buf.clear();
        self.parts.clear();
        self.views.clear();
        self.frame_views = 0;
        self.mark = 0;
        self.referenced = 0;
        self.sent_parts = 0;
        self.sent_in_part = 0;
        Poll::Ready(Ok(()))
    }

    /// Notes `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.sent_parts < self.parts.len() {
            let left = self.parts[self.sent_parts].len() - self.sent_in_part;
            if n < left {
                self.sent_in_part += n;
                return;
            }
            n -= left;
            self.sent_parts += 1;
            self.sent_in_part = 0;
        }
    }
}

/// A sink of [`Outbound`] frames onto a writer, values by reference where
/// the writer takes vectored writes.
#[derive(Debug)]
pub struct GatherSink<W> {
    io: W,
    gather: Gather,
    max_frame_bytes: u32,
}

impl<W: AsyncWrite + Unpin> GatherSink<W> {
    /// Frames onto `io`, refusing any over `max_frame_bytes`.
    pub fn new(io: W, max_frame_bytes: u32) -> GatherSink<W> {
        let gather = Gather {
            by_reference: io.is_write_vectored(),
            ..Gather::default()
        };
        GatherSink {
            io,
            gather,
            max_frame_bytes,
        }
    }
}

impl<W: AsyncWrite + Unpin> Sink<Outbound> for GatherSink<W> {
    type Error = FrameError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        let this = self.get_mut();
        if this.gather.queued() >= BACKPRESSURE {
            ready!(this.gather.poll_write(Pin::new(&mut this.io), cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, frame: Outbound) -> Result<(), FrameError> {
        let this = self.get_mut();
        this.gather.push(&frame, this.max_frame_bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        let this = self.get_mut();
        ready!(this.gather.poll_write(Pin::new(&mut this.io), cx))?;
        Pin::new(&mut this.io)
            .poll_flush(cx)
            .map_err(FrameError::Io)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().io)
            .poll_shutdown(cx)
            .map_err(FrameError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Deliveries, DeliveryLimits, Topic};
    use crate::protocol::codec::FrameCodec;
    use crate::protocol::outbound::WireMessages;
    use crate::protocol::outbound::tests::{arb_message, topic};
    use crate::protocol::pb;
    use crate::storage::io::SimDisk;
    use crate::storage::{NewMessage, Offset};
    use futures_util::SinkExt;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use tokio_util::codec::Encoder;

    /// A socket that takes a few bytes per write, sometimes none until
    /// polled again, and records them.
    struct Trickle {
        out: Vec<u8>,
        steps: Vec<usize>,
        calls: usize,
        vectored: bool,
    }

    impl Trickle {
        fn take(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
            self.calls += 1;
            let step = self.steps[self.calls % self.steps.len()];
            if step == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut left = step;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(step - left))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().take(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.vectored {
                this.take(cx, bufs)
            } else {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                this.take(cx, &[IoSlice::new(first)])
            }
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn ping(nonce: u64) -> Outbound {
        pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Response(pb::Response {
                request_id: nonce,
                result: Some(pb::response::Result::Ping(pb::PingResponse { nonce })),
            })),
        }
        .into()
    }

    /// A topic holding `messages`.
    fn stored(messages: &[NewMessage]) -> Topic {
        topic(&Arc::new(SimDisk::new()), messages, &BTreeSet::new())
    }

    /// The frames of a fetch from `from`, a delivery of the same records,
    /// and pings between them.
    fn frames(t: &Topic, from: u64) -> Vec<Outbound> {
        let limits = DeliveryLimits {
            messages: 1000,
            bytes: 1 << 20,
            message_bytes: 1 << 20,
        };
        let records = t.read_within(Offset(from), limits).expect("read");
        let deliveries = Deliveries::from(records);
        let end = t.log().end().0;
        vec![
            ping(1),
            Outbound::Fetch {
                request_id: 7,
                next_offset: deliveries.last_offset().map_or(from, |o| o.0 + 1),
                messages: WireMessages::new(deliveries.clone()),
                end_offset: end,
            },
            ping(2),
            Outbound::Delivery {
                subscription_id: 3,
                messages: WireMessages::new(deliveries),
            },
            ping(3),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the socket takes per write, and whether or not it takes
        /// vectored writes, the bytes on the wire are the codec's.
        #[test]
        fn the_wire_carries_the_codecs_bytes(
            messages in proptest::collection::vec(arb_message(), 1..20),
            from in 0u64..4,
            steps in proptest::collection::vec(0usize..3000, 1..8),
            vectored in any::<bool>(),
            flush_each in any::<bool>(),
        ) {
            let steps = if steps.iter().all(|&s| s == 0) { vec![1] } else { steps };
            let t = stored(&messages);
            let mut expected = BytesMut::new();
            let mut codec = FrameCodec::<pb::ClientFrame, Outbound>::new(16 << 20);
            for frame in frames(&t, from) {
                codec.encode(frame, &mut expected).expect("encodes");
            }
            let trickle = Trickle { out: Vec::new(), steps, calls: 0, vectored };
            let mut sink = GatherSink::new(trickle, 16 << 20);
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(async {
                for frame in frames(&t, from) {
                    if flush_each {
                        sink.send(frame).await.expect("sent");
                    } else {
                        sink.feed(frame).await.expect("fed");
                    }
                }
                sink.close().await.expect("closed");
            });
            prop_assert_eq!(&sink.io.out[..], &expected[..]);
            prop_assert!(sink.gather.parts.is_empty() && sink.gather.buf.is_empty());
        }
    }

    #[tokio::test]
    async fn large_values_are_written_from_the_map() {
        let messages: Vec<NewMessage> = (0..8u8)
            .map(|i| NewMessage::from_value(vec![i; 2 * BY_REFERENCE_MIN]))
            .collect();
        let trickle = Trickle {
            out: Vec::new(),
            steps: vec![usize::MAX],
            calls: 0,
            vectored: true,
        };
        let mut sink = GatherSink::new(trickle, 16 << 20);
        let frames = frames(&stored(&messages), 0);
        let fetch = &frames[1];
        sink.gather.push(fetch, 16 << 20).expect("fits");
        let referenced = sink.gather.referenced;
        assert_eq!(
            referenced,
            8 * 2 * BY_REFERENCE_MIN,
            "every value stays in the map"
        );
        assert!(
            sink.gather.buf.len() < 8 * 32,
            "only the fields are buffered: {} bytes",
            sink.gather.buf.len()
        );
        sink.flush().await.expect("written");
        let mut expected = BytesMut::new();
        let mut codec = FrameCodec::<pb::ClientFrame, Outbound>::new(16 << 20);
        for frame in frames.into_iter().skip(1).take(1) {
            codec.encode(frame, &mut expected).expect("encodes");
        }
        assert_eq!(&sink.io.out[..], &expected[..]);
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused() {
        let messages = vec![NewMessage::from_value(vec![1u8; 4000])];
        let trickle = Trickle {
            out: Vec::new(),
            steps: vec![usize::MAX],
            calls: 0,
            vectored: true,
        };
        let mut sink = GatherSink::new(trickle, 1000);
        let fetch = frames(&stored(&messages), 0).swap_remove(1);
        let err = sink.send(fetch).await.expect_err("too large");
        assert!(
            matches!(err, FrameError::TooLarge { max: 1000, .. }),
            "{err}"
        );
        assert!(sink.io.out.is_empty(), "nothing of it was written");
    }
}
