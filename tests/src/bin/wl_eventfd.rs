//! Workload `wl_eventfd`: eventfds with counters in them.
//!
//! Sets up fd 40: an eventfd, non-blocking, counter 42 (plus 2^40, beyond what
//! eventfd(2)'s 32-bit initial value holds); fd 41: a blocking semaphore
//! eventfd (EFD_SEMAPHORE), counter 3, close-on-exec.
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks, without blocking:
//! - fd 40 reads 2^40 + 42 at once and then fails with EAGAIN (non-blocking,
//!   emptied);
//! - fd 41 reads 1 (semaphore semantics) three times, is close-on-exec and
//!   blocking (O_NONBLOCK clear), and polls empty after that;
//!
//! then refills both (so a second check after another dump/restore sees the
//! same) and prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;

const COUNTER_FD: i32 = 40;
const SEM_FD: i32 = 41;
const COUNT: u64 = (1 << 40) + 42;
const SEM_COUNT: u64 = 3;

fn create(flags: i32, at: i32, value: u64) {
    // SAFETY: eventfd returns a new fd; dup3 moves it to the chosen number.
    unsafe {
        let fd = libc::eventfd(0, flags);
        if fd < 0 {
            wl::fail_setup("eventfd");
        }
        if libc::dup3(fd, at, flags & libc::EFD_CLOEXEC) < 0 {
            wl::fail_setup("dup3");
        }
        libc::close(fd);
    }
    add(at, value);
}

fn add(fd: i32, value: u64) {
    let v = value.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local buffer.
    if unsafe { libc::write(fd, v.as_ptr() as *const libc::c_void, 8) } != 8 {
        wl::fail_setup("write to the eventfd");
    }
}

fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    match wl::read_u64(COUNTER_FD) {
        Ok(COUNT) => {}
        other => problems.push(format!("fd {COUNTER_FD} read {other:?}, want Ok({COUNT})")),
    }
    match wl::read_u64(COUNTER_FD) {
        Err(libc::EAGAIN) => {}
        other => problems.push(format!(
            "fd {COUNTER_FD} read {other:?} when empty, want EAGAIN (non-blocking)"
        )),
    }
    // SAFETY: fcntl queries on our own descriptor.
    let (fl, fdfl) = unsafe {
        (
            libc::fcntl(SEM_FD, libc::F_GETFL),
            libc::fcntl(SEM_FD, libc::F_GETFD),
        )
    };
    if fl & libc::O_NONBLOCK != 0 {
        problems.push(format!("fd {SEM_FD} became non-blocking"));
    }
    if fdfl & libc::FD_CLOEXEC == 0 {
        problems.push(format!("fd {SEM_FD} lost close-on-exec"));
    }
    for i in 0..SEM_COUNT {
        if !readable(SEM_FD) {
            problems.push(format!(
                "fd {SEM_FD} is empty after {i} reads, want {SEM_COUNT}"
            ));
            break;
        }
        match wl::read_u64(SEM_FD) {
            Ok(1) => {}
            other => problems.push(format!(
                "fd {SEM_FD} read {other:?}, want Ok(1) (semaphore)"
            )),
        }
    }
    if readable(SEM_FD) {
        problems.push(format!(
            "fd {SEM_FD} still readable after {SEM_COUNT} reads"
        ));
    }
    add(COUNTER_FD, COUNT);
    add(SEM_FD, SEM_COUNT);
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    create(libc::EFD_NONBLOCK, COUNTER_FD, COUNT);
    create(libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC, SEM_FD, SEM_COUNT);
    wl::ready("counter_fd=40 semaphore_fd=41");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                &format!("eventfd {COUNTER_FD} held {COUNT} (non-blocking), semaphore {SEM_FD} held {SEM_COUNT}"),
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
