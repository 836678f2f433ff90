//! Live migration of process trees (issue 4): `cr-migrate send ROOT` moves the
//! whole tree below ROOT while it runs (pre-copy in every task, one freeze of the
//! tree), and `receive` restores it with every PID, parent, group, session and
//! zombie.
//!
//! Each test starts `wl_tree MODE` below the test process (a child subreaper),
//! records every task's links from `/proc`, runs `receive` and `send` as
//! subprocesses and, while `send` runs, reaps the source root once `send` killed
//! the tree (its PID must be free for the restored copy; the dump reaps the other
//! tasks itself). Then it adopts the restored root (reparented to us), compares
//! `/proc` with the record and asks the tree to verify itself: memory, threads,
//! shared memory, and that every member answers. The [`Tree`] guard kills and
//! reaps every task, also when an assertion fails.

use std::path::Path;
use std::time::{Duration, Instant};

use crm_tests::bg::BgProc;
use crm_tests::netns::{self, NetnsPair};
use crm_tests::tree::Tree;
use crm_tests::{self as h, path_str, workload_bin, Spawn, TempDir};

const SEND_TIMEOUT: Duration = Duration::from_secs(120);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Where `receive` and `send` run: behind a command prefix (`ip netns exec NS`)
/// and on which address `receive` listens.
struct Ends {
    recv_prefix: Vec<String>,
    send_prefix: Vec<String>,
    listen: String,
    /// More `send` arguments.
    send_args: Vec<String>,
    /// Verify the tree as soon as `send` is done, while the destination
    /// still fills its memory in.
    verify_while_filling: bool,
}

impl Ends {
    /// `send` in one of two new network namespaces, `receive` in the other
    /// (the pair is deleted when dropped); `Err` says why there are none.
    fn netns() -> Result<(NetnsPair, Ends), String> {
        if netns::ip_bin().is_none() {
            return Err("`ip` (iproute2) is not installed".into());
        }
        let ns =
            NetnsPair::create().map_err(|e| format!("cannot create network namespaces: {e}"))?;
        let port = crm_tests::port::free_port().expect("a free port");
        let ends = Ends {
            recv_prefix: ns.exec_prefix(&ns.b),
            send_prefix: ns.exec_prefix(&ns.a),
            listen: format!("{}:{port}", ns.addr_b),
            send_args: Vec::new(),
            verify_while_filling: false,
        };
        Ok((ns, ends))
    }

    fn local() -> Ends {
        Ends {
            recv_prefix: Vec::new(),
            send_prefix: Vec::new(),
            listen: format!(
                "127.0.0.1:{}",
                crm_tests::port::free_port().expect("a free port")
            ),
            send_args: Vec::new(),
            verify_while_filling: false,
        }
    }
}

/// Migrates the tree `tree` (a child of ours) through `ends`; returns `send`'s
/// stdout (the JSON summary) and stderr.
fn migrate(tree: &mut Tree, tmp: &TempDir, ends: &Ends) -> (String, String) {
    let token = tmp.path().join("token");
    std::fs::write(&token, "tree-migration-token-0123456789abcdef\n").expect("token");
    let work = tmp.subdir("work");
    let state = tmp.subdir("state");
    let mut recv = BgProc::crm(
        "receive",
        &ends.recv_prefix,
        &strings(&[
            "receive",
            "--listen",
            &ends.listen,
            "--token-file",
            path_str(&token),
            "--state-dir",
            path_str(&state),
            "--work-dir",
            path_str(&work),
        ]),
        tmp.path(),
    );
    if let Err(e) = recv.wait_stderr("listening on", LISTEN_TIMEOUT) {
        panic!("`cr-migrate receive` did not start listening: {e}");
    }
    let pid = tree.wl.pid().to_string();
    let mut args = strings(&[
        "send",
        &pid,
        &ends.listen,
        "--token-file",
        path_str(&token),
        "--json",
    ]);
    args.extend(ends.send_args.iter().cloned());
    let mut send = BgProc::crm("send", &ends.send_prefix, &args, tmp.path());
    // The root is our child: reap it as soon as `send` kills it, so that its
    // PID is free for the restored root.
    let mut root_end = None;
    let started = Instant::now();
    let status = loop {
        if root_end.is_none() {
            if let Ok(how) = tree.wl.reap_killed(Duration::ZERO) {
                root_end = Some(how);
            }
        }
        if let Some(s) = send.try_wait() {
            break s;
        }
        if started.elapsed() > SEND_TIMEOUT {
            break send.kill();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (out, err) = (send.stdout(), send.stderr());
    if ends.verify_while_filling && status.success() && root_end.is_some() {
        // Before `receive` is done: the tasks fault on pages not in yet.
        tree.wl
            .adopt_restored()
            .unwrap_or_else(|e| panic!("after the migration: {e}"));
        let pass = tree.wl.expect_pass("while its memory is filled in");
        println!("checked while the memory is filled in: {pass}");
    }
    let recv_status = recv.wait_timeout(Duration::from_secs(30));
    if root_end.is_none() {
        root_end = tree.wl.reap_killed(Duration::from_secs(5)).ok();
    }
    // Before any assertion: a restored root (whatever went wrong) is taken
    // under the guard, which kills the restored tree on failure.
    let adopted = root_end.as_ref().map(|_| tree.wl.adopt_restored());
    if let Some(l) = recv.stderr().lines().find(|l| l.contains("in place")) {
        println!("receive: {}", l.trim());
    }
    if std::env::var_os("CRM_TEST_SHOW_LOGS").is_some() {
        println!("receive says:\n{}", recv.stderr());
    }
    assert!(
        status.success(),
        "send failed ({status}):\n{err}\nreceive says:\n{}",
        recv.stderr()
    );
    assert!(
        recv_status.is_some_and(|s| s.success()),
        "receive did not exit cleanly ({recv_status:?}):\n{}",
        recv.stderr()
    );
    let how = root_end.expect("send succeeded, so the source root was killed");
    println!("checked: send exited 0; the source root {how}");
    let ppid = adopted
        .expect("the source root was reaped")
        .unwrap_or_else(|e| panic!("after the migration: {e}"));
    println!("checked: a new root runs with PID {pid} (parent {ppid})");
    (out, err)
}

/// A number after `"key":` in the JSON summary.
fn json_num(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Start, record, migrate, compare, verify.
///
/// `verify_before`: the tree's check also reaps its zombies, so a zombie
/// tree is checked only after.
fn migrate_mode(mode: &str, ends: &Ends, dir_name: &str, verify_before: bool) -> (TempDir, Tree) {
    migrate_args(
        workload_bin!(wl_tree),
        &[mode],
        ends,
        dir_name,
        verify_before,
    )
}

/// [`migrate_mode`] of `EXE ARGS` (a tree workload).
fn migrate_args(
    exe: &Path,
    args: &[&str],
    ends: &Ends,
    dir_name: &str,
    verify_before: bool,
) -> (TempDir, Tree) {
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    let mode = args
        .first()
        .copied()
        .unwrap_or(name.as_deref().unwrap_or("?"));
    let tmp = TempDir::new(dir_name);
    let mut tree = Tree::start(exe, args, tmp.path(), Spawn::default());
    if verify_before {
        tree.wl.expect_pass("before the migration");
    }
    let before = tree.links();
    let (json, err) = migrate(&mut tree, &tmp, ends);
    let after = tree.links();
    assert_eq!(
        after, before,
        "(parent, group, session, zombie) per task after the migration differs"
    );
    println!(
        "checked: {} tasks have their PIDs, parents, groups, sessions and zombie states back",
        after.len()
    );
    let mark = tree.wl.mark();
    let pass = tree.wl.expect_pass("after the migration");
    let log = tree.wl.log();
    for m in &tree.members {
        let said = log[mark.min(log.len())..]
            .lines()
            .any(|l| l.starts_with(&format!("MEMBER-PASS pid={m} ")));
        // wl_tree_files members say so themselves; other workloads' roots
        // check their members.
        let own_line = exe.ends_with("wl_tree_files");
        assert!(
            !own_line || said,
            "no MEMBER-PASS line from member {m} after the migration:\n{log}"
        );
    }
    let downtime = json_num(&json, "downtime_ms")
        .unwrap_or_else(|| panic!("no downtime_ms in the summary:\n{json}\n{err}"));
    let rounds = json.matches("\"round\":").count();
    assert!(
        rounds >= 2,
        "expected at least one pre-copy round and the final one:\n{json}"
    );
    assert!(
        tree.members.is_empty() || err.contains("the tree of process"),
        "send should say it migrates a tree:\n{err}"
    );
    println!("figures: tree {mode}: rounds={rounds} downtime_ms={downtime:.1}; {pass}");
    if std::env::var_os("CRM_TEST_SHOW_LOGS").is_some() {
        println!("send says:\n{err}");
    }
    (tmp, tree)
}

#[test]
fn migrate_tree_multitask_locally() {
    h::init();
    let _serial = h::serial();
    migrate_mode("multitask", &Ends::local(), "tree-mig-multitask", true);
}

#[test]
fn migrate_tree_with_zombies_locally() {
    h::init();
    let _serial = h::serial();
    migrate_mode("zombie", &Ends::local(), "tree-mig-zombie", false);
}

/// Children fork and exit all the time: tasks appear and vanish between rounds.
#[test]
fn migrate_forking_tree_locally() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-mig-forker");
    let mut tree = Tree::start(
        workload_bin!(wl_tree),
        &["forker"],
        tmp.path(),
        Spawn::default(),
    );
    tree.wl.expect_pass("before the migration");
    let (_, err) = migrate(&mut tree, &tmp, &Ends::local());
    let pass = tree.wl.expect_pass("after the migration");
    println!("checked: the forking tree runs on and PASSes after the migration: {pass}");
    assert!(err.contains("the tree of process"), "{err}");
}

/// Shared anonymous memory between the root and three children, across two
/// network namespaces (sealed page channels over a veth pair).
#[test]
fn migrate_tree_with_shared_memory_across_network_namespaces() {
    const TEST: &str = "migrate_tree_with_shared_memory_across_network_namespaces";
    h::init();
    let _serial = h::serial();
    let (ns, ends) = match Ends::netns() {
        Ok(x) => x,
        Err(why) => h::skip_test!(TEST, "{why}"),
    };
    let (_tmp, tree) = migrate_mode("shmem", &ends, "tree-mig-shmem-netns", true);
    let in_b = NetnsPair::pids(&ns.b);
    for p in std::iter::once(tree.wl.pid()).chain(tree.members.iter().copied()) {
        assert!(
            in_b.contains(&p),
            "restored task {p} should run in the destination's namespace {}",
            ns.b
        );
    }
    println!("checked: every restored task runs in {}", ns.b);
    drop(tree);
}

/// A tree whose tasks check all of their memory the moment it runs at the
/// destination, while its pages are still being filled in: what they read
/// first comes through their page faults.
#[test]
fn migrate_tree_and_check_it_while_its_memory_is_filled() {
    h::init();
    let _serial = h::serial();
    let mut ends = Ends::local();
    ends.verify_while_filling = true;
    migrate_args(
        workload_bin!(wl_tree),
        &["bench", "8", "32", "16"],
        &ends,
        "tree-mig-filling",
        true,
    );
}

/// A tree of 20 tasks, each with 4 MiB of private memory, sharing 16 MiB:
/// every task checks both after the migration.
#[test]
fn migrate_tree_of_20_tasks_locally() {
    h::init();
    let _serial = h::serial();
    migrate_args(
        workload_bin!(wl_tree),
        &["bench", "20", "4", "16"],
        &Ends::local(),
        "tree-mig-20",
        true,
    );
}

/// Pipes between the root and a child with data buffered in them (read by
/// the tasks only after the migration: their check consumes it), across
/// two network namespaces. (Only `send` and `receive` run in the
/// namespaces: the tree runs in ours, which is fine for pipes; sockets are
/// inspected with sock_diag, which sees only its own namespace.)
#[test]
fn migrate_tree_with_pipes_across_network_namespaces() {
    const TEST: &str = "migrate_tree_with_pipes_across_network_namespaces";
    h::init();
    let _serial = h::serial();
    let (_ns, ends) = match Ends::netns() {
        Ok(x) => x,
        Err(why) => h::skip_test!(TEST, "{why}"),
    };
    let (_tmp, tree) = migrate_args(
        workload_bin!(wl_tree_files),
        &["pipes"],
        &ends,
        "tree-mig-pipes-netns",
        false,
    );
    drop(tree);
}

/// Stream, datagram and seqpacket socketpairs between parent and child
/// with data queued both ways.
#[test]
fn migrate_tree_with_socketpairs_locally() {
    h::init();
    let _serial = h::serial();
    migrate_args(
        workload_bin!(wl_tree_files),
        &["socketpair"],
        &Ends::local(),
        "tree-mig-socketpair",
        false,
    );
}

/// A process holding memfds (sealed and not, as descriptors and shared and
/// private mappings): their contents go with the migration.
#[test]
fn migrate_process_with_memfds_locally() {
    h::init();
    let _serial = h::serial();
    migrate_args(
        workload_bin!(wl_memfd),
        &[],
        &Ends::local(),
        "mig-memfd",
        true,
    );
}

/// A parent and child sharing one memfd mapping: shared again after the
/// migration (a write by one is seen by the other).
#[test]
fn migrate_tree_sharing_a_memfd_locally() {
    h::init();
    let _serial = h::serial();
    migrate_args(
        workload_bin!(wl_memfd_tree),
        &[],
        &Ends::local(),
        "tree-mig-memfd",
        true,
    );
}

/// A parent holding the master of a pty that is its child's stdio and
/// controlling terminal (and its grandchild's).
#[test]
fn migrate_tree_with_a_pty_locally() {
    h::init();
    let _serial = h::serial();
    migrate_args(
        workload_bin!(wl_pty),
        &[],
        &Ends::local(),
        "tree-mig-pty",
        true,
    );
}

fn unshare_bin() -> Option<&'static str> {
    ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// A member stopped by job control (SIGSTOP) is migrated stopped: still
/// stopped on the destination, and it runs on after SIGCONT.
#[test]
fn migrate_tree_with_a_stopped_task_locally() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("tree-mig-stopped");
    let mut tree = Tree::start(
        workload_bin!(wl_tree),
        &["multitask"],
        tmp.path(),
        Spawn::default(),
    );
    tree.wl.expect_pass("before the migration");
    let m = tree.members[1];
    let state = |p: i32| crm_tests::procs::stat(p).map(|s| s.state);
    let wait_state = |p: i32, want: char| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(p) != Some(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        state(p)
    };
    crm_tests::procs::kill(m, libc::SIGSTOP).expect("SIGSTOP");
    assert_eq!(wait_state(m, 'T'), Some('T'), "member {m} should stop");
    let before = tree.links();
    migrate(&mut tree, &tmp, &Ends::local());
    assert_eq!(tree.links(), before, "links after the migration");
    assert_eq!(
        wait_state(m, 'T'),
        Some('T'),
        "the migrated member {m} should be stopped, as it was"
    );
    crm_tests::procs::kill(m, libc::SIGCONT).expect("SIGCONT");
    let pass = tree.wl.expect_pass("after SIGCONT");
    println!("checked: member {m} was migrated stopped and runs on after SIGCONT: {pass}");
}

/// Removes a SysV object of ours when dropped (the source's, if a
/// migration failed and left it): a shared memory segment, or a message
/// queue.
enum IpcRm {
    Shm(i32),
    Msq(i32),
}

impl IpcRm {
    /// Whether the object still exists here.
    fn exists(&self) -> bool {
        // SAFETY: IPC_STAT into zeroed descriptors of ours.
        unsafe {
            match *self {
                IpcRm::Shm(id) => {
                    let mut ds: libc::shmid_ds = std::mem::zeroed();
                    libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0
                }
                IpcRm::Msq(id) => {
                    let mut ds: libc::msqid_ds = std::mem::zeroed();
                    libc::msgctl(id, libc::IPC_STAT, &mut ds) == 0
                }
            }
        }
    }
}

impl Drop for IpcRm {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID takes no buffer; an object already gone fails
        // harmlessly.
        unsafe {
            match *self {
                IpcRm::Shm(id) => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                IpcRm::Msq(id) => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            };
        }
    }
}

/// Migrates `wl_ipc MODE KEY` (a key of this test process) with `receive`
/// in an IPC namespace of its own (as another host would have: the object
/// is created there with its id) and `send EXTRA`; checks that the
/// workload PASSes there and that the source's object is gone. Needs
/// `unshare` and the kernel's `NAME_next_id`; `Err` says why not.
fn migrate_ipc(
    mode: &str,
    next_id: &str,
    key_base: u32,
    extra: &[&str],
) -> Result<(String, String), String> {
    if !Path::new(&format!("/proc/sys/kernel/{next_id}")).exists() {
        return Err(format!(
            "/proc/sys/kernel/{next_id} is missing (no CONFIG_CHECKPOINT_RESTORE)"
        ));
    }
    let unshare = unshare_bin().ok_or("`unshare` (util-linux) is not installed")?;
    let tmp = TempDir::new(&format!("mig-ipc-{mode}"));
    let key = format!("{:#x}", key_base | (std::process::id() & 0xff));
    let mut tree = Tree::start(
        workload_bin!(wl_ipc),
        &[mode, &key],
        tmp.path(),
        Spawn::default(),
    );
    let id: i32 = tree
        .wl
        .ready_field("id")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no id in {:?}", tree.wl.ready_line()));
    let guard = if next_id == "shm_next_id" {
        IpcRm::Shm(id)
    } else {
        IpcRm::Msq(id)
    };
    let before = tree.links();
    let ends = Ends {
        recv_prefix: vec![unshare.to_string(), "--ipc".to_string()],
        send_args: strings(extra),
        ..Ends::local()
    };
    let (json, err) = migrate(&mut tree, &tmp, &ends);
    assert_eq!(tree.links(), before, "links after the migration");
    let pass = tree.wl.expect_pass("after the migration");
    assert!(err.contains("SysV IPC objects sent"), "{err}");
    assert!(
        !guard.exists(),
        "the source's object {id} should be removed after the migration"
    );
    Ok((
        format!(
            "object {id} (key {key}) moved, removed here; downtime_ms={:?}",
            json_num(&json, "downtime_ms")
        ),
        pass,
    ))
}

/// A SysV shared memory segment attached by a parent and two children and
/// marked for deletion moves with the tree; the tasks share it there.
#[test]
fn migrate_tree_sharing_sysv_shared_memory() {
    h::init();
    let _serial = h::serial();
    match migrate_ipc("shm_multi", "shm_next_id", 0x4352_7000, &[]) {
        Ok((what, pass)) => println!("checked: {what}; {pass}"),
        Err(why) => h::skip_test!("migrate_tree_sharing_sysv_shared_memory", "{why}"),
    }
}

/// A SysV message queue holding messages moves with `send --ipc-key`; the
/// workload reads them, in order, after the migration.
#[test]
fn migrate_process_with_a_sysv_message_queue() {
    h::init();
    let _serial = h::serial();
    let key = format!("{:#x}", 0x4352_7100u32 | (std::process::id() & 0xff));
    match migrate_ipc("msq", "msg_next_id", 0x4352_7100, &["--ipc-key", &key]) {
        Ok((what, pass)) => println!("checked: {what}; {pass}"),
        Err(why) => h::skip_test!("migrate_process_with_a_sysv_message_queue", "{why}"),
    }
}
