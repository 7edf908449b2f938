//! Counters: what each worker served over TCP and UDP (summed into the
//! shutdown [`Summary`]), and the live count of open connections that the
//! acceptor reads to place and admit new ones and that workers lower as
//! connections close.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the server did from start to stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Connections handed to a worker.
    pub connections_served: u64,
    /// Connections closed at once because a limit was reached.
    pub connections_refused: u64,
    /// Bytes read and meant for echoing.
    pub bytes_received: u64,
    /// Bytes written back.
    pub bytes_echoed: u64,
    /// Connections still busy when the shutdown deadline came.
    pub connections_cut: u64,
    /// Bytes read after a connection's sending side was shut, thrown away.
    pub bytes_discarded: u64,
    /// Times a worker went to sleep waiting for events.
    pub worker_sleeps: u64,
    /// Waits that busy polling ended with events, each sparing a worker a
    /// sleep and its wake-up (see `--busy-poll`).
    pub busy_poll_catches: u64,
    /// What the UDP sockets did, when the server serves UDP.
    pub udp: Option<UdpSummary>,
}

/// What the server's UDP sockets did from start to stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpSummary {
    /// Datagrams taken from the sockets, answered or not.
    pub datagrams_received: u64,
    /// Datagrams sent back.
    pub datagrams_echoed: u64,
    /// Bytes in the datagrams sent back.
    pub bytes_echoed: u64,
    /// Datagrams from sources that are never answered: a port below 1024,
    /// a well-known responder's port, the server's own port, or a
    /// broadcast, multicast or unspecified address.
    pub refused_source: u64,
    /// Datagrams over their source's rate (`--udp-rate-per-ip`).
    pub rate_limited: u64,
    /// Echoes that could not be sent: the send buffer stayed full past the
    /// wait, the drain's deadline came, or the kernel refused them.
    pub send_failed: u64,
}

impl UdpSummary {
    /// Adds another part's counts to this one.
    pub fn add(&mut self, other: &UdpSummary) {
        self.datagrams_received += other.datagrams_received;
        self.datagrams_echoed += other.datagrams_echoed;
        self.bytes_echoed += other.bytes_echoed;
        self.refused_source += other.refused_source;
        self.rate_limited += other.rate_limited;
        self.send_failed += other.send_failed;
    }
}

impl fmt::Display for UdpSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} datagrams received, {} echoed ({} bytes), {} refused by source, \
             {} rate-limited, {} send failures",
            self.datagrams_received,
            self.datagrams_echoed,
            self.bytes_echoed,
            self.refused_source,
            self.rate_limited,
            self.send_failed,
        )
    }
}

impl Summary {
    /// Adds another part's counts to this one.
    pub fn add(&mut self, other: &Summary) {
        self.connections_served += other.connections_served;
        self.connections_refused += other.connections_refused;
        self.bytes_received += other.bytes_received;
        self.bytes_echoed += other.bytes_echoed;
        self.connections_cut += other.connections_cut;
        self.bytes_discarded += other.bytes_discarded;
        self.worker_sleeps += other.worker_sleeps;
        self.busy_poll_catches += other.busy_poll_catches;
        if let Some(other) = &other.udp {
            self.udp.get_or_insert_default().add(other);
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections served, {} bytes received, {} bytes echoed, \
             {} connections cut at the deadline, {} bytes discarded, {} connections refused; \
             busy polling caught {} of {} waits",
            self.connections_served,
            self.bytes_received,
            self.bytes_echoed,
            self.connections_cut,
            self.bytes_discarded,
            self.connections_refused,
            self.busy_poll_catches,
            self.busy_poll_catches + self.worker_sleeps,
        )?;
        if let Some(udp) = &self.udp {
            write!(f, "; udp: {udp}")?;
        }
        Ok(())
    }
}

/// Open connections, in total, per worker and per peer address. Touched once
/// when a connection opens and once when it closes, never per echo.
#[derive(Debug)]
pub(crate) struct OpenConnections {
    total: AtomicUsize,
    per_worker: Vec<AtomicUsize>,
    /// Only kept when a per-address limit is set.
    per_ip: Option<Mutex<HashMap<IpAddr, usize>>>,
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `--max-connections` is reached.
    ServerFull,
    /// `--max-connections-per-ip` is reached for this address.
    AddressFull,
}

impl OpenConnections {
    /// Counters for `workers` workers; `track_ips` keeps per-address counts.
    pub fn new(workers: usize, track_ips: bool) -> Self {
        OpenConnections {
            total: AtomicUsize::new(0),
            per_worker: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            per_ip: track_ips.then(|| Mutex::new(HashMap::new())),
        }
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections open now on `worker`.
    pub fn on_worker(&self, worker: usize) -> usize {
        self.per_worker[worker].load(Ordering::Relaxed)
    }

    /// Counts a connection from `ip` as open, unless a limit forbids it.
    ///
    /// # Errors
    /// Which limit was reached.
    pub fn admit(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: Option<usize>,
    ) -> Result<(), Refusal> {
        // Only the acceptor admits, so reading then adding cannot overshoot.
        if self.total.load(Ordering::Relaxed) >= max_total {
            return Err(Refusal::ServerFull);
        }
        if let (Some(per_ip), Some(max)) = (&self.per_ip, max_per_ip) {
            let mut per_ip = lock(per_ip);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= max {
                return Err(Refusal::AddressFull);
            }
            *count += 1;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Places an admitted connection on `worker`.
    pub fn assign(&self, worker: usize) {
        self.per_worker[worker].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back an [`assign`](Self::assign) whose handoff failed.
    pub fn unassign(&self, worker: usize) {
        self.per_worker[worker].fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a connection on `worker` from `ip` as closed.
    pub fn release(&self, worker: Option<usize>, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(worker) = worker {
            self.per_worker[worker].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(per_ip) = &self.per_ip {
            let mut per_ip = lock(per_ip);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent even if a holder panicked: every update is one step.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
