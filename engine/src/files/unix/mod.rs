//! Unix sockets held by one task: socketpairs and connected pairs (stream,
//! datagram, seqpacket), sockets bound to a path or an abstract name,
//! listening sockets with their backlog and the task's own connections
//! waiting to be accepted, datagram sockets connected to a bound socket of
//! the task. Saved from sock_diag ([`diag`]) and a `pidfd_getfd` duplicate
//! (options, and the queued data read without consuming it, [`queue`]).
//! Refused, naming the fd: a peer outside the task (a peer in another task
//! of a dumped tree is fine: [`super::shared`]), file descriptors in
//! flight (SCM_RIGHTS), data on a connection not accepted yet. The dump's
//! early check (before the freeze) peeks too: a task that itself peeks
//! with `SO_PEEK_OFF` at that moment may see its offset moved.
//!
//! Restored all at once when the first unix descriptor comes up: every
//! socket is created (pairs with `socketpair`), bound and put listening;
//! then pending and datagram connections are made; then queues are refilled
//! from the peer, and shutdown state, flags and peek offsets set. A
//! connection the task accepted from its own listener is connected and
//! accepted again (both ends keep their addresses); other connected pairs
//! come back as socketpairs (a name bound on a socketpair end is lost).
//! The credentials attached to queued messages are the restored task's.
pub mod diag;
pub mod queue;

use super::{sock_sys, FilesError};
use crm_proto::image::{fd_entry, FdEntry, UnixSocket};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The inode of a `socket:[N]` link.
pub fn inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What the dump learned about sockets beyond the image entries.
#[derive(Debug, Default)]
pub struct Seen {
    first: HashSet<u64>,
    /// sock_diag of each peer, by inode (embryo connections of listeners
    /// are not in the task's fd table).
    peers: HashMap<u64, diag::UnixDiag>,
}

impl Seen {
    /// Adds what the dump of another task learned (the sockets a tree's
    /// tasks share are checked together).
    pub fn merge(&mut self, other: &Seen) {
        for (k, v) in &other.peers {
            self.peers.entry(*k).or_insert_with(|| v.clone());
        }
    }

    /// The peer of socket `ino` as sock_diag showed it (for an embryo
    /// connection waiting on a listener: its client), if it was looked up.
    pub fn peer_of(&self, ino: u64) -> Option<u64> {
        self.peers.get(&ino).map(|d| d.peer).filter(|&p| p != 0)
    }
}

fn refused(pid: i32, fd: i32, what: String) -> FilesError {
    FilesError::Refused { pid, fd, what }
}

fn io_err(pid: i32, fd: i32) -> impl Fn(io::Error) -> FilesError {
    move |source| FilesError::Inspect { pid, fd, source }
}

/// A path name's file, for `stat`: relative names are relative to the
/// task's working directory.
fn name_path(pid: i32, name: &[u8]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let p = std::path::Path::new(std::ffi::OsStr::from_bytes(name));
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::path::PathBuf::from(format!("/proc/{pid}/cwd")).join(p)
    }
}

/// Saves unix socket fd `fd` of `pid` (`sock` is our duplicate of it).
pub fn dump(
    pid: i32,
    fd: i32,
    ino: u64,
    sock: BorrowedFd<'_>,
    flags: u32,
    seen: &mut Seen,
) -> Result<UnixSocket, FilesError> {
    let d = diag::lookup(ino).map_err(io_err(pid, fd))?.ok_or_else(|| {
        refused(
            pid,
            fd,
            format!("unix socket:[{ino}] is unknown to sock_diag"),
        )
    })?;
    let mut s = UnixSocket {
        id: ino,
        r#type: d.ty,
        state: d.state,
        ..Default::default()
    };
    if !seen.first.insert(ino) {
        s.dup_of_lower = true;
        return Ok(s);
    }
    let opt = |o| sock_sys::getsockopt_int(sock, libc::SOL_SOCKET, o).map_err(io_err(pid, fd));
    s.sndbuf = opt(libc::SO_SNDBUF)? as u32;
    s.rcvbuf = opt(libc::SO_RCVBUF)? as u32;
    s.passcred = opt(libc::SO_PASSCRED)? != 0;
    s.peek_off = opt(libc::SO_PEEK_OFF)?;
    s.flags = flags & libc::O_NONBLOCK as u32;
    s.name = d.name.clone();
    if s.name.first().is_some_and(|&c| c != 0) {
        // A path name comes with its terminating NUL.
        if let Some(end) = s.name.iter().position(|&c| c == 0) {
            s.name.truncate(end);
        }
    }
    s.shutdown = d.shutdown;
    if !s.name.is_empty() && s.name[0] != 0 {
        let path = name_path(pid, &s.name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if d.vfs.is_some_and(|(i, _)| i == m.ino()) => {
                s.mode = m.mode() & 0o7777;
                s.uid = m.uid();
                s.gid = m.gid();
            }
            _ => s.unlinked = true,
        }
    }
    if d.state == diag::STATE_LISTEN {
        s.backlog = d.rqlen.1;
        s.pending = d.icons.clone();
        // The embryo of each pending connection names its client.
        for e in &d.icons {
            if let Some(ed) = diag::lookup(*e).map_err(io_err(pid, fd))? {
                seen.peers.insert(*e, ed);
            }
        }
    } else {
        s.queue = queue::peek_all(sock, d.ty as i32)
            .map_err(|e| refused(pid, fd, format!("a unix socket (socket:[{ino}]) whose {e}")))?;
    }
    if d.peer != 0 {
        s.peer = d.peer;
        if let Some(pd) = diag::lookup(d.peer).map_err(io_err(pid, fd))? {
            seen.peers.insert(d.peer, pd);
        }
    }
    tracing::debug!(
        pid,
        fd,
        ino,
        state = d.state,
        peer = d.peer,
        queued = s.queue.len(),
        "unix socket"
    );
    Ok(s)
}

/// Checks that every unix socket of the task can be recreated from the
/// task's own sockets, and marks the clients of pending connections.
pub fn check(pid: i32, fds: &mut [FdEntry], seen: &Seen) -> Result<(), FilesError> {
    // inode -> (fd, socket) of the describing entries.
    let mut by_id: BTreeMap<u64, (i32, UnixSocket)> = BTreeMap::new();
    for f in fds.iter() {
        if let Some(fd_entry::Kind::UnixSocket(s)) = &f.kind {
            if !s.dup_of_lower {
                by_id.insert(s.id, (f.fd, s.clone()));
            }
        }
    }
    // Pending connections: the embryo's peer is the client.
    let mut client_of: HashMap<u64, u64> = HashMap::new();
    let mut clients: HashMap<u64, Vec<u64>> = HashMap::new();
    for (id, (fd, l)) in &by_id {
        for e in &l.pending {
            // Kernels name either the client itself or the embryo socket
            // (whose peer is the client) in a listener's queue.
            let client = Some(*e)
                .filter(|c| c != id && by_id.contains_key(c))
                .or_else(|| {
                    seen.peers
                        .get(e)
                        .map(|ed| ed.peer)
                        .filter(|c| by_id.contains_key(c))
                })
                .or_else(|| {
                    by_id
                        .iter()
                        .find(|(_, (_, c))| c.peer == *e)
                        .map(|(c, _)| *c)
                });
            let Some(client) = client else {
                return Err(refused(
                    pid,
                    *fd,
                    format!(
                        "a listening unix socket (socket:[{id}]) with a connection from \
                         outside the process (socket:[{e}]) waiting to be accepted"
                    ),
                ));
            };
            if seen.peers.get(e).is_some_and(|pd| pd.rqlen.0 > 0) {
                let cfd = by_id[&client].0;
                return Err(refused(
                    pid,
                    cfd,
                    format!(
                        "a unix socket (socket:[{client}]) that sent data on a connection \
                         that listening socket:[{id}] has not accepted yet"
                    ),
                ));
            }
            client_of.insert(client, *id);
            clients.entry(*id).or_default().push(client);
        }
    }
    for (id, (fd, s)) in &by_id {
        if client_of.contains_key(id) || s.peer == 0 {
            if !s.queue.is_empty() && !can_refill(s, &by_id) {
                return Err(refused(pid, *fd, format!("a unix socket (socket:[{id}]) with queued data and no peer or name to refill it from")));
            }
            continue;
        }
        match by_id.get(&s.peer) {
            Some((_, p)) if p.peer == *id => {}
            Some((_, p)) if s.r#type == libc::SOCK_DGRAM as u32 && !p.name.is_empty() => {}
            Some(_) => {
                return Err(refused(
                    pid,
                    *fd,
                    format!(
                        "a unix socket (socket:[{id}]) connected to socket:[{}] of the \
                         process, which cannot be reconnected",
                        s.peer
                    ),
                ))
            }
            None => {
                return Err(refused(
                    pid,
                    *fd,
                    format!(
                        "a unix socket (socket:[{id}]) connected to socket:[{}] outside the \
                         process ({}); sockets connected to other processes are not supported \
                         yet",
                        s.peer,
                        seen.peers
                            .get(&s.peer)
                            .filter(|p| !p.name.is_empty())
                            .map_or("unnamed".into(), |p| format!(
                                "named {}",
                                show_name(&p.name)
                            ))
                    ),
                ))
            }
        }
        if !s.queue.is_empty() && !can_refill(s, &by_id) {
            return Err(refused(pid, *fd, format!("a unix socket (socket:[{id}]) with queued data and no peer or name to refill it from")));
        }
    }
    for f in fds.iter_mut() {
        if let Some(fd_entry::Kind::UnixSocket(s)) = &mut f.kind {
            if let Some(l) = client_of.get(&s.id) {
                s.listener = *l;
                s.peer = 0;
            }
            // A listener's pending connections: named by their clients, in
            // accept order.
            if let Some(c) = clients.get(&s.id) {
                s.pending = c.clone();
            }
        }
    }
    Ok(())
}

/// Whether `s` and its peer name each other (a pair).
fn mutual(entries: &BTreeMap<u64, UnixSocket>, s: &UnixSocket) -> bool {
    s.peer != 0 && entries.get(&s.peer).is_some_and(|p| p.peer == s.id)
}

/// For the accepted end `s` of a connection whose both ends the task
/// holds: the listener of the task it came from (it carries the
/// listener's name, its client does not).
fn accepted_from(entries: &BTreeMap<u64, UnixSocket>, s: &UnixSocket) -> Option<u64> {
    if s.state != diag::STATE_CONNECTED || s.name.is_empty() || !mutual(entries, s) {
        return None;
    }
    if entries.get(&s.peer).is_some_and(|p| p.name == s.name) {
        return None;
    }
    entries
        .values()
        .find(|l| l.state == diag::STATE_LISTEN && l.name == s.name)
        .map(|l| l.id)
}

/// Whether `s` is the client end of such an accepted connection.
fn accepting_client(entries: &BTreeMap<u64, UnixSocket>, s: &UnixSocket) -> bool {
    mutual(entries, s)
        && entries
            .get(&s.peer)
            .is_some_and(|p| accepted_from(entries, p).is_some())
}

/// Whether a socket's queue can be written back: from its pair's other
/// end, or (datagrams) sent to its name.
fn can_refill(s: &UnixSocket, by_id: &BTreeMap<u64, (i32, UnixSocket)>) -> bool {
    let mutual = by_id.get(&s.peer).is_some_and(|(_, p)| p.peer == s.id);
    mutual || orphan(s) || (s.r#type == libc::SOCK_DGRAM as u32 && !s.name.is_empty())
}

/// A stream or seqpacket socket whose peer has closed: restored as one
/// end of a socketpair whose other end is closed once the queue is back.
fn orphan(s: &UnixSocket) -> bool {
    s.state == diag::STATE_CONNECTED
        && s.peer == 0
        && s.listener == 0
        && s.r#type != libc::SOCK_DGRAM as u32
}

/// The unix sockets of a restore, created together (see the module doc)
/// and kept at numbers at or above `high` until their descriptors are
/// placed.
#[derive(Debug)]
pub struct Made {
    high: i32,
    entries: BTreeMap<u64, UnixSocket>,
    made: HashMap<u64, OwnedFd>,
    done: bool,
}

impl Made {
    pub fn new(high: i32, fds: &[(i32, bool, fd_entry::Kind)]) -> Made {
        let mut entries = BTreeMap::new();
        for (_, _, k) in fds {
            if let fd_entry::Kind::UnixSocket(s) = k {
                if !s.dup_of_lower {
                    entries.entry(s.id).or_insert_with(|| s.clone());
                }
            }
        }
        Made {
            high,
            entries,
            made: HashMap::new(),
            done: false,
        }
    }

    fn keep(&mut self, id: u64, fd: OwnedFd) -> io::Result<()> {
        let high = sock_sys::dup_above(fd.as_fd(), self.high)?;
        self.made.insert(id, high);
        Ok(())
    }

    fn get(&self, id: u64) -> io::Result<BorrowedFd<'_>> {
        self.made
            .get(&id)
            .map(|f| f.as_fd())
            .ok_or_else(|| io::Error::other(format!("socket:[{id}] is not in the image")))
    }

    fn create_all(&mut self) -> Result<(), (u64, String, io::Error)> {
        let entries = std::mem::take(&mut self.entries);
        let r = self.create_from(&entries);
        self.entries = entries;
        r
    }

    fn create_from(
        &mut self,
        entries: &BTreeMap<u64, UnixSocket>,
    ) -> Result<(), (u64, String, io::Error)> {
        let ctx = |id: u64, what: &str| {
            let what = what.to_string();
            move |e: io::Error| (id, what.clone(), e)
        };
        // 1. Create, set options, bind, listen.
        for (id, s) in entries {
            if self.made.contains_key(id) {
                continue;
            }
            let ty = s.r#type as i32;
            if accepted_from(entries, s).is_some() {
                // Made by accept below, once its listener exists.
            } else if accepting_client(entries, s) {
                let sock =
                    sock_sys::socket(libc::AF_UNIX, ty, 0).map_err(ctx(*id, "create a socket"))?;
                self.keep(*id, sock).map_err(ctx(*id, "move a socket"))?;
            } else if mutual(entries, s) {
                let (a, b) = sock_sys::socketpair(ty).map_err(ctx(*id, "create a socketpair"))?;
                self.keep(*id, a).map_err(ctx(*id, "move a socket"))?;
                self.keep(s.peer, b).map_err(ctx(*id, "move a socket"))?;
            } else if orphan(s) {
                let (a, b) = sock_sys::socketpair(ty).map_err(ctx(*id, "create a socketpair"))?;
                with_big_sndbuf(b.as_fd(), s, 0, |snd| {
                    queue::refill(snd, ty, &s.queue, None)
                })
                .map_err(ctx(*id, "refill its queue"))?;
                drop(b); // the peer is gone: the reader sees the data, then the end
                self.keep(*id, a).map_err(ctx(*id, "move a socket"))?;
            } else {
                let sock =
                    sock_sys::socket(libc::AF_UNIX, ty, 0).map_err(ctx(*id, "create a socket"))?;
                self.keep(*id, sock).map_err(ctx(*id, "move a socket"))?;
            }
        }
        for (id, s) in entries {
            if accepted_from(entries, s).is_some() {
                continue;
            }
            let sock = self.get(*id).map_err(ctx(*id, "find"))?;
            set_options(sock, s).map_err(ctx(*id, "set socket options"))?;
            if !s.name.is_empty() && (!mutual(entries, s) || accepting_client(entries, s)) {
                bind(sock, s).map_err(ctx(*id, &format!("bind to {}", show_name(&s.name))))?;
            }
            if s.state == diag::STATE_LISTEN {
                sock_sys::listen(sock, s.backlog as i32).map_err(ctx(*id, "listen"))?;
            }
        }
        // 2. Connections: connections the task accepted from its own
        // listeners (connected and accepted again, so both ends keep their
        // addresses), then the pending ones in accept order, then datagram
        // sockets connected to a bound socket.
        for (id, s) in entries {
            let Some(l) = accepted_from(entries, s) else {
                continue;
            };
            let addr = unix_addr(&entries[&l].name).map_err(ctx(*id, "name"))?;
            let client = self.get(s.peer).map_err(ctx(s.peer, "find"))?;
            sock_sys::connect(client, &addr).map_err(ctx(
                s.peer,
                &format!("connect to {}", show_name(&entries[&l].name)),
            ))?;
            let listener = self.get(l).map_err(ctx(l, "find"))?;
            let sock = sock_sys::accept(listener).map_err(ctx(*id, "accept its connection"))?;
            set_options(sock.as_fd(), s).map_err(ctx(*id, "set socket options"))?;
            self.keep(*id, sock).map_err(ctx(*id, "move a socket"))?;
        }
        for (id, l) in entries
            .iter()
            .filter(|(_, l)| l.state == diag::STATE_LISTEN)
        {
            let addr = unix_addr(&l.name).map_err(ctx(*id, "name"))?;
            for &c in &l.pending {
                let sock = self.get(c).map_err(ctx(c, "find"))?;
                sock_sys::fcntl(sock, libc::F_SETFL, libc::O_NONBLOCK)
                    .map_err(ctx(c, "set O_NONBLOCK"))?;
                sock_sys::connect(sock, &addr)
                    .map_err(ctx(c, &format!("connect to {}", show_name(&l.name))))?;
            }
        }
        for (id, s) in entries {
            if s.peer != 0 && !mutual(entries, s) {
                let p = entries.get(&s.peer).ok_or_else(|| {
                    (
                        *id,
                        "connect".to_string(),
                        io::Error::other(format!(
                            "its peer socket:[{}] is not in the image",
                            s.peer
                        )),
                    )
                })?;
                let addr = unix_addr(&p.name).map_err(ctx(*id, "name"))?;
                let sock = self.get(*id).map_err(ctx(*id, "find"))?;
                sock_sys::connect(sock, &addr)
                    .map_err(ctx(*id, &format!("connect to {}", show_name(&p.name))))?;
            }
        }
        // 3. Queued data, then shutdown state, flags, peek offsets.
        for (id, s) in entries
            .iter()
            .filter(|(_, s)| !s.queue.is_empty() && !orphan(s))
        {
            let ty = s.r#type as i32;
            if mutual(entries, s) {
                let sender = self.get(s.peer).map_err(ctx(*id, "find"))?;
                let orig = entries[&s.peer].sndbuf;
                with_big_sndbuf(sender, s, orig, |snd| {
                    queue::refill(snd, ty, &s.queue, None)
                })
                .map_err(ctx(*id, "refill its queue"))?;
            } else {
                let addr = unix_addr(&s.name).map_err(ctx(*id, "name"))?;
                let tmp =
                    sock_sys::socket(libc::AF_UNIX, ty, 0).map_err(ctx(*id, "create a socket"))?;
                with_big_sndbuf(tmp.as_fd(), s, 0, |snd| {
                    queue::refill(snd, ty, &s.queue, Some(&addr))
                })
                .map_err(ctx(*id, "refill its queue"))?;
            }
        }
        for (id, s) in entries {
            let sock = self.get(*id).map_err(ctx(*id, "find"))?;
            if orphan(s) {
                // Shut down both ways by the closed peer already.
            } else if s.shutdown & 2 != 0 {
                sock_sys::shutdown(sock, libc::SHUT_WR).map_err(ctx(*id, "shut down"))?;
            }
            if s.shutdown & 1 != 0 && !orphan(s) {
                sock_sys::shutdown(sock, libc::SHUT_RD).map_err(ctx(*id, "shut down"))?;
            }
            sock_sys::fcntl(
                sock,
                libc::F_SETFL,
                (s.flags & libc::O_NONBLOCK as u32) as i32,
            )
            .map_err(ctx(*id, "set its flags"))?;
            if s.peek_off >= 0 {
                sock_sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, s.peek_off)
                    .map_err(ctx(*id, "set SO_PEEK_OFF"))?;
            }
        }
        Ok(())
    }
}

fn show_name(name: &[u8]) -> String {
    let mut name = name;
    if name.first().is_some_and(|&c| c != 0) {
        // A path name as sock_diag gives it ends in a NUL.
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        name = &name[..end];
    }
    let s = String::from_utf8_lossy(name);
    match s.strip_prefix('\0') {
        Some(abs) => format!("@{abs}"),
        None => s.into_owned(),
    }
}

fn unix_addr(name: &[u8]) -> io::Result<sock_sys::SockAddr> {
    sock_sys::SockAddr::unix(name).ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))
}

fn set_options(sock: BorrowedFd<'_>, s: &UnixSocket) -> io::Result<()> {
    // The kernel doubles what is set and reports the doubled value.
    if s.sndbuf > 0 {
        sock_sys::setsockopt_int(
            sock,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (s.sndbuf / 2) as i32,
        )?;
    }
    if s.rcvbuf > 0 {
        sock_sys::setsockopt_int(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (s.rcvbuf / 2) as i32,
        )?;
    }
    if s.passcred {
        sock_sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PASSCRED, 1)?;
    }
    Ok(())
}

/// Runs `f` with `sender`'s send buffer large enough for `s`'s queue,
/// then sets it back to `orig` (0: leave it).
fn with_big_sndbuf(
    sender: BorrowedFd<'_>,
    s: &UnixSocket,
    orig: u32,
    f: impl FnOnce(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let bytes: usize = s.queue.iter().map(|m| m.len() + 1024).sum();
    let want = (bytes + (1 << 20)).min(i32::MAX as usize / 2) as i32;
    sock_sys::setsockopt_int(sender, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)?;
    let r = f(sender);
    if orig > 0 {
        sock_sys::setsockopt_int(
            sender,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (orig / 2) as i32,
        )?;
    }
    r
}

/// Binds to a path or abstract name. A socket file left at the path (by
/// the dumped task) is removed first; anything else there is an error. The
/// file gets its mode and owner back, or is removed again if the task had
/// unlinked it.
fn bind(sock: BorrowedFd<'_>, s: &UnixSocket) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let addr = unix_addr(&s.name)?;
    if s.name[0] == 0 {
        return sock_sys::bind(sock, &addr);
    }
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&s.name));
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    sock_sys::bind(sock, &addr)?;
    if s.unlinked {
        std::fs::remove_file(path)?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.mode))?;
        std::os::unix::fs::lchown(path, Some(s.uid), Some(s.gid))?;
    }
    Ok(())
}

/// A descriptor for fd `fd` of the image: its socket, all of the image's
/// unix sockets being created when the first one comes up.
pub fn restore(fd: i32, s: &UnixSocket, made: &mut Made) -> Result<OwnedFd, FilesError> {
    if !made.done {
        made.done = true;
        made.create_all()
            .map_err(|(id, what, source)| FilesError::Socket {
                fd,
                what: format!("{what} (unix socket:[{id}])"),
                source,
            })?;
    }
    let sock = made.get(s.id).map_err(|source| FilesError::Create {
        fd,
        kind: "unix socket",
        source,
    })?;
    sock.try_clone_to_owned()
        .map_err(|source| FilesError::Create {
            fd,
            kind: "unix socket",
            source,
        })
}

/// The unix sockets of an image, for `show`: one line of details.
pub fn describe(s: &UnixSocket) -> String {
    if s.dup_of_lower {
        return format!("unix socket:[{}] (same as a lower fd)", s.id);
    }
    let ty = match s.r#type as i32 {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "?",
    };
    let mut out = format!("unix {ty} socket:[{}]", s.id);
    if !s.name.is_empty() {
        out += &format!(" bound to {}", show_name(&s.name));
        if s.unlinked {
            out += " (unlinked)";
        }
    }
    if s.state == diag::STATE_LISTEN {
        out += &format!(
            " listening backlog {}, {} pending",
            s.backlog,
            s.pending.len()
        );
    }
    if s.peer != 0 {
        out += &format!(" peer socket:[{}]", s.peer);
    }
    if s.listener != 0 {
        out += &format!(" waiting on listener socket:[{}]", s.listener);
    }
    let bytes: usize = s.queue.iter().map(Vec::len).sum();
    out += &format!(", {} queued ({bytes} bytes)", s.queue.len());
    if s.shutdown != 0 {
        out += &format!(" shutdown {}", s.shutdown);
    }
    if s.flags & libc::O_NONBLOCK as u32 != 0 {
        out += " nonblock";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(id: u64, ty: i32, state: u32, peer: u64) -> UnixSocket {
        UnixSocket {
            id,
            r#type: ty as u32,
            state,
            peer,
            ..Default::default()
        }
    }

    fn entries(list: Vec<UnixSocket>) -> Vec<FdEntry> {
        list.into_iter()
            .enumerate()
            .map(|(i, s)| FdEntry {
                fd: 10 + i as i32,
                cloexec: false,
                kind: Some(fd_entry::Kind::UnixSocket(s)),
                ..Default::default()
            })
            .collect()
    }

    fn refusal(fds: &mut [FdEntry], seen: &Seen) -> Option<(i32, String)> {
        match check(1, fds, seen) {
            Err(FilesError::Refused { fd, what, .. }) => Some((fd, what)),
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn pairs_pass_and_outside_peers_are_refused() {
        let st = libc::SOCK_STREAM;
        let seen = Seen::default();
        let mut pair = entries(vec![
            sock(1, st, diag::STATE_CONNECTED, 2),
            sock(2, st, diag::STATE_CONNECTED, 1),
        ]);
        assert_eq!(refusal(&mut pair, &seen), None);
        let mut outside = entries(vec![sock(1, st, diag::STATE_CONNECTED, 9)]);
        let (fd, what) = refusal(&mut outside, &seen).unwrap();
        assert_eq!(fd, 10);
        assert!(what.contains("outside the process"), "{what}");
        // A stream socket connected one way only cannot be remade.
        let mut oneway = entries(vec![
            sock(1, st, diag::STATE_CONNECTED, 2),
            sock(2, st, diag::STATE_CONNECTED, 3),
            sock(3, st, diag::STATE_CONNECTED, 2),
        ]);
        assert!(refusal(&mut oneway, &seen).is_some());
        // Queued data on an unbound, unconnected datagram socket.
        let mut lone = sock(1, libc::SOCK_DGRAM, 7, 0);
        lone.queue = vec![b"x".to_vec()];
        let (_, what) = refusal(&mut entries(vec![lone]), &seen).unwrap();
        assert!(what.contains("queued data"), "{what}");
    }

    #[test]
    fn pending_connections_are_matched_to_their_clients() {
        let st = libc::SOCK_STREAM;
        let mut l = sock(1, st, diag::STATE_LISTEN, 0);
        l.name = b"\0l".to_vec();
        // Kernels name the embryo (5, whose peer is the client 2) or the
        // client itself (3).
        l.pending = vec![5, 3];
        let mut seen = Seen::default();
        seen.peers.insert(
            5,
            diag::UnixDiag {
                ino: 5,
                peer: 2,
                ..Default::default()
            },
        );
        let mut fds = entries(vec![
            l.clone(),
            sock(2, st, diag::STATE_CONNECTED, 5),
            sock(3, st, diag::STATE_CONNECTED, 0),
        ]);
        assert_eq!(refusal(&mut fds, &seen), None);
        let get = |fds: &[FdEntry], i: usize| match &fds[i].kind {
            Some(fd_entry::Kind::UnixSocket(s)) => s.clone(),
            _ => unreachable!(),
        };
        assert_eq!(get(&fds, 0).pending, vec![2, 3], "clients in accept order");
        assert_eq!((get(&fds, 1).listener, get(&fds, 1).peer), (1, 0));
        assert_eq!(get(&fds, 2).listener, 1);
        // A connection from elsewhere is refused at the listener's fd; data
        // sent on a pending connection at the client's.
        l.pending = vec![8];
        let (fd, what) = refusal(&mut entries(vec![l.clone()]), &seen).unwrap();
        assert_eq!(fd, 10);
        assert!(what.contains("waiting to be accepted"), "{what}");
        l.pending = vec![5];
        seen.peers.get_mut(&5).unwrap().rqlen = (4, 0);
        let mut fds = entries(vec![l, sock(2, st, diag::STATE_CONNECTED, 5)]);
        let (fd, what) = refusal(&mut fds, &seen).unwrap();
        assert_eq!(fd, 11);
        assert!(what.contains("not accepted yet"), "{what}");
    }
}
