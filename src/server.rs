//! The server: wires the flow listener → acceptor → channels → workers →
//! connections, with the shutdown controller beside them, gives each worker
//! its UDP socket when the server serves UDP, and joins it all at the end.
//! It installs no signal handlers and never exits the process; the binary
//! does that.
//!
//! One file per part of the flow, in its order:
//!
//! - [`listener`] binds the sockets, or [`activation`] takes the ones a
//!   service manager passed;
//! - [`acceptor`] accepts, reads no byte itself (a [`proxy_header`] is the
//!   worker's to read, from peers in a [`cidr`] list), and hands each stream
//!   to the least-loaded worker over its channel;
//! - [`worker`] owns its streams in a mio event loop and drives each
//!   [`connection`] echo state machine, and its UDP socket's `datagram`
//!   echo, which asks the [`source_guard`] whether a source may be answered;
//! - [`shutdown`] stops the acceptor and makes the workers drain.
//!
//! Beside the flow: [`config`] (what the flags become), [`stats`] (a block of
//! counters per thread, summed at exit) and [`metrics`] (a thread of its own
//! that reads those counters live, without a lock).

pub mod acceptor;
pub mod activation;
mod busy_poll;
pub mod cidr;
pub mod config;
pub mod connection;
mod datagram;
pub mod listener;
pub mod metrics;
pub mod proxy_header;
pub mod shutdown;
pub mod source_guard;
pub mod stats;
mod udp_batch;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use mio::Poll;

use crate::error::Error;
use crate::log::Logger;
use acceptor::{Acceptor, Admission, WorkerLink};
use config::ServerConfig;
use datagram::{UdpEcho, UdpShared};
use listener::Sockets;
use shutdown::ShutdownHandle;
use source_guard::SourceGuard;
use stats::{Counters, OpenConnections};
use worker::{Worker, WorkerSetup};

pub use crate::server::stats::{Snapshot, Summary};

/// A running echo server. Dropping it shuts it down and waits for it.
///
/// # Examples
/// ```
/// use std::io::{Read, Write};
/// use echo_chamber::server::config::{LogLevel, ServerConfig};
/// use echo_chamber::server::Server;
///
/// let listener = echo_chamber::server::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
/// let config = ServerConfig { workers: 1, log_level: LogLevel::Quiet, ..ServerConfig::default() };
/// let server = Server::start(listener, config).unwrap();
///
/// let mut client = std::net::TcpStream::connect(server.local_addr()).unwrap();
/// client.write_all(b"ping").unwrap();
/// client.shutdown(std::net::Shutdown::Write).unwrap();
/// let mut echo = Vec::new();
/// client.read_to_end(&mut echo).unwrap();
/// assert_eq!(echo, b"ping");
///
/// server.shutdown_handle().shutdown();
/// let summary = server.join().unwrap();
/// assert_eq!(summary.bytes_echoed, 4);
/// ```
pub struct Server {
    local_addr: SocketAddr,
    shutdown: ShutdownHandle,
    open: Arc<OpenConnections>,
    counters: Arc<Counters>,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    logger: Logger,
}

/// A live view of a running server, for status reports (such as systemd's
/// `STATUS=` lines), health checks and metrics. Cheap to clone; reading it
/// costs the workers nothing: it takes no lock and writes nothing they read.
#[derive(Debug, Clone)]
pub struct Monitor {
    open: Arc<OpenConnections>,
    counters: Arc<Counters>,
    shutdown: ShutdownHandle,
}

impl Monitor {
    /// Everything counted so far, from the counts the summary line will be
    /// made of at the end.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            open_connections: self.open.total(),
            shutting_down: self.shutdown.is_shutting_down(),
            ..self.counters.snapshot()
        }
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.total()
    }

    /// Whether a shutdown has been requested: from then on the server is
    /// not ready for new clients, though it may still accept through the
    /// drain delay.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_shutting_down()
    }

    /// Waits up to `limit` for a shutdown request; true once there is one.
    pub fn wait_for_shutdown(&self, limit: std::time::Duration) -> bool {
        self.shutdown.wait_requested(limit)
    }
}

/// Reports a worker's death to the shutdown controller as its thread unwinds,
/// so that the server stops instead of hanging with a hole in its pool.
struct DeathWatch {
    shutdown: ShutdownHandle,
    index: usize,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shutdown.worker_panicked(self.index);
        }
    }
}

impl Server {
    /// Starts serving `sockets` (a TCP listener, UDP sockets, or both; a
    /// bare `TcpListener` will do): spawns the `echo-acceptor` thread and
    /// `config.workers` threads named `echo-worker-N`, logs
    /// `listening on ADDR (TRANSPORTS; N workers)`, and returns at once.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a configuration that cannot work (no
    /// socket, or more UDP sockets than workers), and [`Error::Setup`] when
    /// an event loop or a thread cannot be created, or a socket cannot be
    /// set up (nonblocking, urgent data inline).
    pub fn start(sockets: impl Into<Sockets>, config: ServerConfig) -> Result<Server, Error> {
        config.validate().map_err(Error::InvalidConfig)?;
        let Sockets { tcp, udp } = sockets.into();
        if tcp.is_none() && udp.is_empty() {
            return Err(Error::InvalidConfig("no socket to serve".into()));
        }
        if udp.len() > config.workers {
            return Err(Error::InvalidConfig(format!(
                "{} UDP sockets for {} workers: each worker serves at most one",
                udp.len(),
                config.workers
            )));
        }
        let setup = |what: String| move |source| Error::Setup { what, source };
        let listener = match tcp {
            Some(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(setup("the listener".into()))?;
                // Before any urgent byte of a queued connection can be dropped.
                crate::socket::keep_urgent_data_inline(&listener)
                    .map_err(setup("the listener".into()))?;
                Some(listener)
            }
            None => None,
        };
        let local_addr = match (&listener, udp.first()) {
            (Some(listener), _) => listener.local_addr(),
            (None, Some(udp)) => udp.local_addr(),
            (None, None) => unreachable!("checked above: there is a socket"),
        }
        .map_err(setup("the listener".into()))?;
        let transports = match (listener.is_some(), !udp.is_empty()) {
            (true, true) => "tcp, udp",
            (true, false) => "tcp",
            _ => "udp",
        };
        let listener = listener.map(mio::net::TcpListener::from_std);
        let udp_shared = (!udp.is_empty()).then(|| {
            let guard = SourceGuard::new(
                local_addr.port(),
                crate::socket::interface_broadcast_addresses(),
                config.udp_rate_limit.clone(),
            );
            Arc::new(UdpShared::new(guard))
        });
        let mut udp = udp.into_iter();
        let logger = Logger::new(config.log_level);
        let (acceptor_poll, acceptor_waker) =
            acceptor::poll_and_waker().map_err(setup("the acceptor's event loop".into()))?;
        let shutdown = ShutdownHandle::new(
            acceptor_waker,
            config.drain_delay,
            config.shutdown_timeout,
            logger,
        );
        let open = Arc::new(OpenConnections::new(
            config.workers,
            config.max_connections_per_ip.is_some(),
        ));
        let counters = Arc::new(Counters::new(
            config.workers,
            udp_shared.is_some(),
            config.proxy_protocol.is_some(),
        ));

        // If anything below fails, dropping `links` disconnects and wakes the
        // workers already started, and dropping `server` joins them.
        let mut server = Server {
            local_addr,
            shutdown: shutdown.clone(),
            open: Arc::clone(&open),
            counters: Arc::clone(&counters),
            acceptor: None,
            workers: Vec::with_capacity(config.workers),
            logger,
        };
        let mut links = Vec::with_capacity(config.workers);
        let header_warnings = Arc::new(crate::log::SharedThrottle::new());
        let address_warnings = Arc::new(crate::log::SharedThrottle::new());
        for index in 0..config.workers {
            let of_worker = |what| format!("{what} of worker {index} of {}", config.workers);
            let poll = Poll::new().map_err(setup(of_worker("the event loop")))?;
            let waker = Arc::new(
                mio::Waker::new(poll.registry(), worker::WAKE)
                    .map_err(setup(of_worker("the waker")))?,
            );
            let (sender, inbox) = crossbeam_channel::unbounded();
            let udp = match (udp.next(), &udp_shared) {
                (Some(socket), Some(shared)) => {
                    socket
                        .set_nonblocking(true)
                        .map_err(setup(of_worker("the UDP socket")))?;
                    let socket = mio::net::UdpSocket::from_std(socket);
                    crate::server::udp_batch::receive_destinations(&socket)
                        .map_err(setup(of_worker("the UDP socket's packet info")))?;
                    crate::socket::grow_udp_buffers(&socket);
                    let mut echo = UdpEcho::new(
                        socket,
                        Arc::clone(shared),
                        Arc::clone(&counters.workers[index]),
                        logger,
                    );
                    // Edge-triggered, like the connections: registered once.
                    poll.registry()
                        .register(
                            echo.socket_mut(),
                            worker::UDP,
                            mio::Interest::READABLE.add(mio::Interest::WRITABLE),
                        )
                        .map_err(setup(of_worker("the UDP socket's registration")))?;
                    Some(echo)
                }
                _ => None,
            };
            let worker = Worker::new(WorkerSetup {
                index,
                poll,
                _waker: Arc::clone(&waker),
                inbox,
                open: Arc::clone(&open),
                counters: Arc::clone(&counters.workers[index]),
                shutdown: shutdown.clone(),
                idle_timeout: config.idle_timeout,
                busy_poll: config.busy_poll,
                logger,
                udp,
                max_connections_per_ip: config.max_connections_per_ip,
                header_warnings: Arc::clone(&header_warnings),
                address_warnings: Arc::clone(&address_warnings),
            });
            let watch = DeathWatch {
                shutdown: shutdown.clone(),
                index,
            };
            let thread = thread::Builder::new()
                .name(format!("echo-worker-{index}"))
                .spawn(move || {
                    let _watch = watch;
                    worker.run()
                })
                .map_err(setup(of_worker("the thread")))?;
            server.workers.push(thread);
            links.push(WorkerLink::new(sender, waker));
        }

        let admission = Admission {
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            trusted_proxies: config.proxy_protocol.as_deref().map(Arc::from),
        };
        let acceptor = Acceptor::new(
            acceptor_poll,
            listener,
            links,
            open,
            Arc::clone(&counters.acceptor),
            admission,
            shutdown,
            logger,
        )
        .map_err(setup("the acceptor".into()))?;
        let thread = thread::Builder::new()
            .name("echo-acceptor".into())
            .spawn(move || acceptor.run())
            .map_err(setup("the acceptor thread".into()))?;
        server.acceptor = Some(thread);
        logger.notice(format_args!(
            "listening on {local_addr} ({transports}; {} workers)",
            config.workers
        ));
        Ok(server)
    }

    /// The address the server is bound to, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// A live view of the server for status reports, usable from any thread.
    pub fn monitor(&self) -> Monitor {
        Monitor {
            open: Arc::clone(&self.open),
            counters: Arc::clone(&self.counters),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Waits for the server to stop (after [`ShutdownHandle::shutdown`]),
    /// logs the summary line and returns it.
    ///
    /// # Errors
    /// [`Error::WorkerPanicked`] or [`Error::AcceptorPanicked`] when a thread
    /// died; the rest of the server has still drained and stopped.
    pub fn join(mut self) -> Result<Summary, Error> {
        self.wait()
    }

    fn wait(&mut self) -> Result<Summary, Error> {
        let mut acceptor_died = false;
        // Without an acceptor the server never started: no summary to give.
        let started = self.acceptor.is_some();
        if let Some(acceptor) = self.acceptor.take()
            && acceptor.join().is_err()
        {
            acceptor_died = true;
            self.logger
                .error(format_args!("the acceptor thread panicked; shutting down"));
        }
        for worker in self.workers.drain(..) {
            // A worker that panicked has told the shutdown controller
            // already; what it counted before is still in the counters.
            let _ = worker.join();
        }
        // Every writer has stopped: these are the final counts, the same
        // ones the metrics read.
        let summary = self.counters.summary();
        if started {
            self.logger
                .notice(format_args!("shutdown complete: {summary}"));
        }
        if let Some(worker) = self.shutdown.failed_worker() {
            return Err(Error::WorkerPanicked { worker });
        }
        if acceptor_died {
            return Err(Error::AcceptorPanicked);
        }
        Ok(summary)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.acceptor.is_some() || !self.workers.is_empty() {
            self.shutdown.shutdown();
            // The outcome was not asked for; a failure has been logged.
            let _ = self.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::LogLevel;
    use std::time::Duration;

    #[test]
    fn a_worker_that_panics_is_reported_and_starts_the_shutdown() {
        let (_poll, waker) = acceptor::poll_and_waker().expect("poll and waker");
        let shutdown = ShutdownHandle::new(
            waker,
            Duration::ZERO,
            Duration::from_secs(1),
            Logger::new(LogLevel::Quiet),
        );
        let watch = DeathWatch {
            shutdown: shutdown.clone(),
            index: 3,
        };
        let died = thread::spawn(move || {
            let _watch = watch;
            panic!("injected worker failure");
        })
        .join();
        assert!(died.is_err(), "the thread should have panicked");
        assert!(shutdown.is_shutting_down());
        assert_eq!(shutdown.failed_worker(), Some(3));
    }

    #[test]
    fn a_worker_that_returns_normally_reports_nothing() {
        let (_poll, waker) = acceptor::poll_and_waker().expect("poll and waker");
        let shutdown = ShutdownHandle::new(
            waker,
            Duration::ZERO,
            Duration::from_secs(1),
            Logger::new(LogLevel::Quiet),
        );
        let watch = DeathWatch {
            shutdown: shutdown.clone(),
            index: 0,
        };
        thread::spawn(move || drop(watch)).join().expect("no panic");
        assert!(!shutdown.is_shutting_down());
        assert_eq!(shutdown.failed_worker(), None);
    }
}
