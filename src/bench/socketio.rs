//! `spool bench socketio`: many websocket clients in one room of the
//! socket.io listener, speaking Engine.IO v4 and Socket.IO v5 directly, one
//! publisher at a paced rate. Measures delivery latency (publish due time to
//! receipt, each message carrying its due time) and the broker's resident
//! memory per idle connection. The broker runs as its own process (this
//! binary's `spool serve`), so its memory is its own; `--server` names the
//! socket.io address of a broker started elsewhere (then memory is not
//! measured).

use super::histogram::{Latency, LatencySummary};
use super::{BenchError, Progress};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SocketioParams {
    /// Websocket clients in the room.
    pub clients: u32,
    /// Messages published per second.
    pub rate: u64,
    /// Seconds of publishing.
    pub duration_s: f64,
    /// Bytes of filler in each message's data.
    pub size: u32,
    /// fsync policy of the room.
    pub fsync: String,
    /// socket.io address of a broker to load; `None`: start one.
    pub server: Option<String>,
    /// Where the started broker's temporary data directory is made.
    #[serde(skip)]
    pub data: Option<PathBuf>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SocketioReport {
    /// The settings.
    pub params: SocketioParams,
    /// Messages published.
    pub published: u64,
    /// Deliveries received by all clients together.
    pub deliveries: u64,
    /// Deliveries expected (published × clients).
    pub expected: u64,
    /// Deliveries per second over the publishing time.
    pub deliveries_per_s: f64,
    /// Delivery latency, from a message's due time to its receipt.
    pub latency: LatencySummary,
    /// Broker RSS with no client, bytes (started broker only).
    pub rss_before_bytes: Option<u64>,
    /// Broker RSS with every client connected and subscribed, idle.
    pub rss_idle_bytes: Option<u64>,
    /// (idle − before) / clients.
    pub bytes_per_idle_connection: Option<f64>,
    /// Broker RSS at the end of the publishing.
    pub rss_loaded_bytes: Option<u64>,
}

/// The room the bench uses.
const ROOM: &str = "bench-socketio";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A broker process this bench started.
struct Started {
    child: Child,
    socketio: String,
    _dir: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(params: &SocketioParams) -> Result<Started, BenchError> {
    let parent = params.data.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("spool-bench-socketio-")
        .tempdir_in(&parent)
        .map_err(BenchError::io(format!(
            "creating a scratch directory in {}",
            parent.display()
        )))?;
    let exe = std::env::current_exe().map_err(BenchError::io("finding the spool binary"))?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "off",
            "--metrics",
            "off",
        ])
        .args([
            "--socketio",
            "127.0.0.1:0",
            "--fsync",
            &params.fsync,
            "--data",
        ])
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(BenchError::io("starting spool serve"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Incomplete("spool serve has no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut socketio = None;
    for _ in 0..3 {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.strip_prefix("spool socketio listening on ") {
                    socketio = Some(a.to_owned());
                    break;
                }
            }
            _ => break,
        }
    }
    let Some(socketio) = socketio else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(BenchError::Incomplete(
            "spool serve did not print its socket.io listener".into(),
        ));
    };
    Ok(Started {
        child,
        socketio,
        _dir: dir,
    })
}

/// `VmRSS` of process `pid`, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A websocket client of the bench: the handshake, masked text frames
/// out, and frames in parsed in place from one read buffer (the server's
/// frames are unmasked and never fragmented), so a delivery costs a read
/// and a scan for its due time, with no allocation or UTF-8 check.
struct RawWs {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// Initial read buffer of a bench client.
const CLIENT_BUFFER: usize = 16 << 10;

/// A frame's opcode and where its payload is in the read buffer.
struct Frame {
    opcode: u8,
    payload: std::ops::Range<usize>,
}

const OP_TEXT: u8 = 1;
const OP_CLOSE: u8 = 8;

impl RawWs {
    /// Opens a websocket to the Engine.IO path of `addr`.
    async fn open(addr: &str) -> Result<RawWs, BenchError> {
        use tokio::io::AsyncWriteExt as _;
        let fail = |e: std::io::Error| BenchError::Incomplete(format!("websocket to {addr}: {e}"));
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(fail)?;
        let _ = stream.set_nodelay(true);
        let mut ws = RawWs {
            stream,
            buf: vec![0; CLIENT_BUFFER],
            start: 0,
            end: 0,
        };
        let request = format!(
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {addr}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.stream
            .write_all(request.as_bytes())
            .await
            .map_err(fail)?;
        let head_end = loop {
            if let Some(at) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if ws.fill().await.map_err(fail)? == 0 {
                return Err(BenchError::Incomplete(format!(
                    "websocket to {addr}: closed during the handshake"
                )));
            }
        };
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&ws.buf[..head_end]).into_owned();
            return Err(BenchError::Incomplete(format!(
                "websocket to {addr} refused: {head}"
            )));
        }
        ws.start = head_end;
        Ok(ws)
    }

    /// Reads more bytes (compacting or growing the buffer first if full);
    /// 0 at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt as _;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next complete frame in the buffer, if any (consumed).
    fn frame(&mut self) -> Option<Frame> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return None,
            n => (u64::from(n), 2),
        };
        let len = usize::try_from(len).ok()?;
        if b.len() - head < len {
            return None;
        }
        let payload = self.start + head..self.start + head + len;
        self.start = payload.end;
        Some(Frame { opcode, payload })
    }

    /// The next frame, reading as needed; `None` once the stream ends.
    async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(f) = self.frame() {
                return Ok(Some(f));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Sends `text` as one masked text frame (a zero mask: the payload
    /// goes out as it is).
    async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let mut frame = Vec::with_capacity(text.len() + 14);
        frame.push(0x80 | OP_TEXT);
        match text.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(text.as_bytes());
        self.stream.write_all(&frame).await
    }
}

/// Opens a websocket Engine.IO session and connects the main namespace.
async fn connect(addr: &str) -> Result<RawWs, BenchError> {
    let mut ws = RawWs::open(addr).await?;
    // Engine.IO OPEN, then our CONNECT and its reply.
    next_text(&mut ws, |t| t.starts_with('0')).await?;
    ws.send_text("40")
        .await
        .map_err(|e| BenchError::Incomplete(format!("sending CONNECT: {e}")))?;
    next_text(&mut ws, |t| t.starts_with("40")).await?;
    Ok(ws)
}

/// Reads until a text message `want` accepts (answering pings).
async fn next_text(ws: &mut RawWs, want: impl Fn(&str) -> bool) -> Result<String, BenchError> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next_frame())
            .await
            .map_err(|_| {
                BenchError::Incomplete("no answer from the socket.io listener in 30 s".into())
            })?
            .map_err(|e| BenchError::Incomplete(format!("websocket: {e}")))?;
        let Some(frame) = frame else {
            return Err(BenchError::Incomplete(
                "the socket.io listener closed a websocket".into(),
            ));
        };
        match frame.opcode {
            OP_TEXT => {
                let t = String::from_utf8_lossy(&ws.buf[frame.payload]).into_owned();
                if t == "2" {
                    let _ = ws.send_text("3").await;
                } else if want(&t) {
                    return Ok(t);
                }
            }
            OP_CLOSE => {
                return Err(BenchError::Incomplete(
                    "the socket.io listener closed a websocket".into(),
                ));
            }
            _ => {}
        }
    }
}

/// Sends a request with ack id `id` and waits for its acknowledgement.
async fn request(
    ws: &mut RawWs,
    id: u64,
    event: &str,
    body: serde_json::Value,
) -> Result<String, BenchError> {
    // Engine.IO MESSAGE (4), then the Socket.IO EVENT (2) with its ack id.
    let packet = format!("42{id}{}", serde_json::json!([event, body]));
    ws.send_text(&packet)
        .await
        .map_err(|e| BenchError::Incomplete(format!("sending {event}: {e}")))?;
    let prefix = format!("43{id}");
    let reply = next_text(ws, |t| t.starts_with(&prefix)).await?;
    if reply.contains("\"error\"") {
        return Err(BenchError::Incomplete(format!("{event}: {reply}")));
    }
    Ok(reply)
}

/// The due time a delivery carries (`"due":N` in its data, which comes
/// first in the packet).
fn due_of(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"due\":";
    let head = &text[..text.len().min(64)];
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let mut due: u64 = 0;
    let mut digits = 0;
    for &c in &text[at..] {
        if !c.is_ascii_digit() {
            break;
        }
        due = due.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(due)
}

/// One subscribed client: reads until `stop`, recording each delivery's
/// latency (one clock read per buffer read: its frames arrived together).
async fn read_deliveries(
    mut ws: RawWs,
    received: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
) -> Latency {
    let mut latency = Latency::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let n = tokio::select! {
            _ = &mut stopped => break,
            n = ws.fill() => n,
        };
        if !matches!(n, Ok(n) if n > 0) {
            break;
        }
        let now = now_us();
        let mut count = 0;
        let mut ping = false;
        while let Some(frame) = ws.frame() {
            let payload = &ws.buf[frame.payload];
            match frame.opcode {
                OP_TEXT if payload == b"2" => ping = true,
                OP_TEXT if payload.starts_with(b"42[\"message\"") => {
                    if let Some(due) = due_of(payload) {
                        latency.record(Duration::from_micros(now.saturating_sub(due)));
                        count += 1;
                    }
                }
                OP_CLOSE => return latency,
                _ => {}
            }
        }
        if count > 0 {
            received.fetch_add(count, Ordering::Relaxed);
        }
        if ping && ws.send_text("3").await.is_err() {
            break;
        }
    }
    latency
}

impl SocketioParams {
    /// Whether the settings can run, else what is wrong (in the flags' words).
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        if self.rate == 0 {
            return Err("--rate must be at least 1".into());
        }
        let d = self.duration_s;
        super::check_duration(d)?;
        if (self.rate as f64 * d).round() < 1.0 {
            return Err(format!(
                "--rate {} for --duration {d} publishes no message",
                self.rate
            ));
        }
        Ok(())
    }
}

/// Runs the bench; `progress` counts the clients connecting, then the
/// messages published.
pub async fn run(
    params: &SocketioParams,
    progress: &Progress,
) -> Result<SocketioReport, BenchError> {
    params.validate().map_err(BenchError::Invalid)?;
    let started = match &params.server {
        Some(_) => None,
        None => Some(start_broker(params)?),
    };
    let addr = params
        .server
        .clone()
        .or_else(|| started.as_ref().map(|s| s.socketio.clone()))
        .unwrap_or_default();
    let pid = started.as_ref().map(|s| s.child.id());
    let mut publisher = connect(&addr).await?;
    // Creates the room.
    request(
        &mut publisher,
        1,
        "publish",
        serde_json::json!({"room": ROOM, "data": {"due": 0}}),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = pid.and_then(rss);

    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut clients = tokio::task::JoinSet::new();
    progress.start("connect", u64::from(params.clients));
    for i in 0..params.clients {
        let mut ws = connect(&addr).await?;
        request(&mut ws, 1, "subscribe", serde_json::json!({"room": ROOM})).await?;
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        clients.spawn(read_deliveries(ws, received, stop));
        progress.add(1);
        if i % 100 == 99 {
            tracing::info!(clients = i + 1, "connected");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = pid.and_then(rss);

    // Publish, paced: message n is due at start + n / rate.
    let filler = "x".repeat(params.size as usize);
    let total = (params.rate as f64 * params.duration_s).round() as u64;
    progress.start("publish", total);
    let started_at = Instant::now();
    for (id, n) in (2..).zip(0..total) {
        let due_at = started_at + Duration::from_secs_f64(n as f64 / params.rate as f64);
        tokio::time::sleep_until(due_at.into()).await;
        let lag = Instant::now().saturating_duration_since(due_at);
        let due = now_us().saturating_sub(lag.as_micros() as u64);
        request(
            &mut publisher,
            id,
            "publish",
            serde_json::json!({"room": ROOM, "data": {"due": due, "fill": filler}}),
        )
        .await?;
        progress.add(1);
    }
    let expected = total * u64::from(params.clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started_at.elapsed();
    let rss_loaded = pid.and_then(rss);
    stop.notify_waiters();
    let mut latency = Latency::new();
    while let Some(l) = clients.join_next().await {
        if let Ok(l) = l {
            latency.merge(&l);
        }
    }
    let deliveries = received.load(Ordering::Relaxed);
    drop(started);
    if deliveries < expected {
        return Err(BenchError::Incomplete(format!(
            "{deliveries} of {expected} deliveries ({total} messages to {} clients) arrived \
             within 10 s of the last publish",
            params.clients
        )));
    }
    Ok(SocketioReport {
        params: params.clone(),
        published: total,
        deliveries,
        expected,
        deliveries_per_s: deliveries as f64 / elapsed.as_secs_f64(),
        latency: latency.summary(),
        rss_before_bytes: rss_before,
        rss_idle_bytes: rss_idle,
        bytes_per_idle_connection: match (rss_before, rss_idle) {
            (Some(b), Some(i)) => Some(i.saturating_sub(b) as f64 / f64::from(params.clients)),
            _ => None,
        },
        rss_loaded_bytes: rss_loaded,
    })
}
