//! The only module with `unsafe`: memory maps of segment files.
//!
//! Readers see segments through a shared map (zero-copy `Bytes`). The appender
//! writes with positional `pwrite` into the same page-cache pages the map shows:
//! on ext4 that is ~1.5× faster than copying into the map, whose first touch of
//! each page costs a fault, a zero-fill and a journal handle (`page_mkwrite`),
//! and it can never raise SIGBUS. Durability is unchanged: `msync` of a range
//! writes back the file's dirty pages however they were dirtied.
//!
//! Invariant that makes the shared map sound: one appender writes only at or
//! above the published end (serialised by `append_lock`), readers only read
//! below it, and the published end only grows (Release on publish, Acquire on
//! read). Bytes below the published end are therefore never written again
//! while the map lives, and a `&[u8]` over them is a plain immutable slice.

use super::{Mapping, ShortWrite, out_of_range};
use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A mapped region of a real file.
pub(super) struct OsMapping {
    /// `None` for a zero-length map (mmap cannot map nothing). Shared with every
    /// `Bytes` handed out, so the pages stay mapped while any reader holds one.
    raw: Option<Arc<MmapRaw>>,
    capacity: u64,
    published: AtomicU64,
    /// The mapped file, written with `pwrite`; `None` for a read-only map,
    /// which keeps no descriptor open (the pages stay mapped without it).
    file: Option<Arc<File>>,
    /// Size of the file as allocated by its owner: writes stay below it, so
    /// appends never grow the file without a reservation.
    file_size: Arc<AtomicU64>,
    /// Takes writes until [`Mapping::seal`].
    writable: AtomicBool,
    append_lock: Mutex<()>,
}

impl fmt::Debug for OsMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OsMapping")
            .field("capacity", &self.capacity)
            .field("published", &self.published())
            .field("writable", &self.writable.load(Ordering::Relaxed))
            .finish()
    }
}

impl OsMapping {
    /// Maps the first `len` bytes of `file` read-only; all of them are published.
    pub(super) fn read(file: &Arc<File>, len: u64, file_size: Arc<AtomicU64>) -> io::Result<Self> {
        let raw = if len == 0 {
            None
        } else {
            Some(Arc::new(
                MmapOptions::new()
                    .len(to_usize(len)?)
                    .map_raw_read_only(&**file)?,
            ))
        };
        Ok(OsMapping {
            raw,
            capacity: len,
            published: AtomicU64::new(len),
            file: None,
            file_size,
            writable: AtomicBool::new(false),
            append_lock: Mutex::new(()),
        })
    }

    /// Maps `capacity` bytes of `file` for appending above `published`.
    pub(super) fn append(
        file: &Arc<File>,
        capacity: u64,
        published: u64,
        file_size: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        if published > capacity {
            return Err(out_of_range("published prefix", 0, published, capacity));
        }
        let raw = if capacity == 0 {
            None
        } else {
            Some(Arc::new(
                MmapOptions::new()
                    .len(to_usize(capacity)?)
                    .map_raw_read_only(&**file)?,
            ))
        };
        Ok(OsMapping {
            raw,
            capacity,
            published: AtomicU64::new(published),
            file: Some(Arc::clone(file)),
            file_size,
            writable: AtomicBool::new(true),
            append_lock: Mutex::new(()),
        })
    }
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "map too large"))
}

impl Mapping for OsMapping {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    fn seal(&self) {
        self.writable.store(false, Ordering::Release);
    }

    fn write(&self, pos: u64, data: &[u8]) -> Result<(), ShortWrite> {
        if !self.writable.load(Ordering::Acquire) {
            return Err(ShortWrite::none(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only map",
            )));
        }
        let _appender = self
            .append_lock
            .lock()
            .map_err(|_| ShortWrite::none(io::Error::other("append lock poisoned")))?;
        let end = pos.checked_add(data.len() as u64).ok_or_else(|| {
            ShortWrite::none(out_of_range("map write", pos, data.len() as u64, u64::MAX))
        })?;
        let allocated = self.file_size.load(Ordering::Acquire).min(self.capacity);
        if pos < self.published() || end > allocated {
            return Err(ShortWrite::none(out_of_range(
                "map write",
                pos,
                data.len() as u64,
                allocated,
            )));
        }
        // Above the published end, so no reader holds a view of these bytes.
        let Some(file) = &self.file else {
            return Err(ShortWrite::none(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "write to a read-only map",
            )));
        };
        let mut written = 0;
        while written < data.len() {
            match file.write_at(&data[written..], pos + written as u64) {
                Ok(0) => {
                    return Err(ShortWrite {
                        written: written as u64,
                        error: io::Error::from(io::ErrorKind::WriteZero),
                    });
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(ShortWrite {
                        written: written as u64,
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    fn publish(&self, end: u64) {
        let end = end.min(self.capacity);
        self.published.fetch_max(end, Ordering::Release);
    }

    fn sync_range(&self, pos: u64, len: u64) -> io::Result<()> {
        let Some(raw) = &self.raw else {
            return Ok(());
        };
        let end = pos.saturating_add(len).min(self.capacity);
        if end <= pos {
            return Ok(());
        }
        raw.flush_range(pos as usize, (end - pos) as usize)
    }

    fn start_writeback(&self, pos: u64, len: u64) {
        let Some(file) = &self.file else { return };
        let (Ok(pos), Ok(len)) = (i64::try_from(pos), i64::try_from(len)) else {
            return;
        };
        // SAFETY: `sync_file_range` takes a descriptor and integers, and the
        // descriptor is open for as long as `file` lives; no memory is passed.
        // SYNC_FILE_RANGE_WRITE only queues the dirty pages of the range for
        // writeback and returns; an error of that writeback is recorded on
        // the file and reported by the next msync/fsync, which is the
        // durability point, so this call's own result is not needed.
        let _ = unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&**file),
                pos,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    fn bytes(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        let published = self.published();
        let end = pos
            .checked_add(len)
            .filter(|end| *end <= published)
            .ok_or_else(|| out_of_range("map read", pos, len, published))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(raw) = &self.raw else {
            return Err(out_of_range("map read", pos, len, 0));
        };
        debug_assert!(end <= self.capacity);
        Ok(Bytes::from_owner(MapSlice {
            raw: Arc::clone(raw),
            start: pos as usize,
            len: len as usize,
        }))
    }
}

/// A published range of a map, owned by a `Bytes`.
struct MapSlice {
    raw: Arc<MmapRaw>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `bytes()` built this slice only for a range below the published
        // end, inside the mapping. Published bytes are never written again (see the
        // module invariant), and `raw` keeps the pages mapped for as long as this
        // slice lives, so the memory is valid and immutable for the borrow. This
        // holds only while no other process modifies or truncates segment files:
        // the data directory's LOCK keeps other spool processes out, and nothing
        // else may write to them (a file cut underneath a map raises SIGBUS).
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(self.start), self.len) }
    }
}
