//! The restoring process as the tracer of the task it restores: it seizes
//! the child (with `PTRACE_O_EXITKILL`, so a crash of ours kills the
//! half-restored task), follows the threads the blob creates, waits for every
//! thread's final `int3`, then unmaps the zone with a remote `munmap`, loads
//! each thread's saved registers, XSAVE area and signal mask, and detaches.
use super::abi::{step, TRAP_FAIL, TRAP_OK};
use super::lazy::{LazyMode, LazyPages, LazyRanges};
use super::plan::Plan;
use super::RestoreError;
use crate::image::PagesReader;
use crate::ptrace;
use crate::remote::RemoteThread;
use crm_proto::image::TaskCore;
use std::collections::BTreeSet;
use std::io::Read;

fn perr(tid: i32, what: &str) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Ptrace {
        tid,
        what: what.to_string(),
        source,
    }
}

/// Waits until every thread of the image reached the blob's final trap.
pub fn supervise(plan: &Plan, err_pipe: &mut std::fs::File) -> Result<(), RestoreError> {
    let pid = plan.pid;
    let expected: BTreeSet<i32> = plan.tids.iter().copied().collect();
    supervise_threads(
        &expected,
        |_| pid,
        |_| {
            let mut msg = String::new();
            let _ = err_pipe.read_to_string(&mut msg);
            msg
        },
    )
}

/// Waits until every thread in `expected` (of one or several tasks being
/// restored, all traced by us) reached the blob's final trap. `pid_of`
/// names the task of a thread; `message_of(pid)` is what a task that exited
/// reported before (empty if nothing).
pub fn supervise_threads(
    expected: &BTreeSet<i32>,
    pid_of: impl Fn(i32) -> i32,
    mut message_of: impl FnMut(i32) -> String,
) -> Result<(), RestoreError> {
    let mut done = BTreeSet::new();
    while done != *expected {
        let first = expected.first().copied().unwrap_or(0);
        let (tid, status) =
            ptrace::wait(-1, 0).map_err(perr(pid_of(first), "wait for the restoring task"))?;
        let pid = pid_of(tid);
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            let msg = message_of(pid);
            let how = if libc::WIFEXITED(status) {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            } else {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            };
            return Err(RestoreError::Child {
                pid,
                what: if msg.is_empty() {
                    format!("thread {tid} {how}")
                } else {
                    msg
                },
            });
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if event != 0 {
            // Clone events and the initial stop of new threads.
            ptrace::cont(tid, 0).map_err(perr(tid, "continue"))?;
            continue;
        }
        match sig {
            libc::SIGTRAP => {
                let regs = ptrace::get_regs(tid).map_err(perr(tid, "read registers"))?;
                if regs.r15 == TRAP_OK {
                    if !expected.contains(&tid) {
                        return Err(RestoreError::Child {
                            pid,
                            what: format!("thread {tid} is not in the image"),
                        });
                    }
                    done.insert(tid);
                } else if regs.r15 == TRAP_FAIL {
                    return Err(RestoreError::Restorer {
                        pid,
                        tid,
                        step: step::name(regs.r14),
                        errno: std::io::Error::from_raw_os_error(-(regs.r13 as i64) as i32),
                        detail: regs.r12,
                    });
                } else {
                    return Err(RestoreError::Crashed {
                        pid,
                        tid,
                        signal: sig,
                        rip: regs.rip,
                    });
                }
            }
            libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE => {
                let rip = ptrace::get_regs(tid).map(|r| r.rip).unwrap_or(0);
                return Err(RestoreError::Crashed {
                    pid,
                    tid,
                    signal: sig,
                    rip,
                });
            }
            _ => ptrace::cont(tid, sig).map_err(perr(tid, "continue"))?,
        }
    }
    Ok(())
}

/// Unmaps what is left of the zone, loads the saved CPU state of every
/// thread and lets the task run.
/// With `lazy` (the pages reader and the lazy ranges), prepares lazy memory
/// first ([`super::lazy::setup`]) while the blob's syscall gadget is mapped.
pub fn finish(
    plan: &Plan,
    core: &TaskCore,
    lazy: Option<(PagesReader, LazyRanges, LazyMode)>,
) -> Result<Option<LazyPages>, RestoreError> {
    let pid = plan.pid;
    // Remote syscalls follow: from the task's own CPU.
    let _cpu = crate::same_cpu::SameCpu::as_task(pid);
    // Right after the main thread's int3 sits a `syscall` instruction.
    let gadget = ptrace::get_regs(pid)
        .map_err(perr(pid, "read registers"))?
        .rip;
    let thread = RemoteThread { tid: pid, gadget };
    let lazy = match lazy {
        Some((pages, ranges, mode)) if !ranges.vmas.is_empty() => {
            super::lazy::setup(pid, &thread, pages, &ranges, mode)?
        }
        _ => None,
    };
    thread.syscall(
        libc::SYS_munmap as u64,
        [plan.zone_start, plan.zone_len, 0, 0, 0, 0],
    )?;
    for t in &core.threads {
        let regs = ptrace::regs_from_proto(t.regs.as_ref().expect("checked by the plan"));
        ptrace::set_regs(t.tid, &regs).map_err(perr(t.tid, "set registers"))?;
        if !t.xsave.is_empty() {
            ptrace::set_xstate(t.tid, &t.xsave).map_err(perr(t.tid, "set the XSAVE area"))?;
        }
        ptrace::set_sigmask(t.tid, t.blocked_mask).map_err(perr(t.tid, "set the signal mask"))?;
    }
    for t in &core.threads {
        ptrace::detach(t.tid, 0).map_err(perr(t.tid, "detach"))?;
    }
    Ok(lazy)
}

/// Kills a half-restored task and reaps it.
pub fn kill_and_reap(pid: i32) {
    // SAFETY: kill(2) of the task we created.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    loop {
        match ptrace::wait(-1, 0) {
            Ok((p, st)) if p == pid && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) => {
                // Reap the process itself if the ptrace notification came first.
                let _ = ptrace::wait(pid, libc::WNOHANG);
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
}
