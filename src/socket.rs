//! Socket queries that std and mio do not offer, shared by the server's
//! connections (how much to echo in a drain) and the client (whether the
//! server sent more than it was sent).

use std::os::fd::AsRawFd;

/// Bytes received and waiting to be read on `socket`, or `None` if the
/// kernel would not say.
pub(crate) fn unread_len(socket: &impl AsRawFd) -> Option<usize> {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, the receive queue's length.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut unread) };
    (rc == 0).then_some(unread.max(0) as usize)
}
