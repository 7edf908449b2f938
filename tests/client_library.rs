//! The client library as a specification: against the in-process server, a
//! plain std echo server and small misbehaving servers, `client::run` and
//! `client::run_lines` must count, compare and time exactly, fail within the
//! timeout, and stop when told.

mod common;

use std::io::{self, Cursor, Read};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::client::{EchoServer, JSON_KEYS, Json, TestServer};
use common::with_time_limit;
use echo_chamber::client::{self, ClientConfig, ConfigError, Event, Payload, Report, StopHandle};

const LIMIT: Duration = Duration::from_secs(60);

fn config_for(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        target: addr
            .to_string()
            .parse()
            .expect("a socket address is a target"),
        ..ClientConfig::default()
    }
}

fn generated(size: usize) -> Payload {
    Payload::Generated {
        size: NonZeroUsize::new(size).expect("sizes in these tests are positive"),
    }
}

/// Everything the observer saw, as owned values.
#[derive(Debug, Default)]
struct Seen {
    connected: Vec<(usize, SocketAddr)>,
    echoed: Vec<(usize, u64, Vec<u8>)>,
    failures: Vec<String>,
}

fn run_and_record(config: &ClientConfig, stop: &StopHandle) -> (Report, Seen) {
    let seen = Mutex::new(Seen::default());
    let report =
        client::run(config, &|event: &Event<'_>| record(&seen, event), stop).expect("valid config");
    (report, seen.into_inner().expect("observer did not panic"))
}

fn record(seen: &Mutex<Seen>, event: &Event<'_>) {
    let mut seen = seen.lock().expect("observer did not panic");
    match event {
        Event::Connected { connection, peer } => seen.connected.push((*connection, *peer)),
        Event::Echoed {
            connection,
            seq,
            message,
            ..
        } => seen.echoed.push((*connection, *seq, message.to_vec())),
        Event::Failed(failure) => seen.failures.push(failure.to_string()),
        // These tests do not reconnect.
        Event::Reconnected { .. } => {}
    }
}

#[test]
fn repeat_sends_exactly_that_many_echoes_over_one_connection() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let config = ClientConfig {
            repeat: 25,
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(
            report.is_success(),
            "report: {report:#?}\nfailures: {:?}",
            seen.failures
        );
        assert_eq!(
            (report.sent, report.echoed, report.rtt.count()),
            (25, 25, 25)
        );
        assert_eq!(seen.connected, vec![(1, server.addr())]);
        let seqs: Vec<u64> = seen.echoed.iter().map(|(_, seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
        assert!(
            seen.echoed
                .iter()
                .all(|(_, _, message)| message == b"Hello Echo!")
        );
        assert_eq!(report.bytes_sent, 25 * 11);
        assert_eq!(report.bytes_echoed, 25 * 11);
    });
}

#[test]
fn sizes_from_one_byte_to_one_mebibyte_come_back_exact() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        for size in [
            1,
            2,
            7,
            1460,
            4096,
            65_535,
            65_536,
            65_537,
            300_001,
            1 << 20,
        ] {
            let config = ClientConfig {
                payload: generated(size),
                repeat: 2,
                ..config_for(server.addr())
            };
            let (report, seen) = run_and_record(&config, &StopHandle::new());
            assert!(
                report.is_success(),
                "size {size}: {report:#?}\nfailures: {:?}",
                seen.failures
            );
            assert_eq!((report.sent, report.echoed), (2, 2), "size {size}");
            assert_eq!(report.bytes_echoed, 2 * size as u64, "size {size}");
            let lengths: Vec<usize> = seen.echoed.iter().map(|(_, _, m)| m.len()).collect();
            assert_eq!(lengths, vec![size, size], "size {size}");
            if size > 16 {
                assert_ne!(
                    seen.echoed[0].2, seen.echoed[1].2,
                    "generated messages must differ (size {size})"
                );
            }
        }
    });
}

#[test]
fn twenty_connections_each_do_all_their_echoes() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let config = ClientConfig {
            connections: NonZeroUsize::new(20).expect("20 is positive"),
            repeat: 10,
            payload: generated(512),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(
            report.is_success(),
            "report: {report:#?}\nfailures: {:?}",
            seen.failures
        );
        assert_eq!(
            (report.sent, report.echoed, report.connections),
            (200, 200, 20)
        );
        let mut connections: Vec<usize> = seen.connected.iter().map(|(c, _)| *c).collect();
        connections.sort_unstable();
        assert_eq!(connections, (1..=20).collect::<Vec<_>>());
        for connection in 1..=20 {
            let seqs: Vec<u64> = seen
                .echoed
                .iter()
                .filter(|(c, _, _)| *c == connection)
                .map(|(_, seq, _)| *seq)
                .collect();
            assert_eq!(
                seqs,
                (1..=10).collect::<Vec<_>>(),
                "connection {connection}"
            );
        }
        assert!(
            report.summary(false).contains("echoes/s"),
            "throughput line missing:\n{}",
            report.summary(false)
        );
    });
}

#[test]
fn lines_mode_sends_each_line_as_one_message_until_end_of_input() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let input = Cursor::new(b"one\ntwo\n\nlast without newline".to_vec());
        let seen = Mutex::new(Seen::default());
        let report = client::run_lines(
            &config_for(server.addr()),
            input,
            &|event: &Event<'_>| record(&seen, event),
            &StopHandle::new(),
        )
        .expect("valid config");
        let seen = seen.into_inner().expect("observer did not panic");
        assert!(
            report.is_success(),
            "report: {report:#?}\nfailures: {:?}",
            seen.failures
        );
        let messages: Vec<Vec<u8>> = seen.echoed.into_iter().map(|(_, _, m)| m).collect();
        let expected: Vec<Vec<u8>> = vec![
            b"one\n".to_vec(),
            b"two\n".to_vec(),
            b"\n".to_vec(),
            b"last without newline".to_vec(),
        ];
        assert_eq!(messages, expected);
        assert_eq!((report.sent, report.echoed), (4, 4));
    });
}

#[test]
fn json_report_is_one_object_with_the_documented_keys() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let config = ClientConfig {
            repeat: 5,
            ..config_for(server.addr())
        };
        let (report, _) = run_and_record(&config, &StopHandle::new());
        let json =
            Json::parse(&report.to_json()).unwrap_or_else(|e| panic!("{e}: {}", report.to_json()));
        assert_eq!(json.keys(), JSON_KEYS);
        let rtt = json.get("rtt_ms").expect("rtt_ms present");
        assert_eq!(
            rtt.keys(),
            ["min", "avg", "max", "mdev", "p50", "p90", "p99", "p999"]
        );
        assert_eq!(json.number("sent"), Some(5.0));
        assert_eq!(json.number("echoed"), Some(5.0));
        let (min, max) = (
            rtt.number("min").expect("min"),
            rtt.number("max").expect("max"),
        );
        for key in ["avg", "p50", "p90", "p99", "p999"] {
            let value = rtt.number(key).expect("a number with samples");
            assert!(
                min <= value && value <= max,
                "{key} = {value} outside min {min} .. max {max}"
            );
        }
    });
}

#[test]
fn json_report_without_echoes_has_null_round_trip_times() {
    with_time_limit(LIMIT, || {
        let closed = common::client::closed_port();
        let config = ClientConfig {
            timeout: Duration::from_secs(30),
            ..config_for(closed.addr())
        };
        let (report, _) = run_and_record(&config, &StopHandle::new());
        let json =
            Json::parse(&report.to_json()).unwrap_or_else(|e| panic!("{e}: {}", report.to_json()));
        assert_eq!(
            json.get("rtt_ms").and_then(|r| r.get("p50")),
            Some(&Json::Null)
        );
        assert_eq!(json.number("errors"), Some(1.0));
    });
}

#[test]
fn works_against_a_plain_std_echo_server() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::std_echo);
        let config = ClientConfig {
            repeat: 20,
            payload: generated(100_000),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(
            report.is_success(),
            "report: {report:#?}\nfailures: {:?}",
            seen.failures
        );
        assert_eq!((report.sent, report.echoed), (20, 20));
    });
}

#[test]
fn server_that_never_answers_times_out_after_about_the_timeout() {
    with_time_limit(Duration::from_secs(10), || {
        let server = TestServer::start(common::client::never_answers);
        let config = ClientConfig {
            repeat: 3,
            timeout: Duration::from_secs(1),
            ..config_for(server.addr())
        };
        let started = Instant::now();
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900),
            "gave up after {elapsed:?}, before the 1s timeout"
        );
        assert!(!report.is_success());
        assert_eq!(
            (report.sent, report.echoed, report.timed_out),
            (1, 0, 1),
            "{report:#?}"
        );
        let expected = format!("echo 1 to {} timed out after 1s", server.addr());
        assert_eq!(seen.failures, vec![expected]);
    });
}

#[test]
fn a_timeout_says_how_much_of_the_echo_came_back() {
    with_time_limit(Duration::from_secs(10), || {
        let server = TestServer::start(common::client::echoes_half_then_stalls);
        let config = ClientConfig {
            timeout: Duration::from_millis(500),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert_eq!((report.sent, report.timed_out), (1, 1), "{report:#?}");
        // The server echoes half of what its first read got: usually 5 of
        // the 11 bytes of "Hello Echo!", fewer if the read came up short.
        let prefix = format!("echo 1 to {} timed out after 500ms, with ", server.addr());
        let received = seen
            .failures
            .first()
            .and_then(|failure| failure.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(" of 11 bytes back"))
            .and_then(|count| count.parse::<usize>().ok());
        assert!(
            matches!(received, Some(1..=5)),
            "expected {prefix:?}N of 11 bytes back, got {:?}",
            seen.failures
        );
    });
}

#[test]
fn large_message_to_a_server_that_never_reads_times_out_instead_of_blocking_in_write() {
    with_time_limit(Duration::from_secs(10), || {
        let server = TestServer::start(common::client::never_reads);
        let config = ClientConfig {
            payload: generated(16 << 20),
            timeout: Duration::from_secs(1),
            ..config_for(server.addr())
        };
        let started = Instant::now();
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900),
            "gave up after {elapsed:?}, before the 1s timeout"
        );
        assert_eq!(
            (report.sent, report.timed_out),
            (1, 1),
            "{report:#?}\nfailures: {:?}",
            seen.failures
        );
    });
}

#[test]
fn server_that_corrupts_one_byte_is_reported_as_a_mismatch() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::corrupts_one_byte);
        let config = ClientConfig {
            repeat: 3,
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(!report.is_success());
        // Only the first echo holds the corrupted 6th byte (the space of "Hello Echo!",
        // 0x20, flipped to 0x21); the stream stays in step.
        assert_eq!(
            (report.sent, report.echoed, report.mismatched),
            (3, 2, 1),
            "{report:#?}"
        );
        let expected = format!(
            "echo 1 from {} mismatched: byte 5 of 11 came back as 0x21, sent 0x20",
            server.addr()
        );
        assert_eq!(seen.failures, vec![expected]);
    });
}

#[test]
fn server_that_echoes_half_and_closes_is_an_error() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::echoes_half_then_closes);
        let config = ClientConfig {
            repeat: 3,
            payload: generated(1000),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(!report.is_success());
        assert_eq!(
            (report.sent, report.echoed, report.errors),
            (1, 0, 1),
            "{report:#?}"
        );
        assert_eq!(seen.failures.len(), 1, "{:?}", seen.failures);
        let prefix = format!("echo 1: {} closed the connection after ", server.addr());
        assert!(
            seen.failures[0].starts_with(&prefix) && seen.failures[0].ends_with(" of 1000 bytes"),
            "expected {prefix:?}... of 1000 bytes, got {:?}",
            seen.failures[0]
        );
    });
}

#[test]
fn a_reset_says_how_much_of_the_echo_had_come_back() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::echoes_five_bytes_then_resets);
        let (report, seen) = run_and_record(&config_for(server.addr()), &StopHandle::new());
        assert_eq!((report.sent, report.errors), (1, 1), "{report:#?}");
        assert_eq!(
            seen.failures,
            [format!(
                "echo 1 to {} failed: connection reset by peer, with 5 of 11 bytes back",
                server.addr()
            )]
        );
    });
}

#[test]
fn replaying_server_is_caught_by_generated_payloads() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::replays_first_chunk);
        let config = ClientConfig {
            repeat: 3,
            payload: generated(64),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert_eq!(
            (report.echoed, report.mismatched),
            (1, 2),
            "{report:#?}\nfailures: {:?}",
            seen.failures
        );
    });
}

#[test]
fn closed_port_fails_at_once_not_after_the_timeout() {
    with_time_limit(Duration::from_secs(10), || {
        let closed = common::client::closed_port();
        let addr = closed.addr();
        let config = ClientConfig {
            timeout: Duration::from_secs(30),
            ..config_for(addr)
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(!report.is_success());
        assert_eq!((report.sent, report.errors), (0, 1));
        assert_eq!(
            seen.failures,
            vec![format!(
                "cannot connect to {addr}: connection refused; is echo-server running on {addr}?"
            )]
        );
    });
}

#[test]
fn stop_ends_an_endless_run_which_still_counts_as_success() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let config = ClientConfig {
            repeat: 0,
            ..config_for(server.addr())
        };
        let stop = StopHandle::new();
        let echoes = Mutex::new(0u64);
        let observer = |event: &Event<'_>| {
            if let Event::Echoed { .. } = event {
                let mut echoes = echoes.lock().expect("observer did not panic");
                *echoes += 1;
                if *echoes == 50 {
                    stop.stop();
                }
            }
        };
        let report = client::run(&config, &observer, &stop).expect("valid config");
        assert!(report.stopped && report.is_success(), "{report:#?}");
        assert_eq!((report.sent, report.echoed), (50, 50));
    });
}

#[test]
fn stop_cuts_an_interval_pause_short() {
    with_time_limit(Duration::from_secs(20), || {
        let server = EchoServer::start();
        let config = ClientConfig {
            repeat: 0,
            interval: Duration::from_secs(3600),
            ..config_for(server.addr())
        };
        let stop = StopHandle::new();
        let observer = |event: &Event<'_>| {
            if let Event::Echoed { .. } = event {
                stop.stop();
            }
        };
        let report = client::run(&config, &observer, &stop).expect("valid config");
        assert_eq!((report.sent, report.echoed), (1, 1), "{report:#?}");
    });
}

/// Input that never delivers a line, like a terminal nobody types into.
struct SilentInput;

impl Read for SilentInput {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(0)
    }
}

#[test]
fn stop_ends_lines_mode_while_it_waits_for_input() {
    with_time_limit(Duration::from_secs(20), || {
        let server = EchoServer::start();
        let stop = StopHandle::new();
        let observer = |event: &Event<'_>| {
            if let Event::Connected { .. } = event {
                stop.stop();
            }
        };
        let input = io::BufReader::new(SilentInput);
        let report = client::run_lines(&config_for(server.addr()), input, &observer, &stop)
            .expect("valid config");
        assert!(report.stopped && report.is_success(), "{report:#?}");
        assert_eq!(report.sent, 0);
    });
}

#[test]
fn connects_to_ipv6_loopback_in_brackets() {
    with_time_limit(LIMIT, || {
        let Ok(server) = TestServer::start_on("[::1]:0", common::client::std_echo) else {
            eprintln!("skipped: this machine has no IPv6 loopback");
            return;
        };
        let target = format!("[::1]:{}", server.addr().port());
        let config = ClientConfig {
            target: target.parse().expect("bracketed IPv6 parses"),
            ..ClientConfig::default()
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(
            report.is_success(),
            "{report:#?}\nfailures: {:?}",
            seen.failures
        );
        assert_eq!(seen.connected, vec![(1, server.addr())]);
        assert!(
            report
                .summary(false)
                .starts_with(&format!("--- {target} echo statistics ---"))
        );
    });
}

#[test]
fn empty_message_is_refused_before_connecting() {
    with_time_limit(LIMIT, || {
        let config = ClientConfig {
            payload: Payload::Text(Vec::new()),
            ..config_for(common::client::closed_port().addr())
        };
        let result = client::run(&config, &|_: &Event<'_>| {}, &StopHandle::new());
        assert_eq!(result.err(), Some(ConfigError::EmptyMessage));
    });
}

#[test]
fn too_many_connections_or_too_large_a_message_is_refused_before_connecting() {
    with_time_limit(LIMIT, || {
        let base = config_for(common::client::closed_port().addr());
        let too_many = ClientConfig {
            connections: NonZeroUsize::new(client::MAX_CONNECTIONS + 1).expect("not zero"),
            ..base.clone()
        };
        let too_large = ClientConfig {
            payload: Payload::Generated {
                size: NonZeroUsize::new(client::MAX_MESSAGE + 1).expect("not zero"),
            },
            ..base
        };
        let run = |config: &ClientConfig| {
            client::run(config, &|_: &Event<'_>| {}, &StopHandle::new()).err()
        };
        assert_eq!(run(&too_many), Some(ConfigError::TooManyConnections));
        assert_eq!(run(&too_large), Some(ConfigError::MessageTooLarge));
    });
}

#[test]
fn lines_mode_stops_at_a_line_longer_than_the_largest_message() {
    with_time_limit(LIMIT, || {
        let server = EchoServer::start();
        let mut input = b"short\n".to_vec();
        input.resize(input.len() + client::MAX_MESSAGE + 1, b'x');
        input.extend_from_slice(b"\nnever sent\n");
        let seen = Mutex::new(Seen::default());
        let report = client::run_lines(
            &config_for(server.addr()),
            Cursor::new(input),
            &|event: &Event<'_>| record(&seen, event),
            &StopHandle::new(),
        )
        .expect("valid config");
        let seen = seen.into_inner().expect("observer did not panic");
        assert_eq!((report.sent, report.echoed), (1, 1), "report: {report:#?}");
        assert!(!report.is_success(), "report: {report:#?}");
        assert_eq!(
            seen.failures,
            vec!["cannot read standard input: line 2 is longer than 64 MiB".to_string()],
        );
    });
}

#[test]
fn bytes_a_server_adds_after_the_last_echo_are_an_error() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::adds_bytes_after_two_greetings);
        let config = ClientConfig {
            repeat: 2,
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(!report.is_success());
        assert_eq!(
            (report.sent, report.echoed, report.mismatched, report.errors),
            (2, 2, 0, 1),
            "{report:#?}"
        );
        let expected = format!(
            "after echo 2, {} sent 5 more bytes than it received",
            server.addr()
        );
        assert_eq!(seen.failures, vec![expected]);
    });
}

#[test]
fn a_server_that_never_closes_after_the_last_echo_is_not_an_error() {
    with_time_limit(LIMIT, || {
        // It holds the connection for 30 s; the client's wait is bounded by
        // the 2 s timeout at most.
        let server = TestServer::start(common::client::echoes_but_never_closes);
        let config = ClientConfig {
            repeat: 2,
            timeout: Duration::from_secs(2),
            ..config_for(server.addr())
        };
        let started = Instant::now();
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        let wall = started.elapsed();
        assert!(
            report.is_success(),
            "{report:#?}\nfailures: {:?}",
            seen.failures
        );
        assert_eq!((report.sent, report.echoed), (2, 2), "{report:#?}");
        assert!(
            wall < Duration::from_secs(10),
            "the client waited {wall:?} for a server that never closes (timeout 2s)"
        );
        // The wait for the close lasts at least 100 ms and is not the run's time.
        assert!(
            wall.saturating_sub(report.elapsed) >= Duration::from_millis(100),
            "the report's time {:?} includes the closing wait (whole run {wall:?})",
            report.elapsed
        );
    });
}

#[test]
fn a_server_that_repeats_each_echo_fails_at_the_first_repeat() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::echoes_everything_twice);
        // The same text every time: comparing echoes alone cannot catch a
        // repeat, only the bytes queued behind an echo can.
        let config = ClientConfig {
            repeat: 3,
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        let len = b"Hello Echo!".len();
        let expected = format!(
            "after echo 1, {} sent {len} more bytes than it received",
            server.addr()
        );
        assert_eq!(seen.failures, [expected], "{report:#?}");
        assert_eq!(
            (report.sent, report.echoed, report.errors),
            (1, 1, 1),
            "{report:#?}"
        );
        assert!(!report.is_success(), "{report:#?}");
    });
}

#[test]
fn an_echo_complete_only_after_the_timeout_counts_as_timed_out() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::echoes_late);
        // Just under the server's delay: within the few milliseconds by
        // which a socket timeout can overshoot, so some echoes arrive whole
        // after the timeout has passed.
        let timeout = common::client::ECHO_DELAY - Duration::from_millis(2);
        let config = ClientConfig {
            timeout,
            connections: NonZeroUsize::new(20).expect("positive"),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert_eq!(
            (report.echoed, report.timed_out),
            (0, 20),
            "every echo took longer than {timeout:?}: {report:#?}\nfailures: {:?}",
            seen.failures
        );
    });
}

#[test]
fn bytes_sent_counts_only_what_the_kernel_took() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::never_reads);
        let len = client::MAX_MESSAGE;
        let config = ClientConfig {
            timeout: Duration::from_millis(500),
            payload: generated(len),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert_eq!(report.timed_out, 1, "{report:#?}");
        // The most a peer that never reads can leave in flight: our send
        // buffer and its receive buffer at their largest.
        let most = tcp_buffer_max("tcp_wmem") + tcp_buffer_max("tcp_rmem");
        assert!(
            report.bytes_sent <= most.min(len as u64),
            "{} bytes counted as sent; the kernel can hold {most}: {report:#?}",
            report.bytes_sent
        );
        let expected = format!(
            "echo 1 to {} timed out after 500ms while sending, with {} of {len} bytes sent",
            server.addr(),
            report.bytes_sent
        );
        assert_eq!(seen.failures, [expected], "{report:#?}");
    });
}

/// The third (largest) figure of `/proc/sys/net/ipv4/{name}`.
fn tcp_buffer_max(name: &str) -> u64 {
    let path = format!("/proc/sys/net/ipv4/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .nth(2)
        .and_then(|max| max.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no third figure in {text:?}"))
}

/// Runs `config` and stops it `after` the first event that `stop_at` picks;
/// returns the report, what the observer saw, and how long the run went on
/// after the stop.
fn run_and_stop(
    config: &ClientConfig,
    stop_at: impl Fn(&Event<'_>) -> bool + Sync,
    after: Duration,
) -> (Report, Seen, Duration) {
    let stop = StopHandle::new();
    let (picked, on_pick) = std::sync::mpsc::channel();
    let seen = Mutex::new(Seen::default());
    let (report, stopped_at) = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            let observe = |event: &Event<'_>| {
                if stop_at(event) {
                    // The test thread may have given up waiting.
                    let _ = picked.send(());
                }
                record(&seen, event);
            };
            client::run(config, &observe, &stop).expect("valid config")
        });
        on_pick
            .recv_timeout(Duration::from_secs(20))
            .expect("the event to stop at came");
        std::thread::sleep(after);
        stop.stop();
        let stopped_at = Instant::now();
        (run.join().expect("the run does not panic"), stopped_at)
    });
    let seen = seen.into_inner().expect("observer did not panic");
    (report, seen, stopped_at.elapsed())
}

#[test]
fn a_stop_ends_an_echo_still_out_without_waiting_for_the_timeout() {
    with_time_limit(LIMIT, || {
        // A short message is written, then read with socket timeouts; a
        // large one goes through poll(2). Both must notice the stop.
        for payload in [Payload::Text(b"Hello Echo!".to_vec()), generated(1 << 20)] {
            let server = TestServer::start(common::client::never_answers);
            let len = match &payload {
                Payload::Text(text) => text.len(),
                Payload::Generated { size } => size.get(),
            };
            let config = ClientConfig {
                timeout: Duration::from_secs(50),
                payload,
                ..config_for(server.addr())
            };
            // Long enough for the message to be out and the client waiting.
            let connected = |event: &Event<'_>| matches!(event, Event::Connected { .. });
            let (report, seen, took) = run_and_stop(&config, connected, Duration::from_millis(300));
            let expected = format!(
                "echo 1 to {} was still out when the run was stopped, with 0 of {len} bytes back",
                server.addr()
            );
            assert_eq!(seen.failures, [expected], "{report:#?}");
            assert_eq!(
                (report.sent, report.echoed, report.errors),
                (1, 0, 1),
                "{report:#?}"
            );
            // Nowhere near the 50 s timeout, with room for a loaded machine.
            assert!(
                took < Duration::from_secs(10),
                "the run took {took:?} after the stop"
            );
        }
    });
}

#[test]
fn a_stop_lets_a_slow_but_answering_server_finish_the_echo_in_flight() {
    with_time_limit(LIMIT, || {
        // Each echo takes about 400 ms. Stopped early in echo 4, the
        // patience follows the round trips seen so far; stopped early in
        // echo 1, with none seen yet, it is a second.
        let server = TestServer::start(common::client::echoes_late);
        let config = ClientConfig {
            repeat: 0,
            ..config_for(server.addr())
        };
        let connected = |event: &Event<'_>| matches!(event, Event::Connected { .. });
        let (report, seen, _) = run_and_stop(&config, connected, Duration::from_millis(20));
        assert!(seen.failures.is_empty(), "{:?}\n{report:#?}", seen.failures);
        assert_eq!((report.sent, report.echoed), (1, 1), "{report:#?}");
        let third = |event: &Event<'_>| matches!(event, Event::Echoed { seq: 3, .. });
        let (report, seen, _) = run_and_stop(&config, third, Duration::from_millis(20));
        assert!(seen.failures.is_empty(), "{:?}\n{report:#?}", seen.failures);
        assert_eq!((report.sent, report.echoed), (4, 4), "{report:#?}");
    });
}

#[test]
fn the_run_time_ends_at_the_last_echo_not_at_a_stop_during_the_pause_after_it() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::std_echo);
        let config = ClientConfig {
            repeat: 2,
            interval: Duration::from_secs(30),
            ..config_for(server.addr())
        };
        let began = Instant::now();
        let first_echo_seen = std::sync::OnceLock::new();
        let first = |event: &Event<'_>| {
            let first = matches!(event, Event::Echoed { seq: 1, .. });
            if first {
                // Only the first echo sets it; a second set would be ignored.
                let _ = first_echo_seen.set(began.elapsed());
            }
            first
        };
        // Stopped 500 ms into the 30 s pause before echo 2.
        let (report, seen, _) = run_and_stop(&config, first, Duration::from_millis(500));
        assert!(seen.failures.is_empty(), "{:?}\n{report:#?}", seen.failures);
        assert_eq!((report.sent, report.echoed), (1, 1), "{report:#?}");
        let seen_at = *first_echo_seen.get().expect("echo 1 came");
        // The run began after `began` and its last echo ended before the
        // observer saw it, so its time cannot be longer.
        assert!(
            report.elapsed <= seen_at,
            "the run's time {:?} goes past echo 1, which was seen {seen_at:?} in",
            report.elapsed
        );
    });
}

#[test]
fn a_server_that_resets_after_the_last_echo_is_not_an_error() {
    with_time_limit(LIMIT, || {
        let server = TestServer::start(common::client::echoes_then_resets);
        let config = ClientConfig {
            repeat: 3,
            payload: generated(200_000),
            ..config_for(server.addr())
        };
        let (report, seen) = run_and_record(&config, &StopHandle::new());
        assert!(
            report.is_success(),
            "{report:#?}\nfailures: {:?}",
            seen.failures
        );
    });
}
