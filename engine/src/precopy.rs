//! Iterative pre-copy: the source side of a live migration, in the engine.
//!
//! [`PreCopy::start`] freezes the process only long enough to set up a dirty
//! tracker ([`crate::dirty`]), arms it over the writable VMAs and lets the
//! process run. Round 0 copies every page worth saving; each later round
//! collects the ranges written since the previous one (re-protecting them in
//! the same step), copies them, and copies whole any VMA that appeared,
//! moved, grew or changed protection. [`PreCopy::finish`] freezes the
//! process, runs a last round, collects the non-memory state and the list of
//! resident pages, and disarms the tracker; the caller then owns the frozen
//! process and kills it once the destination runs it, or thaws it on failure.
//! [`PreCopy::abort`] (or dropping it) disarms the tracker: the process runs
//! on untouched.
use crate::dirty::{self, DirtyTracker, VmaRange};
use crate::dump::{self, DumpError, DumpOptions, MemStats, PageSink, TaskState};
use crate::freeze::FrozenProcess;
use crate::procfs;
use crm_proto::image::Vma;
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
}

pub struct PreCopy {
    pid: i32,
    vmas: Vec<Vma>,
    tracker: Box<dyn DirtyTracker>,
    round: u32,
    disarmed: bool,
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
    /// Checks that `pid` can be migrated, freezes it to create the tracker,
    /// arms it and resumes the process.
    pub fn start(pid: i32, opts: &DumpOptions) -> Result<PreCopy, PreCopyError> {
        dump::precheck(pid, opts)?;
        let frozen = FrozenProcess::freeze(pid).map_err(DumpError::from)?;
        let tracker = dirty::choose(pid, Some(&frozen));
        frozen
            .thaw()
            .map_err(|source| PreCopyError::Thaw { pid, source })?;
        let mut tracker = tracker?;
        let vmas = dump::classify(pid, &procfs::read_smaps(pid).map_err(DumpError::from)?)?;
        tracker.arm(&trackable(&vmas))?;
        tracing::debug!(pid, tracker = tracker.name(), "pre-copy armed");
        Ok(PreCopy {
            pid,
            vmas,
            tracker,
            round: 0,
            disarmed: false,
        })
    }

    pub fn tracker_name(&self) -> &'static str {
        self.tracker.name()
    }

    pub fn round_number(&self) -> u32 {
        self.round
    }

    /// Runs one round while the process keeps running.
    pub fn round(&mut self, sink: &mut dyn PageSink) -> Result<RoundStats, PreCopyError> {
        self.copy_round(sink)
    }

    fn copy_round(&mut self, sink: &mut dyn PageSink) -> Result<RoundStats, PreCopyError> {
        let started = Instant::now();
        let pid = self.pid;
        let mut stats = RoundStats {
            round: self.round,
            ..Default::default()
        };
        if self.round == 0 {
            stats.mem = dump::dump_pages(pid, &self.vmas, sink)?;
            stats.new_vmas = self.vmas.len();
        } else {
            // Collect first: it re-protects, so writes during the copy show
            // up in the next round.
            let dirty: Vec<(u64, u64)> = self
                .tracker
                .collect()?
                .iter()
                .map(|r| (r.start, r.end))
                .collect();
            stats.dirty_pages = dirty.iter().map(|r| (r.1 - r.0) / dump::PAGE).sum();
            let now = dump::classify(pid, &procfs::read_smaps(pid).map_err(DumpError::from)?)?;
            let fresh: Vec<Vma> = changed(&self.vmas, &now).into_iter().cloned().collect();
            if !fresh.is_empty() {
                // Arm before copying, so no write to a new VMA is missed.
                self.tracker.arm(&trackable(&now))?;
            }
            let mut mem = dump::dump_ranges(pid, &now, &dirty, sink)?;
            let whole = dump::dump_pages(pid, &fresh, sink)?;
            mem.pages_scanned += whole.pages_scanned;
            mem.pages_written += whole.pages_written;
            mem.zero_pages += whole.zero_pages;
            stats.mem = mem;
            stats.new_vmas = fresh.len();
            self.vmas = now;
        }
        self.round += 1;
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    /// Freezes the process, sends the last dirty pages to `sink` and
    /// collects everything else. On error the process is resumed and
    /// tracking removed.
    pub fn finish(mut self, sink: &mut dyn PageSink) -> Result<Final, PreCopyError> {
        let frozen = FrozenProcess::freeze(self.pid).map_err(DumpError::from)?;
        let frozen_at = Instant::now();
        let last_round = self.copy_round(sink)?;
        let state = dump::collect_state(&frozen)?;
        let resident = dump::resident_ranges(self.pid, &state.mm.vmas)?;
        self.disarm()?;
        Ok(Final {
            frozen,
            state,
            resident,
            last_round,
            frozen_for: frozen_at.elapsed(),
        })
    }

    /// Stops tracking; the process runs on as if nothing happened.
    pub fn abort(mut self) -> Result<(), PreCopyError> {
        self.disarm()
    }

    fn disarm(&mut self) -> Result<(), PreCopyError> {
        if !self.disarmed {
            self.disarmed = true;
            self.tracker.disarm()?;
        }
        Ok(())
    }
}

impl Drop for PreCopy {
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            tracing::warn!(pid = self.pid, error = %e, "could not remove dirty tracking");
        }
    }
}
