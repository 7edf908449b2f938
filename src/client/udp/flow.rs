//! One UDP flow as a state machine that its event loop (`event_loop.rs`)
//! steps whenever its socket is ready or the instant it asked for comes:
//! an unconnected socket, datagrams sent on a fixed schedule (open loop:
//! the next goes at its time whether or not the last came back), echoes
//! received with their arrival times (the `socket` module) and judged by
//! the flow's [`Ledger`]. Each step receives what is there, counts lost
//! what has timed out, sends what is due, and says when it next cares (a
//! send time, the oldest datagram's timeout, the stop's patience, the end
//! of the linger) and whether it waits for room to send. The socket is
//! drained before any datagram is counted lost, so an echo that came in
//! time is judged by when it came.
//!
//! The socket is unconnected so that a datagram from any address reaches
//! it: a connected one would have the kernel drop echoes from another
//! address silently, and those must be counted. A flow holds no buffer:
//! datagrams are written into and echoes read into its loop's [`Buffers`],
//! so memory follows the loops, not the flows.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::datagram::{Comparison, Datagrams};
use super::failure::{UdpFailure, UdpFailureKind};
use super::interval::UdpIntervalTally;
use super::ledger::{Ledger, Verdict};
use super::socket::{self, Received};
use super::{Context, UdpEvent};
use crate::client::echo::{FIRST_ECHO_STOP_PATIENCE, MIN_CLOSING_WAIT, patience};
use crate::deadline::deadline_after;
use crate::error::{interrupted, would_block};

/// Datagrams sent back to back before the flow looks for echoes again.
const SEND_BURST: usize = 64;

/// Datagrams received per step before the flow looks at its schedule.
const RECEIVE_BATCH: usize = 64;

/// The longest a flow goes between steps. Every wait has its own end (a
/// send time, a timeout, the stop); this only bounds a wait for room to
/// send.
const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// A datagram sent more than this after its time on the schedule counts
/// late (`--rate`), as a TCP echo does.
pub(super) const LATE_AFTER: Duration = Duration::from_millis(10);

/// What one flow did; merged into the report.
#[derive(Debug)]
pub(super) struct FlowResult {
    pub ledger: Option<Ledger>,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_echoed: u64,
    /// When its last datagram was answered or lost (or it failed).
    pub ended: Option<Instant>,
    /// How it kept its schedule.
    pub pace: Pace,
}

impl FlowResult {
    pub fn failed() -> FlowResult {
        FlowResult {
            ledger: None,
            errors: 1,
            bytes_sent: 0,
            bytes_echoed: 0,
            ended: Some(Instant::now()),
            pace: Pace::default(),
        }
    }
}

/// How a flow kept its schedule: what `--rate` reports.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Pace {
    /// Datagrams whose time came more than [`LATE_AFTER`] before sending
    /// ended and that were never sent.
    pub unsent: u64,
    /// Datagrams sent more than [`LATE_AFTER`] after their time.
    pub late: u64,
    /// The latest of those.
    pub most_late: Duration,
    /// Sends that came due while the window was full (or the flow kept
    /// quiet after a loss).
    pub window_waits: u64,
    /// Sends that found the socket's send buffer full.
    pub buffer_waits: u64,
    /// When the flow stopped sending: the end of its last datagram's turn
    /// in the run's schedule (its send, plus the gap between two sends of
    /// the run, `interval / flows`), the stop, or the end of `--duration`.
    pub sending_ended: Option<Instant>,
}

impl Pace {
    pub fn add(&mut self, other: &Pace) {
        self.unsent += other.unsent;
        self.late += other.late;
        self.most_late = self.most_late.max(other.most_late);
        self.window_waits += other.window_waits;
        self.buffer_waits += other.buffer_waits;
        self.sending_ended = match (self.sending_ended, other.sending_ended) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// A loop's buffers, lent to whichever flow it steps.
pub(super) struct Buffers {
    /// The datagram being sent.
    pub sending: Vec<u8>,
    /// Echoes are read here, one byte longer than a datagram, so that a
    /// longer echo shows.
    pub receiving: Vec<u8>,
    /// A datagram rebuilt to check an echo against (`--size`).
    pub expected: Vec<u8>,
}

impl Buffers {
    /// Buffers for datagrams of `len` bytes, or `None` if memory ran out.
    pub fn new(len: usize) -> Option<Buffers> {
        Some(Buffers {
            sending: buffer(len)?,
            receiving: buffer(len + 1)?,
            expected: buffer(len)?,
        })
    }
}

/// When a flow wants its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// At `at` at the latest (sooner if its socket is ready), and whether
    /// it waits for room to send.
    Wait { at: Instant, writable: bool },
    /// The flow is over.
    Done,
}

/// Opens flow `number` (from 1): its socket and its ledger, for a send
/// every `interval` once it [begins](Flow::begin); tells the observer it
/// started.
///
/// # Errors
///
/// The failure to report when its socket or its memory could not be had.
pub(super) fn open_flow<'a, F>(
    context: &'a Context<'a, F>,
    number: usize,
    interval: Duration,
) -> Result<Flow<'a, F>, UdpFailureKind>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    let peer = context.peer;
    let unspecified = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(unspecified)
        .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
        .inspect(crate::socket::grow_udp_buffers)
        .inspect(socket::stamp_arrivals)
        .map_err(|error| UdpFailureKind::Socket { peer, error })?;
    let datagrams = Datagrams::new(&context.config.payload, context.seed, number);
    // No interval: ping-pong (a window of 1), the next datagram goes when
    // the last one is answered or lost. An open loop with no gap would only
    // measure how fast the server's receive buffer overflows.
    let config = context.config;
    let (window, history) =
        datagrams.window_and_history(config.timeout, interval, config.connections.get());
    (context.observer)(&UdpEvent::Started {
        flow: number,
        local: socket.local_addr().unwrap_or(unspecified),
        peer,
    });
    let first = Instant::now();
    Ok(Flow {
        context,
        number,
        socket,
        ledger: Ledger::new(window, history, config.timeout),
        bits: datagrams.header_bits(),
        datagrams,
        epoch: first,
        drained_at: first,
        quiet_until: None,
        interval,
        attempts: 0,
        first_send: first,
        next_send: first,
        held: false,
        stopped_at: None,
        send_blocked: false,
        settled: None,
        writable_registered: false,
        armed: None,
        errors: 0,
        bytes_sent: 0,
        bytes_echoed: 0,
        pace: Pace::default(),
    })
}

/// A zeroed buffer of `len` bytes, or `None` if memory ran out.
fn buffer(len: usize) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).ok()?;
    buf.resize(len, 0);
    Some(buf)
}

/// What a receive left in the socket.
enum Drain {
    /// Nothing: everything that had arrived was judged.
    Empty,
    /// A batch was taken and more may wait.
    More,
    /// Receiving failed; the flow ends.
    Failed,
}

pub(super) struct Flow<'a, F> {
    context: &'a Context<'a, F>,
    number: usize,
    socket: UdpSocket,
    datagrams: Datagrams<'a>,
    ledger: Ledger,
    /// Bits of sequence number each datagram carries.
    bits: u32,
    /// The ledger's clock starts here.
    epoch: Instant,
    /// When the socket was last found empty: nothing read since can have
    /// arrived before.
    drained_at: Instant,
    /// A flow whose datagrams carry no number lost one: it sends nothing
    /// until then, so that a late echo of it is not taken for the next
    /// one's (see `expire`).
    quiet_until: Option<Instant>,
    /// The gap between two sends (zero: ping-pong).
    interval: Duration,
    /// Sends attempted so far (a failed send counts: its turn passed).
    attempts: u64,
    /// The schedule as asked, before any slip: send *k* (from 0) is due at
    /// `first_send + k × interval`.
    first_send: Instant,
    /// When the next send goes.
    next_send: Instant,
    /// A send came due while the flow could not send (its window full,
    /// or quiet after a loss): the schedule slips to when it can, rather
    /// than sending what it owes in a burst.
    held: bool,
    stopped_at: Option<Instant>,
    /// The socket's send buffer was full: wait until it is writable.
    send_blocked: bool,
    /// When the last datagram was settled, and when the wait for stray
    /// echoes after it ends (shortened by a stop).
    settled: Option<(Instant, Instant)>,
    /// The loop registered the socket for writability too.
    pub writable_registered: bool,
    /// The instant of this flow's entry in its loop's timer heap, if any.
    pub armed: Option<Instant>,
    errors: u64,
    bytes_sent: u64,
    bytes_echoed: u64,
    pace: Pace,
}

impl<'a, F> Flow<'a, F>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Flow number, from 1.
    pub fn number(&self) -> usize {
        self.number
    }

    /// Starts the flow's clock at `epoch` (the run's schedules start) and
    /// its schedule at `first`, its first send.
    pub fn begin(&mut self, epoch: Instant, first: Instant) {
        self.epoch = epoch;
        self.drained_at = epoch;
        self.first_send = first;
        self.next_send = first;
    }

    /// Room to send again: the socket reported writable.
    pub fn on_writable(&mut self) {
        self.send_blocked = false;
    }

    /// What the flow did, once it is [`Step::Done`] (or abandoned, its
    /// loop broken).
    pub fn finish(self, ended: Instant) -> FlowResult {
        FlowResult {
            errors: self.errors,
            bytes_sent: self.bytes_sent,
            bytes_echoed: self.bytes_echoed,
            ended: Some(self.settled.map_or(ended, |(at, _)| at)),
            ledger: Some(self.ledger),
            pace: self.pace,
        }
    }

    /// The loop's poll broke: the flow can go on no more; what is out
    /// counts lost.
    pub fn abandon(&mut self, error: io::Error, tally: &mut UdpIntervalTally) {
        self.settled = None;
        self.fail_receiving(error, tally);
    }

    /// One step: receive what is there, count lost what timed out, send
    /// what is due; returns when to step again. `stopped` is when the run
    /// was stopped, if it was; `ends` is when `--duration` ends sending.
    pub fn step(
        &mut self,
        buffers: &mut Buffers,
        tally: &mut UdpIntervalTally,
        stopped: Option<Instant>,
        ends: Option<Instant>,
    ) -> Step {
        let config = self.context.config;
        // Echoes already here are judged before anything counts lost.
        let drained = match self.receive(buffers, tally) {
            Drain::Empty => true,
            Drain::More => false,
            Drain::Failed => {
                self.settled = None;
                self.end_sending(Instant::now(), false);
                return Step::Done;
            }
        };
        let now = Instant::now();
        if self.stopped_at.is_none()
            && let Some(at) = stopped
        {
            self.stopped_at = Some(at);
        }
        if drained {
            // Not `now`: an echo may have come since the socket was empty.
            self.expire(self.drained_at, tally);
        }
        let stop_patience = self.stopped_at.map(|at| {
            let patience = patience(self.ledger.rtt(), FIRST_ECHO_STOP_PATIENCE, config.timeout);
            (deadline_after(at, patience), patience)
        });
        if let Some((until, patience)) = stop_patience
            && drained
            && now >= until
        {
            self.expire_all(patience, tally);
        }
        let over = self.stopped_at.is_some() || ends.is_some_and(|ends| now >= ends);
        if over && self.pace.sending_ended.is_none() {
            let at = match (self.stopped_at, ends) {
                (Some(stopped), Some(ends)) => stopped.min(ends),
                (Some(stopped), None) => stopped,
                (None, ends) => ends.unwrap_or(now),
            };
            self.end_sending(at, true);
        }
        let more = |flow: &Self| {
            flow.pace.sending_ended.is_none()
                && (config.repeat == 0 || flow.attempts < config.repeat)
        };
        let quiet = self.quiet_until.filter(|&until| now < until);
        let mut burst = 0;
        while more(self)
            && !self.send_blocked
            && burst < SEND_BURST
            && Instant::now() >= self.next_send
            && ends.is_none_or(|ends| self.next_send < ends)
        {
            if quiet.is_some() || !self.ledger.can_send() {
                if !self.held {
                    self.pace.window_waits += 1;
                }
                self.held = true;
                break;
            }
            if self.held {
                self.held = false;
                self.next_send = Instant::now();
            }
            match self.send(&mut buffers.sending) {
                Ok(()) => tally.sent += 1,
                Err(error) if would_block(&error) => {
                    self.pace.buffer_waits += 1;
                    self.send_blocked = true;
                    break;
                }
                // A signal arrived: try again.
                Err(error) if interrupted(&error) => continue,
                Err(error) => {
                    let seq = self.ledger.next_seq();
                    self.errors += 1;
                    let peer = self.context.peer;
                    self.fail(tally, UdpFailureKind::Send { seq, peer, error });
                }
            }
            self.attempts += 1;
            burst += 1;
            let slot = self.next_send;
            self.next_send = deadline_after(self.next_send, self.interval);
            if !more(self) {
                // N sends take N turns, not the N − 1 gaps between them,
                // from the last one's slot (its lateness counts apart).
                let turn = self.interval.div_f64(config.connections.get() as f64);
                self.end_sending(deadline_after(slot, turn), false);
            }
        }
        if drained && !more(self) && self.ledger.is_idle() {
            let (at, until) = *self.settled.get_or_insert_with(|| {
                let linger = match self.stopped_at {
                    Some(_) => MIN_CLOSING_WAIT.min(config.timeout),
                    None => patience(self.ledger.rtt(), MIN_CLOSING_WAIT, config.timeout),
                };
                (now, deadline_after(now, linger))
            });
            // A stop while listening cuts the listening short.
            let until = match self.stopped_at {
                Some(stopped) => until.min(deadline_after(at.max(stopped), MIN_CLOSING_WAIT)),
                None => until,
            };
            self.settled = Some((at, until));
            if now >= until {
                return Step::Done;
            }
        }
        // Step again at whichever comes first.
        let mut wake = deadline_after(now, LONGEST_WAIT);
        if !drained {
            wake = now;
        }
        if more(self) && !self.send_blocked {
            match quiet {
                Some(until) => wake = wake.min(until.max(self.next_send)),
                None if self.ledger.can_send() => wake = wake.min(self.next_send),
                None => {}
            }
            if let Some(ends) = ends {
                wake = wake.min(ends);
            }
        }
        if let Some(deadline) = self.ledger.next_deadline() {
            wake = wake.min(deadline_after(self.epoch, deadline));
        }
        // Once nothing is out the patience is spent: its instant, passed,
        // would only wake the flow again at once.
        if let Some((until, _)) = stop_patience
            && !self.ledger.is_idle()
        {
            wake = wake.min(until);
        }
        if let Some((_, until)) = self.settled {
            wake = wake.min(until);
        }
        Step::Wait {
            at: wake,
            writable: self.send_blocked && more(self),
        }
    }

    /// Sending ends at `at`; with `cut` (a stop, or `--duration` over),
    /// the sends whose time had come by then, less [`LATE_AFTER`], and
    /// that never went are counted unsent.
    fn end_sending(&mut self, at: Instant, cut: bool) {
        if self.pace.sending_ended.is_some() {
            return;
        }
        self.pace.sending_ended = Some(at);
        if !cut || self.interval.is_zero() {
            return;
        }
        let Some(span) = at
            .checked_sub(LATE_AFTER)
            .and_then(|before| before.checked_duration_since(self.first_send))
        else {
            return;
        };
        let mut due = u64::try_from(span.as_nanos() / self.interval.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        if self.context.config.repeat != 0 {
            due = due.min(self.context.config.repeat);
        }
        self.pace.unsent = due.saturating_sub(self.attempts);
    }

    /// Sends the next datagram; on success the ledger has it.
    fn send(&mut self, sending: &mut [u8]) -> io::Result<()> {
        let seq = self.ledger.next_seq();
        self.datagrams.write(seq, sending);
        let sent_at = Instant::now();
        let written = self.socket.send_to(sending, self.context.peer)?;
        self.ledger.sent(sent_at - self.epoch);
        self.bytes_sent += written as u64;
        if !self.interval.is_zero() {
            let slot = self
                .interval
                .saturating_mul(u32::try_from(self.attempts).unwrap_or(u32::MAX));
            let behind = sent_at
                .saturating_duration_since(self.first_send)
                .saturating_sub(slot);
            if behind > LATE_AFTER {
                self.pace.late += 1;
                self.pace.most_late = self.pace.most_late.max(behind);
            }
        }
        Ok(())
    }

    /// Takes the echoes waiting, up to a batch.
    fn receive(&mut self, buffers: &mut Buffers, tally: &mut UdpIntervalTally) -> Drain {
        for _ in 0..RECEIVE_BATCH {
            match socket::receive(&self.socket, &mut buffers.receiving) {
                Ok(received) => {
                    // Nothing read now arrived before the socket was last
                    // found empty (a wall clock step cannot move it there).
                    let at = received.at.max(self.drained_at);
                    let echo = &buffers.receiving[..received.len];
                    self.judge(echo, &mut buffers.expected, tally, received, at);
                }
                // Nothing more for now.
                Err(error) if would_block(&error) => {
                    self.drained_at = Instant::now();
                    return Drain::Empty;
                }
                // A signal arrived: try again.
                Err(error) if interrupted(&error) => {}
                // An ICMP error for an earlier datagram (port unreachable):
                // not an echo; that datagram counts lost at its timeout.
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(error) => {
                    self.fail_receiving(error, tally);
                    return Drain::Failed;
                }
            }
        }
        Drain::More
    }

    /// Judges one datagram, `echo` (its first bytes, if it was longer than
    /// the buffer), that arrived at `at`.
    fn judge(
        &mut self,
        echo: &[u8],
        expected: &mut [u8],
        tally: &mut UdpIntervalTally,
        received: Received,
        at: Instant,
    ) {
        let peer = self.context.peer;
        let (from, got) = (received.from, received.size);
        if !same_address(from, peer) {
            self.ledger.foreign();
            self.fail(tally, UdpFailureKind::Foreign { from, peer, got });
            return;
        }
        self.expire(at, tally);
        let named = (self.datagrams.named(echo)).and_then(|low| self.ledger.locate(low, self.bits));
        let comparison = named.map(|seq| match self.datagrams.compare_in(seq, echo, expected) {
            Comparison::Size { .. } => Comparison::Size { got },
            comparison => comparison,
        });
        let exact = comparison == Some(Comparison::Exact);
        let kind = match self.ledger.echo(named, exact, at - self.epoch) {
            Verdict::Echoed {
                seq,
                rtt,
                reordered,
            } => {
                self.bytes_echoed += echo.len() as u64;
                tally.echoed(echo.len(), rtt);
                (self.context.observer)(&UdpEvent::Echoed {
                    flow: self.number,
                    seq,
                    rtt,
                    message: echo,
                    reordered,
                });
                return;
            }
            Verdict::Late { seq, rtt } => {
                // Its bytes came back, late: they count in MB/s echoed, in
                // the summary and in the interval alike.
                self.bytes_echoed += echo.len() as u64;
                tally.bytes_echoed += echo.len() as u64;
                UdpFailureKind::Late { seq, peer, rtt }
            }
            Verdict::Duplicated { seq } => UdpFailureKind::Duplicated { seq, peer },
            Verdict::Stale { seq } => UdpFailureKind::Stale { seq, peer },
            Verdict::Corrupted { seq: Some(seq) } => match comparison {
                Some(Comparison::Differs { offset, sent, got }) => UdpFailureKind::Mismatch {
                    seq,
                    peer,
                    len: self.datagrams.len(),
                    offset,
                    sent,
                    got,
                },
                Some(Comparison::Size { got }) => UdpFailureKind::WrongSize {
                    seq,
                    peer,
                    len: self.datagrams.len(),
                    got,
                },
                // An exact echo is never corrupted.
                Some(Comparison::Exact) | None => UdpFailureKind::Unmatched { peer, got },
            },
            Verdict::Corrupted { seq: None } => UdpFailureKind::Unmatched { peer, got },
        };
        self.fail(tally, kind);
    }

    /// Counts as lost the datagrams whose timeout has passed at `now`.
    ///
    /// A flow whose datagrams carry no number then keeps quiet for another
    /// timeout: an echo in that time is the lost datagram's, late, where
    /// after the next send it would be taken for the next one's (a wrong
    /// round trip, then a duplicate).
    fn expire(&mut self, now: Instant, tally: &mut UdpIntervalTally) {
        let (context, number) = (self.context, self.number);
        let after = context.config.timeout;
        let mut lost = false;
        self.ledger
            .expire(now.saturating_duration_since(self.epoch), |seq| {
                lost = true;
                let peer = context.peer;
                let kind = UdpFailureKind::Lost {
                    seq,
                    peer,
                    after,
                    stopped: false,
                };
                tally.count(&kind);
                context.fail(number, kind);
            });
        if lost && self.bits == 0 {
            self.quiet_until = Some(deadline_after(now, after));
        }
    }

    /// Counts every pending datagram as lost: the run was stopped and
    /// `patience` has passed since.
    fn expire_all(&mut self, patience: Duration, tally: &mut UdpIntervalTally) {
        let (context, number) = (self.context, self.number);
        self.ledger.expire_all(|seq| {
            let peer = context.peer;
            let kind = UdpFailureKind::Lost {
                seq,
                peer,
                after: patience,
                stopped: true,
            };
            tally.count(&kind);
            context.fail(number, kind);
        });
    }

    /// Receiving broke: report it, and count what is still out as lost.
    fn fail_receiving(&mut self, error: io::Error, tally: &mut UdpIntervalTally) {
        self.errors += 1;
        let peer = self.context.peer;
        self.fail(tally, UdpFailureKind::Receive { peer, error });
        let timeout = self.context.config.timeout;
        self.expire_all(timeout, tally);
    }

    /// Counts a failure of this flow in the interval and tells the observer.
    fn fail(&self, tally: &mut UdpIntervalTally, kind: UdpFailureKind) {
        tally.count(&kind);
        self.context.fail(self.number, kind);
    }
}

impl<F> Context<'_, F>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    /// Tells the observer about a failure on flow `number`.
    pub(super) fn fail(&self, number: usize, kind: UdpFailureKind) {
        let failure = UdpFailure {
            flow: self.multiple.then_some(number),
            kind,
        };
        (self.observer)(&UdpEvent::Failed(&failure));
    }
}

/// True if `from` is the server's address; an IPv4-mapped IPv6 address is
/// the same as its IPv4 one.
fn same_address(from: SocketAddr, peer: SocketAddr) -> bool {
    from.port() == peer.port() && from.ip().to_canonical() == peer.ip().to_canonical()
}
