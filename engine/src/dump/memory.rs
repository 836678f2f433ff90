//! Dumping memory: classify the target's VMAs, then save the contents of the
//! pages that restore cannot get elsewhere. Anonymous memory (private or
//! shared): present or swapped pages. Private file mappings: only pages that
//! were written (anonymous copies, pagemap bit 61 clear); the same for
//! private mappings of a memfd. Shared file mappings, shared memfd
//! mappings (the memfd's contents are stored once, see `dump::memfd`) and
//! the vDSO areas: nothing (the file has the data). SysV shared memory
//! attachments: nothing (the segment is saved once in `ipc.img`, see
//! [`crate::ipc`]). Pages that are all zero are never stored. Pages are read with large
//! `process_vm_readv` calls into a fixed buffer and streamed to the pages
//! file, so the dumper's memory does not grow with the target's.
use super::DumpError;
use crate::dirty::uffd_sys::{self, PageRegion, PmScanArg};
use crate::files::regular::file_id;
use crate::image::PagesWriter;
use bytes::Bytes;

/// Where dumped pages go: the image's pages file, or the network during a
/// live migration.
pub trait PageSink {
    /// `data` holds whole pages starting at `vaddr`, none of them all-zero.
    fn add_run(&mut self, vaddr: u64, data: &[u8]) -> Result<(), DumpError>;
    /// `nr_pages` pages at `vaddr` are zero now (only reported for pages
    /// that were written since an earlier copy: a full dump never calls it).
    fn zero_run(&mut self, _vaddr: u64, _nr_pages: u64) -> Result<(), DumpError> {
        Ok(())
    }
    /// A VMA boundary: the next run must not be merged with this one.
    fn end_run(&mut self) {}
    /// Whether the sink keeps the pages it is given (to send them on from
    /// another thread): then the pages are read into a fresh buffer for
    /// each batch and handed over with [`PageSink::add_run_owned`], a slice
    /// of that buffer, instead of being copied out of a reused one.
    fn keeps_pages(&self) -> bool {
        false
    }
    /// [`PageSink::add_run`] with the data owned (a sink that
    /// [`keeps_pages`](PageSink::keeps_pages) takes it without a copy).
    fn add_run_owned(&mut self, vaddr: u64, data: Bytes) -> Result<(), DumpError> {
        self.add_run(vaddr, &data)
    }
}

impl PageSink for PagesWriter {
    fn add_run(&mut self, vaddr: u64, data: &[u8]) -> Result<(), DumpError> {
        PagesWriter::add_run(self, vaddr, data).map_err(DumpError::from)
    }

    fn end_run(&mut self) {
        PagesWriter::end_run(self)
    }
}
use crate::procfs::MapEntry;
use crate::ptrace;
use crm_proto::image::{Vma, VmaKind};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const PAGE: u64 = 4096;
/// Bytes read from the target per batch.
const BATCH: usize = 8 << 20;
/// Bytes read per call for a sink that keeps pages: each buffer stays alive
/// until the last batch cut from it is sent, so smaller than [`BATCH`];
/// and the size of a migration's page batch, so that a batch usually owns
/// its buffer alone (a sealed channel then encrypts it in place).
const OWNED_BATCH: usize = 1 << 20;
/// Pagemap entries read per call.
const PAGEMAP_BATCH: usize = 64 * 1024;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
/// The page is mapped by this task only.
const PM_EXCLUSIVE: u64 = 1 << 56;

/// Turns `smaps` entries into image VMAs; refuses mappings that cannot be
/// restored yet (deleted files, SysV shm on huge pages, memfd, device
/// mappings).
pub fn classify(pid: i32, maps: &[MapEntry]) -> Result<Vec<Vma>, DumpError> {
    let mut out = Vec::with_capacity(maps.len());
    for m in maps {
        let unsupported = |what: &str| DumpError::UnsupportedVma {
            pid,
            start: m.start,
            end: m.end,
            name: m.name.clone(),
            what: what.to_string(),
        };
        let mut file = None;
        let mut memfd = None;
        let mut shmem_ino = 0;
        let mut sysv_shmid = 0;
        let kind = match m.name.as_str() {
            "[vdso]" => VmaKind::Vdso,
            "[vvar]" => VmaKind::Vvar,
            "[vvar_vclock]" => VmaKind::VvarVclock,
            "[vsyscall]" => VmaKind::Vsyscall,
            "[heap]" => VmaKind::Heap,
            "[stack]" => VmaKind::Stack,
            "" => VmaKind::Anon,
            "/dev/zero (deleted)" if m.shared => VmaKind::Anon,
            n if n.starts_with("[anon:") || n.starts_with("[anon_shmem:") => VmaKind::Anon,
            n if n.starts_with("/SYSV") && n.ends_with(" (deleted)") && m.shared => {
                if m.has_flag("ht") {
                    return Err(unsupported("a SysV shared memory segment on huge pages"));
                }
                // The segment's id is the inode `maps` shows.
                sysv_shmid = i32::try_from(m.inode)
                    .map_err(|_| unsupported("a SysV segment with an id over 2^31"))?;
                VmaKind::SysvShm
            }
            n if n.starts_with("/SYSV") => return Err(unsupported("a SysV shared memory segment")),
            n if n.starts_with("/memfd:") => {
                let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let o = match crate::files::memfd::object_at(&link, n) {
                    Ok(o) => o,
                    Err(crate::files::memfd::ObjectError::Hugetlb) => {
                        return Err(unsupported("a hugetlb memfd mapping"))
                    }
                    Err(crate::files::memfd::ObjectError::Io(e)) => {
                        return Err(DumpError::Io {
                            pid,
                            what: format!("open {link}"),
                            source: e,
                        })
                    }
                };
                if m.shared && m.write && o.seals & libc::F_SEAL_FUTURE_WRITE as u32 != 0 {
                    return Err(unsupported(
                        "a writable shared mapping of a memfd sealed with F_SEAL_FUTURE_WRITE",
                    ));
                }
                memfd = Some(o);
                VmaKind::Memfd
            }
            n if n.ends_with(" (deleted)") => {
                return Err(unsupported("a mapping of a deleted file"))
            }
            n if n.starts_with('/') => {
                let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let meta = std::fs::metadata(&link).map_err(|e| DumpError::Io {
                    pid,
                    what: format!("stat {link}"),
                    source: e,
                })?;
                if !meta.is_file() {
                    return Err(unsupported("a mapping of a device or special file"));
                }
                file = Some(file_id(n, &meta));
                VmaKind::File
            }
            _ => return Err(unsupported("a special mapping")),
        };
        if kind == VmaKind::Anon && m.shared {
            use std::os::unix::fs::MetadataExt;
            let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            shmem_ino = std::fs::metadata(&link)
                .map_err(|e| DumpError::Io {
                    pid,
                    what: format!("stat {link}"),
                    source: e,
                })?
                .ino();
        }
        out.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            shared: m.shared,
            kind: kind as i32,
            file,
            pgoff: m.offset,
            vm_flags: m.vm_flags.join(" "),
            shmem_ino,
            sysv_shmid,
            memfd,
        });
    }
    Ok(out)
}

/// What to save of a VMA, given a pagemap entry.
fn wanted(vma: &Vma, entry: u64) -> bool {
    match vma.kind() {
        VmaKind::Anon | VmaKind::Heap | VmaKind::Stack => {
            vma.shared || entry & (PM_PRESENT | PM_SWAPPED) != 0
        }
        VmaKind::File | VmaKind::Memfd if !vma.shared => {
            entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE_OR_SHARED == 0)
        }
        _ => false,
    }
}

/// Whether a dump stores any page of `vma`.
pub fn saves_anything(vma: &Vma) -> bool {
    matches!(vma.kind(), VmaKind::Anon | VmaKind::Heap | VmaKind::Stack)
        || (matches!(vma.kind(), VmaKind::File | VmaKind::Memfd) && !vma.shared)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct MemStats {
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub zero_pages: u64,
}

impl MemStats {
    /// Adds the counts of `other` (another task of the same dump).
    pub fn add(&mut self, other: &MemStats) {
        self.pages_scanned += other.pages_scanned;
        self.pages_written += other.pages_written;
        self.zero_pages += other.zero_pages;
    }
}

fn is_zero(page: &[u8]) -> bool {
    let head = u64::from_ne_bytes(page[..8].try_into().expect("page is 4096 bytes"));
    head == 0
        && page.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        }) == 0
}

/// Writes the contents of the pages worth saving of every VMA.
pub fn dump_pages(
    pid: i32,
    target: Target,
    vmas: &[Vma],
    writer: &mut dyn PageSink,
) -> Result<MemStats, DumpError> {
    dump_pages_of(pid, &[], target, vmas, writer)
}

/// [`dump_pages`] leaving out the pages of `skip` (sorted ranges: memory
/// stored with another task, see [`shared_with_parent`]).
pub fn dump_pages_skipping(
    pid: i32,
    vmas: &[Vma],
    skip: &[(u64, u64)],
    writer: &mut dyn PageSink,
) -> Result<MemStats, DumpError> {
    dump_pages_of(pid, skip, Target::Frozen, vmas, writer)
}

/// The physical frame number of a pagemap entry (0 when hidden).
const PM_PFN: u64 = (1 << 55) - 1;

/// Whether a page is the parent's: both present in memory (not swapped)
/// with the same frame.
fn same_frame(entry: u64, parent: u64) -> bool {
    let present = |e: u64| e & PM_PRESENT != 0 && e & PM_SWAPPED == 0;
    present(entry) && present(parent) && entry & PM_PFN != 0 && entry & PM_PFN == parent & PM_PFN
}

/// The private anonymous pages of the frozen task `pid` (its `vmas`) that
/// are still its frozen parent's: the same physical page at the same
/// address, inherited over fork and written by neither since. Sorted
/// ranges.
///
/// Must run before either task's memory is read: `process_vm_readv` pins
/// the pages it reads, and the kernel unshares a copy-on-write page it
/// pins (the reader gets a private copy), so the frames differ afterwards.
pub fn shared_with_parent(
    pid: i32,
    parent: i32,
    vmas: &[Vma],
) -> Result<Vec<(u64, u64)>, DumpError> {
    let open = |p: i32| {
        File::open(format!("/proc/{p}/pagemap")).map_err(|source| DumpError::Io {
            pid,
            what: format!("open /proc/{p}/pagemap"),
            source,
        })
    };
    let (mine, theirs) = (open(pid)?, open(parent)?);
    let mut out = Vec::new();
    let mut a = vec![0u8; PAGEMAP_BATCH * 8];
    let mut b = vec![0u8; PAGEMAP_BATCH * 8];
    let private_anon =
        |v: &&Vma| !v.shared && matches!(v.kind(), VmaKind::Anon | VmaKind::Heap | VmaKind::Stack);
    for vma in vmas.iter().filter(private_anon) {
        // Ranges never span two VMAs (restore checks each lies in one).
        let mut in_vma = Vec::new();
        let mut addr = vma.start;
        while addr < vma.end {
            let n = (((vma.end - addr) / PAGE) as usize).min(PAGEMAP_BATCH);
            for (f, buf) in [(&mine, &mut a), (&theirs, &mut b)] {
                // Unmapped in the parent reads as not present.
                f.read_exact_at(&mut buf[..n * 8], addr / PAGE * 8)
                    .map_err(|source| DumpError::Io {
                        pid,
                        what: format!("read a pagemap at {addr:#x}"),
                        source,
                    })?;
            }
            let word = |buf: &[u8], k: usize| {
                u64::from_ne_bytes(buf[k * 8..k * 8 + 8].try_into().expect("8 bytes"))
            };
            for k in (0..n).filter(|&k| same_frame(word(&a, k), word(&b, k))) {
                let at = addr + k as u64 * PAGE;
                push_range(&mut in_vma, at, at + PAGE);
            }
            addr += n as u64 * PAGE;
        }
        out.extend(in_vma);
    }
    Ok(out)
}

fn dump_pages_of(
    pid: i32,
    skip: &[(u64, u64)],
    target: Target,
    vmas: &[Vma],
    writer: &mut dyn PageSink,
) -> Result<MemStats, DumpError> {
    let io_err = |what: String| move |source| DumpError::Io { pid, what, source };
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(io_err(format!("open /proc/{pid}/pagemap")))?;
    let mem =
        File::open(format!("/proc/{pid}/mem")).map_err(io_err(format!("open /proc/{pid}/mem")))?;
    let mut stats = MemStats::default();
    let mut pm_buf = vec![0u8; PAGEMAP_BATCH * 8];
    // A sink that keeps pages gets slices of a fresh buffer per read (see
    // `dump_ranges`); any other sink copies out of one reused buffer.
    let owned = writer.keeps_pages();
    let max = if owned { OWNED_BATCH } else { BATCH };
    let mut data = if owned { Vec::new() } else { vec![0u8; BATCH] };
    let skipped = |at: u64| {
        let i = skip.partition_point(|r| r.1 <= at);
        skip.get(i).is_some_and(|r| r.0 <= at)
    };
    for vma in vmas.iter().filter(|v| saves_anything(v)) {
        let readable = vma.prot & libc::PROT_READ as u32 != 0;
        let mut addr = vma.start;
        while addr < vma.end {
            let n = (((vma.end - addr) / PAGE) as usize).min(PAGEMAP_BATCH);
            let buf = &mut pm_buf[..n * 8];
            pagemap
                .read_exact_at(buf, addr / PAGE * 8)
                .map_err(io_err(format!("read /proc/{pid}/pagemap at {addr:#x}")))?;
            let entry =
                |k: usize| u64::from_ne_bytes(buf[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            let ours = |k: usize| wanted(vma, entry(k)) && !skipped(addr + k as u64 * PAGE);
            // Pages this task alone maps are read with process_vm_readv;
            // the others (copy-on-write pages shared with another process,
            // swapped pages) through /proc/PID/mem, which does not pin
            // them: the kernel gives a task its own copy of a shared page
            // that is pinned, and the dump must not multiply the memory of
            // a tree it leaves running.
            let alone =
                |k: usize| entry(k) & (PM_PRESENT | PM_EXCLUSIVE) == PM_PRESENT | PM_EXCLUSIVE;
            // Runs of wanted pages, read in batches of at most `max` bytes.
            let mut i = 0;
            while i < n {
                if !ours(i) {
                    i += 1;
                    continue;
                }
                let (first, pin) = (i, alone(i));
                while i < n && ours(i) && alone(i) == pin && (i - first + 1) * PAGE as usize <= max
                {
                    i += 1;
                }
                let run_addr = addr + first as u64 * PAGE;
                let len = (i - first) * PAGE as usize;
                if owned {
                    let src = (pid, target, &mem, readable && pin);
                    read_owned(src, run_addr, len, writer, &mut stats, false)?;
                    continue;
                }
                let chunk = &mut data[..len];
                if !read_pages(pid, target, &mem, readable && pin, run_addr, chunk)? {
                    continue;
                }
                stats.pages_scanned += (i - first) as u64;
                write_nonzero(writer, run_addr, chunk, None, &mut stats, false)?;
            }
            addr += n as u64 * PAGE;
        }
        writer.end_run();
    }
    Ok(stats)
}

/// Copies the pages of `ranges` (page-aligned, sorted, e.g. written since
/// the last round) that lie inside VMAs worth saving. Pages that read as
/// zero are reported with [`PageSink::zero_run`] so that a receiver holding an
/// older copy drops it.
pub fn dump_ranges(
    pid: i32,
    target: Target,
    vmas: &[Vma],
    ranges: &[(u64, u64)],
    sink: &mut dyn PageSink,
) -> Result<MemStats, DumpError> {
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::Io {
        pid,
        what: format!("open /proc/{pid}/mem"),
        source,
    })?;
    let mut stats = MemStats::default();
    let owned = sink.keeps_pages();
    let mut data = if owned { Vec::new() } else { vec![0u8; BATCH] };
    for vma in vmas.iter().filter(|v| saves_anything(v)) {
        let readable = vma.prot & libc::PROT_READ as u32 != 0;
        for &(start, end) in ranges {
            let (mut from, to) = (start.max(vma.start), end.min(vma.end));
            while from < to {
                let len = ((to - from) as usize).min(if owned { OWNED_BATCH } else { BATCH });
                if owned {
                    let src = (pid, target, &mem, readable);
                    read_owned(src, from, len, sink, &mut stats, true)?;
                    from += len as u64;
                    continue;
                }
                let chunk = &mut data[..len];
                if !read_pages(pid, target, &mem, readable, from, chunk)? {
                    from += len as u64;
                    continue;
                }
                stats.pages_scanned += (len as u64) / PAGE;
                write_nonzero(sink, from, chunk, None, &mut stats, true)?;
                from += len as u64;
            }
        }
        sink.end_run();
    }
    Ok(stats)
}

/// Ranges of pages of `vmas` whose contents live in memory now (present or
/// swapped; for private file mappings only the written copies). A receiver
/// keeps only these: pages dropped since an earlier copy (`MADV_DONTNEED`,
/// `munmap`) read as zero or come from the file again.
pub fn resident_ranges(pid: i32, vmas: &[Vma]) -> Result<Vec<(u64, u64)>, DumpError> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(|source| DumpError::Io {
        pid,
        what: format!("open /proc/{pid}/pagemap"),
        source,
    })?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    // PAGEMAP_SCAN returns ranges instead of 8 bytes per page: several times
    // faster on large anonymous VMAs. Used until the kernel refuses it.
    let mut scan = Some(vec![PageRegion::default(); 4096]);
    for vma in vmas.iter().filter(|v| saves_anything(v)) {
        if vma.shared {
            // Shared anonymous memory has no present bit for swapped shmem
            // pages: keep the whole VMA.
            push_range(&mut out, vma.start, vma.end);
            continue;
        }
        let anon = matches!(vma.kind(), VmaKind::Anon | VmaKind::Heap | VmaKind::Stack);
        if let (true, Some(regions)) = (anon, scan.as_mut()) {
            match scan_present(&pagemap, vma, regions, &mut out) {
                Ok(()) => continue,
                Err(e) => {
                    tracing::debug!(pid, "PAGEMAP_SCAN unusable ({e}); reading pagemap");
                    scan = None;
                }
            }
        }
        resident_by_pagemap(pid, &pagemap, vma, &mut buf, &mut out)?;
    }
    Ok(out)
}

fn push_range(out: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match out.last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => out.push((start, end)),
    }
}

/// Present or swapped pages of an anonymous VMA, by `PAGEMAP_SCAN`. On an
/// error nothing of this VMA has been added to `out`.
fn scan_present(
    pagemap: &File,
    vma: &Vma,
    regions: &mut [PageRegion],
    out: &mut Vec<(u64, u64)>,
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let mut found = Vec::new();
    let mut cur = vma.start;
    while cur < vma.end {
        let wanted = uffd_sys::PAGE_IS_PRESENT | uffd_sys::PAGE_IS_SWAPPED;
        let mut arg = PmScanArg {
            start: cur,
            end: vma.end,
            category_anyof_mask: wanted,
            return_mask: wanted,
            ..PmScanArg::default()
        };
        let n = uffd_sys::pagemap_scan(pagemap.as_fd(), &mut arg, regions)?;
        for r in &regions[..n] {
            push_range(&mut found, r.start, r.end);
        }
        if arg.walk_end >= vma.end {
            break;
        }
        if arg.walk_end <= cur {
            return Err(std::io::Error::other(format!(
                "PAGEMAP_SCAN made no progress at {cur:#x}"
            )));
        }
        cur = arg.walk_end;
    }
    for (s, e) in found {
        push_range(out, s, e);
    }
    Ok(())
}

/// [`resident_ranges`] of one VMA by reading `/proc/PID/pagemap`.
fn resident_by_pagemap(
    pid: i32,
    pagemap: &File,
    vma: &Vma,
    buf: &mut [u8],
    out: &mut Vec<(u64, u64)>,
) -> Result<(), DumpError> {
    let mut addr = vma.start;
    while addr < vma.end {
        let n = (((vma.end - addr) / PAGE) as usize).min(PAGEMAP_BATCH);
        let b = &mut buf[..n * 8];
        pagemap
            .read_exact_at(b, addr / PAGE * 8)
            .map_err(|source| DumpError::Io {
                pid,
                what: format!("read /proc/{pid}/pagemap at {addr:#x}"),
                source,
            })?;
        for i in 0..n {
            let e = u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if wanted(vma, e) {
                let p = addr + i as u64 * PAGE;
                push_range(out, p, p + PAGE);
            }
        }
        addr += n as u64 * PAGE;
    }
    Ok(())
}

/// Whether the process runs while its pages are read (a pre-copy round) or
/// is frozen (a dump, the final round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Frozen,
    Running,
}

/// Reads `buf.len()` bytes at `addr` of a VMA (through `/proc/PID/mem` when
/// it is not readable). Returns `false` when a running process unmapped or
/// shrank the range meanwhile: the pages are skipped, the next round sees the
/// new layout. For a frozen process that is an error.
fn read_pages(
    pid: i32,
    target: Target,
    mem: &File,
    readable: bool,
    addr: u64,
    buf: &mut [u8],
) -> Result<bool, DumpError> {
    let r = if readable {
        read_fully(pid, addr, buf)
    } else {
        mem.read_exact_at(buf, addr)
            .map_err(|source| DumpError::Io {
                pid,
                what: format!("read /proc/{pid}/mem at {addr:#x}"),
                source,
            })
    };
    vanished_is_skipped(pid, target, addr, r)
}

/// `Ok(false)` for a read that failed because a running process unmapped
/// or shrank the range meanwhile.
fn vanished_is_skipped(
    pid: i32,
    target: Target,
    addr: u64,
    r: Result<(), DumpError>,
) -> Result<bool, DumpError> {
    match r {
        Ok(()) => Ok(true),
        Err(DumpError::Io { source, .. })
            if target == Target::Running
                && (matches!(
                    source.raw_os_error(),
                    Some(libc::EFAULT | libc::EIO | libc::ENOMEM)
                ) || source.kind() == std::io::ErrorKind::UnexpectedEof) =>
        {
            tracing::debug!(
                pid,
                "range at {addr:#x} vanished while it was read; skipped"
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Reads `len` bytes at `addr` into a fresh buffer and hands its non-zero
/// runs to `sink` as slices of it (a sink that keeps pages: no copy).
/// `src`: the task, whether it runs, its `/proc/PID/mem`, and whether
/// `process_vm_readv` may read the range (see [`read_pages_into`]).
fn read_owned(
    src: (i32, Target, &File, bool),
    addr: u64,
    len: usize,
    sink: &mut dyn PageSink,
    stats: &mut MemStats,
    report_zero: bool,
) -> Result<(), DumpError> {
    let (pid, target, mem, readable) = src;
    let mut fresh = Vec::with_capacity(len);
    if read_pages_into(pid, target, mem, readable, addr, len, &mut fresh)? {
        stats.pages_scanned += (len as u64) / PAGE;
        let fresh = Bytes::from(fresh);
        write_nonzero(sink, addr, &fresh, Some(&fresh), stats, report_zero)?;
    }
    Ok(())
}

/// [`read_pages`] of `len` bytes into the empty `buf` (capacity `len`),
/// by `process_vm_readv` when `readable` (else through `/proc/PID/mem`),
/// without zero-filling it first when the VMA is readable.
fn read_pages_into(
    pid: i32,
    target: Target,
    mem: &File,
    readable: bool,
    addr: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<bool, DumpError> {
    if !readable {
        buf.resize(len, 0);
        return read_pages(pid, target, mem, readable, addr, buf);
    }
    let r = (|| {
        while buf.len() < len {
            let at = addr + buf.len() as u64;
            let what = || format!("process_vm_readv at {at:#x}");
            let n = ptrace::read_mem_append(pid, at, buf, len - buf.len()).map_err(|source| {
                DumpError::Io {
                    pid,
                    what: what(),
                    source,
                }
            })?;
            if n == 0 {
                return Err(DumpError::Io {
                    pid,
                    what: what(),
                    source: std::io::Error::from_raw_os_error(libc::EFAULT),
                });
            }
        }
        Ok(())
    })();
    vanished_is_skipped(pid, target, addr, r)
}

fn read_fully(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), DumpError> {
    let mut done = 0;
    while done < buf.len() {
        let n = ptrace::read_mem(pid, addr + done as u64, &mut buf[done..]).map_err(|source| {
            DumpError::Io {
                pid,
                what: format!("process_vm_readv at {:#x}", addr + done as u64),
                source,
            }
        })?;
        if n == 0 {
            return Err(DumpError::Io {
                pid,
                what: format!("process_vm_readv at {:#x}", addr + done as u64),
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        done += n;
    }
    Ok(())
}

/// Splits `chunk` into runs of non-zero pages and appends them.
/// `owned`: `chunk` itself as an owned buffer, whose slices are handed to
/// a sink that keeps pages.
pub(super) fn write_nonzero(
    writer: &mut dyn PageSink,
    addr: u64,
    chunk: &[u8],
    owned: Option<&Bytes>,
    stats: &mut MemStats,
    report_zero: bool,
) -> Result<(), DumpError> {
    let pages = chunk.len() / PAGE as usize;
    let mut p = 0;
    while p < pages {
        let page = |k: usize| &chunk[k * PAGE as usize..(k + 1) * PAGE as usize];
        if is_zero(page(p)) {
            let first = p;
            while p < pages && is_zero(page(p)) {
                p += 1;
            }
            stats.zero_pages += (p - first) as u64;
            if report_zero {
                writer.zero_run(addr + first as u64 * PAGE, (p - first) as u64)?;
            }
            continue;
        }
        let first = p;
        while p < pages && !is_zero(page(p)) {
            p += 1;
        }
        let (run_addr, range) = (
            addr + first as u64 * PAGE,
            first * PAGE as usize..p * PAGE as usize,
        );
        match owned {
            Some(b) => writer.add_run_owned(run_addr, b.slice(range))?,
            None => writer.add_run(run_addr, &chunk[range])?,
        }
        stats.pages_written += (p - first) as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_ranges_by_scan_and_by_pagemap_agree() {
        let pages = 64usize;
        let len = pages * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: MADV_NOHUGEPAGE on our own mapping (keeps 4 KiB pages).
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let base = p as u64;
        let touched = [(0u64, 10u64), (20, 21), (30, 40), (63, 64)];
        for &(a, b) in &touched {
            for i in a..b {
                // SAFETY: inside the mapping.
                unsafe { *((base + i * PAGE) as *mut u8) = 1 };
            }
        }
        let vma = Vma {
            start: base,
            end: base + len as u64,
            kind: VmaKind::Anon as i32,
            prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
            ..Default::default()
        };
        let pid = std::process::id() as i32;
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut by_pagemap = Vec::new();
        let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
        resident_by_pagemap(pid, &pagemap, &vma, &mut buf, &mut by_pagemap).unwrap();
        let mut by_scan = Vec::new();
        let mut regions = vec![PageRegion::default(); 2];
        match scan_present(&pagemap, &vma, &mut regions, &mut by_scan) {
            Ok(()) => assert_eq!(by_scan, by_pagemap, "2 regions per call forces the loop"),
            Err(e) => println!("SKIPPED: PAGEMAP_SCAN half of the comparison: {e}"),
        }
        let expect: Vec<(u64, u64)> = touched
            .iter()
            .map(|&(a, b)| (base + a * PAGE, base + b * PAGE))
            .collect();
        assert_eq!(by_pagemap, expect);
        // SAFETY: our mapping, no references into it remain.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!is_zero(&page));
    }

    #[test]
    fn private_file_pages_saved_only_when_written() {
        let vma = Vma {
            kind: VmaKind::File as i32,
            ..Default::default()
        };
        assert!(!wanted(&vma, PM_PRESENT | PM_FILE_OR_SHARED));
        assert!(wanted(&vma, PM_PRESENT));
        assert!(wanted(&vma, PM_SWAPPED));
        assert!(!wanted(&vma, 0));
        let shared = Vma {
            shared: true,
            ..vma
        };
        assert!(!wanted(&shared, PM_PRESENT));
    }
}
