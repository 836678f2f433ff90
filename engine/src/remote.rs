//! Remote syscalls: making a stopped thread execute one system call for us.
//! The thread's registers are saved, `rip` is pointed at a `syscall`
//! instruction (a "gadget": in the vDSO for a dump, in the restorer blob for
//! a restore), arguments are set, the thread single-steps over it, and the
//! registers are restored. Buffers the syscall reads or writes live in a
//! scratch page mapped into the target for the duration of the dump.
use crate::ptrace;
use std::io;

/// Errors of a remote syscall: ptrace failed, or the syscall returned an
/// error in the target.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("ptrace on thread {tid} failed while injecting syscall {nr}")]
    Ptrace {
        tid: i32,
        nr: u64,
        #[source]
        source: io::Error,
    },
    #[error("thread {tid} stopped with {what} instead of finishing injected syscall {nr}")]
    Unexpected { tid: i32, nr: u64, what: String },
    #[error("syscall {nr} in thread {tid} failed")]
    Failed {
        tid: i32,
        nr: u64,
        #[source]
        source: io::Error,
    },
}

/// A stopped, seized thread and the address of a `syscall` instruction
/// mapped executable in its address space.
pub struct RemoteThread {
    pub tid: i32,
    pub gadget: u64,
}

impl RemoteThread {
    /// Runs syscall `nr` with `args` in the thread; returns its raw result
    /// (negative errno values are returned as `Failed`).
    pub fn syscall(&self, nr: u64, args: [u64; 6]) -> Result<u64, RemoteError> {
        let tid = self.tid;
        let perr = |source| RemoteError::Ptrace { tid, nr, source };
        let saved = ptrace::get_regs(tid).map_err(perr)?;
        let mut r = saved;
        r.rax = nr;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r.rip = self.gadget;
        ptrace::set_regs(tid, &r).map_err(perr)?;
        let result = self.step(nr);
        let restore = ptrace::set_regs(tid, &saved).map_err(perr);
        let rax = result?;
        restore?;
        let ret = rax as i64;
        if (-4095..0).contains(&ret) {
            return Err(RemoteError::Failed {
                tid,
                nr,
                source: io::Error::from_raw_os_error(-ret as i32),
            });
        }
        Ok(rax)
    }

    fn step(&self, nr: u64) -> Result<u64, RemoteError> {
        let tid = self.tid;
        let perr = |source| RemoteError::Ptrace { tid, nr, source };
        ptrace::singlestep(tid).map_err(perr)?;
        let (_, status) = ptrace::wait(tid, 0).map_err(perr)?;
        if !libc::WIFSTOPPED(status) || libc::WSTOPSIG(status) != libc::SIGTRAP {
            return Err(RemoteError::Unexpected {
                tid,
                nr,
                what: format!("wait status {status:#x}"),
            });
        }
        Ok(ptrace::get_regs(tid).map_err(perr)?.rax)
    }
}

/// Finds a `syscall` instruction (0f 05) in the `[vdso]` of `pid`.
pub fn find_vdso_gadget(pid: i32, vdso_start: u64, vdso_len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; vdso_len as usize];
    let n = ptrace::read_mem(pid, vdso_start, &mut buf)?;
    buf.truncate(n);
    buf.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|off| vdso_start + off as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no syscall instruction in [vdso]"))
}
