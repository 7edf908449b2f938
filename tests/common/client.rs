//! Fixtures shared by the client's tests: a hard time limit, the project's
//! in-process echo server, small misbehaving servers, a plain std echo server (to show the
//! client works with any RFC 862 server), a runner for the binary, and a tiny
//! JSON reader for checking `--json` output.
//!
//! A part of `tests/common`; a test file that does not use every fixture
//! would warn about it, hence the allow.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{ExitStatus, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use echo_chamber::server::config::ServerConfig;

/// A listener on 127.0.0.1:0 running `handle` on its own thread for each
/// connection. Dropping it stops accepting (connection threads end with
/// their clients).
pub struct TestServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(handle: fn(TcpStream)) -> TestServer {
        Self::start_on("127.0.0.1:0", handle).expect("bind 127.0.0.1:0")
    }

    pub fn start_on(bind: &str, handle: fn(TcpStream)) -> io::Result<TestServer> {
        Self::serve(bind, move |stream, _| handle(stream))
    }

    /// Like [`start`](Self::start), telling `handle` which connection it
    /// has, from 0 in the order accepted: for servers that treat their
    /// first connection apart.
    pub fn start_numbered(handle: fn(TcpStream, usize)) -> TestServer {
        Self::serve("127.0.0.1:0", handle).expect("bind 127.0.0.1:0")
    }

    fn serve(
        bind: &str,
        handle: impl Fn(TcpStream, usize) + Copy + Send + 'static,
    ) -> io::Result<TestServer> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopping);
        let acceptor = thread::spawn(move || {
            for (number, stream) in listener.incoming().enumerate() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                match stream {
                    Ok(stream) => {
                        thread::spawn(move || handle(stream, number));
                    }
                    // A failed accept (e.g. the client gave up) is not the test's concern.
                    Err(_) => continue,
                }
            }
        });
        Ok(TestServer {
            addr,
            stopping,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept(); if the connect fails the
        // acceptor is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            // A panicking acceptor has already printed its message.
            let _ = acceptor.join();
        }
    }
}

/// RFC 862 with nothing but std: copy everything back until EOF.
pub fn std_echo(stream: TcpStream) {
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(_) => return,
    };
    let mut writer = stream;
    // The copy ends when the client closes or resets; either is fine here.
    let _ = io::copy(&mut reader, &mut writer);
}

/// Accepts and reads everything, never answers.
pub fn never_answers(mut stream: TcpStream) {
    // Runs until the client gives up and closes.
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// Accepts and then neither reads nor answers, holding the connection open
/// for longer than any test's timeout.
pub fn never_reads(stream: TcpStream) {
    thread::sleep(Duration::from_secs(30));
    drop(stream);
}

/// How long [`echoes_late`] holds each echo back.
pub const ECHO_DELAY: Duration = Duration::from_millis(402);

/// Echoes everything, each read's echo [`ECHO_DELAY`] after it came.
pub fn echoes_late(stream: TcpStream) {
    answer_each_read(stream, |data| {
        thread::sleep(ECHO_DELAY);
        data.to_vec()
    });
}

/// Echoes faithfully except that the 6th byte of the stream has its lowest
/// bit flipped.
pub fn corrupts_one_byte(stream: TcpStream) {
    const CORRUPT_AT: usize = 5;
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(_) => return,
    };
    let mut writer = stream;
    let mut position = 0;
    let mut buf = [0u8; 4096];
    loop {
        let read = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if (position..position + read).contains(&CORRUPT_AT) {
            buf[CORRUPT_AT - position] ^= 1;
        }
        position += read;
        if writer.write_all(&buf[..read]).is_err() {
            return;
        }
    }
}

/// Echoes half of the first chunk it reads, then closes its sending side
/// and drains the rest (so the client sees a clean EOF, not a reset).
pub fn echoes_half_then_closes(stream: TcpStream) {
    let Some(mut stream) = echo_half_of_first_chunk(stream) else {
        return;
    };
    // Errors here only mean the client is gone already.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// Echoes half of the first chunk it reads, then answers nothing more,
/// reading until the client gives up and closes.
pub fn echoes_half_then_stalls(stream: TcpStream) {
    let Some(mut stream) = echo_half_of_first_chunk(stream) else {
        return;
    };
    // Runs until the client gives up and closes.
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// The stream, once half of its first chunk is echoed; `None` if the client
/// went away first.
fn echo_half_of_first_chunk(mut stream: TcpStream) -> Option<TcpStream> {
    let mut buf = [0u8; 4096];
    let read = stream.read(&mut buf).ok()?;
    stream.write_all(&buf[..read / 2]).ok()?;
    Some(stream)
}

/// Echoes faithfully, but sends `b"extra"` right after the 22nd byte of the
/// stream (the end of two "Hello Echo!" messages), in the same write, so the
/// extra bytes arrive with the last echo whatever the machine's load.
pub fn adds_bytes_after_two_greetings(stream: TcpStream) {
    const EXTRA_AFTER: usize = 22;
    let mut stream = stream;
    let mut position = 0;
    let mut buf = [0u8; 4096];
    loop {
        let read = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let mut out = buf[..read].to_vec();
        if position < EXTRA_AFTER && EXTRA_AFTER <= position + read {
            let at = EXTRA_AFTER - position;
            out.splice(at..at, b"extra".iter().copied());
        }
        if stream.write_all(&out).is_err() {
            return;
        }
        position += read;
    }
}

/// Echoes everything, but keeps the connection open for longer than any
/// test's timeout after the client has finished sending.
pub fn echoes_but_never_closes(stream: TcpStream) {
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(_) => return,
    };
    let mut writer = stream;
    // Ends when the client half-closes or goes away; either way, hold on.
    let _ = io::copy(&mut reader, &mut writer);
    thread::sleep(Duration::from_secs(30));
}

/// Echoes everything, then answers the client's end of stream with a reset
/// instead of a close.
pub fn echoes_then_resets(stream: TcpStream) {
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(_) => return,
    };
    let mut writer = stream;
    if io::copy(&mut reader, &mut writer).is_ok() {
        super::reset_on_close(&writer);
    }
}

/// Echoes the first five bytes it reads, then resets the connection.
pub fn echoes_five_bytes_then_resets(mut stream: TcpStream) {
    let mut first = [0u8; 5];
    if stream.read_exact(&mut first).is_ok() && stream.write_all(&first).is_ok() {
        super::reset_on_close(&stream);
    }
}

/// Sends back everything it reads twice, in one write: the repeat lands
/// right behind the echo.
pub fn echoes_everything_twice(stream: TcpStream) {
    answer_each_read(stream, |data| [data, data].concat());
}

/// Echoes the first message it got (first read) again for every later read:
/// a server that replays old bytes.
pub fn replays_first_chunk(stream: TcpStream) {
    let mut first: Option<Vec<u8>> = None;
    answer_each_read(stream, |data| {
        let first = first.get_or_insert_with(|| data.to_vec());
        first.iter().copied().cycle().take(data.len()).collect()
    });
}

/// Answers each read with `reply(what was read)` until the client closes.
fn answer_each_read(mut stream: TcpStream, mut reply: impl FnMut(&[u8]) -> Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        let read = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if stream.write_all(&reply(&buf[..read])).is_err() {
            return;
        }
    }
}

/// The default message, `Hello Echo!`, whose length the reconnect servers
/// below count in.
pub const GREETING_LEN: usize = b"Hello Echo!".len();

/// Echoes three greetings, then ends the connection cleanly, as a draining
/// server does between echoes. The third echo is held back (`TCP_CORK`) so
/// that the end of stream leaves in the same segment: the client has it by
/// the time it has the echo, and never races it with its next message.
pub fn closes_after_three_greetings(stream: TcpStream) {
    echo_then_close(stream, 3 * GREETING_LEN);
}

/// Echoes two greetings on its first connection, reads the third whole
/// and ends the connection cleanly without echoing any of it (what a
/// client sees when its message crossed a draining server's end of
/// stream); echoes everything on later connections.
pub fn declines_the_third_greeting_on_its_first_connection(stream: TcpStream, number: usize) {
    if number > 0 {
        return std_echo(stream);
    }
    let Some(mut stream) = echo_exactly(stream, 2 * GREETING_LEN) else {
        return;
    };
    let mut third = [0u8; GREETING_LEN];
    if stream.read_exact(&mut third).is_ok() {
        end_cleanly(stream);
    }
}

/// Reads each greeting whole and ends the connection cleanly without
/// echoing any of it, on every connection: a server that never takes one.
pub fn declines_every_greeting(mut stream: TcpStream) {
    let mut greeting = [0u8; GREETING_LEN];
    if stream.read_exact(&mut greeting).is_ok() {
        end_cleanly(stream);
    }
}

/// Echoes one greeting on its first connection, then resets it while no
/// echo is due; echoes everything on later connections.
pub fn resets_after_one_greeting_on_its_first_connection(stream: TcpStream, number: usize) {
    if number > 0 {
        return std_echo(stream);
    }
    if let Some(stream) = echo_exactly(stream, GREETING_LEN) {
        super::reset_on_close(&stream);
    }
}

/// Echoes half of the first greeting on its first connection and ends it
/// cleanly ([`echoes_half_then_closes`]); echoes everything on later ones.
pub fn echoes_half_on_its_first_connection(stream: TcpStream, number: usize) {
    match number {
        0 => echoes_half_then_closes(stream),
        _ => std_echo(stream),
    }
}

/// Echoes the first `bytes` bytes, the last of them corked together with
/// the end of stream, then reads and drops whatever else comes until the
/// client closes.
pub fn echo_then_close(stream: TcpStream, bytes: usize) {
    if let Some(stream) = echo_exactly_then_cork(stream, bytes) {
        end_cleanly(stream);
    }
}

/// Echoes the first `bytes` bytes read, read by read; `None` if the client
/// went away first.
fn echo_exactly(stream: TcpStream, bytes: usize) -> Option<TcpStream> {
    echo_up_to(stream, bytes, false)
}

/// As [`echo_exactly`], with `TCP_CORK` set before the last write, so that
/// it waits for the end of stream and leaves with it.
fn echo_exactly_then_cork(stream: TcpStream, bytes: usize) -> Option<TcpStream> {
    echo_up_to(stream, bytes, true)
}

fn echo_up_to(mut stream: TcpStream, bytes: usize, cork_last: bool) -> Option<TcpStream> {
    let mut echoed = 0;
    let mut buf = [0u8; 4096];
    while echoed < bytes {
        let room = buf.len().min(bytes - echoed);
        let read = match stream.read(&mut buf[..room]) {
            Ok(0) | Err(_) => return None,
            Ok(read) => read,
        };
        if cork_last && echoed + read == bytes {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt reads one int, which outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    libc::IPPROTO_TCP,
                    libc::TCP_CORK,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "TCP_CORK: {}", io::Error::last_os_error());
        }
        stream.write_all(&buf[..read]).ok()?;
        echoed += read;
    }
    Some(stream)
}

/// Ends the connection with a clean end of stream, then reads and drops
/// what the client still sends until it closes, so that nothing unread
/// turns the close into a reset.
fn end_cleanly(mut stream: TcpStream) {
    // Errors here only mean the client is gone already.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// A port on 127.0.0.1 that refuses connections: a TCP socket bound there
/// but not listening. Held for as long as this lives, so that no other
/// test's port 0 can land on it meanwhile.
pub struct ClosedPort {
    _socket: std::os::fd::OwnedFd,
    addr: SocketAddr,
}

impl ClosedPort {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

pub fn closed_port() -> ClosedPort {
    let localhost = std::net::Ipv4Addr::LOCALHOST;
    let socket = super::bound_tcp_socket(localhost).expect("bind a socket to 127.0.0.1:0");
    let port = super::bound_port(&socket).expect("the bound socket's port");
    ClosedPort {
        _socket: socket,
        addr: SocketAddr::from((localhost, port)),
    }
}

/// The project's own server, in this process, on 127.0.0.1:0. Dropping it
/// shuts it down and joins its threads.
pub struct EchoServer {
    server: echo_chamber::server::Server,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let config = ServerConfig {
            shutdown_timeout: Duration::from_secs(2),
            ..super::quiet_config(2)
        };
        EchoServer {
            server: super::start_server(config),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

/// What a finished `echo-client` process did.
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The client's run with `args` that ended with `output`, `elapsed`
    /// after it started.
    pub fn from_output(args: &[&str], output: &Output, elapsed: Duration) -> Run {
        Run {
            command: format!("{CLIENT} {}", args.join(" ")),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed,
        }
    }

    /// Every line of stdout as one JSON object (`--json` with
    /// `--report-every`: the intervals, then the summary); a line that is
    /// not one fails the test.
    pub fn json_lines(&self) -> Vec<Json> {
        self.stdout
            .lines()
            .map(|line| {
                Json::parse(line)
                    .unwrap_or_else(|error| panic!("{error}: {line:?}\n{}", self.describe()))
            })
            .collect()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Everything about the run, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nelapsed: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

pub const CLIENT: &str = env!("CARGO_BIN_EXE_echo-client");

/// Runs the client binary with `args` and `stdin` bytes, killing it and
/// failing the test if it runs longer than `limit`.
pub fn run_client(args: &[&str], stdin: &[u8], limit: Duration) -> Run {
    let started = Instant::now();
    let output = super::run_with_input(CLIENT, args, stdin, limit);
    Run::from_output(args, &output, started.elapsed())
}

/// The top-level keys of `--json`, in order, as docs/client.md documents them.
pub const JSON_KEYS: [&str; 9] = [
    "sent",
    "echoed",
    "mismatched",
    "timed_out",
    "closed_before_echo",
    "errors",
    "rtt_ms",
    "elapsed_s",
    "echoes_per_s",
];

/// A JSON value, as far as the client's report needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Object(Vec<(String, Json)>),
    Number(f64),
    Text(String),
    Bool(bool),
    Null,
}

impl Json {
    /// Parses exactly one JSON value spanning all of `text` (surrounding
    /// whitespace allowed).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut parser = JsonParser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = parser.value()?;
        parser.skip_space();
        if parser.at != parser.bytes.len() {
            return Err(format!("trailing text at byte {}", parser.at));
        }
        Ok(value)
    }

    pub fn keys(&self) -> Vec<&str> {
        match self {
            Json::Object(fields) => fields.iter().map(|(key, _)| key.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn number(&self, key: &str) -> Option<f64> {
        match self.get(key) {
            Some(Json::Number(n)) => Some(*n),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn skip_space(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip_space();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", byte as char, self.at))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.skip_space();
        match self.bytes.get(self.at) {
            Some(b'{') => self.object(),
            Some(b'n') if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Ok(Json::Null)
            }
            Some(b't') if self.bytes[self.at..].starts_with(b"true") => {
                self.at += 4;
                Ok(Json::Bool(true))
            }
            Some(b'f') if self.bytes[self.at..].starts_with(b"false") => {
                self.at += 5;
                Ok(Json::Bool(false))
            }
            Some(b'"') => self.string().map(Json::Text),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(format!("unexpected value at byte {}", self.at)),
        }
    }

    fn object(&mut self) -> Result<Json, String> {
        self.expect(b'{')?;
        let mut fields = Vec::new();
        self.skip_space();
        if self.bytes.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Ok(Json::Object(fields));
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            fields.push((key, self.value()?));
            self.skip_space();
            match self.bytes.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(fields));
                }
                _ => return Err(format!("expected ',' or '}}' at byte {}", self.at)),
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let start = self.at;
        while let Some(&byte) = self.bytes.get(self.at) {
            match byte {
                b'"' => {
                    let text = std::str::from_utf8(&self.bytes[start..self.at])
                        .map_err(|e| e.to_string())?;
                    self.at += 1;
                    return Ok(text.to_owned());
                }
                b'\\' => return Err("escapes are not expected in the report".to_owned()),
                _ => self.at += 1,
            }
        }
        Err("unterminated string".to_owned())
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.at;
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b"-+.eE0123456789".contains(b))
        {
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).map_err(|e| e.to_string())?;
        text.parse()
            .map(Json::Number)
            .map_err(|_| format!("bad number {text:?}"))
    }
}

/// Holds up the client process `child`, `after` from now, for `held`
/// (SIGSTOP, then SIGCONT), as a descheduled or suspended client would be.
pub fn hold_up(child: &std::process::Child, after: Duration, held: Duration) {
    let pid = child.id() as libc::pid_t;
    thread::sleep(after);
    // SAFETY: kill takes no pointers; `pid` is the caller's child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
    thread::sleep(held);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
}
