//! Iterative pre-copy of a process tree: one [`PreCopy`] per task, run in
//! lockstep, then one freeze of the whole tree.
//!
//! - [`TreePreCopy::start`] makes the tree checks of a dump
//!   ([`dump::precheck_tree`]), then sets up a tracker in each live task.
//! - Each [`TreePreCopy::round`] first takes in the tasks forked since the
//!   last one (their first round copies all their memory) and drops the
//!   tasks that exited, then runs a round in every task.
//! - [`TreePreCopy::finish`] freezes the tree ([`FrozenTree::freeze`]) and
//!   runs the last round of every task; a task forked after the last round
//!   has all its memory copied there, frozen.
//!
//! Shared anonymous memory stays out of the rounds: uffd write protection
//! lives in each task's page tables, so a task's tracker misses the writes
//! its siblings make to memory they share. It is copied once per object in
//! the frozen phase ([`dump::SharedObjects`]), like a tree dump stores it.
//!
//! The objects a dump stores beside the tasks (memfd contents, SysV IPC
//! objects the tree attached) are written, frozen, into a side image
//! directory that the caller sends along ([`dump::TreeObjects`]).
//!
//! A single process is a tree of one task: nothing differs from [`PreCopy`].
use crate::dump::tree::FrozenTree;
use crate::dump::{self, exited, DumpError, DumpOptions, MemStats, PageSink, Target, TaskState};
use crate::image::ImageDir;
use crate::precopy::{PreCopy, PreCopyError, RoundStats, Tracking};
use crm_proto::image::ProcessTree;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where the pages of each task go: the sink of task `pid`.
pub trait TreeSink {
    fn task(&mut self, pid: i32) -> &mut dyn PageSink;
}

/// The last state of one task of the frozen tree.
pub struct TaskFinal {
    pub state: TaskState,
    /// Pages whose contents live in memory now (see
    /// [`crate::precopy::Final::resident`]).
    pub resident: Vec<(u64, u64)>,
}

/// The end of a tree's pre-copy: the frozen tree and what the destination
/// needs besides the pages already sent.
pub struct TreeFinal {
    /// Every live task, frozen, root first (the order of `tasks`).
    pub frozen: FrozenTree,
    pub tasks: Vec<TaskFinal>,
    /// The tree record (zombies included), as a dump writes it.
    pub tree: ProcessTree,
    /// The last round, added up over the tasks.
    pub last_round: RoundStats,
    /// Freeze → every state collected and the last pages handed over.
    pub frozen_for: Duration,
    /// The trackers, still armed: drop them after killing or thawing
    /// `frozen` (see [`crate::precopy::Final::tracking`]).
    pub tracking: Vec<Tracking>,
    /// The SysV objects saved into the side directory: removed here once
    /// the tree is killed (they move with it), as a dump does.
    pub ipc: crate::ipc::Saved,
}

pub struct TreePreCopy {
    root: i32,
    opts: DumpOptions,
    tasks: BTreeMap<i32, PreCopy>,
    round: u32,
}

fn add(total: &mut RoundStats, st: &RoundStats) {
    total.dirty_pages += st.dirty_pages;
    total.mem.add(&st.mem);
    total.new_vmas += st.new_vmas;
}

impl TreePreCopy {
    /// Checks that the tree below `root` can be migrated and sets up dirty
    /// tracking in each of its live tasks.
    pub fn start(root: i32, opts: &DumpOptions) -> Result<TreePreCopy, PreCopyError> {
        dump::precheck_tree(root, opts)?;
        let mut t = TreePreCopy {
            root,
            opts: opts.clone(),
            tasks: BTreeMap::new(),
            round: 0,
        };
        t.take_in_new_tasks()?;
        Ok(t)
    }

    /// The tracker's name (the same kind in every task).
    pub fn tracker_name(&self) -> &'static str {
        self.tasks
            .values()
            .next()
            .map_or("none", PreCopy::tracker_name)
    }

    /// Live tasks tracked now.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Starts tracking the live tasks not tracked yet; forgets those that
    /// exited. Forked tasks are checked like at the start.
    fn take_in_new_tasks(&mut self) -> Result<(), PreCopyError> {
        let live: Vec<i32> = dump::tree::discover(self.root)?
            .into_iter()
            .filter(|s| s.state != 'Z')
            .map(|s| s.pid)
            .collect();
        self.tasks.retain(|pid, _| live.contains(pid));
        let skip_shared = live.len() > 1 || self.round > 0;
        for pid in live {
            if self.tasks.contains_key(&pid) {
                continue;
            }
            if self.round > 0 {
                // Checked by the precheck for the tasks there at the start;
                // what links tasks is checked across the tree when frozen.
                if let Err(e) = crate::files::collect(pid) {
                    if exited(pid) {
                        continue;
                    }
                    return Err(DumpError::from(e).into());
                }
            }
            match PreCopy::start(pid, skip_shared) {
                Ok(p) => {
                    tracing::debug!(pid, round = self.round, "task tracked");
                    self.tasks.insert(pid, p);
                }
                Err(_) if pid != self.root && exited(pid) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs one round in every task while the tree keeps running.
    pub fn round(&mut self, sink: &mut dyn TreeSink) -> Result<RoundStats, PreCopyError> {
        let started = Instant::now();
        if self.round > 0 {
            self.take_in_new_tasks()?;
        }
        let mut total = RoundStats {
            round: self.round,
            ..Default::default()
        };
        let mut gone = Vec::new();
        for (&pid, pre) in self.tasks.iter_mut() {
            match pre.round(sink.task(pid)) {
                Ok(st) => add(&mut total, &st),
                Err(_) if pid != self.root && exited(pid) => gone.push(pid),
                Err(e) => return Err(e),
            }
        }
        for pid in gone {
            tracing::debug!(pid, "task exited during pre-copy");
            self.tasks.remove(&pid);
        }
        self.round += 1;
        total.elapsed = started.elapsed();
        Ok(total)
    }

    /// Freezes the tree, sends the last dirty pages of every task (all
    /// pages of tasks forked since the last round, and the shared
    /// anonymous memory, once) and collects everything else. On error
    /// every task is resumed and tracking removed.
    ///
    /// `side`: where the objects stored beside the tasks go (see the
    /// module docs).
    pub fn finish(
        mut self,
        sink: &mut dyn TreeSink,
        side: &ImageDir,
    ) -> Result<TreeFinal, PreCopyError> {
        let started = Instant::now();
        let frozen = FrozenTree::freeze(self.root)?;
        let frozen_at = Instant::now();
        let FrozenTree {
            tasks: frozen_tasks,
            mut entries,
        } = frozen;
        let single = frozen_tasks.len() == 1 && self.tasks.len() == 1;
        // Descriptors of every task, linked across the tree (a pipe between
        // two tasks is one object).
        let pids: Vec<i32> = frozen_tasks.iter().map(|f| f.pid()).collect();
        let mut files = dump::tree::dump_files(&pids)?.into_iter();
        let mut out = TreeFinal {
            frozen: FrozenTree {
                tasks: Vec::with_capacity(frozen_tasks.len()),
                entries: Vec::new(),
            },
            tasks: Vec::with_capacity(frozen_tasks.len()),
            tree: ProcessTree::default(),
            last_round: RoundStats {
                round: self.round,
                ..Default::default()
            },
            frozen_for: Duration::ZERO,
            tracking: Vec::new(),
            ipc: Default::default(),
        };
        let mut objects = dump::TreeObjects::new(self.opts.ipc_keys.clone());
        let mut shared = dump::SharedObjects::default();
        let mut subreapers = Vec::new();
        // On any error below, `frozen_tasks`, `out.frozen` and the
        // pre-copies are dropped: every task resumes, tracking goes.
        for f in frozen_tasks {
            let pid = f.pid();
            let task_files = files.next().ok_or(DumpError::Unsupported {
                pid,
                what: "its descriptors were not collected".into(),
            })?;
            let (state, resident, frozen, round) = match self.tasks.remove(&pid) {
                Some(pre) => {
                    let fin = pre.finish_frozen(f, Some(task_files), sink.task(pid))?;
                    out.tracking.push(fin.tracking);
                    (fin.state, fin.resident, fin.frozen, fin.last_round)
                }
                None => {
                    // Forked after the last round: everything, now.
                    let state = dump::collect_state_with(&f, task_files)?;
                    let mem =
                        dump::dump_pages(pid, Target::Frozen, &state.mm.vmas, sink.task(pid))?;
                    let resident = dump::resident_ranges(pid, &state.mm.vmas)?;
                    let round = RoundStats {
                        round: self.round,
                        mem,
                        new_vmas: state.mm.vmas.len(),
                        ..Default::default()
                    };
                    (state, resident, f, round)
                }
            };
            add(&mut out.last_round, &round);
            objects.add_task(side, &state, &mut out.last_round.mem)?;
            if !single {
                let shm: Vec<_> = state
                    .mm
                    .vmas
                    .iter()
                    .filter(|v| dump::is_shared_anon(v))
                    .cloned()
                    .collect();
                let own = shared.not_yet_stored(&shm);
                if !own.is_empty() {
                    let mem: MemStats =
                        dump::dump_pages(pid, Target::Frozen, &own, sink.task(pid))?;
                    out.last_round.mem.add(&mem);
                }
            }
            subreapers.push((pid, state.core.child_subreaper));
            out.frozen.tasks.push(frozen);
            out.tasks.push(TaskFinal { state, resident });
        }
        // Tasks that exited before the freeze: their tracking is gone
        // with them (removing it would only fail).
        for (_, pre) in std::mem::take(&mut self.tasks) {
            let _ = pre.abort();
        }
        dump::complete_tree(self.root, &mut entries, &subreapers, &self.opts)?;
        crate::files::tty::check_tree(out.tasks.iter().map(|t| (t.state.core.pid, &t.state.files)))
            .map_err(DumpError::from)?;
        out.ipc = objects.finish(side, self.root)?;
        let pids: Vec<i32> = entries.iter().map(|e| e.pid).collect();
        if let Some(root) = out.tasks.first_mut() {
            root.state.inventory.pids = pids;
        }
        out.tree = ProcessTree {
            tasks: entries.clone(),
        };
        out.frozen.entries = entries;
        out.frozen_for = frozen_at.elapsed();
        out.last_round.elapsed = started.elapsed();
        tracing::debug!(
            root = self.root,
            tasks = out.tasks.len(),
            "tree frozen: final round done in {:.1} ms",
            out.frozen_for.as_secs_f64() * 1e3
        );
        Ok(out)
    }

    /// Stops tracking in every task; the tree runs on as if nothing
    /// happened.
    pub fn abort(self) -> Result<(), PreCopyError> {
        let mut first = Ok(());
        for (_, pre) in self.tasks {
            if let Err(e) = pre.abort() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
