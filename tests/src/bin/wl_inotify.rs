//! Workload `wl_inotify`: an inotify instance (fd 110, non-blocking)
//! watching a directory (`./inotify-dir`, IN_CREATE | IN_DELETE) and a file
//! (`./inotify-file`, IN_MODIFY). A first watch is added and removed
//! before, so the kept watches have descriptors 2 and 3, not 1 and 2.
//!
//! Protocol: `READY pid=N wd_dir=2 wd_file=3`; on SIGUSR2 checks that
//! nothing is queued, creates `inotify-dir/new-K` and writes to the file,
//! and checks that exactly the two matching events arrive (watch
//! descriptor, mask, name); then prints `PASS ...` or `FAIL ...`.

use crm_tests::wl;
use std::ffi::CString;

const FD: i32 = 110;

fn add(path: &str, mask: u32) -> i32 {
    let c = CString::new(path).unwrap_or_default();
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let wd = unsafe { libc::inotify_add_watch(FD, c.as_ptr(), mask) };
    if wd < 0 {
        wl::fail_setup(&format!("inotify_add_watch {path}"));
    }
    wd
}

/// The queued events as (wd, mask, name).
fn events() -> Vec<(i32, u32, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // SAFETY: reading into a local buffer from our non-blocking inotify fd.
    let n = unsafe { libc::read(FD, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    let n = if n < 0 { 0 } else { n as usize };
    let mut at = 0;
    while at + 16 <= n {
        let word = |o: usize| {
            u32::from_ne_bytes([
                buf[at + o],
                buf[at + o + 1],
                buf[at + o + 2],
                buf[at + o + 3],
            ])
        };
        let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
        let name = buf.get(at + 16..at + 16 + len).unwrap_or_default();
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        out.push((wd, mask, name));
        at += 16 + len;
    }
    out
}

fn main() {
    wl::catch(libc::SIGUSR2);
    let _ = std::fs::create_dir("inotify-dir");
    if std::fs::write("inotify-file", b"x").is_err() {
        wl::fail_setup("create inotify-file");
    }
    // SAFETY: inotify_init1 returns a new descriptor, moved to FD.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK);
        if fd < 0 || libc::dup2(fd, FD) != FD {
            wl::fail_setup("inotify_init1");
        }
        libc::close(fd);
    }
    let first = add("inotify-file", libc::IN_ACCESS);
    // SAFETY: removing the watch we just added.
    unsafe { libc::inotify_rm_watch(FD, first) };
    let _ = events(); // its IN_IGNORED
    let wd_dir = add("inotify-dir", libc::IN_CREATE | libc::IN_DELETE);
    let wd_file = add("inotify-file", libc::IN_MODIFY);
    wl::ready(&format!("wd_dir={wd_dir} wd_file={wd_file}"));
    let mut k = 0;
    loop {
        if wl::take(libc::SIGUSR2) {
            let mut p = Vec::new();
            if wl::corrupt_requested() {
                // SAFETY: removing our own watch.
                unsafe { libc::inotify_rm_watch(FD, wd_file) };
                let _ = events();
            }
            // SAFETY: fcntl query on our descriptor.
            if unsafe { libc::fcntl(FD, libc::F_GETFL) } & libc::O_NONBLOCK == 0 {
                p.push("fd 110 lost O_NONBLOCK".to_string());
            }
            let stale = events();
            if !stale.is_empty() {
                p.push(format!("events queued before the check: {stale:?}"));
            }
            k += 1;
            let name = format!("new-{k}");
            let made = std::fs::write(format!("inotify-dir/{name}"), b"");
            let wrote = std::fs::write("inotify-file", format!("{k}"));
            if made.is_err() || wrote.is_err() {
                p.push("cannot create or write the watched files".into());
            }
            wl::sleep_ms(50);
            let got = events();
            let want_dir = (wd_dir, libc::IN_CREATE, name.clone());
            if !got.contains(&want_dir) {
                p.push(format!("no IN_CREATE {name} on wd {wd_dir}"));
            }
            if !got.iter().any(|e| e.0 == wd_file && e.1 == libc::IN_MODIFY) {
                p.push(format!("no IN_MODIFY on wd {wd_file}"));
            }
            if let Some(e) = got.iter().find(|e| e.0 != wd_dir && e.0 != wd_file) {
                p.push(format!("an event for an unknown watch: {e:?}"));
            }
            let _ = std::fs::remove_file(format!("inotify-dir/{name}"));
            wl::sleep_ms(20);
            let _ = events(); // the IN_DELETE
            wl::verdict(
                &format!("inotify watches {wd_dir} (dir) and {wd_file} (file) deliver new events"),
                &p,
            );
        }
        wl::sleep_ms(10);
    }
}
