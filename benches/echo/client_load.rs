//! Case 10 (issue 13): `echo-client` as a load generator, against our
//! server in-process with 2 workers. The client runs as a child process,
//! so its CPU and peak RSS are its own (`wait4`'s rusage).
//!
//! - 256 connections of 64 B closed loop: echoes/s and client CPU per
//!   echo, next to the bench's own load generator ([`crate::load`]) on the
//!   same server in the same run, and next to the same run with
//!   `--reconnect`, which runs on the loops too (nothing reconnects: what
//!   the flag costs unused);
//! - 10,000 connections on 2 client threads, few active at a time
//!   (`--rate 20000`): echoes/s and the client's peak RSS;
//! - `--rate 50000` over 256 connections: the rate held, and p50/p99
//!   timed from when each echo was due.

use std::process::{Command, Stdio};

/// The client binary under test.
const CLIENT: &str = env!("CARGO_BIN_EXE_echo-client");

/// What one `echo-client --json` run did, and what it cost.
pub struct ClientRun {
    pub echoed: f64,
    pub elapsed_s: f64,
    /// With `--report-every 1s` among the arguments: the median echoes/s
    /// of the whole one-second intervals, steady state without the
    /// connects and the closing checks.
    pub steady_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// User plus system CPU of the whole process, in seconds.
    pub cpu_s: f64,
    /// Peak resident set, in KiB.
    pub max_rss_kib: u64,
}

impl ClientRun {
    /// Echoes/s over the steady intervals if there were any, else over
    /// the whole run.
    pub fn echoes_per_s(&self) -> f64 {
        self.steady_per_s
            .unwrap_or(self.echoed / self.elapsed_s.max(1e-9))
    }

    pub fn cpu_us_per_echo(&self) -> f64 {
        self.cpu_s * 1e6 / self.echoed.max(1.0)
    }
}

/// Runs the client with `args` (the target first) and `--json`, and reads
/// its report and its rusage.
///
/// # Errors
/// The client could not start, failed, or printed no report.
pub fn run_client(args: &[String]) -> Result<ClientRun, String> {
    let child = Command::new(CLIENT)
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {CLIENT}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    // The client ends on its own (--duration); the output is read after.
    let output = std::thread::scope(|scope| {
        let reader = scope.spawn(move || child.wait_with_output_no_reap());
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child's pid, writing into locals that
        // outlive the call.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        let output = reader
            .join()
            .map_err(|_| "the reader panicked".to_owned())?;
        if waited != pid {
            return Err(format!("wait4: {}", std::io::Error::last_os_error()));
        }
        Ok((status, usage, output?))
    });
    let (status, usage, (stdout, stderr)) = output?;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!(
            "{CLIENT} {} ended with status {status}: {stderr}",
            args.join(" ")
        ));
    }
    let report = stdout
        .lines()
        .last()
        .ok_or_else(|| format!("{CLIENT} printed nothing; stderr: {stderr}"))?;
    let number = |key: &str| json_number(report, key);
    let mut steady: Vec<f64> = stdout
        .lines()
        .filter(|line| line.starts_with("{\"start_s\""))
        .filter(|line| {
            let start = json_number(line, "\"start_s\":").unwrap_or(0.0);
            let end = json_number(line, "\"end_s\":").unwrap_or(0.0);
            end - start >= 0.999
        })
        .filter_map(|line| json_number(line, "\"echoes_per_s\":"))
        .collect();
    steady.sort_by(f64::total_cmp);
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    Ok(ClientRun {
        echoed: number("\"echoed\":").ok_or_else(|| format!("no echoed in {report}"))?,
        elapsed_s: number("\"elapsed_s\":").ok_or_else(|| format!("no elapsed_s in {report}"))?,
        steady_per_s: steady.get(steady.len() / 2).copied(),
        p50_ms: number("\"p50\":"),
        p99_ms: number("\"p99\":"),
        cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

/// The number after the first `key` in `json` (`null` is none).
fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(key)? + key.len();
    let rest = &json[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Reads a child's stdout and stderr to their ends without waiting for it,
/// so that the caller can reap it with `wait4` and keep its rusage.
trait OutputNoReap {
    fn wait_with_output_no_reap(self) -> Result<(String, String), String>;
}

impl OutputNoReap for std::process::Child {
    fn wait_with_output_no_reap(mut self) -> Result<(String, String), String> {
        use std::io::Read;
        let mut stdout = String::new();
        let mut stderr = String::new();
        let mut out = self.stdout.take().ok_or("stdout is piped")?;
        let mut err = self.stderr.take().ok_or("stderr is piped")?;
        std::thread::scope(|scope| {
            let errors = scope.spawn(|| err.read_to_string(&mut stderr));
            out.read_to_string(&mut stdout)
                .map_err(|e| format!("reading stdout: {e}"))?;
            errors
                .join()
                .map_err(|_| "the stderr reader panicked".to_owned())?
                .map_err(|e| format!("reading stderr: {e}"))
        })?;
        // Dropping a Child neither kills nor waits for it.
        drop(self);
        Ok((stdout, stderr))
    }
}
