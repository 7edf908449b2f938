//! One UDP flow's life, on its own thread: an unconnected socket, datagrams
//! sent on a fixed schedule (open loop: the next goes at its time whether
//! or not the last came back), echoes received with their arrival times
//! (the `socket` module) and judged by the flow's [`Ledger`], and one poll
//! that waits for whichever comes first: an echo, room to send, the next
//! send time, the oldest datagram's timeout, or the stop (the run's stop
//! pipe hangs up). The socket is drained before any datagram is counted
//! lost, so an echo that came in time is judged by when it came.
//!
//! The socket is unconnected so that a datagram from any address reaches
//! it: a connected one would have the kernel drop echoes from another
//! address silently, and those must be counted. Nothing is allocated per
//! datagram: the buffers are made once, at the datagram's size.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::datagram::{Comparison, Datagrams};
use super::failure::{UdpFailure, UdpFailureKind};
use super::ledger::{Ledger, Verdict};
use super::socket::{self, Received};
use super::{Context, UdpEvent};
use crate::client::echo::{FIRST_ECHO_STOP_PATIENCE, MIN_CLOSING_WAIT, patience};
use crate::deadline::deadline_after;
use crate::error::{interrupted, would_block};

/// Datagrams sent back to back before the flow looks for echoes again.
const SEND_BURST: usize = 64;

/// Datagrams received per wake-up before the flow looks at its schedule.
const RECEIVE_BATCH: usize = 64;

/// The longest one poll waits. Every wait has its own end (a send time, a
/// timeout, the stop); this only bounds a wait for room to send.
const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// What one flow did; merged into the report.
#[derive(Debug)]
pub(super) struct FlowResult {
    pub ledger: Option<Ledger>,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_echoed: u64,
    /// When its last datagram was answered or lost (or it failed).
    pub ended: Option<Instant>,
}

impl FlowResult {
    pub fn failed() -> FlowResult {
        FlowResult {
            ledger: None,
            errors: 1,
            bytes_sent: 0,
            bytes_echoed: 0,
            ended: Some(Instant::now()),
        }
    }
}

/// Runs flow `number` (from 1) to its end: `--repeat` datagrams sent (or
/// the stop), and each answered or lost.
pub(super) fn run_flow<F>(context: &Context<'_, F>, number: usize) -> FlowResult
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    let peer = context.peer;
    let unspecified = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = match UdpSocket::bind(unspecified)
        .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
        .inspect(crate::socket::grow_udp_buffers)
        .inspect(socket::stamp_arrivals)
    {
        Ok(socket) => socket,
        Err(error) => {
            context.fail(number, UdpFailureKind::Socket { peer, error });
            return FlowResult::failed();
        }
    };
    let mut datagrams = Datagrams::new(&context.config.payload, context.seed, number);
    let len = datagrams.len();
    // One byte of room past the datagram shows an echo that is longer.
    let (Some(mut sending), Some(mut receiving)) = (buffer(len), buffer(len + 1)) else {
        context.fail(number, UdpFailureKind::OutOfMemory { bytes: len });
        return FlowResult::failed();
    };
    if !datagrams.reserve() {
        context.fail(number, UdpFailureKind::OutOfMemory { bytes: len });
        return FlowResult::failed();
    }
    (context.observer)(&UdpEvent::Started {
        flow: number,
        local: socket.local_addr().unwrap_or(unspecified),
        peer,
    });
    // No interval: ping-pong (a window of 1), the next datagram goes when
    // the last one is answered or lost. An open loop with no gap would only
    // measure how fast the server's receive buffer overflows.
    let config = context.config;
    let (window, history) =
        datagrams.window_and_history(config.timeout, config.interval, config.connections.get());
    let now = Instant::now();
    let mut flow = Flow {
        context,
        number,
        socket,
        ledger: Ledger::new(window, history, context.config.timeout),
        bits: datagrams.header_bits(),
        datagrams,
        epoch: now,
        drained_at: now,
        quiet_until: None,
        errors: 0,
        bytes_sent: 0,
        bytes_echoed: 0,
    };
    let ended = flow.run(&mut sending, &mut receiving);
    FlowResult {
        errors: flow.errors,
        bytes_sent: flow.bytes_sent,
        bytes_echoed: flow.bytes_echoed,
        ended: Some(ended),
        ledger: Some(flow.ledger),
    }
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

struct Flow<'a, F> {
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
    errors: u64,
    bytes_sent: u64,
    bytes_echoed: u64,
}

impl<F> Flow<'_, F>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    /// The loop; returns when the last datagram was answered or lost.
    fn run(&mut self, sending: &mut [u8], receiving: &mut [u8]) -> Instant {
        let config = self.context.config;
        let mut attempts = 0u64;
        let mut next_send = self.epoch;
        // A send came due while the flow could not send (its window full,
        // or quiet after a loss): the schedule slips to when it can, rather
        // than sending what it owes in a burst.
        let mut held = false;
        let mut stopped_at: Option<Instant> = None;
        // The socket's send buffer was full: wait until it is writable.
        let mut send_blocked = false;
        // When the last datagram was settled, and when the wait for stray
        // echoes after it ends (shortened by a stop).
        let mut settled: Option<(Instant, Instant)> = None;
        loop {
            // Echoes already here are judged before anything counts lost.
            let drained = match self.receive(receiving) {
                Drain::Empty => true,
                Drain::More => false,
                Drain::Failed => return Instant::now(),
            };
            let now = Instant::now();
            if stopped_at.is_none() && self.context.stop.is_stopped() {
                stopped_at = Some(now);
            }
            if drained {
                // Not `now`: an echo may have come since the socket was empty.
                self.expire(self.drained_at);
            }
            let stop_patience = stopped_at.map(|at| {
                let patience =
                    patience(self.ledger.rtt(), FIRST_ECHO_STOP_PATIENCE, config.timeout);
                (deadline_after(at, patience), patience)
            });
            if let Some((until, patience)) = stop_patience
                && drained
                && now >= until
            {
                self.expire_all(patience);
            }
            let more = |attempts: u64| {
                stopped_at.is_none() && (config.repeat == 0 || attempts < config.repeat)
            };
            let quiet = self.quiet_until.filter(|&until| now < until);
            let mut burst = 0;
            while more(attempts)
                && !send_blocked
                && burst < SEND_BURST
                && Instant::now() >= next_send
            {
                if quiet.is_some() || !self.ledger.can_send() {
                    held = true;
                    break;
                }
                if held {
                    held = false;
                    next_send = Instant::now();
                }
                match self.send(sending) {
                    Ok(()) => {}
                    Err(error) if would_block(&error) => {
                        send_blocked = true;
                        break;
                    }
                    // A signal arrived: try again.
                    Err(error) if interrupted(&error) => continue,
                    Err(error) => {
                        let seq = self.ledger.next_seq();
                        self.errors += 1;
                        let peer = self.context.peer;
                        self.context
                            .fail(self.number, UdpFailureKind::Send { seq, peer, error });
                    }
                }
                attempts += 1;
                burst += 1;
                next_send = deadline_after(next_send, config.interval);
            }
            if drained && !more(attempts) && self.ledger.is_idle() {
                let (at, until) = *settled.get_or_insert_with(|| {
                    let linger = match stopped_at {
                        Some(_) => MIN_CLOSING_WAIT.min(config.timeout),
                        None => patience(self.ledger.rtt(), MIN_CLOSING_WAIT, config.timeout),
                    };
                    (now, deadline_after(now, linger))
                });
                // A stop while listening cuts the listening short.
                let until = match stopped_at {
                    Some(stopped) => until.min(deadline_after(at.max(stopped), MIN_CLOSING_WAIT)),
                    None => until,
                };
                settled = Some((at, until));
                if now >= until {
                    return at;
                }
            }
            // Wait for whichever comes first.
            let mut wake = deadline_after(now, LONGEST_WAIT);
            if !drained {
                wake = now;
            }
            if more(attempts) && !send_blocked {
                match quiet {
                    Some(until) => wake = wake.min(until.max(next_send)),
                    None if self.ledger.can_send() => wake = wake.min(next_send),
                    None => {}
                }
            }
            if let Some(deadline) = self.ledger.next_deadline() {
                wake = wake.min(deadline_after(self.epoch, deadline));
            }
            if let Some((until, _)) = stop_patience {
                wake = wake.min(until);
            }
            if let Some((_, until)) = settled {
                wake = wake.min(until);
            }
            let stop_fd = stopped_at.is_none().then_some(self.context.stop_fd);
            let ready = match socket::poll(
                &self.socket,
                send_blocked,
                stop_fd,
                wake.saturating_duration_since(now),
            ) {
                Ok(ready) => ready,
                Err(error) => {
                    self.fail_receiving(error);
                    return Instant::now();
                }
            };
            if ready.stop && stopped_at.is_none() {
                stopped_at = Some(Instant::now());
            }
            if ready.writable {
                send_blocked = false;
            }
        }
    }

    /// Sends the next datagram; on success the ledger has it.
    fn send(&mut self, sending: &mut [u8]) -> io::Result<()> {
        let seq = self.ledger.next_seq();
        self.datagrams.write(seq, sending);
        let sent_at = Instant::now();
        let written = self.socket.send_to(sending, self.context.peer)?;
        self.ledger.sent(sent_at - self.epoch);
        self.bytes_sent += written as u64;
        Ok(())
    }

    /// Takes the echoes waiting, up to a batch.
    fn receive(&mut self, receiving: &mut [u8]) -> Drain {
        for _ in 0..RECEIVE_BATCH {
            match socket::receive(&self.socket, receiving) {
                Ok(received) => {
                    // Nothing read now arrived before the socket was last
                    // found empty (a wall clock step cannot move it there).
                    let at = received.at.max(self.drained_at);
                    self.judge(&receiving[..received.len], received, at);
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
                    self.fail_receiving(error);
                    return Drain::Failed;
                }
            }
        }
        Drain::More
    }

    /// Judges one datagram, `echo` (its first bytes, if it was longer than
    /// the buffer), that arrived at `at`.
    fn judge(&mut self, echo: &[u8], received: Received, at: Instant) {
        let peer = self.context.peer;
        let (from, got) = (received.from, received.size);
        if !same_address(from, peer) {
            self.ledger.foreign();
            self.context
                .fail(self.number, UdpFailureKind::Foreign { from, peer, got });
            return;
        }
        self.expire(at);
        let named = (self.datagrams.named(echo)).and_then(|low| self.ledger.locate(low, self.bits));
        let comparison = named.map(|seq| match self.datagrams.compare(seq, echo) {
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
                self.bytes_echoed += echo.len() as u64;
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
        self.context.fail(self.number, kind);
    }

    /// Counts as lost the datagrams whose timeout has passed at `now`.
    ///
    /// A flow whose datagrams carry no number then keeps quiet for another
    /// timeout: an echo in that time is the lost datagram's, late, where
    /// after the next send it would be taken for the next one's (a wrong
    /// round trip, then a duplicate).
    fn expire(&mut self, now: Instant) {
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
                context.fail(number, kind);
            });
        if lost && self.bits == 0 {
            self.quiet_until = Some(deadline_after(now, after));
        }
    }

    /// Counts every pending datagram as lost: the run was stopped and
    /// `patience` has passed since.
    fn expire_all(&mut self, patience: Duration) {
        let (context, number) = (self.context, self.number);
        self.ledger.expire_all(|seq| {
            let peer = context.peer;
            context.fail(
                number,
                UdpFailureKind::Lost {
                    seq,
                    peer,
                    after: patience,
                    stopped: true,
                },
            );
        });
    }

    /// Receiving broke: report it, and count what is still out as lost.
    fn fail_receiving(&mut self, error: io::Error) {
        self.errors += 1;
        let peer = self.context.peer;
        self.context
            .fail(self.number, UdpFailureKind::Receive { peer, error });
        let timeout = self.context.config.timeout;
        self.expire_all(timeout);
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
