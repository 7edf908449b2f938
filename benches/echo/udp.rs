//! The load side of the UDP case (case 6): the clients that drive a UDP
//! echo server and account for every datagram.
//!
//! Two shapes:
//! - [`UdpLoad`]: a few `load-N` threads, each a mio loop over its share of
//!   the flows. A flow is one connected UDP socket keeping a fixed number
//!   of datagrams in flight; a datagram whose echo has not come within
//!   [`ECHO_TIMEOUT`] counts as lost and its place goes to the next one, so
//!   a lossy server slows a flow but never stalls it. The load batches as
//!   the server does: one `recvmmsg` takes what a flow's socket holds and
//!   one `sendmmsg` refills the flow's window.
//! - [`ping_pong`]: one flow, one datagram at a time, each round trip timed.
//!
//! Every datagram carries its flow id and sequence number ([`HEADER_LEN`]
//! bytes) and then a pattern that depends on both, so each echo is checked
//! byte for byte and told apart as echoed, late (after it was counted
//! lost), duplicated, reordered (after an echo of a later datagram of its
//! flow) or corrupted (wrong size or bytes, or never sent).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use echo_chamber::error::{interrupted, would_block};
use mio::{Events, Interest, Poll, Token};

/// How long an echo may take before its datagram counts as lost.
pub const ECHO_TIMEOUT: Duration = Duration::from_millis(200);

/// Flow id (u32) then sequence number (u64), little-endian.
pub const HEADER_LEN: usize = 12;

/// How often the load looks for echoes that timed out; also its longest
/// sleep, so a stop is seen within it.
const SWEEP: Duration = Duration::from_millis(10);

/// Datagrams taken per `recvmmsg`: twice a window of 4, so that duplicates
/// do not need a second call.
const RECV_BATCH: usize = 8;

/// Sequence numbers whose fate a flow remembers, for telling a duplicate
/// from a late echo.
const REMEMBERED: u64 = 1024;

/// The pattern's period: a prime, so a shifted payload does not match by luck.
const PERIOD: usize = 251;

/// What each flow of a [`UdpLoad`] does.
#[derive(Clone, Copy, Debug)]
pub struct UdpSpec {
    /// Bytes per datagram, at least [`HEADER_LEN`].
    pub size: usize,
    /// Datagrams each flow keeps in flight.
    pub window: usize,
}

/// The payload pattern: datagram (flow, seq) carries, after its header,
/// the bytes of `bytes` from an offset that depends on both.
struct Pattern {
    bytes: Vec<u8>,
}

impl Pattern {
    fn new(size: usize) -> Pattern {
        let bytes = (0..PERIOD + size)
            .map(|i| ((i % PERIOD) * 7 + 13) as u8)
            .collect();
        Pattern { bytes }
    }

    /// Writes datagram (flow, seq) into `buf`, which is its whole size.
    fn fill(&self, buf: &mut [u8], flow: u32, seq: u64) {
        buf[..4].copy_from_slice(&flow.to_le_bytes());
        buf[4..HEADER_LEN].copy_from_slice(&seq.to_le_bytes());
        let body = &mut buf[HEADER_LEN..];
        body.copy_from_slice(self.body(flow, seq, body.len()));
    }

    fn body(&self, flow: u32, seq: u64, len: usize) -> &[u8] {
        let start = ((seq % PERIOD as u64) * 13 + u64::from(flow) * 31) as usize % PERIOD;
        &self.bytes[start..start + len]
    }
}

/// The flow id and sequence number in a datagram's header, if it has one.
fn header(datagram: &[u8]) -> Option<(u32, u64)> {
    let flow = u32::from_le_bytes(datagram.get(..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(datagram.get(4..HEADER_LEN)?.try_into().ok()?);
    Some((flow, seq))
}

/// Counts of a load so far, or over a window (see [`Tally::since`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Datagrams sent.
    pub sent: u64,
    /// Echoes that came back exact and in time.
    pub echoed: u64,
    /// Bytes in those echoes.
    pub bytes: u64,
    /// Datagrams whose echo did not come within [`ECHO_TIMEOUT`].
    pub lost: u64,
    /// Echoes that came after their datagram was counted lost.
    pub late: u64,
    /// Echoes of a datagram already echoed.
    pub duplicated: u64,
    /// Echoes that came after an echo of a later datagram of their flow.
    pub reordered: u64,
    /// Echoes of the wrong size or bytes, or of a datagram never sent.
    pub corrupted: u64,
    /// Sends or receives refused by ICMP port unreachable (no server).
    pub refused: u64,
}

impl Tally {
    /// The counts from `earlier` to `self`.
    pub fn since(&self, earlier: &Tally) -> Tally {
        Tally {
            sent: self.sent - earlier.sent,
            echoed: self.echoed - earlier.echoed,
            bytes: self.bytes - earlier.bytes,
            lost: self.lost - earlier.lost,
            late: self.late - earlier.late,
            duplicated: self.duplicated - earlier.duplicated,
            reordered: self.reordered - earlier.reordered,
            corrupted: self.corrupted - earlier.corrupted,
            refused: self.refused - earlier.refused,
        }
    }

    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.echoed += other.echoed;
        self.bytes += other.bytes;
        self.lost += other.lost;
        self.late += other.late;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.corrupted += other.corrupted;
        self.refused += other.refused;
    }

    /// Lost datagrams as a percentage of those whose fate is known.
    pub fn loss_percent(&self) -> f64 {
        let settled = self.echoed + self.lost;
        if settled == 0 {
            0.0
        } else {
            self.lost as f64 * 100.0 / settled as f64
        }
    }
}

/// What one load thread publishes after every pass of its loop.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    echoed: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    late: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    corrupted: AtomicU64,
    refused: AtomicU64,
}

impl Counters {
    fn publish(&self, tally: &Tally) {
        self.sent.store(tally.sent, Ordering::Relaxed);
        self.echoed.store(tally.echoed, Ordering::Relaxed);
        self.bytes.store(tally.bytes, Ordering::Relaxed);
        self.lost.store(tally.lost, Ordering::Relaxed);
        self.late.store(tally.late, Ordering::Relaxed);
        self.duplicated.store(tally.duplicated, Ordering::Relaxed);
        self.reordered.store(tally.reordered, Ordering::Relaxed);
        self.corrupted.store(tally.corrupted, Ordering::Relaxed);
        self.refused.store(tally.refused, Ordering::Relaxed);
    }

    fn read(&self) -> Tally {
        Tally {
            sent: self.sent.load(Ordering::Relaxed),
            echoed: self.echoed.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
            corrupted: self.corrupted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// A running UDP load: threads `load-0`, `load-1`, … each driving its share
/// of the flows until [`UdpLoad::stop`].
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    counters: Vec<Arc<Counters>>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl UdpLoad {
    /// Opens `flows` UDP sockets on 127.0.0.1, each connected to `server`,
    /// spreads them round-robin over `threads` load threads and starts
    /// them; each flow at once sends its first `spec.window` datagrams.
    ///
    /// # Errors
    /// Socket setup or thread spawn failures.
    pub fn start(
        server: SocketAddr,
        flows: usize,
        spec: UdpSpec,
        threads: usize,
    ) -> Result<UdpLoad, String> {
        assert!(spec.size >= HEADER_LEN, "a datagram must hold its header");
        assert!(spec.window <= SLOTS, "one sendmmsg refills a window");
        let threads = threads.max(1);
        let mut shares: Vec<Vec<(u32, UdpSocket)>> = (0..threads).map(|_| Vec::new()).collect();
        for id in 0..flows {
            let socket = connected_socket(server).map_err(|e| format!("flow {id}: {e}"))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("flow {id}: nonblocking: {e}"))?;
            shares[id % threads].push((id as u32, socket));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = UdpLoad {
            stop: Arc::clone(&stop),
            counters: Vec::new(),
            threads: Vec::new(),
        };
        for (i, share) in shares.into_iter().enumerate() {
            let counters = Arc::new(Counters::default());
            load.counters.push(Arc::clone(&counters));
            let stop = Arc::clone(&stop);
            let thread = thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || drive(share, spec, &stop, &counters))
                .map_err(|e| format!("spawn load thread: {e}"))?;
            load.threads.push(thread);
        }
        Ok(load)
    }

    /// What every thread has counted so far.
    pub fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for c in &self.counters {
            tally.add(&c.read());
        }
        tally
    }

    /// True once any load thread has ended early (it failed).
    pub fn any_finished(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
    }

    /// Stops every thread and reports the first failure any thread met.
    ///
    /// # Errors
    /// A load thread's I/O failure.
    pub fn stop(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first_failure = Ok(());
        for thread in self.threads {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err("a load thread panicked".to_string()));
            if first_failure.is_ok() {
                first_failure = outcome;
            }
        }
        first_failure
    }
}

/// A UDP socket on 127.0.0.1 port 0, connected to `server`: the kernel
/// then takes only the server's datagrams, and sends need no address.
fn connected_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(server)?;
    Ok(socket)
}

/// One flow's socket and the fate of its datagrams.
struct Flow {
    socket: mio::net::UdpSocket,
    id: u32,
    next_seq: u64,
    /// Datagrams awaiting their echo and when they were sent, oldest first.
    in_flight: VecDeque<(u64, Instant)>,
    /// The highest sequence number echoed so far.
    highest: Option<u64>,
    /// A bit per sequence number (modulo [`REMEMBERED`]): set once echoed.
    answered: [u64; (REMEMBERED / 64) as usize],
    /// Queued to refill its window this pass.
    owed: bool,
}

impl Flow {
    fn answered(&self, seq: u64) -> bool {
        let bit = seq % REMEMBERED;
        self.answered[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_answered(&mut self, seq: u64, answered: bool) {
        let bit = seq % REMEMBERED;
        let word = &mut self.answered[(bit / 64) as usize];
        if answered {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
    }

    /// Sorts one echo into the tally.
    fn account(&mut self, datagram: &[u8], spec: UdpSpec, pattern: &Pattern, tally: &mut Tally) {
        let Some((id, seq)) = header(datagram) else {
            tally.corrupted += 1;
            return;
        };
        if id != self.id || seq >= self.next_seq {
            tally.corrupted += 1;
            return;
        }
        let exact = datagram.len() == spec.size
            && datagram[HEADER_LEN..] == *pattern.body(id, seq, spec.size - HEADER_LEN);
        let waiting = self.in_flight.iter().position(|(s, _)| *s == seq);
        if let Some(at) = waiting {
            self.in_flight.remove(at);
            self.set_answered(seq, true);
            if !exact {
                tally.corrupted += 1;
                return;
            }
            tally.echoed += 1;
            tally.bytes += datagram.len() as u64;
            match self.highest {
                Some(highest) if highest > seq => tally.reordered += 1,
                _ => self.highest = Some(seq),
            }
        } else if !exact {
            tally.corrupted += 1;
        } else if self.next_seq - seq > REMEMBERED || !self.answered(seq) {
            // Counted lost already (or too long ago to tell): late.
            self.set_answered(seq, true);
            tally.late += 1;
        } else {
            tally.duplicated += 1;
        }
    }
}

/// One load thread: a mio loop over its flows until `stop`.
fn drive(
    share: Vec<(u32, UdpSocket)>,
    spec: UdpSpec,
    stop: &AtomicBool,
    counters: &Counters,
) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| format!("load poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let pattern = Pattern::new(spec.size);
    let mut flows = Vec::with_capacity(share.len());
    for (at, (id, socket)) in share.into_iter().enumerate() {
        let mut socket = mio::net::UdpSocket::from_std(socket);
        poll.registry()
            .register(&mut socket, Token(at), Interest::READABLE)
            .map_err(|e| format!("load register: {e}"))?;
        flows.push(Flow {
            socket,
            id,
            next_seq: 0,
            in_flight: VecDeque::with_capacity(spec.window),
            highest: None,
            answered: [0; (REMEMBERED / 64) as usize],
            owed: true,
        });
    }
    // One slot of room per datagram, plus a byte to see an oversized echo.
    let slot = spec.size + 1;
    let mut io = BatchBuffers::new(slot);
    let mut tally = Tally::default();
    let mut owed: Vec<usize> = (0..flows.len()).collect();
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for &at in &owed {
            let flow = &mut flows[at];
            flow.owed = false;
            refill(flow, spec, &pattern, &mut io, now, &mut tally)
                .map_err(|e| format!("flow {}: send: {e}", flow.id))?;
        }
        owed.clear();
        // A flow whose send was refused or cut short is owed again at the
        // next sweep, below.
        counters.publish(&tally);
        match poll.poll(&mut events, Some(SWEEP)) {
            Ok(()) => {}
            // A signal landed during the wait: look again next pass.
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(format!("load poll: {e}")),
        }
        for event in &events {
            let at = event.token().0;
            let flow = &mut flows[at];
            receive(flow, spec, &pattern, &mut io, &mut tally)
                .map_err(|e| format!("flow {}: receive: {e}", flow.id))?;
            if flow.in_flight.len() < spec.window && !flow.owed {
                flow.owed = true;
                owed.push(at);
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= SWEEP {
            last_sweep = now;
            for (at, flow) in flows.iter_mut().enumerate() {
                while let Some(&(_, sent)) = flow.in_flight.front() {
                    if now.duration_since(sent) < ECHO_TIMEOUT {
                        break;
                    }
                    flow.in_flight.pop_front();
                    tally.lost += 1;
                }
                if flow.in_flight.len() < spec.window && !flow.owed {
                    flow.owed = true;
                    owed.push(at);
                }
            }
        }
    }
    counters.publish(&tally);
    Ok(())
}

/// Sends as many new datagrams as the flow's window has room for, with one
/// `sendmmsg`.
fn refill(
    flow: &mut Flow,
    spec: UdpSpec,
    pattern: &Pattern,
    io: &mut BatchBuffers,
    now: Instant,
    tally: &mut Tally,
) -> io::Result<()> {
    let room = spec.window - flow.in_flight.len().min(spec.window);
    if room == 0 {
        return Ok(());
    }
    for at in 0..room {
        let seq = flow.next_seq + at as u64;
        pattern.fill(io.slot_mut(at, spec.size), flow.id, seq);
        io.lens[at] = spec.size;
    }
    let sent = loop {
        match io.send(flow.socket.as_raw_fd(), room) {
            Ok(sent) => break sent,
            // The send buffer is full: the flow tries again next pass.
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if interrupted(&e) => continue,
            // An ICMP port unreachable from an earlier send: no server (yet,
            // or any more). The window waits for the next pass.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tally.refused += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    };
    for _ in 0..sent {
        let seq = flow.next_seq;
        flow.set_answered(seq, false);
        flow.in_flight.push_back((seq, now));
        flow.next_seq += 1;
    }
    tally.sent += sent as u64;
    Ok(())
}

/// Takes and sorts everything the flow's socket holds.
fn receive(
    flow: &mut Flow,
    spec: UdpSpec,
    pattern: &Pattern,
    io: &mut BatchBuffers,
    tally: &mut Tally,
) -> io::Result<()> {
    loop {
        let got = match io.receive(flow.socket.as_raw_fd(), RECV_BATCH) {
            Ok(got) => got,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if interrupted(&e) => continue,
            // A pending ICMP error was reported instead of a datagram; the
            // datagrams behind it are still there.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tally.refused += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        for at in 0..got {
            let datagram = io.received(at);
            flow.account(datagram, spec, pattern, tally);
        }
        // Fewer than asked for: the socket is empty, and a new datagram
        // raises a fresh edge.
        if got < RECV_BATCH {
            return Ok(());
        }
    }
}

/// Datagrams one [`BatchBuffers`] holds: enough for [`RECV_BATCH`] and for
/// any window the bench uses.
const SLOTS: usize = 8;

/// Buffers for one `recvmmsg` or `sendmmsg` on a connected socket. The
/// `unsafe` of the batched calls is kept here, behind safe methods.
struct BatchBuffers {
    slot: usize,
    data: Vec<u8>,
    lens: [usize; SLOTS],
    truncated: [bool; SLOTS],
}

impl BatchBuffers {
    fn new(slot: usize) -> BatchBuffers {
        BatchBuffers {
            slot,
            data: vec![0; slot * SLOTS],
            lens: [0; SLOTS],
            truncated: [false; SLOTS],
        }
    }

    fn slot_mut(&mut self, at: usize, len: usize) -> &mut [u8] {
        &mut self.data[at * self.slot..][..len]
    }

    /// Datagram `at` of the last receive; a truncated one is given its whole
    /// slot, one byte more than any datagram sent, so its size check fails.
    fn received(&self, at: usize) -> &[u8] {
        let len = if self.truncated[at] {
            self.slot
        } else {
            self.lens[at]
        };
        &self.data[at * self.slot..][..len]
    }

    /// Headers for the first `count` slots, each `len(at)` bytes long.
    fn headers(
        &mut self,
        count: usize,
        len: impl Fn(usize) -> usize,
        iovecs: &mut [libc::iovec; SLOTS],
    ) -> [libc::mmsghdr; SLOTS] {
        // SAFETY: mmsghdr is plain data (pointers and integers), valid when
        // all zero; no address is given or asked for (the socket is connected).
        let mut headers: [libc::mmsghdr; SLOTS] = unsafe { std::mem::zeroed() };
        for at in 0..count {
            iovecs[at] = libc::iovec {
                iov_base: self.data[at * self.slot..].as_mut_ptr().cast(),
                iov_len: len(at),
            };
            headers[at].msg_hdr.msg_iov = &raw mut iovecs[at];
            headers[at].msg_hdr.msg_iovlen = 1;
        }
        headers
    }

    /// Receives up to `count` datagrams.
    fn receive(&mut self, fd: RawFd, count: usize) -> io::Result<usize> {
        let count = count.min(SLOTS);
        let slot = self.slot;
        let mut iovecs = empty_iovecs();
        let mut headers = self.headers(count, |_| slot, &mut iovecs);
        // SAFETY: each of the first `count` headers points at its own iovec,
        // each iovec at its own `slot` bytes of `data`; all outlive the call.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for (at, header) in headers.iter().enumerate().take(got) {
            self.lens[at] = header.msg_len as usize;
            self.truncated[at] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(got)
    }

    /// Sends the first `count` slots (each `lens[at]` bytes); returns how
    /// many went.
    fn send(&mut self, fd: RawFd, count: usize) -> io::Result<usize> {
        let count = count.min(SLOTS);
        let lens = self.lens;
        let mut iovecs = empty_iovecs();
        let mut headers = self.headers(count, |at| lens[at], &mut iovecs);
        // SAFETY: as in `receive`; the kernel only reads the buffers.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

fn empty_iovecs() -> [libc::iovec; SLOTS] {
    std::array::from_fn(|_| libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    })
}

/// What [`ping_pong`] saw.
pub struct PingPong {
    /// Round-trip times of the echoes that came back in time, in order.
    pub times: Vec<Duration>,
    /// Datagrams whose echo did not come within [`ECHO_TIMEOUT`].
    pub lost: u64,
    /// Echoes of earlier, already lost datagrams that came while waiting.
    pub late: u64,
}

/// Times `max_count` round trips (or as many as fit in `max_time`) of one
/// `size`-byte datagram at a time on one fresh flow, after `warmup` untimed
/// ones. Each echo is checked byte for byte after its timer stops.
///
/// # Errors
/// Socket failures, or an echo that differs from its datagram.
pub fn ping_pong(
    server: SocketAddr,
    size: usize,
    warmup: usize,
    max_count: usize,
    max_time: Duration,
) -> Result<PingPong, String> {
    let socket = connected_socket(server).map_err(|e| format!("socket: {e}"))?;
    socket
        .set_read_timeout(Some(ECHO_TIMEOUT))
        .map_err(|e| format!("read timeout: {e}"))?;
    let pattern = Pattern::new(size);
    let mut datagram = vec![0u8; size];
    let mut echo = vec![0u8; size + 1];
    let mut outcome = PingPong {
        times: Vec::with_capacity(max_count),
        lost: 0,
        late: 0,
    };
    let started = Instant::now();
    for seq in 0..(warmup + max_count) as u64 {
        if seq >= warmup as u64 && started.elapsed() >= max_time {
            break;
        }
        pattern.fill(&mut datagram, 0, seq);
        let begun = Instant::now();
        socket
            .send(&datagram)
            .map_err(|e| format!("datagram {seq}: send: {e}"))?;
        let took = loop {
            match socket.recv(&mut echo) {
                Ok(len) => match header(&echo[..len]) {
                    Some((0, s)) if s == seq => break Some((begun.elapsed(), len)),
                    Some((0, s)) if s < seq => outcome.late += 1,
                    _ => return Err(format!("datagram {seq}: echo of a datagram never sent")),
                },
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::TimedOut => break None,
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(format!("datagram {seq}: receive: {e}")),
            }
            // A stale echo came: wait out the rest of this datagram's time.
            if begun.elapsed() >= ECHO_TIMEOUT {
                break None;
            }
        };
        let Some((took, len)) = took else {
            outcome.lost += 1;
            continue;
        };
        if echo[..len] != datagram[..] {
            return Err(format!(
                "datagram {seq} of {size} B: echo of {len} B differs from it"
            ));
        }
        if seq >= warmup as u64 {
            outcome.times.push(took);
        }
    }
    Ok(outcome)
}
