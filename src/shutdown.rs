//! The shutdown controller, beside the flow acceptor → channel → worker.
//!
//! A [`ShutdownHandle`] is what a signal handler, a test or an embedder holds.
//! [`ShutdownHandle::shutdown`] fixes the drain deadline and wakes the
//! acceptor; the acceptor closes the listener and drops its channel senders,
//! and each worker, seeing its channel disconnected, drains its connections.
//! Nothing polls a flag on a timer: every step is an ownership change or a
//! wake-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// Set once, by the first request: when the drain must end.
    deadline: OnceLock<Instant>,
    timeout: Duration,
    acceptor: Arc<Waker>,
    failed_worker: AtomicUsize,
    logger: Logger,
}

impl ShutdownHandle {
    pub(crate) fn new(acceptor: Arc<Waker>, timeout: Duration, logger: Logger) -> Self {
        ShutdownHandle {
            controller: Arc::new(Controller {
                deadline: OnceLock::new(),
                timeout,
                acceptor,
                failed_worker: AtomicUsize::new(NO_FAILURE),
                logger,
            }),
        }
    }

    /// Starts the drain: stop accepting, echo what has arrived, then close.
    /// Returns at once; [`Server::join`](crate::server::Server::join) waits
    /// for the end. Calling it again does nothing.
    pub fn shutdown(&self) {
        let deadline = crate::config::deadline_after(Instant::now(), self.controller.timeout);
        if self.controller.deadline.set(deadline).is_err() {
            return;
        }
        if let Err(err) = self.controller.acceptor.wake() {
            self.controller.logger.error(format_args!(
                "cannot wake the acceptor to shut down: {}",
                crate::error::io_cause(&err)
            ));
        }
    }

    /// Whether a shutdown has been requested.
    pub fn is_shutting_down(&self) -> bool {
        self.controller.deadline.get().is_some()
    }

    /// When the drain must end, once a shutdown has been requested.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.controller.deadline.get().copied()
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
