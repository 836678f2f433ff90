//! Small safe wrappers over raw syscalls used by restore (mmap with fixed
//! addresses, mprotect, pread into a mapping, clone3, ...). Each returns an
//! `io::Error` from errno.
use std::io;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `mmap(at, len, prot, MAP_FIXED_NOREPLACE | flags, fd, off)`: never
/// replaces an existing mapping.
pub fn mmap_fixed(
    at: u64,
    len: u64,
    prot: i32,
    flags: i32,
    fd: i32,
    off: u64,
) -> io::Result<*mut u8> {
    // SAFETY: MAP_FIXED_NOREPLACE fails instead of replacing anything mapped
    // at `at`, so no live Rust object can be affected.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len as usize,
            prot,
            flags | libc::MAP_FIXED_NOREPLACE,
            fd,
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if p as u64 != at {
        // Old kernels ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: unmapping the mapping we just created.
        unsafe { libc::munmap(p, len as usize) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(p as *mut u8)
}

pub fn mmap_fixed_anon(at: u64, len: u64, prot: i32, extra: i32) -> io::Result<*mut u8> {
    mmap_fixed(
        at,
        len,
        prot,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
        -1,
        0,
    )
}

/// A new `MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE` read-write mapping
/// of `len` bytes where the kernel chooses; returns its address.
pub fn mmap_shared_anon(len: u64) -> io::Result<u64> {
    // SAFETY: a new mapping at an address the kernel picks overlaps nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// Unmaps a mapping the restore code made itself.
///
/// # Safety
/// No live reference may point into `[at, at+len)`.
pub unsafe fn munmap(at: u64, len: u64) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    check(unsafe { libc::munmap(at as *mut libc::c_void, len as usize) } as libc::c_long).map(drop)
}

pub fn mprotect(at: u64, len: u64, prot: i32) -> io::Result<()> {
    // SAFETY: only called on mappings created by the restore code, which no
    // Rust reference points into.
    check(unsafe { libc::mprotect(at as *mut libc::c_void, len as usize, prot) } as libc::c_long)
        .map(drop)
}

pub fn madvise(at: u64, len: u64, advice: i32) -> io::Result<()> {
    // SAFETY: advice on mappings created by the restore code.
    check(unsafe { libc::madvise(at as *mut libc::c_void, len as usize, advice) } as libc::c_long)
        .map(drop)
}

/// A mutable byte slice over memory the restore code mapped itself.
///
/// # Safety
/// `[at, at+len)` must be mapped readable and writable and not aliased by
/// any other live reference.
pub unsafe fn mapped_slice<'a>(at: u64, len: u64) -> &'a mut [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts_mut(at as *mut u8, len as usize) }
}

/// `clone3` with `set_tid = [pid]` and `exit_signal = SIGCHLD`: a new
/// process with exactly this PID. Returns 0 in the child.
/// Reads exactly `buf.len()` bytes at `offset` of the open descriptor
/// `fd` (`pread`, retried on short reads and EINTR).
pub fn pread_exact(fd: std::os::fd::RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: writes at most the rest of `buf`, which is ours; `fd` is a
        // plain descriptor number (a closed one makes pread fail).
        let n = unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, off) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

pub fn clone3_with_pid(pid: i32) -> io::Result<i32> {
    clone3_with_pid_signal(pid, libc::SIGCHLD)
}

/// [`clone3_with_pid`] with another signal for the parent when the child
/// exits (0: none).
pub fn clone3_with_pid_signal(pid: i32, exit_signal: i32) -> io::Result<i32> {
    let set_tid = [pid];
    let args = crate::restore::abi::CloneArgs {
        exit_signal: exit_signal as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates the whole process like
    // fork(); `args` and `set_tid` outlive the call. The caller is
    // single-threaded, so the child inherits no locked state.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const _ as usize,
            std::mem::size_of_val(&args),
        )
    };
    check(r).map(|r| r as i32)
}

/// Leaves the process without running destructors or atexit handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}
