//! Workload `wl_memfd`: memfds held as descriptors and mapped by one task.
//!
//! - fd 30: memfd `crm-plain` (sealing allowed, no seals), 3 pages and 100
//!   bytes, page 1 a hole (never written), offset 1234, read-write;
//!   fd 32 is a dup of fd 30 (same open file description). Mapped twice:
//!   `MAP_SHARED` (its writes reach the file) and `MAP_PRIVATE`, whose page 0
//!   was written (a private copy the file does not see).
//! - fd 31: memfd `crm sealed` (a space in the name), sealed with
//!   F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL, opened again
//!   read-only through `/proc/self/fd` at offset 7; mapped `MAP_SHARED`
//!   read-only.
//! - fd 33: memfd `crm-noexec`, created with MFD_NOEXEC_SEAL (mode without
//!   x bits, F_SEAL_EXEC), holding `noexec`; `crm-plain` has mode 0640.
//! - memfd `crm-mapped`, created without MFD_ALLOW_SEALING (seals read
//!   F_SEAL_SEAL), mapped `MAP_SHARED` and then its descriptor closed: only
//!   the mapping refers to it.
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks names, sizes, seals, flags,
//! offsets, the dup, contents through read() and through every mapping,
//! that a write through the shared mapping is seen by read() (and put
//! back), that the sealed memfd refuses writes, and that the private copy
//! is still private; prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;
use std::ffi::CString;

const PLAIN_FD: i32 = 30;
const SEALED_FD: i32 = 31;
const DUP_FD: i32 = 32;
const NOEXEC_FD: i32 = 33;
/// `MFD_NOEXEC_SEAL` (Linux 6.3; not in the libc crate yet).
const MFD_NOEXEC_SEAL: u32 = 0x8;
const PLAIN_MODE: u32 = 0o640;
const PAGE: usize = 4096;
const PLAIN_SIZE: usize = 3 * PAGE + 100;
const PLAIN_POS: i64 = 1234;
const SEALED_SIZE: usize = 2 * PAGE;
const SEALED_POS: i64 = 7;
const MAPPED_SIZE: usize = 5 * PAGE;
const SEALS: i32 = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
const PRIVATE_MARK: &[u8] = b"PRIVATE COPY";

fn pattern(seed: u8, off: usize) -> u8 {
    (off as u8).wrapping_mul(7).wrapping_add(seed) | 1
}

/// Expected byte `off` of `crm-plain` (page 1 is a hole).
fn plain_byte(off: usize) -> u8 {
    if (PAGE..2 * PAGE).contains(&off) {
        0
    } else {
        pattern(1, off)
    }
}

fn memfd(name: &str, flags: u32) -> i32 {
    let c = CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name; returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags) };
    if fd < 0 {
        wl::fail_setup("memfd_create");
    }
    fd
}

fn pwrite_all(fd: i32, data: &[u8], off: usize) {
    // SAFETY: writing from a live slice.
    let n = unsafe {
        libc::pwrite(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            off as i64,
        )
    };
    if n != data.len() as isize {
        wl::fail_setup("pwrite");
    }
}

fn map(fd: i32, len: usize, prot: i32, flags: i32) -> *mut u8 {
    // SAFETY: a new mapping where the kernel chooses.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        wl::fail_setup("mmap of a memfd");
    }
    p as *mut u8
}

fn move_to(fd: i32, to: i32) {
    // SAFETY: dup2 then close of our own descriptors.
    unsafe {
        if libc::dup2(fd, to) < 0 {
            wl::fail_setup("dup2");
        }
        libc::close(fd);
    }
}

fn read_at(fd: i32, len: usize, off: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: reading into a live buffer.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr() as *mut libc::c_void, len, off as i64) };
    buf.truncate(n.max(0) as usize);
    buf
}

fn link(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn pos(fd: i32) -> i64 {
    // SAFETY: lseek on our descriptor.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn fcntl(fd: i32, cmd: i32) -> i32 {
    // SAFETY: fcntl query on our descriptor.
    unsafe { libc::fcntl(fd, cmd) }
}

fn size(fd: i32) -> i64 {
    // SAFETY: fstat into a zeroed local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return -1;
    }
    st.st_size
}

fn mode(fd: i32) -> u32 {
    // SAFETY: fstat into a zeroed local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::fstat(fd, &mut st) };
    st.st_mode & 0o7777
}

struct Maps {
    plain_shared: *mut u8,
    plain_private: *mut u8,
    sealed_shared: *mut u8,
    mapped: *mut u8,
}

fn slice(p: *mut u8, len: usize) -> &'static mut [u8] {
    // SAFETY: each pointer is a live mapping of at least `len` bytes,
    // used only by this single-threaded workload.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn setup() -> Maps {
    let plain = memfd("crm-plain", libc::MFD_ALLOW_SEALING);
    // SAFETY: ftruncate on our descriptor.
    if unsafe { libc::ftruncate(plain, PLAIN_SIZE as i64) } != 0 {
        wl::fail_setup("ftruncate");
    }
    let data: Vec<u8> = (0..PLAIN_SIZE).map(plain_byte).collect();
    pwrite_all(plain, &data[..PAGE], 0);
    pwrite_all(plain, &data[2 * PAGE..], 2 * PAGE);
    let len = 4 * PAGE;
    let plain_shared = map(
        plain,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    );
    let plain_private = map(
        plain,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE,
    );
    slice(plain_private, PAGE)[..PRIVATE_MARK.len()].copy_from_slice(PRIVATE_MARK);
    // SAFETY: fchmod on our descriptor.
    if unsafe { libc::fchmod(plain, PLAIN_MODE) } != 0 {
        wl::fail_setup("fchmod");
    }
    move_to(plain, PLAIN_FD);
    let noexec = memfd("crm-noexec", MFD_NOEXEC_SEAL);
    pwrite_all(noexec, b"noexec", 0);
    move_to(noexec, NOEXEC_FD);
    // SAFETY: lseek/dup2 on our descriptors.
    unsafe {
        libc::lseek(PLAIN_FD, PLAIN_POS, libc::SEEK_SET);
        if libc::dup2(PLAIN_FD, DUP_FD) < 0 {
            wl::fail_setup("dup2");
        }
    }

    let sealed = memfd("crm sealed", libc::MFD_ALLOW_SEALING);
    let data: Vec<u8> = (0..SEALED_SIZE).map(|o| pattern(2, o)).collect();
    pwrite_all(sealed, &data, 0);
    // SAFETY: fcntl on our descriptor.
    if unsafe { libc::fcntl(sealed, libc::F_ADD_SEALS, SEALS) } != 0 {
        wl::fail_setup("F_ADD_SEALS");
    }
    let sealed_shared = map(sealed, SEALED_SIZE, libc::PROT_READ, libc::MAP_SHARED);
    let path = CString::new(format!("/proc/self/fd/{sealed}")).unwrap();
    // SAFETY: a NUL-terminated path; a new descriptor.
    let ro = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    if ro < 0 {
        wl::fail_setup("reopen the sealed memfd read-only");
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(sealed) };
    move_to(ro, SEALED_FD);
    // SAFETY: lseek on our descriptor.
    unsafe { libc::lseek(SEALED_FD, SEALED_POS, libc::SEEK_SET) };

    let only_mapped = memfd("crm-mapped", 0);
    let data: Vec<u8> = (0..MAPPED_SIZE).map(|o| pattern(3, o)).collect();
    pwrite_all(only_mapped, &data, 0);
    let mapped = map(
        only_mapped,
        MAPPED_SIZE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    );
    // SAFETY: closing our descriptor; the mapping keeps the memfd.
    unsafe { libc::close(only_mapped) };
    Maps {
        plain_shared,
        plain_private,
        sealed_shared,
        mapped,
    }
}

fn check(m: &Maps) -> Vec<String> {
    let mut p = Vec::new();
    let mut expect = |cond: bool, what: String| {
        if !cond {
            p.push(what);
        }
    };
    // crm-plain
    let l = link(PLAIN_FD);
    expect(
        l == "/memfd:crm-plain (deleted)",
        format!("fd {PLAIN_FD} links to {l:?}"),
    );
    expect(
        size(PLAIN_FD) == PLAIN_SIZE as i64,
        format!("crm-plain size {}", size(PLAIN_FD)),
    );
    let want: Vec<u8> = (0..PLAIN_SIZE).map(plain_byte).collect();
    expect(
        read_at(PLAIN_FD, PLAIN_SIZE + 10, 0) == want,
        "crm-plain contents (read) differ".into(),
    );
    let shared = slice(m.plain_shared, PLAIN_SIZE);
    expect(
        shared[..] == want[..],
        "crm-plain contents (shared mapping) differ".into(),
    );
    let private = slice(m.plain_private, PLAIN_SIZE);
    expect(
        private[..PRIVATE_MARK.len()] == *PRIVATE_MARK && private[PAGE..] == want[PAGE..],
        "crm-plain private mapping lost its private copy or its file pages".into(),
    );
    expect(
        pos(PLAIN_FD) == PLAIN_POS,
        format!("fd {PLAIN_FD} offset {}", pos(PLAIN_FD)),
    );
    expect(
        fcntl(PLAIN_FD, libc::F_GETFL) & libc::O_ACCMODE == libc::O_RDWR,
        format!("fd {PLAIN_FD} is not read-write"),
    );
    expect(
        fcntl(PLAIN_FD, libc::F_GET_SEALS) == 0,
        format!("crm-plain seals {:#x}", fcntl(PLAIN_FD, libc::F_GET_SEALS)),
    );
    // The dup shares the offset.
    // SAFETY: lseek on our descriptors.
    unsafe { libc::lseek(DUP_FD, 99, libc::SEEK_SET) };
    expect(
        pos(PLAIN_FD) == 99,
        format!("fd {DUP_FD} is no longer a dup of fd {PLAIN_FD}"),
    );
    // SAFETY: as above.
    unsafe { libc::lseek(PLAIN_FD, PLAIN_POS, libc::SEEK_SET) };
    // A write through the shared mapping is seen by read(); the private
    // mapping keeps its copy of page 0 but sees page 2 change.
    shared[2 * PAGE] ^= 0xff;
    let seen = read_at(PLAIN_FD, 1, 2 * PAGE);
    expect(
        seen == [want[2 * PAGE] ^ 0xff],
        "a write through the shared mapping is not seen by read()".into(),
    );
    expect(
        private[2 * PAGE] == want[2 * PAGE] ^ 0xff,
        "the private mapping does not see the file's unwritten page change".into(),
    );
    shared[2 * PAGE] ^= 0xff;
    expect(
        read_at(PLAIN_FD, PRIVATE_MARK.len(), 0) != PRIVATE_MARK,
        "the private copy reached the file".into(),
    );

    let plain_mode = mode(PLAIN_FD);
    expect(
        plain_mode == PLAIN_MODE,
        format!("crm-plain mode {plain_mode:o}"),
    );
    // crm-noexec
    let seals = fcntl(NOEXEC_FD, libc::F_GET_SEALS);
    let noexec_mode = mode(NOEXEC_FD);
    expect(
        seals & libc::F_SEAL_EXEC != 0 && noexec_mode & 0o111 == 0 && noexec_mode != 0,
        format!("crm-noexec seals {seals:#x} mode {noexec_mode:o}"),
    );
    expect(
        read_at(NOEXEC_FD, 10, 0) == b"noexec",
        "crm-noexec contents differ".into(),
    );

    // crm sealed
    let l = link(SEALED_FD);
    expect(
        l == "/memfd:crm sealed (deleted)",
        format!("fd {SEALED_FD} links to {l:?}"),
    );
    let seals = fcntl(SEALED_FD, libc::F_GET_SEALS);
    expect(
        seals == SEALS,
        format!("crm sealed seals {seals:#x}, want {SEALS:#x}"),
    );
    let want: Vec<u8> = (0..SEALED_SIZE).map(|o| pattern(2, o)).collect();
    expect(
        read_at(SEALED_FD, SEALED_SIZE, 0) == want,
        "crm sealed contents (read) differ".into(),
    );
    expect(
        slice(m.sealed_shared, SEALED_SIZE)[..] == want[..],
        "crm sealed contents (mapping) differ".into(),
    );
    expect(
        pos(SEALED_FD) == SEALED_POS,
        format!("fd {SEALED_FD} offset {}", pos(SEALED_FD)),
    );
    expect(
        fcntl(SEALED_FD, libc::F_GETFL) & libc::O_ACCMODE == libc::O_RDONLY,
        format!("fd {SEALED_FD} is not read-only"),
    );
    let path = CString::new(format!("/proc/self/fd/{SEALED_FD}")).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let rw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    if rw >= 0 {
        // SAFETY: writing one byte from a local, then closing our descriptor.
        let n = unsafe { libc::pwrite(rw, b"x".as_ptr() as *const libc::c_void, 1, 0) };
        let e = std::io::Error::last_os_error().raw_os_error();
        expect(
            n < 0 && e == Some(libc::EPERM),
            format!("a write to the sealed memfd gave {n} ({e:?})"),
        );
        // SAFETY: as above.
        unsafe { libc::close(rw) };
    } else {
        expect(false, "cannot reopen the sealed memfd read-write".into());
    }

    // crm-mapped (no descriptor left)
    let want: Vec<u8> = (0..MAPPED_SIZE).map(|o| pattern(3, o)).collect();
    expect(
        slice(m.mapped, MAPPED_SIZE)[..] == want[..],
        "crm-mapped contents differ".into(),
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let line = maps
        .lines()
        .find(|l| l.starts_with(&format!("{:x}-", m.mapped as usize)));
    expect(
        line.is_some_and(|l| l.ends_with("/memfd:crm-mapped (deleted)") && l.contains(" rw-s ")),
        format!("crm-mapped is mapped as {line:?}"),
    );
    p
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let maps = setup();
    wl::ready("");
    loop {
        if wl::take(libc::SIGUSR2) {
            if wl::corrupt_requested() {
                slice(maps.mapped, 1)[0] ^= 1;
            }
            wl::verdict("memfd", &check(&maps));
        }
        wl::sleep_ms(20);
    }
}
