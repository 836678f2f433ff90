//! The memfds and ptys of a restore, made once by the restoring process
//! before it creates any task (so that every task inherits them, as
//! [`super::shmem`] does for shared anonymous memory).
//!
//! Each memfd of the image (met in any task's descriptors or VMAs) is
//! created with its name, sized, filled from `memfd-pages-INO.img` through
//! a shared mapping, given its mode and owner, and only then sealed (a
//! memfd sealed against writes could not be filled afterwards). The ptys
//! are made by [`crate::files::tty::create`]. Their descriptors are moved
//! above every task's image descriptors (`close_from`), so the tasks find
//! them when they map VMAs and reopen descriptors; the blob closes them.
use super::plan::Plan;
use super::RestoreError;
use crate::dump::PAGE;
use crate::files::memfd::check_object;
use crate::image::ImageDir;
use crm_proto::image::{fd_entry, MemfdObject};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::files::memfd_sys as sys;

fn io(what: String) -> impl FnOnce(std::io::Error) -> RestoreError {
    move |source| RestoreError::Io { what, source }
}

/// Makes every memfd and pty the `plans` use, records them in each plan
/// ([`Plan::objects`], the memfd premaps' `shm_fd`), and returns the
/// descriptors to keep open until the restore is over.
pub(super) fn create(
    image: &ImageDir,
    plans: &mut [&mut Plan],
) -> Result<Vec<OwnedFd>, RestoreError> {
    let min_fd = plans.iter().map(|p| p.close_from).max().unwrap_or(3);
    let mut objects: BTreeMap<u64, MemfdObject> = BTreeMap::new();
    let mut ttys = Vec::new();
    for plan in plans.iter() {
        for (_, _, k) in &plan.fds {
            match k {
                fd_entry::Kind::Memfd(m) => {
                    if let Some(o) = &m.object {
                        objects.entry(o.ino).or_insert_with(|| o.clone());
                    }
                }
                fd_entry::Kind::Tty(t) => ttys.push(t.clone()),
                _ => {}
            }
        }
        for p in &plan.premaps {
            if let Some((o, _)) = &p.memfd {
                objects.entry(o.ino).or_insert_with(|| o.clone());
            }
        }
    }
    let mut keep = Vec::new();
    let mut memfds = Vec::new();
    for o in objects.values() {
        check_object(o).map_err(|what| RestoreError::InvalidImage { what })?;
        let fd = make(image, o)?;
        let fd = crate::files::dup_at_least(fd.as_fd(), min_fd)
            .map_err(io(format!("move memfd {:?}", o.name)))?;
        memfds.push((o.ino, fd.as_raw_fd()));
        keep.push(fd);
    }
    let (tty_fds, ptys) = crate::files::tty::create(&ttys, min_fd).map_err(|e| match e {
        crate::files::FilesError::Pty {
            index,
            what,
            source,
        } => RestoreError::Io {
            what: format!("pty {index} of the image: cannot {what}"),
            source,
        },
        other => RestoreError::InvalidImage {
            what: crate::files::chain(&other),
        },
    })?;
    keep.extend(tty_fds);
    for plan in plans.iter_mut() {
        plan.objects = crate::files::Objects {
            memfds: memfds.clone(),
            ptys: ptys.clone(),
        };
        for p in plan.premaps.iter_mut() {
            if let Some((o, _)) = &p.memfd {
                p.shm_fd = memfds.iter().find(|(i, _)| *i == o.ino).map(|(_, f)| *f);
            }
        }
    }
    if !memfds.is_empty() || !ptys.is_empty() {
        tracing::debug!(
            memfds = memfds.len(),
            ptys = ptys.len(),
            "memfds and ptys ready"
        );
    }
    Ok(keep)
}

/// Creates memfd `o` with its contents, mode, owner and seals.
fn make(image: &ImageDir, o: &MemfdObject) -> Result<OwnedFd, RestoreError> {
    let what = |w: &str| format!("{w} of memfd {:?} (inode {})", o.name, o.ino);
    let name = std::ffi::CString::new(o.name.as_str()).map_err(|_| RestoreError::InvalidImage {
        what: what("the name"),
    })?;
    // Say whether it may be executable (`vm.memfd_noexec` may otherwise
    // make it not, or refuse it): F_SEAL_EXEC comes with MFD_NOEXEC_SEAL;
    // otherwise the mode is set below.
    let exec = if o.seals & libc::F_SEAL_EXEC as u32 != 0 {
        sys::MFD_NOEXEC_SEAL
    } else {
        sys::MFD_EXEC
    };
    let fd = sys::create(&name, exec).map_err(io(what("memfd_create")))?;
    let file = std::fs::File::from(fd);
    file.set_len(o.size).map_err(io(what("set the size")))?;
    let pages = image.memfd_pages_reader(o.ino)?;
    if !pages.runs().is_empty() {
        let mapped = o.size.div_ceil(PAGE) * PAGE;
        let mut map = sys::SharedMap::new(file.as_fd(), mapped).map_err(io(what("map")))?;
        for r in pages.runs() {
            let dst = map.slice(r.vaddr, r.nr_pages * PAGE).ok_or_else(|| {
                RestoreError::InvalidImage {
                    what: what(&format!(
                        "page run at offset {:#x} ({} pages) beyond the size",
                        r.vaddr, r.nr_pages
                    )),
                }
            })?;
            pages.read_run_into(r, dst)?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(o.mode & 0o7777))
        .map_err(io(what("set the mode")))?;
    std::os::unix::fs::fchown(&file, Some(o.uid), Some(o.gid))
        .map_err(io(what("set the owner")))?;
    if o.seals != 0 {
        sys::add_seals(file.as_fd(), o.seals).map_err(io(what("add the seals")))?;
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Removes the directory on drop, also when the test fails.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn image(name: &str) -> (Dir, ImageDir) {
        let path = std::env::temp_dir().join(format!("crm-memfd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let image = ImageDir::create_scratch(&path).unwrap();
        (Dir(path), image)
    }

    fn object(size: u64, seals: u32) -> MemfdObject {
        MemfdObject {
            ino: 42,
            name: "unit".into(),
            size,
            seals,
            mode: 0o600,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    #[test]
    fn contents_written_before_the_seals() {
        let (_dir, image) = image("fill");
        let mut w = image.memfd_pages_writer(42).unwrap();
        w.add_run(PAGE, &[7u8; PAGE as usize]).unwrap();
        w.finish().unwrap();
        let seals = (libc::F_SEAL_WRITE | libc::F_SEAL_SEAL) as u32;
        let fd = make(&image, &object(PAGE + 10, seals)).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        assert_eq!(data.len() as u64, PAGE + 10);
        assert!(data[..PAGE as usize].iter().all(|&b| b == 0));
        assert!(data[PAGE as usize..].iter().all(|&b| b == 7));
        assert_eq!(sys::seals(f.as_fd()).unwrap() & seals, seals);
    }

    #[test]
    fn a_run_beyond_the_size_is_refused() {
        let (_dir, image) = image("beyond");
        let mut w = image.memfd_pages_writer(42).unwrap();
        w.add_run(4 * PAGE, &[1u8; PAGE as usize]).unwrap();
        w.finish().unwrap();
        match make(&image, &object(PAGE, 0)) {
            Err(RestoreError::InvalidImage { what }) => assert!(what.contains("beyond"), "{what}"),
            other => panic!("{other:?}"),
        }
    }
}
