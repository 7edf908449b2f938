//! The client as a load generator, as a specification: thousands of
//! connections on a few event-loop threads, each echo still checked byte
//! for byte. Every run is on loopback with port 0 and a hard time limit,
//! and asserts counts and orders of magnitude only: these tests share a
//! slow machine with others.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use common::with_time_limit;
use echo_chamber::client::{self, ClientConfig, Payload, StopHandle};
use echo_chamber::server::config::ServerConfig;

const LIMIT: Duration = Duration::from_secs(120);

fn config_for(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        target: addr
            .to_string()
            .parse()
            .expect("a socket address is a target"),
        ..ClientConfig::default()
    }
}

/// The project's server, in this process, taking `connections` at once.
fn server_for(connections: usize) -> echo_chamber::server::Server {
    common::start_server(ServerConfig {
        max_connections: connections,
        shutdown_timeout: Duration::from_secs(2),
        ..common::quiet_config(2)
    })
}

#[test]
fn five_thousand_connections_on_two_threads_all_echo_exactly() {
    with_time_limit(LIMIT, || {
        // Both ends are in this process: a descriptor each, and some slack.
        common::need_open_files(2 * 5_000 + 100);
        let server = server_for(5_000);
        let config = ClientConfig {
            payload: Payload::Generated {
                size: NonZeroUsize::new(100).expect("not zero"),
            },
            repeat: 3,
            connections: NonZeroUsize::new(5_000).expect("not zero"),
            threads: NonZeroUsize::new(2),
            // Connects queued behind a full backlog wait for SYN resends.
            timeout: Duration::from_secs(30),
            ..config_for(server.local_addr())
        };
        let report = client::run(&config, &|_| {}, &StopHandle::new()).expect("valid config");
        assert!(report.is_success(), "{}", report.summary(false));
        assert_eq!(
            (report.sent, report.echoed, report.bytes_echoed),
            (15_000, 15_000, 1_500_000),
            "{}",
            report.summary(false)
        );
    });
}
