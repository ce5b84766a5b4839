//! `spool delete`: delete messages by offset.

use super::common::{CliResult, ServerArg, block_on, connect};
use clap::Args;

/// Arguments of `spool delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Topic.
    topic: String,
    /// Offsets to delete.
    #[arg(required = true)]
    offsets: Vec<u64>,
    #[command(flatten)]
    server: ServerArg,
}

/// Runs the command.
pub fn run(args: DeleteArgs) -> CliResult {
    block_on(async {
        let client = connect(&args.server).await?;
        client.delete(&args.topic, &args.offsets).await?;
        // Each offset once, however often it was named; one deleted before
        // is deleted still (a delete is idempotent).
        let offsets: std::collections::BTreeSet<u64> = args.offsets.iter().copied().collect();
        outln!(
            "{} offset(s) of topic {} now deleted",
            offsets.len(),
            args.topic
        );
        Ok(())
    })
}
