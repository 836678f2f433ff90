//! Workload `wl_signals`: signal handlers, blocked pending signals and an interval timer.
//!
//! Sets up:
//! - a SIGUSR1 handler (`SA_RESTART | SA_NODEFER`, SIGWINCH in its mask) counting
//!   invocations; SIGUSR1 is raised once at startup;
//! - SIGRTMIN+4 and SIGRTMIN+5 blocked, with `SA_SIGINFO` handlers recording the
//!   siginfo; SIGRTMIN+4 is queued to the process with `sigqueue` (value 0x4242: a
//!   process-wide pending signal), SIGRTMIN+5 to the main thread with `tgkill` (a
//!   thread-pending signal), so both stay pending;
//! - ITIMER_REAL with a 50 ms interval; its SIGALRM handler counts ticks.
//!
//! Protocol: `READY pid=N usr1=1 pending=rt4,rt5 itimer_us=50000`; on SIGUSR2 checks,
//! in order: the blocked mask; that both RT signals are pending (sigpending) and their
//! handlers have not run early; the itimer's interval (50 ms) and remaining value; that
//! ticks keep coming (over 300 ms); that raising SIGUSR1 runs its handler exactly once;
//! that the sigactions are the installed ones; then unblocks the RT signals and checks
//! each handler ran once with the right signal, si_code and (for rt4) value. It queues
//! both signals again before printing `PASS ...` or `FAIL ...`, so it can be verified
//! again. Hook: `CRM_WL_CORRUPT=1` consumes the pending SIGRTMIN+4 first.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crm_tests::wl;

const INTERVAL_US: i64 = 50_000;
const RT4_VALUE: usize = 0x4242;

static USR1: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static RT4_COUNT: AtomicU64 = AtomicU64::new(0);
static RT4_CODE: AtomicI32 = AtomicI32::new(0);
static RT4_VAL: AtomicU64 = AtomicU64::new(0);
static RT5_COUNT: AtomicU64 = AtomicU64::new(0);
static RT5_CODE: AtomicI32 = AtomicI32::new(0);

// All handlers only touch atomics: async-signal-safe.
extern "C" fn on_usr1(_sig: libc::c_int) {
    USR1.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_alrm(_sig: libc::c_int) {
    TICKS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_rt(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t for the duration of
    // the handler; si_value is meaningful for SI_QUEUE and harmless to read otherwise.
    let (code, value) = unsafe { ((*info).si_code, (*info).si_value().sival_ptr as u64) };
    if sig == rt(4) {
        RT4_CODE.store(code, Ordering::SeqCst);
        RT4_VAL.store(value, Ordering::SeqCst);
        RT4_COUNT.fetch_add(1, Ordering::SeqCst);
    } else if sig == rt(5) {
        RT5_CODE.store(code, Ordering::SeqCst);
        RT5_COUNT.fetch_add(1, Ordering::SeqCst);
    }
}

fn rt(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live local sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

fn has(set: &libc::sigset_t, sig: i32) -> bool {
    // SAFETY: `set` is an initialised sigset_t.
    unsafe { libc::sigismember(set, sig) == 1 }
}

fn mask(how: i32, sigs: &[i32]) -> libc::sigset_t {
    let set = sigset(sigs);
    let mut old = sigset(&[]);
    // SAFETY: both pointers refer to initialised sigset_t locals. Single-threaded, so
    // sigprocmask is the thread mask.
    unsafe { libc::sigprocmask(how, &set, &mut old) };
    old
}

fn pending() -> libc::sigset_t {
    let mut set = sigset(&[]);
    // SAFETY: `set` is a live sigset_t the kernel fills in.
    unsafe { libc::sigpending(&mut set) };
    set
}

/// Queues SIGRTMIN+4 to the process (with a value) and SIGRTMIN+5 to this thread.
fn queue_rt() {
    let value = libc::sigval {
        sival_ptr: RT4_VALUE as *mut libc::c_void,
    };
    // SAFETY: sigqueue/tgkill take plain integers and a sigval by value; the
    // signals are blocked, so no handler runs here.
    let rc = unsafe {
        libc::sigqueue(libc::getpid(), rt(4), value)
            | libc::syscall(libc::SYS_tgkill, libc::getpid(), wl::gettid(), rt(5)) as i32
    };
    if rc != 0 {
        wl::fail_setup("queueing RT signals");
    }
}

fn raise(sig: i32) {
    // SAFETY: raise(3) delivers `sig` to this thread; its handler is installed.
    unsafe { libc::raise(sig) };
}

fn sigaction_of(sig: i32) -> libc::sigaction {
    // SAFETY: sigaction is plain data, zero is a valid initial value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `old` is a live local.
    unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    old
}

const FLAG_MASK: i32 = libc::SA_SIGINFO
    | libc::SA_RESTART
    | libc::SA_NODEFER
    | libc::SA_RESETHAND
    | libc::SA_ONSTACK
    | libc::SA_NOCLDSTOP;

struct Expect {
    usr1: u64,
    rt_delivered: u64,
}

fn verify(exp: &mut Expect, problems: &mut Vec<String>) -> String {
    let (r4, r5) = (rt(4), rt(5));
    // 1. Blocked mask.
    let blocked = mask(libc::SIG_BLOCK, &[]);
    for (name, sig, want) in [
        ("SIGRTMIN+4", r4, true),
        ("SIGRTMIN+5", r5, true),
        ("SIGUSR1", libc::SIGUSR1, false),
        ("SIGALRM", libc::SIGALRM, false),
    ] {
        if has(&blocked, sig) != want {
            problems.push(format!(
                "{name} is {}blocked",
                if want { "not " } else { "" }
            ));
        }
    }
    // 2. Pending signals, handlers not run early.
    let pend = pending();
    for (name, sig) in [
        ("SIGRTMIN+4 (process-pending)", r4),
        ("SIGRTMIN+5 (thread-pending)", r5),
    ] {
        if !has(&pend, sig) {
            problems.push(format!("{name} is not pending"));
        }
    }
    let (c4, c5) = (
        RT4_COUNT.load(Ordering::SeqCst),
        RT5_COUNT.load(Ordering::SeqCst),
    );
    if c4 != exp.rt_delivered || c5 != exp.rt_delivered {
        problems.push(format!(
            "RT handlers ran while blocked: rt4 {c4} rt5 {c5} times, expected {}",
            exp.rt_delivered
        ));
    }
    // 3. Interval timer.
    // SAFETY: itimerval is plain data; getitimer fills the live local.
    let mut it: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: `it` is a live local.
    unsafe { libc::getitimer(libc::ITIMER_REAL, &mut it) };
    let interval = it.it_interval.tv_sec * 1_000_000 + it.it_interval.tv_usec;
    let value = it.it_value.tv_sec * 1_000_000 + it.it_value.tv_usec;
    if interval != INTERVAL_US {
        problems.push(format!(
            "ITIMER_REAL interval {interval} us, expected {INTERVAL_US}"
        ));
    }
    if value <= 0 || value > INTERVAL_US {
        problems.push(format!(
            "ITIMER_REAL value {value} us, expected 1..={INTERVAL_US}"
        ));
    }
    // 4. Ticks keep coming.
    let t0 = TICKS.load(Ordering::SeqCst);
    wl::sleep_ms(300);
    let t1 = TICKS.load(Ordering::SeqCst);
    if t1 < t0 + 2 {
        problems.push(format!(
            "SIGALRM ticks {t0} -> {t1} in 300 ms, expected ~6 more"
        ));
    }
    // 5. SIGUSR1 handler.
    let u0 = USR1.load(Ordering::SeqCst);
    if u0 != exp.usr1 {
        problems.push(format!("SIGUSR1 handler count {u0}, expected {}", exp.usr1));
    }
    raise(libc::SIGUSR1);
    let u1 = USR1.load(Ordering::SeqCst);
    if u1 != u0 + 1 {
        problems.push(format!("raising SIGUSR1 moved its count {u0} -> {u1}"));
    }
    exp.usr1 = u1;
    // 6. Sigactions.
    let checks: [(&str, i32, usize, i32, &[i32]); 4] = [
        (
            "SIGUSR1",
            libc::SIGUSR1,
            on_usr1 as *const () as usize,
            libc::SA_RESTART | libc::SA_NODEFER,
            &[libc::SIGWINCH],
        ),
        (
            "SIGALRM",
            libc::SIGALRM,
            on_alrm as *const () as usize,
            libc::SA_RESTART,
            &[],
        ),
        (
            "SIGRTMIN+4",
            r4,
            on_rt as *const () as usize,
            libc::SA_SIGINFO,
            &[],
        ),
        (
            "SIGRTMIN+5",
            r5,
            on_rt as *const () as usize,
            libc::SA_SIGINFO,
            &[],
        ),
    ];
    for (name, sig, handler, flags, sa_mask) in checks {
        let sa = sigaction_of(sig);
        if sa.sa_sigaction != handler {
            problems.push(format!(
                "{name} handler {:#x}, expected {handler:#x}",
                sa.sa_sigaction
            ));
        }
        if sa.sa_flags & FLAG_MASK != flags {
            problems.push(format!(
                "{name} sa_flags {:#x}, expected {flags:#x}",
                sa.sa_flags & FLAG_MASK
            ));
        }
        for &m in sa_mask {
            if !has(&sa.sa_mask, m) {
                problems.push(format!("{name} sa_mask lacks signal {m}"));
            }
        }
    }
    // 7. Unblock: both handlers run before sigprocmask returns.
    mask(libc::SIG_UNBLOCK, &[r4, r5]);
    exp.rt_delivered += 1;
    let (c4, c5) = (
        RT4_COUNT.load(Ordering::SeqCst),
        RT5_COUNT.load(Ordering::SeqCst),
    );
    if c4 != exp.rt_delivered {
        problems.push(format!(
            "after unblocking, SIGRTMIN+4 handler ran {c4} times, expected {}",
            exp.rt_delivered
        ));
    }
    if c5 != exp.rt_delivered {
        problems.push(format!(
            "after unblocking, SIGRTMIN+5 handler ran {c5} times, expected {}",
            exp.rt_delivered
        ));
    }
    let (code4, val4, code5) = (
        RT4_CODE.load(Ordering::SeqCst),
        RT4_VAL.load(Ordering::SeqCst),
        RT5_CODE.load(Ordering::SeqCst),
    );
    if code4 != libc::SI_QUEUE || val4 != RT4_VALUE as u64 {
        problems.push(format!(
            "SIGRTMIN+4 siginfo: si_code {code4} value {val4:#x}, expected SI_QUEUE ({}) value {RT4_VALUE:#x}",
            libc::SI_QUEUE
        ));
    }
    if code5 != libc::SI_TKILL {
        problems.push(format!(
            "SIGRTMIN+5 siginfo: si_code {code5}, expected SI_TKILL ({})",
            libc::SI_TKILL
        ));
    }
    // 8. Re-arm for the next verification.
    mask(libc::SIG_BLOCK, &[r4, r5]);
    queue_rt();
    format!(
        "mask ok, rt4 (process) and rt5 (thread) were pending and delivered once with \
         si_code {code4}/{code5} value {val4:#x}, itimer interval {interval} us value {value} us, \
         ticks {t0} -> {t1}, usr1 {u0} -> {u1}, sigactions intact"
    )
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();
    wl::install(
        libc::SIGUSR1,
        on_usr1 as *const () as usize,
        libc::SA_RESTART | libc::SA_NODEFER,
        &[libc::SIGWINCH],
    );
    wl::install(
        libc::SIGALRM,
        on_alrm as *const () as usize,
        libc::SA_RESTART,
        &[],
    );
    for n in [4, 5] {
        wl::install(rt(n), on_rt as *const () as usize, libc::SA_SIGINFO, &[]);
    }
    raise(libc::SIGUSR1);
    mask(libc::SIG_BLOCK, &[rt(4), rt(5)]);
    queue_rt();
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: INTERVAL_US,
    };
    let it = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: `it` is a valid itimerval; the old value is not wanted.
    if unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) } != 0 {
        wl::fail_setup("setitimer");
    }
    let mut exp = Expect {
        usr1: USR1.load(Ordering::SeqCst),
        rt_delivered: 0,
    };
    wl::ready(&format!(
        "usr1={} pending=rt4,rt5 itimer_us={INTERVAL_US}",
        exp.usr1
    ));
    loop {
        if wl::take(libc::SIGUSR2) {
            if corrupt {
                // Consume the pending SIGRTMIN+4 without running its handler.
                let set = sigset(&[rt(4)]);
                let mut sig = 0;
                // SAFETY: `set` is initialised and rt(4) is pending, so sigwait returns
                // at once, writing into the live local `sig`.
                unsafe { libc::sigwait(&set, &mut sig) };
            }
            let mut problems = Vec::new();
            let what = verify(&mut exp, &mut problems);
            wl::verdict(&what, &problems);
        }
        wl::sleep_ms(10);
    }
}
