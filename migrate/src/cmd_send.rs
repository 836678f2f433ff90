//! `cr-migrate send`: live-migrate a process to a `cr-migrate receive`.
use crate::migration::policy::Policy;
use crate::migration::source::{send, SendOptions};
use crate::migration::Progress;
use crate::transport::{self, Auth, Compress, PageTransport};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

pub struct Args {
    pub pid: i32,
    pub dest: String,
    pub token_file: Option<PathBuf>,
    pub pin: Option<String>,
    pub max_downtime_ms: u64,
    pub max_rounds: u32,
    pub compress: Compress,
    pub streams: usize,
    pub page_transport: PageTransport,
    pub json: bool,
    pub shell_job: bool,
    pub ipc_keys: Vec<i32>,
}

pub fn auth(token_file: Option<&PathBuf>, pin: Option<&str>) -> Result<Auth> {
    let token = token_file
        .map(|p| {
            transport::read_token_file(p)
                .with_context(|| format!("reading the token file {}", p.display()))
        })
        .transpose()?;
    let pinned_fingerprint = pin.map(transport::parse_fingerprint).transpose()?;
    Ok(Auth {
        token,
        pinned_fingerprint,
    })
}

pub fn run(a: Args) -> Result<i32> {
    // Before any connection: what a dump of the tree would refuse.
    let check = crm_engine::dump::DumpOptions {
        leave_running: true,
        shell_job: a.shell_job,
        ..Default::default()
    };
    crm_engine::dump::precheck_tree(a.pid, &check)
        .with_context(|| format!("cannot migrate process {}", a.pid))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = tokio::net::lookup_host(&a.dest)
            .await
            .with_context(|| format!("resolving {}", a.dest))?
            .next()
            .with_context(|| format!("{} resolves to no address", a.dest))?;
        let auth = auth(a.token_file.as_ref(), a.pin.as_deref())?;
        let session = transport::connect(addr, auth)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        if let Some(fp) = session.server_fingerprint() {
            tracing::info!(
                "connected to {addr}; its certificate fingerprint is {}",
                transport::format_fingerprint(&fp)
            );
        }
        let opts = SendOptions {
            pid: a.pid,
            policy: Policy {
                max_downtime: Duration::from_millis(a.max_downtime_ms),
                max_rounds: a.max_rounds.max(1),
            },
            compress: a.compress,
            streams: a.streams,
            page_transport: a.page_transport,
            shell_job: a.shell_job,
            ipc_keys: a.ipc_keys.clone(),
        };
        let report = send(session, &opts, Progress::new())
            .await
            .with_context(|| format!("migration of process {} to {addr} failed", a.pid))?;
        if a.json {
            println!("{}", report.json());
        } else {
            print!("{}", report.text());
        }
        Ok(0)
    })
}
