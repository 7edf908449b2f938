//! Case 7's scraper: a thread of the bench process (`scraper`, so its CPU
//! is charged neither to the server nor to the load) that does what
//! Prometheus does to our metrics endpoint, `GET /metrics` at a fixed rate,
//! one connection per scrape, while the echo load runs beside it.
//!
//! Every answer is read whole and must start with `HTTP/1.1 200`; a scrape
//! that fails or is slower than [`SCRAPE_LIMIT`] fails the run, so a
//! scrape that never happened cannot pass for a cheap one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The longest one scrape (connect, request, whole answer) may take.
const SCRAPE_LIMIT: Duration = Duration::from_secs(2);

/// The most bytes read of one answer; our exposition is a few KiB.
const MAX_ANSWER: u64 = 1 << 20;

/// The most scrapes one scraper makes, whatever the window's length.
const MAX_SCRAPES: u64 = 100_000;

/// What a scraper did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scrapes {
    /// Answers read whole, each a 200.
    pub count: u64,
    /// Bytes of those answers, headers included.
    pub bytes: u64,
    /// The slowest scrape, from connect to the answer's end.
    pub slowest: Duration,
}

/// A running scraper. Dropping it without [`Scraper::stop`] stops it too
/// (its channel disconnects), without waiting.
pub struct Scraper {
    /// Dropping it ends the thread: nothing is ever sent.
    stop: Sender<()>,
    thread: JoinHandle<Result<Scrapes, String>>,
}

impl Scraper {
    /// Starts scraping `http://addr/metrics` every `interval`, the first
    /// at once. A scrape late by more than a whole interval is not made up.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(addr: SocketAddr, interval: Duration) -> Result<Scraper, String> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("scraper".into())
            .spawn(move || {
                let mut done = Scrapes::default();
                let mut next = Instant::now();
                while done.count < MAX_SCRAPES {
                    match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        // The owner dropped its sender: stop.
                        Err(RecvTimeoutError::Disconnected) | Ok(()) => break,
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    let begun = Instant::now();
                    let bytes = scrape(addr).map_err(|e| {
                        format!("scrape {} of http://{addr}/metrics: {e}", done.count + 1)
                    })?;
                    done.count += 1;
                    done.bytes += bytes;
                    done.slowest = done.slowest.max(begun.elapsed());
                    next = (next + interval).max(Instant::now());
                }
                Ok(done)
            })
            .map_err(|e| format!("spawn the scraper: {e}"))?;
        Ok(Scraper { stop, thread })
    }

    /// Stops the scraper and waits for it: at most one scrape's
    /// [`SCRAPE_LIMIT`].
    ///
    /// # Errors
    /// A scrape failed: no connection, a timeout, or not a 200.
    pub fn stop(self) -> Result<Scrapes, String> {
        drop(self.stop);
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the scraper panicked".to_string()))
    }
}

/// One `GET /metrics` on a fresh connection, read to its end; the answer's
/// length.
fn scrape(addr: SocketAddr) -> Result<u64, String> {
    let begun = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&addr, SCRAPE_LIMIT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(SCRAPE_LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(SCRAPE_LIMIT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(16 * 1024);
    (&mut stream)
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&answer[..answer.len().min(80)]).into_owned();
        return Err(format!("answer starts {head:?}, not HTTP/1.1 200"));
    }
    // Each read has its own timeout; the whole scrape has this one.
    if begun.elapsed() > SCRAPE_LIMIT {
        return Err(format!("took {:?}, over {SCRAPE_LIMIT:?}", begun.elapsed()));
    }
    Ok(answer.len() as u64)
}
