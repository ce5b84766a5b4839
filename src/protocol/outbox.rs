//! A connection's writer, shared by server and client: frames queued by many
//! tasks go out in queue order, every frame already waiting is encoded
//! before one flush, so a burst costs one socket write instead of one each.

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

/// Most frames encoded before a flush. The sink still writes whenever its
/// buffer passes its own limit; this only bounds how long the last few
/// frames of a burst wait while senders keep the queue from running dry.
pub const MAX_FRAMES_PER_FLUSH: usize = 128;

/// Writes frames from `queue` to `sink` until every sender is gone, then
/// closes the sink. Returns the first write error (the queue is dropped with
/// it, so senders learn the connection is gone).
pub async fn run<S, T>(mut sink: S, mut queue: mpsc::Receiver<T>) -> Result<(), S::Error>
where
    S: Sink<T> + Unpin,
{
    while let Some(first) = queue.recv().await {
        sink.feed(first).await?;
        for _ in 1..MAX_FRAMES_PER_FLUSH {
            match queue.try_recv() {
                Ok(frame) => sink.feed(frame).await?,
                Err(_) => break,
            }
        }
        sink.flush().await?;
    }
    sink.close().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Records what was fed and where each flush fell.
    #[derive(Default)]
    struct Recorder {
        fed: Vec<u32>,
        flushed_after: Vec<usize>,
        closed: bool,
    }

    impl Sink<u32> for Recorder {
        type Error = std::convert::Infallible;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: u32) -> Result<(), Self::Error> {
            self.fed.push(item);
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            let n = self.fed.len();
            if self.flushed_after.last() != Some(&n) {
                self.flushed_after.push(n);
            }
            Poll::Ready(Ok(()))
        }

        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.closed = true;
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn queued_frames_share_one_flush_and_keep_their_order() {
        let (tx, rx) = mpsc::channel(1024);
        let total = MAX_FRAMES_PER_FLUSH as u32 + 72;
        for i in 0..total {
            tx.send(i).await.expect("queue open");
        }
        drop(tx);
        let mut sink = Recorder::default();
        let Ok(()) = run(&mut sink, rx).await;
        assert_eq!(sink.fed, (0..total).collect::<Vec<_>>());
        assert_eq!(
            sink.flushed_after,
            vec![MAX_FRAMES_PER_FLUSH, total as usize],
            "one flush per full batch, one for the rest"
        );
        assert!(sink.closed, "the sink is closed once the senders are gone");
    }

    #[tokio::test]
    async fn a_lone_frame_is_flushed_without_waiting_for_more() {
        let (tx, rx) = mpsc::channel(8);
        let mut sink = Recorder::default();
        let writer = async {
            let Ok(()) = run(&mut sink, rx).await;
        };
        let sender = async {
            tx.send(7).await.expect("queue open");
            // The writer must flush 7 before the next frame exists.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            tx.send(8).await.expect("queue open");
            drop(tx);
        };
        tokio::join!(writer, sender);
        assert_eq!(sink.fed, vec![7, 8]);
        assert_eq!(sink.flushed_after, vec![1, 2]);
    }
}
