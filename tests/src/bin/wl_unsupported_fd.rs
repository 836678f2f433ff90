//! Workload `wl_unsupported_fd`: holds both ends of a unix socketpair, a kind
//! of fd the dump must refuse (for now), at the distinctive fd numbers 37 and 38.
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
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the live two-element array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        wl::fail_setup("socketpair");
    }
    for (from, to) in [(fds[0], READ_FD), (fds[1], WRITE_FD)] {
        // SAFETY: dup2 onto fd numbers we do not otherwise use, then close the
        // original, which nothing else refers to.
        let ok = unsafe { libc::dup2(from, to) == to && libc::close(from) == 0 };
        if !ok {
            wl::fail_setup("dup2 of a socket fd");
        }
    }
    // SAFETY: READ_FD and WRITE_FD were just created by dup2 and are owned by nothing
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
                &format!("socket fds {READ_FD}/{WRITE_FD} connected"),
                &problems,
            );
        }
        wl::sleep_ms(20);
    }
}
