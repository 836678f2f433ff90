//! Dirty trackers against real processes. Each test forks a child that
//! obeys commands on a pipe (map memory, write a page, `MADV_DONTNEED`, …)
//! and acknowledges each one; an acknowledgement that does not come within
//! [`ACK_TIMEOUT`] fails the test (a child blocked on a write fault would
//! never answer). Children are killed and reaped by a `Drop` guard, also
//! when a test fails.

use super::*;
use crate::freeze::FrozenProcess;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const ACK_TIMEOUT: Duration = Duration::from_secs(20);

// Child commands: one op byte and two u64 arguments; the answer is a u64.
const OP_MMAP: u8 = b'm'; // a = pages → address of a new private anonymous rw mapping
const OP_WRITE: u8 = b'w'; // a = address: store a new value at it
const OP_DONTNEED: u8 = b'd'; // a = address, b = length: MADV_DONTNEED
const OP_MAP_FIXED: u8 = b'f'; // a = address, b = length: new anonymous mapping over it
const OP_TOUCH: u8 = b't'; // a = address, b = length: write every page
const OP_STRIDE: u8 = b's'; // a = address, b = length, c = stride in pages: write every c-th page
const OP_HUGEPAGE: u8 = b'h'; // a = address, b = length: MADV_HUGEPAGE
const OP_GETRANDOM: u8 = b'g'; // a = address: the kernel writes 8 bytes there (getrandom)
const OP_SETUID: u8 = b'u'; // a = uid: drop root (and capabilities), stay dumpable

/// A forked child obeying commands; killed and reaped on drop.
struct Child {
    pid: i32,
    cmd: OwnedFd,
    ack: OwnedFd,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array of two.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just returned these two new fds; each gets one owner.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Child {
    fn spawn() -> Child {
        let (cmd_r, cmd_w) = pipe();
        let (ack_r, ack_w) = pipe();
        let parent = std::process::id() as i32;
        // SAFETY: the test process has other threads; the child runs only
        // `child_main`, which makes raw syscalls, never allocates or takes a
        // lock, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            child_main(parent, cmd_r.as_raw_fd(), ack_w.as_raw_fd());
        }
        Child {
            pid,
            cmd: cmd_w,
            ack: ack_r,
        }
    }

    fn call(&self, op: u8, a: u64, b: u64, c: u64) -> u64 {
        let mut msg = [0u8; 25];
        msg[0] = op;
        msg[1..9].copy_from_slice(&a.to_ne_bytes());
        msg[9..17].copy_from_slice(&b.to_ne_bytes());
        msg[17..25].copy_from_slice(&c.to_ne_bytes());
        // SAFETY: writes `msg`, live for the call (atomic: < PIPE_BUF).
        let n = unsafe { libc::write(self.cmd.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        assert_eq!(n, 25, "command to child {}", self.pid);
        let mut pfd = libc::pollfd {
            fd: self.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ACK_TIMEOUT.as_millis() as i32) };
        assert!(
            r == 1,
            "child {} did not answer command {:?} within {ACK_TIMEOUT:?} (blocked?)",
            self.pid,
            op as char
        );
        let mut out = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `out`.
        let n = unsafe { libc::read(self.ack.as_raw_fd(), out.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "answer of child {}", self.pid);
        let v = u64::from_ne_bytes(out);
        assert_ne!(
            v,
            u64::MAX,
            "child {} failed command {:?}",
            self.pid,
            op as char
        );
        v
    }

    fn mmap(&self, pages: u64) -> u64 {
        self.call(OP_MMAP, pages, 0, 0)
    }
    fn write(&self, addr: u64) {
        self.call(OP_WRITE, addr, 0, 0);
    }
    fn dontneed(&self, addr: u64, len: u64) {
        self.call(OP_DONTNEED, addr, len, 0);
    }
    fn map_fixed(&self, addr: u64, len: u64) {
        self.call(OP_MAP_FIXED, addr, len, 0);
    }
    fn touch(&self, addr: u64, len: u64) {
        self.call(OP_TOUCH, addr, len, 0);
    }
    fn stride(&self, addr: u64, len: u64, stride: u64) -> u64 {
        self.call(OP_STRIDE, addr, len, stride)
    }

    /// Targets of the child's fds.
    fn fds(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("read child's fd dir")
            .filter_map(|e| e.ok())
            .map(|e| {
                let link = std::fs::read_link(e.path()).unwrap_or_default();
                format!("{} -> {}", e.file_name().to_string_lossy(), link.display())
            })
            .collect();
        v.sort();
        v
    }

    /// VMAs of the child with the userfaultfd-wp flag (`uw`) set.
    fn uffd_wp_vmas(&self) -> Vec<(u64, u64)> {
        crate::procfs::read_smaps(self.pid)
            .expect("child's smaps")
            .iter()
            .filter(|m| m.has_flag("uw"))
            .map(|m| (m.start, m.end))
            .collect()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill/waitpid of our own child by pid.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        loop {
            let mut st = 0;
            // SAFETY: `st` is a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut st, libc::__WALL) };
            if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if r == -1 || libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                break;
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes; false at EOF or error.
fn read_full(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
    true
}

/// The child's command loop: raw syscalls only (it was forked from a
/// multi-threaded process).
fn child_main(parent: i32, cmd: RawFd, ack: RawFd) -> ! {
    // SAFETY: prctl/getppid take no pointers; the child dies with the
    // parent thread and exits at once if the parent is already gone.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    let mut counter: u64 = 0x1000;
    let mut next = || {
        counter += 1;
        counter
    };
    let store = |addr: u64, v: u64| {
        // SAFETY: the test only names addresses of mappings this child made
        // read-write; a volatile store is a real write the kernel sees.
        unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
    };
    let map = |addr: u64, len: u64, fixed: bool| -> u64 {
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if fixed { libc::MAP_FIXED } else { 0 };
        // SAFETY: an anonymous mapping; MAP_FIXED only over the child's own
        // test mappings, which nothing else in the child uses.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            u64::MAX
        } else {
            p as u64
        }
    };
    loop {
        let mut msg = [0u8; 25];
        if !read_full(cmd, &mut msg) {
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let arg = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&msg[1 + 8 * i..9 + 8 * i]);
            u64::from_ne_bytes(w)
        };
        let (a, b, c) = (arg(0), arg(1), arg(2));
        let result = match msg[0] {
            OP_MMAP => map(0, a * PAGE, false),
            OP_WRITE => {
                store(a, next());
                0
            }
            OP_DONTNEED => {
                // SAFETY: madvise on the child's own test mapping.
                let r = unsafe {
                    libc::madvise(a as *mut libc::c_void, b as usize, libc::MADV_DONTNEED)
                };
                if r == 0 {
                    0
                } else {
                    u64::MAX
                }
            }
            OP_MAP_FIXED => map(a, b, true),
            OP_GETRANDOM => {
                // SAFETY: the kernel writes 8 bytes at an address of the
                // child's own read-write test mapping.
                let r = unsafe { libc::getrandom(a as *mut libc::c_void, 8, 0) };
                if r == 8 {
                    0
                } else {
                    u64::MAX
                }
            }
            OP_SETUID => {
                let id = a as libc::uid_t;
                // SAFETY: plain id-changing syscalls and prctl, no pointers.
                let ok = unsafe {
                    libc::setresgid(id, id, id) == 0
                        && libc::setresuid(id, id, id) == 0
                        && libc::prctl(libc::PR_SET_DUMPABLE, 1) == 0
                };
                if ok {
                    0
                } else {
                    u64::MAX
                }
            }
            OP_HUGEPAGE => {
                // SAFETY: madvise on the child's own test mapping.
                let r = unsafe {
                    libc::madvise(a as *mut libc::c_void, b as usize, libc::MADV_HUGEPAGE)
                };
                if r == 0 {
                    0
                } else {
                    u64::MAX
                }
            }
            OP_TOUCH | OP_STRIDE => {
                let stride = if msg[0] == OP_TOUCH { 1 } else { c.max(1) };
                let mut n = 0;
                let mut p = a;
                while p < a + b {
                    store(p, next());
                    n += 1;
                    p += stride * PAGE;
                }
                n
            }
            _ => u64::MAX,
        };
        let out = result.to_ne_bytes();
        // SAFETY: writes the 8 bytes of `out`.
        unsafe { libc::write(ack, out.as_ptr().cast(), 8) };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The UffdWpAsync tracker for `child`, made while it is frozen only for
/// that; `None` (with the reason printed) where the kernel cannot.
fn uffd_tracker(child: &Child) -> Option<UffdWpAsync> {
    if !is_root() {
        eprintln!("SKIPPED: seizing a child and pulling its fd needs root here");
        return None;
    }
    let frozen = FrozenProcess::freeze(child.pid).expect("freeze child");
    let t = UffdWpAsync::new(child.pid, &frozen);
    frozen.thaw().expect("thaw child");
    match t {
        Ok(t) => Some(t),
        Err(DirtyError::MissingFeature { missing, .. }) => {
            eprintln!("SKIPPED: this kernel lacks {missing}");
            None
        }
        Err(e) => panic!("UffdWpAsync::new: {}", error_chain(&e)),
    }
}

fn pages(base: u64, idx: &[u64]) -> Vec<DirtyRange> {
    let mut v: Vec<DirtyRange> = idx
        .iter()
        .map(|&i| DirtyRange {
            start: base + i * PAGE,
            end: base + (i + 1) * PAGE,
        })
        .collect();
    v.sort();
    sort_merge(v)
}

fn vma(start: u64, n: u64) -> VmaRange {
    VmaRange {
        start,
        end: start + n * PAGE,
    }
}

/// The common scenario: writes, no writes, DONTNEED, a new VMA by a second
/// arm (without losing pending writes), dropping a VMA, disarm.
fn scenario(t: &mut dyn DirtyTracker, child: &Child) {
    let a = child.mmap(16);
    child.write(a); // populated before arming
    t.arm(&[vma(a, 16)]).expect("arm");
    let drained = t.collect().expect("first collect");
    assert_eq!(drained, [], "first collect after arm");

    child.write(a + 3 * PAGE);
    child.write(a + 7 * PAGE);
    assert_eq!(t.collect().unwrap(), pages(a, &[3, 7]), "pages 3 and 7");
    assert_eq!(t.collect().unwrap(), [], "nothing written");

    // Zapped and written again.
    child.dontneed(a + 5 * PAGE, PAGE);
    child.write(a + 5 * PAGE);
    assert_eq!(t.collect().unwrap(), pages(a, &[5]), "DONTNEED + write");
    // Zapped only: the content became zeros, which must be reported.
    child.dontneed(a + 3 * PAGE, PAGE);
    assert_eq!(t.collect().unwrap(), pages(a, &[3]), "DONTNEED alone");
    assert_eq!(t.collect().unwrap(), []);
    child.write(a + 3 * PAGE);
    assert_eq!(t.collect().unwrap(), pages(a, &[3]), "write after DONTNEED");

    // A new VMA, armed again; a write pending from before the new arm
    // must survive it.
    let b = child.mmap(8);
    child.write(a + 9 * PAGE);
    t.arm(&[vma(a, 16), vma(b, 8)]).expect("second arm");
    child.write(b + 2 * PAGE);
    let mut want = pages(a, &[9]);
    want.extend(pages(b, &[2]));
    assert_eq!(
        t.collect().unwrap(),
        sort_merge(want),
        "new VMA and pending write"
    );
    assert_eq!(t.collect().unwrap(), []);

    // Dropping A: its writes are no longer reported, B's are.
    t.arm(&[vma(b, 8)]).expect("third arm");
    child.write(a + PAGE);
    child.write(b + 4 * PAGE);
    assert_eq!(t.collect().unwrap(), pages(b, &[4]), "A dropped");

    t.disarm().expect("disarm");
    assert!(matches!(t.collect(), Err(DirtyError::Disarmed { .. })));
    // The child runs on: writes everywhere are answered at once.
    for p in 0..16 {
        child.write(a + p * PAGE);
    }
    for p in 0..8 {
        child.write(b + p * PAGE);
    }
}

#[test]
fn uffd_wp_async_tracks_writes() {
    let child = Child::spawn();
    let fds_before = child.fds();
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    assert_eq!(child.fds(), fds_before, "the target must not keep the uffd");
    assert!(t.features() & uffd_sys::UFFD_FEATURE_WP_ASYNC != 0);
    scenario(&mut t, &child);
    assert_eq!(
        child.uffd_wp_vmas(),
        [],
        "VMAs still registered after disarm"
    );
}

#[test]
fn checksum_tracks_writes() {
    let child = Child::spawn();
    let mut t = Checksum::new(child.pid).expect("checksum tracker");
    scenario(&mut t, &child);
}

/// A tracked VMA replaced by a new mapping (so no longer registered) is
/// reported whole, writes before the replacement in the same span are not
/// lost, and the next arm tracks the new mapping page by page.
#[test]
fn uffd_replaced_vma_is_reported_whole_then_rearmed() {
    let child = Child::spawn();
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    let c = child.mmap(16);
    t.arm(&[vma(c, 16)]).unwrap();
    assert_eq!(t.collect().unwrap(), []);
    child.write(c + 2 * PAGE);
    child.map_fixed(c + 8 * PAGE, 8 * PAGE);
    let got = t.collect().unwrap();
    let mut want = pages(c, &[2]);
    want.push(DirtyRange {
        start: c + 8 * PAGE,
        end: c + 16 * PAGE,
    });
    assert_eq!(got, want);
    t.arm(&[vma(c, 16)]).unwrap();
    assert_eq!(t.collect().unwrap(), []);
    child.write(c + 10 * PAGE);
    assert_eq!(t.collect().unwrap(), pages(c, &[10]));
    drop(t);
    assert_eq!(child.uffd_wp_vmas(), [], "drop must disarm");
    child.write(c + 10 * PAGE);
}

/// More written ranges than one PAGEMAP_SCAN output vector holds.
#[test]
fn uffd_collect_loops_over_a_full_output_vector() {
    let child = Child::spawn();
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    let n = 3 * 4096 + 10; // pages; every other one written
    let a = child.mmap(2 * n);
    t.arm(&[vma(a, 2 * n)]).unwrap();
    assert_eq!(t.collect().unwrap(), []);
    assert_eq!(child.stride(a, 2 * n * PAGE, 2), n);
    let got = t.collect().unwrap();
    assert_eq!(got.len() as u64, n);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, r)| r.start == a + 2 * i as u64 * PAGE && r.pages() == 1));
}

#[test]
fn choose_prefers_uffd_and_falls_back_to_checksum() {
    let child = Child::spawn();
    if !is_root() {
        eprintln!("SKIPPED: freezing a child needs root here");
        return;
    }
    let frozen = FrozenProcess::freeze(child.pid).expect("freeze");
    let best = choose(child.pid, Some(&frozen)).expect("choose");
    frozen.thaw().expect("thaw");
    let reports = [
        crate::features::probe(crate::features::Feature::UffdWpAsync),
        crate::features::probe(crate::features::Feature::PagemapScan),
        crate::features::probe(crate::features::Feature::SoftDirty),
    ];
    assert_eq!(best.name(), crate::features::dirty_tracker_choice(&reports));
    drop(best);
    let without = choose(child.pid, None).expect("choose without freezing");
    let soft_dirty = crate::features::probe(crate::features::Feature::SoftDirty).available;
    let expected = if soft_dirty { "SoftDirty" } else { "Checksum" };
    assert_eq!(without.name(), expected);
    child.write(child.mmap(1));
}

#[test]
fn soft_dirty_only_where_the_probe_passes() {
    let child = Child::spawn();
    let probe = crate::features::probe(crate::features::Feature::SoftDirty);
    match SoftDirty::new(child.pid) {
        Ok(mut t) => {
            assert!(probe.available);
            let a = child.mmap(8);
            t.arm(&[vma(a, 8)]).unwrap();
            t.collect().unwrap();
            child.write(a + 3 * PAGE);
            assert!(t.collect().unwrap().contains(&pages(a, &[3])[0]));
        }
        Err(DirtyError::Unavailable { reason, .. }) => {
            assert!(!probe.available);
            eprintln!("SoftDirty refused as expected: {reason}");
        }
        Err(e) => panic!("{}", error_chain(&e)),
    }
}

#[test]
fn trackable_vmas_of_a_real_process() {
    let child = Child::spawn();
    let a = child.mmap(4);
    let maps = crate::procfs::read_smaps(child.pid).unwrap();
    let t = trackable_vmas(&maps);
    assert!(t.contains(&vma(a, 4)), "{t:x?}");
    for m in &maps {
        if m.name == "[vdso]" || !m.write {
            assert!(!t.contains(&VmaRange::from(m)), "{m:?}");
        }
    }
}

#[test]
fn range_helpers() {
    let r = |s: u64, e: u64| VmaRange {
        start: s * PAGE,
        end: e * PAGE,
    };
    assert_eq!(
        normalize(1, &[r(5, 6), r(0, 2), r(1, 3), r(3, 4)]).unwrap(),
        [r(0, 4), r(5, 6)]
    );
    assert!(matches!(
        normalize(
            1,
            &[VmaRange {
                start: 1,
                end: PAGE
            }]
        ),
        Err(DirtyError::BadRange { .. })
    ));
    assert_eq!(
        subtract(&[r(0, 10)], &[r(2, 3), r(5, 7)]),
        [r(0, 2), r(3, 5), r(7, 10)]
    );
    assert_eq!(subtract(&[r(0, 4)], &[r(0, 4)]), []);
    assert!(covered(&[r(0, 4), r(6, 9)], 6 * PAGE, 9 * PAGE));
    assert!(!covered(&[r(0, 4), r(6, 9)], 3 * PAGE, 7 * PAGE));
    let mut out = Vec::new();
    push_range(&mut out, 0, PAGE);
    push_range(&mut out, PAGE, 2 * PAGE);
    push_range(&mut out, 3 * PAGE, 4 * PAGE);
    assert_eq!(
        out,
        [
            DirtyRange {
                start: 0,
                end: 2 * PAGE
            },
            DirtyRange {
                start: 3 * PAGE,
                end: 4 * PAGE
            }
        ]
    );
}

/// Collect over 1 GiB with 1 % of the pages written (every 100th page, so
/// ~2600 separate ranges). A figure, not a check: run with
/// `cargo test --release -p crm-engine dirty::tests::collect_timing -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: maps and touches 1 GiB"]
fn collect_timing_1gib() {
    const N: u64 = (1 << 30) / PAGE;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for which in ["UffdWpAsync", "Checksum"] {
        let child = Child::spawn();
        let a = child.mmap(N);
        child.touch(a, N * PAGE);
        let mut t: Box<dyn DirtyTracker> = if which == "UffdWpAsync" {
            match uffd_tracker(&child) {
                Some(t) => Box::new(t),
                None => continue,
            }
        } else {
            Box::new(Checksum::new(child.pid).unwrap())
        };
        let t0 = Instant::now();
        t.arm(&[vma(a, N)]).unwrap();
        let arm = t0.elapsed();
        let t0 = Instant::now();
        let first = t.collect().unwrap();
        let drain = t0.elapsed();
        let written = child.stride(a, N * PAGE, 100);
        let t0 = Instant::now();
        let got = t.collect().unwrap();
        let collect = t0.elapsed();
        let t0 = Instant::now();
        let empty = t.collect().unwrap();
        let clean = t0.elapsed();
        let reported: u64 = got.iter().map(|r| r.pages()).sum();
        assert_eq!(reported, written);
        assert!(first.is_empty() && empty.is_empty());
        eprintln!(
            "{which}: 1 GiB tracked, {written} pages written: arm {:.1} ms, first collect {:.1} ms, \
             collect {:.2} ms ({} ranges), clean collect {:.2} ms",
            ms(arm),
            ms(drain),
            ms(collect),
            got.len(),
            ms(clean)
        );
        t.disarm().unwrap();
    }
}

/// Every trackable VMA of a real process (heap, stack, `.data`/`.bss` of
/// the binary and libc — private file mappings —, anonymous memory) is
/// registered; the child keeps running syscalls that write to its stack;
/// writes by the kernel (getrandom) are tracked like the child's own.
#[test]
fn uffd_whole_process() {
    let child = Child::spawn();
    let a = child.mmap(4);
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    whole_process(&mut t, &child, a);
    assert_eq!(child.uffd_wp_vmas(), []);
}

fn whole_process(t: &mut dyn DirtyTracker, child: &Child, a: u64) {
    let maps = crate::procfs::read_smaps(child.pid).unwrap();
    let vmas = trackable_vmas(&maps);
    assert!(maps
        .iter()
        .any(|m| m.name.starts_with('/') && m.write && vmas.contains(&VmaRange::from(m))));
    t.arm(&vmas).expect("arm every trackable VMA");
    t.collect().unwrap();
    child.write(a + PAGE);
    child.call(OP_GETRANDOM, a + 3 * PAGE, 0, 0);
    let got = t.collect().unwrap();
    for p in [1, 3] {
        let page = pages(a, &[p])[0];
        assert!(
            got.iter()
                .any(|r| r.start <= page.start && page.end <= r.end),
            "page {p} missing from {got:x?}"
        );
    }
    assert!(
        !got.iter().any(|r| r.start < a + PAGE && a < r.end),
        "page 0: {got:x?}"
    );
    t.disarm().unwrap();
    child.write(a);
}

/// A target without `CAP_SYS_PTRACE` gets a `UFFD_USER_MODE_ONLY`
/// userfaultfd; writes made by the kernel on its behalf are still tracked
/// (async write faults never reach the user-mode check) and never fail.
#[test]
fn uffd_unprivileged_target() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to drop the child's privileges");
        return;
    }
    let child = Child::spawn();
    child.call(OP_SETUID, 65534, 0, 0);
    let a = child.mmap(4);
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    let unprivileged_uffd = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    assert!(t.user_mode_only() || unprivileged_uffd);
    whole_process(&mut t, &child, a);
}

/// The same whole-process run with the Checksum tracker.
#[test]
fn checksum_whole_process() {
    let child = Child::spawn();
    let a = child.mmap(4);
    let mut t = Checksum::new(child.pid).unwrap();
    whole_process(&mut t, &child, a);
}

/// `MADV_DONTNEED` of a whole 2 MiB-aligned page table (which kernels with
/// `CONFIG_PT_RECLAIM` may free) and of half of one: both are reported (the
/// contents became zeros), and tracking goes on in them.
#[test]
fn uffd_zapped_page_tables_are_reported() {
    let child = Child::spawn();
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    const TABLE: u64 = 2 << 20;
    let n = 3 * TABLE / PAGE;
    let a = child.mmap(n);
    let aligned = (a + TABLE - 1) & !(TABLE - 1);
    child.touch(a, n * PAGE);
    t.arm(&[vma(a, n)]).unwrap();
    assert_eq!(t.collect().unwrap(), []);
    child.dontneed(aligned, TABLE);
    let whole = DirtyRange {
        start: aligned,
        end: aligned + TABLE,
    };
    assert_eq!(t.collect().unwrap(), [whole], "whole table zapped");
    child.dontneed(aligned + TABLE, TABLE / 2);
    let half = DirtyRange {
        start: aligned + TABLE,
        end: aligned + TABLE + TABLE / 2,
    };
    assert_eq!(t.collect().unwrap(), [half], "half a table zapped");
    child.write(aligned + 5 * PAGE);
    child.write(aligned + TABLE + 7 * PAGE);
    let mut want = pages(aligned, &[5]);
    want.extend(pages(aligned + TABLE, &[7]));
    assert_eq!(t.collect().unwrap(), want, "writes into zapped ranges");
}

/// A transparent huge page: a write is reported (at page or huge-page
/// granularity, both correct) and nothing outside the mapping.
#[test]
fn uffd_transparent_huge_pages() {
    let child = Child::spawn();
    let Some(mut t) = uffd_tracker(&child) else {
        return;
    };
    const HUGE: u64 = 2 << 20;
    let n = 2 * HUGE / PAGE;
    let a = child.mmap(n);
    let aligned = (a + HUGE - 1) & !(HUGE - 1);
    assert_eq!(child.call(OP_HUGEPAGE, a, n * PAGE, 0), 0);
    child.touch(a, n * PAGE);
    let huge_kb = crate::procfs::read_smaps(child.pid)
        .ok()
        .and_then(|_| std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.pid)).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    t.arm(&[vma(a, n)]).unwrap();
    assert_eq!(t.collect().unwrap(), []);
    child.write(aligned + 3 * PAGE);
    let got = t.collect().unwrap();
    eprintln!("THP ({huge_kb} kB AnonHugePages): one write reported as {got:x?}");
    assert_eq!(got.len(), 1, "{got:x?}");
    assert!(got[0].start <= aligned + 3 * PAGE && aligned + 4 * PAGE <= got[0].end);
    assert!(got[0].start >= a && got[0].end <= a + n * PAGE);
    assert_eq!(t.collect().unwrap(), []);
    child.write(aligned + 9 * PAGE);
    let again = t.collect().unwrap();
    assert!(again
        .iter()
        .any(|r| r.start <= aligned + 9 * PAGE && aligned + 10 * PAGE <= r.end));
}
