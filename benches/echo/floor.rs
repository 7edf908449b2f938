//! The floor peer: the least work a readiness-based echo server can do per
//! echo, as a yardstick for ours in case 2 (many connections, 64 B).
//!
//! Per worker thread: one epoll, level-triggered, and for each ready
//! connection one `recv` into a 16 KiB buffer and one `send` of what came.
//! No state machine, no timers, no statistics, no busy polling, no
//! allocation. The acceptor registers each connection with a worker's epoll
//! itself, so a worker never hears of new connections. By default it places
//! connections the way ours does (on the worker with the fewest, ties broken
//! at random), so that the comparison is of the event loops alone;
//! [`Placement::InTurn`] shows what placement alone is worth.
//!
//! It is correct only while every `send` takes the whole message, which holds
//! for case 2's 64 B ping-pong: a short `send` closes the connection, so the
//! load side sees a failure rather than a wrong echo. That is why it takes
//! part in case 2 only.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use crate::peers::BUFFER_LEN;

/// Thread-name prefix of the floor peer.
pub const FLOOR_THREADS: &str = "peer-floor";

/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// The epoll token of a worker's stop eventfd; connections use their fd.
const STOP_TOKEN: u64 = u64::MAX;

/// How the floor peer's acceptor picks a worker for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The worker with the fewest connections, ties at random: as ours.
    Fewest,
    /// Each worker in turn. The load gives connection `i` to load thread
    /// `i % threads`, so with as many load threads as workers this pairs
    /// each worker with one load thread.
    InTurn,
}

/// What the acceptor and one worker share.
struct WorkerShare {
    epoll: OwnedFd,
    stop: OwnedFd,
    /// Open connections by fd; closing one is removing it.
    open: Mutex<HashMap<RawFd, TcpStream>>,
    count: AtomicUsize,
}

/// The running floor peer; dropping it stops and joins every thread.
pub struct FloorPeer {
    addr: SocketAddr,
    /// Shared with the acceptor, so that stopping can end its `accept`.
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    shares: Vec<Arc<WorkerShare>>,
    threads: Vec<JoinHandle<()>>,
}

impl FloorPeer {
    /// Binds 127.0.0.1 port 0 and starts `workers` worker threads and an
    /// acceptor that places connections by `placement`.
    ///
    /// # Errors
    /// Bind, epoll, eventfd or thread spawn failures.
    pub fn start(workers: usize, placement: Placement) -> io::Result<FloorPeer> {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0")?);
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut peer = FloorPeer {
            addr,
            listener: Arc::clone(&listener),
            stopping: Arc::clone(&stopping),
            shares: Vec::new(),
            threads: Vec::new(),
        };
        for index in 0..workers.max(1) {
            let share = Arc::new(WorkerShare::new()?);
            peer.shares.push(Arc::clone(&share));
            peer.threads.push(
                thread::Builder::new()
                    .name(format!("{FLOOR_THREADS}-w{index}"))
                    .spawn(move || serve(&share))?,
            );
        }
        let shares = peer.shares.clone();
        peer.threads.push(
            thread::Builder::new()
                .name(format!("{FLOOR_THREADS}-a"))
                .spawn(move || accept(&listener, &shares, placement, &stopping))?,
        );
        Ok(peer)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for FloorPeer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // On Linux, shutting a listener down ends an `accept` blocked on it
        // (with EINVAL), without a connection that could fail to be made.
        // SAFETY: a plain syscall on a descriptor the Arc keeps open.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD);
        }
        for share in &self.shares {
            share.wake();
        }
        for thread in self.threads.drain(..) {
            // A thread that panicked has nothing left to clean up.
            let _ = thread.join();
        }
        // Dropping the shares closes what is still open.
    }
}

impl WorkerShare {
    fn new() -> io::Result<WorkerShare> {
        // SAFETY: a plain syscall; `owned` checks the result before owning it.
        let epoll = unsafe { owned(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        // SAFETY: as above.
        let stop = unsafe { owned(libc::eventfd(0, libc::EFD_CLOEXEC))? };
        let share = WorkerShare {
            epoll,
            stop,
            open: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
        };
        share.watch(share.stop.as_raw_fd(), STOP_TOKEN)?;
        Ok(share)
    }

    /// Adds `fd` to the epoll, level-triggered for input.
    fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; `event` outlives the call.
        let done = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &raw mut event,
            )
        };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes the worker's `epoll_wait` return with its stop token.
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an open eventfd. A
        // failed write could only mean the counter is full: already woken.
        unsafe {
            libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8);
        }
    }

    fn close(&self, fd: RawFd) {
        let closed = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fd);
        if closed.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Takes ownership of a descriptor a syscall returned, or its error.
///
/// # Safety
/// `fd`, if not negative, must be open and owned by nobody else.
unsafe fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller promises `fd` is open and unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Accepts until stopped (or until `accept` fails for a reason that is not
/// the client's), placing each connection on a worker's epoll.
fn accept(
    listener: &TcpListener,
    shares: &[Arc<WorkerShare>],
    placement: Placement,
    stopping: &AtomicBool,
) {
    let load = |share: &Arc<WorkerShare>| share.count.load(Ordering::Relaxed);
    accept_placed(
        listener,
        shares,
        placement,
        stopping,
        load,
        |share, stream| {
            if stream.set_nonblocking(true).is_err() {
                return;
            }
            let fd = stream.as_raw_fd();
            share
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(fd, stream);
            share.count.fetch_add(1, Ordering::Relaxed);
            if share.watch(fd, fd as u64).is_err() {
                share.close(fd);
            }
        },
    );
}

/// The floor peers' acceptor: accepts until stopped (or until `accept`
/// fails for a reason that is not the client's), and hands each
/// connection, Nagle off, to the worker `placement` picks: the one with
/// the least `load` (ties at random), or each in turn.
pub fn accept_placed<S>(
    listener: &TcpListener,
    shares: &[S],
    placement: Placement,
    stopping: &AtomicBool,
    load: impl Fn(&S) -> usize,
    mut hand_over: impl FnMut(&S, TcpStream),
) {
    let mut tie_breaker = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
    let mut turn = 0;
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            // The client gave up before it was accepted, or a signal came.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            // Out of descriptors, or the listener was shut down: retrying
            // would spin, and its CPU would count as the floor's.
            Err(_) => return,
        };
        // Nagle off, as on the client side; failure only costs latency.
        let _ = stream.set_nodelay(true);
        let share = match placement {
            Placement::Fewest => {
                tie_breaker ^= tie_breaker << 13;
                tie_breaker ^= tie_breaker >> 7;
                tie_breaker ^= tie_breaker << 17;
                let start = (tie_breaker % shares.len() as u64) as usize;
                (0..shares.len())
                    .map(|offset| &shares[(start + offset) % shares.len()])
                    .min_by_key(|share| load(share))
                    .expect("the peer has at least one worker")
            }
            Placement::InTurn => {
                turn = (turn + 1) % shares.len();
                &shares[turn]
            }
        };
        hand_over(share, stream);
    }
}

/// One worker: wait, then one `recv` and one `send` per ready connection.
fn serve(share: &WorkerShare) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        // SAFETY: the epoll is open; `events` has room for the count given.
        let ready = unsafe {
            libc::epoll_wait(
                share.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS_PER_WAIT as i32,
                -1,
            )
        };
        let Ok(ready) = usize::try_from(ready) else {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                // A signal landed on this thread; nothing is lost.
                continue;
            }
            // Retrying would spin; the load sees its connections fail.
            return;
        };
        for event in &events[..ready] {
            let token = event.u64;
            if token == STOP_TOKEN {
                return;
            }
            let fd = token as RawFd;
            // SAFETY: `fd` stays open until `close` below removes it; only
            // this thread closes a registered fd (the acceptor closes one
            // only when registering it failed). `buf` has room for its length.
            let received = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let keep_open = match usize::try_from(received) {
                // The peer closed.
                Ok(0) => false,
                Ok(n) => {
                    // SAFETY: as for `recv`; the first `n` bytes of `buf` are set.
                    let sent =
                        unsafe { libc::send(fd, buf.as_ptr().cast(), n, libc::MSG_NOSIGNAL) };
                    // A short send is a failure here (see the module doc).
                    usize::try_from(sent) == Ok(n)
                }
                // A spurious wake-up or a signal leaves the connection as it was.
                Err(_) => matches!(
                    io::Error::last_os_error().kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ),
            };
            if !keep_open {
                share.close(fd);
            }
        }
    }
}
