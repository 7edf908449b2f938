//! The echo client: the other side of the flow. It opens connections to any
//! RFC 862 echo server, sends messages, reads back exactly as many bytes as it
//! sent and compares them byte for byte, timing every round trip.
//!
//! ```text
//! ClientConfig ─▶ run() ─▶ event loops (engine) ─▶ connections ─▶ Event (observer)
//!                   ▲                                                  │
//!              StopHandle (Ctrl-C, tests)               tallies merged into a Report
//! ```
//!
//! Connections run on a few mio event loops (`engine`), each owning its
//! share of them for the whole run, closed-loop or at a fixed `rate`, and
//! with `reconnect` opening them again when the server ends them (the rule
//! is in `reconnect`). `run_lines`, one interactive connection, keeps a
//! thread with blocking sockets (`echo`).
//! [`udp`] is the same client
//! over UDP: flows of datagrams instead of connections, on event loops too.
//! The `echo-client`
//! binary only parses arguments, prints [`Event`]s and the [`Report`], and
//! picks the exit code; the tests and benchmarks call this module directly.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::TcpListener;
//! use echo_chamber::client::{self, ClientConfig, Payload, StopHandle};
//!
//! // A minimal echo server for the example: echo one connection until EOF.
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! std::thread::spawn(move || {
//!     if let Ok((mut stream, _)) = listener.accept() {
//!         let mut reader = stream.try_clone().expect("clone the accepted socket");
//!         // The example server ends when the client hangs up.
//!         let _ = std::io::copy(&mut reader, &mut stream);
//!     }
//! });
//!
//! let config = ClientConfig {
//!     target: addr.to_string().parse()?,
//!     payload: Payload::Text(b"Hello Echo!".to_vec()),
//!     repeat: 3,
//!     ..ClientConfig::default()
//! };
//! let report = client::run(&config, &|_event| {}, &StopHandle::new())?;
//! assert_eq!((report.sent, report.echoed), (3, 3));
//! assert!(report.is_success());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod echo;
mod engine;
mod failure;
mod interval;
mod payload;
mod reconnect;
mod report;
mod rtt;
mod stop;
mod target;
pub mod udp;

use std::io::BufRead;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

pub use failure::{Failure, FailureKind};
pub use interval::Interval;
pub use reconnect::Reconnect;
pub use report::Report;
pub use rtt::RttStats;
pub use stop::StopHandle;
pub use target::{Target, TargetError};

use echo::ConnectionTally;

/// The largest message: each connection holds two buffers of it (what was
/// sent and what came back). Also the longest `--stdin` line, newline included.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The most connections one run opens: more than one client address can
/// open to one server port (about 28,000 with Linux's default ephemeral
/// ports, 64,000 at most), with room for a target of several addresses.
pub const MAX_CONNECTIONS: usize = 100_000;

/// What to send, where, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The echo server, as `host:port`.
    pub target: Target,
    /// The bytes of each message.
    pub payload: Payload,
    /// Echoes per connection; `0` means until [`StopHandle::stop`] is called.
    pub repeat: u64,
    /// Pause between two echoes on one connection, like `ping -i`.
    pub interval: Duration,
    /// Bounds the connect, each round trip (send plus complete echo), and
    /// the wait for the server's close after the last echo.
    pub timeout: Duration,
    /// Concurrent connections, each doing `repeat` echoes over one kept-open
    /// connection.
    pub connections: NonZeroUsize,
    /// Open a connection again when the server ends it, and go on (TCP only;
    /// [`udp::run`] ignores it). A message the server ended the connection
    /// on before echoing any of it is sent again; see [`Reconnect`].
    /// It runs on the event loops like any run, with all the options below.
    pub reconnect: bool,
    /// Event-loop threads; `None` for one per CPU. Never more than
    /// connections.
    pub threads: Option<NonZeroUsize>,
    /// Connects started per second at most, over all connections (TCP
    /// only: [`udp::run`] ignores it).
    pub connect_rate: Option<u64>,
    /// Open loop: echoes per second over all connections, each sent when
    /// due on a connection with no echo out, and timed from when it was
    /// due. `repeat` then counts echoes per connection on average. For
    /// [`udp::run`], datagrams per second over all flows, in place of
    /// `interval`.
    pub rate: Option<u64>,
    /// Sending ends this long after the start (echoes out still finish).
    pub duration: Option<Duration>,
    /// How often [`run_with_intervals`] reports an [`Interval`].
    pub report_every: Option<Duration>,
}

impl Default for ClientConfig {
    /// `127.0.0.1:9999`, `"Hello Echo!"` once, no interval, a 5 s timeout, one
    /// connection, no reconnecting.
    fn default() -> Self {
        ClientConfig {
            target: Target::new("127.0.0.1", 9999),
            payload: Payload::Text(b"Hello Echo!".to_vec()),
            repeat: 1,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(5),
            connections: NonZeroUsize::MIN,
            reconnect: false,
            threads: None,
            connect_rate: None,
            rate: None,
            duration: None,
            report_every: None,
        }
    }
}

/// The content of each message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The same bytes every time (`--message`).
    Text(Vec<u8>),
    /// Pseudo-random bytes of this size, different for every message of every
    /// connection and every run (`--size`), so a server that replays old bytes
    /// or mixes up connections is caught.
    Generated {
        /// Bytes per message.
        size: NonZeroUsize,
    },
}

impl Payload {
    /// Bytes per message.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(text) => text.len(),
            Payload::Generated { size } => size.get(),
        }
    }

    /// True for an empty [`Payload::Text`], which [`run`] rejects.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A configuration [`run`] cannot carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// [`Payload::Text`] was empty: an empty message has no echo to wait for.
    EmptyMessage,
    /// The timeout was zero, which std sockets cannot express.
    ZeroTimeout,
    /// The message is longer than [`MAX_MESSAGE`].
    MessageTooLarge,
    /// More connections than [`MAX_CONNECTIONS`].
    TooManyConnections,
    /// A rate of zero.
    ZeroRate,
    /// A UDP datagram larger than UDP carries to the server's address
    /// family ([`udp::MAX_DATAGRAM_V4`], [`udp::MAX_DATAGRAM_V6`]).
    DatagramTooLarge {
        /// The datagram's size.
        size: usize,
        /// The largest the family carries.
        limit: usize,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::EmptyMessage => f.write_str("the message is empty"),
            ConfigError::ZeroTimeout => f.write_str("the timeout is zero"),
            ConfigError::MessageTooLarge => {
                write!(f, "the message is longer than {MAX_MESSAGE} bytes")
            }
            ConfigError::TooManyConnections => {
                write!(f, "more than {MAX_CONNECTIONS} connections")
            }
            ConfigError::ZeroRate => f.write_str("a rate of zero sends nothing"),
            ConfigError::DatagramTooLarge { size, limit } => {
                let family = if *limit == udp::MAX_DATAGRAM_V4 {
                    "IPv4"
                } else {
                    "IPv6"
                };
                write!(
                    f,
                    "a {size}-byte datagram is over the largest UDP payload over {family}, {limit} bytes"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Something that happened during a run, reported to the observer as it
/// happens, from the event loop that runs the connection (with `--stdin`,
/// from the connection's own thread).
#[derive(Debug)]
pub enum Event<'a> {
    /// Connection `connection` (numbered from 1) is open to `peer`.
    Connected {
        /// Connection number, from 1.
        connection: usize,
        /// The address actually connected to.
        peer: SocketAddr,
    },
    /// Echo `seq` of `connection` came back exact.
    Echoed {
        /// Connection number, from 1.
        connection: usize,
        /// Echo number on this connection, from 1.
        seq: u64,
        /// From the first byte sent to the last byte of the echo received.
        rtt: Duration,
        /// The message, exactly as sent and echoed.
        message: &'a [u8],
    },
    /// Something failed; the failure also counts in the [`Report`].
    Failed(&'a Failure),
    /// With [`ClientConfig::reconnect`]: connection `connection` is open
    /// again, to `peer`, and goes on with its next echo (or, after
    /// [`Reconnect::Declined`], the same one again).
    Reconnected {
        /// Connection number, from 1.
        connection: usize,
        /// The address actually connected to.
        peer: SocketAddr,
        /// Why the last connection was let go.
        why: Reconnect,
    },
}

/// Runs `config` to the end: every connection does its echoes, or fails, or
/// stops early because `stop` was triggered. An echo still out when `stop`
/// fires may stay silent for twice the connection's p99 round trip (at
/// least 0.1 s, 1 s for a first echo, at most the timeout, counted from the
/// stop or its last progress) before it counts as a
/// [`FailureKind::Stopped`] failure.
///
/// After its last echo each connection half-closes and reads until the
/// server closes, for twice the p99 round trip (at least 100 ms, at most the
/// timeout; 100 ms once stopped): bytes arriving then are a
/// [`FailureKind::Extra`] failure. The report's
/// time ends at the last echo, before that wait.
///
/// `observer` is called from the event loops, once per [`Event`]; events
/// of one connection come in order, from one loop.
///
/// Network failures (refused, timed out, mismatched, cut short) do not make
/// this return `Err`: they are counted in the [`Report`] and passed to the
/// observer.
///
/// # Errors
///
/// [`ConfigError`] when the configuration is unusable (empty message, zero
/// timeout, a message over [`MAX_MESSAGE`], more than [`MAX_CONNECTIONS`]
/// connections); nothing is sent then.
pub fn run<F>(config: &ClientConfig, observer: &F, stop: &StopHandle) -> Result<Report, ConfigError>
where
    F: Fn(&Event<'_>) + Sync,
{
    run_with_intervals(config, observer, &|_: &Interval| {}, stop)
}

/// [`run`], also calling `on_interval` at the end of every
/// [`ClientConfig::report_every`] from the start (and once for the last,
/// shorter one if anything happened in it), from a thread of its own.
///
/// # Errors
///
/// As [`run`]; also [`ConfigError::ZeroRate`] for a zero `report_every`.
pub fn run_with_intervals<F, I>(
    config: &ClientConfig,
    observer: &F,
    on_interval: &I,
    stop: &StopHandle,
) -> Result<Report, ConfigError>
where
    F: Fn(&Event<'_>) + Sync,
    I: Fn(&Interval) + Sync,
{
    validate(config)?;
    let started = Instant::now();
    let seed = payload::run_seed();
    let tallies = match resolve(config, observer) {
        Some(addrs) => {
            let threads = engine::thread_count(config);
            let intervals: Vec<_> = match config.report_every {
                Some(_) => (0..threads).map(|_| Default::default()).collect(),
                None => Vec::new(),
            };
            let plan = engine::Plan {
                config,
                addrs: &addrs,
                observer,
                stop,
                seed,
                started,
                threads,
                intervals: &intervals,
            };
            engine::run(&plan, on_interval)
        }
        None => vec![ConnectionTally::resolve_failed()],
    };
    Ok(Report::from_tallies(
        config,
        tallies,
        started,
        stop.is_stopped(),
    ))
}

/// Interactive mode (`--stdin`): one connection, each line of `input`
/// (including its line ending) sent as one message, until end of input or
/// until `stop` fires. The report's time leaves out the waits for input. Uses `target`, `timeout` and `reconnect` of `config`; its `payload`,
/// `repeat`, `interval` and `connections` are ignored.
///
/// `input` is read on its own thread so that `stop` is seen even while no line
/// is coming. If `stop` fires while that thread waits for input, it is left
/// waiting and ends at its next line or at end of input.
///
/// # Errors
///
/// [`ConfigError::ZeroTimeout`] for a zero timeout.
pub fn run_lines<F, R>(
    config: &ClientConfig,
    input: R,
    observer: &F,
    stop: &StopHandle,
) -> Result<Report, ConfigError>
where
    F: Fn(&Event<'_>) + Sync,
    R: BufRead + Send + 'static,
{
    if config.timeout.is_zero() {
        return Err(ConfigError::ZeroTimeout);
    }
    let started = Instant::now();
    let single = ClientConfig {
        connections: NonZeroUsize::MIN,
        ..config.clone()
    };
    let lines = echo::read_lines_in_background(input);
    let mut waited = Duration::ZERO;
    let tally = match resolve(&single, observer) {
        Some(addrs) => {
            let context = echo::Context {
                addrs: &addrs,
                timeout: config.timeout,
                multiple: false,
                observer,
                stop,
                reconnect: config.reconnect,
            };
            let mut messages = TimedInput {
                lines: echo::LineMessages::new(lines, stop),
                waited: Duration::ZERO,
            };
            let tally = echo::run_connection(&context, 1, &mut messages);
            waited = messages.waited;
            tally
        }
        None => ConnectionTally::resolve_failed(),
    };
    let mut report = Report::from_tallies(&single, vec![tally], started, stop.is_stopped());
    // The time someone took to type (or a pipe to deliver) the lines is not
    // the run's: the time and the throughput count the echoes alone.
    report.elapsed = report.elapsed.saturating_sub(waited);
    Ok(report)
}

/// `--stdin`'s lines, counting how long the echoes waited for them.
struct TimedInput<'a> {
    lines: echo::LineMessages<'a>,
    /// Waits for lines that then went out, or that failed; not the last
    /// wait, for the end of input, which comes after the run's last echo.
    waited: Duration,
}

impl echo::Messages for TimedInput<'_> {
    fn next(&mut self, seq: u64, buf: &mut Vec<u8>) -> Result<bool, FailureKind> {
        let asked = Instant::now();
        let next = self.lines.next(seq, buf);
        if !matches!(next, Ok(false)) {
            self.waited += asked.elapsed();
        }
        next
    }
}

/// The open files a [`run`] of `config` needs at most: a socket per
/// connection, and per event loop its epoll and waker, plus stdio and
/// some slack. Compare it with the raised `RLIMIT_NOFILE`
/// ([`crate::limits::raise_open_file_limit`]) before a large run.
#[must_use]
pub fn open_files_needed(config: &ClientConfig) -> u64 {
    let threads = engine::thread_count(config);
    config.connections.get() as u64 + crate::limits::reserved_descriptors(threads)
}

/// A connection's own memory besides its messages: its state in the loop
/// and the kernel's socket (an idle TCP socket takes a few KiB).
const CONNECTION_MEMORY: u64 = 8 * 1024;

/// What a [`run`] of `config` needs in memory, roughly, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeeded {
    /// All of it, in bytes.
    pub bytes: u64,
    /// Messages that may be out at once, each needing a buffer of its own
    /// (none with [`Payload::Text`] on the event loops, which share one).
    pub in_flight: u64,
    /// Bytes per message.
    pub message: u64,
}

/// Estimates the memory a [`run`] of `config` needs, to check it against
/// [`crate::limits::memory_limit`] before starting: a buffer per message
/// out (one per connection closed-loop; with a rate, no more than the rate
/// times the timeout; a message declined with `reconnect` is made again
/// when it goes again, so it holds none), and `CONNECTION_MEMORY` per
/// connection.
#[must_use]
pub fn memory_needed(config: &ClientConfig) -> MemoryNeeded {
    let connections = config.connections.get() as u64;
    let message = config.payload.len() as u64;
    let threads = engine::thread_count(config);
    let in_flight = if let Payload::Generated { .. } = config.payload {
        // The loops hold to their shares, so the sum bounds the run.
        (0..threads)
            .map(|index| engine::loop_buffers(config, threads, index))
            .sum()
    } else {
        0
    };
    let threads = threads as u64;
    let bytes = in_flight
        .saturating_mul(message.saturating_add(1))
        .saturating_add(connections.saturating_mul(CONNECTION_MEMORY))
        .saturating_add(threads.saturating_mul(64 * 1024))
        .saturating_add(message);
    MemoryNeeded {
        bytes,
        in_flight,
        message,
    }
}

fn validate(config: &ClientConfig) -> Result<(), ConfigError> {
    if config.payload.is_empty() {
        return Err(ConfigError::EmptyMessage);
    }
    if config.timeout.is_zero() {
        return Err(ConfigError::ZeroTimeout);
    }
    if config.payload.len() > MAX_MESSAGE {
        return Err(ConfigError::MessageTooLarge);
    }
    if config.connections.get() > MAX_CONNECTIONS {
        return Err(ConfigError::TooManyConnections);
    }
    if config.rate == Some(0)
        || config.connect_rate == Some(0)
        || config.report_every.is_some_and(|every| every.is_zero())
    {
        return Err(ConfigError::ZeroRate);
    }
    Ok(())
}

/// Resolves the target once for all connections; a failure is reported to the
/// observer and ends the run.
fn resolve<F>(config: &ClientConfig, observer: &F) -> Option<Vec<SocketAddr>>
where
    F: Fn(&Event<'_>) + Sync,
{
    match config.target.resolve() {
        Ok(addrs) => Some(addrs),
        Err(error) => {
            let failure = Failure {
                connection: None,
                kind: FailureKind::Resolve {
                    target: config.target.to_string(),
                    error,
                },
            };
            observer(&Event::Failed(&failure));
            None
        }
    }
}
