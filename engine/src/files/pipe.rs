//! Pipes whose both ends the task holds (a pipe to another task of a
//! dumped tree is created once for the tree, [`super::shared`]; one to any
//! other process is refused). Saved per descriptor as the
//! pipe's inode, which end it is, O_NONBLOCK and the pipe's size; the data
//! buffered in the pipe is copied with `tee(2)` from a duplicate of a read
//! end (pulled with `pidfd_getfd`), so the dump does not consume it, and
//! stored once, with the lowest-numbered read end. Restored by creating the
//! pipe when its first descriptor comes up, setting its size and writing the
//! data back (or when the read end that holds the data comes up); the other
//! ends come from the same pipe.
use super::pipe_buf::{fcntl, peek, pipe2, refill};
use super::FilesError;
use crate::dirty::uffd_sys;
use crate::procfs::FdInfo;
use crm_proto::image::{fd_entry, FdEntry, Pipe};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

/// The inode of a `pipe:[N]` link.
pub fn inode(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

fn err(pid: i32, fd: i32) -> impl Fn(io::Error) -> FilesError {
    move |source| FilesError::Inspect { pid, fd, source }
}

/// Saves fd `fd` (a pipe end, `link` `pipe:[N]`); the data goes with the
/// first read end of each pipe (`with_data` tracks which pipes have it).
pub fn dump(
    pid: i32,
    fd: i32,
    link: &str,
    info: &FdInfo,
    with_data: &mut std::collections::HashSet<u64>,
) -> Result<Pipe, FilesError> {
    let id = inode(link).ok_or_else(|| FilesError::Unsupported {
        pid,
        fd,
        kind: "a pipe",
        target: link.to_string(),
    })?;
    let write_end = info.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
    let pidfd = uffd_sys::pidfd_open(pid).map_err(err(pid, fd))?;
    let mine = uffd_sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(err(pid, fd))?;
    let size = fcntl(&mine, libc::F_GETPIPE_SZ, 0).map_err(err(pid, fd))? as u32;
    let data = if !write_end && with_data.insert(id) {
        peek(&mine, size as usize).map_err(err(pid, fd))?
    } else {
        Vec::new()
    };
    Ok(Pipe {
        id,
        write_end,
        flags: info.flags & libc::O_NONBLOCK as u32,
        size,
        data,
    })
}

/// Refuses pipes of which the task holds only one end.
pub fn check_ends(pid: i32, fds: &[FdEntry]) -> Result<(), FilesError> {
    let mut ends: HashMap<u64, (bool, bool, i32)> = HashMap::new();
    for f in fds {
        if let Some(fd_entry::Kind::Pipe(p)) = &f.kind {
            let e = ends.entry(p.id).or_insert((false, false, f.fd));
            if p.write_end {
                e.1 = true;
            } else {
                e.0 = true;
            }
        }
    }
    for (id, (r, w, fd)) in ends {
        if !(r && w) {
            return Err(FilesError::Unsupported {
                pid,
                fd,
                kind: "a pipe to another process",
                target: format!(
                    "pipe:[{id}], whose {} end is not held by this process",
                    if r { "write" } else { "read" }
                ),
            });
        }
    }
    Ok(())
}

/// Pipes created so far in a restore: both ends, kept at numbers at or
/// above `high` (out of the way of the image's descriptors).
#[derive(Debug)]
pub struct Pipes {
    high: i32,
    made: HashMap<u64, (OwnedFd, OwnedFd)>,
}

impl Pipes {
    pub fn new(high: i32) -> Pipes {
        Pipes {
            high,
            made: HashMap::new(),
        }
    }

    fn lift(&self, fd: OwnedFd) -> io::Result<OwnedFd> {
        let n = fcntl(&fd, libc::F_DUPFD_CLOEXEC, self.high)?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor nothing owns.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    }
}

/// A descriptor for fd `fd` of the image: its end of the pipe, created
/// (with its size and data) when the pipe's first descriptor comes up.
pub fn restore(fd: i32, p: &Pipe, pipes: &mut Pipes) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Create {
        fd,
        kind: "pipe",
        source,
    };
    if !pipes.made.contains_key(&p.id) {
        let (r, w) = pipe2().map_err(err)?;
        refill(&w, p.size, &p.data).map_err(err)?;
        let r = pipes.lift(r).map_err(err)?;
        let w = pipes.lift(w).map_err(err)?;
        pipes.made.insert(p.id, (r, w));
    } else if !p.data.is_empty() {
        // The data goes with a read end, which may come after the pipe's
        // first descriptor.
        refill(&pipes.made[&p.id].1, 0, &p.data).map_err(err)?;
    }
    let (r, w) = &pipes.made[&p.id];
    let end = if p.write_end { w } else { r };
    // Each image fd of this end shares one open file description, as dup'd
    // descriptors do; its O_NONBLOCK is that end's.
    fcntl(
        end,
        libc::F_SETFL,
        (p.flags & libc::O_NONBLOCK as u32) as i32,
    )
    .map_err(err)?;
    end.try_clone().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_saved_with_a_read_end_numbered_after_the_write_end_comes_back() {
        let mut pipes = Pipes::new(100);
        let end = |write_end, data: &[u8]| Pipe {
            id: 5,
            write_end,
            flags: libc::O_NONBLOCK as u32,
            size: 1 << 16,
            data: data.to_vec(),
        };
        let w = restore(3, &end(true, b""), &mut pipes).unwrap();
        let r = restore(4, &end(false, b"kept"), &mut pipes).unwrap();
        assert_eq!(peek(&r, 1 << 16).unwrap(), b"kept");
        // The refill left the write end's O_NONBLOCK alone.
        assert_ne!(
            fcntl(&w, libc::F_GETFL, 0).unwrap() & libc::O_NONBLOCK,
            0,
            "write end O_NONBLOCK"
        );
    }
}
