//! The client as a load generator, as a specification: thousands of
//! connections on a few event-loop threads, each echo still checked byte
//! for byte. Every run is on loopback with port 0 and a hard time limit,
//! and asserts counts and orders of magnitude only: these tests share a
//! slow machine with others.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::client::{JSON_KEYS, Json, TestServer, run_client};
use common::with_time_limit;
use echo_chamber::client::{self, ClientConfig, Payload, StopHandle};
use echo_chamber::server::config::ServerConfig;

const LIMIT: Duration = Duration::from_secs(120);

fn config_for(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        target: addr
            .to_string()
            .parse()
            .expect("a socket address is a target"),
        ..ClientConfig::default()
    }
}

/// The project's server, in this process, taking `connections` at once.
fn server_for(connections: usize) -> echo_chamber::server::Server {
    common::start_server(ServerConfig {
        max_connections: connections,
        shutdown_timeout: Duration::from_secs(2),
        ..common::quiet_config(2)
    })
}

/// Accepts `count` connections on `listener`, echoing each on a thread of
/// its own, and returns the instants they were accepted at.
fn echo_and_time_accepts(
    listener: TcpListener,
    count: usize,
) -> std::thread::JoinHandle<Vec<Instant>> {
    std::thread::spawn(move || {
        let mut accepted = Vec::new();
        for _ in 0..count {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted.push(Instant::now());
                    std::thread::spawn(move || common::client::std_echo(stream));
                }
                Err(error) => panic!("accept: {error}"),
            }
        }
        accepted
    })
}

#[test]
fn five_thousand_connections_on_two_threads_all_echo_exactly() {
    with_time_limit(LIMIT, || {
        // Both ends are in this process: a descriptor each, and some slack.
        common::need_open_files(2 * 5_000 + 100);
        let server = server_for(5_000);
        let config = ClientConfig {
            payload: Payload::Generated {
                size: NonZeroUsize::new(100).expect("not zero"),
            },
            repeat: 3,
            connections: NonZeroUsize::new(5_000).expect("not zero"),
            threads: NonZeroUsize::new(2),
            // Connects queued behind a full backlog wait for SYN resends.
            timeout: Duration::from_secs(30),
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        assert_eq!(
            (report.sent, report.echoed, report.bytes_echoed),
            (15_000, 15_000, 1_500_000),
            "{}",
            report.summary(false)
        );
    });
}

#[test]
fn connect_rate_spreads_the_connects_seen_by_the_server() {
    with_time_limit(LIMIT, || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("bound address");
        let accepting = echo_and_time_accepts(listener, 40);
        let config = ClientConfig {
            connections: NonZeroUsize::new(40).expect("not zero"),
            connect_rate: Some(20),
            threads: NonZeroUsize::new(2),
            ..config_for(addr)
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        let accepted = accepting.join().expect("the accepting thread");
        // 40 connects at 20 a second are due over 1.95 s. A slow machine
        // can only spread them further; half of it leaves room for
        // accepts that queued up before the thread got to them.
        let span = accepted[39] - accepted[0];
        assert!(
            span >= Duration::from_millis(975),
            "40 connects at --connect-rate 20 arrived within {span:?}"
        );
        assert_eq!(report.connect.count(), 40, "{}", report.summary(false));
    });
}

/// Echoes like any server, except that the whole server stalls once for a
/// second, 0.5 s into its first connection (`STALLED` says it has).
fn stalls_once(stream: TcpStream, stalled: &AtomicBool) {
    let began = Instant::now();
    let mut reader = stream.try_clone().expect("clone the accepted socket");
    let mut writer = stream;
    let mut buf = [0u8; 4096];
    loop {
        let read = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if began.elapsed() >= Duration::from_millis(500) && !stalled.swap(true, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(1));
        }
        if writer.write_all(&buf[..read]).is_err() {
            return;
        }
    }
}

static OPEN_LOOP_STALL: AtomicBool = AtomicBool::new(false);
static CLOSED_LOOP_STALL: AtomicBool = AtomicBool::new(false);

#[test]
fn a_one_second_stall_shows_in_the_open_loop_p99_but_only_in_the_closed_loop_max() {
    with_time_limit(LIMIT, || {
        let open = TestServer::start(|stream| stalls_once(stream, &OPEN_LOOP_STALL));
        let config = ClientConfig {
            rate: Some(1000),
            repeat: 0,
            duration: Some(Duration::from_secs(3)),
            ..config_for(open.addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        let p99 = report.rtt.percentile(0.99).expect("echoes came back");
        // The echoes due during the stall waited up to a second each: about
        // a third of them, so the p99 is most of that second.
        assert!(
            p99 >= Duration::from_millis(300),
            "open loop p99 {p99:?}\n{}",
            report.summary(false)
        );

        let closed = TestServer::start(|stream| stalls_once(stream, &CLOSED_LOOP_STALL));
        let config = ClientConfig {
            repeat: 0,
            duration: Some(Duration::from_secs(3)),
            ..config_for(closed.addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        let p99 = report.rtt.percentile(0.99).expect("echoes came back");
        let max = report.rtt.max().expect("echoes came back");
        // One echo of thousands waited: the stall is the max, and the p99
        // is an ordinary round trip (orders of magnitude under the stall).
        assert!(
            max >= Duration::from_millis(900) && p99 < Duration::from_millis(100),
            "closed loop p99 {p99:?}, max {max:?}\n{}",
            report.summary(false)
        );
    });
}

#[test]
fn a_rate_against_a_fast_server_is_held_and_never_exceeded() {
    with_time_limit(LIMIT, || {
        let server = server_for(100);
        let config = ClientConfig {
            rate: Some(2000),
            repeat: 0,
            duration: Some(Duration::from_secs(2)),
            connections: NonZeroUsize::new(20).expect("not zero"),
            threads: NonZeroUsize::new(2),
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        let rate = report.rate.clone().expect("a rate run reports its rate");
        // The schedule never runs ahead: at most 2000 a second for 2 s.
        // Behind it, a loaded machine still sends most of what was due.
        assert!(
            report.sent <= 4_001 && report.sent >= 2_800,
            "{} sent\n{}",
            report.sent,
            report.summary(false)
        );
        assert_eq!(rate.due, report.sent + rate.unsent, "{rate:?}");
    });
}

#[test]
fn a_rate_the_client_cannot_reach_is_reported_as_not_kept() {
    with_time_limit(LIMIT, || {
        let server = server_for(10);
        // One connection has one echo out at a time: ten million a second
        // is out of reach on any machine.
        let config = ClientConfig {
            rate: Some(10_000_000),
            repeat: 0,
            duration: Some(Duration::from_millis(500)),
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        let rate = report.rate.clone().expect("a rate run reports its rate");
        assert!(!rate.kept(), "{rate:?}\n{}", report.summary(false));
        assert!(
            report
                .summary(false)
                .contains("could not keep --rate 10000000"),
            "{}",
            report.summary(false)
        );
    });
}

#[test]
fn a_run_beyond_the_memory_available_is_refused_before_connecting() {
    with_time_limit(LIMIT, || {
        // 100,000 messages of 64 MiB out at once: 6.1 TiB, beyond any
        // machine's MemAvailable. A closed port shows nothing was tried.
        let closed = common::client::closed_port();
        let run = run_client(
            &[
                &closed.addr().to_string(),
                "--connections",
                "100000",
                "--size",
                "64MiB",
            ],
            b"",
            Duration::from_secs(30),
        );
        assert_eq!(run.code(), Some(2), "{}", run.describe());
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
        assert!(
            run.stderr.contains("the run needs about 6.1 TiB")
                && run.stderr.contains("fewer --connections"),
            "{}",
            run.describe()
        );
        assert_eq!(run.stdout, "", "{}", run.describe());
    });
}

/// A memory cgroup limited to `bytes`, made under this machine's cgroup
/// file system (v2, or v1's memory hierarchy) with a name of its own, and
/// removed when dropped, with any groups made under it and after killing
/// whatever still runs in them.
struct MemoryCgroup {
    dir: PathBuf,
    /// The hierarchy's root, to name groups as `/proc/self/cgroup` does.
    root: PathBuf,
    usage_file: &'static str,
    children: Vec<PathBuf>,
}

impl MemoryCgroup {
    /// `None` where cgroups are not writable (most unprivileged runs): the
    /// test then skips, saying so, except in CI, which runs as root with
    /// cgroups, so that a test that never ran cannot pass there.
    fn new(bytes: u64) -> Option<MemoryCgroup> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "echo-chamber-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let candidates = [
            (
                PathBuf::from("/sys/fs/cgroup/memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            (
                PathBuf::from("/sys/fs/cgroup"),
                "memory.max",
                "memory.current",
            ),
        ];
        for (root, limit_file, usage_file) in candidates {
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            let dir = root.join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cgroup = MemoryCgroup {
                dir,
                root,
                usage_file,
                children: Vec::new(),
            };
            if std::fs::write(cgroup.dir.join(limit_file), bytes.to_string()).is_ok() {
                return Some(cgroup);
            }
            // Not a memory controller here after all; dropping removes it.
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with cgroups: a memory cgroup must be possible under /sys/fs/cgroup"
        );
        eprintln!("skipped: no writable memory cgroup here (needs root and cgroups)");
        None
    }

    /// The group's path as `/proc/self/cgroup` names it.
    fn name(&self) -> String {
        let path = self.dir.strip_prefix(&self.root).expect("made under root");
        format!("/{}", path.display())
    }

    /// Makes a group without a limit of its own under this one.
    fn child(&mut self, name: &str) -> PathBuf {
        // cgroup v2 hands the memory controller down only when asked; v1
        // has no such file.
        let subtree = self.dir.join("cgroup.subtree_control");
        if subtree.exists() {
            std::fs::write(&subtree, "+memory")
                .unwrap_or_else(|err| panic!("enable memory in {}: {err}", subtree.display()));
        }
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|err| panic!("make the cgroup {}: {err}", dir.display()));
        self.children.push(dir.clone());
        dir
    }

    /// What the group's processes use, in bytes.
    fn usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(self.usage_file))
            .ok()
            .and_then(|usage| usage.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for dir in self.children.iter().rev().chain([&self.dir]) {
            // Only processes this test started are in its groups.
            let procs = dir.join("cgroup.procs");
            let emptied = common::wait_until(Duration::from_secs(10), || {
                let pids = std::fs::read_to_string(&procs).unwrap_or_default();
                for pid in pids.lines().filter_map(|pid| pid.parse::<i32>().ok()) {
                    // SAFETY: kill only sends a signal.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                pids.trim().is_empty()
            });
            // If the group cannot be emptied or removed, an empty or idle
            // group is left behind; the test has its answer either way.
            if emptied && let Err(err) = std::fs::remove_dir(dir) {
                eprintln!("cannot remove the cgroup {}: {err}", dir.display());
            }
        }
    }
}

/// Runs the client binary with `args` in the cgroup at `dir`, moved there
/// by a shell before it execs the client, so that the cgroup and its
/// parents are the client's from its first instruction.
fn run_client_in(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new("sh");
    command
        .args(["-c", "echo $$ > \"$1\" && shift && exec \"$@\"", "sh"])
        .arg(dir.join("cgroup.procs"))
        .arg(common::client::CLIENT)
        .args(args);
    common::run_command(command, b"", Stdio::piped(), Duration::from_secs(30))
}

fn describe_in(dir: &Path, args: &[&str], output: &Output) -> String {
    let command = format!("(in {}) {}", dir.display(), common::client::CLIENT);
    common::describe(&command, args, output)
}

#[test]
fn a_run_beyond_its_cgroup_memory_limit_is_refused_with_the_limit_named() {
    with_time_limit(LIMIT, || {
        let Some(cgroup) = MemoryCgroup::new(1 << 30) else {
            return;
        };
        let closed = common::client::closed_port();
        // The case: 40 connections of 64 MiB in a 1 GiB cgroup was
        // killed by the OOM killer (exit 137) with no summary.
        let addr = closed.addr().to_string();
        let args = [&addr, "--connections", "40", "--size", "64MiB", "-q"];
        let output = run_client_in(&cgroup.dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let describe = describe_in(&cgroup.dir, &args, &output);
        assert_eq!(output.status.code(), Some(2), "{describe}");
        assert_eq!(stderr.lines().count(), 1, "{describe}");
        assert!(
            stderr.contains("the run needs about 2.6 GiB")
                && stderr.contains("left of this cgroup's 1 GiB limit (memory."),
            "{describe}"
        );
    });
}

#[test]
fn a_udp_run_beyond_its_cgroup_memory_limit_is_refused_naming_its_flows() {
    with_time_limit(LIMIT, || {
        let Some(cgroup) = MemoryCgroup::new(64 << 20) else {
            return;
        };
        let closed = common::client::closed_port();
        // 10,000 numbered flows, each with records for the 1,024 datagrams
        // it may have in flight and its histogram: far over 64 MiB.
        let addr = closed.addr().to_string();
        let args = [
            &addr,
            "--udp",
            "--connections",
            "10000",
            "--size",
            "64",
            "--interval",
            "1ms",
            "-q",
        ];
        let output = run_client_in(&cgroup.dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let describe = describe_in(&cgroup.dir, &args, &output);
        assert_eq!(output.status.code(), Some(2), "{describe}");
        assert_eq!(stderr.lines().count(), 1, "{describe}");
        assert!(
            stderr.contains("the run needs about")
                && stderr.contains("10000 flows")
                && stderr.contains("left of this cgroup's 64 MiB limit (memory."),
            "{describe}"
        );
    });
}

#[test]
fn a_memory_limit_on_a_parent_cgroup_refuses_a_run_in_a_group_under_it() {
    with_time_limit(LIMIT, || {
        // A systemd slice with MemoryMax=, the client in a scope under it;
        // the review's run in the child group was killed (137).
        let Some(mut cgroup) = MemoryCgroup::new(1 << 30) else {
            return;
        };
        let inner = cgroup.child("inner");
        let closed = common::client::closed_port();
        let addr = closed.addr().to_string();
        let args = [&addr, "--connections", "40", "--size", "64MiB", "-q"];
        let output = run_client_in(&inner, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let describe = describe_in(&inner, &args, &output);
        assert_eq!(output.status.code(), Some(2), "{describe}");
        assert_eq!(stderr.lines().count(), 1, "{describe}");
        let limit = format!(
            "left of the 1 GiB limit of {}, a cgroup above this one (memory.",
            cgroup.name()
        );
        assert!(
            stderr.contains("the run needs about 2.6 GiB") && stderr.contains(&limit),
            "expected {limit:?}\n{describe}"
        );
    });
}

/// A process that holds memory until killed: `tail` keeps every byte of
/// a line until the line ends, and `sleep` keeps the line open (for two
/// minutes at most, should the test die before it kills it).
struct MemoryHolder(std::process::Child);

impl MemoryHolder {
    fn start_in(dir: &Path, mib: u64) -> MemoryHolder {
        let script =
            format!("echo $$ > \"$1\" && {{ head -c {mib}M /dev/zero; exec sleep 120; }} | tail");
        let child = Command::new("sh")
            .args(["-c", &script, "sh"])
            .arg(dir.join("cgroup.procs"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        MemoryHolder(child)
    }
}

impl Drop for MemoryHolder {
    fn drop(&mut self) {
        // The cgroup's drop kills the pipeline's other processes.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_run_that_fits_the_limit_but_not_what_is_left_of_it_is_refused() {
    with_time_limit(LIMIT, || {
        let Some(cgroup) = MemoryCgroup::new(1 << 30) else {
            return;
        };
        // The review's case: another process in the group holds 400 MiB,
        // and 10 connections of 64 MiB (about 704 MiB) were let in, then
        // OOM-killed.
        let _holder = MemoryHolder::start_in(&cgroup.dir, 400);
        let held = common::wait_until(Duration::from_secs(60), || cgroup.usage() >= 400 << 20);
        assert!(
            held,
            "the holder should have brought the cgroup to 400 MiB; it uses {} bytes",
            cgroup.usage()
        );
        let closed = common::client::closed_port();
        let addr = closed.addr().to_string();
        let args = [&addr, "--connections", "10", "--size", "64MiB", "-q"];
        let output = run_client_in(&cgroup.dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let describe = describe_in(&cgroup.dir, &args, &output);
        assert_eq!(output.status.code(), Some(2), "{describe}");
        assert_eq!(stderr.lines().count(), 1, "{describe}");
        assert!(
            stderr.contains("left of this cgroup's 1 GiB limit"),
            "{describe}"
        );
    });
}

#[test]
fn report_every_with_json_prints_json_lines_then_the_summary_object() {
    with_time_limit(LIMIT, || {
        let server = server_for(10);
        let run = run_client(
            &[
                &server.local_addr().to_string(),
                "--connections",
                "4",
                "--rate",
                "400",
                "--duration",
                "1s",
                "--report-every",
                "200ms",
                "--json",
            ],
            b"",
            Duration::from_secs(60),
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let lines = run.json_lines();
        let (summary, intervals) = lines.split_last().expect("at least the summary");
        assert_eq!(
            summary.keys()[..JSON_KEYS.len()],
            JSON_KEYS,
            "{}",
            run.describe()
        );
        // One second in 200 ms steps, and the closing checks' short tail.
        assert!(
            (5..=8).contains(&intervals.len()),
            "{} intervals\n{}",
            intervals.len(),
            run.describe()
        );
        let mut start = 0.0;
        let mut echoes = 0.0;
        for interval in intervals {
            assert_eq!(
                interval.keys(),
                [
                    "start_s",
                    "end_s",
                    "echoes",
                    "echoes_per_s",
                    "bytes_echoed",
                    "mb_per_s",
                    "p50_ms",
                    "p99_ms",
                    "open",
                    "errors"
                ],
                "{}",
                run.describe()
            );
            // Each interval starts where the last one ended.
            assert_eq!(
                interval.number("start_s"),
                Some(start),
                "{}",
                run.describe()
            );
            start = interval.number("end_s").expect("end_s");
            echoes += interval.number("echoes").expect("echoes");
        }
        // Every echo of the run is in exactly one interval.
        assert_eq!(Some(echoes), summary.number("echoed"), "{}", run.describe());
    });
}

#[test]
fn buffers_follow_the_echoes_in_flight_not_the_connections() {
    with_time_limit(LIMIT, || {
        common::need_open_files(2 * 2_000 + 100);
        let server = server_for(2_000);
        // 2,000 connections of 1 MiB messages would hold 2 GiB if each kept
        // its buffer; at 20 echoes a second, a handful are ever out.
        let child = Command::new(common::client::CLIENT)
            .args([
                &server.local_addr().to_string(),
                "--connections",
                "2000",
                "--size",
                "1MiB",
                "--rate",
                "20",
                "--duration",
                "2s",
                "--timeout",
                "30s",
                "-q",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the client binary starts");
        let pid = child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, writing into locals that outlive it.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
        // wait4 reaped it above, keeping its rusage, which wait() cannot
        // give; dropping the Child neither waits nor kills.
        drop(child);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the client ended with status {status}"
        );
        let peak_mib = usage.ru_maxrss / 1024;
        assert!(
            peak_mib < 256,
            "2,000 connections of 1 MiB at 20 echoes/s peaked at {peak_mib} MiB"
        );
    });
}

/// Echoes like any server, except that each connection stalls once, for
/// `stall`, on its first read `after` it was accepted.
fn stalls_each_connection_once(stream: TcpStream, after: Duration, stall: Duration) {
    let began = Instant::now();
    let mut reader = stream.try_clone().expect("clone the accepted socket");
    let mut writer = stream;
    let mut buf = [0u8; 4096];
    let mut stalled = false;
    loop {
        let read = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if !stalled && began.elapsed() >= after {
            stalled = true;
            std::thread::sleep(stall);
        }
        if writer.write_all(&buf[..read]).is_err() {
            return;
        }
    }
}

/// Every connection stalls for a second, half a second in.
fn stalls_early(stream: TcpStream) {
    stalls_each_connection_once(stream, Duration::from_millis(500), Duration::from_secs(1));
}

/// Every connection stalls for a second, two seconds in.
fn stalls_late(stream: TcpStream) {
    stalls_each_connection_once(stream, Duration::from_secs(2), Duration::from_secs(1));
}

/// Echoes on the first connection accepted; closes every other at once.
fn serves_only_its_first_connection(stream: TcpStream, number: usize) {
    if number == 0 {
        common::client::std_echo(stream);
    }
}

/// The rate's books balance: every echo due was sent or counted unsent.
fn assert_due_is_sent_plus_unsent(report: &client::Report) {
    let rate = report.rate.clone().expect("a rate run reports its rate");
    assert_eq!(
        rate.due,
        report.sent + rate.unsent,
        "due should be sent + unsent: {rate:?}\n{}",
        report.summary(false)
    );
}

#[test]
fn a_stop_during_a_stall_counts_the_echoes_due_and_unsent() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(stalls_early);
        let config = ClientConfig {
            rate: Some(1000),
            repeat: 0,
            duration: Some(Duration::from_secs(5)),
            connections: NonZeroUsize::new(10).expect("not zero"),
            ..config_for(server.addr())
        };
        let stop = StopHandle::new();
        let stopper = stop.clone();
        // Stopped 0.7 s into the second-long stall: some 700 echoes are
        // due then with every connection's echo out.
        let stopping = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1200));
            stopper.stop();
        });
        let report = client::run(&config, &|_| {}, &stop).expect("valid config");
        stopping.join().expect("the stopping thread");
        assert_due_is_sent_plus_unsent(&report);
        let rate = report.rate.clone().expect("a rate run reports its rate");
        assert!(
            rate.unsent >= 100 && !rate.kept(),
            "{rate:?}\n{}",
            report.summary(false)
        );
        // The server stalled, not the client: more threads would not help.
        let summary = report.summary(false);
        assert!(
            summary.contains("every connection had an echo out") && !summary.contains("--threads"),
            "{summary}"
        );
    });
}

#[test]
fn a_loop_whose_connections_all_ended_still_owes_its_share_of_the_rate() {
    with_time_limit(LIMIT, || {
        // One connection of two is closed at once: its loop has nothing
        // left to send on for the two seconds of the run.
        let server = TestServer::start_numbered(serves_only_its_first_connection);
        let config = ClientConfig {
            rate: Some(1000),
            repeat: 0,
            duration: Some(Duration::from_secs(2)),
            connections: NonZeroUsize::new(2).expect("not zero"),
            threads: NonZeroUsize::new(2),
            ..config_for(server.addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert_due_is_sent_plus_unsent(&report);
        let rate = report.rate.clone().expect("a rate run reports its rate");
        // Half of 2,000 due went nowhere; a slow machine sends less of the
        // other half, never more.
        assert!(
            rate.due >= 1_500 && rate.unsent >= 500 && !rate.kept(),
            "{rate:?}\n{}",
            report.summary(false)
        );
        assert!(
            report.summary(false).contains("could not keep --rate 1000"),
            "{}",
            report.summary(false)
        );
    });
}

#[test]
fn a_rate_starts_while_connect_rate_is_still_opening_connections() {
    with_time_limit(LIMIT, || {
        let server = server_for(100);
        // 100 connects at 10 a second take 10 s; the run lasts 2.
        let config = ClientConfig {
            rate: Some(100),
            repeat: 0,
            duration: Some(Duration::from_secs(2)),
            connections: NonZeroUsize::new(100).expect("not zero"),
            connect_rate: Some(10),
            threads: NonZeroUsize::new(2),
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert_due_is_sent_plus_unsent(&report);
        // About 200 due on the connections open so far.
        assert!(
            report.sent >= 50 && report.echoed == report.sent,
            "{}",
            report.summary(false)
        );
    });
}

#[test]
fn a_stall_at_the_end_of_a_run_stays_in_the_percentiles() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(stalls_late);
        let config = ClientConfig {
            rate: Some(1000),
            repeat: 0,
            duration: Some(Duration::from_secs(3)),
            connections: NonZeroUsize::new(10).expect("not zero"),
            ..config_for(server.addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert_due_is_sent_plus_unsent(&report);
        let rate = report.rate.clone().expect("a rate run reports its rate");
        // The last second's echoes were due and never sent: a third of the
        // run, each counted with its wait, so the p99 is most of a second.
        let p99 = report.rtt.percentile(0.99).expect("echoes came back");
        assert!(
            rate.unsent >= 100 && rate.lower_bounds >= rate.unsent,
            "{rate:?}\n{}",
            report.summary(false)
        );
        assert!(
            p99 >= Duration::from_millis(300),
            "p99 {p99:?}\n{}",
            report.summary(false)
        );
    });
}

#[test]
fn connect_rate_does_not_catch_up_in_a_burst_after_the_client_was_held_up() {
    with_time_limit(LIMIT, || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("bound address");
        let accepting = echo_and_time_accepts(listener, 150);
        let mut child = Command::new(common::client::CLIENT)
            .args([
                &addr.to_string(),
                "--connections",
                "150",
                "--connect-rate",
                "50",
                "--threads",
                "2",
                "--timeout",
                "30s",
                "-q",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the client binary starts");
        // Held up for two seconds a second in: 100 connect slots missed.
        common::client::hold_up(&child, Duration::from_secs(1), Duration::from_secs(2));
        let status = child.wait().expect("the client ends");
        assert!(status.success(), "the client ended with {status}");
        let accepted = accepting.join().expect("the accepting thread");
        // At 50 a second, a quarter second holds about 13 (and one more per
        // loop); a catch-up would put the 100 missed slots in one burst.
        let window = Duration::from_millis(250);
        let most = (0..accepted.len())
            .map(|first| {
                accepted[first..]
                    .iter()
                    .take_while(|at| **at - accepted[first] < window)
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(
            most < 50,
            "{most} connects within {window:?} at --connect-rate 50"
        );
    });
}

#[test]
fn a_message_that_memory_cannot_hold_at_a_rate_counts_as_unsent() {
    with_time_limit(LIMIT, || {
        let server = server_for(10);
        let addr = server.local_addr().to_string();
        let args = [
            addr.as_str(),
            "--size",
            "64MiB",
            "--rate",
            "10",
            "--duration",
            "1s",
            "--json",
        ];
        let mut command = Command::new(common::client::CLIENT);
        command.args(args);
        // Room for the program, not for one 64 MiB message.
        common::limit_address_space(&mut command, 60 << 20);
        let output = common::run_command(
            command,
            b"",
            std::process::Stdio::piped(),
            Duration::from_secs(60),
        );
        let context = common::describe(common::client::CLIENT, &args, &output);
        assert_eq!(output.status.code(), Some(1), "{context}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = Json::parse(stdout.trim_end()).unwrap_or_else(|e| panic!("{e}\n{context}"));
        let rate = summary.get("rate").expect("a rate object");
        // The echo fell due and was taken, but never went.
        assert_eq!(summary.number("sent"), Some(0.0), "{context}");
        assert_eq!(rate.number("due"), Some(1.0), "{context}");
        assert_eq!(rate.number("unsent"), Some(1.0), "{context}");
    });
}

#[test]
fn the_loops_share_of_a_rate_interleaves_instead_of_starting_together() {
    with_time_limit(LIMIT, || {
        let server = server_for(2);
        // 4 echoes at 4 a second on 2 loops: due at 0, 0.25, 0.5 and 0.75 s.
        // Loops starting together would send two at 0 and two at 0.5 s.
        let config = ClientConfig {
            connections: NonZeroUsize::new(2).expect("not zero"),
            threads: NonZeroUsize::new(2),
            rate: Some(4),
            repeat: 2,
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        assert_eq!(report.echoed, 4, "{}", report.summary(false));
        // A slow machine only makes the run longer.
        assert!(
            report.elapsed >= Duration::from_millis(700),
            "the last echo went out at {:?}, before its 0.75 s\n{}",
            report.elapsed,
            report.summary(false)
        );
    });
}

#[test]
fn a_client_held_up_under_a_rate_sends_what_it_owes_as_buffers_come_back() {
    with_time_limit(LIMIT, || {
        let server = server_for(64);
        // At 8 echoes a second with a 250 ms timeout, the memory check
        // counts 2 messages of 2 MiB out at once. Held up for 4 s, the
        // client owes 32 echoes and has 64 free connections: sent all at
        // once they would hold 64 MiB.
        let mut child = Command::new(common::client::CLIENT)
            .args([
                &server.local_addr().to_string(),
                "--connections",
                "64",
                "--threads",
                "2",
                "--size",
                "2MiB",
                "--rate",
                "8",
                "--timeout",
                "250ms",
                "--duration",
                "6s",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the client binary starts");
        // Read while it runs.
        let status_path = format!("/proc/{}/status", child.id());
        common::client::hold_up(&child, Duration::from_secs(1), Duration::from_secs(4));
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).map(|_| text)
        });
        let mut peak_kib = 0u64;
        // The peak resident set, until the client exits.
        while let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak_kib = kib;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("the client ends");
        let stdout = reader
            .join()
            .expect("the reader thread")
            .expect("read the client's stdout");
        let peak_mib = peak_kib / 1024;
        assert!(
            peak_mib < 32,
            "late echoes of 2 MiB peaked at {peak_mib} MiB: {stdout}"
        );
        // Sent all at once, they also timed out, the server being unable
        // to echo 64 MiB within 250 ms.
        assert!(status.success(), "the client ended with {status}: {stdout}");
        let summary = Json::parse(stdout.trim_end()).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
        let late = summary
            .get("rate")
            .and_then(|rate| rate.number("late"))
            .unwrap_or(0.0);
        // Not a vacuous pass: the hold-up left many echoes owed at once.
        assert!(late >= 16.0, "only {late} echoes were late: {stdout}");
    });
}

/// Accepts on `listener` until `stop`, echoing each connection on a thread
/// of its own; returns how many it accepted.
fn count_accepts(
    listener: TcpListener,
    stop: std::sync::Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    listener
        .set_nonblocking(true)
        .expect("a nonblocking listener");
    std::thread::spawn(move || {
        let mut accepted = 0;
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    stream.set_nonblocking(false).expect("a blocking stream");
                    std::thread::spawn(move || common::client::std_echo(stream));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        accepted
    })
}

#[test]
fn connections_not_yet_started_when_the_schedule_is_through_never_start() {
    with_time_limit(LIMIT, || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("bound address").to_string();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let accepting = count_accepts(listener, std::sync::Arc::clone(&stop));
        // Ten echoes at 100 a second are through in a tenth of a second,
        // on the first connection; the next would open half a second in.
        let run = run_client(
            &[
                &addr,
                "--rate",
                "100",
                "--repeat",
                "1",
                "--connections",
                "10",
                "--connect-rate",
                "2",
                "--threads",
                "1",
                "-q",
            ],
            b"",
            Duration::from_secs(60),
        );
        stop.store(true, Ordering::SeqCst);
        let accepted = accepting.join().expect("the accepting thread");
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            accepted <= 5,
            "{accepted} connections opened for a schedule through on the first\n{}",
            run.describe()
        );
    });
}

/// Echoes each message 40 ms after it came whole (11-byte greetings are
/// not used here: `--size 1000`).
fn echoes_1000_bytes_40ms_late(mut stream: TcpStream) {
    let mut message = [0u8; 1000];
    while stream.read_exact(&mut message).is_ok() {
        std::thread::sleep(Duration::from_millis(40));
        if stream.write_all(&message).is_err() {
            return;
        }
    }
}

#[test]
fn a_rate_held_back_by_its_message_buffers_says_so_not_too_few_connections() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(echoes_1000_bytes_40ms_late);
        // 100 a second with a 100 ms timeout: 10 messages counted. Held up
        // for a second, the client owes 100 echoes with 40 connections
        // free: the buffers hold it back, not the connections.
        let child = Command::new(common::client::CLIENT)
            .args([
                &server.addr().to_string(),
                "--size",
                "1000",
                "--connections",
                "40",
                "--threads",
                "1",
                "--rate",
                "100",
                "--timeout",
                "100ms",
                "--duration",
                "3s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the client binary starts");
        common::client::hold_up(&child, Duration::from_secs(1), Duration::from_secs(1));
        let output = child.wait_with_output().expect("the client ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("as many --size messages were out as the memory check counted"),
            "{stdout}"
        );
    });
}
