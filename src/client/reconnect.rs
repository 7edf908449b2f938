//! `--reconnect`: how a connection is opened again when the server ends
//! it, so that a long run through a load balancer or across a rolling
//! restart goes on. The policy here (the pauses, the look between echoes,
//! the failure after the last try) is shared by both engines: the event
//! loops ([`engine`](super::engine)), which run every `--reconnect` run but
//! `--stdin`, and the blocking per-connection loop of [`echo`](super::echo)
//! (`--stdin --reconnect`), which also uses [`reconnect`] itself.
//!
//! The rule, which relies on the server's drain guarantee (ours echoes every
//! byte it received before its end of stream, and none after):
//! - an end of stream while no echo is due, or before any byte of the due
//!   echo came back, loses nothing: the server never took that message, so
//!   it goes again on the new connection and counts as *resent*;
//! - an echo cut after part of it came back, a reset or a timeout is a
//!   failure, counted as today; the connection then reconnects and goes on.
//!
//! A connect that fails while reconnecting is tried again after a pause
//! that doubles from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`], for at most the
//! timeout from the first failed try. The pauses end at once on a stop:
//! the blocking engine waits on the stop handle, the event loops keep them
//! in their timer heap.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::echo::Socket;
use super::failure::{FailureKind, describe};
use super::stop::StopHandle;
use crate::deadline::deadline_after;
use crate::error::{interrupted, would_block};
use crate::socket::unread_len;

/// The first pause before a connect is tried again, or before reconnecting
/// after a connection that echoed nothing.
pub(super) const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The longest such pause.
pub(super) const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// Why a connection was opened again (`--reconnect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// The server ended the connection cleanly while no echo was due.
    Closed,
    /// The server ended the connection cleanly before any byte of echo `seq`
    /// came back: it never took that message, which is sent again.
    Declined {
        /// Echo number on the connection, from 1.
        seq: u64,
    },
    /// A failure (already reported) left the connection out of step or gone.
    Failed,
}

/// Pauses that double from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`], and start
/// over once a connection echoes again.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { next: FIRST_PAUSE }
    }

    /// The pause to take now; the one after it is twice as long.
    pub fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        pause
    }

    pub fn reset(&mut self) {
        self.next = FIRST_PAUSE;
    }
}

/// What a connection held open between two round trips has done meanwhile.
#[derive(Debug)]
pub(super) enum Idle {
    /// Nothing: it is still open.
    Open,
    /// The server ended it cleanly.
    Closed,
    /// The server sent this many bytes it was never sent.
    Extra(usize),
    /// It broke (a reset, say).
    Broken(io::Error),
}

/// Looks, without waiting, at whether the server ended `socket`'s
/// connection since the last echo, so that an end of stream that came
/// between echoes does not cost a message. One `recv` of one byte, which
/// does not wait whether the socket blocks or not.
pub(super) fn idle_state(socket: &impl AsRawFd) -> Idle {
    let mut byte = 0u8;
    loop {
        // SAFETY: recv writes at most one byte into `byte`, which outlives
        // the call; MSG_DONTWAIT keeps a blocking socket from waiting.
        let read = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        if read == 0 {
            return Idle::Closed;
        }
        if read > 0 {
            return Idle::Extra(1 + unread_len(socket).unwrap_or(0));
        }
        let error = io::Error::last_os_error();
        match error {
            // A signal arrived: look again.
            ref error if interrupted(error) => {}
            // Nothing came: the connection is as the last echo left it.
            ref error if would_block(error) => return Idle::Open,
            // A reset while idle, or any other error: the connection is gone.
            error => return Idle::Broken(error),
        }
    }
}

/// Opens the connection again. After a connection that echoed nothing
/// (`productive` false) it first pauses, so that a server that ends every
/// connection at once is not hammered. A failed connect is tried again
/// after a growing pause until `timeout` has passed since the first failed
/// try began; then it fails as a connect does.
///
/// `Err(None)` when `stop` fired meanwhile: the run is over, and nothing is
/// sent on a new connection.
pub(super) fn reconnect(
    addrs: &[SocketAddr],
    timeout: Duration,
    stop: &StopHandle,
    backoff: &mut Backoff,
    productive: bool,
) -> Result<Socket, Option<FailureKind>> {
    if productive {
        backoff.reset();
    } else if stop.sleep(backoff.next()) {
        return Err(None);
    }
    let mut first_failure: Option<Instant> = None;
    let mut tries = 0u32;
    loop {
        if stop.is_stopped() {
            return Err(None);
        }
        let left = match first_failure {
            None => timeout,
            Some(at) => deadline_after(at, timeout).saturating_duration_since(Instant::now()),
        };
        tries += 1;
        let began = Instant::now();
        let kind = match Socket::connect(addrs, left, stop) {
            Ok(socket) => return Ok(socket),
            Err(kind) => kind,
        };
        if stop.is_stopped() {
            // The run is over; a connect it cut short is no failure.
            return Err(None);
        }
        let first = *first_failure.get_or_insert(began);
        let deadline = deadline_after(first, timeout);
        let now = Instant::now();
        if now >= deadline {
            return Err(Some(with_tries(kind, tries, now - first)));
        }
        if stop.sleep(backoff.next().min(deadline - now)) {
            return Err(None);
        }
    }
}

/// A connect failure that says how often and how long it was tried.
pub(super) fn with_tries(kind: FailureKind, tries: u32, over: Duration) -> FailureKind {
    if tries < 2 {
        return kind;
    }
    match kind {
        FailureKind::Connect { attempts } => {
            let over = humantime::format_duration(whole_millis(over));
            let attempts = attempts
                .into_iter()
                .map(|(addr, error)| {
                    let text = format!("{}, {tries} tries over {over}", describe(&error));
                    (addr, io::Error::new(error.kind(), text))
                })
                .collect();
            FailureKind::Connect { attempts }
        }
        other => other,
    }
}

/// `duration` rounded to whole milliseconds, for messages.
fn whole_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_longest_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new();
        let pauses: Vec<u64> = (0..8).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next(), FIRST_PAUSE);
    }
}
