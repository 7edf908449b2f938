//! Shared test fixtures: a hard time limit for every test, an in-process
//! server, the `echo-server` binary as a child process with its log, and
//! deterministic binary payloads. All traffic stays on 127.0.0.1, port 0.

#![allow(dead_code)] // each test binary uses its own subset of the fixtures

pub mod client;
pub mod http;
pub mod udp;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use echo_chamber::server::Server;
use echo_chamber::server::config::{LogLevel, ServerConfig};

/// The path of the `echo-server` binary under test.
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_echo-server");

/// Runs `body` on its own thread and fails the test if it has not finished
/// within `limit`. A panic in the body fails the test with its message.
pub fn with_time_limit<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, finished) = mpsc::channel();
    let worker = thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let value = body();
            // The receiver is gone only if the limit already failed the test.
            let _ = done.send(());
            value
        })
        .expect("the test body thread starts");
    match finished.recv_timeout(limit) {
        Ok(()) => worker.join().expect("the test body finished"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("the test did not finish within its time limit of {limit:?}")
        }
    }
}

/// Raises this test process's open-file limit as far as it goes, and fails
/// the test at once, naming the limit, if it stays under `count`: a test
/// that holds many connections would otherwise fail halfway with EMFILE.
pub fn need_open_files(count: u64) {
    match echo_chamber::limits::raise_open_file_limit() {
        Ok(limit) => assert!(
            limit >= count,
            "this test needs {count} open files, and the hard RLIMIT_NOFILE is {limit} \
             (raise it with `ulimit -Hn`)"
        ),
        Err(err) => panic!("cannot raise RLIMIT_NOFILE: {err}"),
    }
}

/// Makes `command`'s process start with at most `count` open files, soft
/// and hard, so that it cannot raise the limit again.
pub fn limit_open_files(command: &mut Command, count: u64) {
    limit_resource(command, libc::RLIMIT_NOFILE, count);
}

/// Makes `command`'s process start with a soft open-file limit of `count`,
/// its hard limit unchanged, as after `ulimit -Sn`: the process may raise
/// it again.
pub fn lower_soft_open_files(command: &mut Command, count: u64) {
    // SAFETY: getrlimit and setrlimit are async-signal-safe and touch only
    // the closure's own struct.
    unsafe {
        command.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = (count as libc::rlim_t).min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Makes `command`'s process start with at most `bytes` of address space
/// (`ulimit -v`), so that a large allocation fails instead of succeeding.
pub fn limit_address_space(command: &mut Command, bytes: u64) {
    limit_resource(command, libc::RLIMIT_AS, bytes);
}

fn limit_resource(command: &mut Command, resource: libc::__rlimit_resource_t, value: u64) {
    let limit = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only `limit`, which
    // the closure owns.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(resource, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A quiet in-process server on 127.0.0.1 with an OS-chosen port.
pub fn start_server(config: ServerConfig) -> Server {
    let listener =
        echo_chamber::server::listener::bind("127.0.0.1:0".parse().expect("loopback address"))
            .expect("bind 127.0.0.1:0");
    Server::start(listener, config).expect("server starts")
}

/// A silent configuration with `workers` workers: the tests report failures
/// themselves, and hundreds of in-process servers would flood the output.
pub fn quiet_config(workers: usize) -> ServerConfig {
    ServerConfig {
        workers,
        log_level: LogLevel::Silent,
        ..ServerConfig::default()
    }
}

/// `len` pseudo-random bytes, the same for the same seed (xorshift64*).
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Connects with generous timeouts, so a broken server fails the test
/// instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
    with_connect_timeouts(stream)
}

/// `stream` with the 30 s read and write timeouts that [`connect`] sets.
pub fn with_connect_timeouts(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("set write timeout");
    stream
}

/// Sends `data` in the given chunk sizes (cycled) while reading concurrently,
/// half-closes, and returns everything read until the server's end of stream.
pub fn echo_through(addr: SocketAddr, data: &[u8], chunks: &[usize]) -> Vec<u8> {
    let mut stream = connect(addr);
    let mut reader = stream.try_clone().expect("clone stream");
    let collector = thread::spawn(move || {
        let mut echoed = Vec::new();
        reader.read_to_end(&mut echoed).map(|_| echoed)
    });
    let mut sizes = chunks.iter().copied().filter(|&n| n > 0).cycle();
    let mut at = 0;
    while at < data.len() {
        let n = sizes.next().unwrap_or(data.len()).min(data.len() - at);
        stream
            .write_all(&data[at..at + n])
            .expect("write to server");
        at += n;
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    collector
        .join()
        .expect("reader thread")
        .expect("read the echo to its end")
}

/// Asserts two byte strings are equal, showing where they first differ
/// rather than dumping megabytes.
pub fn assert_same_bytes(expected: &[u8], got: &[u8], what: &str) {
    if expected == got {
        return;
    }
    let first = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    panic!(
        "{what}: expected {} bytes, got {}; first difference at byte {first}",
        expected.len(),
        got.len()
    );
}

/// Makes the child `command` starts die with the thread that started it.
/// A test that runs out of time leaves its body thread behind, never
/// dropping its child; the kernel then kills the child when that thread
/// ends, at the latest when the test process exits.
pub fn dies_with_test(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// The `echo-server` binary running as a child, with its stderr collected.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// Says (or disconnects) when the log reader has seen the end of stderr.
    log_ended: mpsc::Receiver<()>,
    args: Vec<String>,
}

impl ServerProcess {
    /// Starts `echo-server --bind 127.0.0.1 --port 0 ARGS` and waits for its
    /// `listening on` line.
    pub fn start(args: &[&str]) -> ServerProcess {
        Self::start_with(Command::new(SERVER_BIN), args)
    }

    /// Like [`start`](Self::start), from a prepared command (one with
    /// [`limit_open_files`], say); the server's arguments are appended.
    pub fn start_with(command: Command, args: &[&str]) -> ServerProcess {
        let mut all = vec!["--bind", "127.0.0.1", "--port", "0"];
        all.extend_from_slice(args);
        Self::start_exact(command, &all)
    }

    /// Like [`start_with`](Self::start_with), with exactly `args`: no
    /// `--bind` or `--port` is added (for sockets passed by a test or a
    /// service manager).
    pub fn start_exact(mut command: Command, args: &[&str]) -> ServerProcess {
        let all: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        dies_with_test(&mut command);
        let mut child = command
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn echo-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, address) = mpsc::channel();
        let (ended, log_ended) = mpsc::channel();
        let lines = Arc::clone(&log);
        thread::spawn(move || {
            let mut found = Some(found);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("listening on ") {
                    let rest = &line[at + "listening on ".len()..];
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    if let Some(found) = found.take() {
                        // The test may have given up waiting already.
                        let _ = found.send(addr);
                    }
                }
                lines.lock().expect("log lock").push(line);
            }
            // The test may have stopped waiting for the log.
            let _ = ended.send(());
        });
        let addr = match address.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().unwrap_or_else(|_| {
                let _ = child.kill(); // the test fails here either way
                panic!("bad address {addr:?} in the server's log")
            }),
            Err(_) => {
                let _ = child.kill(); // the test fails below either way
                panic!(
                    "echo-server {all:?} printed no `listening on` line within 30s; log:\n{}",
                    log.lock().expect("log lock").join("\n")
                )
            }
        };
        ServerProcess {
            child,
            addr,
            log,
            log_ended,
            args: all,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal such as `libc::SIGINT`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits up to `limit` for the child to exit; fails the test with the
    /// server's log if it does not.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    // The log reader has the last lines once it sees the end
                    // of stderr (or has gone, after an earlier wait).
                    if let Err(mpsc::RecvTimeoutError::Timeout) =
                        self.log_ended.recv_timeout(Duration::from_secs(10))
                    {
                        panic!("echo-server exited but its stderr stayed open for 10 s");
                    }
                    return status;
                }
                Ok(None) if started.elapsed() < limit => thread::sleep(Duration::from_millis(10)),
                Ok(None) => panic!(
                    "echo-server {:?} did not exit within {limit:?}; log:\n{}",
                    self.args,
                    self.log()
                ),
                Err(err) => panic!("waiting for echo-server: {err}"),
            }
        }
    }

    /// Sends SIGTERM, expects exit 0 within 30 s, and returns the summary line.
    pub fn stop_cleanly(&mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "exit status; log:\n{}", self.log());
        self.summary()
    }

    /// Waits up to `limit` for a log line containing `text`; fails the test
    /// with the log if none comes.
    pub fn wait_for_log(&self, text: &str, limit: Duration) {
        let started = Instant::now();
        while !self.log().contains(text) {
            assert!(
                started.elapsed() < limit,
                "no {text:?} in the log within {limit:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The server's summary line, once it has exited.
    pub fn summary(&self) -> String {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .rev()
            .find(|line| line.contains("shutdown complete: "))
            .cloned()
            .unwrap_or_else(|| panic!("no summary line in the log:\n{}", self.log()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // The child may have exited already; either way it must not outlive the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number from a summary line: `summary_count(line, "bytes echoed")`,
/// which also finds `1 byte echoed`.
pub fn summary_count(summary: &str, label: &str) -> u64 {
    let (noun, rest) = label.split_once(' ').unwrap_or((label, ""));
    let singular = format!("{} {rest}", noun.strip_suffix('s').unwrap_or(noun));
    let at = [label, singular.trim_end()]
        .iter()
        .find_map(|label| summary.find(&format!(" {label}")).map(|at| at + 1))
        .unwrap_or_else(|| panic!("no {label:?} in summary {summary:?}"));
    summary[..at]
        .split_whitespace()
        .next_back()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in {summary:?}"))
}

/// Runs a binary to completion with a time limit and returns its output.
pub fn run_to_end(program: &str, args: &[&str], limit: Duration) -> Output {
    run_with_input(program, args, &[], limit)
}

/// Runs a binary with `stdin` as its input, to completion within `limit`,
/// killing it and failing the test past that.
pub fn run_with_input(program: &str, args: &[&str], stdin: &[u8], limit: Duration) -> Output {
    run_with_io(program, args, stdin, Stdio::piped(), limit)
}

/// Like [`run_with_input`], with `stdout` going where the caller says (such
/// as `/dev/full`); the output's `stdout` is empty unless it is piped.
pub fn run_with_io(
    program: &str,
    args: &[&str],
    stdin: &[u8],
    stdout: Stdio,
    limit: Duration,
) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    run_command(command, stdin, stdout, limit)
}

/// Like [`run_with_io`], for a prepared command (one with
/// [`limit_address_space`], say).
pub fn run_command(mut command: Command, stdin: &[u8], stdout: Stdio, limit: Duration) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = command
        .get_args()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {program}: {err}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    // Dropping `input` after the write closes the pipe: the program sees EOF.
    // A program that exits without reading its input breaks the pipe; fine.
    let feeder = thread::spawn(move || drop(input.write_all(&stdin)));
    let pid = child.id() as i32;
    let (done, finished) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let output = child.wait_with_output();
        // The receiver is gone only if the limit already failed the test.
        let _ = done.send(());
        output
    });
    if finished.recv_timeout(limit).is_err() {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("{program} {args:?} did not finish within {limit:?}");
    }
    // The feeder ends once the pipe is written or broken.
    let _ = feeder.join();
    waiter
        .join()
        .expect("waiter thread")
        .expect("collect output")
}

/// Describes a finished command for failure messages, ripgrep-style.
pub fn describe(program: &str, args: &[&str], output: &Output) -> String {
    format!(
        "command: {program} {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Open descriptors of a process, from /proc.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or_else(|err| panic!("read /proc/{pid}/fd: {err}"))
}

/// A field of /proc/PID/status in kB, such as `VmHWM` or `VmRSS`.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("read /proc/{pid}/status: {err}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// An IPv4 socket address as libc takes it.
fn sockaddr_in(ip: std::net::Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const SOCKADDR_IN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// A TCP socket bound to `ip` and an OS-chosen port, neither listening nor
/// connected: std has no way to bind before connecting, or without listening.
///
/// # Errors
/// The `socket` or `bind` error.
pub fn bound_tcp_socket(ip: std::net::Ipv4Addr) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket has no memory arguments; the descriptor is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let local = sockaddr_in(ip, 0);
    // SAFETY: bind reads `SOCKADDR_IN_LEN` bytes of the sockaddr_in we pass.
    if unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            SOCKADDR_IN_LEN,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// The port a socket from [`bound_tcp_socket`] was given.
///
/// # Errors
/// The `getsockname` error.
pub fn bound_port(socket: &std::os::fd::OwnedFd) -> std::io::Result<u16> {
    use std::os::fd::AsRawFd;
    let mut local = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED, 0);
    let mut len = SOCKADDR_IN_LEN;
    // SAFETY: getsockname writes at most `len` bytes into `local`.
    let rc = unsafe {
        libc::getsockname(
            socket.as_raw_fd(),
            (&mut local as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u16::from_be(local.sin_port))
}

/// Connects to `addr` from the local address `from` (such as 127.0.0.2),
/// which std cannot do: it has no bind-before-connect.
///
/// # Errors
/// The `socket`, `bind` or `connect` error.
pub fn connect_from(
    from: std::net::Ipv4Addr,
    addr: std::net::SocketAddrV4,
) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let socket = bound_tcp_socket(from)?;
    let remote = sockaddr_in(*addr.ip(), addr.port());
    // SAFETY: connect reads `SOCKADDR_IN_LEN` bytes of the sockaddr_in we pass.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            SOCKADDR_IN_LEN,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(socket))
}

/// Writes `chunk` again and again, as a client that never reads, until the
/// stream has taken nothing for three write timeouts of 200 ms in a row:
/// the server has stopped reading it (its output cap) and the kernel
/// buffers between them are full. Returns how much it took. A slow server
/// that still reads now and then does not pass for a stalled one.
pub fn push_until_stalled(stream: &mut TcpStream, chunk: &[u8]) -> usize {
    const GIVE_UP: usize = 512 << 20;
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("set write timeout");
    let mut pushed = 0;
    let mut stalls = 0;
    while stalls < 3 {
        match stream.write(chunk) {
            Ok(n) => {
                pushed += n;
                stalls = 0;
                assert!(
                    pushed < GIVE_UP,
                    "the server kept reading a client that never reads: {pushed} bytes"
                );
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                stalls += 1
            }
            Err(err) => panic!("writing as a client that never reads: {err}"),
        }
    }
    pushed
}

/// Sets SO_LINGER to zero, so that closing `stream` sends a reset, not a FIN.
pub fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_socket_option(stream.as_raw_fd(), libc::SO_LINGER, &linger, "SO_LINGER");
}

/// `setsockopt(fd, SOL_SOCKET, name, value)`, with `value` passed as the
/// bytes of a `T`; fails the test, naming `label`, if it fails. (The crate's
/// own `socket::set_option` is not public.)
pub fn set_socket_option<T>(fd: std::os::fd::RawFd, name: libc::c_int, value: &T, label: &str) {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from `value`, which
    // outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "set {label}: {}", std::io::Error::last_os_error());
}

/// Sends one byte as TCP urgent data (`MSG_OOB`), the way telnet's
/// interrupt or FTP's abort does.
pub fn send_urgent(stream: &TcpStream, byte: u8) {
    use std::os::fd::AsRawFd;
    // SAFETY: send reads one byte from `byte`, which outlives the call.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            (&byte as *const u8).cast(),
            1,
            libc::MSG_OOB,
        )
    };
    assert_eq!(sent, 1, "send MSG_OOB: {}", std::io::Error::last_os_error());
}

/// The CPU time (user + system) a process has used so far, from /proc.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|err| panic!("read /proc/{pid}/stat: {err}"));
    // The command name may hold spaces; the fields after its ')' do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name: state is field 3, utime field 14, stime field 15.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no CPU field {i} in /proc/{pid}/stat: {stat}"))
        })
        .sum();
    // SAFETY: sysconf has no memory arguments.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Polls `check` every 20 ms until it returns true or `limit` passes;
/// returns whether it became true.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if check() {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One short echo on a fresh connection; the error says what went wrong.
///
/// # Errors
/// A description of the failed step.
pub fn try_echo(addr: SocketAddr, data: &[u8], limit: Duration) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, limit).map_err(|err| format!("connect: {err}"))?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|err| format!("set timeout: {err}"))?;
    echo_on(&mut stream, data)
}

/// Reads until `len` bytes have come back, waiting at most 10 s for each
/// read; after a timeout, an error or an early end of stream, says what had
/// come by then.
pub fn read_echo_of_len(stream: &mut TcpStream, len: usize) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|err| format!("set read timeout: {err}"))?;
    let mut echoed = vec![0; len];
    let mut filled = 0;
    while filled < len {
        let so_far = |echoed: &[u8]| String::from_utf8_lossy(&echoed[..filled]).into_owned();
        match stream.read(&mut echoed[filled..]) {
            Ok(0) => return Err(format!("got {:?}, then the end of stream", so_far(&echoed))),
            Ok(n) => filled += n,
            Err(err) => return Err(format!("got {:?}, then: {err}", so_far(&echoed))),
        }
    }
    Ok(echoed)
}

/// Echoes `data` on an open connection and checks it came back exact.
pub fn echo_on(stream: &mut TcpStream, data: &[u8]) -> Result<(), String> {
    stream
        .write_all(data)
        .map_err(|err| format!("write: {err}"))?;
    let mut got = vec![0; data.len()];
    stream
        .read_exact(&mut got)
        .map_err(|err| format!("read the echo: {err}"))?;
    if got != data {
        return Err(format!("echo differs: sent {data:?}, got {got:?}"));
    }
    Ok(())
}

/// Runs `body` on a thread of its own inside a new network namespace (with
/// its loopback up, and whatever `setup` commands of `ip` ran), so that a
/// test can have interfaces, addresses and sysctls of its own without
/// touching the machine's. Children spawned by `body` join the namespace;
/// in-process servers started there serve it. `None` when the namespace
/// cannot be made (not root): the caller skips, except in CI.
pub fn in_network_namespace<T: Send + 'static>(
    setup: &[&[&str]],
    body: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let setup: Vec<Vec<String>> = setup
        .iter()
        .map(|args| args.iter().map(|arg| arg.to_string()).collect())
        .collect();
    let thread = thread::spawn(move || {
        // SAFETY: unshare changes only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let err = std::io::Error::last_os_error();
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: a network namespace must be possible ({err})"
            );
            eprintln!("skipped: cannot make a network namespace ({err})");
            return None;
        }
        let mut commands = vec![vec![
            "link".to_string(),
            "set".into(),
            "lo".into(),
            "up".into(),
        ]];
        commands.extend(setup);
        for args in commands {
            let status = Command::new("ip")
                .args(&args)
                .status()
                .unwrap_or_else(|err| panic!("run ip {args:?}: {err}"));
            assert!(status.success(), "ip {args:?} failed: {status}");
        }
        Some(body())
    });
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Whether `program` runs (asked for its version with `version_flag`).
/// Locally a test may skip without it, saying so; in CI (`CI` set) it must
/// be there, since `.ci/run` installs it, so its absence fails the test.
pub fn have_program(program: &str, version_flag: &str) -> bool {
    let found = Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is missing in CI: .ci/run installs it"
        );
        eprintln!("skipped: {program} is not installed");
    }
    found
}

/// A port free on 127.0.0.1 for TCP and UDP a moment ago, for tools that
/// cannot take port 0 (HAProxy's configuration, a service manager's
/// socket). It comes from below the ephemeral range
/// (`net.ipv4.ip_local_port_range`) where there is room: a port that
/// `bind(0)` hands out is one an outgoing connection of a test running
/// meanwhile may take as its local port before the tool binds it (seen
/// once: HAProxy's backend found its port in use).
pub fn unused_port() -> u16 {
    use std::net::{TcpListener, UdpSocket};
    const LOWEST: u16 = 10_000;
    let first_ephemeral =
        echo_chamber::limits::ephemeral_ports().map_or(32_768, |(first, _)| first);
    if first_ephemeral > LOWEST + 1_000 {
        let span = u32::from(first_ephemeral - LOWEST);
        // A different start per test and per run, so that tests running
        // at once do not try the same ports in the same order.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        let start = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
        for step in 0..span {
            // 7,919 is prime, so the steps visit every port of the span.
            let port =
                LOWEST + u16::try_from((start.wrapping_add(step * 7_919)) % span).unwrap_or(0);
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = tcp.local_addr().expect("a bound address").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
