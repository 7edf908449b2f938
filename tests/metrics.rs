//! The metrics and health endpoint (`--metrics ADDR`), as an operator and a
//! hostile client see it: its counts are the exit summary's, read from the
//! same counters; `/readyz` turns 503 at the first signal while `/healthz`
//! stays 200; it stops with the server; and garbage, huge heads, slow
//! clients and floods on its port get an error or a close while the echo
//! goes on undisturbed. All on 127.0.0.1, port 0 for both.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::http::{self, exchange, get, metrics_addr, sample, try_get};
use common::{
    SERVER_BIN, ServerProcess, connect, describe, echo_on, echo_through, need_open_files, payload,
    run_to_end, status_kib, summary_count, try_echo, wait_until, with_time_limit,
};

const LIMIT: Duration = Duration::from_secs(90);

/// The metrics page as it reads now.
fn scrape(metrics: SocketAddr) -> String {
    let response = get(metrics, "/metrics");
    assert_eq!(response.status, 200, "GET /metrics: {}", response.head);
    assert!(
        response
            .head
            .contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        response.head
    );
    response.body
}

/// Scrapes until `settled` holds for the page, for up to 10 s; returns that
/// page, or fails with the last one.
fn scrape_until(metrics: SocketAddr, what: &str, settled: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let page = scrape(metrics);
        if settled(&page) {
            return page;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the metrics never showed {what}; last page:\n{page}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP socket on `ip`:`port` waiting at most `wait` for each echo.
fn udp_client(ip: &str, port: u16, wait: Duration) -> UdpSocket {
    let socket =
        UdpSocket::bind((ip, port)).unwrap_or_else(|err| panic!("bind {ip}:{port}: {err}"));
    socket.set_read_timeout(Some(wait)).expect("read timeout");
    socket
}

/// The number of the summary's `udp: ... echoed (N bytes)`.
fn udp_bytes_echoed(summary: &str) -> u64 {
    let at = summary
        .find("echoed (")
        .unwrap_or_else(|| panic!("no UDP echo count in {summary:?}"));
    summary[at + "echoed (".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `echoed (` in {summary:?}"))
}

#[test]
fn the_metrics_after_a_known_workload_equal_the_exit_summary() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&[
            "--tcp",
            "--udp",
            "--workers",
            "2",
            "--max-connections",
            "2",
            "--udp-rate-per-ip",
            "5",
            "--udp-rate-exempt",
            "none",
            "--metrics",
            "127.0.0.1:0",
        ]);
        let addr = server.addr;
        let metrics = metrics_addr(&server);
        let page = scrape(metrics);
        let version = format!(
            "echo_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&page, &version), 1);

        // Two connections held open fill --max-connections; their bytes
        // show while they are open.
        let held_messages: [&[u8]; 2] = [b"the first held connection", b"and the second"];
        let mut held: Vec<TcpStream> = held_messages
            .iter()
            .map(|message| {
                let mut stream = connect(addr);
                echo_on(&mut stream, message).expect("echo on a held connection");
                stream
            })
            .collect();
        let held_bytes: u64 = held_messages.iter().map(|m| m.len() as u64).sum();
        scrape_until(metrics, "the held connections' bytes", |page| {
            sample(page, "echo_connections_open") == 2
                && sample(page, "echo_received_bytes_total") == held_bytes
                && sample(page, "echo_echoed_bytes_total") == held_bytes
        });

        // A third is over the limit: closed at once, and counted.
        let mut refused = connect(addr);
        let mut nothing = Vec::new();
        // Closed at once, by a FIN or a reset: either way nothing comes.
        let _ = refused.read_to_end(&mut nothing);
        assert!(nothing.is_empty(), "a refused connection got {nothing:?}");
        scrape_until(metrics, "the refusal", |page| {
            sample(
                page,
                "echo_connections_refused_total{reason=\"max-connections\"}",
            ) == 1
        });
        for stream in &mut held {
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            stream.read_to_end(&mut nothing).expect("the server's end");
        }
        drop(held);
        scrape_until(metrics, "no connection open", |page| {
            sample(page, "echo_connections_open") == 0
        });
        let data = payload(7, 10_000);
        let echoed = echo_through(addr, &data, &[1000, 333]);
        common::assert_same_bytes(&data, &echoed, "the last connection's echo");
        let tcp_bytes = held_bytes + data.len() as u64;

        // UDP: three answered, three from a source never answered (the
        // server's own port, on another address), and twenty from one
        // source in a burst, past its rate of 5 a second.
        let ordinary = udp_client("127.0.0.1", 0, Duration::from_secs(10));
        for n in 0..3u8 {
            ordinary.send_to(&[n; 50], addr).expect("send");
            let mut echo = [0; 64];
            let (len, _) = ordinary.recv_from(&mut echo).expect("an echo");
            assert_eq!(&echo[..len], &[n; 50][..]);
        }
        let looping = udp_client("127.0.0.2", addr.port(), Duration::from_millis(300));
        for _ in 0..3 {
            looping.send_to(b"echo server here", addr).expect("send");
        }
        let noisy = udp_client("127.0.0.4", 0, Duration::from_millis(500));
        for _ in 0..20 {
            noisy.send_to(b"noise", addr).expect("send");
        }
        let mut noisy_answered = 0;
        let mut echo = [0; 16];
        while noisy.recv_from(&mut echo).is_ok() {
            noisy_answered += 1;
        }
        assert!(
            (5..20).contains(&noisy_answered),
            "{noisy_answered} of 20 answered at 5 a second with a burst of 5"
        );
        let sent = 3 + 3 + 20;
        let page = scrape_until(
            metrics,
            "every datagram decided and every byte echoed",
            |page| {
                let decided = ["refused-source", "rate-limited", "send-failed"]
                    .iter()
                    .map(|reason| {
                        sample(
                            page,
                            &format!("echo_udp_datagrams_dropped_total{{reason=\"{reason}\"}}"),
                        )
                    })
                    .sum::<u64>()
                    + sample(page, "echo_udp_datagrams_echoed_total");
                sample(page, "echo_udp_datagrams_received_total") == sent
                    && decided == sent
                    && sample(page, "echo_echoed_bytes_total") == tcp_bytes
                    && sample(page, "echo_connections_open") == 0
            },
        );

        let summary = server.stop_cleanly();
        let pairs = [
            (
                "echo_connections_total",
                summary_count(&summary, "connections served"),
            ),
            (
                "echo_received_bytes_total",
                summary_count(&summary, "bytes received"),
            ),
            (
                "echo_echoed_bytes_total",
                summary_count(&summary, "bytes echoed"),
            ),
            (
                "echo_discarded_bytes_total",
                summary_count(&summary, "bytes discarded"),
            ),
            (
                "echo_connections_cut_total",
                summary_count(&summary, "connections cut at the deadline"),
            ),
            (
                "echo_udp_datagrams_received_total",
                summary_count(&summary, "datagrams received"),
            ),
            (
                "echo_udp_datagrams_echoed_total",
                summary_count(&summary, "echoed ("),
            ),
            ("echo_udp_echoed_bytes_total", udp_bytes_echoed(&summary)),
            (
                "echo_udp_datagrams_dropped_total{reason=\"refused-source\"}",
                summary_count(&summary, "refused by source"),
            ),
            (
                "echo_udp_datagrams_dropped_total{reason=\"rate-limited\"}",
                summary_count(&summary, "rate-limited"),
            ),
            (
                "echo_udp_datagrams_dropped_total{reason=\"send-failed\"}",
                summary_count(&summary, "send failures"),
            ),
        ];
        for (series, from_summary) in pairs {
            assert_eq!(
                sample(&page, series),
                from_summary,
                "{series} against the summary {summary:?}; page:\n{page}"
            );
        }
        let refused_total = sample(
            &page,
            "echo_connections_refused_total{reason=\"max-connections\"}",
        ) + sample(&page, "echo_connections_refused_total{reason=\"per-ip\"}");
        assert_eq!(
            refused_total,
            summary_count(&summary, "connections refused")
        );

        // And both are the workload's own numbers.
        assert_eq!(
            summary_count(&summary, "connections served"),
            3,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "connections refused"),
            1,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "bytes received"),
            tcp_bytes,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "bytes echoed"),
            tcp_bytes,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "datagrams received"),
            sent,
            "{summary}"
        );
        assert_eq!(summary_count(&summary, "refused by source"), 3, "{summary}");
        assert_eq!(
            summary_count(&summary, "echoed ("),
            3 + noisy_answered,
            "{summary}"
        );
        assert_eq!(
            udp_bytes_echoed(&summary),
            150 + 5 * noisy_answered,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "rate-limited"),
            20 - noisy_answered,
            "{summary}"
        );
    });
}

#[test]
fn readyz_turns_503_at_the_signal_while_healthz_and_the_echo_go_on_through_the_drain_delay() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&[
            "--workers",
            "1",
            "--drain-delay",
            "2s",
            "--metrics",
            "127.0.0.1:0",
        ]);
        let metrics = metrics_addr(&server);
        let health = get(metrics, "/healthz");
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        let ready = get(metrics, "/readyz");
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
        assert_eq!(sample(&scrape(metrics), "echo_shutting_down"), 0);

        let signalled = Instant::now();
        server.signal(libc::SIGTERM);
        assert!(
            wait_until(Duration::from_secs(1), || {
                try_get(metrics, "/readyz").is_ok_and(|ready| ready.status == 503)
            }),
            "/readyz still not 503 a second after SIGTERM; log:\n{}",
            server.log()
        );
        let turned_after = signalled.elapsed();
        // Within the delay: still accepting and echoing, alive, not ready.
        try_echo(server.addr, b"still accepting", Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("no echo during the drain delay: {err}"));
        assert_eq!(get(metrics, "/healthz").status, 200);
        let ready = get(metrics, "/readyz");
        assert_eq!(ready.body, "shutting down\n");
        assert_eq!(sample(&scrape(metrics), "echo_shutting_down"), 1);
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "the checks above took past the 2 s delay ({:?}); they prove nothing",
            signalled.elapsed()
        );

        let status = server.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "exit {status}; log:\n{}", server.log());
        // The endpoint stopped with the server.
        assert!(
            TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).is_err(),
            "the metrics port still takes connections after the exit"
        );
        eprintln!("/readyz turned 503 {turned_after:?} after the signal");
    });
}

/// Echoes message after message on one connection until told to stop,
/// checking each; counts them.
struct Echoer {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
    thread: thread::JoinHandle<Result<u64, String>>,
}

impl Echoer {
    fn start(addr: SocketAddr) -> Echoer {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&echoes));
        let thread = thread::spawn(move || {
            let mut stream = connect(addr);
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let message = payload(n, 16 + (n % 500) as usize);
                echo_on(&mut stream, &message).map_err(|err| format!("echo {n}: {err}"))?;
                n += 1;
                count.store(n, Ordering::Relaxed);
            }
            Ok(n)
        });
        Echoer {
            stop,
            echoes,
            thread,
        }
    }

    /// Fails the test unless 100 more echoes come back within 10 s.
    fn assert_going_on(&self, during: &str) {
        let before = self.echoes.load(Ordering::Relaxed);
        assert!(
            wait_until(Duration::from_secs(10), || {
                self.echoes.load(Ordering::Relaxed) >= before + 100 || self.thread.is_finished()
            }) && !self.thread.is_finished(),
            "the echo stopped during {during} after {before} echoes"
        );
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(echoes)) => echoes,
            Ok(Err(err)) => panic!("the echo client failed: {err}"),
            Err(_) => panic!("the echo client panicked"),
        }
    }
}

#[test]
fn the_metrics_port_survives_garbage_huge_heads_slow_clients_and_floods_while_the_echo_goes_on() {
    with_time_limit(LIMIT, || {
        need_open_files(4096);
        let mut server = ServerProcess::start(&["--workers", "2", "--metrics", "127.0.0.1:0"]);
        let metrics = metrics_addr(&server);
        let echoer = Echoer::start(server.addr);
        echoer.assert_going_on("the start");

        // Garbage: an error and a close.
        let mut tls_hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
        tls_hello.extend(payload(1, 500));
        let garbage: Vec<Vec<u8>> = vec![
            tls_hello,
            b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
            b"\0\0\0\0\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/7.0\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
        ];
        for bytes in &garbage {
            let answer = exchange(metrics, bytes)
                .unwrap_or_else(|err| panic!("sending {} bytes of garbage: {err}", bytes.len()));
            let response = http::parse(&answer).unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(
                response.status,
                400,
                "for {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            );
        }
        echoer.assert_going_on("garbage");

        // A head of 100 KiB: 431, and the rest of it thrown away.
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        huge.resize(100 * 1024, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let answer = exchange(metrics, &huge).unwrap_or_else(|err| panic!("huge head: {err}"));
        let response = http::parse(&answer).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(response.status, 431, "{}", response.head);
        echoer.assert_going_on("a huge head");

        // A slow client that never finishes its head holds one place until
        // its deadline, and no one else waits meanwhile.
        let mut slow = TcpStream::connect(metrics).expect("connect");
        let began = Instant::now();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
            .expect("write half a head");
        assert_eq!(get(metrics, "/healthz").status, 200);
        echoer.assert_going_on("a slow client");
        slow.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut cut = Vec::new();
        // A reset instead of the 408 would also be a cut; the 408 is checked.
        let _ = slow.read_to_end(&mut cut);
        let waited = began.elapsed();
        assert!(
            (Duration::from_secs(4)..Duration::from_secs(9)).contains(&waited),
            "the slow client was cut after {waited:?}, not at its 5 s deadline"
        );
        assert!(
            cut.starts_with(b"HTTP/1.1 408 "),
            "the slow client got {:?}",
            String::from_utf8_lossy(&cut)
        );

        // A flood of connections that send nothing: each new one pushes out
        // the oldest, the rest go at their deadline; memory stays flat, the
        // echo goes on, and a health probe is answered during the flood.
        let rss_before = status_kib(server.pid(), "VmRSS");
        let flood: Vec<TcpStream> = (0..400)
            .filter_map(|_| TcpStream::connect_timeout(&metrics, Duration::from_secs(5)).ok())
            .collect();
        assert!(flood.len() >= 300, "only {} of 400 connected", flood.len());
        echoer.assert_going_on("a flood of connections");
        server.wait_for_log(
            "connections without a whole request closed to make room",
            Duration::from_secs(10),
        );
        let during = try_get(metrics, "/healthz");
        assert!(
            during.as_ref().is_ok_and(|health| health.status == 200),
            "/healthz during a flood of silent connections: {during:?}"
        );
        let rss_after = status_kib(server.pid(), "VmRSS");
        assert!(
            rss_after < rss_before + 4096,
            "the flood grew the server from {rss_before} KiB to {rss_after} KiB"
        );
        drop(flood);
        assert!(
            wait_until(Duration::from_secs(10), || {
                try_get(metrics, "/healthz").is_ok_and(|health| health.status == 200)
            }),
            "/healthz did not answer after the flood ended"
        );

        let echoes = echoer.finish();
        let page = scrape(metrics);
        assert!(
            sample(&page, "echo_received_bytes_total") > 0,
            "after {echoes} echoes:\n{page}"
        );
        let summary = server.stop_cleanly();
        assert_eq!(
            summary_count(&summary, "connections served"),
            1,
            "{summary}"
        );
    });
}

#[test]
fn a_metrics_address_that_does_not_parse_is_a_usage_error() {
    with_time_limit(LIMIT, || {
        let args = ["--port", "0", "--metrics", "localhost:9100"];
        let output = run_to_end(SERVER_BIN, &args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{}",
            describe(SERVER_BIN, &args, &output)
        );
        assert!(
            stderr.contains("127.0.0.1:9100"),
            "{}",
            describe(SERVER_BIN, &args, &output)
        );
    });
}

#[test]
fn a_metrics_port_in_use_is_a_one_line_error_before_anything_is_served() {
    with_time_limit(LIMIT, || {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr").to_string();
        let args = ["--bind", "127.0.0.1", "--port", "0", "--metrics", &addr];
        let output = run_to_end(SERVER_BIN, &args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let described = describe(SERVER_BIN, &args, &output);
        assert_eq!(output.status.code(), Some(1), "{described}");
        assert_eq!(stderr.lines().count(), 1, "{described}");
        assert!(
            stderr.contains(&format!(
                "cannot listen for metrics on {addr}: address already in use; another process \
                 is listening there; choose another --metrics port, or port 0 for a free one"
            )),
            "{described}"
        );
    });
}
