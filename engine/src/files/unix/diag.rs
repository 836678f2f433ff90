//! `NETLINK_SOCK_DIAG` for unix sockets: what the kernel knows of one
//! socket, looked up by inode (name, peer, state, pending connections of a
//! listener, queue lengths, shutdown bits). Requests are built and replies
//! parsed as plain bytes, every length checked; the socket calls go
//! through [`super::super::sock_sys`].
use crate::files::sock_sys;
use std::io;
use std::os::fd::AsFd;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR: usize = 16;
const UNIX_DIAG_MSG: usize = 16;

const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;

const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// The state a unix socket is in, as sock_diag numbers it.
pub const STATE_CONNECTED: u32 = 1;
pub const STATE_LISTEN: u32 = 10;

/// One unix socket as sock_diag shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub ino: u64,
    pub ty: u32,
    pub state: u32,
    /// Bound name (sun_path bytes), empty when unbound.
    pub name: Vec<u8>,
    /// Inode and device of the socket file of a path-bound socket.
    pub vfs: Option<(u64, u64)>,
    pub peer: u64,
    /// Listener: inodes of the connections waiting to be accepted.
    pub icons: Vec<u64>,
    /// Listener: connections waiting and the backlog; otherwise bytes
    /// queued to read and to send.
    pub rqlen: (u32, u32),
    pub shutdown: u32,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sock_diag reply: {what}"),
    )
}

/// The request for socket `ino` (an exact lookup, no dump).
fn request(ino: u32) -> Vec<u8> {
    let show =
        UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;
    let total = (NLMSG_HDR + 24) as u32;
    let mut b = Vec::with_capacity(total as usize);
    b.extend_from_slice(&total.to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    b.push(libc::AF_UNIX as u8);
    b.push(0); // protocol
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(&ino.to_ne_bytes());
    b.extend_from_slice(&show.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    b
}

/// Parses one reply; `Ok(None)` when the kernel knows no such socket.
fn parse(reply: &[u8]) -> io::Result<Option<UnixDiag>> {
    let len = u32_at(reply, 0).ok_or_else(|| bad("short header"))? as usize;
    let ty = u16_at(reply, 4).ok_or_else(|| bad("short header"))?;
    if len < NLMSG_HDR || len > reply.len() {
        return Err(bad("bad message length"));
    }
    let msg = &reply[..len];
    if ty == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDR).ok_or_else(|| bad("short error"))? as i32;
        return if errno == -libc::ENOENT {
            Ok(None)
        } else {
            Err(io::Error::from_raw_os_error(-errno))
        };
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return Err(bad("unexpected message type"));
    }
    let body = msg.get(NLMSG_HDR..).ok_or_else(|| bad("no body"))?;
    if body.len() < UNIX_DIAG_MSG {
        return Err(bad("short unix_diag_msg"));
    }
    let mut d = UnixDiag {
        ty: u32::from(body[1]),
        state: u32::from(body[2]),
        ino: u64::from(u32_at(body, 4).ok_or_else(|| bad("no inode"))?),
        ..UnixDiag::default()
    };
    let mut at = UNIX_DIAG_MSG;
    while at + 4 <= body.len() {
        let alen = u16_at(body, at).ok_or_else(|| bad("attribute"))? as usize;
        let aty = u16_at(body, at + 2).ok_or_else(|| bad("attribute"))?;
        if alen < 4 || at + alen > body.len() {
            return Err(bad("attribute length"));
        }
        let p = &body[at + 4..at + alen];
        match aty {
            UNIX_DIAG_NAME => d.name = p.to_vec(),
            UNIX_DIAG_VFS => {
                let ino = u32_at(p, 0).ok_or_else(|| bad("vfs"))?;
                let dev = u32_at(p, 4).ok_or_else(|| bad("vfs"))?;
                d.vfs = Some((u64::from(ino), u64::from(dev)));
            }
            UNIX_DIAG_PEER => d.peer = u64::from(u32_at(p, 0).ok_or_else(|| bad("peer"))?),
            UNIX_DIAG_ICONS => {
                d.icons = p
                    .chunks_exact(4)
                    .map(|c| u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            }
            UNIX_DIAG_RQLEN => {
                d.rqlen = (
                    u32_at(p, 0).ok_or_else(|| bad("rqlen"))?,
                    u32_at(p, 4).ok_or_else(|| bad("rqlen"))?,
                )
            }
            UNIX_DIAG_SHUTDOWN => {
                d.shutdown = u32::from(*p.first().ok_or_else(|| bad("shutdown"))?)
            }
            _ => {}
        }
        at += alen.div_ceil(4) * 4;
    }
    Ok(Some(d))
}

/// What the kernel knows of unix socket `ino` in our network namespace;
/// `Ok(None)` if there is no such socket (any more).
pub fn lookup(ino: u64) -> io::Result<Option<UnixDiag>> {
    let ino32 = u32::try_from(ino).map_err(|_| bad("inode beyond 32 bits"))?;
    let nl = sock_sys::socket(libc::AF_NETLINK, libc::SOCK_DGRAM, NETLINK_SOCK_DIAG)?;
    sock_sys::send(nl.as_fd(), &request(ino32), None)?;
    // The kernel answers an exact lookup with one message: the socket's
    // description or an error.
    let mut buf = vec![0u8; 256 << 10];
    let n = sock_sys::recv(nl.as_fd(), &mut buf)?;
    parse(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_reply_and_refuses_garbage() {
        let mut r = Vec::new();
        let mut body = vec![libc::AF_UNIX as u8, 1, 10, 0];
        body.extend_from_slice(&77u32.to_ne_bytes());
        body.extend_from_slice(&[0xff; 8]);
        // name "\0ab" (3 bytes, padded to 4)
        body.extend_from_slice(&7u16.to_ne_bytes());
        body.extend_from_slice(&UNIX_DIAG_NAME.to_ne_bytes());
        body.extend_from_slice(b"\0ab\0");
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&UNIX_DIAG_ICONS.to_ne_bytes());
        body.extend_from_slice(&5u32.to_ne_bytes());
        body.extend_from_slice(&6u32.to_ne_bytes());
        let total = (NLMSG_HDR + body.len()) as u32;
        r.extend_from_slice(&total.to_ne_bytes());
        r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        r.extend_from_slice(&[0; 10]);
        r.extend_from_slice(&body);
        let d = parse(&r).unwrap().unwrap();
        assert_eq!(d.ino, 77);
        assert_eq!(d.state, STATE_LISTEN);
        assert_eq!(d.name, b"\0ab");
        assert_eq!(d.icons, vec![5, 6]);
        for cut in 0..r.len() {
            let mut short = r[..cut].to_vec();
            if short.len() >= 4 {
                short[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            let _ = parse(&short); // never panics
        }
        let mut huge = r.clone();
        huge[NLMSG_HDR + UNIX_DIAG_MSG..NLMSG_HDR + UNIX_DIAG_MSG + 2]
            .copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse(&huge).is_err());
    }
}
