//! `spool compact [TOPIC]`: reclaim deleted, consumed and superseded records,
//! online through the broker, or offline with `--data DIR` (broker stopped).

use super::common::{CliError, CliResult, Format, ServerArg, block_on, connect, print_table};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use spool::broker::{Registry, RegistryOptions};
use spool::protocol::{convert, pb};
use spool::storage::DataDir;
use spool::storage::io::OsStorage;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `spool compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Topic to compact (all topics when omitted).
    topic: Option<String>,
    /// Compact offline in this data directory (the broker must be stopped);
    /// without it, the running broker compacts while it keeps serving.
    #[arg(long)]
    data: Option<PathBuf>,
    /// text, or one JSON array of per-topic reports.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    server: ServerArg,
}

fn bar(total: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(total) => {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("compacting {bar:40} {bytes}/{total_bytes} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            bar.set_message("compacting");
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        }
    };
    Some(bar)
}

fn offline(dir: &PathBuf, topic: Option<&str>) -> CliResult<Vec<pb::TopicCompaction>> {
    super::common::existing_data_dir(dir)?;
    let data = DataDir::open(Arc::new(OsStorage), dir).map_err(|e| match e {
        spool::Error::Locked { .. } => CliError::runtime(format!(
            "{e}; stop the broker, or run `spool compact` without --data to compact online"
        )),
        other => other.into(),
    })?;
    let registry = Registry::open(
        data,
        RegistryOptions {
            auto_create: false,
            // Compaction only: retention waits for the broker.
            upkeep: false,
            ..RegistryOptions::default()
        },
    )?;
    let total: u64 = registry
        .infos()
        .iter()
        .filter(|t| topic.is_none_or(|name| t.name == name))
        .map(|t| t.stats.bytes)
        .sum();
    let progress = bar(Some(total));
    let results = registry.compact(topic, &mut |bytes| {
        if let Some(p) = &progress {
            p.set_position(bytes);
        }
    });
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    // Compaction closed each topic cleanly after it; this records that. A
    // failed run records it too when the directory was stopped cleanly
    // before (opening it took the marker away): what failed, a topic that
    // does not exist or would not open, changed nothing.
    let stopped = if results.is_ok() || registry.clean_start() {
        registry.stop_all()
    } else {
        Ok(())
    };
    let results = results?;
    stopped?;
    Ok(results
        .iter()
        .map(|(t, s)| convert::compaction(t, s))
        .collect())
}

/// Runs the command.
pub fn run(args: CompactArgs) -> CliResult {
    let reports = match &args.data {
        // On a runtime only to catch SIGXFSZ: a copy that reaches a
        // file-size limit fails as on a full disk instead of ending the
        // command.
        Some(dir) => block_on(async {
            super::common::catch_file_size_signal();
            offline(dir, args.topic.as_deref())
        })?,
        None => block_on(async {
            let client = connect(&args.server).await?;
            let spinner = bar(None);
            let reports = client.compact(args.topic.as_deref()).await?;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            Ok(reports)
        })?,
    };
    match args.format {
        Format::Json => {
            let json: Vec<serde_json::Value> = reports
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "topic": r.topic,
                        "bytes_before": r.bytes_before,
                        "bytes_after": r.bytes_after,
                        "records_kept": r.records_kept,
                        "records_removed": r.records_removed,
                        "segments_rewritten": r.segments_rewritten,
                        "segments_deleted": r.segments_deleted,
                        "segments_merged": r.segments_merged,
                        "millis": r.millis,
                    })
                })
                .collect();
            outln!("{}", serde_json::Value::Array(json));
        }
        Format::Text => {
            let rows: Vec<Vec<String>> = reports
                .iter()
                .map(|r| {
                    vec![
                        r.topic.clone(),
                        r.bytes_before.to_string(),
                        r.bytes_after.to_string(),
                        r.records_kept.to_string(),
                        r.records_removed.to_string(),
                        r.segments_rewritten.to_string(),
                        r.segments_deleted.to_string(),
                        r.segments_merged.to_string(),
                        format!("{} ms", r.millis),
                    ]
                })
                .collect();
            print_table(
                &[
                    "TOPIC",
                    "BYTES BEFORE",
                    "BYTES AFTER",
                    "KEPT",
                    "REMOVED",
                    "REWRITTEN",
                    "DELETED",
                    "MERGED",
                    "TIME",
                ],
                &rows,
            );
        }
    }
    Ok(())
}
