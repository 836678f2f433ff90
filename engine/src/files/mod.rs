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
pub mod pipe;
mod pipe_buf;
pub mod regular;
pub mod shared;
pub mod signalfd;
mod sock_sys;
pub mod socket;
pub mod timerfd;
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
        };
        fds.push(FdEntry {
            fd,
            cloexec,
            kind: Some(kind),
            ..Default::default()
        });
    }
    epoll::check_targets(pid, &fds)?;
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
        }
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
