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
