//! Creating the sockets the server serves: the TCP listener, and the UDP
//! sockets that the workers take one each. Kept apart from serving them so
//! that sockets can come from elsewhere (systemd socket activation, a test
//! harness) and still be handed to [`Server::start`](crate::server::Server::start).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

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
/// let listener = echo_chamber::server::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
/// assert_ne!(listener.local_addr().unwrap().port(), 0);
/// ```
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_tcp(addr, false)
}

/// [`bind`], with `SO_REUSEPORT` too if `share_port`: then another server
/// may listen on the same port at the same time, as a restart without
/// refusals needs, and the kernel spreads new connections over both.
///
/// # Errors
/// As [`bind`].
pub fn bind_tcp(addr: SocketAddr, share_port: bool) -> io::Result<TcpListener> {
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
    let listener = if share_port {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As std does, so that a restart need not wait out TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.into()
    } else {
        // std sets SO_REUSEADDR and close-on-exec, then listens with 128.
        TcpListener::bind(addr)?
    };
    // Listening again on a listening socket only changes its backlog.
    // SAFETY: listen reads nothing but its two integer arguments.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// The transports a server serves on one port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// Echo over TCP connections.
    pub tcp: bool,
    /// Echo of UDP datagrams.
    pub udp: bool,
}

/// The sockets a server serves: a TCP listener, and UDP sockets that the
/// workers take one each (the first ones get one when there are fewer
/// sockets than workers).
#[derive(Debug, Default)]
pub struct Sockets {
    /// The TCP listener, if the server echoes over TCP.
    pub tcp: Option<TcpListener>,
    /// UDP sockets, at most one per worker.
    pub udp: Vec<UdpSocket>,
}

impl From<TcpListener> for Sockets {
    fn from(listener: TcpListener) -> Self {
        Sockets {
            tcp: Some(listener),
            udp: Vec::new(),
        }
    }
}

/// How many times a free port number is sought for both TCP and UDP before
/// giving up: one that is free for TCP may be taken for UDP.
const PORT_TRIES: usize = 16;

/// Binds the sockets of `transports` on `addr`: a TCP listener as [`bind`]
/// does, and `udp_sockets` UDP sockets sharing the port with
/// `SO_REUSEPORT` (one per worker). With port 0, one free port number is
/// chosen that both transports use.
///
/// # Errors
/// As [`bind`], for either transport; `InvalidInput` if no transport is asked for.
///
/// # Examples
/// ```
/// use echo_chamber::server::listener::{bind_sockets, Transports};
/// let both = Transports { tcp: true, udp: true };
/// let sockets = bind_sockets("127.0.0.1:0".parse().unwrap(), both, 2).unwrap();
/// let port = sockets.tcp.as_ref().unwrap().local_addr().unwrap().port();
/// assert_eq!(sockets.udp.len(), 2);
/// assert!(sockets.udp.iter().all(|udp| udp.local_addr().unwrap().port() == port));
/// ```
pub fn bind_sockets(
    addr: SocketAddr,
    transports: Transports,
    udp_sockets: usize,
) -> io::Result<Sockets> {
    bind_sockets_with(addr, transports, udp_sockets, false)
}

/// [`bind_sockets`], sharing the port with other servers if `share_port`
/// (`SO_REUSEPORT` on every socket, as `--reuse-port` asks); without it, a
/// port another program already has for UDP is an error, as for TCP.
///
/// # Errors
/// As [`bind_sockets`].
pub fn bind_sockets_with(
    addr: SocketAddr,
    transports: Transports,
    udp_sockets: usize,
    share_port: bool,
) -> io::Result<Sockets> {
    if !transports.tcp && !transports.udp {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no transport to serve: choose TCP, UDP or both",
        ));
    }
    let mut tries = 0;
    loop {
        tries += 1;
        let tcp = transports
            .tcp
            .then(|| bind_tcp(addr, share_port))
            .transpose()?;
        if !transports.udp {
            return Ok(Sockets {
                tcp,
                udp: Vec::new(),
            });
        }
        let mut udp_addr = addr;
        if let Some(tcp) = &tcp {
            udp_addr.set_port(tcp.local_addr()?.port());
        }
        match bind_udp(udp_addr, udp_sockets, share_port) {
            Ok(udp) => return Ok(Sockets { tcp, udp }),
            // The port TCP was given is taken for UDP: try another.
            Err(err)
                if addr.port() == 0
                    && tcp.is_some()
                    && err.kind() == io::ErrorKind::AddrInUse
                    && tries < PORT_TRIES => {}
            // With both transports, say which one the port is not free for.
            Err(err) if transports.tcp => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("for UDP: {}", crate::error::io_cause(&err)),
                ));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Binds `count` UDP sockets (at least one) on `addr` with `SO_REUSEPORT`,
/// nonblocking; with port 0, on one port number that no socket had.
/// The sockets need `SO_REUSEPORT` to share the port among themselves, which
/// would also let another server of the same user join them unnoticed; so
/// unless `share_port`, a port that is already bound is an error.
///
/// # Errors
/// What `socket`, `setsockopt` or `bind` report (`AddrInUse` for a port
/// taken); `AddrNotAvailable` for a multicast or broadcast address, which an
/// echo server must not serve.
pub fn bind_udp(addr: SocketAddr, count: usize, share_port: bool) -> io::Result<Vec<UdpSocket>> {
    let ip = addr.ip().to_canonical();
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "an echo server does not answer multicast or broadcast datagrams",
        ));
    }
    if addr.port() == 0 {
        // The kernel gives a port 0 bind with SO_REUSEPORT a port that other
        // sockets with it (of the same user) may already share: another
        // server's. A port free for a plain bind is free for all.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut free = addr;
            free.set_port(UdpSocket::bind(addr)?.local_addr()?.port());
            match bind_udp_group(free, count) {
                // Taken in the instant between: try another.
                Err(err) if err.kind() == io::ErrorKind::AddrInUse && tries < PORT_TRIES => {}
                result => return result,
            }
        }
    }
    if !share_port {
        // Fails if anyone holds the port; freed at once. (A server that
        // binds in the instant between is not seen.)
        drop(UdpSocket::bind(addr)?);
    }
    bind_udp_group(addr, count)
}

/// Binds `count` sockets (at least one) on `addr` with `SO_REUSEPORT`.
fn bind_udp_group(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        sockets.push(socket.into());
    }
    Ok(sockets)
}
