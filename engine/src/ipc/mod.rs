//! SysV IPC objects in dumps and restores: message queues with their queued
//! messages (`msg`), semaphore sets with their values (`sem`) and shared
//! memory segments with their contents (`shm`), saved in `ipc.img` and
//! recreated with the same key, id (`/proc/sys/kernel/*_next_id`), owner,
//! group and permission bits. Creator ids, pids and times are not restored
//! (the restoring user becomes the creator).
//!
//! Which objects a dump saves: SysV objects belong to an IPC namespace, not
//! to processes, and nothing tells which queue or semaphore set a process
//! uses. A dump saves (1) every segment a task of the tree has attached
//! (found in its `maps`), and (2) every queue, set and segment whose key the
//! user names (`DumpOptions::ipc_keys`, `cr-migrate dump --ipc-key`). The
//! tree must share the dumper's IPC namespace (a tree in its own namespace
//! that uses SysV shared memory is refused). A dump that kills the tree
//! also removes the objects it saved (they now live in the image, as the
//! processes do); `--leave-running` keeps them.
//!
//! A restore first checks that no object of the image's ids or keys exists
//! (an existing one is refused, naming it: e.g. after `dump
//! --leave-running` on the same host), then creates them before any task;
//! the tasks attach their segments ([`crate::restore`]); segments that were
//! marked for deletion (`IPC_RMID` while attached) are marked again once
//! every task has attached them. A failed restore removes what it created.
pub mod attach;
mod msg;
mod sem;
mod shm;
pub mod sys;
mod table;
#[cfg(test)]
mod tests;

use crate::image::{ImageDir, ImageError};
use crm_proto::image::{IpcCore, IpcPerm};
use std::collections::BTreeSet;
use std::fmt;

/// The three kinds of SysV IPC objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Msg,
    Sem,
    Shm,
}

impl Kind {
    /// Name in `/proc/sysvipc` and `/proc/sys/kernel/NAME_next_id`.
    fn proc_name(self) -> &'static str {
        match self {
            Kind::Msg => "msg",
            Kind::Sem => "sem",
            Kind::Shm => "shm",
        }
    }

    /// The `ipcrm` option that removes one by id.
    fn ipcrm(self) -> &'static str {
        match self {
            Kind::Msg => "-q",
            Kind::Sem => "-s",
            Kind::Shm => "-m",
        }
    }

    /// `IPC_RMID`.
    fn remove(self, id: i32) -> std::io::Result<()> {
        match self {
            Kind::Msg => sys::msg_rmid(id),
            Kind::Sem => sys::sem_rmid(id),
            Kind::Shm => sys::shm_rmid(id),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Msg => "message queue",
            Kind::Sem => "semaphore set",
            Kind::Shm => "shared memory segment",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("SysV {kind} {id} (key {key:#x}): cannot {what}")]
    Object {
        kind: Kind,
        id: i32,
        key: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "SysV {kind} {id} (key {key:#x}) of the image already exists on this host \
         (the dumped one left running, or another program's); remove it \
         (`ipcrm {} {id}`) or restore elsewhere",
        kind.ipcrm()
    )]
    Exists { kind: Kind, id: i32, key: i32 },
    #[error(
        "SysV {kind} {id} of the image has key {key:#x}, which {kind} {other} of this \
         host has; remove it (`ipcrm {} {other}`) or restore elsewhere",
        kind.ipcrm()
    )]
    KeyTaken {
        kind: Kind,
        id: i32,
        key: i32,
        other: i32,
    },
    #[error("--ipc-key {key:#x}: no SysV message queue, semaphore set or shared memory segment has this key")]
    NoSuchKey { key: i32 },
    #[error("process {pid} runs in another IPC namespace than cr-migrate, which cannot dump {what} there yet")]
    OtherNamespace { pid: i32, what: String },
    #[error("SysV IPC: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image: ipc.img: {what}")]
    Invalid { what: String },
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl IpcError {
    fn object(
        kind: Kind,
        id: i32,
        key: i32,
        what: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> IpcError {
        let what = what.into();
        move |source| IpcError::Object {
            kind,
            id,
            key,
            what,
            source,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IpcError {
    let what = what.into();
    move |source| IpcError::Io { what, source }
}

/// Which objects a dump saves (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Every object of any kind with one of these keys.
    pub keys: Vec<i32>,
    /// Segments attached by the tree.
    pub shm_ids: BTreeSet<i32>,
    /// Tasks that attached them: they must share our IPC namespace.
    pub attachers: Vec<i32>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.shm_ids.is_empty()
    }
}

/// Whether `pid` shares our IPC namespace.
fn same_namespace(pid: i32) -> Result<bool, IpcError> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| {
        std::fs::metadata(&p)
            .map(|m| (m.dev(), m.ino()))
            .map_err(io(format!("stat {p}")))
    };
    Ok(ino(format!("/proc/{pid}/ns/ipc"))? == ino("/proc/self/ns/ipc".into())?)
}

/// The objects a dump saved, to remove once the tree is killed.
#[derive(Debug, Default)]
pub struct Saved {
    objects: Vec<(Kind, i32, i32)>,
}

impl Saved {
    /// How many objects were saved.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Removes every saved object (`IPC_RMID`); a segment still attached
    /// by a process outside the tree is only marked for deletion. Failures
    /// are logged: the image is complete whatever happens here.
    pub fn remove(&self) {
        for &(kind, id, key) in &self.objects {
            match kind.remove(id) {
                Ok(()) => tracing::debug!(%kind, id, "removed after the dump"),
                // Gone already (a marked segment whose last user exited).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => tracing::warn!(
                    "SysV {kind} {id} (key {key:#x}) saved in the image could not be removed: {e}"
                ),
            }
        }
    }
}

fn perm(p: &sys::Perm, id: i32) -> IpcPerm {
    IpcPerm {
        key: p.key,
        id,
        uid: p.uid,
        gid: p.gid,
        cuid: p.cuid,
        cgid: p.cgid,
        mode: p.mode,
    }
}

/// Saves the objects of `sel` into `image` (`ipc.img` and the segments'
/// pages), for the tree of `pid` (frozen). Writes nothing when there is
/// nothing to save.
pub fn dump(image: &ImageDir, pid: i32, sel: &Selection) -> Result<Saved, IpcError> {
    if sel.is_empty() {
        return Ok(Saved::default());
    }
    if !sel.keys.is_empty() && !same_namespace(pid)? {
        return Err(IpcError::OtherNamespace {
            pid,
            what: "the objects named by --ipc-key".into(),
        });
    }
    for &task in &sel.attachers {
        if !same_namespace(task)? {
            return Err(IpcError::OtherNamespace {
                pid: task,
                what: "the SysV shared memory it attached".into(),
            });
        }
    }
    let mut wanted: BTreeSet<(Kind, i32)> = sel.shm_ids.iter().map(|&id| (Kind::Shm, id)).collect();
    for &key in &sel.keys {
        let mut found = false;
        for kind in [Kind::Msg, Kind::Sem, Kind::Shm] {
            let tab = table::read(kind)
                .map_err(io(format!("read /proc/sysvipc/{}", kind.proc_name())))?;
            for e in tab
                .iter()
                .filter(|e| e.key == key && key != sys::IPC_PRIVATE)
            {
                wanted.insert((kind, e.id));
                found = true;
            }
        }
        if !found {
            return Err(IpcError::NoSuchKey { key });
        }
    }
    let mut core = IpcCore::default();
    let mut saved = Saved::default();
    for (kind, id) in wanted {
        let key = match kind {
            Kind::Msg => msg::dump(id, &mut core)?,
            Kind::Sem => sem::dump(id, &mut core)?,
            Kind::Shm => shm::dump(image, id, &mut core)?,
        };
        saved.objects.push((kind, id, key));
    }
    image.write_ipc(&core)?;
    tracing::debug!(
        queues = core.queues.len(),
        messages = core.messages.len(),
        sem_sets = core.sem_sets.len(),
        segments = core.segments.len(),
        "SysV IPC saved"
    );
    Ok(saved)
}

/// Every object of the image, checked: kind, key, id.
fn objects(core: &IpcCore) -> Result<Vec<(Kind, i32, i32)>, IpcError> {
    let mut out = Vec::new();
    let p = |perm: &Option<IpcPerm>, kind: Kind| {
        perm.as_ref()
            .map(|p| (kind, p.id, p.key))
            .ok_or_else(|| IpcError::Invalid {
                what: format!("a {kind} has no ipc_perm"),
            })
    };
    for q in &core.queues {
        out.push(p(&q.perm, Kind::Msg)?);
    }
    for s in &core.sem_sets {
        out.push(p(&s.perm, Kind::Sem)?);
    }
    for s in &core.segments {
        out.push(p(&s.perm, Kind::Shm)?);
    }
    let mut seen = BTreeSet::new();
    for &(kind, id, _) in &out {
        if id < 0 || !seen.insert((kind, id)) {
            return Err(IpcError::Invalid {
                what: format!("{kind} id {id} is negative or appears twice"),
            });
        }
    }
    Ok(out)
}

/// Refuses an image whose objects' ids or keys are taken on this host.
pub fn preflight(image: &ImageDir) -> Result<(), IpcError> {
    let Some(core) = image.read_ipc()? else {
        return Ok(());
    };
    check_free(&objects(&core)?)
}

fn check_free(objs: &[(Kind, i32, i32)]) -> Result<(), IpcError> {
    for kind in [Kind::Msg, Kind::Sem, Kind::Shm] {
        let tab =
            table::read(kind).map_err(io(format!("read /proc/sysvipc/{}", kind.proc_name())))?;
        for &(k, id, key) in objs.iter().filter(|o| o.0 == kind) {
            if tab.iter().any(|e| e.id == id) {
                return Err(IpcError::Exists { kind: k, id, key });
            }
            if let Some(e) = tab.iter().find(|e| key != sys::IPC_PRIVATE && e.key == key) {
                return Err(IpcError::KeyTaken {
                    kind: k,
                    id,
                    key,
                    other: e.id,
                });
            }
        }
    }
    Ok(())
}

/// The objects a restore created. Dropped before [`Restored::attached`],
/// it removes them all (the restore failed).
#[derive(Debug, Default)]
pub struct Restored {
    created: Vec<(Kind, i32)>,
    /// Segments to mark for deletion once attached.
    doomed: Vec<i32>,
}

impl Restored {
    /// Objects created.
    pub fn len(&self) -> usize {
        self.created.len()
    }

    pub fn is_empty(&self) -> bool {
        self.created.is_empty()
    }

    /// Every task has attached its segments: marks those that were marked
    /// for deletion at the dump, and keeps everything.
    pub fn attached(mut self) -> Result<(), IpcError> {
        for &id in &self.doomed {
            sys::shm_rmid(id).map_err(IpcError::object(
                Kind::Shm,
                id,
                0,
                "mark it for deletion again",
            ))?;
        }
        // Kept: nothing for the drop to remove.
        self.created.clear();
        Ok(())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        for &(kind, id) in self.created.iter().rev() {
            if let Err(e) = kind.remove(id) {
                tracing::warn!("could not remove SysV {kind} {id} of a failed restore: {e}");
            }
        }
    }
}

/// Creates every object of the image (none: an empty [`Restored`]).
/// `attached`: the segment ids the tasks' VMAs attach, each of which must
/// be a segment of the image (never one that happens to exist here).
pub fn restore(
    image: &ImageDir,
    attached: impl IntoIterator<Item = i32>,
) -> Result<Restored, IpcError> {
    let mut out = Restored::default();
    let core = image.read_ipc()?.unwrap_or_default();
    for id in attached {
        let known = core
            .segments
            .iter()
            .any(|s| s.perm.as_ref().is_some_and(|p| p.id == id));
        if !known {
            return Err(IpcError::Invalid {
                what: format!("a task attaches SysV segment {id}, which ipc.img lacks"),
            });
        }
    }
    check_free(&objects(&core)?)?;
    msg::check_messages(&core)?;
    if !core.segments.is_empty()
        && std::fs::read_to_string("/proc/sys/kernel/shm_rmid_forced")
            .is_ok_and(|v| v.trim() != "0")
    {
        tracing::warn!(
            "kernel.shm_rmid_forced is set: restored segments that no task attaches are \
             destroyed when cr-migrate exits"
        );
    }
    for q in &core.queues {
        msg::restore(q, &core.messages, &mut out.created)?;
    }
    for s in &core.sem_sets {
        sem::restore(s, &mut out.created)?;
    }
    for s in &core.segments {
        let (id, doomed) = shm::restore(image, s, &mut out.created)?;
        if doomed {
            out.doomed.push(id);
        }
    }
    Ok(out)
}

/// Creates an object with exactly `want`'s id: sets `NAME_next_id`, calls
/// `get`, and checks the id it got (removing a wrong one).
fn create_with_id(
    kind: Kind,
    want: &IpcPerm,
    get: impl FnOnce() -> std::io::Result<i32>,
) -> Result<i32, IpcError> {
    let (id, key) = (want.id, want.key);
    sys::set_next_id(kind.proc_name(), id).map_err(IpcError::object(
        kind,
        id,
        key,
        format!("write /proc/sys/kernel/{}_next_id", kind.proc_name()),
    ))?;
    let got = get();
    if got.is_err() {
        let _ = sys::set_next_id(kind.proc_name(), -1);
    }
    let got = got.map_err(|source| match source.raw_os_error() {
        Some(libc::EEXIST) => IpcError::KeyTaken {
            kind,
            id,
            key,
            // Created since the check: look it up for the message.
            other: table::read(kind)
                .ok()
                .and_then(|t| t.iter().find(|e| e.key == key).map(|e| e.id))
                .unwrap_or(-1),
        },
        _ => IpcError::Object {
            kind,
            id,
            key,
            what: "create it".into(),
            source,
        },
    })?;
    if got != id {
        let _ = kind.remove(got);
        return Err(IpcError::Object {
            kind,
            id,
            key,
            what: format!(
                "create it with its id (got {got}: another program created one meanwhile?)"
            ),
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    Ok(id)
}

/// The flags of `*get`: create, exclusively, with the permission bits.
fn create_flags(p: &IpcPerm) -> i32 {
    libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & sys::MODE_BITS) as i32
}

/// The owner part of `p` for `IPC_SET`.
fn owner(p: &IpcPerm) -> sys::Perm {
    sys::Perm {
        key: p.key,
        uid: p.uid,
        gid: p.gid,
        mode: p.mode,
        ..Default::default()
    }
}

/// One line per object of `core`, for `cr-migrate show`.
pub fn describe(core: &IpcCore) -> Vec<String> {
    let p = |perm: &Option<IpcPerm>| {
        let p = perm.unwrap_or_default();
        format!(
            "{} key {:#x} owner {}:{} mode {:o}",
            p.id,
            p.key as u32,
            p.uid,
            p.gid,
            p.mode & sys::MODE_BITS
        )
    };
    let mut out = Vec::new();
    for q in &core.queues {
        let id = q.perm.as_ref().map_or(-1, |p| p.id);
        let bytes: usize = core
            .messages
            .iter()
            .filter(|m| m.queue_id == id)
            .map(|m| m.data.len())
            .sum();
        out.push(format!(
            "message queue {}: {} message(s), {bytes} bytes, limit {}",
            p(&q.perm),
            q.nr_messages,
            q.qbytes
        ));
    }
    for s in &core.sem_sets {
        out.push(format!(
            "semaphore set {}: values {:?}",
            p(&s.perm),
            s.values
        ));
    }
    for s in &core.segments {
        let mode = s.perm.as_ref().map_or(0, |p| p.mode);
        out.push(format!(
            "shared memory segment {}: {} bytes{}{}",
            p(&s.perm),
            s.size,
            if mode & sys::SHM_DEST != 0 {
                ", marked for deletion"
            } else {
                ""
            },
            if mode & sys::SHM_LOCKED != 0 {
                ", locked"
            } else {
                ""
            }
        ));
    }
    out
}
