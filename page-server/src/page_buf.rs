//! Page-aligned buffers whose memory is faulted in when they are made.
//!
//! Every page a migration receives lands in fresh memory, and on a VM the
//! kernel's work to hand out that memory costs more than the network: a
//! 1 GiB round 0 spent a third of the receiver's CPU in page faults taken
//! one 4 KiB page at a time, inside `recv`'s copy. A [`PageBuf`] has its
//! pages allocated in one call when it is made (`MADV_POPULATE_WRITE`, no
//! fault per page), and it is page-aligned, so the store adopts it as is
//! (`Frames::adopt`): the batch's pages are never copied again.
//!
//! Buffers are carved out of [`REGION_BYTES`] regions of address space
//! reserved with one `mmap` each. A `mmap` per buffer would serialize the
//! receiving threads: `mmap` takes the address-space lock for writing while
//! another thread's populate holds it for reading (two threads populating
//! 1 GiB in 1 MiB `mmap`s took as long as one; populating slices of one
//! region, half as long). A buffer's pages go back to the system when it
//! is dropped (`MADV_DONTNEED`), its region's address space when the last
//! buffer carved from it is.
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::store::PAGE_SIZE;

/// Address space reserved per region.
const REGION_BYTES: usize = 64 << 20;

/// Address space reserved with one `mmap` (no memory until populated).
struct Region {
    ptr: NonNull<u8>,
    bytes: usize,
}

impl Region {
    fn reserve(bytes: usize) -> Region {
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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
        Region { ptr, bytes }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped in `reserve` with this length and not unmapped
        // before; every Mapping carved from it holds an Arc to it, so none
        // is left.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

// SAFETY: a Region is address space owned by its Arc holders; the bytes
// are only reached through the Mappings carved from it, which never
// overlap.
unsafe impl Send for Region {}
// SAFETY: as above; a Region itself gives access to no bytes.
unsafe impl Sync for Region {}

/// The region being carved, and the offset of its first free byte.
static CARVING: Mutex<Option<(Arc<Region>, usize)>> = Mutex::new(None);

/// A slice of a region, zero-filled and populated at creation, owned
/// exclusively.
pub(crate) struct Mapping {
    region: Arc<Region>,
    offset: usize,
    /// Bytes: a whole number of pages, not zero.
    bytes: usize,
}

impl Mapping {
    /// `bytes` (rounded up to whole pages, at least one) of fresh memory.
    pub(crate) fn populated(bytes: usize) -> Mapping {
        let bytes = bytes.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let (region, offset) = if bytes > REGION_BYTES / 4 {
            (Arc::new(Region::reserve(bytes)), 0)
        } else {
            let mut carving = CARVING.lock().unwrap_or_else(|p| p.into_inner());
            let fits = matches!(&*carving, Some((r, at)) if at + bytes <= r.bytes);
            if !fits {
                *carving = Some((Arc::new(Region::reserve(REGION_BYTES)), 0));
            }
            let (r, at) = carving.as_mut().expect("a region is being carved");
            let offset = *at;
            *at += bytes;
            (Arc::clone(r), offset)
        };
        let m = Mapping {
            region,
            offset,
            bytes,
        };
        m.populate();
        m
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + bytes lies inside the region (see `populated`).
        unsafe { self.region.ptr.as_ptr().add(self.offset) }
    }

    /// Allocates the pages now. Kernels before 5.14 lack
    /// `MADV_POPULATE_WRITE`: there the first write of each page does it.
    fn populate(&self) {
        // SAFETY: advice on memory this Mapping owns; it changes no
        // contents (the pages are fresh zero pages either way).
        unsafe {
            libc::madvise(self.ptr().cast(), self.bytes, libc::MADV_POPULATE_WRITE);
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the slice is `bytes` readable bytes of the region, which
        // lives as long as `self` (Arc), zero-filled at creation and reached
        // only through this Mapping; `&self` rules out a concurrent `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.bytes) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.bytes) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: gives back the pages of this Mapping's own slice, which
        // no borrow outlives; the address space stays reserved (and reads
        // as zero) until the region goes.
        unsafe {
            libc::madvise(self.ptr().cast(), self.bytes, libc::MADV_DONTNEED);
        }
    }
}

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

    /// Shortens the buffer to `len` bytes (no effect if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
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

impl AsMut<[u8]> for PageBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
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
    fn buffers_are_carved_apart_and_give_their_memory_back() {
        let mut a = PageBuf::zeroed(PAGE_SIZE);
        let mut b = PageBuf::zeroed(3 * PAGE_SIZE);
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        // Larger than a region's quarter: a region of its own.
        let big = PageBuf::zeroed(REGION_BYTES);
        assert_eq!(big.len(), REGION_BYTES);
        drop(big);
        let (ptr, len) = (b.as_ptr(), b.len());
        let region = Arc::clone(&b.map.region);
        drop(b);
        // SAFETY: the region (held above) still reserves the address
        // space; a dropped buffer's pages read as zero again.
        let after = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(after.iter().all(|&x| x == 0));
        drop(region);
        assert!(a.iter().all(|&x| x == 1));
    }

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
        b.truncate(PAGE_SIZE + 1);
        assert_eq!((b.len(), b[PAGE_SIZE]), (PAGE_SIZE + 1, 7));
        b.truncate(usize::MAX);
        assert_eq!(b.len(), PAGE_SIZE + 1);
        assert_eq!(b.into_mapping().as_slice().len(), 4 * PAGE_SIZE);
        let empty = PageBuf::zeroed(0);
        assert!(empty.is_empty());
        let o: OwnedPages = vec![1u8; 5].into();
        assert_eq!(&o[..], &[1u8; 5]);
    }
}
