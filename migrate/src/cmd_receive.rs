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
        };
        receive(&session, &opts).await?;
        Ok(0)
    })
}
