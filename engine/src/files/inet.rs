//! Inet sockets (IPv4, IPv6) that need no TCP repair: TCP sockets that are
//! listening (address, port, backlog) or not connected, and UDP sockets,
//! bound and/or connected. Saved from a `pidfd_getfd` duplicate
//! (getsockname/getpeername, `TCP_INFO`, socket options); restored by
//! creating, binding, listening or connecting again. On the same host, a
//! listener without `SO_REUSEADDR` cannot come back while connections it
//! closed first are in TIME_WAIT (as for the program itself restarting). Refused, naming the fd: established TCP connections
//! (they need TCP repair), a listener with connections not accepted yet,
//! other protocols. Datagrams queued on a UDP socket at dump time are not
//! saved (as if the network had dropped them).
use super::{sock_sys, FilesError};
use crm_proto::image::InetSocket;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

const TCP_STATES: [&str; 12] = [
    "?",
    "established",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "closed",
    "CLOSE_WAIT",
    "LAST_ACK",
    "listening",
    "CLOSING",
];

/// A sockaddr_in / sockaddr_in6 as (address bytes, port, scope id).
fn parse_addr(b: &[u8]) -> Option<(Vec<u8>, u16, u32)> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?) as i32;
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => Some((b.get(4..8)?.to_vec(), port, 0)),
        libc::AF_INET6 => Some((
            b.get(8..24)?.to_vec(),
            port,
            u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?),
        )),
        _ => None,
    }
}

/// The sockaddr for `(addr, port, scope)` of `family`; `None` if the
/// address has the wrong length.
fn make_addr(family: u32, addr: &[u8], port: u32, scope: u32) -> Option<sock_sys::SockAddr> {
    let port = u16::try_from(port).ok()?;
    let mut b = Vec::new();
    b.extend_from_slice(&(family as u16).to_ne_bytes());
    b.extend_from_slice(&port.to_be_bytes());
    match (family as i32, addr.len()) {
        (libc::AF_INET, 4) => {
            b.extend_from_slice(addr);
            b.extend_from_slice(&[0; 8]);
        }
        (libc::AF_INET6, 16) => {
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(addr);
            b.extend_from_slice(&scope.to_ne_bytes());
        }
        _ => return None,
    }
    sock_sys::SockAddr::from_bytes(&b)
}

/// `addr:port` for messages.
pub fn show(addr: &[u8], port: u32) -> String {
    let ip = match addr.len() {
        4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(addr);
            IpAddr::V6(Ipv6Addr::from(a))
        }
        _ => return "?".into(),
    };
    SocketAddr::new(ip, port as u16).to_string()
}

fn io_err(pid: i32, fd: i32) -> impl Fn(io::Error) -> FilesError {
    move |source| FilesError::Inspect { pid, fd, source }
}

/// Saves inet socket fd `fd` of `pid` (`sock` is our duplicate of it).
pub fn dump(
    pid: i32,
    fd: i32,
    ino: u64,
    sock: BorrowedFd<'_>,
    flags: u32,
) -> Result<InetSocket, FilesError> {
    let err = io_err(pid, fd);
    let opt = |level, o| sock_sys::getsockopt_int(sock, level, o).map_err(io_err(pid, fd));
    let family = opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let ty = opt(libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let refuse = |what: String| FilesError::Refused { pid, fd, what };
    let local = sock_sys::getsockname(sock).map_err(&err)?;
    let (local_addr, local_port, scope_id) =
        parse_addr(local.bytes()).ok_or_else(|| refuse("an inet socket with no address".into()))?;
    let peer = sock_sys::getpeername(sock)
        .ok()
        .and_then(|a| parse_addr(a.bytes()));
    let mut s = InetSocket {
        id: ino,
        family: family as u32,
        r#type: ty as u32,
        protocol: protocol as u32,
        local_addr,
        local_port: u32::from(local_port),
        scope_id,
        flags: flags & libc::O_NONBLOCK as u32,
        reuseaddr: opt(libc::SOL_SOCKET, libc::SO_REUSEADDR)? != 0,
        reuseport: opt(libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0,
        keepalive: opt(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        sndbuf: opt(libc::SOL_SOCKET, libc::SO_SNDBUF)? as u32,
        rcvbuf: opt(libc::SOL_SOCKET, libc::SO_RCVBUF)? as u32,
        ..Default::default()
    };
    if family == libc::AF_INET6 {
        s.v6only = opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    }
    match (ty, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            let mut info = [0u8; 104];
            sock_sys::getsockopt_bytes(sock, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
                .map_err(&err)?;
            let state = info[0];
            let word = |at: usize| {
                u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]])
            };
            s.nodelay = opt(libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0;
            match state {
                TCP_LISTEN => {
                    // For a listener, tcpi_unacked is the accept queue's
                    // length and tcpi_sacked the backlog.
                    let waiting = word(24);
                    if waiting > 0 {
                        return Err(refuse(format!(
                            "a TCP socket listening on {} with {waiting} connection(s) not \
                             accepted yet; established TCP connections need TCP repair, not \
                             supported yet",
                            show(&s.local_addr, s.local_port)
                        )));
                    }
                    s.listening = true;
                    s.backlog = word(28);
                }
                TCP_CLOSE => {}
                _ => {
                    let peer = peer.map_or("?".into(), |(a, p, _)| show(&a, u32::from(p)));
                    let what = if state == TCP_ESTABLISHED {
                        "an established TCP socket".to_string()
                    } else {
                        format!(
                            "a TCP socket in state {}",
                            TCP_STATES.get(state as usize).unwrap_or(&"?")
                        )
                    };
                    return Err(refuse(format!(
                        "{what} ({} -> {peer}); established TCP connections need TCP repair, \
                         not supported yet",
                        show(&s.local_addr, s.local_port)
                    )));
                }
            }
        }
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            s.broadcast = opt(libc::SOL_SOCKET, libc::SO_BROADCAST)? != 0;
            if let Some((a, p, _)) = peer {
                s.peer_addr = a;
                s.peer_port = u32::from(p);
            }
        }
        _ => {
            return Err(refuse(format!(
                "an inet socket of type {ty}, protocol {protocol} (only TCP and UDP are supported)"
            )))
        }
    }
    tracing::debug!(pid, fd, ino, local = %show(&s.local_addr, s.local_port), listening = s.listening, "inet socket");
    Ok(s)
}

fn set(sock: BorrowedFd<'_>, level: i32, opt: i32, v: i32) -> io::Result<()> {
    sock_sys::setsockopt_int(sock, level, opt, v)
}

/// A new socket like `s`: options, bound, listening or connected.
fn create(s: &InetSocket) -> Result<OwnedFd, (String, io::Error)> {
    let at = |what: &str| {
        let what = what.to_string();
        move |e| (what.clone(), e)
    };
    let inval = || io::Error::from_raw_os_error(libc::EINVAL);
    let sock = sock_sys::socket(s.family as i32, s.r#type as i32, s.protocol as i32)
        .map_err(at("create the socket"))?;
    let fd = sock.as_fd();
    let tcp = s.protocol as i32 == libc::IPPROTO_TCP;
    if s.family as i32 == libc::AF_INET6 {
        set(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, s.v6only as i32)
            .map_err(at("set IPV6_V6ONLY"))?;
    }
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, s.reuseaddr as i32)
        .map_err(at("set SO_REUSEADDR"))?;
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, s.reuseport as i32)
        .map_err(at("set SO_REUSEPORT"))?;
    set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, s.keepalive as i32)
        .map_err(at("set SO_KEEPALIVE"))?;
    if s.sndbuf > 0 {
        set(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (s.sndbuf / 2) as i32,
        )
        .map_err(at("set SO_SNDBUF"))?;
    }
    if s.rcvbuf > 0 {
        set(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (s.rcvbuf / 2) as i32,
        )
        .map_err(at("set SO_RCVBUF"))?;
    }
    if tcp {
        set(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, s.nodelay as i32)
            .map_err(at("set TCP_NODELAY"))?;
    } else {
        set(fd, libc::SOL_SOCKET, libc::SO_BROADCAST, s.broadcast as i32)
            .map_err(at("set SO_BROADCAST"))?;
    }
    let local = show(&s.local_addr, s.local_port);
    let unspecified = s.local_addr.iter().all(|&b| b == 0);
    if s.local_port != 0 || !unspecified {
        let addr = make_addr(s.family, &s.local_addr, s.local_port, s.scope_id)
            .ok_or_else(|| (format!("bind to {local}"), inval()))?;
        sock_sys::bind(fd, &addr).map_err(at(&format!("bind to {local}")))?;
    }
    if s.listening {
        let backlog = i32::try_from(s.backlog).unwrap_or(i32::MAX);
        sock_sys::listen(fd, backlog).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EADDRINUSE) && !s.reuseaddr {
                " (without SO_REUSEADDR, the port's TIME_WAIT connections block it for a while)"
            } else {
                ""
            };
            (format!("listen on {local}{hint}"), e)
        })?;
    }
    if !s.peer_addr.is_empty() {
        let peer = show(&s.peer_addr, s.peer_port);
        let addr = make_addr(s.family, &s.peer_addr, s.peer_port, s.scope_id)
            .ok_or_else(|| (format!("connect to {peer}"), inval()))?;
        sock_sys::connect(fd, &addr).map_err(at(&format!("connect to {peer}")))?;
    }
    sock_sys::fcntl(
        fd,
        libc::F_SETFL,
        (s.flags & libc::O_NONBLOCK as u32) as i32,
    )
    .map_err(at("set its flags"))?;
    Ok(sock)
}

/// Inet sockets made so far in a restore (a socket has as many
/// descriptors as it was dup'd), kept at numbers at or above `high`.
#[derive(Debug)]
pub struct Made {
    high: i32,
    made: std::collections::HashMap<u64, OwnedFd>,
}

impl Made {
    pub fn new(high: i32) -> Made {
        Made {
            high,
            made: Default::default(),
        }
    }
}

/// A descriptor for fd `fd` of the image: its socket, created when the
/// socket's first descriptor comes up.
pub fn restore(fd: i32, s: &InetSocket, made: &mut Made) -> Result<OwnedFd, FilesError> {
    if !made.made.contains_key(&s.id) {
        let sock = create(s).map_err(|(what, source)| FilesError::Socket { fd, what, source })?;
        let high =
            sock_sys::dup_above(sock.as_fd(), made.high).map_err(|source| FilesError::Create {
                fd,
                kind: "inet socket",
                source,
            })?;
        made.made.insert(s.id, high);
    }
    made.made[&s.id]
        .try_clone()
        .map_err(|source| FilesError::Create {
            fd,
            kind: "inet socket",
            source,
        })
}

/// One line for `show`.
pub fn describe(s: &InetSocket) -> String {
    let proto = match (s.protocol as i32, s.family as i32) {
        (libc::IPPROTO_TCP, libc::AF_INET) => "tcp",
        (libc::IPPROTO_TCP, _) => "tcp6",
        (_, libc::AF_INET) => "udp",
        _ => "udp6",
    };
    let mut out = format!(
        "{proto} socket:[{}] {}",
        s.id,
        show(&s.local_addr, s.local_port)
    );
    if s.listening {
        out += &format!(" listening backlog {}", s.backlog);
    }
    if !s.peer_addr.is_empty() {
        out += &format!(" connected to {}", show(&s.peer_addr, s.peer_port));
    }
    for (on, name) in [
        (s.reuseaddr, " reuseaddr"),
        (s.reuseport, " reuseport"),
        (s.v6only, " v6only"),
        (s.flags & libc::O_NONBLOCK as u32 != 0, " nonblock"),
    ] {
        if on {
            out += name;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        let a = make_addr(libc::AF_INET as u32, &[127, 0, 0, 1], 8080, 0).unwrap();
        assert_eq!(parse_addr(a.bytes()), Some((vec![127, 0, 0, 1], 8080, 0)));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let a = make_addr(libc::AF_INET6 as u32, &v6, 443, 3).unwrap();
        assert_eq!(parse_addr(a.bytes()), Some((v6.to_vec(), 443, 3)));
        assert_eq!(show(&v6, 443), "[::1]:443");
        assert!(make_addr(libc::AF_INET as u32, &v6, 1, 0).is_none());
        assert!(make_addr(libc::AF_INET as u32, &[1, 2, 3, 4], 70000, 0).is_none());
        assert!(parse_addr(&[2, 0, 1]).is_none());
    }
}
