//! FIFOs (named pipes) opened by the task: read end, write end or O_RDWR,
//! blocking or not.
//!
//! Dump: per descriptor the node's path and identity, open flags, mode and
//! owner, and the pipe's size; the bytes buffered in the FIFO are copied
//! with `tee(2)` from a `pidfd_getfd` duplicate (nothing is consumed) and
//! stored once, with the lowest-numbered readable descriptor. A FIFO the
//! task only writes to (its reader is another process; in a tree dump: no
//! task of the tree reads it) and a FIFO unlinked while open are refused.
//!
//! Restore: the node must be a FIFO at its path; if the path is free it is
//! created with `mkfifo` (mode and owner as saved: a migration to another
//! host brings the node along), if it is anything else the restore fails
//! naming it. A helper descriptor opened O_RDWR holds the pipe while the
//! ends are opened non-blocking (so no open waits for a peer), then gets the
//! pipe size and the saved bytes, and is closed when every descriptor is
//! back. If the FIFO already holds bytes when reopened (another process kept
//! it open, so the kernel kept its buffer, or another task of a restored
//! tree refilled it first: the check and the refill are done under a flock
//! of the node), those are kept and the saved copy is not written again.
//! A descriptor dup'd from a lower one (found with `kcmp` at dump) comes
//! back as a duplicate of it.
use super::pipe_buf::{fcntl, peek, refill};
use super::FilesError;
use crate::dirty::uffd_sys;
use crate::procfs::FdInfo;
use crm_proto::image::{fd_entry, FdEntry, Fifo};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

const DELETED: &str = " (deleted)";

/// Saves fd `fd` of `pid`, open on the FIFO `path`; the data goes with the
/// first readable descriptor of each FIFO (`with_data`: (dev, ino) of the
/// FIFOs whose data is saved).
pub fn dump(
    pid: i32,
    fd: i32,
    path: &str,
    meta: &std::fs::Metadata,
    info: &FdInfo,
    with_data: &mut HashSet<(u64, u64)>,
) -> Result<Fifo, FilesError> {
    if path.ends_with(DELETED) || !path.starts_with('/') {
        return Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a FIFO unlinked while open",
            target: path.to_string(),
        });
    }
    let err = |source| FilesError::Inspect { pid, fd, source };
    let pidfd = uffd_sys::pidfd_open(pid).map_err(err)?;
    let mine = uffd_sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(err)?;
    let size = fcntl(&mine, libc::F_GETPIPE_SZ, 0).map_err(err)? as u32;
    let readable = info.flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
    let has_data = readable && with_data.insert((meta.dev(), meta.ino()));
    let data = if has_data {
        peek(&mine, size as usize).map_err(err)?
    } else {
        Vec::new()
    };
    Ok(Fifo {
        file: Some(super::regular::file_id(path, meta)),
        flags: info.flags & !(libc::O_CLOEXEC as u32),
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size,
        has_data,
        data,
        dup_of: None,
    })
}

fn id(f: &Fifo) -> (u64, u64) {
    f.file.as_ref().map_or((0, 0), |i| (i.dev, i.ino))
}

/// Refuses FIFOs of which the task holds no readable descriptor.
pub fn check_readers(pid: i32, fds: &[FdEntry]) -> Result<(), FilesError> {
    let mut fifos: HashMap<(u64, u64), (bool, i32, String)> = HashMap::new();
    for f in fds {
        if let Some(fd_entry::Kind::Fifo(p)) = &f.kind {
            let path = p.file.as_ref().map_or(String::new(), |i| i.path.clone());
            fifos.entry(id(p)).or_insert((false, f.fd, path)).0 |= p.has_data;
        }
    }
    match fifos.into_values().find(|(read, _, _)| !read) {
        Some((_, fd, path)) => Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a FIFO read by another process",
            target: format!("{path}, which this process only writes to"),
        }),
        None => Ok(()),
    }
}

/// FIFOs opened so far in a restore: one O_RDWR helper descriptor per FIFO,
/// at a number at or above `high`; dropping this closes them.
#[derive(Debug)]
pub struct Fifos {
    high: i32,
    made: HashMap<(u64, u64), OwnedFd>,
}

impl Fifos {
    pub fn new(high: i32) -> Fifos {
        Fifos {
            high,
            made: HashMap::new(),
        }
    }
}

fn cstring(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `open(path, flags | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW)`.
fn open(path: &str, flags: i32) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bytes buffered in the pipe (`FIONREAD`).
fn buffered(fd: &OwnedFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Takes an exclusive flock on the FIFO through `fd`, waiting at most 2 s
/// (someone outside could hold one); whether it was taken.
fn flock_briefly(fd: &OwnedFd) -> bool {
    for _ in 0..200 {
        // SAFETY: flock takes integers only.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Makes sure a FIFO is at `path`: creates it (mode and owner of `f`) if
/// the path is free; refuses anything else there.
fn ensure_node(fd: i32, path: &str, f: &Fifo) -> Result<(), FilesError> {
    let refuse = |what: String| FilesError::Fifo {
        fd,
        path: path.to_string(),
        what,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(m) => {
            return Err(refuse(format!(
                "the path is now a {} (mode {:o}), not a FIFO; refusing to replace it",
                kind_name(&m),
                m.mode()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(refuse(format!("cannot look at the path: {e}"))),
    }
    let c = cstring(path).map_err(|e| refuse(e.to_string()))?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), (f.mode & 0o7777) as libc::mode_t) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(refuse(format!("mkfifo: {e}")));
        }
    }
    // Owner first (chown clears set-id bits), then the mode past the umask.
    match std::os::unix::fs::lchown(path, Some(f.uid), Some(f.gid)) {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => {
            return Err(refuse(format!("chown: {e}")))
        }
        _ => {}
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(|e| refuse(format!("chmod: {e}")))
}

/// Checks, before a restore touches anything, that fd `fd`'s FIFO can be
/// reopened: a FIFO is at its path, or the path is free in an existing
/// directory. `Err` says what is wrong.
pub fn preflight(fd: i32, f: &Fifo) -> Result<(), String> {
    let path = f.file.as_ref().map_or("", |i| i.path.as_str());
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => Ok(()),
        Ok(m) => Err(format!(
            "fd {fd} is a FIFO, but the path is now a {}",
            kind_name(&m)
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = std::path::Path::new(path)
                .parent()
                .unwrap_or(std::path::Path::new("/"));
            match std::fs::metadata(dir) {
                Ok(d) if d.is_dir() => Ok(()),
                _ => Err(format!(
                    "fd {fd} is a FIFO that cannot be created again: no directory {}",
                    dir.display()
                )),
            }
        }
        Err(e) => Err(format!(
            "fd {fd} is a FIFO whose path cannot be looked at: {e}"
        )),
    }
}

fn kind_name(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_socket() {
        "socket"
    } else if t.is_file() {
        "regular file"
    } else {
        "device or other file"
    }
}

/// A descriptor for fd `fd` of the image, open on its FIFO with its flags.
pub fn restore(fd: i32, f: &Fifo, fifos: &mut Fifos) -> Result<OwnedFd, FilesError> {
    let path = f.file.as_ref().map_or("", |i| i.path.as_str());
    let err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| FilesError::Fifo {
            fd,
            path: path.to_string(),
            what: format!("{what}: {e}"),
        }
    };
    if !fifos.made.contains_key(&id(f)) {
        ensure_node(fd, path, f)?;
        let helper = open(path, libc::O_RDWR | libc::O_NONBLOCK).map_err(err("open O_RDWR"))?;
        let is_fifo = std::fs::File::from(helper.try_clone().map_err(err("dup"))?)
            .metadata()
            .map_err(err("fstat"))?
            .file_type()
            .is_fifo();
        if !is_fifo {
            return Err(FilesError::Fifo {
                fd,
                path: path.to_string(),
                what: "the path was replaced by something that is not a FIFO".into(),
            });
        }
        let n = fcntl(&helper, libc::F_DUPFD_CLOEXEC, fifos.high).map_err(err("move"))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor nothing owns.
        let helper = unsafe { OwnedFd::from_raw_fd(n) };
        fifos.made.insert(id(f), helper);
    }
    let helper = &fifos.made[&id(f)];
    if f.has_data {
        // Tasks of a tree that all read one FIFO each saved its bytes and
        // are restored at the same time: the first to hold the node's flock
        // refills it, the others then find the bytes there.
        let locked = flock_briefly(helper);
        let empty = buffered(helper).map_err(err("FIONREAD"));
        let filled = match empty {
            Ok(0) => refill(helper, f.size, &f.data).map_err(err("refill the saved bytes")),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if locked {
            // SAFETY: flock takes integers only; unlocking our helper.
            unsafe { libc::flock(helper.as_raw_fd(), libc::LOCK_UN) };
        }
        filled?;
    }
    let accmode = (f.flags as i32) & libc::O_ACCMODE;
    let end = open(path, accmode | libc::O_NONBLOCK).map_err(err("open"))?;
    fcntl(&end, libc::F_SETFL, (f.flags as i32) & libc::O_NONBLOCK).map_err(err("F_SETFL"))?;
    Ok(end)
}

/// Fd `fd` of the image as a duplicate of its lower FIFO fd `of` (one of
/// `fifo_fds`): one open file description, as before the dump.
pub fn restore_dup(
    fd: i32,
    of: i32,
    f: &Fifo,
    fifo_fds: &std::collections::HashSet<i32>,
) -> Result<OwnedFd, FilesError> {
    let path = f.file.as_ref().map_or("", |i| i.path.as_str());
    super::regular::dup_lower(fd, of, path, fifo_fds)
}

/// `FIFO /path read end, size N, M bytes buffered nonblock` (for `show`).
pub fn describe(f: &Fifo) -> String {
    let end = match (f.flags as i32) & libc::O_ACCMODE {
        libc::O_RDONLY => "read end",
        libc::O_WRONLY => "write end",
        _ => "read-write",
    };
    format!(
        "FIFO {} {end}, size {}, {}{}{}",
        f.file.as_ref().map_or("?", |i| i.path.as_str()),
        f.size,
        if f.has_data {
            format!("{} bytes buffered", f.data.len())
        } else {
            "data with another fd".to_string()
        },
        if f.flags & libc::O_NONBLOCK as u32 != 0 {
            " nonblock"
        } else {
            ""
        },
        f.dup_of
            .map_or(String::new(), |n| format!(" (dup of fd {n})"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::image::FileId;

    fn image(path: &str, flags: i32, has_data: bool, data: &[u8]) -> Fifo {
        Fifo {
            file: Some(FileId {
                path: path.into(),
                dev: 1,
                ino: 2,
                ..Default::default()
            }),
            flags: flags as u32,
            mode: 0o640,
            uid: 0,
            gid: 0,
            size: 65536,
            has_data,
            data: data.to_vec(),
            dup_of: None,
        }
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.max(0) as usize);
        buf
    }

    /// Removes a test's node, and the directory once no test uses it.
    fn cleanup(path: &str) {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = std::path::Path::new(path).parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    fn tmp(name: &str) -> String {
        let d = std::env::temp_dir().join(format!("crm-fifo-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = std::fs::remove_file(&p);
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn missing_node_is_created_and_data_refilled_once() {
        let path = tmp("created");
        let mut fifos = Fifos::new(200);
        let r = restore(
            3,
            &image(&path, libc::O_RDONLY | libc::O_NONBLOCK, true, b"abc"),
            &mut fifos,
        )
        .unwrap();
        let w = restore(4, &image(&path, libc::O_WRONLY, false, b""), &mut fifos).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(fcntl(&w, libc::F_GETFL, 0).unwrap() & libc::O_NONBLOCK, 0);
        drop(fifos); // the helper: the ends keep the FIFO
        assert_eq!(read_all(&r), b"abc");
        // Reopened while someone still holds it with bytes in it: the
        // kernel's bytes are kept, the saved copy is not written again.
        refill(&w, 0, b"xyz").unwrap();
        let mut again = Fifos::new(200);
        let r2 = restore(
            5,
            &image(&path, libc::O_RDONLY | libc::O_NONBLOCK, true, b"xyz"),
            &mut again,
        )
        .unwrap();
        assert_eq!(read_all(&r2), b"xyz");
        assert!(read_all(&r2).is_empty());
        cleanup(&path);
    }

    #[test]
    fn a_path_that_is_not_a_fifo_is_refused_and_left_alone() {
        let path = tmp("regular");
        std::fs::write(&path, b"data").unwrap();
        let e = restore(
            7,
            &image(&path, libc::O_RDONLY, true, b""),
            &mut Fifos::new(200),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fd 7") && e.contains("not a FIFO"), "{e}");
        let pre = preflight(7, &image(&path, libc::O_RDONLY, true, b"")).unwrap_err();
        assert!(pre.contains("regular file"), "{pre}");
        assert!(preflight(7, &image("/nonexistent-dir/f", 0, true, b"")).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        cleanup(&path);
    }

    #[test]
    fn a_fifo_only_written_to_is_refused() {
        let entry = |fd, f: Fifo| FdEntry {
            fd,
            cloexec: false,
            kind: Some(fd_entry::Kind::Fifo(f)),
            ..Default::default()
        };
        let w = image("/f", libc::O_WRONLY, false, b"");
        let r = image("/f", libc::O_RDONLY, true, b"");
        assert!(check_readers(1, &[entry(3, w.clone())]).is_err());
        assert!(check_readers(1, &[entry(3, w), entry(4, r)]).is_ok());
    }
}
