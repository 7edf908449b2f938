//! The end of a UDP run: every flow's ledger merged into one report,
//! rendered as ping-style text or as one JSON object, and the loss a run
//! may have and still pass (`--max-loss`).

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use super::ledger::{Counts, Jitter};
use crate::client::report::{format_loss, ms, per_second};
use crate::client::rtt::RttStats;

/// What a UDP run did, over all its flows.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpReport {
    /// The target as given, for the summary's header.
    pub target: String,
    /// Flows the run was asked for.
    pub flows: usize,
    /// Datagrams sent, echoed, lost, late, duplicated, reordered,
    /// corrupted, and echoes from elsewhere.
    pub counts: Counts,
    /// Everything else that failed: resolve, socket, thread, memory, send
    /// or receive errors.
    pub errors: u64,
    /// Bytes of all datagrams sent.
    pub bytes_sent: u64,
    /// Bytes of all exact echoes (in time or late).
    pub bytes_echoed: u64,
    /// Round trips of the echoed datagrams.
    pub rtt: RttStats,
    /// Round-trip differences of consecutive echoed datagrams.
    pub jitter: Jitter,
    /// From the start of the run (before resolving) to the last echo or
    /// loss; the short wait after it for stray echoes is not counted.
    pub elapsed: Duration,
    /// True if the run was stopped through its
    /// [`StopHandle`](crate::client::StopHandle).
    pub stopped: bool,
    /// With `--rate`: how the schedule was kept.
    pub rate: Option<UdpRate>,
}

/// How a `--rate` run kept its schedule. A datagram is late when it went
/// more than 10 ms after its time, and unsent when its time came more than
/// 10 ms before sending ended (a stop, `--duration`) and it never went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRate {
    /// Datagrams per second asked for, over all flows.
    pub asked: u64,
    /// Datagrams per second sent, from the start of the schedule to when
    /// sending ended (a stop, `--duration`), or with `--repeat` to the end
    /// of the last datagram's turn (N datagrams take N turns of
    /// 1/`asked` s, not the N − 1 gaps between them).
    pub achieved: f64,
    /// Datagrams sent more than 10 ms after their time.
    pub late: u64,
    /// The latest of those.
    pub most_late: Duration,
    /// Datagrams whose time came and that were never sent.
    pub unsent: u64,
    /// Times a datagram's time came while its flow's window was full (an
    /// unnumbered flow's one datagram still out, or its quiet time after a
    /// loss).
    pub window_waits: u64,
    /// Times a send found the socket's send buffer full.
    pub buffer_waits: u64,
}

impl UdpRate {
    /// True unless anything went unsent or more than 1% of the `sent`
    /// datagrams went late.
    #[must_use]
    pub fn kept(&self, sent: u64) -> bool {
        self.unsent == 0 && self.late.saturating_mul(100) <= sent
    }

    /// The rate line, and the line saying why it was not kept if it was
    /// not, each ending in a newline.
    fn write(&self, text: &mut String, sent: u64) {
        // Writing to a String cannot fail, here and below.
        let _ = writeln!(
            text,
            "rate {}/s asked, {:.1}/s sent: {} late (over 10 ms, the latest {}), {} unsent; round trips count from each datagram's send",
            self.asked,
            self.achieved,
            self.late,
            humantime::format_duration(Duration::from_millis(
                u64::try_from(self.most_late.as_millis()).unwrap_or(u64::MAX)
            )),
            self.unsent,
        );
        if self.kept(sent) {
            return;
        }
        let why = if self.window_waits > 0 && self.window_waits >= self.buffer_waits {
            "flows waited with their window full (a --message or --size under 8 flow keeps one datagram in flight, so it sends no faster than one per round trip; more --connections, a faster server or less loss may help)"
        } else if self.buffer_waits > 0 {
            "the sockets' send buffers were full (the kernel could not send that fast)"
        } else {
            "the client fell behind (its CPU), more --threads may help"
        };
        let _ = writeln!(
            text,
            "the client could not keep --rate {}: {} of {} datagrams went out late or not at all, {:.1}/s sent; {why}",
            self.asked,
            self.late + self.unsent,
            sent + self.unsent,
            self.achieved,
        );
    }

    fn json(&self, sent: u64) -> String {
        format!(
            ",\"rate\":{{\"asked\":{},\"achieved\":{:.3},\"late\":{},\"unsent\":{},\"most_late_ms\":{},\"kept\":{}}}",
            self.asked,
            self.achieved,
            self.late,
            self.unsent,
            ms(self.most_late),
            self.kept(sent),
        )
    }
}

impl UdpReport {
    /// True if every datagram came back exact, but for a loss within
    /// `max_loss`: nothing corrupted, duplicated or from elsewhere, and no
    /// error. Late and reordered echoes do not fail a run by themselves (a
    /// late one counts in the loss).
    #[must_use]
    pub fn is_success(&self, max_loss: MaxLoss) -> bool {
        let counts = &self.counts;
        counts.corrupted == 0
            && counts.duplicated == 0
            && counts.foreign == 0
            && self.errors == 0
            && max_loss.allows(counts.lost, counts.sent)
    }

    /// Percent of datagrams sent that got no answer within the timeout.
    #[must_use]
    pub fn loss_percent(&self) -> f64 {
        if self.counts.sent == 0 {
            return 0.0;
        }
        self.counts.lost as f64 * 100.0 / self.counts.sent as f64
    }

    /// Echoed datagrams per second of the run.
    #[must_use]
    pub fn echoes_per_second(&self) -> f64 {
        per_second(self.counts.echoed, self.elapsed)
    }

    /// The ping-style summary, several lines ending in a newline:
    ///
    /// ```text
    /// --- 127.0.0.1:9999 udp echo statistics ---
    /// 100 sent, 99 echoed, 1 lost, 0 late, 0 duplicated, 2 reordered, 0 corrupted, 1% loss, time 1990ms
    /// rtt min/avg/max/mdev = 0.051/0.083/0.201/0.012 ms
    /// rtt p50/p90/p99/p99.9 = 0.080/0.101/0.180/0.201 ms (histogram, within 0.4%)
    /// jitter 0.011 ms (mean difference of consecutive round trips, 97 pairs)
    /// throughput 49.7 echoes/s, 0.003 MB/s sent, 0.003 MB/s echoed (1 flow)
    /// ```
    ///
    /// Echoes from elsewhere and errors are named on the counts line only
    /// when there were some. The throughput line follows when more than one
    /// datagram was sent or more than one flow asked for, and a histogram
    /// when `histogram` is true.
    #[must_use]
    pub fn summary(&self, histogram: bool) -> String {
        let counts = &self.counts;
        let mut text = String::new();
        // Writing to a String cannot fail, here and below.
        let _ = writeln!(text, "--- {} udp echo statistics ---", self.target);
        let _ = write!(
            text,
            "{} sent, {} echoed, {} lost, {} late, {} duplicated, {} reordered, {} corrupted",
            counts.sent,
            counts.echoed,
            counts.lost,
            counts.late,
            counts.duplicated,
            counts.reordered,
            counts.corrupted
        );
        if counts.foreign > 0 {
            let _ = write!(text, ", {} foreign", counts.foreign);
        }
        if self.errors > 0 {
            let _ = write!(text, ", {}", crate::log::counted(self.errors, "error"));
        }
        crate::client::report::write_loss_and_time(
            &mut text,
            counts.lost,
            counts.sent,
            self.elapsed,
        );
        crate::client::report::write_rtt(&mut text, &self.rtt);
        if let Some(jitter) = self.jitter.mean() {
            let pairs = self.jitter.pairs();
            let plural = if pairs == 1 { "" } else { "s" };
            let _ = writeln!(
                text,
                "jitter {} ms (mean difference of consecutive round trips, {pairs} pair{plural})",
                ms(jitter)
            );
        }
        if self.flows > 1 || counts.sent > 1 {
            let throughput = crate::client::report::Throughput {
                echoes_per_second: self.echoes_per_second(),
                bytes_sent: self.bytes_sent,
                bytes_echoed: self.bytes_echoed,
                elapsed: self.elapsed,
                units: (self.flows, "flow"),
            };
            throughput.write(&mut text);
        }
        if let Some(rate) = &self.rate {
            rate.write(&mut text, counts.sent);
        }
        let mut text = crate::client::report::fit_to_terminal(&text);
        crate::client::report::write_histogram(&mut text, &self.rtt, histogram);
        text
    }

    /// The report as one JSON object on one line, with the keys `sent`,
    /// `echoed`, `lost`, `late`, `duplicated`, `reordered`, `corrupted`,
    /// `foreign`, `errors`, `loss_pct`, `rtt_ms` (`min`, `avg`, `max`,
    /// `mdev`, `p50`, `p90`, `p99`, `p999`; `null` without echoes),
    /// `jitter_ms` (`null` without a pair), `elapsed_s` and `echoes_per_s`;
    /// with `--rate`, then `rate` (`asked`, `achieved`, `late`, `unsent`,
    /// `most_late_ms`, `kept`).
    #[must_use]
    pub fn to_json(&self) -> String {
        let counts = &self.counts;
        let rtt = |value: Option<Duration>| value.map_or_else(|| "null".to_owned(), ms);
        let p = |q| rtt(self.rtt.percentile(q));
        format!(
            concat!(
                "{{\"sent\":{},\"echoed\":{},\"lost\":{},\"late\":{},\"duplicated\":{},",
                "\"reordered\":{},\"corrupted\":{},\"foreign\":{},\"errors\":{},\"loss_pct\":{},",
                "\"rtt_ms\":{{\"min\":{},\"avg\":{},\"max\":{},\"mdev\":{},",
                "\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{}}},",
                "\"jitter_ms\":{},\"elapsed_s\":{:.6},\"echoes_per_s\":{:.3}{}}}"
            ),
            counts.sent,
            counts.echoed,
            counts.lost,
            counts.late,
            counts.duplicated,
            counts.reordered,
            counts.corrupted,
            counts.foreign,
            self.errors,
            format_loss(counts.lost, counts.sent),
            rtt(self.rtt.min()),
            rtt(self.rtt.mean()),
            rtt(self.rtt.max()),
            rtt(self.rtt.mdev()),
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            rtt(self.jitter.mean()),
            self.elapsed.as_secs_f64(),
            self.echoes_per_second(),
            self.rate
                .map_or_else(String::new, |rate| rate.json(counts.sent)),
        )
    }
}

/// The loss a run may have and still succeed (`--max-loss`), in percent of
/// the datagrams sent, kept exactly to a millionth of a percent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaxLoss {
    /// Millionths of a percent, 0 to 100,000,000.
    millionths: u64,
}

impl MaxLoss {
    /// No loss at all (the default).
    pub const NONE: MaxLoss = MaxLoss { millionths: 0 };

    /// True if `lost` of `sent` is at most this.
    #[must_use]
    pub fn allows(self, lost: u64, sent: u64) -> bool {
        u128::from(lost) * 100_000_000 <= u128::from(self.millionths) * u128::from(sent)
    }
}

impl FromStr for MaxLoss {
    type Err = String;

    /// `1%`, `1`, `0.5%`, `100%`: a percentage from 0 to 100, with at most
    /// six decimals and an optional `%`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || "expected a percentage from 0 to 100, such as 1% or 0.5%".to_owned();
        let number = text.strip_suffix('%').unwrap_or(text);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 6 {
            return Err(invalid());
        }
        let whole: u64 = whole.parse().map_err(|_| invalid())?;
        let fraction: u64 = format!("{fraction:0<6}").parse().map_err(|_| invalid())?;
        let millionths = whole
            .checked_mul(1_000_000)
            .and_then(|whole| whole.checked_add(fraction))
            .filter(|&millionths| millionths <= 100_000_000)
            .ok_or_else(invalid)?;
        Ok(MaxLoss { millionths })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_loss_reads_percentages_and_tolerates_up_to_them() {
        let one: MaxLoss = "1%".parse().expect("a percentage");
        assert_eq!("1".parse(), Ok(one));
        assert!(one.allows(1, 100));
        assert!(!one.allows(2, 100));
        let tenth: MaxLoss = "0.1%".parse().expect("a percentage");
        assert!(tenth.allows(1, 1000));
        assert!(!tenth.allows(1, 999));
        assert!(MaxLoss::NONE.allows(0, 5));
        assert!(!MaxLoss::NONE.allows(1, 1_000_000));
        let all: MaxLoss = "100%".parse().expect("a percentage");
        assert!(all.allows(5, 5));
        for bad in [
            "",
            "%",
            "-1",
            "101%",
            "1.0000001",
            "abc",
            "1%%",
            ".5",
            "1e2",
        ] {
            assert!(bad.parse::<MaxLoss>().is_err(), "{bad:?} was accepted");
        }
    }
}
