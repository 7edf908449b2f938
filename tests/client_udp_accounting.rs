//! The UDP client's accounting on its own: a flow's real datagrams
//! (`Datagrams::write`) sent through a path that drops, duplicates, delays
//! (past the timeout, and past the flow's history), reorders and damages
//! them (random bytes flipped, anywhere, the sequence number included, or
//! cut short), each echo then named and checked as the flow does
//! (`Datagrams::named`, `Ledger::locate`, `Datagrams::compare`) and judged
//! by the flow's `Ledger`. Whatever happens, every count (echoed, lost,
//! late, duplicated, reordered, corrupted), the round trips and the jitter
//! equal those of a plain model that remembers everything and looks at the
//! bytes.
//!
//! The ledger runs with a small window (4 in flight, records for 8, 16
//! remembered) and timeouts up to 8 send intervals, so its window fills and
//! the sender waits for room as the flow does (its schedule slips), and
//! its rings wrap; some echoes come more than 16 datagrams later, where
//! the ledger no longer knows whether a datagram was answered.

mod common;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::num::NonZeroUsize;
use std::time::Duration;

use echo_chamber::client::Payload;
use echo_chamber::client::udp::datagram::{Comparison, Datagrams};
use echo_chamber::client::udp::{Counts, Ledger};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::with_time_limit;

/// Nanoseconds between two scheduled sends.
const INTERVAL: u64 = 1_000;
/// The ledger's in-flight window and answered-bit history.
const WINDOW: usize = 4;
const HISTORY: u64 = 16;
/// The run's seed and the flow's number, for the datagrams' bytes.
const SEED: u64 = 0x5EED;
const FLOW: usize = 3;

/// What the path does to one echo's bytes.
#[derive(Debug, Clone)]
struct Damage {
    /// Bytes XORed with a non-zero value: (offset modulo the size, value).
    flips: Vec<(usize, u8)>,
    /// Cut to this many bytes (modulo the size).
    truncate: Option<usize>,
}

/// One echo the path delivers: `delay` ns after its datagram was sent.
#[derive(Debug, Clone)]
struct Echo {
    delay: u64,
    damage: Damage,
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Bytes per datagram: all numbered (8 or more).
    size: usize,
    timeout: u64,
    /// Per datagram, the echoes of it (none: dropped; more: duplicated).
    echoes: Vec<Vec<Echo>>,
}

fn scenarios() -> impl Strategy<Value = Scenario> {
    // An echo takes at least a nanosecond, so it never comes before its
    // datagram is sent.
    let delay = prop_oneof![
        6 => 1..3 * INTERVAL,
        2 => 1..12 * INTERVAL,
        // Past the history: 16 datagrams or more are sent meanwhile.
        1 => 1..60 * INTERVAL,
    ];
    let flips = prop::collection::vec((any::<usize>(), 1..=255u8), 1..=3);
    let damage = prop_oneof![
        8 => Just(Damage { flips: Vec::new(), truncate: None }),
        1 => flips.prop_map(|flips| Damage { flips, truncate: None }),
        1 => (prop::collection::vec((any::<usize>(), 1..=255u8), 0..=1), any::<usize>())
            .prop_map(|(flips, truncate)| Damage { flips, truncate: Some(truncate) }),
    ];
    let echo = (delay, damage).prop_map(|(delay, damage)| Echo { delay, damage });
    (
        prop_oneof![Just(8usize), Just(16), Just(64)],
        INTERVAL / 2..=8 * INTERVAL,
        prop::collection::vec(prop::collection::vec(echo, 0..=3), 1..120),
    )
        .prop_map(|(size, timeout, echoes)| Scenario {
            size,
            timeout,
            echoes,
        })
}

/// One echo as it arrived, in the order the ledger saw them.
#[derive(Debug, Clone)]
struct Arrival {
    seq: u64,
    copy: usize,
    /// The newest datagram sent when it came.
    highest_sent: u64,
    /// Its bytes, after the path's damage.
    bytes: Vec<u8>,
}

/// The counts, round trips and jitter a plain model expects.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    counts: Counts,
    rtts: Vec<u64>,
    jitter_sum: u64,
    jitter_pairs: u64,
}

/// The bytes of `echo` of a datagram whose bytes are `sent`.
fn damaged(sent: &[u8], damage: &Damage) -> Vec<u8> {
    let mut bytes = sent.to_vec();
    for &(offset, value) in &damage.flips {
        bytes[offset % sent.len()] ^= value;
    }
    if let Some(len) = damage.truncate {
        bytes.truncate(len % sent.len());
    }
    bytes
}

/// Remembers every datagram; follows the definitions in the ledger's docs.
fn model(scenario: &Scenario, sent: &[Vec<u8>], arrivals: &[Arrival]) -> Expected {
    let count = scenario.echoes.len();
    let mut expected = Expected::default();
    let mut answered = vec![false; count + 1];
    let mut answered_in_time = vec![false; count + 1];
    let mut rtt: Vec<Option<u64>> = vec![None; count + 2];
    let mut highest_echoed = 0;
    for arrival in arrivals {
        let seq = arrival.seq as usize;
        let echo = &scenario.echoes[seq - 1][arrival.copy];
        let counts = &mut expected.counts;
        let in_time = echo.delay < scenario.timeout;
        let exact = arrival.bytes == sent[seq];
        // A damaged number names no datagram (but by a 2^-64 chance).
        let names_it = arrival.bytes.get(..8) == Some(&sent[seq][..8]);
        let forgotten = arrival.highest_sent - arrival.seq >= HISTORY;
        if !exact {
            counts.corrupted += 1;
            if names_it && !forgotten && !answered[seq] && in_time {
                answered[seq] = true;
                answered_in_time[seq] = true;
            }
        } else if forgotten || answered[seq] {
            counts.duplicated += 1;
        } else if !in_time {
            counts.late += 1;
            answered[seq] = true;
        } else {
            counts.echoed += 1;
            answered[seq] = true;
            answered_in_time[seq] = true;
            if arrival.seq < highest_echoed {
                counts.reordered += 1;
            }
            highest_echoed = highest_echoed.max(arrival.seq);
            rtt[seq] = Some(echo.delay);
            expected.rtts.push(echo.delay);
        }
    }
    expected.counts.sent = count as u64;
    expected.counts.lost = (1..=count).filter(|&seq| !answered_in_time[seq]).count() as u64;
    for seq in 1..count {
        if let (Some(a), Some(b)) = (rtt[seq], rtt[seq + 1]) {
            expected.jitter_sum += a.abs_diff(b);
            expected.jitter_pairs += 1;
        }
    }
    expected
}

fn run_scenario(scenario: &Scenario) -> Result<(), TestCaseError> {
    let payload = Payload::Generated {
        size: NonZeroUsize::new(scenario.size).expect("a size above 0"),
    };
    let mut datagrams = Datagrams::new(&payload, SEED, FLOW);
    prop_assert!(datagrams.reserve());
    let count = scenario.echoes.len() as u64;
    let timeout = Duration::from_nanos(scenario.timeout);
    let mut ledger = Ledger::new(WINDOW, HISTORY as usize, timeout);
    let ns = Duration::from_nanos;
    // Index 0 unused: datagrams are numbered from 1.
    let mut sent = vec![Vec::new()];
    let mut arrivals = Vec::new();
    let mut lost = Vec::new();
    // Echoes on their way: (arrival time, seq, copy).
    let mut path = BinaryHeap::new();
    let mut next_send = INTERVAL;
    loop {
        let arrival = path.peek().map(|&Reverse((at, _, _))| at);
        // At equal times, echoes are taken before sends.
        let send_first =
            ledger.highest_sent() < count && arrival.is_none_or(|at: u64| next_send < at);
        if send_first {
            ledger.expire(ns(next_send), |seq| lost.push(seq));
            if !ledger.can_send() {
                // The window is full: wait for room, as the flow does,
                // which comes with an echo or the oldest one's timeout.
                let deadline = ledger.next_deadline().map(|d| d.as_nanos() as u64);
                prop_assert!(
                    deadline.is_some() || arrival.is_some(),
                    "the window is full with nothing to free it"
                );
                next_send = deadline
                    .unwrap_or(u64::MAX)
                    .min(arrival.unwrap_or(u64::MAX))
                    .max(next_send);
                continue;
            }
            let seq = ledger.sent(ns(next_send));
            prop_assert_eq!(seq, sent.len() as u64);
            let mut bytes = vec![0; scenario.size];
            datagrams.write(seq, &mut bytes);
            sent.push(bytes);
            for (copy, echo) in scenario.echoes[seq as usize - 1].iter().enumerate() {
                path.push(Reverse((next_send + echo.delay, seq, copy)));
            }
            next_send += INTERVAL;
            continue;
        }
        let Some(Reverse((at, seq, copy))) = path.pop() else {
            break;
        };
        let now = ns(at);
        ledger.expire(now, |seq| lost.push(seq));
        let echo = &scenario.echoes[seq as usize - 1][copy];
        let bytes = damaged(&sent[seq as usize], &echo.damage);
        let named = datagrams
            .named(&bytes)
            .and_then(|number| ledger.locate(number, datagrams.header_bits()));
        let exact = named.map(|named| datagrams.compare(named, &bytes)) == Some(Comparison::Exact);
        ledger.echo(named, exact, now);
        arrivals.push(Arrival {
            seq,
            copy,
            highest_sent: ledger.highest_sent(),
            bytes,
        });
    }
    prop_assert_eq!(ledger.highest_sent(), count, "every datagram was sent");
    ledger.expire_all(|seq| lost.push(seq));
    prop_assert!(ledger.is_idle());
    let expected = model(scenario, &sent, &arrivals);
    let mut unique = lost.clone();
    unique.sort_unstable();
    unique.dedup();
    prop_assert_eq!(
        unique.len(),
        lost.len(),
        "a datagram was lost twice: {:?}",
        lost
    );
    prop_assert_eq!(ledger.counts(), &expected.counts);
    prop_assert_eq!(lost.len() as u64, expected.counts.lost);
    let rtt = ledger.rtt();
    prop_assert_eq!(rtt.count(), expected.rtts.len() as u64);
    let min = expected
        .rtts
        .iter()
        .min()
        .map(|&ns| Duration::from_nanos(ns));
    let max = expected
        .rtts
        .iter()
        .max()
        .map(|&ns| Duration::from_nanos(ns));
    prop_assert_eq!((rtt.min(), rtt.max()), (min, max));
    let jitter = ledger.jitter();
    prop_assert_eq!(jitter.pairs(), expected.jitter_pairs);
    let mean = (expected.jitter_pairs > 0)
        .then(|| Duration::from_nanos(expected.jitter_sum / expected.jitter_pairs));
    prop_assert_eq!(jitter.mean(), mean);
    Ok(())
}

#[test]
fn random_drops_duplicates_delays_reordering_and_damage_are_counted_exactly() {
    with_time_limit(Duration::from_secs(120), || {
        let config = Config {
            cases: 1024,
            failure_persistence: None,
            max_shrink_iters: 4_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        if let Err(failure) = runner.run(&scenarios(), |scenario| run_scenario(&scenario)) {
            panic!("{failure}");
        }
    });
}
