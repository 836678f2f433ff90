//! Workload `wl_signalfd`: a signalfd with a signal waiting in it.
//!
//! Blocks SIGUSR1 and SIGRTMIN+2, opens fd 42 as a non-blocking signalfd for
//! both, and raises SIGUSR1, which stays pending (the signalfd reports it).
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks that fd 42 is non-blocking,
//! reads SIGUSR1 from it, then reads EAGAIN; queues SIGRTMIN+2 with value 7
//! to itself and reads it back with its value (the mask covers it); then
//! raises SIGUSR1 again for the next check and prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;

const SFD: i32 = 42;

fn rt2() -> i32 {
    libc::SIGRTMIN() + 2
}

/// One read: `Ok((signo, ssi_int))` or `Err(errno)`.
fn read_one() -> Result<(u32, i32), i32> {
    // SAFETY: an all-zero signalfd_siginfo is a valid value.
    let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading one signalfd_siginfo into a local of that size.
    let n = unsafe { libc::read(SFD, &mut si as *mut _ as *mut libc::c_void, size) };
    if n == size as isize {
        Ok((si.ssi_signo, si.ssi_int))
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    // SAFETY: fcntl query on our own descriptor.
    if unsafe { libc::fcntl(SFD, libc::F_GETFL) } & libc::O_NONBLOCK == 0 {
        problems.push(format!("fd {SFD} is not non-blocking"));
    }
    match read_one() {
        Ok((s, _)) if s == libc::SIGUSR1 as u32 => {}
        other => problems.push(format!("fd {SFD} read {other:?}, want the pending SIGUSR1")),
    }
    match read_one() {
        Err(libc::EAGAIN) => {}
        other => problems.push(format!("fd {SFD} read {other:?} when empty, want EAGAIN")),
    }
    // SAFETY: queueing a signal with a value to ourselves.
    let q = unsafe {
        libc::syscall(libc::SYS_rt_sigqueueinfo, libc::getpid(), rt2(), &{
            let mut si: libc::siginfo_t = std::mem::zeroed();
            si.si_signo = rt2();
            si.si_code = -1; // SI_QUEUE
                             // si_value sits after pid and uid in the union.
            let p = (&mut si as *mut libc::siginfo_t as *mut u8).add(24) as *mut i32;
            *p = 7;
            *(&mut si as *mut libc::siginfo_t as *mut u8)
                .add(16)
                .cast::<i32>() = libc::getpid();
            si
        }
            as *const libc::siginfo_t)
    };
    if q != 0 {
        problems.push(format!(
            "rt_sigqueueinfo: {}",
            std::io::Error::last_os_error()
        ));
    } else {
        match read_one() {
            Ok((s, 7)) if s == rt2() as u32 => {}
            other => problems.push(format!(
                "fd {SFD} read {other:?}, want SIGRTMIN+2 ({}) with value 7",
                rt2()
            )),
        }
    }
    // SAFETY: raise a blocked signal: it stays pending for the next check.
    unsafe { libc::raise(libc::SIGUSR1) };
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    // SAFETY: building and applying a signal mask, creating the signalfd
    // and moving it to fd 42.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, rt2());
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK);
        if fd < 0 || libc::dup2(fd, SFD) < 0 {
            wl::fail_setup("signalfd");
        }
        libc::close(fd);
        libc::raise(libc::SIGUSR1);
    }
    wl::ready("signalfd=42");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "signalfd 42: pending SIGUSR1 read, SIGRTMIN+2 with its value, non-blocking",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
