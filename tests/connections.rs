//! Connections that are gone or do nothing must not hold the broker: through
//! the real binary, with short configured timeouts instead of real minutes.
//! A killed follower frees its slot at once; a stop ends subscriptions and
//! long-polls at once with a frame saying so; an idle connection, a frame
//! that trickles in, and a subscriber that does not read are each closed by
//! their limit (with a final frame where one can be sent) while everyone
//! else is served; a per-address cap refuses only the extra connection; and
//! the Rust client and the CLI keep a quiet subscription open by pinging.

mod common;

use bytes::BytesMut;
use common::Broker;
use futures_util::StreamExt;
use prost::Message as _;
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, FetchOptions};
use spool::protocol::pb;
use spool::protocol::pb::client_frame::Request;
use spool::storage::NewMessage;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spool_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spool"))
}

/// Starts a broker with `config` as its TOML config file and `flags`.
fn start(dir: &Path, config: &str, flags: &[&str]) -> Broker {
    let path = dir.join("spool.toml");
    std::fs::write(&path, config).expect("config");
    let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
    args.extend_from_slice(flags);
    Broker::start(&dir.join("data"), &args)
}

/// What a raw connection read next.
#[derive(Debug)]
enum Next {
    Frame(Box<pb::ServerFrame>),
    /// The server closed the connection (end of stream or reset).
    Closed,
    /// Nothing within the time given.
    Quiet,
}

/// A connection speaking the framing by hand, so a test controls every byte
/// and what it reads.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        Raw::from(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from `local` (another loopback address: another client host).
    async fn connect_from(local: &str, addr: &str) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{local}:0").parse().expect("address"))
            .expect("bind to another loopback address");
        let stream = socket
            .connect(addr.parse().expect("address"))
            .await
            .expect("connect");
        let s = stream.into_std().expect("std stream");
        s.set_nonblocking(false).expect("blocking");
        Raw::from(s)
    }

    fn from(s: TcpStream) -> Raw {
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    fn bytes(request_id: u64, request: Request) -> Vec<u8> {
        let body = pb::ClientFrame {
            request_id,
            request: Some(request),
        }
        .encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn send(&mut self, request_id: u64, request: Request) {
        self.s
            .write_all(&Raw::bytes(request_id, request))
            .expect("write");
    }

    fn hello(&mut self) -> pb::Welcome {
        self.send(
            0,
            Request::Hello(pb::Hello {
                protocol_version: 1,
                client_name: "raw".into(),
                token: None,
            }),
        );
        match self.next(Duration::from_secs(5)) {
            Next::Frame(f) => match f.kind {
                Some(pb::server_frame::Kind::Welcome(w)) => w,
                other => panic!("expected Welcome, got {other:?}"),
            },
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let frame = self.buf.split_to(5 + len);
                    return Next::Frame(Box::new(
                        pb::ServerFrame::decode(&frame[5..]).expect("server frames decode"),
                    ));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Quiet;
            }
            self.s.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 64 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Quiet;
                }
                Err(_) => return Next::Closed,
            }
        }
    }

    /// Frames until the server closes the connection (within `within`).
    fn until_closed(&mut self, within: Duration) -> Vec<pb::ServerFrame> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Next::Frame(f) => frames.push(*f),
                Next::Closed => return frames,
                Next::Quiet => panic!("still open after {within:?}; got {frames:?}"),
            }
        }
    }
}

/// The error of a `Response` with `request_id` 0 (the reason a connection closed).
fn closing_error(f: &pb::ServerFrame) -> Option<&pb::Error> {
    match &f.kind {
        Some(pb::server_frame::Kind::Response(pb::Response {
            request_id: 0,
            result: Some(pb::response::Result::Error(e)),
        })) => Some(e),
        _ => None,
    }
}

fn code(e: &pb::Error) -> pb::Code {
    pb::Code::try_from(e.code).unwrap_or(pb::Code::Unknown)
}

/// Connects until admitted, for up to `within`; panics naming the last refusal.
async fn connect_within(addr: &str, within: Duration) -> (Client, Duration) {
    let started = Instant::now();
    loop {
        match Client::connect(addr, "newcomer").await {
            Ok(c) => return (c, started.elapsed()),
            Err(e) if started.elapsed() < within => {
                assert_eq!(e.code(), Some(pb::Code::ResourceExhausted), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("not admitted within {within:?}: {e}"),
        }
    }
}

/// Stops `broker` and returns how many connections its summary lines
/// counted for `setting` (see [`tallied`]); the logs go with a mismatch.
async fn tallied_at_stop(broker: Broker, setting: &'static str) -> u64 {
    let (_, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    let n = tallied(&logs, setting);
    eprintln!("{setting}: {n} in the logs:\n{logs}");
    n
}

/// How many connections the broker's summary lines count for `setting`
/// ("N by setting"), over every interval.
fn tallied(logs: &str, setting: &str) -> u64 {
    let needle = format!(" by {setting}");
    let mut total = 0;
    for line in logs.lines() {
        for (i, _) in line.match_indices(&needle) {
            if line[i + needle.len()..].starts_with('_') {
                continue;
            }
            let count = line[..i].rsplit([' ', ':', ',']).next();
            total += count.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

/// `spool consume TOPIC --follow` against `addr`, its stdout piped.
fn follower(addr: &str, topic: &str) -> Child {
    Command::new(spool_bin())
        .args(["consume", topic, "--follow", "--server", addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool consume --follow")
}

/// Waits until a client is refused: every slot is taken.
async fn until_full(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(addr, "probe").await {
            Err(e) if e.code() == Some(pb::Code::ResourceExhausted) => return,
            Ok(c) => drop(c),
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(Instant::now() < deadline, "the slots never filled up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_followers_release_their_slots_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_connections = 4\n", &[]);
    let producer = Client::connect(&broker.addr, "setup")
        .await
        .expect("connect");
    producer
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    drop(producer);

    // Two CLI followers (idle in a long-poll) and two raw subscribers (idle
    // in a subscription) take every slot.
    let mut followers = vec![follower(&broker.addr, "t"), follower(&broker.addr, "t")];
    let mut raws = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(&broker.addr);
        raw.hello();
        raw.send(
            1,
            Request::Subscribe(pb::SubscribeRequest {
                topic: "t".into(),
                from: Some(pb::Position {
                    kind: Some(pb::position::Kind::Latest(pb::Empty {})),
                }),
                ..Default::default()
            }),
        );
        assert!(matches!(raw.next(Duration::from_secs(5)), Next::Frame(_)));
        raws.push(raw);
    }
    for f in &mut followers {
        let mut line = String::new();
        let stdout = f.stdout.as_mut().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert_eq!(line, "x\n", "the follower is connected and caught up");
    }
    until_full(&broker.addr).await;

    // Gone without a word: kill -9 and dropped sockets.
    for f in &mut followers {
        f.kill().expect("kill -9");
        f.wait().expect("reaped");
    }
    drop(raws);
    let mut admitted = Vec::new();
    for _ in 0..4 {
        // Well before write_timeout_ms (30 s) or idle_timeout_ms (60 s)
        // would free a slot.
        let (client, waited) = connect_within(&broker.addr, Duration::from_secs(15)).await;
        assert!(
            waited < Duration::from_secs(15),
            "a slot came back after {waited:?}"
        );
        admitted.push(client);
    }
    for c in &admitted {
        assert_eq!(c.ping(3).await.expect("ping"), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_subscriptions_and_long_polls_at_once_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A shutdown_timeout_ms far beyond what the stop may take, so a stop
    // that waited it out cannot pass for a slow one.
    let broker = start(tmp.path(), "shutdown_timeout_ms = 60000\n", &[]);
    let client = Client::connect(&broker.addr, "consumer")
        .await
        .expect("connect");
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("produce");
    let mut sub = client
        .subscribe("t", None, "s", Some(Position::Latest), 10)
        .await
        .expect("subscribe");
    let poller = Client::connect(&broker.addr, "poller")
        .await
        .expect("connect");
    let long_poll = tokio::spawn(async move {
        poller
            .fetch(
                "t",
                FetchOptions {
                    from: Some(Position::Offset(1)),
                    wait_ms: 30_000,
                    ..Default::default()
                },
            )
            .await
    });
    let mut cli = follower(&broker.addr, "t");
    let mut line = String::new();
    BufReader::new(cli.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "x\n");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let (ok, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    let took = started.elapsed();
    assert!(ok, "clean exit: {logs}");
    assert!(
        took < Duration::from_secs(15),
        "the stop took {took:?}, not well under shutdown_timeout_ms: {logs}"
    );

    let stopping = |e: &ClientError| {
        e.code() == Some(pb::Code::Unavailable) && e.to_string().contains("broker is stopping")
    };
    let item = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the subscription hears at once");
    match item {
        Some(Err(e)) if stopping(&e) => {}
        other => panic!("expected UNAVAILABLE broker is stopping, got {other:?}"),
    }
    match long_poll.await.expect("long-poll task") {
        Err(e) if stopping(&e) => {}
        other => panic!("expected UNAVAILABLE broker is stopping, got {other:?}"),
    }
    let out = cli.wait_with_output().expect("the follower exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("broker is stopping"), "{stderr}");
}

/// A call made after the broker's last frame said why the connection ends
/// fails with that reason ("broker is stopping", `UNAVAILABLE`: retry after
/// reconnecting), not a bare "connection closed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_after_a_stop_fails_with_the_stops_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&tmp.path().join("data"), &[]);
    let client = Client::connect(&broker.addr, "late")
        .await
        .expect("connect");
    let (ok, _) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "the stop exits 0");
    // The reader has the last frame once the connection is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_closed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late = client.ping(1).await.expect_err("the broker is gone");
    assert_eq!(late.code(), Some(pb::Code::Unavailable), "{late}");
    assert!(late.to_string().contains("stopping"), "{late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_with_a_final_frame() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(
        tmp.path(),
        // Long enough that the slots are all held when "extra" comes, on a
        // loaded machine.
        "max_connections = 4\nidle_timeout_ms = 1500\n",
        &[],
    );
    let latest = || {
        Some(pb::Position {
            kind: Some(pb::position::Kind::Latest(pb::Empty {})),
        })
    };
    // Every slot is held: one connection in a subscription, one in a
    // long-poll that outlasts the idle timeout, two that said Hello only.
    let mut subscribed = Raw::connect(&broker.addr);
    assert_eq!(
        subscribed.hello().idle_timeout_ms,
        1500,
        "Welcome says the limit"
    );
    subscribed.send(
        1,
        Request::Produce(pb::ProduceRequest {
            topic: "t".into(),
            messages: vec![pb::NewMessage {
                value: b"x".to_vec().into(),
                ..Default::default()
            }],
        }),
    );
    subscribed.send(
        2,
        Request::Subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            from: latest(),
            ..Default::default()
        }),
    );
    // The produce and the subscribe are answered before the long-poll
    // starts from the end.
    for _ in 0..2 {
        let answer = subscribed.next(Duration::from_secs(5));
        assert!(
            matches!(&answer, Next::Frame(f) if closing_error(f).is_none()),
            "{answer:?}"
        );
    }
    let mut polling = Raw::connect(&broker.addr);
    polling.hello();
    polling.send(
        3,
        Request::Fetch(pb::FetchRequest {
            topic: "t".into(),
            from: latest(),
            wait_ms: 20_000,
            ..Default::default()
        }),
    );
    let mut silent: Vec<Raw> = (0..2).map(|_| Raw::connect(&broker.addr)).collect();
    for raw in &mut silent {
        raw.hello();
    }
    let refused = Client::connect(&broker.addr, "extra").await;
    assert!(refused.is_err(), "every slot is taken");

    // The idle timeout closes each, with a last word: the subscription and
    // the long-poll end with the reason too.
    let started = Instant::now();
    let mut ended = Vec::new();
    for raw in silent.iter_mut().chain([&mut subscribed, &mut polling]) {
        let frames = raw.until_closed(Duration::from_secs(10));
        let last = frames
            .last()
            .and_then(closing_error)
            .expect("a final frame");
        assert_eq!(code(last), pb::Code::DeadlineExceeded, "{last:?}");
        assert!(last.message.contains("idle_timeout_ms"), "{last:?}");
        ended.push(frames);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let subscription_ended = ended[2].iter().any(|f| {
        matches!(&f.kind, Some(pb::server_frame::Kind::Delivery(d))
            if d.error.as_ref().is_some_and(|e| code(e) == pb::Code::DeadlineExceeded))
    });
    assert!(subscription_ended, "{:?}", ended[2]);
    let long_poll_answered = ended[3].iter().any(|f| {
        matches!(&f.kind, Some(pb::server_frame::Kind::Response(pb::Response {
            request_id: 3,
            result: Some(pb::response::Result::Error(e)),
        })) if code(e) == pb::Code::DeadlineExceeded)
    });
    assert!(long_poll_answered, "{:?}", ended[3]);
    let (client, _) = connect_within(&broker.addr, Duration::from_secs(2)).await;
    assert_eq!(client.ping(1).await.expect("ping"), 1);
    drop(client);

    assert_eq!(tallied_at_stop(broker, "idle_timeout_ms").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_turns_a_timeout_off_and_flags_override_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(
        tmp.path(),
        "idle_timeout_ms = 200\nframe_timeout_ms = 200\n",
        &["--idle-timeout-ms", "0", "--frame-timeout-ms", "0"],
    );
    let mut raw = Raw::connect(&broker.addr);
    assert_eq!(raw.hello().idle_timeout_ms, 0, "no idle timeout");
    let ping = Raw::bytes(1, Request::Ping(pb::PingRequest { nonce: 5 }));
    raw.s.write_all(&ping[..4]).expect("half a frame");
    assert!(
        matches!(raw.next(Duration::from_millis(1500)), Next::Quiet),
        "neither limit applies"
    );
    raw.s.write_all(&ping[4..]).expect("the rest");
    assert!(
        matches!(raw.next(Duration::from_secs(5)), Next::Frame(f) if closing_error(&f).is_none())
    );

    let out = Command::new(spool_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-connections-per-ip",
            "0",
            "--data",
        ])
        .arg(tmp.path().join("other"))
        .output()
        .expect("run spool serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("max_connections_per_ip"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_trickles_in_is_cut_by_the_frame_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "", &["--frame-timeout-ms", "500"]);
    let good = Client::connect(&broker.addr, "good")
        .await
        .expect("connect");

    // One byte every 100 ms: a Hello, then a ping after the handshake.
    let hello = Raw::bytes(
        0,
        Request::Hello(pb::Hello {
            protocol_version: 1,
            client_name: "slow client with a long name".into(),
            token: None,
        }),
    );
    let ping = Raw::bytes(1, Request::Ping(pb::PingRequest { nonce: u64::MAX }));
    for handshake_done in [false, true] {
        let mut raw = Raw::connect(&broker.addr);
        if handshake_done {
            raw.hello();
        }
        let bytes = if handshake_done { &ping } else { &hello };
        assert!(bytes.len() > 10, "takes over a second");
        let started = Instant::now();
        let mut frames = Vec::new();
        for b in bytes {
            if raw.s.write_all(&[*b]).is_err() {
                break;
            }
            match raw.next(Duration::from_millis(100)) {
                Next::Frame(f) => frames.push(*f),
                Next::Closed => break,
                Next::Quiet => {}
            }
        }
        frames.extend(raw.until_closed(Duration::from_secs(5)));
        let took = started.elapsed();
        let last = frames
            .last()
            .and_then(closing_error)
            .expect("a final frame");
        assert_eq!(code(last), pb::Code::DeadlineExceeded, "{last:?}");
        assert!(last.message.contains("frame_timeout_ms"), "{last:?}");
        assert!(
            took < Duration::from_secs(10),
            "cut after {took:?} (handshake done: {handshake_done})"
        );
    }
    assert_eq!(good.ping(9).await.expect("others are served"), 9);
}

/// With the frame timeout off, a frame begun and never finished is
/// idleness: the idle timeout closes the connection. Before, a frame in
/// progress put the idle timeout off for good, so three bytes of a frame
/// held a connection slot forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_begun_and_left_is_idle_when_the_frame_timeout_is_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(
        tmp.path(),
        "",
        &["--frame-timeout-ms", "0", "--idle-timeout-ms", "500"],
    );
    let ping = Raw::bytes(1, Request::Ping(pb::PingRequest { nonce: 1 }));
    let mut raw = Raw::connect(&broker.addr);
    raw.hello();
    let started = Instant::now();
    raw.s.write_all(&ping[..3]).expect("a frame's first bytes");
    let frames = raw.until_closed(Duration::from_secs(10));
    let last = frames
        .last()
        .and_then(closing_error)
        .expect("a final frame");
    assert_eq!(code(last), pb::Code::DeadlineExceeded, "{last:?}");
    assert!(last.message.contains("idle_timeout_ms"), "{last:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
}

/// A broker with two connection slots and a write timeout of 500 ms, and
/// a producer (one slot) that stored a first message in topic `t`.
async fn two_slots_and_a_producer(dir: &Path) -> (Broker, Client) {
    let broker = start(
        dir,
        "max_connections = 2\nwrite_timeout_ms = 500\n",
        &["--fsync", "never"],
    );
    let producer = Client::connect(&broker.addr, "producer")
        .await
        .expect("connect");
    producer
        .produce("t", vec![NewMessage::from_value("first")])
        .await
        .expect("produce");
    (broker, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_cut_by_the_write_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (broker, producer) = two_slots_and_a_producer(tmp.path()).await;
    let mut deaf = Raw::connect(&broker.addr);
    deaf.hello();
    deaf.send(
        1,
        Request::Subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            max_in_flight: 10_000,
            ..Default::default()
        }),
    );
    // From here on the subscriber reads nothing; far more is pushed to it
    // than the socket buffers hold.
    let value = vec![b'v'; 16 * 1024];
    for _ in 0..100 {
        let batch = (0..40)
            .map(|_| NewMessage::from_value(value.clone()))
            .collect();
        producer.produce("t", batch).await.expect("produce");
    }
    // Its slot comes back once the write timeout closes it.
    let (newcomer, _) = connect_within(&broker.addr, Duration::from_secs(15)).await;
    assert_eq!(newcomer.ping(1).await.expect("ping"), 1);
    assert_eq!(
        producer.ping(2).await.expect("the producer is unaffected"),
        2
    );
    drop(deaf);
    assert_eq!(tallied_at_stop(broker, "write_timeout_ms").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_refuses_only_the_extra_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_connections_per_ip = 2\n", &[]);
    let a = Client::connect(&broker.addr, "a").await.expect("first");
    let b = Client::connect(&broker.addr, "b").await.expect("second");
    let err = Client::connect(&broker.addr, "c")
        .await
        .expect_err("a third from 127.0.0.1 is refused");
    assert_eq!(err.code(), Some(pb::Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string().contains("max_connections_per_ip is 2"),
        "{err}"
    );
    // Those admitted are served; another address is admitted.
    assert_eq!(a.ping(1).await.expect("ping"), 1);
    assert_eq!(b.ping(2).await.expect("ping"), 2);
    let mut other = Raw::connect_from("127.0.0.2", &broker.addr).await;
    other.hello();
    other.send(3, Request::Ping(pb::PingRequest { nonce: 3 }));
    assert!(
        matches!(other.next(Duration::from_secs(5)), Next::Frame(f) if closing_error(&f).is_none())
    );
    // A connection that ends gives its address's slot back.
    drop(a);
    let (c, _) = connect_within(&broker.addr, Duration::from_secs(5)).await;
    assert_eq!(c.ping(4).await.expect("ping"), 4);
}

/// Why: a refused connection was dropped right after its refusal, with
/// the client's `Hello` (and requests sent behind it, as protocol.md
/// allows) unread, so the kernel reset it and the client got a reset in
/// place of the refusal.
#[test]
fn a_refusal_reaches_a_client_that_sent_requests_behind_its_hello() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_connections_per_ip = 1\n", &[]);
    let mut admitted = Raw::connect(&broker.addr);
    admitted.hello();
    for pause in [0, 100, 300] {
        let mut extra = Raw::connect(&broker.addr);
        extra.send(
            0,
            Request::Hello(pb::Hello {
                protocol_version: 1,
                client_name: "raw".into(),
                token: None,
            }),
        );
        std::thread::sleep(Duration::from_millis(pause));
        extra.send(1, Request::Ping(pb::PingRequest { nonce: 1 }));
        std::thread::sleep(Duration::from_millis(100));
        match extra.next(Duration::from_secs(5)) {
            Next::Frame(f) => {
                let error = closing_error(&f).expect("the refusal");
                assert_eq!(code(error), pb::Code::ResourceExhausted, "{error:?}");
                assert!(error.message.contains("too many connections"), "{error:?}");
            }
            other => panic!("a ping {pause} ms behind the Hello: {other:?}, not the refusal"),
        }
        assert!(matches!(extra.next(Duration::from_secs(5)), Next::Closed));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_the_cli_keep_a_quiet_subscription_open_by_pinging() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "", &["--idle-timeout-ms", "1000"]);
    let producer = Client::connect(&broker.addr, "producer")
        .await
        .expect("connect");
    producer
        .produce("t", vec![NewMessage::from_value("0")])
        .await
        .expect("produce");
    let consumer = Client::connect(&broker.addr, "consumer")
        .await
        .expect("connect");
    assert_eq!(consumer.welcome().idle_timeout_ms, 1000);
    let mut sub = consumer
        .subscribe("t", None, "s", Some(Position::Latest), 10)
        .await
        .expect("subscribe");
    let mut cli = follower(&broker.addr, "t");
    let mut lines = BufReader::new(cli.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().map(|l| l.expect("line")), Some("0".into()));

    // Three idle timeouts of quiet, then a message reaches both.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    producer
        .produce("t", vec![NewMessage::from_value("1")])
        .await
        .expect("the producer was kept open too");
    let received = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery")
        .expect("open")
        .expect("not an error");
    assert_eq!(&received.message.value[..], b"1");
    assert_eq!(lines.next().map(|l| l.expect("line")), Some("1".into()));
    // A long-poll longer than the idle timeout is answered normally.
    let fetched = consumer
        .fetch(
            "t",
            FetchOptions {
                from: Some(Position::Offset(2)),
                wait_ms: 1500,
                ..Default::default()
            },
        )
        .await
        .expect("the long-poll runs to its end");
    assert!(fetched.messages.is_empty());
    let _ = cli.kill();
    let _ = cli.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_as_one_summary_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_connections = 1\n", &[]);
    let admitted = Client::connect(&broker.addr, "admitted")
        .await
        .expect("connect");
    for _ in 0..50 {
        let err = Client::connect(&broker.addr, "extra")
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("too many connections"), "{err}");
    }
    assert_eq!(admitted.ping(1).await.expect("ping"), 1);
    let (_, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    // One line per interval (the test may straddle two), not one each.
    let lines = logs.lines().filter(|l| l.contains("refused")).count();
    assert!((1..=2).contains(&lines), "{logs}");
    assert_eq!(tallied(&logs, "max_connections"), 50, "{logs}");
}

/// Subscribes sent together in one write, more than `max_subscriptions`:
/// exactly the limit start, the rest are refused with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_subscribes_never_pass_max_subscriptions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_subscriptions = 2\n", &[]);
    let addr = broker.addr.clone();
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        raw.send(
            1,
            Request::Produce(pb::ProduceRequest {
                topic: "t".into(),
                messages: vec![pb::NewMessage {
                    value: b"x".to_vec().into(),
                    ..Default::default()
                }],
            }),
        );
        assert!(matches!(raw.next(Duration::from_secs(5)), Next::Frame(_)));
        // From a timestamp: each subscribe looks the offset up off the
        // async workers, so they are all under way at once.
        let mut burst = Vec::new();
        for id in 10..20u64 {
            burst.extend(Raw::bytes(
                id,
                Request::Subscribe(pb::SubscribeRequest {
                    topic: "t".into(),
                    from: Some(pb::Position {
                        kind: Some(pb::position::Kind::TimestampMs(0)),
                    }),
                    ..Default::default()
                }),
            ));
        }
        raw.s.write_all(&burst).expect("write");
        let (mut ok, mut refused) = (0, 0);
        while ok + refused < 10 {
            match raw.next(Duration::from_secs(5)) {
                Next::Frame(f) => match f.kind {
                    Some(pb::server_frame::Kind::Response(pb::Response {
                        result: Some(pb::response::Result::Subscribe(_)),
                        ..
                    })) => ok += 1,
                    Some(pb::server_frame::Kind::Response(pb::Response {
                        result: Some(pb::response::Result::Error(e)),
                        ..
                    })) => {
                        assert_eq!(code(&e), pb::Code::ResourceExhausted, "{e:?}");
                        assert!(e.message.contains("max_subscriptions"), "{e:?}");
                        refused += 1;
                    }
                    _ => {}
                },
                other => panic!("{ok} started, {refused} refused, then {other:?}"),
            }
        }
        (ok, refused)
    })
    .await
    .expect("raw client");
    assert_eq!((ok, refused), (2, 8));
}

/// A subscription its topic's deletion ended gets one last `Delivery`, and
/// none more when the connection then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_subscription_gets_one_last_delivery_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Long enough that the delete comes first on a loaded machine.
    let broker = start(tmp.path(), "idle_timeout_ms = 3000\n", &[]);
    let admin = Client::connect(&broker.addr, "admin")
        .await
        .expect("connect");
    admin
        .produce("t", vec![spool::storage::NewMessage::from_value("x")])
        .await
        .expect("produce");
    let addr = broker.addr.clone();
    let mut raw = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        raw.send(
            1,
            Request::Subscribe(pb::SubscribeRequest {
                topic: "t".into(),
                from: Some(pb::Position {
                    kind: Some(pb::position::Kind::Latest(pb::Empty {})),
                }),
                ..Default::default()
            }),
        );
        assert!(matches!(raw.next(Duration::from_secs(5)), Next::Frame(_)));
        raw
    })
    .await
    .expect("raw client");
    admin.delete_topic("t").await.expect("delete");
    let frames = tokio::task::spawn_blocking(move || raw.until_closed(Duration::from_secs(15)))
        .await
        .expect("raw client");
    let last_deliveries: Vec<&pb::Delivery> = frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(pb::server_frame::Kind::Delivery(d)) if d.error.is_some() => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(last_deliveries.len(), 1, "{frames:?}");
    assert_eq!(
        last_deliveries[0].error.as_ref().map(code),
        Some(pb::Code::NotFound),
        "{frames:?}"
    );
    assert!(
        frames.last().and_then(closing_error).is_some(),
        "the idle timeout closes with a last word: {frames:?}"
    );
}

/// Reads from `s` until the peer closes it; what was read. Panics if it
/// stays open `within`.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!(
                "still open after {within:?} ({e}); read {} bytes",
                all.len()
            ),
        }
    }
}

/// HTTP peers of the socket.io listener cannot keep connection slots by
/// sending nothing: one that stops in the middle of its headers, and one
/// that sends nothing more after its first response, are both closed by
/// `frame_timeout_ms`, and their slots serve others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_peers_that_send_no_headers_are_cut_by_the_frame_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(
        tmp.path(),
        "max_connections = 2\n",
        &["--frame-timeout-ms", "500"],
    );
    let addr = broker.socketio.as_deref().expect("socket.io listener");
    let mut partial = TcpStream::connect(addr).expect("connect");
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: spool\r\n")
        .expect("part of a request");
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: spool\r\n\r\n")
        .expect("a request");

    let answered = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(
        answered.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answered[..answered.len().min(200)])
    );
    read_until_closed(&mut partial, Duration::from_secs(10));
    let (client, _) = connect_within(&broker.addr, Duration::from_secs(5)).await;
    assert_eq!(client.ping(3).await.expect("served"), 3);
}

/// A stop answers every produce it took from a client that keeps
/// pipelining, and its last frame says why, with no reset in between: the
/// broker reads and drops what still comes once its side is shut, so the
/// replies on their way are not thrown away by a reset.
#[test]
fn a_stop_under_pipelined_produces_ends_with_its_reason_not_a_reset() {
    for round in 0..3 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let broker = start(tmp.path(), "", &["--fsync", "never"]);
        let mut raw = Raw::connect(&broker.addr);
        raw.hello();
        let mut writer = raw.s.try_clone().expect("clone");
        let pipelining = std::thread::spawn(move || {
            let mut sent = 0u64;
            loop {
                let produce = pb::ProduceRequest {
                    topic: "t".into(),
                    messages: vec![pb::NewMessage {
                        value: vec![b'v'; 512].into(),
                        ..Default::default()
                    }],
                };
                if writer
                    .write_all(&Raw::bytes(sent + 1, Request::Produce(produce)))
                    .is_err()
                {
                    return sent;
                }
                sent += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let stopping = std::thread::spawn(move || broker.terminate());
        // Every frame up to the end of the stream, read slowly enough that
        // replies are still on their way when the broker closes.
        let mut answered = 0u64;
        let mut last = None;
        raw.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut prefix = [0u8; 5];
        loop {
            match raw.s.read_exact(&mut prefix) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("round {round}: after {answered} replies: {e}"),
            }
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            let mut body = vec![0u8; len];
            if let Err(e) = raw.s.read_exact(&mut body) {
                panic!("round {round}: after {answered} replies: {e}");
            }
            let frame = pb::ServerFrame::decode(&body[..]).expect("decodes");
            if closing_error(&frame).is_some() {
                last = Some(frame);
            } else {
                answered += 1;
            }
            if answered.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let sent = pipelining.join().expect("pipelining");
        let (clean, _) = stopping.join().expect("stop");
        assert!(clean, "round {round}: the stop exits 0");
        let last = last
            .unwrap_or_else(|| panic!("round {round}: no closing frame after {answered} replies"));
        let error = closing_error(&last).expect("closing error");
        assert_eq!(code(error), pb::Code::Unavailable, "{error:?}");
        assert!(
            answered > 0 && answered <= sent,
            "round {round}: {answered} of {sent}"
        );
    }
}

/// An HTTP peer of the socket.io listener that pipelines requests and
/// never reads the responses is closed by `write_timeout_ms` once its
/// socket takes no more bytes, and its slot serves others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_peers_that_do_not_read_are_cut_by_the_write_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(
        tmp.path(),
        "max_connections = 1
write_timeout_ms = 500
",
        &["--frame-timeout-ms", "0"],
    );
    let addr = broker.socketio.clone().expect("socket.io listener");
    let (admitted, in_place) = std::sync::mpsc::channel();
    let deaf = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).expect("connect");
        let request = b"GET / HTTP/1.1\r\nHost: spool\r\n\r\n";
        s.write_all(request).expect("a request");
        let mut first = [0u8; 12];
        s.read_exact(&mut first).expect("its response");
        assert_eq!(&first, b"HTTP/1.1 200");
        admitted.send(()).expect("admitted");
        // Far more responses (the demo page) than the socket buffers hold;
        // the writes end once the broker closes the connection.
        let many = request.repeat(1000);
        for _ in 0..100 {
            if s.write_all(&many).is_err() {
                break;
            }
        }
        s
    });
    in_place.recv().expect("the deaf peer holds the slot");
    let (client, _) = connect_within(&broker.addr, Duration::from_secs(20)).await;
    assert_eq!(client.ping(3).await.expect("served"), 3);
    drop(client);
    drop(deaf.join().expect("the deaf peer"));
    assert_eq!(tallied_at_stop(broker, "write_timeout_ms").await, 1);
}

/// A websocket that stops reading is closed once a write has waited
/// `write_timeout_ms`, counted once, and its slot serves others: the write
/// deadline fails the stream for good, so the websocket library, which
/// only logs a failed write, ends the session too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_does_not_read_is_cut_by_the_write_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (broker, producer) = two_slots_and_a_producer(tmp.path()).await;
    let addr = broker.socketio.clone().expect("socket.io listener");
    let deaf = tokio::task::spawn_blocking(move || common::socketio_reader(&addr, "t"))
        .await
        .expect("the deaf socket");
    // Far more than the socket buffers hold, in text packets.
    let value = vec![b'v'; 64 * 1024];
    for _ in 0..40 {
        let batch = (0..16)
            .map(|_| NewMessage::from_value(value.clone()))
            .collect();
        producer.produce("t", batch).await.expect("produce");
    }
    let (newcomer, _) = connect_within(&broker.addr, Duration::from_secs(15)).await;
    assert_eq!(newcomer.ping(1).await.expect("ping"), 1);
    drop(deaf);
    drop((producer, newcomer));
    assert_eq!(tallied_at_stop(broker, "write_timeout_ms").await, 1);
}

/// A client with the most requests in flight a connection serves (256),
/// all long-polls longer than the idle timeout, that pings as the docs
/// advise is not closed as idle: its pings wait unread behind the cap, but
/// the long-polls end in their time, empty, and the pings are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_at_the_request_cap_with_pings_are_not_idle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "idle_timeout_ms = 500\n", &[]);
    let client = Client::connect(&broker.addr, "poller")
        .await
        .expect("connect");
    client
        .produce("t", vec![NewMessage::from_value("m")])
        .await
        .expect("produce");
    let polls = futures_util::future::join_all((0..256).map(|_| {
        client.fetch(
            "t",
            FetchOptions {
                from: Some(Position::Offset(1)),
                wait_ms: 2000,
                ..Default::default()
            },
        )
    }));
    let pings = async {
        let mut answered = 0;
        for n in 0..15 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.ping(n).await.expect("ping answered");
            answered += 1;
        }
        answered
    };
    let (polled, pinged) = tokio::join!(polls, pings);
    for p in polled {
        assert!(
            p.expect("the long-poll ends in its time")
                .messages
                .is_empty()
        );
    }
    assert_eq!(pinged, 15);
}

/// A subscribe call given up before its reply (a timeout around it) leaves
/// no subscription behind: whether the reply came before or after the call
/// was dropped, the subscription ends and its slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_given_up_before_its_reply_leaves_no_subscription() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "max_subscriptions = 4\n", &[]);
    let client = Client::connect(&broker.addr, "impatient")
        .await
        .expect("connect");
    client
        .produce("jobs", vec![NewMessage::from_value("job")])
        .await
        .expect("produce");
    for _ in 0..20 {
        let _ = tokio::time::timeout(
            Duration::from_micros(1),
            client.subscribe("jobs", None, "m", None, 10),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut held = Vec::new();
        let mut refused = None;
        for _ in 0..4 {
            match client.subscribe("jobs", None, "m", None, 10).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        match refused {
            None => break,
            Some(e) => {
                assert_eq!(e.code(), Some(pb::Code::ResourceExhausted), "{e}");
                assert!(
                    Instant::now() < deadline,
                    "slots still held by given-up subscribes: {e}"
                );
            }
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that pings while the broker itself cannot read (the process
/// stopped, as by SIGSTOP or a stall of the machine, past the idle timeout)
/// is not idle: its pings wait in the socket and are read before the
/// broker decides. Before, the expired idle timer and the waiting frames
/// were ready together and the timer was taken about half the time.
#[test]
fn pings_sent_while_the_broker_was_stopped_keep_the_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start(tmp.path(), "", &["--idle-timeout-ms", "400"]);
    let mut raw = Raw::connect(&broker.addr);
    assert_eq!(raw.hello().idle_timeout_ms, 400);
    let pid = broker.child.id().to_string();
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {name}");
    };
    let mut nonce = 0;
    for round in 0..6 {
        signal("-STOP");
        // Pings every 100 ms for three idle timeouts, unread meanwhile.
        for _ in 0..12 {
            nonce += 1;
            raw.send(nonce, Request::Ping(pb::PingRequest { nonce }));
            std::thread::sleep(Duration::from_millis(100));
        }
        signal("-CONT");
        let mut answered = 0;
        while answered < 12 {
            match raw.next(Duration::from_secs(5)) {
                Next::Frame(f) => {
                    assert!(closing_error(&f).is_none(), "round {round}: closed: {f:?}");
                    answered += 1;
                }
                other => panic!("round {round}: {answered} pings answered, then {other:?}"),
            }
        }
    }
}
