//! `/proc/PID/fdinfo/FD`: position, open flags, mount id.
use super::ProcError;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    /// open(2) flags including O_CLOEXEC (octal in the file).
    pub flags: u32,
    pub mnt_id: u64,
    /// eventfd: the counter (`eventfd-count`, hex).
    pub eventfd_count: Option<u64>,
    /// eventfd: created with `EFD_SEMAPHORE` (`eventfd-semaphore`, Linux 6.7+).
    pub eventfd_semaphore: Option<bool>,
    /// signalfd: the signals it accepts (`sigmask`, hex; bit N-1 = signal N).
    pub signalfd_mask: Option<u64>,
    /// timerfd: present when the `clockid`, `ticks`, `it_value` and
    /// `it_interval` lines all are.
    pub timerfd: Option<TimerFdInfo>,
    /// epoll: one `(fd, events, data)` per watched descriptor (`tfd:` lines).
    pub epoll_targets: Vec<(i32, u32, u64)>,
    /// inotify: one entry per watch (`inotify wd:` lines).
    pub inotify_marks: Vec<InotifyMark>,
    /// File locks held through this descriptor: each `lock:` line's text
    /// after `lock:` (parsed by `files::locks`).
    pub locks: Vec<String>,
}

/// One watch of an inotify instance as fdinfo shows it (all hex there).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InotifyMark {
    pub wd: i32,
    pub ino: u64,
    /// The kernel's `s_dev` of the inode's filesystem (major << 20 | minor).
    pub sdev: u32,
    pub mask: u32,
    /// The file handle (`fhandle-type`, `f_handle` bytes); `None` when the
    /// filesystem gives none.
    pub handle: Option<(i32, Vec<u8>)>,
}

/// Parses the part of an `inotify wd:...` line after `inotify `.
fn inotify_mark(line: &str) -> Option<InotifyMark> {
    let mut m = InotifyMark::default();
    let (mut ty, mut bytes, mut handle) = (None, None, None);
    for tok in line.split_whitespace() {
        let (k, v) = tok.split_once(':')?;
        match k {
            "wd" => m.wd = i32::from_str_radix(v, 16).ok()?,
            "ino" => m.ino = u64::from_str_radix(v, 16).ok()?,
            "sdev" => m.sdev = u32::from_str_radix(v, 16).ok()?,
            "mask" => m.mask = u32::from_str_radix(v, 16).ok()?,
            "fhandle-bytes" => bytes = Some(usize::from_str_radix(v, 16).ok()?),
            "fhandle-type" => ty = Some(i32::from_str_radix(v, 16).ok()?),
            "f_handle" => {
                if v.len() % 2 != 0 || v.len() > 256 {
                    return None;
                }
                let b: Option<Vec<u8>> = (0..v.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(v.get(i..i + 2)?, 16).ok())
                    .collect();
                handle = Some(b?);
            }
            _ => {}
        }
    }
    if let (Some(ty), Some(n), Some(h)) = (ty, bytes, handle) {
        if h.len() != n {
            return None;
        }
        m.handle = Some((ty, h));
    }
    Some(m)
}

/// The state of a timerfd as fdinfo shows it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TimerFdInfo {
    pub clockid: i32,
    /// Expirations not read yet.
    pub ticks: u64,
    /// `TFD_TIMER_*` flags of the last settime.
    pub settime_flags: u32,
    /// Time to the next expiration (0: disarmed, or expired and not re-armed
    /// until read), and the interval, as (seconds, nanoseconds).
    pub value: (u64, u64),
    pub interval: (u64, u64),
}

/// Parses `(S, NS)`.
fn pair(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl FdInfo {
    pub fn parse(path: &Path, text: &str) -> Result<FdInfo, ProcError> {
        let mut info = FdInfo::default();
        let mut seen = 0;
        let mut timer = TimerFdInfo::default();
        let mut timer_seen = 0;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let bad = || ProcError::parse(path, format!("{key}: {value:?}"));
            match key {
                "pos" => (info.pos, seen) = (value.parse().map_err(|_| bad())?, seen | 1),
                "flags" => {
                    info.flags = u32::from_str_radix(value, 8).map_err(|_| bad())?;
                    seen |= 2;
                }
                "mnt_id" => info.mnt_id = value.parse().map_err(|_| bad())?,
                "eventfd-count" => {
                    info.eventfd_count = Some(u64::from_str_radix(value, 16).map_err(|_| bad())?)
                }
                "clockid" => {
                    timer.clockid = value.parse().map_err(|_| bad())?;
                    timer_seen |= 1;
                }
                "ticks" => {
                    timer.ticks = value.parse().map_err(|_| bad())?;
                    timer_seen |= 2;
                }
                "settime flags" => {
                    timer.settime_flags = u32::from_str_radix(value, 8).map_err(|_| bad())?
                }
                "it_value" => {
                    timer.value = pair(value).ok_or_else(bad)?;
                    timer_seen |= 4;
                }
                "it_interval" => {
                    timer.interval = pair(value).ok_or_else(bad)?;
                    timer_seen |= 8;
                }
                "tfd" => {
                    let t: Vec<&str> = value.split_whitespace().collect();
                    match t.as_slice() {
                        [fd, "events:", ev, "data:", data, ..] => info.epoll_targets.push((
                            fd.parse().map_err(|_| bad())?,
                            u32::from_str_radix(ev, 16).map_err(|_| bad())?,
                            u64::from_str_radix(data, 16).map_err(|_| bad())?,
                        )),
                        _ => return Err(bad()),
                    }
                }
                "inotify wd" => {
                    let rest = line.strip_prefix("inotify ").ok_or_else(bad)?;
                    info.inotify_marks.push(inotify_mark(rest).ok_or_else(bad)?);
                }
                "lock" => info.locks.push(value.to_string()),
                "sigmask" => {
                    info.signalfd_mask = Some(u64::from_str_radix(value, 16).map_err(|_| bad())?)
                }
                "eventfd-semaphore" => {
                    info.eventfd_semaphore = Some(match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad()),
                    })
                }
                _ => {}
            }
        }
        if seen != 3 {
            return Err(ProcError::parse(path, "no pos/flags lines"));
        }
        if timer_seen == 15 {
            info.timerfd = Some(timer);
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        let i = FdInfo::parse(
            Path::new("x"),
            "pos:\t4096\nflags:\t02100001\nmnt_id:\t25\nino:\t7\n",
        )
        .unwrap();
        assert_eq!(i.pos, 4096);
        assert_eq!(i.flags, 0o2100001);
        assert_eq!(i.mnt_id, 25);
        assert!(FdInfo::parse(Path::new("x"), "pos:\tx\nflags:\t0\n").is_err());
        assert_eq!(i.eventfd_count, None);
    }

    #[test]
    fn parses_eventfd_fields() {
        let text = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\n\
                    eventfd-count:      1000000002a\neventfd-id: 1\neventfd-semaphore: 1\n";
        let i = FdInfo::parse(Path::new("x"), text).unwrap();
        assert_eq!(i.eventfd_count, Some((1 << 40) + 42));
        assert_eq!(i.eventfd_semaphore, Some(true));
        let sfd = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nsigmask:\t0000000000000300\n";
        let i = FdInfo::parse(Path::new("x"), sfd).unwrap();
        assert_eq!(i.signalfd_mask, Some(0x300));
        let tfd = "pos:\t0\nflags:\t02\nmnt_id:\t17\nclockid: 1\nticks: 3\n\
                   settime flags: 01\nit_value: (0, 49406829)\nit_interval: (1, 0)\n";
        let i = FdInfo::parse(Path::new("x"), tfd).unwrap();
        assert_eq!(
            i.timerfd,
            Some(TimerFdInfo {
                clockid: 1,
                ticks: 3,
                settime_flags: 1,
                value: (0, 49406829),
                interval: (1, 0)
            })
        );
        assert!(FdInfo::parse(Path::new("x"), &tfd.replace("(1, 0)", "(1 0)")).is_err());
        let ep = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
                  tfd:        4 events: 80000019 data:                4  pos:0 ino:40e sdev:10\n\
                  tfd:        3 events:       19 data:         deadbeef  pos:0 ino:40e sdev:10\n";
        let i = FdInfo::parse(Path::new("x"), ep).unwrap();
        assert_eq!(
            i.epoll_targets,
            vec![(4, 0x8000_0019, 4), (3, 0x19, 0xdead_beef)]
        );
        assert!(FdInfo::parse(Path::new("x"), &ep.replace("data:", "dat:")).is_err());
        let ino = "pos:\t0\nflags:\t02004000\nmnt_id:\t16\nino:\t1057\n\
                   inotify wd:2 ino:1a2b sdev:800002 mask:fce ignored_mask:0 fhandle-bytes:8 \
                   fhandle-type:1 f_handle:2b1a000035e0f1c3\n";
        let i = FdInfo::parse(Path::new("x"), ino).unwrap();
        assert_eq!(
            i.inotify_marks,
            vec![InotifyMark {
                wd: 2,
                ino: 0x1a2b,
                sdev: 0x800002,
                mask: 0xfce,
                handle: Some((1, vec![0x2b, 0x1a, 0, 0, 0x35, 0xe0, 0xf1, 0xc3])),
            }]
        );
        assert!(FdInfo::parse(Path::new("x"), &ino.replace("bytes:8", "bytes:9")).is_err());
        assert!(FdInfo::parse(Path::new("x"), &ino.replace("c3\n", "c\n")).is_err());
        let bad = text.replace("semaphore: 1", "semaphore: 2");
        assert!(FdInfo::parse(Path::new("x"), &bad).is_err());
    }
}
