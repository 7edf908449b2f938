//! The TCP engine: a run's connections spread over a few mio event loops
//! (`--threads`), each loop owning its connections for the whole run, as
//! the server's workers do. A connection that waits holds no buffer: a
//! message buffer exists only while its echo is out, and echoes are read
//! into the loop's one scratch buffer and compared as they come.
//!
//! ```text
//! run() ─▶ loop 1 ─▶ connections 1, 1+T, 1+2T, …  ─▶ tally ─┐
//!      └─▶ loop T ─▶ connections T, 2T, …          ─▶ tally ─┴▶ Report
//!   StopHandle ─▶ stop watcher ─▶ each loop's Waker
//! ```
//!
//! Closed loop (the default): each connection sends its next message when
//! the last echo is back (after `--interval`). Open loop (`--rate`): each
//! loop sends its share of the rate on a fixed schedule, on whichever of its
//! connections is free, and times each echo from when it was due (see
//! [`event_loop`]). With `--reconnect`, a connection the server ends is
//! opened again on its loop (see [`event_loop`]). `--stdin`, one
//! interactive connection, keeps the blocking engine in [`echo`](super::echo).

mod connection;
mod event_loop;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use mio::Waker;

use super::echo::ConnectionTally;
use super::interval::{Interval, IntervalTally};
use super::stop::StopHandle;
use super::{ClientConfig, Event};
use event_loop::EventLoop;

/// What every loop of a run shares.
pub(super) struct Plan<'a, F> {
    pub config: &'a ClientConfig,
    pub addrs: &'a [SocketAddr],
    pub observer: &'a F,
    pub stop: &'a StopHandle,
    /// Seeds `--size` payloads: different every run.
    pub seed: u64,
    /// The run's start: the origin of `--connect-rate` and `--duration`
    /// (a loop's `--rate` schedule starts with its first connection).
    pub started: Instant,
    /// Loops in this run: never more than connections.
    pub threads: usize,
    /// With `--report-every`, one tally per loop; otherwise empty.
    pub intervals: &'a [Mutex<IntervalTally>],
}

impl<F> Plan<'_, F> {
    /// True with more than one connection: failures then name theirs.
    fn multiple(&self) -> bool {
        self.config.connections.get() > 1
    }

    /// When sending ends with `--duration`.
    fn ends(&self) -> Option<Instant> {
        self.config
            .duration
            .map(|duration| crate::deadline::deadline_after(self.started, duration))
    }
}

/// How many loops a run gets: `--threads`, else the number of CPUs, never
/// more than connections.
pub(super) fn thread_count(config: &ClientConfig) -> usize {
    let wanted = config.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        std::num::NonZeroUsize::get,
    );
    wanted.min(config.connections.get()).max(1)
}

/// The most `--size` message buffers loop `index` of `threads` may have
/// out at once: its share of the run's most, at least one. The run's most
/// is one per connection, or with `--rate` the echoes that can be out
/// within a `--timeout` at that rate, if fewer. A loop held up (SIGSTOP, a
/// descheduled thread) that then owes many echoes sends them as buffers
/// come back, not all at once, so [`memory_needed`](super::memory_needed)
/// stays a bound; their lateness counts in their round trips.
pub(super) fn loop_buffers(config: &ClientConfig, threads: usize, index: usize) -> u64 {
    let connections = config.connections.get() as u64;
    let threads = threads.max(1) as u64;
    let index = index as u64;
    // Loop `index` runs connections index + 1, index + 1 + threads, ...
    let mine = connections.saturating_sub(index).div_ceil(threads);
    let most = config.rate.map_or(connections, |rate| {
        let most = (rate as f64 * config.timeout.as_secs_f64()).ceil() as u64;
        connections.min(most.max(1))
    });
    (most.saturating_mul(mine).div_ceil(connections)).max(1)
}

/// Runs the plan on its loops and returns one tally per loop; with
/// `--report-every`, calls `on_interval` from a reporter thread.
pub(super) fn run<F, I>(plan: &Plan<'_, F>, on_interval: &I) -> Vec<ConnectionTally>
where
    F: Fn(&Event<'_>) + Sync,
    I: Fn(&Interval) + Sync,
{
    let mut loops = Vec::with_capacity(plan.threads);
    let mut ends = Vec::new();
    for index in 0..plan.threads {
        match EventLoop::new(plan, index) {
            Ok(event_loop) => loops.push(event_loop),
            // No epoll or eventfd left: its connections fail, the rest run.
            Err(error) => ends.push(event_loop::unstarted(plan, index, error)),
        }
    }
    let wakers: Vec<Arc<Waker>> = loops.iter().map(EventLoop::waker).collect();
    std::thread::scope(|scope| {
        // Dropping `done` ends the stop watcher when the loops are through.
        let (done, finished) = crossbeam_channel::bounded::<Infallible>(0);
        if let Some(every) = plan.config.report_every {
            let finished = finished.clone();
            let reporter = std::thread::Builder::new()
                .name("echo-client-intervals".into())
                .spawn_scoped(scope, move || {
                    report_intervals(plan, every, &finished, on_interval);
                });
            // Without it the run goes on and only the summary is reported.
            drop(reporter);
        }
        // Without a watcher the loops look at the stop handle every
        // STOP_CHECK instead of being woken.
        let watched = watch_stop(scope, "echo-client-stop", plan.stop, finished, wakers);
        let mut handles = Vec::with_capacity(loops.len());
        for mut event_loop in loops {
            event_loop.set_stop_watched(watched);
            let name = format!("echo-client-loop-{}", event_loop.index() + 1);
            let index = event_loop.index();
            let spawned = std::thread::Builder::new()
                .name(name)
                .spawn_scoped(scope, move || event_loop.run());
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => ends.push(event_loop::unstarted(plan, index, error)),
            }
        }
        for handle in handles {
            ends.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        drop(done);
    });
    event_loop::settle(ends)
}

/// Starts the thread that wakes every loop (`wakers`) when `stop` fires,
/// and ends when `finished` disconnects (the loops are through); false if
/// it could not start, and the loops must then look at `stop` themselves.
/// The TCP and the UDP loops share it.
pub(in crate::client) fn watch_stop<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    stop: &StopHandle,
    finished: crossbeam_channel::Receiver<Infallible>,
    wakers: Vec<Arc<Waker>>,
) -> bool {
    let stopping = stop.receiver().clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn_scoped(scope, move || {
            select! {
                // Only ever a disconnection: the run was stopped.
                recv(stopping) -> _ => {
                    for waker in &wakers {
                        // A loop that has ended needs no wake-up.
                        let _ = waker.wake();
                    }
                }
                // Only ever a disconnection: the run is over.
                recv(finished) -> _ => {}
            }
        })
        .is_ok()
}

/// Reports an interval every `every` from the start of the run, until
/// `finished` disconnects; then the last, shorter one if anything happened.
fn report_intervals<F, I>(
    plan: &Plan<'_, F>,
    every: Duration,
    finished: &crossbeam_channel::Receiver<Infallible>,
    on_interval: &I,
) where
    I: Fn(&Interval),
{
    let mut start = Duration::ZERO;
    loop {
        let end = start.saturating_add(every);
        let at = crate::deadline::deadline_after(plan.started, end);
        match finished.recv_deadline(at) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                on_interval(&Interval::take(plan.intervals, start, end));
                start = end;
            }
            // Only ever a disconnection: the loops are through.
            _ => {
                let last = Interval::take(plan.intervals, start, plan.started.elapsed());
                if last.echoes > 0 || last.errors > 0 {
                    on_interval(&last);
                }
                return;
            }
        }
    }
}

/// How long until `at`, rounded up to a whole millisecond so that a poll
/// that waits in milliseconds does not wake just before it and spin.
fn wait_until(now: Instant, at: Instant) -> Duration {
    let left = at.saturating_duration_since(now);
    let millis = left.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}
