//! epoll: saved as the list of watched descriptors with their event masks
//! and data (`tfd:` lines of `/proc/PID/fdinfo`); restored by creating a new
//! epoll instance and adding each descriptor again. The restore plan creates
//! epoll instances after every other descriptor, so their targets exist.
//! Only descriptors of the same task can be watched; an epoll watching a
//! file that was closed since (still alive elsewhere) is refused.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::{fd_entry, EpollFd, EpollTarget, FdEntry};
use std::os::fd::{FromRawFd, OwnedFd};

pub fn dump(info: &FdInfo) -> EpollFd {
    EpollFd {
        targets: info
            .epoll_targets
            .iter()
            .map(|&(fd, events, data)| EpollTarget { fd, events, data })
            .collect(),
    }
}

/// Every epoll target must be another saved descriptor of the task (and not
/// an epoll instance: nested epoll is not restored yet).
pub fn check_targets(pid: i32, fds: &[FdEntry]) -> Result<(), FilesError> {
    for f in fds {
        let Some(fd_entry::Kind::Epoll(e)) = &f.kind else {
            continue;
        };
        for t in &e.targets {
            let target = fds.iter().find(|g| g.fd == t.fd);
            let what = match target.map(|g| &g.kind) {
                None => "a descriptor that is no longer open in the task",
                Some(Some(fd_entry::Kind::Epoll(_))) => "another epoll instance",
                Some(_) => continue,
            };
            return Err(FilesError::Unsupported {
                pid,
                fd: f.fd,
                kind: "an epoll instance",
                target: format!("it watches fd {}, {what}", t.fd),
            });
        }
    }
    Ok(())
}

/// A new epoll instance watching the saved descriptors (already restored
/// at their numbers).
pub fn restore(fd: i32, e: &EpollFd) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Create {
        fd,
        kind: "epoll instance",
        source,
    };
    // SAFETY: epoll_create1 takes flags and returns a new fd.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    for t in &e.targets {
        let mut ev = libc::epoll_event {
            events: t.events,
            u64: t.data,
        };
        // SAFETY: epoll_ctl reads one epoll_event from the local.
        if unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, t.fd, &mut ev) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(owned)
}
