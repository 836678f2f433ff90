//! Attaching a SysV segment for a restored task, in the restoring child
//! before the blob runs: `shmat` where the kernel likes (outside the restore
//! zone), then `mremap` the wanted part to its premap slot in the zone; the
//! blob moves it to its final address with the other premaps and unmaps the
//! rest of the temporary attachment with everything outside the zone. A
//! moved attachment stays an attachment (`shm_nattch` counts it, `shmdt`
//! at its final address detaches it).
use super::sys;
use std::io;

/// The temporary attachment of the last segment attached, so that the
/// parts of one original attachment (split by `mprotect` or a partial
/// `munmap`) come from one `shmat` again.
#[derive(Debug, Default)]
pub struct Last(Option<(i32, u64, u64)>);

/// What to attach: the part `[pgoff, pgoff + len)` of segment `shmid`,
/// at `at`, with protection `prot`; `orig_base` is where the original
/// attachment started (`target - pgoff`).
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub shmid: i32,
    pub pgoff: u64,
    pub len: u64,
    pub at: u64,
    pub orig_base: u64,
    pub prot: i32,
    pub rdonly: bool,
}

/// Attaches `part` at `part.at` (see the module docs); the temporary
/// attachment must not touch `zone` (`(start, len)`).
pub fn attach(part: Part, zone: (u64, u64), last: &mut Last) -> io::Result<()> {
    let base = match last.0 {
        Some((id, orig, base)) if id == part.shmid && orig == part.orig_base => base,
        _ => {
            let st = sys::shm_stat(part.shmid)?;
            let seg_len = st.size.div_ceil(4096) * 4096;
            if part.pgoff.checked_add(part.len).is_none_or(|e| e > seg_len) {
                return Err(io::Error::other(format!(
                    "bytes {:#x}+{:#x} lie past the segment's {} bytes",
                    part.pgoff, part.len, st.size
                )));
            }
            let mut flags = 0;
            if part.rdonly {
                flags |= libc::SHM_RDONLY;
            }
            if part.prot & libc::PROT_EXEC != 0 {
                flags |= libc::SHM_EXEC;
            }
            // SAFETY: the kernel picks a free address; nothing is replaced.
            let p = unsafe { libc::shmat(part.shmid, std::ptr::null(), flags) };
            if p as isize == -1 {
                return Err(io::Error::last_os_error());
            }
            let base = p as u64;
            if base < zone.0 + zone.1 && zone.0 < base + seg_len {
                return Err(io::Error::other(format!(
                    "the kernel attached it at {base:#x}, inside the restore zone"
                )));
            }
            last.0 = Some((part.shmid, part.orig_base, base));
            base
        }
    };
    // SAFETY: moves part of our own fresh attachment onto the premap slot
    // reserved for it in the zone, where nothing else is mapped.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mremap,
            base + part.pgoff,
            part.len,
            part.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            part.at,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    let attached = if part.rdonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    } | (part.prot & libc::PROT_EXEC);
    if attached != part.prot {
        crate::sys::mprotect(part.at, part.len, part.prot)?;
    }
    Ok(())
}
