//! Page-aligned buffers whose memory is faulted in when they are made.
//!
//! Every page a migration receives lands in fresh memory, and on a VM the
//! kernel's work to hand out that memory costs more than the network: a
//! 1 GiB round 0 spent a third of the receiver's CPU in page faults taken
//! one 4 KiB page at a time, inside `recv`'s copy. A [`PageBuf`] is an
//! anonymous mapping made with `MAP_POPULATE`, which allocates all of its
//! pages in one call (no fault per page), and it is page-aligned, so the
//! store adopts it as is (`Frames::adopt`): the batch's pages are never
//! copied again.
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::store::PAGE_SIZE;

/// One private anonymous mapping, zero-filled and populated at creation.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    /// Bytes mapped: a whole number of pages, not zero.
    bytes: usize,
}

impl Mapping {
    /// Maps `bytes` (rounded up to whole pages, at least one).
    pub(crate) fn populated(bytes: usize) -> Mapping {
        let bytes = bytes.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. MAP_POPULATE faults it all in within this call.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        let ptr = match NonNull::new(raw.cast::<u8>()) {
            Some(p) if raw != libc::MAP_FAILED => p,
            _ => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(bytes, PAGE_SIZE).expect("valid layout"),
            ),
        };
        Mapping { ptr, bytes }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping holds `bytes` readable bytes, zero-filled at
        // creation, for as long as `self` lives; `&self` rules out a
        // concurrent `&mut` to it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.bytes) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.bytes) }
    }

    pub(crate) fn page(&self, i: usize) -> &[u8] {
        &self.as_slice()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    pub(crate) fn page_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.as_mut_slice()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `populated` with this length and not unmapped
        // before; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

// SAFETY: a Mapping owns its memory exclusively (no aliasing pointer
// escapes except through borrows of the Mapping), like a Box<[u8]>.
unsafe impl Send for Mapping {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for Mapping {}

/// A buffer of `len` bytes, page-aligned, its memory already faulted in
/// (zero-filled): receive pages into it, then hand it to
/// [`PageStore::insert_batch_owned`](crate::PageStore::insert_batch_owned).
pub struct PageBuf {
    map: Mapping,
    len: usize,
}

impl PageBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> PageBuf {
        PageBuf {
            map: Mapping::populated(len),
            len,
        }
    }

    /// The mapping behind the buffer (whole pages, possibly more than `len`).
    pub(crate) fn into_mapping(self) -> Mapping {
        self.map
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map.as_slice()[..self.len]
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.map.as_mut_slice()[..len]
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len).finish()
    }
}

/// Received pages, owned: a [`PageBuf`] or a plain vector (decompressed or
/// decrypted data, or a length that is not whole pages).
#[derive(Debug)]
pub enum OwnedPages {
    Mapped(PageBuf),
    Heap(Vec<u8>),
}

impl Deref for OwnedPages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            OwnedPages::Mapped(b) => b,
            OwnedPages::Heap(v) => v,
        }
    }
}

/// Equal when the bytes are.
impl PartialEq for OwnedPages {
    fn eq(&self, other: &OwnedPages) -> bool {
        **self == **other
    }
}

impl PartialEq<Vec<u8>> for OwnedPages {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl From<Vec<u8>> for OwnedPages {
    fn from(v: Vec<u8>) -> OwnedPages {
        OwnedPages::Heap(v)
    }
}

impl From<PageBuf> for OwnedPages {
    fn from(b: PageBuf) -> OwnedPages {
        OwnedPages::Mapped(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buf_is_zeroed_aligned_and_writable() {
        let mut b = PageBuf::zeroed(3 * PAGE_SIZE + 10);
        assert_eq!(b.len(), 3 * PAGE_SIZE + 10);
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[PAGE_SIZE] = 7;
        let last = b.len() - 1;
        b[last] = 9;
        assert_eq!((b[PAGE_SIZE], b[last]), (7, 9));
        assert_eq!(b.into_mapping().as_slice().len(), 4 * PAGE_SIZE);
        let empty = PageBuf::zeroed(0);
        assert!(empty.is_empty());
        let o: OwnedPages = vec![1u8; 5].into();
        assert_eq!(&o[..], &[1u8; 5]);
    }
}
