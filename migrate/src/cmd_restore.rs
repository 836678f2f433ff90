//! `cr-migrate restore`: bring a checkpointed process back.
use anyhow::Context;
use crm_engine::restore::{restore, wait_exit, RestoreOptions};
use std::path::Path;

pub fn run(dir: &Path, detach: bool, shell_job: bool) -> anyhow::Result<i32> {
    let opts = RestoreOptions { detach, shell_job };
    let report =
        restore(dir, &opts).with_context(|| format!("restore from {} failed", dir.display()))?;
    tracing::info!(
        "restored process {}: {} thread(s), {} pages in {:.0} ms",
        report.pid,
        report.threads,
        report.pages,
        report.elapsed.as_secs_f64() * 1e3
    );
    if detach {
        return Ok(0);
    }
    let status = wait_exit(report.pid)
        .with_context(|| format!("waiting for restored process {}", report.pid))?;
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        let sig = libc::WTERMSIG(status);
        tracing::info!("restored process {} was killed by signal {sig}", report.pid);
        Ok(128 + sig)
    }
}
