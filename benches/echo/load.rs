//! The load side of the benchmark: the clients that drive a server under test.
//!
//! Three shapes, one per kind of case:
//! - [`round_trips`]: one connection, one message at a time, each round trip
//!   timed (case 1).
//! - [`Load`]: a few `load-N` threads, each a mio loop over many
//!   connections, each connection keeping a fixed number of messages in
//!   flight (cases 2, 3, 7, 8 and the active part of 4). Counters are read
//!   by the caller at the edges of its measuring window; in ping-pong, each
//!   round trip can also be timed while the caller's window is open (case 8).
//! - [`open_idle`]: many connections, each proved served by a one-byte echo
//!   and then left idle (case 4).
//!
//! Every echoed byte is checked against what was sent, so a server that
//! drops, reorders or invents bytes fails the run instead of looking fast.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use echo_chamber::error::{interrupted, would_block};
use mio::{Events, Interest, Poll, Token};

/// How long any single blocking step of the load side may take before the
/// run is declared failed; keeps every case bounded in time.
pub const STEP_LIMIT: Duration = Duration::from_secs(10);

/// Largest slice written or checked at once; also the read buffer's size.
const CHUNK: usize = 64 * 1024;

/// The byte stream every connection sends: byte `i` is `PATTERN[i % PERIOD]`.
/// A prime period means a shifted or repeated chunk does not line up by luck.
const PERIOD: usize = 251;

/// The stream pattern, stored long enough that any chunk of up to
/// [`CHUNK`] bytes at any offset is one contiguous slice.
struct Pattern {
    bytes: Vec<u8>,
}

impl Pattern {
    fn new() -> Pattern {
        let bytes = (0..PERIOD + CHUNK)
            .map(|i| ((i % PERIOD) * 7 + 13) as u8)
            .collect();
        Pattern { bytes }
    }

    /// The `len` (at most [`CHUNK`]) stream bytes starting at `offset`.
    fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PERIOD as u64) as usize;
        &self.bytes[start..start + len]
    }
}

/// Opens `count` client connections to `addr`, with `TCP_NODELAY` set.
///
/// # Errors
/// The first connect or socket-option failure, naming the connection.
pub fn connect(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>, String> {
    (0..count)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&addr, STEP_LIMIT)
                .map_err(|e| format!("connection {i} to {addr}: connect: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("connection {i}: TCP_NODELAY: {e}"))?;
            Ok(stream)
        })
        .collect()
}

/// Times `max_count` round trips (or as many as fit in `max_time`) of one
/// `message_len`-byte message on one fresh connection, after `warmup` untimed
/// ones. Each echo is checked byte for byte after its timer stops.
///
/// Messages up to 4 KiB use a plain blocking `write_all` then `read_exact`,
/// the cheapest client there is. Larger ones cannot: a server that writes
/// back while we are still writing could fill both directions' buffers and
/// deadlock, so they interleave nonblocking writes and reads around `poll`.
///
/// # Errors
/// Connect or I/O failures, a round trip slower than [`STEP_LIMIT`], or an
/// echo that differs from the message.
pub fn round_trips(
    addr: SocketAddr,
    message_len: usize,
    warmup: usize,
    max_count: usize,
    max_time: Duration,
) -> Result<Vec<Duration>, String> {
    let mut stream = connect(addr, 1)?.remove(0);
    let blocking = message_len <= 4 * 1024;
    if blocking {
        stream
            .set_read_timeout(Some(STEP_LIMIT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_LIMIT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
    } else {
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
    }
    let mut message: Vec<u8> = (0..message_len)
        .map(|i| ((i % PERIOD) * 7 + 13) as u8)
        .collect();
    let mut echo = vec![0u8; message_len];
    let mut times = Vec::with_capacity(max_count);
    let started = Instant::now();
    for round in 0..warmup + max_count {
        if round >= warmup && started.elapsed() >= max_time {
            break;
        }
        // A fresh leading counter per round, so a stale echo cannot pass.
        let stamp = (round as u64).to_le_bytes();
        let stamp_len = stamp.len().min(message_len);
        message[..stamp_len].copy_from_slice(&stamp[..stamp_len]);
        let begun = Instant::now();
        if blocking {
            stream
                .write_all(&message)
                .and_then(|()| stream.read_exact(&mut echo))
                .map_err(|e| format!("round trip {round} of {message_len} B: {e}"))?;
        } else {
            nonblocking_round_trip(&mut stream, &message, &mut echo)
                .map_err(|e| format!("round trip {round} of {message_len} B: {e}"))?;
        }
        let took = begun.elapsed();
        if echo != message {
            let at = echo.iter().zip(&message).position(|(a, b)| a != b);
            return Err(format!(
                "round trip {round} of {message_len} B: echo differs from message at byte {at:?}"
            ));
        }
        if round >= warmup {
            times.push(took);
        }
    }
    Ok(times)
}

/// Sends `message` and reads its echo into `echo` on a nonblocking socket,
/// writing and reading as each direction allows.
fn nonblocking_round_trip(
    stream: &mut TcpStream,
    message: &[u8],
    echo: &mut [u8],
) -> io::Result<()> {
    let (mut sent, mut received) = (0, 0);
    let deadline = Instant::now() + STEP_LIMIT;
    while received < echo.len() {
        while sent < message.len() {
            match stream.write(&message[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        loop {
            // Never read past what was sent: extra bytes would be a server bug
            // that the byte check must see, not a later round's input.
            let want = sent.min(echo.len());
            if received == want {
                break;
            }
            match stream.read(&mut echo[received..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => received += n,
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        if received == echo.len() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut events = libc::POLLIN;
        if sent < message.len() {
            events |= libc::POLLOUT;
        }
        let mut pollfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        let wait_ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, count 1, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, wait_ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if !interrupted(&err) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// What each connection of a [`Load`] does.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Bytes per message.
    pub message_len: usize,
    /// Messages a connection keeps in flight: 1 is ping-pong.
    pub window: usize,
}

/// Totals one load thread publishes after every batch of events.
#[derive(Default)]
struct Counters {
    echoes: AtomicU64,
    bytes: AtomicU64,
}

/// The most round trips one load thread times in a run of [`Load`]: bounds
/// its memory (8 MiB) whatever the window's length.
const MAX_TIMED_PER_THREAD: usize = 1 << 20;

/// A running load: threads `load-0`, `load-1`, … each driving its share of
/// the connections until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    /// While set, ping-pong round trips are timed ([`Load::start_timed`]).
    timing: Option<Arc<AtomicBool>>,
    counters: Vec<Arc<Counters>>,
    threads: Vec<JoinHandle<Result<Vec<Duration>, String>>>,
}

/// Sums of what every load thread has seen echoed so far.
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    /// Whole messages echoed and checked.
    pub echoes: u64,
    /// Bytes echoed and checked.
    pub bytes: u64,
}

impl Load {
    /// Spreads `streams` round-robin over `threads` load threads and starts
    /// them; each connection at once sends its first `spec.window` messages.
    ///
    /// # Errors
    /// Socket setup or thread spawn failures.
    pub fn start(streams: Vec<TcpStream>, spec: Spec, threads: usize) -> Result<Load, String> {
        Load::start_with(streams, spec, threads, None)
    }

    /// As [`Load::start`], and able to time each round trip, from the
    /// message's first write to its echo's last byte, while
    /// [`Load::time_round_trips`] is on; [`Load::stop`] returns the
    /// times. Ping-pong only: with more messages in flight, a round trip
    /// would include its wait behind the earlier ones.
    ///
    /// # Errors
    /// `spec.window` is not 1, or as [`Load::start`].
    pub fn start_timed(
        streams: Vec<TcpStream>,
        spec: Spec,
        threads: usize,
    ) -> Result<Load, String> {
        if spec.window != 1 {
            return Err(format!(
                "round trips are timed in ping-pong only, not with {} in flight",
                spec.window
            ));
        }
        let timing = Arc::new(AtomicBool::new(false));
        Load::start_with(streams, spec, threads, Some(timing))
    }

    fn start_with(
        streams: Vec<TcpStream>,
        spec: Spec,
        threads: usize,
        timing: Option<Arc<AtomicBool>>,
    ) -> Result<Load, String> {
        let threads = threads.max(1);
        let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, stream) in streams.into_iter().enumerate() {
            stream
                .set_nonblocking(true)
                .map_err(|e| format!("nonblocking: {e}"))?;
            shares[i % threads].push(stream);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Load {
            stop: Arc::clone(&stop),
            timing: timing.clone(),
            counters: Vec::new(),
            threads: Vec::new(),
        };
        for (i, share) in shares.into_iter().enumerate() {
            let counters = Arc::new(Counters::default());
            load.counters.push(Arc::clone(&counters));
            let stop = Arc::clone(&stop);
            let timing = timing.clone();
            let thread = thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || drive(share, spec, &stop, timing.as_deref(), &counters))
                .map_err(|e| format!("spawn load thread: {e}"))?;
            load.threads.push(thread);
        }
        Ok(load)
    }

    /// What has been echoed so far, over all threads.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            echoes: 0,
            bytes: 0,
        };
        for c in &self.counters {
            totals.echoes += c.echoes.load(Ordering::Relaxed);
            totals.bytes += c.bytes.load(Ordering::Relaxed);
        }
        totals
    }

    /// True once any load thread has ended early (it failed).
    pub fn any_finished(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
    }

    /// Turns the timing of round trips on or off (a load started with
    /// [`Load::start_timed`]; otherwise nothing is timed). A round trip is
    /// timed if it was sent while timing was on and ends while it still is.
    pub fn time_round_trips(&self, on: bool) {
        if let Some(timing) = &self.timing {
            timing.store(on, Ordering::Relaxed);
        }
    }

    /// Stops every thread, closes every connection and reports the first
    /// failure any thread met; else the round trips timed, unsorted (none
    /// unless started with [`Load::start_timed`]).
    ///
    /// # Errors
    /// A load thread's failure: I/O error, early close or wrong echo.
    pub fn stop(self) -> Result<Vec<Duration>, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first_failure = Ok(());
        let mut times = Vec::new();
        for thread in self.threads {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err("a load thread panicked".to_string()));
            match outcome {
                Ok(taken) => times.extend(taken),
                Err(e) if first_failure.is_ok() => first_failure = Err(e),
                Err(_) => {}
            }
        }
        first_failure.map(|()| times)
    }
}

/// One connection's progress through its stream.
struct Conn {
    stream: mio::net::TcpStream,
    sent: u64,
    received: u64,
    /// When the message in flight was first written, if it is being timed.
    sent_at: Option<Instant>,
}

/// One load thread: a mio loop over its connections until `stop`; returns
/// the round trips it timed while `timing` was set.
fn drive(
    streams: Vec<TcpStream>,
    spec: Spec,
    stop: &AtomicBool,
    timing: Option<&AtomicBool>,
    counters: &Counters,
) -> Result<Vec<Duration>, String> {
    let mut poll = Poll::new().map_err(|e| format!("load poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let pattern = Pattern::new();
    let mut buf = vec![0u8; CHUNK];
    let message_len = spec.message_len as u64;
    let mut conns = Vec::with_capacity(streams.len());
    for (i, stream) in streams.into_iter().enumerate() {
        let mut stream = mio::net::TcpStream::from_std(stream);
        poll.registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("load register: {e}"))?;
        conns.push(Conn {
            stream,
            sent: 0,
            received: 0,
            sent_at: None,
        });
    }
    let (mut echoes, mut bytes) = (0u64, 0u64);
    let mut times = Vec::new();
    let timing_on = || timing.is_some_and(|t| t.load(Ordering::Relaxed));
    for (i, conn) in conns.iter_mut().enumerate() {
        pump_write(conn, spec, &pattern, timing_on())
            .map_err(|e| format!("connection {i}: {e}"))?;
    }
    while !stop.load(Ordering::Relaxed) {
        let timed = timing_on() && times.len() < MAX_TIMED_PER_THREAD;
        match poll.poll(&mut events, Some(Duration::from_millis(20))) {
            Ok(()) => {}
            // A signal landed during the wait: just wait again.
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(format!("load poll: {e}")),
        }
        for event in &events {
            let i = event.token().0;
            let conn = &mut conns[i];
            let before = conn.received;
            pump_read(conn, &pattern, &mut buf).map_err(|e| format!("connection {i}: {e}"))?;
            echoes += conn.received / message_len - before / message_len;
            bytes += conn.received - before;
            // In ping-pong, everything sent has come back: one round trip ends.
            if conn.received > before
                && conn.received == conn.sent
                && let Some(sent_at) = conn.sent_at.take()
                && timed
            {
                times.push(sent_at.elapsed());
            }
            pump_write(conn, spec, &pattern, timed).map_err(|e| format!("connection {i}: {e}"))?;
        }
        counters.echoes.store(echoes, Ordering::Relaxed);
        counters.bytes.store(bytes, Ordering::Relaxed);
    }
    Ok(times)
}

/// Reads and checks everything the socket has.
fn pump_read(conn: &mut Conn, pattern: &Pattern, buf: &mut [u8]) -> Result<(), String> {
    loop {
        match conn.stream.read(buf) {
            Ok(0) => {
                return Err(format!(
                    "server closed the connection after echoing {} of {} bytes",
                    conn.received, conn.sent
                ));
            }
            Ok(n) => {
                if conn.received + n as u64 > conn.sent {
                    return Err(format!(
                        "server echoed {} bytes but only {} were sent",
                        conn.received + n as u64,
                        conn.sent
                    ));
                }
                if buf[..n] != *pattern.at(conn.received, n) {
                    return Err(format!(
                        "echo differs from what was sent within bytes {}..{}",
                        conn.received,
                        conn.received + n as u64
                    ));
                }
                conn.received += n as u64;
                // On Linux a short read means the socket was drained; new
                // data raises a fresh edge, so skip the read that would only
                // say WouldBlock. This keeps the load side cheap.
                if n < buf.len() {
                    return Ok(());
                }
            }
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Writes until the window is full or the socket pushes back; a message
/// begun while `timed` gets its start time.
fn pump_write(conn: &mut Conn, spec: Spec, pattern: &Pattern, timed: bool) -> Result<(), String> {
    let message_len = spec.message_len as u64;
    // Whole messages only: the next one may start once an earlier one is
    // fully echoed, so `window` is the number of messages in flight.
    let limit = (conn.received / message_len + spec.window as u64) * message_len;
    if timed && conn.sent < limit && conn.sent == conn.received {
        conn.sent_at = Some(Instant::now());
    }
    while conn.sent < limit {
        let len = (limit - conn.sent).min(CHUNK as u64) as usize;
        match conn.stream.write(pattern.at(conn.sent, len)) {
            Ok(0) => return Err("write returned 0".to_string()),
            Ok(n) => conn.sent += n as u64,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

/// Opens `count` connections to `addr` in batches of `batch`; each one
/// echoes one byte before the next batch starts. The echo proves the server
/// accepted and serves the connection, and the batching keeps the connect
/// rate within the server's listen backlog. The returned connections are
/// idle and blocking.
///
/// # Errors
/// The first connect, write or read failure, or a wrong echo.
pub fn open_idle(addr: SocketAddr, count: usize, batch: usize) -> Result<Vec<TcpStream>, String> {
    let mut streams: Vec<TcpStream> = Vec::with_capacity(count);
    while streams.len() < count {
        let first = streams.len();
        let batch_len = batch.min(count - first);
        streams.extend(connect(addr, batch_len).map_err(|e| format!("after {first}: {e}"))?);
        check_one_byte_echoes(&mut streams[first..], first)?;
    }
    Ok(streams)
}

/// Sends one byte on each stream, then reads each echo back.
///
/// # Errors
/// The first failure, naming the connection (counting from `first`).
pub fn check_one_byte_echoes(streams: &mut [TcpStream], first: usize) -> Result<(), String> {
    for (i, stream) in streams.iter_mut().enumerate() {
        let byte = [(first + i) as u8];
        stream
            .set_read_timeout(Some(STEP_LIMIT))
            .and_then(|()| stream.write_all(&byte))
            .map_err(|e| format!("connection {}: write: {e}", first + i))?;
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut echo = [0u8];
        stream
            .read_exact(&mut echo)
            .map_err(|e| format!("connection {}: read echo: {e}", first + i))?;
        if echo[0] != (first + i) as u8 {
            return Err(format!(
                "connection {}: echo was {:#04x}, sent {:#04x}",
                first + i,
                echo[0],
                (first + i) as u8
            ));
        }
    }
    Ok(())
}

/// One connection driven by one blocking thread (`load-blocking`): write a
/// message with `write_all`, read its echo with `read_exact`, check it, and
/// again, each round trip timed while timing is on. The cheapest client
/// there is, whose thread sleeps in `read` itself; case 9's one-connection
/// load beside the tokio one.
pub struct BlockingPingPong {
    stop: Arc<AtomicBool>,
    timing: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: JoinHandle<Result<Vec<Duration>, String>>,
}

impl BlockingPingPong {
    /// Starts the thread on `stream` with messages of `message_len` bytes
    /// (at most 4 KiB, so that a blocking `write_all` cannot deadlock).
    ///
    /// # Errors
    /// The message is too large, or socket set-up or spawn failed.
    pub fn start(mut stream: TcpStream, message_len: usize) -> Result<BlockingPingPong, String> {
        if message_len > 4 * 1024 {
            return Err(format!(
                "{message_len} B is too large for a blocking ping-pong"
            ));
        }
        stream
            .set_read_timeout(Some(STEP_LIMIT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_LIMIT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let timing = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let thread = {
            let (stop, timing, counters) = (
                Arc::clone(&stop),
                Arc::clone(&timing),
                Arc::clone(&counters),
            );
            thread::Builder::new()
                .name("load-blocking".to_string())
                .spawn(move || {
                    let mut message: Vec<u8> = (0..message_len)
                        .map(|i| ((i % PERIOD) * 7 + 13) as u8)
                        .collect();
                    let mut echo = vec![0u8; message_len];
                    let mut times = Vec::new();
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let stamp = round.to_le_bytes();
                        let stamp_len = stamp.len().min(message_len);
                        message[..stamp_len].copy_from_slice(&stamp[..stamp_len]);
                        let timed =
                            timing.load(Ordering::Relaxed) && times.len() < MAX_TIMED_PER_THREAD;
                        let begun = Instant::now();
                        stream
                            .write_all(&message)
                            .and_then(|()| stream.read_exact(&mut echo))
                            .map_err(|e| format!("round trip {round}: {e}"))?;
                        if timed && timing.load(Ordering::Relaxed) {
                            times.push(begun.elapsed());
                        }
                        if echo != message {
                            return Err(format!("round trip {round}: echo differs from message"));
                        }
                        round += 1;
                        counters.echoes.store(round, Ordering::Relaxed);
                        counters
                            .bytes
                            .store(round * message_len as u64, Ordering::Relaxed);
                    }
                    Ok(times)
                })
                .map_err(|e| format!("spawn load thread: {e}"))?
        };
        Ok(BlockingPingPong {
            stop,
            timing,
            counters,
            thread,
        })
    }

    /// What has been echoed so far.
    pub fn totals(&self) -> Totals {
        Totals {
            echoes: self.counters.echoes.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
        }
    }

    /// True once the thread has ended early (it failed).
    pub fn any_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Turns the timing of round trips on or off.
    pub fn time_round_trips(&self, on: bool) {
        self.timing.store(on, Ordering::Relaxed);
    }

    /// Stops the thread and reports its failure, else its timed round trips.
    ///
    /// # Errors
    /// An I/O error or a wrong echo.
    pub fn stop(self) -> Result<Vec<Duration>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the load thread panicked".to_string()))
    }
}
