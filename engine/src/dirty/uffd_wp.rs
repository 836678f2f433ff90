//! [`UffdWpAsync`]: dirty tracking with a userfaultfd in async
//! write-protect mode and `PAGEMAP_SCAN` (Linux ≥ 6.7).
//!
//! A userfaultfd tracks the mm of the process that *created* it, so it is
//! created inside the stopped target (a remote `userfaultfd(2)`), copied into
//! the dumper with `pidfd_getfd`, and closed again in the target, which keeps
//! no extra fd. From then on everything happens from our side on the pulled
//! fd, with the target running:
//!
//! - `arm`: `UFFDIO_REGISTER` (mode WP) over each VMA, then
//!   `UFFDIO_WRITEPROTECT` of the newly registered ranges. With
//!   `UFFD_FEATURE_WP_UNPOPULATED` that protects never-touched pages too
//!   (page tables are allocated and hold markers). A protect-only
//!   `PAGEMAP_SCAN` is not used for this: per `fs/proc/task_mmu.c` its
//!   page-table-hole callback protects only ranges matching the category
//!   masks, so never-touched ranges would stay unprotected.
//! - A write to a protected page faults; with `UFFD_FEATURE_WP_ASYNC` the
//!   kernel lifts the protection of that page at once and the writer goes on
//!   (it never waits for us); the page is now "written".
//! - `collect`: `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING |
//!   PM_SCAN_CHECK_WPASYNC` and exactly `category_mask = return_mask =
//!   PAGE_IS_WRITTEN` returns the written ranges and re-protects each page
//!   under its page-table lock in the same walk. With exactly these masks the
//!   kernel takes its fast path, which also reports (and re-protects) a page
//!   zapped by `MADV_DONTNEED` — its content changed to zeros. Other masks
//!   misreport such pages as clean on kernels before mid-2026 fixes.
//! - `disarm`: `UFFDIO_UNREGISTER` (which also lifts every protection), then
//!   close the fd. Closing the last reference alone would do the same
//!   (`userfaultfd_release`), so even a dumper that dies leaves the target
//!   untouched. Once the target has exited (a pidfd taken at creation
//!   tells), `disarm` only closes the fd: its mm is gone, and its PID may
//!   already name another process (a same-host migration's restored copy),
//!   whose `smaps` must not be read.
//!
//! A registration does not survive `munmap` or `mremap` (this context has no
//! `EVENT_REMAP`); protection survives page-table zaps. A VMA re-created at
//! a tracked address is unregistered: `PAGEMAP_SCAN` refuses it with `EPERM`
//! (`PM_SCAN_CHECK_WPASYNC`), and `collect` then reports its whole range as
//! written until the next `arm` registers it again. The ranges the kernel
//! had found (and re-protected) in the same call before it failed are kept:
//! it copies them out before returning the error.
//!
//! Verified on Linux 6.18 (`dirty::tests`): a page zapped by
//! `MADV_DONTNEED` is reported, also when a whole 2 MiB page table was zapped
//! (`CONFIG_PT_RECLAIM=y`); transparent huge pages are reported per 4 KiB
//! page; writes made by the kernel for the target (e.g. `getrandom` into a
//! protected buffer) are tracked, also with a `UFFD_USER_MODE_ONLY` fd;
//! more written ranges than one output vector holds are all returned.

use super::uffd_sys::{self, PageRegion, PmScanArg};
use super::{
    covered, mapped_pieces, normalize, push_range, sort_merge, subtract, DirtyError, DirtyRange,
    DirtyTracker, VmaRange,
};
use crate::features::DIRTY_TRACKER_UFFD_WP_ASYNC;
use crate::freeze::FrozenProcess;
use crate::procfs;
use crate::remote::{find_vdso_gadget, RemoteError, RemoteThread};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

/// `CAP_SYS_PTRACE`, needed by `userfaultfd(2)` without
/// `UFFD_USER_MODE_ONLY` when `vm.unprivileged_userfaultfd` is 0.
const CAP_SYS_PTRACE: u32 = 19;

/// Regions returned per `PAGEMAP_SCAN` call (24 bytes each); more are
/// fetched by calling again from `walk_end`.
const SCAN_BATCH: usize = 4096;

/// The `PAGEMAP_SCAN` flags of a collect.
const SCAN_FLAGS: u64 = uffd_sys::PM_SCAN_WP_MATCHING | uffd_sys::PM_SCAN_CHECK_WPASYNC;

/// Tracks writes with a userfaultfd in async write-protect mode; see the
/// module documentation.
pub struct UffdWpAsync {
    pid: i32,
    /// The userfaultfd (created in the target, pulled into us); `None` once
    /// disarmed.
    uffd: Option<OwnedFd>,
    /// `/proc/PID/pagemap`, for `PAGEMAP_SCAN`.
    pagemap: File,
    /// The target's pidfd: tells whether it has exited.
    pidfd: OwnedFd,
    /// Sorted, disjoint spans passed to the last `arm`.
    tracked: Vec<VmaRange>,
    /// Whether the uffd was created with `UFFD_USER_MODE_ONLY`.
    user_mode_only: bool,
    /// Features `UFFDIO_API` reported.
    features: u64,
    /// Output buffer of `PAGEMAP_SCAN`.
    buf: Vec<PageRegion>,
}

impl UffdWpAsync {
    /// Creates the userfaultfd inside `frozen` (the stopped process `pid`),
    /// pulls it out and enables `WP_ASYNC | WP_UNPOPULATED`. The target
    /// needs to stay stopped only during this call; nothing is tracked until
    /// [`DirtyTracker::arm`]. Must run on the thread that froze the target.
    pub fn new(pid: i32, frozen: &FrozenProcess) -> Result<UffdWpAsync, DirtyError> {
        if frozen.pid() != pid {
            return Err(DirtyError::WrongProcess {
                pid,
                frozen: frozen.pid(),
            });
        }
        let (uffd, user_mode_only, pidfd) = create_in_target(pid, frozen)?;
        let features = enable_features(pid, &uffd)?;
        let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let pagemap = File::open(&path).map_err(|source| DirtyError::File {
            pid,
            op: "open",
            path,
            source,
        })?;
        tracing::debug!(
            pid,
            user_mode_only,
            features,
            "userfaultfd created in target"
        );
        Ok(UffdWpAsync {
            pid,
            uffd: Some(uffd),
            pagemap,
            pidfd,
            tracked: Vec::new(),
            user_mode_only,
            features,
            buf: vec![PageRegion::default(); SCAN_BATCH],
        })
    }

    /// Whether the target lacked `CAP_SYS_PTRACE` and the userfaultfd was
    /// created with `UFFD_USER_MODE_ONLY` (write tracking is the same: async
    /// write faults are resolved before the user-mode check applies).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// The userfaultfd features the kernel reported.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The spans passed to the last `arm` (sorted, merged).
    pub fn tracked(&self) -> &[VmaRange] {
        &self.tracked
    }

    fn disarmed(&self) -> DirtyError {
        DirtyError::Disarmed {
            pid: self.pid,
            tracker: DIRTY_TRACKER_UFFD_WP_ASYNC,
        }
    }

    fn smaps(&self) -> Result<Vec<procfs::MapEntry>, DirtyError> {
        procfs::read_smaps(self.pid).map_err(|source| DirtyError::Proc {
            pid: self.pid,
            source,
        })
    }

    /// `PAGEMAP_SCAN` of `[start, end)`, appending written ranges to `out`
    /// and looping while the output vector fills up. On an error, the ranges
    /// the kernel had already reported (and re-protected) are still appended.
    fn scan(&mut self, start: u64, end: u64, out: &mut Vec<DirtyRange>) -> io::Result<()> {
        let mut cur = start;
        while cur < end {
            // Zeroed so that after a failed call the regions the kernel did
            // write (it copies them out before returning the error) are
            // recognisable: the others stay empty.
            self.buf.fill(PageRegion::default());
            let mut arg = PmScanArg {
                flags: SCAN_FLAGS,
                start: cur,
                end,
                category_mask: uffd_sys::PAGE_IS_WRITTEN,
                return_mask: uffd_sys::PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            match uffd_sys::pagemap_scan(self.pagemap.as_fd(), &mut arg, &mut self.buf) {
                Ok(n) => {
                    for r in &self.buf[..n] {
                        push_range(out, r.start, r.end);
                    }
                    if arg.walk_end >= end {
                        return Ok(());
                    }
                    if arg.walk_end <= cur {
                        return Err(io::Error::other(format!(
                            "PAGEMAP_SCAN made no progress at {cur:#x}"
                        )));
                    }
                    cur = arg.walk_end;
                }
                Err(e) => {
                    for r in self.buf.iter().take_while(|r| r.end > r.start) {
                        push_range(out, r.start, r.end);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Collects one span after `PAGEMAP_SCAN` refused it with `EPERM`: a VMA
    /// in it is not (or no longer) registered, because it was unmapped and
    /// mapped again or moved. Registered parts are scanned VMA by VMA;
    /// unregistered mapped parts are reported whole (their contents may be
    /// anything now); unmapped parts yield nothing.
    fn collect_unregistered(
        &mut self,
        span: VmaRange,
        out: &mut Vec<DirtyRange>,
    ) -> Result<(), DirtyError> {
        let maps = self.smaps()?;
        for (start, end, m) in mapped_pieces(span, &maps) {
            if !m.has_flag("uw") {
                tracing::debug!(
                    pid = self.pid,
                    start,
                    end,
                    "tracked range lost its registration"
                );
                push_range(out, start, end);
                continue;
            }
            match self.scan(start, end, out) {
                Ok(()) => {}
                // Replaced again since smaps was read: report it whole.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => push_range(out, start, end),
                Err(source) => {
                    return Err(DirtyError::Ioctl {
                        pid: self.pid,
                        ioctl: "PAGEMAP_SCAN",
                        start,
                        end,
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

impl UffdWpAsync {
    /// [`DirtyTracker::arm`]; `protect: false` registers the ranges but
    /// leaves their protection to [`DirtyTracker::protect`].
    fn arm_with(&mut self, vmas: &[VmaRange], protect: bool) -> Result<(), DirtyError> {
        let pid = self.pid;
        let wanted = normalize(pid, vmas)?;
        // Which VMAs carry our registration (`uw` in smaps' VmFlags) matters
        // only once something is tracked; the first arm reads the cheap
        // `maps` (smaps walks every page table).
        let maps = if self.tracked.is_empty() {
            procfs::read_maps(pid).map_err(|source| DirtyError::Proc { pid, source })?
        } else {
            self.smaps()?
        };
        let uffd = self.uffd.as_ref().ok_or_else(|| self.disarmed())?.as_fd();
        let ioctl_err = |ioctl, start, end| {
            move |source| DirtyError::Ioctl {
                pid,
                ioctl,
                start,
                end,
                source,
            }
        };
        // Drop what is no longer wanted (and still registered).
        for span in subtract(&self.tracked, &wanted) {
            for (start, end, m) in mapped_pieces(span, &maps) {
                if m.has_flag("uw") {
                    uffd_sys::unregister(uffd, start, end - start).map_err(ioctl_err(
                        "UFFDIO_UNREGISTER",
                        start,
                        end,
                    ))?;
                }
            }
        }
        let old = std::mem::take(&mut self.tracked);
        // Until this returns, disarm must consider everything.
        self.tracked = super::normalize(pid, &[old.clone(), wanted.clone()].concat())?;
        for &span in &wanted {
            for (start, end, m) in mapped_pieces(span, &maps) {
                // Registering a range this uffd already has is a no-op; one
                // registered with another userfaultfd fails with EBUSY.
                uffd_sys::register_wp(uffd, start, end - start).map_err(ioctl_err(
                    "UFFDIO_REGISTER",
                    start,
                    end,
                ))?;
                // Protecting a range again would hide its pending writes, so
                // only what was not tracked (or lost its registration) is.
                if protect && !(m.has_flag("uw") && covered(&old, start, end)) {
                    uffd_sys::writeprotect(uffd, start, end - start).map_err(ioctl_err(
                        "UFFDIO_WRITEPROTECT",
                        start,
                        end,
                    ))?;
                }
            }
        }
        self.tracked = wanted;
        Ok(())
    }
}

impl DirtyTracker for UffdWpAsync {
    fn name(&self) -> &'static str {
        DIRTY_TRACKER_UFFD_WP_ASYNC
    }

    fn arm(&mut self, vmas: &[VmaRange]) -> Result<(), DirtyError> {
        self.arm_with(vmas, true)
    }

    fn arm_deferred(&mut self, vmas: &[VmaRange]) -> Result<bool, DirtyError> {
        self.arm_with(vmas, false).map(|()| true)
    }

    fn protect(&mut self, start: u64, end: u64) -> Result<(), DirtyError> {
        let pid = self.pid;
        let uffd = self.uffd.as_ref().ok_or_else(|| self.disarmed())?.as_fd();
        match uffd_sys::writeprotect(uffd, start, end - start) {
            Ok(()) => Ok(()),
            // Unmapped (or shrunk) meanwhile: the next round sees the new
            // layout and copies what is new whole.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
                tracing::debug!(
                    pid,
                    "{start:#x}-{end:#x} not protected ({e}): unmapped meanwhile?"
                );
                Ok(())
            }
            Err(source) => Err(DirtyError::Ioctl {
                pid,
                ioctl: "UFFDIO_WRITEPROTECT",
                start,
                end,
                source,
            }),
        }
    }

    fn collect(&mut self) -> Result<Vec<DirtyRange>, DirtyError> {
        if self.uffd.is_none() {
            return Err(self.disarmed());
        }
        let mut out = Vec::new();
        for span in self.tracked.clone() {
            let mut part = Vec::new();
            match self.scan(span.start, span.end, &mut part) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    self.collect_unregistered(span, &mut part)?;
                    part = sort_merge(part);
                }
                Err(source) => {
                    return Err(DirtyError::Ioctl {
                        pid: self.pid,
                        ioctl: "PAGEMAP_SCAN",
                        start: span.start,
                        end: span.end,
                        source,
                    })
                }
            }
            for r in part {
                push_range(&mut out, r.start, r.end);
            }
        }
        Ok(out)
    }

    fn disarm(&mut self) -> Result<(), DirtyError> {
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        let tracked = std::mem::take(&mut self.tracked);
        let mut first_err = None;
        if uffd_sys::pidfd_exited(self.pidfd.as_fd()).unwrap_or(false) {
            tracing::debug!(pid = self.pid, "target has exited: uffd closed");
            return Ok(());
        }
        match self.smaps() {
            Ok(maps) => {
                for span in tracked {
                    for (start, end, m) in mapped_pieces(span, &maps) {
                        if !m.has_flag("uw") {
                            continue;
                        }
                        if let Err(source) = uffd_sys::unregister(uffd.as_fd(), start, end - start)
                        {
                            first_err.get_or_insert(DirtyError::Ioctl {
                                pid: self.pid,
                                ioctl: "UFFDIO_UNREGISTER",
                                start,
                                end,
                                source,
                            });
                        }
                    }
                }
            }
            // The target is gone (or /proc unreadable): closing is enough.
            Err(e) => {
                tracing::debug!(pid = self.pid, error = %e, "disarm without smaps");
            }
        }
        // The last reference: the kernel drops any registration left.
        drop(uffd);
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for UffdWpAsync {
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            tracing::warn!(pid = self.pid, error = %super::error_chain(&e), "disarm on drop");
        }
    }
}

/// Creates the userfaultfd in the target and pulls it into this process.
/// Returns the fd, whether it is `UFFD_USER_MODE_ONLY`, and the target's
/// pidfd it was pulled with.
fn create_in_target(
    pid: i32,
    frozen: &FrozenProcess,
) -> Result<(OwnedFd, bool, OwnedFd), DirtyError> {
    let proc_err = |source| DirtyError::Proc { pid, source };
    // Remote syscalls follow: from the process's own CPU.
    let _cpu = crate::same_cpu::SameCpu::as_task(pid);
    // `maps`, not `smaps`: only the vDSO's bounds are needed, and smaps
    // walks every page table (tens of ms on a GiB, with the process frozen).
    let maps = procfs::read_maps(pid).map_err(proc_err)?;
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or(DirtyError::NoVdso { pid })?;
    let gadget =
        find_vdso_gadget(pid, vdso.start, vdso.len()).map_err(|source| DirtyError::NoGadget {
            pid,
            vdso: vdso.start,
            source,
        })?;
    let tid = frozen
        .threads()
        .first()
        .map(|t| t.tid)
        .ok_or(DirtyError::NoThread { pid })?;
    let thread = RemoteThread { tid, gadget };
    let remote_err = |syscall| {
        move |source| DirtyError::Remote {
            pid,
            tid,
            syscall,
            source,
        }
    };

    let status = procfs::read_status(pid).map_err(proc_err)?;
    let privileged = status.cap_eff & (1 << CAP_SYS_PTRACE) != 0;
    let base = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let call = |flags: u64| thread.syscall(libc::SYS_userfaultfd as u64, [flags, 0, 0, 0, 0, 0]);
    let (remote_fd, user_mode_only) = if privileged {
        match call(base) {
            Ok(fd) => (fd, false),
            Err(RemoteError::Failed { source, .. })
                if source.raw_os_error() == Some(libc::EPERM) =>
            {
                let fd = call(base | uffd_sys::UFFD_USER_MODE_ONLY)
                    .map_err(remote_err("userfaultfd(UFFD_USER_MODE_ONLY)"))?;
                (fd, true)
            }
            Err(e) => return Err(remote_err("userfaultfd")(e)),
        }
    } else {
        let fd = call(base | uffd_sys::UFFD_USER_MODE_ONLY)
            .map_err(remote_err("userfaultfd(UFFD_USER_MODE_ONLY)"))?;
        (fd, true)
    };
    let remote_fd = remote_fd as i32;

    let pulled = uffd_sys::pidfd_open(pid)
        .map_err(|source| DirtyError::Syscall {
            pid,
            syscall: "pidfd_open",
            source,
        })
        .and_then(|pidfd| {
            uffd_sys::pidfd_getfd(pidfd.as_fd(), remote_fd)
                .map(|uffd| (uffd, pidfd))
                .map_err(|source| DirtyError::Syscall {
                    pid,
                    syscall: "pidfd_getfd",
                    source,
                })
        });
    // Whatever happened, the target must not keep the fd.
    let closed = thread
        .syscall(libc::SYS_close as u64, [remote_fd as u64, 0, 0, 0, 0, 0])
        .map_err(remote_err("close"));
    let (uffd, pidfd) = pulled?;
    closed?;
    Ok((uffd, user_mode_only, pidfd))
}

/// `UFFDIO_API` with `WP_ASYNC | WP_UNPOPULATED`; returns the features the
/// kernel reported, or which of the two it lacks.
fn enable_features(pid: i32, uffd: &OwnedFd) -> Result<u64, DirtyError> {
    let want = uffd_sys::UFFD_FEATURE_WP_ASYNC | uffd_sys::UFFD_FEATURE_WP_UNPOPULATED;
    let missing_of = |offered: u64| {
        if offered & uffd_sys::UFFD_FEATURE_WP_ASYNC == 0 {
            Some("UFFD_FEATURE_WP_ASYNC")
        } else if offered & uffd_sys::UFFD_FEATURE_WP_UNPOPULATED == 0 {
            Some("UFFD_FEATURE_WP_UNPOPULATED")
        } else {
            None
        }
    };
    match uffd_sys::uffdio_api(uffd.as_fd(), want) {
        Ok(api) => match missing_of(api.features) {
            None => Ok(api.features),
            Some(missing) => Err(DirtyError::MissingFeature {
                pid,
                missing,
                offered: api.features,
            }),
        },
        Err(source) => {
            // EINVAL: a requested feature is unknown. The answer was zeroed,
            // so ask a fresh userfaultfd of our own what the kernel offers.
            let offered = uffd_sys::userfaultfd(
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd_sys::UFFD_USER_MODE_ONLY,
            )
            .and_then(|probe| uffd_sys::uffdio_api(probe.as_fd(), 0))
            .map(|api| api.features);
            match offered.ok().and_then(|o| missing_of(o).map(|m| (m, o))) {
                Some((missing, offered)) => Err(DirtyError::MissingFeature {
                    pid,
                    missing,
                    offered,
                }),
                None => Err(DirtyError::Ioctl {
                    pid,
                    ioctl: "UFFDIO_API",
                    start: 0,
                    end: 0,
                    source,
                }),
            }
        }
    }
}
