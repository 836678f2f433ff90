//! Collecting a frozen task's non-memory state: threads (registers, XSAVE,
//! signal masks, rseq, sigaltstack, tid address, robust list, pending
//! signals), sigactions, itimers, rlimits, credentials, and the mm fields for
//! `PR_SET_MM_MAP`. What `/proc` and ptrace do not show is obtained with
//! remote syscalls in the stopped threads, using a scratch page mapped into
//! the target for the duration of the dump.
use super::DumpError;
use crate::freeze::FrozenProcess;
use crate::procfs;
use crate::ptrace;
use crate::remote::RemoteThread;
use crm_proto::image::*;

const PR_GET_TID_ADDRESS: u64 = 40;
const PR_GET_SECUREBITS: u64 = 27;
const PR_GET_CHILD_SUBREAPER: u64 = 37;

/// A page of memory mapped into the target for syscall arguments.
pub struct Scratch {
    pub addr: u64,
    main: RemoteThread,
    pid: i32,
}

impl Scratch {
    pub fn map(pid: i32, gadget: u64) -> Result<Scratch, DumpError> {
        let main = RemoteThread { tid: pid, gadget };
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let addr = main.syscall(libc::SYS_mmap as u64, [0, 4096, prot, flags, u64::MAX, 0])?;
        Ok(Scratch { addr, main, pid })
    }

    pub fn read(&self, len: usize) -> Result<Vec<u8>, DumpError> {
        let mut buf = vec![0u8; len];
        ptrace::read_mem(self.pid, self.addr, &mut buf).map_err(|source| DumpError::Io {
            pid: self.pid,
            what: "read the scratch page".into(),
            source,
        })?;
        Ok(buf)
    }

    pub fn unmap(self) -> Result<(), DumpError> {
        self.main
            .syscall(libc::SYS_munmap as u64, [self.addr, 4096, 0, 0, 0, 0])?;
        Ok(())
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The handler of every signal but SIGKILL and SIGSTOP, asked with
/// `rt_sigaction` in the task: all in one go where the task can map a page
/// of code ([`RemoteThread::syscalls`]), else one remote syscall each.
fn dump_sigactions(
    pid: i32,
    main: &RemoteThread,
    scratch: &Scratch,
) -> Result<Vec<SigAction>, DumpError> {
    const ACT: u64 = 32;
    const RESULTS: u64 = 2048;
    let signals: Vec<u32> = (1..=64u32)
        .filter(|&s| s != libc::SIGKILL as u32 && s != libc::SIGSTOP as u32)
        .collect();
    let nr = libc::SYS_rt_sigaction as u64;
    let at = |i: usize| scratch.addr + i as u64 * ACT;
    let calls: Vec<(u64, [u64; 6])> = signals
        .iter()
        .enumerate()
        .map(|(i, &sig)| (nr, [u64::from(sig), 0, at(i), 8, 0, 0]))
        .collect();
    let action = |sig: u32, a: &[u8]| SigAction {
        signo: sig,
        handler: u64_at(a, 0),
        flags: u64_at(a, 8),
        restorer: u64_at(a, 16),
        mask: u64_at(a, 24),
    };
    if main.syscalls(&calls, scratch.addr + RESULTS)? {
        let page = scratch.read(4096)?;
        let mut out = Vec::with_capacity(signals.len());
        for (i, &sig) in signals.iter().enumerate() {
            let ret = u64_at(&page, RESULTS as usize + 8 * i) as i64;
            if ret != 0 {
                return Err(crate::remote::RemoteError::Failed {
                    tid: pid,
                    nr,
                    source: std::io::Error::from_raw_os_error(-ret as i32),
                }
                .into());
            }
            let off = i * ACT as usize;
            out.push(action(sig, &page[off..off + ACT as usize]));
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(signals.len());
    for &sig in &signals {
        main.syscall(nr, [u64::from(sig), 0, scratch.addr, 8, 0, 0])?;
        out.push(action(sig, &scratch.read(ACT as usize)?));
    }
    Ok(out)
}

/// Everything about one thread.
fn dump_thread(
    pid: i32,
    tid: i32,
    blocked: u64,
    gadget: u64,
    scratch: &Scratch,
) -> Result<ThreadCore, DumpError> {
    let perr = |what: &str| {
        let what = what.to_string();
        move |source| DumpError::Ptrace {
            pid,
            tid,
            what,
            source,
        }
    };
    let mut regs = ptrace::get_regs(tid).map_err(perr("read registers"))?;
    let xsave = ptrace::get_xstate(tid).map_err(perr("read the XSAVE area"))?;
    let rseq_conf = ptrace::get_rseq_config(tid).map_err(perr("read the rseq configuration"))?;
    let pending = ptrace::peek_siginfo(tid, false)
        .map_err(perr("read pending signals"))?
        .into_iter()
        .map(|s| PendingSignal {
            siginfo: s.to_vec(),
        })
        .collect();
    let remote = RemoteThread { tid, gadget };
    remote.syscall(
        libc::SYS_prctl as u64,
        [PR_GET_TID_ADDRESS, scratch.addr, 0, 0, 0, 0],
    )?;
    let clear_child_tid = u64_at(&scratch.read(8)?, 0);
    remote.syscall(libc::SYS_sigaltstack as u64, [0, scratch.addr, 0, 0, 0, 0])?;
    let ss = scratch.read(24)?;
    let sigaltstack = SigAltStack {
        sp: u64_at(&ss, 0),
        flags: i32::from_ne_bytes(ss[8..12].try_into().expect("4 bytes")),
        size: u64_at(&ss, 16),
    };
    let (mut head, mut len) = (0u64, 0usize);
    // SAFETY: get_robust_list writes one pointer and one size_t to the two
    // out-parameters, which live on our stack.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head, &mut len) };
    if r != 0 {
        return Err(perr("get_robust_list")(std::io::Error::last_os_error()));
    }
    let rseq = if rseq_conf.rseq_abi_pointer != 0 {
        fixup_rseq_ip(pid, &rseq_conf, &mut regs);
        Some(Rseq {
            abi_pointer: rseq_conf.rseq_abi_pointer,
            abi_size: rseq_conf.rseq_abi_size,
            signature: rseq_conf.signature,
            flags: rseq_conf.flags,
        })
    } else {
        None
    };
    Ok(ThreadCore {
        tid,
        comm: procfs::read_comm(pid, tid)?,
        regs: Some(ptrace::regs_to_proto(&regs)),
        xsave,
        blocked_mask: blocked,
        rseq,
        sigaltstack: Some(sigaltstack),
        clear_child_tid,
        robust_list_head: head,
        robust_list_len: len as u64,
        pending,
    })
}

/// A thread stopped inside an rseq critical section would be sent to the
/// section's abort handler by the kernel on resume; the image records where
/// it would have resumed.
fn fixup_rseq_ip(pid: i32, conf: &ptrace::RseqConfig, regs: &mut ptrace::Regs) {
    let mut cs_ptr = [0u8; 8];
    if ptrace::read_mem(pid, conf.rseq_abi_pointer + 8, &mut cs_ptr).is_err() {
        return;
    }
    let cs = u64::from_ne_bytes(cs_ptr);
    if cs == 0 {
        return;
    }
    let mut desc = [0u8; 32];
    if ptrace::read_mem(pid, cs, &mut desc).is_err() {
        return;
    }
    let start = u64_at(&desc, 8);
    let post_commit = u64_at(&desc, 16);
    let abort = u64_at(&desc, 24);
    if regs.rip >= start && regs.rip < start.saturating_add(post_commit) {
        tracing::debug!(
            pid,
            rip = regs.rip,
            abort,
            "thread inside an rseq critical section"
        );
        regs.rip = abort;
    }
}

pub struct Collected {
    pub core: TaskCore,
    pub brk: u64,
}

/// Collects the task's state. The caller maps `scratch` and unmaps it after.
pub fn collect(
    frozen: &FrozenProcess,
    gadget: u64,
    scratch: &Scratch,
) -> Result<Collected, DumpError> {
    let pid = frozen.pid();
    let stat = procfs::read_stat(pid)?;
    let status = procfs::read_status(pid)?;
    if status.seccomp != 0 {
        return Err(DumpError::Unsupported {
            pid,
            what: "the process runs under seccomp".into(),
        });
    }
    let main = RemoteThread { tid: pid, gadget };

    let mut threads = Vec::new();
    for t in frozen.threads() {
        threads.push(dump_thread(pid, t.tid, t.blocked, gadget, scratch)?);
    }

    let sigactions = dump_sigactions(pid, &main, scratch)?;

    let mut itimers = Vec::new();
    for which in 0..3u32 {
        main.syscall(
            libc::SYS_getitimer as u64,
            [which as u64, scratch.addr, 0, 0, 0, 0],
        )?;
        let t = scratch.read(32)?;
        let us = |off| u64_at(&t, off) * 1_000_000 + u64_at(&t, off + 8);
        itimers.push(ITimer {
            which,
            interval_us: us(0),
            value_us: us(16),
        });
    }

    let posix_timers = super::posix_timers::dump(pid, &main, scratch)?;

    let mut rlimits = Vec::new();
    for res in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a null new limit only writes `old`.
        let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EPERM) {
                return Err(DumpError::Io {
                    pid,
                    what: format!("prlimit resource {res}"),
                    source: err,
                });
            }
            // Reading another user's limits needs CAP_SYS_RESOURCE; the
            // task may always read its own.
            main.syscall(
                libc::SYS_prlimit64 as u64,
                [0, u64::from(res), 0, scratch.addr, 0, 0],
            )?;
            let l = scratch.read(16)?;
            old.rlim_cur = u64_at(&l, 0);
            old.rlim_max = u64_at(&l, 8);
        }
        rlimits.push(RLimit {
            resource: res,
            soft: old.rlim_cur,
            hard: old.rlim_max,
        });
    }

    let securebits =
        main.syscall(libc::SYS_prctl as u64, [PR_GET_SECUREBITS, 0, 0, 0, 0, 0])? as u32;
    let brk = main.syscall(libc::SYS_brk as u64, [0; 6])?;
    main.syscall(
        libc::SYS_prctl as u64,
        [PR_GET_CHILD_SUBREAPER, scratch.addr, 0, 0, 0, 0],
    )?;
    let child_subreaper = scratch.read(4)?.iter().any(|&b| b != 0);
    let shared_pending = ptrace::peek_siginfo(pid, true)
        .map_err(|source| DumpError::Ptrace {
            pid,
            tid: pid,
            what: "read shared pending signals".into(),
            source,
        })?
        .into_iter()
        .map(|s| PendingSignal {
            siginfo: s.to_vec(),
        })
        .collect();

    let link = |name: &str| -> Result<String, DumpError> {
        Ok(procfs::read_link_of(pid, name)?
            .to_string_lossy()
            .into_owned())
    };
    let core = TaskCore {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: stat.comm.clone(),
        personality: procfs::read_personality(pid)?,
        umask: status.umask,
        cwd: link("cwd")?,
        root: link("root")?,
        creds: Some(Creds {
            uids: status.uids.to_vec(),
            gids: status.gids.to_vec(),
            groups: status.groups.clone(),
            cap_inh: status.cap_inh,
            cap_prm: status.cap_prm,
            cap_eff: status.cap_eff,
            cap_bnd: status.cap_bnd,
            cap_amb: status.cap_amb,
            securebits,
            no_new_privs: status.no_new_privs,
        }),
        rlimits,
        sigactions,
        itimers,
        posix_timers,
        shared_pending,
        threads,
        exit_signal: stat.exit_signal,
        child_subreaper,
        job_stopped: frozen.job_stopped(),
    };
    Ok(Collected { core, brk })
}

/// The mm fields restored with `PR_SET_MM_MAP`.
pub fn mm_fields(pid: i32, brk: u64) -> Result<MmCore, DumpError> {
    let stat = procfs::read_stat(pid)?;
    let exe_path = procfs::read_link_of(pid, "exe")?;
    let exe_str = exe_path.to_string_lossy().into_owned();
    if exe_str.ends_with(" (deleted)") {
        return Err(DumpError::Unsupported {
            pid,
            what: format!("its executable {exe_str} was deleted"),
        });
    }
    let meta = std::fs::metadata(format!("/proc/{pid}/exe")).map_err(|source| DumpError::Io {
        pid,
        what: "stat /proc/PID/exe".into(),
        source,
    })?;
    Ok(MmCore {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv: procfs::read_auxv(pid)?,
        exe: Some(crate::files::regular::file_id(&exe_str, &meta)),
        vmas: Vec::new(),
        ..Default::default()
    })
}
