//! Iterative pre-copy: the source side of a live migration, in the engine.
//!
//! [`PreCopy::start`] freezes the process only long enough to set up a dirty
//! tracker ([`crate::dirty`]), arms it over the writable VMAs and lets the
//! process run. Round 0 copies every page worth saving; each later round
//! collects the ranges written since the previous one (re-protecting them in
//! the same step), copies them, and copies whole any VMA that appeared,
//! moved, grew or changed protection. [`PreCopy::finish`] freezes the
//! process, runs a last round, collects the non-memory state and the list of
//! resident pages; the caller then owns the frozen process and kills it once
//! the destination runs it, or thaws it on failure. [`PreCopy::abort`] (or
//! dropping it) disarms the tracker: the process runs on untouched.
//!
//! Rounds find the VMAs in `/proc/PID/maps`: the copy needs only their
//! bounds, protection and names. `smaps`, whose `VmFlags` the image records,
//! walks every page table; it is read once, in the frozen phase.
//!
//! The frozen phase is the migration's downtime, so `finish` does there only
//! what needs the process stopped, in the same order as a dump: collect,
//! copy, non-memory state (remote syscalls), then `smaps` and the list of
//! resident pages, these two on two threads (both only read). The tracker
//! is not disarmed there (`UFFDIO_UNREGISTER` walks every tracked page
//! table) but handed over in [`Final::tracking`], to be dropped once the
//! process is killed (removing it then costs nothing) or thawed. Each step
//! is logged at debug level with its duration.
use crate::dirty::{self, DirtyTracker, VmaRange};
use crate::dump::{self, DumpError, MemStats, PageSink, Target, TaskState};
use crate::freeze::FrozenProcess;
use crate::procfs::{self, MapEntry};
use crm_proto::image::{FilesCore, Vma};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PreCopyError {
    #[error(transparent)]
    Dump(#[from] DumpError),
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    #[error("process {pid}: cannot resume it after setting up dirty tracking")]
    Thaw {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// What one round copied.
#[derive(Debug, Clone, Default)]
pub struct RoundStats {
    pub round: u32,
    /// Pages the tracker reported written (0 for round 0).
    pub dirty_pages: u64,
    pub mem: MemStats,
    /// VMAs copied whole because they are new or changed.
    pub new_vmas: usize,
    pub elapsed: Duration,
}

/// The end of pre-copy: the frozen process and what the destination needs
/// besides the pages already sent.
pub struct Final {
    pub frozen: FrozenProcess,
    pub state: TaskState,
    /// Pages whose contents live in memory now; the destination drops copies
    /// of any other page.
    pub resident: Vec<(u64, u64)>,
    pub last_round: RoundStats,
    /// Freeze → state collected and last pages handed to the sink.
    pub frozen_for: Duration,
    /// The dirty tracker, still armed. Drop it (or [`Tracking::disarm`])
    /// after killing or thawing `frozen`, not before: disarming is slow and
    /// need not happen while the process is stopped. Dropping what is left
    /// of a `Final` after its other fields were moved out does it.
    pub tracking: Tracking,
}

/// A dirty tracker that is disarmed when this is dropped: while it is
/// alive, the target may still carry write protection (harmless in async
/// mode: a write only marks its page written).
pub struct Tracking {
    pid: i32,
    tracker: Box<dyn DirtyTracker>,
    disarmed: bool,
}

impl Tracking {
    fn new(pid: i32, tracker: Box<dyn DirtyTracker>) -> Tracking {
        Tracking {
            pid,
            tracker,
            disarmed: false,
        }
    }

    /// Stops tracking now; the process runs on as if nothing happened.
    pub fn disarm(mut self) -> Result<(), PreCopyError> {
        self.disarm_once()
    }

    fn disarm_once(&mut self) -> Result<(), PreCopyError> {
        if !self.disarmed {
            self.disarmed = true;
            let started = Instant::now();
            self.tracker.disarm()?;
            tracing::debug!(
                pid = self.pid,
                "dirty tracking removed in {:.1} ms",
                ms(started.elapsed())
            );
        }
        Ok(())
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if let Err(e) = self.disarm_once() {
            tracing::warn!(pid = self.pid, error = %e, "could not remove dirty tracking");
        }
    }
}

pub struct PreCopy {
    pid: i32,
    vmas: Vec<Vma>,
    tracking: Tracking,
    round: u32,
    /// Leave shared anonymous memory out of the rounds (a tree copies it
    /// once, frozen: a task's tracker sees only its own writes to it).
    skip_shared: bool,
    /// The tracker was armed without protection: round 0 protects each
    /// part right before copying it ([`DirtyTracker::arm_deferred`]).
    deferred: bool,
}

/// Bytes round 0 protects and copies at a time when protection is deferred.
const ROUND0_PART: u64 = 64 << 20;

/// `vmas` without shared anonymous memory when `skip` is set.
fn copied(vmas: &[Vma], skip: bool) -> Vec<Vma> {
    vmas.iter()
        .filter(|v| !(skip && dump::is_shared_anon(v)))
        .cloned()
        .collect()
}

/// Page ranges `[start, end)`, as [`Final::resident`] lists them.
type Ranges = Vec<(u64, u64)>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Logs, at debug level, how long each step of the frozen phase took.
struct Steps {
    pid: i32,
    last: Instant,
    log: bool,
}

impl Steps {
    fn new(pid: i32, log: bool) -> Steps {
        Steps {
            pid,
            last: Instant::now(),
            log,
        }
    }

    fn done(&mut self, step: &str) {
        let now = Instant::now();
        if self.log {
            tracing::debug!(
                pid = self.pid,
                "frozen: {step} in {:.1} ms",
                ms(now - self.last)
            );
        }
        self.last = now;
    }
}

fn trackable(vmas: &[Vma]) -> Vec<VmaRange> {
    vmas.iter()
        .filter(|v| v.prot & libc::PROT_WRITE as u32 != 0)
        .filter(|v| {
            use crm_proto::image::VmaKind::*;
            match v.kind() {
                Anon | Heap | Stack => true,
                File => !v.shared,
                _ => false,
            }
        })
        .map(VmaRange::from)
        .collect()
}

/// VMAs of `now` with no identical VMA (range, protection, kind, sharing) in `before`.
fn changed<'a>(before: &[Vma], now: &'a [Vma]) -> Vec<&'a Vma> {
    now.iter()
        .filter(|v| {
            !before.iter().any(|b| {
                b.start == v.start
                    && b.end == v.end
                    && b.prot == v.prot
                    && b.kind == v.kind
                    && b.shared == v.shared
            })
        })
        .collect()
}

impl PreCopy {
    /// Freezes `pid` to create the tracker, arms it and resumes the
    /// process. The caller checked it ([`dump::precheck_tree`]). `skip_shared`:
    /// leave shared anonymous memory to the caller (see
    /// [`crate::precopy_tree`]).
    pub fn start(pid: i32, skip_shared: bool) -> Result<PreCopy, PreCopyError> {
        let frozen = FrozenProcess::freeze(pid).map_err(DumpError::from)?;
        let tracker = dirty::choose(pid, Some(&frozen));
        frozen
            .thaw()
            .map_err(|source| PreCopyError::Thaw { pid, source })?;
        let mut tracking = Tracking::new(pid, tracker?);
        let vmas = dump::classify(pid, &procfs::read_maps(pid).map_err(DumpError::from)?)?;
        // Protection is applied part by part during round 0, just before
        // each part is copied: arming 1 GiB takes tens of ms otherwise.
        let deferred = tracking.tracker.arm_deferred(&trackable(&vmas))?;
        tracing::debug!(pid, tracker = tracking.tracker.name(), "pre-copy armed");
        Ok(PreCopy {
            pid,
            vmas,
            tracking,
            round: 0,
            skip_shared,
            deferred,
        })
    }

    pub fn tracker_name(&self) -> &'static str {
        self.tracking.tracker.name()
    }

    pub fn round_number(&self) -> u32 {
        self.round
    }

    /// Runs one round while the process keeps running.
    pub fn round(&mut self, sink: &mut dyn PageSink) -> Result<RoundStats, PreCopyError> {
        let mut steps = Steps::new(self.pid, false);
        let (stats, _) = self.copy_round(sink, Target::Running, &mut steps)?;
        Ok(stats)
    }

    /// One round. Also returns the `maps` reading the round's VMAs come from
    /// (none for round 0: those of [`PreCopy::start`]).
    fn copy_round(
        &mut self,
        sink: &mut dyn PageSink,
        target: Target,
        steps: &mut Steps,
    ) -> Result<(RoundStats, Option<Vec<MapEntry>>), PreCopyError> {
        let started = Instant::now();
        let pid = self.pid;
        let mut stats = RoundStats {
            round: self.round,
            ..Default::default()
        };
        let mut layout = None;
        if self.round == 0 && self.deferred {
            stats.mem = self.protect_and_copy(target, sink)?;
            self.deferred = false;
            stats.new_vmas = self.vmas.len();
            steps.done("all pages protected and copied");
        } else if self.round == 0 {
            stats.mem = dump::dump_pages(pid, target, &copied(&self.vmas, self.skip_shared), sink)?;
            stats.new_vmas = self.vmas.len();
            steps.done("all pages copied");
        } else {
            // Collect first: it re-protects, so writes during the copy show
            // up in the next round.
            let dirty: Vec<(u64, u64)> = self
                .tracking
                .tracker
                .collect()?
                .iter()
                .map(|r| (r.start, r.end))
                .collect();
            stats.dirty_pages = dirty.iter().map(|r| (r.1 - r.0) / dump::PAGE).sum();
            steps.done("dirty pages collected");
            let maps = procfs::read_maps(pid).map_err(DumpError::from)?;
            let now = dump::classify(pid, &maps)?;
            layout = Some(maps);
            steps.done("maps read");
            let fresh: Vec<Vma> = changed(&self.vmas, &now).into_iter().cloned().collect();
            if !fresh.is_empty() {
                // Arm before copying, so no write to a new VMA is missed.
                self.tracking.tracker.arm(&trackable(&now))?;
                steps.done("new VMAs armed");
            }
            let skip = self.skip_shared;
            let mut mem = dump::dump_ranges(pid, target, &copied(&now, skip), &dirty, sink)?;
            let whole = dump::dump_pages(pid, target, &copied(&fresh, skip), sink)?;
            mem.pages_scanned += whole.pages_scanned;
            mem.pages_written += whole.pages_written;
            mem.zero_pages += whole.zero_pages;
            stats.mem = mem;
            stats.new_vmas = fresh.len();
            self.vmas = now;
            steps.done("pages copied");
        }
        self.round += 1;
        stats.elapsed = started.elapsed();
        Ok((stats, layout))
    }

    /// Round 0 with deferred protection: each tracked VMA is protected,
    /// [`ROUND0_PART`] bytes at a time, right before that part is copied. A
    /// write before a part is protected lands before its copy; one after is
    /// tracked. Tracked VMAs round 0 does not copy are protected first.
    fn protect_and_copy(
        &mut self,
        target: Target,
        sink: &mut dyn PageSink,
    ) -> Result<MemStats, PreCopyError> {
        let tracked = trackable(&self.vmas);
        let is_tracked = |v: &Vma| tracked.iter().any(|r| r.start == v.start && r.end == v.end);
        let copy = copied(&self.vmas, self.skip_shared);
        for v in self.vmas.iter().filter(|v| is_tracked(v)) {
            if !copy.iter().any(|c| c.start == v.start) {
                self.tracking.tracker.protect(v.start, v.end)?;
            }
        }
        let mut mem = MemStats::default();
        for v in copy.iter().filter(|v| dump::saves_anything(v)) {
            let mut at = v.start;
            while at < v.end {
                let end = at.saturating_add(ROUND0_PART).min(v.end);
                if is_tracked(v) {
                    self.tracking.tracker.protect(at, end)?;
                }
                let part = Vma {
                    start: at,
                    end,
                    pgoff: v.pgoff + (at - v.start),
                    ..v.clone()
                };
                mem.add(&dump::dump_pages(self.pid, target, &[part], sink)?);
                at = end;
            }
        }
        Ok(mem)
    }

    /// Freezes the process, sends the last dirty pages to `sink` and
    /// collects everything else. On error the process is resumed and
    /// tracking removed. On success tracking is still armed: see
    /// [`Final::tracking`].
    pub fn finish(self, sink: &mut dyn PageSink) -> Result<Final, PreCopyError> {
        let frozen = FrozenProcess::freeze(self.pid).map_err(DumpError::from)?;
        self.finish_frozen(frozen, None, sink)
    }

    /// [`PreCopy::finish`] of a process the caller froze (a task of a
    /// frozen tree). On error `frozen` is dropped: resumed.
    ///
    /// `files`: the task's descriptors, if the caller collected them (a
    /// tree links them across its tasks); else they are collected here.
    pub(crate) fn finish_frozen(
        mut self,
        frozen: FrozenProcess,
        files: Option<FilesCore>,
        sink: &mut dyn PageSink,
    ) -> Result<Final, PreCopyError> {
        let pid = self.pid;
        let frozen_at = Instant::now();
        let mut steps = Steps::new(pid, true);
        let (last_round, maps) = self.copy_round(sink, Target::Frozen, &mut steps)?;
        let Some(maps) = maps else {
            // Finished before any round: the VMAs copied are those of
            // `start`. Rare; no shortcut.
            let state = match files {
                Some(f) => dump::collect_state_with(&frozen, f)?,
                None => dump::collect_state(&frozen)?,
            };
            let resident = dump::resident_ranges(pid, &state.mm.vmas)?;
            return Ok(Final {
                frozen,
                state,
                resident,
                last_round,
                frozen_for: frozen_at.elapsed(),
                tracking: self.tracking,
            });
        };
        let mut state = match files {
            Some(f) => dump::collect_task_with(&frozen, &maps, f)?,
            None => dump::collect_task(&frozen, &maps)?,
        };
        steps.done("state collected");
        let (smaps, resident) = self.smaps_and_resident(&mut steps);
        let smaps = smaps?;
        state.mm.vmas = dump::classify(pid, &smaps)?;
        let resident = if procfs::same_layout(&maps, &smaps) {
            resident?
        } else {
            // The VMAs changed while frozen (the tracker registering new
            // ones merges them with their neighbours): list the pages
            // again, by the VMAs recorded.
            let resident = dump::resident_ranges(pid, &state.mm.vmas)?;
            steps.done("resident pages listed again (VMAs changed)");
            resident
        };
        let frozen_for = frozen_at.elapsed();
        tracing::debug!(pid, "frozen: final round done in {:.1} ms", ms(frozen_for));
        Ok(Final {
            frozen,
            state,
            resident,
            last_round,
            frozen_for,
            tracking: self.tracking,
        })
    }

    /// Reads `smaps` on a second thread while this one lists the resident
    /// pages of the VMAs of the last round: both only read the frozen
    /// process's page tables, and each takes a page-table walk.
    fn smaps_and_resident(
        &self,
        steps: &mut Steps,
    ) -> (Result<Vec<MapEntry>, DumpError>, Result<Ranges, DumpError>) {
        let pid = self.pid;
        let ((smaps, smaps_took), resident) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let started = Instant::now();
                (procfs::read_smaps(pid), started.elapsed())
            });
            let resident = dump::resident_ranges(pid, &self.vmas);
            steps.done("resident pages listed");
            let smaps = reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (smaps, resident)
        });
        steps.done(&format!(
            "smaps read (in {:.1} ms, beside the resident pages)",
            ms(smaps_took)
        ));
        (smaps.map_err(DumpError::from), resident)
    }

    /// Stops tracking; the process runs on as if nothing happened.
    pub fn abort(self) -> Result<(), PreCopyError> {
        self.tracking.disarm()
    }
}
