//! A simulated disk for crash tests. It keeps a *durable image* apart from the
//! live one: writes land in the live image, sync calls copy to the durable
//! image, and [`SimDisk::power_cut`] throws the live image away, so everything
//! not yet synced is lost exactly as a real power failure loses it (which a
//! `kill -9` cannot show, because the page cache survives a killed process).
//!
//! Strictness on purpose: [`Mapping::sync_range`] copies only bytes the durable
//! file already covers, since a size change reaches the disk only with
//! [`StorageFile::sync_data`] (fdatasync). New, renamed and removed names are
//! durable only after [`Storage::sync_dir`] of their directory. Directories
//! themselves are durable as soon as they are created, and so is the rename
//! of a directory (which moves everything below it).

use super::{
    LockError, LockGuard, Mapping, OpenMode, ShortWrite, Storage, StorageFile, out_of_range,
};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Page size used when tearing the first unsynced page on a power cut.
pub const SIM_PAGE: usize = 4096;

/// A fault the simulated disk can be told to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFault {
    /// Every sync (`sync_range`, `sync_data`, `sync_dir`) fails with EIO.
    SyncError,
    /// Every allocation or extending write fails with ENOSPC, and so does
    /// making a directory (on ext4 a new directory takes a block).
    NoSpace,
    /// Every open of a file and every directory sync (which opens the
    /// directory) fails with EMFILE: the process is out of descriptors.
    /// Files already open are unaffected.
    OutOfFiles,
    /// Every new map of a file (`map_read`, `map_append`) fails with
    /// ENOMEM: the process is out of address space. Maps already made are
    /// unaffected.
    OutOfMemory,
}

/// An operation a [`SimDisk::set_hook`] hook runs before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOp {
    /// [`StorageFile::sync_data`] of the file at the path.
    SyncData,
    /// [`Storage::sync_dir`] of the directory at the path.
    SyncDir,
    /// [`Storage::remove_file`] of the path.
    Remove,
}

/// A hook run before some operations (see [`SimDisk::set_hook`]).
pub type SimHook = Arc<dyn Fn(SimOp, &Path) + Send + Sync>;

#[derive(Clone, Default)]
struct HookSlot(Option<SimHook>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(hook)"
        } else {
            "None"
        })
    }
}

/// An in-memory disk with a durable image and simulated power cuts.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
    hook: Arc<Mutex<HookSlot>>,
}

#[derive(Debug, Default)]
struct SimState {
    /// Bumped by every power cut; handles from an older generation are dead.
    generation: u64,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    live: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    durable_dirs: BTreeSet<PathBuf>,
    locks: BTreeMap<PathBuf, String>,
    capacity: Option<u64>,
    sync_error: bool,
    no_space: bool,
    out_of_files: bool,
    out_of_memory: bool,
    /// Bytes writes into files may still take before every write fails
    /// with ENOSPC (see [`SimDisk::fail_writes_after`]).
    write_budget: Option<u64>,
    syncs: u64,
    /// After this many syncs the power is off: every later call fails.
    power_off_after: Option<u64>,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

fn eio(msg: &str) -> io::Error {
    io::Error::other(msg.to_owned())
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error())
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimState {
    fn check_power(&self, generation: u64) -> io::Result<()> {
        if generation != self.generation {
            return Err(eio(
                "stale handle: the simulated machine lost power since it was opened",
            ));
        }
        if self.power_off_after.is_some_and(|n| self.syncs >= n) {
            return Err(eio("simulated power loss"));
        }
        Ok(())
    }

    /// How many of the `len` bytes a write at `pos` puts in place before the
    /// write budget runs out (all of them without one), in whole 4 KiB
    /// blocks of the file as a filesystem allocates them; takes them from it.
    fn take_write_budget(&mut self, pos: u64, len: usize) -> usize {
        const BLOCK: u64 = 4096;
        match &mut self.write_budget {
            None => len,
            Some(left) if len as u64 <= *left => {
                *left -= len as u64;
                len
            }
            Some(left) => {
                let fits = ((pos + *left) / BLOCK * BLOCK).saturating_sub(pos);
                *left = 0;
                fits as usize
            }
        }
    }

    fn check_memory(&self) -> io::Result<()> {
        if self.out_of_memory {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOMEM.raw_os_error(),
            ));
        }
        Ok(())
    }

    fn check_files(&self) -> io::Result<()> {
        if self.out_of_files {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::MFILE.raw_os_error(),
            ));
        }
        Ok(())
    }

    fn count_sync(&mut self) -> io::Result<()> {
        if self.sync_error {
            return Err(eio("simulated sync failure"));
        }
        self.syncs += 1;
        Ok(())
    }

    fn used(&self) -> u64 {
        let live: BTreeSet<u64> = self.live.values().copied().collect();
        live.iter()
            .filter_map(|ino| self.inodes.get(ino))
            .map(|i| i.live.len() as u64)
            .sum()
    }

    fn grow(&mut self, ino: u64, len: u64) -> io::Result<()> {
        let current = self.inodes.get(&ino).map_or(0, |i| i.live.len() as u64);
        if len <= current {
            return Ok(());
        }
        if self.no_space
            || self
                .capacity
                .is_some_and(|cap| self.used() + (len - current) > cap)
        {
            return Err(enospc());
        }
        let inode = self
            .inodes
            .get_mut(&ino)
            .ok_or_else(|| eio("inode vanished"))?;
        inode.live.resize(len as usize, 0);
        Ok(())
    }

    /// Moves a directory with everything below it, in the live and the
    /// durable image at once (like a directory's creation; see the module docs).
    fn rename_dir(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if self.live.contains_key(to) || self.dirs.contains(to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", to.display()),
            ));
        }
        if !self.dirs.contains(&parent(to)) {
            return Err(not_found(&parent(to)));
        }
        let moved = |p: &Path| -> Option<PathBuf> { p.strip_prefix(from).ok().map(|r| to.join(r)) };
        for files in [&mut self.live, &mut self.durable] {
            let below: Vec<PathBuf> = files
                .keys()
                .filter(|p| p.starts_with(from))
                .cloned()
                .collect();
            for p in below {
                if let (Some(ino), Some(new)) = (files.remove(&p), moved(&p)) {
                    files.insert(new, ino);
                }
            }
        }
        for dirs in [&mut self.dirs, &mut self.durable_dirs] {
            let below: Vec<PathBuf> = dirs
                .iter()
                .filter(|p| p.starts_with(from))
                .cloned()
                .collect();
            for p in below {
                dirs.remove(&p);
                if let Some(new) = moved(&p) {
                    dirs.insert(new);
                }
            }
        }
        Ok(())
    }

    fn inode(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| eio("inode vanished"))
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock_state(&self) -> MutexGuard<'_, SimState> {
        // A panic elsewhere while holding the lock leaves plain data behind; the
        // simulated disk stays usable for the test that is reporting it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `hook` before every file sync, directory sync and file removal,
    /// on the calling thread and holding none of the disk's locks (so it may
    /// call into whatever uses the disk); `None` removes it. For tests that
    /// aim a concurrent request at a precise step of another.
    pub fn set_hook(&self, hook: Option<SimHook>) {
        self.hook.lock().unwrap_or_else(|p| p.into_inner()).0 = hook;
    }

    fn run_hook(&self, op: SimOp, path: &Path) {
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();
        if let Some(hook) = hook {
            hook(op, path);
        }
    }

    /// Limits the total live size of all files (None = unlimited).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock_state().capacity = bytes;
    }

    /// Turns a fault on or off.
    pub fn set_fault(&self, fault: SimFault, on: bool) {
        let mut state = self.lock_state();
        match fault {
            SimFault::SyncError => state.sync_error = on,
            SimFault::NoSpace => state.no_space = on,
            SimFault::OutOfFiles => state.out_of_files = on,
            SimFault::OutOfMemory => state.out_of_memory = on,
        }
    }

    /// A copy-on-write filesystem filling up: once `bytes` more bytes have
    /// been written into files, every write fails with ENOSPC, even over
    /// blocks a file already holds (there each rewrite takes new ones). A
    /// write that crosses the limit puts the whole 4 KiB blocks of it that
    /// fit in place and then fails, as a `pwrite` cut short by a full disk.
    /// `None` lifts it.
    pub fn fail_writes_after(&self, bytes: Option<u64>) {
        self.lock_state().write_budget = bytes;
    }

    /// Number of successful syncs so far.
    pub fn sync_count(&self) -> u64 {
        self.lock_state().syncs
    }

    /// Cuts the power once `syncs` syncs have completed in total: from then on
    /// every call fails, as if the machine had stopped between two syncs.
    pub fn power_off_after_syncs(&self, syncs: Option<u64>) {
        self.lock_state().power_off_after = syncs;
    }

    /// Whether a scheduled power-off has happened.
    pub fn is_powered_off(&self) -> bool {
        let state = self.lock_state();
        state.power_off_after.is_some_and(|n| state.syncs >= n)
    }

    /// Simulates a power failure and reboot: every unsynced byte and name is
    /// lost, locks are released, open handles die. With `tear = Some(seed)`, the
    /// first unsynced page of each file keeps a seed-chosen prefix of its new
    /// bytes (a write torn at the moment of the cut).
    pub fn power_cut(&self, tear: Option<u64>) {
        let mut state = self.lock_state();
        state.generation += 1;
        state.power_off_after = None;
        state.locks.clear();
        state.live = state.durable.clone();
        state.dirs = state.durable_dirs.clone();
        let referenced: BTreeSet<u64> = state.durable.values().copied().collect();
        state.inodes.retain(|ino, _| referenced.contains(ino));
        for (ino, inode) in state.inodes.iter_mut() {
            if let Some(seed) = tear {
                tear_first_unsynced_page(inode, seed ^ ino.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            }
            inode.live = inode.durable.clone();
        }
    }

    /// The live content of a file (for tests that inspect or damage files).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock_state();
        let ino = state.live.get(path).ok_or_else(|| not_found(path))?;
        Ok(state
            .inodes
            .get(ino)
            .map(|i| i.live.clone())
            .unwrap_or_default())
    }

    /// Overwrites bytes of a file in both the live and the durable image, as
    /// damage on the medium would (for corruption tests).
    pub fn damage(&self, path: &Path, pos: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.lock_state();
        let ino = *state.live.get(path).ok_or_else(|| not_found(path))?;
        let inode = state.inode(ino)?;
        for image in [&mut inode.live, &mut inode.durable] {
            let end = (pos as usize + data.len()).min(image.len());
            if (pos as usize) < end {
                image[pos as usize..end].copy_from_slice(&data[..end - pos as usize]);
            }
        }
        Ok(())
    }

    /// Truncates a file in both images (for corruption tests).
    pub fn damage_truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut state = self.lock_state();
        let ino = *state.live.get(path).ok_or_else(|| not_found(path))?;
        let inode = state.inode(ino)?;
        inode.live.truncate(len as usize);
        inode.durable.truncate(len as usize);
        Ok(())
    }
}

/// Persists a prefix of the first page where the live image differs from the
/// durable one.
fn tear_first_unsynced_page(inode: &mut Inode, seed: u64) {
    let common = inode.live.len().min(inode.durable.len());
    let first_diff = (0..common)
        .find(|&i| inode.live[i] != inode.durable[i])
        .or((inode.live.len() > inode.durable.len()).then_some(common));
    let Some(first_diff) = first_diff else {
        return;
    };
    let page_start = first_diff - first_diff % SIM_PAGE;
    let page_end = (page_start + SIM_PAGE).min(inode.live.len());
    let keep = page_start + (seed as usize % (page_end - page_start + 1));
    if inode.durable.len() < keep {
        inode.durable.resize(keep, 0);
    }
    inode.durable[page_start..keep].copy_from_slice(&inode.live[page_start..keep]);
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl Storage for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        let full = state.no_space || state.capacity.is_some_and(|cap| state.used() >= cap);
        if full && !state.dirs.contains(dir) {
            return Err(enospc());
        }
        for ancestor in dir.ancestors() {
            if ancestor.as_os_str().is_empty() {
                continue;
            }
            state.dirs.insert(ancestor.to_owned());
            state.durable_dirs.insert(ancestor.to_owned());
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock_state();
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let files = state.live.keys();
        let dirs = state.dirs.iter();
        Ok(files
            .chain(dirs)
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock_state();
        state.live.contains_key(path) || state.dirs.contains(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.lock_state().dirs.contains(path)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        state.check_files()?;
        if !state.dirs.contains(&parent(path)) {
            return Err(not_found(&parent(path)));
        }
        let ino = match (state.live.get(path).copied(), mode) {
            (Some(_), OpenMode::CreateNew) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (Some(ino), _) => ino,
            (None, OpenMode::Existing | OpenMode::ReadOnly) => return Err(not_found(path)),
            (None, _) => {
                state.next_ino += 1;
                let ino = state.next_ino;
                state.inodes.insert(ino, Inode::default());
                state.live.insert(path.to_owned(), ino);
                ino
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            ino,
            generation: state.generation,
            path: path.to_owned(),
            writable: mode != OpenMode::ReadOnly,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        if state.dirs.contains(from) {
            return state.rename_dir(from, to);
        }
        let ino = state.live.remove(from).ok_or_else(|| not_found(from))?;
        state.live.insert(to.to_owned(), ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.run_hook(SimOp::Remove, path);
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        state
            .live
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        state.live.retain(|p, _| !p.starts_with(path));
        state.dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run_hook(SimOp::SyncDir, dir);
        let mut state = self.lock_state();
        state.check_power(state.generation)?;
        state.check_files()?;
        state.count_sync()?;
        let live_children: Vec<(PathBuf, u64)> = state
            .live
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, ino)| (p.clone(), *ino))
            .collect();
        let dirs = state.dirs.clone();
        // Names directly in `dir` become what the live image says; entries below a
        // child directory that no longer exists go with it.
        state.durable.retain(|p, _| {
            if p.parent() == Some(dir) {
                return false;
            }
            match p
                .strip_prefix(dir)
                .ok()
                .and_then(|rest| rest.components().next())
            {
                Some(child) => dirs.contains(&dir.join(child)),
                None => true,
            }
        });
        state
            .durable_dirs
            .retain(|d| d.parent() != Some(dir) || dirs.contains(d));
        state.durable_dirs.retain(|d| {
            d.strip_prefix(dir)
                .ok()
                .and_then(|rest| rest.components().next())
                .is_none_or(|child| dirs.contains(&dir.join(child)))
        });
        state.durable.extend(live_children);
        Ok(())
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<Box<dyn LockGuard>, LockError> {
        let mut state = self.lock_state();
        if let Some(holder) = state.locks.get(path) {
            return Err(LockError::Held(holder.clone()));
        }
        state.locks.insert(path.to_owned(), owner.to_owned());
        Ok(Box::new(SimLock {
            disk: self.clone(),
            path: path.to_owned(),
            generation: state.generation,
        }))
    }
}

#[derive(Debug)]
struct SimLock {
    disk: SimDisk,
    path: PathBuf,
    generation: u64,
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut state = self.disk.lock_state();
        if state.generation == self.generation {
            state.locks.remove(&self.path);
        }
    }
}

/// A handle on a simulated file.
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
    generation: u64,
    path: PathBuf,
    /// False when opened [`OpenMode::ReadOnly`]: writes fail as on a
    /// descriptor opened for reading (EBADF), as on the real disk.
    writable: bool,
}

impl SimFile {
    /// Fails unless the file was opened for writing.
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened for reading only", self.path.display()),
            ))
        }
    }

    fn state(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let state = self.disk.lock_state();
        state.check_power(self.generation)?;
        Ok(state)
    }
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let mut state = self.state()?;
        Ok(state.inode(self.ino)?.live.len() as u64)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.state()?.grow(self.ino, len)
    }

    /// Zeros either way here: the simulated disk has no unwritten extents.
    fn allocate_written(&self, len: u64) -> io::Result<()> {
        self.allocate(len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut state = self.state()?;
        state.grow(self.ino, len)?;
        state.inode(self.ino)?.live.truncate(len as usize);
        Ok(())
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut state = self.state()?;
        let data = &state.inode(self.ino)?.live;
        let end = pos as usize + buf.len();
        if end > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: read past end", self.path.display()),
            ));
        }
        buf.copy_from_slice(&data[pos as usize..end]);
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        let mut state = self.state()?;
        state.grow(self.ino, pos + data.len() as u64)?;
        let n = state.take_write_budget(pos, data.len());
        let inode = state.inode(self.ino)?;
        inode.live[pos as usize..pos as usize + n].copy_from_slice(&data[..n]);
        if n < data.len() {
            return Err(enospc());
        }
        Ok(())
    }

    fn punch_hole(&self, pos: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut state = self.state()?;
        let live = &mut state.inode(self.ino)?.live;
        let end = pos.saturating_add(len).min(live.len() as u64);
        if pos < end {
            live[pos as usize..end as usize].fill(0);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.disk.run_hook(SimOp::SyncData, &self.path);
        let mut state = self.state()?;
        state.count_sync()?;
        let inode = state.inode(self.ino)?;
        inode.durable = inode.live.clone();
        Ok(())
    }

    fn map_read(&self) -> io::Result<Arc<dyn Mapping>> {
        self.state()?.check_memory()?;
        let len = self.len()?;
        Ok(Arc::new(SimMapping {
            file: self.reopen(),
            capacity: len,
            published: AtomicU64::new(len),
            writable: AtomicBool::new(false),
        }))
    }

    fn map_append(&self, capacity: u64, published: u64) -> io::Result<Arc<dyn Mapping>> {
        self.check_writable()?;
        self.state()?.check_memory()?;
        if published > capacity {
            return Err(out_of_range("published prefix", 0, published, capacity));
        }
        Ok(Arc::new(SimMapping {
            file: self.reopen(),
            capacity,
            published: AtomicU64::new(published),
            writable: AtomicBool::new(true),
        }))
    }
}

impl SimFile {
    fn reopen(&self) -> SimFile {
        SimFile {
            disk: self.disk.clone(),
            ino: self.ino,
            generation: self.generation,
            path: self.path.clone(),
            writable: self.writable,
        }
    }
}

/// A "map" of a simulated file: reads copy, writes go to the live image.
#[derive(Debug)]
struct SimMapping {
    file: SimFile,
    capacity: u64,
    published: AtomicU64,
    /// Takes writes until [`Mapping::seal`].
    writable: AtomicBool,
}

impl Mapping for SimMapping {
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
        let mut state = self.file.state().map_err(ShortWrite::none)?;
        let inode = state.inode(self.file.ino).map_err(ShortWrite::none)?;
        let end = pos + data.len() as u64;
        let allocated = (inode.live.len() as u64).min(self.capacity);
        // A real map raises SIGBUS past the end of the file: the engine must
        // allocate first, and this check proves it does.
        if pos < self.published() || end > allocated {
            return Err(ShortWrite::none(out_of_range(
                "map write",
                pos,
                data.len() as u64,
                allocated,
            )));
        }
        let n = state.take_write_budget(pos, data.len());
        let inode = state.inode(self.file.ino).map_err(ShortWrite::none)?;
        inode.live[pos as usize..pos as usize + n].copy_from_slice(&data[..n]);
        if n < data.len() {
            return Err(ShortWrite {
                written: n as u64,
                error: enospc(),
            });
        }
        Ok(())
    }

    fn publish(&self, end: u64) {
        self.published
            .fetch_max(end.min(self.capacity), Ordering::Release);
    }

    fn sync_range(&self, pos: u64, len: u64) -> io::Result<()> {
        let mut state = self.file.state()?;
        state.count_sync()?;
        let inode = state.inode(self.file.ino)?;
        // Only the bytes inside the durable file size: msync does not make a
        // size change durable.
        let end = ((pos + len) as usize)
            .min(inode.durable.len())
            .min(inode.live.len());
        let start = (pos as usize).min(end);
        let Inode { live, durable } = inode;
        durable[start..end].copy_from_slice(&live[start..end]);
        Ok(())
    }

    fn bytes(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        let published = self.published();
        if pos + len > published {
            return Err(out_of_range("map read", pos, len, published));
        }
        let mut buf = vec![0u8; len as usize];
        self.file.read_at(pos, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// Nothing: the simulated disk keeps unsynced bytes until a sync, which
    /// is what a power cut may lose whether writeback started or not.
    fn start_writeback(&self, _pos: u64, _len: u64) {}
}
