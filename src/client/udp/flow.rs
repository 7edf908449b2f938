//! One UDP flow's life, on its own thread: an unconnected socket, datagrams
//! sent on a fixed schedule (open loop: the next goes at its time whether
//! or not the last came back), echoes received with `recv_from` and judged
//! by the flow's [`Ledger`], and one poll(2) that waits for whichever comes
//! first: an echo, room to send, the next send time, the oldest datagram's
//! timeout, or the stop (the run's stop pipe hangs up).
//!
//! The socket is unconnected so that a datagram from any address reaches
//! it: a connected one would have the kernel drop echoes from another
//! address silently, and those must be counted. Nothing is allocated per
//! datagram: the buffers are made once, at the datagram's size.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::datagram::{Comparison, Datagrams};
use super::failure::{UdpFailure, UdpFailureKind};
use super::ledger::{Ledger, Verdict};
use super::{Context, UdpEvent};
use crate::client::echo::{FIRST_ECHO_STOP_PATIENCE, MIN_CLOSING_WAIT, patience};
use crate::config::deadline_after;
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
    let (window, history) = datagrams.window_and_history();
    // No interval: ping-pong, the next datagram goes when the last one is
    // answered or lost. An open loop with no gap would only measure how
    // fast the server's receive buffer overflows.
    let window = if context.config.interval.is_zero() {
        1
    } else {
        window
    };
    let mut flow = Flow {
        context,
        number,
        socket,
        ledger: Ledger::new(window, history, context.config.timeout),
        bits: datagrams.header_bits(),
        datagrams,
        epoch: Instant::now(),
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
        let mut stopped_at: Option<Instant> = None;
        // The socket's send buffer was full: wait until it is writable.
        let mut send_blocked = false;
        // When the last datagram was settled, and when the wait for stray
        // echoes after it ends.
        let mut settled: Option<(Instant, Instant)> = None;
        loop {
            let now = Instant::now();
            if stopped_at.is_none() && self.context.stop.is_stopped() {
                stopped_at = Some(now);
            }
            self.expire(now);
            let stop_patience = stopped_at.map(|at| {
                let patience =
                    patience(self.ledger.rtt(), FIRST_ECHO_STOP_PATIENCE, config.timeout);
                (deadline_after(at, patience), patience)
            });
            if let Some((until, patience)) = stop_patience
                && now >= until
            {
                self.expire_all(patience);
            }
            let more = |attempts: u64| {
                stopped_at.is_none() && (config.repeat == 0 || attempts < config.repeat)
            };
            let mut burst = 0;
            while more(attempts)
                && !send_blocked
                && burst < SEND_BURST
                && Instant::now() >= next_send
                && self.ledger.can_send()
            {
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
            if !more(attempts) && self.ledger.is_idle() {
                let (at, until) = *settled.get_or_insert_with(|| {
                    let linger = match stopped_at {
                        Some(_) => MIN_CLOSING_WAIT.min(config.timeout),
                        None => patience(self.ledger.rtt(), MIN_CLOSING_WAIT, config.timeout),
                    };
                    (now, deadline_after(now, linger))
                });
                if now >= until {
                    return at;
                }
            }
            // Wait for whichever comes first.
            let mut wake = deadline_after(now, LONGEST_WAIT);
            if more(attempts) && !send_blocked && self.ledger.can_send() {
                wake = wake.min(next_send);
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
            let ready = match poll(&self.socket, send_blocked, stop_fd, wake - now) {
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
            if ready.readable && !self.receive(receiving) {
                return Instant::now();
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

    /// Takes the echoes waiting, up to a batch; false if receiving failed
    /// and the flow must end.
    fn receive(&mut self, receiving: &mut [u8]) -> bool {
        let mut taken = 0;
        while taken < RECEIVE_BATCH {
            match self.socket.recv_from(receiving) {
                Ok((len, from)) => {
                    taken += 1;
                    self.judge(&receiving[..len], from, Instant::now());
                }
                // Nothing more for now.
                Err(error) if would_block(&error) => break,
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
                    return false;
                }
            }
        }
        true
    }

    /// Judges one datagram that arrived from `from` at `at`.
    fn judge(&mut self, echo: &[u8], from: SocketAddr, at: Instant) {
        let peer = self.context.peer;
        if !same_address(from, peer) {
            self.ledger.foreign();
            let got = echo.len();
            self.context
                .fail(self.number, UdpFailureKind::Foreign { from, peer, got });
            return;
        }
        self.expire(at);
        let named = (self.datagrams.named(echo)).and_then(|low| self.ledger.locate(low, self.bits));
        let comparison = named.map(|seq| self.datagrams.compare(seq, echo));
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
                Some(Comparison::Exact) | None => UdpFailureKind::Unmatched {
                    peer,
                    got: echo.len(),
                },
            },
            Verdict::Corrupted { seq: None } => UdpFailureKind::Unmatched {
                peer,
                got: echo.len(),
            },
        };
        self.context.fail(self.number, kind);
    }

    /// Counts as lost the datagrams whose timeout has passed at `now`.
    fn expire(&mut self, now: Instant) {
        let (context, number) = (self.context, self.number);
        let after = context.config.timeout;
        self.ledger.expire(now - self.epoch, |seq| {
            let peer = context.peer;
            let kind = UdpFailureKind::Lost {
                seq,
                peer,
                after,
                stopped: false,
            };
            context.fail(number, kind);
        });
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

/// What one poll found.
#[derive(Debug, Default)]
struct Ready {
    readable: bool,
    writable: bool,
    stop: bool,
}

/// Waits up to `left` for the socket to be readable (or writable, if
/// `write`), or for `stop` to hang up.
///
/// # Errors
/// poll's own error; a signal is not one (nothing is ready then).
fn poll(socket: &UdpSocket, write: bool, stop: Option<RawFd>, left: Duration) -> io::Result<Ready> {
    let mut events = libc::POLLIN;
    if write {
        events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let count = if stop.is_some() { 2 } else { 1 };
    // Rounded up, so that a wait under a millisecond does not spin.
    let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    // SAFETY: `fds` holds `count` valid, initialised pollfds that outlive the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), count as libc::nfds_t, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if interrupted(&error) {
            return Ok(Ready::default());
        }
        return Err(error);
    }
    let socket = fds[0].revents;
    Ok(Ready {
        // An error is read (and sorted) by recv_from.
        readable: socket & (libc::POLLIN | libc::POLLERR) != 0,
        writable: socket & (libc::POLLOUT | libc::POLLERR) != 0,
        stop: count == 2 && fds[1].revents != 0,
    })
}
