//! Fuzzes the record decoder (`spool::storage::record`) on arbitrary bytes
//! read as segment data: records are decoded one after another, as recovery
//! walks a segment, until the decoder reports the end of data or an error.
//!
//! The first input byte chooses the mode. With bit 0 clear the rest is
//! decoded as it is, so the CRC check itself is fuzzed. With it set, the
//! chain of records that the length fields describe gets correct CRCs first:
//! a random CRC almost never matches, and without this the field parser
//! behind it (key, headers, attribute bits) would hardly be reached.
//!
//! Invariants checked for every record the decoder returns: the decoder never
//! panics; the record's magic, length and CRC check when recomputed here,
//! independently of the decoder; its header alone, and its bytes cut short,
//! read as incomplete with the record's length (what a torn tail and the
//! segment reader's header-first read rely on); a limit below its length
//! refuses it; and encoding its message again gives back the same bytes (a
//! filler record differs only in its filler bit and CRC).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use spool::storage::NewMessage;
use spool::storage::record::{self, ATTR_FILLER, DecodeError, Frame, HEADER_LEN, RECORD_MAGIC};

/// Byte ranges of the header fields checked here (see the layout in
/// `spool::storage::record`).
const ATTRIBUTES_AT: usize = 1;
const LENGTH: std::ops::Range<usize> = 4..8;
const CRC: std::ops::Range<usize> = 8..12;

/// Mode bit: seal the records before decoding.
const SEAL: u8 = 0b1;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, segment)) = data.split_first() else {
        return;
    };
    let mut segment = segment.to_vec();
    if mode & SEAL != 0 {
        seal_chain(&mut segment);
    }
    let backing = Bytes::from(segment);
    let mut at = 0;
    loop {
        match record::decode(&backing[at..], u32::MAX) {
            Ok(Frame::Record(r)) => {
                let len = r.len as usize;
                check_record(&backing, &backing[at..at + len], r);
                at += len;
            }
            Ok(Frame::End) => {
                let rest = &backing[at..];
                assert!(
                    rest[..rest.len().min(HEADER_LEN)].iter().all(|&b| b == 0),
                    "end of data reported at {at} over nonzero header bytes"
                );
                break;
            }
            Err(_) => break,
        }
    }
});

fn check_record(backing: &Bytes, bytes: &[u8], r: record::RecordRef<'_>) {
    let len = bytes.len();
    assert!(len >= HEADER_LEN);
    assert_eq!(bytes[0], RECORD_MAGIC);
    assert_eq!(u32_at(bytes, LENGTH.start) as usize, len);
    assert_eq!(
        u32_at(bytes, CRC.start),
        crc_of(bytes),
        "a record whose CRC does not check was returned"
    );

    if len > HEADER_LEN {
        for cut in [HEADER_LEN, len - 1] {
            assert_eq!(
                record::decode(&bytes[..cut], u32::MAX),
                Err(DecodeError::Incomplete {
                    needed: len as u64,
                    available: cut as u64,
                }),
                "record of {len} bytes cut at {cut}"
            );
        }
    }
    assert_eq!(
        record::decode(bytes, r.len - 1),
        Err(DecodeError::BadLength(r.len))
    );
    assert_eq!(record::decode(bytes, r.len), Ok(Frame::Record(r)));

    let stored = r.to_message(backing);
    let msg = NewMessage {
        timestamp_ms: None,
        key: stored.key,
        headers: stored.headers,
        value: stored.value,
    };
    assert_eq!(record::encoded_len(&msg), Some(len));
    let mut again = Vec::new();
    assert_eq!(
        record::encode(&mut again, r.offset, r.timestamp_ms, &msg),
        len
    );
    if r.is_filler() {
        // Only the filler bit (and so the CRC) tells the two apart.
        assert_eq!(again[ATTRIBUTES_AT] | ATTR_FILLER, r.attributes);
        assert_eq!(again[..ATTRIBUTES_AT], bytes[..ATTRIBUTES_AT]);
        assert_eq!(
            again[ATTRIBUTES_AT + 1..CRC.start],
            bytes[ATTRIBUTES_AT + 1..CRC.start]
        );
        assert_eq!(again[CRC.end..], bytes[CRC.end..]);
        let Ok(Frame::Record(a)) = record::decode(&again, u32::MAX) else {
            panic!("a re-encoded record does not decode");
        };
        assert!(!a.is_filler());
        assert_eq!(
            (a.offset, a.timestamp_ms, a.len),
            (r.offset, r.timestamp_ms, r.len)
        );
        assert_eq!((a.key, a.value), (r.key, r.value));
        assert!(a.headers().eq(r.headers()));
    } else {
        assert!(again == bytes, "encode(decode(x)) differs from x");
    }
}

/// Writes the CRC of every record in the chain that starts at byte 0 and
/// follows the length fields, while each length fits a header and the data.
fn seal_chain(segment: &mut [u8]) {
    let mut at = 0;
    while segment.len() - at >= HEADER_LEN {
        let len = u32_at(segment, at + LENGTH.start) as usize;
        if len < HEADER_LEN || len > segment.len() - at {
            break;
        }
        let record = &mut segment[at..at + len];
        let crc = crc_of(record);
        record[CRC].copy_from_slice(&crc.to_le_bytes());
        at += len;
    }
}

/// CRC32 (IEEE) of a record's bytes but its CRC field, computed here rather
/// than by spool so the decoder's own check is tested against it.
fn crc_of(record: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&record[..CRC.start]);
    crc.update(&record[CRC.end..]);
    crc.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
