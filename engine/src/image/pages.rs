//! Page data of one task: `pages-PID.img` and its index `pagemap-PID.img`.
//!
//! The pages file is a [`PAGES_HEADER_LEN`]-byte header (magic
//! `b"CRMPAGES"`, u32 little-endian format version, zero padding) followed by
//! raw 4 KiB pages. The pagemap is a record file (see [`super::framing`]) of
//! `PageMapChunk` records, each listing up to [`RUNS_PER_RECORD`] `PageRun`s:
//! `nr_pages` pages at virtual address `vaddr`, stored from page
//! `page_index` (counted after the header) of the pages file, with the CRC32
//! of their bytes.
//!
//! The writer streams data straight to the file and merges runs that
//! continue each other (up to [`MAX_RUN_PAGES`] pages, so a reader never
//! needs a buffer over 64 MiB). The reader accepts a pagemap only if its runs
//! are page-aligned, non-overlapping in the address space, at most
//! [`MAX_RUN_PAGES`] long, lie inside the pages file and use no stored page
//! twice (pages may be unreferenced: see [`super::store`]), which also
//! catches a pages file cut short.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crm_proto::image::{PageMapChunk, PageRun};
use crm_proto::IMAGE_FORMAT_VERSION;
use prost::Message;

use super::error::{ImageError, ImageErrorKind};
use super::framing::{self, AtomicFile, Durability, FileKind, RecordWriter};

/// Size of a page in the pages file.
pub const PAGE_SIZE: u64 = 4096;
/// First 8 bytes of a pages file.
pub const PAGES_MAGIC: [u8; 8] = *b"CRMPAGES";
/// Size of the pages file header; page data starts here.
pub const PAGES_HEADER_LEN: u64 = PAGE_SIZE;
/// Longest run written or accepted, in pages (64 MiB).
pub const MAX_RUN_PAGES: u64 = (64 << 20) / PAGE_SIZE;
/// Runs per pagemap record written.
pub const RUNS_PER_RECORD: usize = 4096;
/// Most runs accepted in one pagemap.
pub const MAX_RUNS: u64 = 1 << 24;

const PAGE: usize = PAGE_SIZE as usize;
/// Writes at least this large skip the writer's buffer.
const WRITE_BUFFER: usize = 256 << 10;

/// `x` is a multiple of [`PAGE_SIZE`] (a power of two).
fn page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

/// The first address past `run`, if it does not wrap around.
fn run_end(run: &PageRun) -> Option<u64> {
    run.nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| run.vaddr.checked_add(len))
}

/// Writes `pages-PID.img` and, on [`PagesWriter::finish`], `pagemap-PID.img`.
pub struct PagesWriter {
    pages: AtomicFile,
    pagemap_path: PathBuf,
    /// Closed runs, with their final CRC.
    runs: Vec<PageRun>,
    /// The run still growing, and the CRC of its bytes so far.
    open: Option<(PageRun, crc32fast::Hasher)>,
    pages_written: u64,
    max_run_pages: u64,
    /// A write failed part-way: the file no longer matches the runs.
    broken: bool,
    durability: Durability,
}

impl std::fmt::Debug for PagesWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesWriter")
            .field("pages", &self.pages.path())
            .field("pagemap", &self.pagemap_path)
            .field(
                "runs",
                &(self.runs.len() + usize::from(self.open.is_some())),
            )
            .field("pages_written", &self.pages_written)
            .field("broken", &self.broken)
            .finish()
    }
}

impl PagesWriter {
    /// Starts `pages_path` (as a temporary file) with its header.
    pub(crate) fn create(
        pages_path: &Path,
        pagemap_path: &Path,
        durability: Durability,
    ) -> Result<Self, ImageError> {
        let mut pages = AtomicFile::create(pages_path, WRITE_BUFFER, durability)?;
        let mut header = [0u8; PAGES_HEADER_LEN as usize];
        header[..8].copy_from_slice(&PAGES_MAGIC);
        header[8..12].copy_from_slice(&IMAGE_FORMAT_VERSION.to_le_bytes());
        pages.write_all(&header)?;
        Ok(PagesWriter {
            pages,
            pagemap_path: pagemap_path.to_owned(),
            runs: Vec::new(),
            open: None,
            pages_written: 0,
            max_run_pages: MAX_RUN_PAGES,
            broken: false,
            durability,
        })
    }

    /// Appends `data` (a whole number of 4 KiB pages, the contents of the pages starting at
    /// virtual address `vaddr`) to the pages file and records a `PageRun` (with the CRC32
    /// of the data). Data of 256 KiB or more goes straight to the file in
    /// one write; smaller pieces are gathered first. A call whose `vaddr` continues the
    /// previous run extends it (up to [`MAX_RUN_PAGES`]); longer data is split into
    /// several runs. An unaligned `vaddr` or a partial page is
    /// [`ImageErrorKind::Invalid`]; after a failed write the writer refuses further use.
    pub fn add_run(&mut self, vaddr: u64, data: &[u8]) -> Result<(), ImageError> {
        if self.broken {
            return Err(ImageError::invalid(
                self.pages.path(),
                "an earlier write to this file failed",
            ));
        }
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if !page_aligned(vaddr) || !page_aligned(len) {
            return Err(ImageError::invalid(
                self.pages.path(),
                format!("run at {vaddr:#x} of {len} bytes is not made of whole aligned pages"),
            ));
        }
        if vaddr.checked_add(len).is_none() {
            return Err(ImageError::invalid(
                self.pages.path(),
                format!("run at {vaddr:#x} of {len} bytes wraps around the address space"),
            ));
        }
        self.broken = true;
        self.pages.write_all(data)?;
        self.broken = false;

        let mut addr = vaddr;
        let mut rest = data;
        while !rest.is_empty() {
            let max = self.max_run_pages;
            let extends = self
                .open
                .as_ref()
                .is_some_and(|(run, _)| run.nr_pages < max && run_end(run) == Some(addr));
            if !extends {
                self.close_run();
            }
            let page_index = self.pages_written;
            let (run, crc) = self.open.get_or_insert_with(|| {
                let run = PageRun {
                    vaddr: addr,
                    nr_pages: 0,
                    page_index,
                    crc32: 0,
                };
                (run, crc32fast::Hasher::new())
            });
            let room = max.saturating_sub(run.nr_pages).max(1);
            let take = room.min((rest.len() / PAGE) as u64);
            let take_bytes = usize::try_from(take)
                .unwrap_or(usize::MAX)
                .saturating_mul(PAGE);
            let Some((piece, tail)) = rest.split_at_checked(take_bytes) else {
                break; // unreachable: take_bytes <= rest.len()
            };
            crc.update(piece);
            run.nr_pages = run.nr_pages.saturating_add(take);
            self.pages_written = self.pages_written.saturating_add(take);
            addr = addr.saturating_add(take.saturating_mul(PAGE_SIZE));
            rest = tail;
        }
        Ok(())
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.pages_written
    }

    /// Ends the current run: the next `add_run` starts a new one even if its
    /// address continues this one. Called at VMA boundaries so that restore
    /// never sees a run spanning two VMAs.
    pub fn end_run(&mut self) {
        self.close_run();
    }

    fn close_run(&mut self) {
        if let Some((mut run, crc)) = self.open.take() {
            run.crc32 = crc.finalize();
            self.runs.push(run);
        }
    }

    /// Writes the pagemap file (records of `PageMapChunk`, [`RUNS_PER_RECORD`] runs per
    /// record, sorted by address) and flushes and fsyncs the pages file, then renames both
    /// into place, the pagemap last. Nothing is complete until this returns `Ok`; on an
    /// error (including runs that overlap in the address space) no temporary file is left.
    pub fn finish(mut self) -> Result<(), ImageError> {
        if self.broken {
            return Err(ImageError::invalid(
                self.pages.path(),
                "an earlier write to this file failed",
            ));
        }
        self.close_run();
        let mut runs = std::mem::take(&mut self.runs);
        runs.sort_unstable_by_key(|run| run.vaddr);
        for pair in runs.windows(2) {
            if let [a, b] = pair {
                if run_end(a).is_none_or(|end| end > b.vaddr) {
                    return Err(ImageError::invalid(
                        &self.pagemap_path,
                        format!(
                            "runs at {:#x} ({} pages) and {:#x} overlap",
                            a.vaddr, a.nr_pages, b.vaddr
                        ),
                    ));
                }
            }
        }
        let mut pagemap =
            RecordWriter::create(&self.pagemap_path, FileKind::PageMap, self.durability)?;
        super::pages::append_pagemap(&mut pagemap, &runs)?;
        self.pages.commit()?;
        pagemap.commit()
    }
}

/// Appends `runs` as pagemap records, the last one marked with the total.
pub(crate) fn append_pagemap(
    pagemap: &mut RecordWriter,
    runs: &[PageRun],
) -> Result<(), ImageError> {
    let chunks: Vec<&[PageRun]> = if runs.is_empty() {
        vec![&[]]
    } else {
        runs.chunks(RUNS_PER_RECORD).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        pagemap.append(&PageMapChunk {
            runs: chunk.to_vec(),
            last,
            total_runs: if last { runs.len() as u64 } else { 0 },
        })?;
    }
    Ok(())
}

/// Reads `pages-PID.img` through its validated `pagemap-PID.img`.
#[derive(Debug)]
pub struct PagesReader {
    pages_path: PathBuf,
    file: File,
    /// Pages stored after the header.
    file_pages: u64,
    /// Sorted by `vaddr`.
    runs: Vec<PageRun>,
    total_pages: u64,
}

impl PagesReader {
    /// A second reader of the same pages (a new descriptor of the file).
    pub fn try_clone(&self) -> std::io::Result<PagesReader> {
        Ok(PagesReader {
            pages_path: self.pages_path.clone(),
            file: self.file.try_clone()?,
            file_pages: self.file_pages,
            runs: self.runs.clone(),
            total_pages: self.total_pages,
        })
    }

    /// Reads and validates the pagemap, and checks the pages file's header and size.
    pub(crate) fn open(pages_path: &Path, pagemap_path: &Path) -> Result<Self, ImageError> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut ended = false;
        framing::read_records(pagemap_path, FileKind::PageMap, |offset, payload| {
            if ended {
                return Err(ImageErrorKind::Invalid(format!(
                    "record at byte {offset} follows the last one"
                )));
            }
            super::bounds::check(FileKind::PageMap, payload).map_err(|what| {
                ImageErrorKind::Invalid(format!("record at byte {offset}: {what}"))
            })?;
            let chunk = PageMapChunk::decode(payload)
                .map_err(|source| ImageErrorKind::Decode { offset, source })?;
            let count = (runs.len() as u64).saturating_add(chunk.runs.len() as u64);
            if count > MAX_RUNS {
                return Err(ImageErrorKind::Invalid(format!(
                    "more than {MAX_RUNS} page runs"
                )));
            }
            runs.extend(chunk.runs);
            if chunk.last {
                ended = true;
                if chunk.total_runs != runs.len() as u64 {
                    return Err(ImageErrorKind::Invalid(format!(
                        "the pagemap announces {} runs but holds {}",
                        chunk.total_runs,
                        runs.len()
                    )));
                }
            }
            Ok(())
        })?;
        if !ended {
            return Err(ImageError::invalid(
                pagemap_path,
                "the pagemap has no final record: it was cut short",
            ));
        }

        let file = File::open(pages_path).map_err(|e| ImageError::open(pages_path, e))?;
        let file_pages = check_pages_header(&file).map_err(|k| ImageError::new(pages_path, k))?;
        let total_pages = validate_runs(&mut runs, file_pages).map_err(|what| {
            // A pages file shorter or longer than its index: name the data
            // file (the usual culprit) and the index it disagrees with.
            if let Some(covered) = what.strip_prefix(COVERAGE_MISMATCH) {
                ImageError::invalid(
                    pages_path,
                    format!(
                        "holds {file_pages} pages but {} refers to page {covered}",
                        pagemap_path
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                    ),
                )
            } else {
                ImageError::invalid(pagemap_path, what)
            }
        })?;
        Ok(PagesReader {
            pages_path: pages_path.to_owned(),
            file,
            file_pages,
            runs,
            total_pages,
        })
    }

    /// The validated runs, sorted by `vaddr`: page-aligned, non-overlapping, every run
    /// inside the pages file and at most [`MAX_RUN_PAGES`] long.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Pages in all runs (equal to the pages stored in the pages file).
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Reads the run's bytes straight into `dst` (`dst.len() == nr_pages * 4096`) with
    /// `pread` (one large read, looping on short reads), then checks the CRC32: a mismatch
    /// is [`ImageErrorKind::ChecksumMismatch`] at the run's byte offset in the pages file.
    /// A run that is not inside the file, or a `dst` of the wrong size, is
    /// [`ImageErrorKind::Invalid`]. Takes `&self`: runs may be read from several threads.
    /// The open pages file (for lazy restore, which reads parts of runs).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Offset in the pages file of page `page_off` of `run`, checked to lie
    /// inside the run and the file.
    pub fn file_offset(&self, run: &PageRun, page_off: u64) -> Result<u64, ImageError> {
        run.page_index
            .checked_add(run.nr_pages)
            .filter(|&end| end <= self.file_pages && page_off < run.nr_pages)
            .and_then(|_| run.page_index.checked_add(page_off))
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .and_then(|off| off.checked_add(PAGES_HEADER_LEN))
            .ok_or_else(|| {
                ImageError::invalid(
                    &self.pages_path,
                    format!(
                        "page {page_off} of the run at {:#x} (pages {} + {}) is outside the file's {} pages",
                        run.vaddr, run.page_index, run.nr_pages, self.file_pages
                    ),
                )
            })
    }

    pub fn read_run_into(&self, run: &PageRun, dst: &mut [u8]) -> Result<(), ImageError> {
        let path = self.pages_path.as_path();
        let len = run
            .nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| usize::try_from(len).ok());
        if len != Some(dst.len()) {
            return Err(ImageError::invalid(
                path,
                format!(
                    "run at {:#x} holds {} pages but the destination is {} bytes",
                    run.vaddr,
                    run.nr_pages,
                    dst.len()
                ),
            ));
        }
        let offset = run
            .page_index
            .checked_add(run.nr_pages)
            .filter(|&end| end <= self.file_pages)
            .and_then(|_| run.page_index.checked_mul(PAGE_SIZE))
            .and_then(|off| off.checked_add(PAGES_HEADER_LEN))
            .ok_or_else(|| {
                ImageError::invalid(
                    path,
                    format!(
                        "run at {:#x} (pages {} + {}) is outside the file's {} pages",
                        run.vaddr, run.page_index, run.nr_pages, self.file_pages
                    ),
                )
            })?;
        let mut done = 0usize;
        while let Some(rest) = dst.get_mut(done..).filter(|rest| !rest.is_empty()) {
            let at = offset.saturating_add(done as u64);
            match self.file.read_at(rest, at) {
                Ok(0) => {
                    return Err(ImageError::new(
                        path,
                        ImageErrorKind::Truncated { offset: at },
                    ))
                }
                Ok(n) => done = done.saturating_add(n.min(rest.len())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ImageError::io(path, "read", e)),
            }
        }
        if crc32fast::hash(dst) != run.crc32 {
            return Err(ImageError::new(
                path,
                ImageErrorKind::ChecksumMismatch { offset },
            ));
        }
        Ok(())
    }
}

/// Checks the header of a pages file; returns the number of pages after it.
fn check_pages_header(file: &File) -> Result<u64, ImageErrorKind> {
    let meta = file
        .metadata()
        .map_err(|source| ImageErrorKind::Io { op: "stat", source })?;
    if !meta.is_file() {
        return Err(ImageErrorKind::Invalid("not a regular file".into()));
    }
    let mut header = [0u8; PAGES_HEADER_LEN as usize];
    let got = framing::read_up_to(&mut &*file, &mut header)?;
    let magic_got = got.min(PAGES_MAGIC.len());
    if header.get(..magic_got) != PAGES_MAGIC.get(..magic_got) {
        return Err(ImageErrorKind::BadMagic);
    }
    if got < header.len() {
        return Err(ImageErrorKind::Truncated { offset: got as u64 });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != IMAGE_FORMAT_VERSION {
        return Err(ImageErrorKind::UnsupportedVersion {
            found: version,
            supported: IMAGE_FORMAT_VERSION,
        });
    }
    if header.iter().skip(12).any(|&b| b != 0) {
        return Err(ImageErrorKind::Invalid(
            "non-zero bytes in the header padding".into(),
        ));
    }
    let data = meta.len().saturating_sub(PAGES_HEADER_LEN);
    if !page_aligned(data) {
        return Err(ImageErrorKind::Truncated { offset: meta.len() });
    }
    Ok(data / PAGE_SIZE)
}

/// Checks every run, sorts them by address and checks that they neither overlap
/// nor leave a page of the file unused or used twice. Returns the total pages.
/// Prefix of the `validate_runs` error for a pagemap/pages-file size mismatch.
const COVERAGE_MISMATCH: &str = "coverage mismatch: ";

fn validate_runs(runs: &mut [PageRun], file_pages: u64) -> Result<u64, String> {
    for run in runs.iter() {
        let what = || format!("page run at {:#x} ({} pages)", run.vaddr, run.nr_pages);
        if run.nr_pages == 0 || run.nr_pages > MAX_RUN_PAGES {
            return Err(format!(
                "{} is empty or longer than {MAX_RUN_PAGES} pages",
                what()
            ));
        }
        if !page_aligned(run.vaddr) {
            return Err(format!("{} is not page-aligned", what()));
        }
        if run_end(run).is_none() {
            return Err(format!("{} wraps around the address space", what()));
        }
    }
    runs.sort_unstable_by_key(|run| run.vaddr);
    for pair in runs.windows(2) {
        if let [a, b] = pair {
            if run_end(a).is_none_or(|end| end > b.vaddr) {
                return Err(format!(
                    "page runs at {:#x} ({} pages) and {:#x} overlap",
                    a.vaddr, a.nr_pages, b.vaddr
                ));
            }
        }
    }
    let mut placement: Vec<(u64, u64)> = runs.iter().map(|r| (r.page_index, r.nr_pages)).collect();
    placement.sort_unstable();
    // Pages may be unreferenced (a migration destination's file keeps the
    // older copies of pages that were sent again), but none may be used twice
    // and every run must lie inside the file.
    let mut next = 0u64;
    let mut total = 0u64;
    for (index, nr_pages) in placement {
        if index < next {
            return Err(format!(
                "page {index} of the pages file is used twice by the pagemap"
            ));
        }
        next = index
            .checked_add(nr_pages)
            .ok_or_else(|| format!("page run at page {index} wraps around"))?;
        total += nr_pages;
    }
    if next > file_pages {
        return Err(format!("{COVERAGE_MISMATCH}{next}"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("crm-image-pages-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn pattern(vaddr: u64, pages: usize) -> Vec<u8> {
        (0..pages * PAGE)
            .map(|i| ((vaddr as usize / PAGE + i / PAGE) as u8) ^ (i as u8))
            .collect()
    }

    #[test]
    fn long_data_is_split_and_runs_merge_up_to_the_cap() {
        let tmp = temp_dir("split");
        let dir = &tmp.0;
        let (pages, pagemap) = (dir.join("pages-1.img"), dir.join("pagemap-1.img"));
        let mut w = PagesWriter::create(&pages, &pagemap, Durability::Durable).unwrap();
        w.max_run_pages = 3;
        // 7 pages at 0x10000: runs of 3 + 3 + 1; then 3 more continuing: 2 merge, 1 starts a run.
        w.add_run(0x10000, &pattern(0x10000, 7)).unwrap();
        w.add_run(0x17000, &pattern(0x17000, 3)).unwrap();
        assert_eq!(w.pages_written(), 10);
        w.finish().unwrap();
        let r = PagesReader::open(&pages, &pagemap).unwrap();
        let shape: Vec<(u64, u64, u64)> = r
            .runs()
            .iter()
            .map(|r| (r.vaddr, r.nr_pages, r.page_index))
            .collect();
        assert_eq!(
            shape,
            [
                (0x10000, 3, 0),
                (0x13000, 3, 3),
                (0x16000, 3, 6),
                (0x19000, 1, 9)
            ]
        );
        assert_eq!(r.total_pages(), 10);
        for run in r.runs() {
            let mut buf = vec![0u8; run.nr_pages as usize * PAGE];
            r.read_run_into(run, &mut buf).unwrap();
            assert_eq!(buf, pattern(run.vaddr, run.nr_pages as usize));
        }
    }

    #[test]
    fn validate_runs_rules() {
        let run = |vaddr, nr_pages, page_index| PageRun {
            vaddr,
            nr_pages,
            page_index,
            crc32: 0,
        };
        assert_eq!(
            validate_runs(&mut [run(0x3000, 1, 2), run(0x1000, 2, 0)], 3),
            Ok(3)
        );
        let bad: &mut [&mut [PageRun]] = &mut [
            &mut [run(0x1000, 0, 0)],                      // empty
            &mut [run(0x1001, 1, 0)],                      // unaligned
            &mut [run(!0xfff, 2, 0)],                      // wraps
            &mut [run(0x1000, 2, 0), run(0x2000, 1, 2)],   // overlap in memory
            &mut [run(0x1000, 1, 0), run(0x5000, 1, 0)],   // page used twice
            &mut [run(0x1000, 1, 2)],                      // past the end of the file
            &mut [run(0x1000, MAX_RUN_PAGES + 1, 0)],      // too long
            &mut [run(0x1000, 1, u64::MAX), run(0, 1, 0)], // index wraps
        ];
        for runs in bad.iter_mut() {
            assert!(validate_runs(runs, 2).is_err(), "{runs:?}");
        }
        // Unreferenced pages (stale copies a migration left behind) are fine.
        assert_eq!(validate_runs(&mut [run(0x1000, 1, 1)], 2), Ok(1));
    }

    #[test]
    fn bad_calls_are_refused() {
        let tmp = temp_dir("bad-calls");
        let dir = &tmp.0;
        let (pages, pagemap) = (dir.join("pages-1.img"), dir.join("pagemap-1.img"));
        let mut w = PagesWriter::create(&pages, &pagemap, Durability::Durable).unwrap();
        for (vaddr, len) in [(0x1001, PAGE), (0x1000, 100), (!0xfff, 2 * PAGE)] {
            let err = w.add_run(vaddr, &vec![0; len]).unwrap_err();
            assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
        }
        w.add_run(0x1000, &[0; 2 * PAGE]).unwrap();
        w.add_run(0x2000, &[0; PAGE]).unwrap(); // overlaps the first run
        let err = w.finish().unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        // Nothing left behind: no final file, no temporary file.
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);

        // A destination of the wrong size.
        let mut w = PagesWriter::create(&pages, &pagemap, Durability::Durable).unwrap();
        w.add_run(0x1000, &[7; PAGE]).unwrap();
        w.finish().unwrap();
        let r = PagesReader::open(&pages, &pagemap).unwrap();
        let run = r.runs()[0];
        let err = r.read_run_into(&run, &mut [0; 100]).unwrap_err();
        assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
        let outside = PageRun {
            page_index: 1,
            ..run
        };
        let err = r.read_run_into(&outside, &mut [0; PAGE]).unwrap_err();
        assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
    }
}
