//! The receive queue of a unix socket: read without consuming it (peeks
//! at an explicit `SO_PEEK_OFF`, so each datagram or seqpacket message
//! comes out whole and its boundaries are kept; the socket's own peek
//! offset is put back afterwards), and written back at restore from the
//! peer (or, for a bound datagram socket, from a temporary socket).
use crate::files::sock_sys;
use std::io;
use std::os::fd::BorrowedFd;

/// Most bytes of queued data saved per socket.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// Most queued messages saved per socket.
pub const MAX_QUEUE_MESSAGES: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("file descriptors are in flight in its queue (SCM_RIGHTS)")]
    FdsInFlight,
    #[error("a zero-length message is queued")]
    ZeroLength,
    #[error("more than {MAX_QUEUE_BYTES} bytes or {MAX_QUEUE_MESSAGES} messages are queued")]
    TooLarge,
    #[error("cannot read its queue: {0}")]
    Io(#[from] io::Error),
}

/// The data queued on `sock` (a socket of type `ty`): one entry per
/// message, or a single entry for a stream socket (none when empty).
pub fn peek_all(sock: BorrowedFd<'_>, ty: i32) -> Result<Vec<Vec<u8>>, QueueError> {
    let orig = sock_sys::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    let res = peek_from(sock, ty);
    // Put the socket's own peek offset back, whatever happened.
    let back = sock_sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, orig);
    let msgs = res?;
    back?;
    Ok(msgs)
}

fn peek_from(sock: BorrowedFd<'_>, ty: i32) -> Result<Vec<Vec<u8>>, QueueError> {
    let stream = ty == libc::SOCK_STREAM;
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    let mut stream_data = Vec::new();
    let mut off = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let at = i32::try_from(off).map_err(|_| QueueError::TooLarge)?;
        sock_sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, at)?;
        let Some(p) = sock_sys::peek(sock, &mut buf, !stream)? else {
            break;
        };
        if p.had_fds {
            return Err(QueueError::FdsInFlight);
        }
        if stream {
            if p.copied == 0 {
                break; // the peer shut its side down: end of the data
            }
            stream_data.extend_from_slice(&buf[..p.copied]);
            off += p.copied;
        } else {
            if p.len > buf.len() {
                if p.len > MAX_QUEUE_BYTES {
                    return Err(QueueError::TooLarge);
                }
                buf.resize(p.len, 0);
                continue; // the same message again, whole
            }
            if p.len == 0 {
                return Err(QueueError::ZeroLength);
            }
            msgs.push(buf[..p.len].to_vec());
            off += p.len;
            if msgs.len() > MAX_QUEUE_MESSAGES {
                return Err(QueueError::TooLarge);
            }
        }
        if off > MAX_QUEUE_BYTES {
            return Err(QueueError::TooLarge);
        }
    }
    if stream && !stream_data.is_empty() {
        msgs.push(stream_data);
    }
    Ok(msgs)
}

/// Sends `msgs` from `sender` (to `to`, if given) without blocking: each
/// message in one piece for datagram and seqpacket sockets, all the bytes
/// for a stream socket.
pub fn refill(
    sender: BorrowedFd<'_>,
    ty: i32,
    msgs: &[Vec<u8>],
    to: Option<&sock_sys::SockAddr>,
) -> io::Result<()> {
    for m in msgs {
        let mut sent = 0;
        while sent < m.len() {
            let n = sock_sys::send(sender, &m[sent..], to)?;
            if ty != libc::SOCK_STREAM && n != m.len() {
                return Err(io::Error::other(format!(
                    "a {}-byte message went out as {n} bytes",
                    m.len()
                )));
            }
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            sent += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Save → refill round trip for each socket type: the queue comes out
    /// message by message, is still there afterwards, and a refilled pair
    /// holds the same messages.
    #[test]
    fn peek_keeps_boundaries_and_consumes_nothing() {
        let big: Vec<u8> = (0..70000u32).map(|i| i as u8).collect();
        let msgs: Vec<Vec<u8>> = vec![b"one".to_vec(), big, b"three".to_vec()];
        for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
            let (a, b) = sock_sys::socketpair(ty).unwrap();
            refill(b.as_fd(), ty, &msgs, None).unwrap();
            sock_sys::setsockopt_int(a.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, 2).unwrap();
            let got = peek_all(a.as_fd(), ty).unwrap();
            let want: Vec<Vec<u8>> = if ty == libc::SOCK_STREAM {
                vec![msgs.concat()]
            } else {
                msgs.clone()
            };
            assert_eq!(got, want, "type {ty}");
            let off = sock_sys::getsockopt_int(a.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF);
            assert_eq!(off.unwrap(), 2, "the socket's peek offset is put back");
            sock_sys::setsockopt_int(a.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1).unwrap();
            assert_eq!(peek_all(a.as_fd(), ty).unwrap(), want, "nothing consumed");
            let (c, d) = sock_sys::socketpair(ty).unwrap();
            refill(d.as_fd(), ty, &got, None).unwrap();
            assert_eq!(peek_all(c.as_fd(), ty).unwrap(), want, "refilled");
            let mut first = vec![0u8; 8];
            let n = sock_sys::recv(c.as_fd(), &mut first).unwrap();
            if ty != libc::SOCK_STREAM {
                assert_eq!(&first[..n], b"one");
            }
        }
        let (a, _b) = sock_sys::socketpair(libc::SOCK_DGRAM).unwrap();
        assert!(peek_all(a.as_fd(), libc::SOCK_DGRAM).unwrap().is_empty());
    }
}
