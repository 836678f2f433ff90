//! Workload `wl_inet`: inet sockets that need no TCP repair.
//!
//! - 100: TCP listening on 127.0.0.1 (SO_REUSEADDR, backlog 7);
//! - 101: TCP listening on [::1] (IPV6_V6ONLY, no SO_REUSEADDR, backlog 4);
//! - 102/103: UDP sockets on 127.0.0.1 connected to each other;
//! - 104/105: UDP sockets on [::1] connected to each other;
//! - 106: a duplicate of 100; 107: a TCP socket bound to 127.0.0.1, not
//!   listening.
//!
//! The main loop serves both listeners: a client's line `L` is answered
//! with `echo L`; the IPv4 server then closes first (its port keeps
//! TIME_WAIT connections, which SO_REUSEADDR lets the restored listener
//! bind past), the IPv6 server waits for the client to close.
//!
//! Protocol: `READY pid=N tcp4=PORT tcp6=PORT`; on SIGUSR2 checks that every
//! socket has its addresses, ports and options, and that each UDP pair talks
//! both ways, then prints `PASS ...` or `FAIL ...`.

use crm_tests::sock;
use crm_tests::wl;

struct Ports {
    tcp4: u16,
    bound: u16,
    tcp6: u16,
    udp: [u16; 4],
}

fn listener(v6: bool, fd: i32, backlog: i32) -> u16 {
    let s = sock::socket(
        if v6 { libc::AF_INET6 } else { libc::AF_INET },
        libc::SOCK_STREAM,
    );
    if v6 {
        sock::set_opt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
    } else {
        sock::set_opt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    }
    if sock::bind(s, &sock::loopback(v6, 0)).is_err() || sock::listen(s, backlog).is_err() {
        wl::fail_setup("TCP listener");
    }
    sock::place(s, fd);
    sock::port_of(&sock::local_name(fd))
}

fn udp_pair(v6: bool, a: i32, b: i32) -> [u16; 2] {
    let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    for fd in [a, b] {
        let s = sock::socket(fam, libc::SOCK_DGRAM);
        if sock::bind(s, &sock::loopback(v6, 0)).is_err() {
            wl::fail_setup("UDP bind");
        }
        sock::place(s, fd);
    }
    let pa = sock::port_of(&sock::local_name(a));
    let pb = sock::port_of(&sock::local_name(b));
    if sock::connect(a, &sock::loopback(v6, pb)).is_err()
        || sock::connect(b, &sock::loopback(v6, pa)).is_err()
    {
        wl::fail_setup("UDP connect");
    }
    [pa, pb]
}

fn serve(fd: i32) {
    let Ok(c) = sock::accept(fd, 0) else {
        return;
    };
    let mut line = Vec::new();
    while !line.ends_with(b"\n") && sock::wait_readable(c, 5000) {
        match sock::recv(c, 256) {
            Ok(b) if !b.is_empty() => line.extend_from_slice(&b),
            _ => break,
        }
    }
    let mut reply = b"echo ".to_vec();
    reply.extend_from_slice(&line);
    let _ = sock::send(c, &reply);
    if fd == 101 {
        while sock::wait_readable(c, 5000) && matches!(sock::recv(c, 256), Ok(b) if !b.is_empty()) {
        }
    }
    sock::close(c);
}

fn check(p: &Ports) -> Vec<String> {
    let mut out = Vec::new();
    for (fd, port, v6) in [
        (100, p.tcp4, false),
        (101, p.tcp6, true),
        (102, p.udp[0], false),
        (103, p.udp[1], false),
        (104, p.udp[2], true),
        (105, p.udp[3], true),
        (106, p.tcp4, false),
        (107, p.bound, false),
    ] {
        if sock::local_name(fd) != sock::loopback(v6, port) {
            out.push(format!(
                "fd {fd} is bound to {:?}, want port {port}",
                sock::local_name(fd)
            ));
        }
    }
    for (fd, opt, want) in [
        (100, libc::SO_ACCEPTCONN, 1),
        (101, libc::SO_ACCEPTCONN, 1),
        (106, libc::SO_ACCEPTCONN, 1),
        (107, libc::SO_ACCEPTCONN, 0),
        (100, libc::SO_REUSEADDR, 1),
        (101, libc::SO_REUSEADDR, 0),
    ] {
        let got = sock::opt(fd, libc::SOL_SOCKET, opt);
        if got != want {
            out.push(format!(
                "fd {fd}: socket option {opt} is {got}, want {want}"
            ));
        }
    }
    if sock::opt(101, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != 1 {
        out.push("fd 101 lost IPV6_V6ONLY".into());
    }
    for (a, b, v6, pa, pb) in [
        (102, 103, false, p.udp[0], p.udp[1]),
        (104, 105, true, p.udp[2], p.udp[3]),
    ] {
        if sock::peer_name(a) != sock::loopback(v6, pb)
            || sock::peer_name(b) != sock::loopback(v6, pa)
        {
            out.push(format!("UDP fds {a}/{b} are not connected to each other"));
        }
        for (from, to) in [(a, b), (b, a)] {
            let msg = format!("udp {from}->{to}");
            if let Err(e) = sock::send(from, msg.as_bytes()) {
                out.push(e);
                continue;
            }
            sock::wait_readable(to, 2000);
            match sock::recv(to, 256) {
                Ok(m) if m == msg.as_bytes() => {}
                other => out.push(format!("fd {to} got {other:?}, want {msg:?}")),
            }
        }
    }
    out
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let tcp4 = listener(false, 100, 7);
    let tcp6 = listener(true, 101, 4);
    let [u0, u1] = udp_pair(false, 102, 103);
    let [u2, u3] = udp_pair(true, 104, 105);
    // SAFETY: duplicating our own descriptor onto a free number.
    if unsafe { libc::dup2(100, 106) } != 106 {
        wl::fail_setup("dup2 100");
    }
    let b = sock::socket(libc::AF_INET, libc::SOCK_STREAM);
    if sock::bind(b, &sock::loopback(false, 0)).is_err() {
        wl::fail_setup("bind 107");
    }
    sock::place(b, 107);
    let ports = Ports {
        bound: sock::port_of(&sock::local_name(107)),
        tcp4,
        tcp6,
        udp: [u0, u1, u2, u3],
    };
    wl::ready(&format!("tcp4={tcp4} tcp6={tcp6}"));
    loop {
        serve(100);
        serve(101);
        if wl::take(libc::SIGUSR2) {
            if wl::corrupt_requested() {
                sock::close(104);
            }
            wl::verdict(
                "TCP listeners on 127.0.0.1 and [::1] and connected UDP pairs kept ports and options",
                &check(&ports),
            );
        }
        wl::sleep_ms(10);
    }
}
