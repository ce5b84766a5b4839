//! A connection's send queue, bounded in bytes as well as in frames, so a
//! client that stops reading holds at most [`QUEUE_BYTES`] of replies and
//! deliveries (plus the socket's buffers) however much is produced; its
//! writer then fails on the write timeout and the connection closes. Every
//! sender (request handlers, subscriptions) learns at once when the writer
//! has stopped.
//!
//! A frame sent while nothing is queued and nobody is writing is written
//! by its sender in place, without the hand-off to the writer task (a reply
//! or a delivery on a quiet connection: one task wake-up less on its way);
//! frames that find the connection busy queue behind what is being
//! written, so each sender's frames keep their order.

use crate::protocol::codec::FrameError;
use crate::protocol::outbound::Outbound;
use crate::protocol::outbox::MAX_FRAMES_PER_FLUSH;
use futures_util::{Sink, SinkExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Most frames queued for the writer.
const QUEUE_FRAMES: usize = 256;
/// Most bytes of frames queued for the writer; a frame larger than this
/// waits for an empty queue and goes alone.
pub(super) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Longest the last frames of a closing connection wait for queue room.
pub(super) const FINAL_FRAMES_WAIT: Duration = Duration::from_secs(1);

type Queued = (Outbound, OwnedSemaphorePermit);
type FrameSink = Pin<Box<dyn Sink<Outbound, Error = FrameError> + Send>>;

/// The writer is gone: nothing more reaches the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closed;

/// The socket's sending side, shared by the writer task and by senders
/// writing in place.
struct Line {
    /// `None` once a write failed.
    sink: tokio::sync::Mutex<Option<FrameSink>>,
    /// Frames given to the queue and not yet written: a sender writes in
    /// place only when this is 0, so no frame overtakes one queued before it.
    queued: AtomicUsize,
    /// A sender's failed write, for the writer to report and stop on.
    failure: Mutex<Option<FrameError>>,
    failed: Notify,
}

impl Line {
    fn fail(&self, e: FrameError) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(e);
        }
        self.failed.notify_one();
    }

    fn failure(&self) -> FrameError {
        self.failure
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or_else(|| FrameError::Io(std::io::ErrorKind::BrokenPipe.into()))
    }
}

/// A frame counted in [`Line::queued`]: uncounted again if it never
/// reaches the queue (its send failed or was cancelled).
struct Counted<'a> {
    line: &'a Line,
    queued: bool,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if !self.queued {
            self.line.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The sending side of a connection's queue.
#[derive(Clone)]
pub(super) struct Outgoing {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    line: Arc<Line>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("queued", &self.line.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
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
        S: Sink<Outbound, Error = FrameError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Queued>(QUEUE_FRAMES);
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        let line = Arc::new(Line {
            sink: tokio::sync::Mutex::new(Some(Box::pin(sink))),
            queued: AtomicUsize::new(0),
            failure: Mutex::new(None),
            failed: Notify::new(),
        });
        let writer_budget = Arc::clone(&budget);
        let writer_line = Arc::clone(&line);
        let writer = tokio::spawn(async move {
            match write_queued(&writer_line, rx).await {
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
        (Outgoing { tx, budget, line }, writer)
    }

    /// Sends `frame`: written in place when the connection is quiet,
    /// otherwise queued, waiting while the queue is full.
    pub(super) async fn send(&self, frame: impl Into<Outbound>) -> Result<(), Closed> {
        let frame = frame.into();
        if self.line.queued.load(Ordering::Acquire) == 0
            && let Ok(mut sink) = self.line.sink.try_lock()
            && self.line.queued.load(Ordering::Acquire) == 0
        {
            let Some(s) = sink.as_mut() else {
                return Err(Closed);
            };
            // Cancelled half way, the frame's bytes stay in the codec's
            // buffer and go out with the next write.
            return match s.send(frame).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    *sink = None;
                    self.line.fail(e);
                    Err(Closed)
                }
            };
        }
        self.line.queued.fetch_add(1, Ordering::AcqRel);
        let mut counted = Counted {
            line: &self.line,
            queued: false,
        };
        let len = prost::Message::encoded_len(&frame).clamp(1, QUEUE_BYTES);
        let bytes = Arc::clone(&self.budget)
            .acquire_many_owned(len as u32)
            .await
            .map_err(|_| Closed)?;
        self.tx.send((frame, bytes)).await.map_err(|_| Closed)?;
        counted.queued = true;
        Ok(())
    }

    /// Resolves once the writer has stopped.
    pub(super) async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The writer: frames from `queue` go out in queue order, every frame
/// already waiting encoded before one flush, until every sender is gone
/// (then the sink is closed) or a write fails, its own or a sender's.
async fn write_queued(line: &Line, mut queue: mpsc::Receiver<Queued>) -> Result<(), FrameError> {
    loop {
        let next = tokio::select! {
            biased;
            () = line.failed.notified() => return Err(line.failure()),
            next = queue.recv() => next,
        };
        let Some((first, permit)) = next else { break };
        let mut guard = line.sink.lock().await;
        let Some(sink) = guard.as_mut() else {
            return Err(line.failure());
        };
        let mut written = 1;
        let fed = async {
            // The bytes a frame holds in the queue are free once the codec
            // has them.
            sink.feed(first).await?;
            drop(permit);
            while written < MAX_FRAMES_PER_FLUSH {
                match queue.try_recv() {
                    Ok((frame, _permit)) => {
                        written += 1;
                        sink.feed(frame).await?;
                    }
                    Err(_) => break,
                }
            }
            sink.flush().await
        }
        .await;
        line.queued.fetch_sub(written, Ordering::AcqRel);
        if let Err(e) = fed {
            // Senders must not write into a sink that failed.
            *guard = None;
            return Err(e);
        }
    }
    match line.sink.lock().await.take() {
        Some(mut sink) => sink.close().await,
        None => Err(line.failure()),
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

    fn numbered(sender: u64, n: u64) -> pb::ServerFrame {
        pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
                subscription_id: sender,
                messages: vec![pb::Message {
                    offset: n,
                    value: vec![1u8; 3000].into(),
                    ..Default::default()
                }],
                error: None,
                skipped_offset: None,
            })),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_senders_frames_arrive_in_order_whether_written_in_place_or_queued() {
        use futures_util::StreamExt;
        // A small pipe and a slow reader: some frames find the connection
        // quiet and are written in place, others queue behind them.
        let (client, server) = tokio::io::duplex(8 * 1024);
        let sink = FramedWrite::new(
            super::super::deadline::StallGuard::new(server, Some(Duration::from_secs(10))),
            FrameCodec::<pb::ClientFrame, Outbound>::new(64 << 20),
        );
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let (out, writer) = Outgoing::start(sink, peer, || {});
        const SENDERS: u64 = 4;
        const EACH: u64 = 300;
        let reader = tokio::spawn(async move {
            let mut frames = tokio_util::codec::FramedRead::new(
                client,
                FrameCodec::<pb::ServerFrame, pb::ClientFrame>::new(64 << 20),
            );
            let mut next = [0u64; SENDERS as usize];
            let mut got = 0;
            while let Some(frame) = frames.next().await {
                let Some(pb::server_frame::Kind::Delivery(d)) = frame.expect("a frame").kind else {
                    panic!("a delivery");
                };
                let n = d.messages[0].offset;
                let sender = d.subscription_id as usize;
                assert_eq!(n, next[sender], "sender {sender}'s frames in order");
                next[sender] += 1;
                got += 1;
                if got % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            got
        });
        let mut senders = tokio::task::JoinSet::new();
        for sender in 0..SENDERS {
            let out = out.clone();
            senders.spawn(async move {
                for n in 0..EACH {
                    out.send(numbered(sender, n))
                        .await
                        .expect("connection open");
                    if n % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
        }
        while let Some(done) = senders.join_next().await {
            done.expect("sender");
        }
        drop(out);
        writer.await.expect("writer ends");
        assert_eq!(reader.await.expect("reader"), SENDERS * EACH);
    }

    #[tokio::test]
    async fn a_peer_gone_stops_the_writer_and_every_sender_learns_it() {
        let (client, server) = tokio::io::duplex(1024);
        let sink = FramedWrite::new(
            super::super::deadline::StallGuard::new(server, Some(Duration::from_secs(10))),
            FrameCodec::<pb::ClientFrame, Outbound>::new(64 << 20),
        );
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let (out, writer) = Outgoing::start(sink, peer, || panic!("not a stall"));
        drop(client);
        // Written in place: the write fails at once.
        assert!(out.send(big(10)).await.is_err());
        tokio::time::timeout(Duration::from_secs(5), out.closed())
            .await
            .expect("the writer stopped");
        assert!(out.send(big(10)).await.is_err(), "closed for good");
        writer.await.expect("writer ends");
    }
}
