//! eventfd: saved as its counter and flags (from `/proc/PID/fdinfo`), and
//! restored by creating a new eventfd and writing the counter into it.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::EventFd;
use std::os::fd::{FromRawFd, OwnedFd};

/// Largest value an eventfd counter holds.
const MAX_COUNT: u64 = u64::MAX - 1;

/// Reads the eventfd state of fd `fd` of `pid`; `None` when the kernel does
/// not say whether it is a semaphore (before Linux 6.7), since restoring it
/// with the wrong read semantics would change the program's behaviour.
pub fn dump(pid: i32, fd: i32, info: &FdInfo) -> Result<EventFd, FilesError> {
    let (Some(count), Some(semaphore)) = (info.eventfd_count, info.eventfd_semaphore) else {
        return Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "an eventfd",
            target: "its fdinfo lacks eventfd-count or eventfd-semaphore (Linux < 6.7)".into(),
        });
    };
    Ok(EventFd {
        count,
        flags: info.flags & libc::O_NONBLOCK as u32,
        semaphore,
    })
}

/// A new eventfd with the saved counter and flags.
pub fn restore(fd: i32, e: &EventFd) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Create {
        fd,
        kind: "eventfd",
        source,
    };
    if e.count > MAX_COUNT {
        return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let mut flags = libc::EFD_CLOEXEC;
    if e.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::EFD_NONBLOCK;
    }
    if e.semaphore {
        flags |= libc::EFD_SEMAPHORE;
    }
    // SAFETY: eventfd takes an initial value and flags and returns a new fd.
    let raw = unsafe { libc::eventfd(0, flags) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    if e.count > 0 {
        let v = e.count.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local buffer; a fresh counter at 0
        // takes any value up to MAX_COUNT without blocking.
        let n = unsafe { libc::write(raw, v.as_ptr() as *const libc::c_void, 8) };
        if n != 8 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(owned)
}
