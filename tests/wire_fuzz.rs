//! Random and mutated frames thrown at a live broker: it never panics or
//! hangs, answers or closes only the offending connection, and a
//! well-behaved client on the same server sees no error throughout.

mod common;

use proptest::prelude::*;
use prost::Message as _;
use spool::client::Client;
use spool::protocol::pb;
use spool::protocol::pb::client_frame::Request;
use spool::storage::NewMessage;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn hello() -> Vec<u8> {
    let h = pb::ClientFrame {
        request_id: 1,
        request: Some(Request::Hello(pb::Hello {
            protocol_version: 1,
            client_name: "fuzz".into(),
            token: None,
        })),
    };
    frame(&h.encode_to_vec())
}

/// Valid requests to mutate: produce with odd values, fetch with huge counts,
/// acks with "negative-looking" offsets, admin calls with odd names.
fn valid_request(kind: u8, n: u64) -> pb::ClientFrame {
    let request = match kind % 6 {
        0 => Request::Produce(pb::ProduceRequest {
            topic: "fuzz".into(),
            messages: vec![pb::NewMessage {
                value: vec![n as u8; (n % 64) as usize].into(),
                ..Default::default()
            }],
        }),
        1 => Request::Fetch(pb::FetchRequest {
            topic: "fuzz".into(),
            max_messages: u32::MAX,
            max_bytes: u32::MAX,
            from: Some(pb::Position {
                kind: Some(pb::position::Kind::Offset(u64::MAX - n)),
            }),
            ..Default::default()
        }),
        2 => Request::Ack(pb::AckRequest {
            topic: "fuzz".into(),
            group: "g".into(),
            offsets: vec![u64::MAX, n],
            subscription_id: Some(n),
        }),
        3 => Request::CreateTopic(pb::CreateTopicRequest {
            name: format!("t{n}..").repeat((n % 4) as usize),
            config: None,
        }),
        4 => Request::Delete(pb::DeleteRequest {
            topic: "fuzz".into(),
            offsets: vec![u64::MAX - 1],
        }),
        _ => Request::Subscribe(pb::SubscribeRequest {
            topic: "fuzz".into(),
            max_in_flight: u32::MAX,
            ..Default::default()
        }),
    };
    pb::ClientFrame {
        request_id: n,
        request: Some(request),
    }
}

/// Sends bytes after a handshake and reads until the server closes the
/// connection or goes quiet (a partial frame leaves it waiting for the rest).
fn throw(addr: &str, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        panic!("server stopped accepting")
    };
    s.set_read_timeout(Some(Duration::from_millis(80)))
        .expect("timeout");
    let _ = s.write_all(&hello());
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(_) => return, // quiet: waiting for more bytes, as a partial frame should
        }
    }
}

#[test]
fn random_and_mutated_frames_never_hurt_the_server_or_other_clients() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &[]);
    let addr = broker.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    let good = rt
        .block_on(Client::connect(&addr, "good"))
        .expect("connect");
    rt.block_on(good.produce("fuzz", vec![NewMessage::from_value("seed")]))
        .expect("produce");

    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 150,
        ..ProptestConfig::default()
    });
    let strategy = (
        0u8..4,
        any::<u8>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    );
    runner
        .run(&strategy, |(shape, kind, n, random, flips)| {
            let bytes = match shape {
                // Random bytes.
                0 => random.clone(),
                // A valid frame with bytes flipped.
                1 => {
                    let mut f = frame(&valid_request(kind, n).encode_to_vec());
                    for (i, b) in &flips {
                        let at = i.index(f.len());
                        f[at] ^= b | 1;
                    }
                    f
                }
                // A valid body with its length off by one either way.
                2 => {
                    let body = valid_request(kind, n).encode_to_vec();
                    let mut f = frame(&body);
                    let len =
                        (body.len() as u32).wrapping_add(if n % 2 == 0 { 1 } else { u32::MAX });
                    f[1..5].copy_from_slice(&len.to_be_bytes());
                    f
                }
                // Valid frames, strange values, pipelined.
                _ => {
                    let mut f = frame(&valid_request(kind, n).encode_to_vec());
                    f.extend(frame(
                        &valid_request(kind.wrapping_add(1), n.wrapping_mul(3)).encode_to_vec(),
                    ));
                    f
                }
            };
            throw(&addr, &bytes);
            let nonce = rt
                .block_on(good.ping(n))
                .map_err(|e| TestCaseError::fail(format!("good client hurt: {e}")))?;
            prop_assert_eq!(nonce, n);
            Ok(())
        })
        .expect("the server survives every input");
    let p = rt
        .block_on(good.produce("fuzz", vec![NewMessage::from_value("after")]))
        .expect("still producing");
    assert!(p.first_offset >= 1);
    let (ok, logs) = broker.terminate();
    assert!(ok, "clean stop after the fuzzing");
    assert!(!logs.contains("panicked"), "{logs}");
}
