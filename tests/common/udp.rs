//! UDP echo servers for testing the client: a faithful one, and ones that
//! misbehave on purpose (drop, duplicate, reorder, delay, corrupt, answer
//! from another port), each a closure deciding the replies to every
//! datagram. All on 127.0.0.1, port 0. Also socat, a UDP echo server we did
//! not write, when it is installed.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long the server thread waits in one `recv_from` before it looks at
/// its stop flag and its delayed replies again.
const TICK: Duration = Duration::from_millis(5);

/// One datagram a test server sends back.
pub struct Reply {
    /// How long after the datagram came to send it.
    pub after: Duration,
    pub bytes: Vec<u8>,
    /// Sent from a second socket, so from another port than the server's.
    pub from_other_port: bool,
}

impl Reply {
    /// `bytes` back at once, from the server's port.
    pub fn now(bytes: &[u8]) -> Reply {
        Reply {
            after: Duration::ZERO,
            bytes: bytes.to_vec(),
            from_other_port: false,
        }
    }

    /// `bytes` back `after` the datagram came, from the server's port.
    pub fn later(after: Duration, bytes: &[u8]) -> Reply {
        Reply {
            after,
            ..Reply::now(bytes)
        }
    }
}

/// The replies to datagram number `index` (from 1, over all clients).
pub type Respond = dyn FnMut(u64, &[u8]) -> Vec<Reply> + Send;

/// The replies to datagram number `index` from `from`.
type RespondFrom = dyn FnMut(u64, SocketAddr, &[u8]) -> Vec<Reply> + Send;

/// A UDP server on 127.0.0.1:0 answering as its closure says, on its own
/// thread until dropped.
pub struct UdpTestServer {
    addr: SocketAddr,
    other_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpTestServer {
    pub fn start(respond: impl FnMut(u64, &[u8]) -> Vec<Reply> + Send + 'static) -> UdpTestServer {
        Self::start_on("127.0.0.1:0", Box::new(respond)).expect("bind 127.0.0.1:0 for UDP")
    }

    /// Like [`start`](Self::start), its closure told each datagram's
    /// source address (a client's flow, by its port) instead of its index.
    pub fn start_seeing(
        mut respond: impl FnMut(SocketAddr, &[u8]) -> Vec<Reply> + Send + 'static,
    ) -> UdpTestServer {
        Self::start_from(
            "127.0.0.1:0",
            Box::new(move |_, from, datagram| respond(from, datagram)),
        )
        .expect("bind 127.0.0.1:0 for UDP")
    }

    /// Like [`start`](Self::start) on `bind` (such as `[::1]:0`).
    pub fn start_on(bind: &str, mut respond: Box<Respond>) -> std::io::Result<UdpTestServer> {
        Self::start_from(
            bind,
            Box::new(move |index, _, datagram| respond(index, datagram)),
        )
    }

    fn start_from(bind: &str, mut respond: Box<RespondFrom>) -> std::io::Result<UdpTestServer> {
        let socket = UdpSocket::bind(bind)?;
        grow_receive_buffer(&socket);
        let other = UdpSocket::bind(bind)?;
        let addr = socket.local_addr()?;
        let other_addr = other.local_addr()?;
        socket.set_read_timeout(Some(TICK))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopping);
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut index = 0;
            let mut delayed: Vec<(Instant, Reply, SocketAddr)> = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let now = Instant::now();
                let (due, later): (Vec<_>, Vec<_>) =
                    delayed.drain(..).partition(|(at, _, _)| *at <= now);
                delayed = later;
                for (_, reply, to) in due {
                    send(&socket, &other, &reply, to);
                }
                match socket.recv_from(&mut buf) {
                    Ok((len, from)) => {
                        index += 1;
                        for reply in respond(index, from, &buf[..len]) {
                            if reply.after.is_zero() {
                                send(&socket, &other, &reply, from);
                            } else {
                                // From the datagram's arrival, not from
                                // before the wait for it (up to a TICK
                                // earlier), which would send it early.
                                let received = Instant::now();
                                delayed.push((received + reply.after, reply, from));
                            }
                        }
                    }
                    Err(err)
                        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    // An ICMP error for an earlier reply: the client is gone.
                    Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
                    Err(err) => panic!("the UDP test server cannot receive: {err}"),
                }
            }
        });
        Ok(UdpTestServer {
            addr,
            other_addr,
            stopping,
            thread: Some(thread),
        })
    }

    /// Echoes every datagram once, at once: RFC 862 with nothing but std.
    pub fn echo() -> UdpTestServer {
        Self::start(|_, datagram| vec![Reply::now(datagram)])
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port that [`Reply::from_other_port`] replies come from.
    pub fn other_addr(&self) -> SocketAddr {
        self.other_addr
    }
}

/// Asks for a 4 MiB receive buffer (capped by `net.core.rmem_max`), as our
/// server does: with the default 208 KiB, three 64 KiB datagrams fill it
/// while the server thread is descheduled.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 4 << 20;
    // SAFETY: `bytes` is a valid c_int that outlives the call, and its size is passed.
    let _unchecked = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // A refusal leaves the default buffer; the tests that need more say so.
}

fn send(socket: &UdpSocket, other: &UdpSocket, reply: &Reply, to: SocketAddr) {
    let via = if reply.from_other_port { other } else { socket };
    // A reply the kernel refuses is one the client does not get: the
    // test's counts show it.
    let _ = via.send_to(&reply.bytes, to);
}

impl Drop for UdpTestServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // A panicking server thread has already printed its message.
            let _ = thread.join();
        }
    }
}

/// socat serving UDP echo (`-b 65536 UDP-RECVFROM:PORT,fork PIPE`) on 127.0.0.1, as
/// a child process killed when this is dropped.
pub struct Socat {
    child: Child,
    pub addr: SocketAddr,
}

impl Socat {
    /// Starts socat on a free port and waits until it echoes. socat cannot
    /// report a port 0 it was given, so a port is picked by a throwaway
    /// bind and, if socat then fails to bind it (another process took it
    /// meanwhile), another one is picked. `None` if socat is not on PATH.
    pub fn start() -> Option<Socat> {
        let mut last = String::new();
        for _ in 0..10 {
            let port = UdpSocket::bind("127.0.0.1:0")
                .and_then(|socket| socket.local_addr())
                .expect("a free UDP port on 127.0.0.1")
                .port();
            let mut command = Command::new("socat");
            // -b: socat's 8192-byte default buffer truncates larger
            // datagrams (which the client reports as corrupted).
            command
                .args(["-b", "65536"])
                .arg(format!("UDP-RECVFROM:{port},bind=127.0.0.1,fork"))
                .arg("PIPE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            super::dies_with_test(&mut command);
            let child = match command.spawn() {
                Ok(child) => child,
                Err(err) if err.kind() == ErrorKind::NotFound => return None,
                Err(err) => panic!("spawn socat: {err}"),
            };
            let mut socat = Socat {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            if socat.answers_within(Duration::from_secs(5)) {
                return Some(socat);
            }
            last = socat.stderr_after_kill();
        }
        panic!("socat never echoed on a free port in 10 tries; its last stderr:\n{last}");
    }

    /// Probes until an echo comes back, socat exits, or `limit` passes.
    fn answers_within(&mut self, limit: Duration) -> bool {
        let probe = UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        let started = Instant::now();
        let mut buf = [0u8; 16];
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            // A probe lost before socat is listening is sent again below.
            let _ = probe.send_to(b"probe", self.addr);
            if let Ok((5, from)) = probe.recv_from(&mut buf)
                && from == self.addr
            {
                return true;
            }
        }
        false
    }

    fn stderr_after_kill(&mut self) -> String {
        // It may have exited already, which is why we are here.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            // Whatever it said is only for the failure message.
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        // The child must not outlive the test; it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
