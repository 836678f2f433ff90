//! Regular files, directories and reopenable character devices (`/dev/null`):
//! saved as path, open flags and offset; restored by opening the path again
//! and seeking.
//!
//! A regular file unlinked while open (a "ghost": its link reads
//! `PATH (deleted)`) has its contents saved, up to [`GHOST_LIMIT`] for all
//! the ghosts of a task. Restore recreates it unnamed (`O_TMPFILE`) in the
//! directory it was in, so it stays on the same filesystem and nobody sees
//! it under a name, and opens it with the original flags and offset. Each
//! descriptor gets its own copy: two descriptors of one unlinked file no
//! longer see each other's writes after a restore.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::{FileId, Ghost, RegularFile};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub fn file_id(path: &str, meta: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_string(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

/// Most bytes of unlinked files saved for one task.
pub const GHOST_LIMIT: u64 = 32 << 20;

const DELETED: &str = " (deleted)";

/// Whether a descriptor's link names a regular file that was unlinked.
pub fn is_ghost(link: &str, meta: &std::fs::Metadata) -> bool {
    link.starts_with('/') && link.ends_with(DELETED) && meta.file_type().is_file()
}

/// Saves fd `fd` of `pid` (`dup_of`: the lower fd it was dup'd from, if
/// any). An unlinked file's contents are read through `/proc/PID/fd/FD`
/// and counted against `ghost_budget`.
pub fn dump(
    pid: i32,
    fd: i32,
    path: &str,
    meta: &std::fs::Metadata,
    info: &FdInfo,
    dup_of: Option<i32>,
    ghost_budget: &mut u64,
) -> Result<RegularFile, FilesError> {
    // A dup of an unlinked file: its original carries the contents.
    let ghost = if is_ghost(path, meta) && dup_of.is_none() {
        let size = meta.len();
        if size > *ghost_budget {
            return Err(FilesError::GhostTooLarge {
                pid,
                fd,
                path: path.to_string(),
                size,
                limit: GHOST_LIMIT,
            });
        }
        let inspect = |source| FilesError::Inspect { pid, fd, source };
        let mut f = std::fs::File::open(format!("/proc/{pid}/fd/{fd}")).map_err(inspect)?;
        let mut contents = Vec::with_capacity(size as usize);
        // The file may grow while we read (the process runs during a
        // precheck): never read more than the budget.
        (&mut f)
            .take(*ghost_budget + 1)
            .read_to_end(&mut contents)
            .map_err(inspect)?;
        if contents.len() as u64 > *ghost_budget {
            return Err(FilesError::GhostTooLarge {
                pid,
                fd,
                path: path.to_string(),
                size: contents.len() as u64,
                limit: GHOST_LIMIT,
            });
        }
        *ghost_budget -= contents.len() as u64;
        use std::os::unix::fs::PermissionsExt;
        Some(Ghost {
            contents,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    } else {
        None
    };
    Ok(RegularFile {
        file: Some(file_id(path, meta)),
        flags: info.flags & !(libc::O_CLOEXEC as u32),
        pos: info.pos,
        ghost,
        locks: Vec::new(),
        dup_of,
    })
}

/// Recreates an unlinked file in `dir`, unnamed, with `ghost`'s contents and
/// mode; returns a read-write descriptor of it.
fn recreate_ghost(dir: &str, ghost: &Ghost) -> std::io::Result<std::fs::File> {
    let cdir = CString::new(dir).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cdir` is NUL-terminated and outlives the call.
    let raw = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            (ghost.mode & 0o7777) as libc::c_uint,
        )
    };
    let mut file = if raw >= 0 {
        // SAFETY: `raw` is a fresh descriptor we own.
        unsafe { std::fs::File::from_raw_fd(raw) }
    } else {
        // No O_TMPFILE on this filesystem: a named file, unlinked at once.
        let name = format!(
            "{dir}/.crm-ghost-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&name)?;
        std::fs::remove_file(&name)?;
        f
    };
    file.write_all(&ghost.contents)?;
    // Owner first (chown clears set-id bits), then the mode. Only root may
    // give a file away: otherwise the restoring user keeps it.
    match std::os::unix::fs::fchown(&file, Some(ghost.uid), Some(ghost.gid)) {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
        _ => {}
    }
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(ghost.mode & 0o7777))?;
    Ok(file)
}

/// Opens the file again with its original flags and offset. Flags that
/// would change the file (O_CREAT, O_EXCL, O_TRUNC) are dropped.
pub fn restore(fd: i32, reg: &RegularFile) -> Result<OwnedFd, FilesError> {
    let path = reg.file.as_ref().map(|f| f.path.as_str()).unwrap_or("");
    // An unlinked file: recreated, then reopened with the original flags
    // (the descriptor from O_TMPFILE is read-write). Under its old name if
    // that is free (linked for the instant of the open, so that
    // /proc/PID/fd shows the name it had), else through /proc/self/fd.
    let _ghost_file;
    let mut unlink_after = None;
    let open_path = match &reg.ghost {
        Some(g) => {
            let dir = ghost_dir(path);
            let f = recreate_ghost(dir, g).map_err(|source| FilesError::Reopen {
                fd,
                path: format!("{path} (recreated in {dir})"),
                source,
            })?;
            let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
            _ghost_file = f;
            let name = path.strip_suffix(DELETED).unwrap_or(path);
            if link_follow(&proc_path, name).is_ok() {
                unlink_after = Some(name.to_string());
                name.to_string()
            } else {
                proc_path
            }
        }
        None => path.to_string(),
    };
    let opened = open_and_seek(fd, path, &open_path, reg);
    if let Some(name) = unlink_after {
        let _ = std::fs::remove_file(name);
    }
    opened
}

/// Fd `fd` of the image as a duplicate of the image's regular-file fd
/// `of` (lower, so already at its number: descriptors are restored in
/// order), which must be in `regular`.
pub fn restore_dup(
    fd: i32,
    of: i32,
    reg: &RegularFile,
    regular: &std::collections::HashSet<i32>,
) -> Result<OwnedFd, FilesError> {
    let path = reg.file.as_ref().map_or("", |f| f.path.as_str());
    dup_lower(fd, of, path, regular)
}

/// A new descriptor for the image's fd `of` (one of `allowed`, lower than
/// `fd`, already at its number), to become fd `fd`; errors name `path`.
pub fn dup_lower(
    fd: i32,
    of: i32,
    path: &str,
    allowed: &std::collections::HashSet<i32>,
) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Reopen {
        fd,
        path: format!("{path} (as a duplicate of fd {of})"),
        source,
    };
    if of >= fd || !allowed.contains(&of) {
        return Err(err(std::io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; a closed one fails
    // with EBADF, and the result is a new descriptor nothing owns.
    let n = unsafe { libc::fcntl(of, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `n` is the fresh descriptor just made.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// `linkat(AT_FDCWD, from, AT_FDCWD, to, AT_SYMLINK_FOLLOW)`: gives the
/// file behind the magic link `from` the name `to` (fails if it exists).
fn link_follow(from: &str, to: &str) -> std::io::Result<()> {
    let inval = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let (cfrom, cto) = (
        CString::new(from).map_err(|_| inval())?,
        CString::new(to).map_err(|_| inval())?,
    );
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Opens `open_path` with the flags and offset of `reg` (errors name
/// `path`, the file as the image knows it).
fn open_and_seek(
    fd: i32,
    path: &str,
    open_path: &str,
    reg: &RegularFile,
) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Reopen {
        fd,
        path: path.to_string(),
        source,
    };
    let cpath = CString::new(open_path)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let flags =
        (reg.flags as i32) & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) | libc::O_NOCTTY;
    // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
    let raw = unsafe { libc::open(cpath.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    if reg.pos != 0 {
        // SAFETY: lseek on a descriptor we own.
        let r = unsafe { libc::lseek(raw, reg.pos as libc::off_t, libc::SEEK_SET) };
        if r < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(owned)
}

/// Whether fds `a` and `b` of `pid` share one open file description
/// (`kcmp(KCMP_FILE)`); `None` if the kernel cannot tell (no kcmp).
pub fn same_description(pid: i32, a: i32, b: i32) -> Option<bool> {
    shared_description((pid, a), (pid, b))
}

/// Whether fd `a.1` of process `a.0` and fd `b.1` of process `b.0` are one
/// open file description (`kcmp(KCMP_FILE)`); `None` if the kernel cannot
/// tell.
pub fn shared_description(a: (i32, i32), b: (i32, i32)) -> Option<bool> {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp takes integers only and reads nothing of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a.0, b.0, KCMP_FILE, a.1, b.1) };
    (r >= 0).then_some(r == 0)
}

/// The lowest of `earlier` (descriptors of `pid` with their device and
/// inode, lowest first) that shares its open file description with fd `fd`
/// on the file `dev_ino`.
pub fn dup_of(
    pid: i32,
    fd: i32,
    dev_ino: (u64, u64),
    earlier: &[(i32, (u64, u64))],
) -> Option<i32> {
    earlier
        .iter()
        .filter(|(_, id)| *id == dev_ino)
        .map(|(n, _)| *n)
        .find(|&n| same_description(pid, n, fd) == Some(true))
}

/// The directory an unlinked file was in: its path without " (deleted)".
pub fn ghost_dir(path: &str) -> &str {
    let path = path.strip_suffix(DELETED).unwrap_or(path);
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => ".",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghost_directory() {
        assert_eq!(ghost_dir("/tmp/a/b.dat (deleted)"), "/tmp/a");
        assert_eq!(ghost_dir("/b.dat (deleted)"), "/");
        assert_eq!(ghost_dir("/tmp/x"), "/tmp");
    }

    #[test]
    fn ghost_is_recreated_unnamed_with_contents_and_mode() {
        let g = Ghost {
            contents: b"contents of a deleted file".to_vec(),
            mode: 0o640,
            uid: 65534,
            gid: 65534,
        };
        let f = recreate_ghost("/tmp", &g).unwrap();
        let meta = f.metadata().unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.nlink(), 0, "no name");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
        let back = std::fs::read(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert_eq!(back, g.contents);
    }
}
