//! Workload `wl_unix_refused MODE [PATH]`: unix sockets a dump must refuse.
//!
//! - `scm`: a socketpair (91/92) with a message carrying a file descriptor
//!   (SCM_RIGHTS) queued on 91;
//! - `outside PATH`: fd 93 connected to the listener at PATH (another
//!   process's).
//!
//! Protocol: `READY pid=N fd=F`; on SIGUSR2 checks that the object is as set
//! up (`scm`: the message and its descriptor are still queued, read and sent
//! again; `outside`: the connection still sends) and prints `PASS ...` or
//! `FAIL ...`.

use crm_tests::{sock, wl};

/// Sends "fd" with fd 0 attached from `from`.
fn send_fd(from: i32) -> bool {
    let data = *b"fd";
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut ctrl = [0u64; 8];
    // SAFETY: msghdr is plain old data; the control buffer is large enough
    // for one SCM_RIGHTS header with one descriptor, written through the
    // libc CMSG macros inside it.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, 0);
        libc::sendmsg(from, &msg, 0) == 2
    }
}

/// Receives one message from `fd`: its data and how many descriptors came.
fn recv_fd(fd: i32) -> (Vec<u8>, usize) {
    let mut data = [0u8; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut ctrl = [0u64; 16];
    let mut fds = 0;
    // SAFETY: recvmsg into local buffers described by the msghdr; received
    // descriptors are ours and closed right away.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&ctrl);
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while n >= 0 && !c.is_null() {
            if (*c).cmsg_type == libc::SCM_RIGHTS {
                fds += 1;
                libc::close(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        n
    };
    (data[..n.max(0) as usize].to_vec(), fds)
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("scm");
    let fd = match mode {
        "scm" => {
            sock::pair(libc::SOCK_STREAM, 91, 92);
            if !send_fd(92) {
                wl::fail_setup("sendmsg SCM_RIGHTS");
            }
            91
        }
        _ => {
            let path = args.get(2).cloned().unwrap_or_default();
            let s = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM);
            if sock::connect(s, &sock::unix_addr(path.as_bytes())).is_err() {
                wl::fail_setup(&format!("connect to {path}"));
            }
            sock::place(s, 93);
            93
        }
    };
    wl::ready(&format!("fd={fd}"));
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut p = Vec::new();
            if wl::corrupt_requested() {
                sock::close(fd);
            }
            if fd == 91 {
                let (data, fds) = recv_fd(91);
                if data != b"fd" || fds != 1 {
                    p.push(format!(
                        "fd 91 gave {data:?} with {fds} fds, want \"fd\" with 1"
                    ));
                }
                if !send_fd(92) {
                    p.push("sendmsg again".into());
                }
            } else if let Err(e) = sock::send(93, b"hi") {
                p.push(e);
            }
            wl::verdict(&format!("fd {fd} as set up ({mode})"), &p);
        }
        wl::sleep_ms(10);
    }
}
