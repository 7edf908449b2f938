//! The server behind a proxy (`--proxy-protocol`): every connection starts
//! with a PROXY header (v1 or v2), which is never echoed and whose client
//! address the server uses for its logs and its per-address limit; headers
//! split into single bytes still work; missing, malformed and late headers
//! and untrusted sources are closed and counted, with throttled warnings.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{ServerProcess, summary_count, with_time_limit};

const LIMIT: Duration = Duration::from_secs(60);
const TRUSTING_LOOPBACK: [&str; 4] = ["--proxy-protocol", "--proxy-from", "127.0.0.0/8", "-v"];

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Reads until the server closes, within the read timeout.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => got,
        // A reset after everything was read is a close too, for these tests.
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(err) => panic!("reading until the server closed: {err} (after {got:?})"),
    }
}

fn v2_tcp4(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x13".to_vec();
    header.extend_from_slice(&client);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&7u16.to_be_bytes());
    // A unique-id TLV of 4 bytes, as HAProxy can add.
    header.extend_from_slice(&[5, 0, 4, b'u', b'u', b'i', b'd']);
    header
}

#[test]
fn the_header_is_never_echoed_and_its_client_is_logged() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&TRUSTING_LOOPBACK);
        let mut v1 = connect(server.addr);
        v1.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7\r\nover v1")
            .expect("write");
        v1.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(read_to_close(&mut v1), b"over v1");
        let mut v2 = connect(server.addr);
        v2.write_all(&v2_tcp4([198, 51, 100, 9], 40002))
            .expect("write");
        v2.write_all(b"over v2").expect("write");
        v2.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(read_to_close(&mut v2), b"over v2");
        server.wait_for_log("close 198.51.100.9:40002", Duration::from_secs(10));
        let log = server.log();
        assert!(log.contains("open 192.0.2.7:40001 via 127.0.0.1:"), "{log}");
        assert!(
            log.contains("open 198.51.100.9:40002 via 127.0.0.1:"),
            "{log}"
        );
        assert!(
            log.contains("192.0.2.7:40001 sent 7 bytes: \"over v1\""),
            "{log}"
        );
        let summary = server.stop_cleanly();
        assert_eq!(summary_count(&summary, "bytes echoed"), 14, "{summary}");
        assert!(
            summary.contains(
                "proxy protocol: 0 connections from untrusted sources, 0 without a valid header"
            ),
            "{summary}"
        );
    });
}

#[test]
fn a_header_split_into_single_bytes_is_still_read_whole() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&TRUSTING_LOOPBACK);
        for header in [
            b"PROXY TCP6 2001:db8::7 ::1 40003 7\r\n".to_vec(),
            v2_tcp4([203, 0, 113, 5], 40004),
        ] {
            let mut stream = connect(server.addr);
            stream.set_nodelay(true).expect("nodelay");
            for byte in &header {
                stream.write_all(&[*byte]).expect("write a byte");
                thread::sleep(Duration::from_millis(2));
            }
            stream.write_all(b"split").expect("write");
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            assert_eq!(read_to_close(&mut stream), b"split");
        }
        server.wait_for_log("close 203.0.113.5:40004", Duration::from_secs(10));
        assert!(
            server.log().contains("open [2001:db8::7]:40003 via"),
            "{}",
            server.log()
        );
        server.stop_cleanly();
    });
}

#[test]
fn a_local_header_is_served_as_the_proxys_own_connection() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&TRUSTING_LOOPBACK);
        let mut stream = connect(server.addr);
        let local_address = stream.local_addr().expect("addr");
        stream
            .write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00health")
            .expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        assert_eq!(read_to_close(&mut stream), b"health");
        server.wait_for_log(
            &format!("open {local_address} via {local_address}"),
            Duration::from_secs(10),
        );
        server.stop_cleanly();
    });
}

#[test]
fn missing_malformed_and_late_headers_close_the_connection_and_are_counted() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&TRUSTING_LOOPBACK);
        // Plain data where a header must be: never echoed.
        let mut plain = connect(server.addr);
        plain
            .write_all(b"hello, no header here\r\n")
            .expect("write");
        assert_eq!(
            read_to_close(&mut plain),
            b"",
            "data without a header was echoed"
        );
        // A header cut short by the client's close, and a whole line short
        // of fields: closed at once, not at the header's deadline.
        let began = Instant::now();
        let mut cut = connect(server.addr);
        cut.write_all(b"PROXY TCP4 192.0.2.1 127.0").expect("write");
        cut.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(read_to_close(&mut cut), b"");
        let mut short = connect(server.addr);
        short.write_all(b"PROXY TCP4\r\nhello").expect("write");
        assert_eq!(read_to_close(&mut short), b"");
        assert!(
            began.elapsed() < Duration::from_secs(4),
            "waited for the header's deadline: {:?}",
            began.elapsed()
        );
        // Nothing at all: closed once the header's time is up (5 s).
        let began = Instant::now();
        let mut silent = connect(server.addr);
        silent
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        assert_eq!(read_to_close(&mut silent), b"");
        assert!(
            began.elapsed() >= Duration::from_secs(4),
            "closed before its time"
        );
        let summary = server.stop_cleanly();
        assert!(summary.contains("4 without a valid header"), "{summary}");
        let warnings = server
            .log()
            .matches("closed without a valid PROXY header")
            .count();
        assert!(
            (1..=4).contains(&warnings),
            "{warnings} warnings:\n{}",
            server.log()
        );
    });
}

#[test]
fn connections_from_outside_proxy_from_are_closed_at_once_and_counted() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&["--proxy-protocol", "--proxy-from", "10.0.0.0/8"]);
        for _ in 0..3 {
            let mut stream = connect(server.addr);
            // A valid header, from an address not trusted to send one.
            let _ = stream.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7\r\nspoofed");
            assert_eq!(read_to_close(&mut stream), b"");
        }
        server.wait_for_log("not a trusted proxy", Duration::from_secs(10));
        let summary = server.stop_cleanly();
        assert!(
            summary.contains("3 connections from untrusted sources"),
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "connections served"),
            0,
            "{summary}"
        );
    });
}

#[test]
fn the_per_address_limit_counts_the_client_the_header_names() {
    with_time_limit(LIMIT, || {
        let mut server = ServerProcess::start(&[
            "--proxy-protocol",
            "--proxy-from",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ]);
        let open_as = |client: &str, port: u16| {
            let mut stream = connect(server.addr);
            let header = format!("PROXY TCP4 {client} 127.0.0.1 {port} 7\r\n");
            stream.write_all(header.as_bytes()).expect("write");
            stream
        };
        let mut first = open_as("192.0.2.1", 40001);
        common::echo_on(&mut first, b"first").expect("the first client is served");
        // The same client again, through the same proxy: over its limit.
        let mut second = open_as("192.0.2.1", 40002);
        let _ = second.write_all(b"second");
        assert_eq!(
            read_to_close(&mut second),
            b"",
            "the client's second connection was served"
        );
        // Another client through the same proxy address is not.
        let mut other = open_as("192.0.2.2", 40003);
        common::echo_on(&mut other, b"other").expect("another client is served");
        drop((first, other));
        let summary = server.stop_cleanly();
        assert_eq!(
            summary_count(&summary, "connections refused"),
            1,
            "{summary}"
        );
    });
}

#[test]
fn proxy_flags_that_cannot_work_are_usage_errors() {
    with_time_limit(LIMIT, || {
        for (args, says) in [
            (
                &["--port", "0", "--proxy-protocol"][..],
                "--proxy-protocol needs --proxy-from",
            ),
            (
                &["--port", "0", "--proxy-from", "10.0.0.0/8"][..],
                "add --proxy-protocol",
            ),
            (
                &[
                    "--port",
                    "0",
                    "--udp",
                    "--proxy-protocol",
                    "--proxy-from",
                    "10.0.0.0/8",
                ][..],
                "add --tcp",
            ),
            (
                &[
                    "--port",
                    "0",
                    "--proxy-protocol",
                    "--proxy-from",
                    "10.0.0.0/99",
                ][..],
                "/99",
            ),
        ] {
            let output = common::run_to_end(common::SERVER_BIN, args, Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(says), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
        }
    });
}
