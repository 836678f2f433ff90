//! Workload `wl_ipc MODE KEY`: SysV IPC objects with key KEY (hex), created
//! exclusively, owned by uid 1234 / gid 4321.
//!
//! - `msq`: a message queue holding five messages of types 1, 7, 2, 1, 5
//!   (text, 3000 bytes, empty, text, binary). Check: key, owner, mode, five
//!   messages queued; received in order (type 0) with their bytes; queue
//!   empty after; then queued again.
//! - `sem`: a set of five semaphores with values 0, 1, 7, 100, 32767.
//!   Check: key, owner, mode, values; `semop` (+3 on #0, -7 on #2, no wait)
//!   gives 3 and 0; undone again.
//! - `shm`: a segment of 3 pages + 1000 bytes filled with a pattern,
//!   attached read-write at A (its last two pages then made read-only: two
//!   VMAs) and read-only at B. Check: key, owner, mode, size, 3 attachments
//!   (the split counts); in `maps` A is `rw-s` then `r--s`, B `r--s`, all
//!   `/SYSV<key> (deleted)` with the id as inode; contents; a byte written
//!   through A shows through B and through a new attachment (then 4).
//! - `shm_newns`: `shm` in a new IPC namespace of its own (which a dump
//!   refuses).
//! - `shm_multi`: a 2-page segment attached by the root, a child that
//!   inherited the attachment and a child that attached it itself at
//!   another address; then marked for deletion (IPC_RMID). Check (root):
//!   3 attachments, SHM_DEST set, key now private, contents; the root
//!   writes a nonce, each child sees it, checks the contents and its own
//!   attachment in `maps`, and writes back the nonce and its verdict,
//!   which the root sees.
//!
//! With CWD, the workload runs in that directory (a test removes it to make
//! a restore fail).
//!
//! Protocol: `READY pid=N id=ID [members=C1,C2]`; on SIGUSR2 checks and
//! prints `PASS ...` or `FAIL ...`. Objects are removed on a setup failure;
//! otherwise the test removes them.

use crm_tests::wl;
use std::sync::atomic::{AtomicU64, Ordering};

const UID: u32 = 1234;
const GID: u32 = 4321;
const MODE: u32 = 0o640;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 && args.len() != 4 {
        wl::fail_setup("usage: wl_ipc msq|sem|shm|shm_newns|shm_multi KEY [CWD]");
    }
    if let Some(dir) = args.get(3) {
        if std::env::set_current_dir(dir).is_err() {
            wl::fail_setup(&format!("chdir {dir}"));
        }
    }
    let key = u32::from_str_radix(args[2].trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| wl::fail_setup("bad key")) as i32;
    wl::catch(libc::SIGUSR2);
    let mut check: Box<dyn FnMut() -> (String, Vec<String>)> = match args[1].as_str() {
        "msq" => Box::new(msq(key)),
        "sem" => Box::new(sem(key)),
        "shm" => Box::new(shm(key)),
        "shm_newns" => {
            // SAFETY: unshare takes no pointers.
            if unsafe { libc::unshare(libc::CLONE_NEWIPC) } != 0 {
                wl::fail_setup("unshare(CLONE_NEWIPC)");
            }
            Box::new(shm(key))
        }
        "shm_multi" => Box::new(shm_multi(key)),
        m => wl::fail_setup(&format!("unknown mode {m}")),
    };
    loop {
        wl::sleep_ms(10);
        if wl::take(libc::SIGUSR2) {
            let (what, problems) = check();
            wl::verdict(&what, &problems);
        }
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Key, owner and permission bits of `perm` against what setup made.
fn check_perm(p: &libc::ipc_perm, key: i32, problems: &mut Vec<String>) {
    let got = (p.__key, p.uid, p.gid, u32::from(p.mode) & 0o777);
    let want = (key, UID, GID, MODE);
    if got != want {
        problems.push(format!("(key, uid, gid, mode) is {got:x?}, want {want:x?}"));
    }
}

fn set_owner(perm: &mut libc::ipc_perm) {
    perm.uid = UID;
    perm.gid = GID;
    perm.mode = MODE as u16;
}

// ---- msq ----

fn messages() -> Vec<(i64, Vec<u8>)> {
    vec![
        (1, b"first message".to_vec()),
        (7, (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()),
        (2, Vec::new()),
        (1, b"again".to_vec()),
        (5, vec![0, 1, 2, 255]),
    ]
}

fn send_all(id: i32) -> Result<(), String> {
    for (t, data) in messages() {
        let mut buf = t.to_ne_bytes().to_vec();
        buf.extend_from_slice(&data);
        // SAFETY: `buf` holds the type and `data.len()` bytes.
        let r = unsafe {
            libc::msgsnd(
                id,
                buf.as_ptr() as *const libc::c_void,
                data.len(),
                libc::IPC_NOWAIT,
            )
        };
        if r != 0 {
            return Err(format!("msgsnd type {t}: {}", errno()));
        }
    }
    Ok(())
}

fn msq(key: i32) -> impl FnMut() -> (String, Vec<String>) {
    // SAFETY: no pointers.
    let id = unsafe { libc::msgget(key, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    if id < 0 {
        wl::fail_setup("msgget");
    }
    let cleanup = |what: &str| -> ! {
        // SAFETY: removing our own queue.
        unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        wl::fail_setup(what)
    };
    // SAFETY: msqid_ds is plain old data; IPC_STAT/IPC_SET use a live local.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        if libc::msgctl(id, libc::IPC_STAT, &mut ds) != 0 {
            cleanup("msgctl IPC_STAT");
        }
        set_owner(&mut ds.msg_perm);
        if libc::msgctl(id, libc::IPC_SET, &mut ds) != 0 {
            cleanup("msgctl IPC_SET");
        }
    }
    if let Err(e) = send_all(id) {
        cleanup(&e);
    }
    wl::ready(&format!("id={id}"));
    move || {
        let mut problems = Vec::new();
        // SAFETY: as above.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT into a live local.
        if unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            return (
                "msq".into(),
                vec![format!("msgctl({id}, IPC_STAT): {}", errno())],
            );
        }
        check_perm(&ds.msg_perm, key, &mut problems);
        if ds.msg_qnum != 5 {
            problems.push(format!("{} messages queued, want 5", ds.msg_qnum));
        }
        let mut want = messages();
        if wl::corrupt_requested() {
            want[1].1[10] ^= 1;
        }
        for (i, (t, data)) in want.iter().enumerate() {
            let mut buf = vec![0u8; 8 + 8192];
            // SAFETY: `buf` holds a long and 8192 bytes of text.
            let n = unsafe {
                libc::msgrcv(
                    id,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    8192,
                    0,
                    libc::IPC_NOWAIT,
                )
            };
            if n < 0 {
                problems.push(format!("message {i}: msgrcv: {}", errno()));
                break;
            }
            let got_t = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
            let got = &buf[8..8 + n as usize];
            if got_t != *t || got != data.as_slice() {
                problems.push(format!(
                    "message {i} is type {got_t} with {} bytes, want type {t} with {} bytes{}",
                    got.len(),
                    data.len(),
                    if got_t == *t && got.len() == data.len() {
                        " (bytes differ)"
                    } else {
                        ""
                    }
                ));
            }
        }
        let mut buf = [0u8; 64];
        // SAFETY: `buf` holds a long and 56 bytes.
        let n = unsafe {
            libc::msgrcv(
                id,
                buf.as_mut_ptr() as *mut libc::c_void,
                56,
                0,
                libc::IPC_NOWAIT,
            )
        };
        if n >= 0 {
            problems.push("an extra message was queued".into());
        }
        if let Err(e) = send_all(id) {
            problems.push(e);
        }
        (
            format!("msq id {id}: 5 messages in order, key, owner, mode"),
            problems,
        )
    }
}

// ---- sem ----

const SEM_VALUES: [u16; 5] = [0, 1, 7, 100, 32767];

fn sem_values(id: i32) -> Result<Vec<u16>, String> {
    let mut v = vec![0u16; SEM_VALUES.len()];
    // SAFETY: GETALL writes one unsigned short per semaphore (5) into `v`.
    if unsafe { libc::semctl(id, 0, libc::GETALL, v.as_mut_ptr()) } != 0 {
        return Err(format!("semctl GETALL: {}", errno()));
    }
    Ok(v)
}

fn semop(id: i32, ops: &[(u16, i16)]) -> Result<(), String> {
    let mut s: Vec<libc::sembuf> = ops
        .iter()
        .map(|&(n, op)| libc::sembuf {
            sem_num: n,
            sem_op: op,
            sem_flg: libc::IPC_NOWAIT as i16,
        })
        .collect();
    // SAFETY: `s` holds `s.len()` sembufs.
    if unsafe { libc::semop(id, s.as_mut_ptr(), s.len()) } != 0 {
        return Err(format!("semop {ops:?}: {}", errno()));
    }
    Ok(())
}

fn sem(key: i32) -> impl FnMut() -> (String, Vec<String>) {
    // SAFETY: no pointers.
    let id = unsafe {
        libc::semget(
            key,
            SEM_VALUES.len() as i32,
            libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
        )
    };
    if id < 0 {
        wl::fail_setup("semget");
    }
    let cleanup = |what: &str| -> ! {
        // SAFETY: removing our own set.
        unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
        wl::fail_setup(what)
    };
    // SAFETY: SETALL reads 5 unsigned shorts; semid_ds is plain old data
    // used through a live local.
    unsafe {
        if libc::semctl(id, 0, libc::SETALL, SEM_VALUES.as_ptr()) != 0 {
            cleanup("semctl SETALL");
        }
        let mut ds: libc::semid_ds = std::mem::zeroed();
        if libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) != 0 {
            cleanup("semctl IPC_STAT");
        }
        set_owner(&mut ds.sem_perm);
        if libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) != 0 {
            cleanup("semctl IPC_SET");
        }
    }
    wl::ready(&format!("id={id}"));
    move || {
        let mut problems = Vec::new();
        // SAFETY: as above.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT into a live local.
        if unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) } != 0 {
            return (
                "sem".into(),
                vec![format!("semctl({id}, IPC_STAT): {}", errno())],
            );
        }
        check_perm(&ds.sem_perm, key, &mut problems);
        if ds.sem_nsems != SEM_VALUES.len() as _ {
            problems.push(format!("{} semaphores, want 5", ds.sem_nsems));
        }
        let mut want = SEM_VALUES.to_vec();
        if wl::corrupt_requested() {
            want[3] += 1;
        }
        match sem_values(id) {
            Ok(v) if v == want => {}
            Ok(v) => problems.push(format!("values {v:?}, want {want:?}")),
            Err(e) => problems.push(e),
        }
        let ops = semop(id, &[(0, 3), (2, -7)]).and_then(|()| sem_values(id));
        match ops {
            Ok(v) if v[0] == 3 && v[2] == 0 => {}
            Ok(v) => problems.push(format!("after semop: {v:?}, want 3 and 0 first")),
            Err(e) => problems.push(e),
        }
        if let Err(e) = semop(id, &[(0, -3), (2, 7)]) {
            problems.push(e);
        }
        (
            format!("sem id {id}: values, semop, key, owner, mode"),
            problems,
        )
    }
}

// ---- shm ----

const SHM_SIZE: usize = 3 * 4096 + 1000;

fn pattern(i: usize) -> u8 {
    (i * 13 % 253) as u8 + 1
}

fn shmat(id: i32, flags: i32) -> Result<*mut u8, String> {
    // SAFETY: the kernel picks a free address.
    let p = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    if p as isize == -1 {
        return Err(format!("shmat({id}, {flags:#o}): {}", errno()));
    }
    Ok(p as *mut u8)
}

fn shm_stat(id: i32) -> Result<libc::shmid_ds, String> {
    // SAFETY: shmid_ds is plain old data; IPC_STAT into a live local.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) != 0 {
            return Err(format!("shmctl({id}, IPC_STAT): {}", errno()));
        }
        Ok(ds)
    }
}

/// The `maps` line of the VMA starting at `addr`: (perms, inode, name).
fn maps_entry(addr: u64) -> Option<(String, u64, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let range = f.next()?;
        let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
        if start != addr {
            return None;
        }
        let perms = f.next()?.to_string();
        let _off = f.next()?;
        let _dev = f.next()?;
        let inode = f.next()?.parse().ok()?;
        let name = f.collect::<Vec<_>>().join(" ");
        Some((perms, inode, name))
    })
}

/// The VMA at `addr` is an attachment of segment `id` with `perms`, named
/// after `key` (`None`: any key; a segment marked for deletion before the
/// dump comes back with key 0, and its name says so).
fn check_map(addr: u64, perms: &str, id: i32, key: Option<i32>, problems: &mut Vec<String>) {
    let name = |k: i32| format!("/SYSV{:08x} (deleted)", k as u32);
    match maps_entry(addr) {
        Some((p, ino, n))
            if p == perms
                && ino == id as u64
                && key.map_or(n.starts_with("/SYSV") && n.ends_with(" (deleted)"), |k| {
                    n == name(k)
                }) => {}
        got => problems.push(format!(
            "maps at {addr:#x}: {got:?}, want {perms} with inode {id} named {}",
            key.map_or("/SYSV...".into(), name)
        )),
    }
}

fn shm(key: i32) -> impl FnMut() -> (String, Vec<String>) {
    // SAFETY: no pointers.
    let id = unsafe { libc::shmget(key, SHM_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    if id < 0 {
        wl::fail_setup("shmget");
    }
    let cleanup = |what: &str| -> ! {
        // SAFETY: removing our own segment.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        wl::fail_setup(what)
    };
    let mut ds = shm_stat(id).unwrap_or_else(|e| cleanup(&e));
    set_owner(&mut ds.shm_perm);
    // SAFETY: IPC_SET from a live local.
    if unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) } != 0 {
        cleanup("shmctl IPC_SET");
    }
    let a = shmat(id, 0).unwrap_or_else(|e| cleanup(&e));
    let b = shmat(id, libc::SHM_RDONLY).unwrap_or_else(|e| cleanup(&e)) as *const u8;
    for i in 0..SHM_SIZE {
        // SAFETY: inside the read-write attachment of SHM_SIZE bytes.
        unsafe { *a.add(i) = pattern(i) };
    }
    // The last two pages of A read-only: A is two VMAs now (and the
    // split counts as one more attachment).
    // SAFETY: mprotect inside our attachment, which nothing writes to there.
    if unsafe {
        libc::mprotect(
            a.add(2 * 4096) as *mut libc::c_void,
            2 * 4096,
            libc::PROT_READ,
        )
    } != 0
    {
        cleanup("mprotect");
    }
    wl::ready(&format!("id={id} a={:#x} b={:#x}", a as u64, b as u64));
    move || {
        let mut problems = Vec::new();
        match shm_stat(id) {
            Ok(ds) => {
                check_perm(&ds.shm_perm, key, &mut problems);
                if ds.shm_segsz != SHM_SIZE || ds.shm_nattch != 3 {
                    problems.push(format!(
                        "size {} with {} attachments, want {SHM_SIZE} with 3 (A split in two, B)",
                        ds.shm_segsz, ds.shm_nattch
                    ));
                }
            }
            Err(e) => return ("shm".into(), vec![e]),
        }
        check_map(a as u64, "rw-s", id, Some(key), &mut problems);
        check_map(a as u64 + 2 * 4096, "r--s", id, Some(key), &mut problems);
        check_map(b as u64, "r--s", id, Some(key), &mut problems);
        if wl::corrupt_requested() {
            // SAFETY: inside the attachment.
            unsafe { *a.add(5000) ^= 1 };
        }
        // SAFETY: both attachments are SHM_SIZE bytes long and mapped.
        let (sa, sb) = unsafe {
            (
                std::slice::from_raw_parts(a, SHM_SIZE),
                std::slice::from_raw_parts(b, SHM_SIZE),
            )
        };
        if let Some(i) = (0..SHM_SIZE).find(|&i| sa[i] != pattern(i)) {
            problems.push(format!(
                "contents differ from byte {i} ({} != {})",
                sa[i],
                pattern(i)
            ));
        }
        // A write through A shows through B and through a new attachment.
        // SAFETY: inside the read-write attachment.
        unsafe { std::ptr::write_volatile(a.add(100), 0) };
        // SAFETY: inside the read-only attachment.
        let via_b = unsafe { std::ptr::read_volatile(b.add(100)) };
        match shmat(id, libc::SHM_RDONLY) {
            Ok(c) => {
                // SAFETY: inside the new attachment.
                let via_c = unsafe { std::ptr::read_volatile(c.add(100)) };
                let nattch = shm_stat(id).map(|d| d.shm_nattch);
                if via_b != 0 || via_c != 0 || nattch != Ok(4) {
                    problems.push(format!(
                        "a byte written through A reads {via_b} through B and {via_c} through \
                         a new attachment, with {nattch:?} attachments; want 0, 0 and 4"
                    ));
                }
                // SAFETY: detaching the attachment made above.
                unsafe { libc::shmdt(c as *const libc::c_void) };
            }
            Err(e) => problems.push(e),
        }
        // SAFETY: inside the read-write attachment.
        unsafe { std::ptr::write_volatile(a.add(100), pattern(100)) };
        let _ = sb;
        (
            format!("shm id {id}: contents, addresses, attachments, key, owner, mode"),
            problems,
        )
    }
}

// ---- shm_multi ----

const MULTI_SIZE: usize = 2 * 4096;
/// u64 words in the second page: request nonce, then (echo, verdict) per child.
const REQ: usize = 4096 / 8;

fn word(base: *mut u8, i: usize) -> &'static AtomicU64 {
    // SAFETY: `base` is a shared attachment of MULTI_SIZE bytes that lives
    // as long as the process; word `i` lies in its second page, 8-aligned.
    unsafe { &*(base as *const AtomicU64).add(i) }
}

fn multi_contents_ok(base: *const u8) -> bool {
    // SAFETY: the first page of the attachment.
    let s = unsafe { std::slice::from_raw_parts(base, 4096) };
    (0..4096).all(|i| s[i] == pattern(i))
}

/// A child: answers each new nonce with its verdict (1 = ok, 2 = bad).
fn multi_child(base: *mut u8, slot: usize, id: i32) -> ! {
    let parent = std::os::unix::process::parent_id();
    let mut last = word(base, REQ).load(Ordering::SeqCst);
    loop {
        wl::sleep_ms(5);
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
        let req = word(base, REQ).load(Ordering::SeqCst);
        if req == last {
            continue;
        }
        last = req;
        let mut problems = Vec::new();
        check_map(base as u64, "rw-s", id, None, &mut problems);
        let ok = multi_contents_ok(base) && problems.is_empty();
        word(base, REQ + 2 * slot + 2).store(if ok { 1 } else { 2 }, Ordering::SeqCst);
        word(base, REQ + 2 * slot + 1).store(req, Ordering::SeqCst);
    }
}

fn shm_multi(key: i32) -> impl FnMut() -> (String, Vec<String>) {
    // SAFETY: no pointers.
    let id = unsafe { libc::shmget(key, MULTI_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    if id < 0 {
        wl::fail_setup("shmget");
    }
    let cleanup = |what: &str| -> ! {
        // SAFETY: removing our own segment.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        wl::fail_setup(what)
    };
    let base = shmat(id, 0).unwrap_or_else(|e| cleanup(&e));
    for i in 0..4096 {
        // SAFETY: inside the attachment.
        unsafe { *base.add(i) = pattern(i) };
    }
    let mut children = Vec::new();
    for slot in 0..2 {
        // SAFETY: fork in a single-threaded process.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            cleanup("fork");
        }
        if pid == 0 {
            let mine = if slot == 0 {
                base
            } else {
                // The second child attaches the segment itself elsewhere.
                let own = shmat(id, 0).unwrap_or_else(|e| wl::fail_setup(&e));
                // SAFETY: detaching the inherited attachment, unused from now on.
                unsafe { libc::shmdt(base as *const libc::c_void) };
                own
            };
            multi_child(mine, slot, id);
        }
        children.push(pid);
    }
    // Every task attached: mark the segment for deletion (it lives on
    // while attached).
    wl::sleep_ms(50);
    // SAFETY: IPC_RMID takes no buffer.
    if unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
        for &c in &children {
            // SAFETY: killing our own children.
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
        cleanup("shmctl IPC_RMID");
    }
    wl::ready(&format!(
        "id={id} members={}",
        children
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));
    let mut nonce = 0u64;
    move || {
        let mut problems = Vec::new();
        match shm_stat(id) {
            Ok(ds) => {
                let dest = u32::from(ds.shm_perm.mode) & 0o1000 != 0;
                if ds.shm_nattch != 3 || !dest || ds.shm_perm.__key != 0 {
                    problems.push(format!(
                        "{} attachments, marked for deletion {dest}, key {:#x}; want 3, true, 0",
                        ds.shm_nattch, ds.shm_perm.__key
                    ));
                }
            }
            Err(e) => return ("shm_multi".into(), vec![e]),
        }
        check_map(base as u64, "rw-s", id, None, &mut problems);
        if wl::corrupt_requested() {
            // SAFETY: inside the attachment.
            unsafe { *base.add(7) ^= 1 };
        }
        if !multi_contents_ok(base) {
            problems.push("the root sees other contents".into());
        }
        nonce += 1;
        let req = (std::process::id() as u64) << 32 | nonce;
        word(base, REQ).store(req, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for (slot, child) in children.iter().enumerate() {
            loop {
                if word(base, REQ + 2 * slot + 1).load(Ordering::SeqCst) == req {
                    let v = word(base, REQ + 2 * slot + 2).load(Ordering::SeqCst);
                    if v != 1 {
                        problems.push(format!("child {} reports contents or maps wrong", child));
                    }
                    break;
                }
                if std::time::Instant::now() > deadline {
                    problems.push(format!("child {} did not see the root's write", child));
                    break;
                }
                wl::sleep_ms(5);
            }
        }
        if wl::corrupt_requested() {
            // SAFETY: inside the attachment.
            unsafe { *base.add(7) ^= 1 };
        }
        (
            format!("shm_multi id {id}: 3 tasks share the segment"),
            problems,
        )
    }
}
