//! Workload `wl_epoll`: an epoll instance watching two eventfds.
//!
//! fd 52 is an epoll instance watching eventfd 50 (EPOLLIN, data 0xdead)
//! and eventfd 51 (EPOLLIN | EPOLLET, data 7).
//!
//! Protocol: `READY pid=N`; on SIGUSR2: nothing is ready; after a write to
//! fd 51 exactly one event with data 7 is reported, and (edge-triggered) not
//! again on the next wait; after a write to fd 50 exactly one event with
//! data 0xdead is reported, and (level-triggered) again until the eventfd is
//! read. Both eventfds are emptied at the end. Prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;

const EV_LEVEL: i32 = 50;
const EV_EDGE: i32 = 51;
const EPOLL: i32 = 52;

fn moved(fd: i32, at: i32) {
    // SAFETY: dup2 onto a chosen number and closing the original.
    unsafe {
        if fd < 0 || libc::dup2(fd, at) < 0 {
            wl::fail_setup("creating a descriptor");
        }
        libc::close(fd);
    }
}

fn add(fd: i32, events: u32, data: u64) {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads one local epoll_event.
    if unsafe { libc::epoll_ctl(EPOLL, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        wl::fail_setup("epoll_ctl");
    }
}

/// Data of the events ready now.
fn ready() -> Vec<u64> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: epoll_wait writes at most 8 events into the local array.
    let n = unsafe { libc::epoll_wait(EPOLL, evs.as_mut_ptr(), 8, 0) };
    evs[..n.max(0) as usize].iter().map(|e| e.u64).collect()
}

fn poke(fd: i32) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local.
    unsafe { libc::write(fd, one.as_ptr() as *const libc::c_void, 8) };
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |what: &str, want: Vec<u64>| {
        let got = ready();
        if got != want {
            problems.push(format!("{what}: ready {got:x?}, want {want:x?}"));
        }
    };
    expect("idle", vec![]);
    poke(EV_EDGE);
    expect("after a write to fd 51", vec![7]);
    expect("fd 51 again (edge-triggered)", vec![]);
    poke(EV_LEVEL);
    expect("after a write to fd 50", vec![0xdead]);
    expect("fd 50 again (level-triggered)", vec![0xdead]);
    let _ = wl::read_u64(EV_LEVEL);
    let _ = wl::read_u64(EV_EDGE);
    expect("after reading both", vec![]);
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    // SAFETY: creating eventfds and an epoll instance.
    unsafe {
        moved(libc::eventfd(0, libc::EFD_NONBLOCK), EV_LEVEL);
        moved(libc::eventfd(0, libc::EFD_NONBLOCK), EV_EDGE);
        moved(libc::epoll_create1(0), EPOLL);
    }
    add(EV_LEVEL, libc::EPOLLIN as u32, 0xdead);
    add(EV_EDGE, (libc::EPOLLIN | libc::EPOLLET) as u32, 7);
    wl::ready("epoll=52");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "epoll 52: level-triggered fd 50 (data 0xdead), edge-triggered fd 51 (data 7)",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
