//! The two comparison peers our server is measured against, written the way
//! a Rust engineer would write them without us:
//!
//! - [`BlockingPeer`]: a thread per connection, blocking std sockets, a
//!   16 KiB buffer, `read` then `write_all`.
//! - [`TokioPeer`]: tokio's canonical echo server (a task per connection, a
//!   16 KiB buffer, `read` then `write_all`) on a multi-thread runtime with
//!   as many worker threads as our server has workers.
//!
//! Both set `TCP_NODELAY` on accepted sockets, as the load side does on its
//! own, so no side waits on Nagle's algorithm and the comparison is fair.
//! Their threads are named `peer-blocking-*` and `peer-tokio` so the bench
//! can sum the CPU time of server threads only.
//!
//! [`serve`] runs one of them as a separate process (the bench re-executes
//! itself) for the cases that measure a whole process.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each peer's per-connection buffer.
pub const BUFFER_LEN: usize = 16 * 1024;

/// Thread-name prefix of the blocking peer (names are cut at 15 bytes).
pub const BLOCKING_THREADS: &str = "peer-blocking";
/// Thread name of the tokio peer's runtime threads.
pub const TOKIO_THREADS: &str = "peer-tokio";

/// The thread-per-connection peer.
pub struct BlockingPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
    /// Clones of the accepted sockets, so stopping can end their threads
    /// even if a client were still open.
    accepted: Arc<Mutex<Vec<TcpStream>>>,
}

impl BlockingPeer {
    /// Binds 127.0.0.1 port 0 and starts accepting.
    ///
    /// # Errors
    /// Bind or thread spawn failures.
    pub fn start() -> io::Result<BlockingPeer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            thread::Builder::new()
                .name(format!("{BLOCKING_THREADS}-a"))
                .spawn(move || accept_blocking(&listener, &stop, Some(&accepted)))?
        };
        Ok(BlockingPeer {
            addr,
            stop,
            acceptor: Some(acceptor),
            accepted,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BlockingPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A connection wakes the acceptor from `accept` to see the flag; if
        // it fails the acceptor is already gone, which is what we want.
        let _ = TcpStream::connect(self.addr);
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        let handlers = acceptor.join().unwrap_or_default();
        for stream in self
            .accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            // Ends the handler's blocking read; the peer may have gone already.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for handler in handlers {
            // A handler that panicked has nothing left to clean up.
            let _ = handler.join();
        }
    }
}

/// Accepts until `stop`, a thread per connection. With `accepted`, keeps a
/// clone of each socket and returns the handlers to join; without (the
/// separate-process peer, which holds 10,000 connections under a 20,000 fd
/// limit), it keeps nothing.
fn accept_blocking(
    listener: &TcpListener,
    stop: &AtomicBool,
    accepted: Option<&Mutex<Vec<TcpStream>>>,
) -> Vec<JoinHandle<()>> {
    let mut handlers = Vec::new();
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            // E.g. a connection reset before it was accepted.
            Err(_) => continue,
        };
        // Nagle off, as on the client side; failure only costs latency.
        let _ = stream.set_nodelay(true);
        if let Some(accepted) = accepted
            && let Ok(clone) = stream.try_clone()
        {
            accepted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(clone);
        }
        let spawned = thread::Builder::new()
            .name(format!("{BLOCKING_THREADS}-c"))
            .spawn(move || echo_blocking(stream));
        match spawned {
            Ok(handler) if accepted.is_some() => handlers.push(handler),
            // Detached: the separate-process peer never joins.
            Ok(_) => {}
            // Out of threads: the connection is dropped, as this design would.
            Err(_) => {}
        }
    }
    handlers
}

/// Echoes one connection until the client closes it.
fn echo_blocking(mut stream: TcpStream) {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// tokio's canonical echo server.
pub struct TokioPeer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TokioPeer {
    /// Builds a runtime of `workers` threads, binds 127.0.0.1 port 0 and
    /// starts accepting.
    ///
    /// # Errors
    /// Runtime build or bind failures.
    pub fn start(workers: usize) -> io::Result<TokioPeer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(TOKIO_THREADS)
            .enable_io()
            .enable_time()
            .build()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(accept_tokio(listener));
        Ok(TokioPeer {
            addr,
            runtime: Some(runtime),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TokioPeer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Cancels every task at its next await and closes its socket.
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_tokio(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                // Nagle off, as on the client side; failure only costs latency.
                let _ = socket.set_nodelay(true);
                tokio::spawn(echo_tokio(socket));
            }
            // E.g. out of fds: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn echo_tokio(mut socket: tokio::net::TcpStream) {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(_) => return,
        };
        if socket.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Which peer [`serve`] runs.
#[derive(Clone, Copy, Debug)]
pub enum PeerKind {
    Blocking,
    Tokio,
}

/// Runs a peer as this whole process: prints `listening on ADDR` to stderr,
/// then serves until a signal ends the process. SIGINT is reset to its
/// default action first, because a shell starts background jobs with it
/// ignored and the shutdown case must be able to stop the peer with it.
pub fn serve(kind: PeerKind, workers: usize) -> ! {
    // SAFETY: restoring a default disposition installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
    let addr = match kind {
        PeerKind::Blocking => serve_blocking(),
        PeerKind::Tokio => TokioPeer::start(workers).map(|peer| {
            let addr = peer.addr();
            // The runtime must outlive `main`'s wait below.
            std::mem::forget(peer);
            addr
        }),
    };
    match addr {
        Ok(addr) => eprintln!("listening on {addr}"),
        Err(e) => {
            eprintln!("peer: cannot start: {e}");
            std::process::exit(1);
        }
    }
    loop {
        thread::park();
    }
}

fn serve_blocking() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = AtomicBool::new(false);
    thread::Builder::new()
        .name(format!("{BLOCKING_THREADS}-a"))
        .spawn(move || accept_blocking(&listener, &stop, None))?;
    Ok(addr)
}
