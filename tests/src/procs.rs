//! Process plumbing for the harness: child subreaper, `/proc` queries, waiting for
//! and reaping children.
//!
//! Reaping must not steal the exit status of a child another part of the test
//! process still waits for (a running `cr-migrate`, a workload guard of a test running
//! in parallel). So instead of a blind `waitpid(-1)` loop, [`reap_zombies`] scans
//! `/proc` for zombie children and reaps each one with `waitpid(pid)`, skipping the
//! PIDs registered as owned ([`own`], [`disown`]).

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// PIDs whose exit status belongs to a guard or a running command.
static OWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn owned() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers `pid` as owned: [`reap_zombies`] leaves it alone.
pub fn own(pid: i32) {
    owned().insert(pid);
}

/// Removes `pid` from the owned set.
pub fn disown(pid: i32) {
    owned().remove(&pid);
}

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`).
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory
    // of ours; the unused arguments are passed as zero.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the calling process is a child subreaper.
pub fn is_subreaper() -> bool {
    let mut v: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one c_int through the pointer, which points
    // to a live local.
    let rc = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut v as *mut libc::c_int) };
    rc == 0 && v != 0
}

/// Our own PID.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// The fields of `/proc/PID/stat` the harness needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// `comm`, without the parentheses.
    pub comm: String,
    /// State letter: R, S, D, T, t, Z, X, ...
    pub state: char,
    /// Parent PID.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
}

/// Parses `/proc/PID/stat`; `None` if the process does not exist.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // comm may contain spaces and parentheses: it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    let session = rest.next()?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        ppid,
        pgrp,
        session,
    })
}

/// Whether `pid` exists and is not a zombie (or dead).
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some(s) if s.state != 'Z' && s.state != 'X')
}

/// `TracerPid` from `/proc/PID/status`.
pub fn tracer_pid(pid: i32) -> Option<i32> {
    status_field(pid, "TracerPid").and_then(|v| v.parse().ok())
}

/// One field of `/proc/PID/status`, trimmed.
pub fn status_field(pid: i32, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// The thread IDs of `pid`, sorted (`/proc/PID/task`).
pub fn task_ids(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// The open fds of `pid`: number → `readlink` target (`/proc/PID/fd`).
pub fn fds(pid: i32) -> std::collections::BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((n, target.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The memory map of `pid` as `start-end perms offset path` lines (device and inode
/// left out).
pub fn maps(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5..).map(|p| p.join(" ")).unwrap_or_default();
            format!(
                "{} {} {} {path}",
                f.first().unwrap_or(&""),
                f.get(1).unwrap_or(&""),
                f.get(2).unwrap_or(&"")
            )
            .trim_end()
            .to_string()
        })
        .collect()
}

/// `/proc/PID/exe`, if readable.
pub fn exe(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        // Never signal a process group or "every process" by mistake.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "pid <= 0"));
    }
    // SAFETY: kill(2) only takes integers and touches no memory of ours; pid > 0
    // names exactly one process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Outcome of [`wait_pid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Reaped, with the raw wait status.
    Exited(i32),
    /// Not (or no longer) our child.
    NotChild,
    /// Still running after the timeout.
    Timeout,
}

/// Waits up to `timeout` for our child `pid` to end and reaps it.
pub fn wait_pid(pid: i32, timeout: Duration) -> Waited {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into a live local; WNOHANG never blocks.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return Waited::Exited(status);
        }
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Waited::NotChild;
            }
        }
        if Instant::now() >= deadline {
            return Waited::Timeout;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Human-readable form of a raw wait status.
pub fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Reaps every zombie child that is not owned; returns `(pid, raw status)` of each.
pub fn reap_zombies() -> Vec<(i32, i32)> {
    let me = getpid();
    let mut reaped = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return reaped;
    };
    let candidates: Vec<i32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| matches!(stat(pid), Some(s) if s.ppid == me && s.state == 'Z'))
        .collect();
    for pid in candidates {
        if owned().contains(&pid) {
            continue;
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into a live local; WNOHANG never blocks.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            reaped.push((pid, status));
        }
    }
    reaped
}

/// Waits up to `timeout` until `pid` is gone or a zombie, reaping unowned zombie
/// children meanwhile. Returns whether it is gone (not alive).
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        reap_zombies();
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs `pid` if alive and reaps it (if it is our child) or waits until it is
/// gone. For leftovers a test did not start through a [`crate::Workload`], e.g. a
/// process a failed restore left behind. Returns whether it is gone.
pub fn kill_and_reap(pid: i32) -> bool {
    if alive(pid) {
        let _ = kill(pid, libc::SIGKILL);
    }
    match wait_pid(pid, Duration::from_secs(5)) {
        Waited::Exited(_) => {
            reap_zombies();
            true
        }
        Waited::NotChild | Waited::Timeout => wait_gone(pid, Duration::from_secs(5)),
    }
}

/// A PID that no process uses right now (searched downwards from `pid_max`).
pub fn unused_pid() -> i32 {
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (300..max)
        .rev()
        .find(|pid| stat(*pid).is_none() && !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("no unused PID")
}

/// Panics unless `pid` is alive, not ptrace-attached and not stopped: what a
/// refused or failed dump must leave (`what` names the situation).
pub fn assert_running_untraced(pid: i32, what: &str) {
    assert!(alive(pid), "{what}: pid {pid} is gone");
    assert_eq!(
        tracer_pid(pid),
        Some(0),
        "{what}: pid {pid} is still ptrace-attached"
    );
    let state = stat(pid).map(|s| s.state);
    assert!(
        !matches!(state, Some('T' | 't')),
        "{what}: pid {pid} left stopped (state {state:?})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let s = parse_stat("42 (a) b (c)) S 1 42 42 0 -1 4194560 0").unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!((s.state, s.ppid, s.pgrp, s.session), ('S', 1, 42, 42));
    }

    #[test]
    fn own_stat_is_alive() {
        let s = stat(getpid()).unwrap();
        assert!(alive(getpid()));
        assert_ne!(s.state, 'Z');
        assert!(!task_ids(getpid()).is_empty());
    }
}
