//! The embedded restorer blob (built by `engine/build.rs`) and its loader:
//! map it at a chosen address, apply its RELATIVE relocations, make it
//! read+execute.
use std::io;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/restorer_blob.rs"));
}

/// Bytes of address space the blob occupies (page multiple).
pub fn size() -> u64 {
    generated::IMAGE.len() as u64
}

/// Entry point offset.
pub fn entry() -> u64 {
    generated::ENTRY as u64
}

/// Maps the blob at `at` (which must be free).
///
/// Runs in the restoring child: no allocation.
pub fn load(at: u64) -> io::Result<()> {
    let len = size() as usize;
    let p = crate::sys::mmap_fixed_anon(at, len as u64, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    // SAFETY: `p` is a fresh private mapping of `len` bytes, IMAGE is `len`
    // bytes, and they cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(generated::IMAGE.as_ptr(), p, len) };
    for &(off, addend) in generated::RELOCS {
        if off + 8 > len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `off + 8 <= len`: the slot lies inside the mapping we own.
        unsafe { std::ptr::write_unaligned(p.add(off) as *mut u64, at + addend) };
    }
    crate::sys::mprotect(at, len as u64, libc::PROT_READ | libc::PROT_EXEC)
}
