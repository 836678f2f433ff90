//! Page frames for the store's in-memory pages, carved from large chunks.
//!
//! One allocation per page costs a `malloc` and a page fault (with the
//! kernel zeroing the page) for every 4 KiB received: on a 1 GiB migration
//! that was a third of the receiver's CPU. Frames come instead from chunks
//! of [`CHUNK_PAGES`] pages: anonymous mappings made here, or the buffers
//! batches were received into, adopted whole ([`Frames::adopt`]: the
//! batch's pages become frames without a copy, and the fresh memory was
//! faulted in by the thread that read it from the network, not by the
//! store's; see [`PageBuf`](crate::PageBuf)). Freed frames are reused
//! before a new chunk is mapped; chunks
//! are returned to the system only when the store is dropped. (Transparent
//! huge pages were tried: on a VM the kernel's compaction and zeroing of
//! 2 MiB pages made the first touch of 1 GiB take 0.1 to 0.9 s instead of a
//! steady 0.35 s.)
use crate::page_buf::{Mapping, OwnedPages};
use crate::store::PAGE_SIZE;

/// Bytes per chunk: the largest batch a sender makes, so that a batch's
/// buffer can be adopted as one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
const CHUNK_PAGES: usize = CHUNK_BYTES / PAGE_SIZE;

/// Index of a frame: chunk * CHUNK_PAGES + page within the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame(u32);

impl Frame {
    /// The frame `i` pages after this one in its chunk (for adopted
    /// buffers, [`Frames::adopt`]).
    pub fn nth(self, i: usize) -> Frame {
        assert!((self.0 as usize % CHUNK_PAGES) + i < CHUNK_PAGES);
        Frame(self.0 + i as u32)
    }
}

/// The memory of up to [`CHUNK_PAGES`] frames: a mapping made here, or an
/// adopted buffer (which may hold fewer).
enum Chunk {
    Mapped(Mapping),
    Adopted(Vec<u8>),
}

impl Chunk {
    fn page(&self, i: usize) -> &[u8] {
        match self {
            Chunk::Mapped(m) => m.page(i),
            Chunk::Adopted(v) => &v[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
        }
    }

    fn page_mut(&mut self, i: usize) -> &mut [u8] {
        match self {
            Chunk::Mapped(m) => m.page_mut(i),
            Chunk::Adopted(v) => &mut v[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
        }
    }
}

/// The pool of page frames.
#[derive(Default)]
pub struct Frames {
    chunks: Vec<Chunk>,
    /// The mapped chunk being filled, and how many of its frames are used.
    filling: Option<(usize, usize)>,
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
                let (c, used) = match self.filling {
                    Some((c, used)) if used < CHUNK_PAGES => (c, used),
                    _ => {
                        // Populated at once (a chunk is filled right away
                        // anyway): 25-30% cheaper than a fault per page.
                        self.chunks
                            .push(Chunk::Mapped(Mapping::populated(CHUNK_BYTES)));
                        (self.chunks.len() - 1, 0)
                    }
                };
                self.filling = Some((c, used + 1));
                Self::frame(c, used)
            }
        };
        self.get_mut(frame).copy_from_slice(page);
        frame
    }

    fn frame(chunk: usize, page: usize) -> Frame {
        Frame(u32::try_from(chunk * CHUNK_PAGES + page).expect("fewer than 2^32 frames (16 TiB)"))
    }

    /// Takes `buf` (whole pages, at most [`CHUNK_BYTES`]) as the frames of
    /// its pages, in order: the first is returned, page `i` is
    /// [`Frame::nth`]`(i)` of it. Every one of them is in use until
    /// released.
    pub fn adopt(&mut self, buf: OwnedPages) -> Frame {
        assert!(buf.len() <= CHUNK_BYTES && buf.len().is_multiple_of(PAGE_SIZE));
        self.chunks.push(match buf {
            OwnedPages::Mapped(b) => Chunk::Mapped(b.into_mapping()),
            OwnedPages::Heap(v) => Chunk::Adopted(v),
        });
        Self::frame(self.chunks.len() - 1, 0)
    }

    /// Frames released and not reused yet.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Copies the page in `from` over the one in `to`.
    pub fn copy(&mut self, from: Frame, to: Frame) {
        let (fc, fp) = Self::split(from);
        let (tc, tp) = Self::split(to);
        if fc == tc {
            let chunk = &mut self.chunks[fc];
            let page = chunk.page(fp).to_vec();
            chunk.page_mut(tp).copy_from_slice(&page);
            return;
        }
        let (a, b) = if fc < tc {
            let (lo, hi) = self.chunks.split_at_mut(tc);
            (&lo[fc], &mut hi[0])
        } else {
            let (lo, hi) = self.chunks.split_at_mut(fc);
            (&hi[0], &mut lo[tc])
        };
        b.page_mut(tp).copy_from_slice(a.page(fp));
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
