//! Workload `wl_posix_shm MODE`: POSIX shared memory (`shm_open`, a file in
//! /dev/shm) mapped `MAP_SHARED`.
//!
//! The root creates `/crm-shm-PID` (8 pages: a pattern in pages 0-5, page 6
//! for nonces, page 7 the mailbox, see `crm_tests::mailbox`), holds it as
//! fd 30 and maps it whole. Modes:
//! - `single`: the root also maps pages 1-4 a second time, and the whole
//!   object `MAP_PRIVATE` with page 0 written (a private copy).
//! - `tree`: a child inherits the mapping, closes the inherited fd, opens
//!   the object again with `shm_open` as its fd 31 and maps it a second time.
//!
//! Protocol: `READY pid=N shm=/dev/shm/crm-shm-N [members=C]`; on SIGUSR2
//! the root writes a nonce through its mapping; in `tree` mode the child
//! must see it in both its mappings and through read(), and answers
//! `nonce ^ its pid` through its own mapping, which the root must see in
//! its mapping and through read(); in `single` mode the root checks its two
//! shared mappings against each other and read(), and its private copy.
//! Prints `PASS ...`/`FAIL ...`. The test removes the shm file.

use crm_tests::{mailbox, wl};
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const PAGE: usize = 4096;
const PAGES: usize = 8;
const LEN: usize = PAGES * PAGE;
const FD: i32 = 30;
const CHILD_FD: i32 = 31;
const NONCE_PAGE: usize = 6;
const MAILBOX_PAGE: usize = 7;
const MARK: &[u8] = b"PRIVATE PAGE";

fn pattern(off: usize) -> u8 {
    (off as u8)
        .wrapping_mul(11)
        .wrapping_add((off / PAGE) as u8)
        | 0x40
}

fn slice(p: *mut u8, len: usize) -> &'static mut [u8] {
    // SAFETY: `p` is a live mapping of at least `len` bytes; words that
    // both processes use are only accessed atomically.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn at(p: *mut u8, off: usize) -> *mut u8 {
    // SAFETY: callers stay inside the live mapping.
    unsafe { p.add(off) }
}

fn slot(p: *mut u8, i: usize) -> &'static AtomicU64 {
    // SAFETY: 8-aligned words of the nonce page inside the live mapping.
    unsafe { &*(at(p, NONCE_PAGE * PAGE + i * 8) as *const AtomicU64) }
}

fn pattern_ok(p: *mut u8, first_page: usize, pages: usize) -> bool {
    let s = slice(p, pages * PAGE);
    (0..pages * PAGE)
        .filter(|o| first_page + o / PAGE < NONCE_PAGE)
        .all(|o| s[o] == pattern(first_page * PAGE + o))
}

fn child(name: &CString, whole: *mut u8) -> ! {
    // SAFETY: closing the inherited descriptor, opening our own.
    let fd = unsafe {
        libc::close(FD);
        libc::shm_open(name.as_ptr(), libc::O_RDWR, 0)
    };
    // SAFETY: dup2/close of our descriptors.
    if fd < 0 || unsafe { libc::dup2(fd, CHILD_FD) } < 0 {
        wl::fail_setup("child: shm_open");
    }
    // SAFETY: as above.
    unsafe { libc::close(fd) };
    let second = wl::map_fd(CHILD_FD, LEN, 0, libc::MAP_SHARED);
    let me = std::process::id() as u64;
    // SAFETY: the mailbox page of the shared mapping, used for nothing else.
    let mailbox = unsafe { mailbox::Mailbox::new(at(whole, MAILBOX_PAGE * PAGE)) };
    loop {
        mailbox.serve(|| {
            let mut p = Vec::new();
            let nonce = slot(whole, 0).load(Ordering::SeqCst);
            let (mine, by_read) = (
                slot(second, 0).load(Ordering::SeqCst),
                wl::pread_u64(CHILD_FD, NONCE_PAGE * PAGE),
            );
            if mine != nonce || by_read != nonce {
                p.push(format!("child: nonce {nonce:#x} in the inherited mapping, {mine:#x} in its own, {by_read:#x} by read()"));
            }
            if !pattern_ok(whole, 0, PAGES) || !pattern_ok(second, 0, PAGES) {
                p.push("child: a mapping lost the pattern".into());
            }
            if wl::corrupt_requested() {
                slice(second, 1)[0] ^= 1;
            }
            slot(second, 1).store(nonce ^ me, Ordering::SeqCst);
            p
        });
        wl::sleep_ms(5);
    }
}

fn main() {
    let tree = match std::env::args().nth(1).as_deref() {
        Some("tree") => true,
        Some("single") => false,
        other => {
            wl::say(&format!("SETUP-ERROR unknown mode {other:?}"));
            std::process::exit(2);
        }
    };
    wl::catch(libc::SIGUSR2);
    let shm = format!("/crm-shm-{}", std::process::id());
    let name = CString::new(shm.clone()).unwrap();
    // SAFETY: a NUL-terminated name; a new descriptor, moved to FD.
    let fd = unsafe {
        libc::shm_open(
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o600,
        )
    };
    // SAFETY: dup2 and ftruncate on our own descriptors.
    let failed =
        fd < 0 || unsafe { libc::dup2(fd, FD) < 0 || libc::ftruncate(FD, LEN as i64) != 0 };
    if failed {
        wl::fail_setup("shm_open");
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    let whole = wl::map_fd(FD, LEN, 0, libc::MAP_SHARED);
    for (o, b) in slice(whole, LEN).iter_mut().enumerate() {
        *b = if o / PAGE < NONCE_PAGE { pattern(o) } else { 0 };
    }
    let mut child_pid = 0;
    let (mut second, mut private) = (std::ptr::null_mut(), std::ptr::null_mut());
    if tree {
        // SAFETY: fork in a single-threaded program.
        child_pid = unsafe { libc::fork() };
        if child_pid < 0 {
            wl::fail_setup("fork");
        }
        if child_pid == 0 {
            child(&name, whole);
        }
        wl::ready(&format!("shm=/dev/shm{shm} members={child_pid}"));
    } else {
        second = wl::map_fd(FD, 4 * PAGE, PAGE, libc::MAP_SHARED);
        private = wl::map_fd(FD, LEN, 0, libc::MAP_PRIVATE);
        slice(private, PAGE)[..MARK.len()].copy_from_slice(MARK);
        wl::ready(&format!("shm=/dev/shm{shm}"));
    }
    let mut nonce = 0xabc0_0000_u64;
    loop {
        if wl::take(libc::SIGUSR2) {
            nonce += 1;
            slot(whole, 0).store(nonce, Ordering::SeqCst);
            let mut p = Vec::new();
            if tree {
                // SAFETY: the mailbox page of the shared mapping, used for nothing else.
                let mailbox = unsafe { mailbox::Mailbox::new(at(whole, MAILBOX_PAGE * PAGE)) };
                match mailbox.ask(Duration::from_secs(5)) {
                    Ok(q) => p.extend(q),
                    Err(e) => p.push(e),
                }
                let want = nonce ^ child_pid as u64;
                let (seen, by_read) = (
                    slot(whole, 1).load(Ordering::SeqCst),
                    wl::pread_u64(FD, NONCE_PAGE * PAGE + 8),
                );
                if seen != want || by_read != want {
                    p.push(format!("parent: the child's answer is {seen:#x} in the mapping, {by_read:#x} by read(), want {want:#x}"));
                }
            } else {
                if wl::pread_u64(FD, NONCE_PAGE * PAGE) != nonce {
                    p.push("read() does not see a write through the mapping".into());
                }
                slice(second, PAGE)[0] ^= 0xff;
                if slice(whole, 2 * PAGE)[PAGE] != pattern(PAGE) ^ 0xff {
                    p.push("the two shared mappings are not the same memory".into());
                }
                slice(second, PAGE)[0] ^= 0xff;
                let pv = slice(private, LEN);
                if pv[..MARK.len()] != *MARK || !pattern_ok(at(private, PAGE), 1, NONCE_PAGE - 1) {
                    p.push("the private mapping lost its private copy or the file's pages".into());
                }
                if slice(whole, MARK.len())[..] == *MARK {
                    p.push("the private copy reached the shared memory".into());
                }
                if wl::corrupt_requested() {
                    slice(whole, 1)[0] ^= 1;
                }
            }
            if !pattern_ok(whole, 0, PAGES) {
                p.push("parent: the mapping lost the pattern".into());
            }
            wl::verdict("posix shm", &p);
        }
        wl::sleep_ms(20);
    }
}
