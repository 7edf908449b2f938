//! What can go wrong on a UDP flow, as one-line messages that name the
//! datagram, the address and the cause. Each is also counted in the
//! [`UdpReport`](super::UdpReport).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::client::failure::describe;

/// One thing that went wrong on a UDP run.
#[derive(Debug)]
pub struct UdpFailure {
    /// The flow it happened on (from 1), or `None` when it concerns the
    /// whole run or the run has a single flow.
    pub flow: Option<usize>,
    /// What happened.
    pub kind: UdpFailureKind,
}

/// What happened; each variant's `Display` names the address and the cause.
#[derive(Debug)]
pub enum UdpFailureKind {
    /// The host name did not resolve.
    Resolve {
        /// The target as given.
        target: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// The flow's socket could not be opened.
    Socket {
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
    },
    /// The operating system would not start another event loop thread.
    Spawn {
        /// The spawn error.
        error: io::Error,
    },
    /// The event loop that was to run the flow could not be made (no
    /// epoll or eventfd left, or no memory for its buffers).
    Loop {
        /// The loop's error.
        error: io::Error,
    },
    /// The datagram buffers could not be allocated.
    OutOfMemory {
        /// The size asked for.
        bytes: usize,
    },
    /// Datagram `seq` could not be sent.
    Send {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
    },
    /// Receiving failed; the flow stops.
    Receive {
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
    },
    /// No echo of datagram `seq` came within `after`.
    Lost {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// The timeout, or the patience left after a stop.
        after: Duration,
        /// The run was stopped while the datagram was out.
        stopped: bool,
    },
    /// The echo of datagram `seq` came after it had been counted lost.
    Late {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Its round trip, when still known.
        rtt: Option<Duration>,
    },
    /// Datagram `seq` was echoed more than once.
    Duplicated {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
    },
    /// An exact echo of datagram `seq`, which is older than the answered
    /// bits the flow keeps (65,536 datagrams): counted duplicated, as it
    /// cannot be told from a late echo.
    Stale {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
    },
    /// An echo came back with a different byte.
    Mismatch {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Datagram length.
        len: usize,
        /// Offset of the first differing byte.
        offset: usize,
        /// The byte sent there.
        sent: u8,
        /// The byte that came back there.
        got: u8,
    },
    /// An echo came back with a different size.
    WrongSize {
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Datagram length.
        len: usize,
        /// Bytes that came back.
        got: usize,
    },
    /// An echo from the server named no datagram that was sent.
    Unmatched {
        /// The server's address.
        peer: SocketAddr,
        /// Bytes that came back.
        got: usize,
    },
    /// A datagram came from an address other than the server's.
    Foreign {
        /// Where it came from.
        from: SocketAddr,
        /// The server's address.
        peer: SocketAddr,
        /// Its size.
        got: usize,
    },
}

impl UdpFailureKind {
    /// True for the kinds the report counts as errors (everything that is
    /// not about one echo: resolve, socket, thread, memory, send, receive).
    #[must_use]
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            UdpFailureKind::Resolve { .. }
                | UdpFailureKind::Socket { .. }
                | UdpFailureKind::Spawn { .. }
                | UdpFailureKind::Loop { .. }
                | UdpFailureKind::OutOfMemory { .. }
                | UdpFailureKind::Send { .. }
                | UdpFailureKind::Receive { .. }
        )
    }
}

impl fmt::Display for UdpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            UdpFailureKind::Resolve { target, error } => {
                write!(f, "cannot resolve {target}: {}", describe(error))?;
            }
            UdpFailureKind::Socket { peer, error } => write!(
                f,
                "cannot open a UDP socket for {peer}: {}",
                crate::error::io_cause(error)
            )?,
            UdpFailureKind::Loop { error } => write!(
                f,
                "cannot make an event loop for the flow: {}",
                crate::error::io_cause(error)
            )?,
            UdpFailureKind::Spawn { error } => write!(
                f,
                "cannot start an event loop thread: {}",
                crate::error::io_cause(error)
            )?,
            UdpFailureKind::OutOfMemory { bytes } => write!(
                f,
                "cannot allocate {bytes} bytes for a datagram: out of memory"
            )?,
            UdpFailureKind::Send { seq, peer, error } => write!(
                f,
                "cannot send datagram {seq} to {peer}: {}",
                crate::error::io_cause(error)
            )?,
            UdpFailureKind::Receive { peer, error } => write!(
                f,
                "cannot receive echoes from {peer}: {}",
                crate::error::io_cause(error)
            )?,
            UdpFailureKind::Lost {
                seq,
                peer,
                after,
                stopped,
            } => {
                let after = humantime::format_duration(*after);
                write!(f, "echo {seq} from {peer} lost: none came within {after}")?;
                if *stopped {
                    write!(f, " of the stop")?;
                }
            }
            UdpFailureKind::Late { seq, peer, rtt } => {
                write!(f, "echo {seq} from {peer} came back late")?;
                if let Some(rtt) = rtt {
                    write!(f, ", after {:.3} ms", rtt.as_secs_f64() * 1e3)?;
                }
                write!(f, " (already counted lost)")?;
            }
            UdpFailureKind::Duplicated { seq, peer } => {
                write!(f, "echo {seq} from {peer} came back again (duplicated)")?;
            }
            UdpFailureKind::Stale { seq, peer } => write!(
                f,
                "echo {seq} from {peer} came back after 65536 later datagrams, too old to tell late from again (counted duplicated)"
            )?,
            UdpFailureKind::Mismatch {
                seq,
                peer,
                len,
                offset,
                sent,
                got,
            } => write!(
                f,
                "echo {seq} from {peer} corrupted: byte {offset} of {len} came back as {got:#04x}, sent {sent:#04x}"
            )?,
            UdpFailureKind::WrongSize {
                seq,
                peer,
                len,
                got,
            } => write!(
                f,
                "echo {seq} from {peer} corrupted: {got} bytes came back, {len} sent"
            )?,
            UdpFailureKind::Unmatched { peer, got } => write!(
                f,
                "{} {got}-byte echo from {peer} matches no datagram sent (corrupted)",
                article(*got)
            )?,
            UdpFailureKind::Foreign { from, peer, got } => write!(
                f,
                "{} {got}-byte datagram came from {from}, not from the server {peer}",
                article(*got)
            )?,
        }
        if let Some(flow) = self.flow {
            write!(f, " (flow {flow})")?;
        }
        Ok(())
    }
}

/// "an" before a number said with a vowel first (8, 11, 18, 80, 800,
/// 11,000, ...), "a" before the others.
fn article(number: usize) -> &'static str {
    let digits = number.to_string();
    let eleven_or_eighteen = digits.len() % 3 == 2 && ["11", "18"].contains(&&digits[..2]);
    if digits.starts_with('8') || eleven_or_eighteen {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_said_with_a_vowel_first_take_an() {
        for (number, expected) in [
            (8, "an"),
            (11, "an"),
            (18, "an"),
            (80, "an"),
            (800, "an"),
            (11_000, "an"),
            (18_500, "an"),
            (1, "a"),
            (64, "a"),
            (110, "a"),
            (1_100, "a"),
            (65_507, "a"),
        ] {
            assert_eq!(article(number), expected, "{number}");
        }
    }
}
