//! CPU per message of the produce chain's user-space steps, on one thread and
//! without I/O: the client encoding a produce frame from `NewMessage`s (and
//! dropping them), the server decoding it back, and the log's record encoding
//! with its CRC (and the batch's drop). 100-byte values, 1000 per batch, as in
//! `spool bench produce --size 100 --batch 1000`. Prints the best of five
//! rounds of 20 000 batches, in ns per message.
//!
//! ```sh
//! cargo run --release --example produce_chain
//! ```

use bytes::{Bytes, BytesMut};
use spool::protocol::request::{ClientIn, ClientOut, ProduceFrame};
use spool::storage::{NewMessage, record};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;
const BATCHES: usize = 20_000;
const ROUNDS: usize = 5;

fn main() {
    let payload = Bytes::from(vec![0x5a_u8; 100]);
    // Frames are encoded into one reused buffer and split off it, as the
    // connection's codec does (a fresh 130 KB buffer per frame would time
    // the allocator's page faults instead).
    let mut wire = BytesMut::with_capacity(1 << 20);
    let mut scratch = Vec::with_capacity(1 << 20);
    let mut best = [Duration::MAX; 3];
    for _ in 0..ROUNDS {
        let mut spent = [Duration::ZERO; 3];
        for id in 1..=BATCHES as u64 {
            let messages: Vec<NewMessage> = (0..BATCH)
                .map(|_| NewMessage::from_value(payload.clone()))
                .collect();
            let t0 = Instant::now();
            let frame =
                ClientOut::Produce(ProduceFrame::new(id, "bench".into(), Arc::new(messages)));
            wire.reserve(frame.encoded_len());
            frame.encode(&mut wire);
            drop(frame);
            let body = wire.split().freeze();
            let t1 = Instant::now();
            let Ok(ClientIn::Produce(produce)) = ClientIn::decode(body) else {
                panic!("a produce frame this program encoded did not decode as one");
            };
            let t2 = Instant::now();
            scratch.clear();
            for (offset, m) in (0u64..).zip(&produce.messages) {
                record::encode(&mut scratch, offset, 1, m);
            }
            drop(produce);
            let t3 = Instant::now();
            for (s, d) in spent.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                *s += d;
            }
        }
        for (b, s) in best.iter_mut().zip(spent) {
            *b = (*b).min(s);
        }
    }
    let per = |d: Duration| d.as_nanos() as f64 / (BATCHES * BATCH) as f64;
    println!(
        "ns per message: client encode {:.1}, server decode {:.1}, record encode {:.1}",
        per(best[0]),
        per(best[1]),
        per(best[2]),
    );
}
