//! Checkpoint/restore of SysV IPC objects (issue 4): message queues with
//! their messages, semaphore sets with their values, and shared memory
//! segments attached by one task or by several tasks of a tree, driving the
//! real `cr-migrate` binary.
//!
//! Each test starts `wl_ipc MODE KEY` (objects with a key unique to the
//! test), checks it PASSes, dumps it (queues and sets named with
//! `--ipc-key`; attached segments are found by the dump), checks that the
//! dump removed the objects with the tree, restores it, checks that the
//! objects are back with their ids, and asks the workload to verify its
//! objects (contents, addresses, owners, modes, sharing). An [`IpcGuard`]
//! removes every object of the test's key or ids, also when an assertion
//! fails; workload guards kill and reap the processes.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crm_tests::tree::Tree;
use crm_tests::{self as h, procs, run_crm, skip_test, workload_bin, Spawn, TempDir, Workload};
use crm_tests::{assert_success, path_str, stderr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Msg,
    Sem,
    Shm,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Msg => "/proc/sysvipc/msg",
            Kind::Sem => "/proc/sysvipc/sem",
            Kind::Shm => "/proc/sysvipc/shm",
        }
    }

    fn remove(self, id: i32) {
        // SAFETY: IPC_RMID takes no buffer; the ids are the test's own.
        unsafe {
            match self {
                Kind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                Kind::Sem => libc::semctl(id, 0, libc::IPC_RMID),
                Kind::Shm => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            }
        };
    }
}

/// `(key, id)` of every object of `kind`.
fn objects(kind: Kind) -> Vec<(i32, i32)> {
    let text = std::fs::read_to_string(kind.table()).expect("read /proc/sysvipc");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let key: i64 = f.next()?.parse().ok()?;
            let id: i32 = f.next()?.parse().ok()?;
            Some((key as i32, id))
        })
        .collect()
}

/// Removes, on drop, every object with the test's key and every id it was
/// told about (segments marked for deletion lose their key).
struct IpcGuard {
    key: i32,
    ids: Vec<(Kind, i32)>,
}

impl IpcGuard {
    fn new(key: i32) -> IpcGuard {
        IpcGuard {
            key,
            ids: Vec::new(),
        }
    }

    fn exists(&self, kind: Kind, id: i32) -> bool {
        objects(kind).iter().any(|&(_, i)| i == id)
    }

    fn with_key(&self, kind: Kind) -> Vec<i32> {
        objects(kind)
            .into_iter()
            .filter(|&(k, _)| k == self.key)
            .map(|(_, i)| i)
            .collect()
    }
}

impl Drop for IpcGuard {
    fn drop(&mut self) {
        for kind in [Kind::Msg, Kind::Sem, Kind::Shm] {
            for id in self.with_key(kind) {
                kind.remove(id);
            }
        }
        for &(kind, id) in &self.ids {
            if self.exists(kind, id) {
                kind.remove(id);
            }
        }
    }
}

/// A key no other test (or test run) uses at the same time.
fn test_key(n: u32) -> i32 {
    (0x4352_0000 | ((std::process::id() & 0xff) << 8) | n) as i32
}

/// Whether objects can be created with a chosen id here
/// (`/proc/sys/kernel/*_next_id`, CONFIG_CHECKPOINT_RESTORE).
fn next_id_missing() -> Option<String> {
    ["msg", "sem", "shm"]
        .iter()
        .map(|k| format!("/proc/sys/kernel/{k}_next_id"))
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is missing (kernel without CONFIG_CHECKPOINT_RESTORE)"))
}

/// Whether `msgrcv(MSG_COPY)` works here (needs CONFIG_CHECKPOINT_RESTORE).
fn msg_copy_works() -> Result<(), String> {
    // SAFETY: a private queue, removed below.
    let q = unsafe { libc::msgget(libc::IPC_PRIVATE, 0o600) };
    if q < 0 {
        return Err(format!("msgget: {}", std::io::Error::last_os_error()));
    }
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&1i64.to_ne_bytes());
    // SAFETY: `buf` holds a type and 8 bytes; copied, not consumed.
    let r = unsafe {
        libc::msgsnd(q, buf.as_ptr() as *const libc::c_void, 8, 0);
        libc::msgrcv(
            q,
            buf.as_mut_ptr() as *mut libc::c_void,
            8,
            0,
            libc::IPC_NOWAIT | libc::MSG_COPY,
        )
    };
    let err = std::io::Error::last_os_error();
    Kind::Msg.remove(q);
    if r == 8 {
        Ok(())
    } else {
        Err(format!("msgrcv(MSG_COPY): {err}"))
    }
}

fn dump(pid: i32, images: &Path, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let mut args = vec!["dump", "--pid", &pid, "--images-dir", path_str(images)];
    args.extend_from_slice(extra);
    run_crm(&args)
}

/// `restore --detach`; the restored root goes under `wl`'s guard.
fn restore(wl: &mut Workload, images: &Path) {
    let out = run_crm(&["restore", "--images-dir", path_str(images), "--detach"]);
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --detach");
    adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
}

fn assert_saved(out: &Output, n: usize) {
    let want = format!("{n} SysV IPC object(s)");
    assert!(
        stderr(out).contains(&want),
        "the dump should report {want:?}:\n{}",
        stderr(out)
    );
}

/// Dump of one workload (killing it) and restore: the object of `kind`
/// (`id`) is gone after the dump and back with its id after the restore.
fn cycle(wl: &mut Workload, guard: &IpcGuard, kind: Kind, id: i32, images: &Path, extra: &[&str]) {
    let out = dump(wl.pid(), images, extra);
    assert_success(&out, "dump");
    assert_saved(&out, 1);
    wl.reap_killed(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    assert!(
        !guard.exists(kind, id),
        "the dump left {kind:?} {id} behind"
    );
    println!("checked: the dump saved 1 object and removed {kind:?} {id} with the process");
    restore(wl, images);
    assert!(
        guard.exists(kind, id),
        "{kind:?} {id} was not restored with its id"
    );
    println!("checked: {kind:?} {id} restored with its id");
}

fn ready_id(wl: &Workload) -> i32 {
    wl.ready_field("id")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no id in {:?}", wl.ready_line()))
}

/// A queue with five messages: not consumed by `dump --leave-running`,
/// back in order with their types and bytes after dump and restore; a
/// restore over an existing queue of the same id is refused, naming it.
#[test]
fn ipcmsq() {
    h::init();
    let _serial = h::serial();
    if let Some(why) = next_id_missing() {
        skip_test!("ipcmsq", "{why}");
    }
    if let Err(e) = msg_copy_works() {
        skip_test!(
            "ipcmsq",
            "message queues cannot be read without consuming them: {e}"
        );
    }
    let key = test_key(1);
    let mut guard = IpcGuard::new(key);
    let tmp = TempDir::new("ipcmsq");
    let hex = format!("{:#x}", key as u32);
    let mut wl = Workload::start(workload_bin!(wl_ipc), &["msq", &hex], tmp.path());
    let id = ready_id(&wl);
    guard.ids.push((Kind::Msg, id));
    wl.expect_pass("before the dump");

    let running = tmp.subdir("images-running");
    let out = dump(wl.pid(), &running, &["--ipc-key", &hex, "--leave-running"]);
    assert_success(&out, "dump --leave-running --ipc-key");
    assert_saved(&out, 1);
    let pass = wl.expect_pass("after dump --leave-running (nothing consumed)");
    println!("checked: after dump --leave-running: {pass}");

    let images = tmp.subdir("images");
    cycle(
        &mut wl,
        &guard,
        Kind::Msg,
        id,
        &images,
        &["--ipc-key", &hex],
    );
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");

    // The queue outlives its process: a second restore finds it and refuses.
    let pid = wl.pid();
    wl.kill_and_reap().expect("kill the restored workload");
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("already exists")
            && err.contains(&format!("ipcrm -q {id}")),
        "a restore over existing queue {id} should be refused naming it ({}):\n{err}",
        out.status
    );
    assert!(
        procs::stat(pid).is_none(),
        "the refused restore left process {pid}"
    );
    assert!(
        guard.exists(Kind::Msg, id),
        "the refused restore removed the existing queue"
    );
    println!("checked: restore over the existing queue {id} refused, naming it; queue kept");
}

/// A set of five semaphores: values back after dump and restore, semop works.
#[test]
fn ipcsem() {
    h::init();
    let _serial = h::serial();
    if let Some(why) = next_id_missing() {
        skip_test!("ipcsem", "{why}");
    }
    let key = test_key(2);
    let mut guard = IpcGuard::new(key);
    let tmp = TempDir::new("ipcsem");
    let hex = format!("{:#x}", key as u32);
    let mut wl = Workload::start(workload_bin!(wl_ipc), &["sem", &hex], tmp.path());
    let id = ready_id(&wl);
    guard.ids.push((Kind::Sem, id));
    wl.expect_pass("before the dump");
    // A key that names nothing is refused: no image, the process untouched.
    let none = tmp.subdir("images-none");
    let out = dump(wl.pid(), &none, &["--ipc-key", "0x7eadbee5"]);
    let err = stderr(&out);
    assert!(
        out.status.code().is_some_and(|c| c != 0)
            && err.contains("0x7eadbee5")
            && err.contains("no SysV"),
        "--ipc-key of a missing key should be refused, naming it ({}):\n{err}",
        out.status
    );
    procs::assert_running_untraced(wl.pid(), "the refused dump");
    assert!(
        !none.join("inventory.img").exists(),
        "the refused dump left an image"
    );
    println!("checked: --ipc-key naming no object refused, naming the key; process untouched");

    let images = tmp.subdir("images");
    cycle(
        &mut wl,
        &guard,
        Kind::Sem,
        id,
        &images,
        &["--ipc-key", &hex],
    );
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A segment attached twice by one task (read-write, split in two VMAs by
/// mprotect, and read-only): found by the dump without --ipc-key;
/// contents, addresses, protections and sharing back.
#[test]
fn ipcshm() {
    h::init();
    let _serial = h::serial();
    if let Some(why) = next_id_missing() {
        skip_test!("ipcshm", "{why}");
    }
    let key = test_key(3);
    let mut guard = IpcGuard::new(key);
    let tmp = TempDir::new("ipcshm");
    let hex = format!("{:#x}", key as u32);
    let mut wl = Workload::start(workload_bin!(wl_ipc), &["shm", &hex], tmp.path());
    let id = ready_id(&wl);
    guard.ids.push((Kind::Shm, id));
    wl.expect_pass("before the dump");
    let images = tmp.subdir("images");
    cycle(&mut wl, &guard, Kind::Shm, id, &images, &[]);
    let out = run_crm(&["show", path_str(&images)]);
    assert_success(&out, "show");
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "shared memory segment {id} key {hex} owner 1234:4321 mode 640: {} bytes",
        3 * 4096 + 1000
    );
    assert!(
        text.contains(&want) && text.contains(&format!("SysV shm segment {id}")),
        "`show` should print {want:?} and the attachments:\n{text}"
    );
    println!("checked: show prints the segment and its attachments");
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A segment shared by a parent and two children (one inherited the
/// attachment, one attached it elsewhere) and marked for deletion: saved
/// once, attached again by all three, still marked, writes seen by all.
#[test]
fn ipcshm_multi() {
    h::init();
    let _serial = h::serial();
    if let Some(why) = next_id_missing() {
        skip_test!("ipcshm_multi", "{why}");
    }
    let key = test_key(4);
    let mut guard = IpcGuard::new(key);
    let tmp = TempDir::new("ipcshm-multi");
    let hex = format!("{:#x}", key as u32);
    let mut tree = Tree::start(
        workload_bin!(wl_ipc),
        &["shm_multi", &hex],
        tmp.path(),
        Spawn::default(),
    );
    let id = ready_id(&tree.wl);
    guard.ids.push((Kind::Shm, id));
    tree.wl.expect_pass("before the dump");
    let images = tmp.subdir("images");
    // Not through run_crm, which reaps our zombie children after the command:
    // here nothing but the dumper may reap the killed tasks.
    let out = std::process::Command::new(h::crm_bin())
        .args([
            "dump",
            "--pid",
            &tree.wl.pid().to_string(),
            "--images-dir",
            path_str(&images),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running cr-migrate dump");
    assert_success(&out, "dump");
    assert_saved(&out, 1);
    assert!(
        images.join(format!("pages-shm-{id}.img")).is_file(),
        "no pages-shm-{id}.img in the image"
    );
    tree.reap_dumped()
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    assert!(
        !guard.exists(Kind::Shm, id),
        "segment {id} outlived the dumped tree"
    );
    println!("checked: the dump saved the segment once; it went away with the tree");
    restore(&mut tree.wl, &images);
    assert!(
        guard.exists(Kind::Shm, id),
        "segment {id} was not restored with its id"
    );
    let pass = tree.wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// A process with SysV shared memory in an IPC namespace of its own is
/// refused, naming the reason, and keeps running untouched.
#[test]
fn ipcshm_other_namespace_refused() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("ipcshm-ns");
    // The key lives in the process's own namespace: no clash, and the
    // segment goes away with the namespace.
    let mut wl = Workload::start(workload_bin!(wl_ipc), &["shm_newns", "0x1234"], tmp.path());
    wl.expect_pass("before the dump");
    let images = tmp.subdir("images");
    let out = dump(wl.pid(), &images, &[]);
    let err = stderr(&out);
    assert!(
        out.status.code().is_some_and(|c| c != 0)
            && !err.contains("panicked")
            && err.contains("another IPC namespace"),
        "the dump should be refused for the IPC namespace ({}):\n{err}",
        out.status
    );
    procs::assert_running_untraced(wl.pid(), "the refused dump");
    let pass = wl.expect_pass("after the refused dump");
    println!(
        "checked: refused ({}); the process runs on: {pass}",
        err.lines().last().unwrap_or("")
    );
    wl.kill_and_reap().expect("kill the workload");
}

/// A restore that fails after it created the objects (here: the process's
/// working directory is gone) removes them again and leaves no process.
#[test]
fn failed_restore_removes_created_objects() {
    h::init();
    let _serial = h::serial();
    if let Some(why) = next_id_missing() {
        skip_test!("failed_restore_removes_created_objects", "{why}");
    }
    let key = test_key(5);
    let mut guard = IpcGuard::new(key);
    let tmp = TempDir::new("ipc-failed");
    let hex = format!("{:#x}", key as u32);
    let cwd = tmp.subdir("cwd");
    let mut wl = Workload::start(
        workload_bin!(wl_ipc),
        &["sem", &hex, path_str(&cwd)],
        tmp.path(),
    );
    let id = ready_id(&wl);
    guard.ids.push((Kind::Sem, id));
    let pid = wl.pid();
    let images = tmp.subdir("images");
    let out = dump(pid, &images, &["--ipc-key", &hex]);
    assert_success(&out, "dump --ipc-key");
    wl.reap_killed(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    std::fs::remove_dir(&cwd).expect("remove the working directory");
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    let err = stderr(&out);
    assert!(
        out.status.code().is_some_and(|c| c != 0)
            && !err.contains("panicked")
            && err.contains("chdir"),
        "the restore should fail on the missing working directory ({}):\n{err}",
        out.status
    );
    assert!(
        !guard.exists(Kind::Sem, id),
        "the failed restore left semaphore set {id} behind"
    );
    assert!(
        procs::stat(pid).is_none(),
        "the failed restore left process {pid}"
    );
    println!("checked: the failed restore removed semaphore set {id} and left no process");
}
