//! Logging for the server: one event a line on stderr, each with an RFC 3339
//! timestamp. Every part of the flow (acceptor, worker, shutdown controller)
//! holds a copy of the [`Logger`] and asks it before formatting anything, so a
//! disabled level costs one comparison on the hot path. Logging never blocks:
//! a line that stderr cannot take at once is dropped and counted.
//!
//! When stderr is systemd's journal ([`stderr_is_journal`]), lines carry a
//! syslog priority marker (`<3>` error, `<4>` warning, `<6>` info, `<7>`
//! debug) instead of a timestamp, which the journal adds itself; so
//! `journalctl -p warning` shows warnings and errors only.

use std::fmt;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::server::config::LogLevel;

/// How many characters of received data `-v` shows.
const PREVIEW_CHARS: usize = 80;

/// Writes log lines at or below its level. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Logger {
    level: LogLevel,
}

impl Logger {
    /// A logger that writes events up to `level`.
    pub fn new(level: LogLevel) -> Self {
        Logger { level }
    }

    /// Whether events of `level` are written; check before costly formatting.
    #[inline]
    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    /// Start-up and shutdown events, written unless silent.
    pub fn notice(&self, message: fmt::Arguments<'_>) {
        if self.enabled(LogLevel::Quiet) {
            write_line("INFO", message);
        }
    }

    /// Per-connection events, written unless quiet.
    #[inline]
    pub fn info(&self, message: fmt::Arguments<'_>) {
        if self.enabled(LogLevel::Normal) {
            write_line("INFO", message);
        }
    }

    /// Data events, written only when verbose.
    #[inline]
    pub fn debug(&self, message: fmt::Arguments<'_>) {
        if self.enabled(LogLevel::Verbose) {
            write_line("DEBUG", message);
        }
    }

    /// Something is wrong but the server goes on; written unless silent.
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        if self.enabled(LogLevel::Quiet) {
            write_line("WARN", message);
        }
    }

    /// Something failed; written unless silent.
    pub fn error(&self, message: fmt::Arguments<'_>) {
        if self.enabled(LogLevel::Quiet) {
            write_line("ERROR", message);
        }
    }
}

/// `count` and `noun`, the noun in the plural unless `count` is 1: `1
/// connection`, `2 connections`, `0 echoes`. For log and summary lines of
/// both binaries.
///
/// ```
/// use echo_chamber::log::counted;
/// assert_eq!(counted(1, "worker").to_string(), "1 worker");
/// assert_eq!(counted(0, "echo").to_string(), "0 echoes");
/// ```
pub fn counted(count: u64, noun: &str) -> Counted<'_> {
    Counted { count, noun }
}

/// A count and its noun, as [`counted`] makes it.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'a> {
    count: u64,
    noun: &'a str,
}

impl fmt::Display for Counted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ending = match (self.count, self.noun.ends_with('o')) {
            (1, _) => "",
            (_, true) => "es",
            (_, false) => "s",
        };
        write!(f, "{} {}{ending}", self.count, self.noun)
    }
}

/// Lets one warning of a kind through at most once a second, shared by every
/// thread that may warn of it (the workers' UDP sockets, say), so that a
/// flood of bad traffic costs a line a second, never a line a datagram.
#[derive(Debug)]
pub(crate) struct SharedThrottle {
    epoch: std::time::Instant,
    /// Milliseconds from `epoch` to the last warning let through, plus one
    /// (zero: none yet).
    last: AtomicU64,
}

/// The fewest milliseconds between two warnings of one kind.
const WARNING_INTERVAL_MS: u64 = 1000;

impl SharedThrottle {
    pub(crate) fn new() -> Self {
        SharedThrottle {
            epoch: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Whether a warning may go out at `now`; at most one caller a second
    /// gets true.
    pub(crate) fn pass(&self, now: std::time::Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < WARNING_INTERVAL_MS {
            return false;
        }
        // Of two threads racing here, only one moves the mark.
        self.last
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Whether lines are written for the journal (see the module doc).
static JOURNAL_FORMAT: AtomicBool = AtomicBool::new(false);

/// Writes lines for systemd's journal from now on: priority markers and no
/// timestamps. The binary turns it on when [`stderr_is_journal`].
pub fn use_journal_format(on: bool) {
    JOURNAL_FORMAT.store(on, Ordering::Relaxed);
}

/// Whether stderr is the journal stream that `journal_stream` (the value of
/// `JOURNAL_STREAM`, `DEVICE:INODE`) names, as systemd documents the check:
/// a process whose stderr was redirected elsewhere must not use the format.
pub fn stderr_is_journal(journal_stream: &str) -> bool {
    let Some((device, inode)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes one stat struct, which we own, for descriptor 2.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; descriptor 2 may be closed, which fstat reports.
    if unsafe { libc::fstat(2, &mut status) } != 0 {
        return false;
    }
    status.st_dev as u64 == device && status.st_ino as u64 == inode
}

/// Lines dropped because stderr would have blocked, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn write_line(tag: &str, message: fmt::Arguments<'_>) {
    let journal = JOURNAL_FORMAT.load(Ordering::Relaxed);
    // The journal stamps each line itself; a priority marker tells it the level.
    let prefix = |tag: &str| match journal {
        true => match tag {
            "ERROR" => "<3>".to_string(),
            "WARN" => "<4>".to_string(),
            "DEBUG" => "<7>".to_string(),
            _ => "<6>".to_string(),
        },
        false => format!(
            "{} {tag} ",
            humantime::format_rfc3339_millis(SystemTime::now())
        ),
    };
    // Formatted first so the line goes out in one write: stderr is
    // unbuffered, and writing the pieces would cost a syscall each.
    let mut line = format!("{}{message}\n", prefix(tag));
    let mut stderr = std::io::stderr().lock();
    // A reader that stopped reading (a paused pager, a stuck log collector)
    // must not stall the workers or the shutdown: a line that would block
    // is dropped and counted, and the count goes out with the next line
    // that fits. Checked under the lock, so no other thread fills the room.
    if !writable_now(&stderr) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let unit = if dropped == 1 { "line" } else { "lines" };
        line.insert_str(
            0,
            &format!(
                "{}{dropped} log {unit} dropped: stderr was not being read\n",
                prefix("WARN")
            ),
        );
    }
    // A log line that cannot be written (stderr closed, a pipe whose reader
    // left) is lost; eprint! would panic the serving thread instead.
    let _ = stderr.write_all(line.as_bytes());
}

/// False only when a write to `stderr` would block: a full pipe or socket
/// (a pipe that polls writable has a page free, more than a line needs).
/// A closed or broken stderr counts as writable, since writing fails at once.
fn writable_now(stderr: &impl AsRawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd: stderr.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; a zero timeout.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ready != 0
}

/// Received bytes as `-v` shows them: lossily decoded, escaped, and cut to 80
/// characters with a trailing `…` when longer.
pub fn preview(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut escaped = text.chars().flat_map(char::escape_debug);
    let mut shown: String = escaped.by_ref().take(PREVIEW_CHARS).collect();
    if escaped.next().is_some() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_escapes_and_cuts_to_80_characters() {
        assert_eq!(preview(b"hi\n\x00"), "hi\\n\\0");
        assert_eq!(preview(&[0xff, b'a']), "\u{fffd}a");
        let long = preview(&[b'x'; 200]);
        assert_eq!(long.chars().count(), 81);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn a_shared_throttle_passes_one_warning_a_second() {
        let throttle = SharedThrottle::new();
        let start = std::time::Instant::now();
        assert!(throttle.pass(start));
        assert!(!throttle.pass(start));
        assert!(!throttle.pass(start + std::time::Duration::from_millis(999)));
        assert!(throttle.pass(start + std::time::Duration::from_millis(1001)));
    }

    #[test]
    fn levels_are_ordered_quiet_normal_verbose() {
        let normal = Logger::new(LogLevel::Normal);
        assert!(normal.enabled(LogLevel::Quiet));
        assert!(normal.enabled(LogLevel::Normal));
        assert!(!normal.enabled(LogLevel::Verbose));
    }
}
