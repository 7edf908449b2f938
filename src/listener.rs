//! Creating the listening socket, kept apart from serving it so that a
//! listener can later come from elsewhere (systemd socket activation, a test
//! harness) and still be handed to [`Server::start`](crate::server::Server::start).

use std::io;
use std::net::{SocketAddr, TcpListener};

/// Binds a TCP listener on `addr` (port 0 picks a free port) with
/// `SO_REUSEADDR` and a backlog of 1024.
///
/// The returned listener is non-blocking, ready for the acceptor's event loop.
///
/// # Errors
/// Whatever `socket`, `bind` or `listen` report, such as `AddrInUse`.
///
/// # Examples
/// ```
/// let listener = echo_chamber::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
/// assert_ne!(listener.local_addr().unwrap().port(), 0);
/// ```
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    // mio sets SO_REUSEADDR and listens with a backlog of 1024, deeper than std's 128.
    let listener = mio::net::TcpListener::bind(addr)?;
    Ok(into_std(listener))
}

fn into_std(listener: mio::net::TcpListener) -> TcpListener {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor comes straight from a listener we own and gives up.
    unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) }
}
