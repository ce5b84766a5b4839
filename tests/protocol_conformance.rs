//! What a client written from docs/protocol.md alone relies on: one test per
//! point of issue 20 where the document and the broker used to disagree
//! (limits in `Welcome` and `TopicInfo`, tombstones, `next_offset`, deleted
//! messages in group counts, oversized replies, field names in errors, the
//! first produce after a creation, foreign subscription ids, timestamp
//! positions, the start-up line, retention values), pinned against the real
//! binary so the document cannot drift from it again.

mod common;

use common::{Broker, replay_all};
use futures_util::{SinkExt, StreamExt};
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, FetchOptions, Subscription};
use spool::groups::GroupMode;
use spool::protocol::codec::FrameCodec;
use spool::protocol::pb;
use spool::protocol::pb::client_frame::Request;
use spool::protocol::pb::response::Result as Reply;
use spool::storage::NewMessage;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// Starts a broker with `config` as its TOML config file.
fn start_with_config(dir: &Path, config: &str) -> Broker {
    let path = dir.join("spool.toml");
    std::fs::write(&path, config).expect("config");
    Broker::start(
        &dir.join("data"),
        &["--config", path.to_str().expect("utf-8 path")],
    )
}

async fn connect(broker: &Broker) -> Client {
    Client::connect(&broker.addr, "conformance")
        .await
        .expect("connect")
}

fn from(position: Position) -> FetchOptions {
    FetchOptions {
        from: Some(position),
        max_messages: 1000,
        ..Default::default()
    }
}

fn assert_invalid(err: &ClientError, field: &str) {
    assert_eq!(err.code(), Some(pb::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains(field), "names {field}: {err}");
}

/// The next item of a subscription, within 10 s.
async fn next_item(sub: &mut Subscription) -> Result<spool::client::Received, ClientError> {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an item within 10 s")
        .expect("the subscription is still open")
}

/// Whether the subscription pushes nothing for `wait`.
async fn stays_quiet(sub: &mut Subscription, wait: Duration) -> bool {
    tokio::time::timeout(wait, sub.next()).await.is_err()
}

/// A connection speaking raw frames through the crate's codec, for requests
/// the Rust client cannot express (an unknown group mode, ...).
struct Raw {
    framed: Framed<TcpStream, FrameCodec<pb::ServerFrame, pb::ClientFrame>>,
    next_id: u64,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut framed = Framed::new(stream, FrameCodec::new(16 * 1024 * 1024));
        framed
            .send(pb::ClientFrame {
                request_id: 0,
                request: Some(Request::Hello(pb::Hello {
                    protocol_version: 1,
                    client_name: "raw".into(),
                    token: None,
                })),
            })
            .await
            .expect("send hello");
        match framed.next().await {
            Some(Ok(pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Welcome(_)),
            })) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        Raw { framed, next_id: 1 }
    }

    /// Sends `request` and returns its answer (deliveries are not expected).
    async fn call(&mut self, request: Request) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(pb::ClientFrame {
                request_id: id,
                request: Some(request),
            })
            .await
            .expect("send");
        let frame = tokio::time::timeout(Duration::from_secs(10), self.framed.next())
            .await
            .expect("an answer within 10 s")
            .expect("the connection stays open")
            .expect("a readable frame");
        match frame.kind {
            Some(pb::server_frame::Kind::Response(pb::Response {
                request_id,
                result: Some(result),
            })) => {
                assert_eq!(request_id, id, "answered by request id");
                result
            }
            other => panic!("expected a response, got {other:?}"),
        }
    }
}

fn wire_error(reply: Reply) -> pb::Error {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Item 1: `Welcome.max_message_bytes` is the limit produce applies (the
/// frame limit less 1 KiB binds here), and `TopicInfo.max_message_bytes` is
/// what one topic takes (`segment_bytes` − 32), both in the documented
/// measure: key + value + Σ(6 + name + value) over headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_and_topic_info_announce_the_message_limits_produce_applies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(
        tmp.path(),
        "max_frame_bytes = 65536\nmax_message_bytes = 1048576\n",
    );
    let client = connect(&broker).await;
    let limit = client.welcome().max_message_bytes;
    assert_eq!(limit, 65536 - 1024, "the frame limit less 1 KiB binds");

    let sized = |size: usize| {
        // 10 bytes of key, one header of 6 + 1 + 5 bytes, the rest value.
        NewMessage::from_value(vec![b'v'; size - 10 - 12])
            .with_key(vec![b'k'; 10])
            .with_header("h", "hdr-v")
    };
    client
        .produce("big", vec![sized(limit as usize)])
        .await
        .expect("a message of exactly Welcome.max_message_bytes");
    let err = client
        .produce("big", vec![sized(limit as usize + 1)])
        .await
        .expect_err("one byte more");
    assert_invalid(&err, "max_frame_bytes");
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    let info = client.describe_topic("big").await.expect("describe");
    assert_eq!(
        info.max_message_bytes,
        u64::from(limit),
        "a default topic takes what Welcome says"
    );

    let small = client
        .create_topic(
            "small",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    assert_eq!(small.max_message_bytes, 1024 - 32);
    client
        .produce("small", vec![sized(992)])
        .await
        .expect("a message of exactly TopicInfo.max_message_bytes");
    let err = client
        .produce("small", vec![sized(993)])
        .await
        .expect_err("one byte more");
    assert_invalid(&err, "segment_bytes");
    assert!(err.to_string().contains("992"), "{err}");
    let listed = client.list_topics().await.expect("list");
    let caps: Vec<(String, u64)> = listed
        .into_iter()
        .map(|t| (t.name, t.max_message_bytes))
        .collect();
    assert_eq!(
        caps,
        [("big".to_string(), u64::from(limit)), ("small".into(), 992)]
    );
}

/// Item 2: a tombstone is a keyed message with an empty value on a
/// `cleanup=compact` topic; readers get it, compaction removes what it
/// supersedes and, past `delete_retention_ms`, the tombstone itself. A keyless
/// empty message is no tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_is_a_keyed_empty_message_that_compaction_drops_after_delete_retention_ms() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    for (topic, delete_retention_ms) in [("keeps", 86_400_000), ("drops", 1)] {
        client
            .create_topic(
                topic,
                pb::TopicConfig {
                    segment_bytes: Some(1024),
                    cleanup: Some("compact".into()),
                    delete_retention_ms: Some(delete_retention_ms),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        let first = vec![
            NewMessage::from_value("v1").with_key("k"),
            NewMessage::from_value("").with_key("k"),
            NewMessage::from_value(""),
        ];
        client.produce(topic, first).await.expect("produce");
        // Before compaction, readers get the tombstone like any message.
        let before: Vec<_> = replay_all(&client, topic).await;
        assert_eq!(before.len(), 3);
        assert!(before[1].message.value.is_empty());
        // Seal the segment holding them with messages of other keys.
        for i in 0..20 {
            let filler = NewMessage::from_value(vec![b'f'; 100]).with_key(format!("f{i}"));
            client.produce(topic, vec![filler]).await.expect("filler");
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    for topic in ["keeps", "drops"] {
        client.compact(Some(topic)).await.expect("compact");
    }
    let first_three = |topic: &'static str| {
        let client = &client;
        async move {
            replay_all(client, topic)
                .await
                .into_iter()
                .filter(|r| r.message.offset.0 < 3)
                .map(|r| {
                    (
                        r.message.offset.0,
                        r.message.key.map(|k| k.to_vec()),
                        r.message.value.to_vec(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        first_three("keeps").await,
        [(1, Some(b"k".to_vec()), vec![]), (2, None, vec![])],
        "the superseded value goes, the young tombstone stays"
    );
    assert_eq!(
        first_three("drops").await,
        [(2, None, vec![])],
        "an old tombstone goes too; a keyless empty message is no tombstone"
    );
}

/// Item 3: `next_offset` is the last returned offset + 1, or the requested
/// position resolved and clamped into [start, end] when nothing came back,
/// or past deleted messages the read went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_offset_is_the_clamped_requested_position_when_nothing_is_returned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    let ten = (0..10).map(|i| NewMessage::from_value(format!("m{i}")));
    client.produce("t", ten.collect()).await.expect("produce");

    let page = client
        .fetch(
            "t",
            FetchOptions {
                from: Some(Position::Offset(3)),
                max_messages: 2,
                ..Default::default()
            },
        )
        .await
        .expect("fetch");
    assert_eq!((page.messages.len(), page.next_offset), (2, 5));

    for position in [
        Position::Offset(1000),
        Position::Latest,
        Position::Timestamp(u64::MAX),
    ] {
        let empty = client.fetch("t", from(position)).await.expect("fetch");
        assert!(empty.messages.is_empty(), "{position:?}");
        assert_eq!(
            (empty.next_offset, empty.end_offset),
            (10, 10),
            "{position:?}"
        );
    }
    // The last messages deleted: a reader gets the others, then an empty
    // answer whose next_offset is past the deleted ones, at the end, so it
    // has caught up (next_offset reaches end_offset).
    client.delete("t", &[8, 9]).await.expect("delete");
    let page = client
        .fetch("t", from(Position::Offset(5)))
        .await
        .expect("fetch");
    assert_eq!((page.messages.len(), page.next_offset), (3, 8));
    let past = client
        .fetch("t", from(Position::Offset(8)))
        .await
        .expect("fetch");
    assert!(past.messages.is_empty());
    assert_eq!((past.next_offset, past.end_offset), (10, 10));
    // Every message deleted: the same from the start.
    client
        .delete("t", &(0..10).collect::<Vec<_>>())
        .await
        .expect("delete");
    let empty = client
        .fetch("t", from(Position::Earliest))
        .await
        .expect("fetch");
    assert!(empty.messages.is_empty());
    assert_eq!((empty.next_offset, empty.end_offset), (10, 10));
    // A stream group reads past them the same way.
    client
        .create_group("t", "s", GroupMode::Stream, Some(Position::Earliest))
        .await
        .expect("group");
    let group = client
        .fetch(
            "t",
            FetchOptions {
                group: Some("s".into()),
                ..Default::default()
            },
        )
        .await
        .expect("group fetch");
    assert!(group.messages.is_empty());
    assert_eq!(group.next_offset, 10);
}

/// Item 4: a deleted message leaves `pending` and `lag` (and no longer holds
/// a queue group's `committed` back) as soon as the delete is answered,
/// leased or not, without a fetch in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_messages_leave_pending_and_lag_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    let three = (0..3).map(|i| NewMessage::from_value(format!("m{i}")));
    client.produce("t", three.collect()).await.expect("produce");
    client
        .create_group("t", "q", GroupMode::Queue, None)
        .await
        .expect("queue group");
    client
        .create_group("t", "s", GroupMode::Stream, None)
        .await
        .expect("stream group");
    let counts = |group: &'static str| {
        let client = &client;
        async move {
            let g = client.describe_group("t", group).await.expect("describe");
            (g.committed, g.pending, g.lag)
        }
    };

    // Unleased: 3 messages, 1 deleted → lag 2.
    client.delete("t", &[1]).await.expect("delete");
    assert_eq!(counts("q").await, (0, 0, 2));
    assert_eq!(counts("s").await, (0, 0, 2));

    // Leased: out of pending and lag at once, and the watermark passes it.
    let leased = client
        .fetch(
            "t",
            FetchOptions {
                group: Some("q".into()),
                member: "w".into(),
                max_messages: 1,
                ..Default::default()
            },
        )
        .await
        .expect("lease");
    assert_eq!(leased.messages[0].message.offset.0, 0);
    assert_eq!(counts("q").await, (0, 1, 2));
    client
        .delete("t", &[0])
        .await
        .expect("delete the leased one");
    assert_eq!(counts("q").await, (2, 0, 1));
    assert_eq!(counts("s").await, (0, 0, 1));
    // An ack of the deleted, leased message is still accepted.
    client.ack("t", "q", &[0], None).await.expect("ack");
    assert_eq!(counts("q").await, (2, 0, 1));
}

/// Item 5: a reply too large for a frame that is not a read of messages
/// (those are pinned in tests/resource.rs) is answered `RESOURCE_EXHAUSTED`
/// in its own `Response`; the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_for_a_frame_is_an_error_on_that_request_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_frame_bytes = 4096\n");
    let client = connect(&broker).await;
    for i in 0..30 {
        let name = format!("{i:02}-{}", "n".repeat(150));
        client
            .create_topic(&name, pb::TopicConfig::default())
            .await
            .expect("create");
    }
    let err = client.list_topics().await.expect_err("too large a reply");
    assert_eq!(err.code(), Some(pb::Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("max_frame_bytes"), "{err}");
    assert_eq!(client.ping(7).await.expect("the connection stays open"), 7);
    let one = format!("00-{}", "n".repeat(150));
    assert_eq!(client.describe_topic(&one).await.expect("fits").name, one);

    // gRPC answers the same code and words (tonic alone would say
    // OUT_OF_RANGE), and the channel serves the next call.
    let grpc = broker.grpc.as_deref().expect("gRPC listener");
    let mut g = pb::spool_client::SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("gRPC connect");
    let status = g
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect_err("too large a reply");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_frame_bytes"), "{status:?}");
    let info = g
        .describe_topic(pb::DescribeTopicRequest { name: one.clone() })
        .await
        .expect("fits")
        .into_inner();
    assert_eq!(info.name, one);
}

/// Item 6: every validation refusal is `INVALID_ARGUMENT` naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_value_is_refused_naming_its_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_batch_messages = 3\n");
    let client = connect(&broker).await;
    let config = |f: &dyn Fn(&mut pb::TopicConfig)| {
        let mut c = pb::TopicConfig::default();
        f(&mut c);
        c
    };
    let cases: Vec<(&str, pb::TopicConfig)> = vec![
        ("segment_bytes", config(&|c| c.segment_bytes = Some(10))),
        ("segment_ms", config(&|c| c.segment_ms = Some(0))),
        (
            "retention_bytes",
            config(&|c| {
                c.segment_bytes = Some(4096);
                c.retention_bytes = Some(4095);
            }),
        ),
        ("retention_ms", config(&|c| c.retention_ms = Some(0))),
        (
            "retention_bytes_max",
            config(&|c| {
                c.segment_bytes = Some(4096);
                c.retention_bytes_max = Some(4095);
            }),
        ),
        ("fsync", config(&|c| c.fsync = Some("sometimes".into()))),
        ("cleanup", config(&|c| c.cleanup = Some("shred".into()))),
        (
            "dead_letter",
            config(&|c| c.dead_letter = Some("a/b".into())),
        ),
        (
            "dead_letter",
            config(&|c| c.dead_letter = Some("loop".into())),
        ),
        ("max_deliveries", config(&|c| c.max_deliveries = Some(0))),
        ("ack_timeout_ms", config(&|c| c.ack_timeout_ms = Some(0))),
        (
            "delete_retention_ms",
            config(&|c| c.delete_retention_ms = Some(0)),
        ),
        (
            "compact_min_dirty_ratio",
            config(&|c| c.compact_min_dirty_ratio = Some(1.5)),
        ),
        (
            "compact_check_ms",
            config(&|c| c.compact_check_ms = Some(0)),
        ),
    ];
    for (field, config) in cases {
        let err = client.create_topic("loop", config).await.expect_err(field);
        assert_invalid(&err, field);
    }
    let err = client
        .create_topic("a/b", pb::TopicConfig::default())
        .await
        .expect_err("bad name");
    assert_invalid(&err, "topic name");
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let err = client
        .create_group("t", "a b", GroupMode::Queue, None)
        .await
        .expect_err("bad group name");
    assert_invalid(&err, "group name");
    let err = client.produce("t", vec![]).await.expect_err("no messages");
    assert_invalid(&err, "messages");
    let four = (0..4).map(|_| NewMessage::from_value("x")).collect();
    let err = client
        .produce("t", four)
        .await
        .expect_err("over the batch limit");
    assert_invalid(&err, "max_batch_messages");
    let err = client.ack("t", "", &[0], None).await.expect_err("no group");
    assert_invalid(&err, "subscription_id");
    client
        .create_group("t", "s", GroupMode::Stream, None)
        .await
        .expect("group");
    let err = client.commit("t", "s", 99).await.expect_err("past the end");
    assert_invalid(&err, "offset 99");
    let err = client.delete("t", &[99]).await.expect_err("past the end");
    assert_invalid(&err, "offset 99");
    // A request's own fields before its topic and group are looked up
    // (protocol.md §4), and what needs only the topic before the group.
    let err = client
        .create_group("nowhere", "a b", GroupMode::Queue, None)
        .await
        .expect_err("bad group name on an unknown topic");
    assert_invalid(&err, "group name");
    let err = client
        .ack("t", "nobody", &[99], None)
        .await
        .expect_err("past the end, unknown group");
    assert_invalid(&err, "offset 99");
    let err = client
        .nack("nowhere", "nobody", &[0], u64::MAX, None)
        .await
        .expect_err("delay over 100 years, unknown topic");
    assert_invalid(&err, "delay_ms");

    // A group mode the client library cannot send.
    let mut raw = Raw::connect(&broker.addr).await;
    let err = wire_error(
        raw.call(Request::CreateGroup(pb::CreateGroupRequest {
            topic: "t".into(),
            group: "g".into(),
            mode: 7,
            start: None,
        }))
        .await,
    );
    assert_eq!(err.code, pb::Code::InvalidArgument as i32, "{err:?}");
    assert!(err.message.starts_with("mode 7"), "{}", err.message);
}

/// Item 7: opening a topic counts as a sync, so under `fsync=interval:MS`
/// the first produce within MS of the creation answers `WRITTEN`, and one
/// MS or more after it `DURABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_produce_after_a_creation_is_written_until_the_interval_has_passed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    let interval = |ms: u64| pb::TopicConfig {
        fsync: Some(format!("interval:{ms}")),
        ..Default::default()
    };
    client
        .create_topic("slow", interval(60_000))
        .await
        .expect("create");
    client
        .create_topic("fast", interval(300))
        .await
        .expect("create");
    let p = client
        .produce("slow", vec![NewMessage::from_value("first")])
        .await
        .expect("produce");
    assert!(!p.durable, "creation counts as a sync: WRITTEN");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = client
        .produce("fast", vec![NewMessage::from_value("first")])
        .await
        .expect("produce");
    assert!(p.durable, "MS after the creation: synced inline, DURABLE");
}

/// Item 8: `subscription_id` only says where credit goes. An id that is not
/// an open subscription of this connection is ignored: the ack applies and
/// answers `ok`, and no subscription gets credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_naming_another_connections_subscription_applies_and_returns_no_credit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let holder = connect(&broker).await;
    let other = connect(&broker).await;
    let two = vec![NewMessage::from_value("a"), NewMessage::from_value("b")];
    holder.produce("t", two).await.expect("produce");
    holder
        .create_group("t", "q", GroupMode::Queue, None)
        .await
        .expect("group");
    let mut sub = holder
        .subscribe("t", Some("q"), "w", None, 1)
        .await
        .expect("subscribe");
    let first = next_item(&mut sub).await.expect("first delivery");
    assert_eq!(first.message.offset.0, 0);

    // Another connection acks with the holder's subscription id: the ack
    // counts, the credit does not move.
    other
        .ack("t", "q", &[0], Some(sub.id()))
        .await
        .expect("ok: the foreign id is ignored");
    let info = other.describe_group("t", "q").await.expect("describe");
    assert_eq!((info.committed, info.lag), (1, 1), "the ack applied");
    assert!(
        stays_quiet(&mut sub, Duration::from_millis(500)).await,
        "no credit went to the holder's subscription"
    );
    // An id never issued, and a nack with one, are ignored the same way.
    holder
        .ack("t", "q", &[0], Some(9999))
        .await
        .expect("acking a completed offset again, unknown id: ok");
    let requeued = holder
        .nack("t", "q", &[1], 0, Some(9999))
        .await
        .expect("nack with an unknown id");
    assert_eq!(requeued, 0, "offset 1 was not leased");
    assert!(stays_quiet(&mut sub, Duration::from_millis(300)).await);

    // The holder's own ack returns the credit.
    holder
        .ack("t", "q", &[0], Some(sub.id()))
        .await
        .expect("ack");
    let second = next_item(&mut sub).await.expect("second delivery");
    assert_eq!(second.message.offset.0, 1);
}

/// Item 9: a timestamp position is the first message *in offset order* whose
/// `timestamp_ms` ≥ the value; producer-set timestamps need not be ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_position_is_the_first_message_in_offset_order_at_or_after_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    let stamps = [100u64, 300, 200, 400, 150];
    let batch = stamps
        .iter()
        .map(|&ts| NewMessage {
            timestamp_ms: Some(ts),
            ..NewMessage::from_value(ts.to_string())
        })
        .collect();
    client.produce("t", batch).await.expect("produce");
    for (ts, first) in [
        (0, 0),
        (100, 0),
        (101, 1),
        (200, 1),
        (301, 3),
        (400, 3),
        (401, 5),
    ] {
        let got = client
            .fetch("t", from(Position::Timestamp(ts)))
            .await
            .expect("fetch");
        let offsets: Vec<u64> = got.messages.iter().map(|r| r.message.offset.0).collect();
        assert_eq!(
            offsets,
            (first..5).collect::<Vec<_>>(),
            "from timestamp {ts}: offset order, later smaller timestamps included"
        );
        assert_eq!(
            client
                .create_group(
                    "t",
                    &format!("g{ts}"),
                    GroupMode::Stream,
                    Some(Position::Timestamp(ts))
                )
                .await
                .expect("group")
                .committed,
            first,
            "a group created at timestamp {ts}"
        );
    }
}

/// Starts `spool serve` on port 0 (gRPC too, metrics and socket.io off)
/// with `extra` flags; returns it (killed on drop) and its first line on
/// stdout.
fn serve(data: &Path, extra: &[&str]) -> (common::Killed, String) {
    let mut all = vec![
        "--grpc",
        "127.0.0.1:0",
        "--metrics",
        "off",
        "--socketio",
        "off",
    ];
    all.extend_from_slice(extra);
    let (serve, out) = common::serve_with(data, &all);
    let first = out.lines().next().unwrap_or_default().to_owned();
    (serve, first)
}

/// Item 10: the start-up line is a stable contract, in text and in JSON,
/// and the address it names is where the protocol is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_line_has_the_documented_form_in_text_and_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let version = env!("CARGO_PKG_VERSION");

    let (text_server, line) = serve(&data, &[]);
    let prefix = format!("spool {version} listening on ");
    let suffix = format!(", data in {}", data.display());
    let addr = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("`spool VERSION listening on ADDR, data in DIR`: {line}"));
    let port: u16 = addr
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("ADDR is IP:PORT: {addr}"));
    assert_ne!(port, 0, "the port actually bound");
    let client = Client::connect(addr, "c").await.expect("serves there");
    assert_eq!(client.ping(1).await.expect("ping"), 1);
    drop((client, text_server));

    let (_json_server, line) = serve(&data, &["--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(v["version"], version, "{line}");
    assert_eq!(v["data"], data.to_string_lossy().as_ref(), "{line}");
    let addr = v["listeners"]["native"]
        .as_str()
        .unwrap_or_else(|| panic!("listeners.native: {line}"));
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{line}"
    );
    let client = Client::connect(addr, "c").await.expect("serves there");
    assert_eq!(client.ping(2).await.expect("ping"), 2);
}

/// Item 11: the documented ranges of `retention_bytes`, `retention_ms` and
/// `delete_retention_ms` hold at their edges, and retention runs by itself:
/// old sealed segments go without any request, the active one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_values_have_the_documented_ranges_and_retention_runs_unasked() {
    const MAX_MS: u64 = 3_153_600_000_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let client = connect(&broker).await;
    let cases: [(&str, pb::TopicConfig, bool); 10] = [
        (
            "retention_ms",
            pb::TopicConfig {
                retention_ms: Some(0),
                ..Default::default()
            },
            false,
        ),
        (
            "retention_ms",
            pb::TopicConfig {
                retention_ms: Some(1),
                ..Default::default()
            },
            true,
        ),
        (
            "retention_ms",
            pb::TopicConfig {
                retention_ms: Some(MAX_MS),
                ..Default::default()
            },
            true,
        ),
        (
            "retention_ms",
            pb::TopicConfig {
                retention_ms: Some(MAX_MS + 1),
                ..Default::default()
            },
            false,
        ),
        (
            "delete_retention_ms",
            pb::TopicConfig {
                delete_retention_ms: Some(0),
                ..Default::default()
            },
            false,
        ),
        (
            "delete_retention_ms",
            pb::TopicConfig {
                delete_retention_ms: Some(1),
                ..Default::default()
            },
            true,
        ),
        (
            "delete_retention_ms",
            pb::TopicConfig {
                delete_retention_ms: Some(MAX_MS),
                ..Default::default()
            },
            true,
        ),
        (
            "delete_retention_ms",
            pb::TopicConfig {
                delete_retention_ms: Some(MAX_MS + 1),
                ..Default::default()
            },
            false,
        ),
        (
            "retention_bytes",
            pb::TopicConfig {
                segment_bytes: Some(4096),
                retention_bytes: Some(4095),
                ..Default::default()
            },
            false,
        ),
        (
            "retention_bytes",
            pb::TopicConfig {
                segment_bytes: Some(4096),
                retention_bytes: Some(4096),
                ..Default::default()
            },
            true,
        ),
    ];
    for (i, (field, config, valid)) in cases.into_iter().enumerate() {
        let created = client.create_topic(&format!("r{i}"), config).await;
        match (created, valid) {
            (Ok(_), true) => {}
            (Err(e), false) => assert_invalid(&e, field),
            (other, _) => panic!("case {i} ({field}): expected valid = {valid}, got {other:?}"),
        }
    }

    client
        .create_topic(
            "old",
            pb::TopicConfig {
                segment_bytes: Some(1024),
                retention_ms: Some(1000),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    for i in 0..30 {
        let ancient = NewMessage {
            timestamp_ms: Some(1),
            ..NewMessage::from_value(vec![b'x'; 100 + i])
        };
        client.produce("old", vec![ancient]).await.expect("produce");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = client.describe_topic("old").await.expect("describe");
        if info.segments == 1 || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        info.segments, 1,
        "only the active segment is left: {info:?}"
    );
    assert!(info.start_offset > 0 && info.end_offset == 30, "{info:?}");
    let rest = replay_all(&client, "old").await;
    assert_eq!(
        rest.first().map(|r| r.message.offset.0),
        Some(info.start_offset),
        "the active segment's messages stay readable, however old"
    );
}
