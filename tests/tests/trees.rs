//! End-to-end tests of process trees: `cr-migrate dump --pid ROOT` takes every task
//! below ROOT, `cr-migrate restore` recreates them with their PIDs, parents,
//! process groups, sessions and zombies (issue 4).
//!
//! Each test starts `wl_tree MODE` below the test process (a child subreaper), records
//! every task's parent, group, session and state from `/proc`, dumps the tree, waits
//! until every original PID is free (the killed tasks come back to us to be reaped),
//! restores with `--detach`, compares `/proc` with the record, and asks the tree to
//! verify itself (the root checks itself, asks every member over queued signals and
//! prints one `PASS`/`FAIL`). The [`Tree`] guard kills and reaps every task, also when
//! an assertion fails, and complains if any is left.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crm_tests::tree::{Links, Tree};
use crm_tests::{self as h, procs, run_crm, workload_bin, Spawn, TempDir};
use crm_tests::{assert_success, path_str, stderr};

const GONE_TIMEOUT: Duration = crm_tests::tree::GONE_TIMEOUT;

fn assert_refused(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(
        out.status.code().is_some_and(|c| c != 0) && !err.contains("panicked"),
        "`cr-migrate {what}` should have failed cleanly ({}):\n{err}",
        out.status
    );
    err
}

/// Starts `wl_tree MODE` with default options.
fn start(mode: &str, dir: &Path) -> Tree {
    start_with(mode, dir, Spawn::default())
}

fn start_with(mode: &str, dir: &Path, opts: Spawn) -> Tree {
    Tree::start(workload_bin!(wl_tree), &[mode], dir, opts)
}

/// After a dump that killed the tree: every PID free.
fn reap_dumped(tree: &mut Tree) {
    tree.reap_dumped()
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    println!(
        "checked: the dump killed all {} tasks, every PID is free",
        tree.all().len()
    );
}

/// `restore --detach` of `images`; the root is taken under the guard.
fn restore(tree: &mut Tree, images: &Path) {
    tree.restore_detached(images);
}

/// Every task has its parent, group, session and zombie state back.
fn assert_same_links(before: &BTreeMap<i32, Links>, after: &BTreeMap<i32, Links>) {
    assert_eq!(
        after, before,
        "(parent, group, session, zombie) per task after restore differs from before the dump"
    );
    println!(
        "checked: {} tasks have their PIDs, parents, groups, sessions and zombie states back",
        after.len()
    );
}

/// After a refused dump: every task alive, not traced, not stopped, and the tree PASSes.
fn assert_untouched(tree: &Tree, before: &BTreeMap<i32, Links>, what: &str) {
    for p in tree.all() {
        if tree.zombies.contains(&p) {
            continue;
        }
        procs::assert_running_untraced(p, what);
    }
    assert_eq!(&tree.links(), before, "{what}: the tree changed");
    tree.wl.expect_pass(&format!("after {what}"));
    println!("checked: after {what}, every task runs untraced and the tree PASSes");
}

/// Dump, reap, restore, compare, verify.
fn cycle(mode: &str, verify_before: bool) -> (TempDir, Tree) {
    h::init();
    let tmp = TempDir::new(&format!("tree-{mode}"));
    let images = tmp.subdir("images");
    let mut tree = start(mode, tmp.path());
    if verify_before {
        tree.wl.expect_pass("before dump");
    }
    let before = tree.links();
    assert_eq!(
        before.len(),
        tree.all().len(),
        "some task vanished: {before:?}"
    );
    let pid = tree.wl.pid().to_string();
    // Not through run_crm, which reaps our zombie children after the command:
    // here nothing but the dumper may reap the killed tasks.
    let out = std::process::Command::new(h::crm_bin())
        .args(["dump", "--pid", &pid, "--images-dir", path_str(&images)])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running cr-migrate dump");
    assert_success(&out, "dump");
    let msg = stderr(&out);
    let count = |what: &str| -> Option<usize> {
        let end = msg.find(&format!(" {what}(s)"))?;
        msg[..end].rsplit(' ').next()?.parse().ok()
    };
    let (tasks, zombies) = (count("task"), count("zombie"));
    let want = (1 + tree.members.len(), tree.zombies.len());
    // The forker's short-lived children may be caught too, live or zombie.
    let ok = match (tasks, zombies) {
        (Some(t), Some(z)) if mode == "forker" => t + z >= want.0 + want.1,
        (Some(t), Some(z)) => (t, z) == want,
        _ => false,
    };
    assert!(ok, "dump should report {want:?} tasks and zombies:\n{msg}");
    let want = format!(
        "{} task(s), {} zombie(s)",
        tasks.unwrap_or(0),
        zombies.unwrap_or(0)
    );
    assert!(
        images.join("tree.img").is_file(),
        "no tree.img in the image"
    );
    for p in std::iter::once(tree.wl.pid()).chain(tree.members.iter().copied()) {
        assert!(
            images.join(format!("core-{p}.img")).is_file(),
            "no core-{p}.img"
        );
    }
    println!("checked: dump of tree {pid}: {want}, tree.img and a core record per live task");
    let left: Vec<i32> = tree
        .members
        .iter()
        .chain(&tree.zombies)
        .copied()
        .filter(|&p| procs::stat(p).is_some())
        .collect();
    assert!(
        left.is_empty(),
        "the dump should leave only the root's zombie (its parents reap the others): {left:?}"
    );
    reap_dumped(&mut tree);
    restore(&mut tree, &images);
    assert_same_links(&before, &tree.links());
    (tmp, tree)
}

#[test]
fn multitask_parents_memory_and_threads() {
    let _serial = h::serial();
    let (tmp, tree) = cycle("multitask", true);
    let threaded = tree
        .members
        .iter()
        .filter(|&&p| procs::task_ids(p).len() == 2)
        .count();
    assert_eq!(threaded, 1, "one member should run two threads again");
    tree.wl.expect_pass("after restore");
    // The image again while the tree runs: refused up front, nothing touched.
    let images = tmp.path().join("images");
    let before = tree.links();
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let err = assert_refused(&out, "a second restore");
    assert!(err.contains("is in use"), "{err}");
    let out = run_crm(&[
        "restore",
        "--images-dir",
        path_str(&images),
        "--detach",
        "--lazy-pages",
    ]);
    let err = assert_refused(&out, "restore --lazy-pages of a tree");
    assert!(
        err.contains("lazy pages from an image are not supported for process trees"),
        "{err}"
    );
    assert_untouched(&tree, &before, "the refused restores");
}

#[test]
fn pgrp_groups_and_sessions_kept() {
    let _serial = h::serial();
    let (_tmp, tree) = cycle("pgrp", true);
    let sessions: std::collections::BTreeSet<i32> = tree.links().values().map(|l| l.2).collect();
    let groups: std::collections::BTreeSet<i32> = tree.links().values().map(|l| l.1).collect();
    assert_eq!((sessions.len(), groups.len()), (2, 4), "{:?}", tree.links());
    tree.wl.expect_pass("after restore");
}

#[test]
fn zombie_restored_unreaped_then_reaped_with_status() {
    let _serial = h::serial();
    let (tmp, tree) = cycle("zombie", false);
    assert_eq!(tree.zombies.len(), 3, "READY: {}", tree.wl.ready_line());
    let out = run_crm(&["show", path_str(&tmp.path().join("images"))]);
    assert_success(&out, "show");
    let shown = String::from_utf8_lossy(&out.stdout);
    for status in [
        "zombie, wait status 0x700",
        "zombie, wait status 0xf",
        "0x500",
    ] {
        assert!(
            shown.contains(status),
            "`show` should list {status:?}:\n{shown}"
        );
    }
    println!("checked: `cr-migrate show` lists the zombies with their wait statuses");
    for &z in &tree.zombies {
        assert_eq!(procs::stat(z).map(|s| s.state), Some('Z'), "pid {z}");
    }
    println!(
        "checked: {:?} are zombies again, of their original parents",
        tree.zombies
    );
    tree.wl.expect_pass("after restore (reaping the zombies)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tree.zombies.iter().any(|&z| procs::stat(z).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &z in &tree.zombies {
        assert!(
            procs::stat(z).is_none(),
            "zombie {z} still there after its parent reaped it"
        );
    }
    println!("checked: the parents reaped their zombies with the original exit statuses");
}

#[test]
fn orphan_adopted_by_subreaper_root() {
    let _serial = h::serial();
    let (_tmp, tree) = cycle("orphan", true);
    let root = tree.wl.pid();
    for m in &tree.members {
        assert_eq!(procs::stat(*m).map(|s| s.ppid), Some(root), "orphan {m}");
    }
    tree.wl.expect_pass("after restore");
}

#[test]
fn leave_running_keeps_the_whole_tree() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-leave");
    let images = tmp.subdir("images");
    let tree = start("multitask", tmp.path());
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    h::dump_leave_running(&pid, &images);
    assert_untouched(&tree, &before, "dump --leave-running");
}

#[test]
fn group_whose_leader_is_gone_kept_with_a_helper() {
    let _serial = h::serial();
    let (_tmp, tree) = cycle("orphan-group", true);
    let m = tree.members[0];
    let (_, group, _, _) = tree.links()[&m];
    assert!(group != m && group != tree.wl.pid(), "{:?}", tree.links());
    assert!(
        procs::stat(group).is_none(),
        "the helper {group} is still there"
    );
    println!("checked: orphan {m} is in group {group} again, whose leader (a helper) is gone");
    tree.wl.expect_pass("after restore");
}

#[test]
fn daemon_whose_session_leader_is_gone_kept_with_a_helper() {
    let _serial = h::serial();
    let (_tmp, tree) = cycle("orphan-session", true);
    let m = tree.members[0];
    let (ppid, group, session, _) = tree.links()[&m];
    assert!(
        ppid == tree.wl.pid() && session == group && session != m,
        "{:?}",
        tree.links()
    );
    assert!(
        procs::stat(session).is_none(),
        "the helper {session} is still there"
    );
    println!("checked: daemon {m} is in session {session} again, whose leader (a helper) is gone");
    tree.wl.expect_pass("after restore");
}

#[test]
fn session_left_after_fork_refused_untouched() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-session-left");
    let images = tmp.subdir("images");
    let tree = start("session-left", tmp.path());
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = assert_refused(&out, "dump");
    // K: the member whose parent is the other member.
    let k = *tree
        .members
        .iter()
        .find(|m| tree.members.contains(&before[m].0))
        .expect("a member whose parent is a member");
    let session = before[&k].2;
    assert!(
        err.contains(&format!("task {k}")) && err.contains(&format!("session {session}")),
        "the refusal should name task {k} and session {session}:\n{err}"
    );
    assert!(
        !images.join("inventory.img").exists(),
        "a refused dump left an image"
    );
    assert_untouched(&tree, &before, "the refused dump");
}

#[test]
fn unsupported_fd_in_a_child_refused_untouched() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-socket");
    let images = tmp.subdir("images");
    let tree = start("child-socket", tmp.path());
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    let err = assert_refused(&out, "dump");
    let holder = tree
        .members
        .iter()
        .find(|&&m| procs::fds(m).values().any(|l| l.starts_with("socket:")))
        .copied()
        .expect("a member holds a socket");
    assert!(
        err.contains(&format!("process {holder}: fd ")) && err.contains("netlink socket"),
        "the refusal should name process {holder}, the fd and its kind:\n{err}"
    );
    assert_untouched(&tree, &before, "the refused dump");
}

#[test]
fn failed_restore_kills_and_reaps_every_task() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-fail");
    let images = tmp.subdir("images");
    let cwd = tmp.subdir("cwd-child");
    let mut tree = start("child-cwd", tmp.path());
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    assert_success(
        &run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]),
        "dump",
    );
    reap_dumped(&mut tree);
    // One child's working directory disappears: its restore fails after the
    // whole tree was created.
    std::fs::remove_dir(&cwd).expect("remove cwd-child");
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let err = assert_refused(&out, "restore");
    assert!(err.contains("chdir") && err.contains("cwd-child"), "{err}");
    tree.wait_all_gone(GONE_TIMEOUT)
        .unwrap_or_else(|e| panic!("after the failed restore: {e}"));
    println!("checked: the failed restore left no task of the tree behind:\n{err}");
    // Nothing blocks the PIDs: the same image restores once the directory is back.
    std::fs::create_dir(&cwd).expect("recreate cwd-child");
    restore(&mut tree, &images);
    assert_same_links(&before, &tree.links());
    tree.wl.expect_pass("after the second restore");
}

#[test]
fn self_check_passes_twice_and_detects_damage() {
    h::init();
    let tmp = TempDir::new("tree-selftest");
    {
        let tree = start("pgrp", tmp.path());
        tree.wl.expect_pass("first verification");
        tree.wl.expect_pass("second verification");
    }
    let bad = Spawn {
        env: vec![("CRM_WL_CORRUPT".into(), "1".into())],
        ..Spawn::default()
    };
    let tree = start_with("multitask", tmp.path(), bad);
    match tree.wl.verify() {
        Ok(line) => panic!("wl_tree with CRM_WL_CORRUPT=1 should FAIL, got: {line}"),
        Err(e) => {
            let line = e.lines().next().unwrap_or("");
            assert!(
                line.starts_with("FAIL") && line.contains("failed its checks"),
                "expected a FAIL naming the members, got: {e}"
            );
            println!("checked: wl_tree detects damage in its members: {line}");
        }
    }
}

#[test]
fn shared_anonymous_memory_stays_shared_and_is_stored_once() {
    let _serial = h::serial();
    let (tmp, tree) = cycle("shmem", true);
    let images = tmp.path().join("images");
    let pages: u64 = std::fs::read_dir(&images)
        .expect("images dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    // 4 tasks map the 4 MiB region: stored once it is well under 12 MiB
    // (private buffers and stacks included), stored per task over 16 MiB.
    assert!(
        pages < 12 << 20,
        "pages files hold {pages} bytes: shared memory stored per task?"
    );
    println!(
        "checked: the image holds {} KiB of pages for 4 tasks sharing 4 MiB",
        pages >> 10
    );
    let root = tree.wl.pid();
    let shared_maps = |pid: i32| -> Vec<String> {
        procs::maps(pid)
            .into_iter()
            .filter(|l| l.ends_with("/dev/zero (deleted)"))
            .collect()
    };
    let root_maps = shared_maps(root);
    assert_eq!(
        root_maps.len(),
        2,
        "two shared VMAs in the root: {root_maps:?}"
    );
    for m in &tree.members {
        assert_eq!(shared_maps(*m), root_maps, "member {m}'s shared VMAs");
    }
    tree.wl
        .expect_pass("after restore (writes seen across tasks)");
}

#[test]
fn shell_job_tree_restored_into_the_restorers_session() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-shell-job");
    let images = tmp.subdir("images");
    let job = Spawn {
        new_session: false,
        ..Spawn::default()
    };
    let mut tree = start_with("multitask", tmp.path(), job);
    let before = tree.links();
    let pid = tree.wl.pid().to_string();
    let dir = path_str(&images);
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", dir]);
    let err = assert_refused(&out, "dump without --shell-job");
    assert!(err.contains("--shell-job"), "{err}");
    assert_success(
        &run_crm(&["dump", "--pid", &pid, "--images-dir", dir, "--shell-job"]),
        "dump --shell-job",
    );
    reap_dumped(&mut tree);
    let out = run_crm(&["restore", "--images-dir", dir, "--detach", "--shell-job"]);
    let adopted = tree.wl.adopt_restored();
    assert_success(&out, "restore --detach --shell-job");
    adopted.unwrap_or_else(|e| panic!("after restore: {e}"));
    // The test process ran both the job and the restore: same session, same group.
    assert_same_links(&before, &tree.links());
    tree.wl.expect_pass("after restore");
}

#[test]
fn tasks_forking_and_exiting_during_the_dump() {
    let _serial = h::serial();
    for round in 0..3 {
        let (_tmp, tree) = cycle("forker", true);
        tree.wl
            .expect_pass(&format!("after restore (round {round})"));
    }
}

#[test]
fn stopped_task_stays_stopped() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-stopped");
    let images = tmp.subdir("images");
    let mut tree = start("multitask", tmp.path());
    let before = tree.links();
    let m = tree.members[1];
    let state = |p: i32| procs::stat(p).map(|s| s.state);
    let wait_state = |p: i32, want: char| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(p) != Some(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        state(p)
    };
    procs::kill(m, libc::SIGSTOP).expect("SIGSTOP");
    assert_eq!(wait_state(m, 'T'), Some('T'), "member {m} should stop");
    // Left running: the stopped member stays stopped, the others run.
    let leave = tmp.subdir("leave-running");
    h::dump_leave_running(&tree.wl.pid().to_string(), &leave);
    assert_eq!(
        state(m),
        Some('T'),
        "member {m} should still be stopped after the dump"
    );
    procs::assert_running_untraced(tree.wl.pid(), "dump --leave-running");
    println!("checked: after dump --leave-running member {m} is still stopped, the root runs");
    tree.dump_and_reap(&images);
    restore(&mut tree, &images);
    assert_same_links(&before, &tree.links());
    assert_eq!(
        wait_state(m, 'T'),
        Some('T'),
        "the restored member {m} should be stopped, as it was when dumped"
    );
    println!("checked: the restored member {m} is stopped again");
    procs::kill(m, libc::SIGCONT).expect("SIGCONT");
    assert_ne!(
        wait_state(m, 'S'),
        Some('T'),
        "member {m} should resume on SIGCONT"
    );
    let pass = tree.wl.expect_pass("after SIGCONT");
    println!("checked: after SIGCONT the tree PASSes: {pass}");
}

#[test]
fn restore_without_detach_waits_for_the_root() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-attached");
    let images = tmp.subdir("images");
    let mut tree = start("multitask", tmp.path());
    let before = tree.links();
    let pid = tree.wl.pid();
    assert_success(
        &run_crm(&[
            "dump",
            "--pid",
            &pid.to_string(),
            "--images-dir",
            path_str(&images),
        ]),
        "dump",
    );
    reap_dumped(&mut tree);
    let mut restore = std::process::Command::new(h::crm_bin())
        .args(["restore", "--images-dir", path_str(&images)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning cr-migrate restore");
    let crm = restore.id() as i32;
    // Restored means: every task runs wl_tree again and nobody traces it.
    let exe = workload_bin!(wl_tree);
    let canonical = std::fs::canonicalize(exe).ok();
    let restored = |p: i32| {
        procs::alive(p)
            && procs::tracer_pid(p) == Some(0)
            && procs::exe(p).is_some_and(|e| e == exe || Some(&e) == canonical.as_ref())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::iter::once(&pid)
        .chain(&tree.members)
        .all(|&p| restored(p))
        || procs::stat(pid).map(|s| s.ppid) != Some(crm)
    {
        if Instant::now() > deadline || restore.try_wait().ok().flatten().is_some() {
            let _ = restore.kill();
            let out = restore.wait_with_output().expect("cr-migrate output");
            panic!(
                "the tree did not come back under cr-migrate: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let adopted = tree.wl.adopt_restored();
    adopted.unwrap_or_else(|e| panic!("after restore: {e}"));
    let mut after = tree.links();
    // The root's parent is cr-migrate now, waiting for it.
    after.get_mut(&pid).expect("root").0 = before[&pid].0;
    assert_same_links(&before, &after);
    // The root sees cr-migrate as its parent now (as any restore that is
    // waited for): that must be the only difference it reports.
    let verdict = tree.wl.verify();
    let line = verdict
        .as_ref()
        .err()
        .and_then(|e| e.lines().next())
        .unwrap_or("");
    assert!(
        line.starts_with("FAIL root ids were")
            && !line.contains(';')
            && line.contains(&format!(", now ({pid}, {crm}, ")),
        "only the root's parent (now cr-migrate {crm}) should differ: {verdict:?}"
    );
    println!("checked: every member passes; the root only reports its new parent: {line}");
    procs::kill(pid, libc::SIGTERM).expect("SIGTERM to the root");
    let out = restore
        .wait_with_output()
        .expect("cr-migrate restore output");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "cr-migrate restore should exit with the root's fate:\n{}",
        stderr(&out)
    );
    println!("checked: restore without --detach waited for the root and exited 128+SIGTERM");
}

/// The root writes into a pipe its child reads (pipes between tasks in
/// detail: `tests/tree_files.rs`).
#[test]
fn pipe_between_tasks_restored() {
    let _serial = h::serial();
    let (_tmp, tree) = cycle("child-pipe", true);
    let (root, child) = (tree.wl.pid(), tree.members[0]);
    let pipe_of = |p: i32| {
        procs::fds(p)
            .into_values()
            .filter(|l| l.starts_with("pipe:"))
            .collect::<Vec<_>>()
    };
    let (a, b) = (pipe_of(root), pipe_of(child));
    assert!(
        a.len() == 1 && a == b,
        "one pipe between root and child: {a:?} / {b:?}"
    );
    tree.wl.expect_pass("after restore");
}

/// Bytes of task pages in an image (`pages-PID.img`, not shared memory's).
fn task_page_bytes(images: &Path) -> u64 {
    std::fs::read_dir(images)
        .expect("read the image dir")
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("pages-") && !n.starts_with("pages-shm-")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// 16 MiB of private memory the root filled before forking 7 children
/// that never write it: stored once (with the root), not 8 times, and
/// every child has it back after restore.
#[test]
fn inherited_private_memory_is_stored_once() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-inherit");
    let images = tmp.subdir("images");
    let mut tree = start("inherit", tmp.path());
    assert_eq!(tree.members.len(), 7);
    tree.wl.expect_pass("before the dump");
    let before = tree.links();
    // Reading the memory must not unshare it: a tree left running keeps
    // sharing its copy-on-write pages.
    let private_kib = |p: i32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Private_Dirty:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let tasks = tree.all();
    let private_before: u64 = tasks.iter().map(|&p| private_kib(p)).sum();
    let first = tmp.subdir("leave-running");
    let pid = tree.wl.pid().to_string();
    h::dump_leave_running(&pid, &first);
    let private_after: u64 = tasks.iter().map(|&p| private_kib(p)).sum();
    assert!(
        private_after < private_before + 4096,
        "dump --leave-running unshared copy-on-write memory: private dirty memory of the tree \
         went from {private_before} to {private_after} KiB"
    );
    println!(
        "checked: dump --leave-running kept the pages shared (private dirty {private_before} -> \
         {private_after} KiB)"
    );
    let out = tree.dump_and_reap(&images);
    let bytes = task_page_bytes(&images);
    let mib = bytes as f64 / f64::from(1 << 20);
    assert!(
        (16.0..32.0).contains(&mib),
        "the tasks' pages take {mib:.1} MiB: the 16 MiB the children inherited should be \
         stored once (8 copies would be 128 MiB)\n{}",
        stderr(&out)
    );
    println!(
        "checked: 8 tasks sharing 16 MiB inherited over fork: {mib:.1} MiB of pages in the image"
    );
    restore(&mut tree, &images);
    assert_same_links(&before, &tree.links());
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: every child has the inherited memory back: {pass}");
}
