//! Server configuration: what the binary's flags become and what embedders
//! set. The acceptor, the workers and the shutdown controller read it; nothing
//! here touches the network.

use std::num::NonZeroUsize;
use std::time::Duration;

use crate::server::source_guard::{DEFAULT_RATE_EXEMPT, DEFAULT_RATE_PER_IP, RateLimit};

/// The port `echo-server` listens on when none is given.
pub const DEFAULT_PORT: u16 = 9999;

/// The default cap on concurrently open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How long a drain may take by default before busy connections are cut.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The most unsent output a connection may hold before the server stops
/// reading from it until its peer reads (backpressure).
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// The size of each worker's one read buffer, shared by all its connections.
pub const READ_BUFFER_SIZE: usize = 64 * 1024;

/// How long a worker spins on its event loop before sleeping, by default.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// The longest busy-poll window allowed: past this, spinning costs far more
/// CPU than any wake-up it saves.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

/// The most workers a server may have; each costs a thread, an event loop
/// and a waker.
pub const MAX_WORKERS: usize = 1024;

/// How much the server says on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum LogLevel {
    /// Nothing at all: for embedders and tests that report on their own.
    Silent,
    /// Start-up, shutdown, warnings and errors only.
    Quiet,
    /// Also each connection's open and close.
    #[default]
    Normal,
    /// Also the data received, lossily decoded, escaped and cut to 80 characters.
    Verbose,
}

/// Everything the server needs besides its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Worker threads, each running its own event loop. At least 1.
    pub workers: usize,
    /// Connections open at once; past it a new connection is closed at once. At least 1.
    pub max_connections: usize,
    /// Connections open at once from one IP address, if limited.
    pub max_connections_per_ip: Option<usize>,
    /// Close a connection after this long with no traffic in either direction.
    pub idle_timeout: Option<Duration>,
    /// How long the drain may take before busy connections are cut.
    pub shutdown_timeout: Duration,
    /// How long the server goes on accepting after a shutdown is requested,
    /// for load balancers that need time to stop sending it new clients.
    pub drain_delay: Duration,
    /// The longest a worker spins on its event loop before sleeping, to save
    /// the wake-up of the next message; zero never spins. At most [`MAX_BUSY_POLL`].
    pub busy_poll: Duration,
    /// What gets logged.
    pub log_level: LogLevel,
    /// The limit on UDP answers per source address; `None` answers every
    /// source the guard allows, as fast as it sends.
    pub udp_rate_limit: Option<RateLimit>,
    /// With `Some`, every TCP connection must start with a PROXY protocol
    /// header, and only from these sources (the proxies' addresses).
    pub proxy_protocol: Option<Vec<crate::server::cidr::Cidr>>,
}

/// How long a connection may take to send its whole PROXY header.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The default UDP rate limit: [`DEFAULT_RATE_PER_IP`] datagrams a second
/// per source, a second's worth at once, loopback and private sources exempt.
pub fn default_udp_rate_limit() -> RateLimit {
    RateLimit {
        per_second: DEFAULT_RATE_PER_IP,
        burst: DEFAULT_RATE_PER_IP,
        exempt: crate::server::cidr::parse_list(DEFAULT_RATE_EXEMPT)
            .expect("the default exempt list is well formed (a unit test parses it)"),
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: default_workers(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: None,
            idle_timeout: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            drain_delay: Duration::ZERO,
            busy_poll: DEFAULT_BUSY_POLL,
            log_level: LogLevel::Normal,
            udp_rate_limit: Some(default_udp_rate_limit()),
            proxy_protocol: None,
        }
    }
}

/// One worker per CPU, or one when the CPU count cannot be read.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

impl ServerConfig {
    /// Checks the values that the type system does not.
    ///
    /// # Errors
    /// Names the first field whose value cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(format!("workers must be from 1 to {MAX_WORKERS}"));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_connections_per_ip == Some(0) {
            return Err("max_connections_per_ip must be at least 1".into());
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err("idle_timeout must be more than zero".into());
        }
        if let Some(rate) = &self.udp_rate_limit
            && (rate.per_second == 0 || rate.burst == 0)
        {
            return Err(
                "udp_rate_limit must allow at least 1 datagram a second and a burst of 1".into(),
            );
        }
        if self.proxy_protocol.as_ref().is_some_and(Vec::is_empty) {
            return Err("proxy_protocol must list at least one trusted source".into());
        }
        if self.busy_poll > MAX_BUSY_POLL {
            return Err(format!(
                "busy_poll must be at most {}",
                humantime::format_duration(MAX_BUSY_POLL)
            ));
        }
        Ok(())
    }
}
