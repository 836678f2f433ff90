//! `dump`: checkpoint one process (all its threads) into an image directory.
//!
//! Order: refuse early what cannot be restored (shell jobs without
//! `shell_job`, unsupported fds), freeze, collect state with ptrace and remote
//! syscalls, classify VMAs, stream pages, write the records, and only then
//! kill the process (or resume it with `leave_running`). Any error resumes
//! the process untouched: the [`FrozenProcess`] is released on drop.
mod memory;
mod posix_timers;
mod task;

pub use memory::{
    classify, dump_pages, dump_ranges, resident_ranges, MemStats, PageSink, Target, PAGE,
};

use crate::freeze::{FreezeError, FrozenProcess};
use crate::image::{ImageDir, ImageError};
use crate::procfs::{self, ProcError};
use crate::remote::{self, RemoteError};
use crm_proto::image::{Inventory, VmaKind};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(
        "process {pid} is not a session leader (session {sid} belongs to another process, \
         probably a shell); dump it with --shell-job to restore it into the restoring \
         shell's session"
    )]
    ShellJob { pid: i32, sid: i32 },
    #[error(transparent)]
    Files(#[from] crate::files::FilesError),
    #[error("process {pid}: mapping {start:#x}-{end:#x} {name:?} is {what}, which cannot be checkpointed yet")]
    UnsupportedVma {
        pid: i32,
        start: u64,
        end: u64,
        name: String,
        what: String,
    },
    #[error("process {pid} cannot be checkpointed: {what}")]
    Unsupported { pid: i32, what: String },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("process {pid}, thread {tid}: cannot {what}")]
    Ptrace {
        pid: i32,
        tid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}: {what}")]
    Io {
        pid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Resume the process after the dump instead of killing it.
    pub leave_running: bool,
    /// Allow a process that shares its session with a shell.
    pub shell_job: bool,
}

#[derive(Debug, Clone, Default)]
pub struct DumpStats {
    pub threads: usize,
    pub vmas: usize,
    pub mem: MemStats,
    /// Bytes of page data written.
    pub page_bytes: u64,
    /// Process frozen → image complete.
    pub frozen_for: Duration,
    pub total: Duration,
}

/// Everything but page contents of a frozen task, ready to be written to an
/// image directory or sent to a migration destination.
#[derive(Debug, Clone)]
pub struct TaskState {
    pub inventory: Inventory,
    pub core: crm_proto::image::TaskCore,
    pub mm: crm_proto::image::MmCore,
    pub files: crm_proto::image::FilesCore,
}

/// Refusals that need no freeze: missing PID, ourselves, shell jobs without
/// the flag, fds and mappings that cannot be restored yet.
pub fn precheck(pid: i32, opts: &DumpOptions) -> Result<(), DumpError> {
    let stat = procfs::read_stat(pid).map_err(|e| {
        if e.is_not_found() {
            DumpError::Freeze(FreezeError::NoSuchProcess { pid })
        } else {
            DumpError::Proc(e)
        }
    })?;
    if pid == std::process::id() as i32 {
        return Err(FreezeError::IsSelf { pid }.into());
    }
    if stat.session != pid && !opts.shell_job {
        return Err(DumpError::ShellJob {
            pid,
            sid: stat.session,
        });
    }
    crate::files::dump(pid)?;
    // `maps` suffices to refuse what cannot be dumped (`smaps` would walk
    // every page table, tens of ms per GiB).
    classify(pid, &procfs::read_maps(pid)?)?;
    Ok(())
}

/// Collects the state of a frozen task (registers, signals, creds, VMAs,
/// files ...). Uses a scratch page mapped into the target and removed again
/// before the VMAs are read.
pub fn collect_state(frozen: &FrozenProcess) -> Result<TaskState, DumpError> {
    let pid = frozen.pid();
    let mut state = collect_task(frozen, &procfs::read_maps(pid)?)?;
    state.mm.vmas = classify(pid, &procfs::read_smaps(pid)?)?;
    Ok(state)
}

/// [`collect_state`] without the VMAs (`mm.vmas` is left empty): the
/// caller reads `smaps` once this returns (the scratch page is gone then)
/// and fills them in with [`classify`]. `maps` is a reading of the task's
/// `maps` or `smaps` (only its `[vdso]` is used).
pub fn collect_task(
    frozen: &FrozenProcess,
    maps: &[procfs::MapEntry],
) -> Result<TaskState, DumpError> {
    let pid = frozen.pid();
    let stat = procfs::read_stat(pid)?;
    let files = crate::files::dump(pid)?;
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| DumpError::Unsupported {
            pid,
            what: "it has no [vdso] mapping (needed for remote syscalls)".into(),
        })?;
    let gadget =
        remote::find_vdso_gadget(pid, vdso.start, vdso.len()).map_err(|source| DumpError::Io {
            pid,
            what: "find a syscall instruction in [vdso]".into(),
            source,
        })?;
    let scratch = task::Scratch::map(pid, gadget)?;
    let collected = task::collect(frozen, gadget, &scratch);
    scratch.unmap()?;
    let collected = collected?;
    let mm = task::mm_fields(pid, collected.brk)?;
    let inventory = Inventory {
        format_version: crm_proto::IMAGE_FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        root_pid: pid,
        pids: vec![pid],
        shell_job: stat.session != pid,
        page_size: PAGE as u32,
        xfeatures: crate::restore::cpu_xfeatures(),
        dirty_tracking: String::new(),
        parent_image: String::new(),
    };
    Ok(TaskState {
        inventory,
        core: collected.core,
        mm,
        files,
    })
}

/// Writes the records of `state` into `image`; the inventory last, so an
/// image without one is known to be incomplete.
pub fn write_state(image: &ImageDir, state: &TaskState) -> Result<(), DumpError> {
    let pid = state.core.pid;
    image.write_core(pid, &state.core)?;
    image.write_mm(pid, &state.mm)?;
    image.write_files(pid, &state.files)?;
    image.write_inventory(&state.inventory)?;
    Ok(())
}

/// Checkpoints process `pid` into `dir` (created; must not hold an image).
pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let started = Instant::now();
    precheck(pid, opts)?;
    let frozen = FrozenProcess::freeze(pid)?;
    let frozen_at = Instant::now();
    let state = collect_state(&frozen)?;
    let image = ImageDir::create(dir)?;
    let mut pages = image.pages_writer(pid)?;
    let mem = memory::dump_pages(pid, Target::Frozen, &state.mm.vmas, &mut pages)?;
    pages.finish()?;
    write_state(&image, &state)?;
    let frozen_for = frozen_at.elapsed();

    let threads = state.core.threads.len();
    let nvmas = state
        .mm
        .vmas
        .iter()
        .filter(|v| v.kind() != VmaKind::Vsyscall)
        .count();
    if opts.leave_running {
        frozen.thaw().map_err(|source| DumpError::Io {
            pid,
            what: "resume the process after the dump".into(),
            source,
        })?;
    } else {
        frozen.kill().map_err(|source| DumpError::Io {
            pid,
            what: "kill the process after the dump".into(),
            source,
        })?;
    }
    Ok(DumpStats {
        threads,
        vmas: nvmas,
        mem,
        page_bytes: mem.pages_written * PAGE,
        frozen_for,
        total: started.elapsed(),
    })
}
