//! The performance bench (`cargo bench`): our server side by side with the
//! two designs a Rust engineer would otherwise pick, a blocking
//! thread-per-connection server and tokio's canonical echo server. In
//! case 2 a third peer, the floor, shows the least any readiness-based
//! server can spend per echo.
//!
//! Flow: [`servers`] starts each server under test (in-process, or as a
//! child process where a whole process is measured), [`load`] drives it
//! and checks every echoed byte, [`procfs`] charges CPU and memory to the
//! server alone, and [`report`] prints ours next to the ratio to each peer.
//! The peers themselves live in [`peers`] and [`floor`]; case 7's scraper
//! in [`scrape`], case 8's load balancer in [`haproxy`].
//!
//! Cases (issue 4):
//! 1. one connection, ping-pong of 64 B, 4 KiB, 64 KiB, 1 MiB: RTT p50, p99;
//! 2. 1, 16, 64, 256 connections, 64 B ping-pong, 2 workers: echoes/s and
//!    server CPU per echo, also for the floor peer;
//! 3. 4 connections x 64 KiB messages: MB/s each way;
//! 4. 10,000 open connections, 50 active, 4 workers, separate processes:
//!    echoes/s and the server's peak RSS;
//! 5. idle server, separate process: SIGINT to exit, and idle CPU;
//! 6. UDP (issue 12), in-process against UDP peers ([`udp_peers`]) driven
//!    by [`udp`]: 64 flows x 4 datagrams in flight of 64 B and of 1,472 B,
//!    echoes/s, server CPU per echo, loss and reordering; and one flow's
//!    ping-pong RTT;
//! 7. metrics scrape cost (issue 14): ours in-process with 2 workers and
//!    its metrics endpoint on, case 2's 256 connections, windows without
//!    and with a scraper doing `GET /metrics` 10 times a second taken in
//!    turns: echoes/s, server CPU per echo, and their spread;
//! 8. through HAProxy (issue 15), when `haproxy` is on PATH: 64 connections
//!    of 64 B ping-pong through HAProxy (`send-proxy-v2`, `leastconn`) to
//!    one, two and three `echo-server --workers 1` child processes, next to
//!    the same load direct to one: echoes/s, RTT p50 and p99, and the CPU of
//!    HAProxy and of the backends.
//! 9. busy polling under saturation (issue 16): ours with its default
//!    `--busy-poll`, ours with `--busy-poll 0` and tokio, each driven by
//!    both load generators (the default one and the tokio one), at one
//!    connection and at 256, 2 workers: echoes/s, server CPU per echo and
//!    RTT p50.
//! 10. `echo-client` as a load generator (issue 13), a child process
//!     against ours in-process ([`client_load`]): 256 connections of 64 B
//!     next to the bench's own load and to the thread-per-connection engine;
//!     10,000 connections on 2 threads; `--rate 50000` over 256 connections.
//!
//! In case 2 the io_uring floor ([`uring_floor`]) stands beside the epoll
//! floor where the kernel allows io_uring; where it does not, the run says
//! why and goes on without it.
//!
//! Usage: `cargo bench --bench echo -- [--quick] [--cases 1,2,6] [--load-threads N]
//! [--load std|tokio] [--rounds N] [--scaling-conns 1,16,64,256]
//! [--servers ours,tokio,blocking,floor,uring-floor]
//! [--active-stride N] [--busy-poll DURATION] [--floor-in-turn]
//! [--drive 127.0.0.1:PORT [--conns N]]`
//! (plain `cargo bench` runs everything; the library and binaries set
//! `bench = false`, so `cargo bench -- --quick` reaches only this bench).
//! Everything runs on loopback, bounded in count and time.

#[path = "echo/client_load.rs"]
mod client_load;
#[path = "echo/floor.rs"]
mod floor;
#[path = "echo/haproxy.rs"]
mod haproxy;
#[path = "echo/load.rs"]
mod load;
#[path = "echo/load_tokio.rs"]
mod load_tokio;
#[path = "echo/peers.rs"]
mod peers;
#[path = "echo/procfs.rs"]
mod procfs;
#[path = "echo/report.rs"]
mod report;
#[path = "echo/scrape.rs"]
mod scrape;
#[path = "echo/servers.rs"]
mod servers;
#[path = "echo/udp.rs"]
mod udp;
#[path = "echo/udp_peers.rs"]
mod udp_peers;
#[path = "echo/uring_floor.rs"]
mod uring_floor;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use haproxy::Haproxy;
use load::{BlockingPingPong, Load, Spec};
use load_tokio::TokioLoad;
use report::{Better, Report, Row, Table, format_value};
use scrape::{Scraper, Scrapes};
use servers::{InProcess, KINDS, Kind, OursWithMetrics, ServerProcess, UdpInProcess};
use udp::{Tally, UdpLoad, UdpSpec};

/// Workers for the in-process cases (the machine has 2 cores).
const WORKERS: usize = 2;
/// Workers for the 10,000-connection case, as issue 4 asks.
const MANY_WORKERS: usize = 4;

/// Run-wide choices, from the command line.
struct Options {
    quick: bool,
    cases: Vec<u32>,
    load_threads: usize,
    /// Instead of the cases, drive an already running server (on loopback)
    /// with `conns` 64 B ping-pong connections: for profiling it.
    drive: Option<std::net::SocketAddr>,
    conns: usize,
    /// Case 4 makes every Nth connection active.
    active_stride: usize,
    /// Our server's `--busy-poll`, if not its default.
    busy_poll: Option<Duration>,
    /// How the floor peers place connections.
    floor_placement: floor::Placement,
    /// Which load generator drives cases 1, 2, 4, 7 and 8 (case 9 uses both).
    load: LoadKind,
    /// Windows per server in cases 2, 3 and 9, if not the default.
    rounds: Option<usize>,
    /// Case 2's connection counts.
    scaling_conns: Vec<usize>,
    /// Only these servers, if given.
    servers: Option<Vec<Kind>>,
}

/// The load generators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadKind {
    /// The bench's own: a blocking client for one connection (cases 1 and
    /// 9), `load-N` threads each a mio loop over many connections.
    Std,
    /// [`load_tokio`]: a tokio task per connection on a multi-thread runtime.
    Tokio,
}

impl LoadKind {
    fn name(self) -> &'static str {
        match self {
            LoadKind::Std => "std",
            LoadKind::Tokio => "tokio",
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench echo -- [--quick] [--cases 1,2,3,4,5,6,7,8,9] \
     [--load-threads N] [--load std|tokio] [--rounds N] [--scaling-conns 1,16,64,256] \
     [--servers ours,tokio,blocking,floor,uring-floor] [--active-stride N] \
     [--busy-poll DURATION] [--floor-in-turn] [--drive 127.0.0.1:PORT [--conns N]]";

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            quick: false,
            cases: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            load_threads: 2,
            drive: None,
            conns: 256,
            active_stride: 199,
            busy_poll: None,
            floor_placement: floor::Placement::Fewest,
            load: LoadKind::Std,
            rounds: None,
            scaling_conns: vec![1, 16, 64, 256],
            servers: None,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes this to every bench binary.
                "--bench" => {}
                "--quick" => options.quick = true,
                "--cases" => {
                    let list = args.next().ok_or("--cases needs a list such as 1,2")?;
                    options.cases = list
                        .split(',')
                        .map(|c| match c.trim().parse() {
                            Ok(n @ 1..=10) => Ok(n),
                            _ => Err(format!("--cases: {c:?} is not a case 1-10")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--load-threads" => {
                    let n = args.next().ok_or("--load-threads needs a number")?;
                    options.load_threads = match n.parse() {
                        Ok(n @ 1..=64) => n,
                        _ => return Err(format!("--load-threads: {n:?} is not 1-64")),
                    };
                }
                "--drive" => {
                    let addr = args.next().ok_or("--drive needs an address")?;
                    let addr: std::net::SocketAddr = addr
                        .parse()
                        .map_err(|e| format!("--drive: {addr:?}: {e}"))?;
                    if !addr.ip().is_loopback() {
                        return Err(format!("--drive: {addr} is not a loopback address"));
                    }
                    options.drive = Some(addr);
                }
                "--conns" => {
                    let n = args.next().ok_or("--conns needs a number")?;
                    options.conns = match n.parse() {
                        Ok(n @ 1..=10_000) => n,
                        _ => return Err(format!("--conns: {n:?} is not 1-10000")),
                    };
                }
                "--active-stride" => {
                    let n = args.next().ok_or("--active-stride needs a number")?;
                    options.active_stride = match n.parse() {
                        Ok(n @ 1..=200) => n,
                        _ => return Err(format!("--active-stride: {n:?} is not 1-200")),
                    };
                }
                "--busy-poll" => {
                    let value = args.next().ok_or("--busy-poll needs a duration")?;
                    let duration = humantime::parse_duration(&value)
                        .map_err(|e| format!("--busy-poll: {value:?}: {e}"))?;
                    if duration > echo_chamber::server::config::MAX_BUSY_POLL {
                        return Err(format!(
                            "--busy-poll: {value:?} is more than {}",
                            humantime::format_duration(echo_chamber::server::config::MAX_BUSY_POLL)
                        ));
                    }
                    options.busy_poll = Some(duration);
                }
                "--floor-in-turn" => options.floor_placement = floor::Placement::InTurn,
                "--load" => {
                    let kind = args.next().ok_or("--load needs std or tokio")?;
                    options.load = match kind.as_str() {
                        "std" => LoadKind::Std,
                        "tokio" => LoadKind::Tokio,
                        _ => return Err(format!("--load: {kind:?} is not std or tokio")),
                    };
                }
                "--rounds" => {
                    let n = args.next().ok_or("--rounds needs a number")?;
                    options.rounds = match n.parse() {
                        Ok(n @ 1..=50) => Some(n),
                        _ => return Err(format!("--rounds: {n:?} is not 1-50")),
                    };
                }
                "--scaling-conns" => {
                    let list = args.next().ok_or("--scaling-conns needs a list")?;
                    options.scaling_conns = list
                        .split(',')
                        .map(|c| match c.trim().parse() {
                            Ok(n @ 1..=5_000) => Ok(n),
                            _ => Err(format!("--scaling-conns: {c:?} is not 1-5000")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--servers" => {
                    let list = args.next().ok_or("--servers needs a list")?;
                    options.servers = Some(
                        list.split(',')
                            .map(|name| {
                                Kind::ALL
                                    .into_iter()
                                    .find(|k| k.name() == name.trim())
                                    .ok_or(format!("--servers: {name:?} is not a server"))
                            })
                            .collect::<Result<_, _>>()?,
                    );
                }
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        Ok(options)
    }

    /// How long each load window warms up, then measures.
    fn load_window(&self) -> (Duration, Duration) {
        if self.quick {
            (Duration::from_millis(200), Duration::from_millis(500))
        } else {
            (Duration::from_millis(300), Duration::from_millis(1200))
        }
    }

    /// Windows per server in cases 2, 3 and 9, taken in turns.
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }
}

fn main() -> ExitCode {
    if let Ok(kind) = std::env::var(servers::SERVE_ENV) {
        serve_as_peer(&kind);
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("echo bench: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(servers) = &options.servers {
        // Set once, before any case reads it.
        let _ = SELECTED.set(servers.clone());
    }
    println!("{}", machine_line());
    println!("load: {}", options.load.name());
    let busy_poll = options
        .busy_poll
        .unwrap_or(echo_chamber::server::config::DEFAULT_BUSY_POLL);
    println!(
        "ours: --busy-poll {}{}",
        humantime::format_duration(busy_poll),
        if options.busy_poll.is_none() {
            " (the default)"
        } else {
            ""
        }
    );
    if let Some(addr) = options.drive {
        return drive_external(addr, &options);
    }
    let started = Instant::now();
    let mut report = Report::default();
    for case in &options.cases {
        eprintln!("case {case} ({:.0} s in)", started.elapsed().as_secs_f64());
        let before = outside_load_mark();
        match case {
            1 => case_round_trips(&options, &mut report),
            2 => case_connection_scaling(&options, &mut report),
            3 => case_throughput(&options, &mut report),
            4 => case_many_idle(&options, &mut report),
            5 => case_shutdown(&options, &mut report),
            6 => case_udp(&options, &mut report),
            7 => case_scrape_cost(&options, &mut report),
            8 => case_haproxy(&options, &mut report),
            9 => case_busy_poll(&options, &mut report),
            10 => case_client_load(&options, &mut report),
            _ => unreachable!("Options::parse accepts only cases 1-10"),
        }
        if let (Some(before), Some(after)) = (before, outside_load_mark()) {
            let cores = after.cores_since(&before);
            if cores > FOREIGN_LIMIT {
                report.note(format!(
                    "case {case}: other processes used {cores:.2} cores on average over the case"
                ));
            }
        }
    }
    print!("{}", report.render());
    println!(
        "took {:.0} s, {:.1} s of it waiting for other processes to quieten",
        started.elapsed().as_secs_f64(),
        (60_000 - QUIET_WAIT_BUDGET_MS.load(Ordering::Relaxed)) as f64 / 1e3
    );
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Drives a server started by hand (under strace or perf, say) and prints
/// what the load side saw.
fn drive_external(addr: std::net::SocketAddr, options: &Options) -> ExitCode {
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let no_server_threads = || Ok(procfs::CpuSnapshot::default());
    let window = load::connect(addr, options.conns).and_then(|streams| {
        measure_window(
            streams,
            spec,
            options,
            Placement::OwnProcess,
            &no_server_threads,
        )
    });
    match window {
        Ok(w) => {
            println!(
                "drove {addr}: {} conns, {} echoes of 64 B in {:.2} s = {:.0}/s; \
                 load CPU {:.2} s; machine {:.0}% idle; other processes (the server \
                 included) {:.2} cores",
                options.conns,
                w.echoes,
                w.secs,
                w.echoes as f64 / w.secs,
                w.load_cpu.secs(),
                w.machine_idle * 100.0,
                w.foreign_cores
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("echo bench: driving {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A point from which to measure how much CPU other processes used.
struct OutsideLoadMark {
    at: Instant,
    machine: procfs::MachineCpu,
    ours_secs: f64,
}

/// None if /proc cannot be read; the check is then skipped.
fn outside_load_mark() -> Option<OutsideLoadMark> {
    Some(OutsideLoadMark {
        at: Instant::now(),
        machine: procfs::machine_cpu().ok()?,
        ours_secs: procfs::self_and_children_secs().ok()?,
    })
}

impl OutsideLoadMark {
    /// Average cores used since `earlier` by anything but this process and
    /// its reaped children (the server processes).
    fn cores_since(&self, earlier: &OutsideLoadMark) -> f64 {
        let busy = self.machine.busy_secs_since(&earlier.machine);
        let ours = self.ours_secs - earlier.ours_secs;
        let secs = (self.at - earlier.at).as_secs_f64().max(1e-3);
        (busy - ours).max(0.0) / secs
    }
}

/// How long, over the whole run, the bench may wait for other processes
/// to quieten down before a measurement (in milliseconds).
static QUIET_WAIT_BUDGET_MS: AtomicU64 = AtomicU64::new(60_000);

/// Waits, in 200 ms looks, until other processes use under
/// [`FOREIGN_LIMIT`] cores, or until the run's waiting budget is spent.
/// A shared machine's other work would otherwise land on whichever server
/// happens to be measured at the time.
fn wait_for_quiet() {
    const LOOK: Duration = Duration::from_millis(200);
    while QUIET_WAIT_BUDGET_MS.load(Ordering::Relaxed) >= LOOK.as_millis() as u64 {
        let Some(before) = outside_load_mark() else {
            return;
        };
        thread::sleep(LOOK);
        let Some(after) = outside_load_mark() else {
            return;
        };
        if after.cores_since(&before) <= FOREIGN_LIMIT {
            return;
        }
        QUIET_WAIT_BUDGET_MS.fetch_sub(LOOK.as_millis() as u64, Ordering::Relaxed);
    }
}

/// The re-executed bench binary, serving as a peer in its own process.
fn serve_as_peer(kind: &str) -> ! {
    let workers = std::env::var(servers::WORKERS_ENV)
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(WORKERS);
    match kind {
        "blocking" => peers::serve(peers::PeerKind::Blocking, workers),
        "tokio" => peers::serve(peers::PeerKind::Tokio, workers),
        other => {
            eprintln!(
                "echo bench: {}={other:?} is not blocking or tokio",
                servers::SERVE_ENV
            );
            std::process::exit(2);
        }
    }
}

/// `machine: 2 cores, Linux 6.x, <cpu model>`.
fn machine_line() -> String {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".to_string());
    format!(
        "machine: {cores} cores (nproc), Linux {} ({cpu})",
        kernel.trim()
    )
}

/// Nearest-rank percentile of sorted `times`, in microseconds.
fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

/// Case 1: one connection, one message in flight, each round trip timed.
fn case_round_trips(options: &Options, report: &mut Report) {
    let sizes = [
        (64, "64 B"),
        (4096, "4 KiB"),
        (65536, "64 KiB"),
        (1 << 20, "1 MiB"),
    ];
    // Short rounds, servers taking turns: where the scheduler puts the client
    // and server threads (same core or not), and whether the other vCPU is
    // halted and must be woken, move one-connection RTT several-fold on this
    // VM over seconds, so many short turns let every server sample the same
    // conditions.
    let (rounds, round_time) = if options.quick {
        (3, Duration::from_millis(100))
    } else {
        (12, Duration::from_millis(120))
    };
    for (size, label) in sizes {
        let warmup = if size >= 1 << 20 { 10 } else { 100 };
        // Per round: each server's round trips, and how busy other
        // processes kept the machine (a busy machine wakes threads faster on
        // this VM, which would flatter whichever server it coincided with).
        let mut per_round: Vec<([Vec<Duration>; KINDS], f64)> = Vec::new();
        let mut failed = [false; KINDS];
        for _ in 0..rounds {
            wait_for_quiet();
            let mut round: [Vec<Duration>; KINDS] = Default::default();
            let mark = outside_load_mark();
            for (at, kind) in kinds_in(1) {
                if failed[at] {
                    continue;
                }
                let outcome =
                    InProcess::start(kind, WORKERS, options.busy_poll, options.floor_placement)
                        .and_then(|server| {
                            let taken = match options.load {
                                LoadKind::Std => load::round_trips(
                                    server.addr(),
                                    size,
                                    warmup,
                                    200_000,
                                    round_time,
                                ),
                                LoadKind::Tokio => {
                                    tokio_round_trips(server.addr(), size, warmup, round_time)
                                }
                            };
                            server.stop()?;
                            taken
                        });
                match outcome {
                    Ok(taken) => round[at] = taken,
                    Err(e) => {
                        failed[at] = true;
                        report.failure(format!("case 1 {label} {}: {e}", kind.name()));
                    }
                }
            }
            let foreign = match (mark, outside_load_mark()) {
                (Some(before), Some(after)) => after.cores_since(&before),
                _ => 0.0,
            };
            per_round.push((round, foreign));
        }
        let any_clean = per_round.iter().any(|(_, f)| *f <= FOREIGN_LIMIT);
        let worst = per_round.iter().map(|(_, f)| *f).fold(0.0, f64::max);
        if !any_clean {
            note_foreign(report, &format!("case 1 {label}"), worst);
        }
        let mut times: [Vec<Duration>; KINDS] = Default::default();
        for (round, foreign) in per_round {
            if any_clean && foreign > FOREIGN_LIMIT {
                continue;
            }
            for (at, taken) in round.into_iter().enumerate() {
                times[at].extend(taken);
            }
        }
        let mut p50 = [None; KINDS];
        let mut p99 = [None; KINDS];
        let mut counts = Vec::new();
        for (at, kind) in Kind::ALL.into_iter().enumerate() {
            let times = &mut times[at];
            if failed[at] || times.is_empty() {
                continue;
            }
            times.sort();
            p50[at] = Some(percentile_us(times, 50.0));
            p99[at] = Some(percentile_us(times, 99.0));
            counts.push(format!("{} {}", kind.name(), times.len()));
        }
        report.row(Row {
            case: format!("1. RTT p50 {label}"),
            unit: "us",
            better: Better::Lower,
            values: p50,
        });
        report.row(Row {
            case: format!("1. RTT p99 {label}"),
            unit: "us",
            better: Better::Lower,
            values: p99,
        });
        eprintln!("    round trips timed: {}", counts.join(", "));
    }
    report.note(format!(
        "case 1: one connection per round, {rounds} rounds of {:.2} s per server taking turns, \
         pooled (rounds where other processes used > {FOREIGN_LIMIT} core are left out if \
         any round was clean); warm-up round trips untimed; {}",
        round_time.as_secs_f64(),
        match options.load {
            LoadKind::Std =>
                "<= 4 KiB uses a blocking client, larger sizes a nonblocking one around poll(2)",
            LoadKind::Tokio => "the tokio load (--load tokio): one task on a 2-thread runtime",
        }
    ));
}

/// Case 1's round trips with the tokio load: one connection, `warmup`
/// untimed round trips (or 2 s of them at most), then every round trip
/// timed for `round_time`.
fn tokio_round_trips(
    addr: std::net::SocketAddr,
    size: usize,
    warmup: usize,
    round_time: Duration,
) -> Result<Vec<Duration>, String> {
    let spec = Spec {
        message_len: size,
        window: 1,
    };
    let load = TokioLoad::start(load::connect(addr, 1)?, spec, 2)?;
    let warm_until = Instant::now() + Duration::from_secs(2);
    while load.totals().echoes < warmup as u64 && Instant::now() < warm_until {
        thread::sleep(Duration::from_millis(1));
    }
    load.time_round_trips(true);
    thread::sleep(round_time);
    load.time_round_trips(false);
    load.stop()
}

/// What one load window measured.
struct Window {
    /// Wall time over which `echoes` and `bytes` were counted.
    secs: f64,
    echoes: u64,
    bytes: u64,
    /// Wall time between the CPU snapshots' midpoints. Reading 10,000
    /// threads' /proc files takes a while, so this differs from `secs`.
    cpu_secs: f64,
    server_cpu: procfs::CpuUsed,
    load_cpu: procfs::CpuUsed,
    /// Shares of the machine's CPU left idle and spent in softirq.
    machine_idle: f64,
    machine_softirq: f64,
    /// Cores' worth of CPU that neither this process nor the server used:
    /// other processes, or kernel threads such as ksoftirqd. Above about
    /// 0.1 the figures were disturbed.
    foreign_cores: f64,
    /// The UDP load's counts over the window (case 6).
    udp: Option<Tally>,
    /// Datagrams the kernel dropped over the window at the server's UDP
    /// sockets and at the load's, for want of receive-buffer room (case 6).
    udp_drops: Option<(u64, u64)>,
    /// CPU of one part of the server, also counted in `server_cpu` (case
    /// 7: the metrics thread; case 8: HAProxy).
    part_cpu: Option<procfs::CpuUsed>,
    /// Round trips timed over the window, unsorted (case 8).
    round_trips: Vec<Duration>,
}

impl Window {
    /// The window from `before` to `after`, in which `echoes` echoes of
    /// `bytes` bytes were counted over `secs` seconds.
    fn between(
        before: &Snapshots,
        after: &Snapshots,
        placement: Placement,
        secs: f64,
        echoes: u64,
        bytes: u64,
    ) -> Window {
        let (machine_idle, machine_softirq) = after.machine.shares_since(&before.machine);
        let cpu_secs = (after.at - before.at).as_secs_f64();
        let server_used = after.server.used_since(&before.server);
        let mut ours_secs = after.bench.used_since(&before.bench).secs();
        if placement == Placement::OwnProcess {
            ours_secs += server_used.secs();
        }
        let foreign_cores =
            (after.machine.busy_secs_since(&before.machine) - ours_secs).max(0.0) / cpu_secs;
        Window {
            foreign_cores,
            secs,
            echoes,
            bytes,
            cpu_secs,
            server_cpu: server_used,
            load_cpu: after.load.used_since(&before.load),
            machine_idle,
            machine_softirq,
            udp: None,
            udp_drops: None,
            part_cpu: None,
            round_trips: Vec::new(),
        }
    }

    /// CPU time per echo, in microseconds: CPU rate over echo rate, each
    /// over its own interval.
    fn per_echo_us(&self, cpu: procfs::CpuUsed) -> f64 {
        let echo_rate = self.echoes as f64 / self.secs;
        cpu.secs() / self.cpu_secs / echo_rate * 1e6
    }

    /// Cores' worth of CPU used, on average.
    fn cores(&self, cpu: procfs::CpuUsed) -> f64 {
        cpu.secs() / self.cpu_secs
    }
}

/// CPU snapshots of the server, the load threads and the machine, stamped
/// with the middle of the time they took to read.
struct Snapshots {
    at: Instant,
    /// This whole process (load threads, and the server if in-process).
    bench: procfs::CpuSnapshot,
    server: procfs::CpuSnapshot,
    load: procfs::CpuSnapshot,
    machine: procfs::MachineCpu,
}

fn take_snapshots(
    server_cpu: &dyn Fn() -> std::io::Result<procfs::CpuSnapshot>,
) -> Result<Snapshots, String> {
    let cpu_error = |e: std::io::Error| format!("reading CPU time: {e}");
    let begun = Instant::now();
    let server = server_cpu().map_err(cpu_error)?;
    let load = procfs::snapshot(None, &|comm| comm.starts_with("load-")).map_err(cpu_error)?;
    let machine = procfs::machine_cpu().map_err(cpu_error)?;
    let bench = procfs::process_cpu(std::process::id()).map_err(cpu_error)?;
    Ok(Snapshots {
        at: begun + begun.elapsed() / 2,
        bench,
        server,
        load,
        machine,
    })
}

/// Where the server under test runs, for telling its CPU from others'.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    InProcess,
    OwnProcess,
}

/// Drives `streams` with `spec` on `load_threads` threads, warms up, then
/// measures one window. `server_cpu` snapshots the server's threads.
fn measure_window(
    streams: Vec<std::net::TcpStream>,
    spec: Spec,
    options: &Options,
    placement: Placement,
    server_cpu: &dyn Fn() -> std::io::Result<procfs::CpuSnapshot>,
) -> Result<Window, String> {
    measure_window_with(
        streams,
        spec,
        options,
        placement,
        server_cpu,
        Extras::default(),
    )
}

/// What a window may measure besides [`measure_window`]'s figures.
#[derive(Default)]
struct Extras<'a> {
    /// Snapshots one part of the server's threads, to report apart.
    part_cpu: Option<&'a dyn Fn() -> std::io::Result<procfs::CpuSnapshot>>,
    /// Time every round trip in the window (ping-pong only).
    round_trips: bool,
    /// This load generator instead of the run's (`--load`).
    load: Option<LoadKind>,
    /// With the std load, drive one ping-pong connection with a blocking
    /// thread rather than a mio loop.
    blocking_single: bool,
}

/// A running load of either generator.
enum Driver {
    Mio(Load),
    Blocking(BlockingPingPong),
    Tokio(TokioLoad),
}

impl Driver {
    fn start(
        kind: LoadKind,
        mut streams: Vec<std::net::TcpStream>,
        spec: Spec,
        threads: usize,
        timed: bool,
        blocking_single: bool,
    ) -> Result<Driver, String> {
        match kind {
            LoadKind::Tokio => TokioLoad::start(streams, spec, threads).map(Driver::Tokio),
            LoadKind::Std if blocking_single && streams.len() == 1 && spec.window == 1 => {
                BlockingPingPong::start(streams.remove(0), spec.message_len).map(Driver::Blocking)
            }
            LoadKind::Std if timed => Load::start_timed(streams, spec, threads).map(Driver::Mio),
            LoadKind::Std => Load::start(streams, spec, threads).map(Driver::Mio),
        }
    }

    fn totals(&self) -> load::Totals {
        match self {
            Driver::Mio(l) => l.totals(),
            Driver::Blocking(l) => l.totals(),
            Driver::Tokio(l) => l.totals(),
        }
    }

    fn any_finished(&self) -> bool {
        match self {
            Driver::Mio(l) => l.any_finished(),
            Driver::Blocking(l) => l.any_finished(),
            Driver::Tokio(l) => l.any_finished(),
        }
    }

    fn time_round_trips(&self, on: bool) {
        match self {
            Driver::Mio(l) => l.time_round_trips(on),
            Driver::Blocking(l) => l.time_round_trips(on),
            Driver::Tokio(l) => l.time_round_trips(on),
        }
    }

    fn stop(self) -> Result<Vec<Duration>, String> {
        match self {
            Driver::Mio(l) => l.stop(),
            Driver::Blocking(l) => l.stop(),
            Driver::Tokio(l) => l.stop(),
        }
    }
}

/// [`measure_window`], with `extras`.
fn measure_window_with(
    streams: Vec<std::net::TcpStream>,
    spec: Spec,
    options: &Options,
    placement: Placement,
    server_cpu: &dyn Fn() -> std::io::Result<procfs::CpuSnapshot>,
    extras: Extras,
) -> Result<Window, String> {
    let (warmup, measure) = options.load_window();
    let load = Driver::start(
        extras.load.unwrap_or(options.load),
        streams,
        spec,
        options.load_threads,
        extras.round_trips,
        extras.blocking_single,
    )?;
    let part_cpu = || {
        extras
            .part_cpu
            .map(|snapshot| snapshot().map_err(|e| format!("reading CPU time: {e}")))
            .transpose()
    };
    let measured = (|| {
        thread::sleep(warmup);
        let part_before = part_cpu()?;
        let before = take_snapshots(server_cpu)?;
        let totals0 = load.totals();
        load.time_round_trips(true);
        let started = Instant::now();
        thread::sleep(measure);
        load.time_round_trips(false);
        let totals1 = load.totals();
        let secs = started.elapsed().as_secs_f64();
        let after = take_snapshots(server_cpu)?;
        let part_after = part_cpu()?;
        let mut window = Window::between(
            &before,
            &after,
            placement,
            secs,
            totals1.echoes - totals0.echoes,
            totals1.bytes - totals0.bytes,
        );
        window.part_cpu = part_before
            .zip(part_after)
            .map(|(before, after)| after.used_since(&before));
        Ok(window)
    })();
    let early_end = load.any_finished();
    // Stopping reports the load's own failure (such as a wrong echo) first.
    let round_trips = load.stop()?;
    if early_end {
        return Err("a load thread ended early".to_string());
    }
    measured.map(|window| Window {
        round_trips,
        ..window
    })
}

/// Runs `rounds` windows per server measured in `case` against fresh in-process servers, the
/// servers taking turns so that a burst of outside load does not land on
/// one server's figures only. A server that fails is reported and skipped.
fn in_process_rounds(
    options: &Options,
    case: u32,
    conns: usize,
    spec: Spec,
    label: &str,
    report: &mut Report,
) -> [Vec<Window>; KINDS] {
    let mut windows: [Vec<Window>; KINDS] = Default::default();
    let mut failed = [false; KINDS];
    for _ in 0..options.rounds() {
        for (at, kind) in kinds_in(case) {
            if failed[at] {
                continue;
            }
            wait_for_quiet();
            let outcome =
                InProcess::start(kind, WORKERS, options.busy_poll, options.floor_placement)
                    .and_then(|server| {
                        let window = load::connect(server.addr(), conns).and_then(|streams| {
                            measure_window(streams, spec, options, Placement::InProcess, &|| {
                                procfs::snapshot(None, &|comm| kind.owns_thread(comm))
                            })
                        });
                        server.stop()?;
                        window
                    });
            match outcome {
                Ok(w) if w.echoes > 0 => windows[at].push(w),
                Ok(_) => {
                    failed[at] = true;
                    report.failure(format!("{label} {}: no echoes", kind.name()));
                }
                Err(e) => {
                    failed[at] = true;
                    report.failure(format!("{label} {}: {e}", kind.name()));
                }
            }
        }
    }
    for at in 0..KINDS {
        if failed[at] {
            windows[at].clear();
        }
    }
    windows
}

/// The servers measured in `case`, each with its index in [`Kind::ALL`].
fn kinds_in(case: u32) -> impl Iterator<Item = (usize, Kind)> {
    Kind::ALL.into_iter().enumerate().filter(move |(_, kind)| {
        kind.in_case(case)
            && SELECTED.get().is_none_or(|chosen| chosen.contains(kind))
            && (*kind != Kind::UringFloor || uring_available().is_ok())
    })
}

/// The servers chosen with `--servers`; unset means all.
static SELECTED: OnceLock<Vec<Kind>> = OnceLock::new();

/// Whether the io_uring floor can run here, probed once.
fn uring_available() -> &'static Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(uring_floor::available)
}

/// The median of `values` (the upper one of an even count); None if empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Other processes may use this many cores in a window before its
/// figures count as disturbed.
const FOREIGN_LIMIT: f64 = 0.1;

/// For each server (or each variant of a case), the windows of the rounds
/// other processes left alone (a round: one window per server, taken back
/// to back), or all windows if no round was clean. Whole rounds are kept or
/// dropped, so the servers are always compared over like conditions.
fn clean<const N: usize>(windows: &[Vec<Window>; N]) -> [Vec<&Window>; N] {
    let rounds = windows.iter().map(Vec::len).max().unwrap_or(0);
    let round_is_clean = |r: usize| {
        windows
            .iter()
            .filter_map(|ws| ws.get(r))
            .all(|w| w.foreign_cores <= FOREIGN_LIMIT)
    };
    let clean_rounds: Vec<usize> = (0..rounds).filter(|&r| round_is_clean(r)).collect();
    let keep: Vec<usize> = if clean_rounds.is_empty() {
        (0..rounds).collect()
    } else {
        clean_rounds
    };
    windows
        .each_ref()
        .map(|ws| keep.iter().filter_map(|&r| ws.get(r)).collect())
}

/// The highest share of a core that other processes took in any window.
fn most_foreign<const N: usize>(windows: &[Vec<Window>; N]) -> f64 {
    windows
        .iter()
        .flatten()
        .map(|w| w.foreign_cores)
        .fold(0.0, f64::max)
}

/// Case 2: connection scaling, 64 B ping-pong, 2 workers.
fn case_connection_scaling(options: &Options, report: &mut Report) {
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let mut details = Vec::new();
    let mut foreign: f64 = 0.0;
    if let Err(reason) = uring_available() {
        eprintln!("    case 2: uring-floor skipped: {reason}");
        report.note(format!("case 2: uring-floor skipped: {reason}"));
    }
    for &conns in &options.scaling_conns {
        let label = format!("case 2 {conns} conns");
        let windows = in_process_rounds(options, 2, conns, spec, &label, report);
        foreign = foreign.max(most_foreign(&windows));
        let kept = clean(&windows);
        let mut rate = [None; KINDS];
        let mut cpu_per_echo = [None; KINDS];
        for (at, kind) in Kind::ALL.into_iter().enumerate() {
            rate[at] = median(kept[at].iter().map(|w| w.echoes as f64 / w.secs).collect());
            cpu_per_echo[at] = median(
                kept[at]
                    .iter()
                    .map(|w| w.per_echo_us(w.server_cpu))
                    .collect(),
            );
            for w in &windows[at] {
                let detail = format!(
                    "{label} {}: {} echoes in {:.2} s; server CPU {:.3} s (schedstat) / {:.2} s \
                     (utime+stime); load CPU {:.2} us/echo, {:.0}% of {} load threads; \
                     machine {:.0}% idle, {:.0}% softirq; other processes {:.2} cores",
                    kind.name(),
                    w.echoes,
                    w.secs,
                    w.server_cpu.run_secs.unwrap_or(f64::NAN),
                    w.server_cpu.ticks_secs,
                    w.per_echo_us(w.load_cpu),
                    w.cores(w.load_cpu) / options.load_threads as f64 * 100.0,
                    options.load_threads,
                    w.machine_idle * 100.0,
                    w.machine_softirq * 100.0,
                    w.foreign_cores,
                );
                eprintln!("    {detail}");
                details.push(detail);
            }
        }
        floor_ratio_note(report, conns, &windows);
        report.row(Row {
            case: format!("2. echoes/s, {conns} conns"),
            unit: "/s",
            better: Better::Higher,
            values: rate,
        });
        report.row(Row {
            case: format!("2. CPU/echo, {conns} conns"),
            unit: "us",
            better: Better::Lower,
            values: cpu_per_echo,
        });
    }
    let (warmup, measure) = options.load_window();
    report.note(format!(
        "case 2: {} load threads ({}), one 64 B message in flight per connection; medians \
         of {} rounds, each round one window per server back to back (rounds where other \
         processes used > {FOREIGN_LIMIT} core are left out if any round was clean); \
         each window {:.1} s warm-up then {:.1} s measured (CPU needs >= 1 s windows: ticks are 10 ms); server CPU = on-CPU time of \
         the server's threads only, summed from /proc/self/task/<tid>/schedstat (ns). \
         utime+stime from .../stat (in the details) undercounts threads that run in bursts \
         shorter than a tick, such as the blocking peer's. Neither counts softirq work the \
         kernel defers to ksoftirqd; floor = the floor peer (benches/echo/floor.rs): per \
         worker one level-triggered epoll and one recv and one send per ready connection; \
         uring-floor = the io_uring floor (benches/echo/uring_floor.rs): per worker one \
         ring, a multishot recv per connection on a provided-buffer ring, the send \
         submitted from the received buffer, one io_uring_enter per loop; both floors \
         place connections {}",
        options.load_threads,
        match options.load {
            LoadKind::Std => "mio loops",
            LoadKind::Tokio => "tokio tasks, --load tokio",
        },
        options.rounds(),
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
        match options.floor_placement {
            floor::Placement::Fewest => "as ours do (fewest, ties at random)",
            floor::Placement::InTurn => "in turn (--floor-in-turn)",
        }
    ));
    note_foreign(report, "case 2", foreign);
    for detail in details {
        report.note(detail);
    }
}

/// Case 10: `echo-client` as a load generator (see [`client_load`]).
fn case_client_load(options: &Options, report: &mut Report) {
    // At least two whole one-second intervals beside the ramp and the tail.
    let seconds = if options.quick { 3 } else { 5 };
    let duration = format!("{seconds}s");
    let message = "x".repeat(64);
    let mut table = Table {
        title: "case 10: echo-client as a load generator, against ours in-process (2 workers)"
            .to_string(),
        header: [
            "run",
            "echoes/s",
            "client CPU/echo",
            "p50 / p99",
            "client peak RSS",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    if let Err(error) = echo_chamber::limits::raise_open_file_limit() {
        report.failure(format!("case 10: raising the open-file limit: {error}"));
        return;
    }
    wait_for_quiet();
    let server = match InProcess::start(
        Kind::Ours,
        WORKERS,
        options.busy_poll,
        options.floor_placement,
    ) {
        Ok(server) => server,
        Err(error) => {
            report.failure(format!("case 10: starting ours: {error}"));
            return;
        }
    };
    let addr = server.addr().to_string();
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let own = load::connect(server.addr(), 256).and_then(|streams| {
        measure_window(streams, spec, options, Placement::InProcess, &|| {
            procfs::snapshot(None, &|comm| Kind::Ours.owns_thread(comm))
        })
    });
    match own {
        Ok(w) => table.rows.push(vec![
            format!(
                "bench load, 256 conns x 64 B, {} mio threads",
                options.load_threads
            ),
            format!("{:.0}", w.echoes as f64 / w.secs),
            format!("{:.2} us", w.per_echo_us(w.load_cpu)),
            String::new(),
            String::new(),
        ]),
        Err(error) => report.failure(format!("case 10 bench load: {error}")),
    }
    let runs: [(&str, Vec<String>); 4] = [
        (
            "echo-client, 256 conns x 64 B, closed loop, --threads 2",
            vec![
                addr.clone(),
                "--connections".into(),
                "256".into(),
                "--message".into(),
                message.clone(),
                "--duration".into(),
                duration.clone(),
                "--threads".into(),
                "2".into(),
                "--report-every".into(),
                "1s".into(),
                "-q".into(),
            ],
        ),
        (
            "echo-client --reconnect (nothing reconnects), 256 conns x 64 B",
            vec![
                addr.clone(),
                "--connections".into(),
                "256".into(),
                "--message".into(),
                message,
                "--repeat".into(),
                (seconds * 100).to_string(),
                "--reconnect".into(),
                "-q".into(),
            ],
        ),
        (
            "echo-client, 10,000 conns, --rate 20000, --threads 2",
            vec![
                addr.clone(),
                "--connections".into(),
                "10000".into(),
                "--rate".into(),
                "20000".into(),
                "--duration".into(),
                duration.clone(),
                "--threads".into(),
                "2".into(),
                "--timeout".into(),
                "30s".into(),
                "--report-every".into(),
                "1s".into(),
                "-q".into(),
            ],
        ),
        (
            "echo-client, 256 conns, --rate 50000 (p50/p99 from the due time)",
            vec![
                addr.clone(),
                "--connections".into(),
                "256".into(),
                "--rate".into(),
                "50000".into(),
                "--duration".into(),
                duration,
                "--report-every".into(),
                "1s".into(),
                "-q".into(),
            ],
        ),
    ];
    for (what, args) in runs {
        wait_for_quiet();
        match client_load::run_client(&args) {
            Ok(run) => {
                let ms = |value: Option<f64>| {
                    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
                };
                table.rows.push(vec![
                    what.to_string(),
                    format!("{:.0}", run.echoes_per_s()),
                    format!("{:.2} us", run.cpu_us_per_echo()),
                    format!("{} / {} ms", ms(run.p50_ms), ms(run.p99_ms)),
                    format!("{:.1} MiB", run.max_rss_kib as f64 / 1024.0),
                ]);
            }
            Err(error) => report.failure(format!("case 10 {what}: {error}")),
        }
    }
    if let Err(error) = server.stop() {
        report.failure(format!("case 10: stopping ours: {error}"));
    }
    report.table(table);
    report.note(format!(
        "case 10: the client is a child process (CPU and peak RSS from wait4, connects and \
         the closing checks included); the bench load's CPU is its load threads' over a \
         {:.1} s window; --reconnect runs on the same loops (nothing reconnects: \
         what the flag costs unused), for {} echoes per connection, its echoes/s over the whole run; the others' echoes/s is \
         the median of their whole one-second --report-every intervals (steady state), \
         their CPU per echo over the whole run",
        options.load_window().1.as_secs_f64(),
        seconds * 100
    ));
}

/// Issue 16's go/no-go figure: the io_uring floor's CPU per echo over the
/// epoll floor's, per round (their windows were taken back to back), with
/// the other processes' largest share of a core in that pair of windows.
fn floor_ratio_note(report: &mut Report, conns: usize, windows: &[Vec<Window>; KINDS]) {
    let at = |kind: Kind| {
        Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("ALL lists every kind")
    };
    let (epoll, uring) = (&windows[at(Kind::Floor)], &windows[at(Kind::UringFloor)]);
    let pairs: Vec<(f64, f64)> = epoll
        .iter()
        .zip(uring)
        .map(|(e, u)| {
            (
                u.per_echo_us(u.server_cpu) / e.per_echo_us(e.server_cpu),
                e.foreign_cores.max(u.foreign_cores),
            )
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let ratios: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let clean: Vec<f64> = pairs
        .iter()
        .filter(|p| p.1 <= FOREIGN_LIMIT)
        .map(|p| p.0)
        .collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    report.note(format!(
        "case 2 {conns} conns: uring-floor / floor CPU per echo, per round: median {:.3}x \
         ({min:.3}-{max:.3}x over {} rounds: {}); over the {} rounds where other processes \
         used <= {FOREIGN_LIMIT} core: median {}",
        median(ratios.clone()).unwrap_or(f64::NAN),
        ratios.len(),
        pairs
            .iter()
            .map(|(r, f)| format!("{r:.3}x@{f:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        clean.len(),
        median(clean).map_or("-".to_string(), |m| format!("{m:.3}x")),
    ));
}

/// Warns when other processes took enough CPU to disturb a case.
fn note_foreign(report: &mut Report, case: &str, cores: f64) {
    if cores > FOREIGN_LIMIT {
        report.note(format!(
            "{case}: DISTURBED: other processes used up to {cores:.2} cores during a window; \
             rerun on a quiet machine"
        ));
    }
}

/// Case 3: 4 connections streaming 64 KiB messages.
fn case_throughput(options: &Options, report: &mut Report) {
    let spec = Spec {
        message_len: 64 * 1024,
        window: 4,
    };
    let windows = in_process_rounds(options, 3, 4, spec, "case 3", report);
    let kept = clean(&windows);
    let mut rate = [None; KINDS];
    for (at, kind) in Kind::ALL.into_iter().enumerate() {
        rate[at] = median(
            kept[at]
                .iter()
                .map(|w| w.bytes as f64 / w.secs / 1e6)
                .collect(),
        );
        for w in &windows[at] {
            eprintln!(
                "    case 3 {}: {} MB echoed in {:.2} s; server CPU {:.2} s, load CPU {:.2} s; \
                 other processes {:.2} cores",
                kind.name(),
                w.bytes / 1_000_000,
                w.secs,
                w.server_cpu.secs(),
                w.load_cpu.secs(),
                w.foreign_cores
            );
        }
    }
    note_foreign(report, "case 3", most_foreign(&windows));
    report.row(Row {
        case: "3. MB/s each way, 4 x 64 KiB".to_string(),
        unit: "MB/s",
        better: Better::Higher,
        values: rate,
    });
    report.note(format!(
        "case 3: each of 4 connections keeps 4 messages of 64 KiB in flight; \
         MB/s = echoed (= sent) bytes per second, 1 MB = 10^6 B; median of {} rounds \
         as in case 2",
        options.rounds()
    ));
}

/// Case 4: 10,000 open connections, 50 active, each server its own process.
fn case_many_idle(options: &Options, report: &mut Report) {
    const OPEN: usize = 10_000;
    const ACTIVE: usize = 50;
    let active_stride = options.active_stride;
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let mut rate = [None; KINDS];
    let mut peak = [None; KINDS];
    for (at, kind) in kinds_in(4) {
        wait_for_quiet();
        let outcome =
            ServerProcess::spawn(kind, MANY_WORKERS, options.busy_poll).and_then(|server| {
                let opened = Instant::now();
                let mut idle = load::open_idle(server.addr(), OPEN, 100)?;
                let open_secs = opened.elapsed().as_secs_f64();
                // Every 199th connection by default: spread over the whole set, and a
                // prime stride so the active ones do not all share one residue
                // modulo the worker count. (With a stride of 200, a server that
                // places connections in turn puts all 50 on one worker.)
                let active: Vec<_> = (0..ACTIVE)
                    .rev()
                    .map(|i| idle.swap_remove(i * active_stride))
                    .collect();
                let pid = server.pid();
                let window = measure_window(active, spec, options, Placement::OwnProcess, &|| {
                    procfs::process_cpu(pid)
                })
                .map_err(|e| format!("{e}; server stderr: {:?}", server.log()))?;
                let hwm = procfs::status_kib(pid, "VmHWM").map_err(|e| e.to_string())?;
                let rss = procfs::status_kib(pid, "VmRSS").map_err(|e| e.to_string())?;
                // Afterwards every idle connection must still be served.
                load::check_one_byte_echoes(&mut idle, 0)
                    .map_err(|e| format!("idle connections after the run: {e}"))?;
                Ok((window, hwm, rss, open_secs))
            });
        match outcome {
            Ok((w, hwm, rss, open_secs)) if w.echoes > 0 => {
                note_foreign(report, &format!("case 4 {}", kind.name()), w.foreign_cores);
                rate[at] = Some(w.echoes as f64 / w.secs);
                peak[at] = Some(hwm as f64 / 1024.0);
                eprintln!(
                    "    case 4 {}: opened {OPEN} in {open_secs:.1} s; {} echoes in {:.2} s; \
                     VmHWM {hwm} KiB, VmRSS {rss} KiB; server CPU/echo {:.2} us, load CPU/echo {:.2} us; \
                     machine {:.0}% idle; other processes {:.2} cores",
                    kind.name(),
                    w.echoes,
                    w.secs,
                    w.per_echo_us(w.server_cpu),
                    w.per_echo_us(w.load_cpu),
                    w.machine_idle * 100.0,
                    w.foreign_cores
                );
            }
            Ok(_) => report.failure(format!("case 4 {}: no echoes", kind.name())),
            Err(e) => report.failure(format!("case 4 {}: {e}", kind.name())),
        }
    }
    report.row(Row {
        case: "4. echoes/s, 50 of 10k active".to_string(),
        unit: "/s",
        better: Better::Higher,
        values: rate,
    });
    report.row(Row {
        case: "4. peak RSS, 10k conns".to_string(),
        unit: "MiB",
        better: Better::Lower,
        values: peak,
    });
    report.note(format!(
        "case 4: each server a separate process with {MANY_WORKERS} workers; {OPEN} connections, \
         each first proves itself served with a 1-byte echo, then {ACTIVE} of them (every \
         {active_stride}th) ping-pong 64 B while the rest idle; afterwards every idle one echoes again; \
         peak RSS = VmHWM of the server process"
    ));
}

/// Case 5: an idle server's exit after SIGINT, and its idle CPU.
fn case_shutdown(options: &Options, report: &mut Report) {
    let reps = if options.quick { 5 } else { 20 };
    let idle_for = if options.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    let mut p50 = [None; KINDS];
    let mut max = [None; KINDS];
    let mut idle_cpu = [None; KINDS];
    for (at, kind) in kinds_in(5) {
        let mut times = Vec::with_capacity(reps);
        wait_for_quiet();
        let outcome = (0..reps).try_for_each(|rep| {
            let server = ServerProcess::spawn(kind, WORKERS, options.busy_poll)?;
            if rep == 0 {
                let pid = server.pid();
                let cpu = || procfs::snapshot(Some(pid), &|_| true).map_err(|e| e.to_string());
                // Let start-up work finish before the idle window.
                thread::sleep(Duration::from_millis(100));
                let before = cpu()?;
                thread::sleep(idle_for);
                idle_cpu[at] = Some(cpu()?.used_since(&before).secs() * 1e3);
            } else {
                thread::sleep(Duration::from_millis(20));
            }
            times.push(server.interrupt_and_time_exit(Duration::from_secs(10))?);
            Ok::<(), String>(())
        });
        if let Err(e) = outcome {
            report.failure(format!("case 5 {}: {e}", kind.name()));
            continue;
        }
        times.sort();
        p50[at] = Some(percentile_us(&times, 50.0) / 1e3);
        max[at] = times.last().map(|t| t.as_secs_f64() * 1e3);
    }
    report.row(Row {
        case: "5. SIGINT to exit p50, idle".to_string(),
        unit: "ms",
        better: Better::Lower,
        values: p50,
    });
    report.row(Row {
        case: "5. SIGINT to exit max, idle".to_string(),
        unit: "ms",
        better: Better::Lower,
        values: max,
    });
    report.row(Row {
        case: format!("5. idle CPU over {:.1} s", idle_for.as_secs_f64()),
        unit: "ms",
        better: Better::Lower,
        values: idle_cpu,
    });
    report.note(format!(
        "case 5: {reps} fresh processes each; time from kill(SIGINT) to waitpid's return; \
         the peers have no drain and take SIGINT's default action (terminate), so theirs is \
         the floor of process exit"
    ));
}

/// Case 6's shape: flows, and datagrams in flight per flow (issue 12).
const UDP_FLOWS: usize = 64;
const UDP_WINDOW: usize = 4;

/// Case 6: UDP echo against the UDP peers, all in-process with
/// [`WORKERS`] workers.
fn case_udp(options: &Options, report: &mut Report) {
    let rounds = if options.quick { 1 } else { 5 };
    let mut foreign: f64 = 0.0;
    let mut details = Vec::new();
    let mut verdicts = Vec::new();
    for (size, label) in [(64, "64 B"), (1472, "1472 B")] {
        let spec = UdpSpec {
            size,
            window: UDP_WINDOW,
        };
        let label = format!("case 6 {label}");
        let (windows, summaries) = udp_rounds(options, rounds, spec, &label, report);
        foreign = foreign.max(most_foreign(&windows));
        let kept = clean(&windows);
        let mut rate = [None; KINDS];
        let mut megabytes = [None; KINDS];
        let mut cpu_per_echo = [None; KINDS];
        let mut loss = [None; KINDS];
        let mut reordered = [None; KINDS];
        let mut load_per_echo = [None; KINDS];
        for (at, kind) in kinds_in(6) {
            load_per_echo[at] =
                median(kept[at].iter().map(|w| w.per_echo_us(w.load_cpu)).collect());
            let tally = |w: &Window| w.udp.unwrap_or_default();
            rate[at] = median(kept[at].iter().map(|w| w.echoes as f64 / w.secs).collect());
            megabytes[at] = median(
                kept[at]
                    .iter()
                    .map(|w| w.bytes as f64 / w.secs / 1e6)
                    .collect(),
            );
            cpu_per_echo[at] = median(
                kept[at]
                    .iter()
                    .map(|w| w.per_echo_us(w.server_cpu))
                    .collect(),
            );
            loss[at] = median(kept[at].iter().map(|w| tally(w).loss_percent()).collect());
            // Every window counts here, not the clean ones only: one
            // reordered echo is one too many whatever else ran.
            if !windows[at].is_empty() {
                reordered[at] =
                    Some(windows[at].iter().map(|w| tally(w).reordered).sum::<u64>() as f64);
            }
            let mut all = Tally::default();
            for w in &windows[at] {
                let t = tally(w);
                all.corrupted += t.corrupted;
                all.duplicated += t.duplicated;
                all.late += t.late;
                let detail = format!(
                    "{label} {}: {} echoes in {:.2} s, {} sent, {} lost ({:.3}%), {} late, \
                     {} duplicated, {} reordered, {} corrupted, {} ICMP-refused; kernel \
                     receive-buffer drops at the server {}, at the load {}; server CPU \
                     {:.3} s (schedstat), {:.2} us/echo; load CPU {:.2} us/echo, {:.0}% of {} \
                     load threads; machine {:.0}% idle, {:.0}% softirq; other processes {:.2} cores",
                    kind.name(),
                    w.echoes,
                    w.secs,
                    t.sent,
                    t.lost,
                    t.loss_percent(),
                    t.late,
                    t.duplicated,
                    t.reordered,
                    t.corrupted,
                    t.refused,
                    w.udp_drops.map_or("?".to_string(), |d| d.0.to_string()),
                    w.udp_drops.map_or("?".to_string(), |d| d.1.to_string()),
                    w.server_cpu.secs(),
                    w.per_echo_us(w.server_cpu),
                    w.per_echo_us(w.load_cpu),
                    w.cores(w.load_cpu) / options.load_threads as f64 * 100.0,
                    options.load_threads,
                    w.machine_idle * 100.0,
                    w.machine_softirq * 100.0,
                    w.foreign_cores,
                );
                eprintln!("    {detail}");
                details.push(detail);
            }
            if all.corrupted > 0 || all.duplicated > 0 {
                report.failure(format!(
                    "{label} {}: {} corrupted and {} duplicated echoes",
                    kind.name(),
                    all.corrupted,
                    all.duplicated
                ));
            }
        }
        for summary in summaries {
            details.push(format!("{label} ours, server's own counts: {summary}"));
        }
        let row = |what: &str, unit: &'static str, better: Better, values| Row {
            case: format!("6. UDP {what}, {}", &label["case 6 ".len()..]),
            unit,
            better,
            values,
        };
        report.row(row("echoes/s", "/s", Better::Higher, rate));
        if size > 64 {
            report.row(row("MB/s", "MB/s", Better::Higher, megabytes));
        }
        report.row(row("CPU/echo", "us", Better::Lower, cpu_per_echo));
        report.row(row("loss", "%", Better::Lower, loss));
        report.row(row("reordered, all windows", "", Better::Lower, reordered));
        if size == 64 {
            verdicts = udp_verdicts(&rate, &cpu_per_echo, &loss, &reordered);
            verdicts.extend(udp_ceiling(&cpu_per_echo, &load_per_echo));
        }
    }
    udp_ping_pong(options, report);
    let (warmup, measure) = options.load_window();
    report.note(format!(
        "case 6: UDP only, each server in-process with {WORKERS} workers (ours: a socket per \
         worker with SO_REUSEPORT, default rate limit, which exempts loopback; tokio: one \
         socket shared by {WORKERS} tasks on {WORKERS} runtime threads; blocking: one socket, \
         a try_clone per thread, {WORKERS} threads); load: {UDP_FLOWS} flows (a connected \
         socket each) x {UDP_WINDOW} datagrams in flight, on {} load threads, each refilling \
         a flow's window with one sendmmsg and taking its echoes with recvmmsg; an echo not \
         back within {} ms counts as lost and the next datagram takes its place; medians of \
         {rounds} rounds, each one window per server back to back, {:.1} s warm-up then \
         {:.1} s measured; CPU/echo = on-CPU time of the server's threads (schedstat) over \
         echoes; loss = lost / (echoed + lost); reordered = echoes that came after an echo of \
         a later datagram of their flow, summed over every window",
        options.load_threads,
        udp::ECHO_TIMEOUT.as_millis(),
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
    ));
    for verdict in verdicts {
        report.note(verdict);
    }
    note_foreign(report, "case 6", foreign);
    for detail in details {
        report.note(detail);
    }
}

/// What the echoes/s target can be on this machine: when the server and
/// the load share every core and keep it busy, echoes/s is the cores over
/// server plus load CPU per echo, so ours at 0.75x tokio's CPU per echo
/// gives only (S_t + L_t) / (0.75 S_t + L_o) times tokio's echoes/s.
fn udp_ceiling(cpu: &[Option<f64>; KINDS], load: &[Option<f64>; KINDS]) -> Option<String> {
    let at = |kind: Kind| {
        Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("ALL lists every kind")
    };
    let (ours, tokio) = (at(Kind::Ours), at(Kind::Tokio));
    let (s_t, l_t, l_o) = (cpu[tokio]?, load[tokio]?, load[ours]?);
    Some(format!(
        "case 6 64 B: the load spends {l_o:.2} us of CPU per echo against ours, {l_t:.2} \
         us against tokio (server: tokio {s_t:.2} us); with the cores shared and busy, \
         echoes/s ~ cores / (server + load CPU per echo), so ours at exactly 0.75x tokio's \
         CPU/echo would give {:.2}x tokio's echoes/s on this machine",
        (s_t + l_t) / (0.75 * s_t + l_o)
    ))
}

/// Issue 12's targets for 64 B, each with whether ours met it.
fn udp_verdicts(
    rate: &[Option<f64>; KINDS],
    cpu: &[Option<f64>; KINDS],
    loss: &[Option<f64>; KINDS],
    reordered: &[Option<f64>; KINDS],
) -> Vec<String> {
    let at = |kind: Kind| {
        Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("ALL lists every kind")
    };
    let (ours, tokio, blocking) = (at(Kind::Ours), at(Kind::Tokio), at(Kind::Blocking));
    let mut verdicts = Vec::new();
    let ratio = |values: &[Option<f64>; KINDS]| match (values[ours], values[tokio]) {
        (Some(o), Some(t)) if t > 0.0 => Some(o / t),
        _ => None,
    };
    match ratio(cpu) {
        Some(r) if r <= 0.75 => verdicts.push(format!(
            "case 6 target CPU/echo <= 0.75x tokio's: met, {r:.2}x"
        )),
        Some(r) => verdicts.push(format!(
            "case 6 target CPU/echo <= 0.75x tokio's: MISSED, {r:.2}x ({:.0}% over the target)",
            (r / 0.75 - 1.0) * 100.0
        )),
        None => verdicts.push("case 6 target CPU/echo: not measured".into()),
    }
    match ratio(rate) {
        Some(r) if r >= 1.25 => verdicts.push(format!(
            "case 6 target echoes/s >= 1.25x tokio's: met, {r:.2}x"
        )),
        Some(r) => verdicts.push(format!(
            "case 6 target echoes/s >= 1.25x tokio's: MISSED, {r:.2}x ({:.0}% short of the target)",
            (1.0 - r / 1.25) * 100.0
        )),
        None => verdicts.push("case 6 target echoes/s: not measured".into()),
    }
    verdicts.push(match reordered[ours] {
        Some(0.0) => "case 6 target reordering 0: met".into(),
        Some(n) => format!("case 6 target reordering 0: MISSED, {n:.0} reordered"),
        None => "case 6 target reordering: not measured".into(),
    });
    let peers_best = [loss[tokio], loss[blocking]]
        .into_iter()
        .flatten()
        .fold(None, |best: Option<f64>, l| {
            Some(best.map_or(l, |b| b.min(l)))
        });
    verdicts.push(match (loss[ours], peers_best) {
        (Some(o), Some(p)) if o <= p => {
            format!(
                "case 6 target loss no worse than the peers': met, {o:.3}% vs best peer {p:.3}%"
            )
        }
        (Some(o), Some(p)) => format!(
            "case 6 target loss no worse than the peers': MISSED, {o:.3}% vs best peer {p:.3}%"
        ),
        _ => "case 6 target loss: not measured".into(),
    });
    verdicts
}

/// Case 6's load windows: `rounds` per server, the servers taking turns,
/// each against a fresh in-process server; also our server's own UDP
/// counts from each of its windows.
fn udp_rounds(
    options: &Options,
    rounds: usize,
    spec: UdpSpec,
    label: &str,
    report: &mut Report,
) -> (
    [Vec<Window>; KINDS],
    Vec<echo_chamber::server::stats::UdpSummary>,
) {
    let mut windows: [Vec<Window>; KINDS] = Default::default();
    let mut summaries = Vec::new();
    let mut failed = [false; KINDS];
    for _ in 0..rounds {
        for (at, kind) in kinds_in(6) {
            if failed[at] {
                continue;
            }
            wait_for_quiet();
            let outcome =
                UdpInProcess::start(kind, WORKERS, options.busy_poll).and_then(|server| {
                    let window = measure_udp_window(server.addr(), spec, options, &|| {
                        procfs::snapshot(None, &|comm| kind.owns_thread(comm))
                    });
                    let summary = server.stop()?;
                    window.map(|w| (w, summary))
                });
            match outcome {
                Ok((w, summary)) if w.echoes > 0 => {
                    windows[at].push(w);
                    summaries.extend(summary);
                }
                Ok(_) => {
                    failed[at] = true;
                    report.failure(format!("{label} {}: no echoes", kind.name()));
                }
                Err(e) => {
                    failed[at] = true;
                    report.failure(format!("{label} {}: {e}", kind.name()));
                }
            }
        }
    }
    for at in 0..KINDS {
        if failed[at] {
            windows[at].clear();
        }
    }
    (windows, summaries)
}

/// Drives the UDP server at `addr` with [`UDP_FLOWS`] flows of `spec`,
/// warms up, then measures one window.
fn measure_udp_window(
    addr: std::net::SocketAddr,
    spec: UdpSpec,
    options: &Options,
    server_cpu: &dyn Fn() -> std::io::Result<procfs::CpuSnapshot>,
) -> Result<Window, String> {
    let (warmup, measure) = options.load_window();
    let load = UdpLoad::start(addr, UDP_FLOWS, spec, options.load_threads)?;
    let measured = (|| {
        thread::sleep(warmup);
        let drops = || procfs::udp_drops(addr.port()).ok();
        let drops0 = drops();
        let before = take_snapshots(server_cpu)?;
        let tally0 = load.tally();
        let started = Instant::now();
        thread::sleep(measure);
        let tally1 = load.tally();
        let secs = started.elapsed().as_secs_f64();
        let after = take_snapshots(server_cpu)?;
        let drops1 = drops();
        let tally = tally1.since(&tally0);
        let mut window = Window::between(
            &before,
            &after,
            Placement::InProcess,
            secs,
            tally.echoed,
            tally.bytes,
        );
        window.udp = Some(tally);
        window.udp_drops = drops0
            .zip(drops1)
            .map(|((s0, c0), (s1, c1))| (s1.saturating_sub(s0), c1.saturating_sub(c0)));
        Ok(window)
    })();
    let early_end = load.any_finished();
    load.stop()?;
    if early_end {
        return Err("a load thread ended early".to_string());
    }
    measured
}

/// Case 6's ping-pong: one flow, one 64 B datagram at a time, the servers
/// taking short turns as in case 1.
fn udp_ping_pong(options: &Options, report: &mut Report) {
    let (rounds, round_time) = if options.quick {
        (3, Duration::from_millis(100))
    } else {
        (12, Duration::from_millis(120))
    };
    let mut times: [Vec<Duration>; KINDS] = Default::default();
    let mut lost = [0u64; KINDS];
    let mut failed = [false; KINDS];
    for _ in 0..rounds {
        wait_for_quiet();
        for (at, kind) in kinds_in(6) {
            if failed[at] {
                continue;
            }
            let outcome =
                UdpInProcess::start(kind, WORKERS, options.busy_poll).and_then(|server| {
                    let taken = udp::ping_pong(server.addr(), 64, 100, 200_000, round_time);
                    server.stop()?;
                    taken
                });
            match outcome {
                Ok(taken) => {
                    times[at].extend(taken.times);
                    lost[at] += taken.lost;
                }
                Err(e) => {
                    failed[at] = true;
                    report.failure(format!("case 6 ping-pong {}: {e}", kind.name()));
                }
            }
        }
    }
    let mut p50 = [None; KINDS];
    let mut p99 = [None; KINDS];
    let mut counts = Vec::new();
    for (at, kind) in kinds_in(6) {
        let times = &mut times[at];
        if failed[at] || times.is_empty() {
            continue;
        }
        times.sort();
        p50[at] = Some(percentile_us(times, 50.0));
        p99[at] = Some(percentile_us(times, 99.0));
        counts.push(format!(
            "{} {} timed, {} lost",
            kind.name(),
            times.len(),
            lost[at]
        ));
    }
    report.row(Row {
        case: "6. UDP RTT p50, 1 flow 64 B".to_string(),
        unit: "us",
        better: Better::Lower,
        values: p50,
    });
    report.row(Row {
        case: "6. UDP RTT p99, 1 flow 64 B".to_string(),
        unit: "us",
        better: Better::Lower,
        values: p99,
    });
    report.note(format!(
        "case 6 ping-pong: one connected socket, blocking send then recv, {rounds} rounds of \
         {:.2} s per server taking turns, pooled, 100 untimed round trips first; {}",
        round_time.as_secs_f64(),
        counts.join(", ")
    ));
}

/// Case 7's load: case 2's largest connection count.
const SCRAPE_CONNS: usize = 256;
/// Case 7's scrape interval: 10 a second, as issue 14 asks (Prometheus
/// usually scrapes every 15 s; this rate makes any cost show).
const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);

/// Case 7: what scraping the metrics endpoint costs the echo service. Ours
/// runs in-process with its endpoint on in every window; the windows
/// without and with a scraper are taken in turns, so that they share the
/// run's conditions, and their spread shows the noise.
fn case_scrape_cost(options: &Options, report: &mut Report) {
    const VARIANTS: [&str; 2] = ["no scraper", "scraping 10/s"];
    let rounds = if options.quick { 1 } else { 6 };
    let mut windows: [Vec<Window>; 2] = Default::default();
    // Per scraped window: what the scraper did, and over how long.
    let mut scraped: Vec<(Scrapes, f64)> = Vec::new();
    if !options.quick {
        // Thrown away: the case's first window runs on a cold process
        // (allocator, page cache, CPU clock) and would widen the noise of
        // whichever variant came first. Its failure would recur below.
        let _ = scrape_window(options, false);
    }
    for round in 0..rounds {
        // Which goes first alternates, so a drift over the run (another
        // process, the CPU's clock) lands on both alike.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for at in order {
            wait_for_quiet();
            match scrape_window(options, at == 1) {
                Ok((w, scrapes)) if w.echoes > 0 => {
                    eprintln!(
                        "    case 7 {}: {} echoes in {:.2} s; server CPU {:.3} s, of it the \
                         metrics thread {:.4} s; {}other processes {:.2} cores",
                        VARIANTS[at],
                        w.echoes,
                        w.secs,
                        w.server_cpu.secs(),
                        w.part_cpu.map_or(f64::NAN, |c| c.secs()),
                        scrapes.map_or(String::new(), |(s, secs)| format!(
                            "{} scrapes of {} B on average in {secs:.2} s, slowest {:.1} ms; ",
                            s.count,
                            s.bytes / s.count.max(1),
                            s.slowest.as_secs_f64() * 1e3
                        )),
                        w.foreign_cores
                    );
                    scraped.extend(scrapes);
                    windows[at].push(w);
                }
                Ok(_) => {
                    report.failure(format!("case 7 {}: no echoes", VARIANTS[at]));
                    return;
                }
                Err(e) => {
                    report.failure(format!("case 7 {}: {e}", VARIANTS[at]));
                    return;
                }
            }
        }
    }
    let kept = clean(&windows);
    let rate = |w: &&Window| w.echoes as f64 / w.secs;
    let cpu = |w: &&Window| w.per_echo_us(w.server_cpu);
    let metrics_ms_per_s = |w: &&Window| w.part_cpu.map_or(f64::NAN, |c| w.cores(c) * 1e3);
    let spread = |values: Vec<f64>| -> Option<(f64, f64, f64)> {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((median(values)?, min, max))
    };
    let mut rows = Vec::new();
    let mut figures = Vec::new();
    for (at, name) in VARIANTS.iter().enumerate() {
        let (Some(r), Some(c), Some(m)) = (
            spread(kept[at].iter().map(rate).collect()),
            spread(kept[at].iter().map(cpu).collect()),
            median(kept[at].iter().map(metrics_ms_per_s).collect()),
        ) else {
            report.failure(format!("case 7 {name}: no windows"));
            return;
        };
        let scrapes = if at == 1 {
            let (count, secs) = scraped
                .iter()
                .fold((0, 0.0), |(n, t), (s, secs)| (n + s.count, t + secs));
            format!("{:.1}/s", count as f64 / secs.max(1e-3))
        } else {
            "-".to_string()
        };
        rows.push(vec![
            name.to_string(),
            format_value(r.0, "/s"),
            format_value(r.1, "/s"),
            format_value(r.2, "/s"),
            format_value(c.0, "us"),
            format_value(c.1, "us"),
            format_value(c.2, "us"),
            format!("{m:.2} ms/s"),
            scrapes,
        ]);
        figures.push((r, c));
    }
    // Paired per round: the two windows of a round ran back to back.
    let ratios = |figure: &dyn Fn(&&Window) -> f64| -> Vec<f64> {
        kept[0]
            .iter()
            .zip(&kept[1])
            .map(|(none, with)| figure(with) / figure(none))
            .collect()
    };
    let (rate_ratios, cpu_ratios) = (ratios(&rate), ratios(&cpu));
    let (rate_none, cpu_none) = figures[0];
    let (rate_with, cpu_with) = figures[1];
    let (Some(rate_spread), Some(cpu_spread)) = (spread(rate_ratios), spread(cpu_ratios)) else {
        report.failure("case 7: no pair of windows".to_string());
        return;
    };
    rows.push(vec![
        "scraped / none".to_string(),
        format!("{:.3}x", rate_with.0 / rate_none.0),
        format!("{:.3}x", rate_spread.1),
        format!("{:.3}x", rate_spread.2),
        format!("{:.3}x", cpu_with.0 / cpu_none.0),
        format!("{:.3}x", cpu_spread.1),
        format!("{:.3}x", cpu_spread.2),
        String::new(),
        String::new(),
    ]);
    let (warmup, measure) = options.load_window();
    report.table(Table {
        title: format!(
            "7. metrics scrape cost: ours in-process, {WORKERS} workers, metrics endpoint on, \
             {SCRAPE_CONNS} conns x 64 B ping-pong; {} of {rounds} windows each (medians, \
             min, max; rounds disturbed by other processes left out)",
            kept[0].len()
        ),
        header: [
            "variant",
            "echoes/s",
            "min",
            "max",
            "CPU/echo",
            "min",
            "max",
            "metrics thread",
            "scrapes",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    });
    let windows_each = kept[0].len();
    report.note(noise_verdict(
        "echoes/s",
        windows_each,
        rate_none,
        rate_with,
        rate_spread,
    ));
    report.note(noise_verdict(
        "server CPU/echo",
        windows_each,
        cpu_none,
        cpu_with,
        cpu_spread,
    ));
    let (scrapes, scraping_secs) = scraped
        .iter()
        .fold((0, 0.0), |(n, t), (s, secs)| (n + s.count, t + secs));
    if let Some(metrics_ms) = median(kept[1].iter().map(metrics_ms_per_s).collect())
        && scrapes > 0
    {
        let per_sec = scrapes as f64 / scraping_secs;
        report.note(format!(
            "case 7: while scraped, the metrics thread used {metrics_ms:.2} ms of CPU per \
             second, about {:.0} us per scrape at {per_sec:.1} scrapes/s; answers averaged \
             {} B, the slowest scrape took {:.1} ms",
            metrics_ms * 1e3 / per_sec,
            scraped.iter().map(|(s, _)| s.bytes).sum::<u64>() / scrapes,
            scraped
                .iter()
                .map(|(s, _)| s.slowest)
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3
        ));
    }
    report.note(format!(
        "case 7: each window a fresh in-process server and endpoint (as `echo-server \
         --metrics 127.0.0.1:0` runs them) and {SCRAPE_CONNS} fresh connections on {} load \
         threads, {:.1} s warm-up then {:.1} s measured; {rounds} rounds, each one window \
         without and one with a scraper, which goes first alternating (rounds where other \
         processes used > {FOREIGN_LIMIT} core are left out if any round was clean); the \
         scraper is a bench thread (`scraper`) that opens a connection every {} ms, sends \
         `GET /metrics` with `Connection: close`, reads the answer to its end and checks it \
         starts `HTTP/1.1 200`, from before the warm-up to after the window; server CPU = \
         schedstat of threads echo-acceptor, echo-worker-* and echo-metrics, so the metrics \
         thread IS included in CPU/echo, and shown alone as ms of CPU per second (the \
         scraper's and the load's CPU are not charged); scraped / none: ratio of the \
         medians, min and max of the per-round ratios",
        options.load_threads,
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
        SCRAPE_INTERVAL.as_millis(),
    ));
    note_foreign(report, "case 7", most_foreign(&windows));
}

/// Whether case 7's scraped figure is within the noise: `none` and `with`
/// are (median, min, max) over `windows` windows each, `ratios` the same of
/// the per-round ratios with / none. Within noise: the scraped median lies
/// inside the unscraped windows' min..max.
fn noise_verdict(
    what: &str,
    windows: usize,
    none: (f64, f64, f64),
    with: (f64, f64, f64),
    ratios: (f64, f64, f64),
) -> String {
    let change = (with.0 / none.0 - 1.0) * 100.0;
    if windows < 2 {
        return format!(
            "case 7 {what}: scraped median {change:+.1}% against no scraper; one window \
             each, so no estimate of the noise"
        );
    }
    let inside = with.0 >= none.1 && with.0 <= none.2;
    let straddles = ratios.1 <= 1.0 && ratios.2 >= 1.0;
    format!(
        "case 7 {what}: scraped median {change:+.1}% against no scraper; {} (the {windows} \
         windows without a scraper span {:.1}% of their median); the per-round ratios {} 1 \
         ({:.3}x..{:.3}x)",
        if inside {
            "within noise: it lies inside their min..max"
        } else {
            "OUTSIDE the noise: it lies outside their min..max"
        },
        (none.2 - none.1) / none.0 * 100.0,
        if straddles {
            "straddle"
        } else {
            "all lie on one side of"
        },
        ratios.1,
        ratios.2,
    )
}

/// One case 7 window: a fresh server with its endpoint, and, if `scraped`,
/// a scraper on it from before the warm-up to after the window; also what
/// the scraper did, and over how long.
fn scrape_window(
    options: &Options,
    scraped: bool,
) -> Result<(Window, Option<(Scrapes, f64)>), String> {
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let server = OursWithMetrics::start(WORKERS, options.busy_poll)?;
    let outcome = load::connect(server.addr(), SCRAPE_CONNS).and_then(|streams| {
        let scraper = if scraped {
            Some((
                Scraper::start(server.metrics_addr(), SCRAPE_INTERVAL)?,
                Instant::now(),
            ))
        } else {
            None
        };
        let metrics_thread = || procfs::snapshot(None, &OursWithMetrics::is_metrics_thread);
        let window = measure_window_with(
            streams,
            spec,
            options,
            Placement::InProcess,
            &|| procfs::snapshot(None, &OursWithMetrics::owns_thread),
            Extras {
                part_cpu: Some(&metrics_thread),
                ..Extras::default()
            },
        );
        // Stopped even if the window failed; its failure comes first.
        let scrapes = scraper
            .map(|(scraper, started)| {
                let secs = started.elapsed().as_secs_f64();
                scraper.stop().map(|s| (s, secs))
            })
            .transpose();
        Ok((window?, scrapes?))
    });
    server.stop()?;
    outcome
}

/// Case 8's connections, and its paths: 0 is direct to one backend, n is
/// through HAProxy to n backends.
const PROXIED_CONNS: usize = 64;
const PROXIED_PATHS: [usize; 4] = [0, 1, 2, 3];

/// Case 8: 64 B ping-pong through HAProxy to one, two and three backends,
/// and direct to one, each backend `echo-server --workers 1`.
fn case_haproxy(options: &Options, report: &mut Report) {
    if !haproxy::available() {
        report.note("case 8 skipped: haproxy is not on PATH".to_string());
        return;
    }
    let rounds = if options.quick { 1 } else { 3 };
    let name = |backends: usize| match backends {
        0 => "direct, 1 backend".to_string(),
        1 => "haproxy, 1 backend".to_string(),
        n => format!("haproxy, {n} backends"),
    };
    let mut windows: [Vec<Window>; PROXIED_PATHS.len()] = Default::default();
    let mut failed = [false; PROXIED_PATHS.len()];
    for _ in 0..rounds {
        for (at, &backends) in PROXIED_PATHS.iter().enumerate() {
            if failed[at] {
                continue;
            }
            wait_for_quiet();
            match proxied_window(options, backends) {
                Ok(w) if w.echoes > 0 => {
                    let haproxy = w.part_cpu.map_or(0.0, |c| c.secs());
                    eprintln!(
                        "    case 8 {}: {} echoes in {:.2} s, {} timed; CPU haproxy {:.3} s, \
                         backends {:.3} s, load {:.3} s; machine {:.0}% idle, {:.0}% softirq; \
                         other processes {:.2} cores",
                        name(backends),
                        w.echoes,
                        w.secs,
                        w.round_trips.len(),
                        haproxy,
                        w.server_cpu.secs() - haproxy,
                        w.load_cpu.secs(),
                        w.machine_idle * 100.0,
                        w.machine_softirq * 100.0,
                        w.foreign_cores
                    );
                    windows[at].push(w);
                }
                Ok(_) => {
                    failed[at] = true;
                    report.failure(format!("case 8 {}: no echoes", name(backends)));
                }
                Err(e) => {
                    failed[at] = true;
                    report.failure(format!("case 8 {}: {e}", name(backends)));
                }
            }
        }
    }
    for at in 0..PROXIED_PATHS.len() {
        if failed[at] {
            windows[at].clear();
        }
    }
    let kept = clean(&windows);
    let mut rows = Vec::new();
    let mut rates = [None; PROXIED_PATHS.len()];
    let mut p99s = [None; PROXIED_PATHS.len()];
    let mut limits = Vec::new();
    for (at, &backends) in PROXIED_PATHS.iter().enumerate() {
        let ws = &kept[at];
        let Some(rate) = median(ws.iter().map(|w| w.echoes as f64 / w.secs).collect()) else {
            continue;
        };
        let rate_min = ws
            .iter()
            .map(|w| w.echoes as f64 / w.secs)
            .fold(f64::INFINITY, f64::min);
        let rate_max = ws
            .iter()
            .map(|w| w.echoes as f64 / w.secs)
            .fold(f64::NEG_INFINITY, f64::max);
        let mut times: Vec<Duration> = ws.iter().flat_map(|w| w.round_trips.clone()).collect();
        times.sort();
        let (p50, p99) = if times.is_empty() {
            (None, None)
        } else {
            (
                Some(percentile_us(&times, 50.0)),
                Some(percentile_us(&times, 99.0)),
            )
        };
        let haproxy_secs = |w: &&Window| w.part_cpu.map_or(0.0, |c| c.secs());
        let per_echo = |w: &&Window, secs: f64| {
            w.per_echo_us(procfs::CpuUsed {
                ticks_secs: secs,
                run_secs: Some(secs),
            })
        };
        let cores = |f: &dyn Fn(&&Window) -> f64| {
            median(ws.iter().map(|w| f(w) / w.cpu_secs).collect()).unwrap_or(f64::NAN)
        };
        let us = |f: &dyn Fn(&&Window) -> f64| {
            median(ws.iter().map(|w| per_echo(w, f(w))).collect()).unwrap_or(f64::NAN)
        };
        let backend_secs = |w: &&Window| w.server_cpu.secs() - haproxy_secs(w);
        let (proxy_cores, proxy_us) = (cores(&haproxy_secs), us(&haproxy_secs));
        let (backend_cores, backend_us) = (cores(&backend_secs), us(&backend_secs));
        let load_cores = cores(&|w| w.load_cpu.secs());
        let idle = median(ws.iter().map(|w| w.machine_idle * 100.0).collect()).unwrap_or(f64::NAN);
        let shown = |v: Option<f64>, unit| v.map_or("-".to_string(), |v| format_value(v, unit));
        rows.push(vec![
            name(backends),
            format_value(rate, "/s"),
            format_value(rate_min, "/s"),
            format_value(rate_max, "/s"),
            shown(p50, "us"),
            shown(p99, "us"),
            if backends == 0 {
                "-".to_string()
            } else {
                format!("{proxy_cores:.2}")
            },
            if backends == 0 {
                "-".to_string()
            } else {
                format_value(proxy_us, "us")
            },
            format!("{backend_cores:.2}"),
            format_value(backend_us, "us"),
            format!("{load_cores:.2}"),
            format!("{idle:.0}%"),
        ]);
        rates[at] = Some(rate);
        p99s[at] = p99;
        if backends > 0 {
            limits.push(format!(
                "{}: haproxy {proxy_cores:.2} cores ({proxy_us:.1} us/echo), backends \
                 {backend_cores:.2} ({backend_us:.1} us/echo), load {load_cores:.2}, idle \
                 {idle:.0}%",
                name(backends)
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    report.table(Table {
        title: format!(
            "8. through HAProxy: {PROXIED_CONNS} conns x 64 B ping-pong, backends \
             `echo-server --workers 1`; medians of {} of {rounds} windows (min, max; rounds \
             disturbed by other processes left out), RTT pooled over them",
            kept.iter().map(Vec::len).max().unwrap_or(0)
        ),
        header: [
            "path",
            "echoes/s",
            "min",
            "max",
            "RTT p50",
            "RTT p99",
            "haproxy cores",
            "haproxy CPU/echo",
            "backends cores",
            "backends CPU/echo",
            "load cores",
            "idle",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    });
    let against_direct: Vec<String> = PROXIED_PATHS
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(at, &backends)| {
            let (rate, direct) = (rates[at]?, rates[0]?);
            let p99 = match (p99s[at], p99s[0]) {
                (Some(p), Some(d)) if d > 0.0 => format!(", p99 {:.2}x", p / d),
                _ => String::new(),
            };
            Some(format!(
                "{backends}: {:.2}x direct's echoes/s{p99}",
                rate / direct
            ))
        })
        .collect();
    if !against_direct.is_empty() {
        report.note(format!(
            "case 8 through HAProxy with n backends: {}",
            against_direct.join("; ")
        ));
    }
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    report.note(format!(
        "case 8 where the limit lies ({cores} cores shared by HAProxy, the backends and the \
         load): {}",
        limits.join("; ")
    ));
    let (warmup, measure) = options.load_window();
    report.note(format!(
        "case 8: each window fresh child processes: the backends (`echo-server --workers 1 \
         --busy-poll {}`, with `--proxy-protocol --proxy-from 127.0.0.1/32` behind HAProxy, \
         without on the direct path) and `haproxy -db` with contrib/haproxy/echo.cfg \
         (maxconn 8000, leastconn, send-proxy-v2; its health checks dropped, and its \
         threads HAProxy's default, one per core) on free loopback ports, proved by one \
         echo through it; then {PROXIED_CONNS} fresh connections on {} load threads, {:.1} s \
         warm-up, {:.1} s measured, each round trip timed from its write to its echo's last \
         byte (closed loop: one message in flight per connection, so a slow echo delays the \
         next and p99 is of the echoes sent, see wrk2 on coordinated omission); {rounds} \
         rounds, the paths in turn (rounds where other processes used > {FOREIGN_LIMIT} \
         core are left out if any was clean); CPU from schedstat of every thread of each \
         process, cores = CPU s per s, CPU/echo = CPU over echoes",
        humantime::format_duration(
            options
                .busy_poll
                .unwrap_or(echo_chamber::server::config::DEFAULT_BUSY_POLL)
        ),
        options.load_threads,
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
    ));
    note_foreign(report, "case 8", most_foreign(&windows));
}

/// One case 8 window on `backends` backends behind HAProxy, or (0) direct
/// to one backend without the PROXY protocol; every child is killed when
/// it returns.
fn proxied_window(options: &Options, backends: usize) -> Result<Window, String> {
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let proxied: &[&str] = &["--proxy-protocol", "--proxy-from", "127.0.0.1/32"];
    let extra = if backends == 0 { &[][..] } else { proxied };
    let servers = (0..backends.max(1))
        .map(|_| ServerProcess::spawn_ours_with(1, options.busy_poll, extra))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs: Vec<std::net::SocketAddr> = servers.iter().map(ServerProcess::addr).collect();
    let haproxy = if backends == 0 {
        None
    } else {
        Some(Haproxy::start(&addrs)?)
    };
    let target = haproxy.as_ref().map_or(addrs[0], Haproxy::addr);
    let mut pids: Vec<u32> = servers.iter().map(ServerProcess::pid).collect();
    pids.extend(haproxy.as_ref().map(Haproxy::pid));
    let haproxy_cpu = haproxy.as_ref().map(|h| {
        let pid = h.pid();
        move || procfs::snapshot(Some(pid), &|_| true)
    });
    let window = load::connect(target, PROXIED_CONNS).and_then(|streams| {
        measure_window_with(
            streams,
            spec,
            options,
            Placement::OwnProcess,
            &|| procfs::processes_snapshot(&pids),
            Extras {
                part_cpu: haproxy_cpu
                    .as_ref()
                    .map(|f| f as &dyn Fn() -> std::io::Result<procfs::CpuSnapshot>),
                round_trips: true,
                ..Extras::default()
            },
        )
    });
    window.map_err(|e| {
        let mut message = e;
        if let Some(haproxy) = &haproxy {
            message.push_str(&format!("; haproxy stderr: {:?}", haproxy.log()));
        }
        for (n, server) in servers.iter().enumerate() {
            message.push_str(&format!("; backend {} stderr: {:?}", n + 1, server.log()));
        }
        message
    })
}

/// Case 9's servers: a name, the server, and our `--busy-poll` (None: the
/// run's, which is our default unless `--busy-poll` is given).
const BUSY_VARIANTS: [(&str, Kind, Option<Duration>); 3] = [
    ("ours", Kind::Ours, None),
    ("ours --busy-poll 0", Kind::Ours, Some(Duration::ZERO)),
    ("tokio", Kind::Tokio, None),
];

/// Case 9's connection counts: one (where spinning can save a wake-up)
/// and many (saturation, where it must not cost CPU).
const BUSY_CONNS: [usize; 2] = [1, 256];

/// Case 9 (issue 16): busy polling under both load generators. Per round,
/// for each connection count and load generator, one window per variant
/// back to back.
fn case_busy_poll(options: &Options, report: &mut Report) {
    const LOADS: [LoadKind; 2] = [LoadKind::Std, LoadKind::Tokio];
    let spec = Spec {
        message_len: 64,
        window: 1,
    };
    let cells = BUSY_CONNS.len() * LOADS.len();
    // windows[cell][variant], cell = conns index * LOADS + load index.
    let mut windows: Vec<[Vec<Window>; 3]> = (0..cells).map(|_| Default::default()).collect();
    for _ in 0..options.rounds() {
        for (c, &conns) in BUSY_CONNS.iter().enumerate() {
            for (l, &load) in LOADS.iter().enumerate() {
                for (v, &(name, kind, busy_poll)) in BUSY_VARIANTS.iter().enumerate() {
                    wait_for_quiet();
                    let busy_poll = busy_poll.or(options.busy_poll);
                    let outcome =
                        InProcess::start(kind, WORKERS, busy_poll, options.floor_placement)
                            .and_then(|server| {
                                let window =
                                    load::connect(server.addr(), conns).and_then(|streams| {
                                        measure_window_with(
                                            streams,
                                            spec,
                                            options,
                                            Placement::InProcess,
                                            &|| {
                                                procfs::snapshot(None, &|comm| {
                                                    kind.owns_thread(comm)
                                                })
                                            },
                                            Extras {
                                                round_trips: true,
                                                load: Some(load),
                                                blocking_single: true,
                                                ..Extras::default()
                                            },
                                        )
                                    });
                                let waits = server.stop_counting_waits()?;
                                window.map(|w| (w, waits))
                            });
                    match outcome {
                        Ok((w, waits)) if w.echoes > 0 => {
                            let waits = waits.map_or(String::new(), |(caught, all)| {
                                format!(", busy polling caught {caught} of {all} waits")
                            });
                            let mut times = w.round_trips.clone();
                            times.sort();
                            let p50 = if times.is_empty() {
                                f64::NAN
                            } else {
                                percentile_us(&times, 50.0)
                            };
                            eprintln!(
                                "    case 9 {conns} conns, {} load, {name}: {} echoes in {:.2} s, \
                                 RTT p50 {p50:.1} us, server CPU {:.2} us/echo, load CPU {:.2} \
                                 us/echo, machine {:.0}% idle, other processes {:.2} cores{waits}",
                                load.name(),
                                w.echoes,
                                w.secs,
                                w.per_echo_us(w.server_cpu),
                                w.per_echo_us(w.load_cpu),
                                w.machine_idle * 100.0,
                                w.foreign_cores
                            );
                            windows[c * LOADS.len() + l][v].push(w);
                        }
                        Ok(_) => report.failure(format!(
                            "case 9 {conns} conns, {} load, {name}: no echoes",
                            load.name()
                        )),
                        Err(e) => report.failure(format!(
                            "case 9 {conns} conns, {} load, {name}: {e}",
                            load.name()
                        )),
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut foreign: f64 = 0.0;
    for (c, &conns) in BUSY_CONNS.iter().enumerate() {
        for (l, &load) in LOADS.iter().enumerate() {
            let cell = &windows[c * LOADS.len() + l];
            foreign = foreign.max(most_foreign(cell));
            for (v, &(name, ..)) in BUSY_VARIANTS.iter().enumerate() {
                let ws = &cell[v];
                let spread = |f: &dyn Fn(&Window) -> f64| {
                    let values: Vec<f64> = ws.iter().map(f).collect();
                    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (median(values), min, max)
                };
                let (Some(rate), rate_min, rate_max) = spread(&|w| w.echoes as f64 / w.secs) else {
                    continue;
                };
                let (cpu, cpu_min, cpu_max) = spread(&|w| w.per_echo_us(w.server_cpu));
                let (p50, ..) = spread(&|w| {
                    let mut times = w.round_trips.clone();
                    times.sort();
                    if times.is_empty() {
                        f64::NAN
                    } else {
                        percentile_us(&times, 50.0)
                    }
                });
                let (idle, ..) = spread(&|w| w.machine_idle * 100.0);
                let (others, ..) = spread(&|w| w.foreign_cores);
                rows.push(vec![
                    conns.to_string(),
                    load.name().to_string(),
                    name.to_string(),
                    format!(
                        "{} ({}-{})",
                        format_value(rate, "/s"),
                        format_value(rate_min, "").trim_end(),
                        format_value(rate_max, "").trim_end()
                    ),
                    format!(
                        "{} ({:.2}-{:.2})",
                        format_value(cpu.unwrap_or(f64::NAN), "us"),
                        cpu_min,
                        cpu_max
                    ),
                    p50.map_or("-".to_string(), |p| format_value(p, "us")),
                    format!("{:.0}%", idle.unwrap_or(f64::NAN)),
                    format!("{:.2}", others.unwrap_or(f64::NAN)),
                    ws.len().to_string(),
                ]);
            }
        }
    }
    let busy_poll = options
        .busy_poll
        .unwrap_or(echo_chamber::server::config::DEFAULT_BUSY_POLL);
    report.table(Table {
        title: format!(
            "9. busy polling under both loads: ours (--busy-poll {}), ours --busy-poll 0, \
             tokio; 64 B ping-pong, {WORKERS} workers; medians (min-max) of the windows",
            humantime::format_duration(busy_poll)
        ),
        header: [
            "conns", "load", "server", "echoes/s", "CPU/echo", "RTT p50", "idle", "others",
            "windows",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    });
    let (warmup, measure) = options.load_window();
    report.note(format!(
        "case 9: {} rounds; per round, for 1 and 256 connections and each load, the three \
         servers back to back, each a fresh in-process server, {:.1} s warm-up then {:.1} s \
         measured; loads: std = one blocking thread for one connection, {} mio loop threads \
         for many; tokio = a task per connection on a {}-thread runtime; CPU/echo = the \
         server's threads' schedstat over echoes; RTT p50 = median over windows of each \
         window's p50 of every round trip; others = cores used by other processes (the \
         shared machine's load)",
        options.rounds(),
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
        options.load_threads,
        options.load_threads,
    ));
    note_foreign(report, "case 9", foreign);
}
