//! A worker: the third step of the flow acceptor → channel → worker →
//! connection.
//!
//! Each worker thread runs its own mio event loop, like a memcached worker.
//! The acceptor sends it new streams over its own channel and wakes it; from
//! then on the worker owns each stream until it closes, and drives the
//! stream's [`Connection`] state machine with one read buffer shared by all of
//! them. When the channel disconnects, the shutdown controller has spoken:
//! the worker drains its connections and exits before the deadline.
//!
//! A worker of a server that serves UDP also owns one UDP socket of the
//! port (`UdpEcho`) in the same event loop: datagrams and connections take
//! turns, and the drain waits for both.
//!
//! Behind a proxy (`--proxy-protocol`), a new connection first waits for its
//! PROXY header: the worker peeks until a whole one is there
//! ([`crate::server::proxy_header`]), takes exactly its bytes, admits the client it
//! names against the per-address limit, and only then starts the echo, so
//! the header is never echoed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::deadline::deadline_after;
use crate::error::{interrupted, io_cause, would_block};
use crate::log::{Logger, counted, preview};
use crate::server::busy_poll::{self, BusyPoll, Waited};
use crate::server::config::{LogLevel, PROXY_HEADER_TIMEOUT, READ_BUFFER_SIZE};
use crate::server::connection::{CloseReason, Connection, ConnectionStats, Outcome, Readiness};
use crate::server::datagram::{Turn, UdpEcho};
use crate::server::proxy_header::HeaderRead;
use crate::server::shutdown::ShutdownHandle;
use crate::server::stats::{OpenConnections, WorkerCounters};

/// The token of the worker's waker; connection `i` uses `Token(i + 1)`.
pub(crate) const WAKE: Token = Token(0);
/// The token of the worker's UDP socket, past any connection's.
pub(crate) const UDP: Token = Token(usize::MAX);

/// Readiness events taken from the kernel per wake-up.
const EVENTS_PER_POLL: usize = 1024;

/// What the kernel reports for a connection: both directions and, on Linux,
/// urgent data, which stops reads short of the queue's end (see
/// [`Readiness::urgent`]).
#[cfg(any(target_os = "linux", target_os = "android"))]
const CONNECTION_INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const CONNECTION_INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE);

/// A new connection, sent from the acceptor to a worker.
#[derive(Debug)]
pub(crate) struct Handoff {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    /// The connection must start with a PROXY header, which names the client.
    pub(crate) awaits_proxy_header: bool,
}

/// One open connection and what the worker knows of it.
struct Slot {
    stream: TcpStream,
    connection: Connection,
    /// The client: the PROXY header's, once read; else the socket's peer.
    peer: SocketAddr,
    /// Until when the connection may take to send its PROXY header; `None`
    /// once it has (or when none is expected).
    header_due: Option<Instant>,
    /// The address counted against `--max-connections-per-ip`, if any.
    counted_ip: Option<std::net::IpAddr>,
    opened: Instant,
    last_active: Instant,
    /// Echo in the kernel's send queue, not yet acknowledged, when the idle
    /// timer last looked; `None` since the last traffic the worker saw.
    echo_queued: Option<usize>,
    /// Tells a reused slot from the connection an old idle timer was set for.
    serial: u64,
    /// Queued in `unfinished` for another turn; until it comes, events only
    /// add readiness, so a busy connection gets one turn per loop pass.
    owed_turn: bool,
}

/// What a timer of the worker's heap is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The end of the wait for a PROXY header.
    Header,
    /// The idle timeout.
    Idle,
}

/// Why the worker closed a connection, for the log line.
enum Ending {
    Echo(CloseReason),
    IdleTimeout,
    CutAtDeadline,
    /// Drained, and the peer's kernel had taken every byte of the echo.
    LingerCut,
    /// Drained, but the peer had not taken this many bytes of the echo (or
    /// the kernel would not say: `None`); `reset` if input was still unread,
    /// so that the close resets the connection and destroys them.
    CutUntaken {
        untaken: Option<usize>,
        reset: bool,
    },
    /// No valid PROXY header: why.
    ProxyHeader(String),
    /// The client the PROXY header named has `--max-connections-per-ip` open.
    AddressFull,
}

/// Everything a worker needs besides its thread.
pub(crate) struct WorkerSetup {
    pub(crate) index: usize,
    pub(crate) poll: Poll,
    /// The worker's own hold on its waker: closing the waker's descriptor
    /// would drop a wake-up still queued, such as the one that says "drain".
    pub(crate) _waker: Arc<mio::Waker>,
    pub(crate) inbox: Receiver<Handoff>,
    pub(crate) open: Arc<OpenConnections>,
    /// This worker's counts, which only this worker writes.
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) shutdown: ShutdownHandle,
    pub(crate) idle_timeout: Option<Duration>,
    /// The longest the worker spins on its event loop before sleeping.
    pub(crate) busy_poll: Duration,
    pub(crate) logger: Logger,
    /// The worker's UDP socket, registered with `poll` as [`UDP`].
    pub(crate) udp: Option<UdpEcho>,
    /// The per-address limit, applied here to the client a PROXY header names.
    pub(crate) max_connections_per_ip: Option<usize>,
    /// One warning a second at most, across the workers, about refused
    /// PROXY headers, and one about clients over their per-address limit.
    pub(crate) header_warnings: Arc<crate::log::SharedThrottle>,
    pub(crate) address_warnings: Arc<crate::log::SharedThrottle>,
}

/// A worker's event loop and the connections it owns.
pub(crate) struct Worker {
    setup: WorkerSetup,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    buf: Box<[u8]>,
    /// Idle deadlines, soonest first; stale entries are skipped when due.
    idle_timers: BinaryHeap<Reverse<(Instant, usize, u64, Timer)>>,
    /// Connections that used up their turn with bytes still to move.
    unfinished: Vec<usize>,
    /// The UDP socket used up its turn with datagrams perhaps still waiting.
    udp_owed: bool,
    drain_deadline: Option<Instant>,
    busy_poll: BusyPoll,
    /// The serial number of the last connection opened.
    last_serial: u64,
}

impl Worker {
    pub(crate) fn new(setup: WorkerSetup) -> Self {
        Worker {
            slots: Vec::new(),
            free: Vec::new(),
            buf: vec![0; READ_BUFFER_SIZE].into_boxed_slice(),
            idle_timers: BinaryHeap::new(),
            unfinished: Vec::new(),
            udp_owed: false,
            drain_deadline: None,
            busy_poll: BusyPoll::new(setup.busy_poll),
            last_serial: 0,
            setup,
        }
    }

    /// Serves until the drain is over, counting what it serves in its
    /// [`WorkerCounters`].
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(err) = self.wait_for_events(&mut events, timeout) {
                if interrupted(&err) {
                    // A signal landed on this thread; nothing is lost.
                    continue;
                }
                self.setup.logger.error(format_args!(
                    "worker {}: event loop failed: {}",
                    self.setup.index,
                    io_cause(&err)
                ));
                self.setup.shutdown.shutdown();
                self.cut_all();
                // Streams the acceptor sent that this worker will never
                // open: their places are given back.
                while let Ok(handoff) = self.setup.inbox.try_recv() {
                    let counted = (!handoff.awaits_proxy_header).then(|| handoff.peer.ip());
                    self.setup.open.release(Some(self.setup.index), counted);
                }
                break;
            }
            let now = Instant::now();
            // Taken first: what this pass leaves unfinished waits for the next.
            let owed = std::mem::take(&mut self.unfinished);
            let udp_owed = std::mem::take(&mut self.udp_owed);
            for event in events.iter() {
                match event.token() {
                    WAKE => self.take_handoffs(now),
                    UDP => self.serve_udp(event.is_readable() || event.is_error(), now),
                    token => self.serve(token.0 - 1, readiness(event), now),
                }
            }
            if udp_owed {
                self.serve_udp(true, now);
            }
            for index in owed {
                if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                    slot.owed_turn = false;
                }
                self.serve(index, Readiness::default(), now);
            }
            self.expire_idle(now);
            if let Some(udp) = self.setup.udp.as_mut()
                && udp.expire(now)
            {
                // The dropped echoes made room to read again.
                self.udp_owed = true;
            }
            if let Some(deadline) = self.drain_deadline {
                if self.open_count() == 0
                    && self.setup.udp.as_ref().is_none_or(UdpEcho::is_finished)
                {
                    break;
                }
                if now >= deadline {
                    self.cut_all();
                    break;
                }
            }
        }
        // Dropping the UDP socket closes it; its counts stay in the counters.
        self.setup.udp = None;
    }

    /// Gives the UDP socket its turn: read and echo what is waiting
    /// (`readable`: whether there may be input, not only send room).
    fn serve_udp(&mut self, readable: bool, now: Instant) {
        let Some(udp) = self.setup.udp.as_mut() else {
            return;
        };
        match udp.on_ready(readable, now) {
            Turn::Done | Turn::Blocked => {}
            Turn::More => self.udp_owed = true,
        }
    }

    /// Fills `events`, spinning first for the busy-poll window (see
    /// [`crate::server::busy_poll`]) and then sleeping until `timeout` at most.
    fn wait_for_events(
        &mut self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let poll = &mut self.setup.poll;
        if timeout == Some(Duration::ZERO) {
            return poll.poll(events, timeout);
        }
        if !self.busy_poll.enabled() {
            self.setup.counters.worker_sleeps.add(1);
            return poll.poll(events, timeout);
        }
        let began = Instant::now();
        let window = self.busy_poll.window();
        let mut contested = false;
        // A timer due within the window is served by the sleep below.
        if !window.is_zero() && timeout.is_none_or(|left| left > window) {
            // Counted before the first yield and after the spin: a yield
            // that let another thread run shows the CPU is contested (see
            // busy_poll). A catch on the first poll needs no count.
            let mut before_yields = None;
            loop {
                poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() {
                    self.setup.counters.busy_poll_catches.add(1);
                    contested = before_yields
                        .is_some_and(|before| busy_poll::involuntary_switches() != before);
                    self.busy_poll.after_catch(Waited {
                        events: events.iter().count(),
                        contested,
                    });
                    return Ok(());
                }
                if began.elapsed() >= window {
                    break;
                }
                if before_yields.is_none() {
                    before_yields = Some(busy_poll::involuntary_switches());
                }
                // Whatever else is runnable here, such as the peer that
                // will send the next message, goes first.
                std::thread::yield_now();
            }
            contested =
                before_yields.is_some_and(|before| busy_poll::involuntary_switches() != before);
        }
        let remaining = timeout.map(|left| left.saturating_sub(began.elapsed()));
        self.setup.counters.worker_sleeps.add(1);
        poll.poll(events, remaining)?;
        self.busy_poll.after_sleep(
            began.elapsed(),
            Waited {
                events: events.iter().count(),
                contested,
            },
        );
        Ok(())
    }

    fn open_count(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// How long the loop may sleep: until the soonest timer, or for ever.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.unfinished.is_empty() || self.udp_owed {
            return Some(Duration::ZERO);
        }
        let idle = self.idle_timers.peek().map(|Reverse((at, ..))| *at);
        let udp = self.setup.udp.as_ref().and_then(UdpEcho::wake_at);
        [idle, udp, self.drain_deadline]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Takes the streams the acceptor sent; a disconnected channel starts the drain.
    fn take_handoffs(&mut self, now: Instant) {
        loop {
            match self.setup.inbox.try_recv() {
                Ok(handoff) => self.open(handoff, now),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.begin_drain(now);
                    return;
                }
            }
        }
    }

    fn open(&mut self, handoff: Handoff, now: Instant) {
        let Handoff {
            mut stream,
            peer,
            awaits_proxy_header,
        } = handoff;
        let counted_ip = (!awaits_proxy_header).then(|| peer.ip());
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        // Registered once for everything, edge-triggered: no
        // re-registration is ever needed, whatever the connection does.
        if let Err(err) =
            self.setup
                .poll
                .registry()
                .register(&mut stream, Token(index + 1), CONNECTION_INTEREST)
        {
            self.setup.logger.warn(format_args!(
                "cannot serve {peer}: {}; closing it",
                io_cause(&err)
            ));
            self.free.push(index);
            self.setup.open.release(Some(self.setup.index), counted_ip);
            return;
        }
        self.setup.counters.connections_served.add(1);
        self.last_serial += 1;
        let serial = self.last_serial;
        let header_due = awaits_proxy_header.then(|| now + PROXY_HEADER_TIMEOUT);
        match header_due {
            // Logged with the client's address once the header names it.
            Some(due) => self
                .idle_timers
                .push(Reverse((due, index, serial, Timer::Header))),
            None => self
                .setup
                .logger
                .info(format_args!("open {peer} on worker {}", self.setup.index)),
        }
        // The idle timer of a connection that owes its header starts once
        // the header is taken.
        if let (Some(idle), None) = (self.setup.idle_timeout, header_due) {
            self.idle_timers.push(Reverse((
                deadline_after(now, idle),
                index,
                serial,
                Timer::Idle,
            )));
        }
        self.slots[index] = Some(Slot {
            stream,
            connection: Connection::new(),
            peer,
            header_due,
            counted_ip,
            opened: now,
            last_active: now,
            echo_queued: None,
            serial,
            owed_turn: false,
        });
        if self.drain_deadline.is_some() {
            self.start_draining(index, now);
        }
    }

    /// Moves bytes on one connection and closes it if it ended; for one that
    /// already has a turn coming, only notes `ready`.
    fn serve(&mut self, index: usize, ready: Readiness, now: Instant) {
        // An event can still arrive for a connection closed earlier in the batch.
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        if slot.owed_turn {
            slot.connection.note_ready(ready);
            return;
        }
        if slot.header_due.is_some() {
            self.read_proxy_header(index, ready, now);
            return;
        }
        let logger = self.setup.logger;
        let peer = slot.peer;
        let before = slot.connection.stats();
        let outcome = slot
            .connection
            .on_ready(&mut slot.stream, ready, &mut self.buf, |data| {
                if logger.enabled(LogLevel::Verbose) {
                    logger.debug(format_args!(
                        "{peer} sent {}: \"{}\"",
                        counted(data.len() as u64, "byte"),
                        preview(data)
                    ));
                }
            });
        let after = slot.connection.stats();
        if after != before {
            slot.last_active = now;
            slot.echo_queued = None;
            // Counted as the bytes move, not at the close, so that the
            // metrics see long connections too.
            count_bytes(&self.setup.counters, before, after);
        }
        match outcome {
            Outcome::Open => {
                if slot.connection.has_more_work() {
                    slot.owed_turn = true;
                    self.unfinished.push(index);
                }
            }
            Outcome::Closed(reason) => self.close(index, Ending::Echo(reason), now),
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        // Without a deadline the acceptor died rather than being told to stop.
        let deadline = self
            .setup
            .shutdown
            .deadline()
            .unwrap_or_else(|| deadline_after(now, self.setup.shutdown.timeout()));
        self.drain_deadline = Some(deadline);
        for index in 0..self.slots.len() {
            self.start_draining(index, now);
        }
        if let Some(udp) = self.setup.udp.as_mut() {
            udp.begin_drain(self.setup.index);
            self.serve_udp(true, now);
        }
    }

    fn start_draining(&mut self, index: usize, now: Instant) {
        if let Some(slot) = self.slots[index].as_mut() {
            // A connection still owing its PROXY header starts draining once
            // the header is taken: the drain must not echo the header's bytes.
            if slot.header_due.is_none() {
                slot.connection.begin_drain(&slot.stream);
            }
            self.serve(index, Readiness::default(), now);
        }
    }

    /// Peeks at a connection that owes its PROXY header; once a whole one
    /// is there, takes exactly its bytes, makes its client the connection's
    /// peer, and starts the echo with what follows it.
    fn read_proxy_header(&mut self, index: usize, ready: Readiness, now: Instant) {
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let room = crate::server::proxy_header::MAX_HEADER_LEN.min(self.buf.len());
        let peeked = loop {
            match slot.stream.peek(&mut self.buf[..room]) {
                // A signal landed: look again.
                Err(err) if interrupted(&err) => {}
                other => break other,
            }
        };
        let (len, client) = match peeked {
            Ok(0) => {
                let why = "the connection closed before a whole PROXY header".to_string();
                return self.close(index, Ending::ProxyHeader(why), now);
            }
            Ok(seen) => match crate::server::proxy_header::read_header(&self.buf[..seen]) {
                // The peer closed with a header it will never finish.
                HeaderRead::Incomplete if ready.closed => {
                    let why = "the connection closed before a whole PROXY header".to_string();
                    return self.close(index, Ending::ProxyHeader(why), now);
                }
                // More is on its way; its arrival is the next event.
                HeaderRead::Incomplete => return,
                HeaderRead::Invalid(why) => {
                    return self.close(index, Ending::ProxyHeader(why), now);
                }
                HeaderRead::Complete { len, client } => (len, client),
            },
            // Nothing yet: the next event brings it.
            Err(err) if would_block(&err) => return,
            Err(err) => {
                return self.close(index, Ending::Echo(CloseReason::Failed(err)), now);
            }
        };
        // The peeked bytes are in the socket: taking them cannot block.
        let mut taken = 0;
        while taken < len {
            match slot.stream.read(&mut self.buf[taken..len]) {
                Ok(0) => break,
                Ok(n) => taken += n,
                Err(err) if interrupted(&err) => {}
                Err(err) => {
                    return self.close(index, Ending::Echo(CloseReason::Failed(err)), now);
                }
            }
        }
        if taken < len {
            let why = "the connection closed inside its PROXY header".to_string();
            return self.close(index, Ending::ProxyHeader(why), now);
        }
        slot.header_due = None;
        if let Some(idle) = self.setup.idle_timeout {
            self.idle_timers.push(Reverse((
                deadline_after(slot.last_active, idle),
                index,
                slot.serial,
                Timer::Idle,
            )));
        }
        let proxy = slot.peer;
        // A v2 LOCAL header (the proxy's own health check) names no client:
        // the connection is the proxy's own.
        let client = client.unwrap_or(proxy);
        slot.peer = client;
        if let Some(max) = self.setup.max_connections_per_ip {
            if self.setup.open.admit_address(client.ip(), max).is_err() {
                self.setup.counters.refused_address_full.add(1);
                return self.close(index, Ending::AddressFull, now);
            }
            slot.counted_ip = Some(client.ip());
        }
        self.setup.logger.info(format_args!(
            "open {client} via {proxy} on worker {}",
            self.setup.index
        ));
        if self.drain_deadline.is_some() {
            slot.connection.begin_drain(&slot.stream);
        }
        // What the event said still holds for the bytes behind the header
        // (an end of stream, say), and they are there to read.
        let ready = Readiness {
            readable: true,
            ..ready
        };
        self.serve(index, ready, now);
    }

    /// Closes connections that owe their PROXY header past its time, and
    /// those idle for the whole idle timeout.
    fn expire_idle(&mut self, now: Instant) {
        while let Some(&Reverse((at, index, serial, timer))) = self.idle_timers.peek() {
            if at > now {
                break;
            }
            self.idle_timers.pop();
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if slot.serial != serial {
                continue;
            }
            if timer == Timer::Header {
                // A header taken in time leaves its timer behind: dropped.
                if slot.header_due.is_some_and(|due| due <= now) {
                    let why = format!(
                        "no whole PROXY header within {}",
                        humantime::format_duration(PROXY_HEADER_TIMEOUT)
                    );
                    self.close(index, Ending::ProxyHeader(why), now);
                }
                continue;
            }
            let Some(idle) = self.setup.idle_timeout else {
                continue;
            };
            let mut due = deadline_after(slot.last_active, idle);
            if due <= now {
                // A client taking its echo slowly moves no bytes the worker
                // sees while the echo waits in the kernel, and is not idle:
                // it is idle once that send queue has stood still for a whole
                // idle timeout, looked at now and again at the end of it.
                let queued = crate::socket::unacknowledged_len(&slot.stream).unwrap_or(0);
                due = match slot.echo_queued {
                    _ if queued == 0 => now,
                    Some(before) if queued >= before => now,
                    Some(_) => {
                        slot.last_active = now;
                        deadline_after(now, idle)
                    }
                    None => deadline_after(now, idle),
                };
                slot.echo_queued = (queued > 0).then_some(queued);
            }
            if due <= now {
                self.close(index, Ending::IdleTimeout, now);
            } else {
                self.idle_timers
                    .push(Reverse((due, index, serial, Timer::Idle)));
            }
        }
    }

    /// Drops the idle timers of closed connections once they outnumber the
    /// open ones, so heavy churn under a long idle timeout cannot pile them up.
    fn forget_stale_idle_timers(&mut self) {
        if self.idle_timers.len() <= 2 * self.open_count() + 1024 {
            return;
        }
        let slots = &self.slots;
        self.idle_timers.retain(|Reverse((_, index, serial, _))| {
            slots[*index]
                .as_ref()
                .is_some_and(|slot| slot.serial == *serial)
        });
    }

    /// The drain deadline came: close everything that is left.
    fn cut_all(&mut self) {
        let now = Instant::now();
        if let Some(udp) = self.setup.udp.as_mut() {
            udp.cut();
        }
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if slot.header_due.is_some() {
                let why = "the shutdown deadline came before a whole PROXY header".to_string();
                self.close(index, Ending::ProxyHeader(why), now);
                continue;
            }
            if !slot.connection.is_lingering() {
                self.close(index, Ending::CutAtDeadline, now);
                continue;
            }
            // One last discard: with its input all read, the close ends with
            // a FIN and the kernel goes on delivering the echo, where unread
            // input would make it a reset that destroys what is still queued.
            let readable = Readiness {
                readable: true,
                ..Readiness::default()
            };
            let before = slot.connection.stats();
            let outcome =
                slot.connection
                    .on_ready(&mut slot.stream, readable, &mut self.buf, |_| {});
            count_bytes(&self.setup.counters, before, slot.connection.stats());
            let ending = match outcome {
                Outcome::Closed(reason) => Ending::Echo(reason),
                // All of the echo is in the kernel, but "got every byte" holds
                // only if the peer's kernel acknowledged it; our end of stream
                // is the queue's last byte.
                Outcome::Open => match crate::socket::unacknowledged_len(&slot.stream) {
                    Some(queued) if queued <= 1 => Ending::LingerCut,
                    queued => Ending::CutUntaken {
                        untaken: queued.map(|queued| queued - 1),
                        reset: crate::socket::unread_len(&slot.stream).unwrap_or(0) > 0,
                    },
                },
            };
            self.close(index, ending, now);
        }
    }

    fn close(&mut self, index: usize, ending: Ending, now: Instant) {
        let Some(mut slot) = self.slots[index].take() else {
            return;
        };
        self.free.push(index);
        self.forget_stale_idle_timers();
        // Closing the descriptor removes it from epoll anyway; a failed
        // deregister changes nothing for the connection that is ending.
        let _ = self.setup.poll.registry().deregister(&mut slot.stream);
        // Its bytes were counted as they moved.
        let stats = slot.connection.stats();
        match ending {
            Ending::CutAtDeadline | Ending::CutUntaken { .. } => {
                self.setup.counters.connections_cut.add(1);
            }
            Ending::IdleTimeout => self.setup.counters.idle_timeouts.add(1),
            Ending::ProxyHeader(_) => self.setup.counters.proxy_headers_refused.add(1),
            Ending::Echo(_) | Ending::LingerCut | Ending::AddressFull => {}
        }
        match &ending {
            Ending::ProxyHeader(why) if self.setup.header_warnings.pass(now) => {
                self.setup.logger.warn(format_args!(
                    "connection from {} closed without a valid PROXY header: {why} \
                     (one such warning a second at most; the summary counts them all)",
                    slot.peer
                ));
            }
            Ending::AddressFull if self.setup.address_warnings.pass(now) => {
                self.setup.logger.warn(format_args!(
                    "per-address limit reached for {} (behind a proxy); refusing its new \
                     connections",
                    slot.peer.ip()
                ));
            }
            _ => {}
        }
        // Before the stream closes: a peer that has seen our end of stream
        // may connect again at once, and must find the place free.
        self.setup
            .open
            .release(Some(self.setup.index), slot.counted_ip);
        if let Ending::Echo(CloseReason::Failed(err)) = &ending {
            self.setup.logger.warn(format_args!(
                "connection {} failed: {}",
                slot.peer,
                io_cause(err)
            ));
        }
        if self.setup.logger.enabled(LogLevel::Normal) {
            self.setup.logger.info(format_args!(
                "close {}: {} echoed in {:.3}s ({})",
                slot.peer,
                counted(stats.echoed, "byte"),
                now.saturating_duration_since(slot.opened).as_secs_f64(),
                describe(&ending),
            ));
        }
    }
}

/// Adds what a connection moved between two looks at its stats.
#[inline]
fn count_bytes(counters: &WorkerCounters, before: ConnectionStats, after: ConnectionStats) {
    counters
        .bytes_received
        .add(after.received - before.received);
    counters.bytes_echoed.add(after.echoed - before.echoed);
    counters
        .bytes_discarded
        .add(after.discarded - before.discarded);
}

/// Why a connection closed, as its log line says it.
fn describe(ending: &Ending) -> String {
    match ending {
        Ending::Echo(CloseReason::Completed) => "peer closed".into(),
        Ending::Echo(CloseReason::Drained) => "drained".into(),
        Ending::Echo(CloseReason::PeerGone(kind)) => format!("peer gone: {kind}"),
        Ending::Echo(CloseReason::Failed(err)) => format!("failed: {}", io_cause(err)),
        Ending::IdleTimeout => "idle timeout".into(),
        Ending::ProxyHeader(why) => format!("no valid PROXY header: {why}"),
        Ending::AddressFull => "refused: the per-address limit (--max-connections-per-ip)".into(),
        Ending::CutAtDeadline => "cut at the shutdown deadline".into(),
        Ending::LingerCut => "drained; the peer had not closed by the deadline".into(),
        Ending::CutUntaken { untaken, reset } => {
            let untaken = match untaken {
                Some(bytes) => format!(
                    "the peer had not taken {} of the echo",
                    counted(*bytes as u64, "byte")
                ),
                None => "whether the peer took all of the echo is unknown".into(),
            };
            let fate = match reset {
                true => "the peer's input was still unread, so the close resets them away",
                false => "the kernel goes on delivering them unless the peer sends more",
            };
            format!("cut at the shutdown deadline: drained, but {untaken}; {fate}")
        }
    }
}

/// What an event says about a connection.
fn readiness(event: &Event) -> Readiness {
    Readiness {
        readable: event.is_readable(),
        writable: event.is_writable(),
        closed: event.is_read_closed() || event.is_write_closed() || event.is_error(),
        urgent: event.is_priority(),
    }
}
