//! Shared memory segments: saved once each, whoever attached them: size,
//! key, id, owner, mode, the `SHM_DEST` ("marked for deletion") and
//! `SHM_LOCKED` flags, and the contents, read through the segment's shmem
//! file (`pread` reads holes as zeros without allocating them) into
//! `pages-shm-ID.img` (zero pages left out). Restored by `shmget` with the
//! id, filled through an attachment of the restoring process; the tasks
//! then attach it themselves ([`crate::restore`]).
use super::{create_flags, create_with_id, owner, perm, sys, IpcError, Kind};
use crate::dump::PAGE;
use crate::image::ImageDir;
use crm_proto::image::{IpcCore, IpcShmSegment};
use std::os::unix::fs::FileExt;

/// Largest segment accepted (1 TiB; only its stored pages use memory).
const MAX_SEGMENT: u64 = 1 << 40;
/// Bytes read per `pread`.
const BATCH: usize = 8 << 20;

fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Saves segment `id` (its contents in `image`) into `core`; returns its key.
pub(super) fn dump(image: &ImageDir, id: i32, core: &mut IpcCore) -> Result<i32, IpcError> {
    let st = sys::shm_stat(id).map_err(IpcError::object(Kind::Shm, id, 0, "read it (IPC_STAT)"))?;
    let key = st.perm.key;
    let err = |what: &str| IpcError::object(Kind::Shm, id, key, what.to_string());
    if st.size == 0 || st.size > MAX_SEGMENT {
        return Err(IpcError::Object {
            kind: Kind::Shm,
            id,
            key,
            what: format!("save it: {} bytes (at most {MAX_SEGMENT})", st.size),
            source: std::io::Error::from_raw_os_error(libc::EFBIG),
        });
    }
    let len = page_up(st.size);
    let att = sys::Attached::new(id, len, libc::SHM_RDONLY).map_err(err("attach it read-only"))?;
    let link = format!(
        "/proc/self/map_files/{:x}-{:x}",
        att.addr(),
        att.addr() + len
    );
    let file = std::fs::File::open(&link).map_err(err(&format!("open {link}")))?;
    drop(att);
    let mut pages = image.shm_pages_writer(id)?;
    let mut buf = vec![0u8; BATCH];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(BATCH);
        let chunk = &mut buf[..n];
        let mut got = 0;
        while got < n {
            match file.read_at(&mut chunk[got..], off + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(err(&format!(
                        "read its contents at byte {}",
                        off + got as u64
                    ))(e))
                }
            }
        }
        // Past the end of the segment (its last page): zeros.
        chunk[got..].fill(0);
        for (i, page) in chunk.chunks_exact(PAGE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                pages.add_run(off + i as u64 * PAGE, page)?;
            }
        }
        off += n as u64;
    }
    pages.finish()?;
    core.segments.push(IpcShmSegment {
        perm: Some(perm(&st.perm, id)),
        size: st.size,
    });
    Ok(key)
}

/// Creates segment `s` (its id joins `created` at once) with its contents;
/// returns its id and whether it must be marked for deletion once the
/// tasks attached it.
pub(super) fn restore(
    image: &ImageDir,
    s: &IpcShmSegment,
    created: &mut Vec<(Kind, i32)>,
) -> Result<(i32, bool), IpcError> {
    let p = s.perm.as_ref().ok_or_else(|| IpcError::Invalid {
        what: "a shared memory segment has no ipc_perm".into(),
    })?;
    let (id, key) = (p.id, p.key);
    if s.size == 0 || s.size > MAX_SEGMENT {
        return Err(IpcError::Invalid {
            what: format!("segment {id} is {} bytes (at most {MAX_SEGMENT})", s.size),
        });
    }
    let len = page_up(s.size);
    let pages = image.shm_pages_reader(id)?;
    for r in pages.runs() {
        let end = r
            .nr_pages
            .checked_mul(PAGE)
            .and_then(|l| l.checked_add(r.vaddr));
        if end.is_none_or(|e| e > len) {
            return Err(IpcError::Invalid {
                what: format!(
                    "pages of segment {id} at byte {:#x} ({} pages) lie past its {} bytes",
                    r.vaddr, r.nr_pages, s.size
                ),
            });
        }
    }
    create_with_id(Kind::Shm, p, || sys::shmget(key, s.size, create_flags(p)))?;
    created.push((Kind::Shm, id));
    let err = |what: &str| IpcError::object(Kind::Shm, id, key, what.to_string());
    let mut att = sys::Attached::new(id, len, 0).map_err(err("attach it to fill it"))?;
    let mem = att.bytes_mut();
    for r in pages.runs() {
        // Checked above: inside the page-rounded segment.
        let dst = &mut mem[r.vaddr as usize..(r.vaddr + r.nr_pages * PAGE) as usize];
        pages.read_run_into(r, dst)?;
    }
    drop(att);
    sys::shm_set(id, owner(p)).map_err(err(&format!(
        "set its owner {}:{} and mode {:o} (IPC_SET)",
        p.uid,
        p.gid,
        p.mode & sys::MODE_BITS
    )))?;
    if p.mode & sys::SHM_LOCKED != 0 {
        sys::shm_lock(id).map_err(err("lock it in memory (SHM_LOCK)"))?;
    }
    Ok((id, p.mode & sys::SHM_DEST != 0))
}
