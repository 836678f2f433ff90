//! Self-tests of the harness and the workload programs, without `cr-migrate`.
//!
//! Every workload must PASS its own verification when nothing happened to it (twice:
//! verifying must not break the next verification), and FAIL when its state is damaged
//! on purpose (`CRM_WL_CORRUPT=1`); otherwise a PASS after a restore would prove
//! nothing. The guards must leave no process behind.

use std::path::Path;
use std::time::Duration;

use crm_tests::{self as h, procs, workload_bin, Spawn, TempDir, Workload};

fn corrupt() -> Spawn {
    Spawn {
        env: vec![("CRM_WL_CORRUPT".into(), "1".into())],
        ..Spawn::default()
    }
}

/// Starts `exe` twice: plain (must PASS twice), and corrupted (must FAIL).
fn pass_then_fail(exe: &Path, args: &[&str], extra_env: &[(&str, &str)]) {
    h::init();
    let tmp = TempDir::new("selftest");
    let mut plain = Spawn::default();
    let mut bad = corrupt();
    for (k, v) in extra_env {
        plain.env.push((k.to_string(), v.to_string()));
        bad.env.push((k.to_string(), v.to_string()));
    }
    let pid;
    {
        let wl = Workload::start_with(exe, args, tmp.path(), plain);
        pid = wl.pid();
        let first = wl.expect_pass("first verification");
        let second = wl.expect_pass("second verification");
        println!("checked: {} PASSes twice: {first} / {second}", wl.name());
    }
    assert!(!procs::alive(pid), "pid {pid} survived its guard");
    let wl = Workload::start_with(exe, args, tmp.path(), bad);
    match wl.verify() {
        Ok(line) => panic!(
            "{} with CRM_WL_CORRUPT=1 should FAIL, got: {line}",
            wl.name()
        ),
        Err(e) => {
            let line = e.lines().next().unwrap_or("");
            assert!(line.starts_with("FAIL"), "expected a FAIL line, got: {e}");
            println!("checked: {} detects damage: {line}", wl.name());
        }
    }
}

#[test]
fn counter_self_check() {
    pass_then_fail(workload_bin!(wl_counter), &[], &[]);
}

#[test]
fn threads_avx_self_check() {
    h::init();
    if !std::arch::is_x86_feature_detected!("avx") {
        h::skip_test!("threads_avx_self_check", "the CPU has no AVX");
    }
    let _serial = h::serial();
    pass_then_fail(workload_bin!(wl_threads_avx), &[], &[]);
    // The AVX-only variant, forced on AVX-512 machines.
    pass_then_fail(
        workload_bin!(wl_threads_avx),
        &[],
        &[("CRM_WL_NO_AVX512", "1")],
    );
}

#[test]
fn memory_self_check() {
    h::init();
    let _serial = h::serial();
    let tmp = TempDir::new("memory-selftest");
    let files = tmp.subdir("files");
    pass_then_fail(
        workload_bin!(wl_memory),
        &[files.to_str().expect("utf-8 path"), "64"],
        &[],
    );
}

#[test]
fn signals_self_check() {
    pass_then_fail(workload_bin!(wl_signals), &[], &[]);
}

#[test]
fn unix_self_check() {
    pass_then_fail(workload_bin!(wl_unix), &[], &[]);
}

#[test]
fn inotify_self_check() {
    pass_then_fail(workload_bin!(wl_inotify), &[], &[]);
}

#[test]
fn unix_refused_self_check() {
    pass_then_fail(workload_bin!(wl_unix_refused), &["scm"], &[]);
}

#[test]
fn inet_self_check() {
    pass_then_fail(workload_bin!(wl_inet), &[], &[]);
}

#[test]
fn sleeper_and_socket_holder_pass() {
    h::init();
    let tmp = TempDir::new("simple-selftest");
    for exe in [workload_bin!(wl_sleeper), workload_bin!(wl_unsupported_fd)] {
        let wl = Workload::start(exe, &[], tmp.path());
        let line = wl.expect_pass("self-check");
        println!("checked: {}: {line}", wl.name());
    }
}

#[test]
fn harness_reaps_and_sessions() {
    h::init();
    assert!(
        procs::is_subreaper(),
        "the test process should be a child subreaper"
    );
    let tmp = TempDir::new("harness");
    let own_session = Workload::start(workload_bin!(wl_sleeper), &[], tmp.path());
    let s = procs::stat(own_session.pid()).expect("stat");
    assert_eq!(
        s.session,
        own_session.pid(),
        "setsid: the workload leads its session"
    );
    let shared = Workload::start_with(
        workload_bin!(wl_sleeper),
        &[],
        tmp.path(),
        Spawn {
            new_session: false,
            ..Spawn::default()
        },
    );
    let s2 = procs::stat(shared.pid()).expect("stat");
    let me = procs::stat(procs::getpid()).expect("stat self");
    assert_eq!(
        s2.session, me.session,
        "without setsid the workload shares our session"
    );
    // A workload killed from outside is reaped by the guard, not left a zombie.
    let pids = [own_session.pid(), shared.pid()];
    procs::kill(shared.pid(), libc::SIGKILL).expect("kill");
    drop(shared);
    drop(own_session);
    for pid in pids {
        assert!(
            procs::stat(pid).is_none_or(|s| s.ppid != procs::getpid()),
            "pid {pid} is still a child of ours after its guard dropped"
        );
    }
    // wait_line fails fast, with the log, when the workload dies.
    let mut wl = Workload::start(workload_bin!(wl_sleeper), &[], tmp.path());
    procs::kill(wl.pid(), libc::SIGKILL).expect("kill");
    let err = wl
        .wait_line(
            wl.mark(),
            |l| l.starts_with("never"),
            Duration::from_secs(20),
        )
        .expect_err("a dead workload cannot print");
    assert!(err.contains("not running"), "{err}");
    wl.reap_killed(Duration::from_secs(5))
        .expect("reaping the killed workload");
    println!("checked: subreaper, sessions, reaping on drop and on kill");
}
