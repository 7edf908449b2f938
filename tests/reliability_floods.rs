//! Resource floods against the `echo-server` binary: ten thousand held
//! connections beside clients that must still be served, and storms of
//! connections that close or reset at once. Afterwards the acceptor and
//! workers must have released every descriptor they took, and the echo must
//! still work. The tests here take one lock each, so that two floods never
//! share the machine's two cores or the test's descriptor budget.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Connections held open while others echo.
const HELD: usize = 10_000;
/// Clients echoing beside the held connections.
const ECHOING: usize = 50;
/// A round trip slower than this counts as a stall. Generous: the point is
/// that held connections never block an active one, not speed.
const STALL: Duration = Duration::from_secs(10);

/// Connections opened before waiting for the acceptor to take them; well
/// under the listen backlog.
const PACE: usize = 64;

static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_flood_at_a_time() -> MutexGuard<'static, ()> {
    // A flood that failed leaves nothing behind that the next one needs.
    ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Waits for the server's descriptor count to come back to `baseline`;
/// fails with the count and the log if it does not within 30 s.
fn assert_descriptors_back_to(server: &ServerProcess, baseline: usize, after: &str) {
    let pid = server.pid();
    let back = wait_until(Duration::from_secs(30), || open_fds(pid) <= baseline);
    assert!(
        back,
        "after {after}: expected the server's open descriptors back at {baseline}, \
         got {} after 30s; log:\n{}",
        open_fds(pid),
        server.log()
    );
}

#[test]
fn ten_thousand_held_connections_on_four_workers_do_not_stall_fifty_echoing_clients() {
    let _flood = one_flood_at_a_time();
    with_time_limit(Duration::from_secs(240), || {
        need_open_files(HELD as u64 + 200);
        let mut server =
            ServerProcess::start(&["--workers", "4", "-q", "--max-connections", "11000"]);
        let addr = server.addr;
        let pid = server.pid();
        let baseline = open_fds(pid);
        let rss_before = status_kib(pid, "VmRSS");

        let mut held = Vec::with_capacity(HELD);
        for i in 0..HELD {
            // Let the acceptor catch up every so often: past the listen
            // backlog the kernel drops SYNs, and each drop costs the client
            // a one-second retransmission (see the report on the backlog).
            if i % PACE == 0 && i > 0 {
                wait_until(Duration::from_secs(10), || {
                    open_fds(pid) + PACE >= baseline + i
                });
            }
            match TcpStream::connect(addr) {
                Ok(stream) => held.push(stream),
                Err(err) => panic!(
                    "connect #{i} of {HELD} failed: {err}; log:\n{}",
                    server.log()
                ),
            }
        }
        let all_accepted = wait_until(Duration::from_secs(60), || open_fds(pid) >= baseline + HELD);
        assert!(
            all_accepted,
            "expected the server to hold {HELD} connections ({} descriptors), it has {}; log:\n{}",
            baseline + HELD,
            open_fds(pid),
            server.log()
        );
        let rss_held = status_kib(pid, "VmRSS");

        let echoing: Vec<_> = (0..ECHOING)
            .map(|client| {
                thread::spawn(move || -> Result<Duration, String> {
                    let mut stream = connect(addr);
                    let mut slowest = Duration::ZERO;
                    for round in 0..20u64 {
                        let size = 1 + (payload(client as u64 * 100 + round, 2)[0] as usize) * 251;
                        let data = payload(client as u64 * 1000 + round, size);
                        let started = Instant::now();
                        stream
                            .write_all(&data)
                            .map_err(|err| format!("client {client} write: {err}"))?;
                        let mut echoed = vec![0; size];
                        stream
                            .read_exact(&mut echoed)
                            .map_err(|err| format!("client {client} read: {err}"))?;
                        slowest = slowest.max(started.elapsed());
                        if echoed != data {
                            return Err(format!("client {client} round {round}: echo differs"));
                        }
                    }
                    Ok(slowest)
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for client in echoing {
            match client.join().expect("an echoing client thread") {
                Ok(time) => slowest = slowest.max(time),
                Err(err) => panic!("{err}; log:\n{}", server.log()),
            }
        }
        assert!(
            slowest < STALL,
            "a round trip beside {HELD} held connections took {slowest:?} (stall bound {STALL:?})"
        );

        // The held connections are live too: a sample of them still echoes.
        for (i, stream) in held.iter_mut().enumerate().step_by(500) {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("set a read timeout");
            echo_on(stream, b"held")
                .unwrap_or_else(|err| panic!("held connection {i} did not echo: {err}"));
        }
        eprintln!(
            "{HELD} held connections: {baseline} descriptors before; VmRSS {rss_before} KiB before, \
             {rss_held} KiB held ({} bytes a connection); slowest round trip beside them {slowest:?}",
            (rss_held.saturating_sub(rss_before) * 1024) / HELD as u64
        );

        drop(held);
        assert_descriptors_back_to(&server, baseline, "closing the held connections");
        try_echo(addr, b"still serving", Duration::from_secs(30))
            .unwrap_or_else(|err| panic!("echo after the flood: {err}; log:\n{}", server.log()));
        server.stop_cleanly();
    });
}

#[test]
fn connect_close_and_reset_storms_leave_no_descriptor_behind_and_echo_still_works() {
    let _flood = one_flood_at_a_time();
    with_time_limit(Duration::from_secs(180), || {
        let mut server = ServerProcess::start(&["--workers", "2", "-q"]);
        let addr = server.addr;
        let baseline = open_fds(server.pid());

        for i in 0..3_000 {
            let stream = TcpStream::connect(addr)
                .unwrap_or_else(|err| panic!("connect-then-close #{i}: {err}"));
            drop(stream);
        }
        assert_descriptors_back_to(&server, baseline, "3000 connect-then-close");

        for i in 0..500u64 {
            let mut stream = TcpStream::connect(addr)
                .unwrap_or_else(|err| panic!("send-then-reset #{i}: {err}"));
            let data = payload(i, 1 + (i as usize * 997) % 100_000);
            // The server may already have answered with more than the
            // kernel holds; a failed write only means the reset came early.
            let _ = stream.write_all(&data);
            reset_on_close(&stream);
            drop(stream);
        }
        assert_descriptors_back_to(&server, baseline, "500 send-then-reset");

        try_echo(addr, b"still serving", Duration::from_secs(30))
            .unwrap_or_else(|err| panic!("echo after the storms: {err}; log:\n{}", server.log()));
        // The listener accepts in order, so every storm connection has been
        // accepted by now, even one that still sat in the backlog above.
        assert_descriptors_back_to(&server, baseline, "the storms and one more echo");
        let summary = server.stop_cleanly();
        eprintln!("storms: baseline {baseline} descriptors; {summary}");
        assert_eq!(
            summary_count(&summary, "connections served"),
            3_501,
            "every storm connection was accepted and served: {summary}"
        );
    });
}

#[test]
fn a_burst_of_a_thousand_connects_waits_in_the_listen_backlog() {
    let _flood = one_flood_at_a_time();
    with_time_limit(Duration::from_secs(60), || {
        const BURST: usize = 1_000;
        need_open_files(BURST as u64 + 100);
        let server = ServerProcess::start(&["--workers", "2", "-q"]);
        let addr = server.addr;
        // The kernel caps every backlog at net.core.somaxconn.
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(BURST);
        let expected = BURST.min(somaxconn);
        // While the server is stopped, only the backlog takes connections;
        // past it the kernel drops SYNs and a connect hangs.
        server.signal(libc::SIGSTOP);
        let mut queued = Vec::with_capacity(expected);
        while queued.len() < expected {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(1_500)) {
                Ok(stream) => queued.push(stream),
                Err(_) => break,
            }
        }
        server.signal(libc::SIGCONT);
        assert_eq!(
            queued.len(),
            expected,
            "connects that completed while the server was paused: the listen backlog \
             holds {} (expected at least {expected} of the documented 4096, capped by somaxconn {somaxconn})",
            queued.len()
        );
        for (i, stream) in queued.iter_mut().enumerate().step_by(100) {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("set a read timeout");
            echo_on(stream, b"q")
                .unwrap_or_else(|err| panic!("queued connection {i} was not served: {err}"));
        }
    });
}
