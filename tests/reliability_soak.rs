//! A soak of the `echo-server` binary: minutes of mixed traffic through the
//! whole flow acceptor → channel → worker → connection, with connection
//! churn, long-lived connections and periodic resets, while the server's RSS
//! and open descriptors are sampled. Neither may grow, and no echo may be
//! lost. Ignored by default; run it with
//! `cargo test --release --test reliability_soak -- --ignored soak`, and set
//! `ECHO_SOAK_SECS` to change its length (60 s by default).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The soak's length when `ECHO_SOAK_SECS` is not set.
const DEFAULT_SOAK_SECS: u64 = 60;

/// Threads that open, echo through and close connections.
const CHURNERS: usize = 4;
/// Threads that keep one connection for the whole soak.
const LONG_LIVED: usize = 2;
/// The pause between two connections of a churner. It keeps the client's
/// TIME_WAIT sockets well below the ephemeral port range over a minute.
const CHURN_PAUSE: Duration = Duration::from_millis(20);
/// Every this many connections, a churner resets instead of closing.
const RESET_EVERY: u64 = 10;

/// How much the server's RSS may rise above its peak during the warm-up
/// (the first quarter): buffers are per worker and per pending tail, so a
/// steady load must not make it grow.
const RSS_GROWTH_BOUND_KIB: u64 = 8 * 1024;

/// What one client thread did.
#[derive(Default)]
struct Tally {
    connections: u64,
    resets: u64,
    bytes_verified: u64,
}

/// A payload size from a mix of tiny, medium and large.
fn mixed_size(seed: u64) -> usize {
    let dice = payload(seed, 4);
    let pick = u32::from_le_bytes([dice[0], dice[1], dice[2], dice[3]]) as usize;
    match pick % 10 {
        0..=4 => 1 + pick % 100,
        5..=8 => 1_000 + pick % 64_000,
        _ => 256_000 + pick % 768_000,
    }
}

fn churner(addr: SocketAddr, id: u64, stop: Arc<AtomicBool>) -> Result<Tally, String> {
    let mut tally = Tally::default();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let seed = id << 32 | round;
        let data = payload(seed, mixed_size(seed));
        if round % RESET_EVERY == RESET_EVERY - 1 {
            let mut stream =
                TcpStream::connect(addr).map_err(|err| format!("churner {id}: connect: {err}"))?;
            // The reset may overtake the write; either way it is a reset client.
            let _ = stream.write_all(&data[..data.len() / 2]);
            reset_on_close(&stream);
            drop(stream);
            tally.resets += 1;
        } else {
            let chunk = 1 + (seed as usize * 7_919) % 70_000;
            let echoed = echo_through(addr, &data, &[chunk]);
            if echoed != data {
                return Err(format!(
                    "churner {id} round {round}: sent {} bytes, got back {} that differ",
                    data.len(),
                    echoed.len()
                ));
            }
            tally.bytes_verified += data.len() as u64;
        }
        tally.connections += 1;
        round += 1;
        thread::sleep(CHURN_PAUSE);
    }
    Ok(tally)
}

fn long_lived(addr: SocketAddr, id: u64, stop: Arc<AtomicBool>) -> Result<Tally, String> {
    let mut tally = Tally {
        connections: 1,
        ..Tally::default()
    };
    let mut stream = connect(addr);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let seed = (1 << 40) | id << 32 | round;
        // Up to the server's pending cap, so write-then-read cannot deadlock.
        let data = payload(seed, 1 + mixed_size(seed) % 65_536);
        stream
            .write_all(&data)
            .map_err(|err| format!("long-lived {id} round {round}: write: {err}"))?;
        let mut echoed = vec![0; data.len()];
        stream
            .read_exact(&mut echoed)
            .map_err(|err| format!("long-lived {id} round {round}: read: {err}"))?;
        if echoed != data {
            return Err(format!("long-lived {id} round {round}: the echo differs"));
        }
        tally.bytes_verified += data.len() as u64;
        round += 1;
    }
    Ok(tally)
}

/// The soak's length from `ECHO_SOAK_SECS`.
fn soak_length() -> Duration {
    match std::env::var("ECHO_SOAK_SECS") {
        Ok(value) => match value.parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => panic!("ECHO_SOAK_SECS={value:?}: expected a whole number of seconds above 0"),
        },
        Err(_) => Duration::from_secs(DEFAULT_SOAK_SECS),
    }
}

#[test]
#[ignore = "soak: minutes long; run with cargo test --release -- --ignored soak"]
fn soak_keeps_rss_and_descriptors_flat_and_loses_no_echo() {
    let length = soak_length();
    with_time_limit(length + Duration::from_secs(180), move || {
        let mut server = ServerProcess::start(&["--workers", "2", "-q"]);
        let addr = server.addr;
        let pid = server.pid();
        let baseline_fds = open_fds(pid);
        let stop = Arc::new(AtomicBool::new(false));

        let mut clients = Vec::new();
        for id in 0..CHURNERS as u64 {
            let stop = Arc::clone(&stop);
            clients.push(thread::spawn(move || churner(addr, id, stop)));
        }
        for id in 0..LONG_LIVED as u64 {
            let stop = Arc::clone(&stop);
            clients.push(thread::spawn(move || long_lived(addr, id, stop)));
        }

        // One sample a second: (seconds in, VmRSS KiB, open descriptors).
        let started = Instant::now();
        let mut samples: Vec<(u64, u64, usize)> = Vec::new();
        while started.elapsed() < length {
            thread::sleep(Duration::from_secs(1));
            assert!(is_running(pid), "the server died; log:\n{}", server.log());
            samples.push((
                started.elapsed().as_secs(),
                status_kib(pid, "VmRSS"),
                open_fds(pid),
            ));
        }
        stop.store(true, Ordering::Relaxed);

        let mut total = Tally::default();
        let mut failures = Vec::new();
        for client in clients {
            match client.join() {
                Ok(Ok(tally)) => {
                    total.connections += tally.connections;
                    total.resets += tally.resets;
                    total.bytes_verified += tally.bytes_verified;
                }
                Ok(Err(failure)) => failures.push(failure),
                Err(panic) => failures.push(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a client thread panicked".into()),
                ),
            }
        }
        assert!(
            failures.is_empty(),
            "clients lost or corrupted echoes:\n{}\nlog:\n{}",
            failures.join("\n"),
            server.log()
        );

        let warm_up = (samples.len() / 4).max(1);
        let warm_peak = samples[..warm_up]
            .iter()
            .map(|&(_, rss, _)| rss)
            .max()
            .unwrap_or_default();
        let later_peak = samples[warm_up..]
            .iter()
            .map(|&(_, rss, _)| rss)
            .max()
            .unwrap_or(warm_peak);
        let fd_peak = samples
            .iter()
            .map(|&(_, _, fds)| fds)
            .max()
            .unwrap_or_default();
        let fd_bound = baseline_fds + CHURNERS + LONG_LIVED + 16;
        eprintln!(
            "soak of {length:?}: {} connections ({} reset), {} bytes verified; \
             VmRSS warm-up peak {warm_peak} KiB, later peak {later_peak} KiB; \
             descriptors baseline {baseline_fds}, peak {fd_peak}",
            total.connections, total.resets, total.bytes_verified
        );
        eprintln!("samples (s, VmRSS KiB, fds): {samples:?}");
        assert!(
            later_peak <= warm_peak + RSS_GROWTH_BOUND_KIB,
            "RSS grew from a warm-up peak of {warm_peak} KiB to {later_peak} KiB \
             (bound +{RSS_GROWTH_BOUND_KIB} KiB); samples: {samples:?}"
        );
        assert!(
            fd_peak <= fd_bound,
            "open descriptors reached {fd_peak}, above {fd_bound} \
             (baseline {baseline_fds} + one per client + slack); samples: {samples:?}"
        );
        let back = wait_until(Duration::from_secs(30), || open_fds(pid) <= baseline_fds);
        assert!(
            back,
            "descriptors did not return to the baseline {baseline_fds}: {} open; log:\n{}",
            open_fds(pid),
            server.log()
        );

        let summary = server.stop_cleanly();
        eprintln!("{summary}");
        assert!(
            summary_count(&summary, "bytes echoed") >= total.bytes_verified,
            "the server echoed less than the clients verified: {summary}"
        );
        assert!(
            summary_count(&summary, "connections served") >= total.connections,
            "{summary}"
        );
    });
}
