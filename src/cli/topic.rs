//! `spool topic`: create, list, describe and delete topics.

use super::common::{CliResult, Format, ServerArg, block_on, connect, print_table};
use clap::{Args, Subcommand, ValueEnum};
use spool::protocol::pb;
use spool::storage::FsyncPolicy;

/// `spool topic` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic; unset settings take the broker's defaults.
    Create(Box<CreateArgs>),
    /// List topics.
    List(ListArgs),
    /// Show one topic's settings and extent.
    Describe(NameArgs),
    /// Delete a topic and all its messages and groups.
    Delete(NameArgs),
}

/// Cleanup policies on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CleanupArg {
    /// Retention drops old segments; compaction reclaims deleted records.
    Delete,
    /// Compaction also keeps only the latest record per key.
    Compact,
}

/// Arguments of `spool topic create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Topic name: 1 to 200 of A-Z a-z 0-9 . _ -
    name: String,
    /// Segment size in bytes (default 128 MiB).
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Roll to a new segment once the active one is this old, in
    /// milliseconds, so retention can drop a quiet topic's data in time.
    #[arg(long)]
    segment_ms: Option<u64>,
    /// Drop whole old segments beyond this many bytes.
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Drop whole segments whose newest message is older than this (ms).
    #[arg(long)]
    retention_ms: Option<u64>,
    /// always (durable acks), interval:MS or never.
    #[arg(long)]
    fsync: Option<FsyncPolicy>,
    /// delete or compact (keep the latest record per key).
    #[arg(long, value_enum)]
    cleanup: Option<CleanupArg>,
    /// Queue-style: delete a message once every group has completed it.
    #[arg(long)]
    delete_when_consumed: bool,
    /// Deliveries before a queue group dead-letters a message (default 10).
    #[arg(long)]
    max_deliveries: Option<u32>,
    /// Dead-letter topic (default <topic>.dlq).
    #[arg(long)]
    dead_letter: Option<String>,
    /// Lease of a queue delivery in milliseconds (default 30000).
    #[arg(long)]
    ack_timeout_ms: Option<u64>,
    /// How long compaction keeps a tombstone, in milliseconds (default 86400000).
    #[arg(long)]
    delete_retention_ms: Option<u64>,
    /// Compact in the background once this share (0 < R ≤ 1) of the sealed
    /// bytes is removable (default: only `spool compact` compacts).
    #[arg(long, value_name = "R")]
    compact_min_dirty_ratio: Option<f64>,
    /// How often background compaction measures, in milliseconds (default 60000).
    #[arg(long)]
    compact_check_ms: Option<u64>,
    /// Retention keeps segments holding messages some group has not
    /// completed, until they are twice --retention-ms old or the topic is
    /// over --retention-bytes-max.
    #[arg(long)]
    retention_respects_groups: bool,
    /// Hard size limit, in bytes: while the topic is over it, its oldest
    /// sealed segments go, whatever the groups need.
    #[arg(long)]
    retention_bytes_max: Option<u64>,
    /// Delete the topic once nobody wrote to or read it for this long and
    /// it has no group (short-lived rooms), in milliseconds.
    #[arg(long)]
    delete_when_idle_ms: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

/// Arguments of `spool topic list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

/// A topic name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Topic name.
    name: String,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

/// JSON form of a topic.
pub fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    let c = t.config.clone().unwrap_or_default();
    serde_json::json!({
        "name": t.name,
        "start_offset": t.start_offset,
        "end_offset": t.end_offset,
        "durable_end_offset": t.durable_end_offset,
        "segments": t.segments,
        "bytes": t.bytes,
        "max_message_bytes": t.max_message_bytes,
        "config": {
            "segment_bytes": c.segment_bytes,
            "segment_ms": c.segment_ms,
            "retention_bytes": c.retention_bytes,
            "retention_ms": c.retention_ms,
            "fsync": c.fsync,
            "cleanup": c.cleanup,
            "delete_when_consumed": c.delete_when_consumed,
            "dead_letter": c.dead_letter,
            "max_deliveries": c.max_deliveries,
            "ack_timeout_ms": c.ack_timeout_ms,
            "delete_retention_ms": c.delete_retention_ms,
            "retention_respects_groups": c.retention_respects_groups,
            "retention_bytes_max": c.retention_bytes_max,
            "delete_when_idle_ms": c.delete_when_idle_ms,
            "compact_min_dirty_ratio": c.compact_min_dirty_ratio,
            "compact_check_ms": c.compact_check_ms,
        },
    })
}

fn describe_text(t: &pb::TopicInfo) {
    let c = t.config.clone().unwrap_or_default();
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let rows = vec![
        vec!["name".into(), t.name.clone()],
        vec![
            "offsets".into(),
            format!(
                "{}..{} (durable up to {})",
                t.start_offset, t.end_offset, t.durable_end_offset
            ),
        ],
        vec!["segments".into(), t.segments.to_string()],
        vec!["bytes".into(), t.bytes.to_string()],
        vec!["fsync".into(), c.fsync.unwrap_or_default()],
        vec!["cleanup".into(), c.cleanup.unwrap_or_default()],
        vec![
            "delete_when_consumed".into(),
            c.delete_when_consumed.unwrap_or(false).to_string(),
        ],
        vec!["segment_bytes".into(), opt(c.segment_bytes)],
        vec!["segment_ms".into(), opt(c.segment_ms)],
        vec!["max_message_bytes".into(), t.max_message_bytes.to_string()],
        vec!["retention_bytes".into(), opt(c.retention_bytes)],
        vec!["retention_ms".into(), opt(c.retention_ms)],
        vec![
            "max_deliveries".into(),
            c.max_deliveries
                .map_or_else(|| "-".into(), |v| v.to_string()),
        ],
        vec![
            "dead_letter".into(),
            c.dead_letter.unwrap_or_else(|| format!("{}.dlq", t.name)),
        ],
        vec!["ack_timeout_ms".into(), opt(c.ack_timeout_ms)],
        vec!["delete_retention_ms".into(), opt(c.delete_retention_ms)],
        vec![
            "retention_respects_groups".into(),
            c.retention_respects_groups.unwrap_or(false).to_string(),
        ],
        vec!["retention_bytes_max".into(), opt(c.retention_bytes_max)],
        vec!["delete_when_idle_ms".into(), opt(c.delete_when_idle_ms)],
        vec![
            "compact_min_dirty_ratio".into(),
            c.compact_min_dirty_ratio
                .map_or_else(|| "- (off)".into(), |r| r.to_string()),
        ],
        vec!["compact_check_ms".into(), opt(c.compact_check_ms)],
    ];
    print_table(&["setting", "value"], &rows);
}

/// Runs a `spool topic` subcommand.
pub fn run(cmd: TopicCommand) -> CliResult {
    block_on(async {
        match cmd {
            TopicCommand::Create(a) => {
                let client = connect(&a.server).await?;
                let config = pb::TopicConfig {
                    segment_bytes: a.segment_bytes,
                    segment_ms: a.segment_ms,
                    retention_bytes: a.retention_bytes,
                    retention_ms: a.retention_ms,
                    fsync: a.fsync.map(|f| f.to_string()),
                    cleanup: a.cleanup.map(|c| match c {
                        CleanupArg::Delete => "delete".to_string(),
                        CleanupArg::Compact => "compact".to_string(),
                    }),
                    delete_when_consumed: a.delete_when_consumed.then_some(true),
                    dead_letter: a.dead_letter,
                    max_deliveries: a.max_deliveries,
                    ack_timeout_ms: a.ack_timeout_ms,
                    delete_retention_ms: a.delete_retention_ms,
                    retention_respects_groups: a.retention_respects_groups.then_some(true),
                    retention_bytes_max: a.retention_bytes_max,
                    delete_when_idle_ms: a.delete_when_idle_ms,
                    compact_min_dirty_ratio: a.compact_min_dirty_ratio,
                    compact_check_ms: a.compact_check_ms,
                };
                let t = client.create_topic(&a.name, config).await?;
                match a.format {
                    Format::Json => outln!("{}", topic_json(&t)),
                    Format::Text => outln!("created topic {}", t.name),
                }
            }
            TopicCommand::List(a) => {
                let client = connect(&a.server).await?;
                let topics = client.list_topics().await?;
                match a.format {
                    Format::Json => {
                        outln!(
                            "{}",
                            serde_json::Value::Array(topics.iter().map(topic_json).collect())
                        )
                    }
                    Format::Text => {
                        let rows: Vec<Vec<String>> = topics
                            .iter()
                            .map(|t| {
                                vec![
                                    t.name.clone(),
                                    t.start_offset.to_string(),
                                    t.end_offset.to_string(),
                                    t.segments.to_string(),
                                    t.bytes.to_string(),
                                ]
                            })
                            .collect();
                        print_table(&["TOPIC", "START", "END", "SEGMENTS", "BYTES"], &rows);
                    }
                }
            }
            TopicCommand::Describe(a) => {
                let client = connect(&a.server).await?;
                let t = client.describe_topic(&a.name).await?;
                match a.format {
                    Format::Json => outln!("{}", topic_json(&t)),
                    Format::Text => describe_text(&t),
                }
            }
            TopicCommand::Delete(a) => {
                let client = connect(&a.server).await?;
                client.delete_topic(&a.name).await?;
                match a.format {
                    Format::Json => {
                        outln!("{}", serde_json::json!({ "deleted": { "topic": a.name } }))
                    }
                    Format::Text => outln!("deleted topic {}", a.name),
                }
            }
        }
        Ok(())
    })
}
