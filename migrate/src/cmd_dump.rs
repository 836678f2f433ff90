//! `cr-migrate dump`: checkpoint a process tree into an image directory.
use anyhow::Context;
use crm_engine::dump::{dump, DumpOptions};
use std::path::Path;

pub fn run(
    pid: i32,
    dir: &Path,
    leave_running: bool,
    shell_job: bool,
    ipc_keys: Vec<i32>,
) -> anyhow::Result<i32> {
    let opts = DumpOptions {
        leave_running,
        shell_job,
        ipc_keys,
    };
    let stats = dump(pid, dir, &opts)
        .with_context(|| format!("dump of process {pid} into {} failed", dir.display()))?;
    let secs = stats.frozen_for.as_secs_f64();
    tracing::info!(
        "dumped process {pid}: {} task(s), {} zombie(s), {} thread(s), {} VMAs, {} pages \
         ({:.1} MiB, {} zero pages skipped), {} SysV IPC object(s); frozen {:.0} ms ({:.2} GB/s); tree {}",
        stats.tasks,
        stats.zombies,
        stats.threads,
        stats.vmas,
        stats.mem.pages_written,
        stats.page_bytes as f64 / (1 << 20) as f64,
        stats.mem.zero_pages,
        stats.ipc_objects,
        secs * 1e3,
        if secs > 0.0 {
            stats.page_bytes as f64 / secs / 1e9
        } else {
            0.0
        },
        if leave_running {
            "left running"
        } else {
            "killed"
        },
    );
    Ok(0)
}
