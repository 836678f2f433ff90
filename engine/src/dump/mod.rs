//! `dump`: checkpoint a process tree (every task below a root, all their
//! threads, and zombies) into an image directory.
//!
//! Order: refuse early what cannot be restored (shell jobs without
//! `shell_job`, unsupported fds or mappings in any task, sessions and groups
//! restore cannot rebuild), freeze the tree ([`tree`]), collect each task's
//! state with ptrace and remote syscalls, classify VMAs, stream pages, write
//! the per-task records and the tree record without fsync, make them all
//! durable with one `syncfs` (an fsync per file cost about 20 ms per task),
//! write the inventory last (fsynced), and only
//! then kill the tree (or resume it with `leave_running`). Any error resumes
//! every task untouched: each [`FrozenProcess`] is released on drop.
mod memfd;
mod memory;
mod posix_timers;
mod task;
pub mod tree;

pub use memory::{
    classify, dump_pages, dump_pages_skipping, dump_ranges, resident_ranges, saves_anything,
    shared_with_parent, MemStats, PageSink, Target, PAGE,
};

use crate::freeze::{FreezeError, FrozenProcess};
use crate::image::{ImageDir, ImageError};
use crate::procfs::{self, ProcError};
use crate::remote::{self, RemoteError};
use crm_proto::image::{Inventory, ProcessTree, VmaKind};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(
        "process {pid} is not a session leader (session {sid} belongs to another process, \
         probably a shell); dump it with --shell-job to restore it into the restoring \
         shell's session"
    )]
    ShellJob { pid: i32, sid: i32 },
    #[error(transparent)]
    Files(#[from] crate::files::FilesError),
    #[error("process {pid}: mapping {start:#x}-{end:#x} {name:?} is {what}, which cannot be checkpointed yet")]
    UnsupportedVma {
        pid: i32,
        start: u64,
        end: u64,
        name: String,
        what: String,
    },
    #[error("process {pid} cannot be checkpointed: {what}")]
    Unsupported { pid: i32, what: String },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("process {pid}, thread {tid}: cannot {what}")]
    Ptrace {
        pid: i32,
        tid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}: {what}")]
    Io {
        pid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Ipc(#[from] crate::ipc::IpcError),
    #[error("the process tree of {root} cannot be checkpointed: {source}")]
    TreeShape {
        root: i32,
        #[source]
        source: crate::tree::ShapeError,
    },
}

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Resume the tree after the dump instead of killing it.
    pub leave_running: bool,
    /// Allow a process that shares its session with a shell.
    pub shell_job: bool,
    /// Also save the SysV message queues, semaphore sets and shared
    /// memory segments with these keys (see [`crate::ipc`]).
    pub ipc_keys: Vec<i32>,
}

#[derive(Debug, Clone, Default)]
pub struct DumpStats {
    /// Live tasks dumped.
    pub tasks: usize,
    /// Zombies recorded.
    pub zombies: usize,
    /// Threads of every task.
    pub threads: usize,
    pub vmas: usize,
    /// SysV IPC objects saved.
    pub ipc_objects: usize,
    pub mem: MemStats,
    /// Bytes of page data written.
    pub page_bytes: u64,
    /// Process frozen → image complete.
    pub frozen_for: Duration,
    pub total: Duration,
}

/// Everything but page contents of a frozen task, ready to be written to an
/// image directory or sent to a migration destination.
#[derive(Debug, Clone)]
pub struct TaskState {
    pub inventory: Inventory,
    pub core: crm_proto::image::TaskCore,
    pub mm: crm_proto::image::MmCore,
    pub files: crm_proto::image::FilesCore,
}

/// Refusals about the root that need no freeze: missing PID, ourselves,
/// shell jobs without the flag.
fn precheck_root(pid: i32, opts: &DumpOptions) -> Result<procfs::Stat, DumpError> {
    let stat = procfs::read_stat(pid).map_err(|e| {
        if e.is_not_found() {
            DumpError::Freeze(FreezeError::NoSuchProcess { pid })
        } else {
            DumpError::Proc(e)
        }
    })?;
    if pid == std::process::id() as i32 {
        return Err(FreezeError::IsSelf { pid }.into());
    }
    if stat.session != pid && !opts.shell_job {
        return Err(DumpError::ShellJob {
            pid,
            sid: stat.session,
        });
    }
    Ok(stat)
}

/// Refusals that need no freeze, for the tree below `root`: the root's,
/// then in every live task fds and mappings that cannot be restored yet,
/// and sessions or groups the restore could not rebuild.
pub fn precheck_tree(root: i32, opts: &DumpOptions) -> Result<(), DumpError> {
    precheck_root(root, opts)?;
    let me = std::process::id() as i32;
    let stats = tree::discover(root)?;
    let mut entries = Vec::with_capacity(stats.len());
    let mut files = Vec::new();
    for st in &stats {
        let zombie = st.state == 'Z';
        if st.pid == me {
            return Err(FreezeError::IsSelf { pid: me }.into());
        }
        if !zombie {
            let checked = crate::files::collect(st.pid)
                .map_err(DumpError::from)
                .and_then(|f| {
                    // `maps` suffices to refuse what cannot be dumped
                    // (`smaps` would walk every page table).
                    classify(st.pid, &procfs::read_maps(st.pid)?)?;
                    files.push(f);
                    Ok(())
                });
            if let Err(e) = checked {
                // A task that exited meanwhile is no reason to refuse (the
                // freeze sees the tree as it is then).
                let gone = st.pid != root && exited(st.pid);
                if !gone {
                    return Err(e);
                }
            }
        }
        entries.push(crm_proto::image::TreeTask {
            pid: st.pid,
            ppid: st.ppid,
            pgid: st.pgrp,
            sid: st.session,
            threads: if zombie { vec![] } else { vec![st.pid] },
            exit_signal: st.exit_signal,
            zombie,
            exit_status: st.exit_code,
            // Not known without freezing: assumed, checked after the freeze.
            child_subreaper: st.pid == root,
        });
    }
    // The tree runs: a task that exits meanwhile makes the cross-task
    // checks (kcmp) fail; they are made again without it.
    while let Err(e) = crate::files::shared::link(&mut files) {
        let before = files.len();
        files.retain(|f| f.pid == root || !exited(f.pid));
        if files.len() == before {
            return Err(e.into());
        }
    }
    crate::files::tty::check_tree(files.iter().map(|c| (c.pid, &c.files)))?;
    check_shape(root, &entries, opts)
}

/// Whether `pid` exited (gone, or a zombie): in a running tree, a task
/// that did is left out, not a reason to fail.
pub fn exited(pid: i32) -> bool {
    // PF_EXITING: its memory may be gone before it is a zombie.
    const PF_EXITING: u32 = 0x4;
    procfs::read_stat(pid).map_or_else(
        |e| e.is_not_found(),
        |s| s.state == 'Z' || s.flags & PF_EXITING != 0,
    )
}

/// Completes the tree record of a frozen tree with each task's
/// child-subreaper flag (`(pid, flag)`, from its collected state) and checks
/// that a restore can rebuild it as frozen (it may have changed since the
/// precheck).
pub fn complete_tree(
    root: i32,
    entries: &mut [crm_proto::image::TreeTask],
    subreapers: &[(i32, bool)],
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    for &(tpid, on) in subreapers {
        if let Some(e) = entries.iter_mut().find(|e| e.pid == tpid) {
            e.child_subreaper = on;
        }
    }
    check_shape(root, entries, opts)
}

fn check_shape(
    root: i32,
    entries: &[crm_proto::image::TreeTask],
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    crate::tree::plan(entries, root, opts.shell_job)
        .map(drop)
        .map_err(|source| DumpError::TreeShape { root, source })
}

/// The address of a `syscall` instruction in the `[vdso]` of `pid` (from
/// a reading of its `maps`), for remote syscalls.
pub(crate) fn syscall_gadget(pid: i32, maps: &[procfs::MapEntry]) -> Result<u64, DumpError> {
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| DumpError::Unsupported {
            pid,
            what: "it has no [vdso] mapping (needed for remote syscalls)".into(),
        })?;
    remote::find_vdso_gadget(pid, vdso.start, vdso.len()).map_err(|source| DumpError::Io {
        pid,
        what: "find a syscall instruction in [vdso]".into(),
        source,
    })
}

/// Collects the state of a frozen task (registers, signals, creds, VMAs,
/// files ...). Uses a scratch page mapped into the target and removed again
/// before the VMAs are read.
pub fn collect_state(frozen: &FrozenProcess) -> Result<TaskState, DumpError> {
    collect_state_with(frozen, crate::files::dump(frozen.pid())?)
}

/// [`collect_state`] with the task's descriptors already collected (a
/// tree's, linked together: [`tree::dump_files`]).
pub fn collect_state_with(
    frozen: &FrozenProcess,
    files: crm_proto::image::FilesCore,
) -> Result<TaskState, DumpError> {
    let pid = frozen.pid();
    let mut state = collect_task_with(frozen, &procfs::read_maps(pid)?, files)?;
    state.mm.vmas = classify(pid, &procfs::read_smaps(pid)?)?;
    Ok(state)
}

/// [`collect_state`] without the VMAs (`mm.vmas` is left empty): the
/// caller reads `smaps` once this returns (the scratch page is gone then)
/// and fills them in with [`classify`]. `maps` is a reading of the task's
/// `maps` or `smaps` (only its `[vdso]` is used).
pub fn collect_task(
    frozen: &FrozenProcess,
    maps: &[procfs::MapEntry],
) -> Result<TaskState, DumpError> {
    collect_task_with(frozen, maps, crate::files::dump(frozen.pid())?)
}

/// [`collect_task`] with the task's files collected by the caller (a
/// tree's, linked across its tasks: [`tree::dump_files`]).
pub fn collect_task_with(
    frozen: &FrozenProcess,
    maps: &[procfs::MapEntry],
    files: crm_proto::image::FilesCore,
) -> Result<TaskState, DumpError> {
    let pid = frozen.pid();
    // Dozens of remote syscalls follow: from the task's own CPU.
    let _cpu = crate::same_cpu::SameCpu::as_task(pid);
    let stat = procfs::read_stat(pid)?;
    let gadget = syscall_gadget(pid, maps)?;
    let scratch = task::Scratch::map(pid, gadget)?;
    let collected = task::collect(frozen, gadget, &scratch);
    scratch.unmap()?;
    let collected = collected?;
    let mm = task::mm_fields(pid, collected.brk)?;
    let inventory = Inventory {
        format_version: crm_proto::IMAGE_FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        root_pid: pid,
        pids: vec![pid],
        shell_job: stat.session != pid,
        page_size: PAGE as u32,
        xfeatures: crate::restore::cpu_xfeatures(),
        dirty_tracking: String::new(),
        parent_image: String::new(),
    };
    Ok(TaskState {
        inventory,
        core: collected.core,
        mm,
        files,
    })
}

/// Writes the records of `state` into `image`; the inventory last, so an
/// image without one is known to be incomplete.
pub fn write_state(image: &ImageDir, state: &TaskState) -> Result<(), DumpError> {
    write_task_records(image, state)?;
    image.write_inventory(&state.inventory)?;
    Ok(())
}

/// Writes the core, mm and files records of one task.
pub fn write_task_records(image: &ImageDir, state: &TaskState) -> Result<(), DumpError> {
    let pid = state.core.pid;
    image.write_core(pid, &state.core)?;
    image.write_mm(pid, &state.mm)?;
    image.write_files(pid, &state.files)?;
    Ok(())
}

/// The objects of a frozen tree that are stored beside its tasks, once
/// each: the contents of its memfds, and the SysV IPC objects it attached
/// (or that `keys` name).
#[derive(Default)]
pub struct TreeObjects {
    memfds: memfd::MemfdStore,
    ipc: crate::ipc::Selection,
}

impl TreeObjects {
    pub fn new(ipc_keys: Vec<i32>) -> TreeObjects {
        TreeObjects {
            memfds: memfd::MemfdStore::default(),
            ipc: crate::ipc::Selection {
                keys: ipc_keys,
                ..Default::default()
            },
        }
    }

    /// Stores the memfds of a task (those no earlier task had) into
    /// `image` and notes the SysV segments it attached.
    pub fn add_task(
        &mut self,
        image: &ImageDir,
        state: &TaskState,
        mem: &mut MemStats,
    ) -> Result<(), DumpError> {
        let tpid = state.core.pid;
        for v in state
            .mm
            .vmas
            .iter()
            .filter(|v| v.kind() == VmaKind::SysvShm)
        {
            self.ipc.shm_ids.insert(v.sysv_shmid);
            if self.ipc.attachers.last() != Some(&tpid) {
                self.ipc.attachers.push(tpid);
            }
        }
        self.memfds.store(image, state, mem)
    }

    /// Saves the SysV objects (`ipc.img`) of the tree of `root`.
    pub fn finish(self, image: &ImageDir, root: i32) -> Result<crate::ipc::Saved, DumpError> {
        Ok(crate::ipc::dump(image, root, &self.ipc)?)
    }
}

/// Per task: the private memory it still shares with its parent (sorted
/// ranges) and that parent.
type Inherited = std::collections::HashMap<i32, (Vec<(u64, u64)>, i32)>;

/// [`Inherited`] of every task of a frozen tree whose parent is in it (see
/// [`shared_with_parent`]). Read before any memory is.
fn inherited_memory(frozen: &tree::FrozenTree) -> Result<Inherited, DumpError> {
    let live: std::collections::HashSet<i32> = frozen.tasks.iter().map(|t| t.pid()).collect();
    let mut out = std::collections::HashMap::new();
    for e in frozen
        .entries
        .iter()
        .filter(|e| !e.zombie && live.contains(&e.ppid))
    {
        let vmas = classify(e.pid, &procfs::read_maps(e.pid)?)?;
        let shared = shared_with_parent(e.pid, e.ppid, &vmas)?;
        tracing::debug!(
            pid = e.pid,
            parent = e.ppid,
            pages = shared.iter().map(|r| (r.1 - r.0) / PAGE).sum::<u64>(),
            "memory shared with the parent"
        );
        if !shared.is_empty() {
            out.insert(e.pid, (shared, e.ppid));
        }
    }
    Ok(out)
}

/// Shared anonymous memory (a shmem object, maybe mapped by several tasks).
pub fn is_shared_anon(v: &crm_proto::image::Vma) -> bool {
    v.kind() == VmaKind::Anon && v.shared
}

/// The parts of shared anonymous objects (by shmem inode) whose pages a
/// tree dump already stored: the pages of an object shared by several tasks
/// are stored once, with the first task whose VMA covers them.
#[derive(Debug, Default)]
pub struct SharedObjects {
    /// Inode → byte ranges of the object already stored.
    stored: std::collections::BTreeMap<u64, Vec<(u64, u64)>>,
}

impl SharedObjects {
    /// The VMAs of a task whose pages must be stored: all but shared
    /// anonymous VMAs whose range of their object an earlier task stored
    /// (within one task every VMA is stored, as for a single process).
    /// Marks the shared ones returned as stored.
    pub fn not_yet_stored(&mut self, vmas: &[crm_proto::image::Vma]) -> Vec<crm_proto::image::Vma> {
        let mut out = Vec::with_capacity(vmas.len());
        let mut mine: Vec<(u64, (u64, u64))> = Vec::new();
        for v in vmas {
            if !is_shared_anon(v) || v.shmem_ino == 0 {
                out.push(v.clone());
                continue;
            }
            let range = (v.pgoff, v.pgoff.saturating_add(v.end - v.start));
            let done = self
                .stored
                .get(&v.shmem_ino)
                .map_or(&[][..], |d| d.as_slice());
            if !done.iter().any(|&(s, e)| s <= range.0 && range.1 <= e) {
                mine.push((v.shmem_ino, range));
                out.push(v.clone());
            }
        }
        for (ino, range) in mine {
            self.stored.entry(ino).or_default().push(range);
        }
        out
    }
}

/// Checkpoints the process tree below `pid` (`pid` itself, its children,
/// theirs ...) into `dir` (created; must not hold an image).
pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let started = Instant::now();
    precheck_tree(pid, opts)?;
    let mut frozen = tree::FrozenTree::freeze(pid)?;
    let frozen_at = Instant::now();
    let durable = ImageDir::create(dir)?;
    // Task files and the tree are fsynced all at once before the inventory.
    let image = durable.unsynced();
    let mut stats = DumpStats {
        tasks: frozen.tasks.len(),
        zombies: frozen.entries.len() - frozen.tasks.len(),
        ..Default::default()
    };
    let mut inventory = None;
    let mut subreapers = Vec::new();
    let mut shmem = SharedObjects::default();
    let mut objects = TreeObjects::new(opts.ipc_keys.clone());
    let mut all_files = Vec::with_capacity(frozen.tasks.len());
    let pids: Vec<i32> = frozen.tasks.iter().map(|t| t.pid()).collect();
    let files = tree::dump_files(&pids)?;
    let inherited = inherited_memory(&frozen)?;
    for (task, files) in frozen.tasks.iter().zip(files) {
        let tpid = task.pid();
        let mut state = collect_state_with(task, files)?;
        let mut pages = image.pages_writer(tpid)?;
        let own = shmem.not_yet_stored(&state.mm.vmas);
        // Memory a task inherited from its parent and neither wrote since
        // is stored once, with the parent (`MmCore.inherited`).
        let (skip, parent) = inherited.get(&tpid).cloned().unwrap_or_default();
        let mut mem = memory::dump_pages_skipping(tpid, &own, &skip, &mut pages)?;
        if !skip.is_empty() {
            state.mm.inherited = skip.iter().flat_map(|&(a, b)| [a, b]).collect();
            state.mm.inherited_from = parent;
        }
        pages.finish()?;
        objects.add_task(&image, &state, &mut mem)?;
        write_task_records(&image, &state)?;
        all_files.push((tpid, state.files.clone()));
        stats.threads += state.core.threads.len();
        stats.vmas += state
            .mm
            .vmas
            .iter()
            .filter(|v| v.kind() != VmaKind::Vsyscall)
            .count();
        stats.mem.add(&mem);
        subreapers.push((tpid, state.core.child_subreaper));
        if tpid == pid {
            inventory = Some(state.inventory);
        }
        tracing::debug!(pid = tpid, pages = mem.pages_written, "task dumped");
    }
    let mut inventory = inventory.ok_or(FreezeError::NoSuchProcess { pid })?;
    complete_tree(pid, &mut frozen.entries, &subreapers, opts)?;
    crate::files::tty::check_tree(all_files.iter().map(|(p, f)| (*p, f)))?;
    image.write_tree(&ProcessTree {
        tasks: frozen.entries.clone(),
    })?;
    let ipc = objects.finish(&image, pid)?;
    stats.ipc_objects = ipc.len();
    inventory.pids = frozen.entries.iter().map(|e| e.pid).collect();
    durable.sync_all()?;
    durable.write_inventory(&inventory)?;
    stats.frozen_for = frozen_at.elapsed();
    stats.page_bytes = stats.mem.pages_written * PAGE;

    if opts.leave_running {
        frozen.thaw().map_err(|source| DumpError::Io {
            pid,
            what: "resume the process tree after the dump".into(),
            source,
        })?;
    } else {
        frozen.kill().map_err(|source| DumpError::Io {
            pid,
            what: "kill the process tree after the dump".into(),
            source,
        })?;
        // The objects live in the image now, as the processes do.
        ipc.remove();
    }
    stats.total = started.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::image::Vma;

    fn shm(start: u64, len: u64, ino: u64, pgoff: u64) -> Vma {
        Vma {
            start,
            end: start + len,
            shared: true,
            kind: VmaKind::Anon as i32,
            shmem_ino: ino,
            pgoff,
            ..Default::default()
        }
    }

    #[test]
    fn shared_objects_are_stored_once_per_part() {
        let mut s = SharedObjects::default();
        let private = Vma {
            start: 0x1000,
            end: 0x2000,
            kind: VmaKind::Anon as i32,
            ..Default::default()
        };
        // The first task stores everything, twice-mapped parts included.
        let first = vec![
            private.clone(),
            shm(0x10000, 0x4000, 7, 0),
            shm(0x20000, 0x4000, 7, 0),
        ];
        assert_eq!(s.not_yet_stored(&first).len(), 3);
        // A later task: private memory and uncovered parts only.
        let later = vec![
            private,
            shm(0x10000, 0x2000, 7, 0x1000),
            shm(0x30000, 0x2000, 7, 0x3000),
            shm(0x40000, 0x1000, 8, 0),
        ];
        let kept: Vec<u64> = s.not_yet_stored(&later).iter().map(|v| v.start).collect();
        assert_eq!(kept, vec![0x1000, 0x30000, 0x40000]);
    }
}
