//! The async load generator (`--load tokio`, issue 16): the same ping-pong
//! as [`crate::load::Load`], written the way many users' clients are, one
//! tokio task per connection on a multi-thread runtime (epoll underneath).
//!
//! It differs from the default load in how its threads wait: a task's
//! `read` parks it, and the runtime thread that ran it sleeps in
//! `epoll_wait` once no task is ready; the default load's threads sleep in
//! their own `epoll_wait` (many connections) or in a blocking `read` (one
//! connection, case 1). The server's busy polling catches the next message
//! only if it is still spinning when that message comes, so a client's
//! wake-up path changes what spinning buys.
//!
//! Each connection writes one message, reads its echo whole and checks it
//! byte for byte, then the next. Reads and writes run concurrently on the
//! two halves of the socket, so a message larger than the socket buffers
//! cannot deadlock. Runtime threads are named `load-tokio`, so the bench
//! charges their CPU to the load.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::load::{STEP_LIMIT, Spec, Totals};

/// Messages up to this size are written whole, then read back: the socket
/// buffers hold them, as the canonical tokio client assumes.
const SEQUENTIAL_MAX: usize = 4 * 1024;

/// The most round trips one connection times in a run.
const MAX_TIMED_PER_CONN: usize = 1 << 20;

/// What every task adds to and the caller reads.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    timing: AtomicBool,
    echoes: AtomicU64,
    bytes: AtomicU64,
    /// Tasks that ended before `stop`: they failed.
    ended: AtomicUsize,
}

/// A running async load.
pub struct TokioLoad {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Duration>, String>>>,
}

impl TokioLoad {
    /// Starts one task per stream on a runtime of `threads` threads; each
    /// times its round trips while [`TokioLoad::time_round_trips`] is on.
    ///
    /// # Errors
    /// `spec.window` is not 1 (ping-pong only), or runtime or socket set-up
    /// failures.
    pub fn start(streams: Vec<TcpStream>, spec: Spec, threads: usize) -> Result<TokioLoad, String> {
        if spec.window != 1 {
            return Err(format!(
                "the tokio load does ping-pong only, not {} in flight",
                spec.window
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("load-tokio")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("load runtime: {e}"))?;
        let shared = Arc::new(Shared::default());
        let mut tasks = Vec::with_capacity(streams.len());
        for (i, stream) in streams.into_iter().enumerate() {
            stream
                .set_nonblocking(true)
                .map_err(|e| format!("nonblocking: {e}"))?;
            let stream = {
                let _in_runtime = runtime.enter();
                tokio::net::TcpStream::from_std(stream)
                    .map_err(|e| format!("connection {i}: {e}"))?
            };
            let shared = Arc::clone(&shared);
            tasks.push(runtime.spawn(async move {
                let outcome = ping_pong(stream, spec.message_len, &shared)
                    .await
                    .map_err(|e| format!("connection {i}: {e}"));
                if !shared.stop.load(Ordering::Relaxed) {
                    shared.ended.fetch_add(1, Ordering::Relaxed);
                }
                outcome
            }));
        }
        Ok(TokioLoad {
            runtime,
            shared,
            tasks,
        })
    }

    /// What has been echoed so far.
    pub fn totals(&self) -> Totals {
        Totals {
            echoes: self.shared.echoes.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    /// True once any task has ended early (it failed).
    pub fn any_finished(&self) -> bool {
        self.shared.ended.load(Ordering::Relaxed) > 0
    }

    /// Turns the timing of round trips on or off.
    pub fn time_round_trips(&self, on: bool) {
        self.shared.timing.store(on, Ordering::Relaxed);
    }

    /// Stops every task, closes every connection and reports the first
    /// failure; else the round trips timed, unsorted.
    ///
    /// # Errors
    /// A task's failure, or a task not done within [`STEP_LIMIT`].
    pub fn stop(self) -> Result<Vec<Duration>, String> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let TokioLoad { runtime, tasks, .. } = self;
        let joined = runtime.block_on(async {
            let mut times = Vec::new();
            let mut first_failure = Ok(());
            for task in tasks {
                let outcome = match tokio::time::timeout(STEP_LIMIT, task).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(e)) => Err(format!("a load task failed: {e}")),
                    Err(_) => Err("a load task did not stop in time".to_string()),
                };
                match outcome {
                    Ok(taken) => times.extend(taken),
                    Err(e) if first_failure.is_ok() => first_failure = Err(e),
                    Err(_) => {}
                }
            }
            first_failure.map(|()| times)
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        joined
    }
}

/// One connection: write a message, read its echo, check it, until stopped.
async fn ping_pong(
    mut stream: tokio::net::TcpStream,
    message_len: usize,
    shared: &Shared,
) -> Result<Vec<Duration>, String> {
    let mut message: Vec<u8> = (0..message_len).map(|i| (i * 7 + 13) as u8).collect();
    let mut echo = vec![0u8; message_len];
    let mut times = Vec::new();
    let mut round: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        // A fresh leading counter per round, so a stale echo cannot pass.
        let stamp = round.to_le_bytes();
        let stamp_len = stamp.len().min(message_len);
        message[..stamp_len].copy_from_slice(&stamp[..stamp_len]);
        let timed = shared.timing.load(Ordering::Relaxed) && times.len() < MAX_TIMED_PER_CONN;
        let begun = Instant::now();
        let (written, read) = if message_len <= SEQUENTIAL_MAX {
            let written = stream.write_all(&message).await;
            let read = match written {
                Ok(()) => stream.read_exact(&mut echo).await.map(drop),
                Err(_) => Ok(()),
            };
            (written, read)
        } else {
            both(&mut stream, &message, &mut echo).await
        };
        written.map_err(|e| format!("round trip {round}: write: {e}"))?;
        read.map_err(|e| format!("round trip {round}: read: {e}"))?;
        if timed && shared.timing.load(Ordering::Relaxed) {
            times.push(begun.elapsed());
        }
        if echo != message {
            let at = echo.iter().zip(&message).position(|(a, b)| a != b);
            return Err(format!(
                "round trip {round}: echo differs from message at byte {at:?}"
            ));
        }
        shared.echoes.fetch_add(1, Ordering::Relaxed);
        shared
            .bytes
            .fetch_add(message_len as u64, Ordering::Relaxed);
        round += 1;
    }
    Ok(times)
}

/// Writes `message` and reads its echo into `echo` at the same time, so a
/// server that echoes while we still write cannot fill both directions'
/// buffers and deadlock.
async fn both(
    stream: &mut tokio::net::TcpStream,
    message: &[u8],
    echo: &mut [u8],
) -> (std::io::Result<()>, std::io::Result<()>) {
    use std::future::Future;
    use std::task::Poll;
    let (mut reader, mut writer) = stream.split();
    let mut write = std::pin::pin!(writer.write_all(message));
    let mut read = std::pin::pin!(reader.read_exact(echo));
    let (mut written, mut got) = (None, None);
    std::future::poll_fn(|cx| {
        if written.is_none()
            && let Poll::Ready(outcome) = write.as_mut().poll(cx)
        {
            written = Some(outcome);
        }
        if got.is_none()
            && let Poll::Ready(outcome) = read.as_mut().poll(cx)
        {
            got = Some(outcome.map(drop));
        }
        match (&written, &got) {
            (Some(Err(_)), _) | (Some(_), Some(_)) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    })
    .await;
    (written.unwrap_or(Ok(())), got.unwrap_or(Ok(())))
}
