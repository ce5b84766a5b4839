//! The wire protocol: generated message types ([`pb`]), the frame codec, the
//! connection writer both ends share, produce requests encoded and decoded
//! without the generated types, the server's frames encoded from reads, and
//! the one place errors become status
//! codes.

pub mod codec;
pub mod convert;
pub mod outbound;
pub mod outbox;
pub mod request;
pub mod status;

/// Types generated from `proto/spool.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/spool.v1.rs"));
}

/// Protocol version spoken by this build (sent in `Hello` and `Welcome`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Default largest frame.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
