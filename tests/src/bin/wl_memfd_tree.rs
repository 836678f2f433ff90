//! Workload `wl_memfd_tree`: a parent and a child sharing one memfd.
//!
//! The parent creates memfd `crm-tree` (16 pages of a pattern, page 15 the
//! mailbox, see `crm_tests::mailbox`), holds it as fd 30 and maps it whole
//! `MAP_SHARED`; the child inherits the mapping, opens the memfd again as
//! its own fd 31 (a separate open file description; the inherited fd is
//! closed) and maps pages 1-8 a second time through it.
//!
//! Protocol: `READY pid=N members=CHILD`; on SIGUSR2 the parent writes a
//! fresh nonce into page 14 through its mapping and asks the child, which
//! must see the nonce in its mapping and through read() on fd 31, see the
//! pattern through both its mappings, and write `nonce ^ its pid` into page
//! 14 through its second mapping; the parent must then see that through
//! its mapping and through read() on fd 30. Prints `PASS ...`/`FAIL ...`.

use crm_tests::{mailbox, wl};
use std::ffi::CString;
use std::time::Duration;

const PAGE: usize = 4096;
const PAGES: usize = 16;
const LEN: usize = PAGES * PAGE;
const FD: i32 = 30;
const CHILD_FD: i32 = 31;
const NONCE_PAGE: usize = 14;
const MAILBOX_PAGE: usize = 15;

fn pattern(off: usize) -> u8 {
    (off as u8)
        .wrapping_mul(13)
        .wrapping_add((off / PAGE) as u8)
        | 0x80
}

fn slice(p: *mut u8, len: usize) -> &'static mut [u8] {
    // SAFETY: `p` is a live shared mapping of at least `len` bytes; both
    // processes touch the words they exchange one at a time.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn nonce_slot(p: *mut u8, slot: usize) -> &'static std::sync::atomic::AtomicU64 {
    // SAFETY: 8-aligned words of page NONCE_PAGE inside the live mapping.
    unsafe { &*(p.add(NONCE_PAGE * PAGE + slot * 8) as *const std::sync::atomic::AtomicU64) }
}

fn pattern_ok(p: *mut u8, first_page: usize, pages: usize) -> bool {
    let s = slice(p, pages * PAGE);
    (0..pages * PAGE)
        .filter(|o| first_page + o / PAGE < NONCE_PAGE)
        .all(|o| s[o] == pattern(first_page * PAGE + o))
}

fn child(whole: *mut u8) -> ! {
    let path = CString::new(format!("/proc/self/fd/{FD}")).unwrap();
    // SAFETY: a NUL-terminated path; dup2/close of our descriptors.
    unsafe {
        let n = libc::open(path.as_ptr(), libc::O_RDWR);
        if n < 0 || libc::dup2(n, CHILD_FD) < 0 {
            wl::fail_setup("child: reopen the memfd");
        }
        libc::close(n);
        libc::close(FD);
    }
    let second = wl::map_fd(CHILD_FD, 8 * PAGE, PAGE, libc::MAP_SHARED);
    let me = std::process::id() as u64;
    // SAFETY: the mailbox page of the shared mapping, used for nothing else.
    let mailbox = unsafe { mailbox::Mailbox::new(unsafe_page(whole, MAILBOX_PAGE)) };
    loop {
        mailbox.serve(|| {
            let mut p = Vec::new();
            let nonce = nonce_slot(whole, 0).load(std::sync::atomic::Ordering::SeqCst);
            let by_read = wl::pread_u64(CHILD_FD, NONCE_PAGE * PAGE);
            if by_read != nonce {
                p.push(format!(
                    "child: read() on fd {CHILD_FD} sees {by_read:#x}, the mapping {nonce:#x}"
                ));
            }
            if !pattern_ok(whole, 0, PAGES) {
                p.push("child: the inherited mapping lost the pattern".into());
            }
            if !pattern_ok(second, 1, 8) {
                p.push("child: its own mapping (pages 1-8) lost the pattern".into());
            }
            if wl::corrupt_requested() {
                slice(second, 1)[0] ^= 1;
            }
            // Page 14 is outside the second mapping: answer through the
            // first one, and prove the second one is shared too by
            // writing a byte of page 8 and putting it back.
            let s = slice(second, 8 * PAGE);
            s[7 * PAGE] ^= 0xff;
            if slice(whole, LEN)[8 * PAGE] != pattern(8 * PAGE) ^ 0xff {
                p.push("child: its two mappings are not the same memory".into());
            }
            s[7 * PAGE] ^= 0xff;
            nonce_slot(whole, 1).store(nonce ^ me, std::sync::atomic::Ordering::SeqCst);
            p
        });
        wl::sleep_ms(5);
    }
}

fn unsafe_page(p: *mut u8, page: usize) -> *mut u8 {
    // SAFETY: inside the live mapping of PAGES pages.
    unsafe { p.add(page * PAGE) }
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let name = CString::new("crm-tree").unwrap();
    // SAFETY: a NUL-terminated name; a new descriptor, moved to FD.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    // SAFETY: dup2 and ftruncate on our own descriptors.
    let failed =
        fd < 0 || unsafe { libc::dup2(fd, FD) < 0 || libc::ftruncate(FD, LEN as i64) != 0 };
    if failed {
        wl::fail_setup("memfd");
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    let whole = wl::map_fd(FD, LEN, 0, libc::MAP_SHARED);
    for (o, b) in slice(whole, LEN).iter_mut().enumerate() {
        *b = pattern(o);
    }
    slice(unsafe_page(whole, NONCE_PAGE), 2 * PAGE).fill(0);
    // SAFETY: fork in a single-threaded program.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        wl::fail_setup("fork");
    }
    if pid == 0 {
        child(whole);
    }
    wl::ready(&format!("members={pid}"));
    let mut nonce = 0x5eed_0000_u64;
    loop {
        if wl::take(libc::SIGUSR2) {
            nonce += 1;
            nonce_slot(whole, 0).store(nonce, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: the mailbox page of the shared mapping, used for nothing else.
            let mailbox = unsafe { mailbox::Mailbox::new(unsafe_page(whole, MAILBOX_PAGE)) };
            let mut p = match mailbox.ask(Duration::from_secs(5)) {
                Ok(p) => p,
                Err(e) => vec![e],
            };
            let want = nonce ^ pid as u64;
            let seen = nonce_slot(whole, 1).load(std::sync::atomic::Ordering::SeqCst);
            if seen != want {
                p.push(format!(
                    "parent: the child's answer in the mapping is {seen:#x}, want {want:#x}"
                ));
            }
            let by_read = wl::pread_u64(FD, NONCE_PAGE * PAGE + 8);
            if by_read != want {
                p.push(format!(
                    "parent: read() on fd {FD} sees {by_read:#x}, want {want:#x}"
                ));
            }
            if !pattern_ok(whole, 0, PAGES) {
                p.push("parent: the mapping lost the pattern".into());
            }
            wl::verdict("memfd tree", &p);
        }
        wl::sleep_ms(20);
    }
}
