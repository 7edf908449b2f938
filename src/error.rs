//! The server's error type, and the one place that turns an `io::Error` into
//! the short lowercase cause that every message ends with.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// The one wording, for the server's `--bind` and the client's address
/// alike, of a scoped IPv6 address (`fe80::1%lo`), which neither takes.
pub const SCOPED_IPV6_UNSUPPORTED: &str =
    "scoped IPv6 addresses (with %zone, as in fe80::1%eth0) are not supported";

/// What can stop the server from starting or from finishing cleanly.
#[derive(Debug)]
pub enum Error {
    /// The configuration cannot work; the message names the field.
    InvalidConfig(String),
    /// The listening socket could not be created or bound.
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// An event loop, waker or thread could not be created.
    Setup {
        /// What was being created, such as `the event loop of worker 3 of 4`.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// A worker thread panicked; the server drained the others and stopped.
    WorkerPanicked {
        /// The worker's index, as in its thread name `echo-worker-N`.
        worker: usize,
    },
    /// The acceptor thread panicked.
    AcceptorPanicked,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::Listen { addr, source } => {
                write!(f, "cannot listen on {addr}: {}", io_cause(source))
            }
            Error::Setup { what, source } => {
                write!(f, "cannot create {what}: {}", io_cause(source))
            }
            Error::WorkerPanicked { worker } => write!(f, "worker {worker} panicked"),
            Error::AcceptorPanicked => write!(f, "the acceptor thread panicked"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Listen { source, .. } | Error::Setup { source, .. } => Some(source),
            _ => None,
        }
    }
}

// How I/O errors are sorted, in one place for the acceptor, the workers,
// the connections and the client:
// - `Interrupted`: a signal landed; retry.
// - `WouldBlock`: wait for readiness (on a blocking socket with a timeout:
//   the timeout ran out).
// - the peer went away (`is_peer_gone`): a normal end, not logged as a failure.
// - anything else: logged with the peer's address.

/// A signal interrupted the call; it is retried.
pub fn interrupted(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Interrupted
}

/// The call would have blocked; wait for readiness.
pub fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// The error only means the peer went away, which is normal.
pub fn is_peer_gone(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// The cause of an I/O error as a short lowercase phrase, without the
/// `(os error N)` suffix: `address already in use`, `connection refused`.
pub fn io_cause(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error ") {
        Some(at) => &text[..at],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_sort_into_retry_wait_peer_gone_and_the_rest() {
        let kind = |kind: io::ErrorKind| io::Error::from(kind);
        assert!(interrupted(&kind(io::ErrorKind::Interrupted)));
        assert!(would_block(&kind(io::ErrorKind::WouldBlock)));
        for gone in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::NotConnected,
        ] {
            assert!(is_peer_gone(&kind(gone)), "{gone:?}");
        }
        let other = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!interrupted(&other) && !would_block(&other) && !is_peer_gone(&other));
    }

    #[test]
    fn io_cause_is_lowercase_without_os_error_suffix() {
        let err = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(io_cause(&err), "address already in use");
        let custom = io::Error::other("Odd thing");
        assert_eq!(io_cause(&custom), "odd thing");
    }
}
