//! Creates many small topics ("rooms") on a running broker by auto-create:
//! one small message to each of `room-0` … `room-<N-1>`, with `--tasks`
//! produces in flight on one connection. Prints the time it took, and with
//! `--read` reads every room back instead and checks its message.
//!
//! ```sh
//! cargo run --release --example rooms -- 127.0.0.1:7411 100000 --tasks 64
//! cargo run --release --example rooms -- 127.0.0.1:7411 100000 --tasks 64 --read
//! ```

use spool::client::{Client, FetchOptions};
use spool::storage::NewMessage;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:7411".into());
    let rooms: u64 = args.get(1).map_or(Ok(1000), |s| s.parse())?;
    let tasks: u64 = match args.iter().position(|a| a == "--tasks") {
        Some(i) => args.get(i + 1).map_or(Ok(64), |s| s.parse())?,
        None => 64,
    };
    let read = args.iter().any(|a| a == "--read");
    let client = Arc::new(Client::connect(&addr, "rooms").await?);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (client, next) = (Arc::clone(&client), Arc::clone(&next));
        running.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= rooms {
                    return Ok::<(), String>(());
                }
                let topic = format!("room-{i}");
                if read {
                    let got = client
                        .fetch(&topic, FetchOptions::default())
                        .await
                        .map_err(|e| format!("{topic}: {e}"))?;
                    let ok = got
                        .messages
                        .first()
                        .is_some_and(|m| m.message.value == "hello");
                    if !ok {
                        return Err(format!("{topic}: message missing"));
                    }
                } else {
                    client
                        .produce(&topic, vec![NewMessage::from_value("hello")])
                        .await
                        .map_err(|e| format!("{topic}: {e}"))?;
                }
            }
        });
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} {rooms} rooms in {secs:.1} s ({:.0} rooms/s)",
        if read { "read" } else { "created" },
        rooms as f64 / secs
    );
    Ok(())
}
