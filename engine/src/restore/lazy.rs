//! Lazy restore (post-copy from the image, DESIGN §2.5): the restored
//! process runs before its anonymous memory is filled in.
//!
//! The restoring child maps the private anonymous VMAs but fills none of
//! their pages. Before the tracer lets the task go, [`setup`] fills the few
//! pages the kernel already touched (e.g. the rseq areas it writes when the
//! blob registers them), creates a userfaultfd *inside* the task (a
//! userfaultfd serves the mm of its creator), pulls it here with
//! `pidfd_getfd` and registers every lazy VMA in missing mode with the
//! fork/remap/remove/unmap events. [`LazyPages::serve`] then fills pages:
//! a faulting page first (with its neighbours), everything else in the
//! background, run by run (each run's CRC checked as it is read), until no
//! page is left; then it closes the fd, and pages that never had content
//! fault in as zeros like any anonymous memory.
//!
//! The pieces still to fill follow the process: `munmap` and
//! `madvise(DONTNEED)` drop them (a later fault there gets a zero page, as it
//! would have without us), `mremap` moves them, and `fork` gives the child a
//! copy of the list for its own context. Where the userfaultfd cannot be had
//! (an unprivileged task without `vm.unprivileged_userfaultfd`, or a kernel
//! without the events), [`setup`] fills everything through `/proc/PID/mem`
//! before the task runs: the eager restore, done late.
use super::uffd_missing::{self as uffd, Fill, Msg};
use crate::dirty::uffd_sys;
use crate::image::PagesReader;
use crate::remote::RemoteThread;
use crm_proto::image::PageRun;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Pages filled around a faulting page (aligned window, within its piece).
const FAULT_WINDOW_PAGES: u64 = 16;
/// Bytes the background filler reads and copies at once.
const PUSH_CHUNK: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("lazy restore of process {pid}: {what}: {source}")]
    Io {
        pid: i32,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("lazy restore of process {pid}: {0}", .what)]
    Image { pid: i32, what: String },
}

/// Part of a run still to be filled: where it is now in the process and
/// which pages of which run it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    end: u64,
    run: usize,
    /// Index of the piece's first page within its run.
    page_off: u64,
}

/// The pieces of one address space still to fill, keyed by start address.
#[derive(Debug, Clone, Default)]
struct Pieces(BTreeMap<u64, Piece>);

impl Pieces {
    fn insert(&mut self, start: u64, p: Piece) {
        if start < p.end {
            self.0.insert(start, p);
        }
    }

    /// Removes and returns the parts of pieces inside `[a, b)`, splitting
    /// pieces that straddle its edges.
    fn take(&mut self, a: u64, b: u64) -> Vec<(u64, Piece)> {
        let mut out = Vec::new();
        let first = self
            .0
            .range(..=a)
            .next_back()
            .filter(|(_, p)| p.end > a)
            .map(|(&s, _)| s);
        let keys: Vec<u64> = first
            .into_iter()
            .chain(self.0.range(a..b).map(|(&s, _)| s))
            .collect();
        for s in keys {
            let Some(p) = self.0.remove(&s) else { continue };
            let lo = s.max(a);
            let hi = p.end.min(b);
            if s < lo {
                self.0.insert(s, Piece { end: lo, ..p });
            }
            if hi < p.end {
                self.0.insert(
                    hi,
                    Piece {
                        end: p.end,
                        run: p.run,
                        page_off: p.page_off + (hi - s) / PAGE,
                    },
                );
            }
            if lo < hi {
                out.push((
                    lo,
                    Piece {
                        end: hi,
                        run: p.run,
                        page_off: p.page_off + (lo - s) / PAGE,
                    },
                ));
            }
        }
        out
    }

    /// `mremap`: pieces in `[from, from + len)` now live at `to`.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from.saturating_add(len));
        // Whatever was at the destination was unmapped by the move.
        self.take(to, to.saturating_add(len));
        for (s, p) in moved {
            let delta = |x: u64| x - from + to;
            self.insert(
                delta(s),
                Piece {
                    end: delta(p.end),
                    ..p
                },
            );
        }
    }

    fn pages(&self) -> u64 {
        self.0.iter().map(|(s, p)| (p.end - s) / PAGE).sum()
    }
}

/// One userfaultfd context: the restored process, or a child it forked.
struct Ctx {
    uffd: OwnedFd,
    pieces: Pieces,
    exited: bool,
}

/// Counters of a finished [`LazyPages::serve`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LazyStats {
    /// Pages filled because the process faulted on them.
    pub faulted_pages: u64,
    /// Pages filled in the background.
    pub pushed_pages: u64,
    /// Zero pages given to faults outside the image's pages.
    pub zero_pages: u64,
    /// Contexts served (1 + forks).
    pub contexts: u64,
    pub elapsed: Duration,
}

/// The restored process's lazy memory, and the means to fill it.
pub struct LazyPages {
    pid: i32,
    pages: PagesReader,
    runs: Vec<PageRun>,
    ctxs: Vec<Ctx>,
    total_pages: u64,
}

impl std::fmt::Debug for LazyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPages")
            .field("pid", &self.pid)
            .field("pages", &self.total_pages)
            .finish_non_exhaustive()
    }
}

/// The lazy ranges of a plan: `(start, end)` of each lazy VMA at its final
/// address, and the runs that lie in them.
pub struct LazyRanges {
    pub vmas: Vec<(u64, u64)>,
    pub runs: Vec<usize>,
}

fn io_err(pid: i32, what: impl Into<String>) -> impl FnOnce(io::Error) -> LazyError {
    let what = what.into();
    move |source| LazyError::Io { pid, what, source }
}

/// Reads the pages `[page_off, page_off + n)` of `run` from the pages file.
fn read_pages(
    pid: i32,
    pages: &PagesReader,
    run: &PageRun,
    page_off: u64,
    buf: &mut [u8],
) -> Result<(), LazyError> {
    let at = pages
        .file_offset(run, page_off)
        .map_err(|e| LazyError::Image {
            pid,
            what: e.to_string(),
        })?;
    pages
        .file()
        .read_exact_at(buf, at)
        .map_err(io_err(pid, format!("read pages of {:#x}", run.vaddr)))
}

/// Prepares lazy memory for the task stopped at its last trap; see the
/// module doc. Returns `None` when the pages were filled eagerly instead.
pub fn setup(
    pid: i32,
    thread: &RemoteThread,
    pages: PagesReader,
    ranges: &LazyRanges,
) -> Result<Option<LazyPages>, LazyError> {
    let runs: Vec<PageRun> = ranges.runs.iter().map(|&i| pages.runs()[i]).collect();
    let mut pieces = Pieces::default();
    for (i, r) in runs.iter().enumerate() {
        pieces.insert(
            r.vaddr,
            Piece {
                end: r.vaddr + r.nr_pages * PAGE,
                run: i,
                page_off: 0,
            },
        );
    }
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(io_err(pid, "open /proc/PID/mem"))?;
    // Pages already present (written by the kernel during the restore)
    // would make a later fill fail: fill them now, through /proc/PID/mem.
    let present = present_pages(pid, &ranges.vmas)?;
    let mut buf = vec![0u8; PAGE as usize];
    for (a, b) in present {
        for (s, p) in pieces.take(a, b) {
            write_piece(pid, &mem, &pages, &runs, s, p, &mut buf)?;
        }
    }
    let uffd = match create_uffd(pid, thread) {
        Ok(fd) => fd,
        Err(reason) => {
            tracing::info!(
                "process {pid}: lazy restore unavailable ({reason}); filling memory before it runs"
            );
            let all = pieces.take(0, u64::MAX);
            let mut buf = vec![0u8; PUSH_CHUNK as usize];
            for (s, p) in all {
                write_piece(pid, &mem, &pages, &runs, s, p, &mut buf)?;
            }
            return Ok(None);
        }
    };
    for &(a, b) in &ranges.vmas {
        uffd::register_missing(uffd.as_fd(), a, b - a).map_err(io_err(
            pid,
            format!("register {a:#x}-{b:#x} with userfaultfd"),
        ))?;
    }
    let total_pages = pieces.pages();
    Ok(Some(LazyPages {
        pid,
        pages,
        runs,
        ctxs: vec![Ctx {
            uffd,
            pieces,
            exited: false,
        }],
        total_pages,
    }))
}

/// Writes a piece through `/proc/PID/mem` (works whatever the protection).
fn write_piece(
    pid: i32,
    mem: &std::fs::File,
    pages: &PagesReader,
    runs: &[PageRun],
    start: u64,
    p: Piece,
    buf: &mut Vec<u8>,
) -> Result<(), LazyError> {
    let run = &runs[p.run];
    let mut at = start;
    let mut off = p.page_off;
    while at < p.end {
        let n = ((p.end - at) / PAGE).min((buf.len() as u64 / PAGE).max(1));
        buf.resize((n * PAGE) as usize, 0);
        read_pages(pid, pages, run, off, buf)?;
        mem.write_all_at(buf, at)
            .map_err(io_err(pid, format!("write pages at {at:#x}")))?;
        at += n * PAGE;
        off += n;
    }
    Ok(())
}

/// Present pages in `vmas`, as merged ranges, from `/proc/PID/pagemap`.
fn present_pages(pid: i32, vmas: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, LazyError> {
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(io_err(pid, "open /proc/PID/pagemap"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    for &(a, b) in vmas {
        let mut addr = a;
        while addr < b {
            let n = ((b - addr) / PAGE).min(buf.len() as u64 / 8) as usize;
            let chunk = &mut buf[..n * 8];
            f.read_exact_at(chunk, addr / PAGE * 8)
                .map_err(io_err(pid, "read /proc/PID/pagemap"))?;
            for (i, e) in chunk.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                // Bit 63: present; bit 62: swapped.
                if v & (3 << 62) != 0 {
                    let pa = addr + i as u64 * PAGE;
                    match out.last_mut() {
                        Some(last) if last.1 == pa => last.1 = pa + PAGE,
                        _ => out.push((pa, pa + PAGE)),
                    }
                }
            }
            addr += n as u64 * PAGE;
        }
    }
    Ok(out)
}

/// Creates a userfaultfd in the task and pulls it here, with the events
/// lazy restore needs. `Err` says why it cannot be had.
fn create_uffd(pid: i32, thread: &RemoteThread) -> Result<OwnedFd, String> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let remote = thread
        .syscall(libc::SYS_userfaultfd as u64, [flags, 0, 0, 0, 0, 0])
        .map_err(|e| format!("userfaultfd in the task: {e}"))? as i32;
    let pulled = uffd_sys::pidfd_open(pid)
        .and_then(|pidfd| uffd_sys::pidfd_getfd(pidfd.as_fd(), remote))
        .map_err(|e| format!("pidfd_getfd: {e}"));
    let closed = thread
        .syscall(libc::SYS_close as u64, [remote as u64, 0, 0, 0, 0, 0])
        .map_err(|e| format!("close in the task: {e}"));
    let fd = pulled?;
    closed?;
    let api = uffd_sys::uffdio_api(fd.as_fd(), uffd::LAZY_FEATURES)
        .map_err(|e| format!("UFFDIO_API with the fork/remap/remove/unmap events: {e}"))?;
    if api.features & uffd::LAZY_FEATURES != uffd::LAZY_FEATURES {
        return Err(format!(
            "the kernel lacks userfaultfd events {:#x}",
            uffd::LAZY_FEATURES & !api.features
        ));
    }
    Ok(fd)
}

impl LazyPages {
    /// Pages still to fill.
    pub fn pages(&self) -> u64 {
        self.total_pages
    }

    /// Fills every lazy page (faults first), then closes the userfaultfd.
    /// Returns when nothing is left or the process (and its forks) exited.
    /// A CRC mismatch in the image kills the process: it may have read the
    /// damaged data already.
    pub fn serve(mut self) -> Result<LazyStats, LazyError> {
        let started = Instant::now();
        let mut stats = LazyStats {
            contexts: 1,
            ..Default::default()
        };
        let r = self.serve_inner(&mut stats);
        if r.is_err() {
            // SAFETY-free: kill(2) of the process we restored.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stats.elapsed = started.elapsed();
        r.map(|()| stats)
    }

    fn serve_inner(&mut self, stats: &mut LazyStats) -> Result<(), LazyError> {
        let mut buf = vec![0u8; PUSH_CHUNK as usize];
        // Runs whose CRC was checked (the background reads whole runs).
        let mut checked = vec![false; self.runs.len()];
        loop {
            self.handle_events(stats)?;
            // Background: the lowest piece of the first context with work.
            let Some(ci) = self
                .ctxs
                .iter()
                .position(|c| !c.exited && !c.pieces.0.is_empty())
            else {
                break;
            };
            let (&s, &p) = self.ctxs[ci].pieces.0.iter().next().expect("not empty");
            if !checked[p.run] {
                self.check_run(p.run, &mut buf)?;
                checked[p.run] = true;
            }
            let end = p.end.min(s + PUSH_CHUNK);
            let taken = self.ctxs[ci].pieces.take(s, end);
            for (ts, tp) in taken {
                stats.pushed_pages += self.fill(ci, ts, tp, &mut buf)?;
            }
        }
        self.ctxs.clear();
        Ok(())
    }

    /// Reads a whole run once and checks its CRC.
    fn check_run(&self, run: usize, buf: &mut Vec<u8>) -> Result<(), LazyError> {
        let r = &self.runs[run];
        let mut h = crc32fast::Hasher::new();
        let mut off = 0;
        while off < r.nr_pages {
            let n = (r.nr_pages - off).min(PUSH_CHUNK / PAGE);
            buf.resize((n * PAGE) as usize, 0);
            read_pages(self.pid, &self.pages, r, off, buf)?;
            h.update(buf);
            off += n;
        }
        if h.finalize() != r.crc32 {
            return Err(LazyError::Image {
                pid: self.pid,
                what: format!(
                    "the pages of {:#x} ({} pages) fail their checksum; the process was killed",
                    r.vaddr, r.nr_pages
                ),
            });
        }
        Ok(())
    }

    /// Copies a piece into context `ci`. Parts that cannot be copied now
    /// (an event is pending) go back into the list. Returns pages copied.
    fn fill(
        &mut self,
        ci: usize,
        start: u64,
        p: Piece,
        buf: &mut Vec<u8>,
    ) -> Result<u64, LazyError> {
        let pid = self.pid;
        let run = self.runs[p.run];
        let n = (p.end - start) / PAGE;
        buf.resize((n * PAGE) as usize, 0);
        read_pages(pid, &self.pages, &run, p.page_off, buf)?;
        let mut done = 0u64;
        let mut copied = 0u64;
        while done < n {
            let dst = start + done * PAGE;
            let src = &buf[(done * PAGE) as usize..];
            let ctx = &mut self.ctxs[ci];
            match uffd::copy(ctx.uffd.as_fd(), dst, src)
                .map_err(io_err(pid, format!("UFFDIO_COPY to {dst:#x}")))?
            {
                Fill::Done => {
                    copied += n - done;
                    done = n;
                }
                Fill::Partial(b) => {
                    copied += b / PAGE;
                    done += b / PAGE;
                }
                Fill::Exists => {
                    // Filled already (by a fault we served): skip one page.
                    let _ = uffd::wake(ctx.uffd.as_fd(), dst, PAGE);
                    done += 1;
                }
                Fill::Again => {
                    ctx.pieces.insert(
                        dst,
                        Piece {
                            end: p.end,
                            run: p.run,
                            page_off: p.page_off + done,
                        },
                    );
                    return Ok(copied);
                }
                Fill::Gone => return Ok(copied),
                Fill::Exited => {
                    ctx.exited = true;
                    return Ok(copied);
                }
            }
        }
        Ok(copied)
    }

    /// Reads and handles every pending message of every context.
    fn handle_events(&mut self, stats: &mut LazyStats) -> Result<(), LazyError> {
        let mut buf = Vec::new();
        let mut ci = 0;
        while ci < self.ctxs.len() {
            if self.ctxs[ci].exited {
                ci += 1;
                continue;
            }
            let msgs = uffd::read_msgs(self.ctxs[ci].uffd.as_fd())
                .map_err(io_err(self.pid, "read userfaultfd messages"))?;
            if msgs.is_empty() {
                ci += 1;
                continue;
            }
            for m in msgs {
                match m {
                    Msg::PageFault { addr } => {
                        self.fault(ci, addr & !(PAGE - 1), stats, &mut buf)?
                    }
                    Msg::Fork { uffd } => {
                        // SAFETY: the kernel installed this descriptor in our
                        // table for us, as part of the message.
                        let fd = unsafe { OwnedFd::from_raw_fd(uffd) };
                        let pieces = self.ctxs[ci].pieces.clone();
                        tracing::debug!(pid = self.pid, "lazy restore: the process forked");
                        self.ctxs.push(Ctx {
                            uffd: fd,
                            pieces,
                            exited: false,
                        });
                        stats.contexts += 1;
                    }
                    Msg::Remap { from, to, len } => self.ctxs[ci].pieces.remap(from, to, len),
                    Msg::Remove { start, end } | Msg::Unmap { start, end } => {
                        self.ctxs[ci].pieces.take(start, end);
                    }
                    Msg::Unknown(e) => tracing::debug!("lazy restore: unknown event {e:#x}"),
                }
            }
        }
        Ok(())
    }

    /// Serves a fault at page `addr` of context `ci`: the aligned window
    /// around it from the image, or a zero page where the image has none.
    fn fault(
        &mut self,
        ci: usize,
        addr: u64,
        stats: &mut LazyStats,
        buf: &mut Vec<u8>,
    ) -> Result<(), LazyError> {
        let win = FAULT_WINDOW_PAGES * PAGE;
        let a = addr & !(win - 1);
        let taken = self.ctxs[ci].pieces.take(a, a + win);
        let covers = taken.iter().any(|(s, p)| *s <= addr && addr < p.end);
        for (s, p) in taken {
            stats.faulted_pages += self.fill(ci, s, p, buf)?;
        }
        if !covers {
            let ctx = &mut self.ctxs[ci];
            match uffd::zeropage(ctx.uffd.as_fd(), addr, PAGE)
                .map_err(io_err(self.pid, format!("UFFDIO_ZEROPAGE at {addr:#x}")))?
            {
                Fill::Done | Fill::Partial(_) => stats.zero_pages += 1,
                Fill::Exists => {
                    let _ = uffd::wake(ctx.uffd.as_fd(), addr, PAGE);
                }
                Fill::Again | Fill::Gone => {}
                Fill::Exited => ctx.exited = true,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(end: u64, run: usize, page_off: u64) -> Piece {
        Piece { end, run, page_off }
    }

    #[test]
    fn take_splits_pieces_at_the_edges() {
        let mut p = Pieces::default();
        p.insert(0x10000, piece(0x20000, 0, 0));
        p.insert(0x30000, piece(0x34000, 1, 0));
        let t = p.take(0x14000, 0x31000);
        assert_eq!(
            t,
            vec![
                (0x14000, piece(0x20000, 0, 4)),
                (0x30000, piece(0x31000, 1, 0))
            ]
        );
        let left: Vec<_> = p.0.iter().map(|(&s, &q)| (s, q)).collect();
        assert_eq!(
            left,
            vec![
                (0x10000, piece(0x14000, 0, 0)),
                (0x31000, piece(0x34000, 1, 1))
            ]
        );
        assert_eq!(p.pages(), 4 + 3);
    }

    #[test]
    fn remap_moves_pieces_and_drops_what_was_at_the_destination() {
        let mut p = Pieces::default();
        p.insert(0x10000, piece(0x18000, 0, 0));
        p.insert(0x50000, piece(0x52000, 1, 0));
        // Move the upper half of the first piece over the second one.
        p.remap(0x14000, 0x50000, 0x4000);
        let left: Vec<_> = p.0.iter().map(|(&s, &q)| (s, q)).collect();
        assert_eq!(
            left,
            vec![
                (0x10000, piece(0x14000, 0, 0)),
                (0x50000, piece(0x54000, 0, 4))
            ]
        );
    }
}
