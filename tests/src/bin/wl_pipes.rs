//! Workload `wl_pipes`: pipes with both ends in the process.
//!
//! Pipe A: read end fd 60, write end fd 61, size 256 KiB, holding the 10
//! bytes "hello pipe". Pipe B: read end fd 62 (non-blocking), write end fd 63
//! and its duplicate fd 64, empty.
//!
//! Protocol: `READY pid=N`; on SIGUSR2 checks pipe A's size and reads its 10
//! bytes; checks that fd 62 is empty (EAGAIN), that a byte written to fd 64
//! comes out of fd 62 and that fd 63 is still open; then refills pipe A and
//! prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;

const A_R: i32 = 60;
const A_W: i32 = 61;
const B_R: i32 = 62;
const B_W: i32 = 63;
const B_W2: i32 = 64;
const A_SIZE: i32 = 256 << 10;
const TEXT: &[u8] = b"hello pipe";

fn make(r: i32, w: i32, flags: i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the local array; dup2 moves the ends.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), 0) != 0
            || libc::dup2(fds[0], r) < 0
            || libc::dup2(fds[1], w) < 0
        {
            wl::fail_setup("pipe2");
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
        libc::fcntl(r, libc::F_SETFL, flags);
    }
}

fn write_all(fd: i32, data: &[u8]) {
    // SAFETY: writing from a local slice.
    if unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) }
        != data.len() as isize
    {
        wl::fail_setup("write to a pipe");
    }
}

fn read_some(fd: i32, n: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; n];
    // SAFETY: reading into a local buffer.
    let k = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, n) };
    if k < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(k as usize);
    Ok(buf)
}

fn check() -> Vec<String> {
    let mut problems = Vec::new();
    // SAFETY: fcntl queries on our descriptors.
    let (size, b_fl, bw_ok) = unsafe {
        (
            libc::fcntl(A_R, libc::F_GETPIPE_SZ),
            libc::fcntl(B_R, libc::F_GETFL),
            libc::fcntl(B_W, libc::F_GETFD) >= 0,
        )
    };
    if size != A_SIZE {
        problems.push(format!("pipe A holds {size} bytes, want {A_SIZE}"));
    }
    match read_some(A_R, 64) {
        Ok(d) if d == TEXT => {}
        other => problems.push(format!("pipe A gave {other:?}, want {TEXT:?}")),
    }
    if b_fl & libc::O_NONBLOCK == 0 {
        problems.push("fd 62 is blocking".into());
    }
    match read_some(B_R, 8) {
        Err(libc::EAGAIN) => {}
        other => problems.push(format!("empty pipe B gave {other:?}, want EAGAIN")),
    }
    write_all(B_W2, b"x");
    match read_some(B_R, 8) {
        Ok(d) if d == b"x" => {}
        other => problems.push(format!("pipe B via fd 64 gave {other:?}, want \"x\"")),
    }
    if !bw_ok {
        problems.push("fd 63 is closed".into());
    }
    write_all(A_W, TEXT);
    problems
}

fn main() {
    wl::catch(libc::SIGUSR2);
    make(A_R, A_W, 0);
    // SAFETY: resizing our own pipe; duplicating our own descriptor.
    unsafe {
        if libc::fcntl(A_W, libc::F_SETPIPE_SZ, A_SIZE) < 0 {
            wl::fail_setup("F_SETPIPE_SZ");
        }
    }
    write_all(A_W, TEXT);
    make(B_R, B_W, libc::O_NONBLOCK);
    // SAFETY: duplicating our own descriptor.
    if unsafe { libc::dup2(B_W, B_W2) } < 0 {
        wl::fail_setup("dup2");
    }
    wl::ready("pipe_a=60/61 pipe_b=62/63+64");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            wl::verdict(
                "pipe A kept 256 KiB and its 10 bytes; pipe B non-blocking, dup'd write end works",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
