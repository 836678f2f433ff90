//! Workload `wl_tree_files MODE`: a process tree whose tasks share open
//! files, each task checking what it holds.
//!
//! Modes:
//! - `pipes`: pipe P from the root (write end fd 51, O_NONBLOCK, 256 KiB)
//!   to child A (read end fd 50) holding 100 000 unread bytes; pipe Q from A
//!   (write end fd 53) to the root (read end fd 52, O_NONBLOCK) holding
//!   3 000. On verify the root checks P's size and flags, reads Q's bytes
//!   exactly (then EAGAIN) and writes 5 000 more into P; A reads all 105 000
//!   bytes of P in order. Each checks that the ends it closed stay closed.
//! - `pipes2`: a pipeline root -> A -> B (B is A's child): pipe 1 (fds
//!   60/61, 1 MiB, 700 000 unread bytes) from the root to A, pipe 2 (fds
//!   62/63, 16 KiB, 10 000 unread bytes) from A to B, and pipe S (fds 64/65,
//!   128 KiB, read end O_NONBLOCK) whose both ends all three tasks hold,
//!   with 1 000 bytes. On verify: the root reads S's bytes, writes 100 to S
//!   and 5 000 more into pipe 1; A reads S's 100 and writes 100 others, reads
//!   pipe 1 whole and writes 2 000 more into pipe 2; B reads S's 100 (then
//!   EAGAIN) and pipe 2 whole.
//! - `shared-offset`: the root opens `shared.txt` read-write at fd 40
//!   (dup'd at fd 41), writes 10 bytes, makes an eventfd at fd 42 (counter
//!   5), then forks child C. On verify the root checks both offsets are 10;
//!   C checks its offset is 10, writes 5 bytes (offset 15), reads the
//!   eventfd (5) and adds 3; then the root sees offset 15 on fds 40 and 41,
//!   the 15 bytes in the file and the eventfd at 3: one open file
//!   description each. Likewise fd 43, a file unlinked while open
//!   (`ghost`, 5 bytes): C writes 2 bytes, the root sees offset 7 and
//!   `ghost!!`.
//! - `socketpair`: stream (fds 30/31), datagram (32/33) and seqpacket
//!   (34/35) socketpairs between the root (even fds) and child D (odd fds),
//!   with data queued both ways (the root sent 5 000 stream bytes, datagrams
//!   of 2, 3 and 4 bytes and seqpackets of 1 000 and 7 bytes; D sent 3 000
//!   stream bytes, datagrams of 5 and 6 bytes and a seqpacket of 9 bytes).
//!   On verify the root receives D's data exactly (message boundaries, then
//!   EAGAIN) and sends one more message of each type; D receives all of the
//!   root's.
//! - `fifo`: FIFO `fifo1` read by the root (fd 70, O_NONBLOCK, inherited
//!   by child F) and written by F (fd 71, its own open) with 500 unread
//!   bytes; FIFO `fifo2` opened read-write by the root (fd 72, shared with
//!   F) with 300. On verify the root reads the 500 bytes; F checks fd 70 is
//!   non-blocking, writes 200 bytes into `fifo1`, reads the 300 of `fifo2`
//!   and writes 40 back; the root then reads the 200 and the 40.
//! - `inet-listener`: a TCP listener on 127.0.0.1 (fd 80, O_NONBLOCK)
//!   shared by the root and child G (a pre-forked server). On verify the
//!   root checks the port and connects, sending 4 bytes; G accepts the
//!   connection on its fd 80 and reads them.
//! - `unix-listener`: the root listens on an abstract unix name (fd 90);
//!   child H connected twice: its fd 93's connection was accepted by the
//!   root (fd 92) and holds 1 byte from H, its fd 91's waits to be
//!   accepted. On verify the root reads the byte and answers on fd 92,
//!   accepts the waiting connection and sends on it; H reads both.
//! - `outside-pipe`: child E holds the read end (fd 60) of a pipe whose other
//!   ends the tree closed (the test opens a write end through
//!   `/proc/E/fd/60`: a pipe to a process outside the tree). On verify E
//!   checks fd 60 is a pipe read end.
//!
//! Protocol: `READY pid=R members=a,b zombies=`; on SIGUSR2 the root checks
//! its part, then asks each member in turn (SIGUSR2), which prints
//! `MEMBER-PASS pid=N <what>` or `MEMBER-FAIL pid=N <problems>` and answers
//! with a queued signal; then the root runs its last checks and prints one
//! `PASS`/`FAIL` line. Verify once: the checks consume the data.

use std::time::Duration;

use crm_tests::wl;

type Check = Box<dyn FnMut() -> Vec<String>>;

fn sig_hello() -> i32 {
    libc::SIGRTMIN() + 1
}

fn sig_reply() -> i32 {
    libc::SIGRTMIN() + 2
}

fn getpid() -> i32 {
    std::process::id() as i32
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `len` bytes of a pattern that depends on `seed` and the position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn close(fd: i32) {
    // SAFETY: closing one of our descriptors.
    unsafe { libc::close(fd) };
}

fn fcntl(fd: i32, cmd: i32, arg: i32) -> i32 {
    // SAFETY: fcntl with an integer argument on one of our descriptors.
    unsafe { libc::fcntl(fd, cmd, arg) }
}

/// A pipe with its ends at `r` and `w`, of `size` bytes (0: default).
fn pipe_at(r: i32, w: i32, size: i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe fills the local array; dup2 moves the ends.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0
            || libc::dup2(fds[0], r) < 0
            || libc::dup2(fds[1], w) < 0
        {
            wl::fail_setup("pipe");
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    if size > 0 && fcntl(w, libc::F_SETPIPE_SZ, size) < 0 {
        wl::fail_setup("F_SETPIPE_SZ");
    }
}

fn socketpair_at(ty: i32, a: i32, b: i32) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair fills the local array; dup2 moves the ends.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) != 0
            || libc::dup2(fds[0], a) < 0
            || libc::dup2(fds[1], b) < 0
        {
            wl::fail_setup("socketpair");
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

fn setup_write(fd: i32, data: &[u8]) {
    if let Err(e) = wl::write_all(fd, data) {
        wl::say(&format!("SETUP-ERROR {e}"));
        std::process::exit(2);
    }
}

/// Bytes waiting in a pipe or socket (`FIONREAD`).
fn fionread(fd: i32) -> i64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into a live local.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return -1;
    }
    n as i64
}

/// One read or recv of at most `max` bytes that does not wait:
/// `Ok(bytes)` or `Err(errno)`.
fn read_now(fd: i32, max: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; max];
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one live local pollfd, 2 s at most.
    if unsafe { libc::poll(&mut pfd, 1, 2000) } <= 0 {
        return Err(libc::EAGAIN);
    }
    // SAFETY: reading into a live local buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, max) };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Reads exactly `want` (in as many reads as it takes), then checks that
/// nothing more waits; describes what differs.
fn expect_stream(fd: i32, want: &[u8], what: &str) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < want.len() {
        match read_now(fd, want.len() - got.len()) {
            Ok(b) if b.is_empty() => break,
            Ok(b) => got.extend(b),
            Err(_) => break,
        }
    }
    let mut p = Vec::new();
    if got != want {
        p.push(format!(
            "{what}: read {} bytes, expected {} ({})",
            got.len(),
            want.len(),
            if got.len() == want.len() {
                "contents differ"
            } else {
                "lengths differ"
            }
        ));
    }
    if fionread(fd) != 0 {
        p.push(format!("{what}: {} more bytes than expected", fionread(fd)));
    }
    p
}

/// Receives one message per entry of `want` (boundaries kept), then
/// expects nothing more (EAGAIN).
fn expect_messages(fd: i32, want: &[Vec<u8>], what: &str) -> Vec<String> {
    let mut p = Vec::new();
    for (i, m) in want.iter().enumerate() {
        match read_now(fd, 65536) {
            Ok(b) if &b == m => {}
            Ok(b) => p.push(format!(
                "{what}: message {i} has {} bytes, expected {} or differs",
                b.len(),
                m.len()
            )),
            Err(e) => p.push(format!("{what}: message {i} missing (errno {e})")),
        }
    }
    // SAFETY: a non-waiting recv into a live local buffer.
    let n = unsafe {
        let mut b = [0u8; 16];
        libc::recv(
            fd,
            b.as_mut_ptr() as *mut libc::c_void,
            16,
            libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 || errno() != libc::EAGAIN {
        p.push(format!("{what}: more than {} messages queued", want.len()));
    }
    p
}

fn expect_closed(fds: &[i32], who: &str) -> Vec<String> {
    fds.iter()
        .filter(|&&fd| fcntl(fd, libc::F_GETFD, 0) >= 0)
        .map(|fd| format!("{who}: fd {fd} is open, it was closed"))
        .collect()
}

fn expect_size(fd: i32, size: i32, what: &str) -> Vec<String> {
    let got = fcntl(fd, libc::F_GETPIPE_SZ, 0);
    if got == size {
        Vec::new()
    } else {
        vec![format!("{what}: pipe size {got}, expected {size}")]
    }
}

fn expect_nonblock(fd: i32, on: bool, what: &str) -> Vec<String> {
    let fl = fcntl(fd, libc::F_GETFL, 0);
    if fl >= 0 && (fl & libc::O_NONBLOCK != 0) == on {
        Vec::new()
    } else {
        vec![format!("{what}: flags {fl:#x}, O_NONBLOCK expected {on}")]
    }
}

fn offset(fd: i32) -> i64 {
    // SAFETY: lseek queries the offset of one of our descriptors.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn send(fd: i32, data: &[u8]) -> Result<(), String> {
    // SAFETY: sending from a live slice.
    let n = unsafe { libc::send(fd, data.as_ptr() as *const libc::c_void, data.len(), 0) };
    if n == data.len() as isize {
        Ok(())
    } else {
        Err(format!(
            "send {} bytes on fd {fd}: errno {}",
            data.len(),
            errno()
        ))
    }
}

/// A member: says hello, then on each SIGUSR2 runs `check`, prints its
/// verdict and answers the root. Exits once the root is gone.
fn member(root: i32, what: &str, mut check: Check) -> ! {
    let me = getpid();
    wl::sigqueue(root, sig_hello(), me as i64);
    loop {
        // SAFETY: kill with signal 0 only checks that the root exists.
        if unsafe { libc::kill(root, 0) } != 0 {
            std::process::exit(3);
        }
        if wl::take(libc::SIGUSR2) {
            let problems = check();
            if problems.is_empty() {
                wl::say(&format!("MEMBER-PASS pid={me} {what}"));
            } else {
                wl::say(&format!("MEMBER-FAIL pid={me} {}", problems.join("; ")));
            }
            wl::sigqueue(
                root,
                sig_reply(),
                me as i64 * 2 + problems.is_empty() as i64,
            );
        }
        wl::sleep_ms(10);
    }
}

/// What the root does on verify: a check before asking the members (in
/// order), and one after.
struct Root {
    members: usize,
    before: Check,
    after: Check,
    what: &'static str,
}

fn none() -> Check {
    Box::new(Vec::new)
}

fn pipes(root: i32) -> Root {
    const P_DATA: usize = 100_000;
    const Q_DATA: usize = 3_000;
    const MORE: usize = 5_000;
    const P_SIZE: i32 = 256 << 10;
    pipe_at(50, 51, P_SIZE);
    pipe_at(52, 53, 0);
    if wl::fork() == 0 {
        close(51);
        close(52);
        setup_write(53, &pattern(2, Q_DATA));
        member(
            root,
            "pipe P read whole, more data came, closed ends closed",
            Box::new(|| {
                let mut want = pattern(1, P_DATA);
                want.extend(pattern(3, MORE));
                let mut p = expect_closed(&[51, 52], "A");
                p.extend(expect_nonblock(50, false, "P read end"));
                p.extend(expect_stream(50, &want, "P"));
                p
            }),
        );
    }
    close(50);
    close(53);
    fcntl(51, libc::F_SETFL, libc::O_NONBLOCK);
    fcntl(52, libc::F_SETFL, libc::O_NONBLOCK);
    setup_write(51, &pattern(1, P_DATA));
    Root {
        members: 1,
        what: "pipes P (root->A) and Q (A->root): data, sizes, flags",
        before: Box::new(|| {
            let mut p = expect_closed(&[50, 53], "root");
            p.extend(expect_size(51, P_SIZE, "P write end"));
            p.extend(expect_nonblock(51, true, "P write end"));
            p.extend(expect_nonblock(52, true, "Q read end"));
            p.extend(expect_stream(52, &pattern(2, Q_DATA), "Q"));
            if let Err(e) = wl::write_all(51, &pattern(3, MORE)) {
                p.push(e);
            }
            p
        }),
        after: none(),
    }
}

fn pipes2(root: i32) -> Root {
    const ONE: usize = 700_000;
    const TWO: usize = 10_000;
    const S: usize = 1_000;
    pipe_at(60, 61, 1 << 20);
    pipe_at(64, 65, 128 << 10);
    fcntl(64, libc::F_SETFL, libc::O_NONBLOCK);
    setup_write(65, &pattern(20, S));
    if wl::fork() == 0 {
        // A: reads pipe 1, writes pipe 2, forks B.
        close(61);
        pipe_at(62, 63, 16 << 10);
        if wl::fork() == 0 {
            close(60);
            close(63);
            member(
                root,
                "B: pipe 2 read whole, pipe S shared",
                Box::new(|| {
                    let mut want = pattern(12, TWO);
                    want.extend(pattern(13, 2_000));
                    let mut p = expect_closed(&[60, 61, 63], "B");
                    p.extend(expect_size(62, 16 << 10, "pipe 2"));
                    p.extend(expect_stream(62, &want, "pipe 2"));
                    p.extend(expect_nonblock(64, true, "S read end"));
                    p.extend(expect_stream(64, &pattern(22, 100), "S"));
                    p
                }),
            );
        }
        close(62);
        setup_write(63, &pattern(12, TWO));
        member(
            root,
            "A: pipe 1 read whole, pipe 2 written, pipe S shared",
            Box::new(|| {
                let mut want = pattern(10, ONE);
                want.extend(pattern(11, 5_000));
                let mut p = expect_closed(&[61, 62], "A");
                p.extend(expect_size(60, 1 << 20, "pipe 1"));
                p.extend(expect_stream(60, &want, "pipe 1"));
                p.extend(expect_stream(64, &pattern(21, 100), "S"));
                for (fd, data) in [(65, pattern(22, 100)), (63, pattern(13, 2_000))] {
                    if let Err(e) = wl::write_all(fd, &data) {
                        p.push(e);
                    }
                }
                p
            }),
        );
    }
    close(60);
    setup_write(61, &pattern(10, ONE));
    Root {
        members: 2,
        what: "pipeline root -> A -> B and pipe S of all three: data, sizes, flags",
        before: Box::new(|| {
            let mut p = expect_closed(&[60, 62, 63], "root");
            p.extend(expect_size(61, 1 << 20, "pipe 1"));
            p.extend(expect_size(65, 128 << 10, "pipe S"));
            p.extend(expect_stream(64, &pattern(20, S), "S"));
            for (fd, data) in [(65, pattern(21, 100)), (61, pattern(11, 5_000))] {
                if let Err(e) = wl::write_all(fd, &data) {
                    p.push(e);
                }
            }
            p
        }),
        after: Box::new(|| expect_stream(64, &[], "S after the members")),
    }
}

fn shared_offset(root: i32) -> Root {
    let path = c"shared.txt";
    // SAFETY: open of a NUL-terminated path; dup2 and eventfd take integers.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        );
        if fd < 0 || libc::dup2(fd, 40) < 0 || libc::dup2(40, 41) < 0 {
            wl::fail_setup("open shared.txt");
        }
        libc::close(fd);
        let e = libc::eventfd(5, 0);
        if e < 0 || libc::dup2(e, 42) < 0 {
            wl::fail_setup("eventfd");
        }
        libc::close(e);
    }
    setup_write(40, b"0123456789");
    open_at(
        c"ghost.txt",
        libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
        43,
    );
    setup_write(43, b"ghost");
    if std::fs::remove_file("ghost.txt").is_err() {
        wl::fail_setup("unlink ghost.txt");
    }
    if wl::fork() == 0 {
        member(
            root,
            "C: offset 10 seen, written to 15, eventfd 5 read, 3 added",
            Box::new(|| {
                let mut p = Vec::new();
                if offset(40) != 10 {
                    p.push(format!("offset of fd 40 is {}, expected 10", offset(40)));
                }
                if let Err(e) = wl::write_all(40, b"abcde") {
                    p.push(e);
                }
                match wl::read_u64(42) {
                    Ok(5) => {}
                    other => p.push(format!("eventfd read {other:?}, expected 5")),
                }
                if wl::write_all(42, &3u64.to_ne_bytes()).is_err() {
                    p.push("eventfd write failed".into());
                }
                if offset(43) != 5 {
                    p.push(format!("unlinked file offset {}, expected 5", offset(43)));
                }
                if let Err(e) = wl::write_all(43, b"!!") {
                    p.push(e);
                }
                p
            }),
        );
    }
    Root {
        members: 1,
        what: "file offset and eventfd shared with C (one open file description)",
        before: Box::new(|| {
            [40, 41]
                .into_iter()
                .filter(|&fd| offset(fd) != 10)
                .map(|fd| format!("root fd {fd} offset {}, expected 10", offset(fd)))
                .collect()
        }),
        after: Box::new(|| {
            let mut p: Vec<String> = [40, 41]
                .into_iter()
                .filter(|&fd| offset(fd) != 15)
                .map(|fd| {
                    format!(
                        "root fd {fd} offset {} after C wrote, expected 15 (not shared?)",
                        offset(fd)
                    )
                })
                .collect();
            match std::fs::read("shared.txt") {
                Ok(b) if b == b"0123456789abcde" => {}
                other => p.push(format!("shared.txt holds {other:?}")),
            }
            match wl::read_u64(42) {
                Ok(3) => {}
                other => p.push(format!("eventfd read {other:?} after C, expected 3")),
            }
            let mut buf = [0u8; 16];
            // SAFETY: pread into a live local buffer.
            let n = unsafe { libc::pread(43, buf.as_mut_ptr() as *mut libc::c_void, 16, 0) };
            if offset(43) != 7 || n != 7 || &buf[..7] != b"ghost!!" {
                p.push(format!(
                    "unlinked file: offset {}, contents {:?}, expected 7 and \"ghost!!\"",
                    offset(43),
                    String::from_utf8_lossy(&buf[..n.max(0) as usize])
                ));
            }
            p
        }),
    }
}

fn socketpairs(root: i32) -> Root {
    socketpair_at(libc::SOCK_STREAM, 30, 31);
    socketpair_at(libc::SOCK_DGRAM, 32, 33);
    socketpair_at(libc::SOCK_SEQPACKET, 34, 35);
    let root_dgrams = || vec![b"ab".to_vec(), b"cde".to_vec(), b"fghi".to_vec()];
    let root_seqs = || vec![pattern(40, 1000), b"seven!!".to_vec()];
    if wl::fork() == 0 {
        for fd in [30, 32, 34] {
            close(fd);
        }
        let sent = [
            send(31, &pattern(31, 3000)),
            send(33, b"jklmn"),
            send(33, b"opqrst"),
            send(35, b"nine-byte"),
        ];
        if let Some(Err(e)) = sent.into_iter().find(|r| r.is_err()) {
            wl::say(&format!("SETUP-ERROR {e}"));
            std::process::exit(2);
        }
        member(
            root,
            "D: stream, datagram and seqpacket queues from the root",
            Box::new(move || {
                let mut stream = pattern(30, 5000);
                stream.extend(b"more-stream");
                let mut dgrams = root_dgrams();
                dgrams.push(b"more-dgram".to_vec());
                let mut seqs = root_seqs();
                seqs.push(b"more-seq".to_vec());
                let mut p = expect_closed(&[30, 32, 34], "D");
                p.extend(expect_stream(31, &stream, "stream"));
                p.extend(expect_messages(33, &dgrams, "dgram"));
                p.extend(expect_messages(35, &seqs, "seqpacket"));
                p
            }),
        );
    }
    for fd in [31, 33, 35] {
        close(fd);
    }
    let mut sent = vec![send(30, &pattern(30, 5000))];
    sent.extend(root_dgrams().iter().map(|m| send(32, m)));
    sent.extend(root_seqs().iter().map(|m| send(34, m)));
    if let Some(Err(e)) = sent.into_iter().find(|r| r.is_err()) {
        wl::say(&format!("SETUP-ERROR {e}"));
        std::process::exit(2);
    }
    Root {
        members: 1,
        what: "stream, datagram and seqpacket socketpairs with D, queues both ways",
        before: Box::new(|| {
            let mut p = expect_closed(&[31, 33, 35], "root");
            p.extend(expect_stream(30, &pattern(31, 3000), "stream"));
            p.extend(expect_messages(
                32,
                &[b"jklmn".to_vec(), b"opqrst".to_vec()],
                "dgram",
            ));
            p.extend(expect_messages(34, &[b"nine-byte".to_vec()], "seqpacket"));
            for (fd, m) in [
                (30, &b"more-stream"[..]),
                (32, b"more-dgram"),
                (34, b"more-seq"),
            ] {
                if let Err(e) = send(fd, m) {
                    p.push(e);
                }
            }
            p
        }),
        after: none(),
    }
}

fn open_at(path: &std::ffi::CStr, flags: i32, at: i32) {
    // SAFETY: open of a NUL-terminated path; dup2 takes integers.
    unsafe {
        let fd = libc::open(path.as_ptr(), flags, 0o600);
        if fd < 0 || libc::dup2(fd, at) < 0 {
            wl::fail_setup(&format!("open {path:?}"));
        }
        libc::close(fd);
    }
}

fn fifos(root: i32) -> Root {
    for p in [c"fifo1", c"fifo2"] {
        // SAFETY: mkfifo of a NUL-terminated path.
        if unsafe { libc::mkfifo(p.as_ptr(), 0o600) } != 0 {
            wl::fail_setup("mkfifo");
        }
    }
    open_at(c"fifo1", libc::O_RDONLY | libc::O_NONBLOCK, 70);
    open_at(c"fifo2", libc::O_RDWR, 72);
    setup_write(72, &pattern(52, 300));
    if wl::fork() == 0 {
        open_at(c"fifo1", libc::O_WRONLY, 71);
        setup_write(71, &pattern(50, 500));
        member(
            root,
            "F: FIFO 1 written, FIFO 2 read and written, shared flags",
            Box::new(|| {
                let mut p = expect_nonblock(70, true, "shared FIFO 1 read end");
                if let Err(e) = wl::write_all(71, &pattern(51, 200)) {
                    p.push(e);
                }
                p.extend(expect_stream(72, &pattern(52, 300), "FIFO 2"));
                if let Err(e) = wl::write_all(72, &pattern(53, 40)) {
                    p.push(e);
                }
                p
            }),
        );
    }
    Root {
        members: 1,
        what: "FIFO 1 read by the root and written by F, FIFO 2 shared read-write",
        before: Box::new(|| {
            let mut p = expect_closed(&[71], "root");
            p.extend(expect_stream(70, &pattern(50, 500), "FIFO 1"));
            p
        }),
        after: Box::new(|| {
            let mut p = expect_stream(70, &pattern(51, 200), "FIFO 1 after F wrote");
            p.extend(expect_stream(72, &pattern(53, 40), "FIFO 2 after F wrote"));
            p
        }),
    }
}

/// The port a TCP socket is bound to.
fn local_port(fd: i32) -> u16 {
    // SAFETY: sockaddr_in is plain data; getsockname fills at most `len`.
    unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return 0;
        }
        u16::from_be(sa.sin_port)
    }
}

fn loopback(port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    sa
}

fn inet_listener(root: i32) -> Root {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket/bind/listen/dup2 on a fresh socket and a live local
    // address.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let sa = loopback(0);
        if s < 0
            || libc::bind(s, &sa as *const _ as *const libc::sockaddr, len) != 0
            || libc::listen(s, 8) != 0
            || libc::dup2(s, 80) < 0
        {
            wl::fail_setup("TCP listener");
        }
        libc::close(s);
    }
    fcntl(80, libc::F_SETFL, libc::O_NONBLOCK);
    let port = local_port(80);
    if wl::fork() == 0 {
        member(
            root,
            "G: accepted the root's connection on the shared listener",
            Box::new(|| {
                let mut p = expect_nonblock(80, true, "shared listener");
                let mut pfd = libc::pollfd {
                    fd: 80,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one live local pollfd, 2 s at most.
                unsafe { libc::poll(&mut pfd, 1, 2000) };
                // SAFETY: accept on our listener, no address wanted.
                let c = unsafe { libc::accept(80, std::ptr::null_mut(), std::ptr::null_mut()) };
                if c < 0 {
                    p.push(format!("accept on the shared listener: errno {}", errno()));
                    return p;
                }
                match read_now(c, 16) {
                    Ok(b) if b == b"hi G" => {}
                    other => p.push(format!("read {other:?} from the accepted connection")),
                }
                close(c);
                p
            }),
        );
    }
    Root {
        members: 1,
        what: "TCP listener shared with G: same port, one socket",
        before: Box::new(move || {
            let mut p = Vec::new();
            if local_port(80) != port {
                p.push(format!("listener port {}, expected {port}", local_port(80)));
            }
            let sa = loopback(port);
            // SAFETY: a fresh socket connected to a live local address; it
            // stays open (the connection must wait for G).
            let client = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            // SAFETY: as above.
            if unsafe { libc::connect(client, &sa as *const _ as *const libc::sockaddr, len) } != 0
            {
                p.push(format!("connect to port {port}: errno {}", errno()));
            } else if let Err(e) = send(client, b"hi G") {
                p.push(e);
            }
            p
        }),
        after: none(),
    }
}

/// An abstract unix address named after the root.
fn abstract_addr(root: i32) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("crm-tree-files-{root}");
    for (i, b) in name.bytes().enumerate() {
        sa.sun_path[i + 1] = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (sa, len as libc::socklen_t)
}

fn unix_at(at: i32) {
    // SAFETY: a fresh socket moved to `at`.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if s < 0 || libc::dup2(s, at) < 0 {
            wl::fail_setup("unix socket");
        }
        libc::close(s);
    }
}

fn unix_listener(root: i32) -> Root {
    let (sa, len) = abstract_addr(root);
    unix_at(90);
    // SAFETY: bind/listen of our socket to a live local address.
    if unsafe { libc::bind(90, &sa as *const _ as *const libc::sockaddr, len) } != 0
        // SAFETY: as above.
        || unsafe { libc::listen(90, 4) } != 0
    {
        wl::fail_setup("bind/listen");
    }
    if wl::fork() == 0 {
        close(90);
        for fd in [93, 91] {
            unix_at(fd);
            // SAFETY: connect of our socket to a live local address.
            if unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
                wl::fail_setup("connect");
            }
        }
        setup_write(93, b"q");
        member(
            root,
            "H: accepted and pending connections to the root's listener",
            Box::new(|| {
                let mut p = expect_stream(91, b"x", "pending connection, accepted after restore");
                p.extend(expect_stream(93, b"w", "accepted connection"));
                p
            }),
        );
    }
    Root {
        members: 1,
        what: "unix listener with an accepted and a pending connection from H",
        before: Box::new(move || {
            let mut p = expect_stream(92, b"q", "accepted connection");
            if let Err(e) = send(92, b"w") {
                p.push(e);
            }
            // SAFETY: accept on our listener, no address wanted.
            let c = unsafe { libc::accept(90, std::ptr::null_mut(), std::ptr::null_mut()) };
            if c < 0 {
                p.push(format!("accept the pending connection: errno {}", errno()));
            } else if let Err(e) = send(c, b"x") {
                p.push(e);
            }
            p
        }),
        after: none(),
    }
}

fn outside_pipe(root: i32) -> Root {
    pipe_at(60, 61, 0);
    if wl::fork() == 0 {
        close(61);
        member(
            root,
            "E: fd 60 is a pipe read end",
            Box::new(|| {
                let link = std::fs::read_link("/proc/self/fd/60").unwrap_or_default();
                let fl = fcntl(60, libc::F_GETFL, 0);
                if link.to_string_lossy().starts_with("pipe:") && fl & libc::O_ACCMODE == 0 {
                    Vec::new()
                } else {
                    vec![format!("fd 60 is {link:?} with flags {fl:#x}")]
                }
            }),
        );
    }
    close(60);
    close(61);
    Root {
        members: 1,
        what: "E holds its pipe read end",
        before: none(),
        after: none(),
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    wl::catch(libc::SIGUSR2);
    let hello = wl::block(&[sig_hello()]);
    let reply = wl::block(&[sig_reply()]);
    let root = getpid();
    let mut r = match mode.as_str() {
        "pipes" => pipes(root),
        "pipes2" => pipes2(root),
        "shared-offset" => shared_offset(root),
        "socketpair" => socketpairs(root),
        "fifo" => fifos(root),
        "inet-listener" => inet_listener(root),
        "unix-listener" => unix_listener(root),
        "outside-pipe" => outside_pipe(root),
        other => {
            wl::say(&format!("SETUP-ERROR unknown mode {other:?}"));
            std::process::exit(2);
        }
    };
    let mut members = Vec::new();
    while members.len() < r.members {
        match wl::wait_value(&hello, Duration::from_secs(20)) {
            Some(v) => members.push(v as i32),
            None => wl::fail_setup("a member did not say hello"),
        }
    }
    // Tree order: a parent before its children.
    members.sort_unstable();
    if mode == "unix-listener" {
        // The first connection (H's fd 93) is accepted, the second waits.
        // SAFETY: accept on our listener, moved to fd 92.
        let c = unsafe { libc::accept(90, std::ptr::null_mut(), std::ptr::null_mut()) };
        // SAFETY: dup2 and close of our descriptors.
        if c < 0 || unsafe { libc::dup2(c, 92) } < 0 {
            wl::fail_setup("accept");
        }
        close(c);
    }
    let list: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    wl::ready(&format!("mode={mode} members={} zombies=", list.join(",")));
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut problems = (r.before)();
            for &m in &members {
                // SAFETY: plain kill of one of our members.
                unsafe { libc::kill(m, libc::SIGUSR2) };
                match wl::wait_value(&reply, Duration::from_secs(15)) {
                    Some(v) if v == m as i64 * 2 + 1 => {}
                    Some(v) if v == m as i64 * 2 => {
                        problems.push(format!("member {m} failed (see MEMBER-FAIL)"))
                    }
                    other => problems.push(format!("member {m} answered {other:?}")),
                }
            }
            problems.extend((r.after)());
            wl::verdict(
                &format!("mode={mode} root and {} members: {}", members.len(), r.what),
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
