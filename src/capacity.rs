//! What this machine lets one bzpush hold: the connection budget.
//!
//! Each WebSocket connection has a thread of its own and a socket. The
//! thread costs four memory mappings (its stack and guard page, and the
//! signal stack Rust's std maps for it and that stack's guard), counted
//! against `vm.max_map_count`, and a task, counted against
//! `kernel.pid_max`, `kernel.threads-max`, the user's `RLIMIT_NPROC` and
//! the cgroup's `pids.max` (systemd's `TasksMax=`); the socket is a file
//! descriptor (`RLIMIT_NOFILE`, systemd's `LimitNOFILE=`). A thread past
//! any task limit fails to start, which a caller can handle; but a thread
//! past `vm.max_map_count` starts and then cannot map its signal stack,
//! and std aborts the whole process from inside it. So the budget is
//! worked out before serving, from each limit less what is in use and what
//! the handshakes and the pipeline need beside the connections, and the
//! server never holds more connections than it allows.
//!
//! Reads `/proc` and `/sys` only: it never changes a limit. The task
//! limits other than `RLIMIT_NPROC`'s and the cgroup's count the whole
//! machine, so another process that grows later can still take room the
//! budget counted on: a thread that then cannot start costs its client a
//! refusal, never the process.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::sockets::MAX_HANDSHAKES;

/// `n` connections in words: "1 connection", "2 connections".
pub fn n_connections(n: usize) -> String {
    match n {
        1 => "1 connection".to_string(),
        n => format!("{n} connections"),
    }
}

/// Mappings per thread: 4.03 measured per thread over 1,000 threads
/// (stack, its guard, signal stack, its guard); the rest is arenas.
const MAPPINGS_PER_THREAD: u64 = 4;
/// Threads the pipeline may have beside connections and handshakes: the
/// hub, writers, the broker consumers or the poller, the catch-up worker,
/// logging, signals, the watchdog, lapin's and its executor's (about 25
/// seen in `serve`), with room to spare.
const PIPELINE_THREADS: u64 = 64;
/// Descriptors beside the client sockets: the listener, broker and
/// database connections, their epoll and event descriptors, stdio.
const PIPELINE_FILES: u64 = 64;
/// Mappings beyond every thread's: malloc's arenas, the stacks glibc keeps
/// of ended threads for the next ones (up to 40 MiB of them), the buffers
/// large enough to get mappings of their own, the libraries.
const SPARE_MAPPINGS: u64 = 2048;
/// PIDs below 300 are never handed out again once `pid_max` wraps.
const RESERVED_PIDS: u64 = 300;

/// One limit of the machine, and how many connections it leaves room for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// As an operator knows it: `vm.max_map_count`, `open files (RLIMIT_NOFILE)`.
    pub name: String,
    pub value: u64,
    /// In use when measured: by this process, this user or the whole
    /// machine, as the limit counts.
    pub used: u64,
    /// What the handshakes and the pipeline need of it.
    pub reserved: u64,
    /// What one connection takes of it.
    pub per_connection: u64,
    /// What it counts, one of it: `mapping`, `task`, `file`.
    pub unit: &'static str,
    /// How to raise it; `{}` stands for the value needed.
    fix: String,
}

impl Limit {
    /// The connections it leaves room for.
    pub fn connections(&self) -> usize {
        let left = self.value.saturating_sub(self.used + self.reserved) / self.per_connection;
        usize::try_from(left).unwrap_or(usize::MAX)
    }

    /// How to raise it far enough for `connections`: the value needed,
    /// rounded up to a thousand.
    pub fn fix(&self, connections: usize) -> String {
        let needed = self.used + self.reserved + connections as u64 * self.per_connection;
        self.fix
            .replace("{}", &(needed.div_ceil(1000) * 1000).to_string())
    }
}

/// The machine's limits that bound connections, as measured at start.
#[derive(Clone, Debug, Default)]
pub struct Capacity {
    pub limits: Vec<Limit>,
}

impl Capacity {
    /// Measures this process's and this machine's limits now.
    pub fn measure() -> Capacity {
        let mut limits = Vec::new();
        let threads = (MAX_HANDSHAKES + PIPELINE_THREADS as usize) as u64;
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Ok(text) = fs::read_to_string("/proc/self/limits") {
            if let Some(value) = soft_limit(&text, "Max open files") {
                limits.push(Limit {
                    name: "open files (RLIMIT_NOFILE)".into(),
                    value,
                    used: count_entries("/proc/self/fd"),
                    reserved: MAX_HANDSHAKES as u64 + PIPELINE_FILES,
                    per_connection: 1,
                    unit: "file",
                    fix: "LimitNOFILE={} in the unit (systemctl edit UNIT), or ulimit -n {}".into(),
                });
            }
            if let Some(value) = soft_limit(&text, "Max processes")
                && !exempt_from_nproc(&status)
            {
                limits.push(Limit {
                    name: "processes of this user (RLIMIT_NPROC)".into(),
                    value,
                    used: real_uid(&status).map_or(0, user_tasks),
                    reserved: threads,
                    per_connection: 1,
                    unit: "task",
                    fix: "LimitNPROC={} in the unit, or ulimit -u {}".into(),
                });
            }
        }
        if let Some(value) = read_number("/proc/sys/vm/max_map_count") {
            let maps = fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
            limits.push(Limit {
                name: "vm.max_map_count".into(),
                value,
                used: maps as u64,
                reserved: threads * MAPPINGS_PER_THREAD + SPARE_MAPPINGS,
                per_connection: MAPPINGS_PER_THREAD,
                unit: "mapping",
                fix: sysctl("vm.max_map_count"),
            });
        }
        let tasks = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| machine_tasks(&l))
            .unwrap_or(0);
        for (name, reserved_pids) in [("pid_max", RESERVED_PIDS), ("threads-max", 0)] {
            if let Some(value) = read_number(&format!("/proc/sys/kernel/{name}")) {
                limits.push(Limit {
                    name: format!("kernel.{name}"),
                    value,
                    used: tasks + reserved_pids,
                    reserved: threads,
                    per_connection: 1,
                    unit: "task",
                    fix: sysctl(&format!("kernel.{name}")),
                });
            }
        }
        let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for dir in pids_cgroups(&cgroups, Path::new("/sys/fs/cgroup")) {
            let Some(value) = read_number(&dir.join("pids.max").to_string_lossy()) else {
                continue;
            };
            let used = read_number(&dir.join("pids.current").to_string_lossy()).unwrap_or(0);
            limits.push(Limit {
                name: format!("pids.max of cgroup {}", dir.display()),
                value,
                used,
                reserved: threads,
                per_connection: 1,
                unit: "task",
                fix: "TasksMax={} for the unit or slice of that cgroup (systemctl edit UNIT)"
                    .into(),
            });
        }
        Capacity { limits }
    }

    /// The connections every limit leaves room for; `usize::MAX` if none
    /// was found.
    pub fn connections(&self) -> usize {
        self.tightest().map_or(usize::MAX, Limit::connections)
    }

    /// The limit that leaves room for the fewest connections.
    pub fn tightest(&self) -> Option<&Limit> {
        self.limits.iter().min_by_key(|l| l.connections())
    }

    /// What this machine allows, in a sentence: `15871 connections (the
    /// tightest limit: vm.max_map_count 65530, 4 mappings a connection,
    /// 44 in use, 3328 kept for handshakes and the pipeline)`.
    pub fn describe(&self) -> String {
        match self.tightest() {
            None => "connections without a limit bzpush can read".into(),
            Some(l) => format!(
                "{} (the tightest limit: {} {}, {} {}{} a connection, {} in use, {} kept for \
                 handshakes and the pipeline)",
                n_connections(l.connections()),
                l.name,
                l.value,
                l.per_connection,
                l.unit,
                if l.per_connection == 1 { "" } else { "s" },
                l.used,
                l.reserved
            ),
        }
    }

    /// `None` if `wanted` connections fit; otherwise what allows fewer and
    /// how to raise each such limit.
    pub fn shortfall(&self, wanted: usize) -> Option<String> {
        let short: Vec<&Limit> = self
            .limits
            .iter()
            .filter(|l| l.connections() < wanted)
            .collect();
        if short.is_empty() {
            return None;
        }
        let mut text = format!(
            "BZPUSH_MAX_CONNECTIONS={wanted} is more than this machine allows: {}",
            self.describe()
        );
        for l in &short {
            let _ = write!(
                text,
                "; {} = {} allows {}: to allow {wanted}, {}",
                l.name,
                l.value,
                l.connections(),
                l.fix(wanted)
            );
        }
        if short.iter().any(|l| l.fix.starts_with("sysctl")) {
            text.push_str(
                " (and the same in a file of /etc/sysctl.d/ to keep it: \
                 /usr/share/doc/bzpush/contrib/90-bzpush-sysctl.conf is an example)",
            );
        }
        Some(text)
    }
}

fn sysctl(name: &str) -> String {
    format!("sysctl -w {name}={{}}")
}

/// The soft limit of the line starting with `name` in `/proc/self/limits`
/// (`Max open files  20000  20000  files`); `None` when unlimited.
fn soft_limit(limits: &str, name: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Every task on the machine, from `/proc/loadavg`'s fourth field
/// (`running/total`).
fn machine_tasks(loadavg: &str) -> Option<u64> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The real user id, from `/proc/…/status`.
fn real_uid(status: &str) -> Option<u32> {
    field(status, "Uid:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name))
}

/// Whether the kernel lets this process past `RLIMIT_NPROC`: root, or a
/// process with CAP_SYS_RESOURCE (bit 24) or CAP_SYS_ADMIN (bit 21).
fn exempt_from_nproc(status: &str) -> bool {
    let caps = field(status, "CapEff:")
        .and_then(|c| u64::from_str_radix(c.trim(), 16).ok())
        .unwrap_or(0);
    real_uid(status) == Some(0) || caps & (1 << 24 | 1 << 21) != 0
}

/// The tasks (threads) of every process whose real user is `uid`: what
/// `RLIMIT_NPROC` counts.
fn user_tasks(uid: u32) -> u64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read_to_string(e.path().join("status")).ok())
        .filter(|status| real_uid(status) == Some(uid))
        .filter_map(|status| field(&status, "Threads:")?.trim().parse::<u64>().ok())
        .sum()
}

/// The folders of the `pids` controller that hold this process, its own
/// cgroup and each above it, under `root`: cgroup v2 (`0::/PATH`) or v1
/// (`N:pids:/PATH`).
fn pids_cgroups(cgroup: &str, root: &Path) -> Vec<PathBuf> {
    let Some((base, path)) = cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        match controllers {
            "" if root.join("cgroup.controllers").exists() => Some((root.to_path_buf(), path)),
            c if c.split(',').any(|c| c == "pids") => Some((root.join("pids"), path)),
            _ => None,
        }
    }) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    let mut path = Path::new(path);
    while let Ok(relative) = path.strip_prefix("/") {
        if relative.as_os_str().is_empty() {
            break;
        }
        dirs.push(base.join(relative));
        path = match path.parent() {
            Some(parent) => parent,
            None => break,
        };
    }
    dirs
}

fn read_number(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn count_entries(dir: &str) -> u64 {
    fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_is_one() {
        assert_eq!(n_connections(1), "1 connection");
        assert_eq!(n_connections(0), "0 connections");
        assert_eq!(n_connections(15539), "15539 connections");
    }

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max processes             96367                96367                processes 
Max open files            20000                40000                files     
Max address space         unlimited            unlimited            bytes     
";

    #[test]
    fn proc_files_are_read_as_the_kernel_writes_them() {
        assert_eq!(soft_limit(LIMITS, "Max open files"), Some(20000));
        assert_eq!(soft_limit(LIMITS, "Max processes"), Some(96367));
        assert_eq!(soft_limit(LIMITS, "Max address space"), None);
        assert_eq!(machine_tasks("1.51 1.04 1.34 1/274 8258\n"), Some(274));
        let status = "Name:\tbzpush\nUid:\t65534\t65534\t65534\t65534\nThreads:\t7\n\
                      CapEff:\t0000000000000000\n";
        assert_eq!(real_uid(status), Some(65534));
        assert!(!exempt_from_nproc(status));
        assert!(exempt_from_nproc(
            "Uid:\t0\t0\t0\t0\nCapEff:\t0000000000000000\n"
        ));
        assert!(exempt_from_nproc(
            "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000001000000\n"
        ));
    }

    #[test]
    fn the_pids_cgroup_and_those_above_it_are_found_in_v1_and_v2() {
        let v1 = "9:name=systemd:/\n8:pids:/system.slice/bzpush-run.service\n0::/\n";
        assert_eq!(
            pids_cgroups(v1, Path::new("/sys/fs/cgroup")),
            vec![
                PathBuf::from("/sys/fs/cgroup/pids/system.slice/bzpush-run.service"),
                PathBuf::from("/sys/fs/cgroup/pids/system.slice"),
            ]
        );
        assert!(pids_cgroups("8:pids:/\n", Path::new("/sys/fs/cgroup")).is_empty());
        // v2: only where the unified hierarchy is mounted at the root.
        let root = std::env::temp_dir().join(format!("bzpush-cgroup-{}", std::process::id()));
        fs::create_dir_all(&root).expect("a folder");
        fs::write(root.join("cgroup.controllers"), "pids\n").expect("a file");
        assert_eq!(
            pids_cgroups("0::/system.slice/x.service\n", &root),
            vec![
                root.join("system.slice/x.service"),
                root.join("system.slice")
            ]
        );
        let _ = fs::remove_dir_all(&root);
    }

    fn limit(name: &str, value: u64, used: u64, reserved: u64, per_connection: u64) -> Limit {
        Limit {
            name: name.into(),
            value,
            used,
            reserved,
            per_connection,
            unit: "mapping",
            fix: sysctl(name),
        }
    }

    #[test]
    fn the_tightest_limit_sets_the_budget_and_each_short_one_says_its_fix() {
        let capacity = Capacity {
            limits: vec![
                limit("vm.max_map_count", 65530, 30, 3328, 4),
                limit("kernel.pid_max", 32768, 574, 320, 1),
            ],
        };
        assert_eq!(capacity.connections(), (65530 - 30 - 3328) / 4);
        assert!(
            capacity
                .describe()
                .starts_with("15543 connections (the tightest limit: vm.max_map_count 65530")
        );
        assert_eq!(capacity.shortfall(15000), None);
        let text = capacity.shortfall(50000).expect("short");
        assert!(
            text.starts_with("BZPUSH_MAX_CONNECTIONS=50000 is more than"),
            "{text}"
        );
        // 30 + 3328 + 4 × 50000, rounded up.
        assert!(text.contains("sysctl -w vm.max_map_count=204000"), "{text}");
        assert!(text.contains("sysctl -w kernel.pid_max=51000"), "{text}");
        assert_eq!(Capacity::default().connections(), usize::MAX);
    }
}
