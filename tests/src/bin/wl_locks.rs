//! Workload `wl_locks`: file locks and an O_DIRECT file.
//!
//! In its working directory (files of 8 KiB):
//! - `flock.dat`: fd 80 (O_RDWR) holds an exclusive flock; fd 81 is a dup
//!   of fd 80 (the same open file description: the lock shows twice, and
//!   unlocking through fd 81 releases it);
//! - `shared.dat`: fd 82 (O_RDONLY) holds a shared flock;
//! - `posix.dat`: fd 83 (O_RDWR) holds POSIX record locks: write on bytes
//!   0-99, read from byte 200 to EOF;
//! - `ofd.dat`: fd 84 (O_RDWR) holds an OFD write lock on bytes 10-19;
//! - `direct.dat`: fd 85 opened O_RDWR | O_DIRECT (skipped, with
//!   `direct=0` in READY, where the filesystem refuses O_DIRECT).
//!
//! With `--lease`, it also holds a read lease on `lease.dat` (fd 86), which
//! a dump must refuse. With `--fork`, it forks a child once its locks are
//! taken (`members=PID` in READY): the child shares the open file
//! descriptions of fds 80-85, and so their flock and OFD locks, and only
//! sleeps.
//!
//! Protocol: `READY pid=N direct=0|1`; on SIGUSR2 a forked child (a second
//! process, with its own open file descriptions) checks that every lock is
//! held (flock with LOCK_NB, F_GETLK naming this PID, F_OFD_GETLK) and that
//! compatible ones are not reported; the process then drops each lock, the
//! child checks they are free, and the process takes them again. O_DIRECT:
//! F_GETFL shows it, an aligned read returns the contents and a misaligned
//! one fails with EINVAL. Prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;
use std::ffi::CString;

const FLOCK_FD: i32 = 80;
const FLOCK_DUP: i32 = 81;
const SHARED_FD: i32 = 82;
const POSIX_FD: i32 = 83;
const OFD_FD: i32 = 84;
const DIRECT_FD: i32 = 85;
const LEASE_FD: i32 = 86;
const SIZE: usize = 8192;

fn open_at(path: &str, flags: i32, at: i32) -> Result<(), i32> {
    let c = CString::new(path).expect("no NUL");
    // SAFETY: `c` is NUL-terminated; dup2 moves the new fd to `at`.
    unsafe {
        let fd = libc::open(c.as_ptr(), flags);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        if libc::dup2(fd, at) < 0 {
            wl::fail_setup("dup2");
        }
        libc::close(fd);
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn flock(fd: i32, op: i32) -> Result<(), i32> {
    // SAFETY: flock takes integers only.
    if unsafe { libc::flock(fd, op) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn flk(ty: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: plain old data; all-zero is valid.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty as i16;
    f.l_whence = libc::SEEK_SET as i16;
    f.l_start = start;
    f.l_len = len;
    f
}

fn fcntl_lock(fd: i32, cmd: i32, f: &mut libc::flock) -> Result<(), i32> {
    // SAFETY: `f` is a valid struct flock for the call.
    if unsafe { libc::fcntl(fd, cmd, f as *mut libc::flock) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// F_GETLK (or F_OFD_GETLK) of a `ty` lock on `start..start+len`: the
/// conflicting lock's type and pid, or None when it could be taken.
fn query(fd: i32, cmd: i32, ty: i32, start: i64, len: i64) -> Result<Option<(i32, i32)>, i32> {
    let mut f = flk(ty, start, len);
    fcntl_lock(fd, cmd, &mut f)?;
    Ok((f.l_type as i32 != libc::F_UNLCK).then_some((f.l_type as i32, f.l_pid)))
}

fn take_all() -> Result<(), String> {
    flock(FLOCK_FD, libc::LOCK_EX | libc::LOCK_NB).map_err(|e| format!("flock EX: {e}"))?;
    flock(SHARED_FD, libc::LOCK_SH | libc::LOCK_NB).map_err(|e| format!("flock SH: {e}"))?;
    fcntl_lock(POSIX_FD, libc::F_SETLK, &mut flk(libc::F_WRLCK, 0, 100))
        .map_err(|e| format!("F_SETLK write: {e}"))?;
    fcntl_lock(POSIX_FD, libc::F_SETLK, &mut flk(libc::F_RDLCK, 200, 0))
        .map_err(|e| format!("F_SETLK read: {e}"))?;
    fcntl_lock(OFD_FD, libc::F_OFD_SETLK, &mut flk(libc::F_WRLCK, 10, 10))
        .map_err(|e| format!("F_OFD_SETLK: {e}"))
}

fn drop_all() -> Result<(), String> {
    // Through the dup: one open file description, one flock.
    flock(FLOCK_DUP, libc::LOCK_UN).map_err(|e| format!("flock UN: {e}"))?;
    flock(SHARED_FD, libc::LOCK_UN).map_err(|e| format!("flock UN: {e}"))?;
    fcntl_lock(POSIX_FD, libc::F_SETLK, &mut flk(libc::F_UNLCK, 0, 0))
        .map_err(|e| format!("F_SETLK unlock: {e}"))?;
    fcntl_lock(OFD_FD, libc::F_OFD_SETLK, &mut flk(libc::F_UNLCK, 0, 0))
        .map_err(|e| format!("F_OFD_SETLK unlock: {e}"))
}

/// What a second process sees: problems, given whether the locks should
/// be held (`held`) by `owner`.
fn seen_from_outside(held: bool, owner: i32) -> Vec<String> {
    let mut p = Vec::new();
    let open = |path: &str, flags: i32| {
        let c = CString::new(path).expect("no NUL");
        // SAFETY: `c` is NUL-terminated.
        unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) }
    };
    let (fl, sh, px, ofd) = (
        open("flock.dat", libc::O_RDWR),
        open("shared.dat", libc::O_RDONLY),
        open("posix.dat", libc::O_RDWR),
        open("ofd.dat", libc::O_RDWR),
    );
    if fl < 0 || sh < 0 || px < 0 || ofd < 0 {
        return vec!["checker: cannot open the files".into()];
    }
    let busy = Err(libc::EWOULDBLOCK);
    let want_ex = if held { busy } else { Ok(()) };
    let got = flock(fl, libc::LOCK_SH | libc::LOCK_NB);
    if got != want_ex {
        p.push(format!(
            "flock.dat: LOCK_SH from outside gave {got:?}, want {want_ex:?}"
        ));
    }
    let _ = flock(fl, libc::LOCK_UN);
    let got = flock(sh, libc::LOCK_SH | libc::LOCK_NB);
    if got != Ok(()) {
        p.push(format!(
            "shared.dat: LOCK_SH from outside gave {got:?}, want Ok"
        ));
    }
    let _ = flock(sh, libc::LOCK_UN);
    let got = flock(sh, libc::LOCK_EX | libc::LOCK_NB);
    if got != want_ex {
        p.push(format!(
            "shared.dat: LOCK_EX from outside gave {got:?}, want {want_ex:?}"
        ));
    }
    let _ = flock(sh, libc::LOCK_UN);
    let wr = libc::F_WRLCK;
    let expect = |what: &str,
                  got: Result<Option<(i32, i32)>, i32>,
                  want: Option<(i32, i32)>,
                  p: &mut Vec<String>| {
        if got != Ok(want) {
            p.push(format!("{what}: {got:?}, want {want:?}"));
        }
    };
    expect(
        "posix.dat F_GETLK write 0+100",
        query(px, libc::F_GETLK, wr, 0, 100),
        held.then_some((libc::F_WRLCK, owner)),
        &mut p,
    );
    expect(
        "posix.dat F_GETLK write 120+50",
        query(px, libc::F_GETLK, wr, 120, 50),
        None,
        &mut p,
    );
    expect(
        "posix.dat F_GETLK write 300+10",
        query(px, libc::F_GETLK, wr, 300, 10),
        held.then_some((libc::F_RDLCK, owner)),
        &mut p,
    );
    expect(
        "posix.dat F_GETLK read 300+10",
        query(px, libc::F_GETLK, libc::F_RDLCK, 300, 10),
        None,
        &mut p,
    );
    expect(
        "ofd.dat F_OFD_GETLK write 15+1",
        query(ofd, libc::F_OFD_GETLK, wr, 15, 1),
        held.then_some((libc::F_WRLCK, -1)),
        &mut p,
    );
    expect(
        "ofd.dat F_OFD_GETLK write 20+5",
        query(ofd, libc::F_OFD_GETLK, wr, 20, 5),
        None,
        &mut p,
    );
    p
}

/// Runs [`seen_from_outside`] in a forked child; its problems come back
/// through a pipe.
fn from_child(held: bool) -> Vec<String> {
    let owner = std::process::id() as i32;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return vec!["pipe2 failed".into()];
    }
    // SAFETY: the workload is single-threaded; the child only checks
    // locks, writes to the pipe and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let text = seen_from_outside(held, owner).join("; ");
        // SAFETY: writing a local buffer to our pipe, then exiting.
        unsafe {
            libc::write(fds[1], text.as_ptr().cast(), text.len());
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(fds[1]) };
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        text.extend_from_slice(&buf[..n as usize]);
    }
    // SAFETY: reaping our child; closing our read end.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(fds[0]);
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    if text.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{} locks: {text}",
            if held { "held" } else { "dropped" }
        )]
    }
}

fn check_direct() -> Vec<String> {
    let mut p = Vec::new();
    // SAFETY: F_GETFL on our descriptor.
    if unsafe { libc::fcntl(DIRECT_FD, libc::F_GETFL) } & libc::O_DIRECT == 0 {
        p.push("fd 85 lost O_DIRECT".into());
    }
    let layout = std::alloc::Layout::from_size_align(2 * 4096, 4096).expect("layout");
    // SAFETY: a non-zero-sized layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: aligned read of 4096 bytes into our 8 KiB buffer.
    let n = unsafe { libc::pread(DIRECT_FD, buf.cast(), 4096, 0) };
    // SAFETY: the buffer holds 8 KiB.
    let first = unsafe { *buf.add(100) };
    if n != 4096 || first != b'd' {
        p.push(format!(
            "aligned O_DIRECT read gave {n} bytes, byte 100 {first:#x}"
        ));
    }
    // SAFETY: a misaligned read into the same buffer (still in bounds).
    let n = unsafe { libc::pread(DIRECT_FD, buf.add(1).cast(), 4096, 0) };
    if n >= 0 || errno() != libc::EINVAL {
        p.push(format!(
            "a misaligned O_DIRECT read returned {n}, want EINVAL"
        ));
    }
    // SAFETY: freeing what we allocated with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    p
}

fn main() {
    wl::catch(libc::SIGUSR2);
    for (name, fill) in [
        ("flock.dat", b'f'),
        ("shared.dat", b's'),
        ("posix.dat", b'p'),
        ("ofd.dat", b'o'),
        ("direct.dat", b'd'),
        ("lease.dat", b'l'),
    ] {
        std::fs::write(name, vec![fill; SIZE]).unwrap_or_else(|_| wl::fail_setup(name));
    }
    let must = |r: Result<(), i32>, what: &str| {
        if r.is_err() {
            wl::fail_setup(what)
        }
    };
    must(
        open_at("flock.dat", libc::O_RDWR, FLOCK_FD),
        "open flock.dat",
    );
    // SAFETY: duplicating our own descriptor.
    if unsafe { libc::dup2(FLOCK_FD, FLOCK_DUP) } < 0 {
        wl::fail_setup("dup2");
    }
    must(
        open_at("shared.dat", libc::O_RDONLY, SHARED_FD),
        "open shared.dat",
    );
    must(
        open_at("posix.dat", libc::O_RDWR, POSIX_FD),
        "open posix.dat",
    );
    must(open_at("ofd.dat", libc::O_RDWR, OFD_FD), "open ofd.dat");
    let direct = match open_at("direct.dat", libc::O_RDWR | libc::O_DIRECT, DIRECT_FD) {
        Ok(()) => true,
        Err(libc::EINVAL) => false,
        Err(_) => wl::fail_setup("open direct.dat"),
    };
    if let Err(e) = take_all() {
        wl::fail_setup(&e);
    }
    if std::env::args().any(|a| a == "--lease") {
        must(
            open_at("lease.dat", libc::O_RDONLY, LEASE_FD),
            "open lease.dat",
        );
        // SAFETY: F_SETLEASE on our own descriptor.
        if unsafe { libc::fcntl(LEASE_FD, libc::F_SETLEASE, libc::F_RDLCK) } != 0 {
            wl::fail_setup("F_SETLEASE");
        }
    }
    let mut members = String::new();
    if std::env::args().any(|a| a == "--fork") {
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
    wl::ready(&format!("direct={}{members}", direct as u8));
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut problems = from_child(true);
            if wl::corrupt_requested() {
                let _ = flock(FLOCK_FD, libc::LOCK_UN);
                problems.extend(from_child(true));
            }
            match drop_all() {
                Ok(()) => problems.extend(from_child(false)),
                Err(e) => problems.push(e),
            }
            if let Err(e) = take_all() {
                problems.push(format!("taking the locks again: {e}"));
            }
            if direct {
                problems.extend(check_direct());
            }
            wl::verdict(
                "flock (exclusive, through a dup'd fd; shared), POSIX write/read ranges and an OFD lock held as seen from a second process, released on unlock and taken again; O_DIRECT kept",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
