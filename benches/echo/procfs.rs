//! Reading CPU time and memory from `/proc`, so the bench can charge a
//! server only for its own threads while the load runs in the same process.
//!
//! CPU is taken per thread from `/proc/<pid>/task/<tid>/stat` (`utime` +
//! `stime`, in clock ticks of usually 10 ms) and, where the kernel has it,
//! `/proc/<pid>/task/<tid>/schedstat` (time on CPU in nanoseconds). Threads
//! are keyed by tid and start time, so a reused tid is not mistaken for the
//! thread it replaced.

use std::collections::HashMap;
use std::fs;
use std::io;

/// One thread's CPU time so far.
#[derive(Clone, Copy, Debug)]
struct ThreadTimes {
    ticks: u64,
    run_ns: Option<u64>,
}

/// CPU times of a chosen set of threads at one moment.
#[derive(Debug, Default)]
pub struct CpuSnapshot {
    threads: HashMap<(u32, u64), ThreadTimes>,
}

/// CPU used between two snapshots.
#[derive(Clone, Copy, Debug)]
pub struct CpuUsed {
    /// From `utime + stime`, in seconds (10 ms resolution).
    pub ticks_secs: f64,
    /// From `schedstat`, in seconds, if every thread had it.
    pub run_secs: Option<f64>,
}

impl CpuUsed {
    /// The finest figure available: schedstat, else ticks.
    pub fn secs(&self) -> f64 {
        self.run_secs.unwrap_or(self.ticks_secs)
    }
}

/// Clock ticks per second for `utime`/`stime`.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Snapshots the threads of process `pid` (`None`: this process) whose name
/// (`comm`, cut at 15 bytes) passes `keep`.
///
/// # Errors
/// The task directory cannot be listed (the process is gone).
pub fn snapshot(pid: Option<u32>, keep: &dyn Fn(&str) -> bool) -> io::Result<CpuSnapshot> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_string(),
    };
    let mut snapshot = CpuSnapshot::default();
    for entry in fs::read_dir(&dir)? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between listing and reading: skip it.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, ticks, start)) = parse_stat(&stat) else {
            continue;
        };
        if !keep(comm) {
            continue;
        }
        let run_ns = fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        snapshot
            .threads
            .insert((tid, start), ThreadTimes { ticks, run_ns });
    }
    Ok(snapshot)
}

/// Snapshots every thread of each process in `pids` together, so that
/// several processes (a proxy and its backends) count as one server.
///
/// # Errors
/// A process is gone.
pub fn processes_snapshot(pids: &[u32]) -> io::Result<CpuSnapshot> {
    let mut all = CpuSnapshot::default();
    for &pid in pids {
        all.threads.extend(snapshot(Some(pid), &|_| true)?.threads);
    }
    Ok(all)
}

/// Name, `utime + stime` and start time from a `stat` line. The name sits
/// in parentheses and may itself hold spaces or parentheses, so the fields
/// are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(&str, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    let start: u64 = fields.get(22 - 3)?.parse().ok()?;
    Some((comm, utime + stime, start))
}

impl CpuSnapshot {
    /// CPU used from `earlier` to `self` by the threads alive at `self`; a
    /// thread born in between counts from zero.
    pub fn used_since(&self, earlier: &CpuSnapshot) -> CpuUsed {
        let (mut ticks, mut run_ns, mut run_complete) = (0u64, 0u64, true);
        for (key, now) in &self.threads {
            let before = earlier.threads.get(key);
            ticks += now.ticks - before.map_or(0, |b| b.ticks);
            match (now.run_ns, before.map(|b| b.run_ns)) {
                (Some(now), None) => run_ns += now,
                (Some(now), Some(Some(before))) => run_ns += now - before,
                _ => run_complete = false,
            }
        }
        CpuUsed {
            ticks_secs: ticks as f64 / ticks_per_sec(),
            run_secs: run_complete.then_some(run_ns as f64 / 1e9),
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`, such as `VmHWM` or `VmRSS`.
///
/// # Errors
/// The file cannot be read or lacks the field.
pub fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Whole-machine CPU counters from the first line of `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    total: u64,
    idle: u64,
    softirq: u64,
}

/// Reads the machine's CPU counters.
///
/// # Errors
/// `/proc/stat` cannot be read or parsed.
pub fn machine_cpu() -> io::Result<MachineCpu> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(MachineCpu {
        total: (0..8).map(field).sum(),
        idle: field(3) + field(4),
        softirq: field(6),
    })
}

impl MachineCpu {
    /// Shares of all cores' time from `earlier` to `self` spent idle and in
    /// softirq (loopback's packet delivery), as fractions.
    pub fn shares_since(&self, earlier: &MachineCpu) -> (f64, f64) {
        let total = (self.total - earlier.total).max(1) as f64;
        (
            (self.idle - earlier.idle) as f64 / total,
            (self.softirq - earlier.softirq) as f64 / total,
        )
    }

    /// Seconds of CPU the whole machine spent busy (not idle) since `earlier`.
    pub fn busy_secs_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total - earlier.total;
        let idle = self.idle - earlier.idle;
        total.saturating_sub(idle) as f64 / ticks_per_sec()
    }
}

/// The whole of process `pid`'s CPU time so far, from `/proc/<pid>/stat`:
/// one file however many threads it has, and it includes threads that
/// have exited. Ticks only (no schedstat for the whole process).
///
/// # Errors
/// The file cannot be read or parsed (the process is gone).
pub fn process_cpu(pid: u32) -> io::Result<CpuSnapshot> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, ticks, start) =
        parse_stat(&stat).ok_or_else(|| io::Error::other(format!("bad /proc/{pid}/stat")))?;
    let mut snapshot = CpuSnapshot::default();
    snapshot.threads.insert(
        (pid, start),
        ThreadTimes {
            ticks,
            run_ns: None,
        },
    );
    Ok(snapshot)
}

/// CPU seconds used so far by this process and its reaped children
/// (`utime + stime + cutime + cstime` of `/proc/self/stat`).
///
/// # Errors
/// The file cannot be read or parsed.
pub fn self_and_children_secs() -> io::Result<f64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    let bad = || io::Error::other("bad /proc/self/stat");
    let close = stat.rfind(')').ok_or_else(bad)?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let mut ticks = 0u64;
    for field in 14..=17 {
        ticks += fields
            .get(field - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(bad)?;
    }
    Ok(ticks as f64 / ticks_per_sec())
}

/// Datagrams the kernel dropped for want of receive-buffer room, from
/// `/proc/net/udp`'s `drops` column, summed over the IPv4 UDP sockets bound
/// to `port` (the server's) and over those connected to it (the load's
/// flows); sockets already closed are not counted.
///
/// # Errors
/// The file cannot be read.
pub fn udp_drops(port: u16) -> io::Result<(u64, u64)> {
    let table = fs::read_to_string("/proc/net/udp")?;
    let (mut at_server, mut at_clients) = (0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port_of = |field: Option<&&str>| {
            field
                .and_then(|f| f.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
        };
        let Some(drops) = fields.last().and_then(|d| d.parse::<u64>().ok()) else {
            continue;
        };
        if port_of(fields.get(1)) == Some(port) {
            at_server += drops;
        } else if port_of(fields.get(2)) == Some(port) {
            at_clients += drops;
        }
    }
    Ok((at_server, at_clients))
}
