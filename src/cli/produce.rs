//! `spool produce`: append MESSAGE, or one message per line of stdin, and
//! return once the broker acknowledged them.

use super::common::{CliError, CliResult, ServerArg, block_on, connect, parse_header};
use clap::Args;
use spool::storage::NewMessage;
use std::io::{BufRead, Write};
use std::time::Duration;
use tokio::sync::mpsc;

/// Most lines sent per produce request when reading stdin (fewer when the
/// server takes fewer per request, or their frame would be too large).
const BATCH: usize = 1000;
/// Longest a line read from stdin waits for more to share its request:
/// lines that come steadily go out at least this often, not only once a
/// batch is full.
const LINGER: Duration = Duration::from_millis(100);
/// Room in a request's frame for everything but the messages' own bytes.
const ENVELOPE: usize = 64 * 1024;

/// The bytes `m` takes in a produce request's frame, roughly from above.
fn frame_bytes(m: &NewMessage) -> usize {
    let key = m.key.as_ref().map_or(0, |k| k.len() + 8);
    let headers: usize = m
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len() + 16)
        .sum();
    m.value.len() + key + headers + 32
}

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

fn message(args: &ProduceArgs, value: impl Into<bytes::Bytes>) -> NewMessage {
    let mut m = NewMessage::from_value(value);
    if let Some(key) = &args.key {
        m = m.with_key(key.clone());
    }
    for (name, value) in &args.headers {
        m = m.with_header(name.clone(), value.clone());
    }
    m
}

/// The lines of stdin as bytes (any bytes: a value need not be UTF-8),
/// without their `\n` or `\r\n`, read on a thread of their own: the
/// runtime goes on (the connection keeps pinging while stdin is quiet), and
/// the command ends, with its error if a send fails, without waiting for
/// more input.
fn stdin_lines() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(BATCH);
    let failed = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            loop {
                let mut line = Vec::new();
                let read = match stdin.read_until(b'\n', &mut line) {
                    Ok(0) => return,
                    Ok(_) => {
                        if line.ends_with(b"\n") {
                            line.pop();
                            if line.ends_with(b"\r") {
                                line.pop();
                            }
                        }
                        Ok(line)
                    }
                    Err(e) => Err(e),
                };
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // Said as a failed read of stdin, which ends the command.
        let _ = failed.try_send(Err(std::io::Error::new(
            e.kind(),
            format!("could not start the thread that reads it: {e}"),
        )));
    }
    rx
}

/// Runs the command.
pub fn run(args: ProduceArgs) -> CliResult {
    block_on(async {
        let client = connect(&args.server).await?;
        let mut sent = 0usize;
        // Offsets acknowledged so far, for the error of a run that stops
        // part-way (what a retry would store again).
        let acked = std::cell::Cell::new(None::<(u64, u64, usize)>);
        let send = |batch: Vec<NewMessage>| {
            let client = &client;
            let topic = args.topic.clone();
            let print = args.print_offsets;
            let acked = &acked;
            let from_stdin = args.message.is_none();
            async move {
                let n = batch.len();
                let lines_before = acked.get().map_or(0, |(_, _, count)| count);
                let p = match client.produce(&topic, batch).await {
                    Ok(p) => p,
                    Err(e) if from_stdin => return Err(with_line(e.into(), lines_before, n)),
                    Err(e) => return Err(e.into()),
                };
                acked.set(Some(match acked.get() {
                    Some((first, _, count)) => (first, p.last_offset, count + n),
                    None => (p.first_offset, p.last_offset, n),
                }));
                if print {
                    let mut out = std::io::stdout().lock();
                    for offset in p.first_offset..=p.last_offset {
                        writeln!(out, "{offset}")
                            .map_err(|e| CliError::runtime(format!("writing stdout: {e}")))?;
                    }
                    out.flush()
                        .map_err(|e| CliError::runtime(format!("writing stdout: {e}")))?;
                }
                Ok::<usize, CliError>(n)
            }
        };
        let sending = async {
            match &args.message {
                Some(value) => sent += send(vec![message(&args, value.clone())]).await?,
                None => {
                    let welcome = client.welcome();
                    let most = BATCH.min(welcome.max_batch_messages.max(1) as usize);
                    let budget = (welcome.max_frame_bytes as usize)
                        .saturating_sub(ENVELOPE)
                        .max(1);
                    let mut lines = stdin_lines();
                    let mut batch = Vec::new();
                    let mut bytes = 0usize;
                    let mut line_number = 0u64;
                    // When the batch's first line has waited LINGER.
                    let mut due = tokio::time::Instant::now();
                    loop {
                        let line = if batch.is_empty() {
                            lines.recv().await
                        } else {
                            match tokio::time::timeout_at(due, lines.recv()).await {
                                Ok(line) => line,
                                Err(_) => {
                                    // What was read goes out now.
                                    sent += send(std::mem::take(&mut batch)).await?;
                                    bytes = 0;
                                    continue;
                                }
                            }
                        };
                        let Some(line) = line else { break };
                        let line = match line {
                            Ok(line) => line,
                            Err(e) => {
                                // What was read before the error still goes.
                                if !batch.is_empty() {
                                    sent += send(std::mem::take(&mut batch)).await?;
                                }
                                return Err(CliError::runtime(format!("reading stdin: {e}")));
                            }
                        };
                        line_number += 1;
                        let m = message(&args, line);
                        // Named by its line here: the broker would name its
                        // place in a batch. (What was read before it goes.)
                        let payload = spool::storage::record::encoded_len(&m)
                            .map(|l| l - spool::storage::record::HEADER_LEN);
                        let most_bytes = welcome.max_message_bytes as usize;
                        // The frame's limit binds when the broker's
                        // message limit is what its frames carry.
                        let setting = if welcome.max_message_bytes
                            == welcome.max_frame_bytes.saturating_sub(1024)
                        {
                            "max_frame_bytes less 1 KiB"
                        } else {
                            "max_message_bytes"
                        };
                        if payload.is_none_or(|p| p > most_bytes) {
                            if !batch.is_empty() {
                                sent += send(std::mem::take(&mut batch)).await?;
                            }
                            return Err(CliError::runtime(format!(
                                "line {line_number} of stdin has {} bytes of key, headers and value; \
                                 the broker takes at most {most_bytes} per message ({setting})",
                                payload.map_or_else(|| "over 4 GiB".to_owned(), |p| p.to_string())
                            )));
                        }
                        let size = frame_bytes(&m);
                        if !batch.is_empty() && (batch.len() == most || bytes + size > budget) {
                            sent += send(std::mem::take(&mut batch)).await?;
                            bytes = 0;
                        }
                        bytes += size;
                        if batch.is_empty() {
                            due = tokio::time::Instant::now() + LINGER;
                        }
                        batch.push(m);
                    }
                    if !batch.is_empty() {
                        sent += send(batch).await?;
                    }
                }
            }
            Ok::<(), CliError>(())
        };
        if let Err(e) = sending.await {
            return Err(match acked.get() {
                Some((first, _, 1)) => e.and(format!(
                    "1 message was acknowledged before it, at offset {first} \
                     (a retry of the same input stores it again)"
                )),
                Some((first, last, n)) => e.and(format!(
                    "{n} messages were acknowledged before it, the first at offset {first}, \
                     the last at {last} (a retry of the same input stores them again)"
                )),
                None if args.message.is_none() => e.and("no message was acknowledged before it"),
                None => e,
            });
        }
        if sent == 0 {
            return Err(CliError::runtime(
                "nothing to produce: stdin was empty (give MESSAGE or pipe lines in)",
            ));
        }
        Ok(())
    })
}

/// `e` with the stdin line it names, when it names a message of a batch
/// ("message 500 has ...": a topic's own limit) of `n` lines whose first
/// came after `lines_before` lines, and that the batch's other lines were
/// not stored either (the broker refuses a batch whole).
fn with_line(e: CliError, lines_before: usize, n: usize) -> CliError {
    let text = e.to_string();
    let Some(at) = text.find(": message ").map(|i| i + ": message ".len()) else {
        return e;
    };
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    match digits.parse::<usize>() {
        Ok(i) if n > 1 => e.and(format!(
            "that is line {} of stdin; the request it was in, lines {} to {}, was refused whole: \
             none of them was stored",
            lines_before + i + 1,
            lines_before + 1,
            lines_before + n
        )),
        Ok(i) => e.and(format!("that is line {} of stdin", lines_before + i + 1)),
        Err(_) => e,
    }
}
