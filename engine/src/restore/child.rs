//! The restoring child: a copy of the restoring process created with the
//! task's PID by `clone3(set_tid)`. It executes a [`Plan`]: session, premapped
//! VMAs filled from the pages file, the blob and its argument block, root and
//! cwd, file descriptors at their numbers; then it jumps into the blob, which
//! never returns. Errors before the jump are written to the error pipe and
//! end the child; the tracer reports them.
use super::abi::*;
use super::blob;
use super::plan::{Plan, SessionAction};
use crate::files;
use crate::image::PagesReader;
use crate::sys;
use crm_proto::image::PageRun;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

/// How a child reports the error that ends it: `(descriptor, message)`.
/// The descriptor is the error channel handed to [`run_now`], possibly
/// moved to another number.
pub type Report = fn(RawFd, &str);

/// Runs in the child: waits for the go byte, then [`run_now`] with the
/// error written as plain text to `err`. Never returns.
pub fn run(plan: &Plan, pages: &PagesReader, runs: &[PageRun], go: OwnedFd, err: OwnedFd) -> ! {
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: reading one byte into a local buffer.
        let r = unsafe { libc::read(go.as_raw_fd(), byte.as_mut_ptr() as *mut libc::c_void, 1) };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    drop(go);
    run_now(plan, pages, runs, err, write_text)
}

fn write_text(fd: RawFd, text: &str) {
    // SAFETY: `fd` is the (possibly moved) error pipe, still open and ours;
    // the process exits right after.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let _ = f.write_all(text.as_bytes());
}

/// Executes the plan, then jumps into the blob. On failure, `report`s the
/// error on `err` and exits. Never returns.
pub fn run_now(
    plan: &Plan,
    pages: &PagesReader,
    runs: &[PageRun],
    err: OwnedFd,
    report: Report,
) -> ! {
    let err_fd = err.into_raw_fd();
    let e = match prepare(plan, pages, runs, err_fd) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    report(e.1, &e.0);
    sys::exit_now(1)
}

type ChildErr = (String, RawFd);

fn prepare(
    plan: &Plan,
    pages: &PagesReader,
    runs: &[PageRun],
    mut err_fd: RawFd,
) -> Result<std::convert::Infallible, ChildErr> {
    let fail = |what: String, fd: RawFd| (what, fd);
    // Nothing may interrupt the restore; the tracer sets the real masks.
    let full = nix::sys::signal::SigSet::all();
    nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&full), None)
        .map_err(|e| fail(format!("block signals: {e}"), err_fd))?;

    match plan.session {
        SessionAction::NewSession => {
            nix::unistd::setsid().map_err(|e| fail(format!("setsid: {e}"), err_fd))?;
        }
        SessionAction::NewGroup => {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
                .map_err(|e| fail(format!("setpgid: {e}"), err_fd))?;
        }
        SessionAction::Inherit => {}
    }
    if plan.child_subreaper {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer, no pointers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(fail(
                format!(
                    "prctl(PR_SET_CHILD_SUBREAPER): {}",
                    std::io::Error::last_os_error()
                ),
                err_fd,
            ));
        }
    }

    let mut sysv_last = crate::ipc::attach::Last::default();
    for p in &plan.premaps {
        if let Some(s) = p.sysv {
            let part = crate::ipc::attach::Part {
                shmid: s.shmid,
                pgoff: s.pgoff,
                len: p.len,
                at: p.at,
                orig_base: p.target.wrapping_sub(s.pgoff),
                prot: p.prot,
                rdonly: s.rdonly,
            };
            crate::ipc::attach::attach(part, (plan.zone_start, plan.zone_len), &mut sysv_last)
                .map_err(|e| {
                    fail(
                        format!(
                            "attach SysV shared memory segment {} at {:#x}: {e}",
                            s.shmid, p.target
                        ),
                        err_fd,
                    )
                })?;
            for &adv in &p.advice {
                sys::madvise(p.at, p.len, adv).map_err(|e| {
                    fail(
                        format!("madvise({adv}) the VMA of {:#x}: {e}", p.target),
                        err_fd,
                    )
                })?;
            }
            continue;
        }
        let fd = match (&p.file, p.shm_fd) {
            (_, Some(fd)) => fd,
            (Some((path, mode, _)), None) => {
                // SAFETY: `path` is a NUL-terminated string.
                let fd = unsafe { libc::open(path.as_ptr(), mode | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(fail(
                        format!(
                            "open {} to map it at {:#x}: {}",
                            path.to_string_lossy(),
                            p.target,
                            std::io::Error::last_os_error()
                        ),
                        err_fd,
                    ));
                }
                fd
            }
            (None, None) => -1,
        };
        if p.memfd.is_some() && p.shm_fd.is_none() {
            return Err(fail(format!("no memfd to map at {:#x}", p.target), err_fd));
        }
        let (off, flags) = match (p.shm_fd, p.shmem, &p.memfd) {
            (Some(_), Some((_, off)), _) => (off, p.flags & !libc::MAP_ANONYMOUS),
            (Some(_), None, Some((_, off))) => (*off, p.flags),
            _ => (p.file.as_ref().map_or(0, |f| f.2), p.flags),
        };
        let mapped = sys::mmap_fixed(p.at, p.len, p.fill_prot, flags, fd, off);
        if fd >= 0 && p.shm_fd.is_none() {
            // SAFETY: closing the descriptor opened above; the mapping keeps the file.
            unsafe { libc::close(fd) };
        }
        mapped.map_err(|e| {
            fail(
                format!("premap the VMA of {:#x} ({} bytes): {e}", p.target, p.len),
                err_fd,
            )
        })?;
        // A shared object is filled already; a private memfd mapping gets
        // its written pages.
        let fill = if p.lazy || (p.shm_fd.is_some() && p.memfd.is_none()) {
            0..0
        } else {
            p.runs.clone()
        };
        for r in &runs[fill] {
            let off = r.vaddr - p.target;
            // SAFETY: the run lies inside this premapped VMA (checked by the
            // plan), which is mapped writable while it is filled and is not
            // referenced by anything else.
            let dst = unsafe { sys::mapped_slice(p.at + off, r.nr_pages * crate::dump::PAGE) };
            pages
                .read_run_into(r, dst)
                .map_err(|e| fail(format!("read pages of {:#x}: {e}", r.vaddr), err_fd))?;
        }
        // Memory inherited from another task (tree restores): from its
        // pages file, at the offsets resolved before the tasks existed.
        let own_memory = !p.lazy && p.shm_fd.is_none() && p.sysv.is_none();
        let end = p.target + p.len;
        for b in plan
            .borrowed
            .iter()
            .filter(|b| own_memory && p.target <= b.vaddr && b.vaddr < end)
        {
            let len = b.nr_pages * crate::dump::PAGE;
            if b.vaddr + len > end {
                return Err(fail(
                    format!(
                        "inherited pages at {:#x} cross the end of their VMA",
                        b.vaddr
                    ),
                    err_fd,
                ));
            }
            // SAFETY: inside this premapped VMA (checked above), mapped
            // writable while it is filled and referenced by nothing else.
            let dst = unsafe { sys::mapped_slice(p.at + (b.vaddr - p.target), len) };
            sys::pread_exact(b.fd, dst, b.offset).map_err(|e| {
                fail(
                    format!("read the inherited pages of {:#x}: {e}", b.vaddr),
                    err_fd,
                )
            })?;
        }
        if p.fill_prot != p.prot {
            sys::mprotect(p.at, p.len, p.prot)
                .map_err(|e| fail(format!("mprotect the VMA of {:#x}: {e}", p.target), err_fd))?;
        }
        for &adv in &p.advice {
            sys::madvise(p.at, p.len, adv).map_err(|e| {
                fail(
                    format!("madvise({adv}) the VMA of {:#x}: {e}", p.target),
                    err_fd,
                )
            })?;
        }
    }

    blob::load(plan.blob_at).map_err(|e| {
        fail(
            format!("load the restorer at {:#x}: {e}", plan.blob_at),
            err_fd,
        )
    })?;
    sys::mmap_fixed_anon(
        plan.args_at,
        plan.args_len,
        libc::PROT_READ | libc::PROT_WRITE,
        0,
    )
    .map_err(|e| {
        fail(
            format!("map the restorer arguments at {:#x}: {e}", plan.args_at),
            err_fd,
        )
    })?;
    // SAFETY: the args area was just mapped read-write with `args_len` bytes;
    // the plan's offsets keep every array inside it, and nothing else
    // references this memory.
    let args = unsafe {
        let base = plan.args_at as *mut u8;
        std::ptr::write(base as *mut RestoreArgs, plan.args);
        std::ptr::copy_nonoverlapping(
            plan.unmap.as_ptr(),
            base.add(plan.unmap_off as usize) as *mut Range,
            plan.unmap.len(),
        );
        std::ptr::copy_nonoverlapping(
            plan.moves.as_ptr(),
            base.add(plan.moves_off as usize) as *mut VmaMove,
            plan.moves.len(),
        );
        std::ptr::copy_nonoverlapping(
            plan.threads.as_ptr(),
            base.add(plan.threads_off as usize) as *mut ThreadArgs,
            plan.threads.len(),
        );
        std::ptr::copy_nonoverlapping(
            plan.siginfos.as_ptr(),
            base.add(plan.siginfo_off as usize),
            plan.siginfos.len(),
        );
        &mut *(base as *mut RestoreArgs)
    };

    if let Some(root) = &plan.root {
        nix::unistd::chroot(root.as_c_str())
            .map_err(|e| fail(format!("chroot {}: {e}", root.to_string_lossy()), err_fd))?;
    }
    nix::unistd::chdir(plan.cwd.as_c_str())
        .map_err(|e| fail(format!("chdir {}: {e}", plan.cwd.to_string_lossy()), err_fd))?;

    // SAFETY: `exe` is NUL-terminated.
    let exe_fd = unsafe { libc::open(plan.exe.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if exe_fd < 0 {
        return Err(fail(
            format!(
                "open the executable {}: {}",
                plan.exe.to_string_lossy(),
                std::io::Error::last_os_error()
            ),
            err_fd,
        ));
    }
    // Our own descriptors move above the image's; the blob closes them.
    let high = |fd: RawFd| -> std::io::Result<RawFd> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, plan.close_from) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n)
    };
    let new_err = high(err_fd).map_err(|e| fail(format!("move the error pipe: {e}"), err_fd))?;
    err_fd = new_err;
    let new_exe = high(exe_fd).map_err(|e| fail(format!("move the executable fd: {e}"), err_fd))?;
    args.mm_map.exe_fd = new_exe as u32;
    // SAFETY: closes every descriptor below close_from: the image's numbers
    // are reopened next; our own ones were moved above.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            0u32,
            (plan.close_from - 1) as u32,
            0u32,
        )
    };

    // Pipe ends and sockets wait above the image's numbers (the blob closes them).
    // Objects shared with other tasks of a tree were inherited (above
    // close_from): their fds are duplicates of them.
    let inherited = |fd: i32| plan.inherited.iter().find(|(f, _)| *f == fd).map(|x| x.1);
    let own: Vec<_> = if plan.inherited.is_empty() {
        Vec::new()
    } else {
        plan.fds
            .iter()
            .filter(|(fd, _, _)| inherited(*fd).is_none())
            .cloned()
            .collect()
    };
    let own = if plan.inherited.is_empty() {
        &plan.fds
    } else {
        &own
    };
    let mut made = files::Restoring::new(plan.close_from, own);
    made.set_objects(&plan.objects);
    for (fd, cloexec, kind) in &plan.fds {
        let raw = match inherited(*fd) {
            Some(src) => {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor this task inherited.
                let n = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, plan.close_from) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(fail(format!("fd {fd}: dup the shared object: {e}"), err_fd));
                }
                n
            }
            None => files::restore(*fd, kind, &mut made)
                .map_err(|e| fail(files::chain(&e), err_fd))?
                .into_raw_fd(),
        };
        let cloexec = *cloexec;
        if raw != *fd {
            // SAFETY: dup3 onto the image's number (free: everything below
            // close_from was closed and numbers are restored in order), then
            // close the temporary.
            let r = unsafe { libc::dup3(raw, *fd, if cloexec { libc::O_CLOEXEC } else { 0 }) };
            // SAFETY: closing the temporary descriptor we own.
            unsafe { libc::close(raw) };
            if r < 0 {
                return Err(fail(
                    format!("dup3 to fd {fd}: {}", std::io::Error::last_os_error()),
                    err_fd,
                ));
            }
        } else if !cloexec {
            // SAFETY: clearing FD_CLOEXEC on our descriptor.
            unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        }
    }

    // The helpers (pipe ends, FIFO holders, sockets) are closed before the
    // locks are taken: closing a descriptor drops POSIX locks on its file.
    drop(made);
    let mut sources: Vec<RawFd> = plan.inherited.iter().map(|x| x.1).collect();
    sources.sort_unstable();
    sources.dedup();
    for src in sources {
        // SAFETY: closing an inherited shared object, now duplicated to its
        // image numbers; nothing else refers to this number.
        unsafe { libc::close(src) };
    }
    files::restore_locks(&plan.fds).map_err(|e| fail(files::chain(&e), err_fd))?;

    let stack = plan.threads[0].stack_top;
    let entry = plan.blob_at + blob::entry();
    // SAFETY: the blob is loaded and relocated at blob_at, its argument block
    // and stack are mapped; it never returns, and nothing of this process's
    // Rust state is used again.
    unsafe {
        std::arch::asm!(
            "mov rsp, {stack}",
            "jmp {entry}",
            stack = in(reg) stack,
            entry = in(reg) entry,
            in("rdi") plan.args_at,
            options(noreturn),
        )
    }
}
