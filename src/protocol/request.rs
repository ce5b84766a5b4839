//! Produce requests without the generated types, on both ends. A client
//! queues a [`ClientOut`]: a generated [`pb::ClientFrame`], or a produce
//! request kept as the engine's [`NewMessage`]s and written as the same
//! bytes prost writes for the frame, without a `pb::NewMessage` per message
//! (or the reference count prost takes and drops on every value it
//! encodes). A server reads a [`ClientIn`]: a produce request in the
//! layout encoders write is decoded straight into `NewMessage`s whose
//! values are slices of the frame; every other frame, and any produce
//! request in another layout, goes through the generated decoder.

use super::codec::FrameError;
use super::{convert, pb};
use crate::storage::{Header, NewMessage};
use bytes::{BufMut, Bytes};
use prost::Message as _;
use prost::encoding::{
    DecodeContext, WireType, decode_key, decode_varint, encode_key, encode_varint,
    encoded_len_varint, key_len, skip_field,
};
use std::sync::Arc;

/// `ClientFrame.request_id`.
const FRAME_REQUEST_ID: u32 = 1;
/// `ClientFrame.produce` (a member of the `request` oneof).
const FRAME_PRODUCE: u32 = 3;
/// `ProduceRequest.topic`.
const PRODUCE_TOPIC: u32 = 1;
/// `ProduceRequest.messages`.
const PRODUCE_MESSAGES: u32 = 2;
/// `NewMessage.timestamp_ms` (optional: present even when 0).
const MESSAGE_TIMESTAMP: u32 = 1;
/// `NewMessage.key` (optional: present even when empty).
const MESSAGE_KEY: u32 = 2;
/// `NewMessage.headers`.
const MESSAGE_HEADERS: u32 = 3;
/// `NewMessage.value`.
const MESSAGE_VALUE: u32 = 4;
/// `Header.name`.
const HEADER_NAME: u32 = 1;
/// `Header.value`.
const HEADER_VALUE: u32 = 2;

/// A frame a client queues for its connection's writer.
// The queue held bare `pb::ClientFrame`s before; boxing them to shrink the
// enum would add an allocation to every other request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ClientOut {
    /// Any request, as the generated type.
    Frame(pb::ClientFrame),
    /// A produce request, kept as the engine's messages until it is written.
    Produce(ProduceFrame),
}

impl ClientOut {
    /// Bytes of the frame's protobuf body.
    pub fn encoded_len(&self) -> usize {
        match self {
            ClientOut::Frame(f) => f.encoded_len(),
            ClientOut::Produce(p) => p.len,
        }
    }

    /// Writes the protobuf body ([`ClientOut::encoded_len`] bytes).
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            ClientOut::Frame(f) => f.encode_raw(buf),
            ClientOut::Produce(p) => p.encode(buf),
        }
    }
}

/// `ClientFrame { request_id, produce: ProduceRequest { topic, messages } }`
/// over the engine's messages.
#[derive(Debug)]
pub struct ProduceFrame {
    request_id: u64,
    topic: String,
    /// Shared, so a batch sent again (a retry, a benchmark) is not cloned
    /// message by message.
    messages: Arc<Vec<NewMessage>>,
    /// Encoded length of the `ProduceRequest`, sized once for both the
    /// frame's length and its encoding.
    request: usize,
    /// Encoded length of the whole frame body.
    len: usize,
}

impl ProduceFrame {
    /// The frame of request `request_id` producing `messages` to `topic`.
    pub fn new(request_id: u64, topic: String, messages: Arc<Vec<NewMessage>>) -> ProduceFrame {
        let request = request_len(&topic, &messages);
        let mut len = key_len(FRAME_PRODUCE) + encoded_len_varint(request as u64) + request;
        if request_id != 0 {
            len += key_len(FRAME_REQUEST_ID) + encoded_len_varint(request_id);
        }
        ProduceFrame {
            request_id,
            topic,
            messages,
            request,
            len,
        }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        if self.request_id != 0 {
            encode_key(FRAME_REQUEST_ID, WireType::Varint, buf);
            encode_varint(self.request_id, buf);
        }
        encode_key(FRAME_PRODUCE, WireType::LengthDelimited, buf);
        encode_varint(self.request as u64, buf);
        put_bytes(PRODUCE_TOPIC, self.topic.as_bytes(), buf);
        for m in self.messages.iter() {
            encode_key(PRODUCE_MESSAGES, WireType::LengthDelimited, buf);
            encode_varint(message_len(m) as u64, buf);
            if let Some(ts) = m.timestamp_ms {
                encode_key(MESSAGE_TIMESTAMP, WireType::Varint, buf);
                encode_varint(ts, buf);
            }
            if let Some(key) = &m.key {
                encode_key(MESSAGE_KEY, WireType::LengthDelimited, buf);
                encode_varint(key.len() as u64, buf);
                buf.put_slice(key);
            }
            for h in &m.headers {
                encode_key(MESSAGE_HEADERS, WireType::LengthDelimited, buf);
                encode_varint(header_len(h) as u64, buf);
                put_bytes(HEADER_NAME, h.name.as_bytes(), buf);
                put_bytes(HEADER_VALUE, &h.value, buf);
            }
            put_bytes(MESSAGE_VALUE, &m.value, buf);
        }
    }
}

/// A proto3 `string`/`bytes` field: absent when empty.
fn put_bytes(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// Encoded length of a proto3 `string`/`bytes` field.
fn bytes_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

/// Encoded length of a length-delimited field whose body is `len` bytes.
fn nested_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn request_len(topic: &str, messages: &[NewMessage]) -> usize {
    let messages: usize = messages
        .iter()
        .map(|m| nested_len(PRODUCE_MESSAGES, message_len(m)))
        .sum();
    bytes_len(PRODUCE_TOPIC, topic.len()) + messages
}

fn header_len(h: &crate::storage::Header) -> usize {
    bytes_len(HEADER_NAME, h.name.len()) + bytes_len(HEADER_VALUE, h.value.len())
}

#[inline]
fn message_len(m: &NewMessage) -> usize {
    let timestamp = m
        .timestamp_ms
        .map_or(0, |ts| key_len(MESSAGE_TIMESTAMP) + encoded_len_varint(ts));
    let key = m
        .key
        .as_ref()
        .map_or(0, |k| nested_len(MESSAGE_KEY, k.len()));
    let headers: usize = m
        .headers
        .iter()
        .map(|h| nested_len(MESSAGE_HEADERS, header_len(h)))
        .sum();
    timestamp + key + headers + bytes_len(MESSAGE_VALUE, m.value.len())
}

/// A frame as a server reads it.
// The generated frame is the larger; boxing it would add an allocation to
// every other request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ClientIn {
    /// Any request but a produce, as the generated type.
    Frame(pb::ClientFrame),
    /// A produce request, its messages decoded straight into the engine's.
    Produce(ProduceIn),
}

/// A produce request as a server reads it: the values are slices of the
/// received frame, as with the generated types.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceIn {
    /// The request's id.
    pub request_id: u64,
    /// `ProduceRequest.topic`.
    pub topic: String,
    /// `ProduceRequest.messages`.
    pub messages: Vec<NewMessage>,
}

impl ClientIn {
    /// Decodes a frame body. A produce request in the layout encoders write
    /// (one-byte keys, every field of a message once or more, no unknown
    /// fields, the request once) is read straight into [`NewMessage`]s; anything else,
    /// and any body this reader does not take, goes to the generated
    /// decoder, which decides what it means or why it is invalid. Either
    /// way the result is what decoding a `pb::ClientFrame` and converting
    /// its produce request gives.
    /// A produce request whose messages and headers would take more than
    /// [`most_decoded`] is [`FrameError::TooHeavy`], refused before they
    /// are built.
    pub fn decode(body: Bytes) -> Result<ClientIn, FrameError> {
        let mut budget = Budget::new(body.len());
        if let Some(produce) = produce_in(&body, &mut budget) {
            return Ok(ClientIn::Produce(produce));
        }
        if !budget.spent {
            // Not the common layout: weighed apart before the generated
            // decoder builds it.
            budget = Budget::new(body.len());
            let _ = weigh_frame(&body, &mut budget);
        }
        if budget.spent {
            return Err(FrameError::TooHeavy(too_heavy(body.len())));
        }
        Ok(ClientIn::from_frame(pb::ClientFrame::decode(body)?))
    }

    /// A frame the generated decoder read, its produce request converted.
    fn from_frame(frame: pb::ClientFrame) -> ClientIn {
        match frame.request {
            Some(pb::client_frame::Request::Produce(p)) => ClientIn::Produce(ProduceIn {
                request_id: frame.request_id,
                topic: p.topic,
                messages: p.messages.into_iter().map(convert::new_message).collect(),
            }),
            request => ClientIn::Frame(pb::ClientFrame {
                request_id: frame.request_id,
                request,
            }),
        }
    }

    /// The request's id.
    pub fn request_id(&self) -> u64 {
        match self {
            ClientIn::Frame(f) => f.request_id,
            ClientIn::Produce(p) => p.request_id,
        }
    }
}

/// Most bytes the messages and headers of a produce request of `len`
/// bytes may take once decoded. Keys and values stay slices of the request,
/// but each message and each header is a structure of its own and a
/// header's name is copied, so a request of many empty messages or headers
/// would take up to 50 times its size: past 8 times its size and 4 MiB,
/// beside the messages a batch may carry ([`allow_batch_messages`]), it
/// is refused (a batch of ordinary messages takes a few times its size).
pub fn most_decoded(len: usize) -> usize {
    let batch = BATCH_MESSAGES.load(std::sync::atomic::Ordering::Relaxed);
    len.saturating_mul(8)
        .saturating_add(4 << 20)
        .saturating_add(batch.saturating_mul(std::mem::size_of::<NewMessage>()))
}

/// The most messages a produce request may carry on a server of this
/// process (its `max_batch_messages`), which [`most_decoded`] allows for in
/// full: a batch of that many tiny messages is never refused as too heavy.
static BATCH_MESSAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(10_000);

/// Lets produce requests carry `n` messages (the largest of the calls).
pub fn allow_batch_messages(n: usize) {
    BATCH_MESSAGES.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
}

/// Why a produce request of `len` bytes is refused as too heavy.
pub fn too_heavy(len: usize) -> String {
    format!(
        "produce request of {len} bytes refused: its messages and headers would take over {} \
         bytes once decoded (at most 8 times the request and 4 MiB, beside max_batch_messages messages); send fewer, larger \
         messages or headers per request",
        most_decoded(len)
    )
}

/// What a produce request's messages and headers may still take decoded
/// (from [`most_decoded`]); `spent` once one did not fit.
struct Budget {
    left: usize,
    spent: bool,
}

impl Budget {
    fn new(len: usize) -> Budget {
        Budget {
            left: most_decoded(len),
            spent: false,
        }
    }

    /// Takes `bytes`; `None` (and spent) if they do not fit.
    #[inline]
    fn take(&mut self, bytes: usize) -> Option<()> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Some(())
            }
            None => {
                self.spent = true;
                None
            }
        }
    }

    /// A message's part.
    #[inline]
    fn message(&mut self) -> Option<()> {
        self.take(std::mem::size_of::<NewMessage>())
    }

    /// A header's part, its name `name_len` bytes.
    #[inline]
    fn header(&mut self, name_len: usize) -> Option<()> {
        self.take(std::mem::size_of::<Header>() + name_len)
    }
}

/// Calls `f` with the body of each length-delimited field `tag` of the
/// message `buf`, passing over the others; `None` if `buf` is not a valid
/// message or `f` answers `None`.
fn each_delimited(mut buf: &[u8], tag: u32, mut f: impl FnMut(&[u8]) -> Option<()>) -> Option<()> {
    while !buf.is_empty() {
        let (field, wire) = decode_key(&mut buf).ok()?;
        if field == tag && wire == WireType::LengthDelimited {
            f(delimited(&mut buf)?)?;
        } else {
            skip_field(wire, field, &mut buf, DecodeContext::default()).ok()?;
        }
    }
    Some(())
}

/// Weighs the produce requests of frame body `frame` into `budget`.
fn weigh_frame(frame: &[u8], budget: &mut Budget) -> Option<()> {
    each_delimited(frame, FRAME_PRODUCE, |request| {
        weigh_produce(request, budget)
    })
}

/// Weighs the messages and headers of `ProduceRequest` body `request` into
/// `budget`: `None` once they do not fit (or the body is invalid, which the
/// generated decoder then names).
fn weigh_produce(request: &[u8], budget: &mut Budget) -> Option<()> {
    each_delimited(request, PRODUCE_MESSAGES, |message| {
        budget.message()?;
        each_delimited(message, MESSAGE_HEADERS, |header| {
            let mut name_len = 0;
            each_delimited(header, HEADER_NAME, |name| {
                name_len += name.len();
                Some(())
            })?;
            budget.header(name_len)
        })
    })
}

/// Whether a `ProduceRequest` body of the gRPC service would take more
/// than [`most_decoded`] once decoded.
pub fn produce_too_heavy(request: &[u8]) -> bool {
    let mut budget = Budget::new(request.len());
    let _ = weigh_produce(request, &mut budget);
    budget.spent
}

/// Most messages reserved for from the first one's size (a frame of tiny
/// messages grows the list as it goes instead).
const MOST_RESERVED: usize = 8192;

/// A `string` field's bytes, if UTF-8 (each occurrence is checked, as the
/// generated decoder does).
fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// The one byte a key of field `tag` (below 16) with `wire` encodes as.
const fn key(tag: u32, wire: WireType) -> u8 {
    ((tag << 3) | wire as u32) as u8
}

const KEY_FRAME_REQUEST_ID: u8 = key(FRAME_REQUEST_ID, WireType::Varint);
const KEY_FRAME_PRODUCE: u8 = key(FRAME_PRODUCE, WireType::LengthDelimited);
const KEY_PRODUCE_TOPIC: u8 = key(PRODUCE_TOPIC, WireType::LengthDelimited);
const KEY_PRODUCE_MESSAGES: u8 = key(PRODUCE_MESSAGES, WireType::LengthDelimited);
const KEY_MESSAGE_TIMESTAMP: u8 = key(MESSAGE_TIMESTAMP, WireType::Varint);
const KEY_MESSAGE_KEY: u8 = key(MESSAGE_KEY, WireType::LengthDelimited);
const KEY_MESSAGE_HEADERS: u8 = key(MESSAGE_HEADERS, WireType::LengthDelimited);
const KEY_MESSAGE_VALUE: u8 = key(MESSAGE_VALUE, WireType::LengthDelimited);
const KEY_HEADER_NAME: u8 = key(HEADER_NAME, WireType::LengthDelimited);
const KEY_HEADER_VALUE: u8 = key(HEADER_VALUE, WireType::LengthDelimited);

/// The next field's key, if it is one byte, as encoders write every key of
/// a produce request; `None` otherwise (a longer key, such as an unknown
/// field's or a padded one, is the generated decoder's to read).
#[inline]
fn next_key(buf: &mut &[u8]) -> Option<u8> {
    let (&key, rest) = buf.split_first()?;
    if key >= 0x80 {
        return None;
    }
    *buf = rest;
    Some(key)
}

/// A varint, its one-byte form read in place.
#[inline]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    match buf.split_first() {
        Some((&b, rest)) if b < 0x80 => {
            *buf = rest;
            Some(u64::from(b))
        }
        _ => decode_varint(buf).ok(),
    }
}

/// A length-delimited field's body, taken off `buf`.
#[inline]
fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(buf)?).ok()?;
    if len > buf.len() {
        return None;
    }
    let (body, rest) = buf.split_at(len);
    *buf = rest;
    Some(body)
}

/// The fast path of [`ClientIn::decode`]: `None` for anything but a produce
/// request in the common layout (see there).
fn produce_in(frame: &Bytes, budget: &mut Budget) -> Option<ProduceIn> {
    // `part` is a slice of `frame`: the same bytes as a `Bytes` sharing it.
    let share = |part: &[u8]| frame.slice_ref(part);
    let mut buf: &[u8] = frame;
    let mut request_id = 0;
    let mut request: Option<&[u8]> = None;
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            KEY_FRAME_REQUEST_ID => request_id = varint(&mut buf)?,
            // A second one would be merged into the first.
            KEY_FRAME_PRODUCE if request.is_none() => {
                request = Some(delimited(&mut buf)?);
            }
            _ => return None,
        }
    }
    let mut buf = request?;
    let mut topic = "";
    let mut messages = Vec::new();
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            KEY_PRODUCE_TOPIC => topic = utf8(delimited(&mut buf)?)?,
            KEY_PRODUCE_MESSAGES => {
                let before = buf.len();
                let body = delimited(&mut buf)?;
                budget.message()?;
                // Filled in where it lies: a message built apart and
                // moved in cost more than reading its fields.
                messages.push(NewMessage::default());
                message_in(body, &share, budget, messages.last_mut()?)?;
                if messages.len() == 1 {
                    // Sized from the first message: one allocation, not a
                    // doubling for every power of two up to the batch.
                    let estimate = buf.len() / (before - buf.len()) + 1;
                    messages.reserve(estimate.min(MOST_RESERVED));
                }
            }
            _ => return None,
        }
    }
    Some(ProduceIn {
        request_id,
        topic: topic.to_owned(),
        messages,
    })
}

/// Reads a `NewMessage` body into `m` (a default one); `None` if it is not
/// in the layout the fast path takes.
#[inline]
fn message_in(
    mut buf: &[u8],
    share: &impl Fn(&[u8]) -> Bytes,
    budget: &mut Budget,
    m: &mut NewMessage,
) -> Option<()> {
    let mut value: &[u8] = &[];
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            KEY_MESSAGE_TIMESTAMP => {
                m.timestamp_ms = Some(varint(&mut buf)?);
            }
            KEY_MESSAGE_KEY => {
                m.key = Some(share(delimited(&mut buf)?));
            }
            KEY_MESSAGE_HEADERS => {
                m.headers
                    .push(header_in(delimited(&mut buf)?, share, budget)?);
            }
            KEY_MESSAGE_VALUE => value = delimited(&mut buf)?,
            _ => return None,
        }
    }
    if !value.is_empty() {
        m.value = share(value);
    }
    Some(())
}

fn header_in(
    mut buf: &[u8],
    share: &impl Fn(&[u8]) -> Bytes,
    budget: &mut Budget,
) -> Option<Header> {
    let (mut name, mut value): (&str, &[u8]) = ("", &[]);
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            KEY_HEADER_NAME => name = utf8(delimited(&mut buf)?)?,
            KEY_HEADER_VALUE => value = delimited(&mut buf)?,
            _ => return None,
        }
    }
    budget.header(name.len())?;
    Some(Header {
        name: name.to_owned(),
        value: if value.is_empty() {
            Bytes::new()
        } else {
            share(value)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::convert;
    use crate::storage::Header;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = NewMessage> {
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::collection::vec(
                (
                    "[a-z-]{0,12}",
                    proptest::collection::vec(any::<u8>(), 0..20),
                ),
                0..4,
            ),
            // Past 127 bytes a length takes two varint bytes.
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(timestamp_ms, key, headers, value)| NewMessage {
                timestamp_ms,
                key: key.map(Bytes::from),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| Header::new(n, v))
                    .collect(),
                value: Bytes::from(value),
            })
    }

    /// The frame as the generated types encode it.
    fn generated(request_id: u64, topic: &str, messages: &[NewMessage]) -> Vec<u8> {
        pb::ClientFrame {
            request_id,
            request: Some(pb::client_frame::Request::Produce(pb::ProduceRequest {
                topic: topic.to_owned(),
                messages: messages
                    .iter()
                    .cloned()
                    .map(convert::new_message_to_wire)
                    .collect(),
            })),
        }
        .encode_to_vec()
    }

    proptest! {
        #[test]
        fn produce_frames_are_byte_identical_to_the_generated_encoding(
            request_id in prop_oneof![Just(0u64), any::<u64>()],
            topic in "[a-z.]{0,20}",
            messages in proptest::collection::vec(arb_message(), 0..8),
        ) {
            let want = generated(request_id, &topic, &messages);
            let out = ClientOut::Produce(ProduceFrame::new(request_id, topic.clone(), Arc::new(messages.clone())));
            prop_assert_eq!(out.encoded_len(), want.len());
            let mut got = Vec::new();
            out.encode(&mut got);
            prop_assert_eq!(&got, &want);
            let back = pb::ClientFrame::decode(&got[..]).expect("decodes");
            let Some(pb::client_frame::Request::Produce(p)) = back.request else {
                panic!("not a produce request");
            };
            prop_assert_eq!(p.topic, topic);
            let decoded: Vec<NewMessage> = p.messages.into_iter().map(convert::new_message).collect();
            prop_assert_eq!(decoded, messages);
        }
    }

    /// What the generated decoder and the conversion make of `body`.
    fn reference(body: &[u8]) -> Result<ClientIn, prost::DecodeError> {
        Ok(ClientIn::from_frame(pb::ClientFrame::decode(body)?))
    }

    fn same_as_reference(body: &[u8]) -> Result<(), TestCaseError> {
        let got = ClientIn::decode(Bytes::copy_from_slice(body));
        match (got, reference(body)) {
            (Ok(got), Ok(want)) => prop_assert_eq!(got, want),
            (Err(_), Err(_)) => {}
            (got, want) => {
                prop_assert!(false, "decoded {:?}, the generated decoder {:?}", got, want)
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn produce_frames_decode_on_the_fast_path_as_the_generated_decoder_does(
            request_id in any::<u64>(),
            topic in "[a-z.]{0,20}",
            messages in proptest::collection::vec(arb_message(), 0..8),
        ) {
            let body = Bytes::from(generated(request_id, &topic, &messages));
            prop_assert!(produce_in(&body, &mut Budget::new(body.len())).is_some(), "the fast path takes what encoders write");
            let got = ClientIn::decode(body.clone()).expect("decodes");
            prop_assert_eq!(&got, &reference(&body).expect("decodes"));
            prop_assert_eq!(got, ClientIn::Produce(ProduceIn { request_id, topic, messages }));
        }

        #[test]
        fn damaged_or_unusual_frames_decode_as_the_generated_decoder_does(
            messages in proptest::collection::vec(arb_message(), 1..4),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let body = generated(9, "orders", &messages);
            let mut changed = body.clone();
            let i = at.index(changed.len());
            changed[i] = byte;
            same_as_reference(&changed)?;
            same_as_reference(&body[..cut.index(body.len())])?;
            let mut longer = body.clone();
            longer.extend_from_slice(&extra);
            same_as_reference(&longer)?;
        }

        #[test]
        fn any_bytes_decode_as_the_generated_decoder_does(
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            same_as_reference(&body)?;
        }
    }

    #[test]
    fn frames_the_fast_path_leaves_decode_as_the_generated_decoder_does() {
        let one = vec![NewMessage::from_value("a")];
        let two = vec![NewMessage::from_value("b").with_key("k")];
        // A second produce field merges into the first.
        let mut merged = generated(1, "t", &one);
        merged.extend_from_slice(&generated(0, "", &two));
        // Unknown fields are skipped: field 99 of the frame, varint 5.
        let mut unknown = generated(2, "t", &one);
        unknown.extend_from_slice(&[0xF8, 0x06, 5]);
        // A header name that is not UTF-8.
        let bad_name = generated(3, "t", &[NewMessage::from_value("v").with_header("n", "v")]);
        let at = bad_name
            .iter()
            .rposition(|&b| b == b'n')
            .expect("name byte");
        let mut bad_name = bad_name;
        bad_name[at] = 0xFF;
        // A key written in two bytes (`request_id`'s, 0x08, as 0x88 0x00).
        let mut padded = vec![0x88, 0x00, 5];
        padded.extend_from_slice(&generated(0, "t", &one));
        let ping = pb::ClientFrame {
            request_id: 4,
            request: Some(pb::client_frame::Request::Ping(pb::PingRequest {
                nonce: 1,
            })),
        }
        .encode_to_vec();
        for body in [&merged, &unknown, &bad_name, &padded, &ping, &Vec::new()] {
            assert!(
                produce_in(&Bytes::copy_from_slice(body), &mut Budget::new(body.len())).is_none()
            );
            same_as_reference(body).expect("same as the generated decoder");
        }
        let Ok(ClientIn::Produce(p)) = ClientIn::decode(Bytes::from(merged)) else {
            panic!("a produce request");
        };
        assert_eq!((p.request_id, p.messages), (1, [one.clone(), two].concat()));
        let Ok(ClientIn::Produce(p)) = ClientIn::decode(Bytes::from(padded)) else {
            panic!("a produce request");
        };
        assert_eq!((p.request_id, p.messages), (5, one));
        assert!(ClientIn::decode(Bytes::from(bad_name)).is_err());
    }

    #[test]
    fn a_produce_of_many_empty_messages_or_headers_is_refused_before_it_is_built() {
        // 1 M empty messages: 2 MB on the wire, over 100 MB built.
        let empty = generated(1, "t", &vec![NewMessage::default(); 1_000_000]);
        // One message of 1 M empty headers: 2 MB, over 50 MB built.
        let headers = vec![Header::new("", Bytes::new()); 1_000_000];
        let many_headers = generated(
            2,
            "t",
            &[NewMessage {
                headers,
                ..NewMessage::default()
            }],
        );
        // The first, past the fast path (an unknown field first).
        let mut unusual = vec![0xF8, 0x06, 5];
        unusual.extend_from_slice(&empty);
        for body in [empty, many_headers, unusual] {
            match ClientIn::decode(Bytes::from(body)) {
                Err(FrameError::TooHeavy(why)) => assert!(why.contains("send fewer"), "{why}"),
                other => panic!("not refused: {:?}", other.map(|_| "decoded")),
            }
        }
        // An ordinary batch decodes: 10 000 small messages with four short
        // headers each.
        let message = NewMessage::from_value("v")
            .with_header("a", "1")
            .with_header("b", "2")
            .with_header("c", "3")
            .with_header("d", "4");
        let batch = generated(3, "t", &vec![message; 10_000]);
        match ClientIn::decode(Bytes::from(batch)) {
            Ok(ClientIn::Produce(p)) => assert_eq!(p.messages.len(), 10_000),
            other => panic!("refused: {:?}", other.map(|_| "not a produce")),
        }
        // The gRPC service's check, on a `ProduceRequest` body.
        let request = |messages: Vec<pb::NewMessage>| {
            pb::ProduceRequest {
                topic: "t".into(),
                messages,
            }
            .encode_to_vec()
        };
        assert!(produce_too_heavy(&request(vec![
            pb::NewMessage::default();
            1_000_000
        ])));
        assert!(!produce_too_heavy(&request(vec![
            pb::NewMessage::default();
            10_000
        ])));
    }

    #[test]
    fn a_1000_message_batch_needs_two_byte_lengths() {
        let messages = vec![NewMessage::from_value(vec![0x5a; 1024]); 1000];
        let out = ProduceFrame::new(7, "bench".into(), Arc::new(messages.clone()));
        let want = generated(7, "bench", &messages);
        let mut got = Vec::new();
        ClientOut::Produce(out).encode(&mut got);
        assert_eq!(got, want);
    }
}
