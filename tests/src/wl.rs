//! Workload side of the test protocol, shared by the programs in `src/bin/`.
//!
//! - [`ready`] prints `READY pid=N <details>` once the workload is set up;
//! - [`catch`] installs an async-signal-safe handler that only sets a flag, and
//!   [`take`] consumes the flag in the main loop (SIGUSR2 = "verify now");
//! - [`say`] writes one line and flushes (stdout is a file, not a terminal);
//! - [`sleep_ms`] sleeps and tolerates EINTR (`std::thread::sleep` resumes with the
//!   remaining time when a signal, or a restore, interrupts `nanosleep`).
//!
//! Test hook: with `CRM_WL_CORRUPT=1` in the environment, a workload damages its own
//! state right before verifying, to prove that its check can print `FAIL`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const NSIG: usize = 65;

static FLAGS: [AtomicBool; NSIG] = [const { AtomicBool::new(false) }; NSIG];

extern "C" fn set_flag(sig: libc::c_int) {
    // Async-signal-safe: one atomic store, no allocation, no locks.
    if let Some(f) = usize::try_from(sig).ok().and_then(|s| FLAGS.get(s)) {
        f.store(true, Ordering::SeqCst);
    }
}

/// Installs a handler for `sig` that sets a flag read by [`take`] (`SA_RESTART`).
pub fn catch(sig: libc::c_int) {
    install(sig, set_flag as *const () as usize, libc::SA_RESTART, &[]);
}

/// Installs `handler` (a `sa_handler` or, with `SA_SIGINFO` in `flags`, a
/// `sa_sigaction`) for `sig`, blocking `mask` while it runs. Exits on failure.
pub fn install(sig: libc::c_int, handler: usize, flags: libc::c_int, mask: &[libc::c_int]) {
    // SAFETY: sigaction is plain old data; all-zero is a valid value to start from.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    // SAFETY: sigemptyset/sigaddset initialise the sigset_t inside `sa`, a live local.
    unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        for &m in mask {
            libc::sigaddset(&mut sa.sa_mask, m);
        }
    }
    // SAFETY: `sa` is fully initialised; `handler` is the address of an `extern "C"`
    // function of the right signature supplied by the caller; old action not wanted.
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        fail_setup(&format!("sigaction({sig})"));
    }
}

/// Whether `sig` arrived since the last call; clears the flag.
pub fn take(sig: libc::c_int) -> bool {
    usize::try_from(sig)
        .ok()
        .and_then(|s| FLAGS.get(s))
        .is_some_and(|f| f.swap(false, Ordering::SeqCst))
}

/// Writes `line` and a newline to stdout and flushes.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // write_all retries on EINTR; errors (a closed log) cannot be reported anywhere.
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Prints `READY pid=<pid> <details>`.
pub fn ready(details: &str) {
    say(&format!("READY pid={} {details}", std::process::id()));
}

/// Prints `PASS <what>` or `FAIL <problems joined by "; ">`.
pub fn verdict(what: &str, problems: &[String]) {
    if problems.is_empty() {
        say(&format!("PASS {what}"));
    } else {
        say(&format!("FAIL {}", problems.join("; ")));
    }
}

/// A fresh private anonymous read-write mapping of `len` bytes, at an
/// address the kernel chooses; exits with a setup failure if there is none.
pub fn map_anon(len: usize) -> *mut u8 {
    // SAFETY: a new private anonymous mapping overlaps nothing we own; the
    // result is checked against MAP_FAILED.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        fail_setup(&format!("mmap of {len} bytes"));
    }
    addr.cast()
}

/// One 8-byte read (eventfd, timerfd): `Ok(value)` or `Err(errno)`.
/// A read-write mapping (`flags`: MAP_SHARED or MAP_PRIVATE) of `len`
/// bytes of `fd` at byte `off`, where the kernel chooses; fails the setup
/// if it cannot be made.
pub fn map_fd(fd: libc::c_int, len: usize, off: usize, flags: libc::c_int) -> *mut u8 {
    // SAFETY: a new mapping where the kernel chooses overlaps nothing we
    // own; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        fail_setup(&format!("mmap of {len} bytes of fd {fd}"));
    }
    p.cast()
}

/// The u64 at byte `off` of `fd` (`pread`; zero if it cannot be read).
pub fn pread_u64(fd: libc::c_int, off: usize) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: reading into a local buffer of 8 bytes.
    unsafe { libc::pread(fd, b.as_mut_ptr().cast(), 8, off as libc::off_t) };
    u64::from_ne_bytes(b)
}

pub fn read_u64(fd: libc::c_int) -> Result<u64, i32> {
    let mut v = [0u8; 8];
    // SAFETY: reading 8 bytes into a local buffer.
    let n = unsafe { libc::read(fd, v.as_mut_ptr() as *mut libc::c_void, 8) };
    if n == 8 {
        Ok(u64::from_ne_bytes(v))
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Sleeps `ms` milliseconds; signals do not shorten the sleep.
pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Whether the `CRM_WL_CORRUPT` test hook is set.
pub fn corrupt_requested() -> bool {
    std::env::var_os("CRM_WL_CORRUPT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The calling thread's TID.
pub fn gettid() -> i32 {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Reports a setup failure on stdout (so it lands in the log) and exits with 2.
pub fn fail_setup(what: &str) -> ! {
    let err = std::io::Error::last_os_error();
    say(&format!("SETUP-ERROR {what}: {err}"));
    std::process::exit(2);
}

/// Queues `sig` with the integer `value` to `pid` (`sigqueue`); a lost
/// signal shows as a missing answer on the other side.
pub fn sigqueue(pid: i32, sig: i32, value: i64) {
    let v = libc::sigval {
        sival_ptr: value as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue takes the value by copy.
    unsafe { libc::sigqueue(pid, sig, v) };
}

/// Blocks `sigs` (to take them with [`wait_value`]); returns their set.
pub fn block(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// One queued signal of `set` (blocked) within `timeout`: its value.
pub fn wait_value(set: &libc::sigset_t, timeout: std::time::Duration) -> Option<i64> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    loop {
        // SAFETY: siginfo_t is plain data; sigtimedwait fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: all pointers are live locals.
        let r = unsafe { libc::sigtimedwait(set, &mut info, &ts) };
        if r > 0 {
            // SAFETY: a queued signal carries a sigval.
            return Some(unsafe { info.si_value().sival_ptr } as usize as i64);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// `fork()`, failing the setup if it fails. Call it while the workload
/// has a single thread.
pub fn fork() -> i32 {
    // SAFETY: the caller forks while single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail_setup("fork");
    }
    pid
}

/// Writes all of `data` to `fd` (blocking, retried on EINTR); `Err` says
/// why not.
pub fn write_all(fd: libc::c_int, data: &[u8]) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: writing from a live slice.
        let n = unsafe {
            libc::write(
                fd,
                data[done..].as_ptr() as *const libc::c_void,
                data.len() - done,
            )
        };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("write to fd {fd}: {e}"));
        }
        done += n as usize;
    }
    Ok(())
}
