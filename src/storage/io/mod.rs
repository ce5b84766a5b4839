//! File access behind a narrow trait, so the engine runs the same on the real
//! disk ([`OsStorage`]) and on a simulated one ([`SimDisk`]) that drops
//! everything not yet synced on a simulated power cut.
//!
//! The calls are named for what they guarantee: [`StorageFile::allocate`]
//! reserves blocks (so a full disk is an error, never a SIGBUS in a map),
//! [`Mapping::sync_range`] and [`StorageFile::sync_data`] are durability points,
//! and [`Storage::sync_dir`] makes a created, renamed or removed name durable.

mod mmap;
mod os;
#[cfg(any(test, feature = "test-support"))]
mod sim;

pub use os::OsStorage;
#[cfg(any(test, feature = "test-support"))]
pub use sim::{SimDisk, SimFault, SimHook, SimOp};

use bytes::Bytes;
use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// How [`Storage::open`] treats a missing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The file must exist.
    Existing,
    /// The file must exist; opened for reading only (a file spool does not
    /// change, on a read-only filesystem or snapshot too).
    ReadOnly,
    /// Create it; fail if it exists.
    CreateNew,
    /// Open it, creating it empty if missing.
    CreateOrOpen,
}

/// A file system: names, directories and locks.
pub trait Storage: Send + Sync + Debug + 'static {
    /// `mkdir -p`.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories), unsorted.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether a file or directory exists.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Opens a file for reading and writing.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>>;
    /// Renames a file, replacing any file at `to`, or a directory to a name
    /// that does not exist. Durable after [`Storage::sync_dir`] of both parents.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Durable after [`Storage::sync_dir`].
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (created, renamed, removed names) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (created if missing) and writes `owner`
    /// into it. Held until the returned guard is dropped. Fails with
    /// `WouldBlock` and the current owner's text if someone else holds it.
    fn lock(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError>;
    /// [`Storage::lock`] for a process that only reads (`spool verify`):
    /// on a read-only filesystem, or where `path` may not be written by
    /// this user, the same lock is taken on the file as it is (a broker
    /// writing there, through another mount or as another user, still holds
    /// it), and none is needed when there is no such file (no broker ran
    /// there).
    fn lock_to_read(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError> {
        self.lock(path, owner)
    }
}

/// Held for as long as a lock lives.
pub trait LockGuard: Send + Sync + Debug {}

/// Why [`Storage::lock`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Someone else holds the lock; this is what they wrote into the file.
    Held(String),
    /// The lock file could not be opened or written.
    Io(io::Error),
}

/// A [`Mapping::write`] that failed after its first `written` bytes reached
/// the file (a `pwrite` cut short by a full disk writes a part first).
#[derive(Debug)]
pub struct ShortWrite {
    /// Bytes in place, from the position written at.
    pub written: u64,
    /// Why the rest was not.
    pub error: io::Error,
}

impl ShortWrite {
    /// A failure before any byte reached the file.
    pub fn none(error: io::Error) -> ShortWrite {
        ShortWrite { written: 0, error }
    }
}

/// One open file.
pub trait StorageFile: Send + Sync + Debug {
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Grows the file to at least `len` bytes with blocks reserved on disk
    /// (`fallocate`), zero-filled. Fails with ENOSPC when the disk is full.
    /// The new size is durable after [`StorageFile::sync_data`].
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// [`StorageFile::allocate`] by writing the zeros: the blocks are then
    /// written ones, where `fallocate` leaves unwritten extents whose first
    /// write converts them, metadata that each later sync has to write
    /// too. The zeros are durable after [`StorageFile::sync_data`].
    fn allocate_written(&self, len: u64) -> io::Result<()>;
    /// Truncates or extends the file to exactly `len`. Never called while a
    /// mapping of the file still takes writes (see [`Mapping::seal`]); older
    /// mappings may outlive a cut, and their readers read only below the
    /// published end, which the cut keeps.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `pos`.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `pos` (positional write, not through a map).
    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()>;
    /// Frees the blocks of `len` bytes at `pos` (`fallocate` punching a
    /// hole), which read as zeros from then on; the size stays. Needs no
    /// room on the disk, where writing zeros over them would on a
    /// copy-on-write filesystem. Then reserves them again where the disk
    /// has room. Durable after [`StorageFile::sync_data`].
    fn punch_hole(&self, pos: u64, len: u64) -> io::Result<()>;
    /// Durability point for the whole file: data and the metadata needed to
    /// read it back (size), like `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Maps the file read-only at its current length.
    fn map_read(&self) -> io::Result<Arc<dyn Mapping>>;
    /// Maps `capacity` bytes of the file for appending; bytes below `published`
    /// already hold data readers may see. The file may be shorter than
    /// `capacity`: the caller must [`StorageFile::allocate`] before writing.
    fn map_append(&self, capacity: u64, published: u64) -> io::Result<Arc<dyn Mapping>>;
}

/// A mapped file: one appender writes above the published end, any number of
/// readers read below it.
pub trait Mapping: Send + Sync + Debug {
    /// Mapped length.
    fn capacity(&self) -> u64;
    /// End of the bytes readers may see.
    fn published(&self) -> u64;
    /// Writes `data` at `pos` into the pages the map shows (the real disk uses
    /// `pwrite`). Only the appender calls this, only at or above the published
    /// end, and only below the file's allocated size. A failure says how
    /// much of `data` reached the file before it.
    fn write(&self, pos: u64, data: &[u8]) -> Result<(), ShortWrite>;
    /// Makes bytes below `end` visible to readers. `end` never decreases.
    fn publish(&self, end: u64);
    /// Stops taking writes: [`Mapping::write`] fails from now on. The owner
    /// seals the map before the file is cut to its last record.
    fn seal(&self);
    /// Durability point for `[pos, pos + len)` (`msync(MS_SYNC)`).
    fn sync_range(&self, pos: u64, len: u64) -> io::Result<()>;
    /// The published bytes `[pos, pos + len)`, zero-copy where the backend allows.
    fn bytes(&self, pos: u64, len: u64) -> io::Result<Bytes>;
    /// Starts writing `[pos, pos + len)` back to the disk without waiting,
    /// so a [`Mapping::sync_range`] soon after finds less left to write. Not
    /// a durability point: only `sync_range` is one, and it reports any
    /// error of the writeback started here. A backend may do nothing; one
    /// that wraps another forwards it (no default, so none forgets to).
    fn start_writeback(&self, pos: u64, len: u64);
}

/// The whole content of `path`; an error, not an abort, when it does not
/// fit in memory (a damaged or foreign file of any size may sit where a
/// small one belongs).
pub fn read_file(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    read_file_within(storage, path, u64::MAX)
}

/// The length of file `path`, 0 when it cannot be had (for an error
/// message about a file already found wanting).
pub fn file_len(storage: &dyn Storage, path: &Path) -> u64 {
    storage
        .open(path, OpenMode::ReadOnly)
        .and_then(|f| f.len())
        .unwrap_or(0)
}

/// [`read_file`] of a kind of file that never holds more than `max_len`
/// bytes: a longer one is refused with [`io::ErrorKind::FileTooLarge`]
/// before anything is read.
pub fn read_file_within(storage: &dyn Storage, path: &Path, max_len: u64) -> io::Result<Vec<u8>> {
    let file = storage.open(path, OpenMode::ReadOnly)?;
    let len = file.len()?;
    if len > max_len {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("it is {len} bytes, more than such a file holds ({max_len} at most)"),
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("its {len} bytes do not fit in memory"),
        )
    };
    let len = usize::try_from(len).map_err(|_| too_large())?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| too_large())?;
    buf.resize(len, 0);
    file.read_at(0, &mut buf)?;
    Ok(buf)
}

/// Most bytes of a file an operator hands the broker by name (its config,
/// auth file, TLS certificates and keys): far more than any such file
/// holds, and little enough that a wrong path (`/dev/zero`, a log) fails
/// at once instead of filling memory.
pub const MAX_SETTINGS_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a file an operator named (outside the data directory, so through
/// the operating system rather than a [`Storage`]), refusing one longer
/// than [`MAX_SETTINGS_FILE_BYTES`] with [`io::ErrorKind::FileTooLarge`]
/// (it reads at most one byte past the bound) and anything but a regular
/// file (a device or a FIFO, which could block or never end).
pub fn read_settings_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without waiting (a FIFO would block the open until a writer
    // came), then refused unless a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_a_regular_file());
    }
    let mut buf = Vec::new();
    file.take(MAX_SETTINGS_FILE_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_SETTINGS_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("it holds more than {MAX_SETTINGS_FILE_BYTES} bytes; is it the right file?"),
        ));
    }
    Ok(buf)
}

/// Something other than a regular file (a FIFO, device, socket or folder)
/// stands where a file belongs; what to say about it.
#[derive(Debug)]
pub struct NotARegularFile(String);

impl std::fmt::Display for NotARegularFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotARegularFile {}

/// What opening something other than a regular file where a file belongs
/// answers.
pub(crate) fn not_a_regular_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        NotARegularFile(
            "not a regular file (a FIFO, device, socket or folder stands there); move it away"
                .into(),
        ),
    )
}

/// What finding a file where spool keeps a folder answers.
pub(crate) fn not_a_folder() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotADirectory,
        NotARegularFile("not a folder (a file stands there); move it away".into()),
    )
}

/// Whether `e` says something other than a regular file stands where a
/// file belongs: [`not_a_regular_file`]'s, or the system's "is a
/// directory", also when it names another file than its context does
/// ([`at_path`]).
pub fn is_not_a_regular_file(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::IsADirectory {
        return true;
    }
    match e.get_ref() {
        Some(inner) if inner.is::<NotARegularFile>() => true,
        Some(inner) => inner
            .downcast_ref::<AtPath>()
            .is_some_and(|at| is_not_a_regular_file(&at.source)),
        None => false,
    }
}

/// A copy of `e` with its kind and words, which [`is_not_a_regular_file`]
/// tells as it tells `e` (the OS code itself is not kept).
pub fn copy_error(e: &io::Error) -> io::Error {
    if is_not_a_regular_file(e) {
        io::Error::new(e.kind(), NotARegularFile(e.to_string()))
    } else {
        io::Error::new(e.kind(), e.to_string())
    }
}

/// [`read_settings_file`] of a text file.
pub fn read_settings_text(path: &Path) -> io::Result<String> {
    String::from_utf8(read_settings_file(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

/// An I/O error about another file than the one its caller names (a
/// temp file): it names that file and keeps the OS error, which
/// [`crate::error::os_code`] looks through.
#[derive(Debug)]
pub struct AtPath {
    path: std::path::PathBuf,
    /// The error as the system gave it.
    pub source: io::Error,
}

impl std::fmt::Display for AtPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for AtPath {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// `e`, naming `path` (see [`AtPath`]).
pub fn at_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        AtPath {
            path: path.to_owned(),
            source: e,
        },
    )
}

/// Replaces `path` with `bytes` atomically and durably: write a temp file,
/// sync it, rename it over `path`, sync the directory. A crash leaves either
/// the old content or the new, never a mix. Callers replace one path one
/// at a time (two at once would share the temp file).
pub fn write_file_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // Whatever stands at the temp name (one a crash left, or a link put
    // there) goes first: the temp file is always a new one, never a file
    // elsewhere written through a link. (Errors keep their OS code, by
    // which callers tell a full disk or a lack of descriptors.)
    match storage.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at_path(&tmp, e)),
        _ => {}
    }
    let file = storage
        .open(&tmp, OpenMode::CreateNew)
        .map_err(|e| at_path(&tmp, e))?;
    let replaced = file
        .set_len(0)
        .and_then(|()| file.write_at(0, bytes))
        .and_then(|()| file.sync_data())
        .and_then(|()| storage.rename(&tmp, path));
    if let Err(e) = replaced {
        // Not left for the next start to find (a full disk refuses the
        // write, and the file would stay until the next replace).
        drop(file);
        if let Err(removing) = storage.remove_file(&tmp) {
            tracing::debug!(file = %tmp.display(), error = %removing, "could not remove a temp file after a failed replace");
        }
        return Err(e);
    }
    storage.sync_dir(dir)
}

fn out_of_range(what: &str, pos: u64, len: u64, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} of {len} bytes at {pos} goes past {limit}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replace a full disk refuses leaves the old content and no temp
    /// file behind.
    #[test]
    fn a_refused_replace_leaves_no_temp_file() {
        let disk = SimDisk::new();
        let path = Path::new("/d/checkpoint");
        disk.create_dir_all(Path::new("/d")).expect("dir");
        write_file_atomic(&disk, path, b"old").expect("first write");
        disk.set_fault(SimFault::NoSpace, true);
        let e = write_file_atomic(&disk, path, b"new content").expect_err("no space");
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        disk.set_fault(SimFault::NoSpace, false);
        assert!(
            !disk.exists(Path::new("/d/checkpoint.tmp")),
            "temp file left"
        );
        assert_eq!(read_file(&disk, path).expect("read"), b"old");
    }

    /// A replace refused for want of descriptors says so by its OS code,
    /// which is how callers tell it from a failed write (they close unused
    /// topics and try again).
    #[test]
    fn a_replace_out_of_descriptors_keeps_its_os_code() {
        let disk = SimDisk::new();
        let path = Path::new("/d/checkpoint");
        disk.create_dir_all(Path::new("/d")).expect("dir");
        write_file_atomic(&disk, path, b"old").expect("first write");
        disk.set_fault(SimFault::OutOfFiles, true);
        let e = write_file_atomic(&disk, path, b"new").expect_err("out of descriptors");
        assert!(crate::error::is_out_of_files(&e), "{e}");
        assert!(
            e.to_string().contains("checkpoint.tmp"),
            "names the temp file: {e}"
        );
        disk.set_fault(SimFault::OutOfFiles, false);
        assert_eq!(read_file(&disk, path).expect("read"), b"old");
    }
}
