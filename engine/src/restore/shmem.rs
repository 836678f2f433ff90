//! Shared anonymous memory of a restored tree: one shmem object per inode of
//! the image, created and filled once by the coordinator, then mapped by
//! every task whose VMAs map it (at each VMA's offset in the object), so the
//! tasks share it again as they did before the dump.
//!
//! The object is a `MAP_SHARED | MAP_ANONYMOUS` mapping of the coordinator
//! reopened through `/proc/self/map_files/` (which yields the shmem file the
//! tasks then map: `/dev/zero (deleted)`, as the original), filled from the
//! page runs of every VMA of the object (a tree dump stores each part once),
//! and unmapped again; the descriptors live until the restore is over.
use super::tree::TaskPrep;
use super::RestoreError;
use crate::dump::PAGE;
use crate::sys;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

/// Largest shmem object accepted from an image (1 TiB, mapped without
/// reserve: only the stored pages use memory).
const MAX_OBJECT: u64 = 1 << 40;

/// The objects' descriptors, open for as long as this lives.
#[derive(Debug, Default)]
pub(super) struct Objects {
    fds: Vec<OwnedFd>,
}

impl Objects {
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Keeps other objects' descriptors (memfds, ptys) open as long.
    pub fn keep(&mut self, fds: Vec<OwnedFd>) {
        self.fds.extend(fds);
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> RestoreError {
    move |source| RestoreError::Io { what, source }
}

/// Creates and fills every object the plans of `preps` map, and points
/// their premaps at it.
pub(super) fn create(preps: &mut [Option<TaskPrep>]) -> Result<Objects, RestoreError> {
    let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
    for prep in preps.iter().flatten() {
        for p in &prep.plan.premaps {
            if let Some((ino, off)) = p.shmem {
                let end = off.checked_add(p.len).filter(|&e| e <= MAX_OBJECT);
                match end {
                    Some(end) if off % PAGE == 0 => {
                        let size = sizes.entry(ino).or_default();
                        *size = (*size).max(end);
                    }
                    _ => {
                        return Err(RestoreError::InvalidImage {
                            what: format!(
                                "shared memory at {:#x}: offset {off:#x} in its object is not \
                                 page aligned or the object is over {MAX_OBJECT} bytes",
                                p.target
                            ),
                        })
                    }
                }
            }
        }
    }
    let mut objects = Objects::default();
    for (&ino, &size) in &sizes {
        let base = sys::mmap_shared_anon(size).map_err(io(format!(
            "map {size} bytes for shared memory object {ino}"
        )))?;
        let filled = fill(preps, ino, base, size).and_then(|()| {
            let link = format!("/proc/self/map_files/{:x}-{:x}", base, base + size);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&link)
                .map(OwnedFd::from)
                .map_err(io(format!("open {link}")))
        });
        // SAFETY: the mapping was made above; the slices `fill` wrote
        // through are gone.
        let unmapped = unsafe { sys::munmap(base, size) };
        let fd = filled?;
        unmapped.map_err(io(format!("unmap shared memory object {ino}")))?;
        for prep in preps.iter_mut().flatten() {
            for p in prep.plan.premaps.iter_mut() {
                if p.shmem.is_some_and(|(i, _)| i == ino) {
                    p.shm_fd = Some(fd.as_raw_fd());
                }
            }
        }
        tracing::debug!(ino, size, "shared memory object ready");
        objects.fds.push(fd);
    }
    Ok(objects)
}

/// Copies into the object at `base` the stored pages of every VMA mapping it.
fn fill(preps: &[Option<TaskPrep>], ino: u64, base: u64, size: u64) -> Result<(), RestoreError> {
    for prep in preps.iter().flatten() {
        let runs = prep.pages.runs();
        for p in &prep.plan.premaps {
            let Some((i, off)) = p.shmem else { continue };
            if i != ino {
                continue;
            }
            for r in &runs[p.runs.clone()] {
                // The plan checked that the run lies inside this VMA, and
                // `size` covers `off + p.len`.
                let at = off + (r.vaddr - p.target);
                let len = r.nr_pages * PAGE;
                debug_assert!(at + len <= size);
                // SAFETY: `[base + at, +len)` lies inside the read-write
                // mapping made by `create`, referenced by nothing else.
                let dst = unsafe { sys::mapped_slice(base + at, len) };
                prep.pages.read_run_into(r, dst)?;
            }
        }
    }
    Ok(())
}
