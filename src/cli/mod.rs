//! The `spool` command line: one file per subcommand group. Exit codes: 0 ok,
//! 1 runtime error (one line on stderr naming what failed), 2 usage error.

mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// spool: a durable message queue and log broker.
///
/// Every message is kept on disk, checksummed, until it has been handled, so a
/// consumer that was offline gets what it missed and a new one can replay from
/// any offset.
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
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spool: {e}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr through `tracing`; `RUST_LOG` overrides the default `info`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
