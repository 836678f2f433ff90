//! End-to-end tests of checkpoint and restore on this machine, driving the real
//! `cr-migrate` binary as a subprocess (DESIGN.md §6).
//!
//! Each test starts a workload below the test process (a child subreaper), dumps it
//! (`cr-migrate dump`, which kills it unless `--leave-running`), reaps the original so
//! its PID is free, restores it with `cr-migrate restore --detach`, and asks the
//! restored process to verify its own state (SIGUSR2 → `PASS`/`FAIL`). Failure tests
//! check that bad input is refused with a message naming what failed, without a panic,
//! and that the target is left exactly as it was. Tests that cycle dump/restore hold
//! the process-wide [`h::serial`] lock (2-core machine; 512 MiB workloads); guards
//! kill and reap every process even when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crm_tests::{
    self as h, procs, run_crm, run_crm_timeout, workload_bin, Spawn, TempDir, Workload,
};
use crm_tests::{assert_success, path_str, stderr};

const REAP_TIMEOUT: Duration = Duration::from_secs(15);

/// A refused command: non-zero exit, a message on stderr, no panic.
fn assert_refused(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "`cr-migrate {what}` should have failed but exited 0; stderr:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "`cr-migrate {what}` panicked instead of reporting an error:\n{err}"
    );
    assert!(
        out.status.code().is_some(),
        "`cr-migrate {what}` died from a signal ({}) instead of exiting with an error:\n{err}",
        out.status
    );
    assert!(
        !err.trim().is_empty(),
        "`cr-migrate {what}` failed without a message on stderr"
    );
}

fn list_images(dir: &Path) -> String {
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    format!("{} ({len} bytes)", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries.join(", ")
}

/// What a restored process must have exactly as before: its fds (numbers and what
/// they point to) and its memory map (addresses, permissions, offsets, paths).
struct Snapshot {
    pid: i32,
    fds: std::collections::BTreeMap<i32, String>,
    maps: Vec<String>,
}

/// Pipes get new inode numbers when restored: names them by the order they
/// first appear in (`pipe:#1`), so which fds share a pipe still counts.
fn same_object_names(
    fds: std::collections::BTreeMap<i32, String>,
) -> std::collections::BTreeMap<i32, String> {
    let mut seen: Vec<String> = Vec::new();
    fds.into_iter()
        .map(|(fd, link)| {
            if !link.starts_with("pipe:[") {
                return (fd, link);
            }
            let i = seen.iter().position(|l| *l == link).unwrap_or_else(|| {
                seen.push(link.clone());
                seen.len() - 1
            });
            (fd, format!("pipe:#{}", i + 1))
        })
        .collect()
}

impl Snapshot {
    fn take(pid: i32) -> Snapshot {
        Snapshot {
            pid,
            fds: same_object_names(procs::fds(pid)),
            maps: procs::maps(pid),
        }
    }

    /// Panics with the differences between `self` (before the dump) and now.
    fn assert_same_now(&self) {
        let now = Snapshot::take(self.pid);
        let mut diffs = Vec::new();
        if now.fds != self.fds {
            diffs.push(format!(
                "fds differ:\n  before: {:?}\n  after:  {:?}",
                self.fds, now.fds
            ));
        }
        let gone: Vec<&String> = self.maps.iter().filter(|m| !now.maps.contains(m)).collect();
        let new: Vec<&String> = now.maps.iter().filter(|m| !self.maps.contains(m)).collect();
        if !gone.is_empty() || !new.is_empty() {
            diffs.push(format!(
                "memory maps differ:\n  only before: {gone:#?}\n  only after: {new:#?}"
            ));
        }
        assert!(
            diffs.is_empty(),
            "restored pid {} is not laid out as the original:\n{}",
            self.pid,
            diffs.join("\n")
        );
        println!(
            "checked: the restored process has the original's {} fds and {} mappings",
            self.fds.len(),
            self.maps.len()
        );
    }
}

/// `cr-migrate dump` (which kills the target), then reaps the killed original so the
/// PID is free for the restore. Returns the fds and maps just before the dump.
fn dump_and_reap(wl: &mut Workload, images: &Path, timeout: Duration) -> Snapshot {
    let before = Snapshot::take(wl.pid());
    let pid = wl.pid().to_string();
    let out = run_crm_timeout(
        &["dump", "--pid", &pid, "--images-dir", path_str(images)],
        timeout,
    );
    assert_success(&out, "dump");
    let how = wl
        .reap_killed(REAP_TIMEOUT)
        .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
    println!("checked: dump of pid {pid} exited 0, the original {how}");
    println!("images: {}", list_images(images));
    before
}

/// `cr-migrate restore --detach`, then takes the restored process under the guard and
/// checks that it runs with the original PID, was reparented to us, and has the fds
/// and memory map of `before`.
fn restore_detached(wl: &mut Workload, images: &Path, timeout: Duration, before: &Snapshot) {
    let out = run_crm_timeout(
        &["restore", "--images-dir", path_str(images), "--detach"],
        timeout,
    );
    // Take a restored process under the guard even if the exit status is wrong.
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --detach");
    let ppid = adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
    assert_eq!(
        ppid,
        procs::getpid(),
        "restored pid {} should have been reparented to the test process (a child \
         subreaper) when `restore --detach` exited, but its parent is {ppid}",
        wl.pid()
    );
    println!(
        "checked: restore --detach exited 0, pid {} runs again as a child of the test process",
        wl.pid()
    );
    before.assert_same_now();
}

fn count_of(line: &str) -> Option<u64> {
    line.strip_prefix("count ")?.trim().parse().ok()
}

/// After a refused dump: the target is neither traced nor stopped and still PASSes.
fn assert_untouched(wl: &Workload, what: &str) {
    procs::assert_running_untraced(wl.pid(), what);
    wl.expect_pass(&format!("after {what}"));
    println!(
        "checked: after {what}, pid {} is not traced, not stopped and PASSes",
        wl.pid()
    );
}

#[test]
fn counter_continues_after_restore() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("counter");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_counter), &[], tmp.path());
    wl.wait_line(
        0,
        |l| count_of(l).is_some_and(|c| c >= 200),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("counter did not reach 200: {e}"));
    wl.expect_pass("before dump");

    let before = dump_and_reap(&mut wl, &images, h::crm::DEFAULT_TIMEOUT);
    let mark = wl.mark();
    let last = wl
        .log_lines()
        .iter()
        .filter_map(|l| count_of(l))
        .max()
        .unwrap_or(0);
    restore_detached(&mut wl, &images, h::crm::DEFAULT_TIMEOUT, &before);

    let next = wl
        .wait_line(mark, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no count line after restore: {e}"));
    let next = count_of(&next).unwrap_or(0);
    assert_eq!(
        next,
        last + 100,
        "the first count after restore should continue from the last one before the dump ({last})"
    );
    println!(
        "checked: counting continued after restore: count {last} before dump, count {next} after"
    );
    wl.expect_pass("after restore");
}

#[test]
fn threads_keep_avx_registers_and_tids() {
    h::init();
    if !std::arch::is_x86_feature_detected!("avx") {
        h::skip_test!("threads_keep_avx_registers_and_tids", "the CPU has no AVX");
    }
    let _serial = h::serial();
    let tmp = TempDir::new("threads");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_threads_avx), &[], tmp.path());
    let mode = wl.ready_field("mode").unwrap_or("?").to_string();
    let ready_tids: Vec<i32> = wl
        .ready_field("tids")
        .unwrap_or("")
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    let tids_before = procs::task_ids(wl.pid());
    assert_eq!(ready_tids.len(), 4, "READY line: {}", wl.ready_line());
    assert!(
        ready_tids.iter().all(|t| tids_before.contains(t)),
        "worker tids {ready_tids:?} not all in /proc/{}/task {tids_before:?}",
        wl.pid()
    );
    wl.expect_pass("before dump");

    let before = dump_and_reap(&mut wl, &images, h::crm::DEFAULT_TIMEOUT);
    restore_detached(&mut wl, &images, h::crm::DEFAULT_TIMEOUT, &before);

    let tids_after = procs::task_ids(wl.pid());
    assert_eq!(
        tids_after,
        tids_before,
        "/proc/{}/task after restore differs from before the dump",
        wl.pid()
    );
    println!("checked: threads {tids_after:?} restored with their original TIDs");
    wl.expect_pass("after restore");
    println!("checked: mode {mode}: all 4 threads spin on with their register values intact");
}

#[test]
fn memory_512mib_with_holes_and_file_mappings() {
    h::init();
    let _serial = h::serial();
    const SIZE_MIB: u64 = 512;
    let tmp = TempDir::new("memory");
    let images = tmp.subdir("images");
    let files = tmp.subdir("files");
    let size = SIZE_MIB.to_string();
    // No verification before the dump: it would read the holes, and the point here is
    // that never-touched memory is neither stored nor made resident.
    let mut wl = Workload::start(
        workload_bin!(wl_memory),
        &[path_str(&files), &size],
        tmp.path(),
    );
    let heavy = Duration::from_secs(300);
    let before = dump_and_reap(&mut wl, &images, heavy);

    let pages_bytes: u64 = std::fs::read_dir(&images)
        .expect("images dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let mib = 1 << 20;
    let written = SIZE_MIB * mib * 15 / 16;
    let limit = written + 32 * mib;
    assert!(
        pages_bytes > 0,
        "no pages-*.img in the image: {}",
        list_images(&images)
    );
    assert!(
        pages_bytes < limit,
        "pages files hold {pages_bytes} bytes, more than the {written} bytes the workload \
         wrote plus 32 MiB: untouched or zero pages were stored"
    );
    println!(
        "checked: pages files {} MiB for {SIZE_MIB} MiB mapped, {} MiB written (limit {} MiB)",
        pages_bytes / mib,
        written / mib,
        limit / mib
    );

    restore_detached(&mut wl, &images, heavy, &before);
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

#[test]
fn signals_handlers_pending_and_itimer() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("signals");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_signals), &[], tmp.path());
    wl.expect_pass("before dump");
    let before = dump_and_reap(&mut wl, &images, h::crm::DEFAULT_TIMEOUT);
    restore_detached(&mut wl, &images, h::crm::DEFAULT_TIMEOUT, &before);
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

#[test]
fn leave_running_then_restore() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("leave-running");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_counter), &[], tmp.path());
    wl.wait_line(0, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no count line: {e}"));
    let counted = wl
        .log_lines()
        .iter()
        .filter_map(|l| count_of(l))
        .max()
        .unwrap_or(0);

    let pid = wl.pid().to_string();
    let before = Snapshot::take(wl.pid());
    h::dump_leave_running(&pid, &images);
    println!("images: {}", list_images(&images));
    // The original keeps running: it prints a new count and PASSes.
    let mark = wl.mark();
    wl.wait_line(mark, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("original stopped counting after dump --leave-running: {e}"));
    assert_untouched(&wl, "dump --leave-running");

    wl.kill_and_reap()
        .unwrap_or_else(|e| panic!("killing the original: {e}"));
    let last_original = wl
        .log_lines()
        .iter()
        .filter_map(|l| count_of(l))
        .max()
        .unwrap_or(0);
    let mark = wl.mark();
    restore_detached(&mut wl, &images, h::crm::DEFAULT_TIMEOUT, &before);
    let first = wl
        .wait_line(mark, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no count line after restore: {e}"));
    let first = count_of(&first).unwrap_or(0);
    // The image was taken while the count was between `before` and what the original
    // printed afterwards: the restored counter resumes from there.
    assert!(
        first > counted && first <= last_original,
        "first count after restore {first} should be in ({counted}, {last_original}]: \
         resumed from the dumped state, not from 0 nor from the original's last value"
    );
    println!(
        "checked: restored counter resumed at {first} (dumped after {counted}, original reached {last_original})"
    );
    wl.expect_pass("after restore");
}

/// How to damage an image file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncateTo(Fraction),
    FlipByteAt(Fraction),
}

/// A position in a file: `num/den` of its length, but at least `min`.
#[derive(Debug, Clone, Copy)]
struct Fraction {
    num: u64,
    den: u64,
    min: u64,
}

impl Fraction {
    fn of(self, len: u64) -> u64 {
        (len * self.num / self.den)
            .max(self.min)
            .min(len.saturating_sub(1))
    }
}

const HALF: Fraction = Fraction {
    num: 1,
    den: 2,
    min: 0,
};
const ZERO: Fraction = Fraction {
    num: 0,
    den: 1,
    min: 0,
};
/// The middle of the page data: past the 4 KiB header of the pages file.
const HALF_OF_DATA: Fraction = Fraction {
    num: 1,
    den: 2,
    min: 4096 + 100,
};

fn damage(path: &Path, how: Damage) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    match how {
        Damage::TruncateTo(at) => {
            let new_len = if at.num == 0 { 0 } else { at.of(len) };
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(new_len)?;
            Ok(format!("truncated from {len} to {new_len} bytes"))
        }
        Damage::FlipByteAt(at) => {
            let mut data = std::fs::read(path)?;
            let off = at.of(len) as usize;
            data[off] ^= 0xff;
            std::fs::write(path, &data)?;
            Ok(format!("byte {off} of {len} flipped"))
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("images dir").flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .unwrap_or_else(|err| panic!("copying {}: {err}", e.path().display()));
        }
    }
}

#[test]
fn restore_refuses_damaged_images() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("damaged");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_counter), &[], tmp.path());
    let pid = wl.pid();
    let _ = dump_and_reap(&mut wl, &images, h::crm::DEFAULT_TIMEOUT);

    let cases: [(&str, Damage); 7] = [
        ("core", Damage::TruncateTo(HALF)),
        ("core", Damage::TruncateTo(ZERO)),
        ("core", Damage::FlipByteAt(HALF)),
        ("pagemap", Damage::TruncateTo(HALF)),
        ("pagemap", Damage::FlipByteAt(HALF)),
        ("pages", Damage::TruncateTo(HALF_OF_DATA)),
        ("pages", Damage::FlipByteAt(HALF_OF_DATA)),
    ];
    let mut problems = Vec::new();
    for (i, (kind, how)) in cases.into_iter().enumerate() {
        let file = format!("{kind}-{pid}.img");
        let dir: PathBuf = tmp.subdir(&format!("case{i}"));
        copy_dir(&images, &dir);
        let target = dir.join(&file);
        if !target.is_file() {
            problems.push(format!(
                "the image has no {file} (files: {})",
                list_images(&images)
            ));
            continue;
        }
        let what = damage(&target, how).unwrap_or_else(|e| panic!("damaging {file}: {e}"));
        let case = format!("{file} {what}");
        let out = run_crm(&["restore", "--images-dir", path_str(&dir), "--detach"]);
        let err = stderr(&out);
        let mut case_problems = Vec::new();
        if out.status.success() {
            case_problems.push("restore exited 0".to_string());
        } else if out.status.code().is_none() {
            case_problems.push(format!("restore died: {}", out.status));
        }
        if err.contains("panicked") {
            case_problems.push("restore panicked".into());
        }
        if !err.contains(&file) {
            case_problems.push(format!("stderr does not name {file}"));
        }
        if !procs::wait_gone(pid, Duration::from_secs(3)) {
            case_problems.push(format!("a process with pid {pid} is left running"));
            let _ = wl.adopt_restored();
            let _ = wl.kill_and_reap();
        }
        if case_problems.is_empty() {
            println!(
                "checked: {case}: restore refused it: {}",
                err.trim().lines().last().unwrap_or("")
            );
        } else {
            problems.push(format!(
                "{case}: {}; stderr:\n{}",
                case_problems.join(", "),
                err.trim()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "damaged images not refused cleanly:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn dump_refuses_missing_pid() {
    h::init();
    let tmp = TempDir::new("missing-pid");
    let pid = procs::unused_pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(tmp.path())]);
    assert_refused(&out, &format!("dump --pid {pid} (no such process)"));
    assert!(
        stderr(&out).contains(&pid),
        "the error should name pid {pid}:\n{}",
        stderr(&out)
    );
    println!(
        "checked: dump of nonexistent pid {pid} refused: {}",
        stderr(&out).trim()
    );
}

#[test]
fn dump_refuses_the_test_process_itself() {
    h::init();
    let tmp = TempDir::new("self");
    let me = procs::getpid();
    let pid = me.to_string();
    // --leave-running: should the refusal be missing, the test process survives to
    // report it instead of being killed with every other test of this binary. The
    // second run adds --shell-job, so that "not a session leader" is not the only
    // reason to refuse: the dumper is a child of its target.
    for extra in [&[][..], &["--shell-job"][..]] {
        let mut args = vec![
            "dump",
            "--pid",
            &pid,
            "--images-dir",
            path_str(tmp.path()),
            "--leave-running",
        ];
        args.extend_from_slice(extra);
        let out = run_crm(&args);
        assert_refused(
            &out,
            &format!(
                "{} (the test process, parent of cr-migrate)",
                args.join(" ")
            ),
        );
        assert_eq!(
            procs::tracer_pid(me),
            Some(0),
            "the test process is still traced"
        );
        println!(
            "checked: `{}` of the test process refused: {}",
            args.join(" "),
            stderr(&out).trim()
        );
    }
}

#[test]
fn dump_refuses_socket_fd_and_leaves_target_running() {
    h::init();
    let tmp = TempDir::new("socket-fd");
    let images = tmp.subdir("images");
    let wl = Workload::start(workload_bin!(wl_unsupported_fd), &[], tmp.path());
    let fds: Vec<&str> = ["sock_fd_a", "sock_fd_b"]
        .iter()
        .filter_map(|k| wl.ready_field(k))
        .collect();
    assert_eq!(fds.len(), 2, "READY line: {}", wl.ready_line());
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    assert_refused(&out, "dump of a process holding a socket");
    let err = stderr(&out);
    assert!(
        err.to_lowercase().contains("socket"),
        "the error should say the fd is a socket:\n{err}"
    );
    let names_fd = err
        .split(|c: char| !c.is_ascii_digit())
        .any(|n| fds.contains(&n));
    assert!(
        names_fd,
        "the error should name the socket fd ({}):\n{err}",
        fds.join(" or ")
    );
    println!("checked: dump refused the socket fd: {}", err.trim());
    assert_untouched(&wl, "the refused dump");
}

#[test]
fn dump_of_non_session_leader_needs_shell_job() {
    h::init();
    let tmp = TempDir::new("shell-job");
    let images = tmp.subdir("images");
    let opts = Spawn {
        new_session: false,
        ..Spawn::default()
    };
    let wl = Workload::start_with(workload_bin!(wl_sleeper), &[], tmp.path(), opts);
    let st = procs::stat(wl.pid()).expect("stat of the sleeper");
    assert_ne!(
        st.session,
        wl.pid(),
        "the sleeper should not be a session leader"
    );
    let pid = wl.pid().to_string();
    let out = run_crm(&["dump", "--pid", &pid, "--images-dir", path_str(&images)]);
    assert_refused(
        &out,
        "dump of a process outside its own session without --shell-job",
    );
    let err = stderr(&out);
    assert!(
        err.contains("--shell-job"),
        "the error should point to --shell-job:\n{err}"
    );
    println!(
        "checked: dump of pid {pid} (session {}, not its own) refused without --shell-job: {}",
        st.session,
        err.trim()
    );
    assert_untouched(&wl, "the refused dump");
}

#[test]
fn restore_refuses_a_busy_pid_and_names_the_holder() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("busy-pid");
    let images = tmp.subdir("images");
    let wl = Workload::start(workload_bin!(wl_sleeper), &[], tmp.path());
    let pid = wl.pid().to_string();
    h::dump_leave_running(&pid, &images);
    // The original still holds the PID: restore must refuse and say who holds it.
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    assert_refused(&out, "restore while the original still runs");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("PID {pid} is in use")) && err.contains("wl_sleeper"),
        "the error should name PID {pid} and its holder wl_sleeper:\n{err}"
    );
    println!(
        "checked: restore refused while pid {pid} is busy: {}",
        err.trim()
    );
    assert_untouched(&wl, "the refused restore");
}

#[test]
fn shell_job_dump_and_restore() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("shell-job-ok");
    let images = tmp.subdir("images");
    let opts = Spawn {
        new_session: false,
        ..Spawn::default()
    };
    let mut wl = Workload::start_with(workload_bin!(wl_counter), &[], tmp.path(), opts);
    wl.wait_line(0, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no count line: {e}"));
    let pid = wl.pid().to_string();
    let out = run_crm(&[
        "dump",
        "--pid",
        &pid,
        "--images-dir",
        path_str(&images),
        "--shell-job",
    ]);
    assert_success(&out, "dump --shell-job");
    wl.reap_killed(REAP_TIMEOUT)
        .unwrap_or_else(|e| panic!("after dump --shell-job: {e}"));
    // Without the flag, restore refuses and says why.
    let out = run_crm(&["restore", "--images-dir", path_str(&images), "--detach"]);
    assert_refused(&out, "restore of a shell job without --shell-job");
    assert!(
        stderr(&out).contains("--shell-job"),
        "the error should point to --shell-job:\n{}",
        stderr(&out)
    );
    let mark = wl.mark();
    let out = run_crm(&[
        "restore",
        "--images-dir",
        path_str(&images),
        "--detach",
        "--shell-job",
    ]);
    let adopted = wl.adopt_restored();
    assert_success(&out, "restore --shell-job");
    adopted.unwrap_or_else(|e| panic!("after restore --shell-job: {e}"));
    let st = procs::stat(wl.pid()).expect("stat of the restored counter");
    let own_sid = procs::stat(procs::getpid()).expect("our stat").session;
    assert_eq!(
        st.session, own_sid,
        "a restored shell job joins the restoring session"
    );
    wl.wait_line(mark, |l| count_of(l).is_some(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no count line after restore: {e}"));
    wl.expect_pass("after restore --shell-job");
    println!("checked: shell job {pid} dumped with --shell-job, refused without the flag, restored into session {own_sid} and PASSes");
}

/// `restore --lazy-pages`: the process runs before its memory is in, and at
/// once forks, moves, drops and writes memory that is still being filled. The
/// workload checks every word (the child its quarter, the parent the rest);
/// the restorer reports how the pages arrived.
#[test]
fn lazy_restore_serves_fork_mremap_and_dontneed() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("lazy");
    let images = tmp.subdir("images");
    let mut wl = Workload::start(workload_bin!(wl_lazy), &["512"], tmp.path());
    let heavy = Duration::from_secs(300);
    dump_and_reap(&mut wl, &images, heavy);

    let args: Vec<String> = [
        "restore",
        "--images-dir",
        path_str(&images),
        "--detach",
        "--lazy-pages",
        "--announce",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut restore = h::bg::BgProc::crm("restore", &[], &args, tmp.path());
    let deadline = std::time::Instant::now() + heavy;
    while !restore.stdout().contains("RUNNING") {
        if let Some(st) = restore.try_wait() {
            panic!(
                "restore --lazy-pages exited ({st}) without running the process:\n{}",
                restore.stderr()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restore --lazy-pages did not announce the process"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    wl.adopt_restored()
        .unwrap_or_else(|e| panic!("after `restore --lazy-pages` said RUNNING: {e}"));
    let mark = wl.mark();
    wl.signal(libc::SIGUSR2)
        .expect("signal the restored workload");
    let st = restore
        .wait_timeout(heavy)
        .unwrap_or_else(|| panic!("restore --lazy-pages did not finish:\n{}", restore.stderr()));
    let err = restore.stderr();
    assert!(st.success(), "restore --lazy-pages failed ({st}):\n{err}");
    let filled = err
        .lines()
        .find(|l| l.contains("in place after"))
        .unwrap_or_else(|| {
            panic!("restore --lazy-pages did not report its memory in place:\n{err}")
        });
    assert!(
        filled.contains("address space(s)")
            && !filled.contains(" 0 pages in the background, 0 on faults"),
        "no page was filled lazily: {filled}"
    );
    println!("restorer: {}", filled.trim());
    let line = wl
        .verdict_since(mark)
        .unwrap_or_else(|e| panic!("wl_lazy: {e}"));
    println!("checked: {line}");
}

/// Dump, `show` and restore of a workload that checks its own event fds
/// before and after: `show` must print every line of `shown`.
fn event_fd_cycle(name: &str, bin: &Path, shown: &[&str]) {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new(name);
    let images = tmp.subdir("images");
    let mut wl = Workload::start(bin, &[], tmp.path());
    wl.expect_pass("before the dump");
    let before = dump_and_reap(&mut wl, &images, h::crm::DEFAULT_TIMEOUT);
    let show = run_crm(&["show", path_str(&images)]);
    assert_success(&show, "show");
    let out = String::from_utf8_lossy(&show.stdout);
    for want in shown {
        assert!(out.contains(want), "`show` should print {want:?}:\n{out}");
    }
    restore_detached(&mut wl, &images, h::crm::DEFAULT_TIMEOUT, &before);
    let pass = wl.expect_pass("after restore");
    println!("checked: {pass}");
}

/// eventfds keep their counters (beyond 32 bits), non-blocking mode,
/// semaphore semantics and close-on-exec.
#[test]
fn eventfd_counters_and_flags() {
    event_fd_cycle(
        "eventfd",
        workload_bin!(wl_eventfd),
        &[
            "fd 40 eventfd count 1099511627818 nonblock",
            "fd 41 eventfd count 3 semaphore cloexec",
        ],
    );
}

/// A signalfd keeps its mask and O_NONBLOCK, and the signal pending at the
/// dump is still there to read from it after the restore.
#[test]
fn signalfd_mask_and_pending_signal() {
    event_fd_cycle(
        "signalfd",
        workload_bin!(wl_signalfd),
        &["fd 42 signalfd mask 0x800000200 nonblock"],
    );
}

/// timerfds keep their clocks, time left, intervals and unread expirations.
#[test]
fn timerfd_states() {
    event_fd_cycle(
        "timerfd",
        workload_bin!(wl_timerfd),
        &[
            "fd 45 timerfd clock 0 next in 0 ns every 0 ns, 1 unread nonblock",
            "fd 43 timerfd clock 1",
            "every 100000000 ns",
        ],
    );
}

/// An epoll instance keeps its watched descriptors, event masks (level and
/// edge triggered) and data.
#[test]
fn epoll_watches() {
    event_fd_cycle(
        "epoll",
        workload_bin!(wl_epoll),
        // The kernel adds EPOLLERR | EPOLLHUP (0x18) to every mask.
        &[
            "fd 52 epoll watching",
            "fd 50 events 0x19 data 0xdead",
            "fd 51 events 0x80000019 data 0x7",
        ],
    );
}

/// Pipes whose both ends the process holds keep their buffered data (read
/// without consuming it at the dump), size, O_NONBLOCK and dup'd ends.
#[test]
fn pipes_with_data() {
    event_fd_cycle(
        "pipes",
        workload_bin!(wl_pipes),
        &[
            "fd 60 pipe:[",
            "read end, size 262144, 10 bytes buffered",
            "fd 62 pipe:[",
            "read end, size 65536, 0 bytes buffered nonblock",
            "fd 64 pipe:[",
        ],
    );
}

/// Files unlinked while open come back unnamed with their contents, mode
/// and offsets; O_APPEND stays on; a dup'd descriptor shares its offset
/// again (workload `wl_unlinked`).
#[test]
fn unlinked_files_and_append_mode() {
    event_fd_cycle(
        "unlinked",
        workload_bin!(wl_unlinked),
        &[
            // O_LARGEFILE | O_RDWR; O_LARGEFILE | O_APPEND | O_WRONLY.
            "ghost.dat (deleted) flags 0o100002 pos 1000 (unlinked: 262144 bytes saved, mode 640)",
            "ghost.dat (deleted) flags 0o102001 pos 0 (unlinked: 262144 bytes saved, mode 640)",
            "kept.log flags 0o102001",
            // fd 53, a dup of fd 50: restored as a duplicate of it.
            "ghost.dat (deleted) flags 0o100002 pos 1000 (dup of fd 50)",
        ],
    );
}

/// POSIX timers come back with their IDs (a deleted one leaving a gap),
/// clocks, notifications, time left and intervals (workload
/// `wl_posix_timers`).
#[test]
fn posix_timers_keep_ids_and_time() {
    event_fd_cycle(
        "posix-timers",
        workload_bin!(wl_posix_timers),
        &[
            "posix timer 0: clock 1, signal 10, value 0xfeed",
            "interval 20000000 ns",
            "posix timer 1: clock 0, no signal",
            "posix timer 3: clock 1, signal 35 to thread",
        ],
    );
}
