//! The file-descriptor layer: one module per kind of open file, each with a
//! `dump` (inspect the target's fd from `/proc`) and a `restore` (recreate it
//! in the restoring task). Kinds the engine cannot restore yet make the dump
//! fail before anything is touched, naming the fd and its kind. What the
//! tasks of a tree share is linked across them by [`shared`].
pub mod epoll;
pub mod eventfd;
pub mod fifo;
pub mod inet;
pub mod inotify;
mod inotify_sys;
pub mod locks;
pub mod memfd;
pub mod memfd_sys;
pub mod pipe;
mod pipe_buf;
pub mod regular;
pub mod shared;
pub mod signalfd;
mod sock_sys;
pub mod socket;
pub mod timerfd;
pub mod tty;
mod tty_sys;
pub mod unix;

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
    #[error("process {pid}: fd {fd} cannot be checkpointed: it is {what}")]
    Refused { pid: i32, fd: i32, what: String },
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    #[error("cannot create the {kind} of fd {fd}")]
    Create {
        fd: i32,
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "process {pid}: fd {fd} is {path}, unlinked while open; its {size} bytes exceed \
         what is saved of unlinked files ({limit} bytes per process)"
    )]
    GhostTooLarge {
        pid: i32,
        fd: i32,
        path: String,
        size: u64,
        limit: u64,
    },
    #[error("fd {fd}: cannot {what}")]
    Socket {
        fd: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore fd {fd} on the FIFO {path}: {what}")]
    Fifo { fd: i32, path: String, what: String },
    #[error("fd {fd}: cannot take the {lock} lock on {path} again")]
    Lock {
        fd: i32,
        path: String,
        lock: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} cannot be checkpointed: {what}")]
    Ctty { pid: i32, what: String },
    #[error("pty {index} of the image: cannot {what}")]
    Pty {
        index: u32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reopen {path} as fd {fd}")]
    Reopen {
        fd: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The kinds of descriptor the engine saves.
enum Kind {
    Regular,
    EventFd,
    SignalFd,
    TimerFd,
    Epoll,
    Pipe,
    Fifo,
    Socket,
    Inotify,
    Memfd,
    Tty,
}

/// Names the kind of a descriptor from its `/proc/PID/fd` link and type;
/// `Err` names a kind that cannot be saved yet.
fn kind_of(link: &str, meta: &std::fs::Metadata) -> Result<Kind, &'static str> {
    let ft = meta.file_type();
    if link.starts_with("pipe:") {
        return Ok(Kind::Pipe);
    }
    if ft.is_fifo() {
        return Ok(Kind::Fifo);
    }
    if link.starts_with("socket:") || ft.is_socket() {
        return Ok(Kind::Socket);
    }
    if link == "anon_inode:[eventfd]" {
        return Ok(Kind::EventFd);
    }
    if link == "anon_inode:[signalfd]" {
        return Ok(Kind::SignalFd);
    }
    if link == "anon_inode:[timerfd]" {
        return Ok(Kind::TimerFd);
    }
    if link == "anon_inode:[eventpoll]" {
        return Ok(Kind::Epoll);
    }
    if link == "anon_inode:inotify" {
        return Ok(Kind::Inotify);
    }
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return Err(match rest {
            "[eventpoll]" => "an epoll instance",
            "[signalfd]" => "a signalfd",
            "[timerfd]" => "a timerfd",
            "inotify" => "an inotify instance",
            "[userfaultfd]" => "a userfaultfd",
            "[pidfd]" => "a pidfd",
            _ => "an anonymous-inode file",
        });
    }
    if link.ends_with(" (deleted)") && !regular::is_ghost(link, meta) {
        return Err("an unlinked file that is not a regular file");
    }
    if link.starts_with("/memfd:") && ft.is_file() {
        return Ok(Kind::Memfd);
    }
    if ft.is_char_device() {
        let major = libc::major(meta.rdev());
        if tty::is_master(meta) || tty::is_slave_dev(meta.rdev()) {
            return Ok(Kind::Tty);
        }
        // 4, 5: virtual consoles, /dev/tty, /dev/console.
        if major == 4 || major == 5 {
            return Err("a terminal that is not a pseudo-terminal (pty)");
        }
    }
    if !link.starts_with('/') {
        return Err("an unknown kind of file");
    }
    Ok(Kind::Regular)
}

/// Inspects every fd of `pid`. Fails on the first fd of a kind that cannot be
/// restored yet, and on objects shared with other processes (pipe ends,
/// FIFOs, unix sockets whose other side is elsewhere): a single process is
/// restored alone. Trees use [`collect`] and [`shared::link`].
pub fn dump(pid: i32) -> Result<FilesCore, FilesError> {
    let Collected {
        pid,
        mut files,
        unix,
    } = collect(pid)?;
    pipe::check_ends(pid, &files.fds)?;
    fifo::check_readers(pid, &files.fds)?;
    unix::check(pid, &mut files.fds, &unix)?;
    Ok(files)
}

/// The descriptors of one task, before the checks of what they are
/// connected to (which depend on which other tasks are dumped with it).
#[derive(Debug)]
pub struct Collected {
    pub pid: i32,
    pub files: FilesCore,
    unix: unix::Seen,
}

/// Inspects every fd of `pid` like [`dump`], without refusing objects
/// shared with other processes.
pub fn collect(pid: i32) -> Result<Collected, FilesError> {
    let mut fds = Vec::new();
    let mut pipes_with_data = std::collections::HashSet::new();
    let mut fifos_with_data = std::collections::HashSet::new();
    let mut locks_seen = locks::Seen::default();
    let mut regular_fds = Vec::new();
    let mut fifo_fds = Vec::new();
    let mut ghost_budget = regular::GHOST_LIMIT;
    let mut sockets = unix::Seen::default();
    let mut object_fds = Vec::new();
    let mut pidfd = None;
    let mut ctty = tty::session_ctty(pid)?;
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
        let kind = kind_of(&link, &meta).map_err(|kind| FilesError::Unsupported {
            pid,
            fd,
            kind,
            target: link.clone(),
        })?;
        let info = procfs::read_fdinfo(pid, fd)?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        if !matches!(kind, Kind::Regular) {
            locks::refuse_on(pid, fd, &info.locks)?;
        }
        let kind = match kind {
            Kind::Regular => {
                let id = (meta.dev(), meta.ino());
                let dup_of = regular::dup_of(pid, fd, id, &regular_fds);
                regular_fds.push((fd, id));
                let mut r = regular::dump(pid, fd, &link, &meta, &info, dup_of, &mut ghost_budget)?;
                r.locks = locks::dump(pid, fd, id, &info.locks, &mut locks_seen)?;
                fd_entry::Kind::Regular(r)
            }
            Kind::Fifo => {
                let id = (meta.dev(), meta.ino());
                let mut f = fifo::dump(pid, fd, &link, &meta, &info, &mut fifos_with_data)?;
                f.dup_of = regular::dup_of(pid, fd, id, &fifo_fds);
                fifo_fds.push((fd, id));
                fd_entry::Kind::Fifo(f)
            }
            Kind::EventFd => fd_entry::Kind::Eventfd(eventfd::dump(pid, fd, &info)?),
            Kind::SignalFd => fd_entry::Kind::Signalfd(signalfd::dump(pid, fd, &info)?),
            Kind::TimerFd => fd_entry::Kind::Timerfd(timerfd::dump(pid, fd, &info)?),
            Kind::Epoll => fd_entry::Kind::Epoll(epoll::dump(&info)),
            Kind::Pipe => {
                fd_entry::Kind::Pipe(pipe::dump(pid, fd, &link, &info, &mut pipes_with_data)?)
            }
            Kind::Socket => socket::dump(pid, fd, &link, &info, &mut sockets)?,
            Kind::Inotify => fd_entry::Kind::Inotify(inotify::dump(pid, fd, &info)?),
            Kind::Memfd | Kind::Tty => {
                let id = (meta.dev(), meta.ino());
                let dup_of = regular::dup_of(pid, fd, id, &object_fds);
                object_fds.push((fd, id));
                if matches!(kind, Kind::Memfd) {
                    fd_entry::Kind::Memfd(memfd::dump(pid, fd, &link, &info, dup_of)?)
                } else {
                    let t = tty::dump(pid, fd, &link, &meta, &info, &mut pidfd, &mut ctty, dup_of)?;
                    fd_entry::Kind::Tty(t)
                }
            }
        };
        fds.push(FdEntry {
            fd,
            cloexec,
            kind: Some(kind),
            ..Default::default()
        });
    }
    epoll::check_targets(pid, &fds)?;
    tty::check_ctty(pid, &ctty)?;
    Ok(Collected {
        pid,
        files: FilesCore { fds },
        unix: sockets,
    })
}

/// The objects a restore has made so far that have several descriptors
/// (pipes, FIFOs, sockets), kept at numbers at or above `high` (out of the
/// way of the image's descriptors), and the image's regular-file numbers
/// (which a duplicate may name). Dropped before the locks are taken.
#[derive(Debug)]
pub struct Restoring {
    pipes: pipe::Pipes,
    fifos: fifo::Fifos,
    unix: unix::Made,
    inet: inet::Made,
    /// The image's regular-file descriptors (what `dup_of` may name).
    regular: std::collections::HashSet<i32>,
    /// The image's FIFO descriptors (what a FIFO's `dup_of` may name).
    fifo_fds: std::collections::HashSet<i32>,
    /// The image's memfd and pty descriptors (what their `dup_of` may name).
    object_fds: std::collections::HashSet<i32>,
    /// The memfds and ptys made before the tasks (see [`Objects`]).
    objects: Objects,
}

/// The memfds and ptys of a restore, created once by the restoring process
/// before any task and inherited by every task at numbers above its image's
/// descriptors: `(inode, descriptor)` per memfd, and the new ptys.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub memfds: Vec<(u64, std::os::fd::RawFd)>,
    pub ptys: Vec<tty::PtyFds>,
}

/// `F_DUPFD_CLOEXEC`: a duplicate of `fd` numbered `min` or above.
pub fn dup_at_least(
    fd: std::os::fd::BorrowedFd<'_>,
    min: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC on a live descriptor; returns a new one.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` was just made and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(n) })
}

impl Restoring {
    /// `fds`: every descriptor of the image (unix sockets are created
    /// together, and need to know each other).
    pub fn new(high: i32, fds: &[(i32, bool, fd_entry::Kind)]) -> Restoring {
        Restoring {
            pipes: pipe::Pipes::new(high),
            fifos: fifo::Fifos::new(high),
            unix: unix::Made::new(high, fds),
            inet: inet::Made::new(high),
            regular: fds
                .iter()
                .filter(|(_, _, k)| matches!(k, fd_entry::Kind::Regular(_)))
                .map(|(fd, _, _)| *fd)
                .collect(),
            fifo_fds: fds
                .iter()
                .filter(|(_, _, k)| matches!(k, fd_entry::Kind::Fifo(_)))
                .map(|(fd, _, _)| *fd)
                .collect(),
            object_fds: fds
                .iter()
                .filter(|(_, _, k)| matches!(k, fd_entry::Kind::Memfd(_) | fd_entry::Kind::Tty(_)))
                .map(|(fd, _, _)| *fd)
                .collect(),
            objects: Objects::default(),
        }
    }

    /// The memfds and ptys made for this restore.
    pub fn set_objects(&mut self, objects: &Objects) {
        self.objects = objects.clone();
    }
}

/// Recreates a descriptor of the image (not yet at its number, close-on-exec).
pub fn restore(
    fd: i32,
    kind: &fd_entry::Kind,
    made: &mut Restoring,
) -> Result<std::os::fd::OwnedFd, FilesError> {
    match kind {
        fd_entry::Kind::Pipe(p) => pipe::restore(fd, p, &mut made.pipes),
        fd_entry::Kind::Fifo(f) => match f.dup_of {
            Some(n) => fifo::restore_dup(fd, n, f, &made.fifo_fds),
            None => fifo::restore(fd, f, &mut made.fifos),
        },
        fd_entry::Kind::UnixSocket(s) => unix::restore(fd, s, &mut made.unix),
        fd_entry::Kind::InetSocket(s) => inet::restore(fd, s, &mut made.inet),
        fd_entry::Kind::Inotify(i) => inotify::restore(fd, i),
        fd_entry::Kind::Regular(r) => match r.dup_of {
            Some(n) => regular::restore_dup(fd, n, r, &made.regular),
            None => regular::restore(fd, r),
        },
        fd_entry::Kind::Eventfd(e) => eventfd::restore(fd, e),
        fd_entry::Kind::Signalfd(s) => signalfd::restore(fd, s),
        fd_entry::Kind::Timerfd(t) => timerfd::restore(fd, t),
        fd_entry::Kind::Epoll(e) => epoll::restore(fd, e),
        fd_entry::Kind::Memfd(m) => match m.dup_of {
            Some(n) => regular::dup_lower(fd, n, "a memfd", &made.object_fds),
            None => memfd::restore(fd, m, &made.objects.memfds),
        },
        fd_entry::Kind::Tty(t) => match t.dup_of {
            Some(n) => regular::dup_lower(fd, n, "a pty", &made.object_fds),
            None => tty::restore(fd, t, &made.objects.ptys),
        },
    }
}

/// Why a decoded descriptor is beyond what a dump writes (more queued
/// messages or inotify watches than the limits), if it is.
pub fn too_large(kind: &fd_entry::Kind) -> Option<String> {
    match kind {
        fd_entry::Kind::UnixSocket(s) if s.queue.len() > unix::queue::MAX_QUEUE_MESSAGES => {
            Some(format!("{} queued messages", s.queue.len()))
        }
        fd_entry::Kind::Inotify(i) if i.watches.len() > inotify::MAX_WATCHES => {
            Some(format!("{} inotify watches", i.watches.len()))
        }
        fd_entry::Kind::Regular(r) if r.locks.len() > locks::MAX_LOCKS => {
            Some(format!("{} locks on one descriptor", r.locks.len()))
        }
        fd_entry::Kind::Memfd(m) => match &m.object {
            Some(o) => memfd::check_object(o).err(),
            None => Some("a memfd without its description".into()),
        },
        fd_entry::Kind::Tty(t) if t.pty.is_none() => Some("a pty without its description".into()),
        _ => None,
    }
}

/// Takes the file locks of the image again, once every descriptor is at
/// its number (`made` dropped: the helpers are closed) and nothing will
/// close a descriptor any more (see [`locks`]).
pub fn restore_locks(fds: &[(i32, bool, fd_entry::Kind)]) -> Result<(), FilesError> {
    locks::restore_all(fds)
}

/// `e` and its sources, `: `-separated (the restoring child reports its
/// error as one line).
pub fn chain(e: &FilesError) -> String {
    crate::error_chain(e)
}

/// Highest fd number in an image (or -1).
pub fn max_fd(files: &FilesCore) -> i32 {
    files.fds.iter().map(|f| f.fd).max().unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::image::{MemfdFd, MemfdObject, TtyFd};

    #[test]
    fn malformed_memfds_and_ptys_are_refused() {
        let memfd = |o: Option<MemfdObject>| {
            fd_entry::Kind::Memfd(MemfdFd {
                object: o,
                ..Default::default()
            })
        };
        assert!(too_large(&memfd(None)).is_some());
        let big = MemfdObject {
            size: memfd::MAX_SIZE + 1,
            ..Default::default()
        };
        assert!(too_large(&memfd(Some(big))).is_some());
        let named = MemfdObject {
            name: "x".repeat(memfd::MAX_NAME + 1),
            ..Default::default()
        };
        assert!(too_large(&memfd(Some(named))).is_some());
        assert!(too_large(&memfd(Some(MemfdObject::default()))).is_none());
        assert!(too_large(&fd_entry::Kind::Tty(TtyFd::default())).is_some());
    }
}
