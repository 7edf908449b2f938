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
//!
//! Spinning pays only while a wake-up is what the worker waits for. Under
//! saturation it costs: the CPU it burns is CPU the clients and the other
//! workers wanted, and catching events the instant they arrive splits the
//! batches a sleep would have gathered. So the window also drops to zero,
//! until a later sleep shows sparse traffic again, when the worker sees
//! either sign of saturation (issue 16):
//! - a wait, spun or slept, returned more than [`BATCH_EVENTS`] events: the
//!   worker has work in batches, and batching beats spinning;
//! - while it spun, the scheduler ran another thread on its CPU in its place
//!   (its involuntary context switches grew across `sched_yield`): the CPU
//!   is contested, so the spin takes it from a thread that wanted it.

use std::time::Duration;

/// The smallest window a worker starts spinning with, as a fraction of the limit.
const FIRST_WINDOW_DIVISOR: u32 = 8;

/// A wait that returns more events than this means the worker is busy in
/// batches, and spinning stops. Two, not one, so that a client with a
/// second connection (a control channel, say) keeps the latency gain.
pub(crate) const BATCH_EVENTS: usize = 2;

/// What a wait, spun or slept, saw.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Waited {
    /// Events it returned.
    pub(crate) events: usize,
    /// Whether another thread ran on this CPU while the worker spun.
    pub(crate) contested: bool,
}

impl Waited {
    /// Whether the worker shows a sign of saturation (see the module doc).
    fn saturated(self) -> bool {
        self.contested || self.events > BATCH_EVENTS
    }
}

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

    /// The loop caught events while spinning, having seen `seen`.
    ///
    /// A sign of saturation stops spinning; otherwise the window stays.
    pub(crate) fn after_catch(&mut self, seen: Waited) {
        if seen.saturated() {
            self.window = Duration::ZERO;
        }
    }

    /// The loop went to sleep after spinning (if at all) and woke up
    /// `waited` after it began waiting, having seen `seen`.
    ///
    /// Events within the limit mean a longer spin would have caught them, so
    /// the window doubles, unless the worker showed a sign of saturation; a
    /// longer wait, or a wake-up for a timer alone, means spinning is not
    /// paying, so it stops.
    pub(crate) fn after_sleep(&mut self, waited: Duration, seen: Waited) {
        self.window = if seen.events > 0 && waited <= self.limit && !seen.saturated() {
            // At least a nanosecond, so that even a tiny limit can grow.
            let first = (self.limit / FIRST_WINDOW_DIVISOR).max(Duration::from_nanos(1));
            (self.window * 2).max(first).min(self.limit)
        } else {
            Duration::ZERO
        };
    }
}

/// This thread's involuntary context switches so far: each time the
/// scheduler ran another thread in its place while it was runnable, which
/// a `sched_yield` that gave the CPU away counts too. None if unknown.
#[cfg(target_os = "linux")]
pub(crate) fn involuntary_switches() -> Option<i64> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into `usage`, which outlives the call;
    // RUSAGE_THREAD has no other precondition.
    let done = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
    (done == 0).then_some(usage.ru_nivcsw)
}

/// Elsewhere `RUSAGE_THREAD` may not exist: contention is never seen, and
/// only the batch sign stops spinning.
#[cfg(not(target_os = "linux"))]
pub(crate) fn involuntary_switches() -> Option<i64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_micros(80);
    const ONE: Waited = Waited {
        events: 1,
        contested: false,
    };
    const BATCH: Waited = Waited {
        events: BATCH_EVENTS + 1,
        contested: false,
    };
    const CONTESTED: Waited = Waited {
        events: 1,
        contested: true,
    };

    /// A window grown to the limit by short one-event sleeps.
    fn spinning() -> BusyPoll {
        let mut busy = BusyPoll::new(LIMIT);
        for _ in 0..4 {
            busy.after_sleep(Duration::from_micros(30), ONE);
        }
        assert_eq!(busy.window(), LIMIT);
        busy
    }

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
        busy.after_sleep(Duration::ZERO, ONE);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_limit() {
        let mut busy = BusyPoll::new(LIMIT);
        let mut windows = Vec::new();
        for _ in 0..6 {
            busy.after_sleep(Duration::from_micros(30), ONE);
            windows.push(busy.window().as_micros());
        }
        assert_eq!(windows, [10, 20, 40, 80, 80, 80]);
    }

    #[test]
    fn a_sleep_longer_than_the_limit_stops_spinning() {
        let mut busy = BusyPoll::new(LIMIT);
        busy.after_sleep(Duration::from_micros(30), ONE);
        busy.after_sleep(Duration::from_micros(30), ONE);
        busy.after_sleep(LIMIT + Duration::from_nanos(1), ONE);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn a_wake_up_without_events_stops_spinning() {
        let mut busy = BusyPoll::new(LIMIT);
        busy.after_sleep(Duration::from_micros(30), ONE);
        busy.after_sleep(Duration::from_micros(5), Waited::default());
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn catches_of_a_few_events_keep_the_window() {
        let mut busy = spinning();
        for events in 1..=BATCH_EVENTS {
            busy.after_catch(Waited {
                events,
                contested: false,
            });
        }
        assert_eq!(busy.window(), LIMIT);
    }

    #[test]
    fn a_catch_of_a_batch_stops_spinning() {
        let mut busy = spinning();
        busy.after_catch(BATCH);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn a_contested_spin_stops_spinning() {
        let mut busy = spinning();
        busy.after_catch(CONTESTED);
        assert_eq!(busy.window(), Duration::ZERO);
        let mut busy = spinning();
        busy.after_sleep(Duration::from_micros(30), CONTESTED);
        assert_eq!(busy.window(), Duration::ZERO);
    }

    #[test]
    fn short_sleeps_with_batches_never_start_spinning() {
        let mut busy = BusyPoll::new(LIMIT);
        for _ in 0..6 {
            busy.after_sleep(Duration::from_micros(30), BATCH);
            assert_eq!(busy.window(), Duration::ZERO);
        }
    }

    #[test]
    fn sparse_traffic_after_saturation_spins_again() {
        let mut busy = spinning();
        busy.after_catch(BATCH);
        busy.after_sleep(Duration::from_micros(30), ONE);
        assert_eq!(busy.window(), LIMIT / FIRST_WINDOW_DIVISOR);
    }

    #[test]
    fn this_thread_has_a_count_of_involuntary_switches() {
        assert!(involuntary_switches().is_some_and(|n| n >= 0));
    }
}
