//! The end of the flow: all connections' tallies merged into one report,
//! rendered as ping-style text or as one JSON object.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::ClientConfig;
use super::echo::ConnectionTally;
use super::rtt::RttStats;
use crate::log::counted;

/// What a run did, over all its connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The target as given, for the summary's header.
    pub target: String,
    /// Connections the run was asked for.
    pub connections: usize,
    /// Messages sent (an echo was then waited for).
    pub sent: u64,
    /// Echoes that came back complete and exact.
    pub echoed: u64,
    /// Echoes that came back complete but different.
    pub mismatched: u64,
    /// Echoes that did not come back in full within the timeout.
    pub timed_out: u64,
    /// Echoes whose connection the server ended cleanly before any byte of
    /// them came back: between echoes, as a draining server does. Not in
    /// `errors`, which counts echoes cut short among the rest.
    pub closed_before_echo: u64,
    /// Everything else that failed: resolve, connect, an echo cut short,
    /// reset, other socket or input errors.
    pub errors: u64,
    /// Bytes of all messages sent.
    pub bytes_sent: u64,
    /// Bytes of all complete echoes received.
    pub bytes_echoed: u64,
    /// Round-trip times of the exact echoes; with [`rate`](Self::rate),
    /// also the echoes due and never sent or still out at their end, each
    /// with the time it had waited by then (a lower bound:
    /// `RateReport::lower_bounds`).
    pub rtt: RttStats,
    /// From the start of the run (before resolving) to its last echo (or
    /// failure); the closing checks after the last echo are not counted.
    pub elapsed: Duration,
    /// True if the run was stopped through its [`StopHandle`](super::StopHandle).
    pub stopped: bool,
    /// True if the run reconnected when the server ended a connection
    /// ([`ClientConfig::reconnect`]); the summary and the JSON then show
    /// the next two counts.
    pub reconnect: bool,
    /// Connections opened again after the server ended one or a failure
    /// broke one.
    pub reconnects: u64,
    /// Messages sent again because the server ended their connection
    /// before echoing any of them (each still counts once in `sent`).
    pub resent: u64,
    /// Connect times of the connections that connected: their first
    /// connects (with `reconnect`, later ones count in `reconnects`).
    pub connect: RttStats,
    /// Connections that could not connect, by the cause of their last
    /// attempt (`connection refused`, `too many open files`), most first.
    pub connect_failures: Vec<(String, u64)>,
    /// With [`ClientConfig::rate`]: how well the rate was kept.
    pub rate: Option<RateReport>,
    /// The run used a load option (`threads`, `connect_rate`, `rate` or
    /// `duration`): the JSON then has the connect keys, which other runs
    /// leave out so that their object keeps its keys.
    pub load: bool,
}

/// How an open-loop run ([`ClientConfig::rate`]) kept its rate. Its round
/// trips count from when each echo was due, so an echo that went out late
/// has its lateness in its round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateReport {
    /// Echoes per second asked for.
    pub asked: u64,
    /// Echoes that came due.
    pub due: u64,
    /// Echoes sent more than 10 ms after they were due: no connection was
    /// free (each has one echo out at most), or the client was too busy.
    pub late: u64,
    /// Echoes due but never sent: the run ended or was stopped first, or
    /// every connection of theirs had ended. `due` is `sent` plus these.
    pub unsent: u64,
    /// The lateness of the latest echo sent.
    pub most_late: Duration,
    /// Of `late`, the echoes that waited for a free connection because
    /// every one had an echo out (a slow server, or too few connections);
    /// the rest found one free, and waited for the client itself (its CPU).
    pub late_for_connection: u64,
    /// Of `late`, the echoes that found a connection free but waited for a
    /// message buffer: with `--size`, the client keeps no more messages out
    /// than its memory check counted (the rate times `--timeout`).
    pub late_for_buffer: u64,
    /// Round trips in [`Report::rtt`] that are lower bounds: echoes unsent,
    /// or still out when their wait ran out (timed out, or stopped), each
    /// counted with the time it had waited by then, as wrk2 does, so that
    /// a stall at the end of a run stays in the percentiles.
    pub lower_bounds: u64,
}

impl RateReport {
    /// True if every echo due was sent and no more than 1% went out late.
    #[must_use]
    pub fn kept(&self) -> bool {
        self.unsent == 0 && self.late.saturating_mul(100) <= self.due
    }
}

impl Report {
    pub(super) fn from_tallies(
        config: &ClientConfig,
        tallies: Vec<ConnectionTally>,
        started: Instant,
        stopped: bool,
    ) -> Report {
        // The run ends with its last echo, not with the closing checks after it.
        let elapsed = tallies
            .iter()
            .filter_map(|tally| tally.echoing_ended)
            .max()
            .map_or_else(
                || started.elapsed(),
                |ended| ended.saturating_duration_since(started),
            );
        let mut report = Report {
            target: config.target.to_string(),
            connections: config.connections.get(),
            sent: 0,
            echoed: 0,
            mismatched: 0,
            timed_out: 0,
            closed_before_echo: 0,
            errors: 0,
            bytes_sent: 0,
            bytes_echoed: 0,
            rtt: RttStats::new(),
            elapsed,
            stopped,
            reconnect: config.reconnect,
            reconnects: 0,
            resent: 0,
            connect: RttStats::new(),
            connect_failures: Vec::new(),
            load: config.threads.is_some()
                || config.connect_rate.is_some()
                || config.rate.is_some()
                || config.duration.is_some(),
            rate: config.rate.map(|asked| RateReport {
                asked,
                due: 0,
                late: 0,
                unsent: 0,
                most_late: Duration::ZERO,
                lower_bounds: 0,
                late_for_connection: 0,
                late_for_buffer: 0,
            }),
        };
        let mut failures = std::collections::BTreeMap::new();
        for tally in tallies {
            report.connect.merge(&tally.connect);
            for (cause, count) in tally.connect_failures {
                *failures.entry(cause).or_insert(0) += count;
            }
            if let Some(rate) = &mut report.rate {
                rate.due += tally.scheduled;
                rate.late += tally.late;
                rate.unsent += tally.unsent;
                rate.most_late = rate.most_late.max(tally.most_late);
                rate.lower_bounds += tally.lower_bounds.count();
                rate.late_for_connection += tally.late_for_connection;
                rate.late_for_buffer += tally.late_for_buffer;
                report.rtt.merge(&tally.lower_bounds);
            }
            report.sent += tally.sent;
            report.echoed += tally.echoed;
            report.mismatched += tally.mismatched;
            report.timed_out += tally.timed_out;
            report.closed_before_echo += tally.closed_before_echo;
            report.errors += tally.errors;
            report.bytes_sent += tally.bytes_sent;
            report.bytes_echoed += tally.bytes_echoed;
            report.reconnects += tally.reconnects;
            report.resent += tally.resent;
            report.rtt.merge(&tally.rtt);
        }
        report.connect_failures = failures.into_iter().collect();
        report
            .connect_failures
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        report
    }

    /// True if nothing failed: every echo sent came back exact (this holds for
    /// a run stopped early, too, and for one that sent nothing).
    #[must_use]
    pub fn is_success(&self) -> bool {
        self.mismatched == 0
            && self.timed_out == 0
            && self.closed_before_echo == 0
            && self.errors == 0
            && self.echoed == self.sent
    }

    /// Percent of messages sent whose echo never came back in full.
    #[must_use]
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        let lost = self.sent.saturating_sub(self.echoed + self.mismatched);
        percent(lost, self.sent)
    }

    /// Complete echoes (exact or not) per second of the run.
    #[must_use]
    pub fn echoes_per_second(&self) -> f64 {
        per_second(self.echoed + self.mismatched, self.elapsed)
    }

    /// The ping-style summary, several lines ending in a newline:
    ///
    /// ```text
    /// --- 127.0.0.1:9999 echo statistics ---
    /// 100 sent, 100 echoed, 0 mismatched, 0 timed out, 0% loss, time 12ms
    /// rtt min/avg/max/mdev = 0.051/0.083/0.201/0.012 ms
    /// rtt p50/p90/p99/p99.9 = 0.080/0.101/0.180/0.201 ms (histogram, within 0.4%)
    /// ```
    ///
    /// `N closed before echo` and `N errors` join the counts when not 0,
    /// and the loss only when something was sent. With
    /// [`reconnect`](Self::reconnect), a line `3 reconnects, 1 resent`
    /// follows the counts. A throughput line follows when more than one echo
    /// was sent or more than one connection was asked for, and a histogram
    /// when `histogram` is true. Lines that would pass 80 columns are
    /// wrapped (`fit_to_terminal`).
    #[must_use]
    pub fn summary(&self, histogram: bool) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, here and below.
        let _ = writeln!(text, "--- {} echo statistics ---", self.target);
        let _ = write!(
            text,
            "{} sent, {} echoed, {} mismatched, {} timed out",
            self.sent, self.echoed, self.mismatched, self.timed_out
        );
        if self.closed_before_echo > 0 {
            let _ = write!(text, ", {} closed before echo", self.closed_before_echo);
        }
        if self.errors > 0 {
            let _ = write!(text, ", {}", counted(self.errors, "error"));
        }
        let lost = self.sent.saturating_sub(self.echoed + self.mismatched);
        write_loss_and_time(&mut text, lost, self.sent, self.elapsed);
        if self.reconnect {
            let _ = writeln!(
                text,
                "{}, {} resent",
                counted(self.reconnects, "reconnect"),
                self.resent
            );
        }
        write_rtt(&mut text, &self.rtt);
        self.write_load(&mut text);
        if self.connections > 1 || self.sent > 1 {
            let throughput = Throughput {
                echoes_per_second: self.echoes_per_second(),
                bytes_sent: self.bytes_sent,
                bytes_echoed: self.bytes_echoed,
                elapsed: self.elapsed,
                units: (self.connections, "connection"),
            };
            throughput.write(&mut text);
        }
        let mut text = fit_to_terminal(&text);
        let bounds = self.rate.as_ref().map_or(0, |rate| rate.lower_bounds);
        if bounds == 0 {
            write_histogram(&mut text, &self.rtt, histogram);
        } else if histogram {
            // Writing to a String cannot fail.
            let _ = writeln!(
                text,
                "rtt histogram ({}, {bounds} of them lower bounds, log-spaced rows):",
                counted(self.rtt.count(), "round trip")
            );
            text.push_str(&self.rtt.histogram_text());
        }
        text
    }

    /// The connect and rate lines: connect times with more than one
    /// connection, failed connects by cause, and with a rate how it was kept.
    fn write_load(&self, text: &mut String) {
        if self.connections > 1
            && let (Some(min), Some(max)) = (self.connect.min(), self.connect.max())
        {
            let p = |q| self.connect.percentile(q).map_or_else(String::new, ms);
            // Writing to a String cannot fail, here and below.
            let _ = write!(
                text,
                "connect min/p50/p99/max = {}/{}/{}/{} ms",
                ms(min),
                p(0.5),
                p(0.99),
                ms(max)
            );
            // Some never connected, or never started (--duration ended first).
            let connected = self.connect.count();
            if connected < self.connections as u64 {
                let _ = write!(text, ", {connected} of {} connected", self.connections);
            }
            text.push('\n');
        }
        if !self.connect_failures.is_empty() {
            let causes: Vec<String> = self
                .connect_failures
                .iter()
                .map(|(cause, count)| format!("{count} {cause}"))
                .collect();
            let _ = writeln!(text, "failed connects: {}", causes.join(", "));
        }
        if let Some(rate) = &self.rate {
            let _ = write!(
                text,
                "rate {}/s asked: {} due, {} late (over 10 ms, the latest {}), {} unsent; round trips count from when each echo was due",
                rate.asked,
                rate.due,
                rate.late,
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(rate.most_late.as_millis()).unwrap_or(u64::MAX)
                )),
                rate.unsent,
            );
            if rate.lower_bounds > 0 {
                let _ = write!(
                    text,
                    " ({} unsent or still out count with their wait so far, a lower bound)",
                    rate.lower_bounds
                );
            }
            text.push('\n');
            if !rate.kept() {
                // An echo that waited for a connection (or never found
                // one) had every connection busy with an echo out; one that
                // found a connection free and still went late waited for
                // the client's own loop.
                let waited = rate.late_for_connection + rate.unsent;
                let why = if rate.late_for_buffer.saturating_mul(2) >= rate.late + rate.unsent {
                    "as many --size messages were out as the memory check counted (the rate times --timeout: a slow or stalled server, or the client held up)"
                } else if waited.saturating_mul(2) >= rate.late + rate.unsent {
                    "every connection had an echo out or had ended (a slow or stalled server, connections it closed, or too few --connections for the rate times the round trip)"
                } else {
                    "connections were free but the client fell behind (its CPU), more --threads may help"
                };
                let _ = writeln!(
                    text,
                    "the client could not keep --rate {}: {} of {} echoes went out late or not at all; {why}",
                    rate.asked,
                    rate.late + rate.unsent,
                    rate.due
                );
            }
        }
    }

    /// The report as one JSON object on one line, with the keys `sent`,
    /// `echoed`, `mismatched`, `timed_out`, `closed_before_echo`, `errors`, `rtt_ms` (`min`, `avg`,
    /// `max`, `mdev`, `p50`, `p90`, `p99`, `p999`; `null` without exact
    /// echoes), `elapsed_s` and `echoes_per_s`; with
    /// [`reconnect`](Self::reconnect), then `reconnects` and `resent`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let rtt = |value: Option<Duration>| value.map_or_else(|| "null".to_owned(), ms);
        let p = |q| rtt(self.rtt.percentile(q));
        let mut extra = if self.reconnect {
            format!(
                ",\"reconnects\":{},\"resent\":{}",
                self.reconnects, self.resent
            )
        } else {
            String::new()
        };
        if self.load {
            let c = |value: Option<Duration>| value.map_or_else(|| "null".to_owned(), ms);
            let failures: Vec<String> = self
                .connect_failures
                .iter()
                .map(|(cause, count)| format!("{}:{count}", json_string(cause)))
                .collect();
            // Writing to a String cannot fail.
            let _ = write!(
                extra,
                ",\"connect_ms\":{{\"min\":{},\"p50\":{},\"p99\":{},\"max\":{}}},\"connect_failures\":{{{}}}",
                c(self.connect.min()),
                c(self.connect.percentile(0.5)),
                c(self.connect.percentile(0.99)),
                c(self.connect.max()),
                failures.join(",")
            );
        }
        if let Some(rate) = &self.rate {
            // Writing to a String cannot fail.
            let _ = write!(
                extra,
                ",\"rate\":{{\"asked\":{},\"due\":{},\"late\":{},\"unsent\":{},\"most_late_ms\":{},\"kept\":{},\"lower_bounds\":{}}}",
                rate.asked,
                rate.due,
                rate.late,
                rate.unsent,
                ms(rate.most_late),
                rate.kept(),
                rate.lower_bounds
            );
        }
        format!(
            concat!(
                "{{\"sent\":{},\"echoed\":{},\"mismatched\":{},\"timed_out\":{},",
                "\"closed_before_echo\":{},\"errors\":{},",
                "\"rtt_ms\":{{\"min\":{},\"avg\":{},\"max\":{},\"mdev\":{},",
                "\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{}}},",
                "\"elapsed_s\":{:.6},\"echoes_per_s\":{:.3}{}}}"
            ),
            self.sent,
            self.echoed,
            self.mismatched,
            self.timed_out,
            self.closed_before_echo,
            self.errors,
            rtt(self.rtt.min()),
            rtt(self.rtt.mean()),
            rtt(self.rtt.max()),
            rtt(self.rtt.mdev()),
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            self.elapsed.as_secs_f64(),
            self.echoes_per_second(),
            extra,
        )
    }
}

/// `text` as a JSON string, quotes and escapes included.
pub(super) fn json_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                // Writing to a String cannot fail.
                let _ = write!(quoted, "\\u{:04x}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Ends the counts line: `, 2% loss, time 12ms`, the loss left out when
/// nothing was sent (a run whose connection failed lost nothing, and
/// `0% loss` beside its error would read as a success).
pub(super) fn write_loss_and_time(text: &mut String, lost: u64, sent: u64, elapsed: Duration) {
    // Writing to a String cannot fail.
    if sent > 0 {
        let _ = write!(text, ", {}% loss", format_loss(lost, sent));
    }
    let _ = writeln!(text, ", time {}ms", elapsed.as_millis());
}

/// The width a summary line may take, as an 80-column terminal shows it.
const SUMMARY_WIDTH: usize = 80;

/// `text` with each line longer than 80 columns broken, at the last
/// `, ` (outside parentheses) or ` (` that keeps it within 80, and the rest
/// indented by two spaces; a line with no such point is left whole.
pub(super) fn fit_to_terminal(text: &str) -> String {
    let mut fitted = String::with_capacity(text.len() + 16);
    for line in text.split_inclusive('\n') {
        let mut rest = line;
        let mut indent = "";
        while rest.trim_end().chars().count() + indent.len() > SUMMARY_WIDTH {
            let Some((head, tail)) = break_line(rest, SUMMARY_WIDTH - indent.len()) else {
                break;
            };
            fitted.push_str(indent);
            fitted.push_str(head);
            fitted.push('\n');
            rest = tail;
            indent = "  ";
        }
        fitted.push_str(indent);
        fitted.push_str(rest);
    }
    fitted
}

/// `line` split at its last break point within `width` columns: after a
/// `, ` outside parentheses, or before a ` (`.
fn break_line(line: &str, width: usize) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    let mut best = None;
    for (column, (at, c)) in line.char_indices().enumerate() {
        match c {
            '(' => {
                if column > 0 && column <= width && line[..at].ends_with(' ') {
                    best = Some((&line[..at - 1], &line[at..]));
                }
                depth += 1;
            }
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 && column < width && line[at..].starts_with(", ") => {
                best = Some((&line[..=at], &line[at + 2..]));
            }
            _ => {}
        }
        if column >= width && best.is_some() {
            break;
        }
    }
    best
}

/// Milliseconds with microsecond resolution, as ping prints them.
pub(super) fn ms(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1e3)
}

fn percent(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole as f64
}

/// `lost` of `sent` as a percentage: `0` and `100` only when exact, `50` and
/// `33.3` with one decimal at most, and as many decimals as it takes for a
/// loss near either end, so that one lost echo in 3000 shows as `0.03`, never
/// as `0` beside a failure.
pub(super) fn format_loss(lost: u64, sent: u64) -> String {
    if lost == 0 || sent == 0 {
        return "0".to_owned();
    }
    if lost >= sent {
        return "100".to_owned();
    }
    let value = percent(lost, sent);
    (1..=18)
        .map(|decimals| format!("{value:.decimals$}"))
        .find(|shown| {
            shown
                .parse::<f64>()
                .is_ok_and(|shown| shown > 0.0 && shown < 100.0)
        })
        .map_or_else(
            || value.to_string(),
            |shown| {
                shown
                    .strip_suffix(".0")
                    .map_or(shown.clone(), str::to_owned)
            },
        )
}

/// The summary's throughput line, for TCP connections and UDP flows alike.
pub(super) struct Throughput {
    pub(super) echoes_per_second: f64,
    pub(super) bytes_sent: u64,
    pub(super) bytes_echoed: u64,
    pub(super) elapsed: Duration,
    /// How many of what ran at once: connections or flows.
    pub(super) units: (usize, &'static str),
}

impl Throughput {
    /// Appends `throughput N echoes/s, N MB/s sent, N MB/s echoed (N units)`.
    pub(super) fn write(&self, text: &mut String) {
        let (count, unit) = self.units;
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "throughput {:.1} echoes/s, {:.3} MB/s sent, {:.3} MB/s echoed ({})",
            self.echoes_per_second,
            per_second(self.bytes_sent, self.elapsed) / 1e6,
            per_second(self.bytes_echoed, self.elapsed) / 1e6,
            counted(count as u64, unit),
        );
    }
}

/// Appends the round-trip lines (min/avg/max/mdev and percentiles), if any
/// echo was timed.
pub(super) fn write_rtt(text: &mut String, rtt: &RttStats) {
    let (Some(min), Some(avg), Some(max), Some(mdev)) =
        (rtt.min(), rtt.mean(), rtt.max(), rtt.mdev())
    else {
        return;
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        text,
        "rtt min/avg/max/mdev = {}/{}/{}/{} ms",
        ms(min),
        ms(avg),
        ms(max),
        ms(mdev)
    );
    let p = |q| rtt.percentile(q).map_or_else(String::new, ms);
    let _ = writeln!(
        text,
        "rtt p50/p90/p99/p99.9 = {}/{}/{}/{} ms (histogram, within 0.4%)",
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999)
    );
}

/// Appends the round-trip histogram if it was asked for and there is one.
pub(super) fn write_histogram(text: &mut String, rtt: &RttStats, asked: bool) {
    if asked && rtt.count() > 0 {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "rtt histogram ({}, log-spaced rows):",
            counted(rtt.count(), "exact echo")
        );
        text.push_str(&rtt.histogram_text());
    }
}

pub(super) fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::{fit_to_terminal, format_loss};

    #[test]
    fn summary_lines_wrap_at_a_comma_or_before_a_parenthesis_within_80_columns() {
        let counts = "1000000 sent, 999990 echoed, 0 mismatched, 4 timed out, \
                      6 closed before echo, 0.001% loss, time 1234567ms\n";
        let throughput = "throughput 123456.7 echoes/s, 1234.567 MB/s sent, \
                          1234.567 MB/s echoed (10000 connections)\n";
        let short = "3 sent, 3 echoed, 0 mismatched, 0 timed out, 0% loss, time 2ms\n";
        let text = fit_to_terminal(&format!("{counts}{throughput}{short}"));
        assert_eq!(
            text,
            "1000000 sent, 999990 echoed, 0 mismatched, 4 timed out, 6 closed before echo,\n  \
             0.001% loss, time 1234567ms\n\
             throughput 123456.7 echoes/s, 1234.567 MB/s sent, 1234.567 MB/s echoed\n  \
             (10000 connections)\n\
             3 sent, 3 echoed, 0 mismatched, 0 timed out, 0% loss, time 2ms\n"
        );
        assert!(text.lines().all(|line| line.len() <= 80), "{text}");
    }

    #[test]
    fn a_partial_loss_never_shows_as_none_or_all() {
        let shown: Vec<String> = [(0, 3000), (1, 3000), (1, 3), (1, 2), (2999, 3000), (3, 3)]
            .into_iter()
            .map(|(lost, sent)| format_loss(lost, sent))
            .collect();
        assert_eq!(shown, ["0", "0.03", "33.3", "50", "99.97", "100"]);
        assert_eq!(format_loss(1, 10_000_000), "0.00001");
    }
}
