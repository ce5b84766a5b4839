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
/// How often, and how long each time, an open retries a lock that names its
/// own process (see [`DataDir::open`]).
const SELF_LOCK_RETRIES: u32 = 20;
const SELF_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(25);

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
        let own_pid = std::process::id().to_string();
        let owner = format!("{own_pid}\n");
        let mut attempts = 0;
        let lock = loop {
            match storage.lock(&root.join(LOCK_FILE), &owner) {
                Ok(lock) => break lock,
                // The lock names this very process after it let go: a child it
                // spawned meanwhile inherited the descriptor and holds the lock
                // until it execs. Wait for that, briefly; a real second opener
                // in this process still fails.
                Err(LockError::Held(pid)) if pid == own_pid && attempts < SELF_LOCK_RETRIES => {
                    attempts += 1;
                    std::thread::sleep(SELF_LOCK_WAIT);
                }
                Err(LockError::Held(pid)) => {
                    return Err(Error::Locked {
                        dir: root.clone(),
                        pid: if pid.is_empty() {
                            "unknown".into()
                        } else {
                            pid
                        },
                    });
                }
                Err(LockError::Io(e)) => {
                    return Err(Error::io(
                        format!("locking {}", root.join(LOCK_FILE).display()),
                        e,
                    ));
                }
            }
        };
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
