//! The shutdown controller, beside the flow acceptor → channel → worker.
//!
//! A [`ShutdownHandle`] is what a signal handler, a test or an embedder holds.
//! [`ShutdownHandle::shutdown`] fixes the drain deadline and wakes the
//! acceptor; the acceptor goes on accepting through the drain delay (if one
//! is set), then closes the listener and drops its channel senders, and each
//! worker, seeing its channel disconnected, drains its connections. Nothing
//! polls a flag on a timer: every step is an ownership change, a wake-up or
//! a timer the acceptor sets for the end of the delay.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::Waker;

use crate::log::Logger;

/// No worker has failed.
const NO_FAILURE: usize = usize::MAX;

/// Starts the server's graceful shutdown. Cheap to clone; every clone
/// controls the same server.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    controller: Arc<Controller>,
}

#[derive(Debug)]
struct Controller {
    /// Set once, by the first request: when it came.
    requested: OnceLock<Instant>,
    /// Kept in step with `requested`, for those who wait for it.
    requested_signal: (Mutex<bool>, Condvar),
    /// How long the acceptor goes on accepting after the request.
    drain_delay: Duration,
    timeout: Duration,
    acceptor: Arc<Waker>,
    failed_worker: AtomicUsize,
    logger: Logger,
}

impl ShutdownHandle {
    pub(crate) fn new(
        acceptor: Arc<Waker>,
        drain_delay: Duration,
        timeout: Duration,
        logger: Logger,
    ) -> Self {
        ShutdownHandle {
            controller: Arc::new(Controller {
                requested: OnceLock::new(),
                requested_signal: (Mutex::new(false), Condvar::new()),
                drain_delay,
                timeout,
                acceptor,
                failed_worker: AtomicUsize::new(NO_FAILURE),
                logger,
            }),
        }
    }

    /// Starts the shutdown: after the drain delay, stop accepting, echo
    /// what has arrived, then close. Returns at once;
    /// [`Server::join`](crate::server::Server::join) waits for the end.
    /// Calling it again does nothing.
    pub fn shutdown(&self) {
        if self.controller.requested.set(Instant::now()).is_err() {
            return;
        }
        let (requested, changed) = &self.controller.requested_signal;
        *requested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        changed.notify_all();
        if let Err(err) = self.controller.acceptor.wake() {
            self.controller.logger.error(format_args!(
                "cannot wake the acceptor to shut down: {}",
                crate::error::io_cause(&err)
            ));
        }
    }

    /// Whether a shutdown has been requested (the server may still be
    /// accepting, through the drain delay).
    pub fn is_shutting_down(&self) -> bool {
        self.controller.requested.get().is_some()
    }

    /// Waits up to `limit` for a shutdown to be requested; true if it was.
    pub fn wait_requested(&self, limit: Duration) -> bool {
        let (requested, changed) = &self.controller.requested_signal;
        let guard = requested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = changed
            .wait_timeout_while(guard, limit, |requested| !*requested)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }

    /// Until when the acceptor goes on accepting, once a shutdown has been
    /// requested: the end of the drain delay.
    pub(crate) fn accepting_until(&self) -> Option<Instant> {
        let requested = *self.controller.requested.get()?;
        Some(crate::deadline::deadline_after(
            requested,
            self.controller.drain_delay,
        ))
    }

    /// When the drain must end, once a shutdown has been requested: the
    /// drain delay and then the shutdown timeout after the request.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let accepting_until = self.accepting_until()?;
        Some(crate::deadline::deadline_after(
            accepting_until,
            self.controller.timeout,
        ))
    }

    /// The configured drain delay.
    pub(crate) fn drain_delay(&self) -> Duration {
        self.controller.drain_delay
    }

    /// The configured drain time.
    pub(crate) fn timeout(&self) -> Duration {
        self.controller.timeout
    }

    /// Records that worker `index` died and shuts the rest down.
    pub(crate) fn worker_panicked(&self, index: usize) {
        // Only the first failure is reported; later ones change nothing.
        let _ = self.controller.failed_worker.compare_exchange(
            NO_FAILURE,
            index,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.controller
            .logger
            .error(format_args!("worker {index} died; shutting down"));
        self.shutdown();
    }

    /// The first worker that died, if any.
    pub(crate) fn failed_worker(&self) -> Option<usize> {
        match self.controller.failed_worker.load(Ordering::Acquire) {
            NO_FAILURE => None,
            index => Some(index),
        }
    }
}
