//! What a native client reads: a `ServerFrame`, or a fetch reply or
//! subscription delivery read straight into [`Received`] messages. Their
//! keys, header values and values share the frame's buffer; no wire
//! `Message` is built and converted per message on the way.
//!
//! The fast path takes the layout servers write (each field of the frame's
//! envelope once, no unknown fields, no error in a delivery); anything else
//! goes to the generated decoder, which decides what it means or why it is
//! invalid. Either way the result is what decoding a `pb::ServerFrame` and
//! converting its messages gives.

use super::{convert, pb};
use crate::storage::{Header, Message, Offset};
use bytes::Bytes;
use prost::Message as _;
use prost::encoding::{WireType, decode_key, decode_varint};

/// `ServerFrame.response`, `ServerFrame.delivery`.
const FRAME_RESPONSE: u32 = 2;
const FRAME_DELIVERY: u32 = 3;
/// `Response.request_id`, `Response.fetch`.
const RESPONSE_REQUEST_ID: u32 = 1;
const RESPONSE_FETCH: u32 = 5;
/// `FetchResponse` fields.
const FETCH_MESSAGES: u32 = 1;
const FETCH_NEXT_OFFSET: u32 = 2;
const FETCH_END_OFFSET: u32 = 3;
/// `Delivery` fields (without `error` and `skipped_offset`).
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

/// A message a consumer received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Queue groups: which delivery this is (1 = first); 0 otherwise.
    pub delivery: u32,
}

impl From<pb::Message> for Received {
    fn from(m: pb::Message) -> Received {
        Received {
            delivery: m.delivery,
            message: convert::message_from_wire(m),
        }
    }
}

/// A fetch reply's contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchIn {
    /// The messages.
    pub messages: Vec<Received>,
    /// `FetchResponse.next_offset`.
    pub next_offset: u64,
    /// `FetchResponse.end_offset`.
    pub end_offset: u64,
}

/// One frame from the server.
// Read into by value as `ServerFrame`s were before; boxing the frame would
// add an allocation per frame for variants that are smaller anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ServerIn {
    /// Any frame, as the generated decoder reads it.
    Frame(pb::ServerFrame),
    /// A fetch reply.
    Fetch {
        /// The request answered.
        request_id: u64,
        /// What it returned.
        fetched: FetchIn,
    },
    /// A delivery of messages (no error, nothing skipped).
    Delivery {
        /// The subscription.
        subscription_id: u64,
        /// The messages.
        messages: Vec<Received>,
    },
}

impl ServerIn {
    /// Decodes a frame body (see the module's documentation).
    pub fn decode(body: Bytes) -> Result<ServerIn, prost::DecodeError> {
        if let Some(fast) = frame_in(&body) {
            return Ok(fast);
        }
        Ok(ServerIn::from_frame(pb::ServerFrame::decode(body)?))
    }

    /// A frame the generated decoder read, a fetch reply or a delivery
    /// without error converted.
    fn from_frame(frame: pb::ServerFrame) -> ServerIn {
        use pb::server_frame::Kind;
        match frame.kind {
            Some(Kind::Response(pb::Response {
                request_id,
                result: Some(pb::response::Result::Fetch(f)),
            })) => ServerIn::Fetch {
                request_id,
                fetched: FetchIn {
                    messages: f.messages.into_iter().map(Received::from).collect(),
                    next_offset: f.next_offset,
                    end_offset: f.end_offset,
                },
            },
            Some(Kind::Delivery(pb::Delivery {
                subscription_id,
                messages,
                error: None,
                skipped_offset: None,
            })) => ServerIn::Delivery {
                subscription_id,
                messages: messages.into_iter().map(Received::from).collect(),
            },
            kind => ServerIn::Frame(pb::ServerFrame { kind }),
        }
    }
}

/// The next field's tag and wire type; `None` on a malformed key.
fn next_key(buf: &mut &[u8]) -> Option<(u32, WireType)> {
    decode_key(buf).ok()
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    decode_varint(buf).ok()
}

/// A length-delimited field's body, taken off `buf`.
fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
    if len > buf.len() {
        return None;
    }
    let (body, rest) = buf.split_at(len);
    *buf = rest;
    Some(body)
}

/// The body of a frame's only field, if it is `field`'s, once.
fn only_field(mut buf: &[u8]) -> Option<(u32, &[u8])> {
    let (field, WireType::LengthDelimited) = next_key(&mut buf)? else {
        return None;
    };
    let body = delimited(&mut buf)?;
    buf.is_empty().then_some((field, body))
}

/// The fast path of [`ServerIn::decode`]: `None` for anything else.
fn frame_in(frame: &Bytes) -> Option<ServerIn> {
    // `part` is a slice of `frame`: the same bytes as a `Bytes` sharing it.
    let share = |part: &[u8]| frame.slice_ref(part);
    match only_field(frame)? {
        (FRAME_RESPONSE, mut buf) => {
            let mut request_id = 0;
            let mut fetch = None;
            while !buf.is_empty() {
                match next_key(&mut buf)? {
                    (RESPONSE_REQUEST_ID, WireType::Varint) => request_id = varint(&mut buf)?,
                    // A second one would be merged into the first.
                    (RESPONSE_FETCH, WireType::LengthDelimited) if fetch.is_none() => {
                        fetch = Some(delimited(&mut buf)?);
                    }
                    _ => return None,
                }
            }
            let mut buf = fetch?;
            let mut fetched = FetchIn::default();
            while !buf.is_empty() {
                match next_key(&mut buf)? {
                    (FETCH_MESSAGES, WireType::LengthDelimited) => {
                        fetched
                            .messages
                            .push(message_in(delimited(&mut buf)?, &share)?);
                    }
                    (FETCH_NEXT_OFFSET, WireType::Varint) => {
                        fetched.next_offset = varint(&mut buf)?
                    }
                    (FETCH_END_OFFSET, WireType::Varint) => fetched.end_offset = varint(&mut buf)?,
                    _ => return None,
                }
            }
            Some(ServerIn::Fetch {
                request_id,
                fetched,
            })
        }
        (FRAME_DELIVERY, mut buf) => {
            let mut subscription_id = 0;
            let mut messages = Vec::new();
            while !buf.is_empty() {
                match next_key(&mut buf)? {
                    (DELIVERY_SUBSCRIPTION_ID, WireType::Varint) => {
                        subscription_id = varint(&mut buf)?;
                    }
                    (DELIVERY_MESSAGES, WireType::LengthDelimited) => {
                        messages.push(message_in(delimited(&mut buf)?, &share)?);
                    }
                    _ => return None,
                }
            }
            Some(ServerIn::Delivery {
                subscription_id,
                messages,
            })
        }
        _ => None,
    }
}

fn message_in(mut buf: &[u8], share: &impl Fn(&[u8]) -> Bytes) -> Option<Received> {
    let mut m = Received {
        message: Message {
            offset: Offset(0),
            timestamp_ms: 0,
            key: None,
            headers: Vec::new(),
            value: Bytes::new(),
        },
        delivery: 0,
    };
    let mut value: &[u8] = &[];
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            (MESSAGE_OFFSET, WireType::Varint) => m.message.offset = Offset(varint(&mut buf)?),
            (MESSAGE_TIMESTAMP, WireType::Varint) => m.message.timestamp_ms = varint(&mut buf)?,
            (MESSAGE_KEY, WireType::LengthDelimited) => {
                m.message.key = Some(share(delimited(&mut buf)?));
            }
            (MESSAGE_HEADERS, WireType::LengthDelimited) => {
                m.message
                    .headers
                    .push(header_in(delimited(&mut buf)?, share)?);
            }
            (MESSAGE_VALUE, WireType::LengthDelimited) => value = delimited(&mut buf)?,
            // `uint32`: the varint's low 32 bits, as the generated decoder takes them.
            (MESSAGE_DELIVERY, WireType::Varint) => m.delivery = varint(&mut buf)? as u32,
            _ => return None,
        }
    }
    if !value.is_empty() {
        m.message.value = share(value);
    }
    Some(m)
}

fn header_in(mut buf: &[u8], share: &impl Fn(&[u8]) -> Bytes) -> Option<Header> {
    let (mut name, mut value): (&str, &[u8]) = ("", &[]);
    while !buf.is_empty() {
        match next_key(&mut buf)? {
            (HEADER_NAME, WireType::LengthDelimited) => {
                name = std::str::from_utf8(delimited(&mut buf)?).ok()?;
            }
            (HEADER_VALUE, WireType::LengthDelimited) => value = delimited(&mut buf)?,
            _ => return None,
        }
    }
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
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = pb::Message> {
        (
            any::<u64>(),
            prop_oneof![Just(0u64), any::<u64>()],
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)),
            proptest::collection::vec(
                ("[a-z-]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..3,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
            prop_oneof![Just(0u32), any::<u32>()],
        )
            .prop_map(|(offset, timestamp_ms, key, headers, value, delivery)| {
                pb::Message {
                    offset,
                    timestamp_ms,
                    key: key.map(Bytes::from),
                    headers: headers
                        .into_iter()
                        .map(|(name, value)| pb::Header {
                            name,
                            value: value.into(),
                        })
                        .collect(),
                    value: value.into(),
                    delivery,
                }
            })
    }

    fn arb_frame() -> impl Strategy<Value = pb::ServerFrame> {
        use pb::server_frame::Kind;
        let messages = || proptest::collection::vec(arb_message(), 0..6);
        prop_oneof![
            (any::<u64>(), messages(), any::<u64>(), any::<u64>()).prop_map(
                |(request_id, messages, next_offset, end_offset)| pb::ServerFrame {
                    kind: Some(Kind::Response(pb::Response {
                        request_id,
                        result: Some(pb::response::Result::Fetch(pb::FetchResponse {
                            messages,
                            next_offset,
                            end_offset,
                        })),
                    })),
                }
            ),
            (
                any::<u64>(),
                messages(),
                proptest::option::of(any::<u64>()),
                any::<bool>()
            )
                .prop_map(|(subscription_id, messages, skipped_offset, error)| {
                    pb::ServerFrame {
                        kind: Some(Kind::Delivery(pb::Delivery {
                            subscription_id,
                            messages,
                            error: error.then(|| pb::Error {
                                code: pb::Code::ResourceExhausted as i32,
                                message: "too large".into(),
                            }),
                            skipped_offset,
                        })),
                    }
                }),
            any::<u64>().prop_map(|nonce| pb::ServerFrame {
                kind: Some(Kind::Response(pb::Response {
                    request_id: nonce,
                    result: Some(pb::response::Result::Ping(pb::PingResponse { nonce })),
                })),
            }),
        ]
    }

    /// The fast path, where it reads `body`, gives what the generated
    /// decoder and the conversion give.
    fn same(body: &[u8]) -> Result<(), TestCaseError> {
        let generated = pb::ServerFrame::decode(body).map(ServerIn::from_frame);
        match (frame_in(&Bytes::copy_from_slice(body)), generated) {
            (Some(fast), Ok(reference)) => prop_assert_eq!(fast, reference),
            (Some(fast), Err(e)) => prop_assert!(false, "fast {fast:?}, generated error {e}"),
            (None, _) => {}
        }
        Ok(())
    }

    proptest! {
        /// Frames as servers encode them, and the same frames cut short,
        /// with a byte changed, or with bytes appended, decode as the
        /// generated decoder reads them (or fail where it fails).
        #[test]
        fn replies_decode_as_the_generated_decoder_reads_them(
            frame in arb_frame(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            tail in proptest::collection::vec(any::<u8>(), 0..6),
        ) {
            let body = frame.encode_to_vec();
            let plain = !matches!(
                &frame.kind,
                Some(pb::server_frame::Kind::Delivery(d)) if d.error.is_some() || d.skipped_offset.is_some()
            ) && !matches!(
                &frame.kind,
                Some(pb::server_frame::Kind::Response(pb::Response { result: Some(pb::response::Result::Ping(_)), .. }))
            );
            prop_assert_eq!(frame_in(&Bytes::from(body.clone())).is_some(), plain, "servers' frames take the fast path");
            same(&body)?;
            same(&body[..cut.index(body.len() + 1)])?;
            if !body.is_empty() {
                let mut flipped = body.clone();
                flipped[flip.index(body.len())] ^= xor;
                same(&flipped)?;
            }
            let mut longer = body;
            longer.extend_from_slice(&tail);
            same(&longer)?;
        }

        #[test]
        fn arbitrary_bytes_decode_as_the_generated_decoder_reads_them(
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            same(&body)?;
        }
    }

    #[test]
    fn a_fetch_reply_takes_the_fast_path_and_shares_the_frame() {
        let frame = pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Response(pb::Response {
                request_id: 4,
                result: Some(pb::response::Result::Fetch(pb::FetchResponse {
                    messages: vec![pb::Message {
                        offset: 9,
                        value: Bytes::from(vec![7u8; 100]),
                        ..Default::default()
                    }],
                    next_offset: 10,
                    end_offset: 12,
                })),
            })),
        };
        let body = Bytes::from(frame.encode_to_vec());
        let Some(ServerIn::Fetch {
            request_id: 4,
            fetched,
        }) = frame_in(&body)
        else {
            panic!("the fast path takes a fetch reply");
        };
        assert_eq!((fetched.next_offset, fetched.end_offset), (10, 12));
        let value = &fetched.messages[0].message.value;
        assert_eq!(value.len(), 100);
        let start = body.as_ptr() as usize;
        let at = value.as_ptr() as usize;
        assert!(
            at >= start && at + 100 <= start + body.len(),
            "the value is a slice of the frame"
        );
    }
}
