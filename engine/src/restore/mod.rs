//! `restore`: recreate a checkpointed process from an image directory, with
//! its original PID and TIDs. An image of several tasks goes to [`tree`],
//! which runs the same steps in every task of the tree.
//!
//! 1. Read and check the image (`plan`): PIDs free, same vDSO layout, CPU
//!    features, files unchanged; compute the restore zone and the blob's
//!    argument block.
//! 2. SysV IPC objects of the image are created with their ids
//!    ([`crate::ipc`]); a failed restore removes them again.
//! 3. `clone3(set_tid = PID)`: the child (`child`) premaps and fills every
//!    VMA inside the zone (SysV segments are attached there,
//!    [`crate::ipc::attach`]), loads the blob, reopens files, and jumps into
//!    the blob, which swaps the address space and creates the threads.
//! 4. We trace the child (`tracer`) until every thread reports done (segments
//!    that were marked for deletion are marked again now), then
//!    load registers and let it run. On any failure the child is killed:
//!    never a half-restored process left running.
#[allow(dead_code)]
#[path = "../../restorer/src/abi.rs"]
pub mod abi;
mod blob;
mod child;
mod control;
mod inherited;
pub mod lazy;
mod memfd;
mod plan;
pub use plan::lazy_eligible;
mod shmem;
mod tracer;
mod tree;
mod tree_task;
mod uffd_missing;

use crate::image::{ImageDir, ImageError};
use crate::procfs;
use crate::ptrace;
use crate::remote::RemoteError;
use crm_proto::image::VmaKind;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("invalid image: {what}")]
    InvalidImage { what: String },
    #[error("PID {pid} is in use by {holder}; the restored process needs it")]
    PidBusy { pid: i32, holder: String },
    #[error("the image was dumped with --shell-job (it shared a shell's session); restore it with --shell-job")]
    ShellJob,
    #[error("the vDSO of this kernel differs from the image's: {what}")]
    VdsoMismatch { what: String },
    #[error("this CPU lacks register state the image holds: {what}")]
    Cpu { what: String },
    #[error("file {path} changed since the dump: {what}")]
    FileChanged { path: String, what: String },
    #[error("no free address range of {bytes} bytes for the restorer")]
    NoRoom { bytes: u64 },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("restoring process {pid} failed: {what}")]
    Child { pid: i32, what: String },
    #[error("restorer failed in thread {tid} of process {pid}: {step} (detail {detail:#x})")]
    Restorer {
        pid: i32,
        tid: i32,
        step: &'static str,
        #[source]
        errno: std::io::Error,
        detail: u64,
    },
    #[error("restorer crashed in thread {tid} of process {pid}: signal {signal} at {rip:#x}")]
    Crashed {
        pid: i32,
        tid: i32,
        signal: i32,
        rip: u64,
    },
    #[error("ptrace on restored thread {tid}: cannot {what}")]
    Ptrace {
        tid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    #[error("process tree: {what}")]
    Tree { what: String },
    #[error(transparent)]
    Ipc(#[from] crate::ipc::IpcError),
}

#[derive(Debug, Default)]
pub struct RestoreOptions {
    /// Return once the process runs instead of waiting for it to exit.
    pub detach: bool,
    /// Allow restoring a shell job into our own session.
    pub shell_job: bool,
    /// Let the process run before its private anonymous memory is filled;
    /// the caller must then run [`lazy::LazyPages::serve`] (see [`lazy`]).
    pub lazy_pages: bool,
    /// With `lazy_pages`: hand the userfaultfd and the lazy ranges to the
    /// process at the other end of this unix socket, which serves the pages
    /// (the image holds none of the lazy VMAs' pages); see
    /// [`lazy::receive_handover`].
    pub lazy_socket: Option<OwnedFd>,
}

#[derive(Debug)]
pub struct RestoreReport {
    /// The root of the restored tree.
    pub pid: i32,
    /// Tasks restored (zombies included).
    pub tasks: usize,
    pub threads: usize,
    pub pages: u64,
    /// Start → process running.
    pub elapsed: Duration,
    /// With [`RestoreOptions::lazy_pages`]: the memory still to fill, to be
    /// served at once (the process waits on each missing page it touches).
    /// `None` when everything was filled before it ran.
    pub lazy: Option<lazy::LazyPages>,
}

/// XCR0 of this CPU: which XSAVE features are enabled (0 without XSAVE).
pub fn cpu_xfeatures() -> u64 {
    if !std::arch::is_x86_feature_detected!("xsave") {
        return 0;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv(0) is valid when CPUID reports XSAVE/OSXSAVE, checked above.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}

fn check_pid_free(pid: i32) -> Result<(), RestoreError> {
    match procfs::read_stat(pid) {
        Err(e) if e.is_not_found() => Ok(()),
        Err(_) => Err(RestoreError::PidBusy {
            pid,
            holder: "an unreadable process".into(),
        }),
        Ok(st) => {
            let state = match st.state {
                'Z' => " (a zombie: its parent has not reaped it)".to_string(),
                c => format!(" (state {c})"),
            };
            Err(RestoreError::PidBusy {
                pid,
                holder: format!("process '{}' with parent {}{state}", st.comm, st.ppid),
            })
        }
    }
}

fn host_facts() -> Result<plan::Host, RestoreError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: procfs::ProcError| RestoreError::Io {
            what: what.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    };
    let me = std::process::id() as i32;
    let status = procfs::read_status(me).map_err(io("read our own /proc status"))?;
    // SAFETY: prctl(PR_GET_SECUREBITS) takes no pointers.
    let securebits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS) } as u32;
    let creds = crm_proto::image::Creds {
        uids: status.uids.to_vec(),
        gids: status.gids.to_vec(),
        groups: status.groups.clone(),
        cap_inh: status.cap_inh,
        cap_prm: status.cap_prm,
        cap_eff: status.cap_eff,
        cap_bnd: status.cap_bnd,
        cap_amb: status.cap_amb,
        securebits,
        no_new_privs: status.no_new_privs,
    };
    let mut hard_limits = Vec::new();
    for res in 0..16u32 {
        let mut l = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit64 writes one struct into `l`.
        if unsafe { libc::getrlimit64(res as _, &mut l) } == 0 {
            hard_limits.push((res, l.rlim_max));
        }
    }
    Ok(plan::Host {
        self_maps: procfs::read_self_maps().map_err(io("read our own maps"))?,
        creds,
        hard_limits,
        rseq: own_rseq(),
        shell_pgid: nix::unistd::getpgrp().as_raw(),
    })
}

/// glibc's rseq registration of the calling thread (inherited by the child),
/// with candidate lengths: glibc registers 32 bytes or more, and
/// `__rseq_size` names the feature size on newer versions.
fn own_rseq() -> Option<(u64, [u64; abi::RSEQ_UNREG_TRIES], u64)> {
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names; the symbols,
    // when present, are glibc's `ptrdiff_t __rseq_offset` and
    // `unsigned int __rseq_size`, read once.
    let (off, size) = unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr());
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr());
        if off.is_null() || size.is_null() {
            return None;
        }
        (*(off as *const isize), *(size as *const u32) as u64)
    };
    if size == 0 {
        return None;
    }
    let tp: u64;
    // SAFETY: on x86-64 glibc, fs:0 holds the thread pointer (TCB self-pointer).
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly)) };
    let ptr = tp.wrapping_add(off as u64);
    Some((ptr, [size, 32, size.div_ceil(32) * 32, 64], 0x5305_3053))
}

fn check_files(
    mm: &crm_proto::image::MmCore,
    files: &crm_proto::image::FilesCore,
) -> Result<(), RestoreError> {
    for f in &files.fds {
        if let Some(crm_proto::image::fd_entry::Kind::Fifo(p)) = &f.kind {
            crate::files::fifo::preflight(f.fd, p).map_err(|what| RestoreError::FileChanged {
                path: p.file.as_ref().map_or(String::new(), |i| i.path.clone()),
                what,
            })?;
        }
        if let Some(crm_proto::image::fd_entry::Kind::Regular(r)) = &f.kind {
            if r.dup_of.is_some() {
                continue; // a duplicate of a lower fd, checked with it
            }
            let path = r.file.as_ref().map_or("", |f| f.path.as_str());
            // An unlinked file is recreated in its directory.
            let path = match r.ghost {
                Some(_) => crate::files::regular::ghost_dir(path),
                None => path,
            };
            if let Err(e) = std::fs::metadata(path) {
                return Err(RestoreError::FileChanged {
                    path: path.to_string(),
                    what: format!("fd {} cannot be reopened: {e}", f.fd),
                });
            }
        }
    }
    for v in &mm.vmas {
        let (VmaKind::File, Some(f)) = (v.kind(), v.file.as_ref()) else {
            continue;
        };
        let meta = std::fs::metadata(&f.path).map_err(|e| RestoreError::FileChanged {
            path: f.path.clone(),
            what: format!("cannot stat it: {e}"),
        })?;
        use std::os::unix::fs::MetadataExt;
        if !v.shared && meta.size() != f.size {
            return Err(RestoreError::FileChanged {
                path: f.path.clone(),
                what: format!("size {} in the image, {} now", f.size, meta.size()),
            });
        }
    }
    Ok(())
}

/// An image read and checked against this host, with its restore plan.
struct Prepared {
    core: crm_proto::image::TaskCore,
    pages: crate::image::PagesReader,
    plan: plan::Plan,
    /// The memfds and ptys of the plan, open until the restore is over.
    _objects: Vec<OwnedFd>,
}

/// Reads `dir` and runs every check a restore makes before it creates the
/// process, except whether the PIDs are free.
fn prepare(dir: &Path, opts: &RestoreOptions) -> Result<Prepared, RestoreError> {
    let image = ImageDir::open(dir)?;
    let inv = image.read_inventory()?;
    if inv.pids.len() != 1 || inv.pids[0] != inv.root_pid {
        return Err(RestoreError::InvalidImage {
            what: format!(
                "the inventory lists {} tasks but the image has no usable tree.img",
                inv.pids.len()
            ),
        });
    }
    check_inventory(&inv, opts)?;
    let pid = inv.root_pid;
    let core = image.read_core(pid)?;
    let mm = image.read_mm(pid)?;
    let files = image.read_files(pid)?;
    let pages = image.pages_reader(pid)?;
    if core.pid != pid {
        return Err(RestoreError::InvalidImage {
            what: format!("core record is for PID {}, inventory says {pid}", core.pid),
        });
    }
    check_files(&mm, &files)?;
    let host = host_facts()?;
    let plan = plan::build(
        &plan::Inputs {
            core: &core,
            mm: &mm,
            files: &files,
            runs: pages.runs(),
            shell_job: inv.shell_job,
            lazy: match (opts.lazy_pages, &opts.lazy_socket) {
                (false, _) => plan::LazyPlan::Off,
                (true, None) => plan::LazyPlan::WherePages,
                (true, Some(_)) => plan::LazyPlan::AllEligible,
            },
            tree_member: false,
        },
        &host,
    )?;
    let mut plan = plan;
    let objects = memfd::create(&image, &mut [&mut plan])?;
    Ok(Prepared {
        core,
        pages,
        plan,
        _objects: objects,
    })
}

/// Checks that the image in `dir` can be restored on this host (files,
/// vDSO, CPU, address space), without creating anything. A migration
/// destination runs it before the source gives up its process.
pub fn preflight(dir: &Path, opts: &RestoreOptions) -> Result<(), RestoreError> {
    crate::ipc::preflight(&ImageDir::open(dir)?)?;
    if let Some((image, inv, tree)) = open_tree(dir)? {
        return tree::prepare(&image, &inv, &tree, opts).map(drop);
    }
    prepare(dir, opts).map(drop)
}

/// The image in `dir` if it holds a tree of more than one task.
fn open_tree(
    dir: &Path,
) -> Result<
    Option<(
        ImageDir,
        crm_proto::image::Inventory,
        crm_proto::image::ProcessTree,
    )>,
    RestoreError,
> {
    let image = ImageDir::open(dir)?;
    let inv = image.read_inventory()?;
    match image.read_tree()? {
        Some(t) if t.tasks.len() > 1 || inv.pids.len() > 1 => Ok(Some((image, inv, t))),
        _ => Ok(None),
    }
}

/// Restores the process (or process tree) in `dir`.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    if let Some((image, inv, t)) = open_tree(dir)? {
        return tree::restore(&image, &inv, &t, opts, started);
    }
    let Prepared {
        core,
        pages,
        plan,
        _objects,
    } = prepare(dir, opts)?;
    let pid = plan.pid;
    for t in &core.threads {
        check_pid_free(t.tid)?;
    }
    tracing::debug!(
        zone = format_args!("{:#x}+{:#x}", plan.zone_start, plan.zone_len),
        "restore plan ready"
    );

    let pipe = |what: &str| -> Result<(OwnedFd, OwnedFd), RestoreError> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(RestoreError::Io {
                what: format!("create the {what} pipe"),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: both descriptors are fresh and ours.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (go_r, go_w) = pipe("start")?;
    let (err_r, err_w) = pipe("error")?;

    let child = clone_with_pid(pid)?;
    if child == 0 {
        drop(go_w);
        drop(err_r);
        child::run(&plan, &pages, pages.runs(), go_r, err_w);
    }
    drop(go_r);
    drop(err_w);
    let mut err_pipe = std::fs::File::from(err_r);
    // Made after the fork: the child holds no copy of the guard.
    let mut ipc = None;
    let result = (|| {
        // SysV objects before the task runs: it attaches its segments.
        let attached = plan.premaps.iter().filter_map(|p| p.sysv.map(|s| s.shmid));
        ipc = Some(crate::ipc::restore(&ImageDir::open(dir)?, attached)?);
        ptrace::seize(pid, ptrace::PTRACE_O_TRACECLONE | ptrace::PTRACE_O_EXITKILL).map_err(
            |source| RestoreError::Ptrace {
                tid: pid,
                what: "seize the restoring task".into(),
                source,
            },
        )?;
        std::fs::File::from(go_w)
            .write_all_once()
            .map_err(|source| RestoreError::Io {
                what: "start the restoring task".into(),
                source,
            })?;
        tracer::supervise(&plan, &mut err_pipe)?;
        if let Some(ipc) = ipc.take() {
            ipc.attached()?;
        }
        let total_pages = pages.total_pages();
        let lazy = match (opts.lazy_pages, &opts.lazy_socket) {
            (false, _) => None,
            (true, None) => Some((pages, plan.lazy_ranges(), lazy::LazyMode::Image)),
            (true, Some(sock)) => {
                let sock = sock.try_clone().map_err(|source| RestoreError::Io {
                    what: "duplicate the lazy-pages socket".into(),
                    source,
                })?;
                Some((pages, plan.lazy_ranges(), lazy::LazyMode::External(sock)))
            }
        };
        tracer::finish(&plan, &core, lazy).map(|l| (l, total_pages))
    })();
    let (lazy, total_pages) = match result {
        Ok(r) => r,
        Err(e) => {
            tracer::kill_and_reap(pid);
            return Err(e);
        }
    };
    if core.job_stopped {
        stop_again(pid)?;
    }
    let report = RestoreReport {
        pid,
        tasks: 1,
        threads: core.threads.len(),
        pages: total_pages,
        elapsed: started.elapsed(),
        lazy,
    };
    tracing::debug!(pid, "restored process running");
    Ok(report)
}

/// Stops a restored task that job control had stopped when it was dumped
/// (`TaskCore.job_stopped`): SIGSTOP, as a shell's Ctrl-Z would; SIGCONT
/// resumes it.
pub(crate) fn stop_again(pid: i32) -> Result<(), RestoreError> {
    // SAFETY: kill(2) with a PID this restore created and a signal number.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return Err(RestoreError::Io {
            what: format!("stop the restored task {pid} again (it was stopped when dumped)"),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::debug!(pid, "stopped again, as when dumped");
    Ok(())
}

/// Waits for a restored (detached) child to exit; returns its wait status.
/// What the inventory asks of this restore: the shell-job option and the
/// CPU's XSAVE features.
pub(crate) fn check_inventory(
    inv: &crm_proto::image::Inventory,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    if inv.shell_job && !opts.shell_job {
        return Err(RestoreError::ShellJob);
    }
    let missing = inv.xfeatures & !cpu_xfeatures();
    if missing != 0 {
        return Err(RestoreError::Cpu {
            what: format!("XSAVE features {missing:#x}"),
        });
    }
    Ok(())
}

/// `clone3(set_tid = pid)`: 0 in the child, the PID in the parent; a PID
/// taken since the preflight is [`RestoreError::PidBusy`].
pub(crate) fn clone_with_pid(pid: i32) -> Result<i32, RestoreError> {
    crate::sys::clone3_with_pid(pid).map_err(|source| {
        if source.raw_os_error() == Some(libc::EEXIST) {
            RestoreError::PidBusy {
                pid,
                holder: "another process (it appeared during the restore)".into(),
            }
        } else {
            RestoreError::Io {
                what: format!("clone3 with PID {pid}"),
                source,
            }
        }
    })
}

pub fn wait_exit(pid: i32) -> std::io::Result<i32> {
    loop {
        let (p, st) = ptrace::wait(pid, 0)?;
        if p == pid && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) {
            return Ok(st);
        }
    }
}

trait WriteOnce {
    fn write_all_once(self) -> std::io::Result<()>;
}

impl WriteOnce for std::fs::File {
    fn write_all_once(mut self) -> std::io::Result<()> {
        use std::io::Write;
        self.write_all(b"g")
    }
}
