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

    /// Runs `calls` (syscall number, six arguments) one after the other in
    /// the thread with a single resume, instead of a stop per call: a blob
    /// of code, in a page mapped executable for the occasion, makes each
    /// call and stores its raw result at `results + 8 * i` (writable memory
    /// of the task, which the caller reads back), then traps. Each remote
    /// syscall costs two context switches, a cross-CPU wake-up on a VM
    /// when the tracer runs elsewhere: a task's 62 sigactions took most of
    /// its state collection. `Ok(false)`: no executable page could be had
    /// (a task that may not map one, say); the caller makes the calls one
    /// by one. Calls that fail in the task are not errors here: the caller
    /// reads their results.
    pub fn syscalls(&self, calls: &[(u64, [u64; 6])], results: u64) -> Result<bool, RemoteError> {
        let code = batch_code(calls, results);
        let len = code.len().div_ceil(4096) as u64 * 4096;
        let prot = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let mmap = libc::SYS_mmap as u64;
        let Ok(page) = self.syscall(mmap, [0, len, prot, flags, u64::MAX, 0]) else {
            return Ok(false);
        };
        let r = self.run_code(page, &code);
        let unmapped = self.syscall(libc::SYS_munmap as u64, [page, len, 0, 0, 0, 0]);
        r?;
        unmapped?;
        Ok(true)
    }

    /// Writes `code` at `at` (an executable page of the task: written
    /// through `/proc/PID/mem`, which may write what the task may not) and
    /// runs it until its final `int3`, the thread's registers saved and
    /// restored around it.
    fn run_code(&self, at: u64, code: &[u8]) -> Result<(), RemoteError> {
        let tid = self.tid;
        let perr = |source| RemoteError::Ptrace {
            tid,
            nr: BATCH,
            source,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{tid}/mem"))
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, code, at))
            .map_err(perr)?;
        let saved = ptrace::get_regs(tid).map_err(perr)?;
        let mut r = saved;
        r.rip = at;
        r.orig_rax = u64::MAX;
        ptrace::set_regs(tid, &r).map_err(perr)?;
        let ran = ptrace::cont(tid, 0)
            .map_err(perr)
            .and_then(|()| self.wait_trap(BATCH));
        let restore = ptrace::set_regs(tid, &saved).map_err(perr);
        ran?;
        restore
    }

    fn step(&self, nr: u64) -> Result<u64, RemoteError> {
        let tid = self.tid;
        let perr = |source| RemoteError::Ptrace { tid, nr, source };
        ptrace::singlestep(tid).map_err(perr)?;
        self.wait_trap(nr)?;
        Ok(ptrace::get_regs(tid).map_err(perr)?.rax)
    }

    /// Waits for the thread's next stop, which must be a SIGTRAP (the end
    /// of a single step, or an `int3`); `nr` names what it ran.
    fn wait_trap(&self, nr: u64) -> Result<(), RemoteError> {
        let tid = self.tid;
        let (_, status) =
            ptrace::wait(tid, 0).map_err(|source| RemoteError::Ptrace { tid, nr, source })?;
        if !libc::WIFSTOPPED(status) || libc::WSTOPSIG(status) != libc::SIGTRAP {
            return Err(RemoteError::Unexpected {
                tid,
                nr,
                what: format!("wait status {status:#x}"),
            });
        }
        Ok(())
    }
}

/// The "syscall number" errors of [`RemoteThread::syscalls`] name.
const BATCH: u64 = u64::MAX;

/// Opcodes of `movabs REG, imm64` for rax, rdi, rsi, rdx, r10, r8, r9: a
/// syscall's number and six arguments.
const MOVS: [[u8; 2]; 7] = [
    [0x48, 0xb8],
    [0x48, 0xbf],
    [0x48, 0xbe],
    [0x48, 0xba],
    [0x49, 0xba],
    [0x49, 0xb8],
    [0x49, 0xb9],
];

/// x86-64 code making `calls` in order, storing each result (rax) at
/// `results + 8 * i`, then `int3`.
fn batch_code(calls: &[(u64, [u64; 6])], results: u64) -> Vec<u8> {
    let mut code = Vec::with_capacity(calls.len() * 82 + 1);
    for (i, (nr, args)) in calls.iter().enumerate() {
        for (op, value) in MOVS.iter().zip(std::iter::once(nr).chain(args)) {
            code.extend_from_slice(op);
            code.extend_from_slice(&value.to_le_bytes());
        }
        code.extend_from_slice(&[0x0f, 0x05]); // syscall
        code.extend_from_slice(&[0x48, 0xa3]); // movabs [imm64], rax
        code.extend_from_slice(&(results + 8 * i as u64).to_le_bytes());
    }
    code.push(0xcc); // int3
    code
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

#[cfg(test)]
mod batch_tests {
    use super::batch_code;

    #[test]
    fn batch_code_sets_every_register_stores_rax_and_traps() {
        let code = batch_code(&[(13, [1, 2, 3, 4, 5, 6]), (39, [0; 6])], 0x7000);
        assert_eq!(code.len(), 2 * 82 + 1);
        let imm = |at: usize| u64::from_le_bytes(code[at..at + 8].try_into().unwrap());
        // mov rax, 13; mov rdi, 1; ...; mov r9, 6 (written out here, not
        // taken from MOVS, so that the encoding is checked on its own).
        let ops: [[u8; 2]; 7] = [
            [0x48, 0xb8],
            [0x48, 0xbf],
            [0x48, 0xbe],
            [0x48, 0xba],
            [0x49, 0xba],
            [0x49, 0xb8],
            [0x49, 0xb9],
        ];
        for (k, op) in ops.iter().enumerate() {
            assert_eq!(&code[k * 10..k * 10 + 2], op);
            assert_eq!(imm(k * 10 + 2), [13, 1, 2, 3, 4, 5, 6][k]);
        }
        assert_eq!(&code[70..72], &[0x0f, 0x05], "syscall");
        assert_eq!(&code[72..74], &[0x48, 0xa3], "movabs [imm64], rax");
        assert_eq!(imm(74), 0x7000);
        // The second call stores its result 8 bytes further.
        assert_eq!(imm(82 + 2), 39);
        assert_eq!(imm(82 + 74), 0x7008);
        assert_eq!(code.last(), Some(&0xcc), "int3");
    }
}
