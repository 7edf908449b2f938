//! `echo-client --udp` as a load generator: thousands of flows on a few
//! event loops (`--threads`) with every echo checked, `--rate` sending the
//! datagrams it was asked for over every flow (and saying no more than it
//! sent when `--repeat` ends it), `--duration` ending the sending (counted
//! from when the sockets are open), `--report-every` as JSON Lines before
//! the summary (its bytes echoed counted as the summary's), a rate the
//! client cannot keep said so in the summary, a stop ending a hundred flows
//! of one loop together, and a loop that cannot be made failing only its own
//! flows (in the intervals too). Counts, not timings: a loaded 2-core
//! machine only makes a run slower, and every bound here holds however slow
//! it is; the one time bound, on the stop, leaves five times what it needs
//! and half what the flows took ending one after another.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::num::NonZeroUsize;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::{CLIENT, Json, Run, run_client};
use common::udp::{Reply, UdpTestServer};
use common::{ServerProcess, limit_open_files, need_open_files, run_command, with_time_limit};
use echo_chamber::client::udp::{self, UdpEvent, UdpInterval};
use echo_chamber::client::{ClientConfig, Payload, StopHandle};

/// The most one client process may run; it is killed after that.
const LIMIT: Duration = Duration::from_secs(60);
/// The most one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// Runs the client with `--udp --json` and `args` against `addr`; the
/// summary is the last line of stdout.
fn run_json(addr: &str, args: &[&str]) -> (Run, Json) {
    let mut all = vec![addr, "--udp", "--json"];
    all.extend_from_slice(args);
    let run = run_client(&all, b"", LIMIT);
    let last = run.stdout.lines().last().unwrap_or_default();
    let json = Json::parse(last).unwrap_or_else(|err| {
        panic!(
            "the last line is not one JSON object ({err})\n{}",
            run.describe()
        )
    });
    (run, json)
}

fn count(run: &Run, json: &Json, key: &str) -> u64 {
    json.number(key)
        .unwrap_or_else(|| panic!("no number {key:?}\n{}", run.describe())) as u64
}

/// Threads of process `pid` now, from /proc; `None` once it is gone.
fn threads_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|rest| rest.trim().parse().ok())
}

#[test]
fn two_thousand_flows_on_two_threads_all_echo_exactly_with_a_handful_of_threads() {
    with_time_limit(TEST_LIMIT, || {
        const FLOWS: u64 = 2000;
        const REPEAT: u64 = 3;
        need_open_files(FLOWS + 200);
        let server = ServerProcess::start(&["--udp", "--workers", "2"]);
        let addr = server.addr.to_string();
        let mut child = Command::new(CLIENT)
            .args([&addr, "--udp", "--json", "--size", "64"])
            .args(["--connections", &FLOWS.to_string(), "--threads", "2"])
            .args(["--repeat", &REPEAT.to_string(), "--interval", "500ms"])
            // A slow machine may be slow to echo; nothing may count lost.
            .args(["--timeout", "20s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the client binary starts");
        let pid = child.id();
        // Sample the client's threads until it exits (or the test limit).
        let mut most = 0;
        let mut samples = 0;
        let began = Instant::now();
        while child.try_wait().expect("waiting for the client").is_none() {
            if let Some(threads) = threads_of(pid) {
                most = most.max(threads);
                samples += 1;
            }
            assert!(began.elapsed() < LIMIT, "the client ran past {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("waiting for the client");
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut stdout)
            .expect("reading stdout");
        child
            .stderr
            .take()
            .expect("stderr is piped")
            .read_to_string(&mut stderr)
            .expect("reading stderr");
        let describe = format!(
            "status {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- server ---\n{}",
            server.log()
        );
        let json = Json::parse(&stdout).unwrap_or_else(|err| panic!("{err}\n{describe}"));
        for (key, value) in [
            ("sent", FLOWS * REPEAT),
            ("echoed", FLOWS * REPEAT),
            ("lost", 0),
            ("corrupted", 0),
            ("duplicated", 0),
            ("foreign", 0),
            ("errors", 0),
        ] {
            assert_eq!(json.number(key), Some(value as f64), "{key}\n{describe}");
        }
        assert_eq!(status.code(), Some(0), "{describe}");
        // Two loops, the main thread, the stop watcher and the signal
        // threads: a handful, where a thread per flow made 2,000.
        assert!(samples > 0, "the client was never seen running\n{describe}");
        assert!(
            most <= 12,
            "the client ran {most} threads for {FLOWS} flows on 2 loops\n{describe}"
        );
    });
}

#[test]
fn rate_sends_about_rate_times_duration_over_every_flow() {
    with_time_limit(TEST_LIMIT, || {
        const FLOWS: usize = 20;
        const RATE: u64 = 2000;
        let per_port = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
        let seen = Arc::clone(&per_port);
        let server = UdpTestServer::start_seeing(move |from, datagram| {
            *seen.lock().expect("ports").entry(from.port()).or_default() += 1;
            vec![Reply::now(datagram)]
        });
        let (run, json) = run_json(
            &server.addr().to_string(),
            &[
                "--size",
                "64",
                "--rate",
                &RATE.to_string(),
                "--duration",
                "1s",
                "--connections",
                &FLOWS.to_string(),
                "--max-loss",
                "100%",
            ],
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let sent = count(&run, &json, "sent");
        // The schedule makes at most the rate times the duration due, and
        // each flow at most one more; a slow machine sends fewer, but not
        // half as many at this modest rate.
        assert!(
            sent <= RATE + FLOWS as u64 && sent >= RATE / 2,
            "sent {sent} at --rate {RATE} for 1s\n{}",
            run.describe()
        );
        let rate = json.get("rate").expect("a rate object");
        assert_eq!(
            rate.number("asked"),
            Some(RATE as f64),
            "{}",
            run.describe()
        );
        let per_port = per_port.lock().expect("ports");
        assert_eq!(
            per_port.len(),
            FLOWS,
            "every flow sends: {per_port:?}\n{}",
            run.describe()
        );
        // Each flow's share is a twentieth of the rate.
        let most = per_port.values().max().copied().unwrap_or(0);
        assert!(
            most <= RATE / FLOWS as u64 + 1,
            "one flow sent {most}: {per_port:?}\n{}",
            run.describe()
        );
    });
}

#[test]
fn duration_counts_from_when_every_socket_is_open() {
    with_time_limit(TEST_LIMIT, || {
        const RATE: u64 = 20;
        let server = UdpTestServer::echo();
        let config = ClientConfig {
            target: server.addr().to_string().parse().expect("a target"),
            payload: Payload::Generated {
                size: NonZeroUsize::new(64).expect("64 is not 0"),
            },
            repeat: 0,
            rate: Some(RATE),
            duration: Some(Duration::from_secs(1)),
            ..ClientConfig::default()
        };
        // The flow is told of as its socket opens: opening it takes 800 ms.
        let observer = |event: &UdpEvent<'_>| {
            if matches!(event, UdpEvent::Started { .. }) {
                std::thread::sleep(Duration::from_millis(800));
            }
        };
        let report = udp::run(&config, &observer, &StopHandle::new()).expect("a valid config");
        let rate = report.rate.expect("a --rate run reports its rate");
        // A second of schedule at 20 a second: 20 datagrams due, each sent
        // or (on a slow machine) counted unsent. Counting the second from
        // before the socket opened left 200 ms of it: 4 due.
        assert_eq!(report.counts.sent + rate.unsent, RATE, "{report:?}");
    });
}

#[test]
fn the_rate_sent_by_a_run_that_repeat_ends_is_at_most_the_rate_asked() {
    with_time_limit(TEST_LIMIT, || {
        let server = UdpTestServer::echo();
        // (rate, flows, datagrams per flow): 2 datagrams of one flow 50 ms
        // apart, or 4 flows' one each 12.5 ms apart, take 100 ms of turns.
        for (rate, flows, repeat) in [(20, 1, 2), (40, 4, 1)] {
            let config = ClientConfig {
                target: server.addr().to_string().parse().expect("a target"),
                payload: Payload::Generated {
                    size: NonZeroUsize::new(64).expect("64 is not 0"),
                },
                repeat,
                rate: Some(rate),
                connections: NonZeroUsize::new(flows).expect("flows are not 0"),
                ..ClientConfig::default()
            };
            let report = udp::run(&config, &|_: &UdpEvent<'_>| {}, &StopHandle::new())
                .expect("a valid config");
            let rate_line = report.rate.expect("a --rate run reports its rate");
            assert_eq!(report.counts.sent, flows as u64 * repeat, "{report:?}");
            // No datagram goes before its time, so a slow machine only
            // makes the rate sent lower. Counting the gaps between sends
            // rather than the turns said 40/s and 53/s.
            assert!(
                rate_line.achieved > 0.0 && rate_line.achieved <= rate as f64 * 1.01,
                "--rate {rate} over {flows} flows, {repeat} each: {rate_line:?}"
            );
        }
    });
}

#[test]
fn duration_ends_an_unlimited_run() {
    with_time_limit(TEST_LIMIT, || {
        let server = UdpTestServer::start(|_, datagram| vec![Reply::now(datagram)]);
        let (run, json) = run_json(
            &server.addr().to_string(),
            &["--duration", "300ms", "--interval", "10ms"],
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let sent = count(&run, &json, "sent");
        // 300 ms at 10 ms apart: at most 30, and a few at least.
        assert!((1..=30).contains(&sent), "sent {sent}\n{}", run.describe());
        assert_eq!(count(&run, &json, "echoed"), sent, "{}", run.describe());
    });
}

#[test]
fn report_every_with_json_gives_json_lines_then_the_summary() {
    with_time_limit(TEST_LIMIT, || {
        let server = UdpTestServer::start(|_, datagram| vec![Reply::now(datagram)]);
        let (run, summary) = run_json(
            &server.addr().to_string(),
            &[
                "--size",
                "64",
                "--rate",
                "500",
                "--duration",
                "1s",
                "--connections",
                "4",
                "--report-every",
                "200ms",
            ],
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert!(lines.len() >= 3, "{}", run.describe());
        let (intervals, _) = lines.split_at(lines.len() - 1);
        let (mut sent, mut echoes) = (0, 0);
        for line in intervals {
            let interval = Json::parse(line)
                .unwrap_or_else(|err| panic!("{err}: {line:?} is not JSON\n{}", run.describe()));
            assert_eq!(
                interval.keys(),
                [
                    "start_s",
                    "end_s",
                    "sent",
                    "echoes",
                    "echoes_per_s",
                    "bytes_echoed",
                    "mb_per_s",
                    "p50_ms",
                    "p99_ms",
                    "lost",
                    "errors"
                ],
                "{}",
                run.describe()
            );
            sent += count(&run, &interval, "sent");
            echoes += count(&run, &interval, "echoes");
        }
        // The intervals add up to the summary, which comes last.
        assert_eq!(sent, count(&run, &summary, "sent"), "{}", run.describe());
        assert_eq!(
            echoes,
            count(&run, &summary, "echoed"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn intervals_count_the_bytes_of_late_echoes_as_the_summary_does() {
    with_time_limit(TEST_LIMIT, || {
        const SIZE: u64 = 64;
        // The first datagram comes back 300 ms late for its 200 ms timeout,
        // while the flow still sends; the others at once.
        let server = UdpTestServer::start(|index, datagram| {
            if index == 1 {
                vec![Reply::later(Duration::from_millis(300), datagram)]
            } else {
                vec![Reply::now(datagram)]
            }
        });
        let config = ClientConfig {
            target: server.addr().to_string().parse().expect("a target"),
            payload: Payload::Generated {
                size: NonZeroUsize::new(SIZE as usize).expect("not 0"),
            },
            repeat: 20,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(200),
            report_every: Some(Duration::from_millis(100)),
            ..ClientConfig::default()
        };
        let intervals = Mutex::new(Vec::new());
        let report = udp::run_with_intervals(
            &config,
            &|_: &UdpEvent<'_>| {},
            &|interval: &UdpInterval| intervals.lock().expect("intervals").push(interval.clone()),
            &StopHandle::new(),
        )
        .expect("a valid config");
        let intervals = intervals.into_inner().expect("intervals");
        let (echoes, bytes) = intervals.iter().fold((0, 0), |(echoes, bytes), interval| {
            (echoes + interval.echoes, bytes + interval.bytes_echoed)
        });
        let counts = report.counts;
        assert_eq!(
            (counts.sent, counts.echoed, counts.lost, counts.late),
            (20, 19, 1, 1),
            "{report:?}"
        );
        assert_eq!(echoes, counts.echoed, "{intervals:?}");
        // 19 echoes in time and the late one, in the summary and the
        // intervals alike; the intervals once left the late one out.
        assert_eq!(report.bytes_echoed, 20 * SIZE, "{report:?}");
        assert_eq!(bytes, report.bytes_echoed, "{intervals:?}\n{report:?}");
    });
}

#[test]
fn rate_with_interval_is_refused_naming_both() {
    with_time_limit(TEST_LIMIT, || {
        let run = run_client(
            &[
                "127.0.0.1:9",
                "--udp",
                "--rate",
                "100",
                "--interval",
                "10ms",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(2), "{}", run.describe());
        assert_eq!(run.stdout, "", "{}", run.describe());
        assert!(
            run.stderr.starts_with("echo-client: ")
                && run.stderr.lines().count() == 1
                && run.stderr.contains("--rate")
                && run.stderr.contains("--interval"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn a_rate_the_client_cannot_keep_is_said_with_the_numbers() {
    with_time_limit(TEST_LIMIT, || {
        // One --message flow keeps one datagram in flight, and each echo
        // takes 100 ms: ten a second at most, of the hundred asked.
        let server = UdpTestServer::start(|_, datagram| {
            vec![Reply::later(Duration::from_millis(100), datagram)]
        });
        let addr = server.addr().to_string();
        let args = [
            "--message",
            "slow",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--timeout",
            "5s",
        ];
        let mut all = vec![addr.as_str(), "--udp", "-q"];
        all.extend_from_slice(&args);
        let run = run_client(&all, b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("rate 100/s asked")
                && run.stdout.contains("the client could not keep --rate 100")
                && run.stdout.contains("window full"),
            "{}",
            run.describe()
        );
        let (run, json) = run_json(&addr, &args);
        let rate = json.get("rate").expect("a rate object");
        assert_eq!(
            rate.get("kept"),
            Some(&Json::Bool(false)),
            "{}",
            run.describe()
        );
        let achieved = rate.number("achieved").expect("achieved");
        assert!(achieved < 50.0, "achieved {achieved}\n{}", run.describe());
    });
}

#[test]
fn a_stop_with_datagrams_out_on_a_hundred_flows_of_one_loop_ends_them_together() {
    with_time_limit(TEST_LIMIT, || {
        const FLOWS: u64 = 100;
        // A server that never answers: every flow has datagrams out at the
        // stop, and no ICMP error comes back for them.
        let received = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&received);
        let server = UdpTestServer::start(move |_, _| {
            seen.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        });
        let addr = server.addr().to_string();
        let mut child = Command::new(CLIENT)
            .args([addr.as_str(), "--udp", "--json", "--size", "64"])
            .args(["--connections", &FLOWS.to_string(), "--threads", "1"])
            .args(["--repeat", "0", "--interval", "100ms", "--max-loss", "100%"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the client binary starts");
        // Every flow has sent (so the client is up and its signals are
        // handled) before the stop.
        let began = Instant::now();
        while received.load(Ordering::SeqCst) < FLOWS {
            assert!(
                began.elapsed() < LIMIT,
                "the server saw {} datagrams in {LIMIT:?}",
                received.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(sent, 0, "kill(SIGINT) failed");
        let stopped = Instant::now();
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut stdout)
            .expect("reading the client's stdout");
        let status = child.wait().expect("waiting for the client");
        let took = stopped.elapsed();
        let json = Json::parse(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}"));
        let (sent, lost) = (json.number("sent"), json.number("lost"));
        assert!(
            sent.is_some_and(|sent| sent >= FLOWS as f64) && sent == lost,
            "every datagram sent is lost: {stdout}"
        );
        assert_eq!(status.code(), Some(0), "{stdout}");
        // One second of patience before any echo, then 100 ms of listening,
        // for every flow at once: about 1.1 s. Flows that took their
        // listening one after another took 1 s + 100 × 0.1 s.
        assert!(
            took < Duration::from_secs(6),
            "the stop of {FLOWS} flows on one loop took {took:?}: {stdout}"
        );
    });
}

#[test]
fn a_loop_that_cannot_be_made_fails_its_flows_and_the_others_run() {
    with_time_limit(TEST_LIMIT, || {
        const FLOWS: u64 = 100;
        let server = UdpTestServer::start(|_, datagram| vec![Reply::now(datagram)]);
        let addr = server.addr().to_string();
        let args = [
            addr.as_str(),
            "--udp",
            "--json",
            "--connections",
            "100",
            "--threads",
            "2",
        ];
        let mut command = Command::new(CLIENT);
        command.args(args);
        // The first loop's flows take the last descriptors, so the second
        // loop gets no epoll.
        limit_open_files(&mut command, 48);
        let output = run_command(command, b"", Stdio::piped(), LIMIT);
        let run = Run::from_output(&args, &output, Duration::ZERO);
        let json =
            Json::parse(&run.stdout).unwrap_or_else(|err| panic!("{err}\n{}", run.describe()));
        let (sent, echoed, errors) = (
            count(&run, &json, "sent"),
            count(&run, &json, "echoed"),
            count(&run, &json, "errors"),
        );
        assert!(
            run.stderr
                .contains("cannot make an event loop for the flow"),
            "{}",
            run.describe()
        );
        // Each flow either sent its datagram or failed; those that sent
        // were echoed.
        assert!(sent > 0 && errors >= FLOWS / 2, "{}", run.describe());
        assert_eq!(sent + errors, FLOWS, "{}", run.describe());
        assert_eq!(echoed, sent, "{}", run.describe());
        assert_eq!(run.code(), Some(1), "{}", run.describe());
    });
}

#[test]
fn the_flows_of_a_loop_that_cannot_be_made_count_in_the_intervals_too() {
    with_time_limit(TEST_LIMIT, || {
        let server = UdpTestServer::start(|_, datagram| vec![Reply::now(datagram)]);
        let addr = server.addr().to_string();
        let args = [
            addr.as_str(),
            "--udp",
            "--json",
            "--connections",
            "100",
            "--threads",
            "2",
            "--report-every",
            "100ms",
        ];
        let mut command = Command::new(CLIENT);
        command.args(args);
        // As above: the second loop gets no epoll.
        limit_open_files(&mut command, 48);
        let output = run_command(command, b"", Stdio::piped(), LIMIT);
        let run = Run::from_output(&args, &output, Duration::ZERO);
        let lines = run.json_lines();
        let Some((summary, intervals)) = lines.split_last() else {
            panic!("no output\n{}", run.describe());
        };
        let sum = |key: &str| -> u64 {
            intervals
                .iter()
                .map(|interval| count(&run, interval, key))
                .sum()
        };
        assert!(
            run.stderr
                .contains("cannot make an event loop for the flow"),
            "{}",
            run.describe()
        );
        let errors = count(&run, summary, "errors");
        assert!(errors >= 50, "{}", run.describe());
        // Every flow that failed is in an interval, the loop's too.
        assert_eq!(sum("errors"), errors, "{}", run.describe());
        assert_eq!(
            sum("sent"),
            count(&run, summary, "sent"),
            "{}",
            run.describe()
        );
    });
}
