//! Checkpoint/restore of sockets and inotify instances held by one process,
//! driving the real `cr-migrate` binary (DESIGN.md §6).
//!
//! Each test starts a workload that sets its objects up and verifies them
//! itself (SIGUSR2 → `PASS`/`FAIL`), checks it PASSes, dumps it (which kills
//! it), reaps the original, checks what `show` prints, restores it with
//! `--detach`, checks that it has the same descriptors (objects numbered by
//! first appearance: sockets get new inodes), and asks it to verify again.
//! Guards kill and reap every process even when an assertion fails; the
//! tests take the process-wide [`h::serial`] lock.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crm_tests::{self as h, procs, run_crm, workload_bin, TempDir, Workload};
use crm_tests::{assert_success, path_str, stderr};

/// The fds of `pid`, with `socket:[N]`/`pipe:[N]` renamed by order of first
/// appearance (restored objects have new inodes; sharing still counts).
fn fds(pid: i32) -> BTreeMap<i32, String> {
    let mut seen: Vec<String> = Vec::new();
    procs::fds(pid)
        .into_iter()
        .map(|(fd, link)| {
            if !(link.starts_with("socket:[") || link.starts_with("pipe:[")) {
                return (fd, link);
            }
            let kind = &link[..link.find(':').unwrap_or(0)];
            let i = seen.iter().position(|l| *l == link).unwrap_or_else(|| {
                seen.push(link.clone());
                seen.len() - 1
            });
            (fd, format!("{kind}:#{}", i + 1))
        })
        .collect()
}

/// Dump, show (which must print every line of `shown`), restore; returns
/// `show`'s output. The restored workload is under `wl`'s guard.
fn cycle(wl: &mut Workload, images: &Path, shown: &[&str]) -> String {
    let before = fds(wl.pid());
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(images)]);
    assert_success(&out, "dump");
    wl.reap_killed(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    let show = run_crm(&["show", path_str(images)]);
    assert_success(&show, "show");
    let text = String::from_utf8_lossy(&show.stdout).into_owned();
    for want in shown {
        assert!(text.contains(want), "`show` should print {want:?}:\n{text}");
    }
    let out = run_crm(&["restore", "--images-dir", path_str(images), "--detach"]);
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --detach");
    adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
    let after = fds(wl.pid());
    assert_eq!(
        before, after,
        "the restored process does not have the original's descriptors"
    );
    println!(
        "checked: dump, show, restore; {} fds as before",
        after.len()
    );
    text
}

/// Unix socketpairs (stream, datagram, seqpacket) keep the data queued in
/// each direction message by message; sockets bound to a path and to an
/// abstract name keep their names, queues and connections; a listener keeps
/// its backlog, the pending connection of a client in the process, and a
/// connection it accepted keeps its addresses; a duplicated socket, a name
/// whose file was unlinked and a socket whose peer closed come back too.
#[test]
fn unix_sockets_keep_queues_names_and_pending_connections() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("unix-sockets");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_unix), &[], tmp.path());
    wl.expect_pass("before the dump");
    cycle(
        &mut wl,
        &images,
        &[
            "fd 80 unix stream socket:[",
            "1 queued (12 bytes) nonblock",
            "fd 82 unix dgram socket:[",
            "4 queued (70017 bytes)",
            "fd 84 unix seqpacket socket:[",
            "wl_unix.dgram, 2 queued (14 bytes)",
            "bound to @crm-wl-unix-",
            "listening backlog 5, 1 pending",
            "fd 89 unix stream socket:[",
            "waiting on listener socket:[",
            "wl_unix.sock listening backlog 3",
            "fd 95 unix socket:[",
            "(same as a lower fd)",
            "gone.sock (unlinked)",
            "fd 97 unix stream socket:[",
            "1 queued (10 bytes) shutdown 3",
            "fd 94 unix stream socket:[",
            "wl_unix.sock peer socket:[",
        ],
    );
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// An established TCP connection is refused, naming the process, the fd and
/// why, and the process runs on untouched.
#[test]
fn established_tcp_is_refused_naming_the_fd() {
    h::init();
    let tmp = TempDir::new("tcp-refused");
    let images = tmp.subdir("images");
    let wl = Workload::start(workload_bin!(wl_unsupported_fd), &[], tmp.path());
    assert_refused(
        &wl,
        &images,
        "37",
        &["established TCP connections need TCP repair, not supported yet"],
    );
}

/// A dump of `wl` must fail naming its pid, `fd` and every piece of `why`;
/// the workload must PASS afterwards (nothing consumed, nothing left
/// traced).
fn assert_refused(wl: &Workload, images: &Path, fd: &str, why: &[&str]) {
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(images)]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the dump should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let mut want = vec![format!("process {pid}: fd {fd}")];
    want.extend(why.iter().map(|w| w.to_string()));
    for w in want {
        assert!(err.contains(&w), "the error should say {w:?}:\n{err}");
    }
    assert_eq!(procs::tracer_pid(wl.pid()), Some(0), "still traced");
    let pass = wl.expect_pass("after the refused dump");
    println!("checked: refused with {}; then {pass}", err.trim());
}

/// A unix socket with a file descriptor in flight (SCM_RIGHTS) is refused;
/// the message and its descriptor are still there afterwards.
#[test]
fn unix_fds_in_flight_are_refused() {
    h::init();
    let tmp = TempDir::new("unix-scm");
    let images = tmp.subdir("images");
    let wl = Workload::start(workload_bin!(wl_unix_refused), &["scm"], tmp.path());
    wl.expect_pass("before the dump");
    assert_refused(&wl, &images, "91", &["SCM_RIGHTS", "unix socket"]);
}

/// A unix socket connected to another process is refused.
#[test]
fn unix_peer_outside_the_process_is_refused() {
    h::init();
    let tmp = TempDir::new("unix-outside");
    let images = tmp.subdir("images");
    let path = tmp.path().join("outside.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind a unix listener");
    let wl = Workload::start(
        workload_bin!(wl_unix_refused),
        &["outside", path_str(&path)],
        tmp.path(),
    );
    let (_conn, _) = listener.accept().expect("accept the workload");
    assert_refused(&wl, &images, "93", &["outside the process"]);
}

/// Connects to `addr`, sends a line and returns the reply line; closes
/// first.
fn talk(addr: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello\n")
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while !reply.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => reply.push(b[0]),
            Ok(_) => break,
            Err(e) => return Err(format!("read {addr}: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// TCP listeners (IPv4 with SO_REUSEADDR after connections it closed first,
/// which left TIME_WAIT behind; IPv6 v6only without it) keep their ports and accept new
/// clients after the restore; connected UDP pairs keep their addresses; a
/// duplicated listener and a bound, not listening, TCP socket come back.
#[test]
fn tcp_listeners_and_udp_sockets() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("inet-sockets");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_inet), &[], tmp.path());
    let tcp4 = wl.ready_field("tcp4").expect("tcp4 port").to_string();
    let tcp6 = wl.ready_field("tcp6").expect("tcp6 port").to_string();
    let addrs = [format!("127.0.0.1:{tcp4}"), format!("[::1]:{tcp6}")];
    for a in &addrs {
        let reply = talk(a).unwrap_or_else(|e| panic!("before the dump: {e}"));
        assert_eq!(reply, "echo hello\n", "reply from {a}");
    }
    wl.expect_pass("before the dump");
    cycle(
        &mut wl,
        &images,
        &[
            "fd 100 tcp socket:[",
            &format!("127.0.0.1:{tcp4} listening backlog 7 reuseaddr"),
            &format!("[::1]:{tcp6} listening backlog 4 v6only"),
            "fd 102 udp socket:[",
            "fd 105 udp6 socket:[",
            "connected to [::1]:",
            "fd 106 tcp socket:[",
            "fd 107 tcp socket:[",
        ],
    );
    for a in &addrs {
        let reply = talk(a).unwrap_or_else(|e| panic!("after the restore: {e}"));
        assert_eq!(reply, "echo hello\n", "reply from {a}");
        println!("checked: {a} accepts and answers after the restore");
    }
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// An inotify instance keeps its watches at their descriptors (2 and 3,
/// after a removed first one) with their masks; an event fired after the
/// restore is delivered. (Events queued at dump time are not kept.)
#[test]
fn inotify_watches() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("inotify");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_inotify), &[], tmp.path());
    assert_eq!(wl.ready_field("wd_dir"), Some("2"), "{}", wl.ready_line());
    wl.expect_pass("before the dump");
    let dir = tmp.path().join("inotify-dir");
    cycle(
        &mut wl,
        &images,
        &[
            &format!("fd 110 inotify watching wd 2 {} mask 0x300", dir.display()),
            "inotify-file mask 0x2 nonblock",
        ],
    );
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// `GET /index.txt` over HTTP/1.0: the whole response.
fn http_get(port: u16) -> Result<String, String> {
    let addr = format!("127.0.0.1:{port}");
    let mut s = std::net::TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /index.txt HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read {addr}: {e}"))?;
    Ok(reply)
}

/// A real program: `python3 -m http.server` answers a client before the
/// dump and, restored with its listening socket, after it.
#[test]
fn python_http_server_serves_after_restore() {
    h::init();
    let has_python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        h::skip_test!(
            "python_http_server_serves_after_restore",
            "python3 is not installed"
        );
    }
    let _serial = h::serial();
    let tmp = TempDir::new("http-server");
    let images = tmp.subdir("images");
    std::fs::write(
        tmp.path().join("index.txt"),
        "hello from the restored server\n",
    )
    .expect("writing index.txt");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // The shell prints READY and becomes python (same PID).
    let script =
        format!("echo READY pid=$$; exec python3 -u -m http.server --bind 127.0.0.1 {port}");
    let mut wl = Workload::start(Path::new("/bin/sh"), &["-c", &script], tmp.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        match http_get(port) {
            Ok(r) => break r,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the server never answered: {e}\n{}", wl.log_tail(20))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(first.contains("hello from the restored server"), "{first}");
    // The client sees the end of the reply at the server's shutdown(), a
    // moment before the server closes the connection: wait until only the
    // listening socket is left, or the dump would meet an established TCP
    // connection (refused) or race with its close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fds(wl.pid())
        .values()
        .filter(|l| l.starts_with("socket:"))
        .count()
        > 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server kept its client connection open: {:?}",
            fds(wl.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cycle(
        &mut wl,
        &images,
        &["tcp socket:[", &format!("127.0.0.1:{port} listening")],
    );
    let reply = http_get(port).unwrap_or_else(|e| panic!("after the restore: {e}"));
    assert!(
        reply.starts_with("HTTP/1.0 200") && reply.contains("hello from the restored server"),
        "after the restore: {reply}"
    );
    println!("checked: python3 http.server on port {port} answers after the restore");
}
