//! What a native connection's writer sends: a `ServerFrame`, or a fetch
//! reply or subscription delivery encoded straight from what a read handed
//! out. For replay and stream reads those are the records in the log's maps,
//! so each value is copied once, from the map into the frame, and no
//! `Message` is built or reference counted per message on the way.
//!
//! Invariant: an [`Outbound`] encodes to exactly the bytes prost gives for
//! the `ServerFrame` [`Outbound::into_frame`] returns (proto3: fields in
//! number order, defaults left out, `optional` fields present when set).

use super::{pb, status};
use crate::broker::{Deliveries, DeliveryRef};
use crate::storage::Shape;
use bytes::{Buf, BufMut};
use prost::DecodeError;
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
};

/// `ServerFrame.response`, `ServerFrame.delivery`.
const FRAME_RESPONSE: u32 = 2;
const FRAME_DELIVERY: u32 = 3;
/// `Response.request_id`, `Response.fetch`.
const RESPONSE_REQUEST_ID: u32 = 1;
const RESPONSE_FETCH: u32 = 5;
/// `FetchResponse.messages`, `.next_offset`, `.end_offset`.
const FETCH_MESSAGES: u32 = 1;
const FETCH_NEXT_OFFSET: u32 = 2;
const FETCH_END_OFFSET: u32 = 3;
/// `Delivery.subscription_id`, `Delivery.messages`.
const DELIVERY_SUBSCRIPTION_ID: u32 = 1;
const DELIVERY_MESSAGES: u32 = 2;
/// `Message` fields.
const MESSAGE_OFFSET: u32 = 1;
const MESSAGE_TIMESTAMP: u32 = 2;
const MESSAGE_KEY: u32 = 3;
const MESSAGE_HEADERS: u32 = 4;
const MESSAGE_VALUE: u32 = 5;
const MESSAGE_DELIVERY: u32 = 6;
/// `Header` fields.
const HEADER_NAME: u32 = 1;
const HEADER_VALUE: u32 = 2;

/// One frame for a native connection.
// The queue held `ServerFrame`s by value before; boxing them now would add
// an allocation per reply for variants that are smaller anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outbound {
    /// Any frame, as prost encodes it.
    Frame(pb::ServerFrame),
    /// A `Response` with a `FetchResponse`.
    Fetch {
        /// The request answered.
        request_id: u64,
        /// The messages.
        messages: WireMessages,
        /// `FetchResponse.next_offset`.
        next_offset: u64,
        /// `FetchResponse.end_offset`.
        end_offset: u64,
    },
    /// A `Delivery` of messages (no error, nothing skipped).
    Delivery {
        /// The subscription.
        subscription_id: u64,
        /// The messages.
        messages: WireMessages,
    },
}

impl Default for Outbound {
    fn default() -> Outbound {
        Outbound::Frame(pb::ServerFrame::default())
    }
}

impl From<pb::ServerFrame> for Outbound {
    fn from(frame: pb::ServerFrame) -> Outbound {
        Outbound::Frame(frame)
    }
}

impl Outbound {
    /// The same frame as a `ServerFrame` (messages owned, values sharing
    /// the maps they were read from).
    pub fn into_frame(self) -> pb::ServerFrame {
        use pb::server_frame::Kind;
        match self {
            Outbound::Frame(frame) => frame,
            Outbound::Fetch {
                request_id,
                messages,
                next_offset,
                end_offset,
            } => pb::ServerFrame {
                kind: Some(Kind::Response(pb::Response {
                    request_id,
                    result: Some(pb::response::Result::Fetch(pb::FetchResponse {
                        messages: super::convert::messages(messages.deliveries),
                        next_offset,
                        end_offset,
                    })),
                })),
            },
            Outbound::Delivery {
                subscription_id,
                messages,
            } => pb::ServerFrame {
                kind: Some(Kind::Delivery(pb::Delivery {
                    subscription_id,
                    messages: super::convert::messages(messages.deliveries),
                    error: None,
                    skipped_offset: None,
                })),
            },
        }
    }

    /// The body of the field inside `ServerFrame`, and its length.
    fn inner_len(&self) -> usize {
        match self {
            Outbound::Frame(_) => 0,
            Outbound::Fetch {
                request_id,
                messages,
                next_offset,
                end_offset,
            } => {
                let fetch = fetch_len(messages.len, *next_offset, *end_offset);
                uint64_len(RESPONSE_REQUEST_ID, *request_id) + delimited_len(RESPONSE_FETCH, fetch)
            }
            Outbound::Delivery {
                subscription_id,
                messages,
            } => uint64_len(DELIVERY_SUBSCRIPTION_ID, *subscription_id) + messages.len,
        }
    }
}

/// Length of a `FetchResponse` body whose messages take `messages` bytes.
fn fetch_len(messages: usize, next_offset: u64, end_offset: u64) -> usize {
    messages + uint64_len(FETCH_NEXT_OFFSET, next_offset) + uint64_len(FETCH_END_OFFSET, end_offset)
}

impl prost::Message for Outbound {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Outbound::Frame(frame) => frame.encode_raw(buf),
            Outbound::Fetch {
                request_id,
                messages,
                next_offset,
                end_offset,
            } => {
                put_delimited_header(FRAME_RESPONSE, self.inner_len(), buf);
                put_uint64(RESPONSE_REQUEST_ID, *request_id, buf);
                let fetch = fetch_len(messages.len, *next_offset, *end_offset);
                put_delimited_header(RESPONSE_FETCH, fetch, buf);
                messages.encode(FETCH_MESSAGES, buf);
                put_uint64(FETCH_NEXT_OFFSET, *next_offset, buf);
                put_uint64(FETCH_END_OFFSET, *end_offset, buf);
            }
            Outbound::Delivery {
                subscription_id,
                messages,
            } => {
                put_delimited_header(FRAME_DELIVERY, self.inner_len(), buf);
                put_uint64(DELIVERY_SUBSCRIPTION_ID, *subscription_id, buf);
                messages.encode(DELIVERY_MESSAGES, buf);
            }
        }
    }

    /// Decoding yields the `ServerFrame` form.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut frame = std::mem::take(self).into_frame();
        let merged = frame.merge_field(tag, wire_type, buf, ctx);
        *self = Outbound::Frame(frame);
        merged
    }

    fn encoded_len(&self) -> usize {
        match self {
            Outbound::Frame(frame) => frame.encoded_len(),
            Outbound::Fetch { .. } => delimited_len(FRAME_RESPONSE, self.inner_len()),
            Outbound::Delivery { .. } => delimited_len(FRAME_DELIVERY, self.inner_len()),
        }
    }

    fn clear(&mut self) {
        *self = Outbound::default();
    }
}

/// Messages ready to encode as a repeated `Message` field, with each one's
/// encoded length worked out once.
#[derive(Debug)]
pub struct WireMessages {
    deliveries: Deliveries,
    /// Each message's encoded length (without its tag and length prefix).
    lens: Vec<usize>,
    /// The whole repeated field's length (field numbers below 16: one-byte tags).
    len: usize,
}

impl WireMessages {
    /// `deliveries`, to encode.
    pub fn new(deliveries: Deliveries) -> WireMessages {
        let mut lens = Vec::with_capacity(deliveries.len());
        deliveries.for_each_shape(|m| {
            lens.push(match m {
                Ok(shape) => shape_len(&shape),
                Err(m) => message_len(&m),
            })
        });
        let len = field_len(&lens);
        WireMessages {
            deliveries,
            lens,
            len,
        }
    }

    /// Number of messages.
    pub fn count(&self) -> usize {
        self.lens.len()
    }

    /// Offset of the first message.
    pub fn first_offset(&self) -> Option<u64> {
        self.deliveries.first_offset().map(|o| o.0)
    }

    /// The messages.
    pub fn into_deliveries(self) -> Deliveries {
        self.deliveries
    }

    /// Splits off the messages from index `at` on.
    fn split_off(&mut self, at: usize) -> WireMessages {
        let lens = self.lens.split_off(at);
        let deliveries = self.deliveries.split_off(at);
        self.len = field_len(&self.lens);
        WireMessages {
            len: field_len(&lens),
            deliveries,
            lens,
        }
    }

    fn encode(&self, field: u32, buf: &mut impl BufMut) {
        let mut lens = self.lens.iter();
        self.deliveries.for_each(|m| {
            // One length per message, taken from the same messages.
            let len = lens.next().copied().unwrap_or_default();
            put_delimited_header(field, len, buf);
            encode_message(&m, buf);
        });
    }
}

/// What one piece of a subscription's deliveries becomes.
#[derive(Debug)]
pub enum Piece {
    /// A `Delivery` of these messages, whose frame fits.
    Messages(WireMessages),
    /// A `Delivery` saying the message at `offset` was skipped, and why.
    Skipped {
        /// Its offset.
        offset: u64,
        /// RESOURCE_EXHAUSTED, naming its size and the limit.
        error: pb::Error,
    },
}

/// `deliveries` of subscription `id` as deliveries whose frames (a
/// `ServerFrame` holding the delivery) take at most `max_frame` bytes:
/// normally one; split in halves if the envelopes came out larger than
/// planned, and a single message that still does not fit becomes a
/// delivery saying it was skipped (RESOURCE_EXHAUSTED naming its offset)
/// rather than a frame the codec would refuse. A gRPC message holding the
/// delivery alone is smaller than its frame, so gRPC splits the same way.
pub fn pieces(id: u64, deliveries: Deliveries, max_frame: u32) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pending = vec![WireMessages::new(deliveries)];
    while let Some(mut batch) = pending.pop() {
        let len = delivery_frame_len(id, &batch);
        if len <= max_frame as usize {
            out.push(Piece::Messages(batch));
            continue;
        }
        if batch.count() > 1 {
            let second = batch.split_off(batch.count() / 2);
            pending.push(second);
            pending.push(batch);
        } else if let Some(offset) = batch.first_offset() {
            out.push(Piece::Skipped {
                offset,
                error: status::error(
                    pb::Code::ResourceExhausted,
                    format!(
                        "the message at offset {offset} takes a {len}-byte frame; max_frame_bytes is {max_frame}"
                    ),
                ),
            });
        }
    }
    out
}

/// The bytes of a `ServerFrame` holding a delivery of `messages` to `id`.
fn delivery_frame_len(id: u64, messages: &WireMessages) -> usize {
    let body = uint64_len(DELIVERY_SUBSCRIPTION_ID, id) + messages.len;
    delimited_len(FRAME_DELIVERY, body)
}

fn field_len(lens: &[usize]) -> usize {
    lens.iter().map(|&l| delimited_len(FETCH_MESSAGES, l)).sum()
}

/// A length-delimited field's bytes: tag, length, body.
fn delimited_len(field: u32, body: usize) -> usize {
    key_len(field) + encoded_len_varint(body as u64) + body
}

/// A proto3 `uint64` field's bytes (none for 0).
fn uint64_len(field: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(field) + encoded_len_varint(v)
    }
}

/// A proto3 `bytes` or `string` field's bytes (none when empty).
fn bytes_len(field: u32, v: &[u8]) -> usize {
    if v.is_empty() {
        0
    } else {
        delimited_len(field, v.len())
    }
}

fn header_len(name: &str, value: &[u8]) -> usize {
    bytes_len(HEADER_NAME, name.as_bytes()) + bytes_len(HEADER_VALUE, value)
}

/// A `Message`'s encoded length (its body, without tag or length prefix).
fn message_len(m: &DeliveryRef<'_>) -> usize {
    uint64_len(MESSAGE_OFFSET, m.offset())
        + uint64_len(MESSAGE_TIMESTAMP, m.timestamp_ms())
        + m.key().map_or(0, |k| delimited_len(MESSAGE_KEY, k.len()))
        + m.headers()
            .map(|(name, value)| delimited_len(MESSAGE_HEADERS, header_len(name, value)))
            .sum::<usize>()
        + bytes_len(MESSAGE_VALUE, m.value())
        + uint64_len(MESSAGE_DELIVERY, u64::from(m.delivery()))
}

/// [`message_len`] of a message without headers or a delivery count, from
/// what the read noted.
fn shape_len(s: &Shape) -> usize {
    uint64_len(MESSAGE_OFFSET, s.offset)
        + uint64_len(MESSAGE_TIMESTAMP, s.timestamp_ms)
        + s.key_len.map_or(0, |k| delimited_len(MESSAGE_KEY, k))
        + if s.value_len == 0 {
            0
        } else {
            delimited_len(MESSAGE_VALUE, s.value_len)
        }
}

fn put_delimited_header(field: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_uint64(field: u32, v: u64, buf: &mut impl BufMut) {
    if v != 0 {
        encode_key(field, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn put_bytes(field: u32, v: &[u8], buf: &mut impl BufMut) {
    if !v.is_empty() {
        put_delimited_header(field, v.len(), buf);
        buf.put_slice(v);
    }
}

/// Encodes `m` as a `Message` body, in field order as prost does.
fn encode_message(m: &DeliveryRef<'_>, buf: &mut impl BufMut) {
    put_uint64(MESSAGE_OFFSET, m.offset(), buf);
    put_uint64(MESSAGE_TIMESTAMP, m.timestamp_ms(), buf);
    if let Some(key) = m.key() {
        // `optional bytes`: present even when empty.
        put_delimited_header(MESSAGE_KEY, key.len(), buf);
        buf.put_slice(key);
    }
    for (name, value) in m.headers() {
        put_delimited_header(MESSAGE_HEADERS, header_len(name, value), buf);
        put_bytes(HEADER_NAME, name.as_bytes(), buf);
        put_bytes(HEADER_VALUE, value, buf);
    }
    put_bytes(MESSAGE_VALUE, m.value(), buf);
    put_uint64(MESSAGE_DELIVERY, u64::from(m.delivery()), buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Delivery, DeliveryLimits, Topic, TopicConfig};
    use crate::protocol::convert;
    use crate::storage::io::SimDisk;
    use crate::storage::{FsyncPolicy, Message, NewMessage, Offset, RecoveryMode, record};
    use proptest::prelude::*;
    use prost::Message as _;
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::sync::Arc;

    fn arb_message() -> impl Strategy<Value = NewMessage> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::collection::vec(
                ("[a-z]{0,6}", proptest::collection::vec(any::<u8>(), 0..6)),
                0..3,
            ),
            prop_oneof![
                3 => proptest::collection::vec(any::<u8>(), 0..200),
                1 => proptest::collection::vec(any::<u8>(), 600..900),
            ],
            proptest::option::of(0u64..3),
        )
            .prop_map(|(key, headers, value, ts)| {
                let mut m = NewMessage::from_value(value);
                m.key = key.map(Into::into);
                m.timestamp_ms = ts;
                for (name, value) in headers {
                    m = m.with_header(name, value);
                }
                m
            })
    }

    /// A topic of small segments holding `messages`, `deleted` deleted.
    fn topic(disk: &Arc<SimDisk>, messages: &[NewMessage], deleted: &BTreeSet<u64>) -> Topic {
        let mut config = TopicConfig::default();
        config.log.segment_bytes = 4096;
        config.log.fsync = FsyncPolicy::Never;
        let storage: Arc<dyn crate::storage::io::Storage> = disk.clone();
        let t = Topic::open(
            storage,
            Path::new("/t"),
            "t",
            config,
            RecoveryMode::default(),
        )
        .expect("topic opens");
        for chunk in messages.chunks(3) {
            t.produce(chunk).expect("append");
        }
        let deleted: Vec<Offset> = deleted.iter().map(|&o| Offset(o)).collect();
        if !deleted.is_empty() {
            t.delete(&deleted).expect("delete");
        }
        t
    }

    /// The read as it was done before records were kept in place: owned
    /// messages, filtered and cut to the limits one by one.
    fn old_read(
        t: &Topic,
        from: u64,
        limits: DeliveryLimits,
        deleted: &BTreeSet<u64>,
    ) -> crate::Result<Vec<Message>> {
        let end = t.log().end().0;
        let mut from = from;
        let mut live = loop {
            let batch = t.log().read(Offset(from), limits.messages, limits.bytes)?;
            let Some(last) = batch.last().map(|m| m.offset.0) else {
                return Ok(batch);
            };
            let live: Vec<Message> = batch
                .into_iter()
                .filter(|m| !deleted.contains(&m.offset.0))
                .collect();
            if !live.is_empty() || last + 1 >= end {
                break live;
            }
            from = last + 1;
        };
        let excess = |m: &Message| {
            let size = record::payload_len(m);
            (size > limits.message_bytes).then_some(size)
        };
        if let Some(i) = live.iter().position(|m| excess(m).is_some()) {
            if let (0, Some(size)) = (i, excess(&live[0])) {
                return Err(crate::Error::TooLarge {
                    offset: live[0].offset.0,
                    size,
                    limit: limits.message_bytes,
                });
            }
            live.truncate(i);
        }
        Ok(live)
    }

    fn fetch_frame(request_id: u64, messages: Vec<pb::Message>, end: u64) -> pb::ServerFrame {
        let next_offset = messages.last().map_or(0, |m| m.offset + 1);
        pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Response(pb::Response {
                request_id,
                result: Some(pb::response::Result::Fetch(pb::FetchResponse {
                    messages,
                    next_offset,
                    end_offset: end,
                })),
            })),
        }
    }

    /// How subscription deliveries were split before: halves of prost
    /// messages until each frame fits.
    fn old_deliveries(id: u64, messages: Vec<pb::Message>, max_frame: u32) -> Vec<pb::Delivery> {
        let frame_len = |d: &pb::Delivery| {
            let body = d.encoded_len();
            1 + prost::length_delimiter_len(body) + body
        };
        let mut out = Vec::new();
        let mut pending = vec![messages];
        while let Some(batch) = pending.pop() {
            let d = pb::Delivery {
                subscription_id: id,
                messages: batch,
                error: None,
                skipped_offset: None,
            };
            let len = frame_len(&d);
            if len <= max_frame as usize {
                out.push(d);
                continue;
            }
            let mut batch = d.messages;
            if batch.len() > 1 {
                let second = batch.split_off(batch.len() / 2);
                pending.push(second);
                pending.push(batch);
            } else if let Some(m) = batch.pop() {
                out.push(pb::Delivery {
                    subscription_id: id,
                    messages: Vec::new(),
                    error: Some(status::error(
                        pb::Code::ResourceExhausted,
                        format!(
                            "the message at offset {} takes a {len}-byte frame; max_frame_bytes is {max_frame}",
                            m.offset
                        ),
                    )),
                    skipped_offset: Some(m.offset),
                });
            }
        }
        out
    }

    fn encode(frame: &Outbound) -> Vec<u8> {
        let mut buf = Vec::new();
        frame.encode(&mut buf).expect("a Vec grows");
        assert_eq!(buf.len(), frame.encoded_len(), "encoded_len is exact");
        buf
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A fetch reply and subscription deliveries encoded from the
        /// records in place are byte for byte what prost gave for the
        /// messages the old read built, with deletions, every limit, and
        /// damage on the disk.
        #[test]
        fn frames_from_records_are_the_frames_of_the_message_path(
            messages in proptest::collection::vec(arb_message(), 1..30),
            deleted in proptest::collection::btree_set(0u64..30, 0..8),
            from in 0u64..32,
            max_messages in 1usize..12,
            max_bytes in 1usize..3000,
            message_bytes in 100usize..1000,
            request_id in any::<u64>(),
            max_frame in 200u32..3000,
            damage in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            let disk = Arc::new(SimDisk::new());
            let n = messages.len() as u64;
            let deleted: BTreeSet<u64> = deleted.into_iter().filter(|&o| o < n).collect();
            let t = topic(&disk, &messages, &deleted);
            if let Some((at, xor)) = damage {
                let segments = t.log().segments();
                let segment = &segments[at.index(segments.len())];
                let len = segment.size();
                if len > 0 {
                    let pos = at.index(len as usize) as u64;
                    let mut byte = [0u8];
                    byte[0] = disk
                        .read_file(&segment.paths().log)
                        .expect("segment file")[pos as usize] ^ xor;
                    disk.damage(&segment.paths().log, pos, &byte).expect("damage");
                }
            }
            let limits = DeliveryLimits { messages: max_messages, bytes: max_bytes, message_bytes };
            let end = t.log().end().0;
            let new = t.read_within(Offset(from), limits);
            let old = old_read(&t, from, limits, &deleted);
            match (new, old) {
                (Ok(records), Ok(old)) => {
                    let deliveries = Deliveries::from(records);
                    prop_assert_eq!(deliveries.len(), old.len());
                    let old_wire: Vec<pb::Message> =
                        old.iter().cloned().map(|m| convert::message(m, 0)).collect();
                    let fetch = Outbound::Fetch {
                        request_id,
                        next_offset: deliveries.last_offset().map_or(0, |o| o.0 + 1),
                        messages: WireMessages::new(deliveries.clone()),
                        end_offset: end,
                    };
                    let expected = fetch_frame(request_id, old_wire.clone(), end);
                    let bytes = encode(&fetch);
                    prop_assert_eq!(&bytes, &expected.encode_to_vec());
                    prop_assert_eq!(pb::ServerFrame::decode(&bytes[..]).expect("decodes"), expected);
                    let pieces: Vec<pb::Delivery> = pieces(9, deliveries, max_frame)
                        .into_iter()
                        .map(|p| match p {
                            Piece::Messages(messages) => {
                                let frame = Outbound::Delivery { subscription_id: 9, messages };
                                let bytes = encode(&frame);
                                prop_assert!(bytes.len() <= max_frame as usize);
                                let decoded = pb::ServerFrame::decode(&bytes[..]).expect("decodes");
                                let Some(pb::server_frame::Kind::Delivery(d)) = decoded.kind else {
                                    panic!("a delivery frame");
                                };
                                Ok(d)
                            }
                            Piece::Skipped { offset, error } => Ok(pb::Delivery {
                                subscription_id: 9,
                                messages: Vec::new(),
                                error: Some(error),
                                skipped_offset: Some(offset),
                            }),
                        })
                        .collect::<Result<_, _>>()?;
                    prop_assert_eq!(pieces, old_deliveries(9, old_wire, max_frame));
                }
                (Err(new), Err(old)) => prop_assert_eq!(new.to_string(), old.to_string()),
                (new, old) => prop_assert!(false, "new {:?}, old {:?}", new.map(|r| r.len()), old.map(|m| m.len())),
            }
        }
    }

    #[test]
    fn queue_deliveries_carry_their_counts() {
        let leased: Vec<Delivery> = (0..3u64)
            .map(|i| Delivery {
                message: Message {
                    offset: Offset(i * 5),
                    timestamp_ms: 7,
                    key: (i == 1).then(bytes::Bytes::new),
                    headers: vec![crate::storage::Header::new("", "v")],
                    value: bytes::Bytes::from(vec![i as u8; i as usize]),
                },
                delivery: i as u32 + 1,
            })
            .collect();
        let wire: Vec<pb::Message> = leased
            .iter()
            .cloned()
            .map(|d| convert::message(d.message, d.delivery))
            .collect();
        let frame = Outbound::Delivery {
            subscription_id: 0,
            messages: WireMessages::new(Deliveries::from(leased)),
        };
        let expected = pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
                subscription_id: 0,
                messages: wire,
                error: None,
                skipped_offset: None,
            })),
        };
        assert_eq!(encode(&frame), expected.encode_to_vec());
    }

    #[test]
    fn an_outbound_frame_decodes_as_a_server_frame() {
        let expected = fetch_frame(3, Vec::new(), 10);
        let bytes = encode(&Outbound::Fetch {
            request_id: 3,
            messages: WireMessages::new(Deliveries::default()),
            next_offset: 0,
            end_offset: 10,
        });
        let decoded = Outbound::decode(&bytes[..]).expect("decodes");
        let Outbound::Frame(frame) = decoded else {
            panic!("decoding gives the frame form");
        };
        assert_eq!(frame, expected);
    }
}
