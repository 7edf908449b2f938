//! The shutdown controller under load, through the `echo-server` binary and a
//! real SIGTERM: with 100 connections echoing flat out, the drain echoes every
//! byte the server received, each client gets an exact prefix of what it
//! sent followed by a clean end of stream, and the process exits 0.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// Connections echoing when the signal arrives.
const CONNECTIONS: usize = 100;

/// The length of the repeating pattern clients send; prime, so that no
/// chunk size lines up with it.
const PATTERN_LEN: usize = 65_521;

/// The byte connection `conn` sends at `offset`: each connection has its own
/// phase of one random pattern, so a byte from another connection or from
/// another offset is caught.
fn pattern_byte(pattern: &[u8], conn: usize, offset: u64) -> u8 {
    pattern[((offset + conn as u64 * 7_919) % PATTERN_LEN as u64) as usize]
}

/// How a client's reading ended.
enum Ending {
    CleanEof,
    Error(ErrorKind, String),
    Corrupt { offset: u64 },
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::CleanEof => write!(f, "a clean end of stream"),
            Ending::Error(kind, message) => write!(f, "a read error ({kind:?}: {message})"),
            Ending::Corrupt { offset } => write!(f, "a wrong byte at offset {offset}"),
        }
    }
}

/// What one client saw.
struct ClientReport {
    conn: usize,
    sent: u64,
    received: u64,
    ending: Ending,
    late_write_error: Option<String>,
}

/// Streams the pattern while a second thread reads and checks the echo;
/// stops sending once the server's end of stream arrived, then closes.
fn run_client(
    addr: SocketAddr,
    conn: usize,
    pattern: Arc<Vec<u8>>,
    received: Arc<AtomicU64>,
) -> ClientReport {
    let mut stream = connect(addr);
    let mut reader = stream.try_clone().expect("clone a client stream");
    let finished = Arc::new(AtomicBool::new(false));
    let reader_thread = {
        let pattern = Arc::clone(&pattern);
        let finished = Arc::clone(&finished);
        thread::spawn(move || {
            let mut buf = vec![0; 32 * 1024];
            let ending = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ending::CleanEof,
                    Ok(n) => {
                        let at = received.load(Ordering::Relaxed);
                        if let Some(bad) =
                            (0..n).find(|&i| buf[i] != pattern_byte(&pattern, conn, at + i as u64))
                        {
                            break Ending::Corrupt {
                                offset: at + bad as u64,
                            };
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(err) if err.kind() == ErrorKind::Interrupted => {}
                    Err(err) => break Ending::Error(err.kind(), err.to_string()),
                }
            };
            finished.store(true, Ordering::Release);
            ending
        })
    };
    let mut sent = 0u64;
    let mut late_write_error = None;
    let mut chunk = Vec::with_capacity(16 * 1024);
    while !finished.load(Ordering::Acquire) {
        let size = 1 + (sent as usize * 31 + conn * 97) % (16 * 1024);
        chunk.clear();
        chunk.extend((0..size as u64).map(|i| pattern_byte(&pattern, conn, sent + i)));
        match stream.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => {
                late_write_error = Some(err.to_string());
                break;
            }
        }
    }
    // The server lingers until our end of stream; a failure here means the
    // connection is already gone, which the reader's ending shows.
    let _ = stream.shutdown(Shutdown::Write);
    let ending = reader_thread.join().expect("the reader thread");
    ClientReport {
        conn,
        sent,
        received: 0,
        ending,
        late_write_error,
    }
}

#[test]
fn sigterm_under_load_echoes_every_received_byte_then_ends_each_stream_cleanly() {
    with_time_limit(Duration::from_secs(150), || {
        // The drain takes seconds here (the clients check every byte of
        // what was in flight, in a debug build); 20 s was once not enough
        // with two builds on both cores, and a connection was cut.
        let mut server =
            ServerProcess::start(&["--workers", "2", "-q", "--shutdown-timeout", "60s"]);
        let addr = server.addr;
        let pattern = Arc::new(payload(99, PATTERN_LEN));
        let counters: Vec<Arc<AtomicU64>> = (0..CONNECTIONS)
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|conn| {
                let pattern = Arc::clone(&pattern);
                let received = Arc::clone(&counters[conn]);
                thread::spawn(move || {
                    let mut report = run_client(addr, conn, pattern, Arc::clone(&received));
                    report.received = received.load(Ordering::Relaxed);
                    report
                })
            })
            .collect();

        // Signal only once every connection is really echoing.
        let all_echoing = wait_until(Duration::from_secs(30), || {
            counters.iter().all(|c| c.load(Ordering::Relaxed) > 0)
        });
        assert!(
            all_echoing,
            "not every connection got an echo within 30s; log:\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(300));
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(80));
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after SIGTERM; log:\n{}",
            server.log()
        );

        let reports: Vec<ClientReport> = clients
            .into_iter()
            .map(|client| client.join().expect("a client thread"))
            .collect();
        let summary = server.summary();
        let mut problems = Vec::new();
        let mut echoed_to_clients = 0;
        for report in &reports {
            echoed_to_clients += report.received;
            if report.received > report.sent {
                problems.push(format!(
                    "client {}: received {} bytes but sent only {}",
                    report.conn, report.received, report.sent
                ));
            }
            match &report.ending {
                Ending::CleanEof => {}
                other => problems.push(format!(
                    "client {}: expected a clean end of stream after {} bytes, got {other} \
                     (write error: {:?})",
                    report.conn, report.received, report.late_write_error
                )),
            }
        }
        assert!(
            problems.is_empty(),
            "{} of {CONNECTIONS} clients saw a problem:\n{}\nsummary: {summary}\nlog:\n{}",
            problems.len(),
            problems.join("\n"),
            server.log()
        );
        let received = summary_count(&summary, "bytes received");
        let echoed = summary_count(&summary, "bytes echoed");
        assert_eq!(
            received, echoed,
            "the drain must echo every received byte: {summary}"
        );
        assert_eq!(
            echoed, echoed_to_clients,
            "bytes the server echoed against bytes the clients read: {summary}"
        );
        eprintln!("drained under load: {summary}");
        assert_eq!(
            summary_count(&summary, "connections served"),
            CONNECTIONS as u64,
            "{summary}"
        );
        assert_eq!(
            summary_count(&summary, "connections cut at the deadline"),
            0,
            "a 20s deadline must not cut anyone: {summary}"
        );
    });
}
