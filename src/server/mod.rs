//! The broker server: accepts TCP connections, speaks the framed protocol,
//! and shuts down gracefully (stop accepting, end subscriptions and
//! long-polls, finish in-flight requests, sync, release the lock) within a
//! bounded time.
//!
//! - `connection`: one connection, from handshake to close, and its requests.
//! - `admission`: connection slots (`max_connections`, `max_connections_per_ip`)
//!   and the summary log of connections refused or closed by a limit, for
//!   native and gRPC connections alike.
//! - `deadline`: the frame and write deadlines on a connection's socket.
//! - `outgoing`: a connection's send queue, bounded in bytes.
//! - `handlers`: one module per request group, converting protobuf to
//!   [`crate::broker::Broker`] calls and back.
//!
//! The broker itself (topics, their tasks, subscriptions) is
//! [`crate::broker::Broker`]; this module holds no broker rule. The
//! [`Server`] also runs the gRPC listener ([`crate::grpc`]), the socket.io
//! listener ([`crate::socketio`]) and the metrics and health listener
//! ([`crate::http`]) when they are configured, over the same broker, and
//! stops them with the native one. Every listener counts its connections
//! through the shared admission (a ticket per connection, labelled with the
//! listener) and its requests with [`crate::metrics::Metrics::request`].

pub(crate) mod admission;
mod connection;
pub(crate) mod deadline;
mod handlers;
mod outgoing;

use crate::broker::{Broker, BrokerConfig, MessageLimit, TopicConfig, TopicInfo};
use crate::error::{Error, IoContext, Result};
use crate::protocol::DEFAULT_MAX_FRAME_BYTES;
use crate::security::{self, Listener, Security};
use crate::storage::RecoveryMode;
use admission::Admission;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Default listen address of `spool serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free one).
    pub listen: String,
    /// Address of the gRPC listener (port 0 picks a free one); `None`: no
    /// gRPC (`spool serve` defaults to [`crate::grpc::DEFAULT_GRPC_LISTEN`]).
    pub grpc: Option<String>,
    /// Address of the HTTP listener for `/metrics`, `/healthz` and
    /// `/readyz` (port 0 picks a free one); `None`: none (`spool serve`
    /// defaults to [`crate::http::DEFAULT_METRICS_LISTEN`]).
    pub metrics: Option<String>,
    /// Address of the socket.io listener (port 0 picks a free one); `None`:
    /// no socket.io (`spool serve` defaults to
    /// [`crate::socketio::DEFAULT_SOCKETIO_LISTEN`]).
    pub socketio: Option<String>,
    /// Data directory.
    pub data: PathBuf,
    /// Largest frame in either direction.
    pub max_frame_bytes: u32,
    /// Largest message (key + headers + value).
    pub max_message_bytes: u32,
    /// Most messages per produce.
    pub max_batch_messages: u32,
    /// Most open connections.
    pub max_connections: usize,
    /// Most subscriptions per connection.
    pub max_subscriptions: u32,
    /// Create unknown topics on first produce.
    pub auto_create: bool,
    /// Config of topics created without one.
    pub topic_defaults: TopicConfig,
    /// How opening logs treats damage.
    pub recovery: RecoveryMode,
    /// Longest a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Most open connections from one IP address (`None`: no cap).
    pub max_connections_per_ip: Option<usize>,
    /// Files open topics may keep open together (`None`: half the
    /// process's limit, see [`crate::broker::default_max_open_files`]).
    pub max_open_files: Option<usize>,
    /// A topic nobody used for this long is closed until its next use.
    pub topic_idle_close: Duration,
    /// No frame from the client for this long (after the handshake) closes
    /// the connection (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Longest a frame may take to arrive once its first byte did, and the
    /// handshake to complete once the connection is accepted (`None`: no limit).
    pub frame_timeout: Option<Duration>,
    /// Longest a write to the client may wait for the socket to take a byte;
    /// a peer that does not read its replies and deliveries for this long is
    /// closed (`None`: no limit).
    pub write_timeout: Option<Duration>,
    /// TLS and tokens, on every listener.
    pub security: Security,
    /// Serve on addresses beyond loopback without an auth file.
    pub insecure: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: DEFAULT_LISTEN.into(),
            grpc: None,
            metrics: None,
            socketio: None,
            data: PathBuf::from("./data"),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: 1024 * 1024,
            max_batch_messages: 10_000,
            max_connections: 1024,
            max_subscriptions: 64,
            auto_create: true,
            topic_defaults: TopicConfig::default(),
            recovery: RecoveryMode::default(),
            shutdown_timeout: Duration::from_secs(10),
            max_connections_per_ip: None,
            max_open_files: None,
            topic_idle_close: crate::broker::DEFAULT_TOPIC_IDLE_CLOSE,
            idle_timeout: Some(Duration::from_secs(60)),
            frame_timeout: Some(Duration::from_secs(30)),
            write_timeout: Some(Duration::from_secs(30)),
            security: Security::default(),
            insecure: false,
        }
    }
}

/// What every connection shares: the broker core, the connection slots,
/// and the server's settings.
#[derive(Debug)]
pub(crate) struct Shared {
    broker: Broker,
    admission: Arc<Admission>,
    /// The native listener's TLS.
    native: Listener,
    config: ServerConfig,
}

impl Shared {
    /// The largest message a produce takes (key + headers + value): the
    /// broker's `max_message_bytes`, or the frame limit less 1 KiB when
    /// that is smaller, since a message must fit the frame that delivers
    /// it. `Welcome` announces this value.
    fn message_limit(&self) -> MessageLimit {
        self.broker
            .message_limit(crate::protocol::convert::frame_message_limit(
                self.config.max_frame_bytes,
            ))
    }

    /// A topic onto the wire, with the largest message it takes.
    fn topic_info(&self, topic: &TopicInfo) -> crate::protocol::pb::TopicInfo {
        let max = topic.max_message_bytes(self.message_limit());
        crate::protocol::convert::topic_info(&topic.name, &topic.config, topic.stats, max)
    }

    /// The wire form of an error (paths relative to the data directory).
    fn wire(&self, error: &Error) -> crate::protocol::pb::Error {
        crate::protocol::status::to_wire(error, self.broker.data_dir())
    }
}

/// Resolves once the server is stopping (or its stop signal is gone): the
/// signal every listener, connection and waiting call watches.
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long a listener waits after a failed accept before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// At most one log line about failed accepts per this long.
const ACCEPT_LOG_EVERY_MS: u64 = 10_000;
/// Failed accepts since the last line about them, and when that was (ms
/// since the Unix epoch), over every listener.
static ACCEPT_FAILURES: AtomicU64 = AtomicU64::new(0);
static ACCEPT_LOGGED_MS: AtomicU64 = AtomicU64::new(0);
/// Least time between two closings of unused topics for want of
/// descriptors to accept with.
const ACCEPT_ROOM_EVERY_MS: u64 = 1_000;
/// When the last such closing began (ms since the Unix epoch).
static ACCEPT_ROOM_MS: AtomicU64 = AtomicU64::new(0);

/// The next connection on `listener` (named `name` in logs), for every
/// listener of the server. A failed accept (out of descriptors, a peer
/// gone before it was taken) is retried after [`ACCEPT_RETRY`], so no
/// single failure stops a listener, and logged at most once per 10 s with
/// how many failed since (out of descriptors, each retry fails again).
/// Out of descriptors, `broker` closes unused topics first (at most once
/// per [`ACCEPT_ROOM_EVERY_MS`]): connections come before idle topics.
/// Cancel-safe, as a `select!` branch.
pub(crate) async fn accept(
    listener: &TcpListener,
    name: &str,
    broker: &Broker,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                ACCEPT_FAILURES.fetch_add(1, Ordering::Relaxed);
                let now = crate::storage::log::timer_ms();
                let last = ACCEPT_ROOM_MS.load(Ordering::Relaxed);
                if crate::error::is_out_of_files(&e)
                    && now.saturating_sub(last) >= ACCEPT_ROOM_EVERY_MS
                    && ACCEPT_ROOM_MS
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    // A task of its own: a caller's `select!` dropping this
                    // accept must not cut the closing short.
                    let (broker, doing) = (
                        broker.clone(),
                        format!("accepting a connection on the {name} listener"),
                    );
                    tokio::spawn(async move { broker.make_room(&doing).await });
                }
                let last = ACCEPT_LOGGED_MS.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= ACCEPT_LOG_EVERY_MS
                    && ACCEPT_LOGGED_MS
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    let failures = ACCEPT_FAILURES.swap(0, Ordering::Relaxed);
                    tracing::warn!(listener = name, error = %e, failures,
                        "accept failed (failures: how many since the last such line; at most one per 10 s)");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// A bound server, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    grpc: Option<TcpListener>,
    metrics: Option<TcpListener>,
    /// With the key its recovery offsets are sealed with.
    socketio: Option<(TcpListener, crate::socketio::offset::Key)>,
    shared: Arc<Shared>,
}

impl Server {
    /// Opens the data directory (taking its lock and recovering every topic)
    /// and binds the listeners (native, and gRPC if configured).
    pub async fn bind(config: ServerConfig) -> Result<Server> {
        // The data directory's lock before any address: a second broker on
        // the same directory is told that, not that the first one's ports
        // are taken. Only a directory that has a lock file can be in use (a
        // new one is not created before the listeners are known to work).
        // The broker keeps this lock.
        let locked = if config
            .data
            .join(crate::storage::datadir::LOCK_FILE)
            .exists()
        {
            let data = config.data.clone();
            let dir = tokio::task::spawn_blocking(move || {
                crate::storage::DataDir::open(Arc::new(crate::storage::io::OsStorage), data)
            })
            .await
            .map_err(|e| Error::Internal(format!("locking the data directory: {e}")))??;
            Some(dir)
        } else {
            None
        };
        let listener = TcpListener::bind(&config.listen)
            .await
            .ctx(|| format!("listening on {}", config.listen))?;
        let grpc = match &config.grpc {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .ctx(|| format!("listening for gRPC on {addr}"))?,
            ),
            None => None,
        };
        let socketio = match &config.socketio {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .ctx(|| format!("listening for socket.io on {addr}"))?,
            ),
            None => None,
        };
        let metrics = match &config.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .ctx(|| format!("listening for metrics on {addr}"))?,
            ),
            None => None,
        };
        let mut bound = vec![(
            "native",
            listener
                .local_addr()
                .ctx(|| "reading the listen address".into())?,
        )];
        if let Some(g) = &grpc {
            bound.push((
                "grpc",
                g.local_addr()
                    .ctx(|| "reading the gRPC listen address".into())?,
            ));
        }
        if let Some(s) = &socketio {
            bound.push((
                "socketio",
                s.local_addr()
                    .ctx(|| "reading the socket.io listen address".into())?,
            ));
        }
        security::refuse_exposed(&bound, &config.security.auth, config.insecure)?;
        crate::protocol::request::allow_batch_messages(config.max_batch_messages as usize);
        let broker_config = BrokerConfig {
            data: config.data.clone(),
            topic_defaults: config.topic_defaults.clone(),
            auto_create: config.auto_create,
            recovery: config.recovery,
            max_message_bytes: config.max_message_bytes,
            max_batch_messages: config.max_batch_messages,
            max_open_files: config
                .max_open_files
                .unwrap_or_else(crate::broker::default_max_open_files),
            topic_idle_close: config.topic_idle_close,
        };
        let broker = match locked {
            Some(data) => Broker::open_locked(broker_config, data).await?,
            None => Broker::open(broker_config).await?,
        };
        // Before anything says the listener serves: a key that cannot be
        // read or made stops the start.
        let socketio = match socketio {
            Some(listener) => Some((
                listener,
                crate::socketio::offset::Key::load_or_create(broker.data_dir())?,
            )),
            None => None,
        };
        let shared = Arc::new(Shared {
            admission: Arc::new(Admission::new(
                config.max_connections,
                config.max_connections_per_ip,
                broker.metrics().clone(),
            )),
            broker,
            native: config.security.listener("native", &[]),
            config,
        });
        Ok(Server {
            listener,
            grpc,
            metrics,
            socketio,
            shared,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .ctx(|| "reading the listen address".into())
    }

    /// The address the gRPC listener actually bound, if there is one.
    pub fn grpc_addr(&self) -> Result<Option<SocketAddr>> {
        self.grpc
            .as_ref()
            .map(|l| {
                l.local_addr()
                    .ctx(|| "reading the gRPC listen address".into())
            })
            .transpose()
    }

    /// The address the metrics listener actually bound, if there is one.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        self.metrics
            .as_ref()
            .map(|l| {
                l.local_addr()
                    .ctx(|| "reading the metrics listen address".into())
            })
            .transpose()
    }

    /// The address the socket.io listener actually bound, if there is one.
    pub fn socketio_addr(&self) -> Result<Option<SocketAddr>> {
        self.socketio
            .as_ref()
            .map(|(l, _)| {
                l.local_addr()
                    .ctx(|| "reading the socket.io listen address".into())
            })
            .transpose()
    }

    /// The broker core this server serves.
    pub fn broker(&self) -> &Broker {
        &self.shared.broker
    }

    /// Serves until `shutdown` turns true, then stops accepting, ends
    /// subscriptions and long-polls (with an `UNAVAILABLE` "broker is
    /// stopping" frame), lets connections finish their in-flight requests
    /// (bounded by the shutdown timeout), syncs every topic and releases the
    /// data directory. The gRPC listener, if any, stops on the same signal
    /// and within the same timeout, before the broker does.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let Server {
            listener,
            grpc,
            metrics,
            socketio,
            shared,
        } = self;
        let metrics = metrics.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                shared.broker.clone(),
                shutdown.clone(),
            ))
        });
        let socketio = socketio.map(|(listener, key)| {
            tokio::spawn(crate::socketio::serve(
                listener,
                key,
                shared.broker.clone(),
                crate::socketio::Limits {
                    admission: Arc::clone(&shared.admission),
                    max_subscriptions: shared.config.max_subscriptions,
                    // What the native and gRPC readers can take, too: a
                    // message socket.io stored must fit their frames.
                    message_limit: shared.message_limit(),
                    frame_timeout: shared.config.frame_timeout,
                    write_timeout: shared.config.write_timeout,
                    shutdown_timeout: shared.config.shutdown_timeout,
                },
                shared.config.security.clone(),
                shutdown.clone(),
            ))
        });
        let grpc = grpc.map(|listener| {
            tokio::spawn(crate::grpc::serve(
                listener,
                shared.broker.clone(),
                shared.config.max_frame_bytes,
                crate::grpc::Limits {
                    admission: Arc::clone(&shared.admission),
                    idle_timeout: shared.config.idle_timeout,
                    write_timeout: shared.config.write_timeout,
                    frame_timeout: shared.config.frame_timeout,
                    max_subscriptions: shared.config.max_subscriptions,
                },
                shared.config.security.clone(),
                shutdown.clone(),
            ))
        });
        shared.admission.listening(connection::LISTENER);
        let mut connections = tokio::task::JoinSet::new();
        let mut summary = tokio::time::interval(admission::SUMMARY_EVERY);
        summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                (stream, peer) = accept(&listener, connection::LISTENER, &shared.broker) => {
                    let _ = stream.set_nodelay(true);
                    let b = Arc::clone(&shared);
                    let admitted = shared.admission.admit(connection::LISTENER, peer.ip());
                    let shutdown = shutdown.clone();
                    let refused = admitted.is_err();
                    connections.spawn(async move {
                        let serve = async {
                            let timed_out = || b.admission.count(admission::Limit::Frame);
                            let Some(stream) = b.native.accept(stream, peer, b.config.frame_timeout, timed_out).await else {
                                return;
                            };
                            match admitted {
                                Ok(ticket) => {
                                    connection::serve(stream, peer, Arc::clone(&b), shutdown).await;
                                    drop(ticket);
                                }
                                Err(error) => {
                                    connection::refuse(stream, peer, b.config.max_frame_bytes, error).await;
                                }
                            }
                        };
                        if refused {
                            b.admission.refuse_within(serve).await;
                        } else {
                            serve.await;
                        }
                    });
                }
                _ = shutdown.changed() => break,
                _ = summary.tick() => shared.admission.log_summary(),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        let timeout = shared.config.shutdown_timeout;
        // One bound for both listeners: gRPC began stopping on the same signal.
        let deadline = tokio::time::Instant::now() + timeout;
        if tokio::time::timeout(timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                ?timeout,
                "connections still busy after the shutdown timeout; closing them"
            );
            connections.shutdown().await;
        }
        if let Some(mut grpc) = grpc {
            match tokio::time::timeout_at(deadline, &mut grpc).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC listener failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "gRPC listener task failed"),
                Err(_) => {
                    tracing::warn!(
                        ?timeout,
                        "gRPC calls still busy after the shutdown timeout; closing them"
                    );
                    grpc.abort();
                }
            }
        }
        if let Some(mut socketio) = socketio {
            match tokio::time::timeout_at(deadline, &mut socketio).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "socket.io listener failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "socket.io listener task failed"),
                Err(_) => {
                    tracing::warn!(
                        ?timeout,
                        "socket.io sockets still busy after the shutdown timeout; closing them"
                    );
                    socketio.abort();
                }
            }
        }
        shared.admission.log_summary();
        if let Some(metrics) = metrics {
            // It saw the same signal; its connections are closed.
            let _ = metrics.await;
        }
        shared.broker.stop().await?;
        tracing::info!("stopped");
        Ok(())
    }
}
