//! Socket helpers for the socket workloads (`wl_unix`, `wl_inet`,
//! `wl_unsupported_fd`): raw descriptors at chosen numbers, non-blocking
//! sends and receives that report errno, and socket addresses as bytes.

use crate::wl;

/// Moves `fd` to number `to` (dup2 + close).
pub fn place(fd: i32, to: i32) {
    if fd == to {
        return;
    }
    // SAFETY: dup2 onto a number the workload reserves for this object, then
    // closing the original, which nothing else refers to.
    if unsafe { libc::dup2(fd, to) } != to || unsafe { libc::close(fd) } != 0 {
        wl::fail_setup(&format!("dup2 to fd {to}"));
    }
}

/// `socketpair(AF_UNIX, ty)` placed at `a` and `b`.
pub fn pair(ty: i32, a: i32, b: i32) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) } != 0 {
        wl::fail_setup("socketpair");
    }
    place(fds[0], a);
    place(fds[1], b);
}

/// A new socket (exits on failure).
pub fn socket(domain: i32, ty: i32) -> i32 {
    // SAFETY: socket takes integers.
    let fd = unsafe { libc::socket(domain, ty, 0) };
    if fd < 0 {
        wl::fail_setup("socket");
    }
    fd
}

/// A unix address (`sun_path` bytes; abstract names start with NUL).
pub fn unix_addr(name: &[u8]) -> Vec<u8> {
    let mut b = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    b.extend_from_slice(name);
    b
}

/// A 127.0.0.1 or ::1 address with `port`.
pub fn loopback(v6: bool, port: u16) -> Vec<u8> {
    let mut b = Vec::new();
    if v6 {
        b.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        let mut a = [0u8; 16];
        a[15] = 1;
        b.extend_from_slice(&a);
        b.extend_from_slice(&[0; 4]);
    } else {
        b.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[127, 0, 0, 1]);
        b.extend_from_slice(&[0; 8]);
    }
    b
}

/// The port of an inet address.
pub fn port_of(addr: &[u8]) -> u16 {
    addr.get(2..4)
        .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
}

pub fn bind(fd: i32, addr: &[u8]) -> Result<(), i32> {
    // SAFETY: bind reads `addr.len()` bytes of a live buffer.
    check(unsafe {
        libc::bind(
            fd,
            addr.as_ptr() as *const libc::sockaddr,
            addr.len() as u32,
        )
    })
}

pub fn connect(fd: i32, addr: &[u8]) -> Result<(), i32> {
    // SAFETY: connect reads `addr.len()` bytes of a live buffer.
    check(unsafe {
        libc::connect(
            fd,
            addr.as_ptr() as *const libc::sockaddr,
            addr.len() as u32,
        )
    })
}

pub fn listen(fd: i32, backlog: i32) -> Result<(), i32> {
    // SAFETY: listen takes integers.
    check(unsafe { libc::listen(fd, backlog) })
}

/// Waits up to `wait_ms` for a connection on listener `fd` and accepts
/// it (the new socket non-blocking): `Err(EAGAIN)` when none came.
pub fn accept(fd: i32, wait_ms: i32) -> Result<i32, i32> {
    if !wait_readable(fd, wait_ms) {
        return Err(libc::EAGAIN);
    }
    // SAFETY: accept4 without an address buffer.
    let r = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(r: i32) -> Result<(), i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// One `send(MSG_DONTWAIT | MSG_NOSIGNAL)` of all of `data`.
pub fn send(fd: i32, data: &[u8]) -> Result<(), String> {
    // SAFETY: send reads `data`.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n == data.len() as isize {
        Ok(())
    } else {
        Err(format!(
            "send of {} bytes on fd {fd}: {n} ({})",
            data.len(),
            std::io::Error::last_os_error()
        ))
    }
}

/// `sendto` an address.
pub fn send_to(fd: i32, data: &[u8], to: &[u8]) -> Result<(), String> {
    // SAFETY: sendto reads `data` and `to`.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT,
            to.as_ptr() as *const libc::sockaddr,
            to.len() as u32,
        )
    };
    if n == data.len() as isize {
        Ok(())
    } else {
        Err(format!(
            "sendto on fd {fd}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// One `recv(MSG_DONTWAIT)` of at most `cap` bytes: `Err(errno)` if none.
pub fn recv(fd: i32, cap: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; cap];
    // SAFETY: recv writes at most `cap` bytes into the local buffer.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            cap,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Waits up to `ms` for `fd` to be readable.
pub fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one local pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

fn name_call(
    fd: i32,
    f: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32,
) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockname/getpeername write at most `len` bytes into `buf`.
    if unsafe { f(fd, buf.as_mut_ptr() as *mut libc::sockaddr, &mut len) } < 0 {
        return Vec::new();
    }
    buf[..(len as usize).min(buf.len())].to_vec()
}

/// getsockname as bytes (empty on error).
pub fn local_name(fd: i32) -> Vec<u8> {
    name_call(fd, libc::getsockname)
}

/// getpeername as bytes (empty on error).
pub fn peer_name(fd: i32) -> Vec<u8> {
    name_call(fd, libc::getpeername)
}

/// An integer socket option (-1 on error).
pub fn opt(fd: i32, level: i32, name: i32) -> i32 {
    let mut v = 0i32;
    let mut len = 4u32;
    // SAFETY: getsockopt writes at most 4 bytes into the local.
    if unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut v as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    } < 0
    {
        return -1;
    }
    v
}

/// Sets an integer socket option (exits on failure).
pub fn set_opt(fd: i32, level: i32, name: i32, v: i32) {
    // SAFETY: setsockopt reads 4 bytes from the local.
    if unsafe { libc::setsockopt(fd, level, name, &v as *const i32 as *const libc::c_void, 4) } < 0
    {
        wl::fail_setup("setsockopt");
    }
}

/// The file status flags of `fd`.
pub fn fl(fd: i32) -> i32 {
    // SAFETY: fcntl query on a descriptor number.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblock(fd: i32) {
    // SAFETY: fcntl on a descriptor number.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor number the workload owns.
    unsafe { libc::close(fd) };
}
