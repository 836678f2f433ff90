//! Raw kernel interfaces for write tracking that `libc`/`nix` lack:
//! userfaultfd write-protect in async mode (`UFFD_FEATURE_WP_ASYNC`,
//! Linux ≥ 6.7), the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap`, and
//! `pidfd_open`/`pidfd_getfd`. Every `unsafe` of the dirty trackers lives
//! here behind safe functions taking [`BorrowedFd`]s and returning
//! [`io::Result`]s; the ioctl numbers are checked at compile time.
//!
//! Sources: `include/uapi/linux/userfaultfd.h` and `include/uapi/linux/fs.h`
//! (Linux 6.18). The same definitions are exercised by the `features` probes.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `userfaultfd(2)` flag: only faults from user mode are handled (allowed
/// without `CAP_SYS_PTRACE` when `vm.unprivileged_userfaultfd` is 0).
pub const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_API: u64 = 0xAA;
/// Write-protect markers on never-populated anonymous pages.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved by the kernel at once (the
/// writer never blocks); the page is then reported "written" by PAGEMAP_SCAN.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO: u64 = 0xAA;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<UffdioWriteprotect>(),
);
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

/// `struct page_region`: one output range of `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`; `size`, `vec` and `vec_len` are filled in by
/// [`pagemap_scan`].
#[repr(C)]
#[derive(Default, Debug, Clone)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// Write-protect the pages that match (after reporting them).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with `EPERM` unless every VMA walked is registered in async WP mode.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Category: not write-protected (written since it was last protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Category: present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Category: swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

const PAGEMAP_SCAN: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u64,
    16,
    size_of::<PmScanArg>(),
);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a syscall's return value as a new owned fd.
fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(cvt(ret)?).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the syscall just returned `fd` as a new descriptor that nothing
    // else owns; the OwnedFd becomes its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `ioctl(fd, req, arg)`, retrying on `EINTR`/`EAGAIN`.
///
/// # Safety
/// `arg` must point to a live, writable value of the type `req` encodes.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: *mut T) -> io::Result<libc::c_long> {
    loop {
        // SAFETY: forwarded to the caller's contract on `arg`; `fd` is a
        // borrowed, open descriptor.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
        match cvt(ret as libc::c_long) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
            other => return other,
        }
    }
}

/// `userfaultfd(flags)` in this process (used only to learn which features
/// the kernel offers when `UFFDIO_API` refused ours).
pub fn userfaultfd(flags: u64) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes only flags and returns a new fd.
    owned_fd(unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_int) })
}

/// `UFFDIO_API` asking for `features`; returns the kernel's answer (all the
/// features it offers, and the ioctls).
pub fn uffdio_api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
    // `api` is (size checked against the ioctl number above).
    unsafe { ioctl(uffd, UFFDIO_API, &mut api) }?;
    Ok(api)
}

/// `UFFDIO_REGISTER` of `[start, start + len)` of the uffd's mm in
/// write-protect mode; returns the ioctls the range supports.
pub fn register_wp(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<u64> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`;
    // registering changes how write faults in the range are handled (in
    // async mode: never blocking), not the memory itself.
    unsafe { ioctl(uffd, UFFDIO_REGISTER, &mut reg) }?;
    Ok(reg.ioctls)
}

/// `UFFDIO_UNREGISTER`: the range is no longer tracked and its pages lose
/// their write protection.
pub fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
    unsafe { ioctl(uffd, UFFDIO_UNREGISTER, &mut range) }.map(drop)
}

/// `UFFDIO_WRITEPROTECT` with mode WP: protect every page of the range,
/// including never-populated ones (markers, with `WP_UNPOPULATED`).
pub fn writeprotect(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`.
    unsafe { ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
}

/// `PAGEMAP_SCAN` on an open `/proc/PID/pagemap`: fills `out` (at most
/// `out.len()` regions) and returns how many were written; `arg.walk_end`
/// tells where the walk stopped.
pub fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    arg: &mut PmScanArg,
    out: &mut [PageRegion],
) -> io::Result<usize> {
    arg.size = size_of::<PmScanArg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // SAFETY: the kernel reads `*arg` and writes at most `vec_len`
    // `struct page_region`s to `vec`, which is `out`, live and mutable for
    // the whole call; it writes `walk_end` back into `*arg`.
    let n = unsafe { ioctl(pagemap, PAGEMAP_SCAN, arg as *mut PmScanArg) }?;
    Ok((n as usize).min(out.len()))
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of the target's `fd` in this
/// process (close-on-exec set by the kernel).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two fds and flags and returns a new fd.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// Whether the process `pidfd` refers to has exited (a zombie or reaped):
/// its pidfd then polls readable. Does not block.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one `pollfd` passed, which lives on
    // our stack for the whole call; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}
