//! What each UDP datagram of a flow carries, and how an echo is matched to
//! the datagram it answers.
//!
//! A `--size` datagram of 8 bytes or more starts with its whole sequence
//! number on the flow, XORed with a key drawn from the run and the flow and
//! then scrambled by a fixed bijection of 64-bit numbers (SplitMix64's
//! mixer); the rest is the pseudo-random content of that (run, flow,
//! sequence number), as for TCP. So an echo names its datagram, the
//! datagram's bytes can be rebuilt from the number alone to check the echo
//! byte for byte, and a datagram of another flow or another run names none.
//! The scrambling is what makes a damaged number name no datagram: a flipped
//! bit in those 8 bytes turns them into an unrelated 64-bit number, which is
//! one of the flow's datagrams with a chance of about one in 2^64 divided by
//! the datagrams sent, where a plain XOR would have named a neighbour (and
//! at 8 bytes, whose whole datagram is the number, matched it exactly).
//!
//! A `--message` datagram and a `--size` one under 8 bytes carry no number:
//! their flow keeps one in flight, and an echo answers the newest datagram
//! sent (compared byte for byte with it: under 8 bytes each datagram's
//! content still differs by sequence number).

use std::time::Duration;

use super::super::{Payload, payload};

/// Bytes of sequence number a numbered datagram carries, and the smallest
/// numbered datagram.
const HEADER: usize = 8;

/// The most datagrams a flow keeps records for: sized from the schedule
/// (those sent within a timeout), up to this, so a flow at 1 ms with a 5 s
/// timeout never waits for room. A record is 17 bytes and a flow keeps two
/// per datagram of its window.
const MAX_WINDOW: usize = 1 << 15;

/// Records for all flows of a run together, so many flows at a short
/// interval stay within about 70 MiB; each flow gets at least
/// [`MIN_WINDOW`].
const RUN_WINDOWS: usize = 1 << 21;

/// The window a flow always gets, whatever the number of flows.
const MIN_WINDOW: usize = 1024;

/// Datagrams whose answered bit a flow keeps, to tell a late echo from a
/// duplicate (8 KiB a flow).
const HISTORY: usize = 1 << 16;

/// SplitMix64's multipliers, and their inverses modulo 2^64.
const M1: u64 = 0xBF58_476D_1CE4_E5B9;
const M2: u64 = 0x94D0_49BB_1331_11EB;
const M1_INVERSE: u64 = inverse(M1);
const M2_INVERSE: u64 = inverse(M2);

/// The comparison of an echo with the datagram it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Byte for byte the same.
    Exact,
    /// Same size; the first differing byte.
    Differs {
        /// Its offset in the datagram.
        offset: usize,
        /// The byte sent there.
        sent: u8,
        /// The byte that came back there.
        got: u8,
    },
    /// A different size.
    Size {
        /// Bytes that came back.
        got: usize,
    },
}

/// The datagrams of one flow: what each carries, and which one an echo
/// names. Public so that the property test drives the real encoding.
#[derive(Debug)]
pub struct Datagrams<'a> {
    payload: &'a Payload,
    seed: u64,
    flow: usize,
    key: u64,
    numbered: bool,
    /// A datagram rebuilt to check an echo against (`--size` only).
    expected: Vec<u8>,
}

impl<'a> Datagrams<'a> {
    /// The datagrams of flow `flow` (from 1) of the run seeded `seed`.
    #[must_use]
    pub fn new(payload: &'a Payload, seed: u64, flow: usize) -> Datagrams<'a> {
        Datagrams {
            payload,
            seed,
            flow,
            key: payload::splitmix64(seed ^ 0xD1B5_4A32_D192_ED03 ^ (flow as u64)),
            numbered: matches!(payload, Payload::Generated { size } if size.get() >= HEADER),
            expected: Vec::new(),
        }
    }

    /// Bytes per datagram.
    #[must_use]
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// True for a 0-byte datagram.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bits of sequence number each datagram carries: 64, or 0 when it
    /// carries none.
    #[must_use]
    pub fn header_bits(&self) -> u32 {
        if self.numbered { 64 } else { 0 }
    }

    /// How many datagrams may be in flight at once, and how many the flow
    /// remembers to tell late from duplicated, for a flow sending every
    /// `interval` whose echoes may take `timeout`, one of `flows`. A
    /// numbered flow's window holds every datagram sent within a timeout
    /// (so one lost datagram never holds the next ones back), up to a
    /// memory cap; an unnumbered flow keeps one in flight, and needs no
    /// history: its echoes always answer the newest datagram, never an
    /// older one (8 KiB a flow saved, 80 MB over 10,000 flows).
    #[must_use]
    pub fn window_and_history(
        &self,
        timeout: Duration,
        interval: Duration,
        flows: usize,
    ) -> (usize, usize) {
        if !self.numbered {
            return (1, 1);
        }
        if interval.is_zero() {
            return (1, HISTORY);
        }
        let sends = timeout.as_nanos().div_ceil(interval.as_nanos()) + 2;
        // A power of two, as the ledger rounds its window up to one.
        let share = (RUN_WINDOWS / flows.max(1)).max(1);
        let cap = (1 << share.ilog2()).clamp(MIN_WINDOW, MAX_WINDOW);
        let window = usize::try_from(sends).unwrap_or(usize::MAX).min(cap);
        (window, HISTORY)
    }

    /// Makes room for the rebuilt datagram; false if memory ran out.
    pub fn reserve(&mut self) -> bool {
        let len = match self.payload {
            Payload::Text(_) => 0,
            Payload::Generated { size } => size.get(),
        };
        if self.expected.try_reserve_exact(len).is_err() {
            return false;
        }
        self.expected.resize(len, 0);
        true
    }

    /// Writes datagram `seq` into `buf`, which is [`len`](Self::len) bytes
    /// long and holds whatever this wrote last.
    pub fn write(&self, seq: u64, buf: &mut [u8]) {
        match self.payload {
            Payload::Text(text) => {
                if buf != text.as_slice() {
                    buf.copy_from_slice(text);
                }
            }
            Payload::Generated { .. } => {
                payload::fill(buf, self.seed, self.flow, seq);
                if self.numbered {
                    let header = mix(seq ^ self.key).to_le_bytes();
                    buf[..HEADER].copy_from_slice(&header);
                }
            }
        }
    }

    /// The sequence number an echo names (`0` for an unnumbered flow:
    /// see [`Ledger::locate`](super::Ledger::locate)), or `None` if it is
    /// too short to carry one.
    #[must_use]
    pub fn named(&self, echo: &[u8]) -> Option<u64> {
        if !self.numbered {
            return Some(0);
        }
        let header: [u8; HEADER] = echo.get(..HEADER)?.try_into().ok()?;
        Some(unmix(u64::from_le_bytes(header)) ^ self.key)
    }

    /// Compares `echo` with datagram `seq`, rebuilding it (for `--size`)
    /// in a buffer of this flow's own, made by [`reserve`](Self::reserve).
    pub fn compare(&mut self, seq: u64, echo: &[u8]) -> Comparison {
        let mut expected = std::mem::take(&mut self.expected);
        let comparison = self.compare_in(seq, echo, &mut expected);
        self.expected = expected;
        comparison
    }

    /// Compares `echo` with datagram `seq`, rebuilding it (for `--size`)
    /// in `expected`, [`len`](Self::len) bytes that a caller may share
    /// between flows: an event loop keeps one for all of its flows.
    pub fn compare_in(&self, seq: u64, echo: &[u8], expected: &mut [u8]) -> Comparison {
        let sent: &[u8] = match self.payload {
            Payload::Text(text) => text,
            Payload::Generated { .. } => {
                self.write(seq, expected);
                expected
            }
        };
        if echo.len() != sent.len() {
            return Comparison::Size { got: echo.len() };
        }
        match sent.iter().zip(echo).position(|(a, b)| a != b) {
            None => Comparison::Exact,
            Some(offset) => Comparison::Differs {
                offset,
                sent: sent[offset],
                got: echo[offset],
            },
        }
    }
}

/// SplitMix64's output function, a bijection of 64-bit numbers in which
/// every input bit affects every output bit.
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(M1);
    let x = (x ^ (x >> 27)).wrapping_mul(M2);
    x ^ (x >> 31)
}

/// The inverse of [`mix`].
fn unmix(y: u64) -> u64 {
    let y = unshift(y, 31).wrapping_mul(M2_INVERSE);
    let y = unshift(y, 27).wrapping_mul(M1_INVERSE);
    unshift(y, 30)
}

/// The `x` for which `x ^ (x >> shift)` is `y`.
fn unshift(y: u64, shift: u32) -> u64 {
    let mut x = y;
    // Each round gets `shift` more of the high bits right.
    for _ in 0..64 / shift {
        x = y ^ (x >> shift);
    }
    x
}

/// The inverse of odd `m` modulo 2^64, by Newton's iteration (each round
/// doubles the correct low bits, from 3).
const fn inverse(m: u64) -> u64 {
    let mut x = m;
    let mut round = 0;
    while round < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(x)));
        round += 1;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    const MS: Duration = Duration::from_millis(1);

    fn generated(size: usize) -> Payload {
        Payload::Generated {
            size: NonZeroUsize::new(size).expect("a size above 0"),
        }
    }

    #[test]
    fn the_scrambling_of_the_number_is_undone_exactly() {
        for x in [0, 1, 2, 300, u64::MAX, 0x0123_4567_89AB_CDEF] {
            assert_eq!(unmix(mix(x)), x);
        }
        assert_eq!(M1.wrapping_mul(M1_INVERSE), 1);
        assert_eq!(M2.wrapping_mul(M2_INVERSE), 1);
    }

    #[test]
    fn a_datagram_names_its_sequence_number_and_matches_itself_only() {
        for size in [8, 9, 16, 1472] {
            let payload = generated(size);
            let mut datagrams = Datagrams::new(&payload, 42, 3);
            assert!(datagrams.reserve());
            assert_eq!(datagrams.header_bits(), 64);
            let mut buf = vec![0; size];
            datagrams.write(300, &mut buf);
            assert_eq!(datagrams.named(&buf), Some(300), "size {size}");
            assert_eq!(datagrams.compare(300, &buf), Comparison::Exact);
            assert_ne!(datagrams.compare(301, &buf), Comparison::Exact);
            assert_eq!(
                datagrams.compare(300, &buf[..size - 1]),
                Comparison::Size { got: size - 1 }
            );
        }
    }

    #[test]
    fn any_flipped_bit_of_the_number_names_no_datagram_near_it() {
        let payload = generated(8);
        let datagrams = Datagrams::new(&payload, 42, 1);
        let mut buf = vec![0; 8];
        for seq in [1, 2, 3, 1000] {
            datagrams.write(seq, &mut buf);
            for bit in 0..64 {
                let mut damaged = buf.clone();
                damaged[bit / 8] ^= 1 << (bit % 8);
                let named = datagrams.named(&damaged).expect("8 bytes carry a number");
                assert!(named > 1 << 32, "seq {seq}, bit {bit}: names {named}");
            }
        }
    }

    #[test]
    fn another_flow_s_datagram_names_another_number() {
        let payload = generated(64);
        let mine = Datagrams::new(&payload, 42, 1);
        let theirs = Datagrams::new(&payload, 42, 2);
        let mut buf = vec![0; 64];
        theirs.write(5, &mut buf);
        assert_ne!(mine.named(&buf), Some(5));
    }

    #[test]
    fn an_unnumbered_flow_keeps_no_history_and_a_numbered_one_does() {
        let message = Payload::Text(b"Hello Echo!".to_vec());
        let unnumbered = Datagrams::new(&message, 42, 1);
        assert_eq!(unnumbered.window_and_history(5 * MS, MS, 1), (1, 1));
        let sized = Payload::Generated {
            size: std::num::NonZeroUsize::new(64).expect("64 is not 0"),
        };
        let numbered = Datagrams::new(&sized, 42, 1);
        // Ping-pong with numbers: an old echo may still name its datagram.
        assert_eq!(
            numbered.window_and_history(5 * MS, Duration::ZERO, 1),
            (1, HISTORY)
        );
    }

    #[test]
    fn a_message_or_a_datagram_under_8_bytes_carries_no_number() {
        let payload = Payload::Text(b"Hello Echo!".to_vec());
        let mut datagrams = Datagrams::new(&payload, 42, 1);
        assert_eq!(datagrams.window_and_history(5 * MS, MS, 1).0, 1);
        assert_eq!(datagrams.named(b"anything"), Some(0));
        assert_eq!(datagrams.compare(9, b"Hello Echo!"), Comparison::Exact);
        assert_eq!(
            datagrams.compare(9, b"Hello Echo?"),
            Comparison::Differs {
                offset: 10,
                sent: b'!',
                got: b'?'
            }
        );
        let small = generated(7);
        let mut datagrams = Datagrams::new(&small, 42, 1);
        assert!(datagrams.reserve());
        assert_eq!(datagrams.header_bits(), 0);
        let mut buf = vec![0; 7];
        datagrams.write(2, &mut buf);
        assert_eq!(datagrams.compare(2, &buf), Comparison::Exact);
        assert_ne!(datagrams.compare(3, &buf), Comparison::Exact);
    }

    #[test]
    fn the_window_holds_a_timeout_of_sends_within_a_memory_cap() {
        let payload = generated(64);
        let datagrams = Datagrams::new(&payload, 42, 1);
        let second = Duration::from_secs(1);
        assert_eq!(datagrams.window_and_history(5 * second, MS, 1).0, 5002);
        assert_eq!(datagrams.window_and_history(5 * second, 20 * MS, 1).0, 252);
        assert_eq!(
            datagrams
                .window_and_history(5 * second, Duration::ZERO, 1)
                .0,
            1
        );
        assert_eq!(
            datagrams.window_and_history(60 * second, MS, 1).0,
            MAX_WINDOW
        );
        assert_eq!(
            datagrams.window_and_history(60 * second, MS, 10_000).0,
            MIN_WINDOW
        );
    }
}
