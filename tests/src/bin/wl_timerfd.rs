//! Workload `wl_timerfd`: timerfds in three states.
//!
//! - fd 43: periodic CLOCK_MONOTONIC timer, every 100 ms, never read (its
//!   expirations pile up);
//! - fd 44: one-shot CLOCK_MONOTONIC timer due in one hour;
//! - fd 45: non-blocking one-shot CLOCK_REALTIME timer that has expired once
//!   and was not read.
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks: fd 45 reads 1 and then EAGAIN;
//! fd 44 has between 50 and 60 minutes left and no interval; fd 43 has a
//! 100 ms interval and reads at least one expiration within a second. Then
//! re-arms fd 45 (1 ms, waits for it to expire) for the next check and
//! prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;

const PERIODIC: i32 = 43;
const HOUR: i32 = 44;
const EXPIRED: i32 = 45;

fn ts(s: i64, ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    }
}

fn create(clock: i32, flags: i32, at: i32, value: libc::timespec, interval: libc::timespec) {
    // SAFETY: timerfd_create returns a new fd, dup2 moves it, settime reads
    // one local itimerspec.
    unsafe {
        let fd = libc::timerfd_create(clock, flags);
        if fd < 0 || libc::dup2(fd, at) < 0 {
            wl::fail_setup("timerfd_create");
        }
        libc::close(fd);
    }
    arm(at, value, interval);
}

fn arm(fd: i32, value: libc::timespec, interval: libc::timespec) {
    let its = libc::itimerspec {
        it_interval: interval,
        it_value: value,
    };
    // SAFETY: settime reads one local itimerspec.
    if unsafe { libc::timerfd_settime(fd, 0, &its, std::ptr::null_mut()) } != 0 {
        wl::fail_setup("timerfd_settime");
    }
}

fn gettime(fd: i32) -> libc::itimerspec {
    // SAFETY: an all-zero itimerspec is valid; gettime fills it.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: gettime writes one itimerspec into the local.
    unsafe { libc::timerfd_gettime(fd, &mut its) };
    its
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    match wl::read_u64(EXPIRED) {
        Ok(1) => {}
        other => problems.push(format!("fd {EXPIRED} read {other:?}, want Ok(1)")),
    }
    match wl::read_u64(EXPIRED) {
        Err(libc::EAGAIN) => {}
        other => problems.push(format!("fd {EXPIRED} read {other:?}, want EAGAIN")),
    }
    let h = gettime(HOUR);
    if !(3000..=3600).contains(&h.it_value.tv_sec) || h.it_interval.tv_sec != 0 {
        problems.push(format!(
            "fd {HOUR} has {}s left, interval {}s; want 3000-3600 s and none",
            h.it_value.tv_sec, h.it_interval.tv_sec
        ));
    }
    let p = gettime(PERIODIC);
    if p.it_interval.tv_sec != 0 || p.it_interval.tv_nsec != 100_000_000 {
        problems.push(format!(
            "fd {PERIODIC} interval {}.{:09}s, want 0.1 s",
            p.it_interval.tv_sec, p.it_interval.tv_nsec
        ));
    }
    let mut pfd = libc::pollfd {
        fd: PERIODIC,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor for up to a second.
    if unsafe { libc::poll(&mut pfd, 1, 1000) } != 1 {
        problems.push(format!("fd {PERIODIC} did not expire within a second"));
    } else {
        match wl::read_u64(PERIODIC) {
            Ok(n) if n >= 1 => {}
            other => problems.push(format!("fd {PERIODIC} read {other:?}")),
        }
    }
    arm(EXPIRED, ts(0, 1_000_000), ts(0, 0));
    wl::sleep_ms(20);
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    create(
        libc::CLOCK_MONOTONIC,
        0,
        PERIODIC,
        ts(0, 100_000_000),
        ts(0, 100_000_000),
    );
    create(libc::CLOCK_MONOTONIC, 0, HOUR, ts(3600, 0), ts(0, 0));
    create(
        libc::CLOCK_REALTIME,
        libc::TFD_NONBLOCK,
        EXPIRED,
        ts(0, 1_000_000),
        ts(0, 0),
    );
    wl::sleep_ms(20);
    wl::ready("periodic=43 hour=44 expired=45");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "timerfds: expired one-shot read once, hour timer running, 100 ms periodic ticking",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
