//! Busy polling: how long a [worker](crate::server::worker) keeps asking its event
//! loop for readiness before it goes to sleep. It sits inside the worker step
//! of the flow acceptor → channel → worker → connection and decides nothing
//! about bytes.
//!
//! A sleeping worker pays a wake-up on every round trip of a ping-pong: the
//! scheduler has to notice the thread, and on a virtual machine often bring an
//! idle CPU back with an interrupt. That is most of a loopback round trip, and
//! it is what a thread blocked in `read` pays too. Asking the kernel again
//! with a zero timeout for a few tens of microseconds catches the next message
//! without any wake-up, at the price of CPU while the spin lasts.
//!
//! The window adapts the way KVM's halt polling does: it grows while the
//! worker keeps waking for events less than the limit after it began to wait
//! (traffic comes back soon, so spinning would have caught it) and drops to
//! zero as soon as a wait outlasts the limit. So a worker spins at most about
//! one window after each burst of traffic, traffic whose gaps all outlast the
//! limit never makes it spin, and a worker with no traffic sleeps after at
//! most one window.

use std::time::Duration;

/// The smallest window a worker starts spinning with, as a fraction of the limit.
const FIRST_WINDOW_DIVISOR: u32 = 8;

/// The adaptive spin window of one worker.
#[derive(Debug, Clone)]
pub(crate) struct BusyPoll {
    limit: Duration,
    window: Duration,
}

impl BusyPoll {
    /// A window that may grow to `limit`; a zero limit turns spinning off.
    pub(crate) fn new(limit: Duration) -> Self {
        BusyPoll {
            limit,
            window: Duration::ZERO,
        }
    }

    /// Whether spinning can happen at all, so the loop need not time its waits.
    pub(crate) fn enabled(&self) -> bool {
        !self.limit.is_zero()
    }

    /// How long to spin before the next sleep.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// The loop went to sleep after spinning (if at all) and woke up
    /// `waited` after it began waiting, with events or not.
    ///
    /// Events within the limit mean a longer spin would have caught them, so
    /// the window doubles; a longer wait, or a wake-up for a timer alone,
    /// means spinning is not paying, so it stops.
    pub(crate) fn after_sleep(&mut self, waited: Duration, had_events: bool) {
        self.window = if had_events && waited <= self.limit {
            // At least a nanosecond, so that even a tiny limit can grow.
            let first = (self.limit / FIRST_WINDOW_DIVISOR).max(Duration::from_nanos(1));
            (self.window * 2).max(first).min(self.limit)
        } else {
            Duration::ZERO
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_micros(80);

    #[test]
    fn starts_without_spinning() {
        let busy = BusyPoll::new(LIMIT);
        assert!(busy.enabled());
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn zero_limit_never_spins() {
        let mut busy = BusyPoll::new(Duration::ZERO);
        assert!(!busy.enabled());
        busy.after_sleep(Duration::ZERO, true);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_limit() {
        let mut busy = BusyPoll::new(LIMIT);
        let mut windows = Vec::new();
        for _ in 0..6 {
            busy.after_sleep(Duration::from_micros(30), true);
            windows.push(busy.window().as_micros());
        }
        assert_eq!(windows, [10, 20, 40, 80, 80, 80]);
    }

    #[test]
    fn a_sleep_longer_than_the_limit_stops_spinning() {
        let mut busy = BusyPoll::new(LIMIT);
        busy.after_sleep(Duration::from_micros(30), true);
        busy.after_sleep(Duration::from_micros(30), true);
        busy.after_sleep(LIMIT + Duration::from_nanos(1), true);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn a_wake_up_without_events_stops_spinning() {
        let mut busy = BusyPoll::new(LIMIT);
        busy.after_sleep(Duration::from_micros(30), true);
        busy.after_sleep(Duration::from_micros(5), false);
        assert_eq!(busy.window(), Duration::ZERO);
    }
}
