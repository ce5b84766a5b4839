//! The one mapping from spool's errors to the protocol's status codes and
//! messages. A message sent to a client names topics, groups and files
//! relative to the data directory, never where the server keeps it (the
//! server's own logs keep full paths).

use super::pb;
use crate::error::Error;
use std::path::Path;

/// The gRPC status code of an error.
pub fn code(error: &Error) -> pb::Code {
    match error {
        Error::InvalidArgument(_) => pb::Code::InvalidArgument,
        Error::TopicNotFound(_) | Error::GroupNotFound(_) | Error::NotFound(_) => {
            pb::Code::NotFound
        }
        Error::Internal(_) => pb::Code::Internal,
        Error::AlreadyExists(_) => pb::Code::AlreadyExists,
        Error::Unauthenticated(_) => pb::Code::Unauthenticated,
        Error::PermissionDenied(_) => pb::Code::PermissionDenied,
        Error::Full { .. }
        | Error::FilesExhausted { .. }
        | Error::MemoryExhausted { .. }
        | Error::TooLarge { .. }
        | Error::LimitReached(_) => pb::Code::ResourceExhausted,
        Error::Corruption(_) => pb::Code::DataLoss,
        Error::ReadOnly { .. } | Error::Stopping(_) => pb::Code::Unavailable,
        Error::Locked { .. } => pb::Code::FailedPrecondition,
        // Something spool never writes stands where its file belongs: the
        // operator moves it away; no retry or recovery mode helps.
        Error::Io { source, .. } if crate::storage::io::is_not_a_regular_file(source) => {
            pb::Code::FailedPrecondition
        }
        Error::Io { .. } => pb::Code::Internal,
    }
}

/// The wire form of an error of the broker whose data directory is
/// `data_dir`: paths under it lose that prefix (`topics/t/00….log`), and the
/// directory itself is called "the data directory".
pub fn to_wire(error: &Error, data_dir: &Path) -> pb::Error {
    pb::Error {
        code: code(error) as i32,
        message: bounded(relative_to(&error.to_string(), data_dir)),
    }
}

/// The longest error message sent, in bytes. Messages repeat what the
/// client sent (a name, however long); gRPC carries the message in a
/// header, percent-encoded, and its clients refuse headers past 16 KiB.
pub const MESSAGE_MAX: usize = 2048;

/// `message`, or when longer than [`MESSAGE_MAX`] its start and end with
/// the middle cut out (the end is kept too: it says what to do).
pub(crate) fn bounded(message: String) -> String {
    if message.len() <= MESSAGE_MAX {
        return message;
    }
    let floor = |mut i: usize| {
        while !message.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = floor(MESSAGE_MAX / 2);
    let tail = floor(message.len() - MESSAGE_MAX / 4);
    format!(
        "{} [… {} bytes cut …] {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
}

/// `message` with every path under `root` made relative to it. Only a
/// whole path counts: one that starts the message or follows a character
/// no path or name holds (a space, a quote, a colon, ...). The root alone
/// becomes "the data directory" only when it is a path with a `/` in it: a
/// bare relative root (`data`, `.`) is a word other text may hold too.
fn relative_to(message: &str, root: &Path) -> String {
    let root = root.to_string_lossy();
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return message.to_owned();
    }
    let name_char = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(root) {
        let after = &rest[at + root.len()..];
        let before = rest[..at].chars().last().or_else(|| out.chars().last());
        let starts_path = before.is_none_or(|c| !name_char(c));
        out.push_str(&rest[..at]);
        match after.chars().next() {
            Some('/') if starts_path => rest = &after[1..],
            Some(c) if name_char(c) => {
                out.push_str(root);
                rest = after;
            }
            _ if starts_path && root.contains('/') => {
                out.push_str("the data directory");
                rest = after;
            }
            _ => {
                out.push_str(root);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// An error frame body for a request that could not be served.
pub fn error(code: pb::Code, message: impl Into<String>) -> pb::Error {
    pb::Error {
        code: code as i32,
        message: message.into(),
    }
}

/// The error sent in place of a reply of `len` bytes that a frame (or gRPC
/// message) of at most `max` bytes cannot hold; `what` names the reply.
pub fn reply_too_large(what: &str, len: usize, max: u32) -> pb::Error {
    error(
        pb::Code::ResourceExhausted,
        format!("{what} takes {len} bytes; max_frame_bytes is {max}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_keeps_its_start_and_end() {
        let name = "é".repeat(10_000);
        let wire = to_wire(
            &Error::TopicNotFound(format!(
                "topic {name:?} does not exist (no topic can have that name)"
            )),
            Path::new("/srv/spool"),
        );
        assert!(
            wire.message.len() <= MESSAGE_MAX + 64,
            "{}",
            wire.message.len()
        );
        assert!(wire.message.starts_with("topic \"éé"), "{}", wire.message);
        assert!(
            wire.message
                .ends_with("éé\" does not exist (no topic can have that name)")
        );
        assert!(wire.message.contains(" bytes cut …] "), "{}", wire.message);
        let short = to_wire(
            &Error::TopicNotFound("topic t does not exist".into()),
            Path::new("/d"),
        );
        assert_eq!(short.message, "topic t does not exist");
    }

    #[test]
    fn missing_topics_and_groups_are_not_found_and_internal_failures_internal() {
        let cases = [
            (
                Error::TopicNotFound("topic t does not exist".into()),
                pb::Code::NotFound,
            ),
            (
                Error::GroupNotFound("group g of topic t does not exist".into()),
                pb::Code::NotFound,
            ),
            (
                Error::NotFound("subscription 3 does not exist".into()),
                pb::Code::NotFound,
            ),
            (
                Error::Internal("a task panicked".into()),
                pb::Code::Internal,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(code(&error), want, "{error}");
        }
    }

    #[test]
    fn paths_under_the_data_directory_are_named_relative_to_it() {
        let root = Path::new("/srv/spool/data");
        for (message, wire) in [
            (
                "writing /srv/spool/data/topics/t/00000000000000000000.log: EIO",
                "writing topics/t/00000000000000000000.log: EIO",
            ),
            (
                "log /srv/spool/data/topics/t is read-only; sync of /srv/spool/data/topics/t/0.log failed",
                "log topics/t is read-only; sync of topics/t/0.log failed",
            ),
            ("syncing /srv/spool/data", "syncing the data directory"),
            (
                "syncing /srv/spool/data: EIO",
                "syncing the data directory: EIO",
            ),
            ("/srv/spool/database/x", "/srv/spool/database/x"),
            ("topic t does not exist", "topic t does not exist"),
        ] {
            assert_eq!(relative_to(message, root), wire);
        }
        assert_eq!(
            relative_to("creating ./data/topics/t", Path::new("./data/")),
            "creating topics/t"
        );
    }

    /// A relative data directory (`--data data`, `.`, `d`) is text that names
    /// and messages hold too: only whole paths under it change.
    #[test]
    fn a_relative_data_directory_changes_only_paths_under_it() {
        for (root, message, wire) in [
            (
                "data",
                "token bigdata may not produce to topic metadata",
                "token bigdata may not produce to topic metadata",
            ),
            (
                "data",
                "topic data does not exist",
                "topic data does not exist",
            ),
            (
                "data",
                "writing data/topics/data/0.log: EIO; see 'data/x'",
                "writing topics/data/0.log: EIO; see 'x'",
            ),
            (
                ".",
                "use 1 to 200 of A-Z a-z 0-9 . _ - (not . or ..)",
                "use 1 to 200 of A-Z a-z 0-9 . _ - (not . or ..)",
            ),
            ("./", "writing ./topics/t/0.log", "writing topics/t/0.log"),
            (
                "d",
                "token second may not read topic d/e",
                "token second may not read topic e",
            ),
        ] {
            assert_eq!(relative_to(message, Path::new(root)), wire, "root {root}");
        }
    }
}
