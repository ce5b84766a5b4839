//! A data directory: the exclusive `LOCK` that lets one broker (or offline
//! tool) use it at a time, and the `topics/<name>/` folders holding the logs.

use super::config::{LogConfig, RecoveryMode};
use super::io::{LockError, LockGuard, Storage};
use super::log::Log;
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the lock file at the root of a data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Folder of the topic logs.
pub const TOPICS_DIR: &str = "topics";

/// An open, locked data directory. The lock is released when this is dropped,
/// or by the kernel if the process dies.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    storage: Arc<dyn Storage>,
    _lock: Box<dyn LockGuard>,
}

impl DataDir {
    /// Creates `root` if needed and takes its lock. A second opener gets
    /// [`Error::Locked`] naming the pid that holds it.
    pub fn open(storage: Arc<dyn Storage>, root: impl Into<PathBuf>) -> Result<DataDir> {
        let root = root.into();
        storage
            .create_dir_all(&root.join(TOPICS_DIR))
            .ctx(|| format!("creating data directory {}", root.display()))?;
        let owner = format!("{}\n", std::process::id());
        let lock = storage
            .lock(&root.join(LOCK_FILE), &owner)
            .map_err(|e| match e {
                LockError::Held(pid) => Error::Locked {
                    dir: root.clone(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                },
                LockError::Io(e) => {
                    Error::io(format!("locking {}", root.join(LOCK_FILE).display()), e)
                }
            })?;
        Ok(DataDir {
            root,
            storage,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file access backend.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Folder of a topic's log.
    pub fn topic_dir(&self, topic: &str) -> PathBuf {
        self.root.join(TOPICS_DIR).join(topic)
    }

    /// Names of the topics on disk, sorted.
    pub fn topics(&self) -> Result<Vec<String>> {
        let dir = self.root.join(TOPICS_DIR);
        let mut names = self
            .storage
            .list_dir(&dir)
            .ctx(|| format!("listing {}", dir.display()))?;
        names.sort();
        Ok(names)
    }

    /// Opens (creating if needed) the log of `topic`.
    pub fn open_log(&self, topic: &str, config: LogConfig, mode: RecoveryMode) -> Result<Log> {
        Log::open(
            Arc::clone(&self.storage),
            self.topic_dir(topic),
            config,
            mode,
        )
    }
}
