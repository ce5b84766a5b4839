//! What every client command shares: finding the server, running async
//! calls, parsing positions and headers, output formats, and errors that map
//! to exit codes.

use clap::{Args, ValueEnum};
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, ClientOptions};
use spool::security::tls::TlsClient;
use spool::server::DEFAULT_LISTEN;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;

/// `--server` and how to reach it (TLS, token), shared by client commands.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// Address of the broker.
    #[arg(
        long,
        env = "SPOOL_SERVER",
        default_value = DEFAULT_LISTEN,
        global = true,
        value_parser = parse_server
    )]
    pub server: String,
    /// Connect with TLS, trusting the CA certificates of this PEM file.
    #[arg(
        long,
        env = "SPOOL_TLS_CA",
        value_name = "FILE",
        global = true,
        value_parser = parse_ca_file
    )]
    pub tls_ca: Option<PathBuf>,
    /// The name the broker's certificate must be valid for (default: the
    /// host of --server).
    #[arg(long, value_name = "NAME", global = true)]
    pub tls_server_name: Option<String>,
    /// The token to present (a broker started with --auth requires one).
    #[arg(
        long,
        env = "SPOOL_TOKEN",
        value_name = "SECRET",
        global = true,
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// The PEM file of `--tls-ca`; an empty one (an exported but empty
/// `SPOOL_TLS_CA` most often) is named as such.
pub fn parse_ca_file(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err(
            "the file name is empty (an empty SPOOL_TLS_CA in the environment counts too: \
             unset it to connect without TLS)"
                .into(),
        );
    }
    Ok(PathBuf::from(s))
}

/// `HOST:PORT` (a name or an address; `[::1]:7411` for IPv6).
pub fn parse_server(s: &str) -> Result<String, String> {
    // An IPv6 address is bracketed: `::1` alone is no host and port.
    let host_ok = |host: &str| {
        !host.is_empty() && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
    };
    match s.rsplit_once(':') {
        Some((host, port)) if host_ok(host) && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err(format!(
            "{s:?} is not HOST:PORT (for example {DEFAULT_LISTEN} or broker.example:7411)"
        )),
    }
}

impl ServerArg {
    /// The client options these flags make.
    pub fn options(&self, client_name: &str) -> CliResult<ClientOptions> {
        let tls = match &self.tls_ca {
            Some(path) => Some(TlsClient::load_ca(path)?),
            None => None,
        };
        Ok(ClientOptions {
            tls,
            server_name: self.tls_server_name.clone(),
            token: self.token.clone(),
            ..ClientOptions::new(client_name)
        })
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Human-readable.
    #[default]
    Text,
    /// JSON: messages (consume) one object per line, anything else one document.
    Json,
}

/// A failed command: a message for stderr and an exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// A runtime failure (exit 1).
    pub fn runtime(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 1,
        }
    }

    /// A command line that asks for something that cannot be (exit 2, as
    /// for the usage errors the argument parser reports).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 2,
        }
    }

    /// A run stopped by signal number `signal`: exit 128 + `signal`, as a
    /// shell reports it (130 for Ctrl-C, 143 for SIGTERM).
    pub fn interrupted(signal: u8, message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 128u8.saturating_add(signal),
        }
    }

    /// Exit code of the failure.
    pub fn exit_code(&self) -> u8 {
        self.code
    }

    /// The same failure, its message followed by `more`.
    pub fn and(self, more: impl fmt::Display) -> CliError {
        CliError {
            message: format!("{}; {more}", self.message),
            code: self.code,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<spool::Error> for CliError {
    fn from(e: spool::Error) -> CliError {
        CliError::runtime(e.to_string())
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match e {
            // A connection that worked, then broke (the broker killed or
            // gone away mid-run).
            ClientError::Io { addr, source }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                CliError::runtime(format!(
                    "the connection to the broker at {addr} broke: {source}"
                ))
            }
            // Silent while an answer was due (`lost_after`): the broker's
            // host or the network went away mid-run.
            ClientError::Io { addr, source } if source.to_string().contains("(lost_after)") => {
                CliError::runtime(format!(
                    "the connection to the broker at {addr} was lost: {source}"
                ))
            }
            ClientError::Io { addr, source } => CliError::runtime(format!(
                "cannot reach the broker at {addr} ({source}); is `spool serve` running? (--server / SPOOL_SERVER)"
            )),
            ClientError::Closed => {
                let at = BROKER
                    .get()
                    .map_or_else(String::new, |a| format!(" at {a}"));
                CliError::runtime(format!(
                    "the broker{at} closed the connection without saying why (it stopped or was killed)"
                ))
            }
            ClientError::Status {
                code: code @ spool::protocol::pb::Code::Unauthenticated,
                message,
            } if message.contains("--token") => CliError::runtime(format!("{message} ({code:?})")),
            ClientError::Status {
                code: code @ spool::protocol::pb::Code::Unauthenticated,
                message,
            } => CliError::runtime(format!(
                "{message} ({code:?}); pass a valid token with --token or SPOOL_TOKEN"
            )),
            ClientError::Status { code, message } => {
                CliError::runtime(format!("{message} ({code:?})"))
            }
            other => CliError::runtime(other.to_string()),
        }
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Catches SIGXFSZ, whose default action ends the process when a file
/// reaches the file-size limit (`ulimit -f`): caught, the write fails with
/// EFBIG instead, which spool answers as it answers a full disk. Call inside
/// a runtime; tokio keeps a handler it installed for the rest of the process.
pub fn catch_file_size_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    if let Err(e) = signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        tracing::warn!(error = %e, "could not catch SIGXFSZ: a file reaching the file-size limit (ulimit -f) ends the process");
    }
}

/// Runs an async command body on a small runtime: the body on this thread,
/// the connection's tasks (its reader, its keep-alive pings) on one worker
/// of their own, so a body blocked writing to a slow stdout does not stop
/// them and the broker does not close the connection as idle.
pub fn block_on<T>(f: impl Future<Output = CliResult<T>>) -> CliResult<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("starting the async runtime: {e}")))?
        .block_on(f)
}

/// The broker this command talks to (one per command), for errors that
/// reach the user without an address of their own.
static BROKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Connects to the broker.
pub async fn connect(server: &ServerArg) -> CliResult<Client> {
    let options = server.options("spool-cli")?;
    let _ = BROKER.set(server.server.clone());
    Ok(Client::connect_with(&server.server, &options).await?)
}

/// Parses `earliest`, `latest`, an offset, or `@UNIX_MS`.
pub fn parse_position(s: &str) -> Result<Position, String> {
    match s {
        "earliest" => Ok(Position::Earliest),
        "latest" => Ok(Position::Latest),
        _ => {
            if let Some(ms) = s.strip_prefix('@') {
                ms.parse().map(Position::Timestamp).map_err(|_| {
                    format!("{s:?}: expected @ followed by milliseconds since the Unix epoch")
                })
            } else {
                s.parse().map(Position::Offset).map_err(|_| {
                    format!("{s:?}: expected earliest, latest, an offset, or @UNIX_MS")
                })
            }
        }
    }
}

/// Parses `NAME=VALUE`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?}: expected NAME=VALUE with a non-empty NAME")),
    }
}

/// Prints rows as aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Fails unless `dir` is a data directory a broker made (it holds `topics/`):
/// offline commands must not create one where a path was mistyped, and
/// report it clean.
pub fn existing_data_dir(dir: &std::path::Path) -> CliResult {
    let topics = dir.join(spool::storage::datadir::TOPICS_DIR);
    match std::fs::metadata(&topics) {
        Ok(m) if m.is_dir() => Ok(()),
        // Not there, or something else in its place: a mistyped path.
        Ok(_) => Err(not_a_data_dir(dir)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(not_a_data_dir(dir))
        }
        // There may well be one, out of this user's reach.
        Err(e) => Err(CliError::runtime(format!(
            "cannot read data directory {}: {}: {e}",
            dir.display(),
            topics.display()
        ))),
    }
}

fn not_a_data_dir(dir: &std::path::Path) -> CliError {
    CliError::runtime(format!(
        "{} is not a spool data directory (it has no {}/ folder); check --data",
        dir.display(),
        spool::storage::datadir::TOPICS_DIR
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_bad_ones_are_named() {
        assert_eq!(parse_position("earliest"), Ok(Position::Earliest));
        assert_eq!(parse_position("latest"), Ok(Position::Latest));
        assert_eq!(parse_position("42"), Ok(Position::Offset(42)));
        assert_eq!(
            parse_position("@1700000000000"),
            Ok(Position::Timestamp(1_700_000_000_000))
        );
        for bad in ["-1", "@x", "soon", ""] {
            assert!(
                parse_position(bad)
                    .expect_err("invalid")
                    .contains(&format!("{bad:?}"))
            );
        }
    }

    #[test]
    fn headers_need_a_name_and_an_equals_sign() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }
}
