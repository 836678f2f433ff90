//! Runs the destination's restore and serves the restored process's (or
//! tree's) lazy memory from the page store.
//!
//! The restore itself runs in a single-threaded `cr-migrate restore
//! --lazy-pages --lazy-pages-fd N` child (it forks the task with clone3,
//! which a multi-threaded process must not do). Just before it lets a task
//! go, the child hands us, over a unix socket, the userfaultfd of the task's
//! memory, its lazy VMAs and the pages the kernel already touched (a tree:
//! one hand-over per task, children first); we write those through
//! `/proc/PID/mem` and acknowledge; once every task runs the child prints
//! `RUNNING PID`. From then on we fill each task's memory from the store
//! (faults first), a blocking thread per task.
use anyhow::{anyhow, bail, Context, Result};
use crm_engine::restore::lazy::{self, LazyPages, LazyStats, PageSource};
use crm_page_server::PageStore;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;

/// Pages of one task, from the store.
struct StoreSource {
    pid: i32,
    store: PageStore,
}

impl StoreSource {
    /// Copies the pages of `pid` at `orig..` out of `store` into `buf`.
    fn copy_out(
        store: &PageStore,
        pid: i32,
        orig: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), String> {
        for (i, page) in buf.chunks_exact_mut(4096).enumerate() {
            let a = orig + i as u64 * 4096;
            match store.get(pid, a) {
                Ok(Some(p)) => page.copy_from_slice(&p),
                Ok(None) => {
                    return Err(format!(
                        "the page at {a:#x} of process {pid} is not in the store"
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

impl PageSource for StoreSource {
    fn read(&mut self, orig: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        Self::copy_out(&self.store, self.pid, orig, buf)
    }

    fn slice(&self, orig: u64, max: usize) -> Option<&[u8]> {
        self.store.contiguous(self.pid, orig, max / 4096)
    }

    /// Frees the store's copies as the process gets its own: the
    /// destination does not hold the memory twice while it fills it.
    fn done_with(&mut self, orig: u64, len: u64) {
        self.store.forget(self.pid, orig, orig.saturating_add(len));
    }
}

/// Pages of one task of a tree, from the store its siblings' servers read
/// too (no slices: they would outlive the lock).
struct SharedStoreSource {
    pid: i32,
    store: Arc<Mutex<PageStore>>,
}

impl PageSource for SharedStoreSource {
    fn read(&mut self, orig: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        StoreSource::copy_out(&store, self.pid, orig, buf)
    }

    fn done_with(&mut self, orig: u64, len: u64) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.forget(self.pid, orig, orig.saturating_add(len));
    }
}

/// The union of two sorted lists of disjoint ranges, merged.
fn merge(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `ranges` minus `holes` (both sorted, disjoint).
fn subtract(ranges: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut a, b) in ranges {
        for &(h0, h1) in holes {
            if h0 >= b || h1 <= a {
                continue;
            }
            if h0 > a {
                out.push((a, h0));
            }
            a = a.max(h1);
        }
        if a < b {
            out.push((a, b));
        }
    }
    out
}

/// A restored process whose memory is being filled in.
pub struct Running {
    child: tokio::process::Child,
    server: tokio::task::JoinHandle<std::result::Result<LazyStats, lazy::LazyError>>,
}

impl Running {
    /// Waits until every lazy page is in place and the restorer exited.
    pub async fn finish(mut self) -> Result<LazyStats> {
        let stats = self
            .server
            .await
            .context("the lazy-pages server panicked")?
            .context("filling the restored process's memory")?;
        let status = self
            .child
            .wait()
            .await
            .context("waiting for cr-migrate restore")?;
        if !status.success() {
            bail!("cr-migrate restore exited with {status}");
        }
        Ok(stats)
    }

    /// Kills the restored tasks `pids` and waits for the restorer.
    pub async fn kill(mut self, pids: &[i32]) {
        for &pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.server.await;
        let _ = self.child.wait().await;
    }
}

/// The lazy memory of one task to restore: the ranges of pages to serve
/// from the store (at their dump-time addresses), and whether the restorer
/// hands its memory over at all (it does for every task with a VMA that
/// lazy restore serves, even when none of its pages is in the store).
pub struct LazyTask {
    pub pid: i32,
    pub ranges: Vec<(u64, u64)>,
    pub hands_over: bool,
}

/// Restores the process or tree in `dir` (root `pid`), serving the lazy
/// memory of `tasks` from `store`. Returns once it runs; `Err` holds the
/// restorer's error message.
pub async fn start(
    dir: &Path,
    pid: i32,
    shell_job: bool,
    store: PageStore,
    tasks: Vec<LazyTask>,
) -> std::result::Result<Running, String> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // The child's end must survive exec: a copy without close-on-exec.
    let inherited = nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_DUPFD(3))
        .map_err(|e| format!("dup of the hand-over socket: {e}"))?;
    // SAFETY: F_DUPFD returned a new descriptor that nothing else owns.
    let inherited = unsafe { OwnedFd::from_raw_fd(inherited) };
    drop(theirs);
    let fd = inherited.as_raw_fd().to_string();
    let spawned = restore_command(dir, shell_job, &["--lazy-pages", "--lazy-pages-fd", &fd])
        .and_then(|mut cmd| {
            cmd.spawn()
                .map_err(|e| format!("running cr-migrate restore: {e}"))
        });
    drop(inherited);
    let mut child = spawned?;
    let stdout = child.stdout.take().expect("piped above");
    let stderr = child.stderr.take().expect("piped above");

    // The hand-overs, in a blocking thread (it waits on the socket).
    let ours = OwnedFd::from(ours);
    let handover = tokio::task::spawn_blocking(move || {
        let r = take_handovers(&ours, &store, &tasks);
        r.map(|h| (h, store, tasks))
    });
    let running = until_running(stdout).await;
    let handed = handover
        .await
        .map_err(|e| format!("the hand-over thread: {e}"))?;
    if !running {
        let why = handed.as_ref().err().map(|e| format!("{e:#}"));
        return Err(failure(child, stderr, why).await);
    }
    let (handovers, store, tasks) = match handed {
        Ok(h) => h,
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait().await;
            return Err(format!("{e:#}"));
        }
    };
    forward_stderr(stderr);
    let ranges_of = |p: i32| {
        tasks
            .iter()
            .find(|t| t.pid == p)
            .map_or(&[][..], |t| &t.ranges[..])
    };
    let jobs: Vec<FillJob> = handovers
        .into_iter()
        .filter_map(|h| {
            let uffd = h.uffd?;
            Some((h.pid, uffd, subtract(ranges_of(h.pid), &h.present)))
        })
        .collect();
    Ok(Running {
        child,
        server: serve(jobs, store),
    })
}

/// One address space to fill: the task's PID, the userfaultfd of its
/// memory, and the ranges still to fill (at their dump-time addresses).
type FillJob = (i32, OwnedFd, Vec<(u64, u64)>);

/// Serves the lazy memory of every address space handed over with a
/// userfaultfd, each on a thread of its own; returns the sum of their
/// figures.
fn serve(
    jobs: Vec<FillJob>,
    store: PageStore,
) -> tokio::task::JoinHandle<std::result::Result<LazyStats, lazy::LazyError>> {
    let mut jobs = jobs.into_iter();
    let (first, rest) = (jobs.next(), jobs.collect::<Vec<_>>());
    let Some((pid, uffd, todo)) = first else {
        // Nothing lazy, or everything written already.
        return tokio::task::spawn_blocking(|| Ok(LazyStats::default()));
    };
    if rest.is_empty() {
        // One process: its pages straight from the store's frames.
        let pages = LazyPages::new(pid, uffd, &todo, Box::new(StoreSource { pid, store }));
        tracing::debug!("serving {} lazy pages of process {pid}", pages.pages());
        return tokio::task::spawn_blocking(move || pages.serve());
    }
    let store = Arc::new(Mutex::new(store));
    let servers: Vec<LazyPages> = std::iter::once((pid, uffd, todo))
        .chain(rest)
        .map(|(pid, uffd, todo)| {
            let source = SharedStoreSource {
                pid,
                store: Arc::clone(&store),
            };
            LazyPages::new(pid, uffd, &todo, Box::new(source))
        })
        .collect();
    let total: u64 = servers.iter().map(LazyPages::pages).sum();
    tracing::debug!("serving {total} lazy pages of {} processes", servers.len());
    tokio::task::spawn_blocking(move || {
        let threads: Vec<_> = servers
            .into_iter()
            .map(|p| std::thread::spawn(move || p.serve()))
            .collect();
        let mut sum = LazyStats::default();
        let mut failed = None;
        for t in threads {
            match t.join() {
                Ok(Ok(s)) => sum.add(&s),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        failed.map_or(Ok(sum), Err)
    })
}

/// `cr-migrate restore --detach --announce --images-dir DIR [--shell-job]
/// EXTRA...`, its stdout and stderr piped.
fn restore_command(
    dir: &Path,
    shell_job: bool,
    extra: &[&str],
) -> std::result::Result<tokio::process::Command, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("locating the cr-migrate binary: {e}"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["restore", "--detach", "--announce"])
        .args(extra)
        .arg("--images-dir")
        .arg(dir)
        .args(if shell_job {
            &["--shell-job"][..]
        } else {
            &[][..]
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Ok(cmd)
}

/// Reads the restorer's stdout until its `RUNNING` line; `false` if it
/// ended first.
async fn until_running(stdout: tokio::process::ChildStdout) -> bool {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("RUNNING ") => return true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}

/// Why a restorer that never announced its process failed: its stderr,
/// else `why`, else its exit status.
async fn failure(
    mut child: tokio::process::Child,
    mut stderr: tokio::process::ChildStderr,
    why: Option<String>,
) -> String {
    let mut err = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err).await;
    let status = child.wait().await;
    match (err.trim(), why) {
        ("", Some(why)) => why,
        ("", None) => format!("cr-migrate restore failed ({status:?}) without a message"),
        (err, _) => err.to_string(),
    }
}

/// The restorer's later messages are ours (and it must not find its
/// stderr closed).
fn forward_stderr(stderr: tokio::process::ChildStderr) {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("{l}");
        }
    });
}

/// Receives the hand-over of every task of `tasks` that makes one, writes
/// each one's already-present pages (their data where its lazy ranges have
/// some, else zeros) and acknowledges it; a failure is acknowledged as
/// such (the restorer then gives up) and returned.
fn take_handovers(
    sock: &OwnedFd,
    store: &PageStore,
    tasks: &[LazyTask],
) -> Result<Vec<lazy::Handover>> {
    let mut waiting: BTreeSet<i32> = tasks
        .iter()
        .filter(|t| t.hands_over)
        .map(|t| t.pid)
        .collect();
    let mut got = Vec::new();
    while !waiting.is_empty() {
        let r = (|| {
            let h = lazy::receive_handover(sock)
                .context("receiving a userfaultfd from the restorer")?
                .with_context(|| {
                    format!("the restorer handed no memory over for processes {waiting:?}")
                })?;
            if !waiting.remove(&h.pid) {
                bail!(
                    "the restorer handed over the memory of process {}, which it should not",
                    h.pid
                );
            }
            let task = tasks
                .iter()
                .find(|t| t.pid == h.pid)
                .expect("one of the tasks waited for");
            write_present(h.pid, store, &task.ranges, &h)?;
            Ok(h)
        })();
        let _ = lazy::ack_handover(sock, r.is_ok());
        got.push(r?);
    }
    Ok(got)
}

/// Writes the pages of `h` already present in process `pid` (or, without
/// a userfaultfd, every lazy page too) through `/proc/PID/mem`.
fn write_present(
    pid: i32,
    store: &PageStore,
    lazy: &[(u64, u64)],
    h: &lazy::Handover,
) -> Result<()> {
    let inside = |a: u64| {
        let i = lazy.partition_point(|r| r.1 <= a);
        lazy.get(i).is_some_and(|r| r.0 <= a)
    };
    // Without a userfaultfd every lazy page is written now, before the
    // process runs (the restore takes longer, nothing is lost).
    let eager: Vec<(u64, u64)>;
    let to_write: &[(u64, u64)] = if h.uffd.is_none() {
        tracing::info!("process {pid}: no userfaultfd; writing its memory before it runs");
        eager = merge(lazy, &h.present);
        &eager
    } else {
        &h.present
    };
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut n = 0u64;
    for &(a, b) in to_write {
        if !h.vmas.iter().any(|v| v.0 <= a && b <= v.1) {
            return Err(anyhow!("range {a:#x}-{b:#x} is outside the lazy VMAs"));
        }
        let mut addr = a;
        while addr < b {
            let page = if inside(addr) {
                store
                    .get(pid, addr)
                    .with_context(|| format!("reading the page at {addr:#x}"))?
            } else {
                None
            };
            let zero = [0u8; 4096];
            let data: &[u8] = page.as_deref().unwrap_or(&zero);
            mem.write_all_at(data, addr)
                .with_context(|| format!("writing the page at {addr:#x} of process {pid}"))?;
            addr += 4096;
            n += 1;
        }
    }
    tracing::debug!("wrote {n} pages of process {pid} before it runs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::subtract;

    #[test]
    fn subtract_holes() {
        let r = [(0, 100), (200, 300)];
        let h = [(10, 20), (90, 210), (290, 400)];
        assert_eq!(subtract(&r, &h), vec![(0, 10), (20, 90), (210, 290)]);
        assert_eq!(subtract(&r, &[]), r.to_vec());
    }

    #[test]
    fn merge_ranges() {
        let a = [(0, 10), (20, 30)];
        let b = [(5, 15), (30, 40), (50, 60)];
        assert_eq!(super::merge(&a, &b), vec![(0, 15), (20, 40), (50, 60)]);
    }
}
