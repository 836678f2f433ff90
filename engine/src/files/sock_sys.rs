//! Thin wrappers over the socket syscalls the socket modules need
//! (socket, socketpair, bind, listen, connect, send, peek with control
//! data, get/setsockopt, getsockname/getpeername). Every `unsafe` of the
//! socket layer lives here; each function returns an `io::Error` from errno.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(r: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(r)?;
    // SAFETY: the syscall just returned this fresh descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `socket(domain, type | SOCK_CLOEXEC, protocol)`.
pub fn socket(domain: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor.
    owned(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })
}

/// `socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0)`.
pub fn socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the local array.
    check(unsafe {
        libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    })?;
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A socket address as raw bytes of a `sockaddr_*` (at most
/// `sockaddr_storage`).
#[derive(Clone)]
pub struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    fn empty() -> SockAddr {
        SockAddr {
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    /// The address bytes (`len` bytes of the storage).
    pub fn bytes(&self) -> &[u8] {
        let len = (self.len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `storage` is a live local of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(&self.storage as *const _ as *const u8, len) }
    }

    /// An address from raw bytes; `None` if longer than `sockaddr_storage`.
    pub fn from_bytes(b: &[u8]) -> Option<SockAddr> {
        let mut a = SockAddr::empty();
        if b.len() > std::mem::size_of::<libc::sockaddr_storage>() {
            return None;
        }
        // SAFETY: copying at most size_of(storage) bytes into the storage.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), &mut a.storage as *mut _ as *mut u8, b.len())
        };
        a.len = b.len() as libc::socklen_t;
        Some(a)
    }

    /// A unix address for `name` (sun_path bytes; abstract names start with
    /// a NUL byte); `None` if too long.
    pub fn unix(name: &[u8]) -> Option<SockAddr> {
        if name.len() > 107 {
            return None;
        }
        let mut b = Vec::with_capacity(2 + name.len());
        b.extend_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        b.extend_from_slice(name);
        SockAddr::from_bytes(&b)
    }
}

fn name_call(
    fd: BorrowedFd<'_>,
    f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<SockAddr> {
    let mut a = SockAddr::empty();
    // SAFETY: `f` is getsockname or getpeername; it writes at most `len`
    // bytes into the local storage and updates `len`.
    check(unsafe {
        f(
            fd.as_raw_fd(),
            &mut a.storage as *mut _ as *mut libc::sockaddr,
            &mut a.len,
        )
    })?;
    Ok(a)
}

pub fn getsockname(fd: BorrowedFd<'_>) -> io::Result<SockAddr> {
    name_call(fd, libc::getsockname)
}

pub fn getpeername(fd: BorrowedFd<'_>) -> io::Result<SockAddr> {
    name_call(fd, libc::getpeername)
}

pub fn bind(fd: BorrowedFd<'_>, a: &SockAddr) -> io::Result<()> {
    // SAFETY: bind reads `len` bytes of the live storage.
    check(unsafe { libc::bind(fd.as_raw_fd(), &a.storage as *const _ as *const _, a.len) })
        .map(drop)
}

pub fn connect(fd: BorrowedFd<'_>, a: &SockAddr) -> io::Result<()> {
    // SAFETY: connect reads `len` bytes of the live storage.
    check(unsafe { libc::connect(fd.as_raw_fd(), &a.storage as *const _ as *const _, a.len) })
        .map(drop)
}

pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen on a descriptor we hold.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(drop)
}

/// `accept4(fd, NULL, NULL, SOCK_CLOEXEC)`.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4 without an address buffer returns a new descriptor.
    owned(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })
}

pub fn shutdown(fd: BorrowedFd<'_>, how: i32) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor we hold.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), how) }).map(drop)
}

/// `sendto(fd, data, MSG_DONTWAIT | MSG_NOSIGNAL, to)`: bytes sent.
pub fn send(fd: BorrowedFd<'_>, data: &[u8], to: Option<&SockAddr>) -> io::Result<usize> {
    let (ptr, len) = match to {
        Some(a) => (&a.storage as *const _ as *const libc::sockaddr, a.len),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: sendto reads `data` and, if given, `len` bytes of the address.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            ptr,
            len,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A blocking `recv(fd, buf, 0)`: bytes received.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What one peek returned.
pub struct Peeked {
    /// Bytes copied into the buffer.
    pub copied: usize,
    /// The message's full length (datagrams: `MSG_TRUNC`).
    pub len: usize,
    /// File descriptors came with it (SCM_RIGHTS), or control data was cut.
    pub had_fds: bool,
}

/// `recvmsg(fd, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` into `buf`
/// (with `MSG_TRUNC` if `trunc`: a datagram's full length), with room for
/// control data. File descriptors that a peek installs
/// in this process (SCM_RIGHTS) are closed again and reported.
/// `Ok(None)`: nothing queued (EAGAIN).
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8], trunc: bool) -> io::Result<Option<Peeked>> {
    let mut ctrl = [0u64; 512];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid start.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&ctrl);
    let mut flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    if trunc {
        flags |= libc::MSG_TRUNC;
    }
    // SAFETY: recvmsg writes into `buf` and `ctrl` through the iovec and the
    // msghdr, both of which point at live locals of the stated sizes.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut had_fds = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // CMSG macros bounded by msg_controllen; SCM_RIGHTS payloads are arrays
    // of descriptors that the peek installed in this process and that
    // nothing else owns, so closing them is ours to do.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                had_fds = true;
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let len = n as usize;
    Ok(Some(Peeked {
        copied: len.min(buf.len()),
        len,
        had_fds,
    }))
}

pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the local int.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(v)
}

pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one int from the local.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt` into a byte buffer (e.g. `TCP_INFO`); returns the length.
pub fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    opt: i32,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(len as usize)
}

/// `fcntl(fd, cmd, arg)` with an integer argument.
pub fn fcntl(fd: BorrowedFd<'_>, cmd: i32, arg: i32) -> io::Result<i32> {
    // SAFETY: fcntl with an integer argument on a descriptor we hold.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) })
}

/// A duplicate of `fd` at a number at or above `high`, close-on-exec.
pub fn dup_above(fd: BorrowedFd<'_>, high: i32) -> io::Result<OwnedFd> {
    owned(fcntl(fd, libc::F_DUPFD_CLOEXEC, high)?)
}
