//! One connection's echo state machine, the last step of the flow
//! acceptor → channel → worker → connection.
//!
//! It knows nothing of sockets, threads or event loops: the worker hands it a
//! stream (anything [`EchoStream`]), the readiness that the event loop saw,
//! and the worker's shared read buffer. That keeps the echo logic independent
//! of the transport and lets tests drive it through a fake stream.
//!
//! Bytes go straight from the shared read buffer back to the stream. Only the
//! tail that a short write leaves behind is kept, in a per-connection pending
//! buffer, and while that tail reaches [`MAX_PENDING_OUTPUT`] the connection
//! stops reading (backpressure). An idle connection holds no buffer at all.

use std::io::{self, ErrorKind, Read, Write};

use crate::error::{interrupted, is_peer_gone, would_block};
use crate::server::config::MAX_PENDING_OUTPUT;

/// Read-and-echo rounds one connection may take per turn, so that a fast
/// peer cannot starve the others on its worker (16 × 64 KiB = 1 MiB).
const ROUNDS_PER_TURN: usize = 16;

/// A byte stream the echo runs over: a TCP stream, or a fake one in tests.
pub trait EchoStream: Read + Write {
    /// Whether a read that fills less than the buffer proves the stream has
    /// nothing more to read until the next readable event. True for TCP on
    /// Linux with edge-triggered epoll; it saves a `read` that would only
    /// return `WouldBlock`. The exception, urgent data, comes with
    /// [`Readiness::urgent`] set.
    const SHORT_READ_DRAINS: bool = false;

    /// Shuts down the sending side so the peer reads a clean end of stream.
    ///
    /// # Errors
    /// The `shutdown` error; a peer that is already gone is not an error.
    fn shutdown_write(&mut self) -> io::Result<()>;

    /// Bytes received and waiting to be read, if the stream can tell. The
    /// drain echoes exactly these (and not what a fast peer sends after the
    /// shutdown began); `None` makes it read until the stream blocks.
    fn unread_len(&self) -> Option<usize> {
        None
    }
}

impl EchoStream for mio::net::TcpStream {
    const SHORT_READ_DRAINS: bool = cfg!(target_os = "linux");

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }

    fn unread_len(&self) -> Option<usize> {
        crate::socket::unread_len(self)
    }
}

/// What the event loop saw for one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Bytes (or an end of stream) may be waiting.
    pub readable: bool,
    /// The stream may take more bytes.
    pub writable: bool,
    /// The peer closed or reset: read until the end, even after a short read.
    pub closed: bool,
    /// The peer sent TCP urgent data. A read stops short at the urgent mark
    /// with more bytes queued behind it, so short reads prove nothing now.
    pub urgent: bool,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Echoing whatever arrives.
    Echoing,
    /// The server is shutting down: echo what has arrived, then close.
    Draining,
    /// Our sending side is shut; read and discard until the peer's end of
    /// stream, so that closing cannot reset echoed bytes still unread.
    Lingering,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer closed its sending side and got every byte back. Our side
    /// is still open: closing the stream ends it.
    Completed,
    /// The drain finished: every received byte was echoed and the peer closed.
    Drained,
    /// The peer reset or abandoned the connection.
    PeerGone(ErrorKind),
    /// An unexpected I/O error.
    Failed(io::Error),
}

/// Whether the connection goes on after an event.
#[derive(Debug)]
pub enum Outcome {
    /// Wait for the next readiness event.
    Open,
    /// Drop the stream; the connection is over.
    Closed(CloseReason),
}

/// Byte counts of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Bytes read while echoing.
    pub received: u64,
    /// Bytes written back.
    pub echoed: u64,
    /// Bytes read after our sending side was shut, thrown away.
    pub discarded: u64,
}

/// The echo state of one connection. Owns no socket and, when idle, no buffer.
#[derive(Debug)]
pub struct Connection {
    /// The unwritten tail, from `pending_start` on.
    pending: Vec<u8>,
    pending_start: usize,
    /// Readiness hints: cleared when the stream says `WouldBlock`, set by events.
    readable: bool,
    writable: bool,
    /// Read until the stream blocks, even after a short read: the peer
    /// closed or reset, or once sent urgent data.
    read_to_block: bool,
    /// We read the peer's end of stream.
    peer_done: bool,
    phase: Phase,
    /// While draining: how many more bytes may be read and echoed.
    drain_allowance: Option<usize>,
    stats: ConnectionStats,
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

/// What one I/O step decided.
enum Step {
    Progress,
    Blocked,
}

impl Connection {
    /// A new connection. A fresh stream is writable, and may already hold
    /// bytes, so both hints start set.
    pub fn new() -> Self {
        Connection {
            pending: Vec::new(),
            pending_start: 0,
            readable: true,
            writable: true,
            read_to_block: false,
            peer_done: false,
            phase: Phase::Echoing,
            drain_allowance: None,
            stats: ConnectionStats::default(),
        }
    }

    /// The connection's byte counts so far.
    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// Bytes received but not yet written back.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_start
    }

    /// Whether the connection has delivered all its echoes and only waits
    /// for the peer to close. Such a connection is not cut by a deadline.
    pub fn is_lingering(&self) -> bool {
        self.phase == Phase::Lingering
    }

    /// Starts the drain: echo what has arrived, including what sits in the
    /// stream's receive buffer now, then close. What the peer sends after
    /// this is not echoed, so a peer that never stops sending cannot hold
    /// the drain open. Call [`Connection::on_ready`] afterwards so it runs
    /// even without a new event.
    pub fn begin_drain<S: EchoStream>(&mut self, stream: &S) {
        if self.phase == Phase::Echoing {
            self.phase = Phase::Draining;
            self.drain_allowance = stream.unread_len();
            // The receive buffer may hold bytes whose event is not handled yet.
            self.readable = true;
        }
    }

    /// Records what the event loop saw without moving any bytes, for a
    /// connection that already has a turn coming: the next
    /// [`Connection::on_ready`] acts on it.
    pub fn note_ready(&mut self, ready: Readiness) {
        self.readable |= ready.readable || ready.closed || ready.urgent;
        self.writable |= ready.writable || ready.closed;
        self.read_to_block |= ready.closed || ready.urgent;
    }

    /// Moves bytes until the stream blocks or the connection ends.
    ///
    /// `buf` is the worker's shared read buffer; nothing in it outlives this
    /// call. `inspect` sees every chunk received while echoing (for `-v`).
    pub fn on_ready<S, F>(
        &mut self,
        stream: &mut S,
        ready: Readiness,
        buf: &mut [u8],
        mut inspect: F,
    ) -> Outcome
    where
        S: EchoStream,
        F: FnMut(&[u8]),
    {
        self.note_ready(ready);
        match self.pump(stream, buf, &mut inspect) {
            Ok(outcome) => outcome,
            Err(err) => Outcome::Closed(classify(err)),
        }
    }

    fn pump<S: EchoStream>(
        &mut self,
        stream: &mut S,
        buf: &mut [u8],
        inspect: &mut dyn FnMut(&[u8]),
    ) -> io::Result<Outcome> {
        for _ in 0..ROUNDS_PER_TURN {
            if self.phase == Phase::Lingering {
                return self.discard(stream, buf);
            }
            let mut progressed = false;
            if self.pending_len() > 0 && self.writable {
                progressed |= matches!(self.flush(stream)?, Step::Progress);
            }
            if self.may_read() {
                progressed |= matches!(self.echo_once(stream, buf, inspect)?, Step::Progress);
            }
            if self.pending_len() == 0 {
                if self.peer_done {
                    // Everything the peer sent is back; its side is already
                    // closed. Our end of stream is the caller's close: with
                    // nothing unread it is a FIN, not a reset, and a server
                    // can free the connection's place before the peer sees it.
                    return Ok(Outcome::Closed(CloseReason::Completed));
                }
                if self.phase == Phase::Draining && !self.may_read() {
                    shutdown_write(stream)?;
                    self.phase = Phase::Lingering;
                    self.readable = true;
                    continue;
                }
            }
            if !progressed {
                return Ok(Outcome::Open);
            }
        }
        // Out of turns; the worker sees `has_more_work` and comes back.
        Ok(Outcome::Open)
    }

    /// Whether the stream may still move bytes without a new event: the
    /// connection used up its turn, and the worker must come back to it.
    pub fn has_more_work(&self) -> bool {
        match self.phase {
            Phase::Lingering => self.readable,
            _ => self.may_read() || (self.pending_len() > 0 && self.writable),
        }
    }

    fn may_read(&self) -> bool {
        self.readable
            && !self.peer_done
            && self.pending_len() < MAX_PENDING_OUTPUT
            && self.drain_allowance != Some(0)
    }

    /// One read, and the echo of what it brought.
    fn echo_once<S: EchoStream>(
        &mut self,
        stream: &mut S,
        buf: &mut [u8],
        inspect: &mut dyn FnMut(&[u8]),
    ) -> io::Result<Step> {
        let mut room = buf.len().min(MAX_PENDING_OUTPUT - self.pending_len());
        if let Some(allowance) = self.drain_allowance {
            room = room.min(allowance);
        }
        let received = match self.read_retrying_at_urgent_mark(stream, &mut buf[..room])? {
            None => {
                self.readable = false;
                return Ok(Step::Blocked);
            }
            Some(0) => {
                self.peer_done = true;
                self.readable = false;
                return Ok(Step::Progress);
            }
            Some(n) => n,
        };
        if S::SHORT_READ_DRAINS && received < room && !self.read_to_block {
            self.readable = false;
        }
        self.stats.received += received as u64;
        if let Some(allowance) = self.drain_allowance.as_mut() {
            *allowance -= received;
        }
        inspect(&buf[..received]);
        let data = &buf[..received];
        let written = if self.pending_len() == 0 && self.writable {
            self.write_some(stream, data)?
        } else {
            0
        };
        if written < received {
            self.keep_pending(&data[written..]);
        }
        Ok(Step::Progress)
    }

    /// Writes from `data` until it is all written or the stream blocks.
    fn write_some<S: EchoStream>(&mut self, stream: &mut S, data: &[u8]) -> io::Result<usize> {
        let mut written = 0;
        while written < data.len() {
            match stream.write(&data[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    self.stats.echoed += n as u64;
                }
                // A signal interrupted the call before it moved anything: retry.
                Err(err) if interrupted(&err) => {}
                // The send buffer is full: the rest waits for a writable event.
                Err(err) if would_block(&err) => {
                    self.writable = false;
                    break;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(written)
    }

    fn keep_pending(&mut self, tail: &[u8]) {
        if self.pending_start > 0 && self.pending_start >= self.pending_len() {
            // Drop what was written once it is at least as large as what is
            // left: the buffer stays within twice the cap plus one read
            // however long a slow reader keeps it non-empty, and each byte is
            // moved at most once on average.
            self.pending.drain(..self.pending_start);
            self.pending_start = 0;
        }
        self.pending.extend_from_slice(tail);
    }

    /// Writes the pending tail.
    fn flush<S: EchoStream>(&mut self, stream: &mut S) -> io::Result<Step> {
        let pending = std::mem::take(&mut self.pending);
        let result = self.write_some(stream, &pending[self.pending_start..]);
        self.pending = pending;
        let written = result?;
        self.pending_start += written;
        if self.pending_start == self.pending.len() {
            // Drained: give the memory back so idle connections hold nothing.
            self.pending = Vec::new();
            self.pending_start = 0;
        }
        Ok(if written > 0 {
            Step::Progress
        } else {
            Step::Blocked
        })
    }

    /// One read, as [`read`] does it. After urgent data, a `WouldBlock` with
    /// bytes still queued is Linux's answer to a read that starts at the
    /// urgent mark while a signal is pending for the thread (EAGAIN, not
    /// EINTR). The signal was handled as the call returned: read once more.
    fn read_retrying_at_urgent_mark<S: EchoStream>(
        &self,
        stream: &mut S,
        buf: &mut [u8],
    ) -> io::Result<Option<usize>> {
        let first = read(stream, buf)?;
        if first.is_none() && self.read_to_block && stream.unread_len().is_some_and(|n| n > 0) {
            return read(stream, buf);
        }
        Ok(first)
    }

    /// Lingering: read and throw away until the peer's end of stream.
    fn discard<S: EchoStream>(&mut self, stream: &mut S, buf: &mut [u8]) -> io::Result<Outcome> {
        for _ in 0..ROUNDS_PER_TURN {
            if !self.readable {
                break;
            }
            match self.read_retrying_at_urgent_mark(stream, buf)? {
                None => self.readable = false,
                Some(0) => return Ok(Outcome::Closed(CloseReason::Drained)),
                Some(n) => self.stats.discarded += n as u64,
            }
        }
        Ok(Outcome::Open)
    }
}

/// One read: `Some(n)` bytes (0 is the end of stream), `None` when it would block.
fn read<S: Read>(stream: &mut S, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            // A signal interrupted the call before it moved anything: retry.
            Err(err) if interrupted(&err) => {}
            // Nothing to read until the next readable event.
            Err(err) if would_block(&err) => return Ok(None),
            Err(err) => return Err(err),
        }
    }
}

fn shutdown_write<S: EchoStream>(stream: &mut S) -> io::Result<()> {
    match stream.shutdown_write() {
        // The peer is already gone: there is nobody left to tell.
        Err(err) if err.kind() == ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Sorts the error that ended a connection: a peer that left is normal.
fn classify(err: io::Error) -> CloseReason {
    if is_peer_gone(&err) {
        CloseReason::PeerGone(err.kind())
    } else {
        CloseReason::Failed(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends `incoming` bytes and reads `outgoing` bytes per turn.
    struct SteadyPeer {
        sent: Vec<u8>,
        read_at: usize,
        arrived: usize,
        room: usize,
        echoed: Vec<u8>,
    }

    impl Read for SteadyPeer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.arrived - self.read_at);
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            buf[..n].copy_from_slice(&self.sent[self.read_at..self.read_at + n]);
            self.read_at += n;
            Ok(n)
        }
    }

    impl Write for SteadyPeer {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = data.len().min(self.room);
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.echoed.extend_from_slice(&data[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl EchoStream for SteadyPeer {
        fn shutdown_write(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_but_steady_reader_never_grows_the_pending_buffer_past_its_cap() {
        const TURNS: usize = 2000;
        const PER_TURN: usize = 10_000;
        let sent: Vec<u8> = (0..TURNS * PER_TURN + 40_000)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut peer = SteadyPeer {
            sent,
            read_at: 0,
            arrived: 40_000,
            room: 0,
            echoed: Vec::new(),
        };
        let mut connection = Connection::new();
        let mut buf = vec![0; 64 * 1024];
        let ready = Readiness {
            readable: true,
            writable: true,
            ..Readiness::default()
        };
        // A 40 KB backlog the peer never quite catches up with.
        assert!(matches!(
            connection.on_ready(&mut peer, ready, &mut buf, |_| {}),
            Outcome::Open
        ));
        let mut largest = 0;
        for _ in 0..TURNS {
            peer.arrived += PER_TURN;
            peer.room = PER_TURN;
            let outcome = connection.on_ready(&mut peer, ready, &mut buf, |_| {});
            assert!(matches!(outcome, Outcome::Open));
            largest = largest.max(connection.pending.capacity());
        }
        // Twice the cap plus one read, rounded up to the Vec's doubling.
        assert!(
            largest <= 4 * MAX_PENDING_OUTPUT,
            "the pending buffer grew to {largest} bytes of capacity"
        );
        let echoed = peer.echoed.len();
        assert_eq!(
            peer.echoed[..],
            peer.sent[..echoed],
            "the echo is a prefix of the input"
        );
        assert_eq!(echoed + connection.pending_len(), peer.read_at);
    }
}
