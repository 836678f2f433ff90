//! Page frames for the store's in-memory pages, carved from large chunks.
//!
//! One allocation per page costs a `malloc` and a page fault (with the
//! kernel zeroing the page) for every 4 KiB received: on a 1 GiB migration
//! that was a third of the receiver's CPU. Frames come instead from chunks
//! of [`CHUNK_PAGES`] pages: anonymous mappings made here, or the buffers
//! batches were received into, adopted whole ([`Frames::adopt`]: the
//! batch's pages become frames without a copy, and the fresh memory was
//! faulted in by the thread that read it from the network, not by the
//! store's; see [`PageBuf`](crate::PageBuf)). Released frames are reused
//! before a new chunk is mapped. Frames *forgotten* ([`Frames::forget`]:
//! their pages are in the restored process now) are not reused: a chunk
//! whose frames are all forgotten or free goes back to the system at once,
//! so that the destination does not hold every page twice while it fills
//! the restored process. (Transparent huge pages were tried: on a VM
//! whose balloon reports free memory to the host, 2 MiB pages come from
//! blocks the host took back and must back again, and the first touch of
//! 1 GiB took 0.05 to 2 s instead of a steady 0.3 s.)
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
        self.nth_in_chunk(i).expect("a frame of the same chunk")
    }

    /// The frame `i` pages after this one, if it is in the same chunk.
    pub fn nth_in_chunk(self, i: usize) -> Option<Frame> {
        ((self.0 as usize % CHUNK_PAGES) + i < CHUNK_PAGES).then(|| Frame(self.0 + i as u32))
    }
}

/// The memory of up to [`CHUNK_PAGES`] frames: a mapping made here, or an
/// adopted buffer (which may hold fewer); none once given back.
enum Chunk {
    Mapped(Mapping),
    Adopted(Vec<u8>),
    Gone,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Mapped(m) => m.as_slice(),
            Chunk::Adopted(v) => v,
            Chunk::Gone => &[],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Chunk::Mapped(m) => m.as_mut_slice(),
            Chunk::Adopted(v) => v,
            Chunk::Gone => &mut [],
        }
    }

    fn page(&self, i: usize) -> &[u8] {
        &self.bytes()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    fn page_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bytes_mut()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }
}

/// A chunk and how many of its frames hold a page (neither free nor
/// forgotten).
struct Slot {
    chunk: Chunk,
    live: u32,
}

/// The pool of page frames.
#[derive(Default)]
pub struct Frames {
    chunks: Vec<Slot>,
    /// The mapped chunk being filled, and how many of its frames are used.
    filling: Option<(usize, usize)>,
    /// Released frames (some may belong to chunks given back since:
    /// skipped when popped).
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
        let frame = loop {
            match self.free.pop() {
                Some(f) if matches!(self.chunks[Self::split(f).0].chunk, Chunk::Gone) => continue,
                Some(f) => break f,
                None => break self.fresh_frame(),
            }
        };
        self.chunks[Self::split(frame).0].live += 1;
        self.get_mut(frame).copy_from_slice(page);
        frame
    }

    /// The next frame of the chunk being filled, or of a new one.
    fn fresh_frame(&mut self) -> Frame {
        let (c, used) = match self.filling {
            Some((c, used))
                if used < CHUNK_PAGES && !matches!(self.chunks[c].chunk, Chunk::Gone) =>
            {
                (c, used)
            }
            _ => {
                // Populated at once (a chunk is filled right away anyway):
                // 25-30% cheaper than a fault per page.
                self.chunks.push(Slot {
                    chunk: Chunk::Mapped(Mapping::populated(CHUNK_BYTES)),
                    live: 0,
                });
                (self.chunks.len() - 1, 0)
            }
        };
        self.filling = Some((c, used + 1));
        Self::frame(c, used)
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
        let live = (buf.len() / PAGE_SIZE) as u32;
        let chunk = match buf {
            OwnedPages::Mapped(b) => Chunk::Mapped(b.into_mapping()),
            OwnedPages::Heap(v) => Chunk::Adopted(v),
        };
        self.chunks.push(Slot { chunk, live });
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
            let chunk = &mut self.chunks[fc].chunk;
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
        b.chunk.page_mut(tp).copy_from_slice(a.chunk.page(fp));
    }

    /// Returns a frame to the pool, for reuse.
    pub fn release(&mut self, frame: Frame) {
        self.chunks[Self::split(frame).0].live -= 1;
        self.free.push(frame);
    }

    /// Drops a frame for good: once no frame of its chunk holds a page, the
    /// chunk's memory goes back to the system.
    pub fn forget(&mut self, frame: Frame) {
        let slot = &mut self.chunks[Self::split(frame).0];
        slot.live -= 1;
        if slot.live == 0 {
            slot.chunk = Chunk::Gone;
        }
    }

    /// The pages of `n` frames from `first` on, if they are consecutive in
    /// one chunk (as an adopted batch's are), as one slice.
    pub fn run(&self, first: Frame, n: usize) -> Option<&[u8]> {
        let (c, p) = Self::split(first);
        (p + n <= CHUNK_PAGES)
            .then(|| {
                self.chunks[c]
                    .chunk
                    .bytes()
                    .get(p * PAGE_SIZE..(p + n) * PAGE_SIZE)
            })
            .flatten()
    }

    fn split(frame: Frame) -> (usize, usize) {
        let i = frame.0 as usize;
        (i / CHUNK_PAGES, i % CHUNK_PAGES)
    }

    /// The page in `frame`.
    pub fn get(&self, frame: Frame) -> &[u8] {
        let (c, p) = Self::split(frame);
        self.chunks[c].chunk.page(p)
    }

    /// The page in `frame`, writable.
    pub fn get_mut(&mut self, frame: Frame) -> &mut [u8] {
        let (c, p) = Self::split(frame);
        self.chunks[c].chunk.page_mut(p)
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
