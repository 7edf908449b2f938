//! `--stdin`'s connection, on a thread of its own with blocking sockets (the
//! event loops in [`engine`](super::engine) run every other TCP run), and
//! the pieces both engines share: the tally, the round trip's errors and
//! patience. Its life: connect within the timeout, then for each message
//! send it whole, read back exactly as many bytes (TCP is a stream, so that
//! takes as many reads as it takes), compare byte for byte and time it.
//!
//! Sockets are blocking with timeouts. Every round trip has one deadline, and
//! each read or write waits only for the time that is left, in slices of at
//! most [`STOP_CHECK`] so that a stop is seen; so does the connect, which is
//! nonblocking and polled. Messages larger than
//! [`INLINE_WRITE_LIMIT`] are written and read back at once on a nonblocking
//! socket around poll(2), because a server that stops reading until its echo
//! is read would otherwise deadlock with a client that writes everything
//! first.
//!
//! Only one echo is due at a time, so a byte that comes with a complete
//! echo was never sent: the server added it. Echoes are read into a buffer
//! one byte longer, so such a byte shows without another syscall. After the last echo
//! the client shuts down its sending side and reads until the server
//! closes, for a short while, and counts such bytes too.
//!
//! With `--stdin --reconnect` the loop lets a connection go when the server
//! ends it or it breaks, and [`reconnect`](super::reconnect) opens the next.

use std::convert::Infallible;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};

use super::failure::{Failure, FailureKind};
use super::reconnect::{Backoff, Idle, Reconnect, idle_state, reconnect};
use super::rtt::RttStats;
use super::stop::StopHandle;
use super::{Event, MAX_MESSAGE};
use crate::deadline::deadline_after;
use crate::error::{interrupted, is_peer_gone, would_block};
use crate::socket::unread_len;

/// Messages up to this size are written in full before reading: together
/// they fit in the socket buffers of both ends, so the server can always
/// accept them while its echo waits for us. Larger ones are written
/// concurrently with reading.
const INLINE_WRITE_LIMIT: usize = 64 * 1024;

/// A socket timeout within this much of the time left is good enough; it
/// saves a `setsockopt` per read on the common path.
const TIMEOUT_SLACK: Duration = Duration::from_millis(5);

/// The least time one address of several gets to connect, unless less is
/// left (Go's `saneMinimum`).
pub(super) const MIN_CONNECT_SHARE: Duration = Duration::from_secs(2);

/// How long a connection's first echo, still out at a stop, may stay silent;
/// later ones follow the round trips seen so far.
pub(super) const FIRST_ECHO_STOP_PATIENCE: Duration = Duration::from_secs(1);

/// The longest a blocked read or write waits before the round trip looks at
/// the stop handle again.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// The shortest wait for a server's close after the last echo, and the
/// whole wait once the run is stopped; otherwise it is twice the p99 round
/// trip, and never more than the timeout.
pub(super) const MIN_CLOSING_WAIT: Duration = Duration::from_millis(100);

/// What a blocking connection (`--stdin`) needs from its run.
pub(super) struct Context<'a, F> {
    pub addrs: &'a [SocketAddr],
    pub timeout: Duration,
    /// More than one connection: failures then name their connection.
    pub multiple: bool,
    pub observer: &'a F,
    /// Fired by Ctrl-C or SIGTERM: no more messages are sent, an echo still
    /// out gets its connection's patience, and the closing check after the
    /// last echo is cut short.
    pub stop: &'a StopHandle,
    /// `--reconnect`: open a connection again when the server ends it.
    pub reconnect: bool,
}

/// What one connection did; merged into the report.
#[derive(Debug, Default)]
pub(super) struct ConnectionTally {
    pub sent: u64,
    pub echoed: u64,
    pub mismatched: u64,
    pub timed_out: u64,
    /// Echoes the server ended the connection before (see
    /// [`FailureKind::is_closed_before_echo`]).
    pub closed_before_echo: u64,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_echoed: u64,
    pub rtt: RttStats,
    /// Connections opened again (`--reconnect`).
    pub reconnects: u64,
    /// Messages sent again after the server ended a connection before
    /// echoing any of them (`--reconnect`).
    pub resent: u64,
    /// When the last echo (or the failure that ended the connection) came.
    pub echoing_ended: Option<Instant>,
    /// Connect times (the event-loop engine).
    pub connect: RttStats,
    /// Connections that could not connect, by the cause of their last attempt.
    pub connect_failures: std::collections::BTreeMap<String, u64>,
    /// With `--rate`: echoes made due, those sent over
    /// `LATE_AFTER` after their time, the latest one's lateness, and
    /// those never sent because the run ended first.
    pub scheduled: u64,
    pub late: u64,
    pub most_late: Duration,
    pub unsent: u64,
    /// Of `late`, the echoes that waited for a free connection (every one
    /// had an echo out), rather than for the loop itself.
    pub late_for_connection: u64,
    /// Of `late`, the echoes that found a connection free but waited for a
    /// buffer: the loop had as many `--size` messages out as the memory
    /// check counted.
    pub late_for_buffer: u64,
    /// With `--rate`: the echoes due and never sent, or still out when
    /// their wait ran out, each with the time it had waited by then (a
    /// lower bound of its round trip). Kept apart from `rtt`, whose p99
    /// sets the patience at a stop and at the end.
    pub lower_bounds: RttStats,
}

impl ConnectionTally {
    /// The tally of a run whose target did not resolve: one error.
    pub fn resolve_failed() -> Self {
        ConnectionTally {
            errors: 1,
            ..Self::default()
        }
    }

    pub(super) fn count(&mut self, kind: &FailureKind) {
        if kind.is_timeout() {
            self.timed_out += 1;
        } else if kind.is_mismatch() {
            self.mismatched += 1;
        } else if kind.is_closed_before_echo() {
            self.closed_before_echo += 1;
        } else {
            self.errors += 1;
        }
    }
}

/// Where a connection's messages come from.
pub(super) trait Messages {
    /// Puts message `seq` into `buf` and returns true, or returns false when
    /// there are no more (count reached, end of input, or stopped).
    fn next(&mut self, seq: u64, buf: &mut Vec<u8>) -> Result<bool, FailureKind>;
}

/// Lines of input, read on a background thread (see [`read_lines_in_background`]).
pub(super) struct LineMessages<'a> {
    lines: Receiver<io::Result<Vec<u8>>>,
    stop: &'a StopHandle,
}

impl<'a> LineMessages<'a> {
    pub fn new(lines: Receiver<io::Result<Vec<u8>>>, stop: &'a StopHandle) -> Self {
        LineMessages { lines, stop }
    }
}

impl Messages for LineMessages<'_> {
    fn next(&mut self, _seq: u64, buf: &mut Vec<u8>) -> Result<bool, FailureKind> {
        if self.stop.is_stopped() {
            return Ok(false);
        }
        let stop: &Receiver<Infallible> = self.stop.receiver();
        select! {
            recv(self.lines) -> line => match line {
                Ok(Ok(line)) => {
                    *buf = line;
                    Ok(true)
                }
                Ok(Err(error)) => Err(FailureKind::Input { error }),
                // The reader thread hung up: end of input.
                Err(_) => Ok(false),
            },
            // Only ever a disconnection: stopped.
            recv(stop) -> _ => Ok(false),
        }
    }
}

/// Reads `input` line by line (bytes, line endings kept, so no line is empty)
/// on its own thread.
pub(super) fn read_lines_in_background<R: BufRead + Send + 'static>(
    mut input: R,
) -> Receiver<io::Result<Vec<u8>>> {
    // Room for one line: reading runs ahead of the echoes by at most one line.
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name("echo-client-input".into())
        .spawn(move || {
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                // One byte past the limit tells a line that is too long.
                let mut bounded = (&mut input).take(MAX_MESSAGE as u64 + 1 - line.len() as u64);
                let result = match bounded.read_until(b'\n', &mut line) {
                    // End of input; a last line without newline was sent already.
                    Ok(0) => break,
                    Ok(_) if line.len() > MAX_MESSAGE => Err(io::Error::other(format!(
                        "line {} is longer than {} MiB",
                        number + 1,
                        MAX_MESSAGE >> 20
                    ))),
                    Ok(_) => {
                        number += 1;
                        Ok(std::mem::take(&mut line))
                    }
                    // A signal arrived: keep what was read and read on.
                    Err(error) if interrupted(&error) => continue,
                    Err(error) => Err(error),
                };
                let failed = result.is_err();
                if sender.send(result).is_err() || failed {
                    // The echo loop is gone, or the input broke: nothing more to do.
                    break;
                }
            }
        });
    if let Err(error) = spawned {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        // The receiver is right here, so this send cannot fail.
        let _ = sender.send(Err(error));
        return receiver;
    }
    receiver
}

/// Connects, then echoes until `messages` runs out, the stop handle fires or
/// the connection breaks. A mismatch does not end the connection: the right
/// number of bytes came back, so the stream is still in step.
///
/// With [`Context::reconnect`], a connection that the server ends or that
/// breaks is opened again and the echoes go on (see
/// [`reconnect`](super::reconnect) for the rule); only a reconnect that
/// cannot connect ends it.
pub(super) fn run_connection<F>(
    context: &Context<'_, F>,
    connection: usize,
    messages: &mut dyn Messages,
) -> ConnectionTally
where
    F: Fn(&Event<'_>) + Sync,
{
    let mut tally = ConnectionTally::default();
    let first = match Socket::connect(context.addrs, context.timeout, context.stop) {
        Ok(socket) => socket,
        Err(kind) => {
            context.fail(connection, &mut tally, kind);
            tally.echoing_ended = Some(Instant::now());
            return tally;
        }
    };
    let mut peer = first.peer;
    (context.observer)(&Event::Connected { connection, peer });
    // `None` only with --reconnect, between letting one go and the next.
    let mut socket = Some(first);
    // Only with --reconnect: why the connection was let go, the pauses
    // between reconnects, and whether the current one echoed anything.
    let mut why = Reconnect::Failed;
    let mut backoff = Backoff::new();
    let mut productive = false;
    // The last echo's end (or the connect's, before any): the run's time
    // ends there, not after a pause, a wait for input or a stop that follows.
    let mut last_echo_ended = Instant::now();
    let mut message = Vec::new();
    let mut echo = Vec::new();
    let mut last_seq = 0;
    let in_step = 'messages: loop {
        let seq = last_seq + 1;
        match messages.next(seq, &mut message) {
            Ok(true) => last_seq = seq,
            Ok(false) => break true,
            Err(kind) => {
                context.fail(connection, &mut tally, kind);
                break false;
            }
        }
        // One byte of room past the echo: a read that fills it shows, with
        // no extra syscall, that the server sent more than it was sent.
        if let Err(kind) = resize(&mut echo, message.len() + 1) {
            context.fail(connection, &mut tally, kind);
            break false;
        }
        // Sent once however often it goes: one echo is due.
        let mut counted = false;
        // Since when, and over how many connections, this message has
        // waited for a connection that takes it (--reconnect).
        let mut waiting: Option<(Instant, u64)> = None;
        loop {
            if context.reconnect {
                if let Some(open) = &socket
                    && let Some(reason) =
                        ended_while_idle(context, connection, open, seq, &mut tally)
                {
                    why = reason;
                    let (_, connections) = waiting.get_or_insert((Instant::now(), 0));
                    *connections += 1;
                    socket = None;
                }
                if socket.is_none() {
                    if let Some((since, connections)) = waiting
                        && since.elapsed() >= context.timeout
                    {
                        // Every connection ended before taking it, for a
                        // whole timeout: it fails, and the next one goes on.
                        if !counted {
                            tally.sent += 1;
                        }
                        let kind = FailureKind::NeverTaken {
                            seq,
                            peer,
                            connections,
                            after: context.timeout,
                        };
                        context.fail(connection, &mut tally, kind);
                        why = Reconnect::Failed;
                        last_echo_ended = Instant::now();
                        continue 'messages;
                    }
                    match reconnect(
                        context.addrs,
                        context.timeout,
                        context.stop,
                        &mut backoff,
                        productive,
                    ) {
                        Ok(open) => {
                            tally.reconnects += 1;
                            productive = false;
                            peer = open.peer;
                            (context.observer)(&Event::Reconnected {
                                connection,
                                peer: open.peer,
                                why,
                            });
                            socket = Some(open);
                        }
                        Err(failure) => {
                            // The server never took this message: as if it
                            // had never been sent.
                            if counted {
                                tally.sent -= 1;
                            }
                            match failure {
                                Some(kind) => {
                                    context.fail(connection, &mut tally, kind);
                                    break 'messages false;
                                }
                                // Stopped: nothing is lost.
                                None => break 'messages true,
                            }
                        }
                    }
                }
            }
            let open = socket.as_mut().expect(
                "a connection is open: only --reconnect lets one go, and it opens another first",
            );
            if counted {
                tally.resent += 1;
            } else {
                tally.sent += 1;
                counted = true;
            }
            let (trip, ended) = round_trip(
                context, connection, open, seq, &message, &mut echo, &mut tally,
            );
            last_echo_ended = ended;
            match trip {
                RoundTrip::InStep => {
                    productive = true;
                    continue 'messages;
                }
                RoundTrip::Declined => {
                    why = Reconnect::Declined { seq };
                    let (_, connections) = waiting.get_or_insert((Instant::now(), 0));
                    *connections += 1;
                    socket = None;
                }
                RoundTrip::Broken if context.reconnect => {
                    why = Reconnect::Failed;
                    socket = None;
                    continue 'messages;
                }
                RoundTrip::Broken => break 'messages false,
            }
        }
    };
    // A failure ends the connection when it happens.
    tally.echoing_ended = Some(if in_step {
        last_echo_ended
    } else {
        Instant::now()
    });
    if let (true, Some(socket)) = (in_step, socket.as_mut()) {
        let wait = if context.stop.is_stopped() {
            MIN_CLOSING_WAIT.min(context.timeout)
        } else {
            patience(&tally.rtt, MIN_CLOSING_WAIT, context.timeout)
        };
        match socket.read_until_closed(wait, context.stop) {
            Ok(0) => {}
            Ok(bytes) => context.fail(
                connection,
                &mut tally,
                FailureKind::Extra {
                    after_seq: last_seq,
                    peer: socket.peer,
                    bytes,
                },
            ),
            Err(error) => context.fail(
                connection,
                &mut tally,
                FailureKind::Closing {
                    peer: socket.peer,
                    error,
                },
            ),
        }
    }
    tally
}

/// With `--reconnect`, before a message: why to let `socket` go, if the
/// server ended it, broke it or sent bytes on it since the last echo (the
/// last two are failures, reported here).
fn ended_while_idle<F>(
    context: &Context<'_, F>,
    connection: usize,
    socket: &Socket,
    seq: u64,
    tally: &mut ConnectionTally,
) -> Option<Reconnect>
where
    F: Fn(&Event<'_>) + Sync,
{
    let kind = match idle_state(&socket.stream) {
        Idle::Open => return None,
        Idle::Closed => return Some(Reconnect::Closed),
        Idle::Extra(bytes) => FailureKind::Extra {
            after_seq: seq - 1,
            peer: socket.peer,
            bytes,
        },
        Idle::Broken(error) => FailureKind::Dropped {
            after_seq: seq - 1,
            peer: socket.peer,
            error,
        },
    };
    context.fail(connection, tally, kind);
    Some(Reconnect::Failed)
}

/// How one round trip left the connection.
enum RoundTrip {
    /// The echo came back whole, exact or not: the stream is in step.
    InStep,
    /// With `--reconnect`: the server ended the connection before any byte
    /// of the echo came back, so it never took the message.
    Declined,
    /// A failure, already reported, left the stream out of step or gone.
    Broken,
}

/// Sends `message` as echo `seq` on `socket` and checks what comes back,
/// reporting the echo or its failure. Returns how that left the connection
/// and when the round trip ended.
fn round_trip<F>(
    context: &Context<'_, F>,
    connection: usize,
    socket: &mut Socket,
    seq: u64,
    message: &[u8],
    echo: &mut [u8],
    tally: &mut ConnectionTally,
) -> (RoundTrip, Instant)
where
    F: Fn(&Event<'_>) + Sync,
{
    let started = Instant::now();
    let mut written = 0;
    let limit = RoundTripLimit::new(started, context.timeout, context.stop, &tally.rtt);
    let exchanged = socket.exchange(message, echo, limit, &mut written);
    let rtt = started.elapsed();
    let ended = started + rtt;
    tally.bytes_sent += written as u64;
    // The socket timeouts may overshoot the deadline by a few
    // milliseconds; the round trip's own clock decides.
    let exchanged = exchanged.and_then(|more| {
        if rtt > context.timeout {
            Err(ExchangeError::TimedOut {
                received: message.len(),
            })
        } else {
            Ok(more)
        }
    });
    let more = match exchanged {
        Ok(more) => more,
        // The drain guarantee: an end of stream before any byte of the echo
        // means the server never took the message.
        Err(ExchangeError::Closed { received: 0 }) if context.reconnect => {
            return (RoundTrip::Declined, ended);
        }
        Err(error) => {
            let kind =
                error.into_failure(seq, socket.peer, context.timeout, message.len(), written);
            context.fail(connection, tally, kind);
            // The stream is out of step (or gone): this connection is done.
            return (RoundTrip::Broken, ended);
        }
    };
    let echo = &echo[..message.len()];
    tally.bytes_echoed += echo.len() as u64;
    match first_difference(message, echo) {
        None => {
            tally.echoed += 1;
            tally.rtt.record(rtt);
            (context.observer)(&Event::Echoed {
                connection,
                seq,
                rtt,
                message,
            });
        }
        Some(offset) => {
            let kind = FailureKind::Mismatch {
                seq,
                peer: socket.peer,
                len: message.len(),
                offset,
                sent: message[offset],
                got: echo[offset],
            };
            context.fail(connection, tally, kind);
        }
    }
    // Only this echo was due, so a byte that came with it was never
    // sent: a server that repeats itself would otherwise pass with a
    // repeated message. Past the inline limit, a byte written after the
    // echo can miss the spare byte, and one FIONREAD costs nothing next
    // to such a message.
    let extra = if more {
        Some(1 + unread_len(&socket.stream).unwrap_or(0))
    } else if message.len() > INLINE_WRITE_LIMIT {
        unread_len(&socket.stream).filter(|&bytes| bytes > 0)
    } else {
        None
    };
    if let Some(bytes) = extra {
        let kind = FailureKind::Extra {
            after_seq: seq,
            peer: socket.peer,
            bytes,
        };
        context.fail(connection, tally, kind);
        return (RoundTrip::Broken, ended);
    }
    (RoundTrip::InStep, ended)
}

impl<F> Context<'_, F>
where
    F: Fn(&Event<'_>) + Sync,
{
    /// Counts `kind` in `tally` and reports it to the observer.
    fn fail(&self, connection: usize, tally: &mut ConnectionTally, kind: FailureKind) {
        tally.count(&kind);
        let failure = Failure {
            connection: self.multiple.then_some(connection),
            kind,
        };
        (self.observer)(&Event::Failed(&failure));
    }
}

/// Makes `buf` `len` bytes long, or says that memory ran out (under
/// `ulimit -v`, say) instead of aborting the process.
fn resize(buf: &mut Vec<u8>, len: usize) -> Result<(), FailureKind> {
    let more = len.saturating_sub(buf.len());
    if buf.try_reserve_exact(more).is_err() {
        return Err(FailureKind::OutOfMemory { bytes: len });
    }
    buf.resize(len, 0);
    Ok(())
}

fn first_difference(sent: &[u8], echoed: &[u8]) -> Option<usize> {
    if sent == echoed {
        return None;
    }
    sent.iter().zip(echoed).position(|(a, b)| a != b)
}

/// Why a round trip did not complete.
pub(super) enum ExchangeError {
    /// The deadline passed with `received` bytes of the echo back.
    TimedOut {
        received: usize,
    },
    Closed {
        received: usize,
    },
    /// The run was stopped and the echo still had not come back.
    Stopped {
        received: usize,
    },
    /// A socket error (such as a reset) with `received` bytes of the echo back.
    Io {
        error: io::Error,
        received: usize,
    },
}

impl ExchangeError {
    pub(super) fn io(error: io::Error, received: usize) -> Self {
        ExchangeError::Io { error, received }
    }

    /// The failure of echo `seq` of a `len`-byte message of which `sent`
    /// bytes were written.
    pub(super) fn into_failure(
        self,
        seq: u64,
        peer: SocketAddr,
        timeout: Duration,
        len: usize,
        sent: usize,
    ) -> FailureKind {
        match self {
            ExchangeError::TimedOut { received } => FailureKind::TimedOut {
                seq,
                peer,
                after: timeout,
                sent,
                received,
                len,
            },
            ExchangeError::Closed { received } => FailureKind::Closed {
                seq,
                peer,
                received,
                len,
            },
            ExchangeError::Stopped { received } => FailureKind::Stopped {
                seq,
                peer,
                sent,
                received,
                len,
            },
            // A peer that closes while we still write shows up as EPIPE or
            // a reset; say so plainly.
            ExchangeError::Io { error, received } => FailureKind::Io {
                seq,
                peer,
                error,
                received,
                len,
            },
        }
    }
}

/// A connected blocking socket and the timeouts currently set on it.
pub(super) struct Socket {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Socket {
    /// Tries each address in turn, all within one `timeout`. As Go's dialer
    /// does, each gets an equal share of the time still left, but at least
    /// [`MIN_CONNECT_SHARE`] (or all that is left): an address that never
    /// answers leaves time for the next, and a share is long enough to
    /// outlast one lost SYN (Linux resends it after 1 s).
    ///
    /// Once `stop` fires, an address that has not answered gets
    /// [`FIRST_ECHO_STOP_PATIENCE`] more, as a first echo would, and the
    /// addresses after it are not tried.
    pub fn connect(
        addrs: &[SocketAddr],
        timeout: Duration,
        stop: &StopHandle,
    ) -> Result<Socket, FailureKind> {
        let deadline = deadline_after(Instant::now(), timeout);
        let mut attempts = Vec::new();
        let mut stop_seen = None;
        for (at, &addr) in addrs.iter().enumerate() {
            // The first try has the whole timeout, exactly, so that its
            // message names the figure the user gave.
            let left = if at == 0 {
                timeout
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            if left.is_zero() && !attempts.is_empty() {
                // Out of time; the addresses not tried are not named.
                break;
            }
            let untried = u32::try_from(addrs.len() - at).unwrap_or(u32::MAX);
            let share = (left / untried).max(MIN_CONNECT_SHARE.min(left));
            match connect_one(addr, share, stop, &mut stop_seen) {
                Ok(stream) => {
                    // Echoes are small and latency-bound; without this, Nagle
                    // would hold back a message's tail.
                    if let Err(error) = stream.set_nodelay(true) {
                        attempts.push((addr, error));
                        return Err(FailureKind::Connect { attempts });
                    }
                    return Ok(Socket {
                        stream,
                        peer: addr,
                        read_timeout: None,
                        write_timeout: None,
                    });
                }
                Err(ConnectError::Failed(error)) if is_timeout(&error) => {
                    attempts.push((addr, timed_out_after(whole_millis(share))));
                }
                Err(ConnectError::Failed(error)) => attempts.push((addr, error)),
                Err(ConnectError::Stopped { waited }) => {
                    let waited = humantime::format_duration(whole_millis(waited));
                    let error = io::Error::other(format!(
                        "no answer after {waited}, and the run was stopped"
                    ));
                    attempts.push((addr, error));
                    break;
                }
            }
        }
        Err(FailureKind::Connect { attempts })
    }

    /// Says the client is done (half-close), then counts the bytes the
    /// server still sends until it closes or `wait` runs out, or
    /// [`MIN_CLOSING_WAIT`] after `stop` fires.
    ///
    /// # Errors
    /// A socket error other than the server going away (a reset after the
    /// last echo is a normal end: the echoes are all in by then).
    fn read_until_closed(&mut self, wait: Duration, stop: &StopHandle) -> io::Result<usize> {
        match self.stream.shutdown(Shutdown::Write) {
            // Reset already; what it sent before the reset is still queued.
            Err(error) if is_peer_gone(&error) => {}
            other => other?,
        }
        let mut deadline = deadline_after(Instant::now(), wait);
        let mut cut_short = false;
        let mut extra = 0;
        let mut buf = [0u8; 4096];
        while let Ok(left) = time_left(deadline, 0) {
            let left = left.min(STOP_CHECK);
            if !cut_short && stop.is_stopped() {
                cut_short = true;
                deadline = deadline.min(deadline_after(Instant::now(), MIN_CLOSING_WAIT));
            }
            if needs_reset(self.read_timeout, left) {
                self.stream.set_read_timeout(Some(left))?;
                self.read_timeout = Some(left);
            }
            match (&self.stream).read(&mut buf) {
                Ok(0) => break,
                Ok(read) => extra += read,
                // A signal arrived: retry.
                Err(error) if interrupted(&error) => {}
                // The socket timeout ran out; the loop checks the real deadline.
                Err(error) if is_timeout(&error) => {}
                // Gone after the last echo: a normal end.
                Err(error) if is_peer_gone(&error) => break,
                Err(error) => return Err(error),
            }
        }
        Ok(extra)
    }

    /// Sends `message` and reads its echo into `echo` (one byte longer)
    /// within `limit`, counting in `sent` the bytes written, also when it
    /// fails. True if the server sent at least one byte more than the echo.
    fn exchange(
        &mut self,
        message: &[u8],
        echo: &mut [u8],
        mut limit: RoundTripLimit<'_>,
        sent: &mut usize,
    ) -> Result<bool, ExchangeError> {
        if message.len() <= INLINE_WRITE_LIMIT {
            write_all_by(
                &self.stream,
                message,
                &mut limit,
                &mut self.write_timeout,
                sent,
            )?;
            return read_echo_by(&self.stream, echo, &mut limit, &mut self.read_timeout);
        }
        self.stream
            .set_nonblocking(true)
            .map_err(|error| ExchangeError::io(error, 0))?;
        let exchanged = interleave(&self.stream, message, echo, &mut limit, sent);
        // Back to blocking for the next small message and the closing check;
        // if that fails, the connection cannot go on anyway. (Only looked at
        // when the exchange went through, so the whole echo is back.)
        let restored = self
            .stream
            .set_nonblocking(false)
            .map_err(|error| ExchangeError::io(error, echo.len() - 1));
        exchanged.and_then(|more| restored.map(|()| more))
    }
}

/// Writes `message` and reads its echo into `echo` (one byte longer, as for
/// [`read_echo_by`]) on a nonblocking socket, moving whichever direction can
/// move and waiting in poll(2) for either when neither can, within `limit`.
/// `sent` counts the bytes written. True if a byte more than the echo came.
fn interleave(
    mut stream: &TcpStream,
    message: &[u8],
    echo: &mut [u8],
    limit: &mut RoundTripLimit<'_>,
    sent: &mut usize,
) -> Result<bool, ExchangeError> {
    let len = echo.len() - 1;
    let mut received = 0;
    // Both directions finish: a server that adds bytes can fill the echo
    // early, and the rest of the message must still go out.
    while received < len || *sent < message.len() {
        // Checked on every pass, so a server that trickles cannot stretch it.
        let wait = limit.next_wait(received)?;
        let mut moved = false;
        if *sent < message.len() {
            match stream.write(&message[*sent..]) {
                Ok(0) => {
                    return Err(ExchangeError::io(io::ErrorKind::WriteZero.into(), received));
                }
                Ok(written) => {
                    *sent += written;
                    moved = true;
                }
                // A signal arrived, or the send buffer is full: go on reading.
                Err(error) if interrupted(&error) || would_block(&error) => {}
                Err(error) => return Err(ExchangeError::io(error, received)),
            }
        }
        if received < len {
            match stream.read(&mut echo[received..]) {
                // The server closed before echoing everything.
                Ok(0) => return Err(ExchangeError::Closed { received }),
                Ok(read) => {
                    received += read;
                    moved = true;
                }
                // A signal arrived, or nothing has come back yet.
                Err(error) if interrupted(&error) || would_block(&error) => {}
                Err(error) => return Err(ExchangeError::io(error, received)),
            }
        }
        if !moved {
            wait_for(stream, received < len, *sent < message.len(), wait)
                .map_err(|error| ExchangeError::io(error, received))?;
        }
    }
    Ok(received > len)
}

/// Why one address did not connect.
enum ConnectError {
    /// Refused, unreachable, timed out and the like.
    Failed(io::Error),
    /// The run was stopped, and the address stayed silent for the patience
    /// after it; `waited` is how long the attempt had lasted.
    Stopped { waited: Duration },
}

/// Connects to `addr` within `limit`: what `TcpStream::connect_timeout`
/// does (a nonblocking connect, then poll(2) for writability), but in waits
/// of at most [`STOP_CHECK`] so that a stop is seen. After the stop, which
/// `stop_seen` remembers across a connection's addresses, the attempt gets
/// [`FIRST_ECHO_STOP_PATIENCE`] more.
fn connect_one(
    addr: SocketAddr,
    limit: Duration,
    stop: &StopHandle,
    stop_seen: &mut Option<Instant>,
) -> Result<TcpStream, ConnectError> {
    let began = Instant::now();
    let deadline = deadline_after(began, limit);
    let stream = mio::net::TcpStream::connect(addr).map_err(ConnectError::Failed)?;
    loop {
        let now = Instant::now();
        // Past the deadline, one last look without waiting.
        let mut wait = deadline.saturating_duration_since(now).min(STOP_CHECK);
        if stop.is_stopped() {
            let since = *stop_seen.get_or_insert(now);
            let patience_left = FIRST_ECHO_STOP_PATIENCE.saturating_sub(now - since);
            if patience_left.is_zero() {
                return Err(ConnectError::Stopped {
                    waited: now - began,
                });
            }
            wait = wait.min(patience_left);
        }
        let revents = poll_for(&stream, libc::POLLOUT, wait).map_err(ConnectError::Failed)?;
        if let Some(error) = stream.take_error().map_err(ConnectError::Failed)? {
            return Err(ConnectError::Failed(error));
        }
        if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            // As std's connect_timeout: a hang-up that left no error behind.
            return Err(ConnectError::Failed(io::Error::other(
                "the connection was closed while connecting",
            )));
        }
        if revents & libc::POLLOUT != 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ConnectError::Failed(io::ErrorKind::TimedOut.into()));
        }
    }
    let stream = TcpStream::from(stream);
    stream
        .set_nonblocking(false)
        .map_err(ConnectError::Failed)?;
    Ok(stream)
}

/// Waits until `stream` is readable if `reading`, or writable if `writing`,
/// for at most `left`.
///
/// # Errors
/// poll's own error.
fn wait_for(stream: &TcpStream, reading: bool, writing: bool, left: Duration) -> io::Result<()> {
    let mut events = 0;
    if reading {
        events |= libc::POLLIN;
    }
    if writing {
        events |= libc::POLLOUT;
    }
    // Readiness, an error or a hang-up: the next read or write says which.
    poll_for(stream, events, left).map(|_revents| ())
}

/// poll(2) on one socket for `events`, for at most `left`. Returns the
/// events that came (none after a timeout or a signal).
///
/// # Errors
/// poll's own error; a signal is not one (the caller's loop tries again).
fn poll_for(
    socket: &impl AsRawFd,
    events: libc::c_short,
    left: Duration,
) -> io::Result<libc::c_short> {
    let mut pollfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // Rounded up, so that a wait under a millisecond does not spin.
    let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    // SAFETY: `pollfd` is one valid, initialised pollfd that outlives the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if !interrupted(&error) {
            return Err(error);
        }
        return Ok(0);
    }
    Ok(pollfd.revents)
}

/// Writes all of `buf` within `limit`, counting in `sent` the bytes written.
fn write_all_by(
    mut stream: &TcpStream,
    mut buf: &[u8],
    limit: &mut RoundTripLimit<'_>,
    timeout_set: &mut Option<Duration>,
    sent: &mut usize,
) -> Result<(), ExchangeError> {
    while !buf.is_empty() {
        // Writing comes first: nothing of the echo has been read yet.
        let left = limit.next_wait(0)?;
        if needs_reset(*timeout_set, left) {
            stream
                .set_write_timeout(Some(left))
                .map_err(|error| ExchangeError::io(error, 0))?;
            *timeout_set = Some(left);
        }
        match stream.write(buf) {
            Ok(0) => return Err(ExchangeError::io(io::ErrorKind::WriteZero.into(), 0)),
            Ok(written) => {
                buf = &buf[written..];
                *sent += written;
            }
            // A signal arrived: retry.
            Err(error) if interrupted(&error) => {}
            // The socket timeout ran out; the loop checks the real deadline.
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(ExchangeError::io(error, 0)),
        }
    }
    Ok(())
}

/// Fills all but the last byte of `buf` within `limit`. The last byte is
/// room for one more, read along with the echo when the server sent more
/// than it was sent: true then.
fn read_echo_by(
    mut stream: &TcpStream,
    buf: &mut [u8],
    limit: &mut RoundTripLimit<'_>,
    timeout_set: &mut Option<Duration>,
) -> Result<bool, ExchangeError> {
    let len = buf.len() - 1;
    let mut filled = 0;
    while filled < len {
        let left = limit.next_wait(filled)?;
        if needs_reset(*timeout_set, left) {
            stream
                .set_read_timeout(Some(left))
                .map_err(|error| ExchangeError::io(error, filled))?;
            *timeout_set = Some(left);
        }
        match stream.read(&mut buf[filled..]) {
            // The server closed before echoing everything.
            Ok(0) => return Err(ExchangeError::Closed { received: filled }),
            Ok(read) => filled += read,
            // A signal arrived: retry.
            Err(error) if interrupted(&error) => {}
            // The socket timeout ran out; the loop checks the real deadline.
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(ExchangeError::io(error, filled)),
        }
    }
    Ok(filled > len)
}

/// When a round trip must end: at its deadline, or once the run has been
/// stopped for as long as a server that answers would take ([`patience`]).
/// Waits are cut into slices of at most [`STOP_CHECK`] so that a stop is
/// seen while the server is silent; the stop handle is looked at only once
/// the round trip has lasted a slice, so a prompt echo costs nothing more.
struct RoundTripLimit<'a> {
    started: Instant,
    deadline: Instant,
    stop: &'a StopHandle,
    /// The connection's round trips so far, for the patience after a stop.
    rtt: &'a RttStats,
    timeout: Duration,
    /// When the round trip found the run stopped, or last saw more of the
    /// echo after that, and how much of it had come by then.
    stop_seen: Option<(Instant, usize)>,
}

impl<'a> RoundTripLimit<'a> {
    /// The limit of a round trip that began at `started`.
    fn new(started: Instant, timeout: Duration, stop: &'a StopHandle, rtt: &'a RttStats) -> Self {
        RoundTripLimit {
            started,
            deadline: deadline_after(started, timeout),
            stop,
            rtt,
            timeout,
            stop_seen: None,
        }
    }

    /// How long the next wait may block: until the deadline, but at most
    /// [`STOP_CHECK`]. Past the deadline, a timeout, and once stopped for
    /// long enough, a stop, each with `received` bytes of the echo back.
    fn next_wait(&mut self, received: usize) -> Result<Duration, ExchangeError> {
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(ExchangeError::TimedOut { received });
        }
        if now.duration_since(self.started) >= STOP_CHECK && self.stop.is_stopped() {
            // Counted from the stop, or from the last bytes of the echo
            // since: an echo still coming back is not cut off.
            let since = match self.stop_seen {
                Some((at, before)) if received == before => at,
                _ => {
                    self.stop_seen = Some((now, received));
                    now
                }
            };
            let patience = patience(self.rtt, FIRST_ECHO_STOP_PATIENCE, self.timeout);
            if now.duration_since(since) >= patience {
                return Err(ExchangeError::Stopped { received });
            }
        }
        Ok(left.min(STOP_CHECK))
    }
}

/// How long a server that answers may still take: twice the connection's
/// p99 round trip so far (`unmeasured` before its first echo), at least
/// [`MIN_CLOSING_WAIT`], at most `timeout`.
pub(super) fn patience(rtt: &RttStats, unmeasured: Duration, timeout: Duration) -> Duration {
    rtt.percentile(0.99)
        .map_or(unmeasured, |p99| p99 * 2)
        .max(MIN_CLOSING_WAIT)
        .min(timeout)
}

/// The time left before `deadline`; past it, a timeout with `received`
/// bytes of the echo back.
fn time_left(deadline: Instant, received: usize) -> Result<Duration, ExchangeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ExchangeError::TimedOut { received })
    } else {
        Ok(left)
    }
}

/// True unless the socket timeout already set is within slack of `left`.
fn needs_reset(set: Option<Duration>, left: Duration) -> bool {
    set.is_none_or(|set| set.abs_diff(left) > TIMEOUT_SLACK)
}

/// Blocking sockets report an expired timeout as `WouldBlock` on Unix and
/// `TimedOut` on Windows.
fn is_timeout(error: &io::Error) -> bool {
    would_block(error) || error.kind() == io::ErrorKind::TimedOut
}

/// `duration` to the nearest millisecond, for messages (the share of a
/// timeout is a few microseconds short of a round figure); shorter ones
/// stay as they are.
pub(super) fn whole_millis(duration: Duration) -> Duration {
    if duration < Duration::from_millis(1) {
        return duration;
    }
    let millis = (duration.as_nanos() + 500_000) / 1_000_000;
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

pub(super) fn timed_out_after(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("timed out after {}", humantime::format_duration(timeout)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Every call below is bounded: the connect completes before the accept,
    /// the poll and the reads have timeouts.
    const LIMIT: Duration = Duration::from_secs(5);

    /// Ends `stream` with a reset instead of a FIN.
    fn reset(stream: TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        crate::socket::set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
            .expect("SO_LINGER on a connected socket");
    }

    /// A loopback listener whose accept queue is full, so that a connect
    /// to it gets no answer (Linux drops the SYN); and the connections that
    /// fill it, held open.
    fn unanswering_listener() -> (TcpListener, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        // SAFETY: listen on a socket we own; only its backlog changes.
        let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
        let addr = listener.local_addr().expect("bound address");
        let mut held = Vec::new();
        while held.len() < 16 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => held.push(stream),
                Err(error) if is_timeout(&error) => return (listener, held),
                Err(error) => panic!("filling the accept queue: {error}"),
            }
        }
        panic!("16 connections did not fill an accept queue of backlog 0");
    }

    fn connect_error(addrs: &[SocketAddr], timeout: Duration, stop: &StopHandle) -> String {
        match Socket::connect(addrs, timeout, stop) {
            Ok(socket) => panic!("connected to {}", socket.peer),
            Err(kind) => Failure {
                connection: None,
                kind,
            }
            .to_string(),
        }
    }

    #[test]
    fn an_address_that_never_answers_leaves_time_for_the_next() {
        let (silent, _held) = unanswering_listener();
        let silent = silent.local_addr().expect("bound address");
        let working = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let working = working.local_addr().expect("bound address");
        // Each gets half of 5 s, more than the 2 s minimum.
        let socket = Socket::connect(
            &[silent, working],
            Duration::from_secs(5),
            &StopHandle::new(),
        )
        .unwrap_or_else(|kind| panic!("{kind:?}"));
        assert_eq!(socket.peer, working);
    }

    #[test]
    fn a_short_timeout_goes_to_the_first_address_whole() {
        let (silent, _held) = unanswering_listener();
        let silent = silent.local_addr().expect("bound address");
        // Under the 2 s minimum share: the first address takes it all, and
        // the message names it, not the address never tried.
        assert_eq!(
            connect_error(
                &[silent, silent],
                Duration::from_millis(300),
                &StopHandle::new()
            ),
            format!("cannot connect to {silent}: timed out after 300ms")
        );
    }

    #[test]
    fn a_stop_ends_a_connect_that_gets_no_answer_and_tries_no_further_address() {
        let (silent, _held) = unanswering_listener();
        let silent = silent.local_addr().expect("bound address");
        let working = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let working = working.local_addr().expect("bound address");
        let stop = StopHandle::new();
        let began = Instant::now();
        let message = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                stop.stop();
            });
            // 15 s for each address; the call is bounded by the 30 s.
            connect_error(&[silent, working], Duration::from_secs(30), &stop)
        });
        let took = began.elapsed();
        // The silent address gets a second after the stop, and the working
        // one is not tried: the run is over.
        let prefix = format!("cannot connect to {silent}: no answer after ");
        assert!(
            message.starts_with(&prefix) && message.ends_with(", and the run was stopped"),
            "expected {prefix:?}…, got {message:?}"
        );
        // At least the second of patience, and nowhere near the 15 s share,
        // with room for a loaded machine.
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "the connect took {took:?}"
        );
    }

    #[test]
    fn bytes_queued_before_a_reset_count_as_extra() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("bound address");
        let client = TcpStream::connect_timeout(&addr, LIMIT).expect("connect on loopback");
        let (mut server, _) = listener.accept().expect("the connection is queued");
        server.write_all(b"!!").expect("two bytes fit the buffer");
        reset(server);
        // Wait until the client's socket has seen the reset, so that its
        // own shutdown finds the connection gone.
        let mut pollfd = libc::pollfd {
            fd: client.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        let millis = LIMIT.as_millis() as i32;
        // SAFETY: one valid pollfd that outlives the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        assert_eq!(ready, 1, "the reset did not arrive within {LIMIT:?}");
        let mut socket = Socket {
            stream: client,
            peer: addr,
            read_timeout: None,
            write_timeout: None,
        };
        let extra = socket
            .read_until_closed(Duration::from_secs(1), &StopHandle::new())
            .expect("a reset after the echoes is a normal end");
        assert_eq!(extra, 2, "the two bytes sent before the reset");
    }
}
