//! One connection of an event loop, as state: not yet started, connecting
//! (address by address), idle between echoes, echoing one message,
//! closing (half-closed, counting what the server still sends), or, with
//! `--reconnect`, waiting to connect again. The loop in
//! [`event_loop`](super::event_loop) moves it from state to state; this file
//! holds the states and the nonblocking steps of one echo.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::client::echo::ExchangeError;
use crate::client::reconnect::{Backoff, Reconnect};
use crate::error::{interrupted, would_block};

/// A connection and where it is in its life.
pub(super) struct Connection {
    /// Connection number in the run, from 1.
    pub number: usize,
    pub stream: Option<TcpStream>,
    /// The address connected to, or being tried.
    pub peer: SocketAddr,
    pub state: State,
    /// Messages taken so far: the last one's number.
    pub seq: u64,
    /// The earliest timer set for this connection, if any: a later wish
    /// waits for it, an earlier one sets another.
    pub armed: Option<Instant>,
    /// Readiness seen and not yet used up (the loop's events are
    /// edge-triggered): a read or write that would block clears it.
    pub readable: bool,
    pub writable: bool,
    /// The socket reported a hang-up or an error: read until the read says
    /// which, even after a short read.
    pub hup: bool,
    /// With `--reconnect`: what carries over from one of its connections
    /// to the next.
    pub rejoin: Option<Rejoin>,
    /// With `--rate`: the ticket of its entry in the loop's queue of free
    /// connections. An entry with another ticket is stale: the connection
    /// was let go and came free again since.
    pub free_ticket: Option<u64>,
}

impl Connection {
    pub fn new(number: usize, peer: SocketAddr, reconnect: bool) -> Self {
        Connection {
            number,
            stream: None,
            peer,
            state: State::Unstarted,
            seq: 0,
            armed: None,
            readable: false,
            writable: false,
            hup: false,
            rejoin: reconnect.then(Rejoin::new),
            free_ticket: None,
        }
    }

    /// True while a connect of `--reconnect` (not the first) is in progress.
    pub fn reconnecting(&self) -> bool {
        matches!(self.state, State::Connecting(_))
            && self.rejoin.as_ref().is_some_and(|rejoin| rejoin.opened)
    }
}

/// With `--reconnect`, a connection's memory across its connections (the
/// rule is in [`reconnect`](crate::client::reconnect)).
pub(super) struct Rejoin {
    pub backoff: Backoff,
    /// It has been open once: a connect that fails now is a reconnect's,
    /// tried again within the timeout; the first is not.
    pub opened: bool,
    /// The current connection echoed something: the next reconnect goes
    /// at once, without a pause.
    pub productive: bool,
    /// Why the last connection was let go.
    pub why: Reconnect,
    /// A message the server ended a connection on before echoing any of
    /// it: it goes first on the next, with its number and due time.
    pub pending: Option<Pending>,
    /// Since when, and over how many connections, the next message has
    /// waited for a connection that takes it: from when it was due, not
    /// from an end that came while it was not yet due.
    pub waiting: Option<(Instant, u64)>,
    /// With `--interval`: when the next message is due, kept while the
    /// connection reconnects, so that a server's idle timeout shorter than
    /// the interval neither costs a message nor moves it later.
    pub next: Option<Instant>,
    /// When this reconnect's first failed try began, and its tries so far.
    pub first_failure: Option<Instant>,
    pub tries: u32,
}

impl Rejoin {
    fn new() -> Self {
        Rejoin {
            backoff: Backoff::new(),
            opened: false,
            productive: false,
            why: Reconnect::Failed,
            pending: None,
            waiting: None,
            next: None,
            first_failure: None,
            tries: 0,
        }
    }

    /// One more connection ended before taking the next message.
    pub fn waited(&mut self, now: Instant) {
        self.waiting.get_or_insert((now, 0)).1 += 1;
    }
}

/// A message declined by the server (`Reconnect::Declined`), to send again.
#[derive(Clone, Copy)]
pub(super) struct Pending {
    pub seq: u64,
    /// When it was due: with `--rate`, its round trip counts from here,
    /// reconnect included (closed-loop, from its resend).
    pub due: Instant,
}

/// Where a connection is.
pub(super) enum State {
    /// Waiting for its turn to connect (`--connect-rate`, or the cap on
    /// connects at once).
    Unstarted,
    Connecting(Connecting),
    /// Open, no echo out. `next` is when its next echo goes (`--interval`);
    /// `None` when the loop's rate schedule decides.
    Idle {
        next: Option<Instant>,
    },
    Echoing(Echo),
    /// Half-closed after the last echo, counting bytes until the server
    /// closes or `deadline`.
    Closing {
        deadline: Instant,
        extra: usize,
    },
    /// `--reconnect`: let go, pausing until `until` before connecting
    /// again; `None` once in the loop's queue for a connect slot.
    Rejoining {
        until: Option<Instant>,
    },
    /// Over: closed, counted, and out of the loop's open count.
    Done,
}

/// A connect in progress, over the target's addresses in turn.
pub(super) struct Connecting {
    /// When the first address was tried: connect times count from here.
    pub began: Instant,
    /// The whole connect's time: the timeout, or for a reconnect tried
    /// again what is left of it.
    pub budget: std::time::Duration,
    /// The whole connect's deadline (`--timeout`).
    pub deadline: Instant,
    /// The address being tried, as an index into the run's addresses.
    pub at: usize,
    /// When the current attempt gives up, and the share it was given.
    pub attempt_deadline: Instant,
    pub attempt_began: Instant,
    pub share: std::time::Duration,
    /// Each address tried so far and why it failed.
    pub attempts: Vec<(SocketAddr, io::Error)>,
    /// When the connect first found the run stopped.
    pub stop_seen: Option<Instant>,
}

/// One echo out: its message, how far it has gone, and its clock.
pub(super) struct Echo {
    pub seq: u64,
    /// The message for `--size`; `None` for `--message`, whose bytes the
    /// configuration holds.
    pub buf: Option<Vec<u8>>,
    pub len: usize,
    pub written: usize,
    pub received: usize,
    /// The first difference seen so far: offset, byte sent, byte received.
    pub difference: Option<(usize, u8, u8)>,
    /// A byte more than the echo came with it.
    pub extra: bool,
    /// When the first byte went out: the timeout counts from here.
    pub sent_at: Instant,
    /// Where the round trip is timed from: `sent_at`, or with `--rate` the
    /// time the echo was due.
    pub due: Instant,
    pub deadline: Instant,
    /// When the echo first found the run stopped, or last saw more bytes
    /// after that, and how many had come by then.
    pub stop_seen: Option<(Instant, usize)>,
}

/// Writes as much of `message[echo.written..]` as the socket takes.
/// Returns true if bytes went out; clears `writable` when the socket is full.
pub(super) fn write_some(
    mut stream: &TcpStream,
    message: &[u8],
    echo: &mut Echo,
    writable: &mut bool,
) -> Result<bool, ExchangeError> {
    let mut moved = false;
    while echo.written < echo.len && *writable {
        match stream.write(&message[echo.written..echo.len]) {
            Ok(0) => {
                return Err(ExchangeError::io(
                    io::ErrorKind::WriteZero.into(),
                    echo.received,
                ));
            }
            Ok(written) => {
                echo.written += written;
                moved = true;
            }
            // A signal arrived: retry.
            Err(error) if interrupted(&error) => {}
            // The send buffer is full: wait until it is writable.
            Err(error) if would_block(&error) => *writable = false,
            Err(error) => return Err(ExchangeError::io(error, echo.received)),
        }
    }
    Ok(moved)
}

/// Reads what has come of the echo into `scratch`, comparing it with
/// `message` as it comes, and asking for one byte more than is due so that
/// a byte the server added shows without another syscall. Returns true if
/// bytes came; clears `readable` once the socket is drained.
pub(super) fn read_some(
    mut stream: &TcpStream,
    message: &[u8],
    echo: &mut Echo,
    readable: &mut bool,
    hup: bool,
    scratch: &mut [u8],
) -> Result<bool, ExchangeError> {
    let mut moved = false;
    while echo.received < echo.len && *readable {
        let due = echo.len - echo.received;
        let asked = (due + 1).min(scratch.len());
        match stream.read(&mut scratch[..asked]) {
            // The server closed before echoing everything.
            Ok(0) => {
                return Err(ExchangeError::Closed {
                    received: echo.received,
                });
            }
            Ok(read) => {
                let echoed = read.min(due);
                if echo.difference.is_none() {
                    let sent = &message[echo.received..echo.received + echoed];
                    if let Some(at) = first_difference(sent, &scratch[..echoed]) {
                        echo.difference = Some((echo.received + at, sent[at], scratch[at]));
                    }
                }
                echo.received += echoed;
                echo.extra = read > due;
                moved = true;
                if read < asked && !hup {
                    // Short: the socket is drained; the next bytes bring an event.
                    *readable = false;
                }
            }
            // A signal arrived: retry.
            Err(error) if interrupted(&error) => {}
            // Nothing more yet: wait until it is readable.
            Err(error) if would_block(&error) => *readable = false,
            Err(error) => return Err(ExchangeError::io(error, echo.received)),
        }
    }
    Ok(moved)
}

fn first_difference(sent: &[u8], echoed: &[u8]) -> Option<usize> {
    if sent == echoed {
        return None;
    }
    sent.iter().zip(echoed).position(|(a, b)| a != b)
}
