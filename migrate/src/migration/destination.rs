//! The destination side of a live migration (`cr-migrate receive`).
//!
//! Receiver states: `Listening → Authenticated → Receiving(rounds) →
//! Assembling → [PidsBusy → waiting for release] → Restoring → Reported →
//! Committed | Aborted`.
//!
//! Page batches are appended to an image directory as they arrive
//! ([`IncomingPages`]: newest copy per page, by round, since the page
//! streams are not ordered with each other). When the final state has come
//! and every announced batch of every round is in, the pagemap and records
//! are written and a single-threaded `cr-migrate restore --detach` child
//! restores the process. If the source never confirms (`Commit`), the
//! restored process is killed: the source resumes its own copy.
use super::now_unix_us;
use super::source::boot_id;
use crate::transport::Session;
use anyhow::{anyhow, bail, Context, Result};
use crm_engine::dump::TaskState;
use crm_engine::image::store::IncomingPages;
use crm_engine::image::ImageDir;
use crm_proto::image::{FilesCore, Inventory, MmCore, TaskCore, VmaKind};
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
}

fn ctl(msg: control::Msg) -> Control {
    Control { msg: Some(msg) }
}

/// What arrived: the pages store and the bookkeeping of rounds.
struct Incoming {
    dir: ImageDir,
    pages: Option<(i32, IncomingPages)>,
    expected: HashMap<u32, u64>,
    received: HashMap<u32, u64>,
    /// Rounds whose `RoundStored` was sent.
    acked: std::collections::HashSet<u32>,
    final_state: Option<crm_proto::migrate::FinalState>,
}

impl Incoming {
    fn store(&mut self, pid: i32) -> Result<&mut IncomingPages> {
        if self.pages.is_none() {
            self.pages = Some((pid, IncomingPages::create(&self.dir, pid)?));
        }
        let (p, store) = self.pages.as_mut().expect("created above");
        if *p != pid {
            bail!("pages for process {pid} arrived, but this migration is of process {p}");
        }
        Ok(store)
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
    let result = serve(session, &dir_path).await;
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

async fn serve(session: &Session, dir_path: &Path) -> Result<()> {
    let peer = session.peer();
    let dir =
        ImageDir::create(dir_path).with_context(|| format!("creating {}", dir_path.display()))?;
    let mut inc = Incoming {
        dir,
        pages: None,
        expected: HashMap::new(),
        received: HashMap::new(),
        acked: Default::default(),
        final_state: None,
    };
    let mut receiver = session.page_receiver()?;
    let mut streams_open = true;
    while !inc.complete() {
        tokio::select! {
            b = receiver.next(), if streams_open => match b.with_context(|| format!("receiving pages from {peer}"))? {
                Some((h, data)) => {
                    let store = inc.store(h.pid)?;
                    store.put(h.vaddr, &data, h.round)?;
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
                    Some(control::Msg::ZeroPages(z)) => inc.store(z.pid)?.zero_range(z.vaddr, z.nr_pages, z.round),
                    Some(control::Msg::FinalState(f)) => inc.final_state = Some(f),
                    Some(control::Msg::Abort(a)) => bail!("the source aborted: {}", a.reason),
                    _ => {}
                }
            }
        }
    }
    let f = inc.final_state.take().expect("complete() checked it");
    let state = decode_state(&f)?;
    let pid = state.core.pid;
    if state.inventory.root_pid != pid {
        bail!(
            "inconsistent final state: inventory root {} vs task {pid}",
            state.inventory.root_pid
        );
    }
    // The image: records and the pagemap of the newest copies.
    let assembled = Instant::now();
    if !f.resident.len().is_multiple_of(2) {
        bail!("malformed resident ranges");
    }
    let resident: Vec<(u64, u64)> = f.resident.chunks(2).map(|p| (p[0], p[1])).collect();
    let mut vmas: Vec<(u64, u64)> = state
        .mm
        .vmas
        .iter()
        .filter(|v| {
            !matches!(
                v.kind(),
                VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
            )
        })
        .map(|v| (v.start, v.end))
        .collect();
    vmas.sort_unstable();
    let stats = match inc.pages.take() {
        Some((_, store)) => store.finish(&resident, &vmas)?,
        None => IncomingPages::create(&inc.dir, pid)?.finish(&resident, &vmas)?,
    };
    crm_engine::dump::write_state(&inc.dir, &state)?;
    tracing::info!(
        "image of process {pid} assembled in {:.1} ms: {} pages in {} runs ({} copies received)",
        assembled.elapsed().as_secs_f64() * 1e3,
        stats.pages,
        stats.runs,
        stats.copies
    );

    // Everything a restore checks, before the source gives up its process.
    let opts = crm_engine::restore::RestoreOptions {
        detach: true,
        shell_job: state.inventory.shell_job,
        lazy_pages: true,
    };
    let dir_owned = dir_path.to_path_buf();
    let t_preflight = Instant::now();
    let preflight =
        tokio::task::spawn_blocking(move || crm_engine::restore::preflight(&dir_owned, &opts))
            .await
            .context("running the restore preflight")?;
    if let Err(e) = preflight {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            src = c.source();
        }
        return report_failure(session, pid, dir_path, msg, false).await;
    }

    tracing::debug!(
        "preflight passed in {:.1} ms",
        t_preflight.elapsed().as_secs_f64() * 1e3
    );
    let t_release = Instant::now();

    // Same host: the source must release the PIDs first.
    let busy: Vec<i32> = state
        .core
        .threads
        .iter()
        .map(|t| t.tid)
        .filter(|&t| pid_busy(t))
        .collect();
    if !busy.is_empty() {
        session
            .send_control(&ctl(control::Msg::PidsBusy(crm_proto::migrate::PidsBusy {
                pids: busy.clone(),
                boot_id: boot_id(),
            })))
            .await?;
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
                return report_failure(
                    session,
                    pid,
                    dir_path,
                    format!("PIDs {still:?} are still in use (a zombie nobody reaps?)"),
                    true,
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    tracing::debug!(
        "PIDs free after {:.1} ms",
        t_release.elapsed().as_secs_f64() * 1e3
    );
    let t_restore = Instant::now();
    let mut restorer = match start_restore(dir_path, state.inventory.shell_job).await {
        Ok(r) => r,
        Err(err) => return report_failure(session, pid, dir_path, err, !busy.is_empty()).await,
    };
    let restored_at = now_unix_us();
    tracing::info!(
        "process {pid} restored and running ({:.1} ms)",
        t_restore.elapsed().as_secs_f64() * 1e3
    );
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
    let confirmed = loop {
        match tokio::time::timeout(Duration::from_secs(30), session.recv_control()).await {
            Ok(Ok(Control {
                msg: Some(control::Msg::Commit(_)),
            })) => break true,
            Ok(Ok(Control {
                msg: Some(control::Msg::Abort(_)),
            }))
            | Ok(Err(_))
            | Err(_) => break false,
            Ok(Ok(_)) => {}
        }
    };
    if !confirmed {
        // SAFETY-free: plain kill of the process we restored.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = restorer.wait().await;
        return Err(anyhow!(
            "the source did not confirm the migration of process {pid}; the restored copy was killed"
        ));
    }
    tracing::info!("migration of process {pid} committed");
    // The source waits for our close before it exits: close now, not after
    // the memory is filled in.
    session.close_done();
    // The restorer stays until the last lazy page is in place.
    let t_fill = Instant::now();
    let status = restorer
        .wait()
        .await
        .context("waiting for the lazy-pages server")?;
    if !status.success() {
        bail!("filling the memory of process {pid} failed ({status}); see the messages above");
    }
    tracing::info!(
        "memory of process {pid} fully in place {:.1} ms after the commit",
        t_fill.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Runs `cr-migrate restore --lazy-pages` on `dir` and waits until it says
/// the process runs. It goes on filling memory in the background (its
/// messages go to our stderr); the caller waits for it. `Err` is the
/// restorer's error message.
async fn start_restore(
    dir: &Path,
    shell_job: bool,
) -> std::result::Result<tokio::process::Child, String> {
    use tokio::io::AsyncBufReadExt;
    let exe =
        std::env::current_exe().map_err(|e| format!("locating the cr-migrate binary: {e}"))?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "restore",
            "--detach",
            "--lazy-pages",
            "--announce",
            "--images-dir",
        ])
        .arg(dir)
        .args(if shell_job {
            &["--shell-job"][..]
        } else {
            &[][..]
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("running cr-migrate restore: {e}"))?;
    let stdout = child.stdout.take().expect("piped above");
    let mut stderr = child.stderr.take().expect("piped above");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let running = loop {
        match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("RUNNING ") => break true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break false,
        }
    };
    if !running {
        let mut err = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err).await;
        let status = child.wait().await;
        let err = err.trim();
        return Err(if err.is_empty() {
            format!("cr-migrate restore failed ({status:?}) without a message")
        } else {
            err.to_string()
        });
    }
    // From here on the restorer's messages (lazy-pages progress, errors)
    // are ours.
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("{l}");
        }
    });
    Ok(child)
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
) -> Result<()> {
    session
        .send_control(&ctl(control::Msg::RestoreResult(
            crm_proto::migrate::RestoreResult {
                ok: false,
                error: error.clone(),
                pid,
                restored_at_unix_us: 0,
                images_dir: dir.display().to_string(),
            },
        )))
        .await?;
    if source_released {
        Err(anyhow!(
            "restore of process {pid} failed: {error} (the image is kept in {}; \
             retry with `cr-migrate restore --images-dir` once the cause is fixed)",
            dir.display()
        ))
    } else {
        Err(anyhow!(
            "restore of process {pid} failed: {error} (the source keeps running it)"
        ))
    }
}
