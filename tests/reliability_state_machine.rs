//! The connection's echo state machine on its own, the last step of the flow
//! acceptor → channel → worker → connection, driven through a fake stream
//! that misbehaves in every way a socket may: reads and writes move arbitrary
//! partial amounts, block and get interrupted at random, the peer pauses
//! reading, sends urgent data, half-closes or resets at random points, and the
//! server starts its drain at a random moment. Whatever happens, the output is an exact prefix
//! of the input, and all of it when nothing cut the connection short.
//!
//! Two drivers stand in for the worker's event loop: a level-triggered one
//! (readiness reported whenever it holds, stream with `SHORT_READ_DRAINS =
//! false`), and an edge-triggered one that reports readiness only when it is
//! new, as epoll with `EPOLLET` does, over a stream whose short reads really
//! mean "empty for now" (`SHORT_READ_DRAINS = true`).

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::time::Duration;

use echo_chamber::server::config::MAX_PENDING_OUTPUT;
use echo_chamber::server::connection::{CloseReason, Connection, EchoStream, Outcome, Readiness};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::{payload, with_time_limit};

/// Driver steps before a case counts as stalled. A healthy case needs tens
/// of thousands at most (the send buffer is at least 1/1024 of the input);
/// a connection that stops moving bytes needs for ever.
const MAX_STEPS: u32 = 200_000;

/// A small deterministic random source (xorshift64*), seeded by proptest.
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Self {
        Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// A number from 1 to `max` (at least 1).
    fn upto(&mut self, max: usize) -> usize {
        1 + (self.next() % max.max(1) as u64) as usize
    }
}

/// The other end of the connection and the kernel between them, seen by the
/// server as a stream. `EDGE` selects the edge-triggered contract.
struct FakeStream<const EDGE: bool> {
    dice: Dice,
    /// Everything the peer will send.
    input: Vec<u8>,
    /// How much of `input` the peer has sent so far.
    arrived: usize,
    /// How much of `input` the server has read.
    read_pos: usize,
    /// The peer has half-closed after sending all of `input`.
    peer_eof: bool,
    /// The peer reset the connection.
    reset: bool,
    /// Whether the peer sometimes sends its last byte as urgent data.
    sends_urgent: bool,
    /// Where urgent bytes sit in `input`, not yet read past. As on Linux with
    /// `SO_OOBINLINE`, a read that has copied anything stops short of one.
    urgent_marks: Vec<usize>,
    /// A signal is pending for the server's thread. Linux then answers a
    /// read that starts at an urgent mark with EAGAIN, though bytes are
    /// there; the signal is handled as the call returns.
    signal_pending: bool,
    /// Everything the server wrote.
    output: Vec<u8>,
    /// Free space in the send buffer, and its size.
    room: usize,
    capacity: usize,
    shutdown_calls: u32,
    /// Edge-trigger bookkeeping: the server saw the stream empty (or full)
    /// since the last event, so the next arrival (or free space) is news.
    read_exhausted: bool,
    write_blocked: bool,
    read_event: bool,
    write_event: bool,
    closed_event: bool,
    urgent_event: bool,
}

impl<const EDGE: bool> FakeStream<EDGE> {
    fn new(input: Vec<u8>, capacity: usize, seed: u64, sends_urgent: bool) -> Self {
        FakeStream {
            dice: Dice::new(seed),
            input,
            arrived: 0,
            read_pos: 0,
            peer_eof: false,
            reset: false,
            sends_urgent,
            urgent_marks: Vec::new(),
            signal_pending: false,
            output: Vec::new(),
            room: capacity,
            capacity,
            shutdown_calls: 0,
            read_exhausted: false,
            write_blocked: false,
            read_event: false,
            write_event: false,
            closed_event: false,
            urgent_event: false,
        }
    }

    fn available(&self) -> usize {
        self.arrived - self.read_pos
    }

    /// The peer sends up to `max` more bytes.
    fn peer_sends(&mut self, max: usize) {
        let left = self.input.len() - self.arrived;
        if left == 0 || self.reset {
            return;
        }
        self.arrived += self.dice.upto(max.min(left));
        if std::mem::take(&mut self.read_exhausted) {
            self.read_event = true;
        }
        // Like `send(.., MSG_OOB)`: the last byte sent is urgent, and the
        // kernel reports that at once (EPOLLPRI), whatever the server read.
        if self.sends_urgent && self.dice.chance(20) {
            self.urgent_marks.push(self.arrived - 1);
            self.urgent_event = true;
        }
    }

    /// The peer half-closes, once everything is sent.
    fn peer_half_closes(&mut self) {
        if self.arrived == self.input.len() && !self.peer_eof && !self.reset {
            self.peer_eof = true;
            self.closed_event = true;
        }
    }

    /// The peer reads some of what the server wrote, freeing send buffer.
    fn peer_reads(&mut self) {
        let used = self.capacity - self.room;
        if used == 0 {
            return;
        }
        self.room += self.dice.upto(used);
        if std::mem::take(&mut self.write_blocked) {
            self.write_event = true;
        }
    }

    fn peer_resets(&mut self) {
        self.reset = true;
        self.closed_event = true;
    }

    /// What the event loop reports now, if anything.
    fn readiness(&mut self) -> Readiness {
        if EDGE {
            let closed = std::mem::take(&mut self.closed_event);
            Readiness {
                readable: std::mem::take(&mut self.read_event) || closed,
                writable: std::mem::take(&mut self.write_event),
                closed,
                urgent: std::mem::take(&mut self.urgent_event),
            }
        } else {
            let closed = self.peer_eof || self.reset;
            Readiness {
                readable: self.available() > 0 || closed,
                writable: self.room > 0,
                closed,
                urgent: !self.urgent_marks.is_empty(),
            }
        }
    }
}

impl<const EDGE: bool> Read for FakeStream<EDGE> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(
            !buf.is_empty(),
            "the connection read into an empty buffer, which looks like an end of stream"
        );
        if self.reset {
            return Err(ErrorKind::ConnectionReset.into());
        }
        if self.dice.chance(5) {
            return Err(ErrorKind::Interrupted.into());
        }
        let signal = std::mem::take(&mut self.signal_pending);
        if EDGE && signal && self.urgent_marks.contains(&self.read_pos) {
            // No new edge: nothing arrived.
            return Err(ErrorKind::WouldBlock.into());
        }
        let available = self.available();
        if available == 0 {
            self.read_exhausted = true;
            return if self.peer_eof {
                Ok(0)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        // A level-triggered socket may say WouldBlock spuriously and return
        // any short amount; an edge-triggered one's short read means empty.
        if !EDGE && self.dice.chance(10) {
            return Err(ErrorKind::WouldBlock.into());
        }
        let most = available.min(buf.len());
        let mut n = if EDGE { most } else { self.dice.upto(most) };
        // A read stops short of the next urgent byte; one that starts at it
        // reads through it (inline) up to the mark after.
        let next_mark = self.urgent_marks.iter().find(|&&mark| mark > self.read_pos);
        let stopped_at_mark = next_mark.is_some_and(|&mark| mark - self.read_pos < n);
        if let Some(&mark) = next_mark.filter(|_| stopped_at_mark) {
            n = mark - self.read_pos;
        }
        buf[..n].copy_from_slice(&self.input[self.read_pos..self.read_pos + n]);
        self.read_pos += n;
        let read_pos = self.read_pos;
        self.urgent_marks.retain(|&mark| mark >= read_pos);
        if EDGE && n < buf.len() && !stopped_at_mark {
            self.read_exhausted = true;
        }
        Ok(n)
    }
}

impl<const EDGE: bool> Write for FakeStream<EDGE> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        assert_eq!(
            self.shutdown_calls, 0,
            "the connection wrote after shutting down its sending side"
        );
        if self.reset {
            return Err(ErrorKind::BrokenPipe.into());
        }
        if self.dice.chance(5) {
            return Err(ErrorKind::Interrupted.into());
        }
        if data.is_empty() {
            return Ok(0);
        }
        if self.room == 0 || (!EDGE && self.dice.chance(10)) {
            self.write_blocked = true;
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self.dice.upto(self.room.min(data.len()));
        self.output.extend_from_slice(&data[..n]);
        self.room -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<const EDGE: bool> EchoStream for FakeStream<EDGE> {
    const SHORT_READ_DRAINS: bool = EDGE;

    /// The edge-triggered fake tells, like a TCP socket's FIONREAD, so the
    /// drain echoes exactly what had arrived; the level-triggered one does
    /// not, so the drain reads until the stream blocks.
    fn unread_len(&self) -> Option<usize> {
        EDGE.then_some(self.arrived - self.read_pos)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown_calls += 1;
        if self.reset {
            return Err(ErrorKind::NotConnected.into());
        }
        Ok(())
    }
}

/// One generated case: what the peer sends and how the world behaves.
#[derive(Debug, Clone)]
struct Scenario {
    len: usize,
    data_seed: u64,
    chaos_seed: u64,
    /// The worker's shared read buffer.
    buf_len: usize,
    /// The send buffer between server and peer.
    capacity: usize,
    /// The most the peer sends in one step.
    send_max: usize,
    /// The step at which the server starts draining, if it does.
    drain_at: Option<u32>,
    /// The step at which the peer resets, if it does.
    reset_at: Option<u32>,
    /// The peer waits for the echo of what it sent before sending more, as a
    /// request-response client does: a lost wake-up then stalls the case.
    lockstep: bool,
    /// The peer sometimes sends urgent data.
    urgent: bool,
}

fn scenarios() -> impl Strategy<Value = Scenario> {
    // Large inputs get a large read buffer so that a case stays fast; small
    // inputs meet every buffer size, down to one byte.
    let sizes = prop_oneof![
        (0usize..64, 1usize..8),
        (0usize..8_000, 1usize..4_096),
        (64_000usize..200_000, 4_096usize..=65_536),
    ];
    (
        sizes,
        any::<u64>(),
        any::<u64>(),
        1usize..=256 * 1024,
        1usize..=64 * 1024,
        proptest::option::weighted(0.4, 0u32..120),
        proptest::option::weighted(0.2, 0u32..120),
        proptest::bool::weighted(0.4),
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(
                (len, buf_len),
                data_seed,
                chaos_seed,
                capacity,
                send_max,
                drain_at,
                reset_at,
                lockstep,
                urgent,
            )| {
                Scenario {
                    len,
                    data_seed,
                    chaos_seed,
                    buf_len,
                    // Small steps on a large input would only make the case slow:
                    // a 1-byte send buffer needs over a million steps for 200 KB.
                    capacity: capacity.max(len / 1024),
                    send_max: send_max.max(len / 64),
                    drain_at,
                    reset_at,
                    lockstep,
                    urgent,
                }
            },
        )
}

/// Runs one scenario to the connection's end and checks every invariant on
/// the way. `EDGE` chooses the driver and the stream contract.
fn run_scenario<const EDGE: bool>(scenario: &Scenario) -> Result<(), TestCaseError> {
    let input = payload(scenario.data_seed, scenario.len);
    let mut stream = FakeStream::<EDGE>::new(
        input,
        scenario.capacity,
        scenario.chaos_seed,
        scenario.urgent,
    );
    let mut world = Dice::new(scenario.chaos_seed ^ 0xA5A5_5A5A);
    let mut buf = vec![0u8; scenario.buf_len];
    let mut connection = Connection::new();
    let mut inspected = Vec::new();
    let mut drained = false;
    // The peer sometimes stops reading for a while: backpressure.
    let mut peer_paused_for = 0u32;
    let pending_bound = MAX_PENDING_OUTPUT + scenario.buf_len;

    // Registration reports what is ready at once, as epoll does.
    let mut first = Some(Readiness {
        writable: true,
        ..Readiness::default()
    });
    let mut reason = None;
    for step in 0..MAX_STEPS {
        if scenario.reset_at == Some(step) {
            stream.peer_resets();
        }
        // A waiting peer stops waiting once it sees the server's end of stream.
        let waiting =
            scenario.lockstep && stream.shutdown_calls == 0 && stream.output.len() < stream.arrived;
        if !waiting && world.chance(60) {
            stream.peer_sends(scenario.send_max);
        }
        if world.chance(20) {
            stream.signal_pending = true;
        }
        if !waiting && world.chance(5) {
            stream.peer_half_closes();
        }
        if peer_paused_for > 0 {
            peer_paused_for -= 1;
        } else if world.chance(2) {
            peer_paused_for = world.upto(300) as u32;
        } else if world.chance(60) {
            stream.peer_reads();
        }
        let mut must_call = false;
        if scenario.drain_at == Some(step) {
            connection.begin_drain(&stream);
            drained = true;
            must_call = true;
        }
        let ready = first.take().unwrap_or_else(|| stream.readiness());
        let any = ready.readable || ready.writable || ready.closed || ready.urgent;
        if !(any || must_call || connection.has_more_work()) {
            continue;
        }
        let outcome = connection.on_ready(&mut stream, ready, &mut buf, |chunk| {
            inspected.extend_from_slice(chunk)
        });

        let stats = connection.stats();
        prop_assert!(
            connection.pending_len() <= pending_bound,
            "pending output {} exceeds the bound {pending_bound} (MAX_PENDING_OUTPUT + one read)",
            connection.pending_len()
        );
        prop_assert_eq!(
            stats.received + stats.discarded,
            stream.read_pos as u64,
            "received + discarded must be every byte read"
        );
        prop_assert_eq!(
            stats.echoed,
            stream.output.len() as u64,
            "echoed must be every byte written"
        );
        prop_assert_eq!(
            stats.received,
            stats.echoed + connection.pending_len() as u64,
            "every received byte is either echoed or pending"
        );
        if let Outcome::Closed(why) = outcome {
            reason = Some(why);
            break;
        }
    }
    let Some(reason) = reason else {
        return Err(TestCaseError::fail(format!(
            "the connection did not end within {MAX_STEPS} steps: read {} of {} bytes \
             (peer eof: {}), wrote {}, pending {}, send buffer room {} of {}",
            stream.read_pos,
            stream.input.len(),
            stream.peer_eof,
            stream.output.len(),
            connection.pending_len(),
            stream.room,
            stream.capacity
        )));
    };

    let stats = connection.stats();
    let received = stats.received as usize;
    // Whatever ended the connection, the echo is an exact prefix of the input,
    // and `inspect` saw exactly the received bytes.
    prop_assert!(
        stream.output[..] == stream.input[..stream.output.len()],
        "the output is not a prefix of the input"
    );
    prop_assert!(
        inspected[..] == stream.input[..received],
        "inspect did not see exactly the received bytes"
    );
    match reason {
        CloseReason::Completed => {
            prop_assert!(stream.peer_eof, "completed before the peer's end of stream");
            prop_assert_eq!(stream.output.len(), stream.input.len(), "echo incomplete");
            prop_assert_eq!(stats.discarded, 0);
            // Our end of stream is the caller's close, after every byte.
            prop_assert_eq!(stream.shutdown_calls, 0);
        }
        CloseReason::Drained => {
            prop_assert!(drained, "drained without a drain");
            prop_assert_eq!(
                stream.output.len(),
                received,
                "a drain must echo all it received"
            );
            prop_assert_eq!(
                stream.read_pos,
                stream.input.len(),
                "lingering stops at the end"
            );
            prop_assert_eq!(
                stats.discarded as usize,
                stream.input.len() - received,
                "bytes after the drain count as discarded"
            );
            prop_assert_eq!(stream.shutdown_calls, 1);
        }
        CloseReason::PeerGone(_) => {
            prop_assert!(stream.reset, "peer gone without a reset");
        }
        CloseReason::Failed(err) => {
            return Err(TestCaseError::fail(format!("unexpected failure: {err}")));
        }
    }
    Ok(())
}

fn run_cases<const EDGE: bool>(cases: u32) {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(failure) = runner.run(&scenarios(), |scenario| run_scenario::<EDGE>(&scenario)) {
        panic!("{failure}");
    }
}

#[test]
fn level_triggered_echo_is_exact_under_partial_io_blocking_half_close_reset_and_drain() {
    with_time_limit(Duration::from_secs(120), || run_cases::<false>(192));
}

#[test]
fn edge_triggered_echo_is_exact_when_only_new_readiness_is_reported() {
    with_time_limit(Duration::from_secs(120), || run_cases::<true>(192));
}
