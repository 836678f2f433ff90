//! Freezing a whole process tree for a dump.
//!
//! [`discover`] lists the tasks below a root without stopping anything (for
//! the refusals a dump makes before touching the tree). [`FrozenTree::freeze`]
//! seizes the root, then each task found in the children lists of frozen
//! tasks (`/proc/PID/task/TID/children`): a frozen task cannot fork, so its
//! list is final; the lists are read again at the end until no new task
//! appears (a task that exited while we froze its siblings may have had its
//! children reparented to a subreaper root). Zombies are recorded with their
//! wait status, not seized. Dropping a [`FrozenTree`] resumes every task;
//! [`FrozenTree::kill`] kills them and has each parent reap its children.
use super::DumpError;
use crate::files;
use crate::freeze::{FreezeError, FrozenProcess};
use crate::procfs::{self, ProcError};
use crate::remote::{RemoteError, RemoteThread};
use crm_proto::image::{FilesCore, TreeTask};
use std::collections::{BTreeSet, VecDeque};

fn gone(e: &ProcError) -> bool {
    e.is_not_found()
}

/// The tasks below `root` (root first, parents before children), with
/// their `/proc/PID/stat`, read without freezing. Tasks that vanish while
/// being listed are left out.
pub fn discover(root: i32) -> Result<Vec<procfs::Stat>, DumpError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        let stat = match procfs::read_stat(pid) {
            Ok(s) => s,
            Err(e) if gone(&e) && pid != root => continue,
            Err(e) if gone(&e) => return Err(FreezeError::NoSuchProcess { pid }.into()),
            Err(e) => return Err(e.into()),
        };
        if stat.state != 'Z' {
            match procfs::list_children(pid) {
                Ok(children) => {
                    for c in children {
                        if seen.insert(c) {
                            queue.push_back(c);
                        }
                    }
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        out.push(stat);
    }
    Ok(out)
}

/// The descriptors of the tasks `pids` (of one tree), linked: what they
/// share is marked and what the tree cannot restore is refused
/// ([`crate::files::shared`]). One record per task, in the order of `pids`.
pub fn dump_files(pids: &[i32]) -> Result<Vec<FilesCore>, DumpError> {
    let mut tasks = pids
        .iter()
        .map(|&p| files::collect(p))
        .collect::<Result<Vec<_>, _>>()?;
    files::shared::link(&mut tasks)?;
    Ok(tasks.into_iter().map(|t| t.files).collect())
}

/// The tree entry of a task from its stat (threads filled in by the caller).
fn entry(stat: &procfs::Stat, zombie: bool) -> TreeTask {
    TreeTask {
        pid: stat.pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        threads: Vec::new(),
        exit_signal: stat.exit_signal,
        zombie,
        exit_status: if zombie { stat.exit_code } else { 0 },
        // Known once the task's state is collected.
        child_subreaper: false,
    }
}

/// Every live task of a tree frozen, and the tree record.
#[derive(Debug)]
pub struct FrozenTree {
    /// The live tasks, root first, parents before children.
    pub tasks: Vec<FrozenProcess>,
    /// Every task (zombies included), in the order they were found.
    pub entries: Vec<TreeTask>,
}

impl FrozenTree {
    /// Freezes `root` and every task below it. Any error resumes what was
    /// frozen so far.
    pub fn freeze(root: i32) -> Result<FrozenTree, DumpError> {
        let mut tree = FrozenTree {
            tasks: Vec::new(),
            entries: Vec::new(),
        };
        let mut seen = BTreeSet::from([root]);
        let mut queue = VecDeque::from([root]);
        loop {
            while let Some(pid) = queue.pop_front() {
                let Some(children) = tree.freeze_one(pid, pid == root)? else {
                    continue;
                };
                queue.extend(children.into_iter().filter(|c| seen.insert(*c)));
            }
            // Frozen tasks cannot fork, but one that was still running
            // while we froze the others may have exited and left children
            // to a subreaper among the frozen ones.
            for f in &tree.tasks {
                let children = procfs::list_children(f.pid())?;
                queue.extend(children.into_iter().filter(|c| seen.insert(*c)));
            }
            if queue.is_empty() {
                break;
            }
        }
        tracing::debug!(
            root,
            tasks = tree.tasks.len(),
            zombies = tree.entries.len() - tree.tasks.len(),
            "tree frozen"
        );
        Ok(tree)
    }

    /// Freezes `pid` (or records it as a zombie). Returns its children, or
    /// `None` if it vanished or is a zombie.
    fn freeze_one(&mut self, pid: i32, is_root: bool) -> Result<Option<Vec<i32>>, DumpError> {
        let zombie_now = |tree: &mut FrozenTree| -> Result<bool, DumpError> {
            match procfs::read_stat(pid) {
                Ok(s) if s.state == 'Z' && !is_root => {
                    tree.entries.push(entry(&s, true));
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(e) if gone(&e) && !is_root => Ok(true),
                Err(e) => Err(e.into()),
            }
        };
        if zombie_now(self)? {
            return Ok(None);
        }
        let frozen = match FrozenProcess::freeze(pid) {
            Ok(f) => f,
            Err(FreezeError::NoSuchProcess { .. }) if !is_root => {
                // It exited while being seized: gone, or a zombie now.
                zombie_now(self)?;
                return Ok(None);
            }
            Err(e @ (FreezeError::Zombie { .. } | FreezeError::Seize { .. })) => {
                // It exited between the check and the seize.
                if zombie_now(self)? {
                    return Ok(None);
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let stat = procfs::read_stat(pid)?;
        let mut e = entry(&stat, false);
        e.threads = frozen.threads().iter().map(|t| t.tid).collect();
        let children = procfs::list_children(pid)?;
        self.tasks.push(frozen);
        self.entries.push(e);
        Ok(Some(children))
    }

    /// Resumes every task as it was.
    pub fn thaw(self) -> std::io::Result<()> {
        let mut first = None;
        for f in self.tasks {
            let pid = f.pid();
            if let Err(e) = f.thaw() {
                tracing::warn!(pid, error = %e, "could not resume every thread");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Kills every task, children first, and waits until each is dead.
    /// Before a task is killed it reaps its own (dead) children with a
    /// remote `wait4`, so the dump leaves no zombie behind but the root's,
    /// which its real parent reaps: killed tasks whose parents died first
    /// would be adopted by a subreaper or by PID 1, which may never reap
    /// them, and their PIDs would stay taken.
    pub fn kill(self) -> std::io::Result<()> {
        let mut first = None;
        for f in self.tasks.into_iter().rev() {
            match reap_children(&f) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(pid = f.pid(), reaped = n, "children reaped"),
                Err(e) => tracing::warn!(pid = f.pid(), error = %e, "could not reap the children"),
            }
            if let Err(e) = f.kill() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Makes the frozen task `f` reap every child that is a zombie (`wait4(-1,
/// WNOHANG | __WALL)` until none is left); returns how many it reaped.
fn reap_children(f: &FrozenProcess) -> Result<usize, DumpError> {
    let pid = f.pid();
    if procfs::list_children(pid)?.is_empty() {
        return Ok(0);
    }
    let gadget = super::syscall_gadget(pid, &procfs::read_maps(pid)?)?;
    let main = RemoteThread { tid: pid, gadget };
    let flags = (libc::WNOHANG | libc::__WALL) as u64;
    let mut reaped = 0;
    loop {
        match main.syscall(libc::SYS_wait4 as u64, [u64::MAX, 0, flags, 0, 0, 0]) {
            Ok(0) => return Ok(reaped),
            Ok(_) => reaped += 1,
            // ECHILD: no child left.
            Err(RemoteError::Failed { .. }) => return Ok(reaped),
            Err(e) => return Err(e.into()),
        }
    }
}
