//! Workload `wl_pty`: a pseudo-terminal between a parent and its child.
//!
//! The parent opens a pty master (`posix_openpt`) as fd 30, sets the
//! window size to 33 rows x 101 columns and turns packet mode on; its child starts a new session,
//! opens the slave (which becomes its controlling terminal), makes it its
//! stdin, stdout and stderr, turns echo off and sets VKILL to ^K, and then
//! forks a grandchild (stdio on /dev/null, in its session: the pty is its
//! controlling terminal too, inherited), and answers each line it reads:
//! `PING x` with `PONG x`, `GRANDCHILD` with `GC <pid>`, `CHECK` with
//! `CHILD-OK` or `CHILD-FAIL <what differs>` after checking its terminal
//! (a tty on 0-2, termios, window size, its session, being the foreground
//! group, `/dev/tty` opens, `/proc/self/stat` names the pty).
//!
//! Mode `alone`: only the master, no child (`READY pid=N pts=SLAVE`); on
//! SIGUSR2 it checks packet mode, window size and that its slave keeps its
//! name (index).
//!
//! Protocol: `READY pid=N members=C,G`; on SIGUSR2 the parent writes `CHECK`
//! to the master and reads the child's answer from it, and checks from its
//! side the termios and window size (through the master), that the child's
//! stdin is the slave of its master, and the child's and grandchild's
//! controlling terminal and foreground group in `/proc`. Prints `PASS ...`/`FAIL ...`. Data in
//! the pty's buffers is not expected to survive a dump.

use crm_tests::wl;
use std::ffi::CStr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

const MASTER: i32 = 30;
const ROWS: u16 = 33;
const COLS: u16 = 101;
const VKILL_CHAR: u8 = 0x0b;

fn winsize(fd: i32) -> (u16, u16) {
    // SAFETY: an all-zero winsize is valid; TIOCGWINSZ writes into it.
    let mut w: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) };
    (w.ws_row, w.ws_col)
}

fn termios(fd: i32) -> libc::termios {
    // SAFETY: an all-zero termios is valid; tcgetattr writes into it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::tcgetattr(fd, &mut t) };
    t
}

fn termios_problems(t: &libc::termios, who: &str) -> Vec<String> {
    let mut p = Vec::new();
    if t.c_lflag & libc::ECHO != 0 || t.c_lflag & libc::ICANON == 0 {
        p.push(format!(
            "{who}: lflag {:#o} (want ECHO off, ICANON on)",
            t.c_lflag
        ));
    }
    if t.c_cc[libc::VKILL] != VKILL_CHAR {
        p.push(format!("{who}: VKILL is {:#x}", t.c_cc[libc::VKILL]));
    }
    p
}

/// `(tty_nr, tpgid)` of `pid` from `/proc/PID/stat`.
fn stat_tty(pid: i32) -> (u64, i32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = s
        .rsplit_once(')')
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let n = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    // After ')': state ppid pgrp session tty_nr tpgid.
    (n(4) as u64, n(5) as i32)
}

/// The `dev_t` of a stat's `tty_nr` encoding.
fn tty_nr_dev(nr: u64) -> u64 {
    let major = (nr >> 8) & 0xfff;
    let minor = (nr & 0xff) | ((nr >> 12) & 0xfff00);
    libc::makedev(major as u32, minor as u32)
}

fn child_check() -> Vec<String> {
    let mut p = Vec::new();
    for fd in 0..3 {
        // SAFETY: isatty on a descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            p.push(format!("fd {fd} is not a terminal"));
        }
    }
    p.extend(termios_problems(&termios(0), "child"));
    if winsize(0) != (ROWS, COLS) {
        p.push(format!("window size {:?}", winsize(0)));
    }
    // SAFETY: plain queries of our own process and terminal.
    let (sid, me, pgrp, fg) = unsafe {
        (
            libc::getsid(0),
            libc::getpid(),
            libc::getpgrp(),
            libc::tcgetpgrp(0),
        )
    };
    if sid != me {
        p.push(format!("session {sid}, not its own"));
    }
    if fg != pgrp {
        p.push(format!("foreground group {fg}, its group is {pgrp}"));
    }
    // SAFETY: a NUL-terminated path; closed at once.
    let tty = unsafe { libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if tty < 0 {
        p.push(format!("/dev/tty: {}", std::io::Error::last_os_error()));
    } else {
        // SAFETY: closing our descriptor.
        unsafe { libc::close(tty) };
    }
    let rdev = std::fs::metadata("/proc/self/fd/0")
        .map(|m| m.rdev())
        .unwrap_or(0);
    let (nr, _) = stat_tty(me);
    if tty_nr_dev(nr) != rdev {
        p.push(format!(
            "controlling terminal {nr:#x} in /proc, stdin is {rdev:#x}"
        ));
    }
    p
}

fn child(slave: &str) -> ! {
    let path = std::ffi::CString::new(slave).unwrap();
    // SAFETY: setsid, open, ioctl, dup2 and close on our own process and
    // descriptors.
    unsafe {
        libc::close(MASTER);
        if libc::setsid() < 0 {
            wl::fail_setup("setsid");
        }
        let fd = libc::open(path.as_ptr(), libc::O_RDWR);
        if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
            wl::fail_setup("open the pty slave as controlling terminal");
        }
        let mut t = termios(fd);
        t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
        t.c_lflag |= libc::ICANON;
        t.c_cc[libc::VKILL] = VKILL_CHAR;
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            wl::fail_setup("tcsetattr");
        }
        for n in 0..3 {
            libc::dup2(fd, n);
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
    // SAFETY: fork in a single-threaded program; the grandchild only
    // swaps its stdio for /dev/null and sleeps.
    let gc = unsafe { libc::fork() };
    if gc < 0 {
        wl::fail_setup("fork the grandchild");
    }
    if gc == 0 {
        // SAFETY: open/dup2/close on our own descriptors.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for n in 0..3 {
                libc::dup2(null, n);
            }
            libc::close(null);
        }
        loop {
            wl::sleep_ms(1000);
        }
    }
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(0, b.as_mut_ptr() as *mut libc::c_void, 1) };
        if n == 0 {
            std::process::exit(0);
        }
        if n < 0 {
            continue;
        }
        if b[0] != b'\n' {
            line.push(b[0]);
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        let answer = if text == "CHECK" {
            let p = child_check();
            if p.is_empty() {
                "CHILD-OK".to_string()
            } else {
                format!("CHILD-FAIL {}", p.join("; "))
            }
        } else if text == "GRANDCHILD" {
            format!("GC {gc}")
        } else if let Some(x) = text.strip_prefix("PING ") {
            format!("PONG {x}")
        } else {
            format!("WHAT {text}")
        };
        let _ = wl::write_all(1, format!("{answer}\n").as_bytes());
    }
}

/// Reads from the master until a line starting with `prefix` (the `\r` of
/// ONLCR removed), for at most 5 s.
fn read_answer(prefix: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).replace('\r', "");
        if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
            if text.contains('\n') {
                return Ok(l.to_string());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no {prefix} answer from the child; read {text:?}"));
        }
        let mut pfd = libc::pollfd {
            fd: MASTER,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 512];
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(MASTER, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            return Err(format!(
                "read from the master: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Packet mode: each read starts with a status byte (0 for data).
        if buf[0] == 0 {
            got.extend_from_slice(&buf[1..n as usize]);
        }
    }
}

fn parent_check(child: i32, gc: i32, round: u32) -> Vec<String> {
    let mut p = Vec::new();
    let mut pkt: libc::c_int = 0;
    // SAFETY: TIOCGPKT writes one int into the live local.
    unsafe { libc::ioctl(MASTER, libc::TIOCGPKT, &mut pkt) };
    if pkt != 1 {
        p.push("the master left packet mode".into());
    }
    let _ = wl::write_all(MASTER, format!("PING {round}\n").as_bytes());
    match read_answer("PONG") {
        Ok(l) if l == format!("PONG {round}") => {}
        Ok(l) => p.push(format!("answer {l:?} to PING {round}")),
        Err(e) => p.push(e),
    }
    let _ = wl::write_all(MASTER, b"CHECK\n");
    match read_answer("CHILD-") {
        Ok(l) if l == "CHILD-OK" => {}
        Ok(l) => p.push(l),
        Err(e) => p.push(e),
    }
    p.extend(termios_problems(&termios(MASTER), "through the master"));
    if winsize(MASTER) != (ROWS, COLS) {
        p.push(format!(
            "window size through the master {:?}",
            winsize(MASTER)
        ));
    }
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: ptsname_r writes a NUL-terminated name into the local buffer.
    let ok = unsafe { libc::ptsname_r(MASTER, name.as_mut_ptr(), name.len()) } == 0;
    let name = if ok {
        // SAFETY: NUL-terminated by ptsname_r on success.
        unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::new()
    };
    let stdin = std::fs::read_link(format!("/proc/{child}/fd/0"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.is_empty() || stdin != name {
        p.push(format!(
            "the child's stdin is {stdin:?}, the master's slave {name:?}"
        ));
    }
    let rdev = std::fs::metadata(&name).map(|m| m.rdev()).unwrap_or(1);
    for (who, pid) in [("child", child), ("grandchild", gc)] {
        let (nr, tpgid) = stat_tty(pid);
        if tty_nr_dev(nr) != rdev || tpgid != child {
            p.push(format!(
                "the {who}'s controlling terminal is {nr:#x} with foreground group {tpgid}, \
                 want {rdev:#x} and {child}"
            ));
        }
    }
    p
}

/// `alone` mode: only the master; checks its packet mode, window size and
/// slave name.
fn alone(slave: &str) -> ! {
    wl::ready(&format!("pts={slave}"));
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut p = Vec::new();
            let mut pkt: libc::c_int = 0;
            let mut name = [0 as libc::c_char; 64];
            // SAFETY: TIOCGPKT writes one int, ptsname_r a NUL-terminated
            // name, into live locals.
            let named = unsafe {
                libc::ioctl(MASTER, libc::TIOCGPKT, &mut pkt);
                libc::ptsname_r(MASTER, name.as_mut_ptr(), name.len()) == 0
            };
            if pkt != 1 {
                p.push("the master left packet mode".to_string());
            }
            if winsize(MASTER) != (ROWS, COLS) || wl::corrupt_requested() {
                p.push(format!("window size {:?}", winsize(MASTER)));
            }
            let now = named.then(|| {
                // SAFETY: NUL-terminated by ptsname_r on success.
                unsafe { CStr::from_ptr(name.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            });
            if now.as_deref() != Some(slave) {
                p.push(format!("the slave is {now:?}, was {slave}"));
            }
            wl::verdict("pty master alone", &p);
        }
        wl::sleep_ms(20);
    }
}

fn main() {
    wl::catch(libc::SIGUSR2);
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r/dup2 on our own
    // descriptors; the name buffer is a live local.
    let slave = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if m < 0 || libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            wl::fail_setup("posix_openpt");
        }
        let mut name = [0 as libc::c_char; 64];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 || libc::dup2(m, MASTER) < 0 {
            wl::fail_setup("ptsname");
        }
        libc::close(m);
        let w = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let on: libc::c_int = 1;
        if libc::ioctl(MASTER, libc::TIOCSWINSZ, &w) != 0
            || libc::ioctl(MASTER, libc::TIOCPKT, &on) != 0
        {
            wl::fail_setup("TIOCSWINSZ");
        }
        CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned()
    };
    if std::env::args().nth(1).as_deref() == Some("alone") {
        alone(&slave);
    }
    // SAFETY: fork in a single-threaded program.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        wl::fail_setup("fork");
    }
    if pid == 0 {
        child(&slave);
    }
    // The child's setup done: its first answer.
    let _ = wl::write_all(MASTER, b"PING 0\n");
    if read_answer("PONG 0").is_err() {
        wl::fail_setup("the child does not answer");
    }
    let _ = wl::write_all(MASTER, b"GRANDCHILD\n");
    let gc: i32 = match read_answer("GC ") {
        Ok(l) => l[3..].parse().unwrap_or(0),
        Err(_) => 0,
    };
    if gc <= 0 {
        wl::fail_setup("the child does not name its child");
    }
    wl::ready(&format!("members={pid},{gc}"));
    let mut round = 0;
    loop {
        if wl::take(libc::SIGUSR2) {
            round += 1;
            if wl::corrupt_requested() {
                let w = libc::winsize {
                    ws_row: 1,
                    ws_col: 1,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads the live local.
                unsafe { libc::ioctl(MASTER, libc::TIOCSWINSZ, &w) };
            }
            wl::verdict("pty", &parent_check(pid, gc, round));
        }
        wl::sleep_ms(20);
    }
}
