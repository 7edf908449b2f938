//! Socket options and queries that std and mio do not offer, shared by the
//! server (urgent data kept inline; how much to echo in a drain; how much
//! echo a client had not taken when the drain's deadline cut it) and the
//! client (whether the server sent more than it was sent).

use std::io;
use std::os::fd::AsRawFd;

/// Bytes received and waiting to be read on `socket`, or `None` if the
/// kernel would not say.
pub(crate) fn unread_len(socket: &impl AsRawFd) -> Option<usize> {
    queue_len(socket, libc::FIONREAD)
}

/// Bytes written to `socket` that the peer has not acknowledged yet (TCP's
/// send queue, `SIOCOUTQ`, which is `TIOCOUTQ` on Linux; a queued end of
/// stream counts as one), or `None` if the kernel would not say.
pub(crate) fn unacknowledged_len(socket: &impl AsRawFd) -> Option<usize> {
    queue_len(socket, libc::TIOCOUTQ)
}

/// The length of one of `socket`'s queues, asked with `request`.
fn queue_len(socket: &impl AsRawFd, request: libc::Ioctl) -> Option<usize> {
    let mut len: libc::c_int = 0;
    // SAFETY: both requests write one int, the queue's length.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut len) };
    (rc == 0).then_some(len.max(0) as usize)
}

/// Sets `SO_OOBINLINE`, so that TCP urgent data stays in the byte stream
/// and is echoed in place like any other byte. Without it the kernel holds
/// each urgent byte aside, where an echo server never reads it, and drops
/// one when the next arrives. Set on a listener, it is inherited by the
/// connections the kernel completes from then on, even before `accept`.
pub(crate) fn keep_urgent_data_inline(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    set_option(socket, libc::SOL_SOCKET, libc::SO_OOBINLINE, &on)
}

/// `setsockopt(socket, level, name, value)`, with `value` passed as the
/// bytes of a `T` (an int, or a struct such as `libc::linger`).
pub(crate) fn set_option<T>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from `value`, which
    // outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes a UDP socket drop every datagram that arrives from now on, while
/// those already queued in it can still be read: the drain's "stop taking
/// new work". On Linux a one-instruction socket filter does it (the filter
/// runs before a datagram is queued); elsewhere nothing is done, and the
/// drain echoes what arrives until the socket is found empty.
#[cfg(target_os = "linux")]
pub(crate) fn drop_new_datagrams(socket: &impl AsRawFd) -> io::Result<()> {
    // Classic BPF "return 0": keep no byte of any packet.
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `drop_all` outlives it.
    set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program)
}

/// See the Linux version: elsewhere the drain cannot shut new datagrams out.
#[cfg(not(target_os = "linux"))]
pub(crate) fn drop_new_datagrams(_socket: &impl AsRawFd) -> io::Result<()> {
    Ok(())
}

/// The IPv4 broadcast addresses of this machine's interfaces (such as
/// 192.168.1.255), which only a broadcast is ever sent to; empty if the
/// interfaces cannot be listed.
pub(crate) fn interface_broadcast_addresses() -> Vec<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocates into `list`.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs made, not yet freed.
        let node = unsafe { &*entry };
        let is_broadcast = node.ifa_flags & libc::IFF_BROADCAST as libc::c_uint != 0;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let broadcast = node.ifa_ifu;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let broadcast = node.ifa_dstaddr;
        if is_broadcast && !broadcast.is_null() {
            // SAFETY: a non-null address of the node, which holds a sockaddr
            // at least as long as its family's.
            let family = libc::c_int::from(unsafe { (*broadcast).sa_family });
            if family == libc::AF_INET {
                // SAFETY: the family says it is a sockaddr_in.
                let v4 = unsafe { &*broadcast.cast::<libc::sockaddr_in>() };
                found.push(std::net::IpAddr::from(
                    u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                ));
            }
        }
        entry = node.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The receive and send buffer a UDP socket asks for: the default (about
/// 208 KiB on Linux) holds only three datagrams of the largest size, and a
/// burst of small ones overflows it within microseconds. The kernel caps the
/// request at `net.core.rmem_max` / `wmem_max`, and memory is used only as
/// datagrams wait.
pub(crate) const UDP_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Asks for [`UDP_BUFFER_BYTES`] of receive and send buffer on `socket`;
/// a smaller cap or a refusal leaves what the kernel gives, which still works.
pub(crate) fn grow_udp_buffers(socket: &impl AsRawFd) {
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // A failure leaves the default buffer, smaller but working.
        let _ = set_option(socket, libc::SOL_SOCKET, option, &UDP_BUFFER_BYTES);
    }
}

/// The address the kernel wrote into `name`, if it is IPv4 or IPv6.
#[cfg(target_os = "linux")]
pub(crate) fn socket_addr(name: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match libc::c_int::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in, which
            // sockaddr_storage is sized and aligned to hold.
            let v4 =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(std::net::SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let v6 =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(std::net::SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
