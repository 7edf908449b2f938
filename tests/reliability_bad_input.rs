//! Bad input to the `echo-server` binary, the thin layer in front of the
//! flow: every flag with a wrong type or value, out of range or given twice,
//! an address that cannot be bound, a host that is not an address, output
//! whose reader has gone (both binaries). Each must
//! end in one line on stderr naming what was wrong and the documented exit
//! code (2 usage, 1 runtime), never a panic, a backtrace or a server that
//! quietly starts anyway.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Exit code of a usage error.
const USAGE: i32 = 2;
/// Exit code of a runtime error.
const RUNTIME: i32 = 1;

/// How long a rejected invocation may take; a server that starts instead is
/// still running after it.
const REJECT_WITHIN: Duration = Duration::from_secs(10);

/// One bad invocation and what must come of it.
struct Case {
    args: Vec<String>,
    code: i32,
    /// Text the error line must contain: the flag or the value.
    mentions: &'static str,
    /// The server's open-file limit (soft and hard), if the case sets one.
    open_files: Option<u64>,
}

fn case(args: &[&str], code: i32, mentions: &'static str) -> Case {
    Case {
        args: args.iter().map(|arg| arg.to_string()).collect(),
        code,
        mentions,
        open_files: None,
    }
}

/// Runs the server as `case` says, on loopback and port 0 unless the case
/// sets them, and kills it if it is still running after [`REJECT_WITHIN`].
fn run_briefly(case: &Case) -> (Vec<String>, Result<Output, String>) {
    let args = &case.args;
    let mut all: Vec<String> = Vec::new();
    if !args.iter().any(|arg| arg == "--bind") {
        all.extend(["--bind".into(), "127.0.0.1".into()]);
    }
    if !args.iter().any(|arg| arg == "--port") {
        all.extend(["--port".into(), "0".into()]);
    }
    all.extend(args.iter().cloned());
    let mut command = Command::new(SERVER_BIN);
    if let Some(open_files) = case.open_files {
        limit_open_files(&mut command, open_files);
    }
    let mut child = command
        .args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn echo-server");
    let started = Instant::now();
    let result = loop {
        match child.try_wait() {
            Ok(Some(_)) => break child.wait_with_output().map_err(|err| err.to_string()),
            Ok(None) if started.elapsed() < REJECT_WITHIN => {
                thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                // It is still running; it must not outlive the test.
                let _ = child.kill();
                let output = child.wait_with_output().map_err(|err| err.to_string());
                let stderr = output
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                break Err(format!(
                    "still running after {REJECT_WITHIN:?}: the bad input was accepted; stderr:\n{stderr}"
                ));
            }
            Err(err) => break Err(format!("wait: {err}")),
        }
    };
    (all, result)
}

/// What is wrong with how the binary answered `case`, if anything.
fn check(case: &Case) -> Option<String> {
    let (all, result) = run_briefly(case);
    let command = format!("echo-server {}", all.join(" "));
    let output = match result {
        Ok(output) => output,
        Err(problem) => return Some(format!("{command}: {problem}")),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let mut problems = Vec::new();
    if output.status.code() != Some(case.code) {
        problems.push(format!(
            "expected exit code {}, got {}",
            case.code, output.status
        ));
    }
    if stderr.contains("panicked") || stderr.contains("stack backtrace") {
        problems.push("panicked".into());
    }
    if lines.len() != 1 {
        problems.push(format!("expected one line on stderr, got {}", lines.len()));
    }
    if !lines
        .first()
        .is_some_and(|line| line.starts_with("echo-server: "))
    {
        problems.push("the line does not start with `echo-server: `".into());
    }
    if !stderr.contains(case.mentions) {
        problems.push(format!("the message does not mention {:?}", case.mentions));
    }
    if !output.stdout.is_empty() {
        problems.push("printed on stdout".into());
    }
    (!problems.is_empty()).then(|| {
        format!(
            "{command}: {}\n  stderr: {}",
            problems.join("; "),
            stderr.trim().replace('\n', "\n          ")
        )
    })
}

/// Runs every case and fails with all the problems at once.
fn assert_all(cases: &[Case]) {
    let problems: Vec<String> = cases.iter().filter_map(check).collect();
    assert!(
        problems.is_empty(),
        "{} of {} bad invocations were mishandled:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
}

#[test]
fn every_bad_flag_value_gets_one_line_and_exit_code_2() {
    with_time_limit(Duration::from_secs(120), || {
        assert_all(&[
            // Wrong type or value.
            case(&["--workers", "abc"], USAGE, "--workers"),
            case(&["--workers", "1.5"], USAGE, "--workers"),
            case(&["--workers", ""], USAGE, "--workers"),
            case(&["--port", "abc"], USAGE, "--port"),
            case(&["--port", ""], USAGE, "--port"),
            case(&["--max-connections", "abc"], USAGE, "--max-connections"),
            case(
                &["--max-connections-per-ip", "abc"],
                USAGE,
                "--max-connections-per-ip",
            ),
            case(&["--idle-timeout", "soon"], USAGE, "--idle-timeout"),
            case(&["--idle-timeout", "5"], USAGE, "--idle-timeout"),
            case(&["--shutdown-timeout", "soon"], USAGE, "--shutdown-timeout"),
            case(&["--shutdown-timeout", "5"], USAGE, "--shutdown-timeout"),
            case(&["--busy-poll", "fast"], USAGE, "--busy-poll"),
            case(&["--busy-poll", "50"], USAGE, "--busy-poll"),
            // Out of range.
            case(&["--workers", "0"], USAGE, "--workers"),
            case(&["--workers", "-1"], USAGE, "--workers"),
            case(
                &["--workers", "99999999999999999999999"],
                USAGE,
                "--workers",
            ),
            case(&["--port", "65536"], USAGE, "--port"),
            case(&["--port", "-1"], USAGE, "--port"),
            case(&["--port", "+80"], USAGE, "+80"),
            case(&["--max-connections", "0"], USAGE, "--max-connections"),
            case(&["--max-connections", "-5"], USAGE, "--max-connections"),
            case(
                &["--max-connections", "99999999999999999999999"],
                USAGE,
                "from 1 to",
            ),
            case(
                &["--max-connections-per-ip", "0"],
                USAGE,
                "--max-connections-per-ip",
            ),
            case(&["--idle-timeout", "0s"], USAGE, "--idle-timeout"),
            case(&["--idle-timeout", "-1s"], USAGE, "--idle-timeout"),
            case(
                &["--idle-timeout", "100000000000000000000s"],
                USAGE,
                "--idle-timeout",
            ),
            case(&["--shutdown-timeout", "-1s"], USAGE, "--shutdown-timeout"),
            case(&["--busy-poll", "2ms"], USAGE, "--busy-poll"),
            case(&["--busy-poll", "-1us"], USAGE, "--busy-poll"),
            // Hosts that are not addresses: the server does not resolve names.
            case(&["--bind", "localhost"], USAGE, "--bind"),
            case(&["--bind", "no.such.host.invalid"], USAGE, "--bind"),
            case(&["--bind", "999.1.1.1"], USAGE, "--bind"),
            case(&["--bind", "1.2.3"], USAGE, "--bind"),
            case(&["--bind", "::g"], USAGE, "--bind"),
            case(&["--bind", "[::1"], USAGE, "--bind"),
            case(&["--bind", ""], USAGE, "--bind"),
            // Given twice.
            case(&["--workers", "2", "--workers", "3"], USAGE, "--workers"),
            case(&["--port", "0", "--port", "0"], USAGE, "--port"),
            case(
                &["--bind", "127.0.0.1", "--bind", "127.0.0.1"],
                USAGE,
                "--bind",
            ),
            case(
                &["--max-connections", "5", "--max-connections", "5"],
                USAGE,
                "--max-connections",
            ),
            case(
                &["--idle-timeout", "1s", "--idle-timeout", "2s"],
                USAGE,
                "--idle-timeout",
            ),
            case(
                &["--shutdown-timeout", "1s", "--shutdown-timeout", "1s"],
                USAGE,
                "--shutdown-timeout",
            ),
            // Missing values, unknown flags, stray arguments, contradictions.
            case(&["--workers"], USAGE, "--workers"),
            case(&["--nope"], USAGE, "--nope"),
            case(&["-x"], USAGE, "-x"),
            case(&["extra"], USAGE, "extra"),
            case(&["-v", "-q"], USAGE, "--quiet"),
        ]);
    });
}

#[test]
fn an_address_that_cannot_be_bound_gets_one_line_and_exit_code_1() {
    with_time_limit(Duration::from_secs(60), || {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
        let port = taken
            .local_addr()
            .expect("the occupied port")
            .port()
            .to_string();
        assert_all(&[
            case(
                &["--bind", "127.0.0.1", "--port", &port],
                RUNTIME,
                "address already in use",
            ),
            // Not an address of this machine: fails at bind, without traffic.
            case(
                &["--bind", "192.0.2.1"],
                RUNTIME,
                "192.0.2.1 is not an address of this machine",
            ),
            case(
                &["--bind", "2001:db8::1"],
                RUNTIME,
                "cannot listen on [2001:db8::1]:0",
            ),
        ]);
        drop(taken);
    });
}

#[test]
fn a_switch_given_twice_is_a_usage_error() {
    with_time_limit(Duration::from_secs(60), || {
        assert_all(&[
            case(&["-q", "-q"], USAGE, "--quiet"),
            case(&["-v", "--verbose"], USAGE, "--verbose"),
        ]);
    });
}

#[test]
fn the_largest_connection_limit_starts_with_a_warning_not_an_overflow() {
    with_time_limit(Duration::from_secs(60), || {
        let most = u64::MAX.to_string();
        let mut server = ServerProcess::start(&["--workers", "1", "--max-connections", &most]);
        let warning = format!(
            "the connection limit {most} (--max-connections) is more than the descriptor limit"
        );
        // The warning follows the `listening on` line that start() waits for.
        let warned = wait_until(Duration::from_secs(10), || server.log().contains(&warning));
        assert!(
            warned,
            "expected the descriptor warning; log:\n{}",
            server.log()
        );
        server.stop_cleanly();
    });
}

#[test]
fn a_worker_count_the_open_file_limit_cannot_hold_is_one_line_not_a_half_started_server() {
    with_time_limit(Duration::from_secs(60), || {
        // Each worker needs an event loop and a waker: 2,048 descriptors.
        let mut too_many = case(&["--workers", "1024"], RUNTIME, "--workers");
        too_many.open_files = Some(256);
        assert_all(&[too_many]);
    });
}

/// Starts the server with `flag` set to a duration too large for the clock,
/// arms the timers with a connection and a SIGTERM, and expects either a
/// one-line usage error at start-up or a clean stop; never a panic.
fn huge_duration_is_refused_or_honoured(flag: &'static str) {
    let huge = "18446744073709551615s";
    let started =
        std::panic::catch_unwind(|| ServerProcess::start(&["--workers", "1", "-q", flag, huge]));
    let Ok(mut server) = started else {
        // Refused at start-up: that must be a one-line usage error.
        assert_all(&[case(&[flag, huge], USAGE, flag)]);
        return;
    };
    let mut stream = connect(server.addr);
    // The server may already have died; its status below says so.
    let _ = stream.write_all(b"x");
    let mut byte = [0; 1];
    // Likewise: an echo or an error, the status decides.
    let _ = stream.read(&mut byte);
    drop(stream);
    thread::sleep(Duration::from_millis(200));
    if is_running(server.pid()) {
        server.signal(libc::SIGTERM);
    }
    let status = server.wait_exit(Duration::from_secs(20));
    let log = server.log();
    assert!(
        status.code() == Some(0) && !log.contains("panicked"),
        "echo-server {flag} {huge}: expected a usage error or a clean stop, got {status}; log:\n{log}"
    );
}

#[test]
fn a_shutdown_timeout_too_large_for_the_clock_never_panics() {
    with_time_limit(Duration::from_secs(60), || {
        huge_duration_is_refused_or_honoured("--shutdown-timeout")
    });
}

#[test]
fn an_idle_timeout_too_large_for_the_clock_never_panics() {
    with_time_limit(Duration::from_secs(60), || {
        huge_duration_is_refused_or_honoured("--idle-timeout")
    });
}

#[test]
fn a_non_utf8_argument_is_a_one_line_usage_error() {
    with_time_limit(Duration::from_secs(30), || {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"12\xff");
        let child = Command::new(SERVER_BIN)
            .args(["--bind", "127.0.0.1", "--port", "0", "--workers"])
            .arg(bad)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn echo-server");
        let pid = child.id() as i32;
        let waiter = thread::spawn(move || child.wait_with_output());
        let ended = wait_until(REJECT_WITHIN, || waiter.is_finished());
        if !ended {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("echo-server --workers <non-UTF-8> still running after {REJECT_WITHIN:?}");
        }
        let output = waiter
            .join()
            .expect("the waiter thread")
            .expect("collect the output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines = stderr
            .lines()
            .filter(|line| !line.trim().is_empty())
            .count();
        assert!(
            output.status.code() == Some(USAGE)
                && lines == 1
                && stderr.starts_with("echo-server: ")
                && stderr.contains("of --workers")
                && !stderr.contains("panicked"),
            "echo-server --workers <non-UTF-8>: expected one line naming --workers and exit \
             code 2, got {}:\n{stderr}",
            output.status
        );
    });
}

/// A pipe whose reading end is already closed: any write to it fails with
/// `EPIPE`, as when the reader of `--version | head -0` has gone.
fn pipe_without_reader() -> Stdio {
    // std's pipe is close-on-exec, so no server that another test spawns
    // meanwhile can inherit the reading end and keep it open.
    let (reader, writer) = std::io::pipe().expect("create a pipe");
    drop(reader);
    Stdio::from(writer)
}

/// Runs `bin flag` with `stdout` as its standard output; returns its exit
/// code and what it wrote to stderr.
fn answer_into(bin: &str, flag: &str, stdout: Stdio) -> (Option<i32>, String) {
    let output = Command::new(bin)
        .arg(flag)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[test]
fn version_and_help_to_a_reader_that_went_away_exit_0_without_a_panic() {
    with_time_limit(Duration::from_secs(30), || {
        for bin in [SERVER_BIN, common::client::CLIENT] {
            for flag in ["--version", "--help"] {
                let (code, stderr) = answer_into(bin, flag, pipe_without_reader());
                assert!(
                    code == Some(0) && stderr.is_empty(),
                    "{bin} {flag} with no reader: expected exit 0 and nothing on stderr, \
                     got {code:?} and stderr:\n{stderr}"
                );
            }
        }
    });
}

#[test]
fn a_usage_error_with_stderr_gone_exits_2_without_a_panic() {
    with_time_limit(Duration::from_secs(30), || {
        for bin in [SERVER_BIN, common::client::CLIENT] {
            let status = Command::new(bin)
                .arg("--no-such-flag")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(pipe_without_reader())
                .status()
                .expect("run the binary");
            assert_eq!(
                status.code(),
                Some(USAGE),
                "{bin} --no-such-flag with stderr gone: {status:?}"
            );
        }
    });
}

#[test]
fn version_and_help_that_cannot_be_written_are_one_line_and_exit_1() {
    with_time_limit(Duration::from_secs(30), || {
        for bin in [SERVER_BIN, common::client::CLIENT] {
            for flag in ["--version", "--help"] {
                // Every write to /dev/full fails with ENOSPC.
                let full = std::fs::File::options()
                    .write(true)
                    .open("/dev/full")
                    .expect("open /dev/full");
                let (code, stderr) = answer_into(bin, flag, Stdio::from(full));
                assert!(
                    code == Some(RUNTIME)
                        && stderr.lines().count() == 1
                        && stderr.contains("cannot write to stdout"),
                    "{bin} {flag} into /dev/full: expected exit 1 and one line naming stdout, \
                     got {code:?} and stderr:\n{stderr}"
                );
            }
        }
    });
}
