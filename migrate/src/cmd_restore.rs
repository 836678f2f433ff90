//! `cr-migrate restore`: bring a checkpointed process back.
use anyhow::Context;
use crm_engine::restore::lazy::{LazyError, LazyStats};
use crm_engine::restore::{restore, wait_exit, RestoreOptions};
use std::io::Write;
use std::path::Path;

pub struct Options {
    pub detach: bool,
    pub shell_job: bool,
    pub lazy_pages: bool,
    /// Print `RUNNING PID` on stdout once the process runs.
    pub announce: bool,
    /// Inherited unix socket to hand the lazy memory over on.
    pub lazy_pages_fd: Option<i32>,
}

/// Takes ownership of an inherited descriptor after checking it is an open
/// socket.
fn inherited_socket(fd: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat on a descriptor number only reads its metadata.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        anyhow::bail!("--lazy-pages-fd {fd} is not an open socket");
    }
    // SAFETY: the descriptor is open, a socket, and handed to us by our
    // parent for this purpose alone; nothing else in this process uses it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

pub fn run(dir: &Path, o: Options) -> anyhow::Result<i32> {
    let opts = RestoreOptions {
        detach: o.detach,
        shell_job: o.shell_job,
        lazy_pages: o.lazy_pages,
        lazy_socket: o.lazy_pages_fd.map(inherited_socket).transpose()?,
    };
    let mut report =
        restore(dir, &opts).with_context(|| format!("restore from {} failed", dir.display()))?;
    let pid = report.pid;
    if o.announce {
        let mut out = std::io::stdout().lock();
        writeln!(out, "RUNNING {pid}")
            .and_then(|()| out.flush())
            .context("announcing the restored process on stdout")?;
    }
    let lazy_note = match &report.lazy {
        Some(l) => format!(" ({} pages still to fill)", l.pages()),
        None => String::new(),
    };
    tracing::info!(
        "restored process {pid}: {} task(s), {} thread(s), {} pages in {:.0} ms{lazy_note}",
        report.tasks,
        report.threads,
        report.pages,
        report.elapsed.as_secs_f64() * 1e3
    );
    // Lazy memory is served while the process runs; it waits on every
    // missing page it touches, so this starts at once.
    let server = report.lazy.take().map(|lazy| {
        std::thread::Builder::new()
            .name(format!("lazy-{pid}"))
            .spawn(move || lazy.serve())
    });
    let server = match server {
        Some(s) => Some(s.context("starting the lazy-pages thread")?),
        None => None,
    };
    type Server = std::thread::JoinHandle<Result<LazyStats, LazyError>>;
    let join_server = |server: Option<Server>| -> anyhow::Result<()> {
        let Some(h) = server else { return Ok(()) };
        let stats = h
            .join()
            .map_err(|_| anyhow::anyhow!("the lazy-pages thread of process {pid} panicked"))?
            .with_context(|| format!("filling the memory of process {pid}"))?;
        tracing::info!(
            "memory of process {pid} in place after {:.0} ms: {} pages in the background, \
             {} on faults, {} zero pages, {} address space(s)",
            stats.elapsed.as_secs_f64() * 1e3,
            stats.pushed_pages,
            stats.faulted_pages,
            stats.zero_pages,
            stats.contexts
        );
        Ok(())
    };
    if o.detach {
        join_server(server)?;
        return Ok(0);
    }
    let status = wait_exit(pid).with_context(|| format!("waiting for restored process {pid}"))?;
    join_server(server)?;
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        let sig = libc::WTERMSIG(status);
        tracing::info!("restored process {pid} was killed by signal {sig}");
        Ok(128 + sig)
    }
}
