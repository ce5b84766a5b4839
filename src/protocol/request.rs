//! What a client sends: a generated [`pb::ClientFrame`], or a produce
//! request encoded straight from the engine's [`NewMessage`]s. Both come out
//! as the same bytes prost writes for the frame; the produce path skips
//! building a `pb::NewMessage` per message (and the reference count prost
//! takes and drops on every value it encodes), so a client's produce costs
//! one pass over the messages to size the frame and one to write it.

use super::pb;
use crate::storage::NewMessage;
use bytes::BufMut;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

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
    messages: Vec<NewMessage>,
    /// Encoded length of the whole frame body.
    len: usize,
}

impl ProduceFrame {
    /// The frame of request `request_id` producing `messages` to `topic`.
    pub fn new(request_id: u64, topic: String, messages: Vec<NewMessage>) -> ProduceFrame {
        let request = request_len(&topic, &messages);
        let mut len = key_len(FRAME_PRODUCE) + encoded_len_varint(request as u64) + request;
        if request_id != 0 {
            len += key_len(FRAME_REQUEST_ID) + encoded_len_varint(request_id);
        }
        ProduceFrame {
            request_id,
            topic,
            messages,
            len,
        }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        if self.request_id != 0 {
            encode_key(FRAME_REQUEST_ID, WireType::Varint, buf);
            encode_varint(self.request_id, buf);
        }
        encode_key(FRAME_PRODUCE, WireType::LengthDelimited, buf);
        encode_varint(request_len(&self.topic, &self.messages) as u64, buf);
        put_bytes(PRODUCE_TOPIC, self.topic.as_bytes(), buf);
        for m in &self.messages {
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
            let out = ClientOut::Produce(ProduceFrame::new(request_id, topic.clone(), messages.clone()));
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

    #[test]
    fn a_1000_message_batch_needs_two_byte_lengths() {
        let messages = vec![NewMessage::from_value(vec![0x5a; 1024]); 1000];
        let out = ProduceFrame::new(7, "bench".into(), messages.clone());
        let want = generated(7, "bench", &messages);
        let mut got = Vec::new();
        ClientOut::Produce(out).encode(&mut got);
        assert_eq!(got, want);
    }
}
