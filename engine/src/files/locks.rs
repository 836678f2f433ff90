//! File locks held on regular files: flock(2) locks and OFD locks
//! (`F_OFD_SETLK`), which belong to an open file description, and POSIX
//! record locks (`F_SETLK`), which belong to the process.
//!
//! Dump: parsed from the `lock:` lines of the target's own
//! `/proc/PID/fdinfo/N` (the kernel lists there the locks taken through
//! that open file description and owned by that process or by the
//! description: a `pidfd_getfd` duplicate's fdinfo would not show the
//! target's POSIX locks). A lock shown by several descriptors (dup'd ones)
//! is saved once, with the first; the flock and OFD locks of a description
//! shared with a process of lower PID (after fork) are left to that process
//! (see [`kept_by_lower_pid`]). Leases, delegations and anything else are
//! refused, naming the fd.
//!
//! Restore: taken again without waiting ([`restore_all`]) once every
//! descriptor is at its number, in the restoring child, which is the
//! restored process: POSIX locks are owned by it (closing any descriptor of
//! a file drops the process's POSIX locks on it, so nothing may close one
//! afterwards: the helpers are closed first, and the restorer blob then
//! closes only the executable's descriptor and its own, so a POSIX lock on
//! the process's own executable file would be lost). A lock held by
//! someone else at restore time is an error naming the fd, the file and
//! the holder.
use super::FilesError;
use crm_proto::image::{fd_entry, FileLock, LockKind};
use std::io;
use std::os::fd::RawFd;

/// Most locks saved per descriptor.
pub const MAX_LOCKS: usize = 4096;

/// One parsed `lock:` line: the lock and the `MAJ:MIN:INO` of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    lock: FileLock,
    file: String,
}

/// Parses the text after `lock:` in fdinfo, e.g.
/// `1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF`; `Err` says what the
/// engine cannot restore.
fn parse(line: &str) -> Result<Parsed, String> {
    let t: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("an unrecognised lock ({line:?})");
    let (class, rest) = match t.as_slice() {
        [_id, class, rest @ ..] => (*class, rest),
        _ => return Err(bad()),
    };
    let kind = match class {
        "POSIX" => LockKind::Posix,
        "FLOCK" => LockKind::Flock,
        "OFDLCK" => LockKind::Ofd,
        "LEASE" | "DELEG" => return Err("holding a lease (F_SETLEASE)".into()),
        _ => return Err(format!("holding a {class} lock ({line:?})")),
    };
    // The PID field (the locker; -1 for OFD locks) is not needed: who
    // carries a shared lock is decided by `kept_by_lower_pid`.
    let (ty, file, start, end) = match rest {
        ["ADVISORY", ty, pid, file, start, end] if pid.parse::<i32>().is_ok() => {
            (*ty, *file, *start, *end)
        }
        _ => return Err(bad()),
    };
    let write = match ty {
        "WRITE" => true,
        "READ" => false,
        _ => return Err(bad()),
    };
    let start: u64 = start.parse().map_err(|_| bad())?;
    let len = match end {
        "EOF" => 0,
        e => {
            let e: u64 = e.parse().map_err(|_| bad())?;
            e.checked_sub(start)
                .and_then(|d| d.checked_add(1))
                .ok_or_else(bad)?
        }
    };
    Ok(Parsed {
        lock: FileLock {
            kind: kind as i32,
            write,
            start,
            len,
        },
        file: file.to_string(),
    })
}

/// Locks seen so far in a task's dump, to save each once.
#[derive(Debug, Default)]
pub struct Seen {
    saved: Vec<(RawFd, Parsed)>,
}

/// The locks fdinfo shows for fd `fd` of `pid` (`lines`; `file`: the
/// file's device and inode), minus those an earlier descriptor already
/// carries, and minus flock and OFD locks of an open file description a
/// process with a lower PID shares (inherited over fork: that process
/// carries them, see [`kept_by_lower_pid`]).
pub fn dump(
    pid: i32,
    fd: RawFd,
    file: (u64, u64),
    lines: &[String],
    seen: &mut Seen,
) -> Result<Vec<FileLock>, FilesError> {
    if lines.len() > MAX_LOCKS {
        return Err(FilesError::Refused {
            pid,
            fd,
            what: format!(
                "a file with {} locks (at most {MAX_LOCKS} are saved)",
                lines.len()
            ),
        });
    }
    let mut out = Vec::new();
    for line in lines {
        let p = parse(line).map_err(|what| FilesError::Refused { pid, fd, what })?;
        let dup = seen.saved.iter().any(|(other, q)| {
            *q == p && (p.lock.kind == LockKind::Posix as i32 || same_description(pid, *other, fd))
        });
        let per_description = p.lock.kind != LockKind::Posix as i32;
        let elsewhere = per_description && !dup && kept_by_lower_pid((pid, fd), file);
        if !dup && !elsewhere {
            out.push(p.lock);
            seen.saved.push((fd, p));
        }
    }
    Ok(out)
}

/// Whether fds `a` and `b` of `pid` share one open file description;
/// without kcmp, assumed (an identical flock or OFD lock seen twice is
/// then saved once).
fn same_description(pid: i32, a: RawFd, b: RawFd) -> bool {
    super::regular::same_description(pid, a, b).unwrap_or(true)
}

/// Whether a process with a lower PID than `of.0` holds a descriptor of the
/// open file description of fd `of.1` of `of.0` (a file with device and
/// inode `file`). Of the processes sharing one open file description
/// (after fork), the lowest PID carries its flock and OFD locks: in a tree
/// dump exactly one task saves them, and a sharer outside the dump keeps
/// them held while the dumped process is gone.
fn kept_by_lower_pid(of: (i32, RawFd), file: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    let lower = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p > 0 && p < of.0);
    for p in lower {
        let Ok(fds) = crate::procfs::list_fds(p) else {
            continue;
        };
        let shares = fds.into_iter().any(|n| {
            std::fs::metadata(format!("/proc/{p}/fd/{n}")).is_ok_and(|m| (m.dev(), m.ino()) == file)
                && super::regular::shared_description((p, n), of) == Some(true)
        });
        if shares {
            return true;
        }
    }
    false
}

/// Refuses locks on descriptors that are not regular files.
pub fn refuse_on(pid: i32, fd: RawFd, lines: &[String]) -> Result<(), FilesError> {
    if lines.is_empty() {
        return Ok(());
    }
    Err(FilesError::Refused {
        pid,
        fd,
        what: "locked, and locks are restored on regular files only".into(),
    })
}

/// `flock 0-EOF write`, `posix 100+50 read`, ...
pub fn describe(l: &FileLock) -> String {
    let kind = match LockKind::try_from(l.kind) {
        Ok(LockKind::Flock) => "flock",
        Ok(LockKind::Posix) => "posix",
        Ok(LockKind::Ofd) => "ofd",
        _ => "unknown",
    };
    let range = if l.len == 0 {
        format!("{}-EOF", l.start)
    } else {
        format!("{}+{}", l.start, l.len)
    };
    format!("{kind} {range} {}", if l.write { "write" } else { "read" })
}

fn struct_flock(l: &FileLock) -> io::Result<libc::flock> {
    let inval = || io::Error::from_raw_os_error(libc::EINVAL);
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = if l.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as i16;
    f.l_whence = libc::SEEK_SET as i16;
    f.l_start = i64::try_from(l.start).map_err(|_| inval())?;
    f.l_len = i64::try_from(l.len).map_err(|_| inval())?;
    Ok(f)
}

/// `fcntl(fd, cmd, &mut f)` for the lock commands.
fn fcntl_lock(fd: RawFd, cmd: i32, f: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `f` is a valid, initialised `struct flock` for the duration
    // of the call; the lock commands read and may write it.
    if unsafe { libc::fcntl(fd, cmd, f as *mut libc::flock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `flock(fd, op)`.
fn flock(fd: RawFd, op: i32) -> io::Result<()> {
    // SAFETY: flock takes integers only.
    if unsafe { libc::flock(fd, op) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes `l` through `fd`, without waiting. For a conflict, names the
/// holder when the kernel tells it.
fn take(fd: RawFd, l: &FileLock) -> io::Result<()> {
    let kind =
        LockKind::try_from(l.kind).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let res = match kind {
        LockKind::Flock => flock(
            fd,
            if l.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            } | libc::LOCK_NB,
        ),
        LockKind::Posix => fcntl_lock(fd, libc::F_SETLK, &mut struct_flock(l)?),
        LockKind::Ofd => fcntl_lock(fd, libc::F_OFD_SETLK, &mut struct_flock(l)?),
        LockKind::Unspecified => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match res {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            let holder = match kind {
                LockKind::Flock => None,
                _ => {
                    let mut f = struct_flock(l)?;
                    let cmd = if kind == LockKind::Ofd {
                        libc::F_OFD_GETLK
                    } else {
                        libc::F_GETLK
                    };
                    fcntl_lock(fd, cmd, &mut f).ok().map(|()| f.l_pid)
                }
            };
            Err(io::Error::new(
                e.kind(),
                match holder {
                    Some(p) if p > 0 => format!("held by process {p}: {e}"),
                    Some(_) => format!("held through another open file: {e}"),
                    None => format!("held by another open file (flock): {e}"),
                },
            ))
        }
        other => other,
    }
}

/// Takes again every lock of the image's regular files (`fds`: number,
/// close-on-exec, kind), each through the descriptor that carried it.
pub fn restore_all(fds: &[(i32, bool, fd_entry::Kind)]) -> Result<(), FilesError> {
    for (fd, _, kind) in fds {
        let fd_entry::Kind::Regular(r) = kind else {
            continue;
        };
        for l in &r.locks {
            take(*fd, l).map_err(|source| FilesError::Lock {
                fd: *fd,
                path: r.file.as_ref().map_or(String::new(), |f| f.path.clone()),
                lock: describe(l),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(kind: LockKind, write: bool, start: u64, len: u64) -> FileLock {
        FileLock {
            kind: kind as i32,
            write,
            start,
            len,
        }
    }

    #[test]
    fn parses_kernel_lines() {
        let p = parse("1: POSIX  ADVISORY  WRITE 1234 08:01:5678 100 149").unwrap();
        assert_eq!(p.lock, lock(LockKind::Posix, true, 100, 50));
        assert_eq!(p.file, "08:01:5678");
        let p = parse("2: FLOCK  ADVISORY  READ 1234 00:2a:77 0 EOF").unwrap();
        assert_eq!(p.lock, lock(LockKind::Flock, false, 0, 0));
        let p = parse("3: OFDLCK ADVISORY  READ -1 00:2a:77 4096 EOF").unwrap();
        assert_eq!(p.lock, lock(LockKind::Ofd, false, 4096, 0));
        assert!(parse("1: LEASE  ACTIVE    READ 1 00:2a:77 0 EOF")
            .unwrap_err()
            .contains("lease"));
        for bad in [
            "",
            "1:",
            "1: POSIX ADVISORY WRITE 1 x 9 3",
            "1: POSIX ADVISORY WRITE 1 x 18446744073709551615 18446744073709551615x",
            "1: POSIX ADVISORY UNLCK 1 x 0 EOF",
            "1: ACCESS ADVISORY WRITE 1 x 0 EOF",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn posix_lock_seen_twice_is_saved_once() {
        let mut seen = Seen::default();
        let line = vec!["1: POSIX  ADVISORY  WRITE 1 08:01:5 0 9".to_string()];
        assert_eq!(dump(1, 3, (0, 0), &line, &mut seen).unwrap().len(), 1);
        assert!(dump(1, 4, (0, 0), &line, &mut seen).unwrap().is_empty());
        let many = vec![line[0].clone(); MAX_LOCKS + 1];
        assert!(dump(1, 5, (0, 0), &many, &mut seen).is_err());
    }

    #[test]
    fn describes() {
        assert_eq!(
            describe(&lock(LockKind::Posix, true, 10, 5)),
            "posix 10+5 write"
        );
        assert_eq!(
            describe(&lock(LockKind::Flock, false, 0, 0)),
            "flock 0-EOF read"
        );
    }
}
