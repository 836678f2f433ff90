//! Thin wrappers over `inotify_init1`, `inotify_add_watch`,
//! `inotify_rm_watch` and `open_by_handle_at` for [`super::inotify`].
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn owned(r: libc::c_int) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fresh descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `inotify_init1(IN_CLOEXEC | IN_NONBLOCK)`.
pub fn init() -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags and returns a new descriptor.
    owned(unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) })
}

pub fn add_watch(fd: BorrowedFd<'_>, path: &CString, mask: u32) -> io::Result<i32> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(wd)
    }
}

pub fn rm_watch(fd: BorrowedFd<'_>, wd: i32) -> io::Result<()> {
    // SAFETY: inotify_rm_watch takes two integers.
    if unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads and discards every queued event (the descriptor is non-blocking).
pub fn drain(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n <= 0 {
            let e = io::Error::last_os_error();
            return if n == 0 || e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(())
            } else {
                Err(e)
            };
        }
    }
}

/// `open_by_handle_at(mount, handle, O_PATH)`: the file the handle names,
/// on the filesystem of `mount`.
pub fn open_by_handle(mount: BorrowedFd<'_>, ty: i32, handle: &[u8]) -> io::Result<OwnedFd> {
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut buf = vec![0u64; (8 + handle.len()).div_ceil(8)];
    let bytes = handle.len() as u32;
    // SAFETY: `buf` is 8-byte aligned and at least 8 + handle.len() bytes;
    // the header and handle bytes are written inside it.
    unsafe {
        let p = buf.as_mut_ptr() as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.to_ne_bytes().as_ptr(), p, 4);
        std::ptr::copy_nonoverlapping(ty.to_ne_bytes().as_ptr(), p.add(4), 4);
        std::ptr::copy_nonoverlapping(handle.as_ptr(), p.add(8), handle.len());
    }
    // SAFETY: open_by_handle_at reads the file_handle in `buf`, which lives
    // across the call.
    owned(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        ) as libc::c_int
    })
}
