//! The acceptor: the first step of the flow acceptor → channel → worker →
//! connection.
//!
//! One thread owns the listener and only accepts, as memcached's dispatcher
//! does. It admits each new stream against the connection limits, hands it to
//! the least-loaded worker over that worker's channel, and wakes the worker.
//! When the shutdown controller wakes it, it closes the listener (so new
//! clients are refused, not left in the backlog) and drops its channel
//! senders: each worker sees its channel disconnect and drains.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendError, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::{interrupted, io_cause, would_block};
use crate::log::{Logger, counted};
use crate::server::shutdown::ShutdownHandle;
use crate::server::stats::{AcceptorCounters, OpenConnections, Refusal};
use crate::server::worker::Handoff;
use crate::socket::keep_urgent_data_inline;

/// The token of the acceptor's waker, which the shutdown controller uses.
pub(crate) const WAKE: Token = Token(0);
/// The token of the listener.
const LISTENER: Token = Token(1);

/// The first pause after `accept` fails for lack of resources; it doubles on
/// each failure up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// The fewest seconds between two warnings of one kind.
const WARNING_INTERVAL: Duration = Duration::from_secs(1);

/// Streams accepted before the acceptor wakes the workers it gave them to.
const ACCEPTS_PER_WAKE: usize = 32;

/// The acceptor's end of one worker's channel. Dropping it disconnects the
/// channel and wakes the worker, which then drains: the shutdown happens by
/// ownership, however the acceptor ends.
pub(crate) struct WorkerLink {
    inbox: Option<Sender<Handoff>>,
    waker: Arc<mio::Waker>,
    /// Set since the last wake-up.
    has_news: bool,
}

impl WorkerLink {
    pub(crate) fn new(inbox: Sender<Handoff>, waker: Arc<mio::Waker>) -> Self {
        WorkerLink {
            inbox: Some(inbox),
            waker,
            has_news: false,
        }
    }

    fn is_alive(&self) -> bool {
        self.inbox.is_some()
    }

    fn wake(&mut self, logger: &Logger) {
        self.has_news = false;
        if let Err(err) = self.waker.wake() {
            logger.error(format_args!("cannot wake a worker: {}", io_cause(&err)));
        }
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        if self.inbox.take().is_some() {
            // The worker reads the disconnection once woken. A failed wake
            // is logged by nobody: the process is tearing this worker down.
            let _ = self.waker.wake();
        }
    }
}

/// A small xorshift generator for placement ties; nothing depends on its
/// quality beyond not following the order of arrival.
struct TieBreaker(u64);

impl TieBreaker {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's per-process random hash keys are a seed without a dependency.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        TieBreaker(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Limits a repeated warning to one line a second, counting what it held back.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    fn warn(&mut self, logger: &Logger, now: Instant, message: std::fmt::Arguments<'_>) {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARNING_INTERVAL)
        {
            self.held_back += 1;
            return;
        }
        match std::mem::take(&mut self.held_back) {
            0 => logger.warn(message),
            held => logger.warn(format_args!(
                "{message} ({held} more since the last warning)"
            )),
        }
        self.last = Some(now);
    }
}

/// The limits the acceptor admits connections against.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: Option<usize>,
    /// With the PROXY protocol, the sources connections may come from; the
    /// per-address limit then waits for the header's client address, in the
    /// worker.
    pub(crate) trusted_proxies: Option<Arc<[crate::server::cidr::Cidr]>>,
}

/// The acceptor thread's state.
pub(crate) struct Acceptor {
    poll: Poll,
    listener: Option<TcpListener>,
    workers: Vec<WorkerLink>,
    open: Arc<OpenConnections>,
    admission: Admission,
    shutdown: ShutdownHandle,
    logger: Logger,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// What it refused, which only this thread writes.
    counters: Arc<AcceptorCounters>,
    tie_breaker: TieBreaker,
    full_warning: Throttled,
    address_full_warning: Throttled,
    accept_warning: Throttled,
    inline_warning: Throttled,
    untrusted_warning: Throttled,
}

impl Acceptor {
    /// Prepares to accept on `listener`, whose events `poll` will report.
    /// Without a listener (a server of UDP alone) the acceptor only waits
    /// for the shutdown, to let the workers know.
    ///
    /// # Errors
    /// The error from registering the listener with `poll`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        poll: Poll,
        mut listener: Option<TcpListener>,
        workers: Vec<WorkerLink>,
        open: Arc<OpenConnections>,
        counters: Arc<AcceptorCounters>,
        admission: Admission,
        shutdown: ShutdownHandle,
        logger: Logger,
    ) -> io::Result<Self> {
        if let Some(listener) = listener.as_mut() {
            poll.registry()
                .register(listener, LISTENER, Interest::READABLE)?;
        }
        Ok(Acceptor {
            poll,
            listener,
            workers,
            open,
            admission,
            shutdown,
            logger,
            backoff: MIN_ACCEPT_BACKOFF,
            retry_at: None,
            counters,
            tie_breaker: TieBreaker::new(),
            full_warning: Throttled::default(),
            address_full_warning: Throttled::default(),
            accept_warning: Throttled::default(),
            inline_warning: Throttled::default(),
            untrusted_warning: Throttled::default(),
        })
    }

    /// Accepts until a shutdown is requested and its drain delay is over,
    /// then closes the listener and lets the workers drain.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(8);
        let mut delay_announced = false;
        loop {
            let now = Instant::now();
            let accepting_until = self.shutdown.accepting_until();
            if let Some(until) = accepting_until {
                if now >= until {
                    break;
                }
                if !delay_announced {
                    delay_announced = true;
                    self.logger.notice(format_args!(
                        "shutdown requested: still accepting for {} (--drain-delay), not ready",
                        crate::deadline::describe(self.shutdown.drain_delay())
                    ));
                }
            }
            let timeout = [self.retry_at, accepting_until]
                .into_iter()
                .flatten()
                .min()
                .map(|at| at.saturating_duration_since(now));
            if let Err(err) = self.poll.poll(&mut events, timeout) {
                if interrupted(&err) {
                    // A signal landed on this thread; nothing is lost.
                    continue;
                }
                self.logger.error(format_args!(
                    "acceptor event loop failed: {}; shutting down",
                    io_cause(&err)
                ));
                self.shutdown.shutdown();
                break;
            }
            if self.is_past_drain_delay() {
                break;
            }
            if let Some(at) = self.retry_at {
                if Instant::now() < at {
                    // New clients wait in the backlog until the pause is over.
                    continue;
                }
                self.retry_at = None;
            }
            self.accept_all();
        }
        self.stop();
    }

    fn accept_all(&mut self) {
        let mut since_wake = 0;
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = MIN_ACCEPT_BACKOFF;
                    self.place(stream, peer);
                    since_wake += 1;
                    if since_wake == ACCEPTS_PER_WAKE {
                        self.wake_workers_with_news();
                        since_wake = 0;
                        if self.is_past_drain_delay() {
                            // A connect storm must not hold off the shutdown;
                            // what waits in the backlog is refused with it.
                            return;
                        }
                    }
                }
                // The backlog is empty: wait for the next readable event.
                Err(err) if would_block(&err) => break,
                // A signal interrupted the call: retry.
                Err(err) if interrupted(&err) => {}
                // That one client gave up before we took it; the next may not.
                Err(err) if is_client_side_accept_error(&err) => {}
                // Out of descriptors or memory: pause instead of spinning;
                // existing connections go on, and closing ones free what we need.
                Err(err) => {
                    let now = Instant::now();
                    match err.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE) => {
                            self.counters.accept_out_of_descriptors.add(1)
                        }
                        _ => self.counters.accept_failed.add(1),
                    }
                    self.accept_warning.warn(
                        &self.logger,
                        now,
                        format_args!(
                            "cannot accept: {}; retrying in {}ms",
                            io_cause(&err),
                            self.backoff.as_millis()
                        ),
                    );
                    self.retry_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    break;
                }
            }
        }
        self.wake_workers_with_news();
    }

    /// Admits a new stream and gives it to the least-loaded worker, or closes it.
    fn place(&mut self, stream: TcpStream, peer: SocketAddr) {
        let admission = &self.admission;
        let behind_proxy = admission.trusted_proxies.is_some();
        if let Some(trusted) = &admission.trusted_proxies
            && !trusted.iter().any(|block| block.contains(peer.ip()))
        {
            self.counters.refused_untrusted_proxy.add(1);
            self.untrusted_warning.warn(
                &self.logger,
                Instant::now(),
                format_args!(
                    "connection from {peer} closed: not a trusted proxy (--proxy-from), and \
                     every connection must carry a PROXY header"
                ),
            );
            // Dropping the stream closes it at once.
            return;
        }
        // Behind a proxy the per-address limit applies to the client the
        // header names, once the worker has read it.
        let per_ip = if behind_proxy {
            None
        } else {
            admission.max_connections_per_ip
        };
        let (max_connections, max_connections_per_ip) =
            (admission.max_connections, admission.max_connections_per_ip);
        if let Err(refusal) = self.open.admit(peer.ip(), max_connections, per_ip) {
            let now = Instant::now();
            match refusal {
                Refusal::ServerFull => self.counters.refused_server_full.add(1),
                Refusal::AddressFull => self.counters.refused_address_full.add(1),
            }
            match refusal {
                Refusal::ServerFull => self.full_warning.warn(
                    &self.logger,
                    now,
                    format_args!(
                        "connection limit reached ({max_connections} open); refusing new connections",
                    ),
                ),
                Refusal::AddressFull => self.address_full_warning.warn(
                    &self.logger,
                    now,
                    format_args!(
                        "per-address limit reached for {} ({} open); refusing its new connections",
                        peer.ip(),
                        max_connections_per_ip.unwrap_or_default()
                    ),
                ),
            }
            // Dropping the stream closes it at once.
            return;
        }
        // Small echoes must not wait for delayed ACKs. A failure here leaves
        // a working, if slower, connection, so it is not worth refusing it.
        let _ = stream.set_nodelay(true);
        // Inherited from the listener (see `Server::start`), except by
        // connections made before the server started, such as the one that
        // socket activation starts it for.
        if let Err(err) = keep_urgent_data_inline(&stream) {
            self.inline_warning.warn(
                &self.logger,
                Instant::now(),
                format_args!(
                    "cannot keep urgent data inline for {peer}: {}; its urgent bytes will not be echoed",
                    io_cause(&err)
                ),
            );
        }
        let mut handoff = Handoff {
            stream,
            peer,
            awaits_proxy_header: behind_proxy,
        };
        while let Some(index) = self.least_loaded() {
            let link = &mut self.workers[index];
            let inbox = link
                .inbox
                .as_ref()
                .expect("least_loaded returns only live workers");
            self.open.assign(index);
            match inbox.send(handoff) {
                Ok(()) => {
                    link.has_news = true;
                    return;
                }
                Err(SendError(back)) => {
                    // The worker is gone (it panicked); the controller already knows.
                    self.open.unassign(index);
                    link.inbox = None;
                    handoff = back;
                }
            }
        }
        // No worker is left; the stream closes as it drops.
        let counted = (!behind_proxy).then(|| peer.ip());
        self.open.release(None, counted);
    }

    /// The live worker with the fewest open connections. Least-loaded rather
    /// than round-robin, because connection lifetimes vary a lot: a worker
    /// left with long-lived connections should not keep getting its share.
    /// Ties go to a random one: breaking them in a fixed order would be
    /// round-robin again, and a client whose busy connections are every Nth
    /// would pile them all on one worker.
    fn least_loaded(&mut self) -> Option<usize> {
        let count = self.workers.len();
        let start = (self.tie_breaker.next() % count as u64) as usize;
        (0..count)
            .map(|offset| (start + offset) % count)
            .filter(|&index| self.workers[index].is_alive())
            .min_by_key(|&index| self.open.on_worker(index))
    }

    fn wake_workers_with_news(&mut self) {
        for link in &mut self.workers {
            if link.has_news {
                link.wake(&self.logger);
            }
        }
    }

    /// Whether a shutdown was requested and its drain delay is over.
    fn is_past_drain_delay(&self) -> bool {
        self.shutdown
            .accepting_until()
            .is_some_and(|until| Instant::now() >= until)
    }

    /// Takes the connections already waiting in the backlog, at most a
    /// backlog's worth, so that the drain serves them instead of the close
    /// resetting them: their clients connected before the listener closed.
    fn accept_backlog(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let mut taken = Vec::new();
        while taken.len() < crate::server::listener::LISTEN_BACKLOG as usize {
            match listener.accept() {
                Ok(accepted) => taken.push(accepted),
                // A signal: try again.
                Err(err) if interrupted(&err) => {}
                // Empty, or out of descriptors: what is left is reset.
                Err(_) => break,
            }
        }
        for (stream, peer) in taken {
            self.place(stream, peer);
        }
        self.wake_workers_with_news();
    }

    /// Serves what waits in the backlog, closes the listener, then
    /// disconnects and wakes every worker.
    fn stop(&mut self) {
        self.accept_backlog();
        let draining = self.open.total();
        self.logger.notice(format_args!(
            "shutting down: draining {} (deadline {})",
            counted(draining as u64, "connection"),
            crate::deadline::describe(self.shutdown.timeout())
        ));
        // Closing the listener resets whatever reached its backlog since.
        self.listener = None;
        self.workers.clear();
    }
}

/// Whether an `accept` error concerns only the client being accepted.
fn is_client_side_accept_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) || matches!(
        err.raw_os_error(),
        Some(libc::EPROTO | libc::EPERM | libc::ENETDOWN | libc::EHOSTUNREACH)
    )
}

/// Creates the poll and waker the acceptor and its shutdown handle share.
///
/// # Errors
/// The error from creating either.
pub(crate) fn poll_and_waker() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    Ok((poll, waker))
}
