//! Per-interval reports (`--report-every`), beside the flow: each event
//! loop adds its echoes to its own [`IntervalTally`] as they come, and a
//! reporter thread takes them all at the end of each interval and hands
//! one [`Interval`] to the caller, as iperf3's interval lines do.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::report::{ms, per_second};
use super::rtt::RttStats;

/// What one loop did since the last interval ended.
#[derive(Debug, Default)]
pub(super) struct IntervalTally {
    pub echoes: u64,
    pub bytes_echoed: u64,
    pub errors: u64,
    pub rtt: RttStats,
    /// Connections open on the loop now (a gauge, not reset).
    pub open: usize,
}

/// One interval of a run: from `start` to `end` after the run began.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    /// When the interval began, from the start of the run.
    pub start: Duration,
    /// When it ended, from the start of the run.
    pub end: Duration,
    /// Complete echoes (exact or not) that came back in it.
    pub echoes: u64,
    /// Their bytes.
    pub bytes_echoed: u64,
    /// Round trips of the exact echoes in it.
    pub rtt: RttStats,
    /// Connections open at its end.
    pub open: usize,
    /// Failures in it.
    pub errors: u64,
}

impl Interval {
    /// Takes what every loop did since the last interval, leaving their
    /// gauges, and sums it.
    pub(super) fn take(tallies: &[Mutex<IntervalTally>], start: Duration, end: Duration) -> Self {
        let mut interval = Interval {
            start,
            end,
            echoes: 0,
            bytes_echoed: 0,
            rtt: RttStats::new(),
            open: 0,
            errors: 0,
        };
        for tally in tallies {
            // A loop that panicked holding the lock left whole counts.
            let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
            interval.echoes += std::mem::take(&mut tally.echoes);
            interval.bytes_echoed += std::mem::take(&mut tally.bytes_echoed);
            interval.errors += std::mem::take(&mut tally.errors);
            interval.rtt.merge(&std::mem::take(&mut tally.rtt));
            interval.open += tally.open;
        }
        interval
    }

    fn length(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }

    /// One line: `[  1.0-  2.0 s] 19980 echoes/s, 0.220 MB/s, p50 0.608 ms,
    /// p99 1.307 ms, 200 open, 0 errors`. The times have as many decimals
    /// as intervals of `every` need to read apart (1 to 3):
    /// `[  0.25-  0.50 s]` for 250 ms.
    #[must_use]
    pub fn line(&self, every: Duration) -> String {
        let p = |q| self.rtt.percentile(q).map_or_else(|| "-".to_owned(), ms);
        let plural = if self.errors == 1 { "" } else { "s" };
        let decimals = decimals_for(every);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "[{:6.decimals$}-{:6.decimals$} s] {:.1} echoes/s, {:.3} MB/s, p50 {} ms, p99 {} ms, {} open, {} error{plural}",
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            per_second(self.echoes, self.length()),
            per_second(self.bytes_echoed, self.length()) / 1e6,
            p(0.5),
            p(0.99),
            self.open,
            self.errors,
        );
        text
    }

    /// One JSON object on one line, with the keys `start_s`, `end_s`,
    /// `echoes`, `echoes_per_s`, `bytes_echoed`, `mb_per_s`, `p50_ms`,
    /// `p99_ms` (`null` without exact echoes), `open` and `errors`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let p = |q| self.rtt.percentile(q).map_or_else(|| "null".to_owned(), ms);
        format!(
            concat!(
                "{{\"start_s\":{:.3},\"end_s\":{:.3},\"echoes\":{},\"echoes_per_s\":{:.3},",
                "\"bytes_echoed\":{},\"mb_per_s\":{:.6},\"p50_ms\":{},\"p99_ms\":{},",
                "\"open\":{},\"errors\":{}}}"
            ),
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            self.echoes,
            per_second(self.echoes, self.length()),
            self.bytes_echoed,
            per_second(self.bytes_echoed, self.length()) / 1e6,
            p(0.5),
            p(0.99),
            self.open,
            self.errors,
        )
    }
}
/// Decimals of seconds that tell the ends of intervals `every` long apart:
/// 1 for a second or more, 2 down to 10 ms, 3 below.
pub(super) fn decimals_for(every: Duration) -> usize {
    match every.as_millis() {
        1000.. => 1,
        10.. => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(start_ms: u64, end_ms: u64) -> Interval {
        Interval {
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(end_ms),
            echoes: 0,
            bytes_echoed: 0,
            rtt: RttStats::new(),
            open: 1,
            errors: 0,
        }
    }

    #[test]
    fn interval_times_have_the_decimals_their_length_needs() {
        let line = |start, end, every| interval(start, end).line(Duration::from_millis(every));
        assert!(line(1000, 2000, 1000).starts_with("[   1.0-   2.0 s] "));
        // At 250 ms, one decimal read [0.2-0.5 s] and [0.8-0.8 s].
        assert!(line(250, 500, 250).starts_with("[  0.25-  0.50 s] "));
        assert!(line(750, 1000, 250).starts_with("[  0.75-  1.00 s] "));
        assert!(line(1, 2, 1).starts_with("[ 0.001- 0.002 s] "));
    }
}
