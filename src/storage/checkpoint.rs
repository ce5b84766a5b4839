//! A log's recovery point and manifest: which bytes of its active segment and
//! of its state journals are known to be synced, which segments and journals
//! it owns, and whether the last stop was clean. Only bytes past the recovery
//! point may be cut as a torn write; a bad record below it is damage.
//!
//! The file `checkpoint` in the log's directory holds one record framed like a
//! segment record (magic, length, CRC over everything; see
//! [`crate::storage::record`]) whose offset is [`CHECKPOINT_VERSION`] and whose
//! value is this payload, little-endian:
//!
//! | bytes  | field            | meaning                                                |
//! |--------|------------------|--------------------------------------------------------|
//! | 1      | flags            | bit 0: clean stop (everything below is exactly the end)|
//! | 8      | durable_end      | every offset below it was synced                       |
//! | 8      | active_base      | base of the segment the synced position is in          |
//! | 8      | active_synced    | bytes of that segment known synced                     |
//! | 4      | segment count    | n                                                      |
//! | 8 × n  | segment bases    | every segment the log owns, ascending                  |
//! | 4      | journal count    | m                                                      |
//! | per journal: 2 name length, name (UTF-8), 8 base_seq, 8 synced_len               |||
//!
//! A journal's `base_seq` is the first sequence number its file holds (the
//! snapshot's cut); `synced_len` counts bytes from the start of that file. A
//! journal whose snapshot has moved past `base_seq` was reset after the
//! checkpoint, so the point says nothing about its new bytes.
//!
//! The file is replaced atomically (temp file, fsync, rename, dir fsync). It is
//! written when a log is created or opened, every few seconds while the log
//! changes, before segments or journals are removed (so a removal is never
//! taken for a loss), and on a clean stop with the clean flag set.

use super::io::{OpenMode, Storage, file_len, read_file_within, write_file_atomic};
use super::log::LogStats;
use super::message::NewMessage;
use super::message::Offset;
use super::record::{self, Frame};
use crate::error::{Corruption, Error, IoContext, Result};
use bytes::Bytes;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Name of the checkpoint file in a log's directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Format version, stored as the record's offset.
pub const CHECKPOINT_VERSION: u64 = 1;
const FLAG_CLEAN: u8 = 1;
/// Largest checkpoint accepted.
const MAX_CHECKPOINT_BYTES: u32 = 64 * 1024 * 1024;

/// The recovery point of one journal (group state, deletions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalPoint {
    /// Path of the journal relative to the log's directory, without suffix
    /// (`deletes`, `groups/<name>`).
    pub name: String,
    /// First sequence number the journal file holds.
    pub base_seq: u64,
    /// Bytes of the journal file known synced.
    pub synced_len: u64,
}

/// What a log knows to be durable and what it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Written by a clean stop: every file ends exactly at its point.
    pub clean: bool,
    /// Every offset below this was synced.
    pub durable_end: u64,
    /// Base of the segment `active_synced` counts in.
    pub active_base: u64,
    /// Bytes of segment `active_base` known synced.
    pub active_synced: u64,
    /// Every segment the log owns, ascending.
    pub segments: Vec<u64>,
    /// Recovery points of the state journals beside the log.
    pub journals: Vec<JournalPoint>,
}

impl Checkpoint {
    /// The log's figures as a clean stop left them, without opening the
    /// log: its segments, its end (everything was synced), and its bytes
    /// (the sealed segments' file sizes and the active one's synced bytes).
    /// `start` is the first segment's base.
    pub fn stats_after_clean_stop(&self, storage: &dyn Storage, dir: &Path) -> LogStats {
        let (sealed, active) = match self.segments.split_last() {
            Some((_, sealed)) => (sealed, self.active_synced),
            None => (&[][..], 0),
        };
        let sealed_bytes: u64 = sealed
            .iter()
            .filter_map(|&base| {
                let path = dir.join(super::segment::log_name(base));
                storage.open(&path, OpenMode::Existing).ok()?.len().ok()
            })
            .sum();
        LogStats {
            start: Offset(
                self.segments
                    .first()
                    .copied()
                    .unwrap_or(self.durable_end)
                    .min(self.durable_end),
            ),
            end: Offset(self.durable_end),
            durable_end: Offset(self.durable_end),
            segments: self.segments.len(),
            bytes: sealed_bytes + active,
        }
    }

    /// The point of journal `name`, if recorded.
    pub fn journal(&self, name: &str) -> Option<&JournalPoint> {
        self.journals.iter().find(|j| j.name == name)
    }

    /// The segments the checkpoint lists that are neither among `bases` (on
    /// disk) nor retired by a completed or pending compaction swap
    /// (`swaps`, see [`covered_by_swap`]), each with the offsets it held.
    pub fn missing_segments(&self, bases: &[u64], swaps: &[Range<u64>]) -> Vec<(u64, Range<u64>)> {
        let listed = &self.segments;
        listed
            .iter()
            .enumerate()
            .filter(|&(_, &base)| {
                bases.binary_search(&base).is_err() && !covered_by_swap(base, swaps)
            })
            .map(|(i, &base)| {
                let until = listed
                    .get(i + 1)
                    .copied()
                    .unwrap_or(self.durable_end)
                    .max(base);
                (base, base..until)
            })
            .collect()
    }

    /// Encodes the payload (see the module's byte table).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(33 + 8 * self.segments.len() + 32 * self.journals.len());
        b.push(if self.clean { FLAG_CLEAN } else { 0 });
        b.extend_from_slice(&self.durable_end.to_le_bytes());
        b.extend_from_slice(&self.active_base.to_le_bytes());
        b.extend_from_slice(&self.active_synced.to_le_bytes());
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for base in &self.segments {
            b.extend_from_slice(&base.to_le_bytes());
        }
        b.extend_from_slice(&(self.journals.len() as u32).to_le_bytes());
        for j in &self.journals {
            b.extend_from_slice(&(j.name.len() as u16).to_le_bytes());
            b.extend_from_slice(j.name.as_bytes());
            b.extend_from_slice(&j.base_seq.to_le_bytes());
            b.extend_from_slice(&j.synced_len.to_le_bytes());
        }
        b
    }

    /// Decodes a payload; `None` when it does not parse.
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        let mut r = Fields(b);
        let flags = r.take::<1>()?[0];
        let mut c = Checkpoint {
            clean: flags & FLAG_CLEAN != 0,
            durable_end: r.u64()?,
            active_base: r.u64()?,
            active_synced: r.u64()?,
            ..Checkpoint::default()
        };
        for _ in 0..r.u32()? {
            c.segments.push(r.u64()?);
        }
        for _ in 0..r.u32()? {
            let len = u16::from_le_bytes(r.take()?) as usize;
            let name = std::str::from_utf8(r.bytes(len)?).ok()?.to_owned();
            c.journals.push(JournalPoint {
                name,
                base_seq: r.u64()?,
                synced_len: r.u64()?,
            });
        }
        (r.0.is_empty() && c.segments.windows(2).all(|w| w[0] < w[1])).then_some(c)
    }

    /// Reads the checkpoint of the log in `dir`: `Ok(None)` when there is
    /// none (a log written before checkpoints existed), damage when it does
    /// not validate.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<Checkpoint>> {
        let path = path(dir);
        if !storage.exists(&path) {
            return Ok(None);
        }
        let data = match read_file_within(storage, &path, u64::from(MAX_CHECKPOINT_BYTES)) {
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(Error::corruption(Corruption {
                    file: path.clone(),
                    bytes: 0..file_len(storage, &path),
                    offsets: None,
                    detail: format!("checkpoint does not validate: {e}"),
                }));
            }
            other => other.ctx(|| format!("reading {}", path.display()))?,
        };
        let damaged = |detail: String| {
            Error::corruption(Corruption {
                file: path.clone(),
                bytes: 0..data.len() as u64,
                offsets: None,
                detail,
            })
        };
        match record::decode(&data, MAX_CHECKPOINT_BYTES) {
            Ok(Frame::Record(r))
                if r.offset == CHECKPOINT_VERSION && r.len as usize == data.len() =>
            {
                Checkpoint::decode(r.value).map(Some).ok_or_else(|| {
                    damaged("checkpoint passed its checksum but does not parse".into())
                })
            }
            Ok(Frame::Record(r)) if r.offset != CHECKPOINT_VERSION => Err(damaged(format!(
                "checkpoint version {} is not {CHECKPOINT_VERSION}",
                r.offset
            ))),
            Ok(Frame::Record(r)) => Err(damaged(format!(
                "checkpoint holds {} bytes after its record of {} bytes",
                data.len() - r.len as usize,
                r.len
            ))),
            Ok(Frame::End) if data.iter().all(|&b| b == 0) => Err(damaged(format!(
                "checkpoint is {}",
                if data.is_empty() {
                    "empty"
                } else {
                    "all zeros"
                }
            ))),
            Ok(Frame::End) => Err(damaged("checkpoint does not start with a record".into())),
            Err(e) => Err(damaged(format!("checkpoint does not validate: {e}"))),
        }
    }

    /// Replaces the checkpoint of the log in `dir`, durably.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        let mut buf = Vec::new();
        record::encode(
            &mut buf,
            CHECKPOINT_VERSION,
            0,
            &NewMessage::from_value(Bytes::from(self.encode())),
        );
        let path = path(dir);
        write_file_atomic(storage, &path, &buf).ctx(|| format!("writing {}", path.display()))
    }

    /// Removes the checkpoint of the log in `dir`, durably: the log then
    /// has no recovery point or manifest until the next [`Checkpoint::store`].
    pub fn remove(storage: &dyn Storage, dir: &Path) -> Result<()> {
        let path = path(dir);
        storage
            .remove_file(&path)
            .ctx(|| format!("removing {}", path.display()))?;
        storage
            .sync_dir(dir)
            .ctx(|| format!("syncing {}", dir.display()))
    }
}

/// Whether segment `base` lies inside a compaction swap `base..until` of
/// `swaps` (after its first segment): the swap retires it on purpose.
pub fn covered_by_swap(base: u64, swaps: &[Range<u64>]) -> bool {
    swaps.iter().any(|r| r.start < base && base < r.end)
}

/// The checkpoint file of the log in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Little-endian field reader.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::{SimDisk, read_file};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn arb_checkpoint() -> impl Strategy<Value = Checkpoint> {
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::btree_set(any::<u64>(), 0..8),
            proptest::collection::vec(("[a-z/]{1,20}", any::<u64>(), any::<u64>()), 0..6),
        )
            .prop_map(
                |(clean, durable_end, active_base, active_synced, segs, js)| Checkpoint {
                    clean,
                    durable_end,
                    active_base,
                    active_synced,
                    segments: segs.into_iter().collect(),
                    journals: js
                        .into_iter()
                        .map(|(name, base_seq, synced_len)| JournalPoint {
                            name,
                            base_seq,
                            synced_len,
                        })
                        .collect(),
                },
            )
    }

    proptest! {
        #[test]
        fn every_checkpoint_round_trips(c in arb_checkpoint()) {
            prop_assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        }

        #[test]
        fn a_cut_payload_never_decodes(c in arb_checkpoint(), cut in 1usize..64) {
            let b = c.encode();
            let keep = b.len().saturating_sub(cut);
            prop_assert_eq!(Checkpoint::decode(&b[..keep]), None);
        }
    }

    #[test]
    fn a_flipped_byte_in_the_file_is_damage_naming_it() {
        let disk = Arc::new(SimDisk::new());
        let dir = Path::new("/t");
        disk.create_dir_all(dir).expect("dir");
        let c = Checkpoint {
            durable_end: 10,
            segments: vec![0],
            ..Checkpoint::default()
        };
        c.store(&*disk, dir).expect("store");
        assert_eq!(Checkpoint::load(&*disk, dir).expect("load"), Some(c));
        disk.damage(&path(dir), 30, &[0x55]).expect("flip");
        let err = Checkpoint::load(&*disk, dir).expect_err("damage");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    /// Each way a checkpoint file can be wrong is said in words, not as
    /// the decoder's internals.
    #[test]
    fn a_checkpoint_that_does_not_validate_says_how() {
        let disk = Arc::new(SimDisk::new());
        let dir = Path::new("/t");
        disk.create_dir_all(dir).expect("dir");
        Checkpoint::default().store(&*disk, dir).expect("store");
        let mut trailing = read_file(&*disk, &path(dir)).expect("read");
        trailing.extend([7u8; 3]);
        for (bytes, want) in [
            (Vec::new(), "checkpoint is empty"),
            (vec![0u8; 40], "checkpoint is all zeros"),
            (trailing, "holds 3 bytes after its record"),
        ] {
            crate::storage::io::write_file_atomic(&*disk, &path(dir), &bytes).expect("write");
            let err = Checkpoint::load(&*disk, dir).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
            assert!(!err.contains("Ok(") && !err.contains("RecordRef"), "{err}");
        }
    }
}
