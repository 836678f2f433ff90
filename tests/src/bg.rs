//! [`BgProc`]: a command that runs in the background while the test does something
//! else (a `cr-migrate receive` waiting for a sender, a `send` the test interrupts),
//! with its stdout and stderr in files, killed and reaped on drop.
//!
//! [`crate::run_crm`] is the tool for a command the test simply waits for; a
//! migration needs two at once and a test that keeps reaping the source meanwhile.

use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::procs;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A background process of ours; dropping it SIGKILLs and reaps it.
#[derive(Debug)]
pub struct BgProc {
    name: String,
    child: Child,
    pid: i32,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
    started: Instant,
}

impl BgProc {
    /// Starts `program ARGS` with stdin from /dev/null and stdout/stderr in
    /// `dir/<name>-<n>.out` and `.err`; `env` is added to the environment. Inherited
    /// fds above 2 are closed at exec. Panics if it cannot be spawned.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> BgProc {
        crate::init();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let out = dir.join(format!("{name}-{n}.out"));
        let err = dir.join(format!("{name}-{n}.err"));
        let create =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(create(&out))
            .stderr(create(&err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // raw syscall (close_range), which is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // Fds the test process inherited (cargo's jobserver pipe, ...) must not
                // leak into what this command starts. Close-on-exec rather than
                // closed, so std's exec-error pipe keeps working.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!(
            "$ {} {} &   [{name}: {}]",
            program.display(),
            args.join(" "),
            err.display()
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        let pid = child.id() as i32;
        procs::own(pid);
        BgProc {
            name: name.to_string(),
            child,
            pid,
            out,
            err,
            status: None,
            started: Instant::now(),
        }
    }

    /// Starts `PREFIX... cr-migrate ARGS` (the prefix runs it somewhere else, e.g.
    /// `ip netns exec NS`; empty: cr-migrate itself), with `NO_COLOR=1`.
    pub fn crm(name: &str, prefix: &[String], args: &[String], dir: &Path) -> BgProc {
        let bin = crate::crm_bin().to_string_lossy().into_owned();
        let (program, mut all) = match prefix.split_first() {
            Some((p, rest)) => (PathBuf::from(p), rest.to_vec()),
            None => (PathBuf::from(&bin), Vec::new()),
        };
        if !prefix.is_empty() {
            all.push(bin);
        }
        all.extend(args.iter().cloned());
        BgProc::spawn(name, &program, &all, dir, &[("NO_COLOR", "1")])
    }

    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Time since it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read(&self.out)
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read(&self.err)
    }

    /// Its exit status if it has ended (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                procs::disown(self.pid);
                eprintln!(
                    "  -> {} (pid {}) {s} after {:.2?}",
                    self.name,
                    self.pid,
                    self.started.elapsed()
                );
            }
        }
        self.status
    }

    /// Waits up to `timeout` for it to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for a stderr line containing `needle`; fails early (with
    /// the stderr) if the process ends without writing it.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = self.try_wait();
            if let Some(l) = self.stderr().lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            if let Some(s) = ended {
                return Err(format!(
                    "{} ended ({s}) without writing {needle:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} wrote no {needle:?} within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` to it (if it has not been reaped yet).
    pub fn signal(&mut self, sig: i32) -> std::io::Result<()> {
        if self.try_wait().is_some() {
            return Err(std::io::Error::other(format!(
                "{} already ended",
                self.name
            )));
        }
        procs::kill(self.pid, sig)
    }

    /// SIGKILLs it (if still running) and reaps it; returns its exit status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        let _ = procs::kill(self.pid, libc::SIGKILL);
        let s = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        self.status = Some(s);
        procs::disown(self.pid);
        s
    }
}

impl Drop for BgProc {
    fn drop(&mut self) {
        self.kill();
        procs::reap_zombies();
    }
}

fn read(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
