//! Per-interval reports of a UDP run (`--report-every`), beside the flows:
//! each event loop adds what its flows did to its own [`UdpIntervalTally`]
//! as it happens, and a reporter thread takes them all at the end of each
//! interval and hands one [`UdpInterval`] to the caller, as the TCP
//! engine's intervals do (see [`Interval`](crate::client::Interval)), with
//! the datagrams sent and lost beside the echoes.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::failure::UdpFailureKind;
use crate::client::interval::decimals_for;
use crate::client::report::{ms, per_second};
use crate::client::rtt::RttStats;

/// What one loop's flows did since the last interval ended.
#[derive(Debug, Default)]
pub(super) struct UdpIntervalTally {
    pub sent: u64,
    pub echoes: u64,
    pub bytes_echoed: u64,
    pub lost: u64,
    pub errors: u64,
    pub rtt: RttStats,
}

impl UdpIntervalTally {
    /// An exact echo in time, of `len` bytes, after `rtt`.
    pub fn echoed(&mut self, len: usize, rtt: Duration) {
        self.echoes += 1;
        self.bytes_echoed += len as u64;
        self.rtt.record(rtt);
    }

    /// A failure: a loss, or anything else.
    pub fn count(&mut self, kind: &UdpFailureKind) {
        match kind {
            UdpFailureKind::Lost { .. } => self.lost += 1,
            _ => self.errors += 1,
        }
    }

    /// Adds this tally to `shared` and starts again from nothing.
    pub fn flush_into(&mut self, shared: &Mutex<UdpIntervalTally>) {
        if self.sent == 0 && self.echoes == 0 && self.lost == 0 && self.errors == 0 {
            return;
        }
        // A loop that panicked holding the lock left whole counts.
        let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.absorb(self);
    }

    /// Adds `other` to this tally, leaving `other` at nothing.
    fn absorb(&mut self, other: &mut UdpIntervalTally) {
        self.sent += std::mem::take(&mut other.sent);
        self.echoes += std::mem::take(&mut other.echoes);
        self.bytes_echoed += std::mem::take(&mut other.bytes_echoed);
        self.lost += std::mem::take(&mut other.lost);
        self.errors += std::mem::take(&mut other.errors);
        self.rtt.merge(&std::mem::take(&mut other.rtt));
    }
}

/// One interval of a UDP run: from `start` to `end` after the run began.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpInterval {
    /// When the interval began, from the start of the run.
    pub start: Duration,
    /// When it ended, from the start of the run.
    pub end: Duration,
    /// Datagrams sent in it.
    pub sent: u64,
    /// Datagrams echoed exact and in time in it.
    pub echoes: u64,
    /// The bytes of every exact echo in it, in time or late, as the
    /// summary's [`bytes_echoed`](super::UdpReport::bytes_echoed) counts
    /// them.
    pub bytes_echoed: u64,
    /// The round trips of the echoes in time.
    pub rtt: RttStats,
    /// Datagrams counted lost in it (their timeout ran out in it).
    pub lost: u64,
    /// Every other failure in it: late, duplicated, corrupted or foreign
    /// echoes, send and receive errors.
    pub errors: u64,
}

impl UdpInterval {
    /// Takes what every loop did since the last interval and sums it.
    pub(super) fn take(
        tallies: &[Mutex<UdpIntervalTally>],
        start: Duration,
        end: Duration,
    ) -> Self {
        let mut sum = UdpIntervalTally::default();
        for tally in tallies {
            // A loop that panicked holding the lock left whole counts.
            let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
            sum.absorb(&mut tally);
        }
        UdpInterval {
            start,
            end,
            sent: sum.sent,
            echoes: sum.echoes,
            bytes_echoed: sum.bytes_echoed,
            rtt: sum.rtt,
            lost: sum.lost,
            errors: sum.errors,
        }
    }

    /// True if nothing happened in it.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sent == 0 && self.echoes == 0 && self.lost == 0 && self.errors == 0
    }

    fn length(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }

    /// One line: `[  1.0-  2.0 s] 2000.0 sent/s, 1998.0 echoes/s, 0.128
    /// MB/s, p50 0.061 ms, p99 0.190 ms, 2 lost, 0 errors`, its times with
    /// as many decimals as intervals of `every` need to read apart, as the
    /// TCP lines.
    #[must_use]
    pub fn line(&self, every: Duration) -> String {
        let p = |q| self.rtt.percentile(q).map_or_else(|| "-".to_owned(), ms);
        let plural = if self.errors == 1 { "" } else { "s" };
        let decimals = decimals_for(every);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "[{:6.decimals$}-{:6.decimals$} s] {:.1} sent/s, {:.1} echoes/s, {:.3} MB/s, p50 {} ms, p99 {} ms, {} lost, {} error{plural}",
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            per_second(self.sent, self.length()),
            per_second(self.echoes, self.length()),
            per_second(self.bytes_echoed, self.length()) / 1e6,
            p(0.5),
            p(0.99),
            self.lost,
            self.errors,
        );
        text
    }

    /// One JSON object on one line, with the keys `start_s`, `end_s`,
    /// `sent`, `echoes`, `echoes_per_s`, `bytes_echoed` and `mb_per_s`
    /// (every exact echo, in time or late), `p50_ms`, `p99_ms` (`null`
    /// without echoes), `lost` and `errors`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let p = |q| self.rtt.percentile(q).map_or_else(|| "null".to_owned(), ms);
        format!(
            concat!(
                "{{\"start_s\":{:.3},\"end_s\":{:.3},\"sent\":{},\"echoes\":{},",
                "\"echoes_per_s\":{:.3},\"bytes_echoed\":{},\"mb_per_s\":{:.6},",
                "\"p50_ms\":{},\"p99_ms\":{},\"lost\":{},\"errors\":{}}}"
            ),
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            self.sent,
            self.echoes,
            per_second(self.echoes, self.length()),
            self.bytes_echoed,
            per_second(self.bytes_echoed, self.length()) / 1e6,
            p(0.5),
            p(0.99),
            self.lost,
            self.errors,
        )
    }
}
