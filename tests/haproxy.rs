//! Scaling out behind a real load balancer: HAProxy (installed by `.ci/run`;
//! this test fails rather than skips without it in CI) in front of three
//! `echo-server`s with the PROXY protocol, using `contrib/haproxy/echo.cfg`
//! with free loopback ports. A reconnecting client keeps 50 connections
//! echoing while each backend in turn is stopped (it drains) and started
//! again on its port: every echo sent comes back exact, none is lost, and
//! the backends log the client's address from the PROXY header.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::client::Json;
use common::{ServerProcess, with_time_limit};

/// A TCP port free on loopback a moment ago (HAProxy and a restarted
/// backend need fixed ports).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

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

fn start_haproxy(front: u16, backends: &[Backend]) -> Haproxy {
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
    config = config.replace("send-proxy-v2", "send-proxy-v2 source 127.0.0.2");
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

#[test]
fn a_rolling_restart_behind_haproxy_loses_no_echo() {
    with_time_limit(Duration::from_secs(180), || {
        if !common::have_program("haproxy", "-v") {
            return;
        }
        let backends: Vec<Backend> = (0..3)
            .map(|_| Backend {
                port: free_port(),
                metrics: free_port(),
            })
            .collect();
        let mut servers: Vec<ServerProcess> = backends.iter().map(Backend::start).collect();
        let front = free_port();
        let _haproxy = start_haproxy(front, &backends);
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

        let mut client = Command::new(common::client::CLIENT);
        client
            .args([
                &front_addr.to_string(),
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
        let mut client = client.spawn().expect("start echo-client");
        thread::sleep(Duration::from_secs(1));
        for (n, backend) in backends.iter().enumerate() {
            let summary = servers[n].stop_cleanly();
            assert!(summary.contains("connections served"), "{summary}");
            servers[n] = backend.start();
            // Up again for HAProxy (two checks), and some echoes through it.
            thread::sleep(Duration::from_millis(2500));
        }
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
        let count = |key: &str| {
            json.number(key)
                .unwrap_or_else(|| panic!("no {key} in {stdout}"))
        };
        assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(
            count("sent") > 1000.0,
            "too few echoes to mean anything: {stdout}"
        );
        assert_eq!(count("echoed"), count("sent"), "{stdout}\n{stderr}");
        assert_eq!(
            count("mismatched") + count("timed_out") + count("errors"),
            0.0,
            "{stdout}\n{stderr}"
        );
        assert!(
            count("reconnects") >= 1.0,
            "no connection was ever moved: {stdout}"
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
