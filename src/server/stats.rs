//! Counters, beside every step of the flow acceptor → channel → worker →
//! connection: what the acceptor refused and what each worker served over
//! TCP and UDP, and the live count of open connections that the acceptor
//! reads to place and admit new ones and that workers lower as connections
//! close.
//!
//! Each thread counts into a block of its own (`AcceptorCounters`,
//! `WorkerCounters`), written only by that thread and read by anyone
//! without a lock: the metrics endpoint reads them while the server runs,
//! and the shutdown [`Summary`] is summed from the same blocks at the end,
//! so the two always agree.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::log::counted;

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
    /// What the PROXY protocol refused, when the server requires it.
    pub proxy: Option<ProxySummary>,
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
            "{} received, {} echoed ({}), {} refused by source, \
             {} rate-limited, {}",
            counted(self.datagrams_received, "datagram"),
            self.datagrams_echoed,
            counted(self.bytes_echoed, "byte"),
            self.refused_source,
            self.rate_limited,
            counted(self.send_failed, "send failure"),
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
        if let Some(other) = &other.proxy {
            let proxy = self.proxy.get_or_insert_default();
            proxy.untrusted_sources += other.untrusted_sources;
            proxy.bad_headers += other.bad_headers;
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} served, {} received, {} echoed, {} cut at the deadline, {} discarded, \
             {} refused; busy polling caught {} of {}",
            counted(self.connections_served, "connection"),
            counted(self.bytes_received, "byte"),
            counted(self.bytes_echoed, "byte"),
            counted(self.connections_cut, "connection"),
            counted(self.bytes_discarded, "byte"),
            counted(self.connections_refused, "connection"),
            self.busy_poll_catches,
            counted(self.busy_poll_catches + self.worker_sleeps, "wait"),
        )?;
        if let Some(udp) = &self.udp {
            write!(f, "; udp: {udp}")?;
        }
        if let Some(proxy) = &self.proxy {
            write!(f, "; proxy protocol: {proxy}")?;
        }
        Ok(())
    }
}

/// What a running server has done so far: the [`Summary`] it would give if
/// it stopped now, with the finer counts that only the metrics show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The counts of the summary line, so far.
    pub summary: Summary,
    /// TCP connections open now (admitted, on a worker or on their way).
    pub open_connections: usize,
    /// Connections refused at `--max-connections`.
    pub refused_server_full: u64,
    /// Connections refused at `--max-connections-per-ip`.
    pub refused_address_full: u64,
    /// `accept` calls that failed for want of descriptors (`EMFILE`,
    /// `ENFILE`); the client waits in the backlog while the acceptor pauses.
    pub accept_out_of_descriptors: u64,
    /// `accept` calls that failed otherwise for want of resources (memory,
    /// buffers); the client waits in the backlog as above.
    pub accept_failed: u64,
    /// Connections closed for staying idle past `--idle-timeout`.
    pub idle_timeouts: u64,
    /// Whether a shutdown was requested: not ready, draining or about to.
    pub shutting_down: bool,
}

/// A count that one thread writes and any thread reads. The writer adds
/// with a plain load and store, not a locked read-modify-write: no other
/// writer can race it, and a reader sees each store whole.
#[derive(Debug, Default)]
pub(crate) struct OwnedCount(AtomicU64);

impl OwnedCount {
    /// Adds `n`; only the owning thread may call it.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let count = &self.0;
        count.store(
            count.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// The count now.
    #[inline]
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One worker's counts, written only by that worker's thread (its
/// connections and its UDP socket). Aligned to 128 bytes, the pair of cache
/// lines that x86's adjacent-line prefetcher moves together, so that no other
/// thread's writes share its lines: counting costs the worker a few plain
/// adds to memory it alone touches.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerCounters {
    pub(crate) connections_served: OwnedCount,
    pub(crate) bytes_received: OwnedCount,
    pub(crate) bytes_echoed: OwnedCount,
    pub(crate) bytes_discarded: OwnedCount,
    pub(crate) connections_cut: OwnedCount,
    pub(crate) idle_timeouts: OwnedCount,
    pub(crate) worker_sleeps: OwnedCount,
    pub(crate) busy_poll_catches: OwnedCount,
    pub(crate) udp_datagrams_received: OwnedCount,
    pub(crate) udp_datagrams_echoed: OwnedCount,
    pub(crate) udp_bytes_echoed: OwnedCount,
    pub(crate) udp_refused_source: OwnedCount,
    pub(crate) udp_rate_limited: OwnedCount,
    pub(crate) udp_send_failed: OwnedCount,
    /// Connections closed for a missing, malformed or late PROXY header.
    pub(crate) proxy_headers_refused: OwnedCount,
    /// Connections refused at `--max-connections-per-ip` once their PROXY
    /// header named the client (behind a proxy the worker admits by address).
    pub(crate) refused_address_full: OwnedCount,
}

/// The acceptor's counts, written only by the acceptor thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct AcceptorCounters {
    pub(crate) refused_server_full: OwnedCount,
    pub(crate) refused_address_full: OwnedCount,
    pub(crate) accept_out_of_descriptors: OwnedCount,
    pub(crate) accept_failed: OwnedCount,
    /// Connections closed at once for coming from outside `--proxy-from`.
    pub(crate) refused_untrusted_proxy: OwnedCount,
}

/// Every thread's counts: the one source of both the metrics and the summary.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) acceptor: Arc<AcceptorCounters>,
    pub(crate) workers: Vec<Arc<WorkerCounters>>,
    /// Whether the server serves UDP, and so has UDP counts to report.
    serves_udp: bool,
    /// Whether the server requires the PROXY protocol, and so counts it.
    serves_proxy: bool,
}

impl Counters {
    /// Zeroed counts for `workers` workers.
    pub(crate) fn new(workers: usize, serves_udp: bool, serves_proxy: bool) -> Self {
        Counters {
            acceptor: Arc::default(),
            workers: (0..workers).map(|_| Arc::default()).collect(),
            serves_udp,
            serves_proxy,
        }
    }

    /// The summary of everything counted so far. Each count is read once,
    /// without stopping anyone: while the server runs, counts that move
    /// together (bytes received and echoed, say) may be a moment apart.
    pub(crate) fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        let mut udp = UdpSummary::default();
        let mut proxy = ProxySummary::default();
        let mut refused_address_full = 0;
        for worker in &self.workers {
            proxy.bad_headers += worker.proxy_headers_refused.get();
            refused_address_full += worker.refused_address_full.get();
            summary.connections_served += worker.connections_served.get();
            summary.bytes_received += worker.bytes_received.get();
            summary.bytes_echoed += worker.bytes_echoed.get();
            summary.connections_cut += worker.connections_cut.get();
            summary.bytes_discarded += worker.bytes_discarded.get();
            summary.worker_sleeps += worker.worker_sleeps.get();
            summary.busy_poll_catches += worker.busy_poll_catches.get();
            udp.datagrams_received += worker.udp_datagrams_received.get();
            udp.datagrams_echoed += worker.udp_datagrams_echoed.get();
            udp.bytes_echoed += worker.udp_bytes_echoed.get();
            udp.refused_source += worker.udp_refused_source.get();
            udp.rate_limited += worker.udp_rate_limited.get();
            udp.send_failed += worker.udp_send_failed.get();
        }
        let acceptor = &self.acceptor;
        summary.connections_refused = acceptor.refused_server_full.get()
            + acceptor.refused_address_full.get()
            + refused_address_full;
        proxy.untrusted_sources = acceptor.refused_untrusted_proxy.get();
        summary.udp = self.serves_udp.then_some(udp);
        summary.proxy = self.serves_proxy.then_some(proxy);
        summary
    }

    /// The summary so far with the finer counts; `open_connections` and
    /// `shutting_down` come from elsewhere and are left at zero.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let acceptor = &self.acceptor;
        Snapshot {
            summary: self.summary(),
            refused_server_full: acceptor.refused_server_full.get(),
            refused_address_full: acceptor.refused_address_full.get()
                + self
                    .workers
                    .iter()
                    .map(|worker| worker.refused_address_full.get())
                    .sum::<u64>(),
            accept_out_of_descriptors: acceptor.accept_out_of_descriptors.get(),
            accept_failed: acceptor.accept_failed.get(),
            idle_timeouts: self
                .workers
                .iter()
                .map(|worker| worker.idle_timeouts.get())
                .sum(),
            ..Snapshot::default()
        }
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

/// What the PROXY protocol refused, when the server requires it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxySummary {
    /// Connections from sources outside `--proxy-from`, closed at once.
    pub untrusted_sources: u64,
    /// Connections closed for a missing, malformed, oversized or late header.
    pub bad_headers: u64,
}

impl fmt::Display for ProxySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} from untrusted sources, {} without a valid header",
            counted(self.untrusted_sources, "connection"),
            self.bad_headers
        )
    }
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

    /// Counts a connection already admitted by [`admit`](Self::admit)
    /// (without a per-address limit) against `ip`'s limit: behind a proxy,
    /// the client's address is known only once its PROXY header is read.
    ///
    /// # Errors
    /// [`Refusal::AddressFull`] if `ip` has `max_per_ip` open already.
    pub fn admit_address(&self, ip: IpAddr, max_per_ip: usize) -> Result<(), Refusal> {
        let Some(per_ip) = &self.per_ip else {
            return Ok(());
        };
        let mut per_ip = lock(per_ip);
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= max_per_ip {
            return Err(Refusal::AddressFull);
        }
        *count += 1;
        Ok(())
    }

    /// Counts a connection on `worker` as closed, and as one fewer from
    /// `counted_ip` if it was counted against that address.
    pub fn release(&self, worker: Option<usize>, counted_ip: Option<IpAddr>) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(worker) = worker {
            self.per_worker[worker].fetch_sub(1, Ordering::Relaxed);
        }
        if let (Some(per_ip), Some(ip)) = (&self.per_ip, counted_ip) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_threads_counts_fill_lines_of_their_own() {
        assert_eq!(std::mem::align_of::<WorkerCounters>(), 128);
        assert_eq!(std::mem::size_of::<WorkerCounters>(), 128);
        assert_eq!(std::mem::align_of::<AcceptorCounters>(), 128);
    }

    #[test]
    fn the_summary_adds_up_every_workers_counts_and_the_acceptors_refusals() {
        let counters = Counters::new(2, true, false);
        for (index, worker) in counters.workers.iter().enumerate() {
            let n = index as u64 + 1;
            worker.connections_served.add(n);
            worker.bytes_received.add(100 * n);
            worker.bytes_echoed.add(90 * n);
            worker.idle_timeouts.add(n);
            worker.udp_datagrams_received.add(10 * n);
            worker.udp_refused_source.add(n);
        }
        counters.acceptor.refused_server_full.add(4);
        counters.acceptor.refused_address_full.add(3);
        counters.acceptor.accept_out_of_descriptors.add(9);
        let snapshot = counters.snapshot();
        let summary = snapshot.summary;
        assert_eq!(summary, counters.summary());
        assert_eq!(summary.connections_served, 3);
        assert_eq!(summary.bytes_received, 300);
        assert_eq!(summary.bytes_echoed, 270);
        assert_eq!(
            summary.connections_refused, 7,
            "descriptor failures refuse no one"
        );
        let udp = summary.udp.expect("UDP is served");
        assert_eq!((udp.datagrams_received, udp.refused_source), (30, 3));
        assert_eq!(snapshot.idle_timeouts, 3);
        assert_eq!(snapshot.accept_out_of_descriptors, 9);
        assert_eq!(Counters::new(1, false, false).summary().udp, None);
    }
}
