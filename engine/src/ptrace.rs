//! Thin wrappers over the ptrace requests the engine uses, including those
//! `nix` lacks (`NT_X86_XSTATE` regsets, `PTRACE_GET_RSEQ_CONFIGURATION`,
//! `PTRACE_PEEKSIGINFO`, sigmask get/set). Every ptrace request on a tracee
//! must come from the thread that seized it: callers keep all of one
//! process's ptrace work on one OS thread.
use std::io;

pub type Regs = libc::user_regs_struct;

const PTRACE_SEIZE: u32 = 0x4206;
const PTRACE_INTERRUPT: u32 = 0x4207;
const PTRACE_GETREGSET: u32 = 0x4204;
const PTRACE_SETREGSET: u32 = 0x4205;
const PTRACE_PEEKSIGINFO: u32 = 0x4209;
const PTRACE_GETSIGMASK: u32 = 0x420a;
const PTRACE_SETSIGMASK: u32 = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const NT_X86_XSTATE: usize = 0x202;
const NT_PRSTATUS: usize = 1;

pub const PTRACE_O_TRACEFORK: u64 = 0x2;
pub const PTRACE_O_TRACECLONE: u64 = 0x8;
pub const PTRACE_O_EXITKILL: u64 = 0x10_0000;
pub const PTRACE_EVENT_FORK: i32 = 1;
pub const PTRACE_EVENT_CLONE: i32 = 3;
pub const PTRACE_EVENT_STOP: i32 = 128;

/// Largest XSAVE area we accept (AVX-512 + AMX fit well below).
pub const XSTATE_MAX: usize = 16 * 1024;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Raw `ptrace(2)` call.
///
/// # Safety
/// `addr` and `data` must be valid for the request (pointers the kernel
/// reads or writes must point to large enough, live buffers).
unsafe fn raw(req: u32, tid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: forwarded to the caller's contract.
    check(unsafe { libc::ptrace(req, tid, addr, data) })
}

pub fn seize(tid: i32, options: u64) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE takes the options by value, no pointers.
    unsafe { raw(PTRACE_SEIZE, tid, 0, options as usize) }.map(drop)
}

pub fn interrupt(tid: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    unsafe { raw(PTRACE_INTERRUPT, tid, 0, 0) }.map(drop)
}

pub fn detach(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    unsafe { raw(libc::PTRACE_DETACH, tid, 0, sig as usize) }.map(drop)
}

pub fn cont(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    unsafe { raw(libc::PTRACE_CONT, tid, 0, sig as usize) }.map(drop)
}

pub fn set_options(tid: i32, options: u64) -> io::Result<()> {
    // SAFETY: PTRACE_SETOPTIONS takes the options by value, no pointers.
    unsafe { raw(libc::PTRACE_SETOPTIONS, tid, 0, options as usize) }.map(drop)
}

/// The message of the last ptrace event stop (e.g. the new task's PID
/// after `PTRACE_EVENT_CLONE`).
pub fn event_msg(tid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: `msg` is a valid out pointer for one unsigned long.
    unsafe {
        raw(
            libc::PTRACE_GETEVENTMSG,
            tid,
            0,
            &mut msg as *mut _ as usize,
        )
    }?;
    Ok(msg)
}

pub fn singlestep(tid: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    unsafe { raw(libc::PTRACE_SINGLESTEP, tid, 0, 0) }.map(drop)
}

pub fn get_regs(tid: i32) -> io::Result<Regs> {
    // SAFETY: all-zero is a valid user_regs_struct (plain integers).
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: &mut regs as *mut Regs as *mut libc::c_void,
        iov_len: std::mem::size_of::<Regs>(),
    };
    // SAFETY: the iovec points to a live Regs of the size it states.
    unsafe {
        raw(
            PTRACE_GETREGSET,
            tid,
            NT_PRSTATUS,
            &mut iov as *mut _ as usize,
        )
    }?;
    Ok(regs)
}

pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: regs as *const Regs as *mut libc::c_void,
        iov_len: std::mem::size_of::<Regs>(),
    };
    // SAFETY: the kernel only reads the Regs the iovec points to.
    unsafe {
        raw(
            PTRACE_SETREGSET,
            tid,
            NT_PRSTATUS,
            &mut iov as *mut _ as usize,
        )
    }
    .map(drop)
}

/// The thread's XSAVE area (standard format) as the kernel reports it.
pub fn get_xstate(tid: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points to `buf`, XSTATE_MAX bytes long; the kernel
    // shrinks iov_len to what it wrote.
    unsafe {
        raw(
            PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: i32, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    // SAFETY: the kernel only reads xstate.len() bytes from the slice.
    unsafe {
        raw(
            PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }
    .map(drop)
}

pub fn get_sigmask(tid: i32) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes (the size passed in addr) to `mask`.
    unsafe { raw(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize) }?;
    Ok(mask)
}

pub fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    // SAFETY: the kernel reads 8 bytes from `mask`.
    unsafe { raw(PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize) }.map(drop)
}

/// `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

pub fn get_rseq_config(tid: i32) -> io::Result<RseqConfig> {
    let mut conf = RseqConfig::default();
    let size = std::mem::size_of::<RseqConfig>();
    // SAFETY: the kernel writes at most `size` bytes into `conf`.
    unsafe {
        raw(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            size,
            &mut conf as *mut _ as usize,
        )
    }?;
    Ok(conf)
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Queued signals of the thread (`shared == false`) or of the whole
/// process, as raw 128-byte siginfos, without dequeuing them.
pub fn peek_siginfo(tid: i32, shared: bool) -> io::Result<Vec<[u8; 128]>> {
    let mut out = Vec::new();
    let mut buf = vec![[0u8; 128]; 32];
    loop {
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        // SAFETY: the kernel writes at most `nr` siginfos into `buf`.
        let n = unsafe {
            raw(
                PTRACE_PEEKSIGINFO,
                tid,
                &args as *const PeekSiginfoArgs as usize,
                buf.as_mut_ptr() as usize,
            )
        }? as usize;
        out.extend_from_slice(&buf[..n.min(buf.len())]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// Raw `waitpid(tid, __WALL | flags)`; returns the status.
pub fn wait(tid: i32, flags: i32) -> io::Result<(i32, i32)> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | flags) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        return Ok((r, status));
    }
}

/// `process_vm_readv` of one contiguous range.
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` covers exactly `buf`; `remote` is only dereferenced by
    // the kernel in the other process, checked there.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `process_vm_readv` of up to `len` bytes appended to `buf` (read into
/// its spare capacity: no zero-filling of memory about to be overwritten).
pub fn read_mem_append(pid: i32, addr: u64, buf: &mut Vec<u8>, len: usize) -> io::Result<usize> {
    buf.reserve(len);
    let spare = &mut buf.spare_capacity_mut()[..len];
    let local = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers exactly the spare capacity of `buf`, which the
    // kernel may write; `remote` is only dereferenced by the kernel in the
    // other process, checked there.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialized the first `n` bytes of the spare
    // capacity (n <= len <= the spare capacity).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `process_vm_writev` of one contiguous range.
pub fn write_mem(pid: i32, addr: u64, buf: &[u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel only reads `buf` locally; the remote side is checked
    // against the other process's mappings.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn regs_to_proto(r: &Regs) -> crm_proto::image::GpRegs {
    crm_proto::image::GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

pub fn regs_from_proto(g: &crm_proto::image::GpRegs) -> Regs {
    Regs {
        r15: g.r15,
        r14: g.r14,
        r13: g.r13,
        r12: g.r12,
        rbp: g.rbp,
        rbx: g.rbx,
        r11: g.r11,
        r10: g.r10,
        r9: g.r9,
        r8: g.r8,
        rax: g.rax,
        rcx: g.rcx,
        rdx: g.rdx,
        rsi: g.rsi,
        rdi: g.rdi,
        orig_rax: g.orig_rax,
        rip: g.rip,
        cs: g.cs,
        eflags: g.eflags,
        rsp: g.rsp,
        ss: g.ss,
        fs_base: g.fs_base,
        gs_base: g.gs_base,
        ds: g.ds,
        es: g.es,
        fs: g.fs,
        gs: g.gs,
    }
}
