//! The broker core: the async [`Broker`] handle every transport calls, each
//! topic's runtime, subscriptions, what reads hand out, and underneath them topics with their
//! groups and deletions and the registry that owns them in a data directory.

mod cleaner;
pub mod config;
pub mod core;
pub mod deletions;
pub mod deliveries;
pub mod gate;
mod read_ahead;
pub mod registry;
pub mod runtime;
pub mod subscription;
pub mod topic;

pub use self::core::{
    Broker, BrokerConfig, DEFAULT_TOPIC_IDLE_CLOSE, FetchRequest, Fetched, MessageLimit,
    SubscribeRequest, TopicEvent, TopicInfo, default_max_open_files,
};
pub use config::{Cleanup, TopicConfig, validate_name};
pub use deliveries::{Deliveries, DeliveryRef};
pub use registry::{Registry, RegistryOptions};
pub use subscription::{Credit, Event, Subscription};
pub use topic::{
    DeadLetter, Delivery, DeliveryLimits, GroupCommit, Position, QueueFetch, ReadAhead, Topic,
};
