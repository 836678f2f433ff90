//! Raw calls for pseudo-terminals: `pidfd_open`/`pidfd_getfd` (to inspect a
//! target's terminal from our side without opening it again), the pty
//! ioctls (index, packet mode, lock, peer, window size, controlling tty,
//! foreground group) and termios. Safe wrappers returning `io::Error`.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Takes ownership of a descriptor a syscall just returned.
fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(r)?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// A copy of descriptor `fd` of the process behind `pidfd` (same open file
/// description).
pub fn getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: a live pidfd, a descriptor number of the target, no flags;
    // returns a new descriptor in our table.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// `open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)`: a new pty master.
pub fn open_ptmx() -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the result is a new descriptor.
    owned(unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    } as libc::c_long)
}

/// `TIOCGPTPEER`: opens the slave of `master` with `flags`.
pub fn open_peer(master: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    owned(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) } as libc::c_long)
}

/// An ioctl that writes one int.
fn get_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into the live local `v`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) } as libc::c_long)?;
    Ok(v)
}

/// An ioctl that reads one int through a pointer.
fn set_int(fd: BorrowedFd<'_>, req: libc::Ioctl, v: i32) -> io::Result<()> {
    // SAFETY: the request reads one int from the live local `v`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &v as *const libc::c_int) } as libc::c_long)
        .map(drop)
}

/// `TIOCGPTN`: the index of a master's pty.
pub fn index(master: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(master, libc::TIOCGPTN).map(|v| v as u32)
}

/// `TIOCGPKT` of a master.
pub fn packet(master: BorrowedFd<'_>) -> io::Result<bool> {
    get_int(master, libc::TIOCGPKT).map(|v| v != 0)
}

/// `TIOCPKT` of a master.
pub fn set_packet(master: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int(master, libc::TIOCPKT, on as i32)
}

/// `TIOCGPTLCK` of a master.
pub fn locked(master: BorrowedFd<'_>) -> io::Result<bool> {
    get_int(master, libc::TIOCGPTLCK).map(|v| v != 0)
}

/// `TIOCSPTLCK` of a master.
pub fn set_locked(master: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int(master, libc::TIOCSPTLCK, on as i32)
}

/// `TIOCSPGRP`: the foreground process group.
pub fn set_fg_pgrp(fd: BorrowedFd<'_>, pgrp: i32) -> io::Result<()> {
    set_int(fd, libc::TIOCSPGRP, pgrp)
}

/// `TIOCSCTTY(0)`: the terminal becomes the caller's (a session leader
/// without one) controlling terminal.
pub fn set_ctty(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } as libc::c_long).map(drop)
}

pub fn winsize(fd: BorrowedFd<'_>) -> io::Result<libc::winsize> {
    // SAFETY: an all-zero winsize is a valid value.
    let mut w: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the live local `w`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w) } as libc::c_long)?;
    Ok(w)
}

pub fn set_winsize(fd: BorrowedFd<'_>, w: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads a winsize from `w`, a live reference.
    check(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, w as *const libc::winsize) }
            as libc::c_long,
    )
    .map(drop)
}

pub fn termios(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    // SAFETY: an all-zero termios is a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into the live local `t`.
    check(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } as libc::c_long)?;
    Ok(t)
}

pub fn set_termios(fd: BorrowedFd<'_>, t: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr reads the termios behind a live reference.
    check(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, t) } as libc::c_long).map(drop)
}

/// `fcntl(F_DUPFD_CLOEXEC, 0)`: a new descriptor of the same open file
/// description.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a live descriptor; returns a new one.
    owned(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) } as libc::c_long)
}

/// `F_SETFL` (status flags: O_NONBLOCK, O_APPEND).
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> io::Result<()> {
    // SAFETY: fcntl with an integer argument on a live descriptor.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) } as libc::c_long).map(drop)
}
