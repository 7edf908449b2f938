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

/// What this process may still allocate, and what bounds it: the lowest,
/// over every cgroup from its own up to the root, of the group's limit
/// less what the group already uses (v2 `memory.max` − `memory.current`,
/// v1 `memory.limit_in_bytes` − `memory.usage_in_bytes`), or, if the
/// machine has less, `MemAvailable` of `/proc/meminfo`. A limit set only
/// on a parent, as a systemd slice's `MemoryMax=` is over the scopes in
/// it, binds the process as much as one on its own group. `None` when
/// nothing can be read.
#[must_use]
pub fn memory_limit() -> Option<MemoryLimit> {
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|cgroups| memory_limit_under(Path::new("/sys/fs/cgroup"), &cgroups));
    let available = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| mem_available(&meminfo))
        .map(|bytes| MemoryLimit {
            left: bytes,
            bound: MemoryBound::Available,
        });
    match (cgroup, available) {
        (Some(cgroup), Some(available)) if available.left < cgroup.left => Some(available),
        (Some(cgroup), _) => Some(cgroup),
        (None, available) => available,
    }
}

/// The memory a process may still allocate, and what bounds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    /// Bytes left.
    pub left: u64,
    /// What leaves only that much.
    pub bound: MemoryBound,
}

/// What bounds a [`MemoryLimit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBound {
    /// A cgroup's limit, less what the processes in it (and in the groups
    /// under it) already use.
    Cgroup {
        /// The limit, in bytes.
        limit: u64,
        /// The group's path in its hierarchy, as `/proc/self/cgroup`
        /// names it: `/system.slice/app.slice`.
        group: String,
        /// Whether it is the process's own group rather than one above it.
        own: bool,
        /// The file the limit was read from: `memory.max` or
        /// `memory.limit_in_bytes`.
        file: &'static str,
    },
    /// `MemAvailable` of `/proc/meminfo`: what the machine has.
    Available,
}

/// A cgroup version's memory files.
struct MemoryFiles {
    limit: &'static str,
    usage: &'static str,
    /// The `memory.stat` key for reclaimable page cache of the whole
    /// subtree.
    inactive_file: &'static str,
}

const MEMORY_V2: MemoryFiles = MemoryFiles {
    limit: "memory.max",
    usage: "memory.current",
    inactive_file: "inactive_file",
};

const MEMORY_V1: MemoryFiles = MemoryFiles {
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive_file: "total_inactive_file",
};

/// [`memory_limit`]'s cgroup part for a cgroup file system mounted at
/// `root`, given the contents of `/proc/self/cgroup`.
fn memory_limit_under(root: &Path, cgroups: &str) -> Option<MemoryLimit> {
    let mut lowest: Option<MemoryLimit> = None;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let found = if controllers.is_empty() {
            // cgroup v2, alone or, on hybrid systems, as "unified"; without
            // the memory controller there is no memory.max.
            [root.to_path_buf(), root.join("unified")]
                .into_iter()
                .filter_map(|mount| lowest_on_path(&mount, path, &MEMORY_V2))
                .min_by_key(|limit| limit.left)
        } else if controllers
            .split(',')
            .any(|controller| controller == "memory")
        {
            lowest_on_path(&root.join("memory"), path, &MEMORY_V1)
        } else {
            None
        };
        if let Some(found) = found
            && lowest
                .as_ref()
                .is_none_or(|lowest| found.left < lowest.left)
        {
            lowest = Some(found);
        }
    }
    lowest
}

/// The least memory left in any group from `path` (the process's own) up
/// to the hierarchy mounted at `mount`. A container that mounts its own
/// group at the mount's root, while `/proc/self/cgroup` names it by its
/// path on the host, has no directory for that path: the deepest directory
/// that exists is its own group, and the mount's root is always reached.
fn lowest_on_path(mount: &Path, path: &str, files: &MemoryFiles) -> Option<MemoryLimit> {
    let path = path.trim_matches('/');
    let mut groups: Vec<&str> = path
        .match_indices('/')
        .map(|(end, _)| &path[..end])
        .collect();
    groups.insert(0, "");
    if !path.is_empty() {
        groups.push(path);
    }
    let mut lowest: Option<MemoryLimit> = None;
    let mut own = true;
    for group in groups.into_iter().rev() {
        let dir = mount.join(group);
        if !dir.is_dir() {
            continue;
        }
        let is_own = own;
        own = false;
        // cgroup v1 before Linux 6.0: a group above ours without
        // use_hierarchy neither counts nor limits what the groups under it
        // use, and neither does any group above it (whose setting it takes).
        if !is_own
            && fs::read_to_string(dir.join("memory.use_hierarchy")).is_ok_and(|on| on.trim() == "0")
        {
            break;
        }
        if let Some(left) = left_in(&dir, files)
            && lowest.as_ref().is_none_or(|lowest| left.0 < lowest.left)
        {
            lowest = Some(MemoryLimit {
                left: left.0,
                bound: MemoryBound::Cgroup {
                    limit: left.1,
                    group: format!("/{group}"),
                    own: is_own,
                    file: files.limit,
                },
            });
        }
    }
    lowest
}

/// What is left under the limit of the group at `dir`, and the limit;
/// `None` when it has none. Page cache the kernel can drop (inactive
/// file pages) does not count as used, as the kubelet reckons a
/// container's working set: a group that has read many files would
/// otherwise look full.
fn left_in(dir: &Path, files: &MemoryFiles) -> Option<(u64, u64)> {
    let limit: u64 = fs::read_to_string(dir.join(files.limit))
        .ok()?
        .trim()
        .parse()
        .ok()
        // v2 says "no limit" with "max", v1 with a number near 2^63.
        .filter(|&limit| limit < 1 << 62)?;
    let usage: u64 = fs::read_to_string(dir.join(files.usage))
        .ok()
        .and_then(|usage| usage.trim().parse().ok())
        .unwrap_or(0);
    let cache = fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|stat| stat_value(&stat, files.inactive_file))
        .unwrap_or(0);
    Some((limit.saturating_sub(usage.saturating_sub(cache)), limit))
}

/// A value of a `memory.stat` file: lines of `key value`.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
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

    fn left(root: &Path, cgroups: &str) -> Option<u64> {
        memory_limit_under(root, cgroups).map(|limit| limit.left)
    }

    #[test]
    fn reads_memory_limits_of_both_versions_and_none_for_unlimited() {
        let tree = Tree::new("memory");
        tree.file("pod/memory.max", "1073741824\n");
        assert_eq!(left(&tree.0, "0::/pod\n"), Some(1 << 30));
        tree.file("pod/memory.max", "max\n");
        assert_eq!(memory_limit_under(&tree.0, "0::/pod\n"), None);
        tree.file("memory/job/memory.limit_in_bytes", "536870912\n");
        assert_eq!(left(&tree.0, "4:memory:/job\n"), Some(1 << 29));
        tree.file("memory/job/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(memory_limit_under(&tree.0, "4:memory:/job\n"), None);
        let meminfo = "MemTotal:       32000000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(meminfo), Some(2048 * 1024));
    }

    #[test]
    fn a_limit_on_any_group_above_the_process_s_own_counts() {
        // A systemd slice with MemoryMax=, the process in a scope under it.
        let tree = Tree::new("slice");
        tree.file("user.slice/memory.max", "1073741824\n")
            .file("user.slice/run-1.scope/memory.max", "max\n");
        let limit = memory_limit_under(&tree.0, "0::/user.slice/run-1.scope\n");
        assert_eq!(
            limit,
            Some(MemoryLimit {
                left: 1 << 30,
                bound: MemoryBound::Cgroup {
                    limit: 1 << 30,
                    group: "/user.slice".to_owned(),
                    own: false,
                    file: "memory.max",
                },
            })
        );
        // v1 likewise, two levels up; the lowest limit wins.
        tree.file("memory/a/memory.limit_in_bytes", "536870912\n")
            .file("memory/a/b/memory.limit_in_bytes", "1073741824\n")
            .file(
                "memory/a/b/c/memory.limit_in_bytes",
                "9223372036854771712\n",
            );
        assert_eq!(left(&tree.0, "4:memory:/a/b/c\n"), Some(1 << 29));
        // Before Linux 6.0, a v1 group above ours without use_hierarchy
        // limits nothing under it, and no group above it does either; the
        // setting that counts is the upper group's, not ours.
        tree.file("memory/a/memory.use_hierarchy", "0\n")
            .file("memory/a/b/c/memory.use_hierarchy", "0\n");
        assert_eq!(left(&tree.0, "4:memory:/a/b/c\n"), Some(1 << 30));
        tree.file("memory/a/b/memory.use_hierarchy", "0\n");
        assert_eq!(left(&tree.0, "4:memory:/a/b/c\n"), None);
    }

    #[test]
    fn what_a_group_already_uses_is_not_left_but_its_page_cache_is() {
        let tree = Tree::new("usage");
        tree.file("memory.max", "max\n")
            .file("app/memory.max", "1073741824\n")
            .file("app/memory.current", "419430400\n")
            .file("app/memory.stat", "anon 400000000\nfile 19430400\n");
        let limit = memory_limit_under(&tree.0, "0::/app\n");
        assert_eq!(
            limit,
            Some(MemoryLimit {
                left: (1 << 30) - 419_430_400,
                bound: MemoryBound::Cgroup {
                    limit: 1 << 30,
                    group: "/app".to_owned(),
                    own: true,
                    file: "memory.max",
                },
            })
        );
        // Inactive page cache is dropped before the kernel kills.
        tree.file(
            "app/memory.stat",
            "anon 400000000\ninactive_file 19430400\n",
        );
        assert_eq!(left(&tree.0, "0::/app\n"), Some((1 << 30) - 400_000_000));
        // A parent with a higher limit but less left binds.
        tree.file("memory.max", "2147483648\n")
            .file("memory.current", "1932735283\n");
        assert_eq!(left(&tree.0, "0::/app\n"), Some((2 << 30) - 1_932_735_283));
        // v1: usage_in_bytes, and the hierarchy's total_inactive_file.
        tree.file("memory/job/memory.limit_in_bytes", "1073741824\n")
            .file("memory/job/memory.usage_in_bytes", "419430400\n")
            .file(
                "memory/job/memory.stat",
                "inactive_file 1\ntotal_inactive_file 19430400\n",
            );
        assert_eq!(
            left(&tree.0, "4:memory:/job\n"),
            Some((1 << 30) - 400_000_000)
        );
        // Usage beyond the limit leaves nothing, not an overflow.
        tree.file("memory/job/memory.usage_in_bytes", "2147483648\n");
        assert_eq!(left(&tree.0, "4:memory:/job\n"), Some(0));
    }

    #[test]
    fn a_container_s_own_group_at_the_mount_root_is_its_own() {
        let tree = Tree::new("container-memory");
        tree.file("memory.max", "1073741824\n");
        let limit = memory_limit_under(&tree.0, "0::/docker/0123abcd\n");
        assert!(
            matches!(
                limit,
                Some(MemoryLimit {
                    bound: MemoryBound::Cgroup { own: true, .. },
                    ..
                })
            ),
            "{limit:?}"
        );
    }

    #[test]
    fn no_cgroup_files_means_no_quota() {
        let tree = Tree::new("empty");
        assert_eq!(cpu_quota_under(&tree.0, "0::/\n1:cpu:/\n"), None);
        assert_eq!(cpu_quota_under(&tree.0, "not a cgroup line"), None);
    }
}
