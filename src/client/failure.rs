//! What can go wrong for the client, as one-line messages that name the
//! address and the cause. Every failure is also counted in the report: as a
//! timeout, a mismatch, or an error.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// One failure during a run.
#[derive(Debug)]
pub struct Failure {
    /// The connection it happened on (from 1), or `None` when it concerns the
    /// whole run or the run has a single connection.
    pub connection: Option<usize>,
    /// What happened.
    pub kind: FailureKind,
}

/// What happened; each variant's `Display` names the address and the cause.
#[derive(Debug)]
pub enum FailureKind {
    /// The host name did not resolve.
    Resolve {
        /// The target as given.
        target: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// No connection could be made (refused, unreachable, timed out).
    Connect {
        /// Each address tried, in order, and why it failed; never empty.
        attempts: Vec<(SocketAddr, io::Error)>,
    },
    /// The complete echo did not arrive within the timeout (`received` equals
    /// `len` when it did arrive, but after the timeout).
    TimedOut {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// The timeout that ran out.
        after: Duration,
        /// Bytes of the message written by then (less than `len` when the
        /// server stopped reading).
        sent: usize,
        /// Bytes of the echo received by then.
        received: usize,
        /// Message length.
        len: usize,
    },
    /// The echo came back complete but different.
    Mismatch {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Message length.
        len: usize,
        /// Offset of the first differing byte.
        offset: usize,
        /// The byte sent there.
        sent: u8,
        /// The byte that came back there.
        got: u8,
    },
    /// The server closed the connection before the whole echo came back;
    /// with `received` 0, before any of it (see
    /// [`is_closed_before_echo`](Self::is_closed_before_echo)).
    Closed {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Bytes of the echo received.
        received: usize,
        /// Message length.
        len: usize,
    },
    /// The run was stopped (Ctrl-C) while the echo was still out, and it did
    /// not come back within a moment.
    Stopped {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// Bytes of the message written by then.
        sent: usize,
        /// Bytes of the echo received by then.
        received: usize,
        /// Message length.
        len: usize,
    },
    /// The server sent bytes it was never sent: queued behind an echo, or
    /// after the last one.
    Extra {
        /// The echo they followed, on the connection (0 if none was sent).
        after_seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// How many bytes were queued behind the echo, or came after the
        /// last one before the server closed or the wait ran out.
        bytes: usize,
    },
    /// With `--reconnect`: one connection after another ended (closed,
    /// reset, or sent bytes it was never sent) before any byte of this echo
    /// came back, for a whole timeout.
    NeverTaken {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address, the last time.
        peer: SocketAddr,
        /// How many connections ended before the echo came.
        connections: u64,
        /// The timeout that ran out.
        after: Duration,
    },
    /// With `--reconnect`: the connection broke (a reset, say) while no echo
    /// was due; it is opened again.
    Dropped {
        /// The last echo on the connection (0 if none).
        after_seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
    },
    /// The check after the last echo failed for a reason other than the
    /// server going away.
    Closing {
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
    },
    /// Sending or receiving failed (for example, connection reset).
    Io {
        /// Echo number on the connection, from 1.
        seq: u64,
        /// The server's address.
        peer: SocketAddr,
        /// The socket's error.
        error: io::Error,
        /// Bytes of the echo received before it.
        received: usize,
        /// Message length.
        len: usize,
    },
    /// Reading the input lines (`--stdin`) failed.
    Input {
        /// The read error.
        error: io::Error,
    },
    /// A message or its echo buffer could not be allocated.
    OutOfMemory {
        /// The size asked for.
        bytes: usize,
    },
    /// The operating system would not start another connection thread.
    Spawn {
        /// The spawn error.
        error: io::Error,
    },
}

impl FailureKind {
    /// True for a timeout, which the report counts apart from other errors.
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        matches!(self, FailureKind::TimedOut { .. })
    }

    /// True for a mismatch, which the report counts apart from other errors.
    #[must_use]
    pub fn is_mismatch(&self) -> bool {
        matches!(self, FailureKind::Mismatch { .. })
    }

    /// True when the server ended the connection cleanly before any byte of
    /// the echo came back: between echoes, as a draining server does (it
    /// never took the message), not in the middle of one. The report counts
    /// it apart from echoes cut short.
    #[must_use]
    pub fn is_closed_before_echo(&self) -> bool {
        matches!(self, FailureKind::Closed { received: 0, .. })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FailureKind::Resolve { target, error } => {
                write!(f, "cannot resolve {target}: {}", describe(error))?;
            }
            FailureKind::Connect { attempts } => {
                match attempts.as_slice() {
                    [(addr, error)] => {
                        write!(f, "cannot connect to {addr}: {}", describe(error))?;
                    }
                    [earlier @ .., (last, last_error)] => {
                        write!(f, "cannot connect to ")?;
                        for (at, (addr, error)) in earlier.iter().enumerate() {
                            let comma = if at > 0 { ", " } else { "" };
                            write!(f, "{comma}{addr} ({})", describe(error))?;
                        }
                        write!(f, " or {last} ({})", describe(last_error))?;
                    }
                    [] => write!(f, "cannot connect: no address to try")?,
                }
                write_refused_hint(f, attempts)?;
            }
            FailureKind::TimedOut {
                seq,
                peer,
                after,
                sent,
                received,
                len,
            } => {
                let after = humantime::format_duration(*after);
                write!(f, "echo {seq} to {peer} timed out after {after}")?;
                if *sent < *len {
                    write!(f, " while sending, with {sent} of {len} bytes sent")?;
                    if *received > 0 {
                        write!(f, " and {received} back")?;
                    }
                } else if *received == *len {
                    write!(f, ": all {len} bytes came back, but late")?;
                } else if *received > 0 {
                    write!(f, ", with {received} of {len} bytes back")?;
                }
            }
            FailureKind::Mismatch {
                seq,
                peer,
                len,
                offset,
                sent,
                got,
            } => write!(
                f,
                "echo {seq} from {peer} mismatched: byte {offset} of {len} came back as {got:#04x}, sent {sent:#04x}"
            )?,
            FailureKind::Closed {
                seq,
                peer,
                received: 0,
                ..
            } => write!(
                f,
                "{peer} closed the connection before echo {seq} was sent; the server is \
                 shutting down or closed it"
            )?,
            FailureKind::Closed {
                seq,
                peer,
                received,
                len,
            } => write!(
                f,
                "echo {seq}: {peer} closed the connection after {received} of {len} bytes"
            )?,
            FailureKind::Stopped {
                seq,
                peer,
                sent,
                received,
                len,
            } => {
                write!(
                    f,
                    "echo {seq} to {peer} was still out when the run was stopped"
                )?;
                if *sent < *len {
                    write!(f, ", with {sent} of {len} bytes sent and {received} back")?;
                } else {
                    write!(f, ", with {received} of {len} bytes back")?;
                }
            }
            FailureKind::Extra {
                after_seq,
                peer,
                bytes,
            } => {
                let unit = if *bytes == 1 { "byte" } else { "bytes" };
                if *after_seq == 0 {
                    write!(f, "before any echo, {peer} sent {bytes} {unit}")?;
                } else {
                    write!(
                        f,
                        "after echo {after_seq}, {peer} sent {bytes} more {unit} than it received"
                    )?;
                }
            }
            FailureKind::NeverTaken {
                seq,
                peer,
                connections,
                after,
            } => {
                let after = humantime::format_duration(*after);
                let plural = if *connections == 1 { "" } else { "s" };
                write!(
                    f,
                    "echo {seq} to {peer} was never taken: {connections} connection{plural} ended before echoing any of it, for {after}"
                )?;
            }
            FailureKind::Dropped {
                after_seq,
                peer,
                error,
            } => {
                let error = describe(error);
                if *after_seq == 0 {
                    write!(
                        f,
                        "before any echo, the connection to {peer} failed: {error}"
                    )?;
                } else {
                    write!(
                        f,
                        "after echo {after_seq}, the connection to {peer} failed: {error}"
                    )?;
                }
            }
            FailureKind::Closing { peer, error } => {
                write!(
                    f,
                    "closing the connection to {peer} failed: {}",
                    describe(error)
                )?;
            }
            FailureKind::Io {
                seq,
                peer,
                error,
                received,
                len,
            } => {
                write!(f, "echo {seq} to {peer} failed: {}", describe(error))?;
                if *received > 0 {
                    write!(f, ", with {received} of {len} bytes back")?;
                }
            }
            FailureKind::Input { error } => {
                write!(f, "cannot read standard input: {}", describe(error))?;
            }
            FailureKind::OutOfMemory { bytes } => {
                write!(
                    f,
                    "cannot allocate {bytes} bytes for a message: out of memory"
                )?;
            }
            FailureKind::Spawn { error } => {
                // Not `describe`: EAGAIN here means out of threads, not a timeout.
                write!(
                    f,
                    "cannot start a connection thread: {}",
                    crate::error::io_cause(error)
                )?;
            }
        }
        if let Some(connection) = self.connection {
            write!(f, " (connection {connection})")?;
        }
        Ok(())
    }
}

/// When every address refused: nothing listens there, most likely because
/// the server is not running, or runs on another port.
fn write_refused_hint(
    f: &mut fmt::Formatter<'_>,
    attempts: &[(SocketAddr, io::Error)],
) -> fmt::Result {
    let refused =
        |(_, error): &(SocketAddr, io::Error)| error.kind() == io::ErrorKind::ConnectionRefused;
    match attempts {
        [(addr, _)] if refused(&attempts[0]) => {
            write!(f, "; is echo-server running on {addr}?")
        }
        [(first, _), ..] if attempts.iter().all(refused) => {
            write!(f, "; is echo-server running on port {}?", first.port())
        }
        _ => Ok(()),
    }
}

/// A short lowercase cause, without the "(os error N)" suffix.
#[must_use]
pub(crate) fn describe(error: &io::Error) -> String {
    if let (None, Some(inner)) = (error.raw_os_error(), error.get_ref()) {
        // Our own message, such as "timed out after 2s".
        return inner.to_string();
    }
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".to_owned(),
        io::ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
        io::ErrorKind::BrokenPipe => "connection closed by peer (broken pipe)".to_owned(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_owned(),
        _ => crate::error::io_cause(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connect_names_every_address_tried_with_its_cause() {
        let v6: SocketAddr = "[::1]:7".parse().expect("an address");
        let v4: SocketAddr = "127.0.0.1:7".parse().expect("an address");
        let failure = Failure {
            connection: None,
            kind: FailureKind::Connect {
                attempts: vec![
                    (
                        v6,
                        io::Error::new(io::ErrorKind::TimedOut, "timed out after 2s 500ms"),
                    ),
                    (v4, io::ErrorKind::ConnectionRefused.into()),
                ],
            },
        };
        assert_eq!(
            failure.to_string(),
            "cannot connect to [::1]:7 (timed out after 2s 500ms) or 127.0.0.1:7 (connection refused)"
        );
    }
}
