//! Process limits the server and the client depend on: the open-file limit
//! bounds how many connections the acceptor can hold (or the client open),
//! so both binaries raise it at start-up; a cgroup's CPU quota, which busy
//! polling would spend, so the server turns busy polling off by default
//! under one; and the memory the process may use, which the client checks
//! a run against before it starts.

use std::fs;
use std::io;
use std::path::Path;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft
/// limit.
///
/// # Errors
/// The `getrlimit` or `setrlimit` error.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Descriptors the process needs besides connections: stdio, the listener,
/// the signal thread's socket pair, an epoll and an eventfd waker for each
/// worker and the acceptor, and some slack. (With 1024 workers the process
/// holds 2058.)
pub fn reserved_descriptors(workers: usize) -> u64 {
    16 + 2 * (workers as u64 + 1)
}

/// The CPU time this process's cgroup may use, in cores, if it has a quota
/// (a container's CPU limit): cgroup v2's `cpu.max`, or v1's
/// `cpu.cfs_quota_us` over `cpu.cfs_period_us`. Only the process's own
/// cgroup is read, as Go's automaxprocs does: a quota set on a parent group
/// alone is not seen.
#[must_use]
pub fn cpu_quota() -> Option<f64> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    cpu_quota_under(Path::new("/sys/fs/cgroup"), &cgroups)
}

/// [`cpu_quota`] for a cgroup file system mounted at `root`, given the
/// contents of `/proc/self/cgroup`.
fn cpu_quota_under(root: &Path, cgroups: &str) -> Option<f64> {
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        // Where the group's files are: under its path, or at the mount's
        // root when a container mounts its own group there.
        let places = |mount: &Path| [mount.join(path), mount.to_path_buf()];
        if controllers.is_empty() {
            // cgroup v2 ("0::/path"), mounted alone or, on hybrid systems, as
            // "unified"; without the cpu controller there is no cpu.max.
            for mount in [root.to_path_buf(), root.join("unified")] {
                for dir in places(&mount) {
                    if let Ok(max) = fs::read_to_string(dir.join("cpu.max")) {
                        return parse_cpu_max(&max);
                    }
                }
            }
        } else if controllers.split(',').any(|controller| controller == "cpu") {
            // cgroup v1, mounted under the controllers' names.
            for mount in [controllers, "cpu", "cpu,cpuacct"] {
                for dir in places(&root.join(mount)) {
                    let quota = fs::read_to_string(dir.join("cpu.cfs_quota_us"));
                    let period = fs::read_to_string(dir.join("cpu.cfs_period_us"));
                    if let (Ok(quota), Ok(period)) = (quota, period) {
                        return cores(quota.trim(), period.trim());
                    }
                }
            }
        }
    }
    None
}

/// The most memory this process may use, and where that figure comes from:
/// its cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) or, if
/// the machine has less available, `MemAvailable` of `/proc/meminfo`.
/// `None` when neither can be read.
#[must_use]
pub fn memory_limit() -> Option<MemoryLimit> {
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|cgroups| memory_limit_under(Path::new("/sys/fs/cgroup"), &cgroups));
    let available = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| mem_available(&meminfo))
        .map(|bytes| MemoryLimit {
            bytes,
            source: "MemAvailable in /proc/meminfo",
        });
    match (cgroup, available) {
        (Some(cgroup), Some(available)) if available.bytes < cgroup.bytes => Some(available),
        (Some(cgroup), _) => Some(cgroup),
        (None, available) => available,
    }
}

/// A memory limit in bytes, and what set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The limit, in bytes.
    pub bytes: u64,
    /// Where the figure was read, for messages: `the cgroup's memory.max`.
    pub source: &'static str,
}

/// [`memory_limit`]'s cgroup part for a cgroup file system mounted at
/// `root`, given the contents of `/proc/self/cgroup`: the lowest limit of
/// the process's own group and of a container's group at the mount root.
fn memory_limit_under(root: &Path, cgroups: &str) -> Option<MemoryLimit> {
    let mut lowest: Option<MemoryLimit> = None;
    let mut consider = |limit: MemoryLimit| {
        if lowest.is_none_or(|lowest| limit.bytes < lowest.bytes) {
            lowest = Some(limit);
        }
    };
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        let places = |mount: &Path| [mount.join(path), mount.to_path_buf()];
        if controllers.is_empty() {
            for mount in [root.to_path_buf(), root.join("unified")] {
                for dir in places(&mount) {
                    if let Ok(max) = fs::read_to_string(dir.join("memory.max"))
                        && let Ok(bytes) = max.trim().parse::<u64>()
                    {
                        consider(MemoryLimit {
                            bytes,
                            source: "the cgroup's memory.max",
                        });
                    }
                }
            }
        } else if controllers
            .split(',')
            .any(|controller| controller == "memory")
        {
            for dir in places(&root.join("memory")) {
                if let Ok(limit) = fs::read_to_string(dir.join("memory.limit_in_bytes"))
                    && let Ok(bytes) = limit.trim().parse::<u64>()
                    // v1 says "no limit" with a number near 2^63.
                    && bytes < 1 << 62
                {
                    consider(MemoryLimit {
                        bytes,
                        source: "the cgroup's memory.limit_in_bytes",
                    });
                }
            }
        }
    }
    lowest
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The local ports Linux picks from for an outgoing connection
/// (`net.ipv4.ip_local_port_range`), first and last: one client address
/// can hold at most that many connections to one server address and port.
#[must_use]
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut ports = range.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last))) if first <= last => Some((first, last)),
        _ => None,
    }
}

/// cgroup v2's `cpu.max`: "QUOTA PERIOD", or "max PERIOD" for none.
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    cores(fields.next()?, fields.next()?)
}

/// A quota over a period, in cores; `max` or a negative quota (v1's -1)
/// means none.
fn cores(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.parse().ok().filter(|quota: &f64| *quota > 0.0)?;
    let period: f64 = period.parse().ok().filter(|period: &f64| *period > 0.0)?;
    Some(quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch cgroup tree, removed when dropped.
    struct Tree(std::path::PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let root = std::env::temp_dir()
                .join(format!("echo-chamber-cgroup-{name}-{}", std::process::id()));
            // A tree left by an earlier run is replaced.
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).expect("create the scratch tree");
            Tree(root)
        }

        fn file(&self, path: &str, text: &str) -> &Tree {
            let path = self.0.join(path);
            fs::create_dir_all(path.parent().expect("a file has a parent"))
                .expect("create the file's directory");
            fs::write(path, text).expect("write the file");
            self
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            // Only scratch files in the temporary directory are left if it fails.
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_a_cgroup_v2_quota_and_none_for_max() {
        let tree = Tree::new("v2");
        tree.file("pod/app/cpu.max", "150000 100000\n");
        assert_eq!(cpu_quota_under(&tree.0, "0::/pod/app\n"), Some(1.5));
        tree.file("pod/app/cpu.max", "max 100000\n");
        assert_eq!(cpu_quota_under(&tree.0, "0::/pod/app\n"), None);
    }

    #[test]
    fn reads_a_cgroup_v1_quota_and_none_for_minus_one() {
        let tree = Tree::new("v1");
        tree.file("cpu,cpuacct/job/cpu.cfs_quota_us", "50000\n")
            .file("cpu,cpuacct/job/cpu.cfs_period_us", "100000\n");
        let cgroups = "4:memory:/job\n3:cpu,cpuacct:/job\n0::/job\n";
        assert_eq!(cpu_quota_under(&tree.0, cgroups), Some(0.5));
        tree.file("cpu,cpuacct/job/cpu.cfs_quota_us", "-1\n");
        assert_eq!(cpu_quota_under(&tree.0, cgroups), None);
    }

    #[test]
    fn a_container_s_own_group_at_the_mount_root_counts() {
        // The path names the group on the host; the container mounts it at
        // the root of its own cgroup file system.
        let tree = Tree::new("container");
        tree.file("cpu.max", "200000 100000\n");
        assert_eq!(cpu_quota_under(&tree.0, "0::/docker/0123abcd\n"), Some(2.0));
    }

    #[test]
    fn reads_memory_limits_of_both_versions_and_none_for_unlimited() {
        let tree = Tree::new("memory");
        tree.file("pod/memory.max", "1073741824\n");
        let limit = memory_limit_under(&tree.0, "0::/pod\n").map(|limit| limit.bytes);
        assert_eq!(limit, Some(1 << 30));
        tree.file("pod/memory.max", "max\n");
        assert_eq!(memory_limit_under(&tree.0, "0::/pod\n"), None);
        tree.file("memory/job/memory.limit_in_bytes", "536870912\n");
        let limit = memory_limit_under(&tree.0, "4:memory:/job\n").map(|limit| limit.bytes);
        assert_eq!(limit, Some(1 << 29));
        tree.file("memory/job/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(memory_limit_under(&tree.0, "4:memory:/job\n"), None);
        let meminfo = "MemTotal:       32000000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(meminfo), Some(2048 * 1024));
    }

    #[test]
    fn no_cgroup_files_means_no_quota() {
        let tree = Tree::new("empty");
        assert_eq!(cpu_quota_under(&tree.0, "0::/\n1:cpu:/\n"), None);
        assert_eq!(cpu_quota_under(&tree.0, "not a cgroup line"), None);
    }
}
