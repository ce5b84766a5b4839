//! The one mapping from spool's errors to the protocol's status codes.

use super::pb;
use crate::error::Error;

/// The gRPC status code of an error.
pub fn code(error: &Error) -> pb::Code {
    match error {
        Error::InvalidArgument(_) => pb::Code::InvalidArgument,
        Error::NotFound(_) => pb::Code::NotFound,
        Error::AlreadyExists(_) => pb::Code::AlreadyExists,
        Error::Full { .. } => pb::Code::ResourceExhausted,
        Error::Corruption(_) => pb::Code::DataLoss,
        Error::ReadOnly { .. } => pb::Code::Unavailable,
        Error::Locked { .. } => pb::Code::FailedPrecondition,
        Error::Io { .. } => pb::Code::Internal,
    }
}

/// The wire form of an error.
pub fn to_wire(error: &Error) -> pb::Error {
    pb::Error {
        code: code(error) as i32,
        message: error.to_string(),
    }
}

/// An error frame body for a request that could not be served.
pub fn error(code: pb::Code, message: impl Into<String>) -> pb::Error {
    pb::Error {
        code: code as i32,
        message: message.into(),
    }
}
