//! Restoring a process tree: an image whose `tree.img` lists several tasks.
//!
//! The restoring process (the coordinator) plans every live task like a
//! single-task restore (`plan`), with the tree's shape from
//! [`crate::tree::plan`], checks that every PID and TID is free, becomes a
//! child subreaper for the duration (so that tasks orphaned by a failure
//! come back to it to be reaped), and creates the root with
//! `clone3(set_tid)`. From there each task creates its own children
//! ([`super::tree_task`]) and the coordinator drives them in phases over
//! the control pipes ([`super::control`]):
//!
//! 1. every task exists, sessions and group leaders set (`Created`);
//! 2. the coordinator seizes every live task with ptrace, then every task
//!    joins its group (`Grouped`); sessions, groups and parents are checked
//!    against the image in `/proc`;
//! 3. zombies exit with their saved status (their parents never reap them:
//!    the restored programs will), helpers ([`crate::tree`]) exit and the
//!    root reaps them; then every live task restores its memory and state
//!    through the blob, supervised together;
//! 4. each task's registers are loaded and it is let go, children first.
//!
//! Shared anonymous memory is created once by the coordinator before the
//! root ([`super::shmem`]) and mapped by every task that shares it; so are
//! the open files several tasks share ([`crate::files::shared`]): the
//! tasks inherit them and the coordinator closes its copies once the root
//! exists. SysV IPC objects likewise ([`crate::ipc`]); each task attaches
//! its segments itself.
//!
//! Any failure kills every task created so far and reaps them all: nothing
//! half-restored keeps running.
use super::control::{self, Channels, Kind};
use super::plan::{self, Plan};
use super::{check_files, check_pid_free, host_facts, tracer, RestoreError};
use super::{RestoreOptions, RestoreReport};
use crate::image::{ImageDir, PagesReader};
use crate::procfs;
use crate::ptrace;
use crate::tree::{Group, Shape};
use crm_proto::image::{Inventory, ProcessTree, TaskCore};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// How long the tasks have to report each setup phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);

/// One live task, read and planned.
pub(super) struct TaskPrep {
    pub plan: Plan,
    pub pages: PagesReader,
    pub core: TaskCore,
}

/// What every task of the tree sees (a copy of it, made by fork).
pub(super) struct TreeCtx {
    pub shape: Shape,
    /// By task index; `None` for zombies.
    pub preps: Vec<Option<TaskPrep>>,
    pub event_r: RawFd,
    pub event_w: RawFd,
    pub go_r: Vec<RawFd>,
    pub go_w: Vec<RawFd>,
    /// The coordinator's process group (a shell job's group).
    pub restorer_pgid: i32,
    /// The open files tasks share, inherited by every task (each closes
    /// those its plan does not use).
    pub shared_fds: Vec<RawFd>,
}

fn tree_err(what: impl Into<String>) -> RestoreError {
    RestoreError::Tree { what: what.into() }
}

/// Reads and checks every record of the tree and plans each live task.
pub(super) fn prepare(
    image: &ImageDir,
    inv: &Inventory,
    tree: &ProcessTree,
    opts: &RestoreOptions,
) -> Result<Prepared, RestoreError> {
    // A tree's lazy pages are served by another process (a migration's
    // page server), each task's userfaultfd handed over to it; this
    // process serves none itself.
    let lazy = match (opts.lazy_pages, &opts.lazy_socket) {
        (false, _) => plan::LazyPlan::Off,
        (true, Some(_)) => plan::LazyPlan::AllEligible,
        (true, None) => {
            return Err(tree_err(
                "lazy pages from an image are not supported for process trees yet \
                 (only served by a migration's page server)",
            ))
        }
    };
    super::check_inventory(inv, opts)?;
    let shape = crate::tree::plan(&tree.tasks, inv.root_pid, inv.shell_job).map_err(|e| {
        RestoreError::InvalidImage {
            what: format!("process tree: {e}"),
        }
    })?;
    let listed: BTreeSet<i32> = inv.pids.iter().copied().collect();
    let in_tree: BTreeSet<i32> = shape
        .tasks
        .iter()
        .filter(|t| !t.helper)
        .map(|t| t.pid)
        .collect();
    if listed != in_tree {
        return Err(RestoreError::InvalidImage {
            what: "the inventory and tree.img list different tasks".into(),
        });
    }
    // Every record first: the plans must avoid what reading them mapped.
    let mut shared = crate::files::shared::Table::default();
    let mut records = Vec::with_capacity(shape.tasks.len());
    for t in &shape.tasks {
        if !t.restored() {
            records.push(None);
            continue;
        }
        let pid = t.pid;
        let core = image.read_core(pid)?;
        let mm = image.read_mm(pid)?;
        let files = image.read_files(pid)?;
        let pages = image.pages_reader(pid)?;
        let tids: Vec<i32> = core.threads.iter().map(|th| th.tid).collect();
        if core.pid != pid || tids != t.threads {
            return Err(RestoreError::InvalidImage {
                what: format!(
                    "core record of task {pid} is for PID {} with threads {tids:?}, \
                     tree.img says threads {:?}",
                    core.pid, t.threads
                ),
            });
        }
        check_files(&mm, &files)?;
        shared
            .add(pid, &files)
            .map_err(|what| RestoreError::InvalidImage { what })?;
        records.push(Some((core, mm, files, pages)));
    }
    shared
        .check()
        .map_err(|what| RestoreError::InvalidImage { what })?;
    let host = host_facts()?;
    let mut preps = Vec::with_capacity(shape.tasks.len());
    let mut mms = Vec::with_capacity(records.len());
    for rec in records {
        let Some((core, mm, files, pages)) = rec else {
            preps.push(None);
            mms.push(None);
            continue;
        };
        let plan = plan::build(
            &plan::Inputs {
                core: &core,
                mm: &mm,
                files: &files,
                runs: pages.runs(),
                shell_job: inv.shell_job,
                lazy,
                tree_member: true,
            },
            &host,
        )?;
        preps.push(Some(TaskPrep { plan, pages, core }));
        mms.push(Some(mm));
    }
    if !matches!(lazy, plan::LazyPlan::Off) && mms.iter().flatten().any(|m| !m.inherited.is_empty())
    {
        return Err(tree_err(
            "lazy pages for a tree whose tasks read memory from each other's pages",
        ));
    }
    borrow_inherited(&mut preps, &mms)?;
    let mut shm = super::shmem::create(&mut preps)?;
    let mut plans: Vec<&mut Plan> = preps.iter_mut().flatten().map(|p| &mut p.plan).collect();
    shm.keep(super::memfd::create(image, &mut plans)?);
    Ok((shape, preps, shm, shared))
}

/// Points each task's plan at the memory it inherited from another task
/// ([`super::inherited`]).
fn borrow_inherited(
    preps: &mut [Option<TaskPrep>],
    mms: &[Option<crm_proto::image::MmCore>],
) -> Result<(), RestoreError> {
    if mms.iter().flatten().all(|mm| mm.inherited.is_empty()) {
        return Ok(());
    }
    let borrowed = {
        let sources: std::collections::HashMap<i32, super::inherited::Source<'_>> = preps
            .iter()
            .zip(mms)
            .filter_map(|(p, mm)| {
                let (p, mm) = (p.as_ref()?, mm.as_ref()?);
                Some((
                    p.plan.pid,
                    super::inherited::Source {
                        pages: &p.pages,
                        mm,
                    },
                ))
            })
            .collect();
        let mut all = Vec::with_capacity(preps.len());
        for (p, mm) in preps.iter().zip(mms) {
            all.push(match (p, mm) {
                (Some(p), Some(mm)) if !mm.inherited.is_empty() => {
                    super::inherited::resolve(p.plan.pid, &sources)?
                }
                _ => Vec::new(),
            });
        }
        all
    };
    for (p, b) in preps.iter_mut().zip(borrowed) {
        if let Some(p) = p {
            p.plan.borrowed = b;
        }
    }
    Ok(())
}

/// What [`prepare`] made: the tree's shape, each task's plan, the shared
/// memory objects (created) and the table of shared files (not created
/// yet: [`create_shared_files`]).
pub(super) type Prepared = (
    Shape,
    Vec<Option<TaskPrep>>,
    super::shmem::Objects,
    crate::files::shared::Table,
);

/// Creates the open files tasks share, above every task's image numbers,
/// and points each plan at the ones it uses.
fn create_shared_files(
    table: &crate::files::shared::Table,
    shape: &Shape,
    preps: &mut [Option<TaskPrep>],
) -> Result<crate::files::shared::Objects, RestoreError> {
    if table.is_empty() {
        return Ok(Default::default());
    }
    let high = preps
        .iter()
        .flatten()
        .map(|p| p.plan.close_from)
        .max()
        .unwrap_or(3);
    let objs = table.create(high).map_err(|(pid, e)| RestoreError::Child {
        pid,
        what: format!(
            "cannot create an open file it shares with other tasks: {}",
            crate::files::chain(&e)
        ),
    })?;
    for (t, prep) in shape.tasks.iter().zip(preps.iter_mut()) {
        if let Some(p) = prep {
            p.plan.inherited = table.inherited(t.pid, &objs);
        }
    }
    tracing::debug!(objects = objs.len(), "shared open files created");
    Ok(objs)
}

/// Restores the tree (see the module docs).
pub(super) fn restore(
    image: &ImageDir,
    inv: &Inventory,
    tree: &ProcessTree,
    opts: &RestoreOptions,
    started: Instant,
) -> Result<RestoreReport, RestoreError> {
    let (shape, mut preps, shm, shared) = prepare(image, inv, tree, opts)?;
    if shm.len() > 0 {
        tracing::debug!(objects = shm.len(), "shared memory objects created");
    }
    for id in shape.all_ids() {
        check_pid_free(id)?;
    }
    // SysV objects before the tasks, which attach their segments.
    let attached = preps.iter().flatten().flat_map(|p| {
        p.plan
            .premaps
            .iter()
            .filter_map(|m| m.sysv.map(|s| s.shmid))
    });
    let mut ipc = Some(crate::ipc::restore(image, attached)?);
    let io = |what: &str| {
        let what = what.to_string();
        move |source| RestoreError::Io { what, source }
    };
    let _subreaper = Subreaper::enable().map_err(io("become a child subreaper"))?;
    let shared = create_shared_files(&shared, &shape, &mut preps)?;
    let mut ch = Channels::new(shape.tasks.len()).map_err(io("create the control pipes"))?;
    let raw = |v: &Vec<Option<std::os::fd::OwnedFd>>| -> Vec<RawFd> {
        v.iter()
            .map(|f| f.as_ref().map_or(-1, |f| f.as_raw_fd()))
            .collect()
    };
    let ctx = TreeCtx {
        event_r: ch.event_r.as_raw_fd(),
        event_w: ch.event_w.as_ref().map_or(-1, |f| f.as_raw_fd()),
        go_r: raw(&ch.go_r),
        go_w: raw(&ch.go_w),
        restorer_pgid: nix::unistd::getpgrp().as_raw(),
        shared_fds: shared.raw_fds(),
        shape,
        preps,
    };
    let root = ctx.shape.tasks[0].pid;
    let child = super::clone_with_pid(root)?;
    if child == 0 {
        super::tree_task::run(&ctx, 0);
    }
    // The tasks inherited the shared files: a pipe end we kept would hide
    // the end of file its reader must see.
    drop(shared);
    // Only the tasks hold these now: end of file tells us they are all gone.
    ch.event_w = None;
    for r in &mut ch.go_r {
        *r = None;
    }
    let mut created = BTreeSet::from([root]);
    match drive(
        &ctx,
        &mut ch,
        &mut created,
        &mut ipc,
        opts.lazy_socket.as_ref(),
    ) {
        Ok(()) => {
            for p in ctx.preps.iter().flatten().filter(|p| p.core.job_stopped) {
                super::stop_again(p.core.pid)?;
            }
            let threads = ctx.shape.tasks.iter().map(|t| t.threads.len()).sum();
            let pages = ctx
                .preps
                .iter()
                .flatten()
                .map(|p| p.pages.total_pages())
                .sum();
            tracing::debug!(root, tasks = ctx.shape.tasks.len(), "restored tree running");
            Ok(RestoreReport {
                pid: root,
                tasks: ctx.shape.tasks.iter().filter(|t| !t.helper).count(),
                threads,
                pages,
                elapsed: started.elapsed(),
                lazy: None,
            })
        }
        Err(e) => {
            // Waiting tasks see end of file on their go pipe and exit.
            drop(ch);
            kill_all(&ctx.shape, &created);
            Err(e)
        }
    }
}

/// Phases 1 to 4 of the module docs, after the root was created.
/// With `lazy_sock`, each task's lazy memory is handed over on it (see
/// [`super::lazy::setup`]) just before the task is let go.
fn drive(
    ctx: &TreeCtx,
    ch: &mut Channels,
    created: &mut BTreeSet<i32>,
    ipc: &mut Option<crate::ipc::Restored>,
    lazy_sock: Option<&std::os::fd::OwnedFd>,
) -> Result<(), RestoreError> {
    let tasks = &ctx.shape.tasks;
    let n = tasks.len();
    wait_all(ch, Kind::Created, n, created)?;
    tracing::debug!(tasks = n, "every task created");

    // Not zombies or helpers: they exit, and their parents reap them.
    for t in tasks.iter().filter(|t| t.restored()) {
        ptrace::seize(
            t.pid,
            ptrace::PTRACE_O_TRACECLONE | ptrace::PTRACE_O_EXITKILL,
        )
        .map_err(|source| RestoreError::Ptrace {
            tid: t.pid,
            what: "seize the restoring task".into(),
            source,
        })?;
    }
    let command = |ch: &Channels, i: usize, cmd: u8| {
        ch.command(i, cmd).map_err(|source| RestoreError::Io {
            what: format!("send a command to restoring task {}", tasks[i].pid),
            source,
        })
    };
    for i in 0..n {
        command(ch, i, control::GO_GROUPS)?;
    }
    wait_all(ch, Kind::Grouped, n, &mut BTreeSet::new())?;
    check_links(ctx)?;

    for (i, t) in tasks.iter().enumerate() {
        if !t.restored() {
            command(ch, i, control::GO_EXIT)?;
        }
    }
    wait_zombies(&ctx.shape)?;

    let mut pid_of = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.restored()) {
        for &tid in &t.threads {
            pid_of.insert(tid, t.pid);
        }
    }
    for (i, t) in tasks.iter().enumerate() {
        if t.restored() {
            command(ch, i, control::GO_RESTORE)?;
        }
    }
    let expected: BTreeSet<i32> = pid_of.keys().copied().collect();
    tracer::supervise_threads(
        &expected,
        |tid| pid_of.get(&tid).copied().unwrap_or(tid),
        |pid| {
            ch.pending_events()
                .into_iter()
                .filter(|e| e.pid == pid && e.kind == Kind::Failed)
                .map(|e| e.text)
                .next_back()
                .unwrap_or_default()
        },
    )?;
    if let Some(ipc) = ipc.take() {
        ipc.attached()?;
    }
    // Children first: a parent that runs may signal or wait for them.
    for prep in ctx.preps.iter().rev().flatten() {
        let lazy = match lazy_sock {
            None => None,
            Some(sock) => {
                let dup = |what: &str| {
                    let what = format!("{what} for task {}", prep.core.pid);
                    move |source| RestoreError::Io { what, source }
                };
                Some((
                    prep.pages
                        .try_clone()
                        .map_err(dup("reopen the pages file"))?,
                    prep.plan.lazy_ranges(),
                    super::lazy::LazyMode::External(
                        sock.try_clone()
                            .map_err(dup("duplicate the lazy-pages socket"))?,
                    ),
                ))
            }
        };
        tracer::finish(&prep.plan, &prep.core, lazy)?;
    }
    Ok(())
}

/// Waits until `n` tasks reported `kind`; a `Failed` event, silence for
/// [`PHASE_TIMEOUT`] or every task gone is an error.
fn wait_all(
    ch: &mut Channels,
    kind: Kind,
    n: usize,
    seen: &mut BTreeSet<i32>,
) -> Result<(), RestoreError> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut got = 0;
    while got < n {
        match ch.next_event(deadline) {
            Ok(Some(e)) if e.kind == Kind::Failed => {
                return Err(RestoreError::Child {
                    pid: e.pid,
                    what: e.text,
                })
            }
            Ok(Some(e)) if e.kind == kind => {
                seen.insert(e.pid);
                got += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(tree_err("every restoring task exited unexpectedly")),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(tree_err(format!(
                    "only {got} of {n} tasks reported {kind:?} within {PHASE_TIMEOUT:?}"
                )))
            }
            Err(source) => {
                return Err(RestoreError::Io {
                    what: "read the control pipe".into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Checks in `/proc` that every task has its parent, session and group.
fn check_links(ctx: &TreeCtx) -> Result<(), RestoreError> {
    let me = std::process::id() as i32;
    let my_sid = nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(0);
    let tasks = &ctx.shape.tasks;
    let mut sids = Vec::with_capacity(tasks.len());
    for t in tasks {
        let parent = t.parent.map(|p| tasks[p].pid);
        let sid = if t.new_session {
            t.pid
        } else {
            t.parent.map_or(my_sid, |p| sids[p])
        };
        sids.push(sid);
        let pgid = match t.group {
            Group::Lead => t.pid,
            Group::Join(g) => g,
            Group::Restorer => ctx.restorer_pgid,
        };
        let st = procfs::read_stat(t.pid).map_err(|e| RestoreError::Child {
            pid: t.pid,
            what: format!("cannot read it back: {e}"),
        })?;
        let want = (parent.unwrap_or(me), sid, pgid);
        let have = (st.ppid, st.session, st.pgrp);
        if want != have {
            return Err(RestoreError::Child {
                pid: t.pid,
                what: format!(
                    "(parent, session, group) is {have:?} after setup, expected {want:?}"
                ),
            });
        }
    }
    Ok(())
}

/// Waits until every zombie task has exited (state Z, unreaped).
fn wait_zombies(shape: &Shape) -> Result<(), RestoreError> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    for t in shape.tasks.iter().filter(|t| t.zombie.is_some()) {
        loop {
            match procfs::read_stat(t.pid) {
                Ok(st) if st.state == 'Z' => break,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                other => {
                    return Err(RestoreError::Child {
                        pid: t.pid,
                        what: format!(
                            "did not become a zombie: {}",
                            other.map_or_else(|e| e.to_string(), |s| format!("state {}", s.state))
                        ),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Kills the tasks known to exist (`created`) and reaps whatever comes back
/// to us (the root, orphans, traced tasks), until every created task is
/// gone or 10 s passed.
fn kill_all(shape: &Shape, created: &BTreeSet<i32>) {
    for t in shape.tasks.iter().rev() {
        if created.contains(&t.pid) {
            // SAFETY: kill(2) of a task this restore created.
            unsafe { libc::kill(t.pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while matches!(ptrace::wait(-1, libc::WNOHANG), Ok((p, _)) if p > 0) {}
        let left: Vec<i32> = created
            .iter()
            .copied()
            .filter(|&p| procfs::read_stat(p).is_ok())
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(?left, "tasks of the failed restore are still there");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `PR_SET_CHILD_SUBREAPER` for the duration of a tree restore; the old
/// setting comes back on drop.
struct Subreaper {
    was: bool,
}

impl Subreaper {
    fn enable() -> std::io::Result<Subreaper> {
        let mut v: libc::c_int = 0;
        // SAFETY: PR_GET_CHILD_SUBREAPER writes one int through the pointer,
        // a live local.
        if unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut v as *mut libc::c_int) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set_subreaper(true)?;
        Ok(Subreaper { was: v != 0 })
    }
}

fn set_subreaper(on: bool) -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer, no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        if !self.was {
            if let Err(e) = set_subreaper(false) {
                tracing::warn!(error = %e, "could not stop being a child subreaper");
            }
        }
    }
}
