//! Batched datagram I/O for a worker's UDP socket: up to [`BATCH`]
//! datagrams taken with one `recvmmsg` and echoed from the same buffers
//! with one `sendmmsg` on Linux, and one `recv_from`/`send_to` each
//! elsewhere. It sits under [`crate::server::datagram`], which decides what to
//! echo; the `unsafe` of the batched calls is kept in this file, behind
//! [`Batch`]'s safe methods, as quinn-udp keeps its own.
//!
//! A datagram is never copied: it is received into its slot and sent from
//! there, so a batch must be sent before the next one is received.
//!
//! On Linux each datagram also brings its packet info (`IP_PKTINFO`,
//! `IPV6_PKTINFO`; see [`receive_destinations`]): the address it was sent
//! to, and whether that was a broadcast. Its echo names that address as its
//! source, so that it leaves from the address the peer sent to even when the
//! socket is bound to `0.0.0.0` on a host with several addresses (otherwise
//! the route would choose, and the peer would get its echo from an address
//! it never wrote to). The interface is left to the route: forcing the one
//! the datagram came in on would lose echoes whose way back is another.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::UdpSocket;

/// Datagrams received with one call, as quinn-udp's batch on Linux.
pub(crate) const BATCH: usize = 32;

/// Each slot's room: more than the largest UDP payload (65,507 bytes over
/// IPv4, 65,527 over IPv6), so no datagram is ever cut. The pages of a slot
/// are only touched as far as its datagrams reach, so small datagrams keep
/// the worker's memory small.
pub(crate) const SLOT_SIZE: usize = 65_536;

/// Room for a datagram's control messages (an `in_pktinfo` and an
/// `in6_pktinfo`, 72 bytes with their headers) with room to spare, in words
/// for the alignment `cmsghdr` needs.
#[cfg(target_os = "linux")]
const CONTROL_WORDS: usize = 16;

/// What a datagram's packet info says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PacketInfo {
    /// The destination in the datagram's IP header.
    destination: Option<IpAddr>,
    /// The local address its echo should leave from.
    local: Option<IpAddr>,
    /// Sent to a broadcast address, or its packet info was cut short.
    to_group: bool,
}

/// The received datagrams of one batch, where they came from and where
/// they were sent to.
pub(crate) struct Batch {
    buffers: Box<[u8]>,
    lens: [usize; BATCH],
    peers: [Option<SocketAddr>; BATCH],
    infos: [PacketInfo; BATCH],
    truncated: [bool; BATCH],
    #[cfg(target_os = "linux")]
    names: Box<[libc::sockaddr_storage; BATCH]>,
    #[cfg(target_os = "linux")]
    name_lens: [libc::socklen_t; BATCH],
    /// Where `recvmmsg` writes each datagram's control messages.
    #[cfg(target_os = "linux")]
    controls: Box<[[u64; CONTROL_WORDS]; BATCH]>,
    count: usize,
}

impl Batch {
    pub(crate) fn new() -> Self {
        Batch {
            // Zeroed memory comes from the kernel untouched: a slot costs
            // nothing until a datagram is written into it.
            buffers: vec![0; BATCH * SLOT_SIZE].into_boxed_slice(),
            lens: [0; BATCH],
            peers: [None; BATCH],
            infos: [PacketInfo::default(); BATCH],
            truncated: [false; BATCH],
            #[cfg(target_os = "linux")]
            // SAFETY: sockaddr_storage is plain data, valid when all zero.
            names: Box::new(unsafe { std::mem::zeroed() }),
            #[cfg(target_os = "linux")]
            name_lens: [0; BATCH],
            #[cfg(target_os = "linux")]
            controls: Box::new([[0; CONTROL_WORDS]; BATCH]),
            count: 0,
        }
    }

    /// Datagrams in the batch.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Where datagram `index` came from; `None` for an address family the
    /// server does not serve.
    pub(crate) fn peer(&self, index: usize) -> Option<SocketAddr> {
        self.peers[index]
    }

    /// The address datagram `index` was sent to, where the kernel says
    /// (Linux, once [`receive_destinations`] is set on the socket).
    pub(crate) fn destination(&self, index: usize) -> Option<IpAddr> {
        self.infos[index].destination
    }

    /// Whether datagram `index` was sent to a broadcast address (IPv4: its
    /// header's destination is not the local address that takes it), or
    /// came with its packet info cut short, so that where it was sent is
    /// unknown: either way it is not to be answered.
    pub(crate) fn arrived_as_broadcast(&self, index: usize) -> bool {
        self.infos[index].to_group
    }

    /// The bytes of datagram `index`.
    pub(crate) fn payload(&self, index: usize) -> &[u8] {
        &self.buffers[index * SLOT_SIZE..][..self.lens[index]]
    }

    /// Whether datagram `index` was longer than its slot (it cannot be, by
    /// [`SLOT_SIZE`]; it is checked all the same, since a cut echo is wrong).
    pub(crate) fn is_truncated(&self, index: usize) -> bool {
        self.truncated[index]
    }

    /// Receives up to [`BATCH`] datagrams, replacing the last batch.
    ///
    /// # Errors
    /// `WouldBlock` when none is waiting, or what the socket reports.
    #[cfg(target_os = "linux")]
    pub(crate) fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.count = 0;
        let base = self.buffers.as_mut_ptr();
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|index| libc::iovec {
            // SAFETY: `buffers` holds BATCH slots of SLOT_SIZE bytes.
            iov_base: unsafe { base.add(index * SLOT_SIZE) }.cast(),
            iov_len: SLOT_SIZE,
        });
        // SAFETY: mmsghdr is plain data (pointers and integers), valid when
        // all zero; the fields that matter are set below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (index, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name = (&raw mut self.names[index]).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = &raw mut iovecs[index];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[index].as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = size_of::<[u64; CONTROL_WORDS]>() as _;
        }
        // SAFETY: every header points at its own iovec, address slot and
        // control buffer, and every iovec at its own SLOT_SIZE bytes of
        // `buffers`; all of them outlive the call, and the kernel writes no
        // more than the sizes given.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        for (index, header) in headers.iter().enumerate().take(received) {
            self.lens[index] = header.msg_len as usize;
            self.truncated[index] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.name_lens[index] = header.msg_hdr.msg_namelen;
            self.peers[index] = crate::socket::socket_addr(&self.names[index]);
            self.infos[index] = if header.msg_hdr.msg_flags & libc::MSG_CTRUNC == 0 {
                packet_info(&header.msg_hdr)
            } else {
                PacketInfo {
                    to_group: true,
                    ..PacketInfo::default()
                }
            };
        }
        self.count = received;
        Ok(received)
    }

    /// Sends the datagrams `order` (indices into the batch) back to where
    /// each came from, in that order; returns how many of them went, from
    /// the first.
    ///
    /// # Errors
    /// What sending the first of them reported, such as `WouldBlock` when
    /// the socket's send buffer is full.
    #[cfg(target_os = "linux")]
    pub(crate) fn send(&mut self, socket: &UdpSocket, order: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let count = order.len().min(BATCH);
        let base = self.buffers.as_mut_ptr();
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        let mut controls = [[0u64; CONTROL_WORDS]; BATCH];
        // SAFETY: as in `receive`: plain data, valid when all zero.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (at, &index) in order[..count].iter().enumerate() {
            let index = usize::from(index);
            iovecs[at] = libc::iovec {
                // SAFETY: `buffers` holds BATCH slots of SLOT_SIZE bytes.
                iov_base: unsafe { base.add(index * SLOT_SIZE) }.cast(),
                iov_len: self.lens[index],
            };
            let header = &mut headers[at].msg_hdr;
            header.msg_name = (&raw mut self.names[index]).cast();
            header.msg_namelen = self.name_lens[index];
            header.msg_iov = &raw mut iovecs[at];
            header.msg_iovlen = 1;
            if let Some(local) = self.infos[index].local {
                let family = libc::c_int::from(self.names[index].ss_family);
                write_source(header, &mut controls[at], family, local);
            }
        }
        // SAFETY: the first `count` headers point at live iovecs, address
        // slots and control messages, each iovec at the received bytes of
        // its slot; the kernel only reads them, during the call.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                count as libc::c_uint,
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    /// Receives up to [`BATCH`] datagrams, one call each.
    ///
    /// # Errors
    /// `WouldBlock` when none is waiting, or what the socket reports.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        while self.count < BATCH {
            let index = self.count;
            let slot = &mut self.buffers[index * SLOT_SIZE..][..SLOT_SIZE];
            match socket.recv_from(slot) {
                Ok((len, peer)) => {
                    self.lens[index] = len;
                    // recv_from cuts silently here; no datagram exceeds a slot.
                    self.truncated[index] = false;
                    self.peers[index] = Some(peer);
                    self.count += 1;
                }
                // What was taken is served; the error, if it lasts, comes
                // again on the next call.
                Err(_) if self.count > 0 => break,
                Err(err) => return Err(err),
            }
        }
        Ok(self.count)
    }

    /// Sends the datagrams `order` back, one call each; see the Linux version.
    ///
    /// # Errors
    /// What sending the first of them reported.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn send(&mut self, socket: &UdpSocket, order: &[u8]) -> io::Result<usize> {
        for (sent, &index) in order.iter().enumerate() {
            let index = usize::from(index);
            let Some(peer) = self.peers[index] else {
                return Ok(sent);
            };
            if let Err(err) = socket.send_to(self.payload(index), peer) {
                return if sent == 0 { Err(err) } else { Ok(sent) };
            }
        }
        Ok(order.len())
    }
}

/// What a received message's packet info says (nothing, if it has none).
#[cfg(target_os = "linux")]
fn packet_info(message: &libc::msghdr) -> PacketInfo {
    let mut info = PacketInfo::default();
    // SAFETY: `message` is as recvmmsg left it: its control pointer and
    // length describe the control messages the kernel wrote, which the CMSG
    // macros walk without leaving them; each message's level and type say
    // which struct its data holds, and its length is checked to cover it.
    unsafe {
        let mut control = libc::CMSG_FIRSTHDR(message);
        while !control.is_null() {
            let header = &*control;
            let data = libc::CMSG_DATA(control);
            let holds =
                |size: usize| header.cmsg_len as usize >= libc::CMSG_LEN(size as u32) as usize;
            match (header.cmsg_level, header.cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) if holds(size_of::<libc::in_pktinfo>()) => {
                    let v4 = data.cast::<libc::in_pktinfo>().read_unaligned();
                    let header_destination = u32::from_be(v4.ipi_addr.s_addr);
                    let local = u32::from_be(v4.ipi_spec_dst.s_addr);
                    info.destination = Some(IpAddr::from(header_destination.to_be_bytes()));
                    info.local = Some(IpAddr::from(local.to_be_bytes()));
                    // A unicast datagram is taken by the address it names;
                    // a broadcast by an interface's own address.
                    info.to_group |= header_destination != local;
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if holds(size_of::<libc::in6_pktinfo>()) =>
                {
                    let v6 = data.cast::<libc::in6_pktinfo>().read_unaligned();
                    let destination = IpAddr::from(v6.ipi6_addr.s6_addr).to_canonical();
                    // IPv4's message, when both came, says more.
                    info.destination.get_or_insert(destination);
                    info.local.get_or_insert(destination);
                }
                _ => {}
            }
            control = libc::CMSG_NXTHDR(message, control);
        }
    }
    info
}

/// Writes into `header`, with `space` as its room, the packet info that
/// makes the echo leave from `local`, on whatever interface the route picks.
#[cfg(target_os = "linux")]
fn write_source(
    header: &mut libc::msghdr,
    space: &mut [u64; CONTROL_WORDS],
    family: libc::c_int,
    local: IpAddr,
) {
    let (level, kind, size) = match family {
        libc::AF_INET => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        _ => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    header.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    header.msg_controllen = unsafe { libc::CMSG_SPACE(size as u32) } as _;
    // SAFETY: `header` points at `space`, which is aligned for cmsghdr and
    // larger than CMSG_SPACE of either struct, so the first control message
    // and its data lie inside it; each is written whole, unaligned-safe.
    unsafe {
        let control = libc::CMSG_FIRSTHDR(header);
        (*control).cmsg_level = level;
        (*control).cmsg_type = kind;
        (*control).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        let data = libc::CMSG_DATA(control);
        match (family, local) {
            (libc::AF_INET, IpAddr::V4(v4)) => {
                data.cast::<libc::in_pktinfo>()
                    .write_unaligned(libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(v4).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    });
            }
            (_, local) => {
                // An IPv4 peer of an IPv6 socket: its mapped address, which
                // the kernel takes as the IPv4 source.
                let v6 = match local {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                data.cast::<libc::in6_pktinfo>()
                    .write_unaligned(libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: v6.octets(),
                        },
                        ipi6_ifindex: 0,
                    });
            }
        }
    }
}

/// Asks the kernel to tell, with each datagram received on `socket`, the
/// address it was sent to: the batch checks it and sends the echo from it.
/// Does nothing off Linux.
///
/// # Errors
/// The `setsockopt` error.
pub(crate) fn receive_destinations(socket: &UdpSocket) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // IPv4's packet info tells a broadcast apart; Linux delivers it on
        // an IPv6 socket too, for the IPv4 peers it serves. IPv6's gives the
        // destination of the rest.
        let v6 = socket.local_addr()?.is_ipv6();
        match crate::socket::set_option(socket, libc::IPPROTO_IP, libc::IP_PKTINFO, &on) {
            Ok(()) => {}
            // Without it, an IPv6 socket's IPv4 broadcasts are told apart by
            // the interfaces' broadcast addresses alone.
            Err(_) if v6 => {}
            Err(err) => return Err(err),
        }
        if v6 {
            crate::socket::set_option(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, &on)?;
        }
    }
    // Off Linux the socket is left as it is: there is no packet info to ask for.
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0".parse().expect("an address")).expect("bind")
    }

    /// Receives until `count` datagrams are in, within a hard limit.
    fn receive_all(batch: &mut Batch, socket: &UdpSocket, count: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match batch.receive(socket) {
                Ok(got) if got >= count => return got,
                Ok(_) | Err(_) if Instant::now() > deadline => panic!("datagrams did not arrive"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    #[test]
    fn a_batch_echoes_each_datagram_whole_to_its_sender_in_order() {
        let server = socket();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let sizes = [0usize, 1, 1472, 9000, 65_507];
        for (n, size) in sizes.iter().enumerate() {
            let datagram: Vec<u8> = (0..*size).map(|at| (at + n) as u8).collect();
            client
                .send_to(&datagram, server.local_addr().expect("addr"))
                .expect("send");
        }
        let mut batch = Batch::new();
        assert_eq!(receive_all(&mut batch, &server, sizes.len()), sizes.len());
        for index in 0..batch.len() {
            assert_eq!(batch.peer(index), Some(client.local_addr().expect("addr")));
            assert!(!batch.is_truncated(index));
        }
        let order: Vec<u8> = (0..sizes.len() as u8).collect();
        assert_eq!(batch.send(&server, &order).expect("send"), sizes.len());
        let mut echo = vec![0; SLOT_SIZE];
        for (n, size) in sizes.iter().enumerate() {
            let (len, from) = client.recv_from(&mut echo).expect("echo");
            assert_eq!(from, server.local_addr().expect("addr"));
            assert_eq!(len, *size, "datagram {n}");
            assert!(
                echo[..len]
                    .iter()
                    .enumerate()
                    .all(|(at, b)| *b == (at + n) as u8)
            );
        }
    }
}
