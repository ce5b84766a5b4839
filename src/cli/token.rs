//! `spool token create`: a new secret for the auth file of `spool serve
//! --auth`, printed once with the entry that grants it its permissions.

use super::common::{CliError, CliResult};
use clap::{Args, Subcommand};
use spool::security::auth::{self, Pattern, TokenEntry};

/// `spool token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new secret (once: only its hash is kept) and the
    /// `[[token]]` entry to add to the auth file.
    Create(CreateArgs),
}

/// Arguments of `spool token create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the token (in logs and refusals).
    name: String,
    /// Topics it may produce to: a name or a prefix followed by `*`
    /// (repeatable).
    #[arg(long, value_name = "PATTERN")]
    produce: Vec<String>,
    /// Topics it may consume from: fetch, subscribe, ack, nack, commit, seek
    /// (repeatable).
    #[arg(long, value_name = "PATTERN")]
    consume: Vec<String>,
    /// Topics it may administer: topics, groups, deleting messages,
    /// compaction (repeatable).
    #[arg(long, value_name = "PATTERN")]
    admin: Vec<String>,
}

/// Runs the command.
pub fn run(cmd: TokenCommand) -> CliResult {
    let TokenCommand::Create(args) = cmd;
    // Bad arguments are usage errors (exit 2), as clap's own are.
    if args.name.trim().is_empty() {
        return Err(CliError::usage("the token's name is empty"));
    }
    for p in args.produce.iter().chain(&args.consume).chain(&args.admin) {
        Pattern::parse(p).map_err(|e| CliError::usage(e.to_string()))?;
    }
    let secret = auth::new_secret()?;
    let entry = TokenEntry {
        hash: auth::hash_secret(&secret),
        name: args.name,
        produce: args.produce,
        consume: args.consume,
        admin: args.admin,
    };
    outln!("secret (shown only now; clients pass it as --token or SPOOL_TOKEN):");
    outln!("{secret}");
    outln!();
    outln!("add to the auth file, then send the broker SIGHUP:");
    outln!("{}", entry.to_toml().trim_end_matches('\n'));
    Ok(())
}
