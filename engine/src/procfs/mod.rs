//! Parsers for the `/proc` files the dumper reads: `maps`/`smaps`, `stat`,
//! `status`, `fdinfo`, `auxv`, and the task and fd lists. Every parser takes
//! text and returns typed data or a [`ProcError`] naming the file, so it can be
//! unit-tested on this machine's real files and on crafted input.

mod fdinfo;
mod maps;
mod stat;
mod status;

pub use fdinfo::{FdInfo, InotifyMark};
pub use maps::{parse_maps, same_layout, MapEntry};
pub use stat::Stat;
pub use status::Status;

use std::path::{Path, PathBuf};

/// A `/proc` file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
}

impl ProcError {
    pub(crate) fn parse(path: &Path, what: impl Into<String>) -> Self {
        ProcError::Parse {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    /// The process (or thread) is gone.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProcError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound
            || source.raw_os_error() == Some(libc::ESRCH))
    }
}

pub(crate) fn read_string(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ProcError> {
    std::fs::read(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_link(path: &Path) -> Result<PathBuf, ProcError> {
    std::fs::read_link(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `/proc/PID` (or `/proc/PID/task/TID` when `tid` is given).
pub fn proc_dir(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

pub fn read_stat(pid: i32) -> Result<Stat, ProcError> {
    let path = proc_dir(pid).join("stat");
    Stat::parse(&path, &read_string(&path)?)
}

pub fn read_thread_stat(pid: i32, tid: i32) -> Result<Stat, ProcError> {
    let path = proc_dir(pid).join(format!("task/{tid}/stat"));
    Stat::parse(&path, &read_string(&path)?)
}

pub fn read_status(pid: i32) -> Result<Status, ProcError> {
    let path = proc_dir(pid).join("status");
    Status::parse(&path, &read_string(&path)?)
}

/// VMAs with their `VmFlags` (from `smaps`).
pub fn read_smaps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    let path = proc_dir(pid).join("smaps");
    parse_maps(&path, &read_string(&path)?)
}

/// VMAs without `VmFlags` (from `maps`): cheap, as the kernel does not walk
/// the page tables as it does for `smaps`.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    let path = proc_dir(pid).join("maps");
    parse_maps(&path, &read_string(&path)?)
}

/// VMAs of the calling process, without `VmFlags` (cheap).
pub fn read_self_maps() -> Result<Vec<MapEntry>, ProcError> {
    let path = PathBuf::from("/proc/self/maps");
    parse_maps(&path, &read_string(&path)?)
}

pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo, ProcError> {
    let path = proc_dir(pid).join(format!("fdinfo/{fd}"));
    FdInfo::parse(&path, &read_string(&path)?)
}

pub fn read_comm(pid: i32, tid: i32) -> Result<String, ProcError> {
    let path = proc_dir(pid).join(format!("task/{tid}/comm"));
    Ok(read_string(&path)?.trim_end_matches('\n').to_string())
}

pub fn read_link_of(pid: i32, name: &str) -> Result<PathBuf, ProcError> {
    read_link(&proc_dir(pid).join(name))
}

/// The auxiliary vector as words, up to and including the `AT_NULL` pair.
pub fn read_auxv(pid: i32) -> Result<Vec<u64>, ProcError> {
    let path = proc_dir(pid).join("auxv");
    let bytes = read_bytes(&path)?;
    if bytes.len() % 16 != 0 {
        return Err(ProcError::parse(&path, "length is not a multiple of 16"));
    }
    let mut words = Vec::with_capacity(bytes.len() / 8);
    for pair in bytes.chunks_exact(16) {
        let key = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
        let val = u64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
        words.push(key);
        words.push(val);
        if key == 0 {
            break;
        }
    }
    Ok(words)
}

pub fn read_personality(pid: i32) -> Result<u32, ProcError> {
    let path = proc_dir(pid).join("personality");
    let text = read_string(&path)?;
    u32::from_str_radix(text.trim(), 16).map_err(|e| ProcError::parse(&path, e.to_string()))
}

/// Numeric entries of a `/proc` directory (tasks, fds), sorted.
fn list_numeric(path: &Path) -> Result<Vec<i32>, ProcError> {
    let rd = std::fs::read_dir(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| ProcError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub fn list_tasks(pid: i32) -> Result<Vec<i32>, ProcError> {
    list_numeric(&proc_dir(pid).join("task"))
}

/// The children of every thread of `pid` (`/proc/PID/task/TID/children`),
/// sorted. Threads that vanish while being read are skipped.
pub fn list_children(pid: i32) -> Result<Vec<i32>, ProcError> {
    let mut out = Vec::new();
    for tid in list_tasks(pid)? {
        let path = proc_dir(pid).join(format!("task/{tid}/children"));
        let text = match read_string(&path) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        for w in text.split_whitespace() {
            out.push(
                w.parse()
                    .map_err(|_| ProcError::parse(&path, format!("bad pid {w:?}")))?,
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

pub fn list_fds(pid: i32) -> Result<Vec<i32>, ProcError> {
    list_numeric(&proc_dir(pid).join("fd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let stat = read_stat(me).unwrap();
        assert_eq!(stat.pid, me);
        assert!(stat.start_code < stat.end_code);
        let status = read_status(me).unwrap();
        assert_eq!(status.uids[0], nix::unistd::getuid().as_raw());
        let tasks = list_tasks(me).unwrap();
        assert!(tasks.contains(&me));
        let fds = list_fds(me).unwrap();
        assert!(fds.contains(&0));
        let auxv = read_auxv(me).unwrap();
        assert_eq!(auxv[auxv.len() - 2], 0, "auxv ends with AT_NULL");
        assert!(auxv.chunks(2).any(|p| p[0] == libc::AT_PAGESZ));
        let maps = read_smaps(me).unwrap();
        assert!(maps.iter().any(|m| m.name == "[vdso]"));
        let plain = read_maps(me).unwrap();
        assert!(plain.iter().all(|m| m.vm_flags.is_empty()));
        assert!(plain.iter().any(|m| m.name == "[vdso]"));
        assert!(maps
            .iter()
            .any(|m| m.name == "[stack]" && m.vm_flags.contains(&"gd".to_string())));
        read_personality(me).unwrap();
    }

    #[test]
    fn missing_process_is_not_found() {
        let err = read_stat(i32::MAX).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("/proc/2147483647/stat"));
    }
}
