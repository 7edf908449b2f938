//! The io_uring floor peer: the least work an io_uring echo server can do
//! per echo, beside the epoll floor of [`crate::floor`] in case 2 (issue 16's
//! go/no-go for an io_uring backend).
//!
//! Per worker thread one ring, created on that thread (single issuer, task
//! work deferred to the worker's own `io_uring_enter`), and one provided
//! buffer ring of [`BUFFERS`] buffers of [`BUFFER_LEN`] bytes. Each
//! connection has one multishot `recv` armed for its life: the kernel picks
//! a buffer for each arrival and posts a completion, with no submission per
//! echo. The echo is one `send` submitted straight from that buffer, which
//! goes back to the buffer ring when the send completes. Each loop pass is
//! one `io_uring_enter` that submits everything queued and waits for at least
//! one completion; then every completion present is reaped, and the buffers
//! freed in the pass are published with one store of the ring's tail.
//!
//! As in the epoll floor, the acceptor places each connection on the worker
//! with the fewest (ties at random) or in turn. It cannot touch a worker's
//! ring (single issuer), so it queues the stream and writes the worker's
//! eventfd, on which the worker always has a `read` pending.
//!
//! Like the epoll floor it is correct only while every `send` takes the whole
//! message (case 2's 64 B ping-pong); a short one closes the connection, so
//! the load sees a failure rather than a wrong echo.
//!
//! This file is the bench's only home for io_uring's `unsafe`: buffers and
//! the buffer ring are shared with the kernel, and each block says why its
//! memory stays valid for as long as the kernel may use it.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::floor::{Placement, accept_placed};

/// Thread-name prefix of the io_uring floor peer. The kernel's io_uring
/// worker threads of this process (`iou-wrk-*`, should any be started) are
/// charged to it too: see [`owns_thread`].
pub const URING_THREADS: &str = "peer-uring";

/// Buffers in each worker's provided-buffer ring (a power of two): more
/// than the connections a worker holds at the 1,000-connection point, each
/// of which has at most one echo in flight.
const BUFFERS: u16 = 2048;
/// Bytes per provided buffer: room for any message of case 2.
const BUFFER_LEN: usize = 2048;
/// The buffer group id of each worker's buffer ring.
const GROUP: u16 = 0;
/// Submission queue entries per ring; the completion queue gets four times
/// as many, so a pass's completions never overflow it.
const RING_ENTRIES: u32 = 1024;

/// What a completion is for, in the low bits of its user data; the rest
/// holds the connection's slot and generation and, for a send, the buffer.
const OP_RECV: u64 = 0;
const OP_SEND: u64 = 1;
const OP_WAKE: u64 = 2;

/// Whether a thread of this process named `comm` belongs to the peer.
pub fn owns_thread(comm: &str) -> bool {
    comm.starts_with(URING_THREADS) || comm.starts_with("iou-wrk") || comm.starts_with("iou-sqp")
}

/// Why io_uring cannot be used here, or `Ok` if it can: the kernel must be
/// 6.0 or later (multishot `recv`), not have io_uring disabled, and let
/// this process create a ring with a provided-buffer ring (seccomp
/// profiles such as Docker's default refuse `io_uring_setup`).
pub fn available() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (6, 0) {
        return Err(format!(
            "kernel {} has no multishot recv (needs 6.0)",
            release.trim()
        ));
    }
    if let Ok(disabled) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && disabled.trim() != "0"
    {
        return Err(format!("kernel.io_uring_disabled = {}", disabled.trim()));
    }
    let set_up = || {
        let ring = Ring::new(8)?;
        let buffers = BufferRing::new(&ring.ring, 8, 64)?;
        // The ring goes first: the buffers must outlive its use of them.
        drop(ring);
        drop(buffers);
        Ok::<(), io::Error>(())
    };
    set_up().map_err(|e| format!("cannot set up a ring: {e}"))
}

/// What the acceptor and one worker share.
struct WorkerShare {
    /// Written by the acceptor to wake the worker.
    wake: OwnedFd,
    /// Streams placed on this worker and not yet taken.
    incoming: Mutex<Vec<TcpStream>>,
    count: AtomicUsize,
    stopping: AtomicBool,
}

impl WorkerShare {
    fn new() -> io::Result<WorkerShare> {
        // SAFETY: a plain syscall; its result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(WorkerShare {
            // SAFETY: `fd` was just returned open and nothing else owns it.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            incoming: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an open eventfd. A
        // failed write could only mean the counter is full: already woken.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8);
        }
    }
}

/// The running peer; dropping it stops and joins every thread.
pub struct UringFloorPeer {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    shares: Vec<Arc<WorkerShare>>,
    threads: Vec<JoinHandle<()>>,
}

impl UringFloorPeer {
    /// Binds 127.0.0.1 port 0 and starts `workers` worker threads, each
    /// with its ring, and an acceptor that places connections by
    /// `placement`.
    ///
    /// # Errors
    /// Bind, eventfd, ring set-up or thread spawn failures.
    pub fn start(workers: usize, placement: Placement) -> io::Result<UringFloorPeer> {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0")?);
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut peer = UringFloorPeer {
            addr,
            listener: Arc::clone(&listener),
            stopping: Arc::clone(&stopping),
            shares: Vec::new(),
            threads: Vec::new(),
        };
        for index in 0..workers.max(1) {
            let share = Arc::new(WorkerShare::new()?);
            peer.shares.push(Arc::clone(&share));
            // The ring is made on the worker's own thread (single issuer);
            // the worker reports whether that worked before serving.
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            peer.threads.push(
                thread::Builder::new()
                    .name(format!("{URING_THREADS}-w{index}"))
                    .spawn(move || match Worker::new(&share) {
                        Ok(mut worker) => {
                            // The receiver waits for this below.
                            let _ = ready_tx.send(Ok(()));
                            worker.serve(&share);
                        }
                        Err(e) => {
                            // As above.
                            let _ = ready_tx.send(Err(e));
                        }
                    })?,
            );
            ready_rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("worker thread died")))?;
        }
        let shares = peer.shares.clone();
        peer.threads.push(
            thread::Builder::new()
                .name(format!("{URING_THREADS}-a"))
                .spawn(move || accept(&listener, &shares, placement, &stopping))?,
        );
        Ok(peer)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UringFloorPeer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: a plain syscall on a descriptor the Arc keeps open; on
        // Linux it ends an `accept` blocked on the listener (with EINVAL).
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD);
        }
        for share in &self.shares {
            share.stopping.store(true, Ordering::SeqCst);
            share.wake();
        }
        for thread in self.threads.drain(..) {
            // A thread that panicked has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// Accepts until stopped, queueing each connection for a worker.
fn accept(
    listener: &TcpListener,
    shares: &[Arc<WorkerShare>],
    placement: Placement,
    stopping: &AtomicBool,
) {
    let load = |share: &Arc<WorkerShare>| share.count.load(Ordering::Relaxed);
    accept_placed(
        listener,
        shares,
        placement,
        stopping,
        load,
        |share, stream| {
            share.count.fetch_add(1, Ordering::Relaxed);
            share
                .incoming
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(stream);
            share.wake();
        },
    );
}

/// A ring made on the current thread.
struct Ring {
    ring: IoUring,
}

impl Ring {
    fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)?;
        Ok(Ring { ring })
    }
}

/// A provided-buffer ring and the buffers it hands out, registered with
/// one ring as group [`GROUP`].
struct BufferRing {
    /// Page-aligned array of `entries` ring entries shared with the kernel;
    /// the tail is the last field of entry 0.
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    count: u16,
    /// Where the next returned buffer goes (the tail the kernel will see
    /// after the next [`BufferRing::publish`]).
    tail: u16,
    buffers: Box<[u8]>,
    buffer_len: usize,
}

impl BufferRing {
    /// Allocates `count` buffers of `buffer_len` bytes, registers them with
    /// `ring` and hands them all to the kernel.
    fn new(ring: &IoUring, count: u16, buffer_len: usize) -> io::Result<BufferRing> {
        assert!(
            count.is_power_of_two(),
            "a buffer ring's size is a power of two"
        );
        let layout = std::alloc::Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (count >= 1 entries of 16 B).
        let entries = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut buffers = BufferRing {
            entries,
            layout,
            count,
            tail: 0,
            buffers: vec![0u8; usize::from(count) * buffer_len].into_boxed_slice(),
            buffer_len,
        };
        // SAFETY: `entries` points to `count` zeroed, page-aligned entries,
        // and `buffers.buffers` to the memory they will point into; both are
        // owned by `buffers` and freed only in its Drop, after the ring that
        // uses them is gone (Worker declares its ring first, so drops it
        // first; `available` drops the ring explicitly first). Dropping a
        // ring cancels every request still pending on it.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, GROUP, 0)?;
        }
        for bid in 0..count {
            buffers.give_back(bid);
        }
        buffers.publish();
        Ok(buffers)
    }

    /// Queues buffer `bid` for the kernel; it sees it at the next
    /// [`BufferRing::publish`].
    fn give_back(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.buffer(bid).as_ptr() as u64;
        // SAFETY: `index` < `count`, so the entry is inside the allocation;
        // the kernel reads entries only below the published tail, and this
        // one is at or above it, so only we touch it now.
        let entry = unsafe { &mut *self.entries.add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buffer_len as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail is a u16 inside entry 0, which lives as long as
        // `self`, is 2-byte aligned, and is only ever accessed atomically by
        // the kernel; the release store orders the entry writes before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Buffer `bid`'s bytes.
    fn buffer(&self, bid: u16) -> &[u8] {
        let start = usize::from(bid) * self.buffer_len;
        &self.buffers[start..start + self.buffer_len]
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed only here.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) }
    }
}

/// One open connection.
struct Conn {
    stream: TcpStream,
    /// Told to close (shut down); its slot is freed when the multishot
    /// `recv` posts its last completion.
    closing: bool,
}

/// One worker: its ring, its buffers and its connections by slot.
struct Worker {
    // Field order is drop order: the ring goes first, so the kernel is done
    // with the buffers and the wake-up word before they are freed.
    ring: IoUring,
    buffers: BufferRing,
    /// The eventfd's counter is read into here; boxed so its address is
    /// stable while a `read` is pending.
    wake_word: Box<u64>,
    conns: Vec<Option<Conn>>,
    /// Each slot's generation, bumped on reuse, so that a late completion
    /// of a closed connection cannot touch the next one in its slot.
    generations: Vec<u32>,
    free: Vec<usize>,
    /// Entries that did not fit the submission queue this pass.
    overflow: Vec<squeue::Entry>,
    /// Bytes each buffer's send was asked to take.
    sent_len: Vec<u32>,
}

/// User data of a completion: op, slot, generation and buffer id.
fn user_data(op: u64, slot: usize, generation: u32, bid: u16) -> u64 {
    op | (u64::from(bid) << 2) | ((slot as u64 & 0x3f_ffff) << 18) | (u64::from(generation) << 40)
}

fn decode(data: u64) -> (u64, usize, u32, u16) {
    (
        data & 3,
        ((data >> 18) & 0x3f_ffff) as usize,
        (data >> 40) as u32,
        ((data >> 2) & 0xffff) as u16,
    )
}

impl Worker {
    fn new(share: &WorkerShare) -> io::Result<Worker> {
        let Ring { ring } = Ring::new(RING_ENTRIES)?;
        let buffers = BufferRing::new(&ring, BUFFERS, BUFFER_LEN)?;
        let mut worker = Worker {
            ring,
            buffers,
            wake_word: Box::new(0),
            conns: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            overflow: Vec::new(),
            sent_len: vec![0; usize::from(BUFFERS)],
        };
        worker.arm_wake(share);
        Ok(worker)
    }

    /// Queues a `read` of the wake-up eventfd.
    fn arm_wake(&mut self, share: &WorkerShare) {
        let entry = opcode::Read::new(
            types::Fd(share.wake.as_raw_fd()),
            (&raw mut *self.wake_word).cast(),
            8,
        )
        .build()
        .user_data(OP_WAKE);
        self.push(entry);
    }

    /// Queues `entry` for the next `io_uring_enter`.
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every entry built here points only at memory that outlives
        // its operation: the wake-up word (boxed, freed after the ring), a
        // buffer of the buffer ring (same), or none (multishot recv).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.overflow.push(entry);
        }
    }

    /// Takes the streams the acceptor queued and arms a multishot `recv`
    /// for each.
    fn take_incoming(&mut self, share: &WorkerShare) {
        let incoming = std::mem::take(
            &mut *share
                .incoming
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for stream in incoming {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.generations.push(0);
                self.conns.len() - 1
            });
            self.generations[slot] = self.generations[slot].wrapping_add(1) & 0xff_ffff;
            let entry = opcode::RecvMulti::new(types::Fd(stream.as_raw_fd()), GROUP)
                .build()
                .user_data(user_data(OP_RECV, slot, self.generations[slot], 0));
            self.conns[slot] = Some(Conn {
                stream,
                closing: false,
            });
            self.push(entry);
        }
    }

    /// Starts closing the connection in `slot`: shutting it down ends its
    /// multishot `recv`, whose last completion frees the slot.
    fn close(&mut self, slot: usize) {
        if let Some(conn) = self.conns[slot].as_mut()
            && !conn.closing
        {
            conn.closing = true;
            // Already shut down by the peer is fine too.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// One pass per `io_uring_enter`, until stopped.
    fn serve(&mut self, share: &WorkerShare) {
        let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(RING_ENTRIES as usize * 4);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal, or the completion queue is full until reaped.
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                // Retrying would spin; the load sees its connections fail.
                Err(_) => return,
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            let mut returned = false;
            for &(data, result, flags) in &completions {
                let (op, slot, generation, send_bid) = decode(data);
                match op {
                    OP_WAKE => {
                        if share.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        self.take_incoming(share);
                        self.arm_wake(share);
                    }
                    OP_SEND => {
                        self.buffers.give_back(send_bid);
                        returned = true;
                        let current = self.generations.get(slot) == Some(&generation);
                        // A short send is a failure here (see the module doc).
                        if current && result != self.sent_len[usize::from(send_bid)] as i32 {
                            self.close(slot);
                        }
                    }
                    _ => {
                        let current = self.generations.get(slot) == Some(&generation);
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            let open = self.conns[slot].as_ref().is_some_and(|c| !c.closing);
                            if current && result > 0 && open {
                                self.send_from(slot, generation, bid, result as usize);
                            } else {
                                self.buffers.give_back(bid);
                                returned = true;
                            }
                        }
                        if !current {
                            continue;
                        }
                        if result <= 0 && result != -libc::ENOBUFS {
                            // The peer closed (0) or the socket failed.
                            self.close(slot);
                        }
                        if !cqueue::more(flags) {
                            let closing = self.conns[slot].as_ref().is_none_or(|c| c.closing);
                            if closing {
                                // A send queued in this pass may still name
                                // this descriptor: submit it before the
                                // close frees the number for the next accept,
                                // or it would echo into that connection.
                                if self.ring.submit().is_err() {
                                    return;
                                }
                                // The last completion: nothing of the
                                // kernel's refers to the slot any more
                                // but sends, which check the generation.
                                if self.conns[slot].take().is_some() {
                                    share.count.fetch_sub(1, Ordering::Relaxed);
                                }
                                self.free.push(slot);
                            } else if let Some(conn) = &self.conns[slot] {
                                // Out of buffers (or the kernel ended the
                                // multishot for its own reasons): re-arm.
                                let entry = opcode::RecvMulti::new(
                                    types::Fd(conn.stream.as_raw_fd()),
                                    GROUP,
                                )
                                .build()
                                .user_data(data);
                                self.push(entry);
                            }
                        }
                    }
                }
            }
            if returned {
                self.buffers.publish();
            }
            while let Some(entry) = self.overflow.pop() {
                // The queue is full: submit what is there first.
                if self.ring.submit().is_err() {
                    return;
                }
                self.push(entry);
            }
        }
    }

    /// Queues the echo of `len` bytes received into buffer `bid`.
    fn send_from(&mut self, slot: usize, generation: u32, bid: u16, len: usize) {
        let Some(conn) = &self.conns[slot] else {
            self.buffers.give_back(bid);
            return;
        };
        let data = self.buffers.buffer(bid);
        let len = len.min(data.len()) as u32;
        self.sent_len[usize::from(bid)] = len;
        let entry = opcode::Send::new(types::Fd(conn.stream.as_raw_fd()), data.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(OP_SEND, slot, generation, bid));
        self.push(entry);
    }
}
