//! Freeing a killed process's PIDs before its memory.
//!
//! A process's PID is free only once it has exited and been reaped, and its
//! exit first tears down its address space: for a GiB of memory that is
//! tens of milliseconds (70 ms measured on the development VM), paid inside
//! the downtime of a same-host migration, where the restored copy needs the
//! same PID. A [`MemoryHolder`] is a second task sharing the address space
//! (`clone(CLONE_VM)`, injected into the frozen process): with it alive the
//! process's exit only drops a reference, so it exits and is reaped at
//! once, and the address space is torn down when the holder is dropped,
//! after the PIDs were handed over.
//!
//! The holder never runs code of its own: it is created traced
//! (`PTRACE_O_TRACEFORK`), made to call `setsid()` (so that it does not
//! keep the process's PID in use as its group and session ID) and
//! `close_range()` (so that it keeps none of its files open: locks, FIFOs,
//! sockets go with the process), and stays
//! stopped until it is killed. Like every ptrace object it must be dropped on the thread
//! that froze the process (it is not `Send`). Its exit is reported to its
//! parent (the process's parent's nearest subreaper once the process is
//! gone) as an ordinary SIGCHLD.
use crate::freeze::FrozenProcess;
use crate::procfs;
use crate::ptrace;
use crate::remote::{self, RemoteError};
use std::io;
use std::marker::PhantomData;

/// Why no holder could be made (the caller then kills without one).
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("process {pid}: no [vdso] to run clone from")]
    NoVdso { pid: i32 },
    #[error("process {pid}: {what}")]
    Io {
        pid: i32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// A stopped task sharing a killed process's address space; dropping it
/// kills it (and so frees the memory) and waits for its exit.
#[derive(Debug)]
pub struct MemoryHolder {
    pid: i32,
    /// ptrace requests must come from the tracing thread.
    _not_send: PhantomData<*const ()>,
}

impl MemoryHolder {
    /// Creates a holder for the address space of `frozen`, by making its
    /// main thread call `clone(CLONE_VM | SIGCHLD)` while traced with
    /// `PTRACE_O_TRACEFORK`. The process stays frozen and unchanged
    /// (registers restored) apart from the new child.
    pub fn spawn(frozen: &FrozenProcess) -> Result<MemoryHolder, HolderError> {
        let pid = frozen.pid();
        // Remote syscalls follow: from the process's own CPU.
        let _cpu = crate::same_cpu::SameCpu::as_task(pid);
        let io_err = |what| move |source| HolderError::Io { pid, what, source };
        let maps = procfs::read_maps(pid).map_err(|e| HolderError::Io {
            pid,
            what: "reading /proc/PID/maps",
            source: io::Error::other(e.to_string()),
        })?;
        let vdso = maps
            .iter()
            .find(|m| m.name == "[vdso]")
            .ok_or(HolderError::NoVdso { pid })?;
        let gadget = remote::find_vdso_gadget(pid, vdso.start, vdso.len())
            .map_err(io_err("finding a syscall instruction in [vdso]"))?;
        // clone with exit signal SIGCHLD reports as a fork event.
        ptrace::set_options(
            pid,
            ptrace::PTRACE_O_TRACEFORK | ptrace::PTRACE_O_TRACECLONE,
        )
        .map_err(io_err("setting PTRACE_O_TRACEFORK"))?;
        let r = clone_vm(pid, gadget);
        let _ = ptrace::set_options(pid, 0);
        let holder = MemoryHolder {
            pid: r?,
            _not_send: PhantomData,
        };
        // The holder was born in the process's group and session, whose IDs
        // are the process's PID: it would keep that PID in use. It leaves
        // both (its first and only syscall). On error `holder` is dropped:
        // killed and waited for.
        let remote = remote::RemoteThread {
            tid: holder.pid,
            gadget,
        };
        remote.syscall(libc::SYS_setsid as u64, [0; 6])?;
        // Its copy of the descriptor table would keep the process's open
        // files alive after the process is gone: flock and OFD locks held,
        // FIFOs and sockets open. It closes them all (its own POSIX locks
        // are none; the process's are not its to drop).
        remote.syscall(
            libc::SYS_close_range as u64,
            [0, u32::MAX as u64, 0, 0, 0, 0],
        )?;
        tracing::debug!(
            pid,
            holder = holder.pid,
            "address space held by a second task"
        );
        Ok(holder)
    }

    /// The holder's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for MemoryHolder {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the task we created and trace.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        // As its tracer, consume its exit so that its parent can reap it.
        loop {
            match ptrace::wait(self.pid, 0) {
                Ok((_, st)) if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
}

/// Runs `clone(CLONE_VM | SIGCHLD, 0)` in stopped thread `tid` (traced with
/// `PTRACE_O_TRACEFORK`) and returns the child, stopped in its first
/// ptrace stop. The thread's registers are restored.
fn clone_vm(tid: i32, gadget: u64) -> Result<i32, HolderError> {
    let nr = libc::SYS_clone as u64;
    let perr = |source| RemoteError::Ptrace { tid, nr, source };
    let saved = ptrace::get_regs(tid).map_err(perr)?;
    let mut r = saved;
    r.rax = nr;
    r.orig_rax = u64::MAX;
    // The child shares the stack pointer too, but never runs: it stops
    // before its first instruction in user space.
    r.rdi = (libc::CLONE_VM | libc::SIGCHLD) as u64;
    r.rsi = 0;
    r.rdx = 0;
    r.r10 = 0;
    r.r8 = 0;
    r.rip = gadget;
    ptrace::set_regs(tid, &r).map_err(perr)?;
    let child = step_over_clone(tid, nr);
    let restored = ptrace::set_regs(tid, &saved).map_err(perr);
    let child = child?;
    restored?;
    // The child starts with a pending ptrace stop (it was auto-attached).
    match ptrace::wait(child, 0) {
        Ok((_, st)) if libc::WIFSTOPPED(st) => Ok(child),
        Ok((_, st)) => Err(RemoteError::Unexpected {
            tid,
            nr,
            what: format!("new task {child} reported wait status {st:#x}"),
        }
        .into()),
        Err(source) => Err(RemoteError::Ptrace { tid, nr, source }.into()),
    }
}

/// Single-steps `tid` over the clone: a `PTRACE_EVENT_FORK` stop (giving
/// the child's PID), then the step's SIGTRAP with the syscall's result.
fn step_over_clone(tid: i32, nr: u64) -> Result<i32, HolderError> {
    let perr = |source| RemoteError::Ptrace { tid, nr, source };
    let mut child = None;
    for _ in 0..4 {
        ptrace::singlestep(tid).map_err(perr)?;
        let (_, st) = ptrace::wait(tid, 0).map_err(perr)?;
        if !libc::WIFSTOPPED(st) || libc::WSTOPSIG(st) != libc::SIGTRAP {
            return Err(RemoteError::Unexpected {
                tid,
                nr,
                what: format!("wait status {st:#x}"),
            }
            .into());
        }
        let event = st >> 16;
        if event == ptrace::PTRACE_EVENT_FORK || event == ptrace::PTRACE_EVENT_CLONE {
            child = Some(ptrace::event_msg(tid).map_err(perr)? as i32);
            continue;
        }
        // The single step is done: the syscall returned.
        let rax = ptrace::get_regs(tid).map_err(perr)?.rax as i64;
        if (-4095..0).contains(&rax) {
            return Err(RemoteError::Failed {
                tid,
                nr,
                source: io::Error::from_raw_os_error(-rax as i32),
            }
            .into());
        }
        return child.ok_or_else(|| {
            // An untraced child would run the target's code on its stack:
            // never leave one behind.
            // SAFETY: plain kill(2) of the child the syscall just created.
            unsafe { libc::kill(rax as i32, libc::SIGKILL) };
            RemoteError::Unexpected {
                tid,
                nr,
                what: format!("clone returned {rax} without a fork event"),
            }
            .into()
        });
    }
    Err(RemoteError::Unexpected {
        tid,
        nr,
        what: "no end of the clone after 4 steps".into(),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Forks a session leader holding `mib` MiB of written memory, which
    /// then sleeps.
    fn spawn_session_leader(mib: usize) -> i32 {
        // SAFETY: the child only makes raw syscalls and writes its own
        // fresh mapping, never allocates or takes a lock, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: raw syscalls in the child; the mapping is ours.
            unsafe {
                libc::setsid();
                let len = mib * MIB;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    libc::memset(p, 0x5a, len);
                }
                loop {
                    libc::pause();
                }
            }
        }
        pid
    }

    fn status_field(pid: i32, key: &str) -> Option<String> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
    }

    fn session_of(pid: i32) -> i32 {
        let stat = procfs::read_stat(pid).expect("stat of a live task");
        stat.session
    }

    #[test]
    fn holder_keeps_the_memory_and_frees_the_pid() {
        // Orphans (the holder, once its parent is killed) must come back to
        // us to be reaped: PID 1 may never reap them.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let pid = spawn_session_leader(64);
        // Wait until the child has written its memory.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rss = status_field(pid, "VmRSS:").unwrap_or_default();
            let kb: usize = rss.trim_end_matches(" kB").parse().unwrap_or(0);
            if kb >= 64 * 1024 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child never wrote its memory"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(session_of(pid), pid, "the child leads its session");

        let frozen = FrozenProcess::freeze(pid).expect("freeze");
        let holder = MemoryHolder::spawn(&frozen).expect("spawn a holder");
        let h = holder.pid();
        assert_ne!(h, pid);
        assert_eq!(session_of(h), h, "the holder left the child's session");
        frozen.kill().expect("kill");
        let mut st = 0;
        // As tracer and parent both, `kill`'s wait for the exit already
        // reaped it; reap it here otherwise.
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        assert!(r == pid || io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD));
        // The PID is free, the memory lives on in the holder.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        let rss = status_field(h, "VmRSS:").expect("holder alive");
        let kb: usize = rss.trim_end_matches(" kB").parse().unwrap();
        assert!(kb >= 64 * 1024, "holder RSS {kb} kB");

        drop(holder);
        // Reparented to us (subreaper), so the tracer's wait in `drop`
        // reaped it already; reap it otherwise.
        // SAFETY: reaping a task that is now our child.
        let r = unsafe { libc::waitpid(h, &mut st, libc::__WALL) };
        assert!(r == h || io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD));
        assert!(!std::path::Path::new(&format!("/proc/{h}")).exists());
    }
}
