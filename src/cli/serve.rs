//! `spool serve`: run the broker. The first lines on stdout say where it
//! listens and where the data is, in a form scripts may rely on (see
//! [`startup_lines`]); SIGINT or SIGTERM stop it gracefully.

use super::common::{CliError, Format};
use clap::Args;
use serde::Deserialize;
use spool::grpc::DEFAULT_GRPC_LISTEN;
use spool::http::DEFAULT_METRICS_LISTEN;
use spool::security::auth::Auth;
use spool::security::tls::TlsServer;
use spool::server::{DEFAULT_LISTEN, Server, ServerConfig};
use spool::socketio::DEFAULT_SOCKETIO_LISTEN;
use spool::storage::{FsyncPolicy, RecoveryMode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `spool serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (default ./data; created if missing).
    #[arg(long, env = "SPOOL_DATA")]
    data: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7411); port 0 picks a free
    /// port (printed on the first line).
    #[arg(long)]
    listen: Option<String>,
    /// Address of the gRPC listener (default 127.0.0.1:7412); port 0 picks
    /// a free port (printed on its own start-up line); `off` serves no
    /// gRPC.
    #[arg(long, value_name = "ADDR|off")]
    grpc: Option<String>,
    /// Address of the HTTP listener for /metrics, /healthz and /readyz
    /// (default 127.0.0.1:9411); port 0 picks a free port (printed on its
    /// own start-up line); `off` serves none.
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<String>,
    /// Address of the socket.io listener (default 127.0.0.1:7413); port 0
    /// picks a free port (printed on its own start-up line); `off` serves
    /// no socket.io.
    #[arg(long, value_name = "ADDR|off")]
    socketio: Option<String>,
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Default fsync policy of new topics: always, interval:MS or never.
    #[arg(long)]
    fsync: Option<FsyncPolicy>,
    /// Refuse produce to topics that were not created first.
    #[arg(long)]
    no_auto_create: bool,
    /// Damage handling when opening logs: tolerate-torn-tail (cut a torn tail,
    /// refuse anything worse) or skip-damaged (quarantine damaged ranges).
    #[arg(long)]
    recovery: Option<RecoveryMode>,
    /// Close a connection that sends no frame for this long after the
    /// handshake (default 60000; 0: never).
    #[arg(long, value_name = "MS")]
    idle_timeout_ms: Option<u64>,
    /// Close a connection whose frame (or handshake) is not complete this
    /// long after it began (default 30000; 0: no limit).
    #[arg(long, value_name = "MS")]
    frame_timeout_ms: Option<u64>,
    /// Close a connection that takes none of the bytes written to it for
    /// this long: a client that does not read (default 30000; 0: no limit).
    #[arg(long, value_name = "MS")]
    write_timeout_ms: Option<u64>,
    /// Most open connections from one IP address (default: no cap).
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Files open topics may keep open together, at least 16; the least
    /// recently used topics are closed beyond it (default: half the
    /// open-files limit).
    #[arg(long, value_name = "N")]
    max_open_files: Option<usize>,
    /// Close a topic nobody used for this long, until its next use
    /// (default 30000).
    #[arg(long, value_name = "MS")]
    topic_idle_close_ms: Option<u64>,
    /// TLS on every listener: this PEM certificate chain (leaf first)...
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ...and its PEM private key (both re-read on SIGHUP).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require a token from every client: the auth file of tokens and their
    /// permissions (re-read on SIGHUP; see docs/security.md).
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,
    /// Allow listening on addresses beyond loopback without --auth.
    #[arg(long)]
    insecure: bool,
    /// Form of the start-up output: text (`spool VERSION listening on ADDR,
    /// data in DIR`, then `spool grpc listening on ADDR`, `spool metrics
    /// listening on ADDR` and `spool socketio listening on ADDR`) or json
    /// (one object with `listeners.native`, `listeners.grpc`,
    /// `listeners.metrics` and `listeners.socketio`).
    #[arg(long, value_enum, default_value = "text", hide_possible_values = true)]
    format: Format,
}

/// The config file: every field optional, flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    grpc: Option<String>,
    metrics: Option<String>,
    socketio: Option<String>,
    data: Option<PathBuf>,
    fsync: Option<FsyncPolicy>,
    auto_create: Option<bool>,
    // Read as u64 so a value past a setting's range is told that range
    // (checked below), not the type's.
    max_frame_bytes: Option<u64>,
    max_message_bytes: Option<u64>,
    max_batch_messages: Option<u64>,
    max_connections: Option<usize>,
    max_subscriptions: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    max_connections_per_ip: Option<usize>,
    idle_timeout_ms: Option<u64>,
    frame_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    max_open_files: Option<usize>,
    topic_idle_close_ms: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    auth: Option<PathBuf>,
    insecure: Option<bool>,
}

/// A timeout setting: 0 turns it off.
fn timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// What `spool serve` prints once it listens, in one write: a contract
/// scripts rely on to find ports picked with port 0, so its form never
/// changes. Text: the first line `spool VERSION listening on ADDR, data in
/// DIR` (the native listener), then, with gRPC on, `spool grpc listening on
/// ADDR`, then, with metrics on, `spool metrics listening on ADDR`, then,
/// with socket.io on, `spool socketio listening on ADDR`. JSON: one line,
/// `{"version":..,"listeners":{"native":ADDR,"grpc":ADDR,"metrics":ADDR,
/// "socketio":ADDR},"data":DIR}` (no key for a listener that is off).
/// Listeners added later get keys of their own in `listeners`, and in text
/// lines of their own after these.
fn startup_lines(format: Format, listeners: &Listeners, data: &Path) -> String {
    let Listeners {
        native: addr,
        grpc,
        metrics,
        socketio,
    } = *listeners;
    let version = env!("CARGO_PKG_VERSION");
    match format {
        Format::Text => {
            let mut out = format!(
                "spool {version} listening on {addr}, data in {}\n",
                data.display()
            );
            if let Some(grpc) = grpc {
                out.push_str(&format!("spool grpc listening on {grpc}\n"));
            }
            if let Some(metrics) = metrics {
                out.push_str(&format!("spool metrics listening on {metrics}\n"));
            }
            if let Some(socketio) = socketio {
                out.push_str(&format!("spool socketio listening on {socketio}\n"));
            }
            out
        }
        Format::Json => {
            let mut listeners = serde_json::json!({ "native": addr.to_string() });
            if let Some(grpc) = grpc {
                listeners["grpc"] = grpc.to_string().into();
            }
            if let Some(metrics) = metrics {
                listeners["metrics"] = metrics.to_string().into();
            }
            if let Some(socketio) = socketio {
                listeners["socketio"] = socketio.to_string().into();
            }
            let line = serde_json::json!({
                "version": version,
                "listeners": listeners,
                "data": data.to_string_lossy(),
            });
            format!("{line}\n")
        }
    }
}

/// The addresses `spool serve` listens on.
#[derive(Debug, Clone, Copy)]
struct Listeners {
    native: SocketAddr,
    grpc: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    socketio: Option<SocketAddr>,
}

/// Files the config names that are read after its settings are checked.
struct Named {
    tls: (Option<PathBuf>, Option<PathBuf>),
    auth: Option<PathBuf>,
}

/// The server's config from flags and the config file: a setting that
/// cannot be is a usage error (exit 2); a file it names (TLS, tokens) that
/// cannot be read or used, a runtime one. Also whether `max_connections`
/// was given.
fn config(args: &ServeArgs) -> Result<(ServerConfig, bool), CliError> {
    let usage = |e| match e {
        spool::Error::InvalidArgument(m) => CliError::usage(m),
        other => CliError::from(other),
    };
    let (mut c, connections_set, named) = settings(args).map_err(usage)?;
    c.security.tls = match named.tls {
        (Some(cert), Some(key)) => Some(TlsServer::load(&cert, &key)?),
        (None, None) => None,
        (Some(_), None) => {
            return Err(CliError::usage(
                "tls_cert is set but tls_key is not: TLS needs both",
            ));
        }
        (None, Some(_)) => {
            return Err(CliError::usage(
                "tls_key is set but tls_cert is not: TLS needs both",
            ));
        }
    };
    if let Some(path) = named.auth {
        c.security.auth = Auth::load(&path)?;
    }
    Ok((c, connections_set))
}

/// The settings of [`config`], checked, and the files it names.
fn settings(args: &ServeArgs) -> spool::Result<(ServerConfig, bool, Named)> {
    let file = match &args.config {
        Some(path) => {
            let text = spool::storage::io::read_settings_text(path)
                .map_err(|e| spool::Error::io(format!("reading config {}", path.display()), e))?;
            toml::from_str::<FileConfig>(&text).map_err(|e| {
                spool::Error::InvalidArgument(format!(
                    "config {}: {}",
                    path.display(),
                    spool::broker::config::toml_error(&text, &e)
                ))
            })?
        }
        None => FileConfig::default(),
    };
    let mut c = ServerConfig {
        listen: args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into()),
        grpc: match args.grpc.clone().or(file.grpc) {
            Some(addr) if addr == "off" => None,
            Some(addr) => Some(addr),
            None => Some(DEFAULT_GRPC_LISTEN.into()),
        },
        metrics: match args.metrics.clone().or(file.metrics) {
            Some(addr) if addr == "off" => None,
            Some(addr) => Some(addr),
            None => Some(DEFAULT_METRICS_LISTEN.into()),
        },
        socketio: match args.socketio.clone().or(file.socketio) {
            Some(addr) if addr == "off" => None,
            Some(addr) => Some(addr),
            None => Some(DEFAULT_SOCKETIO_LISTEN.into()),
        },
        data: args
            .data
            .clone()
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from("./data")),
        auto_create: !args.no_auto_create && file.auto_create.unwrap_or(true),
        recovery: args.recovery.unwrap_or_default(),
        ..ServerConfig::default()
    };
    // An address without a port is a mistake of the command line, named
    // as the client commands name it, not a failure to listen.
    for (name, addr) in [
        ("listen", Some(&c.listen)),
        ("grpc", c.grpc.as_ref()),
        ("metrics", c.metrics.as_ref()),
        ("socketio", c.socketio.as_ref()),
    ] {
        if let Some(addr) = addr {
            super::common::parse_server(addr)
                .map_err(|e| spool::Error::InvalidArgument(format!("{name}: {e}")))?;
        }
    }
    if c.data.as_os_str().is_empty() {
        return Err(spool::Error::InvalidArgument(
            "data is an empty path: name a directory (\"./data\" by default)".into(),
        ));
    }
    if let Some(f) = args.fsync.or(file.fsync) {
        c.topic_defaults.log.fsync = f;
    }
    // Each within what a broker can serve with, or refused naming it.
    let within = |name: &str, v: u64, min: u64, max: u64| {
        if (min..=max).contains(&v) {
            Ok(())
        } else {
            Err(spool::Error::InvalidArgument(format!(
                "{name} {v} is out of range: {min} to {max}"
            )))
        }
    };
    // The same for a 32-bit setting (every range below fits one).
    let within_u32 = |name: &str, v: u64, min: u64, max: u64| {
        within(name, v, min, max)?;
        u32::try_from(v).map_err(|_| {
            spool::Error::InvalidArgument(format!("{name} {v} is out of range: {min} to {max}"))
        })
    };
    if let Some(v) = file.max_frame_bytes {
        c.max_frame_bytes = within_u32("max_frame_bytes", v, 4096, 1 << 30)?;
    }
    if let Some(v) = file.max_message_bytes {
        c.max_message_bytes = within_u32("max_message_bytes", v, 1, 1 << 30)?;
    }
    if let Some(v) = file.max_batch_messages {
        c.max_batch_messages = within_u32("max_batch_messages", v, 1, 1_000_000)?;
    }
    let connections_set = file.max_connections.is_some();
    if let Some(v) = file.max_connections {
        within("max_connections", v as u64, 1, 1_000_000)?;
        c.max_connections = v;
    }
    if let Some(v) = file.max_subscriptions {
        c.max_subscriptions = within_u32("max_subscriptions", v, 1, 1_000_000)?;
    }
    if let Some(ms) = file.shutdown_timeout_ms {
        c.shutdown_timeout = Duration::from_millis(ms);
    }
    if let Some(n) = args.max_connections_per_ip.or(file.max_connections_per_ip) {
        if n == 0 {
            return Err(spool::Error::InvalidArgument(
                "max_connections_per_ip must be at least 1 (leave it out for no cap)".into(),
            ));
        }
        c.max_connections_per_ip = Some(n);
    }
    if let Some(ms) = args.idle_timeout_ms.or(file.idle_timeout_ms) {
        c.idle_timeout = timeout(ms);
    }
    if let Some(ms) = args.frame_timeout_ms.or(file.frame_timeout_ms) {
        c.frame_timeout = timeout(ms);
    }
    if let Some(ms) = args.write_timeout_ms.or(file.write_timeout_ms) {
        c.write_timeout = timeout(ms);
    }
    if let Some(n) = args.max_open_files.or(file.max_open_files) {
        if n < 16 {
            return Err(spool::Error::InvalidArgument(format!(
                "max_open_files {n} is below 16: a topic alone keeps 4 files open"
            )));
        }
        c.max_open_files = Some(n);
    }
    if let Some(ms) = args.topic_idle_close_ms.or(file.topic_idle_close_ms) {
        if ms == 0 {
            return Err(spool::Error::InvalidArgument(
                "topic_idle_close_ms must be at least 1".into(),
            ));
        }
        c.topic_idle_close = Duration::from_millis(ms);
    }
    let named = Named {
        tls: (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
        ),
        auth: args.auth.clone().or(file.auth),
    };
    c.insecure = args.insecure || file.insecure.unwrap_or(false);
    Ok((c, connections_set, named))
}

/// Runs the command. A setting out of its range, in a flag or the config
/// file, is a usage error (exit 2); the broker's own failures exit 1.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let (config, connections_set) = config(&args)?;
    serve(args, config, connections_set).map_err(CliError::from)
}

/// Descriptors kept aside from connections and topics: listeners, the
/// runtime's, short-lived files (settings, checkpoints, folder syncs).
const RESERVED_FILES: u64 = 16;

fn serve(args: ServeArgs, mut config: ServerConfig, connections_set: bool) -> spool::Result<()> {
    match spool::error::raise_open_files_limit() {
        Some(n) => {
            tracing::info!(limit = n, "open files");
            // Each connection holds a descriptor: beyond what the topics'
            // share leaves, the system refuses accepts and clients wait
            // unanswered, where a slot refusal tells them why.
            // (A max_open_files above the limit, warned about below,
            // counts as the default share: half the limit.)
            let topics = match config.max_open_files {
                Some(m) if m as u64 <= n => m as u64,
                _ => spool::broker::default_max_open_files() as u64,
            };
            let room = usize::try_from(n.saturating_sub(topics).saturating_sub(RESERVED_FILES))
                .unwrap_or(usize::MAX)
                .max(1);
            if config.max_connections > room {
                if connections_set {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        limit = n,
                        max_open_files = topics,
                        "max_connections is above what the open-files limit leaves after the \
                         topics' share: connections past about {room} wait unaccepted; raise the \
                         limit (ulimit -n, LimitNOFILE for a service) or lower max_connections"
                    );
                } else {
                    tracing::info!(
                        max_connections = room,
                        limit = n,
                        max_open_files = topics,
                        "max_connections lowered to what the open-files limit leaves after the \
                         topics' share (raise the limit for more)"
                    );
                    config.max_connections = room;
                }
            }
            if let Some(max) = config.max_open_files.filter(|&max| max as u64 > n) {
                tracing::warn!(
                    max_open_files = max,
                    limit = n,
                    "max_open_files is above the process's open-files limit: opening topics \
                     beyond the limit fails with \"too many open files\"; raise the limit \
                     (ulimit -n, LimitNOFILE for a service) or lower max_open_files"
                );
            }
        }
        None => tracing::info!("open files: no limit"),
    }
    if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Fsize).current {
        tracing::warn!(
            limit,
            "the process may write files of at most {limit} bytes (ulimit -f): a segment, index or \
             journal that reaches it takes no more writes, answered as a full disk; raise it \
             (ulimit -f unlimited, LimitFSIZE for a service)"
        );
    }
    // The runtime's workers and a blocking thread at once: a process
    // limit too low for them is named here, not met as a panic of the
    // runtime's thread pool.
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    threads_available(workers + 1)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| spool::Error::io("starting the async runtime", e))?;
    runtime.block_on(async move {
        let data = config.data.clone();
        // Handlers before anything else: a SIGHUP sent while the broker
        // opens is a reload (not the default, which ends the process), and
        // a script that stops the broker as soon as it reads the start-up
        // line gets a graceful stop.
        config.security.reload_on_sighup()?;
        let mut signals = Signals::install();
        super::common::catch_file_size_signal();
        let server = Server::bind(config).await?;
        let listeners = Listeners {
            native: server.local_addr()?,
            grpc: server.grpc_addr()?,
            metrics: server.metrics_addr()?,
            socketio: server.socketio_addr()?,
        };
        // One write: a reader that stops after the first line has all of it.
        {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            // A reader gone already (`spool serve | head -1`) does not stop
            // the broker.
            if let Err(e) = stdout
                .write_all(startup_lines(args.format, &listeners, &data).as_bytes())
                .and_then(|()| stdout.flush())
            {
                tracing::warn!(error = %e, "could not write the start-up lines to stdout");
            }
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("signal received: shutting down");
            let _ = stop.send(true);
            // A second signal does not wait for the stop: what a clean stop
            // adds (answers in flight, the checkpoint that spares the next
            // start its scan) is given up; what was acknowledged is on disk.
            // One within a second of the first is the same request (a
            // terminal's Ctrl-C reaches a wrapper that passes it on too).
            let first = std::time::Instant::now();
            let second = loop {
                let second = signals.wait().await;
                if first.elapsed() >= SECOND_SIGNAL_AFTER {
                    break second;
                }
            };
            tracing::warn!(
                signal = second,
                "second signal during the stop: exiting now, without a clean stop (the next start recovers as after a crash; nothing acknowledged is lost)"
            );
            std::process::exit(128 + second);
        });
        server.run(stopped).await
    })
}

/// Starts `n` threads that live at the same time, then ends them: an error
/// naming the process's thread limit if the system refuses one.
fn threads_available(n: usize) -> spool::Result<()> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        match std::thread::Builder::new()
            .name("spool-start".into())
            .spawn(move || {
                // Returns when `release` is dropped.
                let _ = wait.recv();
            }) {
            Ok(thread) => held.push((release, thread)),
            Err(e) => {
                return Err(spool::Error::Io {
                    context: format!(
                        "starting {n} threads (the broker runs at least that many; {} started): \
                         raise the process's thread limit (ulimit -u, TasksMax for a service)",
                        held.len()
                    ),
                    source: e,
                });
            }
        }
    }
    for (release, thread) in held {
        drop(release);
        let _ = thread.join();
    }
    Ok(())
}

/// Least time after the signal that began a stop for another one to end
/// the process at once.
const SECOND_SIGNAL_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM and SIGINT, caught from when they are installed.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Waits for the next of either; returns its number.
    async fn wait(&mut self) -> i32 {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => 15,
            _ = next(&mut self.int) => 2,
        }
    }
}
