//! One event loop of the TCP engine: a mio poll over its share of the
//! run's connections, one timer heap, one scratch buffer that every echo is
//! read into, and a pool of message buffers for the echoes out.
//!
//! Readiness is edge-triggered, so each connection remembers whether it is
//! readable or writable until a call would block; a connection between
//! echoes is not read (the next echo, or the closing check, reads what came
//! meanwhile, as the blocking engine does). Writing and reading an echo
//! interleave, whatever its size, so a server that stops reading until its
//! echo is read cannot deadlock the client.
//!
//! Timers are lazy: a connection has at most one entry in the heap, the
//! earliest instant it cares about; when that fires, the connection looks
//! at its state again and sets its next one.
//!
//! With `--rate`, the loop's share of the rate is a fixed schedule that
//! starts when its first connection opens: each due echo goes on the free
//! connection that has waited longest; with none free it waits in a queue
//! of late echoes for the next connection to come free. The round trip is
//! timed from when the echo was due (wrk2's answer to coordinated
//! omission); an echo due and never sent, or still out when its wait ran
//! out, counts with the time it had waited by then, a lower bound. A loop
//! whose connections have all ended hands its schedule back (see
//! [`settle`]), so that its share stays due until the run stops sending.
//!
//! With `--reconnect`, a connection the server ends (or that breaks) is let
//! go and opened again under the same number, by the rule of
//! [`reconnect`](crate::client::reconnect): its pauses are timers in the
//! heap, and its connects take the loop's connect slots (`--connect-rate`)
//! as first connects do, so that a restart does not bring a flood of SYNs.
//! A connection reconnecting is not free for `--rate`; a message the server
//! declined goes first on the new connection and keeps its due time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use super::connection::{Connecting, Connection, Echo, Pending, State, read_some, write_some};
use super::{Plan, wait_until};
use crate::client::echo::{
    ConnectionTally, ExchangeError, FIRST_ECHO_STOP_PATIENCE, MIN_CLOSING_WAIT, MIN_CONNECT_SHARE,
    patience, timed_out_after, whole_millis,
};
use crate::client::failure::{Failure, FailureKind};
use crate::client::interval::IntervalTally;
use crate::client::reconnect::{Idle, Reconnect, idle_state, with_tries};
use crate::client::rtt::RttStats;
use crate::client::{Event, Payload, payload};
use crate::deadline::deadline_after;
use crate::error::{interrupted, io_cause, is_peer_gone, would_block};
use crate::server::busy_poll::{BusyPoll, Waited};
use crate::socket::unread_len;

/// The token of the loop's waker; connection `i` of the loop uses `Token(i + 1)`.
const WAKE: Token = Token(0);

/// The token of the loop's [`Alarm`].
const ALARM: Token = Token(usize::MAX);

/// A timer closer than this is waited for with the [`Alarm`], to the
/// microsecond, rather than with the poll's timeout, which counts whole
/// milliseconds: an echo due in 0.3 ms would otherwise go up to 0.7 ms
/// late, and with `--rate` that lateness is part of its round trip.
const PRECISE_BELOW: Duration = Duration::from_millis(20);

/// How late the [`Alarm`] may wake the loop, so that echoes due close
/// together go out in one wake-up: each wake-up costs the loop several
/// microseconds of CPU (tens on a virtual machine), and at 50,000 echoes a
/// second one per echo cost three times the CPU of this slack.
const ALARM_SLACK: Duration = Duration::from_micros(100);

/// Connects one loop has in progress at once: more would only queue SYNs
/// that the server's backlog drops, and a dropped SYN costs a second.
const MAX_CONNECTING: usize = 1024;

/// Connects a loop starts before it looks at its events again: a loopback
/// connect completes within its own call, so a long burst would hold the
/// first connections' completion (and their connect times) behind the
/// rest.
const CONNECT_BURST: usize = 64;

/// The scratch buffer every echo and closing check is read into.
const SCRATCH: usize = 64 * 1024;

/// Message buffers kept for reuse once their echo is back.
const POOL: usize = 64;

/// Events taken from one poll.
const EVENTS: usize = 1024;

/// The longest a loop spins asking for events before it sleeps, as the
/// server's workers do by default (see [`crate::server::busy_poll`]): a
/// sleeping loop pays a wake-up on every round trip, which is most of a
/// loopback one. The window adapts, so a loop whose waits outlast it (a
/// slow server, a low `--rate`) does not spin.
const BUSY_POLL: Duration = Duration::from_micros(50);

/// Without the stop watcher thread, how often a loop looks at the stop handle.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// An echo sent more than this after it was due counts as late (`--rate`):
/// well over the poll's millisecond and a busy machine's scheduling delay.
pub(crate) const LATE_AFTER: Duration = Duration::from_millis(10);

/// A loop's share of the connections, and everything it needs to run them.
pub(in crate::client) struct EventLoop<'p, F> {
    plan: &'p Plan<'p, F>,
    index: usize,
    poll: Poll,
    waker: Arc<Waker>,
    connections: Vec<Connection>,
    /// (instant, connection index), earliest first; see [`Connection::armed`].
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// When the loop itself must look again: the next paced connect, the
    /// next due echo, the end of `--duration`.
    loop_wake: Option<Instant>,
    /// Connections not yet started are `next_unstarted..`.
    next_unstarted: usize,
    /// With `--connect-rate`, when the next connect may start.
    next_connect: Option<Instant>,
    /// `--reconnect`: connections whose pause is over, waiting for a
    /// connect slot.
    rejoining: VecDeque<usize>,
    /// While both reconnects and connections not yet started wait for a
    /// slot, they take turns: this says whose turn it is.
    reconnect_turn: bool,
    connecting: usize,
    /// Connections not yet done; the loop ends at zero.
    open: usize,
    tally: ConnectionTally,
    scratch: Vec<u8>,
    pool: Vec<Vec<u8>>,
    /// `--size` message buffers out now (in echoes), and the most there
    /// may be (see [`super::loop_buffers`]): with `--rate`, an echo due
    /// waits while the loop is at its most.
    buffers_out: u64,
    most_buffers: u64,
    /// Declined messages waiting to be sent again (`--reconnect`): each
    /// keeps its place under `most_buffers`, so that its resend never
    /// goes past it.
    declined_waiting: u64,
    /// With `--rate`: an echo due waited while a connection was free,
    /// because the loop was at its most buffers out.
    held_for_buffer: bool,
    stopped: bool,
    stop_watched: bool,
    /// `--duration`'s end, and whether the idle connections were closed then.
    ends: Option<Instant>,
    ended: bool,
    schedule: Option<Schedule>,
    /// When the loop stopped sending: stopped, `--duration` over, or the
    /// schedule through.
    sending_ended: Option<Instant>,
    busy_poll: BusyPoll,
    /// With `--report-every`: this loop's share of the interval counts.
    interval: Option<&'p Mutex<IntervalTally>>,
    /// Connections open now (connected, not yet done), for the intervals.
    connected: usize,
    /// Wakes the poll for a timer to the microsecond; `None` where a
    /// timerfd could not be made (timers then round up to milliseconds).
    alarm: Option<Alarm>,
}

/// A timerfd in the loop's poll: the poll's own timeout counts whole
/// milliseconds.
struct Alarm {
    fd: std::os::fd::OwnedFd,
    /// The instant it is set for, so that it is set once per instant.
    set_for: Option<Instant>,
}

impl Alarm {
    fn new(poll: &Poll) -> io::Result<Alarm> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: timerfd_create takes no pointers; a descriptor it returns
        // is ours alone, and OwnedFd closes it.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by timerfd_create and is owned by no one else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd.as_raw_fd()),
            ALARM,
            Interest::READABLE,
        )?;
        Ok(Alarm { fd, set_for: None })
    }

    /// Fires once, `after` from now (the instant is `at`). Setting it also
    /// clears an expiry not yet read, so it is never read.
    fn set(&mut self, at: Instant, after: Duration) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if self.set_for == Some(at) {
            return Ok(());
        }
        // A zero value would disarm it.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; the
        // old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.set_for = Some(at);
        Ok(())
    }
}

/// The loop's share of `--rate`: echo number *k* is due at
/// `start + k / per_second`. Echoes due and not yet sent are the numbers
/// `sent..issued`, so however far behind the loop falls, they cost nothing
/// to remember.
pub(in crate::client) struct Schedule {
    /// Echoes per second on this loop.
    per_second: f64,
    /// When the first echo is due: once the loop's first connection is open.
    start: Option<Instant>,
    /// Echoes made due so far, and sent so far (oldest first).
    issued: u64,
    sent: u64,
    /// The most to make due (`--repeat` × connections), if any.
    limit: Option<u64>,
    /// Connections free for the next echo, longest waiting first, with
    /// their tickets; some may have ended, or been let go and come free
    /// again, since (stale), and are skipped. Stale entries are swept out
    /// when they outnumber the connections, so the queue stays within
    /// twice the loop's connections however often they reconnect.
    free: VecDeque<(usize, u64)>,
    /// The next ticket for [`free`](Self::free).
    tickets: u64,
}

impl Schedule {
    /// The share of `--rate` of a loop with `connections` of the run's.
    fn for_loop<F>(plan: &Plan<'_, F>, connections: usize) -> Option<Schedule> {
        plan.config.rate.map(|rate| {
            let share = connections as f64 / plan.config.connections.get() as f64;
            Schedule {
                per_second: rate as f64 * share,
                start: None,
                issued: 0,
                sent: 0,
                limit: (plan.config.repeat != 0)
                    .then(|| plan.config.repeat.saturating_mul(connections as u64)),
                free: VecDeque::new(),
                tickets: 0,
            }
        })
    }

    /// Queues connection `index` as free, with a new ticket.
    fn push_free(&mut self, index: usize, connection: &mut Connection) {
        let ticket = self.tickets;
        self.tickets += 1;
        connection.free_ticket = Some(ticket);
        self.free.push_back((index, ticket));
    }

    fn due(&self, number: u64) -> Instant {
        let start = self
            .start
            .expect("echoes are due only once the schedule has started");
        let offset = Duration::from_secs_f64(number as f64 / self.per_second);
        deadline_after(start, offset)
    }

    /// Echoes due that found no free connection yet.
    fn late(&self) -> u64 {
        self.issued - self.sent
    }

    /// Every echo has been made due and sent.
    fn finished(&self) -> bool {
        self.limit.is_some_and(|limit| self.issued >= limit) && self.late() == 0
    }

    /// Takes the oldest echo due, if any is waiting.
    fn take_late(&mut self) -> Option<Instant> {
        (self.late() > 0).then(|| {
            let due = self.due(self.sent);
            self.sent += 1;
            due
        })
    }

    /// How many echoes have come due by `now`, within the limit (and never
    /// fewer than already made due).
    fn due_by(&self, now: Instant) -> u64 {
        let Some(start) = self.start else {
            return self.issued;
        };
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        // Echo k is due at k / per_second; `due` settles the rounding.
        let mut count = (elapsed * self.per_second) as u64 + 1;
        while count > 0 && self.due(count - 1) > now {
            count -= 1;
        }
        while self.due(count) <= now {
            count += 1;
        }
        let count = self.limit.map_or(count, |limit| count.min(limit));
        count.max(self.issued)
    }

    /// Makes due every echo whose time has come by `now`, all at once
    /// however many (a loop held up for a second at a million a second
    /// owes a million); returns how many.
    fn make_due(&mut self, now: Instant) -> u64 {
        let due = self.due_by(now);
        let added = due - self.issued;
        self.issued = due;
        added
    }

    /// Gives up the echoes due and not sent at `end`, each counted in
    /// `bounds` with the wait it had by then (a lower bound of its round
    /// trip, as wrk2 counts them); returns how many.
    fn drop_late(&mut self, end: Instant, bounds: &mut RttStats) -> u64 {
        let late = self.late();
        if late > 0 {
            // The newest waited least; each older one a step more.
            let lowest = end.saturating_duration_since(self.due(self.issued - 1));
            let step = Duration::from_secs_f64(1.0 / self.per_second);
            bounds.record_evenly(lowest, step, late);
        }
        self.sent = self.issued;
        late
    }
}

impl<'p, F> EventLoop<'p, F>
where
    F: Fn(&crate::client::Event<'_>) + Sync,
{
    /// Loop `index` of `plan.threads`, with connections `index + 1`,
    /// `index + 1 + threads`, and so on.
    pub fn new(plan: &'p Plan<'p, F>, index: usize) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        // Without it, timers round up to the poll's milliseconds.
        let alarm = Alarm::new(&poll).ok();
        let connections: Vec<Connection> = numbers(plan, index)
            .map(|number| Connection::new(number, plan.addrs[0], plan.config.reconnect))
            .collect();
        let schedule = Schedule::for_loop(plan, connections.len());
        let most_buffers = super::loop_buffers(plan.config, plan.threads, index);
        Ok(EventLoop {
            plan,
            index,
            poll,
            waker,
            open: connections.len(),
            connections,
            timers: BinaryHeap::new(),
            loop_wake: None,
            next_unstarted: 0,
            next_connect: None,
            rejoining: VecDeque::new(),
            reconnect_turn: true,
            connecting: 0,
            tally: ConnectionTally::default(),
            scratch: vec![0; SCRATCH],
            pool: Vec::new(),
            buffers_out: 0,
            most_buffers,
            declined_waiting: 0,
            held_for_buffer: false,
            stopped: false,
            stop_watched: true,
            ends: plan.ends(),
            ended: false,
            schedule,
            sending_ended: None,
            busy_poll: BusyPoll::new(BUSY_POLL),
            interval: plan.intervals.get(index),
            connected: 0,
            alarm,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Whether a watcher thread wakes this loop on stop; if not, the loop
    /// looks at the stop handle every [`STOP_CHECK`].
    pub fn set_stop_watched(&mut self, watched: bool) {
        self.stop_watched = watched;
    }

    /// Runs every connection of the loop to its end.
    pub fn run(mut self) -> LoopEnd {
        let mut events = Events::with_capacity(EVENTS);
        let mut ready = Vec::with_capacity(EVENTS);
        self.tick(Instant::now());
        while self.open > 0 {
            // Read again after handling the events: a thousand of them can
            // take a millisecond, which a due echo must not wait on top.
            let now = Instant::now();
            let next = [
                self.timers.peek().map(|Reverse((at, _))| *at),
                self.loop_wake,
            ]
            .into_iter()
            .flatten()
            .min();
            let mut timeout = next.map(|at| wait_until(now, at));
            if let (Some(at), Some(alarm)) = (next, &mut self.alarm) {
                let left = at.saturating_duration_since(now);
                if !left.is_zero()
                    && left < PRECISE_BELOW
                    && alarm.set(at, left + ALARM_SLACK).is_ok()
                {
                    // The alarm wakes the poll; the timeout is a backstop.
                    timeout = Some(wait_until(now, at) + Duration::from_millis(1));
                }
            }
            if !self.stop_watched {
                timeout = Some(timeout.map_or(STOP_CHECK, |wait| wait.min(STOP_CHECK)));
            }
            if let Err(error) = self.wait_for_events(&mut events, timeout) {
                if interrupted(&error) {
                    continue;
                }
                // The loop's epoll itself failed: its connections cannot go on.
                self.abandon(&error, Instant::now());
                break;
            }
            let now = Instant::now();
            ready.clear();
            ready.extend(
                events
                    .iter()
                    .filter(|event| event.token() != WAKE && event.token() != ALARM)
                    .map(|event| {
                        let gone =
                            event.is_error() || event.is_read_closed() || event.is_write_closed();
                        (
                            event.token().0 - 1,
                            event.is_readable() || gone,
                            event.is_writable() || gone,
                            gone,
                        )
                    }),
            );
            if !self.stopped && self.plan.stop.is_stopped() {
                self.on_stop(now);
            }
            for &(index, readable, writable, gone) in &ready {
                self.on_ready(index, readable, writable, gone, now);
            }
            self.fire_timers(now);
            self.tick(now);
        }
        let now = Instant::now();
        let sending = !(self.stopped || self.ended)
            && self
                .schedule
                .as_ref()
                .is_some_and(|schedule| !schedule.finished());
        LoopEnd {
            tally: self.tally,
            schedule: self.schedule,
            // Every connection ended while the run still sends: its share
            // stays due until then.
            orphaned: sending,
            sending_ended: self.sending_ended.unwrap_or(now),
        }
    }

    /// Fills `events`, spinning first for the busy-poll window and then
    /// sleeping until `timeout` at most.
    fn wait_for_events(
        &mut self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return self.poll.poll(events, timeout);
        }
        let began = Instant::now();
        let window = self.busy_poll.window();
        // A timer due within the window is served by the sleep below.
        if !window.is_zero() && timeout.is_none_or(|left| left > window) {
            loop {
                self.poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() {
                    self.busy_poll.after_catch(waited(events));
                    return Ok(());
                }
                if began.elapsed() >= window {
                    break;
                }
                // Whatever else is runnable here, such as the server that
                // will send the echo, goes first.
                std::thread::yield_now();
            }
        }
        let remaining = timeout.map(|left| left.saturating_sub(began.elapsed()));
        self.poll.poll(events, remaining)?;
        self.busy_poll.after_sleep(began.elapsed(), waited(events));
        Ok(())
    }

    /// Readiness for connection `index`.
    fn on_ready(&mut self, index: usize, readable: bool, writable: bool, gone: bool, now: Instant) {
        let connection = &mut self.connections[index];
        connection.readable |= readable;
        connection.writable |= writable;
        connection.hup |= gone;
        match connection.state {
            State::Connecting(_) => self.check_connect(index, now),
            State::Echoing(_) => self.progress(index, now),
            State::Closing { .. } => self.read_closing(index),
            // With --reconnect, an end of stream between echoes is seen now.
            State::Idle { next } => {
                let due = self.schedule.is_none() && next.is_some_and(|next| now >= next);
                self.check_idle(index, now, due);
            }
            // Between echoes nothing else is read: the next echo reads it.
            State::Unstarted | State::Rejoining { .. } | State::Done => {}
        }
    }

    /// Starts the connects that are due, sends the echoes that are due, and
    /// ends the sending at `--duration`; sets when to look again.
    fn tick(&mut self, now: Instant) {
        self.loop_wake = None;
        self.start_connects(now);
        if let Some(ends) = self.ends {
            if now >= ends {
                if !self.ended {
                    self.ended = true;
                    self.end_sending(now);
                }
            } else {
                self.wake_loop_at(ends);
            }
        }
        self.send_due(now);
    }

    fn wake_loop_at(&mut self, at: Instant) {
        self.loop_wake = Some(self.loop_wake.map_or(at, |wake| wake.min(at)));
    }

    /// Starts connects while fewer than [`MAX_CONNECTING`] are in progress
    /// and, with `--connect-rate`, their time has come. Reconnects and
    /// connections not yet started take turns while both wait, so that
    /// neither starves the other: a connection the server ends after each
    /// echo would otherwise take every slot.
    fn start_connects(&mut self, now: Instant) {
        let mut burst = 0;
        loop {
            // Ended (stopped, say) since it was queued.
            while let Some(&index) = self.rejoining.front()
                && !matches!(
                    self.connections[index].state,
                    State::Rejoining { until: None }
                )
            {
                self.rejoining.pop_front();
            }
            let unstarted = self.next_unstarted < self.connections.len();
            let waiting = !self.rejoining.is_empty() || unstarted;
            if !waiting || self.connecting >= MAX_CONNECTING || self.stopped || self.ended {
                return;
            }
            if burst == CONNECT_BURST {
                // Look at the connects so far before starting more.
                self.wake_loop_at(now);
                return;
            }
            if let Some(rate) = self.plan.config.connect_rate {
                // Loop i's connects are numbers i+1, i+1+T, …: its share of
                // the rate, T/rate apart, the first i/rate into the run.
                let at = *self.next_connect.get_or_insert_with(|| {
                    let first = self.index as f64 / rate as f64;
                    deadline_after(self.plan.started, Duration::from_secs_f64(first))
                });
                if at > now {
                    self.wake_loop_at(at);
                    return;
                }
                let spacing = Duration::from_secs_f64(self.plan.threads as f64 / rate as f64);
                // Held up for more than a slot (stopped, descheduled): the
                // missed slots move on rather than go in a burst.
                let from = if now.saturating_duration_since(at) > spacing {
                    now
                } else {
                    at
                };
                self.next_connect = Some(deadline_after(from, spacing));
            }
            burst += 1;
            // Its own clock: a loopback connect takes tens of microseconds,
            // and a burst of them would otherwise count from its start.
            let reconnect = !self.rejoining.is_empty() && (!unstarted || self.reconnect_turn);
            if !self.rejoining.is_empty() && unstarted {
                self.reconnect_turn = !self.reconnect_turn;
            }
            if reconnect && let Some(index) = self.rejoining.pop_front() {
                self.start_reconnect(index, Instant::now());
            } else {
                let index = self.next_unstarted;
                self.next_unstarted += 1;
                self.start_connect(index, Instant::now(), self.plan.config.timeout);
            }
        }
    }

    /// A reconnect's connect: the whole timeout, or after a failed try
    /// what is left of the timeout since the first.
    fn start_reconnect(&mut self, index: usize, now: Instant) {
        let timeout = self.plan.config.timeout;
        let first_failure = self.connections[index]
            .rejoin
            .as_ref()
            .and_then(|rejoin| rejoin.first_failure);
        let budget = match first_failure {
            None => timeout,
            // A pause that ended at the deadline leaves one short try.
            Some(first) => deadline_after(first, timeout)
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        };
        self.start_connect(index, now, budget);
    }

    /// Connects connection `index` within `budget`.
    fn start_connect(&mut self, index: usize, now: Instant, budget: Duration) {
        self.connections[index].state = State::Connecting(Connecting {
            began: now,
            budget,
            deadline: deadline_after(now, budget),
            at: 0,
            attempt_deadline: now,
            attempt_began: now,
            share: Duration::ZERO,
            attempts: Vec::new(),
            stop_seen: None,
        });
        self.connecting += 1;
        self.try_address(index, now);
    }

    /// Tries the connect's current address, and the next ones while they
    /// fail at once. As the blocking engine (and Go's dialer) does, each
    /// gets an equal share of the time left, but at least
    /// [`MIN_CONNECT_SHARE`]; the first gets the whole timeout's share.
    fn try_address(&mut self, index: usize, now: Instant) {
        let addrs = self.plan.addrs;
        loop {
            let connection = &mut self.connections[index];
            let State::Connecting(connecting) = &mut connection.state else {
                return;
            };
            let at = connecting.at;
            if at >= addrs.len() {
                break;
            }
            let left = if at == 0 {
                connecting.budget
            } else {
                connecting.deadline.saturating_duration_since(now)
            };
            if left.is_zero() && !connecting.attempts.is_empty() {
                // Out of time; the addresses not tried are not named.
                break;
            }
            let untried = u32::try_from(addrs.len() - at).unwrap_or(u32::MAX);
            let share = (left / untried).max(MIN_CONNECT_SHARE.min(left));
            let addr = addrs[at];
            let opened = TcpStream::connect(addr).and_then(|mut stream| {
                self.poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(index + 1),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map(|()| stream)
            });
            match opened {
                Ok(stream) => {
                    connection.stream = Some(stream);
                    connection.peer = addr;
                    connection.readable = false;
                    connection.writable = false;
                    connection.hup = false;
                    connecting.attempt_began = now;
                    connecting.attempt_deadline = deadline_after(now, share);
                    connecting.share = share;
                    let deadline = connecting.attempt_deadline;
                    self.arm(index, deadline);
                    return;
                }
                Err(error) => {
                    connecting.attempts.push((addr, error));
                    connecting.at += 1;
                }
            }
        }
        self.connect_failed(index, now);
    }

    /// The current attempt failed with `error`: on to the next address.
    fn attempt_failed(&mut self, index: usize, error: io::Error, now: Instant) {
        let connection = &mut self.connections[index];
        // Closing the socket takes it out of the poll.
        connection.stream = None;
        if let State::Connecting(connecting) = &mut connection.state {
            connecting.attempts.push((connection.peer, error));
            connecting.at += 1;
        }
        self.try_address(index, now);
    }

    /// A readiness event on a connect in progress: connected, failed, or
    /// not yet.
    fn check_connect(&mut self, index: usize, now: Instant) {
        let connection = &mut self.connections[index];
        let Some(stream) = &connection.stream else {
            return;
        };
        let gone = connection.hup;
        let outcome = match stream.take_error() {
            Ok(Some(error)) | Err(error) => Err(error),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(()),
                // Still connecting (a spurious event), unless it hung up.
                Err(error) if error.kind() == io::ErrorKind::NotConnected && !gone => return,
                // As std's connect_timeout: a hang-up that left no error behind.
                Err(error) if error.kind() == io::ErrorKind::NotConnected => Err(io::Error::other(
                    "the connection was closed while connecting",
                )),
                Err(error) => Err(error),
            },
        };
        // Echoes are small and latency-bound; without this, Nagle would
        // hold back a message's tail.
        let outcome = outcome.and_then(|()| stream.set_nodelay(true));
        if let Err(error) = outcome {
            self.attempt_failed(index, error, now);
            return;
        }
        let State::Connecting(connecting) = &connection.state else {
            return;
        };
        // The connections' first connects: a reconnect counts in `reconnects`.
        if connection
            .rejoin
            .as_ref()
            .is_none_or(|rejoin| !rejoin.opened)
        {
            self.tally
                .connect
                .record(now.saturating_duration_since(connecting.began));
        }
        self.connecting -= 1;
        connection.state = State::Idle { next: None };
        self.connected += 1;
        let (number, peer) = (connection.number, connection.peer);
        self.count_interval(|interval, connected| interval.open = connected);
        self.tally.echoing_ended = Some(now);
        let rejoined = match &mut self.connections[index].rejoin {
            Some(rejoin) if rejoin.opened => {
                rejoin.first_failure = None;
                rejoin.tries = 0;
                Some((rejoin.why, rejoin.pending.take()))
            }
            Some(rejoin) => {
                rejoin.opened = true;
                None
            }
            None => None,
        };
        let Some((why, pending)) = rejoined else {
            (self.plan.observer)(&Event::Connected {
                connection: number,
                peer,
            });
            self.next_echo(index, now, false);
            return;
        };
        self.tally.reconnects += 1;
        (self.plan.observer)(&Event::Reconnected {
            connection: number,
            peer,
            why,
        });
        match pending {
            // With --rate it keeps its due time, so its round trip counts
            // the reconnect; closed-loop, the round trip is the resend's.
            Some(pending) => {
                let due = if self.schedule.is_some() {
                    pending.due
                } else {
                    now
                };
                self.start_message(index, pending.seq, due, now, true);
            }
            None => {
                // With --interval, the next message keeps its time: the
                // reconnect waits for it, or it goes at once if it is due.
                let next = self.connections[index]
                    .rejoin
                    .as_mut()
                    .and_then(|rejoin| rejoin.next.take());
                match next {
                    Some(next) if next > now => {
                        self.connections[index].state = State::Idle { next: Some(next) };
                        self.arm(index, next);
                    }
                    Some(_) => self.next_echo(index, now, true),
                    None => self.next_echo(index, now, false),
                }
            }
        }
    }

    /// Every address failed: the connection fails, counted by the cause of
    /// its last attempt.
    fn connect_failed(&mut self, index: usize, now: Instant) {
        let connection = &mut self.connections[index];
        connection.stream = None;
        let State::Connecting(connecting) = std::mem::replace(&mut connection.state, State::Done)
        else {
            return;
        };
        self.connecting -= 1;
        if connection
            .rejoin
            .as_ref()
            .is_some_and(|rejoin| rejoin.opened)
        {
            connection.state = State::Rejoining { until: None };
            self.reconnect_failed(index, connecting, now);
            return;
        }
        self.open -= 1;
        if let Some((_, error)) = connecting.attempts.last() {
            *self
                .tally
                .connect_failures
                .entry(io_cause(error))
                .or_insert(0) += 1;
        }
        self.tally.echoing_ended = Some(now);
        self.fail(
            index,
            FailureKind::Connect {
                attempts: connecting.attempts,
            },
        );
    }

    /// What an open connection with no echo out does next: its next echo
    /// now, or after `--interval`, or when the rate schedule has one for
    /// it; or, with no more to send, the closing check. `paused` says the
    /// `--interval` pause before it is over.
    fn next_echo(&mut self, index: usize, now: Instant, paused: bool) {
        // Closed-loop, a message is due now unless `--interval` pauses
        // first; with `--rate` none is this connection's until it is free.
        let due = self.schedule.is_none()
            && (self.connections[index].seq == 0 || self.plan.config.interval.is_zero() || paused);
        if self.check_idle(index, now, due) {
            return;
        }
        if self.sending_over(now) {
            self.begin_closing(index, now);
            return;
        }
        let room = self.has_buffer_room();
        let connection = &mut self.connections[index];
        if let Some(schedule) = &mut self.schedule {
            // Connections already free (at the loop's most buffers out)
            // go first; `send_due` hands them the echoes due, oldest first,
            // as buffers come back.
            let late = if room && schedule.free.is_empty() {
                schedule.take_late()
            } else {
                None
            };
            match late {
                Some(due) => {
                    if now.saturating_duration_since(due) > LATE_AFTER {
                        // It waited for this connection to come free.
                        self.tally.late_for_connection += 1;
                    }
                    self.start_echo(index, due, now);
                }
                None => {
                    connection.state = State::Idle { next: None };
                    schedule.push_free(index, connection);
                    if schedule.free.len() > 2 * self.connections.len() {
                        let connections = &self.connections;
                        schedule
                            .free
                            .retain(|&(index, ticket)| is_free(&connections[index], ticket));
                    }
                }
            }
            return;
        }
        let repeat = self.plan.config.repeat;
        if repeat != 0 && connection.seq >= repeat {
            self.begin_closing(index, now);
            return;
        }
        let interval = self.plan.config.interval;
        if connection.seq == 0 || interval.is_zero() || paused {
            self.start_echo(index, now, now);
        } else {
            let next = deadline_after(now, interval);
            connection.state = State::Idle { next: Some(next) };
            self.arm(index, next);
        }
    }

    /// No new echo goes out: stopped, past `--duration`, or the rate's
    /// schedule is through.
    fn sending_over(&self, now: Instant) -> bool {
        // The stop handle itself, not only `stopped`: an observer may have
        // stopped the run since the last poll.
        self.stopped
            || self.plan.stop.is_stopped()
            || self.ends.is_some_and(|ends| now >= ends)
            || self.schedule.as_ref().is_some_and(Schedule::finished)
    }

    /// Sends the next message on connection `index`, due at `due`.
    fn start_echo(&mut self, index: usize, due: Instant, now: Instant) {
        let seq = self.connections[index].seq + 1;
        self.start_message(index, seq, due, now, false);
    }

    /// Sends message `seq` on connection `index`, due at `due`; `again`
    /// for one the server declined (`--reconnect`), which counts as resent
    /// rather than sent, and whose lateness was counted when it first went.
    fn start_message(&mut self, index: usize, seq: u64, due: Instant, now: Instant, again: bool) {
        if again {
            // Its place under the cap becomes the buffer it takes now.
            self.declined_waiting -= 1;
        }
        let plan = self.plan;
        let len = plan.config.payload.len();
        let connection = &mut self.connections[index];
        let buf = match &plan.config.payload {
            Payload::Text(_) => None,
            Payload::Generated { .. } => {
                let mut buf = self.pool.pop().unwrap_or_default();
                let more = len.saturating_sub(buf.len());
                if buf.try_reserve_exact(more).is_err() {
                    if self.schedule.is_some() {
                        // Due and taken, but it never went.
                        self.tally.unsent += 1;
                    }
                    if again {
                        // Never taken, and now never sent again.
                        self.tally.sent -= 1;
                    }
                    self.tally.echoing_ended = Some(now);
                    self.fail(index, FailureKind::OutOfMemory { bytes: len });
                    self.finish(index);
                    return;
                }
                buf.resize(len, 0);
                payload::fill(&mut buf, plan.seed, connection.number, seq);
                self.buffers_out += 1;
                // The bound the memory check counted on (a resend takes
                // the place its declined message kept).
                debug_assert!(
                    self.buffers_out + self.declined_waiting <= self.most_buffers,
                    "{} buffers out and {} declined, over the loop's {}",
                    self.buffers_out,
                    self.declined_waiting,
                    self.most_buffers
                );
                Some(buf)
            }
        };
        connection.seq = connection.seq.max(seq);
        if again {
            self.tally.resent += 1;
        } else {
            self.tally.sent += 1;
        }
        if self.schedule.is_some() && !again {
            let lateness = now.saturating_duration_since(due);
            if lateness > LATE_AFTER {
                self.tally.late += 1;
            }
            self.tally.most_late = self.tally.most_late.max(lateness);
        }
        connection.state = State::Echoing(Echo {
            seq,
            buf,
            len,
            written: 0,
            received: 0,
            difference: None,
            extra: false,
            sent_at: now,
            due,
            deadline: deadline_after(now, plan.config.timeout),
            stop_seen: None,
        });
        // The socket is writable unless a write said otherwise: try at once.
        connection.writable = true;
        self.progress(index, now);
    }

    /// Moves the echo out on connection `index` as far as the socket lets it.
    fn progress(&mut self, index: usize, now: Instant) {
        let text: &[u8] = match &self.plan.config.payload {
            Payload::Text(text) => text,
            Payload::Generated { .. } => &[],
        };
        loop {
            let connection = &mut self.connections[index];
            let State::Echoing(echo) = &mut connection.state else {
                return;
            };
            let stream = connection
                .stream
                .as_ref()
                .expect("an echoing connection has its socket");
            let message = echo.buf.take();
            let bytes = message.as_deref().unwrap_or(text);
            let moved =
                write_some(stream, bytes, echo, &mut connection.writable).and_then(|wrote| {
                    read_some(
                        stream,
                        bytes,
                        echo,
                        &mut connection.readable,
                        connection.hup,
                        &mut self.scratch,
                    )
                    .map(|read| wrote || read)
                });
            echo.buf = message;
            match moved {
                Err(error) => {
                    self.exchange_failed(index, error, now);
                    return;
                }
                Ok(_) if echo.written == echo.len && echo.received == echo.len => {
                    self.finish_echo(index, now);
                    return;
                }
                Ok(true) => {}
                Ok(false) => {
                    let deadline = echo.deadline;
                    self.arm(index, deadline);
                    return;
                }
            }
        }
    }

    /// The whole echo is back on connection `index`: check it, count it,
    /// and go on.
    fn finish_echo(&mut self, index: usize, now: Instant) {
        let plan = self.plan;
        let connection = &mut self.connections[index];
        let State::Echoing(echo) =
            std::mem::replace(&mut connection.state, State::Idle { next: None })
        else {
            return;
        };
        self.tally.bytes_sent += echo.written as u64;
        let peer = connection.peer;
        let number = connection.number;
        if now.saturating_duration_since(echo.sent_at) > plan.config.timeout {
            // The poll may wake a little after the deadline; the round
            // trip's own clock decides.
            if self.schedule.is_some() {
                self.tally
                    .lower_bounds
                    .record(now.saturating_duration_since(echo.due));
            }
            self.recycle(echo.buf);
            self.echo_failed(
                index,
                ExchangeError::TimedOut { received: echo.len },
                &EchoFacts {
                    seq: echo.seq,
                    len: echo.len,
                    written: echo.written,
                },
                now,
            );
            return;
        }
        self.tally.bytes_echoed += echo.len as u64;
        let rtt = now.saturating_duration_since(echo.due);
        let exact = echo.difference.is_none();
        self.count_interval(|interval, _| {
            interval.echoes += 1;
            interval.bytes_echoed += echo.len as u64;
            if exact {
                interval.rtt.record(rtt);
            }
        });
        match echo.difference {
            None => {
                self.tally.echoed += 1;
                self.tally.rtt.record(rtt);
                let message: &[u8] = match (&echo.buf, &plan.config.payload) {
                    (Some(buf), _) => buf,
                    (None, Payload::Text(text)) => text,
                    (None, Payload::Generated { .. }) => &[],
                };
                (plan.observer)(&Event::Echoed {
                    connection: number,
                    seq: echo.seq,
                    rtt,
                    message,
                });
            }
            Some((offset, sent, got)) => self.fail(
                index,
                FailureKind::Mismatch {
                    seq: echo.seq,
                    peer,
                    len: echo.len,
                    offset,
                    sent,
                    got,
                },
            ),
        }
        self.recycle(echo.buf);
        self.tally.echoing_ended = Some(now);
        if let Some(rejoin) = &mut self.connections[index].rejoin {
            // Taken, and back whole: the stream is in step unless more came.
            rejoin.waiting = None;
            rejoin.productive |= !echo.extra;
        }
        if echo.extra {
            // Only this echo was due, so a byte that came with it was
            // never sent: the server added it.
            let stream = self.connections[index].stream.as_ref();
            let bytes = 1 + stream.and_then(unread_len).unwrap_or(0);
            self.fail(
                index,
                FailureKind::Extra {
                    after_seq: echo.seq,
                    peer,
                    bytes,
                },
            );
            self.end_or_reconnect(index, now);
            return;
        }
        self.next_echo(index, now, false);
    }

    /// The echo out on connection `index` failed with `error`.
    fn exchange_failed(&mut self, index: usize, error: ExchangeError, now: Instant) {
        let connection = &mut self.connections[index];
        // Idle until `finish` below closes it and counts it done.
        let State::Echoing(echo) =
            std::mem::replace(&mut connection.state, State::Idle { next: None })
        else {
            return;
        };
        self.recycle(echo.buf);
        if let (Some(rejoin), ExchangeError::Closed { received: 0 }) =
            (&mut self.connections[index].rejoin, &error)
        {
            // The drain guarantee: an end of stream before any byte of the
            // echo means the server never took the message. It goes again.
            rejoin.pending = Some(Pending {
                seq: echo.seq,
                due: echo.due,
            });
            self.declined_waiting += 1;
            rejoin.waited(now);
            self.tally.bytes_sent += echo.written as u64;
            self.let_go(index, Reconnect::Declined { seq: echo.seq }, now);
            return;
        }
        let facts = EchoFacts {
            seq: echo.seq,
            len: echo.len,
            written: echo.written,
        };
        if self.schedule.is_some()
            && matches!(
                error,
                ExchangeError::TimedOut { .. } | ExchangeError::Stopped { .. }
            )
        {
            // Still out when its wait ran out: what it waited is a lower
            // bound of its round trip.
            self.tally
                .lower_bounds
                .record(now.saturating_duration_since(echo.due));
        }
        self.tally.bytes_sent += echo.written as u64;
        self.echo_failed(index, error, &facts, now);
    }

    /// Counts and reports a failed echo; the connection is out of step, so
    /// it ends (with `--reconnect`, unless stopped, another is opened).
    fn echo_failed(&mut self, index: usize, error: ExchangeError, facts: &EchoFacts, now: Instant) {
        let peer = self.connections[index].peer;
        let stopped = matches!(error, ExchangeError::Stopped { .. });
        let kind = error.into_failure(
            facts.seq,
            peer,
            self.plan.config.timeout,
            facts.len,
            facts.written,
        );
        self.tally.echoing_ended = Some(now);
        self.fail(index, kind);
        if stopped {
            self.finish(index);
        } else {
            self.end_or_reconnect(index, now);
        }
    }

    /// After a failure that leaves the connection out of step: it ends, or
    /// with `--reconnect` the message is spent and another is opened.
    fn end_or_reconnect(&mut self, index: usize, now: Instant) {
        match &mut self.connections[index].rejoin {
            Some(rejoin) => {
                rejoin.waiting = None;
                self.let_go(index, Reconnect::Failed, now);
            }
            None => self.finish(index),
        }
    }

    /// With `--reconnect`, between echoes, when something may have come
    /// (a readiness event not yet used up): lets the connection go if the
    /// server ended it, broke it or sent bytes on it, reporting the last
    /// two. True if it was let go. Costs nothing when nothing came.
    /// `due` says the connection's next message is due now: only then
    /// does an end count as one more connection that did not take it.
    fn check_idle(&mut self, index: usize, now: Instant, due: bool) -> bool {
        let connection = &mut self.connections[index];
        if connection.rejoin.is_none() || !(connection.readable || connection.hup) {
            return false;
        }
        let Some(stream) = &connection.stream else {
            return false;
        };
        let (after_seq, peer) = (connection.seq, connection.peer);
        let (why, kind) = match idle_state(stream) {
            Idle::Open => {
                // Drained: the next bytes bring an event.
                connection.readable = false;
                return false;
            }
            Idle::Closed => (Reconnect::Closed, None),
            Idle::Extra(bytes) => (
                Reconnect::Failed,
                Some(FailureKind::Extra {
                    after_seq,
                    peer,
                    bytes,
                }),
            ),
            Idle::Broken(error) => (
                Reconnect::Failed,
                Some(FailureKind::Dropped {
                    after_seq,
                    peer,
                    error,
                }),
            ),
        };
        if let Some(rejoin) = &mut connection.rejoin
            && due
        {
            rejoin.waited(now);
        }
        if let Some(kind) = kind {
            self.tally.echoing_ended = Some(now);
            self.fail(index, kind);
        }
        self.let_go(index, why, now);
        true
    }

    /// With `--reconnect`: lets connection `index`'s socket go and opens
    /// another, at once after a connection that echoed, after the next
    /// pause otherwise. A message that one connection after another ended
    /// before taking, for a whole timeout, fails as never taken first; and
    /// with nothing left to send, or the run stopped, the connection ends.
    fn let_go(&mut self, index: usize, why: Reconnect, now: Instant) {
        let timeout = self.plan.config.timeout;
        let connection = &mut self.connections[index];
        connection.stream = None;
        let was_open = matches!(
            connection.state,
            State::Idle { .. } | State::Echoing(_) | State::Closing { .. }
        );
        let next = match connection.state {
            State::Idle { next } => next,
            _ => None,
        };
        if let State::Echoing(echo) =
            std::mem::replace(&mut connection.state, State::Rejoining { until: None })
        {
            self.pool_return(echo.buf);
        }
        if was_open {
            self.connected -= 1;
            self.count_interval(|interval, connected| interval.open = connected);
        }
        let connection = &mut self.connections[index];
        let rejoin = connection
            .rejoin
            .as_mut()
            .expect("only --reconnect lets a connection go");
        rejoin.why = why;
        rejoin.next = next;
        if let Some((since, connections)) = rejoin.waiting
            && now.saturating_duration_since(since) >= timeout
        {
            // Every connection ended before taking it, for a whole
            // timeout: it fails, and the next one goes on.
            rejoin.waiting = None;
            let repeat = self.plan.config.repeat;
            let seq = match rejoin.pending.take() {
                Some(pending) => {
                    self.declined_waiting -= 1;
                    if self.schedule.is_some() {
                        self.tally
                            .lower_bounds
                            .record(now.saturating_duration_since(pending.due));
                    }
                    Some(pending.seq)
                }
                // Closed loop: the connection's next message was the one
                // waiting (with --rate none is taken until one is free).
                None if self.schedule.is_none() && (repeat == 0 || connection.seq < repeat) => {
                    connection.seq += 1;
                    self.tally.sent += 1;
                    Some(connection.seq)
                }
                None => None,
            };
            if let Some(seq) = seq {
                // Reported: the reconnect is after a failure.
                rejoin.why = Reconnect::Failed;
                let peer = connection.peer;
                self.tally.echoing_ended = Some(now);
                self.fail(
                    index,
                    FailureKind::NeverTaken {
                        seq,
                        peer,
                        connections,
                        after: timeout,
                    },
                );
            }
        }
        if !self.has_more(index) || self.stopped || self.ended || self.plan.stop.is_stopped() {
            self.give_up(index, now);
            return;
        }
        let connection = &mut self.connections[index];
        let rejoin = connection
            .rejoin
            .as_mut()
            .expect("only --reconnect lets a connection go");
        if std::mem::take(&mut rejoin.productive) {
            rejoin.backoff.reset();
            self.rejoining.push_back(index);
            self.wake_loop_at(now);
        } else {
            let until = deadline_after(now, rejoin.backoff.next());
            connection.state = State::Rejoining { until: Some(until) };
            self.arm(index, until);
        }
    }

    /// With `--reconnect`: whether connection `index` has something left to
    /// send: a declined message, or more of the rate's schedule (closed
    /// loop, of its `--repeat`).
    fn has_more(&self, index: usize) -> bool {
        let connection = &self.connections[index];
        let repeat = self.plan.config.repeat;
        connection
            .rejoin
            .as_ref()
            .is_some_and(|rejoin| rejoin.pending.is_some())
            || match &self.schedule {
                Some(schedule) => !schedule.finished(),
                None => repeat == 0 || connection.seq < repeat,
            }
    }

    /// Every address refused or timed out a reconnect's connect: it is
    /// tried again after the next pause, until the timeout has passed
    /// since the first failed try began; then it fails as a connect does.
    fn reconnect_failed(&mut self, index: usize, connecting: Connecting, now: Instant) {
        if self.stopped || self.ended || self.plan.stop.is_stopped() || !self.has_more(index) {
            // The run is over, or this connection's part of it: a connect
            // it cut short, or that nothing would go on, is no failure.
            self.give_up(index, now);
            return;
        }
        let timeout = self.plan.config.timeout;
        let connection = &mut self.connections[index];
        let rejoin = connection
            .rejoin
            .as_mut()
            .expect("only --reconnect reconnects");
        rejoin.tries += 1;
        let first = *rejoin.first_failure.get_or_insert(connecting.began);
        let deadline = deadline_after(first, timeout);
        if now < deadline {
            let until = deadline_after(now, rejoin.backoff.next()).min(deadline);
            connection.state = State::Rejoining { until: Some(until) };
            self.arm(index, until);
            return;
        }
        let tries = rejoin.tries;
        if let Some((_, error)) = connecting.attempts.last() {
            *self
                .tally
                .connect_failures
                .entry(io_cause(error))
                .or_insert(0) += 1;
        }
        let kind = with_tries(
            FailureKind::Connect {
                attempts: connecting.attempts,
            },
            tries,
            now.saturating_duration_since(first),
        );
        self.give_up(index, now);
        self.tally.echoing_ended = Some(now);
        self.fail(index, kind);
    }

    /// With `--reconnect`, a connection that will not connect again ends.
    /// A message waiting for it was never taken: it no longer counts as
    /// sent (with `--rate`, it was due and never sent).
    fn give_up(&mut self, index: usize, now: Instant) {
        let pending = self.connections[index]
            .rejoin
            .as_mut()
            .and_then(|rejoin| rejoin.pending.take());
        if let Some(pending) = pending {
            self.declined_waiting -= 1;
            self.tally.sent -= 1;
            if self.schedule.is_some() {
                self.tally.unsent += 1;
                self.tally
                    .lower_bounds
                    .record(now.saturating_duration_since(pending.due));
            }
        }
        let connection = &mut self.connections[index];
        if connection.reconnecting() {
            self.connecting -= 1;
        }
        connection.stream = None;
        connection.state = State::Rejoining { until: None };
        self.finish(index);
    }

    /// After the last echo: half-close, then count what the server still
    /// sends until it closes, for twice the p99 round trip (at least
    /// [`MIN_CLOSING_WAIT`], at most the timeout; the minimum once stopped).
    fn begin_closing(&mut self, index: usize, now: Instant) {
        let timeout = self.plan.config.timeout;
        let wait = if self.stopped || self.plan.stop.is_stopped() {
            MIN_CLOSING_WAIT.min(timeout)
        } else {
            patience(&self.tally.rtt, MIN_CLOSING_WAIT, timeout)
        };
        let connection = &mut self.connections[index];
        let Some(stream) = &connection.stream else {
            self.finish(index);
            return;
        };
        match stream.shutdown(Shutdown::Write) {
            // Reset already; what it sent before the reset is still queued.
            Err(error) if is_peer_gone(&error) => {}
            Err(error) => {
                let peer = connection.peer;
                self.fail(index, FailureKind::Closing { peer, error });
                self.finish(index);
                return;
            }
            Ok(()) => {}
        }
        let deadline = deadline_after(now, wait);
        connection.state = State::Closing { deadline, extra: 0 };
        self.arm(index, deadline);
        self.read_closing(index);
    }

    /// Reads what the server sends after the last echo, until it closes.
    fn read_closing(&mut self, index: usize) {
        let connection = &mut self.connections[index];
        let State::Closing { extra, .. } = &mut connection.state else {
            return;
        };
        let Some(mut stream) = connection.stream.as_ref() else {
            return;
        };
        while connection.readable {
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.end_closing(index);
                    return;
                }
                Ok(read) => *extra += read,
                // A signal arrived: retry.
                Err(error) if interrupted(&error) => {}
                // Nothing more yet: wait until it is readable.
                Err(error) if would_block(&error) => connection.readable = false,
                // Gone after the last echo: a normal end.
                Err(error) if is_peer_gone(&error) => {
                    self.end_closing(index);
                    return;
                }
                Err(error) => {
                    let peer = connection.peer;
                    self.fail(index, FailureKind::Closing { peer, error });
                    self.finish(index);
                    return;
                }
            }
        }
    }

    /// The server closed, or the closing wait ran out: bytes it sent after
    /// the last echo fail the connection.
    fn end_closing(&mut self, index: usize) {
        let connection = &mut self.connections[index];
        if let State::Closing { extra, .. } = connection.state
            && extra > 0
        {
            let kind = FailureKind::Extra {
                after_seq: connection.seq,
                peer: connection.peer,
                bytes: extra,
            };
            self.fail(index, kind);
        }
        self.finish(index);
    }

    /// Connection `index` is over: closed and out of the open count.
    fn finish(&mut self, index: usize) {
        let connection = &mut self.connections[index];
        if matches!(connection.state, State::Done) && connection.stream.is_none() {
            return;
        }
        let was_open = matches!(
            connection.state,
            State::Idle { .. } | State::Echoing(_) | State::Closing { .. }
        );
        if let State::Echoing(echo) = std::mem::replace(&mut connection.state, State::Done) {
            self.pool_return(echo.buf);
        }
        let connection = &mut self.connections[index];
        connection.stream = None;
        self.open -= 1;
        if was_open {
            self.connected -= 1;
            self.count_interval(|interval, connected| interval.open = connected);
        }
    }

    fn recycle(&mut self, buf: Option<Vec<u8>>) {
        self.pool_return(buf);
    }

    /// Every buffer an echo took comes back here, whether or not it is kept.
    fn pool_return(&mut self, buf: Option<Vec<u8>>) {
        if let Some(buf) = buf {
            self.buffers_out -= 1;
            if self.pool.len() < POOL {
                self.pool.push(buf);
            }
        }
    }

    /// True if one more `--size` echo may go out (a `--message` echo takes
    /// no buffer of its own).
    fn has_buffer_room(&self) -> bool {
        matches!(self.plan.config.payload, Payload::Text(_))
            || self.buffers_out + self.declined_waiting < self.most_buffers
    }

    /// Adds to this loop's interval counts, with `--report-every`.
    fn count_interval(&self, count: impl FnOnce(&mut IntervalTally, usize)) {
        if let Some(interval) = self.interval {
            // A reporter that panicked holding the lock left whole counts.
            let mut interval = interval.lock().unwrap_or_else(PoisonError::into_inner);
            count(&mut interval, self.connected);
        }
    }

    /// Counts `kind` and reports it.
    fn fail(&mut self, index: usize, kind: FailureKind) {
        self.tally.count(&kind);
        self.count_interval(|interval, _| interval.errors += 1);
        let failure = Failure {
            connection: self
                .plan
                .multiple()
                .then_some(self.connections[index].number),
            kind,
        };
        (self.plan.observer)(&crate::client::Event::Failed(&failure));
    }

    /// Sets a timer for connection `index` at `at`, unless an earlier one
    /// is set (it will look again then).
    fn arm(&mut self, index: usize, at: Instant) {
        let connection = &mut self.connections[index];
        if connection.armed.is_none_or(|armed| at < armed) {
            connection.armed = Some(at);
            self.timers.push(Reverse((at, index)));
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, index))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.connections[index].armed == Some(at) {
                self.connections[index].armed = None;
                self.look_again(index, now);
            }
        }
    }

    /// A timer of connection `index` fired: act on whatever is due, and set
    /// the next one.
    fn look_again(&mut self, index: usize, now: Instant) {
        let stopped = self.stopped;
        let timeout = self.plan.config.timeout;
        let patience_now = patience(&self.tally.rtt, FIRST_ECHO_STOP_PATIENCE, timeout);
        let connection = &mut self.connections[index];
        match &mut connection.state {
            State::Connecting(connecting) => {
                if stopped {
                    let since = *connecting.stop_seen.get_or_insert(now);
                    if now.saturating_duration_since(since) >= FIRST_ECHO_STOP_PATIENCE {
                        let waited = now.saturating_duration_since(connecting.attempt_began);
                        let waited = humantime::format_duration(whole_millis(waited));
                        let error = io::Error::other(format!(
                            "no answer after {waited}, and the run was stopped"
                        ));
                        connecting.attempts.push((connection.peer, error));
                        connection.stream = None;
                        self.connect_failed(index, now);
                        return;
                    }
                }
                if now >= connecting.attempt_deadline {
                    let error = timed_out_after(whole_millis(connecting.share));
                    self.attempt_failed(index, error, now);
                    return;
                }
                let mut next = connecting.attempt_deadline;
                if let Some(since) = connecting.stop_seen {
                    next = next.min(deadline_after(since, FIRST_ECHO_STOP_PATIENCE));
                }
                self.arm(index, next);
            }
            State::Echoing(echo) => {
                if now >= echo.deadline {
                    let received = echo.received;
                    self.exchange_failed(index, ExchangeError::TimedOut { received }, now);
                    return;
                }
                let mut next = echo.deadline;
                if stopped {
                    // Counted from the stop, or from the last bytes of the
                    // echo since: an echo still coming back is not cut off.
                    let since = match echo.stop_seen {
                        Some((at, before)) if before == echo.received => at,
                        _ => {
                            echo.stop_seen = Some((now, echo.received));
                            now
                        }
                    };
                    if now.saturating_duration_since(since) >= patience_now {
                        let received = echo.received;
                        self.exchange_failed(index, ExchangeError::Stopped { received }, now);
                        return;
                    }
                    next = next.min(deadline_after(since, patience_now));
                }
                self.arm(index, next);
            }
            State::Idle { next: Some(next) } => {
                if now >= *next {
                    self.next_echo(index, now, true);
                } else {
                    let next = *next;
                    self.arm(index, next);
                }
            }
            State::Closing { deadline, .. } => {
                if now >= *deadline {
                    self.end_closing(index);
                } else {
                    let deadline = *deadline;
                    self.arm(index, deadline);
                }
            }
            State::Rejoining { until: Some(until) } => {
                if now >= *until {
                    if !self.has_more(index) {
                        // Nothing left to send: no connect.
                        self.give_up(index, now);
                        return;
                    }
                    // The pause is over: its connect waits for a slot.
                    self.connections[index].state = State::Rejoining { until: None };
                    self.rejoining.push_back(index);
                } else {
                    let until = *until;
                    self.arm(index, until);
                }
            }
            State::Unstarted
            | State::Idle { next: None }
            | State::Rejoining { until: None }
            | State::Done => {}
        }
    }

    /// The run was stopped: nothing more is sent or connected; connects
    /// and echoes in progress get their patience, idle connections close.
    fn on_stop(&mut self, now: Instant) {
        self.stopped = true;
        self.stop_sending(now);
        for index in 0..self.connections.len() {
            match &mut self.connections[index].state {
                State::Idle { .. } => self.begin_closing(index, now),
                State::Closing { deadline, .. } => {
                    *deadline = (*deadline).min(deadline_after(now, MIN_CLOSING_WAIT));
                    let deadline = *deadline;
                    self.arm(index, deadline);
                }
                State::Connecting(_) | State::Echoing(_) => self.look_again(index, now),
                State::Unstarted | State::Rejoining { .. } | State::Done => {}
            }
        }
    }

    /// `--duration` is over: idle connections close, echoes out finish,
    /// connections not yet started never start, late echoes never go.
    fn end_sending(&mut self, now: Instant) {
        self.stop_sending(now);
        self.close_idle(now);
    }

    /// What a stop and the end of `--duration` share: connections not yet
    /// started never start, and echoes due and not sent never go.
    fn stop_sending(&mut self, now: Instant) {
        self.never_start_the_rest();
        if self.plan.config.reconnect {
            // Reconnects pausing or connecting have nothing left to send.
            for index in 0..self.connections.len() {
                let connection = &self.connections[index];
                if matches!(connection.state, State::Rejoining { .. }) || connection.reconnecting()
                {
                    self.give_up(index, now);
                }
            }
        }
        self.sending_ended.get_or_insert(now);
        if let Some(schedule) = &mut self.schedule {
            self.tally.unsent += schedule.drop_late(now, &mut self.tally.lower_bounds);
        }
    }

    fn close_idle(&mut self, now: Instant) {
        for index in 0..self.connections.len() {
            if matches!(self.connections[index].state, State::Idle { .. }) {
                self.begin_closing(index, now);
            }
        }
    }

    /// With `--rate`: makes due the echoes whose time has come, and sends
    /// the oldest due on free connections while there are any.
    fn send_due(&mut self, now: Instant) {
        let any_open = self.connected > 0;
        let stopped = self.stopped || self.ended;
        let Some(schedule) = &mut self.schedule else {
            return;
        };
        if stopped {
            return;
        }
        if schedule.finished() {
            self.schedule_through(now);
            return;
        }
        if schedule.start.is_none() {
            // Echoes go to open connections: the schedule starts with the
            // first, and the rest take their share as they open.
            if !any_open {
                return;
            }
            // Loop i starts i/rate later, so that the loops' echoes
            // interleave evenly instead of each loop's first going out at
            // once.
            let rate = self.plan.config.rate.unwrap_or(1).max(1);
            let phase = Duration::from_secs_f64(self.index as f64 / rate as f64);
            schedule.start = Some(deadline_after(now, phase));
        }
        self.tally.scheduled += schedule.make_due(now);
        if schedule.limit.is_none_or(|limit| schedule.issued < limit) {
            let due = schedule.due(schedule.issued);
            self.loop_wake = Some(self.loop_wake.map_or(due, |wake| wake.min(due)));
        }
        loop {
            let room = self.has_buffer_room();
            let Some(schedule) = &mut self.schedule else {
                break;
            };
            if schedule.late() == 0 {
                break;
            }
            let Some(&(index, ticket)) = schedule.free.front() else {
                break;
            };
            // Ended, or let go, since it came free.
            if !is_free(&self.connections[index], ticket) {
                schedule.free.pop_front();
                continue;
            }
            if !room {
                // A connection is free, but not a buffer.
                self.held_for_buffer = true;
                break;
            }
            schedule.free.pop_front();
            self.connections[index].free_ticket = None;
            let due = schedule.take_late().expect("an echo is due");
            if self.held_for_buffer && now.saturating_duration_since(due) > LATE_AFTER {
                self.tally.late_for_buffer += 1;
            }
            self.start_echo(index, due, now);
        }
        if self
            .schedule
            .as_ref()
            .is_some_and(|schedule| schedule.late() == 0)
        {
            self.held_for_buffer = false;
        }
        if self.schedule.as_ref().is_some_and(Schedule::finished) {
            self.schedule_through(now);
        }
    }

    /// With `--rate`, once every echo of a finite schedule has gone (here,
    /// or on a connection that came free): the idle connections are done,
    /// and so are those pausing or reconnecting with no declined message
    /// of their own to send. Once.
    fn schedule_through(&mut self, now: Instant) {
        if self.sending_ended.is_some() {
            return;
        }
        self.sending_ended = Some(now);
        // Nothing is left for connections not yet started.
        self.never_start_the_rest();
        self.close_idle(now);
        if self.plan.config.reconnect {
            for index in 0..self.connections.len() {
                let connection = &self.connections[index];
                if (matches!(connection.state, State::Rejoining { .. })
                    || connection.reconnecting())
                    && !self.has_more(index)
                {
                    self.give_up(index, now);
                }
            }
        }
    }

    /// Connections not yet started are done without starting.
    fn never_start_the_rest(&mut self) {
        for index in self.next_unstarted..self.connections.len() {
            self.connections[index].state = State::Done;
            self.open -= 1;
        }
        self.next_unstarted = self.connections.len();
    }

    /// The loop's poll failed: every connection still open fails with it.
    fn abandon(&mut self, error: &io::Error, now: Instant) {
        for index in 0..self.connections.len() {
            if !matches!(self.connections[index].state, State::Done) {
                self.tally.echoing_ended = Some(now);
                let kind = FailureKind::Spawn {
                    error: io::Error::new(error.kind(), error.to_string()),
                };
                self.fail(index, kind);
                self.finish(index);
            }
        }
    }
}

/// What a wait saw, for the busy-poll window: only the batch sign of
/// saturation (more than two events). Unlike the server's workers, a
/// client loop does not stand down when its yield let another thread run:
/// on a shared machine that thread is often the server it waits for, and
/// one connection's round trip would lose the spin's gain.
fn waited(events: &Events) -> Waited {
    Waited {
        events: events.iter().count(),
        contested: false,
    }
}

/// What a loop leaves when its connections are through.
pub(in crate::client) struct LoopEnd {
    pub tally: ConnectionTally,
    /// Its share of `--rate`.
    schedule: Option<Schedule>,
    /// Its connections all ended (or never opened) while the run was still
    /// sending: its share stays due until the run stops sending.
    orphaned: bool,
    /// When it stopped sending: stopped, `--duration` over, its schedule
    /// through, or its last connection ended.
    sending_ended: Instant,
}

/// The loops' tallies once the run is over. A loop whose connections all
/// ended early (a server that refused or closed them) owed its share of the
/// rate until the last loop stopped sending: those echoes were due and
/// never sent, and count so, with the wait each had by then as a lower
/// bound of its round trip.
pub(in crate::client) fn settle(ends: Vec<LoopEnd>) -> Vec<ConnectionTally> {
    let Some(sending_ended) = ends.iter().map(|end| end.sending_ended).max() else {
        return Vec::new();
    };
    // A loop that never opened a connection takes the run's first start.
    let first_start = ends
        .iter()
        .filter_map(|end| end.schedule.as_ref()?.start)
        .min();
    ends.into_iter()
        .map(|end| {
            let mut tally = end.tally;
            if let (true, Some(mut schedule)) = (end.orphaned, end.schedule) {
                schedule.start = schedule.start.or(first_start);
                tally.scheduled += schedule.make_due(sending_ended);
                tally.unsent += schedule.drop_late(sending_ended, &mut tally.lower_bounds);
            }
            tally
        })
        .collect()
}

/// Whether `connection` is still free by its entry with `ticket` in the
/// schedule's queue: not ended, not let go and queued again since.
fn is_free(connection: &Connection, ticket: u64) -> bool {
    connection.free_ticket == Some(ticket) && matches!(connection.state, State::Idle { next: None })
}

/// What an echo's failure message needs, once the echo is taken apart.
struct EchoFacts {
    seq: u64,
    len: usize,
    written: usize,
}

/// The connection numbers of loop `index`.
fn numbers<F>(plan: &Plan<'_, F>, index: usize) -> impl Iterator<Item = usize> {
    (index + 1..=plan.config.connections.get()).step_by(plan.threads)
}

/// The tally of loop `index` when it could not start: each of its
/// connections fails with `error`.
pub(in crate::client) fn unstarted<F>(plan: &Plan<'_, F>, index: usize, error: io::Error) -> LoopEnd
where
    F: Fn(&crate::client::Event<'_>) + Sync,
{
    let mut tally = ConnectionTally::default();
    for number in numbers(plan, index) {
        let kind = FailureKind::Spawn {
            error: io::Error::new(error.kind(), error.to_string()),
        };
        tally.count(&kind);
        let failure = Failure {
            connection: plan.multiple().then_some(number),
            kind,
        };
        (plan.observer)(&crate::client::Event::Failed(&failure));
    }
    let now = Instant::now();
    tally.echoing_ended = Some(now);
    LoopEnd {
        tally,
        schedule: Schedule::for_loop(plan, numbers(plan, index).count()),
        orphaned: true,
        sending_ended: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(per_second: f64, limit: Option<u64>) -> Schedule {
        Schedule {
            per_second,
            start: Some(Instant::now()),
            issued: 0,
            sent: 0,
            limit,
            free: VecDeque::new(),
            tickets: 0,
        }
    }

    #[test]
    fn echoes_fall_due_evenly_from_the_start() {
        let schedule = schedule(1000.0, None);
        let start = schedule.start.expect("started");
        assert_eq!(schedule.due(0), start);
        assert_eq!(schedule.due(1) - start, Duration::from_millis(1));
        assert_eq!(schedule.due(2500) - start, Duration::from_millis(2500));
    }

    #[test]
    fn echoes_held_up_fall_due_all_at_once() {
        let mut schedule = schedule(1_000_000.0, None);
        let start = schedule.start.expect("started");
        // A loop held up for a second at a million a second owes a million
        // and one (echo 0 is due at the start), made due in one step.
        assert_eq!(schedule.make_due(start + Duration::from_secs(1)), 1_000_001);
        assert_eq!(schedule.make_due(start + Duration::from_secs(1)), 0);
        let mut limited = self::schedule(1000.0, Some(10));
        assert_eq!(limited.make_due(start + Duration::from_secs(5)), 10);
    }

    #[test]
    fn late_echoes_go_oldest_first_and_cost_no_memory() {
        let mut schedule = schedule(1000.0, Some(1_000_000));
        // A million echoes fell due with no connection free: two numbers.
        schedule.issued = 1_000_000;
        assert_eq!(schedule.late(), 1_000_000);
        let start = schedule.start.expect("started");
        assert_eq!(schedule.take_late(), Some(start));
        assert_eq!(schedule.take_late(), Some(start + Duration::from_millis(1)));
        assert!(!schedule.finished());
        let mut bounds = RttStats::new();
        let end = schedule.due(999_999) + Duration::from_millis(1);
        assert_eq!(schedule.drop_late(end, &mut bounds), 999_998);
        assert!(schedule.finished());
        // Each counts the wait it had: from 1 ms (the newest) to 1000 s.
        assert_eq!(bounds.count(), 999_998);
        assert_eq!(bounds.min(), Some(Duration::from_millis(1)));
        assert_eq!(bounds.max(), Some(Duration::from_millis(999_998)));
        assert_eq!(schedule.take_late(), None);
    }
}
