//! One event loop of the UDP client: a mio poll over its share of the
//! run's flows (flow `index + 1`, then every `threads`-th), one timer heap,
//! and one set of datagram buffers that every flow of the loop sends from
//! and receives into, so that memory follows the loops, not the flows.
//!
//! Each flow is a state machine (`flow.rs`) that the loop steps when its
//! socket is readable or writable, when the instant it asked for comes, or
//! when the run is stopped. Readiness is edge-triggered: a flow reads until
//! a receive would block, and one that stopped at its batch asks to be
//! stepped again at once. Timers are lazy: a flow has one entry in the
//! heap, the earliest instant it cares about; an entry it no longer wants
//! is skipped when it comes up.
//!
//! mio's own wait counts whole milliseconds: a loop waits with it for the
//! whole milliseconds of a wait, then the rest (under a millisecond) with a
//! `ppoll` on its epoll descriptor (see `socket::poll`), as fine as the
//! timer, so that sends under a millisecond apart keep their schedule.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::failure::UdpFailureKind;
use super::flow::{self, Buffers, Flow, FlowResult, Step};
use super::interval::UdpIntervalTally;
use super::{Context, UdpEvent};
use crate::error::interrupted;

/// The token of the loop's waker; flow `i` of the loop uses `Token(i + 1)`.
const WAKE: Token = Token(0);

/// Events taken from one poll.
const EVENTS: usize = 1024;

/// mio's waits count whole milliseconds; a shorter one is a `ppoll`.
const MILLISECOND: Duration = Duration::from_millis(1);

/// Without the stop watcher thread, how often a loop looks at the stop
/// handle.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// When flow `number` (from 1) of `flows` sends first, for schedules
/// starting at `start` with sends `interval` apart: (`number` − 1) /
/// `flows` of an interval later, so that the flows' sends interleave.
fn first_send(start: Instant, interval: Duration, number: usize, flows: usize) -> Instant {
    let phase = interval.as_secs_f64() * (number - 1) as f64 / flows as f64;
    crate::deadline::deadline_after(start, Duration::from_secs_f64(phase))
}

/// A loop's share of the flows, and everything it needs to run them.
pub(super) struct EventLoop<'a, F> {
    context: &'a Context<'a, F>,
    poll: Poll,
    waker: Arc<Waker>,
    /// `None` once a flow is done.
    flows: Vec<Option<Flow<'a, F>>>,
    results: Vec<FlowResult>,
    /// (instant, flow index), earliest first; see [`Flow::armed`].
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The flows [`fire_timers`](Self::fire_timers) steps in one pass,
    /// kept to reuse its memory.
    due: Vec<usize>,
    buffers: Buffers,
    /// What the flows did since the last flush to `interval`.
    tally: UdpIntervalTally,
    interval: Option<&'a Mutex<UdpIntervalTally>>,
    /// The gap between two sends of a flow.
    send_interval: Duration,
    ends: Option<Instant>,
    stopped: Option<Instant>,
    stop_watched: bool,
    open: usize,
}

/// The numbers (from 1) of the flows of loop `index` of `threads`.
pub(super) fn numbers(flows: usize, threads: usize, index: usize) -> impl Iterator<Item = usize> {
    (index + 1..=flows).step_by(threads)
}

/// What a loop that could not be made (or run) reports: each of its flows
/// failed, with the loop's error, counted in `interval` too, as a flow
/// that cannot open is.
pub(super) fn unstarted<F>(
    context: &Context<'_, F>,
    threads: usize,
    index: usize,
    error: &io::Error,
    interval: Option<&Mutex<UdpIntervalTally>>,
) -> Vec<FlowResult>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    let mut tally = UdpIntervalTally::default();
    let results = numbers(context.config.connections.get(), threads, index)
        .map(|number| {
            let error = io::Error::new(error.kind(), error.to_string());
            let kind = UdpFailureKind::Loop { error };
            tally.count(&kind);
            context.fail(number, kind);
            FlowResult::failed()
        })
        .collect();
    if let Some(shared) = interval {
        tally.flush_into(shared);
    }
    results
}

impl<'a, F> EventLoop<'a, F>
where
    F: Fn(&UdpEvent<'_>) + Sync,
{
    /// Loop `index` of `threads`, with its flows opened, each to send every
    /// `send_interval` (a flow whose socket could not be had is counted
    /// failed at once); `interval` takes its `--report-every` counts.
    ///
    /// # Errors
    ///
    /// No epoll or eventfd could be had, or no memory for the buffers:
    /// none of the loop's flows can run.
    pub fn new(
        context: &'a Context<'a, F>,
        threads: usize,
        index: usize,
        send_interval: Duration,
        interval: Option<&'a Mutex<UdpIntervalTally>>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let len = context.config.payload.len();
        let buffers = Buffers::new(len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes for a datagram"),
            )
        })?;
        let total = context.config.connections.get();
        // Flows that cannot open count in the first interval too.
        let mut tally = UdpIntervalTally::default();
        let mut flows = Vec::new();
        let mut results = Vec::new();
        for number in numbers(total, threads, index) {
            let opened = flow::open_flow(context, number, send_interval).and_then(|flow| {
                let token = Token(flows.len() + 1);
                poll.registry()
                    .register(
                        &mut SourceFd(&flow.socket().as_raw_fd()),
                        token,
                        Interest::READABLE,
                    )
                    .map(|()| flow)
                    .map_err(|error| UdpFailureKind::Socket {
                        peer: context.peer,
                        error,
                    })
            });
            match opened {
                Ok(flow) => flows.push(Some(flow)),
                Err(kind) => {
                    tally.count(&kind);
                    context.fail(number, kind);
                    results.push(FlowResult::failed());
                }
            }
        }
        Ok(EventLoop {
            context,
            poll,
            waker,
            open: flows.len(),
            flows,
            results,
            timers: BinaryHeap::new(),
            due: Vec::new(),
            buffers,
            tally,
            interval,
            send_interval,
            ends: None,
            stopped: None,
            stop_watched: true,
        })
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Whether a watcher thread wakes this loop on stop; if not, the loop
    /// looks at the stop handle every [`STOP_CHECK`].
    pub fn set_stop_watched(&mut self, watched: bool) {
        self.stop_watched = watched;
    }

    /// Runs every flow of the loop to its end, their schedules starting at
    /// `start` and sending ending at `ends` (`--duration`); returns what
    /// each flow did.
    pub fn run(mut self, start: Instant, ends: Option<Instant>) -> Vec<FlowResult> {
        let mut events = Events::with_capacity(EVENTS);
        self.ends = ends;
        let total = self.context.config.connections.get();
        for flow in self.flows.iter_mut().flatten() {
            let first = first_send(start, self.send_interval, flow.number(), total);
            flow.begin(start, first);
        }
        for index in 0..self.flows.len() {
            self.step(index);
        }
        self.flush();
        while self.open > 0 {
            let now = Instant::now();
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            let mut timeout = next.map(|at| at.saturating_duration_since(now));
            if !self.stop_watched {
                timeout = Some(timeout.map_or(STOP_CHECK, |wait| wait.min(STOP_CHECK)));
            }
            if let Err(error) = self.wait(&mut events, timeout) {
                if interrupted(&error) {
                    continue;
                }
                // The loop's epoll itself failed: its flows cannot go on.
                self.abandon(error);
                break;
            }
            if self.stopped.is_none() && self.context.stop.is_stopped() {
                self.stopped = Some(Instant::now());
                // Every flow hears of it now: its patience starts.
                for index in 0..self.flows.len() {
                    self.step(index);
                }
            }
            for event in &events {
                if event.token() == WAKE {
                    continue;
                }
                let index = event.token().0 - 1;
                if let Some(Some(flow)) = self.flows.get_mut(index) {
                    if event.is_writable() || event.is_error() {
                        flow.on_writable();
                    }
                    self.step(index);
                }
            }
            self.fire_timers(Instant::now());
            self.flush();
        }
        self.results
    }

    /// Waits for events up to `timeout` (`None`: until one comes), finer
    /// than a millisecond, in one system call unless events come from a
    /// wait under a millisecond: a wait of a millisecond or more is mio's
    /// own for its whole milliseconds (never later than the kernel's timer slack; the loop waits out the
    /// rest next), a shorter one a `ppoll` on the epoll descriptor, then
    /// mio's to take the events only if it found some.
    fn wait(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let Some(left) = timeout.filter(|left| !left.is_zero()) else {
            return self.poll.poll(events, timeout);
        };
        if left >= MILLISECOND {
            let whole = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            return self.poll.poll(events, Some(Duration::from_millis(whole)));
        }
        // The epoll descriptor is readable when it has events.
        if super::socket::poll(&self.poll, false, None, left)? {
            return self.poll.poll(events, Some(Duration::ZERO));
        }
        // None came in time (or a signal did).
        events.clear();
        Ok(())
    }

    /// Steps the flows whose instant has come by `now`, each once: the
    /// entries due are taken before any flow is stepped, so a flow that
    /// asks again for an instant already come (to go on at once) is
    /// stepped after the next poll, never over and over in this pass
    /// while the loop's other flows wait.
    fn fire_timers(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        while let Some(&Reverse((at, index))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(Some(flow)) = self.flows.get_mut(index) else {
                continue;
            };
            // An entry the flow has since moved earlier is spent.
            if flow.armed != Some(at) {
                continue;
            }
            flow.armed = None;
            due.push(index);
        }
        for &index in &due {
            self.step(index);
        }
        due.clear();
        self.due = due;
    }

    /// Steps flow `index` and sets what it waits for next.
    fn step(&mut self, index: usize) {
        let Some(flow) = self.flows[index].as_mut() else {
            return;
        };
        let step = flow.step(&mut self.buffers, &mut self.tally, self.stopped, self.ends);
        match step {
            Step::Done => self.finish(index, Instant::now()),
            Step::Wait { at, writable } => {
                if writable != flow.writable_registered {
                    let interest = if writable {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    let fd = flow.socket().as_raw_fd();
                    let registry = self.poll.registry();
                    // On failure (no memory for epoll) the flow still
                    // steps at `at`, within a second.
                    if registry
                        .reregister(&mut SourceFd(&fd), Token(index + 1), interest)
                        .is_ok()
                    {
                        flow.writable_registered = writable;
                    }
                }
                if flow.armed.is_none_or(|armed| at < armed) {
                    flow.armed = Some(at);
                    self.timers.push(Reverse((at, index)));
                }
            }
        }
    }

    fn finish(&mut self, index: usize, now: Instant) {
        if let Some(flow) = self.flows[index].take() {
            // Dropping the socket takes it out of the poll.
            self.results.push(flow.finish(now));
            self.open -= 1;
        }
    }

    /// The poll broke: every flow still running ends, what it has out lost.
    fn abandon(&mut self, error: io::Error) {
        for index in 0..self.flows.len() {
            if let Some(flow) = self.flows[index].as_mut() {
                let error = io::Error::new(error.kind(), error.to_string());
                flow.abandon(error, &mut self.tally);
                self.finish(index, Instant::now());
            }
        }
        self.flush();
    }

    /// Hands this loop's interval counts to the reporter.
    fn flush(&mut self) {
        // Without --report-every the tally is never read.
        if let Some(shared) = self.interval {
            self.tally.flush_into(shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_send_first_evenly_spread_over_one_interval() {
        let start = Instant::now();
        let interval = Duration::from_millis(10);
        let firsts: Vec<Duration> = (1..=4)
            .map(|number| first_send(start, interval, number, 4) - start)
            .collect();
        let ms = |ms: f64| Duration::from_secs_f64(ms / 1000.0);
        assert_eq!(firsts, [ms(0.0), ms(2.5), ms(5.0), ms(7.5)]);
    }

    #[test]
    fn a_loop_takes_every_threads_th_flow() {
        assert_eq!(numbers(7, 3, 0).collect::<Vec<_>>(), [1, 4, 7]);
        assert_eq!(numbers(7, 3, 2).collect::<Vec<_>>(), [3, 6]);
    }
}
