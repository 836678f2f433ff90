//! Freezing a process: seize and stop every thread with ptrace, and let it
//! go again exactly as it was. A [`FrozenProcess`] is the unit of
//! consistency for a dump; dropping it without [`FrozenProcess::kill`]
//! resumes the process (its signal masks restored), so an error anywhere in a
//! dump leaves the target running and untouched.
use crate::procfs;
use crate::ptrace;
use std::collections::BTreeMap;
use std::io;

/// Why a process could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("process {pid} does not exist")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid} is a zombie (state Z): there is nothing left to dump")]
    Zombie { pid: i32 },
    #[error("process {pid} is the dumper itself")]
    IsSelf { pid: i32 },
    #[error("cannot seize thread {tid} of process {pid} with ptrace")]
    Seize {
        pid: i32,
        tid: i32,
        #[source]
        source: io::Error,
    },
    #[error("thread {tid} of process {pid} did not stop")]
    Stop {
        pid: i32,
        tid: i32,
        #[source]
        source: io::Error,
    },
    #[error("reading /proc for process {pid}")]
    Proc {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
}

/// A stopped thread and what freezing changed in it (to be undone).
#[derive(Debug)]
pub struct FrozenThread {
    pub tid: i32,
    /// The thread's signal mask before freezing; while frozen every signal is
    /// blocked so that injected syscalls are not interrupted.
    pub blocked: u64,
}

#[derive(Debug)]
pub struct FrozenProcess {
    pid: i32,
    threads: BTreeMap<i32, FrozenThread>,
    released: bool,
    /// It was stopped by job control (state `T`) when seized; detaching
    /// leaves it stopped (the group stop stays in force).
    job_stopped: bool,
}

impl FrozenProcess {
    /// Seizes and stops every thread of `pid`, re-reading the thread list until
    /// no new thread appears (threads may be created while we seize).
    pub fn freeze(pid: i32) -> Result<FrozenProcess, FreezeError> {
        if pid == std::process::id() as i32 {
            return Err(FreezeError::IsSelf { pid });
        }
        let stat = procfs::read_stat(pid).map_err(|e| {
            if e.is_not_found() {
                FreezeError::NoSuchProcess { pid }
            } else {
                FreezeError::Proc { pid, source: e }
            }
        })?;
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(FreezeError::Zombie { pid });
        }
        let mut frozen = FrozenProcess {
            pid,
            threads: BTreeMap::new(),
            released: false,
            job_stopped: stat.state == 'T',
        };
        loop {
            let tids = procfs::list_tasks(pid).map_err(|e| FreezeError::Proc { pid, source: e })?;
            let new: Vec<i32> = tids
                .into_iter()
                .filter(|t| !frozen.threads.contains_key(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for &tid in &new {
                match ptrace::seize(tid, 0) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(source) => return Err(FreezeError::Seize { pid, tid, source }),
                }
                // Insert before waiting so that Drop detaches it on error.
                frozen.threads.insert(tid, FrozenThread { tid, blocked: 0 });
                ptrace::interrupt(tid).map_err(|source| FreezeError::Stop { pid, tid, source })?;
            }
            for &tid in &new {
                if !frozen.threads.contains_key(&tid) {
                    continue;
                }
                match wait_for_stop(tid) {
                    Ok(true) => {}
                    Ok(false) => {
                        frozen.threads.remove(&tid);
                        continue;
                    }
                    Err(source) => return Err(FreezeError::Stop { pid, tid, source }),
                }
                let blocked = ptrace::get_sigmask(tid).map_err(|source| FreezeError::Stop {
                    pid,
                    tid,
                    source,
                })?;
                ptrace::set_sigmask(tid, !0u64).map_err(|source| FreezeError::Stop {
                    pid,
                    tid,
                    source,
                })?;
                frozen
                    .threads
                    .get_mut(&tid)
                    .expect("inserted above")
                    .blocked = blocked;
            }
        }
        if !frozen.threads.contains_key(&pid) {
            return Err(FreezeError::NoSuchProcess { pid });
        }
        if frozen.job_stopped {
            frozen.end_group_stop()?;
        }
        tracing::debug!(pid, threads = frozen.threads.len(), "process frozen");
        Ok(frozen)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A thread in a group stop (job control) cannot run remote syscalls:
    /// each resume traps again. Ends the group stop with SIGCONT (blocked
    /// in every thread by now, so not delivered: the stop signal that
    /// [`FrozenProcess::thaw`] sends discards it) and takes each thread's
    /// trap again. The parent sees the process continue, then stop again.
    fn end_group_stop(&mut self) -> Result<(), FreezeError> {
        let pid = self.pid;
        // SAFETY: kill(2) on the process we hold seized.
        if unsafe { libc::kill(pid, libc::SIGCONT) } != 0 {
            return Err(FreezeError::Stop {
                pid,
                tid: pid,
                source: io::Error::last_os_error(),
            });
        }
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        for tid in tids {
            let stopped =
                take_notify_trap(tid).map_err(|source| FreezeError::Stop { pid, tid, source })?;
            if !stopped {
                self.threads.remove(&tid);
            }
        }
        Ok(())
    }

    /// Stopped by job control when it was seized.
    pub fn job_stopped(&self) -> bool {
        self.job_stopped
    }

    /// Threads in TID order; the main thread (TID == PID) first.
    pub fn threads(&self) -> Vec<&FrozenThread> {
        let mut v: Vec<&FrozenThread> = self.threads.values().collect();
        v.sort_by_key(|t| (t.tid != self.pid, t.tid));
        v
    }

    /// Resumes every thread as it was.
    pub fn thaw(mut self) -> io::Result<()> {
        self.release()
    }

    fn release(&mut self) -> io::Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_err = None;
        if self.job_stopped {
            // Queued while traced: it stops again as soon as it is let go.
            // SAFETY: kill(2) on the process we hold seized.
            if unsafe { libc::kill(self.pid, libc::SIGSTOP) } != 0 {
                first_err = Some(io::Error::last_os_error());
            }
        }
        for t in self.threads.values() {
            let r = ptrace::set_sigmask(t.tid, t.blocked).and_then(|_| ptrace::detach(t.tid, 0));
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::ESRCH) && first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the frozen process (after a successful dump) and waits until its
    /// threads are gone from our side.
    pub fn kill(mut self) -> io::Result<()> {
        self.released = true;
        // SAFETY: plain kill(2) on a pid we hold frozen.
        let r = unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // Consume the ptrace exit notifications so the real parent can reap.
        // The leader's is reported only after every other thread's.
        let mut order: Vec<i32> = self
            .threads
            .keys()
            .copied()
            .filter(|&t| t != self.pid)
            .collect();
        order.push(self.pid);
        for tid in order {
            loop {
                match ptrace::wait(tid, 0) {
                    Ok((_, st)) if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }
}

impl Drop for FrozenProcess {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(pid = self.pid, error = %e, "could not resume every thread");
        }
    }
}

/// Waits for the ptrace stop that follows PTRACE_INTERRUPT. Signals that
/// arrive first are delivered (the thread runs its handler) and we wait
/// again. Returns false if the thread exited.
/// After a SIGCONT ended the group stop of a seized thread, the kernel
/// holds a trap notification for it: resumed, it traps again at once.
/// Takes that trap (or, if none comes within 100 ms, interrupts it);
/// `false` if the thread exited.
fn take_notify_trap(tid: i32) -> io::Result<bool> {
    ptrace::cont(tid, 0)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    loop {
        let (got, status) = ptrace::wait(tid, libc::WNOHANG)?;
        if got == tid {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Ok(false);
            }
            if libc::WIFSTOPPED(status) && status >> 16 == ptrace::PTRACE_EVENT_STOP {
                return Ok(true);
            }
            // Anything else: stop it the ordinary way.
            if libc::WIFSTOPPED(status) {
                ptrace::cont(tid, 0)?;
            }
            break;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    ptrace::interrupt(tid)?;
    wait_for_stop(tid)
}

fn wait_for_stop(tid: i32) -> io::Result<bool> {
    for _ in 0..1000 {
        let (_, status) = ptrace::wait(tid, 0)?;
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok(false);
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let event = status >> 16;
        if event == ptrace::PTRACE_EVENT_STOP {
            return Ok(true);
        }
        // A signal-delivery stop: let the signal through and stop again.
        let sig = libc::WSTOPSIG(status);
        ptrace::cont(tid, if event == 0 { sig } else { 0 })?;
        ptrace::interrupt(tid)?;
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "signals kept arriving",
    ))
}
