//! The echo itself, through the library: byte-exact for any payload and any
//! chunking, urgent data, half-close, backpressure, resets and many
//! connections.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn echoes_random_binary_payloads_exactly_whatever_the_chunking() {
    with_time_limit(Duration::from_secs(120), || {
        let server = start_server(quiet_config(2));
        let addr = server.local_addr();
        let sizes = [
            1,
            2,
            17,
            1000,
            4096,
            65_535,
            65_536,
            65_537,
            300_001,
            1 << 20,
            4 << 20,
        ];
        for (seed, &size) in sizes.iter().enumerate() {
            let data = payload(seed as u64, size);
            let chunk_plan = payload(seed as u64 + 100, 8);
            let chunks: Vec<usize> = chunk_plan
                .iter()
                .map(|&b| 1 + (b as usize * 397) % 70_000)
                .collect();
            let echoed = echo_through(addr, &data, &chunks);
            assert_same_bytes(
                &data,
                &echoed,
                &format!("{size}-byte payload in chunks {chunks:?}"),
            );
        }
        server.shutdown_handle().shutdown();
        let summary = server.join().expect("clean stop");
        let total: u64 = sizes.iter().map(|&n| n as u64).sum();
        assert_eq!(summary.bytes_received, total);
        assert_eq!(summary.bytes_echoed, total);
    });
}

#[test]
fn serves_two_thousand_concurrent_connections_on_two_workers() {
    with_time_limit(Duration::from_secs(120), || {
        // Both ends live in this process.
        need_open_files(2 * 2000 + 100);
        let server = start_server(quiet_config(2));
        let addr = server.local_addr();
        // Open them all first, so they really are concurrent.
        let mut streams: Vec<_> = (0..2000).map(|_| connect(addr)).collect();
        for (i, stream) in streams.iter_mut().enumerate() {
            stream
                .write_all(format!("hello {i}\n").as_bytes())
                .expect("write");
        }
        for (i, stream) in streams.iter_mut().enumerate() {
            let expected = format!("hello {i}\n");
            let mut got = vec![0; expected.len()];
            stream.read_exact(&mut got).expect("read echo");
            assert_eq!(got, expected.as_bytes(), "connection {i}");
        }
        drop(streams);
        server.shutdown_handle().shutdown();
        let summary = server.join().expect("clean stop");
        assert_eq!(summary.connections_served, 2000);
    });
}

#[test]
fn half_close_echoes_everything_then_closes() {
    with_time_limit(Duration::from_secs(30), || {
        let server = start_server(quiet_config(1));
        let mut stream = connect(server.local_addr());
        let data = payload(7, 200_000);
        stream.write_all(&data).expect("write");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut echoed = Vec::new();
        stream
            .read_to_end(&mut echoed)
            .expect("read to the server's end of stream");
        assert_same_bytes(&data, &echoed, "echo after half-close");
    });
}

#[test]
fn urgent_data_is_echoed_in_place_and_the_bytes_after_it_too() {
    with_time_limit(Duration::from_secs(120), || {
        let server = start_server(quiet_config(1));
        let addr = server.local_addr();
        const ROUNDS: u64 = 20;
        for round in 0..ROUNDS {
            let mut stream = connect(addr);
            stream.set_nodelay(true).expect("TCP_NODELAY");
            // Sent back to back, so the server usually finds all three
            // pieces queued at once, with the urgent mark in the middle.
            stream.write_all(b"abc").expect("write");
            send_urgent(&stream, b'X');
            stream.write_all(b"def").expect("write");
            let echoed = read_echo_of_len(&mut stream, 7)
                .unwrap_or_else(|err| panic!("round {round}: expected b\"abcXdef\" back; {err}"));
            assert_eq!(
                echoed, b"abcXdef",
                "round {round}: the urgent byte is echoed in place"
            );
        }
        server.shutdown_handle().shutdown();
        let summary = server.join().expect("clean stop");
        assert_eq!(summary.bytes_received, 7 * ROUNDS);
        assert_eq!(summary.bytes_echoed, 7 * ROUNDS);
    });
}

#[test]
fn a_client_resetting_mid_echo_does_not_disturb_others() {
    with_time_limit(Duration::from_secs(60), || {
        let server = start_server(quiet_config(1));
        let addr = server.local_addr();
        let steady = thread::spawn(move || {
            for round in 0..20 {
                let data = payload(round, 50_000);
                let echoed = echo_through(addr, &data, &[4096]);
                assert_same_bytes(&data, &echoed, "steady client");
            }
        });
        for round in 0..50 {
            let mut rude = connect(addr);
            rude.write_all(&payload(round, 100_000)).expect("write");
            reset_on_close(&rude);
            drop(rude);
        }
        steady.join().expect("the steady client was served");
        // The server still answers.
        let echoed = echo_through(addr, b"still here", &[3]);
        assert_eq!(echoed, b"still here");
    });
}

#[test]
fn a_client_that_never_reads_does_not_starve_others_on_its_worker() {
    with_time_limit(Duration::from_secs(60), || {
        let server = start_server(quiet_config(1));
        let addr = server.local_addr();
        let mut hog = connect(addr);
        push_until_stalled(&mut hog, &payload(1, 64 * 1024));
        for round in 0..20 {
            let data = payload(round, 10_000);
            let echoed = echo_through(addr, &data, &[1000]);
            assert_same_bytes(&data, &echoed, "client beside a hog");
        }
        drop(hog);
    });
}
