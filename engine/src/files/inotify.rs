//! inotify instances: saved as O_NONBLOCK and their watches (watch
//! descriptor, mask, and the watched path, found from the file handle the
//! kernel shows in fdinfo with `open_by_handle_at` on a mount of the same
//! device). Restored by adding each watch again; to give it its original
//! watch descriptor, a watch is added and removed until the kernel's
//! (cyclic) counter reaches it, and the `IN_IGNORED` events that leaves
//! are drained. Events queued at dump time are lost. Two descriptors of
//! one instance (dup) come back as two instances with the same watches.
use super::{inotify_sys, FilesError};
use crate::procfs::{FdInfo, InotifyMark};
use crm_proto::image::{Inotify, InotifyWatch};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Most watches an image may give one instance.
pub const MAX_WATCHES: usize = 1 << 20;

/// Most add/remove rounds spent reaching a watch descriptor.
const MAX_WD_STEPS: i32 = 1 << 20;

/// Decodes the octal escapes (`\040`) of a mountinfo path.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points of the device `(major, minor)`, from our mountinfo.
fn mounts_of(major: u32, minor: u32) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = format!("{major}:{minor}");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&want.as_str())).then(|| f.get(4).map(|m| unescape(m)))?
        })
        .collect()
}

/// The path of the watched inode, if a mount of its device resolves its
/// handle to a path that still names it.
fn resolve(m: &InotifyMark) -> Option<(String, u64)> {
    let (ty, handle) = m.handle.as_ref()?;
    let (major, minor) = (m.sdev >> 20, m.sdev & 0xfffff);
    for mp in mounts_of(major, minor) {
        let Ok(dir) = std::fs::File::open(&mp) else {
            continue;
        };
        let Ok(f) = inotify_sys::open_by_handle(dir.as_fd(), *ty, handle) else {
            continue;
        };
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        let Ok(path) = std::fs::read_link(&link) else {
            continue;
        };
        let path = path.to_string_lossy().into_owned();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.ino() == m.ino => return Some((path, meta.dev())),
            _ => continue,
        }
    }
    None
}

/// Saves inotify fd `fd` of `pid`.
pub fn dump(pid: i32, fd: i32, info: &FdInfo) -> Result<Inotify, FilesError> {
    let mut watches = Vec::with_capacity(info.inotify_marks.len());
    for m in &info.inotify_marks {
        let (path, dev) = resolve(m).ok_or_else(|| FilesError::Refused {
            pid,
            fd,
            what: format!(
                "an inotify instance whose watch {} is on inode {} of device {}:{}, to which \
                 no path leads any more",
                m.wd,
                m.ino,
                m.sdev >> 20,
                m.sdev & 0xfffff
            ),
        })?;
        watches.push(InotifyWatch {
            wd: m.wd,
            mask: m.mask,
            path,
            ino: m.ino,
            dev,
        });
    }
    watches.sort_by_key(|w| w.wd);
    tracing::debug!(pid, fd, watches = watches.len(), "inotify");
    Ok(Inotify {
        flags: info.flags & libc::O_NONBLOCK as u32,
        watches,
    })
}

/// A new inotify instance with the saved watches at their descriptors.
pub fn restore(fd: i32, ino: &Inotify) -> Result<OwnedFd, FilesError> {
    let err = |what: String| move |source| FilesError::Socket { fd, what, source };
    let inst = inotify_sys::init().map_err(err("create an inotify instance".into()))?;
    let mut watches: Vec<&InotifyWatch> = ino.watches.iter().collect();
    watches.sort_by_key(|w| w.wd);
    let keep = !(libc::IN_MASK_ADD | libc::IN_MASK_CREATE);
    for w in watches {
        let what = format!("watch {} with watch descriptor {}", w.path, w.wd);
        let path = CString::new(w.path.as_str())
            .map_err(|_| err(what.clone())(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let mask = (w.mask & keep) | libc::IN_DONT_FOLLOW;
        let mut steps = 0;
        loop {
            let got =
                inotify_sys::add_watch(inst.as_fd(), &path, mask).map_err(err(what.clone()))?;
            if got == w.wd {
                break;
            }
            steps += 1;
            if got > w.wd || steps > MAX_WD_STEPS {
                return Err(err(what)(io::Error::other(format!(
                    "the kernel hands out watch descriptor {got}"
                ))));
            }
            inotify_sys::rm_watch(inst.as_fd(), got).map_err(err(what.clone()))?;
            if steps % 1024 == 0 {
                inotify_sys::drain(inst.as_fd()).map_err(err(what.clone()))?;
            }
        }
    }
    inotify_sys::drain(inst.as_fd()).map_err(err("drain the inotify instance".into()))?;
    let flags = (ino.flags & libc::O_NONBLOCK as u32) as i32;
    // SAFETY: fcntl with an integer argument on the descriptor we own.
    if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&inst), libc::F_SETFL, flags) } < 0 {
        return Err(err("set its flags".into())(io::Error::last_os_error()));
    }
    Ok(inst)
}

/// One line for `show`.
pub fn describe(ino: &Inotify) -> String {
    let w: Vec<String> = ino
        .watches
        .iter()
        .map(|w| format!("wd {} {} mask {:#x}", w.wd, w.path, w.mask))
        .collect();
    format!(
        "inotify watching {}{}",
        w.join(", "),
        if ino.flags & libc::O_NONBLOCK as u32 != 0 {
            " nonblock"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mount_points() {
        assert_eq!(super::unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(super::unescape(r"/x\04"), r"/x\04");
    }
}
