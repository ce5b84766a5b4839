//! The socket.io gateway through the real binary: its start-up line, and
//! the Node tests in `tests/socketio/` run against it with the stock npm
//! `socket.io-client` (and a headless Chromium for the demo page), since
//! what users rely on is that client, unmodified, against spool.
//!
//! `security.mjs` runs against a broker with TLS and an auth file (the
//! certificates made here with rcgen, the tokens with `spool token
//! create`), and the Rust side then checks the server's log lines and the
//! request metrics of the socket.io listener.
//!
//! The Node tests need `npm ci` in `tests/socketio` (and `chromium` for the
//! browser test). Without `node_modules` they are skipped with a printed
//! reason, unless `SPOOL_REQUIRE_NODE` is set (as `.ci/run` does), which
//! makes a missing setup a failure.

mod common;

use common::{Broker, http_get, metric};
use std::path::{Path, PathBuf};
use std::process::Command;

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Whether the Node tests can run; prints why not, or fails when they must.
fn node_ready(needs: &str) -> bool {
    let modules = node_dir().join("node_modules").join(needs);
    if modules.is_dir() {
        return true;
    }
    assert!(
        std::env::var_os("SPOOL_REQUIRE_NODE").is_none(),
        "SPOOL_REQUIRE_NODE is set but {} is missing: run `npm ci` in tests/socketio",
        modules.display()
    );
    eprintln!(
        "skipped: {} is missing (run `npm ci` in tests/socketio; set SPOOL_REQUIRE_NODE=1 to make this a failure)",
        modules.display()
    );
    false
}

/// Runs `node FILE` in `tests/socketio` against `broker`; fails with its
/// output unless it exits 0.
fn node(file: &str, broker: &Broker, env: &[(&str, String)]) {
    let mut env = env.to_vec();
    env.push(("SPOOL_SERVER", broker.addr.clone()));
    env.push((
        "SPOOL_SOCKETIO",
        broker.socketio.clone().expect("a socket.io listener"),
    ));
    node_with(file, &broker.data, &env);
}

/// Runs `node FILE` with `data` as SPOOL_DATA and `env`, for tests that
/// start brokers themselves.
fn node_with(file: &str, data: &Path, env: &[(&str, String)]) {
    let mut cmd = Command::new("node");
    cmd.arg(file)
        .current_dir(node_dir())
        .env("SPOOL_BIN", env!("CARGO_BIN_EXE_spool"))
        .env("SPOOL_DATA", data);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "node {file} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

fn broker(tmp: &tempfile::TempDir, extra: &[&str]) -> Broker {
    Broker::start(&tmp.path().join("data"), extra)
}

#[test]
fn publish_subscribe_replay_presence_and_room_events() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &["--fsync", "always"]);
    node("pubsub.mjs", &b, &[]);
}

#[test]
fn start_up_lines_name_the_socketio_listener_and_off_turns_it_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let b = Broker::start(&data, &[]);
    let addr = b
        .socketio
        .clone()
        .expect("a third line names the socket.io listener");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    // The demo page is served there.
    let page = http_get(&addr, "/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("/client/socket.io.min.js"), "{page}");
    drop(b);

    let v = json_start(&data, &["--socketio", "127.0.0.1:0"]);
    let addr = v["listeners"]["socketio"].as_str().unwrap_or_default();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{v}"
    );

    // Off, by flag or in the config file.
    let v = json_start(&data, &["--socketio", "off"]);
    assert!(v["listeners"].get("socketio").is_none(), "{v}");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "socketio = \"off\"\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let v = json_start(&data, &["--config", &config]);
    assert!(v["listeners"].get("socketio").is_none(), "{v}");
    std::fs::write(&config, "socketio = \"127.0.0.1:0\"\n").expect("config");
    let v = json_start(&data, &["--config", &config]);
    assert!(v["listeners"]["socketio"].is_string(), "{v}");
}

/// Starts `spool serve --format json` with `extra`; its start-up object.
fn json_start(data: &Path, extra: &[&str]) -> serde_json::Value {
    let child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--grpc", "off"])
        .args(["--metrics", "off", "--format", "json", "--data"])
        .arg(data)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut killed = common::Killed(child);
    let line = first_line(killed.0.stdout.as_mut());
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn first_line(stdout: Option<&mut std::process::ChildStdout>) -> String {
    use std::io::Read;
    let stdout = stdout.expect("stdout piped");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn queue_mode_acks_redelivery_and_dead_letters() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    node("queue.mjs", &b, &[]);
}

#[test]
fn binary_data_round_trips() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    node("binary.mjs", &b, &[]);
}

#[test]
fn bad_input_gets_an_error_and_touches_no_other_socket() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    node("errors.mjs", &b, &[]);
}

#[test]
fn recovery_after_transport_close_long_disconnection_and_retention() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    node("recovery.mjs", &b, &[]);
}

#[test]
fn recovery_after_kill_9_and_restart() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    node_with("restart.mjs", &tmp.path().join("data"), &[]);
}

#[test]
fn demo_page_in_a_browser_recovers_across_a_broker_kill_9() {
    if !node_ready("puppeteer-core") {
        return;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        assert!(
            std::env::var_os("SPOOL_REQUIRE_NODE").is_none(),
            "SPOOL_REQUIRE_NODE is set but {chromium} is missing: install Debian's chromium"
        );
        eprintln!("skipped: {chromium} is missing (apt-get install chromium, or set CHROMIUM)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    node_with(
        "browser.mjs",
        &tmp.path().join("data"),
        &[("CHROMIUM", chromium)],
    );
}

#[test]
fn tls_tokens_permissions_reloads_and_metrics() {
    if !node_ready("socket.io-client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::make_pki(tmp.path(), "sio");
    let (writer, writer_entry) =
        common::pki::token_create("writer", &["--produce", "orders*", "--consume", "orders"]);
    let (reader, reader_entry) = common::pki::token_create("reader", &["--consume", "news*"]);
    let (temp, temp_entry) = common::pki::token_create("temp", &["--consume", "*"]);
    let (root, root_entry) = common::pki::token_create(
        "root",
        &["--admin", "*", "--produce", "*", "--consume", "*"],
    );
    let auth = tmp.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!("{writer_entry}\n{reader_entry}\n{temp_entry}\n{root_entry}"),
    )
    .expect("write auth file");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let secure = Broker::start(
        &tmp.path().join("secure"),
        &[
            "--auth",
            &path(&auth),
            "--tls-cert",
            &path(&pki.cert),
            "--tls-key",
            &path(&pki.key),
        ],
    );
    let plain = broker(&tmp, &[]);
    node(
        "security.mjs",
        &secure,
        &[
            ("SPOOL_TLS_CA", path(&pki.ca)),
            ("SPOOL_AUTH_FILE", path(&auth)),
            ("SPOOL_BROKER_PID", secure.child.id().to_string()),
            (
                "SPOOL_SOCKETIO_PLAIN",
                plain.socketio.clone().expect("socket.io"),
            ),
            ("TOKEN_WRITER", writer),
            ("TOKEN_READER", reader),
            ("TOKEN_TEMP", temp),
            ("TOKEN_ROOT", root),
        ],
    );

    // Every event was counted, with the native operation names and codes.
    let metrics = http_get(
        &secure.metrics.clone().expect("metrics listener"),
        "/metrics",
    );
    for series in [
        r#"spool_requests_total{listener="socketio",operation="produce",code="OK"}"#,
        r#"spool_requests_total{listener="socketio",operation="produce",code="PERMISSION_DENIED"}"#,
        r#"spool_requests_total{listener="socketio",operation="subscribe",code="OK"}"#,
        r#"spool_requests_total{listener="socketio",operation="subscribe",code="PERMISSION_DENIED"}"#,
        r#"spool_requests_total{listener="socketio",operation="unsubscribe",code="UNAUTHENTICATED"}"#,
        r#"spool_requests_total{listener="socketio",operation="ack",code="OK"}"#,
        r#"spool_request_duration_seconds_count{listener="socketio",operation="produce"}"#,
    ] {
        let line = metrics.lines().find(|l| l.starts_with(series));
        let count: f64 = line
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "{series} in:\n{metrics}");
    }

    // One log line each for a client of the wrong kind.
    for (b, line) in [
        (secure, "plaintext client connected to this TLS listener"),
        (plain, "TLS client connected to this plaintext listener"),
    ] {
        let (stopped, logs) = b.terminate();
        assert!(stopped, "{logs}");
        let lines: Vec<_> = logs
            .lines()
            .filter(|l| l.contains(line) && l.contains("\"socketio\""))
            .collect();
        assert_eq!(lines.len(), 1, "{line}: {logs}");
    }
}

/// One HTTP/1.1 request on a connection of its own; the response, read
/// until the server closes or `wait` passes (`None`: nothing came).
fn http_once(addr: &str, request: &str, wait: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Why: when Engine.IO closed a polling session itself (a request over
/// its size limit, a packet that does not parse), the long-poll waiting
/// then was never answered, and its connection held a descriptor and a
/// connection slot for as long as the client kept it.
#[test]
fn a_long_poll_is_answered_when_the_engine_closes_its_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    let addr = b.socketio.clone().expect("socket.io listener");
    let path = "/socket.io/?EIO=4&transport=polling";
    for bad in ["9garbage", "oversized"] {
        let open = http_get(&addr, path);
        let sid = open
            .split("\"sid\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("a session: {open}"))
            .to_owned();
        let poll =
            format!("GET {path}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        // The first poll takes the heartbeat's first ping; the next waits.
        let first = http_once(&addr, &poll, std::time::Duration::from_secs(10)).unwrap_or_default();
        assert!(first.ends_with("\r\n\r\n2"), "{bad}: a ping: {first:?}");
        let (poll_addr, wait) = (addr.clone(), std::time::Duration::from_secs(10));
        let waiting = std::thread::spawn(move || http_once(&poll_addr, &poll, wait));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let body = match bad {
            "oversized" => "4".repeat(3 << 20),
            other => other.to_owned(),
        };
        let post = format!(
            "POST {path}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let refused =
            http_once(&addr, &post, std::time::Duration::from_secs(10)).unwrap_or_default();
        assert!(
            refused.starts_with("HTTP/1.1 4"),
            "{bad}: the post is refused: {}",
            refused.lines().next().unwrap_or_default()
        );
        let answered = waiting.join().expect("poll thread");
        let answer =
            answered.unwrap_or_else(|| panic!("{bad}: the waiting long-poll was answered"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{bad}: {answer}");
        assert!(
            answer.ends_with("\r\n\r\n1"),
            "{bad}: a close packet ends it: {answer:?}"
        );
    }
}

/// The text of the next websocket frame the server sends on `s`.
fn next_frame(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("a frame header");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            s.read_exact(&mut n).expect("length");
            u64::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            s.read_exact(&mut n).expect("length");
            u64::from_be_bytes(n)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).expect("payload");
    String::from_utf8_lossy(&payload).into_owned()
}

/// A stored message larger than the broker's frames now carry (stored
/// under a larger `max_frame_bytes`): a room's reader gets an `error`
/// naming its offset and goes on with the messages after it, as a
/// subscription does, instead of stopping its pushes there for good.
#[test]
fn a_room_goes_past_a_message_no_frame_can_carry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &[]);
    let big = "b".repeat(200 * 1024);
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["produce", "t", "--server", &broker.addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(format!("before\n{big}\nafter\n").as_bytes())?;
            drop(stdin);
            child.wait()
        })
        .expect("produce");
    assert!(out.success());
    let (ok, log) = broker.terminate();
    assert!(ok, "clean stop: {log}");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_frame_bytes = 65536\n").expect("config");
    let broker = Broker::start(&data, &["--config", config.to_str().expect("utf-8 path")]);
    let addr = broker.socketio.clone().expect("a socket.io listener");
    let mut s = common::socketio_reader(&addr, "t");
    let (mut skipped, mut after) = (false, false);
    while !after {
        let text = next_frame(&mut s);
        if text.starts_with("42[\"error\"") && text.contains("offset 1") {
            skipped = true;
        }
        if text.contains("\"after\"") {
            after = true;
        }
    }
    assert!(skipped, "an error named the message passed by");
}

/// A `sid` that is no session id at all is answered as any unknown one is
/// (Engine.IO: 400 "Session ID unknown"), not with a new session.
#[test]
fn a_malformed_session_id_is_unknown_not_a_new_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    let addr = b.socketio.clone().expect("a socket.io listener");
    for sid in [
        "nope",
        "",
        "AAAAAAAAAAAAAAAAA",
        "AAAAAAAA%20AAAAAA",
        "AAAAAAAAAAAAAAHs",
    ] {
        let answer = http_get(
            &addr,
            &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        );
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("Session ID unknown"),
            "sid {sid:?}: {answer}"
        );
    }
    let open = http_get(&addr, "/socket.io/?EIO=4&transport=polling");
    assert!(
        open.starts_with("HTTP/1.1 200") && open.contains("\"sid\""),
        "{open}"
    );
}

/// Why: a refused CONNECT left its Engine.IO session open for a second in
/// which every further CONNECT was checked (thousands of token guesses
/// per socket, none logged) and a valid one was taken; and a session that
/// never sent a CONNECT held its connection slot as long as it answered
/// pings. A refused CONNECT now ends the session (one guess each, logged
/// with the peer's address); a session without a CONNECT closes after
/// `frame_timeout_ms`, as a native connection without its `Hello` does.
#[test]
fn a_refused_connect_ends_its_session_and_one_never_sent_closes_it() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (secret, entry) = common::pki::token_create("root", &["--produce", "*"]);
    let auth = tmp.path().join("auth.toml");
    std::fs::write(&auth, entry).expect("write auth file");
    let auth = auth.to_str().expect("utf-8 path").to_owned();
    let b = broker(&tmp, &["--auth", &auth, "--frame-timeout-ms", "1500"]);
    let addr = b.socketio.clone().expect("socket.io listener");
    let path = "/socket.io/?EIO=4&transport=polling";
    let open = || {
        let open = http_get(&addr, path);
        open.split("\"sid\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("a session: {open}"))
            .to_owned()
    };
    let poll = |sid: &str| {
        let get =
            format!("GET {path}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        http_once(&addr, &get, Duration::from_secs(10)).unwrap_or_default()
    };

    // A wrong token, then the right one, in one request.
    let sid = open();
    let body = format!(
        "40{{\"token\":\"spool_wrong\"}}\u{1e}40{{\"token\":\"{secret}\"}}\u{1e}42[\"rooms\"]"
    );
    let post = format!(
        "POST {path}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let posted = http_once(&addr, &post, Duration::from_secs(10)).unwrap_or_default();
    assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
    let mut answers = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = poll(&sid);
        answers.push_str(&answer);
        if !answer.starts_with("HTTP/1.1 200") || answer.ends_with("\r\n\r\n1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{answers}");
    }
    assert!(
        answers.contains("44{") && answers.contains("UNAUTHENTICATED"),
        "{answers}"
    );
    assert!(
        !answers.contains("40{"),
        "the second CONNECT was not taken: {answers}"
    );
    assert!(
        poll(&sid).contains("Session ID unknown"),
        "the session is closed"
    );
    let log = b.log_so_far();
    let refused: Vec<_> = log
        .lines()
        .filter(|l| l.contains("socket.io socket refused: not authenticated"))
        .collect();
    assert_eq!(refused.len(), 1, "one line for one guess: {log}");
    assert!(refused[0].contains("peer=127.0.0.1:"), "{log}");

    // A session that sends no CONNECT: closed once frame_timeout_ms passed.
    let sid = open();
    std::thread::sleep(Duration::from_millis(2500));
    let answer = poll(&sid);
    assert!(
        answer.contains("Session ID unknown") || answer.ends_with("\r\n\r\n1"),
        "{answer}"
    );
}

/// Why: a packet refused before it was handled (one that does not parse,
/// an event before CONNECT) reached the client as an error but no request
/// series, where an event of no known name counts as `unknown`: the
/// listener's request metrics hid malformed traffic. Each now counts as
/// an `unknown` request answered `INVALID_ARGUMENT`.
#[test]
fn a_refused_packet_counts_as_an_unknown_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp, &[]);
    let addr = b.socketio.clone().expect("a socket.io listener");
    let metrics = b.metrics.clone().expect("a metrics listener");
    let series =
        r#"spool_requests_total{listener="socketio",operation="unknown",code="INVALID_ARGUMENT"}"#;
    let mut s = common::socketio_websocket(&addr);
    // Before CONNECT; then connected: one that does not parse, one with
    // an acknowledgement id that does not parse, and an unknown event.
    for text in [
        "42[\"dance\"]",
        "40",
        "42[\"publish\",",
        "427[\"publish\",{",
        "42[\"dance\"]",
    ] {
        common::socketio_send(&mut s, text);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(&metrics, series) < 4.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        metric(&metrics, series),
        4.0,
        "every refused packet counted once"
    );
}
