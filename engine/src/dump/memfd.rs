//! The contents of the memfds of a dump, stored once per memfd however many
//! descriptors and VMAs of however many tasks refer to it: the first
//! reference met opens the memfd (`/proc/PID/fd/N` or
//! `/proc/PID/map_files/S-E`), and its data (holes skipped with
//! `SEEK_DATA`/`SEEK_HOLE`, zero pages left out) goes to
//! `memfd-pages-INO.img` at its offset in the file; the last partial page is
//! padded with zeros (restore sets the size first). Read while the tree is
//! frozen.
use super::memory::{write_nonzero, MemStats, PAGE};
use super::{DumpError, TaskState};
use crate::image::ImageDir;
use crm_proto::image::{fd_entry, VmaKind};
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};

/// Bytes read per call.
const CHUNK: u64 = 8 << 20;

/// The memfds whose contents a dump stored already.
#[derive(Default)]
pub(super) struct MemfdStore {
    stored: BTreeSet<u64>,
}

impl MemfdStore {
    /// Stores every memfd `state` (one task) refers to that no earlier
    /// task did.
    pub fn store(
        &mut self,
        image: &ImageDir,
        state: &TaskState,
        stats: &mut MemStats,
    ) -> Result<(), DumpError> {
        let pid = state.core.pid;
        let mut refs = Vec::new();
        for f in &state.files.fds {
            if let Some(fd_entry::Kind::Memfd(m)) = &f.kind {
                if let Some(o) = &m.object {
                    refs.push((o.clone(), format!("/proc/{pid}/fd/{}", f.fd)));
                }
            }
        }
        for v in &state.mm.vmas {
            if let (VmaKind::Memfd, Some(o)) = (v.kind(), &v.memfd) {
                let link = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
                refs.push((o.clone(), link));
            }
        }
        for (o, path) in refs {
            if !self.stored.insert(o.ino) {
                continue;
            }
            let io = |what: String| move |source| DumpError::Io { pid, what, source };
            let file = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
            let meta = file.metadata().map_err(io(format!("stat {path}")))?;
            if meta.ino() != o.ino || meta.size() != o.size {
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!(
                        "memfd {:?} (inode {}) changed while it was dumped",
                        o.name, o.ino
                    ),
                });
            }
            let mut pages = image.memfd_pages_writer(o.ino)?;
            copy(&file, o.size, &mut pages, stats)
                .map_err(io(format!("read memfd {:?} through {path}", o.name)))?;
            pages.finish()?;
            tracing::debug!(pid, ino = o.ino, size = o.size, "memfd stored");
        }
        Ok(())
    }
}

/// Copies the data of the first `size` bytes of `file` into `pages`.
fn copy(
    file: &std::fs::File,
    size: u64,
    pages: &mut crate::image::PagesWriter,
    stats: &mut MemStats,
) -> std::io::Result<()> {
    use crate::files::memfd_sys::{seek_data, seek_hole};
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let Some(data) = seek_data(file.as_fd(), off)? else {
            break;
        };
        let start = data / PAGE * PAGE;
        let end = seek_hole(file.as_fd(), data)?.min(size);
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK);
            let padded = len.div_ceil(PAGE) * PAGE;
            let chunk = &mut buf[..padded as usize];
            chunk.fill(0);
            file.read_exact_at(&mut chunk[..len as usize], at)?;
            stats.pages_scanned += padded / PAGE;
            write_nonzero(pages, at, chunk, None, stats, false)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            at += padded;
        }
        off = at.max(end);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Removes the directory on drop, also when the test fails.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn holes_and_zero_pages_skipped_tail_padded() {
        let path = std::env::temp_dir().join(format!("crm-memfd-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let _dir = Dir(path.clone());
        let image = ImageDir::create_scratch(&path).unwrap();
        let name = std::ffi::CString::new("copy").unwrap();
        let file = std::fs::File::from(crate::files::memfd_sys::create(&name, 0).unwrap());
        let size = 5 * PAGE + 100;
        file.set_len(size).unwrap();
        file.write_all_at(b"first", 0).unwrap();
        file.write_all_at(&[0u8; 4096], 2 * PAGE).unwrap(); // data, all zero
        file.write_all_at(b"tail", 5 * PAGE + 10).unwrap();
        let mut w = image.memfd_pages_writer(1).unwrap();
        let mut stats = MemStats::default();
        copy(&file, size, &mut w, &mut stats).unwrap();
        w.finish().unwrap();
        let r = image.memfd_pages_reader(1).unwrap();
        let runs: Vec<(u64, u64)> = r.runs().iter().map(|r| (r.vaddr, r.nr_pages)).collect();
        assert_eq!(runs, vec![(0, 1), (5 * PAGE, 1)]);
        assert_eq!(stats.pages_written, 2);
        let mut page = vec![0u8; PAGE as usize];
        r.read_run_into(&r.runs()[1], &mut page).unwrap();
        assert_eq!(&page[10..14], b"tail");
        assert!(page[100..].iter().all(|&b| b == 0));
    }
}
