//! The real file system: std files, `fallocate` through rustix, maps from
//! [`super::mmap`].

use super::mmap::OsMapping;
use super::{LockError, LockGuard, Mapping, OpenMode, Storage, StorageFile, not_a_regular_file};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Files on the machine's own file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsStorage;

impl Storage for OsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        // Checked before the open too, so a link to a device is never
        // opened (opening some has effects).
        if let Ok(m) = fs::metadata(path)
            && !m.is_file()
            && !m.is_dir()
        {
            return Err(not_a_regular_file());
        }
        let mut options = OpenOptions::new();
        options.read(true).write(mode != OpenMode::ReadOnly);
        match mode {
            OpenMode::Existing | OpenMode::ReadOnly => {}
            OpenMode::CreateNew => {
                options.create_new(true);
            }
            OpenMode::CreateOrOpen => {
                options.create(true);
            }
        }
        // A folder where a file belongs fails the open itself ("Is a
        // directory"): the same refusal as for a FIFO, saying what to do.
        let file = options.open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::IsADirectory {
                not_a_regular_file()
            } else {
                e
            }
        })?;
        let meta = file.metadata()?;
        // A FIFO or a device where spool keeps a file reads as empty (its
        // length is 0) and takes no truncation or map: never one of spool's.
        if !meta.is_file() {
            return Err(not_a_regular_file());
        }
        let size = meta.len();
        Ok(Arc::new(OsFile {
            file: Arc::new(file),
            path: path.to_owned(),
            size: Arc::new(AtomicU64::new(size)),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a link (it would write the pid into the file it
        // points to), and not a FIFO or device.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(lock_open_error)?;
        flock(&mut file)?;
        write_owner(&mut file, owner, path)?;
        Ok(Box::new(OsLock { _file: file }))
    }

    fn lock_to_read(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        // A read-only filesystem, or a LOCK this user may not write (a
        // backup user reading a broker's copy): the lock on the file as it
        // is, through a descriptor opened for reading.
        match self.lock(path, owner) {
            Err(LockError::Io(e))
                if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) => {}
            other => return other,
        }
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Box::new(NoLock)),
            Err(e) => return Err(lock_open_error(e)),
        };
        flock(&mut file)?;
        Ok(Box::new(OsLock { _file: file }))
    }
}

/// Writes the holder's pid into the LOCK file it holds, for a second
/// opener's refusal to name. The lock itself is the `flock`: on a disk with
/// no room for the text (a full btrfs or xfs, where even rewriting a block
/// of a file takes a new one) the broker still starts, to serve what it
/// holds, with a warning and the file emptied so that no other pid is named.
fn write_owner(file: &mut File, owner: &str, path: &Path) -> Result<(), LockError> {
    // Over the old text, then cut to length: shrinking needs no room.
    let written = file
        .rewind()
        .and_then(|()| file.write_all(owner.as_bytes()))
        .and_then(|()| file.set_len(owner.len() as u64));
    match written {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
            let _ = file.set_len(0);
            tracing::warn!(file = %path.display(), error = %e,
                "no room to write this process's pid into the lock file; the lock holds all the same (a second broker on this directory is refused without the pid)");
            Ok(())
        }
        Err(e) => Err(LockError::Io(e)),
    }
}

/// What a failed open of the LOCK file answers: a link or a folder there
/// in words that say what to do.
fn lock_open_error(e: io::Error) -> LockError {
    LockError::Io(if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            "a link stands there (the lock is a plain file of spool's); remove it",
        )
    } else if e.kind() == io::ErrorKind::IsADirectory {
        not_a_regular_file()
    } else {
        e
    })
}

/// Takes the exclusive `flock` on the open LOCK file (a regular file only),
/// or names its holder from what it wrote into the file.
fn flock(file: &mut File) -> Result<(), LockError> {
    if !file.metadata().map_err(LockError::Io)?.is_file() {
        return Err(LockError::Io(not_a_regular_file()));
    }
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(LockError::Held(holder.trim().to_owned()))
        }
        Err(TryLockError::Error(e)) => Err(LockError::Io(e)),
    }
}

/// No lock: a read-only filesystem without a LOCK file, where no broker ran.
#[derive(Debug)]
struct NoLock;

impl LockGuard for NoLock {}

/// An exclusive `flock` on the LOCK file, released when dropped (or when the
/// process dies, so a `kill -9` never leaves a stale lock behind).
#[derive(Debug)]
struct OsLock {
    _file: File,
}

impl LockGuard for OsLock {}

/// An open file on the real disk.
#[derive(Debug)]
struct OsFile {
    file: Arc<File>,
    path: PathBuf,
    /// Size as this process last set it, shared with the file's maps so they
    /// never write past the end of the file.
    size: Arc<AtomicU64>,
}

impl StorageFile for OsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let current = self.file.metadata()?.len();
        if len <= current {
            // Grown before (zeros written ahead, part of them when the disk
            // filled up): those bytes are the file's, and writes may use them.
            self.size.fetch_max(current, Ordering::AcqRel);
            return Ok(());
        }
        match rustix::fs::fallocate(
            &*self.file,
            rustix::fs::FallocateFlags::empty(),
            current,
            len - current,
        ) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
                // A file system without fallocate: writing zeros reserves the blocks
                // just as well (and fails with ENOSPC here, not with SIGBUS later).
                write_zeros(&self.file, current, len)?;
            }
            Err(e) => return Err(io::Error::from(e)),
        }
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    fn allocate_written(&self, len: u64) -> io::Result<()> {
        let current = self.file.metadata()?.len();
        if len <= current {
            self.size.fetch_max(current, Ordering::AcqRel);
            return Ok(());
        }
        write_zeros(&self.file, current, len)?;
        self.size.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    fn punch_hole(&self, pos: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(
            &*self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            pos,
            len,
        )
        .map_err(io::Error::from)?;
        // Reserved again where the disk has room (unwritten blocks, reading
        // as zeros), so later writes there need none; a full disk leaves the
        // hole, and a write into it fails as cleanly.
        let _ = rustix::fs::fallocate(&*self.file, rustix::fs::FallocateFlags::KEEP_SIZE, pos, len);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, pos)?;
        self.size
            .fetch_max(pos + data.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn map_read(&self) -> io::Result<Arc<dyn Mapping>> {
        let len = self.len()?;
        Ok(Arc::new(OsMapping::read(
            &self.file,
            len,
            Arc::clone(&self.size),
        )?))
    }

    fn map_append(&self, capacity: u64, published: u64) -> io::Result<Arc<dyn Mapping>> {
        let mapping = OsMapping::append(&self.file, capacity, published, Arc::clone(&self.size))
            .map_err(|e| {
                io::Error::new(e.kind(), format!("mapping {}: {e}", self.path.display()))
            })?;
        Ok(Arc::new(mapping))
    }
}

fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut pos = from;
    while pos < to {
        let n = ((to - pos) as usize).min(CHUNK);
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
