//! The UDP side of the client (`echo-client --udp`): flows of datagrams
//! sent on a schedule to any RFC 862 UDP echo server, every echo matched
//! to the datagram it answers, checked byte for byte and timed, and the
//! run told apart into echoed, lost, late, duplicated, reordered, corrupted
//! and foreign, with round-trip statistics and jitter.
//!
//! ```text
//! ClientConfig ─▶ run() ─▶ loop 1 ─▶ flows 1, 1+T, …  ─▶ datagrams out, echoes in ─▶ UdpEvent (observer)
//!                   ▲   └─▶ loop T ─▶ flows T, 2T, …      (datagram: what each carries)
//!              StopHandle ─▶ stop watcher ─▶ each loop's Waker
//!                                  flow ─▶ ledger: which datagram, what it means ─▶ UdpReport
//! ```
//!
//! The flows run on a few event loops (`--threads`, one per CPU by
//! default), as the TCP engine's connections do: each loop owns its share
//! of the flows for the whole run, each flow with its own unconnected
//! socket, and steps each flow when its socket is ready or its next
//! instant comes (see `event_loop.rs` and `flow.rs`). The stop reaches
//! every loop at once through its mio `Waker`. How an echo names its
//! datagram is described in the [`datagram`] module: a `--size` datagram
//! of 8 bytes or more carries its sequence number, a `--message` one or a
//! smaller one does not, so its flow keeps one datagram in flight.
//!
//! # Example
//!
//! ```
//! use std::net::UdpSocket;
//! use echo_chamber::client::{udp, ClientConfig, Payload, StopHandle};
//!
//! // A minimal UDP echo server for the example: three datagrams back.
//! let server = UdpSocket::bind("127.0.0.1:0")?;
//! let addr = server.local_addr()?;
//! std::thread::spawn(move || {
//!     let mut buf = [0; 2048];
//!     for _ in 0..3 {
//!         let Ok((len, from)) = server.recv_from(&mut buf) else { return };
//!         // The client counts a datagram that does not come back.
//!         let _ = server.send_to(&buf[..len], from);
//!     }
//! });
//!
//! let config = ClientConfig {
//!     target: addr.to_string().parse()?,
//!     payload: Payload::Text(b"Hello Echo!".to_vec()),
//!     repeat: 3,
//!     ..ClientConfig::default()
//! };
//! let report = udp::run(&config, &|_event| {}, &StopHandle::new())?;
//! assert_eq!((report.counts.sent, report.counts.echoed), (3, 3));
//! assert!(report.is_success(udp::MaxLoss::NONE));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod datagram;
mod event_loop;
mod failure;
mod flow;
mod interval;
pub mod ledger;
mod report;
mod socket;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::Waker;

pub use failure::{UdpFailure, UdpFailureKind};
pub use interval::UdpInterval;
pub use ledger::{Counts, Jitter, Ledger, Verdict};
pub use report::{MaxLoss, UdpRate, UdpReport};

use super::engine::{self, thread_count};
use super::rtt::RttStats;
use super::{ClientConfig, ConfigError, MAX_CONNECTIONS, StopHandle, payload};
use event_loop::EventLoop;
use flow::{FlowResult, Pace};
use interval::UdpIntervalTally;

/// The largest UDP payload over IPv4: 65,535 bytes less the IPv4 and UDP
/// headers.
pub const MAX_DATAGRAM_V4: usize = 65_507;

/// The largest UDP payload over IPv6 (without jumbograms): 65,535 bytes
/// less the UDP header.
pub const MAX_DATAGRAM_V6: usize = 65_527;

/// The gap between two datagrams of a flow when none is given: Cisco IP
/// SLA udp-jitter's default, 50 datagrams a second.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);

/// Something that happened during a UDP run, reported to the observer as it
/// happens, from the thread of the flow's event loop (`Started` from the
/// caller's, as the flows are opened).
#[derive(Debug)]
pub enum UdpEvent<'a> {
    /// Flow `flow` (numbered from 1) sends from `local` to `peer`.
    Started {
        /// Flow number, from 1.
        flow: usize,
        /// The flow's own address (the unspecified address and its port).
        local: SocketAddr,
        /// The server's address.
        peer: SocketAddr,
    },
    /// Datagram `seq` of `flow` came back exact, in time.
    Echoed {
        /// Flow number, from 1.
        flow: usize,
        /// Datagram number on the flow, from 1.
        seq: u64,
        /// From its send to its echo.
        rtt: Duration,
        /// The datagram, exactly as sent and echoed.
        message: &'a [u8],
        /// The echo of a later datagram came first.
        reordered: bool,
    },
    /// Something went wrong; it also counts in the [`UdpReport`].
    Failed(&'a UdpFailure),
}

/// Shared by all event loops of a run.
struct Context<'a, F> {
    config: &'a ClientConfig,
    peer: SocketAddr,
    seed: u64,
    /// More than one flow: failures then name their flow.
    multiple: bool,
    observer: &'a F,
    stop: &'a StopHandle,
}

/// Runs `config` over UDP to the end: each of `config.connections` flows
/// sends `repeat` datagrams (`0`: until `stop` fires or `duration` is
/// over), `interval` apart on a fixed schedule (with `rate`, the flows
/// share `rate` datagrams a second instead: each sends every
/// `connections / rate` seconds and `interval` is not used), and waits for
/// each echo up to `timeout` before counting its datagram lost. The flows'
/// schedules are phased: flow *n* of *N* sends first (*n* − 1) / *N* of an
/// interval after the start, so that together they send evenly. The flows
/// run on `threads` event loops (one per CPU by default, never more than
/// flows). A numbered flow (`--size` of 8 bytes or more) keeps records for
/// every datagram it sends within a timeout (up to 32,768; fewer per flow
/// when there are many flows); a datagram whose time comes while its flow
/// has no room (a full window, or an unnumbered flow's one datagram still
/// out) waits, and the schedule slips to that time: owed datagrams are
/// paced, never sent in a burst (with `rate`, the report counts them late
/// or unsent). An unnumbered flow that lost a datagram keeps quiet one
/// more timeout before its next send, so that a late echo is counted late.
/// With a zero `interval` (and no `rate`) a flow plays ping-pong instead:
/// one datagram in flight, the next sent as soon as the last is answered
/// or lost. A `--size` payload of `n` bytes sends `n` bytes per datagram;
/// an empty [`Payload::Text`](super::Payload::Text) sends empty datagrams.
///
/// Loss and round trips are judged by when an echo arrived (the kernel's
/// receive timestamp on Linux), not when the flow read it; a round trip
/// counts from the datagram's actual send.
///
/// The target resolves once; the flows send to its first address (to
/// loopback for an unspecified one, `0.0.0.0` or `::`, which is where the
/// kernel would send it, so that echoes come from the address sent to). After
/// its last datagram is settled, a flow keeps listening a short while for
/// stray echoes (twice the p99 round trip, at least 100 ms, at most the
/// timeout; 100 ms once stopped); the report's time ends before that.
///
/// When `stop` fires, flows send no more; a datagram still out may stay
/// unanswered for twice the flow's p99 round trip (at least 0.1 s, 1 s
/// before any echo, at most the timeout) before it counts as lost. When
/// `duration` is over, counted from when the schedules start (once every
/// flow's socket is open), flows send no more and the datagrams out get
/// their whole timeout.
///
/// Network failures do not make this return `Err`: they are counted in the
/// [`UdpReport`] and passed to the observer.
///
/// # Errors
///
/// [`ConfigError`] when the configuration is unusable: a zero timeout,
/// more than [`MAX_CONNECTIONS`] flows, or a datagram larger than UDP
/// carries to the target's address family ([`MAX_DATAGRAM_V4`],
/// [`MAX_DATAGRAM_V6`]); nothing is sent then.
pub fn run<F>(
    config: &ClientConfig,
    observer: &F,
    stop: &StopHandle,
) -> Result<UdpReport, ConfigError>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    run_with_intervals(config, observer, &|_: &UdpInterval| {}, stop)
}

/// [`run`], and with `config.report_every`, `on_interval` called from a
/// reporter thread at the end of every interval of that length from the
/// start (then once more for the last, shorter one, if anything happened
/// in it), as [`run_with_intervals`](super::run_with_intervals) does for
/// TCP.
///
/// # Errors
///
/// As [`run`].
pub fn run_with_intervals<F, I>(
    config: &ClientConfig,
    observer: &F,
    on_interval: &I,
    stop: &StopHandle,
) -> Result<UdpReport, ConfigError>
where
    F: Fn(&UdpEvent<'_>) + Sync,
    I: Fn(&UdpInterval) + Sync,
{
    validate(config, None)?;
    let started = Instant::now();
    let flows = config.connections.get();
    let multiple = flows > 1;
    let peer = match config.target.resolve() {
        Ok(addrs) => to_loopback_if_unspecified(addrs[0]),
        Err(error) => {
            let failure = UdpFailure {
                flow: None,
                kind: UdpFailureKind::Resolve {
                    target: config.target.to_string(),
                    error,
                },
            };
            observer(&UdpEvent::Failed(&failure));
            return Ok(merge(
                config,
                vec![FlowResult::failed()],
                started,
                None,
                stop,
            ));
        }
    };
    validate(config, Some(peer))?;
    let context = Context {
        config,
        peer,
        seed: payload::run_seed(),
        multiple,
        observer,
        stop,
    };
    let threads = thread_count(config);
    let intervals: Vec<Mutex<UdpIntervalTally>> = match config.report_every {
        Some(_) => (0..threads).map(|_| Mutex::default()).collect(),
        None => Vec::new(),
    };
    let mut results = Vec::with_capacity(flows);
    let mut loops = Vec::with_capacity(threads);
    for index in 0..threads {
        match EventLoop::new(
            &context,
            threads,
            index,
            send_interval(config),
            intervals.get(index),
        ) {
            Ok(event_loop) => loops.push(event_loop),
            // No epoll, eventfd or memory left: its flows fail, the rest run.
            Err(error) => results.extend(event_loop::unstarted(
                &context,
                threads,
                index,
                &error,
                intervals.get(index),
            )),
        }
    }
    // The schedules start once every flow is open, so that opening
    // thousands of sockets does not make the first sends late; `--duration`
    // counts from there too, as opening them is no time to send in.
    let start = Instant::now();
    let ends = config
        .duration
        .map(|duration| crate::deadline::deadline_after(start, duration));
    let wakers: Vec<Arc<Waker>> = loops.iter().map(EventLoop::waker).collect();
    std::thread::scope(|scope| {
        // Dropping `done` ends the watcher and the reporter when the loops
        // are through.
        let (done, finished) = crossbeam_channel::bounded::<Infallible>(0);
        if let Some(every) = config.report_every {
            let finished = finished.clone();
            let intervals = &intervals;
            let reporter = std::thread::Builder::new()
                .name("echo-client-intervals".into())
                .spawn_scoped(scope, move || {
                    report_intervals(started, every, intervals, &finished, on_interval);
                });
            // Without it the run goes on and only the summary is reported.
            drop(reporter);
        }
        // Without a watcher the loops look at the stop handle every 100 ms
        // instead of being woken.
        let watched = engine::watch_stop(scope, "echo-client-udp-stop", stop, finished, wakers);
        let mut handles = Vec::with_capacity(loops.len());
        for (index, mut event_loop) in loops.into_iter().enumerate() {
            event_loop.set_stop_watched(watched);
            let spawned = std::thread::Builder::new()
                .name(format!("echo-client-udp-{}", index + 1))
                .spawn_scoped(scope, move || event_loop.run(start, ends));
            if let Err(error) = spawned {
                // Out of threads: its flows are counted failed, the rest run.
                results.extend(event_loop::unstarted(
                    &context,
                    threads,
                    index,
                    &error,
                    intervals.get(index),
                ));
                continue;
            }
            handles.extend(spawned.ok());
        }
        for handle in handles {
            results.extend(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        drop(done);
    });
    Ok(merge(config, results, started, Some(start), stop))
}

/// The gap between two sends of one flow: `connections / rate` seconds
/// with `--rate`, else `--interval`.
fn send_interval(config: &ClientConfig) -> Duration {
    match config.rate {
        Some(rate) => Duration::from_secs_f64(config.connections.get() as f64 / rate.max(1) as f64),
        None => config.interval,
    }
}

/// Reports an interval every `every` from `started`, until `finished`
/// disconnects; then the last, shorter one if anything happened in it.
fn report_intervals<I>(
    started: Instant,
    every: Duration,
    tallies: &[Mutex<UdpIntervalTally>],
    finished: &crossbeam_channel::Receiver<Infallible>,
    on_interval: &I,
) where
    I: Fn(&UdpInterval),
{
    let mut start = Duration::ZERO;
    loop {
        let end = start.saturating_add(every);
        let at = crate::deadline::deadline_after(started, end);
        match finished.recv_deadline(at) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                on_interval(&UdpInterval::take(tallies, start, end));
                start = end;
            }
            // Only ever a disconnection: the loops are through.
            _ => {
                let last = UdpInterval::take(tallies, start, started.elapsed());
                if !last.is_empty() {
                    on_interval(&last);
                }
                return;
            }
        }
    }
}

/// A flow's own memory besides its ledger's records: its state in the
/// loop, its timer, its round-trip histogram (up to about 24 KiB for round
/// trips of seconds), and the kernel's socket while it is idle.
const FLOW_MEMORY: u64 = 32 * 1024;

/// A loop's own memory besides its datagram buffers: its events, its
/// thread's stack as far as it is touched.
const LOOP_MEMORY: u64 = 128 * 1024;

/// Estimates the memory a [`run`] of `config` needs, roughly, at most, to
/// check it against [`crate::limits::memory_limit`] before starting: per
/// flow, its ledger (records of the datagrams it may have in flight and
/// the answered bits of its history) and `FLOW_MEMORY`; per event loop,
/// three datagram buffers (to send, to receive, to rebuild one to check).
#[must_use]
pub fn memory_needed(config: &ClientConfig) -> u64 {
    let flows = config.connections.get();
    let datagrams = datagram::Datagrams::new(&config.payload, 0, 1);
    let (window, history) =
        datagrams.window_and_history(config.timeout, send_interval(config), flows);
    let per_flow = Ledger::memory(window, history).saturating_add(FLOW_MEMORY);
    let loops = thread_count(config) as u64;
    let len = config.payload.len() as u64;
    (flows as u64)
        .saturating_mul(per_flow)
        .saturating_add(loops.saturating_mul(LOOP_MEMORY.saturating_add(len.saturating_mul(3))))
}

/// Sending to an unspecified address reaches this host, whose echoes then
/// come from loopback: send to loopback, of the same family.
fn to_loopback_if_unspecified(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, peer.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, peer.port()).into(),
        _ => peer,
    }
}

/// Checks what can be checked before sending: always the timeout, the
/// number of flows and the largest datagram of the target's family (of
/// any family for a name not yet resolved); with the server's address,
/// the largest datagram of its family.
fn validate(config: &ClientConfig, peer: Option<SocketAddr>) -> Result<(), ConfigError> {
    if config.timeout.is_zero() {
        return Err(ConfigError::ZeroTimeout);
    }
    if config.connections.get() > MAX_CONNECTIONS {
        return Err(ConfigError::TooManyConnections);
    }
    let ip = peer
        .map(|peer| peer.ip())
        .or_else(|| config.target.host().parse::<IpAddr>().ok());
    let limit = match ip {
        Some(IpAddr::V4(_)) => MAX_DATAGRAM_V4,
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => MAX_DATAGRAM_V4,
        Some(IpAddr::V6(_)) | None => MAX_DATAGRAM_V6,
    };
    let size = config.payload.len();
    if size > limit {
        return Err(ConfigError::DatagramTooLarge { size, limit });
    }
    Ok(())
}

/// All flows' results in one report; `start` is when the flows'
/// schedules started, if they did.
fn merge(
    config: &ClientConfig,
    results: Vec<FlowResult>,
    started: Instant,
    start: Option<Instant>,
    stop: &StopHandle,
) -> UdpReport {
    let elapsed = results
        .iter()
        .filter_map(|result| result.ended)
        .max()
        .map_or_else(
            || started.elapsed(),
            |ended| ended.saturating_duration_since(started),
        );
    let mut report = UdpReport {
        target: config.target.to_string(),
        flows: config.connections.get(),
        counts: Counts::default(),
        errors: 0,
        bytes_sent: 0,
        bytes_echoed: 0,
        rtt: RttStats::new(),
        jitter: Jitter::default(),
        elapsed,
        stopped: stop.is_stopped(),
        rate: None,
    };
    let mut pace = Pace::default();
    for result in results {
        pace.add(&result.pace);
        report.errors += result.errors;
        report.bytes_sent += result.bytes_sent;
        report.bytes_echoed += result.bytes_echoed;
        if let Some(ledger) = result.ledger {
            report.counts.add(ledger.counts());
            report.rtt.merge(ledger.rtt());
            report.jitter.merge(ledger.jitter());
        }
    }
    report.rate = config.rate.map(|asked| {
        // From the start of the schedules to when the last flow stopped
        // sending: the stop, the end of --duration, or the end of the last
        // datagram's turn.
        let span = match (start, pace.sending_ended) {
            (Some(start), Some(ended)) => ended.saturating_duration_since(start),
            _ => Duration::ZERO,
        };
        UdpRate {
            asked,
            achieved: crate::client::report::per_second(report.counts.sent, span),
            late: pace.late,
            most_late: pace.most_late,
            unsent: pace.unsent,
            window_waits: pace.window_waits,
            buffer_waits: pace.buffer_waits,
        }
    });
    report
}
