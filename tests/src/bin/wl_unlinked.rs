//! Workload `wl_unlinked`: files unlinked while open, and O_APPEND.
//!
//! In its working directory it creates `ghost.dat` (256 KiB of a pattern,
//! mode 0640), opens it as fd 50 (O_RDWR, offset 1000) and fd 51
//! (O_WRONLY | O_APPEND), then unlinks it; fd 53 is a dup of fd 50 (one
//! open file description). It also opens `kept.log` as fd 52
//! (O_WRONLY | O_APPEND, the file stays).
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks:
//! - fd 50 and 51 refer to a file with no name (st_nlink 0), mode 0640,
//!   holding the pattern (read through fd 50 with pread, which keeps the
//!   offset), fd 50's offset is still 1000, fd 51 is still O_APPEND;
//! - writing at fd 50's offset and reading it back works;
//! - fd 53 shares fd 50's open file description (same offset, moved
//!   together);
//! - fd 52 is O_APPEND: a write lands at the end of `kept.log` although its
//!   offset was moved to 0;
//!
//! then prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;
use std::ffi::CString;

const GHOST_FD: i32 = 50;
const GHOST_APPEND_FD: i32 = 51;
const LOG_FD: i32 = 52;
const GHOST_DUP_FD: i32 = 53;
const SIZE: usize = 256 << 10;
const OFFSET: i64 = 1000;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn open_at(path: &str, flags: i32, mode: u32, at: i32) {
    let c = CString::new(path).expect("no NUL");
    // SAFETY: `c` is NUL-terminated; dup2 moves the new fd to `at`.
    unsafe {
        let fd = libc::open(c.as_ptr(), flags, mode);
        if fd < 0 {
            wl::fail_setup(&format!("open {path}"));
        }
        if libc::dup2(fd, at) < 0 {
            wl::fail_setup("dup2");
        }
        libc::close(fd);
    }
}

fn setup() {
    let data: Vec<u8> = (0..SIZE).map(pattern).collect();
    std::fs::write("ghost.dat", &data).unwrap_or_else(|_| wl::fail_setup("write ghost.dat"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions("ghost.dat", std::fs::Permissions::from_mode(0o640))
        .unwrap_or_else(|_| wl::fail_setup("chmod ghost.dat"));
    open_at("ghost.dat", libc::O_RDWR, 0, GHOST_FD);
    open_at(
        "ghost.dat",
        libc::O_WRONLY | libc::O_APPEND,
        0,
        GHOST_APPEND_FD,
    );
    // SAFETY: lseek on our own descriptor.
    if unsafe { libc::lseek(GHOST_FD, OFFSET, libc::SEEK_SET) } != OFFSET {
        wl::fail_setup("lseek");
    }
    // SAFETY: duplicating our own descriptor.
    if unsafe { libc::dup2(GHOST_FD, GHOST_DUP_FD) } < 0 {
        wl::fail_setup("dup2");
    }
    std::fs::remove_file("ghost.dat").unwrap_or_else(|_| wl::fail_setup("unlink ghost.dat"));
    std::fs::write("kept.log", b"first line\n").unwrap_or_else(|_| wl::fail_setup("kept.log"));
    open_at("kept.log", libc::O_WRONLY | libc::O_APPEND, 0, LOG_FD);
}

fn fstat(fd: i32) -> Option<libc::stat> {
    // SAFETY: all-zero is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    for fd in [GHOST_FD, GHOST_APPEND_FD] {
        match fstat(fd) {
            None => problems.push(format!("fd {fd} is not open")),
            Some(st) => {
                if st.st_nlink != 0 {
                    problems.push(format!(
                        "fd {fd}: the file has {} names, want 0",
                        st.st_nlink
                    ));
                }
                if st.st_mode & 0o7777 != 0o640 {
                    problems.push(format!("fd {fd}: mode {:o}, want 640", st.st_mode & 0o7777));
                }
                if st.st_size as usize != SIZE {
                    problems.push(format!("fd {fd}: size {}, want {SIZE}", st.st_size));
                }
            }
        }
    }
    let mut buf = vec![0u8; SIZE];
    // SAFETY: pread into our buffer of SIZE bytes.
    let n = unsafe { libc::pread(GHOST_FD, buf.as_mut_ptr().cast(), SIZE, 0) };
    if n != SIZE as isize {
        problems.push(format!("pread of fd {GHOST_FD} returned {n}"));
    } else if let Some(i) = (0..SIZE).find(|&i| buf[i] != pattern(i)) {
        problems.push(format!(
            "fd {GHOST_FD}: byte {i} is {:#x}, want {:#x}",
            buf[i],
            pattern(i)
        ));
    }
    // SAFETY: lseek/fcntl queries on our own descriptors.
    let (pos, fl) = unsafe {
        (
            libc::lseek(GHOST_FD, 0, libc::SEEK_CUR),
            libc::fcntl(GHOST_APPEND_FD, libc::F_GETFL),
        )
    };
    if pos != OFFSET {
        problems.push(format!("fd {GHOST_FD}: offset {pos}, want {OFFSET}"));
    }
    if fl & libc::O_APPEND == 0 {
        problems.push(format!("fd {GHOST_APPEND_FD} lost O_APPEND"));
    }
    // Write at the offset and read it back (the pattern is restored after).
    let probe = *b"probe";
    // SAFETY: pwrite/pread of a local 5-byte buffer.
    unsafe {
        libc::pwrite(GHOST_FD, probe.as_ptr().cast(), probe.len(), OFFSET);
        let mut back = [0u8; 5];
        libc::pread(GHOST_FD, back.as_mut_ptr().cast(), 5, OFFSET);
        if back != probe {
            problems.push(format!(
                "fd {GHOST_FD}: wrote {probe:?}, read back {back:?}"
            ));
        }
        let orig: Vec<u8> = (OFFSET as usize..OFFSET as usize + 5)
            .map(pattern)
            .collect();
        libc::pwrite(GHOST_FD, orig.as_ptr().cast(), 5, OFFSET);
    }
    // fd 53 is fd 50's open file description: moving one moves the other.
    // SAFETY: lseek on our own descriptors.
    let (dup_pos, moved) = unsafe {
        let p = libc::lseek(GHOST_DUP_FD, 0, libc::SEEK_CUR);
        libc::lseek(GHOST_DUP_FD, OFFSET + 24, libc::SEEK_SET);
        let m = libc::lseek(GHOST_FD, 0, libc::SEEK_CUR);
        libc::lseek(GHOST_FD, OFFSET, libc::SEEK_SET);
        (p, m)
    };
    if dup_pos != OFFSET || moved != OFFSET + 24 {
        problems.push(format!(
            "fd {GHOST_DUP_FD} does not share fd {GHOST_FD}'s offset: {dup_pos}, then {moved}"
        ));
    }
    // O_APPEND on a named file: the write goes to the end whatever the offset.
    let before = std::fs::metadata("kept.log").map(|m| m.len()).unwrap_or(0);
    let line = b"appended\n";
    // SAFETY: lseek and write of a local buffer on our own descriptor.
    let wrote = unsafe {
        libc::lseek(LOG_FD, 0, libc::SEEK_SET);
        libc::write(LOG_FD, line.as_ptr().cast(), line.len())
    };
    let after = std::fs::read("kept.log").unwrap_or_default();
    if wrote != line.len() as isize || after.len() as u64 != before + line.len() as u64 {
        problems.push(format!(
            "fd {LOG_FD}: O_APPEND write of {} bytes went wrong (file {} -> {} bytes)",
            line.len(),
            before,
            after.len()
        ));
    } else if !after.starts_with(b"first line\n") || !after.ends_with(line) {
        problems.push(format!(
            "kept.log holds {:?}",
            String::from_utf8_lossy(&after)
        ));
    }
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    setup();
    wl::ready("ghost_fd=50 ghost_append_fd=51 log_fd=52 ghost_dup_fd=53");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "unlinked file (fds 50, 51: contents, mode, offset, O_APPEND; fd 53 a dup of 50) and O_APPEND log (fd 52)",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
