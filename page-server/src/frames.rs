//! Page frames for the store's in-memory pages, carved from large chunks.
//!
//! One allocation per page costs a `malloc` and a page fault (with the
//! kernel zeroing the page) for every 4 KiB received: on a 1 GiB migration
//! that was a third of the receiver's CPU. Frames come instead from
//! anonymous mappings of [`CHUNK_BYTES`]. Freed frames are reused before a
//! new chunk is mapped; chunks are returned to the system only when the
//! store is dropped. (Transparent huge pages were tried: on a VM the
//! kernel's compaction and zeroing of 2 MiB pages made the first touch of
//! 1 GiB take 0.1 to 0.9 s instead of a steady 0.35 s.)
use std::ptr::NonNull;

use crate::store::PAGE_SIZE;

/// Bytes per chunk.
pub const CHUNK_BYTES: usize = 8 << 20;
const CHUNK_PAGES: usize = CHUNK_BYTES / PAGE_SIZE;

/// Index of a frame: chunk * CHUNK_PAGES + page within the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame(u32);

/// One anonymous mapping of [`CHUNK_BYTES`] (zero-filled by the kernel).
struct Chunk {
    ptr: NonNull<u8>,
}

impl Chunk {
    fn new() -> Chunk {
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. MAP_POPULATE faults it in in one call (a chunk is filled
        // right away anyway): 25-30% cheaper than 2048 page faults.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        let ptr = match NonNull::new(raw.cast::<u8>()) {
            Some(p) if raw != libc::MAP_FAILED => p,
            _ => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(CHUNK_BYTES, PAGE_SIZE).expect("valid layout"),
            ),
        };
        Chunk { ptr }
    }

    fn page(&self, i: usize) -> &[u8] {
        assert!(i < CHUNK_PAGES);
        // SAFETY: the mapping holds CHUNK_PAGES pages, zero-filled at
        // creation, and lives as long as `self`; `&self` rules out a
        // concurrent `&mut` to it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(i * PAGE_SIZE), PAGE_SIZE) }
    }

    fn page_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(i < CHUNK_PAGES);
        // SAFETY: as in `page`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(i * PAGE_SIZE), PAGE_SIZE) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: mapped in `Chunk::new` with this length and not unmapped
        // before; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), CHUNK_BYTES);
        }
    }
}

// SAFETY: a Chunk owns its allocation exclusively (no aliasing pointers
// escape except through borrows of the Chunk), like a Box<[u8]>.
unsafe impl Send for Chunk {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for Chunk {}

/// The pool of page frames.
#[derive(Default)]
pub struct Frames {
    chunks: Vec<Chunk>,
    /// Frames of allocated chunks never used yet start here.
    next: usize,
    free: Vec<Frame>,
}

impl std::fmt::Debug for Frames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames")
            .field("chunks", &self.chunks.len())
            .field("free", &self.free.len())
            .finish()
    }
}

impl Frames {
    /// A frame holding a copy of `page` (exactly [`PAGE_SIZE`] bytes).
    pub fn alloc(&mut self, page: &[u8]) -> Frame {
        let frame = match self.free.pop() {
            Some(f) => f,
            None => {
                if self.next == self.chunks.len() * CHUNK_PAGES {
                    self.chunks.push(Chunk::new());
                }
                let f = Frame(u32::try_from(self.next).expect("fewer than 2^32 frames (16 TiB)"));
                self.next += 1;
                f
            }
        };
        self.get_mut(frame).copy_from_slice(page);
        frame
    }

    /// Returns a frame to the pool.
    pub fn release(&mut self, frame: Frame) {
        self.free.push(frame);
    }

    fn split(frame: Frame) -> (usize, usize) {
        let i = frame.0 as usize;
        (i / CHUNK_PAGES, i % CHUNK_PAGES)
    }

    /// The page in `frame`.
    pub fn get(&self, frame: Frame) -> &[u8] {
        let (c, p) = Self::split(frame);
        self.chunks[c].page(p)
    }

    /// The page in `frame`, writable.
    pub fn get_mut(&mut self, frame: Frame) -> &mut [u8] {
        let (c, p) = Self::split(frame);
        self.chunks[c].page_mut(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_hold_their_pages_and_are_reused() {
        let mut f = Frames::default();
        let pages: Vec<Frame> = (0..CHUNK_PAGES + 3)
            .map(|i| f.alloc(&[(i % 251) as u8; PAGE_SIZE]))
            .collect();
        assert_eq!(f.chunks.len(), 2);
        for (i, fr) in pages.iter().enumerate() {
            assert!(
                f.get(*fr).iter().all(|&b| b == (i % 251) as u8),
                "frame {i}"
            );
        }
        f.release(pages[5]);
        let again = f.alloc(&[7; PAGE_SIZE]);
        assert_eq!(again, pages[5], "a released frame is reused first");
        assert!(f.get(again).iter().all(|&b| b == 7));
        f.get_mut(again)[0] = 9;
        assert_eq!(f.get(again)[0], 9);
        assert_eq!(f.chunks.len(), 2);
    }
}
