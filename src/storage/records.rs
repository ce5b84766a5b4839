//! What one read returns: records that passed their CRC, kept where they lie
//! in the segments' maps. A read of a thousand records holds one shared
//! view per window of the map it touched, not a reference per message, and
//! a reply can be encoded straight from the records.
//!
//! Invariant: every entry names a whole record, inside its view, that
//! decoded without error when it was read (the views are immutable).

use super::message::{Message, Offset};
use super::record::{self, HEADER_LEN, RecordRef};
use bytes::Bytes;

/// Where one record lies: in view `view`, `len` bytes from byte `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    timestamp_ms: u64,
    at: usize,
    len: u32,
    view: u32,
    /// Key length plus one; 0 without a key.
    key: u32,
    /// Where the value starts, from the record's first byte.
    value_at: u32,
    headers: u16,
    attributes: u8,
}

/// What a read noted about a record without headers: enough to size its
/// encoding without touching the record again (it may be in another core's
/// cache by then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// The record's offset.
    pub offset: u64,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Its key's length, if it has a key.
    pub key_len: Option<usize>,
    /// Its value's length.
    pub value_len: usize,
}

/// Records read from a log, in offset order.
#[derive(Debug, Clone, Default)]
pub struct Records {
    views: Vec<Bytes>,
    entries: Vec<Entry>,
    /// When [`Records::retain`] left none of the records read: the offset
    /// after the last of them, which a reader has read past.
    passed: Option<u64>,
}

impl Records {
    /// No records.
    pub fn new() -> Records {
        Records::default()
    }

    /// Adds `r`, a record that decoded (CRC included) from `view` at byte `at`.
    pub(crate) fn push(&mut self, r: &RecordRef<'_>, view: &Bytes, at: usize) {
        debug_assert!(at + r.len as usize <= view.len());
        let same = self
            .views
            .last()
            .is_some_and(|v| v.as_ptr() == view.as_ptr() && v.len() == view.len());
        if !same {
            self.views.push(view.clone());
        }
        self.entries.push(Entry {
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            at,
            len: r.len,
            view: (self.views.len() - 1) as u32,
            // A key is shorter than its record, whose length is a u32.
            key: r.key.map_or(0, |k| k.len() as u32 + 1),
            value_at: r.len - r.value.len() as u32,
            headers: r.header_count(),
            attributes: r.attributes,
        });
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Offset of the first record.
    pub fn first_offset(&self) -> Option<Offset> {
        self.entries.first().map(|e| Offset(e.offset))
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> Option<Offset> {
        self.entries.last().map(|e| Offset(e.offset))
    }

    /// The offsets, in order.
    pub fn offsets(&self) -> impl Iterator<Item = Offset> + '_ {
        self.entries.iter().map(|e| Offset(e.offset))
    }

    /// Each record's key, headers and value in bytes ([`record::payload_len`]
    /// of its message), in order.
    pub fn payload_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries.iter().map(|e| e.len as usize - HEADER_LEN)
    }

    /// Bytes of keys, header names and values, and values, without the
    /// framing of either: what the delivered-bytes metric counts.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| {
                (e.len as usize - HEADER_LEN - record::MESSAGE_HEADER_OVERHEAD * e.headers as usize)
                    as u64
            })
            .sum()
    }

    /// Keeps the records whose offset `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let last = self.entries.last().map(|e| e.offset);
        self.entries.retain(|e| keep(e.offset));
        self.passed = last.filter(|_| self.entries.is_empty()).map(|o| o + 1);
    }

    /// With no records left: the offset after the records read and all
    /// left out by [`Records::retain`] (deleted ones), if any were read.
    pub fn passed(&self) -> Option<Offset> {
        self.passed.filter(|_| self.entries.is_empty()).map(Offset)
    }

    /// With no records left: marks the reader past everything below `to`
    /// (a run of deleted records after those read, known without reading
    /// them).
    pub fn pass_to(&mut self, to: u64) {
        if self.entries.is_empty() {
            self.passed = Some(self.passed.map_or(to, |p| p.max(to)));
        }
    }

    /// Keeps the first `n` records.
    pub fn truncate(&mut self, n: usize) {
        self.entries.truncate(n);
    }

    /// Splits off the records from index `at` on (sharing the views).
    pub fn split_off(&mut self, at: usize) -> Records {
        Records {
            views: self.views.clone(),
            entries: self.entries.split_off(at),
            passed: None,
        }
    }

    /// Per record, its [`Shape`] when it has no headers, else the record
    /// decoded in place.
    pub fn shapes(&self) -> impl Iterator<Item = Result<Shape, RecordRef<'_>>> + '_ {
        self.entries.iter().map(|e| {
            if e.headers > 0 {
                return Err(self.decode(e));
            }
            let key_len = e.key.checked_sub(1).map(|k| k as usize);
            Ok(Shape {
                offset: e.offset,
                timestamp_ms: e.timestamp_ms,
                key_len,
                value_len: e.len as usize - HEADER_LEN - key_len.unwrap_or(0),
            })
        })
    }

    /// The record of `e`, from the parts its read noted: nothing is parsed
    /// again, so bytes the map shows differently since (a file changed
    /// under a running broker) change what is sent, never its shape.
    fn decode(&self, e: &Entry) -> RecordRef<'_> {
        let record = self
            .views
            .get(e.view as usize)
            .and_then(|v| v.get(e.at..e.at + e.len as usize))
            .unwrap_or_default();
        let key_end = HEADER_LEN + e.key.saturating_sub(1) as usize;
        let part = |from: usize, to: usize| record.get(from..to).unwrap_or_default();
        RecordRef::from_parts(record::Parts {
            offset: e.offset,
            timestamp_ms: e.timestamp_ms,
            attributes: e.attributes,
            len: e.len,
            key: (e.key > 0).then(|| part(HEADER_LEN, key_end)),
            header_count: e.headers,
            headers: part(key_end, e.value_at as usize),
            value: part(e.value_at as usize, record.len()),
        })
    }

    /// The records, decoded in place.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        self.entries.iter().map(|e| self.decode(e))
    }

    /// The records as owned messages whose key and values share the map.
    pub fn to_messages(&self) -> Vec<Message> {
        self.entries
            .iter()
            .zip(self.iter())
            .map(|(e, r)| r.to_message(&self.views[e.view as usize]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::message::NewMessage;
    use crate::storage::record::Frame;

    fn records(n: u64) -> Records {
        let mut buf = Vec::new();
        for o in 0..n {
            record::encode(
                &mut buf,
                o,
                o * 10,
                &NewMessage::from_value(vec![o as u8; o as usize]).with_header("h", "v"),
            );
        }
        let view = Bytes::from(buf);
        let mut out = Records::new();
        let mut at = 0;
        while at < view.len() {
            let Ok(Frame::Record(r)) = record::decode(&view[at..], u32::MAX) else {
                panic!("a record at {at}");
            };
            out.push(&r, &view, at);
            at += r.len as usize;
        }
        out
    }

    #[test]
    fn records_read_back_as_the_messages_written() {
        let mut r = records(5);
        assert_eq!(r.len(), 5);
        assert_eq!(r.views.len(), 1, "one view for records from one view");
        r.retain(|o| o != 2);
        let tail = r.split_off(2);
        assert_eq!(r.offsets().collect::<Vec<_>>(), vec![Offset(0), Offset(1)]);
        assert_eq!(tail.first_offset(), Some(Offset(3)));
        assert_eq!(tail.last_offset(), Some(Offset(4)));
        let m = tail.to_messages();
        assert_eq!(&m[1].value[..], &[4u8; 4]);
        assert_eq!(m[1].timestamp_ms, 40);
        assert_eq!(&m[1].headers[0].value[..], b"v");
        let mut keyed = Records::new();
        let mut buf = Vec::new();
        record::encode(
            &mut buf,
            9,
            3,
            &NewMessage::from_value("abc").with_key("kk"),
        );
        let view = Bytes::from(buf);
        let Ok(Frame::Record(k)) = record::decode(&view, u32::MAX) else {
            panic!("a record");
        };
        keyed.push(&k, &view, 0);
        let shapes: Vec<_> = keyed.shapes().collect();
        assert_eq!(
            shapes,
            vec![Ok(Shape {
                offset: 9,
                timestamp_ms: 3,
                key_len: Some(2),
                value_len: 3,
            })]
        );
        assert!(
            tail.shapes().all(|s| s.is_err()),
            "records with headers are read in place"
        );
        assert_eq!(
            tail.content_bytes(),
            m.iter()
                .map(|m| crate::metrics::payload_bytes(m.key.as_ref(), &m.headers, &m.value))
                .sum::<u64>()
        );
        assert_eq!(
            tail.payload_lens().collect::<Vec<_>>(),
            m.iter().map(record::payload_len).collect::<Vec<_>>()
        );
    }
}
