//! Raw calls for memfds: `memfd_create`, seals, `fstatfs`, `SEEK_DATA` /
//! `SEEK_HOLE`, and a shared mapping of a whole memfd. Safe wrappers
//! returning `io::Error` from errno.
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `MFD_NOEXEC_SEAL` (Linux 6.3): not executable, sealed against chmod +x.
pub const MFD_NOEXEC_SEAL: u32 = 0x8;
/// `MFD_EXEC` (Linux 6.3): executable (asked for explicitly where the
/// `vm.memfd_noexec` sysctl would otherwise refuse it).
pub const MFD_EXEC: u32 = 0x10;

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | exec)`, `exec`
/// being 0, [`MFD_EXEC`] or [`MFD_NOEXEC_SEAL`]; without `exec` on kernels
/// that do not know it.
pub fn create(name: &CStr, exec: u32) -> io::Result<OwnedFd> {
    let call = |flags: u32| {
        // SAFETY: `name` is NUL-terminated; the result is a new descriptor.
        check(unsafe { libc::memfd_create(name.as_ptr(), flags) } as libc::c_long)
    };
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let fd = match call(base | exec) {
        Err(e) if exec != 0 && e.raw_os_error() == Some(libc::EINVAL) => call(base)?,
        r => r?,
    };
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `F_GET_SEALS`.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: fcntl with an integer command on a live descriptor.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) } as libc::c_long)
        .map(|s| s as u32)
}

/// `F_ADD_SEALS`.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: fcntl with an integer argument on a live descriptor.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) }
            as libc::c_long,
    )
    .map(drop)
}

/// Whether the file lives on hugetlbfs (`MFD_HUGETLB`).
pub fn is_hugetlb(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the live local `st`.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } as libc::c_long)?;
    Ok(st.f_type as i64 == HUGETLBFS_MAGIC)
}

/// The first data offset at or after `off` (`SEEK_DATA`); `None` past the
/// last data.
pub fn seek_data(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a live descriptor, no pointers.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// The first hole at or after `off` (`SEEK_HOLE`; the end of file counts).
pub fn seek_hole(fd: BorrowedFd<'_>, off: u64) -> io::Result<u64> {
    // SAFETY: lseek on a live descriptor, no pointers.
    check(unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) } as i64)
        .map(|r| r as u64)
}

/// A shared read-write mapping of the first `len` bytes of `fd`, where the
/// kernel chooses; unmapped on drop.
pub struct SharedMap {
    at: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> io::Result<SharedMap> {
        // SAFETY: a new mapping at an address the kernel picks overlaps nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            at: p,
            len: len as usize,
        })
    }

    /// The bytes `[off, off + len)` of the mapping, if inside it.
    pub fn slice(&mut self, off: u64, len: u64) -> Option<&mut [u8]> {
        let end = off.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: the range lies inside our read-write mapping, and the
        // `&mut self` borrow keeps it the only reference into it.
        Some(unsafe {
            std::slice::from_raw_parts_mut((self.at as *mut u8).add(off as usize), len as usize)
        })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no slice into it outlives `&mut self`.
        unsafe { libc::munmap(self.at, self.len) };
    }
}
