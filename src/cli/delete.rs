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
        // Each offset once, however often it was named.
        let offsets: std::collections::BTreeSet<u64> = args.offsets.iter().copied().collect();
        outln!(
            "deleted {} message(s) of topic {}",
            offsets.len(),
            args.topic
        );
        Ok(())
    })
}
