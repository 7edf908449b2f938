//! The UDP side of the client (`echo-client --udp`): flows of datagrams
//! sent on a schedule to any RFC 862 UDP echo server, every echo matched
//! to the datagram it answers, checked byte for byte and timed, and the
//! run told apart into echoed, lost, late, duplicated, reordered, corrupted
//! and foreign, with round-trip statistics and jitter.
//!
//! ```text
//! ClientConfig ─▶ run() ─▶ one thread per flow ─▶ datagrams out, echoes in ─▶ UdpEvent (observer)
//!                   ▲              │ (datagram: what each carries)                │
//!              StopHandle          └─▶ ledger: which datagram, what it means ─▶ UdpReport
//! ```
//!
//! Each flow has its own thread and unconnected socket, and waits on it with
//! poll(2); the stop reaches every flow at once through a pipe whose
//! writing end is closed when the [`StopHandle`] fires. How an echo names
//! its datagram is described in the [`datagram`] module: a `--size`
//! datagram of 8 bytes or more carries its sequence number, a `--message`
//! one or a smaller one does not, so its flow keeps one datagram in flight.
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
mod failure;
mod flow;
pub mod ledger;
mod report;
mod socket;

use std::convert::Infallible;
use std::io::PipeWriter;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crossbeam_channel::select;

pub use failure::{UdpFailure, UdpFailureKind};
pub use ledger::{Counts, Jitter, Ledger, Verdict};
pub use report::{MaxLoss, UdpReport};

use super::rtt::RttStats;
use super::{ClientConfig, ConfigError, MAX_CONNECTIONS, StopHandle, payload};
use flow::FlowResult;

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
/// happens, from the flow's own thread.
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

/// Shared by all flow threads of a run.
struct Context<'a, F> {
    config: &'a ClientConfig,
    peer: SocketAddr,
    seed: u64,
    /// More than one flow: failures then name their flow.
    multiple: bool,
    observer: &'a F,
    stop: &'a StopHandle,
    /// The reading end of the stop pipe: it hangs up when the run stops.
    stop_fd: RawFd,
}

/// Runs `config` over UDP to the end: each of `config.connections` flows
/// sends `repeat` datagrams (`0`: until `stop` fires), `interval` apart on
/// a fixed schedule, and waits for each echo up to `timeout` before
/// counting its datagram lost. A numbered flow (`--size` of 8 bytes or
/// more) keeps records for every datagram it sends within a timeout (up
/// to 32,768; fewer per flow when there are many flows); a datagram whose
/// time comes while its flow has no room (a full window, or an unnumbered
/// flow's one datagram still out) waits, and the schedule slips to that
/// time: owed datagrams are paced, never sent in a burst. An unnumbered
/// flow that lost a datagram keeps quiet one more timeout before its next
/// send, so that a late echo is counted late. With a zero `interval` a
/// flow plays ping-pong instead: one datagram in flight, the next sent as
/// soon as the last is answered or lost. A `--size` payload of `n` bytes
/// sends `n` bytes per datagram; an empty
/// [`Payload::Text`](super::Payload::Text) sends empty datagrams.
///
/// Loss and round trips are judged by when an echo arrived (the kernel's
/// receive timestamp on Linux), not when the flow read it.
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
/// before any echo, at most the timeout) before it counts as lost.
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
            return Ok(merge(config, vec![FlowResult::failed()], started, stop));
        }
    };
    validate(config, Some(peer))?;
    let (reader, writer) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(error) => {
            let failure = UdpFailure {
                flow: None,
                kind: UdpFailureKind::Socket { peer, error },
            };
            observer(&UdpEvent::Failed(&failure));
            return Ok(merge(config, vec![FlowResult::failed()], started, stop));
        }
    };
    let context = Context {
        config,
        peer,
        seed: payload::run_seed(),
        multiple,
        observer,
        stop,
        stop_fd: reader.as_raw_fd(),
    };
    let results = std::thread::scope(|scope| {
        // Dropping `done` ends the watcher when the flows are done.
        let (done, finished) = crossbeam_channel::bounded::<Infallible>(0);
        let watcher = std::thread::Builder::new()
            .name("echo-client-udp-stop".into())
            .spawn_scoped(scope, move || close_on_stop(writer, stop, &finished));
        if let Err(error) = watcher {
            let failure = UdpFailure {
                flow: None,
                kind: UdpFailureKind::Spawn { error },
            };
            observer(&UdpEvent::Failed(&failure));
            return vec![FlowResult::failed()];
        }
        let mut handles = Vec::with_capacity(flows);
        let mut results = Vec::with_capacity(flows);
        for number in 1..=flows {
            let context = &context;
            let spawned = std::thread::Builder::new()
                .name(format!("echo-client-udp-{number}"))
                .spawn_scoped(scope, move || flow::run_flow(context, number));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    // Out of threads: count it and let the rest run.
                    context.fail(number, UdpFailureKind::Spawn { error });
                    results.push(FlowResult::failed());
                }
            }
        }
        for handle in handles {
            results.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        drop(done);
        results
    });
    drop(reader);
    Ok(merge(config, results, started, stop))
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

/// Holds the stop pipe's writing end until the run stops or ends; closing
/// it hangs up the reading end, which wakes every flow's poll at once.
fn close_on_stop(
    writer: PipeWriter,
    stop: &StopHandle,
    finished: &crossbeam_channel::Receiver<Infallible>,
) {
    let stopping: &crossbeam_channel::Receiver<Infallible> = stop.receiver();
    // Both channels only ever disconnect: stopped, or the flows are done.
    select! {
        recv(stopping) -> _ => {}
        recv(finished) -> _ => {}
    }
    drop(writer);
}

/// All flows' results in one report.
fn merge(
    config: &ClientConfig,
    results: Vec<FlowResult>,
    started: Instant,
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
    };
    for result in results {
        report.errors += result.errors;
        report.bytes_sent += result.bytes_sent;
        report.bytes_echoed += result.bytes_echoed;
        if let Some(ledger) = result.ledger {
            report.counts.add(ledger.counts());
            report.rtt.merge(ledger.rtt());
            report.jitter.merge(ledger.jitter());
        }
    }
    report
}
