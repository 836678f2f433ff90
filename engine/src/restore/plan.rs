//! Planning a restore, in the restoring process before it forks the task:
//! check the image against this host, choose the "restore zone" (an address
//! range free both here and in the image layout, holding the blob, its
//! argument block, thread stacks and the premapped VMAs), and compute every
//! address the child and the blob will use. The child then only executes the
//! plan: no parsing, no allocation.
use super::abi::*;
use super::RestoreError;
use crate::dump::PAGE;
use crate::procfs;
use crm_proto::image::{fd_entry, FilesCore, MmCore, PageRun, TaskCore, VmaKind};
use std::ffi::CString;

/// One VMA of the image, mapped first at `at` inside the zone, then moved
/// to `target` by the blob.
#[derive(Debug)]
pub struct Premap {
    pub at: u64,
    pub target: u64,
    pub len: u64,
    pub prot: i32,
    /// Protection while pages are filled in.
    pub fill_prot: i32,
    pub flags: i32,
    /// For file mappings: path, open flags, file offset.
    pub file: Option<(CString, i32, u64)>,
    /// Indexes into the pagemap's runs of pages that belong here.
    pub runs: std::ops::Range<usize>,
    pub advice: Vec<i32>,
    /// Private anonymous memory filled after the task runs (lazy restore):
    /// the child maps it but leaves its pages to [`super::lazy`].
    pub lazy: bool,
    /// Shared anonymous memory: its shmem object's inode and this VMA's
    /// byte offset in it.
    pub shmem: Option<(u64, u64)>,
    /// In a tree restore: a descriptor of the already filled shmem object
    /// to map (at the `shmem` offset) instead of fresh memory; the child
    /// then fills nothing. For a memfd mapping: the memfd (see `memfd`).
    pub shm_fd: Option<i32>,
    /// A SysV shared memory attachment: attached by the child instead of
    /// mapped (see [`SysvAttach`]); nothing to fill.
    pub sysv: Option<SysvAttach>,
    /// A mapping of a memfd: the memfd and this VMA's offset in it. The
    /// child maps `shm_fd` (set by [`super::memfd`]) there, and fills the
    /// written pages of a private mapping.
    pub memfd: Option<(crm_proto::image::MemfdObject, u64)>,
}

/// A SysV segment attached at `Premap::target`: the child attaches segment
/// `shmid` (created by the restore, with its original id) where the kernel
/// likes, moves the part at byte `pgoff` of it to the premap's place, and
/// the blob moves that with the other premaps. VMAs that were parts of one
/// attachment (same `target - pgoff`) share one `shmat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysvAttach {
    pub shmid: i32,
    pub pgoff: u64,
    /// `SHM_RDONLY`: the VMA could never be made writable (no `mw`).
    pub rdonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAction {
    /// The task led its session: `setsid()`.
    NewSession,
    /// Shell job that led its process group: `setpgid(0, 0)`.
    NewGroup,
    /// Shell job in another task's group: stay in ours.
    Inherit,
}

#[derive(Debug)]
pub struct Plan {
    pub pid: i32,
    pub tids: Vec<i32>,
    pub zone_start: u64,
    pub zone_len: u64,
    pub blob_at: u64,
    pub args_at: u64,
    pub args_len: u64,
    pub premaps: Vec<Premap>,
    pub args: RestoreArgs,
    pub unmap: Vec<Range>,
    pub moves: Vec<VmaMove>,
    pub threads: Vec<ThreadArgs>,
    /// Siginfos (process-wide first, then per thread), at `siginfo_off`.
    pub siginfos: Vec<u8>,
    pub unmap_off: u64,
    pub moves_off: u64,
    pub threads_off: u64,
    pub siginfo_off: u64,
    /// Each fd of the image: its number, whether close-on-exec, its kind.
    pub fds: Vec<(i32, bool, fd_entry::Kind)>,
    /// Tree restores: image fds that are objects shared with other tasks,
    /// and the inherited descriptor (at or above `close_from`) each is a
    /// duplicate of (`files::shared`). Empty for a single process.
    pub inherited: Vec<(i32, std::os::fd::RawFd)>,
    pub close_from: i32,
    pub exe: CString,
    pub cwd: CString,
    pub root: Option<CString>,
    pub session: SessionAction,
    /// `prctl(PR_SET_CHILD_SUBREAPER, 1)` before the blob runs.
    pub child_subreaper: bool,
    /// The memfds and ptys the restoring process made (see
    /// [`super::memfd`]); their descriptors are at or above `close_from`.
    pub objects: crate::files::Objects,
    /// Tree restores: memory inherited over fork, read from another task's
    /// pages file ([`super::inherited`]). Empty for a single process.
    pub borrowed: Vec<super::inherited::Borrowed>,
}

impl Plan {
    /// The lazy VMAs at their final addresses and the runs inside them.
    pub fn lazy_ranges(&self) -> super::lazy::LazyRanges {
        let mut out = super::lazy::LazyRanges {
            vmas: Vec::new(),
            runs: Vec::new(),
        };
        for p in self.premaps.iter().filter(|p| p.lazy) {
            out.vmas.push((p.target, p.target + p.len));
            out.runs.extend(p.runs.clone());
        }
        out
    }
}

/// Lowest and highest address the zone may use, and its alignment.
const ZONE_SEARCH_START: u64 = 0x1000_0000_0000;
const ZONE_SEARCH_END: u64 = 0x7000_0000_0000;
const ZONE_STEP: u64 = 1 << 36;
const MMAP_MIN: u64 = 0x10000;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn invalid(what: String) -> RestoreError {
    RestoreError::InvalidImage { what }
}

fn cstring(s: &str, what: &str) -> Result<CString, RestoreError> {
    CString::new(s).map_err(|_| invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// Host facts the plan depends on (read once in the restoring process).
pub struct Host {
    pub self_maps: Vec<procfs::MapEntry>,
    pub creds: crm_proto::image::Creds,
    pub hard_limits: Vec<(u32, u64)>,
    pub rseq: Option<(u64, [u64; RSEQ_UNREG_TRIES], u64)>,
    pub shell_pgid: i32,
}

pub struct Inputs<'a> {
    pub core: &'a TaskCore,
    pub mm: &'a MmCore,
    pub files: &'a FilesCore,
    pub runs: &'a [PageRun],
    pub shell_job: bool,
    /// Which private anonymous memory is left to lazy restore.
    pub lazy: LazyPlan,
    /// The task is part of a tree: its session and group are set up by
    /// `restore::tree` before this plan runs (`session` is `Inherit`).
    pub tree_member: bool,
}

/// Which VMAs a restore leaves to lazy pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyPlan {
    Off,
    /// Eligible VMAs that have pages in the image.
    WherePages,
    /// Every eligible VMA (the pages come from elsewhere).
    AllEligible,
}

/// Whether a VMA's memory can be filled lazily: private anonymous memory
/// (heap, stacks, anonymous mappings) that is accessible at all.
pub fn lazy_eligible(v: &crm_proto::image::Vma) -> bool {
    matches!(v.kind(), VmaKind::Anon | VmaKind::Heap | VmaKind::Stack)
        && !v.shared
        && v.prot & 7 != 0
}

pub fn build(input: &Inputs<'_>, host: &Host) -> Result<Plan, RestoreError> {
    let core = input.core;
    let mm = input.mm;
    let pid = core.pid;
    if core.threads.is_empty() || core.threads[0].tid != pid {
        return Err(invalid("the first thread is not the main thread".into()));
    }
    let tids: Vec<i32> = core.threads.iter().map(|t| t.tid).collect();
    if !input.tree_member && !mm.inherited.is_empty() {
        return Err(invalid(
            "the process inherits memory from another task, but the image has no tree".into(),
        ));
    }

    // vDSO areas: the ones we have now move to where the image had them.
    let mut specials = Vec::new();
    for (kind, name) in [
        (VmaKind::Vvar, "[vvar]"),
        (VmaKind::VvarVclock, "[vvar_vclock]"),
        (VmaKind::Vdso, "[vdso]"),
    ] {
        let img = mm.vmas.iter().find(|v| v.kind() == kind);
        let cur = host.self_maps.iter().find(|m| m.name == name);
        match (img, cur) {
            (None, None) => {}
            (Some(i), Some(c)) if i.end - i.start == c.len() => specials.push(VmaMove {
                from: c.start,
                to: i.start,
                len: c.len(),
            }),
            (i, c) => {
                return Err(RestoreError::VdsoMismatch {
                    what: format!(
                        "{name} is {} in the image and {} on this host",
                        i.map_or("absent".to_string(), |v| format!(
                            "{} bytes",
                            v.end - v.start
                        )),
                        c.map_or("absent".to_string(), |m| format!("{} bytes", m.len()))
                    ),
                })
            }
        }
    }

    // Premapped VMAs and their page runs.
    let mut vmas: Vec<&crm_proto::image::Vma> = mm
        .vmas
        .iter()
        .filter(|v| {
            matches!(
                v.kind(),
                VmaKind::Anon
                    | VmaKind::Heap
                    | VmaKind::Stack
                    | VmaKind::File
                    | VmaKind::SysvShm
                    | VmaKind::Memfd
            )
        })
        .collect();
    vmas.sort_by_key(|v| v.start);
    for w in vmas.windows(2) {
        if w[0].end > w[1].start {
            return Err(invalid(format!(
                "VMAs {:#x} and {:#x} overlap",
                w[0].start, w[1].start
            )));
        }
    }
    for v in &vmas {
        if v.start >= v.end
            || v.start % PAGE != 0
            || v.end % PAGE != 0
            || v.end > TASK_SIZE
            || v.start < MMAP_MIN
        {
            return Err(invalid(format!(
                "VMA {:#x}-{:#x} is not a valid user range",
                v.start, v.end
            )));
        }
    }
    let mut run_idx = 0;
    let mut premaps = Vec::with_capacity(vmas.len());
    for v in &vmas {
        let first = run_idx;
        while run_idx < input.runs.len() && input.runs[run_idx].vaddr < v.end {
            let r = &input.runs[run_idx];
            let end = r
                .nr_pages
                .checked_mul(PAGE)
                .and_then(|l| l.checked_add(r.vaddr));
            if r.vaddr < v.start || end.is_none_or(|e| e > v.end) {
                return Err(invalid(format!(
                    "page run at {:#x} ({} pages) is not inside one VMA",
                    r.vaddr, r.nr_pages
                )));
            }
            run_idx += 1;
        }
        let runs = first..run_idx;
        let prot = (v.prot & 7) as i32;
        let flags_str: Vec<&str> = v.vm_flags.split_whitespace().collect();
        let sysv = (v.kind() == VmaKind::SysvShm).then_some(SysvAttach {
            shmid: v.sysv_shmid,
            pgoff: v.pgoff,
            rdonly: !flags_str.contains(&"mw"),
        });
        if sysv.is_some() && (!runs.is_empty() || !v.shared || v.pgoff % PAGE != 0) {
            return Err(invalid(format!(
                "SysV shared memory VMA {:#x} has pages in the task's file, is private \
                 or has an unaligned offset",
                v.start
            )));
        }
        let lazy = match input.lazy {
            LazyPlan::Off => false,
            LazyPlan::WherePages => !runs.is_empty() && lazy_eligible(v),
            LazyPlan::AllEligible => lazy_eligible(v),
        };
        let fill_prot = if runs.is_empty() || lazy {
            prot
        } else {
            prot | libc::PROT_READ | libc::PROT_WRITE
        };
        let mut flags = if v.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if flags_str.contains(&"gd") {
            flags |= libc::MAP_GROWSDOWN;
        }
        let file = if v.kind() == VmaKind::File {
            let f = v
                .file
                .as_ref()
                .ok_or_else(|| invalid(format!("file VMA {:#x} has no file", v.start)))?;
            let mode = if v.shared && flags_str.contains(&"mw") {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            Some((cstring(&f.path, "file path")?, mode, v.pgoff))
        } else if v.kind() == VmaKind::Memfd {
            None
        } else {
            flags |= libc::MAP_ANONYMOUS;
            None
        };
        let memfd = match (v.kind(), &v.memfd) {
            (VmaKind::Memfd, Some(o)) => {
                crate::files::memfd::check_object(o).map_err(invalid)?;
                Some((o.clone(), v.pgoff))
            }
            (VmaKind::Memfd, None) => {
                return Err(invalid(format!("memfd VMA {:#x} has no memfd", v.start)))
            }
            _ => None,
        };
        let mut advice = Vec::new();
        for (code, adv) in [
            ("dd", libc::MADV_DONTDUMP),
            ("dc", libc::MADV_DONTFORK),
            ("hg", libc::MADV_HUGEPAGE),
            ("nh", libc::MADV_NOHUGEPAGE),
            ("wf", libc::MADV_WIPEONFORK),
        ] {
            if flags_str.contains(&code) {
                advice.push(adv);
            }
        }
        premaps.push(Premap {
            at: 0,
            target: v.start,
            len: v.end - v.start,
            prot,
            fill_prot,
            flags,
            file,
            runs,
            advice,
            lazy,
            shmem: (v.kind() == VmaKind::Anon && v.shared && v.shmem_ino != 0)
                .then_some((v.shmem_ino, v.pgoff)),
            shm_fd: None,
            sysv,
            memfd,
        });
    }
    if run_idx != input.runs.len() {
        let r = &input.runs[run_idx];
        return Err(invalid(format!(
            "page run at {:#x} is outside every VMA",
            r.vaddr
        )));
    }

    // Sizes of the zone's parts.
    let nthreads = core.threads.len() as u64;
    let blob_len = super::blob::size();
    let mut siginfos = Vec::new();
    let push_infos = |out: &mut Vec<u8>,
                      list: &[crm_proto::image::PendingSignal]|
     -> Result<u64, RestoreError> {
        for s in list {
            if s.siginfo.len() != SIGINFO_SIZE {
                return Err(invalid(format!(
                    "a pending siginfo is {} bytes, not 128",
                    s.siginfo.len()
                )));
            }
            out.extend_from_slice(&s.siginfo);
        }
        Ok(list.len() as u64)
    };
    let nr_shared = push_infos(&mut siginfos, &core.shared_pending)?;
    let mut thread_pending = Vec::new();
    for t in &core.threads {
        let off = siginfos.len() as u64;
        let n = push_infos(&mut siginfos, &t.pending)?;
        thread_pending.push((off, n));
    }
    let keep_specials: Vec<(u64, u64)> =
        specials.iter().map(|m| (m.from, m.from + m.len)).collect();
    let nr_unmap_max = keep_specials.len() as u64 * 2 + 3;
    let header = align_up(std::mem::size_of::<RestoreArgs>() as u64, 64);
    let unmap_off = header;
    let moves_off = unmap_off + nr_unmap_max * std::mem::size_of::<Range>() as u64;
    let threads_off = align_up(
        moves_off + premaps.len() as u64 * std::mem::size_of::<VmaMove>() as u64,
        64,
    );
    let siginfo_off = align_up(
        threads_off + nthreads * std::mem::size_of::<ThreadArgs>() as u64,
        64,
    );
    let stacks_off = align_up(siginfo_off + siginfos.len() as u64, PAGE);
    let args_len = stacks_off + nthreads * STACK_SIZE;
    let scratch_len: u64 = specials.iter().map(|m| m.len + PAGE).sum();
    let premap_len: u64 = premaps.iter().map(|p| p.len + PAGE).sum();
    let zone_len = align_up(
        blob_len + PAGE + args_len + PAGE + scratch_len + premap_len + PAGE,
        1 << 21,
    );

    // A zone free in the image layout and in ours.
    let busy: Vec<(u64, u64)> = mm
        .vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(host.self_maps.iter().map(|m| (m.start, m.end)))
        .collect();
    let mut zone_start = None;
    let mut base = ZONE_SEARCH_START;
    while base + zone_len <= ZONE_SEARCH_END {
        if !busy.iter().any(|&b| overlaps(b, (base, base + zone_len))) {
            zone_start = Some(base);
            break;
        }
        base += ZONE_STEP;
    }
    let zone_start = zone_start.ok_or(RestoreError::NoRoom { bytes: zone_len })?;

    let blob_at = zone_start;
    let args_at = blob_at + blob_len + PAGE;
    let mut cursor = args_at + args_len + PAGE;
    let mut special_scratch = [0u64; 3];
    for (i, m) in specials.iter().enumerate() {
        special_scratch[i] = cursor;
        cursor += m.len + PAGE;
    }
    for p in premaps.iter_mut() {
        p.at = cursor;
        cursor += p.len + PAGE;
    }
    let moves: Vec<VmaMove> = premaps
        .iter()
        .map(|p| VmaMove {
            from: p.at,
            to: p.target,
            len: p.len,
        })
        .collect();

    // Everything but the zone and the vDSO areas is unmapped by the blob.
    let mut keep = keep_specials.clone();
    keep.push((zone_start, zone_start + zone_len));
    keep.sort();
    let mut unmap = Vec::new();
    let mut from = MMAP_MIN;
    for (s, e) in keep {
        if s > from {
            unmap.push(Range {
                start: from,
                len: s - from,
            });
        }
        from = from.max(e);
    }
    if from < TASK_SIZE {
        unmap.push(Range {
            start: from,
            len: TASK_SIZE - from,
        });
    }
    debug_assert!(unmap.len() as u64 <= nr_unmap_max);

    // Threads.
    let mut threads = Vec::new();
    for (i, t) in core.threads.iter().enumerate() {
        let mut comm = [0u8; 16];
        let n = t.comm.len().min(15);
        comm[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
        let rseq = t.rseq.unwrap_or_default();
        let ss = t.sigaltstack.unwrap_or_default();
        let (poff, pn) = thread_pending[i];
        threads.push(ThreadArgs {
            tid: t.tid as u64,
            stack_top: args_at + stacks_off + (i as u64 + 1) * STACK_SIZE,
            rseq_ptr: rseq.abi_pointer,
            rseq_len: rseq.abi_size as u64,
            rseq_sig: rseq.signature as u64,
            altstack_sp: ss.sp,
            altstack_flags: ss.flags as u32 as u64,
            altstack_size: ss.size,
            clear_child_tid: t.clear_child_tid,
            robust_head: t.robust_list_head,
            robust_len: t.robust_list_len,
            comm,
            pending: args_at + siginfo_off + poff,
            nr_pending: pn,
            ..Default::default()
        });
        if t.regs.is_none() {
            return Err(invalid(format!("thread {} has no registers", t.tid)));
        }
    }

    // Process-wide state.
    let mut sigactions = [KernelSigaction::default(); NSIG];
    let mut sigaction_mask = 0u64;
    for a in &core.sigactions {
        let s = a.signo as usize;
        if s == 0 || s > NSIG || s == libc::SIGKILL as usize || s == libc::SIGSTOP as usize {
            return Err(invalid(format!("sigaction for invalid signal {s}")));
        }
        sigactions[s - 1] = KernelSigaction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        sigaction_mask |= 1 << (s - 1);
    }
    let mut itimers = [ITimerVal::default(); 3];
    for t in &core.itimers {
        let slot = itimers
            .get_mut(t.which as usize)
            .ok_or_else(|| invalid(format!("itimer {} does not exist", t.which)))?;
        *slot = ITimerVal {
            interval_sec: (t.interval_us / 1_000_000) as i64,
            interval_usec: (t.interval_us % 1_000_000) as i64,
            value_sec: (t.value_us / 1_000_000) as i64,
            value_usec: (t.value_us % 1_000_000) as i64,
        };
    }
    let mut posix_timers = [PosixTimerArgs::default(); MAX_POSIX_TIMERS];
    if core.posix_timers.len() > MAX_POSIX_TIMERS {
        return Err(invalid(format!(
            "{} POSIX timers (at most {MAX_POSIX_TIMERS})",
            core.posix_timers.len()
        )));
    }
    for (slot, t) in posix_timers.iter_mut().zip(&core.posix_timers) {
        let ts = |ns: u64| Timespec {
            sec: (ns / 1_000_000_000) as i64,
            nsec: (ns % 1_000_000_000) as i64,
        };
        if t.id < 0 || !(0..=64).contains(&t.signo) || ![0, 1, 4].contains(&t.notify) {
            return Err(invalid(format!(
                "POSIX timer {} (signal {}, notify {})",
                t.id, t.signo, t.notify
            )));
        }
        *slot = PosixTimerArgs {
            id: t.id,
            clock: t.clock,
            sigev: KernelSigevent {
                value: t.sigev_value,
                signo: t.signo,
                notify: t.notify,
                tid: t.notify_tid,
                pad: [0; 11],
            },
            interval: ts(t.interval_ns),
            value: ts(t.value_ns),
        };
    }
    let mut rlimit_res = [0u64; NRLIMITS];
    let mut rlimits = [RLimit64::default(); NRLIMITS];
    let mut nr_rlimits = 0;
    for l in core.rlimits.iter().take(NRLIMITS) {
        let mut hard = l.hard;
        if let Some(&(_, cur_hard)) = host.hard_limits.iter().find(|(r, _)| *r == l.resource) {
            if hard > cur_hard {
                tracing::warn!(
                    resource = l.resource,
                    image = hard,
                    here = cur_hard,
                    "cannot raise a hard rlimit without CAP_SYS_RESOURCE; keeping this host's"
                );
                hard = cur_hard;
            }
        }
        rlimit_res[nr_rlimits] = l.resource as u64;
        rlimits[nr_rlimits] = RLimit64 {
            cur: l.soft.min(hard),
            max: hard,
        };
        nr_rlimits += 1;
    }
    let creds = creds_args(core, host)?;
    if mm.auxv.len() > AUXV_WORDS {
        return Err(invalid(format!(
            "auxv has {} words, at most {AUXV_WORDS}",
            mm.auxv.len()
        )));
    }
    let mut auxv = [0u64; AUXV_WORDS];
    auxv[..mm.auxv.len()].copy_from_slice(&mm.auxv);

    // Files.
    let mut fds = Vec::new();
    for f in &input.files.fds {
        if f.fd < 0 || f.fd > 1 << 20 {
            return Err(invalid(format!("fd number {} is out of range", f.fd)));
        }
        if let Some(what) = f.kind.as_ref().and_then(crate::files::too_large) {
            return Err(invalid(format!("fd {}: {what}", f.fd)));
        }
        match &f.kind {
            Some(k) => fds.push((f.fd, f.cloexec, k.clone())),
            None => return Err(invalid(format!("fd {} has no kind", f.fd))),
        }
    }
    // epoll instances last: what they watch must exist when they are made.
    fds.sort_by_key(|(_, _, k)| matches!(k, fd_entry::Kind::Epoll(_)));
    let close_from = (crate::files::max_fd(input.files) + 1).max(3);

    let mut specials_arr = [VmaMove::default(); 3];
    specials_arr[..specials.len()].copy_from_slice(&specials);
    let (rseq_ptr, rseq_lens, rseq_sig) = host.rseq.unwrap_or((0, [0; RSEQ_UNREG_TRIES], 0));
    let args = RestoreArgs {
        magic: ARGS_MAGIC,
        pid: pid as u64,
        unmap: args_at + unmap_off,
        nr_unmap: unmap.len() as u64,
        specials: specials_arr,
        special_scratch,
        nr_specials: specials.len() as u64,
        moves: args_at + moves_off,
        nr_moves: moves.len() as u64,
        mm_map: PrctlMmMap {
            start_code: mm.start_code,
            end_code: mm.end_code,
            start_data: mm.start_data,
            end_data: mm.end_data,
            start_brk: mm.start_brk,
            brk: mm.brk,
            start_stack: mm.start_stack,
            arg_start: mm.arg_start,
            arg_end: mm.arg_end,
            env_start: mm.env_start,
            env_end: mm.env_end,
            auxv: 0,
            auxv_size: (mm.auxv.len() * 8) as u32,
            exe_fd: u32::MAX,
        },
        auxv,
        rseq_unreg_ptr: rseq_ptr,
        rseq_unreg_lens: rseq_lens,
        rseq_unreg_sig: rseq_sig,
        personality: core.personality as u64,
        umask: core.umask as u64,
        sigaction_mask,
        sigactions,
        itimers,
        posix_timers,
        nr_posix_timers: core.posix_timers.len() as u64,
        nr_rlimits: nr_rlimits as u64,
        rlimit_res,
        rlimits,
        creds,
        shared_pending: args_at + siginfo_off,
        nr_shared_pending: nr_shared,
        threads: args_at + threads_off,
        nr_threads: nthreads,
        close_from: close_from as u64,
    };

    let exe = mm
        .exe
        .as_ref()
        .ok_or_else(|| invalid("no executable recorded".into()))?;
    let session = if input.tree_member {
        SessionAction::Inherit
    } else if core.sid == pid {
        SessionAction::NewSession
    } else if !input.shell_job {
        return Err(invalid(
            "the task is not a session leader but the image is not a shell job".into(),
        ));
    } else if core.pgid == pid {
        SessionAction::NewGroup
    } else {
        SessionAction::Inherit
    };
    let _ = host.shell_pgid;
    Ok(Plan {
        pid,
        tids,
        zone_start,
        zone_len,
        blob_at,
        args_at,
        args_len,
        premaps,
        args,
        unmap,
        moves,
        threads,
        siginfos,
        unmap_off,
        moves_off,
        threads_off,
        siginfo_off,
        fds,
        inherited: Vec::new(),
        close_from,
        exe: cstring(&exe.path, "executable path")?,
        cwd: cstring(&core.cwd, "cwd")?,
        root: if core.root == "/" {
            None
        } else {
            Some(cstring(&core.root, "root")?)
        },
        session,
        child_subreaper: core.child_subreaper,
        objects: Default::default(),
        borrowed: Vec::new(),
    })
}

fn creds_args(core: &TaskCore, host: &Host) -> Result<CredsArgs, RestoreError> {
    let c = core
        .creds
        .as_ref()
        .ok_or_else(|| invalid("no credentials recorded".into()))?;
    if c.uids.len() != 4 || c.gids.len() != 4 || c.groups.len() > 64 {
        return Err(invalid("malformed credentials".into()));
    }
    let mut out = CredsArgs::default();
    if *c == host.creds {
        return Ok(out);
    }
    out.apply = 1;
    out.uids.copy_from_slice(&c.uids);
    out.gids.copy_from_slice(&c.gids);
    out.ngroups = c.groups.len() as u64;
    out.groups[..c.groups.len()].copy_from_slice(&c.groups);
    out.cap_inh = c.cap_inh;
    out.cap_prm = c.cap_prm;
    out.cap_eff = c.cap_eff;
    out.cap_bnd = c.cap_bnd;
    out.cap_amb = c.cap_amb;
    out.securebits = c.securebits as u64;
    out.no_new_privs = c.no_new_privs as u64;
    Ok(out)
}
