//! Checkpoint/restore of memfds, POSIX shared memory and pseudo-terminals
//! (issue 4), driving the real `cr-migrate` binary.
//!
//! Each test starts a workload that sets its objects up and verifies them
//! itself (SIGUSR2 → `PASS`/`FAIL`; a parent asks its child through memory
//! they share, or through the pty), checks it PASSes, dumps it (which
//! kills it), reaps the original, restores it with `--detach` and asks it
//! to verify again. Guards kill and reap every process and remove the
//! POSIX shm object even when an assertion fails; the tests take the
//! process-wide [`h::serial`] lock.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use crm_tests::tree::Tree;
use crm_tests::{self as h, procs, run_crm, workload_bin, Spawn, TempDir, Workload};
use crm_tests::{assert_success, path_str, stderr};

const PAGE: u64 = 4096;

fn dump(wl: &mut Workload, images: &Path) -> String {
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(images)]);
    assert_success(&out, "dump");
    wl.reap_killed(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    stderr(&out)
}

/// `show` must print every line of `shown`.
fn show(images: &Path, shown: &[&str]) {
    let out = run_crm(&["show", path_str(images)]);
    assert_success(&out, "show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for want in shown {
        assert!(text.contains(want), "`show` should print {want:?}:\n{text}");
    }
}

fn restore(wl: &mut Workload, images: &Path) {
    let out = run_crm(&["restore", "--images-dir", path_str(images), "--detach"]);
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --detach");
    adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
}

/// Dumps a tree (the dumper reaps the members), reaps the root, restores.
fn tree_cycle(tree: &mut Tree, images: &Path) -> String {
    tree.dump_and_reap(images);
    let out = tree.restore_detached(images);
    for &m in &tree.members {
        assert!(procs::stat(m).is_some(), "member {m} was not restored");
    }
    stderr(&out)
}

/// The memfd page files of an image: `(inode, size in bytes)`.
fn memfd_pages(images: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(images)
        .expect("read the image dir")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ino = name
                .strip_prefix("memfd-pages-")?
                .strip_suffix(".img")?
                .to_string();
            Some((ino, e.metadata().ok()?.len()))
        })
        .collect();
    v.sort();
    v
}

/// Memfds held as descriptors (one sealed, one reopened read-only, one
/// dup'd) and mapped shared and private by one task, and one only mapped,
/// come back with their names, sizes, seals, flags, offsets and contents;
/// each memfd's contents are stored once.
#[test]
fn memfd_fds_and_mappings() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("memfd");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_memfd), &[], tmp.path());
    wl.expect_pass("before the dump");
    let before = procs::fds(wl.pid());
    dump(&mut wl, &images);
    show(
        &images,
        &[
            "memfd \"crm-plain\"",
            "memfd \"crm sealed\"",
            "dup of fd 30",
            "memfd \"crm-mapped\"",
        ],
    );
    let stored = memfd_pages(&images);
    assert_eq!(stored.len(), 4, "one contents file per memfd: {stored:?}");
    restore(&mut wl, &images);
    assert_eq!(
        procs::fds(wl.pid()),
        before,
        "descriptors differ after restore"
    );
    println!("checked: restored with the same descriptors {before:?}");
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A parent and child sharing one memfd (the parent's fd and mapping, the
/// child's inherited mapping, own fd and second mapping) share it again
/// after a restore: a write by one is seen by the other, in its mappings
/// and through read(). The image stores the memfd's contents once.
#[test]
fn memfd_shared_by_parent_and_child() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("memfd-tree");
    let images = tmp.subdir("images");
    let mut tree = Tree::start(
        workload_bin!(wl_memfd_tree),
        &[],
        tmp.path(),
        Spawn::default(),
    );
    assert_eq!(tree.members.len(), 1, "one child");
    tree.wl.expect_pass("before the dump");
    tree_cycle(&mut tree, &images);
    let stored = memfd_pages(&images);
    assert_eq!(
        stored.len(),
        1,
        "the memfd's contents are stored once: {stored:?}"
    );
    // A 4 KiB header, then pages 0-13 (pattern), 14 (nonces) and 15
    // (mailbox): never a second copy.
    let pages = stored[0].1 / PAGE - 1;
    assert!(
        (14..=16).contains(&pages),
        "the memfd of 16 pages is stored as {pages} pages"
    );
    println!("checked: the image holds the memfd once ({pages} pages)");
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: {pass}");
    let pass = tree.wl.expect_pass("a second time after restore");
    println!("checked: {pass}");
}

/// Removes a POSIX shm file on drop.
struct ShmFile(String);

impl Drop for ShmFile {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn shm_of(wl: &Workload) -> ShmFile {
    let path = wl.ready_field("shm").unwrap_or("").to_string();
    assert!(
        path.starts_with("/dev/shm/crm-shm-"),
        "no shm= in {:?}",
        wl.ready_line()
    );
    ShmFile(path)
}

/// POSIX shm mapped by one task (twice shared, once private with a
/// written page) is restored as a shared file mapping: the contents live
/// in the file, which the image does not copy.
#[test]
fn posix_shm_single_task() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("posix-shm");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_posix_shm), &["single"], tmp.path());
    let shm = shm_of(&wl);
    wl.expect_pass("before the dump");
    dump(&mut wl, &images);
    assert!(memfd_pages(&images).is_empty());
    assert!(Path::new(&shm.0).exists(), "{} vanished", shm.0);
    restore(&mut wl, &images);
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// POSIX shm shared by a parent and a child (each with its own fd) is
/// shared again after a restore.
#[test]
fn posix_shm_parent_and_child() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("posix-shm-tree");
    let images = tmp.subdir("images");
    let mut tree = Tree::start(
        workload_bin!(wl_posix_shm),
        &["tree"],
        tmp.path(),
        Spawn::default(),
    );
    let _shm = shm_of(&tree.wl);
    tree.wl.expect_pass("before the dump");
    tree_cycle(&mut tree, &images);
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A pty whose master the parent holds and whose slave is the child's
/// stdin, stdout, stderr and controlling terminal works again after a
/// restore, with its index: the parent talks to the child through it, the termios and
/// window size are kept, the child leads its session with the pty as its
/// controlling terminal and is the foreground group, and its own child
/// (created after it took the terminal) has it as controlling terminal too.
#[test]
fn pty_between_parent_and_child() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("pty");
    let images = tmp.subdir("images");
    let mut tree = Tree::start(workload_bin!(wl_pty), &[], tmp.path(), Spawn::default());
    assert_eq!(tree.members.len(), 2, "a child and a grandchild");
    tree.wl.expect_pass("before the dump");
    let fds_before = procs::fds(tree.members[0]);
    tree_cycle(&mut tree, &images);
    show(
        &images,
        &[
            "pty master",
            "pty slave",
            "(101x33, packet mode)",
            "controlling terminal",
        ],
    );
    let child = tree.members[0];
    let fds = procs::fds(child);
    assert!(
        fds.get(&0).is_some_and(|l| l.starts_with("/dev/pts/")),
        "the child's stdin is {:?}",
        fds.get(&0)
    );
    // The original index was freed by the dump: the pty gets it again.
    assert_eq!(
        fds, fds_before,
        "the child's descriptors (the pty's index) differ after restore"
    );
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: {pass}");
    let pass = tree.wl.expect_pass("a second time after restore");
    println!("checked: {pass}");
}

/// A pty slave whose master is outside the dumped tree (here: the child
/// dumped without its parent) is refused, naming the task, the fd and the
/// terminal; the tree runs on untouched.
#[test]
fn pty_with_master_outside_the_tree_is_refused() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("pty-refused");
    let images = tmp.subdir("images");
    let tree = Tree::start(workload_bin!(wl_pty), &[], tmp.path(), Spawn::default());
    let child = tree.members[0];
    let out = run_crm(&[
        "dump",
        "--pid",
        &child.to_string(),
        "--images-dir",
        path_str(&images),
    ]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && !err.contains("panicked"),
        "the dump should fail cleanly:\n{err}"
    );
    for want in [
        format!("process {child}"),
        "fd 0".to_string(),
        "terminal".to_string(),
        "master".to_string(),
    ] {
        assert!(err.contains(&want), "the error should say {want:?}:\n{err}");
    }
    procs::assert_running_untraced(child, "the refused dump");
    procs::assert_running_untraced(tree.wl.pid(), "the refused dump");
    let pass = tree.wl.expect_pass("after the refused dump");
    println!("checked: refused ({}), then {pass}", err.trim());
}

/// A pty master whose slave a process outside the tree holds is refused,
/// naming that process; once it let go, the master alone is dumped and
/// restored with its index, window size and packet mode.
#[test]
fn pty_master_with_slave_outside_the_tree() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("pty-alone");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_pty), &["alone"], tmp.path());
    let pts = wl.ready_field("pts").unwrap_or("").to_string();
    assert!(pts.starts_with("/dev/pts/"), "{}", wl.ready_line());
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pts)
        .expect("open the slave from the test");
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && !err.contains("panicked"),
        "the dump should fail cleanly:\n{err}"
    );
    let me = format!("process {}", std::process::id());
    for want in [
        format!("process {pid}"),
        "fd 30".into(),
        "pty master".into(),
        me,
    ] {
        assert!(err.contains(&want), "the error should say {want:?}:\n{err}");
    }
    procs::assert_running_untraced(wl.pid(), "the refused dump");
    wl.expect_pass("after the refused dump");
    drop(held);
    let images = tmp.subdir("images-2");
    dump(&mut wl, &images);
    restore(&mut wl, &images);
    let pass = wl.expect_pass("after restore");
    println!("checked: refused while we held the slave, then {pass}");
}
