//! The pages of a task arriving over several pre-copy rounds, written into an
//! image directory as they come: each batch is appended to `pages-PID.img`
//! and an in-memory index keeps, per page, where its newest copy is (and its
//! CRC-32). Older copies stay in the file, unreferenced. [`IncomingPages::finish`]
//! writes the pagemap from the index, keeping only the pages the final dump
//! says are still resident, split at VMA boundaries; the result is an
//! ordinary image that `restore` reads. Memory use: about 40 bytes per
//! distinct page (the index); page data goes to the file (page cache).
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use crm_proto::image::PageRun;
use crm_proto::IMAGE_FORMAT_VERSION;

use super::error::ImageError;
use super::framing::{FileKind, RecordWriter};
use super::pages::{MAX_RUN_PAGES, PAGES_HEADER_LEN, PAGES_MAGIC, PAGE_SIZE};
use super::ImageDir;

const PAGE: usize = PAGE_SIZE as usize;
/// Page index of a page known to be zero (a tombstone).
const ZERO: u64 = u64::MAX;

pub struct IncomingPages {
    file: File,
    pages_path: PathBuf,
    pagemap_path: PathBuf,
    next_index: u64,
    /// vaddr → newest copy: (page index in the file or [`ZERO`], CRC-32,
    /// pre-copy round). Batches of different rounds may arrive out of order
    /// (several streams): a copy never replaces one of a later round.
    index: BTreeMap<u64, (u64, u32, u32)>,
    bytes_written: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct IncomingStats {
    /// Pages referenced by the final pagemap.
    pub pages: u64,
    pub runs: u64,
    /// Page copies received in all (including superseded ones).
    pub copies: u64,
}

impl IncomingPages {
    /// Starts `pages-PID.img` in `dir`.
    pub fn create(dir: &ImageDir, pid: i32) -> Result<Self, ImageError> {
        let pages_path = dir.task_file("pages", pid)?;
        let pagemap_path = dir.task_file("pagemap", pid)?;
        let mut file = File::create(&pages_path).map_err(|e| ImageError::open(&pages_path, e))?;
        let mut header = [0u8; PAGES_HEADER_LEN as usize];
        header[..8].copy_from_slice(&PAGES_MAGIC);
        header[8..12].copy_from_slice(&IMAGE_FORMAT_VERSION.to_le_bytes());
        file.write_all(&header)
            .map_err(|e| ImageError::io(&pages_path, "write", e))?;
        Ok(IncomingPages {
            file,
            pages_path,
            pagemap_path,
            next_index: 0,
            index: BTreeMap::new(),
            bytes_written: 0,
        })
    }

    /// Stores the copy made in `round` of the pages at `vaddr` (`data`: whole pages).
    pub fn put(&mut self, vaddr: u64, data: &[u8], round: u32) -> Result<(), ImageError> {
        if !vaddr.is_multiple_of(PAGE_SIZE) || !data.len().is_multiple_of(PAGE) {
            return Err(ImageError::invalid(
                &self.pages_path,
                format!(
                    "batch at {vaddr:#x} of {} bytes is not whole pages",
                    data.len()
                ),
            ));
        }
        self.file
            .write_all(data)
            .map_err(|e| ImageError::io(&self.pages_path, "write", e))?;
        for (i, page) in data.chunks_exact(PAGE).enumerate() {
            let addr = vaddr + (i * PAGE) as u64;
            let entry = (self.next_index, crc32fast::hash(page), round);
            self.next_index += 1;
            match self.index.get_mut(&addr) {
                Some(old) if old.2 > round => {}
                Some(old) => *old = entry,
                None => {
                    self.index.insert(addr, entry);
                }
            }
        }
        self.bytes_written += data.len() as u64;
        Ok(())
    }

    /// Records that the pages of `[vaddr, vaddr + nr_pages pages)` were zero
    /// in `round`, unless a later round's copy already arrived.
    pub fn zero_range(&mut self, vaddr: u64, nr_pages: u64, round: u32) {
        for i in 0..nr_pages.min(1 << 32) {
            let addr = vaddr.saturating_add(i * PAGE_SIZE);
            match self.index.get_mut(&addr) {
                Some(old) if old.2 > round => {}
                Some(old) => *old = (ZERO, 0, round),
                None => {
                    self.index.insert(addr, (ZERO, 0, round));
                }
            }
        }
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Writes the pagemap: pages inside `resident` ranges only, runs split at
    /// the starts of `vmas` (sorted `(start, end)`), so each run lies in one VMA.
    pub fn finish(
        mut self,
        resident: &[(u64, u64)],
        vmas: &[(u64, u64)],
    ) -> Result<IncomingStats, ImageError> {
        self.file
            .flush()
            .map_err(|e| ImageError::io(&self.pages_path, "flush", e))?;
        let inside = |ranges: &[(u64, u64)], a: u64| {
            let i = ranges.partition_point(|r| r.1 <= a);
            ranges.get(i).is_some_and(|r| r.0 <= a)
        };
        let vma_start = |a: u64| vmas.binary_search_by_key(&a, |v| v.0).is_ok();
        let mut runs: Vec<PageRun> = Vec::new();
        let mut open: Option<(PageRun, crc32fast::Hasher)> = None;
        let mut stats = IncomingStats {
            copies: self.next_index,
            ..Default::default()
        };
        for (&addr, &(page_index, crc, _)) in &self.index {
            if page_index == ZERO || !inside(resident, addr) || !inside(vmas, addr) {
                continue;
            }
            stats.pages += 1;
            let page_crc = crc32fast::Hasher::new_with_initial_len(crc, PAGE_SIZE);
            if let Some((run, h)) = open.as_mut() {
                let continues = run.vaddr + run.nr_pages * PAGE_SIZE == addr
                    && run.page_index + run.nr_pages == page_index
                    && run.nr_pages < MAX_RUN_PAGES
                    && !vma_start(addr);
                if continues {
                    run.nr_pages += 1;
                    h.combine(&page_crc);
                    continue;
                }
            }
            if let Some((mut run, h)) = open.take() {
                run.crc32 = h.finalize();
                runs.push(run);
            }
            open = Some((
                PageRun {
                    vaddr: addr,
                    nr_pages: 1,
                    page_index,
                    crc32: 0,
                },
                page_crc,
            ));
        }
        if let Some((mut run, h)) = open.take() {
            run.crc32 = h.finalize();
            runs.push(run);
        }
        stats.runs = runs.len() as u64;
        let mut pagemap = RecordWriter::create(&self.pagemap_path, FileKind::PageMap)?;
        super::pages::append_pagemap(&mut pagemap, &runs)?;
        pagemap.commit()?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_copy_wins_and_only_resident_pages_remain() {
        let dir = std::env::temp_dir().join(format!("crm-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let image = ImageDir::create(&dir).unwrap();
        let mut inc = IncomingPages::create(&image, 7).unwrap();
        let page = |b: u8| vec![b; PAGE];
        let base = 0x10_0000u64;
        let mut four = Vec::new();
        for b in 1..=4u8 {
            four.extend_from_slice(&page(b));
        }
        inc.put(base, &four, 0).unwrap(); // pages 0..4 round 0
        inc.put(base + 2 * PAGE_SIZE, &page(8), 2).unwrap(); // page 2, round 2
        inc.put(base + PAGE_SIZE, &page(9), 1).unwrap(); // page 1 again, newer
        inc.put(base + 2 * PAGE_SIZE, &page(7), 1).unwrap(); // round 1 arrives late: ignored
        inc.zero_range(base + 3 * PAGE_SIZE, 1, 1); // page 3 became zero
        let vmas = [
            (base, base + 2 * PAGE_SIZE),
            (base + 2 * PAGE_SIZE, base + 8 * PAGE_SIZE),
        ];
        let resident = [(base, base + 8 * PAGE_SIZE)];
        let stats = inc.finish(&resident, &vmas).unwrap();
        assert_eq!(stats.pages, 3);
        let reader = image.pages_reader(7).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for run in reader.runs() {
            let mut buf = vec![0u8; (run.nr_pages * PAGE_SIZE) as usize];
            reader.read_run_into(run, &mut buf).unwrap();
            for (i, p) in buf.chunks(PAGE).enumerate() {
                got.insert(run.vaddr + i as u64 * PAGE_SIZE, p[0]);
            }
        }
        let want: std::collections::BTreeMap<u64, u8> =
            [(base, 1), (base + PAGE_SIZE, 9), (base + 2 * PAGE_SIZE, 8)].into();
        assert_eq!(got, want);
        // The second VMA starts a new run.
        assert!(reader
            .runs()
            .iter()
            .any(|r| r.vaddr == base + 2 * PAGE_SIZE));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
