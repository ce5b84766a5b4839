//! The crate's one error type: every failure carries what it concerns (topic,
//! file, byte range, offset) so a message alone tells an operator what is wrong.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;

/// Result with spool's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in spool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error, with what spool was doing at the time.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The disk (or the quota) is full, or a file reached the process's
    /// file-size limit. Nothing already acknowledged is affected.
    #[error("{}", full_message(context, source))]
    Full {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error (ENOSPC or EDQUOT).
        #[source]
        source: io::Error,
    },
    /// The process ran out of file descriptors (EMFILE/ENFILE). Nothing
    /// already acknowledged is affected.
    #[error(
        "out of file descriptors while {context}: {source}; the broker may hold {} open files \
         (raise the limit: `ulimit -n`, or LimitNOFILE for a service; topics hold at most \
         max_open_files of them and close when unused)",
        open_files_limit().map_or_else(|| "only a limited number of".to_string(), |n| format!("at most {n}"))
    )]
    FilesExhausted {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The process ran out of memory or address space (ENOMEM), such as
    /// for a segment's map. Nothing already acknowledged is affected.
    #[error(
        "out of memory while {context}: {source}; raise the process's memory or address-space \
         limit (`ulimit -v`, MemoryMax for a service) or lower max_open_files so fewer topics \
         are open (and mapped) at once"
    )]
    MemoryExhausted {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Stored data failed its checks.
    #[error("{0}")]
    Corruption(Box<Corruption>),
    /// A caller passed something spool cannot accept.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named topic does not exist (or was deleted).
    #[error("{0}")]
    TopicNotFound(String),
    /// The named consumer group does not exist.
    #[error("{0}")]
    GroupNotFound(String),
    /// Something else named does not exist (a subscription, ...).
    #[error("{0}")]
    NotFound(String),

    /// A per-connection or per-socket limit is reached (the message names
    /// the setting).
    #[error("{0}")]
    LimitReached(String),
    /// A failure inside spool itself: a task that panicked, a result that
    /// went missing. Never caused by input; worth a bug report.
    #[error("internal error: {0}")]
    Internal(String),
    /// The named thing exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The broker is stopping (or the topic closing): nothing more is
    /// written; the caller may retry against the broker once it is back.
    #[error("{0}")]
    Stopping(String),
    /// The caller gave no token, or one the broker does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's token does not allow the operation on the topic it names.
    #[error("{0}")]
    PermissionDenied(String),
    /// A stored message is larger than one delivery can carry: the frame
    /// limit of the transport asking, less room for the envelope (a message
    /// stored while the broker ran with a larger limit).
    #[error(
        "the message at offset {offset} takes {size} bytes of key, headers and value; a delivery carries at most {limit} (max_frame_bytes less room for the envelope)"
    )]
    TooLarge {
        /// Offset of the message.
        offset: u64,
        /// Its key, headers and value, in bytes.
        size: usize,
        /// What a delivery carries at most.
        limit: usize,
    },
    /// Another process holds the data directory.
    #[error(
        "data directory {dir} is locked by pid {pid}: another broker or offline tool is using it"
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// The pid written in its LOCK file (or "unknown").
        pid: String,
    },
    /// A sync (or a write for a reason other than a full disk) failed
    /// earlier; the log refuses writes until restart ("fsyncgate": a failed
    /// fsync is never retried, because the kernel may have dropped the dirty
    /// pages).
    #[error(
        "log {log} is read-only after a failed sync or write ({cause}); restart once the disk is healthy"
    )]
    ReadOnly {
        /// The log's directory.
        log: PathBuf,
        /// The sync error that poisoned it.
        cause: String,
    },
}

/// A damaged range of a stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The damaged file.
    pub file: PathBuf,
    /// Damaged byte range within the file.
    pub bytes: Range<u64>,
    /// Offsets whose records lie in the range, when known.
    pub offsets: Option<Range<u64>>,
    /// What check failed.
    pub detail: String,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "corruption in {}, bytes {}..{}",
            self.file.display(),
            self.bytes.start,
            self.bytes.end
        )?;
        // An empty range (damage between records, holding none) says nothing.
        if let Some(offsets) = self.offsets.as_ref().filter(|o| !o.is_empty()) {
            write!(f, " (offsets {}..{})", offsets.start, offsets.end)?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl Corruption {
    /// The damage as logged once it is given up (under `--recovery
    /// skip-damaged`): without the advice to start in that mode.
    pub fn given_up(&self) -> GivenUp<'_> {
        GivenUp(self)
    }
}

/// See [`Corruption::given_up`].
#[derive(Debug)]
pub struct GivenUp<'a>(&'a Corruption);

impl fmt::Display for GivenUp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        let advice = text
            .find(" Start with recovery mode skip-damaged")
            .unwrap_or(text.len());
        f.write_str(text[..advice].trim_end())
    }
}

impl Error {
    /// The same error with `more` added to what was being done (or to the
    /// message), keeping its kind and so its status code. Errors whose text
    /// is fixed (damage, a locked directory, ...) stay as they are.
    pub fn with_context(self, more: impl FnOnce(String) -> String) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: more(context),
                source,
            },
            Error::Full { context, source } => Error::Full {
                context: more(context),
                source,
            },
            Error::FilesExhausted { context, source } => Error::FilesExhausted {
                context: more(context),
                source,
            },
            Error::MemoryExhausted { context, source } => Error::MemoryExhausted {
                context: more(context),
                source,
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(more(m)),
            Error::LimitReached(m) => Error::LimitReached(more(m)),
            Error::Internal(m) => Error::Internal(more(m)),
            Error::Stopping(m) => Error::Stopping(more(m)),
            other => other,
        }
    }

    /// A copy, for each of several callers one failure answers (such as the
    /// producers of one failed group commit; the type is not `Clone`: it
    /// carries `io::Error`s). The copy reads and maps to a status code the
    /// same as the original.
    pub fn duplicate(&self) -> Error {
        let io = crate::storage::io::copy_error;
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: io(source),
            },
            Error::Full { context, source } => Error::Full {
                context: context.clone(),
                source: io(source),
            },
            Error::FilesExhausted { context, source } => Error::FilesExhausted {
                context: context.clone(),
                source: io(source),
            },
            Error::MemoryExhausted { context, source } => Error::MemoryExhausted {
                context: context.clone(),
                source: io(source),
            },
            Error::Corruption(c) => Error::Corruption(c.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::TopicNotFound(m) => Error::TopicNotFound(m.clone()),
            Error::GroupNotFound(m) => Error::GroupNotFound(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::LimitReached(m) => Error::LimitReached(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
            Error::Stopping(m) => Error::Stopping(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::TooLarge {
                offset,
                size,
                limit,
            } => Error::TooLarge {
                offset: *offset,
                size: *size,
                limit: *limit,
            },
            Error::Locked { dir, pid } => Error::Locked {
                dir: dir.clone(),
                pid: pid.clone(),
            },
            Error::ReadOnly { log, cause } => Error::ReadOnly {
                log: log.clone(),
                cause: cause.clone(),
            },
        }
    }

    /// Wraps an I/O error with context, telling a full disk apart.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let context = context.into();
        if is_disk_full(&source) {
            Error::Full { context, source }
        } else if is_out_of_files(&source) {
            Error::FilesExhausted { context, source }
        } else if os_code(&source) == Some(rustix::io::Errno::NOMEM.raw_os_error())
            || source.kind() == io::ErrorKind::OutOfMemory
        {
            Error::MemoryExhausted { context, source }
        } else {
            Error::Io { context, source }
        }
    }

    /// A corruption error.
    pub fn corruption(c: Corruption) -> Error {
        Error::Corruption(Box::new(c))
    }
}

/// The OS error number of `e`, also when `e` names another file than
/// its context does ([`crate::storage::io::at_path`]).
pub fn os_code(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::storage::io::AtPath>())
            .and_then(|at| at.source.raw_os_error())
    })
}

/// True for "no space", "quota exceeded" and "file too large" (the
/// process's file-size limit, `ulimit -f`: a file can grow no more, as on a
/// full disk).
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        os_code(e),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    ) || e.kind() == io::ErrorKind::StorageFull
        || is_over_file_size_limit(e)
}

/// True for the system's "file too large" (EFBIG): a write or allocation
/// past the process's file-size limit. (spool's own refusals of a file
/// longer than it reads carry the same kind but no OS code.)
pub fn is_over_file_size_limit(e: &io::Error) -> bool {
    os_code(e) == Some(rustix::io::Errno::FBIG.raw_os_error())
}

/// The words of [`Error::Full`]: a full disk, or a file at the process's
/// file-size limit (named, with how to raise it).
fn full_message(context: &str, source: &io::Error) -> String {
    if is_over_file_size_limit(source) {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Fsize)
            .current
            .map_or_else(|| "the".to_owned(), |n| format!("its {n}-byte"));
        format!(
            "file size limit reached while {context}: {source}; a file spool writes may grow \
             only to {limit} limit (raise it: `ulimit -f`, or LimitFSIZE for a service)"
        )
    } else {
        format!("disk full while {context}: {source}")
    }
}

/// True for "too many open files" (of the process or of the system).
pub fn is_out_of_files(e: &io::Error) -> bool {
    matches!(
        os_code(e),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// The process's soft limit of open files, if it has one.
pub fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft limit of open files to the hard limit (a broker with many
/// topics and connections needs them) and returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "could not raise the open-files limit");
        }
    }
    open_files_limit()
}

/// Adds context to `io::Result`s.
pub trait IoContext<T> {
    /// Maps the error into [`Error::Io`] / [`Error::Full`] with a lazily built context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of a failure answers the code the original answers: one of
    /// something that is not a regular file where a file belongs too.
    #[test]
    fn a_duplicate_keeps_the_status_code() {
        use crate::protocol::{pb, status};
        let path = std::path::Path::new("/d/topics/t/00000000000000000024.log");
        let sources = [
            crate::storage::io::at_path(path, crate::storage::io::not_a_regular_file()),
            io::Error::from(io::ErrorKind::IsADirectory),
        ];
        for source in sources {
            let original = Error::io("opening a segment", source);
            let copy = original.duplicate();
            assert_eq!(status::code(&original), pb::Code::FailedPrecondition);
            assert_eq!(status::code(&copy), pb::Code::FailedPrecondition, "{copy}");
            assert_eq!(copy.to_string(), original.to_string());
        }
    }

    #[test]
    fn damage_given_up_is_logged_without_the_advice_to_give_it_up() {
        let damage = Corruption {
            file: PathBuf::from("t/00000000000000000000.log"),
            bytes: 10..20,
            offsets: Some(3..4),
            detail: "checksum mismatch; valid records follow it. Start with recovery mode \
                     skip-damaged (`spool serve --recovery skip-damaged`) to quarantine the \
                     range and open anyway"
                .into(),
        };
        assert!(damage.to_string().contains("Start with recovery mode"));
        assert_eq!(
            damage.given_up().to_string(),
            "corruption in t/00000000000000000000.log, bytes 10..20 (offsets 3..4): \
             checksum mismatch; valid records follow it."
        );
    }
}
