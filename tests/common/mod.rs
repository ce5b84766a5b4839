//! Starting the real `spool` binary on 127.0.0.1:0 with a temp data dir
//! (its gRPC, metrics and socket.io listeners on ports of their own, unless
//! the test says `--grpc`, `--metrics` or `--socketio`).
#![allow(dead_code)]

pub mod pki;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running broker process.
pub struct Broker {
    pub child: Child,
    pub addr: String,
    /// The gRPC listener's address (`None` with `--grpc off`).
    pub grpc: Option<String>,
    /// The metrics listener's address (`None` with `--metrics off`).
    pub metrics: Option<String>,
    /// The socket.io listener's address (`None` with `--socketio off`).
    pub socketio: Option<String>,
    pub data: PathBuf,
    stderr: Option<std::thread::JoinHandle<()>>,
    /// Its stderr so far, line by line, for tests that wait for a log line
    /// while it runs.
    log: Arc<Mutex<String>>,
}

impl Broker {
    /// Starts `spool serve` on `data` with extra flags; waits for its
    /// start-up lines.
    pub fn start(data: &Path, extra: &[&str]) -> Broker {
        Broker::start_with(Command::new(env!("CARGO_BIN_EXE_spool")), data, extra)
    }

    /// Like [`Broker::start`], with `spool` run by `program` (for instance the
    /// binary behind a wrapper that enters a namespace first); the `serve`
    /// arguments are appended to it.
    pub fn start_with(mut program: Command, data: &Path, extra: &[&str]) -> Broker {
        program
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra);
        // A gRPC listener on a free port, so brokers of parallel tests never
        // collide on the default one.
        if !extra.contains(&"--grpc") {
            program.args(["--grpc", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--metrics") {
            program.args(["--metrics", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--socketio") {
            program.args(["--socketio", "127.0.0.1:0"]);
        }
        let mut child = program
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spool serve");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("a first line");
        let first = first.trim_end().to_owned();
        // The start-up lines come in one write: whatever follows the first
        // is already buffered.
        let rest = String::from_utf8_lossy(reader.buffer()).into_owned();
        let grpc = rest
            .lines()
            .find_map(|l| l.strip_prefix("spool grpc listening on "))
            .map(str::to_owned);
        let metrics = rest
            .lines()
            .find_map(|l| l.strip_prefix("spool metrics listening on "))
            .map(str::to_owned);
        let socketio = rest
            .lines()
            .find_map(|l| l.strip_prefix("spool socketio listening on "))
            .map(str::to_owned);
        let addr = first
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .map(|w| w.trim_end_matches(','))
            .unwrap_or_else(|| panic!("first line names the address: {first}"))
            .to_owned();
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let shared = Arc::clone(&log);
        let stderr = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
        Broker {
            child,
            addr,
            grpc,
            metrics,
            socketio,
            data: data.to_owned(),
            stderr: Some(stderr),
            log,
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs()
    }

    /// SIGTERM, then wait for the exit; returns (success, logs).
    pub fn terminate(self) -> (bool, String) {
        self.signal("TERM");
        let (status, logs) = self.exit_within(Duration::from_secs(20));
        (status.is_some_and(|s| s.success()), logs)
    }

    /// Sends signal `name` (`TERM`, `INT`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args([format!("-{name}").as_str(), &pid])
            .status();
    }

    /// Waits up to `wait` for the process to exit (then kills it); returns
    /// its exit status, if it exited by itself, and the logs.
    pub fn exit_within(mut self, wait: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = Instant::now() + wait;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.logs())
    }

    /// How many times `needle` occurs in what the broker has logged so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .matches(needle)
            .count()
    }

    /// What the broker has logged so far (it goes on running).
    pub fn log_so_far(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn logs(&mut self) -> String {
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message of `topic`, by replay from offset 0 through `client`.
pub async fn replay_all(
    client: &spool::client::Client,
    topic: &str,
) -> Vec<spool::client::Received> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let fetched = client
            .fetch(
                topic,
                spool::client::FetchOptions {
                    from: Some(spool::broker::Position::Offset(from)),
                    max_messages: 1000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        if fetched.messages.is_empty() {
            return out;
        }
        from = fetched.next_offset;
        out.extend(fetched.messages);
    }
}

/// Offsets leased by one queue-group fetch of up to `max` messages of
/// `topic` for `group` (member "m").
pub async fn queue_fetch(
    client: &spool::client::Client,
    topic: &str,
    group: &str,
    max: u32,
) -> Vec<u64> {
    let fetched = client
        .fetch(
            topic,
            spool::client::FetchOptions {
                group: Some(group.into()),
                member: "m".into(),
                max_messages: max,
                ..Default::default()
            },
        )
        .await
        .expect("queue fetch");
    fetched
        .messages
        .iter()
        .map(|m| m.message.offset.0)
        .collect()
}

/// `spool serve --listen 127.0.0.1:0 --data DATA` with `args`, for tests of
/// its flags and start-up output; returns it (killed on drop) and
/// everything its first read of stdout got (the start-up lines come in one
/// write).
pub fn serve_with(data: &Path, args: &[&str]) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spool serve");
    let stdout = child.stdout.take().expect("stdout piped");
    let killed = Killed(child);
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first).expect("a first line");
    let rest = String::from_utf8_lossy(reader.buffer()).into_owned();
    (killed, first + &rest)
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A websocket that spoke Engine.IO and socket.io up to a subscribe of
/// `room` from its start, then never reads again.
pub fn socketio_reader(addr: &str, room: &str) -> TcpStream {
    let mut s = socketio_websocket(addr);
    let subscribe = format!(r#"421["subscribe",{{"room":"{room}","from":"earliest"}}]"#);
    for text in ["40", subscribe.as_str()] {
        socketio_send(&mut s, text);
    }
    s
}

/// A websocket to the socket.io listener at `addr`, past Engine.IO's open
/// packet (socket.io's CONNECT not sent yet).
pub fn socketio_websocket(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let request = format!(
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).expect("upgrade");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The 101 response and Engine.IO's open packet.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("pingInterval") {
        let n = s.read(&mut buf).expect("open packet");
        assert!(n > 0, "closed during the handshake");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// Sends `text` (one Engine.IO/socket.io packet) as a client's websocket
/// text frame.
pub fn socketio_send(s: &mut TcpStream, text: &str) {
    // A client frame: FIN + text, masked with a zero key.
    let mut frame = vec![0x81u8];
    let len = text.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    s.write_all(&frame).expect("socket.io packet");
}

/// The answer to a plain HTTP/1.1 GET of `path` from `addr` (status line,
/// headers and body, as read until the server closes).
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write the request");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// The value of the metric series `series` (the whole text before its
/// value) on the metrics listener at `addr`; 0 when absent.
pub fn metric(addr: &str, series: &str) -> f64 {
    http_get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
