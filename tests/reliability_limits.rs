//! The server's limits, through the `echo-server` binary: what the acceptor
//! refuses (`--max-connections`, `--max-connections-per-ip`) and how it
//! behaves without descriptors, what a worker closes (`--idle-timeout`), and
//! what a connection may hold in memory when its peer never reads, and that
//! busy polling (`--busy-poll`) stops when traffic does. Each test states its
//! bound and prints what it measured.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long a refused connection may take to be closed: "at once", generously.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// Peak RSS the server may gain while four clients push without reading:
/// each connection holds at most 64 KiB of pending output, so this leaves
/// ample room for the allocator while catching any unbounded buffering.
const NON_READER_PEAK_GROWTH_KIB: u64 = 16 * 1024;

/// CPU the server may use while it cannot accept: half of one core.
const OUT_OF_FDS_CPU_SHARE: f64 = 0.5;

/// CPU the server may use once ping-pong gives way to a ping every 2 ms, or
/// to silence: a worker that kept spinning 1 ms per wait would use half a
/// core, one that sleeps about 1%; a fifth leaves room for a loaded machine.
const BUSY_POLL_QUIET_CPU_SHARE: f64 = 0.2;

/// Whether the server closed `stream` without sending anything (end of
/// stream or reset), and how long that took.
fn closed_by_server(stream: &mut TcpStream) -> Result<Duration, String> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(REFUSAL_LIMIT))
        .map_err(|err| format!("set timeout: {err}"))?;
    let mut byte = [0; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok(started.elapsed()),
        Ok(_) => Err("the server sent data on a connection it should refuse".into()),
        Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(
            format!("still open after {REFUSAL_LIMIT:?}: the server did not refuse it"),
        ),
        Err(err) if err.kind() == ErrorKind::ConnectionReset => Ok(started.elapsed()),
        Err(err) => Err(format!("unexpected read error: {err}")),
    }
}

#[test]
fn idle_timeout_closes_idle_connections_and_spares_active_ones() {
    with_time_limit(Duration::from_secs(60), || {
        let mut server = ServerProcess::start(&["--workers", "2", "-q", "--idle-timeout", "2s"]);
        let addr = server.addr;
        let timeout = Duration::from_secs(2);
        let slack = Duration::from_secs(5);

        // An active connection: traffic every 100 ms for 2 timeouts' worth,
        // so only a stall of 1.9 s on a loaded machine could look idle.
        let active = thread::spawn(move || -> Result<(), String> {
            let mut stream = connect(addr);
            let started = Instant::now();
            let mut round = 0u64;
            while started.elapsed() < 2 * timeout {
                echo_on(&mut stream, &payload(round, 10))
                    .map_err(|err| format!("active connection, round {round}: {err}"))?;
                round += 1;
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });

        let mut idle = connect(addr);
        echo_on(&mut idle, b"then silence").expect("the first echo");
        let quiet_since = Instant::now();
        let mut byte = [0; 1];
        let read = idle.read(&mut byte);
        let closed_after = quiet_since.elapsed();
        assert!(
            matches!(read, Ok(0)),
            "expected a clean end of stream from the idle timeout, got {read:?}"
        );
        // The server's clock started a moment before ours: by as long as
        // this thread took to see the echo, which a loaded machine stretches.
        assert!(
            closed_after >= timeout - Duration::from_millis(500),
            "closed after {closed_after:?}, before the {timeout:?} idle timeout"
        );
        assert!(
            closed_after <= timeout + slack,
            "closed after {closed_after:?}, expected within {timeout:?} + {slack:?}"
        );
        active
            .join()
            .expect("the active client thread")
            .unwrap_or_else(|err| panic!("{err}; log:\n{}", server.log()));
        eprintln!(
            "idle connection closed {closed_after:?} after its last echo (timeout {timeout:?})"
        );
        server.stop_cleanly();
    });
}

#[test]
fn max_connections_refuses_the_excess_at_once_and_warns_at_most_once_a_second() {
    with_time_limit(Duration::from_secs(60), || {
        let mut server = ServerProcess::start(&["--workers", "2", "-q", "--max-connections", "5"]);
        let addr = server.addr;
        let mut admitted: Vec<TcpStream> = (0..5).map(|_| connect(addr)).collect();
        for (i, stream) in admitted.iter_mut().enumerate() {
            echo_on(stream, b"in").unwrap_or_else(|err| panic!("admitted connection {i}: {err}"));
        }

        // A burst spread over a few seconds, so the throttle has to work.
        const EXCESS: usize = 150;
        let burst_started = Instant::now();
        let mut slowest = Duration::ZERO;
        for i in 0..EXCESS {
            let mut stream = connect(addr);
            let took = closed_by_server(&mut stream).unwrap_or_else(|err| {
                panic!("excess connection {i}: {err}; log:\n{}", server.log())
            });
            slowest = slowest.max(took);
            thread::sleep(Duration::from_millis(15));
        }
        let burst = burst_started.elapsed();
        for (i, stream) in admitted.iter_mut().enumerate() {
            echo_on(stream, b"still")
                .unwrap_or_else(|err| panic!("admitted connection {i} after the burst: {err}"));
        }
        drop(admitted);

        let summary = server.stop_cleanly();
        let log = server.log();
        let warnings = log
            .lines()
            .filter(|line| line.contains("WARN") && line.contains("connection limit reached"))
            .count();
        let allowed = burst.as_secs() as usize + 1;
        eprintln!(
            "{EXCESS} refused over {burst:?}, slowest refusal {slowest:?}, {warnings} warnings"
        );
        assert!(
            (1..=allowed).contains(&warnings),
            "expected 1 to {allowed} limit warnings over a {burst:?} burst, got {warnings}; log:\n{log}"
        );
        assert_eq!(
            summary_count(&summary, "connections refused"),
            EXCESS as u64,
            "{summary}"
        );
    });
}

#[test]
fn a_client_that_saw_its_only_allowed_connection_end_can_connect_again_at_once() {
    with_time_limit(Duration::from_secs(60), || {
        // As a health check or a sequential test does: half-close, read to
        // the end, and reconnect at once. The server's end of stream must
        // come after it has freed the connection's place.
        for limit in ["--max-connections", "--max-connections-per-ip"] {
            let mut server = ServerProcess::start(&["--workers", "2", "-q", limit, "1"]);
            let addr = server.addr;
            for round in 0..500 {
                let mut stream = connect(addr);
                let mut echoed = Vec::new();
                let outcome = stream
                    .write_all(b"hello")
                    .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
                    .and_then(|()| stream.read_to_end(&mut echoed));
                assert!(
                    outcome.is_ok() && echoed == b"hello",
                    "{limit} 1, connection {round}: {outcome:?}, echoed {:?}; log:\n{}",
                    String::from_utf8_lossy(&echoed),
                    server.log()
                );
            }
            let summary = server.stop_cleanly();
            assert_eq!(
                summary_count(&summary, "connections refused"),
                0,
                "{summary}"
            );
        }
    });
}

#[test]
fn max_connections_per_ip_refuses_one_address_and_still_admits_another() {
    with_time_limit(Duration::from_secs(60), || {
        let mut server =
            ServerProcess::start(&["--workers", "2", "-q", "--max-connections-per-ip", "3"]);
        let SocketAddr::V4(addr) = server.addr else {
            panic!("the server is bound to 127.0.0.1")
        };
        let from = |ip: Ipv4Addr| {
            let stream = connect_from(ip, addr)
                .unwrap_or_else(|err| panic!("connect from {ip} to {addr}: {err}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("set a read timeout");
            stream
        };
        let first = Ipv4Addr::new(127, 0, 0, 1);
        let second = Ipv4Addr::new(127, 0, 0, 2);

        let mut from_first: Vec<TcpStream> = (0..3).map(|_| from(first)).collect();
        for (i, stream) in from_first.iter_mut().enumerate() {
            echo_on(stream, b"one").unwrap_or_else(|err| panic!("{first} connection {i}: {err}"));
        }
        closed_by_server(&mut from(first))
            .unwrap_or_else(|err| panic!("a 4th connection from {first}: {err}"));

        let mut from_second: Vec<TcpStream> = (0..3).map(|_| from(second)).collect();
        for (i, stream) in from_second.iter_mut().enumerate() {
            echo_on(stream, b"two").unwrap_or_else(|err| {
                panic!(
                    "{second} connection {i}, beside a full {first}: {err}; log:\n{}",
                    server.log()
                )
            });
        }
        closed_by_server(&mut from(second))
            .unwrap_or_else(|err| panic!("a 4th connection from {second}: {err}"));

        // Closing one frees its place; the worker releases it a moment later.
        drop(from_first.pop());
        let readmitted = wait_until(Duration::from_secs(10), || {
            let mut stream = from(first);
            echo_on(&mut stream, b"again").is_ok()
        });
        assert!(
            readmitted,
            "{first} was not admitted again after closing one; log:\n{}",
            server.log()
        );

        let summary = server.stop_cleanly();
        let log = server.log();
        assert!(
            log.contains("per-address limit reached for 127.0.0.1"),
            "expected a per-address warning naming 127.0.0.1; log:\n{log}"
        );
        assert!(
            summary_count(&summary, "connections refused") >= 2,
            "{summary}"
        );
    });
}

#[test]
fn a_client_that_never_reads_keeps_peak_memory_bounded_while_others_are_served() {
    with_time_limit(Duration::from_secs(60), || {
        // One worker, so the pushers share it with everyone else.
        let mut server = ServerProcess::start(&["--workers", "1", "-q"]);
        let addr = server.addr;
        let pid = server.pid();
        // Warm up the read buffer and the allocator before the baseline.
        let warm = payload(1, 1 << 20);
        assert_same_bytes(&warm, &echo_through(addr, &warm, &[65_536]), "warm-up echo");
        let peak_before = status_kib(pid, "VmHWM");

        let stop = Arc::new(AtomicBool::new(false));
        let pushers: Vec<_> = (0..4u64)
            .map(|seed| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || -> u64 {
                    let mut stream = connect(addr);
                    stream.set_nonblocking(true).expect("non-blocking pusher");
                    let chunk = payload(seed, 64 * 1024);
                    let mut pushed = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match stream.write(&chunk) {
                            Ok(n) => pushed += n as u64,
                            // Full: the server stopped reading us, as it should.
                            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(5))
                            }
                            Err(err) => panic!("pusher {seed}: {err}"),
                        }
                    }
                    pushed
                })
            })
            .collect();

        let started = Instant::now();
        let mut rounds = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            let data = payload(100 + rounds, 20_000);
            let echoed = echo_through(addr, &data, &[4_096]);
            assert_same_bytes(&data, &echoed, "a client beside the pushers");
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let pushed: Vec<u64> = pushers
            .into_iter()
            .map(|pusher| pusher.join().expect("a pusher thread"))
            .collect();
        let peak_after = status_kib(pid, "VmHWM");
        let growth = peak_after.saturating_sub(peak_before);
        eprintln!(
            "non-reading clients pushed {pushed:?} bytes in 2s; server VmHWM {peak_before} KiB -> \
             {peak_after} KiB (+{growth} KiB, bound {NON_READER_PEAK_GROWTH_KIB} KiB); \
             {rounds} echoes served beside them"
        );
        assert!(
            growth < NON_READER_PEAK_GROWTH_KIB,
            "peak RSS grew by {growth} KiB while clients pushed without reading; \
             bound {NON_READER_PEAK_GROWTH_KIB} KiB"
        );
        assert!(rounds > 0, "no other client was served");
        server.stop_cleanly();
    });
}

#[test]
fn out_of_descriptors_the_server_neither_spins_nor_dies_and_recovers() {
    with_time_limit(Duration::from_secs(90), || {
        let mut command = Command::new(SERVER_BIN);
        limit_open_files(&mut command, 128);
        let mut server = ServerProcess::start_with(command, &["--workers", "2", "-q"]);
        let addr = server.addr;
        let pid = server.pid();
        let mut first = connect(addr);
        echo_on(&mut first, b"before").expect("an echo before the flood");

        // More than the 128 descriptors the server may hold. The rest wait in
        // the listen backlog; once it is full too, a connect hangs, so stop at
        // the first one that does. The `cannot accept` warning below proves
        // the server ran out.
        let mut crowd: Vec<TcpStream> = Vec::new();
        for _ in 0..300 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(stream) => crowd.push(stream),
                Err(err) if err.kind() == ErrorKind::TimedOut => break,
                Err(err) => panic!("connect #{}: {err}; log:\n{}", crowd.len(), server.log()),
            }
        }
        let exhausted = wait_until(Duration::from_secs(20), || {
            server.log().contains("cannot accept")
        });
        assert!(
            exhausted,
            "expected a `cannot accept` warning; log:\n{}",
            server.log()
        );
        let fds_at_limit = open_fds(pid);

        let window = Duration::from_secs(2);
        let (used, share) = cpu_share_during(pid, || thread::sleep(window));
        assert!(
            is_running(pid),
            "the server died without descriptors; log:\n{}",
            server.log()
        );
        eprintln!(
            "{} connections, out of descriptors ({fds_at_limit} open): the server used {used:?} of CPU in {window:?} ({:.1}% of a core)",
            crowd.len(),
            share * 100.0
        );
        assert!(
            share < OUT_OF_FDS_CPU_SHARE,
            "the server used {:.0}% of a core while it could not accept (bound {:.0}%)",
            share * 100.0,
            OUT_OF_FDS_CPU_SHARE * 100.0
        );
        // Existing connections are still served while the acceptor waits.
        echo_on(&mut first, b"during")
            .expect("an echo on an existing connection while out of descriptors");

        drop(crowd);
        let recovered = wait_until(Duration::from_secs(30), || {
            try_echo(addr, b"after", Duration::from_secs(5)).is_ok()
        });
        assert!(
            recovered,
            "no echo within 30s of freeing descriptors; log:\n{}",
            server.log()
        );
        assert!(is_running(pid), "the server died; log:\n{}", server.log());
        drop(first);
        server.stop_cleanly();
    });
}

/// The share of one core that process `pid` uses while `during` runs.
fn cpu_share_during(pid: i32, during: impl FnOnce()) -> (Duration, f64) {
    let cpu_before = cpu_time(pid);
    let wall = Instant::now();
    during();
    let used = cpu_time(pid).saturating_sub(cpu_before);
    (used, used.as_secs_f64() / wall.elapsed().as_secs_f64())
}

/// The waits the server's summary line says busy polling caught.
fn busy_poll_catches(server: &ServerProcess, summary: &str) -> u64 {
    summary
        .split_once("busy polling caught ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no busy-polling count in {summary:?}; log:\n{}",
                server.log()
            )
        })
}

/// Starts a one-worker server with `--busy-poll busy_poll` and a connection
/// that echoes 64 B messages, failing the test with the log if one fails.
fn ping_pong_server(busy_poll: &str) -> (ServerProcess, impl FnMut(&str, &ServerProcess)) {
    let server = ServerProcess::start(&["--workers", "1", "--busy-poll", busy_poll, "-q"]);
    let mut stream = connect(server.addr);
    let message = payload(7, 64);
    let echo = move |what: &str, server: &ServerProcess| {
        if let Err(err) = echo_on(&mut stream, &message) {
            panic!("{what}: {err}; log:\n{}", server.log());
        }
    };
    (server, echo)
}

#[test]
fn busy_polling_spins_for_ping_pong_and_stops_for_sparse_or_no_traffic() {
    with_time_limit(Duration::from_secs(60), || {
        // The longest window, so a worker that kept spinning could not hide:
        // spinning 1 ms after each of the sparse pings below would use half a core.
        let (mut server, mut echo) = ping_pong_server("1ms");
        let pid = server.pid();
        // Back-to-back ping-pong: the traffic that makes a worker spin.
        for _ in 0..2000 {
            echo("ping-pong", &server);
        }
        let (sparse_used, sparse_share) = cpu_share_during(pid, || {
            for _ in 0..500 {
                thread::sleep(Duration::from_millis(2));
                echo("a sparse ping", &server);
            }
        });
        let (idle_used, idle_share) =
            cpu_share_during(pid, || thread::sleep(Duration::from_secs(1)));
        echo("after the quiet", &server);
        drop(echo);
        let summary = server.stop_cleanly();
        let caught = busy_poll_catches(&server, &summary);
        eprintln!(
            "a ping every 2 ms: the server used {sparse_used:?} of CPU ({:.1}% of a core); \
             then idle: {idle_used:?} ({:.1}%); {summary}",
            sparse_share * 100.0,
            idle_share * 100.0
        );
        assert!(
            caught > 0,
            "busy polling never caught an event in 2,000 round trips; log:\n{}",
            server.log()
        );
        for (what, share) in [("sparse pings", sparse_share), ("idle", idle_share)] {
            assert!(
                share < BUSY_POLL_QUIET_CPU_SHARE,
                "{what}: the server used {:.0}% of a core (bound {:.0}%); log:\n{}",
                share * 100.0,
                BUSY_POLL_QUIET_CPU_SHARE * 100.0,
                server.log()
            );
        }
    });
}

#[test]
fn busy_poll_zero_never_spins() {
    with_time_limit(Duration::from_secs(60), || {
        let (mut server, mut echo) = ping_pong_server("0");
        for _ in 0..500 {
            echo("ping-pong", &server);
        }
        drop(echo);
        let summary = server.stop_cleanly();
        assert_eq!(
            busy_poll_catches(&server, &summary),
            0,
            "--busy-poll 0 still caught events by polling: {summary}; log:\n{}",
            server.log()
        );
    });
}
