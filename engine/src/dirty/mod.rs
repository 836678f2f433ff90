//! Dirty-page tracking for iterative pre-copy (DESIGN.md §2.2): which pages
//! of a *running* target were written since the previous round.
//!
//! One trait, [`DirtyTracker`], three implementations, picked at run time by
//! [`choose`] (best first):
//!
//! 1. [`UffdWpAsync`] (Linux ≥ 6.7): a userfaultfd created inside the target
//!    with a remote syscall and pulled out with `pidfd_getfd`, registered in
//!    async write-protect mode; `PAGEMAP_SCAN` on `/proc/PID/pagemap` returns
//!    the written ranges and re-protects them in the same page-table walk.
//!    Cost per round: one page-table walk, nothing per clean page.
//! 2. [`SoftDirty`]: `clear_refs` ← 4 and bit 55 of pagemap, where the kernel
//!    has `CONFIG_MEM_SOFT_DIRTY` (chosen only if a real probe proves it).
//! 3. [`Checksum`]: a 64-bit hash of every tracked page, compared each round;
//!    works everywhere, reads all tracked memory every round.
//!
//! Usage by the pre-copy loop: freeze, [`choose`] (the target must be
//! stopped only for that), thaw; `arm(&trackable_vmas(&maps))`, copy every
//! page once; then each round `collect()` and copy what it returned while the
//! target runs (a page written during the copy is reported again next round).
//! Between rounds, `arm` again with a fresh VMA list: new, grown or moved VMAs
//! are registered (copy them whole: `arm` does not report their contents),
//! vanished ones dropped. Finally `disarm()` (or drop): the target runs on
//! untouched. What `collect` returned is no longer tracked: a caller whose
//! copy of a range failed must keep that range pending itself (STYLE.md 9).
//!
//! Ranges are page-aligned virtual addresses of the target; `end` is
//! exclusive. [`VmaRange`] is the tracker's input (a VMA or part of one),
//! [`DirtyRange`] its output.

mod checksum;
mod soft_dirty;
pub(crate) mod uffd_sys;
mod uffd_wp;

#[cfg(test)]
mod tests;

pub use checksum::Checksum;
pub use soft_dirty::SoftDirty;
pub use uffd_wp::UffdWpAsync;

use crate::freeze::FrozenProcess;
use crate::procfs::{MapEntry, ProcError};
use crate::remote::RemoteError;
use std::io;
use std::path::PathBuf;

/// Page size of the targets we track (x86-64).
pub const PAGE: u64 = 4096;

/// A range of pages written since the previous collect (or since arm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyRange {
    /// First byte (page-aligned).
    pub start: u64,
    /// One past the last byte (page-aligned).
    pub end: u64,
}

impl DirtyRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range (never returned by a tracker).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE
    }
}

/// A range of the target's address space to track: a writable VMA (or a
/// part of one) as `/proc/PID/maps` shows it. Page-aligned, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmaRange {
    pub start: u64,
    pub end: u64,
}

impl From<&MapEntry> for VmaRange {
    fn from(m: &MapEntry) -> Self {
        VmaRange {
            start: m.start,
            end: m.end,
        }
    }
}

impl From<&crm_proto::image::Vma> for VmaRange {
    fn from(v: &crm_proto::image::Vma) -> Self {
        VmaRange {
            start: v.start,
            end: v.end,
        }
    }
}

/// The VMAs of `maps` (from [`crate::procfs::read_smaps`]) whose contents
/// pre-copy must track: writable private mappings (anonymous, heap, stack,
/// written copies of file pages) and writable anonymous shared memory.
/// Left out: read-only VMAs (they cannot change without an `mprotect`, which
/// the caller sees in `maps`), shared file mappings (the file holds the
/// data), the vDSO areas, and `VM_IO`/`VM_PFNMAP` device mappings.
pub fn trackable_vmas(maps: &[MapEntry]) -> Vec<VmaRange> {
    maps.iter()
        .filter(|m| m.write && !m.is_empty())
        .filter(|m| {
            !matches!(
                m.name.as_str(),
                "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
            )
        })
        .filter(|m| !m.has_flag("io") && !m.has_flag("pf"))
        .filter(|m| {
            !m.shared
                || m.name.is_empty()
                || m.name == "/dev/zero (deleted)"
                || m.name.starts_with("[anon_shmem:")
        })
        .map(VmaRange::from)
        .collect()
}

/// Dirty tracking failed. Every variant names the target process; ioctls
/// and syscalls are named with the range they were applied to.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("process {pid}: {syscall} failed")]
    Syscall {
        pid: i32,
        syscall: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: remote {syscall} in thread {tid} failed")]
    Remote {
        pid: i32,
        tid: i32,
        syscall: &'static str,
        #[source]
        source: RemoteError,
    },
    #[error("process {pid}: {ioctl} over {start:#x}-{end:#x} failed")]
    Ioctl {
        pid: i32,
        ioctl: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "process {pid}: the kernel lacks userfaultfd feature {missing} \
         (UFFDIO_API offers features {offered:#x})"
    )]
    MissingFeature {
        pid: i32,
        missing: &'static str,
        offered: u64,
    },
    #[error("process {pid}: range {start:#x}-{end:#x} is empty or not page-aligned")]
    BadRange { pid: i32, start: u64, end: u64 },
    #[error("process {pid}: the frozen process given is {frozen}, not {pid}")]
    WrongProcess { pid: i32, frozen: i32 },
    #[error("process {pid} has no [vdso] mapping to run remote syscalls with")]
    NoVdso { pid: i32 },
    #[error("process {pid}: no syscall instruction found in [vdso] at {vdso:#x}")]
    NoGadget {
        pid: i32,
        vdso: u64,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: frozen with no thread to run a remote syscall in")]
    NoThread { pid: i32 },
    #[error("process {pid}: reading /proc")]
    Proc {
        pid: i32,
        #[source]
        source: ProcError,
    },
    #[error("process {pid}: cannot {op} {}", path.display())]
    File {
        pid: i32,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: process_vm_readv of {len} bytes at {addr:#x} failed")]
    ReadMem {
        pid: i32,
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: dirty tracker {tracker} cannot work on this kernel: {reason}")]
    Unavailable {
        pid: i32,
        tracker: &'static str,
        reason: String,
    },
    #[error("process {pid}: dirty tracker {tracker} was disarmed")]
    Disarmed { pid: i32, tracker: &'static str },
}

/// Tracks which pages of a running process are written.
pub trait DirtyTracker: Send {
    /// `"UffdWpAsync"`, `"SoftDirty"` or `"Checksum"` (the names of
    /// [`crate::features::dirty_tracker_choice`]).
    fn name(&self) -> &'static str;

    /// Start tracking writes to `vmas` (see [`trackable_vmas`]; overlapping
    /// or adjacent ranges are merged). May be called again between rounds
    /// with a new list: ranges that appeared, grew or moved are registered
    /// (their current contents are *not* reported — copy them whole), ranges
    /// no longer listed are dropped, and writes to ranges still listed that
    /// happened since the previous collect stay pending for the next one.
    fn arm(&mut self, vmas: &[VmaRange]) -> Result<(), DirtyError>;

    /// The first [`DirtyTracker::arm`], with the protection left to the
    /// caller: it calls [`DirtyTracker::protect`] on each part of `vmas`
    /// right before it copies that part (so arming a large address space
    /// is spread over the first copy instead of preceding it). `false`:
    /// this tracker armed everything now.
    fn arm_deferred(&mut self, vmas: &[VmaRange]) -> Result<bool, DirtyError> {
        self.arm(vmas).map(|()| false)
    }

    /// Starts tracking writes to `[start, end)` (armed with
    /// [`DirtyTracker::arm_deferred`]); a part no longer mapped is skipped.
    fn protect(&mut self, _start: u64, _end: u64) -> Result<(), DirtyError> {
        Ok(())
    }

    /// Ranges written since the previous collect (or arm), sorted and
    /// merged, re-protected atomically so the next collect sees later
    /// writes. Does not need the target stopped. Tracked ranges that are no
    /// longer mapped yield nothing.
    fn collect(&mut self) -> Result<Vec<DirtyRange>, DirtyError>;

    /// Stop tracking: unregister everything; the target runs on untouched.
    /// Later calls of `arm`/`collect` fail with [`DirtyError::Disarmed`].
    fn disarm(&mut self) -> Result<(), DirtyError>;
}

/// Picks the best tracker that works for `pid` on this kernel:
/// [`UffdWpAsync`] if `frozen` (the target, stopped) is given and it can be
/// set up, else [`SoftDirty`] if a real probe proves soft-dirty bits work,
/// else [`Checksum`]. Why a better tracker was passed over is logged.
pub fn choose(
    pid: i32,
    frozen: Option<&FrozenProcess>,
) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    match frozen {
        Some(frozen) => match UffdWpAsync::new(pid, frozen) {
            Ok(t) => return Ok(Box::new(t)),
            Err(e @ DirtyError::WrongProcess { .. }) => return Err(e),
            Err(e) => tracing::info!(pid, error = %error_chain(&e), "UffdWpAsync unavailable"),
        },
        None => tracing::info!(pid, "UffdWpAsync needs the target frozen; not tried"),
    }
    match SoftDirty::new(pid) {
        Ok(t) => return Ok(Box::new(t)),
        Err(e) => tracing::info!(pid, error = %error_chain(&e), "SoftDirty unavailable"),
    }
    Ok(Box::new(Checksum::new(pid)?))
}

pub(crate) use crate::error_chain;

/// Sorts, checks and merges `vmas` into disjoint, non-adjacent spans.
fn normalize(pid: i32, vmas: &[VmaRange]) -> Result<Vec<VmaRange>, DirtyError> {
    let mut v: Vec<VmaRange> = vmas.to_vec();
    for r in &v {
        if r.start >= r.end || r.start % PAGE != 0 || r.end % PAGE != 0 {
            return Err(DirtyError::BadRange {
                pid,
                start: r.start,
                end: r.end,
            });
        }
    }
    v.sort();
    let mut out: Vec<VmaRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// Parts of the sorted, disjoint spans `a` not covered by `b` (also sorted
/// and disjoint).
fn subtract(a: &[VmaRange], b: &[VmaRange]) -> Vec<VmaRange> {
    let mut out = Vec::new();
    for r in a {
        let mut cur = r.start;
        for s in b.iter().filter(|s| s.end > r.start && s.start < r.end) {
            if s.start > cur {
                out.push(VmaRange {
                    start: cur,
                    end: s.start,
                });
            }
            cur = cur.max(s.end);
        }
        if cur < r.end {
            out.push(VmaRange {
                start: cur,
                end: r.end,
            });
        }
    }
    out
}

/// True if `[start, end)` lies entirely inside one of the sorted, disjoint
/// `spans`.
fn covered(spans: &[VmaRange], start: u64, end: u64) -> bool {
    let i = spans.partition_point(|s| s.end <= start);
    spans
        .get(i)
        .is_some_and(|s| s.start <= start && end <= s.end)
}

/// The parts of `span` that are mapped, each with its VMA.
fn mapped_pieces<'m>(
    span: VmaRange,
    maps: &'m [MapEntry],
) -> impl Iterator<Item = (u64, u64, &'m MapEntry)> + 'm {
    maps.iter()
        .filter(move |m| m.end > span.start && m.start < span.end)
        .map(move |m| (m.start.max(span.start), m.end.min(span.end), m))
}

/// Appends `[start, end)` to the sorted `out`, merging with the last range
/// when they touch or overlap.
fn push_range(out: &mut Vec<DirtyRange>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    match out.last_mut() {
        Some(last) if start <= last.end && start >= last.start => last.end = last.end.max(end),
        _ => out.push(DirtyRange { start, end }),
    }
}

/// Sorts and merges ranges that arrived out of order.
fn sort_merge(mut v: Vec<DirtyRange>) -> Vec<DirtyRange> {
    v.sort();
    let mut out = Vec::with_capacity(v.len());
    for r in v {
        push_range(&mut out, r.start, r.end);
    }
    out
}
