//! A worker's UDP socket: the UDP side of the worker step, beside the
//! [connections](crate::server::connection) of the flow acceptor → channel → worker
//! → connection.
//!
//! UDP has no acceptor. Each worker owns one UDP socket bound to the port
//! with `SO_REUSEPORT`, so the kernel hashes each flow (source and
//! destination address and port) to one worker, and a worker echoes what it
//! reads in the order it read it: the server never reorders a flow. Each
//! datagram goes back whole to where it came from, unless the
//! [source guard](crate::server::source_guard) says it must not. Datagrams move in
//! [batches](crate::server::udp_batch) and are echoed from the buffers they arrived
//! in: no allocation and no copy per datagram.
//!
//! When the send buffer is full, the batch's remaining echoes wait for room
//! for [`SEND_PATIENCE`], with the socket's reading paused, and are then
//! dropped and counted. At the drain the socket stops taking datagrams,
//! echoes those already queued, and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;

use crate::error::{interrupted, io_cause, would_block};
use crate::log::{Logger, SharedThrottle, counted, preview};
use crate::server::config::LogLevel;
use crate::server::source_guard::{ForbiddenSource, SourceGuard, Verdict};
use crate::server::stats::WorkerCounters;
use crate::server::udp_batch::{BATCH, Batch};

/// How long echoes wait for room in a full send buffer before they are
/// dropped and counted. Meanwhile the socket is not read, so its receive
/// buffer fills and the kernel drops what arrives: the sender sees loss, and
/// nothing the server holds grows.
pub const SEND_PATIENCE: Duration = Duration::from_millis(100);

/// Batches taken in one turn before the worker serves its connections again.
const BATCHES_PER_TURN: usize = 8;

/// Receive errors in a row (other than "nothing waiting") after which the
/// socket waits for its next event instead of trying again at once.
const RECEIVE_RETRIES: u32 = 8;

/// What the UDP sockets of one server share: the source checks and the
/// counts behind the warnings, which go out at most once a second.
#[derive(Debug)]
pub(crate) struct UdpShared {
    pub(crate) guard: SourceGuard,
    refused_since_warning: AtomicU64,
    limited_since_warning: AtomicU64,
    refusal_warnings: SharedThrottle,
    send_warnings: SharedThrottle,
    receive_warnings: SharedThrottle,
}

impl UdpShared {
    pub(crate) fn new(guard: SourceGuard) -> Self {
        UdpShared {
            guard,
            refused_since_warning: AtomicU64::new(0),
            limited_since_warning: AtomicU64::new(0),
            refusal_warnings: SharedThrottle::new(),
            send_warnings: SharedThrottle::new(),
            receive_warnings: SharedThrottle::new(),
        }
    }
}

/// Where a worker's UDP socket stands after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Everything waiting was taken; the next readiness event brings more.
    Done,
    /// Datagrams may still be waiting: give the socket another turn soon.
    More,
    /// Echoes wait for room in the send buffer, until a writable event or
    /// [`UdpEcho::wake_at`].
    Blocked,
}

/// Why echoes were not sent, kept without formatting (a flood of failures
/// must not cost an allocation each) until a warning goes out.
#[derive(Debug, Clone, Copy)]
enum SendFailure {
    /// The kernel refused the echo to this peer.
    Refused {
        peer: Option<SocketAddr>,
        kind: std::io::ErrorKind,
        os_error: Option<i32>,
    },
    /// A datagram from this peer was longer than its buffer.
    Truncated { peer: SocketAddr },
    /// The send buffer stayed full past [`SEND_PATIENCE`].
    NoRoom,
    /// The drain's deadline came with echoes still waiting.
    Deadline,
}

impl std::fmt::Display for SendFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            SendFailure::Refused {
                peer,
                kind,
                os_error,
            } => {
                let err = match os_error {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::from(kind),
                };
                match peer {
                    Some(peer) => write!(f, "cannot echo to {peer}: {}", io_cause(&err)),
                    None => write!(f, "cannot echo: {}", io_cause(&err)),
                }
            }
            SendFailure::Truncated { peer } => {
                write!(f, "a datagram from {peer} did not fit its buffer")
            }
            SendFailure::NoRoom => write!(
                f,
                "the send buffer stayed full for {}",
                humantime::format_duration(SEND_PATIENCE)
            ),
            SendFailure::Deadline => write!(f, "the shutdown deadline came"),
        }
    }
}

/// One worker's UDP socket and its echoes in flight.
pub(crate) struct UdpEcho {
    socket: UdpSocket,
    batch: Batch,
    /// Indices into `batch` of the datagrams to echo, in arrival order.
    queue: [u8; BATCH],
    queued: usize,
    /// How many of `queue` have been sent.
    sent: usize,
    /// When the send buffer first had no room for the queue.
    blocked_since: Option<Instant>,
    shared: Arc<UdpShared>,
    /// Refused and rate-limited datagrams not yet added to the shared counts.
    refused_unreported: u64,
    limited_unreported: u64,
    /// One refused source, and one rate-limited one, for the next warning.
    refused_example: Option<(SocketAddr, ForbiddenSource)>,
    limited_example: Option<SocketAddr>,
    /// Echoes dropped since the last send warning, and the last cause.
    send_failures_unreported: u64,
    send_failure_example: Option<SendFailure>,
    /// Receive errors since the last successful receive.
    receive_errors: u32,
    /// Set at the drain: the socket takes no new datagrams.
    draining: bool,
    /// The drain has found the socket empty, or its deadline came: nothing
    /// more to do.
    finished: bool,
    /// The worker's counts, which this socket's UDP counts go into.
    counters: Arc<WorkerCounters>,
    logger: Logger,
}

impl UdpEcho {
    pub(crate) fn new(
        socket: UdpSocket,
        shared: Arc<UdpShared>,
        counters: Arc<WorkerCounters>,
        logger: Logger,
    ) -> Self {
        UdpEcho {
            socket,
            batch: Batch::new(),
            queue: [0; BATCH],
            queued: 0,
            sent: 0,
            blocked_since: None,
            shared,
            refused_unreported: 0,
            limited_unreported: 0,
            refused_example: None,
            limited_example: None,
            send_failures_unreported: 0,
            send_failure_example: None,
            receive_errors: 0,
            draining: false,
            finished: false,
            counters,
            logger,
        }
    }

    /// The socket, for registering it with the worker's event loop.
    pub(crate) fn socket_mut(&mut self) -> &mut UdpSocket {
        &mut self.socket
    }

    /// Whether the drain has echoed everything and the socket can close.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Reads and echoes what is waiting, a bounded amount per turn, after a
    /// readiness event (`readable`: whether it said there is input) or for a
    /// turn owed.
    pub(crate) fn on_ready(&mut self, readable: bool, now: Instant) -> Turn {
        if self.finished {
            return Turn::Done;
        }
        // Each echo sent frees send room, and with it comes a writable event
        // that brings nothing to read: only a wait for room needs it.
        if !readable && self.blocked_since.is_none() {
            return Turn::Done;
        }
        let mut turn = Turn::More;
        for _ in 0..BATCHES_PER_TURN {
            if self.flush(now) {
                turn = Turn::Blocked;
                break;
            }
            match self.batch.receive(&self.socket) {
                Ok(count) => {
                    self.receive_errors = 0;
                    self.admit(now);
                    // Short of a full batch, the queue was empty: a datagram
                    // arriving after the call brings an event of its own.
                    if count < BATCH {
                        turn = Turn::Done;
                        break;
                    }
                }
                // Nothing is waiting: the next event says when there is.
                Err(err) if would_block(&err) => {
                    self.receive_errors = 0;
                    turn = Turn::Done;
                    break;
                }
                // A signal landed; the datagrams are still there.
                Err(err) if interrupted(&err) => {}
                // Anything else (out of memory, say) is the socket's, not a
                // peer's: warn, and try again soon, since datagrams may still
                // be waiting with no event to come for them; after a few
                // failures in a row, wait for the next event.
                Err(err) => {
                    if self.shared.receive_warnings.pass(now) {
                        self.logger
                            .warn(format_args!("udp: cannot receive: {}", io_cause(&err)));
                    }
                    self.receive_errors += 1;
                    turn = if self.receive_errors < RECEIVE_RETRIES {
                        Turn::More
                    } else {
                        self.receive_errors = 0;
                        Turn::Blocked
                    };
                    break;
                }
            }
        }
        // The last batch of the turn may still be queued.
        if turn != Turn::Blocked && self.flush(now) {
            turn = Turn::Blocked;
        }
        self.report(now);
        // Only an empty socket ends the drain, never an error.
        if self.draining && turn == Turn::Done {
            self.finished = true;
        }
        turn
    }

    /// Checks each datagram of the new batch against the guard and queues
    /// those to echo.
    fn admit(&mut self, now: Instant) {
        self.queued = 0;
        self.sent = 0;
        let verbose = self.logger.enabled(LogLevel::Verbose);
        self.counters
            .udp_datagrams_received
            .add(self.batch.len() as u64);
        for index in 0..self.batch.len() {
            let Some(peer) = self.batch.peer(index) else {
                // Not IPv4 or IPv6: nothing this server can answer.
                self.refused_unreported += 1;
                continue;
            };
            if self.batch.is_truncated(index) {
                self.note_send_failure(1, SendFailure::Truncated { peer });
                continue;
            }
            let verdict = match self.batch.arrived_as_broadcast(index) {
                true => Verdict::Forbidden(ForbiddenSource::ToGroup),
                false => self
                    .shared
                    .guard
                    .check(peer, self.batch.destination(index), now),
            };
            match verdict {
                Verdict::Answer => {
                    if verbose {
                        let data = self.batch.payload(index);
                        self.logger.debug(format_args!(
                            "udp {peer} sent {}: \"{}\"",
                            counted(data.len() as u64, "byte"),
                            preview(data)
                        ));
                    }
                    self.queue[self.queued] = index as u8;
                    self.queued += 1;
                }
                Verdict::Forbidden(why) => {
                    self.refused_unreported += 1;
                    self.refused_example = Some((peer, why));
                }
                Verdict::RateLimited => {
                    self.limited_unreported += 1;
                    self.limited_example = Some(peer);
                }
            }
        }
    }

    /// Sends the queued echoes; true if the send buffer is full and some
    /// must wait for room.
    fn flush(&mut self, now: Instant) -> bool {
        while self.sent < self.queued {
            match self
                .batch
                .send(&self.socket, &self.queue[self.sent..self.queued])
            {
                Ok(count) if count > 0 => {
                    let bytes: usize = self.queue[self.sent..self.sent + count]
                        .iter()
                        .map(|&index| self.batch.payload(usize::from(index)).len())
                        .sum();
                    self.counters.udp_bytes_echoed.add(bytes as u64);
                    self.counters.udp_datagrams_echoed.add(count as u64);
                    self.sent += count;
                }
                // Nothing went and nothing was said: wait as for a full buffer.
                Ok(_) => return self.blocked(now),
                Err(err) if would_block(&err) => return self.blocked(now),
                // A signal landed before anything was sent: try again.
                Err(err) if interrupted(&err) => {}
                // The kernel refused this one echo (no route, a firewall, a
                // message too long for the path): drop it, send the rest.
                Err(err) => {
                    let peer = self.batch.peer(usize::from(self.queue[self.sent]));
                    self.sent += 1;
                    let failure = SendFailure::Refused {
                        peer,
                        kind: err.kind(),
                        os_error: err.raw_os_error(),
                    };
                    self.note_send_failure(1, failure);
                }
            }
        }
        self.blocked_since = None;
        false
    }

    fn blocked(&mut self, now: Instant) -> bool {
        self.blocked_since.get_or_insert(now);
        true
    }

    /// When the worker must wake for this socket: the end of the wait for
    /// send room.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.blocked_since.map(|since| since + SEND_PATIENCE)
    }

    /// Drops the waiting echoes once the wait for room is over; true if it
    /// did, and the socket should be read again.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        match self.wake_at() {
            Some(at) if at <= now => {
                self.drop_queue(SendFailure::NoRoom);
                self.report(now);
                true
            }
            _ => false,
        }
    }

    fn drop_queue(&mut self, why: SendFailure) {
        let dropped = (self.queued - self.sent) as u64;
        self.queued = 0;
        self.sent = 0;
        self.blocked_since = None;
        if dropped > 0 {
            self.note_send_failure(dropped, why);
        }
    }

    /// Starts the drain: from now on the socket takes no new datagrams;
    /// those already queued in it are still echoed.
    pub(crate) fn begin_drain(&mut self, worker: usize) {
        if self.draining {
            return;
        }
        self.draining = true;
        match crate::socket::drop_new_datagrams(&self.socket) {
            Ok(()) => self.logger.info(format_args!(
                "udp: worker {worker} takes no new datagrams; echoing those queued"
            )),
            // Datagrams arriving during the drain are echoed too, then.
            Err(err) => self.logger.warn(format_args!(
                "udp: worker {worker} cannot stop new datagrams for the drain: {}; \
                 echoing them too",
                io_cause(&err)
            )),
        }
    }

    /// The drain's deadline came: whatever still waits is dropped.
    pub(crate) fn cut(&mut self) {
        self.drop_queue(SendFailure::Deadline);
        self.finished = true;
        self.report_now();
    }

    fn note_send_failure(&mut self, count: u64, why: SendFailure) {
        self.counters.udp_send_failed.add(count);
        self.send_failures_unreported += count;
        self.send_failure_example = Some(why);
    }

    /// Adds this socket's refusals to the shared counts, and writes the
    /// warnings if their second has come.
    fn report(&mut self, now: Instant) {
        let refused = std::mem::take(&mut self.refused_unreported);
        let limited = std::mem::take(&mut self.limited_unreported);
        self.counters.udp_refused_source.add(refused);
        self.counters.udp_rate_limited.add(limited);
        let shared = &self.shared;
        if refused > 0 {
            shared
                .refused_since_warning
                .fetch_add(refused, Ordering::Relaxed);
        }
        if limited > 0 {
            shared
                .limited_since_warning
                .fetch_add(limited, Ordering::Relaxed);
        }
        if (refused > 0 || limited > 0) && shared.refusal_warnings.pass(now) {
            let refused = shared.refused_since_warning.swap(0, Ordering::Relaxed);
            let limited = shared.limited_since_warning.swap(0, Ordering::Relaxed);
            let mut parts = Vec::new();
            if refused > 0 {
                let example = match self.refused_example {
                    Some((peer, why)) => format!(" (such as {peer}: {})", why.describe()),
                    None => String::new(),
                };
                parts.push(format!("{refused} from sources never answered{example}"));
            }
            if limited > 0 {
                let example = match self.limited_example {
                    Some(peer) => format!(" (such as {})", peer.ip()),
                    None => String::new(),
                };
                parts.push(format!("{limited} over their source's rate limit{example}"));
            }
            self.logger.warn(format_args!(
                "udp: datagrams not answered since the last warning: {}",
                parts.join(", ")
            ));
        }
        if self.send_failures_unreported > 0 && shared.send_warnings.pass(now) {
            self.report_send_failures();
        }
    }

    /// Writes the send-failure warning now, whatever the throttle says: the
    /// socket is closing and will have no later chance.
    fn report_now(&mut self) {
        if self.send_failures_unreported > 0 {
            self.report_send_failures();
        }
    }

    fn report_send_failures(&mut self) {
        let count = std::mem::take(&mut self.send_failures_unreported);
        let unit = if count == 1 { "echo" } else { "echoes" };
        match self.send_failure_example.take() {
            Some(why) => self.logger.warn(format_args!(
                "udp: {count} {unit} not sent since the last warning; the last because {why}"
            )),
            None => self.logger.warn(format_args!(
                "udp: {count} {unit} not sent since the last warning"
            )),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.report_now();
    }
}

impl std::fmt::Debug for UdpEcho {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpEcho")
            .field("socket", &self.socket)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}
