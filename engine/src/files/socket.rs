//! Sockets: which family a socket fd is (asked of a `pidfd_getfd`
//! duplicate), handed to [`super::unix`] or [`super::inet`]; other families
//! are refused, naming the fd.
use super::{inet, sock_sys, unix, FilesError};
use crate::dirty::uffd_sys;
use crate::procfs::FdInfo;
use crm_proto::image::fd_entry;
use std::os::fd::AsFd;

fn family_name(family: i32) -> String {
    match family {
        libc::AF_NETLINK => "a netlink socket".into(),
        libc::AF_PACKET => "a packet socket".into(),
        libc::AF_VSOCK => "a vsock socket".into(),
        libc::AF_ALG => "an AF_ALG socket".into(),
        f => format!("a socket of address family {f}"),
    }
}

/// Saves socket fd `fd` of `pid` (`link` is `socket:[N]`).
pub fn dump(
    pid: i32,
    fd: i32,
    link: &str,
    info: &FdInfo,
    seen: &mut unix::Seen,
) -> Result<fd_entry::Kind, FilesError> {
    let err = |source| FilesError::Inspect { pid, fd, source };
    let ino = unix::inode(link).ok_or_else(|| FilesError::Refused {
        pid,
        fd,
        what: format!("a socket with an unexpected link {link:?}"),
    })?;
    let pidfd = uffd_sys::pidfd_open(pid).map_err(err)?;
    let mine = uffd_sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(err)?;
    let family =
        sock_sys::getsockopt_int(mine.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(err)?;
    match family {
        libc::AF_UNIX => Ok(fd_entry::Kind::UnixSocket(unix::dump(
            pid,
            fd,
            ino,
            mine.as_fd(),
            info.flags,
            seen,
        )?)),
        libc::AF_INET | libc::AF_INET6 => Ok(fd_entry::Kind::InetSocket(inet::dump(
            pid,
            fd,
            ino,
            mine.as_fd(),
            info.flags,
        )?)),
        f => Err(FilesError::Refused {
            pid,
            fd,
            what: format!("{} ({link})", family_name(f)),
        }),
    }
}
