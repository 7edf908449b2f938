//! The `echo-client` binary as a user sees it: its output lines, summary,
//! JSON, stdin mode, exit codes 0/1/2, one-line errors naming address and
//! cause, and Ctrl-C (a real SIGINT) ending an endless run with a summary.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{CLIENT, EchoServer, JSON_KEYS, Json, TestServer, run_client};
use common::{limit_address_space, run_command, run_with_io, with_time_limit};

/// The most one client process may run; it is killed after that.
const LIMIT: Duration = Duration::from_secs(60);
/// The most one test may take. Its first child that runs past [`LIMIT`]
/// fails it well before this.
const TEST_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn prints_connected_each_echo_and_a_ping_style_summary() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--repeat", "3"], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(
            lines[0],
            format!("connected to {addr}"),
            "{}",
            run.describe()
        );
        for (seq, line) in lines.iter().enumerate().take(4).skip(1) {
            let prefix = format!("Server echoed: Hello Echo! (seq={seq} time=");
            assert!(
                line.starts_with(&prefix) && line.ends_with(" ms)"),
                "line {seq}: {}",
                run.describe()
            );
        }
        assert_eq!(lines[4], "", "{}", run.describe());
        assert_eq!(lines[5], format!("--- {addr} echo statistics ---"));
        assert!(
            lines[6].starts_with("3 sent, 3 echoed, 0 mismatched, 0 timed out, 0% loss, time "),
            "{}",
            run.describe()
        );
        assert!(
            lines[7].starts_with("rtt min/avg/max/mdev = "),
            "{}",
            run.describe()
        );
        assert!(
            lines[8].starts_with("rtt p50/p90/p99/p99.9 = "),
            "{}",
            run.describe()
        );
        assert!(lines[9].starts_with("throughput "), "{}", run.describe());
        assert_eq!(run.stderr, "", "{}", run.describe());
    });
}

#[test]
fn single_echo_has_no_throughput_line() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(&[&server.addr().to_string()], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("1 sent, 1 echoed"),
            "{}",
            run.describe()
        );
        assert!(!run.stdout.contains("throughput"), "{}", run.describe());
    });
}

#[test]
fn binary_payload_lines_show_the_size_not_the_bytes() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(
            &[
                &server.addr().to_string(),
                "--size",
                "64KiB",
                "--repeat",
                "2",
                "--histogram",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout
                .contains("Server echoed: 65536 bytes (seq=1 time="),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout
                .contains("Server echoed: 65536 bytes (seq=2 time="),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("rtt histogram (2 exact echoes"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn json_mode_prints_exactly_one_object_on_stdout() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(
            &[
                &server.addr().to_string(),
                "--json",
                "--repeat",
                "4",
                "--connections",
                "2",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert_eq!(run.stdout.lines().count(), 1, "{}", run.describe());
        let json = Json::parse(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
        assert_eq!(json.keys(), JSON_KEYS);
        assert_eq!(
            json.get("rtt_ms").map(Json::keys),
            Some(vec![
                "min", "avg", "max", "mdev", "p50", "p90", "p99", "p999"
            ])
        );
        assert_eq!(
            (json.number("sent"), json.number("echoed")),
            (Some(8.0), Some(8.0)),
            "{}",
            run.describe()
        );
        assert_eq!(json.number("errors"), Some(0.0));
    });
}

#[test]
fn stdin_mode_echoes_each_line_until_end_of_input() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(
            &[&server.addr().to_string(), "--stdin"],
            b"alpha\nbeta gamma\n",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("Server echoed: alpha (seq=1 time="),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout
                .contains("Server echoed: beta gamma (seq=2 time="),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("2 sent, 2 echoed"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn quiet_prints_only_the_summary_and_no_progress_when_stderr_is_not_a_terminal() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(
            &[&server.addr().to_string(), "-q", "--repeat", "200"],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(!run.stdout.contains("Server echoed"), "{}", run.describe());
        assert!(!run.stdout.contains("connected to"), "{}", run.describe());
        assert!(
            run.stdout.contains("200 sent, 200 echoed"),
            "{}",
            run.describe()
        );
        assert_eq!(run.stderr, "", "{}", run.describe());
    });
}

#[test]
fn twenty_connections_report_their_throughput() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let run = run_client(
            &[
                &server.addr().to_string(),
                "-q",
                "--connections",
                "20",
                "--repeat",
                "10",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("200 sent, 200 echoed"),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("echoes/s") && run.stdout.contains("(20 connections)"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn works_against_a_plain_std_echo_server() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(common::client::std_echo);
        let run = run_client(
            &[
                &server.addr().to_string(),
                "--size",
                "1MiB",
                "--repeat",
                "3",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("3 sent, 3 echoed, 0 mismatched"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn server_that_never_answers_exits_1_after_about_the_timeout() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(common::client::never_answers);
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--timeout", "1s"], b"", Duration::from_secs(10));
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert!(
            run.elapsed >= Duration::from_millis(900),
            "{}",
            run.describe()
        );
        assert_eq!(
            run.stderr,
            format!("echo-client: echo 1 to {addr} timed out after 1s\n"),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout
                .contains("1 sent, 0 echoed, 0 mismatched, 1 timed out, 100% loss"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn an_error_in_a_quiet_run_on_a_terminal_takes_the_progress_line_s_place() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(common::client::never_answers);
        let addr = server.addr().to_string();
        let (mut terminal, client_side) = open_terminal();
        // The timeout leaves room for progress lines at 1 s and 2 s first.
        let mut child = {
            let mut command = Command::new(CLIENT);
            command
                .args([&addr, "-q", "--timeout", "3s"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(client_side));
            // Dropping `command` closes our copy of the terminal's client
            // side, so reading ends when the client exits.
            command.spawn().expect("spawn echo-client")
        };
        let mut shown = Vec::new();
        // Linux ends a terminal's reads with EIO once no process holds the
        // other side; what came before is all there.
        let _ = terminal.read_to_end(&mut shown);
        let status = child.wait().expect("wait for echo-client");
        let shown = String::from_utf8_lossy(&shown);
        assert_eq!(status.code(), Some(1), "{shown:?}");
        let error = format!("echo-client: echo 1 to {addr} timed out after 3s");
        let at = shown
            .find(&error)
            .unwrap_or_else(|| panic!("no {error:?} in {shown:?}"));
        assert!(
            shown[..at].contains("0 echoes, 0/s, 0 failed"),
            "no progress line before the error: {shown:?}"
        );
        // Without the erase, the error would follow the progress text on
        // its line.
        assert!(
            shown[..at].ends_with("\r\x1b[K"),
            "the error does not start a clean line: {shown:?}"
        );
    });
}

/// A new pseudo-terminal: our side, and the side a child writes to.
fn open_terminal() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut ours, mut theirs) = (-1, -1);
    // SAFETY: openpty writes two descriptors, which we then own alone; the
    // name, settings and size pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut ours,
            &mut theirs,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [ours, theirs] {
        // Close-on-exec, so that children of tests running alongside do not
        // hold the terminal open; the client's stderr is a copy without it.
        // SAFETY: fcntl on a descriptor we own.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(rc, 0, "FD_CLOEXEC: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are open and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(ours),
            std::os::fd::OwnedFd::from_raw_fd(theirs),
        )
    }
}

#[test]
fn server_that_corrupts_one_byte_exits_1_with_a_mismatch_message() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(common::client::corrupts_one_byte);
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--size", "100"], b"", LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        let prefix =
            format!("echo-client: echo 1 from {addr} mismatched: byte 5 of 100 came back as ");
        assert!(
            run.stderr.starts_with(&prefix),
            "expected {prefix:?}...\n{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("1 sent, 0 echoed, 1 mismatched"),
            "{}",
            run.describe()
        );
    });
}

#[test]
fn server_that_echoes_half_and_closes_exits_1() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(common::client::echoes_half_then_closes);
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--size", "1000", "--repeat", "5"], b"", LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        let prefix = format!("echo-client: echo 1: {addr} closed the connection after ");
        assert!(
            run.stderr.starts_with(&prefix),
            "expected {prefix:?}...\n{}",
            run.describe()
        );
    });
}

#[test]
fn closed_port_exits_1_at_once_asking_whether_echo_server_runs_there() {
    with_time_limit(TEST_LIMIT, || {
        let closed = common::client::closed_port();
        let addr = closed.addr().to_string();
        let run = run_client(&[&addr, "--timeout", "30s"], b"", Duration::from_secs(10));
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert_eq!(
            run.stderr,
            format!(
                "echo-client: cannot connect to {addr}: connection refused; is echo-server \
                 running on {addr}?\n"
            )
        );
    });
}

#[test]
fn sigint_during_an_endless_run_prints_the_summary_and_exits_0() {
    stop_signal_ends_an_endless_run_with_the_summary(libc::SIGINT, 1);
}

#[test]
fn sigterm_during_an_endless_run_prints_the_summary_and_exits_0() {
    stop_signal_ends_an_endless_run_with_the_summary(libc::SIGTERM, 1);
}

/// What `timeout 10 echo-client --repeat 0` in a CI script sends: SIGTERM to
/// the client, then to its process group. One request, not two.
#[test]
fn sigterm_twice_at_once_prints_the_summary_and_exits_0() {
    stop_signal_ends_an_endless_run_with_the_summary(libc::SIGTERM, 2);
}

fn stop_signal_ends_an_endless_run_with_the_summary(signal: i32, times: usize) {
    with_time_limit(LIMIT, move || {
        let server = EchoServer::start();
        let mut child = Command::new(CLIENT)
            .args([
                &server.addr().to_string(),
                "--repeat",
                "0",
                "--interval",
                "10ms",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the client binary starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut seen = String::new();
        while seen.matches("Server echoed").count() < 3 {
            let mut line = String::new();
            let read = stdout
                .read_line(&mut line)
                .expect("reading the client's stdout");
            assert!(
                read > 0,
                "the client ended before being interrupted:\n{seen}"
            );
            seen.push_str(&line);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        for _ in 0..times {
            let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            assert_eq!(sent, 0, "kill({signal}) failed");
        }
        let interrupted = Instant::now();
        stdout
            .read_to_string(&mut seen)
            .expect("reading the client's stdout");
        let mut stderr = String::new();
        let mut pipe = child.stderr.take().expect("stderr is piped");
        pipe.read_to_string(&mut stderr)
            .expect("reading the client's stderr");
        let status = child.wait().expect("waiting for the client");
        let context = format!("status {status}\n--- stdout ---\n{seen}\n--- stderr ---\n{stderr}");
        assert_eq!(status.code(), Some(0), "{context}");
        assert!(seen.contains("echo statistics ---"), "{context}");
        assert!(
            seen.contains(" 0 mismatched, 0 timed out, 0% loss"),
            "{context}"
        );
        assert!(interrupted.elapsed() < Duration::from_secs(20), "{context}");
    });
}

#[test]
fn output_that_cannot_be_written_stops_the_run_with_one_line_and_exit_1() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        for extra in [&[][..], &["--json"], &["-q"]] {
            let mut args = vec![addr.as_str(), "--repeat", "3"];
            args.extend_from_slice(extra);
            // Every write to /dev/full fails with ENOSPC.
            let full = std::fs::File::options()
                .write(true)
                .open("/dev/full")
                .expect("open /dev/full");
            let output = run_with_io(CLIENT, &args, b"", Stdio::from(full), LIMIT);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.code() == Some(1)
                    && stderr.lines().count() == 1
                    && stderr.starts_with("echo-client: cannot write to stdout: "),
                "{CLIENT} {args:?} > /dev/full: expected exit 1 and one line naming stdout, \
                 got {} and stderr:\n{stderr}",
                output.status
            );
        }
    });
}

#[test]
fn usage_errors_exit_2_with_one_line_naming_the_flag_and_value() {
    with_time_limit(TEST_LIMIT, || {
        let cases: &[(&[&str], &[&str])] = &[
            (&["--timeout", "abc"], &["--timeout", "abc"]),
            (&["--timeout", "0"], &["--timeout", "0"]),
            (&["--interval", "soon"], &["--interval", "soon"]),
            (&["--repeat", "-1"], &["--repeat", "-1"]),
            (&["--repeat", "many"], &["--repeat", "many"]),
            (&["--repeat", "+5"], &["--repeat", "+5"]),
            (&["--connections", "+5"], &["--connections", "+5"]),
            (&["--size", "0"], &["--size", "0"]),
            (&["--size", "1GiB"], &["--size", "1GiB", "at most 64MiB"]),
            (&["--size", "ten"], &["--size", "ten"]),
            (&["--connections", "0"], &["--connections", "0"]),
            // The limits of the event-loop engine, which runs --reconnect too.
            (
                &["--connections", "100001"],
                &["--connections", "100001", "100000"],
            ),
            (
                &["--connections", "18446744073709551615"],
                &["--connections", "100000"],
            ),
            (
                &["--connections", "100001", "--reconnect"],
                &["--connections", "100001", "100000"],
            ),
            (&["--threads", "0"], &["--threads", "0"]),
            (&["--rate", "0"], &["--rate", "0"]),
            (&["--connect-rate", "x"], &["--connect-rate", "x"]),
            (&["--duration", "0s"], &["--duration", "0s"]),
            (&["--duration", "1s", "--stdin"], &["--duration", "--stdin"]),
            (
                &["--rate", "10", "--interval", "1s"],
                &["--interval", "--rate"],
            ),
            (
                &["--connect-rate", "10", "--udp"],
                &["--connect-rate", "--udp"],
            ),
            (&["--message", ""], &["--message", "''"]),
            (&["nonsense"], &["addr", "nonsense"]),
            (&["127.0.0.1"], &["addr", "127.0.0.1"]),
            (&["localhost:99999"], &["addr", "localhost:99999"]),
            (&["::1:9999"], &["addr", "::1:9999"]),
            (&["[::1]"], &["addr", "[::1]"]),
            (&[":9999"], &["addr", ":9999"]),
            (&["--bogus"], &["--bogus"]),
            (
                &["--size", "10", "--message", "hi"],
                &["--size", "--message"],
            ),
            (&["--stdin", "--repeat", "3"], &["--stdin", "--repeat"]),
            (&["--json", "--histogram"], &["--json", "--histogram"]),
        ];
        for (args, named) in cases {
            let run = run_client(args, b"", LIMIT);
            assert_eq!(run.code(), Some(2), "{}", run.describe());
            assert_eq!(run.stdout, "", "{}", run.describe());
            assert!(
                run.stderr.starts_with("echo-client: ") && run.stderr.lines().count() == 1,
                "expected one line starting with 'echo-client: '\n{}",
                run.describe()
            );
            for word in *named {
                assert!(
                    run.stderr.contains(word),
                    "expected {word:?} in the message\n{}",
                    run.describe()
                );
            }
        }
    });
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    with_time_limit(TEST_LIMIT, || {
        let run = run_client(&["--help"], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.starts_with("Usage: echo-client"),
            "{}",
            run.describe()
        );
        assert!(run.stdout.contains("event loops"), "{}", run.describe());
        assert_eq!(run.stderr, "");
    });
}

#[test]
fn version_prints_the_package_version() {
    with_time_limit(TEST_LIMIT, || {
        let run = run_client(&["--version"], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert_eq!(
            run.stdout,
            format!("echo-client {}\n", env!("CARGO_PKG_VERSION"))
        );
    });
}

#[test]
fn a_message_that_memory_cannot_hold_is_one_line_and_exit_1() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let args = [addr.as_str(), "--size", "64MiB", "-q"];
        let mut command = Command::new(CLIENT);
        command.args(args);
        // Room for the program, not for one 64 MiB message.
        limit_address_space(&mut command, 60 << 20);
        let output = run_command(command, b"", Stdio::piped(), LIMIT);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let context = common::describe(CLIENT, &args, &output);
        assert_eq!(output.status.code(), Some(1), "{context}");
        assert_eq!(
            stderr.trim_end(),
            "echo-client: cannot allocate 67108864 bytes for a message: out of memory",
            "{context}"
        );
    });
}
