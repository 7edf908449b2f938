//! Scaling out behind a real load balancer: HAProxy (installed by `.ci/run`;
//! this test fails rather than skips without it in CI) in front of three
//! `echo-server`s with the PROXY protocol, using `contrib/haproxy/echo.cfg`
//! with free loopback ports. A reconnecting client keeps 50 connections
//! echoing while each backend in turn is stopped (it drains) and started
//! again on its port: every echo sent comes back exact, none is lost, and
//! the backends log the client's address from the PROXY header.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::client::Json;
use common::{ServerProcess, with_time_limit};

/// A backend on fixed ports (HAProxy's configuration names them, and a
/// restarted backend takes them again): see [`common::unused_port`].
struct Backend {
    port: u16,
    metrics: u16,
}

impl Backend {
    fn start(&self) -> ServerProcess {
        let port = self.port.to_string();
        let metrics = format!("127.0.0.1:{}", self.metrics);
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--workers",
            "1",
            "--proxy-protocol",
            // HAProxy connects from 127.0.0.2 (its `source`), the client
            // from 127.0.0.1: the logs tell the header's address apart.
            "--proxy-from",
            "127.0.0.2",
            "--metrics",
            &metrics,
            "--drain-delay",
            "1s",
        ];
        ServerProcess::start_exact(Command::new(common::SERVER_BIN), &args)
    }
}

/// HAProxy running the shipped configuration on these ports.
struct Haproxy {
    child: std::process::Child,
    _dir: TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // It may have exited already; either way it must not outlive the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0); // only tidying up
    }
}

/// The PROXY protocol version HAProxy sends its backends.
#[derive(Clone, Copy)]
enum Version {
    V1,
    V2,
}

fn start_haproxy(front: u16, backends: &[Backend], version: Version) -> Haproxy {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/haproxy/echo.cfg"
    ))
    .expect("read contrib/haproxy/echo.cfg");
    let mut config = shipped.replace("bind 127.0.0.1:7000", &format!("bind 127.0.0.1:{front}"));
    for (n, backend) in backends.iter().enumerate() {
        let from = format!("127.0.0.1:700{} check port 910{}", n + 1, n + 1);
        assert!(config.contains(&from), "the shipped config has no {from:?}");
        let to = format!("127.0.0.1:{} check port {}", backend.port, backend.metrics);
        config = config.replace(&from, &to);
    }
    let send = match version {
        Version::V1 => "send-proxy",
        Version::V2 => "send-proxy-v2",
    };
    config = config.replace("send-proxy-v2", &format!("{send} source 127.0.0.2"));
    let dir = std::env::temp_dir().join(format!("echo-haproxy-{}-{front}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("echo.cfg");
    std::fs::write(&path, config).expect("write the config");
    let mut command = Command::new("haproxy");
    command
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    common::dies_with_test(&mut command);
    let child = command.spawn().expect("start haproxy");
    Haproxy {
        child,
        _dir: TempDir(dir),
    }
}

/// Three backends, HAProxy in front of them, and an echo through it.
fn start_cluster(version: Version) -> (Vec<Backend>, Vec<ServerProcess>, Haproxy, SocketAddr) {
    let backends: Vec<Backend> = (0..3)
        .map(|_| Backend {
            port: common::unused_port(),
            metrics: common::unused_port(),
        })
        .collect();
    let servers: Vec<ServerProcess> = backends.iter().map(Backend::start).collect();
    let front = common::unused_port();
    let haproxy = start_haproxy(front, &backends, version);
    let front_addr: SocketAddr = format!("127.0.0.1:{front}").parse().expect("addr");
    // HAProxy marks a backend up after two good checks (1 s).
    let until = Instant::now() + Duration::from_secs(30);
    while common::try_echo(front_addr, b"through haproxy", Duration::from_secs(5)).is_err() {
        assert!(
            Instant::now() < until,
            "no echo through HAProxy on {front_addr}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(2));
    (backends, servers, haproxy, front_addr)
}

/// `echo-client --reconnect` on 50 connections of 1 KiB echoes, until stopped.
fn start_client(front: SocketAddr) -> std::process::Child {
    let mut client = Command::new(common::client::CLIENT);
    client
        .args([
            &front.to_string(),
            "--reconnect",
            "--connections",
            "50",
            "--repeat",
            "0",
            "--size",
            "1KiB",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::dies_with_test(&mut client);
    client.spawn().expect("start echo-client")
}

/// Stops the client with SIGINT; its exit code, its JSON and its stderr.
fn stop_client(mut client: std::process::Child) -> (Option<i32>, Json, String) {
    // SAFETY: kill only signals our own child.
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    let mut stdout = String::new();
    client
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("read the client's output");
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("read the client's errors");
    let status = client.wait().expect("wait for echo-client");
    let json = Json::parse(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}\n{stderr}"));
    (status.code(), json, format!("{stdout}\n{stderr}"))
}

fn count(json: &Json, key: &str, output: &str) -> f64 {
    json.number(key)
        .unwrap_or_else(|| panic!("no {key} in {output}"))
}

#[test]
fn a_rolling_restart_behind_haproxy_loses_no_echo() {
    with_time_limit(Duration::from_secs(180), || {
        if !common::have_program("haproxy", "-v") {
            return;
        }
        let (backends, mut servers, _haproxy, front) = start_cluster(Version::V2);
        let client = start_client(front);
        thread::sleep(Duration::from_secs(1));
        for (n, backend) in backends.iter().enumerate() {
            let summary = servers[n].stop_cleanly();
            assert!(summary.contains(" served, "), "{summary}");
            servers[n] = backend.start();
            // Up again for HAProxy (two checks), and some echoes through it.
            thread::sleep(Duration::from_millis(2500));
        }
        let (code, json, output) = stop_client(client);
        let count = |key: &str| count(&json, key, &output);
        assert_eq!(code, Some(0), "{output}");
        assert!(
            count("sent") > 1000.0,
            "too few echoes to mean anything: {output}"
        );
        assert_eq!(count("echoed"), count("sent"), "{output}");
        assert_eq!(
            count("mismatched") + count("timed_out") + count("errors"),
            0.0,
            "{output}"
        );
        assert!(
            count("reconnects") >= 1.0,
            "no connection was ever moved: {output}"
        );
        for server in &mut servers {
            let log = server.log();
            server.stop_cleanly();
            if log.contains("open ") {
                assert!(
                    log.contains("open 127.0.0.1:") && log.contains(" via 127.0.0.2:"),
                    "{log}"
                );
            }
        }
    });
}

#[test]
fn a_backend_killed_behind_haproxy_costs_at_most_the_echoes_in_flight_on_it() {
    with_time_limit(Duration::from_secs(180), || {
        if !common::have_program("haproxy", "-v") {
            return;
        }
        let (_backends, mut servers, _haproxy, front) = start_cluster(Version::V2);
        let client = start_client(front);
        thread::sleep(Duration::from_secs(1));
        servers[0].signal(libc::SIGKILL);
        let _ = servers[0].wait_exit(Duration::from_secs(10));
        // The killed backend's connections still open when it died, from
        // its whole log: each had at most one echo in flight (the client
        // waits for each echo).
        let log = servers[0].log();
        let opened = log.matches(" via 127.0.0.2:").count();
        let closed = log.lines().filter(|line| line.contains(" close ")).count();
        let on_killed = opened.saturating_sub(closed) as f64;
        assert!(
            on_killed >= 1.0,
            "leastconn gave the first backend no connection:\n{log}"
        );
        // HAProxy takes it out at its next check; the client moves on.
        thread::sleep(Duration::from_secs(3));
        let (_, json, output) = stop_client(client);
        let count = |key: &str| count(&json, key, &output);
        let lost = count("sent") - count("echoed");
        assert!(
            count("sent") > 1000.0,
            "too few echoes to mean anything: {output}"
        );
        assert_eq!(count("mismatched"), 0.0, "{output}");
        // Nothing beyond the echoes in flight on the killed backend is lost:
        // every other echo came back exact. (A backend killed after reading
        // a message closes with a FIN, which the client cannot tell from a
        // drain, so such a message is resent rather than counted failed; and
        // until HAProxy's next check takes the dead backend out, it may
        // close new client connections whose backend connect failed: their
        // messages were never taken and are resent too. See
        // docs/reconnect.md.)
        assert!(
            lost <= on_killed,
            "{lost} lost, with {on_killed} connections on the killed backend: {output}"
        );
        assert!(
            count("reconnects") >= on_killed,
            "the killed backend's {on_killed} connections did not all move: {output}"
        );
        for server in servers.iter_mut().skip(1) {
            server.stop_cleanly();
        }
    });
}

#[test]
fn haproxys_v1_header_reaches_the_backends_with_the_clients_address() {
    with_time_limit(Duration::from_secs(120), || {
        if !common::have_program("haproxy", "-v") {
            return;
        }
        let (_backends, mut servers, _haproxy, front) = start_cluster(Version::V1);
        for n in 0..6 {
            let message = format!("v1 echo {n}");
            common::try_echo(front, message.as_bytes(), Duration::from_secs(10))
                .unwrap_or_else(|err| panic!("{message}: {err}"));
        }
        let mut logs = String::new();
        for server in &mut servers {
            server.stop_cleanly();
            logs.push_str(&server.log());
        }
        assert!(
            logs.contains("open 127.0.0.1:") && logs.contains(" via 127.0.0.2:"),
            "{logs}"
        );
        assert!(!logs.contains("without a valid PROXY header"), "{logs}");
    });
}
