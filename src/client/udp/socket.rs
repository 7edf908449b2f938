//! A flow's socket calls that std does not offer, with their `unsafe` kept
//! here behind a safe API: opening the socket with kernel receive
//! timestamps, receiving an echo with its true size and the time it
//! arrived, and waiting with a timeout finer than a millisecond. The flow
//! (`flow.rs`) and its event loop (`event_loop.rs`) are their users.
//!
//! Why arrival times: an echo that came in time must not count lost because
//! the flow read it late (busy sending, printing, or descheduled), and its
//! round trip must end when it came. On Linux the kernel stamps each
//! datagram (`SO_TIMESTAMPNS`, wall clock); the stamp's age, measured
//! against the wall clock when it is read, is taken off the monotonic
//! clock. Elsewhere the time of the read stands in.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// One datagram taken from the socket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The datagram's true size: more than `len` when it did not fit (on
    /// Linux; elsewhere `len`).
    pub size: usize,
    pub from: SocketAddr,
    /// When it arrived (Linux) or was read.
    pub at: Instant,
}

/// Asks the kernel to stamp each datagram's arrival. Without it (another
/// system), or for a datagram that comes before Linux has turned stamping
/// on (a moment after the first socket asks), the time of the read
/// stands in.
pub(super) fn stamp_arrivals(socket: &UdpSocket) {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid c_int that outlives the call, and its size is passed.
        let _unchecked = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // A failure leaves reads timed when they happen, which is what the
        // other systems do.
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket; // Nothing to ask for.
}

/// Takes one datagram into `buf`.
///
/// # Errors
/// The socket's: `WouldBlock` when none is waiting.
#[cfg(target_os = "linux")]
pub(super) fn receive(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    use std::time::{SystemTime, UNIX_EPOCH};

    // SAFETY: sockaddr_storage is plain data, valid when all zero.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // Room for one timestamp message, aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data, valid when all zero.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = (&raw mut name).cast();
    header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in `header` points at a live buffer of the length given.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut header, libc::MSG_TRUNC) };
    let size = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    let now = Instant::now();
    let wall = SystemTime::now();
    let from = crate::socket::socket_addr(&name).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a datagram from a non-IP address",
        )
    })?;
    let mut at = now;
    // SAFETY: `header` was filled by recvmsg; the CMSG macros stay within
    // `msg_controllen` bytes of `control`.
    unsafe {
        let mut message = libc::CMSG_FIRSTHDR(&raw const header);
        while !message.is_null() {
            let cmsg = &*message;
            if cmsg.cmsg_level == libc::SOL_SOCKET && cmsg.cmsg_type == libc::SCM_TIMESTAMPNS {
                let stamp: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(message).cast());
                let since_epoch = u64::try_from(stamp.tv_sec)
                    .ok()
                    .zip(u32::try_from(stamp.tv_nsec).ok())
                    .map(|(secs, nanos)| Duration::new(secs, nanos));
                // A stamp "in the future" (the wall clock stepped back) is
                // taken as now.
                if let Some(age) =
                    since_epoch.and_then(|since| wall.duration_since(UNIX_EPOCH + since).ok())
                {
                    at = now.checked_sub(age).unwrap_or(now);
                }
            }
            message = libc::CMSG_NXTHDR(&raw const header, message);
        }
    }
    Ok(Received {
        len: size.min(buf.len()),
        size,
        from,
        at,
    })
}

/// Takes one datagram into `buf`, timed when read.
///
/// # Errors
/// The socket's: `WouldBlock` when none is waiting.
#[cfg(not(target_os = "linux"))]
pub(super) fn receive(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let (len, from) = socket.recv_from(buf)?;
    Ok(Received {
        len,
        size: len,
        from,
        at: Instant::now(),
    })
}

/// Waits up to `left` for `socket` to be readable (or writable, if
/// `write`), or for `stop` to hang up: a flow's socket, or an event loop's
/// epoll descriptor, readable when it has events. On Linux the wait is as fine as
/// the timer (ppoll), so a send interval under a millisecond is kept;
/// elsewhere it is rounded up to whole milliseconds.
///
/// Returns whether anything is ready.
///
/// # Errors
/// poll's own error; a signal is not one (nothing is ready then).
pub(super) fn poll(
    socket: &impl AsRawFd,
    write: bool,
    stop: Option<RawFd>,
    left: Duration,
) -> io::Result<bool> {
    let mut events = libc::POLLIN;
    if write {
        events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let count = if stop.is_some() { 2 } else { 1 };
    #[cfg(target_os = "linux")]
    let ready = {
        let timeout = libc::timespec {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(left.subsec_nanos()),
        };
        // SAFETY: `fds` holds `count` valid, initialised pollfds and
        // `timeout` a valid timespec, all outliving the call; no signal mask.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                count as libc::nfds_t,
                &raw const timeout,
                std::ptr::null(),
            )
        }
    };
    #[cfg(not(target_os = "linux"))]
    let ready = {
        // Rounded up, so that a wait under a millisecond does not spin.
        let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` holds `count` valid, initialised pollfds that outlive the call.
        unsafe { libc::poll(fds.as_mut_ptr(), count as libc::nfds_t, millis) }
    };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if crate::error::interrupted(&error) {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(ready > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_wait_under_a_millisecond_is_not_rounded_up_to_one() {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // Load only lengthens a wait; rounding up would make every one of
        // them at least a millisecond, so the shortest tells.
        let shortest = (0..50)
            .map(|_| {
                let began = std::time::Instant::now();
                poll(&socket, false, None, Duration::from_micros(200)).expect("poll");
                began.elapsed()
            })
            .min()
            .expect("50 waits");
        assert!(
            shortest < Duration::from_micros(900),
            "the shortest of 50 waits of 200 µs took {shortest:?}"
        );
    }

    #[test]
    fn a_datagram_read_late_keeps_its_arrival_time_and_true_size() {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        stamp_arrivals(&receiver);
        // Linux turns stamping on for the system a moment later (deferred
        // work); a datagram before that is stamped when it is read.
        std::thread::sleep(Duration::from_millis(50));
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sent = Instant::now();
        sender
            .send_to(&[7; 100], receiver.local_addr().expect("an address"))
            .expect("send");
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0; 10];
        let received = receive(&receiver, &mut buf).expect("a datagram is waiting");
        assert_eq!(received.from, sender.local_addr().expect("an address"));
        assert_eq!(received.len, 10);
        if cfg!(target_os = "linux") {
            assert_eq!(received.size, 100);
            assert!(
                received.at.duration_since(sent) < Duration::from_millis(50),
                "arrived {:?} after the send",
                received.at.duration_since(sent)
            );
        }
    }
}
