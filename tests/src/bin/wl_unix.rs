//! Workload `wl_unix`: unix sockets of every supported shape, with data
//! queued in them.
//!
//! - 80/81 stream socketpair: 80 (non-blocking) holds "hello stream"
//!   (written as two sends), 81 holds "back".
//! - 82/83 datagram socketpair: 82 holds "one", "two-two", a 70000-byte
//!   message and "three33"; 83 holds "x".
//! - 84/85 seqpacket socketpair: 84 holds "alpha", "beta"; 85 holds "gamma".
//! - 86 datagram socket bound to `./wl_unix.dgram`, holding "to-bound"
//!   (from a closed socket) and "from87"; 87 datagram socket bound to the
//!   abstract name `@crm-wl-unix-PID`, connected to 86.
//! - 88 stream socket listening on `@crm-wl-listen-PID` (backlog 5) with
//!   the connection of 89 (a client in this process) not accepted yet.
//! - 90 stream socket listening on `./wl_unix.sock`.
//! - 95: a duplicate of 86; 96: a datagram socket bound to `./gone.sock`,
//!   which was then unlinked; 81 has SO_PASSCRED.
//! - 97: a stream socket whose peer closed after sending "last words".
//! - 99 connected to 90 and accepted as 94: 94 holds "to-server", 99 holds
//!   "to-client".
//!
//! Protocol: `READY pid=N`; on SIGUSR2 reads every queue and checks each
//! message whole, the names, peers and flags, accepts the pending
//! connection and talks over it, connects a new client to 90, then sets
//! everything up again and prints `PASS ...` or `FAIL ...`.

use crm_tests::sock::{self, recv, send};
use crm_tests::wl;

fn big() -> Vec<u8> {
    (0..70000u32).map(|i| (i % 251) as u8).collect()
}

struct Names {
    dgram_path: Vec<u8>,
    abstract87: Vec<u8>,
    listen88: Vec<u8>,
    listen90: Vec<u8>,
    gone: Vec<u8>,
}

fn names() -> Names {
    let pid = std::process::id();
    let cwd = std::env::current_dir().unwrap_or_default();
    let p = |n: &str| cwd.join(n).to_string_lossy().into_owned().into_bytes();
    Names {
        dgram_path: p("wl_unix.dgram"),
        abstract87: format!("\0crm-wl-unix-{pid}").into_bytes(),
        listen88: format!("\0crm-wl-listen-{pid}").into_bytes(),
        listen90: p("wl_unix.sock"),
        gone: p("gone.sock"),
    }
}

/// Fills every queue and makes the pending connection.
fn fill(n: &Names) -> Result<(), String> {
    send(81, b"hello ")?;
    send(81, b"stream")?;
    send(80, b"back")?;
    for m in [&b"one"[..], b"two-two", &big(), b"three33"] {
        send(83, m)?;
    }
    send(82, b"x")?;
    send(84, b"gamma")?;
    send(85, b"alpha")?;
    send(85, b"beta")?;
    let tmp = sock::socket(libc::AF_UNIX, libc::SOCK_DGRAM);
    sock::send_to(tmp, b"to-bound", &sock::unix_addr(&n.dgram_path))?;
    sock::close(tmp);
    send(87, b"from87")?;
    sock::pair(libc::SOCK_STREAM, 97, 98);
    send(98, b"last words")?;
    sock::close(98);
    send(99, b"to-server")?;
    send(94, b"to-client")?;
    let c = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
    sock::connect(c, &sock::unix_addr(&n.listen88)).map_err(|e| format!("connect to 88: {e}"))?;
    sock::place(c, 89);
    Ok(())
}

fn setup(n: &Names) {
    sock::pair(libc::SOCK_STREAM, 80, 81);
    sock::set_nonblock(80);
    sock::pair(libc::SOCK_DGRAM, 82, 83);
    sock::pair(libc::SOCK_SEQPACKET, 84, 85);
    let _ = std::fs::remove_file("wl_unix.dgram");
    let _ = std::fs::remove_file("wl_unix.sock");
    let s = sock::socket(libc::AF_UNIX, libc::SOCK_DGRAM);
    sock::bind(s, &sock::unix_addr(&n.dgram_path)).unwrap_or_else(|_| wl::fail_setup("bind 86"));
    sock::place(s, 86);
    let s = sock::socket(libc::AF_UNIX, libc::SOCK_DGRAM);
    sock::bind(s, &sock::unix_addr(&n.abstract87)).unwrap_or_else(|_| wl::fail_setup("bind 87"));
    sock::connect(s, &sock::unix_addr(&n.dgram_path))
        .unwrap_or_else(|_| wl::fail_setup("connect 87"));
    sock::place(s, 87);
    let s = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
    sock::bind(s, &sock::unix_addr(&n.listen88)).unwrap_or_else(|_| wl::fail_setup("bind 88"));
    sock::listen(s, 5).unwrap_or_else(|_| wl::fail_setup("listen 88"));
    sock::place(s, 88);
    let s = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
    sock::bind(s, &sock::unix_addr(&n.listen90)).unwrap_or_else(|_| wl::fail_setup("bind 90"));
    sock::listen(s, 3).unwrap_or_else(|_| wl::fail_setup("listen 90"));
    sock::place(s, 90);
    // SAFETY: duplicating our own descriptor onto a free number.
    if unsafe { libc::dup2(86, 95) } != 95 {
        wl::fail_setup("dup2 86");
    }
    let _ = std::fs::remove_file("gone.sock");
    let s = sock::socket(libc::AF_UNIX, libc::SOCK_DGRAM);
    sock::bind(s, &sock::unix_addr(&n.gone)).unwrap_or_else(|_| wl::fail_setup("bind 96"));
    let _ = std::fs::remove_file("gone.sock");
    sock::place(s, 96);
    sock::set_opt(81, libc::SOL_SOCKET, libc::SO_PASSCRED, 1);
    let c = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
    sock::connect(c, &sock::unix_addr(&n.listen90))
        .unwrap_or_else(|_| wl::fail_setup("connect 99"));
    sock::place(c, 99);
    let a = sock::accept(90, 1000).unwrap_or_else(|_| wl::fail_setup("accept 94"));
    sock::place(a, 94);
    if let Err(e) = fill(n) {
        wl::fail_setup(&e);
    }
}

/// Whether socket address `got` is `want` (a path name comes back with
/// its terminating NUL).
fn is(got: Vec<u8>, want: &[u8]) -> bool {
    let mut got = got;
    if got.len() > 3 && got[2] != 0 && got.last() == Some(&0) {
        got.pop();
    }
    got == sock::unix_addr(want)
}

/// Reads `want` messages from `fd` (each must come out whole), then EAGAIN.
fn expect(fd: i32, want: &[&[u8]], problems: &mut Vec<String>) {
    for (i, w) in want.iter().enumerate() {
        match recv(fd, 1 << 17) {
            Ok(got) if got == *w => {}
            Ok(got) => problems.push(format!(
                "fd {fd} message {i}: {} bytes {:?}..., want {} bytes {:?}...",
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(16)]),
                w.len(),
                String::from_utf8_lossy(&w[..w.len().min(16)])
            )),
            Err(e) => problems.push(format!(
                "fd {fd} message {i}: errno {e}, want {} bytes",
                w.len()
            )),
        }
    }
    if let Ok(extra) =
        recv(fd, 1 << 17)
            .map_err(|_| ())
            .and_then(|b| if b.is_empty() { Err(()) } else { Ok(b) })
    {
        problems.push(format!("fd {fd}: unexpected extra {} bytes", extra.len()));
    }
}

fn check(n: &Names) -> Vec<String> {
    let mut p = Vec::new();
    if sock::fl(80) & libc::O_NONBLOCK == 0 {
        p.push("fd 80 lost O_NONBLOCK".into());
    }
    if sock::fl(81) & libc::O_NONBLOCK != 0 {
        p.push("fd 81 became non-blocking".into());
    }
    expect(80, &[b"hello stream"], &mut p);
    expect(81, &[b"back"], &mut p);
    let big = big();
    expect(82, &[b"one", b"two-two", &big, b"three33"], &mut p);
    expect(83, &[b"x"], &mut p);
    expect(84, &[b"alpha", b"beta"], &mut p);
    expect(85, &[b"gamma"], &mut p);
    for (fd, ty) in [
        (80, libc::SOCK_STREAM),
        (82, libc::SOCK_DGRAM),
        (84, libc::SOCK_SEQPACKET),
    ] {
        let got = sock::opt(fd, libc::SOL_SOCKET, libc::SO_TYPE);
        if got != ty {
            p.push(format!("fd {fd} has type {got}, want {ty}"));
        }
    }
    // The pairs still talk both ways.
    for (a, b) in [(80, 81), (82, 83), (84, 85)] {
        if let Err(e) = send(a, b"ping") {
            p.push(e);
        }
        expect(b, &[b"ping"], &mut p);
    }
    // Bound datagram sockets.
    if !is(sock::local_name(86), &n.dgram_path) {
        p.push(format!("fd 86 is bound to {:?}", sock::local_name(86)));
    }
    if !is(sock::local_name(87), &n.abstract87) {
        p.push(format!("fd 87 is bound to {:?}", sock::local_name(87)));
    }
    if !is(sock::peer_name(87), &n.dgram_path) {
        p.push(format!("fd 87 is connected to {:?}", sock::peer_name(87)));
    }
    expect(86, &[b"to-bound", b"from87"], &mut p);
    if let Err(e) = send(87, b"again") {
        p.push(e);
    }
    expect(86, &[b"again"], &mut p);
    // The duplicate shares the socket; the unlinked name stays unlinked.
    if let Err(e) = send(87, b"via95") {
        p.push(e);
    }
    expect(95, &[b"via95"], &mut p);
    if !is(sock::local_name(96), &n.gone) {
        p.push(format!("fd 96 is bound to {:?}", sock::local_name(96)));
    }
    if std::path::Path::new("gone.sock").exists() {
        p.push("gone.sock exists again".into());
    }
    if sock::opt(81, libc::SOL_SOCKET, libc::SO_PASSCRED) != 1 {
        p.push("fd 81 lost SO_PASSCRED".into());
    }
    // The orphan: its data, then the end.
    expect(97, &[b"last words"], &mut p);
    if recv(97, 16) != Ok(Vec::new()) {
        p.push("fd 97 does not read as closed by its peer".into());
    }
    sock::close(97);
    // The connection accepted from 90 keeps its addresses and data.
    if !is(sock::local_name(94), &n.listen90) || !is(sock::peer_name(99), &n.listen90) {
        p.push(format!(
            "fds 94/99 are {:?} -> {:?}, want the name of fd 90 on both",
            sock::local_name(94),
            sock::peer_name(99)
        ));
    }
    expect(94, &[b"to-server"], &mut p);
    expect(99, &[b"to-client"], &mut p);
    // The pending connection.
    if sock::opt(88, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != 1 {
        p.push("fd 88 is not listening".into());
    }
    if !is(sock::local_name(88), &n.listen88) {
        p.push(format!("fd 88 is bound to {:?}", sock::local_name(88)));
    }
    if !is(sock::peer_name(89), &n.listen88) {
        p.push(format!("fd 89 is connected to {:?}", sock::peer_name(89)));
    }
    match sock::accept(88, 1000) {
        Ok(a) => {
            if let Err(e) = send(89, b"pending") {
                p.push(e);
            }
            expect(a, &[b"pending"], &mut p);
            if let Err(e) = send(a, b"accepted") {
                p.push(e);
            }
            sock::wait_readable(89, 1000);
            expect(89, &[b"accepted"], &mut p);
            sock::close(a);
        }
        Err(e) => p.push(format!("no connection waiting on fd 88 (errno {e})")),
    }
    if sock::accept(88, 0).is_ok() {
        p.push("a second connection waited on fd 88".into());
    }
    sock::close(89);
    // The path listener takes a new client.
    if sock::opt(90, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != 1 {
        p.push("fd 90 is not listening".into());
    }
    if !is(sock::local_name(90), &n.listen90) {
        p.push(format!("fd 90 is bound to {:?}", sock::local_name(90)));
    }
    let c = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
    match sock::connect(c, &sock::unix_addr(&n.listen90)) {
        Ok(()) => match sock::accept(90, 1000) {
            Ok(a) => {
                if let Err(e) = send(c, b"new") {
                    p.push(e);
                }
                expect(a, &[b"new"], &mut p);
                sock::close(a);
            }
            Err(e) => p.push(format!("accept on fd 90: errno {e}")),
        },
        Err(e) => p.push(format!("connect to fd 90's path: errno {e}")),
    }
    sock::close(c);
    p
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let n = names();
    setup(&n);
    wl::ready("unix=80-90");
    loop {
        if wl::take(libc::SIGUSR2) {
            if wl::corrupt_requested() {
                let _ = recv(82, 1 << 17); // lose "one"
            }
            let problems = check(&n);
            if let Err(e) = fill(&n) {
                wl::say(&format!("FAIL refilling: {e}"));
                continue;
            }
            wl::verdict(
                "unix stream/dgram/seqpacket pairs kept their queues message by message; \
                 path and abstract names, the pending connection and both listeners work",
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
