//! Process limits the server depends on: the open-file limit bounds how many
//! connections the acceptor can hold, so the binary raises it at start-up.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft
/// limit.
///
/// # Errors
/// The `getrlimit` or `setrlimit` error.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Descriptors the process needs besides connections: stdio, the listener,
/// the signal thread's socket pair, an epoll and an eventfd waker for each
/// worker and the acceptor, and some slack. (With 1024 workers the process
/// holds 2058.)
pub fn reserved_descriptors(workers: usize) -> u64 {
    16 + 2 * (workers as u64 + 1)
}
