//! Probes of the running kernel's features that checkpoint/restore depends on.
//!
//! Every probe exercises the interface for real on this host — it forks a
//! child and seizes it, creates a userfaultfd and tracks a write, puts a TCP
//! socket in repair mode, … — and tears down everything it created before it
//! returns (children are killed and reaped, fds closed, mappings unmapped).
//! No probe trusts a kernel version number. A probe never panics: a failure
//! is a report with `available == false` and a `detail` saying why.
//!
//! `cr-migrate check` prints [`probe_all`]; the dump side picks its dirty
//! tracker with [`dirty_tracker_choice`] (DESIGN.md §2.2); tests that need a
//! feature the kernel lacks skip with the probe's `detail` as the reason.
//!
//! The raw kernel interfaces the `libc`/`nix` crates lack (userfaultfd
//! `WP_ASYNC`, `PAGEMAP_SCAN`, `PTRACE_GET_RSEQ_CONFIGURATION`,
//! `NT_X86_XSTATE`, `clone3` with `set_tid`, `PR_SET_MM_MAP`) are defined in
//! the private `sys` module below, the only place with `unsafe`.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::resource::{getrlimit, Resource};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// A kernel feature that [`probe`] can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `PTRACE_SEIZE` + `PTRACE_INTERRUPT` of a forked child.
    Ptrace,
    /// `PTRACE_GET_RSEQ_CONFIGURATION` (request 0x420f) on a stopped child.
    PtraceRseqConfig,
    /// `PTRACE_GETREGSET(NT_X86_XSTATE)`: the full XSAVE area of a stopped child.
    XsaveRegset,
    /// `clone3` with `set_tid`: a child created with a PID chosen by us.
    Clone3SetTid,
    /// `pidfd_open` + `pidfd_getfd`: copying an fd out of another process.
    PidfdGetfd,
    /// The `userfaultfd` syscall and `UFFDIO_API`.
    Userfaultfd,
    /// `UFFD_FEATURE_WP_ASYNC`, checked by tracking one write with `PAGEMAP_SCAN`.
    UffdWpAsync,
    /// `UFFD_FEATURE_WP_UNPOPULATED`, granted by `UFFDIO_API`.
    UffdWpUnpopulated,
    /// The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`.
    PagemapScan,
    /// Soft-dirty bits: `clear_refs` ← 4 and bit 55 of pagemap set by a write.
    SoftDirty,
    /// `TCP_REPAIR` on a fresh TCP socket, with a send-queue sequence set and read back.
    TcpRepair,
    /// `prctl(PR_SET_MM, PR_SET_MM_MAP)`: size query, then a no-op map in a child.
    PrSetMmMap,
    /// `unshare(CLONE_NEWNET)` in a forked child.
    NetNamespace,
    /// The `[vvar_vclock]` mapping (Linux ≥ 6.12) beside `[vvar]` and `[vdso]`.
    VvarVclock,
    /// `CAP_SYS_RESOURCE`: raising a hard rlimit, tried in a forked child.
    CapSysResource,
}

impl Feature {
    /// Every feature, in the order [`probe_all`] reports them.
    pub const ALL: [Feature; 15] = [
        Feature::Ptrace,
        Feature::PtraceRseqConfig,
        Feature::XsaveRegset,
        Feature::Clone3SetTid,
        Feature::PidfdGetfd,
        Feature::Userfaultfd,
        Feature::UffdWpAsync,
        Feature::UffdWpUnpopulated,
        Feature::PagemapScan,
        Feature::SoftDirty,
        Feature::TcpRepair,
        Feature::PrSetMmMap,
        Feature::NetNamespace,
        Feature::VvarVclock,
        Feature::CapSysResource,
    ];

    /// Stable machine-readable name (used in `cr-migrate check --json`).
    pub fn name(self) -> &'static str {
        match self {
            Feature::Ptrace => "ptrace_seize",
            Feature::PtraceRseqConfig => "ptrace_rseq_config",
            Feature::XsaveRegset => "xsave_regset",
            Feature::Clone3SetTid => "clone3_set_tid",
            Feature::PidfdGetfd => "pidfd_getfd",
            Feature::Userfaultfd => "userfaultfd",
            Feature::UffdWpAsync => "uffd_wp_async",
            Feature::UffdWpUnpopulated => "uffd_wp_unpopulated",
            Feature::PagemapScan => "pagemap_scan",
            Feature::SoftDirty => "soft_dirty",
            Feature::TcpRepair => "tcp_repair",
            Feature::PrSetMmMap => "pr_set_mm_map",
            Feature::NetNamespace => "net_namespace",
            Feature::VvarVclock => "vvar_vclock",
            Feature::CapSysResource => "cap_sys_resource",
        }
    }

    /// What cr-migrate does with the feature.
    pub fn enables(self) -> &'static str {
        match self {
            Feature::Ptrace => "freezing a process tree and reading its registers (dump)",
            Feature::PtraceRseqConfig => "saving glibc's per-thread rseq registration",
            Feature::XsaveRegset => "saving the full FPU/SSE/AVX/AVX-512 state",
            Feature::Clone3SetTid => "restoring tasks with their original PIDs and TIDs",
            Feature::PidfdGetfd => "pulling a target's fds into the dumper to inspect them",
            Feature::Userfaultfd => "lazy restore (post-copy) and write tracking",
            Feature::UffdWpAsync => "dirty tracker UffdWpAsync for iterative pre-copy",
            Feature::UffdWpUnpopulated => "write tracking of pages never touched before arming",
            Feature::PagemapScan => "collecting written ranges; skipping absent pages",
            Feature::SoftDirty => "dirty tracker SoftDirty (fallback for pre-copy)",
            Feature::TcpRepair => "dump and restore of established TCP connections",
            Feature::PrSetMmMap => "restoring brk, stack, arg/env, auxv and exe of a task",
            Feature::NetNamespace => "cross-host tests on one machine (netns + veth)",
            Feature::VvarVclock => "vDSO layout: restore moves [vvar], [vvar_vclock], [vdso]",
            Feature::CapSysResource => "restoring hard rlimits above the restorer's own",
        }
    }
}

/// The result of probing one [`Feature`] on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureReport {
    /// Which feature was probed.
    pub feature: Feature,
    /// `feature.name()`.
    pub name: &'static str,
    /// Whether the probe succeeded.
    pub available: bool,
    /// What the probe saw: sizes, flags, or the error that made it fail.
    pub detail: String,
    /// `feature.enables()`.
    pub enables: &'static str,
}

/// Dirty tracker names returned by [`dirty_tracker_choice`], best first
/// (DESIGN.md §2.2).
pub const DIRTY_TRACKER_UFFD_WP_ASYNC: &str = "UffdWpAsync";
/// Soft-dirty bits in pagemap, where the kernel has them.
pub const DIRTY_TRACKER_SOFT_DIRTY: &str = "SoftDirty";
/// Hashing every page every round: slow, works everywhere.
pub const DIRTY_TRACKER_CHECKSUM: &str = "Checksum";

/// Probes every feature in [`Feature::ALL`] order.
pub fn probe_all() -> Vec<FeatureReport> {
    Feature::ALL.iter().map(|&f| probe(f)).collect()
}

/// Probes one feature.
pub fn probe(feature: Feature) -> FeatureReport {
    let result = match feature {
        Feature::Ptrace => probe_ptrace(),
        Feature::PtraceRseqConfig => probe_rseq_config(),
        Feature::XsaveRegset => probe_xsave(),
        Feature::Clone3SetTid => probe_clone3_set_tid(),
        Feature::PidfdGetfd => probe_pidfd_getfd(),
        Feature::Userfaultfd => probe_userfaultfd(),
        Feature::UffdWpAsync => probe_uffd_wp_async(),
        Feature::UffdWpUnpopulated => probe_uffd_wp_unpopulated(),
        Feature::PagemapScan => probe_pagemap_scan(),
        Feature::SoftDirty => probe_soft_dirty(),
        Feature::TcpRepair => probe_tcp_repair(),
        Feature::PrSetMmMap => probe_pr_set_mm_map(),
        Feature::NetNamespace => probe_netns(),
        Feature::VvarVclock => probe_vvar_vclock(),
        Feature::CapSysResource => probe_cap_sys_resource(),
    };
    let (available, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    FeatureReport {
        feature,
        name: feature.name(),
        available,
        detail,
        enables: feature.enables(),
    }
}

/// Picks the dirty tracker for iterative pre-copy from probe results:
/// [`DIRTY_TRACKER_UFFD_WP_ASYNC`] when userfaultfd `WP_ASYNC` and
/// `PAGEMAP_SCAN` both work, else [`DIRTY_TRACKER_SOFT_DIRTY`] when
/// soft-dirty bits work, else [`DIRTY_TRACKER_CHECKSUM`]. A feature missing
/// from `reports` counts as unavailable.
pub fn dirty_tracker_choice(reports: &[FeatureReport]) -> &'static str {
    let has = |f: Feature| reports.iter().any(|r| r.feature == f && r.available);
    if has(Feature::UffdWpAsync) && has(Feature::PagemapScan) {
        DIRTY_TRACKER_UFFD_WP_ASYNC
    } else if has(Feature::SoftDirty) {
        DIRTY_TRACKER_SOFT_DIRTY
    } else {
        DIRTY_TRACKER_CHECKSUM
    }
}

/// A probe's outcome: `Ok(detail)` when available, `Err(detail)` when not.
type Probe = Result<String, String>;

fn errno_text(e: Errno) -> String {
    format!("{} ({})", e, e.desc())
}

fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_text(Errno::from_raw(code)),
        None => e.to_string(),
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(4096)
}

// ---------------------------------------------------------------- ptrace

/// Forks a child that sleeps in `pause()`, seizes and interrupts it, waits
/// for the ptrace stop and hands the stopped child to `f`. The child is
/// killed and reaped when this returns.
fn with_stopped_child<T>(f: impl FnOnce(Pid) -> Result<T, String>) -> Result<T, String> {
    let mut child =
        sys::Child::spawn(|| sys::pause_forever()).map_err(|e| format!("fork: {}", io_text(&e)))?;
    let pid = child.pid();
    ptrace::seize(pid, ptrace::Options::empty())
        .map_err(|e| format!("PTRACE_SEIZE of child {pid}: {}", errno_text(e)))?;
    ptrace::interrupt(pid)
        .map_err(|e| format!("PTRACE_INTERRUPT of child {pid}: {}", errno_text(e)))?;
    match child.wait_status() {
        Ok(WaitStatus::PtraceEvent(_, Signal::SIGTRAP, libc::PTRACE_EVENT_STOP)) => {}
        Ok(other) => {
            return Err(format!(
                "child {pid}: expected a ptrace stop, got {other:?}"
            ))
        }
        Err(e) => return Err(format!("waitpid({pid}): {}", errno_text(e))),
    }
    let out = f(pid);
    drop(child); // SIGKILL + reap; a seized tracee dies like any other
    out
}

fn probe_ptrace() -> Probe {
    with_stopped_child(|pid| {
        let regs = ptrace::getregs(pid)
            .map_err(|e| format!("PTRACE_GETREGS of stopped child {pid}: {}", errno_text(e)))?;
        Ok(format!(
            "seized, interrupted and stopped child {pid} (PTRACE_EVENT_STOP), rip {:#x}",
            regs.rip
        ))
    })
}

fn probe_rseq_config() -> Probe {
    with_stopped_child(|pid| {
        let conf = sys::ptrace_get_rseq_configuration(pid)
            .map_err(|e| format!("PTRACE_GET_RSEQ_CONFIGURATION: {}", io_text(&e)))?;
        if conf.rseq_abi_pointer == 0 {
            Ok("request works; the child has no rseq registered".to_string())
        } else {
            Ok(format!(
                "child's rseq area at {:#x}, size {}, signature {:#x}",
                conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature
            ))
        }
    })
}

/// Names of the XSAVE state components (bits of XCR0 / XSTATE_BV).
fn xfeature_names(mask: u64) -> String {
    const NAMES: [(u32, &str); 13] = [
        (0, "x87"),
        (1, "sse"),
        (2, "avx"),
        (3, "mpx_bndregs"),
        (4, "mpx_bndcsr"),
        (5, "avx512_opmask"),
        (6, "avx512_zmm_hi256"),
        (7, "avx512_hi16_zmm"),
        (9, "pkru"),
        (11, "cet_user"),
        (17, "amx_tilecfg"),
        (18, "amx_tiledata"),
        (19, "apx"),
    ];
    let mut out = String::new();
    let mut rest = mask;
    for (bit, name) in NAMES {
        if mask & (1 << bit) != 0 {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !(1 << bit);
        }
    }
    if rest != 0 {
        let _ = write!(out, "|other:{rest:#x}");
    }
    out
}

/// Offsets in the ptrace XSAVE layout (`struct user_xstateregs`,
/// arch/x86/include/asm/user.h): the first word of the FXSAVE area's
/// software-reserved bytes holds XCR0 (`USER_XSTATE_XCR0_WORD`; GDB reads it
/// there too); the XSAVE header follows the 512-byte legacy area.
const XSTATE_XCR0_OFFSET: usize = 464;
const XSAVE_HEADER_OFFSET: usize = 512;

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

fn probe_xsave() -> Probe {
    with_stopped_child(|pid| {
        let mut buf = vec![0u8; 64 * 1024];
        let len = sys::ptrace_getregset(pid, sys::NT_X86_XSTATE, &mut buf)
            .map_err(|e| format!("PTRACE_GETREGSET(NT_X86_XSTATE): {}", io_text(&e)))?;
        let area = &buf[..len];
        let xcr0 = read_u64(area, XSTATE_XCR0_OFFSET);
        let xstate_bv = read_u64(area, XSAVE_HEADER_OFFSET);
        let (Some(xcr0), Some(xstate_bv)) = (xcr0, xstate_bv) else {
            return Err(format!(
                "XSAVE area of {len} bytes is too short for its header"
            ));
        };
        // x87 and SSE state are always enabled where XSAVE is.
        if xcr0 & 0b11 != 0b11 {
            return Err(format!(
                "{len}-byte area with an implausible XCR0 {xcr0:#x}"
            ));
        }
        let here = match sys::xgetbv0() {
            Some(x) if x == xcr0 => "xgetbv agrees".to_string(),
            Some(x) => format!("xgetbv here says {x:#x}"),
            None => "no xgetbv (OSXSAVE off)".to_string(),
        };
        Ok(format!(
            "{len}-byte XSAVE area; XCR0 {xcr0:#x} = {}; {here}; XSTATE_BV {xstate_bv:#x}",
            xfeature_names(xcr0)
        ))
    })
}

// ---------------------------------------------------------------- clone3 / pidfd

fn read_sysctl(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// PIDs that are free right now, spread away from the allocator's cursor.
fn free_pid_candidates() -> Vec<i32> {
    let pid_max: i64 = read_sysctl("/proc/sys/kernel/pid_max")
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let last: i64 = read_sysctl("/proc/sys/kernel/ns_last_pid")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| i64::from(std::process::id()));
    let span = (pid_max - 1000).max(1);
    (0..64i64)
        .map(|i| 1000 + (last + 2000 + i * 7919).rem_euclid(span))
        .filter_map(|p| i32::try_from(p).ok())
        .filter(|p| !Path::new(&format!("/proc/{p}")).exists())
        .take(5)
        .collect()
}

fn probe_clone3_set_tid() -> Probe {
    let candidates = free_pid_candidates();
    if candidates.is_empty() {
        return Err("found no free PID to ask for".to_string());
    }
    let mut last_err = String::new();
    for want in candidates {
        match sys::clone3_exit_child_with_tid(want) {
            Ok(mut child) => {
                let got = child.pid().as_raw();
                return match child.wait_status() {
                    Ok(WaitStatus::Exited(_, 0)) if got == want => Ok(format!(
                        "child created with the chosen PID {want} and reaped"
                    )),
                    Ok(st) => Err(format!("asked for PID {want}, got {got}, ended {st:?}")),
                    Err(e) => Err(format!("waitpid({got}): {}", errno_text(e))),
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                last_err = format!("PID {want} taken meanwhile");
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                return Err(format!(
                    "clone3(set_tid={want}): {}: needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE",
                    io_text(&e)
                ));
            }
            Err(e) => return Err(format!("clone3(set_tid={want}): {}", io_text(&e))),
        }
    }
    Err(format!("no chosen PID was free: {last_err}"))
}

fn probe_pidfd_getfd() -> Probe {
    let (rd, _wr) = nix::unistd::pipe().map_err(|e| format!("pipe: {}", errno_text(e)))?;
    let child =
        sys::Child::spawn(|| sys::pause_forever()).map_err(|e| format!("fork: {}", io_text(&e)))?;
    let pid = child.pid();
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {}", io_text(&e)))?;
    let target_fd = rd.as_raw_fd();
    let got = sys::pidfd_getfd(&pidfd, target_fd)
        .map_err(|e| format!("pidfd_getfd(child {pid}, fd {target_fd}): {}", io_text(&e)))?;
    let ours = nix::sys::stat::fstat(&rd).map_err(|e| format!("fstat: {}", errno_text(e)))?;
    let theirs = nix::sys::stat::fstat(&got).map_err(|e| format!("fstat: {}", errno_text(e)))?;
    sys::pidfd_send_signal(&pidfd, libc::SIGKILL)
        .map_err(|e| format!("pidfd_send_signal: {}", io_text(&e)))?;
    drop(child);
    if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino) {
        return Err("the fd pulled from the child is not the pipe it holds".to_string());
    }
    Ok(format!(
        "pulled fd {target_fd} of child {pid} as fd {}: same pipe; killed via pidfd",
        got.as_raw_fd()
    ))
}

// ---------------------------------------------------------------- userfaultfd

fn probe_userfaultfd() -> Probe {
    let sysctl = read_sysctl("/proc/sys/vm/unprivileged_userfaultfd")
        .unwrap_or_else(|| "unknown".to_string());
    let open_and_api = |flags: libc::c_int| -> Result<u64, String> {
        let fd = sys::userfaultfd(flags).map_err(|e| io_text(&e))?;
        let api = sys::uffdio_api(&fd, 0).map_err(|e| format!("UFFDIO_API: {}", io_text(&e)))?;
        Ok(api.features)
    };
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let full = open_and_api(base);
    let user_only = open_and_api(base | sys::UFFD_USER_MODE_ONLY);
    let describe = |r: &Result<u64, String>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let detail = format!(
        "userfaultfd(): {}; with UFFD_USER_MODE_ONLY: {}; vm.unprivileged_userfaultfd={sysctl}",
        describe(&full),
        describe(&user_only),
    );
    match full.as_ref().or(user_only.as_ref()) {
        Ok(features) => Ok(format!("{detail}; kernel offers features {features:#x}")),
        Err(_) => Err(detail),
    }
}

/// Creates a userfaultfd asking for `features` and returns it with the
/// features the kernel granted.
fn uffd_with_features(features: u64) -> Result<(std::os::fd::OwnedFd, u64), String> {
    let fd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(|e| format!("userfaultfd: {}", io_text(&e)))?;
    let api = sys::uffdio_api(&fd, features)
        .map_err(|e| format!("UFFDIO_API refused features {features:#x}: {}", io_text(&e)))?;
    Ok((fd, api.features))
}

fn scan(
    pagemap: &fs::File,
    start: u64,
    end: u64,
    flags: u64,
    mask: u64,
) -> Result<Vec<(u64, u64)>, String> {
    let mut regions = [sys::PageRegion::default(); 16];
    let mut arg = sys::PmScanArg {
        flags,
        start,
        end,
        category_mask: mask,
        return_mask: mask,
        ..sys::PmScanArg::default()
    };
    let n = sys::pagemap_scan(pagemap, &mut arg, &mut regions)
        .map_err(|e| format!("PAGEMAP_SCAN: {}", io_text(&e)))?;
    Ok(regions[..n]
        .iter()
        .map(|r| ((r.start - start), (r.end - start)))
        .collect())
}

fn open_pagemap() -> Result<fs::File, String> {
    fs::File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))
}

fn probe_uffd_wp_async() -> Probe {
    let want = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
    let (uffd, granted) = uffd_with_features(want)?;
    // Without WP_ASYNC a write to a protected page would block this thread
    // until someone reads the uffd: never write unless the kernel granted it.
    if granted & sys::UFFD_FEATURE_WP_ASYNC == 0 {
        return Err(format!(
            "UFFDIO_API did not grant WP_ASYNC (got {granted:#x})"
        ));
    }
    let ps = page_size();
    let map = sys::AnonMap::new(4 * ps).map_err(|e| format!("mmap: {}", io_text(&e)))?;
    for page in 0..4 {
        map.write_byte(page * ps, 1);
    }
    let (start, len) = (map.addr(), (4 * ps) as u64);
    sys::uffdio_register_wp(&uffd, start, len)
        .map_err(|e| format!("UFFDIO_REGISTER(MODE_WP): {}", io_text(&e)))?;
    let result = (|| {
        let pagemap = open_pagemap()?;
        let flags = sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC;
        let first = scan(&pagemap, start, start + len, flags, sys::PAGE_IS_WRITTEN)?;
        if first != [(0, len)] {
            return Err(format!(
                "first scan: expected all 4 pages written, got {first:x?}"
            ));
        }
        map.write_byte(2 * ps, 2);
        let second = scan(&pagemap, start, start + len, flags, sys::PAGE_IS_WRITTEN)?;
        let page2 = (2 * ps) as u64;
        if second != [(page2, page2 + ps as u64)] {
            return Err(format!("after writing page 2 the scan saw {second:x?}"));
        }
        Ok(format!(
            "granted (features {granted:#x}); PAGEMAP_SCAN saw exactly the 1 page written \
             after re-protecting 4"
        ))
    })();
    let unregistered = sys::uffdio_unregister(&uffd, start, len);
    let detail = result?;
    unregistered.map_err(|e| format!("UFFDIO_UNREGISTER: {}", io_text(&e)))?;
    Ok(detail)
}

fn probe_uffd_wp_unpopulated() -> Probe {
    let (_uffd, granted) = uffd_with_features(sys::UFFD_FEATURE_WP_UNPOPULATED)?;
    if granted & sys::UFFD_FEATURE_WP_UNPOPULATED == 0 {
        return Err(format!(
            "UFFDIO_API did not grant WP_UNPOPULATED (got {granted:#x})"
        ));
    }
    Ok(format!("granted by UFFDIO_API (features {granted:#x})"))
}

fn probe_pagemap_scan() -> Probe {
    let ps = page_size();
    let map = sys::AnonMap::new(4 * ps).map_err(|e| format!("mmap: {}", io_text(&e)))?;
    map.write_byte(0, 1);
    map.write_byte(2 * ps, 1);
    let pagemap = open_pagemap()?;
    let (start, p) = (map.addr(), ps as u64);
    let found = scan(&pagemap, start, start + 4 * p, 0, sys::PAGE_IS_PRESENT)?;
    if found != [(0, p), (2 * p, 3 * p)] {
        return Err(format!(
            "pages 0 and 2 of 4 written, but the scan found present ranges {found:x?}"
        ));
    }
    Ok("scan of a 4-page mapping found exactly the 2 written pages present".to_string())
}

/// Bit 55 of a `/proc/PID/pagemap` entry: the page is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;

fn probe_soft_dirty() -> Probe {
    let ps = page_size();
    let map = sys::AnonMap::new(ps).map_err(|e| format!("mmap: {}", io_text(&e)))?;
    map.write_byte(0, 1);
    fs::write("/proc/self/clear_refs", "4")
        .map_err(|e| format!("writing 4 to /proc/self/clear_refs: {e}"))?;
    let pagemap = open_pagemap()?;
    let entry = || -> Result<u64, String> {
        let mut b = [0u8; 8];
        let offset = map.addr() / ps as u64 * 8;
        pagemap
            .read_exact_at(&mut b, offset)
            .map_err(|e| format!("reading pagemap: {e}"))?;
        Ok(u64::from_le_bytes(b))
    };
    let cleared = entry()? & PM_SOFT_DIRTY == 0;
    map.write_byte(0, 2);
    if entry()? & PM_SOFT_DIRTY == 0 {
        return Err(
            "clear_refs accepted 4, but bit 55 of pagemap stayed clear after a write \
                    (kernel without CONFIG_MEM_SOFT_DIRTY)"
                .to_string(),
        );
    }
    if !cleared {
        return Err("bit 55 is set but clear_refs 4 did not clear it".to_string());
    }
    Ok("clear_refs 4 cleared bit 55; a write set it again".to_string())
}

// ---------------------------------------------------------------- sockets, prctl, namespaces

/// From include/uapi/linux/tcp.h.
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_SEND_QUEUE: libc::c_int = 2;

fn probe_tcp_repair() -> Probe {
    let sock =
        sys::tcp_socket().map_err(|e| format!("socket(AF_INET, SOCK_STREAM): {}", io_text(&e)))?;
    let set = |opt: libc::c_int, val: libc::c_int, what: &str| {
        sys::setsockopt_int(&sock, libc::IPPROTO_TCP, opt, val)
            .map_err(|e| format!("setsockopt({what}): {}", io_text(&e)))
    };
    set(libc::TCP_REPAIR, 1, "TCP_REPAIR=1").map_err(|e| format!("{e}: needs CAP_NET_ADMIN"))?;
    set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE=send")?;
    const SEQ: libc::c_int = 0x1234_5678;
    set(TCP_QUEUE_SEQ, SEQ, "TCP_QUEUE_SEQ")?;
    let back = sys::getsockopt_int(&sock, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)
        .map_err(|e| format!("getsockopt(TCP_QUEUE_SEQ): {}", io_text(&e)))?;
    set(libc::TCP_REPAIR, 0, "TCP_REPAIR=0")?;
    if back != SEQ {
        return Err(format!(
            "send sequence set to {SEQ:#x} but read back {back:#x}"
        ));
    }
    Ok(format!(
        "repair mode on a fresh socket; send-queue sequence {SEQ:#x} set and read back"
    ))
}

/// Fields of `/proc/self/stat` counted from 1 as in proc(5).
fn stat_fields() -> Result<Vec<u64>, String> {
    let stat =
        fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    let after_comm = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("/proc/self/stat without a comm")?;
    // Field 3 (state, a letter: kept as 0) is the first after the comm;
    // indices 0..=2 are placeholders so that fields[n] is field n of proc(5).
    let mut fields = vec![0, 0, 0];
    fields.extend(
        after_comm
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0)),
    );
    if fields.len() <= 51 {
        return Err(format!(
            "/proc/self/stat has only {} fields",
            fields.len() - 1
        ));
    }
    Ok(fields)
}

fn probe_pr_set_mm_map() -> Probe {
    let size = sys::prctl_mm_map_size().map_err(|e| {
        format!(
            "PR_SET_MM_MAP_SIZE: {} (no CONFIG_CHECKPOINT_RESTORE?)",
            io_text(&e)
        )
    })?;
    if size as usize != std::mem::size_of::<sys::PrctlMmMap>() {
        return Err(format!(
            "kernel's struct prctl_mm_map is {size} bytes, ours {}",
            std::mem::size_of::<sys::PrctlMmMap>()
        ));
    }
    // Set the map to what it already is, in a forked child (same layout).
    let f = stat_fields()?;
    let auxv_bytes = fs::read("/proc/self/auxv").map_err(|e| format!("/proc/self/auxv: {e}"))?;
    let auxv: Vec<u64> = auxv_bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let map = sys::PrctlMmMap {
        start_code: f[26],
        end_code: f[27],
        start_data: f[45],
        end_data: f[46],
        start_brk: f[47],
        brk: sys::current_brk(),
        start_stack: f[28],
        arg_start: f[48],
        arg_end: f[49],
        env_start: f[50],
        env_end: f[51],
        auxv: auxv.as_ptr() as u64,
        auxv_size: (auxv.len() * 8) as u32,
        exe_fd: u32::MAX,
    };
    let mut child = sys::Child::spawn(|| match sys::prctl_set_mm_map(&map) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(255).min(255),
    })
    .map_err(|e| format!("fork: {}", io_text(&e)))?;
    match child.wait_status() {
        Ok(WaitStatus::Exited(_, 0)) => Ok(format!(
            "struct prctl_mm_map is {size} bytes; a no-op PR_SET_MM_MAP in a child succeeded"
        )),
        Ok(WaitStatus::Exited(_, code)) => Err(format!(
            "size query works ({size} bytes) but a no-op PR_SET_MM_MAP failed: {}",
            errno_text(Errno::from_raw(code))
        )),
        Ok(st) => Err(format!("child ended {st:?}")),
        Err(e) => Err(format!("waitpid: {}", errno_text(e))),
    }
}

fn probe_netns() -> Probe {
    let ours = sys::stat_ino(c"/proc/self/ns/net")
        .map_err(|e| format!("stat /proc/self/ns/net: {}", io_text(&e)))?;
    let mut child = sys::Child::spawn(|| {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            return 100 + (e as i32).min(150);
        }
        match sys::stat_ino(c"/proc/self/ns/net") {
            Ok(ino) if ino != ours => 0,
            Ok(_) => 1,
            Err(_) => 2,
        }
    })
    .map_err(|e| format!("fork: {}", io_text(&e)))?;
    match child.wait_status() {
        Ok(WaitStatus::Exited(_, 0)) => {
            Ok("a child unshared CLONE_NEWNET into a new namespace; gone with it".to_string())
        }
        Ok(WaitStatus::Exited(_, 1)) => {
            Err("unshare succeeded but the namespace is the same".to_string())
        }
        Ok(WaitStatus::Exited(_, code)) if code >= 100 => Err(format!(
            "unshare(CLONE_NEWNET): {}",
            errno_text(Errno::from_raw(code - 100))
        )),
        Ok(st) => Err(format!("child ended {st:?}")),
        Err(e) => Err(format!("waitpid: {}", errno_text(e))),
    }
}

fn probe_vvar_vclock() -> Probe {
    let maps =
        fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let size_of_area = |name: &str| -> Option<u64> {
        maps.lines().find_map(|line| {
            let mut it = line.split_whitespace();
            let range = it.next()?;
            if it.nth(4)? != name {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        })
    };
    let areas: Vec<String> = ["[vvar]", "[vvar_vclock]", "[vdso]"]
        .iter()
        .filter_map(|n| size_of_area(n).map(|s| format!("{n} {} KiB", s / 1024)))
        .collect();
    let listed = if areas.is_empty() {
        "no vDSO areas mapped".to_string()
    } else {
        areas.join(", ")
    };
    if size_of_area("[vvar_vclock]").is_some() {
        Ok(format!("{listed}: restore must move all three"))
    } else {
        Err(format!("{listed}: no [vvar_vclock] (kernel < 6.12)"))
    }
}

/// Bit of `CAP_SYS_RESOURCE` in the capability sets.
const CAP_SYS_RESOURCE_BIT: u32 = 24;

fn probe_cap_sys_resource() -> Probe {
    let status =
        fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or("no CapEff in /proc/self/status")?;
    let in_eff = cap_eff & (1 << CAP_SYS_RESOURCE_BIT) != 0;
    let eff = if in_eff { "in CapEff" } else { "not in CapEff" };
    // A limit with a finite hard value we can try to raise by one.
    let candidates = [
        (Resource::RLIMIT_NICE, "RLIMIT_NICE"),
        (Resource::RLIMIT_RTPRIO, "RLIMIT_RTPRIO"),
        (Resource::RLIMIT_MSGQUEUE, "RLIMIT_MSGQUEUE"),
        (Resource::RLIMIT_SIGPENDING, "RLIMIT_SIGPENDING"),
    ];
    let Some((res, name, soft, hard)) = candidates.iter().find_map(|&(r, n)| {
        let (soft, hard) = getrlimit(r).ok()?;
        (hard != libc::RLIM_INFINITY && hard < 1 << 20).then_some((r, n, soft, hard))
    }) else {
        return if in_eff {
            Ok("in CapEff (no finite hard rlimit to test)".to_string())
        } else {
            Err("not in CapEff (no finite hard rlimit to test)".to_string())
        };
    };
    let mut child =
        sys::Child::spawn(
            || match nix::sys::resource::setrlimit(res, soft.min(hard), hard + 1) {
                Ok(()) => 0,
                Err(Errno::EPERM) => 1,
                Err(_) => 2,
            },
        )
        .map_err(|e| format!("fork: {}", io_text(&e)))?;
    let attempt = format!("raising hard {name} from {hard} to {} in a child", hard + 1);
    match child.wait_status() {
        Ok(WaitStatus::Exited(_, 0)) => Ok(format!("{eff}; {attempt} worked")),
        Ok(WaitStatus::Exited(_, 1)) => Err(format!(
            "{eff}; {attempt} failed with EPERM: restore cannot raise hard rlimits"
        )),
        Ok(st) => Err(format!("{eff}; {attempt}: child ended {st:?}")),
        Err(e) => Err(format!("waitpid: {}", errno_text(e))),
    }
}

/// The raw kernel interfaces behind the probes, each a tiny safe wrapper.
mod sys {
    use std::io;
    use std::mem::size_of;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::ptr::NonNull;

    use nix::errno::Errno;
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{ForkResult, Pid};

    fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// Takes ownership of a file descriptor a syscall just returned.
    fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
        let fd =
            RawFd::try_from(cvt(ret)?).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: `fd` was just returned by the kernel as a new descriptor
        // of this process; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    // ------------------------------------------------------------ processes

    /// A forked child that is killed (SIGKILL) and reaped on drop unless
    /// already reaped: probes leave no process and no zombie behind.
    pub struct Child {
        pid: Pid,
        reaped: bool,
    }

    impl Child {
        /// Forks; the child runs `body` and `_exit`s with its result.
        ///
        /// `body` runs in the child of a possibly multi-threaded process:
        /// it must only make async-signal-safe calls (raw syscalls; no
        /// allocation, no locks, no stdio).
        pub fn spawn(body: impl FnOnce() -> i32) -> io::Result<Child> {
            // SAFETY: fork is sound in a multi-threaded process as long as
            // the child only makes async-signal-safe calls before exiting;
            // every `body` in this module makes raw syscalls only (documented
            // above), then the child `_exit`s without running destructors.
            match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
                ForkResult::Parent { child } => Ok(Child {
                    pid: child,
                    reaped: false,
                }),
                ForkResult::Child => exit_now(body()),
            }
        }

        pub fn pid(&self) -> Pid {
            self.pid
        }

        /// The next wait status of the child; an exit or a death reaps it
        /// (and `Drop` then leaves the PID alone: it may belong to someone
        /// else by now).
        pub fn wait_status(&mut self) -> Result<WaitStatus, Errno> {
            loop {
                match waitpid(self.pid, None) {
                    Err(Errno::EINTR) => continue,
                    Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                        self.reaped = true;
                        return Ok(st);
                    }
                    other => return other,
                }
            }
        }

        /// Kills the child unless reaped already, and reaps it.
        fn kill_and_reap(&mut self) {
            if self.reaped {
                return;
            }
            let _ = kill(self.pid, Signal::SIGKILL);
            loop {
                match waitpid(self.pid, None) {
                    Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(_) => break, // ECHILD: nothing left to reap
                }
            }
            self.reaped = true;
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            self.kill_and_reap();
        }
    }

    /// Sleeps until killed.
    pub fn pause_forever() -> ! {
        loop {
            // SAFETY: pause(2) only blocks until a signal arrives.
            unsafe { libc::pause() };
        }
    }

    /// Ends this process at once, without destructors or atexit handlers.
    pub fn exit_now(code: i32) -> ! {
        // SAFETY: _exit(2) terminates the process; async-signal-safe.
        unsafe { libc::_exit(code) }
    }

    /// `struct clone_args` (include/uapi/linux/sched.h), size VER2.
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const _: () = assert!(size_of::<CloneArgs>() == 88);

    /// `clone3` like fork, with the child's PID chosen by `set_tid`; the
    /// child exits with status 0 at once.
    pub fn clone3_exit_child_with_tid(tid: i32) -> io::Result<Child> {
        let tids = [tid];
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: tids.as_ptr() as u64,
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        // SAFETY: without CLONE_VM and with no stack, clone3 behaves like
        // fork: the child continues on a copy of this address space and does
        // nothing but `_exit` (async-signal-safe). `args` and `tids` are
        // live for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            exit_now(0);
        }
        let pid = cvt(ret)?;
        Ok(Child {
            pid: Pid::from_raw(pid as i32),
            reaped: false,
        })
    }

    pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd.
        owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })
    }

    pub fn pidfd_getfd(pidfd: &OwnedFd, target_fd: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a live pidfd, a number in the target's
        // fd table and flags, and returns a new fd in ours.
        owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })
    }

    pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: a live pidfd, a signal number, no siginfo, no flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        cvt(ret).map(drop)
    }

    // ------------------------------------------------------------ ptrace

    /// Regset of the XSAVE area (include/uapi/linux/elf.h).
    pub const NT_X86_XSTATE: libc::c_int = 0x202;
    const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

    /// `struct ptrace_rseq_configuration` (include/uapi/linux/ptrace.h).
    #[repr(C)]
    #[derive(Default, Debug)]
    pub struct RseqConfiguration {
        pub rseq_abi_pointer: u64,
        pub rseq_abi_size: u32,
        pub signature: u32,
        pub flags: u32,
        pub pad: u32,
    }
    const _: () = assert!(size_of::<RseqConfiguration>() == 24);

    /// `PTRACE_GET_RSEQ_CONFIGURATION` of a ptrace-stopped tracee.
    pub fn ptrace_get_rseq_configuration(pid: Pid) -> io::Result<RseqConfiguration> {
        let mut conf = RseqConfiguration::default();
        // SAFETY: the kernel writes at most `addr` (= the struct size) bytes
        // to `data`, which points to a live, writable struct of that size.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                pid.as_raw(),
                size_of::<RseqConfiguration>(),
                &mut conf as *mut RseqConfiguration,
            )
        };
        cvt(ret)?;
        Ok(conf)
    }

    /// `PTRACE_GETREGSET` of `regset` into `buf`; returns the bytes written.
    pub fn ptrace_getregset(pid: Pid, regset: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the kernel writes at most `iov_len` bytes to `iov_base`,
        // a live mutable buffer of that length, and shrinks `iov_len` to
        // what it wrote.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                pid.as_raw(),
                regset as usize,
                &mut iov as *mut libc::iovec,
            )
        };
        cvt(ret)?;
        Ok(iov.iov_len.min(buf.len()))
    }

    /// XCR0 of this CPU as the OS set it, if XSAVE is enabled.
    pub fn xgetbv0() -> Option<u64> {
        // `__cpuid` became a safe fn in later Rust releases; the workspace
        // MSRV still needs the block.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 1 exists on every x86-64 CPU and only reads
        // identification registers.
        let leaf1 = unsafe { std::arch::x86_64::__cpuid(1) };
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        if !osxsave {
            return None;
        }
        // SAFETY: CPUID.1:ECX.OSXSAVE is set, so XGETBV is enabled and
        // XCR0 (index 0) is readable from user mode.
        Some(unsafe { std::arch::x86_64::_xgetbv(0) })
    }

    // ------------------------------------------------------------ memory

    /// An anonymous private read-write mapping, unmapped on drop.
    pub struct AnonMap {
        ptr: NonNull<u8>,
        len: usize,
    }

    impl AnonMap {
        pub fn new(len: usize) -> io::Result<AnonMap> {
            // SAFETY: a fresh anonymous mapping at an address the kernel
            // chooses cannot alias any existing Rust object.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let ptr = NonNull::new(ptr.cast())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
            Ok(AnonMap { ptr, len })
        }

        pub fn addr(&self) -> u64 {
            self.ptr.as_ptr() as u64
        }

        /// Writes one byte at `offset` (volatile, so the store really happens).
        pub fn write_byte(&self, offset: usize, value: u8) {
            assert!(
                offset < self.len,
                "offset {offset} outside a {}-byte map",
                self.len
            );
            // SAFETY: `offset` is inside the mapping, which is readable and
            // writable and owned by `self`; no Rust reference points into it.
            unsafe { self.ptr.as_ptr().add(offset).write_volatile(value) };
        }
    }

    impl Drop for AnonMap {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `new`, which no
            // reference outlives.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }

    /// The current program break (`brk(0)` changes nothing).
    pub fn current_brk() -> u64 {
        // SAFETY: brk with a zero argument only returns the current break.
        unsafe { libc::syscall(libc::SYS_brk, 0usize) as u64 }
    }

    // ------------------------------------------------------------ userfaultfd and PAGEMAP_SCAN
    //
    // The definitions live with the dirty tracker (`dirty::uffd_sys`); these
    // adapt them to the probes' owned descriptors.

    use crate::dirty::uffd_sys;
    pub use crate::dirty::uffd_sys::{
        PageRegion, PmScanArg, UffdioApi, PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
        PM_SCAN_WP_MATCHING, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
    };

    pub const UFFD_USER_MODE_ONLY: libc::c_int = uffd_sys::UFFD_USER_MODE_ONLY as libc::c_int;

    pub fn userfaultfd(flags: libc::c_int) -> io::Result<OwnedFd> {
        uffd_sys::userfaultfd(flags as u64)
    }

    pub fn uffdio_api(uffd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
        uffd_sys::uffdio_api(uffd.as_fd(), features)
    }

    /// Registers `[start, start + len)` of this process in write-protect mode.
    pub fn uffdio_register_wp(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
        uffd_sys::register_wp(uffd.as_fd(), start, len).map(drop)
    }

    pub fn uffdio_unregister(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
        uffd_sys::unregister(uffd.as_fd(), start, len)
    }

    /// `PAGEMAP_SCAN` on an open pagemap file; fills `out` and returns the
    /// number of regions written.
    pub fn pagemap_scan(
        pagemap: &impl AsFd,
        arg: &mut PmScanArg,
        out: &mut [PageRegion],
    ) -> io::Result<usize> {
        uffd_sys::pagemap_scan(pagemap.as_fd(), arg, out)
    }

    // ------------------------------------------------------------ sockets

    pub fn tcp_socket() -> io::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments returns a new fd.
        let ret = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        owned_fd(ret as libc::c_long)
    }

    pub fn setsockopt_int(
        sock: &OwnedFd,
        level: libc::c_int,
        opt: libc::c_int,
        val: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: the option value is one live c_int of the length passed.
        let ret = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                (&val as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        cvt(ret as libc::c_long).map(drop)
    }

    pub fn getsockopt_int(
        sock: &OwnedFd,
        level: libc::c_int,
        opt: libc::c_int,
    ) -> io::Result<libc::c_int> {
        let mut val: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes to `val`, a live c_int.
        let ret = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        cvt(ret as libc::c_long)?;
        Ok(val)
    }

    // ------------------------------------------------------------ prctl, stat

    const PR_SET_MM: libc::c_int = 35;
    const PR_SET_MM_MAP: libc::c_ulong = 14;
    const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;

    /// `struct prctl_mm_map`: the one definition shared with the restorer.
    pub use crate::restore::abi::PrctlMmMap;
    const _: () = assert!(size_of::<PrctlMmMap>() == 104);

    /// `PR_SET_MM_MAP_SIZE`: the kernel's `sizeof(struct prctl_mm_map)`; a query.
    pub fn prctl_mm_map_size() -> io::Result<u32> {
        let mut size: libc::c_uint = 0;
        // SAFETY: the kernel writes one unsigned int to `size`.
        let ret = unsafe {
            libc::prctl(
                PR_SET_MM,
                PR_SET_MM_MAP_SIZE,
                &mut size as *mut libc::c_uint,
                0,
                0,
            )
        };
        cvt(ret as libc::c_long)?;
        Ok(size)
    }

    /// `PR_SET_MM_MAP`: replaces this process's mm fields with `map`.
    pub fn prctl_set_mm_map(map: &PrctlMmMap) -> io::Result<()> {
        // SAFETY: the kernel reads one `struct prctl_mm_map` of the size
        // passed, and `auxv_size` bytes at `auxv`, which the caller keeps
        // alive; it changes only the mm's bookkeeping fields.
        let ret = unsafe {
            libc::prctl(
                PR_SET_MM,
                PR_SET_MM_MAP,
                map as *const PrctlMmMap,
                size_of::<PrctlMmMap>(),
                0,
            )
        };
        cvt(ret as libc::c_long).map(drop)
    }

    /// Inode number of `path` (stat(2) on a C string: no allocation, so
    /// usable in a forked child).
    pub fn stat_ino(path: &std::ffi::CStr) -> io::Result<u64> {
        // SAFETY: an all-zero `struct stat` is a valid value of the type.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated; the kernel writes one `struct
        // stat` to `st`.
        let ret = unsafe { libc::stat(path.as_ptr(), &mut st) };
        cvt(ret as libc::c_long)?;
        Ok(st.st_ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn must_have(f: Feature) {
        let r = probe(f);
        assert!(
            r.available,
            "{} should work on the development kernel (DESIGN.md): {}",
            r.name, r.detail
        );
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn ptrace_probes_work() {
        must_have(Feature::Ptrace);
        must_have(Feature::PtraceRseqConfig);
        must_have(Feature::XsaveRegset);
    }

    #[test]
    fn clone3_set_tid_works() {
        if !is_root() {
            eprintln!("skipped: clone3 set_tid needs root");
            return;
        }
        must_have(Feature::Clone3SetTid);
    }

    #[test]
    fn pidfd_getfd_works() {
        must_have(Feature::PidfdGetfd);
    }

    #[test]
    fn userfaultfd_wp_async_and_pagemap_scan_work() {
        must_have(Feature::Userfaultfd);
        must_have(Feature::PagemapScan);
        if !is_root() {
            // vm.unprivileged_userfaultfd=0: only UFFD_USER_MODE_ONLY fds,
            // which the dirty tracker cannot use (kernel-mode writes count).
            eprintln!("skipped WP_ASYNC checks: a kernel-mode userfaultfd needs root");
            return;
        }
        must_have(Feature::UffdWpAsync);
        must_have(Feature::UffdWpUnpopulated);
    }

    #[test]
    fn tcp_repair_and_pr_set_mm_map_work() {
        if !is_root() {
            eprintln!("skipped: TCP_REPAIR needs CAP_NET_ADMIN");
            return;
        }
        must_have(Feature::TcpRepair);
        must_have(Feature::PrSetMmMap);
    }

    #[test]
    fn soft_dirty_reported_missing_where_config_is_off() {
        let r = probe(Feature::SoftDirty);
        // The development kernel lacks CONFIG_MEM_SOFT_DIRTY. A kernel with
        // it (as /proc/config.gz or the boot config says) must report it.
        let config_says = kernel_config_option("CONFIG_MEM_SOFT_DIRTY");
        match config_says {
            Some(true) => assert!(r.available, "config has soft-dirty: {}", r.detail),
            Some(false) => assert!(!r.available, "config lacks soft-dirty: {}", r.detail),
            None if r.available => eprintln!("soft-dirty available here: {}", r.detail),
            None => assert!(r.detail.contains("bit 55"), "{}", r.detail),
        }
    }

    /// `Some(enabled)` if the kernel config is readable.
    fn kernel_config_option(opt: &str) -> Option<bool> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let text = fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
        Some(text.lines().any(|l| l == format!("{opt}=y")))
    }

    #[test]
    fn probe_all_is_complete_and_picks_a_tracker() {
        let reports = probe_all();
        assert_eq!(reports.len(), Feature::ALL.len());
        for (r, f) in reports.iter().zip(Feature::ALL) {
            assert_eq!(r.feature, f);
            assert_eq!(r.name, f.name());
            assert!(!r.detail.is_empty(), "{} has no detail", r.name);
        }
        let soft_dirty = reports
            .iter()
            .any(|r| r.feature == Feature::SoftDirty && r.available);
        let choice = dirty_tracker_choice(&reports);
        if !is_root() {
            eprintln!("skipped the tracker check: a kernel-mode userfaultfd needs root");
            return;
        }
        assert_eq!(
            choice, DIRTY_TRACKER_UFFD_WP_ASYNC,
            "soft-dirty: {soft_dirty}"
        );
    }

    #[test]
    fn tracker_order() {
        let rep = |f: Feature, available| FeatureReport {
            feature: f,
            name: f.name(),
            available,
            detail: String::new(),
            enables: f.enables(),
        };
        let all_off = [
            rep(Feature::UffdWpAsync, false),
            rep(Feature::PagemapScan, true),
            rep(Feature::SoftDirty, false),
        ];
        assert_eq!(dirty_tracker_choice(&all_off), DIRTY_TRACKER_CHECKSUM);
        let sd = [
            rep(Feature::SoftDirty, true),
            rep(Feature::UffdWpAsync, true),
        ];
        assert_eq!(dirty_tracker_choice(&sd), DIRTY_TRACKER_SOFT_DIRTY);
        let both = [
            rep(Feature::SoftDirty, true),
            rep(Feature::UffdWpAsync, true),
            rep(Feature::PagemapScan, true),
        ];
        assert_eq!(dirty_tracker_choice(&both), DIRTY_TRACKER_UFFD_WP_ASYNC);
        assert_eq!(dirty_tracker_choice(&[]), DIRTY_TRACKER_CHECKSUM);
    }

    #[test]
    fn xfeature_names_are_readable() {
        assert_eq!(xfeature_names(0x7), "x87|sse|avx");
        assert_eq!(xfeature_names(0x1_0003), "x87|sse|other:0x10000");
    }
}
