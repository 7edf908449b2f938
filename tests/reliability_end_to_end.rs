//! The echo's first promise end to end, through the whole flow acceptor →
//! channel → worker → connection of an in-process server: for many
//! concurrent connections with random payload sizes, random write chunking
//! and random read sizes, every connection gets back exactly what it sent.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::*;

/// One connection of a case: what it sends and how it cuts its writes and reads.
#[derive(Debug, Clone)]
struct Client {
    len: usize,
    seed: u64,
    write_chunks: Vec<usize>,
    read_chunks: Vec<usize>,
}

fn clients() -> impl Strategy<Value = Vec<Client>> {
    let len = prop_oneof![0usize..100, 100usize..20_000, 20_000usize..400_000];
    let chunks = || proptest::collection::vec(1usize..70_000, 1..6);
    let client = (len, any::<u64>(), chunks(), chunks()).prop_map(
        |(len, seed, write_chunks, read_chunks)| Client {
            len,
            seed,
            write_chunks,
            read_chunks,
        },
    );
    proptest::collection::vec(client, 1..24)
}

/// Sends the client's payload and reads the echo concurrently, each in its
/// own chunk sizes; returns the payload and what came back.
fn run_client(addr: SocketAddr, client: &Client) -> Result<(Vec<u8>, Vec<u8>), String> {
    let data = payload(client.seed, client.len);
    let mut stream = connect(addr);
    let mut reader = stream.try_clone().map_err(|err| format!("clone: {err}"))?;
    let read_chunks = client.read_chunks.clone();
    let collector = thread::spawn(move || -> Result<Vec<u8>, String> {
        let mut echoed = Vec::new();
        let mut buf = vec![0; 70_000];
        for &size in read_chunks.iter().cycle() {
            match reader.read(&mut buf[..size]) {
                Ok(0) => return Ok(echoed),
                Ok(n) => echoed.extend_from_slice(&buf[..n]),
                Err(err) => return Err(format!("read after {} bytes: {err}", echoed.len())),
            }
        }
        unreachable!("the chunk plan is never empty")
    });
    let mut at = 0;
    for &size in client.write_chunks.iter().cycle() {
        if at == data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        stream
            .write_all(&data[at..end])
            .map_err(|err| format!("write at {at}: {err}"))?;
        at = end;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|err| format!("half-close: {err}"))?;
    let echoed = collector
        .join()
        .map_err(|_| "the reader thread panicked".to_string())??;
    Ok((data, echoed))
}

#[test]
fn many_concurrent_connections_get_back_exactly_what_they_sent_whatever_the_chunking() {
    with_time_limit(Duration::from_secs(150), || {
        let server = start_server(quiet_config(2));
        let addr = server.local_addr();
        let config = Config {
            cases: 48,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let total_bytes = std::cell::Cell::new(0u64);
        let result = runner.run(&clients(), |clients| {
            let threads: Vec<_> = clients
                .iter()
                .cloned()
                .map(|client| thread::spawn(move || (run_client(addr, &client), client)))
                .collect();
            for thread in threads {
                let (result, client) = thread
                    .join()
                    .map_err(|_| TestCaseError::fail("a client thread panicked"))?;
                let (sent, echoed) = result.map_err(|err| {
                    TestCaseError::fail(format!("client {client:?} failed: {err}"))
                })?;
                prop_assert!(
                    sent == echoed,
                    "client {:?}: sent {} bytes, got back {}; first difference at {}",
                    client,
                    sent.len(),
                    echoed.len(),
                    sent.iter()
                        .zip(&echoed)
                        .position(|(a, b)| a != b)
                        .unwrap_or(sent.len().min(echoed.len()))
                );
                total_bytes.set(total_bytes.get() + sent.len() as u64);
            }
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{failure}");
        }
        server.shutdown_handle().shutdown();
        let summary = server.join().expect("the server stops cleanly");
        // Every case passed (no shrinking reran any), so the counts match exactly.
        assert_eq!(
            summary.bytes_received, summary.bytes_echoed,
            "every byte received was echoed: {summary}"
        );
        assert_eq!(
            summary.bytes_echoed,
            total_bytes.get(),
            "the server's echoed count against what the clients got back"
        );
    });
}
