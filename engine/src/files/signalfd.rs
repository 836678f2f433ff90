//! signalfd: saved as its signal mask and O_NONBLOCK (from
//! `/proc/PID/fdinfo`); restored with `signalfd(-1, mask, flags)`. The
//! signals it reports are the task's pending signals, restored with the task.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::SignalFd;
use std::os::fd::{FromRawFd, OwnedFd};

pub fn dump(pid: i32, fd: i32, info: &FdInfo) -> Result<SignalFd, FilesError> {
    let Some(sigmask) = info.signalfd_mask else {
        return Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a signalfd",
            target: "its fdinfo has no sigmask line".into(),
        });
    };
    Ok(SignalFd {
        sigmask,
        flags: info.flags & libc::O_NONBLOCK as u32,
    })
}

/// A new signalfd accepting the saved signals.
pub fn restore(fd: i32, s: &SignalFd) -> Result<OwnedFd, FilesError> {
    let mut flags = libc::SFD_CLOEXEC;
    if s.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::SFD_NONBLOCK;
    }
    // The kernel's sigset is 64 bits here: bit N-1 is signal N.
    let mask = s.sigmask.to_ne_bytes();
    // SAFETY: signalfd reads an 8-byte kernel sigset (the size passed) from
    // the local buffer and returns a new fd.
    let raw = unsafe { libc::syscall(libc::SYS_signalfd4, -1, mask.as_ptr(), mask.len(), flags) };
    if raw < 0 {
        return Err(FilesError::Create {
            fd,
            kind: "signalfd",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}
