//! Thin wrappers for userfaultfd in *missing* mode, as lazy restore uses it:
//! registering ranges, filling pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`),
//! waking waiters, and decoding the messages read from the fd. Values and
//! layouts from `include/uapi/linux/userfaultfd.h`.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Non-cooperative events lazy restore needs: without them a `fork`,
/// `mremap`, `madvise(DONTNEED)` or `munmap` of a lazy range would make us
/// fill the wrong addresses or resurrect dropped data.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const LAZY_FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x02, struct uffdio_range)` (16 bytes).
const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)` (40 bytes).
const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)` (32 bytes).
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
pub const MSG_SIZE: usize = 32;

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// # Safety
/// `arg` must point to the structure `req` reads and writes.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: *mut T) -> io::Result<()> {
    // SAFETY: per the contract above.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `UFFDIO_REGISTER` of `[start, start + len)` in missing mode.
pub fn register_missing(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`.
    unsafe { ioctl(uffd, UFFDIO_REGISTER, &mut reg) }
}

/// What a fill ioctl did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every byte was filled.
    Done,
    /// The first `n` bytes were filled, then it stopped (`n > 0`).
    Partial(u64),
    /// The first page is already present.
    Exists,
    /// The address space is changing (an event is pending): read events,
    /// then retry.
    Again,
    /// The range is no longer registered (unmapped, moved).
    Gone,
    /// The process has no address space any more (it exited).
    Exited,
}

fn fill_result(ret: io::Result<()>, done: i64, len: u64) -> io::Result<Fill> {
    match ret {
        Ok(()) => Ok(Fill::Done),
        Err(e) => {
            if done > 0 && (done as u64) < len {
                return Ok(Fill::Partial(done as u64));
            }
            match e.raw_os_error() {
                Some(libc::EEXIST) => Ok(Fill::Exists),
                Some(libc::EAGAIN) => Ok(Fill::Again),
                Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::EFAULT) => Ok(Fill::Gone),
                Some(libc::ESRCH) => Ok(Fill::Exited),
                _ => Err(e),
            }
        }
    }
}

/// `UFFDIO_COPY` of `src` to `dst` in the uffd's address space; wakes the
/// threads waiting on the filled pages.
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> io::Result<Fill> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (the live slice `src`)
    // and writes only into the other process's registered range and into
    // `c.copy`.
    let r = unsafe { ioctl(uffd, UFFDIO_COPY, &mut c) };
    fill_result(r, c.copy, c.len)
}

/// `UFFDIO_ZEROPAGE` of `[dst, dst + len)`; wakes the waiters.
pub fn zeropage(uffd: BorrowedFd<'_>, dst: u64, len: u64) -> io::Result<Fill> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`.
    let r = unsafe { ioctl(uffd, UFFDIO_ZEROPAGE, &mut z) };
    fill_result(r, z.zeropage, len)
}

/// `UFFDIO_WAKE` of `[start, start + len)`.
pub fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
    unsafe { ioctl(uffd, UFFDIO_WAKE, &mut r) }
}

/// A decoded `struct uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    PageFault {
        addr: u64,
    },
    /// The process forked; `uffd` is the child's context, now a descriptor
    /// of ours.
    Fork {
        uffd: i32,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)`: the range's pages are gone.
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Unknown(u8),
}

/// Decodes one message.
pub fn decode(m: &[u8; MSG_SIZE]) -> Msg {
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&m[o..o + 8]);
        u64::from_ne_bytes(b)
    };
    // Header: event u8, reserved u8, u16, u32; the union starts at byte 8.
    match m[0] {
        UFFD_EVENT_PAGEFAULT => Msg::PageFault { addr: u64_at(16) },
        UFFD_EVENT_FORK => Msg::Fork {
            uffd: u64_at(8) as u32 as i32,
        },
        UFFD_EVENT_REMAP => Msg::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        UFFD_EVENT_REMOVE => Msg::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        UFFD_EVENT_UNMAP => Msg::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        other => Msg::Unknown(other),
    }
}

/// Reads the pending messages (the fd is non-blocking); an empty vector
/// when none is pending.
pub fn read_msgs(uffd: BorrowedFd<'_>) -> io::Result<Vec<Msg>> {
    let mut buf = [0u8; MSG_SIZE * 64];
    // SAFETY: reading into a local buffer of the given size.
    let n = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    Ok(buf[..n as usize]
        .chunks_exact(MSG_SIZE)
        .map(|c| decode(c.try_into().expect("chunks of MSG_SIZE")))
        .collect())
}
