//! A topic's settings, stored as `topic.toml` in its folder (replaced
//! atomically), and the rules for topic names.

use crate::error::{Error, IoContext, Result};
use crate::groups::state::{DEFAULT_ACK_TIMEOUT_MS, DEFAULT_MAX_DELIVERIES};
use crate::storage::LogConfig;
use crate::storage::config::MAX_DURATION_MS;
use crate::storage::io::{Storage, read_file_within, write_file_atomic};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name of the config file in a topic's folder.
pub const TOPIC_CONFIG_FILE: &str = "topic.toml";
/// Most bytes a `topic.toml` is read from: the broker writes a few hundred.
const MAX_TOPIC_CONFIG_BYTES: u64 = 1024 * 1024;
/// Longest topic or group name.
pub const MAX_NAME_LEN: usize = 200;
/// Default period of the background compaction check: one minute.
pub const DEFAULT_COMPACT_CHECK_MS: u64 = 60_000;

/// What happens to old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Cleanup {
    /// Retention drops old segments; deleted records are reclaimed by compaction.
    #[default]
    Delete,
    /// Compaction also keeps only the latest record per key.
    Compact,
}

/// Settings of one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// `delete` (default) or `compact` (keep the latest record per key).
    pub cleanup: Cleanup,
    /// Queue-style: a message is deleted once every group has completed it.
    pub delete_when_consumed: bool,
    /// Dead-letter topic of queue groups (default `<topic>.dlq`).
    pub dead_letter: Option<String>,
    /// Deliveries before a queue group dead-letters a message.
    pub max_deliveries: u32,
    /// Lease of a queue delivery, in milliseconds.
    pub ack_timeout_ms: u64,
    /// How long a tombstone survives compaction, in milliseconds.
    pub delete_retention_ms: u64,
    /// Background compaction: the broker compacts the topic by itself once
    /// at least this share (0 < ratio ≤ 1) of its sealed bytes is removable.
    /// Off when absent.
    pub compact_min_dirty_ratio: Option<f64>,
    /// How often background compaction measures the removable share, in
    /// milliseconds (each measurement reads the sealed segments).
    pub compact_check_ms: u64,
    /// Retention keeps segments that hold messages some group has not
    /// completed, until they are twice `retention_ms` old or the log exceeds
    /// `retention_bytes_max`.
    pub retention_respects_groups: bool,
    /// Hard size limit of a topic under `retention_respects_groups`: above
    /// it retention drops segments whatever the groups still need.
    pub retention_bytes_max: Option<u64>,
    /// A topic nobody wrote to or read for this long (milliseconds), with
    /// no group, is deleted. Off when absent.
    pub delete_when_idle_ms: Option<u64>,
    /// The log: segments, retention, fsync policy.
    pub log: LogConfig,
}

impl Default for TopicConfig {
    fn default() -> TopicConfig {
        TopicConfig {
            cleanup: Cleanup::Delete,
            delete_when_consumed: false,
            dead_letter: None,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            delete_retention_ms: 24 * 60 * 60 * 1000,
            compact_min_dirty_ratio: None,
            compact_check_ms: DEFAULT_COMPACT_CHECK_MS,
            retention_respects_groups: false,
            retention_bytes_max: None,
            delete_when_idle_ms: None,
            log: LogConfig::default(),
        }
    }
}

impl TopicConfig {
    /// Checks every setting, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.log.validate()?;
        if self.max_deliveries == 0 {
            return Err(Error::InvalidArgument(
                "max_deliveries must be at least 1".into(),
            ));
        }
        if self.ack_timeout_ms == 0 {
            return Err(Error::InvalidArgument(
                "ack_timeout_ms must be positive".into(),
            ));
        }
        if let Some(ratio) = self.compact_min_dirty_ratio
            && !(ratio > 0.0 && ratio <= 1.0)
        {
            return Err(Error::InvalidArgument(format!(
                "compact_min_dirty_ratio {ratio}: expected a share above 0 and at most 1"
            )));
        }
        if self.compact_check_ms == 0 {
            return Err(Error::InvalidArgument(
                "compact_check_ms must be positive".into(),
            ));
        }
        if !(1..=MAX_DURATION_MS).contains(&self.delete_retention_ms) {
            return Err(Error::InvalidArgument(format!(
                "delete_retention_ms {} is outside 1..={MAX_DURATION_MS} (100 years)",
                self.delete_retention_ms
            )));
        }
        if let Some(ms) = self.delete_when_idle_ms
            && !(1..=MAX_DURATION_MS).contains(&ms)
        {
            return Err(Error::InvalidArgument(format!(
                "delete_when_idle_ms {ms} is outside 1..={MAX_DURATION_MS} (100 years)"
            )));
        }
        if let Some(max) = self.retention_bytes_max {
            let floor = self.log.retention_bytes.unwrap_or(self.log.segment_bytes);
            if max < floor {
                return Err(Error::InvalidArgument(format!(
                    "retention_bytes_max {max} is below {} {floor}",
                    if self.log.retention_bytes.is_some() {
                        "retention_bytes"
                    } else {
                        "segment_bytes"
                    }
                )));
            }
        }
        if let Some(dlq) = &self.dead_letter {
            validate_name("topic", dlq)
                .map_err(|e| Error::InvalidArgument(format!("dead_letter: {e}")))?;
        }
        Ok(())
    }

    /// Dead-letter topic of `topic`.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{topic}.dlq"))
    }

    /// Reads `topic.toml` from `dir`, if present.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<TopicConfig>> {
        let path = dir.join(TOPIC_CONFIG_FILE);
        let buf = match read_file_within(storage, &path, MAX_TOPIC_CONFIG_BYTES) {
            // Only a file that is not there is no config: one that cannot be
            // read (a folder without search permission) is an error naming it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // Too large to be a config is a config that does not parse.
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(Error::InvalidArgument(format!("{}: {e}", path.display())));
            }
            read => read.ctx(|| format!("reading {}", path.display()))?,
        };
        let text = String::from_utf8(buf)
            .map_err(|_| Error::InvalidArgument(format!("{} is not UTF-8", path.display())))?;
        let config: TopicConfig = toml::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!("{}: {}", path.display(), toml_error(&text, &e)))
        })?;
        config.validate().map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
            other => other,
        })?;
        // A topic that is its own dead-letter topic, which a create refuses
        // (a file edited by hand): each lapsed lease would append another
        // copy of the message to the topic that failed it.
        if let Some(name) = dir.file_name().and_then(|n| n.to_str())
            && config.dead_letter_topic(name) == name
        {
            return Err(Error::InvalidArgument(format!(
                "{}: dead_letter: dead letters of topic {name} would come back to it",
                path.display()
            )));
        }
        Ok(Some(config))
    }

    /// Writes `topic.toml` into `dir` atomically and durably.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        let path = dir.join(TOPIC_CONFIG_FILE);
        let text = toml::to_string(self)
            .map_err(|e| Error::InvalidArgument(format!("topic config cannot be stored: {e}")))?;
        write_file_atomic(storage, &path, text.as_bytes())
            .ctx(|| format!("writing {}", path.display()))
    }
}

/// Topic and group names: `[A-Za-z0-9._-]{1,200}`, not `.` or `..`.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} name {name:?} is invalid: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - (not . or ..)"
        )))
    }
}

/// A TOML parse error of `text` on one line: where (line and column), the
/// setting whose value it is, and what, without the excerpt the parser's
/// own message draws over several.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let so_far = before.rsplit('\n').next().unwrap_or_default();
            let column = so_far.chars().count() + 1;
            let message = plain(e.message().trim());
            // A value's error: the key before its `=` on the same line (the
            // last one: in an inline table, the inner key).
            let key = so_far
                .rsplit_once('=')
                .and_then(|(before, _)| before.rsplit(['{', ',']).next())
                .map(str::trim);
            // A key's own error (a duplicate): the span is the key.
            let spanned = text
                .get(span.clone())
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.contains(['\n', '=']));
            let key = if message.starts_with("duplicate key") {
                spanned
            } else {
                key
            };
            match key {
                Some(key) if !key.is_empty() && !message.contains(key) => {
                    format!("line {line}, column {column}: {key}: {message}")
                }
                _ => format!("line {line}, column {column}: {message}"),
            }
        }
        None => plain(e.message().trim()).replace('\n', "; "),
    }
}

/// `message` with the decoder's Rust type names ("expected usize") said in
/// words.
fn plain(message: &str) -> String {
    const WORDS: [(&str, &str); 10] = [
        (" as i128", " (out of range)"),
        ("expected usize", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u16", "expected a whole number (0 to 65535)"),
        ("expected u8", "expected a whole number (0 to 255)"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ];
    WORDS.iter().fold(message.to_owned(), |m, (rust, words)| {
        m.replace(rust, words)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::SimDisk;

    #[test]
    fn names_follow_the_rule() {
        for good in ["orders", "a.b-c_d", "X9", &"x".repeat(200)] {
            assert!(validate_name("topic", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "ümlaut", "sp ace", &"x".repeat(201)] {
            let err = validate_name("topic", bad).expect_err("invalid");
            assert!(err.to_string().contains("topic name"), "{err}");
        }
    }

    #[test]
    fn a_config_error_names_the_type_wanted_in_words() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Limits {
            max_connections: usize,
            ratio: f64,
        }
        for (text, wanted) in [
            (
                "max_connections = \"x\"\nratio = 0.5\n",
                "expected a whole number (0 or more)",
            ),
            (
                "max_connections = -1\nratio = 0.5\n",
                "expected a whole number (0 or more)",
            ),
            (
                "max_connections = 1\nratio = \"half\"\n",
                "expected a number",
            ),
        ] {
            let e = toml::from_str::<Limits>(text).expect_err("bad value");
            let said = toml_error(text, &e);
            assert!(said.contains(wanted), "{said}");
            assert!(!said.contains("usize") && !said.contains("f64"), "{said}");
            // The setting is named.
            let key = if said.contains("number (0") {
                "max_connections"
            } else {
                "ratio"
            };
            assert!(said.contains(key), "{said}");
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            limits: Limits,
        }
        let text = "limits = { ratio = 0.5, max_connections = \"x\" }\n";
        let e = toml::from_str::<Outer>(text).expect_err("bad value");
        let said = toml_error(text, &e);
        assert!(said.contains(": max_connections:"), "{said}");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Narrow {
            max_message_bytes: u32,
        }
        let text = "max_message_bytes = 5000000000\n";
        let e = toml::from_str::<Narrow>(text).expect_err("past u32");
        let said = toml_error(text, &e);
        assert!(said.contains("from 0 to 4294967295"), "{said}");
        let text = "max_connections = 99999999999999999999\nratio = 0.5\n";
        let e = toml::from_str::<Limits>(text).expect_err("too large");
        let said = toml_error(text, &e);
        assert!(
            said.contains("max_connections") && !said.contains("i128"),
            "{said}"
        );
    }

    /// A key given twice is named, also inside a table.
    #[test]
    fn a_duplicate_key_is_named() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Limits {
            max_connections: Option<usize>,
            grpc: Option<toml::Table>,
        }
        for (text, line) in [
            ("max_connections = 5\nmax_connections = 6\n", 2),
            ("[grpc]\nlisten = \"a\"\n\nlisten = \"b\"\n", 4),
        ] {
            let e = toml::from_str::<Limits>(text).expect_err("duplicate");
            let said = toml_error(text, &e);
            let key = if line == 2 {
                "max_connections"
            } else {
                "listen"
            };
            assert!(
                said.contains(&format!("line {line}")) && said.contains(key),
                "{said}"
            );
        }
    }

    #[test]
    fn config_round_trips_through_topic_toml() {
        let disk = SimDisk::new();
        let dir = Path::new("/t");
        crate::storage::io::Storage::create_dir_all(&disk, dir).expect("mkdir");
        let config = TopicConfig {
            cleanup: Cleanup::Compact,
            delete_when_consumed: true,
            dead_letter: Some("bad".into()),
            compact_min_dirty_ratio: Some(0.25),
            ..TopicConfig::default()
        };
        config.store(&disk, dir).expect("store");
        assert_eq!(TopicConfig::load(&disk, dir).expect("load"), Some(config));
    }

    #[test]
    fn a_topic_toml_too_large_to_be_a_config_does_not_parse() {
        let disk = SimDisk::new();
        let dir = Path::new("/t");
        crate::storage::io::Storage::create_dir_all(&disk, dir).expect("mkdir");
        let padding = format!("# {}\n", "x".repeat(MAX_TOPIC_CONFIG_BYTES as usize));
        crate::storage::io::write_file_atomic(
            &disk,
            &dir.join(TOPIC_CONFIG_FILE),
            padding.as_bytes(),
        )
        .expect("write");
        match TopicConfig::load(&disk, dir) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("topic.toml") && m.contains("bytes"), "{m}")
            }
            other => panic!("an oversized topic.toml is refused as invalid: {other:?}"),
        }
    }

    /// A setting out of its range in a `topic.toml` edited by hand is
    /// refused naming the file as well as the setting.
    #[test]
    fn a_topic_toml_setting_out_of_range_names_the_file() {
        let disk = SimDisk::new();
        let dir = Path::new("/t");
        crate::storage::io::Storage::create_dir_all(&disk, dir).expect("mkdir");
        crate::storage::io::write_file_atomic(
            &disk,
            &dir.join(TOPIC_CONFIG_FILE),
            b"segment_bytes = 0\n",
        )
        .expect("write");
        match TopicConfig::load(&disk, dir) {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains("topic.toml") && m.contains("segment_bytes"),
                    "{m}"
                )
            }
            other => panic!("segment_bytes 0 is refused: {other:?}"),
        }
    }

    /// A `topic.toml` edited by hand to make the topic its own dead-letter
    /// topic is refused as a create would refuse it.
    #[test]
    fn a_topic_toml_that_dead_letters_into_itself_is_refused() {
        let disk = SimDisk::new();
        let dir = Path::new("/topics/loop");
        crate::storage::io::Storage::create_dir_all(&disk, dir).expect("mkdir");
        crate::storage::io::write_file_atomic(
            &disk,
            &dir.join(TOPIC_CONFIG_FILE),
            b"dead_letter = \"loop\"\n",
        )
        .expect("write");
        match TopicConfig::load(&disk, dir) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("topic.toml") && m.contains("dead_letter"), "{m}")
            }
            other => panic!("a self loop is refused: {other:?}"),
        }
    }

    #[test]
    fn the_dirty_ratio_is_a_share_above_zero() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let config = TopicConfig {
                compact_min_dirty_ratio: Some(bad),
                ..TopicConfig::default()
            };
            let err = config.validate().expect_err("invalid ratio");
            assert!(err.to_string().contains("compact_min_dirty_ratio"), "{err}");
        }
        for good in [0.01, 0.5, 1.0] {
            let config = TopicConfig {
                compact_min_dirty_ratio: Some(good),
                ..TopicConfig::default()
            };
            config.validate().expect("valid ratio");
        }
    }
}
