//! Consumer groups: durable per-group progress (committed offsets for stream
//! groups, completed offsets for queue groups), leases, redelivery and dead
//! letters, and the topic's explicit deletions.

pub mod journal;
pub mod ranges;

pub use journal::{Journal, JournalRecovery, JournalSyncer, SyncWait};
pub use ranges::RangeSet;
pub mod state;

pub use state::{Decision, Group, GroupConfig, GroupInfo, GroupMode, SNAPSHOT_EVERY};
