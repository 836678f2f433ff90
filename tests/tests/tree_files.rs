//! End-to-end tests of open files shared by the tasks of a process tree
//! (issue 4): pipes between tasks with their buffered data, sizes and
//! flags, an open file description shared after fork (one offset), unix
//! socketpairs between parent and child with queued data both ways, FIFOs
//! read and written by different tasks; and the refusal of a pipe to a
//! process outside the tree.
//!
//! Each test starts `wl_tree_files MODE` below the test process (a child
//! subreaper), dumps the tree, waits until every PID is free, restores with
//! `--detach`, compares parents, groups and sessions, and asks the tree to
//! verify itself once (its checks consume the data): every member prints
//! `MEMBER-PASS pid=N`, the root `PASS`. The [`Tree`] guard kills and reaps
//! every task, also when an assertion fails.

use std::path::Path;

use crm_tests::tree::Tree;
use crm_tests::{self as h, procs, run_crm, workload_bin, Spawn, TempDir};
use crm_tests::{assert_success, path_str, stderr};

fn start(mode: &str, dir: &Path) -> Tree {
    Tree::start(workload_bin!(wl_tree_files), &[mode], dir, Spawn::default())
}

/// Verifies once and checks that the root and every member passed.
fn expect_all_pass(tree: &Tree, context: &str) {
    let mark = tree.wl.mark();
    let line = tree.wl.expect_pass(context);
    let log = tree.wl.log();
    let new = &log[mark.min(log.len())..];
    for m in &tree.members {
        let want = format!("MEMBER-PASS pid={m} ");
        assert!(
            new.lines().any(|l| l.starts_with(&want)),
            "{context}: no `{want}...` line from member {m}:\n{new}"
        );
    }
    println!(
        "checked: {context}: the root and {} member(s) PASS ({line})",
        tree.members.len()
    );
}

/// Dump (killing the tree), reap, restore, compare the links.
fn dump_and_restore(mode: &str) -> (TempDir, Tree) {
    h::init();
    let tmp = TempDir::new(&format!("tree-files-{mode}"));
    let images = tmp.subdir("images");
    let mut tree = start(mode, tmp.path());
    let before = tree.links();
    tree.dump_and_reap(&images);
    tree.restore_detached(&images);
    assert_eq!(
        tree.links(),
        before,
        "(parent, group, session, zombie) per task after restore"
    );
    println!(
        "checked: {mode}: dump and restore of {} tasks, links kept",
        tree.all().len()
    );
    (tmp, tree)
}

/// Descriptors of `pid` whose `/proc` link starts with `prefix`.
fn fds_like(pid: i32, prefix: &str) -> Vec<i32> {
    procs::fds(pid)
        .into_iter()
        .filter(|(_, l)| l.starts_with(prefix))
        .map(|(fd, _)| fd)
        .collect()
}

/// `cr-migrate show` of the image: its output.
fn show(tmp: &TempDir) -> String {
    let out = run_crm(&["show", path_str(&tmp.path().join("images"))]);
    assert_success(&out, "show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many lines of `text` contain `what`.
fn count(text: &str, what: &str) -> usize {
    text.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn pipes() {
    let _serial = h::serial();
    let (tmp, tree) = dump_and_restore("pipes");
    let image = show(&tmp);
    assert!(
        count(&image, "100000 bytes buffered") == 1 && count(&image, "3000 bytes buffered") == 1,
        "each pipe's data should be stored once:\n{image}"
    );
    assert_eq!(
        count(&image, "shared with other tasks"),
        4 + 3 * 2,
        "the 4 pipe ends and stdin, stdout, stderr of both tasks are shared:\n{image}"
    );
    assert_eq!(count(&image, ", described here"), 4 + 2, "{image}");
    println!("checked: the image stores each pipe's data once, each shared object described once");
    let a = tree.members[0];
    assert_eq!(
        fds_like(tree.wl.pid(), "pipe:"),
        vec![51, 52],
        "root's pipe fds"
    );
    assert_eq!(fds_like(a, "pipe:"), vec![50, 53], "child's pipe fds");
    let link = |p: i32, fd: i32| procs::fds(p).get(&fd).cloned();
    assert_eq!(link(tree.wl.pid(), 51), link(a, 50), "P is one pipe again");
    assert_eq!(link(tree.wl.pid(), 52), link(a, 53), "Q is one pipe again");
    expect_all_pass(&tree, "after restore");
}

/// A dump that leaves the tree running takes nothing out of its pipes and
/// sockets: the tree still finds all its data.
#[test]
fn dump_leave_running_consumes_no_data() {
    h::init();
    let _serial = h::serial();
    for mode in ["pipes2", "socketpair"] {
        let tmp = TempDir::new(&format!("tree-files-leave-{mode}"));
        let images = tmp.subdir("images");
        let tree = start(mode, tmp.path());
        let pid = tree.wl.pid().to_string();
        h::dump_leave_running(&pid, &images);
        for p in tree.all() {
            procs::assert_running_untraced(p, "dump --leave-running");
        }
        expect_all_pass(&tree, &format!("{mode} after dump --leave-running"));
    }
}

#[test]
fn pipes2() {
    let _serial = h::serial();
    let (tmp, tree) = dump_and_restore("pipes2");
    let image = show(&tmp);
    for bytes in [700_000, 10_000, 1_000] {
        assert_eq!(
            count(&image, &format!(" {bytes} bytes buffered")),
            1,
            "the data of each pipe should be stored once:\n{image}"
        );
    }
    let root = tree.wl.pid();
    let s = procs::fds(root).get(&64).cloned();
    for &m in &tree.members {
        assert_eq!(procs::fds(m).get(&64).cloned(), s, "pipe S shared by {m}");
    }
    expect_all_pass(&tree, "after restore");
}

#[test]
fn shared_file_offset() {
    let _serial = h::serial();
    let (_tmp, tree) = dump_and_restore("shared-offset");
    expect_all_pass(&tree, "after restore");
}

#[test]
fn socketpair_between_tasks() {
    let _serial = h::serial();
    let (_tmp, tree) = dump_and_restore("socketpair");
    expect_all_pass(&tree, "after restore");
}

#[test]
fn fifos_between_tasks() {
    let _serial = h::serial();
    let (_tmp, tree) = dump_and_restore("fifo");
    expect_all_pass(&tree, "after restore");
}

#[test]
fn tcp_listener_shared_by_a_preforked_child() {
    let _serial = h::serial();
    let (_tmp, tree) = dump_and_restore("inet-listener");
    expect_all_pass(&tree, "after restore");
}

#[test]
fn unix_listener_with_connections_from_a_child() {
    let _serial = h::serial();
    let (_tmp, tree) = dump_and_restore("unix-listener");
    expect_all_pass(&tree, "after restore");
}

#[test]
fn pipe_to_a_process_outside_the_tree_refused_untouched() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-files-outside");
    let images = tmp.subdir("images");
    let tree = start("outside-pipe", tmp.path());
    let holder = tree.members[0];
    // The test process becomes the pipe's only writer.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{holder}/fd/60"))
        .expect("open a write end of the member's pipe");
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = stderr(&out);
    assert!(
        out.status.code().is_some_and(|c| c != 0) && !err.contains("panicked"),
        "the dump should have failed cleanly ({}):\n{err}",
        out.status
    );
    assert!(
        err.contains(&format!("process {holder}: fd 60 "))
            && err.contains("a pipe to another process")
            && err.contains("no task of the dumped tree"),
        "the refusal should name process {holder}, fd 60 and its kind:\n{err}"
    );
    drop(writer);
    for p in tree.all() {
        procs::assert_running_untraced(p, "the refused dump");
    }
    assert_eq!(tree.links(), before, "the refused dump changed the tree");
    expect_all_pass(&tree, "after the refused dump");
}
