//! Open files shared by the tasks of a process tree.
//!
//! Dump ([`link`]): once every task's descriptors are collected, those that
//! are one open file description (`kcmp(KCMP_FILE)`, asked only of
//! descriptors on the same object) form a group. A group held by several
//! tasks is shared, and so is every group of a pipe, or of unix sockets
//! connected to each other, whose descriptors are spread over several
//! tasks. Each shared group gets an id (`FdEntry.shared`) and one describing
//! entry (`shared_owner`: its first descriptor that is not a dup of a lower
//! one, in tree order), which alone keeps the buffered data (pipe bytes,
//! socket queues, FIFO bytes, an unlinked file's contents): the data is
//! stored once. Refused, naming the
//! task and fd: a pipe whose other end no task of the tree holds, a FIFO no
//! task of the tree reads, a unix socket connected to one outside the tree,
//! a shared unix socket bound to a relative path.
//! Epoll instances are never shared (each task gets its own, as before).
//!
//! Restore ([`Table`]): the coordinator creates every shared object once,
//! from its describing entry, at descriptors above every task's image
//! numbers, before it creates the root; the tasks inherit them through
//! clone, and each moves the ones it uses to their numbers (dup: one open
//! file description again, one offset, one set of status flags) and closes
//! the others.
use super::{pipe_buf, regular, unix, Collected, FilesError};
use crm_proto::image::{fd_entry::Kind, FdEntry, FilesCore};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What descriptors must have in common to be one open file description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Pipe(u64, bool),
    Unix(u64),
    Inet(u64),
    File(u64, u64),
    Anon(u8),
}

fn key(k: &Kind) -> Option<Key> {
    let file = |f: &Option<crm_proto::image::FileId>| f.as_ref().map(|f| Key::File(f.dev, f.ino));
    match k {
        Kind::Pipe(p) => Some(Key::Pipe(p.id, p.write_end)),
        Kind::UnixSocket(s) => Some(Key::Unix(s.id)),
        Kind::InetSocket(s) => Some(Key::Inet(s.id)),
        Kind::Regular(r) => file(&r.file),
        Kind::Fifo(f) => file(&f.file),
        Kind::Eventfd(_) => Some(Key::Anon(0)),
        Kind::Signalfd(_) => Some(Key::Anon(1)),
        Kind::Timerfd(_) => Some(Key::Anon(2)),
        Kind::Inotify(_) => Some(Key::Anon(3)),
        // Restored per descriptor (each its own open file description; the
        // memfd or pty behind them is one object, see `files::Objects`).
        Kind::Epoll(_) | Kind::Memfd(_) | Kind::Tty(_) => None,
    }
}

/// Whether the entry names a lower descriptor of its task as the one it
/// duplicates (and so does not describe the object itself).
fn is_dup(k: &Kind) -> bool {
    match k {
        Kind::Regular(r) => r.dup_of.is_some(),
        Kind::Fifo(f) => f.dup_of.is_some(),
        Kind::UnixSocket(s) => s.dup_of_lower,
        _ => false,
    }
}

/// Drops the buffered data of an entry that does not describe its object.
fn strip(k: &mut Kind) {
    match k {
        Kind::Pipe(p) => p.data.clear(),
        Kind::Fifo(f) => {
            f.data.clear();
            f.has_data = false;
        }
        Kind::UnixSocket(s) => s.queue.clear(),
        Kind::Regular(r) => {
            if let Some(g) = &mut r.ghost {
                g.contents.clear();
            }
        }
        _ => {}
    }
}

/// A descriptor of the tree: (task index, entry index).
type At = (usize, usize);

fn entry(tasks: &[Collected], (t, i): At) -> &FdEntry {
    &tasks[t].files.fds[i]
}

fn kind(tasks: &[Collected], at: At) -> Option<&Kind> {
    entry(tasks, at).kind.as_ref()
}

/// The open file descriptions of the tree: groups of descriptors, each in
/// tree order, the groups ordered by their first descriptor.
fn descriptions(tasks: &[Collected]) -> Vec<Vec<At>> {
    let mut by_key: HashMap<Key, Vec<Vec<At>>> = HashMap::new();
    for (t, task) in tasks.iter().enumerate() {
        for (i, e) in task.files.fds.iter().enumerate() {
            let Some(k) = e.kind.as_ref().and_then(key) else {
                continue;
            };
            let groups = by_key.entry(k).or_default();
            let same = |g: &&mut Vec<At>| {
                let (gt, gi) = g[0];
                let a = (tasks[gt].pid, tasks[gt].files.fds[gi].fd);
                regular::shared_description(a, (task.pid, e.fd)) == Some(true)
            };
            match groups.iter_mut().find(same) {
                Some(g) => g.push((t, i)),
                None => groups.push(vec![(t, i)]),
            }
        }
    }
    let mut all: Vec<Vec<At>> = by_key.into_values().flatten().collect();
    all.sort_by_key(|g| g[0]);
    all
}

/// Union-find over socket inodes: connected sockets end in one set.
#[derive(Default)]
struct Sets(HashMap<u64, u64>);

impl Sets {
    fn find(&self, mut x: u64) -> u64 {
        while let Some(&p) = self.0.get(&x) {
            if p == x {
                break;
            }
            x = p;
        }
        x
    }

    fn join(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0.insert(ra, rb);
        }
    }
}

/// An object whose descriptors may be spread over tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Object {
    Pipe(u64),
    Sockets(u64),
}

/// Links the descriptors of a tree's tasks (see the module docs): marks
/// what is shared, keeps its data once, refuses what the tree cannot
/// restore.
pub fn link(tasks: &mut [Collected]) -> Result<(), FilesError> {
    check_pipe_ends(tasks)?;
    check_fifo_readers(tasks)?;
    let groups = descriptions(tasks);

    let mut sets = Sets::default();
    let mut seen = unix::Seen::default();
    for task in tasks.iter() {
        seen.merge(&task.unix);
        for e in &task.files.fds {
            if let Some(Kind::UnixSocket(s)) = &e.kind {
                if s.peer != 0 {
                    sets.join(s.id, s.peer);
                }
                for &p in &s.pending {
                    sets.join(s.id, p);
                    if let Some(c) = task.unix.peer_of(p) {
                        sets.join(p, c);
                    }
                }
            }
        }
    }
    let object = |k: &Kind| match k {
        Kind::Pipe(p) => Some(Object::Pipe(p.id)),
        Kind::UnixSocket(s) => Some(Object::Sockets(sets.find(s.id))),
        _ => None,
    };
    let mut spread: HashMap<Object, BTreeSet<usize>> = HashMap::new();
    for g in &groups {
        if let Some(o) = kind(tasks, g[0]).and_then(object) {
            spread.entry(o).or_default().extend(g.iter().map(|a| a.0));
        }
    }
    let shared: Vec<bool> = groups
        .iter()
        .map(|g| {
            let own_tasks = g.iter().map(|a| a.0).collect::<BTreeSet<_>>().len();
            own_tasks > 1
                || kind(tasks, g[0])
                    .and_then(object)
                    .is_some_and(|o| spread[&o].len() > 1)
        })
        .collect();
    let shared_at: BTreeSet<At> = groups
        .iter()
        .zip(&shared)
        .filter(|(_, s)| **s)
        .flat_map(|(g, _)| g.iter().copied())
        .collect();
    check_sockets(tasks, &shared_at, &seen)?;
    for &(t, i) in &shared_at {
        let e = entry(tasks, (t, i));
        if let Some(Kind::UnixSocket(s)) = &e.kind {
            // Created by the restoring coordinator, whose working
            // directory is not the task's.
            if s.name.first().is_some_and(|&c| c != 0 && c != b'/') {
                return Err(FilesError::Unsupported {
                    pid: tasks[t].pid,
                    fd: e.fd,
                    kind: "a unix socket bound to a relative path and shared by several tasks",
                    target: String::from_utf8_lossy(&s.name).into_owned(),
                });
            }
        }
    }

    // Ids, describing entries, data once.
    let mut pipe_data: HashMap<u64, Vec<u8>> = HashMap::new();
    for &(t, i) in &shared_at {
        if let Some(Kind::Pipe(p)) = &mut tasks[t].files.fds[i].kind {
            let d = std::mem::take(&mut p.data);
            if !d.is_empty() {
                pipe_data.entry(p.id).or_insert(d);
            }
        }
    }
    let mut next = 1u64;
    for (g, _) in groups.iter().zip(&shared).filter(|(_, s)| **s) {
        let owner = g
            .iter()
            .copied()
            .find(|&a| !kind(tasks, a).is_some_and(is_dup))
            .unwrap_or(g[0]);
        for &(t, i) in g {
            let e = &mut tasks[t].files.fds[i];
            e.shared = next;
            e.shared_owner = (t, i) == owner;
            if let Some(k) = &mut e.kind {
                if (t, i) != owner {
                    strip(k);
                } else if let Kind::Pipe(p) = k {
                    if !p.write_end {
                        p.data = pipe_data.remove(&p.id).unwrap_or_default();
                    }
                }
            }
        }
        next += 1;
    }
    let count = next - 1;
    if count > 0 {
        tracing::debug!(objects = count, "descriptors shared between tasks");
    }
    Ok(())
}

/// Refuses pipes of which the tree holds only one end.
fn check_pipe_ends(tasks: &[Collected]) -> Result<(), FilesError> {
    // id -> (read end seen, write end seen, first holder)
    let mut ends: BTreeMap<u64, (bool, bool, (i32, i32))> = BTreeMap::new();
    for task in tasks {
        for e in &task.files.fds {
            if let Some(Kind::Pipe(p)) = &e.kind {
                let end = ends.entry(p.id).or_insert((false, false, (task.pid, e.fd)));
                if p.write_end {
                    end.1 = true;
                } else {
                    end.0 = true;
                }
            }
        }
    }
    match ends.into_iter().find(|(_, (r, w, _))| !(*r && *w)) {
        Some((id, (r, _, (pid, fd)))) => Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a pipe to another process",
            target: format!(
                "pipe:[{id}], whose {} end no task of the dumped tree holds",
                if r { "write" } else { "read" }
            ),
        }),
        None => Ok(()),
    }
}

/// Refuses FIFOs that no task of the tree reads (their reader is another
/// process).
fn check_fifo_readers(tasks: &[Collected]) -> Result<(), FilesError> {
    // (dev, ino) -> (read by the tree, first holder, path)
    type Readers = BTreeMap<(u64, u64), (bool, (i32, i32), String)>;
    let mut fifos = Readers::new();
    for task in tasks {
        for e in &task.files.fds {
            if let Some(Kind::Fifo(f)) = &e.kind {
                let file = f.file.clone().unwrap_or_default();
                let readable = f.flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
                fifos
                    .entry((file.dev, file.ino))
                    .or_insert((false, (task.pid, e.fd), file.path))
                    .0 |= readable;
            }
        }
    }
    match fifos.into_values().find(|(read, _, _)| !read) {
        Some((_, (pid, fd), path)) => Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a FIFO read by another process",
            target: format!("{path}, which no task of the tree reads"),
        }),
        None => Ok(()),
    }
}

/// The unix-socket checks of a single task, run on each task's own
/// sockets, and once on the sockets the tasks share (all together).
fn check_sockets(
    tasks: &mut [Collected],
    shared: &BTreeSet<At>,
    seen: &unix::Seen,
) -> Result<(), FilesError> {
    let is_unix = |e: &FdEntry| matches!(e.kind, Some(Kind::UnixSocket(_)));
    for (t, task) in tasks.iter_mut().enumerate() {
        let own: Vec<usize> = (0..task.files.fds.len())
            .filter(|&i| is_unix(&task.files.fds[i]) && !shared.contains(&(t, i)))
            .collect();
        let mut list: Vec<FdEntry> = own.iter().map(|&i| task.files.fds[i].clone()).collect();
        unix::check(task.pid, &mut list, &task.unix)?;
        for (i, e) in own.into_iter().zip(list) {
            task.files.fds[i] = e;
        }
    }
    let at: Vec<At> = shared
        .iter()
        .copied()
        .filter(|&a| is_unix(entry(tasks, a)))
        .collect();
    // Numbered by position, so that a refusal can name the real task and fd.
    let mut list: Vec<FdEntry> = at
        .iter()
        .enumerate()
        .map(|(n, &a)| FdEntry {
            fd: n as i32,
            ..entry(tasks, a).clone()
        })
        .collect();
    unix::check(0, &mut list, seen).map_err(|e| match e {
        FilesError::Refused { fd, what, .. } => {
            let (t, i) = at[fd as usize];
            FilesError::Refused {
                pid: tasks[t].pid,
                fd: tasks[t].files.fds[i].fd,
                what,
            }
        }
        other => other,
    })?;
    for ((t, i), e) in at.into_iter().zip(list) {
        tasks[t].files.fds[i].kind = e.kind;
    }
    Ok(())
}

/// The shared objects of a tree image, as the tasks' records list them.
#[derive(Debug, Default)]
pub struct Table {
    /// id -> (pid, fd, kind) of the describing entry.
    owners: BTreeMap<u64, (i32, i32, Kind)>,
    /// pid -> (fd, id) of each shared descriptor of the task.
    uses: BTreeMap<i32, Vec<(i32, u64)>>,
}

impl Table {
    /// Adds the shared descriptors of task `pid`; `Err` says what in the
    /// image is inconsistent.
    pub fn add(&mut self, pid: i32, files: &FilesCore) -> Result<(), String> {
        for e in files.fds.iter().filter(|e| e.shared != 0) {
            let at = format!("task {pid} fd {}", e.fd);
            if e.shared_owner {
                let k = e.kind.clone().ok_or(format!("{at} has no kind"))?;
                if matches!(k, Kind::Epoll(_)) || is_dup(&k) {
                    return Err(format!(
                        "{at} describes shared object {} but is an epoll instance or a \
                         duplicate of a lower descriptor",
                        e.shared
                    ));
                }
                if self.owners.insert(e.shared, (pid, e.fd, k)).is_some() {
                    return Err(format!("shared object {} is described twice", e.shared));
                }
            }
            self.uses.entry(pid).or_default().push((e.fd, e.shared));
        }
        Ok(())
    }

    /// Checks that every shared descriptor has its object described.
    pub fn check(&self) -> Result<(), String> {
        for (pid, uses) in &self.uses {
            if let Some((fd, id)) = uses.iter().find(|(_, id)| !self.owners.contains_key(id)) {
                return Err(format!(
                    "task {pid} fd {fd} uses shared object {id}, which no entry describes"
                ));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Creates every object at a descriptor at or above `high`. `Err`:
    /// the task and error of the describing entry that failed.
    pub fn create(&self, high: i32) -> Result<Objects, (i32, FilesError)> {
        let list: Vec<(i32, bool, Kind)> = self
            .owners
            .values()
            .map(|(_, fd, k)| (*fd, false, k.clone()))
            .collect();
        let mut made = super::Restoring::new(high, &list);
        let mut fds = BTreeMap::new();
        for (&id, (pid, fd, k)) in &self.owners {
            let f = super::restore(*fd, k, &mut made).map_err(|e| (*pid, e))?;
            let lifted = pipe_buf::fcntl(&f, libc::F_DUPFD_CLOEXEC, high).map_err(|source| {
                let kind = "shared descriptor";
                (
                    *pid,
                    FilesError::Create {
                        fd: *fd,
                        kind,
                        source,
                    },
                )
            })?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor nothing owns.
            fds.insert(id, unsafe { OwnedFd::from_raw_fd(lifted) });
        }
        Ok(Objects { fds })
    }

    /// The shared descriptors of task `pid` as (image fd, descriptor of
    /// `objs` it is a duplicate of).
    pub fn inherited(&self, pid: i32, objs: &Objects) -> Vec<(i32, RawFd)> {
        self.uses.get(&pid).map_or_else(Vec::new, |u| {
            u.iter()
                .filter_map(|(fd, id)| Some((*fd, objs.fds.get(id)?.as_raw_fd())))
                .collect()
        })
    }
}

/// The shared objects of a tree restore, open while this lives (the
/// coordinator drops them once the root, which inherits them, exists).
#[derive(Debug, Default)]
pub struct Objects {
    fds: BTreeMap<u64, OwnedFd>,
}

impl Objects {
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Every object's descriptor.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.fds.values().map(|f| f.as_raw_fd()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::image::{EpollFd, Pipe, UnixSocket};

    // PIDs above any pid_max: kcmp fails, so no two descriptors are found
    // to be one open file description; what is shared follows from the
    // objects spread over tasks.
    const A: i32 = i32::MAX - 1;
    const B: i32 = i32::MAX - 2;

    fn fd(fd: i32, kind: Kind) -> FdEntry {
        FdEntry {
            fd,
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn pipe(id: u64, write_end: bool, data: &[u8]) -> Kind {
        Kind::Pipe(Pipe {
            id,
            write_end,
            data: data.to_vec(),
            ..Default::default()
        })
    }

    fn task(pid: i32, fds: Vec<FdEntry>) -> Collected {
        Collected {
            pid,
            files: FilesCore { fds },
            unix: unix::Seen::default(),
        }
    }

    fn data_of(tasks: &[Collected], id: u64) -> Vec<(i32, i32, usize)> {
        let mut out = Vec::new();
        for t in tasks {
            for e in &t.files.fds {
                if let Some(Kind::Pipe(p)) = &e.kind {
                    if p.id == id && !p.data.is_empty() {
                        out.push((t.pid, e.fd, p.data.len()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_pipe_between_tasks_is_shared_and_its_data_stored_once() {
        let mut tasks = vec![
            task(
                A,
                vec![
                    fd(3, pipe(9, true, b"")),
                    fd(4, pipe(7, false, b"x")),
                    fd(5, pipe(7, true, b"")),
                    fd(6, pipe(9, false, b"hello")),
                ],
            ),
            task(B, vec![fd(3, pipe(9, false, b"hello"))]),
        ];
        link(&mut tasks).unwrap();
        let (a, b) = (&tasks[0].files.fds, &tasks[1].files.fds);
        // Pipe 7 is the task's own; every end of pipe 9 is shared.
        assert_eq!((a[1].shared, a[2].shared), (0, 0));
        assert!(a[0].shared != 0 && a[3].shared != 0 && b[0].shared != 0);
        assert!(a[0].shared_owner && a[3].shared_owner && b[0].shared_owner);
        assert_eq!(data_of(&tasks, 9), vec![(A, 6, 5)], "stored once");
        assert_eq!(data_of(&tasks, 7), vec![(A, 4, 1)], "own pipe kept as is");
        let mut table = Table::default();
        for t in &tasks {
            table.add(t.pid, &t.files).unwrap();
        }
        table.check().unwrap();
        assert_eq!(table.owners.len(), 3);
    }

    #[test]
    fn a_pipe_end_the_tree_does_not_hold_is_refused() {
        let mut tasks = vec![
            task(A, vec![fd(3, pipe(9, false, b""))]),
            task(B, vec![fd(4, pipe(9, false, b""))]),
        ];
        match link(&mut tasks) {
            Err(FilesError::Unsupported {
                pid, fd, target, ..
            }) => {
                assert_eq!((pid, fd), (A, 3));
                assert!(target.contains("write end"), "{target}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn sock(id: u64, peer: u64, queue: &[&[u8]]) -> Kind {
        Kind::UnixSocket(UnixSocket {
            id,
            r#type: libc::SOCK_STREAM as u32,
            state: unix::diag::STATE_CONNECTED,
            peer,
            queue: queue.iter().map(|q| q.to_vec()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_socketpair_between_tasks_is_shared_and_an_outside_peer_refused() {
        let mut tasks = vec![
            task(A, vec![fd(3, sock(1, 2, &[b"to A"]))]),
            task(B, vec![fd(4, sock(2, 1, &[b"to B"]))]),
        ];
        link(&mut tasks).unwrap();
        assert!(tasks
            .iter()
            .all(|t| t.files.fds[0].shared != 0 && t.files.fds[0].shared_owner));
        let mut tasks = vec![
            task(A, vec![fd(3, sock(1, 2, &[])), fd(5, sock(2, 1, &[]))]),
            task(B, vec![fd(4, sock(8, 99, &[]))]),
        ];
        match link(&mut tasks) {
            Err(FilesError::Refused { pid, fd, what }) => {
                assert_eq!((pid, fd), (B, 4));
                assert!(what.contains("outside"), "{what}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn only_the_describing_entry_keeps_data() {
        let mut k = pipe(1, false, b"abc");
        strip(&mut k);
        assert!(matches!(&k, Kind::Pipe(p) if p.data.is_empty()));
        let mut k = sock(1, 2, &[b"m"]);
        strip(&mut k);
        assert!(matches!(&k, Kind::UnixSocket(s) if s.queue.is_empty()));
        let mut k = Kind::Regular(crm_proto::image::RegularFile {
            ghost: Some(crm_proto::image::Ghost {
                contents: b"gone".to_vec(),
                mode: 0o600,
                ..Default::default()
            }),
            ..Default::default()
        });
        strip(&mut k);
        assert!(matches!(&k, Kind::Regular(r)
            if r.ghost.as_ref().is_some_and(|g| g.contents.is_empty() && g.mode == 0o600)));
    }

    #[test]
    fn inconsistent_tables_are_rejected() {
        let shared = |n: i32, id: u64, owner: bool, kind: Kind| FdEntry {
            shared: id,
            shared_owner: owner,
            ..fd(n, kind)
        };
        let files = |fds| FilesCore { fds };
        let mut t = Table::default();
        t.add(A, &files(vec![shared(3, 1, true, pipe(9, true, b""))]))
            .unwrap();
        let twice = t.add(B, &files(vec![shared(3, 1, true, pipe(9, true, b""))]));
        assert!(twice.unwrap_err().contains("described twice"));
        let mut t = Table::default();
        t.add(A, &files(vec![shared(3, 2, false, pipe(9, true, b""))]))
            .unwrap();
        assert!(t.check().unwrap_err().contains("no entry describes"));
        let epoll = Kind::Epoll(EpollFd::default());
        let mut t = Table::default();
        assert!(t.add(A, &files(vec![shared(3, 1, true, epoll)])).is_err());
    }
}
