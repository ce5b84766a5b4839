//! A connection's send queue, bounded in bytes as well as in frames, so a
//! client that stops reading holds at most [`QUEUE_BYTES`] of replies and
//! deliveries (plus the socket's buffers) however much is produced; its
//! writer then fails on the write timeout and the connection closes. Every
//! sender (request handlers, subscriptions) learns at once when the writer
//! has stopped.

use crate::protocol::codec::FrameError;
use crate::protocol::outbound::Outbound;
use crate::protocol::outbox;
use futures_util::{Sink, SinkExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Most frames queued for the writer.
const QUEUE_FRAMES: usize = 256;
/// Most bytes of frames queued for the writer; a frame larger than this
/// waits for an empty queue and goes alone.
pub(super) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Longest the last frames of a closing connection wait for queue room.
pub(super) const FINAL_FRAMES_WAIT: Duration = Duration::from_secs(1);

type Queued = (Outbound, OwnedSemaphorePermit);

/// The writer is gone: nothing more reaches the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closed;

/// The sending side of a connection's queue.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

impl Outgoing {
    /// Starts the writer of `sink`. It ends once every `Outgoing` is dropped
    /// (closing the sink) or on the first failed write; `stalled` is called
    /// when that failure is the write timeout.
    pub(super) fn start<S>(
        sink: S,
        peer: SocketAddr,
        stalled: impl FnOnce() + Send + 'static,
    ) -> (Outgoing, JoinHandle<()>)
    where
        S: Sink<Outbound, Error = FrameError> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel::<Queued>(QUEUE_FRAMES);
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        let writer_budget = Arc::clone(&budget);
        let writer = tokio::spawn(async move {
            // The bytes a frame holds in the queue are free once the codec
            // has them (its buffer is flushed past a small boundary).
            let sink = sink.with(|(frame, _bytes): Queued| {
                futures_util::future::ready(Ok::<_, FrameError>(frame))
            });
            match outbox::run(sink, rx).await {
                Ok(()) => {}
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    tracing::debug!(%peer, error = %e, "closing a connection that does not read");
                    stalled();
                }
                Err(e) => tracing::debug!(%peer, error = %e, "write failed"),
            }
            // Wakes senders waiting for room: they fail instead.
            writer_budget.close();
        });
        (Outgoing { tx, budget }, writer)
    }

    /// Queues `frame`, waiting while the queue is full.
    pub(super) async fn send(&self, frame: impl Into<Outbound>) -> Result<(), Closed> {
        let frame = frame.into();
        let len = prost::Message::encoded_len(&frame).clamp(1, QUEUE_BYTES);
        let bytes = Arc::clone(&self.budget)
            .acquire_many_owned(len as u32)
            .await
            .map_err(|_| Closed)?;
        self.tx.send((frame, bytes)).await.map_err(|_| Closed)
    }

    /// Resolves once the writer has stopped.
    pub(super) async fn closed(&self) {
        self.tx.closed().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::FrameCodec;
    use crate::protocol::pb;
    use tokio_util::codec::FramedWrite;

    fn big(n: usize) -> pb::ServerFrame {
        pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
                subscription_id: 1,
                messages: vec![pb::Message {
                    value: vec![7u8; n].into(),
                    ..Default::default()
                }],
                error: None,
                skipped_offset: None,
            })),
        }
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_holds_a_bounded_queue() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let sink = FramedWrite::new(
            super::super::deadline::StallGuard::new(server, Some(Duration::from_millis(300))),
            FrameCodec::<pb::ClientFrame, Outbound>::new(64 << 20),
        );
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
        let (out, writer) = Outgoing::start(sink, peer, move || {
            let _ = stalled_tx.send(());
        });
        // Far more than the queue holds: the senders wait, then fail once
        // the writer gives up on the peer.
        let mut sent = 0usize;
        for _ in 0..100 {
            if out.send(big(256 * 1024)).await.is_err() {
                break;
            }
            sent += 1;
        }
        // The queue, and a few frames in the writer's hands.
        assert!(
            sent <= QUEUE_BYTES / (256 * 1024) + 4,
            "{sent} frames of 256 KiB were taken"
        );
        stalled_rx.await.expect("the write timeout was reported");
        writer.await.expect("writer ends");
        assert!(out.send(big(1)).await.is_err(), "closed for good");
        drop(client);
    }
}
