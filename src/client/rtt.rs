//! Round-trip time statistics. Count, min, max, mean and mdev are exact;
//! percentiles and the text histogram come from a log-linear histogram whose
//! buckets are at most 1/128 of their value wide, so a reported percentile is
//! within 0.4% of the true sample. Memory stays small however long the run.

use std::fmt::Write as _;
use std::time::Duration;

/// Sub-buckets per power of two: bucket width <= value / 128.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Rows of the `--histogram` display.
const DISPLAY_ROWS: usize = 10;
/// Width of the longest `--histogram` bar.
const BAR_WIDTH: u64 = 40;

/// Round-trip times of the exact echoes of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RttStats {
    count: u64,
    min_ns: u64,
    max_ns: u64,
    /// Welford's running mean and sum of squared deviations, in ns.
    mean_ns: f64,
    m2: f64,
    /// Counts per log-linear bucket from bucket `first` on, grown on
    /// demand either way: a flow's round trips span a few octaves, and
    /// buckets from zero up to them would cost a UDP run about 20 KiB a
    /// flow (it keeps one of these per flow).
    first: usize,
    buckets: Vec<u64>,
}

impl RttStats {
    /// No samples yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one round-trip time.
    pub fn record(&mut self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        if self.count == 0 {
            self.min_ns = ns;
            self.max_ns = ns;
        } else {
            self.min_ns = self.min_ns.min(ns);
            self.max_ns = self.max_ns.max(ns);
        }
        self.count += 1;
        let delta = ns as f64 - self.mean_ns;
        self.mean_ns += delta / self.count as f64;
        self.m2 += delta * (ns as f64 - self.mean_ns);
        self.add(bucket_of(ns), 1);
    }

    /// Adds `count` round trips evenly spaced: `lowest`, `lowest + step`,
    /// and so on. Costs a step per histogram bucket, not per sample, so the
    /// millions of echoes that a stall at a high `--rate` leaves unsent are
    /// as cheap as a few.
    pub fn record_evenly(&mut self, lowest: Duration, step: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let low = u64::try_from(lowest.as_nanos()).unwrap_or(u64::MAX);
        let step = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
        let value = |j: u64| low.saturating_add(j.saturating_mul(step));
        let n = count as f64;
        let mut even = RttStats {
            count,
            min_ns: low,
            max_ns: value(count - 1),
            mean_ns: low as f64 + step as f64 * (n - 1.0) / 2.0,
            // The variance of 0, 1, …, n-1 is (n² - 1) / 12.
            m2: (step as f64).powi(2) * n * (n * n - 1.0) / 12.0,
            first: 0,
            buckets: Vec::new(),
        };
        let mut j = 0;
        while j < count {
            let bucket = bucket_of(value(j));
            let next_low = bucket_low(bucket + 1);
            // The samples below the next bucket's lowest value.
            let end = if step == 0 || value(count - 1) < next_low {
                count
            } else {
                (next_low - low).div_ceil(step).clamp(j + 1, count)
            };
            even.add(bucket, end - j);
            j = end;
        }
        self.merge(&even);
    }

    /// Adds all samples of `other` (Chan et al.'s parallel variance merge).
    pub fn merge(&mut self, other: &RttStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let count = self.count + other.count;
        let delta = other.mean_ns - self.mean_ns;
        self.mean_ns += delta * other.count as f64 / count as f64;
        self.m2 +=
            other.m2 + delta * delta * (self.count as f64 * other.count as f64) / count as f64;
        self.count = count;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        for (bucket, count) in other.counts() {
            self.add(bucket, count);
        }
    }

    /// Adds `count` samples to `bucket`, growing the buckets kept to reach
    /// it: exactly, since doubling would leave up to half of each unused.
    fn add(&mut self, bucket: usize, count: u64) {
        if count == 0 {
            return;
        }
        if self.buckets.is_empty() {
            self.first = bucket;
        }
        if bucket < self.first {
            let below = self.first - bucket;
            let mut grown = Vec::with_capacity(below + self.buckets.len());
            grown.resize(below, 0);
            grown.extend_from_slice(&self.buckets);
            self.buckets = grown;
            self.first = bucket;
        }
        let at = bucket - self.first;
        if at >= self.buckets.len() {
            self.buckets.reserve_exact(at + 1 - self.buckets.len());
            self.buckets.resize(at + 1, 0);
        }
        self.buckets[at] += count;
    }

    /// (bucket, count) of every bucket kept, lowest first.
    fn counts(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (self.first..).zip(self.buckets.iter().copied())
    }

    /// Number of samples.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Shortest round trip, if any.
    #[must_use]
    pub fn min(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.min_ns))
    }

    /// Longest round trip, if any.
    #[must_use]
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// Arithmetic mean, if any.
    #[must_use]
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.mean_ns.round() as u64))
    }

    /// Population standard deviation (ping's mdev), if any.
    #[must_use]
    pub fn mdev(&self) -> Option<Duration> {
        (self.count > 0).then(|| {
            let variance = (self.m2 / self.count as f64).max(0.0);
            Duration::from_nanos(variance.sqrt().round() as u64)
        })
    }

    /// The `quantile` (0.0..=1.0) by nearest rank, within 0.4%, if any
    /// samples. `percentile(0.5)` is the median.
    #[must_use]
    pub fn percentile(&self, quantile: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in self.counts() {
            seen += count;
            if seen >= rank {
                let ns = bucket_middle(bucket).clamp(self.min_ns, self.max_ns);
                return Some(Duration::from_nanos(ns));
            }
        }
        self.max()
    }

    /// A small text histogram: up to ten log-spaced rows from min to max, in
    /// milliseconds, each with a bar and a count. Empty without samples.
    #[must_use]
    pub fn histogram_text(&self) -> String {
        let mut text = String::new();
        if self.count == 0 {
            return text;
        }
        let (low, high) = (self.min_ns.max(1) as f64, self.max_ns.max(1) as f64);
        let rows = if self.max_ns > self.min_ns {
            DISPLAY_ROWS
        } else {
            1
        };
        let step = (high / low).ln() / rows as f64;
        let edge = |row: usize| {
            if row == rows {
                high
            } else {
                low * (step * row as f64).exp()
            }
        };
        let mut counts = vec![0u64; rows];
        for (bucket, count) in self.counts().filter(|&(_, count)| count > 0) {
            let ns = bucket_middle(bucket).clamp(self.min_ns, self.max_ns).max(1) as f64;
            let row = if step > 0.0 {
                ((ns / low).ln() / step) as usize
            } else {
                0
            };
            counts[row.min(rows - 1)] += count;
        }
        let tallest = counts.iter().copied().max().unwrap_or(1).max(1);
        for (row, &count) in counts.iter().enumerate() {
            let bar = "#".repeat(usize::try_from(count * BAR_WIDTH / tallest).unwrap_or(0));
            let from = edge(row) / 1e6;
            let to = edge(row + 1) / 1e6;
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{from:>10.3} - {to:>10.3} ms | {bar:<40} {count}");
        }
        text
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let shift = (63 - ns.leading_zeros()) - SUB_BITS;
    let sub = (ns >> shift) - SUB;
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The lowest value in `bucket`.
fn bucket_low(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let shift = (bucket - SUB) / SUB;
    let sub = (bucket - SUB) % SUB;
    (SUB + sub)
        .checked_shl(u32::try_from(shift).unwrap_or(u32::MAX))
        .unwrap_or(u64::MAX)
}

/// The value in the middle of `bucket`; exact for values below `SUB` ns.
fn bucket_middle(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let shift = (bucket - SUB) / SUB;
    let sub = (bucket - SUB) % SUB;
    let low = (SUB + sub) << shift;
    low + ((1u64 << shift) >> 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_contain_their_values_within_one_128th() {
        for ns in [
            0,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            81_234,
            5_000_000_000,
            u64::MAX / 3,
        ] {
            let middle = bucket_middle(bucket_of(ns));
            let error = middle.abs_diff(ns) as f64 / (ns.max(1)) as f64;
            assert!(
                error <= 1.0 / 256.0,
                "ns {ns}: middle {middle}, error {error}"
            );
        }
    }

    #[test]
    fn exact_moments_match_the_definitions() {
        let mut stats = RttStats::new();
        for micros in [10, 20, 30, 40] {
            stats.record(Duration::from_micros(micros));
        }
        assert_eq!(stats.min(), Some(Duration::from_micros(10)));
        assert_eq!(stats.max(), Some(Duration::from_micros(40)));
        assert_eq!(stats.mean(), Some(Duration::from_micros(25)));
        // Population standard deviation of 10, 20, 30, 40 is sqrt(125) us.
        assert_eq!(stats.mdev(), Some(Duration::from_nanos(11_180)));
    }

    #[test]
    fn evenly_spaced_round_trips_count_as_if_recorded_one_by_one() {
        let (lowest, step) = (Duration::from_micros(3), Duration::from_nanos(777));
        let mut each = RttStats::new();
        for j in 0..100_000u32 {
            each.record(lowest + step * j);
        }
        let mut even = RttStats::new();
        even.record_evenly(lowest, step, 100_000);
        assert_eq!(
            even.counts().collect::<Vec<_>>(),
            each.counts().collect::<Vec<_>>()
        );
        assert_eq!(
            (even.count(), even.min(), even.max()),
            (each.count(), each.min(), each.max())
        );
        let close = |a: Option<Duration>, b: Option<Duration>| {
            let (a, b) = (a.expect("samples"), b.expect("samples"));
            a.abs_diff(b) <= Duration::from_nanos(a.as_nanos() as u64 / 1_000_000 + 1)
        };
        assert!(
            close(even.mean(), each.mean()),
            "{:?} {:?}",
            even.mean(),
            each.mean()
        );
        assert!(
            close(even.mdev(), each.mdev()),
            "{:?} {:?}",
            even.mdev(),
            each.mdev()
        );
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let (mut left, mut right, mut all) = (RttStats::new(), RttStats::new(), RttStats::new());
        for i in 1..=100u64 {
            let rtt = Duration::from_nanos(i * i * 37);
            if i % 3 == 0 { &mut left } else { &mut right }.record(rtt);
            all.record(rtt);
        }
        left.merge(&right);
        assert_eq!(left.count(), all.count());
        assert_eq!(
            left.counts().collect::<Vec<_>>(),
            all.counts().collect::<Vec<_>>()
        );
        assert_eq!(left.mdev(), all.mdev());
        assert_eq!(left.percentile(0.99), all.percentile(0.99));
    }

    #[test]
    fn percentiles_are_within_half_a_percent_of_nearest_rank() {
        let mut stats = RttStats::new();
        let samples: Vec<u64> = (1..=1000u64).map(|i| 1_000 + i * i * 13).collect();
        for &ns in &samples {
            stats.record(Duration::from_nanos(ns));
        }
        for quantile in [0.5, 0.9, 0.99, 0.999] {
            let exact = samples[(quantile * 1000.0_f64).ceil() as usize - 1];
            let got = stats.percentile(quantile).expect("has samples").as_nanos() as u64;
            let error = got.abs_diff(exact) as f64 / exact as f64;
            assert!(error < 0.005, "p{quantile}: exact {exact} ns, got {got} ns");
        }
    }

    #[test]
    fn buckets_span_the_samples_not_zero_up_to_them() {
        let mut stats = RttStats::new();
        // 1 ms to 4 ms: two octaves, so at most 2 × 128 + 1 buckets, where
        // buckets from zero up to 4 ms would be about 2,700.
        for us in [4000, 1000, 2000, 3000] {
            stats.record(Duration::from_micros(us));
        }
        assert!(
            stats.buckets.len() <= 2 * SUB as usize + 1,
            "{}",
            stats.buckets.len()
        );
        assert_eq!(
            stats.percentile(0.25).map(|p| p.as_micros() / 10),
            Some(100)
        );
        assert_eq!(stats.percentile(1.0).map(|p| p.as_micros() / 10), Some(400));
        // A lower sample afterwards, and a merge of a lower one, grow it down.
        stats.record(Duration::from_micros(500));
        let mut lower = RttStats::new();
        lower.record(Duration::from_micros(250));
        stats.merge(&lower);
        assert_eq!(stats.percentile(0.0).map(|p| p.as_micros() / 10), Some(25));
        assert_eq!(stats.count(), 6);
    }
}
