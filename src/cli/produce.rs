//! `spool produce`: append MESSAGE, or one message per line of stdin, and
//! return once the broker acknowledged them.

use super::common::{CliError, CliResult, ServerArg, block_on, connect, parse_header};
use clap::Args;
use spool::storage::NewMessage;
use std::io::BufRead;

/// Lines sent per produce request when reading stdin.
const BATCH: usize = 1000;

/// Arguments of `spool produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to append to (created on first produce unless the broker runs with --no-auto-create).
    topic: String,
    /// The message; without it, every line of stdin is one message.
    message: Option<String>,
    /// Key of every message (compaction keeps the latest record per key).
    #[arg(long)]
    key: Option<String>,
    /// A header NAME=VALUE (repeatable; order is kept).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Print each acknowledged offset on stdout, one per line.
    #[arg(long)]
    print_offsets: bool,
    #[command(flatten)]
    server: ServerArg,
}

fn message(args: &ProduceArgs, value: String) -> NewMessage {
    let mut m = NewMessage::from_value(value);
    if let Some(key) = &args.key {
        m = m.with_key(key.clone());
    }
    for (name, value) in &args.headers {
        m = m.with_header(name.clone(), value.clone());
    }
    m
}

/// Runs the command.
pub fn run(args: ProduceArgs) -> CliResult {
    block_on(async {
        let client = connect(&args.server).await?;
        let mut sent = 0usize;
        let send = |batch: Vec<NewMessage>| {
            let client = &client;
            let topic = args.topic.clone();
            let print = args.print_offsets;
            async move {
                let n = batch.len();
                let p = client.produce(&topic, batch).await?;
                if print {
                    for offset in p.first_offset..=p.last_offset {
                        println!("{offset}");
                    }
                }
                Ok::<usize, CliError>(n)
            }
        };
        match &args.message {
            Some(value) => sent += send(vec![message(&args, value.clone())]).await?,
            None => {
                let stdin = std::io::stdin();
                let mut batch = Vec::with_capacity(BATCH);
                for line in stdin.lock().lines() {
                    let line =
                        line.map_err(|e| CliError::runtime(format!("reading stdin: {e}")))?;
                    batch.push(message(&args, line));
                    if batch.len() == BATCH {
                        sent += send(std::mem::take(&mut batch)).await?;
                    }
                }
                if !batch.is_empty() {
                    sent += send(batch).await?;
                }
            }
        }
        if sent == 0 {
            return Err(CliError::runtime(
                "nothing to produce: stdin was empty (give MESSAGE or pipe lines in)",
            ));
        }
        Ok(())
    })
}
