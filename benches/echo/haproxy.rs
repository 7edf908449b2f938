//! Case 8's load balancer: HAProxy as a child process in front of our
//! backends, with the shipped `contrib/haproxy/echo.cfg` (TCP mode,
//! `balance leastconn`, `send-proxy-v2`, `maxconn 8000`) on free loopback
//! ports and without health checks, which the bench does not need: the
//! backends are running before HAProxy starts, and an echo through HAProxy
//! proves the path before anything is measured.
//!
//! The configuration is written to a temporary directory of its own,
//! removed with the process when [`Haproxy`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// The shipped configuration the bench's is made from.
const SHIPPED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/haproxy/echo.cfg"
));

/// How long HAProxy may take from its start to its first echo.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Whether `haproxy` can be run (it is on PATH).
pub fn available() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// HAProxy running as a child, forwarding its front port to the backends.
pub struct Haproxy {
    child: Option<Child>,
    front: SocketAddr,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Haproxy {
    /// Starts HAProxy on a free loopback port in front of `backends` and
    /// waits (bounded) until a 64 B echo comes back through it. A port
    /// taken by someone else between its choice and HAProxy's bind makes
    /// HAProxy exit; that is tried again, twice, on other ports.
    ///
    /// # Errors
    /// The configuration could not be made or written, HAProxy could not
    /// be spawned, or no echo came through in time.
    pub fn start(backends: &[SocketAddr]) -> Result<Haproxy, String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut haproxy = Haproxy::spawn(port, backends)?;
            match haproxy.wait_for_echo() {
                Ok(()) => return Ok(haproxy),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn spawn(port: u16, backends: &[SocketAddr]) -> Result<Haproxy, String> {
        let front = SocketAddr::from(([127, 0, 0, 1], port));
        let config = config(front, backends)?;
        let dir =
            std::env::temp_dir().join(format!("echo-bench-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("haproxy: {}: {e}", dir.display()))?;
        let path = dir.join("echo.cfg");
        let mut haproxy = Haproxy {
            child: None,
            front,
            dir,
            log: Arc::new(Mutex::new(String::new())),
        };
        std::fs::write(&path, config).map_err(|e| format!("haproxy: {}: {e}", path.display()))?;
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches only the child.
        // The parent is the main thread, which lives until the run ends, so
        // HAProxy goes with the bench even if the bench is killed.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("haproxy: spawn: {e}"))?;
        let stderr = child.stderr.take().expect("stderr was set to piped");
        haproxy.child = Some(child);
        let log = Arc::clone(&haproxy.log);
        // Drains stderr so HAProxy never blocks on a full pipe; the text is
        // kept for error messages.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Ok(haproxy)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.front
    }

    /// Its process id (the master; with `-db` it is the only process).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What it has written to stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tries a 64 B echo through HAProxy every 20 ms until one comes back
    /// whole, HAProxy exits, or [`START_LIMIT`] passes.
    fn wait_for_echo(&mut self) -> Result<(), String> {
        let until = Instant::now() + START_LIMIT;
        let message: Vec<u8> = (0..64u8).collect();
        loop {
            let echoed = one_echo(self.front, &message);
            if echoed.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "haproxy exited ({status}) before echoing; stderr: {:?}",
                    self.log()
                ));
            }
            if Instant::now() >= until {
                return Err(format!(
                    "no echo through haproxy on {} within {START_LIMIT:?} ({}); stderr: {:?}",
                    self.front,
                    echoed.err().unwrap_or_default(),
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either may fail only if the child is already gone and reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
        // Only tidying up: a leftover directory in /tmp harms nothing.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shipped configuration with its front on `front`, its servers
/// replaced by `backends`, and its health checks dropped.
///
/// # Errors
/// The shipped file no longer has the shape this relies on.
fn config(front: SocketAddr, backends: &[SocketAddr]) -> Result<String, String> {
    const BIND: &str = "bind 127.0.0.1:7000";
    if !SHIPPED.contains(BIND) {
        return Err(format!("contrib/haproxy/echo.cfg: no {BIND:?} to replace"));
    }
    let last_section = SHIPPED
        .lines()
        .rfind(|line| !line.is_empty() && !line.starts_with([' ', '\t', '#']));
    if last_section != Some("backend echoes") {
        return Err(format!(
            "contrib/haproxy/echo.cfg: the servers are appended to `backend echoes`, \
             but its last section is {last_section:?}"
        ));
    }
    let mut config = String::new();
    for line in SHIPPED.lines() {
        let directive = line.trim_start();
        // Health checks: not needed once each backend is proved to echo.
        if directive.starts_with("server ")
            || directive.starts_with("option httpchk")
            || directive.starts_with("http-check ")
        {
            continue;
        }
        config.push_str(&line.replace(BIND, &format!("bind {front}")));
        config.push('\n');
    }
    for (n, backend) in backends.iter().enumerate() {
        config.push_str(&format!("    server echo{} {backend}\n", n + 1));
    }
    Ok(config)
}

/// A TCP port free on loopback a moment ago (HAProxy binds a fixed port).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// One echo of `message` on a fresh connection to `addr`, bounded in time.
fn one_echo(addr: SocketAddr, message: &[u8]) -> Result<(), String> {
    const LIMIT: Duration = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, LIMIT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(LIMIT)))
        .map_err(|e| e.to_string())?;
    let mut echo = vec![0u8; message.len()];
    stream
        .write_all(message)
        .and_then(|()| stream.read_exact(&mut echo))
        .map_err(|e| e.to_string())?;
    if echo != message {
        return Err("the echo differs from the message".to_string());
    }
    Ok(())
}
