//! Memory of the service processes, from `/proc/<pid>/status`.

use std::fs;

/// The binaries of the system.
pub const SERVICES: [&str; 3] = ["order-service", "payment-service", "notification-service"];

/// The kernel keeps at most this many bytes of a process name in `comm`.
const COMM_LEN: usize = 15;

/// A running service.
#[derive(Clone, Debug)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its name (from `comm`, which the kernel cuts to 15 bytes).
    pub name: String,
}

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    /// Resident now.
    pub rss_kib: u64,
    /// The most ever resident ("high water mark").
    pub hwm_kib: u64,
}

/// The processes named by `--pids`, or else every process whose `comm` is
/// one of [`SERVICES`].
pub fn services(pids: &[u32]) -> Vec<Proc> {
    if !pids.is_empty() {
        return pids
            .iter()
            .map(|&pid| Proc {
                pid,
                name: comm(pid).map_or_else(|| "?".to_string(), |c| full_name(&c)),
            })
            .collect();
    }
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Proc> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|pid| {
            let name = full_name(&comm(pid)?);
            SERVICES
                .contains(&name.as_str())
                .then_some(Proc { pid, name })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// The service whose name `comm` is cut from, else `comm` itself.
fn full_name(comm: &str) -> String {
    SERVICES
        .iter()
        .find(|s| s[..s.len().min(COMM_LEN)] == *comm)
        .map_or(comm, |s| s)
        .to_string()
}

fn comm(pid: u32) -> Option<String> {
    let name = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim_end().to_string())
}

/// VmRSS and VmHWM of `pid`; `None` when it is gone.
pub fn mem(pid: u32) -> Option<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    Some(Mem {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, which
/// Linux fixes at 100 for user space on every architecture we run on.
const USER_HZ: u64 = 100;

/// User plus system CPU time `pid` has used so far; `None` when it is gone.
pub fn cpu(pid: u32) -> Option<std::time::Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) may hold spaces and parentheses: count fields
    // from the last ')'. utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis(
        (utime + stime) * 1000 / USER_HZ,
    ))
}
