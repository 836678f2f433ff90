//! Locating and running the `cr-migrate` binary.
//!
//! [`crm_bin`] uses `$CRM_BIN` if set. Otherwise it takes `<target>/<profile>/cr-migrate`
//! next to the running test executable (`<target>/<profile>/deps/<test>-<hash>`) and,
//! once per test process, builds it with `cargo build -p crm-migrate --bin cr-migrate`
//! (same profile, same target dir) if it is missing or older than the sources of the
//! crates it is made of. So `cargo test -p crm-tests` always tests the current code.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::procs;

/// Default timeout of [`run_crm`]; `CRM_TIMEOUT_SECS` overrides it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// `<target>/<profile>`: the directory of the running executable, or its parent if
/// that is a `deps` directory (integration tests live in `<target>/<profile>/deps`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workload binary of this crate by name, next to the running executable.
/// Integration tests should prefer [`crate::workload_bin!`], which Cargo resolves.
pub fn workload_path(name: &str) -> PathBuf {
    profile_dir().join(name)
}

/// The `cr-migrate` binary to test (see the module docs). Panics if it cannot be
/// found or built: every test that needs it would fail anyway, with this message.
pub fn crm_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(locate_or_build) {
        Ok(p) => p,
        Err(e) => panic!("cr-migrate binary: {e}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CRM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("CRM_BIN={} is not a file", p.display()))
        };
    }
    let profile_dir = profile_dir();
    let bin = profile_dir.join("cr-migrate");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace dir")?
        .to_path_buf();
    let bin_mtime = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let src_mtime = newest_source(&workspace);
    let stale = match (bin_mtime, src_mtime) {
        (None, _) => true,
        (Some(b), Some(s)) => s > b,
        (Some(_), None) => false,
    };
    if stale {
        build(&workspace, &profile_dir)?;
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} does not exist after building", bin.display()))
    }
}

/// Newest modification time among the sources `cr-migrate` is built from.
fn newest_source(workspace: &Path) -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in rd.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                if path
                    .file_name()
                    .is_some_and(|n| n == "target" || n == ".git")
                {
                    continue;
                }
                walk(&path, newest);
            } else if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
                if newest.is_none_or(|n| m > n) {
                    *newest = Some(m);
                }
            }
        }
    }
    let mut newest = None;
    for krate in ["migrate", "engine", "proto", "page-server"] {
        walk(&workspace.join(krate), &mut newest);
    }
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(workspace.join(f)).and_then(|m| m.modified()) {
            if newest.is_none_or(|n| m > n) {
                newest = Some(m);
            }
        }
    }
    newest
}

fn build(workspace: &Path, profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir.parent().ok_or("profile dir has no parent")?;
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "crm-migrate", "--bin", "cr-migrate"]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => return Err("profile dir has no name".into()),
    }
    cmd.current_dir(workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null());
    eprintln!(
        "building cr-migrate: {cmd:?} (CARGO_TARGET_DIR={})",
        target_dir.display()
    );
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", Path::new(&cargo).display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo build -p crm-migrate --bin cr-migrate` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `cr-migrate ARGS` with [`DEFAULT_TIMEOUT`] (or `CRM_TIMEOUT_SECS`).
pub fn run_crm(args: &[&str]) -> Output {
    let timeout = std::env::var("CRM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    run_crm_timeout(args, timeout)
}

/// Runs `cr-migrate ARGS`, stdin from /dev/null, stdout and stderr captured.
///
/// If it runs longer than `timeout` it is SIGKILLed; the returned status then shows
/// the signal and stderr ends with a `[harness: ...]` note. The command line and the
/// outcome are printed (captured by libtest, shown for failing tests).
pub fn run_crm_timeout(args: &[&str], timeout: Duration) -> Output {
    crate::init();
    let bin = crm_bin();
    eprintln!("$ cr-migrate {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let pid = child.id() as i32;
    procs::own(pid);
    let stdout_rx = drain(child.stdout.take().expect("piped stdout"));
    let stderr_rx = drain(child.stderr.take().expect("piped stderr"));
    let mut note = String::new();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                note = format!(
                    "\n[harness: cr-migrate timed out after {}s and was killed]\n",
                    timeout.as_secs()
                );
                break child.wait().expect("waiting for killed cr-migrate");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for cr-migrate: {e}"),
        }
    };
    procs::disown(pid);
    // Anything cr-migrate left behind and orphaned to us that already died.
    procs::reap_zombies();
    // A process that inherited the pipes could keep them open forever: don't hang.
    let grace = Duration::from_secs(5);
    let stdout = stdout_rx.recv_timeout(grace).unwrap_or_else(|_| {
        note.push_str("\n[harness: stdout still held open by another process]\n");
        Vec::new()
    });
    let mut stderr = stderr_rx.recv_timeout(grace).unwrap_or_else(|_| {
        note.push_str("\n[harness: stderr still held open by another process]\n");
        Vec::new()
    });
    stderr.extend_from_slice(note.as_bytes());
    let out = Output {
        status,
        stdout,
        stderr,
    };
    eprintln!(
        "  -> {} in {:.2?}{}",
        out.status,
        started.elapsed(),
        indent_stderr(&out.stderr)
    );
    out
}

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn indent_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    // Keep the beginning and the end of a long log.
    let shown: Vec<String> = if lines.len() > 60 {
        let mut v: Vec<String> = lines[..20].iter().map(|l| l.to_string()).collect();
        v.push(format!("... ({} lines) ...", lines.len() - 60));
        v.extend(lines[lines.len() - 40..].iter().map(|l| l.to_string()));
        v
    } else {
        lines.iter().map(|l| l.to_string()).collect()
    };
    let mut s = String::from(", stderr:");
    for l in shown {
        s.push_str("\n  | ");
        s.push_str(&l);
    }
    s
}

/// The stderr of a finished `cr-migrate` run, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panics unless the `cr-migrate` run (`what`, e.g. "dump") succeeded
/// without a panic, showing its stderr.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success() && !stderr(out).contains("panicked"),
        "`cr-migrate {what}` failed ({}):\n{}",
        out.status,
        stderr(out)
    );
}

/// A temporary path as `&str` (they are UTF-8).
pub fn path_str(p: &std::path::Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `cr-migrate dump --pid PID --images-dir IMAGES --leave-running`, asserted
/// to succeed.
pub fn dump_leave_running(pid: &str, images: &std::path::Path) -> Output {
    let out = run_crm(&[
        "dump",
        "--pid",
        pid,
        "--images-dir",
        path_str(images),
        "--leave-running",
    ]);
    assert_success(&out, "dump --leave-running");
    out
}
