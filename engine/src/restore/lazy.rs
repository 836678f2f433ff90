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

/// A range still to be filled: where it is now in the process (the map key
/// and `end`) and where its pages were when they were dumped (`orig`, the
/// address the [`PageSource`] knows them by; they differ after `mremap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    end: u64,
    orig: u64,
}

/// Where lazy pages come from, by their address at dump time.
pub trait PageSource: Send {
    /// Fills `buf` (whole pages) with the pages at `orig..orig + buf.len()`,
    /// all of which hold content (they were handed over as lazy ranges).
    fn read(&mut self, orig: u64, buf: &mut [u8]) -> Result<(), String>;

    /// The pages from `orig` on as one slice of whole pages, at most `max`
    /// bytes, if the source holds them so: they are copied into the
    /// process from there, without [`PageSource::read`]'s copy.
    fn slice(&self, _orig: u64, _max: usize) -> Option<&[u8]> {
        None
    }

    /// The pages at `orig..orig + len` will not be asked for again (they
    /// are in the process, or gone from it): the source may drop them.
    fn done_with(&mut self, _orig: u64, _len: u64) {}
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
                        orig: p.orig + (hi - s),
                    },
                );
            }
            if lo < hi {
                out.push((
                    lo,
                    Piece {
                        end: hi,
                        orig: p.orig + (lo - s),
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
    /// Zero pages given to faults outside the lazy pages.
    pub zero_pages: u64,
    /// Contexts served (1 + forks).
    pub contexts: u64,
    pub elapsed: Duration,
}

impl LazyStats {
    /// Adds the figures of another address space served at the same time
    /// (the time is the longest of the two).
    pub fn add(&mut self, other: &LazyStats) {
        self.faulted_pages += other.faulted_pages;
        self.pushed_pages += other.pushed_pages;
        self.zero_pages += other.zero_pages;
        self.contexts += other.contexts;
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

/// The restored process's lazy memory, and the means to fill it.
pub struct LazyPages {
    pid: i32,
    source: Box<dyn PageSource>,
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
/// address, and the runs (indexes into the pagemap) that lie in them.
pub struct LazyRanges {
    pub vmas: Vec<(u64, u64)>,
    pub runs: Vec<usize>,
}

/// Where the lazy pages of a restore are served from.
pub enum LazyMode {
    /// Everything is filled before the process runs.
    Off,
    /// This process serves them from the image's pages file.
    Image,
    /// Another process serves them: the userfaultfd and the ranges are
    /// handed to it over this unix socket (see [`handover`]); the image
    /// holds no pages of the lazy VMAs.
    External(OwnedFd),
}

fn io_err(pid: i32, what: impl Into<String>) -> impl FnOnce(io::Error) -> LazyError {
    let what = what.into();
    move |source| LazyError::Io { pid, what, source }
}

/// Pages from an image's pages file; each run's CRC is checked the first
/// time any of its pages is read.
struct ImageSource {
    pages: PagesReader,
    /// Lazy runs, sorted by address, and whether each was checked.
    runs: Vec<(PageRun, bool)>,
}

impl ImageSource {
    fn check(&self, run: &PageRun) -> Result<(), String> {
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; PUSH_CHUNK as usize];
        let mut off = 0;
        while off < run.nr_pages {
            let n = (run.nr_pages - off).min(PUSH_CHUNK / PAGE);
            let b = &mut buf[..(n * PAGE) as usize];
            self.read_run(run, off, b)?;
            h.update(b);
            off += n;
        }
        if h.finalize() != run.crc32 {
            return Err(format!(
                "the pages of {:#x} ({} pages) fail their checksum",
                run.vaddr, run.nr_pages
            ));
        }
        Ok(())
    }

    fn read_run(&self, run: &PageRun, page_off: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = self
            .pages
            .file_offset(run, page_off)
            .map_err(|e| e.to_string())?;
        self.pages
            .file()
            .read_exact_at(buf, at)
            .map_err(|e| format!("read pages of {:#x}: {e}", run.vaddr))
    }
}

impl PageSource for ImageSource {
    fn read(&mut self, orig: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0u64;
        let len = buf.len() as u64;
        while done < len {
            let a = orig + done;
            let i = self
                .runs
                .partition_point(|(r, _)| r.vaddr + r.nr_pages * PAGE <= a);
            let Some((run, checked)) = self.runs.get(i).copied() else {
                return Err(format!("no page of the image at {a:#x}"));
            };
            if run.vaddr > a {
                return Err(format!("no page of the image at {a:#x}"));
            }
            if !checked {
                self.check(&run)?;
                self.runs[i].1 = true;
            }
            let off = (a - run.vaddr) / PAGE;
            let n = (run.nr_pages - off).min((len - done) / PAGE);
            self.read_run(
                &run,
                off,
                &mut buf[done as usize..(done + n * PAGE) as usize],
            )?;
            done += n * PAGE;
        }
        Ok(())
    }
}

/// Prepares lazy memory for the task stopped at its last trap; see the
/// module doc. Returns what this process must serve: `None` when the pages
/// were filled eagerly, or handed over ([`LazyMode::External`]).
pub fn setup(
    pid: i32,
    thread: &RemoteThread,
    pages: PagesReader,
    ranges: &LazyRanges,
    mode: LazyMode,
) -> Result<Option<LazyPages>, LazyError> {
    let present = present_pages(pid, &ranges.vmas)?;
    if let LazyMode::External(sock) = mode {
        let uffd = match create_uffd(pid, thread) {
            Ok(fd) => {
                register_all(pid, &fd, &ranges.vmas)?;
                Some(fd)
            }
            Err(reason) => {
                tracing::info!(
                    "process {pid}: lazy restore unavailable ({reason}); the page server fills \
                     its memory before it runs"
                );
                None
            }
        };
        handover(pid, &sock, uffd.as_ref(), &ranges.vmas, &present)?;
        return Ok(None);
    }
    let runs: Vec<PageRun> = ranges.runs.iter().map(|&i| pages.runs()[i]).collect();
    let mut pieces = Pieces::default();
    for r in &runs {
        pieces.insert(
            r.vaddr,
            Piece {
                end: r.vaddr + r.nr_pages * PAGE,
                orig: r.vaddr,
            },
        );
    }
    let mut source = ImageSource {
        pages,
        runs: runs.iter().map(|&r| (r, false)).collect(),
    };
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(io_err(pid, "open /proc/PID/mem"))?;
    // Pages already present (written by the kernel during the restore)
    // would make a later fill fail: fill them now, through /proc/PID/mem.
    let mut todo: Vec<(u64, Piece)> = present
        .iter()
        .flat_map(|&(a, b)| pieces.take(a, b))
        .collect();
    let uffd = match create_uffd(pid, thread) {
        Ok(fd) => Some(fd),
        Err(reason) => {
            tracing::info!(
                "process {pid}: lazy restore unavailable ({reason}); filling memory before it runs"
            );
            todo.extend(pieces.take(0, u64::MAX));
            None
        }
    };
    let mut buf = Vec::new();
    for (s, p) in todo {
        let mut at = s;
        while at < p.end {
            let n = (p.end - at).min(PUSH_CHUNK);
            buf.resize(n as usize, 0);
            source
                .read(p.orig + (at - s), &mut buf)
                .map_err(|what| LazyError::Image { pid, what })?;
            mem.write_all_at(&buf, at)
                .map_err(io_err(pid, format!("write pages at {at:#x}")))?;
            at += n;
        }
    }
    let Some(uffd) = uffd else { return Ok(None) };
    register_all(pid, &uffd, &ranges.vmas)?;
    let total_pages = pieces.pages();
    Ok(Some(LazyPages {
        pid,
        source: Box::new(source),
        ctxs: vec![Ctx {
            uffd,
            pieces,
            exited: false,
        }],
        total_pages,
    }))
}

fn register_all(pid: i32, uffd: &OwnedFd, vmas: &[(u64, u64)]) -> Result<(), LazyError> {
    for &(a, b) in vmas {
        uffd::register_missing(uffd.as_fd(), a, b - a).map_err(io_err(
            pid,
            format!("register {a:#x}-{b:#x} with userfaultfd"),
        ))?;
    }
    Ok(())
}

/// Most ranges a hand-over message may carry.
const MAX_HANDOVER_RANGES: usize = 1 << 20;

/// Sends the userfaultfd, the lazy VMAs and the already-present pages to the
/// serving process, then waits until it says it wrote the present pages
/// (one byte). Without a userfaultfd the server writes every lazy page
/// before acknowledging. Message: an 8-byte length, then `u64` little-endian
/// words `pid, has_uffd, n_vmas, (start, end)…, n_present, (start, end)…`;
/// the fd, if any, rides on the length as `SCM_RIGHTS`. A tree hands over
/// one message per task (the PID tells them apart).
fn handover(
    pid: i32,
    sock: &OwnedFd,
    uffd: Option<&OwnedFd>,
    vmas: &[(u64, u64)],
    present: &[(u64, u64)],
) -> Result<(), LazyError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut words = vec![pid as u64, u64::from(uffd.is_some()), vmas.len() as u64];
    words.extend(vmas.iter().flat_map(|&(a, b)| [a, b]));
    words.push(present.len() as u64);
    words.extend(present.iter().flat_map(|&(a, b)| [a, b]));
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = (bytes.len() as u64).to_le_bytes();
    let fds: Vec<i32> = uffd.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(&len)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        if fds.is_empty() { &[] } else { &rights },
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| LazyError::Io {
        pid,
        what: "hand the userfaultfd over".into(),
        source: e.into(),
    })?;
    let mut f = std::fs::File::from(sock.try_clone().map_err(io_err(pid, "dup the socket"))?);
    io::Write::write_all(&mut f, &bytes).map_err(io_err(pid, "send the lazy ranges"))?;
    let mut ack = [0u8; 1];
    io::Read::read_exact(&mut f, &mut ack).map_err(io_err(
        pid,
        "wait for the page server to fill the present pages",
    ))?;
    if ack[0] != b'1' {
        return Err(LazyError::Image {
            pid,
            what: "the page server could not fill the present pages".into(),
        });
    }
    Ok(())
}

/// What [`receive_handover`] got: the userfaultfd, the lazy VMAs and the
/// pages that are already present (to be written through `/proc/PID/mem`
/// before acknowledging).
#[derive(Debug)]
pub struct Handover {
    /// The task whose memory this is.
    pub pid: i32,
    /// `None`: no userfaultfd could be had; every lazy page must be written
    /// through `/proc/PID/mem` before acknowledging.
    pub uffd: Option<OwnedFd>,
    pub vmas: Vec<(u64, u64)>,
    pub present: Vec<(u64, u64)>,
}

/// The serving side of [`handover`] (blocking). `None` when the restorer
/// closed the socket without handing anything over (no lazy VMA).
pub fn receive_handover(sock: &OwnedFd) -> io::Result<Option<Handover>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut len = [0u8; 8];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut len)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut uffd = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                uffd.get_or_insert(owned);
            }
        }
    }
    if msg.bytes == 0 && uffd.is_none() {
        return Ok(None);
    }
    if msg.bytes != 8 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short hand-over header",
        ));
    }
    let n = u64::from_le_bytes(len);
    if n % 8 != 0 || n / 16 > 2 * MAX_HANDOVER_RANGES as u64 + 2 {
        return Err(io::Error::other(format!("bad hand-over length {n}")));
    }
    let mut body = vec![0u8; n as usize];
    let mut f = std::fs::File::from(sock.try_clone()?);
    io::Read::read_exact(&mut f, &mut body)?;
    let words: Vec<u64> = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let mut it = words.into_iter();
    let pid = it
        .next()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| io::Error::other("bad PID in the hand-over"))?;
    if (it.next() == Some(1)) != uffd.is_some() {
        return Err(io::Error::other(
            "the hand-over's userfaultfd does not match its header",
        ));
    }
    let mut ranges = || -> io::Result<Vec<(u64, u64)>> {
        let k = it
            .next()
            .ok_or_else(|| io::Error::other("truncated hand-over"))? as usize;
        if k > MAX_HANDOVER_RANGES {
            return Err(io::Error::other("too many ranges in the hand-over"));
        }
        (0..k)
            .map(|_| match (it.next(), it.next()) {
                (Some(a), Some(b)) if a < b && a % PAGE == 0 && b % PAGE == 0 => Ok((a, b)),
                _ => Err(io::Error::other("bad range in the hand-over")),
            })
            .collect()
    };
    let vmas = ranges()?;
    let present = ranges()?;
    Ok(Some(Handover {
        pid,
        uffd,
        vmas,
        present,
    }))
}

/// Tells the restorer the present pages are written (`ok`) or not.
pub fn ack_handover(sock: &OwnedFd, ok: bool) -> io::Result<()> {
    let mut f = std::fs::File::from(sock.try_clone()?);
    io::Write::write_all(&mut f, if ok { b"1" } else { b"0" })
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
    /// Lazy pages served from `source`: `ranges` (sorted `(start, end)`,
    /// page-aligned, at their dump-time addresses) through `uffd`.
    pub fn new(
        pid: i32,
        uffd: OwnedFd,
        ranges: &[(u64, u64)],
        source: Box<dyn PageSource>,
    ) -> LazyPages {
        let mut pieces = Pieces::default();
        for &(a, b) in ranges {
            pieces.insert(a, Piece { end: b, orig: a });
        }
        let total_pages = pieces.pages();
        LazyPages {
            pid,
            source,
            ctxs: vec![Ctx {
                uffd,
                pieces,
                exited: false,
            }],
            total_pages,
        }
    }

    /// Pages still to fill.
    pub fn pages(&self) -> u64 {
        self.total_pages
    }

    /// Fills every lazy page (faults first), then closes the userfaultfd.
    /// Returns when nothing is left or the process (and its forks) exited.
    /// An unreadable or damaged page kills the process: it may have read
    /// wrong data already, or would wait for the page forever.
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
        let mut buf = Vec::new();
        loop {
            self.handle_events(stats, &mut buf)?;
            // Background: the lowest piece of the first context with work.
            let Some(ci) = self
                .ctxs
                .iter()
                .position(|c| !c.exited && !c.pieces.0.is_empty())
            else {
                break;
            };
            let (&s, &p) = self.ctxs[ci].pieces.0.iter().next().expect("not empty");
            let end = p.end.min(s + PUSH_CHUNK);
            for (ts, tp) in self.ctxs[ci].pieces.take(s, end) {
                stats.pushed_pages += self.fill(ci, ts, tp, &mut buf)?;
            }
        }
        self.ctxs.clear();
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
        let n = (p.end - start) / PAGE;
        let (mut done, mut copied) = (0u64, 0u64);
        // Whether the whole piece leaves the context's list (else only
        // `done` pages of it).
        let mut whole = true;
        'piece: while done < n {
            let orig = p.orig + done * PAGE;
            let want = ((n - done) * PAGE) as usize;
            // Straight from the source where it holds the pages as one
            // slice; else through `buf`.
            let direct = self.source.slice(orig, want).map_or(0, <[u8]>::len);
            let seg: &[u8] = if direct > 0 {
                self.source
                    .slice(orig, direct)
                    .expect("the slice just seen")
            } else {
                buf.resize(want, 0);
                self.source
                    .read(orig, buf)
                    .map_err(|what| LazyError::Image {
                        pid,
                        what: format!("{what}; the process was killed"),
                    })?;
                buf
            };
            let seg_pages = seg.len() as u64 / PAGE;
            let mut at = 0u64;
            while at < seg_pages {
                let dst = start + (done + at) * PAGE;
                let src = &seg[(at * PAGE) as usize..];
                let ctx = &mut self.ctxs[ci];
                match uffd::copy(ctx.uffd.as_fd(), dst, src)
                    .map_err(io_err(pid, format!("UFFDIO_COPY to {dst:#x}")))?
                {
                    Fill::Done => {
                        copied += seg_pages - at;
                        at = seg_pages;
                    }
                    Fill::Partial(b) => {
                        copied += b / PAGE;
                        at += b / PAGE;
                    }
                    Fill::Exists => {
                        // Filled already (by a fault we served): skip one page.
                        let _ = uffd::wake(ctx.uffd.as_fd(), dst, PAGE);
                        at += 1;
                    }
                    Fill::Again => {
                        ctx.pieces.insert(
                            dst,
                            Piece {
                                end: p.end,
                                orig: p.orig + (done + at) * PAGE,
                            },
                        );
                        done += at;
                        whole = false;
                        break 'piece;
                    }
                    Fill::Gone => {
                        tracing::debug!(pid, "lazy restore: {dst:#x} is no longer registered");
                        break 'piece;
                    }
                    Fill::Exited => {
                        ctx.exited = true;
                        break 'piece;
                    }
                }
            }
            done += seg_pages;
        }
        let over = if whole { n } else { done };
        self.done_with(p.orig, over * PAGE);
        Ok(copied)
    }

    /// Tells the source that no context needs the pages at `orig..orig +
    /// len` any more. Only while there is one context: a fork's copy of
    /// the list still needs the pages its parent filled after the fork.
    fn done_with(&mut self, orig: u64, len: u64) {
        if self.ctxs.len() == 1 && len > 0 {
            self.source.done_with(orig, len);
        }
    }

    /// Reads and handles every pending message of every context.
    fn handle_events(&mut self, stats: &mut LazyStats, buf: &mut Vec<u8>) -> Result<(), LazyError> {
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
                    Msg::PageFault { addr } => self.fault(ci, addr & !(PAGE - 1), stats, buf)?,
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
                        for (s, p) in self.ctxs[ci].pieces.take(start, end) {
                            self.done_with(p.orig, p.end - s);
                        }
                    }
                    Msg::Unknown(e) => tracing::debug!("lazy restore: unknown event {e:#x}"),
                }
            }
        }
        Ok(())
    }

    /// Serves a fault at page `addr` of context `ci`: the aligned window
    /// around it, or a zero page where no lazy page is left.
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

    fn piece(end: u64, orig: u64) -> Piece {
        Piece { end, orig }
    }

    fn list(p: &Pieces) -> Vec<(u64, Piece)> {
        p.0.iter().map(|(&s, &q)| (s, q)).collect()
    }

    #[test]
    fn take_splits_pieces_at_the_edges() {
        let mut p = Pieces::default();
        p.insert(0x10000, piece(0x20000, 0x10000));
        p.insert(0x30000, piece(0x34000, 0x30000));
        let t = p.take(0x14000, 0x31000);
        assert_eq!(
            t,
            vec![
                (0x14000, piece(0x20000, 0x14000)),
                (0x30000, piece(0x31000, 0x30000))
            ]
        );
        assert_eq!(
            list(&p),
            vec![
                (0x10000, piece(0x14000, 0x10000)),
                (0x31000, piece(0x34000, 0x31000))
            ]
        );
        assert_eq!(p.pages(), 4 + 3);
    }

    #[test]
    fn remap_moves_pieces_and_drops_what_was_at_the_destination() {
        let mut p = Pieces::default();
        p.insert(0x10000, piece(0x18000, 0x10000));
        p.insert(0x50000, piece(0x52000, 0x50000));
        // Move the upper half of the first piece over the second one.
        p.remap(0x14000, 0x50000, 0x4000);
        assert_eq!(
            list(&p),
            vec![
                (0x10000, piece(0x14000, 0x10000)),
                (0x50000, piece(0x54000, 0x14000))
            ]
        );
    }
}
