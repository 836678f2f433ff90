//! The file-descriptor layer: one module per kind of open file, each with a
//! `dump` (inspect the target's fd from `/proc`) and a `restore` (recreate it
//! in the restoring task). Kinds the engine cannot restore yet make the dump
//! fail before anything is touched, naming the fd and its kind.
pub mod regular;

use crate::procfs;
use crm_proto::image::{fd_entry, FdEntry, FilesCore};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("process {pid}: fd {fd} is {kind} ({target}), which cannot be checkpointed yet")]
    Unsupported {
        pid: i32,
        fd: i32,
        kind: &'static str,
        target: String,
    },
    #[error("process {pid}: cannot inspect fd {fd}")]
    Inspect {
        pid: i32,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    #[error("cannot reopen {path} as fd {fd}")]
    Reopen {
        fd: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Names the kind of a descriptor from its `/proc/PID/fd` link and type.
fn kind_of(link: &str, meta: &std::fs::Metadata) -> Result<(), &'static str> {
    let ft = meta.file_type();
    if link.starts_with("pipe:") || ft.is_fifo() {
        return Err("a pipe or FIFO");
    }
    if link.starts_with("socket:") || ft.is_socket() {
        return Err("a socket");
    }
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return Err(match rest {
            "[eventfd]" => "an eventfd",
            "[eventpoll]" => "an epoll instance",
            "[signalfd]" => "a signalfd",
            "[timerfd]" => "a timerfd",
            "inotify" => "an inotify instance",
            "[userfaultfd]" => "a userfaultfd",
            "[pidfd]" => "a pidfd",
            _ => "an anonymous-inode file",
        });
    }
    if link.ends_with(" (deleted)") {
        return Err("an unlinked file");
    }
    if link.starts_with("/memfd:") {
        return Err("a memfd");
    }
    if ft.is_char_device() {
        let major = libc::major(meta.rdev());
        // 4, 5: virtual consoles and /dev/tty; 136-143: pty slaves; 5:2 ptmx.
        if major == 4 || major == 5 || (136..=143).contains(&major) {
            return Err("a terminal");
        }
    }
    if !link.starts_with('/') {
        return Err("an unknown kind of file");
    }
    Ok(())
}

/// Inspects every fd of `pid`. Fails on the first fd of a kind that cannot be
/// restored yet.
pub fn dump(pid: i32) -> Result<FilesCore, FilesError> {
    let mut fds = Vec::new();
    for fd in procfs::list_fds(pid)? {
        let link_path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
        let link = std::fs::read_link(&link_path)
            .map_err(|source| FilesError::Inspect { pid, fd, source })?
            .to_string_lossy()
            .into_owned();
        let meta = std::fs::metadata(&link_path).map_err(|source| FilesError::Inspect {
            pid,
            fd,
            source,
        })?;
        if let Err(kind) = kind_of(&link, &meta) {
            return Err(FilesError::Unsupported {
                pid,
                fd,
                kind,
                target: link,
            });
        }
        let info = procfs::read_fdinfo(pid, fd)?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let reg = regular::dump(&link, &meta, &info);
        fds.push(FdEntry {
            fd,
            cloexec,
            kind: Some(fd_entry::Kind::Regular(reg)),
        });
    }
    Ok(FilesCore { fds })
}

/// Highest fd number in an image (or -1).
pub fn max_fd(files: &FilesCore) -> i32 {
    files.fds.iter().map(|f| f.fd).max().unwrap_or(-1)
}
