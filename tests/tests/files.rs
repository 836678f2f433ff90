//! Checkpoint/restore of FIFOs, file locks and O_DIRECT files held by one
//! process, driving the real `cr-migrate` binary (DESIGN.md §6).
//!
//! Each test starts a workload that sets its objects up and verifies them
//! itself (SIGUSR2 → `PASS`/`FAIL`), checks it PASSes, dumps it (which kills
//! it), reaps the original, checks what `show` prints, restores it with
//! `--detach`, checks that it has the same descriptors, and asks it to
//! verify again. Locks are also checked from the test process (another
//! process than the lock owner). Refusal tests check that what cannot be
//! restored (a FIFO read by another process, a lease, a FIFO path now taken
//! by a file, a lock someone else holds at restore time) fails with a
//! message naming it and leaves no process behind or the original running
//! untouched. Guards kill and reap every process even
//! when an assertion fails; the tests take the process-wide [`h::serial`]
//! lock.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crm_tests::tree::Tree;
use crm_tests::{self as h, procs, run_crm, workload_bin, Spawn, TempDir, Workload};
use crm_tests::{assert_success, path_str, stderr};

fn dump(wl: &mut Workload, images: &Path) {
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(images)]);
    assert_success(&out, "dump");
    wl.reap_killed(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
}

/// `show` must print every line of `shown`; returns its output.
fn show(images: &Path, shown: &[&str]) -> String {
    let out = run_crm(&["show", path_str(images)]);
    assert_success(&out, "show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for want in shown {
        assert!(text.contains(want), "`show` should print {want:?}:\n{text}");
    }
    text
}

/// `restore --detach`; the restored workload goes under `wl`'s guard and
/// must have the descriptors of `before`.
fn restore(wl: &mut Workload, images: &Path, before: &BTreeMap<i32, String>) {
    let out = run_crm(&["restore", "--images-dir", path_str(images), "--detach"]);
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --detach");
    adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
    let after = procs::fds(wl.pid());
    assert_eq!(
        *before, after,
        "the restored process does not have the original's descriptors"
    );
    println!("checked: restored with the same {} fds", after.len());
}

/// FIFOs keep their buffered bytes (not consumed by a dump: checked after
/// a `dump --leave-running`), size, access modes and O_NONBLOCK; a FIFO
/// node missing at restore is created again with its mode.
#[test]
fn fifo_data_sizes_and_ends() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("fifo");
    let mut wl = Workload::start(workload_bin!(wl_fifo), &[], tmp.path());
    wl.expect_pass("before the dump");
    let pid = wl.pid().to_string();
    let first = tmp.subdir("images-running");
    h::dump_leave_running(&pid, &first);
    let pass = wl.expect_pass("after dump --leave-running (nothing consumed)");
    println!("checked: after dump --leave-running: {pass}");

    let images = tmp.subdir("images");
    let before = procs::fds(wl.pid());
    dump(&mut wl, &images);
    show(
        &images,
        &[
            "fifo_a read end, size 131072, 80000 bytes buffered nonblock",
            "fifo_a write end, size 131072, data with another fd",
            "fifo_b read-write, size 1048576, 7 bytes buffered nonblock",
            "fifo_a read end, size 131072, data with another fd nonblock (dup of fd 70)",
        ],
    );
    let fifo_b = tmp.path().join("fifo_b");
    std::fs::remove_file(&fifo_b).expect("remove fifo_b");
    restore(&mut wl, &images, &before);
    let meta = std::fs::symlink_metadata(&fifo_b).expect("fifo_b recreated");
    assert!(meta.file_type().is_fifo(), "fifo_b is not a FIFO: {meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "fifo_b mode");
    println!("checked: the missing fifo_b was recreated as a FIFO with mode 600");
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A FIFO path that is now something else is refused, naming it; nothing
/// is left running.
#[test]
fn fifo_path_replaced_is_refused() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("fifo-replaced");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_fifo), &[], tmp.path());
    dump(&mut wl, &images);
    let fifo_a = tmp.path().join("fifo_a");
    std::fs::remove_file(&fifo_a).expect("remove fifo_a");
    std::fs::write(&fifo_a, b"not a fifo").expect("write fifo_a");
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let err = stderr(&out);
    // Whatever happens, a restored process goes under the guard.
    let adopted = wl.adopt_restored();
    assert!(!out.status.success(), "the restore should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in ["fd 70", "fifo_a", "FIFO", "now a regular file"] {
        assert!(err.contains(want), "the error should say {want:?}:\n{err}");
    }
    assert!(adopted.is_err(), "a process runs with the workload's pid");
    assert_eq!(
        std::fs::read(&fifo_a).unwrap_or_default(),
        b"not a fifo",
        "the file at the FIFO's path was changed"
    );
    println!("checked: refused with {}", err.trim());
}

fn open(path: &Path, flags: i32) -> i32 {
    let c = CString::new(path_str(path)).expect("no NUL");
    // SAFETY: `c` is NUL-terminated.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open {}", path.display());
    fd
}

/// Locks of `owner` on the files of wl_locks in `dir`, as this (another)
/// process sees them: a list of problems.
fn locks_seen_from_test(dir: &Path, owner: i32) -> Vec<String> {
    let mut p = Vec::new();
    let fl = open(&dir.join("flock.dat"), libc::O_RDONLY);
    let px = open(&dir.join("posix.dat"), libc::O_RDWR);
    let ofd = open(&dir.join("ofd.dat"), libc::O_RDWR);
    // SAFETY: flock/fcntl on our own fresh descriptors with a valid
    // struct flock; closed at the end.
    unsafe {
        if libc::flock(fl, libc::LOCK_SH | libc::LOCK_NB) == 0 {
            p.push("flock.dat: not locked".into());
        }
        let mut f: libc::flock = std::mem::zeroed();
        f.l_type = libc::F_WRLCK as i16;
        f.l_whence = libc::SEEK_SET as i16;
        f.l_start = 50;
        f.l_len = 1;
        libc::fcntl(px, libc::F_GETLK, &mut f);
        if f.l_type != libc::F_WRLCK as i16 || f.l_pid != owner {
            p.push(format!(
                "posix.dat byte 50: lock type {} of pid {}, want a write lock of {owner}",
                f.l_type, f.l_pid
            ));
        }
        let mut f: libc::flock = std::mem::zeroed();
        f.l_type = libc::F_WRLCK as i16;
        f.l_whence = libc::SEEK_SET as i16;
        f.l_start = 12;
        f.l_len = 1;
        libc::fcntl(ofd, libc::F_OFD_GETLK, &mut f);
        if f.l_type != libc::F_WRLCK as i16 {
            p.push(format!("ofd.dat byte 12: lock type {}", f.l_type));
        }
        libc::close(fl);
        libc::close(px);
        libc::close(ofd);
    }
    p
}

/// flock locks (exclusive through a dup'd fd, shared), POSIX record locks
/// (write and read ranges) and an OFD lock are held again after a restore,
/// by the restored PID, as another process sees them; they are released
/// when the process unlocks (the workload checks that from a child). A
/// `dump --leave-running` leaves them held. An O_DIRECT descriptor keeps
/// O_DIRECT.
#[test]
fn locks_held_after_restore_and_o_direct() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("locks");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_locks), &[], tmp.path());
    let direct = wl.ready_field("direct") == Some("1");
    if !direct {
        h::skip(
            "locks_held_after_restore_and_o_direct (O_DIRECT part)",
            &format!("{} refuses O_DIRECT", tmp.path().display()),
        );
    }
    wl.expect_pass("before the dump");
    let problems = locks_seen_from_test(tmp.path(), wl.pid());
    assert!(problems.is_empty(), "before the dump: {problems:?}");
    // A dump that leaves the process running leaves its locks alone.
    let pid = wl.pid().to_string();
    let running = tmp.subdir("images-running");
    h::dump_leave_running(&pid, &running);
    let problems = locks_seen_from_test(tmp.path(), wl.pid());
    assert!(
        problems.is_empty(),
        "after dump --leave-running: {problems:?}"
    );
    wl.expect_pass("after dump --leave-running");
    let before = procs::fds(wl.pid());
    dump(&mut wl, &images);
    let text = show(
        &images,
        &[
            "flock.dat flags 0o100002 pos 0 locks: flock 0-EOF write",
            "shared.dat flags 0o100000 pos 0 locks: flock 0-EOF read",
            "posix.dat flags 0o100002 pos 0 locks: posix 0+100 write, posix 200-EOF read",
            "ofd.dat flags 0o100002 pos 0 locks: ofd 10+10 write",
        ],
    );
    let dup_line = text
        .lines()
        .find(|l| l.contains("fd 81 "))
        .unwrap_or_default();
    assert!(
        !dup_line.contains("locks:") && dup_line.contains("(dup of fd 80)"),
        "fd 81 should be saved as a dup of fd 80, without the flock again: {dup_line}"
    );
    if direct {
        assert!(
            text.contains("direct.dat flags 0o140002"),
            "O_DIRECT not saved:\n{text}"
        );
    }
    restore(&mut wl, &images, &before);
    let problems = locks_seen_from_test(tmp.path(), wl.pid());
    assert!(problems.is_empty(), "after the restore: {problems:?}");
    println!("checked: the test process sees the restored pid hold the locks");
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A lease is refused at dump, naming the fd; the process runs on with its
/// locks.
#[test]
fn lease_is_refused() {
    h::init();
    let tmp = TempDir::new("lease");
    let images = tmp.subdir("images");
    let wl = Workload::start(workload_bin!(wl_locks), &["--lease"], tmp.path());
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the dump should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [format!("process {pid}: fd 86"), "lease".to_string()] {
        assert!(err.contains(&want), "the error should say {want:?}:\n{err}");
    }
    assert_eq!(procs::tracer_pid(wl.pid()), Some(0), "still traced");
    let pass = wl.expect_pass("after the refused dump");
    println!("checked: refused with {}; then {pass}", err.trim());
}

/// A lock that another process took between the dump and the restore
/// makes the restore fail, naming the fd, the lock and the holder; nothing
/// is left running.
#[test]
fn restore_refuses_a_lock_held_by_another_process() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("locks-taken");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_locks), &[], tmp.path());
    dump(&mut wl, &images);
    let fd = open(&tmp.path().join("posix.dat"), libc::O_RDWR);
    // SAFETY: a valid struct flock for F_SETLK on our own descriptor.
    let taken = unsafe {
        let mut f: libc::flock = std::mem::zeroed();
        f.l_type = libc::F_WRLCK as i16;
        f.l_whence = libc::SEEK_SET as i16;
        f.l_start = 50;
        f.l_len = 10;
        libc::fcntl(fd, libc::F_SETLK, &mut f)
    };
    assert_eq!(taken, 0, "the test could not lock posix.dat");
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let adopted = wl.adopt_restored();
    // SAFETY: closing our descriptor (drops our lock).
    unsafe { libc::close(fd) };
    let err = stderr(&out);
    assert!(!out.status.success(), "the restore should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let me = format!("held by process {}", procs::getpid());
    for want in ["fd 83", "posix.dat", "posix 0+100 write", me.as_str()] {
        assert!(err.contains(want), "the error should say {want:?}:\n{err}");
    }
    assert!(adopted.is_err(), "a process runs with the workload's pid");
    println!("checked: refused with {}", err.trim());
}

/// A FIFO the process only writes to (its reader is another process) is
/// refused at dump, naming the fd; the process runs on with its FIFOs full.
#[test]
fn fifo_read_by_another_process_is_refused() {
    h::init();
    let tmp = TempDir::new("fifo-writer");
    let images = tmp.subdir("images");
    let outside = tmp.path().join("outside.fifo");
    let c = CString::new(path_str(&outside)).expect("no NUL");
    // SAFETY: `c` is NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // This test process is the reader.
    let reader = open(&outside, libc::O_RDONLY | libc::O_NONBLOCK);
    let wl = Workload::start(
        workload_bin!(wl_fifo),
        &["--write-only", path_str(&outside)],
        tmp.path(),
    );
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the dump should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [
        format!("process {pid}: fd 73"),
        "a FIFO read by another process".to_string(),
        "outside.fifo".to_string(),
    ] {
        assert!(err.contains(&want), "the error should say {want:?}:\n{err}");
    }
    assert_eq!(procs::tracer_pid(wl.pid()), Some(0), "still traced");
    let pass = wl.expect_pass("after the refused dump");
    // SAFETY: closing our reader.
    unsafe { libc::close(reader) };
    println!("checked: refused with {}; then {pass}", err.trim());
}

/// A child forked after the locks were taken shares the open file
/// descriptions of the locked files: their flock and OFD locks are saved
/// once (with the parent, the lowest PID sharing them), the tree comes
/// back with both tasks and the locks held by the parent.
#[test]
fn locks_shared_with_a_child_are_taken_once() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("locks-fork");
    let images = tmp.subdir("images");
    let mut tree = Tree::start(
        workload_bin!(wl_locks),
        &["--fork"],
        tmp.path(),
        Spawn::default(),
    );
    assert_eq!(tree.members.len(), 1, "wl_locks --fork has one child");
    tree.wl.expect_pass("before the dump");
    tree.dump_and_reap(&images);
    let text = show(&images, &[]);
    for lock in [
        "locks: flock 0-EOF write",
        "locks: flock 0-EOF read",
        "locks: ofd 10+10 write",
    ] {
        assert_eq!(
            text.matches(lock).count(),
            1,
            "{lock:?} should be saved once, with the parent:\n{text}"
        );
    }
    tree.restore_detached(&images);
    let child = tree.members[0];
    assert!(procs::alive(child), "the child {child} was not restored");
    let problems = locks_seen_from_test(tmp.path(), tree.wl.pid());
    assert!(problems.is_empty(), "after the restore: {problems:?}");
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: parent and child restored, locks held once: {pass}");
}

/// Two tasks of a tree (parent and forked child) hold the same FIFOs: each
/// saves the bytes, the tasks are restored together, and the bytes come
/// back once (the parent reads exactly what was there).
#[test]
fn fifo_shared_with_a_child_refilled_once() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("fifo-fork");
    let images = tmp.subdir("images");
    let mut tree = Tree::start(
        workload_bin!(wl_fifo),
        &["--fork"],
        tmp.path(),
        Spawn::default(),
    );
    assert_eq!(tree.members.len(), 1, "wl_fifo --fork has one child");
    tree.wl.expect_pass("before the dump");
    tree.dump_and_reap(&images);
    show(&images, &["80000 bytes buffered"]);
    tree.restore_detached(&images);
    let child = tree.members[0];
    assert!(procs::alive(child), "the child {child} was not restored");
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: parent and child restored, FIFO bytes once: {pass}");
}
