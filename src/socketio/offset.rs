//! The recovery token: the offset a socket.io client sends back on
//! reconnect. It holds the socket's `pid` and, for each room it reads, the
//! next offset to deliver, sealed with a keyed BLAKE3 hash under a key kept
//! in the data directory, so recovery needs no server memory, survives
//! broker restarts, and a token changed by anyone but the broker is refused.
//!
//! Byte layout (little-endian), then base64url without padding:
//!
//! | bytes | field                                          |
//! |-------|------------------------------------------------|
//! | 1     | version ([`TOKEN_VERSION`])                    |
//! | 16    | pid                                            |
//! | 2     | room count                                     |
//! | per room: 1 | name length; then the name; then 8: next offset |
//! | 16    | keyed BLAKE3 of everything before, truncated   |

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

/// Version byte of the token layout.
pub const TOKEN_VERSION: u8 = 1;
/// Bytes of the pid.
pub const PID_LEN: usize = 16;
/// Bytes of the seal.
pub const MAC_LEN: usize = 16;
/// Bytes of the key.
pub const KEY_LEN: usize = 32;
/// The key's file in the data directory.
pub const KEY_FILE: &str = "socketio.key";
/// Most rooms one socket reads.
pub const MAX_ROOMS: usize = 256;
/// Most entries of a token: the rooms, and the system room `$rooms`.
const MAX_ENTRIES: usize = MAX_ROOMS + 1;

/// The key that seals tokens.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Random bytes from the kernel.
pub fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

impl Key {
    /// A key from its bytes.
    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// The key of the data directory `data`, created on first use
    /// (written to a temporary file, synced, renamed, directory synced), so
    /// tokens stay valid across restarts.
    pub fn load_or_create(data: &Path) -> crate::Result<Key> {
        let path = data.join(KEY_FILE);
        // Read within a bound, and refused unless a regular file (a FIFO
        // there would block the start).
        match crate::storage::io::read_settings_file(&path) {
            Ok(bytes) => {
                let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
                    crate::Error::InvalidArgument(format!(
                        "{} has {} bytes; a socket.io key has {KEY_LEN} (delete it to make a new one, which invalidates every recovery token)",
                        path.display(),
                        b.len()
                    ))
                })?;
                return Ok(Key(bytes));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(crate::Error::io(format!("reading {}", path.display()), e));
            }
        }
        let key: [u8; KEY_LEN] =
            random().map_err(|e| crate::Error::io("reading /dev/urandom", e))?;
        // Replaced whole, as the broker's own files are (a temp file made
        // new, synced, renamed, the folder synced).
        crate::storage::io::write_file_atomic(&crate::storage::io::OsStorage, &path, &key)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
        tracing::info!(file = %path.display(), "created the socket.io recovery key");
        Ok(Key(key))
    }

    fn seal(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let hash = blake3::keyed_hash(&self.0, body);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&hash.as_bytes()[..MAC_LEN]);
        mac
    }
}

/// The sealed, printable token of `pid` at `rooms` (room name to the next
/// offset to deliver); see [`encode_into`].
pub fn encode(pid: &[u8; PID_LEN], rooms: &BTreeMap<String, u64>, key: &Key) -> String {
    let mut out = String::new();
    encode_into(pid, rooms, key, &mut Vec::new(), &mut out);
    out
}

/// Characters of the printable token of `rooms`.
pub fn encoded_len(rooms: &BTreeMap<String, u64>) -> usize {
    let body: usize = 1 + PID_LEN + 2 + MAC_LEN;
    let rooms: usize = rooms
        .keys()
        .take(MAX_ENTRIES)
        .map(|name| 1 + name.len().min(u8::MAX as usize) + 8)
        .sum();
    ((body + rooms) * 4).div_ceil(3)
}

/// Appends the sealed, printable token of `pid` at `rooms` to `out`,
/// building its bytes in `scratch` (cleared first; kept by callers that
/// seal often, so sealing allocates nothing); the one encoder of the
/// layout above.
pub fn encode_into(
    pid: &[u8; PID_LEN],
    rooms: &BTreeMap<String, u64>,
    key: &Key,
    scratch: &mut Vec<u8>,
    out: &mut String,
) {
    let body = scratch;
    body.clear();
    body.reserve(1 + PID_LEN + 2 + rooms.len() * 24 + MAC_LEN);
    body.push(TOKEN_VERSION);
    body.extend_from_slice(pid);
    let count = rooms.len().min(MAX_ENTRIES) as u16;
    body.extend_from_slice(&count.to_le_bytes());
    for (name, next) in rooms.iter().take(MAX_ENTRIES) {
        // Room names are topic names: at most 200 bytes.
        let name = &name.as_bytes()[..name.len().min(u8::MAX as usize)];
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        body.extend_from_slice(&next.to_le_bytes());
    }
    let mac = key.seal(body);
    body.extend_from_slice(&mac);
    URL_SAFE_NO_PAD.encode_string(&body[..], out);
}

/// What a token says: whose it is and where each room is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The socket's private id.
    pub pid: [u8; PID_LEN],
    /// Room name to the next offset to deliver.
    pub rooms: BTreeMap<String, u64>,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64url, too short, or its lengths do not add up.
    #[error("recovery offset is malformed: {0}")]
    Malformed(&'static str),
    /// The seal does not match: changed, or made with another key.
    #[error("recovery offset was not issued by this broker or was altered")]
    Tampered,
}

impl Token {
    /// The sealed, printable form.
    #[cfg(test)]
    pub fn encode(&self, key: &Key) -> String {
        encode(&self.pid, &self.rooms, key)
    }

    /// Checks the seal and reads the token.
    pub fn decode(text: &str, key: &Key) -> Result<Token, TokenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| TokenError::Malformed("not base64url"))?;
        if raw.len() < 1 + PID_LEN + 2 + MAC_LEN {
            return Err(TokenError::Malformed("too short"));
        }
        let (body, mac) = raw.split_at(raw.len() - MAC_LEN);
        if !constant_time_eq(&key.seal(body), mac) {
            return Err(TokenError::Tampered);
        }
        if body[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed("unknown version"));
        }
        let mut pid = [0u8; PID_LEN];
        pid.copy_from_slice(&body[1..1 + PID_LEN]);
        let mut at = 1 + PID_LEN;
        let count = u16::from_le_bytes([body[at], body[at + 1]]) as usize;
        at += 2;
        let mut rooms = BTreeMap::new();
        for _ in 0..count {
            let len = *body.get(at).ok_or(TokenError::Malformed("truncated"))? as usize;
            at += 1;
            let name = body
                .get(at..at + len)
                .ok_or(TokenError::Malformed("truncated"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| TokenError::Malformed("room name is not UTF-8"))?;
            at += len;
            let next = body
                .get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .ok_or(TokenError::Malformed("truncated"))?;
            at += 8;
            rooms.insert(name.to_owned(), u64::from_le_bytes(next));
        }
        if at != body.len() {
            return Err(TokenError::Malformed("trailing bytes"));
        }
        Ok(Token { pid, rooms })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The printable form of a pid.
pub fn pid_text(pid: &[u8; PID_LEN]) -> String {
    URL_SAFE_NO_PAD.encode(pid)
}

/// A pid from its printable form.
pub fn pid_from_text(text: &str) -> Option<[u8; PID_LEN]> {
    URL_SAFE_NO_PAD.decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> Key {
        Key::from_bytes([b; KEY_LEN])
    }

    proptest! {
        #[test]
        fn round_trips(pid in any::<[u8; 16]>(), rooms in proptest::collection::btree_map("[A-Za-z0-9._-]{1,30}", any::<u64>(), 0..6)) {
            let t = Token { pid, rooms };
            let text = t.encode(&key(1));
            prop_assert_eq!(text.len(), encoded_len(&t.rooms));
            prop_assert_eq!(Token::decode(&text, &key(1)), Ok(t));
        }

        #[test]
        fn any_changed_byte_is_refused(pid in any::<[u8; 16]>(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let t = Token { pid, rooms: [("r".to_owned(), 5u64)].into() };
            let mut raw = URL_SAFE_NO_PAD.decode(t.encode(&key(1))).unwrap();
            let i = at.index(raw.len());
            raw[i] ^= flip;
            prop_assert!(Token::decode(&URL_SAFE_NO_PAD.encode(raw), &key(1)).is_err());
        }

        #[test]
        fn decoding_never_panics(text in ".{0,80}") {
            let _ = Token::decode(&text, &key(1));
        }
    }

    #[test]
    fn another_key_is_refused() {
        let t = Token {
            pid: [7; PID_LEN],
            rooms: [("chat".to_owned(), 3u64)].into(),
        };
        assert_eq!(
            Token::decode(&t.encode(&key(1)), &key(2)),
            Err(TokenError::Tampered)
        );
    }

    #[test]
    fn the_key_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = Key::load_or_create(dir.path()).unwrap();
        let b = Key::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let e = Key::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("socketio.key"), "{e}");
    }
}
