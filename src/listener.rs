//! Creating the listening socket, kept apart from serving it so that a
//! listener can later come from elsewhere (systemd socket activation, a test
//! harness) and still be handed to [`Server::start`](crate::server::Server::start).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

/// The listen backlog asked for; the kernel caps it at `net.core.somaxconn`
/// (4096 by default on current Linux). std and mio ask for only 128, which
/// a burst of connects overflows before the acceptor runs.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener on `addr` (port 0 picks a free port) with
/// `SO_REUSEADDR` and a backlog of [`LISTEN_BACKLOG`].
///
/// # Errors
/// Whatever `socket`, `bind` or `listen` report, such as `AddrInUse`; and
/// `AddrNotAvailable` for a multicast or broadcast address, which Linux
/// lets a TCP socket bind but no connection can ever reach.
///
/// # Examples
/// ```
/// let listener = echo_chamber::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
/// assert_ne!(listener.local_addr().unwrap().port(), 0);
/// ```
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    // `::ffff:224.0.0.1` is the same address. (A subnet's broadcast address,
    // such as 192.168.1.255, is not caught: only the interfaces know it.)
    let ip = addr.ip().to_canonical();
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "a multicast or broadcast address takes no TCP connections",
        ));
    }
    // std sets SO_REUSEADDR and close-on-exec, then listens with 128.
    let listener = TcpListener::bind(addr)?;
    // Listening again on a listening socket only changes its backlog.
    // SAFETY: listen reads nothing but its two integer arguments.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}
