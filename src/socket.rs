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
