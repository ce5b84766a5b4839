//! The metrics and health listener: `/metrics` read by a Prometheus text
//! parser after a known workload through the real binary (native and gRPC),
//! compaction, retention and dead letters, refusals and timeouts by reason,
//! the start-up line, and `/readyz` turning 503 when a failed sync makes a
//! topic read-only. A real disk cannot be made to fail a sync from a test,
//! so that last one runs the broker and the HTTP listener in-process over
//! the simulated disk.

mod common;

use common::Broker;
use spool::broker::topic::Position;
use spool::client::{Client, FetchOptions};
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::protocol::pb::spool_client::SpoolClient;
use spool::storage::NewMessage;
use std::collections::HashMap;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// `GET path` from `addr` over a fresh connection.
async fn get(addr: &str, path: &str) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: spool\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("answer");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `/metrics` of `addr`, parsed as Prometheus does.
async fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let lines = answer.body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape")
}

/// The value of the sample `name` whose labels include `labels`, if any.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a single value: {other:?}"),
        })
}

/// Like [`value`], failing when the sample is missing.
fn must(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, name, labels).unwrap_or_else(|| {
        let names: Vec<_> = scrape
            .samples
            .iter()
            .map(|s| format!("{}{:?}", s.metric, s.labels))
            .collect();
        panic!("no {name} {labels:?} in {names:#?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_tell_a_known_workload_per_topic_group_and_listener() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--fsync", "always"]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let client = Client::connect(&broker.addr, "metrics-test")
        .await
        .expect("connect");

    // 100 messages of 10 bytes in 4 produces.
    for batch in 0..4 {
        let messages = (0..25)
            .map(|i| NewMessage::from_value(format!("message{:03}", batch * 25 + i)))
            .collect();
        client.produce("orders", messages).await.expect("produce");
    }
    client
        .create_group("orders", "workers", GroupMode::Queue, None)
        .await
        .expect("queue group");
    client
        .create_group("orders", "audit", GroupMode::Stream, None)
        .await
        .expect("stream group");
    // The queue group takes and acks 60; the stream group reads nothing.
    let mut consumed = 0;
    while consumed < 60 {
        let fetched = client
            .fetch(
                "orders",
                FetchOptions {
                    group: Some("workers".into()),
                    member: "m".into(),
                    max_messages: 60 - consumed,
                    ..Default::default()
                },
            )
            .await
            .expect("queue fetch");
        let offsets: Vec<u64> = fetched
            .messages
            .iter()
            .map(|m| m.message.offset.0)
            .collect();
        assert!(!offsets.is_empty(), "messages left to fetch");
        client
            .ack("orders", "workers", &offsets, None)
            .await
            .expect("ack");
        consumed += offsets.len() as u32;
    }
    client
        .describe_topic("missing")
        .await
        .expect_err("an unknown topic");

    // gRPC: one produce and one NOT_FOUND.
    let grpc = broker.grpc.clone().expect("a gRPC listener");
    let mut g = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect over gRPC");
    g.produce(pb::ProduceRequest {
        topic: "events".into(),
        messages: vec![pb::NewMessage {
            value: b"hello".to_vec().into(),
            ..Default::default()
        }],
    })
    .await
    .expect("produce over gRPC");
    g.describe_topic(pb::DescribeTopicRequest {
        name: "missing".into(),
    })
    .await
    .expect_err("an unknown topic over gRPC");

    let answer = get(&http, "/metrics").await;
    assert!(
        answer
            .headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        answer.headers
    );
    let s = scrape(&http).await;
    let orders = [("topic", "orders")];
    assert_eq!(must(&s, "spool_produced_messages_total", &orders), 100.0);
    assert_eq!(must(&s, "spool_produced_bytes_total", &orders), 1000.0);
    assert_eq!(must(&s, "spool_delivered_messages_total", &orders), 60.0);
    assert_eq!(must(&s, "spool_delivered_bytes_total", &orders), 600.0);
    assert_eq!(must(&s, "spool_topic_start_offset", &orders), 0.0);
    assert_eq!(must(&s, "spool_topic_end_offset", &orders), 100.0);
    assert_eq!(must(&s, "spool_topic_durable_end_offset", &orders), 100.0);
    assert_eq!(must(&s, "spool_topic_segments", &orders), 1.0);
    assert!(must(&s, "spool_topic_log_bytes", &orders) > 1000.0);
    assert_eq!(must(&s, "spool_topic_read_only", &orders), 0.0);
    let workers = [("topic", "orders"), ("group", "workers")];
    assert_eq!(must(&s, "spool_group_lag", &workers), 40.0);
    assert_eq!(must(&s, "spool_group_pending", &workers), 0.0);
    assert_eq!(must(&s, "spool_group_committed_offset", &workers), 60.0);
    let audit = [("topic", "orders"), ("group", "audit")];
    assert_eq!(must(&s, "spool_group_lag", &audit), 100.0);
    assert_eq!(
        must(&s, "spool_produced_messages_total", &[("topic", "events")]),
        1.0
    );
    assert_eq!(must(&s, "spool_topics", &[]), 2.0);

    let native = |op: &'static str, code: &'static str| {
        [("listener", "native"), ("operation", op), ("code", code)]
    };
    assert_eq!(
        must(&s, "spool_requests_total", &native("produce", "OK")),
        4.0
    );
    assert_eq!(
        must(&s, "spool_requests_total", &native("ack", "OK")),
        value(&s, "spool_requests_total", &native("fetch", "OK")).unwrap_or(-1.0)
    );
    assert_eq!(
        must(
            &s,
            "spool_requests_total",
            &native("describe_topic", "NOT_FOUND")
        ),
        1.0
    );
    let grpc_req = |op: &'static str, code: &'static str| {
        [("listener", "grpc"), ("operation", op), ("code", code)]
    };
    assert_eq!(
        must(&s, "spool_requests_total", &grpc_req("produce", "OK")),
        1.0
    );
    assert_eq!(
        must(
            &s,
            "spool_requests_total",
            &grpc_req("describe_topic", "NOT_FOUND")
        ),
        1.0
    );
    assert_eq!(
        must(
            &s,
            "spool_request_duration_seconds_count",
            &[("listener", "native"), ("operation", "produce")]
        ),
        4.0
    );
    // fsync=always: every produce and ack waited for a sync.
    assert!(must(&s, "spool_fsync_duration_seconds_count", &[]) >= 4.0);
    assert_eq!(must(&s, "spool_fsync_errors_total", &[]), 0.0);
    assert_eq!(
        must(&s, "spool_connections_open", &[("listener", "native")]),
        1.0
    );
    assert_eq!(
        must(&s, "spool_connections_open", &[("listener", "grpc")]),
        1.0
    );
    assert!(
        must(
            &s,
            "spool_connections_accepted_total",
            &[("listener", "native")]
        ) >= 1.0
    );

    assert_eq!(get(&http, "/healthz").await.status, 200);
    let ready = get(&http, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(get(&http, "/nope").await.status, 404);

    // A deleted topic takes its series with it; a closed connection is
    // no longer open.
    client.delete_topic("orders").await.expect("delete topic");
    drop(client);
    let s = scrape(&http).await;
    let left: Vec<_> = s
        .samples
        .iter()
        .filter(|s| s.labels.get("topic") == Some("orders"))
        .map(|s| s.metric.clone())
        .collect();
    assert!(left.is_empty(), "series of a deleted topic: {left:?}");
    assert_eq!(must(&s, "spool_topics", &[]), 1.0);
}

/// A topic with more groups than `max_open_files` leaves room for (each
/// group keeps a file open while its topic is open) stays open while it is
/// used: the sweeps closed it for the budget every second, and its next
/// request opened all its groups again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_over_the_file_budget_stays_open_while_it_is_used() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--max-open-files", "64"]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let client = Client::connect(&broker.addr, "m").await.expect("connect");
    client
        .create_topic("wide", pb::TopicConfig::default())
        .await
        .expect("create topic");
    for g in 0..70 {
        client
            .create_group("wide", &format!("g{g}"), GroupMode::Queue, None)
            .await
            .expect("create group");
    }
    // Used every 400 ms, across several sweeps (one a second).
    for round in 0..10 {
        client.describe_group("wide", "g0").await.expect("describe");
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let open = value(&scrape(&http).await, "spool_topics_open", &[]);
        assert_eq!(
            open,
            Some(1.0),
            "round {round}: the topic in use stays open"
        );
    }
}

/// The metrics listener serves at most 64 connections at once: peers that
/// open connections and hold them cannot take the process's descriptors;
/// one more is closed at once, and a place freed serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_a_bounded_number_of_connections() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            tokio::net::TcpStream::connect(&http)
                .await
                .expect("connect"),
        );
    }
    // The listener has taken them all before the next one comes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut extra = tokio::net::TcpStream::connect(&http)
        .await
        .expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: spool\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        extra.read_to_end(&mut answer),
    )
    .await
    .expect("closed at once, not after the header timeout");
    assert!(
        read.is_err() || answer.is_empty(),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    held.pop();
    // The place is free once the listener has seen the close; until then
    // a new connection is closed unanswered, so ask again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut s = tokio::net::TcpStream::connect(&http).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: spool\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.ok()?;
            let raw = String::from_utf8_lossy(&raw).into_owned();
            raw.split_whitespace().nth(1)?.parse::<u16>().ok()
        })
        .await
        .ok()
        .flatten();
        if status == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a freed place does not serve /healthz: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_by_the_limit_that_refused_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--max-connections-per-ip", "1"]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let first = Client::connect(&broker.addr, "first")
        .await
        .expect("the one connection allowed");
    Client::connect(&broker.addr, "second")
        .await
        .expect_err("a second from the same address is refused");
    let s = scrape(&http).await;
    assert_eq!(
        must(
            &s,
            "spool_connections_refused_total",
            &[("reason", "max_connections_per_ip")]
        ),
        1.0
    );
    assert_eq!(
        must(&s, "spool_connections_open", &[("listener", "native")]),
        1.0
    );
    drop(first);
}

/// `spool serve` on `data` with `args` (gRPC and socket.io off); returns it
/// (killed on drop) and its start-up output.
fn serve(data: &Path, args: &[&str]) -> (common::Killed, String) {
    let mut all = vec!["--grpc", "off", "--socketio", "off"];
    all.extend_from_slice(args);
    common::serve_with(data, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_lines_name_the_metrics_listener_and_off_turns_it_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");

    let (server, out) = serve(&data, &["--metrics", "127.0.0.1:0"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let addr = lines[1]
        .strip_prefix("spool metrics listening on ")
        .unwrap_or_else(|| panic!("`spool metrics listening on ADDR`: {out}"));
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{out}"
    );
    assert_eq!(get(addr, "/healthz").await.status, 200);
    drop(server);

    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "metrics = \"127.0.0.1:0\"\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let (server, out) = serve(&data, &["--format", "json", "--config", &config]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let addr = v["listeners"]["metrics"]
        .as_str()
        .unwrap_or_else(|| panic!("listeners.metrics: {out}"));
    assert_eq!(get(addr, "/readyz").await.status, 200);
    drop(server);

    let (server, out) = serve(&data, &["--metrics", "off"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    drop(server);
    std::fs::write(&config, "metrics = \"off\"\n").expect("config");
    let (server, out) = serve(&data, &["--format", "json", "--config", &config]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert!(v["listeners"].get("metrics").is_none(), "{out}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_a_failed_sync_makes_a_topic_read_only() {
    use spool::storage::FsyncPolicy;
    use spool::storage::io::{SimDisk, SimFault};
    use std::sync::Arc;

    let disk = Arc::new(SimDisk::new());
    let (broker, addr, stop, http) = sim_broker(
        &disk,
        FsyncPolicy::Always,
        spool::broker::DEFAULT_TOPIC_IDLE_CLOSE,
    )
    .await;
    let limit = test_limit();
    broker
        .produce("orders", vec![NewMessage::from_value("one")], limit)
        .await
        .expect("a produce while the disk syncs");
    let ready = get(&addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    disk.set_fault(SimFault::SyncError, true);
    broker
        .produce("orders", vec![NewMessage::from_value("two")], limit)
        .await
        .expect_err("a produce whose sync fails");
    disk.set_fault(SimFault::SyncError, false);

    let ready = get(&addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("orders"), "{}", ready.body);
    assert_eq!(get(&addr, "/healthz").await.status, 200);
    let s = scrape(&addr).await;
    assert_eq!(
        must(&s, "spool_topic_read_only", &[("topic", "orders")]),
        1.0
    );
    assert!(must(&s, "spool_fsync_errors_total", &[]) >= 1.0);
    // Read-only until restart: a sync that would succeed now changes nothing.
    broker
        .produce("orders", vec![NewMessage::from_value("three")], limit)
        .await
        .expect_err("still read-only");
    assert_eq!(get(&addr, "/readyz").await.status, 503);

    let _ = stop.send(true);
    http.await.expect("the listener stops with the signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_retention_count_their_runs_and_the_bytes_they_reclaim() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let small = |retention_bytes| pb::TopicConfig {
        segment_bytes: Some(1024),
        retention_bytes,
        ..Default::default()
    };
    let message = |i: u32| NewMessage::from_value(format!("{i:0>100}"));

    // Compaction: delete messages of sealed segments, then compact.
    client
        .create_topic("kept", small(None))
        .await
        .expect("create");
    for i in 0..40 {
        client
            .produce("kept", vec![message(i)])
            .await
            .expect("produce");
    }
    let doomed: Vec<u64> = (0..20).collect();
    client.delete("kept", &doomed).await.expect("delete");
    client.compact(Some("kept")).await.expect("compact");
    let s = scrape(&http).await;
    let compaction = [("topic", "kept"), ("kind", "compaction")];
    assert_eq!(must(&s, "spool_cleanup_runs_total", &compaction), 1.0);
    assert!(must(&s, "spool_cleanup_reclaimed_bytes_total", &compaction) > 1000.0);

    // Retention: past 2 KiB, whole old segments go (checked after each seal).
    client
        .create_topic("short", small(Some(2048)))
        .await
        .expect("create");
    for i in 0..100 {
        client
            .produce("short", vec![message(i)])
            .await
            .expect("produce");
    }
    let retention = [("topic", "short"), ("kind", "retention")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = scrape(&http).await;
        let runs = value(&s, "spool_cleanup_runs_total", &retention);
        if runs.is_some_and(|r| r >= 1.0) {
            let start = must(&s, "spool_topic_start_offset", &[("topic", "short")]);
            assert!(start > 0.0, "retention moved the start");
            assert!(must(&s, "spool_cleanup_reclaimed_bytes_total", &retention) > 1000.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no retention run counted in 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_counted_per_topic_and_group_until_the_group_goes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    client
        .create_topic(
            "jobs",
            pb::TopicConfig {
                max_deliveries: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    client
        .create_group("jobs", "workers", GroupMode::Queue, None)
        .await
        .expect("queue group");
    // Before the first dead letter, and before the first refusal, the
    // series are there at 0: an alert on their increase sees the first.
    let s = scrape(&http).await;
    let workers = [("topic", "jobs"), ("group", "workers")];
    assert_eq!(
        must(&s, "spool_dead_lettered_messages_total", &workers),
        0.0
    );
    for reason in ["max_connections", "max_connections_per_ip"] {
        assert_eq!(
            must(&s, "spool_connections_refused_total", &[("reason", reason)]),
            0.0
        );
    }
    for reason in ["idle_timeout_ms", "frame_timeout_ms", "write_timeout_ms"] {
        assert_eq!(
            must(
                &s,
                "spool_connections_closed_by_limit_total",
                &[("reason", reason)]
            ),
            0.0
        );
    }
    for kind in ["compaction", "retention"] {
        for name in [
            "spool_cleanup_runs_total",
            "spool_cleanup_reclaimed_bytes_total",
        ] {
            assert_eq!(must(&s, name, &[("topic", "jobs"), ("kind", kind)]), 0.0);
        }
    }
    // A listener no client has used yet has its connection series at 0.
    for listener in ["grpc", "socketio"] {
        for name in ["spool_connections_open", "spool_connections_accepted_total"] {
            assert_eq!(must(&s, name, &[("listener", listener)]), 0.0, "{name}");
        }
    }
    client
        .produce("jobs", vec![NewMessage::from_value("poison")])
        .await
        .expect("produce");
    // Delivered once, given back, and out of deliveries on the next fetch.
    let first = common::queue_fetch(&client, "jobs", "workers", 10).await;
    assert_eq!(first, vec![0]);
    client
        .nack("jobs", "workers", &first, 0, None)
        .await
        .expect("nack");
    let again = common::queue_fetch(&client, "jobs", "workers", 10).await;
    assert!(again.is_empty(), "dead-lettered, not delivered: {again:?}");

    let s = scrape(&http).await;
    assert_eq!(
        must(&s, "spool_dead_lettered_messages_total", &workers),
        1.0
    );
    assert_eq!(
        must(
            &s,
            "spool_produced_messages_total",
            &[("topic", "jobs.dlq")]
        ),
        1.0
    );
    assert_eq!(must(&s, "spool_group_lag", &workers), 0.0);

    client
        .delete_group("jobs", "workers")
        .await
        .expect("delete group");
    let s = scrape(&http).await;
    assert_eq!(
        value(&s, "spool_dead_lettered_messages_total", &workers),
        None,
        "a deleted group's series go with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_a_timeout_are_counted_by_its_setting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--frame-timeout-ms", "200"]);
    let http = broker.metrics.clone().expect("a metrics listener");
    // The first byte of a frame, and nothing more: the frame never completes.
    let mut s = tokio::net::TcpStream::connect(&broker.addr)
        .await
        .expect("connect");
    s.write_all(&[0]).await.expect("one byte");
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed by frame_timeout_ms within 10 s")
        .expect("read to the close");
    // A socket.io connection that sends nothing at all, and one that stops
    // in the middle of its request's headers.
    let socketio = broker.socketio.clone().expect("a socket.io listener");
    for sent in [&b""[..], b"GET / HTTP/1.1\r\nHost: spool\r\n"] {
        let mut s = tokio::net::TcpStream::connect(&socketio)
            .await
            .expect("connect");
        s.write_all(sent).await.expect("write");
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("closed by frame_timeout_ms within 10 s")
            .expect("read to the close");
    }
    // The native handshake counts as a request.
    let client = Client::connect(&broker.addr, "counted")
        .await
        .expect("connect");
    drop(client);
    let s = scrape(&http).await;
    assert_eq!(
        must(
            &s,
            "spool_connections_closed_by_limit_total",
            &[("reason", "frame_timeout_ms")]
        ),
        3.0
    );
    assert_eq!(
        must(
            &s,
            "spool_requests_total",
            &[
                ("listener", "native"),
                ("operation", "hello"),
                ("code", "OK")
            ]
        ),
        1.0
    );
}

/// Replay and stream-group reads that catch up take the batch read ahead
/// of them: the first fetch from the start reads in place, each next one
/// from where the last stopped finds its batch read, and the counter says
/// so; a read at the tail reads in place and adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_catch_up_count_what_they_took_from_a_read_ahead() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let http = broker.metrics.clone().expect("a metrics listener");
    let client = Client::connect(&broker.addr, "reader")
        .await
        .expect("connect");
    let messages: Vec<NewMessage> = (0..1000)
        .map(|i| NewMessage::from_value(format!("m{i}")))
        .collect();
    client.produce("log", messages).await.expect("produce");
    client
        .create_group("log", "catch-up", GroupMode::Stream, None)
        .await
        .expect("stream group");
    let labels = [("topic", "log")];
    let read_ahead = |s: &prometheus_parse::Scrape| {
        value(s, "spool_read_ahead_messages_total", &labels).unwrap_or(0.0)
    };
    let fetch = |group: Option<&str>, from: u64| {
        client.fetch(
            "log",
            FetchOptions {
                group: group.map(str::to_owned),
                member: "reader".to_owned(),
                from: Some(Position::Offset(from)),
                max_messages: 200,
                ..Default::default()
            },
        )
    };
    for group in [None, Some("catch-up")] {
        let before = read_ahead(&scrape(&http).await);
        let first = fetch(group, 0).await.expect("fetch");
        assert_eq!(first.messages.len(), 200);
        let second = fetch(group, first.next_offset).await.expect("fetch");
        assert_eq!(second.messages.len(), 200);
        assert_eq!(second.messages[0].message.offset.0, 200);
        let after = read_ahead(&scrape(&http).await);
        assert_eq!(
            after - before,
            200.0,
            "{group:?}: the second fetch took its batch from the read-ahead"
        );
    }
    // At the tail: read in place, nothing read ahead.
    let before = read_ahead(&scrape(&http).await);
    let tail = fetch(None, 990).await.expect("fetch");
    assert_eq!(tail.messages.len(), 10);
    assert_eq!(read_ahead(&scrape(&http).await), before);
}

/// A topic whose final sync fails as it is closed for being idle stays open,
/// read-only, without a runtime: `/readyz` and the scrape still name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_topic_that_turned_read_only_as_it_closed_idle() {
    use spool::storage::FsyncPolicy;
    use spool::storage::io::{SimDisk, SimFault};
    use std::sync::Arc;

    let disk = Arc::new(SimDisk::new());
    let (broker, addr, stop, http) = sim_broker(
        &disk,
        FsyncPolicy::Never,
        std::time::Duration::from_millis(100),
    )
    .await;
    let limit = test_limit();
    broker
        .produce("orders", vec![NewMessage::from_value("one")], limit)
        .await
        .expect("produce");
    disk.set_fault(SimFault::SyncError, true);
    // The sweep (every second) closes the idle topic; its sync fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ready = get(&addr, "/readyz").await;
        if ready.status == 503 {
            assert!(ready.body.contains("orders"), "{}", ready.body);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read-only topic is not seen: {}",
            ready.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    disk.set_fault(SimFault::SyncError, false);
    // Still seen a few sweeps later, though no request used it again.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let ready = get(&addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let s = scrape(&addr).await;
    assert_eq!(
        must(&s, "spool_topic_read_only", &[("topic", "orders")]),
        1.0
    );
    let _ = stop.send(true);
    let _ = http.await;
}

/// A broker on `disk` (topics under `fsync`, closed after `idle_close`
/// unused) with its HTTP endpoints served: the broker, their address, the
/// switch that stops them, and their task.
async fn sim_broker(
    disk: &std::sync::Arc<spool::storage::io::SimDisk>,
    fsync: spool::storage::FsyncPolicy,
    idle_close: std::time::Duration,
) -> (
    spool::broker::Broker,
    String,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let mut topic_defaults = spool::broker::TopicConfig::default();
    topic_defaults.log.fsync = fsync;
    let broker = spool::broker::Broker::open_on(
        spool::broker::BrokerConfig {
            data: "/sim/data".into(),
            topic_defaults,
            auto_create: true,
            recovery: Default::default(),
            max_message_bytes: 1 << 20,
            max_batch_messages: 1000,
            max_open_files: 1024,
            topic_idle_close: idle_close,
        },
        disk.clone(),
    )
    .await
    .expect("broker on the simulated disk");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let http = tokio::spawn(spool::http::serve(listener, broker.clone(), stopped));
    (broker, addr, stop, http)
}

fn test_limit() -> spool::broker::MessageLimit {
    spool::broker::MessageLimit {
        bytes: 1 << 20,
        setting: "test",
    }
}

/// A topic deleted while it is closed, by `delete_when_idle_ms` (the sweep
/// closes an idle topic before it deletes it) or by `DeleteTopic`, drops
/// its series and is announced to topic watchers, as an open one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_while_closed_drops_its_series_and_is_announced() {
    use spool::broker::{TopicConfig, TopicEvent};
    use spool::storage::FsyncPolicy;
    use spool::storage::io::SimDisk;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let disk = Arc::new(SimDisk::new());
    let (broker, addr, stop, http) =
        sim_broker(&disk, FsyncPolicy::Always, Duration::from_millis(50)).await;
    let mut events = broker.topic_events();
    broker
        .create_topic(
            "idle",
            TopicConfig {
                delete_when_idle_ms: Some(1500),
                ..Default::default()
            },
        )
        .await
        .expect("create idle");
    for topic in ["idle", "closed"] {
        broker
            .produce(topic, vec![NewMessage::from_value("m")], test_limit())
            .await
            .expect("produce");
    }
    let s = scrape(&addr).await;
    for topic in ["idle", "closed"] {
        assert_eq!(
            must(&s, "spool_produced_messages_total", &[("topic", topic)]),
            1.0
        );
    }
    // The sweep (every second) closes both well before "idle" is due.
    let deadline = Instant::now() + Duration::from_secs(10);
    while must(&scrape(&addr).await, "spool_topics_open", &[]) > 0.0 {
        assert!(Instant::now() < deadline, "the topics are never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.delete_topic("closed").await.expect("delete closed");
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Ok(TopicEvent::Deleted(name))) => deleted.push(name),
            Ok(Ok(TopicEvent::Created(_))) => {}
            other => panic!("deleted so far {deleted:?}, then {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["closed", "idle"]);
    let s = scrape(&addr).await;
    let left: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.labels.get("topic").is_some())
        .map(|x| format!("{}{{topic={:?}}}", x.metric, x.labels.get("topic")))
        .collect();
    assert!(left.is_empty(), "series of deleted topics: {left:?}");
    let _ = stop.send(true);
    let _ = http.await;
}

/// Once the broker stops, nothing more is written: a produce after its
/// final syncs is refused (`UNAVAILABLE`: the broker is stopping) instead
/// of acknowledged and then never synced under `fsync=interval`, and what
/// was acknowledged before the stop survives a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_after_the_broker_stops() {
    use spool::storage::io::{SimDisk, Storage};
    use spool::storage::{DataDir, FsyncPolicy, Offset};
    use std::sync::Arc;

    let disk = Arc::new(SimDisk::new());
    let (broker, _addr, stop, http) = sim_broker(
        &disk,
        FsyncPolicy::Interval(60_000),
        std::time::Duration::from_secs(30),
    )
    .await;
    broker
        .produce("t", vec![NewMessage::from_value("before")], test_limit())
        .await
        .expect("produce");
    broker.stop().await.expect("stop");
    let refused = broker
        .produce("t", vec![NewMessage::from_value("after")], test_limit())
        .await
        .expect_err("a produce after the stop");
    assert!(matches!(refused, spool::Error::Stopping(_)), "{refused}");
    assert_eq!(
        spool::protocol::status::code(&refused),
        pb::Code::Unavailable
    );
    let _ = stop.send(true);
    let _ = http.await;
    drop(broker);

    disk.power_cut(None);
    let data = DataDir::open(Arc::clone(&disk) as Arc<dyn Storage>, "/sim/data").expect("data dir");
    let registry = spool::broker::Registry::open(data, spool::broker::RegistryOptions::default())
        .expect("registry");
    let topic = registry.topic("t").expect("topic");
    let read = topic.log().read(Offset(0), 10, 1 << 20).expect("read");
    let values: Vec<&[u8]> = read.iter().map(|m| &m.value[..]).collect();
    assert_eq!(values, [&b"before"[..]]);
}

/// A queue group whose journal turned read-only (a failed sync) answers
/// a fetch with that error, even with nothing to lease: the quick look a
/// woken reader takes steps aside for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fetch_of_a_read_only_queue_group_says_why() {
    use spool::broker::topic::DeliveryLimits;
    use spool::broker::{FetchRequest, Position};
    use spool::groups::GroupMode;
    use spool::storage::FsyncPolicy;
    use spool::storage::io::{SimDisk, SimFault};
    use std::sync::Arc;
    use std::time::Duration;

    let disk = Arc::new(SimDisk::new());
    let (broker, _addr, stop, http) =
        sim_broker(&disk, FsyncPolicy::Always, Duration::from_secs(60)).await;
    broker
        .produce("q", vec![NewMessage::from_value("m")], test_limit())
        .await
        .expect("produce");
    broker
        .create_group("q", "g", GroupMode::Queue, Position::Earliest)
        .await
        .expect("group");
    let fetch = || FetchRequest {
        topic: "q".into(),
        group: Some("g".into()),
        from: None,
        member: "m".into(),
        limits: DeliveryLimits::new(10, 1 << 20),
        wait: Duration::ZERO,
    };
    let got = broker
        .fetch(fetch(), std::future::pending())
        .await
        .expect("fetch");
    let offsets: Vec<u64> = got.messages.iter().map(|m| m.offset()).collect();
    assert_eq!(offsets, [0]);
    disk.set_fault(SimFault::SyncError, true);
    let acked = broker
        .ack("q", "g", vec![spool::storage::Offset(0)], false)
        .await;
    assert!(acked.is_err(), "the ack's sync failed");
    disk.set_fault(SimFault::SyncError, false);
    // Nothing to lease now; the group's journal is read-only all the same.
    let refused = broker.fetch(fetch(), std::future::pending()).await;
    assert!(refused.is_err(), "an empty answer hid the read-only group");
    let _ = stop.send(true);
    let _ = http.await;
}
