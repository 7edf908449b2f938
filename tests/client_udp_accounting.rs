//! The UDP client's accounting on its own: a flow's `Ledger` driven with a
//! random stream of datagrams that the path drops, duplicates, delays past
//! the timeout, reorders and damages (in the bytes, or in the sequence
//! number so the echo names no datagram). Whatever happens, every count
//! (echoed, lost, late, duplicated, reordered, corrupted), the round trips
//! and the jitter equal those of a plain model that remembers everything.
//!
//! The ledger is run with a small window (4 in flight, records for 8, 16
//! remembered) and with 4-bit sequence numbers as well as whole ones, so
//! that its rings wrap and truncated numbers must be placed right; the
//! stream keeps within what those can tell apart (each echo comes before
//! the datagram 16 places later is sent, and the timeout is at most 4
//! send intervals).

mod common;

use std::time::Duration;

use echo_chamber::client::udp::{Counts, Ledger};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::with_time_limit;

/// Nanoseconds between two sends.
const INTERVAL: u64 = 1_000;
/// The ledger's in-flight window and answered-bit history.
const WINDOW: usize = 4;
const HISTORY: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    None,
    /// A byte changed, the sequence number intact: the echo names its datagram.
    Bytes,
    /// The sequence number changed: the echo names no datagram.
    Header,
}

/// One echo the path delivers: `delay` ns after its datagram was sent.
#[derive(Debug, Clone, Copy)]
struct Echo {
    delay: u64,
    damage: Damage,
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Bits of sequence number the datagrams carry.
    bits: u32,
    timeout: u64,
    /// Per datagram, the echoes of it (none: dropped; more: duplicated).
    echoes: Vec<Vec<Echo>>,
}

fn scenarios() -> impl Strategy<Value = Scenario> {
    // An echo takes at least a nanosecond, so it never comes before its
    // datagram is sent.
    let delay = prop_oneof![
        3 => 1..3 * INTERVAL,
        // Up to just before the datagram 16 places later is sent.
        1 => 1..HISTORY as u64 * INTERVAL,
    ];
    let damage = prop_oneof![
        8 => Just(Damage::None),
        1 => Just(Damage::Bytes),
        1 => Just(Damage::Header),
    ];
    let echo = (delay, damage).prop_map(|(delay, damage)| Echo { delay, damage });
    (
        prop_oneof![Just(4u32), Just(64u32)],
        INTERVAL / 2..=WINDOW as u64 * INTERVAL,
        prop::collection::vec(prop::collection::vec(echo, 0..=3), 1..80),
    )
        .prop_map(|(bits, timeout, echoes)| Scenario {
            bits,
            timeout,
            echoes,
        })
}

/// What happens, in the order it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// At equal times, echoes are taken before sends.
    Arrive {
        at: u64,
        seq: u64,
        copy: usize,
    },
    Send {
        at: u64,
        seq: u64,
    },
}

impl Step {
    fn key(&self) -> (u64, u8, u64, usize) {
        match *self {
            Step::Arrive { at, seq, copy } => (at, 0, seq, copy),
            Step::Send { at, seq } => (at, 1, seq, 0),
        }
    }
}

/// The counts, round trips and jitter a plain model expects.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    counts: Counts,
    rtts: Vec<u64>,
    jitter_sum: u64,
    jitter_pairs: u64,
}

fn schedule(scenario: &Scenario) -> Vec<Step> {
    let mut steps = Vec::new();
    for (index, echoes) in scenario.echoes.iter().enumerate() {
        let seq = index as u64 + 1;
        let sent = seq * INTERVAL;
        steps.push(Step::Send { at: sent, seq });
        for (copy, echo) in echoes.iter().enumerate() {
            steps.push(Step::Arrive {
                at: sent + echo.delay,
                seq,
                copy,
            });
        }
    }
    steps.sort_by_key(Step::key);
    steps
}

/// Remembers every datagram; follows the definitions in the ledger's docs.
fn model(scenario: &Scenario, steps: &[Step]) -> Expected {
    let count = scenario.echoes.len();
    let mut expected = Expected::default();
    let mut answered = vec![false; count + 1];
    let mut answered_in_time = vec![false; count + 1];
    let mut rtt: Vec<Option<u64>> = vec![None; count + 2];
    let mut highest_echoed = 0;
    for step in steps {
        let Step::Arrive { seq, copy, .. } = *step else {
            continue;
        };
        let echo = scenario.echoes[seq as usize - 1][copy];
        let counts = &mut expected.counts;
        let in_time = echo.delay < scenario.timeout;
        match echo.damage {
            Damage::Header => counts.corrupted += 1,
            Damage::Bytes => {
                counts.corrupted += 1;
                if !answered[seq as usize] && in_time {
                    answered[seq as usize] = true;
                    answered_in_time[seq as usize] = true;
                }
            }
            Damage::None if answered[seq as usize] => counts.duplicated += 1,
            Damage::None if !in_time => {
                counts.late += 1;
                answered[seq as usize] = true;
            }
            Damage::None => {
                counts.echoed += 1;
                answered[seq as usize] = true;
                answered_in_time[seq as usize] = true;
                if seq < highest_echoed {
                    counts.reordered += 1;
                }
                highest_echoed = highest_echoed.max(seq);
                rtt[seq as usize] = Some(echo.delay);
                expected.rtts.push(echo.delay);
            }
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
    let steps = schedule(scenario);
    let expected = model(scenario, &steps);
    let timeout = Duration::from_nanos(scenario.timeout);
    let mut ledger = Ledger::new(WINDOW, HISTORY, timeout);
    let mask = if scenario.bits == 64 {
        u64::MAX
    } else {
        (1 << scenario.bits) - 1
    };
    let mut lost = Vec::new();
    for step in &steps {
        match *step {
            Step::Send { at, seq } => {
                ledger.expire(Duration::from_nanos(at), |seq| lost.push(seq));
                prop_assert!(ledger.can_send(), "datagram {seq}: the window is full");
                prop_assert_eq!(ledger.sent(Duration::from_nanos(at)), seq);
            }
            Step::Arrive { at, seq, copy } => {
                let now = Duration::from_nanos(at);
                ledger.expire(now, |seq| lost.push(seq));
                let echo = scenario.echoes[seq as usize - 1][copy];
                let named = match echo.damage {
                    Damage::Header => None,
                    Damage::None | Damage::Bytes => ledger.locate(seq & mask, scenario.bits),
                };
                if echo.damage != Damage::Header {
                    prop_assert_eq!(named, Some(seq), "the echo names its datagram");
                }
                ledger.echo(named, echo.damage == Damage::None, now);
            }
        }
    }
    ledger.expire_all(|seq| lost.push(seq));
    prop_assert!(ledger.is_idle());
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
