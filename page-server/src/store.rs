//! The page store: newest copy of every page, in memory up to a bound, in
//! an append-only spill file beyond it.
//!
//! # Newest copy wins
//! Every batch carries the pre-copy `round` it was read in (0 for the first
//! full copy, the final dump last). A page already held from a later round
//! is kept when an older round's copy arrives — page streams run in
//! parallel, so a slow round-2 batch may land after round 3's. Within one
//! round the copy inserted last wins.
//!
//! # Memory and spill
//! Pages are kept in memory while the bytes held stay within `memory_limit`.
//! A page that does not fit is appended to the spill file (created on first
//! use, removed when the store is dropped). A newer copy of an in-memory page
//! overwrites it in place; a newer copy of a spilled page goes to memory if
//! there is room, else it is appended again and the old copy becomes dead
//! space ([`StoreStats::spill_file_bytes`] counts it, `bytes_spilled` does
//! not). The spill file is a scratch file, not an image: it holds page
//! contents only, page-aligned, and means nothing without the in-memory index.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::frames::{Frame, Frames};
use crate::index::PageIndex;
use crate::page_buf::OwnedPages;

/// Size of every page the store holds (x86-64 base pages).
pub const PAGE_SIZE: usize = 4096;

/// A task (thread group) of the migrated tree: its PID as dumped.
pub type TaskId = i32;

/// What can go wrong; every variant names the task, page and file involved.
#[derive(Debug, thiserror::Error)]
pub enum PageStoreError {
    /// A page address not aligned to [`PAGE_SIZE`].
    #[error("task {task}: address {addr:#x} is not page-aligned")]
    Unaligned { task: TaskId, addr: u64 },
    /// A batch whose data is empty or not a whole number of pages.
    #[error("task {task}: batch at {addr:#x} has {len} bytes, not a whole number of pages")]
    BadLength { task: TaskId, addr: u64, len: usize },
    /// A batch that would run past the end of the 64-bit address space.
    #[error("task {task}: batch at {addr:#x} of {len} bytes wraps the address space")]
    AddressOverflow { task: TaskId, addr: u64, len: usize },
    /// The spill file could not be created (it must not exist yet).
    #[error("cannot create spill file {}", path.display())]
    CreateSpill {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Appending a page to the spill file failed.
    #[error("task {task}: cannot write page {addr:#x} to spill file {} at offset {offset}", path.display())]
    WriteSpill {
        task: TaskId,
        addr: u64,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Reading a spilled page back failed.
    #[error("task {task}: cannot read page {addr:#x} from spill file {} at offset {offset}", path.display())]
    ReadSpill {
        task: TaskId,
        addr: u64,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Counters of a [`PageStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Distinct (task, address) pages held.
    pub pages: usize,
    /// Bytes of page data held in memory (never above the memory limit).
    pub bytes_in_memory: u64,
    /// Bytes of live page data in the spill file.
    pub bytes_spilled: u64,
    /// Size of the spill file, including copies superseded since.
    pub spill_file_bytes: u64,
    /// Page copies dropped on arrival because a later round's copy was held.
    pub stale_copies_dropped: u64,
}

/// Most free frames in the pool for a batch's buffer to be adopted: past
/// that, pages are copied into free frames instead, so frames freed by
/// newer copies do not pile up unused.
const MAX_FREE_TO_ADOPT: usize = 1024;

/// A page to insert: bytes to copy, or a frame adopted from the batch's
/// buffer.
enum Src<'a> {
    Bytes(&'a [u8]),
    Frame(Frame),
}

/// Where the newest copy of one page is.
#[derive(Debug, Clone, Copy)]
enum Location {
    /// A frame of [`PageStore::frames`].
    Memory(Frame),
    /// Byte offset in the spill file.
    Spilled(u64),
    /// The page read as zero (no data held): an older copy is void.
    Zero,
}

/// A page of zeros, lent out for [`Location::Zero`] pages.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

#[derive(Debug)]
struct Slot {
    round: u32,
    location: Location,
}

/// The append-only spill file, created on first use.
#[derive(Debug)]
struct Spill {
    path: PathBuf,
    file: Option<File>,
    len: u64,
}

impl Spill {
    fn append(&mut self, task: TaskId, addr: u64, page: &[u8]) -> Result<u64, PageStoreError> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&self.path)
                .map_err(|source| PageStoreError::CreateSpill {
                    path: self.path.clone(),
                    source,
                })?;
            self.file = Some(file);
        }
        let offset = self.len;
        if let Some(file) = &self.file {
            file.write_all_at(page, offset)
                .map_err(|source| PageStoreError::WriteSpill {
                    task,
                    addr,
                    path: self.path.clone(),
                    offset,
                    source,
                })?;
        }
        self.len += page.len() as u64;
        Ok(offset)
    }

    fn read(&self, task: TaskId, addr: u64, offset: u64) -> Result<Vec<u8>, PageStoreError> {
        let err = |source| PageStoreError::ReadSpill {
            task,
            addr,
            path: self.path.clone(),
            offset,
            source,
        };
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| err(io::Error::from(io::ErrorKind::NotFound)))?;
        let mut page = vec![0u8; PAGE_SIZE];
        file.read_exact_at(&mut page, offset).map_err(err)?;
        Ok(page)
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The newest copy of every page received, keyed by (task, page address).
#[derive(Debug)]
pub struct PageStore {
    memory_limit: u64,
    pages: PageIndex<Slot>,
    frames: Frames,
    spill: Spill,
    stats: StoreStats,
}

impl PageStore {
    /// A store holding at most `memory_limit` bytes of pages in memory and
    /// spilling the rest to `spill_path`, which is created on first spill
    /// (it must not exist then) and removed when the store is dropped.
    pub fn new(memory_limit: u64, spill_path: impl Into<PathBuf>) -> PageStore {
        PageStore {
            memory_limit,
            pages: PageIndex::default(),
            frames: Frames::default(),
            spill: Spill {
                path: spill_path.into(),
                file: None,
                len: 0,
            },
            stats: StoreStats::default(),
        }
    }

    /// The spill file's path (it exists once something was spilled).
    pub fn spill_path(&self) -> &Path {
        &self.spill.path
    }

    /// Stores `data`, a run of whole pages starting at `addr` in `task`,
    /// read in pre-copy round `round`. Each page replaces the copy held
    /// unless that copy is from a later round.
    ///
    /// The batch is checked before anything is stored. A spill-file error
    /// leaves the pages before the failing one stored and the rest as they
    /// were (older copies, if any, are kept).
    pub fn insert_batch(
        &mut self,
        task: TaskId,
        addr: u64,
        round: u32,
        data: &[u8],
    ) -> Result<(), PageStoreError> {
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(PageStoreError::Unaligned { task, addr });
        }
        let len = data.len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(PageStoreError::BadLength { task, addr, len });
        }
        if addr.checked_add(len as u64 - 1).is_none() {
            return Err(PageStoreError::AddressOverflow { task, addr, len });
        }
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            self.insert_page(task, addr + (i * PAGE_SIZE) as u64, round, Src::Bytes(page))?;
        }
        Ok(())
    }

    /// [`PageStore::insert_batch`] of a batch's own buffer. When the batch
    /// fits in memory (and the pool has few free frames), the buffer itself
    /// becomes the frames of its pages: no copy, and the memory was faulted
    /// in by whoever received the batch. A page that replaces a copy held
    /// in memory is copied over it, and its frame in the buffer returns to
    /// the pool (reused by later pages).
    pub fn insert_batch_owned(
        &mut self,
        task: TaskId,
        addr: u64,
        round: u32,
        data: impl Into<OwnedPages>,
    ) -> Result<(), PageStoreError> {
        let data = data.into();
        let len = data.len();
        let fits = self.stats.bytes_in_memory + len as u64 <= self.memory_limit;
        let aligned = addr.is_multiple_of(PAGE_SIZE as u64) && len.is_multiple_of(PAGE_SIZE);
        if !fits
            || !aligned
            || len == 0
            || len > crate::frames::CHUNK_BYTES
            || addr.checked_add(len as u64 - 1).is_none()
            || self.frames.free_frames() > MAX_FREE_TO_ADOPT
        {
            return self.insert_batch(task, addr, round, &data);
        }
        let first = self.frames.adopt(data);
        for i in 0..len / PAGE_SIZE {
            let frame = first.nth(i);
            self.insert_page(
                task,
                addr + (i * PAGE_SIZE) as u64,
                round,
                Src::Frame(frame),
            )?;
        }
        Ok(())
    }

    /// The bytes of `src`.
    fn bytes<'a>(frames: &'a Frames, src: &Src<'a>) -> &'a [u8] {
        match *src {
            Src::Bytes(b) => b,
            Src::Frame(f) => frames.get(f),
        }
    }

    /// A frame holding `src` (its own frame, or a copy).
    fn frame_of(&mut self, src: Src<'_>) -> Frame {
        match src {
            Src::Bytes(b) => self.frames.alloc(b),
            Src::Frame(f) => f,
        }
    }

    /// `src` is not kept: an adopted frame goes back to the pool.
    fn discard(&mut self, src: Src<'_>) {
        if let Src::Frame(f) = src {
            self.frames.release(f);
        }
    }

    /// Appends `src` to the spill file (then discards it).
    fn spill_page(&mut self, task: TaskId, addr: u64, src: Src<'_>) -> Result<u64, PageStoreError> {
        let offset = self
            .spill
            .append(task, addr, Self::bytes(&self.frames, &src))?;
        self.discard(src);
        self.stats.bytes_spilled += PAGE_SIZE as u64;
        self.stats.spill_file_bytes = self.spill.len;
        Ok(offset)
    }

    /// Where a new copy of a page goes: memory if it fits, else the spill
    /// file.
    fn place(&mut self, task: TaskId, addr: u64, src: Src<'_>) -> Result<Location, PageStoreError> {
        let page_bytes = PAGE_SIZE as u64;
        if self.stats.bytes_in_memory + page_bytes <= self.memory_limit {
            self.stats.bytes_in_memory += page_bytes;
            Ok(Location::Memory(self.frame_of(src)))
        } else {
            Ok(Location::Spilled(self.spill_page(task, addr, src)?))
        }
    }

    fn insert_page(
        &mut self,
        task: TaskId,
        addr: u64,
        round: u32,
        src: Src<'_>,
    ) -> Result<(), PageStoreError> {
        let held = self
            .pages
            .get(task, addr)
            .map(|slot| (slot.round, slot.location));
        match held {
            Some((r, _)) if r > round => {
                self.stats.stale_copies_dropped += 1;
                self.discard(src);
            }
            Some((_, Location::Memory(frame))) => {
                match src {
                    Src::Bytes(b) => self.frames.get_mut(frame).copy_from_slice(b),
                    Src::Frame(f) => {
                        self.frames.copy(f, frame);
                        self.frames.release(f);
                    }
                }
                self.set_round(task, addr, round, None);
            }
            Some((_, old)) => {
                if matches!(old, Location::Spilled(_)) {
                    self.stats.bytes_spilled -= PAGE_SIZE as u64;
                }
                let location = self.place(task, addr, src)?;
                self.set_round(task, addr, round, Some(location));
            }
            None => {
                let location = self.place(task, addr, src)?;
                self.pages.insert(task, addr, Slot { round, location });
                self.stats.pages += 1;
            }
        }
        Ok(())
    }

    /// Updates the round (and location) of a page held.
    fn set_round(&mut self, task: TaskId, addr: u64, round: u32, location: Option<Location>) {
        if let Some(slot) = self.pages.get_mut(task, addr) {
            slot.round = round;
            if let Some(l) = location {
                slot.location = l;
            }
        }
    }

    /// The newest copy of the page at `addr` in `task`, if any arrived.
    /// Borrowed when in memory, read back when spilled.
    pub fn get(&self, task: TaskId, addr: u64) -> Result<Option<Cow<'_, [u8]>>, PageStoreError> {
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(PageStoreError::Unaligned { task, addr });
        }
        match self.pages.get(task, addr) {
            None => Ok(None),
            Some(slot) => self.load(task, addr, slot).map(Some),
        }
    }

    fn load<'a>(
        &'a self,
        task: TaskId,
        addr: u64,
        slot: &'a Slot,
    ) -> Result<Cow<'a, [u8]>, PageStoreError> {
        match &slot.location {
            Location::Memory(frame) => Ok(Cow::Borrowed(self.frames.get(*frame))),
            Location::Spilled(offset) => self.spill.read(task, addr, *offset).map(Cow::Owned),
            Location::Zero => Ok(Cow::Borrowed(&ZERO_PAGE)),
        }
    }

    /// Records that the `nr_pages` pages at `addr` in `task` read as zero in
    /// `round`: the copies held go (unless from a later round) and
    /// [`PageStore::get`] returns zeros for them; pages not held stay so.
    pub fn insert_zero(
        &mut self,
        task: TaskId,
        addr: u64,
        nr_pages: u64,
        round: u32,
    ) -> Result<(), PageStoreError> {
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(PageStoreError::Unaligned { task, addr });
        }
        let len = nr_pages.saturating_mul(PAGE_SIZE as u64);
        if nr_pages == 0 || addr.checked_add(len - 1).is_none() {
            return Err(PageStoreError::AddressOverflow {
                task,
                addr,
                len: len as usize,
            });
        }
        let page_bytes = PAGE_SIZE as u64;
        // Only held copies need voiding: no batch of an earlier round can
        // arrive after this (each round is stored before the next starts),
        // so the cost is bounded by what is held, not by `nr_pages`.
        let end = addr.saturating_add(len);
        for (_, slot) in self.pages.range_mut(task, addr, end) {
            if slot.round > round {
                self.stats.stale_copies_dropped += 1;
                continue;
            }
            match slot.location {
                Location::Memory(frame) => {
                    self.frames.release(frame);
                    self.stats.bytes_in_memory -= page_bytes;
                }
                Location::Spilled(_) => self.stats.bytes_spilled -= page_bytes,
                Location::Zero => {}
            }
            slot.location = Location::Zero;
            slot.round = round;
        }
        Ok(())
    }

    /// The pages of `task` that hold data (not known-zero) inside
    /// `[start, end)`, as merged, sorted ranges.
    pub fn data_ranges(&self, task: TaskId, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, slot) in self.pages.range(task, start, end) {
            if matches!(slot.location, Location::Zero) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = a + PAGE_SIZE as u64,
                _ => out.push((a, a + PAGE_SIZE as u64)),
            }
        }
        out
    }

    /// Every page held for `task` as `(address, bytes)`, in address order.
    pub fn iter_task(
        &self,
        task: TaskId,
    ) -> impl Iterator<Item = Result<(u64, Cow<'_, [u8]>), PageStoreError>> + '_ {
        self.pages
            .task(task)
            .map(move |(addr, slot)| self.load(task, addr, slot).map(|b| (addr, b)))
    }

    /// Drops the copies held of `task`'s pages in `[start, end)` (say,
    /// because they are in the restored process now): [`PageStore::get`]
    /// returns `None` for them from now on, and memory that held only such
    /// pages goes back to the system.
    pub fn forget(&mut self, task: TaskId, start: u64, end: u64) {
        let held: Vec<(u64, Location)> = self
            .pages
            .range(task, start, end)
            .map(|(a, slot)| (a, slot.location))
            .collect();
        let page_bytes = PAGE_SIZE as u64;
        for (addr, location) in held {
            self.pages.remove(task, addr);
            self.stats.pages -= 1;
            match location {
                Location::Memory(frame) => {
                    self.frames.forget(frame);
                    self.stats.bytes_in_memory -= page_bytes;
                }
                Location::Spilled(_) => self.stats.bytes_spilled -= page_bytes,
                Location::Zero => {}
            }
        }
    }

    /// The pages of `task` from `addr` on, as one slice, as far as they are
    /// held in memory in consecutive frames of one chunk (the pages of one
    /// received batch are), at most `max_pages`. `None` if the page at
    /// `addr` is not in memory.
    pub fn contiguous(&self, task: TaskId, addr: u64, max_pages: usize) -> Option<&[u8]> {
        let Location::Memory(first) = self.pages.get(task, addr)?.location else {
            return None;
        };
        let mut n = 1;
        while n < max_pages {
            let next = addr.checked_add((n * PAGE_SIZE) as u64);
            let held = next
                .and_then(|a| self.pages.get(task, a))
                .map(|s| s.location);
            match (held, first.nth_in_chunk(n)) {
                (Some(Location::Memory(f)), Some(want)) if f == want => n += 1,
                _ => break,
            }
        }
        self.frames.run(first, n)
    }

    /// Whether a copy of the page at `addr` in `task` is held.
    pub fn contains(&self, task: TaskId, addr: u64) -> bool {
        self.pages.get(task, addr).is_some()
    }

    /// Counters: pages held, bytes in memory and spilled.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("crm-page-store-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn spill(&self) -> PathBuf {
            self.0.join("pages.spill")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const P: u64 = PAGE_SIZE as u64;

    /// `n` pages, page `i` filled with `fill + i`.
    fn pages(n: usize, fill: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| std::iter::repeat_n(fill.wrapping_add(i as u8), PAGE_SIZE))
            .collect()
    }

    fn byte_of(store: &PageStore, task: TaskId, addr: u64) -> u8 {
        let page = store.get(task, addr).unwrap().expect("page held");
        assert_eq!(page.len(), PAGE_SIZE);
        assert!(page.iter().all(|&b| b == page[0]), "page {addr:#x} torn");
        page[0]
    }

    #[test]
    fn newest_copy_wins() {
        let dir = TempDir::new();
        let mut s = PageStore::new(1 << 20, dir.spill());
        s.insert_batch(7, 0x1000, 0, &pages(3, 10)).unwrap();
        s.insert_batch(7, 0x2000, 1, &pages(1, 50)).unwrap();
        assert_eq!(byte_of(&s, 7, 0x1000), 10);
        assert_eq!(byte_of(&s, 7, 0x2000), 50);
        assert_eq!(byte_of(&s, 7, 0x3000), 12);
        // Same round, later insert wins.
        s.insert_batch(7, 0x2000, 1, &pages(1, 60)).unwrap();
        assert_eq!(byte_of(&s, 7, 0x2000), 60);
        // A late round-0 batch replaces round-0 copies, not the round-1 one.
        s.insert_batch(7, 0x1000, 0, &pages(2, 90)).unwrap();
        assert_eq!(byte_of(&s, 7, 0x1000), 90);
        assert_eq!(byte_of(&s, 7, 0x2000), 60);
        let st = s.stats();
        assert_eq!(st.pages, 3);
        assert_eq!(st.stale_copies_dropped, 1);
        assert_eq!(st.bytes_in_memory, 3 * P);
        assert_eq!(st.bytes_spilled, 0);
        assert!(!dir.spill().exists(), "nothing spilled, no file");
    }

    #[test]
    fn an_index_slot_is_24_bytes() {
        // What the index's memory figures (crate::index) assume.
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 24);
    }

    #[test]
    fn received_batches_are_served_as_slices_and_forgotten() {
        let dir = TempDir::new();
        let mut s = PageStore::new(1 << 30, dir.spill());
        let mut buf = crate::PageBuf::zeroed(256 * PAGE_SIZE);
        buf.copy_from_slice(&pages(256, 0));
        s.insert_batch_owned(7, 0x10_0000, 0, buf).unwrap();
        // A newer copy of one page is copied over its frame: still one run.
        s.insert_batch(7, 0x10_0000 + 5 * P, 1, &pages(1, 200))
            .unwrap();
        // A page next to the batch lands in a frame of its own.
        s.insert_batch(7, 0x20_0000, 0, &pages(1, 9)).unwrap();
        let run = s.contiguous(7, 0x10_0000, 1000).expect("in memory");
        assert_eq!(run.len(), 256 * PAGE_SIZE, "stops at the batch's end");
        assert_eq!(
            (run[0], run[5 * PAGE_SIZE], run[255 * PAGE_SIZE]),
            (0, 200, 255)
        );
        let part = s.contiguous(7, 0x10_0000 + 10 * P, 4).unwrap();
        assert_eq!((part.len(), part[0]), (4 * PAGE_SIZE, 10));
        assert_eq!(s.contiguous(7, 0x30_0000, 4), None);
        assert_eq!(s.contiguous(8, 0x10_0000, 4), None);

        // Forgetting pages drops them; the rest stays.
        s.forget(7, 0x10_0000, 0x10_0000 + 128 * P);
        assert_eq!(s.get(7, 0x10_0000).unwrap(), None);
        assert_eq!(byte_of(&s, 7, 0x10_0000 + 128 * P), 128);
        let st = s.stats();
        assert_eq!((st.pages, st.bytes_in_memory), (129, 129 * P));
        s.forget(7, 0, u64::MAX);
        assert_eq!(s.stats().pages, 0);
        assert_eq!(s.stats().bytes_in_memory, 0);

        // A free frame of a chunk given back is not reused.
        s.insert_batch_owned(7, 0x1000, 0, pages(2, 10)).unwrap();
        s.insert_zero(7, 0x2000, 1, 1).unwrap(); // frees the second frame
        s.forget(7, 0x1000, 0x2000); // gives the chunk back
        s.insert_batch(7, 0x9000, 1, &pages(1, 77)).unwrap();
        assert_eq!(byte_of(&s, 7, 0x9000), 77);
        assert_eq!(byte_of(&s, 7, 0x2000), 0);
        assert_eq!(s.get(7, 0x1000).unwrap(), None);
    }

    #[test]
    fn adopted_batches_keep_their_pages_and_newest_copy_wins() {
        let dir = TempDir::new();
        let mut s = PageStore::new(1 << 30, dir.spill());
        s.insert_batch_owned(7, 0x1000, 0, pages(3, 10)).unwrap();
        s.insert_batch_owned(7, 0x10_0000, 0, pages(256, 0))
            .unwrap();
        // Newer copies of adopted pages, adopted again (their old frames
        // are overwritten; the new buffer's frames go back to the pool).
        s.insert_batch_owned(7, 0x2000, 1, pages(2, 50)).unwrap();
        // A stale copy (round 0 after round 1): dropped, its frame freed.
        s.insert_batch_owned(7, 0x2000, 0, pages(1, 99)).unwrap();
        assert_eq!(byte_of(&s, 7, 0x1000), 10);
        assert_eq!(byte_of(&s, 7, 0x2000), 50);
        assert_eq!(byte_of(&s, 7, 0x3000), 51);
        for i in 0..256u64 {
            assert_eq!(byte_of(&s, 7, 0x10_0000 + i * P), i as u8);
        }
        let st = s.stats();
        assert_eq!(st.pages, 259);
        assert_eq!(st.stale_copies_dropped, 1);
        assert_eq!(st.bytes_in_memory, 259 * P);
        assert_eq!(s.frames.free_frames(), 3, "freed frames return to the pool");
        // Copied batches take the freed frames first.
        s.insert_batch(8, 0x1000, 0, &pages(3, 200)).unwrap();
        assert_eq!(s.frames.free_frames(), 0);
        assert_eq!(byte_of(&s, 8, 0x3000), 202);
        assert_eq!(byte_of(&s, 7, 0x3000), 51);
    }

    #[test]
    fn adopted_batches_respect_the_memory_bound() {
        let dir = TempDir::new();
        let mut s = PageStore::new(4 * P, dir.spill());
        s.insert_batch_owned(5, 0x10_0000, 0, pages(3, 100))
            .unwrap();
        // Does not fit whole: copied, the rest spilled.
        s.insert_batch_owned(5, 0x20_0000, 0, pages(3, 110))
            .unwrap();
        let st = s.stats();
        assert_eq!(st.bytes_in_memory, 4 * P);
        assert_eq!(st.bytes_spilled, 2 * P);
        for i in 0..3 {
            assert_eq!(byte_of(&s, 5, 0x10_0000 + i * P), 100 + i as u8);
            assert_eq!(byte_of(&s, 5, 0x20_0000 + i * P), 110 + i as u8);
        }
        // Malformed batches are refused as by insert_batch.
        assert!(s.insert_batch_owned(5, 0x1001, 0, pages(1, 1)).is_err());
        assert!(s.insert_batch_owned(5, 0x1000, 0, vec![0; 100]).is_err());
    }

    #[test]
    fn zero_pages_void_older_copies_and_leave_the_data_ranges() {
        let dir = TempDir::new();
        // Room for 2 pages in memory: pages 3.. spill.
        let mut s = PageStore::new(2 * P, dir.spill());
        s.insert_batch(7, 0x1000, 0, &pages(5, 10)).unwrap();
        assert_eq!(s.data_ranges(7, 0, u64::MAX), vec![(0x1000, 0x6000)]);
        // Pages 2 and 3 (one in memory, one spilled) became zero in round 1;
        // a zero run over pages never held costs nothing and adds nothing.
        s.insert_zero(7, 0x2000, 2, 1).unwrap();
        s.insert_zero(7, 0x100_0000, 1 << 40, 1).unwrap();
        assert_eq!(
            s.data_ranges(7, 0, u64::MAX),
            vec![(0x1000, 0x2000), (0x4000, 0x6000)]
        );
        assert_eq!(byte_of(&s, 7, 0x2000), 0);
        assert_eq!(byte_of(&s, 7, 0x3000), 0);
        let st = s.stats();
        assert_eq!(st.pages, 5);
        assert_eq!(st.bytes_in_memory + st.bytes_spilled, 3 * P);
        // An older round's zero run does not void a newer copy.
        s.insert_batch(7, 0x2000, 2, &pages(1, 77)).unwrap();
        s.insert_zero(7, 0x2000, 1, 1).unwrap();
        assert_eq!(byte_of(&s, 7, 0x2000), 77);
        assert_eq!(s.data_ranges(7, 0x2000, 0x3000), vec![(0x2000, 0x3000)]);
        assert!(s.insert_zero(7, 0x2001, 1, 1).is_err());
    }

    #[test]
    fn tasks_are_kept_apart() {
        let dir = TempDir::new();
        let mut s = PageStore::new(1 << 20, dir.spill());
        s.insert_batch(1, 0x7000, 0, &pages(1, 1)).unwrap();
        s.insert_batch(2, 0x7000, 0, &pages(1, 2)).unwrap();
        assert_eq!(byte_of(&s, 1, 0x7000), 1);
        assert_eq!(byte_of(&s, 2, 0x7000), 2);
        assert!(s.get(3, 0x7000).unwrap().is_none());
        assert!(s.get(1, 0x8000).unwrap().is_none());
        assert!(s.contains(2, 0x7000) && !s.contains(2, 0x8000));
    }

    #[test]
    fn spills_beyond_the_bound_and_reads_back() {
        let dir = TempDir::new();
        let mut s = PageStore::new(2 * P, dir.spill());
        s.insert_batch(5, 0x10_0000, 0, &pages(5, 100)).unwrap();
        let st = s.stats();
        assert_eq!(st.pages, 5);
        assert_eq!(st.bytes_in_memory, 2 * P);
        assert_eq!(st.bytes_spilled, 3 * P);
        assert_eq!(st.spill_file_bytes, 3 * P);
        assert_eq!(std::fs::metadata(dir.spill()).unwrap().len(), 3 * P);
        for i in 0..5 {
            assert_eq!(byte_of(&s, 5, 0x10_0000 + i * P), 100 + i as u8);
        }
        assert!(matches!(
            s.get(5, 0x10_0000).unwrap(),
            Some(Cow::Borrowed(_))
        ));
        assert!(matches!(s.get(5, 0x10_4000).unwrap(), Some(Cow::Owned(_))));
    }

    #[test]
    fn newer_copy_of_a_spilled_page() {
        let dir = TempDir::new();
        let mut s = PageStore::new(P, dir.spill());
        s.insert_batch(1, 0, 0, &pages(2, 1)).unwrap(); // page 0 in memory, page 1 spilled
                                                        // Memory full: the newer copy of page 1 is appended, the old is dead.
        s.insert_batch(1, P, 1, &pages(1, 42)).unwrap();
        assert_eq!(byte_of(&s, 1, P), 42);
        let st = s.stats();
        assert_eq!((st.bytes_in_memory, st.bytes_spilled), (P, P));
        assert_eq!(st.spill_file_bytes, 2 * P);
    }

    #[test]
    fn spilled_page_moves_to_memory_when_room_frees() {
        // A page spilled while memory was full goes to memory when its newer
        // copy finds room (here: the bound is raised between batches).
        let dir = TempDir::new();
        let mut s = PageStore::new(0, dir.spill());
        s.insert_batch(1, 0, 0, &pages(1, 1)).unwrap();
        assert_eq!(s.stats().bytes_spilled, P);
        s.memory_limit = P;
        s.insert_batch(1, 0, 1, &pages(1, 2)).unwrap();
        let st = s.stats();
        assert_eq!((st.bytes_in_memory, st.bytes_spilled, st.pages), (P, 0, 1));
        assert!(matches!(s.get(1, 0).unwrap(), Some(Cow::Borrowed(_))));
        assert_eq!(byte_of(&s, 1, 0), 2);
    }

    #[test]
    fn iter_task_in_address_order_across_memory_and_spill() {
        let dir = TempDir::new();
        let mut s = PageStore::new(2 * P, dir.spill());
        s.insert_batch(3, 0x9000, 0, &pages(2, 30)).unwrap(); // memory
        s.insert_batch(3, 0x1000, 0, &pages(2, 10)).unwrap(); // spilled
        s.insert_batch(4, 0x5000, 0, &pages(1, 99)).unwrap(); // other task
        let got: Vec<(u64, u8)> = s
            .iter_task(3)
            .map(|r| r.map(|(addr, bytes)| (addr, bytes[0])).unwrap())
            .collect();
        assert_eq!(
            got,
            [(0x1000, 10), (0x2000, 11), (0x9000, 30), (0xa000, 31)]
        );
        assert_eq!(s.iter_task(4).count(), 1);
        assert_eq!(s.iter_task(5).count(), 0);
    }

    #[test]
    fn bad_batches_are_typed_errors_and_store_nothing() {
        let dir = TempDir::new();
        let mut s = PageStore::new(1 << 20, dir.spill());
        assert!(matches!(
            s.insert_batch(1, 0x1001, 0, &pages(1, 0)),
            Err(PageStoreError::Unaligned {
                task: 1,
                addr: 0x1001
            })
        ));
        assert!(matches!(
            s.insert_batch(1, 0x1000, 0, &[0u8; 100]),
            Err(PageStoreError::BadLength { len: 100, .. })
        ));
        assert!(matches!(
            s.insert_batch(1, 0x1000, 0, &[]),
            Err(PageStoreError::BadLength { len: 0, .. })
        ));
        assert!(matches!(
            s.insert_batch(1, u64::MAX - P + 1 - P, 0, &pages(3, 0)),
            Err(PageStoreError::AddressOverflow { .. })
        ));
        // The last page of the address space is fine.
        s.insert_batch(1, u64::MAX - P + 1, 0, &pages(1, 7))
            .unwrap();
        assert!(matches!(s.get(1, 3), Err(PageStoreError::Unaligned { .. })));
        assert_eq!(s.stats().pages, 1);
    }

    #[test]
    fn spill_file_errors_name_the_path_and_keep_older_pages() {
        let dir = TempDir::new();
        std::fs::write(dir.spill(), b"someone else's").unwrap();
        let mut s = PageStore::new(P, dir.spill());
        let err = s.insert_batch(1, 0, 0, &pages(3, 1)).unwrap_err();
        let PageStoreError::CreateSpill { path, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(path, &dir.spill());
        assert!(err.to_string().contains("pages.spill"), "{err}");
        // The page that fit is stored; the failing ones are not.
        assert_eq!(s.stats().pages, 1);
        assert!(s.get(1, P).unwrap().is_none());
        drop(s);
        // A file the store did not create is not removed.
        assert_eq!(std::fs::read(dir.spill()).unwrap(), b"someone else's");
    }

    #[test]
    fn spill_file_removed_on_drop() {
        let dir = TempDir::new();
        let mut s = PageStore::new(0, dir.spill());
        s.insert_batch(1, 0, 0, &pages(1, 1)).unwrap();
        assert!(dir.spill().exists());
        assert_eq!(s.spill_path(), dir.spill());
        drop(s);
        assert!(!dir.spill().exists());
    }
}
