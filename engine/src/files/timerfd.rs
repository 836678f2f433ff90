//! timerfd: saved as its clock, unread expirations, time to the next
//! expiration and interval (from `/proc/PID/fdinfo`); restored with
//! `timerfd_create` + `timerfd_settime` (relative: the time left counts from
//! the restore, whatever the clocks of the new host read) and the unread
//! expirations put back with `TFD_IOC_SET_TICKS`.
//!
//! A periodic timer that expired and was not read since is not running in
//! the kernel (it is re-armed on read): it is restored running with one full
//! interval to go, so its phase may shift by less than one interval.
//! `TFD_TIMER_CANCEL_ON_SET` is not restored.
use super::FilesError;
use crate::procfs::FdInfo;
use crm_proto::image::TimerFd;
use std::os::fd::{FromRawFd, OwnedFd};

/// `_IOW('T', 0, u64)`: set the unread expirations (CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
const NS: u64 = 1_000_000_000;

fn ns((s, n): (u64, u64)) -> u64 {
    s.saturating_mul(NS).saturating_add(n)
}

pub fn dump(pid: i32, fd: i32, info: &FdInfo) -> Result<TimerFd, FilesError> {
    let Some(t) = info.timerfd else {
        return Err(FilesError::Unsupported {
            pid,
            fd,
            kind: "a timerfd",
            target: "its fdinfo lacks the timer's state".into(),
        });
    };
    Ok(TimerFd {
        clockid: t.clockid,
        ticks: t.ticks,
        settime_flags: t.settime_flags,
        value_ns: ns(t.value),
        interval_ns: ns(t.interval),
        flags: info.flags & libc::O_NONBLOCK as u32,
    })
}

/// A new timerfd in the saved state.
pub fn restore(fd: i32, t: &TimerFd) -> Result<OwnedFd, FilesError> {
    let err = |source| FilesError::Create {
        fd,
        kind: "timerfd",
        source,
    };
    let mut flags = libc::TFD_CLOEXEC;
    if t.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::TFD_NONBLOCK;
    }
    // SAFETY: timerfd_create takes a clock id and flags and returns a new fd.
    let raw = unsafe { libc::timerfd_create(t.clockid, flags) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    // Expired periodic timers wait for a read to re-arm: run them again.
    let value = if t.value_ns == 0 && t.ticks > 0 {
        t.interval_ns
    } else {
        t.value_ns
    };
    let spec = |v: u64| libc::timespec {
        tv_sec: (v / NS) as libc::time_t,
        tv_nsec: (v % NS) as libc::c_long,
    };
    let its = libc::itimerspec {
        it_interval: spec(t.interval_ns),
        it_value: spec(value),
    };
    if value != 0 {
        // SAFETY: settime reads one itimerspec from the local and writes
        // nothing (no old value asked for).
        if unsafe { libc::timerfd_settime(raw, 0, &its, std::ptr::null_mut()) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    if t.ticks > 0 {
        let ticks = t.ticks;
        // SAFETY: TFD_IOC_SET_TICKS reads one u64 from the local.
        if unsafe { libc::ioctl(raw, TFD_IOC_SET_TICKS as _, &ticks) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(owned)
}
