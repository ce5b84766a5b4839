//! What a socket handed Engine.IO's send buffer lately, so the buffer is
//! bounded in bytes as well as in packets.
//!
//! Engine.IO's buffer counts packets ([`super::SEND_BUFFER`]) and says only
//! whether it has room for one more; with messages near `max_message_bytes`
//! a full buffer would hold a gigabyte for a client that stopped reading.
//! The buffer is a queue, so the packets still in it are the newest ones
//! handed to it: knowing how many are waiting (the buffer's size less its
//! free places) and the sizes of the newest packets bounds the bytes
//! waiting. Only packets of at least [`LARGE`] bytes are remembered; the
//! rest can hold at most `SEND_BUFFER × LARGE` bytes in all.

use std::collections::VecDeque;

/// Packets from this size up count against [`LARGE_BYTES`].
pub(super) const LARGE: usize = 16 << 10;

/// Bytes of large packets a socket's send buffer may hold: a large packet
/// waits for room while more would be waiting (one is let through into a
/// buffer that holds none).
pub(super) const LARGE_BYTES: usize = 48 << 20;

/// The large packets among the last [`super::SEND_BUFFER`] a socket handed
/// to its send buffer.
#[derive(Debug, Default)]
pub struct Sent {
    /// Engine.IO messages handed to the buffer so far.
    count: u64,
    /// Each large one still possibly waiting: its number in `count` (the
    /// first is 1) and its bytes, oldest first.
    large: VecDeque<(u64, usize)>,
    /// The bytes of `large`.
    large_bytes: usize,
}

impl Sent {
    /// Notes a packet of `len` bytes handed to the buffer.
    pub fn note(&mut self, len: usize) {
        self.count += 1;
        let buffer = super::SEND_BUFFER as u64;
        while let Some(&(number, bytes)) = self.large.front() {
            if self.count - number < buffer {
                break;
            }
            // That many packets since: it has left the buffer.
            self.large.pop_front();
            self.large_bytes -= bytes;
        }
        if len >= LARGE {
            self.large.push_back((self.count, len));
            self.large_bytes += len;
        }
    }

    /// How many of the buffer's places must be free before a packet of
    /// `len` bytes may join it: 0 when it may join whatever waits.
    pub fn free_places_needed(&self, len: usize) -> usize {
        if len < LARGE || self.large_bytes + len <= LARGE_BYTES {
            return 0;
        }
        // The newest large packet that cannot still wait with this one:
        // at most the packets after it may wait.
        let mut bytes = len;
        for &(number, size) in self.large.iter().rev() {
            bytes += size;
            if bytes > LARGE_BYTES {
                let after = (self.count - number) as usize;
                return super::SEND_BUFFER.saturating_sub(after);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socketio::SEND_BUFFER;

    const MIB: usize = 1 << 20;

    #[test]
    fn small_packets_never_wait_on_bytes() {
        let mut sent = Sent::default();
        for _ in 0..10 * SEND_BUFFER {
            sent.note(LARGE - 1);
        }
        assert_eq!(sent.free_places_needed(LARGE - 1), 0);
        assert!(sent.large.is_empty());
    }

    #[test]
    fn large_packets_wait_until_what_waits_with_them_fits() {
        let mut sent = Sent::default();
        // 47 packets of 1 MiB: a 48th still fits.
        for _ in 0..47 {
            assert_eq!(sent.free_places_needed(MIB), 0);
            sent.note(MIB);
        }
        assert_eq!(sent.free_places_needed(MIB), 0);
        sent.note(MIB);
        // A 49th needs the oldest gone: at most the 47 after it may wait.
        assert_eq!(sent.free_places_needed(MIB), SEND_BUFFER - 47);
        // Small packets since count as possibly waiting.
        for _ in 0..10 {
            sent.note(100);
        }
        assert_eq!(sent.free_places_needed(MIB), SEND_BUFFER - 57);
        // A small one may always join.
        assert_eq!(sent.free_places_needed(100), 0);
    }

    #[test]
    fn a_packet_larger_than_the_bound_needs_every_large_one_gone() {
        let mut sent = Sent::default();
        assert_eq!(sent.free_places_needed(LARGE_BYTES + 1), 0);
        sent.note(LARGE_BYTES + 1);
        sent.note(100);
        // The large one must be out: only the one small packet may wait.
        assert_eq!(sent.free_places_needed(LARGE), SEND_BUFFER - 1);
    }

    #[test]
    fn packets_a_whole_buffer_ago_are_forgotten() {
        let mut sent = Sent::default();
        for _ in 0..48 {
            sent.note(MIB);
        }
        for _ in 0..SEND_BUFFER {
            sent.note(1);
        }
        assert!(sent.large.is_empty());
        assert_eq!(sent.large_bytes, 0);
        assert_eq!(sent.free_places_needed(MIB), 0);
    }
}
