//! The broker core: topics with their groups and deletions, and the registry
//! that owns them in a data directory.

mod cleaner;
pub mod config;
pub mod deletions;
pub mod gate;
pub mod registry;
pub mod topic;

pub use config::{Cleanup, TopicConfig, validate_name};
pub use registry::{Registry, RegistryOptions};
pub use topic::{DeadLetter, Delivery, DeliveryLimits, GroupCommit, Position, QueueFetch, Topic};
