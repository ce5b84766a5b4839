//! Framing: gRPC Length-Prefixed-Message. A frame is `flags: u8` (bit 0 =
//! compressed, never set in version 1), `length: u32` big-endian, then
//! `length` bytes of protobuf. The limit is checked from the 5-byte prefix,
//! before any buffer for the body is reserved. No I/O happens here.

use super::request::{ClientIn, ClientOut};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder};

/// Bytes before a frame's body.
pub const PREFIX_LEN: usize = 5;
/// Flag bit: the body is compressed (not negotiated in version 1).
pub const FLAG_COMPRESSED: u8 = 0b1;

/// Why a frame could not be read. Each closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// Flags other than 0.
    #[error("frame flags {0:#04x} not supported (compression is not negotiated)")]
    BadFlags(u8),
    /// A produce request whose messages and headers would take more than
    /// [`super::request::most_decoded`] decoded (many empty ones); says so.
    #[error("{0}")]
    TooHeavy(String),
    /// The body is not valid protobuf for the expected message.
    #[error("frame body does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The stream failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes frames carrying `In` and encodes frames carrying `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame_bytes: u32,
    /// The body length of the last frame decoded.
    last_len: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames over `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameCodec {
            max_frame_bytes,
            last_len: 0,
            _types: PhantomData,
        }
    }

    /// The body length of the last frame decoded (what its request holds
    /// while it is served: a produce's values are slices of it).
    pub fn last_len(&self) -> usize {
        self.last_len
    }

    /// Takes frames of up to `max_frame_bytes` from now on.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.body(src)? {
            Some(body) => Ok(Some(In::decode(body)?)),
            None => Ok(None),
        }
    }
}

impl<Out> Decoder for FrameCodec<ClientIn, Out> {
    type Item = ClientIn;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientIn>, FrameError> {
        match self.body(src)? {
            Some(body) => Ok(Some(ClientIn::decode(body)?)),
            None => Ok(None),
        }
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// The body of the frame at the start of `src`, once it is all there.
    fn body(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if src.len() < PREFIX_LEN {
            return Ok(None);
        }
        let flags = src[0];
        if flags != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max_frame_bytes,
            });
        }
        let total = PREFIX_LEN + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(PREFIX_LEN);
        self.last_len = len as usize;
        Ok(Some(src.split_to(len as usize).freeze()))
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// Writes the prefix of a `len`-byte body, with room for the body, or
    /// refuses a body over the limit.
    fn prefix(&self, len: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len32 = u32::try_from(len)
            .ok()
            .filter(|l| *l <= self.max_frame_bytes)
            .ok_or(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame_bytes,
            })?;
        dst.reserve(PREFIX_LEN + len);
        dst.put_u8(0);
        dst.put_u32(len32);
        Ok(())
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.prefix(item.encoded_len(), dst)?;
        item.encode(dst)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

impl<In> Encoder<ClientOut> for FrameCodec<In, ClientOut> {
    type Error = FrameError;

    fn encode(&mut self, item: ClientOut, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.prefix(item.encoded_len(), dst)?;
        // `prefix` reserved the body's length: encoding cannot run short.
        item.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb;
    use proptest::prelude::*;

    type ServerSide = FrameCodec<pb::ClientFrame, pb::ServerFrame>;
    type ClientSide = FrameCodec<pb::ServerFrame, pb::ClientFrame>;

    fn ping(id: u64) -> pb::ClientFrame {
        pb::ClientFrame {
            request_id: id,
            request: Some(pb::client_frame::Request::Ping(pb::PingRequest {
                nonce: id.wrapping_mul(3),
            })),
        }
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(ids in proptest::collection::vec(any::<u64>(), 1..10), cut in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            let mut client = ClientSide::new(1 << 20);
            for &id in &ids {
                client.encode(ping(id), &mut wire).expect("encode");
            }
            let cut = cut.index(wire.len());
            let mut server = ServerSide::new(1 << 20);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = server.decode(&mut buf).expect("decode") { got.push(f); }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = server.decode(&mut buf).expect("decode") { got.push(f); }
            prop_assert_eq!(got, ids.iter().map(|&id| ping(id)).collect::<Vec<_>>());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut server = ServerSide::new(1 << 10);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = server.decode(&mut buf) {}
        }
    }

    #[test]
    fn a_4_gib_announcement_is_refused_before_allocating() {
        let mut server = ServerSide::new(16 << 20);
        let mut buf = BytesMut::from(&[0u8, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        let err = server.decode(&mut buf).expect_err("too large");
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xFFFF_FFFF,
                ..
            }
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "no buffer was reserved for the body"
        );
    }

    #[test]
    fn compressed_flag_is_refused() {
        let mut server = ServerSide::new(1024);
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(matches!(
            server.decode(&mut buf),
            Err(FrameError::BadFlags(1))
        ));
    }
}
