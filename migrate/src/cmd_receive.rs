//! `cr-migrate receive`: accept one live migration and restore it here.
use crate::migration::destination::{receive, ReceiveOptions};
use crate::transport;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;

pub struct Args {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub work_dir: PathBuf,
    pub keep_images: bool,
    pub memory_limit_mib: Option<u64>,
}

/// Half of this host's RAM (from /proc/meminfo), 4 GiB if unknown.
fn default_memory_limit() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib * 1024 / 2)
}

pub fn run(a: Args) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let auth = crate::cmd_send::auth(a.token_file.as_ref(), None)?;
        std::fs::create_dir_all(&a.work_dir)
            .with_context(|| format!("creating {}", a.work_dir.display()))?;
        let listener = transport::listen(a.listen, auth, &a.state_dir)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        tracing::info!(
            "listening on {} (certificate fingerprint {})",
            listener.local_addr(),
            transport::format_fingerprint(&listener.fingerprint())
        );
        let session = listener.accept().await.context("accepting a migration")?;
        tracing::info!("{} authenticated; receiving", session.peer());
        let opts = ReceiveOptions {
            work_dir: a.work_dir,
            keep_images: a.keep_images,
            memory_limit: a
                .memory_limit_mib
                .map_or_else(default_memory_limit, |m| m << 20),
        };
        receive(&session, &opts).await?;
        Ok(0)
    })
}
