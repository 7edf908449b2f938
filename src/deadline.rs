//! Deadlines that cannot overflow: the server's timers (idle, shutdown,
//! PROXY header) and the client's waits all compute "now plus a configured
//! duration" here, so "for ever" (a huge duration) means about 100 years.

use std::time::{Duration, Instant};

/// The longest timer armed: durations beyond it (up to "for ever")
/// behave as this, about 100 years, instead of overflowing the clock.
pub const LONGEST_TIMER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `after` past `from`, capped at about 100 years so that a
/// huge configured duration cannot overflow `Instant`.
pub fn deadline_after(from: Instant, after: Duration) -> Instant {
    const ONE_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    from.checked_add(after.min(LONGEST_TIMER))
        .or_else(|| from.checked_add(ONE_YEAR))
        .unwrap_or(from)
}

/// `duration` as the server's log lines show a timer: humantime's form,
/// or, past [`LONGEST_TIMER`], the cap that applies instead.
///
/// ```
/// use std::time::Duration;
/// use echo_chamber::deadline::describe;
/// assert_eq!(describe(Duration::from_secs(5)), "5s");
/// assert_eq!(describe(Duration::MAX), "100 years, the longest timer");
/// ```
pub fn describe(duration: Duration) -> String {
    if duration >= LONGEST_TIMER {
        "100 years, the longest timer".to_owned()
    } else {
        humantime::format_duration(duration).to_string()
    }
}
