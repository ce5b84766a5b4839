//! `spool verify --data DIR`: offline check of every segment, index and
//! journal. Exit 0 when clean, 1 when damage was found (or the directory is
//! in use by a broker). Notes (what the next start rebuilds by itself) do
//! not fail the check unless `--strict`.

use super::common::{CliError, CliResult, Format};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use spool::storage::DataDir;
use spool::storage::io::OsStorage;
use spool::storage::verify::{self, Finding};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `spool verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Data directory to check (the broker must be stopped).
    #[arg(long)]
    data: PathBuf,
    /// text, or one JSON report.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Fail (exit 1) on notes too: indexes the next start rebuilds,
    /// interrupted compactions it completes.
    #[arg(long)]
    strict: bool,
}

fn describe(f: &Finding) -> String {
    let offsets = f
        .offsets
        .as_ref()
        .filter(|o| !o.is_empty())
        .map_or_else(String::new, |o| format!(" offsets {}..{}", o.start, o.end));
    format!(
        "{} bytes {}..{}{offsets}: {}",
        f.file.display(),
        f.bytes.start,
        f.bytes.end,
        f.detail
    )
}

/// Runs the command.
pub fn run(args: VerifyArgs) -> CliResult {
    let storage = Arc::new(OsStorage);
    super::common::existing_data_dir(&args.data)?;
    let data = DataDir::open_to_read(storage.clone(), &args.data).map_err(|e| match e {
        spool::Error::Locked { .. } => {
            CliError::runtime(format!("{e}; stop the broker before verifying"))
        }
        other => other.into(),
    })?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(verify::bytes_to_check(&*storage, &args.data));
        bar.set_style(
            ProgressStyle::with_template("verifying {bar:40} {bytes}/{total_bytes} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let report = verify::verify(&data, &mut |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match args.format {
        Format::Json => {
            let json = serde_json::to_string(&report)
                .map_err(|e| CliError::runtime(format!("encoding the report: {e}")))?;
            outln!("{json}");
        }
        Format::Text => {
            outln!(
                "checked {} topics, {} files, {} bytes, {} offsets, {} journal entries",
                report.topics,
                report.files,
                report.bytes,
                report.offsets,
                report.journal_entries
            );
            for t in &report.torn_tails {
                outln!(
                    "torn tail (unacknowledged; cut at the next start): {}",
                    describe(t)
                );
            }
            for n in &report.notes {
                outln!("note (the next start repairs it): {}", describe(n));
            }
            for d in &report.damage {
                outln!("DAMAGE: {}", describe(d));
            }
            if report.is_clean() {
                outln!("no damage found");
            }
        }
    }
    if !report.is_clean() {
        Err(CliError::runtime(format!(
            "{} damaged range(s) found in {}",
            report.damage.len(),
            args.data.display()
        )))
    } else if args.strict && !report.notes.is_empty() {
        Err(CliError::runtime(format!(
            "{} note(s) in {} (--strict)",
            report.notes.len(),
            args.data.display()
        )))
    } else {
        Ok(())
    }
}
