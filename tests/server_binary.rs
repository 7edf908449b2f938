//! The `echo-server` binary as a user runs it: real signals, the drain, the
//! shutdown deadline, and the exit codes for runtime and usage errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Bytes the kernel still holds in `stream`'s send queue (not yet acked).
fn unsent_bytes(stream: &TcpStream) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int into `queued`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    assert_eq!(rc, 0, "ioctl(TIOCOUTQ)");
    queued as usize
}

/// A 1 MiB echo is in flight (read slowly by the client) when `signal`
/// arrives: the client must get every byte and then EOF, new connections
/// must be refused, and the server must exit 0.
fn drains_in_flight_echo_on(signal: i32) {
    with_time_limit(Duration::from_secs(60), move || {
        let mut server = ServerProcess::start(&["--workers", "2"]);
        let data = payload(signal as u64, 1 << 20);
        let mut stream = connect(server.addr);
        let mut reader = stream.try_clone().expect("clone");
        let slow_reader = thread::spawn(move || {
            let mut echoed = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => return Ok(echoed),
                    Ok(n) => echoed.extend_from_slice(&chunk[..n]),
                    Err(err) => return Err(err),
                }
                // Slow enough that the echo is still in flight at the signal.
                thread::sleep(Duration::from_millis(1));
            }
        });
        stream.write_all(&data).expect("write 1 MiB");
        // Every byte has reached the server's side once the send queue is empty.
        let waited = Instant::now();
        while unsent_bytes(&stream) > 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "the server stopped reading"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !slow_reader.is_finished(),
            "the echo finished before the signal; nothing was in flight"
        );
        server.signal(signal);
        // Until the listener closes, a connect may still land in its backlog.
        let refused_by = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(server.addr) {
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ if Instant::now() > refused_by => panic!(
                    "connects were still accepted 10s after the signal; log:\n{}",
                    server.log()
                ),
                _ => thread::sleep(Duration::from_millis(5)),
            }
        }
        let echoed = slow_reader
            .join()
            .expect("reader thread")
            .unwrap_or_else(|err| {
                panic!(
                    "the client's read failed ({err}) instead of a clean EOF; log:\n{}",
                    server.log()
                )
            });
        assert_same_bytes(&data, &echoed, "echo drained at shutdown");
        let status = server.wait_exit(Duration::from_secs(20));
        assert_eq!(
            status.code(),
            Some(0),
            "exit status; log:\n{}",
            server.log()
        );
        let log = server.log();
        // The refusal probe may land before the listener closes: 1 or 2.
        assert!(
            log.contains("shutting down: draining 1 connection (deadline 5s)")
                || log.contains("shutting down: draining 2 connections (deadline 5s)"),
            "log:\n{log}"
        );
        let summary = server.summary();
        assert_eq!(
            summary_count(&summary, "bytes received"),
            1 << 20,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "bytes echoed"),
            1 << 20,
            "{summary}"
        );
    });
}

#[test]
fn sigint_drains_an_in_flight_echo_refuses_new_clients_and_exits_0() {
    drains_in_flight_echo_on(libc::SIGINT);
}

#[test]
fn sigterm_drains_an_in_flight_echo_refuses_new_clients_and_exits_0() {
    drains_in_flight_echo_on(libc::SIGTERM);
}

/// A second signal during a drain that is stuck on a client that never reads.
fn second_signal_exits_at_once(signal: i32, expected: i32) {
    with_time_limit(Duration::from_secs(60), move || {
        let mut server = ServerProcess::start(&["--workers", "1", "--shutdown-timeout", "60s"]);
        let mut hog = connect(server.addr);
        push_until_stalled(&mut hog, &payload(3, 64 * 1024));
        server.signal(signal);
        // Wait until the drain has started before the second signal, and
        // until the second cannot be a repeat of the first.
        let started = Instant::now();
        server.wait_for_log("shutting down", Duration::from_secs(10));
        thread::sleep(
            SAME_STOP_REQUEST.saturating_sub(started.elapsed()) + Duration::from_millis(100),
        );
        server.signal(signal);
        let status = server.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(expected), "log:\n{}", server.log());
    });
}

/// How soon after the first a signal is the same stop request (the
/// binaries' `stop_signals::SAME_REQUEST`).
const SAME_STOP_REQUEST: Duration = Duration::from_millis(500);

/// `timeout(1)` signals the server and then its process group: the two
/// signals are one request, so the drain runs to the end. The second is
/// sent once the first has been handled (two pending signals would merge
/// in the kernel and prove nothing).
#[test]
fn a_repeat_soon_after_the_first_signal_is_the_same_request() {
    with_time_limit(Duration::from_secs(120), || {
        // A slow machine may take too long to send the repeat in time;
        // that proves nothing either way, so try again.
        for _ in 0..3 {
            let mut server = ServerProcess::start(&["--workers", "1", "--shutdown-timeout", "60s"]);
            // A client that has not closed keeps the drain open.
            let mut client = connect(server.addr);
            echo_on(&mut client, b"hello").expect("an echo before the signals");
            server.signal(libc::SIGTERM);
            let first = Instant::now();
            server.wait_for_log("shutting down", Duration::from_secs(10));
            server.signal(libc::SIGTERM);
            if first.elapsed() >= SAME_STOP_REQUEST * 4 / 5 {
                drop(client);
                continue;
            }
            // Well past the time a second signal would take to end it.
            thread::sleep(SAME_STOP_REQUEST * 2);
            assert!(
                is_running(server.pid()),
                "a repeated signal ended the drain; log:\n{}",
                server.log()
            );
            drop(client);
            let status = server.wait_exit(Duration::from_secs(30));
            assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
            return;
        }
        panic!("three times, the repeat could not be sent within {SAME_STOP_REQUEST:?}");
    });
}

#[test]
fn a_second_sigint_exits_at_once_with_130() {
    second_signal_exits_at_once(libc::SIGINT, 130);
}

#[test]
fn a_second_sigterm_exits_at_once_with_143() {
    second_signal_exits_at_once(libc::SIGTERM, 143);
}

#[test]
fn a_drained_client_that_has_not_taken_its_echo_by_the_deadline_is_counted_as_cut() {
    with_time_limit(Duration::from_secs(60), || {
        const SENT: usize = 60_000;
        let mut server = ServerProcess::start(&["--workers", "1", "--shutdown-timeout", "1s"]);
        // A 4 KiB receive buffer: the server hands all of the echo to its
        // kernel, and most of it waits there for a client that never reads.
        let mut client = connect_with_receive_buffer(server.addr, 4096);
        client
            .write_all(&[b'e'; SENT])
            .expect("the server reads it all");
        thread::sleep(Duration::from_millis(500));
        server.signal(libc::SIGTERM);
        // Sending on after the drain began, as a client unaware of it would,
        // until the close at the deadline resets the connection (at most
        // 10 s, however late the signal is handled).
        let stop_at = Instant::now() + Duration::from_secs(10);
        while Instant::now() < stop_at && client.write_all(b"more").is_ok() {
            thread::sleep(Duration::from_millis(50));
        }
        let status = server.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
        // What the client's kernel had taken is still readable after the reset.
        let mut received = 0;
        let mut buf = [0u8; 65536];
        while let Ok(read @ 1..) = client.read(&mut buf) {
            received += read;
        }
        let summary = server.summary();
        assert_eq!(summary_count(&summary, "connections cut"), 1, "{summary}");
        // A "more" sent before the drain began is echoed too.
        let echoed = summary_count(&summary, "bytes echoed") as usize;
        assert!(
            received < echoed,
            "the client got all {echoed} bytes: nothing to test"
        );
        // Whether the close itself or the next "more" reset the connection
        // depends on timing; either way those bytes were lost.
        let expected = format!(
            "drained, but the peer had not taken {} bytes of the echo; ",
            echoed - received
        );
        assert!(
            server.log().contains(&expected),
            "expected {expected:?} ({received} of {echoed} bytes taken); log:\n{}",
            server.log()
        );
    });
}

#[test]
fn a_client_slowly_taking_its_echo_is_not_idle() {
    with_time_limit(Duration::from_secs(60), || {
        const SENT: usize = 60_000;
        let server = ServerProcess::start(&["--workers", "1", "--idle-timeout", "1s"]);
        // The echo waits in the server's kernel while the client reads 4 KiB
        // every 200 ms, about 3 s in all: the worker sees no traffic, but
        // the connection is not idle. (A look at the queue spans five reads,
        // so a loaded machine that delays one does not make it look idle.)
        let mut client = connect_with_receive_buffer(server.addr, 4096);
        client
            .write_all(&[b'e'; SENT])
            .expect("the server reads it all");
        // The client's kernel holds at most about its buffer; the rest of
        // the echo is still in the server's send queue.
        const CLIENT_HOLDS: usize = 16 * 1024;
        let mut received = 0;
        let mut buf = [0u8; 4096];
        while received < SENT {
            thread::sleep(Duration::from_millis(200));
            assert!(
                SENT - received <= CLIENT_HOLDS || !server.log().contains("(idle timeout)"),
                "closed as idle with {} bytes of echo still to take; log:\n{}",
                SENT - received,
                server.log()
            );
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(read) => received += read,
                Err(err) => panic!("after {received} bytes: {err}; log:\n{}", server.log()),
            }
        }
        assert_eq!(received, SENT, "log:\n{}", server.log());
        // Once it has all, the client is idle, and is closed as such.
        server.wait_for_log("(idle timeout)", Duration::from_secs(10));
        assert_eq!(
            client.read(&mut buf).ok(),
            Some(0),
            "log:\n{}",
            server.log()
        );
    });
}

/// A connected client whose receive buffer was set to `bytes` before the
/// handshake, so that the window it offers stays that small; with the
/// timeouts of [`connect`].
fn connect_with_receive_buffer(addr: std::net::SocketAddr, bytes: libc::c_int) -> TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("the test server listens on IPv4, not {addr}");
    };
    // SAFETY: a plain syscall; the descriptor is checked, then owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is open and owned by nobody else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    set_socket_option(fd, libc::SO_RCVBUF, &bytes, "SO_RCVBUF");
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `to` is a valid sockaddr_in for the length given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "connect to {addr}: {}",
        std::io::Error::last_os_error()
    );
    with_connect_timeouts(stream)
}

#[test]
fn shutdown_timeout_cuts_a_client_that_never_reads_and_still_exits_0() {
    with_time_limit(Duration::from_secs(60), || {
        let mut server = ServerProcess::start(&["--workers", "1", "--shutdown-timeout", "500ms"]);
        let mut hog = connect(server.addr);
        push_until_stalled(&mut hog, &payload(4, 64 * 1024));
        let signalled = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(20));
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
        assert!(
            took >= Duration::from_millis(500),
            "exited after {took:?}, before the 500ms deadline"
        );
        let summary = server.summary();
        assert_eq!(summary_count(&summary, "connections cut"), 1, "{summary}");
    });
}

#[test]
fn a_port_in_use_exits_1_naming_the_address_and_cause() {
    with_time_limit(Duration::from_secs(30), || {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port().to_string();
        let args = ["--bind", "127.0.0.1", "--port", &port];
        let output = run_to_end(SERVER_BIN, &args, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}",
            describe(SERVER_BIN, &args, &output)
        );
        assert_eq!(
            stderr.trim(),
            format!(
                "echo-server: cannot listen on 127.0.0.1:{port}: address already in use; \
                 another process is listening there; choose another --port, or --port 0 \
                 for a free one"
            ),
            "{}",
            describe(SERVER_BIN, &args, &output)
        );
    });
}

#[test]
fn a_multicast_or_broadcast_address_exits_1_naming_it() {
    with_time_limit(Duration::from_secs(60), || {
        for address in [
            "224.0.0.1",
            "255.255.255.255",
            "ff02::1",
            "::ffff:224.0.0.1",
        ] {
            let args = ["--bind", address, "--port", "0"];
            let output = run_to_end(SERVER_BIN, &args, Duration::from_secs(20));
            let shown = describe(SERVER_BIN, &args, &output);
            assert_eq!(output.status.code(), Some(1), "{shown}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            let bound = if address.contains(':') {
                format!("[{address}]:0")
            } else {
                format!("{address}:0")
            };
            assert_eq!(
                stderr.trim(),
                format!(
                    "echo-server: cannot listen on {bound}: a multicast or broadcast address \
                     takes no TCP connections"
                ),
                "{shown}"
            );
        }
    });
}

#[test]
fn bad_flags_exit_2_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "--workers"),
        (&["--workers", "many"], "--workers"),
        (&["--shutdown-timeout", "soon"], "--shutdown-timeout"),
        (&["--idle-timeout", "0s"], "--idle-timeout"),
        (&["--bind", "not-an-address"], "--bind"),
        (
            &["--bind", "fe80::1%lo"],
            echo_chamber::error::SCOPED_IPV6_UNSUPPORTED,
        ),
        (&["--port", "70000"], "--port"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--port"], "--port"),
        (&["-v", "-q"], "--quiet"),
    ];
    with_time_limit(Duration::from_secs(60), move || {
        for (args, flag) in cases {
            let output = run_to_end(SERVER_BIN, args, Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&output.stderr);
            let context = describe(SERVER_BIN, args, &output);
            assert_eq!(output.status.code(), Some(2), "{context}");
            assert_eq!(stderr.trim().lines().count(), 1, "not one line: {context}");
            assert!(stderr.starts_with("echo-server: "), "{context}");
            assert!(stderr.contains(flag), "does not name {flag}: {context}");
        }
    });
}

#[test]
fn help_and_version_exit_0() {
    with_time_limit(Duration::from_secs(30), || {
        let help = run_to_end(SERVER_BIN, &["--help"], Duration::from_secs(20));
        assert_eq!(help.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&help.stdout).contains("--shutdown-timeout"));
        let version = run_to_end(SERVER_BIN, &["--version"], Duration::from_secs(20));
        assert_eq!(version.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&version.stdout).starts_with("echo-server "));
    });
}

#[test]
fn urgent_bytes_that_arrive_before_accept_are_echoed_in_place() {
    with_time_limit(Duration::from_secs(60), || {
        let mut server = ServerProcess::start(&["--workers", "1", "-q"]);
        // Stopped, the server cannot accept; the kernel still completes the
        // handshake and queues what the client sends, as in a full backlog.
        server.signal(libc::SIGSTOP);
        let mut stream = connect(server.addr);
        stream.set_nodelay(true).expect("TCP_NODELAY");
        send_urgent(&stream, b'A');
        send_urgent(&stream, b'B');
        stream.write_all(b"c").expect("write");
        server.signal(libc::SIGCONT);
        let echoed = read_echo_of_len(&mut stream, 3)
            .unwrap_or_else(|err| panic!("expected b\"ABc\" back; {err}; log:\n{}", server.log()));
        assert_eq!(echoed, b"ABc", "log:\n{}", server.log());
        drop(stream);
        server.stop_cleanly();
    });
}

/// Reads `stderr` up to and including the next newline, byte by byte so
/// that nothing after it is taken out of the pipe.
fn read_line_from(stderr: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stderr.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn a_stderr_nobody_reads_stalls_neither_echoes_nor_shutdown() {
    with_time_limit(Duration::from_secs(120), || {
        let mut command = std::process::Command::new(SERVER_BIN);
        dies_with_test(&mut command);
        let mut child = command
            .args(["--bind", "127.0.0.1", "--port", "0", "--workers", "2"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn echo-server");
        let mut stderr = child.stderr.take().expect("piped stderr");
        // One page: a few dozen log lines fill it.
        // SAFETY: fcntl on our own end of the pipe; it only resizes the pipe.
        let rc = unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        assert!(rc > 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
        let first = read_line_from(&mut stderr);
        let addr: std::net::SocketAddr = first
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in the first line {first:?}"));
        // Each connection logs when it opens and closes: 200 of them write
        // several times what the pipe holds, and nobody reads it.
        for at in 1..=200 {
            try_echo(addr, b"while nobody reads the log", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("echo {at} with the log pipe full: {e}"));
        }
        // Empty the pipe; the next line then goes out, after a count of the
        // lines dropped meanwhile.
        // SAFETY: fcntl on our own end of the pipe.
        let rc = unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "O_NONBLOCK: {}", std::io::Error::last_os_error());
        // What is read here may already hold the count, if the server
        // logged a line while the pipe emptied.
        let mut drained = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(read @ 1..) = stderr.read(&mut chunk) {
            drained.extend_from_slice(&chunk[..read]);
        }
        try_echo(addr, b"after the log was read", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("echo after the log was read: {e}"));
        // SAFETY: kill only sends a signal to our own child.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill");
        let waited = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for echo-server") {
                break status;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "echo-server did not exit within 30 s of SIGTERM"
            );
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "exit status");
        // SAFETY: fcntl on our own end of the pipe.
        let rc = unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETFL, 0) };
        assert_eq!(rc, 0, "blocking again: {}", std::io::Error::last_os_error());
        let mut rest = String::from_utf8_lossy(&drained).into_owned();
        stderr
            .read_to_string(&mut rest)
            .expect("the rest of the log");
        assert!(
            rest.contains(" WARN ")
                && rest.contains("log lines dropped: stderr was not being read"),
            "no count of dropped lines in:\n{rest}"
        );
    });
}
