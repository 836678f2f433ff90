//! POSIX timers (`timer_create`): which timers a process has comes from
//! `/proc/PID/timers` (ID, signal, sigev value, notification, clock); how
//! long each has left and its interval only from `timer_gettime`, which a
//! process can ask only about its own timers, so it runs as a remote
//! syscall. Restore recreates them with their IDs in the restorer blob.
use super::task::Scratch;
use super::DumpError;
use crate::remote::RemoteThread;
use crm_proto::image::PosixTimer;

/// Most timers a task may have (the restorer blob's table).
pub const MAX_TIMERS: usize = 32;

const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD: i32 = 2;
const SIGEV_THREAD_ID: i32 = 4;

/// Parses `/proc/PID/timers`. Unknown lines are ignored; a block without
/// an `ID:` line or with a malformed value is an error (`Err(line)`).
pub fn parse(text: &str) -> Result<Vec<PosixTimer>, String> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || line.to_string();
        if key == "ID" {
            out.push(PosixTimer {
                id: value.parse().map_err(|_| bad())?,
                ..Default::default()
            });
            continue;
        }
        let Some(t) = out.last_mut() else {
            return Err(bad());
        };
        match key {
            // "signal: 10/00000000deadbeef": signal number / sigev_value.
            "signal" => {
                let (signo, val) = value.split_once('/').ok_or_else(bad)?;
                t.signo = signo.parse().map_err(|_| bad())?;
                t.sigev_value = u64::from_str_radix(val, 16).map_err(|_| bad())?;
            }
            // "notify: signal/pid.123", "signal/tid.124" (SIGEV_THREAD_ID),
            // "none/pid.123".
            "notify" => {
                let (how, who) = value.split_once('/').ok_or_else(bad)?;
                let base = match how {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    "thread" => SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                if let Some(tid) = who.strip_prefix("tid.") {
                    t.notify = base | SIGEV_THREAD_ID;
                    t.notify_tid = tid.parse().map_err(|_| bad())?;
                } else if who.starts_with("pid.") {
                    t.notify = base;
                } else {
                    return Err(bad());
                }
            }
            "ClockID" => t.clock = value.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

/// Reads the timers of the frozen process `pid` and, by remote
/// `timer_gettime` through `main`, their time left and interval.
pub fn dump(
    pid: i32,
    main: &RemoteThread,
    scratch: &Scratch,
) -> Result<Vec<PosixTimer>, DumpError> {
    let path = format!("/proc/{pid}/timers");
    let text = std::fs::read_to_string(&path).map_err(|source| DumpError::Io {
        pid,
        what: format!("read {path}"),
        source,
    })?;
    let mut timers = parse(&text).map_err(|line| DumpError::Unsupported {
        pid,
        what: format!("{path} has a line this version cannot read: {line:?}"),
    })?;
    if timers.len() > MAX_TIMERS {
        return Err(DumpError::Unsupported {
            pid,
            what: format!(
                "it has {} POSIX timers; at most {MAX_TIMERS} are supported",
                timers.len()
            ),
        });
    }
    for t in &mut timers {
        main.syscall(
            libc::SYS_timer_gettime as u64,
            [t.id as u64, scratch.addr, 0, 0, 0, 0],
        )?;
        let its = scratch.read(32)?;
        let word =
            |i: usize| u64::from_ne_bytes(its[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        t.interval_ns = word(0) * 1_000_000_000 + word(1);
        t.value_ns = word(2) * 1_000_000_000 + word(3);
    }
    Ok(timers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_timers() {
        let text = "ID: 7\nsignal: 10/00000000deadbeef\nnotify: signal/pid.15819\nClockID: 1\n\
                    ID: 8\nsignal: 34/0000000000000000\nnotify: signal/tid.15820\nClockID: 0\n\
                    ID: 9\nsignal: 0/0000000000000000\nnotify: none/pid.15819\nClockID: 7\n";
        let t = parse(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            (
                t[0].id,
                t[0].signo,
                t[0].sigev_value,
                t[0].notify,
                t[0].clock
            ),
            (7, 10, 0xdeadbeef, 0, 1)
        );
        assert_eq!(
            (t[1].id, t[1].notify, t[1].notify_tid, t[1].clock),
            (8, 4, 15820, 0)
        );
        assert_eq!((t[2].notify, t[2].clock), (1, 7));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("signal: 1/0\n").is_err(), "no ID first");
        assert!(parse("ID: x\n").is_err());
        assert!(parse("ID: 1\nnotify: carrier-pigeon/pid.1\n").is_err());
    }
}
