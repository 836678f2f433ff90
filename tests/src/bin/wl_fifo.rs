//! Workload `wl_fifo`: FIFOs (named pipes) opened by the process.
//!
//! In its working directory it creates `fifo_a` (mode 0640) and opens it as
//! fd 70 (O_RDONLY | O_NONBLOCK) and fd 71 (O_WRONLY, blocking), sets its
//! size to 128 KiB and writes 80000 bytes of a pattern into it (more than a
//! default 64 KiB pipe holds); and `fifo_b` (mode 0600), opened once as
//! fd 72 (O_RDWR | O_NONBLOCK), sized 1 MiB (fs.pipe-max-size by default)
//! and holding the 7 bytes "rw fifo".
//!
//! With `--fork`, it forks a child once the FIFOs are full (`members=PID`
//! in READY): the child holds fds 70-72 too and only sleeps; the bytes must
//! come back once, not once per task.
//!
//! With `--write-only PATH`, it also opens the FIFO at PATH (whose reader
//! is another process) write-only as fd 73, which a dump must refuse.
//!
//! Fd 74 is a dup of fd 70 (one open file description: clearing O_NONBLOCK
//! on one clears it on the other).
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks that fds 70-72 are the FIFOs
//! now at those paths (same inode, still FIFOs, fifo_b mode 0600), their
//! access modes and O_NONBLOCK, fifo_a's size; reads exactly the saved bytes
//! from fd 70 and fd 72 (then EAGAIN: nothing duplicated, nothing lost);
//! checks that a byte written to fd 71 comes out of fd 70 and one written
//! to fd 72 comes back from it; then refills both FIFOs and prints `PASS ...`
//! or `FAIL ...`.

use crm_tests::wl;
use std::ffi::CString;

const A_R: i32 = 70;
const A_W: i32 = 71;
const B_RW: i32 = 72;
const A_DUP: i32 = 74;
const A_SIZE: i32 = 128 << 10;
const B_SIZE: i32 = 1 << 20;
const A_LEN: usize = 80_000;
const B_TEXT: &[u8] = b"rw fifo";

fn pattern() -> Vec<u8> {
    (0..A_LEN).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn mkfifo(path: &str, mode: u32) {
    let c = CString::new(path).expect("no NUL");
    // SAFETY: `c` is NUL-terminated; chmod sets the mode past the umask.
    unsafe {
        if libc::mkfifo(c.as_ptr(), mode) != 0 || libc::chmod(c.as_ptr(), mode) != 0 {
            wl::fail_setup(&format!("mkfifo {path}"));
        }
    }
}

fn open_at(path: &str, flags: i32, at: i32) {
    let c = CString::new(path).expect("no NUL");
    // SAFETY: `c` is NUL-terminated; dup2 moves the new fd to `at`.
    unsafe {
        let fd = libc::open(c.as_ptr(), flags);
        if fd < 0 || libc::dup2(fd, at) < 0 {
            wl::fail_setup(&format!("open {path}"));
        }
        libc::close(fd);
    }
}

fn write_all(fd: i32, data: &[u8]) -> bool {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: writing from a live slice.
        let n = unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Everything readable now from a non-blocking fd (until EAGAIN), or the
/// errno of another failure.
fn drain(fd: i32) -> Result<Vec<u8>, i32> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            out.extend_from_slice(&buf[..n as usize]);
            continue;
        }
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return if n < 0 && e == libc::EAGAIN {
            Ok(out)
        } else {
            Err(if n == 0 { -1 } else { e })
        };
    }
}

fn stat_ino(path: &str) -> Option<(u64, u32)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type()
        .is_fifo()
        .then_some((m.ino(), m.mode() & 0o7777))
}

fn fstat_ino(fd: i32) -> Option<u64> {
    // SAFETY: all-zero is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    (ok && st.st_mode & libc::S_IFMT == libc::S_IFIFO).then_some(st.st_ino)
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: F_GETFL on our descriptor.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn check() -> Vec<String> {
    let mut p = Vec::new();
    let corrupt = wl::corrupt_requested();
    for (fd, path, want_mode) in [
        (A_R, "fifo_a", 0o640),
        (A_W, "fifo_a", 0o640),
        (B_RW, "fifo_b", 0o600),
    ] {
        match (fstat_ino(fd), stat_ino(path)) {
            (Some(a), Some((b, mode))) if a == b => {
                if mode != want_mode {
                    p.push(format!("{path} has mode {mode:o}, want {want_mode:o}"));
                }
            }
            other => p.push(format!("fd {fd} is not the FIFO at {path}: {other:?}")),
        }
    }
    for (fd, acc, nonblock) in [
        (A_R, libc::O_RDONLY, true),
        (A_W, libc::O_WRONLY, false),
        (B_RW, libc::O_RDWR, true),
    ] {
        let fl = getfl(fd);
        if fl < 0 || fl & libc::O_ACCMODE != acc || (fl & libc::O_NONBLOCK != 0) != nonblock {
            p.push(format!(
                "fd {fd}: flags {fl:#o}, want access mode {acc} nonblock {nonblock}"
            ));
        }
    }
    // SAFETY: F_GETPIPE_SZ on our descriptor.
    let size = unsafe { libc::fcntl(A_R, libc::F_GETPIPE_SZ) };
    if size != A_SIZE {
        p.push(format!("fifo_a holds {size} bytes, want {A_SIZE}"));
    }
    // SAFETY: F_GETPIPE_SZ on our descriptor.
    let size = unsafe { libc::fcntl(B_RW, libc::F_GETPIPE_SZ) };
    if size != B_SIZE {
        p.push(format!("fifo_b holds {size} bytes, want {B_SIZE}"));
    }
    // SAFETY: F_SETFL on our own descriptors.
    unsafe { libc::fcntl(A_R, libc::F_SETFL, 0) };
    let shared = getfl(A_DUP) & libc::O_NONBLOCK == 0;
    // SAFETY: as above.
    unsafe { libc::fcntl(A_R, libc::F_SETFL, libc::O_NONBLOCK) };
    if !shared {
        p.push("fd 74 does not share fd 70's open file description".into());
    }
    if corrupt {
        let _ = drain(A_R);
    }
    match drain(A_R) {
        Ok(d) if d == pattern() => {}
        Ok(d) => p.push(format!(
            "fifo_a gave {} bytes, want the {A_LEN} bytes written",
            d.len()
        )),
        Err(e) => p.push(format!("reading fifo_a: errno {e}")),
    }
    match drain(B_RW) {
        Ok(d) if d == B_TEXT => {}
        other => p.push(format!("fifo_b gave {other:?}, want {B_TEXT:?}")),
    }
    if !write_all(A_W, b"x") || drain(A_R) != Ok(b"x".to_vec()) {
        p.push("a byte written to fd 71 did not come out of fd 70".into());
    }
    if !write_all(B_RW, b"y") || drain(B_RW) != Ok(b"y".to_vec()) {
        p.push("a byte written to fd 72 did not come back".into());
    }
    if !write_all(A_W, &pattern()) || !write_all(B_RW, B_TEXT) {
        p.push("refilling the FIFOs failed".into());
    }
    p
}

fn main() {
    wl::catch(libc::SIGUSR2);
    mkfifo("fifo_a", 0o640);
    mkfifo("fifo_b", 0o600);
    open_at("fifo_a", libc::O_RDONLY | libc::O_NONBLOCK, A_R);
    open_at("fifo_a", libc::O_WRONLY, A_W);
    open_at("fifo_b", libc::O_RDWR | libc::O_NONBLOCK, B_RW);
    // SAFETY: duplicating our own descriptor.
    if unsafe { libc::dup2(A_R, A_DUP) } < 0 {
        wl::fail_setup("dup2");
    }
    // SAFETY: resizing our own FIFO.
    if unsafe { libc::fcntl(A_W, libc::F_SETPIPE_SZ, A_SIZE) } < 0 {
        wl::fail_setup("F_SETPIPE_SZ");
    }
    // SAFETY: resizing our own FIFO.
    if unsafe { libc::fcntl(B_RW, libc::F_SETPIPE_SZ, B_SIZE) } < 0 {
        wl::fail_setup("F_SETPIPE_SZ of 1 MiB (fs.pipe-max-size?)");
    }
    if !write_all(A_W, &pattern()) || !write_all(B_RW, B_TEXT) {
        wl::fail_setup("fill the FIFOs");
    }
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path] = args.as_slice() {
        if flag == "--write-only" {
            open_at(path, libc::O_WRONLY | libc::O_NONBLOCK, 73);
        }
    }
    let mut members = String::new();
    if args.iter().any(|a| a == "--fork") {
        // SAFETY: single-threaded; the child only sleeps until killed.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: pause(2) has no arguments.
                unsafe { libc::pause() };
            },
            p if p < 0 => wl::fail_setup("fork"),
            p => members = format!(" members={p}"),
        }
    }
    wl::ready(&format!("fifo_a=70/71 fifo_b=72{members}"));
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "fifo_a (fds 70 ro nonblock, 71 wo) kept 128 KiB size and 80000 bytes; fifo_b (fd 72 rw nonblock) kept 1 MiB size and its 7 bytes; fd 74 a dup of 70",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
