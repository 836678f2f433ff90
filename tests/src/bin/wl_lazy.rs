//! Workload `wl_lazy`: memory that is forked, moved and dropped while a lazy
//! restore is still filling it in.
//!
//! Usage: `wl_lazy [SIZE_MIB]` (default 512). Maps SIZE_MIB MiB of private
//! anonymous memory, every 8-byte word set from its offset, in four equal
//! quarters A, B, C, D.
//!
//! Protocol: `READY pid=N size_mib=S`; on SIGUSR2 — sent right after a lazy
//! restore starts the process, so most pages are still missing — at once:
//! 1. forks a child that checks all of quarter A and exits 0 (ok) or 1;
//! 2. `mremap`s quarter B to a new address (MREMAP_MAYMOVE|MREMAP_FIXED
//!    into a fresh hole) and checks it there;
//! 3. `madvise(MADV_DONTNEED)`s quarter C and checks it reads as zeros;
//! 4. writes a new value into every page of D, then checks D (the written
//!    word and the untouched words of each page);
//!
//! then waits for the child and prints `PASS ...` or `FAIL ...` naming the
//! first bad word of each failing step.

use crm_tests::wl;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

fn word(off: usize) -> u64 {
    ((off / 8) as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// First word of `[base, base + len)` that differs from `want(offset)`,
/// where offsets count from `origin` (the quarter's original start).
fn first_bad(
    base: usize,
    len: usize,
    origin: usize,
    want: impl Fn(usize) -> u64,
) -> Option<String> {
    (0..len / 8).find_map(|i| {
        // SAFETY: inside a live mapping of `len` bytes at `base`.
        let got = unsafe { std::ptr::read_volatile((base + i * 8) as *const u64) };
        let w = want(origin + i * 8);
        (got != w).then(|| format!("word at +{:#x} is {got:#x}, want {w:#x}", i * 8))
    })
}

fn main() {
    let size_mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap_or_else(|_| wl::fail_setup("bad SIZE_MIB")))
        .unwrap_or(512);
    let len = size_mib * MIB;
    let q = len / 4;
    let base = wl::map_anon(len) as usize;
    for i in 0..len / 8 {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write((base + i * 8) as *mut u64, word(i * 8)) };
    }
    wl::catch(libc::SIGUSR2);
    wl::ready(&format!("size_mib={size_mib}"));
    loop {
        if wl::take(libc::SIGUSR2) {
            check(base, q);
            return;
        }
        wl::sleep_ms(1);
    }
}

fn check(base: usize, q: usize) {
    let (a, b, c, d) = (base, base + q, base + 2 * q, base + 3 * q);
    let mut problems = Vec::new();
    // 1. A child checks A.
    // SAFETY: fork in a single-threaded process; the child only reads memory
    // and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let bad = first_bad(a, q, 0, word);
        // SAFETY: ending the child without running the parent's destructors.
        unsafe { libc::_exit(i32::from(bad.is_some())) };
    }
    // 2. Move B to a fresh hole and check it there.
    // SAFETY: reserving a hole, then moving B onto it.
    let moved = unsafe {
        let hole = libc::mmap(
            std::ptr::null_mut(),
            q,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        libc::mremap(
            b as *mut libc::c_void,
            q,
            q,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            hole,
        )
    };
    if moved == libc::MAP_FAILED {
        problems.push("mremap of B failed".to_string());
    } else if let Some(e) = first_bad(moved as usize, q, q, word) {
        problems.push(format!("B after mremap: {e}"));
    }
    // 3. Drop C: it must read as zeros.
    // SAFETY: madvise on our own mapping.
    if unsafe { libc::madvise(c as *mut libc::c_void, q, libc::MADV_DONTNEED) } != 0 {
        problems.push("madvise(DONTNEED) of C failed".to_string());
    } else if let Some(e) = first_bad(c, q, 2 * q, |_| 0) {
        problems.push(format!("C after MADV_DONTNEED: {e}"));
    }
    // 4. Write into every page of D, then check all of it.
    for p in (0..q).step_by(PAGE) {
        // SAFETY: inside D.
        unsafe { std::ptr::write_volatile((d + p) as *mut u64, !word(3 * q + p)) };
    }
    let want_d = |off: usize| {
        if off.is_multiple_of(PAGE) {
            !word(off)
        } else {
            word(off)
        }
    };
    if let Some(e) = first_bad(d, q, 3 * q, want_d) {
        problems.push(format!("D after writes: {e}"));
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    let r = unsafe { libc::waitpid(child, &mut status, 0) };
    if r != child || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        problems.push(format!(
            "the forked child found A wrong (wait status {status:#x})"
        ));
    }
    wl::verdict(
        &format!(
            "fork saw A intact, B intact after mremap, C zero after MADV_DONTNEED, D written, {} MiB each",
            q / MIB
        ),
        &problems,
    );
    // Stay alive for the test to kill (it checks we are still running).
    loop {
        wl::sleep_ms(100);
    }
}
