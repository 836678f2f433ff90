//! Pseudo-terminals (Unix 98 ptys): a master (`/dev/ptmx`) and its slave
//! (`/dev/pts/N`), both held by tasks of the dumped tree.
//!
//! Dump: each descriptor is copied out of the target with `pidfd_getfd` and
//! inspected from our side: the pty's index, termios and window size (the
//! slave's, also reached through the master), packet mode and lock (master
//! only), open flags. A session leader whose controlling terminal is a pty
//! marks one of its slave descriptors `ctty`, with the foreground group. A
//! slave whose master no task of the tree holds (a terminal emulator, the
//! test harness), and a master whose slave a process outside the tree
//! holds, are refused by [`check_tree`]; other terminals (`/dev/tty`,
//! consoles) are refused by the kind check.
//!
//! Restore: the coordinator opens one new pty per pty of the image before
//! any task exists ([`create`]; with the original index if it is free,
//! else another) and sets its termios, window size, packet mode and lock
//! (kept only when no task holds the slave, which is then left unopened). Each descriptor is then recreated on its own: a master is a
//! duplicate of the new master, a slave a new open of the new slave
//! (`O_NOCTTY`), made the controlling terminal of the session leader that
//! had it (`TIOCSCTTY`) with its foreground group (`TIOCSPGRP`). Data
//! queued in the pty's buffers at dump time is lost. In a tree, the
//! session leader takes its controlling terminal right after `setsid`
//! ([`take_ctty`]), so the tasks it then creates inherit it.
use super::tty_sys;
use super::FilesError;
use crate::procfs::{self, FdInfo};
use crm_proto::image::{TtyFd, TtyPty, TtyTermios, TtyWinsize};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

/// `/dev/ptmx` is character device 5:2.
pub fn is_master(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    libc::major(rdev) == 5 && libc::minor(rdev) == 2
}

/// Unix 98 pty slaves: majors 136 to 143.
pub fn is_slave_dev(rdev: u64) -> bool {
    (136..=143).contains(&libc::major(rdev))
}

/// The index of a slave from its link `/dev/pts/N`.
fn slave_index(link: &str) -> Option<u32> {
    link.strip_prefix("/dev/pts/")?.parse().ok()
}

/// The controlling terminal of a session leader: its device and
/// foreground process group; `matched` once a descriptor took it.
#[derive(Debug)]
pub struct Ctty {
    pub rdev: u64,
    pub fg_pgrp: i32,
    pub matched: bool,
}

/// The controlling terminal of `pid` if it leads its session and has a
/// pty slave as its controlling terminal.
pub fn session_ctty(pid: i32) -> Result<Option<Ctty>, FilesError> {
    let st = procfs::read_stat(pid)?;
    if st.session != pid || st.tty_nr == 0 {
        return Ok(None);
    }
    let n = st.tty_nr as u32;
    let major = (n >> 8) & 0xfff;
    let minor = (n & 0xff) | ((n >> 12) & 0xfff00);
    let rdev = libc::makedev(major, minor);
    if !is_slave_dev(rdev) {
        return Ok(None);
    }
    Ok(Some(Ctty {
        rdev,
        fg_pgrp: st.tpgid,
        matched: false,
    }))
}

/// Saves fd `fd` of `pid`, a pty master or slave (`dup_of`: the lower fd
/// of the same open file description). `pidfd`: the task's pidfd, opened
/// on first use.
#[allow(clippy::too_many_arguments)]
pub fn dump(
    pid: i32,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
    info: &FdInfo,
    pidfd: &mut Option<OwnedFd>,
    ctty: &mut Option<Ctty>,
    dup_of: Option<i32>,
) -> Result<TtyFd, FilesError> {
    let inspect = |source| FilesError::Inspect { pid, fd, source };
    if pidfd.is_none() {
        *pidfd = Some(tty_sys::pidfd_open(pid).map_err(inspect)?);
    }
    let pfd = pidfd.as_ref().expect("opened above");
    let ours = tty_sys::getfd(pfd.as_fd(), fd).map_err(inspect)?;
    let master = is_master(meta);
    let t = tty_sys::termios(ours.as_fd()).map_err(inspect)?;
    let w = tty_sys::winsize(ours.as_fd()).map_err(inspect)?;
    let mut pty = TtyPty {
        index: 0,
        termios: Some(TtyTermios {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line as u32,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }),
        winsize: Some(TtyWinsize {
            rows: w.ws_row as u32,
            cols: w.ws_col as u32,
            xpixel: w.ws_xpixel as u32,
            ypixel: w.ws_ypixel as u32,
        }),
        packet: false,
        locked: false,
    };
    if master {
        pty.index = tty_sys::index(ours.as_fd()).map_err(inspect)?;
        pty.packet = tty_sys::packet(ours.as_fd()).map_err(inspect)?;
        pty.locked = tty_sys::locked(ours.as_fd()).map_err(inspect)?;
    } else {
        pty.index = slave_index(link).ok_or_else(|| FilesError::Unsupported {
            pid,
            fd,
            kind: "a pty slave outside /dev/pts",
            target: link.to_string(),
        })?;
    }
    let mut out = TtyFd {
        pty: Some(pty),
        master,
        flags: info.flags,
        dup_of,
        ctty: false,
        fg_pgrp: 0,
    };
    if let Some(c) = ctty.as_mut() {
        if !master && dup_of.is_none() && !c.matched && c.rdev == meta.rdev() {
            c.matched = true;
            out.ctty = true;
            out.fg_pgrp = c.fg_pgrp;
        }
    }
    Ok(out)
}

/// Refuses a session leader whose controlling terminal is a pty it holds
/// no descriptor of (restore could not make it its terminal again).
pub fn check_ctty(pid: i32, ctty: &Option<Ctty>) -> Result<(), FilesError> {
    match ctty {
        Some(c) if !c.matched => Err(FilesError::Ctty {
            pid,
            what: format!(
                "its controlling terminal is the pty slave {}:{}, which it holds no \
                 descriptor of",
                libc::major(c.rdev),
                libc::minor(c.rdev)
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses pty slaves whose master is held by no task of the tree, and
/// masters whose slave a process outside the tree holds open: `tasks`
/// lists every task's PID and descriptors.
pub fn check_tree<'a>(
    tasks: impl IntoIterator<Item = (i32, &'a crm_proto::image::FilesCore)> + Clone,
) -> Result<(), FilesError> {
    let ttys = |files: &'a crm_proto::image::FilesCore| {
        files.fds.iter().filter_map(|f| match &f.kind {
            Some(crm_proto::image::fd_entry::Kind::Tty(t)) => Some((f.fd, t)),
            _ => None,
        })
    };
    let index = |t: &TtyFd| t.pty.as_ref().map_or(0, |p| p.index);
    let mut masters = std::collections::BTreeMap::new();
    let mut slaves = std::collections::BTreeSet::new();
    let mut pids = std::collections::BTreeSet::new();
    for (pid, files) in tasks.clone() {
        pids.insert(pid);
        for (fd, t) in ttys(files) {
            if t.master {
                masters.entry(index(t)).or_insert((pid, fd));
            } else {
                slaves.insert(index(t));
            }
        }
    }
    for (pid, files) in tasks {
        for (fd, t) in ttys(files) {
            let index = index(t);
            if !t.master && !masters.contains_key(&index) {
                return Err(FilesError::Refused {
                    pid,
                    fd,
                    what: format!(
                        "a terminal, the pty slave /dev/pts/{index}, whose master (the other \
                         end) no task of the dumped tree holds"
                    ),
                });
            }
        }
    }
    for (&index, &(pid, fd)) in masters.iter().filter(|(i, _)| !slaves.contains(i)) {
        if let Some(holder) = slave_holder_outside(index, &pids) {
            return Err(FilesError::Refused {
                pid,
                fd,
                what: format!(
                    "a terminal, the pty master of /dev/pts/{index}, whose slave (the other \
                     end) process {holder}, outside the dumped tree, holds open"
                ),
            });
        }
    }
    Ok(())
}

/// A process not in `tree` with a descriptor of `/dev/pts/INDEX`, if any
/// (found by reading every process's descriptor links).
fn slave_holder_outside(index: u32, tree: &std::collections::BTreeSet<i32>) -> Option<i32> {
    let path = std::path::PathBuf::from(format!("/dev/pts/{index}"));
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == path))
        {
            return Some(pid);
        }
    }
    None
}

/// The new ptys of a restore: the image's index, the new master and slave
/// (-1 when no task holds the slave).
#[derive(Debug, Clone, Copy)]
pub struct PtyFds {
    pub index: u32,
    pub master: RawFd,
    pub slave: RawFd,
}

fn invalid(index: u32, what: &str) -> FilesError {
    FilesError::Pty {
        index,
        what: what.to_string(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

fn termios_of(index: u32, t: &TtyTermios) -> Result<libc::termios, FilesError> {
    // SAFETY: an all-zero termios is a valid value.
    let mut out: libc::termios = unsafe { std::mem::zeroed() };
    if t.cc.len() > out.c_cc.len() || t.line > 255 {
        return Err(invalid(
            index,
            "restore its termios (malformed in the image)",
        ));
    }
    out.c_iflag = t.iflag;
    out.c_oflag = t.oflag;
    out.c_cflag = t.cflag;
    out.c_lflag = t.lflag;
    out.c_line = t.line as u8;
    out.c_cc[..t.cc.len()].copy_from_slice(&t.cc);
    out.c_ispeed = t.ispeed;
    out.c_ospeed = t.ospeed;
    Ok(out)
}

/// Most ptys opened (and closed again) to reach the image's index.
const MAX_SPARE_PTYS: usize = 256;

/// A new pty master, with index `want` if it is free: /dev/ptmx hands out
/// the lowest free index, so the lower ones are taken (and let go) until
/// `want` comes, or a higher one shows that `want` is in use.
fn open_index(want: u32) -> std::io::Result<OwnedFd> {
    let mut spare = Vec::new();
    loop {
        let m = tty_sys::open_ptmx()?;
        let i = tty_sys::index(m.as_fd())?;
        if i >= want || spare.len() >= MAX_SPARE_PTYS {
            return Ok(m);
        }
        spare.push(m);
    }
}

/// Opens one new pty per pty of `fds` (the image's descriptors of every
/// task) and sets its state. Returns the descriptors to keep open until
/// the restore ends (each at or above `min_fd`) and the table the tasks
/// use.
pub fn create<'a>(
    fds: impl IntoIterator<Item = &'a TtyFd>,
    min_fd: i32,
) -> Result<(Vec<OwnedFd>, Vec<PtyFds>), FilesError> {
    // The master's view first (packet mode and lock are only known there),
    // and whether any descriptor of the slave is open.
    let mut ptys: std::collections::BTreeMap<u32, (&TtyPty, bool)> = Default::default();
    for f in fds {
        let Some(p) = f.pty.as_ref() else { continue };
        let e = ptys.entry(p.index).or_insert((p, false));
        if f.master {
            e.0 = p;
        } else {
            e.1 = true;
        }
    }
    let mut keep = Vec::new();
    let mut table = Vec::new();
    for (&index, &(p, has_slave)) in &ptys {
        let err = |what: &str| {
            let what = what.to_string();
            move |source| FilesError::Pty {
                index,
                what,
                source,
            }
        };
        let high = |fd: OwnedFd| -> Result<OwnedFd, FilesError> {
            crate::files::dup_at_least(fd.as_fd(), min_fd).map_err(err("move it out of the way"))
        };
        let master = high(open_index(index).map_err(err("open /dev/ptmx"))?)?;
        // The master reaches the slave's termios and window size. The
        // slave is opened only if a task holds it (else the master would
        // see it hung up once we close it).
        if let Some(t) = &p.termios {
            let t = termios_of(index, t)?;
            tty_sys::set_termios(master.as_fd(), &t).map_err(err("set its termios"))?;
        }
        if let Some(w) = &p.winsize {
            let ws = libc::winsize {
                ws_row: w.rows.min(u16::MAX as u32) as u16,
                ws_col: w.cols.min(u16::MAX as u32) as u16,
                ws_xpixel: w.xpixel.min(u16::MAX as u32) as u16,
                ws_ypixel: w.ypixel.min(u16::MAX as u32) as u16,
            };
            tty_sys::set_winsize(master.as_fd(), &ws).map_err(err("set its window size"))?;
        }
        if p.packet {
            tty_sys::set_packet(master.as_fd(), true).map_err(err("set packet mode"))?;
        }
        let mut slave_fd = -1;
        if has_slave {
            tty_sys::set_locked(master.as_fd(), false).map_err(err("unlock the new pty"))?;
            let slave = tty_sys::open_peer(
                master.as_fd(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
            .map_err(err("open the new pty's slave"))?;
            let slave = high(slave)?;
            slave_fd = std::os::fd::AsRawFd::as_raw_fd(&slave);
            keep.push(slave);
            if p.locked {
                // The tasks reopen the slave, which a locked pty refuses.
                tracing::warn!(index, "pty was locked (TIOCSPTLCK); restored unlocked");
            }
        } else if !p.locked {
            tty_sys::set_locked(master.as_fd(), false).map_err(err("unlock the new pty"))?;
        }
        let new = tty_sys::index(master.as_fd()).unwrap_or(u32::MAX);
        tracing::debug!(index, new, has_slave, "pty created");
        table.push(PtyFds {
            index,
            master: std::os::fd::AsRawFd::as_raw_fd(&master),
            slave: slave_fd,
        });
        keep.push(master);
    }
    Ok((keep, table))
}

/// Open flags a reopened slave keeps.
const KEPT_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_LARGEFILE;

/// Recreates fd `fd` of the image from the new ptys `ptys`.
pub fn restore(fd: i32, t: &TtyFd, ptys: &[PtyFds]) -> Result<OwnedFd, FilesError> {
    let index = t.pty.as_ref().map_or(0, |p| p.index);
    let pty = ptys
        .iter()
        .find(|p| p.index == index)
        .ok_or_else(|| invalid(index, "find the pty of this descriptor"))?;
    let err = |what: &'static str| {
        move |source| FilesError::Create {
            fd,
            kind: what,
            source,
        }
    };
    // SAFETY: the table's descriptors stay open in this task until the
    // blob closes them, after every descriptor is restored.
    let borrowed = |raw: RawFd| unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
    if t.master {
        let m = tty_sys::dup(borrowed(pty.master)).map_err(err("pty master"))?;
        let status = t.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND);
        tty_sys::set_status_flags(m.as_fd(), status).map_err(err("pty master"))?;
        return Ok(m);
    }
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", pty.slave)).expect("no NUL");
    let flags = (t.flags as i32 & KEPT_FLAGS) | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path; the result is a new descriptor.
    let n = unsafe { libc::open(path.as_ptr(), flags) };
    if n < 0 {
        return Err(err("pty slave")(std::io::Error::last_os_error()));
    }
    // SAFETY: `n` was just opened and nothing else owns it.
    let s = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) };
    if t.ctty {
        tty_sys::set_ctty(s.as_fd()).map_err(err("controlling terminal (TIOCSCTTY)"))?;
        if t.fg_pgrp > 0 {
            tty_sys::set_fg_pgrp(s.as_fd(), t.fg_pgrp)
                .map_err(err("foreground process group (TIOCSPGRP)"))?;
        }
    }
    Ok(s)
}

/// Makes the new pty the controlling terminal of the calling session
/// leader, if the image's descriptors `fds` say it had one: called right
/// after `setsid`, before the leader creates its children, so that they
/// inherit it as they did originally. (Restoring the slave descriptor
/// marked `ctty` asks again, which then changes nothing, and sets the
/// foreground group once every group exists.)
pub fn take_ctty(
    fds: &[(i32, bool, crm_proto::image::fd_entry::Kind)],
    objects: &super::Objects,
) -> Result<(), FilesError> {
    for (fd, _, k) in fds {
        let crm_proto::image::fd_entry::Kind::Tty(t) = k else {
            continue;
        };
        if !t.ctty {
            continue;
        }
        let index = t.pty.as_ref().map_or(0, |p| p.index);
        let pty = objects
            .ptys
            .iter()
            .find(|p| p.index == index)
            .ok_or_else(|| invalid(index, "find the pty of the controlling terminal"))?;
        // SAFETY: the table's descriptors stay open in this task until the
        // blob closes them.
        let slave = unsafe { std::os::fd::BorrowedFd::borrow_raw(pty.slave) };
        return tty_sys::set_ctty(slave).map_err(|source| FilesError::Create {
            fd: *fd,
            kind: "controlling terminal (TIOCSCTTY)",
            source,
        });
    }
    Ok(())
}

/// A short description for `show`.
pub fn describe(t: &TtyFd) -> String {
    let p = t.pty.clone().unwrap_or_default();
    let w = p.winsize.unwrap_or_default();
    format!(
        "pty {} {} ({}x{}{}) flags {:#o}{}{}",
        if t.master { "master" } else { "slave" },
        p.index,
        w.cols,
        w.rows,
        if p.packet { ", packet mode" } else { "" },
        t.flags,
        if t.ctty {
            format!(" controlling terminal, foreground group {}", t.fg_pgrp)
        } else {
            String::new()
        },
        t.dup_of
            .map_or(String::new(), |d| format!(" dup of fd {d}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_links() {
        assert_eq!(slave_index("/dev/pts/12"), Some(12));
        assert_eq!(slave_index("/dev/tty1"), None);
    }

    #[test]
    fn new_pty_gets_the_saved_state() {
        let t = TtyFd {
            pty: Some(TtyPty {
                index: 77,
                termios: None,
                winsize: Some(TtyWinsize {
                    rows: 33,
                    cols: 101,
                    xpixel: 0,
                    ypixel: 0,
                }),
                packet: true,
                locked: false,
            }),
            master: true,
            ..Default::default()
        };
        let slave = TtyFd {
            master: false,
            ..t.clone()
        };
        let (keep, table) = create([&t, &slave], 100).unwrap();
        assert_eq!(keep.len(), 2);
        assert_eq!(table[0].index, 77);
        assert!(table[0].master >= 100 && table[0].slave >= 100);
        let s = restore(6, &slave, &table).unwrap();
        assert_eq!(tty_sys::winsize(s.as_fd()).unwrap().ws_col, 101);
        let m = restore(5, &t, &table).unwrap();
        let w = tty_sys::winsize(m.as_fd()).unwrap();
        assert_eq!((w.ws_row, w.ws_col), (33, 101));
        assert!(tty_sys::packet(m.as_fd()).unwrap());
        // A locked pty nobody holds the slave of stays locked.
        let locked = TtyFd {
            pty: Some(TtyPty {
                index: 78,
                locked: true,
                ..Default::default()
            }),
            master: true,
            ..Default::default()
        };
        let (keep, table) = create([&locked], 100).unwrap();
        assert_eq!((keep.len(), table[0].slave), (1, -1));
        let m = restore(5, &locked, &table).unwrap();
        assert!(tty_sys::locked(m.as_fd()).unwrap());
    }
}
