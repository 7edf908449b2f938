//! The `echo-client` binary: parses arguments, installs the stop signals,
//! calls `echo_chamber::client`, prints each event and the summary, and picks
//! the exit code. All network logic lives in the library.

use std::fmt;
use std::io::{self, BufReader, IsTerminal};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use argh::FromArgs;
use signal_hook::consts::SIGTERM;
use signal_hook::iterator::Signals;
use stop_signals::{Meaning, StopSignals};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/stop_signals.rs"]
mod stop_signals;
use echo_chamber::client::udp::{self, MaxLoss, UdpEvent, UdpInterval, UdpReport};
use echo_chamber::client::{
    self, ClientConfig, ConfigError, Event, Interval, MAX_CONNECTIONS, Payload, Reconnect, Report,
    StopHandle, Target,
};
use echo_chamber::limits::MemoryBound;
use echo_chamber::log::counted;

const PROG: &str = "echo-client";
/// Longest message shown as text in per-echo lines; longer ones show a length.
const MAX_SHOWN_TEXT: usize = 80;
/// Failure lines a run prints before it only counts them: a lossy path at
/// a high rate, or thousands of connections refused at once, would
/// otherwise bury the terminal.
const MAX_FAILURE_LINES: u64 = 100;
/// The most `--threads`: far more than any machine has CPUs.
const MAX_THREADS: usize = 1024;

/// Every exit status this program uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Every echo came back exact (also after Ctrl-C), or --help/--version.
    Success = 0,
    /// At least one echo failed: timed out, mismatched, cut short, closed
    /// before echo (the server ended the connection before any byte of an echo came back), refused,
    /// reset, or still out (or still connecting) when stopped; the server
    /// sent bytes it was never sent; the host did not resolve; a message
    /// could not be allocated; or stdin could not be read or stdout written.
    /// With `--udp`: more datagrams lost than `--max-loss`, or an echo
    /// corrupted, duplicated or from another address, or a socket error.
    Failed = 1,
    /// The command line was wrong, or the run cannot fit in memory.
    Usage = 2,
}

/// Send messages to an RFC 862 echo server (ours, socat, ncat, inetd, ...) and
/// check that every byte comes back, with ping-style statistics.
#[derive(FromArgs, Debug)]
#[argh(
    note = "TCP connections (with or without --reconnect) and --udp flows run on --threads event loops (one per CPU by default); only --stdin, one interactive connection, has a thread of its own. A run whose buffers cannot fit in the memory the process may still use (the least left under the limits of its cgroup and every cgroup above it, or what the machine has available) is refused with exit 2 before connecting.\nWith --udp, each of --connections flows sends --repeat datagrams on its own socket, --interval apart whether or not the last came back (default 20ms; 0 sends each when the last is answered or lost), or with --rate N every connections/N seconds, the flows phased so that together they send evenly; a datagram whose echo has not come within --timeout counts as lost. UDP round trips are timed from each datagram's send; a --rate the client could not keep (a full window, full send buffers, its CPU) is said in the summary, with the rate asked and sent. --size datagrams carry their sequence number, so many may be in flight; --message and 0-byte datagrams carry none, so their flow keeps one in flight. Jitter is the mean difference between the round trips of consecutive datagrams, as Cisco IP SLA reports it.\nPercentiles come from a histogram accurate to within 0.4%; min/avg/max/mdev are exact (mdev is the population standard deviation, as in ping).\nWith --reconnect, a connection the server ends cleanly is opened again, and one that broke (an echo cut short, a reset, a timeout: each still counts as failed) too. An end of stream before any byte of an echo came back means the server never took that message (the drain guarantee of echo-server; another server may differ): it is sent again and counted as resent. A refused connect is tried again after 10ms, doubling to 500ms, for --timeout from the first failure; reconnects take --connect-rate's slots, and with --rate a declined echo's round trip counts from when it was first due, reconnect included. The summary and --json count reconnects and resent.\nCtrl-C (or SIGTERM) stops sending and prints the summary; an echo still out may stay silent for twice the p99 round trip (1 s for a first echo) before it counts as failed, and a connect still unanswered for 1 s. A second one, 0.5 s or more later, exits at once.",
    error_code(
        0,
        "every echo came back exact (also when stopped with Ctrl-C or SIGTERM)"
    ),
    error_code(
        1,
        "an echo failed (timed out, mismatched, cut short, closed before echo by a server ending the connection, refused, reset, or still out or still connecting when stopped), the server sent bytes it was never sent, the host did not resolve, a message could not be allocated, or reading stdin or writing stdout failed; with --udp: more datagrams lost than --max-loss allows, or an echo corrupted, duplicated or from another address"
    ),
    error_code(2, "usage error"),
    error_code(130, "a second Ctrl-C or SIGTERM stopped the run at once")
)]
struct Args {
    // Brackets in a doc comment would be taken for a rustdoc link.
    #[argh(
        positional,
        from_str_fn(parse_target),
        description = "echo server as host:port, e.g. localhost:7 or [::1]:9999 (default 127.0.0.1:9999)"
    )]
    addr: Option<Target>,

    /// text to send as each message (default "Hello Echo!")
    #[argh(option, from_str_fn(parse_message), arg_name = "text")]
    message: Option<String>,

    /// send BYTES of binary data per message instead of --message, different every message (1 to 64MiB; KiB and MiB suffixes allowed; with --udp 0 to 65507, or 65527 over IPv6)
    #[argh(option, from_str_fn(parse_size), arg_name = "bytes")]
    size: Option<SizeArg>,

    /// echoes per connection, 0 for until Ctrl-C (default 1; 0 with --rate or --duration)
    #[argh(option, from_str_fn(parse_repeat), arg_name = "n")]
    repeat: Option<u64>,

    /// pause between echoes on one connection, like ping -i, e.g. 200ms (default 0; with --udp, the gap between sends, default 20ms)
    #[argh(option, from_str_fn(parse_interval), arg_name = "dur")]
    interval: Option<Duration>,

    /// limit for connecting and for each round trip, e.g. 2s or 500ms (default 5s; with --udp, how long an echo may take before its datagram counts as lost)
    #[argh(option, from_str_fn(parse_timeout), arg_name = "dur")]
    timeout: Option<Duration>,

    /// concurrent connections, each doing --repeat echoes, 1 to 100000 (default 1; with --udp, flows, each with its own socket, on the event loops)
    #[argh(option, from_str_fn(parse_connections), arg_name = "n")]
    connections: Option<NonZeroUsize>,

    /// open at most N connections per second, e.g. 2000 (default: as fast as they connect, at most 1024 connecting at once per thread; TCP only)
    #[argh(option, from_str_fn(parse_rate), arg_name = "n")]
    connect_rate: Option<u64>,

    /// open loop: send N echoes per second over all connections, each when due on a connection with no echo out, round trips timed from when each was due (default: closed loop, each connection sends when its last echo is back); with --udp, N datagrams per second over all flows, instead of --interval
    #[argh(option, from_str_fn(parse_rate), arg_name = "n")]
    rate: Option<u64>,

    /// stop sending after DUR, e.g. 30s or 5m; echoes out still finish (instead of or with --repeat)
    #[argh(option, from_str_fn(parse_run_duration), arg_name = "dur")]
    duration: Option<Duration>,

    /// print a line every DUR (echoes/s, MB/s, p50 and p99 of that interval, open connections, errors; with --udp sent/s and lost instead of open), e.g. 1s; with --json, one JSON object per line, the summary object last
    #[argh(option, from_str_fn(parse_run_duration), arg_name = "dur")]
    report_every: Option<Duration>,

    /// event-loop threads that run the connections or --udp flows (default: one per CPU, never more than --connections; not with --stdin)
    #[argh(option, from_str_fn(parse_threads), arg_name = "n")]
    threads: Option<NonZeroUsize>,

    /// send each line of standard input as one message, until end of input
    #[argh(switch)]
    stdin: u8,

    /// send UDP datagrams instead of using a TCP connection (see the notes below)
    #[argh(switch)]
    udp: u8,

    /// when the server ends a connection, connect again and go on; a message it closed on before echoing any byte of it is sent again (TCP only; see the notes below)
    #[argh(switch)]
    reconnect: u8,

    /// with --udp: the loss that still exits 0, e.g. 1% or 0.5% (default 0)
    #[argh(option, from_str_fn(parse_max_loss), arg_name = "pct")]
    max_loss: Option<MaxLoss>,

    /// print only errors and the summary (plus a progress line each second when stderr is a terminal)
    #[argh(switch, short = 'q')]
    quiet: u8,

    /// print only one JSON object with the results on stdout (with --report-every, one per interval first, as JSON Lines)
    #[argh(switch)]
    json: u8,

    /// add a histogram of round-trip times to the summary
    #[argh(switch)]
    histogram: u8,

    /// print the version and exit
    #[argh(switch)]
    version: u8,
}

fn main() -> ExitCode {
    ExitCode::from(run() as u8)
}

/// The one place that chooses the exit status.
fn run() -> Exit {
    let args: Args = match cli::parse(PROG) {
        cli::Parsed::Run(args) => args,
        cli::Parsed::Answered => return Exit::Success,
        cli::Parsed::CannotAnswer(message) => {
            cli::print_err(PROG, &message);
            return Exit::Failed;
        }
        cli::Parsed::Usage(message) => {
            cli::print_err(PROG, &message);
            return Exit::Usage;
        }
    };
    match cli::once(args.version, "--version") {
        Ok(false) => {}
        Ok(true) => {
            return match cli::print_out(&format!("{PROG} {}\n", env!("CARGO_PKG_VERSION"))) {
                Ok(()) => Exit::Success,
                Err(message) => {
                    cli::print_err(PROG, &message);
                    Exit::Failed
                }
            };
        }
        Err(message) => {
            cli::print_err(PROG, &message);
            return Exit::Usage;
        }
    }
    if let Err(message) = check_combinations(&args) {
        cli::print_err(PROG, &message);
        return Exit::Usage;
    }
    let udp = on(args.udp);
    let config = ClientConfig {
        target: args
            .addr
            .clone()
            .unwrap_or_else(|| Target::new("127.0.0.1", 9999)),
        payload: match (&args.size, &args.message) {
            // check_combinations lets 0 through only with --udp.
            (Some(size), _) => NonZeroUsize::new(size.bytes).map_or_else(
                || Payload::Text(Vec::new()),
                |size| Payload::Generated { size },
            ),
            (None, Some(text)) => Payload::Text(text.clone().into_bytes()),
            (None, None) => ClientConfig::default().payload,
        },
        // A rate or a duration runs until it is over (or Ctrl-C).
        repeat: args
            .repeat
            .unwrap_or(if args.rate.is_some() || args.duration.is_some() {
                0
            } else {
                1
            }),
        interval: args.interval.unwrap_or(if udp {
            udp::DEFAULT_INTERVAL
        } else {
            Duration::ZERO
        }),
        timeout: args.timeout.unwrap_or(Duration::from_secs(5)),
        connections: args.connections.unwrap_or(NonZeroUsize::MIN),
        reconnect: on(args.reconnect),
        threads: args.threads,
        connect_rate: args.connect_rate,
        rate: args.rate,
        duration: args.duration,
        report_every: args.report_every,
    };

    if !on(args.stdin)
        && let Err(message) = check_memory(&config, udp)
    {
        cli::print_err(PROG, &message);
        return Exit::Usage;
    }
    // Every mode holds a socket per connection or flow.
    warn_if_open_files_fall_short(&config, udp, on(args.stdin));
    if !udp && !on(args.stdin) {
        warn_if_ports_fall_short(&config);
    }
    let stop = StopHandle::new();
    install_stop_signals(&stop);
    let printer = Printer::new(&args, config.connections.get() > 1, stop.clone());
    let observer = |event: &Event<'_>| printer.on_event(event);
    let udp_observer = |event: &UdpEvent<'_>| printer.on_udp_event(event);
    // Interval lines take the progress line's place.
    let show_progress = on(args.quiet) && io::stderr().is_terminal() && args.report_every.is_none();
    let result = thread::scope(|scope| {
        // Dropping `done` ends the progress thread.
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        if show_progress {
            let printer = &printer;
            let spawned = thread::Builder::new()
                .name("echo-client-progress".into())
                .spawn_scoped(scope, move || print_progress(printer, &finished));
            if let Err(error) = spawned {
                cli::print_err(PROG, format_args!("no progress line: {error}"));
            }
        }
        let result = if udp {
            let on_interval = |interval: &UdpInterval| printer.on_udp_interval(interval);
            udp::run_with_intervals(&config, &udp_observer, &on_interval, &stop).map(Outcome::Udp)
        } else if on(args.stdin) {
            client::run_lines(&config, BufReader::new(io::stdin()), &observer, &stop)
                .map(Outcome::Tcp)
        } else {
            let on_interval = |interval: &Interval| printer.on_interval(interval);
            client::run_with_intervals(&config, &observer, &on_interval, &stop).map(Outcome::Tcp)
        };
        drop(done);
        result
    });
    let report = match result {
        Ok(report) => report,
        // Only known once the name resolves to an address family.
        Err(error @ ConfigError::DatagramTooLarge { .. }) => {
            let flag = match &args.size {
                Some(size) => format!("--size {}", size.text),
                None => "--message".to_owned(),
            };
            cli::print_err(PROG, format_args!("{flag}: {error}"));
            return Exit::Usage;
        }
        Err(error) => {
            // The flags are checked above, so this means a check is missing there.
            cli::print_err(PROG, &error);
            return Exit::Usage;
        }
    };
    if !printer.stdout_ended.load(Ordering::Relaxed) {
        print_report(&args, &report, &printer);
    }
    if let Some(message) = printer.stdout_failure() {
        cli::print_err(PROG, &message);
        return Exit::Failed;
    }
    let success = match &report {
        Outcome::Tcp(report) => report.is_success(),
        Outcome::Udp(report) => report.is_success(args.max_loss.unwrap_or(MaxLoss::NONE)),
    };
    if success { Exit::Success } else { Exit::Failed }
}

/// The report of a TCP or a UDP run.
enum Outcome {
    Tcp(Report),
    Udp(UdpReport),
}

impl Outcome {
    fn summary(&self, histogram: bool) -> String {
        match self {
            Outcome::Tcp(report) => report.summary(histogram),
            Outcome::Udp(report) => report.summary(histogram),
        }
    }

    fn to_json(&self) -> String {
        match self {
            Outcome::Tcp(report) => report.to_json(),
            Outcome::Udp(report) => report.to_json(),
        }
    }
}

/// Whether a switch was given (`check_combinations` has refused repeats).
fn on(count: u8) -> bool {
    count > 0
}

fn check_combinations(args: &Args) -> Result<(), String> {
    let switches = [
        ("--stdin", args.stdin),
        ("--quiet", args.quiet),
        ("--json", args.json),
        ("--histogram", args.histogram),
        ("--reconnect", args.reconnect),
    ];
    for (flag, count) in switches {
        cli::once(count, flag)?;
    }
    cli::once(args.udp, "--udp")?;
    if args.size.is_some() && args.message.is_some() {
        return Err("--size and --message cannot be combined: pick one payload".to_owned());
    }
    if let Some(size) = &args.size {
        check_size(size, on(args.udp))?;
    }
    if on(args.udp) && on(args.stdin) {
        return Err(
            "--stdin cannot be combined with --udp: datagrams come from --message or --size"
                .to_owned(),
        );
    }
    if on(args.udp) && on(args.reconnect) {
        return Err(
            "--reconnect cannot be combined with --udp: UDP has no connection to open again"
                .to_owned(),
        );
    }
    if on(args.udp) && args.connect_rate.is_some() {
        return Err(
            "--connect-rate applies only to TCP, not to --udp: UDP has no connect".to_owned(),
        );
    }
    let engine_only = [
        ("--threads", args.threads.is_some()),
        ("--connect-rate", args.connect_rate.is_some()),
        ("--rate", args.rate.is_some()),
        ("--duration", args.duration.is_some()),
        ("--report-every", args.report_every.is_some()),
    ];
    for (flag, given) in engine_only {
        if !given {
            continue;
        }
        if on(args.stdin) {
            return Err(format!(
                "{flag} cannot be combined with --stdin: the lines go over one connection"
            ));
        }
    }
    if args.rate.is_some() && args.interval.is_some() {
        let what = if on(args.udp) { "datagram" } else { "echo" };
        return Err(format!(
            "--interval cannot be combined with --rate: the rate sets when each {what} goes"
        ));
    }
    if !on(args.udp) && args.max_loss.is_some() {
        return Err("--max-loss applies only to --udp: over TCP nothing may be lost".to_owned());
    }
    if on(args.stdin) {
        let conflicts = [
            ("--message", args.message.is_some()),
            ("--size", args.size.is_some()),
            ("--repeat", args.repeat.is_some()),
            ("--interval", args.interval.is_some()),
            ("--connections", args.connections.is_some()),
        ];
        if let Some((flag, _)) = conflicts.iter().find(|(_, given)| *given) {
            return Err(format!(
                "--stdin cannot be combined with {flag}: the lines are the messages"
            ));
        }
    }
    if on(args.json) && on(args.histogram) {
        return Err("--json cannot be combined with --histogram".to_owned());
    }
    Ok(())
}

fn parse_target(value: &str) -> Result<Target, String> {
    value
        .parse()
        .map_err(|error: client::TargetError| error.to_string())
}

fn parse_message(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("the message must not be empty".to_owned());
    }
    Ok(value.to_owned())
}

/// A `--size` as given: its limits depend on `--udp`, so `check_size`
/// checks them once every flag is known.
#[derive(Debug, Clone)]
struct SizeArg {
    text: String,
    bytes: usize,
}

/// `--size` within the limits of its transport.
fn check_size(size: &SizeArg, udp: bool) -> Result<(), String> {
    // The same words as argh's, which gave them before --udp existed.
    let refused = |why: String| {
        Err(format!(
            "error parsing option '--size' with value '{}': {why} (see --help)",
            size.text
        ))
    };
    if udp {
        if size.bytes > udp::MAX_DATAGRAM_V6 {
            return Err(format!(
                "--size {} is over the largest UDP datagram: {} bytes over IPv4, {} over IPv6",
                size.text,
                udp::MAX_DATAGRAM_V4,
                udp::MAX_DATAGRAM_V6
            ));
        }
        return Ok(());
    }
    if size.bytes > client::MAX_MESSAGE {
        return refused(format!(
            "at most {}MiB per message",
            client::MAX_MESSAGE >> 20
        ));
    }
    if size.bytes == 0 {
        return refused("a message needs at least 1 byte".to_owned());
    }
    Ok(())
}

fn parse_size(value: &str) -> Result<SizeArg, String> {
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, ""),
    };
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "m" | "mib" => 1024 * 1024,
        // Only to say that it is too large.
        "g" | "gib" => 1024 * 1024 * 1024,
        _ => return Err("expected a number of bytes such as 1024, 64KiB or 1MiB".to_owned()),
    };
    let bytes = digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| "expected a number of bytes such as 1024, 64KiB or 1MiB".to_owned())?;
    Ok(SizeArg {
        text: value.to_owned(),
        bytes,
    })
}

fn parse_max_loss(value: &str) -> Result<MaxLoss, String> {
    value.parse()
}

fn parse_repeat(value: &str) -> Result<u64, String> {
    cli::whole_number(value)
        .ok_or_else(|| "expected a whole number of echoes, 0 for no limit".to_owned())
}

fn parse_connections(value: &str) -> Result<NonZeroUsize, String> {
    let range = || format!("expected a whole number of connections from 1 to {MAX_CONNECTIONS}");
    match cli::whole_number::<usize>(value) {
        Some(0) => Err("at least 1 connection is needed".to_owned()),
        Some(n) if n > MAX_CONNECTIONS => Err(range()),
        Some(n) => Ok(NonZeroUsize::new(n).expect("zero is handled above")),
        None => Err(range()),
    }
}

/// The most `--rate` or `--connect-rate`: beyond what one machine sends.
const MAX_RATE: u64 = 100_000_000;

fn parse_rate(value: &str) -> Result<u64, String> {
    match cli::whole_number::<u64>(value) {
        Some(rate) if (1..=MAX_RATE).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "expected a whole number per second from 1 to {MAX_RATE}"
        )),
    }
}

fn parse_run_duration(value: &str) -> Result<Duration, String> {
    match cli::parse_duration(value)? {
        duration if duration.is_zero() => Err("the duration must be more than 0".to_owned()),
        duration => Ok(duration),
    }
}

fn parse_threads(value: &str) -> Result<NonZeroUsize, String> {
    match cli::whole_number::<usize>(value) {
        Some(0) => Err("at least 1 thread is needed".to_owned()),
        Some(n) if n > MAX_THREADS => Err(format!(
            "expected a whole number of threads from 1 to {MAX_THREADS}"
        )),
        Some(n) => Ok(NonZeroUsize::new(n).expect("zero is handled above")),
        None => Err(format!(
            "expected a whole number of threads from 1 to {MAX_THREADS}"
        )),
    }
}

fn parse_interval(value: &str) -> Result<Duration, String> {
    cli::parse_duration(value)
}

fn parse_timeout(value: &str) -> Result<Duration, String> {
    cli::parse_positive_duration(value)
}

/// Refuses a run whose buffers cannot fit in the memory the process may
/// still use (what is left under its cgroups' limits, or what the machine
/// has available), instead of being killed halfway with no summary.
fn check_memory(config: &ClientConfig, udp: bool) -> Result<(), String> {
    let needed = if udp {
        let bytes = udp::memory_needed(config);
        client::MemoryNeeded {
            bytes,
            in_flight: 0,
            message: config.payload.len() as u64,
        }
    } else {
        client::memory_needed(config)
    };
    let Some(limit) = echo_chamber::limits::memory_limit() else {
        return Ok(());
    };
    if needed.bytes <= limit.left {
        return Ok(());
    }
    let what = if udp {
        format!(
            "{} flows, each with its records of the datagrams in flight",
            config.connections
        )
    } else if needed.in_flight > 0 {
        format!(
            "{} messages of {} out at once",
            needed.in_flight,
            bytes_text(needed.message)
        )
    } else {
        format!("{} connections", config.connections)
    };
    let (needed_text, left) = needed_and_left_text(needed.bytes, limit.left);
    let room = match &limit.bound {
        MemoryBound::Cgroup {
            limit,
            group,
            own: true,
            file,
        } => format!(
            "the {left} left of this cgroup's {} limit ({file} of {group})",
            bytes_text(*limit)
        ),
        MemoryBound::Cgroup {
            limit, group, file, ..
        } => format!(
            "the {left} left of the {} limit of {group}, a cgroup above this one ({file})",
            bytes_text(*limit)
        ),
        MemoryBound::Available => {
            format!("the {left} the machine has available (MemAvailable in /proc/meminfo)")
        }
    };
    let advice = if udp {
        "use fewer --connections, or a longer --interval or lower --rate with a shorter --timeout, which keeps fewer datagrams in flight"
    } else {
        "use fewer --connections, a smaller --size, or a --rate that keeps fewer echoes out"
    };
    Err(format!(
        "the run needs about {needed_text} ({what}), more than {room}; {advice}"
    ))
}

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Bytes in the largest binary unit that leaves a whole number before the
/// point: `64 MiB`, `2.5 GiB`.
fn bytes_text(bytes: u64) -> String {
    in_unit(bytes, unit_of(bytes), 1, f64::round)
}

/// `needed` and the `left` it exceeds, rounded so that the texts still
/// show `needed` as the larger ("needs about 1 GiB, more than the 1 GiB
/// left" would not). In units of their own when those differ, `left` then
/// rounded down so that it stays under the next unit; in one unit, with
/// two decimals, or a smaller unit, if one decimal makes them look equal.
fn needed_and_left_text(needed: u64, left: u64) -> (String, String) {
    let (needed_unit, left_unit) = (unit_of(needed), unit_of(left));
    if needed_unit > left_unit {
        return (bytes_text(needed), in_unit(left, left_unit, 1, f64::floor));
    }
    for unit in (1..=needed_unit).rev() {
        for decimals in 1..=2 {
            let texts = (
                in_unit(needed, unit, decimals, f64::round),
                in_unit(left, unit, decimals, f64::round),
            );
            if texts.0 != texts.1 {
                return texts;
            }
        }
    }
    (format!("{needed} B"), format!("{left} B"))
}

/// The index in [`UNITS`] of the largest unit that `bytes` fills at least
/// once.
fn unit_of(bytes: u64) -> usize {
    let mut unit = 0;
    while unit < UNITS.len() - 1 && bytes >= 1 << (10 * (unit + 1)) {
        unit += 1;
    }
    unit
}

/// `bytes` in `UNITS[unit]` with `decimals` places, `round`ed; a whole
/// number loses its `.0`.
fn in_unit(bytes: u64, unit: usize, decimals: i32, round: fn(f64) -> f64) -> String {
    let scale = 10f64.powi(decimals);
    let value = round(bytes as f64 / (1u64 << (10 * unit)) as f64 * scale) / scale;
    let text = format!("{value:.*}", decimals as usize);
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

/// Says in one line before connecting when there are more connections
/// than local ports for them: the rest fail as `cannot assign requested
/// address`. (A target of several addresses has that many per address.)
fn warn_if_ports_fall_short(config: &ClientConfig) {
    let Some((first, last)) = echo_chamber::limits::ephemeral_ports() else {
        return;
    };
    let ports = usize::from(last - first) + 1;
    let connections = config.connections.get();
    if connections > ports {
        cli::print_err(
            PROG,
            format_args!(
                "{connections} connections, but one client address has only {ports} local ports for one server port (net.ipv4.ip_local_port_range {first}-{last}); widen it, e.g. sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\", or run clients from several addresses"
            ),
        );
    }
}

/// Raises the soft open-file limit to the hard one, as the server does,
/// and says in one line before connecting when even that leaves too few
/// descriptors for every connection (every flow, with `udp`): the rest
/// then fail, counted by cause. With `stdin` the one connection has a
/// thread of its own; otherwise the connections or flows run on the
/// event loops, which take a few descriptors each.
fn warn_if_open_files_fall_short(config: &ClientConfig, udp: bool, stdin: bool) {
    let needed = if stdin {
        config.connections.get() as u64 + echo_chamber::limits::reserved_descriptors(0)
    } else {
        // The UDP loops are as many as the TCP ones and take as many
        // descriptors each (an epoll, a waker).
        client::open_files_needed(config)
    };
    let limit = match echo_chamber::limits::raise_open_file_limit() {
        Ok(limit) => limit,
        Err(error) => {
            cli::print_err(
                PROG,
                format_args!("cannot raise the open-file limit: {error}"),
            );
            return;
        }
    };
    if limit >= needed {
        return;
    }
    let (units, flag) = if udp {
        ("flows", "--connections (flows)")
    } else {
        ("connections", "--connections")
    };
    let connections = config.connections.get() as u64;
    let fit = connections.saturating_sub(needed - limit);
    cli::print_err(
        PROG,
        format_args!(
            "only {fit} of {connections} {units} fit under the open-file limit of {limit} (RLIMIT_NOFILE, hard); raise it as root with `ulimit -Hn {needed}` (or LimitNOFILE= under systemd), or ask for fewer {flag}"
        ),
    );
}

/// First Ctrl-C or SIGTERM: stop sending and print the summary. A later
/// one exits at once with 130 (see [`stop_signals`] for repeats). Ctrl-C
/// comes through ctrlc, SIGTERM through a signal-hook thread; SIGHUP keeps
/// its default action, so `nohup` still works.
fn install_stop_signals(stop: &StopHandle) {
    let received = Arc::new(Mutex::new(StopSignals::default()));
    let on_signal = {
        let stop = stop.clone();
        move || {
            let meaning = received
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .arrived();
            match meaning {
                Meaning::Stop => stop.stop(),
                Meaning::Repeat => {}
                Meaning::ExitNow => std::process::exit(130),
            }
        }
    };
    let on_sigterm = on_signal.clone();
    if let Err(error) = ctrlc::set_handler(on_signal) {
        cli::print_err(
            PROG,
            format_args!("Ctrl-C will end the run without a summary: {error}"),
        );
    }
    let watching = Signals::new([SIGTERM]).and_then(|mut signals| {
        thread::Builder::new()
            .name("echo-client-sigterm".into())
            .spawn(move || signals.forever().for_each(|_| on_sigterm()))
    });
    if let Err(error) = watching {
        cli::print_err(
            PROG,
            format_args!("SIGTERM will end the run without a summary: {error}"),
        );
    }
}

/// Turns events into output lines; counts them for the progress line.
struct Printer {
    /// Per-echo and per-connection lines wanted on stdout.
    chatty: bool,
    /// `--json`: interval reports are JSON Lines.
    json: bool,
    /// `--report-every`, which sets the interval lines' precision.
    report_every: Duration,
    multiple: bool,
    /// `--size` payloads are binary: show their length, never their bytes.
    binary: bool,
    echoes: AtomicU64,
    failures: AtomicU64,
    /// Whether the progress line is on the terminal now; held while writing
    /// either it or an error line, so an error never lands on its end.
    progress_shown: Mutex<bool>,
    /// Stdout's reader went away, or a write to it failed: print nothing more.
    stdout_ended: AtomicBool,
    /// A line went to stdout: the summary then comes after a blank line.
    said_anything: AtomicBool,
    /// Why a write to stdout failed, if one did (a gone reader is no failure).
    stdout_failure: Mutex<Option<String>>,
    stop: StopHandle,
}

impl Printer {
    fn new(args: &Args, multiple: bool, stop: StopHandle) -> Self {
        Printer {
            chatty: !on(args.quiet) && !on(args.json),
            json: on(args.json),
            report_every: args.report_every.unwrap_or(Duration::from_secs(1)),
            multiple,
            binary: args.size.is_some(),
            echoes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            progress_shown: Mutex::new(false),
            stdout_ended: AtomicBool::new(false),
            said_anything: AtomicBool::new(false),
            stdout_failure: Mutex::new(None),
            stop,
        }
    }

    fn on_event(&self, event: &Event<'_>) {
        match event {
            Event::Connected { connection, peer } => {
                if self.chatty {
                    match self.multiple {
                        true => self.say(format_args!(
                            "connected to {peer} (connection {connection})"
                        )),
                        false => self.say(format_args!("connected to {peer}")),
                    }
                }
            }
            Event::Echoed {
                connection,
                seq,
                rtt,
                message,
            } => {
                self.echoes.fetch_add(1, Ordering::Relaxed);
                if self.chatty {
                    let shown = Shown {
                        message,
                        binary: self.binary,
                    };
                    let time = rtt.as_secs_f64() * 1e3;
                    match self.multiple {
                        true => self.say(format_args!(
                            "Server echoed: {shown} (conn={connection} seq={seq} time={time:.3} ms)"
                        )),
                        false => self.say(format_args!(
                            "Server echoed: {shown} (seq={seq} time={time:.3} ms)"
                        )),
                    }
                }
            }
            Event::Failed(failure) => self.count_failure(failure),
            Event::Reconnected {
                connection,
                peer,
                why,
            } => {
                if self.chatty {
                    let why = match why {
                        Reconnect::Closed => "the server closed the connection".to_owned(),
                        Reconnect::Declined { seq } => format!(
                            "the server closed the connection before echoing {seq}, which goes again"
                        ),
                        Reconnect::Failed => "a failure".to_owned(),
                    };
                    match self.multiple {
                        true => self.say(format_args!(
                            "reconnected to {peer} after {why} (connection {connection})"
                        )),
                        false => self.say(format_args!("reconnected to {peer} after {why}")),
                    }
                }
            }
        }
    }

    /// One `--report-every` line, or with `--json` one JSON object, on
    /// stdout, also in quiet runs.
    fn on_interval(&self, interval: &Interval) {
        match self.json {
            true => self.say(format_args!("{}", interval.to_json())),
            false => self.say(format_args!("{}", interval.line(self.report_every))),
        }
    }

    /// [`on_interval`](Self::on_interval) for a UDP run.
    fn on_udp_interval(&self, interval: &UdpInterval) {
        match self.json {
            true => self.say(format_args!("{}", interval.to_json())),
            false => self.say(format_args!("{}", interval.line(self.report_every))),
        }
    }

    fn on_udp_event(&self, event: &UdpEvent<'_>) {
        match event {
            UdpEvent::Started { flow, local, peer } => {
                if self.chatty {
                    let port = local.port();
                    match self.multiple {
                        true => self.say(format_args!(
                            "sending to {peer} over UDP from port {port} (flow {flow})"
                        )),
                        false => {
                            self.say(format_args!("sending to {peer} over UDP from port {port}"))
                        }
                    }
                }
            }
            UdpEvent::Echoed {
                flow,
                seq,
                rtt,
                message,
                reordered,
            } => {
                self.echoes.fetch_add(1, Ordering::Relaxed);
                if self.chatty {
                    let shown = Shown {
                        message,
                        binary: self.binary,
                    };
                    let time = rtt.as_secs_f64() * 1e3;
                    let reordered = if *reordered { ", reordered" } else { "" };
                    match self.multiple {
                        true => self.say(format_args!(
                            "Server echoed: {shown} (flow={flow} seq={seq} time={time:.3} ms{reordered})"
                        )),
                        false => self.say(format_args!(
                            "Server echoed: {shown} (seq={seq} time={time:.3} ms{reordered})"
                        )),
                    }
                }
            }
            UdpEvent::Failed(failure) => self.count_failure(failure),
        }
    }

    /// Counts a failure and prints its line, up to [`MAX_FAILURE_LINES`].
    fn count_failure(&self, failure: impl fmt::Display) {
        let before = self.failures.fetch_add(1, Ordering::Relaxed);
        if before < MAX_FAILURE_LINES {
            self.print_failure(failure);
        } else if before == MAX_FAILURE_LINES {
            self.print_failure(format_args!(
                "{MAX_FAILURE_LINES} failures shown; the summary counts the rest"
            ));
        }
    }

    /// One failure line on stderr, in place of the progress line if shown.
    fn print_failure(&self, failure: impl fmt::Display) {
        let mut progress_shown = self.progress_shown();
        if std::mem::take(&mut *progress_shown) {
            // The error takes the progress line's place, in the one
            // write of the line; the next progress line comes under it.
            cli::write_err(&format!("\r\x1b[K{PROG}: {failure}\n"));
        } else {
            cli::print_err(PROG, failure);
        }
    }

    /// One line on stdout. A closed stdout (`| head`) is a normal way to end:
    /// stop sending and skip the summary. Any other failed write also stops
    /// the run, since nothing of it could be shown, and fails it.
    fn say(&self, line: fmt::Arguments<'_>) {
        if self.stdout_ended.load(Ordering::Relaxed) {
            return;
        }
        self.said_anything.store(true, Ordering::Relaxed);
        if !self.write_out(&format!("{line}\n")) {
            self.stop.stop();
        }
    }

    /// Writes to stdout; false once stdout has ended, recording why if a
    /// write failed.
    fn write_out(&self, text: &str) -> bool {
        let failure = match cli::write_out(text) {
            Ok(true) => return true,
            Ok(false) => None,
            Err(message) => Some(message),
        };
        self.stdout_ended.store(true, Ordering::Relaxed);
        if let Some(message) = failure {
            self.stdout_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(message);
        }
        false
    }

    fn progress_shown(&self) -> std::sync::MutexGuard<'_, bool> {
        self.progress_shown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Why writing to stdout failed, if it did.
    fn stdout_failure(&self) -> Option<String> {
        self.stdout_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A message as text if it is short printable UTF-8 (one trailing line ending
/// dropped), otherwise as its length.
struct Shown<'a> {
    message: &'a [u8],
    binary: bool,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trimmed = self.message.strip_suffix(b"\n").unwrap_or(self.message);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        match std::str::from_utf8(trimmed) {
            Ok(text)
                if !self.binary
                    && text.chars().count() <= MAX_SHOWN_TEXT
                    && !text.chars().any(|c| c.is_control() && c != '\t') =>
            {
                f.write_str(text)
            }
            _ => write!(f, "{}", counted(self.message.len() as u64, "byte")),
        }
    }
}

/// In quiet runs, when stderr is a terminal: echoes so far and the
/// current rate, once a second, on one overwritten line. Ends when `finished`
/// disconnects, erasing the line.
fn print_progress(printer: &Printer, finished: &crossbeam_channel::Receiver<()>) {
    let mut last_count = 0;
    let mut last_time = Instant::now();
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        finished.recv_timeout(Duration::from_secs(1))
    {
        // Counted under the lock, so that an error line just printed is in.
        let mut progress_shown = printer.progress_shown();
        let count = printer.echoes.load(Ordering::Relaxed);
        let failures = printer.failures.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (count - last_count) as f64 / now.duration_since(last_time).as_secs_f64();
        (last_count, last_time) = (count, now);
        cli::write_err(&format!(
            "\r{}, {rate:.0}/s, {failures} failed\x1b[K",
            counted(count, "echo")
        ));
        *progress_shown = true;
    }
    if std::mem::take(&mut *printer.progress_shown()) {
        cli::write_err("\r\x1b[K");
    }
}

fn print_report(args: &Args, report: &Outcome, printer: &Printer) {
    let text = if on(args.json) {
        format!("{}\n", report.to_json())
    } else if printer.said_anything.load(Ordering::Relaxed) {
        // Set apart from the lines above it, as ping does.
        format!("\n{}", report.summary(on(args.histogram)))
    } else {
        report.summary(on(args.histogram))
    };
    // A gone reader leaves the exit status to tell; a failure is recorded.
    printer.write_out(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Whether the text of [`in_unit`] `a` reads as more than `b`.
    fn reads_as_more(a: &str, b: &str) -> bool {
        fn parse(text: &str) -> (&str, usize) {
            let (value, unit) = text.split_once(' ').expect("a value and a unit");
            let unit = UNITS.iter().position(|name| *name == unit).expect("a unit");
            (value, unit)
        }
        match (parse(a), parse(b)) {
            // Exact, beyond what an f64 holds.
            ((a, 0), (b, 0)) => {
                a.parse::<u64>().expect("whole bytes") > b.parse::<u64>().expect("whole bytes")
            }
            ((a, a_unit), (b, b_unit)) => {
                let bytes = |value: &str, unit: usize| {
                    value.parse::<f64>().expect("a number") * (1u64 << (10 * unit)) as f64
                };
                bytes(a, a_unit) > bytes(b, b_unit)
            }
        }
    }

    #[test]
    fn sizes_keep_their_unit_and_one_decimal_when_that_shows_the_difference() {
        assert_eq!(bytes_text(64 * MIB), "64 MiB");
        assert_eq!(bytes_text(5 * GIB / 2), "2.5 GiB");
        assert_eq!(
            needed_and_left_text(2_805_000_000, 1_073_000_000),
            ("2.6 GiB".to_owned(), "1023.2 MiB".to_owned())
        );
        assert_eq!(
            needed_and_left_text(704 * MIB, 620 * MIB),
            ("704 MiB".to_owned(), "620 MiB".to_owned())
        );
    }

    #[test]
    fn a_refusal_never_shows_the_need_as_no_more_than_what_is_left() {
        // Once "needs about 1 GiB, more than the 1 GiB left".
        assert_eq!(
            needed_and_left_text(GIB + 40 * MIB, GIB + 10 * MIB),
            ("1.04 GiB".to_owned(), "1.01 GiB".to_owned())
        );
        assert_eq!(
            needed_and_left_text(GIB + MIB, GIB + MIB / 2),
            ("1025 MiB".to_owned(), "1024.5 MiB".to_owned())
        );
        // Rounded to the nearest, 1023.99 MiB would read as 1024 MiB.
        assert_eq!(
            needed_and_left_text(GIB + 1, GIB - 10 * 1024),
            ("1 GiB".to_owned(), "1023.9 MiB".to_owned())
        );
        // A byte apart, as a last resort, in bytes.
        assert_eq!(
            needed_and_left_text(GIB + 1, GIB),
            ("1073741825 B".to_owned(), "1073741824 B".to_owned())
        );
        let sizes = [
            0,
            1,
            1023,
            1024,
            MIB - 1,
            MIB,
            MIB + 1,
            GIB - MIB,
            GIB - 1,
            GIB,
            GIB + 1,
            GIB + MIB / 3,
            3 * GIB / 2,
            (1 << 40) - 1,
            1 << 40,
            u64::MAX / 2,
        ];
        for needed in sizes {
            for left in sizes.into_iter().filter(|&left| left < needed) {
                for (needed, left) in [(needed, left), (needed, needed - 1), (left + 1, left)] {
                    let (needed_text, left_text) = needed_and_left_text(needed, left);
                    assert!(
                        reads_as_more(&needed_text, &left_text),
                        "{needed} bytes read as {needed_text}, {left} as {left_text}"
                    );
                }
            }
        }
    }
}
