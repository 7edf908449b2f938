//! What a stop signal means, shared by both binaries: the first one stops
//! gracefully (the server drains, the client prints its summary), and a
//! later one exits at once. A repeat soon after the first is the same
//! request, not a second one: `timeout(1)` signals the process and then its
//! process group, and the two signals can arrive apart.

use std::time::{Duration, Instant};

/// Signals this close after the first are the same stop request.
pub const SAME_REQUEST: Duration = Duration::from_millis(500);

/// What a signal that just arrived asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The first: stop gracefully.
    Stop,
    /// A repeat of the first request: nothing more to do.
    Repeat,
    /// A later one: exit at once.
    ExitNow,
}

/// Remembers when the first stop signal came.
#[derive(Debug, Default)]
pub struct StopSignals {
    first: Option<Instant>,
}

impl StopSignals {
    /// Classifies a signal arriving now.
    pub fn arrived(&mut self) -> Meaning {
        let now = Instant::now();
        match self.first {
            None => {
                self.first = Some(now);
                Meaning::Stop
            }
            Some(first) if now.duration_since(first) < SAME_REQUEST => Meaning::Repeat,
            Some(_) => Meaning::ExitNow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_stops_a_quick_repeat_is_the_same_and_a_later_one_exits() {
        let mut signals = StopSignals::default();
        assert_eq!(signals.arrived(), Meaning::Stop);
        assert_eq!(signals.arrived(), Meaning::Repeat);
        std::thread::sleep(SAME_REQUEST);
        assert_eq!(signals.arrived(), Meaning::ExitNow);
    }
}
