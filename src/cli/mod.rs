//! The `spool` command line: one file per subcommand group. Exit codes: 0 ok,
//! 1 runtime error (one line on stderr naming what failed), 2 usage error.

/// `eprintln!` for the command's own lines on stderr: a closed stderr
/// (`2>&1 | head`) loses them quietly instead of a panic.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `println!` for a command's output: when stdout is closed (`| head`), the
/// command ends with exit 1 and one line on stderr instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            errln!("spool: writing stdout: {e}");
            std::process::exit(1);
        }
    }};
}

mod bench;
mod common;
mod compact;
mod consume;
mod delete;
mod group;
mod produce;
mod serve;
mod token;
mod topic;
mod verify;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// spool: a durable message queue and log broker.
///
/// Every message is kept on disk, checksummed, until it has been handled, so a
/// consumer that was offline gets what it missed and a new one can replay from
/// any offset. Start a broker with `spool serve`, then produce and consume
/// from other terminals (client commands find it with --server or SPOOL_SERVER).
#[derive(Debug, Parser)]
#[command(name = "spool", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker on a data directory.
    Serve(serve::ServeArgs),
    /// Append messages: MESSAGE, or one message per line of stdin.
    Produce(produce::ProduceArgs),
    /// Read messages: replay, or as a stream or queue group.
    Consume(consume::ConsumeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// List, describe, move and delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Delete messages by offset: they are never delivered or replayed again.
    Delete(delete::DeleteArgs),
    /// Reclaim deleted, consumed and superseded records without moving an
    /// offset: online through the broker, or offline with --data.
    Compact(compact::CompactArgs),
    /// Make tokens for the auth file of `spool serve --auth`.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Check every segment, index and journal of a stopped broker's data.
    Verify(verify::VerifyArgs),
    /// Measure throughput and latency (produce, consume, e2e, disk, socketio) next to the
    /// disk's own bandwidth, on an in-process broker or --server.
    Bench(bench::BenchArgs),
}

/// Parses arguments, runs the command, and maps the outcome to an exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(matches!(cli.command, Command::Serve(_)));
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Produce(args) => produce::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Topic(cmd) => topic::run(cmd),
        Command::Group(cmd) => group::run(cmd),
        Command::Delete(args) => delete::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Compact(args) => compact::run(args),
        Command::Token(cmd) => token::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("spool: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr through `tracing`; `RUST_LOG` overrides the default
/// (`info` for the broker, `warn` for client commands).
fn init_logging(broker: bool) {
    use std::io::IsTerminal;
    let default = if broker { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A closed stderr loses log lines, as it does the command's own.
        .log_internal_errors(false)
        .try_init();
}
