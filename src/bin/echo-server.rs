//! `echo-server`: the thin binary around the library's server. It parses the
//! flags, raises the descriptor limit, installs the SIGINT/SIGTERM handlers
//! that drive the shutdown controller, and chooses the exit code. The echo
//! itself lives in `echo_chamber`.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/stop_signals.rs"]
mod stop_signals;
use echo_chamber::error::io_cause;
use echo_chamber::limits;
use echo_chamber::log::counted;
use echo_chamber::server::activation::{self, Inherited};
use echo_chamber::server::cidr::{self, Cidr};
use echo_chamber::server::config::{self, LogLevel, ServerConfig};
use echo_chamber::server::listener::Transports;
use echo_chamber::server::metrics::MetricsServer;
use echo_chamber::server::shutdown::ShutdownHandle;
use echo_chamber::server::source_guard::RateLimit;
use echo_chamber::server::{Monitor, Server};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use stop_signals::{Meaning, StopSignals};

const PROG: &str = "echo-server";
/// Exit code of a runtime error.
const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error.
const EXIT_USAGE: u8 = 2;

#[derive(FromArgs)]
/// A byte-exact RFC 862 echo server: every byte received on a TCP connection
/// is sent back, in order and unchanged, and with --udp every UDP datagram,
/// whole, to where it came from. SIGINT or SIGTERM drains open connections
/// and queued datagrams and exits 0; a second signal (0.5 s or more after
/// the first) exits at once (130 or 143).
#[argh(
    error_code(0, "clean stop, also when the drain's deadline cut connections"),
    error_code(1, "runtime error: cannot listen, cannot start, or a worker died"),
    error_code(2, "usage error"),
    error_code(130, "a second SIGINT during the drain exited at once"),
    error_code(143, "a second SIGTERM during the drain exited at once")
)]
struct Args {
    /// serve TCP (the default when neither --tcp nor --udp is given)
    #[argh(switch)]
    tcp: u8,

    /// serve UDP: alone, UDP only; with --tcp, both on the same port
    #[argh(switch)]
    udp: u8,

    /// UDP datagrams answered per second to one source address (an IPv6
    /// source: its /64), with a second's worth at once; 0 for no limit
    /// (default 1000)
    #[argh(option, from_str_fn(parse_rate), arg_name = "n")]
    udp_rate_per_ip: Option<u32>,

    /// sources the UDP rate limit does not apply to, as address blocks
    /// separated by commas, or "none" (default: loopback, private and
    /// link-local: 127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16,::1/128,fc00::/7,fe80::/10)
    #[argh(option, from_str_fn(parse_cidr_list), arg_name = "cidrs")]
    udp_rate_exempt: Option<Vec<Cidr>>,

    /// address to listen on, IPv4 or IPv6 (default 0.0.0.0)
    #[argh(option, from_str_fn(parse_ip), arg_name = "addr")]
    bind: Option<IpAddr>,

    /// port to listen on; 0 picks a free one (default 9999)
    #[argh(option, from_str_fn(parse_port), arg_name = "port")]
    port: Option<u16>,

    /// require a PROXY protocol header (v1 or v2, as HAProxy's send-proxy,
    /// nginx or an AWS NLB send it) at the start of every TCP connection; its
    /// client address is used for logs and limits (needs --proxy-from)
    #[argh(switch)]
    proxy_protocol: u8,

    /// the proxies' addresses, as blocks separated by commas (e.g.
    /// 10.0.0.0/24,fd00::/8): connections from elsewhere are closed at once
    #[argh(option, from_str_fn(parse_cidr_list), arg_name = "cidrs")]
    proxy_from: Option<Vec<Cidr>>,

    /// set SO_REUSEPORT on every socket, so that a new server can start on
    /// the port before this one is stopped (a restart that refuses no one)
    #[argh(switch)]
    reuse_port: u8,

    /// after the first signal, go on accepting for this long while not
    /// ready, then drain, e.g. 5s, for load balancers slow to notice
    /// (default 0)
    #[argh(
        option,
        default = "Duration::ZERO",
        from_str_fn(parse_duration),
        arg_name = "dur"
    )]
    drain_delay: Duration,

    /// serve Prometheus metrics (GET /metrics) and health checks (GET
    /// /healthz, /readyz) over HTTP on this address, e.g. 127.0.0.1:9100
    /// (default: off)
    #[argh(option, from_str_fn(parse_metrics_addr), arg_name = "addr")]
    metrics: Option<SocketAddr>,

    /// worker threads, each serving many connections, 1 to 1024 (default: one
    /// per CPU this process may use, following a cgroup CPU quota)
    #[argh(option, from_str_fn(parse_workers), arg_name = "n")]
    workers: Option<usize>,

    /// connections open at once; more are closed at once (default 10000)
    #[argh(
        option,
        default = "config::DEFAULT_MAX_CONNECTIONS",
        from_str_fn(parse_at_least_one),
        arg_name = "n"
    )]
    max_connections: usize,

    /// connections open at once from one IP address (default: no limit)
    #[argh(option, from_str_fn(parse_at_least_one), arg_name = "n")]
    max_connections_per_ip: Option<usize>,

    /// close a connection after this long without traffic, e.g. 30s (default: off)
    #[argh(option, from_str_fn(parse_positive_duration), arg_name = "dur")]
    idle_timeout: Option<Duration>,

    /// how long the drain may take before busy connections are cut (default 5s)
    #[argh(
        option,
        default = "config::DEFAULT_SHUTDOWN_TIMEOUT",
        from_str_fn(parse_duration),
        arg_name = "dur"
    )]
    shutdown_timeout: Duration,

    /// how long a worker keeps polling for the next message before it sleeps,
    /// up to 1ms; 0 never spins (default 50us, or 0 under a cgroup CPU quota
    /// smaller than the machine)
    #[argh(option, from_str_fn(parse_busy_poll), arg_name = "dur")]
    busy_poll: Option<Duration>,

    /// also log the data received, escaped and cut to 80 characters
    #[argh(switch, short = 'v')]
    verbose: u8,

    /// log only start-up, shutdown, warnings and errors
    #[argh(switch, short = 'q')]
    quiet: u8,

    /// print the version and exit
    #[argh(switch)]
    version: u8,
}

/// An IP address for `--bind`. Host names are refused, not resolved: a
/// name may stand for several addresses (`localhost` for `::1` and
/// `127.0.0.1`) and the server listens on one, so clients of the others
/// would be refused.
fn parse_ip(value: &str) -> Result<IpAddr, String> {
    let bare = value
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(value);
    if let Ok(ip) = bare.parse() {
        return Ok(ip);
    }
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Err(format!(
            "an address with a port: give the port with --port, as in --bind {} --port {}",
            addr.ip(),
            addr.port()
        ));
    }
    if bare.contains('%') && bare.contains(':') {
        return Err(echo_chamber::error::SCOPED_IPV6_UNSUPPORTED.to_string());
    }
    if bare.eq_ignore_ascii_case("localhost") {
        return Err(
            "a host name: give an IP address, 127.0.0.1 (or ::1) for this machine only".into(),
        );
    }
    let name = !bare.is_empty()
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && bare.chars().any(|c| c.is_ascii_alphabetic());
    Err(if name {
        "a host name: give one of its IP addresses (--bind takes no names: a name \
         may stand for several addresses, and the server listens on one)"
            .into()
    } else {
        "not an IPv4 or IPv6 address, e.g. 127.0.0.1, ::1, or 0.0.0.0 for every interface".into()
    })
}

fn parse_metrics_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| "not an address and port such as 127.0.0.1:9100 or [::1]:9100".to_string())
}

fn parse_port(value: &str) -> Result<u16, String> {
    cli::whole_number(value).ok_or_else(|| "not a port number from 0 to 65535".to_string())
}

fn parse_at_least_one(value: &str) -> Result<usize, String> {
    match cli::whole_number::<usize>(value) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {}", usize::MAX)),
    }
}

fn parse_workers(value: &str) -> Result<usize, String> {
    match cli::whole_number::<usize>(value) {
        Some(n) if (1..=config::MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number from 1 to {}",
            config::MAX_WORKERS
        )),
    }
}

fn parse_rate(value: &str) -> Result<u32, String> {
    cli::whole_number(value)
        .ok_or_else(|| format!("must be a whole number from 0 (no limit) to {}", u32::MAX))
}

fn parse_cidr_list(value: &str) -> Result<Vec<Cidr>, String> {
    cidr::parse_list(value)
        .map_err(|why| format!("{why}; give blocks such as 10.0.0.0/8,fc00::/7, or none"))
}

use cli::{parse_duration, parse_positive_duration};

fn parse_busy_poll(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        duration if duration > config::MAX_BUSY_POLL => Err(format!(
            "must be at most {}",
            humantime::format_duration(config::MAX_BUSY_POLL)
        )),
        duration => Ok(duration),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            cli::print_err(PROG, &message);
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(message)) => {
            cli::print_err(PROG, &message);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

fn run() -> Result<(), Failure> {
    let args: Args = match cli::parse(PROG) {
        cli::Parsed::Run(args) => args,
        cli::Parsed::Answered => return Ok(()),
        cli::Parsed::CannotAnswer(message) => return Err(Failure::Runtime(message)),
        cli::Parsed::Usage(message) => return Err(Failure::Usage(message)),
    };
    // First, before any thread starts: taking the descriptors unsets the
    // LISTEN_* variables, so that no child inherits them.
    let inherited = inherited_sockets().map_err(Failure::Runtime)?;
    let version = cli::once(args.version, "--version").map_err(Failure::Usage)?;
    let verbose = cli::once(args.verbose, "--verbose").map_err(Failure::Usage)?;
    let quiet = cli::once(args.quiet, "--quiet").map_err(Failure::Usage)?;
    let tcp = cli::once(args.tcp, "--tcp").map_err(Failure::Usage)?;
    let udp = cli::once(args.udp, "--udp").map_err(Failure::Usage)?;
    let reuse_port = cli::once(args.reuse_port, "--reuse-port").map_err(Failure::Usage)?;
    let proxy_protocol =
        cli::once(args.proxy_protocol, "--proxy-protocol").map_err(Failure::Usage)?;
    let proxy_protocol = match (proxy_protocol, args.proxy_from) {
        (true, Some(trusted)) if !trusted.is_empty() => Some(trusted),
        (true, _) => {
            return Err(Failure::Usage(
                "--proxy-protocol needs --proxy-from with the proxies' addresses, e.g. \
                 --proxy-from 10.0.0.0/24"
                    .into(),
            ));
        }
        (false, Some(_)) => {
            return Err(Failure::Usage(
                "--proxy-from applies to --proxy-protocol: add --proxy-protocol".into(),
            ));
        }
        (false, None) => None,
    };
    if !inherited.is_empty() {
        let given = [
            (args.bind.is_some(), "--bind"),
            (args.port.is_some(), "--port"),
            (tcp, "--tcp"),
            (udp, "--udp"),
            (reuse_port, "--reuse-port"),
        ];
        if let Some((_, flag)) = given.iter().find(|(given, _)| *given) {
            return Err(Failure::Usage(format!(
                "{flag} cannot be used with sockets passed by the service manager \
                 (LISTEN_FDS): the .socket unit sets them; drop {flag}"
            )));
        }
    }
    let workers = args.workers.unwrap_or_else(config::default_workers);
    let inherited = match inherited.is_empty() {
        true => None,
        false => Some(
            activation::sort_sockets(inherited, workers)
                .map_err(|err| Failure::Runtime(err.to_string()))?,
        ),
    };
    let transports = match &inherited {
        Some(sockets) => Transports {
            tcp: sockets.tcp.is_some(),
            udp: !sockets.udp.is_empty(),
        },
        None => Transports {
            tcp: tcp || !udp,
            udp,
        },
    };
    if !transports.tcp && proxy_protocol.is_some() {
        return Err(Failure::Usage(
            "--proxy-protocol applies to TCP, and this server serves UDP alone: add --tcp".into(),
        ));
    }
    if !transports.udp && (args.udp_rate_exempt.is_some() || args.udp_rate_per_ip.is_some()) {
        return Err(Failure::Usage(
            "--udp-rate-per-ip and --udp-rate-exempt apply to UDP: add --udp".into(),
        ));
    }
    if version {
        return cli::print_out(&format!("{PROG} {}\n", env!("CARGO_PKG_VERSION")))
            .map_err(Failure::Runtime);
    }
    if verbose && quiet {
        return Err(Failure::Usage(
            "--verbose and --quiet cannot be used together".into(),
        ));
    }
    let busy_poll = busy_poll_choice(args.busy_poll, || (limits::cpu_quota(), online_cpus()));
    let config = ServerConfig {
        workers,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        idle_timeout: args.idle_timeout,
        shutdown_timeout: args.shutdown_timeout,
        drain_delay: args.drain_delay,
        busy_poll: busy_poll.duration,
        log_level: match (quiet, verbose) {
            (true, _) => LogLevel::Quiet,
            (_, true) => LogLevel::Verbose,
            _ => LogLevel::Normal,
        },
        udp_rate_limit: udp_rate_limit(args.udp_rate_per_ip, args.udp_rate_exempt),
        proxy_protocol,
    };

    // Handlers go in before the listener exists, so an early signal is queued
    // for the controller instead of killing the process mid-start.
    let signals = Signals::new([SIGINT, SIGTERM]).map_err(|err| {
        Failure::Runtime(format!(
            "cannot install signal handlers: {}",
            io_cause(&err)
        ))
    })?;
    // Raised before the workers start: each needs an event loop and a waker.
    let descriptor_warning = descriptor_warning(&config, limits::raise_open_file_limit());
    if let Some(stream) = std::env::var_os("JOURNAL_STREAM") {
        let stream = stream.to_string_lossy();
        echo_chamber::log::use_journal_format(echo_chamber::log::stderr_is_journal(&stream));
    }
    let logger = echo_chamber::log::Logger::new(config.log_level);

    // Bound before the echo sockets: a port that is taken stops the start
    // before anything is served. It shares the port under --reuse-port as
    // the echo sockets do, so that a restart's new server can start.
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            echo_chamber::server::listener::bind_tcp(addr, reuse_port).map_err(|err| {
                Failure::Runtime(format!(
                    "cannot listen for metrics on {addr}: {}",
                    listen_cause(addr, &err, Flags::METRICS)
                ))
            })?,
        ),
        None => None,
    };
    let sockets = match inherited {
        Some(sockets) => sockets,
        None => {
            let addr = SocketAddr::new(
                args.bind.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                args.port.unwrap_or(config::DEFAULT_PORT),
            );
            let udp_sockets = if transports.udp { config.workers } else { 0 };
            echo_chamber::server::listener::bind_sockets_with(
                addr,
                transports,
                udp_sockets,
                reuse_port,
            )
            .map_err(|err| {
                Failure::Runtime(format!(
                    "cannot listen on {addr}: {}",
                    listen_cause(addr, &err, Flags::ECHO)
                ))
            })?
        }
    };
    let server =
        Server::start(sockets, config).map_err(|err| Failure::Runtime(start_failure(&err)))?;
    // Only once the server runs: if it cannot start, its one error line says why.
    let bound = server.local_addr().ip();
    // `::ffff:0.0.0.0` is every IPv4 interface too.
    if bound.to_canonical().is_unspecified() {
        let (interfaces, local) = match bound.to_canonical() {
            IpAddr::V6(_) if ipv6_only_by_default() => ("every IPv6 interface", "::1"),
            IpAddr::V6(_) => ("every interface, IPv6 and IPv4", "::1"),
            IpAddr::V4(_) => ("every interface", "127.0.0.1"),
        };
        logger.notice(format_args!(
            "serving {interfaces} ({bound}): other machines can reach this server; \
             --bind {local} keeps it to this one"
        ));
    }
    if let Some(warning) = descriptor_warning {
        logger.warn(format_args!("{warning}"));
    }
    if let Some(why) = busy_poll.why_off {
        logger.info(format_args!("{why}"));
    }
    spawn_signal_thread(signals, server.shutdown_handle())?;
    // Answers through the drain (with /readyz at 503), and stops when
    // dropped, once the server has stopped.
    let metrics = match metrics_listener {
        Some(listener) => Some(
            MetricsServer::start(listener, server.monitor(), logger)
                .map_err(|err| Failure::Runtime(err.to_string()))?,
        ),
        None => None,
    };
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        spawn_notifier(server.monitor(), logger)?;
    }
    let stopped = server
        .join()
        .map(drop)
        .map_err(|err| Failure::Runtime(err.to_string()));
    drop(metrics);
    stopped
}

/// The descriptors a service manager passed (systemd socket activation),
/// with `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` unset; none when
/// `LISTEN_PID` is not this process.
fn inherited_sockets() -> Result<Vec<Inherited>, String> {
    const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.and_then(|pid| pid.parse::<u32>().ok()) != Some(std::process::id()) {
        // Meant for another process (or absent): ignored, as sd_listen_fds
        // does. (sd-notify would instead reject LISTEN_FDNAMES, whose names
        // then outnumber the descriptors it counts for us: none.)
        for variable in VARIABLES {
            // SAFETY: as below, no other thread runs yet.
            unsafe { std::env::remove_var(variable) };
        }
        return Ok(Vec::new());
    }
    // SAFETY: called first thing in `run`, before this process starts any
    // thread, as removing environment variables requires.
    let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(|err| {
        format!(
            "cannot take the sockets the service manager passed (LISTEN_FDS, LISTEN_FDNAMES): {}",
            io_cause(&err)
        )
    })?;
    Ok(passed
        .map(|(fd, name)| Inherited {
            // SAFETY: LISTEN_PID is this process, so the manager passed
            // this descriptor to us alone, and nothing else here owns it.
            fd: unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            name,
        })
        .collect())
}

/// Tells the service manager (`Type=notify`) that the server is ready,
/// then that it is stopping and, once a second during the drain, how many
/// connections are left.
fn spawn_notifier(monitor: Monitor, logger: echo_chamber::log::Logger) -> Result<(), Failure> {
    let send = move |states: &[sd_notify::NotifyState]| {
        if let Err(err) = sd_notify::notify(states) {
            logger.warn(format_args!(
                "cannot notify the service manager (NOTIFY_SOCKET): {}",
                io_cause(&err)
            ));
        }
    };
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    std::thread::Builder::new()
        .name("echo-notify".into())
        .spawn(move || {
            // Asleep until the shutdown: no wake-ups while serving.
            while !monitor.wait_for_shutdown(Duration::from_secs(24 * 3600)) {}
            let status = |monitor: &Monitor| {
                format!(
                    "stopping: {} open",
                    counted(monitor.open_connections() as u64, "connection")
                )
            };
            send(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status(&status(&monitor)),
            ]);
            // The process ends when the drain does, and this thread with it.
            loop {
                std::thread::sleep(Duration::from_secs(1));
                send(&[sd_notify::NotifyState::Status(&status(&monitor))]);
            }
        })
        .map(drop)
        .map_err(|err| {
            Failure::Runtime(format!(
                "cannot start the notification thread: {}",
                io_cause(&err)
            ))
        })
}

/// The UDP rate limit the flags ask for: the default's, with the rate and
/// the exempt sources each replaced if given; a rate of 0 turns it off.
fn udp_rate_limit(per_second: Option<u32>, exempt: Option<Vec<Cidr>>) -> Option<RateLimit> {
    let default = config::default_udp_rate_limit();
    let per_second = per_second.unwrap_or(default.per_second);
    (per_second > 0).then(|| RateLimit {
        per_second,
        // A second's worth at once.
        burst: per_second,
        exempt: exempt.unwrap_or(default.exempt),
    })
}

/// The busy-poll window, and why it is off if the server turned it off.
struct BusyPollChoice {
    duration: Duration,
    why_off: Option<String>,
}

/// `--busy-poll` if given; otherwise the default, except under a cgroup CPU
/// quota (a container's CPU limit) smaller than the machine's CPUs, where
/// spinning would spend the quota and get the server throttled.
/// `quota_and_cpus` (the cgroup files and the CPU count) is read only when
/// the flag is not given.
fn busy_poll_choice(
    given: Option<Duration>,
    quota_and_cpus: impl FnOnce() -> (Option<f64>, usize),
) -> BusyPollChoice {
    if let Some(duration) = given {
        return BusyPollChoice {
            duration,
            why_off: None,
        };
    }
    match quota_and_cpus() {
        (Some(cores), cpus) if cores < cpus as f64 => BusyPollChoice {
            duration: Duration::ZERO,
            why_off: Some(format!(
                "busy polling off: this cgroup's CPU quota is {cores:.2} of {cpus} cores \
                 (--busy-poll turns it on)"
            )),
        },
        _ => BusyPollChoice {
            duration: config::DEFAULT_BUSY_POLL,
            why_off: None,
        },
    }
}

/// The CPUs online, whatever a cgroup quota allows (std's
/// `available_parallelism` counts the quota in).
fn online_cpus() -> usize {
    // SAFETY: sysconf reads a system setting and touches no memory of ours.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(online).unwrap_or(1).max(1)
}

/// What to warn about once the server runs, given the open-file limit that
/// [`limits::raise_open_file_limit`] reached.
fn descriptor_warning(config: &ServerConfig, limit: std::io::Result<u64>) -> Option<String> {
    match limit {
        Ok(limit) => {
            let reserved = limits::reserved_descriptors(config.workers);
            let room = limit.saturating_sub(reserved);
            if room == 0 {
                return Some(format!(
                    "the descriptor limit {limit} leaves next to no room for connections: {} \
                     workers need about {reserved}; raise the open-file limit (ulimit -n) or \
                     lower --workers",
                    config.workers
                ));
            }
            (config.max_connections as u64 > room).then(|| {
                format!(
                    "the connection limit {} (--max-connections) is more than the descriptor \
                     limit {limit} allows; expect accept failures past about {room} connections",
                    config.max_connections,
                )
            })
        }
        Err(err) => Some(format!(
            "cannot raise the open-file limit: {}",
            io_cause(&err)
        )),
    }
}

/// The flags that choose a listening address, as a hint names them.
struct Flags {
    /// What to change for another port.
    port: &'static str,
    /// Where the address was given.
    address: &'static str,
}

impl Flags {
    const ECHO: Flags = Flags {
        port: "another --port, or --port 0 for a free one",
        address: "--bind",
    };
    const METRICS: Flags = Flags {
        port: "another --metrics port, or port 0 for a free one",
        address: "--metrics",
    };
}

/// Whether a `::` socket takes IPv6 only (`net.ipv6.bindv6only`): the server
/// leaves `IPV6_V6ONLY` as the system sets it.
fn ipv6_only_by_default() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|value| value.trim() == "1")
}

/// The lowest port a process without CAP_NET_BIND_SERVICE may bind
/// (`net.ipv4.ip_unprivileged_port_start`, 1024 unless set otherwise).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(1024)
}

/// Why a bind failed, with what to do for the commonest reasons.
fn listen_cause(addr: SocketAddr, err: &std::io::Error, flags: Flags) -> String {
    let cause = io_cause(err);
    match err.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "{cause}; another process is listening there; choose {}",
            flags.port
        ),
        // Not our own refusal of a multicast or broadcast address, which
        // says why itself.
        std::io::ErrorKind::AddrNotAvailable
            if cause.ends_with("cannot assign requested address") =>
        {
            let udp = if cause.starts_with("for UDP") {
                " (for UDP)"
            } else {
                ""
            };
            let every = if addr.is_ipv6() { "::" } else { "0.0.0.0" };
            format!(
                "{} is not an address of this machine{udp}; give {} one of its addresses, \
                 or {every} for every interface",
                addr.ip(),
                flags.address
            )
        }
        std::io::ErrorKind::PermissionDenied => {
            privileged_port_hint(cause, addr.port(), unprivileged_port_start(), flags)
        }
        _ => cause,
    }
}

/// A refused bind to a port below `start` needs a privilege; any other
/// refusal (a port 0, a security module) is left as the system said it.
fn privileged_port_hint(cause: String, port: u16, start: u16, flags: Flags) -> String {
    if port == 0 || port >= start {
        return cause;
    }
    format!(
        "{cause}: ports below {start} need root or CAP_NET_BIND_SERVICE; choose {}",
        flags.port
    )
}

/// Why the server could not start, with the way out when descriptors ran out.
fn start_failure(err: &echo_chamber::error::Error) -> String {
    match err {
        echo_chamber::error::Error::Setup { source, .. }
            if source.raw_os_error() == Some(libc::EMFILE) =>
        {
            format!("{err}; lower --workers or raise the open-file limit (ulimit -n)")
        }
        _ => err.to_string(),
    }
}

/// Turns signals into shutdown requests: the first drains, a second exits
/// at once with 128 + the signal number.
fn spawn_signal_thread(mut signals: Signals, shutdown: ShutdownHandle) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name("echo-signals".into())
        .spawn(move || {
            // Counted here, not read from the controller: a drain that a
            // dying worker started must not turn the user's first signal
            // into an immediate exit.
            let mut received = StopSignals::default();
            for signal in signals.forever() {
                match received.arrived() {
                    Meaning::Stop => shutdown.shutdown(),
                    Meaning::Repeat => {}
                    Meaning::ExitNow => std::process::exit(128 + signal),
                }
            }
        })
        .map(drop)
        .map_err(|err| {
            Failure::Runtime(format!(
                "cannot start the signal thread: {}",
                io_cause(&err)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_privileged_port_refused_says_what_it_needs() {
        let denied = || "permission denied".to_string();
        assert_eq!(
            privileged_port_hint(denied(), 7, 1024, Flags::ECHO),
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; \
             choose another --port, or --port 0 for a free one"
        );
        // net.ipv4.ip_unprivileged_port_start moved the line.
        assert_eq!(
            privileged_port_hint(denied(), 1500, 2000, Flags::ECHO),
            "permission denied: ports below 2000 need root or CAP_NET_BIND_SERVICE; \
             choose another --port, or --port 0 for a free one"
        );
        assert_eq!(
            privileged_port_hint(denied(), 9999, 1024, Flags::ECHO),
            "permission denied"
        );
        // Port 0 needs no privilege: the refusal came from elsewhere.
        assert_eq!(
            privileged_port_hint(denied(), 0, 1024, Flags::ECHO),
            "permission denied"
        );
    }

    #[test]
    fn busy_polling_is_off_by_default_only_under_a_quota_smaller_than_the_machine() {
        let given = Duration::from_micros(200);
        let choice = |flag, quota| busy_poll_choice(flag, || (quota, 4)).duration;
        assert_eq!(choice(Some(given), Some(0.5)), given, "the flag wins");
        let unread = busy_poll_choice(Some(given), || panic!("cgroup read despite the flag"));
        assert_eq!(unread.duration, given);
        assert_eq!(choice(None, Some(0.5)), Duration::ZERO);
        assert_eq!(choice(None, Some(3.99)), Duration::ZERO);
        assert_eq!(choice(None, Some(4.0)), config::DEFAULT_BUSY_POLL);
        assert_eq!(choice(None, None), config::DEFAULT_BUSY_POLL);
        let why = busy_poll_choice(None, || (Some(1.5), 4)).why_off;
        assert_eq!(
            why.as_deref(),
            Some(
                "busy polling off: this cgroup's CPU quota is 1.50 of 4 cores (--busy-poll turns it on)"
            )
        );
    }
}
