//! `spool bench socketio`: many websocket clients in one room of the
//! socket.io listener, speaking Engine.IO v4 and Socket.IO v5 directly, one
//! publisher at a paced rate. Measures delivery latency (publish due time to
//! receipt, each message carrying its due time) and the broker's resident
//! memory per idle connection. The broker runs as its own process (this
//! binary's `spool serve`), so its memory is its own; `--server` names the
//! socket.io address of a broker started elsewhere (then memory is not
//! measured).

use super::BenchError;
use super::histogram::{Latency, LatencySummary};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message as Ws;

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
        .args(["serve", "--listen", "127.0.0.1:0", "--grpc", "off"])
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

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a websocket Engine.IO session and connects the main namespace.
async fn connect(addr: &str) -> Result<WsStream, BenchError> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| BenchError::Incomplete(format!("websocket to {addr}: {e}")))?;
    // Engine.IO OPEN, then our CONNECT and its reply.
    next_text(&mut ws, |t| t.starts_with('0')).await?;
    ws.send(Ws::text("40"))
        .await
        .map_err(|e| BenchError::Incomplete(format!("sending CONNECT: {e}")))?;
    next_text(&mut ws, |t| t.starts_with("40")).await?;
    Ok(ws)
}

/// Reads until a text message `want` accepts (answering pings).
async fn next_text(ws: &mut WsStream, want: impl Fn(&str) -> bool) -> Result<String, BenchError> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| {
                BenchError::Incomplete("no answer from the socket.io listener in 30 s".into())
            })?;
        match msg {
            Some(Ok(Ws::Text(t))) => {
                if t.as_str() == "2" {
                    let _ = ws.send(Ws::text("3")).await;
                } else if want(t.as_str()) {
                    return Ok(t.to_string());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BenchError::Incomplete(format!("websocket: {e}"))),
            None => {
                return Err(BenchError::Incomplete(
                    "the socket.io listener closed a websocket".into(),
                ));
            }
        }
    }
}

/// Sends a request with ack id `id` and waits for its acknowledgement.
async fn request(
    ws: &mut WsStream,
    id: u64,
    event: &str,
    body: serde_json::Value,
) -> Result<String, BenchError> {
    // Engine.IO MESSAGE (4), then the Socket.IO EVENT (2) with its ack id.
    let packet = format!("42{id}{}", serde_json::json!([event, body]));
    ws.send(Ws::text(packet))
        .await
        .map_err(|e| BenchError::Incomplete(format!("sending {event}: {e}")))?;
    let prefix = format!("43{id}");
    let reply = next_text(ws, |t| t.starts_with(&prefix)).await?;
    if reply.contains("\"error\"") {
        return Err(BenchError::Incomplete(format!("{event}: {reply}")));
    }
    Ok(reply)
}

/// The due time a delivery carries (`"due":N` in its data).
fn due_of(text: &str) -> Option<u64> {
    let at = text.find("\"due\":")? + 6;
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Runs the bench.
pub async fn run(params: &SocketioParams) -> Result<SocketioReport, BenchError> {
    if params.clients == 0 || params.rate == 0 || params.duration_s <= 0.0 {
        return Err(BenchError::Invalid(
            "bench socketio needs --clients, --rate and --duration above 0".into(),
        ));
    }
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
    for i in 0..params.clients {
        let mut ws = connect(&addr).await?;
        request(&mut ws, 1, "subscribe", serde_json::json!({"room": ROOM})).await?;
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        clients.spawn(async move {
            let mut latency = Latency::new();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    msg = ws.next() => match msg {
                        Some(Ok(Ws::Text(t))) => {
                            let t = t.as_str();
                            if t == "2" {
                                let _ = ws.send(Ws::text("3")).await;
                            } else if t.starts_with("42[\"message\"")
                                && let Some(due) = due_of(t)
                            {
                                let now = now_us();
                                latency.record(Duration::from_micros(now.saturating_sub(due)));
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
            latency
        });
        if i % 100 == 99 {
            tracing::info!(clients = i + 1, "connected");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = pid.and_then(rss);

    // Publish, paced: message n is due at start + n / rate.
    let filler = "x".repeat(params.size as usize);
    let total = (params.rate as f64 * params.duration_s).round() as u64;
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
