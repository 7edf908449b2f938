//! The UDP comparison peers of case 6, written the way a Rust engineer
//! would write a UDP echo server without us:
//!
//! - [`UdpTokioPeer`]: tokio's canonical UDP echo (its `examples/echo-udp.rs`
//!   shape): one `tokio::net::UdpSocket` shared through an `Arc` by as many
//!   tasks as our server has workers, each looping `recv_from` then
//!   `send_to`, on a multi-thread runtime with that many worker threads.
//! - [`UdpBlockingPeer`]: one std `UdpSocket` and `try_clone`s of it, a
//!   thread each, looping `recv_from` then `send_to`.
//!
//! Both answer every source (no guard, no rate limit) and share one socket
//! between their threads, so two datagrams of one flow can be taken by two
//! threads and echoed in the other order: they reorder, where ours, with a
//! socket per worker and `SO_REUSEPORT` keeping each flow on one, cannot.
//! Their threads carry the TCP peers' name prefixes, so
//! [`crate::servers::Kind::owns_thread`] charges their CPU to them alone.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::peers::{BLOCKING_THREADS, TOKIO_THREADS};

/// Each peer task's or thread's receive buffer: room for any UDP payload,
/// so nothing is ever cut.
const DATAGRAM_ROOM: usize = 65_536;

/// How often a blocking peer thread wakes to see whether it must stop.
/// Ten wake-ups a second cost a few microseconds of CPU, far below what a
/// measuring window charges it.
const STOP_LOOK: Duration = Duration::from_millis(100);

/// tokio's canonical UDP echo server.
pub struct UdpTokioPeer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl UdpTokioPeer {
    /// Builds a runtime of `workers` threads, binds 127.0.0.1 port 0 and
    /// starts `workers` echo tasks on the one socket.
    ///
    /// # Errors
    /// Runtime build or bind failures.
    pub fn start(workers: usize) -> io::Result<UdpTokioPeer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(TOKIO_THREADS)
            .enable_io()
            .enable_time()
            .build()?;
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        let socket = {
            let _in_runtime = runtime.enter();
            Arc::new(tokio::net::UdpSocket::from_std(socket)?)
        };
        for _ in 0..workers.max(1) {
            runtime.spawn(echo_tokio(Arc::clone(&socket)));
        }
        Ok(UdpTokioPeer {
            addr,
            runtime: Some(runtime),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpTokioPeer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Cancels every task at its next await and closes the socket.
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn echo_tokio(socket: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; DATAGRAM_ROOM];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // tokio's example returns here; a shared socket's task must not
            // die on one datagram's error, so it goes on.
            Err(_) => continue,
        };
        // A failed echo is a lost echo, as in tokio's example.
        let _ = socket.send_to(&buf[..len], peer).await;
    }
}

/// The blocking peer: a thread per clone of one socket.
pub struct UdpBlockingPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpBlockingPeer {
    /// Binds 127.0.0.1 port 0 and starts `workers` threads, each on its own
    /// clone of the socket.
    ///
    /// # Errors
    /// Bind, clone, socket option or thread spawn failures.
    pub fn start(workers: usize) -> io::Result<UdpBlockingPeer> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        socket.set_read_timeout(Some(STOP_LOOK))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut peer = UdpBlockingPeer {
            addr,
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for index in 0..workers.max(1) {
            let clone = socket.try_clone()?;
            let stop = Arc::clone(&stop);
            peer.threads.push(
                thread::Builder::new()
                    .name(format!("{BLOCKING_THREADS}-u{index}"))
                    .spawn(move || echo_blocking(&clone, &stop))?,
            );
        }
        Ok(peer)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpBlockingPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A thread that panicked has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// Echoes until `stop`, looking at it at least every [`STOP_LOOK`].
fn echo_blocking(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = vec![0u8; DATAGRAM_ROOM];
    while !stop.load(Ordering::Relaxed) {
        // An error is the read timeout (time to look at `stop` again) or
        // one datagram's (a signal, say), never the socket's.
        if let Ok((len, peer)) = socket.recv_from(&mut buf) {
            // A failed echo is a lost echo, as this design would have it.
            let _ = socket.send_to(&buf[..len], peer);
        }
    }
}
