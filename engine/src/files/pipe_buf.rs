//! What anonymous pipes and FIFOs share: the pipe buffer. [`peek`] copies
//! the bytes buffered in a pipe with `tee(2)` (nothing is consumed),
//! [`refill`] writes saved bytes back without blocking, and [`fcntl`] /
//! [`pipe2`] are the thin syscall wrappers both kinds use.
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe2() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fcntl(fd, cmd, arg)` for commands with an integer argument.
pub fn fcntl(fd: &impl AsFd, cmd: i32, arg: i32) -> io::Result<i32> {
    // SAFETY: fcntl with an integer argument on a descriptor we hold.
    let r = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The bytes buffered in the pipe read through `read_end` (a descriptor of
/// ours open for reading), at most `size`, without consuming them.
pub fn peek(read_end: &impl AsFd, size: usize) -> io::Result<Vec<u8>> {
    let (r, w) = pipe2()?;
    fcntl(&w, libc::F_SETPIPE_SZ, size as i32)?;
    // SAFETY: tee between two pipe descriptors we hold; it copies at most
    // `size` bytes without consuming them from the source.
    let n = unsafe {
        libc::tee(
            read_end.as_fd().as_raw_fd(),
            w.as_raw_fd(),
            size,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) {
            Ok(Vec::new()) // empty
        } else {
            Err(e)
        };
    }
    let mut data = vec![0u8; n as usize];
    let mut got = 0;
    while got < data.len() {
        // SAFETY: reading into the rest of a local buffer.
        let k = unsafe {
            libc::read(
                r.as_raw_fd(),
                data[got..].as_mut_ptr() as *mut libc::c_void,
                data.len() - got,
            )
        };
        if k <= 0 {
            return Err(io::Error::last_os_error());
        }
        got += k as usize;
    }
    Ok(data)
}

/// Sets the pipe's size to `size` (when it is not 0) and writes `data`
/// into it through `write_end`, non-blocking: bytes that do not fit are an
/// error, not a hang. The descriptor's status flags are left as they were.
pub fn refill(write_end: &impl AsFd, size: u32, data: &[u8]) -> io::Result<()> {
    if size != 0 && (size as usize) < data.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes saved for a pipe of {size} bytes", data.len()),
        ));
    }
    if size != 0 {
        fcntl(write_end, libc::F_SETPIPE_SZ, size as i32).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "setting the pipe size to {size} bytes was refused: above \
                         fs.pipe-max-size or the user's pipe buffer limits, without \
                         CAP_SYS_RESOURCE ({e})"
                    ),
                )
            } else {
                e
            }
        })?;
    }
    if data.is_empty() {
        return Ok(());
    }
    let fl = fcntl(write_end, libc::F_GETFL, 0)?;
    fcntl(write_end, libc::F_SETFL, fl | libc::O_NONBLOCK)?;
    // SAFETY: writing the saved bytes from the caller's buffer.
    let n = unsafe {
        libc::write(
            write_end.as_fd().as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
        )
    };
    let res = if n < 0 {
        Err(io::Error::last_os_error())
    } else if n as usize != data.len() {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("only {n} of {} saved bytes fit in the pipe", data.len()),
        ))
    } else {
        Ok(())
    };
    fcntl(write_end, libc::F_SETFL, fl)?;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_does_not_consume_and_refill_writes_back() {
        let (r, w) = pipe2().unwrap();
        refill(&w, 128 << 10, &[7u8; 70_000]).unwrap();
        assert_eq!(fcntl(&r, libc::F_GETPIPE_SZ, 0).unwrap(), 128 << 10);
        let a = peek(&r, 128 << 10).unwrap();
        let b = peek(&r, 128 << 10).unwrap();
        assert_eq!(a.len(), 70_000);
        assert_eq!(a, b);
        let (r2, _w2) = pipe2().unwrap();
        assert!(peek(&r2, 4096).unwrap().is_empty());
    }
}
