//! End-to-end tests of live migration: `cr-migrate receive` and `cr-migrate send`
//! run as subprocesses, as a user would run them (DESIGN.md §5-6).
//!
//! A migration within this host: the workload is a child of the test process (a
//! child subreaper); `receive` listens on a free UDP port of 127.0.0.1 (or on a veth
//! address inside a network namespace); `send PID` migrates the workload there. Once
//! the destination's preflight passed, the source kills its process and the test —
//! its parent — must reap it promptly so the PID is free for the restored copy (on
//! these VMs nobody else would), so the test polls for that while `send` runs. The
//! restored copy (started by `restore --detach`, a child of `receive`) is reparented
//! to the test process and adopted by the workload guard, which checks that it is a
//! new process with the old PID and asks it to verify its own state.
//!
//! Failure tests (wrong token, a receiver killed mid-transfer, a destination whose
//! preflight fails, Ctrl-C) check that `send` fails with a message naming the cause
//! and that the source is exactly as before: the same process (start time), not
//! traced, not stopped, no userfaultfd write-protection left on its mappings, the same
//! fds and mappings, and it PASSes its own verification. Migrations hold
//! [`h::serial`]; guards kill and reap everything, namespaces included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crm_tests::bg::BgProc;
use crm_tests::netns::{self, NetnsPair};
use crm_tests::path_str;
use crm_tests::{self as h, procs, workload_bin, Spawn, TempDir, Workload};

/// Longest a `send` may take in these tests (a 512 MiB workload on a 2-core VM).
const SEND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `receive` may take to exit after `send` did.
const RECEIVE_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `receive` may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The QUIC idle timeout bounds how long `send` may take to notice a dead peer.
const PEER_LOSS_BOUND: Duration = Duration::from_secs(60);
/// With TCP page channels (the default), a dead receiver closes them and
/// `send` notices within a few seconds (the control stream gets 2 s more).
const CHANNEL_LOSS_BOUND: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Setup: directories, tokens, ports, the two commands.

/// A test's temp dir with a token file, a state dir and a work dir for `receive`.
struct Setup {
    tmp: TempDir,
    token: PathBuf,
    state: PathBuf,
    work: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        h::init();
        let tmp = TempDir::new(name);
        let token = write_token(&tmp, "token", "migration-token-0123456789abcdef");
        let state = tmp.subdir("state");
        let work = tmp.subdir("work");
        Setup {
            tmp,
            token,
            state,
            work,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `receive --listen ADDR` with this setup's state and work dirs, behind `prefix`;
    /// returns once it listens.
    fn receive(&self, prefix: &[String], listen: &str, token: &Path) -> BgProc {
        self.receive_with(prefix, listen, token, &[])
    }

    /// [`Setup::receive`] with extra arguments.
    fn receive_with(
        &self,
        prefix: &[String],
        listen: &str,
        token: &Path,
        extra: &[&str],
    ) -> BgProc {
        let mut args = strings(&[
            "receive",
            "--listen",
            listen,
            "--token-file",
            path_str(token),
            "--state-dir",
            path_str(&self.state),
            "--work-dir",
            path_str(&self.work),
        ]);
        args.extend(strings(extra));
        let mut r = BgProc::crm("receive", prefix, &args, self.dir());
        if let Err(e) = r.wait_stderr("listening on", LISTEN_TIMEOUT) {
            panic!("`cr-migrate receive` did not start listening: {e}");
        }
        r
    }

    /// `send PID DEST --token-file TOKEN --json EXTRA...` behind `prefix`.
    fn send(
        &self,
        prefix: &[String],
        pid: i32,
        dest: &str,
        token: &Path,
        extra: &[&str],
    ) -> BgProc {
        let pid = pid.to_string();
        let mut args = strings(&[
            "send",
            &pid,
            dest,
            "--token-file",
            path_str(token),
            "--json",
        ]);
        args.extend(strings(extra));
        BgProc::crm("send", prefix, &args, self.dir())
    }

    /// The `incoming-*` directories `receive` left in its work dir.
    fn incoming_dirs(&self) -> Vec<String> {
        std::fs::read_dir(&self.work)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("incoming-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn write_token(tmp: &TempDir, name: &str, token: &str) -> PathBuf {
    let p = tmp.path().join(name);
    std::fs::write(&p, format!("{token}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

/// A UDP port of 127.0.0.1 that was free a moment ago.
/// A port free for UDP (QUIC) and TCP (page channels).
fn free_port() -> u16 {
    crm_tests::port::free_port().expect("a port free for UDP and TCP")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// Running `send` while reaping the source.

/// How a `send` ended.
struct Sent {
    status: ExitStatus,
    elapsed: Duration,
    /// How the source process ended, if the test reaped it while `send` ran.
    source_end: Option<String>,
    stdout: String,
    stderr: String,
}

/// Waits for `send` to end (SIGKILL after `timeout`), reaping the source workload as
/// soon as `send` kills it: the restored copy needs its PID, and the test process is
/// the source's parent.
fn drive_send(send: &mut BgProc, wl: &mut Workload, timeout: Duration) -> Sent {
    let mut source_end = None;
    let status = loop {
        // The first reap is the original: the restored copy cannot exist before the
        // original's PID is free.
        if source_end.is_none() {
            if let Ok(how) = wl.reap_killed(Duration::ZERO) {
                eprintln!("the source (pid {}) {how} during send", wl.pid());
                source_end = Some(how);
            }
        }
        if let Some(s) = send.try_wait() {
            break s;
        }
        if send.elapsed() > timeout {
            let s = send.kill();
            eprintln!("[test: send killed after {timeout:?}]");
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if source_end.is_none() {
        if let Ok(how) = wl.reap_killed(Duration::from_millis(50)) {
            source_end = Some(how);
        }
    }
    Sent {
        status,
        elapsed: send.elapsed(),
        source_end,
        stdout: send.stdout(),
        stderr: send.stderr(),
    }
}

/// The start time (clock ticks since boot) of `pid`: tells a restored copy from the
/// original with the same PID.
fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    // Fields after the comm: state is field 3, starttime field 22.
    text.get(close + 1..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The mappings of `pid` whose `VmFlags` include `uw` (userfaultfd write-protect).
fn uffd_wp_mappings(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut header = "";
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "uw") {
                found.push(header.to_string());
            }
        } else if line.split_whitespace().next().is_some_and(|f| {
            f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            header = line;
        }
    }
    found
}

/// The source before a migration attempt.
struct Before {
    pid: i32,
    start: u64,
    fds: BTreeMap<i32, String>,
    maps: Vec<String>,
}

impl Before {
    fn take(wl: &Workload) -> Before {
        let pid = wl.pid();
        Before {
            pid,
            start: start_time(pid).expect("start time of the workload"),
            fds: procs::fds(pid),
            maps: procs::maps(pid),
        }
    }
}

/// After a failed migration: the source is the original process, running, not
/// traced, not stopped, with no write-protection left, the same fds and mappings, and
/// it PASSes; no restored copy took its place.
fn assert_untouched(wl: &Workload, before: &Before, what: &str) {
    let pid = before.pid;
    assert!(procs::alive(pid), "{what}: the source pid {pid} is gone");
    assert_eq!(
        start_time(pid),
        Some(before.start),
        "{what}: pid {pid} is not the original process any more (another start time: a \
         restored copy?)"
    );
    assert_eq!(
        procs::tracer_pid(pid),
        Some(0),
        "{what}: the source pid {pid} is still ptrace-attached"
    );
    let state = procs::stat(pid).map(|s| s.state);
    assert!(
        !matches!(state, Some('T' | 't')),
        "{what}: the source pid {pid} was left stopped (state {state:?})"
    );
    let wp = uffd_wp_mappings(pid);
    assert!(
        wp.is_empty(),
        "{what}: mappings of pid {pid} are still userfaultfd write-protected (uw): {wp:#?}"
    );
    let fds = procs::fds(pid);
    assert_eq!(
        fds, before.fds,
        "{what}: the fds of pid {pid} changed (before, then now)"
    );
    let maps = procs::maps(pid);
    let gone: Vec<&String> = before.maps.iter().filter(|m| !maps.contains(m)).collect();
    let new: Vec<&String> = maps.iter().filter(|m| !before.maps.contains(m)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{what}: the memory map of pid {pid} changed:\n  only before: {gone:#?}\n  only after: {new:#?}"
    );
    wl.expect_pass(&format!("after {what}"));
    println!(
        "checked: after {what}, pid {pid} is the original process, not traced, not \
         stopped, no uw mappings, same {} fds and {} mappings, and PASSes",
        fds.len(),
        maps.len()
    );
}

/// A failed `send`: non-zero exit code (not a signal, not a panic), a message.
fn assert_send_failed(sent: &Sent, what: &str) {
    assert!(
        !sent.status.success(),
        "{what}: `cr-migrate send` should have failed but exited 0; stdout:\n{}\nstderr:\n{}",
        sent.stdout,
        sent.stderr
    );
    assert!(
        sent.status.code().is_some(),
        "{what}: `cr-migrate send` died from a signal ({}) instead of failing with an \
         error; stderr:\n{}",
        sent.status,
        sent.stderr
    );
    assert!(
        !sent.stderr.contains("panicked"),
        "{what}: `cr-migrate send` panicked:\n{}",
        sent.stderr
    );
    assert!(
        sent.source_end.is_none(),
        "{what}: the source process ended during the failed send ({}); stderr:\n{}",
        sent.source_end.as_deref().unwrap_or(""),
        sent.stderr
    );
}

/// The `cr-migrate: error: ...` part of a stderr, for messages.
fn error_part(stderr: &str) -> String {
    match stderr.find("error:") {
        Some(i) => stderr[i..].trim().to_string(),
        None => stderr.trim().to_string(),
    }
}

/// After a `send` that should have succeeded: both commands exited 0, the original
/// was killed and reaped, and a new process with its PID runs as our child. Adopts
/// it into `wl` and returns the parsed JSON summary.
fn expect_migrated(wl: &mut Workload, recv: &mut BgProc, sent: &Sent, before: &Before) -> Json {
    let recv_status = recv.wait_timeout(RECEIVE_EXIT_TIMEOUT);
    // Under the guard first, whatever the statuses say.
    let adopted = if sent.source_end.is_some() {
        wl.adopt_restored()
    } else {
        Err("the source was never reaped".into())
    };
    assert!(
        sent.status.success(),
        "`cr-migrate send` failed ({}) after {:.2?}:\n{}\n--- receive stderr:\n{}",
        sent.status,
        sent.elapsed,
        sent.stderr,
        recv.stderr()
    );
    assert!(
        recv_status.is_some_and(|s| s.success()),
        "`cr-migrate receive` should exit 0 after serving the migration, got {recv_status:?}; \
         stderr:\n{}",
        recv.stderr()
    );
    let how = sent.source_end.as_deref().unwrap_or_else(|| {
        panic!(
            "send succeeded but the source pid {} was never seen to die",
            before.pid
        )
    });
    let ppid = adopted.unwrap_or_else(|e| panic!("after the migration: {e}"));
    assert_eq!(
        ppid,
        procs::getpid(),
        "the restored pid {} should have been reparented to the test process (a child \
         subreaper), its parent is {ppid}",
        before.pid
    );
    let start = start_time(before.pid);
    assert!(
        start.is_some_and(|s| s != before.start),
        "pid {} has the original's start time {}: not a restored copy?",
        before.pid,
        before.start
    );
    println!(
        "checked: send and receive exited 0 in {:.2?}, the source {how} and was reaped, \
         pid {} runs again as a new process (a child of the test process)",
        sent.elapsed, before.pid
    );
    let line = sent
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with('{'));
    let json = line
        .ok_or_else(|| "no JSON object on stdout".to_string())
        .and_then(|l| parse_json(l.trim()))
        .unwrap_or_else(|e| panic!("the --json summary of send: {e}; stdout:\n{}", sent.stdout));
    print_summary(&json);
    json
}

/// One line of figures from a send summary, and the per-round lines.
fn print_summary(j: &Json) {
    let num = |k: &str| j.get(k).and_then(Json::num);
    let rounds = j.get("rounds").and_then(Json::arr).map(<[Json]>::len);
    println!(
        "summary: rounds={} downtime_ms={} total_ms={} raw_bytes={} wire_bytes={} tracker={} \
         stop_reason={:?}",
        rounds.map_or("?".into(), |n| n.to_string()),
        num("downtime_ms").map_or("?".into(), |v| format!("{v:.1}")),
        num("total_ms").map_or("?".into(), |v| format!("{v:.1}")),
        num("raw_bytes").map_or("?".into(), |v| format!("{v}")),
        num("wire_bytes").map_or("?".into(), |v| format!("{v}")),
        j.get("tracker").and_then(Json::str).unwrap_or("?"),
        j.get("stop_reason").and_then(Json::str).unwrap_or("?"),
    );
    for r in j.get("rounds").and_then(Json::arr).unwrap_or(&[]) {
        let f = |k: &str| r.get(k).and_then(Json::num).unwrap_or(f64::NAN);
        println!(
            "  round {}: dirty_pages={} pages_sent={} zero_pages={} bytes_sent={} ms={:.1}",
            f("round"),
            f("dirty_pages"),
            f("pages_sent"),
            f("zero_pages"),
            f("bytes_sent"),
            f("ms")
        );
    }
}

/// The summary's `rounds` count and `downtime_ms`, asserting both are there.
fn rounds_and_downtime(j: &Json) -> (usize, f64) {
    let rounds = j
        .get("rounds")
        .and_then(Json::arr)
        .map(<[Json]>::len)
        .unwrap_or_else(|| panic!("the summary has no rounds array: {j:?}"));
    let downtime = j
        .get("downtime_ms")
        .and_then(Json::num)
        .unwrap_or_else(|| panic!("the summary has no numeric downtime_ms: {j:?}"));
    (rounds, downtime)
}

/// A whole same-host migration of `wl` over 127.0.0.1; returns the summary.
fn migrate_locally(s: &Setup, wl: &mut Workload, extra: &[&str]) -> Json {
    migrate_locally_with(s, wl, &[], extra).0
}

/// [`migrate_locally`] with extra `receive` arguments; also returns the
/// receiver's stderr.
fn migrate_locally_with(
    s: &Setup,
    wl: &mut Workload,
    recv_extra: &[&str],
    extra: &[&str],
) -> (Json, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive_with(&[], &addr, &s.token, recv_extra);
    let before = Before::take(wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, extra);
    let sent = drive_send(&mut send, wl, SEND_TIMEOUT);
    let summary = expect_migrated(wl, &mut recv, &sent, &before);
    (summary, recv.stderr())
}

/// What carried the pages, from the summary ("quic", "tcp", "tcp-sealed").
fn page_transport(summary: &Json) -> String {
    summary
        .get("page_transport")
        .and_then(Json::str)
        .unwrap_or("?")
        .to_owned()
}

/// The number after `key=` in a workload line.
fn line_num(line: &str, key: &str) -> Option<f64> {
    crm_tests::workload::field(line, key)?.parse().ok()
}

// ---------------------------------------------------------------------------
// The workloads of this file, checked on their own first.

fn corrupt() -> Spawn {
    Spawn {
        env: vec![("CRM_WL_CORRUPT".into(), "1".into())],
        ..Spawn::default()
    }
}

/// `exe ARGS` PASSes twice when left alone and FAILs with `CRM_WL_CORRUPT=1`.
fn pass_then_fail(exe: &Path, args: &[&str]) {
    let tmp = TempDir::new("mig-selftest");
    {
        let wl = Workload::start(exe, args, tmp.path());
        let first = wl.expect_pass("first verification");
        std::thread::sleep(Duration::from_millis(300));
        let second = wl.expect_pass("second verification");
        println!("checked: {} PASSes twice: {first} / {second}", wl.name());
    }
    let wl = Workload::start_with(exe, args, tmp.path(), corrupt());
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
fn dirtier_self_check() {
    h::init();
    let _serial = h::serial();
    pass_then_fail(workload_bin!(wl_dirtier), &["64", "50"]);
}

#[test]
fn mapper_self_check() {
    h::init();
    let _serial = h::serial();
    pass_then_fail(workload_bin!(wl_mapper), &[]);
}

// ---------------------------------------------------------------------------
// Migrations that must succeed.

#[test]
fn migrate_idle_256mib() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-idle");
    let files = s.tmp.subdir("files");
    let mut wl = Workload::start(
        workload_bin!(wl_memory),
        &[path_str(&files), "256"],
        s.dir(),
    );
    let summary = migrate_locally(&s, &mut wl, &[]);
    let pass = wl.expect_pass("after the migration");
    assert_eq!(
        page_transport(&summary),
        "tcp",
        "a same-host migration carries its pages on unsealed TCP page channels"
    );
    let (rounds, downtime) = rounds_and_downtime(&summary);
    assert!(
        rounds >= 2,
        "an idle 256 MiB workload should take at least 2 pre-copy rounds (a full copy and \
         one of the few dirty pages), the summary has {rounds}"
    );
    println!(
        "figures: idle 256 MiB: rounds={rounds} downtime_ms={downtime:.1} total_ms={:.1}; {pass}",
        summary
            .get("total_ms")
            .and_then(Json::num)
            .unwrap_or(f64::NAN)
    );
}

/// The destination fills the migrated process's memory from its page store
/// after the commit, dropping each copy once the process has the page. A
/// process that at once forks, moves, drops and writes memory still being
/// filled must see every word right, in the child too (which needs pages
/// its parent had not received yet when it forked).
#[test]
fn migrate_then_fork_mremap_and_dontneed_while_filling() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-lazy");
    let mut wl = Workload::start(workload_bin!(wl_lazy), &["512"], s.dir());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive(&[], &addr, &s.token);
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, &[]);
    let sent = drive_send(&mut send, &mut wl, SEND_TIMEOUT);
    // At once: send exits at the commit, when the filling begins.
    let mark = wl.mark();
    if sent.status.success() {
        procs::kill(wl.pid(), libc::SIGUSR2).expect("signal the restored wl_lazy");
    }
    expect_migrated(&mut wl, &mut recv, &sent, &before);
    let err = recv.stderr();
    let filled = err
        .lines()
        .find(|l| l.contains("in place") && l.contains("address space(s)"))
        .unwrap_or_else(|| panic!("receive did not report the memory in place:\n{err}"));
    println!("receive: {}", filled.trim());
    let line = wl
        .verdict_since(mark)
        .unwrap_or_else(|e| panic!("wl_lazy: {e}"));
    println!("checked: {line}");
}

#[test]
fn migrate_busy_256mib_50mbps() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-busy");
    let mut wl = Workload::start(workload_bin!(wl_dirtier), &["256", "50"], s.dir());
    // A page store of 64 MiB: most pages spill to a file and the restored
    // process's memory is served from both.
    let (summary, recv_err) = migrate_locally_with(
        &s,
        &mut wl,
        &["--memory-limit-mib", "64"],
        &["--max-downtime-ms", "300", "--page-transport", "quic"],
    );
    let spilled = recv_err
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("MiB in memory, ")?;
            rest.split_once(" MiB spilled")?.0.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("receive did not report its page store:\n{recv_err}"));
    assert!(
        spilled > 100.0,
        "with --memory-limit-mib 64, most of 256 MiB should have spilled, got {spilled} MiB"
    );
    println!("checked: the receiver's page store spilled {spilled:.1} MiB beyond its 64 MiB");
    let first = wl.expect_pass("after the migration");
    std::thread::sleep(Duration::from_millis(300));
    let second = wl.expect_pass("300 ms later");
    let rewritten = |l: &str| line_num(l, "rewritten").unwrap_or(0.0);
    assert!(
        rewritten(&second) > rewritten(&first),
        "the restored workload stopped rewriting pages: {first} / {second}"
    );
    assert_eq!(page_transport(&summary), "quic", "--page-transport quic");
    let (rounds, downtime) = rounds_and_downtime(&summary);
    let gap = line_num(&first, "max_gap_ms").unwrap_or(f64::NAN);
    println!(
        "figures: busy 256 MiB at 50 MiB/s, --max-downtime-ms 300: rounds={rounds} \
         downtime_ms={downtime:.1} (as seen by the workload: max_gap_ms={gap:.1}) \
         stop_reason={:?}",
        summary
            .get("stop_reason")
            .and_then(Json::str)
            .unwrap_or("?")
    );
    if downtime > 300.0 {
        println!("note: the reported downtime {downtime:.1} ms exceeds the 300 ms budget");
    }
}

/// A process that is not root gets no userfaultfd here
/// (`vm.unprivileged_userfaultfd` is 0 and it lacks CAP_SYS_PTRACE): the
/// destination writes its memory before it runs instead of lazily.
#[test]
fn migrate_unprivileged_process_without_lazy_pages() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-nobody");
    let opts = Spawn {
        uid: Some(65534),
        ..Spawn::default()
    };
    let mut wl = Workload::start_with(workload_bin!(wl_dirtier), &["64", "10"], s.dir(), opts);
    let (summary, recv_err) = migrate_locally_with(&s, &mut wl, &[], &["--max-downtime-ms", "300"]);
    let pass = wl.expect_pass("after the migration");
    let uid = procs::status_field(wl.pid(), "Uid").unwrap_or_default();
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "the restored process should run as uid 65534, /proc says Uid: {uid}"
    );
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "0");
    if unprivileged {
        assert!(
            recv_err.contains("no userfaultfd"),
            "receive should have written the memory eagerly:\n{recv_err}"
        );
    }
    let (rounds, downtime) = rounds_and_downtime(&summary);
    println!(
        "figures: unprivileged 64 MiB: rounds={rounds} downtime_ms={downtime:.1} \
         (lazy pages: {}); {pass}",
        if unprivileged {
            "no, eager fill"
        } else {
            "allowed on this host"
        }
    );
}

/// Event objects travel in the final state: eventfd counters, a signalfd
/// with a pending signal, timerfds, an epoll instance, pipes, unix and inet
/// sockets, inotify watches, FIFOs with their data and file locks work on
/// the destination.
#[test]
fn migrate_event_fds() {
    h::init();
    let _serial = h::serial();
    for (name, bin) in [
        ("eventfd", workload_bin!(wl_eventfd)),
        ("signalfd", workload_bin!(wl_signalfd)),
        ("timerfd", workload_bin!(wl_timerfd)),
        ("epoll", workload_bin!(wl_epoll)),
        ("pipes", workload_bin!(wl_pipes)),
        ("unlinked", workload_bin!(wl_unlinked)),
        ("posix-timers", workload_bin!(wl_posix_timers)),
        ("unix", workload_bin!(wl_unix)),
        ("inet", workload_bin!(wl_inet)),
        ("inotify", workload_bin!(wl_inotify)),
        ("fifo", workload_bin!(wl_fifo)),
        ("locks", workload_bin!(wl_locks)),
    ] {
        let s = Setup::new(&format!("mig-{name}"));
        let mut wl = Workload::start(bin, &[], s.dir());
        wl.expect_pass("before the migration");
        migrate_locally(&s, &mut wl, &[]);
        let pass = wl.expect_pass("after the migration");
        println!("checked: {name} migrated: {pass}");
    }
}

#[test]
fn migrate_mapper() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-mapper");
    let mut wl = Workload::start(workload_bin!(wl_mapper), &[], s.dir());
    // Let the map change for a while first.
    std::thread::sleep(Duration::from_millis(500));
    let summary = migrate_locally(&s, &mut wl, &[]);
    let first = wl.expect_pass("after the migration");
    std::thread::sleep(Duration::from_millis(500));
    let second = wl.expect_pass("500 ms later");
    let ops = |l: &str| line_num(l, "ops").unwrap_or(0.0);
    assert!(
        ops(&second) > ops(&first),
        "the restored workload stopped changing its map: {first} / {second}"
    );
    let (rounds, downtime) = rounds_and_downtime(&summary);
    println!("figures: mapper: rounds={rounds} downtime_ms={downtime:.1}; {second}");
}

#[test]
fn migrate_across_network_namespaces() {
    const TEST: &str = "migrate_across_network_namespaces";
    h::init();
    let _serial = h::serial();
    let Some(ip) = netns::ip_bin() else {
        h::skip_test!(TEST, "`ip` (iproute2) is not installed");
    };
    let ns = match NetnsPair::create() {
        Ok(ns) => ns,
        Err(e) => h::skip_test!(TEST, "cannot create network namespaces: {e}"),
    };
    println!(
        "namespaces: {} ({}) <-veth-> {} ({})",
        ns.a, ns.addr_a, ns.b, ns.addr_b
    );
    let s = Setup::new("mig-netns");
    let files = s.tmp.subdir("files");
    let wl_bin = workload_bin!(wl_memory).to_string_lossy().into_owned();
    let mut wl = Workload::start(
        &ip,
        &["netns", "exec", &ns.a, &wl_bin, path_str(&files), "128"],
        s.dir(),
    );
    assert!(
        NetnsPair::pids(&ns.a).contains(&wl.pid()),
        "the workload pid {} is not in netns {}",
        wl.pid(),
        ns.a
    );
    let port = free_port();
    let listen = format!("{}:{port}", ns.addr_b);
    let mut recv = s.receive(&ns.exec_prefix(&ns.b), &listen, &s.token);
    let before = Before::take(&wl);
    let mut send = s.send(&ns.exec_prefix(&ns.a), wl.pid(), &listen, &s.token, &[]);
    let sent = drive_send(&mut send, &mut wl, SEND_TIMEOUT);
    let summary = expect_migrated(&mut wl, &mut recv, &sent, &before);
    let pass = wl.expect_pass("after the migration between namespaces");
    assert_eq!(
        page_transport(&summary),
        "tcp-sealed",
        "between hosts (namespaces) the pages travel on sealed TCP page channels"
    );
    assert!(
        NetnsPair::pids(&ns.b).contains(&wl.pid()),
        "the restored pid {} should run in the destination's netns {}",
        wl.pid(),
        ns.b
    );
    let (rounds, downtime) = rounds_and_downtime(&summary);
    println!(
        "figures: {} -> {} over veth: rounds={rounds} downtime_ms={downtime:.1} \
         wire_bytes={}; {pass}",
        ns.addr_a,
        ns.addr_b,
        summary
            .get("wire_bytes")
            .and_then(Json::num)
            .unwrap_or(f64::NAN)
    );
}

/// Garbage datagrams (some shaped like QUIC Initial packets) before a real migration:
/// `receive` must ignore them and still serve the migration.
#[test]
fn receive_ignores_garbage_datagrams_then_migrates() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-garbage");
    let mut wl = Workload::start(workload_bin!(wl_counter), &[], s.dir());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive(&[], &addr, &s.token);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sent_bytes = 0;
    for i in 0..300 {
        let len = 1 + (next() % 1400) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 && len >= 8 {
            // A long-header packet of QUIC version 1 with random contents.
            d[0] = 0xC0 | (d[0] & 0x0F);
            d[1..5].copy_from_slice(&[0, 0, 0, 1]);
        }
        sent_bytes += sock.send_to(&d, &addr).unwrap_or(0);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        recv.try_wait().is_none(),
        "`cr-migrate receive` exited after garbage datagrams; stderr:\n{}",
        recv.stderr()
    );
    println!("checked: receive still listens after 300 garbage datagrams ({sent_bytes} bytes)");
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, &[]);
    let sent = drive_send(&mut send, &mut wl, SEND_TIMEOUT);
    expect_migrated(&mut wl, &mut recv, &sent, &before);
    wl.expect_pass("after the migration");
}

// ---------------------------------------------------------------------------
// Failures: the source must be left as it was, with no restored copy.

#[test]
fn migrate_refused_with_wrong_token() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-token");
    let other = write_token(&s.tmp, "other-token", "another-token-fedcba9876543210");
    let mut wl = Workload::start(workload_bin!(wl_counter), &[], s.dir());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive(&[], &addr, &s.token);
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &other, &[]);
    let sent = drive_send(&mut send, &mut wl, Duration::from_secs(60));
    assert_send_failed(&sent, "send with the wrong token");
    let err = sent.stderr.to_lowercase();
    assert!(
        err.contains("refused") && (err.contains("token") || err.contains("authenticat")),
        "send's error should say the peer refused the authentication:\n{}",
        sent.stderr
    );
    assert!(
        sent.stderr.contains(&addr),
        "send's error should name the peer {addr}:\n{}",
        sent.stderr
    );
    println!("checked: send refused: {}", error_part(&sent.stderr));
    match recv.wait_timeout(Duration::from_secs(3)) {
        Some(st) => assert!(
            !st.success(),
            "receive exited 0 although no migration took place; stderr:\n{}",
            recv.stderr()
        ),
        None => {
            recv.kill();
            println!("checked: receive kept waiting for a proper sender (killed)");
        }
    }
    assert_untouched(&wl, &before, "the refused send");
}

#[test]
fn migrate_fails_when_the_receiver_dies() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-drop");
    let files = s.tmp.subdir("files");
    let mut wl = Workload::start(
        workload_bin!(wl_memory),
        &[path_str(&files), "512"],
        s.dir(),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive(&[], &addr, &s.token);
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, &[]);
    if let Err(e) = recv.wait_stderr("authenticated", Duration::from_secs(30)) {
        panic!(
            "the sender never got through: {e}\n--- send stderr:\n{}",
            send.stderr()
        );
    }
    // Kill the receiver after the first round's progress, or ~300 ms into it.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until && !send.stderr().contains("round 0") {
        std::thread::sleep(Duration::from_millis(2));
    }
    let phase = if send.stderr().contains("round 0") {
        "after round 0"
    } else {
        "during round 0"
    };
    let status = recv.kill();
    let killed_at = Instant::now();
    println!("killed receive {phase} ({status})");
    let sent = drive_send(
        &mut send,
        &mut wl,
        PEER_LOSS_BOUND + Duration::from_secs(30),
    );
    let noticed = killed_at.elapsed();
    assert_send_failed(&sent, "send to a receiver that was killed");
    assert!(
        noticed <= CHANNEL_LOSS_BOUND,
        "send took {noticed:.1?} to give up on a dead receiver (bound {CHANNEL_LOSS_BOUND:?}: \
         its page channels closed when it died)"
    );
    assert!(
        sent.stderr.contains(&addr),
        "send's error should name the peer {addr}:\n{}",
        sent.stderr
    );
    println!(
        "checked: send failed {noticed:.1?} after the receiver died: {}",
        error_part(&sent.stderr)
    );
    assert_untouched(&wl, &before, "the send whose receiver died");
}

#[test]
fn migrate_fails_when_the_destination_cannot_restore() {
    const TEST: &str = "migrate_fails_when_the_destination_cannot_restore";
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-preflight");
    // The workload keeps files open and mapped in `hidden`; the receiver runs in a
    // private mount namespace where an empty tmpfs covers `hidden`.
    let hidden = s.tmp.subdir("hidden");
    let Some(unshare) = ["/usr/bin/unshare", "/bin/unshare"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        h::skip_test!(TEST, "`unshare` (util-linux) is not installed");
    };
    let mut wl = Workload::start(
        workload_bin!(wl_memory),
        &[path_str(&hidden), "64"],
        s.dir(),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let script = format!(
        "mount -t tmpfs crm-hide '{}' && exec \"$0\" \"$@\"",
        path_str(&hidden)
    );
    let prefix = strings(&[
        path_str(&unshare),
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]);
    let mut recv = s.receive(&prefix, &addr, &s.token);
    assert!(
        hidden.join("wronly.dat").exists(),
        "the tmpfs over {} leaked out of the receiver's mount namespace",
        hidden.display()
    );
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, &[]);
    let sent = drive_send(&mut send, &mut wl, SEND_TIMEOUT);
    if sent.source_end.is_some() {
        // Adopt a restored copy, if any, so the guard kills it.
        let _ = wl.adopt_restored();
        panic!(
            "the source was killed ({}) although the destination could not restore it (no \
             preflight before the PIDs were released?); send {}:\n{}\n--- receive stderr:\n{}",
            sent.source_end.as_deref().unwrap_or(""),
            sent.status,
            sent.stderr,
            recv.stderr()
        );
    }
    assert_send_failed(&sent, "send to a destination missing the workload's files");
    assert!(
        sent.stderr.contains("failed to restore"),
        "send's error should say the destination failed to restore:\n{}",
        sent.stderr
    );
    let names_file = ["wronly.dat", "private.dat", "shared.dat"]
        .iter()
        .any(|f| sent.stderr.contains(f));
    assert!(
        names_file,
        "send's error should name the missing file (in {}):\n{}",
        hidden.display(),
        sent.stderr
    );
    println!("checked: send failed: {}", error_part(&sent.stderr));
    let recv_status = recv.wait_timeout(RECEIVE_EXIT_TIMEOUT);
    println!("receive ended: {recv_status:?}");
    assert!(
        s.incoming_dirs().is_empty(),
        "receive left {:?} in its work dir",
        s.incoming_dirs()
    );
    assert_untouched(&wl, &before, "the send the destination could not restore");
}

#[test]
fn migrate_interrupted_by_ctrl_c() {
    h::init();
    let _serial = h::serial();
    let s = Setup::new("mig-sigint");
    let files = s.tmp.subdir("files");
    let mut wl = Workload::start(
        workload_bin!(wl_memory),
        &[path_str(&files), "512"],
        s.dir(),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = s.receive(&[], &addr, &s.token);
    let before = Before::take(&wl);
    let mut send = s.send(&[], wl.pid(), &addr, &s.token, &[]);
    if let Err(e) = send.wait_stderr("migrating process", Duration::from_secs(30)) {
        panic!("send did not start migrating: {e}");
    }
    std::thread::sleep(Duration::from_millis(100));
    let in_round_0 = !send.stderr().contains("round 0:");
    send.signal(libc::SIGINT)
        .unwrap_or_else(|e| panic!("SIGINT to send: {e}\n{}", send.stderr()));
    println!(
        "sent SIGINT to send {}",
        if in_round_0 {
            "during round 0"
        } else {
            "(round 0 had already ended)"
        }
    );
    let sent = drive_send(&mut send, &mut wl, Duration::from_secs(60));
    let send_ended = Instant::now();
    assert_send_failed(&sent, "send interrupted by SIGINT");
    println!("checked: send failed: {}", error_part(&sent.stderr));
    // The source first: that is what must never be lost.
    assert_untouched(&wl, &before, "the interrupted send");
    let recv_status = recv.wait_timeout(RECEIVE_EXIT_TIMEOUT.saturating_sub(send_ended.elapsed()));
    if recv_status.is_none() {
        // Find out whether it ends at all (the QUIC idle timeout), for the message.
        let later = recv.wait_timeout(PEER_LOSS_BOUND + Duration::from_secs(10));
        let how = match later {
            Some(st) => format!(
                "it ended by itself {:.1?} after the interrupted send ({st})",
                send_ended.elapsed()
            ),
            None => format!("it was still running {:.1?} later", send_ended.elapsed()),
        };
        panic!(
            "receive did not exit within {RECEIVE_EXIT_TIMEOUT:?} after the sender was \
             interrupted (the abort did not reach it); {how}; incoming dirs left: {:?}; \
             receive stderr:\n{}\n--- send stderr:\n{}",
            s.incoming_dirs(),
            recv.stderr(),
            sent.stderr
        );
    }
    assert!(
        recv_status.is_some_and(|st| st.code().is_some_and(|c| c != 0)),
        "receive should exit non-zero (aborted) after the sender was interrupted, got \
         {recv_status:?}; stderr:\n{}",
        recv.stderr()
    );
    println!(
        "checked: receive ended ({}) within {:.1?} of the interrupted send: {}",
        recv_status.map_or("?".into(), |s| s.to_string()),
        send_ended.elapsed(),
        error_part(&recv.stderr())
    );
    assert!(
        s.incoming_dirs().is_empty(),
        "receive left {:?} in its work dir after the abort",
        s.incoming_dirs()
    );
}

// ---------------------------------------------------------------------------
// A minimal JSON reader for the `send --json` summary (no serde in this crate).

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn arr(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = JsonParser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing characters at byte {}", p.i));
    }
    Ok(v)
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected '{}'", c as char))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return self.err("nested too deep");
        }
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    m.push((k, self.value(depth + 1)?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                t.parse().map(Json::Num).or_else(|_| self.err("bad number"))
            }
            _ => self.err("expected a value"),
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            self.err("bad literal")
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return self.err("expected a string");
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).or_else(|_| self.err("invalid UTF-8"));
                }
                Some(b'\\') => {
                    let esc = self.s.get(self.i + 1).copied();
                    self.i += 2;
                    let c = match esc {
                        Some(b'n') => '\n',
                        Some(b't') => '\t',
                        Some(b'r') => '\r',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'u') => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            self.i += 4;
                            hex.and_then(char::from_u32).unwrap_or('\u{FFFD}')
                        }
                        Some(c @ (b'"' | b'\\' | b'/')) => c as char,
                        _ => return self.err("bad escape"),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

#[test]
fn json_reader_reads_a_summary() {
    let j = parse_json(
        r#"{"tracker":"UffdWpAsync","stop_reason":"fits \"budget\"","rounds":[{"round":0,"ms":1.5},{"round":1,"ms":2e1}],"downtime_ms":12.25,"ok":true,"x":null,"e":[]}"#,
    )
    .expect("valid JSON");
    assert_eq!(j.get("tracker").and_then(Json::str), Some("UffdWpAsync"));
    assert_eq!(
        j.get("stop_reason").and_then(Json::str),
        Some("fits \"budget\"")
    );
    assert_eq!(rounds_and_downtime(&j), (2, 12.25));
    assert_eq!(
        j.get("rounds")
            .and_then(Json::arr)
            .and_then(|r| r[1].get("ms")),
        Some(&Json::Num(20.0))
    );
    assert!(parse_json("{\"a\":1,}").is_err());
    assert!(parse_json("[1 2]").is_err());
}
