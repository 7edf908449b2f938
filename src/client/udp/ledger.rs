//! The accounting of one UDP flow, with no sockets and no clock of its own:
//! the flow tells it what it sent and what came back, and when (as time
//! since the flow began), and it decides which datagram each echo belongs
//! to and what the echo means. Being pure, it is what the property test
//! drives with random drops, duplicates, delays and reordering.
//!
//! Every datagram sent ends in exactly one of three outcomes: **echoed**
//! (its first answer came within the timeout and was exact), **corrupted**
//! (its first answer came within the timeout but damaged), or **lost** (no
//! answer within the timeout). Beside those, echoes are counted as they
//! come: **late** (the first exact echo of a datagram already counted
//! lost; it stays lost), **duplicated** (an exact echo of a datagram
//! already answered, or of one older than the history, which cannot be
//! told from a late one and so fails safe), **reordered** (an echoed
//! datagram whose echo came
//! after the echo of a later one), **corrupted** (every damaged echo,
//! including those that name no datagram), and **foreign** (from an address
//! other than the server's; the flow counts those, they name nothing).
//!
//! Memory is fixed when the ledger is made: a ring of records for twice the
//! `window` of datagrams that may be in flight (so that the round trip of
//! a datagram's neighbour is still there for the jitter when its echo
//! comes), and one bit per datagram for the `history` before that, to tell
//! a late echo from a duplicate. The window is a span of sequence numbers
//! from the oldest datagram still pending, so the flow sizes it to hold
//! every datagram sent within a timeout.

use std::time::Duration;

use crate::client::rtt::RttStats;

/// How often each thing happened on a flow (or, summed, on a run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Datagrams whose first answer came within the timeout, exact.
    pub echoed: u64,
    /// Datagrams with no answer within the timeout (late ones included).
    pub lost: u64,
    /// Lost datagrams whose exact echo came after all.
    pub late: u64,
    /// Exact echoes of datagrams already answered, or older than the
    /// history (see [`Verdict::Stale`]).
    pub duplicated: u64,
    /// Echoed datagrams whose echo came after the echo of a later one.
    pub reordered: u64,
    /// Damaged echoes: wrong bytes or wrong size, or naming no datagram.
    pub corrupted: u64,
    /// Echoes from an address other than the server's.
    pub foreign: u64,
}

impl Counts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.sent += other.sent;
        self.echoed += other.echoed;
        self.lost += other.lost;
        self.late += other.late;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.corrupted += other.corrupted;
        self.foreign += other.foreign;
    }
}

/// What an echo turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first answer to datagram `seq`, exact and in time.
    Echoed {
        /// The datagram's sequence number on the flow, from 1.
        seq: u64,
        /// From its send to this echo.
        rtt: Duration,
        /// An echo of a later datagram had come first.
        reordered: bool,
    },
    /// The first exact echo of datagram `seq`, which had been counted lost.
    Late {
        /// The datagram's sequence number on the flow, from 1.
        seq: u64,
        /// From its send to this echo, when the datagram is recent enough
        /// for its send time still to be known.
        rtt: Option<Duration>,
    },
    /// Another exact echo of datagram `seq`, already answered.
    Duplicated {
        /// The datagram's sequence number on the flow, from 1.
        seq: u64,
    },
    /// An exact echo of datagram `seq`, sent so long ago (more than the
    /// history before the newest) that whether it was answered is
    /// forgotten: counted duplicated, never late.
    Stale {
        /// The datagram's sequence number on the flow, from 1.
        seq: u64,
    },
    /// A damaged echo; `seq` is the datagram it names, if it names one
    /// that was sent. It answers that datagram if it was still waiting.
    Corrupted {
        /// The datagram named, if any.
        seq: Option<u64>,
    },
}

/// Where a datagram with a record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent, no answer yet, timeout not reached.
    Pending,
    /// First answer exact and in time.
    Echoed,
    /// First answer damaged, in time.
    Corrupted,
    /// No answer within the timeout, none since.
    Lost,
    /// Lost, then its exact echo came.
    Late,
}

/// One flow's accounting. See the module documentation for what it counts.
#[derive(Debug)]
pub struct Ledger {
    /// At most this many datagrams are in flight.
    window: u64,
    /// Records are kept for this many of the newest datagrams: twice the
    /// window.
    records: u64,
    /// Datagrams (records included) whose answered bit is kept.
    history: u64,
    timeout: Duration,
    /// The sequence number the next datagram gets (from 1).
    next_seq: u64,
    /// No datagram below it is pending.
    oldest_pending: u64,
    /// Per record: when it was sent, in ns since the flow began.
    sent_at: Box<[u64]>,
    /// Per record: the round trip of an echoed datagram, in ns.
    rtt_ns: Box<[u64]>,
    state: Box<[State]>,
    /// One bit per datagram of the history: answered (echoed, corrupted
    /// in time, or late).
    answered: Box<[u64]>,
    /// The highest datagram echoed so far (0: none).
    highest_echoed: u64,
    counts: Counts,
    rtt: RttStats,
    jitter: Jitter,
}

/// The mean absolute difference of the round trips of consecutive
/// datagrams (both echoed), kept as a sum and a count so flows merge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Jitter {
    sum_ns: u128,
    pairs: u64,
}

impl Jitter {
    /// Adds one pair's round trips.
    pub fn record(&mut self, earlier: Duration, later: Duration) {
        self.sum_ns += earlier.abs_diff(later).as_nanos();
        self.pairs += 1;
    }

    /// Adds `other`'s pairs to these.
    pub fn merge(&mut self, other: &Jitter) {
        self.sum_ns += other.sum_ns;
        self.pairs += other.pairs;
    }

    /// Pairs of consecutive datagrams that were both echoed.
    #[must_use]
    pub fn pairs(&self) -> u64 {
        self.pairs
    }

    /// The mean absolute difference, if there was a pair.
    #[must_use]
    pub fn mean(&self) -> Option<Duration> {
        (self.pairs > 0).then(|| {
            let mean = self.sum_ns / u128::from(self.pairs);
            Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX))
        })
    }
}

impl Ledger {
    /// A ledger allowing `window` datagrams in flight and keeping an
    /// answered bit for `history` datagrams (both rounded up to powers of
    /// two; `history` is at least twice `window`). A datagram with no
    /// answer after `timeout` is lost.
    #[must_use]
    pub fn new(window: usize, history: usize, timeout: Duration) -> Ledger {
        let window = window.max(1).next_power_of_two();
        let records = 2 * window;
        let history = history.max(records).next_power_of_two();
        Ledger {
            window: window as u64,
            records: records as u64,
            history: history as u64,
            timeout,
            next_seq: 1,
            oldest_pending: 1,
            sent_at: vec![0; records].into_boxed_slice(),
            rtt_ns: vec![0; records].into_boxed_slice(),
            state: vec![State::Lost; records].into_boxed_slice(),
            answered: vec![0; history.div_ceil(64)].into_boxed_slice(),
            highest_echoed: 0,
            counts: Counts::default(),
            rtt: RttStats::new(),
            jitter: Jitter::default(),
        }
    }

    /// The bytes a ledger made with [`new`](Self::new)`(window, history,
    /// _)` holds.
    #[must_use]
    pub fn memory(window: usize, history: usize) -> u64 {
        let window = window.max(1).next_power_of_two();
        let records = 2 * window;
        let history = history.max(records).next_power_of_two();
        let record = 2 * size_of::<u64>() + size_of::<State>();
        (records * record + history.div_ceil(64) * size_of::<u64>() + size_of::<Ledger>()) as u64
    }

    /// The sequence number the next datagram sent will get.
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest datagram sent (0 before the first).
    #[must_use]
    pub fn highest_sent(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether another datagram may go: fewer than `window` are in flight.
    /// Call [`expire`](Self::expire) first, so timed-out ones are not.
    #[must_use]
    pub fn can_send(&self) -> bool {
        self.next_seq - self.oldest_pending < self.window
    }

    /// True when no datagram is pending.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.oldest_pending == self.next_seq
    }

    /// Records that datagram [`next_seq`](Self::next_seq) was sent at
    /// `now`, and returns its sequence number.
    ///
    /// # Panics
    ///
    /// If [`can_send`](Self::can_send) is false: its record would overwrite
    /// one still in flight.
    pub fn sent(&mut self, now: Duration) -> u64 {
        assert!(self.can_send(), "the window is full");
        let seq = self.next_seq;
        let slot = self.slot(seq);
        self.sent_at[slot] = nanos(now);
        self.rtt_ns[slot] = 0;
        self.state[slot] = State::Pending;
        self.set_answered(seq, false);
        self.next_seq += 1;
        self.counts.sent += 1;
        seq
    }

    /// When the oldest pending datagram times out, if one is pending.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Duration> {
        (self.oldest_pending < self.next_seq).then(|| self.deadline(self.slot(self.oldest_pending)))
    }

    /// Counts as lost every pending datagram whose timeout has passed at
    /// `now`, calling `on_lost` with each one's sequence number, oldest
    /// first.
    pub fn expire(&mut self, now: Duration, mut on_lost: impl FnMut(u64)) {
        while self.oldest_pending < self.next_seq {
            let seq = self.oldest_pending;
            let slot = self.slot(seq);
            if self.state[slot] == State::Pending {
                if now < self.deadline(slot) {
                    // Later datagrams were sent no earlier: none is due.
                    return;
                }
                self.state[slot] = State::Lost;
                self.counts.lost += 1;
                on_lost(seq);
            }
            self.oldest_pending += 1;
        }
    }

    /// Counts every pending datagram as lost now, whatever its timeout (the
    /// run was stopped and its patience ran out).
    pub fn expire_all(&mut self, on_lost: impl FnMut(u64)) {
        self.expire(Duration::MAX, on_lost);
    }

    /// The datagram that a header's low `bits` bits of sequence number
    /// name: the newest one sent with those bits, if any was. With 64 bits
    /// the number is whole; with 0 (no header) it is the newest datagram.
    #[must_use]
    pub fn locate(&self, low: u64, bits: u32) -> Option<u64> {
        let highest = self.highest_sent();
        if highest == 0 {
            return None;
        }
        if bits >= 64 {
            return (1..=highest).contains(&low).then_some(low);
        }
        let behind = highest.wrapping_sub(low) & ((1u64 << bits) - 1);
        (behind < highest).then(|| highest - behind)
    }

    /// Judges an echo that names datagram `seq` (`None`: it names none that
    /// was sent) and came at `now`; `exact` says whether it matches that
    /// datagram byte for byte. Call [`expire`](Self::expire) with `now`
    /// first, so a datagram whose timeout has passed is lost, not pending.
    pub fn echo(&mut self, seq: Option<u64>, exact: bool, now: Duration) -> Verdict {
        let Some(seq) = seq.filter(|&seq| (1..self.next_seq).contains(&seq)) else {
            self.counts.corrupted += 1;
            return Verdict::Corrupted { seq: None };
        };
        let behind = self.highest_sent() - seq;
        if behind >= self.history {
            // Older than the answered bits: late or duplicated, no one can
            // tell. Counting it late could pass a run that had a
            // duplicate, so it counts duplicated.
            return if exact {
                self.counts.duplicated += 1;
                Verdict::Stale { seq }
            } else {
                self.counts.corrupted += 1;
                Verdict::Corrupted { seq: Some(seq) }
            };
        }
        if self.is_answered(seq) {
            return if exact {
                self.counts.duplicated += 1;
                Verdict::Duplicated { seq }
            } else {
                self.counts.corrupted += 1;
                Verdict::Corrupted { seq: Some(seq) }
            };
        }
        if behind >= self.records {
            // No record left and not answered: it was counted lost.
            return self.late_or_corrupted(seq, exact, None);
        }
        let slot = self.slot(seq);
        let rtt_ns = nanos(now).saturating_sub(self.sent_at[slot]);
        let rtt = Duration::from_nanos(rtt_ns);
        if self.state[slot] == State::Pending && now >= self.deadline(slot) {
            // The caller did not expire first; the timeout still rules.
            self.state[slot] = State::Lost;
            self.counts.lost += 1;
        }
        if self.state[slot] != State::Pending {
            return self.late_or_corrupted(seq, exact, Some(rtt));
        }
        self.set_answered(seq, true);
        if !exact {
            self.state[slot] = State::Corrupted;
            self.counts.corrupted += 1;
            self.advance();
            return Verdict::Corrupted { seq: Some(seq) };
        }
        self.state[slot] = State::Echoed;
        self.rtt_ns[slot] = rtt_ns;
        self.counts.echoed += 1;
        self.rtt.record(rtt);
        let reordered = seq < self.highest_echoed;
        if reordered {
            self.counts.reordered += 1;
        }
        self.highest_echoed = self.highest_echoed.max(seq);
        for neighbour in [seq - 1, seq + 1] {
            if let Some(other) = self.echoed_rtt(neighbour) {
                self.jitter.record(other, rtt);
            }
        }
        self.advance();
        Verdict::Echoed {
            seq,
            rtt,
            reordered,
        }
    }

    /// Counts an echo from an address other than the server's.
    pub fn foreign(&mut self) {
        self.counts.foreign += 1;
    }

    /// The counts so far.
    #[must_use]
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Round trips of the echoed datagrams.
    #[must_use]
    pub fn rtt(&self) -> &RttStats {
        &self.rtt
    }

    /// Round-trip differences of consecutive echoed datagrams.
    #[must_use]
    pub fn jitter(&self) -> &Jitter {
        &self.jitter
    }

    /// The first exact echo of a lost datagram is late; a damaged one is
    /// only corrupted, and leaves it waiting for an exact one.
    fn late_or_corrupted(&mut self, seq: u64, exact: bool, rtt: Option<Duration>) -> Verdict {
        if !exact {
            self.counts.corrupted += 1;
            return Verdict::Corrupted { seq: Some(seq) };
        }
        self.set_answered(seq, true);
        let behind = self.highest_sent() - seq;
        if behind < self.records {
            let slot = self.slot(seq);
            self.state[slot] = State::Late;
            self.advance();
        }
        self.counts.late += 1;
        Verdict::Late { seq, rtt }
    }

    /// The round trip of datagram `seq` if it has a record and was echoed.
    fn echoed_rtt(&self, seq: u64) -> Option<Duration> {
        let recorded = seq >= 1 && seq < self.next_seq && self.highest_sent() - seq < self.records;
        let slot = self.slot(seq);
        (recorded && self.state[slot] == State::Echoed)
            .then(|| Duration::from_nanos(self.rtt_ns[slot]))
    }

    /// Moves `oldest_pending` past the datagrams already answered.
    fn advance(&mut self) {
        while self.oldest_pending < self.next_seq
            && self.state[self.slot(self.oldest_pending)] != State::Pending
        {
            self.oldest_pending += 1;
        }
    }

    fn deadline(&self, slot: usize) -> Duration {
        Duration::from_nanos(self.sent_at[slot]).saturating_add(self.timeout)
    }

    fn slot(&self, seq: u64) -> usize {
        (seq & (self.records - 1)) as usize
    }

    fn is_answered(&self, seq: u64) -> bool {
        let bit = seq & (self.history - 1);
        self.answered[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_answered(&mut self, seq: u64, answered: bool) {
        let bit = seq & (self.history - 1);
        let word = &mut self.answered[(bit / 64) as usize];
        if answered {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
    }
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ledger() -> Ledger {
        Ledger::new(4, 16, 10 * MS)
    }

    #[test]
    fn an_echo_in_time_is_echoed_and_one_after_the_timeout_is_lost_then_late() {
        let mut ledger = ledger();
        let first = ledger.sent(Duration::ZERO);
        let second = ledger.sent(MS);
        assert_eq!(
            ledger.echo(Some(first), true, 2 * MS),
            Verdict::Echoed {
                seq: 1,
                rtt: 2 * MS,
                reordered: false
            }
        );
        let mut lost = Vec::new();
        ledger.expire(11 * MS, |seq| lost.push(seq));
        assert_eq!(lost, [second]);
        assert_eq!(
            ledger.echo(Some(second), true, 12 * MS),
            Verdict::Late {
                seq: 2,
                rtt: Some(11 * MS)
            }
        );
        assert_eq!(
            ledger.echo(Some(second), true, 13 * MS),
            Verdict::Duplicated { seq: 2 }
        );
        let counts = ledger.counts();
        assert_eq!(
            (counts.echoed, counts.lost, counts.late, counts.duplicated),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn an_echo_of_an_earlier_datagram_after_a_later_one_is_reordered() {
        let mut ledger = ledger();
        ledger.sent(Duration::ZERO);
        ledger.sent(Duration::ZERO);
        ledger.echo(Some(2), true, MS);
        assert_eq!(
            ledger.echo(Some(1), true, 2 * MS),
            Verdict::Echoed {
                seq: 1,
                rtt: 2 * MS,
                reordered: true
            }
        );
        assert_eq!(ledger.counts().reordered, 1);
        assert_eq!(ledger.jitter().mean(), Some(MS));
    }

    #[test]
    fn a_full_window_waits_for_its_oldest_datagram() {
        let mut ledger = ledger();
        for _ in 0..4 {
            ledger.sent(Duration::ZERO);
        }
        assert!(!ledger.can_send());
        ledger.echo(Some(2), true, MS);
        assert!(!ledger.can_send(), "the oldest is still out");
        ledger.echo(Some(1), true, MS);
        assert!(ledger.can_send());
    }

    #[test]
    fn truncated_sequence_numbers_name_the_newest_datagram_with_those_bits() {
        let mut ledger = Ledger::new(4, 256, 10 * MS);
        assert_eq!(ledger.locate(1, 8), None, "nothing sent yet");
        for seq in 1..=300 {
            ledger.expire(Duration::MAX, |_| {});
            assert_eq!(ledger.sent(Duration::ZERO), seq);
        }
        assert_eq!(ledger.locate(300 % 256, 8), Some(300));
        assert_eq!(ledger.locate(290 % 256, 8), Some(290));
        assert_eq!(ledger.locate(45, 8), Some(45), "301 is not sent yet");
        assert_eq!(ledger.locate(257, 64), Some(257));
        assert_eq!(ledger.locate(0, 0), Some(300), "no header: the newest");
        assert_eq!(ledger.locate(301, 64), None, "never sent");
    }

    #[test]
    fn a_damaged_echo_answers_its_datagram_and_one_naming_nothing_is_still_counted() {
        let mut ledger = ledger();
        ledger.sent(Duration::ZERO);
        assert_eq!(
            ledger.echo(Some(1), false, MS),
            Verdict::Corrupted { seq: Some(1) }
        );
        assert_eq!(
            ledger.echo(None, false, MS),
            Verdict::Corrupted { seq: None }
        );
        ledger.expire(Duration::MAX, |_| panic!("the damaged echo answered it"));
        assert_eq!(ledger.counts().corrupted, 2);
        assert!(ledger.is_idle());
    }

    #[test]
    fn an_exact_echo_older_than_the_history_counts_duplicated_never_late() {
        let mut ledger = ledger();
        ledger.sent(Duration::ZERO);
        ledger.echo(Some(1), true, MS);
        for _ in 0..20 {
            ledger.expire(Duration::MAX, |_| {});
            ledger.sent(2 * MS);
        }
        ledger.expire(Duration::MAX, |_| {});
        let lost = ledger.counts().lost;
        // Datagram 1 was echoed; its answered bit is gone, its copy is not late.
        assert_eq!(
            ledger.echo(Some(1), true, Duration::MAX),
            Verdict::Stale { seq: 1 }
        );
        let counts = ledger.counts();
        assert_eq!((counts.late, counts.duplicated), (0, 1));
        assert_eq!(counts.lost, lost, "an old copy changes no loss");
    }
}
