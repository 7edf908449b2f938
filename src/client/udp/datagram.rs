//! What each UDP datagram of a flow carries, and how an echo is matched to
//! the datagram it answers.
//!
//! A `--size` datagram starts with its sequence number on the flow, as
//! many of its low bytes as fit (up to 8, little-endian), XORed with a key
//! drawn from the run and the flow; the rest is the pseudo-random content
//! of that (run, flow, sequence number), as for TCP. So an echo names its
//! datagram, the datagram's bytes can be rebuilt from the number alone to
//! check the echo byte for byte, and a datagram of another flow or another
//! run names none (or fails the check). A `--message` datagram and a
//! 0-byte one carry no number: their flow keeps one in flight, and an echo
//! answers the newest datagram sent.
//!
//! A 1-byte number tells apart 256 consecutive datagrams, so such flows
//! keep at most 128 in flight; 2 bytes and more tell apart 65,536.

use super::super::{Payload, payload};

/// The most bytes of sequence number a datagram carries.
const MAX_HEADER: usize = 8;

/// Records kept for datagrams in flight on a flow whose datagrams carry at
/// least 2 bytes of sequence number.
const WINDOW: usize = 1024;

/// Datagrams whose answered bit a flow keeps, to tell a late echo from a
/// duplicate (2 bytes of sequence number tell this many apart).
const HISTORY: usize = 1 << 16;

/// The comparison of an echo with the datagram it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Comparison {
    /// Byte for byte the same.
    Exact,
    /// Same size; the first differing byte.
    Differs { offset: usize, sent: u8, got: u8 },
    /// A different size.
    Size { got: usize },
}

/// The datagrams of one flow.
pub(super) struct Datagrams<'a> {
    payload: &'a Payload,
    seed: u64,
    flow: usize,
    key: u64,
    header_len: usize,
    /// A datagram rebuilt to check an echo against (`--size` only).
    expected: Vec<u8>,
}

impl<'a> Datagrams<'a> {
    /// The datagrams of flow `flow` (from 1) of the run seeded `seed`.
    pub fn new(payload: &'a Payload, seed: u64, flow: usize) -> Datagrams<'a> {
        let header_len = match payload {
            Payload::Text(_) => 0,
            Payload::Generated { size } => size.get().min(MAX_HEADER),
        };
        Datagrams {
            payload,
            seed,
            flow,
            key: payload::splitmix64(seed ^ 0xD1B5_4A32_D192_ED03 ^ (flow as u64)),
            header_len,
            expected: Vec::new(),
        }
    }

    /// Bytes per datagram.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Bits of sequence number each datagram carries (0, 8, ..., 64).
    pub fn header_bits(&self) -> u32 {
        8 * self.header_len as u32
    }

    /// How many datagrams may be in flight at once, and how many the flow
    /// remembers, so that every echo names one datagram unambiguously.
    pub fn window_and_history(&self) -> (usize, usize) {
        match self.header_bits() {
            0 => (1, 1),
            bits if bits < 16 => (1 << (bits - 1), 1 << bits),
            _ => (WINDOW, HISTORY),
        }
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
                let header = (seq ^ self.key).to_le_bytes();
                buf[..self.header_len].copy_from_slice(&header[..self.header_len]);
            }
        }
    }

    /// The low [`header_bits`](Self::header_bits) of the sequence number
    /// an echo names, or `None` if it is too short to carry them.
    pub fn named(&self, echo: &[u8]) -> Option<u64> {
        let header = echo.get(..self.header_len)?;
        let mut bytes = [0; MAX_HEADER];
        bytes[..self.header_len].copy_from_slice(header);
        let mask = match self.header_bits() {
            64 => u64::MAX,
            bits => (1u64 << bits) - 1,
        };
        Some((u64::from_le_bytes(bytes) ^ self.key) & mask)
    }

    /// Compares `echo` with datagram `seq`.
    pub fn compare(&mut self, seq: u64, echo: &[u8]) -> Comparison {
        let sent: &[u8] = match self.payload {
            Payload::Text(text) => text,
            Payload::Generated { .. } => {
                let mut expected = std::mem::take(&mut self.expected);
                self.write(seq, &mut expected);
                self.expected = expected;
                &self.expected
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    fn generated(size: usize) -> Payload {
        Payload::Generated {
            size: NonZeroUsize::new(size).expect("a size above 0"),
        }
    }

    #[test]
    fn a_datagram_names_its_sequence_number_and_matches_itself_only() {
        for size in [1, 2, 7, 8, 9, 1472] {
            let payload = generated(size);
            let mut datagrams = Datagrams::new(&payload, 42, 3);
            assert!(datagrams.reserve());
            let mut buf = vec![0; size];
            datagrams.write(300, &mut buf);
            let bits = datagrams.header_bits();
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            assert_eq!(datagrams.named(&buf), Some(300 & mask), "size {size}");
            assert_eq!(datagrams.compare(300, &buf), Comparison::Exact);
            if size >= 2 {
                assert_ne!(datagrams.compare(301, &buf), Comparison::Exact);
            }
            assert_eq!(
                datagrams.compare(300, &buf[..size - 1]),
                Comparison::Size { got: size - 1 }
            );
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
    fn a_message_carries_no_number_and_keeps_one_datagram_in_flight() {
        let payload = Payload::Text(b"Hello Echo!".to_vec());
        let mut datagrams = Datagrams::new(&payload, 42, 1);
        assert_eq!(datagrams.window_and_history(), (1, 1));
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
    }
}
