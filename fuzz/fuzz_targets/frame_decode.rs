//! Fuzzes the frame codec (`spool::protocol::codec`) with the bytes a peer
//! could send: the input, cut in two at a point its first byte chooses, is
//! read as a stream of `ClientFrame`s (what the server reads) and of
//! `ServerFrame`s (what the client reads).
//!
//! Invariants checked: the decoder never panics; reading the stream in two
//! pieces yields the same frames and the same error as reading it whole; every
//! decoded frame re-encodes, within the same limit, to one frame that decodes
//! equal; and every request or reply goes through the conversions of
//! `spool::protocol::convert` that its receiver applies, whose inverses give
//! back what was decoded.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use spool::broker::{Position, TopicConfig};
use spool::protocol::codec::{FrameCodec, PREFIX_LEN};
use spool::protocol::convert;
use spool::protocol::pb::client_frame::Request;
use spool::protocol::pb::server_frame::Kind;
use spool::protocol::pb::{self, response};
use spool::storage::NewMessage;
use spool::storage::record;
use tokio_util::codec::{Decoder, Encoder};

/// The frame limit of the fuzzed codecs: above any frame an input of the
/// default `-max_len` holds, and small enough that a prefix announcing an
/// absent body reserves little.
const MAX_FRAME_BYTES: u32 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * wire.len() / usize::from(u8::MAX);

    for frame in read_stream::<pb::ClientFrame>(wire, cut) {
        round_trip(&frame);
        if let Some(request) = frame.request {
            convert_request(request);
        }
    }
    for frame in read_stream::<pb::ServerFrame>(wire, cut) {
        round_trip(&frame);
        if let Some(kind) = frame.kind {
            convert_reply(kind);
        }
    }
});

/// What a reader gets from a byte stream: the frames before the first error,
/// and that error (as text: `FrameError` has no `PartialEq`).
type Outcome<M> = (Vec<M>, Option<String>);

/// Reads `wire` as a stream of `M` frames, first whole and then in two pieces
/// split at `cut`; asserts both readings agree and returns the frames.
fn read_stream<M: Message + Default + PartialEq>(wire: &[u8], cut: usize) -> Vec<M> {
    let whole = read_pieces::<M>(&[wire]);
    let split = read_pieces::<M>(&[&wire[..cut], &wire[cut..]]);
    assert!(
        whole == split,
        "reading in two pieces cut at {cut} differs from reading whole"
    );
    whole.0
}

/// Feeds `pieces` to one decoder in turn, decoding after each until it wants
/// more bytes or fails (a failure closes the connection: nothing is read after).
fn read_pieces<M: Message + Default>(pieces: &[&[u8]]) -> Outcome<M> {
    let mut codec = FrameCodec::<M, ()>::new(MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, None)
}

/// Re-encodes `frame` as its sender would and checks it decodes to itself.
fn round_trip<M: Message + Default + PartialEq + Clone>(frame: &M) {
    let mut wire = BytesMut::new();
    FrameCodec::<(), M>::new(MAX_FRAME_BYTES)
        .encode(frame.clone(), &mut wire)
        .expect("a decoded frame re-encodes within the limit it was read under");
    assert_eq!(wire.len(), PREFIX_LEN + frame.encoded_len());
    assert_eq!(wire[0], 0, "flags are 0 in version 1");
    let again = FrameCodec::<M, ()>::new(MAX_FRAME_BYTES)
        .decode(&mut wire)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is complete");
    assert!(wire.is_empty(), "the re-encoded frame is read to its end");
    assert!(
        again == *frame,
        "re-encoded frame decodes to something else"
    );
}

/// The conversions the server applies to a request, each checked against its
/// inverse where one exists.
fn convert_request(request: Request) {
    match request {
        Request::Produce(p) => {
            for wire in p.messages {
                let msg = convert::new_message(wire.clone());
                check_record_size(&msg);
                assert_eq!(convert::new_message_to_wire(msg), wire);
            }
        }
        Request::Fetch(f) => check_position(f.from),
        Request::Subscribe(s) => check_position(s.from),
        Request::Seek(s) => check_position(s.to),
        Request::CreateTopic(c) => check_topic_config(c.config),
        Request::CreateGroup(c) => {
            if let Ok(mode) = convert::group_mode(c.mode) {
                assert_eq!(convert::group_mode_to_wire(mode), c.mode);
            }
            check_position(c.start);
        }
        _ => {}
    }
}

/// The conversions the client applies to a reply or a delivery.
fn convert_reply(kind: Kind) {
    let messages = match kind {
        Kind::Delivery(d) => d.messages,
        Kind::Response(pb::Response {
            result: Some(response::Result::Fetch(f)),
            ..
        }) => f.messages,
        Kind::Response(pb::Response {
            result: Some(response::Result::Topic(t)),
            ..
        }) => {
            check_topic_config(t.config);
            return;
        }
        _ => return,
    };
    for wire in messages {
        let msg = convert::message_from_wire(wire.clone());
        assert_eq!(convert::message(msg, wire.delivery), wire);
    }
}

/// The size check the server runs before appending: a message the record
/// format can hold encodes to exactly the length `encoded_len` promised.
fn check_record_size(msg: &NewMessage) {
    if let Some(len) = record::encoded_len(msg) {
        let mut buf = Vec::new();
        assert_eq!(record::encode(&mut buf, 0, 0, msg), len);
        assert_eq!(buf.len(), len);
    }
}

fn check_position(wire: Option<pb::Position>) {
    let has_kind = wire.as_ref().is_some_and(|p| p.kind.is_some());
    let position = convert::position(wire, Position::Earliest);
    if has_kind {
        assert_eq!(Some(convert::position_to_wire(position)), wire);
    } else {
        assert_eq!(
            position,
            Position::Earliest,
            "an absent position is the default"
        );
    }
}

/// A wire config that is accepted survives a trip back onto the wire and in
/// again unchanged; one that is refused is refused without a panic.
fn check_topic_config(wire: Option<pb::TopicConfig>) {
    let base = TopicConfig::default();
    if let Ok(config) = convert::topic_config(wire, &base) {
        let again = convert::topic_config(Some(convert::topic_config_to_wire(&config)), &base)
            .expect("a config the broker accepted is accepted again from its wire form");
        assert_eq!(again, config);
    }
}
