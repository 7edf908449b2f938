//! What a newcomer meets first: `-h` and `-V`, `--help` that reads the same
//! in both binaries, error lines that say what to do, and log and summary
//! lines in plain English (issue 17, "Messages and flags").

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::client::{
    CLIENT, EchoServer, Json, TestServer, closed_port, closes_after_three_greetings,
    echoes_half_then_closes, run_client,
};
use common::{SERVER_BIN, ServerProcess, describe, run_to_end, with_time_limit};

/// The most one child process may run; it is killed after that.
const LIMIT: Duration = Duration::from_secs(30);
/// The most one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(90);

const BINARIES: [(&str, &str); 2] = [("echo-server", SERVER_BIN), ("echo-client", CLIENT)];

fn stdout_of(program: &str, args: &[&str]) -> String {
    let output = run_to_end(program, args, LIMIT);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        describe(program, args, &output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `program args`, expects exit 2 and one `program: ` line on stderr,
/// and returns that line.
fn usage_error(program: &str, args: &[&str]) -> String {
    let output = run_to_end(program, args, LIMIT);
    let context = describe(program, args, &output);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{context}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {context}");
    stderr
}

#[test]
fn dash_h_is_help_and_dash_capital_v_is_version_on_both_binaries() {
    with_time_limit(TEST_LIMIT, || {
        for (name, path) in BINARIES {
            let help = stdout_of(path, &["--help"]);
            assert_eq!(stdout_of(path, &["-h"]), help);
            // The help lists the short forms it takes.
            for listed in [
                "\n  -V, --version     print",
                "\n  -h, --help, help  display",
            ] {
                assert!(
                    help.contains(listed),
                    "{name} --help lacks {listed:?}:\n{help}"
                );
            }
            let version = format!("{name} {}\n", env!("CARGO_PKG_VERSION"));
            assert_eq!(stdout_of(path, &["-V"]), version);
        }
    });
}

#[test]
fn dash_h_as_the_value_of_an_option_stays_a_value() {
    with_time_limit(TEST_LIMIT, || {
        // `--message -h` sends `-h`, as it is, and asks for no help.
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--message", "-h"], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("Server echoed: -h (seq=1 "),
            "{}",
            run.describe()
        );
        let line = usage_error(CLIENT, &["--", "-h"]);
        assert!(
            line.contains("positional argument 'addr' with value '-h'"),
            "{line}"
        );
        let line = usage_error(SERVER_BIN, &["--bind", "-h"]);
        assert!(line.contains("'--bind' with value '-h'"), "{line}");
    });
}

#[test]
fn help_reads_the_same_in_both_binaries() {
    with_time_limit(TEST_LIMIT, || {
        for (name, path) in BINARIES {
            let help = stdout_of(path, &["--help"]);
            assert!(help.starts_with(&format!("Usage: {name} [")), "{help}");
            let usage: Vec<&str> = help.lines().take_while(|l| !l.is_empty()).collect();
            for line in &usage {
                assert!(line.len() <= 80, "usage line over 80 columns: {line:?}");
                assert!(!line.contains('<'), "placeholder not in capitals: {line:?}");
            }
            let usage = usage.join(" ");
            for placeholder in ["DUR]", "N]", "ADDR"] {
                assert!(usage.contains(placeholder), "no {placeholder} in {usage}");
            }
            assert!(help.contains("\nExit codes:\n  0 "), "{help}");
            assert!(help.contains("\n  2 usage error\n"), "{help}");
            assert!(!help.contains("Error codes"), "{help}");
        }
    });
}

#[test]
fn duration_errors_read_the_same_everywhere() {
    with_time_limit(TEST_LIMIT, || {
        let not_a_duration = "expected a duration such as 2s, 500ms or 1m 30s";
        for (path, flag) in [
            (SERVER_BIN, "--shutdown-timeout"),
            (SERVER_BIN, "--idle-timeout"),
            (SERVER_BIN, "--drain-delay"),
            (SERVER_BIN, "--busy-poll"),
            (CLIENT, "--timeout"),
            (CLIENT, "--interval"),
        ] {
            let line = usage_error(path, &[flag, "soon"]);
            assert!(line.contains(not_a_duration), "{line}");
        }
        for (path, flag) in [(SERVER_BIN, "--idle-timeout"), (CLIENT, "--timeout")] {
            let line = usage_error(path, &[flag, "0s"]);
            assert!(
                line.contains("'0s': must be more than 0 (see --help)"),
                "{line}"
            );
        }
    });
}

#[test]
fn a_scoped_ipv6_address_is_refused_in_one_wording_by_both() {
    with_time_limit(TEST_LIMIT, || {
        let wording = echo_chamber::error::SCOPED_IPV6_UNSUPPORTED;
        let server = usage_error(SERVER_BIN, &["--bind", "fe80::1%lo"]);
        let client = usage_error(CLIENT, &["[fe80::1%lo]:7"]);
        assert!(server.contains(wording), "{server}");
        assert!(client.contains(wording), "{client}");
        let run = run_client(&["fe80::1%lo:7"], b"", LIMIT);
        assert!(run.stderr.contains(wording), "{}", run.describe());
    });
}

#[test]
fn bind_with_a_port_or_a_host_name_says_what_to_give_instead() {
    with_time_limit(TEST_LIMIT, || {
        let line = usage_error(SERVER_BIN, &["--bind", "127.0.0.1:9999"]);
        assert!(
            line.contains("give the port with --port, as in --bind 127.0.0.1 --port 9999"),
            "{line}"
        );
        let line = usage_error(SERVER_BIN, &["--bind", "localhost"]);
        assert!(
            line.contains("give an IP address, 127.0.0.1 (or ::1)"),
            "{line}"
        );
        let line = usage_error(SERVER_BIN, &["--bind", "echo.example"]);
        assert!(line.contains("give one of its IP addresses"), "{line}");
    });
}

#[test]
fn an_address_not_on_this_machine_is_said_in_words() {
    with_time_limit(TEST_LIMIT, || {
        // Documentation ranges (TEST-NET-2, 2001:db8::/32): a lab may number
        // its hosts from TEST-NET-1, but these two are assigned to no host.
        let cases = [
            ("198.51.100.7", "198.51.100.7:0", "0.0.0.0"),
            ("2001:db8::7", "[2001:db8::7]:0", "::"),
        ];
        for (address, shown, every) in cases {
            for transport in ["--tcp", "--udp"] {
                let args = ["--bind", address, "--port", "0", transport];
                let output = run_to_end(SERVER_BIN, &args, LIMIT);
                let context = describe(SERVER_BIN, &args, &output);
                assert_eq!(output.status.code(), Some(1), "{context}");
                assert_eq!(
                    String::from_utf8_lossy(&output.stderr),
                    format!(
                        "echo-server: cannot listen on {shown}: {address} is not an address of \
                         this machine; give --bind one of its addresses, or {every} for every \
                         interface\n"
                    ),
                    "{context}"
                );
            }
        }
    });
}

#[test]
fn listening_on_every_interface_is_said_once_at_start_up() {
    with_time_limit(TEST_LIMIT, || {
        let args = ["--bind", "0.0.0.0", "--port", "0", "--workers", "1", "-q"];
        let mut server = ServerProcess::start_exact(Command::new(SERVER_BIN), &args);
        server.stop_cleanly();
        let log = server.log();
        let notices: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("every interface"))
            .collect();
        assert_eq!(notices.len(), 1, "log:\n{log}");
        assert!(
            notices[0].ends_with(
                "INFO serving every interface (0.0.0.0): other machines can reach this \
                 server; --bind 127.0.0.1 keeps it to this one"
            ),
            "log:\n{log}"
        );
        // Every IPv4 interface, written as an IPv4-mapped IPv6 address.
        let args = ["--bind", "::ffff:0.0.0.0", "--port", "0", "--workers", "1"];
        let mut mapped = ServerProcess::start_exact(Command::new(SERVER_BIN), &args);
        mapped.stop_cleanly();
        assert!(
            mapped.log().contains("INFO serving every interface ("),
            "log:\n{}",
            mapped.log()
        );
        let mut local = ServerProcess::start(&["--workers", "1"]);
        local.stop_cleanly();
        assert!(!local.log().contains("every interface"), "{}", local.log());
    });
}

#[test]
fn log_lines_say_one_worker_one_connection_and_one_byte() {
    with_time_limit(TEST_LIMIT, || {
        let mut server = ServerProcess::start(&["--workers", "1"]);
        common::try_echo(server.addr, b"x", LIMIT).expect("one echo");
        server.wait_for_log("close ", LIMIT);
        let summary = server.stop_cleanly();
        let log = server.log();
        assert!(log.contains("(tcp; 1 worker)"), "log:\n{log}");
        assert!(log.contains(": 1 byte echoed in "), "log:\n{log}");
        assert!(
            summary.contains(
                "shutdown complete: 1 connection served, 1 byte received, 1 byte echoed, \
                 0 connections cut at the deadline, 0 bytes discarded, 0 connections refused; \
                 busy polling caught "
            ),
            "{summary}"
        );
    });
}

#[test]
fn a_shutdown_timeout_past_the_cap_is_logged_as_the_cap() {
    with_time_limit(TEST_LIMIT, || {
        let mut server = ServerProcess::start(&["--shutdown-timeout", "100000000000000s", "-q"]);
        server.stop_cleanly();
        let log = server.log();
        assert!(
            log.contains("draining 0 connections (deadline 100 years, the longest timer)"),
            "log:\n{log}"
        );
        let mut server = ServerProcess::start(&["--shutdown-timeout", "90s", "-q"]);
        server.stop_cleanly();
        assert!(
            server.log().contains("(deadline 1m 30s)"),
            "{}",
            server.log()
        );
    });
}

#[test]
fn a_run_whose_only_connection_failed_shows_no_loss_and_no_leading_blank_line() {
    with_time_limit(TEST_LIMIT, || {
        let port = closed_port();
        let addr = port.addr().to_string();
        for quiet in [&[][..], &["-q"]] {
            let mut args = vec![addr.as_str()];
            args.extend_from_slice(quiet);
            let run = run_client(&args, b"", LIMIT);
            assert_eq!(run.code(), Some(1), "{}", run.describe());
            assert!(run.stdout.starts_with("--- "), "{}", run.describe());
            assert!(
                run.stdout
                    .contains("\n0 sent, 0 echoed, 0 mismatched, 0 timed out, 1 error, time "),
                "{}",
                run.describe()
            );
            assert!(!run.stdout.contains("loss"), "{}", run.describe());
        }
    });
}

#[test]
fn quiet_output_starts_with_the_summary_not_a_blank_line() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "-q", "--repeat", "3"], b"", LIMIT);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout
                .starts_with(&format!("--- {addr} echo statistics ---\n")),
            "{}",
            run.describe()
        );
        // Without -q, the summary is set apart from the echo lines.
        let run = run_client(&[&addr, "--repeat", "1"], b"", LIMIT);
        assert!(run.stdout.contains(")\n\n--- "), "{}", run.describe());
    });
}

#[test]
fn stdin_statistics_leave_out_the_time_spent_waiting_for_lines() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let mut child = Command::new(CLIENT)
            .args([&addr, "--stdin", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn echo-client");
        let mut input = child.stdin.take().expect("piped stdin");
        // Two lines a second apart, as someone typing them would send.
        input.write_all(b"first\n").expect("write a line");
        thread::sleep(Duration::from_millis(1200));
        input.write_all(b"second\n").expect("write a line");
        drop(input);
        let output = child.wait_with_output().expect("echo-client ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{stdout}");
        let json = Json::parse(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}"));
        assert_eq!(json.number("echoed"), Some(2.0), "{stdout}");
        let elapsed = json.number("elapsed_s").expect("elapsed_s");
        assert!(
            elapsed < 0.6,
            "the 1.2 s pause counted as run time: {stdout}"
        );
        let rate = json.number("echoes_per_s").expect("echoes_per_s");
        assert!(
            rate > 2.0 / 0.6,
            "the pause counted in the throughput: {stdout}"
        );
    });
}

#[test]
fn a_close_between_echoes_reads_as_what_it_is_and_is_counted_apart() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(closes_after_three_greetings);
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--repeat", "5", "-q"], b"", LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert_eq!(
            run.stderr,
            format!(
                "echo-client: {addr} closed the connection before echo 4 was sent; the server \
                 is shutting down or closed it\n"
            ),
            "{}",
            run.describe()
        );
        // Past 80 columns, the line wraps after the loss.
        assert!(
            run.stdout.contains(
                "\n4 sent, 3 echoed, 0 mismatched, 0 timed out, 1 closed before echo, 25% loss,\n  time "
            ),
            "{}",
            run.describe()
        );
        let run = run_client(&[&addr, "--repeat", "5", "--json"], b"", LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        let json =
            Json::parse(&run.stdout).unwrap_or_else(|err| panic!("{err}: {}", run.describe()));
        assert_eq!(
            json.number("closed_before_echo"),
            Some(1.0),
            "{}",
            run.describe()
        );
        assert_eq!(json.number("errors"), Some(0.0), "{}", run.describe());
    });
}

#[test]
fn an_echo_cut_midway_still_counts_as_an_error() {
    with_time_limit(TEST_LIMIT, || {
        let server = TestServer::start(echoes_half_then_closes);
        let addr = server.addr().to_string();
        let run = run_client(&[&addr, "--json"], b"", LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        let json =
            Json::parse(&run.stdout).unwrap_or_else(|err| panic!("{err}: {}", run.describe()));
        assert_eq!(
            json.number("closed_before_echo"),
            Some(0.0),
            "{}",
            run.describe()
        );
        assert_eq!(json.number("errors"), Some(1.0), "{}", run.describe());
    });
}

#[test]
fn the_client_says_one_byte_and_its_summary_fits_80_columns() {
    with_time_limit(TEST_LIMIT, || {
        let server = EchoServer::start();
        let addr = server.addr().to_string();
        let run = run_client(
            &[&addr, "--size", "1", "--repeat", "1", "--histogram"],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stdout.contains("Server echoed: 1 byte (seq=1 "),
            "{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("rtt histogram (1 exact echo,"),
            "{}",
            run.describe()
        );
        let run = run_client(
            &[&addr, "--connections", "20", "--repeat", "50", "-q"],
            b"",
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        for line in run.stdout.lines() {
            assert!(
                line.chars().count() <= 80,
                "over 80 columns: {}",
                run.describe()
            );
        }
    });
}
