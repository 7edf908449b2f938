//! The servers under test, started either inside the bench process (cases
//! 1–3, UDP case 6 and case 7 with its metrics endpoint, CPU charged per
//! thread) or as separate processes (cases 4–5, memory and exit measured
//! per process; case 8's backends behind HAProxy).
//!
//! Ours runs in-process through `echo_chamber::server::Server` and out of
//! process as the `echo-server` binary. The peers run in-process from
//! [`crate::peers`] and out of process by re-executing this bench binary
//! with [`SERVE_ENV`] set.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use echo_chamber::log::Logger;
use echo_chamber::server::Server;
use echo_chamber::server::config::{LogLevel, ServerConfig};
use echo_chamber::server::listener::Transports;
use echo_chamber::server::metrics::MetricsServer;
use echo_chamber::server::stats::UdpSummary;

use crate::floor::{self, FloorPeer, Placement};
use crate::peers::{self, BlockingPeer, TokioPeer};
use crate::udp_peers::{UdpBlockingPeer, UdpTokioPeer};
use crate::uring_floor::{self, UringFloorPeer};

/// Environment variable that makes this binary serve as a peer
/// (`blocking` or `tokio`) instead of benchmarking.
pub const SERVE_ENV: &str = "ECHO_BENCH_SERVE";
/// Environment variable giving that peer's worker-thread count.
pub const WORKERS_ENV: &str = "ECHO_BENCH_WORKERS";

/// Our server's binary, built by cargo for benches.
const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_echo-server");

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ours,
    Tokio,
    Blocking,
    /// The yardstick of [`crate::floor`], in case 2 only.
    Floor,
    /// The io_uring yardstick of [`crate::uring_floor`], in case 2 only,
    /// where the kernel and the process's seccomp profile allow it.
    UringFloor,
}

/// How many servers there are.
pub const KINDS: usize = 5;

impl Kind {
    /// Every server, ours first.
    pub const ALL: [Kind; KINDS] = [
        Kind::Ours,
        Kind::Tokio,
        Kind::Blocking,
        Kind::Floor,
        Kind::UringFloor,
    ];

    /// Whether this server is measured in `case`: the floor peer echoes
    /// only messages that one `send` takes whole, so only in case 2; so
    /// does the io_uring floor.
    pub fn in_case(self, case: u32) -> bool {
        !matches!(self, Kind::Floor | Kind::UringFloor) || case == 2
    }

    /// Short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Tokio => "tokio",
            Kind::Blocking => "blocking",
            Kind::Floor => "floor",
            Kind::UringFloor => "uring-floor",
        }
    }

    /// Whether a thread of this process named `comm` belongs to this server
    /// when it runs in-process.
    pub fn owns_thread(self, comm: &str) -> bool {
        match self {
            Kind::Ours => comm.starts_with("echo-acceptor") || comm.starts_with("echo-worker"),
            Kind::Tokio => comm.starts_with(peers::TOKIO_THREADS),
            Kind::Blocking => comm.starts_with(peers::BLOCKING_THREADS),
            Kind::Floor => comm.starts_with(floor::FLOOR_THREADS),
            Kind::UringFloor => uring_floor::owns_thread(comm),
        }
    }
}

/// A server running on threads of this process.
pub enum InProcess {
    Ours(Server),
    Tokio(TokioPeer),
    Blocking(BlockingPeer),
    Floor(FloorPeer),
    UringFloor(UringFloorPeer),
}

impl InProcess {
    /// Starts `kind` on 127.0.0.1 port 0 with `workers` worker threads
    /// (the blocking peer has a thread per connection instead); `busy_poll`
    /// overrides our server's default and means nothing to the peers, and
    /// `floor_placement` is the floor peer's.
    ///
    /// # Errors
    /// The server could not start.
    pub fn start(
        kind: Kind,
        workers: usize,
        busy_poll: Option<Duration>,
        floor_placement: Placement,
    ) -> Result<InProcess, String> {
        let started = match kind {
            Kind::Ours => {
                return start_ours(workers, busy_poll)
                    .map(InProcess::Ours)
                    .map_err(|e| format!("ours: cannot start: {e}"));
            }
            Kind::Tokio => TokioPeer::start(workers).map(InProcess::Tokio),
            Kind::Blocking => BlockingPeer::start().map(InProcess::Blocking),
            Kind::Floor => FloorPeer::start(workers, floor_placement).map(InProcess::Floor),
            Kind::UringFloor => {
                UringFloorPeer::start(workers, floor_placement).map(InProcess::UringFloor)
            }
        };
        started.map_err(|e| format!("{}: cannot start: {e}", kind.name()))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        match self {
            InProcess::Ours(server) => server.local_addr(),
            InProcess::Tokio(peer) => peer.addr(),
            InProcess::Blocking(peer) => peer.addr(),
            InProcess::Floor(peer) => peer.addr(),
            InProcess::UringFloor(peer) => peer.addr(),
        }
    }

    /// Stops it and waits for its threads.
    ///
    /// # Errors
    /// Our server reported a failure while joining.
    pub fn stop(self) -> Result<(), String> {
        self.stop_counting_waits().map(drop)
    }

    /// As [`InProcess::stop`], and for ours, how many of its workers'
    /// waits busy polling caught, and how many waits there were.
    ///
    /// # Errors
    /// As [`InProcess::stop`].
    pub fn stop_counting_waits(self) -> Result<Option<(u64, u64)>, String> {
        match self {
            InProcess::Ours(server) => {
                server.shutdown_handle().shutdown();
                server
                    .join()
                    .map(|summary| {
                        let caught = summary.busy_poll_catches;
                        Some((caught, caught + summary.worker_sleeps))
                    })
                    .map_err(|e| format!("ours: {e}"))
            }
            // The peers stop and join in their Drop.
            InProcess::Tokio(_)
            | InProcess::Blocking(_)
            | InProcess::Floor(_)
            | InProcess::UringFloor(_) => Ok(None),
        }
    }
}

/// Our server on 127.0.0.1 port 0, quiet, `workers` workers, the rest default.
fn start_ours(workers: usize, busy_poll: Option<Duration>) -> Result<Server, String> {
    let listener = echo_chamber::server::listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|e| format!("bind: {e}"))?;
    Server::start(listener, ours_config(workers, busy_poll)).map_err(|e| e.to_string())
}

/// Our configuration in the bench: `workers` workers, silent, `busy_poll`
/// if given, the rest default (the default UDP rate limit exempts
/// loopback, so it never throttles the bench).
fn ours_config(workers: usize, busy_poll: Option<Duration>) -> ServerConfig {
    let defaults = ServerConfig::default();
    ServerConfig {
        workers,
        log_level: LogLevel::Silent,
        busy_poll: busy_poll.unwrap_or(defaults.busy_poll),
        ..defaults
    }
}

/// Our server on threads of this process with its metrics endpoint on, as
/// `echo-server --metrics` runs them: the endpoint started beside the
/// running server, on a loopback port of its own (case 7).
pub struct OursWithMetrics {
    server: Server,
    metrics: MetricsServer,
}

impl OursWithMetrics {
    /// Whether a thread of this process named `comm` belongs to it: the
    /// acceptor, the workers and the metrics thread.
    pub fn owns_thread(comm: &str) -> bool {
        Kind::Ours.owns_thread(comm) || OursWithMetrics::is_metrics_thread(comm)
    }

    /// Whether `comm` is the metrics endpoint's thread.
    pub fn is_metrics_thread(comm: &str) -> bool {
        comm.starts_with("echo-metrics")
    }

    /// Starts ours as [`InProcess::start`] does, then the endpoint on
    /// 127.0.0.1 port 0.
    ///
    /// # Errors
    /// Either could not start.
    pub fn start(workers: usize, busy_poll: Option<Duration>) -> Result<OursWithMetrics, String> {
        let server =
            start_ours(workers, busy_poll).map_err(|e| format!("ours: cannot start: {e}"))?;
        let started = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| format!("metrics: bind: {e}"))
            .and_then(|listener| {
                MetricsServer::start(listener, server.monitor(), Logger::new(LogLevel::Silent))
                    .map_err(|e| format!("metrics: cannot start: {e}"))
            });
        match started {
            Ok(metrics) => Ok(OursWithMetrics { server, metrics }),
            Err(e) => {
                // Stopped so its threads do not outlive the failed start.
                let _ = InProcess::Ours(server).stop();
                Err(e)
            }
        }
    }

    /// Where the echo service listens.
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where the metrics endpoint listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.local_addr()
    }

    /// Stops the endpoint, then the server, as the binary does.
    ///
    /// # Errors
    /// The server reported a failure while joining.
    pub fn stop(self) -> Result<(), String> {
        // Dropping the endpoint stops its thread and waits for it.
        drop(self.metrics);
        InProcess::Ours(self.server).stop()
    }
}

/// A UDP echo server running on threads of this process (case 6).
pub enum UdpInProcess {
    Ours(Server),
    Tokio(UdpTokioPeer),
    Blocking(UdpBlockingPeer),
}

impl UdpInProcess {
    /// Starts `kind` serving UDP only on 127.0.0.1 port 0 with `workers`
    /// worker threads (ours: a socket each; the peers: tasks or threads on
    /// one socket); `busy_poll` overrides our server's default.
    ///
    /// # Errors
    /// The server could not start, or `kind` has no UDP version.
    pub fn start(
        kind: Kind,
        workers: usize,
        busy_poll: Option<Duration>,
    ) -> Result<UdpInProcess, String> {
        let started = match kind {
            Kind::Ours => {
                let addr = SocketAddr::from(([127, 0, 0, 1], 0));
                let udp_only = Transports {
                    tcp: false,
                    udp: true,
                };
                return echo_chamber::server::listener::bind_sockets(addr, udp_only, workers)
                    .map_err(|e| format!("bind: {e}"))
                    .and_then(|sockets| {
                        Server::start(sockets, ours_config(workers, busy_poll))
                            .map_err(|e| e.to_string())
                    })
                    .map(UdpInProcess::Ours)
                    .map_err(|e| format!("ours: cannot start: {e}"));
            }
            Kind::Tokio => UdpTokioPeer::start(workers).map(UdpInProcess::Tokio),
            Kind::Blocking => UdpBlockingPeer::start(workers).map(UdpInProcess::Blocking),
            Kind::Floor | Kind::UringFloor => {
                return Err(format!("{}: has no UDP version", kind.name()));
            }
        };
        started.map_err(|e| format!("{}: cannot start: {e}", kind.name()))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        match self {
            UdpInProcess::Ours(server) => server.local_addr(),
            UdpInProcess::Tokio(peer) => peer.addr(),
            UdpInProcess::Blocking(peer) => peer.addr(),
        }
    }

    /// Stops it and waits for its threads; for ours, returns its UDP counts.
    ///
    /// # Errors
    /// Our server reported a failure while joining.
    pub fn stop(self) -> Result<Option<UdpSummary>, String> {
        match self {
            UdpInProcess::Ours(server) => {
                server.shutdown_handle().shutdown();
                server
                    .join()
                    .map(|summary| summary.udp)
                    .map_err(|e| format!("ours: {e}"))
            }
            // The peers stop and join in their Drop.
            UdpInProcess::Tokio(_) | UdpInProcess::Blocking(_) => Ok(None),
        }
    }
}

/// A server running as a child process.
pub struct ServerProcess {
    kind: Kind,
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `kind` as a child on 127.0.0.1 port 0 with `workers` workers
    /// (ours with `busy_poll`, or the default 50 µs) and waits (bounded) for
    /// its `listening on ADDR` line.
    ///
    /// # Errors
    /// Spawn failure, or no `listening on` line in time.
    pub fn spawn(
        kind: Kind,
        workers: usize,
        busy_poll: Option<Duration>,
    ) -> Result<ServerProcess, String> {
        ServerProcess::spawn_with(kind, workers, busy_poll, &[])
    }

    /// As [`ServerProcess::spawn`] of ours, with `extra` arguments after
    /// the usual ones (case 8: the PROXY protocol).
    ///
    /// # Errors
    /// As [`ServerProcess::spawn`].
    pub fn spawn_ours_with(
        workers: usize,
        busy_poll: Option<Duration>,
        extra: &[&str],
    ) -> Result<ServerProcess, String> {
        ServerProcess::spawn_with(Kind::Ours, workers, busy_poll, extra)
    }

    fn spawn_with(
        kind: Kind,
        workers: usize,
        busy_poll: Option<Duration>,
        extra: &[&str],
    ) -> Result<ServerProcess, String> {
        let mut command = match kind {
            Kind::Ours => {
                let mut command = Command::new(ECHO_SERVER);
                command.args(["--bind", "127.0.0.1", "--port", "0", "-q"]);
                command.args(["--workers", &workers.to_string()]);
                // Always given, so that a CPU quota cannot turn the binary's
                // default off and make it differ from the in-process server.
                let busy_poll =
                    busy_poll.unwrap_or(echo_chamber::server::config::DEFAULT_BUSY_POLL);
                let value = humantime::format_duration(busy_poll).to_string();
                command.args(["--busy-poll", &value]);
                command.args(extra);
                command
            }
            Kind::Tokio | Kind::Blocking if extra.is_empty() => {
                let exe = std::env::current_exe()
                    .map_err(|e| format!("cannot find the bench binary: {e}"))?;
                let mut command = Command::new(exe);
                command.env(SERVE_ENV, kind.name());
                command.env(WORKERS_ENV, workers.to_string());
                command
            }
            Kind::Tokio | Kind::Blocking => {
                return Err(format!("{}: takes no extra arguments", kind.name()));
            }
            Kind::Floor | Kind::UringFloor => {
                return Err(format!("{}: runs only in-process, in case 2", kind.name()));
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("{}: spawn {command:?}: {e}", kind.name()))?;
        let stderr = child.stderr.take().expect("stderr was set to piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            // Keeps draining stderr after the first line, so the child never
            // blocks on a full pipe; the text is kept for error messages.
            thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(at) = line.find("listening on ")
                        && let Some(tx) = tx.take()
                    {
                        let addr = line[at + "listening on ".len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string();
                        // The spawner may have given up waiting; nothing to do.
                        let _ = tx.send(addr);
                    }
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut process = ServerProcess {
            kind,
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let addr = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            format!(
                "{}: no `listening on` line within 10 s; stderr: {:?}",
                kind.name(),
                process.log()
            )
        })?;
        process.addr = addr
            .parse()
            .map_err(|e| format!("{}: bad address {addr:?}: {e}", kind.name()))?;
        Ok(process)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What it has written to stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends SIGINT and times until the process has exited (reaped by
    /// `waitpid`), giving up and killing it after `limit`.
    ///
    /// # Errors
    /// The signal could not be sent, or the process outlived `limit`.
    pub fn interrupt_and_time_exit(mut self, limit: Duration) -> Result<Duration, String> {
        let mut child = self.child.take().expect("child is present until waited");
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = mpsc::channel();
        let sent_at = Instant::now();
        // SAFETY: kill has no memory preconditions; pid is our unreaped child.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            let err = std::io::Error::last_os_error();
            self.child = Some(child);
            return Err(format!("{}: SIGINT: {err}", self.kind.name()));
        }
        let waiter = thread::spawn(move || {
            let status = child.wait();
            // The timer may have given up already.
            let _ = tx.send((sent_at.elapsed(), status));
        });
        match rx.recv_timeout(limit) {
            Ok((took, Ok(_status))) => {
                // The waiter has finished sending; joining cannot block long.
                let _ = waiter.join();
                Ok(took)
            }
            Ok((_, Err(e))) => Err(format!("{}: waitpid: {e}", self.kind.name())),
            Err(_) => {
                // SAFETY: as above; the waiter thread reaps it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                // Reaped now that it is killed.
                let _ = waiter.join();
                Err(format!(
                    "{}: still running {limit:?} after SIGINT; stderr: {:?}",
                    self.kind.name(),
                    self.log()
                ))
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either may fail only if the child is already gone and reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
