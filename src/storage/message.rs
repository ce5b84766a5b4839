//! The message types the engine stores and hands out.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A message's position in its topic: dense, assigned by the broker, never
/// changed by any operation (compaction leaves gaps, never renumbers).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset after this one.
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Offset {
    fn from(v: u64) -> Offset {
        Offset(v)
    }
}

/// One header of a message: a name and a value, kept in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name (UTF-8).
    pub name: String,
    /// Header value.
    pub value: Bytes,
}

impl Header {
    /// A header from anything string- and bytes-like.
    pub fn new(name: impl Into<String>, value: impl Into<Bytes>) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A message as a producer hands it in, before the broker assigns its offset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewMessage {
    /// Producer-supplied timestamp; the broker's clock when `None`.
    pub timestamp_ms: Option<u64>,
    /// Optional key (compaction keeps the latest record per key).
    pub key: Option<Bytes>,
    /// Ordered headers.
    pub headers: Vec<Header>,
    /// The payload.
    pub value: Bytes,
}

impl NewMessage {
    /// A message with just a value.
    pub fn from_value(value: impl Into<Bytes>) -> NewMessage {
        NewMessage {
            value: value.into(),
            ..NewMessage::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> NewMessage {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> NewMessage {
        self.headers.push(Header::new(name, value));
        self
    }
}

/// A stored message, as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its offset in the topic.
    pub offset: Offset,
    /// Timestamp (broker-assigned unless the producer supplied one).
    pub timestamp_ms: u64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Ordered headers.
    pub headers: Vec<Header>,
    /// The payload.
    pub value: Bytes,
}
