//! The protobuf codec of the gRPC service: tonic-prost's, except that a
//! request message that does not decode is `INVALID_ARGUMENT`, as an
//! unreadable frame is on the native protocol (tonic-prost answers
//! `INTERNAL`, which tells a client the outcome of a change is unknown,
//! though nothing was done).

use crate::protocol::pb;
use crate::protocol::request::{produce_too_heavy, too_heavy};
use prost::Message;
use std::any::TypeId;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decoding failures as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct SpoolCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for SpoolCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SpoolDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SpoolDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] with decoding failures as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct SpoolDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for SpoolDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A produce request of many empty messages or headers is refused
        // before they are built, as on the native protocol.
        if TypeId::of::<U>() == TypeId::of::<pb::ProduceRequest>() {
            use bytes::Buf;
            let whole = buf.chunk();
            if whole.len() >= buf.remaining() && produce_too_heavy(&whole[..buf.remaining()]) {
                return Err(Status::resource_exhausted(too_heavy(buf.remaining())));
            }
        }
        self.0
            .decode(buf)
            .map_err(|e| Status::invalid_argument(format!("unreadable message: {}", e.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
