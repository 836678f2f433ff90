//! The destination side of a live migration (`cr-migrate receive`).
//!
//! Receiver states: `Listening → Authenticated → Receiving(rounds) →
//! Assembling → [PidsBusy → waiting for release] → Restoring → Reported →
//! Committed | Aborted`.
//!
//! Page batches go into the page store ([`PageStore`]: the newest copy of
//! each page by round, in memory up to `--memory-limit-mib`, spilled to a
//! file beyond). Each round is acknowledged (`RoundStored`) once all its
//! batches are in. When the final state has come, the image (records, and
//! the few pages restore must place itself) is assembled ([`super::assemble`])
//! and restored with lazy pages ([`super::restorer`]): the process runs, and
//! its anonymous memory is filled from the store. If the source never
//! confirms (`Commit`), the restored process is killed: the source resumes
//! its own copy.
use super::assemble::TreeTaskIn;
use super::now_unix_us;
use super::source::boot_id;
use crate::transport::Session;
use anyhow::{anyhow, bail, Context, Result};
use crm_engine::dump::TaskState;
use crm_engine::image::ImageDir;
use crm_page_server::PageStore;
use crm_proto::image::{FilesCore, Inventory, MmCore, ProcessTree, TaskCore};
use crm_proto::migrate::{control, Control};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct ReceiveOptions {
    /// Where to build the image; a fresh directory under it per migration.
    pub work_dir: PathBuf,
    /// Keep the image directory after a successful migration.
    pub keep_images: bool,
    /// Bytes of pages held in memory; more spill to a file in the work dir.
    pub memory_limit: u64,
}

fn ctl(msg: control::Msg) -> Control {
    Control { msg: Some(msg) }
}

/// What arrived: the pages store and the bookkeeping of rounds.
struct Incoming {
    dir: ImageDir,
    store: PageStore,
    /// The processes the pages are of (the tasks of the tree).
    pids: std::collections::HashSet<i32>,
    expected: HashMap<u32, u64>,
    received: HashMap<u32, u64>,
    /// Rounds whose `RoundStored` was sent.
    acked: std::collections::HashSet<u32>,
    final_state: Option<crm_proto::migrate::FinalState>,
    /// The image files of no task (memfds, SysV IPC objects).
    side: super::side_files::Receiver,
}

/// Most tasks whose pages one migration may send.
const MAX_TASKS: usize = 4096;

impl Incoming {
    fn store(&mut self, pid: i32) -> Result<&mut PageStore> {
        if pid <= 0 {
            bail!("pages for an invalid process {pid}");
        }
        if self.pids.insert(pid) && self.pids.len() > MAX_TASKS {
            bail!("pages of more than {MAX_TASKS} processes arrived");
        }
        Ok(&mut self.store)
    }

    /// Tells the source once every batch of `round` is stored.
    async fn ack_if_stored(&mut self, session: &Session, round: u32) -> Result<()> {
        let Some(&want) = self.expected.get(&round) else {
            return Ok(());
        };
        if self.acked.contains(&round) || self.received.get(&round).copied().unwrap_or(0) < want {
            return Ok(());
        }
        self.acked.insert(round);
        session
            .send_control(&ctl(control::Msg::RoundStored(
                crm_proto::migrate::RoundStored { round },
            )))
            .await?;
        Ok(())
    }

    fn complete(&self) -> bool {
        self.final_state.is_some()
            && self
                .expected
                .iter()
                .all(|(r, n)| self.received.get(r).copied().unwrap_or(0) >= *n)
    }
}

fn pid_busy(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn decode_state(f: &crm_proto::migrate::FinalState) -> Result<TaskState> {
    Ok(TaskState {
        inventory: Inventory::decode(f.inventory.as_slice()).context("decoding the inventory")?,
        core: TaskCore::decode(f.core.as_slice()).context("decoding the task core")?,
        mm: MmCore::decode(f.mm.as_slice()).context("decoding the memory map")?,
        files: FilesCore::decode(f.files.as_slice()).context("decoding the files")?,
    })
}

/// Serves one migration on an authenticated session.
pub async fn receive(session: &Session, opts: &ReceiveOptions) -> Result<()> {
    let dir_path = opts
        .work_dir
        .join(format!("incoming-{}-{}", std::process::id(), now_unix_us()));
    let result = serve(session, &dir_path, opts.memory_limit).await;
    let keep = opts.keep_images
        || result
            .as_ref()
            .is_err_and(|e| e.to_string().contains("image is kept"));
    if !keep {
        let _ = std::fs::remove_dir_all(&dir_path);
    }
    if let Err(e) = &result {
        let _ = session
            .send_control(&ctl(control::Msg::Abort(crm_proto::migrate::Abort {
                reason: format!("{e:#}"),
            })))
            .await;
    }
    result
}

async fn serve(session: &Session, dir_path: &Path, memory_limit: u64) -> Result<()> {
    let peer = session.peer();
    let dir = ImageDir::create_scratch(dir_path)
        .with_context(|| format!("creating {}", dir_path.display()))?;
    let mut inc = Incoming {
        dir,
        store: PageStore::new(memory_limit, dir_path.join("spilled-pages")),
        pids: Default::default(),
        expected: HashMap::new(),
        received: HashMap::new(),
        acked: Default::default(),
        final_state: None,
        side: Default::default(),
    };
    let mut receiver = session.page_receiver()?;
    let mut streams_open = true;
    while !inc.complete() {
        tokio::select! {
            b = receiver.next(), if streams_open => match b.with_context(|| format!("receiving pages from {peer}"))? {
                Some((h, data)) => {
                    inc.store(h.pid)?
                        .insert_batch_owned(h.pid, h.vaddr, h.round, data)
                        .with_context(|| format!("storing pages of process {}", h.pid))?;
                    *inc.received.entry(h.round).or_default() += 1;
                    inc.ack_if_stored(session, h.round).await?;
                }
                None => streams_open = false,
            },
            c = session.recv_control() => {
                let c = c.with_context(|| format!("control stream from {peer}"))?;
                match c.msg {
                    Some(control::Msg::RoundStart(r)) => tracing::debug!(round = r.round, "round started"),
                    Some(control::Msg::RoundEnd(r)) => {
                        tracing::info!("round {}: {} pages ({:.1} MiB) announced", r.round, r.pages, r.bytes as f64 / (1 << 20) as f64);
                        inc.expected.insert(r.round, r.batches);
                        inc.ack_if_stored(session, r.round).await?;
                    }
                    Some(control::Msg::ZeroPages(z)) => inc
                        .store(z.pid)?
                        .insert_zero(z.pid, z.vaddr, z.nr_pages, z.round)
                        .with_context(|| format!("zero pages of process {}", z.pid))?,
                    Some(control::Msg::ImageFile(f)) => inc
                        .side
                        .piece(dir_path, f)
                        .context("receiving the memfds and SysV IPC objects")?,
                    Some(control::Msg::FinalState(f)) => inc.final_state = Some(f),
                    Some(control::Msg::Abort(a)) => bail!("the source aborted: {}", a.reason),
                    _ => {}
                }
            }
        }
    }
    let f = inc.final_state.take().expect("complete() checked it");
    inc.side.check_complete()?;
    let state = decode_state(&f)?;
    let pid = state.core.pid;
    if state.inventory.root_pid != pid {
        bail!(
            "inconsistent final state: inventory root {} vs task {pid}",
            state.inventory.root_pid
        );
    }
    if !f.tree.is_empty() || !f.others.is_empty() {
        let store = std::mem::replace(&mut inc.store, PageStore::new(0, dir_path.join("unused")));
        return serve_tree(session, &inc.dir, dir_path, &f, state, store).await;
    }
    // The image: records and the pages restore places itself.
    let assembled = Instant::now();
    let resident = ranges(&f.resident)?;
    let store = std::mem::replace(&mut inc.store, PageStore::new(0, dir_path.join("unused")));
    let image_pages = super::assemble::write_image(&inc.dir, &state, &store, &resident)?;
    tracing::info!(
        "image of process {pid} written in {:.1} ms ({image_pages} pages restore places itself)",
        assembled.elapsed().as_secs_f64() * 1e3,
    );

    let t_preflight = Instant::now();
    preflight(session, pid, dir_path, state.inventory.shell_job, true).await?;

    tracing::debug!(
        "preflight passed in {:.1} ms",
        t_preflight.elapsed().as_secs_f64() * 1e3
    );
    let t_release = Instant::now();

    let mut lazy = None;
    // Same host: the source must release the PIDs first; meanwhile, the
    // lazy ranges are found.
    let tids: Vec<i32> = state.core.threads.iter().map(|t| t.tid).collect();
    let busy = match release_pids(session, &tids, || {
        lazy = Some(find_lazy(&state, &store, &resident));
    })
    .await?
    {
        Ok(busy) => busy,
        Err(why) => return Err(report_failure(session, pid, dir_path, why, true).await),
    };

    tracing::debug!(
        "PIDs free after {:.1} ms",
        t_release.elapsed().as_secs_f64() * 1e3
    );
    let t_restore = Instant::now();
    let (lazy_ranges, _) = lazy.unwrap_or_else(|| find_lazy(&state, &store, &resident));
    let started = super::restorer::start(
        dir_path,
        pid,
        state.inventory.shell_job,
        store,
        vec![super::restorer::LazyTask {
            pid,
            ranges: lazy_ranges,
            hands_over: super::assemble::hands_over(&state),
        }],
    )
    .await;
    let what = format!("process {pid}");
    let restorer = conclude(
        session,
        pid,
        dir_path,
        &busy,
        started,
        t_restore,
        &[pid],
        &what,
    )
    .await?;
    finish_filling(restorer, &format!("process {pid}")).await
}

/// Waits until the last lazy page of `what` is in place (the restorer stays
/// until then) and says how they came.
async fn finish_filling(restorer: super::restorer::Running, what: &str) -> Result<()> {
    let t_fill = Instant::now();
    let stats = restorer.finish().await?;
    tracing::info!(
        "memory of {what} in place {:.1} ms after the commit: {} pages in the background, \
         {} on faults, {} zero pages, {} address space(s)",
        t_fill.elapsed().as_secs_f64() * 1e3,
        stats.pushed_pages,
        stats.faulted_pages,
        stats.zero_pages,
        stats.contexts
    );
    Ok(())
}

/// Everything a restore of the image checks, before the source gives up
/// its tree; a failure is reported to the source (which resumes its own).
async fn preflight(
    session: &Session,
    pid: i32,
    dir_path: &Path,
    shell_job: bool,
    lazy_pages: bool,
) -> Result<()> {
    let opts = crm_engine::restore::RestoreOptions {
        detach: true,
        shell_job,
        lazy_pages,
        lazy_socket: None,
    };
    let dir_owned = dir_path.to_path_buf();
    let checked =
        tokio::task::spawn_blocking(move || crm_engine::restore::preflight(&dir_owned, &opts))
            .await
            .context("running the restore preflight")?;
    match checked {
        Ok(()) => Ok(()),
        Err(e) => Err(report_failure(session, pid, dir_path, super::chain(&e), false).await),
    }
}

/// Same host: asks the source to release the PIDs of `tids` that are in
/// use here, runs `meanwhile` while it does, and waits until they are free.
/// Returns the PIDs that were busy, or (inner `Err`) why they stay busy.
async fn release_pids(
    session: &Session,
    tids: &[i32],
    meanwhile: impl FnOnce(),
) -> Result<std::result::Result<Vec<i32>, String>> {
    let busy: Vec<i32> = tids.iter().copied().filter(|&t| pid_busy(t)).collect();
    if busy.is_empty() {
        return Ok(Ok(busy));
    }
    session
        .send_control(&ctl(control::Msg::PidsBusy(crm_proto::migrate::PidsBusy {
            pids: busy.clone(),
            boot_id: boot_id(),
        })))
        .await?;
    meanwhile();
    loop {
        let c = session
            .recv_control()
            .await
            .context("waiting for the source to release the PIDs")?;
        match c.msg {
            Some(control::Msg::PidsReleased(_)) => break,
            Some(control::Msg::Abort(a)) => bail!("the source aborted: {}", a.reason),
            _ => {}
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while busy.iter().any(|&t| pid_busy(t)) {
        if Instant::now() > deadline {
            let still: Vec<i32> = busy.iter().copied().filter(|&t| pid_busy(t)).collect();
            return Ok(Err(format!(
                "PIDs {still:?} are still in use (a zombie nobody reaps?)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Ok(busy))
}

/// Tells the source the tree of `pid` runs here, then waits for its
/// `Commit` (30 s at most). `false`: no commit came; the restored copy
/// must go, the source keeps its own.
async fn report_running(
    session: &Session,
    pid: i32,
    dir_path: &Path,
    restored_at: u64,
) -> Result<bool> {
    session
        .send_control(&ctl(control::Msg::RestoreResult(
            crm_proto::migrate::RestoreResult {
                ok: true,
                error: String::new(),
                pid,
                restored_at_unix_us: restored_at,
                images_dir: dir_path.display().to_string(),
            },
        )))
        .await?;
    // Until the source confirms it killed its copy, ours is provisional.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), session.recv_control()).await {
            Ok(Ok(Control {
                msg: Some(control::Msg::Commit(_)),
            })) => return Ok(true),
            Ok(Ok(Control {
                msg: Some(control::Msg::Abort(_)),
            }))
            | Ok(Err(_))
            | Err(_) => return Ok(false),
            Ok(Ok(_)) => {}
        }
    }
}

/// The state of the other tasks of a migrated tree, with the root's
/// inventory, and their resident ranges.
fn decode_others(
    f: &crm_proto::migrate::FinalState,
    inventory: &Inventory,
) -> Result<Vec<TreeTaskIn>> {
    f.others
        .iter()
        .map(|o| {
            let state = TaskState {
                inventory: inventory.clone(),
                core: TaskCore::decode(o.core.as_slice()).context("decoding a task core")?,
                mm: MmCore::decode(o.mm.as_slice()).context("decoding a memory map")?,
                files: FilesCore::decode(o.files.as_slice()).context("decoding the files")?,
            };
            let resident = ranges(&o.resident)
                .with_context(|| format!("resident ranges of process {}", state.core.pid))?;
            Ok(TreeTaskIn { state, resident })
        })
        .collect()
}

/// Flattened `(start, end)` pairs.
fn ranges(flat: &[u64]) -> Result<Vec<(u64, u64)>> {
    if !flat.len().is_multiple_of(2) {
        bail!("malformed resident ranges");
    }
    Ok(flat.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// The end of a tree's migration: the image is written (records, shared
/// memory and the pages lazy restore does not serve), the tree restored with
/// each task's private memory filled lazily, reported, and committed or
/// killed.
async fn serve_tree(
    session: &Session,
    dir: &ImageDir,
    dir_path: &Path,
    f: &crm_proto::migrate::FinalState,
    root: TaskState,
    store: PageStore,
) -> Result<()> {
    let pid = root.core.pid;
    let tree = ProcessTree::decode(f.tree.as_slice()).context("decoding the process tree")?;
    let mut tasks = vec![TreeTaskIn {
        resident: ranges(&f.resident)?,
        state: root,
    }];
    tasks.extend(decode_others(f, &tasks[0].state.inventory)?);
    for t in &tasks {
        let tpid = t.state.core.pid;
        if !tree.tasks.iter().any(|e| e.pid == tpid && !e.zombie) {
            bail!("inconsistent final state: process {tpid} is not a live task of the tree");
        }
    }
    let assembled = Instant::now();
    let image_pages = super::assemble::write_tree_image(dir, &tasks, &tree, &store)?;
    tracing::info!(
        "image of the tree of process {pid} ({} tasks) written in {:.1} ms ({image_pages} pages)",
        tree.tasks.len(),
        assembled.elapsed().as_secs_f64() * 1e3,
    );
    let shell_job = tasks[0].state.inventory.shell_job;
    preflight(session, pid, dir_path, shell_job, false).await?;
    // Every PID of the tree, zombies' included, and every thread.
    let mut tids: Vec<i32> = tree.tasks.iter().map(|e| e.pid).collect();
    tids.extend(
        tasks
            .iter()
            .flat_map(|t| t.state.core.threads.iter().map(|th| th.tid)),
    );
    tids.sort_unstable();
    tids.dedup();
    let busy = match release_pids(session, &tids, || {}).await? {
        Ok(busy) => busy,
        Err(why) => return Err(report_failure(session, pid, dir_path, why, true).await),
    };
    let lazy: Vec<super::restorer::LazyTask> = tasks
        .iter()
        .map(|t| super::restorer::LazyTask {
            pid: t.state.core.pid,
            ranges: super::assemble::lazy_ranges(&t.state, &store, &t.resident).0,
            hands_over: super::assemble::hands_over(&t.state),
        })
        .collect();
    let t_restore = Instant::now();
    let started = super::restorer::start(dir_path, pid, shell_job, store, lazy).await;
    let pids: Vec<i32> = tasks.iter().map(|t| t.state.core.pid).collect();
    let what = format!("the tree of process {pid}");
    let restorer = conclude(
        session, pid, dir_path, &busy, started, t_restore, &pids, &what,
    )
    .await?;
    finish_filling(restorer, &what).await
}

/// Reports a restore to the source: its failure, or that `what` runs here;
/// then waits for the source's commit. Without one the restored tasks
/// (`pids`) are killed. Returns the restorer once committed (the session is
/// closed then: the source waits for that before it exits). `busy`: the
/// PIDs the source released for the restore.
#[allow(clippy::too_many_arguments)]
async fn conclude(
    session: &Session,
    pid: i32,
    dir_path: &Path,
    busy: &[i32],
    started: std::result::Result<super::restorer::Running, String>,
    t_restore: Instant,
    pids: &[i32],
    what: &str,
) -> Result<super::restorer::Running> {
    let restorer = match started {
        Ok(r) => r,
        Err(err) => {
            return Err(report_failure(session, pid, dir_path, err, !busy.is_empty()).await)
        }
    };
    let restored_at = now_unix_us();
    tracing::info!(
        "{what} restored and running ({:.1} ms)",
        t_restore.elapsed().as_secs_f64() * 1e3
    );
    if !report_running(session, pid, dir_path, restored_at).await? {
        restorer.kill(pids).await;
        bail!("the source did not confirm the migration of {what}; the restored copy was killed");
    }
    tracing::info!("migration of {what} committed");
    session.close_done();
    Ok(restorer)
}

/// The ranges to serve lazily, logged with the store's figures.
fn find_lazy(
    state: &TaskState,
    store: &PageStore,
    resident: &[(u64, u64)],
) -> (Vec<(u64, u64)>, u64) {
    let t = Instant::now();
    let (ranges, pages) = super::assemble::lazy_ranges(state, store, resident);
    let st = store.stats();
    tracing::info!(
        "{pages} pages of process {} to fill lazily, found in {:.1} ms (store: {:.1} MiB in memory, \
         {:.1} MiB spilled)",
        state.core.pid,
        t.elapsed().as_secs_f64() * 1e3,
        st.bytes_in_memory as f64 / (1 << 20) as f64,
        st.bytes_spilled as f64 / (1 << 20) as f64,
    );
    (ranges, pages)
}

/// Tells the source the restore failed. If the source already released its
/// process (same-host migration), the image is all that is left: it is kept
/// and named; otherwise the source resumes its process and the image goes.
async fn report_failure(
    session: &Session,
    pid: i32,
    dir: &Path,
    error: String,
    source_released: bool,
) -> anyhow::Error {
    let sent = session
        .send_control(&ctl(control::Msg::RestoreResult(
            crm_proto::migrate::RestoreResult {
                ok: false,
                error: error.clone(),
                pid,
                restored_at_unix_us: 0,
                images_dir: dir.display().to_string(),
            },
        )))
        .await;
    if let Err(e) = sent {
        return anyhow!(e).context(format!("restore of process {pid} failed: {error}"));
    }
    if source_released {
        anyhow!(
            "restore of process {pid} failed: {error} (the image is kept in {}; \
             retry with `cr-migrate restore --images-dir` once the cause is fixed)",
            dir.display()
        )
    } else {
        anyhow!("restore of process {pid} failed: {error} (the source keeps running it)")
    }
}
