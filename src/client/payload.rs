//! Message bytes for `--size`: pseudo-random content that differs for every
//! (run, connection, sequence number), so an echo that replays an earlier
//! message or another connection's bytes is caught by the byte comparison.

use std::time::{SystemTime, UNIX_EPOCH};

/// A seed that differs between runs, so even a server that remembers a whole
/// previous run cannot replay it.
pub(super) fn run_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32))
}

/// Fills `buf` (already at the message size) with the bytes of message `seq`
/// of `connection`.
pub(super) fn fill(buf: &mut [u8], seed: u64, connection: usize, seq: u64) {
    let mut state = splitmix64(seed ^ splitmix64((connection as u64) << 40 ^ seq));
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        state = splitmix64(state);
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    let tail = chunks.into_remainder();
    let last = splitmix64(state).to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

/// SplitMix64's output function: cheap, and every bit of the input affects
/// every bit of the output.
pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_differ_by_sequence_and_connection() {
        let message = |connection, seq| {
            let mut buf = vec![0; 13];
            fill(&mut buf, 7, connection, seq);
            buf
        };
        assert_ne!(message(1, 1), message(1, 2));
        assert_ne!(message(1, 1), message(2, 1));
        assert_eq!(message(3, 4), message(3, 4));
    }
}
