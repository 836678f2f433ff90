//! Regular files, directories and reopenable character devices (`/dev/null`):
//! saved as path, open flags and offset; restored by opening the path again
//! and seeking.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::{FileId, RegularFile};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub fn file_id(path: &str, meta: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_string(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

pub fn dump(path: &str, meta: &std::fs::Metadata, info: &FdInfo) -> RegularFile {
    RegularFile {
        file: Some(file_id(path, meta)),
        flags: info.flags & !(libc::O_CLOEXEC as u32),
        pos: info.pos,
    }
}

/// Opens the file again with its original flags and offset. Flags that
/// would change the file (O_CREAT, O_EXCL, O_TRUNC) are dropped.
pub fn restore(fd: i32, reg: &RegularFile) -> Result<OwnedFd, FilesError> {
    let path = reg.file.as_ref().map(|f| f.path.as_str()).unwrap_or("");
    let err = |source| FilesError::Reopen {
        fd,
        path: path.to_string(),
        source,
    };
    let cpath =
        CString::new(path).map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let flags =
        (reg.flags as i32) & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) | libc::O_NOCTTY;
    // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
    let raw = unsafe { libc::open(cpath.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    if reg.pos != 0 {
        // SAFETY: lseek on a descriptor we own.
        let r = unsafe { libc::lseek(raw, reg.pos as libc::off_t, libc::SEEK_SET) };
        if r < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(owned)
}
