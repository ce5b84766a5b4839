//! Record framing: how one message is laid out in a segment, and the decoder
//! that tells a clean end of data apart from a torn or corrupt record.
//!
//! Every record is self-describing and checksummed; a zero-filled region never
//! validates because the magic byte is nonzero. All integers are little-endian.
//!
//! | at | size | field          | meaning                                                   |
//! |----|------|----------------|-----------------------------------------------------------|
//! | 0  | 1    | `magic`        | [`RECORD_MAGIC`] (`0xA7`)                                 |
//! | 1  | 1    | `attributes`   | bit 0: has key; bit 1: filler (quarantined range); others 0 |
//! | 2  | 2    | `header_count` | number of headers (u16)                                   |
//! | 4  | 4    | `length`       | whole record in bytes, this header included (u32)         |
//! | 8  | 4    | `crc`          | CRC32 (IEEE) of bytes `0..8` and `12..length`             |
//! | 12 | 8    | `offset`       | the record's offset (u64)                                 |
//! | 20 | 8    | `timestamp_ms` | milliseconds since the Unix epoch (u64)                   |
//! | 28 | 4    | `key_len`      | key length (u32); 0 when there is no key                  |
//! | 32 | k    | `key`          | key bytes                                                 |
//! | …  | …    | headers        | `header_count` × (`name_len` u16, name UTF-8, `value_len` u32, value) |
//! | …  | rest | `value`        | the payload: everything up to `length`                    |
//!
//! Per-message overhead is [`HEADER_LEN`] = 32 bytes, plus 6 bytes per header.
//! The CRC covers every header field including `length` and `offset`, so a
//! record copied to the wrong place or with a damaged length never validates.

use super::message::{Header, Message, NewMessage, Offset};
use bytes::Bytes;

/// First byte of every record. Nonzero, so zero-filled space never parses.
pub const RECORD_MAGIC: u8 = 0xA7;
/// Fixed header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Attribute bit: the record has a key.
pub const ATTR_HAS_KEY: u8 = 0b01;
/// Attribute bit: the record is filler over a quarantined damaged range.
pub const ATTR_FILLER: u8 = 0b10;
const ATTR_KNOWN: u8 = ATTR_HAS_KEY | ATTR_FILLER;

const MAGIC_AT: usize = 0;
const ATTRIBUTES_AT: usize = 1;
const HEADER_COUNT_AT: usize = 2;
const LENGTH_AT: usize = 4;
const CRC_AT: usize = 8;
const OFFSET_AT: usize = 12;
const TIMESTAMP_AT: usize = 20;
const KEY_LEN_AT: usize = 28;
/// Bytes of framing per message header: `name_len` u16 + `value_len` u32.
pub const MESSAGE_HEADER_OVERHEAD: usize = 6;

/// A record decoded in place, borrowing the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record's offset.
    pub offset: u64,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Attribute bits.
    pub attributes: u8,
    /// Whole record length in bytes.
    pub len: u32,
    /// Key, if any.
    pub key: Option<&'a [u8]>,
    header_count: u16,
    headers: &'a [u8],
    /// The payload.
    pub value: &'a [u8],
}

/// The fields of a [`RecordRef`], for [`RecordRef::from_parts`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts<'a> {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub attributes: u8,
    pub len: u32,
    pub key: Option<&'a [u8]>,
    pub header_count: u16,
    pub headers: &'a [u8],
    pub value: &'a [u8],
}

/// What the decoder found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A valid record.
    Record(RecordRef<'a>),
    /// Zeroes: the end of written data (preallocated space).
    End,
}

/// Why bytes are not a valid record. `Incomplete` means "the buffer ends inside
/// the record", which at the end of a log is a torn write, not corruption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the record does.
    #[error("record needs {needed} bytes, {available} available")]
    Incomplete {
        /// Bytes the record says it has (or the header length).
        needed: u64,
        /// Bytes in the buffer.
        available: u64,
    },
    /// The first byte is neither the magic nor zero.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// The length field is below the header length or above the limit.
    #[error("bad record length {0}")]
    BadLength(u32),
    /// The checksum does not match.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// CRC in the record.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The checksum matches but the fields do not add up.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The CRC of a record's bytes (everything but the CRC field itself).
fn record_crc(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[..CRC_AT]);
    hasher.update(&record[OFFSET_AT..]);
    hasher.finalize()
}

/// Decodes the record at the start of `buf`; `max_len` bounds its length field.
pub fn decode(buf: &[u8], max_len: u32) -> Result<Frame<'_>, DecodeError> {
    if buf.len() < HEADER_LEN {
        if buf.iter().all(|&b| b == 0) {
            return Ok(Frame::End);
        }
        return Err(DecodeError::Incomplete {
            needed: HEADER_LEN as u64,
            available: buf.len() as u64,
        });
    }
    match buf[MAGIC_AT] {
        RECORD_MAGIC => {}
        0 if buf[..HEADER_LEN].iter().all(|&b| b == 0) => return Ok(Frame::End),
        other => return Err(DecodeError::BadMagic(other)),
    }
    let len = u32_at(buf, LENGTH_AT);
    if (len as usize) < HEADER_LEN || len > max_len {
        return Err(DecodeError::BadLength(len));
    }
    if buf.len() < len as usize {
        return Err(DecodeError::Incomplete {
            needed: len as u64,
            available: buf.len() as u64,
        });
    }
    let record = &buf[..len as usize];
    let stored = u32_at(record, CRC_AT);
    let computed = record_crc(record);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    parse_fields(record).map(Frame::Record)
}

fn parse_fields(record: &[u8]) -> Result<RecordRef<'_>, DecodeError> {
    let attributes = record[ATTRIBUTES_AT];
    if attributes & !ATTR_KNOWN != 0 {
        return Err(DecodeError::Malformed("unknown attribute bits"));
    }
    let header_count = u16_at(record, HEADER_COUNT_AT);
    let key_len = u32_at(record, KEY_LEN_AT) as usize;
    let has_key = attributes & ATTR_HAS_KEY != 0;
    if !has_key && key_len != 0 {
        return Err(DecodeError::Malformed("key length without key"));
    }
    let body = &record[HEADER_LEN..];
    if key_len > body.len() {
        return Err(DecodeError::Malformed("key longer than record"));
    }
    let (key, rest) = body.split_at(key_len);
    let mut cursor = 0usize;
    for _ in 0..header_count {
        let name_len = rest
            .get(cursor..cursor + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or(DecodeError::Malformed("header name length past end"))?;
        cursor += 2;
        let name = rest
            .get(cursor..cursor + name_len)
            .ok_or(DecodeError::Malformed("header name past end"))?;
        if std::str::from_utf8(name).is_err() {
            return Err(DecodeError::Malformed("header name is not UTF-8"));
        }
        cursor += name_len;
        let value_len = rest
            .get(cursor..cursor + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(DecodeError::Malformed("header value length past end"))?;
        cursor += 4;
        if rest.len() - cursor < value_len {
            return Err(DecodeError::Malformed("header value past end"));
        }
        cursor += value_len;
    }
    let (headers, value) = rest.split_at(cursor);
    Ok(RecordRef {
        offset: u64_at(record, OFFSET_AT),
        timestamp_ms: u64_at(record, TIMESTAMP_AT),
        attributes,
        len: record.len() as u32,
        key: has_key.then_some(key),
        header_count,
        headers,
        value,
    })
}

impl<'a> RecordRef<'a> {
    /// Number of headers.
    pub fn header_count(&self) -> u16 {
        self.header_count
    }

    /// Whether this record is filler over a quarantined range (never delivered).
    pub fn is_filler(&self) -> bool {
        self.attributes & ATTR_FILLER != 0
    }

    /// A record from parts a decode of it found before (see
    /// [`crate::storage::Records`]).
    pub(crate) fn from_parts(p: Parts<'a>) -> RecordRef<'a> {
        RecordRef {
            offset: p.offset,
            timestamp_ms: p.timestamp_ms,
            attributes: p.attributes,
            len: p.len,
            key: p.key,
            header_count: p.header_count,
            headers: p.headers,
            value: p.value,
        }
    }

    /// The headers in order. Decoding validated them, so this cannot fail.
    pub fn headers(self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let mut rest = self.headers;
        (0..self.header_count).map_while(move |_| {
            let name_len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let name = std::str::from_utf8(rest.get(2..2 + name_len)?).ok()?;
            let at = 2 + name_len;
            let len_bytes = rest.get(at..at + 4)?;
            let value_len =
                u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]])
                    as usize;
            let value = rest.get(at + 4..at + 4 + value_len)?;
            rest = &rest[at + 4 + value_len..];
            Some((name, value))
        })
    }

    /// An owned message whose key and values share `backing`'s memory (no copy
    /// when `backing` is a view of a memory map). The record must lie inside
    /// `backing`.
    pub fn to_message(&self, backing: &Bytes) -> Message {
        Message {
            offset: Offset(self.offset),
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(|k| backing.slice_ref(k)),
            headers: self
                .headers()
                .map(|(name, value)| Header {
                    name: name.to_owned(),
                    value: backing.slice_ref(value),
                })
                .collect(),
            value: backing.slice_ref(self.value),
        }
    }
}

/// Bytes of key, headers and value of a stored message: its record less the
/// record header, the measure `max_message_bytes` and the frame limit apply to.
pub fn payload_len(msg: &Message) -> usize {
    msg.key.as_ref().map_or(0, |k| k.len())
        + msg.value.len()
        + msg
            .headers
            .iter()
            .map(|h| MESSAGE_HEADER_OVERHEAD + h.name.len() + h.value.len())
            .sum::<usize>()
}

/// Bytes of a stored message's record: what reads count against a byte
/// limit (a delivery's envelope on the wire is smaller).
pub fn stored_len(msg: &Message) -> usize {
    HEADER_LEN + payload_len(msg)
}

/// Encoded length of a message, or `None` if a field is too large for the
/// format (a header name over 64 KiB, more than 65 535 headers, over 4 GiB).
pub fn encoded_len(msg: &NewMessage) -> Option<usize> {
    if msg.headers.len() > u16::MAX as usize {
        return None;
    }
    let mut len = HEADER_LEN + msg.key.as_ref().map_or(0, |k| k.len()) + msg.value.len();
    for h in &msg.headers {
        if h.name.len() > u16::MAX as usize || h.value.len() > u32::MAX as usize {
            return None;
        }
        len += MESSAGE_HEADER_OVERHEAD + h.name.len() + h.value.len();
    }
    (len <= u32::MAX as usize).then_some(len)
}

/// Appends the encoding of `msg` at `offset` and `timestamp_ms` to `buf`. The
/// caller checked [`encoded_len`]; returns the record's length.
pub fn encode(buf: &mut Vec<u8>, offset: u64, timestamp_ms: u64, msg: &NewMessage) -> usize {
    let start = buf.len();
    let key = msg.key.as_deref();
    // The fixed header is put together in place and appended in one go
    // (length and CRC are filled in by `seal_record`).
    let mut head = [0u8; HEADER_LEN];
    head[MAGIC_AT] = RECORD_MAGIC;
    head[ATTRIBUTES_AT] = if key.is_some() { ATTR_HAS_KEY } else { 0 };
    head[HEADER_COUNT_AT..LENGTH_AT].copy_from_slice(&(msg.headers.len() as u16).to_le_bytes());
    head[OFFSET_AT..TIMESTAMP_AT].copy_from_slice(&offset.to_le_bytes());
    head[TIMESTAMP_AT..KEY_LEN_AT].copy_from_slice(&timestamp_ms.to_le_bytes());
    head[KEY_LEN_AT..HEADER_LEN]
        .copy_from_slice(&(key.map_or(0, <[u8]>::len) as u32).to_le_bytes());
    buf.extend_from_slice(&head);
    if let Some(key) = key {
        buf.extend_from_slice(key);
    }
    for h in &msg.headers {
        buf.extend_from_slice(&(h.name.len() as u16).to_le_bytes());
        buf.extend_from_slice(h.name.as_bytes());
        buf.extend_from_slice(&(h.value.len() as u32).to_le_bytes());
        buf.extend_from_slice(&h.value);
    }
    buf.extend_from_slice(&msg.value);
    seal_record(&mut buf[start..]);
    buf.len() - start
}

/// Fills in the length and CRC of a record whose other fields are written.
///
/// The CRC covers bytes `0..8` and `12..`: they are moved next to each other
/// (bytes `0..8` to `4..12`, over the CRC field) so the checksum reads one
/// run instead of two, then moved back. One run is what crc32fast's SIMD
/// path needs: it hashes runs under 128 bytes with a table instead, which
/// is what a 100-byte message's 120 bytes after the CRC field were. Same
/// bytes in the same order, so the same CRC as [`record_crc`].
fn seal_record(record: &mut [u8]) {
    let len = record.len() as u32;
    record[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&len.to_le_bytes());
    const SHIFT: usize = OFFSET_AT - CRC_AT;
    record.copy_within(..CRC_AT, SHIFT);
    let crc = crc32fast::hash(&record[SHIFT..]);
    record.copy_within(SHIFT..OFFSET_AT, 0);
    record[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The length the record header at the start of `buf` claims, when it could
/// be a record's header (its magic, known attributes, a length from
/// [`HEADER_LEN`] to `max_len` that `buf` holds), whether or not the
/// record's bytes pass their CRC: where a torn record would end.
pub fn claimed_len(buf: &[u8], max_len: u32) -> Option<usize> {
    if buf.len() < HEADER_LEN
        || buf[MAGIC_AT] != RECORD_MAGIC
        || buf[ATTRIBUTES_AT] & !ATTR_KNOWN != 0
    {
        return None;
    }
    let len = u32_at(buf, LENGTH_AT);
    (len <= max_len && (HEADER_LEN..=buf.len()).contains(&(len as usize))).then_some(len as usize)
}

/// The timestamp in the record header at the start of `buf`, when one of
/// a message (not a filler) starts there; its bytes are not checked.
pub fn header_timestamp(buf: &[u8]) -> Option<u64> {
    (buf.len() >= HEADER_LEN
        && buf[MAGIC_AT] == RECORD_MAGIC
        && buf[ATTRIBUTES_AT] & ATTR_FILLER == 0)
        .then(|| u64_at(buf, TIMESTAMP_AT))
}

/// A filler record of exactly `len` bytes (>= [`HEADER_LEN`]) standing in for a
/// quarantined range whose first lost offset is `offset`. Readers skip it.
pub fn filler(len: usize, offset: u64, timestamp_ms: u64) -> Vec<u8> {
    debug_assert!(len >= HEADER_LEN);
    let mut record = vec![0u8; len];
    record[MAGIC_AT] = RECORD_MAGIC;
    record[ATTRIBUTES_AT] = ATTR_FILLER;
    record[OFFSET_AT..OFFSET_AT + 8].copy_from_slice(&offset.to_le_bytes());
    record[TIMESTAMP_AT..TIMESTAMP_AT + 8].copy_from_slice(&timestamp_ms.to_le_bytes());
    seal_record(&mut record);
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = NewMessage> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(
                (
                    "[a-z-]{0,12}",
                    proptest::collection::vec(any::<u8>(), 0..20),
                ),
                0..4,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(key, headers, value)| NewMessage {
                timestamp_ms: None,
                key: key.map(Bytes::from),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| Header::new(n, v))
                    .collect(),
                value: Bytes::from(value),
            })
    }

    /// The record of `msg` written field by field from the byte table, with
    /// the CRC of the two runs [`record_crc`] reads.
    fn by_the_table(offset: u64, ts: u64, msg: &NewMessage) -> Vec<u8> {
        let key = msg.key.as_deref();
        let mut r = vec![RECORD_MAGIC, if key.is_some() { ATTR_HAS_KEY } else { 0 }];
        r.extend_from_slice(&(msg.headers.len() as u16).to_le_bytes());
        r.extend_from_slice(&[0u8; 8]);
        r.extend_from_slice(&offset.to_le_bytes());
        r.extend_from_slice(&ts.to_le_bytes());
        r.extend_from_slice(&(key.map_or(0, <[u8]>::len) as u32).to_le_bytes());
        r.extend_from_slice(key.unwrap_or_default());
        for h in &msg.headers {
            r.extend_from_slice(&(h.name.len() as u16).to_le_bytes());
            r.extend_from_slice(h.name.as_bytes());
            r.extend_from_slice(&(h.value.len() as u32).to_le_bytes());
            r.extend_from_slice(&h.value);
        }
        r.extend_from_slice(&msg.value);
        let len = r.len() as u32;
        r[LENGTH_AT..CRC_AT].copy_from_slice(&len.to_le_bytes());
        let crc = record_crc(&r);
        r[CRC_AT..OFFSET_AT].copy_from_slice(&crc.to_le_bytes());
        r
    }

    proptest! {
        #[test]
        fn encode_writes_the_byte_table(
            msg in arb_message(),
            offset in any::<u64>(),
            ts in any::<u64>(),
            before in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            // Appended after whatever the buffer holds, which stays as it was.
            let mut buf = before.clone();
            let len = encode(&mut buf, offset, ts, &msg);
            prop_assert_eq!(&buf[..before.len()], &before[..]);
            prop_assert_eq!(len, buf.len() - before.len());
            prop_assert_eq!(&buf[before.len()..], &by_the_table(offset, ts, &msg)[..]);
        }

        #[test]
        fn encode_decode_round_trip(msg in arb_message(), offset in any::<u64>(), ts in any::<u64>()) {
            let mut buf = Vec::new();
            let len = encode(&mut buf, offset, ts, &msg);
            prop_assert_eq!(Some(len), encoded_len(&msg));
            let backing = Bytes::from(buf);
            let Frame::Record(r) = decode(&backing, u32::MAX).expect("valid record") else {
                panic!("decoded as end of data");
            };
            let m = r.to_message(&backing);
            prop_assert_eq!(m.offset, Offset(offset));
            prop_assert_eq!(m.timestamp_ms, ts);
            prop_assert_eq!(m.key, msg.key);
            prop_assert_eq!(m.headers, msg.headers);
            prop_assert_eq!(m.value, msg.value);
        }

        #[test]
        fn crc_is_that_of_bytes_0_to_8_then_12_to_the_end(
            msg in arb_message(),
            offset in any::<u64>(),
            before in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            // Encoded after other records, as in the writer's buffer.
            let mut buf = before.clone();
            let len = encode(&mut buf, offset, 5, &msg);
            prop_assert_eq!(&buf[..before.len()], &before[..]);
            let record = &buf[before.len()..];
            prop_assert_eq!(record.len(), len);
            let mut covered = record[..CRC_AT].to_vec();
            covered.extend_from_slice(&record[OFFSET_AT..]);
            let stored = u32_at(record, CRC_AT);
            prop_assert_eq!(stored, crc32fast::hash(&covered));
            prop_assert_eq!(stored, record_crc(record));
            prop_assert_eq!(record[MAGIC_AT], RECORD_MAGIC);
            prop_assert_eq!(u32_at(record, LENGTH_AT) as usize, len);
            prop_assert_eq!(u16_at(record, HEADER_COUNT_AT) as usize, msg.headers.len());
            prop_assert_eq!(u64_at(record, OFFSET_AT), offset);
        }

        #[test]
        fn any_single_bit_flip_is_detected(msg in arb_message(), bit in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode(&mut buf, 7, 9, &msg);
            let i = bit.index(buf.len() * 8);
            buf[i / 8] ^= 1 << (i % 8);
            let decoded = decode(&buf, u32::MAX);
            prop_assert!(
                !matches!(decoded, Ok(Frame::Record(_))),
                "flip of bit {} validated", i
            );
        }

        #[test]
        fn every_truncation_is_incomplete_or_end(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode(&mut buf, 1, 2, &msg);
            let cut = cut.index(buf.len());
            let torn = matches!(
                decode(&buf[..cut], u32::MAX),
                Err(DecodeError::Incomplete { .. }) | Ok(Frame::End)
            );
            prop_assert!(torn, "a record cut at {} must read as incomplete", cut);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 1 << 20);
        }
    }

    #[test]
    fn zeros_are_end_of_data() {
        assert_eq!(decode(&[0u8; 64], u32::MAX), Ok(Frame::End));
        assert_eq!(decode(&[0u8; 5], u32::MAX), Ok(Frame::End));
        assert_eq!(decode(&[], u32::MAX), Ok(Frame::End));
    }

    #[test]
    fn overhead_is_32_bytes_plus_6_per_header() {
        let msg = NewMessage::from_value(vec![1u8; 100]);
        assert_eq!(encoded_len(&msg), Some(132));
        let msg = msg.with_key("k").with_header("h", "v");
        assert_eq!(encoded_len(&msg), Some(132 + 1 + 6 + 2));
    }

    #[test]
    fn over_long_length_is_rejected_before_reading() {
        let mut buf = Vec::new();
        encode(&mut buf, 0, 0, &NewMessage::from_value(vec![0u8; 100]));
        assert_eq!(decode(&buf, 64), Err(DecodeError::BadLength(132)));
    }

    #[test]
    fn filler_is_valid_and_marked() {
        let f = filler(100, 42, 5);
        let Ok(Frame::Record(r)) = decode(&f, u32::MAX) else {
            panic!("filler must decode")
        };
        assert!(r.is_filler());
        assert_eq!((r.offset, r.len), (42, 100));
    }
}
