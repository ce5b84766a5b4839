//! The broker over real TCP: durability across kill -9, reconnecting
//! consumers, bad input on the wire, many concurrent clients, and graceful
//! shutdown — all against the real `spool` binary.

mod common;

use bytes::{BufMut, BytesMut};
use common::{Broker, replay_all};
use futures_util::StreamExt;
use prost::Message as _;
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, FetchOptions};
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::storage::NewMessage;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn value(i: u64) -> Vec<u8> {
    format!("message-{i}-{}", "v".repeat((i % 97) as usize)).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "test")
        .await
        .expect("connect");
    let mut acked = Vec::new();
    for batch in 0..20u64 {
        let msgs: Vec<NewMessage> = (0..50)
            .map(|i| NewMessage::from_value(value(batch * 50 + i)).with_key("k"))
            .collect();
        let p = client.produce("durable", msgs).await.expect("produce");
        assert!(p.durable, "fsync=always acks are durable");
        assert_eq!(p.first_offset, batch * 50);
        acked.push(p);
    }
    drop(client);
    broker.kill9();

    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "test")
        .await
        .expect("reconnect");
    let all = replay_all(&client, "durable").await;
    assert_eq!(all.len(), 1000);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.message.offset.0, i as u64);
        assert_eq!(
            &r.message.value[..],
            &value(i as u64)[..],
            "byte-exact at offset {i}"
        );
        assert_eq!(r.message.key.as_deref(), Some(&b"k"[..]));
    }
    let next = client
        .produce("durable", vec![NewMessage::from_value("after")])
        .await
        .expect("produce");
    assert_eq!(
        next.first_offset, 1000,
        "offsets continue without gap or reuse"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_subscriber_that_reconnects_gets_what_it_missed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let producer = Client::connect(&broker.addr, "producer")
        .await
        .expect("connect");
    producer
        .produce("events", vec![NewMessage::from_value("0")])
        .await
        .expect("produce");
    producer
        .create_group("events", "app", GroupMode::Stream, Some(Position::Earliest))
        .await
        .expect("group");

    let consumer = Client::connect(&broker.addr, "consumer")
        .await
        .expect("connect");
    let mut sub = consumer
        .subscribe("events", Some("app"), "c1", None, 10)
        .await
        .expect("subscribe");
    let first = sub.next().await.expect("a delivery").expect("ok");
    assert_eq!(first.message.offset.0, 0);
    consumer.commit("events", "app", 1).await.expect("commit");
    drop(sub);
    drop(consumer);

    for i in 1..=5u64 {
        producer
            .produce("events", vec![NewMessage::from_value(i.to_string())])
            .await
            .expect("produce");
    }
    let consumer = Client::connect(&broker.addr, "consumer")
        .await
        .expect("reconnect");
    let mut sub = consumer
        .subscribe("events", Some("app"), "c1", None, 10)
        .await
        .expect("subscribe");
    for i in 1..=5u64 {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("in time")
            .expect("item")
            .expect("ok");
        assert_eq!(
            r.message.offset.0, i,
            "resumes at the committed offset, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_queue_messages_go_to_another_member_after_the_lease() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    let config = pb::TopicConfig {
        ack_timeout_ms: Some(300),
        ..Default::default()
    };
    client
        .create_topic("jobs", config)
        .await
        .expect("create topic");
    client
        .create_group("jobs", "workers", GroupMode::Queue, None)
        .await
        .expect("group");
    client
        .produce(
            "jobs",
            (0..3)
                .map(|i| NewMessage::from_value(format!("job {i}")))
                .collect(),
        )
        .await
        .expect("produce");

    let w1 = Client::connect(&broker.addr, "w1").await.expect("connect");
    let got = w1
        .fetch(
            "jobs",
            FetchOptions {
                group: Some("workers".into()),
                member: "w1".into(),
                max_messages: 3,
                ..Default::default()
            },
        )
        .await
        .expect("fetch");
    assert_eq!(got.messages.len(), 3);
    w1.ack("jobs", "workers", &[0, 2], None).await.expect("ack");
    drop(w1); // dies holding offset 1

    let w2 = Client::connect(&broker.addr, "w2").await.expect("connect");
    let redelivered = w2
        .fetch(
            "jobs",
            FetchOptions {
                group: Some("workers".into()),
                member: "w2".into(),
                max_messages: 10,
                wait_ms: 5000,
                ..Default::default()
            },
        )
        .await
        .expect("fetch");
    let offsets: Vec<u64> = redelivered
        .messages
        .iter()
        .map(|r| r.message.offset.0)
        .collect();
    assert_eq!(offsets, vec![1], "only the unacked message comes back");
    assert_eq!(redelivered.messages[0].delivery, 2);
    w2.ack("jobs", "workers", &[1], None).await.expect("ack");
    let info = w2
        .describe_group("jobs", "workers")
        .await
        .expect("describe");
    assert_eq!((info.committed, info.lag, info.pending), (3, 0, 0));
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn hello() -> Vec<u8> {
    let f = pb::ClientFrame {
        request_id: 1,
        request: Some(pb::client_frame::Request::Hello(pb::Hello {
            protocol_version: 1,
            client_name: "raw".into(),
            token: None,
        })),
    };
    frame(&f.encode_to_vec())
}

/// Sends `bytes` on a raw connection and returns what the server sent back
/// before closing (or before a short timeout).
fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<pb::ServerFrame> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut frames = Vec::new();
    let mut b = BytesMut::from(&buf[..]);
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 5 + len {
            break;
        }
        let body = b.split_to(5 + len);
        frames.push(pb::ServerFrame::decode(&body[5..]).expect("server frames decode"));
    }
    frames
}

fn error_code(f: &pb::ServerFrame) -> Option<i32> {
    match &f.kind {
        Some(pb::server_frame::Kind::Response(pb::Response {
            result: Some(pb::response::Result::Error(e)),
            ..
        })) => Some(e.code),
        _ => None,
    }
}

/// An ack or delete naming more offsets than one request may is refused
/// before they are sorted and applied (each offset of 1 byte on the wire is
/// 8 decoded, and more in the copies that apply them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_too_many_offsets_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    client
        .create_group("t", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    let too_many = vec![0u64; 1_000_001];
    let deleted = client.delete("t", &too_many).await.expect_err("refused");
    let acked = client
        .ack("t", "q", &too_many, None)
        .await
        .expect_err("refused");
    for e in [deleted, acked] {
        assert_eq!(e.code(), Some(pb::Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("at most 1000000"), "{e}");
    }
    // The most there may be is taken.
    client
        .delete("t", &too_many[..1_000_000])
        .await
        .expect("a million offsets");
    assert!(
        replay_all(&client, "t").await.is_empty(),
        "offset 0 deleted"
    );
}

/// A produce of a million empty messages (2 MB on the wire, over 100 MB
/// once built) is refused before it is built, and the broker serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_of_very_many_empty_messages_is_refused_before_it_is_built() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let produce = pb::ClientFrame {
        request_id: 2,
        request: Some(pb::client_frame::Request::Produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: vec![pb::NewMessage::default(); 1_000_000],
        })),
    };
    let mut bytes = hello();
    bytes.extend_from_slice(&frame(&produce.encode_to_vec()));
    let frames = raw_exchange(&broker.addr, &bytes);
    let refused: Vec<&pb::Error> = frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(pb::server_frame::Kind::Response(pb::Response {
                result: Some(pb::response::Result::Error(e)),
                ..
            })) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1, "{frames:?}");
    assert_eq!(refused[0].code, pb::Code::ResourceExhausted as i32);
    assert!(
        refused[0].message.contains("send fewer"),
        "{}",
        refused[0].message
    );
    let client = Client::connect(&broker.addr, "after")
        .await
        .expect("connect");
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("the broker serves on");
    assert_eq!(
        replay_all(&client, "t").await.len(),
        1,
        "nothing of it stored"
    );

    // A broker that takes larger batches takes a batch of that many tiny
    // messages (each decodes into more than 8 times its wire bytes).
    let config = tmp.path().join("big-batches.toml");
    std::fs::write(&config, "max_batch_messages = 200000\n").expect("config");
    let big = Broker::start(
        &tmp.path().join("big"),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let client = Client::connect(&big.addr, "big").await.expect("connect");
    let batch = vec![NewMessage::from_value("1"); 150_000];
    let stored = client
        .produce("t", batch)
        .await
        .expect("a batch within the limits");
    assert_eq!(stored.last_offset, 149_999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_wire_gets_the_documented_reaction_and_spares_other_clients() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let good = Client::connect(&broker.addr, "good")
        .await
        .expect("connect");
    good.produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");

    // Garbage bytes: not a valid frame (flags 0x47) -> INVALID_ARGUMENT, closed.
    let frames = raw_exchange(&broker.addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![pb::Code::InvalidArgument as i32]
    );

    // A frame announcing 4 GiB -> RESOURCE_EXHAUSTED before anything is allocated.
    let mut huge = hello();
    huge.extend_from_slice(&[0, 0xFF, 0xFF, 0xFF, 0xFF]);
    let frames = raw_exchange(&broker.addr, &huge);
    assert!(matches!(
        frames.first().and_then(|f| f.kind.as_ref()),
        Some(pb::server_frame::Kind::Welcome(_))
    ));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![pb::Code::ResourceExhausted as i32]
    );

    // A request before the handshake -> FAILED_PRECONDITION, closed.
    let ping = pb::ClientFrame {
        request_id: 7,
        request: Some(pb::client_frame::Request::Ping(pb::PingRequest {
            nonce: 1,
        })),
    };
    let frames = raw_exchange(&broker.addr, &frame(&ping.encode_to_vec()));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![pb::Code::FailedPrecondition as i32]
    );

    // A valid frame of an unknown request type (field 99) -> UNIMPLEMENTED, the connection stays usable.
    let mut unknown = BytesMut::new();
    unknown.put_u8(0x08); // request_id = 5
    unknown.put_u8(5);
    unknown.put_slice(&[0x9a, 0x06, 0x00]); // field 99, length-delimited, empty
    let mut bytes = hello();
    bytes.extend_from_slice(&frame(&unknown));
    let ping = pb::ClientFrame {
        request_id: 6,
        request: Some(pb::client_frame::Request::Ping(pb::PingRequest {
            nonce: 9,
        })),
    };
    bytes.extend_from_slice(&frame(&ping.encode_to_vec()));
    let frames = raw_exchange(&broker.addr, &bytes);
    assert!(
        frames
            .iter()
            .any(|f| error_code(f) == Some(pb::Code::Unimplemented as i32)),
        "{frames:?}"
    );
    assert!(
        frames.iter().any(|f| matches!(
            &f.kind,
            Some(pb::server_frame::Kind::Response(pb::Response {
                request_id: 6,
                result: Some(pb::response::Result::Ping(_))
            }))
        )),
        "the connection keeps working: {frames:?}"
    );

    // A truncated frame: the server waits for the rest, then sees the close; nothing is answered.
    let mut truncated = hello();
    truncated.extend_from_slice(&[0, 0, 0, 0, 50, 1, 2, 3]);
    let frames = raw_exchange(&broker.addr, &truncated);
    assert_eq!(frames.iter().filter_map(error_code).count(), 0);

    // A wrong protocol version is refused by name.
    let v2 = pb::ClientFrame {
        request_id: 1,
        request: Some(pb::client_frame::Request::Hello(pb::Hello {
            protocol_version: 2,
            client_name: "future".into(),
            token: None,
        })),
    };
    let frames = raw_exchange(&broker.addr, &frame(&v2.encode_to_vec()));
    assert_eq!(
        frames.iter().filter_map(error_code).collect::<Vec<_>>(),
        vec![pb::Code::FailedPrecondition as i32]
    );

    // The well-behaved client never noticed.
    assert_eq!(good.ping(42).await.expect("ping"), 42);
    let p = good
        .produce("t", vec![NewMessage::from_value("y")])
        .await
        .expect("produce");
    assert_eq!(p.first_offset, 1);
    // Request-level errors name what is wrong and keep the connection.
    let err = good
        .produce("bad/name", vec![NewMessage::from_value("z")])
        .await
        .expect_err("invalid name");
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument));
    assert!(err.to_string().contains("bad/name"), "{err}");
    let err = good
        .describe_topic("missing")
        .await
        .expect_err("unknown topic");
    assert_eq!(err.code(), Some(pb::Code::NotFound));
    assert!(err.to_string().contains("missing"), "{err}");
    let big = NewMessage::from_value(vec![0u8; 2 * 1024 * 1024]);
    let err = good.produce("t", vec![big]).await.expect_err("oversized");
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument));
    assert!(err.to_string().contains("limit"), "{err}");
    assert_eq!(good.ping(43).await.expect("ping"), 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_connections_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    admin
        .create_topic("busy", pb::TopicConfig::default())
        .await
        .expect("topic");
    admin
        .create_group("busy", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    let mut tasks = Vec::new();
    for c in 0..100u64 {
        let addr = broker.addr.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&addr, &format!("c{c}"))
                .await
                .expect("connect");
            let mut produced = Vec::new();
            for i in 0..10u64 {
                let p = client
                    .produce("busy", vec![NewMessage::from_value(format!("{c}-{i}"))])
                    .await
                    .expect("produce");
                produced.push(p.first_offset);
            }
            let mut consumed = Vec::new();
            for _ in 0..5 {
                let got = client
                    .fetch(
                        "busy",
                        FetchOptions {
                            group: Some("q".into()),
                            member: format!("c{c}"),
                            max_messages: 5,
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("fetch");
                let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
                client.ack("busy", "q", &offsets, None).await.expect("ack");
                consumed.extend(offsets);
            }
            (produced, consumed)
        }));
    }
    let mut produced = BTreeSet::new();
    let mut consumed = Vec::new();
    for t in tasks {
        let (p, c) = t.await.expect("task");
        for o in p {
            assert!(produced.insert(o), "offset {o} given twice");
        }
        consumed.extend(c);
    }
    assert_eq!(
        produced,
        (0..1000).collect::<BTreeSet<u64>>(),
        "dense offsets, none lost"
    );
    // Drain what is left; every message is completed exactly once.
    loop {
        let got = admin
            .fetch(
                "busy",
                FetchOptions {
                    group: Some("q".into()),
                    member: "drain".into(),
                    max_messages: 1000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        if got.messages.is_empty() {
            break;
        }
        let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
        admin.ack("busy", "q", &offsets, None).await.expect("ack");
        consumed.extend(offsets);
    }
    let unique: BTreeSet<u64> = consumed.iter().copied().collect();
    assert_eq!(unique.len(), consumed.len(), "no message handed out twice");
    assert_eq!(unique, produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_every_ack_and_leaves_no_recovery_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--fsync", "interval:200"]);
    let addr = broker.addr.clone();
    let producer = tokio::spawn(async move {
        let client = Client::connect(&addr, "p").await.expect("connect");
        let mut acked = 0u64;
        for i in 0..100_000u64 {
            match client
                .produce("g", vec![NewMessage::from_value(value(i))])
                .await
            {
                Ok(p) => {
                    assert_eq!(p.first_offset, i);
                    acked += 1;
                }
                Err(_) => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("join");
    assert!(ok, "clean exit: {logs}");
    let acked = producer.await.expect("producer");
    assert!(acked > 0);

    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "check")
        .await
        .expect("connect");
    let all = replay_all(&client, "g").await;
    assert!(
        all.len() as u64 >= acked,
        "{} stored, {acked} acked",
        all.len()
    );
    for (i, r) in all.iter().enumerate() {
        assert_eq!(&r.message.value[..], &value(i as u64)[..]);
    }
    drop(client);
    let (_, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("join");
    assert!(
        !logs.contains("cut torn tail")
            && !logs.contains("rebuilt index")
            && !logs.contains("log recovered"),
        "a clean stop leaves no recovery work: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_unknown_topics_are_not_found_until_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--no-auto-create"]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let err = client
        .produce("orders", vec![NewMessage::from_value("x")])
        .await
        .expect_err("no auto-create");
    assert_eq!(err.code(), Some(pb::Code::NotFound));
    assert!(err.to_string().contains("orders"), "{err}");
    let info = client
        .create_topic(
            "orders",
            pb::TopicConfig {
                fsync: Some("interval:60000".into()),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    assert_eq!(
        info.config.and_then(|c| c.fsync).as_deref(),
        Some("interval:60000")
    );
    let p = client
        .produce("orders", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    assert!(
        !p.durable,
        "fsync=interval acks are WRITTEN until the interval's sync"
    );
    let err = client
        .create_topic("orders", pb::TopicConfig::default())
        .await
        .expect_err("exists");
    assert_eq!(err.code(), Some(pb::Code::AlreadyExists));
    let err = client
        .create_topic(
            "bad-config",
            pb::TopicConfig {
                fsync: Some("sometimes".into()),
                ..Default::default()
            },
        )
        .await
        .expect_err("invalid config");
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument));
    assert!(err.to_string().contains("sometimes"), "{err}");
}

/// An error names what it concerns relative to the data directory: a
/// client learns the topic and the file, not where the server keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_files_relative_to_the_data_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    client
        .create_topic(
            "small",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    let err = client
        .produce("small", vec![NewMessage::from_value(vec![1u8; 2000])])
        .await
        .expect_err("larger than a segment");
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("produce to topic small: message 0 has 2000 bytes")
            && message.contains("topic small takes at most 992 per message"),
        "names the topic and its limit: {message}"
    );
    let tmp_root = tmp.path().to_string_lossy().into_owned();
    assert!(!message.contains(&tmp_root), "no server path: {message}");
}

/// A dead-letter topic that leads back to its source would hand a message
/// that fails there back to where it failed, for ever: refused at creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_chain_that_loops_back_is_refused_at_creation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let dead_letter = |to: &str| pb::TopicConfig {
        dead_letter: Some(to.into()),
        ..Default::default()
    };
    let refused = |err: spool::client::ClientError| {
        assert_eq!(err.code(), Some(pb::Code::InvalidArgument), "{err}");
        assert!(
            err.to_string().contains("dead_letter"),
            "names the field: {err}"
        );
    };
    refused(
        client
            .create_topic("self", dead_letter("self"))
            .await
            .expect_err("its own dead-letter topic"),
    );
    client
        .create_topic("a", dead_letter("b"))
        .await
        .expect("a → b");
    refused(
        client
            .create_topic("b", dead_letter("a"))
            .await
            .expect_err("b → a → b"),
    );
    client
        .create_topic("c", dead_letter("d"))
        .await
        .expect("c → d");
    client
        .create_topic("d", dead_letter("e"))
        .await
        .expect("d → e");
    refused(
        client
            .create_topic("e", dead_letter("c"))
            .await
            .expect_err("e → c → d → e"),
    );
    // Through a default: `x` hands its dead letters to `x.dlq`.
    client
        .create_topic("x", pb::TopicConfig::default())
        .await
        .expect("x → x.dlq");
    refused(
        client
            .create_topic("x.dlq", dead_letter("x"))
            .await
            .expect_err("x.dlq → x → x.dlq"),
    );
    client
        .create_topic("b", dead_letter("b.parked"))
        .await
        .expect("a chain that ends is fine");
    let names: Vec<String> = client
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a", "b", "c", "d", "x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_configured_limit_get_resource_exhausted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_connections = 2\nmax_batch_messages = 3\n").expect("config");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &["--config", config.to_str().expect("utf-8 path")]);
    let a = Client::connect(&broker.addr, "a").await.expect("first");
    let b = Client::connect(&broker.addr, "b").await.expect("second");
    let err = Client::connect(&broker.addr, "c")
        .await
        .expect_err("third is refused");
    assert_eq!(err.code(), Some(pb::Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("too many connections"), "{err}");
    // The config file's batch limit applies too, and the admitted clients work.
    let err = a
        .produce(
            "t",
            (0..4)
                .map(|i| NewMessage::from_value(i.to_string()))
                .collect(),
        )
        .await
        .expect_err("batch over the limit");
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument));
    assert!(err.to_string().contains("limit is 3"), "{err}");
    assert_eq!(b.ping(5).await.expect("ping"), 5);
    drop(a);
    // A slot frees up once a client leaves.
    let mut admitted = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match Client::connect(&broker.addr, "c").await {
            Ok(c) => {
                admitted = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(admitted.is_some(), "a freed slot admits a new client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pipelined_requests_gets_exactly_one_answer_each() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--fsync", "never"]);

    // One write carrying 1500 requests: pings, produces and fetches, so
    // answers pile up in the server's send queue faster than one flush each.
    const N: u64 = 1500;
    let mut bytes = hello();
    for id in 2..2 + N {
        let request = match id % 3 {
            0 => pb::client_frame::Request::Ping(pb::PingRequest { nonce: id * 7 }),
            1 => pb::client_frame::Request::Produce(pb::ProduceRequest {
                topic: "burst".into(),
                messages: vec![pb::NewMessage {
                    value: id.to_string().into_bytes().into(),
                    ..Default::default()
                }],
            }),
            _ => pb::client_frame::Request::Fetch(pb::FetchRequest {
                topic: "burst".into(),
                max_messages: 10,
                ..Default::default()
            }),
        };
        let f = pb::ClientFrame {
            request_id: id,
            request: Some(request),
        };
        bytes.extend_from_slice(&frame(&f.encode_to_vec()));
    }
    let addr = broker.addr.clone();
    let frames = tokio::task::spawn_blocking(move || raw_exchange(&addr, &bytes))
        .await
        .expect("join");
    assert!(matches!(
        frames.first().and_then(|f| f.kind.as_ref()),
        Some(pb::server_frame::Kind::Welcome(_))
    ));
    let mut answered = BTreeSet::new();
    let mut offsets = BTreeSet::new();
    for f in &frames[1..] {
        let Some(pb::server_frame::Kind::Response(r)) = &f.kind else {
            panic!("only responses follow Welcome: {f:?}");
        };
        assert!(
            answered.insert(r.request_id),
            "{} answered twice",
            r.request_id
        );
        match (r.request_id % 3, &r.result) {
            (0, Some(pb::response::Result::Ping(p))) => assert_eq!(p.nonce, r.request_id * 7),
            (1, Some(pb::response::Result::Produce(p))) => {
                assert!(offsets.insert(p.first_offset), "offset given twice");
            }
            // A fetch may run before the topic exists (NOT_FOUND) or after.
            (2, Some(pb::response::Result::Fetch(_) | pb::response::Result::Error(_))) => {}
            (_, other) => panic!("request {} answered with {other:?}", r.request_id),
        }
    }
    assert_eq!(answered, (2..2 + N).collect::<BTreeSet<u64>>());
    assert_eq!(offsets, (0..N / 3).collect::<BTreeSet<u64>>());

    // The client's writer batches the same way: 1000 calls in flight at once.
    let client = Client::connect(&broker.addr, "burst")
        .await
        .expect("connect");
    let calls = (0..1000u64).map(|i| {
        let client = &client;
        async move {
            if i % 2 == 0 {
                assert_eq!(client.ping(i).await.expect("ping"), i);
                None
            } else {
                let p = client
                    .produce("burst", vec![NewMessage::from_value(i.to_string())])
                    .await
                    .expect("produce");
                Some(p.first_offset)
            }
        }
    });
    let produced: BTreeSet<u64> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(produced, (N / 3..N / 3 + 500).collect::<BTreeSet<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_latest_gets_what_is_produced_after_its_reply() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--fsync", "never"]);
    let client = Client::connect(&broker.addr, "latest")
        .await
        .expect("connect");
    client
        .produce("tail", vec![NewMessage::from_value("before")])
        .await
        .expect("produce");
    for round in 0..20u64 {
        let mut sub = client
            .subscribe("tail", None, "m", Some(Position::Latest), 10)
            .await
            .expect("subscribe");
        let p = client
            .produce("tail", vec![NewMessage::from_value(round.to_string())])
            .await
            .expect("produce");
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap_or_else(|_| panic!("round {round}: nothing delivered"))
            .expect("subscription open")
            .expect("delivery");
        assert_eq!(got.message.offset.0, p.first_offset, "round {round}");
        client.unsubscribe(sub.id()).await.expect("unsubscribe");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_cannot_send_fails_instead_of_hanging() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The server would take frames of up to 96 MiB; the client's own codec
    // stops at 64 MiB, so the frame below fails in the client's writer.
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_frame_bytes = 100663296\n").expect("config");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &["--config", config.to_str().expect("utf-8 path")]);
    let client = Client::connect(&broker.addr, "big").await.expect("connect");
    let huge = NewMessage::from_value(vec![0u8; 64 * 1024 * 1024 + 1]);
    let result = tokio::time::timeout(Duration::from_secs(10), client.produce("t", vec![huge]))
        .await
        .expect("the call ends instead of waiting for an answer that cannot come");
    assert!(result.is_err(), "{result:?}");
    let again = Client::connect(&broker.addr, "again")
        .await
        .expect("connect");
    assert_eq!(again.ping(1).await.expect("ping"), 1);
}

/// A replay fetch reads the next batch ahead of the client's next fetch;
/// what changes in between (a deletion, new messages) is still what that
/// next fetch hands out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_hands_out_what_changed_since_its_previous_fetch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "reader")
        .await
        .expect("connect");
    let msgs = |from: u64, to: u64| -> Vec<NewMessage> {
        (from..to)
            .map(|i| NewMessage::from_value(value(i)))
            .collect()
    };
    client
        .produce("ahead", msgs(0, 1000))
        .await
        .expect("produce");
    let fetch = |from: u64| {
        client.fetch(
            "ahead",
            FetchOptions {
                from: Some(Position::Offset(from)),
                max_messages: 200,
                ..Default::default()
            },
        )
    };
    let offsets = |f: &spool::client::Fetched| -> Vec<u64> {
        f.messages.iter().map(|r| r.message.offset.0).collect()
    };

    let first = fetch(0).await.expect("fetch");
    assert_eq!(first.next_offset, 200);
    // 200..400 is read ahead by now (or being read): deleting from it
    // must still keep those messages out of the next fetch.
    client.delete("ahead", &[250, 399]).await.expect("delete");
    let second = fetch(200).await.expect("fetch");
    let expected: Vec<u64> = (200..400).filter(|o| ![250, 399].contains(o)).collect();
    assert_eq!(offsets(&second), expected);
    for r in &second.messages {
        assert_eq!(&r.message.value[..], &value(r.message.offset.0)[..]);
    }

    // Up to the end, then more arrives: the fetch at the old end gets it.
    let mut from = second.next_offset;
    loop {
        let f = fetch(from).await.expect("fetch");
        if f.messages.is_empty() {
            break;
        }
        from = f.next_offset;
    }
    assert_eq!(from, 1000);
    client
        .produce("ahead", msgs(1000, 1100))
        .await
        .expect("produce");
    let tail = fetch(1000).await.expect("fetch");
    assert_eq!(offsets(&tail), (1000..1100).collect::<Vec<_>>());
}

/// A stream group's fetches read ahead as replays do: the next fetch hands
/// out what a deletion changed in between, marks its member alive, and
/// reads what a replay reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_group_reads_ahead_and_still_hands_out_only_what_is_live() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "reader")
        .await
        .expect("connect");
    let msgs: Vec<NewMessage> = (0..1000)
        .map(|i| NewMessage::from_value(value(i)))
        .collect();
    client.produce("ahead", msgs).await.expect("produce");
    client
        .create_group("ahead", "g", GroupMode::Stream, Some(Position::Earliest))
        .await
        .expect("create group");
    let fetch = |member: &str, from: Option<u64>| {
        client.fetch(
            "ahead",
            FetchOptions {
                group: Some("g".to_owned()),
                member: member.to_owned(),
                from: from.map(Position::Offset),
                max_messages: 200,
                ..Default::default()
            },
        )
    };
    let offsets = |f: &spool::client::Fetched| -> Vec<u64> {
        f.messages.iter().map(|r| r.message.offset.0).collect()
    };

    let first = fetch("m1", None).await.expect("fetch");
    assert_eq!(offsets(&first), (0..200).collect::<Vec<_>>());
    client.delete("ahead", &[250, 399]).await.expect("delete");
    // Another member goes on from there: the batch read ahead serves it.
    let second = fetch("m2", Some(first.next_offset)).await.expect("fetch");
    let expected: Vec<u64> = (200..400).filter(|o| ![250, 399].contains(o)).collect();
    assert_eq!(offsets(&second), expected);
    for r in &second.messages {
        assert_eq!(&r.message.value[..], &value(r.message.offset.0)[..]);
    }
    let info = client.describe_group("ahead", "g").await.expect("describe");
    assert!(
        info.members.iter().any(|m| m.name == "m2"),
        "the member of a fetch served from a read-ahead is seen: {:?}",
        info.members
    );
    let third = fetch("m2", Some(second.next_offset)).await.expect("fetch");
    let replayed = client
        .fetch(
            "ahead",
            FetchOptions {
                from: Some(Position::Offset(second.next_offset)),
                max_messages: 200,
                ..Default::default()
            },
        )
        .await
        .expect("replay");
    assert_eq!(offsets(&third)[0], 400);
    assert_eq!(offsets(&third), offsets(&replayed), "what a replay reads");
}

/// Dropping a `Subscription` unsubscribes: its slot is free again
/// (`max_subscriptions` = 2 here, and ten come and go on one connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_frees_its_slot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = subscription_limited_broker(&tmp, 2).await;
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    for round in 0..10 {
        let mut sub = client
            .subscribe("t", None, "m", Some(Position::Earliest), 10)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a delivery in time")
            .expect("open")
            .expect("a message");
        assert_eq!(got.message.value, bytes::Bytes::from("x"));
        drop(sub);
        // The unsubscribe is on its way; a call after it is answered after it.
        assert_eq!(client.ping(round).await.expect("ping"), round);
    }
}

/// A client of `broker` named `name`, subscribed to topic `t` (which it
/// makes, with one message) from its end.
async fn subscribed_at_the_end(
    broker: &Broker,
    name: &str,
) -> (Client, spool::client::Subscription) {
    let client = Client::connect(&broker.addr, name).await.expect("connect");
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let sub = client
        .subscribe("t", None, "m", Some(Position::Latest), 10)
        .await
        .expect("subscribe");
    (client, sub)
}

/// A subscription whose connection is lost ends with an error, not as if
/// it had simply run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_with_an_error_when_the_broker_goes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let (_client, mut sub) = subscribed_at_the_end(&broker, "lost").await;
    let _ = tokio::task::spawn_blocking(move || broker.kill9())
        .await
        .expect("kill");
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the end in time");
    assert!(matches!(end, Some(Err(ClientError::Closed))), "{end:?}");
}

/// A server that accepts and never answers fails the connect once its
/// `connect_timeout` is up, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_silent_server_times_out() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let options = spool::client::ClientOptions {
        connect_timeout: Some(Duration::from_millis(300)),
        ..spool::client::ClientOptions::new("impatient")
    };
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        Client::connect_with(&addr, &options),
    )
    .await
    .expect("the connect ends by itself");
    match refused {
        Err(ClientError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{source}")
        }
        other => panic!("expected a timeout: {other:?}"),
    }
    held.abort();
}

/// A broker with `max_subscriptions = limit`, and a client connected to it.
async fn subscription_limited_broker(tmp: &tempfile::TempDir, limit: u32) -> (Broker, Client) {
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, format!("max_subscriptions = {limit}\n")).expect("config");
    let broker = Broker::start(
        &tmp.path().join("data"),
        &["--config", config.to_str().expect("utf-8")],
    );
    let client = Client::connect(&broker.addr, "subs")
        .await
        .expect("connect");
    (broker, client)
}

/// A subscribe right after a `Subscription` was dropped finds its slot
/// free. Before, the drop's `Unsubscribe` was only queued, and the server,
/// serving requests in flight in any order, often read the subscribe first
/// and refused it at `max_subscriptions` (more than half of 300 rounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_right_after_a_drop_finds_the_slot_free() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = subscription_limited_broker(&tmp, 1).await;
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let mut sub = client
        .subscribe("t", None, "m", None, 10)
        .await
        .expect("subscribe");
    for round in 0..100 {
        drop(sub);
        sub = client
            .subscribe("t", None, "m", None, 10)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// A subscribe given up after its request went out (polled once, then
/// dropped) holds a slot until its reply is handled: the next subscribe on
/// the client waits for that, as it does after a drop. Before, it was
/// refused at `max_subscriptions` about half the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_right_after_a_given_up_subscribe_finds_the_slot_free() {
    use futures_util::FutureExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = subscription_limited_broker(&tmp, 2).await;
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let _held = client
        .subscribe("t", None, "m", None, 10)
        .await
        .expect("subscribe");
    let mut given_up = 0;
    for round in 0..50 {
        // Answered within its first poll only on a thread held up long
        // enough for the round trip; such a round tests nothing.
        match client.subscribe("t", None, "m", None, 10).now_or_never() {
            None => given_up += 1,
            Some(answered) => drop(answered),
        }
        let sub = client
            .subscribe("t", None, "m", None, 10)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Answered before the next round, so its subscribe goes out at once
        // (a ping sent after the answer came is answered after the client
        // took the unsubscribe for done).
        client.unsubscribe(sub.id()).await.expect("unsubscribe");
        client.ping(round).await.expect("ping");
    }
    assert!(given_up >= 25, "{given_up} of 50 rounds given up");
}

/// An unsubscribe given up while the connection's queue is full (the broker
/// stopped, a backlog of produces) still unsubscribes: the subscription's
/// slot comes back. Before, the client forgot the subscription and never
/// sent the request, so the slot and its pushes stayed for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_given_up_in_a_full_queue_still_frees_the_slot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (broker, client) = subscription_limited_broker(&tmp, 1).await;
    let client = std::sync::Arc::new(client);
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let victim = client
        .subscribe("t", None, "m", None, 10)
        .await
        .expect("subscribe");
    broker.signal("STOP");
    // Produces that fill the socket's buffers, then more requests than
    // the client's queue holds, none read meanwhile.
    let big = std::sync::Arc::new(vec![NewMessage::from_value(vec![7u8; 1_000_000]); 4]);
    let mut produces = Vec::new();
    for _ in 0..8 {
        let (c, big) = (std::sync::Arc::clone(&client), std::sync::Arc::clone(&big));
        produces.push(tokio::spawn(async move {
            c.produce_shared("t", big).await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut backlog = Vec::new();
    for i in 0..400u64 {
        let c = std::sync::Arc::clone(&client);
        backlog.push(tokio::spawn(async move { c.ping(i).await.map(|_| ()) }));
    }
    backlog.extend(produces);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let given_up =
        tokio::time::timeout(Duration::from_millis(100), client.unsubscribe(victim.id())).await;
    assert!(given_up.is_err(), "the unsubscribe waited: {given_up:?}");
    broker.signal("CONT");
    for call in backlog {
        call.await.expect("task").expect("answered");
    }
    drop(victim);
    client
        .subscribe("t", None, "m", None, 10)
        .await
        .expect("the slot is free again");
}

/// A subscription the server ended (its group deleted) gives its slot back
/// although the application still holds the `Subscription`: the client
/// unsubscribes it. Before, the slot stayed taken until the drop, so the
/// usual `sub = client.subscribe(..).await?` was refused at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_server_ended_gives_its_slot_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = subscription_limited_broker(&tmp, 1).await;
    client
        .produce("q", vec![NewMessage::from_value("a")])
        .await
        .expect("produce");
    client
        .create_group("q", "g", GroupMode::Queue, None)
        .await
        .expect("group");
    let mut sub = client
        .subscribe("q", Some("g"), "m", None, 10)
        .await
        .expect("subscribe");
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery in time");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    client.delete_group("q", "g").await.expect("delete group");
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the end in time");
    assert!(
        matches!(&end, Some(Err(e)) if e.code() == Some(pb::Code::NotFound)),
        "{end:?}"
    );
    client
        .create_group("q", "g", GroupMode::Queue, None)
        .await
        .expect("group again");
    let again = client
        .subscribe("q", Some("g"), "m", None, 10)
        .await
        .expect("the ended subscription's slot is free");
    drop((sub, again));
}

/// Dropping a client ends each `Subscription` it leaves with
/// `ClientError::Closed`, as its documentation says, not with a bare end
/// that looks like a normal finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_ends_its_subscriptions_with_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let (client, mut sub) = subscribed_at_the_end(&broker, "gone").await;
    drop(client);
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the end in time");
    assert!(matches!(end, Some(Err(ClientError::Closed))), "{end:?}");
    let after = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("then nothing");
    assert!(after.is_none(), "{after:?}");
}

/// Accepts one connection on `listener` and answers its `Hello` with a
/// `Welcome` (idle timeout `idle_ms`, frames up to 1 MiB).
async fn fake_welcome(listener: &tokio::net::TcpListener, idle_ms: u32) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut socket, _) = listener.accept().await.expect("accept");
    let mut head = [0u8; 5];
    socket.read_exact(&mut head).await.expect("hello head");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut hello = vec![0u8; len];
    socket.read_exact(&mut hello).await.expect("hello");
    let welcome = pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Welcome(pb::Welcome {
            server_version: "fake".into(),
            protocol_version: 1,
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 19,
            max_batch_messages: 1000,
            idle_timeout_ms: idle_ms,
            ..Default::default()
        })),
    };
    socket
        .write_all(&frame(&welcome.encode_to_vec()))
        .await
        .expect("welcome");
    socket
}

/// A fake server: answers the `Hello` with a `Welcome` (idle timeout
/// `idle_ms`), sends `then` once the client's next frame begins to
/// arrive, and keeps reading without answering. Returns
/// its address and a count of the bytes it read after the `Hello`, which
/// ends (its task returns) when the client closes the connection.
async fn fake_server(idle_ms: u32, then: Vec<u8>) -> (String, tokio::task::JoinHandle<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let served = tokio::spawn(async move {
        let mut socket = fake_welcome(&listener, idle_ms).await;
        let mut read = 0;
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if read == 0 {
                socket.write_all(&then).await.expect("then");
            }
            read += n;
        }
        read
    });
    (addr, served)
}

/// Connects to `addr` with `lost_after` at 500 ms and pings; the ping's
/// result, which must come within 20 s.
async fn ping_with_lost_after(addr: &str) -> (Client, Result<u64, ClientError>) {
    let options = spool::client::ClientOptions {
        lost_after: Some(Duration::from_millis(500)),
        ..spool::client::ClientOptions::new("patient")
    };
    let client = Client::connect_with(addr, &options).await.expect("connect");
    let lost = tokio::time::timeout(Duration::from_secs(20), client.ping(7))
        .await
        .expect("the call ends by itself");
    (client, lost)
}

/// A connection that goes silent (a broker's host that lost power, a
/// network cut: the socket stays open, nothing comes back) is taken as
/// lost after `lost_after`: the waiting call and the subscriptions fail with
/// a timeout, instead of waiting as long as TCP retransmits (many minutes;
/// forever on a server with no idle timeout, where the client did not ping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_taken_as_lost() {
    // Idle timeout 0: the server never closes idle connections.
    let (addr, served) = fake_server(0, Vec::new()).await;
    let start = std::time::Instant::now();
    let (client, lost) = ping_with_lost_after(&addr).await;
    match lost {
        Err(ClientError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{source}");
            assert!(source.to_string().contains("lost_after"), "{source}");
        }
        other => panic!("expected the connection taken as lost: {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert!(client.is_closed());
    let closed = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the client closes the socket")
        .expect("fake server");
    assert!(closed > 0, "the ping reached the server");
}

/// An answer that arrives slowly (a large reply over a slow link: bytes
/// keep coming, the frame is not whole for longer than `lost_after`) is the
/// server answering, not a connection lost: the call gets its answer.
/// Before, only whole frames counted, and a read of 1 MiB over a link
/// slower than about 35 KB/s failed as lost after 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_arriving_slowly_is_not_taken_for_a_lost_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut socket = fake_welcome(&listener, 0).await;
        let mut head = [0u8; 5];
        socket.read_exact(&mut head).await.expect("request head");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len];
        socket.read_exact(&mut body).await.expect("request");
        let request = pb::ClientFrame::decode(body.as_slice()).expect("a client frame");
        let Some(pb::client_frame::Request::Ping(ping)) = request.request else {
            panic!("expected the ping: {request:?}");
        };
        let answer = pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Response(pb::Response {
                request_id: request.request_id,
                result: Some(pb::response::Result::Ping(pb::PingResponse {
                    nonce: ping.nonce,
                })),
            })),
        };
        // A byte every 150 ms: the frame takes well over `lost_after`.
        for byte in frame(&answer.encode_to_vec()) {
            socket.write_all(&[byte]).await.expect("a byte");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // Reads (and drops) the client's probes until it closes.
        let mut sink = Vec::new();
        let _ = socket.read_to_end(&mut sink).await;
    });
    let start = std::time::Instant::now();
    let (_client, answered) = ping_with_lost_after(&addr).await;
    assert_eq!(answered.expect("the slow answer arrives"), 7);
    assert!(
        start.elapsed() > Duration::from_millis(1000),
        "the answer took twice lost_after: {:?}",
        start.elapsed()
    );
}

/// A frame that arrives after the client's request, but is no answer to it
/// (a delivery of a subscription, here a stray reply), does not hide that
/// the request still waits: the connection gone silent is taken as lost
/// after `lost_after`, not after the quiet pings' interval (10 s) on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_answers_nothing_does_not_hide_a_call_still_waiting() {
    let stray = pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Response(pb::Response {
            request_id: 424_242,
            result: Some(pb::response::Result::Ping(pb::PingResponse { nonce: 1 })),
        })),
    };
    let (addr, _served) = fake_server(0, frame(&stray.encode_to_vec())).await;
    let start = std::time::Instant::now();
    let (_client, lost) = ping_with_lost_after(&addr).await;
    assert!(
        matches!(&lost, Err(ClientError::Io { source, .. }) if source.to_string().contains("lost_after")),
        "{lost:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "taken as lost after {:?}",
        start.elapsed()
    );
}

/// A connection gone silent while the client has more queued than its
/// send queue holds (many produces at once into a server that stopped
/// reading) is still taken as lost after `lost_after`: the keep-alive never
/// waits for room in the queue. Before, its probe waited behind the full
/// queue, and every call waited as long as TCP retransmits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_with_a_full_send_queue_is_taken_as_lost() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = tokio::spawn(async move {
        let socket = fake_welcome(&listener, 0).await;
        // Reads nothing more, and keeps the socket open.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    });
    let options = spool::client::ClientOptions {
        lost_after: Some(Duration::from_millis(500)),
        ..spool::client::ClientOptions::new("busy")
    };
    let client = std::sync::Arc::new(
        Client::connect_with(&addr, &options)
            .await
            .expect("connect"),
    );
    let batch = std::sync::Arc::new(vec![NewMessage::from_value(vec![7u8; 200 * 1024])]);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let (c, b) = (
            std::sync::Arc::clone(&client),
            std::sync::Arc::clone(&batch),
        );
        calls.spawn(async move { c.produce_shared("t", b).await });
    }
    let results = tokio::time::timeout(Duration::from_secs(20), async {
        let mut results = Vec::new();
        while let Some(r) = calls.join_next().await {
            results.push(r.expect("call task"));
        }
        results
    })
    .await
    .expect("the calls end by themselves");
    // The calls under way fail as lost; those queued behind them may find
    // the connection closed already.
    let lost = |r: &Result<_, ClientError>| match r {
        Err(ClientError::Io { source, .. }) => source.to_string().contains("lost_after"),
        _ => false,
    };
    assert!(results.iter().any(lost), "{:?}", results.first());
    assert!(
        results
            .iter()
            .all(|r| lost(r) || matches!(r, Err(ClientError::Closed))),
        "{:?}",
        results
            .iter()
            .find(|r| !lost(r) && !matches!(r, Err(ClientError::Closed)))
    );
    assert!(client.is_closed());
    server.abort();
}

/// A frame the client cannot decode closes the connection and fails the
/// calls with a protocol error. Before, the reader stopped but the socket
/// stayed open and the keep-alive went on pinging, so the server kept the
/// connection, its subscriptions and their leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_frame_closes_the_connection() {
    // A body that is no ServerFrame: field 1 with wire type 7.
    let (addr, served) = fake_server(300, frame(&[0x0F])).await;
    let client = Client::connect(&addr, "confused").await.expect("connect");
    let waiting = tokio::time::timeout(Duration::from_secs(10), client.ping(1))
        .await
        .expect("the call ends by itself");
    assert!(
        matches!(waiting, Err(ClientError::Protocol(_))),
        "{waiting:?}"
    );
    assert!(client.is_closed());
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the client closes the socket")
        .expect("fake server");
    // A later call fails with the same reason.
    let after = client.ping(2).await;
    assert!(matches!(after, Err(ClientError::Protocol(_))), "{after:?}");
}

/// A broker with topic `t` (one delivery per message, 50 ms leases) whose
/// dead-letter topic `t.dlq` has 1 KiB segments: it refuses any letter
/// of more than about 1 KiB.
async fn with_a_dead_letter_topic_of_1_kib_segments(data: &std::path::Path) -> (Broker, Client) {
    let broker = Broker::start(data, &[]);
    let client = Client::connect(&broker.addr, "dlq").await.expect("connect");
    let small_segments = pb::TopicConfig {
        segment_bytes: Some(1024),
        ..Default::default()
    };
    client
        .create_topic("t.dlq", small_segments)
        .await
        .expect("dead-letter topic");
    let config = pb::TopicConfig {
        max_deliveries: Some(1),
        ack_timeout_ms: Some(50),
        ..Default::default()
    };
    client.create_topic("t", config).await.expect("topic");
    (broker, client)
}

/// A dead letter its dead-letter topic refuses (too large for its
/// segments) holds back no other: the others are handed off, and the
/// refusal names the source offset of the one left pending. Before, the
/// whole batch failed, every time it came due, with an error that counted
/// the message within the batch ("message 0").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_dead_letter_holds_back_no_other() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = with_a_dead_letter_topic_of_1_kib_segments(tmp.path()).await;
    let mut batch = vec![NewMessage::from_value(vec![7u8; 2000])];
    batch.extend((1..4).map(|i| NewMessage::from_value(value(i))));
    client.produce("t", batch).await.expect("produce");
    client
        .create_group("t", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    let queue = || FetchOptions {
        group: Some("q".into()),
        member: "m".into(),
        max_messages: 10,
        ..Default::default()
    };
    let first = client.fetch("t", queue()).await.expect("first deliveries");
    assert_eq!(first.messages.len(), 4);
    // Every lease runs out: all four are due as dead letters.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client
        .fetch("t", queue())
        .await
        .expect_err("only the refused letter is left, and nothing to lease");
    assert_eq!(refused.code(), Some(pb::Code::InvalidArgument), "{refused}");
    let said = refused.to_string();
    assert!(
        said.contains("offset 0") && said.contains(": it has ") && !said.contains("message 0"),
        "names the source offset, not its place in an append: {refused}"
    );
    let letters = replay_all(&client, "t.dlq").await;
    let sources: Vec<String> = letters
        .iter()
        .filter_map(|r| {
            r.message
                .headers
                .iter()
                .find(|h| h.name == "spool-dlq-offset")
                .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        })
        .collect();
    assert_eq!(sources, ["1", "2", "3"], "the others went through");
    let group = client.describe_group("t", "q").await.expect("group");
    assert_eq!(group.lag, 1, "the refused one stays pending: {group:?}");
}

/// A fetch of one message whose due message is a dead letter the
/// dead-letter topic refuses reads on and leases the next message, rather
/// than answering the refusal while others wait (before, a consumer
/// fetching one at a time got only the refusal until the letter went).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_does_not_hold_back_a_fetch_of_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_broker, client) = with_a_dead_letter_topic_of_1_kib_segments(tmp.path()).await;
    client
        .create_group("t", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    client
        .produce("t", vec![NewMessage::from_value(vec![7u8; 2000])])
        .await
        .expect("produce");
    let one = || FetchOptions {
        group: Some("q".into()),
        member: "m".into(),
        max_messages: 1,
        ..Default::default()
    };
    let first = client.fetch("t", one()).await.expect("first delivery");
    assert_eq!(first.messages.len(), 1);
    // Its lease runs out: due as a dead letter t.dlq refuses.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .produce(
            "t",
            (1..3).map(|i| NewMessage::from_value(value(i))).collect(),
        )
        .await
        .expect("produce");
    for expected in [1, 2] {
        let fetched = client
            .fetch("t", one())
            .await
            .expect("the next message, past the refused letter");
        let offsets: Vec<u64> = fetched
            .messages
            .iter()
            .map(|r| r.message.offset.0)
            .collect();
        assert_eq!(offsets, [expected]);
        client.ack("t", "q", &offsets, None).await.expect("ack");
    }
    let group = client.describe_group("t", "q").await.expect("group");
    assert_eq!(group.lag, 1, "the refused one stays pending: {group:?}");
}

/// A subscription whose group is deleted and created again under the same
/// name ends with `NOT_FOUND` at its next read: the new group is another
/// group, which starts fresh. Before, a subscription with no credit at the
/// delete went on reading from the new group once credit came back, taking
/// its messages from the consumers of the new group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_does_not_read_a_group_created_again_under_its_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "old").await.expect("connect");
    client
        .produce(
            "t",
            (0..3).map(|i| NewMessage::from_value(value(i))).collect(),
        )
        .await
        .expect("produce");
    for mode in [GroupMode::Queue, GroupMode::Stream] {
        let group = format!("{mode:?}");
        client
            .create_group("t", &group, mode, None)
            .await
            .expect("group");
        // A window of 3: all three delivered, no credit left.
        let mut sub = client
            .subscribe("t", Some(&group), "m", None, 3)
            .await
            .expect("subscribe");
        let mut got = 0;
        while got < 3 {
            let item = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("deliveries in time")
                .expect("open");
            item.expect("a delivery");
            got += 1;
        }
        client.delete_group("t", &group).await.expect("delete");
        client
            .create_group("t", &group, mode, None)
            .await
            .expect("the name again");
        // Credit back, without acking anything.
        client
            .ack("t", "", &[0, 1, 2], Some(sub.id()))
            .await
            .expect("credit");
        let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("the end in time");
        assert!(
            matches!(&end, Some(Err(e)) if e.code() == Some(pb::Code::NotFound)),
            "{mode:?}: {end:?}"
        );
        let fresh = client
            .fetch(
                "t",
                FetchOptions {
                    group: Some(group.clone()),
                    member: "new".into(),
                    max_messages: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        assert_eq!(
            fresh.messages.len(),
            3,
            "{mode:?}: the new group has them all"
        );
    }
}

/// A fake server that answers pings and nothing else (every other request
/// waits, as on a broker whose disk stalls). Returns its address.
async fn ping_only_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut first = true;
        loop {
            let mut head = [0u8; 5];
            if socket.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len];
            if socket.read_exact(&mut body).await.is_err() {
                return;
            }
            let reply = if first {
                first = false;
                Some(pb::ServerFrame {
                    kind: Some(pb::server_frame::Kind::Welcome(pb::Welcome {
                        server_version: "fake".into(),
                        protocol_version: 1,
                        max_frame_bytes: 1 << 20,
                        max_message_bytes: 1 << 16,
                        idle_timeout_ms: 0,
                        ..Default::default()
                    })),
                })
            } else {
                match pb::ClientFrame::decode(&body[..]) {
                    Ok(pb::ClientFrame {
                        request_id,
                        request: Some(pb::client_frame::Request::Ping(p)),
                    }) => Some(pb::ServerFrame {
                        kind: Some(pb::server_frame::Kind::Response(pb::Response {
                            request_id,
                            result: Some(pb::response::Result::Ping(pb::PingResponse {
                                nonce: p.nonce,
                            })),
                        })),
                    }),
                    _ => None,
                }
            };
            if let Some(reply) = reply
                && socket
                    .write_all(&frame(&reply.encode_to_vec()))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    addr
}

/// A client that keeps sending while its answers are slow is not taken as
/// lost: it pings while an answer is due, and the server's answer to the
/// ping shows the connection is alive. Before, it pinged only after a quiet
/// spell, so a client sending more often than that heard nothing for
/// `lost_after` and closed a healthy connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_with_slow_answers_is_not_taken_as_lost() {
    let addr = ping_only_server().await;
    let options = spool::client::ClientOptions {
        lost_after: Some(Duration::from_millis(600)),
        ..spool::client::ClientOptions::new("busy")
    };
    let client = std::sync::Arc::new(
        Client::connect_with(&addr, &options)
            .await
            .expect("connect"),
    );
    // A request every 100 ms for 2 s, none of them answered.
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let c = std::sync::Arc::clone(&client);
        waiting.push(tokio::spawn(async move { c.list_topics().await }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !client.is_closed(),
        "a connection that answers pings is alive"
    );
    assert_eq!(client.ping(5).await.expect("ping"), 5);
    for w in waiting {
        w.abort();
    }
}

/// A queue group hands out new messages in offset order also when a read's
/// byte limit is reached part-way: a message that does not fit waits for
/// the next read with every one after it, instead of smaller later ones
/// going out first (offsets 0, 2, 3, 1 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_read_cut_by_its_byte_limit_keeps_offset_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let big = |c: u8| NewMessage::from_value(vec![c; 600_000]);
    client
        .produce(
            "t",
            vec![
                big(b'a'),
                big(b'b'),
                NewMessage::from_value("c"),
                NewMessage::from_value("d"),
            ],
        )
        .await
        .expect("produce");
    client
        .create_group("t", "q", GroupMode::Queue, Some(Position::Earliest))
        .await
        .expect("group");
    let mut order = Vec::new();
    for _ in 0..10 {
        let fetched = client
            .fetch(
                "t",
                FetchOptions {
                    group: Some("q".into()),
                    member: "m".into(),
                    max_messages: 100,
                    max_bytes: 1 << 20,
                    ..Default::default()
                },
            )
            .await
            .expect("queue fetch");
        for m in &fetched.messages {
            assert_eq!(
                m.delivery, 1,
                "nothing was redelivered: {}",
                m.message.offset.0
            );
            order.push(m.message.offset.0);
        }
        if order.len() == 4 {
            break;
        }
    }
    assert_eq!(order, [0, 1, 2, 3]);
}

#[test]
fn a_client_whose_runtime_shut_down_says_it_is_closed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt
        .block_on(Client::connect(&broker.addr, "short-lived"))
        .expect("connect");
    assert!(!client.is_closed());
    // The runtime's end drops the connection's tasks with it.
    drop(rt);
    assert!(
        client.is_closed(),
        "the connection's tasks are gone with their runtime"
    );
    let other = tokio::runtime::Runtime::new().expect("runtime");
    let err = other
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                client.produce("t", vec![NewMessage::from_value(b"x".to_vec())]),
            )
            .await
        })
        .expect("the call fails at once, not after a wait")
        .expect_err("a closed client's call fails");
    assert!(matches!(err, ClientError::Closed), "{err:?}");
}
