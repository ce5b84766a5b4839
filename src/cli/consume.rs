//! `spool consume`: print messages — a replay from a position, or the next
//! messages of a stream group (committing what was printed) or a queue group
//! (acknowledging what was printed).

use super::common::{CliError, CliResult, Format, ServerArg, block_on, connect, parse_position};
use base64::Engine;
use clap::{Args, ValueEnum};
use spool::broker::topic::Position;
use spool::client::{Client, ClientError, FetchOptions, Received};
use spool::groups::GroupMode;
use spool::protocol::pb;
use std::io::Write;

/// Longest wait of one long-poll with --follow.
const FOLLOW_WAIT_MS: u32 = 30_000;

/// Group modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Ordered reading from the group's committed offset; commits what was printed.
    Stream,
    /// Competing consumers; acknowledges what was printed.
    Queue,
}

/// Arguments of `spool consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Where to start a replay, or where a new group starts: earliest, latest,
    /// an offset (one past the end starts at the end, so with --follow the
    /// next message written is printed, whatever its offset), or @UNIX_MS
    /// (first message at or after that time).
    #[arg(long, value_parser = parse_position)]
    from: Option<Position>,
    /// Read as this consumer group (created if missing; that needs `admin` on the topic under --auth).
    #[arg(long)]
    group: Option<String>,
    /// Kind of group.
    #[arg(long, value_enum, default_value = "stream", requires = "group")]
    mode: Mode,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Keep waiting for new messages instead of exiting once caught up.
    #[arg(long)]
    follow: bool,
    /// text: the value of each message per line; json: one object per line.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Queue groups: do not acknowledge (messages come back after their lease).
    #[arg(long, requires = "group")]
    no_ack: bool,
    /// Member name within the group.
    #[arg(long, default_value = "spool-cli")]
    member: String,
    #[command(flatten)]
    server: ServerArg,
}

/// Runs the command.
pub fn run(args: ConsumeArgs) -> CliResult {
    if args.no_ack && args.mode != Mode::Queue {
        return Err(CliError::usage(
            "--no-ack applies to queue groups only (--mode queue); a stream group's reader commits what it printed",
        ));
    }
    let stdout = std::io::stdout();
    block_on(async {
        let client = connect(&args.server).await?;
        let (mut checked, create_refused) = match &args.group {
            Some(group) => ensure_group(&client, &args, group).await?,
            None => (true, None),
        };
        let mut printed = 0u64;
        // Where this run last committed a stream group, if it did.
        let mut committed: Option<u64> = None;
        let mut position = match (&args.group, args.mode) {
            (None, _) => Some(args.from.unwrap_or(Position::Earliest)),
            // A stream group reads from its committed offset; this reader then
            // keeps its own position.
            (Some(_), Mode::Stream) => None,
            (Some(_), Mode::Queue) => None,
        };
        loop {
            let want =
                args.count
                    .map_or(1000, |c| c.saturating_sub(printed).min(1000)) as u32;
            if want == 0 {
                return Ok(());
            }
            let options = FetchOptions {
                group: args.group.clone(),
                member: args.member.clone(),
                from: position,
                max_messages: want,
                max_bytes: 0,
                wait_ms: if args.follow { FOLLOW_WAIT_MS } else { 0 },
            };
            let fetched = match client.fetch(&args.topic, options).await {
                Ok(fetched) => fetched,
                // The group is missing and this token could not create it:
                // say both.
                Err(ClientError::Status {
                    code: pb::Code::NotFound,
                    message,
                }) if create_refused.is_some() && message.starts_with("group ") => {
                    return Err(CliError::runtime(format!(
                        "{message} (NotFound), and creating it was refused: {} (PermissionDenied)",
                        create_refused.as_deref().unwrap_or_default()
                    )));
                }
                // A stored message no frame can carry (stored under a larger
                // `max_frame_bytes`): a follower says so and goes on after it,
                // as a subscription does; a single read stops, saying how to
                // go past it.
                Err(e) if args.group.is_none() || args.mode == Mode::Stream => {
                    let Some(offset) = e.undeliverable_offset() else {
                        return Err(e.into());
                    };
                    let past = offset.saturating_add(1);
                    if !args.follow {
                        let how = match &args.group {
                            Some(group) => format!(
                                "`spool group seek {} {group} --to {past}` moves the group past it",
                                args.topic
                            ),
                            None => format!("--from {past} reads on past it"),
                        };
                        return Err(
                            CliError::from(e).and(format!("printed {printed} message(s); {how}"))
                        );
                    }
                    errln!("spool: skipped: {e}");
                    position = Some(Position::Offset(past));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if fetched.messages.is_empty() {
                if !args.follow {
                    // A replay asked past the end: said, so an empty output
                    // is not taken for an empty topic.
                    if let (None, Some(Position::Offset(from))) = (&args.group, args.from)
                        && printed == 0
                        && from > fetched.end_offset
                    {
                        errln!(
                            "spool: --from {from} is past the end of topic {} (its next offset is \
                             {}): nothing to print",
                            args.topic,
                            fetched.end_offset
                        );
                    }
                    return Ok(());
                }
                // Waits on from where this one looked (`latest` resolved
                // again would skip what came in between), except a queue
                // group, which leases whatever is next.
                if args.group.is_none() || args.mode == Mode::Stream {
                    position = Some(Position::Offset(fetched.next_offset));
                }
                continue;
            }
            if !checked {
                // The group's mode could not be asked (no admin permission):
                // a queue group's deliveries count, a stream group's do not.
                // On a mismatch nothing is printed, acked or committed.
                let queue = fetched.messages.iter().any(|r| r.delivery > 0);
                let group = args.group.as_deref().unwrap_or_default();
                if queue != (args.mode == Mode::Queue) {
                    if queue {
                        // Leased by the fetch: back to the group at once.
                        let offsets: Vec<u64> = fetched
                            .messages
                            .iter()
                            .map(|r| r.message.offset.0)
                            .collect();
                        client.nack(&args.topic, group, &offsets, 0, None).await?;
                    }
                    return Err(mode_mismatch(&args, group));
                }
                checked = true;
            }
            // A group's reader writes each message out on its own, so that
            // when stdout fails (a closed pipe) exactly what it took is
            // acknowledged or committed.
            let mut out = stdout.lock();
            let mut taken = 0;
            let mut failed = None;
            for r in &fetched.messages {
                let wrote = print_message(&mut out, r, args.format).and_then(|()| {
                    if args.group.is_some() {
                        out.flush()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = wrote {
                    failed = Some(e);
                    break;
                }
                taken += 1;
            }
            if failed.is_none()
                && let Err(e) = out.flush()
            {
                failed = Some(e);
            }
            drop(out);
            let all = failed.is_none();
            let taken = &fetched.messages[..taken];
            printed += taken.len() as u64;
            let offsets: Vec<u64> = taken.iter().map(|r| r.message.offset.0).collect();
            let done = match (&args.group, args.mode) {
                (Some(group), Mode::Queue) if !args.no_ack => {
                    if let (Some(first), Some(last)) = (offsets.first(), offsets.last()) {
                        client
                            .ack(&args.topic, group, &offsets, None)
                            .await
                            .map_err(|e| {
                                let (are, delivers) = if outcome_unknown(&e) {
                                    ("may not be", "may deliver")
                                } else {
                                    ("are not", "delivers")
                                };
                                CliError::from(e).and(format!(
                                    "acknowledged the {} message(s) printed before; the last {} printed (the first at offset {first}, the last at {last}) {are} acknowledged: the group, if it still exists, {delivers} them again",
                                    printed - offsets.len() as u64,
                                    offsets.len()
                                ))
                            })?;
                    }
                    // What stdout did not take goes back at once.
                    let rest: Vec<u64> = fetched.messages[offsets.len()..]
                        .iter()
                        .map(|r| r.message.offset.0)
                        .collect();
                    if !rest.is_empty() {
                        client.nack(&args.topic, group, &rest, 0, None).await?;
                    }
                    format!("acknowledged the {printed} message(s) it printed")
                }
                (Some(group), Mode::Stream) => {
                    // All of them: past deleted offsets too.
                    let next = match (all, offsets.last()) {
                        (true, _) => Some(fetched.next_offset),
                        (false, Some(last)) => Some(last + 1),
                        (false, None) => None,
                    };
                    if let Some(next) = next {
                        client.commit(&args.topic, group, next).await.map_err(|e| {
                            let (was, gives) = if outcome_unknown(&e) {
                                ("may not have been", "may give")
                            } else {
                                ("was not", "gives")
                            };
                            let at = match committed {
                                Some(at) => format!(
                                    "{was} committed past offset {at}: the group, if it still exists, {gives} what was printed after it again"
                                ),
                                None => format!("{was} committed: the group, if it still exists, {gives} what was printed again"),
                            };
                            CliError::from(e).and(format!("group {group} {at}"))
                        })?;
                        position = Some(Position::Offset(next));
                        committed = Some(next);
                    }
                    match committed {
                        Some(at) => format!("committed group {group} at offset {at}"),
                        None => format!("group {group} left where it was"),
                    }
                }
                (None, _) => {
                    position = Some(Position::Offset(fetched.next_offset));
                    format!("printed {printed} message(s)")
                }
                _ => format!("printed {printed} message(s), acknowledging none (--no-ack)"),
            };
            if let Some(e) = failed {
                return Err(CliError::runtime(format!("writing stdout: {e}; {done}")));
            }
        }
    })
}

/// Creates the group if it is missing; whether its mode is known to be the
/// one asked for, and the refusal of its creation, if any. A token that may
/// consume the topic but not administer it can neither create nor describe
/// the group: the group must exist, and its mode is checked on the first
/// messages instead.
async fn ensure_group(
    client: &Client,
    args: &ConsumeArgs,
    group: &str,
) -> CliResult<(bool, Option<String>)> {
    let mode = match args.mode {
        Mode::Stream => GroupMode::Stream,
        Mode::Queue => GroupMode::Queue,
    };
    let start = args.from.or(Some(Position::Earliest));
    match client.create_group(&args.topic, group, mode, start).await {
        Ok(_) => Ok((true, None)),
        Err(ClientError::Status {
            code: pb::Code::AlreadyExists,
            ..
        }) => {
            let info = match client.describe_group(&args.topic, group).await {
                Ok(info) => info,
                Err(ClientError::Status {
                    code: pb::Code::PermissionDenied,
                    ..
                }) => return Ok((false, None)),
                Err(e) => return Err(e.into()),
            };
            let wanted = spool::protocol::convert::group_mode_to_wire(mode);
            if info.mode != wanted {
                return Err(mode_mismatch(args, group));
            }
            if args.from.is_some() {
                // Said, so a reader does not take it for a replay.
                let at = match args.mode {
                    Mode::Stream => "committed offset",
                    Mode::Queue => "low watermark",
                };
                errln!(
                    "spool: group {group} exists and reads on from where it is ({at} {}); \
                     --from sets where a new group starts (to move this one: spool group seek \
                     {} {group} --to ...)",
                    info.committed,
                    args.topic
                );
            }
            Ok((true, None))
        }
        Err(ClientError::Status {
            code: pb::Code::PermissionDenied,
            message,
        }) => Ok((false, Some(message))),
        Err(e) => Err(e.into()),
    }
}

fn mode_mismatch(args: &ConsumeArgs, group: &str) -> CliError {
    let (asked, other) = match args.mode {
        Mode::Stream => ("stream", "queue"),
        Mode::Queue => ("queue", "stream"),
    };
    CliError::runtime(format!(
        "group {group} of topic {} is a {other} group, not a {asked} group; \
         read it with --mode {other}, or use another group name",
        args.topic
    ))
}

fn print_message(out: &mut impl Write, r: &Received, format: Format) -> std::io::Result<()> {
    let m = &r.message;
    match format {
        Format::Text => {
            out.write_all(&m.value)?;
            out.write_all(b"\n")
        }
        Format::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("offset".into(), m.offset.0.into());
            obj.insert("timestamp_ms".into(), m.timestamp_ms.into());
            obj.insert(
                "key".into(),
                m.key
                    .as_ref()
                    .map_or(serde_json::Value::Null, |k| text_or_base64(k)),
            );
            let headers: Vec<serde_json::Value> = m
                .headers
                .iter()
                .map(|h| serde_json::json!({ "name": h.name, "value": text_or_base64(&h.value) }))
                .collect();
            obj.insert("headers".into(), headers.into());
            match std::str::from_utf8(&m.value) {
                Ok(text) => obj.insert("value".into(), text.into()),
                Err(_) => obj.insert(
                    "value_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&m.value)
                        .into(),
                ),
            };
            if r.delivery > 0 {
                obj.insert("delivery".into(), r.delivery.into());
            }
            serde_json::to_writer(&mut *out, &serde_json::Value::Object(obj))?;
            out.write_all(b"\n")
        }
    }
}

/// UTF-8 text as a string, anything else as `{"base64": ...}`.
fn text_or_base64(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.into(),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
    }
}

/// Whether a failed ack or commit may still have taken effect: the
/// connection ended before the answer, or the broker wrote it and then
/// failed to sync it (`UNAVAILABLE`, its log turned read-only), ran out of
/// time or failed inside. Any other answer refused it.
fn outcome_unknown(e: &ClientError) -> bool {
    match e.code() {
        None => true,
        Some(code) => matches!(
            code,
            pb::Code::Unavailable | pb::Code::DeadlineExceeded | pb::Code::Internal
        ),
    }
}
