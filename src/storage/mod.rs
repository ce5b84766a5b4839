//! The storage engine: segmented, checksummed, memory-mapped append-only logs.
//!
//! A [`Log`] is one topic's sequence of segments; [`DataDir`] holds the
//! exclusive lock on a data directory and finds the logs in it. All file access
//! goes through [`io::Storage`], so the same engine runs on the real disk and on
//! the simulated one the crash tests use.
//!
//! ```
//! use spool::storage::{DataDir, LogConfig, NewMessage, Offset, RecoveryMode};
//! use spool::storage::io::SimDisk;
//! use std::sync::Arc;
//!
//! let disk = Arc::new(SimDisk::new());
//! let data = DataDir::open(disk, "/data")?;
//! let log = data.open_log("orders", LogConfig::default(), RecoveryMode::default())?;
//! let appended = log.append(&[NewMessage::from_value("hello"), NewMessage::from_value("world")])?;
//! assert_eq!(appended.first, Offset(0));
//! let messages = log.read(Offset(1), 10, 1 << 20)?;
//! assert_eq!(&messages[0].value[..], b"world");
//! # Ok::<(), spool::Error>(())
//! ```

pub mod checkpoint;
pub mod compact;
pub mod config;
pub mod datadir;
pub mod index;
pub mod io;
pub mod log;
pub mod message;
pub mod record;
pub mod records;
pub mod recovery;
pub mod segment;
pub mod verify;

pub use config::{Durability, FsyncPolicy, LogConfig, RecoveryMode};
pub use datadir::DataDir;
pub use log::{Appended, Log, LogStats};
pub use message::{Header, Message, NewMessage, Offset};
pub use records::{Records, Shape};
pub use recovery::RecoveryReport;
