//! The floor of an end-to-end latency without a broker: the e2e workload's
//! messages, paced the same way (a pacing thread releasing each one to a
//! tokio task at its due time), go over loopback TCP to a task that only
//! forwards the bytes to a second connection, where a reader notes when each
//! arrived. Two socket hops and the task wake-ups between them, in the same
//! runtime as the e2e run: what any broker on this machine pays before it
//! stores or looks at anything. The e2e report carries it next to the
//! disk's own 1 KiB `fdatasync`, so the distance of spool's figures from
//! the machine's floor is measured in the same run.

use super::histogram::{Latency, LatencySummary};
use super::{BenchError, pacing};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Longest the probe runs.
pub const PROBE_TIME: Duration = Duration::from_secs(2);
/// Bytes of each message's stamp: its index in the run.
const STAMP: usize = 8;

/// Relays `rate` messages per second of `size` bytes (at least the stamp)
/// for `time`, and returns the latency of each from its due time to its
/// arrival at the reader.
pub async fn probe(rate: u64, size: usize, time: Duration) -> Result<LatencySummary, BenchError> {
    let size = size.max(STAMP);
    let rate = rate.max(1);
    let count = (time.as_secs_f64() * rate as f64).ceil().max(1.0) as u64;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::io("binding the relay probe's listener"))?;
    let addr = listener
        .local_addr()
        .map_err(BenchError::io("the relay probe's address"))?;
    let relay = tokio::spawn(async move {
        let (mut from, _) = listener.accept().await?;
        let (mut to, _) = listener.accept().await?;
        from.set_nodelay(true)?;
        to.set_nodelay(true)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            to.write_all(&buf[..n]).await?;
        }
    });
    let connect = || async {
        let s = TcpStream::connect(addr)
            .await
            .map_err(BenchError::io("connecting to the relay probe"))?;
        s.set_nodelay(true)
            .map_err(BenchError::io("setting TCP_NODELAY"))?;
        Ok::<_, BenchError>(s)
    };
    let mut writer = connect().await?;
    let mut reader = connect().await?;

    let timetable = pacing::Timetable::starting_soon(rate);
    let (tx, mut rx) = mpsc::channel::<u64>(1024);
    std::thread::Builder::new()
        .name("bench-relay-pacer".into())
        .spawn(move || {
            pacing::exact_sleeps();
            for k in 0..count {
                pacing::sleep_until(timetable.due(k));
                if tx.blocking_send(k).is_err() {
                    break;
                }
            }
        })
        .map_err(BenchError::io("starting the relay probe's pacing thread"))?;
    let send = tokio::spawn(async move {
        let mut message = vec![0x5a_u8; size];
        while let Some(k) = rx.recv().await {
            message[..STAMP].copy_from_slice(&k.to_le_bytes());
            writer.write_all(&message).await?;
        }
        writer.shutdown().await
    });

    let mut latency = Latency::new();
    let mut message = vec![0u8; size];
    for _ in 0..count {
        reader
            .read_exact(&mut message)
            .await
            .map_err(BenchError::io("reading from the relay probe"))?;
        let now = Instant::now();
        let mut stamp = [0u8; STAMP];
        stamp.copy_from_slice(&message[..STAMP]);
        latency.record(now.saturating_duration_since(timetable.due(u64::from_le_bytes(stamp))));
    }
    let ended = |what: &str, r: Result<std::io::Result<()>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(BenchError::io(format!("the relay probe's {what}"))(e)),
        Err(e) => Err(BenchError::Incomplete(format!(
            "the relay probe's {what} panicked: {e}"
        ))),
    };
    ended("sender", send.await)?;
    ended("relay", relay.await)?;
    Ok(latency.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_message_is_relayed_and_timed() {
        let s = probe(2_000, 1024, Duration::from_millis(250))
            .await
            .expect("probe");
        assert_eq!(s.samples, 500);
        assert!(s.p50 > 0.0 && s.p50 <= s.p99 && s.p99 <= s.max);
    }
}
