//! memfds (`memfd_create`): anonymous files on the kernel's internal tmpfs,
//! shown as `/memfd:NAME (deleted)`. A memfd is an object identified by its
//! inode ([`MemfdObject`]: name, size, seals, mode, owner); every
//! descriptor and VMA of it carries a copy of that description. Its
//! contents are stored once per dump (`dump::memfd`) and the object is
//! created once per restore (`restore::memfd`), before any task: each
//! descriptor is then a new open file description of that object (reopened
//! through `/proc/self/fd`, with the original flags and offset), and each
//! VMA a mapping of it.
use super::memfd_sys;
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::{MemfdFd, MemfdObject};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

/// Largest memfd accepted from an image (mapped without reserve at restore).
pub const MAX_SIZE: u64 = 1 << 40;
/// Longest name `memfd_create` accepts.
pub const MAX_NAME: usize = 249;
/// Every seal the kernel knows.
pub const KNOWN_SEALS: u32 = (libc::F_SEAL_SEAL
    | libc::F_SEAL_SHRINK
    | libc::F_SEAL_GROW
    | libc::F_SEAL_WRITE
    | libc::F_SEAL_FUTURE_WRITE
    | libc::F_SEAL_EXEC) as u32;

/// The name of a memfd from its `/proc` link or map name
/// (`/memfd:NAME (deleted)`), or `None` if it is not one.
pub fn name_of(link: &str) -> Option<&str> {
    let rest = link.strip_prefix("/memfd:")?;
    Some(rest.strip_suffix(" (deleted)").unwrap_or(rest))
}

/// Why a memfd cannot be saved.
#[derive(Debug)]
pub enum ObjectError {
    Io(std::io::Error),
    /// `MFD_HUGETLB`: not supported.
    Hugetlb,
}

/// Describes the memfd behind the magic link `path` (`/proc/PID/fd/N` or
/// `/proc/PID/map_files/S-E`) whose link reads `link`.
pub fn object_at(path: &str, link: &str) -> Result<MemfdObject, ObjectError> {
    let file = std::fs::File::open(path).map_err(ObjectError::Io)?;
    if memfd_sys::is_hugetlb(file.as_fd()).map_err(ObjectError::Io)? {
        return Err(ObjectError::Hugetlb);
    }
    let meta = file.metadata().map_err(ObjectError::Io)?;
    let seals = memfd_sys::seals(file.as_fd()).map_err(ObjectError::Io)?;
    Ok(MemfdObject {
        ino: meta.ino(),
        name: name_of(link).unwrap_or("").to_string(),
        size: meta.size(),
        seals,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// Saves fd `fd` of `pid`, a memfd (`dup_of`: the lower fd of the same
/// open file description, if any).
pub fn dump(
    pid: i32,
    fd: i32,
    link: &str,
    info: &FdInfo,
    dup_of: Option<i32>,
) -> Result<MemfdFd, FilesError> {
    let object = object_at(&format!("/proc/{pid}/fd/{fd}"), link).map_err(|e| match e {
        ObjectError::Io(source) => FilesError::Inspect { pid, fd, source },
        ObjectError::Hugetlb => FilesError::Unsupported {
            pid,
            fd,
            kind: "a hugetlb memfd",
            target: link.to_string(),
        },
    })?;
    Ok(MemfdFd {
        object: Some(object),
        flags: info.flags,
        pos: info.pos,
        dup_of,
    })
}

/// Checks what a restore relies on in an object of the image; `Err` says
/// what is wrong.
pub fn check_object(o: &MemfdObject) -> Result<(), String> {
    if o.size > MAX_SIZE {
        return Err(format!(
            "memfd {} is {} bytes (at most {MAX_SIZE})",
            o.ino, o.size
        ));
    }
    if o.name.len() > MAX_NAME || o.name.contains('\0') {
        return Err(format!("memfd {} has an invalid name", o.ino));
    }
    if o.seals & !KNOWN_SEALS != 0 {
        return Err(format!("memfd {} has unknown seals {:#x}", o.ino, o.seals));
    }
    Ok(())
}

/// Open flags a reopened descriptor keeps (access mode and status flags).
const KEPT_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_LARGEFILE;

/// Recreates fd `fd`: a new open file description of the object `objects`
/// holds for its inode, with the saved flags and offset.
pub fn restore(fd: i32, m: &MemfdFd, objects: &[(u64, RawFd)]) -> Result<OwnedFd, FilesError> {
    let ino = m.object.as_ref().map_or(0, |o| o.ino);
    let path = format!("memfd {ino}");
    let err = |source| FilesError::Reopen {
        fd,
        path: path.clone(),
        source,
    };
    let obj = objects
        .iter()
        .find(|(i, _)| *i == ino)
        .map(|(_, f)| *f)
        .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::ENOENT)))?;
    let link = std::ffi::CString::new(format!("/proc/self/fd/{obj}")).expect("no NUL");
    let flags = (m.flags as i32 & KEPT_FLAGS) | libc::O_CLOEXEC;
    // SAFETY: `link` is NUL-terminated; the result is a new descriptor.
    let n = unsafe { libc::open(link.as_ptr(), flags) };
    if n < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `n` was just opened and nothing else owns it.
    let file = unsafe { OwnedFd::from_raw_fd(n) };
    // SAFETY: lseek on our descriptor, no pointers.
    if unsafe { libc::lseek(n, m.pos as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// A short description for `show`.
pub fn describe(m: &MemfdFd) -> String {
    let o = m.object.clone().unwrap_or_default();
    format!(
        "memfd {:?} (inode {}, {} bytes, seals {:#x}) flags {:#o} pos {}{}",
        o.name,
        o.ino,
        o.size,
        o.seals,
        m.flags,
        m.pos,
        m.dup_of
            .map_or(String::new(), |d| format!(" dup of fd {d}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name_of("/memfd:a b (deleted)"), Some("a b"));
        assert_eq!(name_of("/memfd:x"), Some("x"));
        assert_eq!(name_of("/tmp/memfd:x"), None);
    }

    #[test]
    fn object_of_a_sealed_memfd() {
        let name = std::ffi::CString::new("crm-unit").unwrap();
        let fd = memfd_sys::create(&name, 0).unwrap();
        let mut f = std::fs::File::from(fd);
        std::io::Write::write_all(&mut f, b"hello").unwrap();
        memfd_sys::add_seals(f.as_fd(), (libc::F_SEAL_GROW | libc::F_SEAL_SEAL) as u32).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        let link = std::fs::read_link(&path).unwrap();
        let o = object_at(&path, &link.to_string_lossy()).unwrap();
        assert_eq!(o.name, "crm-unit");
        assert_eq!(o.size, 5);
        assert_eq!(o.seals, (libc::F_SEAL_GROW | libc::F_SEAL_SEAL) as u32);
        assert!(check_object(&o).is_ok());
        let bad = MemfdObject { seals: 0x1000, ..o };
        assert!(check_object(&bad).is_err());
    }
}
