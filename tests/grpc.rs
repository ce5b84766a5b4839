//! The gRPC endpoint of the real `spool` binary, driven by generated tonic
//! clients: produce, fetch, groups and subscriptions; errors with the same
//! code and message as the native protocol; health and reflection; and the
//! start-up lines and settings that place the listener.

mod common;

use common::Broker;
use futures_util::StreamExt;
use spool::client::{Client, ClientError};
use spool::protocol::pb;
use spool::protocol::pb::spool_client::SpoolClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A generated client connected to `broker`'s gRPC listener.
async fn grpc_client(broker: &Broker) -> SpoolClient<Channel> {
    let addr = broker.grpc.as_deref().expect("the broker serves gRPC");
    SpoolClient::connect(format!("http://{addr}"))
        .await
        .expect("connect over gRPC")
}

fn new_message(value: &str) -> pb::NewMessage {
    pb::NewMessage {
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn values(messages: &[pb::Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .collect()
}

fn earliest() -> pb::Position {
    pb::Position {
        kind: Some(pb::position::Kind::Earliest(pb::Empty {})),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_client_produces_fetches_and_subscribes_through_a_stream_group() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;

    let topic = client
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            config: None,
        })
        .await
        .expect("create topic")
        .into_inner();
    assert_eq!((topic.name.as_str(), topic.end_offset), ("orders", 0));

    let produced = client
        .produce(pb::ProduceRequest {
            topic: "orders".into(),
            messages: ["first", "second", "third"].map(new_message).to_vec(),
        })
        .await
        .expect("produce")
        .into_inner();
    assert_eq!((produced.first_offset, produced.last_offset), (0, 2));
    assert_eq!(produced.durability, pb::Durability::Durable as i32);

    let fetched = client
        .fetch(pb::FetchRequest {
            topic: "orders".into(),
            from: Some(earliest()),
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(values(&fetched.messages), ["first", "second", "third"]);
    assert_eq!((fetched.next_offset, fetched.end_offset), (3, 3));

    // A long-poll with nothing to read answers, empty, before the call's
    // deadline rather than waiting its full wait_ms.
    let mut poll = tonic::Request::new(pb::FetchRequest {
        topic: "orders".into(),
        from: Some(pb::Position {
            kind: Some(pb::position::Kind::Offset(3)),
        }),
        wait_ms: 30_000,
        ..Default::default()
    });
    poll.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    // The answer leaves 80 ms of the deadline for the way back; a loaded
    // machine may take longer, and the client's own deadline ends the call
    // (the margin itself is a unit test of the server's).
    match client.fetch(poll).await {
        Ok(polled) => assert!(polled.into_inner().messages.is_empty()),
        Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
    }
    // Far from the 30 s wait_ms.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    let group = client
        .create_group(pb::CreateGroupRequest {
            topic: "orders".into(),
            group: "audit".into(),
            mode: pb::GroupMode::Stream as i32,
            start: None,
        })
        .await
        .expect("create group")
        .into_inner();
    assert_eq!(
        (group.name.as_str(), group.mode),
        ("audit", pb::GroupMode::Stream as i32)
    );

    let mut deliveries = client
        .subscribe(pb::SubscribeRequest {
            topic: "orders".into(),
            group: Some("audit".into()),
            member: "m1".into(),
            max_in_flight: 10,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut received = Vec::new();
    let mut id = 0;
    while received.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .expect("a delivery in time")
            .expect("the stream goes on")
            .expect("a delivery, not an error");
        assert_ne!(d.subscription_id, 0, "deliveries carry their subscription");
        id = d.subscription_id;
        received.extend(d.messages);
    }
    assert_eq!(values(&received), ["first", "second", "third"]);

    // Acks return credit; a message produced now is pushed.
    client
        .ack(pb::AckRequest {
            topic: "orders".into(),
            group: "audit".into(),
            offsets: vec![0, 1, 2],
            subscription_id: Some(id),
        })
        .await
        .expect("ack returns credit");
    client
        .produce(pb::ProduceRequest {
            topic: "orders".into(),
            messages: vec![new_message("fourth")],
        })
        .await
        .expect("produce");
    let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the new message in time")
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(values(&d.messages), ["fourth"]);
    assert_eq!(d.messages[0].offset, 3);

    client
        .commit(pb::CommitRequest {
            topic: "orders".into(),
            group: "audit".into(),
            offset: 4,
        })
        .await
        .expect("commit");
    let described = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "orders".into(),
            group: "audit".into(),
        })
        .await
        .expect("describe group")
        .into_inner();
    assert_eq!(described.committed, 4);

    // What gRPC wrote, the native protocol reads.
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");
    let all = common::replay_all(&native, "orders").await;
    assert_eq!(all.len(), 4);
}

/// The native protocol's answer to the same mistake.
fn native_error(e: ClientError) -> (pb::Code, String) {
    match e {
        ClientError::Status { code, message } => (code, message),
        other => panic!("a status from the server: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_native_protocols_code_and_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--no-auto-create"]);
    let mut client = grpc_client(&broker).await;
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");

    let status = client
        .describe_topic(pb::DescribeTopicRequest {
            name: "missing".into(),
        })
        .await
        .expect_err("an unknown topic");
    let (code, message) = native_error(
        native
            .describe_topic("missing")
            .await
            .expect_err("an unknown topic"),
    );
    assert_eq!(code, pb::Code::NotFound);
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), message);
    assert!(message.contains("missing"), "{message}");

    let status = client
        .produce(pb::ProduceRequest {
            topic: "missing".into(),
            messages: vec![new_message("x")],
        })
        .await
        .expect_err("produce to an unknown topic without auto-create");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("missing"), "{status:?}");

    let bad = pb::TopicConfig {
        cleanup: Some("sideways".into()),
        ..Default::default()
    };
    let status = client
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            config: Some(bad.clone()),
        })
        .await
        .expect_err("a bad config field");
    let (code, message) = native_error(
        native
            .create_topic("t", bad)
            .await
            .expect_err("a bad config field"),
    );
    assert_eq!(code, pb::Code::InvalidArgument);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), message);
    assert!(status.message().contains("cleanup"), "{status:?}");
}

/// max_frame_bytes bounds gRPC messages as it bounds native frames, and
/// the largest message a produce takes follows from it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_frame_bytes_bounds_grpc_messages_as_it_bounds_frames() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_frame_bytes = 65536\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let broker = Broker::start(&tmp.path().join("data"), &["--config", &config]);
    let mut client = grpc_client(&broker).await;
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");

    let big = |bytes: usize| pb::ProduceRequest {
        topic: "t".into(),
        messages: vec![pb::NewMessage {
            value: vec![7u8; bytes].into(),
            ..Default::default()
        }],
    };
    let status = client
        .produce(big(70_000))
        .await
        .expect_err("a request over max_frame_bytes");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");

    // Within the frame, over the largest message a frame can deliver.
    let status = client
        .produce(big(65_000))
        .await
        .expect_err("a message over max_frame_bytes less 1 KiB");
    let (code, message) = native_error(
        native
            .produce(
                "t",
                vec![spool::storage::NewMessage::from_value(vec![7u8; 65_000])],
            )
            .await
            .expect_err("the same message natively"),
    );
    assert_eq!(code, pb::Code::InvalidArgument);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), message);
    assert!(message.contains("max_frame_bytes less 1 KiB"), "{message}");

    client
        .produce(big(60_000))
        .await
        .expect("a message that fits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_the_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let addr = format!("http://{}", broker.grpc.as_deref().expect("gRPC on"));
    let channel = Channel::from_shared(addr)
        .expect("a URI")
        .connect()
        .await
        .expect("connect");

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "spool.v1.Spool"] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // v1
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServiceResponse};
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(futures_util::stream::iter([request]))
            .await
            .expect("reflection v1")
            .into_inner();
        let answer = answers.next().await.expect("an answer").expect("no error");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("a service list: {answer:?}");
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|ServiceResponse { name }| name)
            .collect();
        assert!(names.iter().any(|n| n == "spool.v1.Spool"), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
    }
    // v1alpha, for older reflection clients.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(futures_util::stream::iter([request]))
            .await
            .expect("reflection v1alpha")
            .into_inner();
        let answer = answers.next().await.expect("an answer").expect("no error");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("a service list: {answer:?}");
        };
        assert!(
            list.service.iter().any(|s| s.name == "spool.v1.Spool"),
            "{list:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_subscriptions_and_consume_streams_with_unavailable_and_the_broker_exits_cleanly()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    client
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: vec![new_message("one")],
        })
        .await
        .expect("produce");
    let mut deliveries = client
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = deliveries
        .next()
        .await
        .expect("a delivery")
        .expect("no error");
    assert_eq!(values(&first.messages), ["one"]);

    client
        .create_group(pb::CreateGroupRequest {
            topic: "t".into(),
            group: "q".into(),
            mode: pb::GroupMode::Queue as i32,
            start: Some(earliest()),
        })
        .await
        .expect("create queue group");
    let mut consumer = consume(&mut client, start("t", "q", "m", 10))
        .await
        .expect("consume");
    assert_eq!(consumer.messages(1).await, [(0, 1)]);

    let stopped = tokio::task::spawn_blocking(move || broker.terminate());
    let last = tokio::time::timeout(Duration::from_secs(10), consumer.responses.message())
        .await
        .expect("the Consume stream ends in time");
    let status = last.expect_err("Consume ends with an error status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "broker is stopping");
    let last = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the stream ends in time")
        .expect("a last status");
    let status = last.expect_err("the subscription ends with an error status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "broker is stopping");
    let (ok, logs) = stopped.await.expect("terminate");
    assert!(ok, "a clean exit: {logs}");
}

/// Stores 500 messages of 2 KiB in topic `t`, then starts a Fetch of them
/// (about 1 MiB) over a bare HTTP/2 connection whose window lets the server
/// send only 64 KiB until the body is read: an answer that is being written
/// for as long as the caller does not read the body returned.
async fn half_read_fetch(broker: &Broker) -> h2::RecvStream {
    let addr = broker.grpc.clone().expect("gRPC listener");
    let mut client = grpc_client(broker).await;
    let value = "v".repeat(2048);
    client
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: (0..500).map(|_| new_message(&value)).collect(),
        })
        .await
        .expect("produce");
    drop(client);
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let fetch = prost::Message::encode_to_vec(&pb::FetchRequest {
        topic: "t".into(),
        max_messages: 500,
        max_bytes: 4 << 20,
        ..Default::default()
    });
    let mut body = vec![0u8];
    body.extend_from_slice(&(fetch.len() as u32).to_be_bytes());
    body.extend_from_slice(&fetch);
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/spool.v1.Spool/Fetch"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut send) = h2.send_request(request, false).expect("send");
    send.send_data(body.into(), true).expect("request body");
    let answer = answer.await.expect("response headers");
    assert_eq!(answer.status(), 200);
    answer.into_body()
}

fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A stop lets an answer being written finish, however slowly its client
/// reads it (within `shutdown_timeout_ms`): a first version of closing idle
/// connections at a stop counted a call as done once its body was handed to
/// HTTP/2, which buffers it whole, and cut such answers.
#[test]
fn a_stop_lets_an_answer_being_written_finish() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    two_workers().block_on(async move {
        let mut body = half_read_fetch(&broker).await;
        let stopped = tokio::task::spawn_blocking(move || broker.terminate());
        // Well past the 250 ms of quiet after which a stop closes
        // connections with no call left.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut read = 0usize;
        while let Some(chunk) = body.data().await {
            let chunk =
                chunk.unwrap_or_else(|e| panic!("the answer was cut after {read} bytes: {e}"));
            read += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body
            .trailers()
            .await
            .expect("trailers")
            .expect("a status in the trailers");
        assert_eq!(
            trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
            Some("0"),
            "{trailers:?}"
        );
        assert!(read > 500 * 2048, "the whole answer: {read} bytes");
        let (ok, logs) = stopped.await.expect("terminate");
        assert!(ok, "a clean exit: {logs}");
    });
}

/// A second SIGTERM during a stop ends the process at once (exit 128 +
/// 15) instead of waiting for what holds the stop, and loses nothing
/// acknowledged: the next start recovers as after a crash.
#[test]
fn a_second_signal_during_a_stop_exits_at_once_losing_nothing_acknowledged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "shutdown_timeout_ms = 60000\n").expect("config");
    let args = ["--config", config.to_str().expect("utf-8 path")];
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &args);
    two_workers().block_on(async move {
        // Holds the stop for up to shutdown_timeout_ms.
        let held = half_read_fetch(&broker).await;
        broker.signal("TERM");
        let began = Instant::now();
        while broker.log_count("signal received: shutting down") == 0 {
            assert!(began.elapsed() < Duration::from_secs(10), "the stop began");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One within a second of the first is taken for the same request.
        broker.signal("TERM");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            broker.log_count("second signal"),
            0,
            "a repeat at once is the same stop"
        );
        broker.signal("TERM");
        let (status, logs) =
            tokio::task::spawn_blocking(move || broker.exit_within(Duration::from_secs(15)))
                .await
                .expect("wait");
        assert_eq!(status.and_then(|s| s.code()), Some(143), "{logs}");
        assert!(logs.contains("second signal during the stop"), "{logs}");
        drop(held);
        let broker = Broker::start(&data, &args);
        let fetched = grpc_client(&broker)
            .await
            .fetch(pb::FetchRequest {
                topic: "t".into(),
                max_messages: 1000,
                max_bytes: 4 << 20,
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner();
        assert_eq!(fetched.messages.len(), 500, "every acknowledged message");
        let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
            .await
            .expect("terminate");
        assert!(ok, "{logs}");
    });
}

/// One client's `Consume` call: the requests it sends and the responses.
struct Consumer {
    requests: tokio::sync::mpsc::UnboundedSender<pb::ConsumeRequest>,
    responses: tonic::Streaming<pb::ConsumeResponse>,
}

fn start(topic: &str, group: &str, member: &str, max_in_flight: u32) -> pb::consume_request::Kind {
    pb::consume_request::Kind::Start(pb::ConsumeStart {
        topic: topic.into(),
        group: group.into(),
        member: member.into(),
        max_in_flight,
    })
}

fn ack(offsets: &[u64]) -> pb::consume_request::Kind {
    pb::consume_request::Kind::Ack(pb::ConsumeAck {
        offsets: offsets.to_vec(),
    })
}

/// Opens a `Consume` call whose first request carries `first`.
async fn consume(
    client: &mut SpoolClient<Channel>,
    first: pb::consume_request::Kind,
) -> Result<Consumer, tonic::Status> {
    let (requests, queued) = tokio::sync::mpsc::unbounded_channel();
    let outbound = futures_util::stream::unfold(queued, |mut q| async move {
        let request = q.recv().await?;
        Some((request, q))
    });
    // The server answers the call once it has the first request.
    requests
        .send(pb::ConsumeRequest { kind: Some(first) })
        .expect("the stream is open");
    let responses = client.consume(outbound).await?.into_inner();
    Ok(Consumer {
        requests,
        responses,
    })
}

impl Consumer {
    fn send(&self, kind: pb::consume_request::Kind) {
        self.requests
            .send(pb::ConsumeRequest { kind: Some(kind) })
            .expect("the call still takes requests");
    }

    /// The next response, within 10 s.
    async fn next(&mut self) -> pb::ConsumeResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("a response in time")
            .expect("no error")
            .expect("the stream goes on")
    }

    /// Messages (offset, delivery) until `n` arrived, or confirmations.
    async fn messages(&mut self, n: usize) -> Vec<(u64, u32)> {
        let mut got = Vec::new();
        while got.len() < n {
            let r = self.next().await;
            got.extend(r.messages.iter().map(|m| (m.offset, m.delivery)));
        }
        got
    }
}

/// The next response of `a` (0) or `b` (1), within 10 s.
async fn either(a: &mut Consumer, b: &mut Consumer) -> (usize, pb::ConsumeResponse) {
    let next = async {
        tokio::select! {
            r = a.responses.message() => (0, r),
            r = b.responses.message() => (1, r),
        }
    };
    let (i, r) = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("a response in time");
    (i, r.expect("no error").expect("the stream goes on"))
}

/// A `Consume` stream whose group was deleted and created again gives back
/// what it held in its own group only, when it ends: a member of the new
/// group under the same name keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_stream_ending_leaves_a_group_created_again_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![new_message("job")],
        })
        .await
        .expect("produce");
    let workers = || pb::CreateGroupRequest {
        topic: "jobs".into(),
        group: "workers".into(),
        mode: pb::GroupMode::Queue as i32,
        start: Some(earliest()),
    };
    client.create_group(workers()).await.expect("group");
    let mut old = consume(&mut client, start("jobs", "workers", "w", 1))
        .await
        .expect("consume");
    assert_eq!(old.messages(1).await, [(0, 1)]);
    client
        .delete_group(pb::DeleteGroupRequest {
            topic: "jobs".into(),
            group: "workers".into(),
        })
        .await
        .expect("delete");
    client.create_group(workers()).await.expect("group again");
    let mut new = consume(&mut client, start("jobs", "workers", "w", 1))
        .await
        .expect("consume again");
    assert_eq!(new.messages(1).await, [(0, 1)]);
    // The old stream ends; its give-back must not reach the new lease.
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = client
        .fetch(queue_fetch("workers", 1000))
        .await
        .expect("fetch")
        .into_inner();
    assert!(
        other.messages.is_empty(),
        "the new group's lease was given back by the old stream: {:?}",
        other.messages
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_streams_share_a_queue_group_with_acks_nacks_and_leases_given_back_on_close() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    let produce = |client: &mut SpoolClient<Channel>, n: usize| {
        let mut client = client.clone();
        async move {
            client
                .produce(pb::ProduceRequest {
                    topic: "jobs".into(),
                    messages: (0..n).map(|i| new_message(&format!("job {i}"))).collect(),
                })
                .await
                .expect("produce")
                .into_inner()
        }
    };
    produce(&mut client, 10).await;
    client
        .create_group(pb::CreateGroupRequest {
            topic: "jobs".into(),
            group: "workers".into(),
            mode: pb::GroupMode::Queue as i32,
            start: Some(earliest()),
        })
        .await
        .expect("create queue group");

    // a takes its max_in_flight (3) and holds it; b then gets others.
    let mut a = consume(&mut client, start("jobs", "workers", "a", 3))
        .await
        .expect("consume a");
    let held_by_a = a.messages(3).await;
    let mut b = consume(&mut client, start("jobs", "workers", "b", 3))
        .await
        .expect("consume b");
    let mut delivered: Vec<(usize, u64)> = held_by_a.iter().map(|&(o, _)| (0, o)).collect();
    a.send(ack(&held_by_a.iter().map(|&(o, _)| o).collect::<Vec<_>>()));
    let mut acked: Vec<u64> = Vec::new();
    while acked.len() < 10 {
        let (i, r) = either(&mut a, &mut b).await;
        acked.extend(&r.acked);
        if !r.messages.is_empty() {
            let offsets: Vec<u64> = r.messages.iter().map(|m| m.offset).collect();
            assert!(r.messages.iter().all(|m| m.delivery == 1), "{r:?}");
            delivered.extend(offsets.iter().map(|&o| (i, o)));
            [&a, &b][i].send(ack(&offsets));
        }
    }
    let mut offsets: Vec<u64> = delivered.iter().map(|&(_, o)| o).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>(), "each message once");
    acked.sort_unstable();
    assert_eq!(acked, offsets, "every ack confirmed");
    assert!(delivered.iter().any(|&(i, _)| i == 1), "b got work too");
    let group = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "workers".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!((group.committed, group.pending), (10, 0));

    // A nack redelivers, counting the delivery.
    produce(&mut client, 1).await;
    let (i, r) = either(&mut a, &mut b).await;
    assert_eq!(r.messages.len(), 1, "{r:?}");
    assert_eq!((r.messages[0].offset, r.messages[0].delivery), (10, 1));
    [&a, &b][i].send(pb::consume_request::Kind::Nack(pb::ConsumeNack {
        offsets: vec![10],
        delay_ms: 0,
    }));
    let mut confirmed = None;
    let mut redelivered = None;
    while confirmed.is_none() || redelivered.is_none() {
        let (j, r) = either(&mut a, &mut b).await;
        if !r.nacked.is_empty() {
            assert_eq!(j, i, "the nacking stream confirms");
            confirmed = Some((r.nacked, r.requeued));
        }
        if let Some(m) = r.messages.first() {
            redelivered = Some((j, m.offset, m.delivery));
        }
    }
    assert_eq!(confirmed, Some((vec![10], 1)));
    let (j, offset, delivery) = redelivered.expect("redelivered");
    assert_eq!((offset, delivery), (10, 2));
    [&a, &b][j].send(ack(&[10]));
    loop {
        let (_, r) = either(&mut a, &mut b).await;
        if r.acked == [10] {
            break;
        }
    }

    // Closing a stream gives back what it holds, at once (the ack timeout
    // is 30 s). a closes its side first: its stream ends cleanly.
    drop(a.requests);
    let end = tokio::time::timeout(Duration::from_secs(10), a.responses.message())
        .await
        .expect("a's stream ends in time")
        .expect("a ends without error");
    assert!(end.is_none(), "{end:?}");
    produce(&mut client, 2).await;
    assert_eq!(b.messages(2).await, [(11, 1), (12, 1)]);
    // A lease extension answers the leases b holds.
    b.send(pb::consume_request::Kind::Extend(pb::ConsumeExtend {
        offsets: vec![11, 12, 3],
        ack_timeout_ms: Some(60_000),
    }));
    assert_eq!(b.next().await.extended, [11, 12]);
    let mut c = consume(&mut client, start("jobs", "workers", "c", 10))
        .await
        .expect("consume c");
    // b's call is cancelled while it holds 11 and 12: c gets them.
    let cancelled = Instant::now();
    drop(b);
    assert_eq!(c.messages(2).await, [(11, 2), (12, 2)]);
    // c closes its side while holding them: a new stream gets them.
    drop(c.requests);
    let end = tokio::time::timeout(Duration::from_secs(10), c.responses.message())
        .await
        .expect("c's stream ends in time")
        .expect("c ends without error");
    assert!(end.is_none(), "{end:?}");
    let mut d = consume(&mut client, start("jobs", "workers", "d", 10))
        .await
        .expect("consume d");
    assert_eq!(d.messages(2).await, [(11, 3), (12, 3)]);
    assert!(
        cancelled.elapsed() < Duration::from_secs(10),
        "given back, not expired: {:?}",
        cancelled.elapsed()
    );
    d.send(ack(&[11, 12]));
    assert_eq!(d.next().await.acked, [11, 12]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_consume_start_is_refused_naming_the_field_or_with_the_native_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![new_message("one")],
        })
        .await
        .expect("produce");
    for (mode, name) in [
        (pb::GroupMode::Queue, "workers"),
        (pb::GroupMode::Stream, "audit"),
    ] {
        client
            .create_group(pb::CreateGroupRequest {
                topic: "jobs".into(),
                group: name.into(),
                mode: mode as i32,
                start: None,
            })
            .await
            .expect("create group");
    }
    let refused = |r: Result<Consumer, tonic::Status>| match r {
        Ok(_) => panic!("the first request is refused"),
        Err(status) => status,
    };

    let status = refused(consume(&mut client, ack(&[0])).await);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("start:"), "{status:?}");
    assert!(status.message().contains("not ack"), "{status:?}");
    for (first, field) in [
        (start("", "workers", "m", 1), "start.topic"),
        (start("jobs", "", "m", 1), "start.group"),
        (start("jobs", "workers", "", 1), "start.member"),
    ] {
        let status = refused(consume(&mut client, first).await);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), format!("{field} is required"));
    }

    // Unknown topic or group, and a stream group: the native answers.
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");
    let status = refused(consume(&mut client, start("nope", "workers", "m", 1)).await);
    let (code, message) = native_error(native.describe_topic("nope").await.expect_err("unknown"));
    assert_eq!(
        (code, status.code()),
        (pb::Code::NotFound, tonic::Code::NotFound)
    );
    assert_eq!(status.message(), message);
    let status = refused(consume(&mut client, start("jobs", "nope", "m", 1)).await);
    let (code, message) = native_error(
        native
            .describe_group("jobs", "nope")
            .await
            .expect_err("unknown"),
    );
    assert_eq!(
        (code, status.code()),
        (pb::Code::NotFound, tonic::Code::NotFound)
    );
    assert_eq!(status.message(), message);
    let status = refused(consume(&mut client, start("jobs", "audit", "m", 1)).await);
    let (code, message) = native_error(
        native
            .nack("jobs", "audit", &[0], 0, None)
            .await
            .expect_err("a stream group"),
    );
    assert_eq!(
        (code, status.code()),
        (pb::Code::InvalidArgument, tonic::Code::InvalidArgument)
    );
    assert_eq!(status.message(), message);

    // A second start on an open stream ends it, naming the field.
    let mut c = consume(&mut client, start("jobs", "workers", "m", 1))
        .await
        .expect("consume");
    assert_eq!(c.messages(1).await, [(0, 1)]);
    c.send(start("jobs", "workers", "m", 1));
    let status = tokio::time::timeout(Duration::from_secs(10), c.responses.message())
        .await
        .expect("in time")
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("start:"), "{status:?}");
}

/// `spool serve` on `data` with `args` (metrics and socket.io off); returns
/// it (killed on drop) and its start-up output.
fn serve(data: &Path, args: &[&str]) -> (common::Killed, String) {
    let mut all = vec!["--metrics", "off", "--socketio", "off"];
    all.extend_from_slice(args);
    common::serve_with(data, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_lines_name_the_grpc_listener_and_off_turns_it_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let version = env!("CARGO_PKG_VERSION");

    // Text: the first line as ever, the gRPC line right after it.
    let (server, out) = serve(&data, &["--grpc", "127.0.0.1:0"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&format!("spool {version} listening on 127.0.0.1:")),
        "{out}"
    );
    let grpc = lines[1]
        .strip_prefix("spool grpc listening on ")
        .unwrap_or_else(|| panic!("`spool grpc listening on ADDR`: {out}"));
    assert!(
        grpc.starts_with("127.0.0.1:") && !grpc.ends_with(":0"),
        "{out}"
    );
    let mut client = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("gRPC is served there");
    client
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list topics");
    drop((client, server));

    // JSON: one object with listeners.grpc; from the config file too.
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "grpc = \"127.0.0.1:0\"\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let (server, out) = serve(&data, &["--format", "json", "--config", &config]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let grpc = v["listeners"]["grpc"]
        .as_str()
        .unwrap_or_else(|| panic!("listeners.grpc: {out}"));
    assert!(
        grpc.starts_with("127.0.0.1:") && !grpc.ends_with(":0"),
        "{out}"
    );
    assert!(v["listeners"]["native"].is_string(), "{out}");
    drop(server);

    // Off, by flag or in the config file: no gRPC line, no listeners.grpc.
    let (server, out) = serve(&data, &["--grpc", "off"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    drop(server);
    std::fs::write(&config, "grpc = \"off\"\n").expect("config");
    let (server, out) = serve(&data, &["--format", "json", "--config", &config]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert!(v["listeners"].get("grpc").is_none(), "{out}");
    drop(server);
}

/// Starts a broker whose config file holds `toml`, its data beside it.
fn start_with_config(tmp: &Path, toml: &str) -> Broker {
    let config = tmp.join("spool.toml");
    std::fs::write(&config, toml).expect("config");
    let config = config.to_string_lossy().into_owned();
    Broker::start(&tmp.join("data"), &["--config", &config])
}

fn offset(n: u64) -> pb::Position {
    pb::Position {
        kind: Some(pb::position::Kind::Offset(n)),
    }
}

/// A queue-group fetch of `group` as member "m".
fn queue_fetch(group: &str, wait_ms: u32) -> pb::FetchRequest {
    pb::FetchRequest {
        topic: "jobs".into(),
        group: Some(group.into()),
        member: "m".into(),
        wait_ms,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unary_rpc_does_what_its_native_request_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: (0..5).map(|i| new_message(&format!("m{i}"))).collect(),
        })
        .await
        .expect("produce");
    let queue = |group: &str| pb::CreateGroupRequest {
        topic: "jobs".into(),
        group: group.into(),
        mode: pb::GroupMode::Queue as i32,
        start: None,
    };
    client.create_group(queue("q")).await.expect("queue group");
    client
        .create_group(pb::CreateGroupRequest {
            topic: "jobs".into(),
            group: "s".into(),
            mode: pb::GroupMode::Stream as i32,
            start: None,
        })
        .await
        .expect("stream group");

    // Ack and Nack over leases taken by a queue-group Fetch.
    let leased = client
        .fetch(queue_fetch("q", 0))
        .await
        .expect("queue fetch")
        .into_inner();
    let leased: Vec<u64> = leased.messages.iter().map(|m| m.offset).collect();
    assert_eq!(leased, [0, 1, 2, 3, 4]);
    client
        .ack(pb::AckRequest {
            topic: "jobs".into(),
            group: "q".into(),
            offsets: vec![0, 1, 2],
            subscription_id: None,
        })
        .await
        .expect("ack");
    let nacked = client
        .nack(pb::NackRequest {
            topic: "jobs".into(),
            group: "q".into(),
            offsets: vec![3],
            delay_ms: 0,
            subscription_id: None,
        })
        .await
        .expect("nack")
        .into_inner();
    assert_eq!(nacked.requeued, 1);
    let again = client
        .fetch(queue_fetch("q", 0))
        .await
        .expect("fetch after nack")
        .into_inner();
    let again: Vec<(u64, u32)> = again
        .messages
        .iter()
        .map(|m| (m.offset, m.delivery))
        .collect();
    assert_eq!(again, [(3, 2)], "the nacked message, redelivered");
    let described = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "q".into(),
        })
        .await
        .expect("describe group")
        .into_inner();
    assert_eq!(
        (described.mode, described.pending, described.committed),
        (pb::GroupMode::Queue as i32, 2, 3),
        "{described:?}"
    );

    // Commit and Seek move a stream group.
    client
        .commit(pb::CommitRequest {
            topic: "jobs".into(),
            group: "s".into(),
            offset: 4,
        })
        .await
        .expect("commit");
    let s = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "s".into(),
        })
        .await
        .expect("describe stream group")
        .into_inner();
    assert_eq!(s.committed, 4);
    let sought = client
        .seek(pb::SeekRequest {
            topic: "jobs".into(),
            group: "s".into(),
            to: Some(offset(1)),
        })
        .await
        .expect("seek")
        .into_inner();
    assert_eq!(sought.offset, 1);
    let from_group = client
        .fetch(pb::FetchRequest {
            topic: "jobs".into(),
            group: Some("s".into()),
            max_messages: 1,
            ..Default::default()
        })
        .await
        .expect("stream group fetch")
        .into_inner();
    assert_eq!(values(&from_group.messages), ["m1"]);

    let groups = client
        .list_groups(pb::ListGroupsRequest {
            topic: "jobs".into(),
        })
        .await
        .expect("list groups")
        .into_inner();
    let mut names: Vec<&str> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["q", "s"]);
    client
        .delete_group(pb::DeleteGroupRequest {
            topic: "jobs".into(),
            group: "s".into(),
        })
        .await
        .expect("delete group");
    let status = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "s".into(),
        })
        .await
        .expect_err("a deleted group");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // Delete hides messages from replay.
    client
        .delete(pb::DeleteRequest {
            topic: "jobs".into(),
            offsets: vec![1, 2],
        })
        .await
        .expect("delete");
    let replay = client
        .fetch(pb::FetchRequest {
            topic: "jobs".into(),
            from: Some(earliest()),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(values(&replay.messages), ["m0", "m3", "m4"]);

    let compacted = client
        .compact(pb::CompactRequest {
            topic: Some("jobs".into()),
        })
        .await
        .expect("compact")
        .into_inner();
    assert!(
        compacted.topics.iter().all(|t| t.topic == "jobs"),
        "{compacted:?}"
    );

    client
        .create_topic(pb::CreateTopicRequest {
            name: "other".into(),
            config: None,
        })
        .await
        .expect("create topic");
    let listed = client
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list topics")
        .into_inner();
    let mut names: Vec<&str> = listed.topics.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["jobs", "other"]);
    let jobs = client
        .describe_topic(pb::DescribeTopicRequest {
            name: "jobs".into(),
        })
        .await
        .expect("describe topic")
        .into_inner();
    assert_eq!((jobs.name.as_str(), jobs.end_offset), ("jobs", 5));
    client
        .delete_topic(pb::DeleteTopicRequest {
            name: "other".into(),
        })
        .await
        .expect("delete topic");
    let status = client
        .describe_topic(pb::DescribeTopicRequest {
            name: "other".into(),
        })
        .await
        .expect_err("a deleted topic");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("other"), "{status:?}");
}

/// A deadline ending a long-poll of a queue group costs no lease: nothing
/// stays leased to the abandoned call, and a message produced afterwards
/// is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_on_a_queue_long_poll_loses_no_lease() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    client
        .create_topic(pb::CreateTopicRequest {
            name: "jobs".into(),
            config: None,
        })
        .await
        .expect("create topic");
    client
        .create_group(pb::CreateGroupRequest {
            topic: "jobs".into(),
            group: "q".into(),
            mode: pb::GroupMode::Queue as i32,
            start: None,
        })
        .await
        .expect("queue group");
    let mut poll = tonic::Request::new(queue_fetch("q", 30_000));
    poll.set_timeout(Duration::from_millis(600));
    let started = Instant::now();
    match client.fetch(poll).await {
        Ok(answer) => assert!(answer.into_inner().messages.is_empty()),
        Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
    }
    // Far from the 30 s wait_ms.
    assert!(started.elapsed() < Duration::from_secs(15));

    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![new_message("after")],
        })
        .await
        .expect("produce");
    let got = client
        .fetch(queue_fetch("q", 5_000))
        .await
        .expect("fetch")
        .into_inner();
    let got: Vec<(u64, u32)> = got
        .messages
        .iter()
        .map(|m| (m.offset, m.delivery))
        .collect();
    assert_eq!(got, [(0, 1)], "delivered, for the first time");
    let more = client
        .fetch(queue_fetch("q", 300))
        .await
        .expect("fetch again")
        .into_inner();
    assert!(more.messages.is_empty(), "delivered once: {more:?}");
    let group = client
        .describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "q".into(),
        })
        .await
        .expect("describe group")
        .into_inner();
    assert_eq!(
        group.pending, 1,
        "only the fetch that answered holds a lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_name_the_group_or_the_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_message_bytes = 1024\n");
    let mut client = grpc_client(&broker).await;

    let status = client
        .create_topic(pb::CreateTopicRequest {
            name: "sp ace".into(),
            config: None,
        })
        .await
        .expect_err("an invalid topic name");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("\"sp ace\""), "{status:?}");
    let status = client
        .produce(pb::ProduceRequest {
            topic: "a/b".into(),
            messages: vec![new_message("x")],
        })
        .await
        .expect_err("an invalid topic name on produce");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("\"a/b\""), "{status:?}");

    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![new_message("x")],
        })
        .await
        .expect("produce");
    for status in [
        client
            .fetch(queue_fetch("nobody", 0))
            .await
            .expect_err("fetch of an unknown group"),
        client
            .describe_group(pb::DescribeGroupRequest {
                topic: "jobs".into(),
                group: "nobody".into(),
            })
            .await
            .expect_err("describe of an unknown group"),
        client
            .ack(pb::AckRequest {
                topic: "jobs".into(),
                group: "nobody".into(),
                offsets: vec![0],
                subscription_id: None,
            })
            .await
            .expect_err("ack in an unknown group"),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(status.message().contains("nobody"), "{status:?}");
    }

    let status = client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![pb::NewMessage {
                value: vec![1u8; 2000].into(),
                ..Default::default()
            }],
        })
        .await
        .expect_err("a message over max_message_bytes");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("max_message_bytes"), "{status:?}");
    let end = client
        .describe_topic(pb::DescribeTopicRequest {
            name: "jobs".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .end_offset;
    assert_eq!(end, 1, "nothing of the refused produce was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_grpc_produces_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    let mut acknowledged = Vec::new();
    for batch in 0..20 {
        let messages: Vec<_> = (0..50)
            .map(|i| new_message(&format!("b{batch} m{i}")))
            .collect();
        let answer = client
            .produce(pb::ProduceRequest {
                topic: "durable".into(),
                messages: messages.clone(),
            })
            .await
            .expect("produce")
            .into_inner();
        assert_eq!(answer.durability, pb::Durability::Durable as i32);
        acknowledged.extend(
            messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.value).into_owned()),
        );
    }
    drop(client);
    broker.kill9();

    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    let mut present = Vec::new();
    let mut from = 0;
    loop {
        let fetched = client
            .fetch(pb::FetchRequest {
                topic: "durable".into(),
                from: Some(offset(from)),
                max_messages: 500,
                ..Default::default()
            })
            .await
            .expect("replay after the restart")
            .into_inner();
        if fetched.messages.is_empty() {
            break;
        }
        from = fetched.next_offset;
        present.extend(values(&fetched.messages));
    }
    assert_eq!(present, acknowledged);
}

/// Waits (at most 5 s) until a new gRPC connection is served again, once
/// a slot was freed; fails saying `what` did not happen.
async fn served_again(broker: &Broker, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = match channel(broker).await {
            Ok(mut c) => list(&mut c).await.is_ok(),
            Err(_) => false,
        };
        if served {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gRPC channel on a connection of its own.
async fn channel(broker: &Broker) -> Result<SpoolClient<Channel>, tonic::transport::Error> {
    let addr = broker.grpc.as_deref().expect("the broker serves gRPC");
    Ok(SpoolClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .expect("a URI")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    ))
}

async fn list(client: &mut SpoolClient<Channel>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(pb::ListTopicsRequest {});
    request.set_timeout(Duration::from_secs(5));
    client.list_topics(request).await.map(drop)
}

/// `max_connections` counts native and gRPC connections together; the
/// refused gRPC connection's calls fail with the refusal, and the refusal
/// is in the log summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_grpc_and_native_connections_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_connections = 2\n");
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");
    let mut first = channel(&broker).await.expect("first gRPC connection");
    list(&mut first)
        .await
        .expect("the admitted connection is served");

    // The refusal reaches the client as a GOAWAY whose debug data tonic
    // keeps in the status's source.
    let mut third = channel(&broker).await.expect("the TCP connection opens");
    let refused = list(&mut third).await.expect_err("no slot left");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        format!("{refused:?}").contains("too many connections; try again later"),
        "{refused:?}"
    );
    let status = Client::connect(&broker.addr, "native 2")
        .await
        .map(drop)
        .expect_err("no slot for a native connection either");
    assert!(
        status.to_string().contains("too many connections"),
        "{status}"
    );

    drop(native);
    served_again(&broker, "the native slot came back").await;
    list(&mut first).await.expect("still served");
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.contains("connections refused:") && logs.contains("by max_connections"),
        "{logs}"
    );
}

/// `max_subscriptions` bounds the `Subscribe` and `Consume` streams of one
/// gRPC connection, and a stream that ends gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscriptions_bounds_the_streams_of_one_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_subscriptions = 2\n");
    let mut client = channel(&broker).await.expect("connect");
    client
        .produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: vec![new_message("x")],
        })
        .await
        .expect("produce");
    client
        .create_group(pb::CreateGroupRequest {
            topic: "jobs".into(),
            group: "q".into(),
            mode: pb::GroupMode::Queue as i32,
            start: None,
        })
        .await
        .expect("queue group");
    let replay = || pb::SubscribeRequest {
        topic: "jobs".into(),
        from: Some(earliest()),
        ..Default::default()
    };
    let one = client.subscribe(replay()).await.expect("first stream");
    let two = consume(&mut client, start("jobs", "q", "m", 10))
        .await
        .expect("second stream");
    let status = client
        .subscribe(replay())
        .await
        .expect_err("a third stream on the connection");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_subscriptions"), "{status:?}");
    let status = consume(&mut client, start("jobs", "q", "m2", 10))
        .await
        .map(drop)
        .expect_err("a third stream, Consume");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    let mut other = channel(&broker).await.expect("a second connection");
    let _three = other
        .subscribe(replay())
        .await
        .expect("another connection has places of its own");

    drop(one);
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.subscribe(replay()).await.is_err() {
        assert!(Instant::now() < deadline, "the places came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects raw to `addr` and sends the HTTP/2 preface and an empty
/// `SETTINGS`; then, while `ping`, a `PING` every 100 ms. Returns how long
/// the server kept the connection open (at most 15 s).
async fn raw_connection_lifetime(addr: &str, ping: bool) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let raw = tokio::net::TcpStream::connect(addr)
        .await
        .expect("raw connect");
    let (mut read, mut write) = raw.into_split();
    write
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let pinger = tokio::spawn(async move {
        if ping {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let frame = b"\0\0\x08\x06\0\0\0\0\0pingpong";
                if write.write_all(frame).await.is_err() {
                    return;
                }
            }
        }
        // Keep the write half open, silent, for longer than is measured.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    pinger.abort();
    started.elapsed()
}

/// `idle_timeout_ms` closes a gRPC connection that sends no frame but
/// `PING` while none of its calls waits; a quiet subscription keeps its
/// connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grpc_connections_are_closed_and_waiting_calls_keep_theirs_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "idle_timeout_ms = 400\n");
    let addr = broker.grpc.clone().expect("gRPC on");

    for ping in [false, true] {
        let lived = raw_connection_lifetime(&addr, ping).await;
        // Only idle_timeout_ms closes it this soon: the server's
        // keep-alive waits 30 s, the silent client longer.
        assert!(
            lived >= Duration::from_millis(300) && lived < Duration::from_secs(10),
            "pinging {ping}: closed after {lived:?}"
        );
    }

    let mut client = channel(&broker).await.expect("connect");
    client
        .create_topic(pb::CreateTopicRequest {
            name: "quiet".into(),
            config: None,
        })
        .await
        .expect("create topic");
    let mut deliveries = client
        .subscribe(pb::SubscribeRequest {
            topic: "quiet".into(),
            from: Some(earliest()),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut producer = grpc_client(&broker).await;
    producer
        .produce(pb::ProduceRequest {
            topic: "quiet".into(),
            messages: vec![new_message("late")],
        })
        .await
        .expect("produce");
    let delivery = tokio::time::timeout(Duration::from_secs(5), deliveries.message())
        .await
        .expect("a delivery in time")
        .expect("the subscription outlived 1.5 s of quiet")
        .expect("the stream goes on");
    assert_eq!(values(&delivery.messages), ["late"]);

    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(logs.contains("by idle_timeout_ms"), "{logs}");
}

/// A unary call that takes longer than `idle_timeout_ms` to serve (here a
/// compaction of many segments) keeps its connection open until it is
/// answered, as a native request does: the client gets its answer, not a
/// closed connection with the outcome unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_served_longer_than_the_idle_timeout_is_answered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "idle_timeout_ms = 100\n");
    let native = Client::connect(&broker.addr, "loader")
        .await
        .expect("connect");
    native
        .create_topic(
            "kv",
            pb::TopicConfig {
                cleanup: Some("compact".into()),
                segment_bytes: Some(64 * 1024),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    // 16 MiB of 16 keys written over and over: 256 segments to rewrite,
    // each synced.
    let value = vec![7u8; 1024];
    for round in 0..16 {
        let batch = (0..1024)
            .map(|i| spool::storage::NewMessage {
                key: Some(format!("k{}", (round * 1024 + i) % 16).into_bytes().into()),
                ..spool::storage::NewMessage::from_value(value.clone())
            })
            .collect();
        native.produce("kv", batch).await.expect("produce");
    }
    let mut g = grpc_client(&broker).await;
    let compacted = g
        .compact(pb::CompactRequest {
            topic: Some("kv".into()),
        })
        .await
        .expect("answered, though the compaction outlasted the idle timeout")
        .into_inner();
    let kv = &compacted.topics[0];
    eprintln!("compaction took {} ms", kv.millis);
    assert!(kv.records_removed > 0, "{kv:?}");
}

/// `max_connections_per_ip` too counts both transports from one address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_counts_grpc_and_native_connections_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_with_config(tmp.path(), "max_connections_per_ip = 1\n");
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");
    let mut refused = channel(&broker).await.expect("the TCP connection opens");
    let status = list(&mut refused)
        .await
        .expect_err("127.0.0.1 has its one connection");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        format!("{status:?}").contains("max_connections_per_ip is 1"),
        "{status:?}"
    );
    drop(native);
    served_again(&broker, "the address's count came back").await;
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(logs.contains("by max_connections_per_ip"), "{logs}");
}

/// Credit comes back only through acks on the connection that holds the
/// subscription: an ack naming it from another connection returns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_another_connection_returns_no_credit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut a = channel(&broker).await.expect("connection A");
    let mut b = channel(&broker).await.expect("connection B");
    a.produce(pb::ProduceRequest {
        topic: "t".into(),
        messages: vec![new_message("1"), new_message("2"), new_message("3")],
    })
    .await
    .expect("produce");
    let mut deliveries = a
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            member: "m".into(),
            max_in_flight: 1,
            from: Some(offset(0)),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("a delivery in time")
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(values(&first.messages), ["1"]);
    b.ack(pb::AckRequest {
        topic: "t".into(),
        group: String::new(),
        offsets: vec![0],
        subscription_id: Some(first.subscription_id),
    })
    .await
    .expect("an ack naming a subscription of another connection is answered");
    let next = tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await;
    assert!(
        next.is_err(),
        "credit returned from another connection: {next:?}"
    );
    a.ack(pb::AckRequest {
        topic: "t".into(),
        group: String::new(),
        offsets: vec![0],
        subscription_id: Some(first.subscription_id),
    })
    .await
    .expect("ack");
    let second = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the next delivery once its own connection acks")
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(values(&second.messages), ["2"]);
}

/// A message whose lease runs out and that comes back to the same Consume
/// stream replaces its first delivery: the stream's window stays
/// `max_in_flight` (it shrank by one each time before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_to_the_same_consume_stream_keeps_its_window() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut g = grpc_client(&broker).await;
    g.create_topic(pb::CreateTopicRequest {
        name: "slow".into(),
        config: Some(pb::TopicConfig {
            // Long enough that the ack below lands before the lease runs
            // out again on a loaded machine.
            ack_timeout_ms: Some(1500),
            ..Default::default()
        }),
    })
    .await
    .expect("topic");
    g.create_group(pb::CreateGroupRequest {
        topic: "slow".into(),
        group: "g".into(),
        mode: pb::GroupMode::Queue as i32,
        start: Some(earliest()),
    })
    .await
    .expect("group");
    let mut c = consume(&mut g.clone(), start("slow", "g", "m", 2))
        .await
        .expect("consume");
    g.produce(pb::ProduceRequest {
        topic: "slow".into(),
        messages: vec![new_message("first")],
    })
    .await
    .expect("produce");
    assert_eq!(c.messages(1).await, [(0, 1)]);
    // Not acked in time: it comes again, to this stream.
    assert_eq!(c.messages(1).await, [(0, 2)]);
    c.send(ack(&[0]));
    let acked = c.next().await;
    assert_eq!(acked.acked, [0]);
    g.produce(pb::ProduceRequest {
        topic: "slow".into(),
        messages: vec![new_message("a"), new_message("b")],
    })
    .await
    .expect("produce");
    // Both at once, without an ack: the window is two again.
    assert_eq!(c.messages(2).await, [(1, 1), (2, 1)]);
}

/// Deleting a stream group ends its subscriptions at once with
/// `NOT_FOUND`, not at the topic's next produce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_stream_group_ends_its_subscriptions_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut g = grpc_client(&broker).await;
    g.produce(pb::ProduceRequest {
        topic: "t".into(),
        messages: vec![new_message("m")],
    })
    .await
    .expect("produce");
    g.create_group(pb::CreateGroupRequest {
        topic: "t".into(),
        group: "s".into(),
        mode: pb::GroupMode::Stream as i32,
        start: Some(earliest()),
    })
    .await
    .expect("group");
    let mut deliveries = g
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            group: Some("s".into()),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), deliveries.message())
        .await
        .expect("in time")
        .expect("no error")
        .expect("a delivery");
    assert_eq!(values(&first.messages), ["m"]);
    g.delete_group(pb::DeleteGroupRequest {
        topic: "t".into(),
        group: "s".into(),
    })
    .await
    .expect("delete group");
    let end = tokio::time::timeout(Duration::from_secs(5), deliveries.message())
        .await
        .expect("the stream ends without another produce");
    assert_eq!(
        end.expect_err("ends with an error").code(),
        tonic::Code::NotFound
    );
}

/// `Consume` streams that end together give back everything: one stream's
/// returned message leased by another stream's read just as that stream
/// ends is given back by the read, not left leased to nobody until
/// `ack_timeout_ms` (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_streams_ending_together_leave_nothing_leased() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut g = grpc_client(&broker).await;
    g.create_topic(pb::CreateTopicRequest {
        name: "jobs".into(),
        config: Some(pb::TopicConfig {
            ack_timeout_ms: Some(60_000),
            ..Default::default()
        }),
    })
    .await
    .expect("topic");
    g.create_group(pb::CreateGroupRequest {
        topic: "jobs".into(),
        group: "g".into(),
        mode: pb::GroupMode::Queue as i32,
        start: Some(earliest()),
    })
    .await
    .expect("group");
    let pending = |mut g: SpoolClient<Channel>| async move {
        g.describe_group(pb::DescribeGroupRequest {
            topic: "jobs".into(),
            group: "g".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .pending
    };
    for round in 0..8 {
        g.produce(pb::ProduceRequest {
            topic: "jobs".into(),
            messages: (0..4)
                .map(|i| new_message(&format!("{round}.{i}")))
                .collect(),
        })
        .await
        .expect("produce");
        // Six streams of one message each: four hold one, two wait.
        let mut streams = Vec::new();
        for i in 0..6 {
            let member = format!("m{i}");
            streams.push(
                consume(&mut g.clone(), start("jobs", "g", &member, 1))
                    .await
                    .expect("consume"),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending(g.clone()).await < 4 {
            assert!(Instant::now() < deadline, "round {round}: the four leased");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // All end at once: each gives its message back, and the others'
        // reads may lease it just as they end too.
        drop(streams);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = pending(g.clone()).await;
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {left} still leased to streams that ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another member gets all four soon (a read the streams had under
        // way may still lease one for a moment before it gives it back),
        // and acks them.
        let mut got: Vec<u64> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 4 {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {got:?} came back"
            );
            let fetched = g
                .fetch(pb::FetchRequest {
                    topic: "jobs".into(),
                    group: Some("g".into()),
                    member: "after".into(),
                    max_messages: 10,
                    ..Default::default()
                })
                .await
                .expect("fetch")
                .into_inner();
            got.extend(fetched.messages.iter().map(|m| m.offset));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let distinct: std::collections::BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(
            (got.len(), distinct.len()),
            (4, 4),
            "round {round}: {got:?}"
        );
        g.ack(pb::AckRequest {
            topic: "jobs".into(),
            group: "g".into(),
            offsets: got,
            subscription_id: None,
        })
        .await
        .expect("ack");
    }
}

/// A request message with a string field set to bytes that are not UTF-8
/// (a `DescribeTopicRequest` whose `name` is not text).
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8Name {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

/// A produce of a million empty messages is refused before it is built, as
/// on the native protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_of_very_many_empty_messages_is_refused_before_it_is_built() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    let refused = client
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: vec![pb::NewMessage::default(); 1_000_000],
        })
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("send fewer"), "{refused:?}");
    client
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: vec![pb::NewMessage {
                value: b"x".to_vec().into(),
                ..pb::NewMessage::default()
            }],
        })
        .await
        .expect("the broker serves on");
}

/// A request that does not decode answers `INVALID_ARGUMENT`, as an
/// unreadable frame does on the native protocol. Before, the gRPC
/// library's codec answered `INTERNAL`, which tells a client the outcome of
/// a change is unknown, though nothing was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let addr = broker.grpc.as_deref().expect("the broker serves gRPC");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let refused = grpc
        .unary(
            tonic::Request::new(NotUtf8Name {
                name: vec![0xff, 0xfe, b'x'],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/spool.v1.Spool/DescribeTopic"),
            tonic_prost::ProstCodec::<NotUtf8Name, pb::TopicInfo>::default(),
        )
        .await
        .expect_err("not UTF-8");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("UTF-8"), "{refused:?}");
}

/// Why: error messages repeat the names a client sent, however long, and
/// gRPC carries the message in a header: a 20 000-character topic name
/// made one past the 16 KiB header limit of grpcio's clients, which then
/// saw `RESOURCE_EXHAUSTED` where the broker answered `NOT_FOUND`. Every
/// transport now sends at most about 2 KiB of message, its start and its
/// end, the same on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_name_in_an_error_is_cut_the_same_on_every_transport() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut client = grpc_client(&broker).await;
    let native = Client::connect(&broker.addr, "native")
        .await
        .expect("native connect");
    let name = "x".repeat(20_000);
    let status = client
        .describe_topic(pb::DescribeTopicRequest { name: name.clone() })
        .await
        .expect_err("no such topic");
    let (code, message) = native_error(native.describe_topic(&name).await.expect_err("unknown"));
    assert_eq!(
        (code, status.code()),
        (pb::Code::NotFound, tonic::Code::NotFound)
    );
    assert_eq!(status.message(), message);
    assert!(message.len() < 4096, "{} bytes", message.len());
    assert!(message.starts_with("topic \"xxx"), "{message}");
    assert!(
        message.ends_with("xxx\" does not exist (no topic can have that name)"),
        "{message}"
    );
}
