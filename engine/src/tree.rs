//! The shape of a process tree: who creates whom at restore, and how each
//! task gets its session and process group back. Pure functions over the
//! `tree.img` entries: restore plans with them, and dump runs the same plan
//! to refuse, before touching anything, a tree restore could not rebuild.
//!
//! Rules (CRIU's, simplified; no helper tasks):
//! - A task is created by its original parent. A task whose parent is not in
//!   the tree, or is a zombie, or is itself (a damaged image), is created by
//!   the root: an orphan is adopted by the root. (A dump finds tasks through
//!   `/proc/PID/task/TID/children`, so only the root has a parent outside the
//!   tree; orphans below a root that is a child subreaper are its children
//!   already.)
//! - Fork inherits session and group. A session leader (`sid == pid`) calls
//!   `setsid()` before it creates its children; any other task must be in
//!   the session of its creator. A group leader calls `setpgid(0, 0)` at the
//!   same time.
//! - Once every task exists, tasks in another task's group join it with
//!   `setpgid(0, pgid)`; zombies exit only after that, so a zombie can lead
//!   a group.
//! - A group whose leader is not in the tree (it exited and was reaped, its
//!   members live on) gets a *helper*: a task with the group's ID created by
//!   the root, which leads the group until its members joined, then exits
//!   and is reaped by the root before anything else runs. So the group must
//!   be in the root's session.
//! - A session whose leader is gone gets a *session helper* the same way,
//!   which calls `setsid()` and creates the members of that session; when
//!   it exits they go back to their original parent, the root, which must
//!   therefore be a child subreaper (the daemon pattern: a child of a
//!   subreaper forks, calls `setsid()`, forks the daemon and exits). Other
//!   sessions whose leader is not in the tree cannot be rebuilt, except the
//!   shell job's: with `shell_job`, the root's own session (and its group,
//!   if it does not lead one) stand for the restorer's.
use crate::image::MAX_TREE_TASKS;
use crm_proto::image::TreeTask;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A tree restore cannot rebuild: the task and why.
#[derive(Debug, thiserror::Error)]
#[error("task {pid}: {what}")]
pub struct ShapeError {
    pub pid: i32,
    pub what: String,
}

fn err(pid: i32, what: impl Into<String>) -> ShapeError {
    ShapeError {
        pid,
        what: what.into(),
    }
}

/// How a task gets its process group back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// It leads its group: `setpgid(0, 0)` when created (nothing more for a
    /// session leader).
    Lead,
    /// It joins the group of tree task `pgid` once every task exists.
    Join(i32),
    /// It stays in (or joins) the restorer's group: a shell job's group.
    Restorer,
}

/// One task in creation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeTask {
    pub pid: i32,
    /// Index of the task that creates it; `None` for the root.
    pub parent: Option<usize>,
    /// Indexes of the tasks it creates, in creation order.
    pub children: Vec<usize>,
    /// `setsid()` before creating the children.
    pub new_session: bool,
    pub group: Group,
    /// A zombie: the raw wait status it must exit with.
    pub zombie: Option<i32>,
    /// Signal its parent gets when it exits.
    pub exit_signal: i32,
    /// Its thread IDs (main thread first); empty for a zombie or a helper.
    pub threads: Vec<i32>,
    /// Not in the image: a helper holding the ID of a group whose leader
    /// is gone (see the module docs).
    pub helper: bool,
}

impl ShapeTask {
    /// A task of the image that runs again after the restore.
    pub fn restored(&self) -> bool {
        self.zombie.is_none() && !self.helper
    }
}

/// The tree in creation order: every parent before its children, root first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub tasks: Vec<ShapeTask>,
}

impl Shape {
    /// Every PID and TID the tree needs, zombies included.
    pub fn all_ids(&self) -> impl Iterator<Item = i32> + '_ {
        self.tasks.iter().flat_map(|t| {
            std::iter::once(t.pid).chain(t.threads.iter().copied().filter(move |&x| x != t.pid))
        })
    }

    /// Indexes of `i` and every task it creates, directly or not.
    pub fn subtree(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut k = 0;
        while k < out.len() {
            out.extend(self.tasks[out[k]].children.iter().copied());
            k += 1;
        }
        out
    }
}

/// Checks `entries` (a `tree.img`) and plans how to recreate the tree.
pub fn plan(entries: &[TreeTask], root: i32, shell_job: bool) -> Result<Shape, ShapeError> {
    if entries.len() as u64 > MAX_TREE_TASKS {
        return Err(err(
            root,
            format!("the tree has more than {MAX_TREE_TASKS} tasks"),
        ));
    }
    let mut index = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        if e.pid < 1 {
            return Err(err(e.pid, "invalid pid"));
        }
        if index.insert(e.pid, i).is_some() {
            return Err(err(e.pid, "listed twice"));
        }
        if !(0..=64).contains(&e.exit_signal) {
            return Err(err(e.pid, format!("invalid exit signal {}", e.exit_signal)));
        }
        if e.zombie {
            if !e.threads.is_empty() {
                return Err(err(e.pid, "a zombie with threads"));
            }
        } else if e.threads.first() != Some(&e.pid) {
            return Err(err(e.pid, "the first thread is not the main thread"));
        }
        for &t in std::iter::once(&e.pid).chain(e.threads.iter().skip(1)) {
            if t < 1 || !ids.insert(t) {
                return Err(err(
                    e.pid,
                    format!("thread ID {t} is invalid or used twice"),
                ));
            }
        }
    }
    let root_i = *index
        .get(&root)
        .ok_or_else(|| err(root, "the root is not in the tree"))?;
    if entries[root_i].zombie {
        return Err(err(root, "the root is a zombie"));
    }

    // Creators: the original parent if it can create children, else the root.
    let mut parent: Vec<Option<usize>> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if i == root_i {
                return None;
            }
            match index.get(&e.ppid) {
                Some(&p) if p != i && !entries[p].zombie => Some(p),
                _ => Some(root_i),
            }
        })
        .collect();
    // Tasks not reachable from the root (a cycle in a damaged image) are
    // adopted by the root, one at a time, until every task is reachable.
    loop {
        let order = bfs(&parent, root_i);
        if order.len() == entries.len() {
            break;
        }
        let reached: BTreeSet<usize> = order.into_iter().collect();
        let first = (0..entries.len())
            .find(|i| !reached.contains(i))
            .expect("some task is unreached");
        parent[first] = Some(root_i);
    }
    let root_e = &entries[root_i];
    if root_e.sid != root_e.pid && !shell_job {
        return Err(err(
            root,
            format!(
                "the root is not a session leader (session {}) and the tree is not a shell job",
                root_e.sid
            ),
        ));
    }

    // Helpers, as entries after the image's: a session helper creates the
    // root's children that are in a session whose leader is gone (when the
    // root is a child subreaper, they come back to it when the helper
    // exits); a group helper, created by the root, holds a group of the
    // root's session whose leader is gone.
    let mut all: Vec<TreeTask> = entries.to_vec();
    let mut helper_of: BTreeMap<i32, usize> = BTreeMap::new();
    let mut helper_pids = BTreeSet::new();
    let free = |id: i32| id > 0 && !ids.contains(&id);
    let mut add_helper = |all: &mut Vec<TreeTask>, parent: &mut Vec<Option<usize>>, id, sid| {
        *helper_of.entry(id).or_insert_with(|| {
            all.push(TreeTask {
                pid: id,
                ppid: root,
                pgid: id,
                sid,
                exit_signal: libc::SIGCHLD,
                ..Default::default()
            });
            parent.push(Some(root_i));
            all.len() - 1
        })
    };
    for i in 0..entries.len() {
        let e = &entries[i];
        let Some(p) = parent[i] else { continue };
        if e.sid != e.pid
            && e.sid != entries[p].sid
            && p == root_i
            && root_e.child_subreaper
            && free(e.sid)
        {
            parent[i] = Some(add_helper(&mut all, &mut parent, e.sid, e.sid));
            helper_pids.insert(e.sid);
        }
    }
    for e in entries {
        let shell_group = shell_job && e.pgid == root_e.pgid && e.sid == root_e.sid;
        let led = index.contains_key(&e.pgid) || helper_pids.contains(&e.pgid);
        if !led && !shell_group && e.sid == root_e.sid && free(e.pgid) {
            add_helper(&mut all, &mut parent, e.pgid, root_e.sid);
            helper_pids.insert(e.pgid);
        }
    }
    let helper_of: BTreeMap<i32, usize> = all
        .iter()
        .enumerate()
        .skip(entries.len())
        .map(|(i, h)| (h.pid, i))
        .collect();
    let helper = |i: usize| i >= entries.len();

    let order = bfs(&parent, root_i);
    let pos: BTreeMap<usize, usize> = order.iter().enumerate().map(|(n, &i)| (i, n)).collect();
    let mut tasks = Vec::with_capacity(order.len());
    for &i in &order {
        let e = &all[i];
        let new_session = e.sid == e.pid;
        if new_session && e.pgid != e.pid {
            return Err(err(e.pid, format!("a session leader in group {}", e.pgid)));
        }
        if let Some(p) = parent[i] {
            let pe = &all[p];
            if !new_session && e.sid != pe.sid {
                return Err(err(
                    e.pid,
                    format!(
                        "it is in session {} but is created by task {} of session {}; \
                         sessions whose leader is outside the tree are restored only for \
                         children of a root that is a child subreaper",
                        e.sid, pe.pid, pe.sid
                    ),
                ));
            }
        }
        let leader = index
            .get(&e.pgid)
            .copied()
            .or_else(|| helper_of.get(&e.pgid).copied());
        let group = if e.pgid == e.pid {
            Group::Lead
        } else if let Some(l) = leader {
            if all[l].sid != e.sid {
                return Err(err(
                    e.pid,
                    format!("its group {} is led by a task of another session", e.pgid),
                ));
            }
            Group::Join(e.pgid)
        } else if shell_job && e.pgid == root_e.pgid && e.sid == root_e.sid {
            Group::Restorer
        } else {
            return Err(err(
                e.pid,
                format!(
                    "its process group {} has no leader in the tree and is not in the \
                     root's session (session {}), where a helper task could hold it",
                    e.pgid, e.sid
                ),
            ));
        };
        tasks.push(ShapeTask {
            pid: e.pid,
            parent: parent[i].map(|p| pos[&p]),
            children: Vec::new(),
            new_session,
            group,
            zombie: e.zombie.then_some(e.exit_status),
            exit_signal: e.exit_signal,
            threads: e.threads.clone(),
            helper: helper(i),
        });
    }
    for n in 0..tasks.len() {
        if let Some(p) = tasks[n].parent {
            tasks[p].children.push(n);
        }
    }
    Ok(Shape { tasks })
}

/// Indexes reachable from `root` through `parent` links, breadth first,
/// children in entry order.
fn bfs(parent: &[Option<usize>], root: usize) -> Vec<usize> {
    let mut children = vec![Vec::new(); parent.len()];
    for (i, p) in parent.iter().enumerate() {
        if let Some(p) = p {
            children[*p].push(i);
        }
    }
    let mut out = Vec::new();
    let mut seen = vec![false; parent.len()];
    let mut queue = VecDeque::from([root]);
    seen[root] = true;
    while let Some(i) = queue.pop_front() {
        out.push(i);
        for &c in &children[i] {
            if !seen[c] {
                seen[c] = true;
                queue.push_back(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: i32, ppid: i32, pgid: i32, sid: i32) -> TreeTask {
        TreeTask {
            pid,
            ppid,
            pgid,
            sid,
            threads: vec![pid],
            exit_signal: libc::SIGCHLD,
            ..Default::default()
        }
    }

    fn zombie(pid: i32, ppid: i32, pgid: i32, sid: i32, status: i32) -> TreeTask {
        TreeTask {
            threads: vec![],
            zombie: true,
            exit_status: status,
            ..task(pid, ppid, pgid, sid)
        }
    }

    #[test]
    fn parents_before_children_and_groups() {
        // 10 root/session; 12 (created before its group leader 13) joins 13;
        // 14 leads a new session with child 15 in it.
        let entries = vec![
            task(10, 1, 10, 10),
            task(15, 14, 15, 14),
            task(12, 10, 13, 10),
            task(13, 10, 13, 10),
            task(14, 10, 14, 14),
            zombie(16, 10, 10, 10, 7 << 8),
        ];
        let s = plan(&entries, 10, false).unwrap();
        let pids: Vec<i32> = s.tasks.iter().map(|t| t.pid).collect();
        assert_eq!(pids, vec![10, 12, 13, 14, 16, 15]);
        assert_eq!(s.tasks[0].parent, None);
        assert!(s.tasks[0].new_session);
        assert_eq!(s.tasks[1].group, Group::Join(13));
        assert_eq!(s.tasks[2].group, Group::Lead);
        assert!(s.tasks[3].new_session);
        assert_eq!(s.tasks[5].parent, Some(3));
        assert_eq!(s.tasks[5].group, Group::Lead);
        assert_eq!(s.tasks[4].zombie, Some(7 << 8));
        assert_eq!(s.tasks[0].children, vec![1, 2, 3, 4]);
        assert_eq!(s.subtree(3), vec![3, 5]);
        assert_eq!(s.all_ids().count(), 6);
    }

    #[test]
    fn a_helper_holds_a_group_whose_leader_is_gone() {
        let entries = vec![
            task(10, 1, 10, 10),
            task(11, 10, 77, 10),
            task(12, 10, 77, 10),
        ];
        let s = plan(&entries, 10, false).unwrap();
        assert_eq!(s.tasks.len(), 4);
        let h = &s.tasks[3];
        assert!(h.helper && !h.restored() && h.pid == 77 && h.group == Group::Lead);
        assert_eq!(h.parent, Some(0));
        assert_eq!(s.tasks[0].children, vec![1, 2, 3]);
        assert_eq!(s.tasks[1].group, Group::Join(77));
        assert!(s.all_ids().any(|i| i == 77));
        // A group ID that is some task's thread ID cannot be a helper's.
        let mut t = task(12, 10, 12, 10);
        t.threads = vec![12, 77];
        assert!(plan(&[task(10, 1, 10, 10), task(11, 10, 77, 10), t], 10, false).is_err());
    }

    #[test]
    fn a_session_helper_creates_the_members_of_a_dead_session() {
        let mut root = task(10, 1, 10, 10);
        root.child_subreaper = true;
        // 11 and 12: daemons in session 99 (leader gone), children of the root;
        // 13: a child of 11.
        let entries = vec![
            root.clone(),
            task(11, 10, 99, 99),
            task(12, 10, 12, 99),
            task(13, 11, 99, 99),
        ];
        let s = plan(&entries, 10, false).unwrap();
        let by_pid = |p: i32| s.tasks.iter().position(|t| t.pid == p).unwrap();
        let h = &s.tasks[by_pid(99)];
        assert!(h.helper && h.new_session && h.parent == Some(0));
        assert_eq!(s.tasks[by_pid(11)].parent, Some(by_pid(99)));
        assert_eq!(s.tasks[by_pid(12)].parent, Some(by_pid(99)));
        assert_eq!(s.tasks[by_pid(13)].parent, Some(by_pid(11)));
        assert_eq!(s.tasks[by_pid(11)].group, Group::Join(99));
        assert_eq!(s.tasks[by_pid(12)].group, Group::Lead);
        for (n, t) in s.tasks.iter().enumerate() {
            assert!(t.parent.is_none_or(|p| p < n), "parent after child");
        }
        // Without a subreaper root they would not come back to it: refused.
        root.child_subreaper = false;
        let entries = vec![root, task(11, 10, 99, 99)];
        assert_eq!(plan(&entries, 10, false).unwrap_err().pid, 11);
    }

    #[test]
    fn orphans_and_cycles_are_adopted_by_the_root() {
        let entries = vec![
            task(10, 1, 10, 10),
            task(20, 999, 10, 10), // parent outside the tree
            task(30, 31, 10, 10),  // 30 and 31 are each other's parent
            task(31, 30, 10, 10),
            task(40, 41, 10, 10), // parent is a zombie
            zombie(41, 10, 10, 10, 0),
        ];
        let s = plan(&entries, 10, false).unwrap();
        let by_pid = |p: i32| s.tasks.iter().find(|t| t.pid == p).unwrap();
        assert_eq!(by_pid(20).parent, Some(0));
        assert_eq!(by_pid(40).parent, Some(0));
        assert_eq!(by_pid(30).parent, Some(0));
        let i30 = s.tasks.iter().position(|t| t.pid == 30).unwrap();
        assert_eq!(by_pid(31).parent, Some(i30));
        for (n, t) in s.tasks.iter().enumerate() {
            if let Some(p) = t.parent {
                assert!(p < n, "parent after child");
            }
        }
    }

    #[test]
    fn refusals_name_the_task() {
        // Session of a task that is neither its own nor its creator's.
        let e = plan(&[task(10, 1, 10, 10), task(11, 10, 11, 99)], 10, false).unwrap_err();
        assert_eq!(e.pid, 11);
        // Group without a leader in the tree, outside the root's session.
        let e = plan(
            &[
                task(10, 1, 10, 10),
                task(12, 10, 12, 12),
                task(11, 12, 77, 12),
            ],
            10,
            false,
        )
        .unwrap_err();
        assert!(e.what.contains("77") && e.pid == 11, "{e}");
        // Not a session leader without --shell-job.
        assert!(plan(&[task(10, 1, 10, 5)], 10, false).is_err());
        // Shell job: the root's session and group stand for the restorer's.
        let s = plan(&[task(10, 1, 5, 5), task(11, 10, 5, 5)], 10, true).unwrap();
        assert_eq!(s.tasks[1].group, Group::Restorer);
        // Damaged entries.
        assert!(plan(&[task(10, 1, 10, 10), task(10, 1, 10, 10)], 10, false).is_err());
        assert!(plan(&[task(10, 1, 10, 10)], 11, false).is_err());
        let mut t = task(11, 10, 10, 10);
        t.threads = vec![12, 11];
        assert!(plan(&[task(10, 1, 10, 10), t], 10, false).is_err());
        let mut t = task(11, 10, 10, 10);
        t.threads = vec![11, 10];
        assert!(plan(&[task(10, 1, 10, 10), t], 10, false).is_err());
        assert!(plan(&[zombie(10, 1, 10, 10, 0)], 10, false).is_err());
    }
}
