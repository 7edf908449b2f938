//! The metrics and health endpoint, beside the flow acceptor → channel →
//! worker → connection, never on it: one thread of its own (`echo-metrics`)
//! with its own socket and event loop serves `GET /metrics` (the
//! exposition of the server's counts), `GET /healthz` and `GET /readyz`
//! over HTTP/1.1, one request per connection.
//!
//! It reads the server through a [`Monitor`], which takes no lock and writes
//! nothing the workers read, so a scrape costs them nothing. Whatever
//! arrives on its port is bounded: at most [`MAX_CLIENTS`] connections at
//! once (past them, a new one replaces the oldest still waiting for its
//! request, or is closed at once), a request head of at most
//! [`http::MAX_HEAD`] bytes (else 431), [`REQUEST_DEADLINE`] for
//! a connection's whole life (a slow client is cut, with a 408 if the
//! socket takes it), and only `GET` of three paths (else 405 or 404).
//!
//! The embedder (the binary) starts it once the server runs, and stops it,
//! by dropping it, once the server has stopped: it answers through the drain,
//! with `/readyz` at 503 from the first signal on.

mod exposition;
pub mod http;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::{Error, interrupted, io_cause, is_peer_gone, would_block};
use crate::log::{Logger, SharedThrottle, counted};
use crate::server::Monitor;
use exposition::Exposition;
use http::{MAX_HEAD, Page, Request, Status};

/// The most connections the endpoint serves at once. Past it, a new one
/// takes the place of the oldest connection that has not sent a whole
/// request yet, so that idle or slow connections (a slowloris) cannot lock
/// out a health probe, which sends its request at once; when every place is
/// busy answering, the new one is closed. A scraper and a few probes need a
/// handful; a flood costs a fixed amount of memory.
pub const MAX_CLIENTS: usize = 64;

/// How long a connection may live, from its accept to its close: a client
/// that has not sent a whole request by then (slowloris) is cut.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// How long, at most, the endpoint reads and throws away what a client
/// still sends after its answer (a body, or the rest of a huge head), so
/// that closing with unread input does not reset the answer away.
const LINGER: Duration = Duration::from_secs(1);

/// The most bytes thrown away in that linger.
const MAX_LINGER_BYTES: usize = 256 * 1024;

/// The pause before accepting again after `accept` failed for want of
/// resources, such as descriptors the echo connections hold.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Connections accepted in one go before the loop looks at its other
/// events, so that a connect storm cannot hold off the stop or the clients.
const ACCEPTS_PER_TURN: usize = 256;

/// The token of the waker that stops the endpoint.
const STOP: Token = Token(0);
/// The token of the listener.
const LISTENER: Token = Token(1);
/// Client `i` uses `Token(FIRST_CLIENT + i)`.
const FIRST_CLIENT: usize = 2;

/// A running metrics endpoint. Dropping it stops its thread and waits for
/// it, which takes no longer than one pass of its loop.
///
/// # Examples
/// ```
/// use std::io::{Read, Write};
/// use echo_chamber::server::config::{LogLevel, ServerConfig};
/// use echo_chamber::log::Logger;
/// use echo_chamber::server::metrics::MetricsServer;
/// use echo_chamber::server::Server;
///
/// let listener = echo_chamber::server::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
/// let config = ServerConfig { workers: 1, log_level: LogLevel::Silent, ..ServerConfig::default() };
/// let server = Server::start(listener, config).unwrap();
/// let metrics_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let metrics =
///     MetricsServer::start(metrics_listener, server.monitor(), Logger::new(LogLevel::Silent))
///         .unwrap();
///
/// let mut scrape = std::net::TcpStream::connect(metrics.local_addr()).unwrap();
/// scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
/// let mut page = String::new();
/// scrape.read_to_string(&mut page).unwrap();
/// assert!(page.starts_with("HTTP/1.1 200 OK\r\n"));
/// assert!(page.contains("\necho_connections_total 0\n"));
///
/// drop(metrics);
/// server.shutdown_handle().shutdown();
/// server.join().unwrap();
/// ```
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Waker,
    thread: Option<JoinHandle<()>>,
    logger: Logger,
}

impl MetricsServer {
    /// Serves the endpoint on `listener` from a thread named `echo-metrics`,
    /// reading the server through `monitor`; logs `metrics on ADDR`.
    ///
    /// # Errors
    /// [`Error::Setup`] when the listener cannot be made nonblocking or its
    /// address read, or the event loop, its waker or the thread cannot be
    /// created.
    pub fn start(
        listener: std::net::TcpListener,
        monitor: Monitor,
        logger: Logger,
    ) -> Result<MetricsServer, Error> {
        let setup = |what: &str| {
            let what = format!("the metrics endpoint's {what}");
            move |source| Error::Setup { what, source }
        };
        listener.set_nonblocking(true).map_err(setup("listener"))?;
        let local_addr = listener.local_addr().map_err(setup("listener"))?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new().map_err(setup("event loop"))?;
        let stop = Waker::new(poll.registry(), STOP).map_err(setup("waker"))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(setup("listener"))?;
        let endpoint = Endpoint {
            poll,
            listener,
            exposition: Exposition::new(monitor.clone()),
            monitor,
            clients: (0..MAX_CLIENTS).map(|_| None).collect(),
            retry_accept_at: None,
            turned_away: 0,
            pushed_out: 0,
            accept_warnings: SharedThrottle::new(),
            turned_away_warnings: SharedThrottle::new(),
            pushed_out_warnings: SharedThrottle::new(),
            logger,
        };
        let thread = thread::Builder::new()
            .name("echo-metrics".into())
            .spawn(move || endpoint.run())
            .map_err(setup("thread"))?;
        logger.notice(format_args!(
            "metrics on {local_addr} (GET /metrics, /healthz, /readyz)"
        ));
        Ok(MetricsServer {
            local_addr,
            stop,
            thread: Some(thread),
            logger,
        })
    }

    /// The address the endpoint is bound to, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(err) = self.stop.wake() {
            // Without the wake-up the thread would never end: leave it to
            // end with the process rather than wait for it.
            self.logger.error(format_args!(
                "cannot stop the metrics endpoint: {}",
                io_cause(&err)
            ));
            return;
        }
        if thread.join().is_err() {
            self.logger
                .error(format_args!("the metrics thread panicked"));
        }
    }
}

/// Where a client's connection stands.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Reading,
    /// Writing the answer, from `written` on.
    Answering,
    /// Answered and shut for writing; reading and throwing away what the
    /// client still sends, until its end of stream.
    Lingering,
}

/// One connection to the endpoint.
struct Client {
    stream: TcpStream,
    phase: Phase,
    /// The request head so far, at most [`MAX_HEAD`] bytes; later, scratch
    /// space for the linger.
    head: Vec<u8>,
    answer: Vec<u8>,
    written: usize,
    lingered: usize,
    accepted: Instant,
    deadline: Instant,
}

/// Where a step on a client's socket left it.
#[derive(Debug, PartialEq, Eq)]
enum Io {
    /// The phase is over: go on with the next.
    Done,
    /// Wait for the next readiness event.
    Wait,
    /// Close the connection.
    Close,
}

/// The endpoint thread's state.
struct Endpoint {
    poll: Poll,
    listener: TcpListener,
    exposition: Exposition,
    monitor: Monitor,
    clients: Vec<Option<Client>>,
    retry_accept_at: Option<Instant>,
    /// Connections closed at once because every place was busy answering,
    /// since the last warning.
    turned_away: u64,
    /// Connections closed before their request was whole, to make room for
    /// a new one, since the last warning.
    pushed_out: u64,
    accept_warnings: SharedThrottle,
    turned_away_warnings: SharedThrottle,
    pushed_out_warnings: SharedThrottle,
    logger: Logger,
}

impl Endpoint {
    /// Serves until the [`MetricsServer`] is dropped.
    fn run(mut self) {
        let mut events = Events::with_capacity(MAX_CLIENTS + 2);
        loop {
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(err) = self.poll.poll(&mut events, timeout) {
                if interrupted(&err) {
                    // A signal landed on this thread; nothing is lost.
                    continue;
                }
                self.logger.error(format_args!(
                    "metrics endpoint: event loop failed: {}; no more metrics",
                    io_cause(&err)
                ));
                return;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    STOP => return,
                    LISTENER => self.accept_all(now),
                    Token(token) => self.drive(token - FIRST_CLIENT, now),
                }
            }
            if self.retry_accept_at.is_some_and(|at| at <= now) {
                self.retry_accept_at = None;
                self.accept_all(now);
            }
            self.expire(now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .flatten()
            .map(|client| client.deadline)
            .chain(self.retry_accept_at)
            .min()
    }

    fn accept_all(&mut self, now: Instant) {
        if self.retry_accept_at.is_some() {
            // Paused after a failure; the timer resumes it.
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now),
                // The backlog is empty: wait for the next readable event.
                Err(err) if would_block(&err) => return self.warn_turned_away(now),
                // A signal: try again.
                Err(err) if interrupted(&err) => {}
                // That client gave up before we took it.
                Err(err) if is_peer_gone(&err) => {}
                // Out of descriptors or memory: pause rather than spin.
                Err(err) => {
                    if self.accept_warnings.pass(now) {
                        self.logger.warn(format_args!(
                            "metrics endpoint: cannot accept: {}; retrying in {}ms",
                            io_cause(&err),
                            ACCEPT_RETRY.as_millis()
                        ));
                    }
                    self.retry_accept_at = Some(now + ACCEPT_RETRY);
                    return self.warn_turned_away(now);
                }
            }
        }
        // More may wait, with no new edge to say so: come back at once.
        self.retry_accept_at = Some(now);
        self.warn_turned_away(now);
    }

    fn warn_turned_away(&mut self, now: Instant) {
        if self.pushed_out > 0 && self.pushed_out_warnings.pass(now) {
            self.logger.warn(format_args!(
                "metrics endpoint: {} without a whole request closed to make room: {MAX_CLIENTS} already open",
                counted(std::mem::take(&mut self.pushed_out), "connection")
            ));
        }
        if self.turned_away > 0 && self.turned_away_warnings.pass(now) {
            self.logger.warn(format_args!(
                "metrics endpoint: {} closed at once: {MAX_CLIENTS} already open",
                counted(std::mem::take(&mut self.turned_away), "connection")
            ));
        }
    }

    /// Takes a new connection into a free place, or into the place of the
    /// oldest connection still waiting for its request, or closes it.
    fn admit(&mut self, mut stream: TcpStream, now: Instant) {
        let free = self.clients.iter().position(Option::is_none);
        let Some(index) = free.or_else(|| self.oldest_waiting()) else {
            self.turned_away += 1;
            // Dropping the stream closes it.
            return;
        };
        if self.clients[index].is_some() {
            self.pushed_out += 1;
            self.close(index);
        }
        // Edge-triggered, registered once for both directions.
        if let Err(err) = self.poll.registry().register(
            &mut stream,
            Token(FIRST_CLIENT + index),
            Interest::READABLE.add(Interest::WRITABLE),
        ) {
            self.logger.warn(format_args!(
                "metrics endpoint: cannot serve a connection: {}",
                io_cause(&err)
            ));
            return;
        }
        self.clients[index] = Some(Client {
            stream,
            phase: Phase::Reading,
            head: Vec::new(),
            answer: Vec::new(),
            written: 0,
            lingered: 0,
            accepted: now,
            deadline: now + REQUEST_DEADLINE,
        });
        // Its request may be there already; the edge has passed.
        self.drive(index, now);
    }

    /// The place of the connection that has waited longest for its request
    /// head, if any is still waiting.
    fn oldest_waiting(&self) -> Option<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter_map(|(index, client)| Some((index, client.as_ref()?)))
            .filter(|(_, client)| client.phase == Phase::Reading)
            .min_by_key(|(_, client)| client.accepted)
            .map(|(index, _)| index)
    }

    /// Moves a client on as far as its socket lets it, and closes it if done.
    fn drive(&mut self, index: usize, now: Instant) {
        let Endpoint {
            clients,
            exposition,
            monitor,
            ..
        } = self;
        let Some(client) = clients.get_mut(index).and_then(Option::as_mut) else {
            // An event for a client closed earlier in this pass.
            return;
        };
        let io = loop {
            match client.phase {
                Phase::Reading => match read_head(client) {
                    Io::Done => {
                        let request = http::parse(&client.head);
                        client.answer = answer(exposition, monitor, request);
                        client.phase = Phase::Answering;
                    }
                    io => break io,
                },
                Phase::Answering => match write_answer(client) {
                    Io::Done => {
                        client.phase = Phase::Lingering;
                        client.deadline = client.deadline.min(now + LINGER);
                    }
                    io => break io,
                },
                Phase::Lingering => break linger(client),
            }
        };
        if io == Io::Close {
            self.close(index);
        }
    }

    /// Closes the clients whose time is up.
    fn expire(&mut self, now: Instant) {
        for index in 0..self.clients.len() {
            let Some(client) = self.clients[index].as_mut() else {
                continue;
            };
            if client.deadline > now {
                continue;
            }
            if client.phase == Phase::Reading {
                // A courtesy: one try, and the close follows whatever it
                // returns, so its result changes nothing.
                let _ = client
                    .stream
                    .write(&http::error_answer(Status::RequestTimeout));
            }
            self.close(index);
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(mut client) = self.clients[index].take() {
            // Closing the descriptor removes it from epoll anyway.
            let _ = self.poll.registry().deregister(&mut client.stream);
        }
    }
}

/// The answer to a whole (or refused) request head.
fn answer(exposition: &Exposition, monitor: &Monitor, request: Request) -> Vec<u8> {
    match request {
        Request::Get(Page::Metrics) => match exposition.render() {
            Ok(page) => http::answer(Status::Ok, exposition::CONTENT_TYPE, &page),
            Err(_) => http::error_answer(Status::InternalServerError),
        },
        Request::Get(Page::Health) => http::answer(Status::Ok, http::PLAIN_TEXT, "ok\n"),
        Request::Get(Page::Ready) if monitor.is_shutting_down() => http::answer(
            Status::ServiceUnavailable,
            http::PLAIN_TEXT,
            "shutting down\n",
        ),
        Request::Get(Page::Ready) => http::answer(Status::Ok, http::PLAIN_TEXT, "ready\n"),
        Request::Reject(status) => http::error_answer(status),
        // `read_head` is done only once the head is whole or refused.
        Request::Incomplete => http::error_answer(Status::BadRequest),
    }
}

/// Reads the request head until it is whole or refused ([`Io::Done`]).
fn read_head(client: &mut Client) -> Io {
    loop {
        // The buffer is never full here: a full one parses as refused (431).
        let start = client.head.len();
        client.head.resize(MAX_HEAD, 0);
        let read = client.stream.read(&mut client.head[start..]);
        client
            .head
            .truncate(start + read.as_ref().map_or(0, |n| *n));
        match read {
            // The client left before its request was whole.
            Ok(0) => return Io::Close,
            Ok(_) if http::parse(&client.head) != Request::Incomplete => return Io::Done,
            Ok(_) => {}
            Err(err) => {
                if let Some(io) = sort_error(&err) {
                    return io;
                }
            }
        }
    }
}

/// Writes the answer, then shuts the sending side: our end of stream tells
/// the client the answer is over ([`Io::Done`]).
fn write_answer(client: &mut Client) -> Io {
    while client.written < client.answer.len() {
        match client.stream.write(&client.answer[client.written..]) {
            Ok(0) => return Io::Close,
            Ok(n) => client.written += n,
            Err(err) => {
                if let Some(io) = sort_error(&err) {
                    return io;
                }
            }
        }
    }
    if client.stream.shutdown(Shutdown::Write).is_err() {
        // The client is gone already.
        return Io::Close;
    }
    client.answer = Vec::new();
    Io::Done
}

/// Reads and throws away what the client still sends, until its end of
/// stream (then [`Io::Close`]), or until it has sent too much.
fn linger(client: &mut Client) -> Io {
    client.head.resize(MAX_HEAD, 0);
    loop {
        match client.stream.read(&mut client.head) {
            Ok(0) => return Io::Close,
            Ok(n) => {
                client.lingered += n;
                if client.lingered > MAX_LINGER_BYTES {
                    return Io::Close;
                }
            }
            Err(err) => {
                if let Some(io) = sort_error(&err) {
                    return io;
                }
            }
        }
    }
}

/// What an error on a client's socket means: `None` to try again.
fn sort_error(err: &io::Error) -> Option<Io> {
    if interrupted(err) {
        // A signal landed; nothing is lost.
        None
    } else if would_block(err) {
        // Nothing more for now; the next edge says when.
        Some(Io::Wait)
    } else {
        // The client went away, or its socket failed: either way it is
        // over, and a client of the metrics port is not worth a log line.
        Some(Io::Close)
    }
}
