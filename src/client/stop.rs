//! The client's stop signal: how Ctrl-C (or a test) tells every connection
//! thread to stop sending. Stopping drops the only sender of a channel, so
//! every receiver wakes at once, including one pausing for `--interval` or
//! waiting for the next line of input. No flag is polled on a timer.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Tells a running [`run`](super::run) or [`run_lines`](super::run_lines) to
/// stop sending. Clones share one signal.
#[derive(Debug, Clone)]
pub struct StopHandle {
    /// `None` once stopped; dropping the sender is the signal.
    sender: Arc<Mutex<Option<Sender<Infallible>>>>,
    receiver: Receiver<Infallible>,
    /// Set just before the sender is dropped: [`is_stopped`](Self::is_stopped)
    /// is asked on every echo of the event loops, and a load is cheaper
    /// than a look at the channel. Waiting is still done on the channel.
    stopped: Arc<AtomicBool>,
}

impl StopHandle {
    /// A handle that has not been stopped.
    #[must_use]
    pub fn new() -> Self {
        let (sender, receiver) = crossbeam_channel::bounded(0);
        StopHandle {
            sender: Arc::new(Mutex::new(Some(sender))),
            receiver,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Stops sending: each connection sends no more, and an echo still out
    /// may stay silent for about twice the connection's p99 round trip (1 s
    /// for a first echo) before it counts as a failure
    /// ([`FailureKind::Stopped`](super::FailureKind::Stopped)). Calling it
    /// again does nothing.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // A panic elsewhere while holding the lock cannot leave the Option
        // half-written, so the poisoned value is still good.
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(sender);
    }

    /// True once [`stop`](Self::stop) has been called on any clone.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Waits `pause`, or less if stopped meanwhile. Returns true if stopped.
    pub(crate) fn sleep(&self, pause: Duration) -> bool {
        match self.receiver.recv_timeout(pause) {
            Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Ok(never) => match never {},
        }
    }

    /// The receiver that disconnects on stop, for `select!`.
    pub(crate) fn receiver(&self) -> &Receiver<Infallible> {
        &self.receiver
    }
}

impl Default for StopHandle {
    fn default() -> Self {
        Self::new()
    }
}
