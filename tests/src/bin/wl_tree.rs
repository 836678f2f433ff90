//! Workload `wl_tree MODE`: a process tree that checks its own shape.
//!
//! Modes:
//! - `multitask`: the root and four children; child 0 runs a second thread,
//!   child 1 has a child of its own.
//! - `forker`: two children that keep forking short-lived children (from
//!   a second thread) and reaping them, while the dump freezes the tree.
//! - `pgrp`: child B is created first and then put into the group of child A
//!   (created after it); child C leads a new session holding D (in C's
//!   group) and E (leading its own group in C's session).
//! - `zombie`: two unreaped children of the root (exited with code 7, killed
//!   by SIGTERM) and one of a live child (exited with code 5).
//! - `orphan`: the root is a child subreaper; a middle child forks a
//!   grandchild and exits; the root reaps it and adopts the grandchild.
//! - `orphan-group`: as `orphan`, but the middle child led its own group,
//!   which the grandchild keeps: a group with no leader.
//! - `orphan-session`: as `orphan`, but the middle child led its own
//!   session (a daemon): a session with no leader.
//! - `session-left`: child P forks K, then P calls setsid(): K is in the
//!   root's session but P is not (dump refuses it).
//! - `child-socket`: as `multitask` with a netlink socket in child 2 (dump
//!   refuses it).
//! - `child-pipe`: a pipe whose write end the root holds and whose read
//!   end a child holds.
//! - `child-cwd`: as `multitask` with child 3 working in `./cwd-child`
//!   (a test removes it to make the restore of that child fail).
//! - `shmem`: a 4 MiB `MAP_SHARED | MAP_ANONYMOUS` region (its last MiB
//!   read-only: two VMAs) mapped by the root and three children. On verify
//!   the root writes a fresh nonce into it; each child must see it and
//!   writes `nonce ^ pid` back into its slot, which the root must see: the
//!   tasks still share the memory. The bulk keeps the root's pattern.
//!
//! - `inherit TASKS MIB` (defaults 8 16): the root fills MIB of private
//!   memory and forks TASKS - 1 children that never write it (shared
//!   copy-on-write); each checks it.
//!
//! - `bench TASKS PRIVATE_MIB SHARED_MIB` (defaults 50 4 16): the root maps
//!   SHARED_MIB of patterned shared anonymous memory, then TASKS - 1 children
//!   each fill PRIVATE_MIB of private memory; each checks both on verify.
//!
//! Every non-root task ("member") tells the root its PID (`SIG_HELLO`,
//! queued with `sigqueue`), records its pid, parent, group and session on
//! SIGUSR1 and fills memory: a buffer inherited from the root and never
//! written (must keep the root's pattern), one inherited and overwritten
//! (its own pattern), one allocated after fork. On SIGUSR2 a member checks
//! all of it and answers the root (`SIG_REPLY`, value `pid * 2 + ok`),
//! printing `MEMBER-FAIL pid=N ...` first if something differs.
//!
//! Hook: `CRM_WL_CORRUPT=1` makes every member flip a bit of its own buffer
//! before checking it.
//!
//! Protocol: `READY pid=R members=a,b,.. zombies=z,..`; on SIGUSR2 the root
//! checks itself, asks every member and prints one `PASS`/`FAIL` line. In
//! `zombie` mode the root (and the live child) reap their zombies while
//! verifying and check the exit statuses, so verify only once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crm_tests::wl;

const BUF: usize = 256 * 1024;

/// Numeric argument `i` of the command line, or `def`.
fn arg(i: usize, def: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(def)
}

/// A check of the tree's shape run by the root, given the members' PIDs.
type ShapeCheck = Box<dyn Fn(&[i32]) -> Vec<String>>;
/// A member's own extra check.
type MemberCheck = Box<dyn Fn() -> Vec<String>>;

fn sig_hello() -> i32 {
    libc::SIGRTMIN() + 1
}

fn sig_reply() -> i32 {
    libc::SIGRTMIN() + 2
}

fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn matches(seed: u64, buf: &[u8]) -> bool {
    let mut want = vec![0u8; buf.len()];
    pattern(seed, &mut want);
    want == buf
}

fn getpid() -> i32 {
    std::process::id() as i32
}

fn ids() -> (i32, i32, i32, i32) {
    // SAFETY: getppid/getpgrp/getsid take no pointers and cannot fail for 0.
    unsafe { (getpid(), libc::getppid(), libc::getpgrp(), libc::getsid(0)) }
}

/// Memory every task inherits from the root.
struct Inherited {
    kept: Vec<u8>,
    overwritten: Vec<u8>,
    root: i32,
}

/// A member: tells the root it exists, then serves SIGUSR1/SIGUSR2 forever.
fn member(inh: &mut Inherited, extra: impl FnOnce() -> Option<MemberCheck>) -> ! {
    let me = getpid();
    pattern(me as u64, &mut inh.overwritten);
    let mut own = vec![0u8; BUF];
    pattern(me as u64 ^ 0x55, &mut own);
    let extra_check = extra();
    wl::sigqueue(inh.root, sig_hello(), me as i64);
    let mut recorded: Option<(i32, i32, i32, i32)> = None;
    loop {
        // A root that is gone for good (a failed setup, a killed tree):
        // nobody will ever ask again; do not linger.
        // SAFETY: kill with signal 0 only checks that the pid exists.
        if unsafe { libc::kill(inh.root, 0) } != 0 {
            // SAFETY: _exit ends the member at once.
            unsafe { libc::_exit(3) };
        }
        if wl::take(libc::SIGUSR1) {
            recorded = Some(ids());
            wl::sigqueue(inh.root, sig_reply(), me as i64 * 2 + 1);
        }
        if wl::take(libc::SIGUSR2) {
            if wl::corrupt_requested() {
                own[BUF / 2] ^= 1;
            }
            let mut problems = Vec::new();
            let now = ids();
            match recorded {
                None => problems.push("never recorded its ids".to_string()),
                Some(r) if r != now => {
                    problems.push(format!("(pid, ppid, pgid, sid) was {r:?}, now {now:?}"))
                }
                Some(_) => {}
            }
            if !matches(inh.root as u64, &inh.kept) {
                problems.push("inherited buffer lost the root's pattern".into());
            }
            if !matches(me as u64, &inh.overwritten) {
                problems.push("overwritten inherited buffer differs".into());
            }
            if !matches(me as u64 ^ 0x55, &own) {
                problems.push("own buffer differs".into());
            }
            if let Some(check) = &extra_check {
                problems.extend(check());
            }
            if !problems.is_empty() {
                wl::say(&format!("MEMBER-FAIL pid={me} {}", problems.join("; ")));
            }
            // A reply to the wrong parent would never arrive: the root
            // knows it by pid.
            wl::sigqueue(
                inh.root,
                sig_reply(),
                me as i64 * 2 + problems.is_empty() as i64,
            );
        }
        wl::sleep_ms(10);
    }
}

/// Starts a thread that forks a child living about a millisecond and reaps
/// it, over and over. The check wants more forks since the last one, all
/// reaped with status 0.
fn forking() -> MemberCheck {
    static FORKS: AtomicU64 = AtomicU64::new(0);
    static BAD: AtomicU64 = AtomicU64::new(0);
    let body = || loop {
        // SAFETY: the child only sleeps and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls only.
            unsafe {
                libc::usleep(1000);
                libc::_exit(0);
            }
        }
        if pid > 0 {
            let mut status = 0;
            // SAFETY: live out-pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                BAD.fetch_add(1, Ordering::SeqCst);
            }
            FORKS.fetch_add(1, Ordering::SeqCst);
        }
        wl::sleep_ms(1);
    };
    std::thread::spawn(body);
    let last = std::cell::Cell::new(0u64);
    Box::new(move || {
        let start = Instant::now();
        while FORKS.load(Ordering::SeqCst) <= last.get() && start.elapsed() < Duration::from_secs(2)
        {
            wl::sleep_ms(5);
        }
        let now = FORKS.load(Ordering::SeqCst);
        let mut p = Vec::new();
        if now <= last.get() {
            p.push(format!("forking stopped at {now}"));
        }
        let bad = BAD.load(Ordering::SeqCst);
        if bad != 0 {
            p.push(format!("{bad} children not reaped with status 0"));
        }
        last.set(now);
        p
    })
}

/// A thread that keeps counting; the check wants it to have advanced.
fn counting_thread() -> Option<MemberCheck> {
    static TICKS: AtomicU64 = AtomicU64::new(0);
    std::thread::spawn(|| loop {
        TICKS.fetch_add(1, Ordering::SeqCst);
        wl::sleep_ms(5);
    });
    let last = std::cell::Cell::new(0u64);
    Some(Box::new(move || {
        let start = Instant::now();
        while TICKS.load(Ordering::SeqCst) <= last.get() && start.elapsed() < Duration::from_secs(2)
        {
            wl::sleep_ms(5);
        }
        let now = TICKS.load(Ordering::SeqCst);
        let r = if now > last.get() {
            vec![]
        } else {
            vec![format!("second thread stuck at {now}")]
        };
        last.set(now);
        r
    }))
}

const PAGE: usize = 4096;
const SHM_LEN: usize = 4 << 20;
/// Words at the start of the shared region: the nonce, then one per member.
const SLOTS: usize = 16;
static NONCES: AtomicU64 = AtomicU64::new(1);

fn shared_anon(len: usize) -> usize {
    // SAFETY: a new shared anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        wl::fail_setup("mmap MAP_SHARED|MAP_ANONYMOUS");
    }
    p as usize
}

/// Word `i` of the shared region at `base` (its first page is read-write).
fn shm_word(base: usize, i: usize) -> &'static AtomicU64 {
    assert!(i < SLOTS);
    // SAFETY: the region is mapped for the life of the process, its first
    // page read-write; AtomicU64 has the alignment of the page-aligned base.
    unsafe { &*((base + i * 8) as *const AtomicU64) }
}

fn shared_bulk_ok(base: usize, root: i32) -> bool {
    // SAFETY: the region stays mapped and readable; its bulk is never
    // written after setup.
    let bulk = unsafe { std::slice::from_raw_parts((base + PAGE) as *const u8, SHM_LEN - PAGE) };
    matches(root as u64 ^ 0xabc, bulk)
}

/// A zombie child of the calling task, exiting with `code` or killed by `sig`.
fn zombie_child(code: i32, sig: i32) -> i32 {
    let pid = wl::fork();
    if pid == 0 {
        if sig != 0 {
            // SAFETY: default action for `sig`, unblocked, then raised.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(sig);
            }
        }
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            wl::fail_setup("a zombie child did not exit");
        }
        wl::sleep_ms(2);
    }
    pid
}

/// Reaps zombie `pid` (which must still be one) and checks its status.
fn reap_check(pid: i32, code: i32, sig: i32, problems: &mut Vec<String>) {
    // SAFETY: siginfo_t is plain data filled by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: live out-pointer; WNOWAIT leaves the zombie in place.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: filled by a successful waitid.
    if r != 0 || unsafe { info.si_pid() } != pid {
        problems.push(format!("child {pid} is not a zombie of ours (waitid {r})"));
        return;
    }
    let mut status = 0;
    // SAFETY: live out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    let ok = r == pid
        && if sig != 0 {
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == sig
        } else {
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code
        };
    if !ok {
        problems.push(format!(
            "zombie {pid}: waitpid {r} status {status:#x}, expected code {code} signal {sig}"
        ));
    }
}

fn setpgid(pid: i32, pgid: i32) {
    // SAFETY: plain syscall.
    if unsafe { libc::setpgid(pid, pgid) } != 0 {
        let e = std::io::Error::last_os_error();
        // The child may have done it (or exec'd nothing: never EACCES here).
        if e.raw_os_error() != Some(libc::ESRCH) {
            wl::fail_setup(&format!("setpgid({pid}, {pgid})"));
        }
    }
}

fn pgid_sid(pid: i32) -> (i32, i32) {
    // SAFETY: plain syscalls.
    unsafe { (libc::getpgid(pid), libc::getsid(pid)) }
}

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "multitask".into());
    wl::catch(libc::SIGUSR1);
    wl::catch(libc::SIGUSR2);
    let hello = wl::block(&[sig_hello()]);
    let reply = wl::block(&[sig_reply()]);
    let root = getpid();
    let mut inh = Inherited {
        kept: vec![0u8; BUF],
        overwritten: vec![0u8; BUF],
        root,
    };
    pattern(root as u64, &mut inh.kept);
    pattern(root as u64, &mut inh.overwritten);
    let expected_members: usize;
    let mut zombies: Vec<(i32, i32, i32)> = Vec::new(); // (pid, code, signal) of ours
    let mut member_zombies: Vec<i32> = Vec::new();
    let mut setup_problems: Vec<String> = Vec::new();
    let mut shape_checks: Vec<ShapeCheck> = Vec::new();
    let mut shared_region: Option<usize> = None;

    match mode.as_str() {
        "child-pipe" => {
            // A pipe from the root to a child.
            let mut fds = [0i32; 2];
            // SAFETY: pipe writes two descriptors into the array.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                wl::fail_setup("pipe");
            }
            if wl::fork() == 0 {
                // SAFETY: closing our copy of the write end.
                unsafe { libc::close(fds[1]) };
                member(&mut inh, || None);
            }
            // SAFETY: closing our copy of the read end.
            unsafe { libc::close(fds[0]) };
            expected_members = 1;
        }
        "multitask" | "child-socket" | "child-cwd" => {
            for i in 0..4 {
                if wl::fork() == 0 {
                    match i {
                        0 => member(&mut inh, counting_thread),
                        1 => {
                            if wl::fork() == 0 {
                                member(&mut inh, || None);
                            }
                            member(&mut inh, || None)
                        }
                        2 if mode == "child-socket" => {
                            // A netlink socket: a kind the engine refuses.
                            // SAFETY: socket(2) takes no pointers.
                            let fd = unsafe {
                                libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)
                            };
                            if fd < 0 {
                                wl::fail_setup("netlink socket");
                            }
                            member(&mut inh, || None)
                        }
                        3 if mode == "child-cwd" => {
                            if std::env::set_current_dir("cwd-child").is_err() {
                                wl::fail_setup("chdir cwd-child");
                            }
                            member(&mut inh, || None)
                        }
                        _ => member(&mut inh, || None),
                    }
                }
            }
            expected_members = 5;
            let rootish = pgid_sid(root);
            shape_checks.push(Box::new(move |m| {
                m.iter()
                    .filter(|&&p| pgid_sid(p) != rootish)
                    .map(|p| format!("member {p} not in the root's group and session"))
                    .collect()
            }));
        }
        "session-left" => {
            if wl::fork() == 0 {
                if wl::fork() == 0 {
                    member(&mut inh, || None);
                }
                // SAFETY: plain syscall in a child that leads no group.
                if unsafe { libc::setsid() } < 0 {
                    wl::fail_setup("setsid");
                }
                member(&mut inh, || None);
            }
            expected_members = 2;
        }
        "forker" => {
            // Two members keep forking short-lived children (from a second
            // thread), so the dump meets tasks appearing, exiting and being
            // reaped while it freezes the tree.
            for _ in 0..2 {
                if wl::fork() == 0 {
                    member(&mut inh, || Some(forking()));
                }
            }
            expected_members = 2;
        }
        "pgrp" => {
            let b = wl::fork();
            if b == 0 {
                member(&mut inh, || None);
            }
            let a = wl::fork();
            if a == 0 {
                setpgid(0, 0);
                member(&mut inh, || None);
            }
            setpgid(a, a);
            setpgid(b, a);
            let c = wl::fork();
            if c == 0 {
                // SAFETY: plain syscall in a fresh child (not a group leader).
                if unsafe { libc::setsid() } < 0 {
                    wl::fail_setup("setsid");
                }
                if wl::fork() == 0 {
                    member(&mut inh, || None); // D
                }
                if wl::fork() == 0 {
                    setpgid(0, 0);
                    member(&mut inh, || None); // E
                }
                member(&mut inh, || None)
            }
            expected_members = 5;
            shape_checks.push(Box::new(move |m| {
                let mut p = Vec::new();
                if pgid_sid(b) != (a, root) || pgid_sid(a) != (a, root) {
                    p.push(format!(
                        "B {b} {:?} / A {a} {:?}: expected group {a} in session {root}",
                        pgid_sid(b),
                        pgid_sid(a)
                    ));
                }
                if pgid_sid(c) != (c, c) {
                    p.push(format!(
                        "C {c} does not lead its session: {:?}",
                        pgid_sid(c)
                    ));
                }
                let in_c: Vec<i32> = m
                    .iter()
                    .copied()
                    .filter(|&x| x != a && x != b && x != c)
                    .collect();
                let own_group = in_c.iter().filter(|&&x| pgid_sid(x) == (x, c)).count();
                let c_group = in_c.iter().filter(|&&x| pgid_sid(x) == (c, c)).count();
                if in_c.len() != 2 || own_group != 1 || c_group != 1 {
                    p.push(format!(
                        "C's children {:?}: expected one in C's group, one leading its own, \
                         both in session {c}",
                        in_c.iter().map(|&x| (x, pgid_sid(x))).collect::<Vec<_>>()
                    ));
                }
                p
            }));
        }
        "bench" => {
            // wl_tree bench TASKS PRIVATE_MIB SHARED_MIB
            let (tasks, priv_mib, shared_mib) = (arg(2, 50).max(1), arg(3, 4), arg(4, 16));
            let shared_len = (shared_mib << 20).max(PAGE);
            let base = shared_anon(shared_len);
            // SAFETY: the region was just mapped read-write.
            let region = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, shared_len) };
            pattern(root as u64 ^ 0xbe, region);
            for _ in 1..tasks {
                if wl::fork() == 0 {
                    member(&mut inh, move || {
                        let me = getpid() as u64;
                        let mut private = vec![0u8; priv_mib << 20];
                        pattern(me ^ 0x77, &mut private);
                        Some(Box::new(move || {
                            let mut p = Vec::new();
                            if !matches(me ^ 0x77, &private) {
                                p.push("private memory differs".to_string());
                            }
                            // SAFETY: the shared region stays mapped, never written again.
                            let region = unsafe {
                                std::slice::from_raw_parts(base as *const u8, shared_len)
                            };
                            if !matches(root as u64 ^ 0xbe, region) {
                                p.push("shared memory differs".into());
                            }
                            p
                        }))
                    });
                }
            }
            expected_members = tasks - 1;
        }
        "inherit" => {
            // wl_tree inherit TASKS MIB: the root fills MIB of private
            // memory, then forks TASKS - 1 children that only read it (it
            // stays shared copy-on-write); each checks it on verify.
            let (tasks, mib) = (arg(2, 8).max(1), arg(3, 16));
            let mut big = vec![0u8; mib << 20];
            pattern(root as u64 ^ 0x1e, &mut big);
            let big: &'static [u8] = Box::leak(big.into_boxed_slice());
            for _ in 1..tasks {
                if wl::fork() == 0 {
                    member(&mut inh, move || {
                        Some(Box::new(move || {
                            if matches(root as u64 ^ 0x1e, big) {
                                Vec::new()
                            } else {
                                vec!["inherited memory differs".to_string()]
                            }
                        }))
                    });
                }
            }
            expected_members = tasks - 1;
        }
        "shmem" => {
            let base = shared_anon(SHM_LEN);
            // SAFETY: the region was just mapped read-write, SHM_LEN bytes.
            let bulk =
                unsafe { std::slice::from_raw_parts_mut((base + PAGE) as *mut u8, SHM_LEN - PAGE) };
            pattern(root as u64 ^ 0xabc, bulk);
            // SAFETY: mprotect of the last MiB of our own mapping.
            if unsafe {
                libc::mprotect(
                    (base + SHM_LEN - (1 << 20)) as *mut libc::c_void,
                    1 << 20,
                    libc::PROT_READ,
                )
            } != 0
            {
                wl::fail_setup("mprotect");
            }
            shared_region = Some(base);
            for slot in 1..4 {
                if wl::fork() == 0 {
                    member(&mut inh, move || {
                        Some(Box::new(move || {
                            let mut p = Vec::new();
                            let nonce = shm_word(base, 0).load(Ordering::SeqCst);
                            if nonce == 0 {
                                p.push("no nonce from the root in the shared region".to_string());
                            }
                            shm_word(base, slot).store(
                                (getpid() as u64) << 32 | (nonce & 0xffff_ffff),
                                Ordering::SeqCst,
                            );
                            if !shared_bulk_ok(base, root) {
                                p.push("shared bulk differs".into());
                            }
                            p
                        }))
                    });
                }
            }
            expected_members = 3;
        }
        "zombie" => {
            zombies.push((zombie_child(7, 0), 7, 0));
            zombies.push((zombie_child(0, libc::SIGTERM), 0, libc::SIGTERM));
            if wl::fork() == 0 {
                let z = zombie_child(5, 0);
                member(&mut inh, move || {
                    Some(Box::new(move || {
                        let mut p = Vec::new();
                        reap_check(z, 5, 0, &mut p);
                        p
                    }))
                });
            }
            expected_members = 1;
        }
        "orphan" | "orphan-group" | "orphan-session" => {
            // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) }
                != 0
            {
                wl::fail_setup("PR_SET_CHILD_SUBREAPER");
            }
            let m = wl::fork();
            if m == 0 {
                if mode == "orphan-group" {
                    setpgid(0, 0);
                }
                // SAFETY: plain syscall in a fresh child (not a group leader).
                if mode == "orphan-session" && unsafe { libc::setsid() } < 0 {
                    wl::fail_setup("setsid");
                }
                if wl::fork() == 0 {
                    // Wait to be adopted by the root.
                    // SAFETY: getppid has no arguments.
                    while unsafe { libc::getppid() } != root {
                        wl::sleep_ms(2);
                    }
                    member(&mut inh, || None);
                }
                // SAFETY: _exit ends the middle child at once.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: live out-pointer.
            if unsafe { libc::waitpid(m, &mut status, 0) } != m {
                wl::fail_setup("waitpid of the middle child");
            }
            expected_members = 1;
            shape_checks.push(Box::new(move |m| {
                m.iter()
                    .filter(|&&p| {
                        std::fs::read_to_string(format!("/proc/{p}/stat"))
                            .ok()
                            .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok())
                            != Some(root)
                    })
                    .map(|p| format!("orphan {p} is not the root's child"))
                    .collect()
            }));
        }
        other => {
            wl::say(&format!("SETUP-ERROR unknown mode {other}"));
            std::process::exit(2);
        }
    }

    // Members say hello; then they record their ids.
    let mut members = Vec::new();
    while members.len() < expected_members {
        match wl::wait_value(&hello, Duration::from_secs(20)) {
            Some(v) => members.push(v as i32),
            None => wl::fail_setup("a member did not say hello"),
        }
    }
    members.sort_unstable();
    if mode == "zombie" {
        // The live child's own zombie: its only child.
        member_zombies =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", members[0]))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
    }
    for check in &shape_checks {
        setup_problems.extend(check(&members));
    }
    if !setup_problems.is_empty() {
        wl::say(&format!("SETUP-ERROR {}", setup_problems.join("; ")));
        std::process::exit(2);
    }
    for &m in &members {
        // SAFETY: plain kill of one of our members.
        unsafe { libc::kill(m, libc::SIGUSR1) };
    }
    let mut acks = 0;
    while acks < members.len() {
        if wl::wait_value(&reply, Duration::from_secs(20)).is_none() {
            wl::fail_setup("a member did not record its ids");
        }
        acks += 1;
    }
    let my_ids = ids();
    let join = |v: &[i32]| {
        v.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let zpids: Vec<i32> = zombies
        .iter()
        .map(|z| z.0)
        .chain(member_zombies.iter().copied())
        .collect();
    wl::ready(&format!(
        "mode={mode} members={} zombies={}",
        join(&members),
        join(&zpids)
    ));

    let mut own = vec![0u8; BUF];
    pattern(root as u64 ^ 0x55, &mut own);
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut problems = Vec::new();
            if ids() != my_ids {
                problems.push(format!("root ids were {my_ids:?}, now {:?}", ids()));
            }
            if !matches(root as u64, &inh.kept) || !matches(root as u64, &inh.overwritten) {
                problems.push("root's buffers differ".into());
            }
            if !matches(root as u64 ^ 0x55, &own) {
                problems.push("root's own buffer differs".into());
            }
            for check in &shape_checks {
                problems.extend(check(&members));
            }
            if mode.starts_with("orphan") {
                let mut v: libc::c_int = 0;
                // SAFETY: PR_GET_CHILD_SUBREAPER writes one int to a live local.
                unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut v as *mut libc::c_int) };
                if v == 0 {
                    problems.push("the root is no longer a child subreaper".into());
                }
            }
            for &(z, code, sig) in &zombies {
                reap_check(z, code, sig, &mut problems);
            }
            let nonce = (NONCES
                .fetch_add(1, Ordering::SeqCst)
                .wrapping_mul(0x9e37_79b9)
                ^ root as u64)
                & 0xffff_ffff
                | 1;
            if let Some(base) = shared_region {
                shm_word(base, 0).store(nonce, Ordering::SeqCst);
                if !shared_bulk_ok(base, root) {
                    problems.push("shared bulk differs in the root".into());
                }
            }
            for &m in &members {
                // SAFETY: plain kill of one of our members.
                unsafe { libc::kill(m, libc::SIGUSR2) };
            }
            let mut answered = std::collections::BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            while answered.len() < members.len() && Instant::now() < deadline {
                if let Some(v) = wl::wait_value(&reply, Duration::from_millis(500)) {
                    let (pid, ok) = ((v / 2) as i32, v % 2 == 1);
                    if !ok {
                        problems.push(format!("member {pid} failed its checks (see MEMBER-FAIL)"));
                    }
                    answered.insert(pid);
                }
            }
            for m in members.iter().filter(|m| !answered.contains(m)) {
                problems.push(format!("member {m} did not answer"));
            }
            if let Some(base) = shared_region {
                for &m in &members {
                    let want = (m as u64) << 32 | (nonce & 0xffff_ffff);
                    if !(1..SLOTS).any(|i| shm_word(base, i).load(Ordering::SeqCst) == want) {
                        problems.push(format!(
                            "member {m}'s answer in the shared region is not visible to the root"
                        ));
                    }
                }
            }
            wl::verdict(
                &format!(
                    "mode={mode} root and {} members: pids, parents, groups, sessions, memory{}",
                    members.len(),
                    if zombies.is_empty() && member_zombies.is_empty() {
                        String::new()
                    } else {
                        format!("; {} zombies reaped with their status", zpids.len())
                    }
                ),
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
