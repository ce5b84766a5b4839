//! Per-log settings: segment size and age, index density, retention, fsync
//! policy, and how recovery treats damage.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Default segment size: 128 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;
/// Default bytes of log between two index entries.
pub const DEFAULT_INDEX_INTERVAL_BYTES: u32 = 4096;
/// Largest segment: positions are stored as u32.
pub const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;
/// Smallest segment accepted.
pub const MIN_SEGMENT_BYTES: u64 = 1024;
/// Longest duration a time setting accepts: 100 years, in milliseconds.
pub const MAX_DURATION_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// When appended data is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum FsyncPolicy {
    /// Every commit syncs before it is acknowledged (acks are `Durable`).
    #[default]
    Always,
    /// Commits are acknowledged from the page cache (`Written`); a sync runs at
    /// most this many milliseconds after the previous one.
    Interval(u64),
    /// Only sealing, closing and explicit syncs reach the disk.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(ms) => write!(f, "interval:{ms}"),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<FsyncPolicy> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => other
                .strip_prefix("interval:")
                // Digits only: `parse` would take a sign too.
                .filter(|ms| ms.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|ms| ms.parse().ok())
                .filter(|ms| *ms > 0)
                .map(FsyncPolicy::Interval)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "fsync {other:?}: expected always, never or interval:MS (MS > 0)"
                    ))
                }),
        }
    }
}

impl TryFrom<String> for FsyncPolicy {
    type Error = Error;
    fn try_from(s: String) -> Result<FsyncPolicy> {
        s.parse()
    }
}

impl From<FsyncPolicy> for String {
    fn from(p: FsyncPolicy) -> String {
        p.to_string()
    }
}

/// What an acknowledgement stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Durability {
    /// In the page cache: survives a crash of the broker, not of the machine.
    Written,
    /// Synced to the disk: survives power loss.
    Durable,
}

/// How opening a log treats damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Default: cut a torn tail of the active segment (a write the crash
    /// interrupted); refuse to open on any other damage, naming file, byte range
    /// and offsets.
    #[default]
    TolerateTornTail,
    /// Open anyway: check every record of every segment (not only the tail
    /// the default mode scans), copy each damaged range to `quarantine/`,
    /// replace it in the segment with a filler record that readers skip, and
    /// report it.
    SkipDamaged,
}

impl FromStr for RecoveryMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<RecoveryMode> {
        match s {
            "tolerate-torn-tail" => Ok(RecoveryMode::TolerateTornTail),
            "skip-damaged" => Ok(RecoveryMode::SkipDamaged),
            other => Err(Error::InvalidArgument(format!(
                "recovery mode {other:?}: expected tolerate-torn-tail or skip-damaged"
            ))),
        }
    }
}

/// Settings of one log (one topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A segment is sealed and a new one started when the next record would
    /// not fit in this many bytes.
    pub segment_bytes: u64,
    /// A non-empty segment is also rolled once it is this old (milliseconds).
    pub segment_ms: Option<u64>,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u32,
    /// Whole sealed segments are dropped while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Whole sealed segments whose newest record is older than this are dropped.
    pub retention_ms: Option<u64>,
    /// When appends reach the disk.
    pub fsync: FsyncPolicy,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            segment_ms: None,
            index_interval_bytes: DEFAULT_INDEX_INTERVAL_BYTES,
            retention_bytes: None,
            retention_ms: None,
            fsync: FsyncPolicy::Always,
        }
    }
}

impl LogConfig {
    /// Checks the settings, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(Error::InvalidArgument(format!(
                "segment_bytes {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(Error::InvalidArgument(
                "index_interval_bytes must be positive".into(),
            ));
        }
        if self.segment_ms == Some(0) {
            return Err(Error::InvalidArgument("segment_ms must be positive".into()));
        }
        if let Some(bytes) = self.retention_bytes
            && bytes < self.segment_bytes
        {
            return Err(Error::InvalidArgument(format!(
                "retention_bytes {bytes} is below segment_bytes {}: retention drops whole \
                 segments, so it must allow at least one",
                self.segment_bytes
            )));
        }
        if let Some(ms) = self.retention_ms
            && !(1..=MAX_DURATION_MS).contains(&ms)
        {
            return Err(Error::InvalidArgument(format!(
                "retention_ms {ms} is outside 1..={MAX_DURATION_MS} (100 years)"
            )));
        }
        Ok(())
    }

    /// Largest record a segment can hold.
    pub fn max_record_len(&self) -> u32 {
        u32::try_from(self.segment_bytes).unwrap_or(u32::MAX)
    }

    /// Largest message the log takes, counted as key + value + headers (see
    /// [`crate::storage::record::payload_len`]): a whole record, header
    /// included, must fit in one segment.
    pub fn max_message_bytes(&self) -> u64 {
        u64::from(self.max_record_len()).saturating_sub(crate::storage::record::HEADER_LEN as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for text in ["always", "never", "interval:50"] {
            let p: FsyncPolicy = text.parse().expect("valid policy");
            assert_eq!(p.to_string(), text);
        }
        for bad in [
            "sometimes",
            "interval:",
            "interval:0",
            "interval:x",
            "interval:+5",
            "interval: 5",
        ] {
            let err = bad.parse::<FsyncPolicy>().expect_err("invalid policy");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let c = LogConfig {
            segment_bytes: 10,
            ..LogConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("too small")
                .to_string()
                .contains("segment_bytes")
        );
    }
}
