//! Workload `wl_posix_timers`: POSIX timers (timer_create) with gaps in
//! their IDs.
//!
//! Creates four timers with the raw syscall (kernel IDs 0..3), deletes ID 2,
//! and keeps:
//! - ID 0: CLOCK_MONOTONIC, SIGEV_SIGNAL SIGUSR1 with value 0xfeed, every
//!   20 ms (a handler counts the ticks and checks si_value);
//! - ID 1: CLOCK_REALTIME, SIGEV_NONE, one shot in one hour;
//! - ID 3: CLOCK_MONOTONIC, SIGEV_THREAD_ID (SIGRTMIN+1 to the main thread),
//!   disarmed.
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks: `/proc/self/timers` lists
//! exactly IDs 0, 1 and 3 with their clocks and notifications; ID 0 still
//! ticks (more ticks 100 ms later, never a wrong si_value); ID 1 has between
//! 50 minutes and its previous time left; ID 3 is disarmed; then prints
//! `PASS ...` or `FAIL ...`.

use crm_tests::wl;
use std::sync::atomic::{AtomicU64, Ordering};

const TICK_VALUE: u64 = 0xfeed;
static TICKS: AtomicU64 = AtomicU64::new(0);
static BAD_VALUES: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_tick(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let value = unsafe { (*info).si_value().sival_ptr } as u64;
    if value == TICK_VALUE {
        TICKS.fetch_add(1, Ordering::SeqCst);
    } else {
        BAD_VALUES.fetch_add(1, Ordering::SeqCst);
    }
}

/// The kernel's `struct sigevent`.
#[repr(C)]
struct Sigevent {
    value: u64,
    signo: i32,
    notify: i32,
    tid: i32,
    pad: [i32; 11],
}

fn create(clock: i32, signo: i32, notify: i32, value: u64) -> i32 {
    let sev = Sigevent {
        value,
        signo,
        notify,
        // SAFETY: gettid has no preconditions.
        tid: unsafe { libc::syscall(libc::SYS_gettid) } as i32,
        pad: [0; 11],
    };
    let mut id: i32 = -1;
    // SAFETY: `sev` and `id` are live locals of the kernel's layouts.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            &sev as *const Sigevent,
            &mut id as *mut i32,
        )
    };
    if r != 0 {
        wl::fail_setup("timer_create");
    }
    id
}

fn settime(id: i32, interval_ns: u64, value_ns: u64) {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let its = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: `its` is a live itimerspec; no old value wanted.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &its as *const libc::itimerspec,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    };
    if r != 0 {
        wl::fail_setup("timer_settime");
    }
}

/// Time left on timer `id`, in ns (0: disarmed), or None if it is gone.
fn left_ns(id: i32) -> Option<u64> {
    // SAFETY: all-zero is a valid itimerspec.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: `its` is a live out value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_gettime,
            id,
            &mut its as *mut libc::itimerspec,
        )
    };
    (r == 0).then(|| its.it_value.tv_sec as u64 * 1_000_000_000 + its.it_value.tv_nsec as u64)
}

fn check(last_left: &mut u64) -> Vec<String> {
    let mut problems = Vec::new();
    let listed = std::fs::read_to_string("/proc/self/timers").unwrap_or_default();
    let ids: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("ID: "))
        .collect();
    if ids != ["0", "1", "3"] && ids != ["3", "1", "0"] {
        let mut sorted = ids.clone();
        sorted.sort();
        if sorted != ["0", "1", "3"] {
            problems.push(format!("/proc/self/timers lists IDs {ids:?}, want 0, 1, 3"));
        }
    }
    for want in [
        "ClockID: 1",
        "ClockID: 0",
        "signal: 10/000000000000feed",
        "notify: signal/tid.",
        "notify: none/pid.",
    ] {
        if !listed.contains(want) {
            problems.push(format!("/proc/self/timers lacks {want:?}:\n{listed}"));
        }
    }
    let before = TICKS.load(Ordering::SeqCst);
    wl::sleep_ms(100);
    let after = TICKS.load(Ordering::SeqCst);
    if after <= before {
        problems.push(format!(
            "timer 0 stopped ticking ({before} ticks, then {after})"
        ));
    }
    let bad = BAD_VALUES.load(Ordering::SeqCst);
    if bad != 0 {
        problems.push(format!("{bad} ticks carried a wrong si_value"));
    }
    match left_ns(1) {
        Some(ns) if ns > 50 * 60 * 1_000_000_000 && ns <= *last_left => *last_left = ns,
        other => problems.push(format!(
            "timer 1 has {other:?} ns left, want between 50 min and {} ns",
            *last_left
        )),
    }
    match left_ns(3) {
        Some(0) => {}
        other => problems.push(format!(
            "timer 3 has {other:?} ns left, want Some(0) (disarmed)"
        )),
    }
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    wl::install(
        libc::SIGUSR1,
        on_tick as *const () as usize,
        libc::SA_SIGINFO | libc::SA_RESTART,
        &[],
    );
    let a = create(
        libc::CLOCK_MONOTONIC,
        libc::SIGUSR1,
        libc::SIGEV_SIGNAL,
        TICK_VALUE,
    );
    let b = create(libc::CLOCK_REALTIME, 0, libc::SIGEV_NONE, 0);
    let gap = create(libc::CLOCK_MONOTONIC, 0, libc::SIGEV_NONE, 0);
    let c = create(
        libc::CLOCK_MONOTONIC,
        libc::SIGRTMIN() + 1,
        libc::SIGEV_THREAD_ID,
        0,
    );
    if (a, b, gap, c) != (0, 1, 2, 3) {
        wl::fail_setup(&format!("timer IDs {a} {b} {gap} {c}, want 0 1 2 3"));
    }
    // SAFETY: deleting a timer we created.
    unsafe { libc::syscall(libc::SYS_timer_delete, gap) };
    settime(a, 20_000_000, 20_000_000);
    settime(b, 0, 3600 * 1_000_000_000);
    let mut last_left = u64::MAX;
    wl::ready("timers=0,1,3");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check(&mut last_left);
            wl::verdict(
                "POSIX timers 0 (ticking, si_value kept), 1 (SIGEV_NONE, 1 h one-shot), 3 (thread, disarmed); ID 2 a gap",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
