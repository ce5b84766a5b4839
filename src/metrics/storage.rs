//! [`TimedStorage`]: a [`Storage`] that times every durability point of the
//! one it wraps (`sync_range`, `sync_data`, `sync_dir`) into
//! [`Metrics::synced`], and forwards everything else unchanged.

use super::Metrics;
use crate::storage::io::{
    LockError, LockGuard, Mapping, OpenMode, ShortWrite, Storage, StorageFile,
};
use bytes::Bytes;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Runs `sync`, recording its duration and outcome.
fn timed(metrics: &Metrics, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let started = Instant::now();
    let result = sync();
    metrics.synced(started.elapsed(), result.is_ok());
    result
}

/// A storage whose syncs are timed (see the module doc).
#[derive(Debug)]
pub struct TimedStorage {
    inner: Arc<dyn Storage>,
    metrics: Metrics,
}

impl TimedStorage {
    /// Wraps `inner`, recording its syncs into `metrics`.
    pub fn new(inner: Arc<dyn Storage>, metrics: Metrics) -> TimedStorage {
        TimedStorage { inner, metrics }
    }
}

impl Storage for TimedStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(dir)
    }

    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let inner = self.inner.open(path, mode)?;
        Ok(Arc::new(TimedFile {
            inner,
            metrics: self.metrics.clone(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        timed(&self.metrics, || self.inner.sync_dir(dir))
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError> {
        self.inner.lock(path, owner)
    }
}

#[derive(Debug)]
struct TimedFile {
    inner: Arc<dyn StorageFile>,
    metrics: Metrics,
}

impl StorageFile for TimedFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }

    fn allocate_written(&self, len: u64) -> io::Result<()> {
        self.inner.allocate_written(len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(pos, buf)
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(pos, data)
    }

    fn punch_hole(&self, pos: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(pos, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        timed(&self.metrics, || self.inner.sync_data())
    }

    fn map_read(&self) -> io::Result<Arc<dyn Mapping>> {
        self.inner.map_read()
    }

    fn map_append(&self, capacity: u64, published: u64) -> io::Result<Arc<dyn Mapping>> {
        let inner = self.inner.map_append(capacity, published)?;
        Ok(Arc::new(TimedMapping {
            inner,
            metrics: self.metrics.clone(),
        }))
    }
}

#[derive(Debug)]
struct TimedMapping {
    inner: Arc<dyn Mapping>,
    metrics: Metrics,
}

impl Mapping for TimedMapping {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn published(&self) -> u64 {
        self.inner.published()
    }

    fn write(&self, pos: u64, data: &[u8]) -> Result<(), ShortWrite> {
        self.inner.write(pos, data)
    }

    fn publish(&self, end: u64) {
        self.inner.publish(end)
    }

    fn seal(&self) {
        self.inner.seal()
    }

    fn sync_range(&self, pos: u64, len: u64) -> io::Result<()> {
        timed(&self.metrics, || self.inner.sync_range(pos, len))
    }

    fn bytes(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        self.inner.bytes(pos, len)
    }

    fn start_writeback(&self, pos: u64, len: u64) {
        self.inner.start_writeback(pos, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the ranges whose writeback it is asked to start.
    #[derive(Debug, Default)]
    struct Recording {
        started: Mutex<Vec<(u64, u64)>>,
    }

    impl Mapping for Recording {
        fn capacity(&self) -> u64 {
            0
        }

        fn published(&self) -> u64 {
            0
        }

        fn write(&self, _pos: u64, _data: &[u8]) -> Result<(), ShortWrite> {
            Ok(())
        }

        fn publish(&self, _end: u64) {}

        fn seal(&self) {}

        fn sync_range(&self, _pos: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }

        fn bytes(&self, _pos: u64, _len: u64) -> io::Result<Bytes> {
            Ok(Bytes::new())
        }

        fn start_writeback(&self, pos: u64, len: u64) {
            self.started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((pos, len));
        }
    }

    #[test]
    fn the_timed_map_starts_writeback_on_the_map_it_wraps() {
        // `spool serve` writes through this wrapper: a writeback it dropped
        // would leave every seal and every fsync=always sync to wait for all.
        let inner = Arc::new(Recording::default());
        let timed = TimedMapping {
            inner: Arc::clone(&inner) as Arc<dyn Mapping>,
            metrics: Metrics::new(),
        };
        timed.start_writeback(4096, 1 << 20);
        let started = inner.started.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(*started, vec![(4096, 1 << 20)]);
    }
}
