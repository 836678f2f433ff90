//! Workload `wl_unsupported_fd`: holds both ends of an established TCP
//! connection over loopback (client fd 37, accepted fd 38), a kind of fd the
//! dump must refuse (it needs TCP repair), at distinctive fd numbers.
//!
//! Protocol: `READY pid=N sock_fd_a=37 sock_fd_b=38`; on SIGUSR2 writes a byte
//! into fd 38, reads it back from fd 37 and prints `PASS socket fds 37/38
//! connected` or `FAIL ...` (after a refused dump the process must be exactly as
//! before).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use crm_tests::wl;

const READ_FD: i32 = 37;
const WRITE_FD: i32 = 38;

fn main() {
    wl::catch(libc::SIGUSR2);
    let listener = crm_tests::sock::socket(libc::AF_INET, libc::SOCK_STREAM);
    let any = crm_tests::sock::loopback(false, 0);
    if crm_tests::sock::bind(listener, &any).is_err()
        || crm_tests::sock::listen(listener, 1).is_err()
    {
        wl::fail_setup("TCP listener");
    }
    let port = crm_tests::sock::port_of(&crm_tests::sock::local_name(listener));
    let client = crm_tests::sock::socket(libc::AF_INET, libc::SOCK_STREAM);
    if crm_tests::sock::connect(client, &crm_tests::sock::loopback(false, port)).is_err() {
        wl::fail_setup("TCP connect");
    }
    let Ok(accepted) = crm_tests::sock::accept(listener, 5000) else {
        wl::fail_setup("TCP accept");
    };
    // The accepted socket is non-blocking: make it blocking like the client.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(accepted, libc::F_SETFL, 0) };
    crm_tests::sock::close(listener);
    crm_tests::sock::place(client, READ_FD);
    crm_tests::sock::place(accepted, WRITE_FD);
    // SAFETY: READ_FD and WRITE_FD were just placed by dup2 and are owned by nothing
    // else; the Files take ownership for the rest of the process.
    let (mut rd, mut wr) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(READ_FD)),
            File::from(OwnedFd::from_raw_fd(WRITE_FD)),
        )
    };
    wl::ready(&format!("sock_fd_a={READ_FD} sock_fd_b={WRITE_FD}"));
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut byte = [0u8; 1];
            let result = wr.write_all(b"x").and_then(|()| rd.read_exact(&mut byte));
            let problems = match result {
                Ok(()) if byte == *b"x" => Vec::new(),
                Ok(()) => vec![format!(
                    "socket returned {:?} instead of x",
                    byte[0] as char
                )],
                Err(e) => vec![format!("socket fds {READ_FD}/{WRITE_FD}: {e}")],
            };
            wl::verdict(
                &format!("TCP socket fds {READ_FD}/{WRITE_FD} connected"),
                &problems,
            );
        }
        wl::sleep_ms(20);
    }
}
