//! `spool group`: list, describe, move (seek) and delete consumer groups.

use super::common::{CliResult, Format, ServerArg, block_on, connect, parse_position, print_table};
use clap::{Args, Subcommand};
use spool::broker::topic::Position;
use spool::protocol::pb;

/// `spool group` subcommands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List the groups of a topic.
    List(ListArgs),
    /// Show one group: mode, committed offset, pending, lag, members.
    Describe(GroupArgs),
    /// Move a group: a stream group reads from there; a queue group treats
    /// everything before as done and everything from there as pending.
    Seek(SeekArgs),
    /// Delete a group and its state.
    Delete(GroupArgs),
}

/// Arguments of `spool group list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Topic.
    topic: String,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

/// A topic and a group.
#[derive(Debug, Args)]
pub struct GroupArgs {
    /// Topic.
    topic: String,
    /// Group.
    group: String,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

/// Arguments of `spool group seek`.
#[derive(Debug, Args)]
pub struct SeekArgs {
    /// Topic.
    topic: String,
    /// Group.
    group: String,
    /// earliest, latest, an offset, or @UNIX_MS.
    #[arg(long, value_parser = parse_position)]
    to: Position,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

fn mode_name(mode: i32) -> &'static str {
    match pb::GroupMode::try_from(mode) {
        Ok(pb::GroupMode::Stream) => "stream",
        Ok(pb::GroupMode::Queue) => "queue",
        _ => "unknown",
    }
}

fn group_json(g: &pb::GroupInfo) -> serde_json::Value {
    serde_json::json!({
        "topic": g.topic,
        "name": g.name,
        "mode": mode_name(g.mode),
        "committed": g.committed,
        "pending": g.pending,
        "lag": g.lag,
        "lost_to_retention": g.lost_to_retention,
        "members": g.members.iter().map(|m| serde_json::json!({"name": m.name, "last_seen_ms": m.last_seen_ms})).collect::<Vec<_>>(),
    })
}

fn group_row(g: &pb::GroupInfo) -> Vec<String> {
    vec![
        g.name.clone(),
        mode_name(g.mode).into(),
        g.committed.to_string(),
        g.pending.to_string(),
        g.lag.to_string(),
        g.lost_to_retention.to_string(),
        g.members.len().to_string(),
    ]
}

const COLUMNS: [&str; 7] = [
    "GROUP",
    "MODE",
    "COMMITTED",
    "PENDING",
    "LAG",
    "LOST",
    "MEMBERS",
];

/// Runs a `spool group` subcommand.
pub fn run(cmd: GroupCommand) -> CliResult {
    block_on(async {
        match cmd {
            GroupCommand::List(a) => {
                let client = connect(&a.server).await?;
                let groups = client.list_groups(&a.topic).await?;
                match a.format {
                    Format::Json => {
                        outln!(
                            "{}",
                            serde_json::Value::Array(groups.iter().map(group_json).collect())
                        )
                    }
                    Format::Text => {
                        print_table(&COLUMNS, &groups.iter().map(group_row).collect::<Vec<_>>())
                    }
                }
            }
            GroupCommand::Describe(a) => {
                let client = connect(&a.server).await?;
                let g = client.describe_group(&a.topic, &a.group).await?;
                match a.format {
                    Format::Json => outln!("{}", group_json(&g)),
                    Format::Text => {
                        print_table(&COLUMNS, &[group_row(&g)]);
                        for m in &g.members {
                            outln!("member {} last seen at {} ms", m.name, m.last_seen_ms);
                        }
                    }
                }
            }
            GroupCommand::Seek(a) => {
                let client = connect(&a.server).await?;
                let offset = client.seek(&a.topic, &a.group, a.to).await?;
                match a.format {
                    Format::Json => outln!("{}", serde_json::json!({ "offset": offset })),
                    Format::Text => outln!(
                        "group {} of topic {} now at offset {offset}",
                        a.group,
                        a.topic
                    ),
                }
            }
            GroupCommand::Delete(a) => {
                let client = connect(&a.server).await?;
                client.delete_group(&a.topic, &a.group).await?;
                match a.format {
                    Format::Json => outln!(
                        "{}",
                        serde_json::json!({ "deleted": { "topic": a.topic, "group": a.group } })
                    ),
                    Format::Text => outln!("deleted group {} of topic {}", a.group, a.topic),
                }
            }
        }
        Ok(())
    })
}
