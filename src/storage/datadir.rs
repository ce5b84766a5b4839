//! A data directory: the exclusive `LOCK` that lets one broker (or offline
//! tool) use it at a time, the `topics/<name>/` folders holding the logs, and
//! the `staging/` and `trash/` folders that make creating and deleting a
//! topic one atomic rename each (whatever is left in them is garbage).

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
/// Marker of a clean stop of every topic (see [`DataDir::mark_clean_stop`]).
pub const CLEAN_STOP_FILE: &str = "clean-stop";
/// Folder where a new topic's folder is assembled before it is renamed into
/// `topics/`: a creation that fails or is cut short leaves nothing a start
/// would take for a topic.
pub const STAGING_DIR: &str = "staging";
/// Folder a deleted topic's folder is renamed into, then removed from.
pub const TRASH_DIR: &str = "trash";

/// Distinguishes folders of one name in `staging/` and `trash/`.
static NEXT_SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
        DataDir::open_with(storage, root.into(), false)
    }

    /// [`DataDir::open`] for a process that only reads (`spool verify`):
    /// on a read-only filesystem or snapshot it takes the lock without
    /// writing ([`Storage::lock_to_read`]).
    pub fn open_to_read(storage: Arc<dyn Storage>, root: impl Into<PathBuf>) -> Result<DataDir> {
        DataDir::open_with(storage, root.into(), true)
    }

    fn open_with(storage: Arc<dyn Storage>, root: PathBuf, to_read: bool) -> Result<DataDir> {
        // An empty path would put the data in the working directory, whose
        // sync then fails ("" names no folder).
        if root.as_os_str().is_empty() {
            return Err(Error::InvalidArgument(
                "the data directory is an empty path".into(),
            ));
        }
        let topics = root.join(TOPICS_DIR);
        folder_or_absent(&*storage, &topics, "creating data directory")?;
        storage
            .create_dir_all(&topics)
            .ctx(|| format!("creating data directory {}", topics.display()))?;
        let own_pid = std::process::id().to_string();
        let owner = format!("{own_pid}\n");
        let mut attempts = 0;
        let lock = loop {
            let path = root.join(LOCK_FILE);
            let taken = if to_read {
                storage.lock_to_read(&path, &owner)
            } else {
                storage.lock(&path, &owner)
            };
            match taken {
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

    /// Makes `staging/` and `trash/` if missing, for a broker about to
    /// serve (not for a check such as `spool verify`): made ahead rather
    /// than at the first creation or deletion, since a new directory takes
    /// a block on ext4 and deleting a topic is how a full disk is given
    /// room. A failure is logged; that first use makes them then.
    pub fn make_scratch_folders(&self) {
        for folder in [STAGING_DIR, TRASH_DIR] {
            if let Err(e) = self.scratch_folder(folder) {
                tracing::warn!(error = %e, "could not make {folder}/ ahead; the first topic creation or deletion makes it");
            }
        }
    }

    /// The same directory, still locked, with its files reached through
    /// `storage` (a wrapper of the one it was opened with).
    pub fn with_storage(self, storage: Arc<dyn Storage>) -> DataDir {
        DataDir { storage, ..self }
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
        // A file there is no topic (each topic is a folder), nor is a folder
        // that holds nothing a topic writes.
        names.retain(|name| {
            let path = dir.join(name);
            if !self.storage.is_dir(&path) {
                tracing::warn!(file = %path.display(), "ignoring a file among the topic folders");
                return false;
            }
            let topic = self.holds_a_topic(&path);
            if !topic {
                tracing::warn!(folder = %path.display(),
                    "ignoring a folder among the topic folders: it holds no topic.toml, checkpoint or segment");
            }
            topic
        });
        names.sort();
        Ok(names)
    }

    /// Whether folder `dir` in `topics/` holds a topic: its `topic.toml`,
    /// its log's checkpoint or a segment file. A topic is created whole in
    /// `staging/` with its `topic.toml` and moved here in one rename, so a
    /// folder with none of these was put here by something else (one whose
    /// listing fails counts as a topic, for its open to report).
    fn holds_a_topic(&self, dir: &Path) -> bool {
        let Ok(files) = self.storage.list_dir(dir) else {
            return true;
        };
        files.iter().any(|f| {
            f == crate::broker::config::TOPIC_CONFIG_FILE
                || f == super::checkpoint::CHECKPOINT_FILE
                || f.ends_with(".log")
                || f.contains(".log.")
        })
    }

    /// A new, empty folder in `staging/` to assemble topic `name` in.
    pub fn staging_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch_path(STAGING_DIR, name)?;
        self.storage
            .create_dir_all(&dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Moves `dir` (a folder in `topics/` or `staging/`) into `trash/` with one
    /// rename, durably: once this returns, no start finds it where it was.
    /// Returns where it is now; remove it with [`DataDir::remove_leftover`].
    pub fn move_to_trash(&self, dir: &Path) -> Result<PathBuf> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("folder");
        let to = self.scratch_path(TRASH_DIR, name)?;
        self.storage
            .rename(dir, &to)
            .ctx(|| format!("moving {} to {}", dir.display(), to.display()))?;
        for parent in [dir.parent(), to.parent()].into_iter().flatten() {
            self.storage
                .sync_dir(parent)
                .ctx(|| format!("syncing {}", parent.display()))?;
        }
        Ok(to)
    }

    /// Removes a folder of `staging/` or `trash/` (callable without the
    /// `DataDir`, from a background thread). A failure leaves it for the next
    /// start's [`DataDir::clear_leftovers`].
    pub fn remove_leftover(storage: &dyn Storage, dir: &Path) -> Result<()> {
        storage
            .remove_dir_all(dir)
            .ctx(|| format!("removing {}", dir.display()))?;
        match dir.parent() {
            Some(parent) => storage
                .sync_dir(parent)
                .ctx(|| format!("syncing {}", parent.display())),
            None => Ok(()),
        }
    }

    /// Whether the last run ended with a clean stop of every topic (the
    /// marker [`DataDir::mark_clean_stop`] writes), taking the marker away
    /// durably: from now on this run may leave topics unclean.
    pub fn take_clean_stop(&self) -> Result<bool> {
        let path = self.root.join(CLEAN_STOP_FILE);
        if !self.storage.exists(&path) {
            return Ok(false);
        }
        if self.storage.is_dir(&path) {
            return Err(Error::io(
                format!("reading {}", path.display()),
                super::io::not_a_regular_file(),
            ));
        }
        self.storage
            .remove_file(&path)
            .ctx(|| format!("removing {}", path.display()))?;
        self.storage
            .sync_dir(&self.root)
            .ctx(|| format!("syncing {}", self.root.display()))?;
        Ok(true)
    }

    /// Records that every topic was stopped cleanly: the next start need
    /// not look for topics to recover. Written last, durably.
    pub fn mark_clean_stop(&self) -> Result<()> {
        let path = self.root.join(CLEAN_STOP_FILE);
        crate::storage::io::write_file_atomic(&*self.storage, &path, b"")
            .ctx(|| format!("writing {}", path.display()))
    }

    /// Removes what `staging/` and `trash/` hold: creations and deletions a
    /// crash (or a failure) interrupted. Each leftover is logged; one that
    /// cannot be removed is logged and left for the next start.
    pub fn clear_leftovers(&self) -> Result<()> {
        for folder in [STAGING_DIR, TRASH_DIR] {
            let parent = self.root.join(folder);
            folder_or_absent(&*self.storage, &parent, "listing")?;
            if !self.storage.exists(&parent) {
                continue;
            }
            let names = self
                .storage
                .list_dir(&parent)
                .ctx(|| format!("listing {}", parent.display()))?;
            for name in names {
                let path = parent.join(&name);
                match self.storage.remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed an interrupted {}", if folder == TRASH_DIR { "topic deletion" } else { "topic creation" })
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover; the next start tries again")
                    }
                }
            }
            self.storage
                .sync_dir(&parent)
                .ctx(|| format!("syncing {}", parent.display()))?;
        }
        Ok(())
    }

    /// A name not yet used in `folder` (`staging/` or `trash/`, created with
    /// a durable entry in the root if missing) for a folder of topic `name`.
    fn scratch_path(&self, folder: &str, name: &str) -> Result<PathBuf> {
        let parent = self.scratch_folder(folder)?;
        loop {
            let n = NEXT_SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = parent.join(format!("{name}.{}.{n}", super::log::now_ms()));
            if !self.storage.exists(&path) {
                return Ok(path);
            }
        }
    }

    /// `folder` (`staging/` or `trash/`), created with a durable entry in
    /// the root if missing.
    fn scratch_folder(&self, folder: &str) -> Result<PathBuf> {
        let parent = self.root.join(folder);
        folder_or_absent(&*self.storage, &parent, "using")?;
        if !self.storage.exists(&parent) {
            self.storage
                .create_dir_all(&parent)
                .ctx(|| format!("creating {}", parent.display()))?;
            self.storage
                .sync_dir(&self.root)
                .ctx(|| format!("syncing {}", self.root.display()))?;
        }
        Ok(parent)
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

/// Refuses something other than a folder at `path`, where spool keeps one
/// (an error naming `doing` and the path, saying to move it away); a folder
/// or nothing there passes.
fn folder_or_absent(storage: &dyn Storage, path: &Path, doing: &str) -> Result<()> {
    if storage.exists(path) && !storage.is_dir(path) {
        return Err(Error::io(
            format!("{doing} {}", path.display()),
            super::io::not_a_folder(),
        ));
    }
    Ok(())
}
