//! Which UDP sources the server answers: the reflection and loop safety of
//! UDP echo. It sits inside the worker step of the flow, between a
//! datagram's arrival on the worker's UDP socket (`datagram`) and its
//! echo.
//!
//! A datagram's source address is whatever its sender wrote, so an echo
//! server is a reflector: a forged source makes it send to a victim, and a
//! source that is itself a responder (echo, chargen, DNS, another echo
//! server) starts a loop that never ends (CVE-1999-0103). As OpenBSD's and
//! FreeBSD's inetd do (`dg_badinput`, `check_loop`), the guard never answers
//! a source port below 1024, the well-known responders above it, the
//! server's own port, or a broadcast, multicast or unspecified address. What
//! is left is limited per source address by a token bucket kept in a table
//! of fixed size, so that spoofing millions of sources costs no memory.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::server::cidr::Cidr;

/// UDP responders above port 1023 that reflect or amplify, and so must never
/// be answered: an echo to them is answered again. Ports inside the
/// ephemeral ranges (Linux's 32768–60999, IANA's 49152–65535) are left out:
/// ordinary clients get those ports at random.
pub const RESPONDER_PORTS: [u16; 14] = [
    1434,  // Microsoft SQL Server browser
    1900,  // SSDP (UPnP discovery)
    2049,  // NFS
    3283,  // Apple Remote Desktop
    3389,  // RDP over UDP
    3478,  // STUN
    3702,  // WS-Discovery
    5060,  // SIP
    5353,  // mDNS
    5683,  // CoAP
    10001, // Ubiquiti discovery
    11211, // memcached
    27015, // Source engine game queries
    32414, // Plex discovery
];

/// Sources exempt from the rate limit unless `--udp-rate-exempt` says
/// otherwise: loopback, the private ranges and link-local addresses, where
/// the load tests run; a forged source there cannot be reached from the
/// internet through a router that filters martians.
pub const DEFAULT_RATE_EXEMPT: &str =
    "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16,::1/128,fc00::/7,fe80::/10";

/// Datagrams per second answered to one source address by default.
pub const DEFAULT_RATE_PER_IP: u32 = 1000;

/// Token buckets in the rate table: 512 KiB, however many sources there are.
const RATE_TABLE_CELLS: usize = 1 << 16;

/// Why a source is never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenSource {
    /// A port below 1024: the classic responders (echo, chargen, DNS, NTP, ...).
    PrivilegedPort,
    /// One of [`RESPONDER_PORTS`].
    ResponderPort,
    /// The server's own port: another echo server would answer back.
    OwnPort,
    /// A broadcast, multicast or unspecified address, which no one sends from.
    NotUnicast,
    /// Sent to a broadcast or multicast address: answering would make every
    /// echo server that heard it reply to one source, an amplifier.
    ToGroup,
}

impl ForbiddenSource {
    /// How the warnings name it.
    pub fn describe(self) -> &'static str {
        match self {
            ForbiddenSource::PrivilegedPort => "source port below 1024",
            ForbiddenSource::ResponderPort => "source port of a well-known UDP responder",
            ForbiddenSource::OwnPort => "source port is the server's own",
            ForbiddenSource::NotUnicast => "broadcast, multicast or unspecified source address",
            ForbiddenSource::ToGroup => "sent to a broadcast or multicast address",
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Echo it.
    Answer,
    /// Never answer this source.
    Forbidden(ForbiddenSource),
    /// The source is over its rate.
    RateLimited,
}

/// The rate limit on answers per source address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Datagrams a second answered to one source address (IPv6: one /64).
    pub per_second: u32,
    /// Datagrams answered at once after a quiet spell.
    pub burst: u32,
    /// Sources never limited.
    pub exempt: Vec<Cidr>,
}

/// The source checks one server's UDP sockets share.
#[derive(Debug)]
pub struct SourceGuard {
    own_port: u16,
    /// The interfaces' broadcast addresses when the server started.
    broadcasts: Vec<IpAddr>,
    rate: Option<(RateLimit, RateTable)>,
}

impl SourceGuard {
    /// A guard for a server on `own_port`, with the given broadcast
    /// addresses and rate limit (none: unlimited).
    pub fn new(own_port: u16, broadcasts: Vec<IpAddr>, rate: Option<RateLimit>) -> Self {
        SourceGuard {
            own_port,
            broadcasts,
            rate: rate.map(|rate| {
                let table = RateTable::new(rate.per_second, rate.burst);
                (rate, table)
            }),
        }
    }

    /// Whether to answer a datagram from `source`, sent to `destination`
    /// (where the kernel says), that arrived at `now`.
    pub fn check(&self, source: SocketAddr, destination: Option<IpAddr>, now: Instant) -> Verdict {
        if let Some(why) = self.forbidden(source) {
            return Verdict::Forbidden(why);
        }
        if let Some(destination) = destination
            && self.is_group(destination.to_canonical())
        {
            return Verdict::Forbidden(ForbiddenSource::ToGroup);
        }
        let Some((limit, table)) = &self.rate else {
            return Verdict::Answer;
        };
        let ip = source.ip().to_canonical();
        if limit.exempt.iter().any(|block| block.contains(ip)) {
            return Verdict::Answer;
        }
        match table.take(ip, now) {
            true => Verdict::Answer,
            false => Verdict::RateLimited,
        }
    }

    /// Why `source` must never be answered, if it must not.
    pub fn forbidden(&self, source: SocketAddr) -> Option<ForbiddenSource> {
        let port = source.port();
        if port < 1024 {
            return Some(ForbiddenSource::PrivilegedPort);
        }
        if port == self.own_port {
            return Some(ForbiddenSource::OwnPort);
        }
        if RESPONDER_PORTS.contains(&port) {
            return Some(ForbiddenSource::ResponderPort);
        }
        let ip = source.ip().to_canonical();
        let unspecified = match ip {
            // 0.0.0.0/8 is "this network": no one sends from it.
            IpAddr::V4(v4) => v4.octets()[0] == 0,
            IpAddr::V6(v6) => v6.is_unspecified(),
        };
        if unspecified || self.is_group(ip) {
            return Some(ForbiddenSource::NotUnicast);
        }
        None
    }

    /// Whether `ip` (canonical) reaches a group: multicast, broadcast, or
    /// IPv4's reserved 240/4 that holds the limited broadcast address.
    fn is_group(&self, ip: IpAddr) -> bool {
        let group = match ip {
            IpAddr::V4(v4) => v4.octets()[0] >= 224,
            IpAddr::V6(v6) => v6.is_multicast(),
        };
        group || self.broadcasts.contains(&ip)
    }
}

/// Token buckets for the rate limit, as GCRA cells: each holds the
/// "theoretical arrival time" of its next datagram in nanoseconds since the
/// table was made, updated with one compare-and-swap, shared by every worker
/// without a lock. A source's cell is chosen by a keyed hash of its address
/// (IPv6 by its /64, which one host or site holds), so a sender cannot aim
/// at another source's cell; two sources that share a cell share its rate.
#[derive(Debug)]
struct RateTable {
    cells: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    /// Nanoseconds per datagram at the rate.
    interval: u64,
    /// How far ahead of now a cell may run: the burst.
    tolerance: u64,
}

impl RateTable {
    fn new(per_second: u32, burst: u32) -> Self {
        let interval = (1_000_000_000 / u64::from(per_second.max(1))).max(1);
        RateTable {
            cells: (0..RATE_TABLE_CELLS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            epoch: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1)) - 1),
        }
    }

    /// Takes one datagram's token for `ip`; false if it has none left.
    fn take(&self, ip: IpAddr, now: Instant) -> bool {
        let key = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            // Tagged so that no IPv6 prefix hashes like an IPv4 address.
            IpAddr::V6(v6) => (u128::from(v6) >> 64) | (1 << 127),
        };
        let index = self.hasher.hash_one(key) as usize % self.cells.len();
        let cell = &self.cells[index];
        let now = nanos_since(self.epoch, now);
        let mut due = cell.load(Ordering::Relaxed);
        loop {
            let start = due.max(now);
            if start - now > self.tolerance {
                return false;
            }
            match cell.compare_exchange_weak(
                due,
                start + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(current) => due = current,
            }
        }
    }
}

/// Nanoseconds from `epoch` to `now` (zero before it), which fits a u64 for
/// 584 years.
fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    let elapsed: Duration = now.saturating_duration_since(epoch);
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> SocketAddr {
        text.parse().expect("a socket address")
    }

    fn guard(rate: Option<RateLimit>) -> SourceGuard {
        SourceGuard::new(
            9999,
            vec!["192.168.1.255".parse().expect("an address")],
            rate,
        )
    }

    #[test]
    fn classic_responders_and_loops_are_never_answered() {
        let guard = guard(None);
        let forbidden = |text| guard.forbidden(source(text));
        assert_eq!(
            forbidden("198.51.100.1:19"),
            Some(ForbiddenSource::PrivilegedPort)
        );
        assert_eq!(
            forbidden("198.51.100.1:0"),
            Some(ForbiddenSource::PrivilegedPort)
        );
        assert_eq!(
            forbidden("198.51.100.1:1023"),
            Some(ForbiddenSource::PrivilegedPort)
        );
        assert_eq!(
            forbidden("198.51.100.1:9999"),
            Some(ForbiddenSource::OwnPort)
        );
        for port in [1900, 2049, 5353, 11211] {
            let from = SocketAddr::new("198.51.100.1".parse().expect("an address"), port);
            assert_eq!(guard.forbidden(from), Some(ForbiddenSource::ResponderPort));
        }
        assert_eq!(forbidden("198.51.100.1:1024"), None);
        assert_eq!(forbidden("[2001:db8::1]:40000"), None);
    }

    #[test]
    fn broadcast_multicast_and_unspecified_sources_are_never_answered() {
        let guard = guard(None);
        for text in [
            "255.255.255.255:40000",
            "192.168.1.255:40000",
            "224.0.0.251:40000",
            "0.0.0.0:40000",
            "240.1.2.3:40000",
            "[::]:40000",
            "[ff02::1]:40000",
            "[::ffff:224.0.0.1]:40000",
            "[::ffff:192.168.1.255]:40000",
        ] {
            assert_eq!(
                guard.forbidden(source(text)),
                Some(ForbiddenSource::NotUnicast),
                "{text}"
            );
        }
    }

    #[test]
    fn datagrams_sent_to_a_broadcast_or_multicast_address_are_never_answered() {
        let guard = guard(None);
        let from = source("198.51.100.1:40000");
        let now = Instant::now();
        for text in [
            "255.255.255.255",
            "192.168.1.255",
            "224.0.0.1",
            "ff02::1",
            "::ffff:192.168.1.255",
        ] {
            let to = Some(text.parse().expect("an address"));
            assert_eq!(
                guard.check(from, to, now),
                Verdict::Forbidden(ForbiddenSource::ToGroup),
                "{text}"
            );
        }
        let unicast = Some("192.168.1.7".parse().expect("an address"));
        assert_eq!(guard.check(from, unicast, now), Verdict::Answer);
    }

    #[test]
    fn the_rate_limit_holds_one_source_to_its_burst_and_rate() {
        let limit = RateLimit {
            per_second: 10,
            burst: 5,
            exempt: Vec::new(),
        };
        let guard = guard(Some(limit));
        let now = Instant::now();
        let noisy = source("198.51.100.1:40000");
        let answered = (0..20)
            .filter(|_| guard.check(noisy, None, now) == Verdict::Answer)
            .count();
        assert_eq!(answered, 5, "the burst, then nothing at the same instant");
        // Another source has its own bucket (unless the keyed hash puts both
        // in one cell, one chance in 65,536: the next address is tried then).
        let quiet = (2..10)
            .map(|host| source(&format!("198.51.100.{host}:40000")))
            .find(|other| guard.check(*other, None, now) == Verdict::Answer);
        assert!(quiet.is_some(), "other sources are still answered");
        // A tenth of a second later, one more datagram's worth has accrued.
        let later = now + Duration::from_millis(100);
        assert_eq!(guard.check(noisy, None, later), Verdict::Answer);
        assert_eq!(guard.check(noisy, None, later), Verdict::RateLimited);
    }

    #[test]
    fn exempt_sources_are_never_rate_limited() {
        let limit = RateLimit {
            per_second: 1,
            burst: 1,
            exempt: crate::server::cidr::parse_list(DEFAULT_RATE_EXEMPT).expect("the default list"),
        };
        let guard = guard(Some(limit));
        let now = Instant::now();
        for text in [
            "127.0.0.1:40000",
            "[::ffff:10.0.0.1]:40000",
            "[fd00::1]:40000",
        ] {
            for _ in 0..100 {
                assert_eq!(
                    guard.check(source(text), None, now),
                    Verdict::Answer,
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let limit = RateLimit {
            per_second: 1,
            burst: 1,
            exempt: Vec::new(),
        };
        let guard = guard(Some(limit));
        let now = Instant::now();
        assert_eq!(
            guard.check(source("[2001:db8::1]:40000"), None, now),
            Verdict::Answer
        );
        assert_eq!(
            guard.check(source("[2001:db8::2]:40000"), None, now),
            Verdict::RateLimited,
            "the same /64"
        );
    }
}
